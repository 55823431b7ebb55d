"""Exercise 6.3: the memory planner (parameters, active parameters, KV cache, per-GPU model states)."""

from __future__ import annotations

import math

from course_judge.checks import assert_true, expect_float, expect_int
from course_judge.local import Alternative, Mutant
from course_judge.session import LearnerError
from course_lib import planner as P

GRADE_ID = "test_06_3_planner"
POINTS = 6
ANSWERS = ("ex_06_3_planner",)
SUMMARY = ("every component of V3, V2, V2-Lite and an odd config, against real MLA/MoE modules; active parameters; "
           "MLA and MHA cache bytes, bytes_per_element, ValueError; per-GPU memory for 5 layouts x 3 precisions, "
           "ZeRO-1 on and off")
REFERENCE = ("course_lib.planner",)

_CFG = "course_lib.plan_config:ModelConfig"
ODD = dict(vocab_size=1000, dim=96, n_layers=5, n_dense_layers=2, n_heads=6, q_lora_rank=40, kv_lora_rank=24,
           qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=14, inter_dim=200, moe_inter_dim=30, n_routed_experts=12,
           n_shared_experts=2, n_activated_experts=3, n_expert_groups=4, n_limited_groups=2)
# a small model whose one layer is a real MLA without query compression (q_lora_rank = 0) and one with it
MLA_Q0 = dict(dim=48, n_heads=3, q_lora_rank=0, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
MLA_Q = dict(dim=40, n_heads=2, q_lora_rank=16, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
MOE = dict(dim=24, moe_inter_dim=10, n_routed_experts=8, n_shared_experts=2, n_activated_experts=2, n_expert_groups=2,
           n_limited_groups=1)
LAYOUTS = [dict(), dict(dp=128, tp=1, pp=16, ep=64, zero1=True), dict(dp=8, tp=2, pp=4, ep=16),
           dict(dp=8, tp=2, pp=4, ep=16, zero1=False), dict(dp=4, tp=8, pp=2, ep=32)]
PRECISIONS = [(2.0, 4.0, 4.0, 8.0), (2.0, 4.0, 4.0, 4.0), (1.0, 2.0, 4.0, 2.0)]
_KEYS = set(P.COMPONENTS)


def _configs(k) -> dict:
    """name -> (the config here, a handle to the same config in the kernel)."""
    mc = k.lib(_CFG)
    out = {"V3": (P.ModelConfig(), k.call_opts(mc, keep=True)),
           "V2": (P.ModelConfig.v2(), k.call_opts(k.lib(_CFG + ".v2"), keep=True)),
           "V2-Lite": (P.ModelConfig.v2_lite(), k.call_opts(k.lib(_CFG + ".v2_lite"), keep=True)),
           "odd": (P.ModelConfig(**ODD), k.call_opts(mc, kwargs=ODD, keep=True))}
    for name, kw in (("one MLA layer, q_lora_rank 0", MLA_Q0), ("one MLA layer", MLA_Q)):
        kw = dict(vocab_size=10, n_layers=1, n_dense_layers=1, inter_dim=20, **kw)
        out[name] = (P.ModelConfig(**kw), k.call_opts(mc, kwargs=kw, keep=True))
    kw = dict(n_layers=1, n_dense_layers=0, **MOE)
    out["one MoE layer"] = (P.ModelConfig(**kw), k.call_opts(mc, kwargs=kw, keep=True))
    return out


def _first(got: int, candidates: dict[str, int]) -> str | None:
    for why, value in candidates.items():
        if got == value:
            return why
    return None


def _attention_mistakes(c: P.ModelConfig) -> dict[str, int]:
    L, d, H = c.n_layers, c.dim, c.n_heads
    want = P.mla_params_per_layer(c) * L
    q_in = c.q_lora_rank or d
    out = {
        "k_pe is ONE rotary key shared by all heads: wkv_a outputs d_c + d_h^R, not d_c + n_h d_h^R":
            want + L * d * c.qk_rope_head_dim * (H - 1),
        "wkv_a also produces the shared rotary key k_pe: dim x (d_c + d_h^R)": want - L * d * c.qk_rope_head_dim,
        "wq_b gives every head d_h + d_h^R query dims (the rotary part included)": want - L * q_in * H * c.qk_rope_head_dim,
        "wkv_b gives every head d_h (keys) + d_v (values); the rotary key comes from wkv_a":
            want + L * c.kv_lora_rank * H * c.qk_rope_head_dim,
        "wo maps n_h d_v back to dim": want - L * H * c.v_head_dim * d + L * H * (c.qk_nope_head_dim + c.qk_rope_head_dim) * d,
        "the attention of the first n_dense_layers counts too (every layer has MLA)": want // L * (L - c.n_dense_layers),
    }
    if c.q_lora_rank:
        out["q_norm and kv_norm are missing (q_lora_rank + kv_lora_rank weights per layer)"] = want - L * (c.q_lora_rank + c.kv_lora_rank)
        out["q_norm (q_lora_rank weights per layer) is missing"] = want - L * c.q_lora_rank
    else:
        out["without query compression (q_lora_rank = 0) there is one wq of dim x n_h (d_h + d_h^R)"] = \
            want - L * d * H * (c.qk_nope_head_dim + c.qk_rope_head_dim)
    out["kv_norm (kv_lora_rank weights per layer) is missing"] = want - L * c.kv_lora_rank
    return out


def _component_mistakes(c: P.ModelConfig, key: str) -> dict[str, int]:
    L, d, n_moe = c.n_layers, c.dim, c.n_layers - c.n_dense_layers
    exp = P.expert_params(c)
    if key in ("embedding", "head"):
        return {"the output head is a separate matrix (not tied to the embedding): vocab x dim": 0}
    if key == "dense_mlp":
        return {"a dense SwiGLU has three matrices (w1, w3: dim -> inter_dim; w2 back)": c.n_dense_layers * 2 * d * c.inter_dim,
                "only the first n_dense_layers have a dense MLP": L * 3 * d * c.inter_dim}
    if key == "shared_experts":
        return {"only the MoE layers (n_layers - n_dense_layers) have shared experts": L * c.n_shared_experts * exp,
                "an expert is a SwiGLU of moe_inter_dim: 3 x dim x moe_inter_dim": n_moe * c.n_shared_experts * 2 * d * c.moe_inter_dim}
    if key == "routed_experts":
        return {"only the MoE layers (n_layers - n_dense_layers) have routed experts": L * c.n_routed_experts * exp,
                "count all n_routed_experts (not only the activated ones)": n_moe * c.n_activated_experts * exp,
                "an expert is a SwiGLU of moe_inter_dim: 3 x dim x moe_inter_dim": n_moe * c.n_routed_experts * 2 * d * c.moe_inter_dim}
    if key == "router":
        with_bias, without = n_moe * c.n_routed_experts * (d + 1), n_moe * c.n_routed_experts * d
        return {"the router has one bias per routed expert only when cfg.router_bias": with_bias if not c.router_bias else without,
                "only the MoE layers have a router": L * c.n_routed_experts * (d + c.router_bias)}
    if key == "norms":
        return {"the final norm (dim weights) is missing": L * 2 * d,
                "q_norm and kv_norm belong to attention, not to norms": L * 2 * d + d + L * (c.q_lora_rank + c.kv_lora_rank),
                "two RMSNorms per layer (attention and FFN) and the final one": L * d + d}
    return {}


_HINTS = {"attention": "MLA: wq_a, q_norm, wq_b (n_h (d_h + d_h^R)), wkv_a (d_c + d_h^R), kv_norm, wkv_b (n_h (d_h + d_v)), wo",
          "router": "n_moe x n_routed x dim, plus one bias per expert only when router_bias",
          "norms": "two RMSNorms per layer and the final norm", "shared_experts": "only the MoE layers have shared experts",
          "dense_mlp": "the first n_dense_layers use a dense SwiGLU of inter_dim",
          "routed_experts": "n_moe x n_routed_experts x 3 x dim x moe_inter_dim",
          "embedding": "vocab x dim", "head": "vocab x dim"}


def _counts(k, f, cfgs, names) -> dict:
    res = k.many([(f, (cfgs[n][1],), {}) for n in names])
    out = {}
    for n, r in zip(names, res):
        if isinstance(r, LearnerError):
            raise r
        assert_true(isinstance(r, dict) and set(r) == _KEYS,
                    f"{n}: count_params should return a dict with the keys {sorted(_KEYS)}, got "
                    f"{sorted(r) if isinstance(r, dict) else type(r).__name__}")
        out[n] = {key: expect_int(v, f"{n}: count_params()[{key!r}]") for key, v in r.items()}
    return out


def _check_component(name, cfg, mine, key) -> None:
    want = P.count_params(cfg)[key]
    got = mine[key]
    if got != want:
        cands = _attention_mistakes(cfg) if key == "attention" else _component_mistakes(cfg, key)
        why = _first(got, cands) or _HINTS.get(key)
        raise AssertionError(f"{name}: count_params()[{key!r}] = {got:,}, expected {want:,}\n  likely cause: {why}")


def _real_counts() -> dict[str, int]:
    import torch

    from course_lib.deepseek.mla import MLA, MLAConfig
    from course_lib.deepseek.moe import MoE, MoEConfig

    torch.manual_seed(0)
    out = {"one MLA layer, q_lora_rank 0": sum(p.numel() for p in MLA(MLAConfig(**MLA_Q0)).parameters()),
           "one MLA layer": sum(p.numel() for p in MLA(MLAConfig(**MLA_Q)).parameters())}
    moe = MoE(MoEConfig(**MOE))
    out["one MoE layer"] = sum(p.numel() for p in moe.parameters()) + moe.gate.bias.numel()  # the bias is a buffer
    return out


def _per_gpu_mistakes(c, par, prec) -> dict[str, dict[str, float]]:
    counts = P.count_params(c)
    E = counts["routed_experts"]
    O = sum(counts.values()) - E
    dp, tp, pp, ep = par["dp"], par["tp"], par["pp"], par["ep"]
    w, g, m, o = prec
    P_ = O / (tp * pp) + E / (ep * pp)
    world = dp * tp * pp
    return {
        "params": {"routed experts are split ep ways AND over the pp stages: E / (ep pp)": O / (tp * pp) + E / ep,
                   "non-expert weights are split by tp and pp: O / (tp pp)": O / tp + E / (ep * pp),
                   "TP does not split the routed experts (EP does): E / (ep pp)": O / (tp * pp) + E / (ep * tp * pp)},
        "states": {"ZeRO-1 spreads the master weights and moments of ALL parameters over dp x tp x pp GPUs":
                   (O + E) * (m + o) / dp,
                   "ZeRO-1 shards the model's states (O + E), not only this GPU's share: (O + E)(b_m + b_o) / (dp tp pp)":
                   P_ * (m + o) / dp,
                   "states are the master weights AND the optimiser moments (b_m + b_o bytes per parameter)":
                   ((O + E) * o / world) if par.get("zero1", True) else P_ * o,
                   "without ZeRO-1 every GPU keeps the states of its own parameters: P_GPU x (b_m + b_o)":
                   (O + E) * (m + o) / world,
                   "with ZeRO-1 the states are sharded: (O + E)(b_m + b_o) / (dp tp pp)": P_ * (m + o)},
        "weights": {"weights take prec.weights bytes per parameter": P_ * g},
        "grads": {"gradients take prec.grads bytes per parameter": P_ * w},
    }


def judge(k, t):
    cp, act, kv, pgm = k.g.count_params, k.g.active_params, k.g.kv_cache_bytes_per_token, k.g.per_gpu_memory
    cfgs: dict = {}
    with t.part("visible checks: the keys, ~671B total, ~37B active, 70,272 cache bytes per token, 18 bytes per parameter", 1):
        cfgs.update(_configs(k))
        v3 = cfgs["V3"][1]
        c = cp(v3)
        assert_true(isinstance(c, dict) and set(c) == _KEYS,
                    f"count_params keys: {sorted(c) if isinstance(c, dict) else type(c).__name__}, expected {sorted(_KEYS)}")
        total = sum(expect_int(v, f"count_params()[{key!r}]") for key, v in c.items())
        assert_true(abs(total / 1e9 - 671) < 0.5, f"total parameters {total / 1e9:.2f}B, expected ~671B")
        a = expect_int(act(v3), "active_params(V3)")
        assert_true(round(a / 1e9) == 37, f"active parameters {a / 1e9:.2f}B, expected 36.6B (published: 37B)",
                    hint="keep the shared expert, router and attention; leave out the 248 unchosen routed experts per MoE "
                         "layer and the embedding table")
        b = expect_float(kv(v3, "mla"), "kv_cache_bytes_per_token(V3, 'mla')")
        assert_true(b == 70272, f"MLA cache {b} bytes/token, expected 576 x 61 x 2")
        par = k.call_opts(k.lib("course_lib.plan_config:Parallelism"), keep=True)
        m = pgm(v3, par, k.lib("course_lib.plan_config:BF16_MIXED"))
        assert_true(isinstance(m, dict) and "total" in m, f"per_gpu_memory should return a dict with 'total', got {type(m).__name__}")
        assert_true(abs(expect_float(m["total"], "per_gpu_memory()['total']") - 18 * total) < 1e6,
                    "on one GPU with BF16_MIXED every parameter costs 2 + 4 + 4 + 8 = 18 bytes")
    main = ["V3", "V2", "V2-Lite", "odd"]
    real = _real_counts()
    yours: dict = {}  # the learner's own counts, to tell a wrong count_params from a wrong formula on top of it
    with t.part("count_params: attention with and without query compression (four configs, real MLA modules)", 1):
        cfgs.update(cfgs or _configs(k))
        mine = _counts(k, cp, cfgs, main + ["one MLA layer, q_lora_rank 0", "one MLA layer"])
        for n in ("one MLA layer, q_lora_rank 0", "one MLA layer"):
            got = mine[n]["attention"]
            if got != real[n]:
                why = _first(got, _attention_mistakes(cfgs[n][0])) or _HINTS["attention"]
                raise AssertionError(f"{n}: count_params()['attention'] = {got:,}, but a real course_lib MLA module with this "
                                     f"config has {real[n]:,} parameters\n  likely cause: {why}")
        for n in main:
            _check_component(n, cfgs[n][0], mine[n], "attention")
    with t.part("count_params: embedding, dense MLP, shared and routed experts, router, norms, head (and a real MoE layer)", 1):
        cfgs.update(cfgs or _configs(k))
        mine = _counts(k, cp, cfgs, main + ["one MoE layer"])
        yours.update(mine)
        moe = mine["one MoE layer"]
        got = moe["shared_experts"] + moe["routed_experts"] + moe["router"]
        if got != real["one MoE layer"]:
            raise AssertionError(f"one MoE layer: shared + routed experts + router = {got:,}, but a real course_lib MoE layer has "
                                 f"{real['one MoE layer']:,} (its gate's bias included)\n  likely cause: "
                                 + (_first(moe["router"], _component_mistakes(cfgs["one MoE layer"][0], "router"))
                                    or "an expert is 3 x dim x moe_inter_dim; the router dim weights per expert plus its bias"))
        for n in main:
            for key in ("embedding", "dense_mlp", "shared_experts", "routed_experts", "router", "norms", "head"):
                _check_component(n, cfgs[n][0], mine[n], key)
    with t.part("active_params on V3, V2 (21B), V2-Lite and an odd config", 1):
        cfgs.update(cfgs or _configs(k))
        res = k.many([(act, (cfgs[n][1],), {}) for n in main])
        for n, r in zip(main, res):
            if isinstance(r, LearnerError):
                raise r
            got, c_ = expect_int(r, f"active_params({n})"), cfgs[n][0]
            want = P.active_params(c_)
            if got == want:
                continue
            cnt = P.count_params(c_)
            n_moe = c_.n_layers - c_.n_dense_layers
            cands = {"a token reads one row of the embedding table: leave the embedding out": want + cnt["embedding"],
                     "every token goes through the shared experts: count them": want - cnt["shared_experts"],
                     "every token multiplies the output head: count it": want - cnt["head"],
                     "the router runs for every token: count it": want - cnt["router"],
                     "count the n_activated_experts chosen routed experts of every MoE layer":
                         want - n_moe * c_.n_activated_experts * P.expert_params(c_),
                     "leave out the unchosen routed experts (all but n_activated_experts per MoE layer)": want + cnt["routed_experts"]
                         - n_moe * c_.n_activated_experts * P.expert_params(c_)}
            if n in yours and yours[n] != cnt:
                m = yours[n]
                cands["it follows your count_params, which is off (see above): fix count_params first"] = (
                    sum(m.values()) - m["embedding"] - m["routed_experts"]
                    + m["routed_experts"] * c_.n_activated_experts // max(c_.n_routed_experts, 1))
            raise AssertionError(f"{n}: active_params = {got:,}, expected {want:,}\n  likely cause: "
                                 + (_first(got, cands) or "all parameters but the unchosen routed experts and the embedding table"))
    with t.part("kv_cache_bytes_per_token: MLA and MHA on four configs, bytes_per_element, ValueError for other kinds", 1):
        cfgs.update(cfgs or _configs(k))
        calls = [(n, kind, bpe) for n in main for kind in ("mla", "mha") for bpe in (2, 1)]
        res = k.many([(kv, (cfgs[n][1], kind, bpe), {}) for n, kind, bpe in calls])
        for (n, kind, bpe), r in zip(calls, res):
            if isinstance(r, LearnerError):
                raise r
            got, c_ = expect_float(r, f"kv_cache_bytes_per_token({n}, {kind!r}, {bpe})"), cfgs[n][0]
            want = P.kv_cache_bytes_per_token(c_, kind, bpe)
            if got == want:
                continue
            L, H = c_.n_layers, c_.n_heads
            cands = {"bytes_per_element must scale the result (an FP8 cache has 1 byte per element)":
                     P.kv_cache_bytes_per_token(c_, kind, 2),
                     "sum over all n_layers layers": want / L}
            if kind == "mla":
                cands.update({"the latent c_KV and k_pe are shared by all heads: d_c + d_h^R per layer, not per head": want * H,
                              "MLA also caches the rotary key k_pe: d_c + d_h^R per layer": c_.kv_lora_rank * L * bpe,
                              "that is the naive MLA cache (per-head keys and values): MLA caches the latent and k_pe":
                              P.kv_cache_bytes_per_token(c_, "mla_naive", bpe)})
            else:
                cands.update({"MHA caches a key AND a value per head: 2 n_h d_h": want / 2,
                              "the MHA baseline's heads have d_h = qk_nope_head_dim for keys and values: 2 n_h d_h":
                              2 * H * (c_.qk_nope_head_dim + c_.qk_rope_head_dim) * L * bpe,
                              "that is the naive MLA cache; standard MHA stores 2 n_h d_h per layer":
                              P.kv_cache_bytes_per_token(c_, "mla_naive", bpe)})
            raise AssertionError(f"{n}: kv_cache_bytes_per_token(kind={kind!r}, bytes_per_element={bpe}) = {got:g}, "
                                 f"expected {want:g}\n  likely cause: " + (_first(got, cands) or
                                 "MLA: (d_c + d_h^R) per layer; MHA: 2 n_h d_h per layer; times n_layers and bytes_per_element"))
        for kind in ("gqa", "MLA"):
            try:
                got = kv(cfgs["V3"][1], kind)
            except LearnerError as e:
                assert_true(e.type == "ValueError", f"kv_cache_bytes_per_token(kind={kind!r}) raised {e.type}, expected ValueError")
                continue
            raise AssertionError(f"kv_cache_bytes_per_token(kind={kind!r}) returned {got!r}: an unknown kind must raise ValueError")
    with t.part("per_gpu_memory: five layouts x three precisions, ZeRO-1 on and off", 1):
        cfgs.update(cfgs or _configs(k))
        par_mk, prec_mk = k.lib("course_lib.plan_config:Parallelism"), k.lib("course_lib.plan_config:Precision")
        pars = [k.call_opts(par_mk, kwargs=lay, keep=True) for lay in LAYOUTS]
        precs = [k.call_opts(prec_mk, prec, keep=True) for prec in PRECISIONS]
        combos = [(i, j) for i in range(len(LAYOUTS)) for j in range(len(PRECISIONS))]
        res = k.many([(pgm, (cfgs["V3"][1], pars[i], precs[j]), {}) for i, j in combos])
        c3 = cfgs["V3"][0]
        for (i, j), r in zip(combos, res):
            if isinstance(r, LearnerError):
                raise r
            lay = {"dp": 1, "tp": 1, "pp": 1, "ep": 1, "zero1": True, **LAYOUTS[i]}
            want = P.per_gpu_memory(c3, P.Parallelism(**LAYOUTS[i]), P.Precision(*PRECISIONS[j]))
            label = f"per_gpu_memory under Parallelism({', '.join(f'{a}={b}' for a, b in lay.items())}) / Precision{PRECISIONS[j]}"
            assert_true(isinstance(r, dict) and set(want) <= set(r), f"{label} should return a dict with keys {sorted(want)}, got "
                        f"{sorted(r) if isinstance(r, dict) else type(r).__name__}")
            mist = _per_gpu_mistakes(c3, lay, PRECISIONS[j])
            if "V3" in yours and yours["V3"] != P.count_params(c3):
                e_, o_ = yours["V3"]["routed_experts"], sum(yours["V3"].values()) - yours["V3"]["routed_experts"]
                mist["params"]["it follows your count_params, which is off (see above): fix count_params first"] = \
                    o_ / (lay["tp"] * lay["pp"]) + e_ / (lay["ep"] * lay["pp"])
            for key in ("params", "weights", "grads", "states", "total"):
                got = expect_float(r[key], f"{label}[{key!r}]")
                if math.isclose(got, want[key], rel_tol=1e-9):
                    continue
                why = next((w for w, v in mist.get(key, {}).items() if math.isclose(got, v, rel_tol=1e-9)), None)
                why = why or {"params": "non-expert weights split by tp and pp, routed experts by ep and pp",
                              "states": "ZeRO-1: (master + optimizer) bytes of ALL parameters / (dp tp pp); without ZeRO-1 "
                                        "per-GPU params x those bytes",
                              "total": "total = weights + grads + states"}.get(key, f"{key} = params x prec.{key}")
                raise AssertionError(f"{label}[{key!r}] = {got:.6g}, expected {want[key]:.6g}\n  likely cause: {why}")


_SOL = "ex_06_3_planner"
MUTANTS = [
    Mutant("q_norm forgotten", "q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk",
           "q = d * cfg.q_lora_rank + cfg.q_lora_rank * H * qk", expect="q_norm"),
    Mutant("k_pe per head", "kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank",
           "kv = d * (cfg.kv_lora_rank + H * cfg.qk_rope_head_dim) + cfg.kv_lora_rank", expect="shared by all heads"),
    Mutant("wkv_a without the rotary key", "kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank",
           "kv = d * cfg.kv_lora_rank + cfg.kv_lora_rank", expect="wkv_a also produces"),
    Mutant("no query compression ignored", "        q = d * H * qk  # wq", "        q = 0", expect="q_lora_rank = 0"),
    Mutant("router bias always", '"router": n_moe * cfg.n_routed_experts * (d + (1 if cfg.router_bias else 0)),',
           '"router": n_moe * cfg.n_routed_experts * (d + 1),', expect="only when cfg.router_bias"),
    Mutant("shared experts in every layer", '"shared_experts": n_moe * cfg.n_shared_experts * expert,',
           '"shared_experts": cfg.n_layers * cfg.n_shared_experts * expert,', expect="only the MoE layers"),
    Mutant("no final norm", '"norms": cfg.n_layers * 2 * d + d,', '"norms": cfg.n_layers * 2 * d,', expect="final norm"),
    Mutant("embedding counted as active", 'return sum(c.values()) - inactive - c["embedding"]', "return sum(c.values()) - inactive",
           expect="embedding"),
    Mutant("MHA cache with the rotary dims", "per_layer = 2 * cfg.n_heads * cfg.qk_nope_head_dim",
           "per_layer = 2 * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)", expect="2 n_h d_h"),
    Mutant("MLA cache per head", "per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim",
           "per_layer = cfg.n_heads * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)", expect="shared by all heads"),
    Mutant("bytes_per_element ignored", "return per_layer * cfg.n_layers * bytes_per_element", "return per_layer * cfg.n_layers * 2",
           expect="bytes_per_element must scale"),
    Mutant("unknown kind accepted", '        raise ValueError(f"kind must be \'mla\' or \'mha\', got {kind!r}")',
           "        per_layer = 0", expect="must raise ValueError"),
    Mutant("ZeRO-1 over dp only", "states = (O + E) * per_state / (par.dp * par.tp * par.pp) if par.zero1 else P * per_state",
           "states = (O + E) * per_state / par.dp if par.zero1 else P * per_state", expect="over dp x tp x pp"),
    Mutant("ZeRO-1 always", "states = (O + E) * per_state / (par.dp * par.tp * par.pp) if par.zero1 else P * per_state",
           "states = (O + E) * per_state / (par.dp * par.tp * par.pp)", expect="without ZeRO-1"),
    Mutant("experts not split by pp", "P = O / (par.tp * par.pp) + E / (par.ep * par.pp)", "P = O / (par.tp * par.pp) + E / par.ep",
           expect="over the pp stages"),
    Mutant("moments only", "per_state = prec.master + prec.optimizer", "per_state = prec.optimizer", expect="master weights AND"),
]

ALTERNATIVES = [
    Alternative("per-layer helpers and the planner's own conventions", source='''
def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per component."""
    ### BEGIN SOLUTION
    d, H = cfg.dim, cfg.n_heads
    head_qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim

    def mla_layer() -> int:
        q = (d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * head_qk) if cfg.q_lora_rank > 0 else d * H * head_qk
        kv_down = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        kv_up = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        return q + kv_down + cfg.kv_lora_rank + kv_up + H * cfg.v_head_dim * d

    def swiglu(hidden: int) -> int:
        return 3 * d * hidden

    moe_layers = cfg.n_layers - cfg.n_dense_layers
    counts = dict.fromkeys(COMPONENTS, 0)
    counts["embedding"] = counts["head"] = cfg.vocab_size * d
    counts["attention"] = sum(mla_layer() for _ in range(cfg.n_layers))
    counts["dense_mlp"] = cfg.n_dense_layers * swiglu(cfg.inter_dim)
    counts["shared_experts"] = moe_layers * cfg.n_shared_experts * swiglu(cfg.moe_inter_dim)
    counts["routed_experts"] = moe_layers * cfg.n_routed_experts * swiglu(cfg.moe_inter_dim)
    counts["router"] = moe_layers * (cfg.n_routed_experts * d + (cfg.n_routed_experts if cfg.router_bias else 0))
    counts["norms"] = (2 * cfg.n_layers + 1) * d
    return counts
    ### END SOLUTION


def active_params(cfg: ModelConfig) -> int:
    """Active parameters."""
    ### BEGIN SOLUTION
    c = count_params(cfg)
    per_expert = c["routed_experts"] // max(cfg.n_routed_experts, 1)
    return sum(v for key, v in c.items() if key not in ("embedding", "routed_experts")) + per_expert * cfg.n_activated_experts
    ### END SOLUTION


def kv_cache_bytes_per_token(cfg: ModelConfig, kind: str = "mla", bytes_per_element: float = 2) -> float:
    """Cache bytes per token."""
    ### BEGIN SOLUTION
    per_layer = {"mla": cfg.kv_lora_rank + cfg.qk_rope_head_dim, "mha": 2 * cfg.n_heads * cfg.qk_nope_head_dim}
    if kind not in per_layer:
        raise ValueError(kind)
    return float(cfg.n_layers * per_layer[kind] * bytes_per_element)
    ### END SOLUTION


def per_gpu_memory(cfg: ModelConfig, par: Parallelism, prec: Precision) -> dict[str, float]:
    """Model states per GPU."""
    ### BEGIN SOLUTION
    c = count_params(cfg)
    experts = c["routed_experts"]
    others = sum(c.values()) - experts
    params = others / par.tp / par.pp + experts / par.ep / par.pp
    if par.zero1:
        states = (others + experts) / (par.dp * par.tp * par.pp) * (prec.master + prec.optimizer)
    else:
        states = params * (prec.master + prec.optimizer)
    weights, grads = params * prec.weights, params * prec.grads
    return {"params": params, "weights": weights, "grads": grads, "states": states, "total": weights + grads + states}
    ### END SOLUTION
'''),
]

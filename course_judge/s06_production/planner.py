"""Exercise 6.3: the memory planner (KV cache, per-GPU model states) on the given parameter counter."""

from __future__ import annotations

import math

from course_judge.checks import assert_true, expect_float
from course_judge.local import Alternative, Mutant
from course_judge.session import LearnerError
from course_lib import planner as P

GRADE_ID = "test_06_3_planner"
POINTS = 4
ANSWERS = ("ex_06_3_planner",)
SUMMARY = ("MLA and MHA cache bytes on V3, V2, V2-Lite and an odd config, bytes_per_element, ValueError; per-GPU memory "
           "for 5 layouts x 3 precisions, ZeRO-1 on and off, each usual slip named")
REFERENCE = ("course_lib.planner",)

_CFG = "course_lib.plan_config:ModelConfig"
ODD = dict(vocab_size=1000, dim=96, n_layers=5, n_dense_layers=2, n_heads=6, q_lora_rank=40, kv_lora_rank=24,
           qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=14, inter_dim=200, moe_inter_dim=30, n_routed_experts=12,
           n_shared_experts=2, n_activated_experts=3, n_expert_groups=4, n_limited_groups=2)
LAYOUTS = [dict(), dict(dp=128, tp=1, pp=16, ep=64, zero1=True), dict(dp=8, tp=2, pp=4, ep=16),
           dict(dp=8, tp=2, pp=4, ep=16, zero1=False), dict(dp=4, tp=8, pp=2, ep=32)]
PRECISIONS = [(2.0, 4.0, 4.0, 8.0), (2.0, 4.0, 4.0, 4.0), (1.0, 2.0, 4.0, 2.0)]


def _configs(k) -> dict:
    """name -> (the config here, a handle to the same config in the kernel)."""
    mc = k.lib(_CFG)
    out = {"V3": (P.ModelConfig(), k.call_opts(mc, keep=True)),
           "V2": (P.ModelConfig.v2(), k.call_opts(k.lib(_CFG + ".v2"), keep=True)),
           "V2-Lite": (P.ModelConfig.v2_lite(), k.call_opts(k.lib(_CFG + ".v2_lite"), keep=True)),
           "odd": (P.ModelConfig(**ODD), k.call_opts(mc, kwargs=ODD, keep=True))}
    return out


def _first(got: int, candidates: dict[str, int]) -> str | None:
    for why, value in candidates.items():
        if got == value:
            return why
    return None


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
    kv, pgm = k.g.kv_cache_bytes_per_token, k.g.per_gpu_memory
    cfgs: dict = {}
    with t.part("visible checks: 70,272 cache bytes per token, 18 bytes per parameter on one GPU", 1):
        cfgs.update(_configs(k))
        v3 = cfgs["V3"][1]
        total = P.total_params(cfgs["V3"][0])
        b = expect_float(kv(v3, "mla"), "kv_cache_bytes_per_token(V3, 'mla')")
        assert_true(b == 70272, f"MLA cache {b} bytes/token, expected 576 x 61 x 2")
        par = k.call_opts(k.lib("course_lib.plan_config:Parallelism"), keep=True)
        m = pgm(v3, par, k.lib("course_lib.plan_config:BF16_MIXED"))
        assert_true(isinstance(m, dict) and "total" in m, f"per_gpu_memory should return a dict with 'total', got {type(m).__name__}")
        assert_true(abs(expect_float(m["total"], "per_gpu_memory()['total']") - 18 * total) < 1e6,
                    "on one GPU with BF16_MIXED every parameter costs 2 + 4 + 4 + 8 = 18 bytes")
    main = ["V3", "V2", "V2-Lite", "odd"]
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
    with t.part("per_gpu_memory: five layouts x three precisions, ZeRO-1 on and off", 2):
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
    Mutant("TP splits the experts", "P = O / (par.tp * par.pp) + E / (par.ep * par.pp)",
           "P = O / (par.tp * par.pp) + E / (par.ep * par.tp * par.pp)", expect="TP does not split the routed experts"),
    Mutant("moments only", "per_state = prec.master + prec.optimizer", "per_state = prec.optimizer", expect="master weights AND"),
]

ALTERNATIVES = [
    Alternative("a table of kinds and per-GPU shares written out", source='''
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
    others = sum(v for key, v in c.items() if key != "routed_experts")
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

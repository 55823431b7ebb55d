"""Exercise 2.2: MLA's down-projections, the query latent, the normalised KV latent and the raw shared rotary key."""

from __future__ import annotations

import dataclasses

import torch

from course_judge.checks import assert_true, expect_tensor, expect_tuple
from course_judge.local import Alternative, Mutant
from course_judge.s02_mla._common import ODD, ONE_HEAD, TINY, close, install, kernel_cfg, randn, seeded_weights, single_threaded
from course_lib.deepseek.attention import MLAConfig

GRADE_ID = "test_02_2_compression"
POINTS = 3
ANSWERS = ("ex_02_2_compression",)
SUMMARY = ("parameter names and shapes (one shared k_pe, kv_norm on the latent only, no biases), c_q, c_kv and the raw k_pe "
           "against the reference in float64 with non-trivial norm weights and cfg.rms_norm_eps, three configurations, float32")
REFERENCE = ("course_lib.deepseek.mla",)

_EPS = dataclasses.replace(ODD, rms_norm_eps=1e-2)  # a forgotten eps shows
_CASES = [(TINY, 2, 6), (_EPS, 1, 1), (ONE_HEAD, 3, 4)]


def _shapes(c: MLAConfig) -> dict[str, tuple]:
    return {"wq_a.weight": (c.q_lora_rank, c.dim), "q_norm.weight": (c.q_lora_rank,),
            "wkv_a.weight": (c.kv_lora_rank + c.qk_rope_head_dim, c.dim), "kv_norm.weight": (c.kv_lora_rank,)}


def _param_hint(got: dict, c: MLAConfig) -> str:
    if got.get("wkv_a.weight", (0,))[0] == c.kv_lora_rank + c.n_heads * c.qk_rope_head_dim and c.n_heads > 1:
        return ("pitfall: k_pe made per-head (wkv_a has kv_lora_rank + n_heads * qk_rope_head_dim outputs): "
                "one rotary key of qk_rope_head_dim numbers per token is shared by every head")
    if got.get("kv_norm.weight") == (c.kv_lora_rank + c.qk_rope_head_dim,):
        return "pitfall: kv_norm applied to k_pe (kv_norm has kv_lora_rank + qk_rope_head_dim weights): it normalises the latent alone"
    if any(n.endswith(".bias") for n in got):
        return "MLA's projections have no biases (bias=False)"
    return "names and sizes are in the class docstring"


def _rms(v, w, eps):
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return v if w is None else v * w


def _run(k, comp, x):
    out = expect_tuple(k.call_opts(comp, [x], no_grad=True), 3, "CompressionLayer(x)")
    return tuple(expect_tensor(o, n) for o, n in zip(out, ("c_q", "c_kv", "k_pe")))


def _build(k, c: MLAConfig, seed: int):
    comp = k.call(k.g.CompressionLayer, kernel_cfg(k, c))
    W = seeded_weights(_shapes(c), seed)
    install(k, comp, W, _shapes(c), "CompressionLayer", hint=lambda got: _param_hint(got, c))
    return comp, W


@single_threaded
def judge(k, t):
    g = torch.Generator().manual_seed(22)
    with t.part("visible checks: parameter shapes, output shapes, unit mean square of c_kv, k_pe independent of kv_norm", 1):
        k.seed(0)
        comp = k.call(k.call(k.g.CompressionLayer, kernel_cfg(k, TINY)).double)
        got = {n: tuple(s) for n, s in k.info(comp).get("parameters", {}).items()}
        want = _shapes(TINY)
        assert_true(got == want, f"parameters {got}, expected {want}", hint=_param_hint(got, TINY))
        x = randn(g, 2, 5, 64)
        c_q, c_kv, k_pe = _run(k, comp, x)
        expect_tensor(c_q, "c_q", shape=(2, 5, 48))
        expect_tensor(c_kv, "c_kv", shape=(2, 5, 32))
        expect_tensor(k_pe, "k_pe", shape=(2, 5, 8), hint="k_pe is ONE rotary key per token, shared by all heads")
        close(c_kv.pow(2).mean(-1), torch.ones(2, 5, dtype=torch.float64), atol=1e-5, name="mean square of c_kv (kv_norm with unit weight)",
              hint="c_kv is the kv_norm-normalised latent")
        k.call_opts(comp.kv_norm.weight.mul_, [3.0], no_grad=True)
        close(_run(k, comp, x)[2], k_pe, atol=0, name="k_pe after changing kv_norm's weight", hint="kv_norm is for c_kv only")

    with t.part("parameters in three configurations: one shared k_pe, kv_norm over kv_lora_rank only, no biases", 0.5):
        for i, (c, _, _) in enumerate(_CASES):
            _build(k, c, 200 + i)

    data = {}
    with t.part("c_q = q_norm(wq_a(x)) against the reference in float64: non-trivial norm weights, cfg.rms_norm_eps", 0.5):
        from course_lib.deepseek.mla import MLA

        for i, (c, B, T) in enumerate(_CASES):  # run every configuration first: the later parts use the outputs
            comp, W = _build(k, c, 200 + i)
            ref = MLA(c).double()
            ref.load_state_dict({**ref.state_dict(), **W})
            x = randn(g, B, T, c.dim)
            data[i] = (c, W, ref, x, _run(k, comp, x))
        for i, (_, W, ref, x, out) in data.items():
            with torch.no_grad():
                want = ref.q_norm(ref.wq_a(x))
            h = x @ W["wq_a.weight"].T
            close(out[0], want, atol=1e-12, name=f"c_q (config {i})",
                  mistakes={"q_norm missing: c_q is the normalised query latent": h,
                            "rms_norm_eps not used: build the norms with RMSNorm(n, cfg.rms_norm_eps)": _rms(h, W["q_norm.weight"], 1e-6)},
                  hint="c_q = q_norm(wq_a(x))")

    with t.part("c_kv = kv_norm of the FIRST kv_lora_rank outputs of wkv_a", 0.5):
        assert_true(len(data) == len(_CASES), "CompressionLayer could not be run, so c_kv cannot be checked")
        for i, (c, W, _, x, out) in data.items():
            raw = x @ W["wkv_a.weight"].T
            dc, dr, w = c.kv_lora_rank, c.qk_rope_head_dim, W["kv_norm.weight"]
            mistakes = {"kv_norm missing: c_kv is the normalised latent": raw[..., :dc],
                        "c_kv and k_pe are taken from the wrong ends of wkv_a's output: the first kv_lora_rank outputs are the latent":
                            _rms(raw[..., dr:], w, c.rms_norm_eps),
                        "the norm runs over the whole wkv_a output: split into [kv_lora_rank, qk_rope_head_dim] first, "
                        "then normalise the latent alone": _rms(raw, None, c.rms_norm_eps)[..., :dc] * w}
            if c.rms_norm_eps != 1e-6:
                mistakes["rms_norm_eps not used: build the norms with RMSNorm(n, cfg.rms_norm_eps)"] = _rms(raw[..., :dc], w, 1e-6)
            close(out[1], _rms(raw[..., :dc], w, c.rms_norm_eps), atol=1e-12, name=f"c_kv (config {i})", mistakes=mistakes,
                  hint="c_kv = kv_norm(first kv_lora_rank outputs of wkv_a(x))")

    with t.part("k_pe: the raw LAST qk_rope_head_dim outputs of wkv_a (no norm, no RoPE yet); float32 stays float32", 0.5):
        assert_true(len(data) == len(_CASES), "CompressionLayer could not be run, so k_pe cannot be checked")
        for i, (c, W, _, x, out) in data.items():
            raw = x @ W["wkv_a.weight"].T
            dc, dr = c.kv_lora_rank, c.qk_rope_head_dim
            kr = raw[..., dc:]
            close(out[2], kr, atol=1e-12, name=f"k_pe (config {i})",
                  mistakes={"pitfall: kv_norm applied to k_pe (k_pe comes out normalised): k_pe is the raw rotary key":
                                _rms(kr, None, c.rms_norm_eps),
                            "c_kv and k_pe are taken from the wrong ends of wkv_a's output: the last qk_rope_head_dim outputs are k_pe":
                                raw[..., :dr],
                            "the norm runs over the whole wkv_a output: k_pe is the raw last qk_rope_head_dim outputs":
                                _rms(raw, None, c.rms_norm_eps)[..., dc:]},
                  hint="no norm and no RoPE here: 2.3 rotates it")
        comp = k.call(k.g.CompressionLayer, kernel_cfg(k, TINY))
        outs = _run(k, comp, randn(g, 1, 2, TINY.dim, dtype=torch.float32))
        assert_true(all(o.dtype == torch.float32 for o in outs), f"float32 input must give float32 latents, got {[o.dtype for o in outs]}")


MUTANTS = [
    Mutant("k_pe per head", "nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)",
           "nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.n_heads * cfg.qk_rope_head_dim, bias=False)", expect="k_pe made per-head"),
    Mutant("kv_norm missing", "return c_q, self.kv_norm(c_kv), k_pe", "return c_q, c_kv, k_pe", expect="kv_norm"),
    Mutant("kv_norm applied to k_pe", "return c_q, self.kv_norm(c_kv), k_pe",
           "return c_q, self.kv_norm(c_kv), k_pe * torch.rsqrt(k_pe.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)",
           expect="kv_norm applied to k_pe"),
    Mutant("latent and rope key from the wrong ends",
           "c_kv, k_pe = self.wkv_a(x).split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)",
           "k_pe, c_kv = self.wkv_a(x).split([self.cfg.qk_rope_head_dim, self.cfg.kv_lora_rank], dim=-1)", expect="wrong ends"),
    Mutant("eps not passed", "self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)", "self.q_norm = RMSNorm(cfg.q_lora_rank)",
           expect="rms_norm_eps not used"),
    Mutant("q_norm missing", "c_q = self.q_norm(self.wq_a(x))", "c_q = self.wq_a(x)", expect="q_norm missing"),
    Mutant("biases", "self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)", "self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank)",
           expect="no biases"),
    Mutant("kv_norm over latent and rope key",
           "self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)",
           "self.kv_norm = RMSNorm(cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.rms_norm_eps)", expect="kv_norm applied to k_pe"),
]

ALTERNATIVES = [
    Alternative("slicing instead of split", "c_kv, k_pe = self.wkv_a(x).split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)",
                "h = self.wkv_a(x)\n        c_kv, k_pe = h[..., : self.cfg.kv_lora_rank], h[..., self.cfg.kv_lora_rank :]"),
]

"""Helpers Section 2's judges share: configurations in the kernel, seeded weights, oracles, checks.

Everything here runs in the judge. Weights are drawn here (seeded), sent to the learner's modules with
``load_state_dict`` and loaded into the course's reference (:mod:`course_lib.deepseek.mla`) or an
independent per-head oracle, so expected values never depend on what the kernel reports.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from course_judge.checks import assert_close, assert_true, expect_close, expect_tensor, matches
from course_judge.session import LearnerError
from course_lib.deepseek.attention import MLAConfig
from course_lib.deepseek.common import apply_rope, rope_angles

# the learner's MultiHeadLatentAttention parameter names -> the reference MLA's
MAP = {"compress.wq_a.weight": "wq_a.weight", "compress.q_norm.weight": "q_norm.weight",
       "compress.wkv_a.weight": "wkv_a.weight", "compress.kv_norm.weight": "kv_norm.weight",
       "decompress.wq_b.weight": "wq_b.weight", "decompress.wkv_b.weight": "wkv_b.weight", "wo.weight": "wo.weight"}
COMPRESS = ("wq_a.weight", "q_norm.weight", "wkv_a.weight", "kv_norm.weight")
DECOMPRESS = ("wq_b.weight", "wkv_b.weight")

TINY = MLAConfig(dim=64, n_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=12, max_seq_len=128)
# every width differs; long positions (start 4000) need max_seq_len > 4096: plain RoPE there (Section 2's MLA has no YaRN)
ODD = MLAConfig(dim=40, n_heads=3, q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10,
                max_seq_len=4100, rope_scaling="none")
ONE_HEAD = MLAConfig(dim=36, n_heads=1, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6,
                     v_head_dim=4, max_seq_len=64)
LONG_START = 4000
F32_HINT = "RoPE angles computed in float32: pass dtype=torch.float64 to rope_angles (apply_rope casts them to x's dtype)"
NAN_HINT = ("a query row whose every key is masked (an off-by-one causal mask: query i must see key i + S - T itself), "
            "or a mask added after the softmax: check the mask before anything else")


def kernel_cfg(k, cfg: MLAConfig):
    """The same configuration built in the kernel (a handle: a dataclass sent as data would lose its properties)."""
    return k.call_opts(k.lib("course_lib.deepseek.attention:MLAConfig"), kwargs=dataclasses.asdict(cfg), keep=True)


def seeded_weights(shapes: dict[str, tuple], seed: int, *, norms: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """float64 weights for ``shapes``: N(0, 1/fan_in) matrices, norm weights uniform in [0.5, 1.5] (a skipped norm shows)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name in norms or len(shape) == 1:
            out[name] = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
        else:
            out[name] = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(shape[-1])
    return out


def drawn_in_kernel(k, seed: int, laws: list[tuple[float, float, tuple]], dtype=torch.float64):
    """Normal tensors drawn in the kernel from ``seed`` (handles: nothing crosses the channel) and the same ones drawn here.

    ``laws`` lists (mean, std, shape). The kernel's and the judge's torch are the same build, so the same seed gives the
    same numbers; a kernel that draws something else only makes the learner's answer disagree with the judge's.
    """
    k.seed(seed)
    normal = k.lib("torch:normal")
    refs = [k.call_opts(normal, [mean, std, list(shape)], {"dtype": dtype}, keep=True) for mean, std, shape in laws]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        here = [torch.normal(mean, std, tuple(shape), dtype=dtype) for mean, std, shape in laws]
    return refs, here


def load_drawn_in_kernel(k, module, shapes: dict[str, tuple], seed: int, rename: dict[str, str] | None = None,
                         dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Large weights without sending them: drawn in the kernel (matrices N(0, 1/fan_in), norm weights N(1, 0.25^2)),
    loaded with ``load_state_dict``; returns the same weights, drawn here, under their ``shapes`` names."""
    laws = [(1.0, 0.25, s) if len(s) == 1 else (0.0, 1 / math.sqrt(s[-1]), s) for s in shapes.values()]
    refs, here = drawn_in_kernel(k, seed, laws, dtype)
    k.call(module.load_state_dict, {(rename or {}).get(n, n): r for n, r in zip(shapes, refs)}, assign=True)
    return dict(zip(shapes, here))


def mla_shapes(c: MLAConfig) -> dict[str, tuple]:
    H = c.n_heads
    return {"wq_a.weight": (c.q_lora_rank, c.dim), "q_norm.weight": (c.q_lora_rank,),
            "wq_b.weight": (H * c.qk_head_dim, c.q_lora_rank), "wkv_a.weight": (c.kv_lora_rank + c.qk_rope_head_dim, c.dim),
            "kv_norm.weight": (c.kv_lora_rank,), "wkv_b.weight": (H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
            "wo.weight": (c.dim, H * c.v_head_dim)}


def mla_weights(c: MLAConfig, seed: int) -> dict[str, torch.Tensor]:
    """Reference-named MLA weights."""
    return seeded_weights(mla_shapes(c), seed)


def reference_mla(c: MLAConfig, W: dict[str, torch.Tensor], dtype=torch.float64):
    from course_lib.deepseek.mla import MLA

    ref = MLA(c).to(dtype)
    ref.load_state_dict({k: v.to(dtype) for k, v in W.items()})
    return ref.eval()


def expect_params(k, module, want: dict[str, tuple], what: str, hint: str | None = None) -> None:
    """The learner's module has exactly these parameters (names and shapes)."""
    got = {n: tuple(s) for n, s in k.info(module).get("parameters", {}).items()}
    if got == want:
        return
    biases = sorted(n for n in got if n.endswith(".bias"))
    if biases:
        raise AssertionError(f"{what} has biases {biases}: MLA's projections have none (nn.Linear(..., bias=False))")
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = {n: f"{got[n]} (expected {want[n]})" for n in want if n in got and got[n] != want[n]}
    parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else []) + \
        ([f"wrong shapes {wrong}"] if wrong else [])
    raise AssertionError(f"{what}'s parameters: " + "; ".join(parts) + (f"\n  likely cause: {hint}" if hint else ""))


def load(k, module, W: dict[str, torch.Tensor]) -> None:
    k.call(module.load_state_dict, W)


def install(k, module, W: dict[str, torch.Tensor], want: dict[str, tuple], what: str, hint=None) -> None:
    """Give the learner's module the judge's weights (their dtype too: ``assign=True``) in one round trip.

    When they do not fit, the module's parameter names and shapes say why (``hint(got)`` names a known mistake).
    """
    try:
        k.call(module.load_state_dict, W, assign=True)
    except LearnerError:
        got = {n: tuple(s) for n, s in k.info(module).get("parameters", {}).items()}
        expect_params(k, module, want, what, hint=hint(got) if callable(hint) else hint)
        raise


# ---------------------------------------------------------------- a per-head oracle of MLA (DeepSeek-V2 eqs. 9-19)


def _rms(v, w, eps):
    v = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return v if w is None else v * w


def oracle(c: MLAConfig, W: dict[str, torch.Tensor], x: torch.Tensor, start: int = 0, *, scale_dim: int | None = None,
           rope_all: bool = False, norm_kpe: bool = False, no_kv_norm: bool = False, angles_dtype=torch.float64,
           pos0: bool = False, no_q_norm: bool = False):
    """MLA from the weights alone, one head at a time, no cache: (out (B, T, dim), p (B, H, T, T)).

    The flags reproduce known mistakes (a wrong scale, RoPE on the whole head, kv_norm on k_pe, no kv_norm,
    float32 angles, positions restarting at 0).
    """
    B, T, _ = x.shape
    dn, dr, dv, dc = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    pos = torch.arange(T) if pos0 else torch.arange(start, start + T)

    def rot(v):  # interleaved pairs rotated by pos * theta^(-2i/d); cos/sin evaluated in angles_dtype
        ang = rope_angles(pos, v.shape[-1], c.rope_theta, dtype=angles_dtype)
        cos, sin = ang.cos().to(v.dtype), ang.sin().to(v.dtype)
        z = v.reshape(B, T, -1, 2)
        return torch.stack((z[..., 0] * cos - z[..., 1] * sin, z[..., 0] * sin + z[..., 1] * cos), -1).reshape(v.shape)

    q = x @ W["wq_a.weight"].T
    if not no_q_norm:
        q = _rms(q, W["q_norm.weight"], c.rms_norm_eps)
    q = q @ W["wq_b.weight"].T
    kv = x @ W["wkv_a.weight"].T
    c_kv = kv[..., :dc] if no_kv_norm else _rms(kv[..., :dc], W["kv_norm.weight"], c.rms_norm_eps)
    k_r = _rms(kv[..., dc:], None, c.rms_norm_eps) if norm_kpe else kv[..., dc:]
    up = c_kv @ W["wkv_b.weight"].T
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    outs, probs = [], []
    for h in range(c.n_heads):
        qh = q[..., h * (dn + dr):(h + 1) * (dn + dr)]
        blk = up[..., h * (dn + dv):(h + 1) * (dn + dv)]
        kh = torch.cat([blk[..., :dn], k_r], -1)
        if rope_all:
            qh, kh = rot(qh), rot(kh)
        else:
            qh = torch.cat([qh[..., :dn], rot(qh[..., dn:])], -1)
            kh = torch.cat([kh[..., :dn], rot(kh[..., dn:])], -1)
        s = qh @ kh.transpose(1, 2) / math.sqrt(scale_dim or (dn + dr))
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        probs.append(p)
        outs.append(p @ blk[..., dn:])
    return torch.cat(outs, -1) @ W["wo.weight"].T, torch.stack(probs, 1)


def oracle_mistakes(c: MLAConfig, W, x, start: int, *, long: bool = False) -> dict[str, torch.Tensor]:
    """Named wrong outputs of MLA, the most specific first."""
    dn, dr, dc = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
    cases = {
        "the softmax scale is 1/sqrt(qk_nope_head_dim): it is 1/sqrt(qk_nope_head_dim + qk_rope_head_dim), the width of q . k":
            {"scale_dim": dn},
        "the softmax scale is 1/sqrt(kv_lora_rank + qk_rope_head_dim): the absorbed scores are the same q . k, "
        "scaled by 1/sqrt(qk_nope_head_dim + qk_rope_head_dim)": {"scale_dim": dc + dr},
        "the softmax scale is 1/sqrt(kv_lora_rank): it is 1/sqrt(qk_nope_head_dim + qk_rope_head_dim)": {"scale_dim": dc},
        "RoPE applied to the whole head: it belongs on the qk_rope_head_dim slice only": {"rope_all": True},
        "kv_norm applied to k_pe: only the latent c_kv is normalised, the rotary key is raw": {"norm_kpe": True},
        "kv_norm missing: attention (and the cache) use the normalised latent": {"no_kv_norm": True},
        "q_norm missing: the query latent is normalised before wq_b": {"no_q_norm": True},
    }
    if start:
        cases["the RoPE positions restart at 0: rotate by the absolute positions start_pos + t"] = {"pos0": True}
    if long or start:
        cases[F32_HINT] = {"angles_dtype": torch.float32}
    out = {}
    for what, kw in cases.items():
        if kw.get("scale_dim") == dn + dr:
            continue
        out[what] = oracle(c, W, x, start, **kw)[0]
    return out


# ---------------------------------------------------------------- standard attention (Section 2.1)


def mha(W: dict, x: torch.Tensor, start: int, H: int, D: int, *, theta: float = 10000.0, angles_dtype=torch.float64,
        scale: float | None = None, rope_v: bool = False, rope_k: bool = True, pos0: bool = False):
    """Causal MHA with RoPE on the whole head, no cache: (out, p); flags reproduce known mistakes."""
    B, T, _ = x.shape
    q = (x @ W["wq.weight"].T).view(B, T, H, D)
    kk = (x @ W["wk.weight"].T).view(B, T, H, D)
    v = (x @ W["wv.weight"].T).view(B, T, H, D)
    a = rope_angles(torch.arange(T) if pos0 else torch.arange(start, start + T), D, theta, dtype=angles_dtype)
    q = apply_rope(q, a)
    if rope_k:
        kk = apply_rope(kk, a)
    if rope_v:
        v = apply_rope(v, a)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * (1 / math.sqrt(D) if scale is None else scale)
    p = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    o = torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * D)
    return o @ W["wo.weight"].T, p


# ---------------------------------------------------------------- checks


def close(got, want: torch.Tensor, *, name: str, atol: float, rtol: float = 0.0, mistakes=None, hint: str | None = None,
          near_hint: str | None = None, nan_hint: str = NAN_HINT) -> None:
    """``expect_close`` with NaN/inf diagnosed FIRST, then named mistakes, then a hint for 'close but not exact'."""
    got = expect_tensor(got, name, shape=tuple(want.shape))
    a = got.detach().to(torch.float64)
    bad = ~torch.isfinite(a) & torch.isfinite(want.to(torch.float64))
    if bool(bad.any()):
        raise AssertionError(f"{name} has {int(bad.sum())} NaN/inf entries where finite values are expected\n"
                             f"  likely cause: {nan_hint}")
    if matches(got, want, atol, rtol):
        return
    for what, out in (mistakes or {}).items():
        if matches(got, out, atol, rtol):
            expect_close(got, want, name=name, atol=atol, rtol=rtol, mistakes={what: out})
    err = float((a - want.to(torch.float64)).abs().max())
    scale = float(want.abs().max()) or 1.0
    if near_hint and err < 1e-4 * scale:
        assert_close(got, want, atol=atol, rtol=rtol, name=name, hint=near_hint)
    assert_close(got, want, atol=atol, rtol=rtol, name=name, hint=hint)


def randn(g: torch.Generator, *shape: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=dtype)


def is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


__all__ = ["MAP", "TINY", "ODD", "ONE_HEAD", "kernel_cfg", "seeded_weights", "mla_weights", "reference_mla", "expect_params",
           "load", "oracle", "oracle_mistakes", "mha", "close", "randn", "assert_true", "F32_HINT", "NAN_HINT"]


def single_threaded(judge):
    """Run a judge with one torch thread in the judge's process: its many small tensor operations gain nothing from a
    second thread, and on a shared machine two processes' spinning thread pools (the judge's and the kernel's) slow
    each other down many times over."""
    import functools

    from course_lib.bench import threads

    @functools.wraps(judge)
    def run(k, t):
        with threads(1):
            return judge(k, t)

    return run

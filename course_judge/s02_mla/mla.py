"""Exercise 2.4: the complete MLA layer, naive and absorbed paths, the latent cache, the structure of a decode step."""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_int, expect_tensor, expect_tuple
from course_judge.local import Alternative, Mutant
from course_judge.s02_mla._common import (
    F32_HINT,
    LONG_START,
    MAP,
    ODD,
    ONE_HEAD,
    TINY,
    close,
    kernel_cfg,
    load_drawn_in_kernel,
    mla_shapes,
    mla_weights,
    oracle,
    oracle_mistakes,
    randn,
    reference_mla,
    single_threaded,
)
from course_judge.s02_mla._decode import check_step, fill
from course_judge.session import LearnerError
from course_lib.deepseek.attention import MLAConfig
from course_lib.deepseek.common import apply_rope, rope_angles

GRADE_ID = "test_02_4_mla"
POINTS = 6
ANSWERS = ("ex_02_4_mla",)
SUMMARY = ("naive path against a per-head oracle in float64 (3 configurations, start positions up to 4000, NaN diagnosed "
           "first), absorbed == naive to 1e-10, chunked prefill + decode on both paths, the cache holds kv_norm(c_kv) and the "
           "rotated shared k_pe, no per-sequence state, an absorbed decode step without per-head K/V, S x S masks or extra "
           "FLOPs, V3 shapes (576 cached numbers per token), float32")
REFERENCE = ("course_lib.deepseek.mla",)

_FIT = "RoPE on q_pe and the shared k_pe at absolute positions; scale 1/sqrt(d_h + d_h^R); causal_mask(T, S)"
_ABS = "q_lat = q_nope @ w_uk[h]; score = q_lat . c_kv + q_pe . k_pe; the same 1/sqrt(d_h + d_h^R) scale; o = (p @ c_kv) @ w_uv[h].T"
# the decode-structure configuration: every per-head width (H d_v = 96, H d_h = 128, ...) differs from d_c and H d_c,
# and S = 2048 exceeds them all, so a rebuilt key/value or an S x S mask is recognised by its shape
STRUCT = MLAConfig(dim=64, n_heads=8, q_lora_rank=32, kv_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                   max_seq_len=2100)
STRUCT_S = 2048


def build(k, c: MLAConfig, seed: int, dtype=torch.float64, *, draw_in_kernel: bool = False):
    """The learner's MLA in the kernel with the judge's weights, and the reference with the same weights.

    Large weights (``draw_in_kernel``) are drawn in the kernel from the seed instead of being sent.
    """
    m = k.call(k.g.MultiHeadLatentAttention, kernel_cfg(k, c))
    want = {n: mla_shapes(c)[r] for n, r in MAP.items()}
    try:
        if draw_in_kernel:
            W = load_drawn_in_kernel(k, m, mla_shapes(c), seed, rename={r: n for n, r in MAP.items()}, dtype=dtype)
        else:
            W = mla_weights(c, seed)
            k.call(m.load_state_dict, {n: W[r].to(dtype) for n, r in MAP.items()}, assign=True)
    except LearnerError:
        got = {n: tuple(s) for n, s in k.info(m).get("parameters", {}).items()}
        assert_true(got == want, f"MultiHeadLatentAttention's parameters {got} differ from {want}",
                    hint="the layer is compress (2.2), decompress (2.3) and wo: no other parameters")
        raise
    return m, W, reference_mla(c, W, dtype)


def _fwd(k, m, x, *args, **kwargs):
    return k.call_opts(m, [x, *args], kwargs, no_grad=True)


def _out_p(k, m, x, *args, absorb=False):
    y, p = expect_tuple(_fwd(k, m, x, *args, absorb=absorb, return_attn=True), 2,
                        f"MultiHeadLatentAttention(x, absorb={absorb}, return_attn=True)")
    return expect_tensor(y, "output"), expect_tensor(p, "attention probabilities")


def _pair(out, path: str):
    """(output, probabilities) from a ``k.many`` result of a ``return_attn=True`` call."""
    if isinstance(out, Exception):
        raise out
    y, p = expect_tuple(out, 2, f"MultiHeadLatentAttention(x, absorb={path == 'absorbed'}, return_attn=True)")
    return expect_tensor(y, f"{path} output"), expect_tensor(p, f"{path} attention probabilities")


def _raise(outs):
    for o in outs:
        if isinstance(o, Exception):
            raise o
    return outs


def _tensor_attrs(k, m) -> dict:
    """Tensors kept as plain attributes of the module and its submodules (parameters and buffers excluded)."""
    subs = k.call(k.lib("builtins:list"), k.call(m.named_modules))
    out = {}
    for name, sub in subs:
        for key, v in k.call(k.lib("builtins:vars"), sub).items():
            if isinstance(v, torch.Tensor):
                out[f"{name}.{key}" if name else key] = tuple(v.shape)
    return out


@single_threaded
def judge(k, t):
    g = torch.Generator().manual_seed(24)
    with t.part("visible checks: shapes, row sums, causality, absorbed == naive, cached prefill 5 + decode 4 (absorbed)", 2):
        k.seed(0)
        m = k.call(k.call(k.g.MultiHeadLatentAttention, kernel_cfg(k, TINY)).double)
        x = randn(g, 2, 9, 64)
        y, p = _out_p(k, m, x)
        expect_tensor(y, "output", shape=(2, 9, 64))
        expect_tensor(p, "attention probabilities (B, H, T, S)", shape=(2, 4, 9, 9))
        close(p.sum(-1), torch.ones(2, 4, 9, dtype=torch.float64), atol=1e-12, name="probability row sums")
        assert_true(float(p.triu(1).abs().max()) == 0.0, "a query attends to a future key", hint="use causal_mask")
        close(_fwd(k, m, x, absorb=True), y, atol=1e-10, name="absorbed vs naive output (float64)",
              hint="same 1/sqrt(qk_nope_head_dim + qk_rope_head_dim) scale on both paths; w_uk/w_uv from absorbed_weights")
        cache = k.call(m.new_cache, 2)
        steps = _raise(k.many([(m, (x[:, :5], 0, cache), {"absorb": True})]
                              + [(m, (x[:, i:i + 1], i, cache), {"absorb": True}) for i in range(5, 9)], no_grad=True))
        close(torch.cat([expect_tensor(s, "a cached step's output") for s in steps], 1), y, atol=1e-10,
              name="cached prefill + decode (absorbed) vs full forward",
              hint="rotate by absolute positions; attend over cache.update's return values")
        n = expect_int(k.get(cache.length), "cache.length")
        c_kv = expect_tensor(k.get(cache.c_kv), "cache.c_kv")
        assert_true(n == 9 and float(c_kv[:, :9].abs().min()) > 0, "the latent cache was not filled",
                    hint="write c_kv and the rotated k_pe with cache.update(start_pos, c_kv, k_pe)")

    runs = []
    with t.part(f"naive path against a per-head oracle in float64: 3 configurations, start positions 0, 3 and {LONG_START}", 1):
        for i, (c, sp) in enumerate([(TINY, 0), (TINY, 3), (ODD, 0), (ODD, LONG_START), (ONE_HEAD, 3)]):
            m, W, ref = build(k, c, 400 + i)
            x = randn(g, 2, 7, c.dim)
            # both paths in one round trip; the absorbed answer (or its error) is judged in the next part
            naive, absorbed = k.many([(m, (x, sp), {"return_attn": True}),
                                      (m, (x, sp), {"absorb": True, "return_attn": True})], no_grad=True)
            runs.append((c, sp, W, ref, x, *oracle(c, W, x, sp), naive, absorbed))
        for i, (c, sp, W, ref, x, want, wp, naive, _) in enumerate(runs):
            y, p = _pair(naive, "naive")
            close(y, want, atol=1e-10, name=f"naive MLA vs per-head oracle (config {i}, start_pos {sp})",
                  mistakes=oracle_mistakes(c, W, x, sp), hint=_FIT, near_hint=F32_HINT)
            close(p, wp, atol=1e-10, name=f"naive attention probabilities vs oracle (config {i})", hint=_FIT)
            with torch.no_grad():
                close(y, ref(x, sp), atol=1e-10, name="agreement with the course's reference (naive path)", hint=_FIT)

    with t.part("absorbed path == the oracle and the naive path to 1e-10 in float64 (outputs, probabilities); the reference "
                "on both paths", 1):
        if len(runs) < 5:
            raise AssertionError("MultiHeadLatentAttention could not be built, so the absorbed path cannot be checked")
        for c, sp, W, ref, x, want, wp, naive, absorbed in runs:
            ya, pa = _pair(absorbed, "absorbed")
            close(ya, want, atol=1e-10, name=f"absorbed output (start_pos {sp}, {c.n_heads} heads)",
                  mistakes=oracle_mistakes(c, W, x, sp), hint=_ABS, near_hint=F32_HINT)
            close(pa, wp, atol=1e-10, name="absorbed probabilities", hint=_ABS)
            if not isinstance(naive, Exception):
                close(ya, _pair(naive, "naive")[0], atol=1e-10, name="absorbed vs naive output", hint=_ABS)
            with torch.no_grad():
                close(ya, ref(x, sp, absorb=True), atol=1e-10, name="agreement with the course's reference (absorbed path)",
                      hint=_ABS)

    with t.part("the latent cache: chunks (4, 3, 1 x 5) on both paths == full forward; it holds kv_norm(c_kv) and the "
                "rotated shared k_pe; no per-sequence state in the module", 1):
        c = ODD
        m, W, ref = build(k, c, 407)
        x = randn(g, 2, 12, c.dim)
        full = oracle(c, W, x)[0]
        raw = x @ W["wkv_a.weight"].T
        dc = c.kv_lora_rank
        lat, kr = raw[..., :dc], raw[..., dc:]
        normed = lat * torch.rsqrt(lat.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * W["kv_norm.weight"]
        a = rope_angles(torch.arange(12), c.qk_rope_head_dim, c.rope_theta, dtype=torch.float64)
        kn = kr * torch.rsqrt(kr.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)
        results = {}
        for ab in (False, True):
            cache = k.call(m.new_cache, 2, 16)
            calls = [(m, (x[:, :4], 0, cache), {"absorb": ab}), (m, (x[:, 4:7], 4, cache), {"absorb": ab})]
            calls += [(m, (x[:, i:i + 1], i, cache), {"absorb": ab}) for i in range(7, 12)]
            results[ab] = _raise(k.many(calls, no_grad=True))
            n = expect_int(k.get(cache.length), "cache.length")
            assert_true(n == 12, f"the cache holds {n} positions after 12 tokens", hint="write every chunk with cache.update")
            ckv = expect_tensor(k.get(cache.c_kv), "cache.c_kv")[:, :12]
            kpe = expect_tensor(k.get(cache.k_pe), "cache.k_pe")[:, :12]
            close(ckv, normed, atol=1e-12, name=f"cached c_kv (absorb={ab})",
                  mistakes={"pitfall: the cache holds the un-normalised latent: cache kv_norm(c_kv), which the absorbed path "
                            "attends over": lat}, hint="cache kv_norm(latent)")
            close(kpe, apply_rope(kr, a), atol=1e-12, name=f"cached k_pe (rotated, shared by heads; absorb={ab})",
                  mistakes={"the cached k_pe is not rotated: cache RoPE(k_pe) at absolute positions": kr,
                            "pitfall: kv_norm applied to k_pe (the cached k_pe is normalised)": apply_rope(kn, a),
                            F32_HINT: apply_rope(kr, a.float())},
                  hint="cache RoPE(k_pe) at absolute positions, no norm")
        for ab, outs in results.items():
            close(torch.cat([expect_tensor(o, "a cached chunk's output") for o in outs], 1), full, atol=1e-10,
                  name=f"cached chunks (4, 3, 1 x 5), absorb={ab}, vs full forward", near_hint=F32_HINT,
                  hint="rotate each chunk by positions start_pos..; attend over all cached positions with causal_mask(T, S)")
        n = expect_int(k.get(cache.elements_per_token), "cache.elements_per_token")
        assert_true(n == c.kv_lora_rank + c.qk_rope_head_dim, "the cache must hold kv_lora_rank + qk_rope_head_dim numbers per token")
        fresh, _, _ = build(k, c, 408)
        before = _tensor_attrs(k, fresh)
        _raise(k.many([(fresh, (x[:1].expand(3, 12, c.dim)[:, :5].contiguous(), 0, k.call(fresh.new_cache, 3, 8)), {"absorb": ab})
                       for ab in (False, True)], no_grad=True))
        kept = {n_: s for n_, s in _tensor_attrs(k, fresh).items() if n_ not in before and len(s) > 0 and s[0] == 3}
        assert_true(not kept, f"the module kept per-sequence tensors as attributes: {kept}",
                    hint="MLA keeps only the latent cache between steps (576 numbers per token at V3 dims)")

    with t.part(f"an absorbed decode step at context {STRUCT_S}: no per-head keys or values of the cache, no S x S mask, "
                f"FLOPs within 1.5x of the reference's, O(S) memory", 0.5):
        m, W, ref = build(k, STRUCT, 409)
        cache, rcache = fill(k, m, ref, STRUCT, STRUCT_S, STRUCT.max_seq_len, seed=419)
        x1 = randn(g, 1, 1, STRUCT.dim)
        with torch.no_grad():
            want = ref(x1, STRUCT_S, rcache, absorb=True)
        close(_fwd(k, m, x1, STRUCT_S, cache, absorb=True), want, atol=1e-10, name=f"absorbed decode at position {STRUCT_S}",
              hint=_ABS, near_hint=F32_HINT)
        check_step(k, m, STRUCT, cache, x1, STRUCT_S)

    with t.part("V3 dimensions on the meta device (DeepSeek-V3's parameter shapes, 576 cached numbers per token); "
                "float32 in and out on both paths; causality on both paths", 0.5):
        v3 = MLAConfig.v3()
        default = k.call(k.lib("torch:get_default_device"))
        k.call(k.lib("torch:set_default_device"), "meta")
        try:
            m3 = k.call(k.g.MultiHeadLatentAttention, kernel_cfg(k, v3))
            n = expect_int(k.get(k.call(m3.new_cache, 1, 8).elements_per_token), "new_cache(...).elements_per_token at V3")
        finally:
            k.call(k.lib("torch:set_default_device"), default)
        got = {MAP.get(n_, n_): tuple(s) for n_, s in k.info(m3).get("parameters", {}).items()}
        assert_true(got == mla_shapes(v3), f"V3 parameter shapes {got} differ from DeepSeek-V3's {mla_shapes(v3)}")
        assert_true(n == 576, f"at V3 dims the latent cache holds {n} numbers per token, not 512 + 64 = 576")
        m, W, ref = build(k, TINY, 410, dtype=torch.float32)
        x32 = randn(g, 1, 5, TINY.dim, dtype=torch.float32)
        try:
            a32, b32 = _fwd(k, m, x32), _fwd(k, m, x32, absorb=True)
        except LearnerError as e:
            raise AssertionError(f"a float32 input failed: {e.describe()}\n  likely cause: keep every intermediate in x.dtype "
                                 "(the mask too)") from None
        assert_true(expect_tensor(a32, "float32 output").dtype == torch.float32 and expect_tensor(b32, "absorbed float32 output").dtype
                    == torch.float32, "float32 input must give float32 output on both paths")
        close(b32, a32, atol=1e-5, rtol=1e-4, name="absorbed vs naive in float32")
        m, W, ref = build(k, ODD, 411)
        x = randn(g, 2, 12, ODD.dim)
        x2 = x.clone()
        x2[:, 8:] = 0.0
        for ab in (False, True):
            y1, y2 = _fwd(k, m, x, absorb=ab), _fwd(k, m, x2, absorb=ab)
            assert_true(torch.equal(y1[:, :8], y2[:, :8]), f"future tokens changed past outputs (absorb={ab})", hint="causal_mask(T, S)")


_MASK = "mask = causal_mask(T, c_kv.shape[1], dtype=x.dtype, device=x.device)  # (T, S)"
_OLAT = ('o_lat = torch.einsum("bhts,bsc->bthc", p, c_kv)  # (B, T, H, d_c)\n'
         '        return torch.einsum("bthc,hdc->bthd", o_lat, w_uv), p  # (B, T, H, d_v), (B, H, T, S)')

MUTANTS = [
    Mutant("scale 1/sqrt(d_h) on the naive path", "/ math.sqrt(self.cfg.qk_head_dim)  # (B, H, T, S)",
           "/ math.sqrt(self.cfg.qk_nope_head_dim)  # (B, H, T, S)", expect="1/sqrt(qk_nope_head_dim)"),
    Mutant("absorbed scale 1/sqrt(d_c + d_h^R)", "p = torch.softmax(scores / math.sqrt(self.cfg.qk_head_dim) + mask, dim=-1)",
           "p = torch.softmax(scores / math.sqrt(self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim) + mask, dim=-1)",
           expect="1/sqrt(kv_lora_rank + qk_rope_head_dim)"),
    Mutant("RoPE angles in float32", "dtype=torch.float64)  # (T, d_h^R / 2)", "dtype=torch.float32)  # (T, d_h^R / 2)",
           expect="RoPE angles computed in float32"),
    Mutant("RoPE positions from 0", "torch.arange(start_pos, start_pos + T, device=x.device)", "torch.arange(T, device=x.device)",
           expect="absolute positions"),
    Mutant("un-normalised latent cached", "c_kv, k_pe = cache.update(start_pos, c_kv, k_pe)",
           "c_kv, k_pe = cache.update(start_pos, self.compress.wkv_a(x)[..., : c.kv_lora_rank], k_pe)",
           expect="un-normalised latent"),
    Mutant("kv_norm applied to k_pe", "k_pe = self.decompress.rope_key(k_pe, angles)",
           "k_pe = self.decompress.rope_key(k_pe * torch.rsqrt(k_pe.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps), angles)",
           expect="kv_norm applied to k_pe"),
    Mutant("absorbed path rebuilds values from w_uv", _OLAT,
           'v = torch.einsum("bsc,hdc->bshd", c_kv, w_uv)  # (B, S, H, d_v)\n'
           '        return torch.einsum("bhts,bshd->bthd", p, v), p',
           expect="per-head keys or values of every cached token"),
    Mutant("absorb ignored (naive decode)", "attend = self.attend_absorbed if absorb else self.attend_naive",
           "attend = self.attend_naive", expect="per-head keys or values of every cached token"),
    Mutant("full S x S mask sliced at every step", _MASK,
           "mask = causal_mask(c_kv.shape[1], c_kv.shape[1], dtype=x.dtype, device=x.device)[-T:]", expect="S x S"),
    Mutant("off-by-one mask (NaN)", _MASK,
           'mask = torch.full((T, c_kv.shape[1]), float("-inf"), dtype=x.dtype).triu(c_kv.shape[1] - T)', expect="NaN"),
    Mutant("per-sequence state kept", "out = self.wo(o.reshape(B, T, c.n_heads * c.v_head_dim))  # (B, T, dim)",
           "self.last_c_kv = c_kv\n        out = self.wo(o.reshape(B, T, c.n_heads * c.v_head_dim))", expect="per-sequence tensors"),
    Mutant("mask in float64", _MASK, "mask = causal_mask(T, c_kv.shape[1], dtype=torch.float64, device=x.device)",
           expect="float32"),
]

ALTERNATIVES = [
    Alternative("matmul per head, float64 softmax", source='''
class MultiHeadLatentAttention(nn.Module):
    """Multi-head Latent Attention."""

    def __init__(self, cfg: MLAConfig):
        super().__init__()
        self.cfg = cfg
        self.compress = CompressionLayer(cfg)
        self.decompress = DecompressionWithRoPE(cfg)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)

    def new_cache(self, batch: int, max_seq_len: int | None = None) -> LatentKVCache:
        c, w = self.cfg, self.wo.weight
        return LatentKVCache(batch, max_seq_len or c.max_seq_len, c.kv_lora_rank, c.qk_rope_head_dim,
                             dtype=w.dtype, device=w.device)

    def attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        ### BEGIN SOLUTION
        k, v = self.decompress.keys_values(c_kv, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, d)
        scores = torch.matmul(q, k.permute(0, 2, 3, 1)) * self.cfg.qk_head_dim ** -0.5
        p = torch.softmax((scores + mask).double(), dim=-1).to(q.dtype)
        return torch.matmul(p, v.transpose(1, 2)).transpose(1, 2), p
        ### END SOLUTION

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        ### BEGIN SOLUTION
        w_uk, w_uv = self.decompress.absorbed_weights()
        q_lat = torch.matmul(q_nope.transpose(1, 2), w_uk)  # (B, H, T, d_c)
        scores = torch.matmul(q_lat, c_kv.unsqueeze(1).transpose(-1, -2))
        scores = scores + torch.matmul(q_pe.transpose(1, 2), k_pe.unsqueeze(1).transpose(-1, -2))
        p = torch.softmax((scores * self.cfg.qk_head_dim ** -0.5 + mask).double(), dim=-1).to(q_nope.dtype)
        o_lat = torch.matmul(p, c_kv.unsqueeze(1))  # (B, H, T, d_c)
        return torch.matmul(o_lat, w_uv.transpose(-1, -2)).transpose(1, 2), p
        ### END SOLUTION

    def forward(self, x, start_pos=0, cache=None, absorb=False, return_attn=False):
        check_input(x, self.cfg.dim, start_pos, self.cfg.max_seq_len)
        ### BEGIN SOLUTION
        B, T, _ = x.shape
        c = self.cfg
        pos = torch.arange(T) + start_pos
        angles = rope_angles(pos, c.qk_rope_head_dim, c.rope_theta, dtype=torch.float64)
        c_q, c_kv, k_raw = self.compress(x)
        q_nope, q_pe = self.decompress.queries(c_q, angles)
        k_pe = self.decompress.rope_key(k_raw, angles)
        if cache is not None:
            c_kv, k_pe = cache.update(start_pos, c_kv, k_pe)
        mask = causal_mask(T, c_kv.shape[1], dtype=x.dtype)
        if absorb:
            o, p = self.attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            o, p = self.attend_naive(q_nope, q_pe, c_kv, k_pe, mask)
        out = self.wo(o.flatten(2))
        return (out, p) if return_attn else out
        ### END SOLUTION
'''),
]

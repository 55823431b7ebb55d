"""Exercise 2.1: the offset causal mask and standard multi-head attention with RoPE and a KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from course_judge.checks import assert_true, expect_int, expect_tensor, expect_tuple
from course_judge.local import Alternative, Mutant
from course_judge.s02_mla._common import F32_HINT, close, install, mha, randn, seeded_weights, single_threaded
from course_judge.session import LearnerError
from course_lib.deepseek.common import apply_rope, rope_angles

GRADE_ID = "test_02_1_standard_attention"
POINTS = 3
ANSWERS = ("ex_02_1_standard_attention",)
SUMMARY = ("the mask against a tril oracle (0 / -inf, t_k > t_q, dtypes), outputs and probabilities against the reference "
           "in float64 at start positions up to 4000, torch's fused attention, chunked prefill + decode, causality, float32")
REFERENCE = ("course_lib.deepseek.mla",)

_FIT = "rotate q and k by the absolute positions start_pos + t (angles in float64); scale 1/sqrt(head_dim); softmax over keys"


def _call(k, ref, *args, **kwargs):
    return k.call_opts(ref, args, kwargs, no_grad=True)


def _out_p(k, attn, x, *args, what="StandardAttention(x, return_attn=True)"):
    y, p = expect_tuple(_call(k, attn, x, *args, return_attn=True), 2, what)
    return expect_tensor(y, "output"), expect_tensor(p, "attention probabilities")


def _mask_diagnosis(m: torch.Tensor, tq: int, tk: int) -> str:
    ok = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    if m.dtype == torch.bool:
        return "causal_mask returns an additive float mask (0 where a query may attend, -inf elsewhere), not a boolean one"
    if bool((m[~ok] < -1e3).all()) and bool(torch.isfinite(m[~ok]).any()):
        return "the masked entries must be -inf, not a large negative number"
    neg = torch.isneginf(m)
    if tk != tq and torch.equal(neg, torch.ones(tq, tk, dtype=torch.bool).triu(1)):
        return ("the mask is aligned to the first key: the t_q queries are the LAST t_q of t_k positions, "
                "so query i sees keys j <= i + t_k - t_q")
    if torch.equal(neg, ~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq - 1)):
        return "off by one: query i also sees the key at its own position (j <= i + t_k - t_q), only later keys are masked"
    if torch.equal(neg, ok):
        return "the mask is inverted: 0 where a query may attend, -inf on the future keys"
    return "0 where key j <= i + t_k - t_q, -inf elsewhere"


def _shapes(dim, H, D):
    return {"wq.weight": (H * D, dim), "wk.weight": (H * D, dim), "wv.weight": (H * D, dim), "wo.weight": (dim, H * D)}


def _build(k, SA, dim, H, D=None, seed=0, max_seq_len=4100):
    D_ = D or dim // H
    attn = k.call(SA, dim, H, head_dim=D, max_seq_len=max_seq_len)
    W = seeded_weights(_shapes(dim, H, D_), seed)
    install(k, attn, W, _shapes(dim, H, D_), f"StandardAttention({dim}, {H}, head_dim={D})")
    return attn, W


@single_threaded
def judge(k, t):
    mask, SA = k.g.causal_mask, k.g.StandardAttention
    g = torch.Generator().manual_seed(21)
    with t.part("visible checks: causal_mask(3, 3) and (2, 5), shapes, row sums, causality, prefill 4 + decode 3", 1):
        m = expect_tensor(mask(3, 3), "causal_mask(3, 3)", shape=(3, 3))
        assert_true(torch.equal(torch.isinf(m), torch.ones(3, 3, dtype=torch.bool).triu(1)),
                    "causal_mask(3, 3) must be -inf exactly above the diagonal", hint=_mask_diagnosis(m, 3, 3))
        m = expect_tensor(mask(2, 5), "causal_mask(2, 5)", shape=(2, 5))
        assert_true(torch.equal(torch.isinf(m), torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)),
                    "causal_mask(2, 5): the 2 queries sit at positions 3 and 4", hint="offset the query positions by t_k - t_q")
        k.seed(0)
        attn = k.call(k.call(SA, 32, 4, max_seq_len=16).double)
        x = randn(g, 2, 7, 32)
        y, p = _out_p(k, attn, x)
        expect_tensor(y, "output", shape=(2, 7, 32))
        expect_tensor(p, "attention probabilities (B, H, T, S)", shape=(2, 4, 7, 7))
        close(p.sum(-1), torch.ones(2, 4, 7, dtype=torch.float64), atol=1e-12, name="probability row sums",
              hint="softmax over the keys (the last dimension)")
        assert_true(float(p.triu(1).abs().max()) == 0.0, "a query attends to a future key", hint="add causal_mask before the softmax")
        cache = k.call(attn.new_cache, 2)
        steps = k.many([(attn, (x[:, :4], 0, cache), {})] + [(attn, (x[:, i:i + 1], i, cache), {}) for i in range(4, 7)], no_grad=True)
        for s in steps:
            if isinstance(s, Exception):
                raise s
        close(torch.cat([expect_tensor(s, "a cached step's output") for s in steps], 1), y, atol=1e-10,
              name="prefill 4 + decode 3 vs full forward",
              hint="rotate by absolute positions start_pos + t, and attend over all cached keys")

    with t.part("causal_mask against a tril oracle: 0 / -inf, t_k > t_q, float64 and the float32 default", 0.5):
        for tq, tk in [(1, 1), (1, 9), (4, 4), (3, 10), (2, 7)]:
            m = expect_tensor(mask(tq, tk, dtype=torch.float64), f"causal_mask({tq}, {tk}, dtype=torch.float64)", shape=(tq, tk))
            assert_true(m.dtype == torch.float64, f"causal_mask({tq}, {tk}, dtype=torch.float64) has dtype {m.dtype}",
                        hint="build the mask in the dtype asked for")
            ok = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
            assert_true(bool((m[ok] == 0).all()) and bool(torch.isneginf(m[~ok]).all()), f"causal_mask({tq}, {tk}) is wrong",
                        hint=_mask_diagnosis(m, tq, tk))
        m = expect_tensor(mask(2, 3), "causal_mask(2, 3)")
        assert_true(m.dtype == torch.float32, f"causal_mask(2, 3) has dtype {m.dtype}: the default is float32")

    with t.part("outputs and probabilities against the reference, float64: head_dim != dim / n_heads, one head, "
                f"start positions 0, 5, 11 and {4000}", 0.5):
        from course_lib.deepseek.mla import MultiHeadAttention

        for i, (dim, H, hd, T, sp) in enumerate([(32, 4, None, 9, 0), (24, 3, 10, 6, 11), (16, 1, 16, 1, 5), (40, 5, 8, 5, 4000)]):
            D = hd or dim // H
            attn, W = _build(k, SA, dim, H, hd, seed=100 + i)
            ref = MultiHeadAttention(dim, H, head_dim=hd, max_seq_len=4100).double()
            ref.load_state_dict(W)
            x = randn(g, 2, T, dim)
            with torch.no_grad():
                want, wp = ref(x, sp, return_attn=True)
            y, p = _out_p(k, attn, x, sp)
            mistakes = {F32_HINT: mha(W, x, sp, H, D, angles_dtype=torch.float32)[0]}
            if sp:
                mistakes["the RoPE positions restart at 0: rotate by the absolute positions start_pos + t"] = \
                    mha(W, x, sp, H, D, pos0=True)[0]
            if dim // H != D:
                mistakes["the scale is 1/sqrt(dim / n_heads): it is 1/sqrt(head_dim)"] = \
                    mha(W, x, sp, H, D, scale=1 / math.sqrt(dim // H))[0]
            mistakes["the scale uses the model width: it is 1/sqrt(head_dim)"] = mha(W, x, sp, H, D, scale=1 / math.sqrt(dim))[0]
            mistakes["the 1/sqrt(head_dim) scale is missing"] = mha(W, x, sp, H, D, scale=1.0)[0]
            mistakes["RoPE applied to the values: it rotates queries and keys only"] = mha(W, x, sp, H, D, rope_v=True)[0]
            mistakes["RoPE applied to the queries only: keys are rotated too"] = mha(W, x, sp, H, D, rope_k=False)[0]
            close(y, want, atol=1e-10, name=f"output (dim {dim}, {H} heads of {D}, start_pos {sp})", mistakes=mistakes,
                  hint=_FIT, near_hint=F32_HINT)
            close(p, wp, atol=1e-10, name=f"attention probabilities (B, H, T, S), start_pos {sp}", hint=_FIT)

    with t.part("against torch's fused attention on roped heads; chunked prefill (3, 2) + decode (1 x 3) == full forward", 0.5):
        attn, W = _build(k, SA, 40, 5, seed=7, max_seq_len=64)
        x = randn(g, 3, 8, 40)
        a = rope_angles(torch.arange(8), 8, dtype=torch.float64)
        q = apply_rope((x @ W["wq.weight"].T).view(3, 8, 5, 8), a).transpose(1, 2)
        kk = apply_rope((x @ W["wk.weight"].T).view(3, 8, 5, 8), a).transpose(1, 2)
        v = (x @ W["wv.weight"].T).view(3, 8, 5, 8).transpose(1, 2)
        want = F.scaled_dot_product_attention(q, kk, v, is_causal=True).transpose(1, 2).reshape(3, 8, 40) @ W["wo.weight"].T
        close(_call(k, attn, x), want, atol=1e-10, name="output vs F.scaled_dot_product_attention",
              mistakes={F32_HINT: mha(W, x, 0, 5, 8, angles_dtype=torch.float32)[0],
                        "RoPE applied to the values: it rotates queries and keys only": mha(W, x, 0, 5, 8, rope_v=True)[0]},
              hint="RoPE on q and k (not v) at positions 0 .. T-1, scale 1/sqrt(head_dim), causal mask", near_hint=F32_HINT)
        c = k.call(attn.new_cache, 3, 16)
        calls = [(attn, (x[:, :3], 0, c), {}), (attn, (x[:, 3:5], 3, c), {})] + [(attn, (x[:, i:i + 1], i, c), {}) for i in range(5, 8)]
        outs = k.many(calls, no_grad=True)
        for o in outs:
            if isinstance(o, Exception):
                raise o
        close(torch.cat([expect_tensor(o, "a cached chunk's output") for o in outs], 1), want, atol=1e-10,
              name="cached chunks (3, 2, 1, 1, 1) vs full forward",
              hint="a chunk at start_pos is rotated by positions start_pos.. and sees every cached key up to itself")
        n = expect_int(k.get(c.length), "cache.length")
        assert_true(n == 8, f"the cache should hold 8 positions, it holds {n}", hint="write every chunk with cache.update")

    with t.part("causality (future tokens never change past outputs); float32 in, float32 out", 0.5):
        attn, _ = _build(k, SA, 40, 5, seed=8, max_seq_len=64)
        x = randn(g, 2, 8, 40)
        x2 = x.clone()
        x2[:, 5:] += 1.0
        y1, y2 = _call(k, attn, x), _call(k, attn, x2)
        assert_true(torch.equal(expect_tensor(y1, "output")[:, :5], expect_tensor(y2, "output")[:, :5]),
                    "future tokens changed past outputs", hint="apply the causal mask")
        try:
            y32 = expect_tensor(_call(k, k.call(SA, 16, 2), randn(g, 1, 3, 16, dtype=torch.float32)), "float32 output")
        except LearnerError as e:
            raise AssertionError(f"a float32 input failed: {e.describe()}\n  likely cause: build the mask in x.dtype, "
                                 "so that float32 input stays float32 throughout") from None
        assert_true(y32.dtype == torch.float32, f"float32 input must give float32 output, got {y32.dtype}",
                    hint="build the mask in x.dtype")


MUTANTS = [
    Mutant("RoPE angles in float32", "dtype=torch.float64)  # (T, D/2)", "dtype=torch.float32)  # (T, D/2)",
           expect="RoPE angles computed in float32"),
    Mutant("mask not offset", "torch.arange(t_q, device=device)[:, None] + (t_k - t_q)", "torch.arange(t_q, device=device)[:, None]",
           expect="offset the query positions"),
    Mutant("mask off by one (NaN rows)", "masked_fill(k_pos > q_pos", "masked_fill(k_pos >= q_pos", expect="exactly above the diagonal"),
    Mutant("mask -1e9", 'masked_fill(k_pos > q_pos, float("-inf"))', "masked_fill(k_pos > q_pos, -1e9)", expect="not a large negative"),
    Mutant("RoPE positions from 0", "rope_angles(torch.arange(start_pos, start_pos + T, device=x.device), D",
           "rope_angles(torch.arange(T, device=x.device), D", expect="absolute positions"),
    Mutant("scale 1/sqrt(dim / n_heads)", "/ math.sqrt(D)  # (B, H, T, S)", "/ math.sqrt(self.dim // H)  # (B, H, T, S)",
           expect="1/sqrt(dim / n_heads)"),
    Mutant("RoPE on the values", "q, k = apply_rope(q, angles), apply_rope(k, angles)",
           "q, k, v = apply_rope(q, angles), apply_rope(k, angles), apply_rope(v, angles)", expect="RoPE applied to the values"),
    Mutant("RoPE on the queries only", "q, k = apply_rope(q, angles), apply_rope(k, angles)", "q = apply_rope(q, angles)",
           expect="queries only"),
    Mutant("mask in float64", "causal_mask(T, k.shape[1], dtype=x.dtype, device=x.device)",
           "causal_mask(T, k.shape[1], dtype=torch.float64, device=x.device)", expect="float32 input"),
    Mutant("boolean mask", 'return torch.zeros(t_q, t_k, dtype=dtype, device=device).masked_fill(k_pos > q_pos, float("-inf"))',
           "return k_pos <= q_pos", expect="not a boolean one"),
    Mutant("cache not read", "            k, v = cache.update(start_pos, k, v)  # (B, S, H, D) each\n",
           "            cache.update(start_pos, k, v)\n", expect="attend over all cached keys"),
]

ALTERNATIVES = [
    Alternative("matmul, transposes and triu", source='''
def causal_mask(t_q: int, t_k: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Additive causal mask."""
    ### BEGIN SOLUTION
    full = torch.full((t_q, t_k), float("-inf"), dtype=dtype, device=device)
    return torch.triu(full, diagonal=t_k - t_q + 1)
    ### END SOLUTION


class StandardAttention(nn.Module):
    """Causal multi-head attention with RoPE and a KV cache."""

    def __init__(self, dim: int, n_heads: int, head_dim: int | None = None, max_seq_len: int = 512,
                 rope_theta: float = 10000.0):
        super().__init__()
        self.dim, self.n_heads = dim, n_heads
        self.head_dim = head_dim or dim // n_heads
        self.max_seq_len, self.rope_theta = max_seq_len, rope_theta
        inner = n_heads * self.head_dim
        self.wq = nn.Linear(dim, inner, bias=False)
        self.wk = nn.Linear(dim, inner, bias=False)
        self.wv = nn.Linear(dim, inner, bias=False)
        self.wo = nn.Linear(inner, dim, bias=False)

    def new_cache(self, batch: int, max_seq_len: int | None = None) -> KVCache:
        w = self.wk.weight
        return KVCache(batch, max_seq_len or self.max_seq_len, self.n_heads, self.head_dim, dtype=w.dtype, device=w.device)

    def forward(self, x, start_pos=0, cache=None, return_attn=False):
        check_input(x, self.dim, start_pos, self.max_seq_len)
        ### BEGIN SOLUTION
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        pos = start_pos + torch.arange(T)
        ang = rope_angles(pos, D, self.rope_theta, dtype=torch.float64)
        q = apply_rope(self.wq(x).reshape(B, T, H, D), ang)
        k = apply_rope(self.wk(x).reshape(B, T, H, D), ang)
        v = self.wv(x).reshape(B, T, H, D)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, *, D)
        scores = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5
        p = (scores + causal_mask(T, k.shape[2], dtype=scores.dtype)).softmax(dim=-1)
        out = self.wo(torch.matmul(p, v).transpose(1, 2).reshape(B, T, H * D))
        if return_attn:
            return out, p
        return out
        ### END SOLUTION
'''),
]

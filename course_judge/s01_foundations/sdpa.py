"""Exercise 1.1: scaled dot-product attention with causal and boolean masks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from course_judge.checks import assert_true, expect_close, expect_tensor, expect_tuple
from course_judge.local import Alternative, Mutant

GRADE_ID = "test_01_1_sdpa"
POINTS = 3
ANSWERS = ("ex_01_1_sdpa",)
SUMMARY = "output and weights against torch in float64 (several shapes), causal with S > T, boolean masks, the 1/sqrt(d) scale"
REFERENCE = ()


def _attn(q, k, v, mask=None, scale=None, dim=-1):
    s = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    w = torch.softmax(s, dim=dim)
    return w @ v, w


def _call(sdpa, *args, **kwargs):
    out = expect_tuple(sdpa(*args, **kwargs), 2, "scaled_dot_product_attention(q, k, v)")
    return expect_tensor(out[0], "output"), expect_tensor(out[1], "attention weights")


def judge(k, t):
    sdpa = k.g.scaled_dot_product_attention
    with t.part("visible checks: shapes, row sums, output and causal output against torch", 1):
        torch.manual_seed(0)
        q, kk, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 4)
        out, w = _call(sdpa, q, kk, v)
        expect_tensor(out, "output", shape=(2, 3, 5, 4))
        expect_tensor(w, "attention weights", shape=(2, 3, 5, 5))
        expect_close(w.sum(-1), torch.ones(2, 3, 5), atol=1e-5, name="row sums of the weights",
                     hint="the softmax must run over the key dimension (dim=-1)")
        expect_close(out, F.scaled_dot_product_attention(q, kk, v), atol=1e-5, name="output vs torch",
                     mistakes={"the 1/sqrt(d) scale is missing": _attn(q, kk, v, scale=1.0)[0]},
                     hint="check the 1/sqrt(d) scale")
        out_c, _ = _call(sdpa, q, kk, v, is_causal=True)
        expect_close(out_c, F.scaled_dot_product_attention(q, kk, v, is_causal=True), atol=1e-5, name="causal output",
                     hint="query t may only see keys 0..t: mask the upper triangle with -inf before the softmax")

    g = torch.Generator().manual_seed(11)
    shapes = [(1, 1, 1, 1, 1, 1), (3, 2, 7, 7, 16, 5), (2, 4, 3, 9, 32, 32)]
    data = [(torch.randn(B, H, T, d, generator=g, dtype=torch.float64), torch.randn(B, H, S, d, generator=g, dtype=torch.float64),
             torch.randn(B, H, S, dv, generator=g, dtype=torch.float64)) for (B, H, T, S, d, dv) in shapes]

    with t.part("float64 against torch's attention, three shapes (T = 1 .. 7, d != d_v)", 0.5):
        for (q, kk, v), (B, H, T, S, d, dv) in zip(data, shapes):
            out, w = _call(sdpa, q, kk, v)
            expect_close(out, F.scaled_dot_product_attention(q, kk, v), atol=1e-10, name=f"output B{B} H{H} T{T} S{S} d{d} d_v{dv}",
                         mistakes={"the scores are scaled by 1/sqrt(d_v), the value size: the scale uses the query/key size d":
                                   _attn(q, kk, v, scale=1 / math.sqrt(dv))[0],
                                   "the scores are scaled by 1/d: the scale is 1/sqrt(d)": _attn(q, kk, v, scale=1 / d)[0],
                                   "the 1/sqrt(d) scale is missing": _attn(q, kk, v, scale=1.0)[0],
                                   "the softmax runs over the query dimension: it normalises over keys (dim=-1)":
                                   _attn(q, kk, v, dim=-2)[0]},
                         hint="scale by 1/sqrt(d) where d is the query/key size; softmax over the keys")
            expect_close(w, _attn(q, kk, v)[1], atol=1e-10, name=f"attention weights B{B} T{T} S{S}",
                         hint="return the softmax probabilities (each row sums to 1), not the scores")

    with t.part("causal with S > T: the queries are the last T of S positions (decoding with a cache)", 0.5):
        for (q, kk, v), (_, _, T, S, _, _) in zip(data, shapes):
            ref_mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
            out, w = _call(sdpa, q, kk, v, is_causal=True)
            expect_close(out, F.scaled_dot_product_attention(q, kk, v, attn_mask=ref_mask), atol=1e-10, name=f"causal output T{T} S{S}",
                         mistakes={"the causal mask is aligned to the first key: with S > T it is tril(diagonal=S - T), "
                                   "the queries sit at the end": _attn(q, kk, v, mask=torch.ones(T, S, dtype=torch.bool).tril())[0]},
                         hint="query t may see keys 0 .. t + (S - T)")
            assert_true(bool((w.masked_select(~ref_mask) == 0).all()), "causal weights on future keys must be exactly 0",
                        hint="fill masked scores with -inf (not a large negative number or 0) before the softmax")

    with t.part("boolean masks broadcast over batch and heads (True = may attend)", 0.5):
        for (q, kk, v), (_, _, T, S, d, _) in zip(data, shapes):
            mask = torch.rand(T, S, generator=g) > 0.3
            mask[:, 0] = True
            out, _ = _call(sdpa, q, kk, v, mask=mask)
            expect_close(out, F.scaled_dot_product_attention(q, kk, v, attn_mask=mask), atol=1e-10, name=f"masked output T{T} S{S}",
                         mistakes={"the mask is inverted: True means 'may attend', fill the False entries":
                                   _attn(q, kk, v, mask=~mask)[0],
                                   "masked scores are set to 0 instead of -inf": torch.softmax(
                                       (q @ kk.transpose(-2, -1) / math.sqrt(d)).masked_fill(~mask, 0.0), -1) @ v,
                                   "the mask is applied after the softmax: masked keys must get -inf scores before it, "
                                   "so each row still sums to 1": (_attn(q, kk, v)[1] * mask) @ v},
                         hint="True in the mask means 'may attend'; fill the False entries with -inf before the softmax")

    with t.part("the 1/sqrt(d) scale at d = 64", 0.5):
        q = torch.randn(1, 1, 4, 64, generator=g, dtype=torch.float64)
        _, w = _call(sdpa, q, q, q)
        expect_close(w, _attn(q, q, q)[1], atol=1e-10, name="weights with d=64",
                     mistakes={"the scores are scaled by 1/d: the scale is 1/sqrt(d)": _attn(q, q, q, scale=1 / 64)[1],
                               "the 1/sqrt(d) scale is missing": _attn(q, q, q, scale=1.0)[1]},
                     hint="the scale is 1/sqrt(d), not 1/d and not missing")


MUTANTS = [
    Mutant("no 1/sqrt(d) scale", "/ math.sqrt(d)", "", expect="scale is missing"),
    Mutant("scale 1/d", "/ math.sqrt(d)", "/ d", expect="scaled by 1/d"),
    Mutant("scale by the value size", "q.shape[-2], k.shape[-2], q.shape[-1]", "q.shape[-2], k.shape[-2], v.shape[-1]",
           expect="value size"),
    Mutant("softmax over queries", "torch.softmax(scores, dim=-1)", "torch.softmax(scores, dim=-2)", expect="key dimension"),
    Mutant("causal mask aligned to the start", "tril(diagonal=S - T)", "tril()", expect="tril(diagonal=S - T)"),
    Mutant("boolean mask inverted", "scores.masked_fill(~mask, float(\"-inf\"))", "scores.masked_fill(mask, float(\"-inf\"))",
           expect="mask is inverted"),
    Mutant("masked scores set to 0", "scores.masked_fill(~mask, float(\"-inf\"))", "scores.masked_fill(~mask, 0.0)",
           expect="instead of -inf"),
    Mutant("returns the scores, not the weights", "return weights @ v, weights", "return weights @ v, scores",
           expect="not the scores"),
    Mutant("boolean mask applied after the softmax",
           "        scores = scores.masked_fill(~mask, float(\"-inf\"))\n    weights = torch.softmax(scores, dim=-1)",
           "        pass\n    weights = torch.softmax(scores, dim=-1)\n    weights = weights * mask if mask is not None else weights",
           expect="after the softmax"),
]

ALTERNATIVES = [
    Alternative("einsum and torch.where", source='''
def scaled_dot_product_attention(q, k, v, mask=None, is_causal=False):
    T, S = q.shape[-2], k.shape[-2]
    scores = torch.einsum("...td,...sd->...ts", q, k) * q.shape[-1] ** -0.5
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = torch.arange(S, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None] + (S - T)
    if mask is not None:
        allowed = allowed & mask
    scores = torch.where(allowed, scores, torch.full_like(scores, float("-inf")))
    weights = scores.softmax(-1)
    return torch.einsum("...ts,...sd->...td", weights, v), weights
'''),
    Alternative("explicit exp-normalise in float64", source='''
def scaled_dot_product_attention(q, k, v, mask=None, is_causal=False):
    T, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(d)
    if is_causal:
        scores = scores.masked_fill(torch.triu(torch.ones(T, S, dtype=torch.bool), diagonal=S - T + 1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(mask.logical_not(), float("-inf"))
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = (e / e.sum(-1, keepdim=True)).to(q.dtype)
    return weights @ v, weights
'''),
]

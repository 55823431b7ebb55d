"""course_lib.routers: the default router is DeepSeek-V3's (course_lib.deepseek.moe.route on sigmoid affinities);
the correct variants choose the same experts with the same weights; every deviation changes the result."""

from __future__ import annotations

import pytest
import torch

from course_lib.deepseek.moe import route
from course_lib.routers import make_router

KW = dict(top_k=4, n_groups=4, n_limited_groups=2, route_scale=2.5)


def _inputs(dtype=torch.float32, shift=-0.3, scale=0.8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 16, generator=g).to(dtype), (torch.randn(16, generator=g) * scale + shift).to(dtype)


def _as_sets(w, idx):
    order = idx.argsort(dim=1)
    return idx.gather(1, order), w.gather(1, order).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_router_is_the_course_route(dtype):
    logits, bias = _inputs(dtype)
    w, idx = make_router()(logits, bias, **KW)
    w_ref, idx_ref = route(torch.sigmoid(logits), bias, **KW)
    assert torch.equal(idx, idx_ref) and torch.equal(w, w_ref)
    assert w.dtype == dtype and idx.dtype == torch.int64


@pytest.mark.parametrize("spec", [dict(order="ascending", compute_dtype=torch.float64), dict(order="reversed", scale="folded"),
                                  dict(order="shuffled", seed=3)])
def test_correct_variants_agree_as_sets(spec):
    logits, bias = _inputs()
    i0, w0 = _as_sets(*make_router()(logits, bias, **KW))
    i1, w1 = _as_sets(*make_router(**spec)(logits, bias, **KW))
    assert torch.equal(i0, i1)
    torch.testing.assert_close(w0, w1, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("spec", [dict(affinity="softmax"), dict(bias_on="none"), dict(bias_on="logits"), dict(bias_scale=-1.0),
                                  dict(group_score="max"), dict(group_score="sum"), dict(group_bias=False),
                                  dict(group_layout="strided"), dict(mask_fill=0.0), dict(group_limit=False), dict(extra_groups=1),
                                  dict(weights_from="selection"), dict(normalise="none"), dict(scale="none"), dict(normalise="all"),
                                  dict(normalise="softmax_logits"), dict(paired=False), dict(weights_dtype=torch.float64),
                                  dict(index_dtype=torch.int32)])
def test_every_deviation_changes_something(spec):
    logits, bias = _inputs(shift=-0.6, scale=0.3)
    w0, i0 = make_router()(logits, bias, **KW)
    w1, i1 = make_router(**spec)(logits, bias, **KW)
    if w1.dtype != w0.dtype or i1.dtype != i0.dtype:
        return
    (a, wa), (b, wb) = _as_sets(w0, i0), _as_sets(w1, i1)
    assert not torch.equal(a, b) or not torch.allclose(wa, wb, atol=1e-5)



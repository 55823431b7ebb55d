"""Routers built from switches: DeepSeek-V3's routing rules, each of which can be bent, for testing tests.

:func:`make_router` returns a function with the contract of Exercise 6.1::

    route_fn(logits (N, E), bias (E,), *, top_k, n_groups, n_limited_groups, route_scale)
        -> weights (N, K) in logits' dtype, indices (N, K) int64

With no arguments it follows the five rules of the exercise (sigmoid affinities, biased selection,
groups scored by their two best selection scores, top-k among the kept groups, unbiased renormalised
weights times ``route_scale``). Each keyword changes one aspect, either to another correct form (the
order of a token's experts, the precision inside, where the scale is applied) or to a deviation from
the rules. A router is plain computation on its inputs: it keeps no state and records nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["make_router"]


def _group_scores(grouped: torch.Tensor, how: str) -> torch.Tensor:
    """(N, G, E/G) -> (N, G)."""
    if how == "top2":
        return grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
    if how == "max":
        return grouped.amax(-1)
    if how == "sum":
        return grouped.sum(-1)
    raise ValueError(f"group_score must be 'top2', 'max' or 'sum', got {how!r}")


def make_router(*, affinity: str = "sigmoid", bias_on: str = "scores", bias_scale: float = 1.0, group_limit: bool = True,
                group_score: str = "top2", group_bias: bool = True, group_layout: str = "contiguous",
                extra_groups: int = 0, mask_fill: float = float("-inf"), weights_from: str = "scores",
                normalise: str = "chosen", scale: str = "after", order: str = "score", paired: bool = True,
                compute_dtype: torch.dtype | None = None, weights_dtype: torch.dtype | None = None,
                index_dtype: torch.dtype = torch.int64, seed: int = 0) -> Callable:
    """A router with the contract above; the defaults follow DeepSeek-V3's rules.

    - ``affinity``: ``"sigmoid"`` or ``"softmax"`` of the logits;
    - ``bias_on``: the bias is added to the ``"scores"`` (affinities), the ``"logits"``, or ``"none"``;
      ``bias_scale`` multiplies it;
    - ``group_limit``: keep only the best groups; ``group_score``: ``"top2"`` / ``"max"`` / ``"sum"`` of a
      group's scores, ``group_bias``: from the selection (biased) scores or the affinities;
      ``group_layout``: ``"contiguous"`` groups or ``"strided"`` (expert e in group e mod G);
      ``extra_groups``: keep that many more groups; ``mask_fill``: the score of experts outside them;
    - ``weights_from``: ``"scores"`` (affinities) or ``"selection"`` (biased); ``normalise``: over the
      ``"chosen"`` experts, over ``"all"`` experts, ``"none"``, or ``"softmax_logits"`` (a softmax of
      the chosen logits); ``scale``: ``"after"`` (w / sum * scale), ``"folded"`` (w * (scale / sum)) or
      ``"none"``;
    - ``order`` of a token's experts: ``"score"`` (largest selection score first), ``"ascending"`` ids,
      ``"reversed"``, ``"shuffled"`` (seeded by ``seed``); ``paired=False`` sorts the weights apart from
      their experts;
    - ``compute_dtype`` inside (default: the logits'); ``weights_dtype`` and ``index_dtype`` of the outputs.
    """
    def route_fn(logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, n_groups: int, n_limited_groups: int,
                 route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        dt = compute_dtype or logits.dtype
        lg = logits.to(dt)  # (N, E)
        N, E = lg.shape
        b = torch.zeros(E, dtype=dt) if bias is None else bias.to(dt) * bias_scale  # (E,)
        s = torch.sigmoid(lg) if affinity == "sigmoid" else torch.softmax(lg, dim=-1)  # (N, E)
        sel = {"scores": s + b, "logits": lg + b, "none": s}[bias_on]  # (N, E) selection scores
        choice = sel
        if group_limit and n_groups > 1:
            per = E // n_groups
            src = sel if group_bias else s
            if group_layout == "contiguous":
                grouped, group_of = src.view(N, n_groups, per), torch.arange(E) // per
            else:
                grouped, group_of = src.view(N, per, n_groups).transpose(1, 2), torch.arange(E) % n_groups
            keep = _group_scores(grouped, group_score).topk(min(n_groups, n_limited_groups + extra_groups), dim=-1).indices
            dropped = torch.ones(N, n_groups, dtype=torch.bool).scatter_(1, keep, False)  # (N, G)
            choice = sel.masked_fill(dropped[:, group_of], mask_fill)  # (N, E)
        idx = choice.topk(top_k, dim=-1).indices  # (N, K), best first
        src = s if weights_from == "scores" else sel
        w = src.gather(1, idx)  # (N, K)
        if normalise == "chosen":
            total = w.sum(-1, keepdim=True)
        elif normalise == "all":
            total = src.sum(-1, keepdim=True)
        elif normalise == "softmax_logits":
            w, total = torch.softmax(lg.gather(1, idx), dim=-1), None
        else:
            total = None
        if scale == "folded":
            w = w * (route_scale / total) if total is not None else w * route_scale
        else:
            w = w / total if total is not None else w
            w = w * route_scale if scale == "after" else w
        if order == "ascending":
            perm = idx.argsort(dim=-1)
        elif order == "reversed":
            perm = torch.arange(top_k - 1, -1, -1).expand(N, top_k)
        elif order == "shuffled":
            g = torch.Generator().manual_seed(seed)
            perm = torch.stack([torch.randperm(top_k, generator=g) for _ in range(N)]) if N else idx
        else:
            perm = None
        if perm is not None:
            idx, w = idx.gather(1, perm), w.gather(1, perm)
        if not paired:
            idx, w = idx.sort(dim=-1).values, w.sort(dim=-1, descending=True).values
        return w.to(weights_dtype or logits.dtype), idx.to(index_dtype)

    return route_fn


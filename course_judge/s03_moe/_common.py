"""What Section 3's judges share: building the learner's modules in the kernel with the judge's weights,
the course's routing with each known mistake switched on, SwiGLU and dispatch variants.

Everything here runs in the judge. The learner's modules stay in the kernel (handles); the judge loads
weights it drew itself (``load_state``), sends inputs, and compares what comes back with the course's
reference (``course_lib.deepseek.moe``) run here on the same weights.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from course_judge.checks import assert_true, expect_tensor, expect_tuple
from course_judge.session import LearnerError
from course_lib.deepseek.moe import MoE
from course_lib.deepseek.routing import MoEConfig

CFG = "course_lib.deepseek.routing:MoEConfig"
# course_lib.expert_drafts (given for 3.1's test) builds correct experts: answer cells may not use it.
EXPERT_DRAFTS = ("make_expert", "is_draft")

TINY = dict(
    dim=16,
    moe_inter_dim=12,
    n_routed_experts=8,
    n_shared_experts=1,
    n_activated_experts=2,
    n_expert_groups=4,
    n_limited_groups=2,
    route_scale=2.5,
)


# ---------------------------------------------------------------- the kernel side


def kept(k, ref, *args, **kwargs):
    """Call ``ref`` in the kernel and leave the result there (a handle)."""
    return k.call_opts(ref, args, kwargs, keep=True)


class Configs:
    """``MoEConfig`` objects built in the kernel (handles, so the learner's code gets the real dataclass),
    one per distinct set of fields within one judge run."""

    def __init__(self, k):
        self.k, self.made = k, {}

    def __call__(self, **kw):
        key = tuple(sorted(kw.items()))
        if key not in self.made:
            self.made[key] = kept(self.k, self.k.lib(CFG), **kw)
        return self.made[key]


def remote_cfg(k, **kw):
    """A ``MoEConfig`` built in the kernel (a handle)."""
    return kept(k, k.lib(CFG), **kw)


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def reference_moe(cfg: MoEConfig, seed: int, *, bias_std: float = 0.1, dtype=torch.float64) -> MoE:
    """The course's layer with weights drawn from ``seed`` (nn.Linear's init) and a random selection bias."""
    with _seeded(seed):
        ref = MoE(cfg).to(dtype).eval()
        with torch.no_grad():
            ref.gate.bias.copy_(torch.randn(cfg.n_routed_experts) * bias_std)
    return ref


HINT_NAMES = "keep the names of the given __init__ (gate.weight, gate.bias, experts.{i}.w1/w2/w3, shared_experts.w1/w2/w3)"
HINT_SHAPES = "w1 and w3 are (inter_dim, dim), w2 is (dim, inter_dim); the shared expert is n_shared_experts * moe_inter_dim wide"


def build(k, ctor, args: tuple, state: dict, what: str, *, dtype: str | None = "double", names_hint: str = HINT_NAMES):
    """``ctor(*args)`` in the kernel, cast (``module.double()``) and loaded with the judge's ``state``: two round trips.

    The names and shapes are checked from the module's ``info`` (no weights travel back).
    """
    m = k.call_opts(ctor, args, keep=True)
    load = {"op": "call", "fn": m.load_state_dict, "args": [{n: v.detach().clone() for n, v in state.items()}], "kwargs": {}}
    reqs = ([{"op": "call", "fn": getattr(m, dtype), "args": [], "kwargs": {}}] if dtype else []) + [{"op": "info", "obj": m}, load]
    out = k.request({"op": "many", "requests": reqs}, f"{what} (building it)")
    if dtype and "error" in out[0]:
        raise LearnerError(f"{what}.{dtype}()", out[0]["error"])
    inf = out[-2].get("ok") or {}
    have = {**inf.get("parameters", {}), **inf.get("buffers", {})}
    missing, extra = sorted(set(state) - set(have)), sorted(set(have) - set(state))
    assert_true(
        not missing and not extra,
        f"{what}'s parameters and buffers are not named as the exercise says: missing {missing[:6]}, unexpected {extra[:6]}",
        hint=names_hint,
    )
    for name, v in state.items():
        assert_true(
            tuple(have[name]) == tuple(v.shape), f"{what}.{name} has shape {tuple(have[name])}, expected {tuple(v.shape)}", hint=HINT_SHAPES
        )
    if "error" in out[-1]:
        raise LearnerError(f"{what}.load_state_dict(...)", out[-1]["error"])
    return m


def load_state(k, module, state: dict, what: str) -> None:
    """Load the judge's ``state`` into a learner's module built earlier (names and shapes checked by ``build``)."""
    k.call(module.load_state_dict, {n: v.detach().clone() for n, v in state.items()})


def set_bias(k, router, bias: torch.Tensor) -> None:
    k.call_opts(router.bias.copy_, (bias,), no_grad=True)


def routing_of(out, name: str, n: int | None = None, kk: int | None = None):
    """(weights, indices, scores) of a router's answer, checked to be tensors of the right shapes."""
    w, i, s = expect_tuple(out, 3, name)
    w = expect_tensor(w, f"{name}: weights", shape=(n, kk) if n is not None else None)
    i = expect_tensor(i, f"{name}: indices", shape=(n, kk) if n is not None else None)
    s = expect_tensor(s, f"{name}: scores")
    return w, i, s


def by_expert(w: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and indices of each token sorted by expert index (routing is a set, not an order)."""
    o = i.long().sort(dim=-1)
    return w.gather(1, o.indices), o.values


# ---------------------------------------------------------------- routing with a switch per known mistake


def route(
    scores: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: MoEConfig,
    *,
    group: str = "auto",
    fill: float = -math.inf,
    select_bias: bool = True,
    group_bias: bool = True,
    weight_bias: bool = False,
    renorm: str = "auto",
    scale: bool = True,
    limit: bool = True,
    best_groups: bool = True,
    n_keep: int | None = None,
    use_bias: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's routing (``group="auto"``: top-2 sum for sigmoid, max for softmax), each pitfall a switch.

    Returns (weights, indices) with each token's experts sorted by index.
    """
    v3 = cfg.score_func == "sigmoid"
    N, E = scores.shape
    use_bias = v3 if use_bias is None else use_bias
    b = bias.to(scores.dtype) if (bias is not None and use_bias) else torch.zeros(E, dtype=scores.dtype)
    choice = scores + b if select_bias else scores
    G = cfg.n_expert_groups
    if G > 1 and limit:
        grouped = (choice if group_bias else scores).view(N, G, E // G)
        how = ("top2" if v3 else "max") if group == "auto" else group
        gs = {"top2": lambda: grouped.topk(2, -1).values.sum(-1), "max": lambda: grouped.amax(-1), "sum": lambda: grouped.sum(-1)}[how]()
        keep = gs.topk(n_keep or cfg.n_limited_groups, -1, largest=best_groups).indices
        mask = torch.ones(N, G, dtype=torch.bool).scatter_(1, keep, False)
        choice = choice.view(N, G, E // G).masked_fill(mask.unsqueeze(-1), fill).view(N, E)
    idx = choice.topk(cfg.n_activated_experts, -1).indices.sort(-1).values
    src = scores + b if weight_bias else scores
    w = src.gather(1, idx)
    if (renorm == "auto" and v3) or renorm is True:
        w = w / w.sum(-1, keepdim=True)
    return (w * cfg.route_scale if scale else w), idx


def group_limit(
    choice: torch.Tensor,
    cfg: MoEConfig,
    *,
    group: str = "auto",
    fill: float = -math.inf,
    best_groups: bool = True,
    n_keep: int | None = None,
) -> torch.Tensor:
    """The reference ``group_limit`` (masked selection scores), with switches for its mistakes."""
    N, E = choice.shape
    G = cfg.n_expert_groups
    if G == 1:
        return choice
    grouped = choice.view(N, G, E // G)
    how = ("top2" if cfg.score_func == "sigmoid" else "max") if group == "auto" else group
    gs = {"top2": lambda: grouped.topk(2, -1).values.sum(-1), "max": lambda: grouped.amax(-1), "sum": lambda: grouped.sum(-1)}[how]()
    keep = gs.topk(n_keep or cfg.n_limited_groups, -1, largest=best_groups).indices
    mask = torch.ones(N, G, dtype=torch.bool).scatter_(1, keep, False)
    return grouped.masked_fill(mask.unsqueeze(-1), fill).view(N, E)


# ---------------------------------------------------------------- experts


def swiglu(x, w1, w2, w3):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


SWIGLU_MISTAKES = {  # name -> the hidden activation h(g, u) a mistake computes instead of silu(g) * u (g = w1 x, u = w3 x)
    "SiLU on the wrong branch: w1 x is the gate that goes through SiLU, w3 x the up projection (w1 and w3 swapped)": lambda g, u: (
        F.silu(u) * g
    ),
    "the gate is missing: the up projection w3 x must be multiplied by SiLU(w1 x) (no gating product)": lambda g, u: F.silu(g),
    "the up projection is ignored: SiLU(w1 x) must be multiplied by w3 x": lambda g, u: F.silu(g) * g,
    "SiLU is missing: the gate w1 x goes through SiLU before the product": lambda g, u: g * u,
    "SiLU is applied to the product: SiLU(w1 x) * w3 x, not SiLU(w1 x * w3 x)": lambda g, u: F.silu(g * u),
    "ReLU instead of SiLU": lambda g, u: F.relu(g) * u,
    "GELU instead of SiLU": lambda g, u: F.gelu(g) * u,
    "sigmoid instead of SiLU (SiLU(z) = z * sigmoid(z))": lambda g, u: torch.sigmoid(g) * u,
}


def swiglu_mistakes(x, w1, w2, w3, who: str = "") -> dict[str, torch.Tensor]:
    """Outputs of the SwiGLU mistakes learners make, named (``who`` prefixes each name)."""
    g, u = F.linear(x, w1), F.linear(x, w3)
    return {f"{who}{name}": F.linear(h(g, u), w2) for name, h in SWIGLU_MISTAKES.items()}


def expert_weights(state: dict, prefix: str):
    return state[f"{prefix}.w1.weight"], state[f"{prefix}.w2.weight"], state[f"{prefix}.w3.weight"]


def expert_outputs(state: dict, cfg: MoEConfig, x: torch.Tensor, act=None) -> torch.Tensor:
    """Every routed expert on every token, (E, N, dim): the judge's dense oracle (small shapes only).

    ``act(g, u)`` replaces the SwiGLU's silu(g) * u (to reproduce a mistaken expert).
    """
    W1, W2, W3 = (
        torch.stack([state[f"experts.{e}.{n}.weight"] for e in range(cfg.n_routed_experts)]).to(x.dtype) for n in ("w1", "w2", "w3")
    )
    g, u = torch.einsum("nd,eid->eni", x, W1), torch.einsum("nd,eid->eni", x, W3)
    return torch.einsum("eni,edi->end", F.silu(g) * u if act is None else act(g, u), W2)


def dispatch_variants(
    state: dict,
    cfg: MoEConfig,
    x: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    kept: torch.Tensor | None = None,
    with_mask_mistakes: bool = True,
    outs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The routed output sum_k w[t,k] expert_{idx[t,k]}(x_t), and what the usual dispatch mistakes give instead."""
    A = expert_outputs(state, cfg, x) if outs is None else outs  # (E, N, dim)
    K = idx.shape[1]
    keep = torch.ones_like(idx, dtype=torch.bool) if kept is None else kept
    flat, wf = idx.reshape(-1).long(), w.reshape(-1).to(x.dtype)
    order = torch.argsort(flat, stable=True)
    order = order[keep.reshape(-1)[order]]  # the kept assignments, grouped by expert

    def acc(rows, weights):  # each sorted assignment's expert output on x[rows], weighted, added to row `rows`
        y = torch.zeros_like(x)
        return y.index_add_(0, rows, A[flat[order], rows] * weights.unsqueeze(-1))

    def overwrite():  # y[tokens of e] = expert_e(...) * w, expert after expert: the last expert of each token wins
        y = torch.zeros_like(x)
        tok, we, ex = order // K, wf[order], flat[order]
        for e in range(cfg.n_routed_experts):
            sel = ex == e
            y[tok[sel]] = A[e, tok[sel]] * we[sel].unsqueeze(-1)
        return y

    right = acc(order // K, wf[order])
    wrong = {
        "the token of flattened assignment j is j // K (indices are flattened token-major), not j % K": acc(order % K, wf[order])
        if K > 1
        else None,
        "the weights are not permuted with the sorted order: take weights.reshape(-1)[order]": acc(order // K, wf[: order.numel()]),
        "the expert outputs are assigned (y[tokens] = ...) instead of accumulated (index_add_): "
        "a token keeps only one expert's output": overwrite(),
        "the combine weights are ignored: each expert's output must be multiplied by its weight": acc(
            order // K, torch.ones_like(wf[order])
        ),
    }
    if kept is not None and with_mask_mistakes:
        wrong["the kept mask is ignored: assignments where kept is False must contribute nothing"] = dispatch_variants(
            state, cfg, x, w, idx, with_mask_mistakes=False, outs=A
        )[0]
        wrong["the kept mask is inverted: False means the assignment was dropped"] = dispatch_variants(
            state, cfg, x, w, idx, ~kept, with_mask_mistakes=False, outs=A
        )[0]
    return right, {k: v for k, v in wrong.items() if v is not None and not torch.allclose(v, right, atol=1e-9)}


def matmul_flops(cfg: MoEConfig, n_tokens: int, *, layer: bool = True) -> int:
    """The matmul FLOPs of the course's layer (``layer``) or of its routed dispatch alone, counted as torch's
    FlopCounterMode counts them (2 m n k per product): computed, not measured, because the counter's first use
    costs the judge seconds."""
    per_row = 2 * 3 * cfg.dim * cfg.moe_inter_dim  # w1, w3 and w2 of one expert on one row
    routed = per_row * n_tokens * cfg.n_activated_experts
    if not layer:
        return routed
    return 2 * n_tokens * cfg.dim * cfg.n_routed_experts + routed + per_row * cfg.n_shared_experts * n_tokens


def no_token_loop(shapes: list[tuple], inter: int, max_load: int, what: str, dim: int) -> None:
    """Fail when no intermediate with the experts' width has as many rows as the busiest expert's tokens.

    A loop over tokens (or over (token, slot) pairs) runs each expert on one row at a time, so its
    expert intermediates are (1, inter); grouping by expert gives an (n_e, inter) intermediate per expert.
    ``(dim, inter)`` is also the shape of a transposed expert weight (``F.linear`` records it), so it only
    counts when the busiest expert has exactly ``dim`` assignments.
    """
    rows = [math.prod(s[:-1]) for s in shapes if len(s) >= 2 and s[-1] == inter]
    if max_load != dim:
        rows = [r for r in rows if r != dim]
    assert_true(
        bool(rows) and max(rows) >= max_load,
        f"{what}: the experts ran on at most {max(rows, default=0)} rows at a time, but the busiest expert has "
        f"{max_load} assignments: a loop over tokens (or over (token, slot) pairs)",
        hint="sort the assignments by expert (argsort + bincount), then call each expert ONCE on all of its tokens",
    )

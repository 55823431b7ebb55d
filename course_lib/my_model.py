"""Section 5's bridge from the learner's saved parts (Sections 2, 3 and 4) to the model it trains.

``my_deepseek/s02_mla.py`` and ``s03_moe.py`` (written by :func:`course_lib.learner.save_my_parts`) hold the
learner's ``MultiHeadLatentAttention`` and ``MixtureOfExperts``. Two small differences separate them from the
parts a ``DeepSeekV3Mini`` block is specified with, and this module closes both without touching the learner's code:

- **Weight names.** Section 2 splits MLA into ``compress`` / ``decompress`` sub-modules; the model's weights are
  named as DeepSeek's (``attn.wq_a.weight``, ...). :func:`with_course_names` gives a subclass whose ``state_dict``
  and ``load_state_dict`` speak the model's names, so ``copy_weights``, checkpoints and the HF converter work.
- **The balancing step.** Section 3 writes ``bias_update(load, gamma)`` as a function; the model calls
  ``moe.update_bias(load)``. :func:`your_moe` adds that method, built on the learner's function.

:func:`section5_parts` picks each part with :func:`course_lib.learner.my_part`: the learner's when it is saved and
agrees with the course's part on a float64 check (same weights, same input), the course's otherwise, one printed
line each. While grading it always returns the course's parts, so Section 5 is graded on its own.

:func:`fp8_linear` does the same for Section 4's ``FP8LinearFunction`` (the FP8 ablation's linear layer). Section 4
specifies it for GEMM sizes that are multiples of the 128-wide tile; :func:`your_fp8_linear` zero-pads the model's
narrower matrices up to the tile, which leaves every tile's and block's amax, hence every scale, unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.deepseek.attention import MLAConfig
from course_lib.deepseek.fp8 import FP8Linear as CourseFP8Linear
from course_lib.deepseek.mla import MLA as CourseMLA
from course_lib.deepseek.moe import MoE as CourseMoE
from course_lib.deepseek.moe import bias_update as course_bias_update
from course_lib.deepseek.moe import param_counts as course_moe_param_counts
from course_lib.deepseek.moe import sequence_balance_loss
from course_lib.deepseek.routing import MoEConfig
from course_lib.learner import my_part, saved_part

__all__ = ["MLA_NAMES", "Parts", "with_course_names", "your_moe", "check_mla", "check_moe", "check_moe_counter",
           "section5_parts", "moe_counter", "your_fp8_linear", "check_fp8_linear", "fp8_linear", "bound"]

# Section 2's parameter names -> the model's (DeepSeek's inference/model.py) names
MLA_NAMES = {"compress.wq_a.weight": "wq_a.weight", "compress.q_norm.weight": "q_norm.weight",
             "compress.wkv_a.weight": "wkv_a.weight", "compress.kv_norm.weight": "kv_norm.weight",
             "decompress.wq_b.weight": "wq_b.weight", "decompress.wkv_b.weight": "wkv_b.weight", "wo.weight": "wo.weight"}

# small, every width different: a swapped dimension cannot agree by accident
_MLA_CHECK = MLAConfig(dim=48, n_heads=3, q_lora_rank=40, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8,
                       v_head_dim=10, max_seq_len=16)
_MOE_CHECK = MoEConfig(dim=16, moe_inter_dim=12, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                       n_expert_groups=4, n_limited_groups=2, route_scale=2.5)


def with_course_names(cls: type[nn.Module], names: dict[str, str] = MLA_NAMES) -> type[nn.Module]:
    """A subclass of ``cls`` whose ``state_dict`` uses ``names``' values and whose ``load_state_dict`` accepts them."""
    back = {v: k for k, v in names.items()}

    def rename(state: dict, prefix: str, table: dict[str, str]) -> None:
        for key in [k for k in state if k.startswith(prefix) and k[len(prefix):] in table]:
            state[prefix + table[key[len(prefix):]]] = state.pop(key)

    class Renamed(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.register_state_dict_post_hook(lambda module, state, prefix, meta: rename(state, prefix, names))
            self.register_load_state_dict_pre_hook(lambda module, state, prefix, *rest: rename(state, prefix, back))

    Renamed.__name__ = Renamed.__qualname__ = f"Your{cls.__name__}"
    return Renamed


def your_moe(cls: type[nn.Module], bias_update: Callable | None = None,
             balance_loss: Callable | None = None) -> type[nn.Module]:
    """A subclass of ``cls`` with the two balancing hooks the model's training step uses.

    ``update_bias(load, gamma=None)``: ``gate.bias += bias_update(load, gamma)`` (Section 3's 3.4 function).
    While training, ``info.aux_loss`` is ``alpha * balance_loss(scores, indices, alpha)`` per sequence (V3 eqs. 17-20)
    unless the learner's forward already fills it.
    """
    step = bias_update or course_bias_update
    seq_loss = balance_loss or _course_balance_loss

    class YourMoE(cls):  # type: ignore[misc, valid-type]
        def forward(self, x: torch.Tensor):
            y, info = super().forward(x)
            cfg = self.cfg
            filled = info.aux_loss.requires_grad or bool(info.aux_loss.ne(0).any())
            if self.training and cfg.seq_aux_alpha > 0 and not filled and x.numel():
                T = x.shape[1] if x.dim() == 3 else x.shape[0]
                E, K = cfg.n_routed_experts, cfg.n_activated_experts
                info.aux_loss = seq_loss(info.scores.view(-1, T, E), info.indices.view(-1, T, K), cfg.seq_aux_alpha)
            return y, info

        @torch.no_grad()
        def update_bias(self, load: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
            gamma = self.cfg.bias_update_speed if gamma is None else gamma
            delta = step(load, gamma).to(self.gate.bias.dtype)
            self.gate.bias += delta
            return delta

    YourMoE.__name__ = YourMoE.__qualname__ = f"Your{cls.__name__}"
    return YourMoE


def _course_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    return sequence_balance_loss(scores, indices, alpha, normalize=True)


def _close(what: str, mine: torch.Tensor, ref: torch.Tensor, tol: float = 1e-9) -> None:
    if mine.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(mine.shape)}, the course's part gives {tuple(ref.shape)}")
    err = (mine.double() - ref.double()).abs().max().item()
    if not err <= tol:  # NaN fails too
        raise AssertionError(f"{what}: differs from the course's part by {err:.2e} in float64")


def check_mla(cls: type[nn.Module]) -> bool:
    """Same weights and input, float64: full forward, naive and absorbed, and a cached decode step agree."""
    torch.manual_seed(0)
    ref = CourseMLA(_MLA_CHECK).double().eval()
    mine = cls(_MLA_CHECK).double().eval()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, _MLA_CHECK.dim, dtype=torch.float64)  # (B, T, dim)
    with torch.no_grad():
        want = ref(x)
        _close("MLA output", mine(x), want)
        _close("MLA absorbed output", mine(x, 0, None, absorb=True), want)
        cache = mine.new_cache(2, 8)
        mine(x[:, :5], 0, cache, absorb=True)
        _close("MLA cached decode step", mine(x[:, 5:], 5, cache, absorb=True), want[:, 5:])
    return True


def check_moe(cls: type[nn.Module]) -> bool:
    """Same weights and input, float64: output, routing load and one balancing step agree."""
    torch.manual_seed(0)
    ref = CourseMoE(_MOE_CHECK).double()
    with torch.no_grad():
        ref.gate.bias.normal_(0, 0.1)  # a moved bias: routing must add it for selection only
    mine = cls(_MOE_CHECK).double()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, _MOE_CHECK.dim, dtype=torch.float64)  # (B, T, dim)
    with torch.no_grad():
        (y_ref, info_ref), (y, info) = ref(x), mine(x)
    _close("MoE output", y, y_ref)
    _close("MoE load", info.load, info_ref.load, 0.0)
    _close("MoE bias update", mine.update_bias(info.load, 0.01), ref.update_bias(info_ref.load, 0.01), 0.0)
    ref.train(), mine.train()
    _close("MoE sequence balance loss", mine(x)[1].aux_loss, ref(x)[1].aux_loss, 1e-12)
    return True


@dataclass(frozen=True)
class Parts:
    """The two parts Section 5's block is built from, and where each came from."""

    MLA: type[nn.Module]
    MoE: type[nn.Module]

    @property
    def yours(self) -> list[str]:
        return [n for n, c, ref in (("MLA", self.MLA, CourseMLA), ("MoE", self.MoE, CourseMoE)) if c is not ref]


def section5_parts() -> Parts:
    """The learner's MLA and MoE where saved and right (one printed line each), the course's otherwise."""
    mla = my_part("02_mla", "MultiHeadLatentAttention", fallback=None, check=lambda c: check_mla(with_course_names(c)))
    hooks = saved_part("03_moe", "bias_update"), saved_part("03_moe", "sequence_balance_loss")  # checked with the MoE
    moe = my_part("03_moe", "MixtureOfExperts", fallback=None, check=lambda c: check_moe(your_moe(c, *hooks)))
    return Parts(MLA=with_course_names(mla) if mla is not None else CourseMLA,
                 MoE=your_moe(moe, *hooks) if moe is not None else CourseMoE)


_COUNTER_CONFIGS = (MoEConfig.deepseek_v3(), MoEConfig(dim=24, moe_inter_dim=10, n_routed_experts=8, n_shared_experts=2,
                                                      n_activated_experts=3, n_expert_groups=2, n_limited_groups=1),
                    MoEConfig(dim=16, moe_inter_dim=12, n_routed_experts=4, n_shared_experts=0, n_activated_experts=1,
                              n_expert_groups=1, n_limited_groups=1))


def check_moe_counter(fn: Callable[[MoEConfig], dict]) -> bool:
    """The learner's ``moe_param_counts`` against the course's on V3's layer, two shared experts and none."""
    for cfg in _COUNTER_CONFIGS:
        got, want = fn(cfg), course_moe_param_counts(cfg)
        if not isinstance(got, dict) or {k: got.get(k) for k in want} != want:
            raise AssertionError(f"moe_param_counts({cfg.n_routed_experts} experts, top-{cfg.n_activated_experts}, "
                                 f"{cfg.n_shared_experts} shared) = {got!r:.120}, expected {want}")
    return True


def moe_counter() -> Callable[[MoEConfig], dict]:
    """The learner's Section 3.1 ``moe_param_counts`` where saved and right (one printed line), the course's otherwise;
    Section 5's model counter (Exercise 5.2.3) builds on it."""
    return my_part("03_moe", "moe_param_counts", fallback=course_moe_param_counts, check=check_moe_counter)


TILE = 128  # Section 4's tile and block width


def your_fp8_linear(fn: type[torch.autograd.Function]) -> type[nn.Module]:
    """An ``FP8Linear`` (the course's interface: ``in_features``, ``out_features``, ``weight``, ``from_linear``) whose
    GEMMs are ``fn.apply(x, weight)``, the learner's Section 4 function, on operands zero-padded to multiples of
    ``TILE`` (tokens, input and output features); the output is cut back to its real size."""

    class YourFP8Linear(nn.Module):
        def __init__(self, in_features: int, out_features: int, **_course_options: object) -> None:
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

        @classmethod
        def from_linear(cls, linear: nn.Linear, **kwargs: object) -> nn.Module:
            if linear.bias is not None:
                raise ValueError("FP8Linear has no bias (DeepSeek's linear layers have none)")
            m = cls(linear.in_features, linear.out_features, **kwargs)
            with torch.no_grad():
                m.weight.copy_(linear.weight)
            return m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            K, N = self.in_features, self.out_features
            if x.shape[-1] != K:
                raise ValueError(f"x has {x.shape[-1]} features, weight expects (N, {K})")
            x2 = x.reshape(-1, K)  # (M, K)
            M = x2.shape[0]
            xp = F.pad(x2, (0, -K % TILE, 0, -M % TILE))  # (M', K'): zero rows and columns change no amax
            wp = F.pad(self.weight, (0, -K % TILE, 0, -N % TILE))  # (N', K')
            return fn.apply(xp, wp)[:M, :N].reshape(*x.shape[:-1], N)

    return YourFP8Linear


def check_fp8_linear(cls: type[nn.Module]) -> bool:
    """Same weight and input, float32, against the course's ``FP8Linear`` (DeepSeek's block-wise recipe): output,
    input gradient and weight gradient, each row within 1e-4 of its largest entry. Two 128-wide blocks each way and
    rows of very different sizes, so a scale shared by the wrong group of numbers, or a transposed block grid, shows."""
    K, N = 200, 150
    g = torch.Generator().manual_seed(0)
    ref = CourseFP8Linear(K, N, recipe="blockwise")
    with torch.no_grad():
        ref.weight.copy_(torch.randn(N, K, generator=g) * torch.logspace(-2, 0, N)[:, None] * torch.logspace(0, -1, K))
    mine = cls.from_linear(nn.Linear(K, N, bias=False))
    with torch.no_grad():
        mine.weight.copy_(ref.weight)
    x = torch.randn(3, 7, K, generator=g) * torch.logspace(-3, 1, 7)[:, None]  # (B, T, K)
    dy = torch.randn(3, 7, N, generator=g) * torch.logspace(1, -2, 7)[:, None]
    outs = []
    for m in (ref, mine):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad, m.weight.grad))
    for what, want, got in zip(("FP8 linear output", "FP8 linear input gradient", "FP8 linear weight gradient"), *outs):
        if got is None or got.shape != want.shape:
            raise AssertionError(f"{what}: {None if got is None else tuple(got.shape)}, the course's part gives "
                                 f"{tuple(want.shape)}")
        want2, got2 = want.reshape(-1, want.shape[-1]).double(), got.reshape(-1, want.shape[-1]).double()
        err = ((got2 - want2).abs().amax(1) / want2.abs().amax(1).clamp_min(1e-30)).max().item()
        if not err <= 1e-4:  # NaN fails too
            raise AssertionError(f"{what}: a row differs from the course's part by {err:.1e} of its largest entry")
    return True


def fp8_linear() -> type[nn.Module]:
    """The FP8 linear layer of Section 5's FP8 run: the learner's Section 4 ``FP8LinearFunction`` where saved and right
    (one printed line), the course's ``FP8Linear`` otherwise and always while grading."""
    fn = my_part("04_fp8", "FP8LinearFunction", fallback=None, check=lambda f: check_fp8_linear(your_fp8_linear(f)))
    return CourseFP8Linear if fn is None else your_fp8_linear(fn)


@contextmanager
def bound(namespace: MutableMapping[str, object], **names: object) -> Iterator[None]:
    """Bind ``names`` in ``namespace`` (a notebook's ``globals()``) for the ``with`` block, then restore them.

    A block written as ``MLA(cfg.mla())`` and ``isinstance(self.ffn, MoE)`` looks its parts up by name when it is
    built and when it runs, so a model built and trained inside ``with bound(globals(), MLA=..., MoE=...)`` uses
    those parts throughout, and the model outside keeps its own.
    """
    missing = object()
    old = {k: namespace.get(k, missing) for k in names}
    namespace.update(names)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is missing:
                namespace.pop(k, None)
            else:
                namespace[k] = v

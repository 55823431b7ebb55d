"""Helpers Section 5's judges share: small configs, reference modules with weights that make mistakes show, and
moving those weights into the learner's modules through the channel."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from course_judge.checks import assert_true, expect_close, expect_tensor, matches
from course_lib.deepseek.model_config import ModelConfig, init_weights

CONFIG = "course_lib.deepseek.model_config:ModelConfig"
INIT = "course_lib.deepseek.model_config:init_weights"
MOE = "course_lib.deepseek.moe.MoE"
SWIGLU = "course_lib.deepseek.common.SwiGLU"

# small shapes with every size different, so a transposed or swapped piece cannot line up by accident
SMALL = dict(vocab_size=13, dim=24, n_heads=3, kv_lora_rank=12, q_lora_rank=16, qk_nope_head_dim=6, qk_rope_head_dim=4,
             v_head_dim=5, inter_dim=30, moe_inter_dim=10, n_routed_experts=6, n_activated_experts=2, n_expert_groups=3,
             n_limited_groups=2, route_scale=2.5, max_seq_len=32)


def cfg(**over) -> ModelConfig:
    return ModelConfig(**{**SMALL, **over})


def remote_cfg(k, c: ModelConfig):
    """The same ``ModelConfig`` built in the kernel (the given class, not the learner's globals), left there."""
    return k.call_opts(k.lib(CONFIG), (), dataclasses.asdict(c), keep=True)


@torch.no_grad()
def make_ref(module: nn.Module, seed: int, std: float = 0.3, g: torch.Generator | None = None) -> nn.Module:
    """``init_weights`` in float64, norm weights away from 1 and non-zero gate biases: misplaced norms and a
    routing that ignores the bias change the output."""
    init_weights(module, seed, std=std)
    module.double()
    g = g or torch.Generator().manual_seed(seed + 1000)
    for p in module.parameters():
        if p.dim() == 1:
            p.uniform_(0.5, 1.5, generator=g)
    for name, b in module.named_buffers():
        if name.endswith("gate.bias"):
            b.uniform_(-0.05, 0.05, generator=g)
    return module


def ffn_kind(k, ffn) -> str:
    """'MoE', 'SwiGLU' or the class name of a learner's ``ffn`` attribute."""
    mro = k.info(ffn)["mro"]
    return "MoE" if MOE in mro else "SwiGLU" if SWIGLU in mro else k.info(ffn)["type"]


def load_weights(k, remote, ref: nn.Module, what: str, *, dtype: torch.dtype = torch.float64) -> None:
    """Give the learner's module ``remote`` the reference's weights (by name), in ``dtype``.

    Names and shapes are compared first, so a learner who named an attribute differently from the class
    docstring is told which one.
    """
    info = k.info(remote)
    have = {**{n: tuple(s) for n, s in info.get("buffers", {}).items()}, **{n: tuple(s) for n, s in info.get("parameters", {}).items()}}
    want = {n: tuple(t.shape) for n, t in ref.state_dict().items()}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(info.get("parameters", {})) - set(want))
    if missing or extra:
        msg = f"{what}'s weights are not named as the class docstring says"
        if missing:
            msg += f"; missing: {missing[:6]}"
        if extra:
            msg += f"; not in the reference: {extra[:6]}"
        shared = [n for n in extra if "embed" in n or "head" in n]
        raise AssertionError(msg + f"\n  likely cause: {_names_hint(extra, missing, shared)}")
    bad = [f"{n} {have[n]} (expected {want[n]})" for n in want if have[n] != want[n]]
    assert_true(not bad, f"{what}: weights of the wrong shape: {bad[:4]}",
                hint="check the in/out sizes of each nn.Linear against the class docstring (nn.Linear(in, out) stores (out, in))")
    k.call(remote.to, dtype)
    k.call(remote.load_state_dict, {n: t.to(dtype) if t.is_floating_point() else t for n, t in ref.state_dict().items()})


def _names_hint(extra: list[str], missing: list[str], shared: list[str]) -> str:
    if shared:
        return "the MTP modules share the model's embedding and output head: no copies of their own"
    if any(n.endswith(".bias") and not n.endswith("gate.bias") for n in extra):
        return "the linear layers have no bias (nn.Linear(..., bias=False))"
    if any(".ffn.gate" in n or ".ffn.experts" in n for n in missing + extra):
        return "dense SwiGLU(cfg.dim, cfg.inter_dim) for layer_id < n_dense_layers, MoE(cfg.moe()) after"
    return "use the attribute names listed in the class docstring (the HF converter and the tests load weights by name)"


def close(got, want: torch.Tensor, *, name: str, atol: float, mistakes=None, hint: str | None = None) -> None:
    """``expect_close`` whose known mistakes (a function returning the dict) are computed only for a wrong answer."""
    expect_tensor(got, name, shape=tuple(want.shape))
    if matches(got, want, atol, 0.0):
        return
    expect_close(got, want, name=name, atol=atol, mistakes=mistakes() if callable(mistakes) else mistakes, hint=hint)

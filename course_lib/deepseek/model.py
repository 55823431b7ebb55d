"""DeepSeekV3Mini: DeepSeek-V3's architecture at laptop scale, with multi-token prediction (MTP).

The reference used by Section 5's hidden tests, its recorded experiments (``tools/train_checkpoints.py``)
and the HF transformers converter (``course_lib.deepseek.hf``).

Forward pass (DeepSeek-V3 report, arXiv 2412.19437, section 2.1; ``t`` the tokens, ``L`` layers)::

    h^0   = Emb(t)                                                     embed
    u^l   = h^(l-1) + MLA(attn_norm(h^(l-1)))                          pre-norm residual blocks
    h^l   = u^l + FFN^l(ffn_norm(u^l))        FFN = SwiGLU for l < n_dense_layers, DeepSeekMoE after
    P     = softmax(head(norm(h^L)))                                   final RMSNorm, output head

Multi-token prediction, depth k = 1..D (section 2.2, eqs. 21-25); position ``i`` predicts ``t_{i+k+1}``::

    h'^k_i = M_k [hnorm(h^(k-1)_i) ; enorm(Emb(t_{i+k}))]             M_k: (dim, 2 dim), ``proj``
    h^k    = TRM_k(h'^k)                                               one more transformer block
    P^k    = softmax(head(norm_k(h^k)))                                the SHARED embedding and head
    L      = L_main + (lambda / D) sum_k L_MTP^k + sum_layers alpha L_bal

``h^0`` here is the main model's last block output (before the final norm). The released checkpoint
stores MTP as layer 61 with ``eh_proj`` acting on ``[enorm(emb) ; hnorm(h)]`` (embedding first, as vLLM
and SGLang load it); ``course_lib.deepseek.hf`` swaps the two halves when it exports.

Training step: forward, backward, clip, optimiser step, then for every MoE layer the auxiliary-loss-free
bias update ``b_i += gamma * sign(mean_load - load_i)`` with the loads of *this* batch (V3 section 2.1.2).

Generation: prefill then one token at a time, every MLA layer on its absorbed path over a
``LatentKVCache`` (normalised ``c_KV`` and roped ``k_pe``: ``kv_lora_rank + qk_rope_head_dim`` numbers per
token per layer).

This module holds the reference answers of Section 5 (``TransformerBlock``, ``MTPModule``, ``DeepSeekV3Mini``,
``param_counts``, ``train_step``); a Section 5 grading kernel cannot import it. What the notebook gives around them
lives in ``course_lib.deepseek.model_config`` (``ModelConfig``, ``ModelOutput``, ``StepStats``, ``init_weights``,
``convert_to_fp8``, ``MHABaseline``) and ``course_lib.deepseek.training`` (``train``, ``evaluate``, ``routing_by_task``,
``mutual_information``, ``RECIPE``, ``RUNS``, ``record_run``, ``load_recorded_runs``); both are re-exported here, with
``train`` and ``record_run`` defaulting to the reference model and ``train_step``.

Interface::

    cfg = ModelConfig()                     # the laptop default; ModelConfig.v3() is the 671B model
    model = DeepSeekV3Mini(cfg)
    logits = model(tokens)                  # (B, T, vocab)
    out = model.compute_loss(inputs, targets)            # ModelOutput: loss, main, mtp, aux, infos
    stats = train_step(model, optimizer, inputs, targets)  # one step, bias update included
    tokens = model.generate(prompt, max_new_tokens=8)    # absorbed MLA + latent cache
    param_counts(cfg)                       # {"total", "active", "mtp", ...} without building the model
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from course_lib.deepseek.common import RMSNorm, SwiGLU
from course_lib.deepseek.mla import MLA, LatentKVCache
from course_lib.deepseek.model_config import (
    IGNORE_INDEX,
    MHABaseline,
    ModelConfig,
    ModelOutput,
    StepStats,
    convert_to_fp8,
    init_weights,
    masked_cross_entropy,
)
from course_lib.deepseek.moe import MoE, RoutingInfo, max_violation
from course_lib.deepseek.moe import param_counts as moe_param_counts
from course_lib.deepseek.training import (
    RECIPE,
    RUNS,
    TrainResult,
    build_run_model,
    checkpoint_dir,
    evaluate,
    load_recorded_runs,
    mutual_information,
    routing_by_task,
)
from course_lib.deepseek.training import record_run as _record_run
from course_lib.deepseek.training import train as _train
from course_lib.param_count import active_params, expert_params, mla_params_per_layer, total_params

__all__ = [
    "ModelConfig",
    "TransformerBlock",
    "MTPModule",
    "DeepSeekV3Mini",
    "ModelOutput",
    "StepStats",
    "param_counts",
    "init_weights",
    "convert_to_fp8",
    "train_step",
    "TrainResult",
    "train",
    "evaluate",
    "routing_by_task",
    "mutual_information",
    "MHABaseline",
    "checkpoint_dir",
    "IGNORE_INDEX",
    "RECIPE",
    "RUNS",
    "recipe_model",
    "record_run",
    "load_recorded_runs",
    "from_hf",
]

_ce = masked_cross_entropy
Tensor = torch.Tensor
OptCache = LatentKVCache | None
WithRouting = tuple[torch.Tensor, RoutingInfo | None]  # a block's output and its MoE's routing (None when dense)


# ---------------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------------


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of ``DeepSeekV3Mini(cfg)`` computed from the config alone (no tensors are allocated).

    The course's one convention (:mod:`course_lib.param_count`): ``total``: the main model (embedding, blocks, final
    norm, head), as DeepSeek reports it (671.0B for V3); ``active``: what one token multiplies with, i.e. ``total``
    minus the ``n_routed - n_activated`` routed experts it skips in every MoE layer and minus the embedding table, of
    which it reads one row (36.6B for V3, DeepSeek's "37B activated"); ``mtp``: the MTP modules on top, their shared
    embedding and head not counted again (11.6B for V3). The gate bias is a buffer, not a parameter.
    """
    d = cfg.dim
    attn = mla_params_per_layer(cfg)
    expert = expert_params(cfg)
    dense_ffn = 3 * d * cfg.inter_dim
    moe = moe_param_counts(cfg.moe())
    moe_total, moe_active = moe["total"], moe["active"]

    def block(layer_id: int) -> int:
        return 2 * d + attn + (moe_total if cfg.is_moe_layer(layer_id) else dense_ffn)  # attn_norm, ffn_norm

    embed = head = cfg.vocab_size * d
    total, active = total_params(cfg), active_params(cfg)
    mtp = sum(3 * d + 2 * d * d + block(cfg.n_layers + k) for k in range(cfg.mtp_depth))  # hnorm, enorm, norm, proj
    return {"total": total, "active": active, "mtp": mtp, "embedding": embed, "head": head, "attention_per_layer": attn,
            "dense_ffn_per_layer": dense_ffn, "moe_per_layer": moe_total, "moe_active_per_layer": moe_active,
            "expert": expert}


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-norm block: ``u = x + MLA(attn_norm(x))``, ``h = u + FFN(ffn_norm(u))`` (DeepSeek-V3 section 2.1).

    The FFN is a dense SwiGLU (``inter_dim``) for ``layer_id < n_dense_layers`` and DeepSeekMoE after.
    """

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        norm = functools.partial(RMSNorm, cfg.dim, cfg.rms_norm_eps)
        self.attn_norm = norm()
        self.attn = MLA(cfg.mla())
        self.ffn_norm = norm()
        self.ffn: nn.Module = SwiGLU(cfg.dim, cfg.inter_dim) if not cfg.is_moe_layer(layer_id) else MoE(cfg.moe())
        self.layer_id = layer_id

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(self, x: Tensor, start_pos: int = 0, cache: OptCache = None, *, absorb: bool = False) -> WithRouting:
        """x: (B, T, dim) at positions ``[start_pos, start_pos + T)`` -> (B, T, dim), and the MoE's routing info (None if dense)."""
        attended = self.attn(self.attn_norm(x), start_pos, cache, absorb=absorb)  # (B, T, dim)
        u = x + attended
        ffn_out = self.ffn(self.ffn_norm(u))
        y, info = ffn_out if self.is_moe else (ffn_out, None)  # an MoE answers (y, routing info), SwiGLU y alone
        return u + y, info


class MTPModule(nn.Module):
    """One MTP depth: ``h^k = TRM_k(M_k [hnorm(h^(k-1)) ; enorm(Emb(t_{i+k}))])`` (DeepSeek-V3 eq. 21-22).

    Embedding and output head are the main model's (shared, not owned here); ``norm`` is this depth's
    final RMSNorm before the shared head (``shared_head.norm`` in the released checkpoint).
    """

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        norm = functools.partial(RMSNorm, cfg.dim, cfg.rms_norm_eps)
        self.hnorm, self.enorm = norm(), norm()
        self.proj = nn.Linear(cfg.dim * 2, cfg.dim, bias=False)  # M_k: (dim, 2 dim)
        self.block = TransformerBlock(layer_id, cfg)
        self.norm = norm()

    def forward(self, h_prev: Tensor, emb_next: Tensor) -> WithRouting:
        """h_prev: (B, T', dim) previous depth's states, emb_next: (B, T', dim) embeddings of the tokens k ahead -> (B, T', dim)."""
        pair = (self.hnorm(h_prev), self.enorm(emb_next))  # the paper's order: state first, embedding second
        return self.block(self.proj(torch.cat(pair, dim=-1)))  # (B, T', 2 dim) -> (B, T', dim)


class DeepSeekV3Mini(nn.Module):
    """Embedding, ``n_layers`` blocks (dense FFN first, MoE after), final RMSNorm, output head, and
    ``mtp_depth`` MTP modules that share the embedding and the head (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([TransformerBlock(layer_id, cfg) for layer_id in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList([MTPModule(cfg.n_layers + depth, cfg) for depth in range(cfg.mtp_depth)])
        self.cfg = cfg
        if cfg.fp8:
            for part in (self.layers, self.mtp):
                convert_to_fp8(part)

    # ------------------------------------------------------------------ forward

    def _check_tokens(self, tokens: torch.Tensor, start_pos: int = 0) -> None:
        integer = tokens.dtype in (torch.int64, torch.int32)
        if not integer or tokens.dim() != 2:
            raise ValueError(f"tokens must be an integer tensor of shape (B, T), got {tuple(tokens.shape)} {tokens.dtype}")
        end = start_pos + tokens.shape[1]
        if end > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {end} exceed max_seq_len {self.cfg.max_seq_len}")

    def trunk(self, tokens: torch.Tensor, start_pos: int = 0, caches: Sequence[LatentKVCache] | None = None, *,
              absorb: bool = False) -> tuple[torch.Tensor, list[RoutingInfo]]:
        """Embedding and blocks: the last block's output (B, T, dim) before the final norm, and the MoE layers' routing."""
        self._check_tokens(tokens, start_pos)
        per_layer = caches if caches is not None else [None] * len(self.layers)
        h, routing = self.embed(tokens), []  # (B, T, dim)
        for layer, cache in zip(self.layers, per_layer):
            h, info = layer(h, start_pos, cache, absorb=absorb)
            routing += [info] if info is not None else []
        return h, routing

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm and the output head: (B, T, dim) -> (B, T, vocab)."""
        return self.head(self.norm(h))

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, caches: Sequence[LatentKVCache] | None = None, *,
                absorb: bool = False) -> torch.Tensor:
        """tokens: (B, T) at positions ``[start_pos, start_pos + T)`` -> next-token logits (B, T, vocab)."""
        return self.logits(self.trunk(tokens, start_pos, caches, absorb=absorb)[0])

    def mtp_forward(self, h: torch.Tensor, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[RoutingInfo]]:
        """MTP logits for depth k = 1..D: (B, T - k, vocab), position i predicting ``tokens[i + k + 1]``.

        ``h``: (B, T, dim) the main trunk's output for ``tokens`` (B, T).
        """
        n_pos = tokens.shape[1]
        all_logits, routing = [], []
        state = h
        for depth in range(1, min(len(self.mtp), n_pos - 1) + 1):
            module = self.mtp[depth - 1]
            n_pos -= 1  # depth k keeps positions 0 .. T - k - 1
            state, info = module(state[:, :n_pos], self.embed(tokens[:, depth:]))  # (B, T - k, dim)
            all_logits.append(self.head(module.norm(state)))  # the shared head, after this depth's own norm
            routing += [info] if info is not None else []
        return all_logits, routing

    def compute_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> ModelOutput:
        """``L = L_main + (lambda / D) sum_k L_MTP^k + sum alpha L_bal`` (DeepSeek-V3 eqs. 17-20, 25).

        inputs: (B, T) tokens; targets: (B, T) the next token at each position (``IGNORE_INDEX`` = no loss).
        Depth k reads ``targets[:, k:]``: position i's target there is token i + k + 1.
        """
        self._check_tokens(inputs)
        if targets.shape != inputs.shape:
            raise ValueError(f"targets must have the inputs' shape {tuple(inputs.shape)}, got {tuple(targets.shape)}")
        h, routing = self.trunk(inputs)
        logits = self.logits(h)  # (B, T, vocab)
        main = _ce(logits, targets)
        mtp_logits, mtp_routing = self.mtp_forward(h, inputs)
        routing = [*routing, *mtp_routing]
        zero = main.new_zeros(())
        per_depth = [_ce(lg, targets[:, depth:]) for depth, lg in enumerate(mtp_logits, start=1)]
        mtp = sum(per_depth, zero) / max(len(per_depth), 1)
        aux = sum((info.aux_loss.to(main.dtype) for info in routing), zero)
        return ModelOutput(main + self.cfg.mtp_lambda * mtp + aux, main, mtp, aux, logits, mtp_logits, routing)

    # ------------------------------------------------------------------ balancing and counting

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer in the order of ``ModelOutput.infos``: main blocks, then MTP blocks."""
        ffns = [layer.ffn for layer in self.layers] + [module.block.ffn for module in self.mtp]
        return [ffn for ffn in ffns if isinstance(ffn, MoE)]

    @torch.no_grad()
    def update_biases(self, loads: Sequence[torch.Tensor], gamma: float | None = None) -> None:
        """Auxiliary-loss-free balancing for every MoE layer: ``b_i += gamma * sign(mean_load - load_i)``."""
        layers = self.moe_layers()
        if len(loads) != len(layers):
            raise ValueError(f"got {len(loads)} loads for {len(layers)} MoE layers")
        for moe, load in zip(layers, loads):
            moe.update_bias(load, gamma)

    def num_parameters(self, *, active: bool = False, mtp: bool = False) -> int:
        """Counted from the modules: the main model's parameters (``mtp=True``: the MTP modules' only);
        ``active`` subtracts the routed experts a token skips and (main model) the embedding table, of which a token
        reads one row (the course's convention, :mod:`course_lib.param_count`)."""
        count = 0
        for name, p in self.named_parameters():
            if name.startswith("mtp.") == mtp:
                count += p.numel()
        if not active:
            return count
        if not mtp:
            count -= self.embed.weight.numel()
        blocks = [module.block for module in self.mtp] if mtp else list(self.layers)
        for moe in (b.ffn for b in blocks if b.is_moe):
            skipped = moe.cfg.n_routed_experts - moe.cfg.n_activated_experts
            count -= skipped * sum(p.numel() for p in moe.experts[0].parameters())
        return count

    def new_caches(self, batch: int, max_seq_len: int | None = None) -> list[LatentKVCache]:
        """One empty ``LatentKVCache`` per layer (c_KV and k_pe only)."""
        return [layer.attn.new_cache(batch, max_seq_len) for layer in self.layers]

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, absorb: bool = True, use_cache: bool = True,
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue ``prompt`` (B, T0) by ``max_new_tokens`` tokens -> (B, T0 + max_new_tokens).

        Prefill the prompt into one ``LatentKVCache`` per layer, then feed one token at a time at position
        ``T0 + step``, every MLA layer on its absorbed path (``absorb=False``: the naive path over the same
        latent cache; ``use_cache=False``: re-run the whole sequence each step). ``temperature=0``: greedy.
        """
        self._check_tokens(prompt)
        n_prompt = prompt.shape[1]
        length = n_prompt + max_new_tokens
        if length > self.cfg.max_seq_len:
            raise ValueError(f"prompt + new tokens = {length} exceeds max_seq_len {self.cfg.max_seq_len}")
        mode = self.training
        self.train(False)
        out = [prompt]
        try:
            if not use_cache:
                for _ in range(max_new_tokens):
                    seq = torch.cat(out, dim=1)
                    out.append(_sample(self(seq)[:, -1], temperature, generator))  # recompute everything
                return torch.cat(out, dim=1)
            caches = self.new_caches(prompt.shape[0], length)
            step_logits = self(prompt, 0, caches, absorb=absorb)[:, -1]  # (B, vocab): prefill
            for pos in range(n_prompt, length):
                out.append(_sample(step_logits, temperature, generator))  # (B, 1): the token at position pos
                if pos + 1 < length:
                    step_logits = self(out[-1], pos, caches, absorb=absorb)[:, -1]  # decode one position
            return torch.cat(out, dim=1)
        finally:
            self.train(mode)


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy (temperature 0) or sampled next tokens (B, 1) from logits (B, vocab)."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def train_step(model: DeepSeekV3Mini, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor, *,
               clip_norm: float = 1.0, balance: bool = True, amp_dtype: torch.dtype | None = None) -> StepStats:
    """One step: loss (main + lambda MTP + balance), backward, clip, optimiser step, THEN the bias update
    of every MoE layer with this batch's loads (``balance=False`` skips it: the collapse experiment).

    ``amp_dtype`` (``torch.bfloat16``/``torch.float16``) runs the forward pass under autocast, entered and left
    in every step: autocast caches its low-precision copies of the weights until its context exits, so one
    context around a whole training loop keeps computing with the first step's weights (the model barely learns).
    """
    model.train()
    with torch.autocast(inputs.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        out = model.compute_loss(inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    loads = [info.load.detach() for info in out.infos]
    if balance:
        model.update_biases(loads)
    return StepStats(out.loss.item(), out.main_loss.item(), out.mtp_loss.item(), out.aux_loss.item(), grad_norm.item(), loads,
                     [max_violation(load) for load in loads])


def train(model: DeepSeekV3Mini, data, *, steps: int = 300, batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 0.0,
          warmup: int = 20, seed: int = 0, balance: bool = True, eval_every: int = 25, target: float | None = None,
          target_metric: str = "token_acc", stop_at_target: bool = False, monitor=None,
          step_fn: Callable | None = None, eval_batch: int = 512, amp_dtype: torch.dtype | None = None) -> TrainResult:
    """``course_lib.deepseek.training.train`` with the reference ``train_step`` unless ``step_fn`` is given.

    ``amp_dtype`` trains the reference step under autocast, entered per step (see ``train_step``).
    """
    if step_fn is None:
        step_fn = functools.partial(train_step, amp_dtype=amp_dtype) if amp_dtype is not None else train_step
    return _train(model, data, step_fn=step_fn, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                  warmup=warmup, seed=seed, balance=balance, eval_every=eval_every, target=target, target_metric=target_metric,
                  stop_at_target=stop_at_target, monitor=monitor, eval_batch=eval_batch)


def recipe_model(seed: int = 0, **overrides) -> tuple[DeepSeekV3Mini, object]:
    """The reference model and data of ``RECIPE`` (``overrides`` change ``ModelConfig`` fields)."""
    return build_run_model(DeepSeekV3Mini, seed, **overrides)


def record_run(name: str, steps: int = 600, seed: int = 0, load_every: int = 5, *,
               model_cls: Callable[[ModelConfig], nn.Module] | None = None, step_fn: Callable | None = None) -> dict:
    """``course_lib.deepseek.training.record_run``, by default with the reference model and ``train_step``."""
    return _record_run(name, steps, seed, load_every, model_cls=model_cls or DeepSeekV3Mini, step_fn=step_fn or train_step)


@torch.no_grad()
def from_hf(hf_model, **overrides) -> DeepSeekV3Mini:
    """A ``DeepSeekV3Mini`` (no MTP) holding a ``DeepseekV3ForCausalLM``'s weights, in its dtype, in eval mode.

    (It builds the reference model, so it lives here rather than in ``course_lib.deepseek.hf``, which a Section 5
    kernel may import.)
    """
    from course_lib.deepseek.hf import state_dict_from_hf

    cfg, sd = state_dict_from_hf(hf_model, **overrides)
    dtype = next(hf_model.parameters()).dtype
    model = DeepSeekV3Mini(cfg).to(dtype)
    model.load_state_dict({k: v.to(torch.float32 if k.endswith("gate.bias") else dtype) for k, v in sd.items()}, strict=True)
    return model.eval()

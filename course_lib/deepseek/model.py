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

Section 5's recorded comparison runs (``RECIPE``, ``RUNS``, ``record_run``) live at the end of this file.

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

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.deepseek.common import RMSNorm, SwiGLU
from course_lib.deepseek.mla import MLA, LatentKVCache, MLAConfig
from course_lib.deepseek.moe import MoE, MoEConfig, RoutingInfo, max_violation

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
]

IGNORE_INDEX = -100


@dataclass
class ModelConfig:
    """Sizes of DeepSeekV3Mini. Field names follow DeepSeek's ``ModelArgs``.

    The default trains on a laptop CPU in well under a minute on ``course_lib.data.MultiTaskLanguage``;
    ``ModelConfig.v3()`` is DeepSeek-V3 (671B), for parameter counts only.
    """

    vocab_size: int = 18
    dim: int = 64
    n_layers: int = 2
    n_dense_layers: int = 1  # first k layers use a dense SwiGLU FFN (HF: first_k_dense_replace)
    n_heads: int = 4
    inter_dim: int = 128  # dense FFN width
    q_lora_rank: int = 32  # 0: no query compression
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    moe_inter_dim: int = 32
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    route_scale: float = 1.0
    bias_update_speed: float = 1e-3  # gamma of the auxiliary-loss-free balancing
    seq_aux_alpha: float = 1e-4  # alpha of the complementary sequence-wise balance loss
    group_mask_fill: float = float("-inf")
    mtp_depth: int = 1  # D; 0 disables multi-token prediction
    mtp_lambda: float = 0.3
    max_seq_len: int = 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    fp8: bool = False  # FP8 (emulated on CPU) GEMMs in every linear layer of the blocks

    def __post_init__(self) -> None:
        if not 0 <= self.n_dense_layers <= self.n_layers or self.n_layers < 1:
            raise ValueError(f"need n_layers >= 1 and 0 <= n_dense_layers <= n_layers, got {self.n_layers}, {self.n_dense_layers}")
        if self.mtp_depth < 0:
            raise ValueError(f"mtp_depth must be >= 0, got {self.mtp_depth}")
        if self.max_seq_len > 4096:
            raise ValueError("max_seq_len above 4096 would need YaRN, which the course's MLA does not implement")
        self.moe()  # validates the routing fields

    @classmethod
    def v3(cls) -> ModelConfig:
        """DeepSeek-V3 (``inference/configs/config_671B.json``): 61 layers, first 3 dense, 256 experts, top-8."""
        return cls(vocab_size=129280, dim=7168, n_layers=61, n_dense_layers=3, n_heads=128, inter_dim=18432, q_lora_rank=1536,
                   kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, moe_inter_dim=2048,
                   n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8, n_limited_groups=4,
                   route_scale=2.5, mtp_depth=1, mtp_lambda=0.3, max_seq_len=4096)

    def mla(self) -> MLAConfig:
        return MLAConfig(dim=self.dim, n_heads=self.n_heads, q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                         qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
                         max_seq_len=self.max_seq_len, rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps)

    def moe(self) -> MoEConfig:
        return MoEConfig(dim=self.dim, moe_inter_dim=self.moe_inter_dim, n_routed_experts=self.n_routed_experts,
                         n_shared_experts=self.n_shared_experts, n_activated_experts=self.n_activated_experts,
                         n_expert_groups=self.n_expert_groups, n_limited_groups=self.n_limited_groups, route_scale=self.route_scale,
                         score_func="sigmoid", bias_update_speed=self.bias_update_speed, seq_aux_alpha=self.seq_aux_alpha,
                         group_mask_fill=self.group_mask_fill)

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layers ``n_dense_layers, ...`` (MTP blocks included) use DeepSeekMoE; the first ones a dense FFN."""
        return layer_id >= self.n_dense_layers


# ---------------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------------


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of ``DeepSeekV3Mini(cfg)`` computed from the config alone (no tensors are allocated).

    ``total``: the main model (embedding, blocks, final norm, head), as DeepSeek reports it (671B for
    V3); ``active``: what one token uses, i.e. ``total`` minus the ``n_routed - n_activated`` routed experts
    it skips in every MoE layer (37.5B for V3, "37B activated"); ``mtp``: the MTP modules on top, their
    shared embedding and head not counted again (11.6B for V3). The gate bias is a buffer, not a parameter.
    """
    d, H = cfg.dim, cfg.n_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank:
        attn_q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk  # wq_a, q_norm, wq_b
    else:
        attn_q = d * H * qk  # wq
    attn = (attn_q + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank  # wkv_a, kv_norm
            + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * d)  # wkv_b, wo
    expert = 3 * d * cfg.moe_inter_dim
    dense_ffn = 3 * d * cfg.inter_dim
    moe_total = cfg.n_routed_experts * d + cfg.n_shared_experts * expert + cfg.n_routed_experts * expert
    moe_active = moe_total - (cfg.n_routed_experts - cfg.n_activated_experts) * expert

    def block(layer_id: int, active: bool) -> int:
        ffn = (moe_active if active else moe_total) if cfg.is_moe_layer(layer_id) else dense_ffn
        return 2 * d + attn + ffn  # attn_norm, ffn_norm

    embed = head = cfg.vocab_size * d
    total = embed + head + d + sum(block(i, False) for i in range(cfg.n_layers))
    active = embed + head + d + sum(block(i, True) for i in range(cfg.n_layers))
    mtp = sum(3 * d + 2 * d * d + block(cfg.n_layers + k, False) for k in range(cfg.mtp_depth))  # hnorm, enorm, norm, proj
    return {"total": total, "active": active, "mtp": mtp, "embedding": embed, "head": head, "attention_per_layer": attn,
            "dense_ffn_per_layer": dense_ffn, "moe_per_layer": moe_total, "moe_active_per_layer": moe_active}


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-norm block: ``u = x + MLA(attn_norm(x))``, ``h = u + FFN(ffn_norm(u))`` (DeepSeek-V3 section 2.1).

    The FFN is a dense SwiGLU (``inter_dim``) for ``layer_id < n_dense_layers`` and DeepSeekMoE after.
    """

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.attn = MLA(cfg.mla())
        self.ffn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.ffn: nn.Module = MoE(cfg.moe()) if cfg.is_moe_layer(layer_id) else SwiGLU(cfg.dim, cfg.inter_dim)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: LatentKVCache | None = None, *,
                absorb: bool = False) -> tuple[torch.Tensor, RoutingInfo | None]:
        """x: (B, T, dim) at positions ``[start_pos, start_pos + T)`` -> (B, T, dim), and the MoE's routing info (None if dense)."""
        u = x + self.attn(self.attn_norm(x), start_pos, cache, absorb=absorb)  # (B, T, dim)
        if self.is_moe:
            y, info = self.ffn(self.ffn_norm(u))  # (B, T, dim)
            return u + y, info
        return u + self.ffn(self.ffn_norm(u)), None


class MTPModule(nn.Module):
    """One MTP depth: ``h^k = TRM_k(M_k [hnorm(h^(k-1)) ; enorm(Emb(t_{i+k}))])`` (DeepSeek-V3 eq. 21-22).

    Embedding and output head are the main model's (shared, not owned here); ``norm`` is this depth's
    final RMSNorm before the shared head (``shared_head.norm`` in the released checkpoint).
    """

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.hnorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.enorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)  # M_k
        self.block = TransformerBlock(layer_id, cfg)
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo | None]:
        """h_prev: (B, T', dim) previous depth's states, emb_next: (B, T', dim) embeddings of the tokens k ahead -> (B, T', dim)."""
        x = self.proj(torch.cat([self.hnorm(h_prev), self.enorm(emb_next)], dim=-1))  # (B, T', 2 dim) -> (B, T', dim)
        return self.block(x)


@dataclass
class ModelOutput:
    """What ``compute_loss`` returns. ``infos``: routing of every MoE layer, main blocks first, then MTP blocks."""

    loss: torch.Tensor
    main_loss: torch.Tensor
    mtp_loss: torch.Tensor
    aux_loss: torch.Tensor
    logits: torch.Tensor
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    infos: list[RoutingInfo] = field(default_factory=list)


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not IGNORE_INDEX (0 when there is none)."""
    if not bool((targets != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


class DeepSeekV3Mini(nn.Module):
    """Embedding, ``n_layers`` blocks (dense FFN first, MoE after), final RMSNorm, output head, and
    ``mtp_depth`` MTP modules that share the embedding and the head (see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg.n_layers + k, cfg) for k in range(cfg.mtp_depth))
        if cfg.fp8:
            convert_to_fp8(self.layers)
            convert_to_fp8(self.mtp)

    # ------------------------------------------------------------------ forward

    def _check_tokens(self, tokens: torch.Tensor, start_pos: int = 0) -> None:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (B, T), got {tuple(tokens.shape)} {tokens.dtype}")
        if start_pos + tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start_pos + tokens.shape[1]} exceed max_seq_len {self.cfg.max_seq_len}")

    def trunk(self, tokens: torch.Tensor, start_pos: int = 0, caches: Sequence[LatentKVCache] | None = None, *,
              absorb: bool = False) -> tuple[torch.Tensor, list[RoutingInfo]]:
        """Embedding and blocks: the last block's output (B, T, dim) before the final norm, and the MoE layers' routing."""
        self._check_tokens(tokens, start_pos)
        h = self.embed(tokens)  # (B, T, dim)
        infos = []
        for i, layer in enumerate(self.layers):
            h, info = layer(h, start_pos, None if caches is None else caches[i], absorb=absorb)
            if info is not None:
                infos.append(info)
        return h, infos

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, caches: Sequence[LatentKVCache] | None = None, *,
                absorb: bool = False) -> torch.Tensor:
        """tokens: (B, T) at positions ``[start_pos, start_pos + T)`` -> next-token logits (B, T, vocab)."""
        h, _ = self.trunk(tokens, start_pos, caches, absorb=absorb)
        return self.head(self.norm(h))  # (B, T, vocab)

    def mtp_forward(self, h: torch.Tensor, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[RoutingInfo]]:
        """MTP logits for depth k = 1..D: (B, T - k, vocab), position i predicting ``tokens[i + k + 1]``.

        ``h``: (B, T, dim) the main trunk's output for ``tokens`` (B, T).
        """
        T = tokens.shape[1]
        logits, infos = [], []
        for k, module in enumerate(self.mtp, start=1):
            if T - k < 1:
                break
            h, info = module(h[:, : T - k], self.embed(tokens[:, k:]))  # (B, T - k, dim)
            logits.append(self.head(module.norm(h)))  # (B, T - k, vocab): the shared head
            if info is not None:
                infos.append(info)
        return logits, infos

    def compute_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> ModelOutput:
        """``L = L_main + (lambda / D) sum_k L_MTP^k + sum alpha L_bal`` (DeepSeek-V3 eqs. 17-20, 25).

        inputs: (B, T) tokens; targets: (B, T) the next token at each position (``IGNORE_INDEX`` = no loss).
        Depth k reads ``targets[:, k:]``: position i's target there is token i + k + 1.
        """
        self._check_tokens(inputs)
        if targets.shape != inputs.shape:
            raise ValueError(f"targets must have the inputs' shape {tuple(inputs.shape)}, got {tuple(targets.shape)}")
        h, infos = self.trunk(inputs)
        logits = self.head(self.norm(h))  # (B, T, vocab)
        main = _ce(logits, targets)
        mtp_logits, mtp_infos = self.mtp_forward(h, inputs)
        infos = infos + mtp_infos
        mtp = sum((_ce(lg, targets[:, k:]) for k, lg in enumerate(mtp_logits, start=1)), main.new_zeros(()))
        mtp = mtp / max(len(mtp_logits), 1)
        aux = sum((info.aux_loss.to(main.dtype) for info in infos), main.new_zeros(()))
        loss = main + self.cfg.mtp_lambda * mtp + aux
        return ModelOutput(loss, main, mtp, aux, logits, mtp_logits, infos)

    # ------------------------------------------------------------------ balancing and counting

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer in the order of ``ModelOutput.infos``: main blocks, then MTP blocks."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

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
        ``active`` subtracts the routed experts a token skips."""
        params = self.mtp.parameters() if mtp else (p for n, p in self.named_parameters() if not n.startswith("mtp."))
        n = sum(p.numel() for p in params)
        if active:
            layers = [m.block.ffn for m in self.mtp] if mtp else [b.ffn for b in self.layers]
            for moe in layers:
                if isinstance(moe, MoE):
                    per_expert = sum(p.numel() for p in moe.experts[0].parameters())
                    n -= (moe.cfg.n_routed_experts - moe.cfg.n_activated_experts) * per_expert
        return n

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
        B, T0 = prompt.shape
        total = T0 + max_new_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(f"prompt + new tokens = {total} exceeds max_seq_len {self.cfg.max_seq_len}")
        was_training = self.training
        self.eval()
        try:
            tokens = prompt
            caches = self.new_caches(B, total) if use_cache else None
            if use_cache:
                logits = self(prompt, 0, caches, absorb=absorb)[:, -1]  # (B, vocab) prefill
            for step in range(max_new_tokens):
                if not use_cache:
                    logits = self(tokens)[:, -1]  # (B, vocab)
                nxt = _sample(logits, temperature, generator)  # (B, 1)
                tokens = torch.cat([tokens, nxt], dim=1)  # (B, T0 + step + 1)
                if use_cache and step + 1 < max_new_tokens:
                    logits = self(nxt, T0 + step, caches, absorb=absorb)[:, -1]  # (B, vocab) decode one position
        finally:
            self.train(was_training)
        return tokens


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy (temperature 0) or sampled next tokens (B, 1) from logits (B, vocab)."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


# ---------------------------------------------------------------------------------------------------
# Initialisation and FP8
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Deterministic initialisation that depends only on parameter *names* (not on construction order).

    Every matrix ~ N(0, std) (HF's ``initializer_range``), output projections (``wo``, ``w2``) scaled by
    ``1 / sqrt(2 n_layers)`` (GPT-2), RMSNorm weights 1, gate biases 0. Parameter ``name`` draws from a
    generator seeded with ``seed`` and the name, so two implementations with the same names start equal.
    """
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", 1)
    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed((seed * 1_000_003 + _stable_hash(name)) % (2**63))
        if p.dim() == 1:
            p.fill_(1.0)  # RMSNorm weights
            continue
        s = std / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul_(s).to(p.dtype))
    for name, b in model.named_buffers():
        if name.endswith("gate.bias"):
            b.zero_()
    return model


def _stable_hash(s: str) -> int:
    """A hash that is the same in every Python process (``hash`` of a str is randomised)."""
    h = 1469598103934665603
    for ch in s.encode():
        h = ((h ^ ch) * 1099511628211) % (2**64)
    return h


def convert_to_fp8(module: nn.Module, recipe: str = "auto") -> nn.Module:
    """Swap every ``nn.Linear`` under ``module`` for an ``FP8Linear`` (FP8 GEMMs, FP32 master weights), in place.

    DeepSeek-V3 keeps the embedding, output head, router gate, norms and the attention core in higher
    precision: call this on the blocks only (``DeepSeekV3Mini(cfg)`` with ``cfg.fp8`` does).
    """
    from course_lib.deepseek.fp8 import FP8Linear

    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, FP8Linear.from_linear(child, recipe=recipe))
        else:
            convert_to_fp8(child, recipe)
    return module


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    """One training step: losses, gradient norm (before clipping), and each MoE layer's load and MaxVio."""

    loss: float
    main_loss: float
    mtp_loss: float
    aux_loss: float
    grad_norm: float
    loads: list[torch.Tensor]
    max_vio: list[float]


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


@torch.no_grad()
def evaluate(model: DeepSeekV3Mini, data, batch: int = 512, seed: int = 1234) -> dict[str, float]:
    """Main loss and greedy answer accuracy (token, sequence, per task) on a fixed held-out batch."""
    from course_lib.data import answer_accuracy, per_task_accuracy

    was = model.training
    model.eval()
    b = data.sample(batch, torch.Generator().manual_seed(seed))
    logits = model(b.inputs)
    out = {"loss": float(_ce(logits, b.targets)), **answer_accuracy(logits, b)}
    out.update({f"acc_{k}": v for k, v in per_task_accuracy(logits, b).items()})
    model.train(was)
    return out


@dataclass
class TrainResult:
    """History of a ``train`` run: per-step metrics, periodic evaluations, and when the target was reached."""

    config: dict
    history: dict[str, list[float]]
    evals: list[dict[str, float]]
    steps_to_target: int | None
    seconds: float
    tokens_per_s: float


def train(model: DeepSeekV3Mini, data, *, steps: int = 300, batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 0.0,
          warmup: int = 20, seed: int = 0, balance: bool = True, eval_every: int = 25, target: float | None = None,
          target_metric: str = "token_acc", stop_at_target: bool = False, monitor=None,
          step_fn: Callable | None = None, eval_batch: int = 512, amp_dtype: torch.dtype | None = None) -> TrainResult:
    """Train on fresh batches of ``data`` (a ``MultiTaskLanguage``) with AdamW, linear warm-up then constant lr.

    Evaluates every ``eval_every`` steps; ``steps_to_target`` is the first evaluated step whose
    ``target_metric`` reaches ``target``. ``monitor`` (a ``course_lib.viz.TrainingMonitor``) gets loss,
    gradient norm, MaxVio and tokens/s every step. ``step_fn`` replaces ``train_step`` (same signature; it may
    return a dict with ``StepStats``' fields). ``amp_dtype`` trains under autocast, per step (see ``train_step``).
    """
    import functools
    import time

    step_fn = step_fn or (functools.partial(train_step, amp_dtype=amp_dtype) if amp_dtype is not None else train_step)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    keys = ("loss", "main_loss", "mtp_loss", "aux_loss", "grad_norm", "max_vio", "tokens_per_s")
    hist: dict[str, list[float]] = {k: [] for k in keys}
    hist["load"] = []
    evals: list[dict[str, float]] = []
    reached = None
    t_start = time.perf_counter()
    n_tokens = 0
    for step in range(1, steps + 1):
        b = data.sample(batch_size, gen)
        t0 = time.perf_counter()
        st = step_fn(model, opt, b.inputs, b.targets, **({} if balance else {"balance": False}))
        if isinstance(st, dict):  # a learner's train_step returns a dict with StepStats' fields
            st = StepStats(**{k: st[k] for k in StepStats.__dataclass_fields__})
        sched.step()
        dt = time.perf_counter() - t0
        n_tokens += b.inputs.numel()
        vals = {"loss": st.loss, "main_loss": st.main_loss, "mtp_loss": st.mtp_loss, "aux_loss": st.aux_loss,
                "grad_norm": st.grad_norm, "max_vio": max(st.max_vio) if st.max_vio else 0.0, "tokens_per_s": b.inputs.numel() / dt}
        for k in keys:
            hist[k].append(vals[k])
        hist["load"].append([ld.tolist() for ld in st.loads])
        if step % eval_every == 0 or step == steps:
            ev = {"step": step, **evaluate(model, data, batch=eval_batch)}
            evals.append(ev)
            if target is not None and reached is None and ev[target_metric] >= target:
                reached = step
        if monitor is not None:
            monitor.update(step, **{k: vals[k] for k in monitor.metrics if k in vals})
        if stop_at_target and reached is not None:
            break
    seconds = time.perf_counter() - t_start
    return TrainResult(asdict(model.cfg), hist, evals, reached, seconds, n_tokens / seconds)


@torch.no_grad()
def routing_by_task(model: DeepSeekV3Mini, data, per_task: int = 128, seed: int = 4321) -> torch.Tensor:
    """Expert specialisation: (n_moe_layers, n_tasks, n_experts) share of each task's answer-region
    assignments that go to each expert (rows sum to 1), measured on fresh problems."""
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for task in data.TASKS:
        b = data.sample(per_task, gen, task=task)
        _, infos = model.trunk(b.inputs)
        mask = b.answer_mask.reshape(-1)  # (B*T,)
        per_layer = []
        for info in infos:
            idx = info.indices[mask]  # (n, K)
            counts = torch.bincount(idx.reshape(-1), minlength=model.cfg.n_routed_experts).double()
            per_layer.append(counts / counts.sum())
        rows.append(torch.stack(per_layer))  # (n_layers, E)
    model.train(was)
    return torch.stack(rows, dim=1)  # (n_layers, n_tasks, E)


def mutual_information(share: torch.Tensor | Sequence) -> float:
    """I(task; expert) in bits from a (tasks, experts) matrix whose rows are routing shares (tasks equally likely).

    0 when every task routes alike; ``log2(n_tasks)`` when the tasks use disjoint experts.
    """
    p = torch.as_tensor(share, dtype=torch.float64)
    joint = p / p.sum()  # (tasks, experts)
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * torch.log2(joint[nz] / outer[nz])).sum())


# ---------------------------------------------------------------------------------------------------
# A dense multi-head-attention baseline of the same width (memory comparison)
# ---------------------------------------------------------------------------------------------------


class MHABaseline(nn.Module):
    """A standard decoder (MHA with RoPE on the whole head, dense SwiGLU FFN) of width ``cfg.dim``:
    the baseline of the memory experiment. ``head_dim`` defaults to ``qk_nope_head_dim + qk_rope_head_dim``."""

    def __init__(self, cfg: ModelConfig, head_dim: int | None = None, inter_dim: int | None = None) -> None:
        super().__init__()
        from course_lib.deepseek.mla import MultiHeadAttention

        self.cfg = cfg
        hd = head_dim or cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.attn_norms = nn.ModuleList(RMSNorm(cfg.dim, cfg.rms_norm_eps) for _ in range(cfg.n_layers))
        self.attns = nn.ModuleList(MultiHeadAttention(cfg.dim, cfg.n_heads, hd, max_seq_len=cfg.max_seq_len, rope_theta=cfg.rope_theta)
                                   for _ in range(cfg.n_layers))
        self.ffn_norms = nn.ModuleList(RMSNorm(cfg.dim, cfg.rms_norm_eps) for _ in range(cfg.n_layers))
        self.ffns = nn.ModuleList(SwiGLU(cfg.dim, inter_dim or cfg.inter_dim) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def new_caches(self, batch: int, max_seq_len: int | None = None):
        return [a.new_cache(batch, max_seq_len) for a in self.attns]

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, caches=None) -> torch.Tensor:
        h = self.embed(tokens)  # (B, T, dim)
        for i in range(len(self.attns)):
            h = h + self.attns[i](self.attn_norms[i](h), start_pos, None if caches is None else caches[i])
            h = h + self.ffns[i](self.ffn_norms[i](h))
        return self.head(self.norm(h))  # (B, T, vocab)


def checkpoint_dir() -> Path:
    """The course's recorded runs (``make checkpoints`` writes them): ``course_lib/checkpoints``.

    They live inside the package because a grading kernel sees only the installed ``course_lib``
    (``course_lib.sandbox``), not the rest of the repository.
    """
    return Path(__file__).resolve().parents[1] / "checkpoints"



# ---------------------------------------------------------------------------------------------------
# The recorded experiments of Section 5 (tools/train_checkpoints.py, ``make checkpoints``)
# ---------------------------------------------------------------------------------------------------

#: The notebook's training recipe: data, initialisation and optimiser settings shared by every run.
RECIPE = {"n_digits": 4, "batch_size": 64, "lr": 5e-3, "warmup": 20, "init_std": 0.05, "eval_every": 25}

#: Config overrides (and the ``balance`` switch) of each recorded run.
RUNS: dict[str, dict] = {
    "baseline": {},
    "no_balance": {"seq_aux_alpha": 0.0, "balance": False},
    "no_mtp": {"mtp_depth": 0},
    "fp8": {"fp8": True},
}


def recipe_model(seed: int = 0, **overrides) -> tuple[DeepSeekV3Mini, object]:
    """The model and data of ``RECIPE`` (``overrides`` change ``ModelConfig`` fields)."""
    from course_lib.data import MultiTaskLanguage

    data = MultiTaskLanguage(n_digits=RECIPE["n_digits"])
    cfg = ModelConfig(vocab_size=data.vocab_size, **overrides)
    return init_weights(DeepSeekV3Mini(cfg), seed, std=RECIPE["init_std"]), data


def record_run(name: str, steps: int = 600, seed: int = 0, load_every: int = 5) -> dict:
    """Train the ``RUNS[name]`` variant for ``steps`` and return what the notebook plots (JSON-ready)."""
    over = dict(RUNS[name])
    balance = over.pop("balance", True)
    model, data = recipe_model(seed, **over)
    res = train(model, data, steps=steps, batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], warmup=RECIPE["warmup"], seed=seed,
                balance=balance, eval_every=RECIPE["eval_every"])
    loads = res.history["load"]  # (steps, n_moe, E)
    r4 = lambda xs: [round(float(x), 4) for x in xs]
    return {
        "name": name, "seed": seed, "steps": steps, "config": res.config, "balance": balance, "seconds": round(res.seconds, 1),
        "loss": r4(res.history["loss"]), "main_loss": r4(res.history["main_loss"]), "mtp_loss": r4(res.history["mtp_loss"]),
        "max_vio": r4(res.history["max_vio"]),
        "max_vio_per_layer": [r4(max_violation(torch.tensor(layer)) for layer in step) for step in loads],
        "load_steps": list(range(1, steps + 1, load_every)),
        "loads": [[[int(v) for v in layer] for layer in loads[s - 1]] for s in range(1, steps + 1, load_every)],
        "evals": [{k: round(float(v), 4) for k, v in e.items()} for e in res.evals],
        "routing_by_task": [[r4(row) for row in layer] for layer in routing_by_task(model, data).tolist()],
        "gate_bias": [r4(moe.gate.bias.tolist()) for moe in model.moe_layers()],
    }


def load_recorded_runs(path: Path | str | None = None) -> dict | None:
    """The recorded runs (``checkpoints/05_integration_runs.json``), or None when the file is missing."""
    import json

    path = Path(path) if path else checkpoint_dir() / "05_integration_runs.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())

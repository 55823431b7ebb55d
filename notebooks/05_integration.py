# %% [markdown]
# # Section 5 — Integration: DeepSeekV3Mini
#
# Sections 2–4 built DeepSeek-V3's three new parts in isolation: Multi-head Latent Attention, DeepSeekMoE and
# FP8 training. A part that passes its unit tests can still fail inside a model: a norm in the wrong place, a
# routing bias that never moves, a cache that is never read. This section assembles the parts into
# **DeepSeekV3Mini**, the DeepSeek-V3 architecture at laptop scale with multi-token prediction (MTP). You train it
# on a CPU in under a minute, check it the way one checks a real model, and load your weights into Hugging Face
# transformers' `DeepseekV3ForCausalLM` to confirm it is the same network.
#
# **Learning objectives.** After this section you can
# - assemble pre-norm Transformer blocks from MLA and a dense or MoE feed-forward layer, and stack them into a model
#   with a multi-token-prediction module that shares the embedding and the output head;
# - count total and active parameters from a config (671B and 37B for DeepSeek-V3), on top of Section 3's MoE count;
# - decode with the absorbed MLA path over the latent KV cache;
# - write a training step with the main, MTP and balance losses and the bias update after the optimiser step;
# - validate a model end to end (causality, gradient flow, memory, expert specialisation, load balance, MTP, FP8)
#   and check parity with a reference implementation.
#
# **Time:** core path about 160 min; deep dives 40 min.
#
# **Prerequisites:** Sections 2
# (MLA, latent cache, absorption) and 3 (DeepSeekMoE routing and balancing); Section 4 for the FP8 comparison.
#
# **Your parts.** The model is built from *your* MLA and MoE: the last cell of Sections 2 and 3 saved them to
# `my_deepseek/`, and the first cell below loads them, checks each against the course's version in float64 and says
# in one line which one it uses. A part that is missing or disagrees is replaced by the course's, so an unfinished
# Section 2 never blocks this one (grading always uses the course's parts: each section is graded on its own).
# Section 5.3.2 trains your model next to one built from the course's parts. Your Section 4 `FP8LinearFunction` is
# checked the same way (float32, against the course's `FP8Linear`) and runs the FP8 training run of 5.3.4 when you
# retrain it there.

# %% [given]
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import viz
from course_lib.bench import peak_memory
from course_lib.data import IGNORE_INDEX, MultiTaskLanguage
from course_lib.deepseek.common import RMSNorm, SwiGLU
from course_lib.deepseek.mla import MLA as CourseMLA
from course_lib.deepseek.mla import LatentKVCache
from course_lib.deepseek.model_config import ModelConfig, ModelOutput, init_weights
from course_lib.deepseek.moe import MoE as CourseMoE
from course_lib.deepseek.moe import RoutingInfo, max_violation
from course_lib.deepseek.training import RECIPE
from course_lib.my_model import bound, fp8_linear, moe_counter, section5_parts
from course_lib.utils import env_report, setup, sizes

setup(seed=0)
ENV = env_report(threads=1)  # the matrices here are tiny: one thread beats two that wait on each other
print(ENV)

# Your MLA (Section 2) and MoE (Section 3) where saved and right, else the course's: one line each.
PARTS = section5_parts()
MLA, MoE = PARTS.MLA, PARTS.MoE  # your block builds its attention and MoE from these two names
moe_param_counts = moe_counter()  # your Section 3.1 count of one MoE layer (5.2.3 builds on it)
FP8_LINEAR = fp8_linear()  # your Section 4 FP8 linear layer (5.3.4's FP8 run), padded to the 128-wide tile


def add_to_class(cls):
    """Decorator: attach a function to ``cls`` as a method, so one class can grow over several cells."""

    def attach(fn):
        setattr(cls, fn.__name__, fn)
        return fn

    return attach


CFG = ModelConfig()
print(CFG)

# %% [markdown]
# ### The configuration
# `ModelConfig` holds every size, with DeepSeek's names. The default is the model you train below; `ModelConfig.v3()`
# is the 671B model (used only for counting, never built).
#
# | field | meaning | default here | DeepSeek-V3 |
# |---|---|---|---|
# | `dim` | hidden width $d$ | 64 | 7168 |
# | `n_layers` / `n_dense_layers` | blocks / how many of the first ones use a dense FFN | 2 / 1 | 61 / 3 |
# | `n_heads`, `q_lora_rank`, `kv_lora_rank` | MLA heads, query latent $d_c'$, KV latent $d_c$ | 4, 32, 32 | 128, 1536, 512 |
# | `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim` | $d_h$, $d_h^R$, $d_v$ | 16, 8, 16 | 128, 64, 128 |
# | `inter_dim` / `moe_inter_dim` | dense FFN width / expert width | 128 / 32 | 18432 / 2048 |
# | `n_routed_experts`, `n_activated_experts`, `n_shared_experts` | $N_r$, $K_r$, $N_s$ | 8, 2, 1 | 256, 8, 1 |
# | `n_expert_groups`, `n_limited_groups`, `route_scale` | group-limited routing, weight scale | 1, 1, 1.0 | 8, 4, 2.5 |
# | `bias_update_speed`, `seq_aux_alpha` | $\gamma$, $\alpha$ of the balancing | 1e-3, 1e-4 | 1e-3, 1e-4 |
# | `mtp_depth`, `mtp_lambda` | MTP depth $D$ and loss weight $\lambda$ | 1, 0.3 | 1, 0.3 (0.1 later) |
#
# `cfg.mla()` and `cfg.moe()` build the `MLAConfig` and `MoEConfig` of one layer; `cfg.is_moe_layer(i)` says whether
# block `i` gets an MoE.
#
# ## 5.1 The Transformer block
#
# DeepSeek-V3 keeps the pre-norm residual block of modern decoders: every sub-layer reads a normalised copy of the
# residual stream and adds its output back:
#
# $$u = h + \mathrm{MLA}\big(\mathrm{RMSNorm}_{\text{attn}}(h)\big), \qquad
#   h' = u + \mathrm{FFN}\big(\mathrm{RMSNorm}_{\text{ffn}}(u)\big).$$
#
# The FFN is a dense SwiGLU in the first `n_dense_layers` blocks (three in V3) and DeepSeekMoE in all the others.
# DeepSeekMoE (arXiv 2401.06066) kept its first layer dense because the load balance of a first-layer MoE
# converged especially slowly.
#
# **Intuition:** the residual stream is a shared notebook. Attention copies information between positions, the FFN
# transforms each position on its own, and both write *additions*, so a block can start as the identity and
# learn to add only what helps. Pre-norm keeps the stream's scale from compounding over depth.
#
# ```
#  h ──┬──────────────────────────────────────(+)── u ──┬─────────────────────────────────(+)── h'
#      └─ attn_norm ── MLA (writes c_KV, k_pe) ──┘       └─ ffn_norm ── SwiGLU  or  MoE ──┘
#                                                                            └─ RoutingInfo (load, aux loss)
# ```
#
# The MoE returns `(y, info)`: `info.load` counts the tokens each routed expert received and `info.aux_loss` is the
# sequence-wise balance loss ($\alpha\sum_i f_iP_i$, already multiplied by $\alpha$, zero in eval mode). The block
# passes `info` up so the training step can use both.

# ### Find the bugs: a draft block
# A colleague wrote the block below from the diagram. It runs, every shape is right, and a dense and an MoE block
# both return what the model expects. It still breaks the contract above in **two** places. Read it against the two
# equations, find both, and say to yourself what each one does to the residual stream; then write the corrected
# `forward` in `TransformerBlock`, which keeps the draft's construction (the sub-module names, a dense FFN in the first
# `n_dense_layers` blocks and an MoE after). The graded cell's identity check already fails for the draft: work out
# why before you fix it.

# %% [given]
class DraftBlock(nn.Module):
    """A draft of the DeepSeek-V3 block: right construction, two wrong lines in ``forward`` (find them)."""

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.attn = MLA(cfg.mla())
        self.ffn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        # a dense SwiGLU in the first n_dense_layers blocks, DeepSeekMoE in all the others
        self.ffn = MoE(cfg.moe()) if cfg.is_moe_layer(layer_id) else SwiGLU(cfg.dim, cfg.inter_dim)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: LatentKVCache | None = None, *,
                absorb: bool = False) -> tuple[torch.Tensor, RoutingInfo | None]:
        h = self.attn_norm(x + self.attn(x, start_pos, cache, absorb=absorb))  # (B, T, dim)
        out = self.ffn(self.ffn_norm(x))  # (B, T, dim), or (y, info) from an MoE
        y, info = out if isinstance(out, tuple) else (out, None)
        return h + y, info


# %% [solution id=ex_05_1_block]
class TransformerBlock(DraftBlock):
    """One DeepSeek-V3 block, the draft fixed: ``u = x + MLA(attn_norm(x))``, ``h = u + FFN(ffn_norm(u))`` (V3
    report, section 2.1). Attributes (``attn_norm``, ``attn``, ``ffn_norm``, ``ffn``) come from ``DraftBlock``."""

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: LatentKVCache | None = None, *,
                absorb: bool = False) -> tuple[torch.Tensor, RoutingInfo | None]:
        """Apply the block to ``x`` (B, T, dim) at positions ``[start_pos, start_pos + T)``.

        ``cache`` and ``absorb`` are passed to the attention: ``self.attn(h, start_pos, cache, absorb=absorb)``.
        Returns the output (B, T, dim) and the MoE's ``RoutingInfo`` (``None`` for a dense block). An MoE
        returns ``(y, info)``; a SwiGLU returns ``y``.
        """
        ### BEGIN SOLUTION
        u = x + self.attn(self.attn_norm(x), start_pos, cache, absorb=absorb)  # (B, T, dim)
        if isinstance(self.ffn, MoE):
            y, info = self.ffn(self.ffn_norm(u))  # (B, T, dim)
            return u + y, info
        return u + self.ffn(self.ffn_norm(u)), None
        ### END SOLUTION


# %% [test id=test_05_1_block points=3]
# Checks you can run now. When graded, the judge runs these and more (3 points): your block matches the reference block in float64 (the draft's two bugs, post-norm, parallel sub-layers, missing residuals named), the MoE's routing info, gradients, causality, cached absorbed decoding.
from course_lib.testing import assert_close, assert_shape, assert_true

torch.manual_seed(0)
_dense, _moe = TransformerBlock(0, CFG), TransformerBlock(1, CFG)
assert_true(isinstance(_dense.ffn, SwiGLU) and isinstance(_moe.ffn, MoE),
            "block 0 should have a dense SwiGLU FFN and block 1 an MoE (CFG.n_dense_layers = 1)")
_x = torch.randn(2, 5, CFG.dim)
_y, _info = _dense(_x)
assert_shape(_y, (2, 5, CFG.dim), "dense block output")
assert_true(_info is None, "a dense block returns None as its routing info")
_y, _info = _moe(_x)
assert_shape(_y, (2, 5, CFG.dim), "MoE block output")
assert_true(isinstance(_info, RoutingInfo), "an MoE block returns the MoE's RoutingInfo")
# with every sub-layer's output projection at zero, only the residual connections remain: the block is the identity
with torch.no_grad():
    for _n, _p in _moe.named_parameters():
        if _n.endswith(("wo.weight", "w2.weight")):
            _p.zero_()
    assert_close(_moe(_x)[0], _x, atol=1e-6, name="block with zeroed output projections",
                 hint="both sub-layers add to the residual stream: u = x + attn(...), h = u + ffn(...)")
print("TransformerBlock: visible tests passed")

# %% [markdown]
# **Checkpoint:** your block is the identity when its output projections are zero (the draft is not), and it matches
# the reference block to float64 round-off, cached and absorbed decoding included.
#
# ## 5.2 DeepSeekV3Mini with multi-token prediction
#
# ### 5.2.1 The MTP module
# Besides the next token, DeepSeek-V3 trains each position to predict further ahead with $D$ sequential MTP
# modules (V3 report, section 2.2; $D = 1$). Depth $k$ combines position $i$'s representation from the previous
# depth ($h^0$ is the main model's last block output) with the embedding of token $t_{i+k}$, runs one Transformer
# block over the sequence, and predicts $t_{i+k+1}$ with the **shared** output head:
#
# $$h'^{k}_i = M_k\big[\mathrm{RMSNorm}(h^{k-1}_i);\ \mathrm{RMSNorm}(\mathrm{Emb}(t_{i+k}))\big],\qquad
#   h^{k}_{1:T-k} = \mathrm{TRM}_k\big(h'^{k}_{1:T-k}\big),\qquad
#   P^{k}_{i+k+1} = \mathrm{OutHead}\big(h^{k}_i\big),$$
#
# with $M_k\in\mathbb{R}^{d\times 2d}$. The loss averages cross-entropy over positions and depths, weighted by $\lambda$:
#
# $$\mathcal{L} = \mathcal{L}_{\text{main}} + \frac{\lambda}{D}\sum_{k=1}^{D}\mathcal{L}^{k}_{\text{MTP}}
#    + \sum_{\text{MoE layers}}\alpha\sum_i f_iP_i .$$
#
# **Why sequential, and why shared?** Each depth sees the previous depth's state, so the chain of predictions stays
# causal (unlike parallel heads that guess $t_{i+2}$ without knowing $t_{i+1}$). Sharing the embedding and the head
# keeps the extra parameters to one block and one $d\times 2d$ matrix, and makes the main model's representations
# carry information about the token after next ("pre-planning"). At inference the MTP module can be dropped, or used
# for speculative decoding: DeepSeek report that its second-token prediction is accepted 85–90% of the time.
#
# ```
#  t_1 … t_T ─ Emb ─ main blocks ─ h_i ──── norm ─ head ─► P(t_{i+1})                           L_main
#                                  │
#                        hnorm(h_i)│  enorm(Emb(t_{i+1}))         (Emb and head shared with the main model)
#                                  └──[ ; ]── M ── block ── norm ─ head ─► P(t_{i+2})           L_MTP
# ```
#
# In the released checkpoint the MTP module is layer 61 (`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, one
# decoder layer). Our `norm` plays the role of `shared_head.norm`: the block's output is a residual stream and is
# normalised before the head, like the main model's. The attribute names below are fixed: the weight copy, the
# checkpoints and the Hugging Face converter address the module's weights by them.
#
# ### Find the bugs: a draft MTP depth
# The same colleague wrote one depth from the diagram. Its construction is right and every shape is right; a model
# built on it trains, and its MTP loss even falls. Its `forward` still differs from the equation above in **two**
# places, and neither changes a value you can see at initialisation (every RMSNorm starts with unit gains). Ask of
# each line: which module normalises which input, and where does the gradient of $\mathcal{L}_{\text{MTP}}$ flow?
# Find both, say what each one costs in training, then write the corrected `forward` in `MTPModule`. The graded
# cell's gradient check already fails for the draft.

# %% [given]
class DraftMTP(nn.Module):
    """A draft of one MTP depth: right construction, two wrong things in ``forward`` (find them)."""

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        dim, eps = cfg.dim, cfg.rms_norm_eps
        self.hnorm = RMSNorm(dim, eps)  # for h^(k-1)
        self.enorm = RMSNorm(dim, eps)  # for Emb(t_{i+k})
        self.proj = nn.Linear(2 * dim, dim, bias=False)  # M_k
        self.block = TransformerBlock(layer_id, cfg)  # the MTP block is layer n_layers + k - 1
        self.norm = RMSNorm(dim, eps)  # applied by the model, before the shared head

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo | None]:
        h = h_prev.detach()  # the MTP module has its own loss
        x = self.proj(torch.cat([self.hnorm(h), self.hnorm(emb_next)], dim=-1))  # (B, T', dim)
        return self.block(x)


# %% [solution id=ex_05_2_mtp]
class MTPModule(DraftMTP):
    """One MTP depth (DeepSeek-V3 eqs. 21-22), the draft fixed. Attributes (``hnorm``, ``enorm``, ``proj``, ``block``,
    ``norm``) come from ``DraftMTP``; no embedding and no head here: the model's are shared."""

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo | None]:
        """``h_prev`` (B, T', dim): the previous depth's states at positions i; ``emb_next`` (B, T', dim): the
        embeddings of the tokens k ahead. Returns ``h^k`` (B, T', dim), before ``norm``, and the block's routing info."""
        ### BEGIN SOLUTION
        x = self.proj(torch.cat([self.hnorm(h_prev), self.enorm(emb_next)], dim=-1))  # (B, T', 2 dim) -> (B, T', dim)
        return self.block(x)
        ### END SOLUTION


# %% [test id=test_05_2_mtp points=2]
# Checks you can run now. When graded, the judge runs these and more (2 points): float64 against the reference depth with trained (non-unit) norm gains: the draft's two bugs named, the [hnorm(h) ; enorm(emb)] order, the output before norm; its own parameters only (shared embedding and head), gradients to both inputs.
torch.manual_seed(0)
_mtp = MTPModule(CFG.n_layers, CFG)
_h = torch.randn(2, 6, CFG.dim, requires_grad=True)
_e = torch.randn(2, 6, CFG.dim, requires_grad=True)
_out, _info = _mtp(_h, _e)
assert_shape(_out, (2, 6, CFG.dim), "MTP output")
assert_shape(_mtp.proj.weight, (CFG.dim, 2 * CFG.dim), "proj (M_k) weight")
_names = [n for n, _ in _mtp.named_parameters()]
assert_true(not any("embed" in n or "head" in n for n in _names),
            "the MTP module must not own an embedding or a head: the model's are shared")
_out.square().sum().backward()
assert_true(_h.grad is not None and bool(_h.grad.abs().sum() > 0),
            "no gradient reaches h_prev: the MTP loss must train the main model too",
            hint="which states does the MTP loss reach, and should it?")
_silent = [n for n, p in _mtp.named_parameters()
           if n.startswith(("hnorm.", "enorm.", "proj.")) and (p.grad is None or p.grad.abs().sum() == 0)]
assert_true(not _silent, f"parameters with no gradient: {_silent}",
            hint="a module the equation uses but forward never calls gets no gradient")
print("MTPModule: visible tests passed")

# %% [markdown]
# **Checkpoint:** your MTP module turns (state, next embedding) pairs into states for the token after next, with
# one block and one $d\times 2d$ matrix of its own.
#
# ### 5.2.2 The model and its loss
# The model is an embedding, `n_layers` blocks, a final RMSNorm and an output head, plus `mtp_depth` MTP modules.
# Training data come as `inputs` (B, T) and `targets` (B, T), where `targets[:, t]` is the token after
# `inputs[:, t]`, or `IGNORE_INDEX` (-100) where no loss is wanted. That makes the MTP targets easy: depth $k$ at
# position $i$ predicts token $i+k+1$, which is `targets[:, i + k]`, so its targets are `targets[:, k:]`.
#
# | method | returns |
# |---|---|
# | `trunk(tokens, start_pos, caches, absorb)` | last block output $h$ (B, T, dim) before the final norm, and the MoE layers' `RoutingInfo`s |
# | `forward(tokens, ...)` | next-token logits (B, T, vocab) = head(norm(h)) |
# | `mtp_forward(h, tokens)` | per depth $k$: logits (B, T−k, vocab) from `head(mtp[k-1].norm(h^k))`, and routing infos |
# | `compute_loss(inputs, targets)` | a `ModelOutput`: loss, main, MTP and balance losses, logits, routing infos (main blocks first, then MTP) |
#
# Use `F.cross_entropy(..., ignore_index=IGNORE_INDEX)` on flattened logits. The balance losses are the
# `aux_loss` of every `RoutingInfo` (each already multiplied by $\alpha$); add them all.

# %% [solution id=ex_05_3_model]
class DeepSeekV3Mini(nn.Module):
    """Embedding, blocks (dense FFN first, MoE after), final RMSNorm, output head, and MTP modules sharing both.

    Attributes (names fixed): ``embed`` nn.Embedding(vocab, dim); ``layers`` nn.ModuleList of
    ``TransformerBlock(i, cfg)`` for i < n_layers; ``norm`` RMSNorm(dim); ``head`` nn.Linear(dim, vocab,
    bias=False); ``mtp`` nn.ModuleList of ``MTPModule(n_layers + k, cfg)`` for k < mtp_depth.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ### BEGIN SOLUTION
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg.n_layers + k, cfg) for k in range(cfg.mtp_depth))
        ### END SOLUTION

    def check_tokens(self, tokens: torch.Tensor, start_pos: int = 0) -> None:
        """Raise ValueError unless ``tokens`` is an integer (B, T) tensor that fits in ``max_seq_len``."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (B, T), got {tuple(tokens.shape)} {tokens.dtype}")
        if start_pos + tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start_pos + tokens.shape[1]} exceed max_seq_len {self.cfg.max_seq_len}")

    def trunk(self, tokens: torch.Tensor, start_pos: int = 0, caches: list[LatentKVCache] | None = None, *,
              absorb: bool = False) -> tuple[torch.Tensor, list[RoutingInfo]]:
        """tokens (B, T) -> last block output h (B, T, dim) before the final norm, and the MoE blocks' routing infos.

        ``caches``: None, or one cache per layer (``caches[i]`` goes to ``layers[i]``).
        """
        self.check_tokens(tokens, start_pos)
        ### BEGIN SOLUTION
        h = self.embed(tokens)  # (B, T, dim)
        infos = []
        for i, layer in enumerate(self.layers):
            h, info = layer(h, start_pos, None if caches is None else caches[i], absorb=absorb)
            if info is not None:
                infos.append(info)
        return h, infos
        ### END SOLUTION

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, caches: list[LatentKVCache] | None = None, *,
                absorb: bool = False) -> torch.Tensor:
        """tokens (B, T) at positions ``[start_pos, start_pos + T)`` -> next-token logits (B, T, vocab)."""
        ### BEGIN SOLUTION
        h, _ = self.trunk(tokens, start_pos, caches, absorb=absorb)
        return self.head(self.norm(h))  # (B, T, vocab)
        ### END SOLUTION

    def mtp_forward(self, h: torch.Tensor, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[RoutingInfo]]:
        """MTP logits for depths k = 1..D: a list of (B, T - k, vocab), position i predicting ``tokens[i + k + 1]``;
        and the MTP blocks' routing infos. ``h`` (B, T, dim) is ``trunk(tokens)``'s output.

        Depth k reads the previous depth's states at positions ``0 .. T-k-1`` and ``embed(tokens[:, k:])``.
        """
        ### BEGIN SOLUTION
        T = tokens.shape[1]
        logits, infos = [], []
        for k, module in enumerate(self.mtp, start=1):
            h, info = module(h[:, : T - k], self.embed(tokens[:, k:]))  # (B, T - k, dim)
            logits.append(self.head(module.norm(h)))  # (B, T - k, vocab): the shared head
            if info is not None:
                infos.append(info)
        return logits, infos
        ### END SOLUTION

    def compute_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> ModelOutput:
        """``loss = main + (mtp_lambda / D) * sum_k mtp_k + sum of the MoE layers' aux_loss`` (V3 eqs. 17-20, 25).

        inputs, targets: (B, T). Returns ``ModelOutput(loss, main_loss, mtp_loss, aux_loss, logits, mtp_logits,
        infos)`` where ``mtp_loss`` is the mean over depths (0 when ``mtp_depth == 0``) and ``infos`` lists the
        main blocks' routing infos, then the MTP blocks'.
        """
        self.check_tokens(inputs)
        ### BEGIN SOLUTION
        V = self.cfg.vocab_size
        h, infos = self.trunk(inputs)
        logits = self.head(self.norm(h))  # (B, T, vocab)
        main = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        mtp_logits, mtp_infos = self.mtp_forward(h, inputs)
        mtp = main.new_zeros(())
        for k, lg in enumerate(mtp_logits, start=1):
            mtp = mtp + F.cross_entropy(lg.reshape(-1, V), targets[:, k:].reshape(-1), ignore_index=IGNORE_INDEX)
        mtp = mtp / max(len(mtp_logits), 1)
        infos = infos + mtp_infos
        aux = sum((info.aux_loss for info in infos), main.new_zeros(()))
        return ModelOutput(main + self.cfg.mtp_lambda * mtp + aux, main, mtp, aux, logits, mtp_logits, infos)
        ### END SOLUTION

    # ---- given: balancing and counting helpers ----
    def moe_layers(self) -> list[MoE]:
        """The MoE layers in the order of ``ModelOutput.infos``: main blocks, then MTP blocks."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    @torch.no_grad()
    def update_biases(self, loads: list[torch.Tensor]) -> None:
        """``b_i += gamma * sign(mean_load - load_i)`` in every MoE layer (``loads`` in ``moe_layers`` order)."""
        for moe, load in zip(self.moe_layers(), loads, strict=True):
            moe.update_bias(load)

    def num_parameters(self, active: bool = False) -> int:
        """Main-model parameters counted from the modules (MTP excluded); ``active``: minus the routed experts a token
        skips and the embedding table (a token reads one row of it)."""
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("mtp."))
        if active:
            n -= self.embed.weight.numel()
            for b in self.layers:
                if isinstance(b.ffn, MoE):
                    per_expert = sum(p.numel() for p in b.ffn.experts[0].parameters())
                    n -= (b.ffn.cfg.n_routed_experts - b.ffn.cfg.n_activated_experts) * per_expert
        return n


# %% [test id=test_05_3_model points=7]
# Checks you can run now. When graded, the judge runs these and more (7 points): logits, main/MTP/balance/total losses and MTP logits against the reference in float64 (three configs, MTP depth 0/1/2), targets not shifted twice, MTP on the token two ahead with the shared head, lambda, the final norm, gradients, causality.
torch.manual_seed(0)
_m = init_weights(DeepSeekV3Mini(CFG), seed=0)
_x = torch.randint(0, CFG.vocab_size, (2, 10))
assert_shape(_m(_x), (2, 10, CFG.vocab_size), "logits")
_y = _x.clone()
_y[:, 6:] = (_y[:, 6:] + 1) % CFG.vocab_size
with torch.no_grad():
    assert_close(_m(_y)[:, :6], _m(_x)[:, :6], atol=1e-5, name="logits before position 6 after changing tokens 6..9",
                 hint="future tokens must never change past logits (causal attention in every block)")
_t_ = torch.randint(0, CFG.vocab_size, (2, 10))
with torch.no_grad():
    _out = _m.compute_loss(_x, _t_)
assert_true(isinstance(_out, ModelOutput), "compute_loss returns a ModelOutput")
assert_shape(_out.mtp_logits[0], (2, 9, CFG.vocab_size), "depth-1 MTP logits", hint="depth k has T - k positions")
assert_true(abs(float(_out.main_loss) - math.log(CFG.vocab_size)) < 0.5,
            f"at initialisation the main loss should be near ln(vocab) = {math.log(CFG.vocab_size):.2f}, got {float(_out.main_loss):.2f}")
assert_close(_out.loss, _out.main_loss + CFG.mtp_lambda * _out.mtp_loss + _out.aux_loss, atol=1e-6, name="total loss")
print("DeepSeekV3Mini: visible tests passed")

# %% [markdown]
# **Checkpoint:** your model's main loss starts near $\ln(\text{vocab})$, its MTP logits come from the shared head, and
# future tokens cannot change past logits.
#
# ### 5.2.3 Total and active parameters
# An MoE layer stores all $N_r$ routed experts but a token runs only $K_r$ of them, so a DeepSeek model has two sizes.
# Per block: attention ($W_{DQ}$, $q$-norm, $W_{UQ}$ or one $W_Q$ without query compression; $W_{DKV}$ with $W_{KR}$,
# $kv$-norm, $W_{UKV}$, $W_O$), two RMSNorms, and either a dense SwiGLU ($3\,d\,d_{ff}$) or an MoE layer, which you
# counted in Section 3.1: `moe_param_counts(cfg.moe())` (yours, loaded by the first cell, or the course's) gives its
# total and active parameters. Add the embedding, the final norm and the head.
#
# **The course's convention** (one for all sections): **active** parameters are the weights one token multiplies
# with, i.e. everything except the $N_r-K_r$ routed experts it skips in every MoE layer and except the embedding
# table, of which it reads one row. That is DeepSeek's "37B activated". The router's balancing bias is a buffer
# (no gradient, moved by the balancing rule), not a parameter. The MTP modules are reported separately, as DeepSeek
# does ("671B + 14B MTP"). Section 6 builds its memory planner on this counter.

# %% [solution id=ex_05_4_counts]
def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of ``DeepSeekV3Mini(cfg)`` from the config alone (never build V3!).

    Returns ``{"total": main model, "active": per token, "mtp": the MTP modules}``; ``active`` leaves out the skipped
    routed experts and the embedding table; ``mtp`` counts each module's hnorm, enorm, norm, proj and block, not the
    shared embedding and head. Count each MoE layer with ``moe_param_counts(cfg.moe())``.
    """
    ### BEGIN SOLUTION
    d, H = cfg.dim, cfg.n_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = d * H * qk if cfg.q_lora_rank == 0 else d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk
    attn = (q + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
            + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * d)
    moe = moe_param_counts(cfg.moe())  # {"total", "active"} of one MoE layer (Section 3.1)
    dense = 3 * d * cfg.inter_dim

    def block(i: int, part: str = "total") -> int:
        return 2 * d + attn + (moe[part] if cfg.is_moe_layer(i) else dense)  # two RMSNorms, MLA, FFN

    outside = cfg.vocab_size * d + d  # the output head and the final norm
    total = cfg.vocab_size * d + outside + sum(block(i) for i in range(cfg.n_layers))  # + the embedding table
    active = outside + sum(block(i, "active") for i in range(cfg.n_layers))  # a token reads one embedding row
    mtp = sum(3 * d + 2 * d * d + block(cfg.n_layers + k) for k in range(cfg.mtp_depth))
    return {"total": total, "active": active, "mtp": mtp}
    ### END SOLUTION


# %% [test id=test_05_4_counts points=4]
# Checks you can run now. When graded, the judge runs these and more (4 points): total, active and MTP counts of five configs (query compression on and off, all dense, MTP depth 2, two shared experts) against the modules, each usual slip named (the active convention and the router bias included); DeepSeek-V3's 671.0B / 36.6B / 11.6B.
_c = count_parameters(CFG)
torch.manual_seed(0)
_m = DeepSeekV3Mini(CFG)
assert_true(_c["total"] == _m.num_parameters(), f"total {_c['total']} != {_m.num_parameters()} counted from the modules")
assert_true(_c["active"] == _m.num_parameters(active=True), f"active {_c['active']} != {_m.num_parameters(active=True)}")
_v3 = count_parameters(ModelConfig.v3())
print(f"DeepSeek-V3: {_v3['total'] / 1e9:.1f}B total, {_v3['active'] / 1e9:.1f}B active, MTP {_v3['mtp'] / 1e9:.1f}B")
print("count_parameters: visible tests passed")

# %% [markdown]
# **Checkpoint:** your formula gives DeepSeek-V3 **671.0B** parameters, **36.6B** active per token (DeepSeek's
# "37B activated"; counting the embedding table as active would give 37.6B), and 11.6B in the
# MTP module (13.5B with its stored copies of the embedding and head: the "685B" of the released checkpoint). The
# figure splits both sizes into the routed experts and everything else.

# %% [code]
try:
    _v3 = ModelConfig.v3()
    mine = count_parameters(_v3)
    # every token skips n_routed - n_activated experts per MoE layer and reads one row of the embedding table
    n_moe = sum(_v3.is_moe_layer(i) for i in range(_v3.n_layers))
    routed = n_moe * _v3.n_routed_experts * 3 * _v3.dim * _v3.moe_inter_dim
    embedding = _v3.vocab_size * _v3.dim
    used_routed = routed * _v3.n_activated_experts // _v3.n_routed_experts
    bars = {"routed experts": (routed, used_routed),
            "embedding table": (embedding, 0),
            "everything else (head, MLA, dense FFNs, gates, shared experts)": (mine["total"] - routed - embedding, mine["active"] - used_routed)}
    fig, ax = plt.subplots(figsize=(8, 3.2))
    left = np.zeros(3)
    for name, (total_, active_) in bars.items():
        vals = np.array([total_, active_, 0]) / 1e9
        ax.barh(["total", "active per token", "MTP module"], vals, left=left, label=name)
        left += vals
    ax.barh(["MTP module"], [mine["mtp"] / 1e9], color="tab:gray", label="MTP module (not counted in total)")
    ax.set_xlabel("parameters (billions)")
    ax.set_title(f"DeepSeek-V3: {mine['total'] / 1e9:.1f}B total, {mine['active'] / 1e9:.1f}B active (your count_parameters)")
    ax.legend(fontsize=8, loc="lower right")
    plt.show()
    print(f"routed experts hold {routed / mine['total']:.0%} of the parameters; a token uses "
          f"{_v3.n_activated_experts} of {_v3.n_routed_experts} of them per MoE layer")
except NotImplementedError:
    print("(finish exercise 5.2.3, count_parameters, to see this figure)")

# %% [markdown]
# ### 5.2.4 Generation with the latent cache
# Decoding one token at a time is where MLA pays off. The prompt is **prefilled** once: every layer writes its
# normalised latent $c^{KV}$ and rope key $k^R$ for all prompt positions into its `LatentKVCache`. Then each new token
# is fed **alone**, at its own position, and every layer attends over the cache on the **absorbed** path
# ($W^{UK}$ folded into the query, $W^{UV}$ applied after the attention, Section 2), reading
# `kv_lora_rank + qk_rope_head_dim` numbers per cached token instead of rebuilding keys and values.
#
# ```
#  prompt t_1..t_P ──► model(prompt, 0, caches, absorb=True) ──► logits[:, -1] ──► argmax ──► t_{P+1}
#  t_{P+1}         ──► model(t_{P+1}, P, caches, absorb=True) ──► ...           ──► t_{P+2}   (one position per call)
# ```

# %% [solution id=ex_05_5_generate]
@add_to_class(DeepSeekV3Mini)
@torch.no_grad()
def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, absorb: bool = True, use_cache: bool = True) -> torch.Tensor:
    """Greedy decoding: continue ``prompt`` (B, T0) by ``max_new_tokens`` tokens -> (B, T0 + max_new_tokens).

    ``use_cache=True``: one latent cache per layer, ``layer.attn.new_cache(B, T0 + max_new_tokens)``; run the prompt
    once at position 0, then feed each new token alone at its position, passing ``absorb`` to the model.
    ``use_cache=False``: re-run the whole sequence at every step (slow, obviously right). Runs in eval mode and
    restores the mode the model was in.
    """
    self.check_tokens(prompt)
    B, T0 = prompt.shape
    if T0 + max_new_tokens > self.cfg.max_seq_len:
        raise ValueError(f"prompt + new tokens = {T0 + max_new_tokens} exceeds max_seq_len {self.cfg.max_seq_len}")
    ### BEGIN SOLUTION
    was_training = self.training
    self.eval()
    tokens = prompt
    if use_cache:
        caches = [layer.attn.new_cache(B, T0 + max_new_tokens) for layer in self.layers]
        logits = self(prompt, 0, caches, absorb=absorb)[:, -1]  # (B, vocab): prefill
    for step in range(max_new_tokens):
        if not use_cache:
            logits = self(tokens)[:, -1]  # (B, vocab)
        nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
        tokens = torch.cat([tokens, nxt], dim=1)  # (B, T0 + step + 1)
        if use_cache and step + 1 < max_new_tokens:
            logits = self(nxt, T0 + step, caches, absorb=absorb)[:, -1]  # (B, vocab): one new position
    self.train(was_training)
    return tokens
    ### END SOLUTION


# %% [test id=test_05_5_generate points=4]
# Checks you can run now. When graded, the judge runs these and more (4 points): greedy tokens against the reference on the same weights (absorbed, naive, no cache), decode positions, one cache per layer; FLOPs of one cached absorbed decode (no recompute), eval mode while decoding, the mode restored.
torch.manual_seed(0)
_m = init_weights(DeepSeekV3Mini(CFG), seed=1, std=0.3)
_p = torch.randint(0, CFG.vocab_size, (2, 4))
_a = _m.generate(_p, 6)
assert_shape(_a, (2, 10), "generated tokens")
assert_true(torch.equal(_a[:, :4], _p), "the output starts with the prompt")
assert_true(torch.equal(_a, _m.generate(_p, 6, use_cache=False)),
            "cached absorbed decoding must produce the same greedy tokens as re-running the whole sequence",
            hint="feed each new token at position T0 + step, with the same caches you prefilled")
print("generate: visible tests passed")

# %% [markdown]
# **Checkpoint:** your decoder reads a `LatentKVCache` of `kv_lora_rank + qk_rope_head_dim` numbers per token per
# layer (40 here, 576 in V3), and its greedy tokens equal those of the slow recompute-everything loop.
#
# ## 5.3 End-to-end validation
# ### 5.3.1 The training step
# One step of DeepSeek-V3's recipe has a fixed order. The auxiliary-loss-free bias update comes **after** the
# optimiser step and uses the load of **this** batch, measured in the forward pass that produced the loss:
#
# $$b_i \leftarrow b_i + \gamma\,\operatorname{sign}\big(\overline{\mathrm{load}} - \mathrm{load}_i\big)\quad\text{in every MoE layer (MTP blocks included)}.$$
#
# The bias has no gradient (it is a buffer), so the optimiser never touches it; updating it before the forward pass
# or twice per step would route with loads that are not the batch's. The exercise states what must hold after one
# step, not the lines that get there: choose the calls (PyTorch has one for each point) and their order yourself.

# %% [solution id=ex_05_6_train_step]
def train_step(model: DeepSeekV3Mini, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               clip_norm: float = 1.0) -> dict:
    """One training step on one batch. The contract (the visible checks test the last point; the grader all of them):

    - the losses returned are ``model.compute_loss(inputs, targets)``'s in training mode, for the weights before the step;
    - afterwards the weights are one ``optimizer`` step on the gradient of that total loss alone (nothing left over from
      an earlier step), with the global gradient norm clipped to ``clip_norm``; ``grad_norm`` is the norm before clipping;
    - every MoE layer's gate bias has moved exactly once, by ``gamma * sign(mean load - load_i)`` with the loads this
      forward measured (``model.update_biases`` does the arithmetic), and only after the optimiser step.

    Returns a dict: ``loss``, ``main_loss``, ``mtp_loss``, ``aux_loss``, ``grad_norm`` (Python floats), ``loads``
    (list of (E,) tensors) and ``max_vio`` (list of ``max_violation(load)``, one float per MoE layer).
    """
    ### BEGIN SOLUTION
    model.train()
    out = model.compute_loss(inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    loads = [info.load.detach() for info in out.infos]
    model.update_biases(loads)
    return {"loss": out.loss.item(), "main_loss": out.main_loss.item(), "mtp_loss": out.mtp_loss.item(),
            "aux_loss": out.aux_loss.item(), "grad_norm": grad_norm.item(), "loads": loads,
            "max_vio": [max_violation(load) for load in loads]}
    ### END SOLUTION


# %% [test id=test_05_6_train_step points=3]
# Checks you can run now. When graded, the judge runs these and more (3 points): the returned losses, pre-clipping gradient norm, loads and MaxVio against a reference step; the bias moved once, after the forward, in every MoE layer; the weights after two SGD steps (zero_grad, the total loss, clipping).
torch.manual_seed(0)
_data = MultiTaskLanguage(n_digits=RECIPE["n_digits"])
_m = init_weights(DeepSeekV3Mini(ModelConfig(vocab_size=_data.vocab_size)), seed=0)
_opt = torch.optim.AdamW(_m.parameters(), lr=1e-2)
_b = _data.sample(16, torch.Generator().manual_seed(0))
_bias0 = [moe.gate.bias.clone() for moe in _m.moe_layers()]
_st = train_step(_m, _opt, _b.inputs, _b.targets)
assert_true(set(_st) >= {"loss", "main_loss", "mtp_loss", "aux_loss", "grad_norm", "loads", "max_vio"}, f"missing keys: got {sorted(_st)}")
assert_true(len(_st["loads"]) == len(_m.moe_layers()) == 2, "one load per MoE layer (main block and MTP block)")
for _moe, _b0 in zip(_m.moe_layers(), _bias0):
    _step = (_moe.gate.bias - _b0).abs()
    assert_true(bool((((_step - CFG.bias_update_speed).abs() < 1e-7) | (_step == 0)).all()) and bool(_step.max() > 0),
                "after one step every bias moved by exactly gamma (or 0 for an expert at the mean load)",
                hint="update the biases once per step, after the optimiser step, with the batch's loads")
print("train_step: visible tests passed")

# %% [markdown]
# **Checkpoint:** one call of your `train_step` moves every gate bias by exactly $\pm\gamma$, after the optimiser step.
#
# ## Quiz
# Everything the quiz asks about is behind you now, so it comes before the training run (the rest of the
# section analyses that run). Set each answer to one letter, e.g. `ANSWER_Q1 = "a"`.
#
# **Q1.** Which parameters does DeepSeek-V3's MTP module share with the main model? (a) none; (b) the embedding and the
# output head; (c) every Transformer block; (d) only the final RMSNorm.
#
# **Q2.** DeepSeek-V3 has 671B parameters but about 37B are active per token mainly because (a) FP8 halves the
# weights; (b) the first three layers are dense; (c) MLA compresses the weights; (d) each MoE layer runs only 8 of its
# 256 routed experts (plus the shared expert).
#
# **Q3.** The auxiliary-loss-free balancing step (a) adds
# $\gamma\,\mathrm{sign}(\overline{\mathrm{load}}-\mathrm{load}_i)$ to each bias after the optimiser step, with the
# batch's loads; (b) back-propagates a balance loss into the bias; (c) renormalises the gate weights; (d) drops tokens from overloaded experts.
#
# **Q4.** During decoding with the absorbed path, each MLA layer caches per token (a) keys and values of every head;
# (b) the queries; (c) the normalised latent $c^{KV}$ and the rope key $k^R$; (d) the hidden state $h$.
#
# **Q5.** With `inputs` and `targets` (next tokens), the depth-1 MTP logits at position $i$ are scored against
# (a) `targets[:, i]`; (b) `targets[:, i + 1]`, i.e. token $i+2$; (c) `inputs[:, i]`; (d) every later token.

# %% [solution id=quiz_05_answers]
### BEGIN SOLUTION
ANSWER_Q1 = "b"
ANSWER_Q2 = "d"
ANSWER_Q3 = "a"
ANSWER_Q4 = "c"
ANSWER_Q5 = "b"
### END SOLUTION

# %% [test id=test_05_quiz points=3]
# Checks you can run now. When graded, the judge runs these and more (3 points): each answer is one letter; 0.5 points per correct answer, 0.5 for well-formed answers.
for _n, _a in enumerate([ANSWER_Q1, ANSWER_Q2, ANSWER_Q3, ANSWER_Q4, ANSWER_Q5], 1):
    assert _a in ("a", "b", "c", "d"), f"ANSWER_Q{_n} must be one of 'a', 'b', 'c', 'd' (got {_a!r})"
print("quiz: answers well-formed")

# %% [given id=feedback_05_quiz]
#@quiz-feedback

# %% [markdown]
# ### 5.3.2 Training on the multi-task language
# The data make routing matter: four tasks on the same digits, announced by the first token.
#
# | task | example (4 digits) | what it needs |
# |---|---|---|
# | copy | `<copy>3141=3141$` | attend to the digit $n+1$ positions back |
# | reverse | `<rev>3141=1413$` | attend to the mirrored position |
# | sort | `<sort>3141=1134$` | count digits smaller than each value |
# | add | `<add>31+41=720$` | digit-wise sum with a carry, least significant digit first (13 + 14 = 27) |
#
# Only the answer digits and the end token `$` are trained and scored. **Target: 80% answer-token accuracy** on
# 512 held-out problems (chance is about 10%), within 150 steps of batch 64, seed 0. Both are fixed: the graded
# check after the run depends on them, never on time. The monitor shows loss, gradient norm, the worst MoE layer's
# MaxVio and throughput (live in JupyterLab, one figure when graded).

# %% [given]
TARGET_ACC = 0.80
TRAIN_STEPS = 150
data = MultiTaskLanguage(n_digits=RECIPE["n_digits"])
print("example:", data.decode(data.sequence("add", [3, 1, 4, 1])), "| vocabulary:", data.vocab_size, "tokens | positions:", data.block_size)
TRAIN_LOG = {"steps_to_target": None, "evals": [], "seconds": None, "tokens_per_s": None}
model = None
try:
    from course_lib.deepseek.training import train

    torch.manual_seed(0)
    model = init_weights(DeepSeekV3Mini(ModelConfig(vocab_size=data.vocab_size)), seed=0, std=RECIPE["init_std"])
    INITIAL = {k: v.clone() for k, v in model.state_dict().items()}  # the start of the run, for the comparison below
    monitor = viz.TrainingMonitor(["loss", "main_loss", "grad_norm", "max_vio", "tokens_per_s"], every=25,
                                  title="DeepSeekV3Mini on the multi-task language (your train_step)")
    run = train(model, data, steps=TRAIN_STEPS, batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], warmup=RECIPE["warmup"], seed=0,
                eval_every=RECIPE["eval_every"], target=TARGET_ACC, monitor=monitor, step_fn=train_step, eval_batch=512)
    TRAIN_LOG.update(steps_to_target=run.steps_to_target, evals=run.evals, seconds=run.seconds, tokens_per_s=run.tokens_per_s,
                     history=run.history)
    monitor.finish()
    plt.show()
    print(f"{TRAIN_STEPS} steps in {run.seconds:.1f} s ({run.tokens_per_s:,.0f} tokens/s); "
          f"target {TARGET_ACC:.0%} reached at step {run.steps_to_target}; final: " +
          ", ".join(f"{k} {v:.3f}" for k, v in run.evals[-1].items() if k != "step"))
except NotImplementedError as err:
    print("finish the exercises above to train the model:", err)

# %% [code]
if TRAIN_LOG["evals"]:
    steps_ = [e["step"] for e in TRAIN_LOG["evals"]]
    fig, ax = plt.subplots()
    ax.plot(steps_, [e["token_acc"] for e in TRAIN_LOG["evals"]], "k-o", lw=2, label="all tasks (answer tokens)")
    for task in data.TASKS:
        ax.plot(steps_, [e[f"acc_{task}"] for e in TRAIN_LOG["evals"]], "--", label=f"{task} (whole answers)")
    ax.axhline(TARGET_ACC, color="r", ls=":", label=f"target {TARGET_ACC:.0%}")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy (fraction)")
    ax.set_title("Held-out accuracy: tokens overall, whole answers per task")
    ax.legend(fontsize=8)
    plt.show()

# %% [test id=test_05_7_training points=3]
# Checks you can run now. When graded, the judge runs these and more (3 points): the run reaches 80% answer-token accuracy within 150 steps; the trained model on 1024 fresh problems (>= 77%, copy solved); the loss fell, MaxVio stayed low, the gate biases moved.
assert_true(TRAIN_LOG["steps_to_target"] is not None and TRAIN_LOG["steps_to_target"] <= TRAIN_STEPS,
            f"the model did not reach {TARGET_ACC:.0%} answer-token accuracy within {TRAIN_STEPS} steps",
            hint="check the exercises above; the recipe (seed, steps, batch, learning rate) is fixed")
print(f"training: target reached at step {TRAIN_LOG['steps_to_target']}")

# %% [markdown]
# **Checkpoint:** your model reaches the target within the step budget; copy and reverse are solved first, sort
# follows, and the carries of addition take longer than this run.
#
# ### Your model at work
# Greedy answers from your cached, absorbed decoder on fresh problems:

# %% [code]
if model is not None:
    gen = torch.Generator().manual_seed(7)
    try:
        for task in data.TASKS:
            for _ in range(2):
                digits = torch.randint(0, 10, (data.n_digits,), generator=gen).tolist()
                prompt = torch.tensor([data.problem(task, digits)])
                out = model.generate(prompt, data.answer_length(task) + 1)[0, prompt.shape[1]:].tolist()
                want = data.answer(task, digits) + [data.eos]
                print(f"{data.decode(prompt[0]):>14} {data.decode(out):<6} {'ok' if out == want else 'expected ' + data.decode(want)}")
    except NotImplementedError:
        print("implement generate to see the answers")

# %% [markdown]
# ### Your parts against the course's
# The same run once more, with the course's MLA and MoE in your block and model: the same initial weights (copied by
# name), seed and data order. `bound(globals(), MLA=..., MoE=...)` swaps the two names your block builds from for
# the length of the `with` block. Where your parts compute what the course's compute, the curves start on top of each
# other and part only late: float32 round-off differs between two correct implementations, and once one token is
# routed to another expert the runs go separate (equally good) ways. A bug makes them part within the first steps.

# %% [code]
COMPARE = None
if model is None or not PARTS.yours:
    print("both runs would use the course's parts: run the last cell of Sections 2 and 3 to bring yours here"
          if model is not None else "train the model first")
else:
    with bound(globals(), MLA=CourseMLA, MoE=CourseMoE):  # your block and model classes, the course's parts
        course_model = DeepSeekV3Mini(ModelConfig(vocab_size=data.vocab_size))
        course_model.load_state_dict(INITIAL)
        COMPARE = train(course_model, data, steps=TRAIN_STEPS, batch_size=RECIPE["batch_size"], lr=RECIPE["lr"],
                        warmup=RECIPE["warmup"], seed=0, eval_every=RECIPE["eval_every"], target=TARGET_ACC,
                        step_fn=train_step, eval_batch=512)
    runs_ = {f"your {' and '.join(PARTS.yours)}": TRAIN_LOG, "the course's parts": vars(COMPARE)}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for (label, r), style in zip(runs_.items(), ("k-", "C1--")):
        axes[0].plot(r["history"]["loss"], style, lw=1.2, label=label)
        axes[1].plot([e["step"] for e in r["evals"]], [e["token_acc"] for e in r["evals"]], style + "o", label=label)
        axes[2].plot(r["history"]["max_vio"], style, lw=1, label=label)
    for ax, name in zip(axes, ("training loss", "held-out answer-token accuracy", "MaxVio (worst MoE layer)")):
        ax.set_xlabel("training step")
        ax.set_title(name)
        ax.legend(fontsize=8)
    plt.tight_layout()
    plt.show()
    gaps = [abs(a - b) for a, b in zip(TRAIN_LOG["history"]["loss"], COMPARE.history["loss"])]
    agree = next((i for i, gap in enumerate(gaps) if gap > 1e-3), len(gaps))  # steps before the runs part by 1e-3
    for label, r in runs_.items():
        print(f"{label:>28}: final loss {r['history']['loss'][-1]:.4f}, accuracy {r['evals'][-1]['token_acc']:.3f}, "
              f"target at step {r['steps_to_target']}, largest MaxVio {max(r['history']['max_vio']):.2f}")
    print(f"loss difference {max(gaps[:10]):.1e} at most over the first 10 steps; the runs agree to 1e-3 for "
          f"{agree} of {len(gaps)} steps and differ by {max(gaps):.2f} at most")

# %% [markdown]
# Which experts handle which tokens? Pick a task (a dropdown in JupyterLab; one static figure when graded): the
# heatmap shows, for one fresh problem, the routing weight $g_{i,t}$ of every routed expert at every position of the
# MoE in block 1. Compare the tasks: each leans on its own favourite experts, the specialisation measured below.

# %% [code]
def show_routing(task="add", seed=0):
    if model is None:
        print("train the model first")
        return
    digits = torch.randint(0, 10, (data.n_digits,), generator=torch.Generator().manual_seed(seed)).tolist()
    seq = torch.tensor([data.sequence(task, digits)[:-1]])
    model.eval()
    with torch.no_grad():
        _, infos = model.trunk(seq)
    info = infos[0]
    weights = torch.zeros(seq.shape[1], CFG.n_routed_experts).scatter(1, info.indices, info.weights.float())  # (T, E)
    fig, ax = plt.subplots(figsize=(6, 4))
    im = ax.imshow(weights.numpy(), cmap="rocket_r", aspect="auto")
    ax.grid(False)
    ax.set_yticks(range(seq.shape[1]), [data.decode([t]) for t in seq[0].tolist()])
    ax.set_xlabel("routed expert")
    ax.set_ylabel("input token (position)")
    ax.set_title(f"Routing of one '{task}' problem, MoE of block 1")
    fig.colorbar(im, ax=ax, label="routing weight g")
    plt.show()


viz.interactive(show_routing, task=["add", "copy", "reverse", "sort"], seed=[0, 1, 2, 3])

# %% [markdown]
# ### 5.3.3 Forward validation, gradient flow, memory
# **Causality, seen directly.** The influence of input position $j$ on the logits at position $i$ is the norm of
# $\partial\,\mathrm{logits}_i/\partial\,\mathrm{Emb}(t_j)$. A causal model has exactly zero influence above the
# diagonal; the figure shows it for your trained model, with the MTP branch's influence beside it (its position $i$
# also reads $t_{i+1}$, so its band is one step wider: by design, not a leak, since it predicts $t_{i+2}$).

# %% [code]
def influence(model, tokens):
    """(T, T) norms of d logits_i / d Emb(t_j) for the main head and the depth-1 MTP head (batch row 0)."""
    emb = model.embed(tokens).detach().requires_grad_(True)  # (1, T, dim)
    h = emb
    for layer in model.layers:
        h, _ = layer(h)
    main = model.head(model.norm(h))  # (1, T, vocab)
    mod = model.mtp[0]
    hk, _ = mod(h[:, :-1], emb[:, 1:])  # (1, T - 1, dim): the MTP branch reads Emb(t_{i+1})
    mtp = model.head(mod.norm(hk))
    T = tokens.shape[1]
    out = np.zeros((2, T, T))
    for r, logits in enumerate((main, mtp)):
        for i in range(logits.shape[1]):
            (g,) = torch.autograd.grad(logits[0, i].square().sum(), emb, retain_graph=True)
            out[r, i] = g[0].norm(dim=-1).numpy()
    return out


if model is not None:
    model.eval()
    inf = influence(model, data.sample(1, torch.Generator().manual_seed(3)).inputs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, m_, title in zip(axes, inf, ("main head: position i predicts t_{i+1}", "MTP head: position i predicts t_{i+2}")):
        im = ax.imshow(np.log10(m_ + 1e-12), cmap="viridis", vmin=-6)
        ax.grid(False)
        ax.set_xlabel("input position j")
        ax.set_ylabel("output position i")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label="log10 |d logits_i / d Emb(t_j)|")
    fig.suptitle("Causality of your trained model (exact zeros drawn at the bottom of the scale)")
    fig.tight_layout()
    plt.show()
    print("largest influence of a future token on the main logits:", float(np.triu(inf[0], k=1).max()))

# %% [markdown]
# **Gradient flow.** One batch through `compute_loss`, then the gradient norm of every parameter group. Every group
# must receive a finite, non-zero gradient; the routed experts get less than dense parts because each sees only
# the tokens routed to it, and the gate's bias gets none (it is a buffer moved by the balancing rule).

# %% [code]
if model is not None:
    model.train()
    model.zero_grad()
    grad_batch = data.sample(64, torch.Generator().manual_seed(11))
    model.compute_loss(grad_batch.inputs, grad_batch.targets).loss.backward()
    groups: dict[str, float] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:4] if parts[0] == "mtp" else parts[:3] if parts[0] == "layers" else parts[:1])
        if ".experts." in name:
            key = key.rsplit(".", 1)[0] + ".experts (routed)" if key.endswith("experts") else key
        groups[key] = groups.get(key, 0.0) + float(p.grad.double().pow(2).sum()) if p.grad is not None else float("nan")
    names = list(groups)
    norms = np.sqrt(np.array([groups[n] for n in names]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.barh(names, norms, color=["tab:red" if not np.isfinite(v) or v == 0 else "tab:blue" for v in norms])
    ax.set_xscale("log")
    ax.set_xlabel("gradient L2 norm (log scale)")
    ax.set_title("Gradient flow: every parameter group of your model (red = missing)")
    ax.invert_yaxis()
    plt.show()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    print("parameters without a finite non-zero gradient:", missing or "none")
    model.zero_grad()

# %% [markdown]
# **Memory.** Two different costs. The *KV cache* of generation is where MLA wins: `kv_lora_rank + qk_rope_head_dim`
# numbers per token per layer against $2 n_h d_h$ for multi-head attention (keys and values of every head).
# *Training activations* are another story: the naive path rebuilds full per-head keys and values, the MoE keeps
# the inputs of every routed expert, and the MTP module adds a whole block, so training memory is not where
# DeepSeek-V3 saves. The baseline below is a dense
# decoder of the same width, depth and head sizes (standard MHA with RoPE, SwiGLU FFN of `inter_dim`). Peak memory is
# measured by `course_lib.bench.peak_memory`, which tracks every tensor allocated during forward and backward.

# %% [code]
from course_lib.deepseek.model_config import MHABaseline

mem_cfg = ModelConfig(vocab_size=data.vocab_size, max_seq_len=256)
lengths = sizes([16, 64, 128], [16, 32, 64, 128, 256])


def train_peak(m, T):
    x = torch.randint(0, mem_cfg.vocab_size, (8, T), generator=torch.Generator().manual_seed(T))

    def step():
        loss = m.compute_loss(x, x).loss if hasattr(m, "compute_loss") else F.cross_entropy(m(x).flatten(0, 1), x.flatten())
        loss.backward()
        m.zero_grad(set_to_none=True)

    return peak_memory(step)


try:
    torch.manual_seed(0)
    ours, dense = DeepSeekV3Mini(mem_cfg), MHABaseline(mem_cfg)
    no_mtp = DeepSeekV3Mini(ModelConfig(vocab_size=data.vocab_size, max_seq_len=256, mtp_depth=0))
    peaks = {"DeepSeekV3Mini (MLA + MoE + MTP)": [train_peak(ours, T) for T in lengths],
             "DeepSeekV3Mini without MTP": [train_peak(no_mtp, T) for T in lengths],
             "dense MHA baseline": [train_peak(dense, T) for T in lengths]}
except NotImplementedError:
    peaks = None
    print("(finish exercises 5.1-5.2.2 to see this figure)")
if peaks is not None:
    print(f"parameters: your DeepSeekV3Mini {ours.num_parameters():,} total / {ours.num_parameters(active=True):,} active "
          f"(+{sum(p.numel() for p in ours.mtp.parameters()):,} MTP); dense MHA baseline {sum(p.numel() for p in dense.parameters()):,}")
    lat, mha = ours.layers[0].attn.new_cache(1, 8), dense.new_caches(1, 8)[0]
    print(f"KV cache per token per layer: MLA latent {lat.elements_per_token} numbers, MHA {mha.elements_per_token} "
          f"({mha.elements_per_token / lat.elements_per_token:.1f}x); at DeepSeek-V3's sizes 576 vs 32768 (56.9x)")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    ctx = np.array([256, 1024, 4096, 16384])
    axes[0].plot(ctx, ctx * lat.bytes_per_token() * mem_cfg.n_layers / 2**10, "o-",
                 label=f"MLA latent ({lat.elements_per_token} per token per layer)")
    axes[0].plot(ctx, ctx * mha.bytes_per_token() * mem_cfg.n_layers / 2**10, "s-", label=f"MHA ({mha.elements_per_token} per token per layer)")
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("cached tokens")
    axes[0].set_ylabel("KV cache, all layers (KiB, float32)")
    axes[0].set_title("Generation: cache memory")
    axes[0].legend(fontsize=8)
    for name, vals in peaks.items():
        axes[1].plot(lengths, np.array(vals) / 2**20, "o-", label=name)
    axes[1].set_xlabel("sequence length T (batch 8)")
    axes[1].set_ylabel("peak memory, fwd + bwd (MiB)")
    axes[1].set_title("Training: activation memory")
    axes[1].legend(fontsize=8)
    fig.suptitle("Memory of your DeepSeekV3Mini vs a dense MHA decoder of the same width and depth")
    fig.tight_layout()
    plt.show()
    print({k: f"{v[-1] / 2**20:.2f} MiB at T={lengths[-1]}" for k, v in peaks.items()})

# %% [markdown]
# ### 5.3.4 How the components interact
# **Expert specialisation.** Which experts does each task use? For each MoE layer, the heatmap shows the share of a
# task's answer-position assignments that each routed expert receives (rows sum to 1), measured on fresh problems. The
# mutual information $I(\text{task};\text{expert})$ summarises it: 0 bits when routing ignores the task, at most
# $\log_2 4 = 2$ bits when every task has its own experts.

# %% [code]
from course_lib.deepseek.training import load_recorded_runs, mutual_information, record_run, routing_by_task


def plot_routing(shares, titles, suptitle):
    fig, axes = plt.subplots(1, len(shares), figsize=(4.6 * len(shares), 3.4), squeeze=False)
    for ax, share, title in zip(axes[0], shares, titles):
        im = ax.imshow(share, cmap="magma", vmin=0, vmax=max(0.5, float(np.max(share))))
        ax.grid(False)
        ax.set_yticks(range(len(data.TASKS)), data.TASKS)
        ax.set_xlabel("routed expert")
        ax.set_title(f"{title}\nI(task; expert) = {mutual_information(share):.2f} bits", fontsize=10)
        fig.colorbar(im, ax=ax, label="share of the task's assignments")
    fig.suptitle(suptitle)
    fig.tight_layout()
    plt.show()


if model is not None:
    share = routing_by_task(model, data).numpy()  # (main MoE layers, tasks, experts)
    mtp_share = None
    with torch.no_grad():  # the MTP block's MoE, on the same problems
        model.eval()
        gen = torch.Generator().manual_seed(4321)
        rows = []
        for task in data.TASKS:
            b = data.sample(128, gen, task=task)
            h, _ = model.trunk(b.inputs)
            _, infos = model.mtp_forward(h, b.inputs)
            idx = infos[0].indices.view(128, -1, CFG.n_activated_experts)[b.answer_mask[:, 1:]]
            rows.append(np.bincount(idx.flatten().numpy(), minlength=CFG.n_routed_experts) / idx.numel())
        mtp_share = np.stack(rows)
    plot_routing([share[0], mtp_share], ["your model, MoE of block 1", "your model, MoE of the MTP block"],
                 f"Expert specialisation after {TRAIN_STEPS} steps")

# %% [markdown]
# **Longer runs, recorded.** The remaining experiments need several training runs each, longer than this notebook's
# budget: `make checkpoints` (`tools/train_checkpoints.py`) recorded them from the same code and recipe, 600 steps
# each. Set `RETRAIN = True` to rerun them here (about a minute per run on a laptop; `RETRAIN_STEPS` sets their length).

# %% [code]
RETRAIN = False
RETRAIN_STEPS = sizes(60, 300)
runs = None if RETRAIN else load_recorded_runs()
if runs is None:
    print(f"training the comparison runs here ({RETRAIN_STEPS} steps each) ...")
    runs = {"meta": {"steps": RETRAIN_STEPS, "seeds": [0]},
            "runs": {f"{name}/seed0": record_run(name, steps=RETRAIN_STEPS, seed=0, model_cls=DeepSeekV3Mini, step_fn=train_step,
                                                        fp8_linear=FP8_LINEAR)
                     for name in ("baseline", "no_balance", "no_mtp", "fp8")}}
R = runs["runs"]
SEEDS = runs["meta"]["seeds"]
print(f"recorded runs: {sorted(R)} ({runs['meta']['steps']} steps each)")
base0 = R["baseline/seed0"]
plot_routing([np.array(base0["routing_by_task"][0]), np.array(R["no_balance/seed0"]["routing_by_task"][0])],
             ["with balancing (bias + balance loss)", "without balancing"],
             f"Expert specialisation after {runs['meta']['steps']} steps (recorded, block 1)")


# %% [markdown]
# **Routing collapse without balancing.** With no bias update and no balance loss, nothing stops the router from
# sending more and more tokens to the experts that happened to win early: they get more gradient, improve, and win
# more. The auxiliary-loss-free bias counteracts it step by step ($\pm\gamma$ per step) without adding a loss that
# fights the language-modelling objective. At this scale (8 experts, 600 steps) the drift is gradual rather than a
# total collapse: watch the MaxVio gap open, most clearly in the MTP block's MoE.

# %% [code]
def smooth(x, k=10):
    x = np.asarray(x, dtype=float)
    return np.convolve(x, np.ones(k) / k, mode="valid") if len(x) > k else x


nb0 = R["no_balance/seed0"]
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
for run_, label in ((base0, "with balancing"), (nb0, "without balancing")):
    mv = np.array(run_["max_vio_per_layer"])  # (steps, MoE layers)
    axes[0].plot(smooth(mv[:, 0]), label=f"{label}, block 1")
    axes[0].plot(smooth(mv[:, 1]), ls="--", label=f"{label}, MTP block")
axes[0].set_xlabel("training step")
axes[0].set_ylabel("MaxVio = max load / mean load - 1")
axes[0].set_title("Imbalance over training (10-step mean)")
axes[0].legend(fontsize=7)
E = CFG.n_routed_experts
w = 0.4
for k, (run_, label) in enumerate(((base0, "with balancing"), (nb0, "without balancing"))):
    final = np.array(run_["loads"][-1][0], dtype=float)
    axes[1].bar(np.arange(E) + (k - 0.5) * w, final / final.sum(), width=w, label=label)
axes[1].axhline(1 / E, color="k", ls=":", label="perfect balance")
axes[1].set_xlabel("routed expert (block 1)")
axes[1].set_ylabel("share of the batch's assignments")
axes[1].set_title("Final load per expert")
axes[1].legend(fontsize=7)
axes[2].bar(np.arange(E), base0["gate_bias"][0])
axes[2].set_xlabel("routed expert (block 1)")
axes[2].set_ylabel("gate bias b_i")
axes[2].set_title("Learned balancing bias (with balancing)")
fig.tight_layout()
plt.show()
tail = lambda r, k: float(np.mean(np.array(r["max_vio_per_layer"])[-50:, k]))
print(f"MaxVio, mean of the last 50 steps: block 1 {tail(base0, 0):.2f} with balancing vs {tail(nb0, 0):.2f} without; "
      f"MTP block {tail(base0, 1):.2f} vs {tail(nb0, 1):.2f}")
print(f"final held-out token accuracy: {base0['evals'][-1]['token_acc']:.3f} with balancing, {nb0['evals'][-1]['token_acc']:.3f} without")

# %% [markdown]
# **MTP on vs off.** Does predicting the token after next help the next-token model? Compare the *main* loss (the MTP
# run's total loss also contains the MTP term) and the held-out accuracy, over the recorded seeds.

# %% [code]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
summary = {}
for name, label in (("baseline", "MTP depth 1 (lambda = 0.3)"), ("no_mtp", "no MTP")):
    seeds_ = [s for s in SEEDS if f"{name}/seed{s}" in R]
    main = np.array([smooth(R[f"{name}/seed{s}"]["main_loss"]) for s in seeds_])
    acc = np.array([[e["token_acc"] for e in R[f"{name}/seed{s}"]["evals"]] for s in seeds_])
    ev_steps = [e["step"] for e in R[f"{name}/seed{seeds_[0]}"]["evals"]]
    line = axes[0].plot(main.mean(0), label=f"{label} ({len(seeds_)} seeds)")[0]
    axes[0].fill_between(np.arange(main.shape[1]), main.min(0), main.max(0), color=line.get_color(), alpha=0.2)
    axes[1].plot(ev_steps, acc.mean(0), "o-", color=line.get_color(), label=label)
    axes[1].fill_between(ev_steps, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
    summary[label] = (float(acc[:, -1].mean()), float(acc[:, -1].min()), float(acc[:, -1].max()))
axes[0].set_xlabel("training step")
axes[0].set_ylabel("main (next-token) loss, 10-step mean (nats)")
axes[0].set_title("Main loss, mean and range over seeds")
axes[0].legend(fontsize=8)
axes[1].set_xlabel("training step")
axes[1].set_ylabel("held-out answer-token accuracy")
axes[1].set_title("Held-out accuracy, mean and range over seeds")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()
for label, (mean_, lo, hi) in summary.items():
    print(f"{label:28s} final token accuracy {mean_:.3f} (range {lo:.3f}-{hi:.3f})")

# %% [markdown]
# **Why both ablations come out small here.** Neither balancing nor MTP is meant to raise this task's accuracy.
# Balancing exists for throughput: without it a few experts take most tokens, so in an expert-parallel cluster their
# GPUs set the pace and, with a capacity limit, tokens are dropped. This model runs on one CPU with no capacity
# limit, so an unbalanced router costs nothing but the MaxVio above. MTP densifies the training signal (each position
# also learns the token after next); DeepSeek-V3's ablations measure its gain on MoE models of 16B and 229B
# parameters trained on 1.33T and 540B tokens. Here the answers are fixed by the prompt, the model is tiny and the run
# is 300 steps, so the extra target adds little the main loss does not already teach, and differences between seeds
# are as large as the effect: a null result at this scale is the expected one, not a bug.

# %% [markdown]
# **FP8 vs FP32.** The same run with every linear layer of the blocks on emulated FP8 GEMMs (E4M3 inputs, 1x128 tiles
# for activations and gradients, 128x128 blocks for weights, FP32 master weights and accumulation; embedding, head,
# router and attention core in FP32), Section 4's recipe. DeepSeek-V3 reports a relative loss error below 0.25%
# against BF16 at scale. Here every matrix is narrower than one 128-wide tile, so each scale covers a whole row:
# compare the gap below with DeepSeek's figure. With `RETRAIN = True` the FP8 run uses the FP8 linear layer named by
# the first cell: yours from Section 4 (its operands zero-padded to the tile, which changes no scale) where it passed
# the check, the course's otherwise. Yours multiplies the padded matrices, so the run is somewhat slower (1.1x per
# step with the worked Section 4 answer); its length stays the same.

# %% [code]
fp = R["fp8/seed0"]
fig, ax = plt.subplots()
ax.plot(smooth(base0["loss"]), label="FP32 GEMMs")
ax.plot(smooth(fp["loss"]), label="FP8 GEMMs (emulated, E4M3, fine-grained scaling)")
ax.set_xlabel("training step")
ax.set_ylabel("training loss, 10-step mean (nats)")
ax.set_title("FP8 vs FP32 training, same seed and data")
ax.legend()
plt.show()
last = lambda r: float(np.mean(r["loss"][-50:]))
print(f"mean loss over the last 50 steps: FP32 {last(base0):.4f}, FP8 {last(fp):.4f} "
      f"(relative difference {100 * (last(fp) - last(base0)) / last(base0):+.1f}%); "
      f"held-out token accuracy {base0['evals'][-1]['token_acc']:.3f} vs {fp['evals'][-1]['token_acc']:.3f}")

# %% [markdown]
# ### 5.3.5 Your model is DeepSeek-V3
# Hugging Face transformers ships the DeepSeek-V3 architecture as `DeepseekV3ForCausalLM`, the class that loads the
# released checkpoint. `course_lib.deepseek.hf` maps weights between the two: `attn.wkv_a` becomes
# `self_attn.kv_a_proj_with_mqa`, the routed experts are stacked into `mlp.experts.gate_up_proj`, the gate bias becomes
# `e_score_correction_bias`, and so on. Below, your trained weights go into a `DeepseekV3ForCausalLM` built from a
# matching `DeepseekV3Config`. Two differences are expected: HF has no MTP module (it skips the checkpoint's layer
# 61), and it computes RoPE tables, norms and the router in float32, which leaves float32 round-off.

# %% [code]
if model is not None:
    from course_lib.deepseek.hf import hf_config, to_hf

    hf = to_hf(model)  # your trained weights, by the attribute names your classes use
    hcfg = hf_config(model.cfg)
    print(f"{type(hf).__name__}: {hcfg.num_hidden_layers} layers (first_k_dense_replace={hcfg.first_k_dense_replace}), "
          f"{hcfg.n_routed_experts} routed experts, top-{hcfg.num_experts_per_tok}, rope_interleave={hcfg.rope_interleave}, "
          f"{sum(p.numel() for p in hf.parameters()):,} parameters (yours without MTP: {model.num_parameters():,})")
    batch = data.sample(64, torch.Generator().manual_seed(99))
    with torch.no_grad():
        ours_logits = model.eval()(batch.inputs)
        hf_logits = hf(batch.inputs).logits
    print(f"max |your logits - DeepseekV3ForCausalLM logits| = {float((ours_logits - hf_logits).abs().max()):.2e} "
          f"(logits up to {float(ours_logits.abs().max()):.1f})")
    prompt = torch.tensor([data.problem("reverse", [1, 2, 3, 4]), data.problem("copy", [9, 8, 7, 6])])
    try:
        mine = model.generate(prompt, 5)
        theirs = hf.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=data.pad, attention_mask=torch.ones_like(prompt))
        print("your generate:", [data.decode(r) for r in mine], "\nHF generate:  ", [data.decode(r) for r in theirs])
        print("identical tokens:", bool(torch.equal(mine, theirs)))
    except NotImplementedError:
        print("implement generate to compare decoding")

# %% [markdown]
# ## Optional challenge (ungraded)
# 1. **Speculative decoding with your MTP head.** Use the depth-1 prediction as a draft for $t_{i+2}$, verify it with
#    the main model on the next step, and measure the acceptance rate on the multi-task language (DeepSeek report
#    85–90% on real text).
# 2. **Group-limited routing.** Retrain with 16 experts in 4 groups, `n_limited_groups = 2`, and check that the
#    specialisation heatmap respects the groups.
# 3. **Where do the dense layers belong?** Compare `n_dense_layers = 0, 1, 2` at equal active parameters: which gives
#    the lowest MaxVio early in training?

# %% [markdown]
# ### Worked challenge 1: how often would the MTP draft be accepted?
# In speculative decoding the depth-1 MTP prediction at position $i$ is a draft for $t_{i+2}$; the main model,
# run one step later, accepts it when its own greedy prediction of $t_{i+2}$ (at position $i+1$) is the same token.
# Measure that acceptance rate on fresh answer positions of the multi-task language with the model you trained.

# %% [solution id=ex_05_c1_mtp_acceptance]
def mtp_acceptance(model: DeepSeekV3Mini, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of scored positions (targets two ahead != IGNORE_INDEX) where the depth-1 MTP draft for t_{i+2} equals
    the main model's greedy prediction of the same token. inputs, targets: (B, T)."""
    ### BEGIN SOLUTION
    model.eval()
    with torch.no_grad():
        h, _ = model.trunk(inputs)  # (B, T, dim)
        main = model.head(model.norm(h)).argmax(-1)  # (B, T): position i predicts t_{i+1}
        draft = model.mtp_forward(h, inputs)[0][0].argmax(-1)  # (B, T - 1): position i predicts t_{i+2}
    scored = targets[:, 1:] != IGNORE_INDEX  # (B, T - 1): t_{i+2} is an answer token
    agree = (draft == main[:, 1:]) & scored
    return float(agree.sum() / scored.sum().clamp_min(1))
    ### END SOLUTION


# %% [code]
try:
    if model is None:
        raise NotImplementedError
    _b = data.sample(512, torch.Generator().manual_seed(99))
    print(f"MTP draft accepted at {mtp_acceptance(model, _b.inputs, _b.targets):.0%} of answer positions "
          "(DeepSeek report 85-90% for V3's second token on real text)")
except NotImplementedError:
    print("(optional: train the model above and write mtp_acceptance to measure the acceptance rate)")

# %% [markdown]
# ### Worked challenge 2: does the routing respect the groups?
# With `n_expert_groups = 4` and `n_limited_groups = 2`, each token first picks its 2 best groups of 4 experts (a
# group scores by the sum of its two best affinities) and then its top 4 experts inside those 8 only (V3 report,
# section 2.1.2: in V3 a token reaches at most 4 nodes). Retrain a small model with 16 experts that way, and check two
# things: every token's experts lie in at most 2 groups (the rule), and how the tasks' traffic spreads over the
# groups (the heatmap, group boundaries drawn). A short run is enough for the first; the second sharpens with training.

# %% [solution id=ex_05_c2_group_routing]
def group_usage(model: DeepSeekV3Mini, data: MultiTaskLanguage, per_task: int = 64, seed: int = 0) -> tuple[np.ndarray, int]:
    """Routing of the MoE of block 1 on ``per_task`` fresh problems of each task: the share of each task's expert
    assignments (tasks, experts; rows sum to 1) and the largest number of groups any one token's experts fall in."""
    ### BEGIN SOLUTION
    cfg = model.cfg
    per_group = cfg.n_routed_experts // cfg.n_expert_groups
    gen = torch.Generator().manual_seed(seed)
    rows, most = [], 0
    model.eval()
    with torch.no_grad():
        for task in data.TASKS:
            idx = model.trunk(data.sample(per_task, gen, task=task).inputs)[1][0].indices  # (tokens, K)
            groups = idx // per_group  # (tokens, K): the group of each chosen expert
            hit = torch.zeros(idx.shape[0], cfg.n_expert_groups, dtype=torch.bool).scatter_(1, groups, True)
            most = max(most, int(hit.sum(1).max()))
            rows.append(np.bincount(idx.flatten().numpy(), minlength=cfg.n_routed_experts) / idx.numel())
    return np.stack(rows), most
    ### END SOLUTION


# %% [code]
CHALLENGE_STEPS = 20  # a few seconds per run; raise it (150, 300) to watch the groups' specialisation sharpen
try:
    torch.manual_seed(0)
    gcfg = ModelConfig(vocab_size=data.vocab_size, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
                       n_limited_groups=2, moe_inter_dim=16)
    gmodel = init_weights(DeepSeekV3Mini(gcfg), seed=0, std=RECIPE["init_std"])
    train(gmodel, data, steps=CHALLENGE_STEPS, batch_size=32, lr=RECIPE["lr"], warmup=5, seed=0,
          eval_every=CHALLENGE_STEPS, step_fn=train_step, eval_batch=64)
    gshare, gmost = group_usage(gmodel, data)
    fig, ax = plt.subplots(figsize=(7, 2.8))
    im = ax.imshow(gshare, cmap="magma", aspect="auto")
    ax.grid(False)
    for b in range(1, gcfg.n_expert_groups):
        ax.axvline(b * gcfg.n_routed_experts // gcfg.n_expert_groups - 0.5, color="w", lw=2)
    ax.set_yticks(range(len(data.TASKS)), data.TASKS)
    ax.set_xlabel("routed expert (white lines: group boundaries)")
    ax.set_title(f"Group-limited routing after {CHALLENGE_STEPS} steps, MoE of block 1")
    fig.colorbar(im, ax=ax, label="share of the task's assignments")
    plt.show()
    by_group = gshare.reshape(len(data.TASKS), gcfg.n_expert_groups, -1).sum(-1)  # (tasks, groups)
    print(f"most groups one token's {gcfg.n_activated_experts} experts fall in: {gmost} (limit {gcfg.n_limited_groups})")
    print("share of each task's traffic per group:", {t: np.round(r, 2).tolist() for t, r in zip(data.TASKS, by_group)})
except NotImplementedError:
    print("(optional: finish the exercises above and write group_usage to retrain with group-limited routing)")

# %% [markdown]
# ### Worked challenge 3: where do the dense layers belong?
# Train three variants for a few dozen steps, with `n_dense_layers = 0, 1, 2` of the 2 blocks. For equal active
# parameters the dense FFN is as wide as what a token runs in an MoE layer: `inter_dim = (N_s + K_r) * moe_inter_dim`.
# Compare their MaxVio early in training, per MoE layer (the MTP block, layer 2, has an MoE in all three variants).
# DeepSeekMoE kept its first layer dense because a first-layer MoE balanced slowly; read the printout with that in
# mind, and with the caveat of one seed and 20 steps: differences of a few tenths of MaxVio are within seed noise here.

# %% [solution id=ex_05_c3_dense_layers]
def early_max_vio(history: dict, first: int = 20) -> list[float]:
    """Mean MaxVio of each MoE layer over the first ``first`` steps of a run (``TrainResult.history``, whose
    ``"load"`` holds one (MoE layers, experts) list of loads per step)."""
    ### BEGIN SOLUTION
    loads = torch.tensor(history["load"][:first], dtype=torch.float64)  # (steps, MoE layers, E)
    vio = loads.amax(-1) / loads.mean(-1) - 1  # (steps, MoE layers)
    return vio.mean(0).tolist()
    ### END SOLUTION


# %% [code]
try:
    early = {}
    for n_dense in (0, 1, 2):
        torch.manual_seed(0)
        dcfg = ModelConfig(vocab_size=data.vocab_size, n_dense_layers=n_dense,
                           inter_dim=(CFG.n_shared_experts + CFG.n_activated_experts) * CFG.moe_inter_dim)
        dmodel = init_weights(DeepSeekV3Mini(dcfg), seed=0, std=RECIPE["init_std"])
        res = train(dmodel, data, steps=CHALLENGE_STEPS, batch_size=32, lr=RECIPE["lr"], warmup=5, seed=0,
                    eval_every=CHALLENGE_STEPS, step_fn=train_step, eval_batch=64)
        layers = [i for i in range(dcfg.n_layers + dcfg.mtp_depth) if dcfg.is_moe_layer(i)]
        early[n_dense] = dict(zip(layers, early_max_vio(res.history, CHALLENGE_STEPS)))
    for n_dense, per_layer in early.items():
        print(f"n_dense_layers = {n_dense}: mean MaxVio over the first steps, per MoE layer: "
              + ", ".join(f"layer {i} {v:.2f}" for i, v in per_layer.items()))
    print("MTP block (layer 2), the MoE all three share:", {n: round(v[2], 2) for n, v in early.items()})
except NotImplementedError:
    print("(optional: finish the exercises above and write early_max_vio to compare the variants)")

# %% [markdown]
# ## Summary
# - A DeepSeek-V3 block is pre-norm: $u = h + \mathrm{MLA}(\mathrm{norm}(h))$, $h' = u + \mathrm{FFN}(\mathrm{norm}(u))$,
#   dense FFN in the first `n_dense_layers` blocks and DeepSeekMoE after.
# - MTP adds, per depth, one block and one $d\times 2d$ projection on $[\mathrm{norm}(h);\mathrm{norm}(\mathrm{Emb}(t_{i+k}))]$,
#   shares the embedding and the head, and predicts $t_{i+k+1}$; the loss is $\mathcal{L}_{\text{main}} + \frac{\lambda}{D}\sum_k\mathcal{L}^k_{\text{MTP}}$ plus the balance losses.
# - Total vs active parameters: 671B vs 36.6B for V3 (DeepSeek's "37B activated"), because a token runs 8 of 256 routed experts
#   per MoE layer and reads one row of the embedding table.
# - Decoding prefills the latent cache once and feeds one token per step on the absorbed path: 576 numbers per token per
#   layer at V3's sizes.
# - The training step's order matters: loss, backward, clip, optimiser step, then the bias update with this batch's loads.
# - Validation beyond the loss curve: causality, gradient flow, memory (cache vs activations), specialisation, balance,
#   MTP and FP8 ablations, and parity with an independent implementation.
#
# ## Troubleshooting
# | symptom | likely cause | fix |
# |---|---|---|
# | `NotImplementedError: exercise not implemented yet` | a stub is still in place | replace the `raise` line in that method |
# | block output differs, "post-norm" or "parallel" in the message | norm after the addition, or the FFN reading `x` | pre-norm: each sub-layer reads the normalised residual stream and adds its output back; the FFN reads the stream after attention |
# | `too many values to unpack` in the block | the MoE returns `(y, info)`, SwiGLU returns `y` | branch on the kind of feed-forward layer the block holds |
# | `copy_weights`: "no source weights for ..." | an attribute named differently from the docstring | use the names listed in the class docstring |
# | MTP loss wrong only by the target | scored against the next tokens instead of the tokens $k$ further on | depth $k$ at position $i$ predicts token $i+k+1$ |
# | cached generation differs from `use_cache=False` | wrong `start_pos`, or re-feeding the whole sequence into the cache | prefill at position 0, then feed each new token at the next free position |
# | biases move by $2\gamma$ or before the step | `update_biases` called twice, or before the optimiser step | once per step, after the optimiser step, with the loads of this step's forward |
# | training stalls far from the target | gradients accumulate (no `zero_grad`) or the balancing never runs | check `train_step` against its docstring |
# | `ModuleNotFoundError: transformers` in 5.3.5 | the course's dev dependency is missing | `make install` (or `pip install transformers`) |
#
# **Next:** Section 6 takes the model to production: modular code, performance, and scaling across devices.

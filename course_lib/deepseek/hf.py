"""Weights between ``DeepSeekV3Mini`` and HF transformers' ``DeepseekV3ForCausalLM`` (transformers >= 5), both ways.

The converter works on any module with the course's attribute names (the learner's model in Section 5's
parity demo, the reference elsewhere) and never imports the reference model: a Section 5 grading kernel may
import this module but not ``course_lib.deepseek.model``. Building a ``DeepSeekV3Mini`` from HF weights is
``course_lib.deepseek.model.from_hf`` (on ``state_dict_from_hf`` here).

Two HF layouts:

- the **hub checkpoint** (safetensors of ``deepseek-ai/DeepSeek-V3``): one tensor per expert, and the MTP
  module stored as an extra layer ``model.layers.{n_layers + k}`` (``to_hf_checkpoint``/``from_hf_checkpoint``);
- the **transformers module** (``DeepseekV3ForCausalLM.state_dict()``): experts stacked into
  ``mlp.experts.gate_up_proj`` (E, 2I, dim) and ``mlp.experts.down_proj`` (E, dim, I), and no MTP
  (``to_hf``/``from_hf``, ``stack_experts``/``unstack_experts``).

Names (``L`` a layer index, ``k`` an MTP depth, ``n = n_layers``)::

    ours                                    hub checkpoint
    embed.weight                            model.embed_tokens.weight
    layers.L.attn_norm.weight               model.layers.L.input_layernorm.weight
    layers.L.attn.{wq_a,q_norm,wq_b,wq,     model.layers.L.self_attn.{q_a_proj,q_a_layernorm,q_b_proj,q_proj,
        wkv_a,kv_norm,wkv_b,wo}.weight          kv_a_proj_with_mqa,kv_a_layernorm,kv_b_proj,o_proj}.weight
    layers.L.ffn_norm.weight                model.layers.L.post_attention_layernorm.weight
    layers.L.ffn.{w1,w3,w2}.weight          model.layers.L.mlp.{gate_proj,up_proj,down_proj}.weight     (dense)
    layers.L.ffn.gate.weight / .bias        model.layers.L.mlp.gate.weight / .e_score_correction_bias   (MoE)
    layers.L.ffn.experts.e.{w1,w3,w2}       model.layers.L.mlp.experts.e.{gate_proj,up_proj,down_proj}
    layers.L.ffn.shared_experts.{w1,w3,w2}  model.layers.L.mlp.shared_experts.{gate_proj,up_proj,down_proj}
    norm.weight / head.weight               model.norm.weight / lm_head.weight
    mtp.k.{hnorm,enorm}.weight              model.layers.{n+k}.{hnorm,enorm}.weight
    mtp.k.proj.weight                       model.layers.{n+k}.eh_proj.weight       (column halves swapped, below)
    mtp.k.norm.weight                       model.layers.{n+k}.shared_head.norm.weight
    mtp.k.block.*                           model.layers.{n+k}.* as a decoder layer
    (shared) embed.weight, head.weight      model.layers.{n+k}.embed_tokens.weight, .shared_head.head.weight (copies)

Where the two differ, on purpose or by convention:

- **RoPE layout.** The course rotates interleaved pairs ``(x[2i], x[2i+1])`` (DeepSeek's code).
  ``rope_interleave=True`` (HF's default for this model) reads the same weights: it de-interleaves q and k
  identically before rotating, so every score is unchanged. With ``rope_interleave=False`` HF rotates
  ``(x[i], x[i + d/2])``; the converter then permutes the rope rows of ``wq_b``/``wq`` (per head) and of
  ``wkv_a`` by ``[0, 2, 4, ..., 1, 3, 5, ...]`` so the same pairs meet the same frequencies.
- **MTP.** ``DeepseekV3ForCausalLM`` has no MTP module (it ignores ``model.layers.61.*`` when loading the
  hub checkpoint). ``to_hf`` drops ours; ``to_hf_checkpoint(include_mtp=True)`` exports it under the hub
  names. The hub's ``eh_proj`` acts on ``[enorm(emb) ; hnorm(h)]`` (embedding first, as vLLM and SGLang
  load it) while ours follows the paper's ``[hnorm(h) ; enorm(emb)]``: the two column halves are swapped.
- **Group masking.** transformers 5.x fills the experts of dropped groups with ``-inf`` like DeepSeek's code
  (and ours); transformers 4.x used ``0.0``, which routes outside the kept groups once biased scores turn
  negative (``ModelConfig.group_mask_fill = 0.0`` reproduces it).
- **YaRN.** ``hf_config`` writes ``rope_parameters`` of type ``yarn`` when the config's YaRN is active (DeepSeek
  applies it only for ``max_seq_len > original_seq_len``; HF whenever the type is yarn): ``factor``,
  ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, and DeepSeek's ``mscale`` as both ``mscale`` and
  ``mscale_all_dim`` with ``attention_factor`` 1.0, so that HF multiplies the softmax scale by mscale^2 and leaves
  cos/sin unscaled, as DeepSeek does. ``config_from_hf`` reads it back (also the hub's legacy ``rope_scaling``, which
  transformers standardises) and refuses a yarn setting DeepSeek's code cannot express.
- **Precision islands.** HF computes the RoPE angles, RMSNorm statistics, the router and the eager attention
  softmax in float32 even for a float64 model (logits then differ by ~2e-6; ~1e-14 with those lifted to float64,
  see ``tests/test_hf_parity.py``), and its ``q_a_layernorm``/``kv_a_layernorm`` always use eps = 1e-6
  (``hf_config`` refuses another ``rms_norm_eps``).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from course_lib.deepseek.mla import HF_NAMES as MLA_HF_NAMES
from course_lib.deepseek.model_config import ModelConfig
from course_lib.deepseek.moe import HF_EXPERT_NAMES

__all__ = [
    "hf_config",
    "config_from_hf",
    "rope_permutation",
    "hf_name",
    "to_hf_checkpoint",
    "from_hf_checkpoint",
    "stack_experts",
    "unstack_experts",
    "to_hf",
    "state_dict_from_hf",
    "state_dict_names",
    "load_into_hf",
]

HF_EPS = 1e-6  # HF's q_a_layernorm / kv_a_layernorm are built without the config's eps


def hf_config(cfg: ModelConfig, *, rope_interleave: bool = True, attn_implementation: str = "eager",
              experts_implementation: str = "eager", **overrides):
    """A ``transformers.DeepseekV3Config`` describing the same network as ``cfg`` (MTP excluded).

    ``cfg.fp8`` is ignored: an FP8 model's FP32 master weights run in HF's dtype, a different (higher
    precision) function.
    """
    from transformers import DeepseekV3Config

    if cfg.group_mask_fill != float("-inf"):
        raise ValueError("transformers 5.x masks dropped expert groups with -inf; group_mask_fill=0.0 is transformers 4.x's")
    if cfg.rms_norm_eps != HF_EPS:
        raise ValueError(f"HF builds q_a_layernorm and kv_a_layernorm with eps={HF_EPS}; rms_norm_eps={cfg.rms_norm_eps} would not match")
    kw = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.inter_dim, moe_intermediate_size=cfg.moe_inter_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts, routed_scaling_factor=cfg.route_scale,
        kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank or None, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim, n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
        num_experts_per_tok=cfg.n_activated_experts, first_k_dense_replace=cfg.n_dense_layers, norm_topk_prob=True, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=_rope_parameters(cfg), rope_interleave=rope_interleave,
        tie_word_embeddings=False, attention_bias=False, num_mtp_layers=cfg.mtp_depth, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, attn_implementation=attn_implementation, experts_implementation=experts_implementation,
    )
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def _rope_parameters(cfg: ModelConfig) -> dict:
    """HF's ``rope_parameters`` for ``cfg``: ``default``, or ``yarn`` with DeepSeek's semantics when YaRN is active."""
    if not cfg.mla().yarn:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": float(cfg.rope_factor),
            "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
            "mscale": float(cfg.mscale), "mscale_all_dim": float(cfg.mscale), "attention_factor": 1.0}


def _yarn_from_hf(hcfg, rope: dict) -> dict:
    """``ModelConfig`` fields of an HF yarn setting, or ``ValueError`` where DeepSeek's code would compute otherwise."""
    if not rope.get("original_max_position_embeddings"):
        raise ValueError("YaRN (rope_type 'yarn') needs original_max_position_embeddings, DeepSeek's original_seq_len")
    original = int(rope["original_max_position_embeddings"])
    factor = rope.get("factor") or hcfg.max_position_embeddings / original
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")

    def get_mscale(m: float) -> float:  # HF's yarn_get_mscale
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    cos_sin = rope.get("attention_factor")
    if cos_sin is None:
        cos_sin = get_mscale(mscale) / get_mscale(mscale_all_dim) if mscale and mscale_all_dim else get_mscale(1.0)
    if abs(cos_sin - 1.0) > 1e-12:
        raise ValueError(f"this YaRN setting scales cos/sin by {cos_sin:.6g}; DeepSeek's YaRN never does (it scales the "
                         "softmax by mscale^2): use mscale == mscale_all_dim, or attention_factor=1.0")
    if not rope.get("truncate", True):
        raise ValueError("YaRN with truncate=False: DeepSeek rounds the correction range (truncate=True)")
    if hcfg.max_position_embeddings <= original:
        raise ValueError(f"YaRN with max_position_embeddings {hcfg.max_position_embeddings} <= original_max_position_embeddings "
                         f"{original}: HF applies it there, DeepSeek's code (YaRN only beyond original_seq_len) does not")
    return dict(rope_scaling="yarn", original_seq_len=original, rope_factor=float(factor),
                beta_fast=rope.get("beta_fast") or 32, beta_slow=rope.get("beta_slow") or 1, mscale=float(mscale_all_dim or 0.0),
                max_seq_len=hcfg.max_position_embeddings)


def config_from_hf(hcfg, **overrides) -> ModelConfig:
    """The ``ModelConfig`` of a ``DeepseekV3Config`` (``mtp_depth`` 0 unless overridden: HF's module has no MTP).

    ``rope_parameters`` of type ``default`` keep ``max_seq_len`` at most 4096; ``yarn`` gives ``rope_scaling="yarn"``
    with ``max_seq_len = max_position_embeddings`` (see the module docstring); other types are refused.
    """
    rope = dict(hcfg.rope_parameters or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"rope_type {rope_type!r} is not DeepSeek-V3's (default or yarn)")
    yarn = _yarn_from_hf(hcfg, rope) if rope_type == "yarn" else {"max_seq_len": min(hcfg.max_position_embeddings, 4096)}
    if not hcfg.norm_topk_prob or hcfg.hidden_act != "silu" or hcfg.attention_bias:
        raise ValueError("only norm_topk_prob=True, hidden_act='silu' and attention_bias=False match DeepSeek-V3")
    if hcfg.num_key_value_heads != hcfg.num_attention_heads:
        raise ValueError("MLA has as many key/value heads as query heads")
    kw = dict(
        vocab_size=hcfg.vocab_size, dim=hcfg.hidden_size, n_layers=hcfg.num_hidden_layers,
        n_dense_layers=min(hcfg.first_k_dense_replace, hcfg.num_hidden_layers), n_heads=hcfg.num_attention_heads,
        inter_dim=hcfg.intermediate_size, q_lora_rank=hcfg.q_lora_rank or 0, kv_lora_rank=hcfg.kv_lora_rank,
        qk_nope_head_dim=hcfg.qk_nope_head_dim, qk_rope_head_dim=hcfg.qk_rope_head_dim, v_head_dim=hcfg.v_head_dim,
        moe_inter_dim=hcfg.moe_intermediate_size, n_routed_experts=hcfg.n_routed_experts, n_shared_experts=hcfg.n_shared_experts,
        n_activated_experts=hcfg.num_experts_per_tok, n_expert_groups=hcfg.n_group, n_limited_groups=hcfg.topk_group,
        route_scale=hcfg.routed_scaling_factor, mtp_depth=0, rope_theta=float(rope.get("rope_theta", 10000.0)),
        rms_norm_eps=hcfg.rms_norm_eps, **yarn,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def rope_permutation(d: int) -> torch.Tensor:
    """``[0, 2, 4, ..., 1, 3, 5, ...]``: interleaved pairs (2i, 2i+1) -> half-split pairs (i, i + d/2)."""
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])


# ---------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------


def _block_name(rest: str) -> str:
    """A name inside one TransformerBlock -> the name inside an HF decoder layer."""
    if rest == "attn_norm.weight":
        return "input_layernorm.weight"
    if rest == "ffn_norm.weight":
        return "post_attention_layernorm.weight"
    if rest.startswith("attn."):
        mod, tail = rest[len("attn."):].split(".", 1)
        return f"self_attn.{MLA_HF_NAMES[mod]}.{tail}"
    if rest == "ffn.gate.bias":
        return "mlp.gate.e_score_correction_bias"
    if rest.startswith("ffn."):
        parts = rest[len("ffn."):].split(".")
        return "mlp." + ".".join(HF_EXPERT_NAMES.get(p, p) for p in parts)  # w1 -> gate_proj, w3 -> up_proj, w2 -> down_proj
    raise KeyError(f"no HF name for block parameter {rest!r}")


def hf_name(name: str, n_layers: int) -> list[str]:
    """HF hub-checkpoint names of one of our state-dict entries (shared tensors map to several names)."""
    if name == "embed.weight":
        return ["model.embed_tokens.weight"]
    if name == "norm.weight":
        return ["model.norm.weight"]
    if name == "head.weight":
        return ["lm_head.weight"]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        return [f"model.layers.{m[1]}.{_block_name(m[2])}"]
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    if m:
        L, rest = n_layers + int(m[1]), m[2]
        simple = {"hnorm.weight": "hnorm.weight", "enorm.weight": "enorm.weight", "proj.weight": "eh_proj.weight",
                  "norm.weight": "shared_head.norm.weight"}
        if rest in simple:
            return [f"model.layers.{L}.{simple[rest]}"]
        if rest.startswith("block."):
            return [f"model.layers.{L}.{_block_name(rest[len('block.'):])}"]
    raise KeyError(f"no HF name for {name!r}")


def _is_q_weight(name: str) -> bool:
    return bool(re.search(r"attn\.(wq_b|wq)\.weight$", name))


def _permute_rope(name: str, w: torch.Tensor, cfg: ModelConfig, inverse: bool) -> torch.Tensor:
    """Reorder the rope rows of ``wq_b``/``wq`` (per head) and ``wkv_a`` between the two RoPE layouts."""
    perm = rope_permutation(cfg.qk_rope_head_dim)
    if inverse:
        perm = torch.argsort(perm)
    if _is_q_weight(name):
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        w = w.view(cfg.n_heads, qk, -1)  # (H, d_h + d_h^R, in)
        rope = w[:, cfg.qk_nope_head_dim:][:, perm]  # (H, d_h^R, in)
        return torch.cat([w[:, : cfg.qk_nope_head_dim], rope], dim=1).reshape(cfg.n_heads * qk, -1)
    if name.endswith("attn.wkv_a.weight"):
        return torch.cat([w[: cfg.kv_lora_rank], w[cfg.kv_lora_rank:][perm]], dim=0)  # (d_c + d_h^R, dim)
    return w


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """eh_proj: columns [a ; b] -> [b ; a]."""
    d = w.shape[1] // 2
    return torch.cat([w[:, d:], w[:, :d]], dim=1)


# ---------------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------------


def _transform(name: str, w: torch.Tensor, cfg: ModelConfig, rope_interleave: bool, inverse: bool) -> torch.Tensor:
    if not rope_interleave and (_is_q_weight(name) or name.endswith("attn.wkv_a.weight")):
        w = _permute_rope(name, w, cfg, inverse)
    if re.fullmatch(r"mtp\.\d+\.proj\.weight", name):
        w = _swap_halves(w)
    return w


def to_hf_checkpoint(model: nn.Module, *, include_mtp: bool = True, rope_interleave: bool = True) -> dict[str, torch.Tensor]:
    """Our weights under the HF hub-checkpoint names (one tensor per expert; MTP as layer ``n_layers + k``)."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    for name, w in model.state_dict().items():
        if name.startswith("mtp.") and not include_mtp:
            continue
        w = _transform(name, w.detach(), cfg, rope_interleave, inverse=False)
        for key in hf_name(name, cfg.n_layers):
            out[key] = w.clone()
    if include_mtp:
        for k in range(len(model.mtp)):
            L = cfg.n_layers + k
            out[f"model.layers.{L}.embed_tokens.weight"] = model.embed.weight.detach().clone()  # shared, stored again
            out[f"model.layers.{L}.shared_head.head.weight"] = model.head.weight.detach().clone()
    return out


def state_dict_names(cfg: ModelConfig) -> list[str]:
    """The state-dict names of ``DeepSeekV3Mini(cfg)``, in its order, from its parts (nothing is allocated).

    Built from the blocks' given parts (MLA, DeepSeekMoE, SwiGLU) and the attribute names the model fixes, so
    this module never needs the model itself (a Section 5 kernel may import it, not the reference model).
    """
    from course_lib.deepseek.common import SwiGLU
    from course_lib.deepseek.mla import MLA
    from course_lib.deepseek.moe import MoE

    with torch.device("meta"):
        attn = [f"attn.{n}" for n in MLA(cfg.mla()).state_dict()]
        dense = [f"ffn.{n}" for n in SwiGLU(cfg.dim, cfg.inter_dim).state_dict()]
        moe = [f"ffn.{n}" for n in MoE(cfg.moe()).state_dict()]

    def block(prefix: str, layer_id: int) -> list[str]:
        ffn = moe if cfg.is_moe_layer(layer_id) else dense
        return [f"{prefix}{n}" for n in ("attn_norm.weight", *attn, "ffn_norm.weight", *ffn)]

    names = ["embed.weight"]
    for i in range(cfg.n_layers):
        names += block(f"layers.{i}.", i)
    names += ["norm.weight", "head.weight"]
    for k in range(cfg.mtp_depth):
        p = f"mtp.{k}."
        names += [f"{p}hnorm.weight", f"{p}enorm.weight", f"{p}proj.weight", *block(f"{p}block.", cfg.n_layers + k), f"{p}norm.weight"]
    return names


_our_keys = state_dict_names


def from_hf_checkpoint(state: dict[str, torch.Tensor], cfg: ModelConfig, *, rope_interleave: bool = True) -> dict[str, torch.Tensor]:
    """Inverse of ``to_hf_checkpoint``: a state dict for ``DeepSeekV3Mini(cfg)`` (MTP taken from layer n_layers + k)."""
    out = {}
    for name in _our_keys(cfg):
        key = hf_name(name, cfg.n_layers)[0]
        if key not in state:
            raise KeyError(f"the HF checkpoint has no {key!r} (needed for {name!r})")
        out[name] = _transform(name, state[key], cfg, rope_interleave, inverse=True)
    return out


def stack_experts(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hub layout -> transformers >= 5 module layout: per-expert ``gate_proj``/``up_proj``/``down_proj`` become
    ``experts.gate_up_proj`` (E, 2I, dim) and ``experts.down_proj`` (E, dim, I); MTP layers are dropped."""
    out = {}
    pat = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
    for k, v in state.items():
        m = re.match(r"model\.layers\.(\d+)\.", k)
        if m and int(m[1]) >= cfg.n_layers:
            continue  # MTP: not part of DeepseekV3ForCausalLM
        if not pat.fullmatch(k):
            out[k] = v
    for L in range(cfg.n_dense_layers, cfg.n_layers):
        p = f"model.layers.{L}.mlp.experts"
        E = cfg.n_routed_experts
        gate = torch.stack([state[f"{p}.{e}.gate_proj.weight"] for e in range(E)])  # (E, I, dim)
        up = torch.stack([state[f"{p}.{e}.up_proj.weight"] for e in range(E)])  # (E, I, dim)
        out[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)  # (E, 2I, dim): gate rows first
        out[f"{p}.down_proj"] = torch.stack([state[f"{p}.{e}.down_proj.weight"] for e in range(E)])  # (E, dim, I)
    return out


def unstack_experts(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers >= 5 module layout -> hub layout (inverse of ``stack_experts``, MTP aside)."""
    out = {}
    I = cfg.moe_inter_dim
    for k, v in state.items():
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)", k)
        if not m:
            out[k] = v
            continue
        for e in range(v.shape[0]):
            if m[2] == "gate_up_proj":
                out[f"{m[1]}.{e}.gate_proj.weight"] = v[e, :I]  # (I, dim)
                out[f"{m[1]}.{e}.up_proj.weight"] = v[e, I:]  # (I, dim)
            else:
                out[f"{m[1]}.{e}.down_proj.weight"] = v[e]  # (dim, I)
    return out


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def load_into_hf(model: nn.Module, hf_model, *, rope_interleave: bool | None = None) -> None:
    """Copy our weights into an existing ``DeepseekV3ForCausalLM`` (strict: every tensor must match)."""
    if rope_interleave is None:
        rope_interleave = bool(hf_model.config.rope_interleave)
    sd = stack_experts(to_hf_checkpoint(model, include_mtp=False, rope_interleave=rope_interleave), model.cfg)
    dtype = next(hf_model.parameters()).dtype
    sd = {k: v.to(torch.float32 if k.endswith("e_score_correction_bias") else dtype) for k, v in sd.items()}
    missing, unexpected = hf_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise KeyError(f"weights do not line up with the HF model: missing {missing}, unexpected {unexpected}")


def to_hf(model: nn.Module, *, rope_interleave: bool = True, attn_implementation: str = "eager",
          experts_implementation: str = "eager"):
    """A ``DeepseekV3ForCausalLM`` holding our weights (in our dtype), in eval mode. MTP is dropped."""
    from transformers import DeepseekV3ForCausalLM

    hcfg = hf_config(model.cfg, rope_interleave=rope_interleave, attn_implementation=attn_implementation,
                     experts_implementation=experts_implementation)
    dtype = next(model.parameters()).dtype
    hf = DeepseekV3ForCausalLM(hcfg).to(dtype)
    load_into_hf(model, hf, rope_interleave=rope_interleave)
    return hf.eval()


@torch.no_grad()
def state_dict_from_hf(hf_model, **overrides) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The ``ModelConfig`` (no MTP) and our state dict of a ``DeepseekV3ForCausalLM``'s weights.

    ``course_lib.deepseek.model.from_hf`` builds the model from them.
    """
    cfg = config_from_hf(hf_model.config, **overrides)
    if cfg.mtp_depth:
        raise ValueError("DeepseekV3ForCausalLM has no MTP weights: leave mtp_depth at 0")
    sd = from_hf_checkpoint(unstack_experts(hf_model.state_dict(), cfg), cfg,
                            rope_interleave=bool(hf_model.config.rope_interleave))
    return cfg, sd

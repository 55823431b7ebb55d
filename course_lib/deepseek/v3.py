"""DeepSeek-V3's dimensions, written once: every configuration of the course derives its V3 preset from ``V3``.

``MLAConfig.v3()`` (``course_lib.deepseek.attention``), ``MoEConfig.deepseek_v3()`` (``course_lib.deepseek.routing``),
``ModelConfig.v3()`` (``course_lib.deepseek.model_config``) and the planner's ``ModelConfig()`` defaults
(``course_lib.plan_config``) all read their values from the table below; ``tests/test_v3.py`` checks that they do,
and that the notebooks' DeepSeek-V3 tables state the same numbers.

Sources: ``inference/configs/config_671B.json`` (the architecture), ``inference/model.py``'s ``ModelArgs`` defaults
(YaRN: ``original_seq_len``, ``rope_theta``, ``rope_factor``, ``beta_fast``, ``beta_slow``, ``mscale``, which the json
does not override), and the DeepSeek-V3 report (MTP depth and weight, balancing constants).

Context length. DeepSeek's ``generate.py`` runs the model with ``max_seq_len`` = ``SERVING_SEQ_LEN`` (16384, the
``ModelArgs`` default), above ``original_seq_len`` = 4096, so the released model always runs with YaRN (rotary
frequencies rescaled, softmax scale times ``(0.1 * mscale * ln(rope_factor) + 1)^2`` = 1.874). The course's presets
keep ``max_seq_len`` = 4096 unless asked (``MLAConfig.v3(max_seq_len=16384)`` switches YaRN on); they always carry
``rope_scaling="yarn"``, which DeepSeek's code applies only beyond ``original_seq_len``.

Counting convention (stated here once). **Active parameters exclude the embedding table**: a token reads one row of
it and multiplies with none, while the output head (untied) multiplies every token and counts. With that convention
V3 has 671.0B parameters and 36.6B active (DeepSeek's "671B total, 37B activated"); counting the embedding as well
would give 37.6B, which no section reports. The router's balancing bias is a buffer, not a parameter. The MTP module
(11.6B; 13.5B with the copies of the embedding and head the checkpoint stores: 684.5B, the hub's "685B") is part of
neither. ``course_lib.param_count`` is the one counter (Section 5 writes it, Section 6 is given it);
``ACTIVE_INCLUDES_EMBEDDING`` records the course's choice.
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = ["V3", "SERVING_SEQ_LEN", "ACTIVE_INCLUDES_EMBEDDING", "preset"]

#: DeepSeek-V3 (671B). Field names follow DeepSeek's ``ModelArgs``.
V3 = MappingProxyType({
    # inference/configs/config_671B.json
    "vocab_size": 129280,
    "dim": 7168,
    "inter_dim": 18432,  # dense FFN width (first 3 layers)
    "moe_inter_dim": 2048,  # each expert's width
    "n_layers": 61,
    "n_dense_layers": 3,
    "n_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "n_activated_experts": 8,
    "n_expert_groups": 8,
    "n_limited_groups": 4,
    "route_scale": 2.5,
    "score_func": "sigmoid",
    "q_lora_rank": 1536,  # d_c'
    "kv_lora_rank": 512,  # d_c
    "qk_nope_head_dim": 128,  # d_h
    "qk_rope_head_dim": 64,  # d_h^R
    "v_head_dim": 128,
    # inference/model.py ModelArgs defaults (YaRN), not overridden by the json
    "original_seq_len": 4096,
    "rope_theta": 10000.0,
    "rope_factor": 40.0,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "rms_norm_eps": 1e-6,
    # the DeepSeek-V3 report
    "mtp_depth": 1,  # D
    "mtp_lambda": 0.3,  # 0.3 for the first 10T tokens, 0.1 after
    "bias_update_speed": 1e-3,  # gamma of the auxiliary-loss-free balancing
    "seq_aux_alpha": 1e-4,  # alpha of the complementary sequence-wise balance loss
})

#: ``max_seq_len`` of DeepSeek's ``ModelArgs`` and ``generate.py`` (4 x 4096): beyond ``original_seq_len``, so YaRN is on.
SERVING_SEQ_LEN = 16384

#: The course counts active parameters WITHOUT the embedding table (36.6B for V3; see the module docstring).
ACTIVE_INCLUDES_EMBEDDING = False


def preset(cls, **overrides) -> dict:
    """Keyword arguments for dataclass ``cls``: every field of ``cls`` that ``V3`` names, then ``overrides``."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return {**{k: v for k, v in V3.items() if k in names}, **overrides}

"""Compact implementation of DeepSeek-V3's parts: given building blocks and the references the judge compares with.

- ``common``  RMSNorm, rotary embeddings (interleaved pairs, as DeepSeek's code), SwiGLU
- ``attention`` the given parts of the attention layers: MLAConfig, KV caches (latent and per-head), check_input
- ``mla``     Multi-head Latent Attention: naive and absorbed paths (re-exports ``attention``)
- ``moe``     DeepSeekMoE: sigmoid router with bias and group-limited routing, shared + routed experts
- ``routing`` DeepSeekMoE's given parts: MoEConfig, RoutingInfo, expert_load/expert_capacity, the per-token baseline
- ``fp8``     fine-grained (1x128 / 128x128) quantisation, emulated and CUDA GEMMs, FP8 linear, loss scaler
- ``fp8_formats``  the FP8 formats, constants, SQNR and accumulator rounding (given to Section 4, re-exported by fp8)
- ``model``   DeepSeekV3Mini with multi-token prediction, parameter counts, training step (Section 5's answers)
- ``model_config``  ModelConfig, ModelOutput, init_weights, FP8 conversion, a dense MHA baseline (Section 5's given parts)
- ``training``  training loop, evaluation, routing analysis, recorded runs (Section 5's given parts)
- ``hf``      weight converter to and from HF transformers' ``DeepseekV3ForCausalLM`` (parity tests)
"""

"""Compact reference implementation of DeepSeek-V3's parts, used by the notebooks' hidden tests and Section 5.

- ``common``  RMSNorm, rotary embeddings (interleaved pairs, as DeepSeek's code), SwiGLU
- ``mla``     Multi-head Latent Attention: naive and absorbed paths, latent KV cache
- ``moe``     DeepSeekMoE: sigmoid router with bias and group-limited routing, shared + routed experts
- ``routing`` DeepSeekMoE's given parts: MoEConfig, RoutingInfo, expert_load/expert_capacity, the per-token baseline
- ``fp8``     FP8 formats, fine-grained (1x128 / 128x128) quantisation, emulated and CUDA GEMMs
- ``model``   DeepSeekV3Mini with multi-token prediction, training step and loop
- ``hf``      weight converter to and from HF transformers' ``DeepseekV3ForCausalLM`` (parity tests)
"""

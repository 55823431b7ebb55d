"""Compact reference implementation of DeepSeek-V3's parts, used by the notebooks' hidden tests and Section 5.

- ``common``  RMSNorm, rotary embeddings (interleaved pairs, as DeepSeek's code), SwiGLU
- ``mla``     Multi-head Latent Attention: naive and absorbed paths, latent KV cache
- ``moe``     DeepSeekMoE: sigmoid router with bias and group-limited routing, shared + routed experts
- ``fp8``     FP8 formats, fine-grained (1x128 / 128x128) quantisation, emulated and CUDA GEMMs
- ``model``   DeepSeekV3Mini with multi-token prediction, parameter counts, training step (Section 5's answers)
- ``model_config``  ModelConfig, ModelOutput, init_weights, FP8 conversion, a dense MHA baseline (Section 5's given parts)
- ``training``  training loop, evaluation, routing analysis, recorded runs (Section 5's given parts)
- ``hf``      weight converter to and from HF transformers' ``DeepseekV3ForCausalLM`` (parity tests)
"""

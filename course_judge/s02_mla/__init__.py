"""Judges of Section 2 (Multi-head Latent Attention): standard attention, compression, decompression, MLA,
the absorbed-decode benchmark, the quiz.

``course_lib.deepseek.mla`` holds the course's MultiHeadAttention, causal_mask and MLA: the answers to
2.1-2.4. The section's given parts (MLAConfig, the caches, check_input) come from
``course_lib.deepseek.attention``; the kernel cannot import ``mla`` (nor anything that imports it).
"""

KERNEL_EXCLUDES = ("course_lib.deepseek.mla",)

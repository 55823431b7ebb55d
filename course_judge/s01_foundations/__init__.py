"""Judges of Section 1 (mathematical foundations): attention, KV-cache bytes, low rank, gating, FP8 decoding, quiz."""

# course_lib modules that hold Section 1's answers: expert_load / max_violation live in the MoE reference,
# FP8 decoding in the FP8 reference. The section's kernel cannot import them, and using them is refused.
KERNEL_EXCLUDES = ("course_lib.deepseek.moe", "course_lib.deepseek.fp8")

"""Judges of Section 1 (mathematical foundations): attention, KV-cache bytes, low rank, gating, FP8 decoding, quiz."""

# course_lib modules that hold Section 1's answers: expert_load in Section 3's given routing parts, max_violation
# in the MoE reference, FP8 decoding in the FP8 reference and the formats' limits in Section 4's given formats.
# The section's kernel cannot import them, and using them is refused.
KERNEL_EXCLUDES = ("course_lib.deepseek.moe", "course_lib.deepseek.routing", "course_lib.deepseek.fp8",
                   "course_lib.deepseek.fp8_formats")

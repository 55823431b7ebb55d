"""Judges of Section 3 (DeepSeekMoE): the SwiGLU expert, the router, the MoE layer, load balancing, the
dispatch benchmark, the quiz.

The section's answers live in the course's MoE reference (``course_lib.deepseek.moe``) and the SwiGLU of
``course_lib.deepseek.common``; what the notebook is given comes from ``course_lib.deepseek.routing``.
"""

# course_lib modules that hold Section 3's answers: the kernel cannot import them, and using them is refused.
KERNEL_EXCLUDES = ("course_lib.deepseek.moe", "course_lib.deepseek.common")

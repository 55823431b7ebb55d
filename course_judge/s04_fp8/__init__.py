"""Judges of Section 4 (FP8 mixed-precision training): codec, quantiser, GEMM, FP8 linear, trainer, monitor, quiz."""

# course_lib modules that hold Section 4's answers: the reference quantisers, GEMMs, FP8 linear layer and loss
# scaler are all in course_lib.deepseek.fp8 (its given formats and helpers are in fp8_formats, which the kernel
# may import). Section 5's model imports fp8 too, so it is out of this kernel's reach as well.
KERNEL_EXCLUDES = ("course_lib.deepseek.fp8",)

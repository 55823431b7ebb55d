"""Judges of Section 5 (integration): the Transformer block, MTP, DeepSeekV3Mini and its loss, parameter counts,
cached generation, the training step, the graded training run, quiz."""

# The course_lib modules that hold Section 5's answers (the reference block, MTP module, model, param_counts and
# train_step). The section's kernel cannot import it, and using it is refused. What the notebook gives around the
# model (ModelConfig, init_weights, the training loop) lives in model_config / training, which the kernel may use;
# MLA and DeepSeekMoE (Sections 2 and 3's answers) are given parts here.
KERNEL_EXCLUDES = ("course_lib.deepseek.model", "course_lib.param_count")

"""Judges of Section 6 (production and scale): a test for the router, the memory planner, expert parallelism, quiz."""

# course_lib modules that hold Section 6's answers: the reference planner (Exercise 6.3) and the reference
# expert-parallel dispatch/combine (Exercise 6.4). The section's kernel imports their given halves instead
# (course_lib.plan_config, course_lib.cluster); it cannot import these, and using them is refused.
KERNEL_EXCLUDES = ("course_lib.planner", "course_lib.distributed")

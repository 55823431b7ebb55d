"""course_lib: the shared package of the DeepSeek-V3 from Scratch course.

Modules, one concern each:

- ``utils``    seeding, device choice, light/full sizes, the environment report of every setup cell
- ``testing``  assertion helpers with learner-friendly diagnostics (used by visible and hidden tests)
- ``bench``    side-by-side timing (interleaved A/B, warm-up, median), ratios, memory measurement
- ``viz``      the course's figures and live training monitor, one seaborn style
- ``data``     synthetic data sets
- ``learner``  the learner's ``#@save`` parts, saved to ``my_deepseek/`` and reused by later sections
- ``quiz``     immediate quiz feedback from salted hashes (no readable key in the release)
- ``deepseek`` the compact reference implementation of DeepSeek-V3's parts (MLA, MoE, FP8, model)
"""

from __future__ import annotations

__version__ = "0.1.0"

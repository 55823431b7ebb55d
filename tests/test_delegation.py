"""Answers that hand in the course's own reference score 0 on the exercise it answers, in every section.

The reference modules are not importable in a section's grading kernel at all (its view of course_lib lacks
them, tests/test_judges.py::test_kernel_cannot_import_the_sections_answers); these cases check the second
wall: the judge reads the submitted source and refuses an exercise whose answer imports, subclasses, wraps,
calls or ``exec``s its reference, or uses a name the kernel holds for another purpose (6.1's routers, the drafts
of 1.1's and 3.1's tests).
In-process (course_judge.local): no kernel, seconds.
"""

from __future__ import annotations

import pytest

import course_judge
from course_judge import local

LIB = local.ROOT / "course_lib"

CASES = [
    # (section, graded cell, answer cell, code added at the top of the answer cell)
    ("01_foundations", "test_01_3_gating", "ex_01_3_gating", "from course_lib.deepseek.routing import expert_load as _el"),
    ("01_foundations", "test_01_4_decode", "ex_01_4_decode", f"exec(open({str(LIB / 'deepseek' / 'fp8.py')!r}).read())"),
    ("02_mla", "test_02_1_standard_attention", "ex_02_1_standard_attention",
     "from course_lib.deepseek.mla import MultiHeadAttention\nclass _Base(MultiHeadAttention):\n    pass"),
    ("02_mla", "test_02_4_mla", "ex_02_4_mla",
     "import course_lib.deepseek.mla as _ref\n_forward = lambda self, *a, **k: _ref.MLA.forward(self, *a, **k)"),
    ("02_mla", "bench_02_absorb", "ex_02_4_mla", "import importlib\n_ref = importlib.import_module('course_lib.deepseek.mla')"),
    ("03_moe", "test_03_2_router", "ex_03_2_router", "from course_lib.deepseek import moe\nclass _Gate(moe.Gate):\n    pass"),
    ("03_moe", "test_03_3_moe", "ex_03_3_moe", "from course_lib.deepseek.moe import MoE as _M\n_fwd = _M.forward"),
    ("04_fp8", "test_04_1_quantize", "ex_04_1_converter", "from course_lib.deepseek import fp8 as _fp8\n_q = _fp8.quantize_tiles"),
    ("04_fp8", "test_04_1_linear", "ex_04_1_linear", "from course_lib.deepseek.fp8 import FP8Linear as _L"),
    ("05_integration", "test_05_1_block", "ex_05_1_block",
     "from course_lib.deepseek.model import TransformerBlock as _TB\nclass _Block(_TB):\n    pass"),
    ("05_integration", "test_05_4_counts", "ex_05_4_counts", "from course_lib.deepseek.model import param_counts as _pc"),
    ("05_integration", "test_05_4_counts", "ex_05_4_counts", "from course_lib.param_count import active_params as _ap"),
    ("06_production", "test_06_3_planner", "ex_06_3_planner", "from course_lib.planner import per_gpu_memory as _pg"),
    ("06_production", "test_06_4_expert_parallel", "ex_06_4_expert_parallel",
     "from course_lib.distributed import ep_dispatch as _d, ep_combine as _c"),
    ("06_production", "test_06_1_router_test", "ex_06_1_router_test", "_oracle = moe_route"),
    ("01_foundations", "test_01_1_kv_cache", "ex_01_1_kv_cache", "_draft = make_kv_cache_bytes()"),
    ("01_foundations", "test_01_1_kv_cache", "ex_01_1_kv_cache",
     "from course_lib.kv_drafts import make_kv_cache_bytes as _m\n_draft = _m()"),
    ("03_moe", "test_03_1_expert", "ex_03_1_expert", "_Draft = make_expert()"),
    ("03_moe", "test_03_1_expert_test", "ex_03_1_expert_test",
     "from course_lib.expert_drafts import make_expert as _m\n_oracle = _m()"),
    ("03_moe", "test_03_3_moe", "ex_03_3_moe", "import course_lib.expert_drafts as _d\n_E = _d.make_expert()"),
    # a test-writing answer that sorts the drafts by reading how they are built (their switches sit in the closure)
    ("03_moe", "test_03_1_expert_test", "ex_03_1_expert_test",
     "def _switches(cls):\n    f = cls.forward\n    return dict(zip(f.__code__.co_freevars, (c.cell_contents for c in f.__closure__)))"),
    ("01_foundations", "test_01_1_kv_cache", "ex_01_1_kv_cache", "_peek = lambda fn: [c.cell_contents for c in fn.__closure__]"),
    ("06_production", "test_06_1_router_test", "ex_06_1_router_test", "import inspect as _i\n_peek = _i.getclosurevars"),
]


@pytest.mark.parametrize("section,gid,cell,code", CASES, ids=[f"{s}:{g}" for s, g, _, _ in CASES])
def test_handing_in_the_reference_scores_zero(section, gid, cell, code):
    module = course_judge.find(section, gid)
    nb = local.notebook(section)
    answer = next(c for c in nb["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == cell)
    source = "".join(answer["source"]) if isinstance(answer["source"], list) else answer["source"]
    v = local.grade(section, module, [local.Alternative("delegates", source=code + "\n\n" + source, cell=cell)])
    assert v.score == 0 and v.rejected, v.report()
    assert "scores 0" in v.rejected


def test_an_honest_answer_mentioning_the_reference_in_prose_is_not_refused():
    """Docstrings and comments may name course modules (the given scaffolding does)."""
    section, gid, cell = "03_moe", "test_03_3_moe", "ex_03_3_moe"
    nb = local.notebook(section)
    answer = next(c for c in nb["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == cell)
    source = "".join(answer["source"]) if isinstance(answer["source"], list) else answer["source"]
    prose = '"""Same parameter names as course_lib.deepseek.moe.MoE."""\n# see course_lib/deepseek/moe.py for the names\n'
    v = local.grade(section, course_judge.find(section, gid), [local.Alternative("prose", source=prose + source, cell=cell)])
    assert not v.rejected and v.score == v.points, v.report()


ADDED = [
    # (section, graded cell, answer cell, cells the learner adds after the answer, split at "# ---")
    ("01_foundations", "test_01_1_kv_cache", "ex_01_1_kv_cache", "kv_cache_bytes = make_kv_cache_bytes()"),
    ("03_moe", "test_03_1_expert", "ex_03_1_expert",
     "from course_lib.expert_drafts import make_expert as _m\nExpertNetwork = _m()"),
    ("03_moe", "test_03_1_expert", "ex_03_1_expert", "import course_lib.expert_drafts as _d\n_E = _d.make_expert()"
     "\n# ---\nExpertNetwork.forward = _E.forward"),  # two cells: the draft through a variable
]


def _with_added_cell(section: str, after: str, code: str) -> dict:
    nb = local.notebook(section)
    i = next(i for i, c in enumerate(nb["cells"]) if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == after)
    for k, part in enumerate(code.split("\n# ---\n"), 1):
        nb["cells"].insert(i + k, {"cell_type": "code", "metadata": {}, "source": part, "outputs": [], "execution_count": None})
    return nb


@pytest.mark.parametrize("section,gid,cell,code", ADDED, ids=[f"{s}:{g}" for s, g, _, _ in ADDED])
def test_a_cell_the_learner_adds_cannot_bind_the_answer_to_a_draft(section, gid, cell, code):
    """The answer cell is honest (the solution); a cell added after it rebinds the answer to the course's draft."""
    v = local.grade(section, course_judge.find(section, gid), nb=_with_added_cell(section, cell, code))
    assert v.score == 0 and v.rejected and "a cell outside the answer" in v.rejected, v.report()


def test_a_scratch_cell_of_the_learners_own_is_not_refused():
    section, gid, cell = "01_foundations", "test_01_1_kv_cache", "ex_01_1_kv_cache"
    nb = _with_added_cell(section, cell, "print(kv_cache_bytes(61, 128, 128, 4096))")
    v = local.grade(section, course_judge.find(section, gid), nb=nb)
    assert not v.rejected and v.score == v.points, v.report()

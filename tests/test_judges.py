"""The judge modules' own suite: solutions full marks, named wrong answers fail with their diagnosis,
alternative correct answers keep full marks, untouched releases score zero; no kernel, no nbgrader.

Every exercise is graded in-process (``course_judge.local``): the section's given and answer cells run in a
fresh namespace and the judge talks to it through the same wire format as to a real kernel.
"""

from __future__ import annotations

import json

import pytest

import course_judge
from course_judge import local, static
from course_judge.preprocessors import BEGIN_SOLUTION

ROOT = local.ROOT
SECTIONS = [s for s in course_judge.SECTION_PACKAGES if (ROOT / "source" / s / f"{s}.ipynb").exists() and course_judge.judges(s)]
MIN_MUTANTS = 5
EXERCISES = [(s, gid) for s in SECTIONS for gid in course_judge.judges(s)]
MUTANTS = [(s, gid, m) for s, gid in EXERCISES for m in course_judge.find(s, gid).MUTANTS]
ALTERNATIVES = [(s, gid, a) for s, gid in EXERCISES for a in course_judge.find(s, gid).ALTERNATIVES]


def _graded_cells(nb: dict) -> dict[str, float]:
    return {static._meta(c)["grade_id"]: float(static._meta(c)["points"]) for c in nb["cells"] if static._meta(c).get("grade")}


@pytest.mark.parametrize("section", SECTIONS)
def test_every_graded_cell_has_its_judge(section):
    nb = local.notebook(section)
    cells, judges = _graded_cells(nb), course_judge.judges(section)
    assert set(cells) == set(judges), f"graded cells without a judge: {sorted(set(cells) - set(judges))}; " \
                                      f"judges without a cell: {sorted(set(judges) - set(cells))}"
    for gid, pts in cells.items():
        assert float(judges[gid].POINTS) == pts, f"{gid}: the cell carries {pts} points, its judge {judges[gid].POINTS}"
    answers = {static._meta(c).get("grade_id") for c in nb["cells"] if static._meta(c).get("solution")}
    for gid, mod in judges.items():
        assert mod.ANSWERS and set(mod.ANSWERS) <= answers, f"{gid}: ANSWERS {mod.ANSWERS} are not answer cells"
        assert mod.SUMMARY, f"{gid}: no SUMMARY"


@pytest.mark.parametrize("section", SECTIONS)
def test_graded_cells_announce_their_judge(section):
    """Each graded cell's first line states its points and its judge's SUMMARY (`tools/nbsrc.py sync` writes it)."""
    import nbsrc

    for c in local.notebook(section)["cells"]:
        m = static._meta(c)
        if m.get("grade"):
            mod = course_judge.find(section, m["grade_id"])
            first = static.cell_source(c).split("\n", 1)[0]
            assert first == nbsrc.judged_line(float(mod.POINTS), mod.SUMMARY), \
                f"{m['grade_id']}: run `python tools/nbsrc.py sync` (first line: {first[:120]!r})"


@pytest.mark.parametrize("section", SECTIONS)
def test_no_test_code_is_hidden_in_the_notebooks(section):
    """Hidden tests live in the judge, never in a notebook (source, release or solutions)."""
    for folder in ("source", "release", "solutions"):
        path = ROOT / folder / section / f"{section}.ipynb"
        if path.exists():
            assert "BEGIN HIDDEN TESTS" not in path.read_text(), f"{path} still holds hidden tests"


@pytest.mark.parametrize("section,gid", EXERCISES, ids=[f"{s}:{g}" for s, g in EXERCISES])
def test_solution_scores_full_marks(section, gid):
    v = local.grade(section, course_judge.find(section, gid))
    assert v.score == v.points, v.report()


@pytest.mark.parametrize("section,gid", EXERCISES, ids=[f"{s}:{g}" for s, g in EXERCISES])
def test_release_scores_zero(section, gid):
    nb = json.loads((ROOT / "release" / section / f"{section}.ipynb").read_text())
    v = local.grade(section, course_judge.find(section, gid), nb=nb)
    assert v.score == 0, v.report()


@pytest.mark.parametrize("section,gid", EXERCISES, ids=[f"{s}:{g}" for s, g in EXERCISES])
def test_each_judge_ships_wrong_and_alternative_answers(section, gid):
    mod = course_judge.find(section, gid)
    need = getattr(mod, "MIN_MUTANTS", MIN_MUTANTS)
    assert len(mod.MUTANTS) >= need, f"{gid}: {len(mod.MUTANTS)} named wrong answers (need {need})"
    assert len({m.name for m in mod.MUTANTS}) == len(mod.MUTANTS), f"{gid}: two wrong answers share a name"
    assert mod.ALTERNATIVES, f"{gid}: no alternative correct answer"


@pytest.mark.parametrize("section,gid,mutant", MUTANTS, ids=[f"{s}:{g}:{m.name}" for s, g, m in MUTANTS])
def test_wrong_answer_fails_with_its_diagnosis(section, gid, mutant):
    v = local.grade(section, course_judge.find(section, gid), [mutant])
    assert v.score is not None and v.score < v.points, f"the wrong answer {mutant.name!r} kept full marks"
    text = "\n".join(v.failure_texts)  # the messages alone: a part's name cannot make the diagnosis
    assert mutant.expect.lower() in text.lower(), f"{mutant.name!r} failed, but no message says {mutant.expect!r}:\n{text}"


@pytest.mark.parametrize("section,gid,alt", ALTERNATIVES, ids=[f"{s}:{g}:{a.name}" for s, g, a in ALTERNATIVES])
def test_alternative_answer_keeps_full_marks(section, gid, alt):
    v = local.grade(section, course_judge.find(section, gid), [alt])
    assert v.score == v.points, v.report()


@pytest.mark.parametrize("section", SECTIONS)
def test_kernel_cannot_import_the_sections_answers(section):
    """The course_lib view a section's kernel gets holds none of the modules that answer its exercises."""
    answers = set(course_judge.kernel_excludes(section))
    for mod in course_judge.judges(section).values():
        answers |= set(mod.REFERENCE)
    needed = static.kernel_modules(local.notebook(section))
    leak = needed & static.forbidden_modules(answers)
    assert not leak, f"{section}'s own cells import modules that hold its answers: {sorted(leak)}"


@pytest.mark.parametrize("section", SECTIONS)
def test_solutions_are_not_copies_of_course_lib(section):
    """Our worked answers are not flagged as copies of the reference modules (else every honest answer would be)."""
    nb = local.notebook(section)
    release = json.loads((ROOT / "release" / section / f"{section}.ipynb").read_text())
    for gid, mod in course_judge.judges(section).items():
        flagged = static.similarity_review(nb, mod, release)
        assert not flagged, f"{gid}: {flagged}"


def test_answer_markers_present_in_every_answer_cell():
    for section in SECTIONS:
        for c in local.notebook(section)["cells"]:
            if static._meta(c).get("solution"):
                assert BEGIN_SOLUTION in static.cell_source(c), f"{section}/{static._meta(c)['grade_id']}"

"""Static checks of every notebook: metadata, grade ids, stubs, leaks, solutions, authoring sync."""

from __future__ import annotations

import ast
import re

import nbsrc
import pytest
from conftest import ROOT, graded_cells, load_nb, section_names

SECTIONS = section_names()
EXPECTED = ["01_foundations", "02_mla", "03_moe", "04_fp8", "05_integration", "06_production"]
GRADE_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def _src(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_section_names_are_the_fixed_ones():
    assert SECTIONS, "no sections in source/"
    assert set(SECTIONS) <= set(EXPECTED), f"unexpected section names: {set(SECTIONS) - set(EXPECTED)}"
    assert "01_foundations" in SECTIONS


def test_source_notebooks_match_authoring_scripts():
    assert nbsrc.main(["check"]) == 0, "source/ is out of date with notebooks/: run `make source`"


@pytest.mark.parametrize("section", SECTIONS)
def test_authoring_scripts_hold_no_control_characters(section):
    """A tab or another control character in an authoring script is nearly always an escape gone wrong: the tab
    of a Python ``"\\t"`` where LaTeX wanted ``\\text``, which the notebook then shows as a blank and a broken formula."""
    text = (ROOT / "notebooks" / f"{section}.py").read_text()
    bad = [(n, line.strip()[:80]) for n, line in enumerate(text.splitlines(), 1) if re.search(r"[\x00-\x09\x0b-\x1f\x7f]", line)]
    assert not bad, f"control characters (a tab from '\\t'?) in notebooks/{section}.py: {bad}"


@pytest.mark.parametrize("section", SECTIONS)
def test_authoring_round_trip(section):
    text = (ROOT / "notebooks" / f"{section}.py").read_text()
    nb = nbsrc.script_to_notebook(text, section)
    assert nbsrc.script_to_notebook(nbsrc.notebook_to_script(nb), section) == nb


def test_grade_ids_unique_across_the_course():
    seen: dict[str, str] = {}
    for a in SECTIONS:
        for c in load_nb(ROOT / "source" / a / f"{a}.ipynb")["cells"]:
            gid = c.get("metadata", {}).get("nbgrader", {}).get("grade_id")
            if gid:
                assert gid not in seen, f"grade id {gid} used in {seen[gid]} and {a}"
                seen[gid] = a


@pytest.mark.parametrize("section", SECTIONS)
def test_metadata_valid(section):
    nb = load_nb(ROOT / "source" / section / f"{section}.ipynb")
    n_solution = 0
    for c in nb["cells"]:
        meta = c.get("metadata", {}).get("nbgrader")
        if not meta:
            continue
        assert meta["schema_version"] == 3
        assert GRADE_ID.match(meta["grade_id"]), meta["grade_id"]
        if meta.get("grade"):
            assert meta.get("points", 0) > 0, f"{meta['grade_id']} has no points"
            assert meta.get("locked"), f"test cell {meta['grade_id']} must be locked"
            assert meta["grade_id"].startswith(("test_", "bench_")), meta["grade_id"]
            assert "### BEGIN HIDDEN TESTS" not in _src(c), f"{meta['grade_id']}: hidden tests belong in course_judge/"
        if meta.get("solution"):
            n_solution += 1
            assert meta["grade_id"].startswith(("ex_", "quiz_")), meta["grade_id"]
            assert "### BEGIN SOLUTION" in _src(c)
    assert n_solution >= 3, "a section needs graded exercises"


@pytest.mark.parametrize("section", SECTIONS)
def test_test_cells_end_with_a_statement(section):
    """A numeric last expression would be read as partial credit by nbgrader."""
    for c in graded_cells(load_nb(ROOT / "source" / section / f"{section}.ipynb")):
        body = _src(c)
        tree = ast.parse(body)
        if not tree.body:
            continue
        last = tree.body[-1]
        ok = not isinstance(last, ast.Expr) or (isinstance(last.value, ast.Call))
        assert ok, f"{c['metadata']['nbgrader']['grade_id']} ends with a bare expression"


@pytest.mark.parametrize("section", SECTIONS)
def test_graded_cells_say_what_the_judge_checks(section):
    """Each graded cell opens with the line that tells the learner these checks are not the grade."""
    for c in graded_cells(load_nb(ROOT / "source" / section / f"{section}.ipynb")):
        first, gid = _src(c).split("\n", 1)[0], c["metadata"]["nbgrader"]["grade_id"]
        pts = c["metadata"]["nbgrader"]["points"]
        assert first.startswith("# Checks you can run now. When graded, the judge runs these and more"), (gid, first)
        assert f"({pts:g} points)" in first, (gid, first)


@pytest.mark.parametrize("section", SECTIONS)
def test_release_has_no_answers(section):
    path = ROOT / "release" / section / f"{section}.ipynb"
    assert path.exists(), f"release/{section} missing: run `make release`"
    text = path.read_text()
    for marker in ("### BEGIN SOLUTION", "### END SOLUTION", "### BEGIN HIDDEN TESTS"):
        assert marker not in text, f"release/{section} leaks {marker!r}"
    nb = load_nb(path)
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), "release notebooks carry no outputs"
    stubs = sum("raise NotImplementedError" in _src(c) for c in nb["cells"])
    assert stubs >= 3
    # every class of the source is still defined in the release (stubs go in method bodies only)
    src = load_nb(ROOT / "source" / section / f"{section}.ipynb")
    classes = set(re.findall(r"^class (\w+)", "\n".join(_src(c) for c in src["cells"]), re.M))
    rel_classes = set(re.findall(r"^class (\w+)", "\n".join(_src(c) for c in nb["cells"]), re.M))
    assert classes == rel_classes, f"classes removed in the release: {classes - rel_classes}"
    assert not list((ROOT / "release" / section).glob("*.py")), "no helper files with answers in release/"


@pytest.mark.parametrize("section", SECTIONS)
def test_solutions_are_clean_and_executed(section):
    path = ROOT / "solutions" / section / f"{section}.ipynb"
    assert path.exists(), f"solutions/{section} missing: run `make solutions`"
    text = path.read_text()
    for marker in ("### BEGIN SOLUTION", "### END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in text, f"solutions/{section} contains {marker!r}"
    nb = load_nb(path)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), "solutions are executed"
    assert not [c for c in code if any(o.get("output_type") == "error" for o in c["outputs"])], "a solution cell errors"
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for c in code for o in c["outputs"]), \
        "solutions show their figures"


@pytest.mark.parametrize("section", SECTIONS)
def test_quiz_key_cannot_be_guessed_with_one_letter(section):
    """Answering the same letter everywhere must not pass most of a quiz (at most 60% of its keys share a letter)."""
    nb = load_nb(ROOT / "source" / section / f"{section}.ipynb")
    key = [m.group(2) for c in nb["cells"]
           if c.get("metadata", {}).get("nbgrader", {}).get("grade_id", "").startswith("quiz_")
           for m in re.finditer(r'^ANSWER_Q(\d+) = "([a-d])"', _src(c), re.M)]
    assert len(key) >= 3, f"{section}: expected a quiz of at least 3 questions, found {len(key)} answers"
    top = max(key.count(x) for x in set(key))
    assert top / len(key) <= 0.6, f"{section}: quiz key {key} — answering one letter everywhere scores {top}/{len(key)}"


@pytest.mark.parametrize("section", SECTIONS)
def test_student_text_has_no_instructor_notes(section):
    """What students read carries nothing addressed to instructors (design notes live in docs/AUTHORING.md)."""
    nb = load_nb(ROOT / "release" / section / f"{section}.ipynb")
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            text = _src(cell).lower()
            for phrase in ("for instructors", "instructor note", "answer key", "the judge ("):
                assert phrase not in text, f"release/{section} cell {i} addresses instructors ({phrase!r})"


def _solution_lines(section: str) -> set[str]:
    """The non-trivial lines between BEGIN/END SOLUTION in the source, whitespace-normalised."""
    nb = load_nb(ROOT / "source" / section / f"{section}.ipynb")
    lines: set[str] = set()
    for cell in nb["cells"]:
        inside = False
        for line in _src(cell).splitlines():
            if "### BEGIN SOLUTION" in line:
                inside = True
            elif "### END SOLUTION" in line:
                inside = False
            elif inside:
                code = " ".join(line.split("#", 1)[0].split())
                # an answer line is one with an operation in it; names and short returns are shared with the stub
                if len(code) >= 24 and any(op in code for op in ("(", "[", "*", "/", "+", "-", "@")):
                    lines.add(code)
    return lines


@pytest.mark.parametrize("section", SECTIONS)
def test_release_never_quotes_an_answer_line(section):
    """No answer line appears in the release outside the answer cells: markdown (troubleshooting tables, tips),
    visible tests and their hints, given cells name symptoms and concepts, never the line."""
    answers = _solution_lines(section)
    assert answers, f"{section}: no solution lines found in source"
    nb = load_nb(ROOT / "release" / section / f"{section}.ipynb")
    for i, c in enumerate(nb["cells"]):
        if c.get("metadata", {}).get("nbgrader", {}).get("solution"):
            continue  # the learner's own cell: its stub keeps the signature and docstring
        text = " ".join(_src(c).split()).replace("`", "")
        quoted = sorted(a for a in answers if a in text)
        assert not quoted, f"release/{section} cell {i} ({c['cell_type']}) quotes answer lines: {quoted[:3]}"


def _solution_code(section: str) -> str:
    """All solution code of the source, one whitespace-normalised line per source line, comments dropped."""
    nb = load_nb(ROOT / "source" / section / f"{section}.ipynb")
    out = []
    for cell in nb["cells"]:
        inside = False
        for line in _src(cell).splitlines():
            if "### BEGIN SOLUTION" in line:
                inside = True
            elif "### END SOLUTION" in line:
                inside = False
            elif inside:
                out.append(" ".join(line.split("#", 1)[0].split()))
    return "\n".join(out)


@pytest.mark.parametrize("section", SECTIONS)
def test_troubleshooting_names_symptoms_never_answer_code(section):
    """No code span of a troubleshooting table is a piece of an answer (``U[:, :r] * S[:r]``, ``order // K``)."""
    code = _solution_code(section)
    nb = load_nb(ROOT / "release" / section / f"{section}.ipynb")
    tables = [_src(c) for c in nb["cells"] if c["cell_type"] == "markdown" and "## Troubleshooting" in _src(c)]
    assert tables, f"release/{section} has no troubleshooting table"
    spans = {" ".join(s.split()) for t in tables for s in re.findall(r"`([^`]+)`", t)}
    answers = sorted(s for s in spans if len(s) >= 6 and any(op in s for op in "([*/+-@") and s in code)
    assert not answers, f"release/{section}'s troubleshooting quotes answer code: {answers}"


def test_notebooks_carry_the_course_kernels_language_info():
    """JupyterLab marks a notebook modified on open when its language_info differs from the kernel's."""
    from ipykernel.ipkernel import IPythonKernel

    assert nbsrc.LANGUAGE_INFO == IPythonKernel.language_info, (
        "the course kernel reports another language_info (new Python?): update tools/nbsrc.py LANGUAGE_INFO and "
        "regenerate the notebooks")
    for folder in ("source", "release"):
        for section in SECTIONS:
            md = load_nb(ROOT / folder / section / f"{section}.ipynb")["metadata"]
            assert md.get("language_info") == nbsrc.LANGUAGE_INFO, f"{folder}/{section}: stale language_info"

"""course_lib.runmodel in a real kernel: demo cells that need an unfinished exercise show one line, not a traceback.

Exercise, graded and the learner's own cells keep their errors; Run All (nbclient here, stopping on errors)
goes on past a placeholder; assertion tracebacks end at the learner's line; figures draw inline although
the kernel inherits MPLBACKEND=Agg.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from course_lib.runmodel import STUB_MESSAGE, TEST_MARKER

STUB = f'# YOUR CODE HERE: replace the next line with your answer\nraise NotImplementedError("{STUB_MESSAGE}: write your code here")'


def _cell(src: str, kind: str, grade_id: str = "", points: int = 0):
    c = nbformat.v4.new_code_cell(src)
    if kind == "solution":
        c.metadata["nbgrader"] = {"solution": True, "grade": False, "locked": False, "grade_id": grade_id, "schema_version": 3}
    elif kind == "test":
        c.metadata["nbgrader"] = {"solution": False, "grade": True, "locked": True, "grade_id": grade_id, "points": points,
                                  "schema_version": 3}
    return c


def _notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        _cell("from course_lib.utils import setup\nENV = setup(seed=0)", "given"),
        nbformat.v4.new_markdown_cell("## 1.1 Attention"),
        _cell(f'def attention(q):\n    """Docstring."""\n    {STUB.replace(chr(10), chr(10) + "    ")}\n', "solution", "ex_1_attention"),
        _cell(f"{TEST_MARKER} When graded, the judge runs these.\nattention(1)", "test", "test_1_attention", 2),
        _cell("import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([attention(1)])\nplt.show()", "given"),
        _cell("import matplotlib.pyplot as plt\nplt.plot([1, 2], label='x'); plt.legend(); plt.show()", "given"),
        nbformat.v4.new_markdown_cell("## Quiz"),
        _cell(STUB, "solution", "quiz_answers"),
        _cell("print(ANSWER_Q1)", "given"),
        _cell("raise ValueError('a real bug in a demo cell')", "given"),
        _cell(f"{TEST_MARKER}\nimport torch\nfrom course_lib.testing import assert_close\n"
              "assert_close(torch.zeros(2), torch.ones(2), name='zeros')", "test", "test_2", 1),
        _cell("print('end reached')", "given"),
    ]
    return nb


@contextmanager
def _learner_env():
    """A learner's kernel: not grading, no session name, the Makefile's headless MPLBACKEND=Agg inherited."""
    old = dict(os.environ)
    for k in ("NBGRADER_EXECUTION", "JPY_SESSION_NAME", "COURSE_HEADLESS"):
        os.environ.pop(k, None)
    os.environ["MPLBACKEND"] = "Agg"
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def _run(tmp_path, nb, extra_cells=(), allow_errors=True):
    """Execute ``nb`` saved in ``tmp_path`` (the kernel finds it there); ``extra_cells`` are not on disk."""
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    run = nbformat.read(path, as_version=4)
    run.cells.extend(extra_cells)
    with _learner_env():
        NotebookClient(run, kernel_name="python3", allow_errors=allow_errors, timeout=120,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    return run


def _errors(cell):
    return [o for o in cell.outputs if o.output_type == "error"]


def _text(cell):
    out = []
    for o in cell.outputs:
        if o.output_type == "stream":
            out.append(o.text)
        elif "data" in o:
            out.append(o.data.get("text/plain", ""))
    return "".join(out)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runmodel")
    return _run(tmp, _notebook(), [nbformat.v4.new_code_cell("undefined_in_my_own_cell")])


def test_graded_and_exercise_cells_keep_their_errors(ran):
    test_cell, quiz = ran.cells[3], ran.cells[7]
    assert _errors(test_cell) and _errors(test_cell)[0].ename == "NotImplementedError"
    assert _errors(quiz) and _errors(quiz)[0].ename == "NotImplementedError"


def test_demo_cells_show_a_placeholder_naming_the_exercise(ran):
    fig_cell, quiz_demo = ran.cells[4], ran.cells[8]
    assert not _errors(fig_cell) and not _errors(quiz_demo)
    text = _text(fig_cell)
    assert "Skipped" in text and "`attention`" in text and "ex_1_attention" in text and "1.1 Attention" in text, text
    assert not any("image/png" in o.get("data", {}) for o in fig_cell.outputs), "the half-drawn figure is closed"
    assert "ANSWER_Q1" in _text(quiz_demo) and "quiz_answers" in _text(quiz_demo)
    assert len(_text(fig_cell).strip().splitlines()) == 1
    assert text.strip().isascii(), f"a glyph that needs an emoji font (a box in a browser without one): {text!r}"


def test_other_errors_and_own_cells_keep_tracebacks(ran):
    assert _errors(ran.cells[9])[0].ename == "ValueError"
    assert _errors(ran.cells[-1])[0].ename == "NameError"


def test_assertion_traceback_hides_course_lib_testing(ran):
    err = _errors(ran.cells[10])[0]
    tb = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(err.traceback))
    assert err.ename == "AssertionError" and "zeros differs" in err.evalue
    assert "course_lib/testing.py" not in tb and "assert_close(torch.zeros(2)" in tb


def test_figures_draw_inline_without_legend_warning(ran):
    cell = ran.cells[5]
    assert any("image/png" in o.get("data", {}) for o in cell.outputs), "MPLBACKEND=Agg inherited, inline expected"
    assert ran.cells[-2].outputs[0].text.strip() == "end reached"


def test_run_all_goes_on_past_placeholders(tmp_path):
    nb = _notebook()
    nb.cells = [c for i, c in enumerate(nb.cells) if i not in (3, 7, 9, 10)]  # only the placeholder-producing errors left
    try:
        run = _run(tmp_path, nb, allow_errors=False)
    except CellExecutionError as e:  # pragma: no cover - the failure message is the point
        pytest.fail(f"a placeholder cell stopped the run: {e}")
    assert _text(run.cells[-1]).strip() == "end reached"

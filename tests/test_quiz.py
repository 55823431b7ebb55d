"""course_lib.quiz: immediate feedback from salted hashes; no key or explanation readable in a release notebook."""

from __future__ import annotations

import re

import nbsrc
import pytest
from conftest import ROOT, load_nb, section_names

import course_judge
from course_lib import quiz
from course_lib.quiz import MARKER, Quiz, feedback_table

KEY = {1: "b", 2: "d"}
WHY = {1: "because one.", 2: "because two."}


def _src(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.fixture(autouse=True)
def _feedback_on(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.delenv("COURSE_QUIZ_FEEDBACK", raising=False)
    monkeypatch.delenv("COURSE_QUIZ_SALT", raising=False)


def test_right_answers_reveal_their_explanation_and_nothing_else(capsys):
    table = feedback_table("99_demo", KEY, WHY)
    assert not any(w in repr(table) for w in WHY.values())
    q = Quiz("99_demo", table)
    assert q.check(1, "b") is True and "right. because one." in capsys.readouterr().out
    for wrong in ("a", "c", "d"):
        assert q.check(1, wrong) is False
        out = capsys.readouterr().out
        assert "not right" in out and "because" not in out
    assert q.check(2, "B") is False and "one of" in capsys.readouterr().out
    assert q.explanation(2, "d") == "because two." and q.explanation(2, "a") is None
    assert quiz.check(2, "d") is True  # the module-level check uses the last quiz loaded
    q.check_all({"ANSWER_Q1": "b"})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "Q2: not answered yet" in out[-1]


def test_salts_differ_per_question_and_build_and_rebuilds_are_identical(monkeypatch):
    a, b = feedback_table("99_demo", KEY, WHY), feedback_table("99_demo", KEY, WHY)
    assert a == b, "a build is deterministic (the committed release must not change)"
    assert a[1][0] != a[2][0]
    same_letter = feedback_table("99_demo", {1: "b", 2: "b"}, WHY)
    assert same_letter[1][1] != same_letter[2][1], "equal answers must not give equal hashes"
    monkeypatch.setenv("COURSE_QUIZ_SALT", "spring-2026")
    assert feedback_table("99_demo", KEY, WHY)[1] != a[1]
    with pytest.raises(ValueError, match="no explanation"):
        feedback_table("99_demo", KEY, {1: "x"})


@pytest.mark.parametrize("env", [("NBGRADER_EXECUTION", "autograde"), ("NBGRADER_EXECUTION", "validate"),
                                 ("COURSE_QUIZ_FEEDBACK", "off")])
def test_grading_or_off_reveals_nothing(env, monkeypatch, capsys):
    monkeypatch.setenv(*env)
    q = Quiz("99_demo", feedback_table("99_demo", KEY, WHY))
    assert q.check(1, "b") is None and q.check(1, "a") is None
    q.check_all({"ANSWER_Q1": "b", "ANSWER_Q2": "d"})
    out = capsys.readouterr().out
    assert "because" not in out and "right" not in out and out.count("feedback comes with the graded notebook") == 3


def _quiz_judges():
    for s in section_names():
        for mod in course_judge.judges(s).values():
            if hasattr(mod, "KEY"):
                yield s, mod


def test_sections_with_a_feedback_cell_have_their_explanations_and_it_works(capsys):
    found = 0
    for section, mod in _quiz_judges():
        nb = load_nb(ROOT / "release" / section / f"{section}.ipynb")
        cells = [c for c in nb["cells"] if _src(c).startswith(MARKER)]
        if not cells:
            continue
        found += 1
        assert set(mod.EXPLANATIONS) == set(mod.KEY), f"{section}: one explanation per question"
        assert cells[0]["metadata"]["nbgrader"]["locked"], "the feedback cell is a locked given cell"
        ns = {f"ANSWER_Q{q}": a for q, a in mod.KEY.items()}
        exec(compile(_src(cells[0]), f"<{section} feedback>", "exec"), ns)  # noqa: S102 - the course's own cell
        out = capsys.readouterr().out
        assert all(w in out for w in mod.EXPLANATIONS.values()), out
        ns = {f"ANSWER_Q{q}": "a" if a != "a" else "b" for q, a in mod.KEY.items()}
        exec(compile(_src(cells[0]), f"<{section} feedback>", "exec"), ns)  # noqa: S102
        out = capsys.readouterr().out
        assert not any(w in out for w in mod.EXPLANATIONS.values()) and out.count("not right") == len(mod.KEY)
    assert found >= 1, "Section 1's quiz has a feedback cell (the worked example)"


@pytest.mark.parametrize("section", section_names())
def test_no_release_notebook_holds_a_key_or_an_explanation_in_clear(section):
    nb = load_nb(ROOT / "release" / section / f"{section}.ipynb")
    code = "\n".join(_src(c) for c in nb["cells"] if c["cell_type"] == "code")
    hits = re.findall(r"^\s*ANSWER_Q\d+\s*=\s*['\"][a-dA-D]['\"]", code, re.M)
    assert not hits, f"release/{section} assigns quiz answers in code: {hits}"
    text = "\n".join(_src(c) for c in nb["cells"]) + "\n".join(str(c.get("outputs", "")) for c in nb["cells"])
    for other, mod in _quiz_judges():
        for q, why in getattr(mod, "EXPLANATIONS", {}).items():
            for piece in (why, why[:40], why[-40:]):
                assert piece not in text, f"release/{section} shows {other}'s explanation of Q{q} in clear"


def test_the_script_keeps_only_the_marker():
    text = (ROOT / "notebooks" / "01_foundations.py").read_text()
    assert re.search(rf"^\# %% \[given id=feedback_01_quiz\]\n{re.escape(MARKER)}\n\n", text, re.M)
    nb = nbsrc.script_to_notebook(text, "01_foundations")
    back = nbsrc.notebook_to_script(nb)
    assert f"{MARKER}\n" in back and "QUIZ = Quiz(" not in back
    with pytest.raises(ValueError, match="only line"):
        nbsrc.script_to_notebook("# %% [given]\n#@quiz-feedback\nx = 1\n", "01_foundations")

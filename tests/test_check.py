"""`make check` for self-learners: full marks for a worked solution, zero for a blank one, input untouched."""

from __future__ import annotations

import subprocess

import pytest
from conftest import ROOT, file_digest

pytestmark = [pytest.mark.pipeline, pytest.mark.xdist_group("check")]
SECTION = "01_foundations"


def _make_check(nb, *extra):
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), "check", f"NB={nb}", *extra], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_check_full_marks_for_solution_and_input_untouched(tmp_path):
    nb = tmp_path / "my_work.ipynb"  # a name that says nothing: the section is inferred from its graded cells
    nb.write_bytes((ROOT / "solutions" / SECTION / f"{SECTION}.ipynb").read_bytes())
    before = file_digest(nb)
    out = _make_check(nb)
    assert file_digest(nb) == before, "make check modified the learner's notebook"
    head = next(line for line in out.splitlines() if line.startswith(f"{SECTION} / self:"))
    got, total = head.split(":")[1].split("points")[0].split("/")
    assert float(got) == float(total) > 0, out
    assert "FAIL" not in out
    assert "feedback:" in out


def test_check_zero_for_blank_with_messages(tmp_path):
    nb = tmp_path / f"{SECTION}.ipynb"
    nb.write_bytes((ROOT / "release" / SECTION / f"{SECTION}.ipynb").read_bytes())
    before = file_digest(nb)
    out = _make_check(nb, f"SECTION={SECTION}")
    assert file_digest(nb) == before
    assert f"{SECTION} / self: 0 /" in out, out
    assert "NotImplementedError" in out, "failed tests should show their messages"

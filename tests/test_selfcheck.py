"""`make check` reports per exercise with hidden-test messages and benchmarks, copes with moved and extra
cells, and never touches the learner's file."""

from __future__ import annotations

import copy
import json
import subprocess

import course
import grading_corpus as gc
import nbformat
import pytest
from conftest import ROOT, file_digest

from course_lib.grading import CellScore, NotebookScore


def test_report_groups_exercises_and_summarises_benchmarks(tmp_path, capsys):
    root = tmp_path
    nb = nbformat.v4.new_notebook()
    bench = nbformat.v4.new_code_cell("...")
    bench.metadata["nbgrader"] = {"grade": True, "grade_id": "bench_02_absorb", "points": 2}
    bench.outputs = [nbformat.v4.new_output("stream", name="stdout", text="context 2048: absorbed decode is 9.7x faster\n")]
    nb.cells = [bench]
    path = root / "autograded" / "self" / "02_mla" / "02_mla.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    sc = NotebookScore("02_mla", "self", [
        CellScore("test_02_1_x", 2, 2), CellScore("test_02_1_x_hidden", 0, 4, "AssertionError: wrong scale on S=7"),
        CellScore("bench_02_absorb", 2, 2)])
    course.print_report(sc, 12.0, None, root)
    out = capsys.readouterr().out
    assert "02_mla / self: 4 / 8 points" in out
    assert "[part] 02_1_x" in out and "visible 2/2" in out and "hidden 0/4" in out
    assert "hidden test test_02_1_x_hidden: AssertionError: wrong scale on S=7" in out
    assert "benchmarks:" in out and "bench_02_absorb: passed (2/2) context 2048: absorbed decode is 9.7x faster" in out


@pytest.mark.pipeline
@pytest.mark.xdist_group("check")
def test_check_copes_with_moved_and_extra_cells_and_shows_hidden_messages(tmp_path):
    release = json.loads((ROOT / "release" / gc.SECTION / f"{gc.SECTION}.ipynb").read_text())
    source = json.loads((ROOT / "source" / gc.SECTION / f"{gc.SECTION}.ipynb").read_text())
    good = course.partial_notebook(copy.deepcopy(release), source, 1.0)
    gc.reordered_extra_cells(tmp_path / "moved", gc.wrong_sdpa(good), release)
    nb = tmp_path / "moved" / f"{gc.SECTION}.ipynb"
    before = file_digest(nb)
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), "check", f"NB={nb}"], capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert file_digest(nb) == before, "make check modified the learner's notebook"
    assert f"{gc.SECTION} / self: 25 / 31 points" in out, out
    assert "[FAIL] 01_1_sdpa" in out and "[ok  ] 01_4_decode" in out and "[ok  ] 01_1_kv_cache" in out
    assert "hidden test test_01_1_sdpa_hidden: AssertionError:" in out, "the failed hidden test's message is shown"
    assert "cells were moved; graded in the release order" in out
    assert "sandboxed" in out

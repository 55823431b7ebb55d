"""`make check` reports per exercise with the judge's message for every failed part, copes with moved and
extra cells, and never touches the learner's file."""

from __future__ import annotations

import copy
import json
import subprocess

import course
import grading_corpus as gc
import pytest
from conftest import ROOT, file_digest

from course_judge.scores import CellScore, NotebookScore
from course_judge.verdict import PartResult, Verdict


def test_report_shows_each_failed_part_with_its_message(tmp_path, capsys):
    sc = NotebookScore("02_mla", "self", [CellScore("test_02_1_x", 2, 6), CellScore("bench_02_absorb", 0, 2)])
    v = Verdict("test_02_1_x", 6, [PartResult("visible checks: shapes", 2, True),
                                   PartResult("float64 at long positions", 4, False, "q differs\n  likely cause: RoPE angles in float32")])
    b = Verdict("bench_02_absorb", 2, [PartResult("absorbed decode >= 3x naive", 2, None, "inconclusive: busy machine")])
    rec = course.Record("self", "02_mla", verdicts={"test_02_1_x": v, "bench_02_absorb": b},
                        timing={"execution_s": 9.5, "judge_s": 2.0, "judge_calls": 40, "channel_s": 0.5, "kernel_start_s": 1.0})
    course.print_report(sc, 12.0, rec, tmp_path)
    out = capsys.readouterr().out
    assert "02_mla / self: 2 / 8 points" in out
    assert "[part] 02_1_x" in out and "x float64 at long positions (0/4): q differs" in out
    assert "likely cause: RoPE angles in float32" in out
    assert "[??  ] bench_02_absorb" in out and "inconclusive: busy machine" in out
    assert "visible checks: shapes" not in out, "passed parts are not listed"
    assert "timing: notebook 9.5 s (judge 2.0 s, 40 calls" in out


@pytest.mark.pipeline
@pytest.mark.xdist_group("check")
def test_check_copes_with_moved_and_extra_cells_and_shows_the_judges_messages(tmp_path):
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
    assert f"{gc.SECTION} / self: {gc.FULL - gc.POINTS['sdpa']:g} / {gc.FULL:g} points" in out, out
    assert "[FAIL] 01_1_sdpa" in out and "[ok  ] 01_4_decode" in out and "[ok  ] 01_1_kv_cache" in out
    assert "the 1/sqrt(d) scale is missing" in out, "the judge's diagnosis of the failed parts is shown"
    assert "cells were moved; graded in the release order" in out
    assert "sandboxed" in out

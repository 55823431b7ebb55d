"""tools/lab.py: `make lab` publishes every release to the course-local nbgrader exchange; the lab recipe's knobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import lab
from conftest import ROOT


def test_publish_fills_the_exchange_outbound(tmp_path, monkeypatch):
    monkeypatch.delenv("COURSE_EXCHANGE", raising=False)
    shutil.copy(ROOT / "nbgrader_config.py", tmp_path / "nbgrader_config.py")
    for name in ("01_a", "02_b"):
        (tmp_path / "release" / name).mkdir(parents=True)
        (tmp_path / "release" / name / f"{name}.ipynb").write_text(json.dumps({"cells": []}))
    (tmp_path / "release" / "not_a_section").mkdir()
    course = lab.publish(tmp_path)
    assert course == tmp_path / ".exchange" / "deepseek-v3-from-scratch"
    assert sorted(p.name for p in (course / "outbound").iterdir()) == ["01_a", "02_b"]
    assert (course / "inbound").is_dir() and (course / "feedback").is_dir()
    lab.publish(tmp_path)  # again: replaced, not nested
    assert not (course / "outbound" / "01_a" / "01_a").exists()


def test_lab_recipe_knobs_and_environment():
    out = subprocess.run(["make", "-n", "-C", str(ROOT), "lab", "STAMP=/dev/null", "LAB_PORT=9999", "LAB_TOKEN=tok",
                          "LAB_OPTS=--no-browser"], capture_output=True, text=True, check=True).stdout
    assert "env -u MPLBACKEND" in out, "kernels must not inherit MPLBACKEND=Agg"
    assert "--port=9999" in out and "--IdentityProvider.token=tok" in out and "--no-browser" in out
    assert "tools/lab.py publish" in out and "JUPYTER_CONFIG_PATH=" in out


def test_release_publishes_to_an_exchange_on_request():
    def dry(*args: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "COURSE_EXCHANGE"}
        return subprocess.run(["make", "-n", "-C", str(ROOT), *args, "STAMP=/dev/null"], capture_output=True, text=True,
                              check=True, env=env).stdout

    assert "--exchange" not in dry("release"), "a plain make release publishes nothing"
    out = dry("release", "EXCHANGE=/srv/ex", "SECTION=01_foundations")
    assert 'tools/course.py release 01_foundations --exchange "/srv/ex"' in out
    assert f'--exchange "{ROOT}/.exchange"' in dry("publish"), "make publish defaults to the course-local exchange"

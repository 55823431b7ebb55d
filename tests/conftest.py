"""Shared fixtures. The pipeline fixture runs the real `make demo` once per test session in a fresh clone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("MPLBACKEND", "Agg")


def _fresh_copy(dest: Path) -> None:
    """A clone of HEAD when the tree is clean (as in CI), else a copy of tracked + untracked files."""
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not dirty:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
        return
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict:
    """`make demo` in a fresh clone (sharing this checkout's venv); returns paths and the printed output."""
    clone = tmp_path_factory.mktemp("clone") / "course"
    clone.mkdir()
    _fresh_copy(clone)
    venv = ROOT / ".venv"
    # Share this checkout's venv but skip its install step: installing from the clone would re-point the
    # editable course_lib at the temporary folder (the CI run installs for real, in its own clone).
    stamp = venv / ".shared-by-tests"
    stamp.touch()
    proc = subprocess.run(
        ["make", "-C", str(clone), "demo", f"VENV={venv}", f"STAMP={stamp}"],
        capture_output=True, text=True, timeout=1800, env={**os.environ, "MPLBACKEND": "Agg"},
    )
    if proc.returncode != 0:
        pytest.fail(f"make demo failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return {"root": clone, "stdout": proc.stdout}


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium under Playwright, shared by the browser tests (tests/browser_kit.py)."""
    from browser_kit import chromium

    with chromium() as b:
        yield b


def load_nb(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes: compare files by digest, never by content (see pytest_assertrepr_compare)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def graded_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("grade")]


def section_names() -> list[str]:
    return sorted(p.name for p in (ROOT / "source").iterdir() if (p / f"{p.name}.ipynb").exists())


@pytest.fixture(scope="session")
def graded_corpus():
    """Section 1's bad submissions and attacks graded by the batch (crash, resume, re-runs): see grading_corpus.py."""
    import course
    import grading_corpus

    from course_judge.sandbox import sandbox_status

    root = course.temp_course([grading_corpus.SECTION])
    try:
        yield grading_corpus.run_corpus(root, course, sandboxed=sandbox_status()[0])
    finally:
        shutil.rmtree(root, ignore_errors=True)


_BIG = 20_000


def _is_big(left: object, right: object) -> bool:
    sized = [x for x in (left, right) if isinstance(x, (str, bytes, list))]
    return bool(sized) and max(len(x) for x in sized) >= _BIG


def pytest_configure(config: pytest.Config) -> None:
    """Keep pytest's own explanation (a difflib diff) away from big values; ours below replaces it.

    Diffing two notebooks or a page of feedback HTML can run for many minutes and looks like a hang.
    All `pytest_assertrepr_compare` hooks run, so the built-in one is told to step aside for big values.
    """
    from _pytest.assertion import util

    builtin = util.assertrepr_compare
    if getattr(builtin, "_course_wrapped", False):
        return

    def assertrepr_compare(config, op, left, right, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return None if _is_big(left, right) else builtin(config, op, left, right, *args, **kwargs)

    assertrepr_compare._course_wrapped = True  # type: ignore[attr-defined]
    util.assertrepr_compare = assertrepr_compare


@pytest.hookimpl(tryfirst=True)
def pytest_assertrepr_compare(op: str, left: object, right: object) -> list[str] | None:
    """Explain a failed comparison of big strings, bytes or lists in a few lines (no difflib)."""
    if not _is_big(left, right):
        return None

    def short(x: object) -> str:
        if isinstance(x, (str, bytes, list)):
            return f"{type(x).__name__} of length {len(x)} starting {x[:120]!r}"
        return repr(x)[:200]

    if op == "==" and type(left) is type(right) and isinstance(left, (str, bytes, list)):
        first = next((i for i, (a, b) in enumerate(zip(left, right)) if a != b), min(len(left), len(right)))
        return [f"big values differ (first difference at index {first})", f"left: {short(left)}", f"right: {short(right)}"]
    if op == "not in" and isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
        at = right.find(left)
        return [f"{short(left)} found at index {at} of {short(right)}", f"around it: {right[max(0, at - 200):at + 200]!r}"]
    return [f"{short(left)} {op} {short(right)}: failed"]

"""Course driver: releases, solutions, sample submissions, autograding, grade tables, self-check.

    python tools/course.py release [SECTION ...]     source/ -> release/ (nbgrader generate_assignment)
    python tools/course.py release --exchange DIR [SECTION ...]   ... and publish them to nbgrader's exchange DIR
    python tools/course.py publish [--exchange DIR] [SECTION ...]  release/ -> the exchange (release_assignment)
    python tools/course.py solutions [SECTION ...]   source/ -> solutions/ (executed, hidden tests stripped)
    python tools/course.py samples                   submitted/{reference,blank,partial}/
    python tools/course.py autograde [--student S] [--force] [--workers N] [SECTION ...]
                                                     batch: every submitted/STUDENT/SECTION/, unchanged ones
                                                     skipped; grades.csv and autograded/summary.md
    python tools/course.py collect SECTION [ZIP ...]  LMS download -> submitted/ (nbgrader zip_collect)
    python tools/course.py feedback | grades | table
    python tools/course.py db-upgrade                the gradebook's tables created if missing, then migrated
    python tools/course.py demo                      release + samples + autograde + table
    python tools/course.py check NOTEBOOK [--section S]   self-check one notebook on a copy
    python tools/course.py verify SECTION            author's check: solution full marks, blank zero

Every nbgrader step runs as a subprocess of the real ``nbgrader`` command with the course's
``nbgrader_config.py``; work on temporary copies never touches the instructor's gradebook. Student code
runs sandboxed (``course_judge/sandbox.py``; ``COURSE_SANDBOX=off|auto|require``); every graded cell is scored by
the judge (``course_judge/``), which runs in the grader and drives the learner's objects from outside the kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_judge import static  # noqa: E402
from course_judge.dask_batch import host_lock  # noqa: E402
from course_judge.preprocessors import BEGIN_SOLUTION, END_SOLUTION  # noqa: E402
from course_judge.scores import (  # noqa: E402
    NotebookScore,
    exercise_of,
    nbgrader_cli,
    read_scores,
    verdicts_from_diagnoses,
)

COURSE_ID = "deepseek-v3-from-scratch"
SAMPLE_STUDENTS = ("reference", "partial", "blank")


def sections(root: Path = ROOT) -> list[str]:
    return sorted(p.name for p in (root / "source").iterdir() if p.is_dir() and (p / f"{p.name}.ipynb").exists())


def nbgrader_bin() -> str:
    cand = Path(sys.executable).parent / "nbgrader"
    return str(cand) if cand.exists() else "nbgrader"


def grading_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["COURSE_LIB_DIR"] = str(ROOT / "course_lib")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONHASHSEED"] = "0"
    env["COURSE_HEADLESS"] = "1"  # no widget front end while executing: interactive figures render statically
    return env


def run_nbgrader(root: Path, *args: str, quiet: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [nbgrader_bin(), *args, f"--CourseDirectory.root={root}"]
    if quiet:
        cmd.append("--log-level=WARN")
    proc = subprocess.run(cmd, cwd=root, env={**grading_env(root), **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    return proc


# ---------------------------------------------------------------- release and solutions


def release(root: Path = ROOT, names: list[str] | None = None) -> None:
    for a in names or sections(root):
        proc = run_nbgrader(root, "generate_assignment", a, "--force")
        if proc.returncode != 0:
            raise SystemExit(f"generate_assignment {a} failed")
        print(f"released {a} -> release/{a}/{a}.ipynb")


def publish(root: Path = ROOT, names: list[str] | None = None, exchange: str | None = None) -> Path:
    """release/A/ -> EXCHANGE/COURSE_ID/outbound/A/ with ``nbgrader release_assignment`` (students fetch it from
    their Assignment List). ``exchange`` (else COURSE_EXCHANGE, else nbgrader_config.py's course-local one) is the
    exchange root: created world-writable with the sticky bit when missing, as nbgrader requires."""
    exchange = exchange or os.environ.get("COURSE_EXCHANGE") or str(root / ".exchange")
    top = Path(exchange)
    if not top.exists():
        top.mkdir(parents=True)
        os.chmod(top, 0o1777)
    for a in names or sections(root):
        proc = run_nbgrader(root, "release_assignment", a, "--force", env={"COURSE_EXCHANGE": str(top)})
        if proc.returncode != 0:
            raise SystemExit(f"release_assignment {a} failed")
        print(f"published {a} -> {top / COURSE_ID / 'outbound' / a}")
    return top / COURSE_ID


def solutions(root: Path = ROOT, names: list[str] | None = None) -> None:
    # One folder of saved parts (course_lib.learner) per build, as a learner's my_deepseek/: built in section order,
    # Section 5's worked solution trains the worked Sections 2 and 3 parts next to the course's. Nothing is written
    # beside source/, and a build of Section 5 alone shows the course's parts.
    with tempfile.TemporaryDirectory(prefix="course-my-parts-") as parts:
        for a in sorted(names or sections(root)):
            t0 = time.perf_counter()
            proc = run_nbgrader(root, "generate_solution", a, "--force", env={"COURSE_MY_PARTS": parts})
            if proc.returncode != 0:
                raise SystemExit(f"generate_solution {a} failed")
            print(f"solution {a} -> solutions/{a}/{a}.ipynb ({time.perf_counter() - t0:.0f} s)")


# ---------------------------------------------------------------- sample submissions


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _save(nb: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def strip_outputs(nb: dict) -> dict:
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return nb


def solution_source(cell: dict) -> str:
    src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    return "\n".join(ln for ln in src.split("\n") if ln.strip() not in (BEGIN_SOLUTION, END_SOLUTION))


def partial_notebook(release_nb: dict, source_nb: dict, fraction: float = 0.5) -> dict:
    """The release with the first ``fraction`` of its exercise cells answered from the source."""
    answers = {
        c["metadata"]["nbgrader"]["grade_id"]: solution_source(c)
        for c in source_nb["cells"]
        if c.get("metadata", {}).get("nbgrader", {}).get("solution")
    }
    ids = [c["metadata"]["nbgrader"]["grade_id"] for c in release_nb["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("solution")]
    keep = set(ids[: max(1, int(len(ids) * fraction))])
    for c in release_nb["cells"]:
        gid = c.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if gid in keep:
            c["source"] = answers[gid]
    return release_nb


def samples(root: Path = ROOT, names: list[str] | None = None) -> None:
    """submitted/reference (worked solutions), submitted/blank (untouched release), submitted/partial."""
    for a in names or sections(root):
        rel = root / "release" / a / f"{a}.ipynb"
        sol = root / "solutions" / a / f"{a}.ipynb"
        src = root / "source" / a / f"{a}.ipynb"
        ref_nb = strip_outputs(_load(sol if sol.exists() else src))
        _save(ref_nb, root / "submitted" / "reference" / a / f"{a}.ipynb")
        shutil.copy(rel, _mk(root / "submitted" / "blank" / a / f"{a}.ipynb"))
        _save(partial_notebook(_load(rel), _load(src)), root / "submitted" / "partial" / a / f"{a}.ipynb")
    print("samples: submitted/{reference,partial,blank}/ for", ", ".join(names or sections(root)))


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- batch autograde
#
# Every submitted/STUDENT/SECTION/ is graded in its own `nbgrader autograde` process, one Dask task each
# (course_judge/dask_batch.py: an embedded LocalCluster, or COURSE_DASK_SCHEDULER), from a normalised copy
# (autograded/.batch/staging/): a renamed notebook is filed under its expected name, a broken or missing one
# scores zero without running anything, a submitted course_lib/ and caches are dropped. Results land in
# autograded/.batch/state/STUDENT__SECTION.json once a submission is done, keyed by a hash of its files and of
# everything that grades it, so a re-run skips what is unchanged (before anything reaches the cluster) and a
# crashed run resumes where it stopped. The gradebook is SQLite with a busy timeout (or the database
# COURSE_DB_URL names: _gradebook_url); a section with benchmark
# cells takes its whole host (Dask resource "host"), and on a host benchmark cells take the grader's lock
# exclusively (every other cell takes it shared).

BATCH = Path("autograded") / ".batch"
STUDENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,99}")  # used with fullmatch (re's $ would accept "bob\n")
# Names the batch itself writes in autograded/ (and beside it): a student folder by one of these names would turn a
# report into a folder (autograded/summary.md/...) and break every later batch. Compared case-insensitively.
RESERVED_IDS = {"summary.md", "summary.json", "score_distribution.png", "readme.md", "grades.csv", "gradebook.db",
                ".batch", ".timing", "staging", "state", "logs", "diag", "feedback", "autograded", "submitted", "source",
                "release", "solutions", "self-check", "nbgrader_config.py"}
IGNORED = {".ipynb_checkpoints", "__pycache__", "__MACOSX", ".DS_Store", ".git"}
MAX_EXTRA_BYTES = 20 << 20  # one extra file
MAX_EXTRA_TOTAL = 100 << 20  # all extra files of a submission
MAX_EXTRA_FILES = 200
ATTENTION = {  # diagnosis kind -> counts as "needs attention" in the summary
    "missing_notebook", "broken_notebook", "renamed", "several_notebooks", "wrong_notebook", "grading_failed",
    "kernel_stopped", "notebook_timeout", "cell_timeout", "memory", "output_flood", "tamper", "restored", "suspicious",
    "edited_locked", "deleted_restored", "deleted_exercise", "duplicated", "unknown_cells", "shadow_package",
    "unsandboxed", "stderr", "invalid_student", "reference_use", "inconclusive", "notebook_limit", "symlink",
    "bad_timestamp", "pids_limit", "unconfined", "stale_grade",
}
# a person should look at these
REVIEW = {"tamper", "suspicious", "grading_failed", "invalid_student", "reference_use", "symlink", "stale_grade"}
QUIET = {"verdict", "timing", "sandbox"}  # grader records, not diagnoses


def notebook_caps() -> tuple[int, int, int]:
    """(bytes, cells, JSON depth) a submitted notebook may have; over any of them it scores 0 without being parsed
    further. Defaults far above any honest notebook (the executed solutions: under 1 MB, 60 cells, depth 8)."""
    env = os.environ
    return (int(float(env.get("COURSE_MAX_NOTEBOOK_MB", 32)) * 2**20), int(env.get("COURSE_MAX_CELLS", 2000)),
            int(env.get("COURSE_MAX_JSON_DEPTH", 100)))


@dataclass
class GradeRun:
    student: str
    section: str
    seconds: float
    ok: bool
    log: str


@dataclass
class Record:
    """The outcome of grading one submission (also what autograded/.batch/state/ holds)."""

    student: str
    section: str
    status: str = "pending"  # graded | zero | failed | refused (a folder that is no submission: never graded)
    hash: str = ""
    fingerprint: str = ""
    score: float = 0.0
    max_score: float = 0.0
    cells: dict = field(default_factory=dict)  # grade_id -> [score, max, message]
    parts: dict = field(default_factory=dict)  # grade_id -> [[part name, points, passed], ...] (the judge's verdict)
    timing: dict = field(default_factory=dict)  # execution_s, kernel_start_s, judge_s, channel_s, judge_calls
    resources: dict = field(default_factory=dict)  # the sandbox's cgroup: peak_memory_mb, oom_kills, pids_limit_hits, ...
    diagnoses: list = field(default_factory=list)  # {"kind", "detail", ...}
    seconds: float = 0.0
    notebook_seconds: float | None = None
    sandboxed: bool | None = None
    graded_at: str = ""
    skipped: bool = False
    log: str = ""
    verdicts: dict = field(default_factory=dict, repr=False)  # grade_id -> course_judge.verdict.Verdict (not saved)

    @property
    def attention(self) -> list[dict]:
        return [d for d in self.diagnoses if d["kind"] in ATTENTION]

    @property
    def review(self) -> bool:
        return any(d["kind"] in REVIEW for d in self.diagnoses)


def student_id_problem(name: str) -> str | None:
    """Why a folder name cannot be a student id (None when it can)."""
    if name.lower() in RESERVED_IDS:
        return f"{name!r} is a name the batch writes its reports under (autograded/{name})"
    if not STUDENT_ID.fullmatch(name):
        return (f"{name!r} is not a usable student id (letters, digits and _ . @ + - only, starting with a letter or "
                "digit, at most 100 characters: no spaces, quotes, accents or shell characters)")
    return None


def _scan_submitted(root: Path, students: list[str] | None = None, names: list[str] | None = None
                    ) -> tuple[list[tuple[str, str]], list[Record]]:
    """(valid STUDENT/SECTION pairs, refused folders): a refused folder is never graded nor entered in the gradebook.

    Refused: a student folder that is a symbolic link or not a folder, or whose name is no valid student id or one the
    batch writes (``summary.md`` ...). A section folder that is a link is *not* refused here: it scores 0 (stage).
    """
    sub = root / "submitted"
    if not sub.is_dir():
        return [], []
    out: list[tuple[str, str]] = []
    refused: list[Record] = []
    for sdir in sorted(sub.iterdir()):
        name = sdir.name
        if name in IGNORED or (students and name not in students):
            continue
        why = None
        if sdir.is_symlink():
            why = _diag("symlink", f"submitted/{name!r} is a symbolic link (to {os.readlink(sdir)!r}): refused, never followed")
        elif not sdir.is_dir():
            why = _diag("invalid_student", f"submitted/{name!r} is not a folder: ignored")
        else:
            problem = student_id_problem(name)
            if problem:
                why = _diag("invalid_student", f"folder {problem}: refused, not graded, no gradebook entry; rename it "
                            "to the student's id")
        if why is not None:
            refused.append(Record(name, "*", status="refused", diagnoses=[why]))
            continue
        for adir in sorted(sdir.iterdir()):
            if (not adir.is_dir() and not adir.is_symlink()) or adir.name.startswith(".") or adir.name in IGNORED:
                continue
            if names and adir.name not in names:
                continue
            out.append((name, adir.name))
    return out, refused


def submissions(root: Path, students: list[str] | None = None, names: list[str] | None = None) -> list[tuple[str, str]]:
    """Every gradable submitted/STUDENT/SECTION/ (refused folders left out: see :func:`_scan_submitted`)."""
    return _scan_submitted(root, students, names)[0]


def execution_seconds(root: Path, student: str, a: str) -> float | None:
    """Seconds from the first cell to the last of the latest grading run, judge included (the grader's clock)."""
    rec = load_record(root, student, a)
    return rec.notebook_seconds if rec else None


def _state_path(root: Path, student: str, a: str) -> Path:
    return root / BATCH / "state" / f"{student}__{a}.json"


def load_record(root: Path, student: str, a: str) -> Record | None:
    p = _state_path(root, student, a)
    if not p.exists():
        return None
    try:
        d = json.loads(p.read_text())
        return Record(**{k: v for k, v in d.items() if k in Record.__dataclass_fields__})
    except (ValueError, TypeError):
        return None


def save_record(root: Path, rec: Record) -> None:
    """Atomic: a crash leaves the previous state or the new one, never half of one."""
    p = _state_path(root, rec.student, rec.section)
    p.parent.mkdir(parents=True, exist_ok=True)
    d = {k: getattr(rec, k) for k in Record.__dataclass_fields__ if k not in ("skipped", "log", "verdicts")}
    tmp = p.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(d, indent=1))
    os.replace(tmp, p)


def _walk(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(regular files, symbolic links, other special files) under ``folder``, sorted, links never followed."""
    files, links, special = [], [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        for n in list(dirnames):
            if (here / n).is_symlink():
                links.append(here / n)
                dirnames.remove(n)
        for n in filenames:
            p = here / n
            if p.is_symlink():
                links.append(p)
            elif p.is_file():
                files.append(p)
            else:
                special.append(p)
        dirnames.sort()
    return sorted(files), sorted(links), sorted(special)


def _hash_tree(folder: Path, h) -> None:
    if folder.is_symlink():
        h.update(b"link\0" + os.readlink(folder).encode(errors="replace"))
        return
    files, links, special = _walk(folder)
    for f in links + special:
        h.update(b"link\0" + str(f.relative_to(folder)).encode(errors="replace") + b"\0")
    for f in files:
        h.update(str(f.relative_to(folder)).encode(errors="replace") + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")


def submission_hash(folder: Path) -> str:
    h = hashlib.sha256()
    _hash_tree(folder, h)
    return h.hexdigest()


GRADING_CORE = ("__init__", "testing", "utils", "bench", "agent", "wire")
_LIB_FROM = re.compile(r"\bfrom\s+course_lib((?:\.\w+)*)\s+import\s+\(?([\w, ]+)")
_LIB_REF = re.compile(r"\bcourse_lib((?:\.\w+)*)|^\s*from\s+(\.+\w*(?:\.\w+)*)\s+import", re.M)


def _course_lib_files(text: str, here: Path | None = None) -> set[Path]:
    lib = ROOT / "course_lib"
    found: set[Path] = set()
    for m in _LIB_REF.finditer(text):
        if m.group(1) is not None:
            parts = [p for p in m.group(1).split(".") if p]
        elif here is not None:  # relative import inside course_lib
            dots = len(m.group(2)) - len(m.group(2).lstrip("."))
            base = here.parent.relative_to(lib).parts[: len(here.parent.relative_to(lib).parts) - (dots - 1)]
            parts = list(base) + [p for p in m.group(2).lstrip(".").split(".") if p]
        else:
            continue
        for n in range(len(parts), 0, -1):
            for cand in (lib.joinpath(*parts[:n]).with_suffix(".py"), lib.joinpath(*parts[:n], "__init__.py")):
                if cand.exists():
                    found.add(cand)
    for m in _LIB_FROM.finditer(text):  # from course_lib[.pkg] import module, ...
        pkg = [p for p in (m.group(1) or "").split(".") if p]
        for name in re.findall(r"\w+", m.group(2)):
            for cand in (lib.joinpath(*pkg, name).with_suffix(".py"), lib.joinpath(*pkg, name, "__init__.py")):
                if cand.exists():
                    found.add(cand)
    return found


def grading_fingerprint(root: Path, a: str) -> str:
    """What else decides a grade: the section's source notebook, the config, the course_lib files it uses; and a
    gradebook other than the course's SQLite file (a batch switched to another database grades everything into it)."""
    h = hashlib.sha256()
    src = root / "source" / a / f"{a}.ipynb"
    text = src.read_text() if src.exists() else ""
    h.update(text.encode())
    h.update((root / "nbgrader_config.py").read_bytes() if (root / "nbgrader_config.py").exists() else b"")
    url = _gradebook_url(root)
    if not url.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        h.update(b"gradebook\0" + make_url(url)._replace(password=None).render_as_string(hide_password=False).encode())
    files = {ROOT / "course_lib" / f"{m}.py" for m in GRADING_CORE} | _course_lib_files(text)
    todo = list(files)
    while todo:  # course_lib modules the used ones import
        f = todo.pop()
        for g in _course_lib_files(f.read_text(), f) - files:
            files.add(g)
            todo.append(g)
    files |= set((ROOT / "course_judge").rglob("*.py"))  # the judge decides every grade
    for f in sorted(files):
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _diag(kind: str, detail: str, **extra) -> dict:
    return {"kind": kind, "detail": detail, **extra}


def graded_ids(nb: dict) -> set[str]:
    return {c.get("metadata", {}).get("nbgrader", {}).get("grade_id") for c in nb.get("cells", []) if isinstance(c, dict)} - {None}


def _src(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else str(s)


_AST_LOCK = threading.Lock()


def json_depth(obj, limit: int) -> int:
    """Nesting depth of parsed JSON, counted without recursion; stops counting once past ``limit``."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        o, d = todo.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            todo.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def read_notebook_json(path: Path, name: str) -> tuple[dict | None, dict | None]:
    """(parsed notebook JSON, None) or (None, the diagnosis that scores it 0), the caps checked before parsing."""
    max_bytes, max_cells, max_depth = notebook_caps()
    size = path.stat().st_size
    if size > max_bytes:
        return None, _diag("notebook_limit", f"{name} is {size / 2**20:.1f} MB, over the limit of {max_bytes / 2**20:g} MB "
                           "(COURSE_MAX_NOTEBOOK_MB): scored 0 without being read")
    raw = path.read_bytes()
    # cheap bounds before parsing: every cell has a "cell_type" key, every nesting level an opening bracket
    approx_cells = raw.count(b'"cell_type"')
    if approx_cells > max_cells:
        return None, _diag("notebook_limit", f"{name} has about {approx_cells} cells, over the limit of {max_cells} "
                           "(COURSE_MAX_CELLS): scored 0 without being parsed")
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        return None, _diag("notebook_limit", f"{name} nests its JSON deeper than {max_depth} levels "
                           "(COURSE_MAX_JSON_DEPTH): scored 0")
    except (UnicodeDecodeError, ValueError) as e:
        return None, _diag("broken_notebook", f"{name} is not valid JSON ({str(e)[:160]}): scored 0")
    depth = json_depth(data, max_depth)
    if depth > max_depth:
        return None, _diag("notebook_limit", f"{name} nests its JSON deeper than {max_depth} levels "
                           "(COURSE_MAX_JSON_DEPTH): scored 0")
    cells = data.get("cells") if isinstance(data, dict) else None
    if isinstance(cells, list) and len(cells) > max_cells:
        return None, _diag("notebook_limit", f"{name} has {len(cells)} cells, over the limit of {max_cells} "
                           "(COURSE_MAX_CELLS): scored 0")
    if not isinstance(data, dict):
        return None, _diag("broken_notebook", f"{name} is not a Jupyter notebook (its JSON is not an object): scored 0")
    return data, None


def check_timestamp(text: str) -> str | None:
    """Why nbgrader could not read this timestamp.txt (None when it can): nbgrader would abort the submission."""
    from nbgrader.utils import parse_utc

    if not text.strip():
        return "it is empty"
    try:
        parse_utc(text.strip())
    except Exception as e:  # noqa: BLE001 - dateutil raises ValueError, OverflowError, ParserError, TypeError ...
        return f"{type(e).__name__}: {str(e)[:100]}"
    return None


def stage(root: Path, student: str, a: str) -> tuple[Path | None, list[dict]]:
    """Normalised copy of submitted/STUDENT/A for nbgrader; (None, diagnoses) when there is nothing to run.

    Never follows a symbolic link (a linked section folder scores 0, linked files are dropped), reads no notebook
    over the caps (:func:`notebook_caps`), keeps at most MAX_EXTRA_FILES extra files (MAX_EXTRA_BYTES each,
    MAX_EXTRA_TOTAL together) and a timestamp.txt only when nbgrader can read it.
    """
    import warnings

    import nbformat

    src = root / "submitted" / student / a
    dest = root / BATCH / "staging" / student / a
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    diags: list[dict] = []
    expected = f"{a}.ipynb"
    if src.is_symlink():
        diags.append(_diag("symlink", f"submitted/{student}/{a} is a symbolic link (to {os.readlink(src)!r}): refused, "
                           "never followed; scored 0"))
        return None, diags
    release_nb = root / "release" / a / expected
    course_ids = graded_ids(_load(release_nb)) if release_nb.exists() else set()
    files, links, special = _walk(src)
    if links or special:
        what = [f"{p.relative_to(src)} -> {os.readlink(p)!r}" for p in links] + [f"{p.relative_to(src)} (special file)"
                                                                              for p in special]
        diags.append(_diag("symlink", "symbolic links and special files in the submission were refused (never followed): "
                           + ", ".join(what[:5]) + (f" and {len(what) - 5} more" if len(what) > 5 else "")))
    notebooks, extra, shadow, dropped = [], [], [], []
    total = 0
    for f in files:
        rel = f.relative_to(src)
        if any(part in IGNORED or part.startswith(".") for part in rel.parts):
            continue
        if rel.parts[0] in ("course_lib", "course_lib.py"):
            shadow.append(str(rel))
            continue
        if f.suffix == ".ipynb":
            notebooks.append(rel)
            continue
        if rel == Path("timestamp.txt"):
            continue
        size = f.stat().st_size
        if size > MAX_EXTRA_BYTES or total + size > MAX_EXTRA_TOTAL or len(extra) >= MAX_EXTRA_FILES:
            dropped.append(str(rel))
            continue
        total += size
        extra.append(str(rel))
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest / rel)
    ts = src / "timestamp.txt"
    if ts in files:
        text = ts.read_bytes()[:1000].decode("utf-8", errors="replace") if ts.stat().st_size <= 1000 else ""
        problem = check_timestamp(text) if ts.stat().st_size <= 1000 else "it is over 1000 bytes"
        if problem:
            diags.append(_diag("bad_timestamp", f"timestamp.txt cannot be read as a time ({problem}; it holds "
                               f"{text.strip()[:40]!r}): graded as if it had no timestamp (no late penalty computed)"))
        else:
            (dest / "timestamp.txt").write_text(text)
    if shadow:
        diags.append(_diag("shadow_package", "a submitted course_lib was ignored (grading imports the course's own package): "
                           + ", ".join(shadow[:5])))
    if extra or dropped:
        diags.append(_diag("extra_files", "extra files (not graded): " + ", ".join((extra + dropped)[:10])
                           + (f"; {len(dropped)} dropped (over {MAX_EXTRA_BYTES >> 20} MB each, {MAX_EXTRA_TOTAL >> 20} MB "
                              f"or {MAX_EXTRA_FILES} files together)" if dropped else "")))
    chosen: Path | None = None
    if Path(expected) in notebooks:
        chosen = Path(expected)
    elif notebooks:
        def overlap(rel: Path) -> int:
            try:
                data, problem = read_notebook_json(src / rel, str(rel))
                return -1 if problem else len(graded_ids(data) & course_ids)
            except Exception:  # noqa: BLE001 - any unreadable candidate ranks last
                return -1

        ranked = sorted(notebooks, key=lambda r: (-overlap(r), len(r.parts), str(r)))
        chosen = ranked[0]
        kind = "renamed" if len(notebooks) == 1 else "several_notebooks"
        diags.append(_diag(kind, f"notebook submitted as {chosen} (graded as {expected})"
                           + (f"; also present: {', '.join(map(str, ranked[1:4]))}" if len(notebooks) > 1 else "")))
    others = [str(r) for r in notebooks if r != chosen]
    if chosen is not None and others and Path(expected) == chosen:
        diags.append(_diag("extra_files", "other notebooks (not graded): " + ", ".join(others[:5])))
    if chosen is None:
        diags.append(_diag("missing_notebook", f"no notebook in the submission (expected {expected}): scored 0"))
        return None, diags
    data, problem = read_notebook_json(src / chosen, str(chosen))
    if problem:
        diags.append(problem)
        return None, diags
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # missing or duplicated cell ids are repaired silently
            nb = nbformat.from_dict(data)
            if nb.get("nbformat", 0) < 4:
                nb = nbformat.convert(nb, 4)
            if hasattr(nbformat.validator, "normalize"):
                _, nb = nbformat.validator.normalize(nb)
                nb = nbformat.from_dict(nb)
            nbformat.validate(nb)
    except Exception as e:  # noqa: BLE001 - any schema failure means "not a notebook nbgrader can read"
        diags.append(_diag("broken_notebook", f"{chosen} is not a valid Jupyter notebook ({str(e).splitlines()[0][:160]}): scored 0"))
        return None, diags
    ids = graded_ids(nb)
    if course_ids and not ids & course_ids:
        diags.append(_diag("wrong_notebook", f"{chosen} holds none of {a}'s cells (another section's notebook?)"))
    with _AST_LOCK:  # CPython 3.11's ast is not safe to use from two threads at once
        flagged = static.scan(nb)
    if flagged:
        diags.append(_diag("suspicious", "review the code: " + "; ".join(flagged)))
    nbformat.write(nb, dest / expected)
    return dest, diags


SQLITE_MARK = ".sqlite-gradebook"  # in a throw-away course: its own SQLite gradebook, whatever COURSE_DB_URL says


def _gradebook_url(root: Path) -> str:
    """The gradebook nbgrader uses for this course: the ``db_url`` its nbgrader_config.py sets (SQLite beside it, or
    COURSE_DB_URL: docs/GRADING.md), read from the file so the course and nbgrader never disagree."""
    cfg = root / "nbgrader_config.py"
    if cfg.is_file():
        from traitlets.config.loader import PyFileConfigLoader

        url = PyFileConfigLoader(cfg.name, path=str(root)).load_config().get("CourseDirectory", {}).get("db_url")
        if url:
            return str(url)
    return f"sqlite:///{root / 'gradebook.db'}?timeout=120"


def upgrade_gradebook(root: Path = ROOT) -> None:
    """Create the gradebook's tables in an empty database, then migrate it to this nbgrader's schema.

    ``nbgrader db upgrade`` alone fails on an empty PostgreSQL database (its first migration alters tables that only
    nbgrader's first connection creates) and on this course's SQLite URL (it backs the file up by the URL's path,
    ``?timeout=`` included); this does both steps, for either kind of database.
    """
    from nbgrader.api import Gradebook
    from sqlalchemy import create_engine, inspect

    url = _gradebook_url(root)
    engine = create_engine(url)
    try:
        empty = not inspect(engine).get_table_names()
    finally:
        engine.dispose()
    if empty:
        with Gradebook(url, COURSE_ID):  # creates every table and records alembic's head revision
            pass
    extra = [f"--CourseDirectory.db_url={url.split('?', 1)[0]}"] if url.startswith("sqlite:") else []
    proc = run_nbgrader(root, "db", "upgrade", *extra)
    if proc.returncode != 0:
        raise SystemExit("nbgrader db upgrade failed")
    print("gradebook " + ("created and " if empty else "") + "at nbgrader's current schema")


_GB_LOCK = threading.Lock()


def zero_in_gradebook(root: Path, student: str, a: str) -> None:
    """Record 0 on every graded cell (nothing could run); replaces any earlier grade of this submission."""
    import warnings

    from nbgrader.api import Gradebook

    with _GB_LOCK, warnings.catch_warnings(), Gradebook(_gradebook_url(root), COURSE_ID) as gb:
        warnings.simplefilter("ignore")  # nbgrader's own SQLAlchemy autoflush warnings
        gb.update_or_create_student(student)
        sub = gb.update_or_create_submission(a, student)
        for nb in sub.notebooks:
            for g in nb.grades:
                g.auto_score = 0.0
                g.manual_score = None
                g.needs_manual_grade = False
        gb.db.commit()


def _die_with_parent() -> None:  # children die with the batch (a crashed batch leaves no grader behind)
    try:
        import ctypes
        import signal as _signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, _signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# nbgrader (and torch, and the judges) take seconds to import; a fork server that has imported them once starts
# each grading process (still one fresh process per submission) without paying that again.
_PRELOAD = ["nbgrader.apps.nbgraderapp", "nbgrader.converters", "nbgrader.preprocessors", "nbclient", "nbconvert",
            "jupyter_client.manager", "sqlalchemy", "nbformat", "torch", "course_judge.preprocessors", "course_judge.sandbox",
            "course_judge.kernel", "course_judge.static", "copydetect", "course_judge._warm"]
_MP = None


def _mp_context():
    global _MP
    if _MP is None and os.environ.get("COURSE_GRADER_FORKSERVER", "1") != "0":
        import multiprocessing as mp

        try:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(_PRELOAD)
            _MP = ctx
        except (ValueError, OSError):
            _MP = False
    return _MP or None


_START_LOCK = threading.Lock()


def _start(proc) -> None:
    """Start a fork-server process without making it re-import this script (or a test driver) as __main__."""
    import types

    with _START_LOCK:
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            proc.start()
        finally:
            sys.modules["__main__"] = main


def nbgrader_step(root: Path, args: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int, str]:
    """Run ``nbgrader *args`` in its own process (forked from the preloaded server when it can), output to ``log``."""
    full_env = {**grading_env(root), **env}
    log.parent.mkdir(parents=True, exist_ok=True)
    ctx = _mp_context()
    if ctx is not None:
        proc = ctx.Process(target=nbgrader_cli, args=(args, full_env, str(root), str(log)), daemon=False)
        _start(proc)
        _ACTIVE.add(proc)
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            rc = -9
        else:
            rc = proc.exitcode
        _ACTIVE.discard(proc)
        out = log.read_text(errors="replace") if log.exists() else ""
    else:
        p = subprocess.Popen([nbgrader_bin(), *args], cwd=root, env=full_env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=_die_with_parent)
        _ACTIVE.add(p)
        try:
            out, _ = p.communicate(timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            out, _ = p.communicate()
            rc = -9
        finally:
            _ACTIVE.discard(p)
        log.write_text(out or "")
    if rc == -9:
        out += f"\n[grader] killed after {timeout:.0f} s"
    return rc, out


def _run_autograde(root: Path, student: str, a: str, env: dict[str, str], timeout: float) -> tuple[int, str]:
    args = ["autograde", a, "--student", student, "--force", f"--CourseDirectory.root={root}",
            f"--CourseDirectory.submitted_directory={BATCH / 'staging'}", "--log-level=WARN"]
    log = root / BATCH / "logs" / f"{student}__{a}.log"
    out, rc = "", 1
    for attempt in range(2):
        rc, out = nbgrader_step(root, args, env, log, timeout)
        if rc == 0 or "database is locked" not in out or attempt:
            break
    return rc, out


_ACTIVE: set = set()


def grade_submission(root: Path, student: str, a: str, force: bool = False) -> Record:
    """Grade one submission (or return its stored record when nothing changed).

    Never leaves an earlier grade standing by accident: whatever fails while staging or grading (a notebook that
    crashes the parser, a grader bug, a killed process) replaces it with 0 and a ``grading_failed`` diagnosis, or, if
    even the gradebook cannot be written, marks the record ``stale_grade`` for a person to look at.
    """
    t0 = time.perf_counter()
    try:
        return _grade_submission(root, student, a, force, t0)
    except Exception as e:  # noqa: BLE001 - RecursionError, MemoryError, OSError, a bug: one submission, never the batch
        import traceback

        return fail_submission(root, student, a, f"the grader failed on this submission ({type(e).__name__}: {str(e)[:200]})",
                               log=traceback.format_exc(), t0=t0)


def fail_submission(root: Path, student: str, a: str, why: str, log: str = "", t0: float | None = None) -> Record:
    """Record a submission whose grading failed: 0 points in the gradebook (never the old grade), a saved record."""
    rec = Record(student, a, status="failed", log=log)
    rec.diagnoses.append(_diag("grading_failed", f"{why}: scored 0"))
    with contextlib.suppress(Exception):
        rec.hash = submission_hash(root / "submitted" / student / a)
    shutil.rmtree(root / "autograded" / student / a, ignore_errors=True)
    try:
        zero_in_gradebook(root, student, a)
    except Exception as e:  # noqa: BLE001 - the gradebook itself is broken: say the old grade still stands
        rec.diagnoses.append(_diag("stale_grade", f"the gradebook could not be updated ({type(e).__name__}: {str(e)[:160]}): "
                                   "an earlier grade of this submission may still stand there and in grades.csv"))
    with contextlib.suppress(Exception):
        _fill_scores(root, rec)
    rec.seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    rec.graded_at = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        save_record(root, rec)
    except Exception:  # noqa: BLE001 - an unsaved failure is regraded next time (hash "" never matches)
        with contextlib.suppress(OSError):
            _state_path(root, student, a).unlink()
    return rec


def unchanged(root: Path, student: str, a: str, h: str | None = None, fp: str | None = None) -> Record | None:
    """The stored record of a submission that needs no grading (same files, same tests, a result that stands)."""
    h = h or submission_hash(root / "submitted" / student / a)
    fp = fp or grading_fingerprint(root, a)
    old = load_record(root, student, a)
    graded_nb = root / "autograded" / student / a / f"{a}.ipynb"
    if (old is not None and old.hash == h and old.fingerprint == fp and old.status in ("graded", "zero")
            and (old.status == "zero" or graded_nb.exists()) and not any(d["kind"] == "inconclusive" for d in old.diagnoses)):
        old.skipped = True
        return old
    return None


def _grade_submission(root: Path, student: str, a: str, force: bool, t0: float) -> Record:
    folder = root / "submitted" / student / a
    h, fp = submission_hash(folder), grading_fingerprint(root, a)
    graded_nb = root / "autograded" / student / a / f"{a}.ipynb"
    old = None if force else unchanged(root, student, a, h, fp)
    if old is not None:
        return old
    rec = Record(student, a, hash=h, fingerprint=fp)
    problem = student_id_problem(student)
    if problem:  # batch() refuses these before; a direct call must not create a gradebook student either
        rec.status = "refused"
        rec.diagnoses.append(_diag("invalid_student", f"folder {problem}: not graded"))
        return rec
    _state_path(root, student, a).unlink(missing_ok=True)  # from here on, a crash leaves no old record standing
    t_stage = time.perf_counter()
    staged, diags = stage(root, student, a)
    staging_s = time.perf_counter() - t_stage
    rec.diagnoses += diags
    shutil.rmtree(root / "autograded" / student / a, ignore_errors=True)  # no stale result survives a failure
    batch = root / BATCH
    diag_file = batch / "diag" / f"{student}__{a}.jsonl"
    diag_file.parent.mkdir(parents=True, exist_ok=True)
    diag_file.unlink(missing_ok=True)
    if staged is None:
        zero_in_gradebook(root, student, a)
        rec.status = "zero"
    else:
        env = {"COURSE_DIAG_FILE": str(diag_file), "COURSE_ROOT": str(root), "COURSE_SECTION": a,
               "COURSE_GRADER_LOCK": str(host_lock(root)), "COURSE_LAUNCHED_AT": repr(time.time())}
        if _BATCH_WORKERS and "COURSE_GRADE_WORKERS" not in os.environ:
            env["COURSE_GRADE_WORKERS"] = str(_BATCH_WORKERS)
        limit = float(os.environ.get("COURSE_SUBMISSION_TIMEOUT", int(os.environ.get("COURSE_NOTEBOOK_TIMEOUT", 1200)) + 300))
        rc, out = _run_autograde(root, student, a, env, limit)
        t_exit = time.time()
        rec.log = out
        log = batch / "logs" / f"{student}__{a}.log"
        records = []
        if diag_file.exists():
            for line in diag_file.read_text(errors="replace").splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass
        rec.diagnoses += [d for d in records if d.get("kind") not in QUIET]
        rec.verdicts = verdicts_from_diagnoses(records)
        rec.timing = next((d for d in reversed(records) if d.get("kind") == "timing"), {})
        rec.timing = {k: v for k, v in rec.timing.items() if k not in ("kind", "detail")} | {"staging_s": staging_s}
        if isinstance(rec.timing.get("after_s_from"), float):  # nbgrader's work after the last cell, to its exit
            rec.timing["after_s"] = t_exit - rec.timing.pop("after_s_from")
        rec.resources = _resources([d for d in records if d.get("kind") == "sandbox"])
        if any(v.inconclusive for v in rec.verdicts.values()):
            rec.diagnoses.append(_diag("inconclusive", "benchmark inconclusive on a busy machine (left ungraded): regrade "
                                       "with `make autograde` (such submissions are never skipped)"))
        if rc == 0 and graded_nb.exists():
            rec.status = "graded"
        else:
            last = [ln for ln in out.splitlines() if ln.strip() and "SAWarning" not in ln][-3:]
            rec.diagnoses.append(_diag("grading_failed", f"nbgrader autograde failed (exit {rc}): {' | '.join(last)[:300]}; "
                                       f"scored 0; log: {log.relative_to(root)}"))
            shutil.rmtree(root / "autograded" / student / a, ignore_errors=True)
            zero_in_gradebook(root, student, a)
            rec.status = "failed"
    _fill_scores(root, rec)
    rec.seconds = time.perf_counter() - t0
    rec.notebook_seconds = rec.timing.get("execution_s") if rec.status == "graded" else None
    rec.sandboxed = not any(d["kind"] == "unsandboxed" for d in rec.diagnoses) if rec.status == "graded" else None
    rec.graded_at = time.strftime("%Y-%m-%d %H:%M:%S")
    save_record(root, rec)
    return rec


def _resources(lines: list[dict]) -> dict:
    """One submission's sandbox usage from its ``sandbox`` lines (normally one kernel; peaks and counts combined)."""
    out: dict = {}
    for d in lines:
        for k, v in d.items():
            if k in ("kind", "detail"):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(out.get(k), (int, float)):
                out[k] = max(out[k], v) if k.endswith(("_mb", "_peak", "_limit", "cpus")) else out[k] + v
            else:
                out[k] = v
    if lines:
        out["kernels"] = len(lines)
    return out


def _fill_scores(root: Path, rec: Record) -> None:
    verdicts = getattr(rec, "verdicts", {})
    sc = scores(root, rec.student, rec.section, {g: "\n".join(v.messages) for g, v in verdicts.items()})
    rec.cells = {c.grade_id: [c.score, c.max_score, c.message] for c in sc.cells}
    rec.parts = {g: [[p.name, p.points, p.passed] for p in v.parts] for g, v in verdicts.items()}
    rec.score, rec.max_score = sc.score, sc.max_score
    graded_nb = root / "autograded" / rec.student / rec.section / f"{rec.section}.ipynb"
    if not graded_nb.exists():
        return
    mem = [g for g, (_, _, m) in rec.cells.items() if re.search(r"MemoryError|can't allocate memory|out of memory", m)]
    nb = _load(graded_nb)
    for i, c in enumerate(nb["cells"]):
        meta = c.get("metadata", {}).get("nbgrader", {}) or {}
        if c.get("cell_type") != "code" or meta.get("grade"):
            continue  # graded cells are covered by their messages above
        if any(re.search(r"MemoryError|can't allocate memory|out of memory", f"{o.get('ename')}: {o.get('evalue')}")
               for o in c.get("outputs", []) if o.get("output_type") == "error"):
            mem.append(meta.get("grade_id") or f"cell {i}")
    if mem:
        rec.diagnoses.append(_diag("memory", "ran out of memory (the kernel's limit) in: " + ", ".join(mem[:6])))


def ensure_assignments(root: Path, names: list[str]) -> None:
    """Make sure the gradebook knows each section as it is now in source/ (re-generates changed ones)."""
    from nbgrader.api import Gradebook, MissingEntry

    marks = root / BATCH / "assignments.json"
    seen = json.loads(marks.read_text()) if marks.exists() else {}
    for a in names:
        digest = hashlib.sha256((root / "source" / a / f"{a}.ipynb").read_bytes()).hexdigest()
        try:
            with Gradebook(_gradebook_url(root), COURSE_ID) as gb:
                gb.find_assignment(a)
                known = True
        except MissingEntry:
            known = False
        if known and seen.get(a) in (None, digest) and (root / "release" / a / f"{a}.ipynb").exists():
            seen[a] = digest
            continue
        proc = run_nbgrader(root, "generate_assignment", a, "--force")
        if proc.returncode != 0:
            raise SystemExit(f"generate_assignment {a} failed")
        seen[a] = digest
    marks.parent.mkdir(parents=True, exist_ok=True)
    marks.write_text(json.dumps(seen, indent=1))


def ensure_students(root: Path, students: list[str]) -> None:
    """Enter every student in the gradebook before parallel grading starts.

    nbgrader's autograde checks for the student, then inserts it: two graders starting on two sections of the same
    new student race, and the loser fails with "UNIQUE constraint failed: student.id".
    """
    import warnings

    from nbgrader.api import Gradebook

    with _GB_LOCK, warnings.catch_warnings(), Gradebook(_gradebook_url(root), COURSE_ID) as gb:
        warnings.simplefilter("ignore")  # nbgrader's own SQLAlchemy autoflush warnings
        for s in students:
            gb.update_or_create_student(s)


_BATCH_WORKERS: int | None = None  # set by batch(): the kernels' default CPU quota is the machine's CPUs / workers


def refuse(root: Path, rec: Record) -> Record:
    """A refused student folder: no gradebook entry is created; one that exists (from before) is zeroed, old output moved."""
    import warnings

    from nbgrader.api import Gradebook, MissingEntry

    name = rec.student
    try:
        with _GB_LOCK, warnings.catch_warnings(), Gradebook(_gradebook_url(root), COURSE_ID) as gb:
            warnings.simplefilter("ignore")
            try:
                student = gb.find_student(name)
            except MissingEntry:
                student = None
            if student is not None:
                for sub in student.submissions:
                    for nb in sub.notebooks:
                        for g in nb.grades:
                            g.auto_score, g.manual_score, g.needs_manual_grade = 0.0, None, False
                gb.db.commit()
                rec.diagnoses.append(_diag("stale_grade", f"{name!r} had grades in the gradebook from an earlier run: "
                                           "set to 0"))
    except Exception as e:  # noqa: BLE001 - reported, never fatal
        rec.diagnoses.append(_diag("stale_grade", f"the gradebook could not be checked for {name!r} ({type(e).__name__}: "
                                   f"{str(e)[:120]}): an earlier grade may still stand"))
    if name.lower() in RESERVED_IDS:  # autograded/<name> is the batch's own (.batch, summary.md ...): never moved here
        return rec
    for p in [root / "autograded" / name, *(root / BATCH / "state").glob(f"{glob_escape(name)}__*.json")]:
        if p.is_symlink() or p.is_dir() or (p.parent.name == "state" and p.exists()):
            _quarantine(root, p)
    return rec


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _quarantine(root: Path, p: Path) -> Path:
    """Move something that is in the way (a folder where a report goes, a refused student's old output) aside."""
    q = root / BATCH / "quarantine" / f"{time.strftime('%Y%m%d-%H%M%S')}-{p.name}"
    q.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while q.exists() or q.is_symlink():
        n += 1
        q = q.with_name(f"{q.name}.{n}")
    os.replace(p, q)
    print(f"!! moved {p.relative_to(root)} out of the way to {q.relative_to(root)}", flush=True)
    return q


def batch(root: Path = ROOT, students: list[str] | None = None, names: list[str] | None = None, workers: int | None = None,
          force: bool = False, report: bool = True) -> list[Record]:
    """Grade every submission, continue past failures, skip unchanged ones; always write grades.csv and the summary.

    Returns one record per submission graded (or skipped) and one per refused folder (status ``refused``).
    """
    global _BATCH_WORKERS
    from course_judge import dask_batch
    from course_judge.sandbox import confinement_status, sandbox_status, sweep_stale

    sweep_stale()
    found, refused = _scan_submitted(root, students, names)
    todo = [(s, a) for s, a in found if (root / "source" / a).exists()]
    for s, a in found:
        if (s, a) not in todo:
            print(f"!! submitted/{s}/{a}: no section {a} in source/ (ignored)", flush=True)
    refused = [refuse(root, r) for r in refused]
    for r in refused:
        print(f"!! {_progress_line(r)}", flush=True)
    ok, how = sandbox_status()
    cg_ok, cg_how = confinement_status()
    for good, line in ((ok, how), (cg_ok, cg_how)):
        print(line if good else "!" * 78 + f"\n!!! {line}\n" + "!" * 78, flush=True)
    ensure_assignments(root, sorted({a for _, a in todo}))
    ensure_students(root, sorted({s for s, _ in todo}))
    workers = max(1, workers or int(os.environ.get("COURSE_GRADE_WORKERS", min(2, os.cpu_count() or 1))))
    _BATCH_WORKERS = workers
    t0 = time.perf_counter()
    records: list[Record] = []

    def finished(rec: Record) -> None:
        records.append(rec)
        print(_progress_line(rec), flush=True)

    def done(s: str, a: str, res: dict | None, err: BaseException | None) -> None:
        try:
            rec = Record(**res) if err is None else fail_submission(root, s, a, f"grader error: {type(err).__name__}: {err}"[:300])
        except Exception as e:  # noqa: BLE001 - one broken submission never stops the batch
            rec = fail_submission(root, s, a, f"grader error: {e!r}"[:300])
        finished(rec)

    pending = []
    for s, a in todo:  # unchanged submissions never reach the cluster
        try:
            old = None if force else unchanged(root, s, a)
        except Exception:  # noqa: BLE001 - the worker's grade_submission diagnoses it
            old = None
        if old is not None:
            finished(old)
        else:
            pending.append((s, a))
    where = ""
    if pending:
        try:
            workers, where = dask_batch.grade_all(root, pending, force, workers, done)
        except (Exception, SystemExit) as e:  # the pool itself failed (no scheduler, no workers): the batch still reports
            where = f"the grading pool failed: {type(e).__name__}: {str(e)[:300]}"
            print(f"!! {where}", flush=True)
            seen = {(r.student, r.section) for r in records}
            for s, a in pending:
                if (s, a) not in seen:
                    finished(fail_submission(root, s, a, where))
    wall = time.perf_counter() - t0
    sweep_stale()
    records.sort(key=lambda r: (r.section, r.student))
    if report and (records or refused):
        try:
            grades(root)
        except Exception as e:  # noqa: BLE001 - the summary is still written
            print(f"!! grades.csv not written: {type(e).__name__}: {e}", flush=True)
        sandbox_line = (how if ok else "UNSANDBOXED: " + how) + "; " + cg_how
        write_summary(root, records, wall, workers, sandbox_line, refused=refused, cluster=where)
    return records + refused


def _progress_line(rec: Record) -> str:
    if rec.status == "refused":
        return f"submitted/{rec.student!r}: refused: " + "; ".join(d["detail"] for d in rec.diagnoses)
    what = "unchanged, skipped" if rec.skipped else f"{rec.status} in {rec.seconds:.0f} s"
    nb = f", notebook {rec.notebook_seconds:.0f} s" if rec.notebook_seconds and not rec.skipped else ""
    att = list(dict.fromkeys(d["kind"] for d in rec.attention))
    flag = ("  [REVIEW] " if rec.review else "  [attention] ") + "; ".join(att) if att else ""
    return f"{rec.student}/{rec.section}: {rec.score:g}/{rec.max_score:g} ({what}{nb}){flag}"


def autograde_one(root: Path, student: str, a: str) -> GradeRun:
    rec = grade_submission(root, student, a, force=True)
    return GradeRun(student, a, rec.seconds, rec.status == "graded", rec.log)


def autograde(
    root: Path = ROOT, students: list[str] | None = None, names: list[str] | None = None, workers: int | None = None
) -> list[GradeRun]:
    """Autograde every submission (batch: unchanged ones are skipped); one GradeRun per submission."""
    return [GradeRun(r.student, r.section, r.seconds, r.status == "graded", r.log)
            for r in batch(root, students, names, workers)]


def scores(root: Path, student: str, a: str, messages: dict[str, str] | None = None) -> NotebookScore:
    db = _gradebook_url(root)
    if messages is None:
        rec = load_record(root, student, a)
        messages = {g: c[2] for g, c in rec.cells.items()} if rec else {}
    return read_scores(db, COURSE_ID, a, student, root / "autograded" / student / a / f"{a}.ipynb", messages)


# ---------------------------------------------------------------- batch summary


def exercise_stats(records: list[Record]) -> dict[str, list[dict]]:
    """Per section, per exercise: points, full-marks rate, visible/hidden pass rates, mean points."""
    out: dict[str, list[dict]] = {}
    for a in sorted({r.section for r in records}):
        recs = [r for r in records if r.section == a and r.cells]
        groups: dict[str, list[str]] = {}
        for r in recs:
            for gid in r.cells:
                groups.setdefault(exercise_of(gid), [])
                if gid not in groups[exercise_of(gid)]:
                    groups[exercise_of(gid)].append(gid)
        rows = []
        for ex, gids in groups.items():
            n = len(recs)

            def passed(r: Record, ids: list[str]) -> bool:
                return all(r.cells.get(g, [0, 1])[0] >= r.cells.get(g, [0, 1])[1] for g in ids)

            def parts_passed(r: Record, visible: bool, gids: list[str] = gids) -> bool | None:
                parts = [p for g in gids for p in r.parts.get(g, []) if str(p[0]).startswith("visible") == visible]
                return all(p[2] for p in parts) if parts else None

            vis = [parts_passed(r, True) for r in recs]
            hid = [parts_passed(r, False) for r in recs]
            rows.append({
                "exercise": ex, "points": sum(recs[0].cells.get(g, [0, 0])[1] for g in gids) if recs else 0, "n": n,
                "full_marks": sum(passed(r, gids) for r in recs) / n if n else 0.0,
                "visible_passed": sum(bool(x) for x in vis) / n if n and any(x is not None for x in vis) else None,
                "hidden_passed": sum(bool(x) for x in hid) / n if n and any(x is not None for x in hid) else None,
                "mean_points": sum(sum(r.cells.get(g, [0, 0])[0] for g in gids) for r in recs) / n if n else 0.0,
            })
        out[a] = rows
    return out


def _md(text: str) -> str:
    """Text for a Markdown table cell: pipes escaped, control characters shown, no line breaks."""
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
    return text.replace("|", "\\|")


def _report_target(out_dir: Path, name: str) -> Path:
    """autograded/NAME, ready to be written: whatever is in the way (a folder, a link) is moved aside first."""
    p = out_dir / name
    if p.is_symlink() or (p.exists() and not p.is_file()):
        _quarantine(out_dir.parent, p)
    return p


def write_summary(root: Path, records: list[Record], wall: float, workers: int, sandbox_line: str,
                  refused: list[Record] | None = None, cluster: str = "") -> Path:
    """autograded/summary.md, summary.json and score_distribution.png (each written even if another one fails)."""
    out_dir = root / "autograded"
    out_dir.mkdir(parents=True, exist_ok=True)
    refused = refused or []
    graded_now = [r for r in records if not r.skipped]
    rate = len(graded_now) / (wall / 60) if graded_now and wall > 0 else 0.0
    stats = exercise_stats(records)
    fig_path = _report_target(out_dir, "score_distribution.png")
    try:
        if records:
            _score_figure(records, fig_path)
    except Exception as e:  # noqa: BLE001 - a figure never costs the summary
        print(f"!! {fig_path.relative_to(root)} not drawn: {type(e).__name__}: {e}", flush=True)
    peaks = [(r.resources.get("peak_memory_mb"), r) for r in records if r.resources.get("peak_memory_mb") is not None]
    lines = [
        "# Grading summary", "",
        f"- {time.strftime('%Y-%m-%d %H:%M')}: {len(records)} submissions, {len(graded_now)} graded now "
        f"({len(records) - len(graded_now)} unchanged, skipped), {wall:.0f} s with {workers} workers"
        + (f": **{rate:.2f} submissions/minute**" if graded_now else "")
        + (f"; {len(refused)} folders refused" if refused else ""),
        f"- sandbox: {sandbox_line}",
    ] + ([f"- grading pool: {cluster}"] if cluster else [])
    if peaks:
        top, who = max(peaks, key=lambda x: x[0])
        lines.append(f"- sandbox peak memory: median {sorted(p for p, _ in peaks)[len(peaks) // 2]:.0f} MB, "
                     f"max {top:.0f} MB ({_md(who.student)}/{who.section})")
    lines += [
        f"- grades: `grades.csv`; figure: `{fig_path.relative_to(root)}`; per-submission logs: `{BATCH}/logs/`", "",
        "## Scores", "", "| section | submissions | mean | median | min | max | full marks |", "|---|---|---|---|---|---|---|",
    ]
    for a in sorted({r.section for r in records}):
        rs = [r for r in records if r.section == a]
        pct = sorted(100 * r.score / r.max_score if r.max_score else 0.0 for r in rs)
        med = pct[len(pct) // 2] if len(pct) % 2 else (pct[len(pct) // 2 - 1] + pct[len(pct) // 2]) / 2
        full = sum(r.max_score > 0 and r.score >= r.max_score for r in rs)
        lines.append(f"| {a} | {len(rs)} | {sum(pct) / len(pct):.0f}% | {med:.0f}% | {pct[0]:.0f}% | {pct[-1]:.0f}% | {full} |")
    lines += ["", "## Per-exercise pass rates", ""]
    for a, rows in stats.items():
        lines += [f"### {a}", "", "| exercise | points | full marks | visible checks passed | hidden checks passed | mean points |",
                  "|---|---|---|---|---|---|"]
        for row in rows:
            def pc(x):
                return "-" if x is None else f"{100 * x:.0f}%"

            lines.append(f"| {row['exercise']} | {row['points']:g} | {pc(row['full_marks'])} | {pc(row['visible_passed'])} | "
                         f"{pc(row['hidden_passed'])} | {row['mean_points']:.2f} |")
        lines.append("")
    need = [r for r in records if r.attention]
    lines += ["## Submissions that needed attention", "",
              f"{len(need)} of {len(records)}; **REVIEW** marks the ones a person should look at." if need else "None.", ""]
    if need:
        lines += ["| student | section | score | why |", "|---|---|---|---|"]
        for r in sorted(need, key=lambda r: (not r.review, r.section, r.student)):
            why = "<br>".join(_md(f"{d['kind']}: {d['detail']}") for d in r.attention)
            lines.append(f"| {'**REVIEW** ' if r.review else ''}{_md(r.student)} | {r.section} | {r.score:g}/{r.max_score:g} | {why} |")
    if refused:
        lines += ["", "## Refused folders (not graded, no gradebook entry)", "",
                  "| folder | why |", "|---|---|"]
        for r in refused:
            why = "<br>".join(_md(f"{d['kind']}: {d['detail']}") for d in r.diagnoses)
            lines.append(f"| **REVIEW** submitted/{_md(repr(r.student))} | {why} |")
    info = [(r, d) for r in records for d in r.diagnoses if d["kind"] not in ATTENTION]
    if info:
        lines += ["", "## Notes", ""] + [f"- {_md(r.student)}/{r.section}: {_md(d['detail'])}" for r, d in info]
    md = _report_target(out_dir, "summary.md")
    try:
        md.write_text("\n".join(lines) + "\n")
    except OSError as e:
        print(f"!! {md} not written: {e}", flush=True)

    def row(r: Record) -> dict:
        return {k: getattr(r, k) for k in Record.__dataclass_fields__ if k not in ("log", "verdicts")} | {
            "attention": bool(r.attention), "review": r.review}

    js = _report_target(out_dir, "summary.json")
    try:
        js.write_text(json.dumps({
            "wall_seconds": wall, "workers": workers, "cluster": cluster, "graded_now": len(graded_now), "submissions_per_minute": rate,
            "sandbox": sandbox_line, "exercises": stats, "submissions": [row(r) for r in records],
            "refused": [row(r) for r in refused],
        }, indent=1, default=str))
    except OSError as e:
        print(f"!! {js} not written: {e}", flush=True)
    print(f"\nsummary: {md}  ({len(need)} needing attention, {len(refused)} refused; {rate:.2f} submissions/minute over "
          f"{len(graded_now)} graded now)")
    return md


def _score_figure(records: list[Record], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from course_lib import viz

    viz.set_style()
    from matplotlib.ticker import MaxNLocator

    names = sorted({r.section for r in records})
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, a in zip(axes.flat, names):
        pct = [100 * r.score / r.max_score if r.max_score else 0.0 for r in records if r.section == a]
        ax.hist(pct, bins=[i * 10 for i in range(11)], edgecolor="white")
        ax.axvline(sum(pct) / len(pct), color="k", ls="--", lw=1, label="mean")
        ax.set_title(f"{a} (n={len(pct)})")
        ax.set_xlabel("score (% of points)")
        ax.set_xlim(0, 100)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("submissions")
    axes.flat[0].legend(loc="upper center")
    fig.suptitle("Score distribution per section")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(root: Path = ROOT, students: list[str] | None = None) -> str:
    subs = submissions(root, students)
    rank = {s: i for i, s in enumerate(SAMPLE_STUDENTS)}
    studs = sorted({s for s, _ in subs}, key=lambda s: (rank.get(s, len(rank)), s))
    names = sections(root)
    w = max([len("student")] + [len(s) for s in studs]) + 2
    cols = [max(len(a), 11) + 2 for a in names]
    lines = ["student".ljust(w) + "".join(a.rjust(c) for a, c in zip(names, cols)) + "total".rjust(14)]
    for s in studs:
        row, tot, mx = s.ljust(w), 0.0, 0.0
        for a, c in zip(names, cols):
            if (s, a) in subs and ((root / "autograded" / s / a).exists() or (load_record(root, s, a) or Record(s, a)).status != "pending"):
                sc = scores(root, s, a)
                row += f"{sc.score:g}/{sc.max_score:g}".rjust(c)
                tot, mx = tot + sc.score, mx + sc.max_score
            else:
                row += "-".rjust(c)
        lines.append(row + f"{tot:g}/{mx:g}".rjust(14))
    return "\n".join(lines)


def feedback(root: Path = ROOT) -> None:
    for student, a in submissions(root):
        if (root / "autograded" / student / a).exists():
            run_nbgrader(root, "generate_feedback", a, "--student", student, "--force")
    print("feedback -> feedback/STUDENT/SECTION/SECTION.html")


def grades(root: Path = ROOT) -> None:
    run_nbgrader(root, "export", "--to", str(root / "grades.csv"))
    print(f"grades -> {root / 'grades.csv'}")


def collect(root: Path, a: str, zips: list[Path] | None = None) -> None:
    """LMS download -> submitted/: zips go to downloaded/A/archive/, then `nbgrader zip_collect A`."""
    archive = root / "downloaded" / a / "archive"
    archive.mkdir(parents=True, exist_ok=True)
    for z in zips or []:
        shutil.copy(z, archive / Path(z).name)
    proc = run_nbgrader(root, "zip_collect", a, "--force", quiet=False)
    if proc.returncode != 0:
        raise SystemExit(f"zip_collect {a} failed")
    print(f"collected downloaded/{a}/archive/ -> submitted/STUDENT/{a}/ (now run: make autograde)")


def demo(root: Path = ROOT) -> None:
    t0 = time.perf_counter()
    release(root)
    samples(root)
    runs = autograde(root)
    print()
    print(table(root))
    print(f"\ndemo: {len(runs)} notebooks autograded in {time.perf_counter() - t0:.0f} s")
    bad = [r for r in runs if not r.ok]
    if bad:
        raise SystemExit("autograde failed for: " + ", ".join(f"{r.student}/{r.section}" for r in bad))


# ---------------------------------------------------------------- temporary course copies


def temp_course(names: list[str], own_gradebook: bool = True) -> Path:
    """A throw-away course directory holding the config and the given sections' source notebooks.

    ``own_gradebook``: its gradebook is a SQLite file inside it even where COURSE_DB_URL names a shared database (a
    self-check or a test never writes into the instructor's gradebook); False: the config's choice, as the course's.
    """
    tmp = Path(tempfile.mkdtemp(prefix="course-"))
    shutil.copy(ROOT / "nbgrader_config.py", tmp / "nbgrader_config.py")
    if own_gradebook:
        (tmp / SQLITE_MARK).write_text("this throw-away course keeps its own SQLite gradebook (see nbgrader_config.py)\n")
    for a in names:
        shutil.copytree(ROOT / "source" / a, tmp / "source" / a, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    return tmp


CHECK_CACHE = ROOT / ".cache" / "check"


def prepared_course(a: str) -> Path:
    """A throw-away course with section ``a`` released and entered in its gradebook, ready to grade a notebook.

    ``nbgrader generate_assignment`` takes seconds; its result depends only on the source notebook and the
    config, so it is made once per version of those (``.cache/check/``) and copied for each use.
    """
    import nbgrader

    h = hashlib.sha256()
    for f in (ROOT / "source" / a / f"{a}.ipynb", ROOT / "nbgrader_config.py"):
        h.update(f.read_bytes())
    h.update(nbgrader.__version__.encode())
    template = CHECK_CACHE / f"{a}-{h.hexdigest()[:16]}"
    if not (template / "release" / a / f"{a}.ipynb").exists():  # complete: the build is moved in whole
        build = temp_course([a])
        rc, out = nbgrader_step(build, ["generate_assignment", a, "--force", f"--CourseDirectory.root={build}", "--log-level=WARN"],
                                {}, build / "generate_assignment.log", 600)
        if rc != 0:
            shutil.rmtree(build, ignore_errors=True)
            raise SystemExit(f"generate_assignment {a} failed:\n{out[-3000:]}")
        template.parent.mkdir(parents=True, exist_ok=True)
        for old in template.parent.glob(f"{a}-*"):
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(build, template)  # atomic: a concurrent check sees all of it or nothing
        except OSError:
            shutil.copytree(build, template, dirs_exist_ok=True)
            shutil.rmtree(build, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix="course-"))
    shutil.copytree(template, tmp, dirs_exist_ok=True)
    return tmp


def infer_section(nb_path: Path) -> str:
    names = sections()
    for a in names:
        if a in nb_path.name or a in str(nb_path.parent.name):
            return a
    try:
        ids = {c.get("metadata", {}).get("nbgrader", {}).get("grade_id") for c in _load(nb_path)["cells"]}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        ids = set()
    for a in names:
        src_ids = {c.get("metadata", {}).get("nbgrader", {}).get("grade_id") for c in _load(ROOT / "source" / a / f"{a}.ipynb")["cells"]}
        if len(ids & src_ids - {None}) >= 3:
            return a
    raise SystemExit(f"cannot tell which section {nb_path} belongs to: pass SECTION=<one of {' '.join(names)}>")


def print_report(sc: NotebookScore, seconds: float | None = None, rec: Record | None = None, root: Path | None = None) -> None:
    """Points per exercise, each part the judge checked with its message, timings, diagnoses."""
    head = f"{sc.section} / {sc.student}: {sc.score:g} / {sc.max_score:g} points"
    extra = [f"graded in {seconds:.0f} s" if seconds is not None else ""]
    if rec is not None and rec.sandboxed is not None:
        extra.append("sandboxed" if rec.sandboxed else "UNSANDBOXED")
    print(head + (f"  ({', '.join(e for e in extra if e)})" if any(extra) else ""))
    verdicts = rec.verdicts if rec is not None else {}
    for c in sc.cells:
        mark = "ok  " if c.score >= c.max_score else ("part" if c.score > 0 else "FAIL")
        v = verdicts.get(c.grade_id)
        if v is not None and v.inconclusive:
            mark = "??  "
        print(f"  [{mark}] {exercise_of(c.grade_id):<28} {c.score:g}/{c.max_score:g}")
        if v is None:
            if c.message and c.score < c.max_score:
                print(f"         {c.message[:500]}")
            continue
        if v.rejected:
            print(f"         REFUSED: {v.rejected}")
        for p in v.parts:
            if not p.passed:
                first, *rest = (p.message or "failed").splitlines()
                print(f"         {'?' if p.passed is None else 'x'} {p.name} (0/{p.points:g}): {first[:400]}")
                for ln in rest[:4]:
                    print(f"             {ln[:400]}")
    if rec is not None and rec.timing:
        t = rec.timing
        print(f"  timing: notebook {t.get('execution_s') or 0:.1f} s (judge {t.get('judge_s') or 0:.1f} s, "
              f"{t.get('judge_calls', 0)} calls, channel {t.get('channel_s') or 0:.2f} s); "
              f"kernel start {t.get('kernel_start_s') or 0:.1f} s")
    for p in sc.problems:
        print(f"  problem: {p}")
    if rec is not None:
        for d in rec.diagnoses:
            print(f"  note: {d['detail']}")


def check(nb_path: Path, section: str | None = None) -> NotebookScore:
    """Grade one notebook with the judge on a copy; print the report, then write the feedback page."""
    from course_judge.sandbox import sandbox_status

    nb_path = nb_path.resolve()
    if not nb_path.exists():
        raise SystemExit(f"no such notebook: {nb_path}")
    a = section or infer_section(nb_path)
    ok, how = sandbox_status()
    if not ok:
        print("!" * 78 + f"\n!!! {how}\n" + "!" * 78)
    before = hashlib.sha256(nb_path.read_bytes()).hexdigest()
    tmp = prepared_course(a)
    try:
        dest = _mk(tmp / "submitted" / "self" / a / f"{a}.ipynb")
        shutil.copy(nb_path, dest)
        rec = grade_submission(tmp, "self", a, force=True)
        sc = scores(tmp, "self", a)
        print_report(sc, rec.seconds, rec, tmp)  # the answer first; the feedback page follows
        sys.stdout.flush()
        if rec.status == "graded":
            nbgrader_step(tmp, ["generate_feedback", a, "--student", "self", "--force", f"--CourseDirectory.root={tmp}",
                                "--log-level=WARN"], {}, tmp / "feedback.log", 600)
        fb = tmp / "feedback" / "self" / a / f"{a}.html"
        if fb.exists():
            out = _mk(ROOT / "feedback" / "self-check" / a / f"{a}.html")
            shutil.copy(fb, out)
            print(f"feedback: {out}")
        if hashlib.sha256(nb_path.read_bytes()).hexdigest() != before:  # never expected: grading works on a copy
            print(f"!! {nb_path} changed while it was being checked")
        return sc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify(a: str, keep: bool = False) -> int:
    """Author's check: the source notebook scores full marks, the untouched release scores zero."""
    tmp = prepared_course(a)
    status = 0
    try:
        shutil.copy(tmp / "release" / a / f"{a}.ipynb", _mk(tmp / "submitted" / "blank" / a / f"{a}.ipynb"))
        _save(strip_outputs(_load(tmp / "source" / a / f"{a}.ipynb")), tmp / "submitted" / "reference" / a / f"{a}.ipynb")
        for student in ("reference", "blank"):
            rec = grade_submission(tmp, student, a, force=True)
            sc = scores(tmp, student, a)
            print_report(sc, rec.seconds, rec, tmp)
            ex = rec.notebook_seconds
            if ex is not None:
                print(f"  notebook execution: {ex:.1f} s (budget 90 s)")
                if ex > 90:
                    status = 1
                    print("  !! over the 90 s budget")
            if rec.status != "graded":
                status = 1
                print("  !! grading failed:", rec.log[-2000:])
            if student == "reference" and sc.score < sc.max_score:
                status = 1
            if student == "blank" and sc.score > 0:
                status = 1
                print("  !! the untouched release must score 0")
            print()
        if keep:
            print(f"kept {tmp}")
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print("verify:", "PASS" if status == 0 else "FAIL")
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT, help="course directory (default: this checkout)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("release", "solutions", "samples", "publish"):
        p = sub.add_parser(name)
        p.add_argument("sections", nargs="*")
        if name in ("release", "publish"):
            p.add_argument("--exchange", help="also publish to this nbgrader exchange root (release); default for publish: "
                                              "COURSE_EXCHANGE, else the course-local .exchange/")
    p = sub.add_parser("autograde")
    p.add_argument("--student", action="append")
    p.add_argument("--workers", type=int)
    p.add_argument("--force", action="store_true", help="regrade unchanged submissions too")
    p.add_argument("sections", nargs="*")
    for name in ("feedback", "grades", "table", "demo"):
        sub.add_parser(name)
    sub.add_parser("db-upgrade", help="create the gradebook's tables if missing, migrate it (nbgrader db upgrade)")
    p = sub.add_parser("collect")
    p.add_argument("section")
    p.add_argument("zips", nargs="*", type=Path)
    p = sub.add_parser("check")
    p.add_argument("notebook", type=Path)
    p.add_argument("--section")
    p = sub.add_parser("verify")
    p.add_argument("section")
    p.add_argument("--keep", action="store_true")
    ns = ap.parse_args(argv)
    root = ns.root.resolve()
    if ns.cmd == "release":
        release(root, ns.sections or None)
        if ns.exchange:
            publish(root, ns.sections or None, ns.exchange)
    elif ns.cmd == "publish":
        publish(root, ns.sections or None, ns.exchange)
    elif ns.cmd == "solutions":
        solutions(root, ns.sections or None)
    elif ns.cmd == "samples":
        samples(root, ns.sections or None)
    elif ns.cmd == "autograde":
        recs = batch(root, ns.student, ns.sections or None, ns.workers, ns.force)
        print(table(root, ns.student))
        return 0 if all(r.status != "failed" for r in recs) else 1
    elif ns.cmd == "feedback":
        feedback(root)
    elif ns.cmd == "grades":
        grades(root)
    elif ns.cmd == "table":
        print(table(root))
    elif ns.cmd == "db-upgrade":
        upgrade_gradebook(root)
    elif ns.cmd == "demo":
        demo(root)
    elif ns.cmd == "collect":
        collect(root, ns.section, ns.zips)
    elif ns.cmd == "check":
        check(ns.notebook, ns.section)
    elif ns.cmd == "verify":
        return verify(ns.section, ns.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

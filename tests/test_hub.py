"""A class on a real JupyterHub (tools/jupyter/jupyterhub_config.py), end to end, in headless Chromium.

The test creates three unix accounts (one instructor, two students, PAM passwords) and a class folder in /tmp:
the instructor's course (a fresh copy of this checkout, private to the instructor), the students' share (a copy of
course_lib/ and nbgrader_config.py) and nbgrader's exchange (1777). It starts JupyterHub (PAM logins,
LocalProcessSpawner: each user's JupyterLab runs as that user), then:

- the instructor publishes 01_foundations with `make release EXCHANGE=...` (nbgrader release_assignment);
- each student logs in through the hub, opens Nbgrader > Assignment List, fetches 01_foundations, puts an answer
  in the fetched copy (through the Jupyter contents API: the worked solution for A, half of it for B) and submits;
- the instructor collects (`nbgrader collect`), root grades through the course's batch and sandbox
  (`make autograde`), the instructor generates and releases feedback; each student fetches their own feedback;
- A's score in the gradebook is full marks, B's less; A cannot list the exchange's inbound/, read B's submission,
  the instructor's source/ or solutions/; both students import the course_lib of the share.

Runs as root only (useradd, setuid spawner). Needs configurable-http-proxy (npm; `make install` installs it).
Cleans up its accounts, home folders and processes on failure too. Screenshots: .cache/screenshots/hub-*.png.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser_kit import (
    list_errors,
    playwright_or_skip,
    shot,
    wait_assignment_list,
    wait_submitted,
)
from conftest import ROOT, _fresh_copy, file_digest, graded_cells, load_nb

pytestmark = pytest.mark.browser

playwright_api = playwright_or_skip()
PROXY = shutil.which("configurable-http-proxy")
if os.geteuid() != 0:
    pytest.skip("the hub test creates unix users and runs JupyterHub's setuid spawner: run it as root", allow_module_level=True)
if PROXY is None:
    pytest.skip("configurable-http-proxy is not installed (make install runs `npm install -g configurable-http-proxy` as root)",
                allow_module_level=True)

SECTION = "01_foundations"
COURSE_ID = "deepseek-v3-from-scratch"
PORT, HUB_PORT, PROXY_API_PORT, SPAWN_PORTS = 18000, 18001, 18002, "18010-18020"
HUB = f"http://127.0.0.1:{PORT}"
VENV = ROOT / ".venv"
VENV_BIN = VENV / "bin"


@dataclass
class Account:
    role: str  # instructor | student-a | student-b
    name: str
    password: str

    @property
    def home(self) -> Path:
        return Path(pwd.getpwnam(self.name).pw_dir)


@dataclass
class Class:
    base: Path
    course: Path  # the instructor's course (private)
    share: Path  # what students' servers read
    exchange: Path
    instructor: Account
    students: list[Account]


T0 = time.perf_counter()


def step(what: str) -> None:
    """A timestamped line per step (shown with the failure, or with -s)."""
    print(f"[{time.perf_counter() - T0:6.1f} s] {what}", flush=True)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _user_pids(uid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if d.stat().st_uid == uid:
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _kill_user_processes(name: str) -> None:
    """Every process of a test account, by pid (the accounts are the test's own)."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _user_pids(uid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for _ in range(50):
            if not _user_pids(uid):
                return
            time.sleep(0.1)


def _blocking_dirs(paths: list[Path]) -> list[Path]:
    """Folders on the way to ``paths`` that others cannot enter (e.g. /root when the venv's Python lives there)."""
    out: list[Path] = []
    for p in paths:
        for d in [*reversed(p.resolve().parents), p.resolve()]:
            if d.is_dir() and not d.stat().st_mode & 0o001 and d not in out:
                out.append(d)
    return out


def student_env(cls: Class, who: Account) -> dict[str, str]:
    """The environment the hub's spawner gives a student's server (tools/jupyter/jupyterhub_config.py)."""
    return {"HOME": str(who.home), "USER": who.name, "LANG": "C.UTF-8", "PATH": f"{VENV_BIN}:/usr/bin:/bin",
            "PYTHONPATH": str(cls.share), "JUPYTER_CONFIG_PATH": str(cls.share), "COURSE_EXCHANGE": str(cls.exchange),
            "COURSE_ASSIGNMENT_DIR": str(who.home)}


def instructor_env(cls: Class) -> dict[str, str]:
    who = cls.instructor
    return {"HOME": str(who.home), "USER": who.name, "LANG": "C.UTF-8", "PATH": f"{VENV_BIN}:/usr/bin:/bin",
            "PYTHONPATH": str(cls.course), "COURSE_EXCHANGE": str(cls.exchange), "MPLBACKEND": "Agg"}


def as_user(who: Account, cmd: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    """``cmd`` as the unix user (runuser), with exactly ``env``."""
    return _run(["runuser", "-u", who.name, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()], *cmd],
                cwd=cwd or who.home, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _denied(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, (
        f"{what} should fail with permission denied; rc {proc.returncode}, stdout {proc.stdout[:200]!r}, stderr {proc.stderr[:200]!r}")


@pytest.fixture(scope="module")
def klass(request) -> Class:
    """Three unix accounts and the class folder; removed (accounts, homes, processes, ACLs) whatever happens."""
    tag = secrets.token_hex(2)
    accounts = [Account(role, f"{prefix}{tag}", secrets.token_urlsafe(12))
                for role, prefix in (("instructor", "hubi"), ("student-a", "hubsa"), ("student-b", "hubsb"))]
    base = Path(tempfile.mkdtemp(prefix="hubtest-", dir="/tmp"))
    os.chmod(base, 0o755)
    made: list[Account] = []
    acls: list[tuple[Path, bool]] = []  # (folder, had an extended ACL before)

    def cleanup() -> None:
        for a in made:
            _kill_user_processes(a.name)
        for d, had_acl in acls:
            if had_acl:
                for a in made:
                    _run(["setfacl", "-x", f"u:{a.name}", str(d)])
            else:
                _run(["setfacl", "-b", str(d)])  # back to plain mode bits (no leftover mask entry)
        for a in made:
            _run(["userdel", "-r", "-f", a.name])
        shutil.rmtree(base, ignore_errors=True)

    request.addfinalizer(cleanup)
    for a in accounts:
        _ok(_run(["useradd", "-m", "-s", "/bin/bash", a.name]), f"useradd {a.name}")
        made.append(a)
        _ok(_run(["chpasswd"], input=f"{a.name}:{a.password}\n"), "chpasswd")
    # The venv's interpreter may live where others cannot enter (a pyenv under /root): let only these accounts pass.
    blocking = _blocking_dirs([VENV / "bin" / "python", Path(sys.base_prefix) / "bin", ROOT])
    if blocking and not shutil.which("setfacl"):
        pytest.skip(f"the test accounts cannot reach the venv ({blocking[0]} is closed to others) and setfacl is missing "
                    "(apt-get install acl; make install does it as root)")
    for d in blocking:
        had_acl = bool(_run(["getfacl", "--skip-base", "--absolute-names", str(d)]).stdout.strip())
        acls.append((d, had_acl))
        for a in accounts:
            _ok(_run(["setfacl", "-m", f"u:{a.name}:x", str(d)]), f"setfacl on {d}")

    instructor, students = accounts[0], accounts[1:]
    course, share, exchange = base / "course", base / "share", base / "exchange"
    course.mkdir()
    _fresh_copy(course)
    shutil.rmtree(course / ".exchange", ignore_errors=True)
    _run(["chown", "-R", f"{instructor.name}:{instructor.name}", str(course)])
    os.chmod(course, 0o700)  # the instructor's course: source, solutions, judges, gradebook
    share.mkdir()
    shutil.copytree(ROOT / "course_lib", share / "course_lib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "nbgrader_config.py", share / "nbgrader_config.py")
    _run(["chmod", "-R", "a+rX", str(share)])
    exchange.mkdir()
    os.chmod(exchange, 0o1777)
    step("accounts and class folder ready")
    return Class(base, course, share, exchange, instructor, students)


@pytest.fixture(scope="module")
def release(klass):
    """`make release EXCHANGE=... SECTION=...` as the instructor, started at once (it runs while the hub starts)."""
    stamp = VENV / ".shared-by-tests"
    stamp.touch()
    log = klass.base / "release.log"
    cmd = ["make", "-C", str(klass.course), "release", f"EXCHANGE={klass.exchange}", f"SECTION={SECTION}",
           f"VENV={VENV}", f"STAMP={stamp}"]
    env = instructor_env(klass)
    with open(log, "w") as out:
        proc = subprocess.Popen(["runuser", "-u", klass.instructor.name, "--", "env", "-i",
                                 *[f"{k}={v}" for k, v in env.items()], *cmd],
                                cwd=klass.course, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait() -> str:
        rc = proc.wait(timeout=600)
        text = log.read_text()
        assert rc == 0, f"make release EXCHANGE=... (as the instructor) failed ({rc}):\n{text[-4000:]}"
        return text

    yield wait
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def hub(klass, release):
    """JupyterHub as root with the course's config; stopped (proxy and single-user servers too) whatever happens."""
    state = klass.base / "hub"
    state.mkdir(mode=0o700)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "COURSE_INSTRUCTORS": klass.instructor.name, "COURSE_STUDENTS": ",".join(s.name for s in klass.students),
           "COURSE_ROOT": str(klass.course), "COURSE_SHARE": str(klass.share), "COURSE_EXCHANGE": str(klass.exchange),
           "COURSE_HUB_URL": f"http://127.0.0.1:{PORT}", "COURSE_HUB_PORT": str(HUB_PORT),
           "COURSE_PROXY_API_PORT": str(PROXY_API_PORT), "COURSE_SPAWN_PORTS": SPAWN_PORTS, "COURSE_HUB_STATE": str(state)}
    log = open(state / "hub.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "jupyterhub"), "-f", str(ROOT / "tools" / "jupyter" / "jupyterhub_config.py")],
                            cwd=state, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def tail() -> str:
        log.flush()
        return (state / "hub.log").read_text()[-5000:]

    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{HUB}/hub/api", timeout=5) as r:
                    assert "version" in json.loads(r.read())
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"JupyterHub did not start:\n{tail()}")
                time.sleep(1)
        step("hub up")
        yield tail
    finally:
        proc.send_signal(signal.SIGINT)  # the hub stops its users' servers and its proxy (cleanup_servers)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the proxy, if the hub left it
        except ProcessLookupError:
            pass
        log.close()


SAVE = """async ([url, nb]) => {
  const m = document.cookie.match(/(?:^|; )_xsrf=([^;]+)/);
  const r = await fetch(url, {method: 'PUT', credentials: 'same-origin',
    headers: {'Content-Type': 'application/json', 'X-XSRFToken': m ? decodeURIComponent(m[1]) : ''},
    body: JSON.stringify({type: 'notebook', format: 'json', content: nb})});
  return [r.status, await r.text()];
}"""


def log_in(browser, who: Account):
    """A browser of ``who``'s own, logged in through the hub's login form (their server starts spawning)."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(180_000)
    pg.goto(f"{HUB}/hub/login")
    pg.fill("#username_input", who.name)
    pg.fill("#password_input", who.password)
    shot(pg, f"hub-{who.role}-login")
    pg.click("#login_submit")
    return pg


def item(pg, which: str):
    return pg.locator(f"#{which}_assignments_list .list_item", has_text=SECTION)


def student_submits(pg, who: Account, answer: dict, hub_log) -> None:
    """In ``who``'s JupyterLab: Nbgrader > Assignment List, Fetch, save ``answer`` into the fetched copy, Submit."""
    try:
        pg.wait_for_url(re.compile(rf"/user/{who.name}/lab"), timeout=300_000)
        pg.locator("#jp-main-dock-panel").wait_for(timeout=180_000)
    except playwright_api.Error:
        shot(pg, f"hub-{who.role}-spawn-failed")
        raise AssertionError(f"{who.role}'s JupyterLab did not open through the hub (at {pg.url}):\n{hub_log()}") from None
    step(f"{who.role}: JupyterLab open")
    pg.locator(".lm-MenuBar-itemLabel", has_text="Nbgrader").click()
    pg.locator(".lm-Menu-itemLabel", has_text="Assignment List").click()
    lists = wait_assignment_list(pg, SECTION)
    shot(pg, f"hub-{who.role}-assignment-list")
    assert not list_errors(pg), list_errors(pg)
    assert SECTION in lists["released"], f"{SECTION} is not offered for fetching: {lists}"

    item(pg, "released").locator("button", has_text="Fetch").click()
    pg.wait_for_function("(s) => document.querySelector('#fetched_assignments_list').innerText.includes(s)", arg=SECTION)
    shot(pg, f"hub-{who.role}-fetched")
    fetched = who.home / SECTION / f"{SECTION}.ipynb"
    assert fetched.exists() and fetched.stat().st_uid == pwd.getpwnam(who.name).pw_uid, f"no fetched copy owned by {who.name}"

    url = f"{HUB}/user/{who.name}/api/contents/{SECTION}/{SECTION}.ipynb"
    status, body = pg.evaluate(SAVE, [url, answer])
    assert status == 200, f"saving the answer through the contents API: {status} {body[:300]}"
    item(pg, "fetched").locator("button", has_text="Submit").first.click()
    wait_submitted(pg)
    shot(pg, f"hub-{who.role}-submitted")


def student_fetches_feedback(pg, who: Account) -> Path:
    """Assignment List > Fetch Feedback in ``who``'s JupyterLab; the fetched page, opened from their server."""
    item(pg, "submitted").locator("button", has_text="Fetch Feedback").click()
    pg.wait_for_function("() => document.querySelector('#submitted_assignments_list').innerText.includes('view feedback')")
    shot(pg, f"hub-{who.role}-feedback-fetched")
    pages = sorted((who.home / SECTION / "feedback").glob(f"*/{SECTION}.html"))
    assert len(pages) == 1, f"{who.role} fetched {len(pages)} feedback pages: {pages}"
    view = pg.context.new_page()
    view.goto(f"{HUB}/user/{who.name}/files/{pages[0].relative_to(who.home).as_posix()}")
    view.locator("h4", has_text="Score").first.wait_for()
    shot(view, f"hub-{who.role}-feedback")
    view.close()
    return pages[0]


def test_a_class_on_jupyterhub(klass, release, hub, browser):
    # both students log in at once (their servers spawn side by side) while the instructor's release finishes
    pages = {who.name: log_in(browser, who) for who in klass.students}
    try:
        _class_flow(klass, pages, release, hub)
    finally:
        for pg in pages.values():
            pg.context.close()


def _class_flow(cls: Class, pages: dict, release, hub) -> None:
    import course

    inst, (stu_a, stu_b) = cls.instructor, cls.students
    venv_make = [f"VENV={VENV}", f"STAMP={VENV / '.shared-by-tests'}"]
    step("make release")
    out = release()
    course_ex = cls.exchange / COURSE_ID
    assert (course_ex / "outbound" / SECTION / f"{SECTION}.ipynb").exists(), out[-2000:]
    assert oct(course_ex.joinpath("inbound").stat().st_mode & 0o7777) == "0o2733"

    # each student fetches and submits through the Assignment List
    release_nb = load_nb(cls.course / "release" / SECTION / f"{SECTION}.ipynb")
    source_nb = load_nb(cls.course / "source" / SECTION / f"{SECTION}.ipynb")
    answers = {stu_a.name: load_nb(ROOT / "solutions" / SECTION / f"{SECTION}.ipynb"),
               stu_b.name: course.partial_notebook(json.loads(json.dumps(release_nb)), source_nb)}
    for who in (stu_a, stu_b):
        student_submits(pages[who.name], who, answers[who.name], hub)
        step(f"{who.role} submitted")
    inbound = sorted(p.name for p in (course_ex / "inbound").iterdir())
    assert [n.split("+")[0] for n in inbound] == sorted([stu_a.name, stu_b.name]), inbound

    # isolation, checked as the unix users
    step("isolation")
    env_a = student_env(cls, stu_a)
    b_sub = course_ex / "inbound" / next(n for n in inbound if n.startswith(stu_b.name + "+")) / f"{SECTION}.ipynb"
    a_sub = course_ex / "inbound" / next(n for n in inbound if n.startswith(stu_a.name + "+")) / f"{SECTION}.ipynb"
    _denied(as_user(stu_a, ["ls", str(course_ex / "inbound")], env_a), "student A listing the exchange's inbound/")
    _denied(as_user(stu_a, ["cat", str(b_sub)], env_a), "student A reading B's submission")
    _ok(as_user(stu_a, ["cat", str(a_sub)], env_a), "student A reading their own submission")
    for secret in (cls.course / "source" / SECTION / f"{SECTION}.ipynb", cls.course / "solutions" / SECTION / f"{SECTION}.ipynb"):
        _denied(as_user(stu_a, ["cat", str(secret)], env_a), f"student A reading {secret.relative_to(cls.course)}")
    where = _ok(as_user(stu_a, [str(VENV_BIN / "python"), "-c", "import course_lib; print(course_lib.__file__)"], env_a),
                "student A importing course_lib")
    assert where.strip() == str(cls.share / "course_lib" / "__init__.py"), where

    # the instructor collects, root grades in the course's sandbox, the instructor releases feedback
    step("collect")
    ienv = instructor_env(cls)
    nbg = str(VENV_BIN / "nbgrader")
    _ok(as_user(inst, [nbg, "collect", SECTION], ienv, cwd=cls.course), "nbgrader collect (as the instructor)")
    for who in (stu_a, stu_b):
        assert (cls.course / "submitted" / who.name / SECTION / f"{SECTION}.ipynb").exists(), f"{who.role} not collected"
    step("autograde")
    grade = _run(["make", "-C", str(cls.course), "autograde", f"SECTION={SECTION}", *venv_make], timeout=900,
                 env={**os.environ, "COURSE_SANDBOX": "require"})
    _ok(grade, "make autograde (root, COURSE_SANDBOX=require)")
    _ok(as_user(inst, [nbg, "generate_feedback", SECTION, "--force"], ienv, cwd=cls.course), "nbgrader generate_feedback")
    _ok(as_user(inst, [nbg, "release_feedback", SECTION], ienv, cwd=cls.course), "nbgrader release_feedback")

    step("gradebook")
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{cls.course / 'gradebook.db'}") as gb:
        score = {who.name: (gb.find_submission(SECTION, who.name).score, gb.find_submission(SECTION, who.name).max_score)
                 for who in (stu_a, stu_b)}
    full = float(sum(c["metadata"]["nbgrader"]["points"] for c in graded_cells(source_nb)))  # 17.5 for 01_foundations
    assert score[stu_a.name] == (full, full), f"the worked solution scored {score[stu_a.name]} of {full}\n{grade.stdout[-3000:]}"
    assert 0 < score[stu_b.name][0] < full, f"the half-answered notebook scored {score[stu_b.name]}"

    # each student fetches their own feedback, and only theirs
    step("feedback")
    _denied(as_user(stu_a, ["ls", str(course_ex / "feedback")], env_a), "student A listing the exchange's feedback/")
    theirs = {who.name: file_digest(cls.course / "feedback" / who.name / SECTION / f"{SECTION}.html") for who in (stu_a, stu_b)}
    assert theirs[stu_a.name] != theirs[stu_b.name]
    for who in (stu_a, stu_b):
        page = student_fetches_feedback(pages[who.name], who)
        mine = cls.course / "feedback" / who.name / SECTION / f"{SECTION}.html"
        assert file_digest(page) == file_digest(mine), f"{who.role} fetched a feedback page that is not theirs"
        got = float(re.search(rf"{SECTION} \(Score: ([\d.]+) / ", page.read_text()).group(1))
        assert got == score[who.name][0], f"{who.role}'s feedback page says {got}, the gradebook {score[who.name][0]}"

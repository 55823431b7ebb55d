"""The grading sandbox: bubblewrap, the kernel's cgroup and limits, and attacks on both.

- unit tests (fast): sandbox and cgroup status and fallbacks, the kernel's environment and bubblewrap command
  line, each kernel's cgroup (limits, the launcher, memory incl. children and tmpfs, tasks, cleanup, sweeping);
- one real sandboxed kernel (nbclient + SandboxKernelManager);
- the attack notebooks of tests/grading_corpus.py, graded with everything else by the batch: none reads
  a judge, the gradebook or another submission, reaches a network, writes outside its sandbox, fills more
  than its size-limited tmpfs, or changes a grade.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grading_corpus as gc
import nbformat
import pytest
from conftest import ROOT

from course_judge import sandbox

BWRAP_OK, BWRAP_HOW = sandbox._probe()
needs_bwrap = pytest.mark.skipif(not BWRAP_OK, reason=f"no sandbox here: {BWRAP_HOW}")
CG_OK, CG_HOW = sandbox._cgroup_probe()
needs_cgroup = pytest.mark.skipif(not CG_OK, reason=f"no cgroup here: {CG_HOW}")


# ------------------------------------------------------------------ sandbox configuration (fast)


def test_sandbox_status_modes(monkeypatch):
    monkeypatch.setenv("COURSE_SANDBOX", "off")
    ok, how = sandbox.sandbox_status()
    assert not ok and "student code runs with the grader's permissions" in how
    monkeypatch.setenv("COURSE_SANDBOX", "bogus")
    with pytest.raises(ValueError):
        sandbox.mode()
    monkeypatch.setattr(sandbox, "_probe", lambda: (False, "bubblewrap (bwrap) is not installed"))
    monkeypatch.setenv("COURSE_SANDBOX", "auto")
    ok, how = sandbox.sandbox_status()
    assert not ok and how.startswith("UNSANDBOXED")
    monkeypatch.setenv("COURSE_SANDBOX", "require")
    with pytest.raises(RuntimeError, match="unavailable"):
        sandbox.sandbox_status()


def test_kernel_environment_keeps_no_grader_secrets():
    env = {"PATH": "/usr/bin", "HOME": "/root", "AWS_SECRET_ACCESS_KEY": "x", "GITHUB_TOKEN": "y", "COURSE_ROOT": "/course",
           "COURSE_DIAG_FILE": "/course/d", "COURSE_GRADER_LOCK": "/l", "COURSE_BENCH_LOCK": "/b", "COURSE_TIMING_FILE": "/t",
           "NBGRADER_EXECUTION": "autograde", "PYTHONPATH": "/repo", "COURSE_DB_URL": "postgresql+psycopg2://g:pw@db/gb",
           "PGPASSWORD": "pw", "PGPASSFILE": "/root/.pgpass"}
    out = sandbox.clean_env(env)
    for k in ("AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "COURSE_ROOT", "COURSE_DIAG_FILE", "COURSE_GRADER_LOCK", "COURSE_BENCH_LOCK",
              "COURSE_DB_URL", "PGPASSWORD", "PGPASSFILE"):
        assert k not in out, k
    assert "COURSE_TIMING_FILE" not in out, "the kernel writes no timing file: the grader keeps its own clock"
    assert out["HOME"] == "/tmp/home" and out["NBGRADER_EXECUTION"] == "autograde"


def test_bwrap_command_line_isolates(tmp_path):
    work, copy, rt = tmp_path / "course" / "autograded" / "s" / "A", tmp_path / "copy", Path("/dev/shm/course-kernel-1-x")
    lim = sandbox.Limits(tmp_mb=100, work_mb=50)
    argv = sandbox.bwrap_argv([sys.executable, "-m", "ipykernel_launcher", "-f", str(rt / "k.json")], workdir=work,
                              work_copy=copy, runtime=rt, env=sandbox.clean_env(dict(os.environ)), lib_view=tmp_path / "lib",
                              limits=lim)
    for flag in ("--unshare-net", "--unshare-pid", "--die-with-parent", "--clearenv", "--cap-drop"):
        assert flag in argv
    binds = [(argv[i], argv[i + 1], argv[i + 2]) for i in range(len(argv) - 2) if argv[i] in ("--bind", "--ro-bind", "--dev-bind")]
    writable = [src for kind, src, _ in binds if kind == "--bind"]
    assert writable == [str(rt)], f"the only writable host folder is the kernel's own IPC folder (memory): {writable}"
    assert ("--ro-bind", str(copy), sandbox.SUBMISSION_MOUNT) in binds, "the working copy is read-only, copied into a tmpfs"
    tmpfs = {argv[i + 3]: int(argv[i + 1]) for i in range(len(argv) - 3) if argv[i] == "--size" and argv[i + 2] == "--tmpfs"}
    assert tmpfs == {"/tmp": 100 << 20, "/dev/shm": 100 << 20, str(work): 50 << 20}, tmpfs
    assert argv.count("--tmpfs") == 3, "every tmpfs has a size"
    ro = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "--remount-ro"]
    assert ro == ["/", "/dev"] and argv.index("--remount-ro") > argv.index(str(work)), "the rest of the sandbox is read-only"
    for _, src, _ in binds:
        assert not src.startswith(str(ROOT / "source")) and "gradebook" not in src and src not in ("/", "/root", "/home", str(ROOT))
        assert not src.startswith(str(ROOT / "course_judge")), "the judge never enters the sandbox"
    inner = argv[argv.index("--") + 1:]
    assert inner[:2] == [sys.executable, "-I"] and sandbox.SUBMISSION_MOUNT in inner[:12], "copy-in and limits run inside"


def test_launcher_joins_the_cgroup_before_the_sandbox_starts():
    cg = sandbox.Cgroup("v1", {"memory": Path("/cg/memory/k"), "pids": Path("/cg/pids/k")}, sandbox.Limits())
    cmd = sandbox.join_argv(cg, ["bwrap", "--", "python"])
    assert cmd[:3] == [sys.executable, "-I", "-S"] and cmd[-3:] == ["bwrap", "--", "python"]
    assert cmd[3] == "-c" and cmd[5:7] == ["/cg/memory/k/cgroup.procs", "/cg/pids/k/cgroup.procs"] and cmd[7] == "--"
    assert sandbox.join_argv(None, ["bwrap"]) == ["bwrap"]


def test_working_copy_leaves_notebooks_out(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "A.ipynb").write_text("{}")
    (tmp_path / "src" / "data.csv").write_text("1")
    sandbox.working_copy(tmp_path / "src", tmp_path / "dst")
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["data.csv"]


# ------------------------------------------------------------------ the kernel's cgroup (fast, real cgroups as root)


def test_limits_from_env(monkeypatch):
    for k, v in {"COURSE_KERNEL_MEMORY_MB": "3000", "COURSE_KERNEL_CPUS": "1.5", "COURSE_KERNEL_PIDS": "99",
                 "COURSE_KERNEL_TMP_MB": "100", "COURSE_KERNEL_WORK_MB": "50"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("COURSE_KERNEL_AS_MB", raising=False)
    lim = sandbox.Limits.from_env()
    assert (lim.memory_mb, lim.as_mb, lim.cpus, lim.pids, lim.tmp_mb, lim.work_mb) == (3000, 3000, 1.5, 99, 100, 50)
    monkeypatch.setenv("COURSE_KERNEL_AS_MB", "9000")
    monkeypatch.delenv("COURSE_KERNEL_CPUS")
    monkeypatch.setenv("COURSE_GRADE_WORKERS", "1")
    lim = sandbox.Limits.from_env()
    assert lim.as_mb == 9000 and lim.cpus == max(1, os.cpu_count() or 1)


def test_confinement_status_modes(monkeypatch):
    monkeypatch.setenv("COURSE_CGROUP", "off")
    ok, how = sandbox.confinement_status()
    assert not ok and how.startswith("UNCONFINED")
    assert sandbox.create_cgroup()[0] is None
    monkeypatch.setenv("COURSE_CGROUP", "bogus")
    with pytest.raises(ValueError):
        sandbox.cgroup_mode()
    monkeypatch.setattr(sandbox, "_cgroup_probe", lambda: (False, "no usable cgroup (v2: none; v1: none)"))
    monkeypatch.setenv("COURSE_CGROUP", "auto")
    ok, how = sandbox.confinement_status()
    assert not ok and how.startswith("UNCONFINED") and "no usable cgroup" in how
    monkeypatch.setenv("COURSE_CGROUP", "require")
    with pytest.raises(RuntimeError, match="no cgroup"):
        sandbox.confinement_status()


def test_no_cgroup_file_system_falls_back_with_a_reason(monkeypatch):
    monkeypatch.setattr(sandbox, "_mounts", lambda: (None, {}))
    cg, why = sandbox.create_cgroup(sandbox.Limits())
    assert cg is None and "v2: no cgroup2" in why and "v1: no cgroup v1 memory" in why


def _run_in(cg, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(sandbox.join_argv(cg, [sys.executable, "-c", code]), capture_output=True, text=True, timeout=timeout)


@needs_cgroup
def test_cgroup_applies_limits_and_is_removed():
    lim = sandbox.Limits(memory_mb=300, pids=40, cpus=0.5)
    cg, how = sandbox.create_cgroup(lim)
    assert cg is not None, how
    try:
        mem = cg.dirs["memory"]
        limit = (mem / ("memory.max" if cg.version == "v2" else "memory.limit_in_bytes")).read_text().split()[0]
        assert int(limit) == 300 << 20
        pids = (cg.dirs["pids"] / "pids.max").read_text().strip()
        assert pids == "40"
        cpu = cg.dirs["cpu"]
        quota = (cpu / "cpu.max").read_text().split()[0] if cg.version == "v2" else (cpu / "cpu.cfs_quota_us").read_text().strip()
        assert int(quota) == 50_000
        # the launcher joins before it execs: the command and everything it starts are inside
        proc = _run_in(cg, "import os,subprocess,sys; print(open('/proc/self/cgroup').read());"
                           "print(subprocess.run(['cat','/proc/self/cgroup'],capture_output=True,text=True).stdout)")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count(cg.folders[0].name) >= 2 * (1 if cg.version == "v2" else len(cg.folders)), proc.stdout
    finally:
        assert cg.remove()
    assert not any(d.exists() for d in cg.folders)


@needs_cgroup
def test_cgroup_memory_counts_children_and_tmpfs():
    """Each process under its own address-space limit, together over the group's: the biggest is killed, the peak stays."""
    cg, how = sandbox.create_cgroup(sandbox.Limits(memory_mb=256, pids=64))
    code = """
import os, time
kids = []
for i in range(3):
    pid = os.fork()
    if pid == 0:
        b = bytearray(120 << 20)
        for j in range(0, len(b), 4096):
            b[j] = 1
        time.sleep(3)
        os._exit(0)
    kids.append(pid)
print([os.waitpid(p, 0)[1] for p in kids])
"""
    try:
        proc = _run_in(cg, code)
        statuses = json.loads(proc.stdout.strip().splitlines()[-1])
        assert 9 in statuses, proc.stdout + proc.stderr  # SIGKILL by the group's OOM killer
        s = cg.stats()
        assert s["oom_kills"] >= 1 and s["peak_memory_mb"] <= 256.5, s
    finally:
        cg.remove()
    cg, how = sandbox.create_cgroup(sandbox.Limits(memory_mb=128, pids=64))
    shm = sandbox.runtime_base() / f"{sandbox.PREFIX}{os.getpid()}-tmpfs-test"
    try:  # tmpfs pages are charged to the group too: writing past the limit gets the writer killed
        proc = _run_in(cg, f"f = open({str(shm)!r}, 'wb')\nfor i in range(400):\n    f.write(b'x' * (1 << 20))\n")
        assert proc.returncode == -9, (proc.returncode, proc.stderr)
        assert cg.stats()["oom_kills"] >= 1
    finally:
        shm.unlink(missing_ok=True)
        cg.remove()


@needs_cgroup
def test_cgroup_bounds_processes_and_threads():
    cg, how = sandbox.create_cgroup(sandbox.Limits(pids=30))
    code = """
import os, threading, time
n = 0
try:
    for i in range(200):
        threading.Thread(target=time.sleep, args=(2,), daemon=True).start()
        n += 1
except RuntimeError:
    pass
print(n)
"""
    try:
        proc = _run_in(cg, code)
        assert int(proc.stdout.split()[-1]) < 30, proc.stdout + proc.stderr
        assert cg.stats()["pids_limit_hits"] >= 1
    finally:
        cg.remove()


@needs_cgroup
def test_remove_kills_leftovers_and_sweep_removes_groups_of_dead_graders(tmp_path):
    cg, how = sandbox.create_cgroup(sandbox.Limits())
    p = subprocess.Popen(sandbox.join_argv(cg, [sys.executable, "-c", "import os,time\nif os.fork()==0: time.sleep(600)\ntime.sleep(600)"]))
    try:
        import time

        deadline = time.time() + 20
        while len(cg.pids()) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert len(cg.pids()) == 2
        assert cg.remove(), "a group with processes left is killed, then removed"
        assert p.wait(timeout=10) == -9
    finally:
        p.kill()
    dead = next(n for n in range(4_000_000, 3_000_000, -1) if not Path(f"/proc/{n}").exists())
    stale, _ = sandbox.create_cgroup(sandbox.Limits(), name=f"{sandbox.PREFIX}{dead}-deadbeef")
    (tmp_path / f"{sandbox.PREFIX}{dead}-x").mkdir()
    alive, _ = sandbox.create_cgroup(sandbox.Limits(), name=f"{sandbox.PREFIX}{os.getpid()}-alive")
    try:
        assert sandbox.sweep_stale(str(tmp_path)) >= 2
        assert not any(d.exists() for d in stale.folders) and not (tmp_path / f"{sandbox.PREFIX}{dead}-x").exists()
        assert all(d.exists() for d in alive.folders), "a live grader's groups are left alone"
    finally:
        alive.remove()
        stale.remove()


# ------------------------------------------------------------------ one real sandboxed kernel


@needs_bwrap
@pytest.mark.xdist_group("sandbox")
def test_real_kernel_is_sandboxed(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("COURSE_KERNEL_TMP_MB", "32")
    monkeypatch.setenv("COURSE_KERNEL_WORK_MB", "16")
    monkeypatch.setenv("COURSE_DIAG_FILE", str(tmp_path / "diag.jsonl"))
    fill = ("import os\nn = 0\ntry:\n    with open({where!r} + '/fill.bin', 'wb') as f:\n        for n in range(1, 200):\n"
            "            f.write(b'x' * (1 << 20)); f.flush()\nexcept OSError as e:\n    print(f'{{type(e).__name__}} {{e.errno}}')\n"
            "print('filled', n)")

    course_dir = tmp_path / "course"
    work = course_dir / "autograded" / "s" / "A"
    work.mkdir(parents=True)
    (course_dir / "gradebook.db").write_text("secret grades")
    (work / "A.ipynb").write_text("hidden tests live here")
    (work / "data.txt").write_text("mine")
    listener = gc.Listener()  # on the grader's loopback: the kernel's loopback is another one
    cells = [
        "import os\nprint(sorted(os.listdir('.')))",
        f"print(open({str(course_dir / 'gradebook.db')!r}).read())",
        f"import socket\nsocket.create_connection(('127.0.0.1', {listener.port}), timeout=2)",
        "open('written.txt', 'w').write('x'); print('wrote')",
        "import torch\nx = torch.empty(64 * 2**30, dtype=torch.uint8)",
        "import time\nwhile True: time.sleep(0.1)",
        "print('still alive')",
        fill.format(where="/tmp"),
        fill.format(where="."),
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    client = NotebookClient(nb, timeout=20, kernel_manager_class=sandbox.SandboxKernelManager, allow_errors=True,
                            interrupt_on_timeout=True, resources={"metadata": {"path": str(work)}})
    client.execute()
    outs = ["\n".join("".join(o.get("text", "")) or f"{o.get('ename')}: {o.get('evalue')}" for o in c.outputs).strip()
            for c in nb.cells]
    assert outs[0] == "['data.txt']", "the kernel sees a copy of its folder without the notebook"
    assert "FileNotFoundError" in outs[1], outs[1]
    listener.close()
    assert "Error" in outs[2] and not listener.hits, f"the kernel reached the grader's loopback: {outs[2]}"
    assert outs[3] == "wrote" and not (work / "written.txt").exists(), "writes land in the throw-away copy"
    assert "allocate" in outs[4] or "MemoryError" in outs[4], outs[4]
    assert "KeyboardInterrupt" in outs[5] and "still alive" in outs[6]
    assert "OSError 28" in outs[7] and int(outs[7].split()[-1]) <= 32, f"/tmp is a 32 MB tmpfs: {outs[7]}"
    assert "OSError 28" in outs[8] and int(outs[8].split()[-1]) <= 16, f"the working folder is a 16 MB tmpfs: {outs[8]}"
    assert not list(tmp_path.rglob("fill.bin"))
    usage = [json.loads(ln) for ln in (tmp_path / "diag.jsonl").read_text().splitlines()]
    sb = [d for d in usage if d["kind"] == "sandbox"]
    if CG_OK:
        assert len(sb) == 1 and 50 < sb[0]["peak_memory_mb"] < 8192, usage  # the kernel's peak, recorded per kernel
    else:
        assert any(d["kind"] == "unconfined" for d in usage), usage
    assert not sandbox._stale_cgroup_dirs() or all(sandbox._pid_alive(d.name.split("-")[2]) for d in sandbox._stale_cgroup_dirs())
    assert not [d for d in sandbox._stale_cgroup_dirs() if d.name.split("-")[2] == str(os.getpid())], "the kernel's group is gone"


# ------------------------------------------------------------------ attacks, graded with the corpus


def _attack_output(corpus, student) -> str:
    nb = json.loads((corpus["root"] / "autograded" / student / gc.SECTION / f"{gc.SECTION}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if gc.gid(c) == "ex_01_1_sdpa")
    return "\n".join("".join(o.get("text", "")) for o in cell.get("outputs", []))


def _skip_unsandboxed(corpus):
    if not any(n.startswith("attack_") for n in corpus["cases"]):
        pytest.skip(f"attacks run only sandboxed: {BWRAP_HOW}")


@pytest.mark.pipeline
@pytest.mark.xdist_group("corpus")
def test_attack_cannot_read_the_judge_gradebook_or_other_submissions(graded_corpus):
    _skip_unsandboxed(graded_corpus)
    out = _attack_output(graded_corpus, "attack_read")
    assert "denied" in out, out[:2000]
    own = ("/proc/self", "/proc/thread-self")  # the kernel's own process: nothing of the grader's
    leaks = [ln for ln in out.splitlines()
             if ln.startswith(f"{gc.ATTACK} READ") and not ln.split()[2].startswith(own) and "/environ" not in ln.split()[2]]
    assert not leaks, leaks
    assert f"{gc.ATTACK} HIDDEN" not in out
    for sensitive in ("/source/", "/gradebook.db", "/submitted/good", "/autograded/good", "/solutions/", "01_foundations.ipynb",
                      "/course_judge/", "/course_lib/deepseek/moe.py"):
        assert any(ln.startswith("denied") and sensitive in ln for ln in out.splitlines()), f"{sensitive} was not even tried"


@pytest.mark.pipeline
@pytest.mark.xdist_group("corpus")
def test_attack_cannot_write_outside_its_sandbox(graded_corpus):
    _skip_unsandboxed(graded_corpus)
    token = graded_corpus["token"]
    out = _attack_output(graded_corpus, "attack_write")
    found = [str(p) for p in graded_corpus["root"].rglob(f"pwned-{token}.txt")]
    for base in (Path("/tmp"), Path.home(), Path("/work"), Path("/usr/lib"), Path("/dev/shm"), Path("/var/tmp"), Path("/run")):
        found += [str(p) for p in base.glob(f"pwned-{token}.txt")] + [str(p) for p in base.glob(f"*/pwned-{token}.txt")]
    found += [str(p) for p in graded_corpus["root"].rglob(f"fill-{token}*")]
    assert not found, f"files written from the sandbox reached the host: {found}\n{out[:2000]}"
    tmpfs = ("/tmp/", "/dev/shm/")  # inside the sandbox: its own size-limited tmpfs mounts (the course lives under /tmp)
    for ln in out.splitlines():
        if ln.startswith(f"{gc.ATTACK} WROTE"):
            path = ln.split(maxsplit=2)[2]
            assert not path.startswith("/") or path.startswith(tmpfs), f"written outside the sandbox's tmpfs: {ln}"
    for ro in ("/work/", "/run/", "/usr/lib/", "/var/tmp/"):  # the sandbox's root is read-only
        assert any(ln.startswith("denied") and ln.split()[1].startswith(ro) for ln in out.splitlines()), f"{ro}: {out[:3000]}"
    assert "denied" in out
    diag = graded_corpus["root"] / "autograded" / ".batch" / "diag" / f"attack_write__{gc.SECTION}.jsonl"
    assert "pwned" not in diag.read_text(), "the grader's diagnosis file is out of the kernel's reach"
    for ln in out.splitlines():
        if ln.startswith("own "):
            assert "/dev/shm/" in ln, f"the kernel's own writable places are memory: {ln}"
    filled = {ln.split()[1]: int(ln.split()[2]) for ln in out.splitlines() if ln.startswith("FILLED")}
    limits = {".": int(gc.CORPUS_ENV["COURSE_KERNEL_WORK_MB"]), "/tmp": int(gc.CORPUS_ENV["COURSE_KERNEL_TMP_MB"])}
    assert set(filled) == set(limits), out[-2000:]
    for where, mb in filled.items():
        assert mb <= limits[where], f"{where}: wrote {mb} MB into a {limits[where]} MB tmpfs"


@pytest.mark.pipeline
@pytest.mark.xdist_group("corpus")
def test_attack_has_no_network(graded_corpus):
    _skip_unsandboxed(graded_corpus)
    out = _attack_output(graded_corpus, "attack_network")
    assert f"{gc.ATTACK} CONNECTED" not in out and f"{gc.ATTACK} RESOLVED" not in out, out
    assert not graded_corpus["listener"].hits, f"a kernel reached the grader's loopback: {graded_corpus['listener'].hits}"


@pytest.mark.pipeline
@pytest.mark.xdist_group("corpus")
def test_attack_cannot_change_any_grade(graded_corpus):
    _skip_unsandboxed(graded_corpus)
    out = _attack_output(graded_corpus, "attack_grade")
    assert f"{gc.ATTACK} GRADEBOOK" not in out, out
    recs = graded_corpus["records"]
    for name in ("attack_grade", "attack_read", "attack_write", "attack_network", "fork_hog"):
        if name not in recs:
            continue
        assert recs[name]["score"] == 0, f"{name} earned {recs[name]['score']} points from the untouched release"
    assert recs["good"]["score"] == gc.FULL and all(v[0] <= v[1] for r in recs.values() for v in r["cells"].values())


# ------------------------------------------------------------------ no sandbox: still grades, says so loudly


@pytest.mark.pipeline
@pytest.mark.xdist_group("check")
def test_unsandboxed_grading_still_works_and_says_so(tmp_path):
    nb = tmp_path / f"{gc.SECTION}.ipynb"
    nb.write_bytes((ROOT / "solutions" / gc.SECTION / f"{gc.SECTION}.ipynb").read_bytes())
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "course.py"), "check", str(nb)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "COURSE_SANDBOX": "off"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "!!!" in proc.stdout and "sandbox switched off" in proc.stdout
    assert f"{gc.SECTION} / self: {gc.FULL:g} / {gc.FULL:g} points" in proc.stdout and "UNSANDBOXED" in proc.stdout, proc.stdout[-3000:]


def test_course_lib_view_is_built_once_per_version_and_shared(tmp_path, monkeypatch):
    """Kernels share one read-only view per section and version of what it depends on; a changed source
    notebook gets a view of its own; the cache must be this user's private folder."""
    import shutil

    monkeypatch.setenv("COURSE_VIEW_CACHE", str(tmp_path / "views"))
    a = gc.SECTION
    course = tmp_path / "course"
    shutil.copytree(ROOT / "source" / a, course / "source" / a)
    fresh = tmp_path / "fresh"
    sandbox.course_lib_view(a, fresh, course)
    view = sandbox.cached_course_lib_view(a, course)
    files = sorted(str(p.relative_to(view)) for p in view.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*") if p.is_file())
    assert all((view / f).read_bytes() == (fresh / f).read_bytes() for f in files)
    stamp = (view / files[0]).stat().st_mtime_ns
    assert sandbox.cached_course_lib_view(a, course) == view and (view / files[0]).stat().st_mtime_ns == stamp
    nb = course / "source" / a / f"{a}.ipynb"
    nb.write_text(nb.read_text().replace('"cells"', '"cells" ', 1))
    assert sandbox.cached_course_lib_view(a, course) != view
    (tmp_path / "views").chmod(0o755)
    with pytest.raises(RuntimeError, match="private"):
        sandbox.cached_course_lib_view(a, course)


def test_views_unused_for_a_week_are_pruned_when_a_new_one_is_built(tmp_path, monkeypatch):
    import os
    import shutil
    import time

    monkeypatch.setenv("COURSE_VIEW_CACHE", str(tmp_path / "views"))
    a = gc.SECTION
    course = tmp_path / "course"
    shutil.copytree(ROOT / "source" / a, course / "source" / a)
    old = sandbox.cached_course_lib_view(a, course).parent
    week = time.time() - sandbox.VIEW_UNUSED_S - 60
    os.utime(old, (week, week))
    assert sandbox.cached_course_lib_view(a, course).parent == old and old.stat().st_mtime > week  # a use keeps it
    os.utime(old, (week, week))
    abandoned = tmp_path / "views" / ".build-x"
    abandoned.mkdir()
    os.utime(abandoned, (time.time() - 7200,) * 2)
    recent = tmp_path / "views" / ".build-y"
    recent.mkdir()
    nb = course / "source" / a / f"{a}.ipynb"
    nb.write_text(nb.read_text().replace('"cells"', '"cells" ', 1))
    new = sandbox.cached_course_lib_view(a, course).parent
    assert new != old and new.is_dir() and not old.exists() and not abandoned.exists() and recent.exists()

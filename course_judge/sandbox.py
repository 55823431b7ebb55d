"""Sandboxed grading kernels: bubblewrap, a cgroup per kernel, resource limits, a private working copy, no network.

nbgrader runs a submission's code in a Jupyter kernel with the grader's own permissions. During
autograde and ``make check`` the course swaps in :class:`SandboxKernelManager` (see
``nbgrader_config.py``), which starts every kernel as

    python <join the kernel's cgroup> -- bwrap --unshare-net --unshare-pid --unshare-ipc --unshare-uts
          --die-with-parent --cap-drop ALL
          --ro-bind <python, venv, /usr, a few /etc files>   (read-only)
          --ro-bind <the section's view of course_lib> <course_lib>
          --size <tmp> --tmpfs /tmp   --size <tmp> --tmpfs /dev/shm
          --ro-bind <copy of the working folder> /run/course-submission
          --size <work> --tmpfs <working folder>   --bind <private IPC folder> <same>   --remount-ro / --remount-ro /dev
          -- python <copy the submission in, set rlimits> -- python -P -m ipykernel_launcher -f <connection file>

so student code sees neither ``source/``, ``solutions/``, the gradebook, other submissions, feedback,
the judge (``course_judge/``) nor the submitted notebook; it cannot reach any network (the kernel
talks to the grader over IPC sockets in a private folder), and everything it writes lands in memory
that dies with it: size-limited tmpfs mounts for ``/tmp``, ``/dev/shm`` and its working folder, and the
private IPC folder (on the host's ``/dev/shm``); the sandbox's own root and ``/dev`` are remounted read-only.
Nothing on the host's disk is writable from inside.

Resources: each kernel runs in its own cgroup, created here (the grader runs as root): cgroup v2
where its memory, pids and cpu controllers can be enabled, else cgroup v1 (one group per controller),
else none (said loudly: :func:`confinement_status`, a ``unconfined`` diagnosis). The group bounds the
memory of the kernel *and every process it starts, including the tmpfs pages they write* (no swap),
its CPU (a CFS quota) and its number of tasks (processes and threads; ``RLIMIT_NPROC`` means nothing
to uid 0). A launcher writes its own pid into the group before it execs bubblewrap, so nothing the
kernel starts escapes it. When the kernel stops, the group's peak memory, OOM kills and task-limit
hits are recorded (``sandbox`` diagnosis line), leftovers are killed and the group removed;
:func:`sweep_stale` removes the groups and folders of graders that were killed. Per process, rlimits
still apply inside: address space, CPU seconds, file size, open files.

The view of ``course_lib`` holds only what the section's own cells import (:func:`course_lib_view`):
the modules that answer the section's exercises are not there, so a kernel cannot import its answers.

Where bubblewrap is missing or cannot create namespaces, grading still works: the kernel runs with
the same cgroup, limits, private connection folder and working copy, but unsandboxed, and
:func:`sandbox_status` says so (``tools/course.py`` prints it loudly and records it in the summary).

Environment knobs (all optional; sizes in MB):

- ``COURSE_SANDBOX``: ``auto`` (default: bubblewrap when it works), ``require`` (refuse to grade
  without it), ``off`` (limits only).
- ``COURSE_CGROUP``: ``auto`` (default: v2, else v1, else none, loudly), ``require``, ``off``.
- ``COURSE_KERNEL_MEMORY_MB`` (8192): memory of the whole sandbox (cgroup: all its processes and
  tmpfs pages); ``COURSE_KERNEL_AS_MB`` (default: the same): address space of each process.
- ``COURSE_KERNEL_CPUS`` (default: the machine's CPUs / ``COURSE_GRADE_WORKERS``, at least 1): CPU quota.
- ``COURSE_KERNEL_PIDS`` (512): processes and threads of the sandbox.
- ``COURSE_KERNEL_TMP_MB`` (2048): size of its ``/tmp`` and of its ``/dev/shm``;
  ``COURSE_KERNEL_WORK_MB`` (1024): size of its working folder.
- ``COURSE_KERNEL_CPU_S`` (1800): CPU seconds per process; ``COURSE_KERNEL_FSIZE_MB`` (512): largest file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB_DIR = ROOT / "course_lib"
SUBMISSION_MOUNT = "/run/course-submission"  # the working copy, read-only, copied into the kernel's tmpfs at start
PREFIX = "course-kernel-"  # private folders and cgroups: course-kernel-<grader pid>-<random>

# Variables the kernel may see; everything else in the grader's environment stays outside.
_PASS_ENV = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONHASHSEED", "PYTHONPATH", "MPLBACKEND", "NBGRADER_EXECUTION",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TZ",
)
# Course variables the kernel may see. Not the grader's own (COURSE_ROOT, COURSE_DIAG_FILE, COURSE_GRADER_LOCK,
# COURSE_BENCH_LOCK: the grader holds the benchmark lock itself, see preprocessors.CourseExecute).
_PASS_COURSE = ("COURSE_LIGHT", "COURSE_DEVICE", "COURSE_HEADLESS")
_ETC = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "passwd", "group", "nsswitch.conf", "hosts",
    "host.conf", "fonts", "mime.types", "alternatives", "os-release",
)

# Run inside the sandbox (by the kernel's own python): copy the submission's files into the (tmpfs) working
# folder, set the limits, then exec the kernel. argv: as cpu fsize nofile copy_from|- -- cmd...
_LIMITS_CODE = (
    "import os,resource,shutil,sys\n"
    "m,c,f,n=(int(x) for x in sys.argv[1:5])\n"
    "if sys.argv[5]!='-':\n"
    "    try:\n"
    "        shutil.copytree(sys.argv[5],'.',symlinks=True,dirs_exist_ok=True)\n"
    "    except (OSError,shutil.Error) as e:\n"
    "        sys.stderr.write(f'grading kernel: the submission was not copied in whole: {str(e)[:300]}\\n')\n"
    "for k,v,extra in ((resource.RLIMIT_AS,m,0),(resource.RLIMIT_CPU,c,5),(resource.RLIMIT_FSIZE,f,0),"
    "(resource.RLIMIT_NOFILE,n,0),(resource.RLIMIT_CORE,0,0)):\n"
    "    try:\n"
    "        soft,hard=resource.getrlimit(k)\n"
    "        v2=v+extra if hard==resource.RLIM_INFINITY else min(v+extra,hard)\n"
    "        resource.setrlimit(k,(min(v,v2),v2))\n"
    "    except (ValueError,OSError) as e:\n"
    "        sys.stderr.write(f'grading kernel: limit {k} not applied: {e}\\n')\n"
    "os.execv(sys.argv[7],sys.argv[7:])\n"
)

# Run by the grader, before bubblewrap: put this process (and so everything it will start) in the kernel's cgroup.
# argv: procs-file... -- cmd...
_JOIN_CODE = (
    "import os,sys\n"
    "i=sys.argv.index('--')\n"
    "for p in sys.argv[1:i]:\n"
    "    try:\n"
    "        with open(p,'w') as fh:\n"
    "            fh.write(str(os.getpid()))\n"
    "    except OSError as e:\n"
    "        sys.stderr.write(f'grading kernel: could not join its cgroup ({p}): {e}\\n')\n"
    "        os._exit(70)\n"
    "os.execvp(sys.argv[i+1],sys.argv[i+1:])\n"
)


def _env_num(name: str, default: float) -> float:
    v = os.environ.get(name, "").strip()
    return float(v) if v else default


def _default_cpus() -> float:
    workers = max(1, int(_env_num("COURSE_GRADE_WORKERS", 2)))
    return max(1.0, float((os.cpu_count() or 1) // workers))


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 8192  # the whole sandbox (cgroup)
    as_mb: int = 8192  # each process's address space
    cpu_s: int = 1800
    fsize_mb: int = 512
    nofile: int = 1024
    cpus: float = 1.0
    pids: int = 512
    tmp_mb: int = 2048
    work_mb: int = 1024

    @classmethod
    def from_env(cls) -> Limits:
        mem = int(_env_num("COURSE_KERNEL_MEMORY_MB", cls.memory_mb))
        return cls(
            memory_mb=mem,
            as_mb=int(_env_num("COURSE_KERNEL_AS_MB", mem)),
            cpu_s=int(_env_num("COURSE_KERNEL_CPU_S", cls.cpu_s)),
            fsize_mb=int(_env_num("COURSE_KERNEL_FSIZE_MB", cls.fsize_mb)),
            cpus=_env_num("COURSE_KERNEL_CPUS", _default_cpus()),
            pids=int(_env_num("COURSE_KERNEL_PIDS", cls.pids)),
            tmp_mb=int(_env_num("COURSE_KERNEL_TMP_MB", cls.tmp_mb)),
            work_mb=int(_env_num("COURSE_KERNEL_WORK_MB", cls.work_mb)),
        )

    def argv(self, python: str, copy_from: str | None = None) -> list[str]:
        """Command prefix that (copies the submission in,) applies the limits, then execs the rest of the command line."""
        return [
            python, "-I", "-S", "-c", _LIMITS_CODE,
            str(self.as_mb << 20), str(self.cpu_s), str(self.fsize_mb << 20), str(self.nofile), copy_from or "-", "--",
        ]

    def describe(self) -> str:
        return (f"memory {self.memory_mb} MB incl. children and tmpfs, {self.cpus:g} CPU, {self.pids} tasks, "
                f"/tmp {self.tmp_mb} MB, working folder {self.work_mb} MB")


def mode() -> str:
    """``auto``, ``require`` or ``off`` (``COURSE_SANDBOX``)."""
    m = os.environ.get("COURSE_SANDBOX", "auto").strip().lower() or "auto"
    if m not in ("auto", "require", "off"):
        raise ValueError(f"COURSE_SANDBOX must be auto, require or off (got {m!r})")
    return m


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[bool, str]:
    exe = shutil.which("bwrap")
    if not exe:
        return False, "bubblewrap (bwrap) is not installed: `apt-get install bubblewrap` (make install tries)"
    argv = [exe, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--die-with-parent", "--cap-drop", "ALL",
            *_system_binds(), "--proc", "/proc", "--dev", "/dev", "--size", str(1 << 20), "--tmpfs", "/tmp",
            "--", "/bin/sh", "-c", "exit 0"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"bubblewrap failed to start: {e}"
    if proc.returncode != 0:
        return False, f"bubblewrap cannot create its namespaces here (it needs 0.7 or later for --size): {proc.stderr.strip()[:300]}"
    return True, f"bubblewrap {exe}"


def sandbox_status() -> tuple[bool, str]:
    """(sandboxed?, one line saying how) for the current ``COURSE_SANDBOX`` mode."""
    m = mode()
    if m == "off":
        return False, "sandbox switched off (COURSE_SANDBOX=off): student code runs with the grader's permissions"
    ok, how = _probe()
    if ok:
        return True, f"student code runs sandboxed ({how}; no network; CPU, memory and file-size limits)"
    if m == "require":
        raise RuntimeError(f"COURSE_SANDBOX=require but the sandbox is unavailable: {how}")
    return False, f"UNSANDBOXED: {how}; student code can read everything the grader can"


# ---------------------------------------------------------------- cgroups

CGROUP_CONTROLLERS = ("memory", "pids", "cpu")


def cgroup_mode() -> str:
    """``auto``, ``require`` or ``off`` (``COURSE_CGROUP``)."""
    m = os.environ.get("COURSE_CGROUP", "auto").strip().lower() or "auto"
    if m not in ("auto", "require", "off"):
        raise ValueError(f"COURSE_CGROUP must be auto, require or off (got {m!r})")
    return m


def _mounts() -> tuple[Path | None, dict[str, Path]]:
    """(the cgroup2 mount, {v1 controller: its mount}) from /proc/self/mountinfo."""
    v2, v1 = None, {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None, {}
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        point = Path(fields[4].replace("\\040", " "))
        if rest[0] == "cgroup2" and v2 is None:
            v2 = point
        elif rest[0] == "cgroup":
            for opt in rest[2].split(","):
                if opt in CGROUP_CONTROLLERS:
                    v1.setdefault(opt, point)
    return v2, v1


def _own_cgroups() -> dict[str, str]:
    """{controller (or "" for v2): this process's cgroup path}."""
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for c in (ctrls.split(",") if ctrls else [""]):
                out[c] = path
    except (OSError, ValueError):
        pass
    return out


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _kv(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _int(path: Path) -> int | None:
    t = _read(path).strip()
    return int(t) if t.lstrip("-").isdigit() else None


@dataclass
class Cgroup:
    """One kernel's cgroup: ``v2`` (one folder) or ``v1`` (one folder per controller)."""

    version: str
    dirs: dict[str, Path]  # controller -> folder (v2: the same folder for all)
    limits: Limits
    missing: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def folders(self) -> list[Path]:
        return sorted(set(self.dirs.values()))

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.folders]

    def describe(self) -> str:
        where = ", ".join(f"{c} {d}" for c, d in sorted(self.dirs.items())) if self.version == "v1" else str(self.folders[0])
        return f"cgroup {self.version} ({where})"

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self.folders:
            out |= {int(x) for x in _read(d / "cgroup.procs").split() if x.isdigit()}
        return out

    def stats(self) -> dict:
        """Peak memory, limit, OOM kills, task-limit hits, CPU seconds, throttling (what the controllers report)."""
        s: dict = {"cgroup": self.version, "memory_limit_mb": self.limits.memory_mb, "cpus": self.limits.cpus,
                   "pids_limit": self.limits.pids}
        mem, pids, cpu = self.dirs.get("memory"), self.dirs.get("pids"), self.dirs.get("cpu")
        if mem is not None:
            if self.version == "v2":
                peak = _int(mem / "memory.peak")
                ev = _kv(_read(mem / "memory.events"))
            else:
                peak = _int(mem / "memory.max_usage_in_bytes")
                ev = _kv(_read(mem / "memory.oom_control"))
                ev["max"] = _int(mem / "memory.failcnt") or 0
            s["peak_memory_mb"] = round(peak / 2**20, 1) if peak is not None else None
            s["oom_kills"] = ev.get("oom_kill", 0)
            s["memory_limit_hits"] = ev.get("max", 0)
        if pids is not None:
            s["pids_limit_hits"] = _kv(_read(pids / "pids.events")).get("max", 0)
            pk = _int(pids / "pids.peak")
            if pk is not None:
                s["pids_peak"] = pk
        if cpu is not None:
            st = _kv(_read(cpu / "cpu.stat"))
            if self.version == "v2":
                s["cpu_s"] = round(st.get("usage_usec", 0) / 1e6, 1)
                s["throttled_s"] = round(st.get("throttled_usec", 0) / 1e6, 1)
            else:
                s["throttled_s"] = round(st.get("throttled_time", 0) / 1e9, 1)
                acct = _cpuacct_usage(cpu)
                if acct is not None:
                    s["cpu_s"] = round(acct / 1e9, 1)
        return s

    def kill(self, timeout: float = 10.0) -> bool:
        """Kill every process left in the group; True once it is empty."""
        deadline = time.monotonic() + timeout
        for d in self.folders:
            if (d / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    _write(d / "cgroup.kill", "1")
        while True:
            left = self.pids()
            if not left:
                return True
            if time.monotonic() > deadline:
                return False
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def remove(self, timeout: float = 10.0) -> bool:
        """Kill what is left, then remove the group's folders (True when all are gone)."""
        self.kill(timeout)
        ok = True
        for d in self.folders:
            ok &= _rmdir(d, timeout=2.0)
        return ok


def _cpuacct_usage(cpu_dir: Path) -> int | None:
    """v1: the same group in the cpuacct hierarchy (cpu,cpuacct are often co-mounted), if any."""
    for cand in (cpu_dir / "cpuacct.usage", Path(str(cpu_dir).replace("/cpu/", "/cpuacct/", 1)) / "cpuacct.usage"):
        v = _int(cand)
        if v is not None:
            return v
    return None


def _rmdir(d: Path, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            d.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def _v2_parent() -> Path:
    v2, _ = _mounts()
    if v2 is None:
        raise OSError("no cgroup2 file system is mounted")
    avail = set(_read(v2 / "cgroup.controllers").split())
    missing = [c for c in CGROUP_CONTROLLERS if c not in avail]
    if missing:
        raise OSError(f"cgroup v2 at {v2} has no {', '.join(missing)} controller"
                      f"{'s' if len(missing) > 1 else ''} (cgroup.controllers: {' '.join(sorted(avail)) or 'empty'})")
    # Kernels go under <mount>/course-grader/ (the mount's root may hold processes; a leaf of its own may not
    # hold both processes and children with controllers, cgroup v2's "no internal processes" rule).
    parent = v2 / "course-grader"
    enabled = set(_read(v2 / "cgroup.subtree_control").split())
    if not set(CGROUP_CONTROLLERS) <= enabled:
        _write(v2 / "cgroup.subtree_control", " ".join(f"+{c}" for c in CGROUP_CONTROLLERS))
    parent.mkdir(exist_ok=True)
    if not set(CGROUP_CONTROLLERS) <= set(_read(parent / "cgroup.subtree_control").split()):
        _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in CGROUP_CONTROLLERS))
    return parent


def _v1_parents() -> dict[str, Path]:
    _, v1 = _mounts()
    own = _own_cgroups()
    out = {}
    for c, point in v1.items():
        base = point / own.get(c, "/").lstrip("/")
        out[c] = base if base.is_dir() else point
    return out


def _create_v2(limits: Limits, name: str) -> Cgroup:
    parent = _v2_parent()
    d = parent / name
    d.mkdir()
    cg = Cgroup("v2", {c: d for c in CGROUP_CONTROLLERS}, limits)
    try:
        _write(d / "memory.max", str(limits.memory_mb << 20))
        if (d / "memory.swap.max").exists():
            _write(d / "memory.swap.max", "0")
        if (d / "memory.oom.group").exists():
            _write(d / "memory.oom.group", "0")  # kill the biggest process, not the whole kernel
        _write(d / "pids.max", str(limits.pids))
        _write(d / "cpu.max", f"{max(1000, int(limits.cpus * 100_000))} 100000")
    except OSError:
        cg.remove()
        raise
    return cg


def _create_v1(limits: Limits, name: str) -> Cgroup:
    parents = _v1_parents()
    if "memory" not in parents:
        raise OSError("no cgroup v1 memory controller is mounted")
    dirs: dict[str, Path] = {}
    cg = Cgroup("v1", dirs, limits, missing=tuple(c for c in CGROUP_CONTROLLERS if c not in parents))
    try:
        for c, parent in parents.items():
            d = parent / name
            d.mkdir()
            dirs[c] = d
        mem = dirs["memory"]
        _write(mem / "memory.limit_in_bytes", str(limits.memory_mb << 20))
        if (mem / "memory.memsw.limit_in_bytes").exists():  # no swapping past the limit either
            with contextlib.suppress(OSError):
                _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory_mb << 20))
        with contextlib.suppress(OSError):
            _write(mem / "memory.swappiness", "0")
        if "pids" in dirs:
            _write(dirs["pids"] / "pids.max", str(limits.pids))
        if "cpu" in dirs:
            _write(dirs["cpu"] / "cpu.cfs_period_us", "100000")
            _write(dirs["cpu"] / "cpu.cfs_quota_us", str(max(1000, int(limits.cpus * 100_000))))
    except OSError:
        cg.remove()
        raise
    return cg


def create_cgroup(limits: Limits | None = None, name: str | None = None) -> tuple[Cgroup | None, str]:
    """A fresh cgroup with the limits applied: (group, how) or (None, why not). v2, else v1, else none."""
    limits = limits or Limits.from_env()
    m = cgroup_mode()
    if m == "off":
        return None, "cgroups switched off (COURSE_CGROUP=off)"
    name = name or f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    why = []
    for version, make in (("v2", _create_v2), ("v1", _create_v1)):
        try:
            cg = make(limits, name)
        except OSError as e:
            why.append(f"{version}: {e}")
            continue
        if cg.missing:
            cg.notes.append(f"no {', '.join(cg.missing)} controller: {'no CPU quota' if 'cpu' in cg.missing else ''}"
                            f"{' and ' if len(cg.missing) > 1 else ''}{'no task limit' if 'pids' in cg.missing else ''}")
        return cg, f"{cg.describe()}: {limits.describe()}" + (f" ({'; '.join(cg.notes)})" if cg.notes else "")
    return None, "no usable cgroup (" + "; ".join(why) + ")"


@functools.lru_cache(maxsize=1)
def _cgroup_probe() -> tuple[bool, str]:
    cg, how = create_cgroup(name=f"{PREFIX}{os.getpid()}-probe")
    if cg is None:
        return False, how
    cg.remove()
    return not cg.missing, how


def confinement_status() -> tuple[bool, str]:
    """(every kernel gets its own cgroup with all limits?, one line saying how) for ``COURSE_CGROUP``."""
    m = cgroup_mode()
    if m == "off":
        return False, "UNCONFINED: cgroups switched off (COURSE_CGROUP=off): a submission's processes share the machine's memory and CPU"
    ok, how = _cgroup_probe()
    if ok:
        return True, f"each kernel in its own {how}"
    if m == "require":
        raise RuntimeError(f"COURSE_CGROUP=require but no cgroup can be used: {how}")
    return False, (f"UNCONFINED: {how}; only per-process limits apply (a submission's children, threads and tmpfs "
                   "are not bounded together; run the grader as root on a machine with cgroup v2 or v1 controllers)")


def _stale_cgroup_dirs() -> list[Path]:
    out = []
    bases: list[Path] = []
    v2, _ = _mounts()
    if v2 is not None:
        bases.append(v2 / "course-grader")
    bases += list(_v1_parents().values())
    for base in bases:
        with contextlib.suppress(OSError):
            out += [d for d in base.glob(f"{PREFIX}*-*") if d.is_dir()]
    return out


def _pid_alive(pid: str) -> bool:
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


# ---------------------------------------------------------------- bubblewrap


def _system_binds() -> list[str]:
    out: list[str] = ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        p = Path(d)
        if p.is_symlink():
            out += ["--symlink", os.readlink(p), d]
        elif p.is_dir():
            out += ["--ro-bind", d, d]
    for name in _ETC:
        p = Path("/etc") / name
        if p.exists():
            out += ["--ro-bind", str(p), str(p)]
    return out


def _python_roots(python: str) -> list[Path]:
    """Folders the kernel's interpreter needs: its venv, the base installation, this process's prefixes."""
    roots: set[Path] = set()
    exe = Path(python)
    for p in (exe, exe.resolve()):
        if p.parent.name == "bin":
            roots.add(p.parent.parent)
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        roots.add(Path(p))
    cfg = exe.parent.parent / "pyvenv.cfg"
    if cfg.exists():
        for line in cfg.read_text().splitlines():
            if line.split("=")[0].strip() == "home":
                roots.add(Path(line.split("=", 1)[1].strip()).parent)
    # drop roots nested in other roots; never bind a whole home or system root
    roots = {r.resolve() for r in roots if r.exists()}
    keep = sorted(r for r in roots if not any(o != r and o in r.parents for o in roots))
    return [r for r in keep if len(r.parts) > 2 or str(r).startswith(("/opt", "/usr"))]


def clean_env(env: dict[str, str], home: str = "/tmp/home") -> dict[str, str]:
    """The kernel's environment: only the variables it needs (no credentials of the grader)."""
    out = {k: v for k, v in env.items() if k in _PASS_ENV or k in _PASS_COURSE}
    out.update({
        "HOME": home, "TMPDIR": "/tmp", "MPLCONFIGDIR": f"{home}/.config/matplotlib", "IPYTHONDIR": f"{home}/.ipython",
        "JUPYTER_RUNTIME_DIR": f"{home}/.jupyter-runtime", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONSAFEPATH": "1",
    })
    out.setdefault("PATH", "/usr/bin:/bin")
    return out


def bwrap_argv(cmd: list[str], *, workdir: Path, work_copy: Path, runtime: Path, env: dict[str, str],
               lib_view: Path, limits: Limits | None = None) -> list[str]:
    """The full ``bwrap ... -- <copy in, limits> -- cmd`` command line.

    Writable inside: size-limited tmpfs mounts (``/tmp``, ``/dev/shm``, the working folder, which starts as a
    copy of ``work_copy``) and ``runtime`` (the IPC sockets, on the host's /dev/shm); all of it is memory,
    charged to the kernel's cgroup, and gone with the kernel. The sandbox's root and ``/dev`` are read-only.
    Nothing of the host's disk.
    """
    limits = limits or Limits.from_env()
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--cap-drop", "ALL", "--hostname", "grader",
            *_system_binds(), "--proc", "/proc", "--dev", "/dev",
            "--size", str(limits.tmp_mb << 20), "--tmpfs", "/dev/shm",
            "--size", str(limits.tmp_mb << 20), "--tmpfs", "/tmp", "--dir", env["HOME"]]
    for dev in sorted(Path("/dev").glob("nvidia*")):  # CUDA, when the grading machine has it
        argv += ["--dev-bind", str(dev), str(dev)]
    for root in _python_roots(cmd[0]):
        argv += ["--ro-bind", str(root), str(root)]
    argv += ["--ro-bind", str(lib_view), str(LIB_DIR)]
    argv += ["--bind", str(runtime), str(runtime)]
    argv += ["--ro-bind", str(work_copy), SUBMISSION_MOUNT]
    argv += ["--size", str(limits.work_mb << 20), "--tmpfs", str(workdir)]
    # bubblewrap's own root (and /dev) are tmpfs mounts without a size: read-only once everything is mounted
    argv += ["--remount-ro", "/", "--remount-ro", "/dev", "--chdir", str(workdir), "--clearenv"]
    for k, v in sorted(env.items()):
        argv += ["--setenv", k, v]
    # ipykernel exits when its parent is pid 1 unless told the parent *is* pid 1 (it is, in the new pid namespace)
    argv += ["--setenv", "JPY_PARENT_PID", "1", "--", *limits.argv(cmd[0], SUBMISSION_MOUNT), *cmd]
    return argv


def join_argv(cg: Cgroup | None, cmd: list[str]) -> list[str]:
    """``cmd`` prefixed by the launcher that puts itself into ``cg`` before it execs ``cmd`` (``cmd`` when no group)."""
    if cg is None:
        return cmd
    return [sys.executable, "-I", "-S", "-c", _JOIN_CODE, *cg.procs_files(), "--", *cmd]


def working_copy(src: Path, dest: Path) -> None:
    """Copy the submission's working folder, minus notebooks (the one being graded is the judge's business) and links."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n.endswith(".ipynb") or os.path.islink(os.path.join(folder, n))}

    shutil.copytree(src, dest, ignore=ignore, dirs_exist_ok=True)


def _kernel_cmd_python(cmd: list[str]) -> list[str]:
    """Kernel command with ``-P`` (no working folder on sys.path: a submitted module can't shadow a package)."""
    if cmd and Path(cmd[0]).name.startswith("python") and "-P" not in cmd[1:3]:
        return [cmd[0], "-P", *cmd[1:]]
    return cmd


def runtime_base() -> Path:
    """Where the kernels' IPC folders go: the host's /dev/shm (memory: what a kernel writes there is charged to
    its cgroup), else the temporary folder (``COURSE_KERNEL_RUNTIME_DIR`` overrides)."""
    env = os.environ.get("COURSE_KERNEL_RUNTIME_DIR")
    if env:
        return Path(env)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


def sweep_stale(tmp: str | None = None) -> int:
    """Remove the private folders and cgroups of grading processes that were killed (their pid is gone)."""
    removed = 0
    bases = {Path(tmp or tempfile.gettempdir()), runtime_base()}
    for base in bases:
        for d in base.glob(f"{PREFIX}*-*"):
            if not _pid_alive(d.name.split("-")[2]):
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
    if cgroup_mode() != "off":
        for d in _stale_cgroup_dirs():
            if not _pid_alive(d.name.split("-")[2]):
                cg = Cgroup("v2" if d.parent.name == "course-grader" else "v1", {"memory": d}, Limits())
                cg.remove(timeout=5.0)
                removed += 1
    return removed


def course_lib_view(section: str | None, dest: Path, root: Path | None = None) -> list[str]:
    """Copy into ``dest`` the course_lib files ``section``'s kernel may import; returns the module names.

    Allowed: the import closure of the section's given, check and demo cells, minus every module that
    holds (or imports) one of its answers (``course_judge.kernel_excludes`` and the judges' REFERENCE).
    Without a known section, all of course_lib. Data files (recorded runs) always come along.
    """
    import course_judge
    from course_judge import static

    dest.mkdir(parents=True, exist_ok=True)
    src_nb = (root or ROOT) / "source" / str(section) / f"{section}.ipynb"
    if section and src_nb.exists():
        answers = set(course_judge.kernel_excludes(section))
        for mod in course_judge.judges(section).values():
            answers |= set(getattr(mod, "REFERENCE", ()))
        allowed = static.kernel_modules(json.loads(src_nb.read_text())) - static.forbidden_modules(answers)
    else:
        allowed = {static._module_name(f) for f in LIB_DIR.rglob("*.py")}
    for name in sorted(allowed):
        f = static.module_file(name)
        if f is None:
            continue
        out = dest / f.relative_to(LIB_DIR)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out)
        for pyc in (f.parent / "__pycache__").glob(f"{f.stem}.*.pyc"):
            (out.parent / "__pycache__").mkdir(exist_ok=True)
            shutil.copy2(pyc, out.parent / "__pycache__" / pyc.name)
    for data in LIB_DIR.rglob("*"):
        if data.is_file() and data.suffix not in (".py", ".pyc") and "__pycache__" not in data.parts:
            out = dest / data.relative_to(LIB_DIR)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(data, out)
    return sorted(allowed)


SETUP_TIMES = {"sandbox_setup_s": 0.0, "view_s": 0.0}  # this grading process's kernels' set-up, seconds


def _view_key(section: str | None, root: Path | None) -> str:
    """What a section's course_lib view depends on: the section's source notebook, course_lib, the judges."""
    h = hashlib.sha256(f"{section}\0".encode())
    src_nb = (root or ROOT) / "source" / str(section) / f"{section}.ipynb"
    files = [src_nb] if src_nb.exists() else []
    for base in (LIB_DIR, ROOT / "course_judge"):
        files += sorted(f for f in base.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    for f in files:
        h.update(str(f).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:24]


def cached_course_lib_view(section: str | None, root: Path | None = None) -> Path:
    """The section's course_lib view (:func:`course_lib_view`), built once per version of what it depends on and
    shared read-only by every kernel on this host (``COURSE_VIEW_CACHE``, default a private folder in the temporary
    folder). Built aside and renamed into place, so concurrent graders see all of it or none; a cache folder that is
    not this user's own private folder is never used."""
    base = Path(os.environ.get("COURSE_VIEW_CACHE") or Path(tempfile.gettempdir()) / f"course-views-{os.geteuid()}")
    base.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{base} is not this user's private folder: refusing to use it as the course_lib view cache")
    final = base / _view_key(section, root)
    if not (final / "course_lib").is_dir():
        prune_views(base, VIEW_UNUSED_S)
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
        course_lib_view(section, build / "course_lib", root)
        try:
            os.rename(build, final)
        except OSError:  # another grader made it first
            shutil.rmtree(build, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.utime(final)  # in use: see prune_views
    return final / "course_lib"


VIEW_UNUSED_S = 7 * 86400  # a cached view no kernel has started with for a week is removed


def prune_views(base: Path, unused_s: float) -> list[str]:
    """Remove the views in ``base`` not used for ``unused_s`` seconds (each use touches its folder), and builds
    abandoned for an hour; returns their names. Every change of the course makes a new view: without this the
    cache only grows."""
    now, gone = time.time(), []
    for d in base.iterdir():
        try:
            age = now - os.lstat(d).st_mtime
        except OSError:
            continue
        if d.is_dir() and not d.is_symlink() and age > (3600 if d.name.startswith(".build-") else unused_s):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    return gone


def _note(kind: str, detail: str, **extra) -> None:
    """One diagnosis line for the submission being graded (``$COURSE_DIAG_FILE``; no-op outside the batch)."""
    path = os.environ.get("COURSE_DIAG_FILE")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"kind": kind, "detail": detail, **extra}) + "\n")


def report_usage(cg: Cgroup) -> dict:
    """Record a finished kernel's resource use (``sandbox``) and what it ran into (``memory``, ``pids_limit``)."""
    s = cg.stats()
    _note("sandbox", f"sandbox peak memory {s.get('peak_memory_mb')} MB of {cg.limits.memory_mb} MB", **s)
    if s.get("oom_kills"):
        _note("memory", f"the sandbox reached its memory limit ({cg.limits.memory_mb} MB for the kernel, its child processes "
              f"and its /tmp, COURSE_KERNEL_MEMORY_MB): {s['oom_kills']} process(es) killed; peak {s.get('peak_memory_mb')} MB")
    if s.get("pids_limit_hits"):
        _note("pids_limit", f"the sandbox reached its limit of {cg.limits.pids} processes and threads (COURSE_KERNEL_PIDS): "
              f"{s['pids_limit_hits']} refused")
    return s


try:
    from jupyter_client.manager import AsyncKernelManager
except ImportError:  # pragma: no cover - jupyter_client is a dependency of nbgrader
    AsyncKernelManager = object  # type: ignore[misc,assignment]


class SandboxKernelManager(AsyncKernelManager):
    """A kernel manager that runs the kernel in bubblewrap (or, without it, with limits only), in its own cgroup.

    Every kernel gets a private folder (its working copy and course_lib view), a private IPC folder (mode 700,
    on /dev/shm) holding its connection file and sockets, and a cgroup; all are removed when the kernel shuts down.
    """

    def _private_dir(self) -> Path:
        if getattr(self, "_course_dir", None) is None:
            tag = f"{PREFIX}{os.getpid()}-"
            self._course_dir = Path(tempfile.mkdtemp(prefix=tag))
            (self._course_dir / "work").mkdir(mode=0o700)
            base = runtime_base()
            self._course_rt = Path(tempfile.mkdtemp(prefix=tag, dir=base)) if base != self._course_dir.parent else None
            if self._course_rt is None:
                self._course_rt = self._course_dir / "rt"
                self._course_rt.mkdir(mode=0o700)
        return self._course_dir

    async def _async_pre_start_kernel(self, **kw):  # type: ignore[override]
        t_pre = time.monotonic()
        private = self._private_dir()
        rt = self._course_rt
        self.transport = "ipc"
        self.connection_file = str(rt / "kernel.json")
        self.ip = str(rt / "ipc")
        workdir = Path(kw.get("cwd") or os.getcwd()).resolve()
        sandboxed, how = sandbox_status()
        self.log.info("grading kernel: %s", how)
        if self.kernel_spec is not None:
            self.kernel_spec.interrupt_mode = "message"  # interrupts travel over the control channel
        cmd, kw = await super()._async_pre_start_kernel(**kw)
        cmd = _kernel_cmd_python(cmd)
        env = clean_env(kw.get("env") or dict(os.environ))
        limits = Limits.from_env()
        work = private / "work"
        shutil.rmtree(work, ignore_errors=True)
        working_copy(workdir, work)
        t_view = time.monotonic()
        root = os.environ.get("COURSE_ROOT")
        view = cached_course_lib_view(os.environ.get("COURSE_SECTION"), Path(root) if root else None)
        SETUP_TIMES["view_s"] += time.monotonic() - t_view
        if sandboxed:
            cmd = bwrap_argv(cmd, workdir=workdir, work_copy=work, runtime=rt, env=env, lib_view=view, limits=limits)
            kw["env"] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        else:
            cmd = [*limits.argv(cmd[0]), *cmd]
            home = private / "home"
            home.mkdir(exist_ok=True)
            env = clean_env(kw.get("env") or dict(os.environ), home=str(home))
            env["PYTHONPATH"] = str(view.parent)  # the view, not the checkout (the judge lives there)
            kw["env"] = env
            kw["cwd"] = str(work)
        cg = getattr(self, "_course_cg", None)
        if cg is None:
            try:
                cg, why = create_cgroup(limits)
            except Exception as e:  # noqa: BLE001 - a confinement failure is reported, never fatal
                cg, why = None, f"cgroup setup failed: {type(e).__name__}: {e}"
            self._course_cg = cg
            if cg is None and cgroup_mode() == "require":
                raise RuntimeError(f"COURSE_CGROUP=require but the kernel's cgroup could not be made: {why}")
            if cg is None:
                self.log.warning("!!! grading kernel UNCONFINED: %s", why)
                _note("unconfined", f"the kernel ran without a cgroup ({why}): its memory, CPU and processes were not bounded "
                      "together")
            elif cg.missing:
                _note("unconfined", f"the kernel's {why}")
        SETUP_TIMES["sandbox_setup_s"] += time.monotonic() - t_pre  # the sandbox's set-up (the grader's timing record)
        return join_argv(cg, cmd), kw

    async def _async_cleanup_resources(self, restart: bool = False) -> None:  # type: ignore[override]
        await super()._async_cleanup_resources(restart=restart)
        if restart:
            return
        cg = getattr(self, "_course_cg", None)
        if cg is not None:
            self._course_cg = None
            try:
                cg.kill()
                report_usage(cg)
            finally:
                cg.remove()
        if getattr(self, "_course_dir", None) is not None:
            shutil.rmtree(self._course_dir, ignore_errors=True)
            if self._course_rt is not None:
                shutil.rmtree(self._course_rt, ignore_errors=True)
            self._course_dir = self._course_rt = None

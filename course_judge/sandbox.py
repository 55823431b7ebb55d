"""Sandboxed grading kernels: bubblewrap, resource limits, a private working copy, no network.

nbgrader runs a submission's code in a Jupyter kernel with the grader's own permissions. During
autograde and ``make check`` the course swaps in :class:`SandboxKernelManager` (see
``nbgrader_config.py``), which starts every kernel as

    bwrap --unshare-net --unshare-pid --unshare-ipc --unshare-uts --die-with-parent --cap-drop ALL
          --ro-bind <python, venv, /usr, a few /etc files>   (read-only)
          --ro-bind <the section's view of course_lib> <course_lib>
          --tmpfs /tmp --bind <private copy of the working folder> <working folder>
          -- python <set rlimits> -- python -P -m ipykernel_launcher -f <private connection file>

so student code sees neither ``source/``, ``solutions/``, the gradebook, other submissions, feedback,
the judge (``course_judge/``) nor the submitted notebook; it cannot reach any network (the kernel
talks to the grader over IPC sockets in a private folder), and it runs under memory (address space),
CPU-time, file-size and open-file limits. Whatever it writes goes to a throw-away copy.

The view of ``course_lib`` holds only what the section's own cells import (:func:`course_lib_view`):
the modules that answer the section's exercises are not there, so a kernel cannot import its answers.

Where bubblewrap is missing or cannot create namespaces, grading still works: the kernel runs with
the same limits, private connection folder and working copy, but unsandboxed, and
:func:`sandbox_status` says so (``tools/course.py`` prints it loudly and records it in the summary).

Environment knobs (all optional):

- ``COURSE_SANDBOX``: ``auto`` (default: bubblewrap when it works), ``require`` (refuse to grade
  without it), ``off`` (limits only).
- ``COURSE_KERNEL_MEMORY_MB`` (default 8192), ``COURSE_KERNEL_CPU_S`` (CPU seconds, default 1800),
  ``COURSE_KERNEL_FSIZE_MB`` (largest file the kernel may write, default 512).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB_DIR = ROOT / "course_lib"

# Variables the kernel may see; everything else in the grader's environment stays outside.
_PASS_ENV = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONHASHSEED", "PYTHONPATH", "MPLBACKEND", "NBGRADER_EXECUTION",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TZ",
)
# Course variables the kernel may see. Not the grader's own (COURSE_ROOT, COURSE_DIAG_FILE, COURSE_GRADER_LOCK,
# COURSE_BENCH_LOCK: the grader holds the benchmark lock itself, see grading.CourseExecute).
_PASS_COURSE = ("COURSE_LIGHT", "COURSE_DEVICE", "COURSE_HEADLESS")
_ETC = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "passwd", "group", "nsswitch.conf", "hosts",
    "host.conf", "fonts", "mime.types", "alternatives", "os-release",
)

# Run inside the sandbox (by the kernel's own python): set the limits, then exec the kernel.
_LIMITS_CODE = (
    "import os,resource,sys\n"
    "m,c,f,n=(int(x) for x in sys.argv[1:5])\n"
    "for k,v,extra in ((resource.RLIMIT_AS,m,0),(resource.RLIMIT_CPU,c,5),(resource.RLIMIT_FSIZE,f,0),"
    "(resource.RLIMIT_NOFILE,n,0),(resource.RLIMIT_CORE,0,0)):\n"
    "    try:\n"
    "        soft,hard=resource.getrlimit(k)\n"
    "        v2=v+extra if hard==resource.RLIM_INFINITY else min(v+extra,hard)\n"
    "        resource.setrlimit(k,(min(v,v2),v2))\n"
    "    except (ValueError,OSError) as e:\n"
    "        sys.stderr.write(f'grading kernel: limit {k} not applied: {e}\\n')\n"
    "os.execv(sys.argv[6],sys.argv[6:])\n"
)


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 8192
    cpu_s: int = 1800
    fsize_mb: int = 512
    nofile: int = 1024

    @classmethod
    def from_env(cls) -> Limits:
        env = os.environ
        return cls(
            memory_mb=int(env.get("COURSE_KERNEL_MEMORY_MB", cls.memory_mb)),
            cpu_s=int(env.get("COURSE_KERNEL_CPU_S", cls.cpu_s)),
            fsize_mb=int(env.get("COURSE_KERNEL_FSIZE_MB", cls.fsize_mb)),
        )

    def argv(self, python: str) -> list[str]:
        """Command prefix that applies the limits, then execs the rest of the command line."""
        return [
            python, "-I", "-S", "-c", _LIMITS_CODE,
            str(self.memory_mb << 20), str(self.cpu_s), str(self.fsize_mb << 20), str(self.nofile), "--",
        ]


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
            *_system_binds(), "--proc", "/proc", "--dev", "/dev", "--", "/bin/sh", "-c", "exit 0"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"bubblewrap failed to start: {e}"
    if proc.returncode != 0:
        return False, f"bubblewrap cannot create its namespaces here: {proc.stderr.strip()[:300]}"
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
    """The full ``bwrap ... -- <limits> -- cmd`` command line."""
    limits = limits or Limits.from_env()
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--cap-drop", "ALL", "--hostname", "grader",
            *_system_binds(), "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--dir", env["HOME"]]
    for dev in sorted(Path("/dev").glob("nvidia*")):  # CUDA, when the grading machine has it
        argv += ["--dev-bind", str(dev), str(dev)]
    for root in _python_roots(cmd[0]):
        argv += ["--ro-bind", str(root), str(root)]
    argv += ["--ro-bind", str(lib_view), str(LIB_DIR)]
    argv += ["--bind", str(runtime), str(runtime)]
    argv += ["--bind", str(work_copy), str(workdir), "--chdir", str(workdir), "--clearenv"]
    for k, v in sorted(env.items()):
        argv += ["--setenv", k, v]
    # ipykernel exits when its parent is pid 1 unless told the parent *is* pid 1 (it is, in the new pid namespace)
    argv += ["--setenv", "JPY_PARENT_PID", "1", "--", *limits.argv(cmd[0]), *cmd]
    return argv


def working_copy(src: Path, dest: Path) -> None:
    """Copy the submission's working folder, minus notebooks (the one being graded holds hidden tests)."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n.endswith(".ipynb") or os.path.islink(os.path.join(folder, n))}

    shutil.copytree(src, dest, ignore=ignore, dirs_exist_ok=True)


def _kernel_cmd_python(cmd: list[str]) -> list[str]:
    """Kernel command with ``-P`` (no working folder on sys.path: a submitted module can't shadow a package)."""
    if cmd and Path(cmd[0]).name.startswith("python") and "-P" not in cmd[1:3]:
        return [cmd[0], "-P", *cmd[1:]]
    return cmd


def sweep_stale(tmp: str | None = None) -> int:
    """Remove private kernel folders left by grading processes that were killed (their pid is gone)."""
    removed = 0
    for d in Path(tmp or tempfile.gettempdir()).glob("course-kernel-*-*"):
        pid = d.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed


def course_lib_view(section: str | None, dest: Path, root: Path | None = None) -> list[str]:
    """Copy into ``dest`` the course_lib files ``section``'s kernel may import; returns the module names.

    Allowed: the import closure of the section's given, check and demo cells, minus every module that
    holds (or imports) one of its answers (``course_judge.kernel_excludes`` and the judges' REFERENCE).
    Without a known section, all of course_lib. Data files (recorded runs) always come along.
    """
    import json

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


try:
    from jupyter_client.manager import AsyncKernelManager
except ImportError:  # pragma: no cover - jupyter_client is a dependency of nbgrader
    AsyncKernelManager = object  # type: ignore[misc,assignment]


class SandboxKernelManager(AsyncKernelManager):
    """A kernel manager that runs the kernel in bubblewrap (or, without it, with limits only).

    Every kernel gets a private folder (mode 700) holding its connection file and IPC sockets, and a
    private copy of its working folder; both are removed when the kernel shuts down.
    """

    def _private_dir(self) -> Path:
        if getattr(self, "_course_dir", None) is None:
            self._course_dir = Path(tempfile.mkdtemp(prefix=f"course-kernel-{os.getpid()}-"))
            (self._course_dir / "rt").mkdir(mode=0o700)
            (self._course_dir / "work").mkdir(mode=0o700)
        return self._course_dir

    async def _async_pre_start_kernel(self, **kw):  # type: ignore[override]
        private = self._private_dir()
        rt = private / "rt"
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
        view = private / "lib" / "course_lib"
        root = os.environ.get("COURSE_ROOT")
        course_lib_view(os.environ.get("COURSE_SECTION"), view, Path(root) if root else None)
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
        return cmd, kw

    async def _async_cleanup_resources(self, restart: bool = False) -> None:  # type: ignore[override]
        await super()._async_cleanup_resources(restart=restart)
        if not restart and getattr(self, "_course_dir", None) is not None:
            shutil.rmtree(self._course_dir, ignore_errors=True)
            self._course_dir = None

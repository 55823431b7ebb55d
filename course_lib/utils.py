"""Seeding, device choice, light/full problem sizes, and the environment report of every setup cell."""

from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a torch Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA when present (or ``COURSE_DEVICE``/``prefer`` says so), else CPU."""
    want = prefer or os.environ.get("COURSE_DEVICE")
    if want:
        return torch.device(want)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def grading_mode() -> str | None:
    """``"autograde"`` or ``"validate"`` inside nbgrader, else ``None`` (a learner's own session)."""
    return os.environ.get("NBGRADER_EXECUTION") or None


def is_grading() -> bool:
    return grading_mode() is not None


def sizes(light, full):
    """Choose a problem size: ``light`` while grading or when ``COURSE_LIGHT=1``, ``full`` otherwise.

    Graded runs must be quick and deterministic; learners exploring on their own get the bigger size.
    """
    if is_grading() or os.environ.get("COURSE_LIGHT") == "1":
        return light
    return full


def has_fp8_tensor_cores() -> bool:
    """True on CUDA devices with compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    if not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability()
    return (major, minor) >= (8, 9)


def check_course_lib() -> Path:
    """Fail loudly when ``course_lib`` is imported from somewhere other than the installed package.

    A folder named ``course_lib`` next to a notebook would otherwise shadow the real package (and its
    test helpers) during grading.
    """
    import course_lib

    here = Path(course_lib.__file__).resolve().parent
    if here != PACKAGE_DIR:
        raise ImportError(f"course_lib was imported from {here}, not the course's package at {PACKAGE_DIR}")
    expected = os.environ.get("COURSE_LIB_DIR")
    if expected and Path(expected).resolve() != here:
        raise ImportError(
            f"course_lib was imported from {here}, but grading expects {expected}: "
            "remove any folder named course_lib next to your notebook"
        )
    return here


@dataclass(frozen=True)
class EnvReport:
    python: str
    torch: str
    device: str
    threads: int
    grading: str | None
    fp8_dtypes: bool

    def __str__(self) -> str:
        mode = self.grading or "interactive (full sizes)"
        return (
            f"python {self.python} | torch {self.torch} | device {self.device} | "
            f"threads {self.threads} | float8 dtypes {'yes' if self.fp8_dtypes else 'no'} | mode {mode}"
        )


def env_report(threads: int | None = None) -> EnvReport:
    """Pin torch's intra-op threads and describe the environment.

    Default: 1 thread while graded (notebooks are graded side by side, and benchmark ratios must not
    depend on how busy the other core is), else all cores up to 4.
    """
    check_course_lib()
    if threads is None:
        threads = 1 if is_grading() else min(4, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    dev = pick_device()
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or "cpu"
    return EnvReport(
        python=platform.python_version(),
        torch=torch.__version__,
        device=f"{dev.type} ({name})",
        threads=torch.get_num_threads(),
        grading=grading_mode(),
        fp8_dtypes=hasattr(torch, "float8_e4m3fn"),
    )


def _record_timing(path: str) -> None:
    """While grading, write (setup time, end of the latest cell) to ``path`` after every cell."""
    import json
    import time

    try:
        from IPython import get_ipython
    except ImportError:
        return
    ip = get_ipython()
    if ip is None:
        return
    start = time.time()

    def write(_result=None) -> None:
        Path(path).write_text(json.dumps({"start": start, "end": time.time()}))

    ip.events.register("post_run_cell", write)


def _kernel_shell():
    """The running IPython kernel's shell (``ZMQInteractiveShell``), else None (scripts, plain IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    ip = get_ipython()
    return ip if ip is not None and type(ip).__name__ == "ZMQInteractiveShell" else None


def use_inline_figures(ip=None) -> bool:
    """Draw figures inline in a Jupyter kernel that inherited a headless backend (``MPLBACKEND=Agg``).

    ipykernel only picks its inline backend when ``MPLBACKEND`` is unset; with ``Agg`` (exported for headless
    tools and tests) ``plt.show()`` draws nothing. Kept as it is while grading (the grader's environment
    decides) and when another interactive backend (ipympl, a GUI) was chosen.
    """
    ip = ip if ip is not None else _kernel_shell()
    if ip is None or is_grading():
        return False
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        return False
    ip.run_line_magic("matplotlib", "inline")
    return True


def setup(seed: int = 0) -> EnvReport:
    """What every notebook's setup cell calls: seed, pin threads, set the plot style, report.

    In a Jupyter kernel it also draws figures inline (see :func:`use_inline_figures`) and installs the run
    model (:mod:`course_lib.runmodel`): cells that need an unfinished exercise show one line naming it
    instead of a traceback.
    """
    import warnings

    from course_lib import runmodel, viz

    seed_everything(seed)
    ip = _kernel_shell()
    if ip is not None:
        use_inline_figures(ip)
        runmodel.install(ip)
    viz.set_style()
    # A placeholder figure (an exercise still a stub) has no labelled lines: its legend() call is not an error.
    warnings.filterwarnings("ignore", message="No artists with labels found to put in legend")
    if os.environ.get("COURSE_TIMING_FILE"):
        _record_timing(os.environ["COURSE_TIMING_FILE"])
    return env_report()

"""The course's judge: hidden tests, answer keys and verdicts, outside the learner's kernel.

This package is the grader's alone. Grading kernels never see it (the sandbox binds only the parts of
``course_lib`` a section's given cells need), and nothing in it is sent to a kernel: a judge module
drives the learner's objects through :mod:`course_judge.session` and decides on what comes back.

Layout: one sub-package per section (``s01_foundations`` ...), one module per graded exercise (see
:mod:`course_judge.verdict` for what a module states). The section package's ``__init__`` names the
``course_lib`` modules its kernel may not import (its own answers).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType

SECTION_PACKAGES = {
    "01_foundations": "course_judge.s01_foundations",
    "02_mla": "course_judge.s02_mla",
    "03_moe": "course_judge.s03_moe",
    "04_fp8": "course_judge.s04_fp8",
    "05_integration": "course_judge.s05_integration",
    "06_production": "course_judge.s06_production",
}


def section_package(section: str) -> ModuleType | None:
    name = SECTION_PACKAGES.get(section)
    if name is None:
        return None
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


@cache
def judges(section: str) -> dict[str, ModuleType]:
    """``{grade_id: judge module}`` of one section (empty for a section without judge modules)."""
    pkg = section_package(section)
    if pkg is None:
        return {}
    out: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        gid = getattr(mod, "GRADE_ID", None)
        if gid is None:
            continue
        if gid in out:
            raise RuntimeError(f"two judge modules grade {gid}: {out[gid].__name__}, {mod.__name__}")
        out[gid] = mod
    return out


def find(section: str, grade_id: str) -> ModuleType | None:
    return judges(section).get(grade_id)


def kernel_excludes(section: str) -> tuple[str, ...]:
    """``course_lib`` modules the section's grading kernel may not import (they hold its answers)."""
    pkg = section_package(section)
    return tuple(getattr(pkg, "KERNEL_EXCLUDES", ())) if pkg else ()

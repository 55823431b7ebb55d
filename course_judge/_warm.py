"""Imported by the batch's fork server: every section's judge modules, so no grading process imports them again.

A judge module that fails to import is skipped here (its own section's grading reports the error); the fork server
must never die of it, or no submission of any section could be graded.
"""

from __future__ import annotations

import importlib
import pkgutil

from course_judge import SECTION_PACKAGES

for _pkg in SECTION_PACKAGES.values():
    try:
        _mod = importlib.import_module(_pkg)
        for _info in pkgutil.iter_modules(_mod.__path__):
            if not _info.name.startswith("_"):
                importlib.import_module(f"{_pkg}.{_info.name}")
    except Exception:  # noqa: BLE001, S112 - see above
        continue

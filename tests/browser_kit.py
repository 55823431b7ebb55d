"""What the browser tests share: Debian's Chromium under Playwright, screenshots, nbgrader's Assignment List.

Used by tests/test_browser.py (the `make lab` server) and tests/test_hub.py (a real JupyterHub).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / ".cache" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def playwright_or_skip():
    """The Playwright sync API, or skip the calling test module (no Playwright, no Debian Chromium)."""
    api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make install installs it as root)", allow_module_level=True)
    return api


def launch(p):
    """Headless Chromium (Playwright gives it a fresh --user-data-dir of its own)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    return p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


@contextlib.contextmanager
def chromium():
    """One headless Chromium (conftest.py's session fixture ``browser``: a second Playwright in one process fails)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        try:
            yield b
        finally:
            b.close()


def shot(pg, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    pg.screenshot(path=str(path))
    return path


LISTS_LOADED = """(name) => { const r = document.querySelector('#released_assignments_list');
  const f = document.querySelector('#fetched_assignments_list');
  const loading = [...document.querySelectorAll('[id$=_assignments_list_loading]')].some(e => e.offsetParent !== null);
  return r && f && !loading && (r.innerText + f.innerText).includes(name); }"""

LISTS = """() => Object.fromEntries(['released', 'fetched', 'submitted'].map(k => {
  const e = document.querySelector('#' + k + '_assignments_list'); return [k, e ? e.innerText : null]; }))"""

LIST_ERRORS = """() => [...document.querySelectorAll('[id$=_assignments_list_error]')]
                      .filter(e => e.offsetParent !== null).map(e => e.innerText)"""

SUBMITTED = ("() => { const s = document.querySelector('#submitted_assignments_list');"
             " return s && /\\d{4}-\\d{2}-\\d{2}/.test(s.innerText); }")


def wait_assignment_list(pg, name: str, timeout_ms: int = 120_000) -> dict:
    """Wait until nbgrader's Assignment List has loaded and lists ``name``; its three lists' text."""
    pg.wait_for_function(LISTS_LOADED, arg=name, timeout=timeout_ms)
    return pg.evaluate(LISTS)


def list_errors(pg) -> list[str]:
    return pg.evaluate(LIST_ERRORS)


def wait_submitted(pg, timeout_ms: int = 120_000) -> None:
    """Wait until the Assignment List's "Submitted assignments" shows a submission time."""
    pg.wait_for_function(SUBMITTED, timeout=timeout_ms)

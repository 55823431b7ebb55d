"""The learner's JupyterLab in a real browser: headless Debian Chromium, driven by Playwright, against the
server `make lab` starts (its own recipe, in a fresh copy of this checkout, so Run All and autosave never
touch the committed notebooks).

Per section present in release/: the executed solution shows all its figures and opens unmodified; its
interactive explorer shows live controls whose change redraws the figure; the untouched release, run cell by
cell past its errors, shows errors only in exercise and graded cells and placeholders elsewhere; Validate opens
its dialog and lists the failing cells. Once: the Assignment List shows the sections and no error, Submit works,
the Formgrader loads, README.md opens, a feedback page renders its math offline (served and file://).

Screenshots of every check: .cache/screenshots/ (git-ignored). Run: `make test-browser` (part of `make test`).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from browser_kit import (
    list_errors,
    playwright_or_skip,
    shot,
    wait_assignment_list,
    wait_submitted,
)
from conftest import ROOT, _fresh_copy

pytestmark = pytest.mark.browser

TEST_MARKER = "# Checks you can run now."

playwright_or_skip()


def sections() -> list[str]:
    return sorted(p.name for p in (ROOT / "release").iterdir() if (p / f"{p.name}.ipynb").exists())


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _src(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def figure_cells(nb: dict) -> int:
    """Code cells that draw a figure (plt.show, a course_lib.viz figure, an interactive explorer)."""
    keys = ("plt.show(", "viz.interactive(", "viz.create_expert_dashboard(", "viz.visualize_attention_patterns(",
            "viz.training_progress_monitor(", ".finish()")
    return sum(1 for c in nb["cells"] if c["cell_type"] == "code" and any(k in _src(c) for k in keys))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """`make lab` in a fresh copy of this checkout; yields (base_url, token, course folder)."""
    course = tmp_path_factory.mktemp("lab") / "course"
    course.mkdir()
    _fresh_copy(course)
    stamp = ROOT / ".venv" / ".shared-by-tests"
    stamp.touch()
    port, token = _free_port(), secrets.token_hex(16)
    state = tmp_path_factory.mktemp("jupyter-state")
    env = {**os.environ, "COURSE_LIGHT": "1", "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces"), "JUPYTER_DATA_DIR": str(state / "data")}
    env.pop("MPLBACKEND", None)
    log = open(state / "lab.log", "w")
    proc = subprocess.Popen(
        ["make", "-C", str(course), "lab", f"VENV={ROOT / '.venv'}", f"STAMP={stamp}", f"LAB_PORT={port}",
         f"LAB_TOKEN={token}", "LAB_OPTS=--no-browser --LabApp.expose_app_in_browser=True"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                pytest.fail(f"make lab did not start:\n{(state / 'lab.log').read_text()[-4000:]}")
            time.sleep(1)
    yield base, token, course
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture
def page(browser, lab):
    base, token, _ = lab
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(120_000)
    pg.goto(f"{base}/lab?reset&token={token}")  # reset: no workspace restored from an earlier test
    pg.wait_for_function("window.jupyterapp && window.jupyterapp.shell && document.querySelector('.jp-DirListing')")
    yield pg
    ctx.close()


OPEN = """async (path) => {
  const app = window.jupyterapp;
  const w = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
  await w.context.ready;
  await w.sessionContext.ready;
  window.__nb = w;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  if (k) { for (let i = 0; i < 600 && k.status !== 'idle'; i++) await new Promise(r => setTimeout(r, 100)); }
  return {kernel: k ? k.status : null, cells: w.content.model.cells.length};
}"""

RUN_CELL = """async (i) => {
  const w = window.__nb, app = window.jupyterapp;
  w.content.activeCellIndex = i;
  w.content.deselectAll();
  await app.commands.execute('notebook:run-cell');  // resolves when the cell's execution has finished
  const k = w.sessionContext.session.kernel;
  for (let t = 0; t < 3000 && k.status !== 'idle'; t++) await new Promise(r => setTimeout(r, 100));
  return k.status;
}"""

CELL_OUTPUTS = """() => {
  const w = window.__nb;
  const out = [];
  for (let i = 0; i < w.content.model.cells.length; i++) {
    const c = w.content.model.cells.get(i);
    out.push({type: c.type, outputs: c.type === 'code' ? c.outputs.toJSON() : []});
  }
  return out;
}"""


def open_notebook(pg, path: str) -> dict:
    info = pg.evaluate(OPEN, path)
    pg.wait_for_timeout(500)
    return info


def _placeholders(outputs: list[dict]) -> int:
    return sum(1 for o in outputs if "course-placeholder" in str(o.get("data", {}).get("text/html", "")))


RENDERED_IMAGES = """async () => {
  // windowed notebooks attach only the cells in view: bring each cell with an image output into view in turn
  const w = window.__nb, n = w.content.model.cells.length;
  let rendered = 0;
  for (let i = 0; i < n; i++) {
    const m = w.content.model.cells.get(i);
    if (m.type !== 'code' || !m.outputs.toJSON().some(o => o.data && o.data['image/png'])) continue;
    await w.content.scrollToItem(i, 'center');
    for (let t = 0; t < 50; t++) {
      const imgs = [...w.content.widgets[i].node.querySelectorAll('.jp-OutputArea-output img')];
      if (imgs.length && imgs.every(im => im.complete && im.naturalWidth > 0)) { rendered++; break; }
      await new Promise(r => setTimeout(r, 100));
    }
  }
  return rendered;
}"""

METADATA = """() => { const md = window.__nb.context.model.metadata;
                    return {dirty: window.__nb.context.model.dirty, kernelspec: md.kernelspec, language_info: md.language_info}; }"""


@pytest.mark.parametrize("section", sections())
def test_solution_shows_all_its_figures(page, section):
    rel = f"solutions/{section}/{section}.ipynb"
    nb = _load(ROOT / rel)
    open_notebook(page, rel)
    want = figure_cells(nb)
    n = page.evaluate(RENDERED_IMAGES)
    page.evaluate("() => window.__nb.content.scrollToItem(0)")
    shot(page, f"{section}-solution")
    assert n >= want, f"{rel}: {n} cells show a rendered figure, {want} figure cells"


@pytest.mark.parametrize("section", sections())
def test_release_opens_unmodified(page, section):
    rel = f"release/{section}/{section}.ipynb"
    nb = _load(ROOT / rel)
    open_notebook(page, rel)
    page.wait_for_timeout(1500)
    md = page.evaluate(METADATA)
    shot(page, f"{section}-release-opened")
    assert not md["dirty"], (f"{rel} is marked modified on open: the file's kernelspec {nb['metadata'].get('kernelspec')} "
                             f"became {md['kernelspec']} (regenerate the notebooks after tools/nbsrc.py's KERNELSPEC change)")


@pytest.mark.parametrize("section", sections())
def test_interactive_explorer_redraws_on_change(page, section):
    rel = f"solutions/{section}/{section}.ipynb"
    nb = _load(ROOT / rel)
    idx = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and "interactive(" in _src(c)]
    if not idx:
        pytest.skip(f"{section} has no interactive explorer")
    open_notebook(page, rel)
    for i in range(idx[0] + 1):
        if nb["cells"][i]["cell_type"] == "code":
            page.evaluate(RUN_CELL, i)
    box = page.locator(".course-interactive").first
    box.wait_for(state="visible", timeout=60_000)
    box.scroll_into_view_if_needed()
    img = box.locator(".jp-OutputArea-output img").first
    img.wait_for(state="visible", timeout=60_000)
    before = img.get_attribute("src")
    labels = box.locator(".widget-label").all_inner_texts()
    sliders = box.locator(".noUi-handle, .ui-slider-handle")
    if sliders.count():
        sliders.first.focus()
        page.keyboard.press("ArrowRight")
    else:
        sel = box.locator("select").first
        opts = sel.locator("option").all_inner_texts()
        sel.select_option(index=1 if len(opts) > 1 else 0)
    page.wait_for_function("""(before) => {
      const i = document.querySelector('.course-interactive .jp-OutputArea-output img');
      return i && i.getAttribute('src') !== before && i.naturalWidth > 0; }""", arg=before, timeout=60_000)
    shot(page, f"{section}-interactive")
    assert sliders.count() or box.locator("select").count(), "no live control"
    for label in labels:  # labels are shown whole, not cut with an ellipsis
        assert label and not label.endswith("…")


@pytest.mark.parametrize("section", sections())
def test_release_run_past_errors_shows_placeholders_not_tracebacks(page, section):
    rel = f"release/{section}/{section}.ipynb"
    nb = _load(ROOT / rel)
    info = open_notebook(page, rel)
    assert info["cells"] == len(nb["cells"])
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "code":
            page.evaluate(RUN_CELL, i)
    cells = page.evaluate(CELL_OUTPUTS)
    bad, placeholders, errors = [], 0, 0
    for i, (c, got) in enumerate(zip(nb["cells"], cells)):
        if c["cell_type"] != "code":
            continue
        meta = c.get("metadata", {}).get("nbgrader", {})
        graded_or_exercise = meta.get("solution") or meta.get("grade") or _src(c).lstrip().startswith(TEST_MARKER)
        errs = [o for o in got["outputs"] if o.get("output_type") == "error"]
        tb_text = [o for o in got["outputs"] if o.get("output_type") == "stream" and "Traceback" in str(o.get("text", ""))]
        placeholders += _placeholders(got["outputs"])
        errors += len(errs)
        if not graded_or_exercise and (errs or tb_text):
            first = (_src(c).strip().splitlines() or [""])[0][:70]
            what = errs[0]["ename"] if errs else "traceback on stderr"
            bad.append(f"cell {i} ({first!r}): {what}")
    # in view for the screenshot: the first failing demo cell, else the first placeholder
    first_ph = next((i for i, got in enumerate(cells) if _placeholders(got["outputs"])), 0)
    page.evaluate("(k) => window.__nb.content.scrollToItem(k, 'center')", int(bad[0].split()[1]) if bad else first_ph)
    page.wait_for_timeout(500)
    shot(page, f"{section}-release-run")
    assert not bad, f"{rel}: demo cells show errors instead of placeholders:\n  " + "\n  ".join(bad)
    assert errors > 0, "the untouched release should fail in its exercise and graded cells"


@pytest.mark.parametrize("section", sections())
def test_validate_lists_the_failing_cells(page, section):
    rel = f"release/{section}/{section}.ipynb"
    open_notebook(page, rel)
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .validate-button").first.click()
    dialog = page.locator(".jp-Dialog")
    dialog.wait_for(state="visible", timeout=300_000)
    page.wait_for_function("() => !document.querySelector('.jp-Dialog').innerText.includes('Validating')", timeout=300_000)
    text = dialog.inner_text()
    shot(page, f"{section}-validate")
    assert "failed" in text.lower() or "error" in text.lower(), text[:500]
    assert "NotImplementedError" in text or "Traceback" in text or "The following cell failed" in text, text[:500]


def test_assignment_list_lists_sections_and_submits(page):
    page.evaluate("() => window.jupyterapp.commands.execute('nbgrader:open-assignment-list')")
    lists = wait_assignment_list(page, "01_")
    errors = list_errors(page)
    shot(page, "assignment-list")
    body = page.locator("body").inner_text()
    assert not errors and "Error fetching courses" not in body and "exchange directory does not exist" not in body, errors
    listed = (lists["released"] or "") + (lists["fetched"] or "")
    missing = [s for s in sections() if s not in listed]
    assert not missing, f"the Assignment List does not list {missing}: {lists}"
    page.locator("#fetched_assignments_list button", has_text="Submit").first.click()
    wait_submitted(page)
    shot(page, "assignment-list-submitted")


def test_formgrader_loads(page):
    page.evaluate("() => window.jupyterapp.commands.execute('nbgrader:open-formgrader')")
    text = ""
    for _ in range(240):  # the Formgrader's iframe navigates a few times while it loads
        for f in [f for f in page.frames if "formgrader" in f.url]:
            try:
                text = f.evaluate("() => document.body ? document.body.innerText : ''")
            except Exception:
                continue
        if "Manage Assignments" in text and "Loading" not in text:
            break
        page.wait_for_timeout(500)
    shot(page, "formgrader")
    assert "Manage Assignments" in text and "Loading" not in text, f"the Formgrader did not load: {text[:400]!r}"
    assert "500" not in text[:200] and "alembic" not in text, text[:400]


def test_readme_opens_from_the_lab(page, lab):
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:open', {path: 'README.md', factory: 'Markdown Preview'})")
    page.locator(".jp-RenderedMarkdown h1").first.wait_for()
    page.wait_for_timeout(500)
    links = page.locator(".jp-MarkdownViewer .jp-RenderedMarkdown table a").all_inner_texts()
    shot(page, "readme")
    assert len(links) >= len(sections()), f"the course map links {links}"


@pytest.fixture(scope="session")
def feedback_page(lab):
    """A feedback page made with the course's template (tools/jupyter/templates/feedback) from section 1's solution."""
    _, _, course = lab
    from lab import render_feedback

    name = sections()[0]
    out = course / "feedback" / "browser" / name / f"{name}.html"
    render_feedback(course / "solutions" / name / f"{name}.ipynb", out, root=course)
    return out


@pytest.mark.parametrize("how", ["served", "file"])
def test_feedback_page_renders_math_offline(browser, lab, feedback_page, how):
    base, token, course = lab
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = ctx.new_page()
    url = (f"{base}/files/{feedback_page.relative_to(course).as_posix()}?token={token}" if how == "served"
           else feedback_page.as_uri())
    pg.goto(url)
    pg.wait_for_function("window.MathJax && MathJax.Hub && MathJax.Hub.queue && MathJax.Hub.queue.pending === 0 && "
                         "document.querySelectorAll('.MathJax, .MathJax_Display').length > 0", timeout=120_000)
    toc = pg.locator("#toc li").all_inner_texts()
    text = pg.locator("body").inner_text()
    pg.locator(".MathJax_Display").first.scroll_into_view_if_needed()
    shot(pg, f"feedback-{how}")
    ctx.close()
    assert "$$" not in text, "raw TeX left on the page"
    assert toc and not any(t.startswith("Test cell") for t in toc), toc
    assert len(set(t.split("(Score")[0] for t in toc)) == len(toc), f"table of contents entries are not distinct: {toc}"
    assert "No response." not in text

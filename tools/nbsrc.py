"""Convert between authoring scripts (``notebooks/A.py``) and nbgrader notebooks (``source/A/A.ipynb``).

The authoring format is a percent script: each cell starts with a header line

    # %% [markdown]                           markdown (lines written as ``# text``)
    # %% [code]                               ordinary editable code, not graded
    # %% [given]                              locked code the learner reads but does not change
    # %% [solution id=ex_02_1_rmsnorm]         the learner's exercise (``### BEGIN SOLUTION`` inside)
    # %% [test id=test_02_1_rmsnorm points=3]  an autograded, locked test cell

Everything nbgrader needs (schema 3 metadata, grade ids, points, locks) is derived from the header, so
the script stays readable and diffs stay small. A given cell whose only line is ``#@quiz-feedback`` is filled
at build time from the section's quiz judge (``KEY``, ``EXPLANATIONS``): salted hashes and encrypted
explanations for ``course_lib.quiz`` (``export`` writes the marker back). ``python tools/nbsrc.py build`` writes every notebook;
``python tools/nbsrc.py check`` fails if a committed notebook is out of date; ``python tools/nbsrc.py
export source/A/A.ipynb`` writes the script back from a notebook edited in JupyterLab.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = re.compile(r"^# %% \[(?P<kind>markdown|code|given|solution|test)(?P<args>[^\]]*)\]\s*$")
KERNELSPEC = {"display_name": "Python 3 (DeepSeek-V3 course)", "language": "python", "name": "python3"}
# What the course kernel (ipykernel on the venv's Python) reports: JupyterLab writes the kernel's language_info into
# the notebook on open and marks it modified when it differs. tests/test_notebooks.py keeps the two equal.
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py", "mimetype": "text/x-python",
                 "name": "python", "nbconvert_exporter": "python", "pygments_lexer": "ipython3", "version": "3.11.7"}


def _parse_args(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split():
        key, _, value = part.partition("=")
        out[key] = value
    return out


QUIZ_MARKER = "#@quiz-feedback"


def quiz_feedback_source(section: str) -> str:
    """The feedback cell of ``section``'s quiz: ``course_lib.quiz.Quiz`` over the judge's key, hashed and encrypted."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import course_judge
    from course_lib.quiz import feedback_table

    mods = [m for m in course_judge.judges(section).values() if hasattr(m, "KEY")]
    if len(mods) != 1 or not hasattr(mods[0], "EXPLANATIONS"):
        raise ValueError(f"{section}: a {QUIZ_MARKER} cell needs one quiz judge with KEY and EXPLANATIONS")
    table = feedback_table(section, mods[0].KEY, mods[0].EXPLANATIONS)
    out = [f"{QUIZ_MARKER}: written by tools/nbsrc.py from the judge's key (salted hashes, encrypted explanations; no answers)",
           "from course_lib.quiz import Quiz, check  # check(n, answer) gives feedback on one answer at any time",
           "",
           f'QUIZ = Quiz("{section}", {{']
    for q, (salt, digest, cipher) in table.items():
        chunks = [cipher[i:i + 96] for i in range(0, len(cipher), 96)] or [""]
        out.append(f'    {q}: ("{salt}", "{digest}",')
        out += [f'        "{c}"' for c in chunks[:-1]]
        out.append(f'        "{chunks[-1]}"),')
    out += ["})", "QUIZ.check_all(globals())"]
    return "\n".join(out)


def _cell(kind: str, args: dict[str, str], lines: list[str], index: int, prefix: str = "", section: str = "") -> dict:
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    if kind == "given" and lines and lines[0].strip() == QUIZ_MARKER:
        if len(lines) > 1:
            raise ValueError(f"the {QUIZ_MARKER} cell is generated: its only line is the marker")
        lines = quiz_feedback_source(section).split("\n")
    if kind == "markdown":
        body = [ln[2:] if ln.startswith("# ") else ln.removeprefix("#") for ln in lines]
        source = "\n".join(body)
        cell = {"cell_type": "markdown", "metadata": {}, "source": source}
        if "id" in args:
            cell["metadata"]["nbgrader"] = {
                "schema_version": 3, "grade": False, "solution": False, "locked": True,
                "grade_id": args["id"],
            }
        return cell
    source = "\n".join(lines)
    cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}
    if kind == "code":
        return cell
    grade_id = args.get("id") or f"given_{prefix}{index:03d}"
    meta: dict = {"schema_version": 3, "grade_id": grade_id}
    if kind == "given":
        meta.update(grade=False, solution=False, locked=True)
    elif kind == "solution":
        if "### BEGIN SOLUTION" not in source:
            raise ValueError(f"solution cell {grade_id} has no ### BEGIN SOLUTION region")
        meta.update(grade=False, solution=True, locked=False)
    elif kind == "test":
        meta.update(grade=True, solution=False, locked=True, points=float(args["points"]))
    cell["metadata"]["nbgrader"] = dict(sorted(meta.items()))
    return cell


def script_to_notebook(text: str, section: str = "") -> dict:
    """``section`` (e.g. "02_mla") makes the ids of locked given cells unique across the course."""
    prefix = f"{section[:2]}_" if section else ""
    cells: list[dict] = []
    kind, args, lines = None, {}, []
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            if kind is not None:
                cells.append(_cell(kind, args, lines, len(cells), prefix, section))
            kind, args, lines = m["kind"], _parse_args(m["args"]), []
        elif kind is not None:
            lines.append(line)
    if kind is not None:
        cells.append(_cell(kind, args, lines, len(cells), prefix, section))
    for i, cell in enumerate(cells):
        cell["id"] = f"c{i:03d}"
        src = cell["source"]
        cell["source"] = [s for s in src.splitlines(keepends=True)]
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": KERNELSPEC,
            "language_info": LANGUAGE_INFO,
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def notebook_to_script(nb: dict) -> str:
    out: list[str] = []
    for cell in nb["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        meta = cell.get("metadata", {}).get("nbgrader")
        if cell["cell_type"] == "markdown":
            header = "# %% [markdown]" + (f" id={meta['grade_id']}" if meta else "")
            body = ["#" if not ln else f"# {ln}" for ln in src.split("\n")]
        else:
            if not meta:
                header = "# %% [code]"
            elif meta.get("grade"):
                pts = meta["points"]
                pts_s = str(int(pts)) if float(pts).is_integer() else str(pts)
                header = f"# %% [test id={meta['grade_id']} points={pts_s}]"
            elif meta.get("solution"):
                header = f"# %% [solution id={meta['grade_id']}]"
            else:
                gid = meta["grade_id"]
                header = "# %% [given]" if gid.startswith("given_") else f"# %% [given id={gid}]"
            body = src.split("\n")
            if body[0].startswith(QUIZ_MARKER):  # generated at build time: the script keeps the marker only
                body = [QUIZ_MARKER]
        out.append(header)
        out.extend(body)
        out.append("")
    return "\n".join(out)


JUDGED_LINE = "# Checks you can run now. When graded, the judge runs these and more ({points} points): {summary}."


def judged_line(points: float, summary: str) -> str:
    """The first line of a graded cell: what the learner can run now, and what the judge checks (its SUMMARY)."""
    return JUDGED_LINE.format(points=f"{points:g}", summary=summary.rstrip("."))


def sync_summaries(text: str, section: str) -> str:
    """Rewrite the first line of every graded cell of a script from its judge module's POINTS and SUMMARY."""
    sys.path.insert(0, str(ROOT))
    import course_judge

    judges = course_judge.judges(section)
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = HEADER.match(line)
        if not m or m["kind"] != "test":
            continue
        mod = judges.get(_parse_args(m["args"]).get("id"))
        if mod is None:
            continue
        new = judged_line(float(mod.POINTS), mod.SUMMARY)
        if i + 1 < len(lines) and lines[i + 1].startswith("# Checks you can run now."):
            lines[i + 1] = new
        else:
            lines.insert(i + 1, new)
    return "\n".join(lines)


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def sections() -> list[str]:
    return sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def target(name: str) -> Path:
    return ROOT / "source" / name / f"{name}.ipynb"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    sub.add_parser("check")
    sub.add_parser("sync", help="rewrite each graded cell's first line from its judge module (POINTS, SUMMARY)")
    ex = sub.add_parser("export")
    ex.add_argument("notebook", type=Path)
    ns = ap.parse_args(argv)
    if ns.cmd == "export":
        nb = json.loads(ns.notebook.read_text())
        name = ns.notebook.stem
        (ROOT / "notebooks" / f"{name}.py").write_text(notebook_to_script(nb))
        print(f"wrote notebooks/{name}.py")
        return 0
    if ns.cmd == "sync":
        for name in sections():
            path = ROOT / "notebooks" / f"{name}.py"
            text = path.read_text()
            new = sync_summaries(text, name)
            if new != text:
                path.write_text(new)
                print(f"wrote notebooks/{name}.py")
        return 0
    stale = []
    for name in sections():
        text = dumps(script_to_notebook((ROOT / "notebooks" / f"{name}.py").read_text(), name))
        path = target(name)
        if path.exists() and path.read_text() == text:
            continue
        if ns.cmd == "check":
            stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("out of date (run `make source`):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Estimate how long each section takes, from its authoring script: the core path and the optional deep dives.

    python tools/estimate_time.py              # every section: words, solution lines, minutes, stated, seed target
    python tools/estimate_time.py 02_mla       # one section

The model (deliberately simple, so that authors can predict it):

- reading: 120 words a minute of markdown (every whitespace-separated token of a markdown cell, LaTeX, tables and
  diagrams included; table rule lines ``|---|`` excluded);
- writing: 1.5 minutes per line of solution code (non-blank, non-comment lines between ``### BEGIN SOLUTION`` and
  ``### END SOLUTION``; quiz answers count as one line each).

Code the learner only runs (given cells, demos, visible checks) adds no time of its own: the notebook executes in
under 90 s, and reading it is what its markdown explains.

**Deep dives.** A markdown heading whose text starts with ``Deep dive:`` (``### Deep dive: why absorption loses at
prefill``) or ``Optional`` (``## Optional challenge (ungraded)``) opens an optional region that runs to the next
heading of the same or a higher level (as many ``#`` or fewer), across cells: everything in it (markdown and
solution lines alike) counts as deep-dive time, the rest as the core path. Graded exercises belong on the core path.

Each deep dive is estimated on its own too, and a ``Deep dive:`` heading states it: ``### Deep dive: the long way
round (about 4 min)`` (an ``Optional ...`` heading does not; its time counts in the total). A deep dive's time is its
own region only.

**The stated time.** Each notebook's first markdown cell states it on one line:
``**Time:** core path about N min; deep dives M min.`` (or ``; no deep dives.``), and README's course map repeats N
and M. ``tests/test_estimate_time.py`` requires N, M and every deep dive's ``(about K min)`` to be within 25% (or the
rounding) of these estimates; ``--write`` rewrites the line (rounded to 5 minutes) and the headings' times (to the
minute below 10 minutes, else to 5).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import nbsrc  # noqa: E402

WORDS_PER_MINUTE = 120
MINUTES_PER_SOLUTION_LINE = 1.5
TOLERANCE = 0.25
#: the seed's core-path targets (minutes), notebook_development_guide.md
SEED_TARGET = {"01_foundations": 30, "02_mla": 60, "03_moe": 45, "04_fp8": 30, "05_integration": 45, "06_production": 30}

HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
DEEP_DIVE = re.compile(r"^(Deep dive:|Optional\b)", re.I)
DIVE_TIME = re.compile(r"\s*\(about (?P<min>\d+) min\)\s*$")
STATED = re.compile(r"\*\*Time:\*\* core path about (?P<core>\d+) min(?:; deep dives (?P<deep>\d+) min|; no deep dives)\.")
RULE = re.compile(r"^\s*\|?\s*:?-{3,}")


@dataclass
class Estimate:
    section: str
    core_words: int = 0
    deep_words: int = 0
    core_lines: int = 0
    deep_lines: int = 0
    deep_dives: tuple[str, ...] = ()
    #: per deep dive (in order): (heading text without its stated time, words, solution lines, stated minutes or None)
    dives: tuple[tuple[str, int, int, int | None], ...] = ()

    @property
    def core_minutes(self) -> float:
        return self.core_words / WORDS_PER_MINUTE + MINUTES_PER_SOLUTION_LINE * self.core_lines

    @property
    def deep_minutes(self) -> float:
        return self.deep_words / WORDS_PER_MINUTE + MINUTES_PER_SOLUTION_LINE * self.deep_lines

    def dive_minutes(self) -> list[tuple[str, float, int | None]]:
        """(heading, estimated minutes, stated minutes or None) of each deep dive."""
        return [(h, w / WORDS_PER_MINUTE + MINUTES_PER_SOLUTION_LINE * n, st) for h, w, n, st in self.dives]


def _solution_lines(source: str) -> int:
    n, inside = 0, False
    for ln in source.split("\n"):
        s = ln.strip()
        if s == "### BEGIN SOLUTION":
            inside = True
        elif s == "### END SOLUTION":
            inside = False
        elif inside and s and not s.startswith("#"):
            n += 1
    return n


def estimate(section: str, text: str | None = None) -> Estimate:
    """The estimate of ``notebooks/<section>.py`` (or of ``text``, a percent script)."""
    if text is None:
        text = (ROOT / "notebooks" / f"{section}.py").read_text()
    nb = nbsrc.script_to_notebook(text, section)
    est = Estimate(section)
    deep_level: int | None = None  # the heading level of the open deep dive, if any
    dives: list[str] = []
    per: list[list] = []  # [heading, words, lines, stated] of each deep dive
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            fence = False
            for ln in src.split("\n"):
                if ln.lstrip().startswith("```"):
                    fence = not fence
                m = None if fence else HEADING.match(ln)
                if m:
                    level = len(m.group(1))
                    if deep_level is not None and level <= deep_level:
                        deep_level = None
                    title = m.group(2).strip()
                    if deep_level is None and DEEP_DIVE.match(title):
                        deep_level = level
                        t = DIVE_TIME.search(title)
                        dives.append(DIVE_TIME.sub("", title))
                        per.append([DIVE_TIME.sub("", title), 0, 0, int(t["min"]) if t else None])
                if RULE.match(ln):
                    continue
                words = len(ln.split())
                if deep_level is None:
                    est.core_words += words
                else:
                    est.deep_words += words
                    per[-1][1] += words
        elif cell.get("metadata", {}).get("nbgrader", {}).get("solution"):
            lines = _solution_lines(src)
            if deep_level is None:
                est.core_lines += lines
            else:
                est.deep_lines += lines
                per[-1][2] += lines
    est.dives = tuple(tuple(d) for d in per)
    est.deep_dives = tuple(dives)
    return est


def stated(section: str, text: str | None = None) -> tuple[int, int] | None:
    """``(core, deep)`` minutes the notebook's first markdown cell states, or None."""
    if text is None:
        text = (ROOT / "notebooks" / f"{section}.py").read_text()
    first = nbsrc.script_to_notebook(text, section)["cells"][0]
    if first["cell_type"] != "markdown":
        return None
    for line in "".join(first["source"]).split("\n"):  # one line, as the test requires
        m = STATED.search(line)
        if m:
            return int(m["core"]), int(m["deep"] or 0)
    return None


def _round5(x: float) -> int:
    return max(5, int(5 * round(x / 5))) if x >= 2.5 else 0


def _round_dive(x: float) -> int:
    return max(1, round(x)) if x < 10 else _round5(x)


def write_dive_times(text: str, section: str) -> str:
    """``text`` with each deep-dive heading ending in ``(about K min)``, K its own estimate."""
    times = iter(_round_dive(m) for _, m, _ in estimate(section, text).dive_minutes())
    out, fence, deep_level = [], False, None
    for ln in text.split("\n"):
        body = ln[2:] if ln.startswith("# ") else None  # a markdown line of the percent script
        if body is not None and body.lstrip().startswith("```"):
            fence = not fence
        m = HEADING.match(body) if body is not None and not fence else None
        if m:
            level, title = len(m.group(1)), m.group(2).strip()
            if deep_level is not None and level <= deep_level:
                deep_level = None
            if deep_level is None and DEEP_DIVE.match(title):
                deep_level = level
                t = next(times)
                if title.lower().startswith("deep dive:"):  # an "Optional ..." heading keeps its name
                    ln = f"# {m.group(1)} {DIVE_TIME.sub('', title)} (about {t} min)"
        out.append(ln)
    return "\n".join(out)


def statement(est: Estimate) -> str:
    core, deep = _round5(est.core_minutes), _round5(est.deep_minutes)
    return f"**Time:** core path about {core} min; " + (f"deep dives {deep} min." if deep else "no deep dives.")


def report(sections: list[str]) -> str:
    rows = ["| section | markdown words (core / deep) | solution lines (core / deep) | core min | deep-dive min | "
            "stated (core / deep) | seed target (core) | core vs target |",
            "|---|---|---|---|---|---|---|---|"]
    for s in sections:
        e = estimate(s)
        st = stated(s)
        target = SEED_TARGET.get(s)
        delta = f"{e.core_minutes - target:+.0f} min ({e.core_minutes / target:.1f}x)" if target else "-"
        said = f"{st[0]} / {st[1]}" if st else "none"
        rows.append(f"| {s} | {e.core_words} / {e.deep_words} | {e.core_lines} / {e.deep_lines} | {e.core_minutes:.0f} | "
                    f"{e.deep_minutes:.0f} | {said} | {target or '-'} | {delta} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="*", help="default: every notebooks/NN_name.py")
    ap.add_argument("--write", action="store_true", help="rewrite each notebook's **Time:** line from the estimate")
    ns = ap.parse_args(argv)
    sections = ns.sections or nbsrc.sections()
    if ns.write:
        for s in sections:
            path = ROOT / "notebooks" / f"{s}.py"
            text = path.read_text()
            text_d = write_dive_times(text, s)
            new, n = re.subn(r"\*\*Time:\*\* core path about \d+ min(?:; deep dives \d+ min|; no deep dives)\.",
                             statement(estimate(s, text_d)), text_d, count=1)
            if n != 1:
                print(f"{s}: no '**Time:** core path about N min; ...' line to rewrite", file=sys.stderr)
                continue
            if new != text:
                path.write_text(new)
                print(f"wrote notebooks/{s}.py: {statement(estimate(s))}")
                for h, m, st in estimate(s).dive_minutes():
                    print(f"    {h}: {f'about {st} min' if st is not None else 'in the total only'} (estimate {m:.1f} min)")
    print(report(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

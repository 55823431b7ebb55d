"""tools/estimate_time.py: the time model, deep-dive regions, and every notebook's stated time against its estimate."""

from __future__ import annotations

import estimate_time as ET
import pytest
from conftest import section_names

SCRIPT = '''# %% [markdown]
# # Section 9
# **Time:** core path about 5 min; deep dives 5 min.
#
# one two three four five six seven eight nine ten

# %% [solution id=ex_09_1_a]
def f(x):
    """A docstring line counts (it is code the learner writes)."""
    ### BEGIN SOLUTION
    # a comment does not count
    y = x + 1

    return y
    ### END SOLUTION

# %% [markdown]
# ## 9.1 Core
# alpha beta
#
# ### Deep dive: the long way round
# gamma delta epsilon
# ```
# # not a heading inside a fence
# ```
# #### a sub-heading stays in the deep dive
# zeta

# %% [solution id=ex_09_2_b]
def g():
    ### BEGIN SOLUTION
    return 2
    ### END SOLUTION

# %% [markdown]
# ### 9.2 back on the core path (same level closes the deep dive)
# | a | b |
# |---|---|
# | 1 | 2 |
#
# ## Optional challenge (ungraded)
# try it
'''


def test_the_model_and_deep_dive_regions():
    e = ET.estimate("09_demo", SCRIPT)
    assert (e.core_lines, e.deep_lines) == (2, 1), "y = x + 1 and return y on the core path; return 2 in the deep dive"
    assert e.deep_dives == ("Deep dive: the long way round", "Optional challenge (ungraded)")
    deep = "### Deep dive: the long way round gamma delta epsilon ``` # not a heading inside a fence ``` " \
           "#### a sub-heading stays in the deep dive zeta ## Optional challenge (ungraded) try it"
    assert e.deep_words == len(deep.split())
    assert e.core_minutes == pytest.approx(e.core_words / 120 + 2 * 1.5)
    assert e.deep_minutes == pytest.approx(e.deep_words / 120 + 1.5)
    assert ET.stated("09_demo", SCRIPT) == (5, 5)
    assert ET.stated("09_demo", SCRIPT.replace("; deep dives 5 min.", "; no deep dives.")) == (5, 0)
    assert ET.stated("09_demo", SCRIPT.replace("**Time:**", "Time:")) is None
    assert ET.statement(e).startswith("**Time:** core path about 5 min; ")


def test_each_deep_dive_is_estimated_on_its_own_and_its_heading_states_it():
    e = ET.estimate("09_demo", SCRIPT)
    (h1, m1, st1), (h2, m2, st2) = e.dive_minutes()
    assert (h1, h2) == ("Deep dive: the long way round", "Optional challenge (ungraded)")
    words1 = len("### Deep dive: the long way round gamma delta epsilon ``` # not a heading inside a fence ``` "
                 "#### a sub-heading stays in the deep dive zeta".split())
    assert m1 == pytest.approx(words1 / 120 + 1.5), "the first dive: its own words and its one solution line"
    assert m2 == pytest.approx(len("## Optional challenge (ungraded) try it".split()) / 120)
    assert m1 + m2 == pytest.approx(e.deep_minutes)
    assert st1 is None and st2 is None
    written = ET.write_dive_times(SCRIPT, "09_demo")
    assert "# ### Deep dive: the long way round (about 2 min)" in written
    assert "# ## Optional challenge (ungraded)\n" in written, "an Optional heading keeps its name"
    assert "# # not a heading inside a fence" in written, "a fenced line is not a heading"
    again = ET.estimate("09_demo", written)
    assert [st for _, _, st in again.dive_minutes()] == [2, None]
    assert [h for h, _, _ in again.dive_minutes()] == [h1, h2], "the stated time is not part of the heading's name"
    assert ET.write_dive_times(written, "09_demo") == written, "writing is idempotent"


def _within(stated: float, estimated: float) -> bool:
    """25% of the estimate, or the 2.5 minutes that rounding to 5 minutes may cost."""
    return abs(stated - estimated) <= max(ET.TOLERANCE * estimated, 2.5)


@pytest.mark.parametrize("section", section_names())
def test_each_notebook_states_its_estimated_time(section):
    st = ET.stated(section)
    assert st, (f"notebooks/{section}.py: the intro needs one line '**Time:** core path about N min; deep dives M min.' "
                f"(or '; no deep dives.'): `python tools/estimate_time.py --write {section}` writes it")
    e = ET.estimate(section)
    assert _within(st[0], e.core_minutes), f"{section}: states {st[0]} min of core path, the estimate is {e.core_minutes:.0f}"
    assert _within(st[1], e.deep_minutes), f"{section}: states {st[1]} min of deep dives, the estimate is {e.deep_minutes:.0f}"
    for heading, minutes, said in e.dive_minutes():
        if not heading.lower().startswith("deep dive:"):
            continue  # "Optional challenge": counted in the total only
        assert said is not None, (f"notebooks/{section}.py: the heading '{heading}' should end with '(about N min)': "
                                  f"`python tools/estimate_time.py --write {section}` writes it")
        assert abs(said - minutes) <= max(ET.TOLERANCE * minutes, 2.5 if minutes >= 10 else 1.0), \
            f"{section}: '{heading}' states {said} min, the estimate is {minutes:.1f}"


def test_the_readme_course_map_states_the_notebooks_times():
    import re

    from conftest import ROOT

    import course_judge

    rows = re.findall(r"^\| (\d) \| \[[^\]]+\]\(release/(\w+)/\w+\.ipynb\) \| (\d+) min \| (\d+ min|none) \| ([\d.]+) \|",
                      (ROOT / "README.md").read_text(), re.M)
    assert {r[1] for r in rows} == set(section_names()), rows
    for _, section, minutes, deep, points in rows:
        total = sum(float(m.POINTS) for m in course_judge.judges(section).values())
        assert float(points) == total, f"README says {points} points for {section}, its judges {total:g}"
        core, dives = ET.stated(section)
        assert int(minutes) == core, f"README says {minutes} min for {section}'s core path, its intro {core}"
        assert deep == (f"{dives} min" if dives else "none"), f"README says {deep} of deep dives for {section}, its intro {dives} min"


def test_points_follow_the_work():
    """Each section's share of the course's points is within 25% of its share of the core path's solution lines
    (a section that is quick to do cannot carry the most points)."""
    import course_judge

    points = {s: sum(float(m.POINTS) for m in course_judge.judges(s).values()) for s in section_names()}
    lines = {s: ET.estimate(s).core_lines for s in points}
    for s in points:
        ratio = (points[s] / sum(points.values())) / (lines[s] / sum(lines.values()))
        assert 0.75 <= ratio <= 1.25, (f"{s}: {points[s]:g} of {sum(points.values()):g} points for {lines[s]} of "
                                       f"{sum(lines.values())} solution lines ({ratio:.2f}x its share of the work)")

"""Grading a learner's test by the drafts it passes and the ones it catches (the test-writing exercises).

The drafts are built in the learner's kernel by a ``course_lib`` factory from plain switches (see
``course_lib.drafts``); the judge names each draft, runs the learner's test on all of them in a seeded shuffled
order (correct drafts mixed among the wrong ones), and keeps, per draft, what the test raised. A test earns the
catching parts only while it passes every correct draft: a test that always raises catches everything.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from course_judge.session import LearnerError
from course_judge.static import GIVEN_FOR_OTHER_PURPOSES

# A learner's test must find a draft's mistake from what the draft computes. Its switches sit in the draft's closure
# and code, so a test that reads them could sort the drafts without testing anything: its answer may not use these.
READS_THE_DRAFT = dict.fromkeys(
    ("__closure__", "cell_contents", "co_freevars", "__code__", "__globals__", "getclosurevars", "_course_draft", "is_draft"),
    "which reads how a draft is built instead of testing what it computes")


def forbidden(*given: str) -> dict[str, str]:
    """The names a test-writing answer may not use: the course's ``given`` drafts and oracles, and :data:`READS_THE_DRAFT`."""
    return {**dict.fromkeys(given, GIVEN_FOR_OTHER_PURPOSES), **READS_THE_DRAFT}


@dataclass(frozen=True)
class Drafts:
    factory: str  # "module:function" building a list of drafts from a list of switch sets, in the kernel
    test: str  # the learner's test, a global of the notebook
    correct: dict[str, dict]  # name -> switches
    wrong: dict[str, tuple[dict, str]]  # name -> (switches, hint: what would make the mistake show)
    seed: int  # of the shuffled order
    noun: str = "draft"
    chunk: int = 8  # drafts per round trip: one slow test cannot eat the whole time limit in one call


def describe(e: Exception, test: str) -> str:
    """What a test raised, for a message to the learner."""
    if isinstance(e, LearnerError):
        if e.not_implemented:
            return f"{test} is not implemented yet (it raised NotImplementedError)"
        where = "".join(f"\n    at {w}" for w in e.where[-2:])
        return f"{e.type}: {e.message[:300]}{where}"
    return f"{type(e).__name__}: {e}"


def run(k, d: Drafts) -> dict[str, Exception | None]:
    """The exception ``d.test`` raised on each draft (None: it passed); any exception counts as catching."""
    specs = {**d.correct, **{n: sw for n, (sw, _) in d.wrong.items()}}
    names = list(specs)
    random.Random(d.seed).shuffle(names)
    built = k.call_opts(k.lib(d.factory), ([specs[n] for n in names],), keep=True)
    test = getattr(k.g, d.test)
    out: dict[str, Exception | None] = {}
    for lo in range(0, len(names), d.chunk):
        chunk = names[lo:lo + d.chunk]
        res = k.many([(test, (built[lo + i],), {}) for i in range(len(chunk))])
        for n, r in zip(chunk, res):
            if isinstance(r, LearnerError) and r.not_implemented:
                raise AssertionError(describe(r, d.test))
            out[n] = r if isinstance(r, Exception) else None
    return out


def accepts(results: dict, names, d: Drafts, cause: str) -> None:
    """Fail, naming the first correct draft the test rejects, and the ``cause`` a learner should look at."""
    for n in names:
        e = results[n]
        if e is not None:
            raise AssertionError(f"your test rejects a correct {d.noun} ({n}):\n  {describe(e, d.test)}\n  likely cause: {cause}")


def catches(results: dict, names, d: Drafts) -> None:
    """Fail, naming the first wrong draft the test passes and its hint."""
    missed = [n for n in names if results[n] is None]
    if missed:
        raise AssertionError(f"your test passes a wrong {d.noun}: {missed[0]}"
                             + (f" (and {len(missed) - 1} more)" if len(missed) > 1 else "")
                             + f"\n  likely cause: no call makes this mistake show; {d.wrong[missed[0]][1]}")

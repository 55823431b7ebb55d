"""Grading a learner's test by the drafts it passes and the ones it catches (the test-writing exercises).

The judge builds each named draft from its switches with the trusted ``course_lib`` factory, on its own side,
and serves them (:mod:`course_judge.draft_server`); the kernel gets stand-ins that carry a random token each
and nothing of how a draft is built. The learner's test runs on one stand-in per call, in an order drawn afresh
for each grading (correct drafts mixed among the wrong ones, so the order cannot be learned from feedback);
only the draft under test answers meanwhile, so a test cannot compare drafts with one another. The judge
keeps, per draft, what the test raised. A test earns the catching parts only while it passes every correct
draft: a test that always raises catches everything.
"""

from __future__ import annotations

import importlib
import random
import secrets
from dataclasses import dataclass
from pathlib import Path

from course_judge.draft_server import DraftServer
from course_judge.session import LearnerError
from course_judge.static import GIVEN_FOR_OTHER_PURPOSES

# A learner's test must find a draft's mistake from what the draft computes. Graded drafts live on the judge's side;
# the drafts a learner tries a test on keep their switches in a closure, and an answer that reads those tests nothing.
READS_THE_DRAFT = dict.fromkeys(
    ("__closure__", "cell_contents", "co_freevars", "__code__", "__globals__", "getclosurevars", "_course_draft", "is_draft"),
    "which reads how a draft is built instead of testing what it computes")


def forbidden(*given: str) -> dict[str, str]:
    """The names a test-writing answer may not use: the course's ``given`` drafts and oracles, and :data:`READS_THE_DRAFT`."""
    return {**dict.fromkeys(given, GIVEN_FOR_OTHER_PURPOSES), **READS_THE_DRAFT}


@dataclass(frozen=True)
class Drafts:
    factory: str  # "course_lib.module:function" building one draft from switches, imported on the judge's side
    test: str  # the learner's test, a global of the notebook
    correct: dict[str, dict]  # name -> switches
    wrong: dict[str, tuple[dict, str]]  # name -> (switches, hint: what would make the mistake show)
    noun: str = "draft"


def describe(e: Exception, test: str) -> str:
    """What a test raised, for a message to the learner."""
    if isinstance(e, LearnerError):
        if e.not_implemented:
            return f"{test} is not implemented yet (it raised NotImplementedError)"
        where = "".join(f"\n    at {w}" for w in e.where[-2:])
        return f"{e.type}: {e.message[:300]}{where}"
    return f"{type(e).__name__}: {e}"


def variants(d: Drafts) -> dict[str, tuple[str, dict]]:
    """Every draft the test is run on: name -> (the correct way or mistake it stands for, its switches).

    Each mistake is planted in every correct way of writing the function (``"<mistake> / <way>"``), so the drafts
    agree in groups of the same size: a test that passes a draft when others compute the same learns nothing.
    """
    out = {n: (n, dict(sw)) for n, sw in d.correct.items()}
    for w, (sw, _) in d.wrong.items():
        for way, way_sw in d.correct.items():
            out[f"{w} / {way}"] = (w, {**way_sw, **sw})
    return out


def build(d: Drafts) -> dict[str, object]:
    """Each draft of :func:`variants`, built here from its switches."""
    module, _, name = d.factory.partition(":")
    if not module.startswith("course_lib."):
        raise ValueError(f"drafts come from course_lib, not {module}")
    make = getattr(importlib.import_module(module), name)
    return {n: make(**sw) for n, (_, sw) in variants(d).items()}


def shared_folder(k) -> Path | None:
    """A folder the kernel can reach (its private IPC folder), or None: a fresh temporary one will do."""
    find = getattr(k.channel, "shared_folder", None)
    return find() if find is not None else None


def run(k, d: Drafts) -> dict[str, Exception | None]:
    """The exception ``d.test`` raised on each correct draft and each mistake (None: it passed; a mistake passes
    when the test passes it written any one way); any exception counts as catching."""
    built, of = build(d), variants(d)
    names = list(built)
    random.Random(secrets.randbits(64)).shuffle(names)
    tokens = {secrets.token_hex(16): n for n in names}
    test = getattr(k.g, d.test)
    out: dict[str, Exception | None] = {}
    run_test = k.lib("course_lib.drafts:run_test")
    with DraftServer({t: built[n] for t, n in tokens.items()}, shared_folder(k)) as server:
        for t, n in tokens.items():  # one round trip per draft: only its own stand-in answers meanwhile
            server.active = t
            try:
                k.call(run_test, test, server.path, server.specs([t])[0])
                raised = None
            except LearnerError as e:
                if e.not_implemented:
                    raise AssertionError(describe(e, d.test)) from None
                raised = e
            base = of[n][0]
            out[base] = None if raised is None or (base in out and out[base] is None) else out.get(base, raised)
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

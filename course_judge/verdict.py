"""Running one judge module against one session: parts, points, messages, a verdict.

A judge module grades one exercise (one graded placeholder cell of the notebook) and states::

    GRADE_ID = "test_01_1_sdpa"     # the placeholder cell it scores
    POINTS = 6                      # = the cell's points = the sum of the parts below
    ANSWERS = ("ex_01_1_sdpa",)     # the answer cells it grades (static checks, mutants)
    SUMMARY = "..."                 # one line: what it checks (shown in feedback)
    REFERENCE = ()                  # course modules that ARE the answer: using them is refused
    def judge(k: Session, t: Grader) -> None: ...
    MUTANTS = [...]; ALTERNATIVES = [...]   # see course_judge.mutants

``judge`` groups its checks into parts, each all-or-nothing::

    with t.part("float64 against torch's attention", 2):
        assert_close(...)

A failing check (``AssertionError``), an exception from the learner's code or a call over its time
limit fails that part with a message and the judge goes on with the next; a kernel that dies or stops
answering fails the whole exercise (and the notebook's later cells are not run). A benchmark that
cannot decide (a busy machine) marks its part inconclusive.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from course_judge.session import CallTimeout, ChannelError, KernelGone, LearnerError, Session
from course_lib.bench import threads


class Inconclusive(Exception):
    """A measurement that cannot decide pass or fail (e.g. timings on a busy machine)."""


@dataclass
class PartResult:
    name: str
    points: float
    passed: bool | None  # None: inconclusive
    message: str = ""

    @property
    def score(self) -> float:
        return self.points if self.passed else 0.0


@dataclass
class Verdict:
    grade_id: str
    points: float
    parts: list[PartResult] = field(default_factory=list)
    rejected: str = ""  # why the whole exercise scores 0 (use of the answer key, ...)
    review: list[str] = field(default_factory=list)  # reasons for a person to look (never cost points)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    calls: int = 0
    channel_seconds: float = 0.0
    summary: str = ""

    @property
    def inconclusive(self) -> bool:
        return not self.rejected and any(p.passed is None for p in self.parts)

    @property
    def score(self) -> float | None:
        """Points earned; None while a part is inconclusive (the submission must be regraded)."""
        if self.rejected:
            return 0.0
        if self.inconclusive:
            return None
        return min(self.points, sum(p.score for p in self.parts))

    @property
    def failure_texts(self) -> list[str]:
        """What the learner is told went wrong: the refusal and each failed part's message (no part names)."""
        return ([self.rejected] if self.rejected else []) + [p.message for p in self.parts if not p.passed and p.message]

    @property
    def messages(self) -> list[str]:
        out = [self.rejected] if self.rejected else []
        return out + [f"{p.name}: {p.message}" for p in self.parts if not p.passed and p.message]

    def report(self) -> str:
        """The text the learner's feedback shows at the placeholder cell."""
        sc = self.score
        head = (f"Graded by the judge: {'inconclusive (to be regraded)' if sc is None else f'{sc:g} / {self.points:g} points'}"
                + (f" — {self.summary}" if self.summary else ""))
        lines = [head]
        if self.rejected:
            lines.append(f"  REFUSED: {self.rejected}")
        for p in self.parts:
            mark = "ok  " if p.passed else ("??  " if p.passed is None else "FAIL")
            lines.append(f"  [{mark}] {p.name} ({p.score:g}/{p.points:g})")
            if p.message and not p.passed:
                lines += ["         " + ln for ln in p.message.splitlines()[:12]]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = asdict(self)
        d["score"] = self.score
        return d

    @classmethod
    def from_json(cls, d: dict) -> Verdict:
        parts = [PartResult(**p) for p in d.get("parts", [])]
        keep = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "parts"}
        return cls(parts=parts, **keep)


class Grader:
    """What a judge function receives as ``t``: parts, notes, inconclusive results, the submitted source.

    ``t.source`` maps each answer cell's grade id (the module's ANSWERS) to the code the learner submitted, read
    by the grader from the notebook file (the kernel cannot change it): for static checks of an answer.
    """

    def __init__(self, verdict: Verdict, source: dict[str, str] | None = None):
        self.verdict = verdict
        self.dead: str | None = None
        self.source = dict(source or {})

    @contextlib.contextmanager
    def part(self, name: str, points: float):
        res = PartResult(name, float(points), False)
        self.verdict.parts.append(res)
        dead_before = self.dead
        try:
            yield
            res.passed = dead_before is None
        except AssertionError as e:
            res.message = str(e) or "a check failed"
        except LearnerError as e:
            res.message = e.describe()
        except Inconclusive as e:
            res.passed, res.message = None, f"inconclusive: {e}"
        except CallTimeout as e:
            res.message = str(e)
        except KernelGone as e:
            self.dead = self.dead or str(e)
        except ChannelError as e:
            res.message = str(e)
        except Exception as e:  # noqa: BLE001 - an answer of an unexpected kind trips the judge's own code
            res.message = (f"the judge could not check this part ({type(e).__name__}: {str(e)[:300]}); "
                           "does your code return the types and shapes the exercise asks for?")
        if self.dead is not None and not res.passed:
            res.passed, res.message = False, f"not graded: {self.dead}"

    def note(self, text: str) -> None:
        self.verdict.notes.append(text)

    @staticmethod
    def inconclusive(why: str) -> None:
        raise Inconclusive(why)


def run(module: ModuleType, session: Session, *, rejected: str = "", review: list[str] | None = None,
        source: dict[str, str] | None = None) -> Verdict:
    """Grade one exercise: the module's ``judge`` against ``session`` (``rejected``: static refusal)."""
    v = Verdict(module.GRADE_ID, float(module.POINTS), summary=getattr(module, "SUMMARY", ""), review=list(review or []))
    t0 = time.perf_counter()
    if rejected:
        v.rejected = rejected
    else:
        g = Grader(v, source)
        try:
            session.reset()
        except (ChannelError, LearnerError) as e:
            g.dead = f"the kernel did not answer ({e})"
        with threads(1):  # the judge's own arithmetic never competes with the kernel for cores
            module.judge(session, g)
        if g.dead:  # a kernel that dies or hangs during an exercise fails the whole exercise, not only what followed
            for p in v.parts:
                p.passed, p.message = False, f"not graded: {g.dead}"
        declared = sum(p.points for p in v.parts)
        if abs(declared - v.points) > 1e-9:
            raise RuntimeError(f"{module.__name__}: parts add up to {declared} points, POINTS says {v.points}")
    v.seconds = time.perf_counter() - t0
    v.calls, v.channel_seconds = session.calls, session.channel_seconds
    return v


def not_run(module: ModuleType, why: str) -> Verdict:
    """The verdict of an exercise the judge could not reach (kernel stopped earlier, ...)."""
    v = Verdict(module.GRADE_ID, float(module.POINTS), summary=getattr(module, "SUMMARY", ""))
    v.parts.append(PartResult("all checks", float(module.POINTS), False, f"not graded: {why}"))
    return v


def failed_checks(verdict: Verdict) -> str:
    return "\n".join(verdict.messages)


def describe_parts(verdict: Verdict) -> list[dict[str, Any]]:
    return [{"name": p.name, "points": p.points, "passed": p.passed} for p in verdict.parts]

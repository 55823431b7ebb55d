"""One judge for every section's multiple-choice quiz: the answers are read from the kernel, the key stays here.

A section's ``quiz.py`` holds its key, its explanations and its named wrong answers, and builds its ``judge`` with
:func:`letter_quiz`. Only the letters cross the channel; whatever the kernel prints is never read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from course_judge.checks import assert_true

__all__ = ["LETTERS", "letter_quiz"]

LETTERS = ("a", "b", "c", "d")


def _well_formed(q: int, a: Any) -> None:
    assert_true(isinstance(a, str) and a in LETTERS,
                f"ANSWER_Q{q} must be one of 'a', 'b', 'c', 'd' (got {type(a).__name__} {str(a)[:40]!r})")


def letter_quiz(key: Mapping[int, str], *, topics: Mapping[int, str] | None = None,
                hints: Mapping[int, str] | None = None, per_question: float = 1.0,
                well_formed: float = 0.0) -> Callable[[Any, Any], None]:
    """The judge of a quiz whose answers are ``ANSWER_Q1 ...`` set to one letter each.

    ``per_question`` points per right answer; ``well_formed`` > 0 adds a part of that many points for every answer
    being a letter (checked first, so a malformed answer is named once). ``topics[q]`` names what question q is
    about (in the part's title and the hint); ``hints[q]`` overrides the hint of a wrong answer.
    """
    def hint(q: int) -> str:
        if hints and q in hints:
            return hints[q]
        if topics and q in topics:
            return f"reread the part on {topics[q]}"
        return "reread the part of the section it refers to"

    def title(q: int) -> str:
        return f"question {q}: {topics[q]}" if topics and q in topics else f"question {q}"

    def judge(k: Any, t: Any) -> None:
        given: dict[int, Any] = {}
        if well_formed:
            with t.part("answers are well-formed (one of 'a', 'b', 'c', 'd')", well_formed):
                for q in key:
                    given[q] = k.get(k.g[f"ANSWER_Q{q}"])
                for q, a in given.items():
                    _well_formed(q, a)
        for q, right in key.items():
            with t.part(title(q), per_question):
                a = given[q] if q in given else k.get(k.g[f"ANSWER_Q{q}"])
                if not well_formed:
                    _well_formed(q, a)
                assert_true(a == right, f"question {q} is answered incorrectly", hint=hint(q))

    return judge

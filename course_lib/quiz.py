"""Immediate quiz feedback without the key in the notebook.

A section's quiz key lives in its judge (``course_judge/sNN_name/quiz.py``: ``KEY`` and ``EXPLANATIONS``), never in
the learner's notebook. When the course is built, ``tools/nbsrc.py`` turns it into a given cell holding, per
question, a salt, a salted hash of the right answer and the explanation encrypted with a key derived from the right
answer (:func:`feedback_table`). So the release carries no readable key and no readable explanation: ``check``
hashes the learner's answer, says right or not, and only a right answer decrypts its explanation.

In a notebook (the given cell ``tools/nbsrc.py`` generates from a cell whose only line is ``#@quiz-feedback``)::

    QUIZ = Quiz("01_foundations", {1: ("<salt>", "<hash>", "<ciphertext>"), ...})
    QUIZ.check_all(globals())      # one line per question: right (with the explanation), not yet, or unanswered
    check(2, "c")                  # any single answer, at any time

While grading (``NBGRADER_EXECUTION`` set), or with ``COURSE_QUIZ_FEEDBACK=off``, ``check`` says that feedback
comes with the graded notebook and reveals nothing.

Salts: ``sha256("course-quiz|<build salt>|<section>|<question>")``, the build salt being ``$COURSE_QUIZ_SALT`` at
build time (empty by default, so a rebuild is byte-identical; set it to rotate the salts of a course offering).
This hides the key from reading, not from trying: four letters are four calls to ``check``, which is the point of
immediate feedback. The graded score comes from the judge, as always.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

__all__ = ["MARKER", "Quiz", "check", "feedback_table", "feedback_on"]

MARKER = "#@quiz-feedback"
CHOICES = ("a", "b", "c", "d")
_CURRENT: list[Quiz] = []


def _hash(salt: str, answer: str) -> str:
    return hashlib.sha256(f"course-quiz-check|{salt}|{answer}".encode()).hexdigest()


def _xor(data: bytes, salt: str, answer: str) -> bytes:
    key = hashlib.sha256(f"course-quiz-key|{salt}|{answer}".encode()).digest()
    stream = hashlib.shake_256(key).digest(len(data))
    return bytes(a ^ b for a, b in zip(data, stream))


def salt_for(section: str, question: int, build_salt: str | None = None) -> str:
    """The salt of one question of one build (see the module docstring)."""
    build = os.environ.get("COURSE_QUIZ_SALT", "") if build_salt is None else build_salt
    return hashlib.sha256(f"course-quiz|{build}|{section}|{question}".encode()).hexdigest()[:32]


def feedback_table(section: str, key: Mapping[int, str], explanations: Mapping[int, str],
                   build_salt: str | None = None) -> dict[int, tuple[str, str, str]]:
    """``{question: (salt, hash of the right answer, explanation encrypted with it)}`` (build time, from the judge)."""
    missing = set(key) - set(explanations)
    if missing:
        raise ValueError(f"{section}: no explanation for question(s) {sorted(missing)}")
    out = {}
    for q in sorted(key):
        salt = salt_for(section, q, build_salt)
        out[q] = (salt, _hash(salt, key[q]), _xor(explanations[q].encode(), salt, key[q]).hex())
    return out


def feedback_on() -> bool:
    """False while grading or with ``COURSE_QUIZ_FEEDBACK=off``."""
    return not os.environ.get("NBGRADER_EXECUTION") and os.environ.get("COURSE_QUIZ_FEEDBACK", "on").lower() != "off"


_OFF = "quiz: feedback comes with the graded notebook"


class Quiz:
    """One section's quiz table (salted hashes and ciphertexts); ``check`` a question's answer."""

    def __init__(self, section: str, table: Mapping[int, tuple[str, str, str]]) -> None:
        self.section = section
        self.table = {int(q): tuple(v) for q, v in table.items()}
        _CURRENT[:] = [self]

    def explanation(self, question: int, answer: object) -> str | None:
        """The explanation of ``question`` if ``answer`` is right, else None (works in any mode; ``check`` gates it)."""
        salt, digest, cipher = self.table[question]
        if not isinstance(answer, str) or _hash(salt, answer) != digest:
            return None
        return _xor(bytes.fromhex(cipher), salt, answer).decode()

    def check(self, question: int, answer: object) -> bool | None:
        """Print one line: right (and why), not yet, or the answer is not a letter. Returns True/False (None: no feedback)."""
        if not feedback_on():
            print(f"{_OFF} (Q{question})")
            return None
        if question not in self.table:
            raise KeyError(f"the quiz has questions {sorted(self.table)}, not {question!r}")
        if not (isinstance(answer, str) and answer in CHOICES):
            print(f"Q{question}: answer with one of {', '.join(repr(c) for c in CHOICES)} (got {answer!r:.40})")
            return False
        why = self.explanation(question, answer)
        if why is None:
            print(f"Q{question}: {answer!r} is not right; reread the part of the section it refers to, then try again")
            return False
        print(f"Q{question}: {answer!r} is right. {why}")
        return True

    def check_all(self, namespace: Mapping[str, object], prefix: str = "ANSWER_Q") -> None:
        """``check`` every question with ``namespace[f"{prefix}{n}"]``; one line each (one line in all while grading)."""
        if not feedback_on():
            print(_OFF)
            return
        for q in sorted(self.table):
            name = f"{prefix}{q}"
            if name not in namespace:
                print(f"Q{q}: not answered yet (set {name} in the cell above and run it)")
            else:
                self.check(q, namespace[name])


def check(question: int, answer: object) -> bool | None:
    """``Quiz.check`` on the quiz of the notebook's last feedback cell."""
    if not _CURRENT:
        raise RuntimeError("no quiz loaded: run the quiz's feedback cell first")
    return _CURRENT[0].check(question, answer)

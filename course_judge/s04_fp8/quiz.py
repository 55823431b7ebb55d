"""Section 4's quiz: five multiple-choice answers, checked against the key held here."""

from __future__ import annotations

from course_judge.checks import assert_true
from course_judge.local import Alternative, Mutant

GRADE_ID = "test_04_quiz"
POINTS = 5
ANSWERS = ("quiz_04_answers",)
SUMMARY = "each answer is one letter 'a'..'d'; 1 point per correct answer"
REFERENCE = ()
KEY = {1: "b", 2: "c", 3: "c", 4: "b", 5: "c"}


def judge(k, t):
    for q, key in KEY.items():
        with t.part(f"question {q}", 1):
            a = k.get(k.g[f"ANSWER_Q{q}"])
            assert_true(a in ("a", "b", "c", "d"), f"ANSWER_Q{q} must be one of 'a', 'b', 'c', 'd' (got {a!r:.40})")
            assert_true(a == key, f"question {q} is answered incorrectly", hint="reread the part of the section it refers to")


MUTANTS = [
    Mutant("Q1 wrong (E4M3 has infinities)", 'ANSWER_Q1 = "b"', 'ANSWER_Q1 = "c"', expect="question 1 is answered incorrectly"),
    Mutant("Q2 wrong (one scale per row)", 'ANSWER_Q2 = "c"', 'ANSWER_Q2 = "a"', expect="question 2 is answered incorrectly"),
    Mutant("Q4 wrong (FP8 products are inexact)", 'ANSWER_Q4 = "b"', 'ANSWER_Q4 = "a"', expect="question 4 is answered incorrectly"),
    Mutant("Q5 wrong (never grows back)", 'ANSWER_Q5 = "c"', 'ANSWER_Q5 = "a"', expect="question 5 is answered incorrectly"),
    Mutant("upper-case letter", 'ANSWER_Q3 = "c"', 'ANSWER_Q3 = "C"', expect="must be one of"),
    Mutant("answer missing", 'ANSWER_Q2 = "c"\n', "", expect="defines no 'ANSWER_Q2'"),
]

ALTERNATIVES = [Alternative("single quotes", 'ANSWER_Q1 = "b"', "ANSWER_Q1 = 'b'")]

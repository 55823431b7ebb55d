"""Section 2's quiz: four multiple-choice answers, checked against the key held here."""

from __future__ import annotations

from course_judge.checks import assert_true
from course_judge.local import Alternative, Mutant

GRADE_ID = "test_02_quiz"
POINTS = 4
ANSWERS = ("quiz_02_answers",)
SUMMARY = "each answer is one letter; 1 point per correct answer"
REFERENCE = ()
KEY = {1: "c", 2: "d", 3: "a", 4: "b"}
TOPIC = {1: "the latent cache (512 + 64)", 2: "decoupled RoPE", 3: "the softmax scale on both paths",
         4: "prefill vs decode cost of the two paths"}


def judge(k, t):
    for q, key in KEY.items():
        with t.part(f"question {q}", 1):
            a = k.get(k.g[f"ANSWER_Q{q}"])
            assert_true(a in ("a", "b", "c", "d"), f"ANSWER_Q{q} must be one of 'a', 'b', 'c', 'd' (got {a!r:.40})")
            assert_true(a == key, f"question {q} is answered incorrectly", hint=f"reread the part on {TOPIC[q]}")


MUTANTS = [
    Mutant("Q1 wrong", 'ANSWER_Q1 = "c"', 'ANSWER_Q1 = "a"', expect="question 1 is answered incorrectly"),
    Mutant("Q2 wrong", 'ANSWER_Q2 = "d"', 'ANSWER_Q2 = "b"', expect="question 2 is answered incorrectly"),
    Mutant("Q3 wrong", 'ANSWER_Q3 = "a"', 'ANSWER_Q3 = "c"', expect="question 3 is answered incorrectly"),
    Mutant("Q4 wrong", 'ANSWER_Q4 = "b"', 'ANSWER_Q4 = "a"', expect="question 4 is answered incorrectly"),
    Mutant("upper-case letter", 'ANSWER_Q2 = "d"', 'ANSWER_Q2 = "D"', expect="must be one of"),
    Mutant("answer with its text", 'ANSWER_Q3 = "a"', 'ANSWER_Q3 = "a) 1/sqrt(192)"', expect="must be one of"),
    Mutant("answer missing", 'ANSWER_Q4 = "b"\n', "", expect="defines no 'ANSWER_Q4'"),
]

ALTERNATIVES = [Alternative("single quotes", 'ANSWER_Q1 = "c"', "ANSWER_Q1 = 'c'")]

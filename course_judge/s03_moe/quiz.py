"""Section 3's quiz: four multiple-choice answers, checked against the key held here."""

from __future__ import annotations

from course_judge.local import Alternative, Mutant
from course_judge.quiz import letter_quiz

GRADE_ID = "test_03_quiz"
POINTS = 4
ANSWERS = ("quiz_03_answers",)
SUMMARY = "each answer is one letter; 1 point per correct answer"
REFERENCE = ()
KEY = {1: "b", 2: "c", 3: "a", 4: "d"}
# shown to the learner right after a right answer (tools/nbsrc.py encrypts each with its answer; see course_lib.quiz)
EXPLANATIONS = {
    1: 'V3 adds b_i to the affinities only to pick the top-k; each combine weight uses the unbiased sigmoid '
       'score, renormalised over the chosen experts. The bias steers load without changing what a chosen expert '
       'contributes.',
    2: '4 kept groups of 256 / 8 = 32 experts: the top-8 is chosen among 128 experts.',
    3: 'Selection ranks s + b, and the bias can make that negative. Experts of a dropped group set to 0 could '
       'then outrank kept experts, sending tokens outside their kept groups; -inf is never chosen.',
    4: 'The step is gamma * sign(mean - load_i): any load above the mean gives -1, however large the excess, so '
       'the bias falls by exactly gamma = 0.001.',
}
ABOUT = {
    1: "what the expert bias changes (3.2)",
    2: "how many candidates group-limited routing leaves (3.2)",
    3: "why dropped groups are masked with -inf (3.2)",
    4: "the size of one bias update (3.4)",
}


judge = letter_quiz(KEY, topics=ABOUT)


MUTANTS = [
    Mutant("Q1 wrong", 'ANSWER_Q1 = "b"', 'ANSWER_Q1 = "c"', expect="question 1 is answered incorrectly"),
    Mutant("Q2 wrong (all 256 experts)", 'ANSWER_Q2 = "c"', 'ANSWER_Q2 = "a"', expect="question 2 is answered incorrectly"),
    Mutant("Q3 wrong", 'ANSWER_Q3 = "a"', 'ANSWER_Q3 = "d"', expect="question 3 is answered incorrectly"),
    Mutant("Q4 proportional to the excess", 'ANSWER_Q4 = "d"', 'ANSWER_Q4 = "a"', expect="question 4 is answered incorrectly"),
    Mutant("upper-case letter", 'ANSWER_Q2 = "c"', 'ANSWER_Q2 = "C"', expect="must be one of"),
    Mutant("a number instead of a letter", 'ANSWER_Q3 = "a"', "ANSWER_Q3 = 1", expect="must be one of"),
    Mutant("answer missing", 'ANSWER_Q4 = "d"\n', "", expect="defines no 'ANSWER_Q4'"),
]

ALTERNATIVES = [Alternative("single quotes", 'ANSWER_Q1 = "b"', "ANSWER_Q1 = 'b'")]

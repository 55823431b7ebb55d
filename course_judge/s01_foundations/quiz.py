"""Section 1's quiz: five multiple-choice answers, checked against the key held here."""

from __future__ import annotations

from course_judge.local import Alternative, Mutant
from course_judge.quiz import letter_quiz

GRADE_ID = "test_01_quiz"
POINTS = 3
ANSWERS = ("quiz_01_answers",)
SUMMARY = "each answer is one letter; 0.5 points per correct answer, 0.5 for well-formed answers"
REFERENCE = ()
KEY = {1: "b", 2: "b", 3: "c", 4: "c", 5: "b"}
# shown to the learner right after a right answer (tools/nbsrc.py encrypts each with its answer: the release holds
# no readable key or explanation; see course_lib.quiz)
EXPLANATIONS = {
    1: "q.k sums d products; with unit-variance entries its variance is d. Dividing by sqrt(d) brings it back to 1, "
       "so the softmax neither saturates into a one-hot (vanishing gradients) nor depends on the head size.",
    2: "K and V are cached per KV head: 128 -> 8 heads is 16x fewer numbers per token. The 128 query heads stay; "
       "each group of 16 shares one KV head.",
    3: "Eckart-Young: ||W - W_r||_F = sqrt(sum_{i>r} sigma_i^2), the energy of the discarded singular values. "
       "sigma_{r+1} is the error in the spectral norm, not the Frobenius norm.",
    4: "DeepSeek-V3 keeps the sigmoid affinities of the k chosen experts and divides them by their sum (then "
       "multiplies by route_scale). A softmax over all experts was V2's gating; raw sigmoid scores do not sum to 1.",
    5: "float8_e4m3fn ('fn': finite, NaN only) has no infinities, so exponent 1111 still holds normal numbers and only "
       "S.1111.111 is NaN: the largest value is 2^(15-7) x 1.75 = 448. An IEEE-style E4M3 would stop at 240.",
}


judge = letter_quiz(KEY, per_question=0.5, well_formed=0.5)


MUTANTS = [
    Mutant("Q1 wrong", 'ANSWER_Q1 = "b"', 'ANSWER_Q1 = "a"', expect="question 1 is answered incorrectly"),
    Mutant("Q3 wrong", 'ANSWER_Q3 = "c"', 'ANSWER_Q3 = "b"', expect="question 3 is answered incorrectly"),
    Mutant("Q5 wrong", 'ANSWER_Q5 = "b"', 'ANSWER_Q5 = "d"', expect="question 5 is answered incorrectly"),
    Mutant("upper-case letter", 'ANSWER_Q2 = "b"', 'ANSWER_Q2 = "B"', expect="must be one of"),
    Mutant("answer missing", 'ANSWER_Q4 = "c"\n', "", expect="defines no 'ANSWER_Q4'"),
]

ALTERNATIVES = [Alternative("single quotes", 'ANSWER_Q1 = "b"', "ANSWER_Q1 = 'b'")]

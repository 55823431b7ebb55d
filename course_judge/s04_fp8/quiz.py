"""Section 4's quiz: five multiple-choice answers, checked against the key held here."""

from __future__ import annotations

from course_judge.local import Alternative, Mutant
from course_judge.quiz import letter_quiz

GRADE_ID = "test_04_quiz"
POINTS = 5
ANSWERS = ("quiz_04_answers",)
SUMMARY = "each answer is one letter 'a'..'d'; 1 point per correct answer"
REFERENCE = ()
KEY = {1: "b", 2: "c", 3: "c", 4: "b", 5: "c"}
# shown to the learner right after a right answer (tools/nbsrc.py encrypts each with its answer; see course_lib.quiz)
EXPLANATIONS = {
    1: "Per-tensor scaling needs E5M2's range because one scale covers values over many orders of magnitude. A "
       "scale per 1x128 tile or 128x128 block leaves each group a narrow range, so E4M3's extra mantissa bit is "
       'worth more than range.',
    2: 'One scale per row and per 128 columns: 7168 / 128 = 56 tiles in each of 4096 rows, a (4096, 56) scale '
       'tensor.',
    3: 'The outlier sets the scale (amax / 448), so ordinary values sit about 10^5 below the top of the grid: '
       'among the subnormals or flushed to zero, and their SQNR collapses. E4M3 saturates and has no infinities,'
       ' so nothing turns into NaN.',
    4: "DeepSeek-V3's report measures that the H800 tensor cores keep about 14 bits while accumulating FP8 "
       'products, so the error grows with the inner dimension K. Adding partial sums into FP32 registers every '
       '128 elements bounds it.',
    5: 'An overflow halves the scale and restarts the growth counter; GradScaler doubles the scale again after '
       'growth_interval = 2000 consecutive steps without an overflow.',
}


judge = letter_quiz(KEY)


MUTANTS = [
    Mutant("Q1 wrong (E4M3 has infinities)", 'ANSWER_Q1 = "b"', 'ANSWER_Q1 = "c"', expect="question 1 is answered incorrectly"),
    Mutant("Q2 wrong (one scale per row)", 'ANSWER_Q2 = "c"', 'ANSWER_Q2 = "a"', expect="question 2 is answered incorrectly"),
    Mutant("Q4 wrong (FP8 products are inexact)", 'ANSWER_Q4 = "b"', 'ANSWER_Q4 = "a"', expect="question 4 is answered incorrectly"),
    Mutant("Q5 wrong (never grows back)", 'ANSWER_Q5 = "c"', 'ANSWER_Q5 = "a"', expect="question 5 is answered incorrectly"),
    Mutant("upper-case letter", 'ANSWER_Q3 = "c"', 'ANSWER_Q3 = "C"', expect="must be one of"),
    Mutant("answer missing", 'ANSWER_Q2 = "c"\n', "", expect="defines no 'ANSWER_Q2'"),
]

ALTERNATIVES = [Alternative("single quotes", 'ANSWER_Q1 = "b"', "ANSWER_Q1 = 'b'")]

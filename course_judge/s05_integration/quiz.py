"""Section 5's quiz: five multiple-choice answers, checked against the key held here."""

from __future__ import annotations

from course_judge.local import Alternative, Mutant
from course_judge.quiz import letter_quiz

GRADE_ID = "test_05_quiz"
POINTS = 3
ANSWERS = ("quiz_05_answers",)
SUMMARY = "each answer is one letter; 0.5 points per correct answer, 0.5 for well-formed answers"
REFERENCE = ()
KEY = {1: "b", 2: "d", 3: "a", 4: "c", 5: "b"}
# shown to the learner right after a right answer (tools/nbsrc.py encrypts each with its answer; see course_lib.quiz)
EXPLANATIONS = {
    1: "Each MTP depth has its own projection and Transformer block and reuses the main model's embedding and "
       "output head: few extra parameters, and its predictions live in the same token space as the main head's.",
    2: 'Each of the 58 MoE layers runs 8 of its 256 routed experts (plus the shared one) per token, so most '
       'expert weights sit idle for any one token. Dense layers, attention and embeddings are a small share of '
       'the total.',
    3: "After the optimiser step each bias moves by plus or minus gamma towards balance, from the batch's loads."
       ' It never receives a gradient: that is what makes the method auxiliary-loss-free.',
    4: 'The absorbed path needs only c_KV (the normalised latent) and k^R (the rotated shared rope key) per '
       'token: W^UK is folded into the query and W^UV applied after the weighted sum.',
    5: "Depth 1 looks one token further than the main head: position i's main target is token i+1 (targets[:, "
       'i]), its depth-1 target token i+2, which is targets[:, i + 1].',
}


judge = letter_quiz(KEY, per_question=0.5, well_formed=0.5)


MUTANTS = [
    Mutant("Q1 wrong", 'ANSWER_Q1 = "b"', 'ANSWER_Q1 = "a"', expect="question 1 is answered incorrectly"),
    Mutant("Q2 wrong", 'ANSWER_Q2 = "d"', 'ANSWER_Q2 = "b"', expect="question 2 is answered incorrectly"),
    Mutant("Q5 wrong: t+1", 'ANSWER_Q5 = "b"', 'ANSWER_Q5 = "a"', expect="question 5 is answered incorrectly"),
    Mutant("upper-case letter", 'ANSWER_Q3 = "a"', 'ANSWER_Q3 = "A"', expect="must be one of"),
    Mutant("answer missing", 'ANSWER_Q4 = "c"\n', "", expect="defines no 'ANSWER_Q4'"),
    Mutant("a number", 'ANSWER_Q4 = "c"', "ANSWER_Q4 = 3", expect="must be one of"),
]

ALTERNATIVES = [Alternative("single quotes", 'ANSWER_Q1 = "b"', "ANSWER_Q1 = 'b'")]

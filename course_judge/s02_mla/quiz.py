"""Section 2's quiz: four multiple-choice answers, checked against the key held here."""

from __future__ import annotations

from course_judge.local import Alternative, Mutant
from course_judge.quiz import letter_quiz

GRADE_ID = "test_02_quiz"
POINTS = 4
ANSWERS = ("quiz_02_answers",)
SUMMARY = "each answer is one letter; 1 point per correct answer"
REFERENCE = ()
KEY = {1: "c", 2: "d", 3: "a", 4: "b"}
# shown to the learner right after a right answer (tools/nbsrc.py encrypts each with its answer; see course_lib.quiz)
EXPLANATIONS = {
    1: 'The absorbed cache holds the normalised latent c_KV (kv_lora_rank = 512) and the one rotary key k_pe '
       'shared by all heads (64): 576 numbers. 40,960 is a naive cache of per-head keys and values, 32,768 is '
       "MHA's.",
    2: 'Absorption rests on q_h . k_h = (W^UQ c_Q)^T W^UK c_KV being a product of fixed matrices. A rotation '
       "that depends on the key's position would sit between them and stop W^UK from folding into the query; a "
       'small separate rotary part keeps RoPE and the fold.',
    3: 'Both paths compute the same scores, so they share one scale: 1/sqrt(d_h + d_h^R) = 1/sqrt(192), the '
       'width of the head key [k_nope; k_pe]. The 576-wide latent is only another way of computing those scores.',
    4: 'At prefill every query meets every key: T^2 products per head, over 320 dims on the naive path and 1088 '
       'on the absorbed one. Rebuilding keys and values costs once per token (linear in T), so long prompts '
       'favour naive; absorption wins at decode.',
}
TOPIC = {1: "the latent cache (512 + 64)", 2: "decoupled RoPE", 3: "the softmax scale on both paths",
         4: "prefill vs decode cost of the two paths"}


judge = letter_quiz(KEY, topics=TOPIC)


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

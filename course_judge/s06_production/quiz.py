"""Section 6's quiz: four multiple-choice answers, checked against the key held here (1 point each)."""

from __future__ import annotations

from course_judge.local import Alternative, Mutant
from course_judge.quiz import letter_quiz

GRADE_ID = "test_06_quiz"
POINTS = 4
ANSWERS = ("quiz_06_answers",)
SUMMARY = "each answer is one letter; 1 point per correct answer"
REFERENCE = ()
KEY = {1: "b", 2: "c", 3: "c", 4: "a"}
# shown to the learner right after a right answer (tools/nbsrc.py encrypts each with its answer; see course_lib.quiz)
EXPLANATIONS = {
    1: 'An all-to-all of variable-size chunks needs the split sizes on both ends: exchanging the per-rank counts'
       ' first lets every rank allocate its receive buffer and set its output splits.',
    2: "ZeRO stage 1 partitions the optimiser states (the FP32 master weights and Adam's two moments) over the "
       'data-parallel ranks; every rank still holds the full BF16 weights and gradients.',
    3: 'A token still uses the same number of experts. With experts placed by node, keeping a token within a few'
       ' groups bounds the number of nodes it is sent to, so it crosses the slow inter-node links fewer times.',
    4: "Only each block's input is kept; its inner activations are recomputed in the backward pass, about one "
       'extra forward per step, for a large cut in activation memory.',
}
_WHY = {1: "reread 6.4.1: what must a rank know before all_to_all_single can allocate its output?",
        2: "reread the ZeRO-1 formula of 6.3: which states does it shard?",
        3: "reread 6.4.2: what does node-limited routing bound?",
        4: "reread 6.2.1: what does a checkpointed block keep, and what does it redo?"}


judge = letter_quiz(KEY, hints=_WHY)


MUTANTS = [
    Mutant("Q1 wrong", 'ANSWER_Q1 = "b"', 'ANSWER_Q1 = "a"', expect="question 1 is answered incorrectly"),
    Mutant("Q2 wrong: ZeRO shards everything", 'ANSWER_Q2 = "c"', 'ANSWER_Q2 = "a"', expect="question 2 is answered incorrectly"),
    Mutant("Q3 wrong", 'ANSWER_Q3 = "c"', 'ANSWER_Q3 = "a"', expect="question 3 is answered incorrectly"),
    Mutant("Q4 wrong", 'ANSWER_Q4 = "a"', 'ANSWER_Q4 = "c"', expect="question 4 is answered incorrectly"),
    Mutant("upper-case letter", 'ANSWER_Q2 = "c"', 'ANSWER_Q2 = "C"', expect="must be one of"),
    Mutant("a number instead of a letter", 'ANSWER_Q1 = "b"', "ANSWER_Q1 = 2", expect="must be one of"),
    Mutant("answer missing", 'ANSWER_Q4 = "a"\n', "", expect="defines no 'ANSWER_Q4'"),
]

ALTERNATIVES = [Alternative("single quotes", 'ANSWER_Q3 = "c"', "ANSWER_Q3 = 'c'")]

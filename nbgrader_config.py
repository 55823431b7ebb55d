"""nbgrader configuration for the DeepSeek-V3 from Scratch course (nbgrader 0.9.6).

Layout: source/A/A.ipynb -> release/A/A.ipynb (students) -> submitted/STUDENT/A/A.ipynb
-> autograded/STUDENT/A/ -> feedback/STUDENT/A/ and grades.csv. See README.md.
"""

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent

c = get_config()  # noqa: F821  (nbgrader injects get_config)

c.CourseDirectory.course_id = "deepseek-v3-from-scratch"
c.CourseDirectory.root = str(HERE)
c.CourseDirectory.solution_directory = "solutions"
c.CourseDirectory.db_url = f"sqlite:///{HERE / 'gradebook.db'}"
# Never copy a submitted course_lib/ (it would shadow the real package), caches or hidden files.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", ".*", "course_lib"]

c.ClearSolutions.code_stub = {
    "python": (
        "# YOUR CODE HERE: replace the next line with your answer (the text above says what it must do)\n"
        "raise NotImplementedError(\"exercise not implemented yet: write your code here\")"
    )
}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# Worked solutions: executed (figures show), hidden tests and solution markers stripped.
c.GenerateSolution.preprocessors = [
    "nbgrader.preprocessors.IncludeHeaderFooter",
    "nbgrader.preprocessors.LockCells",
    "nbgrader.preprocessors.ClearOutput",
    "nbgrader.preprocessors.ClearHiddenTests",
    "course_lib.grading.StripSolutionMarkers",
    "nbgrader.preprocessors.Execute",
]

# Per-cell time limits: graded benchmarks and training cells get longer; everything else must be quick.
c.Execute.timeout = 120
c.Execute.timeout_func = lambda cell: (
    300
    if str(cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", "")).startswith(("bench_", "train_"))
    else 120
)
c.Execute.interrupt_on_timeout = True
c.Execute.extra_arguments = []

# Noise that must not zero a graded cell: strip known-harmless stderr lines before scoring.
c.IgnorePattern.enabled = True
c.IgnorePattern.pattern = r"Warning|warnings\.warn|\d+%\|"

# Feedback handed to students hides hidden test source unless an instructor opts in.
c.GenerateFeedback.preprocessors = [
    "nbgrader.preprocessors.GetGrades",
    "course_lib.grading.HideHiddenTests",
    "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
    "nbgrader.preprocessors.ClearHiddenTests",
] if os.environ.get("COURSE_FEEDBACK_SHOW_HIDDEN") != "1" else [
    "nbgrader.preprocessors.GetGrades",
    "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
]

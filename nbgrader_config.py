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
# The gradebook: SQLite beside this file unless COURSE_DB_URL names another database, e.g.
# postgresql+psycopg2://grader@dbhost/gradebook (docs/GRADING.md, "A PostgreSQL gradebook"). Parallel graders wait
# for each other's SQLite writes (busy timeout) instead of failing. A throw-away course (make check, make verify, the
# tests' temporary courses) holds a .sqlite-gradebook file: it keeps its own SQLite gradebook whatever COURSE_DB_URL says.
_DB_URL = os.environ.get("COURSE_DB_URL", "").strip()
if not _DB_URL or (HERE / ".sqlite-gradebook").exists():
    _DB_URL = f"sqlite:///{HERE / 'gradebook.db'}?timeout=120"
c.CourseDirectory.db_url = _DB_URL
# Never copy a submitted course_lib/ (it would shadow the real package), caches or hidden files.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", ".*", "course_lib", "course_lib.py",
                            "__MACOSX"]

# Exchange: nbgrader's Assignment List in the learner's lab (`make lab` publishes every release/SECTION to
# EXCHANGE/COURSE_ID/outbound; release/SECTION counts as fetched; Submit copies it to inbound/, `nbgrader collect`
# files it under submitted/). Course-local by default; a shared (JupyterHub) exchange: set COURSE_EXCHANGE to its
# root and COURSE_ASSIGNMENT_DIR to where learners keep their copies.
c.Exchange.root = os.environ.get("COURSE_EXCHANGE", str(HERE / ".exchange"))
c.Exchange.assignment_dir = os.environ.get("COURSE_ASSIGNMENT_DIR", str(HERE / "release"))
if "COURSE_EXCHANGE" not in os.environ:
    c.Exchange.cache = str(HERE / ".exchange" / ".cache")  # the learner's submission records, kept with the course
# The exchange's permissions are nbgrader's own (docs/GRADING.md, "Running a class on JupyterHub"): the root is
# world-writable with the sticky bit (1777, made by the admin), COURSE/ and outbound/ 0755 (released notebooks are
# public), inbound/ 2733 (anyone may drop a submission, nobody but the instructor may list it), feedback/ 0711
# (a student reads only the file named by the hash of their own submission). Submissions themselves are made
# readable by the instructors' group only (course_lib/exchange.py), not world-readable as nbgrader leaves them.
c.ExchangeFactory.submit = "course_lib.exchange.PrivateSubmit"

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
    "course_judge.preprocessors.StripSolutionMarkers",
    "nbgrader.preprocessors.Execute",
]

# Per-cell time limits: graded benchmarks and training cells get longer; everything else must be quick.
# COURSE_CELL_TIMEOUT / COURSE_LONG_CELL_TIMEOUT override them (the test suite's bad submissions use short ones).
_CELL_S = int(os.environ.get("COURSE_CELL_TIMEOUT", 120))
_LONG_S = int(os.environ.get("COURSE_LONG_CELL_TIMEOUT", 300))
c.Execute.timeout = _CELL_S
c.Execute.timeout_func = lambda cell: (
    _LONG_S
    if str(cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", "")).startswith(("bench_", "train_"))
    else _CELL_S
)
c.Execute.interrupt_on_timeout = True
c.Execute.iopub_timeout = 20
c.Execute.extra_arguments = []
c.CourseExecute.notebook_timeout = int(os.environ.get("COURSE_NOTEBOOK_TIMEOUT", 1200))

# Autograde through the course's judge (course_judge/): course cells restored to the release (deleted, moved,
# edited or duplicated ones), student code in a bubblewrap sandbox with limits, and every graded cell scored by
# the judge module of its exercise, run here in the grader against the learner's objects (never in the kernel).
c.Autograde.sanitize_preprocessors = [
    "nbgrader.preprocessors.ClearOutput",
    "course_judge.preprocessors.RestoreSourceCells",
    "nbgrader.preprocessors.DeduplicateIds",
    "nbgrader.preprocessors.OverwriteKernelspec",
    "nbgrader.preprocessors.OverwriteCells",
    "nbgrader.preprocessors.CheckCellMetadata",
]
c.Autograde.autograde_preprocessors = [
    "course_judge.preprocessors.CourseExecute",
    "nbgrader.preprocessors.IgnorePattern",
    "nbconvert.preprocessors.ClearMetadataPreprocessor",
    "nbgrader.preprocessors.LimitOutput",
    "course_judge.preprocessors.CourseSaveAutoGrades",
    "nbgrader.preprocessors.AssignLatePenalties",
    "nbgrader.preprocessors.CheckCellMetadata",
]

# LMS downloads: `python tools/course.py collect SECTION` (or `nbgrader zip_collect SECTION`) reads the zip(s) in
# downloaded/SECTION/archive/ and files them under submitted/STUDENT/SECTION/. Names as Canvas writes them:
# `lastfirst_12345_67890_01_foundations.ipynb`, `lastfirst_LATE_12345_67890_01_foundations-1.ipynb`.
c.FileNameCollectorPlugin.named_regexp = r"^.*/(?P<student_id>[^/_]+)_(?:LATE_|late_)?(?:\d+_){2}(?P<file_id>[^/]+)$"

# Noise that must not zero a graded cell: strip known-harmless stderr lines before scoring.
c.IgnorePattern.enabled = True
c.IgnorePattern.pattern = r"Warning|warnings\.warn|\d+%\|"

# Feedback: the autograded notebook with the judge's report at each graded cell (no hidden test exists to hide).
c.GenerateFeedback.preprocessors = [
    "nbgrader.preprocessors.GetGrades",
    "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
]
# The course's feedback template (tools/jupyter/templates/feedback, extending nbgrader's): the table of contents names
# each exercise, no empty "Comments: No response." boxes, long assertion lines wrap, and math renders offline with
# the MathJax of the jupyter-server-mathjax package (served by the lab, or read from this venv for a file:// page).
# nbgrader's own template folder stays second so the Formgrader's templates are unchanged.
import importlib.util as _ilu  # noqa: E402

import nbgrader as _nbgrader  # noqa: E402


def _course_templates() -> list[str]:
    # A throw-away course (make check) holds only this file: find the templates next to the course_lib in use.
    spec = _ilu.find_spec("course_lib")
    roots = [HERE] + ([Path(spec.origin).resolve().parents[1]] if spec and spec.origin else [])
    return [str(r / "tools" / "jupyter" / "templates") for r in roots if (r / "tools" / "jupyter" / "templates").is_dir()][:1]


c.HTMLExporter.extra_template_basedirs = _course_templates() + [
    str(Path(_nbgrader.__file__).parent / "server_extensions" / "formgrader" / "templates"),
]
_mathjax = _ilu.find_spec("jupyter_server_mathjax")
if _mathjax and _mathjax.origin:
    c.HTMLExporter.mathjax_url = (Path(_mathjax.origin).parent / "static" / "MathJax.js").as_uri()

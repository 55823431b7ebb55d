"""The learner's JupyterLab (`make lab`): publish every release to the course's nbgrader exchange.

    python tools/lab.py publish     # release/SECTION/ -> EXCHANGE/COURSE_ID/outbound/SECTION/ (what
                                    # `nbgrader release_assignment` does, without needing a gradebook)
    python tools/lab.py where       # print the course id, the exchange root and the assignment folder
    python tools/lab.py feedback NB OUT.html   # a feedback page of NB with the course's template (no grading)

The course id and the exchange root come from nbgrader_config.py (``CourseDirectory.course_id``,
``Exchange.root``), so nbgrader's Assignment List in the lab lists every section, shows release/SECTION as
already fetched, and Submit copies the learner's notebook into the exchange's inbound/ (collected with
``nbgrader collect``). On JupyterHub the same config points at the shared exchange instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def course_config(root: Path = ROOT):
    from traitlets.config.loader import PyFileConfigLoader

    return PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config()


def sections(root: Path = ROOT) -> list[str]:
    return sorted(p.name for p in (root / "release").iterdir() if p.is_dir() and (p / f"{p.name}.ipynb").exists())


def publish(root: Path = ROOT) -> Path:
    cfg = course_config(root)
    course_id = cfg.CourseDirectory.course_id
    exchange = Path(cfg.Exchange.root)
    course = exchange / course_id
    for sub, mode in (("outbound", 0o755), ("inbound", 0o733), ("feedback", 0o711)):
        (course / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(course / sub, mode | (0o1000 if sub == "inbound" else 0))  # nbgrader's modes (inbound: sticky)
    for name in sections(root):
        dest = course / "outbound" / name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(root / "release" / name, dest, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    print(f"exchange: {len(sections(root))} sections of {course_id} published in {course / 'outbound'}")
    return course


def render_feedback(nb_path: Path, out: Path, root: Path = ROOT) -> Path:
    """A feedback page of ``nb_path`` made with the course's feedback template and nbgrader_config.py's exporter
    settings, without grading: every graded cell gets half its points and every answer nbgrader's automatic
    "No response." comment (the template must hide it). For looking at the template (and the browser tests)."""
    import nbformat
    import nbgrader
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    cfg = Config(course_config(root))
    cfg.HTMLExporter.template_name = "feedback"
    cfg.HTMLExporter.extra_template_paths = [
        str(Path(nbgrader.__file__).parent / "server_extensions" / "formgrader" / "static" / "node_modules" / "bootstrap" / "dist" / "css")]
    nb = nbformat.read(nb_path, as_version=4)
    score = total = 0.0
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade"):
            meta["score"] = float(meta.get("points", 0)) / 2
            score, total = score + meta["score"], total + float(meta.get("points", 0))
        if meta.get("solution"):
            meta["comment"] = "No response."
    res = {"nbgrader": {"notebook": nb_path.stem, "score": score, "max_score": total, "late_penalty": 0}}
    body, _ = HTMLExporter(config=cfg).from_notebook_node(nb, resources=res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["publish", "where", "feedback"])
    ap.add_argument("args", nargs="*")
    ns = ap.parse_args(argv)
    if ns.cmd == "publish":
        publish()
    elif ns.cmd == "feedback":
        print(render_feedback(Path(ns.args[0]), Path(ns.args[1])))
    else:
        cfg = course_config()
        print(f"course {cfg.CourseDirectory.course_id} | exchange {cfg.Exchange.root} | assignments {cfg.Exchange.assignment_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

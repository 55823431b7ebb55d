"""The learner's JupyterLab (`make lab`): publish every release to the course's nbgrader exchange.

    python tools/lab.py publish     # release/SECTION/ -> EXCHANGE/COURSE_ID/outbound/SECTION/ (what
                                    # `nbgrader release_assignment` does, without needing a gradebook)
    python tools/lab.py where       # print the course id, the exchange root and the assignment folder

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["publish", "where"])
    ns = ap.parse_args(argv)
    if ns.cmd == "publish":
        publish()
    else:
        cfg = course_config()
        print(f"course {cfg.CourseDirectory.course_id} | exchange {cfg.Exchange.root} | assignments {cfg.Exchange.assignment_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

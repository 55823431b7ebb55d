"""nbgrader's Submit for a shared (JupyterHub) exchange, with submissions only the instructors can read.

nbgrader 0.9.6 leaves a submission in ``EXCHANGE/COURSE/inbound/STUDENT+SECTION+TIME+RANDOM/`` world-readable
(files 0644, the folder 0777) and relies on the unlistable inbound/ (mode 2733) to hide its name. This class
keeps nbgrader's copy and drops every permission for others: the folder becomes 0770 and its files 0640, all of
them in inbound/'s group (inbound/ is set-group-id, so that is the group of the instructor who released the
section). Another student cannot read a submission even knowing its path; the instructors' ``nbgrader collect``
still can.

The group is inherited at creation only, and the student is not a member of it (so cannot chgrp later):
``shutil.copytree`` ends by copying the learner's folder mode onto the new folder, which clears its set-group-id
bit, and nbgrader then writes timestamp.txt and submission_secret.txt in it. So the copy goes into a staging
folder inside the submission folder and is moved up, and those two files are made beforehand (nbgrader's
``open(..., "w")`` keeps an existing file's group).

Selected in nbgrader_config.py: ``c.ExchangeFactory.submit = "course_lib.exchange.PrivateSubmit"``. It runs in
the learner's Jupyter server (Assignment List > Submit, or ``nbgrader submit``), never in a grading kernel.
"""

from __future__ import annotations

import os
import stat

from nbgrader.exchange.default.submit import ExchangeSubmit

OTHERS = stat.S_IRWXO
NBGRADER_WRITES = ("timestamp.txt", "submission_secret.txt")  # after the copy, into the submission folder


class PrivateSubmit(ExchangeSubmit):
    """``nbgrader submit`` whose inbound copy is readable by its owner and inbound/'s group only."""

    def set_perms(self, dest: str, fileperms: int, dirperms: int) -> None:
        super().set_perms(dest, fileperms & ~OTHERS, dirperms & ~OTHERS)

    def do_copy(self, src: str, dest: str, log=None) -> None:
        if os.path.dirname(os.path.abspath(dest)) != os.path.abspath(self.inbound_path):
            super().do_copy(src, dest, log)  # the learner's own cache
            return
        os.mkdir(dest, 0o770)  # group and set-group-id from inbound/
        for name in NBGRADER_WRITES:
            open(os.path.join(dest, name), "x").close()
        staging = os.path.join(dest, ".staging")
        super().do_copy(src, staging, log)  # made inside dest: its files get dest's group
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(dest, name))
        os.rmdir(staging)

    def copy_files(self) -> None:
        super().copy_files()  # ends with chmod 0777 on the submission folder ("so the instructor can delete it")
        dest = os.path.join(self.inbound_path, self.assignment_filename)
        os.chmod(dest, stat.S_IRWXU | stat.S_IRWXG)

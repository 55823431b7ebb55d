"""A throw-away PostgreSQL server for tests: Debian's binaries, a temporary data directory, loopback only.

``PgServer.start()`` runs ``initdb`` and ``postgres`` as an unprivileged user (``postgres`` when the test runs as
root, which the server refuses, else the current user), listening on 127.0.0.1 at a free port of ``ports`` with
its unix socket in the temporary directory, password (SCRAM) authentication on TCP. ``stop()`` shuts it down and
removes every file; the server also dies with the test process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NEEDED = ("initdb", "postgres", "pg_ctl")


def _version(d: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", d.parent.name)) or (0,)


def bin_dir() -> Path | None:
    """The folder holding initdb, postgres and pg_ctl: PG_BINDIR, Debian's newest /usr/lib/postgresql/N/bin, or PATH's.

    On Debian only wrappers (pg_ctlcluster) are on PATH; a /usr/local/bin/initdb is often a link into
    /usr/lib/postgresql/N/bin, so links are resolved and the three programs must sit side by side.
    """
    cands: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        cands.append(Path(os.environ["PG_BINDIR"]))
    cands += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True)
    found = shutil.which("initdb")
    if found:
        cands.append(Path(found).resolve().parent)
    for d in cands:
        if all(os.access(d / n, os.X_OK) for n in NEEDED):
            return d
    return None


def free_port(ports: range) -> int:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1} on 127.0.0.1")


def _die_with_parent() -> None:
    with contextlib.suppress(OSError):  # (ctypes is imported above: an import here, after fork, can fail)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class PgServer:
    ports: range
    bindir: Path = field(default_factory=lambda: bin_dir() or Path("/nonexistent"))
    superuser: str = "course_admin"
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    tmp: Path | None = None
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def user_kw(self) -> dict:
        """Popen arguments that run a program as the unprivileged server user."""
        if os.geteuid() != 0:
            return {}
        import pwd

        pw = pwd.getpwnam("postgres")
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _run(self, *argv: str) -> None:
        proc = subprocess.run([str(self.bindir / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120,
                              cwd=self.tmp, **self.user_kw)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def start(self) -> PgServer:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> PgServer:
        self.tmp = Path(tempfile.mkdtemp(prefix="pg-gradebook-"))
        kw = self.user_kw
        if kw:
            os.chown(self.tmp, kw["user"], kw["group"])
        data = self.tmp / "data"
        pwfile = self.tmp / "pw"
        pwfile.write_text(self.password + "\n")
        if kw:
            os.chown(pwfile, kw["user"], kw["group"])
        self._run("initdb", "-D", str(data), "-U", self.superuser, f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
                  "--auth-local=peer", "-E", "UTF8", "--no-instructions")
        pwfile.unlink()
        self.port = free_port(self.ports)
        log = open(self.tmp / "server.log", "w")  # noqa: SIM115 - the server writes it for its whole life
        if kw:
            os.chown(log.name, kw["user"], kw["group"])
        self.proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(data), "-c", "listen_addresses=127.0.0.1", "-p", str(self.port),
             "-c", f"unix_socket_directories={self.tmp}", "-c", "fsync=off", "-c", "max_connections=40"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp, preexec_fn=_die_with_parent, **kw)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60) -> None:
        import psycopg2

        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}): {self.log()[-3000:]}")
            try:
                psycopg2.connect(self.dsn("postgres", self.superuser, self.password)).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not ready after {timeout:.0f} s: {self.log()[-3000:]}") from None
                time.sleep(0.2)

    def log(self) -> str:
        p = self.tmp / "server.log" if self.tmp else None
        return p.read_text(errors="replace") if p and p.exists() else ""

    def dsn(self, db: str, user: str, password: str) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={db} user={user} password={password} connect_timeout=10"

    def url(self, db: str, user: str) -> str:
        """The SQLAlchemy URL of a database (what COURSE_DB_URL takes); libpq finds the password in PGPASSFILE."""
        return f"postgresql+psycopg2://{user}@127.0.0.1:{self.port}/{db}"

    def pgpass_line(self, db: str, user: str, password: str) -> str:
        return f"127.0.0.1:{self.port}:{db}:{user}:{password}\n"

    def sql(self, *statements: str, db: str = "postgres") -> None:
        """Run statements as the superuser (autocommit: CREATE DATABASE cannot run in a transaction)."""
        import psycopg2

        con = psycopg2.connect(self.dsn(db, self.superuser, self.password))
        try:
            con.autocommit = True
            with con.cursor() as cur:
                for s in statements:
                    cur.execute(s)
        finally:
            con.close()

    def create_database(self, name: str, owner: str, password: str) -> None:
        """A login role and an empty database it owns (what createuser and createdb do in docs/GRADING.md)."""
        self.sql(f"CREATE ROLE {owner} LOGIN PASSWORD '{password}'", f"CREATE DATABASE {name} OWNER {owner}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT), a kill if it hangs, then every file removed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

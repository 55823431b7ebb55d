"""JupyterHub on one machine for a class of this course: unix accounts (PAM), one JupyterLab per user started as
that user (LocalProcessSpawner), nbgrader's shared exchange. Run as root from the course venv:

    COURSE_INSTRUCTORS=alice COURSE_STUDENTS=bob,carol COURSE_ROOT=/home/alice/course \\
    COURSE_SHARE=/srv/course COURSE_EXCHANGE=/srv/nbgrader/exchange \\
      .venv/bin/jupyterhub -f tools/jupyter/jupyterhub_config.py

Knobs (environment):
  COURSE_INSTRUCTORS, COURSE_STUDENTS   comma-separated unix user names (the only ones allowed to log in)
  COURSE_ROOT       the instructors' course folder (their server's PYTHONPATH, Jupyter config path and start folder:
                    the Formgrader and `nbgrader` read its nbgrader_config.py); default: this checkout
  COURSE_SHARE      what students' servers read: a copy of course_lib/ and nbgrader_config.py, readable by all
                    (never source/, solutions/, course_judge/ or the gradebook); default: COURSE_ROOT
  COURSE_EXCHANGE   nbgrader's exchange root (mode 1777); default /srv/nbgrader/exchange
  COURSE_HUB_URL    the public address (default http://:8000); COURSE_HUB_PORT the hub's API port (8081),
  COURSE_PROXY_API_PORT the proxy's API port (8001); COURSE_SPAWN_PORTS e.g. 18010-18020 (default: any free port)
  COURSE_HUB_STATE  folder for the hub's database, cookie secret and proxy pid file (default: the working folder)
  COURSE_HUB_DUMMY_PASSWORD   use JupyterHub's DummyAuthenticator with this shared password instead of PAM
                    (a machine without PAM logins); COURSE_HUB_ADMIN_INSTRUCTORS=1 makes instructors hub admins

Students' servers start in their home folder, where the Assignment List fetches sections (COURSE_ASSIGNMENT_DIR).
See docs/GRADING.md, "Running a class on JupyterHub".
"""

import os
import pwd
import socket
import sys
from pathlib import Path

c = get_config()  # noqa: F821  (JupyterHub injects get_config)

HERE = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
ENV = os.environ


def _names(var: str) -> set[str]:
    return {n.strip() for n in ENV.get(var, "").split(",") if n.strip()}


INSTRUCTORS, STUDENTS = _names("COURSE_INSTRUCTORS"), _names("COURSE_STUDENTS")
COURSE_ROOT = ENV.get("COURSE_ROOT", str(HERE))
SHARE = ENV.get("COURSE_SHARE", COURSE_ROOT)
EXCHANGE = ENV.get("COURSE_EXCHANGE", "/srv/nbgrader/exchange")
STATE = Path(ENV.get("COURSE_HUB_STATE", os.getcwd()))

c.JupyterHub.bind_url = ENV.get("COURSE_HUB_URL", "http://:8000")
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(ENV.get("COURSE_HUB_PORT", 8081))
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{int(ENV.get('COURSE_PROXY_API_PORT', 8001))}"
c.ConfigurableHTTPProxy.pid_file = str(STATE / "jupyterhub-proxy.pid")
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
c.JupyterHub.cleanup_servers = True  # the hub stops its users' servers when it stops

if ENV.get("COURSE_HUB_DUMMY_PASSWORD"):
    c.JupyterHub.authenticator_class = "dummy"
    c.DummyAuthenticator.password = ENV["COURSE_HUB_DUMMY_PASSWORD"]
else:
    c.JupyterHub.authenticator_class = "pam"
c.Authenticator.allowed_users = INSTRUCTORS | STUDENTS
if ENV.get("COURSE_HUB_ADMIN_INSTRUCTORS") == "1":
    c.Authenticator.admin_users = set(INSTRUCTORS)
c.JupyterHub.load_groups = {"instructors": {"users": sorted(INSTRUCTORS)}, "students": {"users": sorted(STUDENTS)}}

c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = [str(VENV_BIN / "jupyterhub-singleuser")]
c.Spawner.default_url = "/lab"
c.Spawner.notebook_dir = "~"
c.Spawner.http_timeout = 180  # a busy 2-core machine starts JupyterLab slowly
c.Spawner.start_timeout = 180


def _is_instructor(spawner) -> bool:
    return spawner.user.name in INSTRUCTORS


def _course_path(spawner) -> str:
    return COURSE_ROOT if _is_instructor(spawner) else SHARE


c.Spawner.environment = {
    "PATH": os.pathsep.join([str(VENV_BIN), "/usr/local/bin", "/usr/bin", "/bin"]),
    "PYTHONPATH": _course_path,  # course_lib (and, for instructors, course_judge and tools)
    "JUPYTER_CONFIG_PATH": _course_path,  # nbgrader_config.py: course id, exchange, Submit's permissions
    "COURSE_EXCHANGE": EXCHANGE,
    "COURSE_ASSIGNMENT_DIR": lambda spawner: COURSE_ROOT if _is_instructor(spawner) else pwd.getpwnam(spawner.user.name).pw_dir,
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
}


def _spawn_ports() -> list[int]:
    lo, _, hi = ENV.get("COURSE_SPAWN_PORTS", "").partition("-")
    return list(range(int(lo), int(hi or lo) + 1)) if lo else []


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_GIVEN: dict[str, int] = {}  # user -> port: servers starting at once never get the same port


def _pick_port(spawner) -> None:
    """Each single-user server on a free port of COURSE_SPAWN_PORTS (else LocalProcessSpawner picks any)."""
    ports = _spawn_ports()
    if not ports:
        return
    others = {p for name, p in _GIVEN.items() if name != spawner.user.name}
    spawner.port = next((p for p in ports if p not in others and _free(p)), 0)
    _GIVEN[spawner.user.name] = spawner.port
    if not spawner.port:
        raise RuntimeError(f"no free port in COURSE_SPAWN_PORTS={ENV['COURSE_SPAWN_PORTS']}")


c.Spawner.pre_spawn_hook = _pick_port

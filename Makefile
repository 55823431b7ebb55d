# DeepSeek-V3 from Scratch: one Makefile for students, instructors and CI.
# Every target installs what it needs on first use (into .venv/).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The stamp names a hash of the dependency files: an unchanged venv is reused (also from another clone).
DEPS_HASH := $(shell cat requirements.txt pyproject.toml | md5sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
COURSE := $(PY) tools/course.py
SECTIONS := $(notdir $(wildcard source/[0-9][0-9]_*))
export PATH := $(abspath $(VENV))/bin:$(PATH)
export MPLBACKEND ?= Agg
export PYTHONHASHSEED := 0
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning makes small ops 30x slower.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: help install lab test-browser source release publish solutions samples autograde collect feedback grades db-upgrade demo check verify test test-fast checkpoints bench gpu-check lint clean

help:
	@echo "make demo      build releases, autograde sample submissions, print the grade table"
	@echo "make test      the whole test suite"
	@echo "make lab       JupyterLab on the course, opened at release/ (students) [LAB_PORT= LAB_TOKEN= LAB_DIR= LAB_OPTS=]"
	@echo "make check NB=path/to/notebook.ipynb [SECTION=02_mla]   grade one notebook (self-learners)"
	@echo "make install source release solutions autograde feedback grades db-upgrade bench gpu-check lint clean"
	@echo "make release EXCHANGE=/srv/nbgrader/exchange [SECTION=01_foundations]   also publish to nbgrader's exchange"
	@echo "make publish [EXCHANGE=...] [SECTION=...]   release, then nbgrader release_assignment (COURSE_EXCHANGE or .exchange/)"
	@echo "make autograde [FORCE=1] [SECTION=02_mla]   grade every submitted/STUDENT/SECTION (unchanged ones skipped)"
	@echo "make collect SECTION=02_mla   LMS zip(s) in downloaded/SECTION/archive/ -> submitted/ (nbgrader zip_collect)"

install: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
	  apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; } || true
	@command -v chromium >/dev/null 2>&1 || echo "note: chromium is missing: the browser tests are skipped (install it: apt-get install chromium)"
	@command -v bwrap >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
	  apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; } || true
	@command -v bwrap >/dev/null 2>&1 || echo "note: bubblewrap is missing: grading runs UNSANDBOXED (install it: apt-get install bubblewrap)"
	@# JupyterHub's proxy (tests/test_hub.py; docs/GRADING.md "Running a class on JupyterHub"), and setfacl, with which
	@# the hub test lets its unix users reach this venv's interpreter (e.g. under /root) and nothing else.
	@command -v configurable-http-proxy >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v npm >/dev/null 2>&1 || \
	  npm install -g --silent configurable-http-proxy >/dev/null 2>&1 || true
	@command -v configurable-http-proxy >/dev/null 2>&1 || echo "note: configurable-http-proxy is missing: the hub test is skipped (npm install -g configurable-http-proxy)"
	@command -v setfacl >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
	  apt-get install -y -qq acl >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq acl >/dev/null 2>&1; } || true
	@# PostgreSQL: only tests/test_pg_gradebook.py needs the server (its own, in a temporary folder); courses use SQLite by default.
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
	  apt-get install -y -qq postgresql >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq postgresql >/dev/null 2>&1; } || true
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  echo "note: PostgreSQL is missing: the PostgreSQL gradebook test is skipped (install it: apt-get install postgresql)"

$(STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (3.10+)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . || \
	  $(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@# The display name must equal tools/nbsrc.py's KERNELSPEC, or JupyterLab marks every notebook modified on open.
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (DeepSeek-V3 course)" >/dev/null
	-$(VENV)/bin/jupyter server extension enable --sys-prefix --py nbgrader >/dev/null 2>&1
	-$(VENV)/bin/jupyter labextension enable --level=sys_prefix nbgrader >/dev/null 2>&1
	$(PY) -c "import torch, nbgrader; print('installed: torch', torch.__version__, '| nbgrader', nbgrader.__version__)"
	touch $(STAMP)

# JupyterLab for learners. Knobs: LAB_PORT, LAB_TOKEN (empty: Jupyter makes one and prints the URL), LAB_DIR (the
# server's root: the course folder, so README.md, the Formgrader and nbgrader's panels work), LAB_OPEN (the folder
# it opens), LAB_OPTS (more jupyter options, e.g. --no-browser). Kernels draw figures inline (MPLBACKEND unset),
# import this checkout's course_lib, and nbgrader's Assignment List reads nbgrader_config.py (its exchange).
LAB_PORT ?= 8888
LAB_TOKEN ?=
LAB_DIR ?= $(CURDIR)
LAB_OPEN ?= release
LAB_OPTS ?=
lab: install
	$(PY) tools/lab.py publish
	env -u MPLBACKEND PYTHONPATH=$(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH)) JUPYTER_CONFIG_PATH=$(CURDIR)$(if $(JUPYTER_CONFIG_PATH),:$(JUPYTER_CONFIG_PATH)) \
	  $(VENV)/bin/jupyter lab --notebook-dir="$(LAB_DIR)" --port=$(LAB_PORT) --LabApp.default_url=/lab/tree/$(LAB_OPEN) \
	  --LabApp.app_settings_dir=$(CURDIR)/tools/jupyter/settings \
	  $(if $(LAB_TOKEN),--IdentityProvider.token=$(LAB_TOKEN)) $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_OPTS)

source: install
	$(PY) tools/nbsrc.py build

# EXCHANGE=DIR (or `make publish`, which defaults to COURSE_EXCHANGE or the course-local .exchange/) also publishes
# the releases to nbgrader's exchange with `nbgrader release_assignment`; SECTION= limits both to one section.
release: source
	$(COURSE) release $(SECTION) $(if $(EXCHANGE),--exchange "$(EXCHANGE)")

publish: source
	$(COURSE) release $(SECTION) --exchange "$(or $(EXCHANGE),$(COURSE_EXCHANGE),$(CURDIR)/.exchange)"

solutions: source
	$(COURSE) solutions

samples: install
	$(COURSE) samples

autograde: install
	$(COURSE) autograde $(if $(FORCE),--force) $(SECTION)

collect: install
	@test -n "$(SECTION)" || { echo "usage: make collect SECTION=01_foundations  (LMS zips in downloaded/SECTION/archive/)"; exit 2; }
	$(COURSE) collect $(SECTION)

feedback: install
	$(COURSE) feedback

grades: install
	$(COURSE) grades

# The gradebook (SQLite, or COURSE_DB_URL's database): tables created if missing, then nbgrader's migrations.
db-upgrade: install
	$(COURSE) db-upgrade

demo: install
	$(PY) tools/nbsrc.py check
	$(COURSE) demo

check: install
	@test -n "$(NB)" || { echo "usage: make check NB=path/to/notebook.ipynb [SECTION=02_mla]"; exit 2; }
	$(COURSE) check "$(NB)" $(if $(SECTION),--section $(SECTION))

verify: install
	$(COURSE) verify $(SECTION)

# Three phases: unit and static tests on both cores, then the real-nbgrader pipeline alone, so each graded
# notebook gets the machine it is budgeted for (<= 90 s on 2 cores), then the browser suite (headless Chromium
# against the server `make lab` starts, in a fresh copy; screenshots in .cache/screenshots/).
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not pipeline and not browser" tests
	$(PY) -m pytest -q -m pipeline tests
	$(PY) -m pytest -q -m browser tests

test-fast: install
	$(PY) -m pytest -q -n 2 -m "not pipeline and not browser" tests

test-browser: install
	$(PY) -m pytest -q -m browser tests

# Section 5's recorded comparison runs (course_lib/checkpoints/05_integration_runs.json), about 7 minutes.
checkpoints: install
	$(PY) tools/train_checkpoints.py --jobs 2

bench: install
	$(PY) tools/bench_report.py

# GPU machines bring their own CUDA torch: no install step, the repo on PYTHONPATH.
gpu-check:
	mkdir -p bench
	set -o pipefail; PYTHONPATH=$(CURDIR) $(if $(wildcard $(PY)),$(PY),python3) tools/gpu_check.py --out bench/gpu_check.json \
	  | tee bench/gpu_check_log.txt

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf submitted feedback gradebook.db grades.csv .pytest_cache .ruff_cache
	find autograded -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
	find . -name __pycache__ -not -path "./$(VENV)/*" -exec rm -rf {} +

"""The grading sandbox, the grading guard and hidden-test redaction.

- unit tests (fast): sandbox status and fallbacks, the kernel's environment and bubblewrap command line,
  the guard in an in-process IPython shell, redaction of hidden test source in feedback;
- one real sandboxed kernel (nbclient + SandboxKernelManager);
- the attack notebooks of tests/grading_corpus.py, graded with everything else by the batch: none reads
  a hidden test, the gradebook or another submission, reaches a network, writes outside its sandbox,
  or changes a grade.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grading_corpus as gc
import nbformat
import pytest
from conftest import ROOT
from course_lib.guard import guard_source

from course_lib import grading, sandbox

BWRAP_OK, BWRAP_HOW = sandbox._probe()
needs_bwrap = pytest.mark.skipif(not BWRAP_OK, reason=f"no sandbox here: {BWRAP_HOW}")


# ------------------------------------------------------------------ sandbox configuration (fast)


def test_sandbox_status_modes(monkeypatch):
    monkeypatch.setenv("COURSE_SANDBOX", "off")
    ok, how = sandbox.sandbox_status()
    assert not ok and "student code runs with the grader's permissions" in how
    monkeypatch.setenv("COURSE_SANDBOX", "bogus")
    with pytest.raises(ValueError):
        sandbox.mode()
    monkeypatch.setattr(sandbox, "_probe", lambda: (False, "bubblewrap (bwrap) is not installed"))
    monkeypatch.setenv("COURSE_SANDBOX", "auto")
    ok, how = sandbox.sandbox_status()
    assert not ok and how.startswith("UNSANDBOXED")
    monkeypatch.setenv("COURSE_SANDBOX", "require")
    with pytest.raises(RuntimeError, match="unavailable"):
        sandbox.sandbox_status()


def test_kernel_environment_keeps_no_grader_secrets():
    env = {"PATH": "/usr/bin", "HOME": "/root", "AWS_SECRET_ACCESS_KEY": "x", "GITHUB_TOKEN": "y", "COURSE_ROOT": "/course",
           "COURSE_DIAG_FILE": "/course/d", "COURSE_GRADER_LOCK": "/l", "COURSE_BENCH_LOCK": "/b", "COURSE_TIMING_FILE": "/t",
           "NBGRADER_EXECUTION": "autograde", "PYTHONPATH": "/repo"}
    out = sandbox.clean_env(env)
    for k in ("AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "COURSE_ROOT", "COURSE_DIAG_FILE", "COURSE_GRADER_LOCK", "COURSE_BENCH_LOCK"):
        assert k not in out, k
    assert out["HOME"] == "/tmp/home" and out["NBGRADER_EXECUTION"] == "autograde" and out["COURSE_TIMING_FILE"] == "/t"


def test_bwrap_command_line_isolates(tmp_path):
    work, copy, rt = tmp_path / "course" / "autograded" / "s" / "A", tmp_path / "copy", tmp_path / "rt"
    argv = sandbox.bwrap_argv([sys.executable, "-m", "ipykernel_launcher", "-f", str(rt / "k.json")], workdir=work,
                              work_copy=copy, runtime=rt, env=sandbox.clean_env(dict(os.environ)))
    for flag in ("--unshare-net", "--unshare-pid", "--die-with-parent", "--clearenv", "--tmpfs"):
        assert flag in argv
    binds = [(argv[i], argv[i + 1], argv[i + 2]) for i in range(len(argv) - 2) if argv[i] in ("--bind", "--ro-bind")]
    writable = [src for kind, src, _ in binds if kind == "--bind"]
    assert set(writable) == {str(rt), str(copy)}, writable
    assert (str(copy), str(work)) in [(s, d) for k, s, d in binds if k == "--bind"], "the working copy is mounted at the workdir"
    for _, src, _ in binds:
        assert not src.startswith(str(ROOT / "source")) and "gradebook" not in src and src not in ("/", "/root", "/home", str(ROOT))
    assert argv[argv.index("--") + 1: argv.index("--") + 3] == [sys.executable, "-I"], "limits are applied inside the sandbox"


def test_working_copy_leaves_notebooks_out(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "A.ipynb").write_text("{}")
    (tmp_path / "src" / "data.csv").write_text("1")
    sandbox.working_copy(tmp_path / "src", tmp_path / "dst")
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["data.csv"]


# ------------------------------------------------------------------ the grading guard (in-process IPython, fast)


@pytest.fixture()
def shell():
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_cell("import torch\nimport torch.nn.functional as F\nimport course_lib.testing\nimport course_lib.utils")
    yield ip
    ip.run_cell("import course_lib.testing, importlib; importlib.reload(course_lib.testing)")
    ip.input_transformers_post.clear()
    ip.ast_transformers.clear()
    ip.set_custom_exc((), None)
    InteractiveShell.clear_instance()


def _guard(ip, capsys) -> tuple[bool, str]:
    src = guard_source("n0nce", grading._lib_roots(), "import torch\nimport torch.nn.functional as F")
    res = ip.run_cell(src)
    return res.success, capsys.readouterr().out


def test_guard_passes_a_clean_kernel(shell, capsys):
    ok, out = _guard(shell, capsys)
    assert ok and "[grading guard] ok n0nce" in out and "restored" not in out, out


def test_guard_restores_monkeypatched_helpers_and_names(shell, capsys):
    shell.run_cell("import course_lib.testing as T\nT.assert_close = lambda *a, **k: None\nF = object()")
    ok, out = _guard(shell, capsys)
    assert ok and "course_lib.testing" in out and "name F" in out, out
    res = shell.run_cell("from course_lib.testing import assert_close\nassert_close(torch.zeros(2), torch.ones(2))")
    assert not res.success, "the restored assert_close must fail on different tensors"
    assert shell.user_ns["F"] is sys.modules["torch.nn.functional"]


def test_guard_removes_ipython_hooks(shell, capsys):
    shell.run_cell("import ast\nget_ipython().input_transformers_post.append(lambda ls: [] if any('assert' in x for x in ls) else ls)\n"
                   "class W(ast.NodeTransformer):\n    pass\nget_ipython().ast_transformers.append(W())\n"
                   "get_ipython().set_custom_exc((Exception,), lambda *a, **k: None)\n"
                   "get_ipython().events.register('pre_run_cell', lambda info: None)")
    ok, out = _guard(shell, capsys)
    assert ok, out
    for what in ("input transformer", "AST transformer", "custom exception handler", "pre_run_cell callback"):
        assert what in out, (what, out)
    res = shell.run_cell("assert False, 'tests run again'")
    assert not res.success


def test_guard_refuses_replaced_torch_and_threads(shell, capsys):
    shell.run_cell("_orig = torch.allclose\ntorch.allclose = lambda *a, **k: True")
    try:
        ok, out = _guard(shell, capsys)
    finally:
        shell.run_cell("torch.allclose = _orig")  # this process's torch is shared with every other test
    assert not ok, out
    shell.run_cell("import threading, time\nthreading.Thread(target=lambda: time.sleep(3), daemon=True).start()")
    ok, out = _guard(shell, capsys)
    assert not ok, "a background thread from the submission must be refused"


# ------------------------------------------------------------------ feedback redaction and scoring (fast)


def test_feedback_redacts_outputs_quoting_hidden_lines():
    secret = "_oracle = compute_the_secret_answer(seed=1234)"
    test = nbformat.v4.new_code_cell(f"# visible part\n### BEGIN HIDDEN TESTS\n{secret}\nassert f() == _oracle\n### END HIDDEN TESTS")
    test.metadata["nbgrader"] = {"grade": True, "grade_id": "t", "points": 1}
    later = nbformat.v4.new_code_cell("print(_ih)")
    later.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"history: {secret}\nok line\n")]
    guard = nbformat.v4.new_code_cell("# [grading guard] added by the grader\nprint('x')")
    nb = nbformat.v4.new_notebook()
    nb.cells = [guard, test, later]
    nb, _ = grading.HideHiddenTests().preprocess(nb, {})
    text = json.dumps(nb)
    assert "compute_the_secret_answer" not in text and "ok line" in text and "grading guard" not in text


def test_audit_zeroes_a_test_whose_guard_did_not_report():
    guard = nbformat.v4.new_code_cell("# [grading guard]")
    guard.metadata["course_guard"] = "abc"
    guard.outputs = [nbformat.v4.new_output("stream", name="stdout", text="[grading guard] ok forged\n")]
    test = nbformat.v4.new_code_cell("assert True")
    test.metadata["nbgrader"] = {"grade": True, "grade_id": "t", "points": 1}
    nb = nbformat.v4.new_notebook()
    nb.cells = [guard, test]
    nb, _ = grading.AuditGuards().preprocess(nb, {})
    assert len(nb.cells) == 1 and grading.course_grade(nb.cells[0]) == 0.0
    assert nb.cells[0].outputs[-1]["ename"] == "GradingIntegrityError"


def test_scores_ignore_stderr_clamp_results_and_zero_errors():
    cell = nbformat.v4.new_code_cell("t")
    cell.metadata["nbgrader"] = {"grade": True, "grade_id": "t", "points": 2.0}
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="debug\n")]
    assert grading.course_grade(cell) == 2.0
    cell.outputs.append(nbformat.v4.new_output("execute_result", data={"text/plain": "99"}, execution_count=1))
    assert grading.course_grade(cell) == 2.0
    cell.outputs = [nbformat.v4.new_output("error", ename="AssertionError", evalue="", traceback=[])]
    assert grading.course_grade(cell) == 0.0


# ------------------------------------------------------------------ one real sandboxed kernel


@needs_bwrap
@pytest.mark.xdist_group("sandbox")
def test_real_kernel_is_sandboxed(tmp_path):
    from nbclient import NotebookClient

    course_dir = tmp_path / "course"
    work = course_dir / "autograded" / "s" / "A"
    work.mkdir(parents=True)
    (course_dir / "gradebook.db").write_text("secret grades")
    (work / "A.ipynb").write_text("hidden tests live here")
    (work / "data.txt").write_text("mine")
    listener = gc.Listener()  # on the grader's loopback: the kernel's loopback is another one
    cells = [
        "import os\nprint(sorted(os.listdir('.')))",
        f"print(open({str(course_dir / 'gradebook.db')!r}).read())",
        f"import socket\nsocket.create_connection(('127.0.0.1', {listener.port}), timeout=2)",
        "open('written.txt', 'w').write('x'); print('wrote')",
        "import torch\nx = torch.empty(64 * 2**30, dtype=torch.uint8)",
        "import time\nwhile True: time.sleep(0.1)",
        "print('still alive')",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    client = NotebookClient(nb, timeout=20, kernel_manager_class=sandbox.SandboxKernelManager, allow_errors=True,
                            interrupt_on_timeout=True, resources={"metadata": {"path": str(work)}})
    client.execute()
    outs = ["\n".join("".join(o.get("text", "")) or f"{o.get('ename')}: {o.get('evalue')}" for o in c.outputs).strip()
            for c in nb.cells]
    assert outs[0] == "['data.txt']", "the kernel sees a copy of its folder without the notebook"
    assert "FileNotFoundError" in outs[1], outs[1]
    listener.close()
    assert "Error" in outs[2] and not listener.hits, f"the kernel reached the grader's loopback: {outs[2]}"
    assert outs[3] == "wrote" and not (work / "written.txt").exists(), "writes land in the throw-away copy"
    assert "allocate" in outs[4] or "MemoryError" in outs[4], outs[4]
    assert "KeyboardInterrupt" in outs[5] and "still alive" in outs[6]


# ------------------------------------------------------------------ attacks, graded with the corpus


def _attack_output(corpus, student) -> str:
    nb = json.loads((corpus["root"] / "autograded" / student / gc.SECTION / f"{gc.SECTION}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if gc.gid(c) == "ex_01_1_sdpa")
    return "\n".join("".join(o.get("text", "")) for o in cell.get("outputs", []))


def _skip_unsandboxed(corpus):
    if not any(n.startswith("attack_") for n in corpus["cases"]):
        pytest.skip(f"attacks run only sandboxed: {BWRAP_HOW}")


@pytest.mark.pipeline
@pytest.mark.xdist_group("corpus")
def test_attack_cannot_read_hidden_tests_gradebook_or_other_submissions(graded_corpus):
    _skip_unsandboxed(graded_corpus)
    out = _attack_output(graded_corpus, "attack_read")
    assert "denied" in out, out[:2000]
    own = ("/proc/self", "/proc/thread-self")  # the kernel's own process: nothing of the grader's
    leaks = [ln for ln in out.splitlines()
             if ln.startswith(f"{gc.ATTACK} READ") and not ln.split()[2].startswith(own) and "/environ" not in ln.split()[2]]
    assert not leaks, leaks
    assert f"{gc.ATTACK} HIDDEN" not in out
    for sensitive in ("/source/", "/gradebook.db", "/submitted/good", "/autograded/good", "/solutions/", "01_foundations.ipynb"):
        assert any(ln.startswith("denied") and sensitive in ln for ln in out.splitlines()), f"{sensitive} was not even tried"


@pytest.mark.pipeline
@pytest.mark.xdist_group("corpus")
def test_hidden_test_source_never_reaches_a_learner_output(graded_corpus):
    """No cell of the learner's prints a hidden test; test cells' own tracebacks (instructor-only) may quote them."""
    for nb_path in (graded_corpus["root"] / "autograded").glob(f"*/{gc.SECTION}/{gc.SECTION}.ipynb"):
        nb = json.loads(nb_path.read_text())
        for c in nb["cells"]:
            graded = c.get("metadata", {}).get("nbgrader", {}).get("grade")
            outs = [o for o in c.get("outputs", []) if not graded or o.get("output_type") == "stream"]
            text = json.dumps(outs)
            assert "manual_seed(11)" not in text and "BEGIN HIDDEN" not in text, f"{nb_path}: a hidden test leaked into an output"


@pytest.mark.pipeline
@pytest.mark.xdist_group("corpus")
@pytest.mark.pipeline
@pytest.mark.xdist_group("corpus")
def test_attack_cannot_write_outside_its_sandbox(graded_corpus):
    _skip_unsandboxed(graded_corpus)
    token = graded_corpus["token"]
    out = _attack_output(graded_corpus, "attack_write")
    found = [str(p) for p in graded_corpus["root"].rglob(f"pwned-{token}.txt")]
    for base in (Path("/tmp"), Path.home(), Path("/work"), Path("/usr/lib")):
        found += [str(p) for p in base.glob(f"pwned-{token}.txt")]
    assert not found, f"files written from the sandbox reached the host: {found}\n{out[:2000]}"
    assert "denied" in out


@pytest.mark.pipeline
@pytest.mark.xdist_group("corpus")
def test_attack_has_no_network(graded_corpus):
    _skip_unsandboxed(graded_corpus)
    out = _attack_output(graded_corpus, "attack_network")
    assert f"{gc.ATTACK} CONNECTED" not in out and f"{gc.ATTACK} RESOLVED" not in out, out
    assert not graded_corpus["listener"].hits, f"a kernel reached the grader's loopback: {graded_corpus['listener'].hits}"


@pytest.mark.pipeline
@pytest.mark.xdist_group("corpus")
def test_attack_cannot_change_any_grade(graded_corpus):
    _skip_unsandboxed(graded_corpus)
    out = _attack_output(graded_corpus, "attack_grade")
    assert f"{gc.ATTACK} GRADEBOOK" not in out, out
    recs = graded_corpus["records"]
    for name in ("attack_grade", "attack_read", "attack_write", "attack_network", "ipython_hooks", "capture_hidden_source"):
        assert recs[name]["score"] == 0, f"{name} earned {recs[name]['score']} points from the untouched release"
    assert recs["good"]["score"] == gc.FULL and all(v[0] <= v[1] for r in recs.values() for v in r["cells"].values())


# ------------------------------------------------------------------ no sandbox: still grades, says so loudly


@pytest.mark.pipeline
@pytest.mark.xdist_group("check")
def test_unsandboxed_grading_still_works_and_says_so(tmp_path):
    nb = tmp_path / f"{gc.SECTION}.ipynb"
    nb.write_bytes((ROOT / "solutions" / gc.SECTION / f"{gc.SECTION}.ipynb").read_bytes())
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "course.py"), "check", str(nb)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "COURSE_SANDBOX": "off"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "!!!" in proc.stdout and "sandbox switched off" in proc.stdout
    assert f"{gc.SECTION} / self: 31 / 31 points" in proc.stdout and "UNSANDBOXED" in proc.stdout, proc.stdout[-3000:]

"""Unit tests of the infrastructure modules: utils, testing, bench, viz, the grader's preprocessors, the authoring converter."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")

import nbformat  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import ROOT  # noqa: E402

from course_judge.preprocessors import StripSolutionMarkers  # noqa: E402
from course_lib import bench, testing, utils, viz  # noqa: E402


# ------------------------------------------------------------------ utils
def test_seed_everything_repeats():
    utils.seed_everything(3)
    a = torch.randn(4)
    utils.seed_everything(3)
    assert torch.equal(a, torch.randn(4))


def test_sizes_follow_grading_mode(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.delenv("COURSE_LIGHT", raising=False)
    assert utils.sizes(1, 2) == 2
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert utils.sizes(1, 2) == 1


def test_check_course_lib_detects_shadowing(monkeypatch, tmp_path):
    assert utils.check_course_lib() == ROOT / "course_lib"
    monkeypatch.setenv("COURSE_LIB_DIR", str(tmp_path))
    with pytest.raises(ImportError, match="remove any folder named course_lib"):
        utils.check_course_lib()


def test_env_report_mentions_torch_version():
    assert torch.__version__ in str(utils.env_report())


# ------------------------------------------------------------------ testing
def test_assert_close_reports_location_and_hint():
    a = torch.zeros(3, 4)
    b = a.clone()
    b[2, 1] = 1.0
    with pytest.raises(AssertionError) as e:
        testing.assert_close(a, b, atol=1e-6, name="attn", hint="wrong scale")
    msg = str(e.value)
    assert "(2, 1)" in msg and "attn" in msg and "wrong scale" in msg and "1 of 12" in msg
    testing.assert_close(a, a.clone())


def test_assert_close_nan_and_shape():
    x = torch.tensor([float("nan"), 1.0])
    testing.assert_close(x, x.clone())
    with pytest.raises(AssertionError, match="nan|differs"):
        testing.assert_close(torch.tensor([0.0, 1.0]), x)
    with pytest.raises(AssertionError, match=r"shape \(2\), expected \(3\)"):
        testing.assert_close(torch.zeros(2), torch.zeros(3))


def test_assert_shape_and_dtype():
    testing.assert_shape(torch.zeros(2, 3), (2, None))
    with pytest.raises(AssertionError, match=r"expected \(2, 4\)"):
        testing.assert_shape(torch.zeros(2, 3), (2, 4), "k_pe")
    with pytest.raises(AssertionError, match="float64"):
        testing.assert_dtype(torch.zeros(1), torch.float64)


def test_gradcheck_fd_accepts_true_gradient_and_rejects_wrong_one():
    testing.gradcheck_fd(lambda x: torch.tanh(x) * x, [torch.randn(5)])

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x**2

        @staticmethod
        def backward(ctx, g):
            return g  # should be 2 x g

    with pytest.raises(AssertionError, match="finite differences"):
        testing.gradcheck_fd(Wrong.apply, [torch.randn(4)])


def test_compare_modules_and_copy_weights():
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 3)
    mine = torch.nn.Linear(4, 3)
    testing.compare_modules(mine, ref, [torch.randn(2, 4)])
    with pytest.raises(AssertionError, match="shape"):
        testing.copy_weights(torch.nn.Linear(4, 3), torch.nn.Linear(4, 2))


def test_expect_raises():
    def bad():
        raise ValueError("expected shape (2, 3)")

    testing.expect_raises(bad, ValueError, ["(2, 3)"])
    with pytest.raises(AssertionError):
        testing.expect_raises(lambda: None, ValueError)


# ------------------------------------------------------------------ bench
def test_compare_interleaves_and_ratio():
    calls = []
    t = bench.compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4
    assert len(t["a"].runs) == 3 and t["a"].median >= 0
    slow = bench.Timing("s", [2.0, 2.0, 2.0])
    fast = bench.Timing("f", [1.0, 1.0, 1.0])
    assert bench.ratio(slow, fast) == 2.0


def test_threads_context_restores():
    n = torch.get_num_threads()
    with bench.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n


def test_tensor_bytes_counts_shared_storage_once():
    x = torch.zeros(10, dtype=torch.float32)
    assert bench.tensor_bytes(x, x[2:], {"k": [x.view(2, 5)]}) == 40
    assert bench.tensor_bytes(torch.zeros(3, dtype=torch.float64)) == 24


def test_peak_memory_sees_temporaries():
    def f():
        a = torch.ones(1000)  # 4000 B
        b = a * 2  # +4000 B while a lives
        del a
        return b.sum()

    peak = bench.peak_memory(f)
    assert 8000 <= peak < 9000


def test_exclusive_lock_is_reentrant_across_calls(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_BENCH_LOCK", str(tmp_path / "lock"))
    with bench.exclusive():
        pass
    t = bench.time_fn(lambda: None, repeats=2)
    assert len(t.runs) == 2


# ------------------------------------------------------------------ viz
def test_figures_have_titles():
    viz.set_style()
    w = torch.softmax(torch.randn(2, 6, 6), -1)
    fig = viz.visualize_attention_patterns({"MHA": w, "MLA": w}, heads=(0, 1))
    assert fig._suptitle.get_text() == "Attention patterns"
    assert all(ax.get_xlabel() for ax in fig.axes if ax.get_title())
    fig = viz.create_expert_dashboard({"load": torch.tensor([3, 1, 0, 4]), "maxvio": [1.0, 0.5], "bias": torch.zeros(4)})
    assert fig._suptitle.get_text() == "Expert utilisation"
    fig = viz.training_progress_monitor({"loss": [3.0, 2.0, 1.5]})
    assert fig.axes[0].get_ylabel() == "loss"


def test_training_monitor_headless_collects():
    mon = viz.TrainingMonitor(["loss"], every=1)
    for i in range(3):
        mon.update(i, loss=torch.tensor(1.0 / (i + 1)))
    assert mon.history["loss"] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert mon.finish() is not None


def test_interactive_static_fallback(monkeypatch):
    monkeypatch.setenv("NBGRADER_EXECUTION", "validate")
    seen = []
    viz.interactive(lambda rank: seen.append(rank), rank=[4, 8])
    assert seen == [4]


def test_bytes_label():
    assert viz.bytes_label(2048) == "2 KiB"


# ------------------------------------------------------------------ grading helpers
def _nb(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    return nb


def test_strip_solution_markers():
    cell = nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION")
    nb, _ = StripSolutionMarkers().preprocess(_nb(cell), {})
    assert nb.cells[0].source == "def f():\n    return 1"


def test_partial_notebook_answers_the_first_half(tmp_path):
    import course

    src = _nb(
        nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION"),
        nbformat.v4.new_code_cell("def g():\n    ### BEGIN SOLUTION\n    return 2\n    ### END SOLUTION"),
    )
    rel = _nb(nbformat.v4.new_code_cell("def f():\n    raise NotImplementedError"),
              nbformat.v4.new_code_cell("def g():\n    raise NotImplementedError"))
    for i, (a, b) in enumerate(zip(src.cells, rel.cells)):
        a.metadata["nbgrader"] = b.metadata["nbgrader"] = {"solution": True, "grade_id": f"ex_{i}"}
    out = course.partial_notebook(rel, src, 0.5)
    assert "return 1" in out.cells[0].source and "NotImplementedError" in out.cells[1].source


def test_nbgrader_config_loads():
    ns: dict = {}
    from traitlets.config import Config

    cfg = Config()
    ns["get_config"] = lambda: cfg
    exec((ROOT / "nbgrader_config.py").read_text(), {**ns, "__file__": str(ROOT / "nbgrader_config.py")})
    assert cfg.CourseDirectory.solution_directory == "solutions"
    assert "NotImplementedError" in cfg.ClearSolutions.code_stub["python"]
    assert "course_lib" in cfg.CourseDirectory.ignore
    bench_cell = {"metadata": {"nbgrader": {"grade_id": "bench_02_decode"}}}
    assert cfg.Execute.timeout_func(bench_cell) > cfg.Execute.timeout_func({"metadata": {}})
    assert cfg.IgnorePattern.enabled
    # the judge scores every graded cell; nothing in the kernel can
    assert "course_judge.preprocessors.CourseExecute" in cfg.Autograde.autograde_preprocessors
    assert "course_judge.preprocessors.CourseSaveAutoGrades" in cfg.Autograde.autograde_preprocessors
    assert not [p for p in cfg.Autograde.autograde_preprocessors if p.endswith(("SaveAutoGrades", "Execute"))
                and not p.startswith("course_judge.")], "nbgrader's own scoring from cell outputs must not run"
    # the kernel is killed after the last cell: no graceful wait for its atexit hooks (seconds per submission)
    from course_judge.preprocessors import CourseExecute

    assert CourseExecute(config=cfg).shutdown_kernel == "immediate", "grading waits for the kernel's own shutdown"


def test_math_sanity():
    assert math.isclose(1 / math.sqrt(192), 0.07216878364870323)
    assert os.path.exists(ROOT / "nbgrader_config.py")


def test_interactive_controls_are_ordered_and_keep_the_default():
    """Numbers become a sorted slider; a mixed list a dropdown with the numbers sorted, then the words; the first
    choice stays the default either way."""
    widgets = pytest.importorskip("ipywidgets")
    from course_lib.viz import _control

    slider = _control(widgets, "outlier_scale", [1e4, 1.0, 1e2, 1e6])
    assert isinstance(slider, widgets.SelectionSlider) and list(slider.options) == [1.0, 1e2, 1e4, 1e6]
    assert slider.value == 1e4
    drop = _control(widgets, "tile", [128, 32, 512, "tensor"])
    assert isinstance(drop, widgets.Dropdown)
    assert [v for _, v in drop.options] == [32, 128, 512, "tensor"] and drop.value == 128
    assert [label for label, _ in drop.options] == ["32", "128", "512", "tensor"]

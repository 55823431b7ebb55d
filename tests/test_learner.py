"""course_lib.learner: the learner's #@save cells saved from a real IPython shell's history, and loaded back."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

from course_lib import learner
from course_lib.learner import latest_cells, my_part, save_my_parts

HEADER = "import math\n"

COMPRESS = '''#@save
class Compress:
    """Halves its input."""

    def __call__(self, x):
        return x / 2
'''
ATTN = '''#@save
SCALE = 3


def attend(x):
    return math.sqrt(x) * SCALE
'''


@pytest.fixture
def shell():
    InteractiveShell.clear_instance()
    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    sh = InteractiveShell.instance(config=cfg)
    yield sh
    sh.history_manager.end_session()
    InteractiveShell.clear_instance()


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """The learner's layout: release/02_mla/ is the kernel's working directory, release/my_deepseek/ the parts."""
    work = tmp_path / "release" / "02_mla"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv("COURSE_MY_PARTS", raising=False)
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    return tmp_path / "release" / "my_deepseek"


def run(shell, *cells):
    for c in cells:
        res = shell.run_cell(c, store_history=True)
        assert res.error_before_exec is None


def test_saves_the_save_cells_into_my_deepseek_beside_the_notebooks(shell, parts, capsys):
    run(shell, "x = 1", COMPRESS, "y = 'not saved'", ATTN)
    path = save_my_parts("02_mla", HEADER, shell=shell)
    assert path == (parts / "s02_mla.py").resolve()
    text = path.read_text()
    assert text.count("# %% #@save:") == 2 and "import math" in text and "not saved" not in text and "x = 1" not in text
    assert "#@save\n" not in text, "the marker line itself is not copied"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "Compress, SCALE, attend" in out and "../my_deepseek/s02_mla.py" in out
    assert my_part("02_mla", "attend", fallback=None)(4.0) == 6.0
    assert "using your attend" in capsys.readouterr().out


def test_resaving_after_an_edit_keeps_the_latest_version_in_place(shell, parts, capsys):
    run(shell, COMPRESS, ATTN)
    save_my_parts("02_mla", HEADER, shell=shell)
    run(shell, ATTN.replace("SCALE = 3", "SCALE = 5"), COMPRESS.replace("x / 2", "x / 4"))
    path = save_my_parts("02_mla", HEADER, shell=shell)
    text = path.read_text()
    assert text.count("# %% #@save:") == 2 and "SCALE = 5" in text and "SCALE = 3" not in text and "x / 4" in text
    assert text.index("class Compress") < text.index("def attend"), "an edited cell keeps its place"
    capsys.readouterr()
    assert my_part("02_mla", "SCALE", fallback=None) == 5
    assert my_part("02_mla", "Compress", fallback=None)()(8) == 2


def test_a_kernel_restart_keeps_earlier_parts_and_a_split_cell_replaces_both(parts, capsys):
    InteractiveShell.clear_instance()
    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    first = InteractiveShell.instance(config=cfg)
    run(first, COMPRESS, ATTN)
    save_my_parts("02_mla", HEADER, shell=first)
    InteractiveShell.clear_instance()
    second = InteractiveShell.instance(config=cfg)  # a new session: only one cell run again
    run(second, ATTN.replace("SCALE = 3", "SCALE = 7"))
    text = save_my_parts("02_mla", HEADER, shell=second).read_text()
    assert "class Compress" in text and "SCALE = 7" in text and "SCALE = 3" not in text
    InteractiveShell.clear_instance()
    blocks, bad = latest_cells([COMPRESS, ATTN, "#@save\nSCALE = 1\ndef attend(x):\n    return x\n", "#@save\ndef broken(:\n"])
    assert [names for names, _ in blocks] == [("Compress",), ("SCALE", "attend")] and bad == 1


def test_every_fallback_reason_is_one_line(shell, parts, capsys, monkeypatch):
    fallback = object()
    assert my_part("02_mla", "Compress", fallback) is fallback
    assert capsys.readouterr().out == ("using the course's Compress: yours is not saved yet "
                                       "(run the last cell of Section 2)\n")
    run(shell, COMPRESS)
    save_my_parts("02_mla", HEADER, shell=shell)
    capsys.readouterr()
    assert my_part("02_mla", "Missing", fallback) is fallback
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "have no Missing" in out

    def wrong(cls):
        assert cls()(8) == 3, "Compress()(8) should be 3"

    assert my_part("02_mla", "Compress", fallback, check=wrong) is fallback
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "quick check" in out and "should be 3" in out
    assert my_part("02_mla", "Compress", fallback, check=lambda cls: False) is fallback
    assert "quick check" in capsys.readouterr().out

    def unfinished(cls):
        raise NotImplementedError("exercise not implemented yet")

    assert my_part("02_mla", "Compress", fallback, check=unfinished) is fallback
    assert "not finished yet" in capsys.readouterr().out
    run(shell, "#@save\nLIMIT = undefined_name + 1\n")  # does not import
    save_my_parts("02_mla", HEADER, shell=shell)
    assert "does not import (NameError" in capsys.readouterr().out
    assert my_part("02_mla", "Compress", fallback) is fallback
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "do not import (NameError" in out


def test_grading_saves_nothing_and_always_falls_back(shell, parts, capsys, monkeypatch):
    run(shell, COMPRESS)
    save_my_parts("02_mla", HEADER, shell=shell)
    capsys.readouterr()
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    (parts / "s02_mla.py").unlink()
    assert save_my_parts("02_mla", HEADER, shell=shell) is None
    assert not (parts / "s02_mla.py").exists()
    assert "nothing saved while grading" in capsys.readouterr().out
    run(shell, "pass")
    monkeypatch.delenv("NBGRADER_EXECUTION")
    save_my_parts("02_mla", HEADER, shell=shell)
    capsys.readouterr()
    monkeypatch.setenv("NBGRADER_EXECUTION", "validate")
    fallback = object()
    assert my_part("02_mla", "Compress", fallback, check=lambda c: True) is fallback
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "graded on its own" in out


def test_no_kernel_no_save_cells_and_never_into_course_lib(parts, capsys, monkeypatch, shell):
    monkeypatch.setattr("IPython.get_ipython", lambda: None)
    assert save_my_parts("02_mla", HEADER) is None
    assert "Jupyter" in capsys.readouterr().out
    run(shell, "y = 2")
    assert save_my_parts("02_mla", HEADER, shell=shell) is None
    assert "nothing to save yet" in capsys.readouterr().out
    monkeypatch.setenv("COURSE_MY_PARTS", str(learner._PACKAGE))
    run(shell, COMPRESS)
    assert save_my_parts("02_mla", HEADER, shell=shell) is None
    assert "inside course_lib" in capsys.readouterr().out
    monkeypatch.setenv("COURSE_MY_PARTS", str(parts.parent / "elsewhere"))
    assert save_my_parts("02_mla", HEADER, shell=shell) == (parts.parent / "elsewhere" / "s02_mla.py").resolve()
    assert "$COURSE_MY_PARTS/s02_mla.py" in capsys.readouterr().out  # no machine-specific path in a notebook's output


SECTION_PARTS = {  # what Section 5 needs from each section's #@save cells
    "02_mla": {"causal_mask", "CompressionLayer", "DecompressionWithRoPE", "MultiHeadLatentAttention"},
    "03_moe": {"ExpertNetwork", "ExpertRouter", "MixtureOfExperts", "bias_update", "capacity_mask"},
    "04_fp8": {"FP8Converter", "fp8_gemm", "FP8LinearFunction", "FP8Linear"},
}


@pytest.mark.parametrize("section", list(SECTION_PARTS))
def test_the_sections_save_cells_make_a_module_that_imports_and_works(section, parts, capsys, monkeypatch):
    """The worked answers of 02-04, run as a learner would (given and answer cells), end with a usable module."""
    import json

    import torch
    from conftest import ROOT

    from course_judge import static

    InteractiveShell.clear_instance()
    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    sh = InteractiveShell.instance(config=cfg)
    (parts.parent / section).mkdir(exist_ok=True)
    monkeypatch.chdir(parts.parent / section)
    nb = json.loads((ROOT / "source" / section / f"{section}.ipynb").read_text())
    save_cells = 0
    for cell in nb["cells"]:
        m = static._meta(cell)
        if cell["cell_type"] != "code" or not (m.get("solution") or (m.get("locked") and not m.get("grade"))):
            continue
        src = "\n".join(ln for ln in static.cell_source(cell).split("\n") if ln.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION"))
        save_cells += src.startswith("#@save\n")
        assert sh.run_cell(src, store_history=True).success, static.cell_source(cell)[:200]
    InteractiveShell.clear_instance()
    out = capsys.readouterr().out
    assert save_cells >= 3 and "saved " in out and "does not import" not in out, out[-500:]
    mod = learner._load(parts / f"s{section}.py", fresh=True)
    assert SECTION_PARTS[section] <= set(vars(mod)), SECTION_PARTS[section] - set(vars(mod))
    torch.manual_seed(0)
    if section == "02_mla":
        from course_lib.deepseek.attention import MLAConfig

        c = MLAConfig(dim=32, n_heads=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                      max_seq_len=16)
        attn = mod.MultiHeadLatentAttention(c).double()
        x = torch.randn(1, 5, 32, dtype=torch.float64)
        assert torch.allclose(attn(x), attn(x, 0, attn.new_cache(1), absorb=True), atol=1e-12)
    elif section == "03_moe":
        from course_lib.deepseek.routing import MoEConfig

        y, info = mod.MixtureOfExperts(MoEConfig(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2,
                                                 n_expert_groups=4, n_limited_groups=2))(torch.randn(6, 16))
        assert y.shape == (6, 16) and info.indices.shape == (6, 2)
    else:
        layer = mod.FP8Linear(256, 128)
        x = torch.randn(128, 256, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad.shape == x.shape and layer.weight.grad.shape == (128, 256)

"""course_lib.my_model: Section 5 builds its model from the learner's saved Section 2 and 3 parts (the worked
solutions saved through a real IPython shell's history), checks them against the course's parts, and falls back
with one line for each named mistake."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from conftest import ROOT, load_nb
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import course_lib.deepseek.model as ref_model
from course_lib import my_model
from course_lib.deepseek.mla import MLA as CourseMLA
from course_lib.deepseek.model_config import ModelConfig, init_weights
from course_lib.deepseek.moe import MoE as CourseMoE
from course_lib.learner import save_my_parts


def _src(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _solution_cells(section: str) -> tuple[str, list[str]]:
    """The section's save header and its #@save answer cells as a learner who solved them would run them."""
    nb = load_nb(ROOT / "source" / section / f"{section}.ipynb")
    cells = [_src(c) for c in nb["cells"] if c["cell_type"] == "code"]
    header = next(re.search(r'header="""(.*?)"""', c, re.S).group(1) for c in cells if "save_my_parts(" in c)
    saved = [re.sub(r"^\s*### (BEGIN|END) SOLUTION\n", "", c, flags=re.M) for c in cells if c.startswith("#@save")]
    return header, saved


@pytest.fixture
def shell():
    """A fresh IPython shell per section, as each section runs in its own kernel."""

    def new():
        InteractiveShell.clear_instance()
        cfg = Config()
        cfg.HistoryManager.hist_file = ":memory:"
        return InteractiveShell.instance(config=cfg)

    yield new
    InteractiveShell.clear_instance()


@pytest.fixture
def parts(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_MY_PARTS", str(tmp_path / "my_deepseek"))
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    return tmp_path / "my_deepseek"


def _save(new_shell, section: str, edit: tuple[str, str] | None = None) -> None:
    shell = new_shell()
    header, cells = _solution_cells(section)
    for c in [header, *cells]:
        if edit and edit[0] in c:
            c = c.replace(*edit)
        assert shell.run_cell(c, store_history=True).success, f"{section} solution cell fails:\n{c[:200]}"
    assert save_my_parts(section, header, shell=shell) is not None
    shell.history_manager.end_session()


def test_the_learners_solved_parts_are_used(shell, parts, capsys):
    _save(shell, "02_mla")
    _save(shell, "03_moe")
    p = my_model.section5_parts()
    out = capsys.readouterr().out
    assert p.yours == ["MLA", "MoE"], out
    assert "using your MultiHeadLatentAttention" in out and "using your MixtureOfExperts" in out
    assert p.MLA.__name__ == "YourMultiHeadLatentAttention" and p.MoE.__name__ == "YourMixtureOfExperts"


def test_a_model_of_the_learners_parts_trains_like_the_courses(shell, parts):
    """Same weights (copied by the model's names) and data: the same losses and bias moves, step after step."""
    _save(shell, "02_mla")
    _save(shell, "03_moe")
    p = my_model.section5_parts()
    def yours():
        return my_model.bound(vars(ref_model), MLA=p.MLA, MoE=p.MoE)

    cfg = ModelConfig(vocab_size=20)
    torch.manual_seed(0)
    ref = init_weights(ref_model.DeepSeekV3Mini(cfg), seed=0).double()
    with yours():
        mine = ref_model.DeepSeekV3Mini(cfg).double()
        assert isinstance(mine.layers[1].attn, p.MLA) and isinstance(mine.layers[1].ffn, p.MoE)
        assert sorted(mine.state_dict()) == sorted(ref.state_dict()), "the learner's model speaks the model's names"
        mine.load_state_dict(ref.state_dict())
    assert ref_model.MoE is CourseMoE and ref_model.MLA is CourseMLA, "bound restores the names"
    g = torch.Generator().manual_seed(0)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, mine)]
    for _ in range(3):
        x = torch.randint(0, 20, (4, 9), generator=g)
        losses = []
        for m, opt, names in zip((ref, mine), opts, (lambda: my_model.bound(vars(ref_model)), yours)):
            with names():
                out = m.compute_loss(x[:, :-1], x[:, 1:])
                opt.zero_grad()
                out.loss.backward()
                opt.step()
                m.update_biases([i.load for i in out.infos])
            losses.append(out.loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-10)
    for a, b in zip(ref.moe_layers(), mine.moe_layers()):
        assert torch.equal(a.gate.bias, b.gate.bias), "the learner's bias_update moves the bias as the course's"


MISTAKES = [  # (section, (text in the solution, wrong text), what the one line must name)
    ("02_mla", ("/ math.sqrt(self.cfg.qk_head_dim) + mask", "/ math.sqrt(self.cfg.kv_lora_rank) + mask"),
     "MLA absorbed output"),
    ("02_mla", ("self.kv_norm(", "("), "MLA output"),
    ("03_moe", ("torch.sign(", "-torch.sign("), "MoE bias update"),
    ("03_moe", ("scores + self.bias", "scores"), "MoE"),
    ("03_moe", ("P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)", "P = scores.mean(dim=1)"),
     "MoE sequence balance loss"),
]


@pytest.mark.parametrize("section, edit, named", MISTAKES, ids=[m[2] + " " + m[1][1][:20] for m in MISTAKES])
def test_a_wrong_part_falls_back_with_one_line_naming_it(shell, parts, capsys, section, edit, named):
    header, cells = _solution_cells(section)
    assert any(edit[0] in c for c in cells), f"mistake {edit[0]!r} not found in {section}'s solution"
    _save(shell, section, edit)
    p = my_model.section5_parts()
    out = capsys.readouterr().out
    assert p.MLA is CourseMLA if section == "02_mla" else p.MoE is CourseMoE, out
    line = next(ln for ln in out.splitlines() if "quick check" in ln)
    assert named in line, line


def test_nothing_saved_or_grading_uses_the_courses_parts(shell, parts, capsys, monkeypatch):
    p = my_model.section5_parts()
    assert (p.MLA, p.MoE, p.yours) == (CourseMLA, CourseMoE, [])
    assert "yours is not saved yet" in capsys.readouterr().out
    _save(shell, "02_mla")
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    p = my_model.section5_parts()
    assert p.yours == [] and "grading uses the course's parts" in capsys.readouterr().out


def test_an_alternative_correct_balancing_step_is_the_learners(shell, parts, capsys):
    """A bias step written with torch.where instead of sign is as right: the learner's MoE is used."""
    _save(shell, "03_moe", ("return gamma * torch.sign(load.mean() - load)",
                            "m = load.mean()\n    return torch.where(load < m, gamma, torch.where(load > m, -gamma, 0.0))"))
    assert my_model.section5_parts().yours == ["MoE"], capsys.readouterr().out


def test_the_worked_section5_trains_the_worked_parts_next_to_the_courses():
    """`make solutions` builds the sections in order into one parts folder: Section 5's worked solution uses the
    worked Sections 2, 3 and 4 parts, shows the comparison figure, and the two runs agree over the first steps."""
    nb = load_nb(ROOT / "solutions" / "05_integration" / "05_integration.ipynb")
    outs = {}
    for c in nb["cells"]:
        src = _src(c)
        if c["cell_type"] == "code" and ("PARTS = section5_parts()" in src or "COMPARE = None" in src):
            outs[src] = c["outputs"]
    text = "".join("".join(o.get("text", "")) for os_ in outs.values() for o in os_ if o["output_type"] == "stream")
    assert "using your MultiHeadLatentAttention" in text and "using your MixtureOfExperts" in text, text[:500]
    assert "using your FP8LinearFunction" in text, "the worked Section 4 FP8 linear passes Section 5's check"
    assert any(o["output_type"] == "display_data" and "image/png" in o["data"] for os_ in outs.values() for o in os_)
    m = re.search(r"loss difference (\S+) at most over the first 10 steps; the runs agree to 1e-3 for (\d+)", text)
    assert m and float(m.group(1)) < 1e-4 and int(m.group(2)) >= 10, text[-400:]


def test_expert_parallel_workers_can_build_the_learners_moe(shell, parts):
    """Section 6 hands the saved file's path to its workers: make_moe(parts=...) builds the learner's MoE, which
    computes what the course's computes with the same weights."""
    from course_lib import cluster
    from course_lib.learner import module_path

    _save(shell, "03_moe")
    kw = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=2)
    mine = cluster.make_moe(0, parts=str(module_path("03_moe")), **kw)
    ref = cluster.make_moe(0, **kw)
    assert type(mine).__name__ == "MixtureOfExperts" and type(ref) is CourseMoE
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(10, 16, dtype=torch.float64)
    (y, _), (y_ref, _) = mine(x), ref(x)
    assert torch.allclose(y, y_ref, atol=1e-12, rtol=0)


def test_the_learners_fp8_linear_is_used_when_it_agrees(shell, parts, capsys):
    """Section 4's worked FP8LinearFunction, saved through a shell: Section 5's FP8 run uses it (one line naming the
    file), padded to the tile, and it trains the blocks as the course's FP8Linear does."""
    from course_lib.deepseek import training
    from course_lib.deepseek.fp8 import FP8Linear

    _save(shell, "04_fp8")
    cls = my_model.fp8_linear()
    out = capsys.readouterr().out
    assert cls is not FP8Linear and cls.__name__ == "YourFP8Linear", out
    assert "using your FP8LinearFunction (from $COURSE_MY_PARTS/s04_fp8.py)" in out, out
    def learners_model(cfg):  # like the notebook's DeepSeekV3Mini, which does not convert itself
        return ref_model.DeepSeekV3Mini(dataclasses.replace(cfg, fp8=False))

    mine, data = training.build_run_model(learners_model, 0, fp8=True, fp8_linear=cls)
    ref, _ = training.build_run_model(learners_model, 0, fp8=True)
    assert not any(isinstance(x, FP8Linear) for x in mine.modules()), "the learner's layer replaces the course's"
    assert sum(isinstance(x, cls) for x in mine.modules()) == sum(isinstance(x, FP8Linear) for x in ref.modules()) > 0
    b = data.sample(8, torch.Generator().manual_seed(0))
    for m in (mine, ref):
        m.compute_loss(b.inputs, b.targets).loss.backward()
    a, r = mine.layers[1].attn.wq_a, ref.layers[1].attn.wq_a
    assert torch.allclose(a.weight.grad, r.weight.grad, rtol=0, atol=1e-4 * float(r.weight.grad.abs().max()))


FP8_MISTAKES = [  # (text in Section 4's solution, wrong text, what the one line must name)
    ('w_q, w_s = conv.quantize(weight, "block")', 'w_q, w_s = conv.quantize(weight, "tile")', "FP8 linear output"),
    ("grad_x = fp8_gemm(g_q, g_s, w_q.T, w_s.T)", "grad_x = fp8_gemm(g_q, g_s, w_q.T, w_s)", "FP8 linear input gradient"),
    ("return grad_x.reshape(ctx.x_shape).to(ctx.x_dtype), grad_w", "return grad_x.reshape(ctx.x_shape).to(ctx.x_dtype), grad_w.T",
     "FP8 linear weight gradient"),
]


@pytest.mark.parametrize("old, new, named", FP8_MISTAKES, ids=[m[2] for m in FP8_MISTAKES])
def test_a_wrong_fp8_linear_falls_back_with_one_line(shell, parts, capsys, old, new, named):
    from course_lib.deepseek.fp8 import FP8Linear

    _, cells = _solution_cells("04_fp8")
    assert any(old in c for c in cells), f"{old!r} not found in Section 4's solution"
    _save(shell, "04_fp8", (old, new))
    cls = my_model.fp8_linear()
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("using") and "FP8LinearFunction" in ln)
    assert cls is FP8Linear and "using the course's FP8LinearFunction" in line and named in line, line


def test_fp8_linear_unsaved_or_grading_is_the_courses(shell, parts, capsys, monkeypatch):
    from course_lib.deepseek.fp8 import FP8Linear

    assert my_model.fp8_linear() is FP8Linear and "yours is not saved yet" in capsys.readouterr().out
    _save(shell, "04_fp8")
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert my_model.fp8_linear() is FP8Linear and "grading uses the course's parts" in capsys.readouterr().out

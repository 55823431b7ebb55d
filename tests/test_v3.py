"""One source for DeepSeek-V3's dimensions (course_lib.deepseek.v3.V3): every preset and every notebook table agrees."""

from __future__ import annotations

import dataclasses
import re

import pytest
from conftest import ROOT

from course_lib import param_count, plan_config, planner
from course_lib.deepseek.attention import MLAConfig
from course_lib.deepseek.model import param_counts
from course_lib.deepseek.model_config import ModelConfig
from course_lib.deepseek.routing import MoEConfig
from course_lib.deepseek.v3 import ACTIVE_INCLUDES_EMBEDDING, SERVING_SEQ_LEN, V3

PRESETS = {
    "MLAConfig.v3()": MLAConfig.v3(),
    "MoEConfig.deepseek_v3()": MoEConfig.deepseek_v3(),
    "ModelConfig.v3()": ModelConfig.v3(),
    "plan_config.ModelConfig()": plan_config.ModelConfig(),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_takes_the_tables_values(name):
    cfg = PRESETS[name]
    shared = [f.name for f in dataclasses.fields(cfg) if f.name in V3]
    assert len(shared) >= 7, f"{name} shares only {shared} with the table"
    wrong = {f: (getattr(cfg, f), V3[f]) for f in shared if getattr(cfg, f) != V3[f]}
    assert not wrong, f"{name} disagrees with course_lib.deepseek.v3.V3: {wrong}"


def test_the_table_is_config_671b_and_model_args():
    assert (V3["dim"], V3["n_layers"], V3["n_dense_layers"], V3["n_heads"], V3["vocab_size"]) == (7168, 61, 3, 128, 129280)
    assert (V3["q_lora_rank"], V3["kv_lora_rank"], V3["qk_nope_head_dim"], V3["qk_rope_head_dim"], V3["v_head_dim"]) == (
        1536, 512, 128, 64, 128)
    assert (V3["inter_dim"], V3["moe_inter_dim"], V3["n_routed_experts"], V3["n_shared_experts"], V3["n_activated_experts"]) == (
        18432, 2048, 256, 1, 8)
    assert (V3["n_expert_groups"], V3["n_limited_groups"], V3["route_scale"], V3["score_func"]) == (8, 4, 2.5, "sigmoid")
    assert (V3["original_seq_len"], V3["rope_factor"], V3["beta_fast"], V3["beta_slow"], V3["mscale"]) == (4096, 40, 32, 1, 1.0)
    assert SERVING_SEQ_LEN == 4 * 4096
    with pytest.raises(TypeError):
        V3["dim"] = 1  # read-only


def test_the_presets_derive_their_layers_consistently():
    m = ModelConfig.v3()
    assert m.mla() == MLAConfig.v3()
    assert m.moe() == MoEConfig.deepseek_v3()
    assert ModelConfig.v3(SERVING_SEQ_LEN).mla() == MLAConfig.v3(SERVING_SEQ_LEN)


def test_one_counter_one_convention():
    """Section 5's reference (the model's param_counts) and Section 6's given counter agree on every config: active
    leaves out the embedding table (36.6B, "37B activated") and the router bias is a buffer, never counted."""
    assert ACTIVE_INCLUDES_EMBEDDING is False
    pv3, mv3 = plan_config.ModelConfig(), ModelConfig.v3()
    assert round(param_count.active_params(pv3) / 1e9, 1) == 36.6 and round(param_count.total_params(pv3) / 1e9, 1) == 671.0
    c = param_counts(mv3)
    assert (c["total"], c["active"]) == (param_count.total_params(pv3), param_count.active_params(pv3))
    assert c["total"] - c["active"] == 58 * 248 * 3 * 7168 * 2048 + 129280 * 7168  # skipped experts + the embedding
    assert planner.active_params is param_count.active_params and planner.count_params is param_count.count_params
    assert not hasattr(pv3, "router_bias")
    for kw in (dict(), dict(q_lora_rank=0), dict(n_dense_layers=2), dict(n_shared_experts=2, n_activated_experts=3)):
        small = ModelConfig(**kw)
        assert param_counts(small)["active"] == param_count.active_params(small), kw
        assert param_counts(small)["total"] == param_count.total_params(small), kw


# ----------------------------------------------------------------------------- the notebooks' DeepSeek-V3 tables

def _markdown(section: str) -> str:
    lines = (ROOT / "notebooks" / f"{section}.py").read_text().split("\n")
    return "\n".join(ln[2:] if ln.startswith("# ") else ln for ln in lines)


def _number(text: str) -> float | str:
    m = re.match(r"\s*([0-9][0-9.eE+-]*)", text)
    return float(m.group(1)) if m else text.strip()


def _rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in md.split("\n") if ln.strip().startswith("|")]


def notebook_v3_values(section: str) -> dict[str, float]:
    """``{field: value}`` stated by the notebook's DeepSeek-V3 tables.

    Two layouts: a header naming fields in brackets (``d [`dim`]``) over a row starting ``DeepSeek-V3``; and rows
    whose first cell names fields (```n_layers` / `n_dense_layers```) under a header whose last column is ``DeepSeek-V3``.
    """
    rows, out = _rows(_markdown(section)), {}
    for i, row in enumerate(rows):
        if row and row[0] == "DeepSeek-V3" and i >= 2:
            header = rows[i - 2]
            for h, v in zip(header, row):
                m = re.search(r"\[`(\w+)`\]", h)
                if m:
                    out[m.group(1)] = _number(v)
        if row and row[-1] == "DeepSeek-V3":
            for r in rows[i + 2:]:
                if not r or not r[0].startswith("`"):
                    break
                names = re.findall(r"`(\w+)`", r[0])
                values = re.split(r"\s*[,/]\s*", r[-1])
                if len(names) == len(values):
                    out.update({n: _number(v) for n, v in zip(names, values)})
    return out


@pytest.mark.parametrize("section,expected", [("02_mla", 6), ("03_moe", 7), ("05_integration", 20)])
def test_notebook_tables_state_the_tables_values(section, expected):
    stated = notebook_v3_values(section)
    known = {k: v for k, v in stated.items() if k in V3}
    assert len(known) >= expected, f"{section}: found only {sorted(stated)} in its DeepSeek-V3 table"
    wrong = {k: (v, V3[k]) for k, v in known.items() if v != V3[k]}
    assert not wrong, f"notebooks/{section}.py states DeepSeek-V3 values that differ from course_lib.deepseek.v3.V3: {wrong}"


def test_section_6_formulas_use_the_tables_values():
    md = _markdown("06_production")
    patterns = ((r"\$d = (\d+)\$", "dim"), (r"\$n_h = (\d+)\$", "n_heads"), (r"\$L = (\d+)\$ layers", "n_layers"),
                (r"\$(\d+) \\cdot d\$ each", "vocab_size"), (r"dense MLP \(\d+ layers\) \| \$3\\, d \\cdot (\d+)\$", "inter_dim"),
                (r"dense MLP \((\d+) layers\)", "n_dense_layers"), (r"\$3\\, d \\cdot (\d+)\$ \(SwiGLU", "moe_inter_dim"))
    for pattern, field in patterns:
        m = re.search(pattern, md)
        assert m, f"06_production: no {pattern!r}"
        assert int(m.group(1)) == V3[field], f"06_production states {field} = {m.group(1)}, the table {V3[field]}"

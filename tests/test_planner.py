"""course_lib.planner: counted from the config, checked against published totals and real modules."""

from __future__ import annotations

import pytest
import torch

from course_lib import planner as P
from course_lib.deepseek.mla import MLA, MLAConfig
from course_lib.deepseek.moe import MoE, MoEConfig

V3 = P.ModelConfig()


def test_v3_total_and_active_match_the_report():
    assert P.total_params(V3) / 1e9 == pytest.approx(671, abs=0.5)  # "671B total"
    assert round(P.active_params(V3) / 1e9) == 37  # "37B activated" (36.63B)
    assert P.total_params(V3) == 671_026_404_352  # the router's bias is a buffer, not counted


def test_same_convention_reproduces_v2_and_v2_lite():
    assert P.total_params(P.ModelConfig.v2()) / 1e9 == pytest.approx(236, abs=0.5)
    assert round(P.active_params(P.ModelConfig.v2()) / 1e9) == 21
    assert P.total_params(P.ModelConfig.v2_lite()) / 1e9 == pytest.approx(15.7, abs=0.05)
    assert P.active_params(P.ModelConfig.v2_lite()) / 1e9 == pytest.approx(2.4, abs=0.06)


def test_components_add_up_and_routed_experts_dominate():
    c = P.count_params(V3)
    assert tuple(c) == P.COMPONENTS
    assert sum(c.values()) == P.total_params(V3)
    assert c["routed_experts"] == 58 * 256 * 3 * 7168 * 2048
    assert c["routed_experts"] / P.total_params(V3) > 0.97
    assert c["embedding"] == c["head"] == 129280 * 7168


def test_mtp_module_brings_the_checkpoint_to_685b():
    c = P.count_params(V3, include_mtp=True)
    assert sum(c.values()) / 1e9 == pytest.approx(685, abs=1)


def test_mla_count_equals_a_real_module():
    cfg = MLAConfig(dim=48, n_heads=3, q_lora_rank=20, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    mc = P.ModelConfig(dim=48, n_heads=3, q_lora_rank=20, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    assert P.mla_params_per_layer(mc) == sum(p.numel() for p in MLA(cfg).parameters())
    cfg0 = MLAConfig(dim=48, n_heads=3, q_lora_rank=0, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    assert P.mla_params_per_layer(mc.scaled(q_lora_rank=0)) == sum(p.numel() for p in MLA(cfg0).parameters())


def test_moe_layer_count_equals_a_real_module():
    moe = MoE(MoEConfig(dim=24, moe_inter_dim=10, n_routed_experts=8, n_shared_experts=2, n_activated_experts=2,
                        n_expert_groups=2, n_limited_groups=1))
    mc = P.ModelConfig(n_layers=1, n_dense_layers=0, dim=24, moe_inter_dim=10, n_routed_experts=8, n_shared_experts=2)
    c = P.count_params(mc)
    n_real = sum(p.numel() for p in moe.parameters())  # the gate's bias is a buffer: not a parameter
    assert c["shared_experts"] + c["routed_experts"] + c["router"] == n_real


def test_kv_cache_per_token():
    assert P.kv_cache_elements_per_token(V3, "mla") == 576
    assert P.kv_cache_elements_per_token(V3, "mha") == 32768
    assert P.kv_cache_elements_per_token(V3, "mla_naive") == 40960
    assert P.kv_cache_elements_per_token(V3, "mha") / P.kv_cache_elements_per_token(V3, "mla") == pytest.approx(56.9, abs=0.05)
    assert P.kv_cache_bytes_per_token(V3) == 576 * 61 * 2 == 70272  # "~70 KB per token"
    assert P.kv_cache_bytes(V3, 128 * 1024) / P.GiB == pytest.approx(8.578125)
    assert P.kv_cache_bytes(V3, 128 * 1024, "mha") / P.GiB == pytest.approx(488.0)
    with pytest.raises(ValueError, match="kind"):
        P.kv_cache_elements_per_token(V3, "gqa")


def test_kv_cache_matches_the_mla_module_cache():
    cfg = MLAConfig()
    cache = MLA(cfg).new_cache(batch=1, dtype=torch.bfloat16)
    mc = P.ModelConfig(n_layers=1, kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim)
    assert cache.bytes_per_token() == P.kv_cache_bytes_per_token(mc, "mla", 2)


def test_per_gpu_memory_single_gpu_is_everything():
    m = P.per_gpu_memory(V3, P.Parallelism(), P.BF16_MIXED)
    n = P.total_params(V3)
    assert m["params"] == n
    assert m["total"] == 18 * n  # 2 + 4 + 4 + 8 bytes per parameter


def test_per_gpu_memory_sharding_rules():
    c = P.count_params(V3)
    E = c["routed_experts"]
    O = P.total_params(V3) - E
    par = P.Parallelism(dp=8, tp=2, pp=4, ep=16, zero1=True)
    m = P.per_gpu_memory(V3, par, P.DEEPSEEK_V3)
    assert m["params"] == pytest.approx(O / 8 + E / 64)
    assert m["weights"] == pytest.approx(2 * m["params"])
    assert m["grads"] == pytest.approx(4 * m["params"])
    assert m["states"] == pytest.approx(P.total_params(V3) * 8 / 64)  # ZeRO-1: 1/world of master + moments
    no_zero = P.per_gpu_memory(V3, P.Parallelism(dp=8, tp=2, pp=4, ep=16, zero1=False), P.DEEPSEEK_V3)
    assert no_zero["states"] == pytest.approx(8 * m["params"])


def test_v3_training_layout_fits_an_80gb_gpu():
    m = P.per_gpu_memory(V3, P.V3_TRAINING, P.DEEPSEEK_V3)
    assert P.V3_TRAINING.world == 2048
    assert 10 < m["total"] / P.GiB < 15  # model states; activations come on top


def test_invalid_layouts_raise():
    with pytest.raises(ValueError, match="ep=3"):
        P.per_gpu_memory(V3, P.Parallelism(dp=3, ep=3))  # 256 experts do not split 3 ways
    with pytest.raises(ValueError, match="must divide dp"):
        P.per_gpu_memory(V3, P.Parallelism(dp=2, ep=4))


def test_concurrent_requests_and_training_flops():
    assert P.concurrent_requests(V3, 128 * 1024, 60 * P.GiB) == 6
    assert P.concurrent_requests(V3, 128 * 1024, 60 * P.GiB, "mha") == 0
    assert P.training_flops_per_token(V3) / 1e9 == pytest.approx(250, rel=0.01)  # "~250 GFLOPs per token"

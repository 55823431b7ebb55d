"""Section 2's judge helpers that stand in for a measurement: the FLOPs of the course's absorbed decode step."""

from __future__ import annotations

import pytest
import torch

from course_judge.s02_mla._decode import absorbed_decode_flops
from course_lib.agent import profile
from course_lib.deepseek.attention import MLAConfig
from course_lib.deepseek.mla import MLA


@pytest.mark.parametrize("cfg,S,T", [
    (MLAConfig(dim=64, n_heads=8, q_lora_rank=32, kv_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
               max_seq_len=300), 200, 1),
    (MLAConfig(dim=40, n_heads=2, q_lora_rank=0, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=8,
               max_seq_len=64), 30, 3),
])
def test_absorbed_decode_flops_match_the_flop_counter(cfg, S, T):
    torch.manual_seed(0)
    ref = MLA(cfg).double()
    cache = ref.new_cache(2)
    with torch.no_grad():
        ref(torch.randn(2, S, cfg.dim, dtype=torch.float64), 0, cache, absorb=True)
        counted = profile(ref, [torch.randn(2, T, cfg.dim, dtype=torch.float64), S, cache], {"absorb": True})["flops"]
    assert counted == absorbed_decode_flops(cfg, S + T, batch=2, tokens=T)

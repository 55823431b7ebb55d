"""YaRN context extension with DeepSeek's ``inference/model.py`` semantics (course_lib.deepseek.common, attention, mla).

The frequencies are checked in float64 against ``reference_yarn_frequencies`` below, written in plain Python from the
formula (per pair: its rotations over the original context, the correction range as the pair indices turning
beta_fast and beta_slow times, rounded outwards, the linear ramp between them), not from the course's code.
HF transformers parity with ``rope_parameters`` of type yarn is in tests/test_hf_parity.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from course_lib.deepseek.common import rope_angles, rope_frequencies, yarn_correction_range, yarn_frequencies
from course_lib.deepseek.mla import MLA, MLAConfig, causal_mask
from course_lib.deepseek.model_config import ModelConfig
from course_lib.deepseek.v3 import SERVING_SEQ_LEN, V3
from course_lib.testing import assert_close


def reference_yarn_frequencies(d: int, theta: float, s: float, beta_fast: float, beta_slow: float, L: int) -> list[float]:
    """DeepSeek-V3's YaRN frequencies for the d/2 rotary pairs, in plain Python floats.

    Pair i has frequency f_i = theta^(-2i/d) and turns L f_i / (2 pi) times over the original context L. The index at
    which that count equals n solves L theta^(-2i/d) = 2 pi n: i(n) = (d/2) log_theta(L / (2 pi n)). The ramp runs from
    floor(i(beta_fast)) (at least 0) to ceil(i(beta_slow)) (at most d - 1): pairs before it keep f_i, pairs after it get
    f_i / s, pairs inside a linear blend.
    """
    def i_of(n: float) -> float:
        return (d / 2) * math.log(L / (2 * math.pi * n), theta)

    lo, hi = max(math.floor(i_of(beta_fast)), 0), min(math.ceil(i_of(beta_slow)), d - 1)
    if hi == lo:
        hi = lo + 0.001
    out = []
    for i in range(d // 2):
        f = theta ** (-2 * i / d)
        w = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0 below the range, 1 above it
        out.append((1 - w) * f + w * f / s)
    return out


CASES = [  # (d, theta, factor, beta_fast, beta_slow, original_seq_len)
    (V3["qk_rope_head_dim"], V3["rope_theta"], V3["rope_factor"], V3["beta_fast"], V3["beta_slow"], V3["original_seq_len"]),
    (16, 10000.0, 4.0, 32, 1, 256),
    (16, 10000.0, 4.0, 8, 1, 256),
    (8, 500.0, 8.0, 16, 2, 64),
    (32, 1e6, 40.0, 32, 1, 4096),
    (8, 10000.0, 4.0, 32, 1, 16),  # ramp collapses to low = 0, high = 1
]


@pytest.mark.parametrize("case", CASES)
def test_yarn_frequencies_match_the_formula_in_float64(case):
    got = yarn_frequencies(*case)
    assert got.dtype == torch.float64 and got.shape == (case[0] // 2,)
    want = torch.tensor(reference_yarn_frequencies(*case), dtype=torch.float64)
    assert_close(got, want, atol=0, rtol=1e-14, name=f"YaRN frequencies {case}")


def test_v3_correction_range_and_endpoints():
    d, theta, s, bf, bs, L = CASES[0]
    low, high = yarn_correction_range(bf, bs, d, theta, L)
    assert (low, high) == (10, 23)  # pairs 0..10 keep their frequency, 23..31 are divided by 40
    f, y = rope_frequencies(d, theta), yarn_frequencies(d, theta, s, bf, bs, L)
    assert torch.equal(y[: low + 1], f[: low + 1])
    assert_close(y[high:], f[high:] / s, atol=0, rtol=1e-15, name="slow pairs divided by the factor")
    assert bool((y[low + 1 : high] < f[low + 1 : high]).all() and (y[low + 1 : high] > f[low + 1 : high] / s).all())


def test_v3_softmax_scale_and_activation():
    assert not MLAConfig.v3().yarn  # 4096 = original_seq_len: DeepSeek's code does not apply YaRN
    assert MLAConfig.v3().softmax_scale == 192 ** -0.5
    cfg = MLAConfig.v3(max_seq_len=SERVING_SEQ_LEN)
    assert cfg.yarn and cfg.rope_scaling == "yarn"
    mscale = 0.1 * 1.0 * math.log(40) + 1
    assert cfg.yarn_mscale == pytest.approx(1.3689, abs=1e-4)
    assert cfg.softmax_scale == pytest.approx(mscale**2 / math.sqrt(192), rel=1e-15)
    assert cfg.softmax_scale * math.sqrt(192) == pytest.approx(1.874, abs=1e-3)
    assert_close(cfg.rope_frequencies(), torch.tensor(reference_yarn_frequencies(*CASES[0]), dtype=torch.float64),
                 atol=0, rtol=1e-14, name="MLAConfig.v3(16384).rope_frequencies()")
    assert torch.equal(MLAConfig.v3().rope_frequencies(), rope_frequencies(64, 10000.0))
    assert cfg.latent_cache_elements_per_token == 576  # only the rotary frequencies change


def test_beyond_original_seq_len_a_rope_scaling_must_be_chosen():
    with pytest.raises(ValueError, match="rope_scaling"):
        MLAConfig(max_seq_len=4097)
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelConfig(max_seq_len=8192)
    with pytest.raises(ValueError, match="rope_scaling"):
        MLAConfig(max_seq_len=64, original_seq_len=32)
    with pytest.raises(ValueError, match="rope_scaling must be"):
        MLAConfig(rope_scaling="ntk")
    with pytest.raises(ValueError, match="rope_factor > 1"):
        MLAConfig(rope_scaling="yarn", rope_factor=1.0)
    plain = MLAConfig(max_seq_len=4097, rope_scaling="none")
    assert not plain.yarn and plain.softmax_scale == plain.qk_head_dim ** -0.5
    assert MLAConfig(max_seq_len=4096).rope_scaling is None  # up to original_seq_len nothing needs choosing
    assert ModelConfig(max_seq_len=8192, rope_scaling="yarn").mla().yarn


def _pair(cfg_kw: dict, seed: int = 0) -> tuple[MLA, MLA]:
    """The same weights under a plain and a YaRN configuration."""
    base = dict(dim=48, n_heads=3, q_lora_rank=40, kv_lora_rank=24, qk_nope_head_dim=10, qk_rope_head_dim=16, v_head_dim=14,
                max_seq_len=1024, original_seq_len=256)
    torch.manual_seed(seed)
    yarn = MLA(MLAConfig(**base, rope_scaling="yarn", **cfg_kw)).double()
    plain = MLA(MLAConfig(**base, rope_scaling="none")).double()
    plain.load_state_dict(yarn.state_dict())
    return plain, yarn


def test_mla_with_yarn_uses_the_yarn_angles_and_scale_on_both_paths():
    plain, yarn = _pair(dict(rope_factor=4.0, beta_fast=8))
    c = yarn.cfg
    assert yarn.softmax_scale == pytest.approx(c.qk_head_dim ** -0.5 * (0.1 * math.log(4.0) + 1) ** 2, rel=1e-15)
    x = torch.randn(2, 11, c.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start = 600  # beyond original_seq_len
    with torch.no_grad():
        y, p = yarn(x, return_attn=True)
        freqs = torch.tensor(reference_yarn_frequencies(16, 10000.0, 4.0, 8, 1, 256), dtype=torch.float64)
        ang = rope_angles(torch.arange(11), 16, freqs=freqs, dtype=torch.float64)
        q_nope, q_pe = yarn.queries(x, ang)
        k, v = yarn.expand(*yarn.latent(x, ang))
        s = torch.einsum("bthd,bshd->bhts", torch.cat([q_nope, q_pe], -1), k)
        want_p = (s * c.softmax_scale + causal_mask(11, 11, dtype=torch.float64)).softmax(-1)
        assert_close(p, want_p, atol=1e-13, name="attention probabilities with YaRN angles and mscale^2")
        assert float((y - plain(x)).abs().max()) > 1e-3, "YaRN must change the output"
        prompt = torch.randn(2, start, c.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        outs = {}
        for absorb in (True, False):
            cache = yarn.new_cache(batch=2)
            yarn(prompt, 0, cache, absorb=absorb)
            outs[absorb] = yarn(x, start, cache, absorb=absorb)  # positions 600.. read the whole cache
        full = yarn(torch.cat([prompt, x], 1))[:, start:]
    assert_close(outs[True], outs[False], atol=1e-12, name="absorbed == naive decode with YaRN")
    assert_close(outs[True], full, atol=1e-12, name="cached decode == full forward with YaRN")


def test_yarn_inactive_up_to_original_seq_len_changes_nothing():
    kw = dict(dim=48, n_heads=3, q_lora_rank=40, kv_lora_rank=24, qk_nope_head_dim=10, qk_rope_head_dim=16, v_head_dim=14,
              max_seq_len=256)
    torch.manual_seed(3)
    a = MLA(MLAConfig(**kw)).double()
    b = MLA(MLAConfig(**kw, rope_scaling="yarn")).double()  # chosen, but max_seq_len == original_seq_len: inactive
    b.load_state_dict(a.state_dict())
    assert not b.cfg.yarn and b.softmax_scale == a.softmax_scale
    x = torch.randn(1, 7, 48, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))

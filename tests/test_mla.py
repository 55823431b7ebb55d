"""Unit tests for course_lib.deepseek.mla (Multi-head Latent Attention and the MHA baseline)."""

from __future__ import annotations

import math

import pytest
import torch

from course_lib.deepseek.common import apply_rope, rope_angles
from course_lib.deepseek.mla import (
    HF_NAMES,
    MLA,
    KVCache,
    LatentKVCache,
    MLAConfig,
    MultiHeadAttention,
    causal_mask,
    mha_cache_elements_per_token,
)
from course_lib.testing import assert_close, expect_raises

# Distinct widths everywhere, so that a mixed-up dimension cannot pass by accident.
CONFIGS = {
    "default": MLAConfig(),
    "odd": MLAConfig(dim=48, n_heads=3, q_lora_rank=40, kv_lora_rank=24, qk_nope_head_dim=10, qk_rope_head_dim=6,
                     v_head_dim=14, max_seq_len=64),
    "no_q_lora": MLAConfig(dim=40, n_heads=2, q_lora_rank=0, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=4,
                           v_head_dim=8, max_seq_len=64),
}


def make(cfg: MLAConfig, seed: int = 0, dtype: torch.dtype = torch.float64) -> MLA:
    torch.manual_seed(seed)
    m = MLA(cfg).to(dtype)
    with torch.no_grad():  # non-trivial norm weights so that a skipped or misplaced norm shows
        for norm in (getattr(m, "q_norm", None), m.kv_norm):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
    return m


def rand_x(cfg: MLAConfig, B: int = 2, T: int = 9, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(B, T, cfg.dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def oracle(m: MLA, x: torch.Tensor, start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent per-head loop over the DeepSeek-V2 equations, written from the weights alone."""
    c = m.cfg
    B, T, _ = x.shape
    W = {k: v.detach() for k, v in m.state_dict().items()}

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * w

    def rope(v, pos):  # v (B, T, d) at integer positions pos (T,): interleaved pairs as complex numbers
        d = v.shape[-1]
        freqs = 1.0 / c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        rot = torch.polar(torch.ones(len(pos), d // 2, dtype=torch.float64), pos[:, None].double() * freqs)  # (T, d/2)
        vc = torch.view_as_complex(v.reshape(*v.shape[:-1], d // 2, 2).contiguous())  # (B, T, d/2)
        return torch.view_as_real(vc * rot).flatten(-2)

    pos = torch.arange(start_pos, start_pos + T)
    q = x @ W["wq.weight"].T if c.q_lora_rank == 0 else rms(x @ W["wq_a.weight"].T, W["q_norm.weight"]) @ W["wq_b.weight"].T
    kv = x @ W["wkv_a.weight"].T
    c_kv = rms(kv[..., : c.kv_lora_rank], W["kv_norm.weight"])
    k_pe = kv[..., c.kv_lora_rank :]  # (B, T, d_r)
    k_pe = rope(k_pe, pos)
    up = c_kv @ W["wkv_b.weight"].T  # (B, T, H * (d_h + d_v))
    outs, probs = [], []
    for h in range(c.n_heads):
        qh = q[..., h * c.qk_head_dim : (h + 1) * c.qk_head_dim]
        qh = torch.cat([qh[..., : c.qk_nope_head_dim], rope(qh[..., c.qk_nope_head_dim :], pos)], -1)
        blk = up[..., h * (c.qk_nope_head_dim + c.v_head_dim) : (h + 1) * (c.qk_nope_head_dim + c.v_head_dim)]
        kh = torch.cat([blk[..., : c.qk_nope_head_dim], k_pe], -1)
        vh = blk[..., c.qk_nope_head_dim :]
        s = qh @ kh.transpose(1, 2) / math.sqrt(c.qk_nope_head_dim + c.qk_rope_head_dim)  # (B, T, T)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        p = s.softmax(-1)
        probs.append(p)
        outs.append(p @ vh)
    o = torch.cat(outs, -1) @ W["wo.weight"].T
    return o, torch.stack(probs, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_naive_equals_absorbed_float64(name, seed):
    cfg = CONFIGS[name]
    m = make(cfg, seed)
    x = rand_x(cfg, seed=seed + 10)
    with torch.no_grad():
        y0, p0 = m(x, absorb=False, return_attn=True)
        y1, p1 = m(x, absorb=True, return_attn=True)
    assert_close(y1, y0, atol=1e-12, rtol=0, name="absorbed vs naive output")  # measured <= 1e-15
    assert_close(p1, p0, atol=1e-12, rtol=0, name="absorbed vs naive probabilities")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_independent_oracle(name):
    cfg = CONFIGS[name]
    m = make(cfg, 3)
    x = rand_x(cfg, T=7, seed=4)
    want, want_p = oracle(m, x, start_pos=5)
    for absorb in (False, True):
        with torch.no_grad():
            got, p = m(x, start_pos=5, absorb=absorb, return_attn=True)
        assert_close(got, want, atol=1e-12, rtol=0, name=f"MLA (absorb={absorb}) vs per-head oracle")
        assert_close(p, want_p, atol=1e-12, rtol=0, name="attention probabilities vs oracle")


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("absorb,kind", [(False, "latent"), (True, "latent"), (False, "full")])
def test_cached_decode_equals_full_forward(name, absorb, kind):
    cfg = CONFIGS[name]
    m = make(cfg, 5)
    x = rand_x(cfg, B=2, T=12, seed=6)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(batch=2, max_seq_len=16, kind=kind)
        outs = [m(x[:, :5], 0, cache, absorb=absorb)]  # chunked prefill, then one token at a time
        outs += [m(x[:, 5:8], 5, cache, absorb=absorb)]
        outs += [m(x[:, t : t + 1], t, cache, absorb=absorb) for t in range(8, 12)]
    assert cache.length == 12
    assert_close(torch.cat(outs, 1), full, atol=1e-12, rtol=0, name=f"cached ({kind}, absorb={absorb}) vs full forward")


def test_latent_cache_holds_normalised_latent_and_roped_shared_k_pe():
    cfg = CONFIGS["odd"]
    m = make(cfg, 7)
    x = rand_x(cfg, B=1, T=6, seed=8)
    cache = m.new_cache(batch=1)
    with torch.no_grad():
        m(x, 0, cache, absorb=True)
        raw = m.wkv_a(x)
        c_raw, k_raw = raw[..., : cfg.kv_lora_rank], raw[..., cfg.kv_lora_rank :]
    assert cache.c_kv.shape == (1, cfg.max_seq_len, cfg.kv_lora_rank)
    assert cache.k_pe.shape == (1, cfg.max_seq_len, cfg.qk_rope_head_dim), "k_pe is one shared key, not per head"
    assert_close(cache.c_kv[:, :6], m.kv_norm(c_raw), atol=1e-13, name="cached c_kv (must be kv_norm(c_kv))")
    angles = rope_angles(torch.arange(6), cfg.qk_rope_head_dim, dtype=torch.float64)
    assert_close(cache.k_pe[:, :6], apply_rope(k_raw, angles), atol=1e-13,
                 name="cached k_pe (roped, without kv_norm)")
    assert float(cache.c_kv[:, 6:].abs().sum()) == 0.0


def test_cache_sizes_at_v3_dims():
    cfg = MLAConfig.v3()
    assert cfg.latent_cache_elements_per_token == 576
    assert cfg.full_cache_elements_per_token == 40960
    assert mha_cache_elements_per_token(128, 128) == 32768
    lat = LatentKVCache.for_config(cfg, batch=1, dtype=torch.bfloat16, device="meta")
    mha = KVCache(1, cfg.max_seq_len, 128, 128, dtype=torch.bfloat16, device="meta")
    assert lat.elements_per_token == 576 and lat.bytes_per_token() == 1152
    assert mha.elements_per_token == 32768
    assert round(mha.nbytes / lat.nbytes, 1) == 56.9
    assert lat.nbytes == 576 * 2 * cfg.max_seq_len


def test_v3_config_and_scale():
    cfg = MLAConfig.v3()
    assert (cfg.dim, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank) == (7168, 128, 1536, 512)
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.qk_head_dim) == (128, 64, 128, 192)
    assert cfg.softmax_scale == pytest.approx(1 / math.sqrt(192), rel=1e-15)
    with torch.device("meta"):
        m = MLA(cfg)
    assert m.softmax_scale == pytest.approx(192 ** -0.5)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "wq_a.weight": (1536, 7168), "q_norm.weight": (1536,), "wq_b.weight": (128 * 192, 1536),
        "wkv_a.weight": (576, 7168), "kv_norm.weight": (512,), "wkv_b.weight": (128 * 256, 512),
        "wo.weight": (7168, 128 * 128),
    }


def test_scale_is_one_over_sqrt_nope_plus_rope():
    cfg = CONFIGS["odd"]
    m = make(cfg, 9)
    x = rand_x(cfg, B=1, T=5, seed=2)
    with torch.no_grad():
        _, p = m(x, return_attn=True)
        angles = rope_angles(torch.arange(5), cfg.qk_rope_head_dim, dtype=torch.float64)
        q_nope, q_pe = m.queries(x, angles)
        k, _ = m.expand(*m.latent(x, angles))
        s = torch.einsum("bthd,bshd->bhts", torch.cat([q_nope, q_pe], -1), k) + causal_mask(5, 5, dtype=torch.float64)
    for d, ok in ((cfg.qk_head_dim, True), (cfg.qk_nope_head_dim, False), (cfg.kv_lora_rank + cfg.qk_rope_head_dim, False)):
        close = torch.allclose(p, (s / math.sqrt(d)).softmax(-1), atol=1e-12)
        assert close is ok, f"scale 1/sqrt({d}) should {'' if ok else 'not '}match"


def test_rope_only_on_rope_dims_and_shared_k_pe():
    cfg = CONFIGS["default"]
    m = make(cfg, 11)
    x = rand_x(cfg, B=1, T=4, seed=3)
    a0 = rope_angles(torch.arange(4), cfg.qk_rope_head_dim, dtype=torch.float64)
    a1 = rope_angles(torch.arange(100, 104), cfg.qk_rope_head_dim, dtype=torch.float64)
    with torch.no_grad():
        qn0, qp0 = m.queries(x, a0)
        qn1, qp1 = m.queries(x, a1)
        c0, k0 = m.latent(x, a0)
        c1, k1 = m.latent(x, a1)
        keys, _ = m.expand(c0, k0)
    assert torch.equal(qn0, qn1) and torch.equal(c0, c1), "q_nope and c_kv must not depend on position"
    assert not torch.allclose(qp0, qp1) and not torch.allclose(k0, k1), "q_pe and k_pe must be rotated"
    assert k0.shape == (1, 4, cfg.qk_rope_head_dim)
    for h in range(1, cfg.n_heads):
        assert torch.equal(keys[:, :, h, cfg.qk_nope_head_dim :], keys[:, :, 0, cfg.qk_nope_head_dim :])


def test_relative_position_invariance():
    """RoPE makes scores depend on i - j only: shifting every position leaves the output unchanged."""
    cfg = CONFIGS["odd"]
    m = make(cfg, 12)
    x = rand_x(cfg, T=6, seed=13)
    with torch.no_grad():
        for absorb in (False, True):
            assert_close(m(x, 0, absorb=absorb), m(x, 37, absorb=absorb), atol=1e-10, name="shifted positions")


@pytest.mark.parametrize("absorb", [False, True])
def test_causality(absorb):
    cfg = CONFIGS["default"]
    m = make(cfg, 14)
    x = rand_x(cfg, T=10, seed=15)
    x2 = x.clone()
    x2[:, 6:] += torch.randn_like(x2[:, 6:])
    with torch.no_grad():
        y, p = m(x, absorb=absorb, return_attn=True)
        y2 = m(x2, absorb=absorb)
    assert torch.equal(y[:, :6], y2[:, :6]), "future tokens changed past outputs"
    assert not torch.allclose(y[:, 6:], y2[:, 6:])
    assert float(p.triu(1).abs().max()) == 0.0
    assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-12, name="probabilities sum")


def test_shapes_dtypes_and_gradients():
    cfg = CONFIGS["odd"]
    m = make(cfg, 0, dtype=torch.float32)
    x = rand_x(cfg, B=3, T=5, dtype=torch.float32).requires_grad_(True)
    y, p = m(x, return_attn=True)
    assert y.shape == (3, 5, cfg.dim) and y.dtype == torch.float32
    assert p.shape == (3, cfg.n_heads, 5, 5)
    y.square().sum().backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in m.parameters())
    y1 = m(x.detach(), absorb=True)
    assert_close(y1, y.detach(), atol=2e-6, rtol=1e-5, name="absorbed float32")  # measured ~3e-7
    mb = make(cfg, 0, dtype=torch.bfloat16)
    yb = mb(x.detach().bfloat16(), absorb=True)
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb).all()


def test_causal_mask():
    m = causal_mask(2, 5)  # queries at positions 3 and 4
    assert torch.equal(torch.isinf(m), torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool))
    assert float(causal_mask(1, 7).abs().sum()) == 0.0
    assert torch.equal(torch.isinf(causal_mask(3, 3)), torch.ones(3, 3, dtype=torch.bool).triu(1))


def test_errors():
    cfg = CONFIGS["default"]
    m = make(cfg)
    expect_raises(lambda: m(torch.zeros(2, 3, cfg.dim + 1, dtype=torch.float64)), ValueError, [f"(B, T, {cfg.dim})"])
    expect_raises(lambda: m(torch.zeros(2, cfg.dim, dtype=torch.float64)), ValueError, ["(B, T,"])
    full = m.new_cache(1, kind="full")
    expect_raises(lambda: m(rand_x(cfg, B=1, T=2), 0, full, absorb=True), ValueError, ["LatentKVCache"])
    lat = m.new_cache(1)
    expect_raises(lambda: m(rand_x(cfg, B=1, T=1), 3, lat), ValueError, ["hole"])
    expect_raises(lambda: m(rand_x(cfg, B=1, T=2), cfg.max_seq_len - 1), ValueError, ["max_seq_len"])
    expect_raises(lambda: m.new_cache(1, kind="paged"), ValueError, ["latent"])


def test_mha_cached_decode_causality_and_cache_size():
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 4, max_seq_len=32).double()
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    with torch.no_grad():
        full, p = mha(x, return_attn=True)
        cache = mha.new_cache(2)
        outs = [mha(x[:, :4], 0, cache)] + [mha(x[:, t : t + 1], t, cache) for t in range(4, 10)]
        x2 = x.clone()
        x2[:, 7:] = 0
        y2 = mha(x2)
    assert_close(torch.cat(outs, 1), full, atol=1e-12, name="MHA cached decode vs full")
    assert torch.equal(full[:, :7], y2[:, :7])
    assert cache.elements_per_token == mha_cache_elements_per_token(4, 16) == 128
    assert float(p.triu(1).abs().max()) == 0.0
    # oracle: F.scaled_dot_product_attention on the roped heads
    ang = rope_angles(torch.arange(10), 16, dtype=torch.float64)
    q = apply_rope(mha.wq(x).view(2, 10, 4, 16), ang).transpose(1, 2)
    k = apply_rope(mha.wk(x).view(2, 10, 4, 16), ang).transpose(1, 2)
    v = mha.wv(x).view(2, 10, 4, 16).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 10, 64)
    assert_close(full, mha.wo(o).detach(), atol=1e-12, name="MHA vs scaled_dot_product_attention")


def test_matches_hf_transformers_deepseek_v3_attention():
    hf = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    cfg = CONFIGS["odd"]
    hcfg = DeepseekV3Config(hidden_size=cfg.dim, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                            q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                            qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                            v_head_dim=cfg.v_head_dim, max_position_embeddings=cfg.max_seq_len, rope_interleave=True,
                            rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    hcfg._attn_implementation = "eager"
    ref = hf.DeepseekV3Attention(hcfg, layer_idx=0).double().eval()
    rot = hf.DeepseekV3RotaryEmbedding(hcfg)
    m = make(cfg, 21)
    state = {}
    for k, v in m.state_dict().items():
        prefix, rest = k.split(".", 1)
        state[f"{HF_NAMES[prefix]}.{rest}"] = v
    ref.load_state_dict(state, strict=True)
    x = rand_x(cfg, B=2, T=8, seed=22)
    pos = torch.arange(8)[None].expand(2, 8)
    with torch.no_grad():
        cos, sin = rot(x, pos)
        want = ref(x, (cos, sin), causal_mask(8, 8, dtype=torch.float64)[None, None].expand(2, 1, 8, 8))[0]
        got = m(x, absorb=True)
    # HF computes RoPE angles in float32 (~1e-7 angle error): measured max abs diff 5.6e-8 on both paths
    assert_close(got, want, atol=1e-6, rtol=1e-5, name="MLA vs HF DeepseekV3Attention")

"""DeepSeekV3Mini vs HF transformers' DeepseekV3ForCausalLM on the same weights (course_lib.deepseek.hf).

Measured on this machine (transformers 5.23, torch 2.13 CPU, the configs below, logits of magnitude ~6): float32
logits agree to 3.3e-6 .. 4.4e-6 max abs; float64 to ~2e-6 as shipped, because HF keeps the RoPE angles, RMSNorm
statistics, the router and the attention softmax in float32; and to ~1e-14 once those four float32 islands are
lifted to float64 (`_hf_float64_islands_lifted`). Both RoPE layouts give the same numbers.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from course_lib.bench import threads
from course_lib.deepseek.model import DeepSeekV3Mini, ModelConfig, from_hf, init_weights
from course_lib.testing import assert_close

transformers = pytest.importorskip("transformers")
hf_mod = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")

from course_lib.deepseek.hf import (  # noqa: E402
    config_from_hf,
    from_hf_checkpoint,
    hf_config,
    rope_permutation,
    stack_experts,
    to_hf,
    to_hf_checkpoint,
    unstack_experts,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is faster than two fighting over a shared machine."""
    with threads(1):
        yield


CONFIGS = {
    "dense_only": dict(n_layers=2, n_dense_layers=2, mtp_depth=0),
    "moe": dict(),
    "moe_groups_no_q_lora": dict(n_layers=3, n_dense_layers=1, q_lora_rank=0, n_routed_experts=8, n_activated_experts=3,
                                 n_expert_groups=4, n_limited_groups=2, route_scale=2.5),
    "moe_two_shared_wide_heads": dict(n_layers=3, n_dense_layers=2, n_heads=2, qk_nope_head_dim=24, qk_rope_head_dim=12,
                                      v_head_dim=20, kv_lora_rank=24, n_shared_experts=2, n_routed_experts=16,
                                      n_activated_experts=4, n_expert_groups=8, n_limited_groups=3),
}


def _model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **extra) -> DeepSeekV3Mini:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**CONFIGS[name], **extra})
    m = init_weights(DeepSeekV3Mini(cfg), seed, std=0.2)  # large weights: routing and attention far from uniform
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for moe in m.moe_layers():
            moe.gate.bias.copy_(torch.randn(moe.gate.bias.shape, generator=g) * 0.05)
        for p in m.parameters():
            if p.dim() == 1:  # RMSNorm weights away from 1, so a swapped norm shows
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return m.to(dtype).eval()


def _tokens(cfg: ModelConfig, B: int = 3, T: int = 21, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _hf_float64_islands_lifted(inv_freq: torch.Tensor | None = None):
    """Run HF's RoPE table, RMSNorm statistics, router and attention softmax in the input's dtype, not float32.

    ``inv_freq``: the float64 rotary frequencies to use (YaRN's); default ``theta^(-2i/d)``.
    """

    def norm_forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        d = 2 * self.inv_freq.numel()
        inv = self.config.rope_parameters["rope_theta"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        if inv_freq is not None:
            inv = inv_freq
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    orig_router = hf_mod.DeepseekV3TopkRouter.forward

    def router_forward(self, hidden_states):
        hs = hidden_states.view(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(hs, self.weight.to(hs.dtype))
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias.to(hs.dtype)
        G = self.num_group
        group_scores = choice.view(-1, G, self.num_experts // G).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        mask = mask.unsqueeze(-1).expand(-1, G, self.num_experts // G).reshape(-1, self.num_experts)
        choice = choice.masked_fill(~mask.bool(), float("-inf"))
        idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        w = w / w.sum(dim=-1, keepdim=True)
        return logits, w * self.routed_scaling_factor, idx

    def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        w = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = w.softmax(dim=-1)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w

    patches = [(hf_mod.DeepseekV3RMSNorm, "forward", norm_forward), (hf_mod.DeepseekV3RotaryEmbedding, "forward", rope_forward),
               (hf_mod.DeepseekV3TopkRouter, "forward", router_forward), (hf_mod, "eager_attention_forward", eager_attention)]
    saved = [(cls, name, getattr(cls, name)) for cls, name, _ in patches]
    try:
        for cls, name, fn in patches:
            setattr(cls, name, fn)
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)
        assert hf_mod.DeepseekV3TopkRouter.forward is orig_router


@pytest.mark.parametrize("rope_interleave", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf_float32(name, rope_interleave):
    m = _model(name)
    hf = to_hf(m, rope_interleave=rope_interleave)
    x = _tokens(m.cfg)
    with torch.no_grad():
        ours, theirs = m(x), hf(x).logits
    # measured max abs diff 3.3e-6 .. 4.4e-6 across configs (mostly HF's float32 RoPE angles)
    assert_close(ours, theirs, atol=1e-5, rtol=0, name=f"logits vs HF ({name}, rope_interleave={rope_interleave})",
                 hint="a weight mapped to the wrong HF name, or the RoPE rows not permuted for rope_interleave=False")


@pytest.mark.parametrize("name, rope_interleave", [(n, True) for n in CONFIGS] + [("moe_groups_no_q_lora", False)])
def test_logits_match_hf_float64(name, rope_interleave):
    m = _model(name, dtype=torch.float64)
    hf = to_hf(m, rope_interleave=rope_interleave)
    x = _tokens(m.cfg)
    with torch.no_grad():
        ours = m(x)
        shipped = hf(x).logits
        with _hf_float64_islands_lifted():
            lifted = hf(x).logits
    assert shipped.dtype == torch.float64
    # HF as shipped: float32 RoPE angles, RMSNorm statistics, router and softmax (measured 2.1e-6 .. 2.8e-6)
    assert_close(ours, shipped, atol=1e-5, rtol=0, name="float64 logits vs HF as shipped")
    # with those islands in float64 the two are the same function up to float64 round-off (measured 6e-15 .. 1.1e-14)
    assert_close(ours, lifted, atol=1e-12, rtol=0, name="float64 logits vs HF without float32 islands")


def test_float32_islands_are_the_only_float64_difference():
    """Without the patch the float64 error is float32-sized, with it float64-sized: the patch is what matters."""
    m = _model("moe_groups_no_q_lora", dtype=torch.float64)
    hf = to_hf(m)
    x = _tokens(m.cfg)
    with torch.no_grad():
        err_shipped = float((m(x) - hf(x).logits).abs().max())
        with _hf_float64_islands_lifted():
            err_lifted = float((m(x) - hf(x).logits).abs().max())
    assert err_shipped > 1e-10, err_shipped
    assert err_lifted < 1e-12, err_lifted


def test_rope_interleave_false_needs_the_permutation():
    """Loading our weights unpermuted into a rope_interleave=False model changes the logits."""
    m = _model("moe")
    good = to_hf(m, rope_interleave=False)
    bad = to_hf(m, rope_interleave=True)
    bad.config.rope_interleave = False
    x = _tokens(m.cfg)
    with torch.no_grad():
        assert float((good(x).logits - m(x)).abs().max()) < 1e-5
        assert float((bad(x).logits - m(x)).abs().max()) > 1e-3
    p = rope_permutation(8)
    assert p.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_hf_generate_matches_absorbed_latent_cache_generate():
    m = _model("moe_groups_no_q_lora")
    hf = to_hf(m)
    prompt = _tokens(m.cfg, B=2, T=7, seed=11)
    ours = m.generate(prompt, max_new_tokens=12)  # absorbed MLA over the latent cache
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours, theirs), f"\n{ours}\n{theirs}"


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_weight_round_trips(rope_interleave):
    m = _model("moe_groups_no_q_lora", mtp_depth=1)
    # hub checkpoint (per-expert tensors, MTP as layer n_layers): exact round trip
    ck = to_hf_checkpoint(m, include_mtp=True, rope_interleave=rope_interleave)
    back = from_hf_checkpoint(ck, m.cfg, rope_interleave=rope_interleave)
    for k, v in m.state_dict().items():
        assert torch.equal(back[k], v), k
    # module layout (stacked experts), both directions
    assert unstack_experts(stack_experts(ck, m.cfg), m.cfg).keys() == {k for k in ck if not k.startswith("model.layers.3.")}
    hf = to_hf(m, rope_interleave=rope_interleave)
    m2 = from_hf(hf)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k
    assert m2.cfg == config_from_hf(hf_config(m.cfg))


def test_mtp_is_omitted_by_hf_and_exported_under_hub_names():
    m = _model("moe", mtp_depth=1)
    hf = to_hf(m)
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_hf == m.num_parameters(), "HF holds exactly our main model: no MTP parameters"
    assert not any(k.startswith(f"model.layers.{m.cfg.n_layers}.") for k in hf.state_dict())
    # MTP weights never touch the main logits
    x = _tokens(m.cfg)
    with torch.no_grad():
        before = m(x)
        for p in m.mtp.parameters():
            p.add_(1.0)
        assert torch.equal(before, m(x))
    ck = to_hf_checkpoint(m, include_mtp=True)
    L = m.cfg.n_layers
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
                 "embed_tokens.weight", "self_attn.kv_b_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{L}.{name}" in ck, name
    assert torch.equal(ck[f"model.layers.{L}.shared_head.head.weight"], m.head.weight)
    # the hub's eh_proj reads [enorm(emb) ; hnorm(h)]; ours reads [hnorm(h) ; enorm(emb)]
    h, e = torch.randn(5, m.cfg.dim), torch.randn(5, m.cfg.dim)
    assert_close(torch.cat([e, h], -1) @ ck[f"model.layers.{L}.eh_proj.weight"].T, m.mtp[0].proj(torch.cat([h, e], -1)).detach(),
                 atol=1e-5, name="eh_proj column order")


def test_group_masking_minus_inf_vs_zero():
    """transformers 5.x masks dropped groups with -inf like DeepSeek: with negative biased scores our default
    model still matches HF, while transformers 4.x's 0.0 fill (group_mask_fill=0.0) routes differently."""
    m = _model("moe_groups_no_q_lora")
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.bias.fill_(-2.0)  # every biased score s + b < 0
    hf = to_hf(m)
    x = _tokens(m.cfg)
    legacy = _model("moe_groups_no_q_lora", group_mask_fill=0.0)
    legacy.load_state_dict(m.state_dict())
    with torch.no_grad():
        ours, theirs, old = m(x), hf(x).logits, legacy(x)
    assert_close(ours, theirs, atol=1e-5, rtol=0, name="-inf masking vs HF 5.x")
    assert float((old - theirs).abs().max()) > 1e-3, "0.0 fill should route some token outside its kept groups"


def test_config_checks():
    with pytest.raises(ValueError, match="eps"):
        hf_config(ModelConfig(rms_norm_eps=1e-5))
    with pytest.raises(ValueError, match="-inf"):
        hf_config(ModelConfig(group_mask_fill=0.0))
    hcfg = hf_config(ModelConfig(q_lora_rank=0))
    assert hcfg.q_lora_rank is None and hcfg.rope_interleave is True and hcfg.num_mtp_layers == 1
    hcfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0}
    with pytest.raises(ValueError, match="YaRN"):
        config_from_hf(hcfg)


# ----------------------------------------------------------------------------- YaRN (rope_parameters of type yarn)

# original context 256 extended 4x to 1024 (HF checks factor == max_position_embeddings / original); 16 rotary dims
# so that the ramp between the correction range's ends has interior pairs (beta_fast 8: low 1, high 4)
YARN = dict(max_seq_len=1024, original_seq_len=256, rope_scaling="yarn", rope_factor=4.0, beta_fast=8, beta_slow=1,
            qk_rope_head_dim=16, mscale=0.7)


def _yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    from test_yarn import reference_yarn_frequencies

    return torch.tensor(reference_yarn_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_factor, cfg.beta_fast,
                                                   cfg.beta_slow, cfg.original_seq_len), dtype=torch.float64)


def test_yarn_config_is_written_and_read_back():
    cfg = ModelConfig(**YARN)
    hcfg = hf_config(cfg)
    rope = hcfg.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0 and rope["original_max_position_embeddings"] == 256
    assert rope["mscale"] == rope["mscale_all_dim"] == 0.7 and rope["attention_factor"] == 1.0
    assert hcfg.max_position_embeddings == 1024
    back = config_from_hf(hcfg)
    for f in ("max_seq_len", "original_seq_len", "rope_scaling", "rope_factor", "beta_fast", "beta_slow", "mscale", "rope_theta"):
        assert getattr(back, f) == getattr(cfg, f), f
    hf_attn = hf_mod.DeepseekV3Attention(hcfg, layer_idx=0)
    assert hf_attn.scaling == pytest.approx(cfg.mla().softmax_scale, rel=1e-12), "HF's softmax scale = ours (mscale^2)"
    rot = hf_mod.DeepseekV3RotaryEmbedding(hcfg)
    assert rot.attention_scaling == 1.0, "DeepSeek's YaRN never scales cos/sin"
    assert_close(rot.inv_freq.double(), _yarn_inv_freq(cfg), atol=0, rtol=1e-6, name="HF yarn inv_freq (float32) vs formula")
    # inactive YaRN (max_seq_len <= original_seq_len) is written as plain RoPE, as DeepSeek's code computes it
    assert hf_config(ModelConfig(rope_scaling="yarn")).rope_parameters["rope_type"] == "default"


def test_yarn_hub_config_and_refusals():
    from transformers import DeepseekV3Config

    hub = DeepseekV3Config(max_position_embeddings=163840, rope_scaling={  # deepseek-ai/DeepSeek-V3 config.json
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn"})
    cfg = config_from_hf(hub)
    assert (cfg.rope_scaling, cfg.original_seq_len, cfg.rope_factor, cfg.mscale, cfg.max_seq_len) == ("yarn", 4096, 40.0, 1.0, 163840)
    assert cfg.mla().softmax_scale * 192 ** 0.5 == pytest.approx(1.874, abs=1e-3)
    base = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}
    for change, match in ((dict(mscale=1.0, mscale_all_dim=0.5), "cos/sin"), (dict(), "cos/sin"),
                          (dict(mscale=1.0, mscale_all_dim=1.0, truncate=False), "truncate")):
        h = hf_config(ModelConfig(**YARN))
        h.rope_parameters = {**base, **change}
        with pytest.raises(ValueError, match=match):
            config_from_hf(h)
    h = hf_config(ModelConfig(**YARN))
    h.max_position_embeddings = 256
    h.rope_parameters = {**base, "mscale": 1.0, "mscale_all_dim": 1.0}
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        config_from_hf(h)


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_yarn_logits_match_hf_float32(rope_interleave):
    m = _model("moe_groups_no_q_lora", **YARN)
    assert m.cfg.mla().yarn
    hf = to_hf(m, rope_interleave=rope_interleave)
    x = _tokens(m.cfg, T=40)
    with torch.no_grad():
        ours, theirs = m(x), hf(x).logits
        plain = to_hf(_model("moe_groups_no_q_lora", **{**YARN, "rope_scaling": "none"}))(x).logits
    assert_close(ours, theirs, atol=1e-5, rtol=0, name=f"YaRN logits vs HF (rope_interleave={rope_interleave})",
                 hint="rope_parameters not written as yarn, or mscale applied to cos/sin instead of the softmax scale")
    assert float((ours - plain).abs().max()) > 1e-3, "YaRN must change the logits"


def test_yarn_logits_match_hf_float64_without_float32_islands():
    m = _model("moe", dtype=torch.float64, **YARN)
    hf = to_hf(m)
    x = _tokens(m.cfg, T=40)
    with torch.no_grad():
        ours = m(x)
        with _hf_float64_islands_lifted(_yarn_inv_freq(m.cfg)):
            lifted = hf(x).logits
    assert_close(ours, lifted, atol=1e-12, rtol=0, name="float64 YaRN logits vs HF without float32 islands")


def test_yarn_generate_matches_hf():
    m = _model("moe_groups_no_q_lora", **YARN)
    hf = to_hf(m)
    prompt = _tokens(m.cfg, B=2, T=7, seed=11)
    ours = m.generate(prompt, max_new_tokens=12)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours, theirs), f"\n{ours}\n{theirs}"

"""Unit tests for course_lib.deepseek.model (DeepSeekV3Mini, MTP, training step, generation, counts) and the
multi-task language of course_lib.data."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from course_lib.bench import threads
from course_lib.data import IGNORE_INDEX, MultiTaskLanguage, answer_accuracy, per_task_accuracy
from course_lib.deepseek.common import SwiGLU
from course_lib.deepseek.fp8 import FP8Linear
from course_lib.deepseek.mla import LatentKVCache
from course_lib.deepseek.model import (
    DeepSeekV3Mini,
    MHABaseline,
    ModelConfig,
    MTPModule,
    TransformerBlock,
    convert_to_fp8,
    init_weights,
    mutual_information,
    param_counts,
    record_run,
    routing_by_task,
    train,
    train_step,
)
from course_lib.deepseek.moe import MoE, bias_update, expert_load
from course_lib.testing import assert_close


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is faster than two fighting over a shared machine."""
    with threads(1):
        yield


SMALL = dict(vocab_size=13, dim=32, n_layers=3, n_dense_layers=1, n_heads=2, inter_dim=48, q_lora_rank=24, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2,
             n_expert_groups=2, n_limited_groups=1, route_scale=2.5, max_seq_len=32)


def _model(seed=0, dtype=torch.float64, **kw) -> DeepSeekV3Mini:
    torch.manual_seed(seed)
    m = init_weights(DeepSeekV3Mini(ModelConfig(**{**SMALL, **kw})), seed, std=0.3).to(dtype)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for moe in m.moe_layers():
            moe.gate.bias.copy_(0.05 * torch.randn(moe.gate.bias.shape, generator=g))
    return m


def _tokens(m, B=2, T=11, seed=1):
    return torch.randint(0, m.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- structure and forward


def test_blocks_dense_then_moe_and_shapes():
    m = _model()
    assert [type(b.ffn) for b in m.layers] == [SwiGLU, MoE, MoE]
    assert isinstance(m.mtp[0], MTPModule) and isinstance(m.mtp[0].block.ffn, MoE)
    x = _tokens(m)
    assert m(x).shape == (2, 11, 13)
    h, infos = m.trunk(x)
    assert h.shape == (2, 11, 32) and len(infos) == 2
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        m(torch.randn(2, 11))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_block_is_pre_norm_residual():
    cfg = ModelConfig(**SMALL)
    torch.manual_seed(0)
    blk = TransformerBlock(1, cfg).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    y, info = blk(x)
    u = x + blk.attn(blk.attn_norm(x))
    want = u + blk.ffn(blk.ffn_norm(u))[0]
    assert_close(y, want, atol=1e-12, name="block output")
    assert info is not None and info.load.sum() == 2 * 5 * 2


def test_causality_future_tokens_never_change_past_logits():
    m = _model()
    x = _tokens(m, T=12)
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 3) % m.cfg.vocab_size
    with torch.no_grad():
        a, b = m(x), m(y)
    # equal up to float64 round-off (the MoE groups tokens by expert, so summation order can change)
    assert_close(a[:, :7], b[:, :7], atol=1e-12, rtol=0, name="logits before the change")
    assert float((a[:, 7:] - b[:, 7:]).abs().max()) > 1e-3


def test_absorbed_latent_cache_decoding_matches_full_forward():
    m = _model().eval()
    x = _tokens(m, T=10)
    with torch.no_grad():
        full = m(x)
        caches = m.new_caches(2, 10)
        assert all(isinstance(c, LatentKVCache) for c in caches)
        steps = [m(x[:, :4], 0, caches, absorb=True)]
        for t in range(4, 10):
            steps.append(m(x[:, t : t + 1], t, caches, absorb=True))
    assert_close(torch.cat(steps, 1), full, atol=1e-10, name="absorbed cached logits vs full forward")
    assert caches[0].elements_per_token == m.cfg.kv_lora_rank + m.cfg.qk_rope_head_dim


def test_generate_paths_agree_and_restore_mode():
    m = _model(dtype=torch.float32)
    m.train()
    p = _tokens(m, T=5)
    a = m.generate(p, 9)
    assert a.shape == (2, 14) and torch.equal(a[:, :5], p)
    assert torch.equal(a, m.generate(p, 9, absorb=False))
    assert torch.equal(a, m.generate(p, 9, use_cache=False))
    assert m.training, "generate must restore training mode"
    g1 = m.generate(p, 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    g2 = m.generate(p, 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g1, g2)
    with pytest.raises(ValueError, match="max_seq_len"):
        m.generate(p, 40)


# ----------------------------------------------------------------------------- losses, MTP, gradients


def test_mtp_loss_targets_two_ahead_with_the_shared_head():
    data = MultiTaskLanguage(n_digits=4)
    m = _model(vocab_size=data.vocab_size)
    b = data.sample(6, torch.Generator().manual_seed(0))
    out = m.compute_loss(b.inputs, b.targets)
    # oracle: the MTP module on h[:, :-1] and Emb(t_{i+1}), shared head, targets shifted by one more
    h, _ = m.trunk(b.inputs)
    mod = m.mtp[0]
    x = mod.proj(torch.cat([mod.hnorm(h[:, :-1]), mod.enorm(m.embed.weight[b.inputs[:, 1:]])], -1))
    hk, _ = mod.block(x)
    logits = mod.norm(hk) @ m.head.weight.T
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.targets[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert_close(out.mtp_loss, want, atol=1e-12, name="MTP loss")
    assert_close(out.loss, out.main_loss + 0.3 * out.mtp_loss + out.aux_loss, atol=1e-12, name="total loss")
    names = [n for n, _ in m.mtp.named_parameters()]
    assert not any("head" in n or "embed" in n for n in names), "MTP owns no head or embedding"
    with torch.no_grad():
        m.head.weight.zero_()
        assert float(m.compute_loss(b.inputs, b.targets).mtp_logits[0].abs().max()) == 0.0


def test_mtp_depth_two_and_zero():
    m = _model(mtp_depth=2)
    x = _tokens(m, T=9)
    t = _tokens(m, T=9, seed=2)
    out = m.compute_loss(x, t)
    assert [tuple(lg.shape) for lg in out.mtp_logits] == [(2, 8, 13), (2, 7, 13)]
    want = (F.cross_entropy(out.mtp_logits[0].reshape(-1, 13), t[:, 1:].reshape(-1))
            + F.cross_entropy(out.mtp_logits[1].reshape(-1, 13), t[:, 2:].reshape(-1))) / 2
    assert_close(out.mtp_loss, want, atol=1e-12, name="mean over depths")
    m0 = _model(mtp_depth=0)
    out0 = m0.compute_loss(x, t)
    assert out0.mtp_logits == [] and float(out0.mtp_loss) == 0.0


def test_balance_loss_only_in_training():
    m = _model()
    x, t = _tokens(m), _tokens(m, seed=2)
    out = m.compute_loss(x, t)
    assert out.aux_loss.item() > 0 and len(out.infos) == 3
    m.eval()
    assert float(m.compute_loss(x, t).aux_loss) == 0.0


def test_every_parameter_gets_a_finite_gradient():
    m = _model(dtype=torch.float32)
    x = _tokens(m, B=16, T=16)
    t = _tokens(m, B=16, T=16, seed=3)
    m.compute_loss(x, t).loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{n} has an all-zero gradient"
    for moe in m.moe_layers():
        assert not moe.gate.bias.requires_grad


def test_train_step_updates_bias_once_with_the_batch_load():
    m = _model(dtype=torch.float32)
    x, t = _tokens(m, B=8, T=12), _tokens(m, B=8, T=12, seed=4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    before = [moe.gate.bias.clone() for moe in m.moe_layers()]
    with torch.no_grad():
        loads = [expert_load(i.indices, m.cfg.n_routed_experts) for i in m.compute_loss(x, t).infos]
    w0 = m.layers[0].attn.wkv_a.weight.clone()
    st = train_step(m, opt, x, t)
    assert not torch.equal(w0, m.layers[0].attn.wkv_a.weight), "the optimiser stepped"
    for moe, b0, load, got in zip(m.moe_layers(), before, loads, st.loads):
        assert torch.equal(got, load)
        assert_close(moe.gate.bias, b0 + bias_update(load, m.cfg.bias_update_speed), atol=1e-7, name="bias after one step")
    nb = [moe.gate.bias.clone() for moe in m.moe_layers()]
    train_step(m, opt, x, t, balance=False)
    assert all(torch.equal(a, moe.gate.bias) for a, moe in zip(nb, m.moe_layers()))


# ----------------------------------------------------------------------------- counts, init, fp8, baseline


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=0), dict(n_dense_layers=3), dict(mtp_depth=2, n_shared_experts=2),
                                dict(n_dense_layers=0, mtp_depth=0)])
def test_param_counts_match_the_modules(kw):
    cfg = ModelConfig(**{**SMALL, **kw})
    m = DeepSeekV3Mini(cfg)
    c = param_counts(cfg)
    assert c["total"] == m.num_parameters()
    assert c["active"] == m.num_parameters(active=True)
    assert c["mtp"] == m.num_parameters(mtp=True)
    assert sum(p.numel() for p in m.parameters()) == c["total"] + c["mtp"]


def test_deepseek_v3_counts():
    c = param_counts(ModelConfig.v3())
    assert abs(c["total"] / 1e9 - 671.0) < 0.5, c["total"]  # "671B total"
    assert round(c["active"] / 1e9, 1) == 36.6, c["active"]  # "37B activated": without the embedding table
    # MTP module plus its (shared, stored again) embedding and head: the hub's 685B - 671B = 14B
    assert abs((c["mtp"] + c["embedding"] + c["head"]) / 1e9 - 13.5) < 0.5
    assert c["attention_per_layer"] == 187_107_328


def test_init_weights_depends_on_names_only():
    cfg = ModelConfig(**SMALL)
    torch.manual_seed(0)
    a = init_weights(DeepSeekV3Mini(cfg), 7)
    torch.manual_seed(1)
    b = init_weights(DeepSeekV3Mini(cfg), 7)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    c = init_weights(DeepSeekV3Mini(cfg), 8)
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_fp8_model_converts_block_linears_only_and_stays_close():
    cfg = ModelConfig(**{**SMALL, "dim": 64})
    ref = init_weights(DeepSeekV3Mini(cfg), 0, std=0.02)
    fp8 = DeepSeekV3Mini(ModelConfig(**{**SMALL, "dim": 64, "fp8": True}))
    fp8.load_state_dict(ref.state_dict())
    linears = [n for n, mod in fp8.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert linears == ["head"], linears
    assert isinstance(fp8.layers[1].attn.wkv_b, FP8Linear) and isinstance(fp8.mtp[0].proj, FP8Linear)
    x = _tokens(ref, B=4, T=16)
    with torch.no_grad():
        a, b = ref(x), fp8(x)
    rel = float((a - b).norm() / a.norm())
    assert 1e-4 < rel < 0.05, rel  # measured 0.9% at init std 0.02 (one FP8Linear alone: 3.6%, E4M3's 3 mantissa bits)
    out = fp8.compute_loss(x, _tokens(ref, B=4, T=16, seed=3))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in fp8.parameters() if p.grad is not None)
    assert convert_to_fp8(torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False)))[0].__class__ is FP8Linear


def test_mha_baseline_and_cache_sizes():
    cfg = ModelConfig(**SMALL)
    base = MHABaseline(cfg)
    x = torch.randint(0, 13, (2, 9))
    assert base(x).shape == (2, 9, 13)
    mha = base.new_caches(1, 16)[0].elements_per_token
    mla = DeepSeekV3Mini(cfg).new_caches(1, 16)[0].elements_per_token
    assert mha == 2 * 2 * 12 and mla == 16 + 4


# ----------------------------------------------------------------------------- data and training


def test_multitask_language_matches_its_oracle():
    data = MultiTaskLanguage(n_digits=6)
    b = data.sample(64, torch.Generator().manual_seed(0))
    assert b.inputs.shape == (64, data.block_size) and data.vocab_size == 18
    assert set(b.task.tolist()) == {0, 1, 2, 3}
    for i in range(64):
        task = data.TASKS[int(b.task[i])]
        last = int(b.targets[i, -1]) if int(b.targets[i, -1]) != IGNORE_INDEX else data.pad
        seq = b.inputs[i].tolist() + [last]
        m_ = data.add_digits
        if task == "add":
            digits = seq[1 : 1 + m_] + seq[2 + m_ : 2 + 2 * m_] + [0] * (data.n_digits - 2 * m_)
        else:
            digits = seq[1 : 1 + data.n_digits]
        want = data.sequence(task, digits)
        assert seq == want, (task, data.decode(seq), data.decode(want))
        P, A = data.prompt_length(task), data.answer_length(task)
        mask = b.answer_mask[i]
        assert mask.nonzero().flatten().tolist() == list(range(P - 1, P + A)), task
    assert data.answer("add", [9, 9, 9, 1, 0, 0]) == [0, 0, 0, 1]  # 999 + 1 = 1000, least significant first
    assert data.decode(data.problem("reverse", [1, 2, 3, 4, 5, 6])) == "<rev>123456="


def test_accuracy_helpers():
    data = MultiTaskLanguage(n_digits=4)
    b = data.sample(32, torch.Generator().manual_seed(1))
    perfect = F.one_hot(b.targets.clamp_min(0), data.vocab_size).double() * 10
    acc = answer_accuracy(perfect, b)
    assert acc == {"token_acc": 1.0, "seq_acc": 1.0}
    assert all(v == 1.0 for v in per_task_accuracy(perfect, b).values())
    assert answer_accuracy(torch.zeros_like(perfect), b)["seq_acc"] < 0.2


def test_training_learns_and_routing_by_task_is_a_distribution():
    torch.manual_seed(0)
    data = MultiTaskLanguage(n_digits=4)
    m = init_weights(DeepSeekV3Mini(ModelConfig(vocab_size=data.vocab_size)), 0)
    r = train(m, data, steps=40, batch_size=32, lr=1e-2, eval_every=20)
    assert r.history["loss"][-1] < r.history["loss"][0] - 0.5
    assert len(r.evals) == 2 and len(r.history["load"]) == 40
    share = routing_by_task(m, data, per_task=16)
    assert share.shape == (1, 4, 8)  # one MoE layer in the default trunk
    assert_close(share.sum(-1), torch.ones(1, 4, dtype=torch.float64), atol=1e-12, name="rows")


def test_mutual_information_bounds():
    assert mutual_information(torch.eye(4)) == pytest.approx(2.0)
    assert mutual_information(torch.ones(4, 8) / 8) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]) == pytest.approx(1.0)


def test_record_run_is_json_ready_and_switches_balancing_off():
    import json

    rec = record_run("no_balance", steps=3, seed=0, load_every=1)
    json.dumps(rec)
    assert rec["balance"] is False and rec["config"]["seq_aux_alpha"] == 0.0
    assert len(rec["loss"]) == 3 and len(rec["loads"]) == 3 and len(rec["max_vio_per_layer"][0]) == 2
    assert all(b == 0.0 for layer in rec["gate_bias"] for b in layer), "no bias update without balancing"
    assert len(rec["routing_by_task"]) == 1 and len(rec["routing_by_task"][0]) == 4


def test_autocast_training_follows_fp32_and_refreshes_its_weight_cache():
    """bf16 autocast per step learns like FP32, and every step computes with the current weights.

    One autocast context around a whole loop keeps the bf16 copies of the weights from its first step (torch
    caches weight casts until the context exits): the loss a step reports then differs from a fresh forward.
    """
    torch.manual_seed(0)
    data = MultiTaskLanguage(n_digits=4)
    cfg = ModelConfig(vocab_size=data.vocab_size, **{k: v for k, v in SMALL.items() if k != "vocab_size"})
    drops = {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        r = train(init_weights(DeepSeekV3Mini(cfg), 0), data, steps=30, batch_size=16, lr=1e-2, eval_every=30, amp_dtype=amp)
        drops[name] = r.history["main_loss"][0] - r.history["main_loss"][-1]
    assert drops["fp32"] > 0.3 and drops["bf16"] > 0.7 * drops["fp32"], drops

    def second_step_gap(outer_context: bool) -> float:
        m = init_weights(DeepSeekV3Mini(cfg), 0)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        b = data.sample(16, torch.Generator().manual_seed(5))
        with torch.autocast("cpu", dtype=torch.bfloat16) if outer_context else contextlib.nullcontext():
            train_step(m, opt, b.inputs, b.targets, amp_dtype=torch.bfloat16)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a copy: new tensors, fresh casts
                fresh = float(copy.deepcopy(m).compute_loss(b.inputs, b.targets).loss)
            reported = train_step(m, opt, b.inputs, b.targets, amp_dtype=torch.bfloat16).loss
        return abs(reported - fresh)

    assert second_step_gap(False) < 1e-3, "a training step under autocast used stale (cached) bf16 weights"
    assert second_step_gap(True) > 1e-2, "the check above cannot see a stale autocast cache any more"


# ----------------------------------------------------------------------------- the given modules of Section 5


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=0, n_dense_layers=0), dict(mtp_depth=2, n_shared_experts=0),
                                dict(n_dense_layers=3, mtp_depth=0)])
def test_hf_state_dict_names_match_the_model_without_building_it(kw):
    """``course_lib.deepseek.hf`` names the model's weights from its parts (it never imports the reference model)."""
    from course_lib.deepseek.hf import state_dict_names

    cfg = ModelConfig(**{**SMALL, **kw})
    assert state_dict_names(cfg) == list(DeepSeekV3Mini(cfg).state_dict())


def test_given_training_loop_drives_any_model_and_dict_step():
    """``training.train`` / ``record_run`` drive the model class and step they are handed (the learner's in the
    notebook): a step returning a dict, no ``balance`` argument; balancing off freezes the biases."""
    from course_lib.deepseek import training

    calls = []

    def my_step(model, opt, inputs, targets):
        st = train_step(model, opt, inputs, targets)
        calls.append(1)
        return {f: getattr(st, f) for f in ("loss", "main_loss", "mtp_loss", "aux_loss", "grad_norm", "loads", "max_vio")}

    class MyModel(DeepSeekV3Mini):
        pass

    rec = training.record_run("no_balance", steps=2, seed=0, load_every=1, model_cls=MyModel, step_fn=my_step)
    assert len(calls) == 2 and rec["balance"] is False
    assert all(b == 0.0 for layer in rec["gate_bias"] for b in layer)
    ref = record_run("no_balance", steps=2, seed=0, load_every=1)
    assert rec["loss"] == ref["loss"] and rec["loads"] == ref["loads"]
    m, _ = training.build_run_model(MyModel, 0, fp8=True)
    assert any(isinstance(x, FP8Linear) for x in m.layers.modules())
    assert not isinstance(m.head, FP8Linear) and sum(isinstance(x, FP8Linear) for x in m.modules()) == sum(
        isinstance(x, FP8Linear) for x in training.build_run_model(DeepSeekV3Mini, 0, fp8=True)[0].modules())

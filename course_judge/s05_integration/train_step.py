"""Exercise 5.3.1: one training step (loss, backward, clip, optimiser step, then the bias update)."""

from __future__ import annotations

import copy
import functools

import torch

from course_judge.checks import assert_true, expect_float
from course_judge.local import Alternative, Mutant
from course_judge.s05_integration._common import INIT, cfg, close, load_weights, make_ref, remote_cfg
from course_lib.data import MultiTaskLanguage
from course_lib.deepseek.model import DeepSeekV3Mini
from course_lib.deepseek.model_config import ModelConfig
from course_lib.deepseek.moe import max_violation

GRADE_ID = "test_05_6_train_step"
POINTS = 3
ANSWERS = ("ex_05_6_train_step",)
SUMMARY = ("the returned losses, pre-clipping gradient norm, loads and MaxVio against a reference step; the bias moved once, "
           "after the forward, in every MoE layer; the weights after two SGD steps (zero_grad, the total loss, clipping)")
REFERENCE = ("course_lib.deepseek.model",)

KEYS = ("loss", "main_loss", "mtp_loss", "aux_loss", "grad_norm", "loads", "max_vio")
LR, CLIP = 0.5, 1e-2


def _step(model, x, y, *, clip=CLIP, loss="loss", zero=True, train=True, update=1, clip_first=True) -> dict:
    """One reference step with SGD(lr=LR) (``model`` keeps its ``_opt`` between calls), with knobs for the usual slips."""
    opt = model.__dict__.setdefault("_opt", torch.optim.SGD(model.parameters(), lr=LR))
    model.train(train)
    out = model.compute_loss(x, y)
    if zero:
        opt.zero_grad(set_to_none=True)
    getattr(out, loss).backward()
    if clip_first:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    else:
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    loads = [i.load.detach() for i in out.infos]
    for _ in range(update):
        model.update_biases(loads)
    return {"loss": out.loss.item(), "main_loss": out.main_loss.item(), "mtp_loss": out.mtp_loss.item(),
            "aux_loss": out.aux_loss.item(), "grad_norm": float(norm), "loads": loads}


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _biases(model) -> list[torch.Tensor]:
    return [m.gate.bias.detach().clone() for m in model.moe_layers()]


def _stats(st, n_moe: int) -> dict:
    assert_true(isinstance(st, dict), f"train_step should return a dict, got {type(st).__name__}")
    missing = [key for key in KEYS if key not in st]
    assert_true(not missing, f"train_step's dict misses {missing}; got {sorted(st)}")
    assert_true(isinstance(st["loads"], (list, tuple)) and len(st["loads"]) == n_moe,
                f"{n_moe} MoE layers (main blocks and MTP block) need {n_moe} loads, got "
                f"{len(st['loads']) if isinstance(st['loads'], (list, tuple)) else type(st['loads']).__name__}",
                hint="loads = [info.load for info in out.infos]")
    return st


def _optimizer(k, m, kind: str, **kw):
    params = k.call_opts(m.parameters, keep=True)
    return k.call_opts(k.lib(f"torch.optim:{kind}"), (params,), kw, keep=True)


def _remote_biases(k, m, n: int, names: list[str]) -> list[torch.Tensor]:
    sd = k.call(m.state_dict)
    return [sd[name] for name in names[:n]]


def judge(k, t):
    step = k.g.train_step
    lang = MultiTaskLanguage(n_digits=4)
    with t.part("visible checks: the dict's keys, one load per MoE layer, every bias moved by exactly gamma (or 0)", 0.5):
        c0 = ModelConfig(vocab_size=lang.vocab_size)
        k.seed(0)
        m = k.g.DeepSeekV3Mini(remote_cfg(k, c0))
        k.call(k.lib(INIT), m, seed=0)
        opt = _optimizer(k, m, "AdamW", lr=1e-2)
        b = lang.sample(16, torch.Generator().manual_seed(0))
        names = [n for n in k.info(m)["buffers"] if n.endswith("gate.bias")]
        b0 = _remote_biases(k, m, 2, names)
        st = _stats(k.call(step, m, opt, b.inputs, b.targets), 2)
        for before, after in zip(b0, _remote_biases(k, m, 2, names)):
            d = (after - before).abs()
            assert_true(bool((((d - c0.bias_update_speed).abs() < 1e-7) | (d == 0)).all()) and bool(d.max() > 0),
                        "after one step every bias moved by exactly gamma (or 0 for an expert at the mean load)",
                        hint="call model.update_biases(loads) once, after optimizer.step()")
        del st

    c = cfg(vocab_size=lang.vocab_size, n_layers=2, n_dense_layers=1, bias_update_speed=0.01, seq_aux_alpha=1e-2, max_seq_len=16)
    torch.manual_seed(3)
    ref = make_ref(DeepSeekV3Mini(c), 3, std=0.1)
    g = torch.Generator().manual_seed(5)
    b1, b2 = lang.sample(24, g), lang.sample(24, g)
    names = [n for n in ref.state_dict() if n.endswith("gate.bias")]
    state: dict = {}

    def run(**knobs):
        r = copy.deepcopy(ref)
        s1 = _step(r, b1.inputs, b1.targets, **knobs)
        return r, s1

    @functools.cache
    def reference():  # one reference step (after the learner's step ran: an unfinished train_step costs nothing here)
        return run()

    def first_step():  # the learner's model with the reference's weights, one step of the learner's train_step
        assert_true("failed" not in state, "train_step must run on the reference's weights first (previous part)")
        if not state:
            state["failed"] = True
            k.seed(3)
            m = k.g.DeepSeekV3Mini(remote_cfg(k, c))
            load_weights(k, m, ref, "DeepSeekV3Mini")
            k.call(m.eval)  # train_step must put the model in training mode itself
            opt = _optimizer(k, m, "SGD", lr=LR)
            st = _stats(k.call(step, m, opt, b1.inputs, b1.targets, clip_norm=CLIP), len(names))
            state.update(m=m, opt=opt, st=st, w1=dict(k.call(m.state_dict)))
            del state["failed"]
        return state

    with t.part("the returned statistics: this batch's losses before the step, the gradient norm before clipping, the loads "
                "of this forward pass, MaxVio per layer", 0.5):
        st = first_step()["st"]
        r1, want1 = reference()
        for key in ("loss", "main_loss", "mtp_loss", "aux_loss"):
            v = expect_float(st[key], f"train_step(...)[{key!r}]")
            if abs(v - want1[key]) > 1e-9 and abs(v - run(train=False)[1][key]) < 1e-9:
                raise AssertionError(f"{key} {v:.6f} is the eval-mode value (expected {want1[key]:.6f})\n  likely cause: call "
                                     "model.train() first: in eval mode the MoE adds no balance loss")
            assert_true(abs(v - want1[key]) < 1e-9, f"returned {key} {v:.6f}, this batch's {key} before the step is {want1[key]:.6f}",
                        hint="return out.loss.item() etc. of the forward pass this step trained on")
        gn = expect_float(st["grad_norm"], "train_step(...)['grad_norm']")
        assert_true(abs(gn - want1["grad_norm"]) < 1e-7 * max(1.0, want1["grad_norm"]),
                    f"returned grad_norm {gn:.6g}, the gradient norm before clipping is {want1['grad_norm']:.6g}",
                    hint=("grad_norm is the norm before clipping, clip_grad_norm_'s return value, not the clipped norm"
                          if abs(gn - CLIP) < 1e-9 else "torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm) returns it"))
        for i, (a, w) in enumerate(zip(st["loads"], want1["loads"])):
            assert_true(isinstance(a, torch.Tensor) and torch.equal(a.float(), w.float()),
                        f"MoE layer {i}: the returned load is not this batch's (the routing of this step's forward pass)",
                        hint="loads = [info.load for info in out.infos] of the forward pass that produced the loss")
            mv = expect_float(st["max_vio"][i], f"max_vio[{i}]")
            assert_true(abs(mv - max_violation(w)) < 1e-6, f"max_vio of layer {i}: {mv:.4g}, expected {max_violation(w):.4g}",
                        hint="max_violation(load) for every MoE layer")

    with t.part("the bias update: exactly once per step, with the loads of this step's forward pass, in every MoE layer (MTP "
                "included)", 1):
        got_w1 = first_step()["w1"]
        r1, _ = reference()
        b0 = _biases(ref)
        want = _biases(r1)
        got = [got_w1[n].to(torch.float64) for n in names]
        for i, (a, w, z) in enumerate(zip(got, want, b0)):
            def mistakes(i=i, w=w, z=z):
                return {"the gate bias never moved: call model.update_biases(loads) after optimizer.step()": z,
                        "the bias moved twice: call model.update_biases(loads) exactly once per step": _biases(run(update=2)[0])[i],
                        "the bias moved the wrong way: overloaded experts go down, b_i += gamma * sign(mean_load - load_i)": 2 * z - w}
            close(a, w, atol=1e-7, name=f"gate bias of MoE layer {i} after one step", mistakes=mistakes,
                  hint="model.update_biases([info.load for info in out.infos]) once, after optimizer.step()")

    with t.part("the weights after one and two SGD steps equal a reference step's: zero_grad, backward of the total loss, "
                "clipping before the step", 1):
        got_w1, m, opt = first_step()["w1"], state["m"], state["opt"]
        r1, _ = reference()
        @functools.cache
        def variants() -> dict[str, dict[str, torch.Tensor]]:
            return {why: _weights(run(**knobs)[0]) for why, knobs in (
                ("the gradients are not clipped before the step: torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm) "
                 "between backward() and optimizer.step()", {"clip": float("inf")}),
                ("only the main loss is back-propagated: the total loss (main + lambda mtp + aux) trains the model",
                 {"loss": "main_loss"}),
                ("the model trained in eval mode: call model.train() first (the MoE's balance loss exists only in training)",
                 {"train": False}))}

        for n, w in _weights(r1).items():
            close(got_w1[n], w, atol=1e-9, name=f"{n} after one step",
                  mistakes=lambda n=n: {why: vw[n] for why, vw in variants().items()})
        k.call(step, m, opt, b2.inputs, b2.targets, clip_norm=CLIP)
        got_w2 = k.call(m.state_dict)
        r2, _ = run()  # (a copy would lose the gradients left by step 1, which the mistake below accumulates)
        _step(r2, b2.inputs, b2.targets)
        @functools.cache
        def accumulated() -> dict[str, torch.Tensor]:
            acc, _ = run()
            _step(acc, b2.inputs, b2.targets, zero=False)
            return _weights(acc)

        for n, w in _weights(r2).items():
            close(got_w2[n], w, atol=1e-9, name=f"{n} after two steps",
                  mistakes=lambda n=n: {"the gradients accumulate across steps: optimizer.zero_grad() before backward()": accumulated()[n]})


MUTANTS = [
    Mutant("bias updated twice", "    model.update_biases(loads)\n", "    model.update_biases(loads)\n    model.update_biases(loads)\n",
           expect="moved twice"),
    Mutant("no zero_grad", "    optimizer.zero_grad(set_to_none=True)\n", "", expect="accumulate"),
    Mutant("no clipping", "clip_grad_norm_(model.parameters(), clip_norm)", "clip_grad_norm_(model.parameters(), float(\"inf\"))",
           expect="not clipped"),
    Mutant("clip after the step",
           "    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)\n    optimizer.step()\n",
           "    optimizer.step()\n    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)\n", expect="not clipped"),
    Mutant("grad_norm after clipping", '"grad_norm": grad_norm.item()', '"grad_norm": min(grad_norm.item(), clip_norm)',
           expect="norm before clipping"),
    Mutant("main loss only", "out.loss.backward()", "out.main_loss.backward()", expect="only the main loss"),
    Mutant("no bias update", "    model.update_biases(loads)\n", "", expect="never moved"),
    Mutant("no train mode", "    model.train()\n", "", expect="model.train()"),
]

ALTERNATIVES = [
    Alternative("float() conversions and a manual order", source='''
def train_step(model, optimizer, inputs, targets, clip_norm=1.0):
    ### BEGIN SOLUTION
    model.train(True)
    optimizer.zero_grad()
    result = model.compute_loss(inputs, targets)
    result.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm=clip_norm)
    optimizer.step()
    with torch.no_grad():
        loads = [info.load.clone() for info in result.infos]
        model.update_biases(loads)
    stats = {name: float(getattr(result, name)) for name in ("loss", "main_loss", "mtp_loss", "aux_loss")}
    stats.update(grad_norm=float(norm), loads=loads, max_vio=[max_violation(x) for x in loads])
    return stats
    ### END SOLUTION
'''),
]

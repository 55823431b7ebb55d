"""Exercise 4.2: LossScaler (dynamic loss scaling as torch.amp.GradScaler) and MixedPrecisionTrainer.train_step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from course_judge.checks import assert_true, expect_float
from course_judge.local import Alternative, Mutant
from course_judge.s04_fp8._common import batch
from course_judge.session import LearnerError
from course_lib.bench import threads
from course_lib.deepseek.common import RMSNorm, SwiGLU

GRADE_ID = "test_04_2_trainer"
POINTS = 6
ANSWERS = ("ex_04_2_trainer",)
SUMMARY = ("LossScaler's trajectory (x0.5 on overflow, x2 after growth_interval clean steps, the counter reset), unscale_; "
           "20 fp16 steps against torch.amp.GradScaler (scale, skipped steps, parameters, clipping after unscaling, "
           "the unscaled loss and gradient norm); bf16 autocast and fp8 linears with FP32 master weights")
REFERENCE = ("course_lib.deepseek.fp8",)

GROWS_EVERY_STEP = "the loss scale grows every step (it must wait growth_interval clean steps)"
NEVER_GROWS = "loss scale never grows back: after growth_interval clean steps in a row it must double"
NOT_RESET_ON_OVERFLOW = "the clean-step counter is not reset on overflow: growth needs growth_interval clean steps IN A ROW"
NOT_RESET_ON_GROWTH = "the clean-step counter is not reset when the scale grows: the next growth needs another growth_interval steps"
SCALED_LOSS = "the returned loss is the scaled loss ({} too large): return the loss before scaling (train_step reports it unscaled)"


# ----------------------------------------------------------------------------- the loss scaler's rules and its mistakes


def _trajectory(pattern, interval, init=2.0**16, *, mistake=None) -> list[float]:
    """The scale after each update(found_inf) of ``pattern`` under GradScaler's rules, or with one known mistake."""
    scale, tracker, out = init, 0, []
    for inf in pattern:
        if inf:
            scale *= 1.0 if mistake == "no backoff" else 2.0 if mistake == "backoff grows" else 0.5
            if mistake != "not reset on overflow":
                tracker = 0
        else:
            tracker += 1
            if mistake == "grows every step":
                scale *= 2.0
            elif mistake == "not reset on growth (>=)":
                if tracker >= interval:
                    scale *= 2.0
            elif mistake == "not reset on growth (==)":
                if tracker == interval:
                    scale *= 2.0
            elif tracker >= interval:
                if mistake != "never grows":
                    scale *= 2.0
                tracker = 0
        out.append(scale)
    return out


_SCALER_MISTAKES = {
    "grows every step": GROWS_EVERY_STEP,
    "never grows": NEVER_GROWS,
    "not reset on overflow": NOT_RESET_ON_OVERFLOW,
    "not reset on growth (>=)": NOT_RESET_ON_GROWTH + " (here it grows on every clean step after the first growth)",
    "not reset on growth (==)": NOT_RESET_ON_GROWTH + " (here it grows only once)",
    "no backoff": "an overflow must halve the scale (x backoff_factor): it stayed the same",
    "backoff grows": "an overflow must halve the scale: it was multiplied by 2",
}


def _why_trajectory(got, pattern, interval, init=2.0**16) -> str | None:
    for m, why in _SCALER_MISTAKES.items():
        if got == _trajectory(pattern, interval, init, mistake=m):
            return why
    return None


# ----------------------------------------------------------------------------- models the judge rebuilds


def _toy() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


class _TinyLM(nn.Module):
    """The notebook's given TinyLM, rebuilt here (same parameter names) to compute reference losses."""

    def __init__(self, vocab: int = 128, dim: int = 128, hidden: int = 256, n_layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(RMSNorm(dim) for _ in range(n_layers))
        self.mlps = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + mlp(norm(h))
        return self.head(self.norm(h))


def _lm_loss(model, batch):
    return F.cross_entropy(model(batch["x"]).float(), batch["y"])


def _sample(P: torch.Tensor, n: int, g: torch.Generator) -> dict:
    x = torch.randint(0, P.shape[0], (n,), generator=g)
    return {"x": x, "y": torch.multinomial(P[x], 1, generator=g).squeeze(1)}


def _kernel_module(k, build):
    """Build a torch module in the kernel from ``build`` = (class path, args, children of one level); returns a handle.

    The children are built in one round trip (modules are not data: they come back as handles).
    """
    path, args, children = build
    kids = batch(k, [(k.lib(p), a, {}) for p, a, _ in children]) if children else []
    return k.call_opts(k.lib(path), (*kids, *args), keep=True)


_TOY = ("torch.nn:Sequential", (), [("torch.nn:Linear", (16, 32), []), ("torch.nn:Tanh", (), []), ("torch.nn:Linear", (32, 4), [])])


def _grad_scaler_run(state, batches, *, growth_interval, max_norm, lr, clip_before_unscale=False, autocast=True):
    """The fp16 loop with torch.amp.GradScaler: per step (loss, grad_norm, skipped, scale), and the parameters after it.

    One thread, as the grading kernel runs (so fp16 GEMMs round the same way).
    """
    with threads(1):
        return _grad_scaler_loop(state, batches, growth_interval=growth_interval, max_norm=max_norm, lr=lr,
                                 clip_before_unscale=clip_before_unscale, autocast=autocast)


def _grad_scaler_loop(state, batches, *, growth_interval, max_norm, lr, clip_before_unscale, autocast):
    model = _toy()
    model.load_state_dict(state)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    gs = torch.amp.GradScaler("cpu", growth_interval=growth_interval)
    logs, snaps = [], []
    for b in batches:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            loss = _lm_loss(model, b)
        scale = gs.get_scale()
        gs.scale(loss.float()).backward()
        if clip_before_unscale:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        gs.unscale_(opt)
        found = any(not bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
        norm = math.inf if found else float(torch.nn.utils.clip_grad_norm_(params, max_norm if not clip_before_unscale else 1e30))
        gs.step(opt)
        gs.update()
        logs.append({"loss": float(loss.detach()), "grad_norm": norm, "skipped": found, "scale": gs.get_scale(), "scale_before": scale})
        snaps.append(torch.nn.utils.parameters_to_vector(params).detach().clone())
    return logs, snaps


def _same_float(a: float, b: float, rtol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(abs(b), 1e-30)


def judge(k, t):
    Scaler, Trainer = k.g.LossScaler, k.g.MixedPrecisionTrainer
    getattr_ = k.lib("builtins:getattr")
    with t.part("visible checks: scale(loss) x 2^16, an overflow halves the scale, 10 fp32 steps lower the loss", 1.5):
        s = k.call_opts(Scaler, keep=True)
        got = expect_float(s.scale(torch.tensor(2.0)), "scale(2.0)")
        assert_true(got == 2.0**17, f"scale(loss) should multiply by the initial 2^16: scale(2.0) = {got}")
        s.update(True)
        sv = expect_float(k.get(s.scale_value), "scale_value")
        assert_true(sv == 2.0**15, f"an overflow halves the scale: expected 2^15, got {sv}")
        k.seed(4)
        P = k.g.bigram_task()[0]
        model = k.call_opts(k.g.TinyLM, keep=True)
        opt = k.call_opts(k.lib("torch.optim:AdamW"), (model.parameters(),), {"lr": 3e-3}, keep=True)
        tr = k.call_opts(Trainer, (model, opt, k.g.lm_loss, "fp32"), keep=True)
        g = torch.Generator().manual_seed(0)
        logs = k.many([(tr.train_step, (_sample(P, 128, g),), {}) for _ in range(10)])
        for lg in logs:
            if isinstance(lg, Exception):
                raise lg
        assert_true(isinstance(logs[0], dict) and set(logs[0]) >= {"loss", "grad_norm", "skipped", "scale"},
                    f"train_step should return a dict with loss, grad_norm, skipped, scale; got {logs[0]!r:.120}")
        l0, l9 = expect_float(logs[0]["loss"], "loss"), expect_float(logs[-1]["loss"], "loss")
        assert_true(l9 < l0, f"10 fp32 steps should lower the loss: {l0:.3f} -> {l9:.3f}")

    with t.part("LossScaler: back-off x0.5 on overflow, growth x2 after growth_interval clean steps in a row (not before, not every "
                "step), the counter reset; unscale_ divides and reports inf/NaN", 1.5):
        pattern = [False] * 3 + [False, True] + [False] * 4 + [True, True] + [False] * 2 + [True] + [False] * 7
        s = k.call_opts(Scaler, kwargs={"growth_interval": 3}, keep=True)
        calls = []
        for inf in pattern:
            calls += [(s.update, (inf,), {}), (getattr_, (s, "scale_value"), {})]
        out = k.many(calls)
        for o in out:
            if isinstance(o, Exception):
                raise o
        got = [float(v) for v in out[1::2]]
        want = _trajectory(pattern, 3)
        if got != want:
            step = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            assert_true(False, f"LossScaler(growth_interval=3): after update #{step + 1} (overflow pattern "
                        f"{''.join('x' if p else '.' for p in pattern[:step + 1])}) the scale is {got[step]:g}, expected {want[step]:g}",
                        hint=_why_trajectory(got, pattern, 3) or "x0.5 and reset the counter on overflow; x2 after growth_interval "
                        "clean steps in a row, then reset the counter")
        pattern7 = [False] * 6 + [True] + [False] * 7 + [False] * 7
        s2 = k.call_opts(Scaler, kwargs={"growth_interval": 7, "init_scale": 2.0**10}, keep=True)
        calls = []
        for inf in pattern7:
            calls += [(s2.update, (inf,), {}), (getattr_, (s2, "scale_value"), {})]
        out = k.many(calls)
        for o in out:
            if isinstance(o, Exception):
                raise o
        got, want = [float(v) for v in out[1::2]], _trajectory(pattern7, 7, 2.0**10)
        assert_true(got == want, f"LossScaler(growth_interval=7, init_scale=2^10): scales {got}, expected {want}",
                    hint=_why_trajectory(got, pattern7, 7, 2.0**10) or "use self.growth_interval, self.growth_factor and "
                    "self.backoff_factor (not fixed numbers)")
        dflt = k.call_opts(Scaler, keep=True)
        gi, sv = batch(k, [(getattr_, (dflt, "growth_interval"), {}), (getattr_, (dflt, "scale_value"), {})])
        assert_true(gi == 2000 and sv == 2.0**16, f"torch.amp.GradScaler's defaults: 2^16 and 2000 clean steps (got {sv} and {gi})")
        Param, setattr_ = k.lib("torch.nn:Parameter"), k.lib("builtins:setattr")
        p = k.call_opts(Param, (torch.zeros(4),), keep=True)
        q = k.call_opts(Param, (torch.zeros(2),), keep=True)  # no gradient: skipped
        s3 = k.call_opts(Scaler, keep=True)
        _, found, grad, _, found_inf, _, found_nan = batch(k, [
            (setattr_, (p, "grad", torch.tensor([2.0**16, 2.0**17, 0.0, -(2.0**15)])), {}), (s3.unscale_, ([p, q],), {}),
            (getattr_, (p, "grad"), {}),
            (setattr_, (p, "grad", torch.tensor([1.0, math.inf, 0.0, 0.0])), {}), (s3.unscale_, ([p, q],), {}),
            (setattr_, (p, "grad", torch.tensor([1.0, math.nan, 0.0, 0.0])), {}), (s3.unscale_, ([q, p],), {})])
        assert_true(torch.equal(grad, torch.tensor([1.0, 2.0, 0.0, -0.5])), f"unscale_ should divide the gradients by the scale "
                    f"2^16: [2^16, 2^17, 0, -2^15] became {grad.tolist()}",
                    hint="unscale_ multiplies by the scale: divide" if float(grad[0]) > 2.0**16 else "p.grad /= scale, in place")
        assert_true(found is False, f"unscale_ of finite gradients should return False, got {found!r}")
        assert_true(found_inf is True, "unscale_ must return True when any gradient holds inf or NaN")
        assert_true(found_nan is True, "unscale_ must return True when any gradient holds NaN (not only inf)")

    with t.part("fp16 training against torch.amp.GradScaler for 20 steps: scale, skipped steps, parameters, clipping after "
                "unscaling, the unscaled loss and gradient norm", 1.5):
        k.seed(0)
        model = _kernel_module(k, _TOY)
        state = k.call(model.state_dict)
        plist = k.call_opts(k.lib("builtins:list"), (model.parameters(),), keep=True)
        opt = k.call_opts(k.lib("torch.optim:SGD"), (plist,), {"lr": 0.1}, keep=True)
        scaler = k.call_opts(Scaler, kwargs={"growth_interval": 3}, keep=True)
        tr = k.call_opts(Trainer, (model, opt, k.g.lm_loss, "fp16"), {"max_grad_norm": 0.5, "scaler": scaler}, keep=True)
        g = torch.Generator().manual_seed(45)
        overflow = [0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]
        batches = []
        for bad in overflow:
            b = {"x": torch.randn(8, 16, generator=g), "y": torch.randint(0, 4, (8,), generator=g)}
            if bad:
                b["x"][0, 0] = math.inf  # an activation overflow: inf/NaN gradients this step
            batches.append(b)
        to_vec = k.lib("torch.nn.utils:parameters_to_vector")
        calls = []
        for b in batches:
            calls += [(tr.train_step, (b,), {}), (to_vec, (plist,), {})]
        out = k.many(calls)
        for o in out[:2]:  # a train_step that cannot run fails here, before the reference loop is computed
            if isinstance(o, Exception):
                raise o
        want, snaps = _grad_scaler_run(state, batches, growth_interval=3, max_norm=0.5, lr=0.1)
        for i in range(len(batches)):
            log, vec = out[2 * i], out[2 * i + 1]
            if isinstance(log, Exception):
                raise log
            if isinstance(vec, Exception):
                raise vec
            w = want[i]
            assert_true(isinstance(log, dict) and {"loss", "grad_norm", "skipped", "scale"} <= set(log),
                        f"train_step should return a dict with loss, grad_norm, skipped, scale; got {log!r:.120}")
            sc = expect_float(log["scale"], f"step {i}: scale")
            assert_true(sc == w["scale"], f"step {i}: loss scale {sc:g} but torch.amp.GradScaler has {w['scale']:g}",
                        hint="halve on inf/NaN and reset the counter; double after growth_interval clean steps in a row")
            assert_true(log["skipped"] is w["skipped"] or log["skipped"] == w["skipped"],
                        f"step {i}: skipped={log['skipped']}, expected {w['skipped']}",
                        hint="a step is skipped exactly when an unscaled gradient holds inf or NaN")
            loss = expect_float(log["loss"], f"step {i}: loss")
            if not _same_float(loss, w["loss"], 1e-3):
                factor = w["scale_before"]
                scaled = _same_float(loss, w["loss"] * factor, 1e-3)
                assert_true(False, f"step {i}: loss {loss:.6g}, expected {w['loss']:.6g}",
                            hint=SCALED_LOSS.format(f"2^{int(math.log2(factor))}") if scaled
                            else "the loss of loss_fn(model, batch) under the autocast context, as a float")
            gn = expect_float(log["grad_norm"], f"step {i}: grad_norm")
            if w["skipped"]:
                assert_true(not math.isfinite(gn), f"step {i} is skipped: grad_norm should be inf, got {gn:g}")
            elif not _same_float(gn, w["grad_norm"], 1e-3):
                hint = ("grad_norm of the scaled gradients: report the norm after unscaling"
                        if _same_float(gn, w["grad_norm"] * w["scale_before"], 1e-3)
                        else "unscale_ multiplies by the scale: divide" if _same_float(gn, w["grad_norm"] * w["scale_before"] ** 2, 1e-3)
                        else "the gradients are clipped before unscaling: clip the gradient norm after unscaling, never on the "
                        "scaled gradients" if _same_float(gn, 0.5 / w["scale_before"], 1e-3)
                        else "grad_norm is measured after clipping: report the norm before clipping (clip_grad_norm_ returns it)"
                        if _same_float(gn, min(w["grad_norm"], 0.5), 1e-3)
                        else "the total L2 norm of the unscaled gradients, before clipping")
                assert_true(False, f"step {i}: grad_norm {gn:.6g}, expected {w['grad_norm']:.6g}", hint=hint)
            if not torch.allclose(vec, snaps[i], atol=1e-6, rtol=1e-5):
                before = snaps[i - 1] if i else torch.nn.utils.parameters_to_vector(_toy_from(state).parameters()).detach()
                if w["skipped"] and not torch.allclose(vec, before, atol=1e-6, rtol=1e-5):
                    why = "a skipped step must leave the parameters unchanged (no optimizer.step() on inf/NaN gradients)"
                else:
                    _, alt = _grad_scaler_run(state, batches[:i + 1], growth_interval=3, max_norm=0.5, lr=0.1, clip_before_unscale=True)
                    _, no_ac = _grad_scaler_run(state, batches[:i + 1], growth_interval=3, max_norm=0.5, lr=0.1, autocast=False)
                    why = ("the gradients are clipped before unscaling: clip the gradient norm after unscaling, never on the scaled "
                           "gradients" if torch.allclose(vec, alt[i], atol=1e-6, rtol=1e-5)
                           else "autocast is not applied: compute the loss under self.autocast() (fp16 here)"
                           if torch.allclose(vec, no_ac[i], atol=1e-7, rtol=1e-6)
                           else "unscale, skip on inf/NaN, else clip the unscaled gradients to max_grad_norm and step")
                assert_true(False, f"step {i}: the parameters differ from the torch.amp.GradScaler loop "
                            f"(max abs difference {float((vec - snaps[i]).abs().max()):.3g})", hint=why)
        # the reported gradient norm is the unscaled one (default scaler, no clipping, lr 0)
        k.seed(1)
        model = _kernel_module(k, _TOY)
        state = k.call(model.state_dict)
        opt = k.call_opts(k.lib("torch.optim:SGD"), (model.parameters(),), {"lr": 0.0}, keep=True)
        tr = k.call_opts(Trainer, (model, opt, k.g.lm_loss, "fp16"), {"max_grad_norm": 1e9}, keep=True)
        b = {"x": torch.randn(8, 16, generator=g), "y": torch.randint(0, 4, (8,), generator=g)}
        log = tr.train_step(b)
        ref_model = _toy_from(state)
        _lm_loss(ref_model, b).backward()
        gn = float(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1e9))
        got = expect_float(log["grad_norm"], "grad_norm")
        assert_true(abs(got - gn) < 2e-2 * gn, f"grad_norm {got:.4g} should be the unscaled norm {gn:.4g}",
                    hint="grad_norm of the scaled gradients: report the norm after unscaling" if got > 100 * gn else None)
        assert_true(expect_float(log["scale"], "scale") == 2.0**16, f"the default scaler starts at 2^16, got {log['scale']}")

    with t.part("bf16 autocast and fp8 linears: FP32 master weights, the loss falls, no step skipped, FP8Linear in the SwiGLU", 1.5):
        P = k.g.bigram_task(seed=1)[0]
        for prec in ("bf16", "fp8"):
            k.seed(5)
            model = k.call_opts(k.g.TinyLM, keep=True)
            state = k.call(model.state_dict)
            opt = k.call_opts(k.lib("torch.optim:AdamW"), (model.parameters(),), {"lr": 3e-3}, keep=True)
            tr = k.call_opts(Trainer, (model, opt, k.g.lm_loss, prec), keep=True)
            gb = torch.Generator().manual_seed(1)
            batches = [_sample(P, 128, gb)] * 3  # one batch three times: its loss must fall (bf16 autocast is slow on CPU)
            logs = k.many([(tr.train_step, (b,), {}) for b in batches])
            for lg in logs:
                if isinstance(lg, Exception):
                    raise lg
            losses = [expect_float(lg["loss"], f"{prec} loss") for lg in logs]
            if prec == "bf16":
                _check_autocast(state, batches[0], losses[0])
            dtypes = {n: v.dtype for n, v in k.call(model.state_dict).items()}
            bad = sorted(n for n, d in dtypes.items() if d != torch.float32)
            assert_true(not bad, f"{prec}: master weights must stay FP32, but {bad[:3]} are {dtypes[bad[0]] if bad else ''}",
                        hint="autocast casts inside the operations; never convert the model's parameters")
            assert_true(losses[-1] < losses[0], f"{prec}: {len(losses)} steps should lower the loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
            assert_true(not any(lg["skipped"] for lg in logs), f"{prec}: no step should be skipped on a healthy model")
        try:
            kind = k.info(model.mlps[0].w1).get("type")
        except LearnerError:
            kind = None
        assert_true(kind == "FP8Linear", f"fp8 precision should run the SwiGLU projections as FP8Linear, found {kind}")


def _toy_from(state) -> nn.Module:
    m = _toy()
    m.load_state_dict(state)
    return m


def _check_autocast(state, batch, got: float) -> None:
    """bf16: the first loss is computed under bf16 autocast (not in FP32)."""
    model = _TinyLM()
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError):
        return  # the given TinyLM was changed: nothing to compare with
    with torch.no_grad(), threads(1):
        l32 = float(_lm_loss(model, batch))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l16 = float(_lm_loss(model, batch))
    if abs(l16 - l32) > 2e-6 * abs(l32) and abs(got - l32) <= 2e-7 * abs(l32):
        raise AssertionError(f"bf16: the first loss {got:.7g} is the FP32 loss (bf16 autocast gives {l16:.7g})\n"
                             "  likely cause: autocast is not applied: compute the loss under self.autocast()")
    assert_true(abs(got - l16) < 2e-3 * abs(l16), f"bf16: the first loss {got:.6g}, expected {l16:.6g} (bf16 autocast)",
                hint="loss = loss_fn(model, batch) under self.autocast(), reported as a float")


MUTANTS = [
    Mutant("scaled loss returned", "            self.scaler.scale(loss).backward()\n",
           "            loss = self.scaler.scale(loss)\n            loss.backward()\n",
           expect="the returned loss is the scaled loss (2^16"),
    Mutant("grows every step", "if self.growth_tracker == self.growth_interval:", "if self.growth_tracker >= 1:",
           expect="grows every step (it must wait growth_interval clean steps)"),
    Mutant("never grows back", "            self.scale_value *= self.growth_factor\n", "            pass\n", expect="never grows back"),
    Mutant("counter not reset on overflow", "            self.growth_tracker = 0\n            return", "            return",
           expect="not reset on overflow"),
    Mutant("counter not reset on growth", "            self.scale_value *= self.growth_factor\n            self.growth_tracker = 0",
           "            self.scale_value *= self.growth_factor", expect="not reset when the scale grows"),
    Mutant("clipping before unscaling", "            self.scaler.scale(loss).backward()\n",
           "            self.scaler.scale(loss).backward()\n            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)\n",
           expect="clipped before unscaling"),
    Mutant("skipped step still steps", "            grad_norm = math.inf\n",
           "            grad_norm = math.inf\n            self.optimizer.step()\n",
           expect="skipped step must leave the parameters unchanged"),
    Mutant("unscale_ multiplies", "p.grad.div_(self.scale_value)", "p.grad.mul_(self.scale_value)", expect="multiplies by the scale"),
    Mutant("autocast not applied", "        with self.autocast():\n", "        with contextlib.nullcontext():\n",
           expect="autocast is not applied"),
    Mutant("grad norm after clipping", "grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))",
           "torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)\n"
           "            grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))",
           expect="measured after clipping"),
    Mutant("NaN gradients not detected", "found_inf = found_inf or not bool(torch.isfinite(p.grad).all())",
           "found_inf = found_inf or bool(torch.isinf(p.grad).any())", expect="not only inf"),
]

ALTERNATIVES = [
    Alternative("a counter with modulo growth; clipping written out by hand", old='''        if found_inf:
            grad_norm = math.inf
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
            self.optimizer.step()''', new='''        if found_inf:
            grad_norm = math.inf
        else:
            grads = [p.grad for p in params if p.grad is not None]
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g_) for g_ in grads]))
            coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
            for g_ in grads:
                g_.mul_(coef)
            grad_norm = float(total)
            self.optimizer.step()'''),
]

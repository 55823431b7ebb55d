"""Graded benchmark of Section 3: the learner's grouped dispatch against the per-token loop, timed by the judge.

What is compared: ``MixtureOfExperts.dispatch(x, weights, indices)`` (the learner's, in the kernel) against
``course_lib.deepseek.routing.dispatch_per_token`` on the same weights and routing, run here in the judge
(the course's loop over tokens and slots). The slow side never runs in the kernel, so nothing a submission
does there (slowed experts, a patched baseline) can widen the ratio. Each measurement of the learner's side is
one channel request, a batch of 32 dispatch calls on fresh inputs made in the kernel beforehand
(``torch.manual_seed`` from the judge, ``torch.randn``, the learner's gate) whose outputs stay there as
handles, so the timed requests carry no tensors; the judge's side runs the loop on one input of the same
size. The ratio is per call. After the timing the judge rebuilds inputs of the first and last measurements
from their seed and checks the fetched outputs.

Points need correct outputs first (the layer against the course's, the dispatch against the course's
routed output) and a profile without a loop over tokens and without dense compute, so a slow design fails
deterministically rather than by timing luck.
"""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_close, expect_tensor
from course_judge.local import Mutant
from course_judge.s03_moe._common import EXPERT_DRAFTS, matmul_flops, no_token_loop, reference_moe
from course_judge.s03_moe.layer import _BODY, _DENSE, _PER_TOKEN, layer, run
from course_judge.s03_moe.layer import ALTERNATIVES as _LAYER_ALTERNATIVES
from course_judge.session import LearnerError
from course_judge.timing import speedup
from course_lib.deepseek.moe import dispatch_sorted
from course_lib.deepseek.routing import MoEConfig, dispatch_per_token

GRADE_ID = "bench_03_dispatch"
POINTS = 2
ANSWERS = ("ex_03_3_moe",)
THRESHOLD = 10.0
N_TOKENS, N_FAST, N_SLOW, N_PROFILE, N_CHECK = 512, 32, 1, 72, 128
SUMMARY = (
    "your layer and your dispatch against the course's on the same weights (float32), a profile without a loop over tokens "
    f"or dense compute, then your dispatch at least {THRESHOLD:g}x faster per call than the course's per-token loop "
    f"on the same weights ({N_TOKENS} tokens, 16 experts, top-4; both timed by the judge)"
)
REFERENCE = ("course_lib.deepseek.moe",)
FORBIDDEN_NAMES = EXPERT_DRAFTS  # the drafts of 3.1's test hand over a correct expert
CFG = dict(dim=64, moe_inter_dim=32, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2)


def _inputs(ref, g: torch.Generator, n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``n`` fresh (x, weights, indices) triples routed by the course's gate."""
    x = torch.randn(n * N_TOKENS, CFG["dim"], generator=g)
    with torch.no_grad():
        w, idx, _ = ref.gate(x)
    return [
        (x[j * N_TOKENS : (j + 1) * N_TOKENS], w[j * N_TOKENS : (j + 1) * N_TOKENS], idx[j * N_TOKENS : (j + 1) * N_TOKENS])
        for j in range(n)
    ]


_SEEDS = {"fast": 351}


def _kernel_inputs(k, m, n: int, seed: int) -> list:
    """``n`` fresh inputs made in the kernel (``torch.manual_seed(seed)``, then ``torch.randn``) and routed by the
    learner's gate there: handles, so the timed requests and their replies carry no tensors."""
    reqs = [{"op": "call", "fn": k.lib("torch:manual_seed"), "args": [seed], "kwargs": {}}]
    reqs += [{"op": "call", "fn": k.lib("torch:randn"), "args": [N_TOKENS, CFG["dim"]], "kwargs": {}, "keep": True} for _ in range(n)]
    xs = [o["ok"] for o in k.request({"op": "many", "requests": reqs}, "making the benchmark's inputs")[1:]]
    reqs = [{"op": "call", "fn": m.gate, "args": [xh], "kwargs": {}, "no_grad": True, "keep": True} for xh in xs]
    out = k.request({"op": "many", "requests": reqs}, "routing the benchmark's inputs")
    for o in out:
        if "error" in o:
            raise LearnerError("the gate on the benchmark's inputs", o["error"])
    return list(zip(xs, (o["ok"] for o in out)))


def _kernel_x(which: str, j: int) -> torch.Tensor:
    """Input ``j`` of a pool, rebuilt here from its seed (the same stream as the kernel's torch.randn)."""
    g = torch.Generator().manual_seed(_SEEDS[which])
    for _ in range(j):
        torch.randn(N_TOKENS, CFG["dim"], generator=g)
    return torch.randn(N_TOKENS, CFG["dim"], generator=g)


def _want(ref, batch) -> torch.Tensor:
    """The routed outputs of a batch of triples, by the course's dispatch (one call on all their tokens)."""
    x = torch.cat([b[0] for b in batch])
    with torch.no_grad():
        return dispatch_sorted(ref.experts, x, torch.cat([b[1] for b in batch]), torch.cat([b[2] for b in batch]))[0]


def judge(k, t):
    g = torch.Generator().manual_seed(35)
    cfg = MoEConfig(**CFG)
    ref = reference_moe(cfg, 0, bias_std=0.05, dtype=torch.float32)  # the same weights layer() loads
    passed = False
    with t.part("outputs (float32): your layer and your dispatch vs the course's; no loop over tokens, FLOPs within 1.5x", 1):
        m, _, _, _ = layer(k, CFG, 0, bias_std=0.05, dtype="float")
        k.call(m.eval)
        x = torch.randn(N_CHECK, CFG["dim"], generator=g)
        y, _ = run(m, x)
        with torch.no_grad():
            ry = ref(x)[0]
        expect_close(y, ry, atol=1e-5, rtol=1e-4, name="your MoE vs the course's layer on the same weights (no points unless they agree)")
        ((xb, wb, ib),) = _inputs(ref, g, 1)
        xb, wb, ib = xb[:N_CHECK], wb[:N_CHECK], ib[:N_CHECK]
        want = _want(ref, [(xb, wb, ib)])
        fast = expect_tensor(k.call_opts(m.dispatch, (xb, wb, ib), no_grad=True), "dispatch(x, weights, indices)", shape=tuple(xb.shape))
        expect_close(fast, want, atol=1e-5, rtol=1e-4, name="your dispatch vs the course's routed output (no points unless they agree)")
        xp, wp, ip = xb[:N_PROFILE], wb[:N_PROFILE], ib[:N_PROFILE]
        prof = k.profile(m.dispatch, xp, wp, ip)
        no_token_loop(
            prof.shapes,
            CFG["moe_inter_dim"],
            int(torch.bincount(ip.reshape(-1), minlength=16).max()),
            f"dispatch on {N_PROFILE} tokens",
            CFG["dim"],
        )
        flops = matmul_flops(cfg, N_PROFILE, layer=False)
        assert_true(
            prof.flops <= 1.5 * flops,
            f"your dispatch does {prof.flops / flops:.1f}x the FLOPs of the course's",
            hint="every expert runs on every token (dense compute): run each expert only on its own tokens",
        )
        passed = True

    with t.part(f"your dispatch at least {THRESHOLD:g}x faster per call than the per-token loop (timed by the judge, fresh inputs)", 1):
        assert_true(passed, "no points for speed unless the outputs agree and the structure checks pass (see above)")
        attempts, warmup, repeats = 3, 1, 3
        rounds = attempts * (warmup + repeats)
        pools = {"fast": _kernel_inputs(k, m, rounds * N_FAST, _SEEDS["fast"]), "slow": _inputs(ref, g, rounds * N_SLOW)}
        done: list = []

        def yours():
            start = len(done) * N_FAST
            batch = list(range(start, start + N_FAST))
            reqs = [{"op": "call", "fn": m.dispatch, "args": [pools["fast"][j][0], pools["fast"][j][1][0], pools["fast"][j][1][1]],
                     "kwargs": {}, "no_grad": True, "keep": True} for j in batch]
            done.append((batch, k.request({"op": "many", "requests": reqs}, "timed dispatch calls", 120)))

        slow_next = iter(range(len(pools["slow"])))

        def loop():  # the course's per-token loop, here in the judge, on the same weights
            x, w, idx = pools["slow"][next(slow_next)]
            with torch.no_grad():
                dispatch_per_token(ref.experts, x, w, idx)

        sp = speedup(loop, yours, threshold=THRESHOLD * N_SLOW / N_FAST, warmup=warmup, repeats=repeats, attempts=attempts)
        for batch, outs in (done[0], done[-1]):  # the first and the last measurement: inputs rebuilt here, outputs fetched
            for j, o in zip(batch[:: max(1, len(batch) // 2)], outs[:: max(1, len(batch) // 2)]):
                if "error" in o:
                    raise LearnerError("a timed dispatch call", o["error"])
                x = _kernel_x("fast", j)
                xk, (w, idx, _) = k.get(pools["fast"][j][0]), k.get(pools["fast"][j][1])
                assert_true(torch.equal(xk, x), "the inputs of the timed calls changed in the kernel",
                            hint="torch.randn and the inputs must be left as they are")
                expect_close(expect_tensor(k.get(o["ok"]), "a timed call's output"), _want(ref, [(x, w, idx)]), atol=1e-5,
                             rtol=1e-4, name="the timed dispatch calls' outputs",
                             hint="your dispatch must give the same answer on every call")
        per_call = sp.ratio * N_FAST / N_SLOW
        t.note(f"dispatch vs per-token loop: {per_call:.1f}x per call ({sp})")
        assert_true(
            per_call >= THRESHOLD,
            f"your dispatch is only {per_call:.1f}x faster per call than the per-token loop (need >= {THRESHOLD:g}x)",
            hint="sort the assignments by expert once, call each expert once on its slice, "
            "index_add_ the weighted rows back; no Python work per token",
        )


_ROW_LOOP = _BODY.replace(
    "                y.index_add_(0, rows, expert(x[rows]) * flat_w[mine].to(x.dtype).unsqueeze(-1))  # rows back to their tokens\n",
    "                for r in range(n_e):\n"
    "                    y[rows[r]] = y[rows[r]] + expert(x[rows[r : r + 1]])[0] * flat_w[mine[r]].to(x.dtype)\n",
)
assert _ROW_LOOP != _BODY

MUTANTS = [
    Mutant("per-token loop", _BODY, _PER_TOKEN, expect="loop over tokens"),
    Mutant("row by row within each expert", _BODY, _ROW_LOOP, expect="loop over tokens"),
    Mutant("every expert on every token", _BODY, _DENSE, expect="dense compute"),
    Mutant("token = j % K", "rows = mine // K", "rows = mine % K", expect="no points unless they agree"),
    Mutant(
        "shared expert missing",
        "            y = y + self.shared_experts(h)\n",
        "            pass\n",
        expect="your MoE vs the course's layer",
    ),
]

ALTERNATIVES = list(_LAYER_ALTERNATIVES)

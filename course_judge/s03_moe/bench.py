"""Graded benchmark of Section 3: the learner's grouped dispatch against the per-token loop, timed by the judge.

What is compared: ``MixtureOfExperts.dispatch(x, weights, indices)`` (the learner's, in the kernel) against
``course_lib.deepseek.routing.dispatch_per_token(moe.experts, x, weights, indices)`` (the course's loop over
tokens and slots, also in the kernel, calling the learner's own experts): the same experts, the same
routing (computed here by the course's gate on the learner's weights), only the dispatch differs. Each
measurement is one channel request: a batch of 8 dispatch calls against one loop call, every
call on fresh inputs; the ratio is per call. Points need correct outputs first (the layer against the
course's, the dispatch against the loop) and a profile without a loop over tokens and without dense
compute, so a slow design fails deterministically rather than by timing luck.
"""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_close, expect_tensor
from course_judge.local import Mutant
from course_judge.s03_moe._common import kept, load_state, no_token_loop, reference_flops, reference_moe, remote_cfg
from course_judge.s03_moe.layer import _BODY, _DENSE, _PER_TOKEN, run
from course_judge.s03_moe.layer import ALTERNATIVES as _LAYER_ALTERNATIVES
from course_judge.timing import speedup
from course_lib.deepseek.moe import dispatch_sorted
from course_lib.deepseek.routing import MoEConfig

GRADE_ID = "bench_03_dispatch"
POINTS = 2
ANSWERS = ("ex_03_3_moe",)
THRESHOLD = 10.0
N_TOKENS, N_FAST, N_SLOW, N_PROFILE = 256, 8, 1, 72
SUMMARY = (
    f"your layer against the course's on the same weights and your dispatch against the per-token loop (float32), "
    f"a profile without a loop over tokens or dense compute, then your dispatch at least {THRESHOLD:g}x faster per call "
    f"than course_lib's dispatch_per_token on your experts ({N_TOKENS} tokens, 16 experts, top-4; timed by the judge)"
)
REFERENCE = ("course_lib.deepseek.moe",)
CFG = dict(dim=64, moe_inter_dim=32, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2)
PER_TOKEN = "course_lib.deepseek.routing:dispatch_per_token"


def _inputs(ref, g: torch.Generator, n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``n`` fresh (x, weights, indices) triples routed by the course's gate."""
    x = torch.randn(n * N_TOKENS, CFG["dim"], generator=g)
    with torch.no_grad():
        w, idx, _ = ref.gate(x)
    return [
        (x[j * N_TOKENS : (j + 1) * N_TOKENS], w[j * N_TOKENS : (j + 1) * N_TOKENS], idx[j * N_TOKENS : (j + 1) * N_TOKENS])
        for j in range(n)
    ]


def _want(ref, batch) -> torch.Tensor:
    """The routed outputs of a batch of triples, by the course's dispatch (one call on all their tokens)."""
    x = torch.cat([b[0] for b in batch])
    with torch.no_grad():
        return dispatch_sorted(ref.experts, x, torch.cat([b[1] for b in batch]), torch.cat([b[2] for b in batch]))[0]


def judge(k, t):
    g = torch.Generator().manual_seed(35)
    cfg = MoEConfig(**CFG)
    ref = reference_moe(cfg, 0, bias_std=0.05, dtype=torch.float32)
    passed = False
    with t.part(
        "outputs (float32): your layer vs the course's, your dispatch vs the per-token loop; no loop over tokens, FLOPs within 1.5x", 1
    ):
        m = kept(k, k.g.MixtureOfExperts, remote_cfg(k, **CFG))
        k.call(m.eval)
        load_state(k, m, dict(ref.state_dict()), "MixtureOfExperts")
        x = torch.randn(N_TOKENS, CFG["dim"], generator=g)
        y, _ = run(m, x)
        with torch.no_grad():
            ry = ref(x)[0]
        expect_close(y, ry, atol=1e-5, rtol=1e-4, name="your MoE vs the course's layer on the same weights (no points unless they agree)")
        ((xb, wb, ib),) = _inputs(ref, g, 1)
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
        flops = reference_flops(lambda *a: dispatch_sorted(ref.experts, *a), xp, wp, ip)
        assert_true(
            prof.flops <= 1.5 * flops,
            f"your dispatch does {prof.flops / flops:.1f}x the FLOPs of the course's",
            hint="every expert runs on every token (dense compute): run each expert only on its own tokens",
        )
        passed = True

    with t.part(f"your dispatch at least {THRESHOLD:g}x faster per call than the per-token loop (timed by the judge, fresh inputs)", 1):
        assert_true(passed, "no points for speed unless the outputs agree and the structure checks pass (see above)")
        per_token = k.lib(PER_TOKEN)
        attempts, warmup, repeats = 3, 1, 3
        pools = {
            "fast": [_inputs(ref, g, N_FAST) for _ in range(attempts * (warmup + repeats))],
            "slow": [_inputs(ref, g, N_SLOW) for _ in range(attempts * (warmup + repeats))],
        }
        got = {"fast": [], "slow": []}

        def call(which: str):
            batch = pools[which][len(got[which])]
            calls = [(m.dispatch, b, {}) for b in batch] if which == "fast" else [(per_token, (m.experts, *b), {}) for b in batch]
            got[which].append((batch, k.many(calls, no_grad=True, timeout=120)))

        sp = speedup(
            lambda: call("slow"),
            lambda: call("fast"),
            threshold=THRESHOLD * N_SLOW / N_FAST,
            warmup=warmup,
            repeats=repeats,
            attempts=attempts,
        )
        for which in ("fast", "slow"):
            for batch, outs in got[which][:: 1 if which == "fast" else 2]:
                for o in outs:
                    if isinstance(o, Exception):
                        raise o
                expect_close(
                    torch.cat([expect_tensor(o, "a timed call's output") for o in outs]),
                    _want(ref, batch),
                    atol=1e-5,
                    rtol=1e-4,
                    name=f"the timed {'dispatch' if which == 'fast' else 'per-token loop'} calls' outputs",
                    hint="your dispatch must give the same answer on every call"
                    if which == "fast"
                    else "course_lib.deepseek.routing.dispatch_per_token (the baseline) must be left as it is",
                )
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

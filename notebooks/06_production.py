# %% [markdown]
# # Section 6 — Production and scale
#
# DeepSeek-V3 has 671B parameters. In BF16 the weights alone are 1.34 TB, about 17 H800s' worth of memory
# before a single activation, gradient or cache entry. It was trained on 2048 GPUs and is served from units of 32
# (prefill) and 320 (decode) GPUs. This section covers what changes between a model that runs in a notebook
# and one that runs at that scale: code that can be trusted because its tests catch subtle bugs, measured
# memory and compute trade-offs, a memory plan for the full model, and **expert parallelism**, where each
# process holds a slice of the experts and tokens travel between processes. The distributed code is real
# `torch.distributed`: two processes on this CPU with the gloo backend, and the same module under
# `torchrun` with NCCL on GPUs.
#
# **Learning objectives.** After this section you can
# - write a test that passes every correct implementation and fails subtly wrong ones;
# - measure what activation checkpointing, fused kernels and `torch.compile` buy on this machine, and
#   estimate model FLOPs utilisation (MFU);
# - plan DeepSeek-V3's KV cache and per-GPU memory from its configuration, on top of Section 5's parameter counter;
# - implement expert-parallel dispatch and combine with `all_to_all_single` and check them against a
#   single-process MoE, gradients included;
# - quantify node-limited routing, expert capacity and the KV-cache memory of each concurrent request.
#
# **Time:** core path about 150 min; deep dives 95 min.
#
# **Prerequisites:** Sections 2 (MLA,
# latent cache) and 3 (DeepSeekMoE routing), autograd, `pytest`-style asserts.

# %% [given]
import torch
from course_lib.utils import setup, sizes
ENV = setup(seed=0)
print(ENV)

# %% [given]
import functools
import math
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from course_lib import cluster as cdist  # process groups and the expert-parallel harness (6.4)
from course_lib import viz
from course_lib.bench import compare, peak_memory, ratio
from course_lib.cluster import DispatchPlan, WorkerError, all_to_all, get_cluster, run_local_experts
from course_lib.deepseek.common import RMSNorm, SwiGLU
from course_lib.deepseek.mla import MLA, MLAConfig, MultiHeadAttention
from course_lib.deepseek.moe import route as moe_route
from course_lib.learner import module_path, my_part
from course_lib.my_model import check_moe, your_moe
from course_lib.plan_config import (BF16_MIXED, COMPONENTS, DEEPSEEK_V3, GiB, V3_TRAINING, ModelConfig, Parallelism,
                                    Precision, attention_training_flops_per_token)
from course_lib.utils import env_report

# One thread: this section's tensors are small, a second thread mostly adds cross-core synchronisation and makes
# timings noisy on a shared machine. The two distributed workers use one thread each.
ENV = env_report(threads=1)
V3 = ModelConfig()  # DeepSeek-V3 671B (inference/configs/config_671B.json)
print(ENV)
print(V3)

# %% [markdown]
# ## 6.1 Code organisation, interfaces and tests
#
# The course's code lives in one installed package, `course_lib`, with **one concern per module**:
#
# ```
# course_lib/
#   utils.py        seeding, light/full sizes, environment report      <- every notebook's setup cell
#   testing.py      assert_close, assert_shape, gradcheck_fd ...       <- every test cell
#   bench.py        compare (interleaved timing), peak_memory          <- every measurement
#   viz.py          figures, interactive explorers
#   deepseek/
#     common.py     RMSNorm, RoPE, SwiGLU              (no dependencies inside the package)
#     mla.py        MLA + latent cache                 (uses common)
#     moe.py        Gate, route, MoE                   (uses common)
#     fp8.py        formats, block quantisation, FP8 GEMM
#   cluster.py      process groups, all_to_all, the EP harness (uses deepseek.moe)   <- this section
#   plan_config.py  model shapes, precisions, parallel layouts (no torch needed)     <- this section
#   routers.py      routers built from switches, for testing tests (6.1)             <- this section
# ```
#
# The course's own answers to 6.3 and 6.4 (`planner.py`, `distributed.py`: the reference planner and expert-parallel
# layer, which `cluster.py` and `plan_config.py` serve) are not importable while a notebook is graded.
#
# Three habits make this code usable at scale:
#
# - **Configs are data.** `MLAConfig`, `MoEConfig` and `ModelConfig` are dataclasses. A module is built
#   from a config, so the 671B model and a 64-wide test model run the same code, and a planner can count a
#   model without building it.
# - **Narrow interfaces.** `route(scores, bias, ...)` is a pure function from tensors to tensors; the MoE
#   layer, the expert-parallel layer and the statistics in 6.4 all call it. Pure functions are easy to test
#   and to distribute: any process can recompute them.
# - **Tests with oracles.** `tests/test_<module>.py` checks each module against an *independent* oracle
#   (a per-token loop, float64, a real module with the same weights) and against invariants (weights sum to
#   `route_scale`). Slow or special tests carry markers (`@pytest.mark.distributed` spawns processes).
#
# A test is only worth something if it **fails for the bugs you fear and passes for every correct
# implementation**. The second half is easy to forget. DeepSeek's router may return a token's $K$ experts in any
# order, so a test that compares index tensors position by position rejects correct code.

# %% [code]
import ast
from pathlib import Path

import course_lib

root = Path(course_lib.__file__).parent
for path in sorted(root.rglob("*.py")):
    if path.name.startswith("_") and path.name != "__init__.py":
        continue
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    name = ".".join(("course_lib",) + path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    print(f"{name:28s} {doc.splitlines()[0][:95] if doc else ''}")

# %% [markdown]
# ### Exercise 6.1 — a test that tells right from subtly wrong
#
# Write `test_router(route_fn)`, a pytest-style test (plain `assert`s, or `course_lib.testing` helpers) for
# an implementation of DeepSeek-V3's routing with this contract:
#
# `route_fn(logits, bias, *, top_k, n_groups, n_limited_groups, route_scale) -> (weights, indices)`, with
# `logits` (N, E) and `bias` (E,), returning `weights` (N, K) (same dtype as `logits`) and `indices` (N, K) int64:
#
# 1. affinities $s_{i,t} = \sigma(\text{logit}_{i,t})$;
# 2. selection scores $s_{i,t} + b_i$;
# 3. experts form `n_groups` equal contiguous groups; a group's score is the **sum of its two largest selection
#    scores**; only the best `n_limited_groups` groups stay eligible (the others can never be chosen);
# 4. `indices`: the `top_k` eligible experts with the largest selection scores, **in any order**;
# 5. `weights[t, k]` $= \text{route\_scale}\cdot s_{\text{indices}[t,k],t} / \sum_{k'} s_{\text{indices}[t,k'],t}$:
#    unbiased affinities, renormalised over the chosen experts.
#
# Your test must **return normally** for every correct implementation and **raise** (e.g. `AssertionError`) for
# implementations that break any rule above. It is graded by running it against five correct routers (a token's
# experts in different orders, float64 inside, another rounding) and against 19 wrong ones, most of which you have
# not seen. Catching wrong routers only counts while your test passes every correct one.
#
# The routers come from `course_lib.routers.make_router`: `make_router()` follows rules 1-5, and each of its
# keywords bends one aspect (`make_router(normalise="none")` forgets the renormalisation).
#
# Hints: write your own oracle from the rules (a loop over tokens is fine; do not import one, and do not use
# `moe_route`, `route_correct` or `make_router` as your oracle); compare sets of experts, not positions; pick
# inputs that make the rules matter: several groups, a bias large enough to change choices, biases that make
# some selection scores negative, more than one configuration, float32 and float64 logits.

# %% [solution id=ex_06_1_router_test]
def test_router(route_fn) -> None:
    """Check `route_fn` against the routing rules 1-5 above; raise AssertionError on any violation.

    route_fn(logits (N, E), bias (E,), *, top_k, n_groups, n_limited_groups, route_scale)
        -> weights (N, K), indices (N, K) int64 (any order of the K experts).
    """
    ### BEGIN SOLUTION
    def oracle(logits, bias, top_k, n_groups, n_limited_groups, route_scale):
        """Rules 1-5 in float64, one group at a time: the chosen experts (ascending ids) and their weights."""
        s = torch.sigmoid(logits.double())  # (N, E)
        sel = s + bias.double()  # (N, E)
        N, E = s.shape
        per = E // n_groups
        group_score = torch.stack([sel[:, g * per:(g + 1) * per].sort(dim=1).values[:, -2:].sum(1)
                                   for g in range(n_groups)], 1)  # (N, G): sum of the two best
        kept = group_score.argsort(dim=1)[:, n_groups - n_limited_groups:]  # (N, M) best groups
        eligible = torch.zeros(N, E, dtype=torch.bool)
        for g in range(n_groups):
            eligible[:, g * per:(g + 1) * per] |= (kept == g).any(1, keepdim=True)
        ranked = torch.where(eligible, sel, torch.full_like(sel, float("-inf"))).argsort(dim=1, descending=True)
        chosen = ranked[:, :top_k].sort(dim=1).values  # (N, K) ascending expert ids
        w = s.gather(1, chosen)
        return chosen, w / w.sum(1, keepdim=True) * route_scale

    cases = [  # (N, E, top_k, n_groups, n_limited_groups, route_scale, bias scale, bias shift)
        (48, 16, 4, 4, 2, 2.5, 0.5, 0.0),
        (48, 16, 6, 4, 2, 1.0, 1.0, -0.8),  # many negative selection scores: masked groups must stay out
        (32, 12, 3, 3, 1, 2.5, 0.3, 0.0),
        (32, 8, 2, 1, 1, 1.5, 2.0, 0.0),  # no group limit, bias decides
    ]
    for i, (N, E, K, G, M, scale, b_scale, b_shift) in enumerate(cases):
        for dtype in (torch.float32, torch.float64):
            gen = torch.Generator().manual_seed(100 + i)
            logits = torch.randn(N, E, generator=gen).to(dtype)
            bias = (b_scale * torch.randn(E, generator=gen) + b_shift).to(dtype)
            weights, indices = route_fn(logits.clone(), bias.clone(), top_k=K, n_groups=G, n_limited_groups=M,
                                        route_scale=scale)
            assert weights.shape == (N, K) and indices.shape == (N, K), f"case {i}: shapes {weights.shape}, {indices.shape}"
            assert weights.dtype == dtype, f"case {i}: weights dtype {weights.dtype}, expected {dtype}"
            assert indices.dtype == torch.int64, f"case {i}: indices dtype {indices.dtype}"
            want_idx, want_w = oracle(logits, bias, K, G, M, scale)
            order = torch.argsort(indices, dim=1)  # compare sets: sort each token's experts by id
            got_idx = torch.gather(indices, 1, order)
            got_w = torch.gather(weights, 1, order).double()
            bad = (got_idx != want_idx).any(1)
            assert not bad.any(), f"case {i}, token {int(bad.nonzero()[0])}: experts {got_idx[bad][0].tolist()}, " \
                                  f"expected {want_idx[bad][0].tolist()}"
            assert torch.allclose(got_w, want_w, atol=1e-5, rtol=1e-5), \
                f"case {i}: weights differ from the rules by {float((got_w - want_w).abs().max()):.2g}"
    ### END SOLUTION


# %% [given]
from course_lib.routers import make_router  # routers built from switches: make_router() follows rules 1-5

route_correct = make_router()  # a correct implementation (course_lib.routers; its keywords bend one rule each)


def passes(test_fn, impl) -> bool:
    """True when `test_fn(impl)` returns normally (a pytest 'pass')."""
    try:
        test_fn(impl)
    except NotImplementedError:
        raise
    except Exception:
        return False
    return True


# %% [test id=test_06_1_router_test points=5]
# Checks you can run now. When graded, the judge runs these and more (5 points): passes the course router and four other correct routers (experts in any order, float64 inside, another rounding), catches 19 wrong ones: affinities and bias, group-limited routing, combine weights, dtypes.
from course_lib.routers import make_router as _make_router
from course_lib.testing import assert_true

try:
    test_router(_make_router())
except NotImplementedError:
    raise
except Exception as _e:
    raise AssertionError(f"your test rejects a correct router: {type(_e).__name__}: {_e}") from None
for _name, _bad in [("the bias leaks into the combine weights", _make_router(weights_from="selection")),
                    ("the weights are not renormalised", _make_router(normalise="none"))]:
    _caught = False
    try:
        test_router(_bad)
    except Exception:
        _caught = True
    assert_true(_caught, f"your test passes a wrong router: {_name}")
print("test_router: passes the correct router and catches the 2 wrong ones shown here")

# %% [markdown]
# **Checkpoint:** your test accepts the experts of a token in any order and rejects every broken rule.
# Run it against the course's router: `passes(test_router, route_correct)` should be `True`.

# %% [code]
try:
    print("course router passes your test:", passes(test_router, route_correct))
except NotImplementedError:
    print("test_router is not written yet")

# %% [markdown]
# ## 6.2 Performance optimisation
#
# ### 6.2.1 Memory: activation checkpointing
#
# Backpropagation needs every intermediate activation of the forward pass. A block of width $d$ on $T$ tokens
# stores a few dozen $T \times d$ tensors: normed inputs, projections, attention probabilities ($H \times T^2$) and the
# SwiGLU products. A stack of $L$ blocks keeps all of them alive until the backward pass reaches it:
#
# $$\text{memory} \approx L \cdot A_{\text{block}} \quad\xrightarrow{\text{checkpoint each block}}\quad L \cdot |x_{\text{block input}}| + A_{\text{block}}.$$
#
# With checkpointing, only each block's **input** is saved. During the backward pass the block's forward is run
# again to rebuild its activations just before they are needed. The cost is one extra forward per block. If
# backward costs about twice the forward, the step does $4F$ of work instead of $3F$: 33 % more compute. Small,
# overhead-heavy blocks like ours pay more, since their forward is a larger share of the step. DeepSeek-V3 recomputes only the cheap parts (all RMSNorms and the MLA up-projections) instead of whole
# blocks. Below, `peak_memory` records the largest number of bytes alive at once while a step runs.

# %% [code]
class Block(nn.Module):
    """A pre-norm DeepSeek-style block: x + MLA(norm(x)), then + SwiGLU(norm(x))."""

    def __init__(self, cfg: MLAConfig, inter_dim: int) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.dim), MLA(cfg)
        self.ffn_norm, self.ffn = RMSNorm(cfg.dim), SwiGLU(cfg.dim, inter_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Stack(nn.Module):
    """L blocks; with `ckpt=True` each block's activations are recomputed in the backward pass."""

    def __init__(self, n_layers: int, cfg: MLAConfig, inter_dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, inter_dim) for _ in range(n_layers))
        self.ckpt = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False) if self.ckpt else b(x)
        return x


L_, B_, T_, D_ = sizes((4, 2, 128, 64), (6, 2, 128, 128))
torch.manual_seed(0)
ck_cfg = MLAConfig(dim=D_, n_heads=4, q_lora_rank=D_ // 2, kv_lora_rank=D_ // 4, qk_nope_head_dim=D_ // 4,
                   qk_rope_head_dim=D_ // 8, v_head_dim=D_ // 4, max_seq_len=T_)
stack = Stack(L_, ck_cfg, 2 * D_)
x_ck = torch.randn(B_, T_, D_)


def train_step(ckpt: bool) -> None:
    stack.ckpt = ckpt
    stack.zero_grad(set_to_none=True)
    stack(x_ck).pow(2).mean().backward()


def grads() -> list[torch.Tensor]:
    return [p.grad.clone() for p in stack.parameters()]


train_step(False)
g_plain = grads()
train_step(True)
g_ckpt = grads()
ck_err = max(float((a - b).abs().max()) for a, b in zip(g_plain, g_ckpt))
mem = {ck: peak_memory(lambda ck=ck: train_step(ck)) for ck in (False, True)}
t_ck = compare({"stored": lambda: train_step(False), "recomputed": lambda: train_step(True)}, warmup=1, repeats=5)
saved = 1 - mem[True] / mem[False]
slower = ratio(t_ck["recomputed"], t_ck["stored"])
print(f"{L_} blocks, B={B_}, T={T_}, d={D_}: gradients agree to {ck_err:.1e}")
print(f"peak memory {viz.bytes_label(mem[False])} -> {viz.bytes_label(mem[True])} with checkpointing ({100 * saved:.0f}% saved)")
print(f"step time +{100 * (slower - 1):.0f}% ({t_ck['stored']} vs {t_ck['recomputed']})")

fig, ax = plt.subplots(1, 2, figsize=(8, 3))
ax[0].bar(["stored", "recomputed"], [mem[False] / 2**20, mem[True] / 2**20], color=["C0", "C1"])
ax[0].set_ylabel("peak activation memory (MiB)")
ax[0].set_title("Memory of one training step")
ax[1].bar(["stored", "recomputed"], [t_ck["stored"].median * 1e3, t_ck["recomputed"].median * 1e3], color=["C0", "C1"])
ax[1].set_ylabel("median step time (ms)")
ax[1].set_title("Time of one training step")
fig.suptitle("Activation checkpointing: memory saved vs time added")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Checkpoint:** same gradients (to round-off), a large cut in peak memory, a step that takes longer by about
# one forward pass. The saving grows with depth ($L$ block inputs instead of $L$ blocks' activations), and so do
# both numbers in interactive mode, which uses more blocks and longer sequences.
#
# ### 6.2.2 Compute: fused kernels and `torch.compile`
#
# On a CPU (and on a GPU) an operation is either **compute-bound** (matrix products: $2mnk$ FLOPs on
# $mk + kn + mn$ numbers) or **memory-bound** (elementwise work: one or two FLOPs per number read). Fusing
# operations helps the memory-bound kind. The intermediate tensors never travel to memory and back, and
# attention's $T \times T$ score matrix is never stored at all. A lone matrix product gains nothing from fusion:
# the BLAS kernel already runs at the machine's peak.
#
# We time both kinds side by side: attention written out (`softmax(q kᵀ/√d + mask) v`) vs
# PyTorch's fused `scaled_dot_product_attention`; softmax written out (`exp(x - max) / sum`) vs `torch.softmax`;
# and SwiGLU's two input projections as two matmuls vs one matmul on the concatenated weight `[w1; w3]`.

# %% [code]
torch.manual_seed(0)
T_at = 256
q_at, k_at, v_at = (torch.randn(1, 4, T_at, 64) for _ in range(3))
mask_at = torch.full((T_at, T_at), float("-inf")).triu(1)
x_sm = torch.randn(sizes(1024, 2048), 512)  # rows for softmax
w_rms = torch.randn(512)


def rms_silu_unfused() -> torch.Tensor:
    """RMSNorm then SiLU, written as five elementwise/reduction passes (what torch.compile can fuse)."""
    y = x_sm * torch.rsqrt(x_sm.pow(2).mean(-1, keepdim=True) + 1e-6) * w_rms
    return F.silu(y)
x_mm = torch.randn(sizes(512, 1024), 256)
w1, w3 = torch.randn(512, 256), torch.randn(512, 256)
w13 = torch.cat([w1, w3])  # (1024, 256)


def proj_separate() -> torch.Tensor:
    return F.silu(x_mm @ w1.T) * (x_mm @ w3.T)


def proj_fused() -> torch.Tensor:
    a, b = (x_mm @ w13.T).chunk(2, dim=-1)  # (N, 512) each
    return F.silu(a) * b


pairs = {  # name: (unfused, fused)
    "attention (memory-bound)": (lambda: torch.softmax(q_at @ k_at.transpose(-1, -2) / 8.0 + mask_at, dim=-1) @ v_at,
                                 lambda: F.scaled_dot_product_attention(q_at, k_at, v_at, is_causal=True)),
    "softmax (memory-bound)": (lambda: (lambda e: e / e.sum(-1, keepdim=True))(torch.exp(x_sm - x_sm.amax(-1, keepdim=True))),
                               lambda: torch.softmax(x_sm, dim=-1)),
    "gate/up projection (compute-bound)": (proj_separate, proj_fused),
}
speed = {}
for name, (unfused, fused) in pairs.items():
    err = float((unfused() - fused()).abs().max())
    t = compare({"unfused": unfused, "fused": fused}, warmup=2, repeats=9)
    speed[name] = ratio(t["unfused"], t["fused"])
    print(f"{name:38s} fused runs x{speed[name]:.2f} the speed of unfused (max difference {err:.1e})")

RUN_COMPILE = os.environ.get("COURSE_COMPILE") == "1" and not os.environ.get("NBGRADER_EXECUTION")
if RUN_COMPILE:
    try:
        for name, eager in (("RMSNorm + SiLU (memory-bound)", rms_silu_unfused), ("gate/up projection (compute-bound)", proj_separate)):
            t0 = time.perf_counter()
            compiled = torch.compile(eager)
            compiled()
            compile_s = time.perf_counter() - t0
            t_c = compare({"eager": eager, "compiled": compiled}, warmup=2, repeats=7)
            speed[f"{name.split(' (')[0]}, torch.compile"] = ratio(t_c["eager"], t_c["compiled"])
            print(f"torch.compile of {name}: first call {compile_s:.1f} s, then x{ratio(t_c['eager'], t_c['compiled']):.2f}")
    except Exception as e:  # no C++ compiler, unsupported platform ...
        print(f"torch.compile unavailable here: {type(e).__name__}: {str(e)[:120]}")
else:
    print("torch.compile skipped: its first call takes ~1 min on a 2-core CPU. Set COURSE_COMPILE=1 to measure it.")

fig, ax = plt.subplots(figsize=(7, 2.6))
ax.barh(list(speed), list(speed.values()), color=["C2" if v > 1.5 else "C7" for v in speed.values()])
ax.axvline(1.0, color="k", lw=1, ls="--")
ax.set_xlabel("speed-up of the fused version (x)")
ax.set_title("Fusion pays where memory traffic dominates")
fig.tight_layout()
plt.show()

# %% [markdown]
# Fused attention and `torch.softmax` should come out clearly faster (one pass over the data instead of several),
# the concatenated projection near 1x: the two matmuls already run at BLAS speed, and fusing them saves only one
# read of `x`. A single-call API is not always a fused kernel: on our CPU build `F.rms_norm` ran no faster than the
# five-operation version, so measure before relying on one.
#
# `torch.compile` generates fused kernels for whole functions. On the course's reference machine (2-core AMD EPYC,
# torch 2.13) a compiled RMSNorm + SiLU elementwise chain ran 2.8–3.5x faster than eager, after a first call of
# 54 s (11 s with a warm cache); a compiled single `nn.Linear` ran at 0.96–1.01x. Compilation pays for long
# training runs whose shapes do not change. It does not pay in a notebook that calls a function a few times, or for
# matmul-dominated code.
#
# ### 6.2.3 Hardware utilisation: an MFU estimate
#
# **Model FLOPs utilisation** is the FLOPs the model needs divided by what the hardware could do in the same
# time: $\text{MFU} = \dfrac{\text{FLOPs per step} / \text{step time}}{\text{peak FLOP/s}}$. We count the
# step's FLOPs with `FlopCounterMode` (every matmul, forward and backward) and take as "peak" the best
# throughput of a large matrix product on this CPU.

# %% [code]
with FlopCounterMode(display=False) as fc:
    train_step(False)
step_flops = fc.get_total_flops()
n_mm = 512
a_mm, b_mm = torch.randn(n_mm, n_mm), torch.randn(n_mm, n_mm)
t_peak = compare({"matmul": lambda: a_mm @ b_mm}, warmup=2, repeats=7)["matmul"]
peak = 2 * n_mm**3 / t_peak.best
achieved = step_flops / t_ck["stored"].median
print(f"training step: {step_flops / 1e9:.2f} GFLOP in {t_ck['stored']}; achieved {achieved / 1e9:.1f} GFLOP/s")
print(f"peak (best {n_mm}^3 matmul, {torch.get_num_threads()} thread): {peak / 1e9:.1f} GFLOP/s  ->  MFU-style estimate {100 * achieved / peak:.0f}%")

# DeepSeek-V3 pre-training, from the report: 14.8T tokens in 2664K H800 GPU hours. Active parameters: the published
# 37B (counted again in 6.3 with your Section 5 counter), plus the attention scores and sums of a 4K-token sequence.
flops_tok = 6 * 37e9 + attention_training_flops_per_token(V3, seq_len=4096)
per_gpu = 14.8e12 * flops_tok / (2664e3 * 3600)
print(f"\nDeepSeek-V3: {flops_tok / 1e9:.0f} GFLOP per token (6 x 37B active + attention)")
print(f"-> {per_gpu / 1e12:.0f} TFLOP/s per H800 on average: {100 * per_gpu / 989e12:.0f}% of the dense BF16 peak "
      f"(989 TFLOP/s), {100 * per_gpu / 1979e12:.0f}% of the dense FP8 peak (1979 TFLOP/s)")

# %% [markdown]
# Small models on a CPU stay well below the matmul peak because much of the step is not large matmuls. Norms,
# RoPE, softmax and the Python overhead of many small operations all count as time but not as model FLOPs. The same estimate for
# DeepSeek-V3 uses $6N_{\text{active}}$ FLOPs per token (forward $2N$, backward $4N$) plus attention: about 250
# GFLOP per token, i.e. ~390 TFLOP/s per GPU sustained over the whole run (H100/H800 SXM dense peaks assumed).
# That includes pipeline bubbles, communication and recomputation, so the GEMMs themselves run faster still.
#
# ## 6.3 Does it fit? A memory plan for 671B parameters
#
# Every number below follows from the configuration. You counted the parameters in Section 5.2.3
# (`count_parameters`); here the same counter, in the course's version, splits them by component, because a parallel
# layout treats the routed experts differently from everything else. With $d = 7168$, $n_h = 128$, $L = 61$ layers
# of which the first 3 are dense:
#
# | component | parameters per layer |
# |---|---|
# | MLA | $d\,d_c' + d_c' + d_c'\,n_h(d_h + d_h^R) + d\,(d_c + d_h^R) + d_c + d_c\,n_h(d_h + d_v) + n_h d_v\, d$ |
# | dense MLP (3 layers) | $3\, d \cdot 18432$ |
# | one expert (shared or routed) | $3\, d \cdot 2048$ (SwiGLU: $w_1, w_3: d \to 2048$, $w_2$ back) |
# | router (58 MoE layers) | $256\, d$ weights (the balancing bias is a buffer, not a parameter) |
# | norms | $2d$ per layer, $+ d$ final |
# | embedding, output head | $129280 \cdot d$ each (not tied) |
#
# **Active parameters**, the course's one convention since Section 5: the weights one token multiplies with, all of
# the above except the routed experts it did not choose ($256 - 8$ per MoE layer) and except the embedding table,
# from which a token reads one row. This gives DeepSeek-V3's "671B total, 37B activated" (36.6B) and also V2's
# "236B, 21B".
#
# **KV cache** per token per layer: MLA stores $d_c + d_h^R$ numbers; standard MHA with the same heads stores $2 n_h d_h$.
#
# **Training memory per GPU** (weights, gradients, FP32 master weights, Adam moments; activations come on top).
# With $E$ the routed-expert parameters and $O$ all others, under a `Parallelism(dp, tp, pp, ep, zero1)`:
#
# $$P_{\text{GPU}} = \frac{O}{tp\cdot pp} + \frac{E}{ep\cdot pp},\qquad
# \text{weights} = P_{\text{GPU}}\, b_w,\quad \text{grads} = P_{\text{GPU}}\, b_g,\quad
# \text{states} = \begin{cases}(O+E)\,(b_m + b_o)/(dp\cdot tp\cdot pp) & \text{ZeRO-1}\\ P_{\text{GPU}}\,(b_m + b_o) & \text{otherwise}\end{cases}$$
#
# where $b_w, b_g, b_m, b_o$ are `Precision.weights, .grads, .master, .optimizer` bytes per parameter. PP splits the
# layers (assume an even split of parameters), TP splits every non-expert weight, EP splits the routed experts,
# and ZeRO-1 shards master weights and moments over the data-parallel replicas. Each GPU then holds 1/world of them.
#
# ```
#  2048 GPUs = 16 pipeline stages x 128 data-parallel ranks       (DeepSeek-V3 pre-training, no TP)
#  stage s:  [ GPU 0 | GPU 1 | ... | GPU 127 ]   attention, shared experts: replicated on all 128
#                \_____ 64-way EP ____/ x 2      routed experts: 256/64 = 4 per layer per GPU
# ```

# %% [given]
get_cluster(2, wait=False)  # start the two workers of 6.4 now: they import torch in the background meanwhile
# Section 5's parameter counter, by component (the course's version of your count_parameters; same convention)
from course_lib.param_count import active_params, count_params

_c = count_params(V3)
print(f"DeepSeek-V3: {sum(_c.values()) / 1e9:.1f}B parameters, {active_params(V3) / 1e9:.1f}B active; "
      f"components: {', '.join(_c)}")

# %% [solution id=ex_06_3_planner]
def kv_cache_bytes_per_token(cfg: ModelConfig, kind: str = "mla", bytes_per_element: float = 2) -> float:
    """Bytes one token adds to the cache, summed over all layers.

    kind="mla": the latent c_KV and the shared rotary key; kind="mha": per-head keys and values of standard
    attention with cfg.n_heads heads of cfg.qk_nope_head_dim. Any other kind raises ValueError.
    """
    ### BEGIN SOLUTION
    if kind == "mla":
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    elif kind == "mha":
        per_layer = 2 * cfg.n_heads * cfg.qk_nope_head_dim
    else:
        raise ValueError(f"kind must be 'mla' or 'mha', got {kind!r}")
    return per_layer * cfg.n_layers * bytes_per_element
    ### END SOLUTION


def per_gpu_memory(cfg: ModelConfig, par: Parallelism, prec: Precision) -> dict[str, float]:
    """Bytes of model states on one GPU under `par` (see the formulas above).

    Returns {"params", "weights", "grads", "states", "total"}; total = weights + grads + states. Count the
    parameters with the given count_params(cfg).
    """
    ### BEGIN SOLUTION
    c = count_params(cfg)
    E = c["routed_experts"]
    O = sum(c.values()) - E
    P = O / (par.tp * par.pp) + E / (par.ep * par.pp)
    per_state = prec.master + prec.optimizer
    states = (O + E) * per_state / (par.dp * par.tp * par.pp) if par.zero1 else P * per_state
    out = {"params": P, "weights": P * prec.weights, "grads": P * prec.grads, "states": states}
    out["total"] = out["weights"] + out["grads"] + out["states"]
    return out
    ### END SOLUTION


# %% [test id=test_06_3_planner points=4]
# Checks you can run now. When graded, the judge runs these and more (4 points): MLA and MHA cache bytes on V3, V2, V2-Lite and an odd config, bytes_per_element, ValueError; per-GPU memory for 5 layouts x 3 precisions, ZeRO-1 on and off, each usual slip named.
from course_lib.plan_config import BF16_MIXED as _BF16, ModelConfig as _MC, Parallelism as _Par
from course_lib.testing import assert_true

_v3 = _MC()
_total = sum(count_params(_v3).values())
assert_true(kv_cache_bytes_per_token(_v3, "mla") == 70272, f"MLA cache {kv_cache_bytes_per_token(_v3, 'mla')} bytes/token, expected 576 x 61 x 2")
_m = per_gpu_memory(_v3, _Par(), _BF16)
assert_true(isinstance(_m, dict) and set(_m) >= {"params", "weights", "grads", "states", "total"},
            f"per_gpu_memory keys: {sorted(_m) if isinstance(_m, dict) else _m}")
assert_true(abs(_m["total"] - 18 * _total) < 1e6, "on one GPU with BF16_MIXED every parameter costs 2 + 4 + 4 + 8 = 18 bytes")
print(f"planner: {_m['total'] / GiB:,.0f} GiB of model states on one GPU, {kv_cache_bytes_per_token(_v3, 'mla'):,.0f} cache bytes "
      "per token; visible tests passed")

# %% [markdown]
# **Checkpoint:** 671.0B parameters, 36.6B active, 70,272 bytes of MLA cache per token (~70 KB), 12 GiB of model
# states per GPU in DeepSeek-V3's training layout. The figures below are drawn with your planner and the given counter.

# %% [code]
def memory_figure() -> None:
    """Where DeepSeek-V3's parameters and KV cache go: the given counter and your cache bytes (6.3)."""
    counts = count_params(V3)
    act = active_params(V3)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    names = list(counts)
    ax[0].barh(names, [counts[k] / 1e9 for k in names], color="C0")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("parameters (billions, log scale)")
    ax[0].set_title(f"DeepSeek-V3: {sum(counts.values()) / 1e9:.1f}B total")
    routed_active = (V3.n_layers - V3.n_dense_layers) * V3.n_activated_experts * 3 * V3.dim * V3.moe_inter_dim
    parts = {"routed (chosen 8)": routed_active, "attention": counts["attention"], "shared experts": counts["shared_experts"],
             "dense MLP + head + router + norms": act - routed_active - counts["attention"] - counts["shared_experts"]}
    ax[1].pie(list(parts.values()), labels=list(parts), autopct="%1.0f%%", textprops={"fontsize": 8})
    ax[1].set_title(f"{act / 1e9:.1f}B active per token")
    ctx = np.array([4096, 16384, 32768, 65536, 131072])
    for kind, c in (("mla", "C2"), ("mha", "C3")):
        ax[2].plot(ctx / 1024, [kv_cache_bytes_per_token(V3, kind) * t / GiB for t in ctx], "o-", color=c, label=kind.upper())
    ax[2].axhline(80, color="k", ls="--", lw=1, label="one 80 GB GPU")
    ax[2].set_yscale("log")
    ax[2].set_xlabel("context (K tokens)")
    ax[2].set_ylabel("KV cache per sequence (GiB, BF16)")
    ax[2].set_title("KV cache of one request")
    ax[2].legend(fontsize=8)
    fig.suptitle("Where DeepSeek-V3's memory goes")
    fig.tight_layout()
    plt.show()
    print(f"at 128K tokens: MLA {kv_cache_bytes_per_token(V3) * 131072 / GiB:.2f} GiB vs MHA "
          f"{kv_cache_bytes_per_token(V3, 'mha') * 131072 / GiB:.0f} GiB per request")


try:
    memory_figure()
except NotImplementedError:
    plt.close("all")
    print("(finish exercise 6.3 to see this figure)")

# %% [code]
def layout_explorer(ep: int = 64, pp: int = 16, dp: int = 128, tp: int = 1, zero1: bool = True) -> None:
    """Per-GPU model states for DeepSeek-V3 under a parallel layout (your per_gpu_memory)."""
    par = Parallelism(dp=dp, tp=tp, pp=pp, ep=ep, zero1=zero1)
    try:
        par.check(V3)
        mems = {name: per_gpu_memory(V3, par, prec) for name, prec in
                (("BF16 mixed (18 B/param)", BF16_MIXED), ("DeepSeek-V3 (14 B/param)", DEEPSEEK_V3))}
    except NotImplementedError:
        print("(finish exercise 6.3 to see this figure)")
        return
    except ValueError as e:
        print(f"invalid layout: {e}")
        return
    fig, ax = plt.subplots(figsize=(7, 2.8))
    left = np.zeros(len(mems))
    for key, c in (("weights", "C0"), ("grads", "C1"), ("states", "C2")):
        vals = np.array([m[key] / GiB for m in mems.values()])
        ax.barh(list(mems), vals, left=left, color=c, label=key)
        left += vals
    ax.axvline(80 * 1e9 / GiB, color="k", ls="--", lw=1, label="80 GB")
    ax.set_xlabel("GiB per GPU (model states only)")
    ax.set_title(f"{par.world} GPUs: dp={dp} tp={tp} pp={pp} ep={ep} zero1={zero1}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    plt.show()


viz.interactive(layout_explorer, ep=[64, 8, 16, 32, 128], pp=[16, 1, 4, 8], dp=[128, 16, 32, 64, 256], tp=[1, 2, 4, 8],
                zero1=[True, False])

# %% [markdown]
# ## 6.4 Scaling: data and expert parallelism on `torch.distributed`
#
# A **process group** is a set of processes (ranks $0..W-1$) that can run **collectives** together.
# `all_reduce` leaves the sum of every rank's tensor on every rank. `all_to_all` gives each rank a
# different slice of every other rank's data:
#
# ```
#   all_to_all_single(out, inp, output_split_sizes=recv, input_split_sizes=send)
#
#   rank 0 inp: [ a0 a0 | b0 ]        send = [2, 1]   ->  rank 0 out: [ a0 a0 | a1 ]        recv = [2, 1]
#   rank 1 inp: [ a1 | b1 b1 b1 ]     send = [1, 3]   ->  rank 1 out: [ b0 | b1 b1 b1 ]     recv = [1, 3]
#               to 0   to 1                                           from 0  from 1
# ```
#
# The *backend* moves the bytes: **gloo** over TCP on CPUs (here), **NCCL** over NVLink/InfiniBand on GPUs. The
# code is the same. `get_cluster(2)` starts two worker processes (start method `spawn`: each imports torch, which
# takes a few seconds, once per kernel) that join a gloo group. `cluster.run(fn, *args)` runs `fn` on both ranks
# and returns both results. Functions defined in this notebook travel to the workers as source code. Keep them
# at the top level of a cell and use only modules, constants and other top-level functions. The same worker
# code runs under `torchrun --nproc-per-node 8 -m course_lib.distributed` on a GPU node.
#
# **Data parallelism (DP).** Every rank holds the whole model and a shard of the batch. With the global loss
# $\mathcal{L} = \frac{1}{W}\sum_r \mathcal{L}_r$ (equal shards), the gradient is the average of the ranks'
# gradients, $\nabla\mathcal{L} = \frac1W\sum_r \nabla \mathcal{L}_r$: one `all_reduce` per parameter, and the
# replicas stay identical.

# %% [given]
cluster = get_cluster(2)  # started in the background at the top of 6.3; waits until both workers joined
print(f"2 gloo workers joined after {cluster.startup_seconds:.1f} s; ranks report {cluster.run(cdist.rank)}")

# %% [code]
def dp_model() -> nn.Module:
    torch.manual_seed(7)
    return SwiGLU(16, 32).double()


gen = torch.Generator().manual_seed(1)
x_dp = torch.randn(12, 16, generator=gen, dtype=torch.float64)
y_dp = torch.randn(12, 16, generator=gen, dtype=torch.float64)
dp_grads = cluster.run(cdist.dp_job, dp_model, x_dp, y_dp)  # each rank: 6 rows, backward, all_reduce(mean)
model_1 = dp_model()
(model_1(x_dp) - y_dp).pow(2).mean().backward()
dp_err = max(float((g[n] - p.grad).abs().max()) for g in dp_grads for n, p in model_1.named_parameters())
print(f"data parallel over 2 processes vs one process: max gradient difference {dp_err:.1e}")

# %% [markdown]
# ### 6.4.1 Expert parallelism: dispatch and combine
#
# DeepSeek-V3 trains with 64-way expert parallelism: each GPU of an EP group holds $256/64 = 4$ routed experts per
# layer, and every token's hidden state travels to the GPUs that own its 8 chosen experts, then back. With $W$ ranks,
# $E$ experts, rank $r$ owning experts $[rE/W, (r+1)E/W)$, and $N$ local tokens with top-$K$ routing:
#
# ```
#   rank r                                                     rank j (owner of expert e)
#   x (N, D), topk_idx (N, K)
#   1. flatten the N*K (token, expert) pairs, sort by expert
#      -> rows grouped by destination rank, send_counts (W,)
#   2. all_to_all(send_counts)          ---- counts ---->     recv_counts (W,): how many rows will arrive
#   3. all_to_all(x[token_of_pair])     ---- rows  ---->      recv_x (R, D), recv_expert (R,) local ids
#                                                              4. y = expert_e(rows of e)      (run_local_experts)
#   5. all_to_all(y), splits reversed   <--- results ----
#   6. out[t] += w_{t,k} * result       (index_add over token_of_pair)
# ```
#
# The counts go first because `all_to_all_single` must know how many rows it receives from each rank before it can
# allocate the output. The **backward** of an all-to-all is the all-to-all with the splits swapped. `all_to_all(x,
# send_counts, recv_counts)` from `course_lib.cluster` wraps `dist.all_to_all_single` with that backward.
# Use it for the rows and the expert ids. For the counts, call `dist.all_to_all_single` yourself on int64 tensors.
#
# Given: `all_to_all(x, send_counts, recv_counts, group)` (differentiable for floating tensors; before any row moves
# it checks that the ranks agree on the split sizes, so a mismatch is a `ValueError` on every rank rather than a hang),
# `DispatchPlan(order, token_of, send_counts, recv_counts, n_tokens)` (what combine needs),
# `run_local_experts(recv_x, recv_expert, experts)`. When graded, your two functions run on the two workers for eight
# layers and routings (uneven shards, a rank without tokens, every token routed to one rank, ...), forward and backward.

# %% [solution id=ex_06_4_expert_parallel]
def ep_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, n_experts: int, group=None):
    """Send every (token, expert) pair's row to the rank that owns the expert.

    x: (N, D) this rank's tokens; topk_idx: (N, K) global expert ids in [0, n_experts).
    Rank r owns experts [r * E/W, (r + 1) * E/W). Returns
      recv_x (R, D): rows this rank's experts must process (grouped by source rank, in rank order),
      recv_expert (R,): their LOCAL expert ids in [0, E/W),
      plan: DispatchPlan(order, token_of, send_counts, recv_counts, n_tokens=N), where `order` sorts
            topk_idx.flatten() by expert, token_of[i] is the token of the i-th sorted pair, and
            send_counts/recv_counts are lists of W ints.
    Exchange the counts first (dist.all_to_all_single on int64 tensors), then rows and expert ids (all_to_all).
    """
    W, r = dist.get_world_size(group), dist.get_rank(group)
    ### BEGIN SOLUTION
    N, K = topk_idx.shape
    per = n_experts // W
    flat = topk_idx.reshape(-1)  # (N*K,)
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert -> by destination rank
    token_of = order // K  # (N*K,)
    send_counts = torch.bincount(flat[order] // per, minlength=W)  # (W,)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    recv_x = all_to_all(x[token_of], send, recv, group)  # (R, D)
    recv_expert = all_to_all(flat[order], send, recv, group) - r * per  # (R,)
    return recv_x, recv_expert, DispatchPlan(order, token_of, send, recv, N)
    ### END SOLUTION


def ep_combine(y: torch.Tensor, plan: DispatchPlan, topk_weight: torch.Tensor, group=None) -> torch.Tensor:
    """Return expert outputs to their tokens and sum them: out[t] = sum_k topk_weight[t, k] * E_k(x_t).

    y: (R, D) outputs for the rows this rank received, in recv_x's order; topk_weight: (N, K).
    Returns out (N, D) without the shared expert (the caller adds it).
    """
    ### BEGIN SOLUTION
    back = all_to_all(y, plan.recv_counts, plan.send_counts, group)  # (N*K, D) in sorted-pair order
    w = topk_weight.reshape(-1)[plan.order].to(back.dtype)  # (N*K,)
    out = back.new_zeros(plan.n_tokens, back.shape[-1])  # (N, D)
    return out.index_add(0, plan.token_of, back * w[:, None])
    ### END SOLUTION


# %% [test id=test_06_4_expert_parallel points=8]
# Checks you can run now. When graded, the judge runs these and more (8 points): outputs and gradients (router through the combine weights, tokens, experts, shared expert) against one process in float64; split sizes, local expert ids and the plan; uneven shards, a rank without tokens, every token on one rank, top-1 with an idle expert, no shared expert, 16 experts.
import functools

import torch
from course_lib.cluster import ep_job, get_cluster, make_moe, single_process_reference
from course_lib.testing import assert_close, assert_true

_moe_fn = functools.partial(make_moe, 0, dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2,
                            n_expert_groups=2, n_limited_groups=2)
_g = torch.Generator().manual_seed(0)
_x = torch.randn(10, 16, generator=_g, dtype=torch.float64)
_probe = torch.randn(10, 16, generator=_g, dtype=torch.float64)
_res = get_cluster(2).run(ep_job, _moe_fn, _x, _probe, dispatch=ep_dispatch, combine=ep_combine, backward=False, timeout=60)
_ref = single_process_reference(_moe_fn(), _x, _probe)
assert_close(torch.cat([r["out"] for r in _res]), _ref["out"], atol=1e-12, rtol=0, name="EP output over 2 ranks vs one process",
             hint="multiply each returned row by its pair's combine weight, taken in the same sorted order as the "
                  "rows, and sum per token")  # measured 3e-17
for _rk in range(2):
    assert_true(_res[_rk]["recv_counts"] == [_res[_j]["send_counts"][_rk] for _j in range(2)],
                f"rank {_rk} recv_counts {_res[_rk]['recv_counts']} do not match what the ranks sent it",
                hint="exchange send_counts with dist.all_to_all_single before sending rows")
print("expert parallel forward: visible tests passed")

# %% [markdown]
# **Checkpoint:** two processes, each holding half the experts, compute the same outputs and gradients as one
# process holding all of them, to float64 round-off. That holds even when one rank receives no tokens.
#
# Below, your dispatch and combine run the same layer with balanced and with skewed routing. Each matrix
# shows the rows rank $i$ sent to rank $j$ (its `send_counts`). Off-diagonal entries cross between processes:
# on a GPU cluster they go over NVLink inside a node or InfiniBand between nodes.

# %% [code]
torch.manual_seed(0)
moe_kw = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=2)
x_ep = torch.randn(sizes(64, 256), 16, dtype=torch.float64)
probe_ep = torch.randn_like(x_ep)


def ep_runs(moe_fn, x, probe, **kw) -> list | None:
    """One MoE layer over the two workers with your ep_dispatch / ep_combine; None while 6.4 is unfinished."""
    try:
        return cluster.run(cdist.ep_job, moe_fn, x, probe, dispatch=ep_dispatch, combine=ep_combine, timeout=20, **kw)
    except WorkerError as e:
        if "NotImplementedError" in e.exc_types:
            return None
        raise


runs = {
    "balanced (bias 0)": functools.partial(cdist.make_moe, 0, **moe_kw),
    "skewed (bias +1 on rank 0's experts)": functools.partial(cdist.make_moe, 0, bias=[1.0] * 4 + [0.0] * 4, **moe_kw),
}
# your Section 3 MoE, when saved and right (one line either way): both workers load it from your file
if my_part("03_moe", "MixtureOfExperts", fallback=None, check=lambda c: check_moe(your_moe(c))) is not None:
    runs["your MoE (Section 3), balanced"] = functools.partial(cdist.make_moe, 0, parts=str(module_path("03_moe")), **moe_kw)
results = {label: ep_runs(fn, x_ep, probe_ep) for label, fn in runs.items()}
if any(res is None for res in results.values()):
    print("(finish exercise 6.4 to see this figure)")
    results = {}
fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2)) if results else (None, [])
for ax, (label, fn) in zip(axes, runs.items()):
    res = results[label]
    err = cdist.compare_ep(res, cdist.single_process_reference(fn(), x_ep, probe_ep))
    M = np.array([r["send_counts"] for r in res])
    im = ax.imshow(M, cmap="Blues", vmin=0)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, int(M[i, j]), ha="center", va="center", color="k")
    ax.grid(False)
    ax.set_xticks([0, 1], ["rank 0", "rank 1"])
    ax.set_yticks([0, 1], ["rank 0", "rank 1"])
    ax.set_xlabel("destination (expert owner)")
    ax.set_ylabel("source (token owner)")
    ax.set_title(label, fontsize=10)
    print(f"{label}: max |EP - single process| over outputs and gradients = {max(err.values()):.1e}")
if results:
    fig.suptitle("Rows sent between ranks by one MoE layer (send_counts)")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ### 6.4.2 Node-limited routing
#
# Inside a node, GPUs talk over NVLink (~160 GB/s per GPU on H800); between nodes over InfiniBand (~50 GB/s), about
# 3.2x slower. DeepSeek-V3 therefore sends each token to **at most 4 nodes**. Its 256 experts form 8 groups, one
# group per node of the 64-way EP group (8 nodes x 8 GPUs). Group-limited routing keeps the 4 best groups per
# token. A token is sent **once per node** and forwarded to its experts over NVLink inside the node, so the
# InfiniBand traffic per token is bounded by the number of distinct nodes, not by $K = 8$.
#
# We measure both quantities on DeepSeek-V3's router shape (sigmoid affinities, top-8 of 256, 8 groups):
# *rows* (one per token-expert pair on another node) and *copies* (one per distinct remote node). Then the same
# with the real 2-process layer, whose two ranks play the two "nodes".

# %% [code]
torch.manual_seed(0)
N_tok = sizes(2048, 8192)
scores_v3 = torch.sigmoid(torch.randn(N_tok, 256) * 0.5 + 0.3 * torch.randn(256))  # experts differ in popularity
bias_v3 = 0.02 * torch.randn(256)
token_node = torch.randint(0, 8, (N_tok,))  # each token lives on one of 8 nodes
stats = {}
for label, groups in (("no group limit", dict(n_groups=1, n_limited_groups=1)), ("4 of 8 groups (V3)", dict(n_groups=8, n_limited_groups=4))):
    _, idx = moe_route(scores_v3, bias_v3, top_k=8, route_scale=2.5, **groups)
    stats[label] = (idx, cdist.routing_traffic(idx, 256, 8, token_node))
fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
for (label, (idx, st)), c in zip(stats.items(), ("C3", "C2")):
    nodes = torch.zeros(N_tok, 8, dtype=torch.bool).scatter_(1, idx // 32, True).sum(1)
    ax[0].hist(nodes.numpy(), bins=np.arange(0.5, 9.5), alpha=0.6, color=c, label=label)
    print(f"{label:20s}: nodes per token mean {st['mean_ranks_per_token']:.2f} (max {st['max_ranks_per_token']}); "
          f"remote rows per token {st['rows_remote_per_token']:.2f}, remote copies per token {st['copies_remote_per_token']:.2f}")
ax[0].set_xlabel("nodes a token's 8 experts live on")
ax[0].set_ylabel("tokens")
ax[0].set_title("Nodes per token (256 experts, top-8)")
ax[0].legend(fontsize=8)
lbl = list(stats)
x_pos = np.arange(2)
ax[1].bar(x_pos - 0.2, [stats[k][1]["rows_remote_per_token"] for k in lbl], 0.4, label="rows (one per pair)")
ax[1].bar(x_pos + 0.2, [stats[k][1]["copies_remote_per_token"] for k in lbl], 0.4, label="copies (one per node)")
ax[1].set_xticks(x_pos, lbl)
ax[1].set_ylabel("cross-node transfers per token")
ax[1].set_title("Inter-node traffic per token")
ax[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

crossing = {}
for label, n_lim in (("no group limit", 2), ("1 of 2 groups", 1)):
    fn = functools.partial(cdist.make_moe, 0, dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=3,
                           n_expert_groups=2, n_limited_groups=n_lim)
    res = ep_runs(fn, x_ep, probe_ep, backward=False)
    if res is None:
        print("(finish exercise 6.4 to see what crosses ranks in the 2-process layer)")
        break
    rows = sum(r["send_counts"][1 - r["rank"]] for r in res)
    copies = sum(cdist.routing_traffic(r["topk_idx"], 8, 2, r["rank"])["copies_remote"] for r in res)
    crossing[label] = (rows, copies)
    print(f"2 processes, {label:15s}: {rows} rows and {copies} token copies crossed ranks for {len(x_ep)} tokens x 3 experts")

# %% [markdown]
# Group-limited routing barely changes the number of *rows* that leave a node (the 8 experts still sit somewhere
# else), but it caps the number of distinct nodes, and with them the deduplicated *copies* that cross
# InfiniBand. The quality cost is small because the 4 kept groups are the ones with the best experts.
#
# ### 6.4.3 Capacity and token dropping at scale
#
# A fixed-size buffer per expert (or per device) makes the computation static: each expert processes at most
# $C = \lceil \text{cf} \cdot NK/E \rceil$ pairs, and the rest are **dropped** (their contribution is zero, the
# residual carries the token on). Statistics work against large $E$. With more experts, each expert's load is a
# smaller sample and fluctuates more relative to its mean, and the busiest of many experts overflows
# more often. Capacity per *device* (DeepSeek-V2's device-level dropping) pools the experts of a device
# and overflows less. DeepSeek-V3 drops **no** tokens in training or inference: its bias-based balancing keeps the
# load even enough to do without.

# %% [code]
def drop_curves(n_tokens: int = 1024, skew: float = 0.3, seed: int = 0) -> None:
    """Fraction of dropped (token, expert) pairs vs capacity factor, per expert and per device, for 3 model sizes."""
    g = torch.Generator().manual_seed(seed)
    cfs = [1.0, 1.1, 1.25, 1.5, 2.0]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    for E, K, c in ((16, 2, "C0"), (64, 6, "C1"), (256, 8, "C2")):
        popularity = skew * torch.randn(E, generator=g)  # some experts are more attractive than others
        s = torch.sigmoid(torch.randn(n_tokens, E, generator=g) + popularity)
        _, idx = moe_route(s, None, top_k=K)
        per_exp = [cdist.capacity_drop(idx, E, cf)["drop_fraction"] for cf in cfs]
        per_dev = [cdist.capacity_drop(idx, E, cf, world=8)["drop_fraction"] for cf in cfs]
        ax[0].plot(cfs, per_exp, "o-", color=c, label=f"E={E}, K={K}: per expert")
        ax[0].plot(cfs, per_dev, "s--", color=c, label=f"E={E}, K={K}: per device (8)")
        # auxiliary-loss-free balancing (gamma 0.01 here, 50 steps) on the same tokens
        bias = torch.zeros(E)
        for _ in range(50):
            _, idx_b = moe_route(s, bias, top_k=K)
            bias += 0.01 * torch.sign(torch.bincount(idx_b.flatten(), minlength=E).float().mean()
                                      - torch.bincount(idx_b.flatten(), minlength=E).float())
        ax[1].bar(f"E={E}\nno bias", cdist.capacity_drop(idx, E, 1.25)["drop_fraction"], color=c, alpha=0.5)
        ax[1].bar(f"E={E}\nbalanced", cdist.capacity_drop(idx_b, E, 1.25)["drop_fraction"], color=c)
    ax[0].set_xlabel("capacity factor")
    ax[0].set_ylabel("fraction of pairs dropped")
    ax[0].set_title(f"Dropping vs capacity ({n_tokens} tokens, popularity skew {skew})")
    ax[0].legend(fontsize=7)
    ax[1].set_ylabel("fraction dropped at cf = 1.25")
    ax[1].set_title("After bias balancing (per expert)")
    fig.tight_layout()
    plt.show()


viz.interactive(drop_curves, n_tokens=sizes([512, 256, 2048], [2048, 512, 8192]), skew=[0.3, 0.0, 0.6, 1.0])

# %% [markdown]
# ## 6.5 Serving: the latent cache and concurrent requests
#
# At inference the model runs once over the prompt (**prefill**, compute-bound) and then one token per step for
# every active request (**decode**, memory-bound: each step reads all active weights and every request's cache).
# Batching many requests into one decode step reuses each weight read across them, so throughput grows with
# concurrency until the caches fill the memory. MLA's absorbed path attends directly over the cached latent $c^{KV}$
# and the shared rotary key. The per-head keys and values are never rebuilt.
#
# Below, 4 requests of different prompt lengths are decoded together with `course_lib.deepseek.mla.MLA`
# (absorbed path, `LatentKVCache`). The outputs are checked against a full recomputation of each sequence, and
# decode throughput is timed at several batch sizes.

# %% [code]
torch.manual_seed(0)
srv_cfg = MLAConfig(dim=64, n_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                    v_head_dim=16, max_seq_len=128)
srv = MLA(srv_cfg).double().eval()
n_req, prompt, n_new = 4, 24, sizes(8, 32)
seqs = torch.randn(n_req, prompt + n_new, srv_cfg.dim, dtype=torch.float64)  # hidden states entering the layer
cache = srv.new_cache(batch=n_req, max_seq_len=prompt + n_new)
with torch.no_grad():
    outs = [srv(seqs[:, :prompt], 0, cache, absorb=True)]  # prefill all requests
    for t in range(prompt, prompt + n_new):
        outs.append(srv(seqs[:, t : t + 1], t, cache, absorb=True))  # one decode step for every request
    full = srv(seqs)  # naive path, whole sequences, no cache
serve_err = float((torch.cat(outs, 1) - full).abs().max())
mha = MultiHeadAttention(srv_cfg.dim, srv_cfg.n_heads, srv_cfg.qk_nope_head_dim, max_seq_len=128).double()
mha_cache = mha.new_cache(batch=n_req, max_seq_len=prompt + n_new)
print(f"{n_req} requests, {prompt}-token prompts, {n_new} decode steps: cached absorbed decode vs full recompute {serve_err:.1e}")
print(f"cache per token per layer: latent {cache.elements_per_token} numbers, MHA with the same heads "
      f"{mha_cache.elements_per_token}; cache of this batch: {viz.bytes_label(cache.nbytes)} vs {viz.bytes_label(mha_cache.nbytes)}")

srv32 = MLA(MLAConfig(dim=128, n_heads=8, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=16, max_seq_len=256)).eval()
throughput = {}
for bsz in sizes([1, 4, 16, 64], [1, 4, 16, 64, 128]):
    c = srv32.new_cache(batch=bsz, max_seq_len=256)
    xb = torch.randn(bsz, 128, 128)
    with torch.no_grad():
        srv32(xb, 0, c, absorb=True)
        step = torch.randn(bsz, 1, 128)

        def one_step(c=c, step=step) -> None:
            c.length = 128  # decode position 128 again each time: same cost per call
            srv32(step, 128, c, absorb=True)

        t = compare({"step": one_step}, warmup=3, repeats=7, number=3)["step"]
    throughput[bsz] = bsz / t.median
fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
ax[0].plot(list(throughput), list(throughput.values()), "o-")
ax[0].set_xscale("log", base=2)
ax[0].set_xlabel("concurrent requests (batch)")
ax[0].set_ylabel("decoded tokens / s")
ax[0].set_title("Decode throughput grows with batching")
free = 60 * GiB  # memory left for caches on an 80 GB GPU after weights and buffers (assumed)
ctxs = [4096, 16384, 32768, 65536, 131072]
try:  # your kv_cache_bytes_per_token (6.3)
    fits = {kind: [int(free // (kv_cache_bytes_per_token(V3, kind) * t)) for t in ctxs] for kind in ("mla", "mha")}
except NotImplementedError:
    fits = None
    ax[1].set_axis_off()
    ax[1].text(0.5, 0.5, "finish exercise 6.3\nto see this panel", ha="center", va="center")
for kind, c in (("mla", "C2"), ("mha", "C3")) if fits else ():
    ax[1].plot([t // 1024 for t in ctxs], fits[kind], "o-", color=c, label=kind.upper())
if fits:
    ax[1].set_xlabel("context per request (K tokens)")
    ax[1].set_ylabel("requests whose cache fits in 60 GiB")
    ax[1].set_yscale("symlog")
    ax[1].set_title("DeepSeek-V3 KV cache per GPU")
    ax[1].legend()
fig.tight_layout()
plt.show()
print("decode tokens/s by batch:", {b: round(v) for b, v in throughput.items()})
if fits:
    per_request = kv_cache_bytes_per_token(V3) * 131072
    print(f"DeepSeek-V3 at 128K tokens: {per_request / GiB:.2f} GiB per request with MLA -> {int(free // per_request)} "
          f"requests in 60 GiB; MHA needs {kv_cache_bytes_per_token(V3, 'mha') * 131072 / GiB:.0f} GiB for one")
else:
    print("(finish exercise 6.3 to see how many 128K-token requests fit)")

# %% [markdown]
# In DeepSeek-V3's deployment, decoding runs on units of 40 nodes (320 GPUs): attention with 4-way tensor
# parallelism plus sequence parallelism and 80-way data parallelism, and the MoE with 320-way expert parallelism.
# Prefilling runs on units of 4 nodes (32 GPUs), with TP4 + SP and DP8 for attention and EP32 for the MoE. The
# latent cache cannot be split by heads, because all heads share $c^{KV}$. Under tensor parallelism every TP rank
# keeps a copy of it. That is one reason attention is mostly *data*-parallel at decode: each rank serves its own
# requests and their caches.
#
# ## Optional challenge (ungraded)
# 1. **Deduplicated dispatch.** Change `ep_dispatch` to send each token once per destination rank, with the list of
#    its local experts, and fan out on the receiving side. Measure the rows sent against `copies_remote`.
# 2. **Capacity in EP.** Add a per-expert capacity to your dispatch: drop the pairs beyond capacity *before* the
#    all-to-all (first come first served), and check the result against `course_lib.deepseek.moe.dispatch_sorted`
#    with the same capacity.
# 3. **Selective recomputation.** Checkpoint only the RMSNorms and MLA up-projections (as DeepSeek-V3 does) instead
#    of whole blocks, and place the result on the memory/time plane of 6.2.1.
#
# Each challenge has a cell below for your attempt (ungraded; the worked solutions show one way).
#
# ### Worked challenge 1: deduplicated dispatch
# A token whose $K$ experts sit on the same rank travels there $K$ times in `ep_dispatch`. Send it **once per
# destination rank** instead, together with the list of its experts that rank owns (a `(K,)` row of local ids, `-1`
# where the expert lives elsewhere), and fan the row out on arrival. The way back is deduplicated too: the receiver
# weights and sums its experts' outputs for the token (the combine weights travel with the token) and returns one row.
# Rows crossing ranks should then equal `routing_traffic(...)["copies_remote"]`, not `rows_remote`. The plan is a
# `SimpleNamespace` with `DispatchPlan`'s fields (the counts now count token rows) plus what the fan-out needs.

# %% [solution id=ex_06_c1_dedup_dispatch]
from types import SimpleNamespace


def ep_dispatch_dedup(x: torch.Tensor, topk_idx: torch.Tensor, n_experts: int, group=None):
    """Challenge 1: like ep_dispatch, but each token crosses to a rank once, with its local expert ids.

    Returns recv_x (P, D) and recv_expert (P,) (one row per (token, expert) pair this rank serves, as ep_dispatch
    does) and a plan: order (S,) positions j * N + t of the (rank j, token t) rows sent, token_of (S,),
    send_counts/recv_counts (token rows per rank), n_tokens, and pair_row/pair_slot (P,): the received row and
    the top-k slot each of recv_x's rows came from.
    """
    ### BEGIN SOLUTION
    W = dist.get_world_size(group)
    N, K = topk_idx.shape
    per = n_experts // W
    dest = topk_idx // per  # (N, K) rank of each pair's expert
    visits = torch.zeros(W, N, dtype=torch.bool, device=x.device)
    visits[dest.T, torch.arange(N, device=x.device).expand(K, N)] = True  # (W, N): token t needs rank j
    order = visits.reshape(-1).nonzero().squeeze(1)  # (S,) grouped by rank, token order inside
    token_of, dest_of = order % N, order // N  # (S,), (S,)
    slots = torch.where(dest[token_of] == dest_of[:, None], topk_idx[token_of] - dest_of[:, None] * per, -1)  # (S, K)
    send_counts = visits.sum(1)  # (W,)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    recv_tok = all_to_all(x[token_of], send, recv, group)  # (R, D): one row per token that needs this rank
    recv_slots = all_to_all(slots, send, recv, group)  # (R, K) local expert ids, -1 for the other ranks' experts
    pair_row, pair_slot = (recv_slots >= 0).nonzero(as_tuple=True)  # (P,), (P,): the fan-out
    plan = SimpleNamespace(order=order, token_of=token_of, send_counts=send, recv_counts=recv, n_tokens=N,
                           pair_row=pair_row, pair_slot=pair_slot)
    return recv_tok[pair_row], recv_slots[pair_row, pair_slot], plan
    ### END SOLUTION


def ep_combine_dedup(y: torch.Tensor, plan, topk_weight: torch.Tensor, group=None) -> torch.Tensor:
    """Challenge 1: weight and sum each received token's expert outputs where they ran, send back one row per token
    and rank, sum per token. y: (P, D) in recv_x's order; returns (N, D) without the shared expert."""
    ### BEGIN SOLUTION
    w = all_to_all(topk_weight[plan.token_of], plan.send_counts, plan.recv_counts, group)  # (R, K) travel with the rows
    w_pair = w[plan.pair_row, plan.pair_slot].to(y.dtype)  # (P,)
    per_row = y.new_zeros(sum(plan.recv_counts), y.shape[-1]).index_add(0, plan.pair_row, y * w_pair[:, None])  # (R, D)
    back = all_to_all(per_row, plan.recv_counts, plan.send_counts, group)  # (S, D)
    return back.new_zeros(plan.n_tokens, back.shape[-1]).index_add(0, plan.token_of, back)
    ### END SOLUTION


# %% [code]
from course_lib.testing import assert_close, assert_true


def ep_with(dispatch, combine, moe_fn, x, probe, **kw) -> list | None:
    """One MoE layer over the two workers with the given dispatch and combine; None while one is a stub."""
    try:
        return cluster.run(cdist.ep_job, moe_fn, x, probe, dispatch=dispatch, combine=combine, timeout=20, **kw)
    except WorkerError as e:
        if "NotImplementedError" in e.exc_types:
            return None
        raise


torch.manual_seed(0)
dd_fn = functools.partial(cdist.make_moe, 0, **{**moe_kw, "n_activated_experts": 3})  # top-3 of 8 on 2 ranks
dd_ref = cdist.single_process_reference(dd_fn(), x_ep, probe_ep)
dd_plain = ep_with(ep_dispatch, ep_combine, dd_fn, x_ep, probe_ep)
dd_dedup = ep_with(ep_dispatch_dedup, ep_combine_dedup, dd_fn, x_ep, probe_ep)
if dd_dedup is None:
    print("(optional: write ep_dispatch_dedup and ep_combine_dedup above to compare the traffic)")
else:
    dd_err = cdist.compare_ep(dd_dedup, dd_ref)
    assert_true(max(dd_err.values()) < 1e-12, f"deduplicated EP vs one process: {dd_err}")
    traffic = [cdist.routing_traffic(r["topk_idx"], 8, 2, r["rank"]) for r in dd_dedup]
    crossed = sum(r["send_counts"][1 - r["rank"]] for r in dd_dedup)
    assert_true(crossed == sum(t["copies_remote"] for t in traffic),
                f"{crossed} rows crossed, copies_remote says {sum(t['copies_remote'] for t in traffic)}")
    print(f"deduplicated dispatch: outputs and gradients match one process to {max(dd_err.values()):.1e}")
    print(f"{len(x_ep)} tokens x 3 experts: {crossed} token rows crossed ranks (as many came back) = copies_remote "
          f"({sum(t['copies_remote'] for t in traffic)}); one row per pair would be rows_remote "
          f"({sum(t['rows_remote'] for t in traffic)})")
    if dd_plain is not None:
        plain_out, dedup_out = torch.cat([r["out"] for r in dd_plain]), torch.cat([r["out"] for r in dd_dedup])
        assert_close(dedup_out, plain_out, atol=1e-12, rtol=0, name="deduplicated vs plain dispatch")
        print(f"your ep_dispatch sent {sum(r['send_counts'][1 - r['rank']] for r in dd_plain)} rows across; "
              f"same outputs to {float((dedup_out - plain_out).abs().max()):.1e}")

# %% [markdown]
# ### Worked challenge 2: capacity in expert parallelism
# Give every expert $C$ slots for the whole batch, first come first served in token order (rank 0's tokens first,
# as if the shards were one batch), and drop the pairs beyond $C$ **before** they cross. A rank cannot see the
# other ranks' queues, so exchange each rank's per-expert counts first (`dist.all_gather`): the pairs of lower ranks
# come first in every queue. The plan then lists only the kept pairs, so 6.4's `ep_combine` works unchanged if it
# uses `plan.order` and `plan.token_of` rather than assuming $N K$ rows. The oracle is the single-process
# `dispatch_sorted(experts, x, weights, indices, capacity)`.

# %% [solution id=ex_06_c2_ep_capacity]
def ep_dispatch_capacity(x: torch.Tensor, topk_idx: torch.Tensor, n_experts: int, capacity: int, group=None):
    """Challenge 2: ep_dispatch keeping at most `capacity` pairs per expert over all ranks (first come first served
    in global token order); the plan's order and token_of list the kept pairs only."""
    ### BEGIN SOLUTION
    W, r = dist.get_world_size(group), dist.get_rank(group)
    N, K = topk_idx.shape
    per = n_experts // W
    flat = topk_idx.reshape(-1)  # (N*K,)
    order = torch.argsort(flat, stable=True)  # grouped by expert, token order inside
    counts = torch.bincount(flat, minlength=n_experts)  # (E,)
    every = [torch.empty_like(counts) for _ in range(W)]
    dist.all_gather(every, counts, group=group)
    ahead = torch.stack(every)[:r].sum(0)  # (E,) places in each queue taken by lower ranks' tokens
    expert = flat[order]
    place = ahead[expert] + torch.arange(N * K, device=x.device) - (counts.cumsum(0) - counts)[expert]  # (N*K,)
    order = order[place < capacity]  # kept pairs only
    token_of = order // K
    send_counts = torch.bincount(flat[order] // per, minlength=W)  # (W,)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    recv_x = all_to_all(x[token_of], send, recv, group)
    recv_expert = all_to_all(flat[order], send, recv, group) - r * per
    return recv_x, recv_expert, DispatchPlan(order, token_of, send, recv, N)
    ### END SOLUTION


# %% [code]
from course_lib.deepseek.moe import dispatch_sorted, expert_capacity

cap_bias = [0.3] * 4 + [0.0] * 4  # rank 0's experts are more popular: their queues overflow first
cap_rows = {}
for cf in (1.0, 1.5):
    C = expert_capacity(len(x_ep), moe_kw["n_activated_experts"], moe_kw["n_routed_experts"], cf)
    cap_fn = functools.partial(cdist.make_moe, 0, bias=cap_bias, **moe_kw)
    res = ep_with(functools.partial(ep_dispatch_capacity, capacity=C), ep_combine, cap_fn, x_ep, probe_ep, details=True)
    if res is None:
        print("(optional: finish 6.4 and write ep_dispatch_capacity above to compare it with dispatch_sorted)")
        break
    moe_1 = cap_fn()
    with torch.no_grad():
        w_1, idx_1, _ = moe_1.gate(x_ep)
        y_1, kept_1 = dispatch_sorted(moe_1.experts, x_ep, w_1, idx_1, C)
        y_1 = y_1 + moe_1.shared_experts(x_ep)
    kept_ep = torch.cat([torch.zeros(r["topk_idx"].numel(), dtype=torch.bool).index_fill_(0, r["order"], True)
                         .view_as(r["topk_idx"]) for r in res])
    assert_true(bool((kept_ep == kept_1).all()), f"cf {cf}: EP keeps other pairs than dispatch_sorted")
    assert_close(torch.cat([r["out"] for r in res]), y_1, atol=1e-12, rtol=0, name=f"EP with capacity {C} vs dispatch_sorted")
    cap_err = cdist.compare_ep(res, cdist.single_process_reference(cdist.make_moe(0, bias=cap_bias, capacity_factor=cf, **moe_kw),
                                                                   x_ep, probe_ep))
    assert_true(max(cap_err.values()) < 1e-12, f"cf {cf}: gradients differ from one process: {cap_err}")
    dropped = int((~kept_1).sum())
    assert_true(dropped == cdist.capacity_drop(idx_1, moe_kw["n_routed_experts"], cf)["dropped"], "drop count")
    cap_rows[cf] = sum(sum(r["send_counts"]) for r in res)
    print(f"cf {cf}: capacity {C} per expert, {dropped} of {idx_1.numel()} pairs dropped before the all-to-all, "
          f"{cap_rows[cf]} rows sent; kept pairs, outputs and gradients match dispatch_sorted ({max(cap_err.values()):.1e})")

# %% [markdown]
# ### Worked challenge 3: selective recomputation
# Recompute only the cheap parts: each RMSNorm, the query up-projection `wq_b` and the key/value up-projection
# (`MLA.expand`), each wrapped in its own non-reentrant `checkpoint`, and store everything else; then place it on the
# plane of 6.2.1 (step time against peak memory) next to "stored" and "recomputed", timed side by side. Expect a
# small saving: in eager PyTorch a checkpointed piece frees only its *inner* activations, because its output is still
# stored by the layer that consumes it (a `Linear` keeps its input for the weight gradient, attention keeps $q, k, v$),
# and each of the many small checkpoints adds Python overhead to the step. DeepSeek-V3's report says it recomputes all
# RMSNorms and MLA up-projections in the backward so that their outputs are not stored, "with a minor overhead": that
# takes an implementation whose consumers keep no copy of those outputs either, not module-level checkpoints.

# %% [solution id=ex_06_c3_selective_recompute]
def selective_recompute(model: nn.Module) -> int:
    """Challenge 3: make every RMSNorm, MLA.wq_b and MLA.expand in `model` recompute in the backward (non-reentrant
    checkpoint around each); everything else is stored. Returns the number of pieces wrapped."""
    ### BEGIN SOLUTION
    def recomputed(fn):
        @functools.wraps(fn)
        def run(*args):
            return checkpoint(fn, *args, use_reentrant=False)
        return run

    n = 0
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.forward = recomputed(m.forward)
            n += 1
        elif isinstance(m, MLA):
            m.wq_b.forward = recomputed(m.wq_b.forward)
            m.expand = recomputed(m.expand)
            n += 2
    return n
    ### END SOLUTION


# %% [code]
import copy

stack_sel = copy.deepcopy(stack)  # the same weights as 6.2.1's stack
stack_sel.ckpt = False
try:
    n_sel = selective_recompute(stack_sel)
except NotImplementedError:
    n_sel = None
    print("(optional: write selective_recompute above to place it on the memory/time plane)")
if n_sel is not None:
    def sel_step() -> None:
        stack_sel.zero_grad(set_to_none=True)
        stack_sel(x_ck).pow(2).mean().backward()

    sel_step()
    for g, p in zip(g_plain, stack_sel.parameters()):  # g_plain: 6.2.1's stored step, same weights and input
        assert_close(p.grad, g, atol=1e-6, rtol=1e-5, name="selective recomputation vs stored gradients")
    plane_mem = {"stored": mem[False], "recomputed": mem[True], "selective": peak_memory(sel_step)}  # bytes: deterministic
    t_sel = compare({"stored": lambda: train_step(False), "recomputed": lambda: train_step(True), "selective": sel_step},
                    warmup=1, repeats=3)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for (name, m), c in zip(plane_mem.items(), ("C0", "C1", "C2")):
        ax.scatter(ratio(t_sel[name], t_sel["stored"]), m / 2**20, s=60, color=c, label=name)
    ax.set_xlabel("step time (x stored)")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title(f"Memory vs time, {L_} blocks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()
    print(f"{n_sel} pieces recomputed, gradients as stored; peak memory stored {viz.bytes_label(plane_mem['stored'])}, "
          f"selective {viz.bytes_label(plane_mem['selective'])} ({100 * (1 - plane_mem['selective'] / plane_mem['stored']):.0f}% "
          f"saved), whole blocks {viz.bytes_label(plane_mem['recomputed'])}; step time x"
          f"{ratio(t_sel['selective'], t_sel['stored']):.2f} (whole blocks x{ratio(t_sel['recomputed'], t_sel['stored']):.2f})")

# %% [markdown]
# ## Quiz
# Set each answer to one letter, e.g. `ANSWER_Q1 = "a"`.
#
# **Q1.** In expert-parallel dispatch, why are the counts exchanged before the tokens?
# (a) gloo requires a barrier before every all-to-all; (b) each rank must know how many rows it will receive from
# every other rank to size its receive buffer and the output splits; (c) to check that routing is balanced;
# (d) the counts decide which experts are chosen.
#
# **Q2.** With ZeRO-1 data parallelism over $W$ GPUs, which model states are divided by $W$?
# (a) weights, gradients and optimiser states; (b) only the weights; (c) the FP32 master weights and the Adam moments;
# (d) only the gradients.
#
# **Q3.** Group-limited (node-limited) routing with 4 of 8 groups mainly reduces
# (a) the number of (token, expert) pairs; (b) the FLOPs of each expert; (c) the number of distinct nodes each token
# must be sent to, hence inter-node traffic when tokens are sent once per node; (d) the KV cache.
#
# **Q4.** Activation checkpointing of every block of a model trades
# (a) about one extra forward pass per step for storing only each block's input;
# (b) lower numerical precision for speed; (c) more memory for less time; (d) nothing: PyTorch recomputes for free.

# %% [solution id=quiz_06_answers]
### BEGIN SOLUTION
ANSWER_Q1 = "b"
ANSWER_Q2 = "c"
ANSWER_Q3 = "c"
ANSWER_Q4 = "a"
### END SOLUTION

# %% [test id=test_06_quiz points=4]
# Checks you can run now. When graded, the judge runs these and more (4 points): each answer is one letter; 1 point per correct answer.
for _n, _a in enumerate([ANSWER_Q1, ANSWER_Q2, ANSWER_Q3, ANSWER_Q4], 1):
    assert _a in ("a", "b", "c", "d"), f"ANSWER_Q{_n} must be one of 'a', 'b', 'c', 'd' (got {_a!r})"
print("quiz: answers well-formed")

# %% [given id=feedback_06_quiz]
#@quiz-feedback

# %% [markdown]
# ## Summary
# - A good test has an independent oracle, checks invariants, compares what the contract fixes (sets of experts,
#   not their order) and chooses inputs that make every rule matter. Graded here by a zoo of wrong routers.
# - Checkpointing cuts activation memory to one block's worth plus the block inputs, for about one extra forward
#   pass. Fusion pays for memory-bound work (attention, elementwise chains), not for lone matmuls. `torch.compile`
#   pays only when its compile time is amortised.
# - DeepSeek-V3: 671.0B parameters, 36.6B active (all but 248 routed experts per MoE layer and the embedding),
#   ~250 GFLOP per trained token; MLA caches 70,272 bytes per token (8.6 GiB per 128K request) vs 3.8 MiB for MHA.
# - Per-GPU model states $= P_{\text{GPU}}(b_w + b_g) + $ states; TP and PP split everything, EP splits the experts,
#   ZeRO-1 spreads master weights and moments over all GPUs. ~12 GiB per GPU in the 2048-GPU training layout.
# - Expert parallelism = route, count, all-to-all counts, all-to-all rows, local experts, all-to-all back, weighted
#   sum. The backward is the same exchange reversed. Replicated parameters need a DP all-reduce.
# - Node-limited routing bounds nodes per token (4 of 8), hence deduplicated inter-node traffic. Capacity limits
#   drop more tokens as experts multiply, which balanced routing avoids.
#
# ## Troubleshooting
# | symptom | likely cause | fix |
# |---|---|---|
# | `TimeoutError: ... did not finish on rank(s) [...]` | ranks disagree on a collective: mismatched split sizes, or one rank skipped an `all_to_all` | every rank must call the same collectives in the same order; `recv_counts` must come from the counts exchange |
# | `WorkerError: ... raised NotImplementedError` | a stub is still in place | write the function body |
# | `WorkerError: ... NameError` on a worker | the function uses a notebook name that could not be shipped (an open file, a lambda in a variable) | pass it as an argument or define it at the top level of a cell |
# | `TypeError: cannot ship ...: it is a closure` | a function defined inside another function was sent to the workers | move it to the top level of a cell |
# | `ValueError: all_to_all: ... recv_counts [...] disagree with what the ranks send` | recv_counts computed locally instead of exchanged | exchange the counts with one all-to-all before sending any rows |
# | `received expert ids 4..7 (all of them this rank's GLOBAL expert ids)` | global expert ids sent without subtracting `rank * E/W` | send local ids |
# | EP output right, router gradient wrong | `topk_weight` detached in combine | weight the rows with `topk_weight` itself: the router learns through it |
# | EP output wrong | combine weights not applied, or in (token, k) order while the rows are sorted by expert | put the combine weights in the same expert-sorted order as the rows before multiplying |
# | `ValueError: all_to_all: ... x has R rows but send_counts [...] add up to ...` in combine | combine used the dispatch splits instead of the reversed ones | the way back swaps the roles of the two count lists |
# | workers take > 30 s to start | the machine is busy (each worker imports torch) | wait, or close other kernels; start-up happens once per kernel |
# | `test_router` rejects a correct router | it compares indices position by position, or uses an exact float tolerance | sort each row by expert id first; compare weights with a tolerance |
#
# **Next:** the course ends here. To go further, run `torchrun --nproc-per-node 8 -m course_lib.distributed` on a GPU
# node (NCCL), then put `ExpertParallelMoE` into Section 5's model and train it with expert and data parallelism.

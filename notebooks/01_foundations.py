# %% [markdown]
# # Section 1 — Mathematical Foundations
#
# DeepSeek-V3 changes three things about a standard Transformer: how attention stores its past
# (Multi-head Latent Attention), how the feed-forward layer spends compute (DeepSeekMoE), and which
# numbers the matrix multiplications run in (FP8). Each change rests on one piece of mathematics.
# This section builds those four pieces from scratch so that Sections 2–6 are engineering, not magic.
#
# **Learning objectives** — after this section you can
# - implement scaled dot-product attention with masks and say what its KV cache costs in bytes;
# - factor a matrix with a truncated SVD, state why it is the best rank-$r$ approximation, and read an
#   energy spectrum to choose a rank;
# - route tokens to experts with softmax or sigmoid gating and measure the resulting load imbalance;
# - decode any FP8 bit pattern by hand and explain why FP8 needs scaling.
#
# **Time:** core path about 105 min; deep dives 20 min.
#
# **Prerequisites:** PyTorch tensors and autograd, matrix multiplication,
# softmax. **How to work:** fill in every cell marked `YOUR CODE HERE`, run the test cell under it, read
# the checkpoint line. Hidden tests run the same functions on other shapes, seeds and edge cases when
# your notebook is graded (`make check NB=...` runs them for you).

# %% [given]
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from course_lib.utils import setup, sizes
from course_lib import viz

ENV = setup(seed=0)
print(ENV)

# %% [markdown]
# ## 1.1 Attention mechanism evolution
#
# Attention lets every position read from every earlier position. For queries $Q\in\mathbb{R}^{T\times d}$,
# keys $K\in\mathbb{R}^{S\times d}$ and values $V\in\mathbb{R}^{S\times d_v}$:
#
# $$\mathrm{Attention}(Q,K,V) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d}} + M\right)V,$$
#
# where the mask $M$ holds $0$ where a query may look and $-\infty$ where it may not (a causal mask forbids
# looking at the future). The $1/\sqrt d$ keeps the logits' variance near 1 whatever the head size, so the
# softmax neither saturates nor flattens.
#
# **Intuition:** each query is a question, each key a label on a drawer, each value the drawer's contents.
# The softmax turns label matches into a probability over drawers, and the output is the expected contents.
#
# Multi-head attention runs $H$ of these in parallel on $d_h$-dimensional slices. During generation the
# keys and values of all past tokens are reused for every new token, so they are cached: the **KV cache**.

# %% [solution id=ex_01_1_sdpa]
def scaled_dot_product_attention(q, k, v, mask=None, is_causal=False):
    """Scaled dot-product attention, returning the output and the attention weights.

    Args:
        q: (..., T, d) queries.   k: (..., S, d) keys.   v: (..., S, d_v) values.
        mask: optional boolean tensor broadcastable to (..., T, S); True = may attend (torch's convention).
        is_causal: if True, query t may only attend to keys s <= t + (S - T) (the last T positions of S).
    Returns:
        out: (..., T, d_v) and weights: (..., T, S), each row of weights summing to 1.
    """
    ### BEGIN SOLUTION
    T, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (..., T, S)
    if is_causal:
        causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights
    ### END SOLUTION


# %% [test id=test_01_1_sdpa points=3]
# Checks you can run now. When graded, the judge runs these and more (3 points): output and weights against torch in float64 (several shapes), causal with S > T, boolean masks, the 1/sqrt(d) scale.
from course_lib.testing import assert_close, assert_shape

torch.manual_seed(0)
_q, _k, _v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 4)
_out, _w = scaled_dot_product_attention(_q, _k, _v)
assert_shape(_out, (2, 3, 5, 4), "output")
assert_shape(_w, (2, 3, 5, 5), "attention weights")
assert_close(_w.sum(-1), torch.ones(2, 3, 5), atol=1e-5, name="row sums of the weights",
             hint="the softmax must run over the key dimension (dim=-1)")
assert_close(_out, F.scaled_dot_product_attention(_q, _k, _v), atol=1e-5, name="output vs torch",
             hint="check the 1/sqrt(d) scale")
_out_c, _ = scaled_dot_product_attention(_q, _k, _v, is_causal=True)
assert_close(_out_c, F.scaled_dot_product_attention(_q, _k, _v, is_causal=True), atol=1e-5, name="causal output",
             hint="query t may only see keys 0..t: mask the upper triangle with -inf before the softmax")
print("scaled_dot_product_attention: visible tests passed")

# %% [markdown]
# **Checkpoint:** your attention matches `torch.nn.functional.scaled_dot_product_attention`, masks included.
#
# ### The price of remembering: the KV cache
# Generating token $t$ needs the keys and values of tokens $1..t-1$ in every layer. Caching them costs
#
# $$\text{bytes} = 2 \cdot L \cdot H_{kv} \cdot d_h \cdot T \cdot B \cdot \text{bytes per element}$$
#
# (the 2 is for K *and* V; $H_{kv}$ is the number of key/value heads, equal to $H$ in standard MHA and
# smaller in grouped-query attention). The cache grows linearly with context $T$ and batch $B$ — at long
# context it, not the weights, decides how many requests fit on a GPU.

# Writing that formula down is one line; knowing that a formula is right is the skill. So this exercise is a
# **contract**: implement `kv_cache_bytes`, then write `test_kv_cache_bytes(fn)`, a check that accepts *any*
# correct implementation (however it is written) and raises `AssertionError` for a wrong one. A good test picks
# arguments that make each factor matter: a test that only calls `fn(1, 1, 1, 1)` cannot tell a forgotten
# batch from a correct one. The judge runs your test on correct and wrong drafts it does not show you; the
# visible check below shows you one wrong draft.

# %% [given]
from course_lib.kv_drafts import make_kv_cache_bytes  # drafts built from switches, to try your test on

# %% [solution id=ex_01_1_kv_cache]
def kv_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch=1, bytes_per_elem=2):
    """Bytes needed to cache keys and values of standard (or grouped-query) attention.

    Args: number of layers, key/value heads per layer, head dimension, tokens cached per sequence,
    sequences in the batch, bytes per stored number (2 for bf16).
    Returns: an int.
    """
    ### BEGIN SOLUTION
    return 2 * n_layers * n_kv_heads * head_dim * seq_len * batch * bytes_per_elem
    ### END SOLUTION


def test_kv_cache_bytes(fn):
    """Check that ``fn`` keeps kv_cache_bytes' contract (the formula above, the defaults, an int result).

    Returns None for a correct ``fn``; raises AssertionError, with a message saying what is wrong, otherwise.
    """
    ### BEGIN SOLUTION
    for args in [(1, 1, 1, 1, 1, 1), (3, 5, 7, 11, 13, 4), (61, 128, 128, 4096, 2, 2)]:
        got, want = fn(*args), 2 * math.prod(args)
        assert isinstance(got, int), f"kv_cache_bytes{args} returned a {type(got).__name__}, not an int"
        assert got == want, f"kv_cache_bytes{args} = {got}, expected {want}"
    assert fn(3, 5, 7, 11) == 2 * 3 * 5 * 7 * 11 * 1 * 2, "the defaults are batch=1 and bytes_per_elem=2 (bf16)"
    ### END SOLUTION


# %% [test id=test_01_1_kv_cache points=2]
# Checks you can run now. When graded, the judge runs these and more (2 points): kv_cache_bytes: the factor 2 for K and V, every argument, the defaults (batch 1, bf16); test_kv_cache_bytes: passes correct drafts written differently, catches wrong ones (a factor left out, a default changed, bits for bytes, a float, an extra token, layers for heads).
assert kv_cache_bytes(1, 1, 1, 1, 1, 1) == 2, "one layer, one head of size 1, one token: a key and a value"
assert kv_cache_bytes(2, 4, 8, 10, 1, 2) == 2 * 2 * 4 * 8 * 10 * 2
assert test_kv_cache_bytes(kv_cache_bytes) is None  # your test passes your function
_draft = make_kv_cache_bytes(use_batch=False)  # a draft that forgets the batch
try:
    test_kv_cache_bytes(_draft)
except AssertionError as _e:
    print(f"your test caught a draft that forgets the batch: {_e}")
else:
    raise AssertionError("test_kv_cache_bytes passed a draft that ignores `batch`: call it with a batch other than 1")
print("kv_cache_bytes: visible tests passed")

# %% [markdown]
# **Checkpoint:** a DeepSeek-V3-sized MHA (61 layers, 128 heads of 128) would cache
# `kv_cache_bytes(61, 128, 128, 1)` bytes per token — about 4 MB. The figure below shows what that means at
# long context, and where grouped-query attention and MLA (Section 2: 576 numbers per token per layer) land.

# %% [code]
ctx = np.array([1_024, 4_096, 16_384, 65_536, 131_072])
variants = {"MHA (128 KV heads)": 128, "GQA (8 KV heads)": 8, "MQA (1 KV head)": 1}
fig, ax = plt.subplots()
try:
    for label, h in variants.items():
        ax.plot(ctx, [kv_cache_bytes(61, h, 128, int(t)) / 2**30 for t in ctx], marker="o", label=label)
    ax.plot(ctx, [61 * 576 * int(t) * 2 / 2**30 for t in ctx], marker="s", ls="--", label="MLA (576 per token-layer)")
except NotImplementedError:
    ax.text(0.5, 0.5, "implement kv_cache_bytes to see this plot", ha="center", transform=ax.transAxes)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("context length (tokens)")
ax.set_ylabel("KV cache per sequence (GiB, bf16)")
ax.set_title("KV-cache memory vs context, 61 layers, head dim 128")
ax.legend()
plt.show()

# %% [markdown]
# **Multi-head limits.** Sharing K/V across heads (MQA, GQA) shrinks the cache by $H/H_{kv}$ but makes heads
# read the same keys, which costs quality. MLA keeps per-head keys and values yet caches one small latent
# per token — the next subsection explains why that is possible.
#
# ## 1.2 Low-rank approximation
#
# Any matrix $W\in\mathbb{R}^{m\times n}$ factors as $W = U\Sigma V^\top$ with singular values
# $\sigma_1\ge\sigma_2\ge\dots\ge 0$. Keeping the top $r$ gives $W_r = U_r\Sigma_rV_r^\top$, and the
# **Eckart–Young theorem** says no rank-$r$ matrix is closer:
#
# $$\min_{\mathrm{rank}(X)\le r}\|W - X\|_F = \|W - W_r\|_F = \sqrt{\textstyle\sum_{i>r}\sigma_i^2}.$$
#
# Written as two matrices, $W_r = A\,B$ with $A = U_r\Sigma_r\in\mathbb{R}^{m\times r}$ (decompress) and
# $B = V_r^\top\in\mathbb{R}^{r\times n}$ (compress): $x\mapsto Bx$ squeezes $n$ numbers into $r$, and $A$
# expands them back. MLA learns such a pair directly: a down-projection to a small latent that is cached,
# and up-projections to keys and values.
#
# **Intuition:** the singular values are how much "signal" lives along each direction; dropping the small
# ones loses little. The fraction of energy kept, $\sum_{i\le r}\sigma_i^2/\sum_i\sigma_i^2$, says how much.

# %% [solution id=ex_01_2_low_rank]
def low_rank_factors(W, r):
    """Best rank-r approximation of W as two factors (Eckart–Young), via torch.linalg.svd.

    Args: W: (m, n) matrix; r: rank, 0 <= r <= min(m, n).
    Returns: (A, B) with A: (m, r) = U_r diag(S_r) and B: (r, n) = V_r^T, so that A @ B = W_r.
    """
    ### BEGIN SOLUTION
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] * S[:r], Vh[:r, :]
    ### END SOLUTION


def energy_kept(S, r):
    """Fraction of squared Frobenius norm kept by the top-r singular values S (sorted descending).

    Returns a Python float in [0, 1].
    """
    ### BEGIN SOLUTION
    S2 = S.double() ** 2
    return float(S2[:r].sum() / S2.sum())
    ### END SOLUTION


def effective_rank(W, energy=0.9):
    """Smallest r whose rank-r approximation keeps at least `energy` of W's squared Frobenius norm."""
    ### BEGIN SOLUTION
    S = torch.linalg.svdvals(W.double())
    cum = torch.cumsum(S**2, 0) / (S**2).sum()
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12)) + 1
    ### END SOLUTION


# %% [test id=test_01_2_low_rank points=3]
# Checks you can run now. When graded, the judge runs these and more (3 points): factor shapes, the Eckart–Young error for ranks 0 .. min(m, n), optimality, B's orthonormal rows, energy, effective rank.
from course_lib.testing import assert_close, assert_shape

torch.manual_seed(0)
_W = torch.randn(12, 9, dtype=torch.float64)
_A, _B = low_rank_factors(_W, 4)
assert_shape(_A, (12, 4), "A (decompress)")
assert_shape(_B, (4, 9), "B (compress)")
_S = torch.linalg.svdvals(_W)
assert abs(torch.linalg.norm(_W - _A @ _B) - _S[4:].norm()) < 1e-9, "the error should equal sqrt(sum of dropped sigma^2)"
assert abs(energy_kept(_S, 9) - 1.0) < 1e-12, "all singular values keep all the energy"
assert effective_rank(torch.eye(10, dtype=torch.float64), 0.9) == 9, "identity: every direction holds 10% of the energy"
print("low-rank: visible tests passed")

# %% [markdown]
# **Checkpoint:** your factors reach the Eckart–Young error exactly; no other rank-$r$ matrix does better.
#
# ### Information kept vs rank
# A random Gaussian matrix spreads its energy evenly: nothing to compress. A matrix with structure — a few
# strong directions plus noise — concentrates it. Learned projections look like the second kind.

# %% [code]
torch.manual_seed(0)
n = 64
W_random = torch.randn(n, n, dtype=torch.float64)
W_struct = torch.randn(n, 6, dtype=torch.float64) @ torch.randn(6, n, dtype=torch.float64) + 0.3 * torch.randn(n, n, dtype=torch.float64)
fig, ax = plt.subplots()
ranks = np.arange(0, n + 1)
try:
    for label, W in {"random Gaussian": W_random, "6 strong directions + noise": W_struct}.items():
        S = torch.linalg.svdvals(W)
        ax.plot(ranks, [energy_kept(S, int(r)) for r in ranks], label=f"{label} (effective rank {effective_rank(W, 0.9)})")
except NotImplementedError:
    ax.text(0.5, 0.5, "implement energy_kept / effective_rank to see this plot", ha="center", transform=ax.transAxes)
ax.axhline(0.9, color="k", ls=":", lw=1)
ax.set_xlabel("rank r kept")
ax.set_ylabel("fraction of squared Frobenius norm kept")
ax.set_title("Information kept vs rank (64 x 64 matrices)")
ax.legend()
plt.show()

# %% [markdown]
# ### Deep dive: interactive factorisation (about 1 min)
# Drag the rank: the image is a smooth pattern plus noise; its low-rank reconstructions recover the pattern
# long before they recover the noise. (In JupyterLab you get a slider; headless, one static figure.)

# %% [code]
yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48, dtype=torch.float64), torch.linspace(-1, 1, 48, dtype=torch.float64), indexing="ij")
torch.manual_seed(1)
picture = torch.sin(3 * xx) * torch.cos(2 * yy) + (xx**2 + yy**2 < 0.4).double() + 0.15 * torch.randn(48, 48, dtype=torch.float64)


def show_rank(rank=4):
    try:
        A, B = low_rank_factors(picture, rank)
    except NotImplementedError:
        print("implement low_rank_factors to use this demo")
        return
    approx = A @ B
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    for ax, img, title in zip(axes, (picture, approx, picture - approx), ("original", f"rank {rank}", "residual")):
        ax.imshow(img.numpy(), cmap="magma")
        ax.set_title(title)
        ax.set_xlabel("column")
        ax.set_ylabel("row")
    stored = rank * (48 + 48)
    fig.suptitle(f"rank {rank}: {stored} numbers stored instead of {48 * 48} ({48 * 48 / max(stored, 1):.1f}x smaller)")
    fig.tight_layout()
    plt.show()


viz.interactive(show_rank, rank=[4, 1, 2, 8, 16, 32, 48])

# %% [markdown]
# ### Why this motivates MLA
# In multi-head attention every cached key and value is a *linear* function of the same hidden vector
# $h_t\in\mathbb{R}^{d}$: $[k_t; v_t] = [W_K; W_V]\,h_t$, a $2Hd_h\times d$ matrix. Its rank is at most $d$,
# so caching $2Hd_h$ numbers per token is redundant whenever $2Hd_h > d$ — for DeepSeek-V3's sizes
# ($H=128$, $d_h=128$, $d=7168$) by a factor of 4.6 *before any learning*. MLA goes further: it trains the
# projections through a $d_c = 512$ latent, betting that the keys and values need far fewer directions than
# $d$. The cell below checks the bound on a small example and measures the effective rank of the cached keys
# and values when the inputs themselves live near a low-dimensional subspace, as real token representations do.

# %% [code]
torch.manual_seed(0)
d, H, dh, T = 64, 8, 32, 512
W_K = torch.randn(H * dh, d, dtype=torch.float64) / math.sqrt(d)
W_V = torch.randn(H * dh, d, dtype=torch.float64) / math.sqrt(d)
W_KV = torch.cat([W_K, W_V], 0)  # (2*H*dh, d)
print(f"[W_K; W_V] is {tuple(W_KV.shape)}; rank {int(torch.linalg.matrix_rank(W_KV))} <= d = {d}")
h = torch.randn(T, 10, dtype=torch.float64) @ torch.randn(10, d, dtype=torch.float64) + 0.05 * torch.randn(T, d, dtype=torch.float64)
kv = h @ W_KV.T  # (T, 2*H*dh): what a standard KV cache stores
try:
    print(f"cached numbers per token: {2 * H * dh}; effective rank (90% energy) of the cached K/V over {T} tokens: {effective_rank(kv, 0.9)}")
except NotImplementedError:
    print("implement effective_rank to see the measurement")

# %% [markdown]
# ## 1.3 Mixture-of-Experts principles
#
# An MoE layer replaces one big feed-forward network with $N$ smaller *experts* and a *router* that sends
# each token to $k\ll N$ of them. Parameters grow with $N$, compute only with $k$. The router scores token
# $u_t$ against a learned centroid $e_i$ per expert and keeps the top $k$:
#
# $$s_{i,t} = \begin{cases}\mathrm{softmax}_i(u_t^\top e_i) & \text{(Switch, DeepSeek-V2)}\\ \sigma(u_t^\top e_i) & \text{(DeepSeek-V3)}\end{cases}\qquad
# g_{i,t} = \begin{cases} s_{i,t} & \text{softmax gating: already a distribution}\\ s_{i,t}\,/\sum_{j\in\mathrm{TopK}} s_{j,t} & \text{sigmoid gating: renormalise over the chosen}\end{cases}$$
#
# for $i$ in the top-$k$ set, and 0 otherwise. Sigmoid scores are independent per expert (one expert's
# score does not push the others down), which suits very many experts; renormalising keeps the output scale
# fixed. Section 3 adds what V3 layers on top (bias-based balancing, group-limited routing, a route scale).
#
# ```
#   token u_t ──► router: scores s_{1..N} ──► top-k ──► weights g ──┐
#                                                                    ├─► Σ_i g_i · FFN_i(u_t)
#   experts FFN_1 … FFN_N (only the k chosen ones run) ─────────────┘
# ```

# %% [solution id=ex_01_3_gating]
def topk_gating(logits, k, mode="softmax"):
    """Top-k gating weights.

    Args:
        logits: (T, N) router logits u_t . e_i.
        k: experts per token.
        mode: "softmax" (softmax over all N, keep the top-k probabilities as they are) or
              "sigmoid" (sigmoid scores, keep the top-k, renormalise them to sum to 1).
    Returns:
        weights: (T, k) gating weights of the chosen experts, largest first.
        idx: (T, k) int64 indices of the chosen experts.
    """
    ### BEGIN SOLUTION
    if mode == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif mode == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"mode must be 'softmax' or 'sigmoid', got {mode!r}")
    weights, idx = scores.topk(k, dim=-1)
    if mode == "sigmoid":
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, idx
    ### END SOLUTION


def expert_load(idx, n_experts):
    """Tokens routed to each expert: (n_experts,) int64 counts from the (T, k) chosen indices."""
    ### BEGIN SOLUTION
    return torch.bincount(idx.reshape(-1), minlength=n_experts)
    ### END SOLUTION


def max_violation(load):
    """MaxVio imbalance: max_i load_i / mean(load) - 1 (0 for perfect balance), as a Python float."""
    ### BEGIN SOLUTION
    load = load.double()
    return float(load.max() / load.mean() - 1)
    ### END SOLUTION


# %% [test id=test_01_3_gating points=3]
# Checks you can run now. When graded, the judge runs these and more (3 points): chosen experts against sorting, softmax weights not renormalised, sigmoid weights renormalised, int64 indices, loads, MaxVio.
from course_lib.testing import assert_close, assert_shape

_logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
_w, _i = topk_gating(_logits, 2, "softmax")
assert_shape(_w, (1, 2), "weights")
assert _i.tolist() == [[0, 2]], f"expected experts [0, 2], got {_i.tolist()}"
assert_close(_w, torch.softmax(_logits, -1)[:, [0, 2]], atol=1e-6, name="softmax weights")
_w, _i = topk_gating(_logits, 2, "sigmoid")
assert_close(_w.sum(-1), torch.ones(1), atol=1e-6, name="sigmoid weights sum", hint="renormalise the chosen sigmoid scores")
assert expert_load(torch.tensor([[0, 2], [2, 3]]), 5).tolist() == [1, 0, 2, 1, 0]
assert abs(max_violation(torch.tensor([2, 2, 2, 2])) - 0.0) < 1e-12
print("gating: visible tests passed")

# %% [markdown]
# **Checkpoint:** softmax gating keeps the top-k probabilities; sigmoid gating renormalises the chosen scores.
#
# ### Expert load on synthetic data, and why imbalance hurts
# Tokens are drawn from a few clusters of unequal size, and the router's centroids start random. The
# dashboard shows who gets what. Imbalance hurts twice: a layer finishes only when its busiest expert does
# (so step time follows the **max** load, not the mean), and with fixed expert capacity the overflow tokens
# are dropped. Section 3 fixes it with DeepSeek-V3's auxiliary-loss-free bias.

# %% [code]
torch.manual_seed(0)
N_EXPERTS, K, DIM, TOKENS = 16, 2, 32, 2048
centers = torch.randn(4, DIM) * 2
cluster = torch.multinomial(torch.tensor([0.55, 0.25, 0.15, 0.05]), TOKENS, replacement=True)
tokens = centers[cluster] + 0.5 * torch.randn(TOKENS, DIM)
router = torch.randn(N_EXPERTS, DIM) / math.sqrt(DIM)
try:
    weights, idx = topk_gating(tokens @ router.T, K, "sigmoid")
    load = expert_load(idx, N_EXPERTS)
    dense = torch.zeros(TOKENS, N_EXPERTS).scatter(1, idx, weights)
    order = torch.argsort(cluster)
    fig = viz.create_expert_dashboard({"load": load, "assignments": dense[order][::32]},
                                      title=f"Random router on clustered tokens: MaxVio = {max_violation(load):.2f}")
    plt.show()
    capacity = int(1.25 * TOKENS * K / N_EXPERTS)
    dropped = int((load - capacity).clamp_min(0).sum())
    print(f"step time follows the busiest expert: {int(load.max())} tokens vs {load.float().mean():.0f} on average "
          f"({load.max() / load.float().mean():.1f}x slower than balanced)")
    print(f"with capacity factor 1.25 ({capacity} tokens per expert) {dropped} of {TOKENS * K} assignments would be dropped")
except NotImplementedError:
    print("implement topk_gating, expert_load and max_violation to see the dashboard")

# %% [markdown]
# ## 1.4 Mixed-precision arithmetic
#
# A binary floating-point number stores a sign bit $s$, $E$ exponent bits $e$ and $M$ mantissa bits $m$:
#
# $$x = (-1)^s \times \begin{cases} 2^{e-\text{bias}}\,(1 + m/2^M) & e \ne 0 \text{ (normal)}\\ 2^{1-\text{bias}}\,(m/2^M) & e = 0 \text{ (subnormal)}\end{cases}$$
#
# | format | bits (s/e/m) | bias | max | min normal | relative step $2^{-M}$ | specials |
# |---|---|---|---|---|---|---|
# | FP32 | 1/8/23 | 127 | 3.4e38 | 1.2e-38 | 1.2e-7 | inf, NaN |
# | BF16 | 1/8/7 | 127 | 3.4e38 | 1.2e-38 | 7.8e-3 | inf, NaN |
# | FP16 | 1/5/10 | 15 | 65504 | 6.1e-5 | 9.8e-4 | inf, NaN |
# | FP8 E5M2 | 1/5/2 | 15 | 57344 | $2^{-14}$ | 0.25 | inf ($e$=31, $m$=0), NaN ($e$=31, $m\ne0$) |
# | FP8 E4M3 (`e4m3fn`) | 1/4/3 | 7 | **448** | $2^{-6}$ | 0.125 | **no inf**; NaN only at $e$=15, $m$=7 |
#
# E4M3 gives up infinities so that exponent 15 can hold ordinary numbers: its largest value is
# $2^{15-7}\times 1.75 = 448$ (mantissa 110; 111 is NaN). DeepSeek-V3 uses E4M3 for every GEMM input.
#
# **Your task:** decode an 8-bit code by hand — no float8 dtype allowed inside your function.

# %% [solution id=ex_01_4_decode]
FP8_FORMATS = {"e4m3": (4, 3, 7), "e5m2": (5, 2, 15)}  # exponent bits, mantissa bits, bias


def decode_fp8(code, fmt="e4m3"):
    """Decode one FP8 bit pattern (an int in 0..255) to a Python float, bit by bit.

    Layout: [sign | exponent | mantissa], most significant bit first. "e4m3" is torch.float8_e4m3fn
    (no infinities, NaN only when all exponent and mantissa bits are 1); "e5m2" follows IEEE (exponent all
    ones: mantissa 0 is +-inf, otherwise NaN). Exponent 0 encodes subnormals.
    """
    ### BEGIN SOLUTION
    if not 0 <= code <= 255:
        raise ValueError(f"an FP8 code is an integer in 0..255, got {code}")
    E, M, bias = FP8_FORMATS[fmt]
    sign = -1.0 if code >> 7 else 1.0
    e = (code >> M) & ((1 << E) - 1)
    m = code & ((1 << M) - 1)
    e_max = (1 << E) - 1
    if fmt == "e4m3" and e == e_max and m == (1 << M) - 1:
        return float("nan")
    if fmt == "e5m2" and e == e_max:
        return sign * float("inf") if m == 0 else float("nan")
    if e == 0:
        return sign * 2.0 ** (1 - bias) * (m / 2**M)
    return sign * 2.0 ** (e - bias) * (1 + m / 2**M)
    ### END SOLUTION


def fp8_limits(fmt="e4m3"):
    """(max finite, min positive normal, min positive subnormal) of the format, from its bit layout."""
    ### BEGIN SOLUTION
    values = [decode_fp8(c, fmt) for c in range(128)]
    finite = [v for v in values if math.isfinite(v) and v > 0]
    E, M, bias = FP8_FORMATS[fmt]
    return max(finite), 2.0 ** (1 - bias), 2.0 ** (1 - bias - M)
    ### END SOLUTION


# %% [test id=test_01_4_decode points=3.5]
# Checks you can run now. When graded, the judge runs these and more (3.5 points): all 256 codes of E4M3 and E5M2 against torch's float8 dtypes, NaN/inf rules, subnormals, max / min normal / min subnormal.
assert decode_fp8(0b0_0111_000, "e4m3") == 1.0, "exponent 7 = bias, mantissa 0: 1.0"
assert decode_fp8(0b1_1000_100, "e4m3") == -3.0, "sign 1, 2^(8-7) x 1.5"
assert decode_fp8(0b0_0000_001, "e4m3") == 2.0**-9, "the smallest subnormal of E4M3 is 2^-9"
assert decode_fp8(0b0_01111_00, "e5m2") == 1.0
assert fp8_limits("e4m3")[0] == 448.0, "E4M3's largest finite value"
print("decode_fp8: visible tests passed")

# %% [markdown]
# **Checkpoint:** you decode all 256 codes of both formats exactly as PyTorch does.
#
# ### Deep dive: relative rounding error vs magnitude (about 1 min)
# Between consecutive powers of two a format has $2^M$ evenly spaced values, so the *relative* rounding error
# is flat (about $2^{-M-1}$) across the normal range — and explodes below the smallest normal, where
# subnormals keep only absolute precision, and above the max, where values saturate (or overflow).

# %% [code]
x = torch.logspace(-12, 17, 40_000, base=2, dtype=torch.float64)
bins = torch.arange(-12, 17.001, 0.25)  # quarter-octave bins
fig, ax = plt.subplots()
for name, dt in (("E4M3", torch.float8_e4m3fn), ("E5M2", torch.float8_e5m2), ("BF16", torch.bfloat16)):
    fmax = torch.finfo(dt).max
    xr = x.clamp(max=fmax).to(dt).to(torch.float64)  # clamp first: overflow behaviour differs between torch versions
    rel = (xr - x).abs() / x
    which = torch.bucketize(torch.log2(x), bins)
    worst = torch.zeros(len(bins) + 1, dtype=torch.float64).scatter_reduce(0, which, rel, "amax")
    ax.step(2.0 ** bins.numpy(), worst[1:].clamp(min=1e-6).numpy(), where="pre", label=name)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("|x| (log2 scale)")
ax.set_ylabel("worst relative error |fl(x) - x| / |x|")
ax.set_title("Relative rounding error vs magnitude (worst per quarter octave)")
ax.legend()
plt.show()

# %% [markdown]
# ### Why FP8 needs scaling
# Gradients and activations rarely sit where E4M3 is precise: a tensor with values around $10^{-4}$ falls
# below E4M3's subnormals and becomes zeros, and one outlier at $10^4$ saturates. DeepSeek-V3 stores a
# **scale** $s = \max|x|/448$ with the tensor, casts $x/s$ (whose largest magnitude is exactly 448, the top of the
# range) and gets the value back as $x_q \cdot s$: the scale is the *dequantisation* factor. Section 4 uses the
# same convention, one scale per $1\times128$ tile as DeepSeek-V3 does, so one outlier cannot ruin its neighbours.

# %% [code]
torch.manual_seed(0)
g = torch.randn(4096, dtype=torch.float64) * 1e-4  # gradient-sized values
for label, scale in (("no scaling", 1.0), ("scale = amax/448", float(g.abs().max()) / 448)):
    q = (g / scale).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float64) * scale  # quantise x/s, dequantise q*s
    zeros = float((q == 0).double().mean())
    rel = float((q - g).norm() / g.norm())
    print(f"{label:>20}: {100 * zeros:5.1f}% became zero, relative error {rel:.3f}")

# %% [markdown]
# ## Optional challenge (ungraded)
# 1. Extend `kv_cache_bytes` to MLA: what single number per token per layer replaces $2H_{kv}d_h$?
# 2. Write `encode_fp8(x, fmt)` with round-to-nearest-even and saturation, and check it against
#    `x.clamp(-max, max).to(torch.float8_e4m3fn)` on a million random values (Section 4 grades this).
# 3. Show that for $r$ below the rank, a *random* orthonormal $B$ with the optimal $A = WB^\top$ is always
#    worse than the SVD — then prove it with Eckart–Young.
#
# Each challenge has a cell below for your attempt (ungraded; the worked solutions show one way).

# %% [solution id=ex_01_challenge_1_mla_cache]
def mla_cache_bytes(n_layers, kv_lora_rank, qk_rope_head_dim, seq_len, batch=1, bytes_per_elem=2):
    """Challenge 1: bytes of an MLA cache, which keeps one latent c_KV and one shared RoPE key per token and layer."""
    ### BEGIN SOLUTION
    return n_layers * (kv_lora_rank + qk_rope_head_dim) * seq_len * batch * bytes_per_elem
    ### END SOLUTION


# %% [code]
try:
    _mha, _mla = kv_cache_bytes(61, 128, 128, 1), mla_cache_bytes(61, 512, 64, 1)
    print(f"per token: MHA {_mha / 2**20:.2f} MiB, MLA {_mla / 2**10:.1f} KiB ({_mha / _mla:.0f}x smaller); "
          "2 H_kv d_h = 32768 numbers become d_c + d_r = 576")
except NotImplementedError:
    print("(challenge 1: write mla_cache_bytes to compare)")

# %% [solution id=ex_01_challenge_2_encode]
def encode_fp8(x, fmt="e4m3"):
    """Challenge 2: the FP8 value nearest to the float ``x`` (ties to the even code), saturating at +-max."""
    ### BEGIN SOLUTION
    if math.isnan(x):
        return float("nan")
    table = [(v, c) for v, c in ((decode_fp8(c, fmt), c) for c in range(128)) if math.isfinite(v)]  # ascending
    a = min(abs(x), table[-1][0])  # saturate at the largest finite value
    value, _ = min(table, key=lambda vc: (abs(vc[0] - a), vc[1] % 2))  # nearest; a tie goes to the even code
    return math.copysign(value, x)
    ### END SOLUTION


# %% [code]
try:
    _g = torch.Generator().manual_seed(0)
    _x = (torch.randn(200, generator=_g, dtype=torch.float64) * 10 ** torch.empty(200).uniform_(-3, 3, generator=_g)).tolist()
    _grid = [v for v in (decode_fp8(c) for c in range(127)) if v >= 0]
    _x += [(a + b) / 2 for a, b in zip(_grid, _grid[1:])]  # every tie
    _want = torch.tensor(_x, dtype=torch.float64).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float64)
    _got = torch.tensor([encode_fp8(v) for v in _x], dtype=torch.float64)
    print(f"encode_fp8 agrees with torch's clamped cast on {int((_got == _want).sum())} of {len(_x)} values (every tie included)")
except NotImplementedError:
    print("(challenge 2: write encode_fp8 to compare it with torch)")

# %% [solution id=ex_01_challenge_3_random_basis]
def random_basis_error(W, r, seed=0):
    """Challenge 3: ||W - A B|| for a random orthonormal B (r, n) and its best A = W B^T, next to the SVD's error."""
    ### BEGIN SOLUTION
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(W.shape[1], r, generator=g, dtype=W.dtype))  # (n, r), orthonormal columns
    B = Q.T  # (r, n): orthonormal rows
    A = W @ B.T  # the least-squares A for this B (B B^T = I)
    return float(torch.linalg.norm(W - A @ B)), float(torch.linalg.svdvals(W)[r:].norm())
    ### END SOLUTION


# %% [code]
try:
    torch.manual_seed(0)
    _W = torch.randn(40, 30, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 30, dtype=torch.float64))
    for _r in (2, 8, 16):
        _rand, _svd = random_basis_error(_W, _r)
        print(f"rank {_r:>2}: random orthonormal B {_rand:.3f} >= SVD {_svd:.3f} (Eckart-Young: no rank-{_r} matrix does better)")
except NotImplementedError:
    print("(challenge 3: write random_basis_error to compare)")

# %% [markdown]
# ## Quiz
# Set each answer to one letter, e.g. `ANSWER_Q1 = "a"`, and run the cells below it: the last one tells you at once
# which answers are right and why (it holds only salted hashes of the key, so reading it gives nothing away);
# `check(2, "c")` checks a single answer. Your graded score comes from the judge, as for every exercise.
#
# **Q1.** The softmax scale $1/\sqrt{d}$ exists because … (a) it makes attention causal; (b) it keeps the
# variance of $q\cdot k$ near 1 so the softmax does not saturate; (c) it normalises the values; (d) it is
# needed for the KV cache.
#
# **Q2.** Going from MHA with 128 KV heads to GQA with 8 KV heads at the same head size shrinks the KV cache
# by … (a) 8x; (b) 16x; (c) 128x; (d) it does not change.
#
# **Q3.** By Eckart–Young, the Frobenius error of the best rank-$r$ approximation is … (a) $\sigma_{r+1}$;
# (b) $\sum_{i>r}\sigma_i$; (c) $\sqrt{\sum_{i>r}\sigma_i^2}$; (d) $\sigma_1 - \sigma_r$.
#
# **Q4.** With sigmoid gating (DeepSeek-V3), the chosen experts' weights are … (a) a softmax over all
# experts; (b) the raw sigmoid scores; (c) the chosen sigmoid scores divided by their sum; (d) uniform $1/k$.
#
# **Q5.** The largest finite `float8_e4m3fn` value is 448 rather than 240 because … (a) E4M3 has a bias of 15;
# (b) E4M3 drops infinities, so the all-ones exponent holds normal numbers (only mantissa 111 is NaN);
# (c) it uses subnormals; (d) it has 4 mantissa bits.

# %% [solution id=quiz_01_answers]
### BEGIN SOLUTION
ANSWER_Q1 = "b"
ANSWER_Q2 = "b"
ANSWER_Q3 = "c"
ANSWER_Q4 = "c"
ANSWER_Q5 = "b"
### END SOLUTION

# %% [test id=test_01_quiz points=3]
# Checks you can run now. When graded, the judge runs these and more (3 points): each answer is one letter; 0.5 points per correct answer, 0.5 for well-formed answers.
for _n, _a in enumerate([ANSWER_Q1, ANSWER_Q2, ANSWER_Q3, ANSWER_Q4, ANSWER_Q5], 1):
    assert _a in ("a", "b", "c", "d"), f"ANSWER_Q{_n} must be one of 'a', 'b', 'c', 'd' (got {_a!r})"
print("quiz: answers well-formed")

# %% [given id=feedback_01_quiz]
#@quiz-feedback

# %% [markdown]
# ## Summary
# - Attention is $\mathrm{softmax}(QK^\top/\sqrt d + M)V$; its KV cache costs $2LH_{kv}d_hTB$ elements and
#   dominates memory at long context.
# - The truncated SVD is the best low-rank approximation (Eckart–Young); two factors compress and decompress.
#   K and V are linear in one hidden vector, so caching them per head is redundant — MLA's starting point.
# - MoE routes each token to $k$ of $N$ experts; softmax vs sigmoid gating differ in normalisation; load
#   imbalance costs time (max load) and dropped tokens.
# - FP8 E4M3/E5M2 trade precision for range; decoding is sign × $2^{e-\text{bias}}$ × (1.m), subnormals at $e=0$;
#   without scaling small tensors underflow.
#
# ## Troubleshooting
# | symptom | likely cause | fix |
# |---|---|---|
# | `NotImplementedError: exercise not implemented yet` | a stub is still in place | replace the `raise` line in that function |
# | attention weights' rows don't sum to 1 | softmax over the wrong dimension | normalise over the keys, the last axis of the scores |
# | causal output differs only when `S > T` | mask aligned to the start, not the end | the T queries are the *last* T of the S positions: query $i$ sees keys up to $S - T + i$ |
# | low-rank error larger than the bound | kept the smallest singular values, or put $\Sigma$ in both factors | keep the $r$ largest singular values (SVD returns them in descending order) and put $\Sigma_r$ in one factor only |
# | `decode_fp8` wrong only for small codes | subnormals decoded with the implicit leading 1 | exponent 0: $2^{1-\text{bias}} \cdot m/2^M$ |
# | E4M3 codes 0x78–0x7E decode to inf/NaN | treated E4M3 like IEEE | `float8_e4m3fn` has no inf; only `S.1111.111` is NaN |
# | `ModuleNotFoundError: course_lib` | kernel not started from the course venv | `make lab`, or pick the "DeepSeek-V3 course" kernel |
#
# **Next:** Section 2 turns the low-rank idea into Multi-head Latent Attention, with a KV cache of 576
# numbers per token per layer instead of 32,768.

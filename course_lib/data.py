"""Synthetic data sets for the course's experiments.

Each block below is self-contained; append new data sets as new blocks (never rewrite existing ones).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# ===================================================================================================
# Multi-task digit language (Section 5): copy / reverse / sort / add, each marked by a task token
# ===================================================================================================
#
# A sequence is  <task> problem = answer <eos> <pad>...  over a vocabulary of digits and a few symbols:
#
#     <copy>  3 1 4 1 5 9 = 3 1 4 1 5 9 <eos>
#     <rev>   3 1 4 1 5 9 = 9 5 1 4 1 3 <eos>
#     <sort>  3 1 4 1 5 9 = 1 1 3 4 5 9 <eos>
#     <add>   3 1 4 + 1 5 9 = 4 6 3 0 <eos> <pad>      (least significant digit first: 413 + 951 = 1364)
#
# The four tasks need different computations on the same digits, and only the first token says which:
# a model that routes tokens by task can give each task its own experts, so routing matters. Loss and
# accuracy count only the answer tokens and the <eos> (the problem digits are random, unpredictable).

IGNORE_INDEX = -100
"""Target value of positions that carry no loss (``torch.nn.functional.cross_entropy``'s default)."""


@dataclass
class TaskBatch:
    """One batch of the multi-task language: ``inputs`` (B, T) tokens, ``targets`` (B, T) the next token at
    answer positions and ``IGNORE_INDEX`` elsewhere, ``task`` (B,) the task index of each sequence."""

    inputs: torch.Tensor
    targets: torch.Tensor
    task: torch.Tensor

    @property
    def answer_mask(self) -> torch.Tensor:
        """(B, T) True where the target is an answer token or the <eos>."""
        return self.targets != IGNORE_INDEX

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(self.inputs.to(device), self.targets.to(device), self.task.to(device))


class MultiTaskLanguage:
    """Copy / reverse / sort / add over ``n_digits`` digits in base ``base`` (add: two ``n_digits // 2``-digit
    numbers, least significant digit first, answer of ``n_digits // 2 + 1`` digits).

    Vocabulary: digits ``0 .. base-1``, then ``<copy> <rev> <sort> <add> + = <eos> <pad>``. Every sequence has
    ``seq_len = 2 n_digits + 3`` tokens (shorter problems are padded), so ``inputs``/``targets`` have
    ``block_size = seq_len - 1`` positions.
    """

    TASKS = ("copy", "reverse", "sort", "add")

    def __init__(self, n_digits: int = 6, base: int = 10, tasks: tuple[str, ...] = TASKS) -> None:
        if n_digits < 2:
            raise ValueError(f"n_digits must be at least 2 (add needs two numbers), got {n_digits}")
        if not 2 <= base <= 16:
            raise ValueError(f"base must be in [2, 16], got {base}")
        unknown = set(tasks) - set(self.TASKS)
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {self.TASKS}, got {tasks}")
        self.n_digits, self.base = n_digits, base
        self.tasks = tuple(tasks)
        self.add_digits = n_digits // 2
        self.task_token = {t: base + i for i, t in enumerate(self.TASKS)}
        self.plus, self.eq, self.eos, self.pad = base + 4, base + 5, base + 6, base + 7
        self.vocab_size = base + 8
        self.seq_len = 2 * n_digits + 3
        self._names = {**{d: "0123456789abcdef"[d] for d in range(base)}, self.plus: "+", self.eq: "=", self.eos: "$", self.pad: "_",
                       **{v: f"<{k[:4] if k != 'reverse' else 'rev'}>" for k, v in self.task_token.items()}}

    @property
    def block_size(self) -> int:
        """Positions of ``inputs`` and ``targets``: ``seq_len - 1``."""
        return self.seq_len - 1

    def answer(self, task: str, digits: list[int]) -> list[int]:
        """The answer digits of one problem (a plain-Python oracle, used by the tests)."""
        if task == "copy":
            return list(digits)
        if task == "reverse":
            return list(reversed(digits))
        if task == "sort":
            return sorted(digits)
        if task == "add":
            m = self.add_digits
            a = sum(d * self.base**j for j, d in enumerate(digits[:m]))
            b = sum(d * self.base**j for j, d in enumerate(digits[m : 2 * m]))
            s = a + b
            return [(s // self.base**j) % self.base for j in range(m + 1)]
        raise ValueError(f"unknown task {task!r}")

    def problem(self, task: str, digits: list[int]) -> list[int]:
        """The prompt of one problem, ``<task> ... =`` (what ``generate`` continues)."""
        if len(digits) != self.n_digits:
            raise ValueError(f"expected {self.n_digits} digits, got {len(digits)}")
        if task == "add":
            m = self.add_digits
            return [self.task_token[task], *digits[:m], self.plus, *digits[m : 2 * m], self.eq]
        return [self.task_token[task], *digits, self.eq]

    def sequence(self, task: str, digits: list[int]) -> list[int]:
        """The full padded sequence of one problem: prompt, answer, <eos>, padding (``seq_len`` tokens)."""
        seq = self.problem(task, digits) + self.answer(task, digits) + [self.eos]
        return seq + [self.pad] * (self.seq_len - len(seq))

    def prompt_length(self, task: str) -> int:
        """Tokens up to and including ``=``."""
        return len(self.problem(task, [0] * self.n_digits))

    def answer_length(self, task: str) -> int:
        """Answer digits (without the <eos>)."""
        return self.add_digits + 1 if task == "add" else self.n_digits

    def sample(self, batch: int, generator: torch.Generator | None = None, task: str | None = None) -> TaskBatch:
        """``batch`` random problems (tasks drawn uniformly from ``self.tasks``, or all ``task``)."""
        n, m, base = self.n_digits, self.add_digits, self.base
        digits = torch.randint(0, base, (batch, n), generator=generator)  # (B, n)
        if task is None:
            tid = torch.randint(0, len(self.tasks), (batch,), generator=generator)  # (B,)
            tid = torch.tensor([self.TASKS.index(t) for t in self.tasks])[tid]
        else:
            tid = torch.full((batch,), self.TASKS.index(task), dtype=torch.long)
        seq = torch.full((batch, self.seq_len), self.pad, dtype=torch.long)  # (B, L)
        start = torch.zeros(batch, dtype=torch.long)  # (B,) index of the first answer token
        length = torch.zeros(batch, dtype=torch.long)  # (B,) answer digits
        for k, name in enumerate(self.TASKS):
            rows = (tid == k).nonzero().flatten()
            if rows.numel() == 0:
                continue
            d = digits[rows]  # (b, n)
            col = functools.partial(_column, rows.numel())
            if name == "add":
                place = base ** torch.arange(m)  # (m,)
                total = (d[:, :m] * place).sum(1) + (d[:, m : 2 * m] * place).sum(1)  # (b,)
                ans = (total[:, None] // base ** torch.arange(m + 1)) % base  # (b, m + 1)
                body = torch.cat([col(self.task_token[name]), d[:, :m], col(self.plus), d[:, m : 2 * m], col(self.eq), ans,
                                  col(self.eos)], dim=1)  # (b, 3m + 5)
                start[rows], length[rows] = 2 * m + 3, m + 1
            else:
                ans = {"copy": d, "reverse": d.flip(1), "sort": d.sort(dim=1).values}[name]  # (b, n)
                body = torch.cat([col(self.task_token[name]), d, col(self.eq), ans, col(self.eos)], dim=1)  # (b, 2n + 3)
                start[rows], length[rows] = n + 2, n
            seq[rows, : body.shape[1]] = body
        pos = torch.arange(self.seq_len)[None, :]  # (1, L)
        in_answer = (pos >= start[:, None]) & (pos <= (start + length)[:, None])  # (B, L) answer digits and <eos>
        inputs = seq[:, :-1]  # (B, T)
        targets = seq[:, 1:].masked_fill(~in_answer[:, 1:], IGNORE_INDEX)  # (B, T): position t predicts token t + 1
        return TaskBatch(inputs.contiguous(), targets.contiguous(), tid)

    def decode(self, tokens: torch.Tensor | list[int]) -> str:
        """Human-readable text: digits, ``<copy> <rev> <sort> <add>``, ``+ =``, ``$`` for <eos>, ``_`` for <pad>."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return "".join(self._names.get(int(t), "?") for t in ids)

    def task_names(self, task: torch.Tensor) -> list[str]:
        return [self.TASKS[int(t)] for t in task]


def _column(rows: int, value: int) -> torch.Tensor:
    return torch.full((rows, 1), value, dtype=torch.long)


def answer_accuracy(logits: torch.Tensor, batch: TaskBatch) -> dict[str, float]:
    """Greedy accuracy on the answer positions: per token, and per sequence (every answer token right).

    ``logits``: (B, T, V) next-token logits for ``batch.inputs``.
    """
    pred = logits.argmax(-1)  # (B, T)
    mask = batch.answer_mask
    right = (pred == batch.targets) & mask
    token = float(right.sum() / mask.sum().clamp_min(1))
    seq = float(((right | ~mask).all(dim=1)).double().mean())
    return {"token_acc": token, "seq_acc": seq}


def per_task_accuracy(logits: torch.Tensor, batch: TaskBatch, tasks: tuple[str, ...] = MultiTaskLanguage.TASKS) -> dict[str, float]:
    """Per-sequence accuracy split by task (NaN for a task absent from the batch)."""
    pred = logits.argmax(-1)
    mask = batch.answer_mask
    ok = ((pred == batch.targets) | ~mask).all(dim=1)  # (B,)
    out = {}
    for name in tasks:
        rows = batch.task == MultiTaskLanguage.TASKS.index(name)
        out[name] = float(ok[rows].double().mean()) if rows.any() else float("nan")
    return out


# ===================================================================================================
# Clustered tokens with a skewed cluster mix (Section 3: MoE load balancing and expert specialisation)
# ===================================================================================================
#
# Every token sits near one of C cluster centres, and its regression target applies that cluster's own
# random map: y = tanh(A_c x). A router that sends each cluster to "its" experts lets every expert learn one
# map. Cluster frequencies follow a Zipf law, p_c ~ (c + 1)^-skew, so with skew > 0 a few clusters dominate:
# the skewed inputs that push an unbalanced router towards a few overloaded experts.


@dataclass
class ClusterRegression:
    """Tokens ``x = centre_c + noise * eps`` with targets ``y = tanh(A_c x)``; cluster ``c`` drawn with ``probs``.

    ``centers`` (C, dim) have norm sqrt(dim) (about 1 per coordinate); ``maps`` (C, dim, dim) have entries of
    variance 1/dim, so the pre-activations have about unit scale.
    """

    centers: torch.Tensor
    maps: torch.Tensor
    probs: torch.Tensor
    noise: float

    @property
    def n_clusters(self) -> int:
        return self.centers.shape[0]

    @property
    def dim(self) -> int:
        return self.centers.shape[1]

    def sample(self, batch: int, seq_len: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``batch`` sequences of ``seq_len`` i.i.d. tokens: x (B, T, dim), y (B, T, dim), cluster (B, T)."""
        n = batch * seq_len
        c = torch.multinomial(self.probs, n, replacement=True, generator=generator)  # (n,)
        x = self.centers[c] + self.noise * torch.randn(n, self.dim, generator=generator)  # (n, dim)
        y = torch.tanh(torch.einsum("nij,nj->ni", self.maps[c], x))  # (n, dim)
        return x.view(batch, seq_len, self.dim), y.view(batch, seq_len, self.dim), c.view(batch, seq_len)


def zipf_probs(n: int, skew: float) -> torch.Tensor:
    """``p_c = (c + 1)^-skew / Z`` for c = 0..n-1 (skew 0: uniform)."""
    p = (torch.arange(n, dtype=torch.float64) + 1.0) ** -skew
    return (p / p.sum()).to(torch.float32)


def make_cluster_regression(n_clusters: int = 8, dim: int = 32, *, skew: float = 1.5, noise: float = 0.5,
                            seed: int = 0) -> ClusterRegression:
    """A ``ClusterRegression`` task with random centres and maps drawn from ``seed``."""
    if n_clusters < 1 or dim < 1:
        raise ValueError(f"need n_clusters >= 1 and dim >= 1, got {n_clusters}, {dim}")
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g)
    centers = centers / centers.norm(dim=-1, keepdim=True) * dim**0.5  # (C, dim)
    maps = torch.randn(n_clusters, dim, dim, generator=g) / dim**0.5  # (C, dim, dim)
    return ClusterRegression(centers, maps, zipf_probs(n_clusters, skew), noise)

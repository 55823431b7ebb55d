"""The course's figures, one seaborn style, and a live training monitor.

Headless (nbgrader, scripts, CI) every function draws a static figure; in a Jupyter front end the
training monitor redraws in place. ``interactive`` shows ipywidgets sliders when a widget front end is
present and falls back to one static figure otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch

__all__ = [
    "set_style",
    "in_notebook_frontend",
    "visualize_attention_patterns",
    "create_expert_dashboard",
    "training_progress_monitor",
    "TrainingMonitor",
    "interactive",
    "bytes_label",
]

PALETTE = "colorblind"


def set_style() -> None:
    """One look for every figure in the course."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({"figure.dpi": 80, "savefig.dpi": 80, "figure.figsize": (7.0, 4.0), "axes.titleweight": "bold"})


def in_notebook_frontend() -> bool:
    """True inside a Jupyter kernel that a person is looking at (not nbgrader, not a script)."""
    if os.environ.get("NBGRADER_EXECUTION"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell" and not os.environ.get("COURSE_HEADLESS")


def bytes_label(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def visualize_attention_patterns(
    attention_weights: torch.Tensor | Mapping[str, torch.Tensor],
    sequence_length: int | None = None,
    *,
    heads: Sequence[int] = (0,),
    title: str = "Attention patterns",
    tokens: Sequence[str] | None = None,
):
    """Heatmaps of attention weights, one column per head and one row per model when several are given.

    ``attention_weights``: a (H, T, T) or (B, H, T, T) tensor (batch 0 is shown), or a mapping
    ``{"MHA": w1, "MLA": w2}`` to compare models side by side on the same color scale.
    ``sequence_length`` crops to the first T positions.
    """
    maps = dict(attention_weights) if isinstance(attention_weights, Mapping) else {"": attention_weights}
    rows = len(maps)
    fig, axes = plt.subplots(rows, len(heads), figsize=(3.2 * len(heads) + 1, 3.0 * rows), squeeze=False)
    for r, (label, w) in enumerate(maps.items()):
        w = _np(w)
        if w.ndim == 4:
            w = w[0]
        if w.ndim == 2:
            w = w[None]
        T = sequence_length or w.shape[-1]
        for c, h in enumerate(heads):
            ax = axes[r, c]
            sns.heatmap(w[h, :T, :T], ax=ax, cmap="viridis", vmin=0.0, vmax=float(w[:, :T, :T].max()), cbar=c == len(heads) - 1,
                        square=True, xticklabels=tokens or False, yticklabels=tokens or False)
            ax.set_title(f"{label} head {h}".strip())
            ax.set_xlabel("key position")
            ax.set_ylabel("query position")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def create_expert_dashboard(expert_stats: Mapping[str, object], *, title: str = "Expert utilisation"):
    """A 2x2 dashboard of routing statistics.

    ``expert_stats`` keys (each optional):
    - ``load``: (E,) tokens per expert for the latest step, or (steps, E) load over training;
    - ``assignments``: (T, E) routing weights or 0/1 hits of tokens to experts (token-by-expert heatmap);
    - ``maxvio``: (steps,) MaxVio imbalance over training;
    - ``bias``: (E,) or (steps, E) the balancing bias.
    """
    panels = [k for k in ("load", "assignments", "maxvio", "bias") if expert_stats.get(k) is not None]
    if not panels:
        raise ValueError("expert_stats needs at least one of 'load', 'assignments', 'maxvio', 'bias'")
    rows, cols = (1, len(panels)) if len(panels) <= 2 else (2, 2)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
    slots = dict(zip(panels, axes.flat))
    if "load" in slots:
        ax, load = slots["load"], _np(expert_stats["load"])
        if load.ndim == 2:
            sns.heatmap(load.T, ax=ax, cmap="mako", cbar_kws={"label": "tokens"})
            ax.set_xlabel("step")
            ax.set_ylabel("expert")
            ax.set_title("load per expert over steps")
        else:
            ax.bar(np.arange(load.size), load, color=sns.color_palette(PALETTE)[0])
            ax.axhline(load.mean(), color="k", ls="--", lw=1, label="mean (perfect balance)")
            ax.set_xlabel("expert")
            ax.set_ylabel("tokens routed")
            ax.set_title("load per expert")
            ax.legend()
    if "assignments" in slots:
        ax = slots["assignments"]
        sns.heatmap(_np(expert_stats["assignments"])[:64], ax=ax, cmap="rocket_r", cbar_kws={"label": "weight"})
        ax.set_xlabel("expert")
        ax.set_ylabel("token")
        ax.set_title("token-by-expert routing")
    if "maxvio" in slots:
        ax = slots["maxvio"]
        ax.plot(_np(expert_stats["maxvio"]))
        ax.set_xlabel("step")
        ax.set_ylabel("MaxVio = max load / mean load - 1")
        ax.set_title("imbalance over training")
    if "bias" in slots:
        ax, b = slots["bias"], _np(expert_stats["bias"])
        if b.ndim == 2:
            ax.plot(b)
            ax.set_xlabel("step")
        else:
            ax.bar(np.arange(b.size), b)
            ax.set_xlabel("expert")
        ax.set_ylabel("bias b_i")
        ax.set_title("balancing bias")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


class TrainingMonitor:
    """Collect training metrics and draw them; redraws live in a Jupyter front end.

    >>> mon = TrainingMonitor(["loss", "grad_norm"], every=10)
    >>> for step in range(100):
    ...     mon.update(step, loss=..., grad_norm=...)
    >>> fig = mon.finish()
    """

    def __init__(self, metrics: Sequence[str], *, every: int = 10, title: str = "Training progress") -> None:
        self.metrics = list(metrics)
        self.every = every
        self.title = title
        self.history: dict[str, list[float]] = {m: [] for m in self.metrics}
        self.steps: list[int] = []
        self._live = in_notebook_frontend()
        self._handle = None

    def update(self, step: int, **values: float) -> None:
        self.steps.append(step)
        for m in self.metrics:
            v = values.get(m, float("nan"))
            self.history[m].append(float(v.item() if isinstance(v, torch.Tensor) else v))
        if self._live and step % self.every == 0:
            self._redraw()

    def figure(self):
        n = len(self.metrics)
        fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False)
        for ax, m in zip(axes[0], self.metrics):
            ax.plot(self.steps, self.history[m])
            ax.set_xlabel("step")
            ax.set_ylabel(m)
            ax.set_title(m)
        fig.suptitle(self.title)
        fig.tight_layout()
        return fig

    def _redraw(self) -> None:
        from IPython.display import display

        fig = self.figure()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
        plt.close(fig)

    def finish(self):
        """The final static figure (also replaces the live one)."""
        fig = self.figure()
        if self._live and self._handle is not None:
            self._handle.update(fig)
            plt.close(fig)
        return fig


def training_progress_monitor(metrics: Mapping[str, Sequence[float]], *, title: str = "Training progress"):
    """Static figure of finished training curves: ``{"loss": [...], "grad_norm": [...]}``."""
    mon = TrainingMonitor(list(metrics), title=title)
    n = max(len(v) for v in metrics.values())
    mon.steps = list(range(n))
    mon.history = {k: [float(x) for x in v] for k, v in metrics.items()}
    mon._live = False
    return mon.figure()


def interactive(fn: Callable[..., object], **controls: Sequence[object]):
    """Sliders/dropdowns via ipywidgets when a widget front end is present, else one static call.

    ``controls`` maps each keyword of ``fn`` to its choices; the first choice is the static default.
    """
    defaults = {k: v[0] for k, v in controls.items()}
    if in_notebook_frontend():
        try:
            import ipywidgets as widgets

            widgets.interact(fn, **{k: list(v) for k, v in controls.items()})
            return None
        except ImportError:
            pass
    fn(**defaults)
    return None

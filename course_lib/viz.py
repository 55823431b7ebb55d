"""The course's figures, one seaborn style, and a live training monitor.

Headless (nbgrader, scripts, CI) every function draws a static figure; in a Jupyter front end the
training monitor redraws in place. ``interactive`` shows live ipywidgets controls (sliders over sorted numeric
choices) when a widget front end is present and falls back to one static figure otherwise. Figures carry alt
text (their titles and axis labels) in the output's metadata, which HTML exports (feedback pages) show.
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
    "figure_alt",
]

PALETTE = "colorblind"


def set_style() -> None:
    """One look for every figure in the course."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({"figure.dpi": 80, "savefig.dpi": 80, "figure.figsize": (7.0, 4.0), "axes.titleweight": "bold"})
    _no_grid_over_images()
    _alt_text_for_inline_figures()


def figure_alt(fig) -> str:
    """A text description of a figure from its titles and axis labels (the alt text of its image)."""
    parts = []
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_text():
        parts.append(sup.get_text())
    for ax in fig.get_axes():
        bits = [t for t in (ax.get_title(), ax.get_xlabel() and f"x: {ax.get_xlabel()}", ax.get_ylabel() and f"y: {ax.get_ylabel()}") if t]
        if bits:
            parts.append(", ".join(bits))
    return "Figure: " + "; ".join(parts) if parts else "Figure"


def _alt_text_for_inline_figures() -> None:
    """The inline backend's image outputs get ``metadata["image/png"]["alt"]`` (nbconvert writes it as alt=...)."""
    try:
        from matplotlib_inline import backend_inline
    except ImportError:
        return
    fetch = backend_inline._fetch_figure_metadata
    if getattr(fetch, "_course_alt", False):
        return

    def fetch_with_alt(fig):
        md = fetch(fig) or {}
        try:
            md = {**md, "image/png": {**md.get("image/png", {}), "alt": figure_alt(fig)}}
        except Exception:  # a description must never cost the figure
            pass
        return md

    fetch_with_alt._course_alt = True
    backend_inline._fetch_figure_metadata = fetch_with_alt


def _no_grid_over_images() -> None:
    """The whitegrid style draws grid lines over imshow/matshow images: turn the grid off on axes that show one."""
    from matplotlib.axes import Axes

    if getattr(Axes.imshow, "_course_no_grid", False):
        return
    imshow = Axes.imshow

    def imshow_without_grid(self, *args, **kwargs):
        self.grid(False)
        return imshow(self, *args, **kwargs)

    imshow_without_grid._course_no_grid = True
    imshow_without_grid.__doc__ = imshow.__doc__
    Axes.imshow = imshow_without_grid


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


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _control(widgets, name: str, choices: Sequence[object]):
    """A slider over sorted numeric choices, a checkbox for booleans, else a dropdown (numbers sorted, then words);
    full-width labels."""
    style = {"description_width": "initial"}
    layout = widgets.Layout(width="min(520px, 95%)")
    first = choices[0]
    if all(_is_number(v) for v in choices):
        options = sorted(set(choices))
        return widgets.SelectionSlider(options=options, value=first, description=name, continuous_update=False,
                                       style=style, layout=layout)
    if all(isinstance(v, bool) for v in choices):
        return widgets.Checkbox(value=bool(first), description=name, style=style, indent=False)
    # mixed choices (a size or "tensor"): the numbers in order, then the words as given
    numbers = sorted({v for v in choices if _is_number(v)})
    words = [v for v in dict.fromkeys(choices) if not _is_number(v)]
    return widgets.Dropdown(options=[(str(v), v) for v in numbers + words], value=first, description=name,
                            style=style, layout=layout)


def _guarded(fn: Callable[..., object]) -> Callable[..., object]:
    """Run ``fn``; a stub it needs (an unfinished exercise) shows the run model's one-line placeholder."""

    def run(**kwargs):
        try:
            return fn(**kwargs)
        except (NotImplementedError, NameError) as e:
            from course_lib import runmodel

            if not runmodel.show_placeholder(e):
                raise
            plt.close("all")
            return None

    return run


def interactive(fn: Callable[..., object], **controls: Sequence[object]):
    """Live controls (ipywidgets) when a widget front end is present, else one static call with the first choices.

    ``controls`` maps each keyword of ``fn`` to its choices; the first choice is the default. Numeric choices
    become a slider over their sorted values, booleans a checkbox, anything else a dropdown. ``fn`` draws one
    figure (``plt.show()``); every change of a control redraws it in place.
    """
    defaults = {k: v[0] for k, v in controls.items()}
    if in_notebook_frontend():
        try:
            import ipywidgets as widgets
            from IPython.display import display
        except ImportError:
            widgets = None
        if widgets is not None:
            ws = {k: _control(widgets, k, list(v)) for k, v in controls.items()}
            out = widgets.interactive_output(_guarded(fn), ws)
            box = widgets.VBox([*ws.values(), out])
            box.add_class("course-interactive")
            display(box)
            return box
    fn(**defaults)
    return None

"""Section 5's given training and analysis code: the training loop, evaluation, expert-specialisation
measures and the recorded comparison runs. It drives whatever model and training step it is handed (the
learner's in the notebook, the course's reference in ``tools/train_checkpoints.py``) and holds no answer.

- ``train(model, data, step_fn=...)``: AdamW with linear warm-up on fresh batches of a ``MultiTaskLanguage``,
  periodic held-out evaluation, a live monitor; ``step_fn(model, optimizer, inputs, targets)`` is one training
  step returning a ``StepStats`` or a dict with its fields.
- ``evaluate``: main loss and greedy answer accuracy on a fixed held-out batch.
- ``routing_by_task`` / ``mutual_information``: which experts each task uses, and I(task; expert) in bits.
- ``RECIPE``, ``RUNS``, ``record_run``, ``load_recorded_runs``: the notebook's training recipe and the recorded
  comparison runs (``make checkpoints``); ``record_run`` trains the model class and step it is given.

``course_lib.deepseek.model`` re-exports all of it, with ``train`` and ``record_run`` defaulting to the reference
model and training step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from course_lib.deepseek.model_config import ModelConfig, StepStats, convert_to_fp8, init_weights, masked_cross_entropy
from course_lib.deepseek.moe import max_violation

__all__ = ["TrainResult", "train", "evaluate", "routing_by_task", "mutual_information", "checkpoint_dir", "RECIPE", "RUNS",
           "build_run_model", "record_run", "load_recorded_runs"]


@torch.no_grad()
def evaluate(model: nn.Module, data, batch: int = 512, seed: int = 1234) -> dict[str, float]:
    """Main loss and greedy answer accuracy (token, sequence, per task) on a fixed held-out batch."""
    from course_lib.data import answer_accuracy, per_task_accuracy

    was = model.training
    model.eval()
    b = data.sample(batch, torch.Generator().manual_seed(seed))
    logits = model(b.inputs)
    out = {"loss": float(masked_cross_entropy(logits, b.targets)), **answer_accuracy(logits, b)}
    out.update({f"acc_{k}": v for k, v in per_task_accuracy(logits, b).items()})
    model.train(was)
    return out


@dataclass
class TrainResult:
    """History of a ``train`` run: per-step metrics, periodic evaluations, and when the target was reached."""

    config: dict
    history: dict[str, list[float]]
    evals: list[dict[str, float]]
    steps_to_target: int | None
    seconds: float
    tokens_per_s: float


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    from course_lib.deepseek.moe import MoE

    return model.moe_layers() if hasattr(model, "moe_layers") else [m for m in model.modules() if isinstance(m, MoE)]


def train(model: nn.Module, data, *, step_fn: Callable, steps: int = 300, batch_size: int = 64, lr: float = 3e-3,
          weight_decay: float = 0.0, warmup: int = 20, seed: int = 0, balance: bool = True, eval_every: int = 25,
          target: float | None = None, target_metric: str = "token_acc", stop_at_target: bool = False, monitor=None,
          eval_batch: int = 512) -> TrainResult:
    """Train on fresh batches of ``data`` (a ``MultiTaskLanguage``) with AdamW, linear warm-up then constant lr.

    ``step_fn(model, optimizer, inputs, targets)`` runs one step (the learner's ``train_step``); it returns a
    ``StepStats`` or a dict with its fields. ``balance=False`` switches the auxiliary-loss-free bias update off
    for the run (every MoE layer's ``bias_update_speed`` is 0 meanwhile). Evaluates every ``eval_every`` steps;
    ``steps_to_target`` is the first evaluated step whose ``target_metric`` reaches ``target``. ``monitor`` (a
    ``course_lib.viz.TrainingMonitor``) gets loss, gradient norm, MaxVio and tokens/s every step.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    keys = ("loss", "main_loss", "mtp_loss", "aux_loss", "grad_norm", "max_vio", "tokens_per_s")
    hist: dict[str, list[float]] = {k: [] for k in keys}
    hist["load"] = []
    evals: list[dict[str, float]] = []
    reached = None
    frozen = [] if balance else [(moe.cfg, moe.cfg.bias_update_speed) for moe in _moe_layers(model)]
    for moe_cfg, _ in frozen:
        moe_cfg.bias_update_speed = 0.0
    t_start = time.perf_counter()
    n_tokens = 0
    try:
        for step in range(1, steps + 1):
            b = data.sample(batch_size, gen)
            t0 = time.perf_counter()
            st = step_fn(model, opt, b.inputs, b.targets)
            if isinstance(st, dict):  # a learner's train_step returns a dict with StepStats' fields
                st = StepStats(**{k: st[k] for k in StepStats.__dataclass_fields__})
            sched.step()
            dt = time.perf_counter() - t0
            n_tokens += b.inputs.numel()
            vals = {"loss": st.loss, "main_loss": st.main_loss, "mtp_loss": st.mtp_loss, "aux_loss": st.aux_loss,
                    "grad_norm": st.grad_norm, "max_vio": max(st.max_vio) if st.max_vio else 0.0,
                    "tokens_per_s": b.inputs.numel() / dt}
            for k in keys:
                hist[k].append(vals[k])
            hist["load"].append([ld.tolist() for ld in st.loads])
            if step % eval_every == 0 or step == steps:
                ev = {"step": step, **evaluate(model, data, batch=eval_batch)}
                evals.append(ev)
                if target is not None and reached is None and ev[target_metric] >= target:
                    reached = step
            if monitor is not None:
                monitor.update(step, **{k: vals[k] for k in monitor.metrics if k in vals})
            if stop_at_target and reached is not None:
                break
    finally:
        for moe_cfg, gamma in frozen:
            moe_cfg.bias_update_speed = gamma
    seconds = time.perf_counter() - t_start
    return TrainResult(asdict(model.cfg), hist, evals, reached, seconds, n_tokens / seconds)


@torch.no_grad()
def routing_by_task(model: nn.Module, data, per_task: int = 128, seed: int = 4321) -> torch.Tensor:
    """Expert specialisation: (n_moe_layers, n_tasks, n_experts) share of each task's answer-region
    assignments that go to each expert (rows sum to 1), measured on fresh problems (main blocks only)."""
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for task in data.TASKS:
        b = data.sample(per_task, gen, task=task)
        _, infos = model.trunk(b.inputs)
        mask = b.answer_mask.reshape(-1)  # (B*T,)
        per_layer = []
        for info in infos:
            idx = info.indices[mask]  # (n, K)
            counts = torch.bincount(idx.reshape(-1), minlength=model.cfg.n_routed_experts).double()
            per_layer.append(counts / counts.sum())
        rows.append(torch.stack(per_layer))  # (n_layers, E)
    model.train(was)
    return torch.stack(rows, dim=1)  # (n_layers, n_tasks, E)


def mutual_information(share: torch.Tensor | Sequence) -> float:
    """I(task; expert) in bits from a (tasks, experts) matrix whose rows are routing shares (tasks equally likely).

    0 when every task routes alike; ``log2(n_tasks)`` when the tasks use disjoint experts.
    """
    p = torch.as_tensor(share, dtype=torch.float64)
    joint = p / p.sum()  # (tasks, experts)
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * torch.log2(joint[nz] / outer[nz])).sum())


def checkpoint_dir() -> Path:
    """The course's recorded runs (``make checkpoints`` writes them): ``course_lib/checkpoints``.

    They live inside the package because a grading kernel sees only the installed ``course_lib``
    (``course_judge.sandbox``), not the rest of the repository.
    """
    return Path(__file__).resolve().parents[1] / "checkpoints"


# ---------------------------------------------------------------------------------------------------
# The recorded experiments of Section 5 (tools/train_checkpoints.py, ``make checkpoints``)
# ---------------------------------------------------------------------------------------------------

#: The notebook's training recipe: data, initialisation and optimiser settings shared by every run.
RECIPE = {"n_digits": 4, "batch_size": 64, "lr": 5e-3, "warmup": 20, "init_std": 0.05, "eval_every": 25}

#: Config overrides (and the ``balance`` switch) of each recorded run.
RUNS: dict[str, dict] = {
    "baseline": {},
    "no_balance": {"seq_aux_alpha": 0.0, "balance": False},
    "no_mtp": {"mtp_depth": 0},
    "fp8": {"fp8": True},
}


def build_run_model(model_cls: Callable[[ModelConfig], nn.Module], seed: int = 0, *, fp8_linear: type[nn.Module] | None = None,
                    **overrides) -> tuple[nn.Module, object]:
    """``model_cls(cfg)`` with ``RECIPE``'s initialisation, and the recipe's data (``overrides`` change ``ModelConfig``
    fields). With ``fp8=True`` the blocks' linear layers run on FP8 GEMMs, whether or not ``model_cls`` converts them;
    ``fp8_linear`` is the FP8 layer class for that conversion (the course's ``FP8Linear`` by default)."""
    from course_lib.data import MultiTaskLanguage

    data = MultiTaskLanguage(n_digits=RECIPE["n_digits"])
    cfg = ModelConfig(vocab_size=data.vocab_size, **overrides)
    model = model_cls(cfg)
    if cfg.fp8 and not any(type(m).__name__ == "FP8Linear" for m in model.modules()):
        convert_to_fp8(model.layers, linear_cls=fp8_linear)
        convert_to_fp8(model.mtp, linear_cls=fp8_linear)
    return init_weights(model, seed, std=RECIPE["init_std"]), data


def record_run(name: str, steps: int = 600, seed: int = 0, load_every: int = 5, *,
               model_cls: Callable[[ModelConfig], nn.Module], step_fn: Callable,
               fp8_linear: type[nn.Module] | None = None) -> dict:
    """Train the ``RUNS[name]`` variant of ``model_cls`` with ``step_fn`` for ``steps``; return what the notebook
    plots (JSON-ready). ``fp8_linear``: the FP8 layer class of the ``fp8`` run (the course's by default)."""
    over = dict(RUNS[name])
    balance = over.pop("balance", True)
    model, data = build_run_model(model_cls, seed, fp8_linear=fp8_linear, **over)
    res = train(model, data, step_fn=step_fn, steps=steps, batch_size=RECIPE["batch_size"], lr=RECIPE["lr"],
                warmup=RECIPE["warmup"], seed=seed, balance=balance, eval_every=RECIPE["eval_every"])
    loads = res.history["load"]  # (steps, n_moe, E)
    r4 = lambda xs: [round(float(x), 4) for x in xs]
    return {
        "name": name, "seed": seed, "steps": steps, "config": res.config, "balance": balance, "seconds": round(res.seconds, 1),
        "loss": r4(res.history["loss"]), "main_loss": r4(res.history["main_loss"]), "mtp_loss": r4(res.history["mtp_loss"]),
        "max_vio": r4(res.history["max_vio"]),
        "max_vio_per_layer": [r4(max_violation(torch.tensor(layer)) for layer in step) for step in loads],
        "load_steps": list(range(1, steps + 1, load_every)),
        "loads": [[[int(v) for v in layer] for layer in loads[s - 1]] for s in range(1, steps + 1, load_every)],
        "evals": [{k: round(float(v), 4) for k, v in e.items()} for e in res.evals],
        "routing_by_task": [[r4(row) for row in layer] for layer in routing_by_task(model, data).tolist()],
        "gate_bias": [r4(moe.gate.bias.tolist()) for moe in model.moe_layers()],
    }


def load_recorded_runs(path: Path | str | None = None) -> dict | None:
    """The recorded runs (``checkpoints/05_integration_runs.json``), or None when the file is missing."""
    import json

    path = Path(path) if path else checkpoint_dir() / "05_integration_runs.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())

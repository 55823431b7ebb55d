"""Record the training runs that Section 5's comparison figures show (``make checkpoints``).

    python tools/train_checkpoints.py [--out course_lib/checkpoints] [--steps 600] [--seeds 0 1 2] [--jobs 2] [--quick]

Every run trains ``course_lib.deepseek.model.DeepSeekV3Mini`` on ``course_lib.data.MultiTaskLanguage``
with the notebook's recipe (``RECIPE`` in ``course_lib.deepseek.model``) and one change:

- ``baseline``    auxiliary-loss-free balancing + sequence-wise balance loss, MTP depth 1, FP32 GEMMs
- ``no_balance``  no bias update, no balance loss (routing collapse)
- ``no_mtp``      MTP depth 0
- ``fp8``         every linear layer of the blocks on emulated FP8 GEMMs (E4M3, 1x128 / 128x128 scaling)

``baseline`` and ``no_mtp`` run for every seed (the MTP difference is small, so its noise is shown).
The output, ``course_lib/checkpoints/05_integration_runs.json`` (about 280 KB; inside the package because a
grading kernel sees only ``course_lib``), holds per-step losses and MaxVio, the loads
of every MoE layer, periodic held-out evaluations, each run's final expert-by-task routing and gate
biases. The notebook loads it, or retrains with ``RETRAIN = True`` through the same ``record_run``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from course_lib.bench import threads  # noqa: E402
from course_lib.deepseek.model import RUNS, record_run  # noqa: E402


def _one(name_seed: tuple[str, int], steps: int) -> dict:
    name, seed = name_seed
    with threads(1):
        t0 = time.perf_counter()
        rec = record_run(name, steps=steps, seed=seed)
    last = rec["evals"][-1]
    print(f"{name:10s} seed {seed}: {steps} steps in {time.perf_counter() - t0:5.1f} s, loss {last['loss']:.3f}, "
          f"token acc {last['token_acc']:.3f}, final MaxVio {rec['max_vio'][-1]:.2f}", flush=True)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default course_lib/checkpoints; --quick: a temp folder)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--quick", action="store_true", help="30 steps, one seed, to a temp folder (a smoke test of this script)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained in parallel (one thread each)")
    ns = ap.parse_args(argv)
    steps, seeds = (30, [0]) if ns.quick else (ns.steps, ns.seeds)
    if ns.out is None:
        ns.out = Path(tempfile.mkdtemp(prefix="checkpoints-")) if ns.quick else ROOT / "course_lib" / "checkpoints"
    ns.out.mkdir(parents=True, exist_ok=True)
    todo = [(name, seed) for name in ns.runs for seed in (seeds if name in ("baseline", "no_mtp") else seeds[:1])]
    t_all = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, ns.jobs)) as pool:
        results = list(pool.map(_one, todo, [steps] * len(todo)))
    records = {f"{name}/seed{seed}": rec for (name, seed), rec in zip(todo, results)}
    out = {"meta": {"steps": steps, "seeds": seeds, "torch": torch.__version__, "seconds": round(time.perf_counter() - t_all, 1)},
           "runs": records}
    path = ns.out / "05_integration_runs.json"
    path.write_text(json.dumps(out, separators=(",", ":")))
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

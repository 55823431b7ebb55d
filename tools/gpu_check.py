"""Every CUDA check and timing of the course in one run (`make gpu-check`), under a global time budget.

    python tools/gpu_check.py [--out gpu_check.json] [--budget 480] [--reps 20] [--no-pytest]

1. environment: torch/CUDA versions, GPU, compute capability;
2. FP8 ``torch._scaled_mm`` recipes (tensor-wise, row-wise, DeepSeek block-wise 1x128 x 128x128 and the
   Wgrad 1x128 x 1x128 layout) against the plain-torch emulation of ``course_lib.deepseek.fp8``;
3. ``FP8Linear`` forward and backward on CUDA against its emulated backend;
4. TFLOP/s of BF16 ``torch.mm`` vs FP8 tensor-wise, row-wise and block-wise ``_scaled_mm`` at several
   sizes up to 8192^3 (CUDA events, candidates interleaved, median of ``--reps`` after warm-up), and the
   course path's speed-up over BF16 (target >= 1.45x at 8192^3);
5. the end-to-end rows of ``tools/gpu_e2e.py``: the fused quantisers' bit differences from the emulation,
   FP8Linear forward + backward with all quantisation vs BF16 (target >= 1.3x at 8192^3), a width-2048
   DeepSeekV3Mini training step FP8 vs BF16 (loss within 0.5%), MoE dispatch at E=256 (target >= 3x the
   per-expert loop) and MLA absorbed vs naive decode at 4k-32k context;
6. smoke tests of ``course_lib.deepseek.mla`` / ``moe`` / ``model`` on CUDA (each only if it imports);
7. the CUDA/GPU unit tests of the suite (``pytest -k "cuda or gpu"``) if pytest is installed.

Every check runs in its own try/except, results are written to ``--out`` after each check (a crash or the
hard time limit still leaves a JSON), and a check that would not fit the remaining budget is skipped.
Without CUDA the script says so, writes ``{"cuda": false}`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

DEV = torch.device("cuda")  # --dry-run-cpu switches to the CPU (tensor-/row-wise _scaled_mm run there) to test this script
TARGET_SPEEDUP = 1.45  # course path (block-wise FP8) over BF16 at 8192^3
REFERENCE_H100 = {"bf16": 778, "tensorwise": 1412, "rowwise": 1380, "blockwise": 1162}  # TFLOP/s, torch 2.11, 8192^3


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


class Report:
    """Results, written to JSON after every check."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {"cuda": torch.cuda.is_available(), "checks": [], "benchmarks": [], "summary": {}}

    def check(self, name: str, status: str, seconds: float, **details) -> None:
        self.data["checks"].append({"name": name, "status": status, "seconds": round(seconds, 2), **details})
        msg = details.get("message", "")
        print(f"[{status:>5}] {name:<52} {seconds:6.1f} s  {msg}", flush=True)
        self.save()

    def save(self) -> None:
        try:
            self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        except OSError as e:  # never let the report kill the run
            print(f"could not write {self.path}: {e}", file=sys.stderr)


def run_check(report: Report, budget: Budget, name: str, need_s: float, fn) -> object:
    """Run ``fn()`` -> (status, details) unless fewer than ``need_s`` seconds are left; never raises."""
    if budget.left() < need_s:
        report.check(name, "skip", 0.0, message=f"time budget: {budget.left():.0f} s left, needs ~{need_s:.0f} s")
        return None
    t0 = time.perf_counter()
    try:
        status, details = fn()
    except TimeoutError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
        status, details = "error", {"message": f"{type(e).__name__}: {str(e)[:300]}", "traceback": traceback.format_exc()[-2000:]}
    report.check(name, status, time.perf_counter() - t0, **details)
    return details


# ----------------------------------------------------------------------------- environment


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "has_scaled_mm": hasattr(torch, "_scaled_mm"),
        "has_F_scaled_mm": hasattr(torch.nn.functional, "scaled_mm"),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=list(torch.cuda.get_device_capability(0)), memory_gib=round(p.total_memory / 2**30, 1),
                   sm_count=p.multi_processor_count)
        try:
            env["cublas_version"] = torch._C._cuda_getCompiledVersion()
        except Exception:  # noqa: BLE001
            pass
    return env


# ----------------------------------------------------------------------------- FP8 correctness


def supported(fp8) -> tuple[str, ...]:
    if DEV.type == "cuda":
        return fp8.cuda_recipes(DEV.index or 0)
    ok = []
    for recipe in fp8.RECIPES:  # CPU dry run: probe directly
        try:
            a = torch.randn(32, 512)
            fp8.scaled_matmul_cuda(*fp8._quantize_operand(a, recipe, "a"), *fp8._quantize_operand(a, recipe, "b"))
            ok.append(recipe)
        except (RuntimeError, ValueError, NotImplementedError):
            pass
    return tuple(ok)


def course_recipe(fp8) -> str:
    rec = fp8.auto_recipe(DEV)
    return rec if rec in supported(fp8) or DEV.type == "cuda" else (supported(fp8) or ("blockwise",))[0]


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def check_recipes(fp8) -> tuple[str, dict]:
    """Run each recipe once on a small problem; record the error text of those that fail."""
    g = gen(0)
    a = torch.randn(256, 1024, device=DEV, generator=g)
    b = torch.randn(512, 1024, device=DEV, generator=g)
    out = {}
    for recipe in fp8.RECIPES:
        try:
            aq, as_ = fp8._quantize_operand(a, recipe, "a")
            bq, bs = fp8._quantize_operand(b, recipe, "b")
            fp8.scaled_matmul_cuda(aq, as_, bq, bs)
            sync()
            out[recipe] = "ok"
        except Exception as e:  # noqa: BLE001
            out[recipe] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    sup = list(supported(fp8))
    status = "ok" if "tensorwise" in sup else "fail"
    return status, {"message": f"supported: {sup}; course recipe: {course_recipe(fp8)}", "recipes": out,
                    "supported": sup, "course_recipe": course_recipe(fp8)}


def check_gemm_vs_emulation(fp8) -> tuple[str, dict]:
    """_scaled_mm (bf16 and, where accepted, fp32 output) vs the emulation, several shapes and layouts."""
    g = gen(1)
    cases = []
    worst = 0.0
    shapes = [(256, 1024, 512), (1024, 4096, 2048), (4096, 7168, 2048), (2048, 2048, 7168)]
    layouts = [("tensorwise", "tensorwise"), ("rowwise", "rowwise"), ("blockwise", "block"), ("blockwise", "tile")]
    sup = supported(fp8)
    if DEV.type != "cuda":
        shapes = shapes[:1]
    for M, K, N in shapes:
        a = torch.randn(M, K, device=DEV, generator=g)
        b = torch.randn(N, K, device=DEV, generator=g) * 0.05
        for recipe, b_kind in layouts:
            if recipe not in sup:
                cases.append({"shape": [M, K, N], "layout": f"{recipe}/{b_kind}", "status": "unsupported"})
                continue
            aq, as_ = fp8._quantize_operand(a, recipe, "a")
            bq, bs = fp8.quantize_tiles(b) if b_kind == "tile" else fp8._quantize_operand(b, recipe, "b")
            ref = fp8.scaled_matmul_emulated(aq, as_, bq, bs)
            row = {"shape": [M, K, N], "layout": f"{recipe}/{b_kind}"}
            for out_dtype in (torch.bfloat16, torch.float32):
                try:
                    y = fp8.scaled_matmul_cuda(aq, as_, bq, bs, out_dtype=out_dtype).float()
                    err = float((y - ref).abs().max() / ref.abs().max())
                    row[str(out_dtype).replace("torch.", "")] = err
                    if out_dtype == torch.bfloat16:
                        worst = max(worst, err)
                except Exception as e:  # noqa: BLE001
                    row[str(out_dtype).replace("torch.", "")] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            cases.append(row)
            del aq, bq, ref
    # bf16 output rounds to 2^-9 relative; allow 2^-7 of max |y|
    status = "ok" if worst <= 2**-7 else "fail"
    return status, {"message": f"worst max|err|/max|y| with bf16 output {worst:.2e} (tolerance {2**-7:.1e})", "cases": cases}


def check_fp8_linear(fp8) -> tuple[str, dict]:
    """FP8Linear forward + backward on CUDA (auto recipe) vs the same recipe through the emulation."""
    g = gen(2)
    recipe = course_recipe(fp8)
    out = {"recipe": recipe}
    worst = 0.0
    for M, K, N in ((512, 1024, 512), (2048, 7168, 2048))[: 2 if DEV.type == "cuda" else 1]:
        x = torch.randn(M, K, device=DEV, generator=g).requires_grad_()
        w = (torch.randn(N, K, device=DEV, generator=g) / math.sqrt(K)).requires_grad_()
        gy = torch.randn(M, N, device=DEV, generator=g)
        y = fp8.fp8_linear(x, w, recipe=recipe, backend="cuda")
        y.backward(gy)
        xe, we = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        ye = fp8.fp8_linear(xe, we, recipe=recipe, backend="emulated")
        ye.backward(gy)
        x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y32 = x32 @ w32.t()
        y32.backward(gy)
        for name, got, emu, full in (("y", y, ye, y32), ("dx", x.grad, xe.grad, x32.grad), ("dW", w.grad, we.grad, w32.grad)):
            e_emu = float((got.detach() - emu.detach()).abs().max() / emu.detach().abs().max())
            e_fp32 = float((got.detach() - full.detach()).norm() / full.detach().norm())
            out[f"{M}x{K}x{N} {name}"] = {"vs_emulation_max": e_emu, "vs_fp32_rel_fro": e_fp32}
            worst = max(worst, e_emu)
    status = "ok" if worst <= 2**-6 else "fail"
    return status, {"message": f"worst max|err| vs emulation {worst:.2e} (tolerance {2**-6:.1e})", "details": out}


# ----------------------------------------------------------------------------- timings


def time_interleaved(fns: dict, reps: int, warmup: int = 5) -> dict[str, float]:
    """Median milliseconds per call of each candidate, timed with CUDA events, candidates interleaved."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    if DEV.type != "cuda":  # dry run: wall clock
        runs = {k: [] for k in fns}
        for _ in range(reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                runs[k].append(1e3 * (time.perf_counter() - t0))
        return {k: statistics.median(v) for k, v in runs.items()}
    events = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events[k].append((start, end))
    torch.cuda.synchronize()
    return {k: statistics.median(s.elapsed_time(e) for s, e in ev) for k, ev in events.items()}


def bench_size(fp8, M: int, K: int, N: int, reps: int) -> dict:
    g = gen(3)
    a = torch.randn(M, K, device=DEV, generator=g)
    b = torch.randn(N, K, device=DEV, generator=g) * 0.05
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    fns = {"bf16": lambda: torch.mm(a16, b16.t())}
    sup = supported(fp8)
    ops = {}
    for recipe in fp8.RECIPES:
        if recipe in sup:
            ops[recipe] = (*fp8._quantize_operand(a, recipe, "a"), *fp8._quantize_operand(b, recipe, "b"))
    for recipe, (aq, as_, bq, bs) in ops.items():
        args = fp8.scaled_mm_args(aq, as_, bq, bs)  # laid out once, as a training step would keep them
        fns[recipe] = (lambda args=args: torch._scaled_mm(args[0], args[1], scale_a=args[2], scale_b=args[3],
                                                          out_dtype=torch.bfloat16))
    if "tensorwise" in ops:
        args = fp8.scaled_mm_args(*ops["tensorwise"])
        fns["tensorwise_fast_accum"] = lambda: torch._scaled_mm(args[0], args[1], scale_a=args[2], scale_b=args[3],
                                                                out_dtype=torch.bfloat16, use_fast_accum=True)
    ms = time_interleaved(fns, reps)
    flops = 2.0 * M * N * K
    row = {"shape": [M, K, N], "ms": ms, "tflops": {k: flops / (v * 1e-3) / 1e12 for k, v in ms.items()}}
    row["speedup_vs_bf16"] = {k: ms["bf16"] / v for k, v in ms.items() if k != "bf16"}
    return row


def check_benchmarks(fp8, report: Report, budget: Budget, reps: int) -> tuple[str, dict]:
    sizes = [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (8192, 8192, 8192),
             (4096, 7168, 2048), (4096, 2048, 7168)]  # cubes, then a V3 expert's w1 and w2 on 4096 tokens
    if DEV.type != "cuda":
        sizes = [(256, 512, 256)]
    big_shape = list(sizes[3] if DEV.type == "cuda" else sizes[0])
    rows = []
    for M, K, N in sizes:
        if budget.left() < 25:
            rows.append({"shape": [M, K, N], "skipped": "time budget"})
            continue
        try:
            rows.append(bench_size(fp8, M, K, N, reps))
        except Exception as e:  # noqa: BLE001
            rows.append({"shape": [M, K, N], "error": f"{type(e).__name__}: {str(e)[:200]}"})
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
        report.data["benchmarks"] = rows
        report.save()
    big = next((r for r in rows if r.get("shape") == big_shape and "tflops" in r), None)
    if big is None:
        return "fail", {"message": f"no {big_shape} measurement"}
    course = course_recipe(fp8)
    speedup = big["speedup_vs_bf16"].get(course, float("nan"))
    report.data["summary"].update(course_recipe=course, course_speedup_8192=speedup, target=TARGET_SPEEDUP,
                                  tflops_8192=big["tflops"])
    # the CPU dry run's "FP8 GEMMs" are emulations timed on a shared CPU: the target applies to a GPU only
    status = "ok" if DEV.type != "cuda" or speedup >= TARGET_SPEEDUP else "fail"
    return status, {"message": f"course path ({course}) {speedup:.2f}x BF16 at {big_shape} (target >= {TARGET_SPEEDUP}x)"}


def check_course_path_end_to_end(fp8, reps: int) -> tuple[str, dict]:
    """FP8Linear forward with online quantisation (plain-torch quantisers) vs a BF16 linear, 8192^3: informational."""
    g = gen(4)
    n = 8192 if DEV.type == "cuda" else 256
    x = torch.randn(n, n, device=DEV, generator=g)
    w = torch.randn(n, n, device=DEV, generator=g) * 0.01
    x16, w16 = x.to(torch.bfloat16), w.to(torch.bfloat16)
    recipe = course_recipe(fp8)
    old = fp8.set_fused_quantisers("never")  # this row measures the plain-torch quantisers (gpu_e2e has the fused ones)
    try:
        with torch.no_grad():
            ms = time_interleaved({"bf16_linear": lambda: torch.nn.functional.linear(x16, w16),
                                   "fp8_linear_with_quantisation": lambda: fp8.fp8_linear(x, w, recipe=recipe, backend="cuda")}, reps)
    finally:
        fp8.set_fused_quantisers(old)
    ratio = ms["bf16_linear"] / ms["fp8_linear_with_quantisation"]
    return "ok", {"message": f"FP8Linear fwd incl. quantising x and W ({recipe}): {ratio:.2f}x BF16 (quantisers are plain torch)",
                  "ms": ms, "speedup": ratio}


# ----------------------------------------------------------------------------- other sections


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).norm() / b.detach().float().cpu().norm().clamp_min(1e-30))


def smoke_mla() -> tuple[str, dict]:
    from course_lib.deepseek.mla import MLA, MLAConfig

    torch.manual_seed(0)
    m = MLA(MLAConfig()).float()
    x = torch.randn(2, 32, m.cfg.dim if hasattr(m, "cfg") else MLAConfig().dim)
    with torch.no_grad():
        y_cpu = m(x)
        m = m.to(DEV)
        y_gpu = m(x.to(DEV))
        out = {"naive_cuda_vs_cpu": _rel(y_gpu, y_cpu)}
        try:
            cache = m.new_cache(batch=2)  # allocated on the weights' device
            y_abs = m(x.to(DEV), 0, cache, absorb=True)
            out["absorbed_vs_naive_cuda"] = _rel(y_abs, y_gpu)
        except Exception as e:  # noqa: BLE001
            out["absorbed"] = f"{type(e).__name__}: {str(e)[:160]}"
    ok = bool(torch.isfinite(y_gpu).all()) and out["naive_cuda_vs_cpu"] < 1e-3 and out.get("absorbed_vs_naive_cuda", 0.0) < 1e-3
    return ("ok" if ok else "fail"), {"message": json.dumps({k: (f"{v:.1e}" if isinstance(v, float) else v) for k, v in out.items()}),
                                      **out}


def smoke_moe() -> tuple[str, dict]:
    from course_lib.deepseek.moe import MoE, MoEConfig

    torch.manual_seed(0)
    cfg = MoEConfig()
    m = MoE(cfg).float()
    x = torch.randn(4, 64, cfg.dim)
    with torch.no_grad():
        y_cpu, _ = m(x)
        m = m.to(DEV)
        y_gpu, info = m(x.to(DEV))
    err = _rel(y_gpu, y_cpu)
    ok = bool(torch.isfinite(y_gpu).all()) and err < 1e-3
    return ("ok" if ok else "fail"), {"message": f"cuda vs cpu rel err {err:.1e}", "cuda_vs_cpu": err}


def smoke_model(fp8_blocks: bool) -> tuple[str, dict]:
    from course_lib.deepseek import model as mdl

    torch.manual_seed(0)
    cfg = mdl.ModelConfig()
    if fp8_blocks:
        import dataclasses

        cfg = dataclasses.replace(cfg, fp8=True)
    net = mdl.DeepSeekV3Mini(cfg).to(DEV)
    tokens = torch.randint(0, cfg.vocab_size, (4, 32), device=DEV)
    out = net.compute_loss(tokens[:, :-1], tokens[:, 1:]) if hasattr(net, "compute_loss") else None
    loss = out.loss if out is not None else torch.nn.functional.cross_entropy(
        net(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    loss = loss.detach()
    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p.grad).all()) for p in net.parameters() if p.grad is not None)
    return ("ok" if finite else "fail"), {"message": f"loss {float(loss):.4f}, gradients finite: {finite}", "loss": float(loss)}


def run_pytest(timeout: float) -> tuple[str, dict]:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return "skip", {"message": "pytest not installed"}
    names = ("test_fp8.py", "test_mla.py", "test_moe.py", "test_model.py")
    files = [str(ROOT / "tests" / f) for f in names if (ROOT / "tests" / f).exists()]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or gpu", *files]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "fail", {"message": f"pytest did not finish in {timeout:.0f} s"}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    status = "ok" if proc.returncode in (0, 5) else "fail"  # 5: nothing collected
    return status, {"message": tail[-1] if tail else "", "output_tail": tail, "returncode": proc.returncode}


def run_e2e(report: Report, budget: Budget, fp8, reps: int) -> None:
    """The end-to-end rows of tools/gpu_e2e.py (fused quantisers, FP8Linear, training step, MoE dispatch, MLA decode)."""
    import gpu_e2e

    from course_lib.deepseek import fp8_fused

    ctx = gpu_e2e.Ctx(dev=DEV, timer=time_interleaved, reps=reps, dry=DEV.type != "cuda")
    checks = {"quantiser_bits": (20, lambda: gpu_e2e.check_quantiser_bits(ctx, fp8, fp8_fused)),
              "fp8_linear": (60, lambda: gpu_e2e.check_fp8_linear(ctx, fp8)),
              "training": (60, lambda: gpu_e2e.check_training(ctx, fp8)),
              "moe_dispatch": (45, lambda: gpu_e2e.check_moe_dispatch(ctx)),
              "mla_decode": (45, lambda: gpu_e2e.check_mla_decode(ctx))}
    for key, (need_s, fn) in checks.items():
        run_check(report, budget, gpu_e2e.NAMES[key], need_s, fn)
        ctx.free()


# ----------------------------------------------------------------------------- main


def print_table(report: Report) -> None:
    rows = [r for r in report.data["benchmarks"] if "tflops" in r]
    if not rows:
        return
    cols = ["bf16", "tensorwise", "tensorwise_fast_accum", "rowwise", "blockwise"]
    print("\nTFLOP/s (median of CUDA-event timings; speed-up over BF16 in brackets)")
    print(f"{'M x K x N':<20}" + "".join(f"{c:>24}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            t = r["tflops"].get(c)
            sp = r["speedup_vs_bf16"].get(c)
            cells.append("-" if t is None else (f"{t:8.0f}" + (f" ({sp:.2f}x)" if sp else "")))
        print(f"{'x'.join(map(str, r['shape'])):<20}" + "".join(f"{c:>24}" for c in cells))
    print(f"reference (H100, torch 2.11, 8192^3): {REFERENCE_H100}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (hard stop 30 s later)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-pytest", action="store_true")
    ap.add_argument("--dry-run-cpu", action="store_true", help=argparse.SUPPRESS)  # exercise this script without a GPU
    ns = ap.parse_args(argv)

    global DEV
    report = Report(ns.out)
    report.data["environment"] = environment()
    if ns.dry_run_cpu:
        DEV = torch.device("cpu")
        report.data["dry_run_cpu"] = True
        from course_lib.deepseek import fp8_fused

        report.data["triton_interpreter"] = fp8_fused.enable_interpreter()  # the fused kernels on CPU tensors
    elif not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); nothing to check. Wrote {ns.out}")
        report.data["summary"] = {"message": "no CUDA"}
        report.save()
        return 0
    budget = Budget(ns.budget)

    def hard_stop(signum, frame):
        raise TimeoutError(f"gpu-check: hard time limit of {ns.budget + 30:.0f} s reached")

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, hard_stop)
        signal.alarm(int(ns.budget + 30))
    env = report.data["environment"]
    where = "CPU dry run" if DEV.type == "cpu" else f"{env.get('device')} (cc {env.get('capability')})"
    print(f"gpu-check on {where}, torch {env['torch']}, CUDA {env['cuda_runtime']}; budget {ns.budget:.0f} s", flush=True)
    try:
        from course_lib.deepseek import fp8
    except Exception as e:  # noqa: BLE001
        report.check("import course_lib.deepseek.fp8", "error", 0.0, message=f"{type(e).__name__}: {e}")
        return 1
    try:
        if DEV.type == "cuda" and torch.cuda.get_device_capability(0) < (8, 9):
            report.check("fp8 tensor cores", "skip", 0.0, message="compute capability < 8.9: FP8 GEMMs are emulated")
        else:
            run_check(report, budget, "fp8: _scaled_mm recipes available", 20, lambda: check_recipes(fp8))
            run_check(report, budget, "fp8: _scaled_mm vs emulation (4 shapes x 4 layouts)", 40, lambda: check_gemm_vs_emulation(fp8))
            run_check(report, budget, "fp8: FP8Linear fwd+bwd, CUDA vs emulation", 25, lambda: check_fp8_linear(fp8))
            run_check(report, budget, "fp8: TFLOP/s bf16 vs fp8 recipes", 60, lambda: check_benchmarks(fp8, report, budget, ns.reps))
            run_check(report, budget, "fp8: FP8Linear incl. quantisation vs bf16 linear", 20,
                      lambda: check_course_path_end_to_end(fp8, ns.reps))
            run_e2e(report, budget, fp8, ns.reps)
        run_check(report, budget, "mla: forward on CUDA vs CPU, absorbed vs naive", 15, smoke_mla)
        run_check(report, budget, "moe: forward on CUDA vs CPU", 15, smoke_moe)
        run_check(report, budget, "model: DeepSeekV3Mini loss + backward on CUDA", 20, lambda: smoke_model(False))
        run_check(report, budget, "model: DeepSeekV3Mini with FP8 blocks on CUDA", 20, lambda: smoke_model(True))
        if not ns.no_pytest:
            run_check(report, budget, "pytest -k 'cuda or gpu' tests/", 45, lambda: run_pytest(max(30.0, budget.left() - 10)))
    except TimeoutError as e:
        report.check("hard time limit", "fail", budget.elapsed(), message=str(e))
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
    print_table(report)
    statuses = [c["status"] for c in report.data["checks"]]
    report.data["summary"].update(seconds=round(budget.elapsed(), 1), ok=statuses.count("ok"), fail=statuses.count("fail"),
                                  error=statuses.count("error"), skip=statuses.count("skip"))
    report.save()
    s = report.data["summary"]
    print(f"\ngpu-check: {s['ok']} ok, {s['fail']} failed, {s['error']} errors, {s['skip']} skipped in {s['seconds']} s -> {ns.out}")
    return 0 if s["fail"] == 0 and s["error"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

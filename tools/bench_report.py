"""Write BENCHMARKS.md: every performance claim of the course, measured side by side in one run.

    python tools/bench_report.py                  # everything (make bench), about 25 minutes on 2 cores
    python tools/bench_report.py --only mla,moe   # rerun some rows; the others are kept from the last report
    python tools/bench_report.py --gpu gpu_check.json   # fold in the GPU rows written by `make gpu-check`

Rules: candidates are timed interleaved in one process (course_lib.bench.compare: warm-up, several runs,
median and spread), ratios come from the same run, outputs are checked to agree before a ratio is
reported. Each section's measurements are cached in bench/results.json so a partial rerun keeps the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from course_lib import viz  # noqa: E402
from course_lib.bench import Timing, compare, ratio, threads  # noqa: E402

OUT_DIR = ROOT / "bench"
RESULTS = OUT_DIR / "results.json"
REPORT = ROOT / "BENCHMARKS.md"


# ------------------------------------------------------------------------------------------ machine


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def fmt_ms(s: float) -> str:
    return f"{1e3 * s:.3g} ms"


def spread(t) -> str:
    return f"+-{100 * t.spread:.0f}%"


def savefig(fig, name: str) -> str:
    OUT_DIR.mkdir(exist_ok=True)
    fig.savefig(OUT_DIR / name, bbox_inches="tight")
    plt.close(fig)
    return f"bench/{name}"


# ------------------------------------------------------------------------------------------ course


def bench_course(repeats: int = 3) -> dict:
    """Execution time of every solution notebook while graded, and the autograde time of one full submission.

    The worked solutions (outputs stripped) are submitted as one student and autograded through the real
    pipeline (nbgrader, sandbox, guard) ``repeats`` times; the raw times of every run are kept.
    """
    import shutil

    import course

    names = course.sections()
    rows = {a: {"section": a, "runs": {"autograde_s": [], "execution_s": []}} for a in names}
    tmp = course.temp_course(names)
    try:
        for a in names:
            course.run_nbgrader(tmp, "generate_assignment", a, "--force")
            sol = ROOT / "solutions" / a / f"{a}.ipynb"
            src = sol if sol.exists() else tmp / "source" / a / f"{a}.ipynb"
            course._save(course.strip_outputs(course._load(src)), tmp / "submitted" / "bench" / a / f"{a}.ipynb")
        for i in range(repeats):
            for a in names:
                run = course.autograde_one(tmp, "bench", a)
                sc = course.scores(tmp, "bench", a)
                rows[a].update(score=sc.score, max=sc.max_score)
                rows[a]["runs"]["autograde_s"].append(run.seconds)
                rows[a]["runs"]["execution_s"].append(course.execution_seconds(tmp, "bench", a) or float("nan"))
                print(f"   run {i + 1}/{repeats} {a}: autograde {run.seconds:.1f} s, score {sc.score:g}/{sc.max_score:g}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"repeats": repeats, "rows": list(rows.values()), "sandbox": _sandbox_mode()}


def _sandbox_mode() -> str:
    from course_judge import sandbox

    ok, how = sandbox.sandbox_status()
    return "bubblewrap" if ok else how.split(":")[0]


def md_course(r: dict) -> list[str]:
    def cell(t: Timing) -> str:
        return f"{t.median:.1f} s | +-{100 * t.spread:.0f}%" if t.median == t.median else "n/a | -"

    out = [f"The worked solutions submitted as one student and autograded through the real pipeline (nbgrader, "
           f"sandbox: {r['sandbox']}); median of {r['repeats']} runs with its spread. "
           "\"Executed\" is the notebook from its setup cell to its last cell inside the grading kernel; \"autograde\" "
           "adds kernel start, sandbox, nbgrader and the gradebook.", "",
           "| section | executed while graded | spread | autograde | spread | score |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        out.append(f"| {row['section']} | {cell(Timing('ex', row['runs']['execution_s']))} | "
                   f"{cell(Timing('ag', row['runs']['autograde_s']))} | {row['score']:g}/{row['max']:g} |")
    totals = {k: Timing(k, [sum(vals) for vals in zip(*(row["runs"][k] for row in r["rows"]))]) for k in ("execution_s", "autograde_s")}
    out.append(f"| **total** | {cell(totals['execution_s'])} | {cell(totals['autograde_s'])} (one six-notebook submission) | |")
    return out


# ------------------------------------------------------------------------------------------ MLA


def bench_mla(contexts=(256, 1024, 2048, 4096), repeats: int = 5) -> dict:
    """Cache sizes, and prefill / per-token decode time of MHA, naive MLA and absorbed MLA."""
    from course_lib.deepseek.mla import MLA, MLAConfig, MultiHeadAttention, mha_cache_elements_per_token

    v3 = MLAConfig.v3()
    sizes = {
        "V3 (671B)": {"mla": v3.latent_cache_elements_per_token, "naive": v3.full_cache_elements_per_token,
                      "mha": mha_cache_elements_per_token(128, 128)},
    }
    cfg = MLAConfig(dim=1024, n_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                    v_head_dim=64, max_seq_len=max(contexts) + 8, rope_scaling="none")  # plain RoPE past 4096
    sizes["bench config"] = {"mla": cfg.latent_cache_elements_per_token, "naive": cfg.full_cache_elements_per_token,
                             "mha": mha_cache_elements_per_token(cfg.n_heads, cfg.dim // cfg.n_heads)}
    torch.manual_seed(0)
    mla = MLA(cfg).eval()
    mha = MultiHeadAttention(cfg.dim, cfg.n_heads, cfg.dim // cfg.n_heads, max_seq_len=cfg.max_seq_len).eval()
    rows = []
    with torch.inference_mode(), threads(1):
        for T in contexts:
            x = torch.randn(1, T, cfg.dim)
            tok = torch.randn(1, 1, cfg.dim)
            caches = {}
            setups = {"mha": (mha, None, False), "naive": (mla, "latent", False), "absorbed": (mla, "latent", True)}
            for name, (mod, kind, absorb) in setups.items():
                cache = mod.new_cache(batch=1) if kind is None else mod.new_cache(batch=1, kind=kind)
                mod(x, 0, cache, **({"absorb": absorb} if mod is mla else {}))
                caches[name] = cache
            y_n = mla(tok, T, caches["naive"], absorb=False)
            y_a = mla(tok, T, caches["absorbed"], absorb=True)
            agree = float((y_n - y_a).abs().max())
            dec = compare({
                "mha": lambda T=T, tok=tok, c=caches: mha(tok, T, c["mha"]),
                "naive": lambda T=T, tok=tok, c=caches: mla(tok, T, c["naive"], absorb=False),
                "absorbed": lambda T=T, tok=tok, c=caches: mla(tok, T, c["absorbed"], absorb=True),
            }, warmup=2, repeats=repeats)
            pre = compare({
                "mha": lambda x=x: mha(x),
                "naive": lambda x=x: mla(x, absorb=False),
                "absorbed": lambda x=x: mla(x, 0, mla.new_cache(batch=1), absorb=True),
            }, warmup=1, repeats=max(3, repeats // 2)) if T <= 2048 else None
            rows.append({"T": T, "max_abs_diff": agree,
                         "decode_s": {k: t.median for k, t in dec.items()}, "decode_spread": {k: t.spread for k, t in dec.items()},
                         "decode_naive_over_absorbed": ratio(dec["naive"], dec["absorbed"]),
                         "prefill_s": {k: t.median for k, t in pre.items()} if pre else None,
                         "prefill_absorbed_over_naive": ratio(pre["absorbed"], pre["naive"]) if pre else None})
    fig, ax = plt.subplots()
    for k in ("mha", "naive", "absorbed"):
        ax.plot([r["T"] for r in rows], [1e3 * r["decode_s"][k] for r in rows], marker="o", label=k)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode time per token (ms, 1 thread)")
    ax.set_title("Decode step: MHA vs naive MLA vs absorbed MLA")
    ax.legend()
    return {"cache": sizes, "config": {k: getattr(cfg, k) for k in ("dim", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                                                                      "qk_rope_head_dim", "v_head_dim")},
            "rows": rows, "figure": savefig(fig, "mla_decode.png")}


def md_mla(r: dict) -> list[str]:
    out = ["Cache per token per layer (elements; bytes in bf16):", "",
           "| config | MLA latent (c_KV + k_pe) | naive MLA (per-head K, V) | MHA | MHA / MLA |", "|---|---|---|---|---|"]
    for name, s in r["cache"].items():
        out.append(f"| {name} | {s['mla']} ({2 * s['mla']} B) | {s['naive']} ({2 * s['naive']} B) | {s['mha']} ({2 * s['mha']} B) "
                   f"| {s['mha'] / s['mla']:.1f}x |")
    out += ["", f"Timing config: {r['config']}, batch 1, float32, 1 thread.", "",
            "| context | decode MHA | decode naive | decode absorbed | naive / absorbed | prefill naive | prefill absorbed "
            "| max abs diff |",
            "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        d = row["decode_s"]
        p = row["prefill_s"] or {}
        pn = fmt_ms(p["naive"]) if p else "-"
        pa = fmt_ms(p["absorbed"]) if p else "-"
        out.append(f"| {row['T']} | {fmt_ms(d['mha'])} | {fmt_ms(d['naive'])} | {fmt_ms(d['absorbed'])} | "
                   f"**{row['decode_naive_over_absorbed']:.1f}x** | {pn} | {pa} | {row['max_abs_diff']:.1e} |")
    out += ["", f"![decode]({r['figure']})"]
    return out


# ------------------------------------------------------------------------------------------ MoE


def bench_moe_rows() -> dict:
    from course_lib.deepseek.common import SwiGLU
    from course_lib.deepseek.moe import bench_moe

    r = bench_moe(n_tokens=4096, n_experts=64, top_k=6, repeats=5, threads=1)
    # overhead vs a dense FFN with the same active parameters: (top_k + shared) experts' width
    cfg = r["config"]
    torch.manual_seed(0)
    dense = SwiGLU(cfg["dim"], cfg["inter_dim"] * (cfg["top_k"] + 1)).eval()
    from course_lib.deepseek.moe import MoE, MoEConfig

    moe = MoE(MoEConfig(dim=cfg["dim"], moe_inter_dim=cfg["inter_dim"], n_routed_experts=cfg["n_experts"], n_shared_experts=1,
                        n_activated_experts=cfg["top_k"], n_expert_groups=cfg["n_groups"], n_limited_groups=cfg["n_limited_groups"])).eval()
    x = torch.randn(cfg["n_tokens"], cfg["dim"])
    with torch.inference_mode(), threads(1):
        t = compare({"dense": lambda: dense(x), "moe": lambda: moe(x)}, warmup=1, repeats=5)
    r["dense_ffn_s"] = t["dense"].median
    r["moe_layer_s"] = t["moe"].median
    r["moe_over_dense"] = ratio(t["moe"], t["dense"])
    return r


def md_moe(r: dict) -> list[str]:
    c = r["config"]
    out = [f"E={c['n_experts']}, top-{c['top_k']}, {c['n_tokens']} tokens, dim {c['dim']}, expert width {c['inter_dim']}, "
           f"{c['n_groups']} groups / {c['n_limited_groups']} kept, 1 shared expert, {r['threads']} thread(s); outputs agree: "
           f"**{r['agree']}** (max abs diffs {', '.join(f'{k} {v:.1e}' for k, v in r['max_abs_diff'].items())}).", "",
           "| implementation | median | spread | vectorised is faster by |", "|---|---|---|---|"]
    for k, s in r["median_s"].items():
        sp = r["speedup_of_vectorised"].get(k)
        out.append(f"| {k} | {fmt_ms(s)} | +-{100 * r['spread'][k]:.0f}% | {f'{sp:.2f}x' if sp else '-'} |")
    out += ["", f"Whole MoE layer vs a dense SwiGLU FFN of equal active parameters: {fmt_ms(r['moe_layer_s'])} vs "
            f"{fmt_ms(r['dense_ffn_s'])} ({r['moe_over_dense']:.2f}x the dense time)."]
    return out


# ------------------------------------------------------------------------------------------ FP8


def bench_fp8() -> dict:
    from course_lib.deepseek import fp8

    torch.manual_seed(0)
    x = torch.randn(512, 1024)
    mask = torch.rand(x.shape) < 1e-3  # 0.1% outliers x 1e5
    x_out = torch.where(mask, x * 1e5, x)
    sq = {}
    for g in ("tensor", "row", "tile"):
        q, s = fp8.quantize(x_out, g)
        xh = fp8.dequantize(q, s)
        sq[g] = {"all": fp8.sqnr_db(x_out, xh), "ordinary": fp8.sqnr_db(x_out, xh, ~mask)}
    q, s = fp8.quantize(x_out.t().contiguous(), "block")
    xh = fp8.dequantize(q, s).t()
    sq["block"] = {"all": fp8.sqnr_db(x_out, xh), "ordinary": fp8.sqnr_db(x_out, xh, ~mask)}
    errs = []
    for K in (128, 512, 1024, 2048, 4096):
        a = torch.rand(16, K) + 0.5  # positive products: the worst case for swamping
        b = torch.rand(16, K) + 0.5
        exact = (a.double() @ b.double().t())
        lim = fp8.accumulate_limited(a, b, 14)
        pro = fp8.accumulate_limited(a, b, 14, promote_every=128)
        errs.append({"K": K, "limited": float(((lim.double() - exact).abs() / exact).max()),
                     "promoted": float(((pro.double() - exact).abs() / exact).max())})
    fig, ax = plt.subplots()
    ax.plot([e["K"] for e in errs], [e["limited"] for e in errs], marker="o", label="14-bit accumulator")
    ax.plot([e["K"] for e in errs], [e["promoted"] for e in errs], marker="s", label="promoted to FP32 every 128")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("inner dimension K")
    ax.set_ylabel("max relative error vs float64")
    ax.set_title("Limited accumulation precision and DeepSeek-V3's promotion")
    ax.legend()
    return {"sqnr": sq, "accumulation": errs, "figure": savefig(fig, "fp8_accumulation.png")}


def md_fp8(r: dict) -> list[str]:
    out = ["SQNR of E4M3 quantisation, 512x1024 activations with 0.1% outliers x1e5 (dB; higher is better):", "",
           "| granularity | all values | ordinary values (outliers excluded) |", "|---|---|---|"]
    for g, v in r["sqnr"].items():
        out.append(f"| {g} | {v['all']:.1f} | {v['ordinary']:.1f} |")
    out += ["", "Emulated FP8 GEMM accumulation (products exact, accumulator rounded to 14 mantissa bits):", "",
            "| K | max rel. error, limited | promoted every 128 |", "|---|---|---|"]
    out += [f"| {e['K']} | {e['limited']:.2e} | {e['promoted']:.2e} |" for e in r["accumulation"]]
    out += ["", f"![accumulation]({r['figure']})"]
    return out


# ------------------------------------------------------------------------------------------ training and HF parity


def bench_training(steps: int = 150, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """DeepSeekV3Mini on the multi-task language in FP32, BF16 autocast and FP8 emulation, one run per seed.

    Rows report the median over seeds with the spread; the relative loss vs FP32 is paired by seed.
    """
    import dataclasses

    from course_lib.data import MultiTaskLanguage
    from course_lib.deepseek.model import RECIPE, DeepSeekV3Mini, ModelConfig, init_weights, train

    data = MultiTaskLanguage(n_digits=RECIPE["n_digits"])  # Section 5's graded training recipe
    # (config overrides, autocast dtype): autocast is entered per step inside train_step, never around the loop
    setups = {"fp32": ({}, None), "bf16-autocast": ({}, torch.bfloat16), "fp8-emulated": ({"fp8": True}, None)}
    per_seed: dict[str, list[dict]] = {k: [] for k in setups}
    for seed in seeds:
        for name, (kw, amp_dtype) in setups.items():
            cfg = dataclasses.replace(ModelConfig(vocab_size=data.vocab_size), **kw)
            torch.manual_seed(seed)
            model = init_weights(DeepSeekV3Mini(cfg), seed=seed, std=RECIPE["init_std"])
            with threads(1):
                res = train(model, data, steps=steps, seed=seed, target=0.8, target_metric="token_acc", amp_dtype=amp_dtype,
                            batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], warmup=RECIPE["warmup"], eval_every=RECIPE["eval_every"])
            per_seed[name].append({"seed": seed, "final_loss": res.evals[-1]["loss"], "token_acc": res.evals[-1]["token_acc"],
                                   "steps_to_target": res.steps_to_target, "seconds": res.seconds, "tokens_per_s": res.tokens_per_s})
            print(f"   seed {seed} {name}: loss {res.evals[-1]['loss']:.4f}, {res.tokens_per_s:.0f} tokens/s", flush=True)
    return {"steps": steps, "seeds": list(seeds), "runs": {name: {"seeds": rs} for name, rs in per_seed.items()}}


def md_training(r: dict) -> list[str]:
    out = [f"DeepSeekV3Mini (default config) on the multi-task language with Section 5's recipe (4 digits, lr 5e-3, "
           f"init std 0.05, warm-up 20), {r['steps']} steps, batch 64, 1 thread, seeds {r['seeds']} (median over seeds "
           "with its spread); target: answer-token accuracy 0.8 (Section 5's graded target). Relative loss vs FP32 is "
           "paired by seed (median, with the range over seeds).", "",
           "| precision | final loss | rel. vs FP32 (range) | token acc | steps to target per seed | tokens/s | time |",
           "|---|---|---|---|---|---|---|"]
    base = r["runs"]["fp32"]["seeds"]
    for k, v in r["runs"].items():
        rs = v["seeds"]
        med = {key: Timing(key, [x[key] for x in rs]) for key in ("final_loss", "token_acc", "seconds", "tokens_per_s")}
        rel = Timing("rel", [(x["final_loss"] - b["final_loss"]) / b["final_loss"] for x, b in zip(rs, base)])
        stt = ", ".join(str(x["steps_to_target"]) if x["steps_to_target"] else "not reached" for x in rs)
        out.append(f"| {k} | {med['final_loss'].median:.4f} | {100 * rel.median:+.2f}% ({100 * min(rel.runs):+.2f}% to "
                   f"{100 * max(rel.runs):+.2f}%) | {med['token_acc'].median:.3f} | {stt} | {med['tokens_per_s'].median:.0f} "
                   f"+-{100 * med['tokens_per_s'].spread:.0f}% | {med['seconds'].median:.1f} s |")
    losses = [x["final_loss"] for x in base]
    out += ["", f"FP32's final loss itself spans {100 * (max(losses) - min(losses)) / Timing('fp32', losses).median:.1f}% "
            "of its median across the seeds: read the paired differences against that run-to-run variation. "
            "BF16 on this CPU is slower than FP32 (no native bf16 matrix units; autocast adds casts); FP8 here is an "
            "emulation (quantise, dequantise, FP32 GEMM), so its time says nothing about FP8 hardware (see the GPU section)."]
    return out


def bench_parity() -> dict:
    from course_lib.deepseek.hf import to_hf
    from course_lib.deepseek.model import DeepSeekV3Mini, ModelConfig, init_weights

    out = {}
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        model = init_weights(DeepSeekV3Mini(ModelConfig()), seed=0).to(dtype).eval()
        hf = to_hf(model)
        ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
        with torch.no_grad():
            ours = model(ids)
            theirs = hf(ids).logits
        out[str(dtype).removeprefix("torch.")] = float((ours - theirs).abs().max())
    return out


def md_parity(r: dict) -> list[str]:
    return ["DeepSeekV3Mini vs HF transformers' `DeepseekV3ForCausalLM` on the same weights (default config, 2x16 tokens):", "",
            "| dtype | max abs logit difference |", "|---|---|"] + [f"| {k} | {v:.2e} |" for k, v in r.items() if not k.startswith("_")] + [
            "", "float64 is no closer than float32: HF computes the RoPE angles, RMSNorm, the router and the attention softmax "
            "in float32 whatever the model's dtype (tests/test_hf_parity.py lifts those upcasts and gets ~1e-14)."]


# ------------------------------------------------------------------------------------------ GPU


def md_gpu(r: dict | None) -> list[str]:
    if not r or not r.get("cuda"):
        return ["Not yet measured: run `make gpu-check` on a machine with an FP8-capable GPU (H100/H200); it writes "
                "bench/gpu_check.json, which this report folds in."]
    env = r.get("environment", {})
    out = [f"*Device: {env.get('device', '?')} (compute capability {env.get('capability')}), torch {env.get('torch')}, "
           f"CUDA {env.get('cuda_runtime')}. Rerun: `make gpu-check` (log: bench/gpu_check_log.txt).*", "",
           "TFLOP/s, median of CUDA-event timings with the candidates interleaved (speed-up over BF16 in brackets):", ""]
    rows = r.get("benchmarks", [])
    if rows:
        keys = list(rows[0]["tflops"])
        out += ["| M x K x N | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for row in rows:
            cells = []
            for k in keys:
                sp = row.get("speedup_vs_bf16", {}).get(k)
                cells.append(f"{row['tflops'][k]:.0f}" + (f" ({sp:.2f}x)" if sp else ""))
            out.append(f"| {'x'.join(str(d) for d in row['shape'])} | " + " | ".join(cells) + " |")
    summ = r.get("summary", {})
    if summ:
        out += ["", f"Course path (`{summ.get('course_recipe')}` scaling, DeepSeek-V3's 1x128 activation tiles and 128x128 weight "
                f"blocks): **{summ.get('course_speedup_8192', float('nan')):.2f}x BF16 at 8192^3** (target >= {summ.get('target')}x)."]
    checks = r.get("checks", [])
    if checks:
        out += ["", "| GPU check | status | result |", "|---|---|---|"]
        out += [f"| {c['name']} | {c['status']} | {str(c.get('message', '')).replace('|', chr(92) + '|')} |" for c in checks]
    return out


def md_gpu_e2e(r: dict | None) -> list[str]:
    import gpu_e2e

    return ["FP8Linear with the fused quantisers, a training step, MoE dispatch and MLA decode (`tools/gpu_e2e.py`, run by "
            "`make gpu-check`); median of CUDA-event timings with the candidates interleaved.", ""] + gpu_e2e.render_markdown(r)


SECTIONS: dict[str, tuple[str, Callable[[], dict], Callable[[dict], list[str]], str]] = {
    "course": ("Course: notebook execution and autograde time", bench_course, md_course, "python tools/bench_report.py --only course"),
    "mla": ("MLA: cache size, prefill and decode", bench_mla, md_mla, "python tools/bench_report.py --only mla"),
    "moe": ("MoE: dispatch strategies and HF transformers", bench_moe_rows, md_moe, "python tools/bench_report.py --only moe"),
    "fp8": ("FP8: quantisation error and accumulation precision (CPU emulation)", bench_fp8, md_fp8,
            "python tools/bench_report.py --only fp8"),
    "training": ("Training DeepSeekV3Mini: throughput, steps to target, precision impact", bench_training, md_training,
                 "python tools/bench_report.py --only training"),
    "parity": ("HF transformers parity", bench_parity, md_parity, "python tools/bench_report.py --only parity"),
}


def render(results: dict, gpu: dict | None) -> str:
    m = results.get("machine", machine())
    lines = ["# Benchmarks", "",
             "Generated by `make bench` (`tools/bench_report.py`); every number below comes from one run on the machine named in "
             "its section. Times are medians of several interleaved runs (warm-up first), with the spread as half the "
             "inter-quartile range; ratios compare candidates timed side by side in the same process.", ""]
    for key, (title, _, md, cmd) in SECTIONS.items():
        lines += [f"## {title}", ""]
        r = results.get(key)
        if r is None:
            lines += ["Not measured yet.", ""]
            continue
        mm = r.get("_machine", m)
        lines += [f"*Machine: {mm['cpu']}, {mm['cores']} cores, torch {mm['torch']}, {mm['date']}. Rerun: `{cmd}`.*", ""]
        lines += md(r) + [""]
    lines += ["## GPU: FP8 GEMM throughput (`make gpu-check`)", ""] + md_gpu(gpu) + [""]
    lines += ["## GPU: end to end (`make gpu-check`)", ""] + md_gpu_e2e(gpu)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(SECTIONS))
    ap.add_argument("--gpu", type=Path, default=ROOT / "bench" / "gpu_check.json")
    ap.add_argument("--render", action="store_true", help="measure nothing: rewrite BENCHMARKS.md from bench/results.json")
    ns = ap.parse_args(argv)
    OUT_DIR.mkdir(exist_ok=True)
    viz.set_style()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    todo = [] if ns.render else [s for s in ns.only.split(",") if s] or list(SECTIONS)
    for key in todo:
        title, fn, _, _ = SECTIONS[key]
        print(f"== {title}", flush=True)
        t0 = time.perf_counter()
        r = fn()
        r["_machine"] = machine()
        results[key] = r
        RESULTS.write_text(json.dumps(results, indent=1, default=str))
        print(f"   done in {time.perf_counter() - t0:.0f} s", flush=True)
    results["machine"] = machine()
    gpu = json.loads(ns.gpu.read_text()) if ns.gpu and ns.gpu.exists() else None
    REPORT.write_text(render(results, gpu))
    print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

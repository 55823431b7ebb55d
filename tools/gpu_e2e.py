"""End-to-end rows of `make gpu-check` (tools/gpu_check.py): what the course's FP8, MoE and MLA code gain on a GPU.

    quantiser_bits      fused Triton quantisers vs the plain-torch emulation: how often a code or scale differs
                        (correctly rounded and Triton's default division), and their time
    fp8_linear          FP8Linear forward + backward including every quantisation vs a BF16 nn.Linear
    training            a DeepSeekV3Mini of width 2048, FP8 vs BF16 autocast: step time and loss after the same steps
    moe_dispatch        E=256, top-8, 8 groups / 4 kept: grouped GEMMs vs the course's sorted dispatch vs the
                        per-expert loop vs HF's DeepseekV3MoE
    mla_decode          absorbed vs naive MLA decode at 4k-32k context

Each ``check_*`` takes a ``Ctx`` and returns ``(status, details)`` as gpu_check's checks do; ``Ctx.dry`` (the
CPU dry run of tests/test_gpu_check.py) shrinks every shape so the whole script is exercised without a GPU.
Timings are medians of interleaved runs (``Ctx.timer``: CUDA events on a GPU).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

NAMES = {
    "quantiser_bits": "fp8: fused quantisers vs emulation (bit differences)",
    "fp8_linear": "fp8: FP8Linear fwd+bwd incl. quantisation vs bf16 nn.Linear",
    "training": "model: DeepSeekV3Mini width 2048 training step, FP8 vs BF16",
    "moe_dispatch": "moe: dispatch E=256 top-8, grouped vs loop vs HF",
    "mla_decode": "mla: absorbed vs naive decode, 4k-32k context",
}
TARGETS = {"fp8_linear": 1.3, "moe_dispatch": 3.0, "training_loss_rel": 0.005}


@dataclass
class Ctx:
    dev: torch.device
    timer: Callable[[dict[str, Callable[[], object]], int, int], dict[str, float]]  # (fns, reps, warmup) -> median ms each
    reps: int
    dry: bool  # CPU dry run: tiny shapes, statuses say only that the code ran

    def time(self, fns: dict[str, Callable[[], object]], reps: int | None = None) -> dict[str, float]:
        """Median ms per candidate, interleaved (the dry run: one warm-up, ``reps`` capped at 2)."""
        reps = reps or self.reps
        return self.timer(fns, min(reps, 2), 1) if self.dry else self.timer(fns, reps, 5)

    def gen(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.dev).manual_seed(seed)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def free(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- fused quantisers


def _diff_rate(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> dict:
    from course_lib.deepseek.fp8_fused import code_differences

    (gq, gs), (wq, ws) = got, want
    codes = int(code_differences(gq, wq).sum())
    scales = int(((gs != ws) & ~(gs.isnan() & ws.isnan())).sum())
    return {"codes_differing": codes, "code_rate": codes / max(1, gq.numel()), "scales_differing": scales, "n_codes": gq.numel()}


def check_quantiser_bits(ctx: Ctx, fp8, fused) -> tuple[str, dict]:
    """Codes and scales of the fused kernels vs ``fp8.quantize_tiles``/``quantize_blocks`` on the same device."""
    if not fused.supports(torch.empty(1, device=ctx.dev)):
        return "skip", {"message": f"fused quantisers unavailable on {ctx.dev} (Triton missing or in the wrong mode)"}
    M, K = (32, 256) if ctx.dry else (8192, 7168)
    g = ctx.gen(10)
    x = torch.randn(M, K, device=ctx.dev, generator=g) * torch.logspace(-2, 2, K, device=ctx.dev)
    x[0] = 0.0
    w = torch.randn(K // 2, K, device=ctx.dev, generator=g) / math.sqrt(K)
    xb = x.to(torch.bfloat16)
    xq, xs = fp8.quantize_tiles(x)
    cases = {
        "tiles fp32": (lambda p: fused.quantize_tiles_fused(x, precise=p), lambda: fp8.quantize_tiles(x)),
        "tiles bf16": (lambda p: fused.quantize_tiles_fused(xb, precise=p), lambda: fp8.quantize_tiles(xb)),
        "tiles of x^T (Wgrad dy^T)": (lambda p: fused.quantize_tiles_fused(x.t(), precise=p), lambda: fp8.quantize_tiles(x.t())),
        "blocks": (lambda p: fused.quantize_blocks_fused(w, precise=p), lambda: fp8.quantize_blocks(w)),
        "re-tiled FP8 x^T": (lambda p: fused.requantize_tiles_t_fused(xq, xs, precise=p),
                             lambda: fp8.quantize_tiles(fp8.dequantize(xq, xs).t())),
    }
    rows = {}
    worst_precise = 0
    for name, (fused_fn, emu_fn) in cases.items():
        want = emu_fn()
        row = {"precise_div": _diff_rate(fused_fn(True), want), "fast_div": _diff_rate(fused_fn(False), want)}
        worst_precise = max(worst_precise, row["precise_div"]["codes_differing"] + row["precise_div"]["scales_differing"])
        if name in ("tiles bf16", "blocks"):
            ms = ctx.time({"fused": lambda f=fused_fn: f(True), "torch": emu_fn}, max(3, ctx.reps // 2))
            row["ms"] = ms
            row["speedup"] = ms["torch"] / ms["fused"]
        rows[name] = row
        del want
    fast = max(r["fast_div"]["code_rate"] for r in rows.values())
    sp = {k: r["speedup"] for k, r in rows.items() if "speedup" in r}
    msg = (f"div_rn: {worst_precise} codes/scales differ; default '/': worst code rate {fast:.2e}; "
           f"fused vs torch quantiser " + ", ".join(f"{k} {v:.1f}x" for k, v in sp.items()))
    return ("ok" if worst_precise == 0 else "fail"), {"message": msg, "shape": [M, K], "cases": rows}


# ----------------------------------------------------------------------------- FP8Linear end to end


def check_fp8_linear(ctx: Ctx, fp8) -> tuple[str, dict]:
    """Forward + backward of one layer, tokens 8192: BF16 nn.Linear vs FP8Linear (fused quantisers, weight
    re-quantised every call = one micro-batch per step; cached = several micro-batches per step) vs FP8Linear
    with the plain-torch quantisers."""
    shapes = [(128, 256, 128)] if ctx.dry else [(8192, 7168, 2048), (8192, 2048, 7168), (8192, 7168, 18432), (8192, 8192, 8192)]
    rows = []
    for M, K, N in shapes:
        rows.append(_linear_row(ctx, fp8, M, K, N))
        ctx.free()
    big = rows[-1]["speedup_vs_bf16"]["fp8_fused"]
    ok = ctx.dry or big >= TARGETS["fp8_linear"]
    msg = (f"{'x'.join(map(str, rows[-1]['shape']))}: FP8Linear fwd+bwd incl. all quantisation {big:.2f}x BF16 "
           f"(target >= {TARGETS['fp8_linear']}x); " + "; ".join(
               f"{'x'.join(map(str, r['shape']))} {r['speedup_vs_bf16']['fp8_fused']:.2f}x" for r in rows[:-1]))
    return ("ok" if ok else "fail"), {"message": msg, "rows": rows, "target": TARGETS["fp8_linear"]}


def _linear_row(ctx: Ctx, fp8, M: int, K: int, N: int) -> dict:
    g = ctx.gen(11)
    with torch.device(ctx.dev):  # from_linear builds a new module: on the device, not on the CPU
        lin = torch.nn.Linear(K, N, bias=False)
        f8 = fp8.FP8Linear.from_linear(lin, recipe="blockwise")
    assert f8.weight.device.type == ctx.dev.type
    b16 = lin.to(torch.bfloat16)
    x = (torch.randn(M, K, device=ctx.dev, generator=g)).to(torch.bfloat16).requires_grad_()
    gy = torch.randn(M, N, device=ctx.dev, generator=g).to(torch.bfloat16)
    fused_mode = "always" if ctx.dry else "auto"  # the dry run takes the kernels through Triton's interpreter

    def step(layer, requant: bool = False, fused: str = fused_mode):
        def run():
            x.grad = None
            layer.weight.grad = None
            if requant:
                layer.invalidate_weight_cache()
            old = fp8.set_fused_quantisers(fused)
            try:
                layer(x).backward(gy)
            finally:
                fp8.set_fused_quantisers(old)
        return run

    fns = {"bf16": step(b16), "fp8_fused": step(f8, requant=True), "fp8_fused_cached_weight": step(f8),
           "fp8_torch_quantisers": step(f8, requant=True, fused="never")}
    with torch.no_grad():
        err = _rel(f8(x), b16(x))
    ms = ctx.time(fns, ctx.reps)
    return {"shape": [M, K, N], "ms": ms, "speedup_vs_bf16": {k: ms["bf16"] / v for k, v in ms.items() if k != "bf16"},
            "fp8_vs_bf16_rel_err": err}


# ----------------------------------------------------------------------------- training


def training_config(vocab_size: int, dry: bool):
    """Width 2048 with every GEMM shape _scaled_mm's block-wise recipe accepts (N % 128, K % 512); dense FFNs,
    since an MoE expert's ragged token count would send its GEMMs to the emulation; no MTP block (its FFN would be an MoE)."""
    from course_lib.deepseek.model import ModelConfig

    if dry:
        return ModelConfig(vocab_size=vocab_size)
    return ModelConfig(vocab_size=vocab_size, dim=2048, n_layers=4, n_dense_layers=4, mtp_depth=0, n_heads=16, inter_dim=5632,
                       q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=128, v_head_dim=128,
                       max_seq_len=64)


def check_training(ctx: Ctx, fp8) -> tuple[str, dict]:
    """Both models from the same initial weights, the same batches, the steps interleaved; BF16 = autocast."""
    import dataclasses

    from course_lib.data import MultiTaskLanguage
    from course_lib.deepseek.model import DeepSeekV3Mini, init_weights, train_step

    data = MultiTaskLanguage(n_digits=4)
    cfg = training_config(data.vocab_size, ctx.dry)
    steps, batch = (2, 8) if ctx.dry else (40, 512)
    models, opts, gens, losses, times = {}, {}, {}, {}, {}
    for name, kw in (("bf16", {}), ("fp8", {"fp8": True})):
        torch.manual_seed(0)
        m = init_weights(DeepSeekV3Mini(dataclasses.replace(cfg, **kw)), seed=0, std=0.02).to(ctx.dev)
        models[name], opts[name] = m, torch.optim.AdamW(m.parameters(), lr=1e-3)
        gens[name], losses[name], times[name] = torch.Generator().manual_seed(1), [], []
    fallbacks_before = len(fp8.CUDA_FALLBACKS)
    for i in range(steps):
        for name, m in models.items():
            b = data.sample(batch, generator=gens[name])
            inp, tgt = b.inputs.to(ctx.dev), b.targets.to(ctx.dev)
            ctx.sync()
            t0 = time.perf_counter()
            st = train_step(m, opts[name], inp, tgt, amp_dtype=torch.bfloat16)
            ctx.sync()
            if i >= min(5, steps - 1):
                times[name].append(1e3 * (time.perf_counter() - t0))
            losses[name].append(st.loss)
    tail = max(1, min(5, steps))
    final = {k: statistics.fmean(v[-tail:]) for k, v in losses.items()}
    rel = (final["fp8"] - final["bf16"]) / final["bf16"]
    ms = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in models["bf16"].parameters())
    details = {"config": {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "inter_dim", "kv_lora_rank")},
               "params": n_params, "steps": steps, "batch": batch, "tokens_per_step": batch * data.block_size,
               "step_ms": ms, "speedup": ms["bf16"] / ms["fp8"], "losses": losses, "final_loss": final, "loss_rel": rel,
               "emulated_gemm_shapes": len(fp8.CUDA_FALLBACKS) - fallbacks_before}
    ok = ctx.dry or abs(rel) <= TARGETS["training_loss_rel"]
    details["message"] = (f"{n_params / 1e6:.0f}M params, step {ms['fp8']:.1f} ms FP8 vs {ms['bf16']:.1f} ms BF16 "
                          f"({details['speedup']:.2f}x); loss after {steps} steps {final['fp8']:.4f} vs {final['bf16']:.4f} "
                          f"({100 * rel:+.2f}%, target within {100 * TARGETS['training_loss_rel']:.1f}%)")
    return ("ok" if ok else "fail"), details


# ----------------------------------------------------------------------------- MoE dispatch


def check_moe_dispatch(ctx: Ctx) -> tuple[str, dict]:
    from course_lib.deepseek import moe as moe_mod

    if ctx.dry:
        n_tok, E, k, groups, kept, dim, inter = 32, 8, 2, 4, 2, 32, 16
    else:
        n_tok, E, k, groups, kept, dim, inter = 8192, 256, 8, 8, 4, 2048, 1024
    dtype = torch.bfloat16 if ctx.dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = moe_mod.MoEConfig(dim=dim, moe_inter_dim=inter, n_routed_experts=E, n_shared_experts=1, n_activated_experts=k,
                            n_expert_groups=groups, n_limited_groups=kept, seq_aux_alpha=0.0)
    with torch.device(ctx.dev):  # initialise on the device: 256 experts of 2048x1024 are slow to build on a CPU
        m = moe_mod.MoE(cfg).eval()
    with torch.no_grad():
        m.gate.bias.normal_(0.0, 0.01)
    m = m.to(dtype)
    x = torch.randn(n_tok, dim, device=ctx.dev, generator=ctx.gen(12)).to(dtype)
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "per_expert_loop": lambda: m.routed(x, "per_expert") + m.shared_experts(x),
        "sorted": lambda: m.routed(x, "sorted") + m.shared_experts(x),
    }
    notes = {}
    if hasattr(torch, "_grouped_mm"):
        stacked = moe_mod.stack_experts(m.experts)

        def grouped():
            w, i, _ = m.gate(x)
            return moe_mod.dispatch_grouped(stacked, x, w, i) + m.shared_experts(x)

        fns["grouped_mm"] = grouped
    for impl in ("eager", "grouped_mm"):
        try:  # transformers may be missing on a GPU machine that brings its own torch: the other rows still run
            from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

            with torch.device(ctx.dev):
                h = DeepseekV3MoE(moe_mod.hf_config(cfg, experts_implementation=impl)).eval().to(dtype)
            with torch.no_grad():
                moe_mod.load_into_hf(m, h)
            fns[f"hf_{impl}"] = lambda h=h: h(x.unsqueeze(0)).squeeze(0)
        except Exception as e:  # noqa: BLE001 - a missing HF path is reported, the others still run
            notes[f"hf_{impl}"] = f"{type(e).__name__}: {str(e)[:160]}"
    with torch.inference_mode():
        ref = fns["per_expert_loop"]()
        diffs = {}
        for name in list(fns):
            try:
                diffs[name] = _rel(fns[name](), ref)
            except Exception as e:  # noqa: BLE001
                notes[name] = f"{type(e).__name__}: {str(e)[:160]}"
                del fns[name]
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        agree = {n: d <= tol for n, d in diffs.items()}
        ms = ctx.time({n: f for n, f in fns.items() if agree[n]}, max(3, ctx.reps // 2))
    speed = {n: ms["per_expert_loop"] / v for n, v in ms.items() if n != "per_expert_loop"}
    best = max((speed.get(n, 0.0) for n in ("grouped_mm", "sorted")), default=0.0)
    ok = all(agree.values()) and (ctx.dry or best >= TARGETS["moe_dispatch"])
    msg = (f"{n_tok} tokens, E={E}, top-{k}, dim {dim}, expert width {inter}, {str(dtype).removeprefix('torch.')}: "
           + ", ".join(f"{n} {v:.2f}x" for n, v in speed.items()) + f" the per-expert loop (target >= {TARGETS['moe_dispatch']}x)")
    return ("ok" if ok else "fail"), {"message": msg, "config": {"n_tokens": n_tok, "n_experts": E, "top_k": k, "n_groups": groups,
                                                                  "n_limited_groups": kept, "dim": dim, "inter_dim": inter},
                                      "ms": ms, "speedup_vs_loop": speed, "rel_diff_vs_loop": diffs, "agree": agree, "notes": notes}


# ----------------------------------------------------------------------------- MLA decode


def check_mla_decode(ctx: Ctx) -> tuple[str, dict]:
    from course_lib.deepseek.mla import MLA, MLAConfig

    contexts = (64, 128) if ctx.dry else (4096, 8192, 16384, 32768)
    batch = 2 if ctx.dry else 4
    dtype = torch.bfloat16 if ctx.dev.type == "cuda" else torch.float32
    if ctx.dry:
        cfg = MLAConfig(dim=64, n_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, max_seq_len=max(contexts) + 8, rope_scaling="none")
    else:  # V3's per-head sizes, 16 heads
        cfg = MLAConfig(dim=2048, n_heads=16, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, max_seq_len=max(contexts) + 8, rope_scaling="none")
    torch.manual_seed(0)
    mla = MLA(cfg).eval().to(ctx.dev, dtype)
    chunk = 32 if ctx.dry else 1024
    rows = []
    g = ctx.gen(13)
    with torch.inference_mode():
        cache = mla.new_cache(batch=batch, kind="latent")
        filled = 0
        for T in contexts:
            while filled < T:  # chunked prefill: the absorbed path never materialises per-head K and V
                n = min(chunk, T - filled)
                mla(torch.randn(batch, n, cfg.dim, device=ctx.dev, generator=g).to(dtype), filled, cache, absorb=True)
                filled += n
            tok = torch.randn(batch, 1, cfg.dim, device=ctx.dev, generator=g).to(dtype)
            y_n = mla(tok, T, cache, absorb=False)  # decode writes position T; both paths write the same latent
            y_a = mla(tok, T, cache, absorb=True)
            ms = ctx.time({"naive": lambda T=T, tok=tok: mla(tok, T, cache, absorb=False),
                            "absorbed": lambda T=T, tok=tok: mla(tok, T, cache, absorb=True)}, ctx.reps)
            rows.append({"T": T, "ms": ms, "naive_over_absorbed": ms["naive"] / ms["absorbed"], "rel_diff": _rel(y_a, y_n)})
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    ok = all(r["rel_diff"] <= tol for r in rows)
    msg = f"batch {batch}, {str(dtype).removeprefix('torch.')}: naive / absorbed " + ", ".join(
        f"{r['T']}: {r['naive_over_absorbed']:.1f}x" for r in rows)
    return ("ok" if ok else "fail"), {"message": msg, "batch": batch, "dtype": str(dtype), "rows": rows,
                                      "config": {k: getattr(cfg, k) for k in ("dim", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                                                                              "qk_rope_head_dim", "v_head_dim")}}


# ----------------------------------------------------------------------------- BENCHMARKS.md


def _shape(s) -> str:
    return "x".join(str(d) for d in s)


def _md_quantiser(c: dict) -> list[str]:
    out = [f"Fused Triton quantisers vs the plain-torch emulation on the same device, {_shape(c['shape'])} activations: "
           "codes (bytes) and scales that differ, with the correctly rounded division (`div_rn`) and Triton's default `/`.", "",
           "| case | codes differing, div_rn | scales differing, div_rn | code rate, default / | fused vs torch quantiser |",
           "|---|---|---|---|---|"]
    for name, r in c["cases"].items():
        p, f = r["precise_div"], r["fast_div"]
        sp = f"{r['speedup']:.1f}x ({r['ms']['fused']:.3g} vs {r['ms']['torch']:.3g} ms)" if "speedup" in r else "-"
        out.append(f"| {name} | {p['codes_differing']} of {p['n_codes']} | {p['scales_differing']} | {f['code_rate']:.2e} | {sp} |")
    return out


def _md_linear(c: dict) -> list[str]:
    out = ["FP8Linear forward + backward on 8192 tokens (bf16 activations and gradients, FP32 master weight) vs a BF16 "
           "`nn.Linear`: *fused* re-quantises the weight every call (all quantisation included), *cached weight* once per "
           "step shared by several micro-batches, *torch quantisers* the plain-torch quantisers "
           f"(target: fused >= {c.get('target', TARGETS['fp8_linear'])}x at 8192^3).", "",
           "| tokens x in x out | BF16 | FP8 fused | FP8 cached weight | FP8 torch quantisers | rel. diff vs BF16 |",
           "|---|---|---|---|---|---|"]
    for r in c["rows"]:
        ms, sp = r["ms"], r["speedup_vs_bf16"]
        cells = [f"{ms[k]:.3g} ms (**{sp[k]:.2f}x**)" if k == "fp8_fused" else f"{ms[k]:.3g} ms ({sp[k]:.2f}x)"
                 for k in ("fp8_fused", "fp8_fused_cached_weight", "fp8_torch_quantisers")]
        out.append(f"| {_shape(r['shape'])} | {ms['bf16']:.3g} ms | " + " | ".join(cells) + f" | {r['fp8_vs_bf16_rel_err']:.1e} |")
    return out


def _md_training(c: dict) -> list[str]:
    cfg = ", ".join(f"{k} {v}" for k, v in c["config"].items())
    return [f"DeepSeekV3Mini ({cfg}; {c['params'] / 1e6:.0f}M parameters, dense FFNs), AdamW, the same initial weights, "
            f"batches and seed for both, {c['steps']} steps of {c['tokens_per_step']} tokens, steps interleaved; BF16 = autocast, "
            "FP8 = every block linear an FP8Linear under the same autocast.", "",
            "| precision | step time (median) | speed-up | loss, mean of the last 5 steps | rel. vs BF16 |", "|---|---|---|---|---|",
            f"| bf16 | {c['step_ms']['bf16']:.1f} ms | - | {c['final_loss']['bf16']:.4f} | - |",
            f"| fp8 | {c['step_ms']['fp8']:.1f} ms | **{c['speedup']:.2f}x** | {c['final_loss']['fp8']:.4f} | "
            f"{100 * c['loss_rel']:+.2f}% (target within {100 * TARGETS['training_loss_rel']:.1f}%) |",
            "", f"GEMM shapes that fell back to the emulation: {c['emulated_gemm_shapes']}."]


def _md_moe(c: dict) -> list[str]:
    k = c["config"]
    out = [f"{k['n_tokens']} tokens, E={k['n_experts']}, top-{k['top_k']}, {k['n_groups']} groups / {k['n_limited_groups']} kept, "
           f"dim {k['dim']}, expert width {k['inter_dim']}, 1 shared expert; the full layer (gate, routed and shared experts) "
           f"(target: >= {TARGETS['moe_dispatch']}x the per-expert loop).", "",
           "| implementation | median | vs per-expert loop | rel. diff vs loop |", "|---|---|---|---|"]
    for name, ms in c["ms"].items():
        sp = c["speedup_vs_loop"].get(name)
        out.append(f"| {name} | {ms:.3g} ms | {f'{sp:.2f}x' if sp else '-'} | {c['rel_diff_vs_loop'].get(name, 0.0):.1e} |")
    out += [f"| {name} | not run: {why} | | |" for name, why in c.get("notes", {}).items()]
    return out


def _md_mla(c: dict) -> list[str]:
    out = [f"One decode step, batch {c['batch']}, {c['dtype'].removeprefix('torch.')}, config {c['config']}; the latent cache "
           "filled by chunked prefill.", "", "| context | naive | absorbed | naive / absorbed | rel. diff |", "|---|---|---|---|---|"]
    out += [f"| {r['T']} | {r['ms']['naive']:.3g} ms | {r['ms']['absorbed']:.3g} ms | **{r['naive_over_absorbed']:.1f}x** | "
            f"{r['rel_diff']:.1e} |" for r in c["rows"]]
    return out


RENDER = {"quantiser_bits": _md_quantiser, "fp8_linear": _md_linear, "training": _md_training, "moe_dispatch": _md_moe,
          "mla_decode": _md_mla}
TITLES = {"quantiser_bits": "Fused FP8 quantisers: bit differences from the emulation", "fp8_linear": "FP8Linear end to end",
          "training": "Training step, width 2048: FP8 vs BF16", "moe_dispatch": "MoE dispatch at DeepSeek-V3's routing",
          "mla_decode": "MLA decode at long context"}


def render_markdown(gpu: dict | None) -> list[str]:
    """The end-to-end GPU rows of BENCHMARKS.md from gpu_check.json; a row without GPU data says so."""
    checks = {c["name"]: c for c in (gpu or {}).get("checks", [])}
    env = (gpu or {}).get("environment", {})
    measured = bool(gpu and gpu.get("cuda") and not gpu.get("dry_run_cpu"))
    where = f"{env.get('device', '?')}, torch {env.get('torch')}" if measured else "CPU dry run" if gpu else "no device"
    out = []
    for key, title in TITLES.items():
        out += [f"### {title}", ""]
        c = checks.get(NAMES[key])
        if c is None or c.get("status") not in ("ok", "fail"):
            out += ["Not measured yet: run `make gpu-check` on an FP8-capable GPU (H100/H200)."
                    + (f" Last run: {c['status']}: {c.get('message', '')}" if c else ""), ""]
            continue
        out += [f"*Device: {where}; check status: {c['status']}.*", ""] + RENDER[key](c) + [""]
    return out

"""Benchmark: UNet forward time per frame and peak memory, Tune-A-Video patch (each mode) vs unpatched.

Random-weight SD1.5 UNet architecture (full size unless --reduced), one conditioning, latents of
--size x --size (default 32x32), clips of F frames. Each configuration runs in its own process so
peak memory is its own. Prints a table; the numbers are measurements, not assertions.

    .venv/bin/python scripts/benchmarks/benchmark_attention.py [--frames 8 16 32] [--reduced] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)
import comfy_runtime  # noqa: E402
from random_models import random_unet as build_model  # noqa: E402

def best_time(fn, repeats: int, clock=time.process_time) -> float:
    """Seconds of fn's fastest run of `repeats`, after one warm-up run. CPU time by default: comparable
    on a loaded machine where wall time is not."""
    fn()
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return min(times)


def run_one(mode: str, frames: int, size: int, reduced: bool, device: str, repeats: int) -> dict:
    """In a child process: time one forward of a clip (the way samplers call the model)."""
    os.environ["TAV_DEVICE"] = device
    comfy_runtime.import_comfy()
    import uuid

    import torch
    import comfy.conds
    import comfy.model_management
    import comfy.samplers

    pack = comfy_runtime.load_pack()
    unet_patch = sys.modules[pack.__name__ + ".attention_patches.unet_patch"]
    model = build_model(reduced, device)
    if mode != "unpatched":
        model = unet_patch.apply_tav(model, unet_patch.TAVConfig(mode, 2, True, True))
    x = torch.randn(frames, 4, size, size)
    ctx = torch.randn(1, 77, 768)
    comfy.model_management.load_models_gpu([model])
    model.pre_run()
    options = comfy_runtime.sampler_options(model)
    conds = [[{"model_conds": {"c_crossattn": comfy.conds.CONDCrossAttn(ctx)}, "uuid": uuid.uuid4()}]]
    ts = torch.full((frames,), 5.0)
    x = x.to(model.load_device)

    def forward():
        with torch.no_grad():
            out = comfy.samplers.calc_cond_batch(model.model, conds, x, ts.to(x.device), options)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    else:
        import psutil
        base_mem = psutil.Process().memory_info().rss
    seconds = best_time(forward, repeats, time.perf_counter)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_mem  # RSS above the loaded model
    return {"mode": mode, "frames": frames, "s_per_frame": seconds / frames,
            "peak_mib": peak / 2**20, "attention": comfy_attention_name()}


def comfy_attention_name() -> str:
    import comfy.ldm.modules.attention as a
    return a.optimized_attention.__name__


def micro(frames: int, tokens: int, channels: int, heads: int, repeats: int, threads: int | None = None,
          modes=("sparse_causal", "first_frame", "causal", "window", "full")) -> list[dict]:
    """Attention alone, in this process: frame_attention per mode vs per-frame self-attention (the
    unpatched model's attn1), ComfyUI's optimized_attention, q/k/v of (frames, tokens, channels).
    Best-of-repeats milliseconds of a forward (no grad) and of forward + backward."""
    comfy_runtime.import_comfy()
    import torch
    import comfy.ldm.modules.attention as comfy_attention

    if threads:
        torch.set_num_threads(threads)
    import importlib
    fa = importlib.import_module(comfy_runtime.load_pack().__name__ + ".attention_patches.frame_attention")
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(frames, tokens, channels, generator=g) for _ in range(3)]
    positions = tuple(range(frames))

    def call(mode, q, k, v):
        if mode == "per_frame":
            return comfy_attention.optimized_attention(q, k, v, heads)
        return fa.frame_attention(q, k, v, heads, 1, positions, mode)

    rows = []
    for mode in ("per_frame",) + tuple(modes):
        def forward():
            with torch.no_grad():
                call(mode, *qkv)

        def backward():
            leaves = [t.clone().requires_grad_(True) for t in qkv]
            call(mode, *leaves).sum().backward()
        rows.append({"mode": mode, "fwd_ms": 1000 * best_time(forward, repeats),
                     "fwdbwd_ms": 1000 * best_time(backward, repeats)})
    return rows


def micro_table(rows: list[dict], frames: int, tokens: int) -> list[str]:
    base = rows[0]
    lines = [f"# attention alone, F={frames}, {tokens} tokens/frame: ms, and / per-frame self-attention",
             f"{'mode':14s} {'fwd ms':>8s} {'x':>5s} {'fwd+bwd ms':>10s} {'x':>5s}"]
    for r in rows:
        lines.append(f"{r['mode']:14s} {r['fwd_ms']:8.1f} {r['fwd_ms'] / base['fwd_ms']:5.2f} "
                     f"{r['fwdbwd_ms']:10.1f} {r['fwdbwd_ms'] / base['fwdbwd_ms']:5.2f}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--modes", nargs="+", default=["unpatched", "sparse_causal", "first_frame", "causal", "window", "full"])
    ap.add_argument("--size", type=int, default=32, help="latent height/width")
    ap.add_argument("--reduced", action="store_true", help="the small test UNet instead of full SD1.5")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, frames = args.child.split(":")
        print(json.dumps(run_one(mode, int(frames), args.size, args.reduced, args.device, args.repeats)))
        return 0

    arch = "reduced SD1.5 UNet" if args.reduced else "SD1.5 UNet (860M)"
    print(f"# {arch}, random weights, {args.size}x{args.size} latents, device={args.device}")
    results = {}
    for frames in args.frames:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", f"{mode}:{frames}", "--size", str(args.size),
                   "--device", args.device, "--repeats", str(args.repeats)] + (["--reduced"] if args.reduced else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{mode} F={frames}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[(mode, frames)] = r
            print(f"F={frames:3d} {mode:14s} {r['s_per_frame'] * 1000:9.1f} ms/frame  peak {r['peak_mib']:8.0f} MiB"
                  f"  ({r['attention']})", flush=True)
    print("\n# ratios")
    for frames in args.frames:
        base = results.get(("unpatched", frames))
        for mode in args.modes[1:]:
            r = results.get((mode, frames))
            if base and r:
                print(f"F={frames:3d} {mode:14s} time / unpatched = {r['s_per_frame'] / base['s_per_frame']:.2f}")
    for mode in args.modes:
        for f1, f2 in zip(args.frames, args.frames[1:]):
            a, b = results.get((mode, f1)), results.get((mode, f2))
            if a and b:
                ratio = (b["s_per_frame"] * f2) / (a["s_per_frame"] * f1)
                print(f"{mode:14s} time(F={f2}) / time(F={f1}) = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

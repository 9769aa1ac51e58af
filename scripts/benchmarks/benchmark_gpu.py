"""scripts/benchmarks/ -- speed and memory, measured and printed (never asserted): this GPU table, the
CPU table (benchmark_cpu.py), attention (benchmark_attention.py, whose build_model the others share), long
clips (benchmark_long_clip.py) and tuning (benchmark_tuning.py); docs/benchmarks.md keeps the numbers.

Benchmark on an NVIDIA GPU, one table: tuning, invert + sample, attention backends.

Random-weight SD1.5 UNet (full layout, 860 M, fp16 weights as a checkpoint loads them), a clip of
--frames frames at --size x --size latents (24 x 64x64 = 512x512 pixels), in this one process (peak
memory is reset between rows):
  tune          One-Shot Tune (trainable tune_a_video), bf16 and fp16 autocast, gradient checkpointing
                on and off: seconds per step (median of --steps after one warm-up), extrapolated to
                500 steps; peak allocated VRAM (weights included)
  invert+sample Tune-A-Video Invert (--sample-steps, DDIM) then the Sampler from the inverted latents
                (same steps, cfg 12.5, cond and uncond in one batch), TAV's defaults, fp16
  attention     frame attention (sparse_causal) of the first UNet level with cond and uncond, per
                backend: SDPA, xformers where installed; and the unpatched model's per-frame attention
Targets (H100): 500 steps <= 90 s, peak <= 12 GiB, invert + sample <= 10 s. --dry-run runs the same
code on the CPU at tiny sizes (the tests' tiny UNet, 2 frames of 8x8, 2 steps) so CI keeps it working; its
numbers mean nothing. Numbers are measurements, not assertions.

    scripts/benchmarks/benchmark_gpu.sh              # on a GPU machine, <= 8 min
    scripts/benchmarks/benchmark_gpu.sh --dry-run    # anywhere, seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)
import comfy_runtime  # noqa: E402

COLUMNS = ("row", "dtype", "ckpt", "ms each", "total", "unit", "peak MiB", "target")
TUNE_TARGET = "<= 90 s, <= 12288 MiB"


class Meter:
    """Wall time (synchronised) and peak memory: CUDA allocator on a GPU, process RSS (VmHWM) on the CPU."""

    def __init__(self, device):
        import torch
        self.torch, self.cuda = torch, device == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset(self):
        self.sync()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def peak_mib(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**20
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return math.nan


def row(name, dtype, ckpt, ms_each, total, unit, peak, target="") -> dict:
    return dict(zip(COLUMNS, (name, dtype, ckpt, ms_each, total, unit, peak, target)))


def is_oom(error: BaseException) -> bool:
    return "out of memory" in str(error).lower() or "can't allocate memory" in str(error)


def bench_tune(pack, model, latent, positive, args, meter) -> list[dict]:
    import torch
    ost = sys.modules[pack.__name__ + ".sampling.one_shot_tuning"]
    rows = []
    for precision in args.precisions:
        for ckpt in ("on", "off"):
            meter.reset()
            stamps = []

            def stamp(*_):
                meter.sync()
                stamps.append(time.perf_counter())
            try:
                with torch.inference_mode():
                    ost.tune_clip(model, latent, positive, steps=args.steps + 1, learning_rate=3e-5, seed=0,
                                  precision=precision, gradient_checkpointing=ckpt == "on", callback=stamp)
                each = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
                rows.append(row("tune", precision, ckpt, 1000 * each, 500 * each, "s/500 steps", meter.peak_mib(),
                                TUNE_TARGET))
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_oom(e):
                    raise
                rows.append(row("tune (OOM)", precision, ckpt, math.nan, math.nan, "s/500 steps", meter.peak_mib(),
                                TUNE_TARGET))
    return rows


def bench_invert_sample(pack, model, latent, positive, negative, args, meter) -> dict:
    import torch
    vs = sys.modules[pack.__name__ + ".sampling.video_sampler"]
    up = sys.modules[pack.__name__ + ".attention_patches.unet_patch"]
    with torch.inference_mode():
        patched = up.apply_tav(model, up.TAVConfig())
        vs.sample_clip(patched, positive, negative, latent, steps=1, cfg=12.5)  # warm-up: load, kernels
        meter.reset()
        start = time.perf_counter()
        inverted = vs.invert_clip(patched, latent, negative, steps=args.sample_steps)
        vs.sample_clip(patched, positive, negative, inverted, steps=args.sample_steps, cfg=12.5)
        meter.sync()
        total = time.perf_counter() - start
    steps = 2 * args.sample_steps
    dtype = "fp16" if meter.cuda else "fp32"
    return row(f"invert {args.sample_steps} + sample {args.sample_steps} (cfg)", dtype, "-", 1000 * total / steps,
               total, "s", meter.peak_mib(), "<= 10 s")


def bench_attention(pack, args, meter) -> list[dict]:
    """frame_attention at the first UNet level (size^2 tokens, 320 channels, 8 heads), cond + uncond."""
    import importlib

    import torch
    import comfy.ldm.modules.attention as comfy_attention
    fa = importlib.import_module(pack.__name__ + ".attention_patches.frame_attention")
    backends = {"sdpa": comfy_attention.attention_pytorch}
    if getattr(comfy_attention, "xformers", None) is not None:  # installed and enabled in ComfyUI
        backends["xformers"] = comfy_attention.attention_xformers
    device = "cuda" if meter.cuda else "cpu"
    dtype = torch.float16 if meter.cuda else torch.float32
    short = "fp16" if meter.cuda else "fp32"
    chunks, frames, tokens = 2, args.frames, args.size * args.size
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(chunks * frames, tokens, 320, generator=g, device=device, dtype=dtype) for _ in range(3))
    positions = tuple(range(frames))
    rows = []
    for name, attention in backends.items():
        def timed(fn, repeats=args.attention_repeats):
            fn()
            meter.reset()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            meter.sync()
            return (time.perf_counter() - start) / repeats
        with torch.inference_mode():
            base = timed(lambda: attention(q, k, v, 8))
            rows.append(row(f"attention {name} per-frame (unpatched)", short, "-", 1000 * base, 1.0,
                            "x per-frame", meter.peak_mib()))
            for mode in ("sparse_causal", "causal"):
                t = timed(lambda: fa.frame_attention(q, k, v, 8, chunks, positions, mode, attention=attention))
                rows.append(row(f"attention {name} {mode}", short, "-", 1000 * t, t / base, "x per-frame",
                                meter.peak_mib()))
    return rows


def markdown(rows: list[dict], header: str) -> str:
    def cell(value):
        return f"{value:.1f}" if isinstance(value, float) and value >= 10 else \
            f"{value:.2f}" if isinstance(value, float) else str(value)
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script, not the GPU")
    ap.add_argument("--frames", type=int, help="frames per clip (default 24; dry run 2)")
    ap.add_argument("--size", type=int, help="latent height/width (default 64 = 512 px; dry run 8)")
    ap.add_argument("--steps", type=int, help="timed tuning steps per row after one warm-up (default 6; dry 1)")
    ap.add_argument("--sample-steps", type=int, help="inversion and sampling steps (default 50; dry run 2)")
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--attention-repeats", type=int, default=None)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.frames = args.frames or (2 if dry else 24)
    args.size = args.size or (8 if dry else 64)
    args.steps = args.steps or (1 if dry else 6)
    args.sample_steps = args.sample_steps or (2 if dry else 50)
    args.attention_repeats = args.attention_repeats or (1 if dry else 20)
    device = "cpu" if dry else "cuda"
    os.environ["TAV_DEVICE"] = device
    comfy_runtime.import_comfy()
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: run on a machine with an NVIDIA GPU, or use --dry-run.", file=sys.stderr)
        return 2
    if dry:
        torch.set_num_threads(1)
    import comfy.model_management
    from benchmark_attention import build_model  # the full SD1.5 layout, random weights

    pack = comfy_runtime.load_pack()
    meter = Meter(device)
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False  # the table is the output
    with torch.inference_mode():  # as ComfyUI's checkpoint loader
        if dry:  # the tests' tiny UNet: the dry run checks the code path, in seconds
            sys.path.insert(0, str(comfy_runtime.PACK_DIR / "tests"))
            import tavlib
            model, context_dim = tavlib.tiny_model(), tavlib.CONTEXT_DIM
        else:
            model, context_dim = build_model(False, device), 768
    g = torch.Generator().manual_seed(0)
    latent = {"samples": torch.randn(args.frames, 4, args.size, args.size, generator=g)}
    positive = [[torch.randn(1, 77, context_dim, generator=g), {}]]
    negative = [[torch.randn(1, 77, context_dim, generator=g), {}]]
    comfy.model_management.load_models_gpu([model], force_full_load=True)

    rows = bench_tune(pack, model, latent, positive, args, meter)
    rows.append(bench_invert_sample(pack, model, latent, positive, negative, args, meter))
    rows += bench_attention(pack, args, meter)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run: tiny sizes, numbers mean nothing)"
    import comfy.ldm.modules.attention as comfy_attention
    header = (f"# Tune-A-Video benchmark: {name}; torch {torch.__version__}; "
              f"{'tiny test UNet' if dry else 'SD1.5 UNet (860M)'}, random weights; {args.frames} frames x "
              f"{args.size * 8}x{args.size * 8} px; ComfyUI attention {comfy_attention.optimized_attention.__name__}")
    print(markdown(rows, header), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: one-shot tuning seconds per step and peak memory vs frames, checkpointing on/off.

Random-weight SD1.5 UNet architecture (full size unless --reduced; weights created under
inference_mode as ComfyUI's loader does), the default trainables (queries + temporal attention), one
77-token conditioning, clips of F frames of --size x --size latents. Each configuration runs in its own
process so peak memory is its own. Reports the projected time of Tune-A-Video's 500 steps and, on a
GPU, the executed FLOPs per step (torch's FlopCounterMode, backward and recomputation included) as a
fraction of the card's dense bf16 peak. Numbers are measurements, not assertions.

    .venv/bin/python scripts/benchmarks/benchmark_tuning.py                       # CPU: fp32, 16x16 latents
    .venv/bin/python scripts/benchmarks/benchmark_tuning.py --device cuda         # bf16, 64x64 latents (512x512)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)
import comfy_runtime  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("GH200", 989), ("B200", 2250),
                    ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("A10G", 70),
                    ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71), ("RTX A6000", 155)]


def peak_tflops(device_name: str) -> float | None:
    for name, tflops in PEAK_BF16_TFLOPS:
        if name in device_name:
            return tflops
    return None


def run_one(frames: int, checkpointing: bool, args) -> dict:
    """In a child process: tune for args.steps steps and time them; then count one step's FLOPs."""
    os.environ["TAV_DEVICE"] = args.device
    comfy_runtime.import_comfy()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import comfy.model_management
    from benchmark_attention import build_model

    pack = comfy_runtime.load_pack()
    ost = importlib.import_module(f"{pack.__name__}.sampling.one_shot_tuning")
    cuda = args.device == "cuda"
    with torch.inference_mode():
        model = build_model(args.reduced, args.device)
    g = torch.Generator().manual_seed(0)
    latent = {"samples": torch.randn(frames, 4, args.size, args.size, generator=g)}
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()
    else:
        import psutil
        weights = psutil.Process().memory_info().rss

    stamps = []

    def tune(steps, callback=None):
        with torch.inference_mode():
            return ost.tune_clip(model, latent, positive, steps=steps, learning_rate=3e-5, seed=0,
                                 precision=args.precision, gradient_checkpointing=checkpointing, callback=callback)

    start = time.perf_counter()
    tune(args.steps, lambda *_: stamps.append(time.perf_counter()))  # loss.item() syncs every step
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]
    s_per_step = statistics.median(step_times)
    if cuda:
        peak_total = torch.cuda.max_memory_allocated()
        peak = peak_total - weights
    else:
        peak_total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = peak_total - weights
    result = {"frames": frames, "checkpointing": checkpointing, "s_per_step": s_per_step,
              "setup_s": max(0.0, stamps[0] - start - s_per_step), "peak_mib": peak / 2**20,
              "peak_total_mib": peak_total / 2**20, "device_name": torch.cuda.get_device_name() if cuda else "cpu"}
    if args.flops == "on":
        try:
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as counter:
                tune(1)
            result["flops_per_step"] = counter.get_total_flops()
        except Exception as e:  # FLOP counting is informative only
            result["flops_error"] = f"{type(e).__name__}: {e}"[:200]
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 16, 24])
    ap.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on", "off"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", type=int, help="latent height/width (default: cpu 16, cuda 64 = 512x512 pixels)")
    ap.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default: cpu fp32, cuda bf16")
    ap.add_argument("--steps", type=int, help="tuning steps per configuration, the first untimed "
                                              "(default: cpu 3, cuda 8)")
    ap.add_argument("--reduced", action="store_true", help="the small test UNet instead of full SD1.5")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the built-in table")
    ap.add_argument("--flops", choices=["on", "off"], help="count FLOPs with one extra step (default: cuda on, "
                                                           "cpu off: on CPU that step costs minutes)")
    ap.add_argument("--threads", type=int, help="torch CPU threads in each run (default: torch's)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.size = args.size or (64 if cuda else 16)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.steps = max(2, args.steps or (8 if cuda else 3))
    args.flops = args.flops or ("on" if cuda else "off")
    if args.child:
        frames, ckpt = args.child.split(":")
        print(json.dumps(run_one(int(frames), ckpt == "on", args)))
        return 0

    arch = "reduced SD1.5 UNet" if args.reduced else "SD1.5 UNet (860M)"
    print(f"# one-shot tuning, {arch}, random weights, {args.size}x{args.size} latents "
          f"({args.size * 8}x{args.size * 8} px), {args.precision}, device={args.device}, "
          f"queries+temporal, {args.steps - 1} timed steps, torch threads {args.threads or 'default'}")
    print(f"{'frames':>6} {'ckpt':>4} {'s/step':>8} {'500 steps':>10} {'setup':>7} {'peak MiB':>9} "
          f"{'total MiB':>9} {'TFLOP/step':>10} {'TFLOP/s':>8} {'% peak':>7}")
    results = []
    for frames in args.frames:
        for ckpt in args.checkpointing:
            cmd = [sys.executable, __file__, "--child", f"{frames}:{ckpt}", "--device", args.device,
                   "--size", str(args.size), "--precision", args.precision, "--steps", str(args.steps)]
            cmd += ["--reduced"] * args.reduced + ["--flops", args.flops]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                oom = "out of memory" in out.stderr.lower() or "can't allocate memory" in out.stderr
                print(f"{frames:6d} {ckpt:>4} {'OOM' if oom else 'failed'}"
                      + ("" if oom else f"\n{out.stderr[-2000:]}"), flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            peak = (args.peak_tflops or peak_tflops(r["device_name"])) if cuda else None
            flops = r.get("flops_per_step")
            achieved = flops / r["s_per_step"] / 1e12 if flops else None
            r["fraction_of_peak"] = achieved / peak if achieved and peak else None
            results.append(r)
            print(f"{frames:6d} {ckpt:>4} {r['s_per_step']:8.2f} {r['s_per_step'] * 500 / 60:8.1f} m "
                  f"{r['setup_s']:6.1f}s {r['peak_mib']:9.0f} {r['peak_total_mib']:9.0f} "
                  f"{flops / 1e12 if flops else float('nan'):10.2f} {achieved or float('nan'):8.1f} "
                  f"{100 * r['fraction_of_peak'] if r['fraction_of_peak'] else float('nan'):6.1f}%", flush=True)
    if results:
        print(f"# peak MiB: above the loaded UNet weights ({'CUDA allocator' if cuda else 'process RSS'}); "
              "TFLOP/step counts executed FLOPs (forward, backward, recomputation).")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: peak memory and time of one model evaluation vs clip length, long-clip chunking vs one pass.

Random-weight reduced SD1.5 UNet (scripts/benchmarks/benchmark_attention.build_model), Tune-A-Video patch
(sparse_causal, temporal attention, frame-shared norm), one conditioning, --size x --size latents
(default 32x32), CPU. Each (mode, frames) runs in its own process; its peak is the resident-set high
water mark (VmHWM, reset through /proc/self/clear_refs after a one-chunk warm-up evaluation) minus the RSS
just before the timed evaluation, i.e. what the evaluation itself adds on top of model and inputs.
Numbers are measurements, not assertions. With glibc's default (dynamic) mmap threshold, freed chunk
activations are reused from a fragmenting heap and the high water mark creeps up slowly with the
number of chunks; --fixed-mmap-threshold (MALLOC_MMAP_THRESHOLD_=1 MiB in the children) shows the
tensors' own peak, at some speed cost.

    .venv/bin/python scripts/benchmarks/benchmark_long_clip.py [--frames 16 32 64 128] [--modes chunked plain]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)
import comfy_runtime  # noqa: E402


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def run_one(mode: str, frames: int, size: int, chunk: int, overlap: int, threads: int) -> dict:
    """In a child process: one warm-up and one measured evaluation of a clip, as samplers call the model."""
    comfy_runtime.import_comfy()
    import uuid

    import torch
    import comfy.conds
    import comfy.model_management
    import comfy.samplers

    from benchmark_attention import build_model

    torch.set_num_threads(threads)
    pack = comfy_runtime.load_pack()
    unet_patch = sys.modules[pack.__name__ + ".attention_patches.unet_patch"]
    import importlib
    long_clip = importlib.import_module(pack.__name__ + ".sampling.long_clip")

    model = unet_patch.apply_tav(build_model(True, "cpu"), unet_patch.TAVConfig("sparse_causal", 1, True, True))
    if mode == "chunked":
        model = long_clip.apply_long_clip(model, chunk, overlap)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(frames, 4, size, size, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    comfy.model_management.load_models_gpu([model])
    model.pre_run()
    options = comfy_runtime.sampler_options(model)
    conds = [[{"model_conds": {"c_crossattn": comfy.conds.CONDCrossAttn(ctx)}, "uuid": uuid.uuid4()}]]
    ts = torch.full((frames,), 5.0)

    def evaluate(n=frames):
        with torch.no_grad():
            return comfy.samplers.calc_cond_batch(model.model, conds, x[:n], ts[:n], options)[0]

    evaluate(min(frames, chunk))  # warm-up (one chunk's worth): lazy allocations, backend selection
    Path("/proc/self/clear_refs").write_text("5")  # reset the high water mark to the current RSS
    base = _status_kib("VmRSS")
    t = time.perf_counter()
    out = evaluate()
    seconds = time.perf_counter() - t
    peak = _status_kib("VmHWM") - base
    assert torch.isfinite(out).all()
    return {"mode": mode, "frames": frames, "seconds": seconds, "s_per_frame": seconds / frames,
            "peak_mib": peak / 1024}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--modes", nargs="+", default=["chunked", "plain"], choices=["chunked", "plain"])
    ap.add_argument("--size", type=int, default=32, help="latent height/width")
    ap.add_argument("--chunk", type=int, default=16, help="chunk_frames of the long-clip patch")
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child (1: quiet on shared CPUs)")
    ap.add_argument("--fixed-mmap-threshold", action="store_true",
                    help="children allocate blocks >= 1 MiB with mmap (no heap fragmentation in the peak)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, frames = args.child.split(":")
        print(json.dumps(run_one(mode, int(frames), args.size, args.chunk, args.overlap, args.threads)))
        return 0

    print(f"# reduced SD1.5 UNet, random weights, TAV sparse_causal + temporal + frame-shared norm, "
          f"{args.size}x{args.size} latents, CPU, {args.threads} thread(s), one conditioning; "
          f"chunked: chunk_frames={args.chunk} overlap={args.overlap}; load avg {os.getloadavg()[0]:.1f}"
          + ("; MALLOC_MMAP_THRESHOLD_=1MiB" if args.fixed_mmap_threshold else ""))
    print(f"{'frames':>6} {'mode':8} {'peak MiB':>9} {'s/frame':>8} {'s/eval':>8}")
    for frames in args.frames:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", f"{mode}:{frames}", "--size", str(args.size),
                   "--chunk", str(args.chunk), "--overlap", str(args.overlap), "--threads", str(args.threads)]
            env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(2**20)} if args.fixed_mmap_threshold else {}))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{frames:6d} {mode:8} failed\n{out.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{frames:6d} {mode:8} {r['peak_mib']:9.0f} {r['s_per_frame']:8.3f} {r['seconds']:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

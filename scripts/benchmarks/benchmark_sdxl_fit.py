"""Benchmark: Tune-A-Video on SDXL (and SD1.5) with the paper's full trainable set vs the compact setting, one table.

Settings (sdxl_fit_runs.SETTINGS): full = the paper's trainables (attn1/attn2 query deltas, temporal attention
at each block's own width); compact = Apply Attention temporal_width 128 + One-Shot Tune query_rank 16 (issue 26).
Per family and setting, from ComfyUI's own full-size layouts and seeded random full-size checkpoints
(scripts/models/full_size.py; UNet stored bf16, bf16 autocast, gradient checkpointing, AdamW):
  - trainable parameters and adapter size (fp32 file), counted exactly on the meta device;
  - one One-Shot Tune at >= 3 small sizes, each in its own process (sdxl_fit_runs.py measure): peak live tensor
    bytes (what a GPU allocator must hold, weights excluded), FLOPs per step, seconds per step;
  - the peak and the FLOPs at the target size (SDXL 16 x 1024^2, SD1.5 24 x 512^2), extrapolated: peak =
    max(optimizer step's peak, kept + transient) with kept = a + b * F*H*W fitted (least squares) to the bytes
    live when the backward starts (activations kept grow with frames x latent pixels, the trainable state is
    fixed) and transient = the backward's peak above that at the largest size (fit_peak); FLOPs
    scaled linearly from the largest measured size (a lower bound: attention grows faster); predicted card
    peak = UNet weights (bf16) + that peak;
  - the fit cost: the denoising loss at 5 fixed timesteps (fixed noise) before and after N steps on the same clip;
  - e2e (SDXL, compact): tune -> Save Adapter -> fresh load -> Load Adapter -> the same edit (Long Clip, feature
    injection), bit-equal or not.
Numbers are measurements, not assertions. SDXL's full set needs ~16 GB of RAM: on a shared machine pass
--lock <file> so each run holds it.

    .venv/bin/python scripts/benchmarks/benchmark_sdxl_fit.py [--parts params measure fitcost e2e] [--lock FILE]
    python scripts/benchmarks/benchmark_sdxl_fit.py --device cuda --parts measure --sizes 16x128   # measured on a GPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)
import comfy_runtime  # noqa: E402
from sdxl_fit_runs import SETTINGS  # noqa: E402

RUNS = Path(__file__).resolve().parent / "sdxl_fit_runs.py"
TARGET = {"sdxl": (16, 128), "sd15": (24, 64)}  # frames, latent size (1024^2 / 512^2 pixels)
SIZES = {"sdxl": "2x8 2x16 4x8 4x16", "sd15": "2x8 2x16 4x8 4x16"}


def count(family: str, setting: str) -> dict:
    """Trainable parameters (trainable tune_a_video) and the fp32 adapter's bytes, on the meta device."""
    comfy_runtime.import_comfy()
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    from full_size import UNET_CONFIGS
    pack = comfy_runtime.load_pack()
    up = sys.modules[f"{pack.__name__}.attention_patches.unet_patch"]
    cfg = {k: v for k, v in UNET_CONFIGS[family].items()}
    unet = openaimodel.UNetModel(**cfg, operations=comfy.ops.disable_weight_init, device="meta")
    width, rank = SETTINGS[setting]["temporal_width"], SETTINGS[setting]["query_rank"]
    trainable = stored = 0
    for _, _, block in up.transformer_blocks(unet):
        layer = up.temporal_layer(block, width, device="meta")
        attn = sum(p.numel() for p in layer.attn_temp.parameters())
        trainable += attn
        stored += attn + sum(p.numel() for p in layer.norm_temp.parameters())
        for name in ("attn1", "attn2"):
            q = getattr(block, name).to_q
            n = rank * (q.in_features + q.out_features) if rank else q.in_features * q.out_features
            trainable += n
            stored += n + (1 if rank else 0)  # alpha
    unet_params = sum(p.numel() for p in unet.parameters())
    return {"trainable": trainable, "adapter_bytes": 4 * stored, "unet_params": unet_params}


def child(run: str, args, **kw) -> dict:
    cmd = ["flock", args.lock] if args.lock else []  # each big run alone on a shared machine
    cmd += [sys.executable, str(RUNS), run, "--device", args.device, "--threads", str(args.threads)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        tail = out.stderr.strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit_peak(rows, target):
    """max(the optimizer step's peak, kept(F*H*W) + transient): kept = a + b * F*H*W, least squares over the
    bytes live when the backward starts (trainable state + activations kept for it), transient = the backward's
    peak above that at the largest measured size (one block's recomputation and the gradients; it grows with
    the size too, so this part is a lower bound). Returns (peak, worst relative misfit of the kept fit)."""
    import numpy as np
    if not all("kept_at_backward" in r for _, _, r in rows):  # results without the phases (CUDA, or older)
        return None, float("nan")
    x = np.array([[1.0, f * s * s] for f, s, _ in rows])
    y = np.array([r["kept_at_backward"] for _, _, r in rows], dtype=float)
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    f, s = target
    worst = max(abs(a + b * f_ * s_ * s_ - r["kept_at_backward"]) / r["kept_at_backward"] for f_, s_, r in rows)
    largest = max(rows, key=lambda row: row[0] * row[1] ** 2)[2]
    transient = largest["phase_peak"]["backward"] - largest["kept_at_backward"]
    step = max(r["phase_peak"].get("step", 0) for _, _, r in rows)
    return max(a + b * f * s * s + transient, step), worst


def fit_flops(rows, target):
    """FLOPs per step at the target, linear in F*H*W from the largest measured size: a lower bound (frame and
    temporal attention grow faster; at these sizes a polynomial fit is dominated by the 1-frame cases)."""
    f, s, r = max(rows, key=lambda row: row[0] * row[1] ** 2)
    return r["flops"] * target[0] * target[1] ** 2 / (f * s * s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["params", "measure", "fitcost", "e2e"])
    ap.add_argument("--families", nargs="+", default=["sdxl", "sd15"])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--sizes", help="frames x latent size list for measure, e.g. '2x8 2x16 4x8 4x16'")
    ap.add_argument("--fit-steps", type=int, default=20, help="tuning steps of the fit-cost runs")
    ap.add_argument("--fit-size", default="2x16", help="frames x latent size of the fit-cost runs")
    ap.add_argument("--fit-lr", type=float, default=1e-4)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--utilisation", type=float, default=0.4, help="H100 bf16 utilisation for the time prediction")
    ap.add_argument("--json", help="also write every result to this file")
    ap.add_argument("--lock", help="a lock file each run holds (flock), e.g. a shared machine's big-memory lock")
    ap.add_argument("--from-json", nargs="+", help="print the table of earlier --json results (no runs)")
    args = ap.parse_args(argv)
    results = {}
    if args.from_json:
        for path in args.from_json:
            results.update(json.loads(Path(path).read_text()))
        for key, r in results.items():
            rows = [(int(k.split("x")[0]), int(k.split("x")[1]), m) for k, m in r.get("measured", {}).items()
                    if "peak_bytes" in m]
            if key != "e2e" and len(rows) >= 3 and args.device == "cpu":
                r["peak_target"], r["fit_error"] = fit_peak(rows, TARGET[key.split("/")[0]])
                r["flops_target"] = fit_flops(rows, TARGET[key.split("/")[0]])
        table(results, args)
        return 0
    print(f"# Tune-A-Video tuning, full-size random checkpoints (UNet bf16), bf16 autocast, checkpointing, "
          f"AdamW, device {args.device}, {args.threads} thread(s); settings: " +
          "; ".join(f"{k} = temporal_width {v['temporal_width']}, query_rank {v['query_rank']}, recompute_all "
                    f"{v['recompute_all']}" for k, v in SETTINGS.items()))
    for family in args.families:
        tf, ts = TARGET[family]
        for setting in args.settings:
            r = results.setdefault(f"{family}/{setting}", {})
            if "params" in args.parts:
                r.update(count(family, setting))
            if "measure" in args.parts or "fitcost" in args.parts:
                sizes = (args.sizes or SIZES[family]) if "measure" in args.parts else ""
                fit = {"fit_steps": args.fit_steps, "fit_size": args.fit_size, "lr": args.fit_lr} \
                    if "fitcost" in args.parts else {}
                got = child("measure", args, family=family, setting=setting, sizes=sizes, **fit)
                if "error" in got:
                    print(f"# {family} {setting} failed: {got['error']}", flush=True)
                r["fitcost"] = got.pop("fitcost", {})
                rows = [(int(k.split("x")[0]), int(k.split("x")[1]), m) for k, m in got.items() if "x" in k]
                r["measured"] = {f"{f}x{s}": m for f, s, m in rows}
                for f, s, m in rows:
                    print(f"# {family} {setting} {f} frames x {s * 8}^2: {json.dumps(m)}", flush=True)
                ok = [row for row in rows if "error" not in row[2]]
                at_target = [m for f, s, m in ok if (f, s) == (tf, ts)]
                if args.device == "cuda" and at_target:  # measured, not predicted
                    r["peak_target"], r["fit_error"] = at_target[0]["peak_bytes"], 0.0
                    r["weights_bytes"] = at_target[0]["weights_bytes"]
                elif len(ok) >= 3:
                    r["peak_target"], r["fit_error"] = fit_peak(ok, (tf, ts))
                    r["flops_target"] = fit_flops(ok, (tf, ts))
                    r["weights_bytes"] = ok[0][2]["weights_bytes"]
            if r.get("fitcost"):
                print(f"# {family} {setting} fit cost ({args.fit_steps} steps, {args.fit_size} latents, lr "
                      f"{args.fit_lr}): {json.dumps(r['fitcost'])}", flush=True)
    if "e2e" in args.parts:
        results["e2e"] = child("e2e", args, frames=4, size=8, steps=2)
        print(f"# e2e SDXL compact (4 frames x 64^2, 2 tune steps, 3 DDIM steps): {json.dumps(results['e2e'])}")
    table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def table(results, args):
    gb = 1e9
    print("\n| model / setting | trainable params | adapter (fp32) | peak at test sizes (GB, live tensors) | "
          "s/step (CPU) | TFLOP/step (test size) | predicted peak at target (GB) | TFLOP/step at target | "
          "H100 s/step at target | fit: loss before → after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        if key == "e2e":
            continue
        family = key.split("/")[0]
        tf, ts = TARGET[family]
        measured = r.get("measured", {})
        peaks = ", ".join(f"{k}: {m['peak_bytes'] / gb:.2f}" if "peak_bytes" in m else f"{k}: failed"
                          for k, m in measured.items())
        last = [m for m in measured.values() if "s_per_step" in m]
        secs = f"{last[-1]['s_per_step']:.1f}" if last else "-"
        flops = f"{last[-1]['flops'] / 1e12:.2f}" if last else "-"
        target = "-"
        if r.get("peak_target") is not None:
            target = f"{(r['weights_bytes'] + r['peak_target']) / gb:.1f} ({r['weights_bytes'] / gb:.1f} weights + " \
                     f"{r['peak_target'] / gb:.1f}; fit within {100 * r['fit_error']:.0f} %)"
        tflops = r.get("flops_target")
        h100 = f"{tflops / (989e12 * args.utilisation):.2f}" if tflops else "-"
        fit = r.get("fitcost", {})
        cost = f"{fit['loss_before']:.4f} → {fit['loss_after']:.4f}" if "loss_after" in fit else "-"
        print(f"| {key} ({tf} × {ts * 8}²) | {r.get('trainable', 0) / 1e6:.1f} M | "
              f"{r.get('adapter_bytes', 0) / 1e6:.0f} MB | {peaks or '-'} | {secs} | {flops} | {target} | "
              f"{tflops / 1e12 if tflops else float('nan'):.0f} | {h100} | {cost} |")


if __name__ == "__main__":
    sys.exit(main())

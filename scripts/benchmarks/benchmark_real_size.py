"""Benchmark: memory, FLOPs and predicted H100 time of Tune-A-Video at its real setting (24 frames x 512^2 on
full SD1.5), this pack against the official code, in one run; each measurement in its own process
(scripts/benchmarks/real_size_step.py says what each system runs and how memory is measured). Not run in CI.

On a 2-core CPU a 24 x 512^2 step (~80 TFLOP) takes hours, so the step is measured at several small clips
(frames F x latent side S) and extrapolated with a stated fit, checked on a point left out of it:
  FLOPs, per op group (torch's counter by op): convolutions a F S^2; matmuls b F + c F S^2 (per frame: the
          text keys/values); attention d F S^2 + e F S^4 + h S^4 + g F^2 S^2 (cross; spatial, the first frame
          with fewer keys; temporal); exact forms for
          a UNet, fitted on the --flop-points;
  memory above the weights = m0 + m1 F S^2  (fused attention keeps no S^4 workspace), per phase, fitted on
          the --points. Each fit is checked by refitting without its last point and predicting that point.
Sampling: one guided call (cond + uncond batched, 2F images) measured the same way; Invert 50 (one F-image
call per step) + Sampler 50 at cfg 12.5 (one 2F call per step) = 75 such calls. Predicted H100 time = FLOPs /
(989 TFLOP/s dense bf16 x utilisation).

    python scripts/benchmarks/benchmark_real_size.py --lock LOCK      # SD1.5, pack and official (~40 min, 2 cores)
    python scripts/benchmarks/benchmark_real_size.py --family sdxl --systems pack --target 24x128 8x128
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
H100_BF16 = 989e12
GB = 1e9


def point(text):
    f, s = text.lower().split("x")
    return int(f), int(s)


def measure(system, case, family, f, s, flops, args):
    job = {"system": system, "case": case, "family": family, "frames": f, "size": s, "flops": flops,
           "autocast": args.autocast, "unet_dtype": args.unet_dtype}
    if args.recompute_all and system == "pack" and case == "tune":
        job["recompute_all"] = True
    key = json.dumps(job, sort_keys=True)
    cache = Path(args.cache) if args.cache else None
    done = {}
    if cache and cache.is_file():
        done = {json.dumps(json.loads(line)["job"], sort_keys=True): json.loads(line)["result"]
                for line in cache.read_text().splitlines() if line.strip()}
    if key in done:  # measured before (--cache): reuse
        return dict(done[key], frames=f, size=s)
    if args.cached_only:
        return None
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536", TAV_DEVICE=args.device)
    lock = ["flock", args.lock] if args.lock else []  # one big-memory job at a time on a shared machine
    out = subprocess.run(lock + [sys.executable, str(HERE / "real_size_step.py"), json.dumps(job)],
                         capture_output=True, text=True, env=env)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{system} {case} {f}x{s} failed:\n{out.stderr[-3000:]}")
    r = json.loads(lines[-1][7:])
    if cache:
        with open(cache, "a") as fh:
            fh.write(json.dumps({"job": job, "result": r}) + "\n")
    r.update(frames=f, size=s)
    print(f"#   {system:8} {case:6} {f:3d}x{s * 8:<4d} {r['seconds']:7.1f} s  "
          f"peak +{(max(r['fwd_peak'], r['bwd_peak']) - r['weights']) / GB:6.2f} GB"
          + (f"  {r['flops'] / 1e12:8.3f} TFLOP" if "flops" in r else ""), flush=True)
    return r


def fit(rows, basis, value):
    """Least squares: (coefficients fitted on all rows, relative error on the last row of the fit on the others)."""
    a = np.array([basis(r["frames"], r["size"]) for r in rows], dtype=float)
    y = np.array([value(r) for r in rows], dtype=float)
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    if len(rows) <= a.shape[1]:  # no point to spare for the check
        return coef, float("nan")
    held = float(a[-1] @ np.linalg.lstsq(a[:-1], y[:-1], rcond=None)[0])
    return coef, (held - y[-1]) / max(abs(y[-1]), 1.0)


def _group_flops(row, group):
    ops = row["flops_by_op"]
    if group == "conv":
        return sum(v for k, v in ops.items() if "convolution" in k)
    if group == "attention":
        return sum(v for k, v in ops.items() if "attention" in k)
    return sum(v for k, v in ops.items() if "convolution" not in k and "attention" not in k)


def mem_basis(f, s):
    return [1.0, f * s * s]


PHASES = {  # what each memory column is, from the child's marks (bytes above the loaded weights)
    "kept": lambda r: r["kept"] - r["weights"],            # end of forward: kept for backward (+ trainables)
    "fwd_peak": lambda r: r["fwd_peak"] - r["weights"],
    "bwd_peak": lambda r: r["bwd_peak"] - r["weights"],    # backward + optimizer step
    "saved_weights": lambda r: r["saved_weights"],         # weight copies autograd keeps outside checkpoints
    "saved_activations": lambda r: r["saved_activations"],
}


def predict(rows, flop_rows, targets):
    """Fitted values at each target (F, S), and the held-out errors of the fits."""
    out, errors = {}, {}
    coefs = {}
    for name, value in PHASES.items():
        if len(rows) >= len(mem_basis(1, 1)) and all(value(r) is not None for r in rows):
            coefs[name], errors[name] = fit(rows, mem_basis, value)
    # FLOPs per op group, each with the terms it can have: convolutions F S^2; matmuls F S^2 and F (the text
    # keys/values); attention F S^4 (spatial), F S^2 (cross), F^2 S^2 (temporal). Summed at the target.
    groups = {"conv": lambda f, s: [f * s * s], "matmul": lambda f, s: [f, f * s * s],
              "attention": lambda f, s: [f * s * s, f * s ** 4, s ** 4, f * f * s * s]}
    flop_fits = {}
    if len(flop_rows) >= 4:
        for g, basis in groups.items():
            flop_fits[g] = fit(flop_rows, basis, lambda r, g=g: _group_flops(r, g))
            errors[f"flops {g}"] = flop_fits[g][1]
    measured = {(r["frames"], r["size"]): r for r in rows}
    measured_flops = {(r["frames"], r["size"]): r["flops"] for r in flop_rows}
    for t in targets:
        f, s = t
        if t in measured:  # measured at the target itself (e.g. on a GPU): no fit
            pred = {name: float(value(measured[t])) for name, value in PHASES.items()}
        else:
            pred = {name: float(np.dot(mem_basis(f, s), c)) for name, c in coefs.items()}
        pred["flops"] = measured_flops.get(t) or (sum(float(np.dot(groups[g](f, s), c)) for g, (c, _) in
                                                      flop_fits.items()) if flop_fits else None)
        out[t] = pred
    return out, errors


def run_system(system, case, args):
    points = [point(p) for p in args.points]
    flop_points = [point(p) for p in args.flop_points]
    rows, flop_rows = [], []
    for f, s in sorted(set(points) | set(flop_points), key=lambda p: p[0] * p[1] ** 2):
        r = measure(system, case, args.family, f, s, (f, s) in flop_points, args)
        if r is None:
            continue
        if (f, s) in points:
            rows.append(r)
        if (f, s) in flop_points:
            flop_rows.append(r)
    points = [p for p in points if any((r["frames"], r["size"]) == p for r in rows)]
    flop_points = [p for p in flop_points if any((r["frames"], r["size"]) == p for r in flop_rows)]
    order = {p: i for i, p in enumerate(points)}
    rows.sort(key=lambda r: order[(r["frames"], r["size"])])
    forder = {p: i for i, p in enumerate(flop_points)}
    flop_rows.sort(key=lambda r: forder[(r["frames"], r["size"])])
    return rows, flop_rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sd15", choices=["sd15", "sd21v", "sdxl"])
    ap.add_argument("--systems", nargs="+", default=["pack", "official"])
    ap.add_argument("--cases", nargs="+", default=["tune", "sample"])
    ap.add_argument("--points", nargs="+", default=["2x16", "4x16", "2x32", "4x32"],
                    help="FxS clips for the memory fit (S = latent side; the last one held out)")
    ap.add_argument("--flop-points", nargs="+", default=["2x8", "4x8", "2x16", "2x24", "4x16"])
    ap.add_argument("--target", nargs="+", default=["24x64", "8x64"])
    ap.add_argument("--autocast", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--unet-dtype", default="bf16", choices=["fp16", "bf16"],
                    help="pack on CPU: bf16 keeps the UNet in half precision as on a GPU (fp16: ComfyUI's CPU default, fp32)")
    ap.add_argument("--recompute-all", action="store_true", help="the pack's tune with One-Shot Tune recompute_all")
    ap.add_argument("--lock", help="run each measurement under `flock LOCK` (shared machines)")
    ap.add_argument("--utilisation", nargs="+", type=float, default=[0.35, 0.5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: measure at the targets themselves (--points/--flop-points = the targets)")
    ap.add_argument("--json", help="also write all measurements and predictions here")
    ap.add_argument("--cache", help="a JSON-lines file of measurements: reused when the same job is asked again")
    ap.add_argument("--cached-only", action="store_true", help="measure nothing: the table from --cache")
    args = ap.parse_args(argv)
    targets = [point(t) for t in args.target]
    if args.device == "cuda":
        args.points = args.flop_points = args.target
    report = {}
    for case in args.cases:
        for system in args.systems:
            print(f"# measuring {system} {case} ({args.family})", flush=True)
            rows, flop_rows = run_system(system, case, args)
            pred, errors = predict(rows, flop_rows, targets)
            report[f"{system}/{case}"] = {"rows": rows, "flop_rows": flop_rows, "errors": errors,
                                          "pred": {f"{f}x{s}": v for (f, s), v in pred.items()}}
    print_table(report, args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


def print_table(report, args):
    util = args.utilisation
    print(f"\n# {args.family}: predicted at the target clips (fits on the measured points; held-out errors below)")
    head = (f"{'system/case':16} {'clip':>9} {'peak GB':>8} {'fwd pk':>7} {'kept':>6} {'w.copies':>8} "
            f"{'act.out':>7} {'trainable':>9} {'grads':>6} {'AdamW':>6} {'TFLOP':>8} "
            + " ".join(f"{'H100 ' + str(int(u * 100)) + '%':>9}" for u in util))
    print(head)
    for key, rep in report.items():
        if not rep["rows"]:
            continue
        r0 = rep["rows"][0]
        for clip, p in rep["pred"].items():
            f, s = point(clip)
            # the step's peak: the forward's, or what the forward kept plus the gradients (backward), whichever is
            # larger; each phase is fitted separately, and at small clips the end-of-step state dominates
            peak = max(p.get("fwd_peak", 0), p.get("bwd_peak", 0), p.get("kept", 0) + r0.get("grads", 0))
            flops = p["flops"]
            calls = 1 if key.endswith("tune") else 75
            times = " ".join(f"{flops * calls * (500 if calls == 1 else 1) / (H100_BF16 * u):8.1f}s" if flops else
                             f"{'-':>9}" for u in util)
            print(f"{key:16} {f:3d}x{s * 8:<5d} {peak / GB:8.2f} {p.get('fwd_peak', 0) / GB:7.2f} "
                  f"{p.get('kept', 0) / GB:6.2f} {p.get('saved_weights', 0) / GB:8.2f} "
                  f"{p.get('saved_activations', 0) / GB:7.2f} {r0.get('trainable', 0) / GB:9.2f} "
                  f"{r0.get('grads', 0) / GB:6.2f} {r0.get('optimizer', 0) / GB:6.2f} "
                  f"{flops / 1e12 if flops else float('nan'):8.2f} {times}")
    print("# peak GB: process memory above the loaded weights (max of forward and backward+step); fwd pk / kept:"
          " forward peak / held at the end of the forward; w.copies / act.out: weight copies and activations"
          " autograd keeps outside checkpointed regions; trainable/grads/AdamW: exact sizes. H100: tune = 500"
          " steps, sample = Invert 50 + Sampler 50 (75 guided calls of 2F images), at 989 TFLOP/s x utilisation.")
    for key, rep in report.items():
        errs = ", ".join(f"{k} {100 * v:+.1f}%" for k, v in rep["errors"].items())
        print(f"# {key} held-out fit errors: {errs}")


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the pack vs an unpatched UNet and the official-code reference, side by side, one table.

Every row is one child process (so peak memory is its own), all in the same run, on the same random
weights (the reduced SD1.5 UNet by default, 47 M parameters; --full for SD1.5's 860 M), F frames of
--size x --size latents, fp32 on the CPU:
  infer unpatched / patched / official   one UNet forward (no grad); patched = TAV's defaults
                                         (sparse-causal, temporal attention, frame-shared norm);
                                         official = tests/tav_reference.py (diffusers' UNet inflated
                                         as the official Tune-A-Video code)
  fwd+bwd unpatched                      forward + backward of the unpatched UNet, only the query weights
                                         (attn1/attn2 to_q) trainable: the floor a tuning step is held to
  tune ckpt on / off                     one One-Shot Tune step (trainable tune_a_video, AdamW, clip)
  official ckpt on / off                 the same step on the reference (same trainables, diffusers'
                                         gradient checkpointing)
Then the attention micro-benchmarks per mode (benchmark_attention.micro). Peak = the process's peak
RSS above the loaded model. Times are the child's CPU seconds (process_time; one thread by default), which
stay comparable on a loaded machine where wall time does not. Numbers are measurements, not assertions.

    .venv/bin/python scripts/benchmarks/benchmark_cpu.py                  # F = 8, 32x32 latents, 1 thread
    .venv/bin/python scripts/benchmarks/benchmark_cpu.py --frames 4 --size 16 --threads 2
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)
import comfy_runtime  # noqa: E402

CASES = ("infer_unpatched", "infer_patched", "infer_official", "fwdbwd_unpatched",
         "tune_ckpt", "tune_nockpt", "official_ckpt", "official_nockpt")
LABELS = {"infer_unpatched": "infer unpatched", "infer_patched": "infer patched", "infer_official": "infer official",
          "fwdbwd_unpatched": "fwd+bwd unpatched", "tune_ckpt": "tune ckpt on", "tune_nockpt": "tune ckpt off",
          "official_ckpt": "official ckpt on", "official_nockpt": "official ckpt off"}
QUERIES = ("attn1.to_q.weight", "attn2.to_q.weight")


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def reset_peak():
    """Linux: reset the process's peak RSS (VmHWM), so the peak is that of what runs next."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _conds(ctx):
    import uuid

    import comfy.conds
    return [[{"model_conds": {"c_crossattn": comfy.conds.CONDCrossAttn(ctx)}, "uuid": uuid.uuid4()}]]


def run_case(case: str, args) -> dict:
    """In a child process: build, load, then time `case`; seconds (best of repeats) and peak MiB."""
    comfy_runtime.import_comfy()
    import comfy.cli_args
    comfy.cli_args.args.use_pytorch_cross_attention = args.attention == "sdpa"  # read at ComfyUI's import
    import torch
    torch.set_num_threads(args.threads)
    import comfy.model_management
    import comfy.samplers
    from benchmark_attention import best_time, build_model

    pack = comfy_runtime.load_pack()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.frames, 4, args.size, args.size, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    plain = case in ("infer_unpatched", "fwdbwd_unpatched") or case.startswith("official")
    if plain:  # live weights may be used by autograd directly: built outside inference mode
        model = build_model(not args.full, "cpu")
    else:
        with torch.inference_mode():  # as ComfyUI's checkpoint loader
            model = build_model(not args.full, "cpu")

    if case.startswith(("infer_official", "official")):
        sys.path.insert(0, str(comfy_runtime.PACK_DIR / "tests"))
        import tav_reference as ref
        state = {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
        unet = ref.diffusers_unet(state, model.model.model_config.unet_config)
        ref.inflate(unet, args.frames)
        del model, state
        context = ctx.expand(args.frames, -1, -1)
        base = rss()
        reset_peak()
        if case == "infer_official":
            def step():
                with torch.no_grad():
                    ref.eps(unet, x0, 500, context)
            return {"s": best_time(step, args.repeats), "peak": peak_rss() - base}
        unet.requires_grad_(False)
        trainable = [p for n, p in unet.named_parameters()
                     if n.endswith(QUERIES) or ".tav_temporal.attn_temp." in n]
        for p in trainable:
            p.requires_grad_(True)
        if case == "official_ckpt":
            unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(trainable, lr=3e-5, weight_decay=1e-2)
        scheduler = ref.official_scheduler()

        def step():
            noise, t = torch.randn(x0.shape, generator=g), int(torch.randint(1000, (1,), generator=g))
            loss = ref.tuning_loss(unet, scheduler, x0, noise, t, context)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {"s": best_time(step, args.repeats), "peak": peak_rss() - base}

    if case == "infer_patched":
        up = sys.modules[pack.__name__ + ".attention_patches.unet_patch"]
        model = up.apply_tav(model, up.TAVConfig())
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    base = rss()
    reset_peak()
    if case.startswith("tune"):
        ost = sys.modules[pack.__name__ + ".sampling.one_shot_tuning"]
        stamps = []
        with torch.inference_mode():
            ost.tune_clip(model, {"samples": x0}, [[ctx, {}]], steps=args.repeats + 2, learning_rate=3e-5,
                          precision="fp32", gradient_checkpointing=case == "tune_ckpt",
                          callback=lambda *_: stamps.append(time.process_time()))
        return {"s": min(b - a for a, b in zip(stamps, stamps[1:])), "peak": peak_rss() - base}

    model.pre_run()
    options = comfy_runtime.sampler_options(model)
    conds = _conds(ctx)
    ts = torch.full((args.frames,), 5.0)
    if case == "fwdbwd_unpatched":
        unet = model.model.diffusion_model
        unet.requires_grad_(False)
        for n, p in unet.named_parameters():
            p.requires_grad_(n.endswith(QUERIES))
        target = torch.randn(x0.shape, generator=g)

        def step():
            with torch.enable_grad():
                out = comfy.samplers.calc_cond_batch(model.model, conds, x0, ts, options)[0]
                (out - target).square().mean().backward()
            unet.zero_grad(set_to_none=True)
    else:
        def step():
            with torch.no_grad():
                comfy.samplers.calc_cond_batch(model.model, conds, x0, ts, options)
    return {"s": best_time(step, args.repeats), "peak": peak_rss() - base}


def run_children(args) -> dict:
    results = {}
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case, "--frames", str(args.frames), "--size", str(args.size),
               "--repeats", str(args.repeats), "--threads", str(args.threads), "--attention", args.attention]
        cmd += ["--full"] * args.full
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"# {case} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def table(results: dict, args) -> list[str]:
    """The printed table: seconds, peak MiB and the ratios the targets are stated in."""
    def ratio(a, b, key="s"):
        return results[a][key] / results[b][key] if a in results and b in results else float("nan")
    arch = "SD1.5 UNet (860M)" if args.full else "reduced SD1.5 UNet (47M)"
    lines = [f"# {arch}, random weights, F={args.frames}, {args.size}x{args.size} latents, fp32, CPU, "
             f"{args.threads} thread(s), best of {args.repeats}, attention {args.attention}",
             f"{'case':20s} {'CPU s':>8s} {'peak MiB':>9s}"]
    for case in args.cases:
        if case in results:
            r = results[case]
            lines.append(f"{LABELS[case]:20s} {r['s']:8.2f} {r['peak'] / 2**20:9.0f}")
    checks = [("patched / unpatched inference", ratio("infer_patched", "infer_unpatched"), "<= 1.25"),
              ("tune ckpt on / fwd+bwd unpatched", ratio("tune_ckpt", "fwdbwd_unpatched"), "<= 1.6"),
              ("peak tune ckpt on / off", ratio("tune_ckpt", "tune_nockpt", "peak"), "<= 0.6"),
              ("time tune / official, ckpt on", ratio("tune_ckpt", "official_ckpt"), "aim <= 0.8"),
              ("time tune / official, ckpt off", ratio("tune_nockpt", "official_nockpt"), "aim <= 0.8"),
              ("peak tune / official, ckpt on", ratio("tune_ckpt", "official_ckpt", "peak"), "aim <= 0.7"),
              ("peak tune / official, ckpt off", ratio("tune_nockpt", "official_nockpt", "peak"), "aim <= 0.7"),
              ("time infer patched / official", ratio("infer_patched", "infer_official"), "aim <= 0.8"),
              ("peak infer patched / official", ratio("infer_patched", "infer_official", "peak"), "aim <= 0.7")]
    lines.append(f"{'ratio':36s} {'value':>6s}  target")
    lines += [f"{name:36s} {value:6.2f}  {target}" for name, value, target in checks]
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=32, help="latent height/width")
    ap.add_argument("--full", action="store_true", help="full SD1.5 UNet instead of the reduced one")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per case (best is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per child")
    ap.add_argument("--attention", choices=["sdpa", "comfy"], default="sdpa",
                    help="ComfyUI's attention: sdpa (--use-pytorch-cross-attention, as on a GPU and as the "
                         "official code) or comfy (ComfyUI's CPU default, sub-quadratic)")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--micro", choices=["on", "off"], default="on", help="attention micro-benchmarks per mode")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child, args)))
        return 0
    results = run_children(args)
    print("\n".join(table(results, args)), flush=True)
    if args.micro == "on":
        comfy_runtime.import_comfy()
        import comfy.cli_args
        comfy.cli_args.args.use_pytorch_cross_attention = args.attention == "sdpa"
        from benchmark_attention import micro, micro_table
        rows = micro(args.frames, args.size * args.size, 320, 8, args.repeats, args.threads)
        results["micro"] = rows
        print("\n".join(micro_table(rows, args.frames, args.size * args.size)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

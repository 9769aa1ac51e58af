"""First-GPU-run check of ComfyUI's dynamic VRAM (ModelPatcherDynamic, 0.28+ on NVIDIA GPUs): the pack on a
model the dynamic patcher manages against the same checkpoint on the classic patcher (what
--disable-dynamic-vram gives). docs/comfyui-versions.md says why each check exists.

  tune        One-Shot Tune (queries + temporal, bf16, checkpointing): loss curve and trained tensors agree;
              the run trained on the classic delegate (sampling/dynamic_vram.py) or on the dynamic patcher
  long clip   Apply Attention + Long Clip (chunks of 4) + Tune-A-Video Sampler: latents agree
  backend     the same under core's Model Attention Backend (pytorch), where this ComfyUI has it
  base        the untouched checkpoint predicts bit-identically before and after all of it

Dynamic VRAM is switched on in this process the way ComfyUI's main.py does it (comfy_aimdo.control.init_devices,
CoreModelPatcher = ModelPatcherDynamic, memory_management.aimdo_enabled); the checkpoint is a seeded random
full-size SD1.5 (scripts/models/full_size.py) or --checkpoint. Prints plain lines (no table), one verdict per
check, exit 1 on a FAIL. --dry-run: the CPU, the tests' tiny checkpoint, both sides classic (keeps the script
working; says nothing about dynamic VRAM). Run it from scripts/benchmarks/benchmark_gpu.sh, with TAV_COMFYUI
naming a runtime that has dynamic VRAM (0.33.0) or with the ComfyUI under test as the own ComfyUI.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401
import comfy_runtime  # noqa: E402

TOLERANCE = {"tune": 2e-2, "long clip": 2e-2, "backend": 2e-2}  # relative max-abs difference, fp16/bf16 noise


def enable_dynamic_vram() -> str | None:
    """Dynamic VRAM on, as main.py does; None, or why it cannot be."""
    import torch
    import comfy.model_management
    import comfy.model_patcher
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return "this ComfyUI has no ModelPatcherDynamic"
    try:
        import comfy.memory_management
        import comfy_aimdo.control
    except ImportError as e:
        return f"comfy-aimdo missing ({e})"
    devices = comfy.model_management.get_all_torch_devices()
    headroom = int(getattr(comfy.cli_args.args, "vram_headroom", 0) * 1024 ** 3)
    try:
        ok = comfy_aimdo.control.init_devices((d.index, headroom) for d in devices)
    except TypeError:
        ok = comfy_aimdo.control.init_devices(d.index for d in devices)
    if not ok:
        return "comfy_aimdo.control.init_devices failed"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return None


def load(path, dynamic: bool):
    import inspect
    import comfy.sd
    kw = {"output_vae": False, "output_clip": False}
    if not dynamic and "disable_dynamic" in inspect.signature(comfy.sd.load_checkpoint_guess_config).parameters:
        kw["disable_dynamic"] = True
    return comfy.sd.load_checkpoint_guess_config(str(path), **kw)[0]


def rel_diff(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run_side(pack, model, inputs, steps):
    """What the pack does with `model`: tuning, Long Clip sampling, the same under an attention backend."""
    import torch
    mod = lambda name: sys.modules[f"{pack.__name__}.{name}"]  # noqa: E731
    ost, tc, up, lc, vs = (mod(n) for n in ("sampling.one_shot_tuning", "sampling.training_clone",
                                            "attention_patches.unet_patch", "sampling.long_clip",
                                            "sampling.video_sampler"))
    used = []
    original = tc.training_patcher

    def recording(m):  # which patcher the run trained on
        chosen = original(m)
        used.append(bool(getattr(chosen, "is_dynamic", lambda: False)()))
        return chosen
    tc.training_patcher = recording
    try:
        with torch.inference_mode():
            _, adapter, losses = ost.tune_clip(model, {"samples": inputs["clip"]}, inputs["positive"], steps=steps,
                                               learning_rate=1e-4, seed=0, precision="bf16",
                                               trainable="queries+temporal")
    finally:
        tc.training_patcher = original
    out = {"losses": torch.tensor(losses), "deltas": torch.cat([d.flatten() for d in adapter.deltas.values()]),
           "temporal": torch.cat([t.flatten() for t in adapter.temporal.values()]), "trained on": used}
    patched = lc.apply_long_clip(up.apply_tav(model, up.TAVConfig()), chunk_frames=4)

    def sample(m):
        with torch.inference_mode():
            return vs.sample_clip(m, inputs["positive"], inputs["negative"], {"samples": inputs["long"]}, seed=0,
                                  steps=4, cfg=7.5)["samples"]
    out["long clip"] = sample(patched)
    try:
        from comfy_extras.nodes_model_advanced import ModelAttentionBackend
        out["backend"] = sample(ModelAttentionBackend().patch(patched, "pytorch attention")[0])
    except (ImportError, AttributeError):
        out["backend"] = None
    return out


def plain_sample(pack, model, inputs):
    import torch
    vs = sys.modules[f"{pack.__name__}.sampling.video_sampler"]
    with torch.inference_mode():
        return vs.sample_clip(model, inputs["positive"], inputs["negative"], {"samples": inputs["clip"]}, seed=0,
                              steps=2, cfg=7.5)["samples"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny checkpoint, both sides classic")
    ap.add_argument("--checkpoint", help="an SD1.5 checkpoint (default: seeded random full-size SD1.5)")
    ap.add_argument("--steps", type=int, help="tuning steps (default 8; dry run 2)")
    args = ap.parse_args(argv)
    os.environ["TAV_DEVICE"] = "cpu" if args.dry_run else "cuda"
    comfy_runtime.import_comfy()
    import torch
    why = "dry run" if args.dry_run else enable_dynamic_vram()
    if why is not None and not args.dry_run:
        print(f"dynamic VRAM check: SKIPPED ({why})")
        return 0
    if args.dry_run:
        torch.set_num_threads(1)
        import random_models
        path, size, frames, context_dim = random_models.random_checkpoint(), 8, 2, 768
    else:
        import full_size
        path, size, frames, context_dim = Path(args.checkpoint or full_size.full_checkpoint("sd15")), 32, 8, 768
    steps = args.steps or (2 if args.dry_run else 8)
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    pack = comfy_runtime.load_pack()
    g = torch.Generator().manual_seed(0)
    inputs = {"clip": torch.randn(frames, 4, size, size, generator=g),
              "long": torch.randn(3 * frames // 2 + 2, 4, size, size, generator=g),
              "positive": [[torch.randn(1, 77, context_dim, generator=g), {}]],
              "negative": [[torch.randn(1, 77, context_dim, generator=g), {}]]}
    with torch.inference_mode():
        classic, dynamic = load(path, dynamic=False), load(path, dynamic=not args.dry_run)
    print(f"dynamic VRAM check: {path.name}; classic patcher {type(classic).__name__}, "
          f"dynamic side {type(dynamic).__name__} ({'dry run: both classic' if args.dry_run else 'dynamic VRAM on'})")
    before = plain_sample(pack, dynamic, inputs)
    want = run_side(pack, classic, inputs, steps)
    got = run_side(pack, dynamic, inputs, steps)
    same = torch.equal(plain_sample(pack, dynamic, inputs), before)
    failed = not same
    print(f"  base: the checkpoint without the pack samples bit-identically afterwards: {'PASS' if same else 'FAIL'}")
    print(f"  tune: trained on the dynamic patcher? classic side {want['trained on']}, dynamic side {got['trained on']}"
          " (False: the classic delegate, see sampling/dynamic_vram.py)")
    for name, key in (("tune", "losses"), ("tune", "deltas"), ("tune", "temporal"), ("long clip", "long clip"),
                      ("backend", "backend")):
        if want[key] is None or got[key] is None:
            print(f"  {name}: not available in this ComfyUI")
            continue
        diff = rel_diff(got[key], want[key])
        ok = torch.isfinite(got[key]).all() and diff <= TOLERANCE[name]
        failed |= not ok
        label = name if name == key else f"{name} {key}"
        print(f"  {label}: relative max difference {diff:.2e} (<= {TOLERANCE[name]:.0e}) {'PASS' if ok else 'FAIL'}")
    print(f"dynamic VRAM check: {'FAIL' if failed else 'PASS'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

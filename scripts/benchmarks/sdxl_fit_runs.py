"""The measured runs of benchmark_sdxl_fit.py, each in its own process (one JSON line on stdout).

  measure  one One-Shot Tune of a full-size random checkpoint (UNet stored bf16, as on a GPU; bf16 autocast,
           gradient checkpointing, trainable tune_a_video) with a setting: live tensor bytes at their peak
           (LiveBytes: every tensor an op allocates, counted until freed -- what a GPU allocator must hold,
           without its fragmentation or the CUDA context; on CUDA: torch.cuda.max_memory_allocated), the
           process's peak RSS above the loaded model, FLOPs per step (torch's FLOP counter), seconds per step.
           Every size on one load; then (--fit-steps N) the fit cost: the same tune for N steps, the denoising
           loss at 5 fixed timesteps with fixed noise before and after.
  e2e      the tune-and-edit graph's nodes on full-size SDXL, in-process: Load Checkpoint, CLIP Text Encode,
           VAE Encode, Apply Attention, One-Shot Tune, Save Adapter, Long Clip, Invert (feature injection),
           Sampler, VAE Decode; then the checkpoint loaded afresh, Load Adapter, the same edit: equal output?
"""
from __future__ import annotations

import json
import resource
import sys
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)
import comfy_runtime  # noqa: E402

SETTINGS = {"full": {"temporal_width": 0, "query_rank": 0, "recompute_all": False},  # the paper's trainable set
            "compact": {"temporal_width": 128, "query_rank": 16, "recompute_all": False},  # issue 26
            "compact+recompute": {"temporal_width": 128, "query_rank": 16, "recompute_all": True}}
CONTEXT = {"sd15": (768, None), "sdxl": (2048, 1280)}  # cross-attention width, pooled width
FIXED_T = (100, 300, 500, 700, 900)


def live_bytes_mode():
    """A TorchDispatchMode counting the bytes of live tensor storages created under it (current and peak); outputs
    sharing an input's storage (views, detach, in-place ops) are not new memory."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.current, self.peak = {}, 0, 0
            self.phase, self.phase_peak, self.at_backward = "forward", {}, 0

        def mark(self, phase):
            """Phases of a step: forward, backward (activations kept + the recomputed block), step (optimizer)."""
            if phase == "backward":
                self.at_backward = max(self.at_backward, self.current)
            self.phase = phase

        def _free(self, key):
            self.current -= self.live.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # views and aliases of inputs (weights made before the mode, e.g. their detach) allocate nothing
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor) and t.device.type != "meta"}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if key and key not in self.live and key not in inputs:
                        self.live[key] = storage.nbytes()
                        self.current += storage.nbytes()
                        weakref.finalize(storage, self._free, key)
            self.peak = max(self.peak, self.current)
            self.phase_peak[self.phase] = max(self.phase_peak.get(self.phase, 0), self.current)
            return out

    return LiveBytes()


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def setup(args):
    """ComfyUI imported (SDPA attention, as on GPUs), the pack, torch threads."""
    comfy_runtime.import_comfy()
    import comfy.cli_args
    comfy.cli_args.args.use_pytorch_cross_attention = True  # read at ComfyUI's import
    import torch
    torch.set_num_threads(args.threads)
    return comfy_runtime.load_pack()


def load_unet(family, device):
    import torch
    import comfy.sd
    from full_size import full_checkpoint
    options = {"dtype": torch.bfloat16}
    return comfy.sd.load_checkpoint_guess_config(str(full_checkpoint(family)), output_vae=False, output_clip=False,
                                                 model_options=options)[0]


def inputs(family, frames, size):
    import torch
    g = torch.Generator().manual_seed(0)
    width, pooled = CONTEXT[family]
    extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=g),
                                       "width": size * 8, "height": size * 8}
    positive = [[torch.randn(1, 77, width, generator=g), extra]]
    base = torch.randn(1, 4, size, size, generator=g)
    return {"samples": base + 0.5 * torch.randn(frames, 4, size, size, generator=g)}, positive


def patched(pack, model, setting):
    import importlib
    apply = importlib.import_module(f"{pack.__name__}.nodes.apply_attention").TuneAVideoApplyAttention()
    return apply.apply(model, "sparse_causal", 1, True, True, temporal_width=SETTINGS[setting]["temporal_width"])[0]


def tune(pack, model, latent, positive, setting, steps, callback=None, lr=3e-5):
    import importlib
    import torch
    ost = importlib.import_module(f"{pack.__name__}.sampling.one_shot_tuning")
    with torch.inference_mode():
        return ost.tune_clip(model, latent, positive, steps=steps, learning_rate=lr, seed=0, precision="bf16",
                             callback=callback, query_rank=SETTINGS[setting]["query_rank"],
                             recompute_all=SETTINGS[setting]["recompute_all"])


def run_measure(args):
    """Every size of --sizes (and the fit cost with --fit-steps) on one load of the checkpoint."""
    pack = setup(args)
    model = patched(pack, load_unet(args.family, args.device), args.setting)
    out = {}
    for size in args.sizes.split():
        frames, latent_size = (int(v) for v in size.split("x"))
        out[size] = measure_one(pack, model, args, frames, latent_size)
        print(f"# {size}: {json.dumps(out[size])}", file=sys.stderr, flush=True)
    if args.fit_steps:
        frames, latent_size = (int(v) for v in args.fit_size.split("x"))
        out["fitcost"] = fitcost(pack, model, args, frames, latent_size)
    return out


def measure_one(pack, model, args, frames, size):
    import torch
    import comfy.model_management
    from torch.utils.flop_counter import FlopCounterMode
    cuda = args.device == "cuda"
    latent, positive = inputs(args.family, frames, size)
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    weights = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    result = {"weights_bytes": weights}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        tune(pack, model, latent, positive, args.setting, 2)
        result["peak_bytes"] = torch.cuda.max_memory_allocated() - before
    else:
        backward = torch.Tensor.backward

        def marked(tensor, *a, **k):  # the loop's loss.backward(): forward ends, then the optimizer step
            live.mark("backward")
            try:
                return backward(tensor, *a, **k)
            finally:
                live.mark("step")
        live = live_bytes_mode()
        torch.Tensor.backward = marked
        try:
            with live:
                tune(pack, model, latent, positive, args.setting, 2,
                     callback=lambda *_: live.mark("forward"))
        finally:
            torch.Tensor.backward = backward
        result["peak_bytes"], result["phase_peak"], result["kept_at_backward"] = \
            live.peak, live.phase_peak, live.at_backward
    with FlopCounterMode(display=False) as counter:
        tune(pack, model, latent, positive, args.setting, 1)
    result["flops"] = counter.get_total_flops()
    stamps = []
    tune(pack, model, latent, positive, args.setting, args.steps, lambda *_: stamps.append(time.perf_counter()))
    result["s_per_step"] = min(b - a for a, b in zip(stamps, stamps[1:]))
    return result


def eval_loss(pack, model, latent, positive):
    """Mean noise-prediction MSE at FIXED_T with fixed noise (ComfyUI's guider prepares the model call)."""
    import importlib
    import torch
    import comfy.samplers
    objective = importlib.import_module(f"{pack.__name__}.sampling.tuning_objective")

    class Eval(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, *rest, **kw):
            ms = model_wrap.inner_model.model_sampling
            g, x0, total = torch.Generator().manual_seed(7), latent_image.float(), 0.0
            for t in FIXED_T:
                sigma = ms.sigmas[t:t + 1].float().to(x0.device)
                x_t = ms.noise_scaling(sigma, torch.randn(x0.shape, generator=g).to(x0.device), x0)
                with torch.autocast(x0.device.type, dtype=torch.bfloat16):
                    denoised = model_wrap(x_t, sigma.expand(x0.shape[0]), **extra_args)
                total += float(objective.denoising_loss(ms, denoised, x0, sigma))
            self.loss = total / len(FIXED_T)
            return latent_image

    sampler, guider = Eval(), comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": positive})
    guider.set_cfg(1.0)
    with torch.inference_mode():
        guider.sample(torch.zeros_like(latent["samples"]), latent["samples"], sampler, torch.ones(2), seed=0)
    return sampler.loss


def fitcost(pack, model, args, frames, size):
    latent, positive = inputs(args.family, frames, size)
    before = eval_loss(pack, model, latent, positive)
    tuned, adapter, losses = tune(pack, model, latent, positive, args.setting, args.fit_steps, lr=args.lr)
    return {"loss_before": before, "loss_after": eval_loss(pack, tuned, latent, positive),
            "train_loss_last5": sum(losses[-5:]) / len(losses[-5:])}


def run_e2e(args):
    pack = setup(args)
    import gc
    import importlib
    import tempfile
    import torch
    import comfy.model_management
    import comfy.sd
    import folder_paths
    import nodes as core
    from full_size import full_checkpoint
    mod = lambda name: importlib.import_module(f"{pack.__name__}.nodes.{name}")  # noqa: E731
    folder_paths.folder_names_and_paths["tune_a_video"] = ([tempfile.mkdtemp()], {".safetensors"})
    frames = torch.rand(args.frames, args.size * 8, args.size * 8, 3, generator=torch.Generator().manual_seed(0))

    def load():
        return comfy.sd.load_checkpoint_guess_config(str(full_checkpoint("sdxl")), model_options={"dtype": torch.bfloat16})[:3]

    def edit(model, clip, vae):
        encode = core.CLIPTextEncode().encode
        source, target, empty = (encode(clip, t)[0] for t in ("a red ball rolling", "a blue cube rolling", ""))
        (chunked,) = mod("long_clip_nodes").TuneAVideoLongClip().patch(model, args.frames // 2 + 1, 1)
        latent = core.VAEEncode().encode(vae, frames)[0]
        (inv,) = mod("inversion_nodes").TuneAVideoInvert().invert(chunked, latent, source, 3, 0, "tune_a_video",
                                                                  1.0, 0.5, 4)
        (out,) = mod("sampler_nodes").TuneAVideoSampler().sample(chunked, target, empty, inv, 0, 3, 7.5, "ddim",
                                                                 "ddim_uniform", 1.0)
        return core.VAEDecode().decode(vae, out)[0], source, latent

    t0 = time.perf_counter()
    with torch.inference_mode():
        model, clip, vae = load()
        source = core.CLIPTextEncode().encode(clip, "a red ball rolling")[0]
        latent = core.VAEEncode().encode(vae, frames)[0]
        model = mod("apply_attention").TuneAVideoApplyAttention().apply(
            model, "sparse_causal", 1, True, True, temporal_width=SETTINGS["compact"]["temporal_width"])[0]
        tnodes = mod("tuning_nodes")
        tuned, adapter = tnodes.TuneAVideoTune().tune(model, latent, source, args.steps, 3e-5, 0, "tune_a_video",
                                                      "bf16", True, 0, "a red ball rolling",
                                                      SETTINGS["compact"]["query_rank"], True)
        name = tnodes.TuneAVideoSaveAdapter().save(adapter, "sdxl_compact")["ui"]["text"][0]
        first, *_ = edit(tuned, clip, vae)
        del model, tuned, clip, vae, adapter
        gc.collect()
        comfy.model_management.cleanup_models_gc()
        model, clip, vae = load()  # a fresh load of the checkpoint
        loaded, _ = tnodes.TuneAVideoLoadAdapter().load(model, name)
        second, *_ = edit(loaded, clip, vae)
    path = folder_paths.get_full_path_or_raise("tune_a_video", name)
    return {"adapter_bytes": Path(path).stat().st_size, "equal": bool(torch.equal(first, second)),
            "max_abs_diff": float((first - second).abs().max()), "finite": bool(torch.isfinite(second).all()),
            "seconds": time.perf_counter() - t0, "peak_rss": peak_rss()}


def main(argv):
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("run", choices=["measure", "e2e"])
    ap.add_argument("--family", default="sdxl")
    ap.add_argument("--setting", default="compact", choices=list(SETTINGS))
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="measure: steps of the timed run (the first untimed); e2e: tuning steps")
    ap.add_argument("--sizes", default="2x8", help="measure: frames x latent size, e.g. '2x8 4x16'")
    ap.add_argument("--fit-steps", type=int, default=0, help="measure: also the fit cost after this many steps")
    ap.add_argument("--fit-size", default="2x16")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    print(json.dumps({"measure": run_measure, "e2e": run_e2e}[args.run](args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

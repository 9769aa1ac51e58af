"""One measurement of benchmark_real_size.py, in its own process: one One-Shot Tune step (or one batched
cond+uncond sampling call) on a full-size random checkpoint, by this pack or by the official code.

  pack:     the node's entry point (sampling/one_shot_tuning.tune_clip) with its defaults: bf16 autocast,
            gradient checkpointing, the official trainables; the checkpoint loaded by ComfyUI's own loader.
  official: tests/tav_reference.py (diffusers' UNet2DConditionModel converted from the same checkpoint by
            diffusers, inflated as the paper: sparse-causal SDPA attention, temporal attention, clip-wide
            GroupNorm), the official trainer's settings: fp32 UNet weights, autocast mixed precision,
            diffusers' gradient checkpointing (non-reentrant), AdamW lr 3e-5 wd 1e-2, grad-norm clip 1.

Memory: the resident set (big allocations mmap'd, MALLOC_MMAP_THRESHOLD_, so freed tensors leave it; on a
GPU the CUDA allocator's counters) in phases, the peak counter reset between them (/proc/self/clear_refs):
loaded weights, end of forward (kept for backward), forward peak, backward + optimizer peak, after the step.
Tensors autograd saves OUTSIDE checkpointed regions are counted by saved_tensors_hooks, split into weight
copies (a parameter's shape) and activations. Prints JSON.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401
from memory_phases import CUDA, Phases, SavedCounter, StopAfterForward, flops_of  # noqa: E402

CONTEXT = {"sd15": 768, "sd21v": 1024, "sdxl": 2048}


def pack_run(a):
    import comfy_runtime
    comfy_runtime.import_comfy()
    import comfy.cli_args
    comfy.cli_args.args.use_pytorch_cross_attention = True  # SDPA, as on a GPU (flash / memory-efficient)
    if a["unet_dtype"] == "bf16" and not CUDA:
        comfy.cli_args.args.bf16_unet = True
    import torch
    import comfy.model_management
    import comfy.sd
    from full_size import full_checkpoint

    pack = comfy_runtime.load_pack()
    import importlib
    ost = importlib.import_module(f"{pack.__name__}.sampling.one_shot_tuning")
    objective = importlib.import_module(f"{pack.__name__}.sampling.tuning_objective")
    unet_patch = importlib.import_module(f"{pack.__name__}.attention_patches.unet_patch")
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(full_checkpoint(a["family"])), output_vae=False,
                                                      output_clip=False)[0]
    f, s, family = a["frames"], a["size"], a["family"]
    g = torch.Generator().manual_seed(0)
    latent = {"samples": torch.randn(f, 4, s, s, generator=g)}
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
    positive = [[torch.randn(1, 77, CONTEXT[family], generator=g), extra]]
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    shapes = {tuple(p.shape) for p in model.model.diffusion_model.parameters() if p.ndim >= 2}
    out = {"unet_dtype": str(next(model.model.diffusion_model.parameters()).dtype)}
    phases, counter = Phases(), SavedCounter(shapes)
    if a["case"] == "tune":
        state = {}

        original = objective.denoising_loss

        def loss_hook(*args, **kw):
            phases.end_forward()
            if a.get("forward_only"):  # SDXL on a shared 24 GB CPU: grads + AdamW (7.4 GB) are counted, not made
                raise StopAfterForward
            return original(*args, **kw)
        objective.denoising_loss = loss_hook

        def on_step(step, loss, params):
            phases.end_step()
            state["trainable"] = sum(p.numel() * p.element_size() for p in params.values())
            state["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in params.values() if p.grad is not None)
            state["n_trainable"] = sum(p.numel() for p in params.values())

        def step(callback=None):
            with torch.inference_mode():
                ost.tune_clip(model, latent, positive, steps=1, learning_rate=3e-5, seed=0, callback=callback,
                              recompute_all=a.get("recompute_all", False))
        if CUDA:
            step()  # warm-up (kernel selection, allocator)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            phases.base()
            try:
                step(on_step)
            except StopAfterForward:
                phases.end_step()
                n = sum(6 * b.attn1.to_q.in_features ** 2 + b.attn1.to_q.in_features
                        for _, _, b in unet_patch.transformer_blocks(model.model.diffusion_model))
                state.update(n_trainable=n, trainable=4 * n, grads=4 * n)  # official trainables, fp32
        objective.denoising_loss = original
        out.update(state, optimizer=2 * state["trainable"])  # AdamW: exp_avg + exp_avg_sq, fp32 like the params
    else:
        # tune_a_video init: the temporal attention computes (an identity layer is skipped at inference)
        patched = unet_patch.apply_tav(model, unet_patch.TAVConfig(temporal_init="tune_a_video"))
        conds = [positive, [[torch.zeros_like(positive[0][0]), dict(extra)]]]

        def one_call(m, x, sigmas, extra_args=None, callback=None, disable=None):  # a 'sampler': one guided call
            denoised = m(x, sigmas[0] * x.new_ones(x.shape[0]), **(extra_args or {}))
            phases.end_forward()
            return denoised

        def step(callback=None):
            import comfy.samplers
            with torch.inference_mode():
                noise = torch.randn(f, 4, s, s, generator=torch.Generator().manual_seed(1))
                guider = comfy.samplers.CFGGuider(patched)
                guider.inner_set_conds({"positive": conds[0], "negative": conds[1]})
                guider.set_cfg(12.5)
                sigmas = patched.get_model_object("model_sampling").sigmas[[500, 0]].float()
                guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(one_call), sigmas, seed=0)
        step() if CUDA else None  # warm-up
        phases.base()
        step()
        phases.end_step()
    out.update(phases.marks, seconds=phases.t1 - phases.t0, saved_weights=counter.weights,
               saved_activations=counter.activations)
    if a["flops"]:
        out["flops"], out["flops_by_op"] = flops_of(step)
    return out


def official_run(a):
    import comfy_runtime
    comfy_runtime.import_comfy()
    import safetensors.torch
    import torch
    import torch.nn.functional as F
    from full_size import UNET_CONFIGS, full_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    import tav_reference as ref

    prefix = "model.diffusion_model."
    with safetensors.torch.safe_open(str(full_checkpoint(a["family"])), "pt") as fh:
        state = {k[len(prefix):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}
    config = dict(UNET_CONFIGS[a["family"]], num_heads=8)
    unet = ref.diffusers_unet(state, config)  # fp32 weights, as the official trainer keeps the UNet
    del state
    device = "cuda" if CUDA else "cpu"
    unet.to(device)
    f, s = a["frames"], a["size"]
    temporal = ref.inflate(unet, f)
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if n.endswith(("attn1.to_q.weight", "attn2.to_q.weight"))]
    params += [p for layer in temporal.values() for p in layer.attn_temp.parameters()]
    for p in params:
        p.requires_grad_(True)
    unet.enable_gradient_checkpointing()
    unet.train()
    sched = ref.official_scheduler()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(f, 4, s, s, generator=g).to(device)
    context = torch.randn(1, 77, CONTEXT[a["family"]], generator=g).expand(f, -1, -1).to(device)
    optimizer = torch.optim.AdamW(params, lr=3e-5, weight_decay=1e-2)
    shapes = {tuple(p.shape) for p in unet.parameters() if p.ndim >= 2}
    phases, counter = Phases(), SavedCounter(shapes)
    dtype = torch.bfloat16 if a["autocast"] == "bf16" else torch.float16
    out = {"unet_dtype": "torch.float32"}
    if a["case"] == "tune":
        def step(marks=False):
            noise = torch.randn(latents.shape, generator=g).to(device)
            t = 500
            noisy = sched.add_noise(latents, noise, torch.tensor([t], device=device))
            with torch.autocast(device, dtype=dtype):
                pred = unet(noisy, t, encoder_hidden_states=context).sample
            if marks:
                phases.end_forward()
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if marks:
                phases.end_step()
                out["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in params)
            optimizer.zero_grad(set_to_none=True)
        if CUDA:
            step()  # warm-up; the measured step starts from a fresh optimizer, as the pack's does
            optimizer.state.clear()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            phases.base()
            step(marks=True)
        out["trainable"] = sum(p.numel() * p.element_size() for p in params)
        out["n_trainable"] = sum(p.numel() for p in params)
        out["optimizer"] = sum(v.numel() * v.element_size() for st in optimizer.state.values()
                               for v in st.values() if torch.is_tensor(v) and v.ndim > 0)
    else:
        unet.eval()
        unet.to(dtype)  # the official pipeline samples with half-precision weights

        def step(marks=False):
            with torch.no_grad():
                unet(torch.cat([latents] * 2).to(dtype), 500,
                     encoder_hidden_states=torch.cat([context, 0 * context]).to(dtype)).sample
            if marks:
                phases.end_forward()
        step() if CUDA else None  # warm-up
        phases.base()
        step(marks=True)
        phases.end_step()
    out.update(phases.marks, seconds=phases.t1 - phases.t0, saved_weights=counter.weights,
               saved_activations=counter.activations)
    if a["flops"]:
        out["flops"], out["flops_by_op"] = flops_of(step)
    return out


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = (pack_run if args["system"] == "pack" else official_run)(args)
    print("RESULT " + json.dumps(result))

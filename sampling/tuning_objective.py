"""Tune-A-Video's tuning objective and optimisation loop, as pure functions of a model call.

Every step takes ALL frames of the clip, draws ONE timestep t ~ U{0..T-1} shared by the frames and
Gaussian noise per frame, noises the clip (x_t = x_0 + sigma_t * noise in ComfyUI's units, i.e.
sqrt(a_t) x_0 + sqrt(1 - a_t) noise at the UNet input) and minimises the MSE of the noise prediction
(the velocity for v-prediction models). AdamW (weight decay 1e-2) with the gradient norm clipped to 1,
as the official trainer.
"""
from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import trange

import comfy.model_management

NODE = "Tune-A-Video One-Shot Tune"


def prediction_scale(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """b(sigma) in ComfyUI's denoised = a(sigma) * x - b(sigma) * model_output (eps: sigma)."""
    zero = torch.zeros(1, 1, 1, 1, device=sigma.device)
    return (model_sampling.calculate_denoised(sigma, zero, zero)
            - model_sampling.calculate_denoised(sigma, zero + 1, zero)).reshape(())


def denoising_loss(model_sampling, denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor):
    """MSE of the model's own prediction target, from ComfyUI's denoised output.

    denoised = a x_t - b out, and the out that denoises exactly is its target, so out - target =
    (x0 - denoised) / b: for eps models that is noise_pred - noise (TAV's loss), for v models v - v_target.
    """
    return ((denoised.float() - x0) / prediction_scale(model_sampling, sigma)).square().mean()


def draw_step(generator: torch.Generator, num_timesteps: int, shape) -> tuple[int, torch.Tensor]:
    """One training draw: a timestep shared by all frames, Gaussian noise per frame (CPU, seeded)."""
    t = int(torch.randint(num_timesteps, (1,), generator=generator))
    return t, torch.randn(shape, generator=generator)


def run_tuning(denoise, x0, model_sampling, params: dict, steps: int, learning_rate: float, seed: int,
               autocast_dtype=None, grad_scaling=False, callback=None, disable_pbar=True, draw=draw_step) -> list[float]:
    """The training loop. denoise(x_t, sigma[frames]) -> denoised (ComfyUI's model call); x0: the clip in
    model space [F, C, H, W]; params: name -> trainable tensor. callback(step, loss, params) after each
    optimizer step (gradients still attached). draw(generator, T, shape) -> (t, noise). Returns the loss per step.
    """
    device = x0.device
    sigmas = model_sampling.sigmas.detach().float().cpu().clone()
    optimizer = torch.optim.AdamW(list(params.values()), lr=learning_rate, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type) if grad_scaling else None
    generator = torch.Generator().manual_seed(seed)
    losses = []
    pbar = trange(steps, desc="Tune-A-Video tuning", disable=disable_pbar)
    for step in pbar:
        comfy.model_management.throw_exception_if_processing_interrupted()
        t, noise = draw(generator, len(sigmas), x0.shape)
        sigma = sigmas[t:t + 1].to(device)
        x_t = model_sampling.noise_scaling(sigma, noise.to(device), x0)
        optimizer.zero_grad(set_to_none=True)
        with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()):
            denoised = denoise(x_t, sigma.expand(x0.shape[0]))
        loss = denoising_loss(model_sampling, denoised, x0, sigma)
        value = float(loss.detach())
        if not math.isfinite(value):
            # a plain ValueError: ComfyUI shows an exception's module path, which would name the install folder
            raise ValueError(_divergence_message(value, step, steps, first=step == 0))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        losses.append(value)
        pbar.set_postfix(loss=f"{value:.4f}")
        if callback is not None:
            callback(step, value, params)
    return losses


def _divergence_message(value, step, steps, first) -> str:
    if first:  # nothing was trained yet: the model or the inputs are broken, not the learning rate
        return (f"{NODE}: the model's output is {value} on the first step, before any training. The model "
                "itself produces NaN/inf: check the checkpoint, LoRAs or adapters applied to it (a loaded "
                "adapter or official UNet holding NaN), and the latent (VAE Encode in fp32).")
    return (f"{NODE}: the loss became {value} at step {step + 1} of {steps} (the tuning diverged). Lower "
            "learning_rate, use bf16 or fp32 precision, and check the latent (VAE Encode in fp32).")

"""DDIM inversion (Tune-A-Video's structure guidance) in k-diffusion's sigma form.

In sigma units (x = x0 + sigma * eps, ComfyUI's model space), deterministic DDIM (eta = 0) is the
Euler step of the probability-flow ODE: x_lo = x_hi + (sigma_lo - sigma_hi) * eps(x_hi, sigma_hi),
which is what ComfyUI's "ddim" and "euler" samplers run. Inversion climbs the same schedule:

    x_hi = x_lo + (sigma_hi - sigma_lo) * eps(x_hi, sigma_hi)

The right side needs the unknown x_hi. Plain DDIM inversion (Tune-A-Video, diffusers) estimates the
noise at the current latent instead; each fixed-point iteration re-estimates it at the last guess,
converging to the x_hi that the sampler's step maps back to x_lo exactly.

`model(x, sigma, **extra_args)` returns the denoised prediction, as in k-diffusion and ComfyUI.
"""
import torch
from tqdm.auto import trange


def inversion_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """A sampler's descending schedule (ending at 0) reversed: the noise levels inversion climbs."""
    return sigmas.flip(0)


def to_eps(x, sigma, denoised):
    """The noise estimate (k-diffusion's `to_d`): (x - denoised) / sigma."""
    return (x - denoised) / sigma


def ddim_inversion_step(model, x, sigma, sigma_next, extra_args=None, fixed_point_iterations=0,
                        input_ratio=1.0):
    """One inversion step from noise level `sigma` up to `sigma_next` (> 0).

    input_ratio: where the first noise estimate is taken: the model sees `x * input_ratio` at
    sigma_next. Tune-A-Video feeds the current (VP-scaled) latent unchanged to the UNet at the next
    timestep; in sigma units that is c_in(sigma) / c_in(sigma_next) (see `vp_input_ratio`).
    fixed_point_iterations: k re-estimates of the noise at the latest guess (k + 1 model calls).
    Returns (x_next, denoised of the last model call).
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    dt = sigma_next - sigma
    guess = x * input_ratio
    for _ in range(fixed_point_iterations + 1):
        denoised = model(guess, sigma_next * s_in, **extra_args)
        guess = x + to_eps(guess, sigma_next, denoised) * dt
    return guess, denoised


def vp_input_ratio(sigma, sigma_next, sigma_data=1.0):
    """c_in(sigma) / c_in(sigma_next) for eps/v models, c_in(s) = 1 / sqrt(s^2 + sigma_data^2)."""
    return ((sigma_next ** 2 + sigma_data ** 2) / (sigma ** 2 + sigma_data ** 2)) ** 0.5


@torch.no_grad()
def sample_ddim_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None,
                          fixed_point_iterations=0, input_ratio=None):
    """Invert clean latents `x` (model space) along ascending `sigmas` (sigmas[0] usually 0).

    Returns the latents at sigmas[-1]: starting a deterministic Euler/DDIM sampler there on the
    reversed schedule with the same model and conditioning reproduces `x` (exactly in the limit of
    many fixed-point iterations). input_ratio(sigma, sigma_next) -> scalar picks the first estimate's
    input (see `ddim_inversion_step`); None uses x unchanged.
    """
    extra_args = {} if extra_args is None else extra_args
    for i in trange(len(sigmas) - 1, disable=disable):
        ratio = 1.0 if input_ratio is None else input_ratio(sigmas[i], sigmas[i + 1])
        x, denoised = ddim_inversion_step(model, x, sigmas[i], sigmas[i + 1], extra_args,
                                          fixed_point_iterations, ratio)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i + 1], "denoised": denoised})
    return x

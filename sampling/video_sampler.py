"""Inversion and sampling of a clip (a latent batch of F frames) through ComfyUI's own machinery.

Both run under comfy.samplers.CFGGuider (model loading, conds, hooks, ControlNet, wrappers and model
patches apply as in KSampler); every model call sees the whole clip. Inverted latents carry
INVERSION_KEY so the sampler starts exactly from them on the inversion's sigmas, with no fresh noise.
"""
from __future__ import annotations

import math

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview  # ComfyUI's own module (progress bar + previews), like nodes.common_ksampler

from ..attention_patches.feature_injection import STORE_KEY, FeatureStore, injection_path
from ..attention_patches.unet_patch import get_tav_patch, unet_of
from .ddim_inversion import inversion_sigmas, sample_ddim_inversion, vp_input_ratio
from .validation import MAX_FIXED_POINT_ITERATIONS, check_latent, check_steps

INVERSION_KEY = "tav_inversion"
SCHEDULE = "ddim_uniform"  # ComfyUI's DDIM timesteps (1, 21, ..., 981 for 50 steps on SD1.x)
# Inversion schedules. tune_a_video: the official DDIMScheduler (leading timesteps + steps_offset 1, and
# set_alpha_to_one False: the clean latent sits at alphas_cumprod[0], sigma_0 ~ 0.029 on SD1.x, where
# inversion starts and sampling ends). comfyui: ComfyUI's ddim_uniform from and to sigma = 0.
SCHEDULES = ("tune_a_video", "comfyui")


def latent_channels(model) -> int:
    return model.get_model_object("latent_format").latent_channels


def _eps_like(model, node_name):
    model_sampling = model.get_model_object("model_sampling")
    if not isinstance(model_sampling, comfy.model_sampling.EPS):
        raise ValueError(f"{node_name} supports eps- and v-prediction models (SD1.x, SD2.x, SDXL); "
                         f"this model samples with {type(model_sampling).__name__}.")
    return model_sampling


def inversion_schedule(model, steps: int, schedule: str = "tune_a_video") -> torch.Tensor:
    """The sampler's descending sigmas for `steps` DDIM steps, on CPU in fp32.

    tune_a_video: sigmas at timesteps (T // steps) * i + 1 for i = steps-1 .. 0, then sigma at timestep 0;
    comfyui: ComfyUI's ddim_uniform, ending at 0.
    """
    model_sampling = model.get_model_object("model_sampling")
    if schedule == "comfyui":
        return comfy.samplers.calculate_sigmas(model_sampling, SCHEDULE, steps).float().cpu()
    table = model_sampling.sigmas.float().cpu()
    timesteps = (torch.arange(steps) * (len(table) // steps) + 1).clamp(max=len(table) - 1)
    return torch.cat([table[timesteps.flip(0)], table[:1]])


def vp_scale(sigma, sigma_data=1.0) -> float:
    """sqrt(1 + (sigma / sigma_data)^2): a latent treated as the VP sample at `sigma` is this many times
    smaller than ComfyUI's model-space sample x0 + sigma * eps (1 at sigma = 0)."""
    return float((1 + (sigma / sigma_data) ** 2) ** 0.5)


class DDIMInversionSampler(comfy.samplers.Sampler):
    """A comfy Sampler that climbs the schedule instead of descending it (see ddim_inversion)."""

    def __init__(self, fixed_point_iterations=0, sigma_data=1.0):
        self.fixed_point_iterations = fixed_point_iterations
        self.sigma_data = sigma_data

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        def model(x, sigma, **kwargs):
            comfy.model_management.throw_exception_if_processing_interrupted()
            return model_wrap(x, sigma, **kwargs)

        k_callback = None
        if callback is not None:
            total = len(sigmas) - 1
            k_callback = lambda d: callback(d["i"], d["denoised"], d["x"], total)
        ratio = lambda s, s_next: vp_input_ratio(s, s_next, self.sigma_data)
        # a schedule starting above 0 (tune_a_video) takes the clean latent as the VP sample at sigmas[0]
        latent_image = latent_image * vp_scale(sigmas[0], self.sigma_data)
        return sample_ddim_inversion(model, latent_image, sigmas, extra_args=extra_args, callback=k_callback,
                                     disable=disable_pbar, fixed_point_iterations=self.fixed_point_iterations,
                                     input_ratio=ratio)


def invert_clip(model, latent, conditioning, steps=50, fixed_point_iterations=0, schedule="tune_a_video",
                strength=1.0, feature_injection=0.0, injection_block=4):
    """DDIM-invert a clip: LATENT in ordinary latent units -> LATENT of the noise at the schedule's top.

    All frames go through the model together, unguided (cfg 1) with `conditioning`. strength < 1 stops
    after the lowest round(strength * n) of the schedule's n steps (at least one; not the paper: partial
    inversion, as img2img's denoise), so sampling starts from a less noisy clip. The result carries
    INVERSION_KEY: {"steps", "sigmas" (descending, the sampler's; strength < 1: the schedule's tail),
    "frames", "size" (latent height, width), "fixed_point_iterations", "schedule", "strength",
    "feature_injection", "injection_block"}
    and, when feature_injection > 0 (not the paper: attention_patches.feature_injection), "feature_store":
    the source's features at decoder block injection_block for the sampler's first round(feature_injection
    * n) steps (at least one), which the Sampler then uses instead of the edit's.
    """
    check_steps(steps)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be a number above 0.0 and at most 1.0, got {strength!r}. "
                         "1.0 inverts all the way to noise (Tune-A-Video).")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}.")
    if not isinstance(fixed_point_iterations, int) or not 0 <= fixed_point_iterations <= MAX_FIXED_POINT_ITERATIONS:
        raise ValueError(f"fixed_point_iterations must be an integer from 0 to {MAX_FIXED_POINT_ITERATIONS}, "
                         f"got {fixed_point_iterations!r}. 0 is plain DDIM inversion; 2-3 reconstruct near-exactly.")
    if not conditioning:
        raise ValueError("conditioning is empty. Connect CLIP Text Encode with an empty prompt "
                         "(Tune-A-Video inverts with \"\") or the clip's prompt.")
    if isinstance(feature_injection, bool) or not isinstance(feature_injection, (int, float)) \
            or not 0.0 <= feature_injection <= 1.0:
        raise ValueError(f"feature_injection must be a number from 0.0 to 1.0, got {feature_injection!r}. "
                         "0.0 injects nothing (Tune-A-Video).")
    samples = check_latent(latent, latent_channels(model))
    model_sampling = _eps_like(model, "Tune-A-Video Invert")
    sigmas = inversion_schedule(model, steps, schedule)
    if strength < 1.0:  # the lowest k steps of the schedule (comfyui's may hold more than `steps` steps)
        n = len(sigmas) - 1
        sigmas = sigmas[n - min(n, max(1, round(strength * n))):]

    store = None
    if feature_injection > 0:
        n = len(sigmas) - 1
        store = FeatureStore(samples.shape[0], sigmas[:max(1, round(feature_injection * n))],
                             injection_path(unet_of(model), injection_block),
                             comfy.model_management.intermediate_device())
        model = _with_store(model, "record", store, "Tune-A-Video Invert")
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": conditioning})
    guider.set_cfg(1.0)
    sampler = DDIMInversionSampler(fixed_point_iterations, float(model_sampling.sigma_data))
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    noise = torch.zeros_like(samples)  # unused: inversion adds no noise
    out = guider.sample(noise, samples, sampler, inversion_sigmas(sigmas), callback=callback,
                        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0)
    out = out.to(comfy.model_management.intermediate_device())
    info = {"steps": steps, "sigmas": sigmas, "frames": samples.shape[0], "size": tuple(samples.shape[-2:]),
            "fixed_point_iterations": fixed_point_iterations, "schedule": schedule, "strength": strength,
            "feature_injection": feature_injection, "injection_block": injection_block}
    if store is not None:
        info["feature_store"] = store
    return {"samples": out, INVERSION_KEY: info}


def _with_store(model, mode, store, node_name):
    """A clone of a Tune-A-Video model that records into / replays from `store` (feature injection)."""
    if get_tav_patch(model) is None:
        raise ValueError(f"{node_name}: feature injection needs a Tune-A-Video model (connect it through "
                         "Tune-A-Video Apply Attention, Tune or Load Adapter), or set feature_injection to 0.")
    m = model.clone()
    m.model_options["transformer_options"] = {**m.model_options.get("transformer_options", {}),
                                              STORE_KEY: (mode, store)}
    return m


def sample_clip(model, positive, negative, latent, seed=0, steps=50, cfg=12.5, sampler_name="ddim",
                scheduler=SCHEDULE, denoise=1.0):
    """Sample a clip with ComfyUI's KSampler machinery (comfy.sample.sample).

    From inverted latents (INVERSION_KEY present) no noise is added and the inversion's sigmas are
    used, so the deterministic samplers retrace the inversion; otherwise it is KSampler on a batch.
    """
    check_steps(steps)
    samples = check_latent(latent, latent_channels(model))
    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise ValueError(f"sampler_name {sampler_name!r} is not one of ComfyUI's samplers.")
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r} is not one of ComfyUI's schedulers.")
    if not (isinstance(denoise, (int, float)) and 0.0 <= denoise <= 1.0):
        raise ValueError(f"denoise must be between 0.0 and 1.0, got {denoise!r}. Use 1.0 to sample a whole clip.")
    if not isinstance(cfg, (int, float)) or not math.isfinite(cfg):
        raise ValueError(f"cfg must be a finite number, got {cfg!r}. Tune-A-Video uses 12.5.")

    inversion = latent.get(INVERSION_KEY)
    sigmas = None
    if inversion is not None:
        _check_inverted(latent, samples, inversion, steps, denoise)
        _eps_like(model, "Tune-A-Video Sampler with inverted latents")
        sigmas = inversion["sigmas"]
        if inversion.get("feature_store") is not None:  # the source's decoder features, for the first steps
            model = _with_store(model, "replay", inversion["feature_store"], "Tune-A-Video Sampler")
        noise = torch.zeros_like(samples)  # the inverted latents are already the noisy start
        noise_mask = None
    else:
        samples = comfy.sample.fix_empty_latent_channels(model, samples)
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        noise_mask = latent.get("noise_mask")

    callback = latent_preview.prepare_callback(model, steps if sigmas is None else len(sigmas) - 1)
    out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, samples,
                              denoise=denoise, noise_mask=noise_mask, sigmas=sigmas, callback=callback,
                              disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    if sigmas is not None and float(sigmas[-1]) > 0:  # tune_a_video: decode the VP sample at sigma_0
        latent_format = model.get_model_object("latent_format")
        scale = vp_scale(sigmas[-1], float(model.get_model_object("model_sampling").sigma_data))
        out = latent_format.process_out(latent_format.process_in(out) / scale)
    result = {k: v for k, v in latent.items() if k != INVERSION_KEY}
    result["samples"] = out
    return result


def _check_inverted(latent, samples, inversion, steps, denoise):
    if steps != inversion["steps"]:
        raise ValueError(f"steps ({steps}) must equal the steps of Tune-A-Video Invert ({inversion['steps']}) "
                         "when latent holds inverted noise: set both to the same value.")
    if samples.shape[0] != inversion["frames"]:
        raise ValueError(f"latent has {samples.shape[0]} frames but was inverted with {inversion['frames']}: "
                         "sample the inverted clip as it is (no batch slicing or repeating in between), "
                         "or invert the frames you want to sample.")
    size = inversion.get("size", tuple(samples.shape[-2:]))
    if tuple(samples.shape[-2:]) != size:
        raise ValueError(f"latent is {samples.shape[-1]}x{samples.shape[-2]} latent pixels but was inverted at "
                         f"{size[1]}x{size[0]}: inverted noise is only noise at the size it was inverted at. Sample "
                         "the inverted clip as it is (no upscaling, cropping or resizing between Invert and the "
                         "Sampler), or resize the frames before VAE Encode and invert those.")
    if denoise < 0.9999:
        raise ValueError(f"denoise must be 1.0 when latent holds inverted noise (got {denoise}); "
                         "inversion already chose the starting noise level. Use fewer steps instead.")
    if "noise_mask" in latent:
        raise ValueError("latent holds inverted noise and a noise_mask; masks are not supported on inverted "
                         "latents. Remove Set Latent Noise Mask between Invert and the Sampler.")

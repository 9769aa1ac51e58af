"""TuneAVideoSampler: sample a clip from inverted noise or an empty latent batch (sampling.video_sampler)."""
import comfy.samplers

from ..sampling.validation import MAX_STEPS
from ..sampling.video_sampler import SCHEDULE, sample_clip


class TuneAVideoSampler:
    DESCRIPTION = ("Samples a clip with ComfyUI's KSampler machinery (ControlNet, LoRA and model patches "
                   "apply). From Tune-A-Video Invert's latents it adds no noise and retraces the inversion's "
                   "schedule; from an empty latent batch of F frames it generates a new clip.")
    CATEGORY = "Tune-A-Video"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The sampled clip's latents (decode with VAE Decode).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The Tune-A-Video patched model (tuned or not)."}),
            "positive": ("CONDITIONING", {"tooltip": "The (edited) prompt for the clip."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (an empty prompt as in Tune-A-Video)."}),
            "latent": ("LATENT", {"tooltip": "Inverted noise from Tune-A-Video Invert, or an empty latent batch "
                                             "with one latent per frame."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "Seed of the starting noise (unused for inverted latents, which need no "
                                        "noise; stochastic samplers still draw from it)."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": MAX_STEPS, "tooltip":
                "Sampling steps; for inverted latents it must equal Tune-A-Video Invert's steps."}),
            "cfg": ("FLOAT", {"default": 12.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip":
                "Classifier-free guidance scale (Tune-A-Video: 12.5). 1.0 with the inversion's prompt "
                "reconstructs the source clip."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "ddim", "tooltip":
                "ddim (deterministic, Tune-A-Video) retraces an inversion; so do euler and other deterministic "
                "samplers approximately. Ancestral/SDE samplers add fresh noise every step and lose the "
                "inverted structure."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": SCHEDULE, "tooltip":
                "Noise schedule (ddim_uniform = DDIM's). Inverted latents always use the inversion's own sigmas, "
                "so this only applies to non-inverted latents."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                "Fraction of the schedule to run (must be 1.0 for inverted latents)."}),
        }}

    def sample(self, model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, denoise):
        return (sample_clip(model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler,
                            denoise),)

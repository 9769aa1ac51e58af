"""TuneAVideoInvert: DDIM inversion of a clip (sampling.ddim_inversion through sampling.video_sampler)."""
from ..sampling.validation import MAX_FIXED_POINT_ITERATIONS, MAX_STEPS
from ..sampling.video_sampler import SCHEDULES, invert_clip


class TuneAVideoInvert:
    DESCRIPTION = ("DDIM inversion of a clip (Tune-A-Video's structure guidance): runs the model's own "
                   "deterministic DDIM schedule backwards from the clip's latents to noise. Sample from the "
                   "result with Tune-A-Video Sampler (same steps) to edit the clip with a new prompt.")
    CATEGORY = "Tune-A-Video"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The inverted noise in ordinary latent units, marked so Tune-A-Video Sampler starts "
                       "from it without adding noise.",)
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The (Tune-A-Video patched, tuned or not) model; invert with the "
                                           "same model you sample with."}),
            "latent": ("LATENT", {"tooltip": "The source clip: VAE-encoded frames, one latent per frame. All "
                                             "frames go through the model together."}),
            "conditioning": ("CONDITIONING", {"tooltip": "Tune-A-Video inverts with the empty prompt: connect "
                                                         "CLIP Text Encode with an empty text. Used unguided (cfg 1)."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": MAX_STEPS, "tooltip":
                "DDIM steps. Tune-A-Video Sampler must use the same number."}),
            "fixed_point_iterations": ("INT", {"default": 0, "min": 0, "max": MAX_FIXED_POINT_ITERATIONS, "tooltip":
                "0: plain DDIM inversion (Tune-A-Video). k > 0: each step is refined k times so the sampler's "
                "DDIM step maps it back exactly (near-exact reconstruction, (k+1)x the cost; 2-3 is plenty)."}),
        }, "optional": {
            "schedule": (list(SCHEDULES), {"default": "tune_a_video", "tooltip":
                "tune_a_video: the official DDIM schedule (timesteps 1, 21, ..., 981 for 50 steps; the clean clip "
                "sits at the first training noise level, where inversion starts and sampling ends). comfyui: "
                "ComfyUI's ddim_uniform from and to zero noise. The Sampler follows the inversion's schedule."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 1.0, "step": 0.05, "tooltip":
                "How far up the schedule to invert. 1.0: all the way to noise (Tune-A-Video). Lower (past the paper, "
                "like img2img's denoise): invert and then sample only the last strength x steps, so the edit keeps "
                "more of the source's layout and motion but can change less. The Sampler follows it (same steps)."}),
            "feature_injection": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                "Past the paper (Plug-and-Play feature injection). 0: off (Tune-A-Video). Above 0: record the source "
                "clip's features at one decoder block while inverting; the Sampler uses them instead of the edit's "
                "for this share of its steps (the noisiest first), so each edited frame keeps its source frame's "
                "layout and motion. Plug-and-Play uses 0.8; too high and the edit cannot change shape. Needs a "
                "Tune-A-Video model; kept in CPU memory with the latent (about 5 MB per step for 8 frames of SD1.5 "
                "at 512x512)."}),
            "injection_block": ("INT", {"default": 4, "min": 0, "max": 11, "tooltip":
                "Which decoder block (ComfyUI output block) feature_injection takes: 4 is Plug-and-Play's for SD1.5; "
                "later blocks keep more of the source and let the edit change less."}),
        }}

    def invert(self, model, latent, conditioning, steps, fixed_point_iterations, schedule="tune_a_video",
               strength=1.0, feature_injection=0.0, injection_block=4):
        return (invert_clip(model, latent, conditioning, steps, fixed_point_iterations, schedule, strength,
                            feature_injection, injection_block),)

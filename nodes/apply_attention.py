"""TuneAVideoApplyAttention: turn a loaded SD UNet into Tune-A-Video's inflated video UNet."""
from ..attention_patches.frame_attention import MODES
from ..attention_patches.temporal_attention import TEMPORAL_INITS
from ..attention_patches.unet_patch import TEMPORAL_HEAD_WIDTH, TAVConfig, apply_tav
from ..sampling.validation import MAX_WINDOW_RADIUS

MAX_TEMPORAL_WIDTH = 2048


class TuneAVideoApplyAttention:
    DESCRIPTION = ("Patches a copy of the model for video: self-attention becomes cross-frame attention "
                   "and a temporal attention layer follows every transformer block's feed-forward. "
                   "A latent batch of F frames is one clip. The input model is left untouched.")
    CATEGORY = "Tune-A-Video"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model carrying Tune-A-Video's attention patches.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.x, SD2.x or SDXL model (e.g. from Load Checkpoint)."}),
            "attention_mode": (list(MODES), {"default": "sparse_causal", "tooltip":
                "Which frames each frame's self-attention sees. sparse_causal: first + previous frame "
                "(Tune-A-Video). first_frame: frame 0 only. causal: all earlier frames. full: every "
                "frame (memory grows with frames squared). window: frames within ±window_radius plus frame 0."}),
            "window_radius": ("INT", {"default": 2, "min": 0, "max": MAX_WINDOW_RADIUS, "tooltip":
                "Only for attention_mode=window: how many neighbouring frames on each side are seen."}),
            "temporal_attention": ("BOOLEAN", {"default": True, "tooltip":
                "Add Tune-A-Video's temporal attention after each feed-forward. Tuning or a loaded adapter "
                "gives it weights (see temporal_init for the untuned layer)."}),
            "frame_shared_norm": ("BOOLEAN", {"default": True, "tooltip":
                "Normalise res-block and output GroupNorms over all frames of a clip together, as "
                "Tune-A-Video's inflated UNet does. Off: per-frame statistics (image model behaviour); try it "
                "off if objects vanish from some frames (the toy world's UNet needs it off)."}),
        }, "optional": {
            "temporal_init": (list(TEMPORAL_INITS), {"default": "identity", "tooltip":
                "Initial temporal attention (replaced by tuning or an adapter). identity: zero output projection, "
                "so the untuned model is exactly cross-frame attention alone (best for untuned text-to-video). "
                "tune_a_video: the official init (zero output weight, default random output bias), for "
                "reproducing the official code exactly."}),
            "temporal_position_encoding": ("BOOLEAN", {"default": False, "tooltip":
                "Past Tune-A-Video (off = the paper): tell the temporal attention each frame's index (a sinusoidal "
                "encoding, as AnimateDiff's motion modules use). The official layer sees no frame order, so tuned "
                "on one clip it can pull every frame's object toward the clip's path as a whole. On the toy world "
                "it helped on one set of edits and not on two others (docs/toy-world.md). Tune with the same setting you "
                "sample with (adapters record it; Load Adapter applies the file's value)."}),
            "temporal_width": ("INT", {"default": 0, "min": 0, "max": MAX_TEMPORAL_WIDTH, "step": TEMPORAL_HEAD_WIDTH,
                                       "tooltip":
                "Past Tune-A-Video (0 = the paper): the temporal attention's inner width (heads of 64). 0 gives "
                "every block its own width: ~410 M parameters on SDXL, a 1.6 GB adapter. 128 on SDXL: 43 M, with "
                "One-Shot Tune query_rank 16 an adapter under 200 MB that tunes 16 frames of 1024x1024 on a 24 GB "
                "card (docs/real-size.md). Load Adapter applies the file's value."}),
        }}

    def apply(self, model, attention_mode, window_radius, temporal_attention, frame_shared_norm,
              temporal_init="identity", temporal_position_encoding=False, temporal_width=0):
        if temporal_width % TEMPORAL_HEAD_WIDTH or not 0 <= temporal_width <= MAX_TEMPORAL_WIDTH:
            raise ValueError(f"Tune-A-Video Apply Attention: temporal_width must be 0 (each block's own width) or a "
                             f"multiple of {TEMPORAL_HEAD_WIDTH} up to {MAX_TEMPORAL_WIDTH}, got {temporal_width}.")
        config = TAVConfig(attention_mode, window_radius, temporal_attention, frame_shared_norm, temporal_init,
                           temporal_position_encoding, temporal_width)
        return (apply_tav(model, config),)

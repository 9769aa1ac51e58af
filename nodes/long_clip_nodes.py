"""TuneAVideoLongClip: sample clips longer than fit at once, chunk by chunk with sparse-causal anchors."""
from ..sampling.long_clip import apply_long_clip
from ..sampling.validation import MAX_CHUNK_FRAMES, MAX_OVERLAP


class TuneAVideoLongClip:
    DESCRIPTION = ("Lets any sampler (Tune-A-Video Sampler, Invert, KSampler) handle clips of any length: at every "
                   "step the clip is denoised in chunks of at most chunk_frames, each chunk also seeing the clip's "
                   "first frame and the overlap frames before it (ending with the previous chunk's last frame), so "
                   "memory follows the chunk size, not the clip. Temporal attention and the frame-shared norm act "
                   "within a chunk and its anchors; anchors are recomputed per chunk, (chunk + 1 + overlap) / chunk "
                   "of the cost. Works with or without core Context Windows, before or after Apply Attention.")
    CATEGORY = "Tune-A-Video"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model that denoises long clips chunk by chunk.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The Tune-A-Video patched model (tuned or not)."}),
            "chunk_frames": ("INT", {"default": 16, "min": 1, "max": MAX_CHUNK_FRAMES, "tooltip":
                "Most frames denoised together. Clips up to this length run in one pass, unchanged; longer ones "
                "in near-equal chunks. Lower it if sampling runs out of memory."}),
            "overlap": ("INT", {"default": 2, "min": 1, "max": MAX_OVERLAP, "tooltip":
                "Frames before each chunk that it also sees (the last one is sparse-causal's previous frame); "
                "their results are cross-faded between the two chunks so seams do not show. 1 is cheapest; "
                "2-4 hide seams (attention_mode=window uses at least window_radius)."}),
        }}

    def patch(self, model, chunk_frames, overlap):
        return (apply_long_clip(model, chunk_frames, overlap),)

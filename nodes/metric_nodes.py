"""Video metric nodes: CLIP frame consistency, CLIP text alignment (Tune-A-Video, LOVEU-TGVE) and the
toy world's edit scores. The math lives in sampling/clip_metrics.py and sampling/toy_world.py."""
from ..sampling import clip_metrics, toy_world
from ..sampling.validation import check_images


def _finite(embeds, name: str):
    if not embeds.isfinite().all():  # finite frames, so the model itself overflowed or is damaged
        raise ValueError(f"{name} returned NaN or infinite embeddings for finite frames: the model file is damaged "
                         "or overflows in fp16. Load another file, or start ComfyUI with --fp32-text-enc.")
    return embeds


def _image_embeds(clip_vision, images):
    return _finite(clip_vision.encode_image(images, crop=True)["image_embeds"].detach().float(), "clip_vision")


class TuneAVideoCLIPFrameConsistency:
    DESCRIPTION = ("CLIP frame consistency: the mean cosine similarity of the frames' CLIP image embeddings "
                   "over all frame pairs (Tune-A-Video, LOVEU-TGVE) or consecutive pairs, x100. Tune-A-Video "
                   "reports 92.40 with CLIP ViT-L/14.")
    CATEGORY = "Tune-A-Video/metrics"
    RETURN_TYPES = ("FLOAT", "IMAGE")
    RETURN_NAMES = ("frame_consistency", "plot")
    OUTPUT_TOOLTIPS = ("Mean pair similarity x100 (100: identical frames).",
                       "Each pair's similarity as a bar (scaled from its minimum to 1).")
    FUNCTION = "score"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_vision": ("CLIP_VISION", {"tooltip": "Load CLIP Vision (CLIP ViT-L/14 for the paper's numbers)."}),
            "images": ("IMAGE", {"tooltip": "The clip's frames (2 or more)."}),
            "pairs": (["all", "consecutive"], {"tooltip": "all: every pair of frames (Tune-A-Video); "
                                                          "consecutive: each frame with the next."}),
        }}

    def score(self, clip_vision, images, pairs):
        check_images(images, min_frames=2, why="frame consistency (a similarity between frames)")
        sims = clip_metrics.pair_similarities(_image_embeds(clip_vision, images), pairs)
        return 100 * float(sims.mean()), clip_metrics.plot_values(sims, hi=1.0)


class TuneAVideoCLIPTextAlignment:
    DESCRIPTION = ("CLIP text alignment: the mean CLIP score (100 x cosine) of each frame with the prompt. "
                   "Tune-A-Video reports 27.58 with CLIP ViT-L/14; the text embedding is the CLIP's projected "
                   "pooled output, so use a text encoder whose projection matches the vision model.")
    CATEGORY = "Tune-A-Video/metrics"
    RETURN_TYPES = ("FLOAT", "IMAGE")
    RETURN_NAMES = ("text_alignment", "plot")
    OUTPUT_TOOLTIPS = ("Mean frame-prompt CLIP score.", "Each frame's score as a bar (0 to 40).")
    FUNCTION = "score"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_vision": ("CLIP_VISION", {"tooltip": "Load CLIP Vision (CLIP ViT-L/14 for the paper's numbers)."}),
            "clip": ("CLIP", {"tooltip": "The text encoder (e.g. the checkpoint's CLIP)."}),
            "images": ("IMAGE", {"tooltip": "The clip's frames."}),
            "text": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompt the clip should show."}),
        }}

    def score(self, clip_vision, clip, images, text):
        check_images(images)
        _, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        pooled = _finite(pooled.detach().float(), "clip")
        scores = clip_metrics.frame_scores(_image_embeds(clip_vision, images), pooled)
        return float(scores.mean()), clip_metrics.plot_values(scores, lo=0.0, hi=40.0)


class TuneAVideoToyWorldScore:
    DESCRIPTION = ("Scores a toy-world edit from the frames alone (scripts/toy_world/build_toy_world.py): edit accuracy "
                   "(share of frames whose object has the prompt's colour and shape), motion error (pixels "
                   "between edited and source object centroids), colour and size spread across frames, and "
                   "the share of background kept.")
    CATEGORY = "Tune-A-Video/metrics"
    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "FLOAT", "FLOAT", "STRING", "IMAGE")
    RETURN_NAMES = ("edit_accuracy", "motion_error_px", "colour_spread", "size_spread", "background_kept",
                    "report", "strip")
    OUTPUT_TOOLTIPS = ("0..1", "mean pixels", "0 = constant colour", "std/mean of the area",
                       "0..1", "all scores as text", "source frames above edited frames")
    FUNCTION = "score"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "edited": ("IMAGE", {"tooltip": "The edited clip's frames."}),
            "source": ("IMAGE", {"tooltip": "The source clip's frames (same count and size)."}),
            "prompt": ("STRING", {"default": "a blue ring", "tooltip":
                                  "The edited prompt: one colour and one shape of the toy world."}),
        }}

    def score(self, edited, source, prompt):
        s = toy_world.score_edit(edited, source, *toy_world.parse_prompt(prompt))
        report = ", ".join(f"{k} {v:.3g}" for k, v in s.items())
        return (s["edit_accuracy"], s["motion_error_px"], s["colour_spread"], s["size_spread"],
                s["background_kept"], report, toy_world.strip([source, edited]))


NODE_CLASS_MAPPINGS = {
    "TuneAVideoCLIPFrameConsistency": TuneAVideoCLIPFrameConsistency,
    "TuneAVideoCLIPTextAlignment": TuneAVideoCLIPTextAlignment,
    "TuneAVideoToyWorldScore": TuneAVideoToyWorldScore,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TuneAVideoCLIPFrameConsistency": "Tune-A-Video CLIP Frame Consistency",
    "TuneAVideoCLIPTextAlignment": "Tune-A-Video CLIP Text Alignment",
    "TuneAVideoToyWorldScore": "Tune-A-Video Toy-World Score",
}

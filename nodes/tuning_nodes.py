"""TuneAVideoTune, TuneAVideoSaveAdapter, TuneAVideoLoadAdapter: one-shot tuning and its adapters."""
import logging
import os

import folder_paths

from ..sampling.adapter_loading import load_adapter_file
from ..sampling.adapters import STORAGE_DTYPES, adapter_of, apply_adapter, save_adapter
from ..sampling.low_rank import MAX_QUERY_RANK
from ..sampling.one_shot_tuning import DEFAULT_TRAINABLE, PRECISIONS, TRAINABLE, tune_clip
from ..sampling.validation import (MAX_STEPS, check_filename_prefix, check_save_folder, invisible_character,
                                  validation_message)

ADAPTER_FOLDER = "tune_a_video"
FOLDER_WORDS = "models/tune_a_video"
EXAMPLE_PREFIX = "TuneAVideo/adapter"


def register_adapter_folder():
    """models/tune_a_video (plus any tune_a_video paths from extra_model_paths.yaml), safetensors only."""
    folder_paths.add_model_folder_path(ADAPTER_FOLDER, os.path.join(folder_paths.models_dir, ADAPTER_FOLDER))
    paths, _ = folder_paths.folder_names_and_paths[ADAPTER_FOLDER]
    folder_paths.folder_names_and_paths[ADAPTER_FOLDER] = (paths, {".safetensors"})


register_adapter_folder()
_unlisted = set()


def listed_adapters() -> list[str]:
    """The adapter files Load Adapter offers: all but names holding invisible or bidi characters, which could
    display as another adapter's name (Save Adapter refuses to write such names)."""
    names = []
    for name in folder_paths.get_filename_list(ADAPTER_FOLDER):
        char = invisible_character(name)
        if char is None:
            names.append(name)
        elif name not in _unlisted:
            _unlisted.add(name)
            logging.warning("Tune-A-Video: %r in models/tune_a_video is not listed in Load Adapter: its name holds "
                            "the invisible character U+%04X. Rename the file to load it.", name, ord(char))
    return names


class TuneAVideoTune:
    DESCRIPTION = ("Tune-A-Video's one-shot tuning: fits the model to one clip and its prompt (every step: all "
                   "frames, one shared random timestep, noise per frame, noise-prediction MSE, AdamW). Trains "
                   "deltas on the attention query projections and the temporal attention; the input model and "
                   "checkpoint are never changed. Long-running: watch the loss in the console; cancel works.")
    CATEGORY = "Tune-A-Video"
    RETURN_TYPES = ("MODEL", "TAV_ADAPTER")
    RETURN_NAMES = ("model", "adapter")
    OUTPUT_TOOLTIPS = ("A clone of the model carrying the tuned weights (query deltas as weight patches, so LoRAs "
                       "stack; tuned temporal attention). Invert and sample the clip with it.",
                       "Only the tuned weights; save them with Tune-A-Video Save Adapter.")
    FUNCTION = "tune"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.x/SD2.x/SDXL model, ideally from Tune-A-Video Apply Attention "
                                           "(its attention mode is tuned); unpatched models get Tune-A-Video's defaults."}),
            "latent": ("LATENT", {"tooltip": "The clip's frames, VAE-encoded once (one latent per frame). All frames "
                                             "go through the model in every step: memory grows with frames x size."}),
            "positive": ("CONDITIONING", {"tooltip": "The source clip's prompt, e.g. \"a man is skiing\"."}),
            "steps": ("INT", {"default": 500, "min": 1, "max": MAX_STEPS, "tooltip":
                "Optimizer steps. Tune-A-Video: 300-500; more drifts back to the source clip (overfitting)."}),
            "learning_rate": ("FLOAT", {"default": 3e-5, "min": 1e-7, "max": 1e-1, "step": 1e-6, "round": False,
                                        "tooltip": "AdamW learning rate (Tune-A-Video: 3e-5)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "Seed of the timesteps and noise drawn per step: same seed, same tuning."}),
            "trainable": (list(TRAINABLE), {"default": DEFAULT_TRAINABLE, "tooltip":
                "tune_a_video: the official trainables (self- and cross-attention queries + temporal attention, "
                "its LayerNorm frozen). queries+temporal: the same plus the temporal LayerNorm. temporal: motion "
                "only. queries: no temporal attention. attention+temporal: all attention projections (closest "
                "fit, bigger adapter, overfits sooner). Tuning a tuned model continues from it."}),
            "precision": (list(PRECISIONS), {"default": "bf16", "tooltip":
                "bf16/fp16: autocast compute with fp32 master weights (fp16 adds loss scaling; use it on GPUs "
                "without bf16). fp32: slowest, most memory, for CPU or debugging."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip":
                "Recompute activations in the backward pass (all but the frame attention's): far less memory, "
                "about a third more compute."}),
        }, "optional": {
            "preview_every": ("INT", {"default": 25, "min": 0, "max": MAX_STEPS, "tooltip":
                "Show the loss curve as the node's preview every N steps (0: off). No sampling is done."}),
            "prompt_text": ("STRING", {"default": "", "tooltip":
                "The source prompt as text, recorded in the adapter's metadata only."}),
            "query_rank": ("INT", {"default": 0, "min": 0, "max": MAX_QUERY_RANK, "tooltip":
                "0: full query deltas (the paper). r > 0: low-rank (LoRA) query deltas of rank r, a small "
                "fraction of the parameters (SDXL: 5 M at 16 instead of 205 M); stored in ComfyUI's LoRA format, "
                "so LoraLoaderModelOnly also applies them. For SDXL on a 24 GB card: 16, with Apply Attention "
                "temporal_width 128."}),
            "recompute_all": ("BOOLEAN", {"default": False, "tooltip":
                "With gradient_checkpointing: also recompute the frame-attention outputs in the backward instead "
                "of keeping them. Least memory (SD1.5 at 24 frames of 512x512: 2.6 instead of 3.2 GB above the "
                "weights), 8 % more compute. For SDXL on a 24 GB card."}),
        }}

    def tune(self, model, latent, positive, steps, learning_rate, seed, trainable, precision,
             gradient_checkpointing, preview_every=25, prompt_text="", query_rank=0, recompute_all=False):
        tuned, adapter, _ = tune_clip(model, latent, positive, steps, learning_rate, seed, trainable, precision,
                                      gradient_checkpointing, preview_every, prompt_text, query_rank=query_rank,
                                      recompute_all=recompute_all)
        return (tuned, adapter)


class TuneAVideoSaveAdapter:
    DESCRIPTION = ("Saves the tuned weights (query deltas + temporal attention, a few MB to a few hundred MB) "
                   "with their settings as a .safetensors file in models/tune_a_video.")
    CATEGORY = "Tune-A-Video"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "adapter": ("TAV_ADAPTER", {"tooltip": "From Tune-A-Video One-Shot Tune (or Load Adapter)."}),
            "filename_prefix": ("STRING", {"default": "tav_adapter", "tooltip":
                "File name prefix inside models/tune_a_video (subfolders allowed); a counter is appended."}),
        }, "optional": {
            "storage": (list(STORAGE_DTYPES), {"default": "fp32", "tooltip":
                "fp32: exactly the tuned weights. fp16/bf16: half the file size, rounded (recorded in the file)."}),
        }}

    def save(self, adapter, filename_prefix, storage="fp32"):
        folder = folder_paths.get_folder_paths(ADAPTER_FOLDER)[0]
        check_filename_prefix(filename_prefix, example=EXAMPLE_PREFIX, folder=FOLDER_WORDS)
        check_save_folder(folder, filename_prefix, folder=FOLDER_WORDS)
        full_folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, folder)
        os.makedirs(full_folder, exist_ok=True)
        file = f"{name}_{counter:05}_.safetensors"
        save_adapter(adapter, os.path.join(full_folder, file), storage)
        relative = "/".join(p for p in (subfolder.replace(os.sep, "/"), file) if p)
        return {"ui": {"adapters": [{"filename": relative, "subfolder": subfolder, "type": ADAPTER_FOLDER}],
                       "text": [relative]}}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):  # None: linked, checked when the node runs
        return validation_message(check_filename_prefix, filename_prefix, example=EXAMPLE_PREFIX,
                                  folder=FOLDER_WORDS)


class TuneAVideoLoadAdapter:
    DESCRIPTION = ("Applies a Tune-A-Video adapter from models/tune_a_video to a model of the same family (any "
                   "checkpoint of that family). Also reads official Tune-A-Video UNets in diffusers naming "
                   "(converted to .safetensors): their query weights and temporal attention are applied.")
    CATEGORY = "Tune-A-Video"
    RETURN_TYPES = ("MODEL", "TAV_ADAPTER")
    RETURN_NAMES = ("model", "adapter")
    OUTPUT_TOOLTIPS = ("A patched clone carrying the tuned weights (unpatched inputs get the adapter's attention "
                       "settings).", "The adapter the model now carries (stacked onto any adapter the input model "
                       "had); save an imported official UNet as a small adapter.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD model of the adapter's family, patched by Apply Attention or not."}),
            "adapter_name": (listed_adapters(), {"tooltip":
                ".safetensors files in models/tune_a_video."}),
        }}

    def load(self, model, adapter_name):
        path = folder_paths.get_full_path_or_raise(ADAPTER_FOLDER, adapter_name)
        adapter = load_adapter_file(path, model)
        tuned = apply_adapter(model, adapter, adapter_name)
        return (tuned, adapter_of(tuned))

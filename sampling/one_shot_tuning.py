"""One-shot tuning (Tune-A-Video): fit a patched model to one text-video pair; the node's entry point.

The objective and loop are in tuning_objective.py, the training clone in training_clone.py. The result
is an adapter (sampling/adapters.py) and the model built from it, so a saved and reloaded
adapter gives exactly the tuned model. Tuning a model that already carries an adapter (tuned, or Load
Adapter) continues from it, and the returned adapter holds both (query deltas summed).
"""
from __future__ import annotations

import math

import torch

import comfy.model_sampling
import comfy.utils

from ..attention_patches.unet_patch import TAVConfig, apply_tav, get_tav_patch
from .adapters import adapter_of, apply_adapter, make_adapter
from .low_rank import check_query_rank
from .training_clone import TuningRun
from .tuning_objective import NODE
from .validation import MAX_STEPS, check_count, check_latent

QUERIES = ("attn1.to_q", "attn2.to_q")
ATTENTION = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))
# name -> (linear layers of every transformer block that get a delta, trained parts of temporal attention)
TRAINABLE = {
    "tune_a_video": (QUERIES, ("attn_temp",)),  # the official trainable_modules: attn1.to_q, attn2.to_q, attn_temp
    "queries+temporal": (QUERIES, ("attn_temp", "norm_temp")),
    "temporal": ((), ("attn_temp", "norm_temp")),  # motion only; appearance and text response untouched
    "queries": (QUERIES, ()),
    "attention+temporal": (ATTENTION, ("attn_temp", "norm_temp")),  # closer fit, bigger adapter, overfits sooner
}
DEFAULT_TRAINABLE = "tune_a_video"
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# --- the node's entry point -------------------------------------------------------------------

def check_arguments(model, steps, learning_rate, trainable, precision):
    check_count(steps, "steps", MAX_STEPS, "Tune-A-Video tunes 300-500 steps.")
    if not isinstance(learning_rate, (int, float)) or not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"{NODE}: learning_rate must be a positive number, got {learning_rate!r} (Tune-A-Video: 3e-5).")
    if trainable not in TRAINABLE:
        raise ValueError(f"{NODE}: trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}.")
    if precision not in PRECISIONS:
        raise ValueError(f"{NODE}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    device = model.load_device
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{NODE}: this GPU has no bfloat16; choose precision fp16 (or fp32).")
    sampling = model.get_model_object("model_sampling")
    # TAV draws its timesteps from the discrete schedule; a continuous one (ModelSamplingContinuousEDM/V) has none
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) or \
            not isinstance(sampling, comfy.model_sampling.EPS):
        kind = " + ".join(base.__name__ for base in type(sampling).__bases__)
        raise ValueError(f"{NODE}: model samples with {kind or type(sampling).__name__}, but Tune-A-Video tunes "
                         "models with a discrete noise schedule (SD1.x, SD2.x, SDXL; eps- or v-prediction). Remove "
                         "ModelSamplingContinuousEDM/ModelSamplingContinuousV between the checkpoint and Tune, "
                         "or tune an SD1.x/SD2.x/SDXL checkpoint.")


def _out_of_memory_message(samples, precision, checkpointing) -> str:
    f, _, h, w = samples.shape
    tips = [f"fewer frames (now {f})", f"a lower resolution (now {w * 8}x{h * 8})"]
    if precision == "fp32":
        tips.append("precision bf16 or fp16")
    if not checkpointing:
        tips.append("gradient_checkpointing on")
    return f"{NODE} ran out of memory. Reduce: {', '.join(tips)}."


def loss_curve_image(losses, size=(256, 96)):
    """A tiny loss plot (PIL image) for the node's live preview."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    if len(losses) > 1:
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0
        pts = [(i * (w - 1) / (len(losses) - 1), (h - 1) - (v - lo) / span * (h - 1)) for i, v in enumerate(losses)]
        ImageDraw.Draw(img).line(pts, fill=(30, 90, 200), width=2)
    return img


def tune_clip(model, latent, positive, steps=500, learning_rate=3e-5, seed=0, trainable=DEFAULT_TRAINABLE,
              precision="bf16", gradient_checkpointing=True, preview_every=0, prompt_text="", callback=None,
              query_rank=0, recompute_all=False, **loop_args):
    """One-shot tune `model` on a clip. Returns (tuned MODEL, TAVAdapter, losses per step).

    model: a MODEL, patched by TuneAVideoApplyAttention or patched here with TAV's defaults. latent:
    {"samples": [F, 4, H, W]} of the clip (all frames in every step). positive: CONDITIONING of the
    source prompt. The input model and its checkpoint are never written; on cancel (ComfyUI's interrupt)
    or error nothing is left applied. callback(step, loss, params) is called after every step; loop_args
    go to tuning_objective.run_tuning (e.g. draw). The adapter holds everything the tuned model has on
    top of its checkpoint (a previous adapter's deltas included). query_rank > 0: the query deltas are
    low-rank (LoRA, sampling/low_rank.py) of that rank instead of full matrices (big UNets: SDXL).
    recompute_all: with gradient_checkpointing, recompute the frame-attention outputs too (least memory).
    """
    check_arguments(model, steps, learning_rate, trainable, precision)
    check_query_rank(query_rank, NODE)
    samples = check_latent(latent, model.get_model_object("latent_format").latent_channels)
    if not positive:
        raise ValueError(f"{NODE}: positive is empty; connect CLIP Text Encode with the clip's prompt.")
    patched = model if get_tav_patch(model) is not None else apply_tav(model, TAVConfig())
    queries, temporal_parts = TRAINABLE[trainable]
    if temporal_parts and get_tav_patch(patched).temporal is None:
        raise ValueError(f"{NODE}: trainable {trainable!r} trains temporal attention, but the model was patched "
                         "with temporal_attention off. Turn it on in Apply Attention, or train 'queries'.")

    pbar = comfy.utils.ProgressBar(steps)
    losses = []

    def on_step(step, loss, params):
        losses.append(loss)
        preview = None
        if preview_every and ((step + 1) % preview_every == 0 or step + 1 == steps):
            preview = ("JPEG", loss_curve_image(losses), 512)
        pbar.update_absolute(step + 1, steps, preview)
        if callback is not None:
            callback(step, loss, params)

    with torch.inference_mode(False), torch.enable_grad():
        # Inputs are inference tensors (the executor runs nodes under inference_mode): use copies.
        conds = [[c.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in d.items()}]
                 for c, d in positive]
        checkpointing = "all" if gradient_checkpointing and recompute_all else gradient_checkpointing
        run = TuningRun(patched, queries, temporal_parts, PRECISIONS[precision], checkpointing, query_rank, seed)
        try:
            run.train(samples.clone(), conds, steps, learning_rate, seed, on_step, **loop_args)
            deltas, temporal = run.trained()
            lora = run.trained_lora()
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(_out_of_memory_message(samples, precision, gradient_checkpointing)) from e
        except RuntimeError as e:
            if "can't allocate memory" not in str(e):
                raise
            raise RuntimeError(_out_of_memory_message(samples, precision, gradient_checkpointing)) from e
        finally:
            run.close()
            del run

    h, w = samples.shape[-2:]
    increment = make_adapter(patched, deltas, temporal, frames=samples.shape[0], latent_size=f"{w}x{h}",
                             prompt=prompt_text, steps=steps, learning_rate=learning_rate, seed=seed,
                             trainable=trainable, precision=precision, final_loss=losses[-1], lora=lora,
                             query_rank=query_rank if queries else 0)
    tuned = apply_adapter(patched, increment)
    return tuned, adapter_of(tuned), losses

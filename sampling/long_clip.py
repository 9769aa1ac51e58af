"""Long clips: chunked denoising with sparse-causal anchors, so memory follows the chunk, not the clip.

At every model evaluation (ComfyUI's calc_cond_batch: any sampler, inversion included) a clip longer
than `chunk_frames` is split, in frame order, into near-equal chunks of at most `chunk_frames` frames.
Each chunk runs through the model as its own small clip, preceded by anchor frames:
  - the clip's first frame (sparse-causal's "first" frame: global consistency); its output is dropped;
  - the `overlap` frames just before the chunk, ending with the previous chunk's last frame
    (sparse-causal's "previous" frame: motion continuity across the seam). Their outputs are
    cross-faded with the previous chunk's (linear ramp towards the new chunk), which hides the jump
    that per-chunk statistics (frame-shared norm, temporal attention) would leave at the seam.
    attention_mode=window uses at least `window_radius` such frames.
Anchors are taken from the current noisy latents, so within one evaluation chunk k needs nothing
from chunk k-1's result but the outputs it cross-fades with; chunks run one after another.

Each chunk call publishes its frames' real indices as transformer_options["context_window"] (core's
IndexListContextWindow), so key_frames picks frame 0 and the true previous frame by position. Inside a
context window (core Context Windows, AnimateDiff-Evolved's context options) the chunks split that
window and use its indices, so they compose; the split runs innermost among calc_cond_batch wrappers,
whatever the node order.

Against one pass over the whole clip:
  - temporal attention and the frame-shared GroupNorm act within [anchors + chunk];
  - causal/full attention see frame 0, the anchors and the chunk, not every earlier frame;
  - an anchor is recomputed in every chunk that uses it, and inside that call its own attention sees
    only that call's frames, so anchor keys/values approximate the whole-clip ones (frame 0's are
    exact for the attention itself; the overlap's earliest frame is the least exact);
  - cost: each chunk computes chunk + 1 + overlap frames: overhead (chunk + 1 + overlap) / chunk;
  - per-frame conditioning tensors are sliced per chunk, per-frame ControlNet hints are not (as with
    core context windows).
A model without Tune-A-Video's patch treats frames independently: no anchors, the chunks are exact
batch splits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

import comfy.model_management
import comfy.patcher_extension

from ..attention_patches.layout import clip_total_frames, context_window, window_positions
from ..attention_patches.unet_patch import get_tav_patch
from .validation import MAX_CHUNK_FRAMES, MAX_OVERLAP, check_count

WRAPPER_KEY = "tune_a_video_long_clip"


class Chunk(NamedTuple):
    first: list[int]     # the clip's first frame as anchor (empty for the chunk that holds it)
    overlap: list[int]   # frames just before the chunk, outputs cross-faded with the previous chunk's
    frames: list[int]    # the chunk's own frames


def plan_chunks(positions, chunk_frames: int, overlap: int = 2) -> list[Chunk]:
    """Split frames (ordered by position) into near-equal chunks of at most `chunk_frames`.

    Indices are into `positions`. Every chunk but the first is anchored on the first frame and the
    `overlap` frames before it; overlap < 0: no anchors at all (a plain batch split).
    """
    if not isinstance(chunk_frames, int) or chunk_frames < 1:
        raise ValueError(f"chunk_frames must be a positive integer, got {chunk_frames!r}.")
    order = sorted(range(len(positions)), key=lambda j: positions[j])
    count = -(-len(order) // chunk_frames)
    base, extra = divmod(len(order), count) if order else (0, 0)
    plan, start = [], 0
    for k in range(count):
        end = start + base + (k < extra)
        first, before = [], []
        if start and overlap >= 0:
            first, before = [order[0]], order[max(1, start - overlap):start]
        plan.append(Chunk(first, before, order[start:end]))
        start = end
    return plan


def overlap_frames(patcher, overlap: int) -> int:
    """Overlap frames a chunk needs on this ModelPatcher: -1 (no anchors) without Tune-A-Video's patch."""
    patch = get_tav_patch(patcher) if patcher is not None else None
    if patch is None:
        return -1
    if patch.config.attention_mode == "window":
        return max(overlap, patch.config.window_radius)
    return overlap


def _take(t, idx: torch.Tensor, frames: int):
    """Rows `idx` of a per-frame tensor; anything else (batch 1, other sizes) unchanged."""
    if isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == frames:
        return t[idx.to(t.device)]
    return t


def _resize_model_cond(value, idx, frames):
    cond = getattr(value, "cond", None)
    if isinstance(cond, torch.Tensor) and cond.ndim > 0 and cond.shape[0] == frames:
        return value._copy_with(_take(cond, idx, frames))
    if isinstance(cond, list) and any(isinstance(c, torch.Tensor) and c.ndim and c.shape[0] == frames for c in cond):
        return value._copy_with([_take(c, idx, frames) for c in cond])  # CONDList
    return value


def resize_conds(conds, idx: torch.Tensor, frames: int):
    """The conds of a sub-clip: per-frame tensors (top level and model_conds) take rows `idx`."""
    out = []
    for cond in conds:
        if cond is None:
            out.append(None)
            continue
        items = []
        for c in cond:
            c = dict(c)
            for key, value in c.items():
                if isinstance(value, torch.Tensor):
                    c[key] = _take(value, idx, frames)
                elif key == "model_conds":
                    c[key] = {k: _resize_model_cond(v, idx, frames) for k, v in value.items()}
            items.append(c)
        out.append(items)
    return out


@dataclass(frozen=True)
class LongClip:
    """The chunking attached to a MODEL: ComfyUI wrappers around calc_cond_batch and prepare_sampling."""
    chunk_frames: int = 16
    overlap: int = 2

    def __deepcopy__(self, memo):
        return self  # immutable; model_options clones keep one instance

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        # Split last: other calc_cond_batch wrappers inside this one (e.g. AnimateDiff-Evolved's
        # context options, which index the whole clip) still see the whole clip, in either node order.
        inner = executor.wrappers[executor.idx + 1:]
        if inner:
            return comfy.patcher_extension.WrapperExecutor.new_executor(
                executor.original, inner + [self._chunked]).execute(model, conds, x_in, timestep, model_options)
        return self._chunked(executor, model, conds, x_in, timestep, model_options)

    def _chunked(self, executor, model, conds, x_in, timestep, model_options):
        frames = x_in.shape[0]
        if frames <= self.chunk_frames:
            return executor(model, conds, x_in, timestep, model_options)
        options = model_options.setdefault("transformer_options", {})
        had_window, outer = "context_window" in options, options.get("context_window")
        # Inside a context window (core or AnimateDiff-Evolved): its real frame indices.
        positions = list(window_positions(options, frames) or range(frames))
        total = clip_total_frames(options, positions)
        overlap = overlap_frames(getattr(model, "current_patcher", None), self.overlap)

        out = None
        try:
            for chunk in plan_chunks(positions, self.chunk_frames, overlap):
                comfy.model_management.throw_exception_if_processing_interrupted()
                rows = chunk.first + chunk.overlap + chunk.frames
                idx = torch.tensor(rows)
                options["context_window"] = context_window([positions[j] for j in rows], total)
                sub = executor(model, resize_conds(conds, idx, frames), _take(x_in, idx, frames),
                               _take(timestep, idx, frames), model_options)
                if out is None:
                    out = [torch.empty_like(x_in) for _ in sub]
                _merge(out, sub, chunk, x_in.device)
        finally:
            if had_window:
                options["context_window"] = outer
            else:
                options.pop("context_window", None)
        return out

    def prepare_sampling(self, executor, model, noise_shape, *args, **kwargs):
        # Load/offload decisions from one chunk call's size, as core context windows do.
        noise_shape = list(noise_shape)
        anchors = 1 + overlap_frames(model, self.overlap)  # 0 without anchors
        noise_shape[0] = min(noise_shape[0], self.chunk_frames + anchors)
        return executor(model, noise_shape, *args, **kwargs)


def _merge(out: list, sub: list, chunk: Chunk, device):
    """Write a chunk call's outputs: its frames as they are, the overlap cross-faded (ramp 1/(n+1)..n/(n+1))."""
    keep = torch.tensor(chunk.frames, device=device)
    n0, n = len(chunk.first), len(chunk.first) + len(chunk.overlap)
    for o, s in zip(out, sub):
        o[keep] = s[n:].to(o)
    if chunk.overlap:
        prev = torch.tensor(chunk.overlap, device=device)
        w = torch.arange(1, n - n0 + 1, device=device, dtype=out[0].dtype) / (n - n0 + 1)
        w = w.view(-1, *[1] * (out[0].ndim - 1))
        for o, s in zip(out, sub):
            o[prev] = torch.lerp(o[prev], s[n0:n].to(o), w)


def apply_long_clip(model, chunk_frames: int = 16, overlap: int = 2):
    """A clone of `model` that denoises clips longer than `chunk_frames` chunk by chunk (see module doc).

    Any sampler that goes through ComfyUI's calc_cond_batch (KSampler, Tune-A-Video Sampler and
    Invert) is covered. Re-applying replaces the settings. The input model is left untouched.
    """
    check_count(chunk_frames, "chunk_frames", MAX_CHUNK_FRAMES,
                "16 fits most cards; lower it if sampling runs out of memory.")
    check_count(overlap, "overlap", MAX_OVERLAP, "2 hides chunk seams at (chunk + 3) / chunk of the cost.")
    long_clip = LongClip(chunk_frames, overlap)
    m = model.clone()
    for kind, fn in ((comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, long_clip.calc_cond_batch),
                     (comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, long_clip.prepare_sampling)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, fn)
    m.set_attachments(WRAPPER_KEY, long_clip)
    return m


def get_long_clip(model) -> LongClip | None:
    """The chunking carried by a MODEL, if any."""
    return model.get_attachment(WRAPPER_KEY)

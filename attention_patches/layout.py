"""How a batch of latents is laid out as clips, and where its frames sit in the whole clip.

The one place that reads context-window machinery (every "which real frame is this" question goes
through here):
  - core context windows: transformer_options["context_window"], an IndexListContextWindow whose
    index_list holds the real frame indices; newer ComfyUI may prepend a causal anchor frame
    (`causal_anchor_index`) to the window's tensors;
  - AnimateDiff-Evolved's context options: transformer_options["ad_params"]["sub_idxs"].
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class ClipLayout:
    clips: int   # clips in the batch: one per entry of cond_or_uncond
    frames: int
    positions: tuple[int, ...]  # each frame's index in the whole clip (context windows: a subset)


def window_positions(transformer_options: dict, frames: int) -> tuple[int, ...] | None:
    """The real clip indices of a model call's `frames` frames, as a context window publishes them.

    None outside any window (or where the published window does not match the call's frame count).
    """
    window = transformer_options.get("context_window")
    index_list = getattr(window, "index_list", None)
    if index_list is not None:
        anchor = getattr(window, "causal_anchor_index", None)
        indices = ([anchor] if anchor is not None and anchor >= 0 else []) + list(index_list)
        if len(indices) == frames:
            return tuple(int(i) for i in indices)
    ad_params = transformer_options.get("ad_params")
    sub_idxs = ad_params.get("sub_idxs") if isinstance(ad_params, dict) else None
    if sub_idxs is not None and len(sub_idxs) == frames:
        return tuple(int(i) for i in sub_idxs)
    return None


def clip_total_frames(transformer_options: dict, positions) -> int:
    """Frames of the whole clip: as the window machinery says, else one past the last position."""
    window = transformer_options.get("context_window")
    ad_params = transformer_options.get("ad_params")
    published = getattr(window, "total_frames", 0) or (
        ad_params.get("full_length") if isinstance(ad_params, dict) else 0)
    return max(int(published or 0), max(positions) + 1)


def context_window(index_list: list[int], total_frames: int):
    """A core IndexListContextWindow over `index_list`; passes total_frames where ComfyUI takes it."""
    import comfy.context_windows

    if _takes_total_frames():
        return comfy.context_windows.IndexListContextWindow(index_list, total_frames=total_frames)
    return comfy.context_windows.IndexListContextWindow(index_list)


@functools.lru_cache(maxsize=None)
def _takes_total_frames() -> bool:
    import comfy.context_windows

    return "total_frames" in inspect.signature(comfy.context_windows.IndexListContextWindow).parameters


def clip_layout(batch: int, transformer_options: dict) -> ClipLayout:
    """Derive the clip layout of one model call from its batch size and ComfyUI's transformer_options.

    ComfyUI batches one clip per entry of `cond_or_uncond` (cond and uncond together or apart);
    each is the whole clip, or one context window of it.
    """
    clips = len(transformer_options.get("cond_or_uncond") or [0])
    if batch % clips:
        raise ValueError(
            f"Tune-A-Video: a batch of {batch} latents does not split into {clips} clips of equal "
            "length; give every clip the same number of frames.")
    frames = batch // clips
    positions = window_positions(transformer_options, frames) or tuple(range(frames))
    return ClipLayout(clips, frames, positions)

"""How a batch of latents is laid out as clips: `chunks` clips (cond/uncond/area chunks) of `frames`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClipLayout:
    chunks: int
    frames: int
    positions: tuple[int, ...]  # each frame's index in the whole clip (context windows: a subset)


def clip_layout(batch: int, transformer_options: dict) -> ClipLayout:
    """Derive the clip layout of one model call from its batch size and ComfyUI's transformer_options.

    ComfyUI batches one chunk per entry of `cond_or_uncond` (cond and uncond together or apart);
    each chunk is the whole clip. Core context windows publish the real frame indices.
    """
    chunks = len(transformer_options.get("cond_or_uncond") or [0])
    if batch % chunks:
        raise ValueError(
            f"Tune-A-Video: a batch of {batch} latents does not split into {chunks} clips of equal "
            "length; give every clip the same number of frames.")
    frames = batch // chunks
    positions = tuple(range(frames))
    window = transformer_options.get("context_window")
    index_list = getattr(window, "index_list", None)
    if index_list is not None and len(index_list) == frames:
        positions = tuple(int(i) for i in index_list)
    return ClipLayout(chunks, frames, positions)

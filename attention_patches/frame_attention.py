"""Cross-frame self-attention (the paper's SC-Attn and its relatives), as pure tensor functions.

Frame i's queries attend to the keys/values of a set of frames chosen by the mode:
  sparse_causal  frames 0 and i-1 (Tune-A-Video; frame 0 uses itself as "previous")
  first_frame    frame 0 only (Text2Video-Zero)
  causal         all frames up to i
  full           all frames of the clip (quadratic in the number of frames)
  window         frames within +-radius of i, plus frame 0 (WALT-style temporal window)
"Frame 0" and "i-1" are taken by position, so a context window's real frame indices are honoured.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch

MODES = ("sparse_causal", "first_frame", "causal", "full", "window")


def key_frames(positions: tuple[int, ...], mode: str, radius: int = 1) -> list[list[int]]:
    """For each frame (index into `positions`), the frames its queries attend to, in order."""
    if mode not in MODES:
        raise ValueError(f"attention_mode must be one of {', '.join(MODES)}, got {mode!r}")
    frames = range(len(positions))
    by_pos = sorted(frames, key=lambda j: positions[j])
    first = by_pos[0]
    out = []
    for i in frames:
        p = positions[i]
        if mode == "sparse_causal":
            earlier = [j for j in by_pos if positions[j] < p]
            out.append([first, earlier[-1] if earlier else first])
        elif mode == "first_frame":
            out.append([first])
        elif mode == "causal":
            out.append([j for j in by_pos if positions[j] <= p])
        elif mode == "full":
            out.append(list(by_pos))
        else:
            out.append([j for j in by_pos if j == first or abs(positions[j] - p) <= radius])
    return out


@lru_cache(maxsize=256)
def _groups(positions: tuple[int, ...], mode: str, radius: int):
    """Frames grouped by how many key frames they use, so each group is one batched attention."""
    keys = key_frames(positions, mode, radius)
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(len(k), []).append(i)
    out = []
    # Cached across calls: never inference tensors, or a later training step could not use them.
    with torch.inference_mode(False):
        for frames in groups.values():
            idx = [keys[i] for i in frames]
            shared = all(row == idx[0] for row in idx)  # e.g. full, first_frame: one key set per clip
            out.append((torch.tensor(frames), torch.tensor(idx), shared))
    return tuple(out)


@lru_cache(maxsize=16)
def takes_transformer_options(attention) -> bool:
    """Whether an attention function accepts transformer_options (newer ComfyUI reads attention
    overrides from them, e.g. attention-override nodes)."""
    try:
        params = inspect.signature(attention).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "transformer_options" or p.kind is p.VAR_KEYWORD for p in params)


def frame_attention(q, k, v, heads: int, chunks: int, positions: tuple[int, ...], mode: str,
                    radius: int = 1, attention=None, transformer_options=None, **attention_kwargs):
    """Self-attention across frames.

    q, k, v: (chunks * frames, tokens, channels), already projected. `attention(q, k, v, heads)` is
    ComfyUI's optimized_attention (default); it also gets `transformer_options` where it takes them.
    Returns (chunks * frames, tokens, channels of v).
    """
    if attention is None:
        import comfy.ldm.modules.attention as comfy_attention
        attention = comfy_attention.optimized_attention
    if transformer_options is not None and takes_transformer_options(attention):
        attention_kwargs["transformer_options"] = transformer_options
    frames = len(positions)
    if frames == 1:
        return attention(q, k, v, heads, **attention_kwargs)
    n, nk = q.shape[1], k.shape[1]
    qc = q.view(chunks, frames, n, q.shape[-1])
    kc = k.view(chunks, frames, nk, k.shape[-1])
    vc = v.view(chunks, frames, nk, v.shape[-1])
    out = None
    for frame_idx, key_idx, shared in _groups(positions, mode, radius):
        frame_idx, key_idx = frame_idx.to(q.device), key_idx.to(q.device)
        g, m = key_idx.shape
        if shared:  # every frame of the group sees the same keys: one attention per clip
            qq = qc[:, frame_idx].reshape(chunks, g * n, -1)
            kk = kc[:, key_idx[0]].reshape(chunks, m * nk, -1)
            vv = vc[:, key_idx[0]].reshape(chunks, m * nk, -1)
        else:
            qq = qc[:, frame_idx].reshape(chunks * g, n, -1)
            kk = kc[:, key_idx].reshape(chunks * g, m * nk, -1)
            vv = vc[:, key_idx].reshape(chunks * g, m * nk, -1)
        o = attention(qq, kk, vv, heads, **attention_kwargs)
        if out is None:
            out = o.new_empty(chunks, frames, n, o.shape[-1])
        out[:, frame_idx] = o.view(chunks, g, n, -1)
    return out.view(chunks * frames, n, -1)

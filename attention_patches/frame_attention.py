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

import contextlib
import contextvars
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
def _groups(positions: tuple[int, ...], mode: str, radius: int) -> tuple:
    """Frames grouped by how many key frames they use, so each group is one batched attention:
    ((query frames), (key frames of each query frame)) per group. Plain ints: the cache holds no tensors."""
    # A key frame listed twice (sparse_causal's frames 0 and 1 attend to [0, 0]) is attended once: softmax
    # over duplicated keys gives each copy half the weight, so the result is the same at half the cost.
    keys = [list(dict.fromkeys(k)) for k in key_frames(positions, mode, radius)]
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(len(k), []).append(i)
    return tuple((tuple(frames), tuple(tuple(keys[i]) for i in frames)) for frames in groups.values())


@lru_cache(maxsize=1024)
def _runs(index: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """`index` cut into runs that a view takes without a gather: (start in index, first frame, step 0 or 1)."""
    runs: list[list[int]] = []
    for pos, frame in enumerate(index):
        if runs:
            start, first, step = runs[-1]
            length = pos - start
            if step in (None, frame - index[pos - 1]) and frame - index[pos - 1] in (0, 1) \
                    and frame == first + length * (frame - index[pos - 1]):
                runs[-1][2] = frame - index[pos - 1]
                continue
        runs.append([pos, frame, None])
    return tuple((start, first, step or 0) for start, first, step in runs)


def _take(x, index: tuple[int, ...], out=None):
    """x[:, index] (x: clips, frames, tokens, channels) from slices and broadcasts, never an index
    gather: a view where one run covers `index`, else copied run by run into `out` (or a new tensor).
    Autograd sends gradients back through the slices (no scatter-add)."""
    runs = _runs(index)
    ends = [r[0] for r in runs[1:]] + [len(index)]

    def run_view(first, step, length):
        if step == 1 or length == 1:
            return x[:, first:first + length]
        return x[:, first:first + 1].expand(-1, length, -1, -1)

    if out is None and len(runs) == 1:
        return run_view(runs[0][1], runs[0][2], len(index))
    if out is None:
        out = x.new_empty(x.shape[0], len(index), *x.shape[2:])
    for (start, first, step), end in zip(runs, ends):
        out[:, start:end] = run_view(first, step, end - start)
    return out


def _keys(x, key_rows: tuple[tuple[int, ...], ...]):
    """(clips, frames of the group, key frames * tokens, channels): each query frame's keys, materialised
    once (as the attention function needs them) straight from slices of x."""
    clips, _, n, c = x.shape
    g, m = len(key_rows), len(key_rows[0])
    out = x.new_empty(clips, g, m, n, c)
    for j in range(m):
        _take(x, tuple(row[j] for row in key_rows), out[:, :, j])
    return out.view(clips, g, m * n, c)


_RUNNING = contextvars.ContextVar("tav_frame_attention", default=False)


def running() -> bool:
    """Whether the code running now is inside frame_attention (gradient checkpointing keeps its outputs)."""
    return _RUNNING.get()


@contextlib.contextmanager
def _marked():
    token = _RUNNING.set(True)
    try:
        yield
    finally:
        _RUNNING.reset(token)


@lru_cache(maxsize=16)
def takes_transformer_options(attention) -> bool:
    """Whether an attention function accepts transformer_options (newer ComfyUI reads attention
    overrides from them, e.g. attention-override nodes)."""
    try:
        params = inspect.signature(attention).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "transformer_options" or p.kind is p.VAR_KEYWORD for p in params)


def frame_attention(q, k, v, heads: int, clips: int, positions: tuple[int, ...], mode: str,
                    radius: int = 1, attention=None, transformer_options=None, **attention_kwargs):
    """Self-attention across frames.

    q, k, v: (clips * frames, tokens, channels), already projected. `attention(q, k, v, heads)` is
    ComfyUI's optimized_attention (default); it also gets `transformer_options` where it takes them.
    Returns (clips * frames, tokens, channels of v).
    """
    with _marked():
        return _frame_attention(q, k, v, heads, clips, positions, mode, radius, attention, transformer_options,
                                **attention_kwargs)


def _frame_attention(q, k, v, heads, clips, positions, mode, radius, attention, transformer_options,
                     **attention_kwargs):
    if attention is None:
        import comfy.ldm.modules.attention as comfy_attention
        attention = comfy_attention.optimized_attention
    if transformer_options is not None and takes_transformer_options(attention):
        attention_kwargs["transformer_options"] = transformer_options
    frames = len(positions)
    if frames == 1:
        return attention(q, k, v, heads, **attention_kwargs)
    n, nk = q.shape[1], k.shape[1]
    qc = q.view(clips, frames, n, q.shape[-1])
    kc = k.view(clips, frames, nk, k.shape[-1])
    vc = v.view(clips, frames, nk, v.shape[-1])
    out = None
    for group, key_rows in _groups(positions, mode, radius):
        g, m = len(group), len(key_rows[0])
        whole = group == tuple(range(frames))  # the usual case (sparse_causal, full, ...): no query gather
        qg = qc if whole else _take(qc, group)
        if all(row == key_rows[0] for row in key_rows):  # e.g. full, first_frame: one key set per clip
            qq = qg.reshape(clips, g * n, -1)
            kk = _take(kc, key_rows[0]).reshape(clips, m * nk, -1)
            vv = _take(vc, key_rows[0]).reshape(clips, m * nk, -1)
        else:
            qq = qg.reshape(clips * g, n, -1)
            kk = _keys(kc, key_rows).view(clips * g, m * nk, -1)
            vv = _keys(vc, key_rows).view(clips * g, m * nk, -1)
        o = attention(qq, kk, vv, heads, **attention_kwargs)
        if whole:
            return o.reshape(clips * frames, n, -1)
        if out is None:
            out = o.new_empty(clips, frames, n, o.shape[-1])
        runs = _runs(group)
        for (start, first, _), end in zip(runs, [r[0] for r in runs[1:]] + [g]):
            out[:, first:first + end - start] = o.view(clips, g, n, -1)[:, start:end]
    return out.view(clips * frames, n, -1)

"""Frame-shared GroupNorm: Tune-A-Video's inflated res blocks normalise a clip's frames together."""
from __future__ import annotations

import torch


def clip_group_norm(x, clips: int, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """GroupNorm whose statistics span channel group x frames x height x width of each clip.

    x: (clips * frames, C, H, W). Each clip (cond, uncond, ...) is normalised on its own.
    """
    frames = x.shape[0] // clips
    if frames == 1:
        return torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)
    clip = x.view(clips, frames, *x.shape[1:]).transpose(1, 2)  # (clips, C, frames, H, W)
    y = torch.nn.functional.group_norm(clip, num_groups, weight, bias, eps)
    return y.transpose(1, 2).reshape(x.shape)

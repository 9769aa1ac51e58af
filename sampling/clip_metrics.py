"""Tune-A-Video's and LOVEU-TGVE's automatic video metrics, as pure functions of CLIP embeddings.

frame_consistency: mean cosine similarity of the frames' CLIP image embeddings over frame pairs (all
pairs, or consecutive ones); the paper reports it x100 (Tune-A-Video 92.40). text_alignment: mean over
frames of 100 x cosine(frame embedding, prompt embedding) (CLIP score; Tune-A-Video 27.58).
plot_values draws per-frame numbers as a small IMAGE for a node's preview.
"""
from __future__ import annotations

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def pair_similarities(image_embeds: torch.Tensor, pairs: str = "all") -> torch.Tensor:
    """Cosine similarity of each frame pair ("all": every i < j; "consecutive": (i, i+1)), shape [pairs]."""
    if image_embeds.ndim != 2 or image_embeds.shape[0] < 2:
        raise ValueError(f"frame consistency needs embeddings of 2 or more frames [frames, dim], "
                         f"got {tuple(image_embeds.shape)}")
    e = _unit(image_embeds)
    if pairs == "consecutive":
        return (e[1:] * e[:-1]).sum(-1)
    if pairs == "all":
        i, j = torch.triu_indices(len(e), len(e), offset=1)
        return (e[i] * e[j]).sum(-1)
    raise ValueError(f"pairs must be 'all' or 'consecutive', got {pairs!r}")


def frame_consistency(image_embeds: torch.Tensor, pairs: str = "all") -> float:
    """Mean cosine similarity over frame pairs, in -1..1 (1.0: all frames embed identically)."""
    return float(pair_similarities(image_embeds, pairs).mean())


def frame_scores(image_embeds: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """100 x cosine of each frame's embedding [frames, dim] with the prompt's embedding [dim] or [1, dim]."""
    if text_embed.reshape(-1).shape[0] != image_embeds.shape[-1]:
        raise ValueError(f"image embeddings ({image_embeds.shape[-1]}) and text embedding "
                         f"({text_embed.reshape(-1).shape[0]}) have different sizes: use a text encoder "
                         "whose projection matches the CLIP vision model")
    return 100 * (_unit(image_embeds) @ _unit(text_embed.reshape(-1)))


def text_alignment(image_embeds: torch.Tensor, text_embed: torch.Tensor) -> float:
    """Mean CLIP score (100 x cosine) of the frames with the prompt."""
    return float(frame_scores(image_embeds, text_embed).mean())


def plot_values(values, lo: float | None = None, hi: float | None = None, width: int = 256,
                height: int = 96) -> torch.Tensor:
    """A bar per value (light bars on dark), scaled from lo to hi: IMAGE [1, height, width, 3]."""
    v = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    image = torch.full((height, width, 3), 0.12)
    if v.numel() == 0:
        return image.unsqueeze(0)
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    frac = ((v - lo) / (hi - lo)).clamp(0, 1) if hi > lo else torch.ones_like(v)
    edges = torch.linspace(0, width, v.numel() + 1).round().long()
    for k, f in enumerate(frac):
        top = height - 1 - int(round(float(f) * (height - 2)))
        image[top:, edges[k]:max(edges[k] + 1, edges[k + 1] - 1)] = torch.tensor([0.35, 0.75, 0.95])
    return image.unsqueeze(0)

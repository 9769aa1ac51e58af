"""Plug-and-Play feature injection (past the paper): the source clip's decoder features steer the edit.

Tune-A-Video keeps a clip's motion only through the inverted noise; V2VBench ranks it last of 8 editors on
motion alignment. Plug-and-Play (Tumanyan et al., CVPR 2023) keeps an image's layout by feeding the edit,
for the first sampling steps, the source's spatial features at one decoder block. Here the source's features
come from DDIM inversion itself: inversion calls the UNet at each noise level the sampler later starts a
step from, so the output of decoder block `block`'s res block is recorded there and, while sampling, the
edit's output at that block and level is replaced by the source's (the blocks after it, with their
cross-attention to the new prompt, still edit). Which block: later ones (finer features) keep more and let
less change; Plug-and-Play uses the 4th of SD's decoder layers (ComfyUI output block 4).

    store = FeatureStore(frames=8, sigmas=descending_sigmas[:k], path=injection_path(unet, 4))
    transformer_options[STORE_KEY] = ("record", store)   # while inverting
    transformer_options[STORE_KEY] = ("replay", store)   # while sampling: the first k steps
"""
from __future__ import annotations

import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

STORE_KEY = "tav_feature_injection"


def injection_path(unet, block: int) -> str:
    """Module path of output block `block`'s res block, or a ValueError naming the valid range."""
    count = len(unet.output_blocks)
    if not isinstance(block, int) or not 0 <= block < count or not isinstance(unet.output_blocks[block][0], ResBlock):
        raise ValueError(f"injection_block must be a decoder block from 0 to {count - 1} of this UNet, got {block!r}. "
                         "4 is Plug-and-Play's choice for SD1.5.")
    return f"output_blocks.{block}.0"


class FeatureStore:
    """One decoder res block's output [frames, channels, height, width] per recorded noise level."""

    def __init__(self, frames: int, sigmas, path: str, device=None):
        self.frames = frames
        self.sigmas = [float(s) for s in sigmas]
        self.path = path
        self.device = torch.device("cpu") if device is None else device
        self.features: dict[int, torch.Tensor] = {}

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies transformer_options: keep one store
        return self

    def step(self, transformer_options: dict) -> int | None:
        """Index in `sigmas` of the noise level this model call runs at, or None when it is not stored."""
        sigma = transformer_options.get("sigmas")
        if sigma is None:
            return None
        value = float(torch.as_tensor(sigma).reshape(-1)[0])
        for i, s in enumerate(self.sigmas):
            if abs(s - value) <= 1e-4 * max(1.0, abs(s)):
                return i
        return None

    def record(self, step: int, positions, x: torch.Tensor) -> None:
        """Keep the first clip's frames (inversion runs one clip, unguided) at their clip positions."""
        stored = self.features.get(step)
        if stored is None:
            stored = self.features[step] = x.new_zeros(self.frames, *x.shape[1:], device=self.device)
        stored[list(positions)] = x[:len(positions)].detach().to(self.device, stored.dtype)

    def replay(self, step: int, positions, x: torch.Tensor) -> torch.Tensor:
        """x with every clip's frames replaced by the source's at the same positions."""
        if step not in self.features:
            raise ValueError(f"no source features recorded at sampling step {step}: sample the inverted latent "
                             "with the model it was inverted with")
        src = self.features[step]
        if src.shape[1:] != x.shape[1:]:
            raise ValueError(f"the source features {tuple(src.shape[1:])} do not fit this model call "
                             f"{tuple(x.shape[1:])}: sample at the size and with the model you inverted with")
        return src[list(positions)].to(x.device, x.dtype).repeat(x.shape[0] // len(positions), 1, 1, 1)


def injection_hook(transformer_options: dict, positions):
    """(module path, forward hook) recording or replaying this call's features, or None when not stored."""
    entry = transformer_options.get(STORE_KEY)
    if entry is None:
        return None
    mode, store = entry
    step = store.step(transformer_options)
    if step is None:
        return None
    if mode == "record":
        def hook(module, args, output):
            store.record(step, positions, output)
    else:
        def hook(module, args, output):
            return store.replay(step, positions, output)
    return store.path, hook

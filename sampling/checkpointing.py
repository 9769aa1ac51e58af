"""Gradient checkpointing of a Tune-A-Video training clone's UNet (non-reentrant), for one model call at a time.

The regions (checkpoint_regions) are whole transformers (their blocks and temporal attention included), res
blocks, upsamplers and the output head; between regions autograd keeps only each region's input. Inside a
region the selective policy keeps the frame-attention outputs and recomputes the rest (_keep_attention;
recompute_all: nothing kept). The TAV hooks and nested regions a region runs exist only during the UNet call;
the backward's recomputation puts them back (_recompute_as_forward).
"""
from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint

from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, Upsample

from ..attention_patches import frame_attention

CHECKPOINT_KEY = "tune_a_video_checkpointing"


def _attention_ops() -> frozenset:
    """torch's fused attention kernels (what SDPA dispatches to), where this torch has them."""
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    return frozenset(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


def _keep_attention(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep the outputs of the fused attention that frame attention runs
    (tokens x channels, plus the softmax statistics), recompute everything else. That attention is a third
    or more of a transformer block's FLOPs at SD resolutions; cross-attention (77 keys) and temporal attention
    (F keys) are cheap to recompute and are not kept. Convolution outputs are recomputed too: on SD1.5 at
    24 x 512^2 keeping them held 1.2 GB to save 6.8 of 72 TFLOP per step (docs/real-size.md)."""
    policy = torch.utils.checkpoint.CheckpointPolicy
    return policy.MUST_SAVE if op in _ATTENTION_OPS and frame_attention.running() else policy.PREFER_RECOMPUTE


_ATTENTION_OPS = _attention_ops()
_SELECTIVE = getattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts", None)


def _recompute_as_forward(patch, hooks, nested, forward, *args, **kwargs):
    """forward as during the UNet call: with the TAV forward hooks inside it (temporal attention,
    frame-shared GroupNorm) and the checkpointed forwards of the regions nested in it. Both are in place
    during the call; the backward recomputes after the call removed them, so they are put back for it
    (public hook API; instance forwards) and removed again."""
    handles = [m.register_forward_hook(h, with_kwargs=kw) for m, h, kw in hooks
               if patch.live_hooks.get(m, (None,))[0] is not h]
    swapped = []
    for m, f in nested:
        if m.__dict__.get("forward") is not f:
            swapped.append((m, m.__dict__.get("forward")))
            m.forward = f
    try:
        return forward(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        _restore_forwards(swapped)


def _restore_forwards(saved):
    for module, previous in reversed(saved):
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous


def _checkpointed(patch, selective, module, nested, forward, *args, **kwargs):
    # The UNet mutates transformer_options ("block", "block_index", ...) between this forward and
    # the backward's recomputation: recompute with the values of this call.
    args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
    if _SELECTIVE is not None and selective:
        kwargs["context_fn"] = functools.partial(_SELECTIVE, _keep_attention)
    hooks = [(m, h, kw) for m, h, kw in patch.hooks_in(module) if m is not module]  # its own run outside forward
    run = functools.partial(_recompute_as_forward, patch, hooks, nested, forward)
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def checkpoint_regions(unet, patch) -> list[tuple[torch.nn.Module, list[torch.nn.Module]]]:
    """What gradient checkpointing wraps, as (module, modules checkpointed inside it): each transformer
    (norm, proj_in, its blocks with their temporal attention, proj_out) as one region, each res block, each
    upsampler (its input is a quarter of its conv's) and the output head. Between regions autograd keeps
    only each region's input.
    A transformer of several blocks (SDXL: up to 10) also checkpoints each block and its temporal attention
    inside it, so that recomputing it keeps one block's activations at a time."""
    blocks: dict[str, list[str]] = {}
    for path, _ in patch.blocks:
        blocks.setdefault(path.rsplit(".transformer_blocks.", 1)[0], []).append(path)
    regions = []
    for transformer, paths in blocks.items():
        nested = []
        if len(unet.get_submodule(transformer).transformer_blocks) > 1:
            nested = [unet.get_submodule(p) for p in paths]
            nested += [patch.temporal.block(p) for p in paths] if patch.temporal is not None else []
        regions += [(m, []) for m in nested] + [(unet.get_submodule(transformer), nested)]
    regions += [(m, []) for m in unet.modules() if isinstance(m, (ResBlock, Upsample))]
    return regions + [(unet.out, [])]  # the output head: GroupNorm, SiLU, conv (fp32 norm input)


class Checkpointing:
    """DIFFUSION_MODEL wrapper: non-reentrant gradient checkpointing of the given regions' forwards for
    the duration of one model call (restored afterwards). A module's own TAV forward hooks run outside its
    checkpointed forward; the TAV hooks inside it (temporal attention on its transformer blocks, frame-shared
    GroupNorms) and the regions nested in it are taken at forward time and put back while the backward
    recomputes it. Non-reentrant: parameters get gradients even where no input requires grad.
    selective=False recomputes everything in the backward, frame-attention outputs too (_keep_attention
    keeps them otherwise).
    """

    def __init__(self, regions, patch, selective=True):
        self.regions, self.patch, self.selective = list(regions), patch, selective  # nested regions first

    def __call__(self, executor, *args, **kwargs):
        saved, forwards = [], {}
        try:
            for module, nested in self.regions:
                wrapped = functools.partial(_checkpointed, self.patch, self.selective, module,
                                            [(m, forwards[m]) for m in nested], module.forward)
                saved.append((module, module.__dict__.get("forward")))
                forwards[module] = module.forward = wrapped
            return executor(*args, **kwargs)
        finally:
            _restore_forwards(saved)

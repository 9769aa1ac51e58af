"""Attach Tune-A-Video's attention to a ComfyUI MODEL (a ModelPatcher), without touching the base.

- Self-attention of every transformer block -> frame attention, via set_model_attn1_replace.
- Temporal attention after each block's feed-forward and frame-shared GroupNorm in res blocks and
  the output norm: forward hooks that exist only while *this* model's UNet runs (registered and
  removed by a DIFFUSION_MODEL wrapper), so the shared module tree is never left modified and other
  clones of the checkpoint never see them. State-dict keys of the base model do not change.
- Temporal attention weights live in a module tree owned by the patch, loaded to ComfyUI's compute
  device with the model as an additional model.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.utils
from comfy.ldm.modules.attention import BasicTransformerBlock
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel

from .feature_injection import injection_hook
from .frame_attention import MODES, frame_attention
from .frame_norm import clip_group_norm
from .layout import clip_layout
from .temporal_attention import TEMPORAL_INITS, TemporalAttention, TemporalAttentionSet

PATCH_KEY = "tune_a_video"
SUPPORTED = "SD1.x, SD2.x and SDXL (UNets with ComfyUI's standard transformer blocks)"


@dataclass(frozen=True)
class TAVConfig:
    attention_mode: str = "sparse_causal"
    window_radius: int = 1
    temporal_attention: bool = True
    frame_shared_norm: bool = True
    temporal_init: str = "identity"  # or "tune_a_video" (temporal_attention.TEMPORAL_INITS)
    temporal_position_encoding: bool = False  # past the paper: frame index into the temporal attention
    temporal_width: int = 0  # past the paper: 0 = each block's own width; else this inner width (big UNets)


def unet_of(model) -> UNetModel:
    """The patchable UNet of a ModelPatcher, or a clear error naming what is supported."""
    inner = getattr(model, "model", None)
    unet = getattr(inner, "diffusion_model", None)
    family = type(getattr(inner, "model_config", inner)).__name__
    if not isinstance(unet, UNetModel) or getattr(unet, "use_temporal_resblocks", False):
        raise ValueError(f"Tune-A-Video supports {SUPPORTED}; this model is {family} "
                         f"({type(unet).__name__}). Load an SD1.5, SD2 or SDXL checkpoint.")
    return unet


def transformer_blocks(unet: UNetModel):
    """(module path, ComfyUI patch key (block_name, number, transformer_index), block) per block."""
    for path, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            parts = path.split(".")
            index = int(parts[-1])
            if parts[0] == "input_blocks":
                key = ("input", int(parts[1]), index)
            elif parts[0] == "middle_block":
                key = ("middle", 0, index)
            elif parts[0] == "output_blocks":
                key = ("output", int(parts[1]), index)
            else:
                continue
            yield path, key, module


def frame_norm_paths(unet: UNetModel) -> list[str]:
    """GroupNorms that TAV's inflated UNet applies over a whole clip: res blocks and the output."""
    paths = []
    for path, module in unet.named_modules():
        if isinstance(module, ResBlock):
            paths += [f"{path}.in_layers.0", f"{path}.out_layers.0"]
    paths.append("out.0")
    return [p for p in paths if isinstance(unet.get_submodule(p), torch.nn.GroupNorm)]


TEMPORAL_HEAD_WIDTH = 64  # head size of a narrowed temporal attention (SD2/SDXL's own head size)


def temporal_layer(block, width: int = 0, dtype=None, device=None) -> TemporalAttention:
    """An (unseeded) TemporalAttention for a transformer block: the block's heads and head size (the paper),
    or, for width > 0, an inner width of `width` as width // 64 heads of 64 (a multiple of 64; see TAVConfig)."""
    heads, dim_head = (block.n_heads, block.d_head) if width == 0 else \
        (width // TEMPORAL_HEAD_WIDTH, TEMPORAL_HEAD_WIDTH)
    return TemporalAttention(block.attn1.to_q.in_features, heads, dim_head, dtype=dtype, device=device)


def build_temporal_attention(unet: UNetModel, dtype=None, seed: int = 0, init: str = "identity",
                             width: int = 0) -> TemporalAttentionSet:
    """A fresh TemporalAttention for every transformer block (temporal_layer), seeded `init`
    (TemporalAttention.reset_parameters).

    Built outside inference mode (ComfyUI runs nodes under it) so the weights can be trained.
    """
    with torch.inference_mode(False):
        return _build_temporal_attention(unet, dtype, seed, init, width)


def _build_temporal_attention(unet, dtype, seed, init, width):
    temporal = TemporalAttentionSet()
    generator = torch.Generator().manual_seed(seed)
    for path, _, block in transformer_blocks(unet):
        module = temporal_layer(block, width, dtype=dtype)
        module.reset_parameters(generator, init)
        temporal.add(path, module)
    return temporal


class TAVPatch:
    """What one TuneAVideoApplyAttention attaches to a model; shared (not copied) by its clones."""

    def __init__(self, config: TAVConfig, blocks: list[tuple[str, tuple]], norm_paths: list[str],
                 temporal: TemporalAttentionSet | None):
        self.config = config
        self.blocks = blocks
        self.norm_paths = norm_paths
        self.temporal = temporal
        # forward hooks registered during this patch's UNet call: module -> (hook, with_kwargs)
        self.live_hooks: dict[torch.nn.Module, tuple[functools.partial, bool]] = {}

    def __deepcopy__(self, memo):
        # ModelPatcher.clone deep-copies model_options (where attn1_replace lives); keep one patch.
        return self

    def attn1_replace(self, q, k, v, extra_options):
        q, k, v = (_tensor(t) for t in (q, k, v))
        layout = clip_layout(q.shape[0], extra_options)
        return frame_attention(q, k, v, extra_options["n_heads"], layout.clips, layout.positions,
                               self.config.attention_mode, self.config.window_radius,
                               attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)

    def diffusion_model_wrapper(self, executor, x, timesteps, context, y, control,
                                transformer_options, **kwargs):
        unet = executor.class_obj
        layout = clip_layout(x.shape[0], transformer_options)
        handles, live = [], {}
        try:
            if self.temporal is not None:
                for path, _ in self.blocks:
                    hook = functools.partial(_temporal_hook, self.temporal.block(path), layout.frames,
                                             layout.positions if self.config.temporal_position_encoding else None)
                    live[unet.get_submodule(path)] = (hook, True)
            if self.config.frame_shared_norm and layout.frames > 1:
                hook = functools.partial(_norm_hook, layout.clips)
                live.update({unet.get_submodule(p): (hook, False) for p in self.norm_paths})
            self.live_hooks = live
            handles += [m.register_forward_hook(h, with_kwargs=kw) for m, (h, kw) in live.items()]
            injection = injection_hook(transformer_options, layout.positions)  # Invert feature_injection
            if injection is not None:  # never under training (Invert runs without gradients)
                handles.append(unet.get_submodule(injection[0]).register_forward_hook(injection[1]))
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            self.live_hooks = {}

    def hooks_in(self, module: torch.nn.Module) -> list[tuple[torch.nn.Module, functools.partial, bool]]:
        """The temporal-attention and frame-shared GroupNorm hooks live on `module` or inside it right now (only
        during this patch's UNet call): gradient checkpointing re-registers them when the backward recomputes
        the module after the call removed them. (module, hook, with_kwargs) each."""
        return [(m, *self.live_hooks[m]) for m in module.modules() if m in self.live_hooks]

    def temporal_state_dict(self) -> dict[str, torch.Tensor]:
        """Temporal attention weights, keyed `<unet block path>.{attn_temp,norm_temp}.<param>`."""
        return {} if self.temporal is None else self.temporal.state_dict()


def _tensor(t) -> torch.Tensor:
    """q/k/v as a tensor. ComfyUI 0.33+ has single-owner attention tensor containers (`take()`), which its
    CrossAttention hands to optimized_attention since 0.40; replace patches still get tensors, but should they
    ever get containers, the tensor is taken out (docs/comfyui-versions.md)."""
    return t if isinstance(t, torch.Tensor) or not callable(getattr(t, "take", None)) else t.take()


def _temporal_hook(module: TemporalAttention, frames: int, positions, block, args, kwargs, output):
    return module(output, frames, kwargs.get("transformer_options"), positions)


def _norm_hook(clips: int, norm: torch.nn.GroupNorm, args, output):
    x = args[0]
    if hasattr(norm, "weight_function"):  # a comfy op: weights may be patched, offloaded or cast
        weight, bias, stream = comfy.ops.cast_bias_weight(norm, x, offloadable=True)
        y = clip_group_norm(x, clips, norm.num_groups, weight, bias, norm.eps)
        comfy.ops.uncast_bias_weight(norm, weight, bias, stream)
        return y
    weight = None if norm.weight is None else norm.weight.to(x)
    bias = None if norm.bias is None else norm.bias.to(x)
    return clip_group_norm(x, clips, norm.num_groups, weight, bias, norm.eps)


def base_weight(model, key: str) -> torch.Tensor:
    """The checkpoint's own value of a state-dict key (e.g. `diffusion_model.<block>.attn1.to_q.weight`).

    ComfyUI patches weights in place for the last-loaded clone of a checkpoint (W + LoRA, W + delta) and
    keeps the unpatched tensor in the patcher's backup, which all clones share: read it there, never the
    live Parameter. Raises AttributeError for a key the model does not have.
    """
    saved = getattr(model, "backup", {}).get(key)
    return saved.weight if saved is not None else comfy.utils.get_attr(model.model, key)


def get_tav_patch(model) -> TAVPatch | None:
    """The Tune-A-Video patch carried by a MODEL, if any."""
    return model.get_attachment(PATCH_KEY)


def apply_tav(model, config: TAVConfig, temporal_weights: dict | None = None):
    """A clone of `model` carrying Tune-A-Video's attention. The input model is left untouched.

    Re-applying to an already patched model replaces its mode/switches and keeps its (possibly
    tuned) temporal attention weights. `temporal_weights` (a temporal_state_dict(), e.g. tuned or
    from an adapter) gives the clone its own new temporal attention modules with those weights.
    """
    if config.attention_mode not in MODES:
        raise ValueError(f"attention_mode must be one of {', '.join(MODES)}, got {config.attention_mode!r}")
    if config.temporal_init not in TEMPORAL_INITS:
        raise ValueError(f"temporal_init must be one of {', '.join(TEMPORAL_INITS)}, got {config.temporal_init!r}")
    if config.window_radius < 0:
        raise ValueError(f"window_radius must be >= 0, got {config.window_radius}")
    if config.temporal_width < 0 or config.temporal_width % TEMPORAL_HEAD_WIDTH:
        raise ValueError(f"temporal_width must be 0 (each block's own width) or a multiple of "
                         f"{TEMPORAL_HEAD_WIDTH}, got {config.temporal_width}")
    unet = unet_of(model)
    blocks = list(transformer_blocks(unet))
    if not blocks:
        raise ValueError(f"Tune-A-Video found no transformer blocks in this UNet; it supports {SUPPORTED}.")

    previous = get_tav_patch(model)
    temporal = None
    if config.temporal_attention:
        if previous is not None and previous.temporal is not None and temporal_weights is None \
                and previous.config.temporal_width == config.temporal_width:
            temporal = previous.temporal
        else:
            temporal = build_temporal_attention(unet, dtype=model.model.get_dtype(), init=config.temporal_init,
                                                width=config.temporal_width)
            if temporal_weights is not None:
                with torch.inference_mode(False), torch.no_grad():
                    missing, unexpected = temporal.load_state_dict(temporal_weights, strict=False)
                for path, _, _ in blocks:
                    temporal.block(path).refresh_identity()
                if missing or unexpected:
                    raise ValueError(
                        "Tune-A-Video temporal attention weights do not fit this UNet "
                        f"(missing {len(missing)} keys e.g. {missing[:1]}, unexpected {len(unexpected)} "
                        f"e.g. {unexpected[:1]}); they were made for another model family or layout.")
    patch = TAVPatch(config, [(path, key) for path, key, _ in blocks], frame_norm_paths(unet), temporal)

    m = model.clone()
    for _, key, _ in blocks:
        m.set_model_attn1_replace(patch.attn1_replace, *key)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PATCH_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PATCH_KEY,
                           patch.diffusion_model_wrapper)
    m.remove_additional_models(PATCH_KEY)
    if temporal is not None:
        m.set_additional_models(PATCH_KEY, [comfy.model_patcher.ModelPatcher(
            temporal, load_device=model.load_device, offload_device=model.offload_device)])
    m.set_attachments(PATCH_KEY, patch)
    return m

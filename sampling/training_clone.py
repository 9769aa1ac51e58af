"""The training clone: a private clone of a Tune-A-Video patched MODEL whose trainables get gradients.

Nothing is ever written into the shared checkpoint, and nothing is read from its live Parameters at
construction time. Everything goes through ComfyUI's weight wrappers (ModelPatcher.add_weight_wrapper,
the mechanism of core's own trainer), which run inside ComfyUI's weight cast at every layer call:
- trained query layers: W -> W + delta (delta an fp32 master Parameter, zero at start);
- every other UNet weight and bias: a detached copy. ComfyUI hands wrappers a fresh copy of the
  loaded weight, which is a normal tensor even where the checkpoint was loaded under inference mode
  (autograd may save it), and detaching it keeps gradients off frozen weights in every context.
The loaded weights are what ComfyUI's own loading makes of this clone: the checkpoint's unpatched
weights (restored from the patcher's backup when another clone of the checkpoint was loaded before,
LoRA'd, tuned or cancelled) plus this model's own patches. Under dynamic VRAM the run trains on core's
classic patcher over a fresh copy of the weights (dynamic_vram.py). The temporal attention is the clone's own copy.
Gradient checkpointing (non-reentrant) covers whole transformers (their blocks and temporal attention
included), res blocks, upsamplers and the output head (checkpoint_regions); it keeps frame-attention and
spatial-convolution outputs and recomputes the rest (see _keep_attention; recompute_all: nothing kept).
"""
from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import comfy.utils

from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, Upsample

from ..attention_patches.unet_patch import apply_tav, get_tav_patch, unet_of
from .adapters import PREFIX
from .dynamic_vram import check_gradients, check_wrappers_applied, in_training, is_dynamic, training_patcher
from .low_rank import DOWN, UP, LowRankDelta, factor_tensors, is_lora_key, module_key, new_factors
from .tuning_objective import run_tuning

CHECKPOINT_KEY = "tune_a_video_checkpointing"


class WeightDelta(torch.nn.Module):
    """A weight wrapper: W -> W + delta, summed in the delta's dtype (fp32 master weights)."""

    def __init__(self, delta: torch.nn.Parameter):
        super().__init__()
        self.delta = delta

    def forward(self, weight):
        return (weight.detach().to(self.delta.dtype) + self.delta).to(weight.dtype)

    def move_to(self, device):
        self.to(device=device)
        return self.delta.nelement() * self.delta.element_size()


def frozen(weight: torch.Tensor) -> torch.Tensor:
    """A weight wrapper for frozen tensors: ComfyUI's fresh copy, cut from autograd history."""
    return weight.detach()


def _attention_ops() -> frozenset:
    """torch's fused attention kernels (what SDPA dispatches to), where this torch has them."""
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    return frozenset(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


def _keep_attention(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep the outputs of fused attention over at least as many keys as
    queries (frame attention: tokens x channels, plus the softmax statistics) and of spatial convolutions
    (3x3; a 1x1 proj_in/proj_out is as cheap to redo as a linear layer), recompute everything else. That
    attention is a third or more of a transformer block's FLOPs at SD resolutions; cross-attention (77 keys)
    and temporal attention (F keys) are cheap to recompute and are not kept. A res block then recomputes only
    its norms and activations (cheap, elementwise) and still drops their saved tensors: on the CPU benchmark
    1 s less per step for +9 % peak memory."""
    policy = torch.utils.checkpoint.CheckpointPolicy
    if op is _CONVOLUTION and args[1].shape[-1] > 1:  # weight (out, in, kh, kw)
        return policy.MUST_SAVE
    if op in _ATTENTION_OPS and args[1].shape[-2] >= args[0].shape[-2]:  # q, k: (b, h, n, d)
        return policy.MUST_SAVE
    return policy.PREFER_RECOMPUTE


_CONVOLUTION = torch.ops.aten.convolution.default
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
    for module, previous in saved:
        if previous is None:
            del module.forward
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
    selective=False recomputes everything in the backward, attention and convolution outputs too
    (_keep_attention keeps them otherwise): on SDXL at 16 x 1024^2 those are about a third of the
    activations kept.
    """

    def __init__(self, regions, patch, selective=True):
        self.regions, self.patch, self.selective = list(regions), patch, selective  # nested regions first

    def __call__(self, executor, *args, **kwargs):
        saved, forwards = [], {}
        try:
            for module, nested in self.regions:
                saved.append((module, module.__dict__.get("forward")))
                forwards[module] = module.forward = functools.partial(
                    _checkpointed, self.patch, self.selective, module, [(m, forwards[m]) for m in nested],
                    module.forward)
            return executor(*args, **kwargs)
        finally:
            _restore_forwards(saved)


class _TuningSampler(comfy.samplers.Sampler):
    """Runs the training loop where a sampler would run, so ComfyUI's guider prepares everything
    (model loading, conds, hooks, wrappers, cond_or_uncond) exactly as for sampling."""

    def __init__(self, **loop_args):
        self.loop_args = loop_args
        self.losses = []

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x0 = latent_image.detach().float().clone()

        def denoise(x, sigma):
            return model_wrap(x, sigma, **extra_args)

        self.losses = run_tuning(denoise, x0, model_wrap.inner_model.model_sampling, **self.loop_args)
        return latent_image


def _after_step(callback, step, loss, params):
    if step == 0:  # a layer that skipped its weight wrapper leaves its trained tensor without a gradient
        check_gradients(params)
    if callback is not None:
        callback(step, loss, params)


class TuningRun:
    """A training clone of a TAV-patched model and its trainable tensors. close() unloads it and removes
    every trace from the shared module tree.

    queries: linear layers per transformer block that get a delta (e.g. attn1.to_q); temporal: the parts
    of each temporal attention that are trained ("attn_temp", "norm_temp"). query_rank > 0: those layers get
    low-rank deltas (low_rank.py; down seeded by `seed`) instead of full ones. checkpointing: True (keep
    attention and convolution outputs, recompute the rest), "all" (recompute everything) or False.
    """

    def __init__(self, patched, queries, temporal=("attn_temp",), precision=torch.float32, checkpointing=True,
                 query_rank=0, seed=0):
        patched = training_patcher(patched)  # under dynamic VRAM: the classic patcher (dynamic_vram.py)
        patch = get_tav_patch(patched)
        self.model = apply_tav(patched, patch.config, temporal_weights=patch.temporal_state_dict() or None)
        self.patch = get_tav_patch(self.model)
        self.device = self.model.load_device
        self.compute_dtype = precision
        self.params: dict[str, torch.nn.Parameter] = {}
        self.factors: dict[str, tuple] = {}  # query_rank > 0: weight key -> (down, up) (low_rank.py)
        self._wrapped: list[tuple[str, object]] = []
        unet = unet_of(self.model)
        generator = torch.Generator().manual_seed(seed)

        for path, _ in self.patch.blocks:
            for name in queries:
                key = f"{PREFIX}{path}.{name}.weight"
                shape = comfy.utils.get_attr(self.model.model, key).shape
                if query_rank:
                    down, up = new_factors(shape, query_rank, generator, self.device)
                    self._wrap(key, LowRankDelta(down, up, 1.0))
                    self.factors[key] = (down, up)
                    self.params[module_key(key) + DOWN], self.params[module_key(key) + UP] = down, up
                    continue
                delta = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=self.device))
                self._wrap(key, WeightDelta(delta))
                self.params[key] = delta
        for module_name, module in unet.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                key = f"{PREFIX}{module_name}.{pname}"
                if key in self.params or key in self.factors:
                    continue
                if not hasattr(module, "weight_function"):
                    raise ValueError(f"Tune-A-Video One-Shot Tune: {key} is not a ComfyUI op ({type(module).__name__}); "
                                     "this UNet cannot be trained without writing its weights.")
                self._wrap(key, frozen)

        if self.patch.temporal is not None:
            with torch.inference_mode(False):
                self.patch.temporal.float().requires_grad_(False)
                for path, _ in self.patch.blocks:
                    for part in temporal:
                        prefix = f"{path}.{part}"
                        for name, param in self.patch.temporal.block(path).get_submodule(part).named_parameters():
                            param.requires_grad_(True)
                            self.params[f"temporal.{prefix}.{name}"] = param

        if self.compute_dtype != self.model.model_dtype():
            self.model.set_model_compute_dtype(self.compute_dtype)
        if checkpointing:
            self.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CHECKPOINT_KEY,
                                            Checkpointing(checkpoint_regions(unet, self.patch), self.patch,
                                                          selective=checkpointing != "all"))

    def _wrap(self, key, function):
        self.model.add_weight_wrapper(key, function)
        self._wrapped.append((key, function))

    def load(self):
        models = [self.model] + self.model.get_nested_additional_models()
        # Training owns the device: everything else is unloaded. ComfyUI's load of this clone restores the
        # checkpoint's unpatched weights (the shared backup) before applying this clone's own patches.
        comfy.model_management.load_models_gpu(models, memory_required=1e20,
                                               force_full_load=not is_dynamic(self.model))
        check_wrappers_applied(self.model, [(k, f) for k, f in self._wrapped if f is not frozen])

    def train(self, samples, positive, steps, learning_rate, seed, callback=None, **loop_args):
        self.load()
        autocast = None if self.compute_dtype == torch.float32 else self.compute_dtype
        sampler = _TuningSampler(params=self.params, steps=steps, learning_rate=learning_rate, seed=seed,
                                 autocast_dtype=autocast, grad_scaling=self.compute_dtype == torch.float16,
                                 callback=functools.partial(_after_step, callback),
                                 disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, **loop_args)
        guider = comfy.samplers.CFGGuider(self.model)
        guider.inner_set_conds({"positive": positive})
        guider.set_cfg(1.0)
        with in_training():
            guider.sample(torch.zeros_like(samples), samples, sampler, torch.ones(2), seed=seed)
        return sampler.losses

    def trained(self) -> tuple[dict, dict]:
        """(query deltas by model key, the whole temporal attention by temporal key), fp32 on CPU."""
        deltas = {k: p.detach().float().cpu() for k, p in self.params.items()
                  if k.startswith(PREFIX) and not is_lora_key(k)}
        temporal = {k: v.detach().float().cpu() for k, v in self.patch.temporal_state_dict().items()}
        return deltas, temporal

    def trained_lora(self) -> dict:
        """The low-rank query deltas (query_rank > 0) as file-keyed fp32 CPU tensors (low_rank.factor_tensors)."""
        return factor_tensors(self.factors)

    def close(self):
        """Unload the training clone and drop its weight wrappers from the shared modules, which ComfyUI
        only clears at the next load: the base keeps nothing."""
        mine = {id(self.model)} | {id(m) for m in self.model.get_nested_additional_models()}
        loaded = comfy.model_management.current_loaded_models
        for i in range(len(loaded) - 1, -1, -1):
            if id(loaded[i].model) in mine:
                loaded.pop(i).model_unload()
        functions = {id(f) for _, f in self._wrapped}
        unet = unet_of(self.model)
        for key, _ in self._wrapped:
            module_name, pname = key[len(PREFIX):].rsplit(".", 1)
            module = unet.get_submodule(module_name)
            attr = "weight_function" if pname == "weight" else "bias_function"
            if attr in module.__dict__:
                setattr(module, attr, [f for f in getattr(module, attr) if id(f) not in functions])
        self._wrapped.clear()
        self.params.clear()
        self.factors.clear()
        comfy.model_management.soft_empty_cache()

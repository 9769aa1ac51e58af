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
Gradient checkpointing: checkpointing.py.
"""
from __future__ import annotations

import functools

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import comfy.utils

from ..attention_patches.unet_patch import apply_tav, get_tav_patch, unet_of
from .adapters import PREFIX
from .checkpointing import CHECKPOINT_KEY, Checkpointing, checkpoint_regions
from .dynamic_vram import check_gradients, check_wrappers_applied, in_training, is_dynamic, training_patcher
from .low_rank import DOWN, UP, LowRankDelta, factor_tensors, is_lora_key, module_key, new_factors
from .tuning_objective import run_tuning

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
    frame-attention outputs, recompute the rest), "all" (recompute everything) or False.
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

"""Training under ComfyUI's dynamic VRAM (ModelPatcherDynamic, 0.28+ on NVIDIA GPUs unless started with
--disable-dynamic-vram), read from 0.33.0 and newer sources (docs/comfyui-versions.md):

- Its loader stages weights per module in a virtual buffer and installs ModelPatcher weight wrappers only on
  modules larger than 16 KiB; smaller ones are force-loaded without them. A trained delta on such a layer
  would silently not train.
- Weights handed to wrappers may be views of staging buffers that are reused after the layer's call, while
  autograd keeps the weight of a layer it must differentiate through.
- It refuses hooks on weights and full loads; `load_models_gpu(force_full_load=True)` is ignored there.

Training therefore runs on the classic patcher where core offers it: `get_non_dynamic_delegate()`, the
public method core's sampler itself switches to when dynamic VRAM lacks a feature (hooked conds). Like core's
trainer (TrainLoraNode: `clone(force_deepcopy=True)`), the run then owns a fresh copy of the checkpoint's
weights, loaded once more by the loader that made the model. Where there is no delegate (a model from a
custom loader) training stays on the dynamic patcher, and `check_wrappers_applied` turns the silent case
into an error naming the layer and the way out. `check_gradients` (after the first step) catches the same from
any other cause, e.g. a Linear forward that no longer runs weight wrappers (ComfyUI 0.40's reworked Linear
forward, PR #16816, could not be read). Capabilities are detected, never versions.
"""
from __future__ import annotations

import contextlib
import logging

import comfy.model_management


def is_dynamic(model) -> bool:
    """Whether `model` is managed by ComfyUI's dynamic VRAM patcher."""
    return bool(getattr(model, "is_dynamic", lambda: False)())


def training_patcher(model):
    """The patcher a training run should clone: `model` itself, or, under dynamic VRAM, its classic
    (non-dynamic) delegate on a fresh copy of the weights. The delegate is made from a throwaway clone so
    the copy lives only as long as the run (core caches it on the patcher it was asked of)."""
    if not is_dynamic(model) or not hasattr(model, "get_non_dynamic_delegate"):
        return model
    try:
        return model.clone().get_non_dynamic_delegate()
    except RuntimeError as e:  # no cached loader to reload the weights from (custom loaders)
        logging.warning("Tune-A-Video: training on ComfyUI's dynamic VRAM patcher (%s). If training fails or "
                        "does not learn, start ComfyUI with --disable-dynamic-vram.", e)
        return model


def check_wrappers_applied(model, wrapped, node: str = "Tune-A-Video One-Shot Tune"):
    """RuntimeError unless every (state-dict key, weight wrapper) in `wrapped` sits on its layer after
    ComfyUI loaded `model` (dynamic VRAM leaves small layers without wrappers)."""
    missing = []
    for key, function in wrapped:
        module_name, _, param = key.rpartition(".")
        module = model.model.get_submodule(module_name)
        functions = getattr(module, f"{param}_function", ())
        if not any(f is function for f in functions):
            missing.append(key)
    if missing:
        raise RuntimeError(
            f"{node}: ComfyUI loaded {len(missing)} trained layers without their training hook (e.g. "
            f"{missing[0]}); this happens under dynamic VRAM for small layers. Start ComfyUI with "
            "--disable-dynamic-vram to tune.")


def check_gradients(params: dict, node: str = "Tune-A-Video One-Shot Tune"):
    """RuntimeError naming the trained tensors that got no gradient in a training step: their layers ran
    without the weight wrappers (a loader that dropped them, a fused forward that skips them)."""
    missing = [name for name, p in params.items() if p.grad is None]
    if missing:
        raise RuntimeError(
            f"{node}: {len(missing)} of {len(params)} trained tensors got no gradient (e.g. {missing[0]}): this "
            "ComfyUI ran those layers without their training hooks, so they would not learn. Start ComfyUI with "
            "--disable-dynamic-vram; if that does not help, this ComfyUI version is not supported for tuning yet.")


@contextlib.contextmanager
def in_training():
    """comfy.model_management.in_training set for the duration, as core's trainer does (some models avoid
    in-place ops under it); a no-op where ComfyUI has no such flag."""
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):
        yield
        return
    previous, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = previous

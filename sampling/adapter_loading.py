"""Loading adapter files: this pack's format (adapters.py) or the official Tune-A-Video UNet.

The official UNet (diffusers naming, `down_blocks.i.attentions.j.transformer_blocks.k.…`, optionally
prefixed `unet.`) is read as an adapter: its attn1/attn2 query WEIGHTS become deltas against the model
they are loaded onto, its attn_temp/norm_temp weights become the temporal attention; every other key is
ignored. Block paths are mapped with ComfyUI's own comfy.utils.unet_to_diffusers. Deltas are always taken
against the checkpoint's own weights (unet_patch.base_weight), whatever clone of it is loaded.
Only safetensors is ever opened (no pickle).
"""
from __future__ import annotations

import logging
from pathlib import Path

import comfy.utils

from .adapters import (FORMAT, PREFIX, TAVAdapter, make_adapter, model_family, model_weight, parse_adapter,
                       read_safetensors)
from .validation import check_adapter

OFFICIAL_PREFIXES = ("down_blocks.", "mid_block.", "up_blocks.")
OFFICIAL_QUERIES = ("attn1.to_q.weight", "attn2.to_q.weight")


def load_adapter_file(path, model) -> TAVAdapter:
    """A TAVAdapter from this pack's adapter file or an official Tune-A-Video (diffusers) UNet file.

    `model` is the MODEL it will be applied to (official query weights become deltas against it).
    """
    tensors, metadata = read_safetensors(path)
    name = Path(path).name
    if metadata.get("format") == FORMAT or any(k.startswith(PREFIX) for k in tensors):
        return parse_adapter(tensors, metadata, name)
    stripped = {k[len("unet."):] if k.startswith("unet.") else k: v for k, v in tensors.items()}
    if any(k.startswith(OFFICIAL_PREFIXES) for k in stripped):
        return official_to_adapter(model, stripped, name)
    raise ValueError(f"{name} is neither a Tune-A-Video adapter (diffusion_model.*.to_q.diff / attn_temp keys) "
                     "nor an official Tune-A-Video UNet (down_blocks.*.transformer_blocks.* keys). "
                     "Save adapters with Tune-A-Video Save Adapter.")


def official_block_paths(model) -> dict[str, str]:
    """diffusers transformer-block prefix -> ComfyUI block path, for this model's UNet layout."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    suffix = ".attn1.to_q.weight"
    return {d[:-len(suffix)]: c[:-len(suffix)] for d, c in mapping.items() if d.endswith(suffix)}


def official_to_adapter(model, tensors: dict, name: str = "official UNet") -> TAVAdapter:
    """An official Tune-A-Video UNet state dict (diffusers keys) as an adapter for `model`.

    Query weights W_official become deltas W_official - W_checkpoint (the checkpoint's own unpatched
    weight, in fp32); attn_temp/norm_temp weights are taken as they are. Nothing is written.
    """
    blocks = official_block_paths(model)
    deltas, temporal, ignored = {}, {}, 0
    base_checked = False
    for key, value in tensors.items():
        head, sep, tail = key.partition(".transformer_blocks.")
        index, _, suffix = tail.partition(".")
        block = blocks.get(f"{head}{sep}{index}") if sep else None
        if block is None:
            ignored += 1
        elif suffix in OFFICIAL_QUERIES:
            model_key = f"{PREFIX}{block}.{suffix}"
            deltas[model_key] = value.float() - model_weight(model, model_key, name, value.shape)
        elif suffix.startswith(("attn_temp.", "norm_temp.")):
            temporal[f"{block}.{suffix}"] = value.float()
        else:
            ignored += 1
            if suffix == "attn1.to_k.weight" and not base_checked:  # frozen in TAV: equal unless another base
                base_checked = True
                base = model_weight(model, f"{PREFIX}{block}.{suffix}", name, value.shape)
                if (value.float() - base).abs().max() > 1e-2:
                    logging.warning("Tune-A-Video: %s was tuned from a different base checkpoint than this model "
                                    "(frozen weights differ at %s); its query weights are applied as they are.",
                                    name, key)
    if not deltas and not temporal:
        raise ValueError(f"{name}: no Tune-A-Video keys (transformer_blocks.*.attn1.to_q / attn_temp) match this "
                         f"model's UNet layout ({model_family(model)}); it was made for another model family.")
    check_adapter({**deltas, **{PREFIX + k: v for k, v in temporal.items()}}, {}, name)
    logging.info("Tune-A-Video: imported %d query weights and %d temporal tensors from %s (%d other keys ignored).",
                 len(deltas), len(temporal), name, ignored)
    return make_adapter(model, deltas, temporal, source="official_tune_a_video")

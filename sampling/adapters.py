"""Tune-A-Video adapters: what one-shot tuning trained, as a small safetensors file, and back onto a MODEL.

File keys use ComfyUI's UNet naming; <block> is a transformer block path such as
input_blocks.1.1.transformer_blocks.0:
    diffusion_model.<block>.attn1.to_q.diff         query delta W_tuned - W_base (trained layers only);
    diffusion_model.<block>.attn2.to_q.diff         ComfyUI's LoRA loader reads `.diff` keys too
    diffusion_model.<block>.attn_temp.<param>       the whole temporal attention, trained or not
    diffusion_model.<block>.norm_temp.<param>
    diffusion_model.<block>.attn1.to_q.lora_up.weight / .lora_down.weight / .alpha
                                                    low-rank query deltas instead of .diff (Tune query_rank > 0;
                                                    ComfyUI's LoRA format, see low_rank.py)
Tensors are fp32 unless Save Adapter was asked for fp16/bf16 (metadata storage_dtype); in memory they are
always fp32. Metadata (all strings): format, format_version, source, model_family, block_layout (JSON
[[block, dim, heads, dim_head], ...]), frames, latent_size, prompt, steps, learning_rate, seed, trainable,
precision, attention_mode, window_radius, temporal_attention, frame_shared_norm, temporal_init,
temporal_position_encoding, temporal_width (0: each block's own width), query_rank (0: full deltas),
storage_dtype, final_loss, pack_version.

Files are loaded with adapter_loading.load_adapter_file (this format or the official Tune-A-Video UNet).

A model carrying an adapter remembers it (a ModelPatcher attachment), so adapters stack: applying or
tuning on top of one gives a model whose adapter_of() holds the sum of both deltas and the latest
temporal attention -- everything needed to rebuild the model on its bare checkpoint.

Only safetensors is ever opened (no pickle).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..attention_patches.unet_patch import (TAVConfig, apply_tav, base_weight, get_tav_patch, temporal_layer,
                                            transformer_blocks, unet_of)
from .low_rank import add_lora_patches, fold_into, is_lora_key, modules, stack_lora
from .validation import check_adapter, check_format_version

FORMAT = "tune_a_video_adapter"
FORMAT_VERSION = "1"
PREFIX = "diffusion_model."
DELTA_SUFFIX = ".diff"
TEMPORAL_PARTS = (".attn_temp.", ".norm_temp.")
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ADAPTER_KEY = "tune_a_video_adapter"


def _pack_version() -> str:
    try:
        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
        return re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)
    except (OSError, AttributeError):
        return "unknown"


PACK_VERSION = _pack_version()


@dataclass(frozen=True)
class TAVAdapter:
    """The tuned part of a model (the TAV_ADAPTER value). Tensors are fp32 on CPU.

    deltas: model state-dict key (`diffusion_model.<block>.attn1.to_q.weight`) -> W_tuned - W_base.
    temporal: temporal_state_dict key (`<block>.attn_temp.to_q.weight`, ...) -> weight.
    lora: low-rank query deltas by file key (`diffusion_model.<block>.attn1.to_q.lora_up.weight`, ...).
    """
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    temporal: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    lora: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter as file keys -> tensors (see the module docstring)."""
        out = {k[:-len(".weight")] + DELTA_SUFFIX: v for k, v in self.deltas.items()}
        out.update({PREFIX + k: v for k, v in self.temporal.items()})
        out.update(self.lora)
        return out


def model_family(model) -> str:
    """ComfyUI's name for the model's family (supported_models class), e.g. SD15, SD20, SDXL."""
    return type(model.model.model_config).__name__


def block_layout(model) -> list[list]:
    return [[path, block.attn1.to_q.in_features, block.n_heads, block.d_head]
            for path, _, block in transformer_blocks(unet_of(model))]


def make_adapter(model, deltas: dict, temporal: dict, lora: dict | None = None, **info) -> TAVAdapter:
    """An adapter for `model` (the base it was tuned on) from trained tensors, kept as fp32.
    lora: low-rank query deltas by file key (low_rank.factor_tensors).

    info: extra metadata (frames, prompt, steps, learning_rate, ...); values become strings.
    """
    def store(name, t):
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not torch.isfinite(t).all():
            raise ValueError(f"Tune-A-Video adapter: {name} holds NaN or infinite values. "
                             "The tuning diverged: lower learning_rate or steps and tune again.")
        return t

    patch = get_tav_patch(model)
    config = patch.config if patch is not None else TAVConfig()
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "source": "tuned",
        "model_family": model_family(model), "block_layout": json.dumps(block_layout(model)),
        "attention_mode": config.attention_mode, "window_radius": str(config.window_radius),
        "temporal_attention": str(config.temporal_attention or bool(temporal)),
        "frame_shared_norm": str(config.frame_shared_norm), "temporal_init": config.temporal_init,
        "temporal_position_encoding": str(config.temporal_position_encoding),
        "temporal_width": str(config.temporal_width), "pack_version": PACK_VERSION,
    }
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()})
    return TAVAdapter({k: store(k, v) for k, v in deltas.items()},
                      {k: store(k, v) for k, v in temporal.items()}, metadata,
                      {k: store(k, v) for k, v in (lora or {}).items()})


def save_adapter(adapter: TAVAdapter, path, storage: str = "fp32") -> Path:
    """Write the adapter as .safetensors; storage fp16/bf16 halves the file (recorded as storage_dtype)."""
    import safetensors.torch

    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage must be one of {', '.join(STORAGE_DTYPES)}, got {storage!r}.")
    tensors = {}
    for key, value in adapter.tensors().items():
        tensors[key] = value.to(STORAGE_DTYPES[storage]).contiguous()
        if not torch.isfinite(tensors[key]).all():
            raise ValueError(f"Tune-A-Video adapter: {key} does not fit in {storage} (values beyond its range); "
                             "save it as fp32.")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(tensors, str(tmp), metadata={**adapter.metadata, "storage_dtype": storage})
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # readable like any other model file
    tmp.replace(path)  # never leave a half-written adapter under the final name
    return path


# --- reading ----------------------------------------------------------------------------------

def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file, or a ValueError that says what is wrong."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ValueError(f"Tune-A-Video adapters are read from .safetensors files only; {path.name} is not one. "
                         "Pickled checkpoints (.ckpt/.pt/.bin) are never opened: convert them to safetensors.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error type, OSError, ...: all mean "not a readable file"
        raise ValueError(
            f"{path.name} is not a readable safetensors file ({type(e).__name__}: {e}). It is truncated "
            "(an interrupted copy or download) or not safetensors at all (a renamed pickle .ckpt/.pt/.bin, "
            "which is never opened). Save or download it again.") from None
    return tensors, metadata


def parse_adapter(tensors, metadata, name) -> TAVAdapter:
    """This pack's adapter file (checked tensors and metadata) as a TAVAdapter; ValueError naming the file."""
    check_format_version(metadata, int(FORMAT_VERSION), name)  # first: a newer format may hold new keys
    check_adapter(tensors, metadata, name)
    deltas, temporal, lora = {}, {}, {}
    for key, value in tensors.items():
        value = value.float()  # fp32 in memory, whatever the file's storage
        if key.startswith(PREFIX) and is_lora_key(key):
            lora[key] = value
        elif key.startswith(PREFIX) and key.endswith(DELTA_SUFFIX):
            deltas[key[:-len(DELTA_SUFFIX)] + ".weight"] = value
        elif key.startswith(PREFIX) and any(part in key for part in TEMPORAL_PARTS):
            temporal[key[len(PREFIX):]] = value
        else:
            raise ValueError(f"{name}: unexpected key {key!r} in a Tune-A-Video adapter (format "
                             f"{metadata.get('format_version', '?')}); the file is damaged or from another tool.")
    if not deltas and not temporal and not lora:
        raise ValueError(f"{name} holds no tuned weights.")
    try:
        modules(lora)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return TAVAdapter(deltas, temporal, metadata, lora)


def model_weight(model, key, name, shape) -> torch.Tensor:
    """The checkpoint's own weight at `key` in fp32 on CPU; ValueError unless it exists with `shape`."""
    try:
        weight = base_weight(model, key)
    except AttributeError:
        raise ValueError(f"{name}: {key} does not exist in this model; the file was made for another "
                         "model family or UNet layout.") from None
    if tuple(weight.shape) != tuple(shape):
        raise ValueError(f"{name}: {key} has shape {tuple(shape)} in the file but {tuple(weight.shape)} in this "
                         f"model ({model_family(model)}); the file was made for another model family.")
    return weight.detach().to(device="cpu", dtype=torch.float32)


# --- applying ---------------------------------------------------------------------------------

def check_fits(model, adapter: TAVAdapter, name: str = "adapter"):
    """ValueError unless every tensor of `adapter` has a place of the same shape in `model`."""
    family = adapter.metadata.get("model_family")
    if family and family != model_family(model):
        raise ValueError(f"{name} was tuned on a {family} model but this model is {model_family(model)}. "
                         f"Load it onto a {family} checkpoint (any fine-tune of that family works).")
    for key, delta in adapter.deltas.items():
        model_weight(model, key, name, delta.shape)
    for module, (down, up, _) in modules(adapter.lora).items():
        model_weight(model, module + ".weight", name, (up.shape[0], down.shape[1]))
    width = config_from_metadata(adapter.metadata).temporal_width
    blocks = {path: block for path, _, block in transformer_blocks(unet_of(model))}
    expected = {}
    for path in {k.split(".attn_temp.")[0].split(".norm_temp.")[0] for k in adapter.temporal}:
        block = blocks.get(path)
        if block is None:
            raise ValueError(f"{name}: temporal attention for {path}, a transformer block this model does not "
                             f"have ({model_family(model)}, {len(blocks)} blocks); it was made for another layout.")
        meta = temporal_layer(block, width, device="meta")
        expected.update({f"{path}.{k}": tuple(v.shape) for k, v in meta.state_dict().items()})
    for key, value in adapter.temporal.items():
        if key not in expected:
            raise ValueError(f"{name}: unexpected temporal attention key {key!r}.")
        if tuple(value.shape) != expected[key]:
            raise ValueError(f"{name}: {key} has shape {tuple(value.shape)} but this model needs {expected[key]} "
                             f"({model_family(model)}); the file was made for another model family"
                             f"{'' if width else ' (or it was tuned with another temporal_width)'}.")


def config_from_metadata(metadata: dict) -> TAVConfig:
    """The attention settings the adapter was tuned with (defaults where not recorded)."""
    default = TAVConfig()
    return TAVConfig(metadata.get("attention_mode", default.attention_mode),
                     int(metadata.get("window_radius", default.window_radius)),
                     metadata.get("temporal_attention", str(default.temporal_attention)) == "True",
                     metadata.get("frame_shared_norm", str(default.frame_shared_norm)) == "True",
                     metadata.get("temporal_init", default.temporal_init),
                     metadata.get("temporal_position_encoding", str(default.temporal_position_encoding)) == "True",
                     int(metadata.get("temporal_width", default.temporal_width)))


def apply_adapter(model, adapter: TAVAdapter, name: str = "adapter"):
    """A clone of `model` carrying the adapter: Tune-A-Video's attention (the model's own settings if it is
    already patched, else the adapter's; frame positions always as the adapter records), the adapter's
    temporal attention weights, and its query deltas as ("diff", delta) weight patches (so LoRAs stack with
    it). `model` is left untouched. The clone remembers the stacked adapter (adapter_of).
    """
    check_fits(model, adapter, name)
    patch = get_tav_patch(model)
    config = patch.config if patch is not None else config_from_metadata(adapter.metadata)
    if "temporal_position_encoding" in adapter.metadata:  # its temporal weights were tuned with (or without) it
        recorded = config_from_metadata(adapter.metadata).temporal_position_encoding
        config = replace(config, temporal_position_encoding=recorded)
    if adapter.temporal:  # its weights have the adapter's shapes
        config = replace(config, temporal_attention=True,
                         temporal_width=config_from_metadata(adapter.metadata).temporal_width)
    tuned = apply_tav(model, config, temporal_weights=dict(adapter.temporal) or None)
    if adapter.deltas:
        added = set(tuned.add_patches({k: ("diff", (v,)) for k, v in adapter.deltas.items()}))
        missing = sorted(set(adapter.deltas) - added)
        if missing:
            raise ValueError(f"{name}: {len(missing)} query deltas found no weight in this model (e.g. {missing[0]}).")
    add_lora_patches(tuned, adapter.lora, name)
    tuned.set_attachments(ADAPTER_KEY, stack(adapter_of(model), adapter))
    return tuned


def adapter_of(model) -> TAVAdapter | None:
    """The adapter a model carries on top of its checkpoint (all adapters applied or tuned so far), if any."""
    return model.get_attachment(ADAPTER_KEY)


def stack(below: TAVAdapter | None, above: TAVAdapter) -> TAVAdapter:
    """One adapter equal to applying `below` and then `above`: deltas add, the latest temporal attention wins.
    Low-rank deltas stack side by side (low_rank.stack_lora); a layer with a full delta in either adapter
    gets one full delta (the low-rank ones folded in), so a file never holds both kinds for one layer."""
    if below is None:
        return above
    deltas = dict(below.deltas)
    for key, delta in above.deltas.items():
        deltas[key] = deltas[key] + delta if key in deltas else delta
    lora = fold_into(deltas, stack_lora(below.lora, above.lora))
    return TAVAdapter(deltas, dict(above.temporal or below.temporal), dict(above.metadata), lora)

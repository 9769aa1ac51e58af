"""Seeded random-weight FULL-SIZE checkpoints that ComfyUI's own loader detects as SD1.5, SD2.1-768-v or SDXL.

Built from ComfyUI's own classes: the model config (comfy.supported_models), its UNet, text encoder(s)
and VAE on the meta device (no memory), and the checkpoint-saving conversion ComfyUI's CheckpointSave
uses (BaseModel.state_dict_for_saving: key names, OpenCLIP q/k/v packing, the `v_pred` marker). Each
tensor is then filled and written one at a time into the safetensors file, so generating SDXL (3.5 B
parameters, 6.9 GB in fp16) needs well under 1 GB of memory. Cached under .cache/checkpoints, never
committed. Takes about 1-3 min per family on 2 CPU cores (mostly the random numbers).

Weights: per tensor a generator seeded by (seed, CRC32 of the key), so the file does not depend on
the order of writing. Norm scales 1; norm shifts 0, except in the v-prediction model where they are
N(0, 0.1^2): ComfyUI tells SD2 v from eps by the spread of
output_blocks.11.1.transformer_blocks.0.norm1.bias (> 0.09). Other vectors 0, embeddings N(0, 0.02^2),
everything else N(0, 1/fan_in) so activations stay O(1) through the deep random stacks.

    flock <lock> python scripts/models/full_size.py sd15 sd21v sdxl   # print the cached paths
"""
from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

FAMILIES = ("sd15", "sd21v", "sdxl")
VERSION = 1  # bump when the generator changes (part of the file name)
_COMMON = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, use_spatial_transformer=True,
               legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
UNET_CONFIGS = {  # ComfyUI's own detected configs (comfy/model_detection.py)
    "sd15": dict(_COMMON, context_dim=768, num_heads=8, use_linear_in_transformer=False, adm_in_channels=None,
                 channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    "sd21v": dict(_COMMON, context_dim=1024, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=None,
                  channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                  transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    "sdxl": dict(_COMMON, context_dim=2048, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816,
                 num_classes="sequential", channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2],
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]),
}
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "int64": "I64"}


def checkpoint_name(family: str, unet_dtype: str = "fp16") -> str:
    return f"tav_full_{family}_{unet_dtype}_v{VERSION}.safetensors"


def meta_state_dict(family: str, unet_dtype: str = "fp16") -> dict:
    """The checkpoint's tensors as ComfyUI would save them (key -> meta tensor, or a real small tensor)."""
    import torch
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.model_base
    import comfy.ops
    import comfy.supported_models as supported

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[unet_dtype]
    config_class = {"sd15": supported.SD15, "sd21v": supported.SD20, "sdxl": supported.SDXL}[family]
    model_config = config_class(dict(UNET_CONFIGS[family], dtype=dtype))
    meta = torch.device("meta")
    if family == "sdxl":
        model = comfy.model_base.SDXL(model_config, device=meta)
    else:
        model_type = comfy.model_base.ModelType.V_PREDICTION if family == "sd21v" else comfy.model_base.ModelType.EPS
        model = comfy.model_base.BaseModel(model_config, model_type=model_type, device=meta)
    clip = model_config.clip_target().clip(device="meta", dtype=torch.float16)
    with torch.device("meta"):
        vae = autoencoder.AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
    vae_sd = {k: v.to(torch.float16) for k, v in vae.state_dict().items()}
    return model.state_dict_for_saving(clip.state_dict(), vae_sd)


def _value(key: str, t, sd: dict, seed: int, v_prediction: bool):
    """The seeded value of one tensor (see module doc)."""
    import torch

    if t.device.type != "meta":  # real tensors from the conversion (position ids, the v_pred marker)
        return t.contiguous()
    shape = tuple(t.shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    stem = key.rsplit(".", 1)[0]
    if len(shape) == 0:
        value = torch.full(shape, 4.6052)  # logit_scale = log(100), CLIP's trained value
    elif len(shape) == 1:
        norm = key.endswith(".bias") and sd.get(stem + ".weight") is not None and sd[stem + ".weight"].ndim == 1
        if key.endswith(".weight"):
            value = torch.ones(shape)
        elif norm and v_prediction and key.startswith("model.diffusion_model."):
            value = torch.randn(shape, generator=g) * 0.1
        else:
            value = torch.zeros(shape)
    else:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        std = 0.02 if "embedding" in key else fan_in ** -0.5
        value = torch.randn(shape, generator=g) * std
    return value.to(t.dtype)


def write_checkpoint(path: Path, family: str, seed: int = 0, unet_dtype: str = "fp16") -> Path:
    """Write the random full-size checkpoint of `family` to `path`, tensor by tensor (safetensors format)."""
    import torch

    sd = meta_state_dict(family, unet_dtype)
    keys = sorted(sd)
    header, offset = {}, 0
    for k in keys:
        t = sd[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _SAFETENSORS_DTYPES[str(t.dtype).split(".")[1]], "shape": list(t.shape),
                     "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"tav_random": f"family={family},seed={seed},unet={unet_dtype},v={VERSION}"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k in keys:
            value = _value(k, sd[k], sd, seed, family == "sd21v")
            f.write(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    tmp.rename(path)
    return path


def full_checkpoint(family: str, unet_dtype: str = "fp16") -> Path:
    """The cached random full-size checkpoint of `family` (written on first use: hold the big-memory lock)."""
    import comfy_runtime

    path = comfy_runtime.CACHE / "checkpoints" / checkpoint_name(family, unet_dtype)
    if not path.is_file():
        comfy_runtime.import_comfy()
        write_checkpoint(path, family, unet_dtype=unet_dtype)
    return path


def main(argv: list[str]) -> int:
    families = [a for a in argv if not a.startswith("--")] or list(FAMILIES)
    unet_dtype = "bf16" if "--bf16" in argv else "fp16"
    for family in families:
        print(full_checkpoint(family, "bf16" if family == "sdxl" and unet_dtype == "bf16" else "fp16"))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import _paths  # noqa: F401  (the purpose folders of scripts/ on sys.path)
    sys.exit(main(sys.argv[1:]))

"""scripts/models/ -- stand-in models: checkpoints and UNets made from a seed, never downloaded.

Tests, benchmarks and the demo need a real ComfyUI checkpoint or UNet but must not fetch multi-GB
weights; this folder generates them (seeded, cached under .cache/, never committed). Full-size
generators belong here too. Depends only on scripts/env (comfy_runtime), never the other way round.

    python scripts/models/random_models.py checkpoint [--full]   # write the random SD1.5 checkpoint, print its path

Seeded random-weight models for tests, benchmarks and the demo (never committed, never downloaded).

  - make_random_sd15 / random_checkpoint: an SD1.5 checkpoint FILE that ComfyUI's loader detects as
    SD1.5 (reduced UNet unless full_unet; real CLIP-L and VAE shapes), cached under .cache/checkpoints.
    Norms are exact identities and other weights N(0, 1/fan_in), so deep random stacks stay O(1).
  - random_unet: the reduced or full SD1.5 UNet in memory (benchmarks).
  - tiny_model: a tiny in-memory UNet (ComfyUI's own UNetModel/BaseModel/ModelPatcher, fp32) for the
    pure and in-process tests; norms are perturbed around identity so every layer matters.
Both need ComfyUI importable (comfy_runtime.import_comfy).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)

CHECKPOINT_NAME = "tav_random_sd15_v2.safetensors"  # bump when the generator changes
CONTEXT_DIM = 32  # tiny_model's cross-attention width
ADM_DIM = 16      # tiny_model's pooled-vector width (sdxl=True)
SD15_LAYOUT = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
REDUCED_LAYOUT = {"model_channels": 320, "channel_mult": [1, 1], "num_res_blocks": [1, 1],
           "transformer_depth": [1, 1], "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1]}


def _fill_random(module, generator, dtype):
    """Seeded random weights, scaled so activations stay O(1) through deep random stacks.

    Norm layers (GroupNorm/LayerNorm, whatever their names: the UNet's are in_layers.0, out.0, ...)
    get scale 1 and shift 0; everything else of rank >= 2 is N(0, 1/fan_in); other vectors 0.
    """
    import torch

    norm_params = {f"{name}.{p}" if name else p
                   for name, m in module.named_modules()
                   if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))
                   for p in ("weight", "bias")}
    sd = {}
    for name, t in module.state_dict(keep_vars=True).items():
        shape = tuple(t.shape)
        if name.endswith("position_ids"):
            sd[name] = torch.arange(shape[-1]).expand(shape).clone()
            continue
        if name in norm_params:
            value = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            std = 0.02 if "embedding" in name else fan_in ** -0.5
            value = torch.randn(shape, generator=generator) * std
        else:
            value = torch.zeros(shape)
        sd[name] = value.to(dtype)
    return sd


def make_random_sd15(path: Path, seed: int = 0, full_unet: bool = False) -> Path:
    """Write a random-weight SD1.5 checkpoint (fp16). Reduced UNet unless full_unet."""
    import torch
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.ops
    import safetensors.torch
    from transformers import CLIPTextConfig, CLIPTextModel

    g = torch.Generator().manual_seed(seed)
    unet_cfg = dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, num_heads=8,
        context_dim=768, use_linear_in_transformer=False, adm_in_channels=None,
        use_temporal_attention=False, use_spatial_transformer=True, legacy=False,
        operations=comfy.ops.disable_weight_init, device="meta",
    )
    unet_cfg.update(SD15_LAYOUT if full_unet else REDUCED_LAYOUT)
    unet = openaimodel.UNetModel(**unet_cfg)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, hidden_act="quick_gelu"))
    sd = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                           ("cond_stage_model.transformer.", clip)):
        for k, v in _fill_random(module, g, torch.float16).items():
            sd[prefix + k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file(sd, str(tmp), metadata={"tav_random": f"seed={seed},full={full_unet}"})
    tmp.rename(path)
    return path


def random_checkpoint(full_unet: bool = False) -> Path:
    """The cached random SD1.5 checkpoint (generated on first use, never committed)."""
    import comfy_runtime

    name = CHECKPOINT_NAME.replace(".safetensors", "_full.safetensors") if full_unet else CHECKPOINT_NAME
    path = comfy_runtime.CACHE / "checkpoints" / name
    if not path.is_file():
        comfy_runtime.import_comfy()
        make_random_sd15(path, full_unet=full_unet)
    return path


def tiny_model(seed=0, model_channels=32, heads=4, depth=1, sdxl=False):
    """A tiny SD1.5-style UNet (ComfyUI's UNetModel/BaseModel/ModelPatcher), seeded fp32 weights.

    sdxl=True: SDXL's layout instead (linear projections in the transformers, no attention at the
    first level, two blocks per transformer, a pooled-vector `y` input).
    """
    import torch
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
        "channel_mult": [1, 2], "num_res_blocks": [1, 1], "transformer_depth": [depth, depth],
        "transformer_depth_output": [depth] * 4, "transformer_depth_middle": depth,
        "context_dim": CONTEXT_DIM, "use_linear_in_transformer": False, "adm_in_channels": None,
        "use_temporal_attention": False, "use_spatial_transformer": True, "legacy": False,
        "dtype": torch.float32,
    }
    if sdxl:
        unet_config.update(use_linear_in_transformer=True, transformer_depth=[0, 2],
                           transformer_depth_output=[0, 0, 2, 2], adm_in_channels=ADM_DIM,
                           num_classes="sequential")
    config = comfy.supported_models.SD15(unet_config)
    config.unet_config["num_heads"] = heads
    model = comfy.model_base.BaseModel(config, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)
            elif "norm" in name or "in_layers.0" in name or "out_layers.0" in name or name.startswith("out.0"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))


def random_unet(reduced: bool, device: str):
    """An in-memory SD1.5 UNet (reduced or full layout) with seeded random weights, as a ModelPatcher (benchmarks)."""
    import torch
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    cfg = dict(REDUCED_LAYOUT if reduced else SD15_LAYOUT, image_size=32, in_channels=4, out_channels=4, context_dim=768,
               use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
               use_spatial_transformer=True, legacy=False,
               dtype=torch.float16 if device == "cuda" else torch.float32)
    model = comfy.model_base.BaseModel(comfy.supported_models.SD15(cfg), device=torch.device(device))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            else:  # norm scales 1, biases 0
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                            offload_device=torch.device("cpu"))


def main(argv: list[str]) -> int:
    if argv[:1] != ["checkpoint"]:
        print(__doc__)
        return 2
    print(random_checkpoint(full_unet="--full" in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Helpers for tests: the pack as a package, tiny UNets from ComfyUI's own classes, model calls."""
import importlib
import uuid
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui_tune_a_video"


def load_pack():
    import comfy_runtime
    return comfy_runtime.load_pack(PACK_NAME)


def pack_module(name):
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")


CONTEXT_DIM = 32


ADM_DIM = 16


def tiny_model(seed=0, model_channels=32, heads=4, depth=1, sdxl=False):
    """A tiny SD1.5-style UNet (ComfyUI's UNetModel/BaseModel/ModelPatcher), seeded fp32 weights.

    sdxl=True: SDXL's layout instead (linear projections in the transformers, no attention at the
    first level, two blocks per transformer, a pooled-vector `y` input).
    """
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


def latents(frames, seed=1, size=8, clip_like=True):
    """A latent clip: a shared picture plus per-frame motion-like noise (or pure noise)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, size, size, generator=g)
    per_frame = torch.randn(frames, 4, size, size, generator=g)
    return base + 0.5 * per_frame if clip_like else per_frame


def context(seed, tokens=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, CONTEXT_DIM, generator=g)


def predict(model, x, sigma=1.0, contexts=None, batched=True):
    """Denoised prediction per conditioning, computed the way ComfyUI's samplers call the model.

    contexts: list of cross-attention contexts (e.g. [cond, uncond]). batched=True runs them in one
    model call (cond_or_uncond=[0, 1]); False runs each alone.
    """
    import comfy.conds
    import comfy.model_management
    import comfy.samplers

    contexts = contexts or [context(100)]
    comfy.model_management.load_models_gpu([model])
    model.pre_run()
    def model_conds(c):
        out = {"c_crossattn": comfy.conds.CONDCrossAttn(c)}
        if model.model.diffusion_model.num_classes is not None:  # SDXL-style pooled vector
            out["y"] = comfy.conds.CONDRegular(c.mean(1)[:, :1].expand(1, ADM_DIM).contiguous())
        return out

    conds = [[{"model_conds": model_conds(c), "uuid": uuid.uuid4()}] for c in contexts]
    ts = torch.full((x.shape[0],), float(sigma))
    import comfy_runtime

    options = comfy_runtime.sampler_options(model)  # as CFGGuider does: wrappers included
    with torch.no_grad():
        if batched:
            return comfy.samplers.calc_cond_batch(model.model, conds, x, ts, options)
        return [comfy.samplers.calc_cond_batch(model.model, [c], x, ts, options)[0] for c in conds]

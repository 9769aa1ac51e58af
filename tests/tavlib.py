"""Helpers for tests: the pack as a package, tiny UNets (built in scripts/models/random_models.py), model calls."""
import importlib
import uuid
from pathlib import Path

import torch

from random_models import ADM_DIM, CONTEXT_DIM, tiny_model  # noqa: F401  (tavlib.tiny_model)

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui_tune_a_video"


def load_pack():
    import comfy_runtime
    return comfy_runtime.load_pack(PACK_NAME)


def pack_module(name):
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")


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

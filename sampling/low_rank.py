"""Low-rank (LoRA) query deltas: the compact alternative to the paper's full W_tuned - W_base per query layer.

One-Shot Tune `query_rank` r > 0 trains, for every tuned linear layer W (out x in) of every transformer block,
delta = up @ down * alpha / r with down (r x in) and up (out x r), alpha = r (scale 1). up starts at zero, so
the untuned delta is exactly zero; down starts as PyTorch's default Linear init, seeded by the tuning seed.
On SDXL (60 blocks of width 1280) that is 4 * r * width per block instead of 2 * width^2: at r = 16 about
5 M parameters for the two queries instead of 205 M.

Adapter file keys are those of ComfyUI's own LoRA format (comfy/lora.py, "generic" naming):
    diffusion_model.<block>.attn1.to_q.lora_up.weight     (out, r)
    diffusion_model.<block>.attn1.to_q.lora_down.weight   (r, in)
    diffusion_model.<block>.attn1.to_q.alpha              scalar
so core's LoraLoaderModelOnly applies the query part of such an adapter as it is (the temporal attention
keys it does not know are left out). Applying goes through ComfyUI's own LoRA loading (comfy.lora.load_lora),
so the tuned model, a reloaded adapter and a LoRA loader give the same weights.
"""
from __future__ import annotations

import torch

UP, DOWN, ALPHA = ".lora_up.weight", ".lora_down.weight", ".alpha"
MAX_QUERY_RANK = 1024


class LowRankDelta(torch.nn.Module):
    """A weight wrapper (ModelPatcher.add_weight_wrapper): W -> W + up @ down * scale, in fp32 (never
    autocast: the factors are fp32 master weights), back in W's dtype."""

    def __init__(self, down: torch.nn.Parameter, up: torch.nn.Parameter, scale: float):
        super().__init__()
        self.down, self.up, self.scale = down, up, scale

    def forward(self, weight):
        with torch.autocast(weight.device.type, enabled=False):
            delta = (self.up @ self.down) * self.scale
            return (weight.detach().to(delta.dtype) + delta).to(weight.dtype)

    def move_to(self, device):
        self.to(device=device)
        return sum(p.nelement() * p.element_size() for p in (self.down, self.up))


def new_factors(shape, rank: int, generator: torch.Generator, device) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """(down, up) fp32 Parameters for a weight of `shape` (out, in): down ~ U(+-1/sqrt(in)) (PyTorch's Linear
    default), up = 0."""
    out_features, in_features = shape
    bound = in_features ** -0.5
    down = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
    return (torch.nn.Parameter(down.to(device)),
            torch.nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=device)))


def module_key(weight_key: str) -> str:
    """`diffusion_model.<block>.attn1.to_q.weight` -> `diffusion_model.<block>.attn1.to_q` (the LoRA name)."""
    return weight_key[:-len(".weight")]


def factor_tensors(factors: dict) -> dict[str, torch.Tensor]:
    """{weight key: (down, up)} -> file keys (ComfyUI's LoRA naming) -> fp32 CPU tensors, alpha = rank."""
    out = {}
    for weight_key, (down, up) in factors.items():
        name = module_key(weight_key)
        out[name + DOWN] = down.detach().float().cpu()
        out[name + UP] = up.detach().float().cpu()
        out[name + ALPHA] = torch.tensor(float(down.shape[0]))
    return out


def is_lora_key(key: str) -> bool:
    return key.endswith((UP, DOWN, ALPHA))


def modules(lora: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """File-keyed LoRA tensors -> {module name: (down, up, scale)}; ValueError on an incomplete or
    inconsistent set (a damaged file)."""
    names = {k[:-len(s)] for k in lora for s in (UP, DOWN, ALPHA) if k.endswith(s)}
    out = {}
    for name in sorted(names):
        down, up = lora.get(name + DOWN), lora.get(name + UP)
        if down is None or up is None or down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"{name}: a low-rank query delta needs {UP[1:]} (out, r) and {DOWN[1:]} (r, in) of "
                             "the same rank; the file is damaged or from another tool.")
        rank = down.shape[0]
        alpha = float(lora[name + ALPHA]) if name + ALPHA in lora else float(rank)
        out[name] = (down.float(), up.float(), alpha / rank)
    return out


def dense(lora: dict) -> dict[str, torch.Tensor]:
    """{weight key: up @ down * scale} (fp32): the full deltas the factors stand for."""
    return {name + ".weight": (up @ down) * scale for name, (down, up, scale) in modules(lora).items()}


def stack_lora(below: dict, above: dict) -> dict:
    """One LoRA set equal to applying `below` then `above`: a module in both gets the factors side by side
    (rank r1 + r2, alpha = rank, each up scaled by its own alpha / rank) -- exact, still low-rank."""
    a, b = modules(below), modules(above)
    merged = dict(below)
    for name, (down, up, scale) in b.items():
        if name not in a:
            merged.update({k: v for k, v in above.items() if k.startswith(name + ".")})
            continue
        down0, up0, scale0 = a[name]
        down_cat, up_cat = torch.cat([down0, down]), torch.cat([up0 * scale0, up * scale], dim=1)
        merged.update({name + DOWN: down_cat, name + UP: up_cat, name + ALPHA: torch.tensor(float(down_cat.shape[0]))})
    return merged


def fold_into(deltas: dict, lora: dict) -> dict:
    """Fold the low-rank deltas of layers that also have a full delta into it (`deltas`, by weight key, is
    updated); returns the rest of `lora`. A file then never holds both kinds for one layer (ComfyUI's LoRA
    loader would keep only one)."""
    for name, (down, up, scale) in modules(lora).items():
        if name + ".weight" in deltas:
            deltas[name + ".weight"] = deltas[name + ".weight"] + (up @ down) * scale
            lora = {k: v for k, v in lora.items() if not k.startswith(name + ".")}
    return lora


def add_lora_patches(model, lora: dict, name: str):
    """Add file-keyed LoRA tensors to `model` (a ModelPatcher) as weight patches made by ComfyUI's own LoRA
    loading (what LoraLoaderModelOnly does); ValueError naming the file if a layer is missing."""
    import comfy.lora

    if not lora:
        return
    patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    missing = sorted({m + ".weight" for m in modules(lora)} - set(model.add_patches(patches, 1.0)))
    if missing:
        raise ValueError(f"{name}: {len(missing)} low-rank query deltas found no weight in this model "
                         f"(e.g. {missing[0]}).")


def check_query_rank(query_rank, node: str):
    if isinstance(query_rank, bool) or not isinstance(query_rank, int) or not 0 <= query_rank <= MAX_QUERY_RANK:
        raise ValueError(f"{node}: query_rank must be a whole number from 0 (full query deltas, the paper) to "
                         f"{MAX_QUERY_RANK}, got {query_rank!r}. Try 16 for SDXL.")

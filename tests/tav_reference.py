"""An independent Tune-A-Video reference, written from the paper and diffusers' public API (not from this
pack's code): diffusers' UNet2DConditionModel converted by diffusers itself from a ComfyUI checkpoint,
inflated as the paper describes (sparse-causal attention processors on attn1, temporal attention after
every transformer block, GroupNorms of resnets and the output over the whole clip, as the official
3D UNet computes them on 5-D tensors), diffusers' DDIMScheduler configured as the official code, and
the official DDIM inversion / guided sampling / tuning loss as equations.

Shapes: a clip of f frames travels as a batch of b*f images, frames contiguous per clip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

VAE_SCALE = 0.18215  # the official code's latent scaling (SD1.x)


def official_scheduler() -> DDIMScheduler:
    """The official configs' scheduler: SD1.4's DDIM config."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def diffusers_unet(ldm_unet_state: dict, unet_config: dict, share: bool = False) -> UNet2DConditionModel:
    """diffusers' UNet from an LDM-named UNet state dict (ComfyUI's diffusion_model keys), converted by diffusers.
    share=True: the UNet's parameters ARE the given fp32 tensors where the conversion keeps them (no copy: full-size
    UNets twice in memory are too big for CI); replace, never modify in place, a parameter to change it."""
    depth = unet_config["transformer_depth"]
    per_level = unet_config["num_res_blocks"][0]
    if len(depth) == per_level * len(unet_config["channel_mult"]):  # ComfyUI's detected configs: per res block
        depth = depth[::per_level]
    params = {
        "in_channels": unet_config["in_channels"], "out_channels": unet_config["out_channels"],
        "model_channels": unet_config["model_channels"], "channel_mult": unet_config["channel_mult"],
        "num_res_blocks": unet_config["num_res_blocks"][0],
        "attention_resolutions": [2 ** i for i, d in enumerate(depth) if d > 0],
        "transformer_depth": max(depth), "context_dim": unet_config["context_dim"],
        "use_linear_in_transformer": unet_config["use_linear_in_transformer"],
    }
    if unet_config.get("num_heads", -1) > 0:
        params["num_heads"] = unet_config["num_heads"]
    else:  # SD2 / SDXL: a fixed head size, heads per level follow the width
        params["num_head_channels"] = unet_config["num_head_channels"]
    if unet_config.get("adm_in_channels"):
        params.update(num_classes="sequential", adm_in_channels=unet_config["adm_in_channels"])
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    checkpoint = {"model.diffusion_model." + k: v.float() for k, v in ldm_unet_state.items()}
    config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    config["transformer_layers_per_block"] = [max(d, 1) for d in depth]
    if share:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), assign=True)
        return unet.eval()
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config))
    return unet.eval()


class SparseCausalAttention:
    """attn1 of the paper: Q from frame i, K and V from [frame 0 ; frame i-1] (frame 0: [0 ; 0])."""

    def __init__(self, frames: int):
        self.frames = frames

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        bf, n, _ = hidden_states.shape
        f, b = self.frames, bf // self.frames
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states).view(b, f, n, -1)
        v = attn.to_v(hidden_states).view(b, f, n, -1)
        previous = [max(i - 1, 0) for i in range(f)]
        k = torch.cat([k[:, [0] * f], k[:, previous]], dim=2).reshape(bf, 2 * n, -1)
        v = torch.cat([v[:, [0] * f], v[:, previous]], dim=2).reshape(bf, 2 * n, -1)
        heads = attn.heads

        def split(t):
            return t.view(bf, t.shape[1], heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        out = out.transpose(1, 2).reshape(bf, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


class TemporalAttention(torch.nn.Module):
    """x + attn_temp(norm_temp(x)) along the frame axis at every token: (b*f, d, c) -> (b*d, f, c)."""

    def __init__(self, dim: int, heads: int, dim_head: int, frames: int):
        super().__init__()
        self.frames = frames
        self.norm_temp = torch.nn.LayerNorm(dim)
        self.attn_temp = Attention(query_dim=dim, heads=heads, dim_head=dim_head)

    def forward(self, x):
        bf, d, c = x.shape
        b, f = bf // self.frames, self.frames
        h = x.view(b, f, d, c).transpose(1, 2).reshape(b * d, f, c)
        h = h + self.attn_temp(self.norm_temp(h))
        return h.view(b, d, f, c).transpose(1, 2).reshape(bf, d, c)


def clip_group_norm(norm: torch.nn.GroupNorm, x, frames: int):
    """A GroupNorm applied to the clip as one 5-D tensor (b, c, f, h, w): statistics over all frames."""
    bf, c, h, w = x.shape
    video = x.view(bf // frames, frames, c, h, w).transpose(1, 2)
    y = F.group_norm(video, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return y.transpose(1, 2).reshape(bf, c, h, w)


def inflate(unet: UNet2DConditionModel, frames: int) -> dict[str, TemporalAttention]:
    """Make `unet` Tune-A-Video's video UNet in place. Returns the temporal attention per transformer
    block (diffusers path of the block -> module), zero output weight as the official init."""
    temporal = {}
    for name, module in list(unet.named_modules()):
        if isinstance(module, BasicTransformerBlock):
            module.attn1.set_processor(SparseCausalAttention(frames))
            attn = module.attn1
            layer = TemporalAttention(attn.query_dim, attn.heads, attn.inner_dim // attn.heads, frames)
            torch.nn.init.zeros_(layer.attn_temp.to_out[0].weight)
            module.add_module("tav_temporal", layer)
            module.register_forward_hook(lambda mod, args, output: mod.tav_temporal(output))
            temporal[name] = layer
        elif isinstance(module, ResnetBlock2D):
            norms = [module.norm1, module.norm2]
            for norm in norms:
                norm.register_forward_hook(lambda mod, args, output: clip_group_norm(mod, args[0], frames))
    unet.conv_norm_out.register_forward_hook(lambda mod, args, output: clip_group_norm(mod, args[0], frames))
    return temporal


def official_state_dict(unet: UNet2DConditionModel, temporal: dict) -> dict[str, torch.Tensor]:
    """The inflated UNet in the official checkpoint's naming (<block>.attn_temp.*, <block>.norm_temp.*)."""
    out = {k: v.detach().clone() for k, v in unet.state_dict().items() if ".tav_temporal." not in k}
    for block, layer in temporal.items():
        out.update({f"{block}.{k}": v.detach().clone() for k, v in layer.state_dict().items()})
    return out


def eps(unet, latents, t, context, class_labels=None):
    return unet(latents, t, encoder_hidden_states=context, class_labels=class_labels).sample


@torch.no_grad()
def ddim_inversion(unet, scheduler, latents, context, steps):
    """The official ddim_inversion: for each timestep ascending, predict the noise at the NEXT timestep from
    the current latent and step from alpha(t - T/steps) (alphas_cumprod[0] below 0) to alpha(t)."""
    scheduler.set_timesteps(steps)
    stride = scheduler.config.num_train_timesteps // steps
    a = scheduler.alphas_cumprod
    for t in scheduler.timesteps.flip(0):
        e = eps(unet, latents, t, context)
        current = int(t) - stride
        a_t = a[current] if current >= 0 else scheduler.final_alpha_cumprod
        x0 = (latents - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
        latents = a[int(t)] ** 0.5 * x0 + (1 - a[int(t)]) ** 0.5 * e
    return latents


@torch.no_grad()
def guided_sampling(unet, scheduler, latents, context, uncond, steps, guidance):
    """The official pipeline's loop: CFG on [uncond; cond] in one batch, DDIM steps (eta 0)."""
    scheduler.set_timesteps(steps)
    contexts = torch.cat([uncond, context])
    for t in scheduler.timesteps:
        e_uncond, e_cond = eps(unet, torch.cat([latents] * 2), t, contexts).chunk(2)
        latents = scheduler.step(e_uncond + guidance * (e_cond - e_uncond), t, latents).prev_sample
    return latents


def tuning_loss(unet, scheduler, latents, noise, t, context):
    """The official training objective for one draw: MSE of the noise prediction at timestep t."""
    noisy = scheduler.add_noise(latents, noise, torch.tensor([t]))
    return F.mse_loss(eps(unet, noisy, t, context).float(), noise.float(), reduction="mean")

"""The toy world's VAE: SD1.5's VAE layout (ComfyUI's loader needs it) with weights set by hand.

No training. Every residual branch and the mid attention are zeroed (identity), so both halves are a
linear path plus one GroupNorm + SiLU at the end, made exact by two facts: a group holding a signal s,
its negative -s and constant +C / -C "ballast" channels has mean 0 and a variance that hardly depends on
s (C >> s); and SiLU(a) - SiLU(-a) = a, so conv_out reads the pair back linearly.

  encoder: v = (x + 1) / 2 per RGB channel, 2x2 averaging at each downsample (an 8x8 block mean);
           latent (ComfyUI units, after x 0.18215) = 2 * v - 1 per RGB channel, 0 in the 4th.
  decoder: v back from the latent, a 3x3 sharpening on the latent grid, nearest x2 + [1 2 1]/4 blur at
           each upsample (bilinear), then out = GAIN * (v - 1/2) + 1/2, which ComfyUI's clamp to 0..1
           turns into crisp edges at the half-coverage contour of the flat-colour toy objects.

Pure RGB-corner colours on black (the toy world's palette) round-trip at the PSNR the tests measure.
"""
from __future__ import annotations

import math

import torch

SCALE = 0.18215  # ComfyUI's SD1.5 latent scale factor: latent = SCALE * z
DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
            "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
BALLAST = 4.0
GAIN = 4.0      # decoder edge gain (1 = plain bilinear)
SHARPEN = 1.0   # unsharp amount on the latent grid


def encode_reference(images: torch.Tensor) -> torch.Tensor:
    """What the toy VAE's encoder computes, as a pure function: IMAGE [N, H, W, 3] -> latent [N, 4, H/8, W/8]."""
    v = torch.nn.functional.avg_pool2d(images.float().movedim(-1, 1), 8)
    return torch.cat([2 * v - 1, torch.zeros_like(v[:, :1])], 1)


def decode_reference(latents: torch.Tensor, gain: float = GAIN, sharpen: float = SHARPEN) -> torch.Tensor:
    """What the toy VAE's decoder (+ ComfyUI's clamp) computes: latent [N, 4, h, w] -> IMAGE [N, 8h, 8w, 3]."""
    blur = torch.outer(*[torch.tensor([1.0, 2.0, 1.0]) / 4] * 2).expand(3, 1, 3, 3)
    v = (latents[:, :3].float() + 1) / 2
    v = v + sharpen * (v - torch.nn.functional.conv2d(v, blur, padding=1, groups=3))
    for _ in range(3):
        v = torch.nn.functional.interpolate(v, scale_factor=2.0, mode="nearest")
        v = torch.nn.functional.conv2d(v, blur, padding=1, groups=3)
    return (gain * (v - 0.5) + 0.5).clamp(0, 1).movedim(1, -1)


def _shapes() -> dict:
    import comfy.ldm.models.autoencoder as autoencoder

    with torch.device("meta"):
        vae = autoencoder.AutoencoderKL(ddconfig=DDCONFIG, embed_dim=4)
    return {k: tuple(v.shape) for k, v in vae.state_dict().items()}


def _depthwise(sd, key, channels, kernel):
    w = sd[key]
    k = torch.as_tensor(kernel, dtype=torch.float32)
    for c in channels:
        w[c, c, :k.shape[0], :k.shape[1]] = k


def _pair_with_ballast(sd, prefix, signals, group):
    """norm_out + conv_out taps for `signals` channels laid out [s, -s, +C.., -C..] per group."""
    sigma = BALLAST * math.sqrt((group - 2) / group)  # the group's std when s is small next to C
    for c in range(signals):
        sd[f"{prefix}.norm_out.weight"][c * group:c * group + 2] = sigma
    return sigma


def toy_vae_state_dict(gain: float = GAIN, sharpen: float = SHARPEN) -> dict:
    """The VAE's weights (first_stage_model.* keys without the prefix), fp32."""
    sd = {k: torch.zeros(s) for k, s in _shapes().items()}
    rgb = range(3)
    eye = lambda w: w.copy_(torch.eye(w.shape[0], w.shape[1]).view(w.shape))  # noqa: E731
    eye(sd["quant_conv.weight"]), eye(sd["post_quant_conv.weight"])
    box = [[0.25, 0.25], [0.25, 0.25]]  # with ComfyUI's (0, 1, 0, 1) padding: a 2x2 mean, stride 2

    # Encoder: v and a constant 1 at full resolution, block means, then the [v, -v, +C, -C] groups.
    group = 512 // 32
    for c in rgb:
        sd["encoder.conv_in.weight"][c, c, 1, 1] = 0.5
        sd["encoder.conv_in.bias"][c] = 0.5
    sd["encoder.conv_in.bias"][3] = 1.0
    for level, width in enumerate((128, 256, 512)):
        _depthwise(sd, f"encoder.down.{level}.downsample.conv.weight", range(width), box)
    eye(sd["encoder.down.1.block.0.nin_shortcut.weight"])
    w = sd["encoder.down.2.block.0.nin_shortcut.weight"][..., 0, 0]
    half = (group - 2) // 2
    for c in rgb:
        g = c * group
        w[g, c], w[g + 1, c] = 1.0, -1.0
        w[g + 2:g + 2 + half, 3], w[g + 2 + half:g + group, 3] = BALLAST, -BALLAST
    _pair_with_ballast(sd, "encoder", 3, group)
    for c in rgb:  # z = (2 v - 1) / SCALE, read back from SiLU(v) - SiLU(-v) = v
        sd["encoder.conv_out.weight"][c, c * group, 1, 1] = 2 / SCALE
        sd["encoder.conv_out.weight"][c, c * group + 1, 1, 1] = -2 / SCALE
        sd["encoder.conv_out.bias"][c] = -1 / SCALE
    sd["encoder.conv_out.bias"][4:] = -20.0  # log-variance: a deterministic latent

    # Decoder: v = (SCALE z + 1) / 2 with unsharp masking, bilinear x2 three times, then the groups.
    group = 128 // 32
    blur3 = torch.tensor([1.0, 2.0, 1.0]) / 4
    blur = torch.outer(blur3, blur3)
    delta = torch.zeros(3, 3)
    delta[1, 1] = 1.0
    sharp = delta + sharpen * (delta - blur)
    for c in rgb:
        sd["decoder.conv_in.weight"][c, c] = 0.5 * SCALE * sharp
        sd["decoder.conv_in.bias"][c] = 0.5
    for level in (1, 2, 3):
        _depthwise(sd, f"decoder.up.{level}.upsample.conv.weight", rgb, blur)
    eye(sd["decoder.up.1.block.0.nin_shortcut.weight"])
    w = sd["decoder.up.0.block.0.nin_shortcut.weight"][..., 0, 0]
    for c in rgb:
        w[c * group, c], w[c * group + 1, c] = 1.0, -1.0
        sd["decoder.up.0.block.2.conv2.bias"][c * group + 2] = BALLAST  # constant, after all upsampling
        sd["decoder.up.0.block.2.conv2.bias"][c * group + 3] = -BALLAST
    _pair_with_ballast(sd, "decoder", 3, group)
    for c in rgb:  # y = gain * (2 v - 1); ComfyUI maps y to clamp((y + 1) / 2, 0, 1)
        sd["decoder.conv_out.weight"][c, c * group, 1, 1] = 2 * gain
        sd["decoder.conv_out.weight"][c, c * group + 1, 1, 1] = -2 * gain
        sd["decoder.conv_out.bias"][c] = -gain
    return sd

"""Temporal attention (the paper's attn_temp): attention along the frame axis at every pixel.

Added after each transformer block's feed-forward: x + attn_temp(norm_temp(x)) with x rearranged
(b*f, d, c) -> (b*d, f, c); the block's heads and head size, no positional encoding, output
projection weight zero-initialised (see reset_parameters for the bias).

Past the paper (opt-in, TAVConfig.temporal_position_encoding): a sinusoidal encoding of the frame index is
added to norm_temp(x) before attn_temp, as AnimateDiff's motion modules do. The official layer sees no
frame order, so a layer tuned on one clip pulls every frame toward the clip's path as a whole; with the
encoding it can tell frame 3 from frame 5. No parameters: adapters keep the same tensors.

Weights live in a module tree owned by the patch, never in the base model. Its state-dict keys
mirror the UNet's own paths, e.g.
    input_blocks.1.1.transformer_blocks.0.attn_temp.to_q.weight   (to_k, to_v: no bias)
    input_blocks.1.1.transformer_blocks.0.attn_temp.to_out.0.weight / .bias
    input_blocks.1.1.transformer_blocks.0.norm_temp.weight / .bias
so `diffusion_model.<key>` names the block it belongs to (ComfyUI's UNet naming).

The layer owns its projections (ComfyUI `ops` Linear layers) and calls ComfyUI's `optimized_attention`
itself rather than building on core's CrossAttention: that class gains children, state-dict entries and
call arguments across ComfyUI releases (0.40 adds a `comfy_attention` child whose config is saved with
the weights), and adapter files must keep exactly the keys above (docs/comfyui-versions.md).
"""
from __future__ import annotations

import functools

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.ops


TEMPORAL_INITS = ("identity", "tune_a_video")


def frame_position_encoding(positions, channels: int, device=None, dtype=None) -> torch.Tensor:
    """(len(positions), channels): sin(i * w_k) at even channels 2k, cos(i * w_k) at odd ones,
    w_k = 10000^(-2k/channels) ("Attention Is All You Need", section 3.5), for each frame index i.
    Cached: every block of every denoising step asks for the same few tables (do not modify the result)."""
    return _position_table(tuple(positions), channels, torch.device(device) if device else None, dtype)


@functools.lru_cache(maxsize=64)
def _position_table(positions: tuple, channels: int, device, dtype) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor: serves sampling and tuning alike
        position = torch.tensor(positions, dtype=torch.float64)[:, None]
        rate = torch.pow(10000.0, -torch.arange(0, channels, 2, dtype=torch.float64) / channels)
        table = torch.zeros(len(position), channels, dtype=torch.float64)
        table[:, 0::2] = torch.sin(position * rate)
        table[:, 1::2] = torch.cos(position * rate[: channels // 2])
        return table.to(device=device, dtype=dtype)


class OwnedLinear(comfy.ops.manual_cast.Linear):
    """A ComfyUI manual-cast Linear (weight wrappers, offloading and any storage dtype work as in core) whose
    tensors exist from construction and load like torch's: in place, keeping this module's dtype.

    ComfyUI's Linear (0.33 and newer, while dynamic VRAM is on) leaves weight and bias None until a state dict is
    loaded and then takes the loaded tensors as they are; it skips that for subclasses with their own
    state-dict loader. This layer is built and seeded before any weights are loaded, so it brings its own.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if self.weight is None:  # a deferred-allocation Linear that did not step aside for our loader
            self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias and self.bias is None:
            self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))

    def _load_from_state_dict(self, *args, **kwargs):
        return torch.nn.Module._load_from_state_dict(self, *args, **kwargs)


class FrameAxisAttention(torch.nn.Module):
    """attn_temp: multi-head self-attention over its input's second axis (the frames).

    Parameters, named as in the paper's (and diffusers') attention so adapter keys stay fixed:
    to_q, to_k, to_v (no bias) and to_out.0 (weight and bias). The attention itself is ComfyUI's
    optimized_attention, looked up at call time (whatever backend ComfyUI chose) and handed the block's
    transformer_options (attention-override nodes see this layer as they see core's attention).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dtype=None, device=None):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.to_q = OwnedLinear(dim, inner, bias=False, dtype=dtype, device=device)
        self.to_k = OwnedLinear(dim, inner, bias=False, dtype=dtype, device=device)
        self.to_v = OwnedLinear(dim, inner, bias=False, dtype=dtype, device=device)
        self.to_out = torch.nn.Sequential(OwnedLinear(inner, dim, dtype=dtype, device=device))

    def forward(self, x, transformer_options=None):
        """x: (sequences, frames, channels) -> same shape: each sequence's frames attend to each other."""
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        out = comfy_attention.optimized_attention(q, k, v, self.heads, transformer_options=transformer_options or {})
        return self.to_out(out)


class TemporalAttention(torch.nn.Module):
    """norm_temp + attn_temp for one transformer block (manual-cast ops: any storage dtype works)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dtype=None, device=None):
        super().__init__()
        self.norm_temp = comfy.ops.manual_cast.LayerNorm(dim, dtype=dtype, device=device)
        self.attn_temp = FrameAxisAttention(dim, heads, dim_head, dtype=dtype, device=device)
        self.zero_output = False  # unknown until reset_parameters / refresh_identity

    def reset_parameters(self, generator: torch.Generator, init: str = "identity"):
        """Seeded init. q/k/v: PyTorch's default Linear init (uniform, bound 1/sqrt(fan_in)); identity LayerNorm.
        Output projection: "tune_a_video" zeroes its weight and keeps the default Linear init of its bias (the
        official code); "identity" zeroes the bias too, so the untuned layer adds exactly nothing.
        """
        if init not in TEMPORAL_INITS:
            raise ValueError(f"temporal_init must be one of {', '.join(TEMPORAL_INITS)}, got {init!r}")
        with torch.no_grad():
            out = self.attn_temp.to_out[0]
            for lin in (self.attn_temp.to_q, self.attn_temp.to_k, self.attn_temp.to_v, out):
                bound = lin.in_features ** -0.5
                lin.weight.copy_(torch.rand(lin.weight.shape, generator=generator) * 2 * bound - bound)
            out.bias.copy_(torch.rand(out.bias.shape, generator=generator) * 2 * bound - bound)
            out.weight.zero_()
            if init == "identity":
                out.bias.zero_()
            self.norm_temp.weight.fill_(1.0)
            self.norm_temp.bias.zero_()
        self.refresh_identity()

    def refresh_identity(self):
        """Record whether the output projection is exactly zero (then the layer adds nothing). Call after
        writing weights; weights trained in place are only read with gradients on, where nothing is skipped."""
        out = self.attn_temp.to_out[0]
        with torch.inference_mode(False), torch.no_grad():
            self.zero_output = not bool(out.weight.any() or out.bias.any())

    def is_identity(self) -> bool:
        """True while the untuned layer adds exactly zero (no weight wrappers or patches on its output)."""
        out = self.attn_temp.to_out[0]
        patched = len(getattr(out, "weight_function", ())) or len(getattr(out, "bias_function", ()))
        return self.zero_output and not patched

    def forward(self, x, frames: int, transformer_options=None, positions=None):
        """x: (clips * frames, tokens, channels) -> same shape, frames mixed at every token.
        positions: None (the paper's layer), or each frame's index in the whole clip: frame_position_encoding
        of them is added to the normalised input."""
        if not torch.is_grad_enabled() and self.is_identity():
            return x  # exact: x + 0; skipping saves an attention layer per block at inference
        bf, d, c = x.shape
        clips = bf // frames
        h = x.view(clips, frames, d, c).transpose(1, 2).reshape(clips * d, frames, c)
        n = self.norm_temp(h)
        if positions is not None:
            n = n + frame_position_encoding(positions, c, device=n.device, dtype=n.dtype)
        h = h + self.attn_temp(n, transformer_options=transformer_options or {})
        return h.view(clips, d, frames, c).transpose(1, 2).reshape(bf, d, c)


class TemporalAttentionSet(torch.nn.Module):
    """A module tree whose paths mirror the UNet's: one TemporalAttention per transformer block."""

    def __init__(self):
        super().__init__()
        self.block_paths: list[str] = []

    def add(self, block_path: str, module: TemporalAttention):
        parent = self
        *parents, last = block_path.split(".")
        for name in parents:
            if not hasattr(parent, name):
                parent.add_module(name, torch.nn.Module())
            parent = getattr(parent, name)
        parent.add_module(last, module)
        self.block_paths.append(block_path)

    def block(self, block_path: str) -> TemporalAttention:
        return self.get_submodule(block_path)

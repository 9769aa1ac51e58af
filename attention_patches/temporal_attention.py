"""Temporal attention (the paper's attn_temp): attention along the frame axis at every pixel.

Added after each transformer block's feed-forward: x + attn_temp(norm_temp(x)) with x rearranged
(b*f, d, c) -> (b*d, f, c); the block's heads and head size, no positional encoding, output
projection zero-initialised (an untuned model behaves exactly like SC-Attn alone).

Weights live in a module tree owned by the patch, never in the base model. Its state-dict keys
mirror the UNet's own paths, e.g.
    input_blocks.1.1.transformer_blocks.0.attn_temp.to_q.weight   (to_k, to_v: no bias)
    input_blocks.1.1.transformer_blocks.0.attn_temp.to_out.0.weight / .bias
    input_blocks.1.1.transformer_blocks.0.norm_temp.weight / .bias
so `diffusion_model.<key>` names the block it belongs to (ComfyUI's UNet naming).
"""
from __future__ import annotations

import torch

import comfy.ops
from comfy.ldm.modules.attention import CrossAttention


class TemporalAttention(torch.nn.Module):
    """norm_temp + attn_temp for one transformer block (manual-cast ops: any storage dtype works)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dtype=None, device=None):
        super().__init__()
        ops = comfy.ops.manual_cast
        self.norm_temp = ops.LayerNorm(dim, dtype=dtype, device=device)
        self.attn_temp = CrossAttention(query_dim=dim, heads=heads, dim_head=dim_head,
                                        dtype=dtype, device=device, operations=ops)

    def reset_parameters(self, generator: torch.Generator):
        """TAV's init: default Linear init for q/k/v, zero output projection, identity LayerNorm."""
        with torch.no_grad():
            for lin in (self.attn_temp.to_q, self.attn_temp.to_k, self.attn_temp.to_v):
                bound = lin.in_features ** -0.5
                w = torch.rand(lin.weight.shape, generator=generator) * 2 * bound - bound
                lin.weight.copy_(w)
            out = self.attn_temp.to_out[0]
            out.weight.zero_()
            out.bias.zero_()
            self.norm_temp.weight.fill_(1.0)
            self.norm_temp.bias.zero_()

    def is_identity(self) -> bool:
        """True while the output projection is exactly zero (untuned): the layer adds nothing.

        Cached on the parameters' version counters, so in-place updates (an optimizer) are seen.
        """
        out = self.attn_temp.to_out[0]
        if out.weight.is_inference() or out.bias.is_inference():  # no version counter: recheck
            key = None
        else:
            key = (out.weight._version, out.bias._version, out.weight.data_ptr(), out.bias.data_ptr())
        if key is None or getattr(self, "_identity_key", None) != key:
            patched = len(getattr(out, "weight_function", ())) or len(getattr(out, "bias_function", ()))
            self._identity = not patched and not (out.weight.any() or out.bias.any())
            self._identity_key = key
        return self._identity

    def forward(self, x, frames: int, transformer_options=None):
        """x: (chunks * frames, tokens, channels) -> same shape, frames mixed at every token."""
        if not torch.is_grad_enabled() and self.is_identity():
            return x  # exact: x + 0; skipping saves an attention layer per block at inference
        bf, d, c = x.shape
        chunks = bf // frames
        h = x.view(chunks, frames, d, c).transpose(1, 2).reshape(chunks * d, frames, c)
        h = h + self.attn_temp(self.norm_temp(h), transformer_options=transformer_options or {})
        return h.view(chunks, d, frames, c).transpose(1, 2).reshape(bf, d, c)


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

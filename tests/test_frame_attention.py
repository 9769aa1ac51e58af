"""Pure tensor functions of the attention patch vs plainly written references of their formulas."""
import math

import pytest
import torch

import tavlib

fa = tavlib.pack_module("attention_patches.frame_attention")
fn = tavlib.pack_module("attention_patches.frame_norm")
layout_mod = tavlib.pack_module("attention_patches.layout")
ta = tavlib.pack_module("attention_patches.temporal_attention")


def reference_keys(i, frames, mode, radius):
    """The paper's / each method's formula for the frames seen by frame i, by plain index."""
    if mode == "sparse_causal":
        return [0, max(i - 1, 0)]
    if mode == "first_frame":
        return [0]
    if mode == "causal":
        return list(range(i + 1))
    if mode == "full":
        return list(range(frames))
    return sorted({0} | {j for j in range(frames) if abs(j - i) <= radius})


def reference_attention(q, k, v, heads, clips, mode, radius):
    """softmax(q K^T / sqrt(d)) V per chunk, frame and head, with explicit loops, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    frames = q.shape[0] // clips
    d = q.shape[-1] // heads
    out = torch.zeros_like(q)
    for c in range(clips):
        for i in range(frames):
            keys = reference_keys(i, frames, mode, radius)
            K = torch.cat([k[c * frames + j] for j in keys])
            V = torch.cat([v[c * frames + j] for j in keys])
            for h in range(heads):
                s = slice(h * d, (h + 1) * d)
                w = torch.softmax(q[c * frames + i][:, s] @ K[:, s].T / math.sqrt(d), dim=-1)
                out[c * frames + i][:, s] = w @ V[:, s]
    return out


@pytest.mark.parametrize("mode", fa.MODES)
@pytest.mark.parametrize("frames", [1, 2, 5])
@pytest.mark.parametrize("clips", [1, 2])
def test_frame_attention_matches_reference(mode, frames, clips):
    g = torch.Generator().manual_seed(frames * 10 + clips)
    heads, tokens, channels = 2, 6, 8
    q, k, v = (torch.randn(clips * frames, tokens, channels, generator=g) for _ in range(3))
    got = fa.frame_attention(q, k, v, heads, clips, tuple(range(frames)), mode, radius=1)
    want = reference_attention(q, k, v, heads, clips, mode, radius=1)
    assert got.shape == q.shape
    assert (got.double() - want).abs().max().item() <= 1e-5


def test_key_frames_follow_context_window_positions():
    # A context window holding clip frames 0, 8, 9, 10: "previous" and "window" go by real index.
    positions = (0, 8, 9, 10)
    assert fa.key_frames(positions, "sparse_causal") == [[0, 0], [0, 0], [0, 1], [0, 2]]
    assert fa.key_frames(positions, "window", radius=1) == [[0], [0, 1, 2], [0, 1, 2, 3], [0, 2, 3]]
    assert fa.key_frames((5, 3, 4), "causal") == [[1, 2, 0], [1], [1, 2]]


def test_clip_layout_from_transformer_options():
    lay = layout_mod.clip_layout(10, {"cond_or_uncond": [0, 1]})
    assert (lay.clips, lay.frames, lay.positions) == (2, 5, (0, 1, 2, 3, 4))
    window = layout_mod.context_window([3, 4, 5, 6], total_frames=10)  # core's, on any ComfyUI version
    lay = layout_mod.clip_layout(4, {"cond_or_uncond": [1], "context_window": window})
    assert lay.positions == (3, 4, 5, 6)
    with pytest.raises(ValueError, match="does not split into 2 clips"):
        layout_mod.clip_layout(5, {"cond_or_uncond": [0, 1]})


def test_window_positions_from_every_window_machinery():
    window = layout_mod.context_window([3, 4, 5, 6], total_frames=10)
    assert layout_mod.window_positions({"context_window": window}, 4) == (3, 4, 5, 6)
    window.causal_anchor_index = 2  # newer core windows prepend the frame before the window
    assert layout_mod.window_positions({"context_window": window}, 5) == (2, 3, 4, 5, 6)
    ad = {"ad_params": {"full_length": 12, "context_length": 4, "sub_idxs": [8, 9, 10, 11]}}
    assert layout_mod.window_positions(ad, 4) == (8, 9, 10, 11)  # AnimateDiff-Evolved's context options
    assert layout_mod.clip_total_frames(ad, (8, 9, 10, 11)) == 12
    assert layout_mod.window_positions(ad, 12) is None  # a call that is not that window
    assert layout_mod.window_positions({"ad_params": {"sub_idxs": None}}, 4) is None


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="attention_mode must be one of"):
        fa.key_frames((0, 1), "bogus")


def reference_clip_group_norm(x, clips, groups, weight, bias, eps):
    """Statistics over channel group x frames x H x W of each chunk, written out by hand."""
    x = x.double()
    frames = x.shape[0] // clips
    c = x.shape[1]
    out = torch.empty_like(x)
    for ch in range(clips):
        clip = x[ch * frames:(ch + 1) * frames]
        for gi in range(groups):
            s = slice(gi * c // groups, (gi + 1) * c // groups)
            part = clip[:, s]
            mean = part.mean()
            var = ((part - mean) ** 2).mean()
            out[ch * frames:(ch + 1) * frames, s] = (part - mean) / torch.sqrt(var + eps)
    return out * weight.double()[None, :, None, None] + bias.double()[None, :, None, None]


@pytest.mark.parametrize("frames", [1, 2, 5])
@pytest.mark.parametrize("clips", [1, 2])
def test_clip_group_norm_matches_reference(frames, clips):
    g = torch.Generator().manual_seed(frames + 7 * clips)
    x = torch.randn(clips * frames, 8, 4, 4, generator=g) * 3 + torch.arange(clips * frames).view(-1, 1, 1, 1)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    got = fn.clip_group_norm(x, clips, 4, w, b, 1e-5)
    assert (got.double() - reference_clip_group_norm(x, clips, 4, w, b, 1e-5)).abs().max().item() <= 1e-5
    if frames > 1:  # and it is not per-frame GroupNorm
        per_frame = torch.nn.functional.group_norm(x, 4, w, b, 1e-5)
        assert (got - per_frame).abs().max().item() > 1e-2


def reference_temporal(module, x, frames, position=None):
    """x + attn(LayerNorm(x) [+ position]) over the frame axis at each token, with the module's own weights;
    position: a (frames, ch) table added to the normalised input (AnimateDiff-style)."""
    attn, norm = module.attn_temp, module.norm_temp
    heads = attn.heads
    out = x.double().clone()
    clips = x.shape[0] // frames
    for c in range(clips):
        clip = x[c * frames:(c + 1) * frames].double()  # (f, d, ch)
        for t in range(clip.shape[1]):
            seq = clip[:, t]  # (f, ch)
            h = torch.nn.functional.layer_norm(seq, seq.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)
            if position is not None:
                h = h + position.double()
            q, k, v = h @ attn.to_q.weight.double().T, h @ attn.to_k.weight.double().T, h @ attn.to_v.weight.double().T
            d = q.shape[-1] // heads
            o = torch.cat([torch.softmax(q[:, i * d:(i + 1) * d] @ k[:, i * d:(i + 1) * d].T / math.sqrt(d), -1)
                           @ v[:, i * d:(i + 1) * d] for i in range(heads)], dim=-1)
            o = o @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()
            out[c * frames:(c + 1) * frames, t] = seq + o
    return out


@pytest.mark.parametrize("frames,clips", [(1, 1), (2, 2), (5, 1), (5, 2)])
def test_temporal_attention_matches_reference(frames, clips):
    g = torch.Generator().manual_seed(3)
    module = ta.TemporalAttention(16, heads=2, dim_head=8, dtype=torch.float32)
    module.reset_parameters(g)
    x = torch.randn(clips * frames, 6, 16, generator=g)
    assert torch.equal(module(x, frames), x), "zero-initialised output projection must be the identity"
    with torch.enable_grad():  # while training, the zero layer still runs so to_out gets gradients
        module(x, frames).sum().backward()
    assert module.attn_temp.to_out[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        module.refresh_identity()  # weights written in place: the module re-checks its zero output
        got = module(x, frames)
    assert (got.double() - reference_temporal(module, x, frames)).abs().max().item() <= 1e-5
    assert (got - x).abs().max().item() > 1e-3


def diffusers_position_table(frames, channels):
    """diffusers' SinusoidalPositionalEmbedding (its AnimateDiff motion blocks' positional_embeddings="sinusoidal")
    applied to zeros: its table for `frames` positions."""
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding
    return SinusoidalPositionalEmbedding(channels, max_seq_length=32)(torch.zeros(1, frames, channels))[0]


def test_frame_position_encoding_matches_diffusers():
    for frames, channels in [(1, 8), (8, 16), (24, 320)]:
        got = ta.frame_position_encoding(range(frames), channels, dtype=torch.float32)
        assert got.shape == (frames, channels)
        assert (got - diffusers_position_table(frames, channels)).abs().max().item() <= 1e-5
    table = ta.frame_position_encoding(range(8), 16)
    assert len({tuple(row.tolist()) for row in table}) == 8, "every frame index must get its own code"
    # a context window's frames keep their indices in the whole clip
    assert torch.equal(ta.frame_position_encoding((0, 5, 6), 16), table[[0, 5, 6]])
    odd = ta.frame_position_encoding((3,), 5)[0]  # the formula itself, odd width: sin at 0, 2, 4; cos at 1, 3
    want = [math.sin(3), math.cos(3), math.sin(3 * 10000 ** -0.4), math.cos(3 * 10000 ** -0.4), math.sin(3 * 10000 ** -0.8)]
    assert torch.allclose(odd, torch.tensor(want, dtype=odd.dtype), atol=1e-12)


@pytest.mark.parametrize("frames,clips", [(2, 2), (5, 1)])
def test_temporal_attention_with_position_encoding_matches_reference(frames, clips):
    """The opt-in frame-index encoding: added to norm_temp's output only; the untuned layer is still exact identity;
    the tuned layer then tells frames apart, so reversing a clip is no longer just reversing the output."""
    g = torch.Generator().manual_seed(4)
    module = ta.TemporalAttention(16, heads=2, dim_head=8, dtype=torch.float32)
    module.reset_parameters(g)
    x = torch.randn(clips * frames, 6, 16, generator=g)
    assert torch.equal(module(x, frames, positions=range(frames)), x)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        module.refresh_identity()
        got = module(x, frames, positions=range(frames))
        plain = module(x, frames)
    want = reference_temporal(module, x, frames, position=diffusers_position_table(frames, 16))
    assert (got.double() - want).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-3
    flip = lambda t: t.view(clips, frames, 6, 16).flip(1).reshape(clips * frames, 6, 16)
    with torch.no_grad():
        assert torch.allclose(module(flip(x), frames), flip(plain), atol=1e-5), "the paper's layer sees no order"
        assert (module(flip(x), frames, positions=range(frames)) - flip(got)).abs().max().item() > 1e-3


def test_cached_frame_indices_serve_training_after_inference():
    """ComfyUI runs nodes under inference_mode; a later tuning step reuses the cached indices."""
    q, k, v = (torch.randn(3, 4, 8) for _ in range(3))
    with torch.inference_mode():
        fa.frame_attention(q, k, v, 2, 1, (0, 1, 2), "sparse_causal")
    qg = q.clone().requires_grad_()
    fa.frame_attention(qg, k, v, 2, 1, (0, 1, 2), "sparse_causal").sum().backward()
    assert qg.grad is not None and qg.grad.abs().sum() > 0


def test_transformer_options_reach_attention_functions_that_take_them():
    q, k, v = (torch.randn(3, 4, 8) for _ in range(3))
    got = []

    def takes_them(q, k, v, heads, transformer_options=None):
        got.append(transformer_options)
        return q

    def does_not(q, k, v, heads):
        return q

    options = {"cond_or_uncond": [0]}
    fa.frame_attention(q, k, v, 2, 1, (0, 1, 2), "sparse_causal", attention=takes_them, transformer_options=options)
    fa.frame_attention(q, k, v, 2, 1, (0, 1, 2), "sparse_causal", attention=does_not, transformer_options=options)
    assert got and all(o is options for o in got)


@pytest.mark.parametrize("index", [(0,), (0, 0, 0), (0, 0, 1, 2), (2, 3, 5, 5, 5, 1), (4, 3, 2), (1, 2, 3)])
def test_key_frames_are_taken_without_a_gather_exactly_as_an_index(index):
    x = torch.randn(2, 6, 3, 4, requires_grad=True)
    got = fa._take(x, index)
    want = x[:, list(index)]
    assert torch.equal(got, want)
    weights = torch.randn(want.shape)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), x)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), x)
    assert torch.allclose(grad_got, grad_want, atol=1e-6)


def test_cached_frame_groups_hold_no_tensors():
    """Global caches keep plain ints only: no tensor (inference or not, any device) outlives a call."""
    def leaves(value):
        if isinstance(value, tuple):
            for v in value:
                yield from leaves(v)
        else:
            yield value
    for mode in fa.MODES:
        fa.frame_attention(*(torch.randn(5, 4, 8) for _ in range(3)), 2, 1, (0, 2, 3, 4, 7), mode, radius=1)
        groups = fa._groups((0, 2, 3, 4, 7), mode, 1)
        assert groups and all(type(v) is int for v in leaves(groups)), mode


def test_sparse_causal_attends_a_repeated_key_frame_once():
    """Frames 0 and 1 attend to [frame 0, frame 0]: one call over frame 0's keys, the rest over two frames
    (the matches-reference test above checks the result equals attention over the duplicated keys)."""
    calls = []

    def spy(q, k, v, heads, **kwargs):
        calls.append((q.shape, k.shape))
        return torch.nn.functional.scaled_dot_product_attention(
            *(t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        ).transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)

    q, k, v = (torch.randn(2 * 6, 4, 8) for _ in range(3))
    out = fa.frame_attention(q, k, v, 2, 2, tuple(range(6)), "sparse_causal", attention=spy)
    assert sorted(calls) == sorted([(torch.Size([2, 2 * 4, 8]), torch.Size([2, 4, 8])),
                                    (torch.Size([2 * 4, 4, 8]), torch.Size([2 * 4, 2 * 4, 8]))])
    want = reference_attention(q, k, v, 2, 2, "sparse_causal", 1)
    assert (out.double() - want).abs().max().item() <= 1e-5

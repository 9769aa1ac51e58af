"""The attention patch on a real ComfyUI ModelPatcher (tiny UNet from ComfyUI's own classes, fp32)."""
import pytest
import torch

import tavlib
from test_frame_attention import reference_attention, reference_clip_group_norm, reference_keys

up = tavlib.pack_module("attention_patches.unet_patch")
MODES = tavlib.pack_module("attention_patches.frame_attention").MODES
CONDS = [tavlib.context(1), tavlib.context(2)]


@pytest.fixture(scope="module")
def base():
    return tavlib.tiny_model(seed=0)


def patched(model, mode="sparse_causal", temporal=False, norm=False, radius=1):
    return up.apply_tav(model, up.TAVConfig(mode, radius, temporal, norm))


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# --- independent references, installed through ComfyUI's own patch points ------------------

def reference_attn1(mode, radius):
    def attn1(q, k, v, extra_options):
        chunks = len(extra_options["cond_or_uncond"])
        return reference_attention(q, k, v, extra_options["n_heads"], chunks, mode, radius).to(q.dtype)
    return attn1


def reference_model(model, mode, radius, norm):
    """A clone running the reference attention (and, if asked, a hand-written clip GroupNorm)."""
    ref = model.clone()
    unet = ref.model.diffusion_model
    for _, key, _ in up.transformer_blocks(unet):
        ref.set_model_attn1_replace(reference_attn1(mode, radius), *key)
    if norm:
        def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kw):
            chunks = len(transformer_options["cond_or_uncond"])

            def hook(module, args, output):
                return reference_clip_group_norm(args[0], chunks, module.num_groups, module.weight,
                                                 module.bias, module.eps).float()
            norms = [m for n, m in unet.named_modules() if isinstance(m, torch.nn.GroupNorm)
                     and (".in_layers." in n or ".out_layers." in n or n == "out.0")]
            handles = [m.register_forward_hook(hook) for m in norms]
            try:
                return executor(x, timesteps, context, y, control, transformer_options, **kw)
            finally:
                for h in handles:
                    h.remove()
        ref.add_wrapper_with_key("diffusion_model", "reference", wrapper)
    return ref


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("frames", [1, 2, 5])
@pytest.mark.parametrize("batched", [True, False], ids=["cond+uncond batched", "apart"])
def test_every_mode_matches_reference_in_the_model(base, mode, frames, batched):
    x = tavlib.latents(frames)
    got = tavlib.predict(patched(base, mode, radius=1), x, contexts=CONDS, batched=batched)
    want = tavlib.predict(reference_model(base, mode, 1, norm=False), x, contexts=CONDS, batched=batched)
    assert max_diff(got, want) <= 1e-5
    if frames > 1 and mode != "first_frame":
        assert max_diff(got, tavlib.predict(base, x, contexts=CONDS)) > 1e-3  # it is not the image model


@pytest.mark.parametrize("frames", [1, 2, 5])
@pytest.mark.parametrize("batched", [True, False], ids=["cond+uncond batched", "apart"])
def test_frame_shared_norm_matches_reference_in_the_model(base, frames, batched):
    x = tavlib.latents(frames)
    got = tavlib.predict(patched(base, norm=True), x, contexts=CONDS, batched=batched)
    want = tavlib.predict(reference_model(base, "sparse_causal", 1, norm=True), x, contexts=CONDS, batched=batched)
    assert max_diff(got, want) <= 1e-5
    per_frame = tavlib.predict(patched(base, norm=False), x, contexts=CONDS, batched=batched)
    if frames > 1:
        assert max_diff(got, per_frame) > 1e-3
    else:
        assert max_diff(got, per_frame) <= 1e-6


def test_cond_and_uncond_never_share_norm_statistics(base):
    x = tavlib.latents(5)
    model = patched(base, norm=True, temporal=True)
    together = tavlib.predict(model, x, contexts=CONDS, batched=True)
    apart = tavlib.predict(model, x, contexts=CONDS, batched=False)
    assert max_diff(together, apart) <= 1e-5


def expected_dependents(mode, k, frames, radius):
    return {i for i in range(frames) if k in reference_keys(i, frames, mode, radius)} | {k}


@pytest.mark.parametrize("mode", MODES)
def test_perturbing_a_frame_changes_exactly_the_frames_the_mode_says(base, mode):
    """In one transformer block: frame i's output depends only on the frames it attends to."""
    frames, radius = 5, 1
    model = patched(base, mode, radius=radius)
    path, key, block = next(up.transformer_blocks(model.model.diffusion_model))
    attn1 = model.model_options["transformer_options"]["patches_replace"]["attn1"][key]
    opts = {"patches_replace": {"attn1": {key: attn1}}, "cond_or_uncond": [0],
            "block": key[:2], "block_index": key[2]}
    g = torch.Generator().manual_seed(5)
    x = torch.randn(frames, 16, block.attn1.to_q.in_features, generator=g)
    ctx = torch.randn(frames, 3, tavlib.CONTEXT_DIM, generator=g)
    with torch.no_grad():
        out = block(x, context=ctx, transformer_options=dict(opts))
        for k in range(frames):
            x2 = x.clone()
            x2[k] += torch.randn(x2[k].shape, generator=g)
            out2 = block(x2, context=ctx, transformer_options=dict(opts))
            changed = {i for i in range(frames) if (out2[i] - out[i]).abs().max() > 1e-6}
            assert changed == expected_dependents(mode, k, frames, radius), f"perturbed frame {k}"


def test_zero_initialised_temporal_attention_is_the_sc_only_patch(base):
    x = tavlib.latents(5)
    sc_only = tavlib.predict(patched(base, temporal=False, norm=True), x, contexts=CONDS)
    with_temporal = tavlib.predict(patched(base, temporal=True, norm=True), x, contexts=CONDS)
    assert max_diff(sc_only, with_temporal) == 0.0


def test_official_temporal_init_differs_from_identity_only_by_the_output_bias(base):
    """temporal_init="tune_a_video": the official init (zero to_out weight, default-init bias), so the untuned
    model is not SC-Attn alone; "identity" (the default) is. Same seeded q/k/v either way."""
    x = tavlib.latents(5)
    sc_only = tavlib.predict(patched(base, temporal=False, norm=True), x, contexts=CONDS)
    official = up.apply_tav(base, up.TAVConfig("sparse_causal", 1, True, True, "tune_a_video"))
    identity = up.apply_tav(base, up.TAVConfig("sparse_causal", 1, True, True, "identity"))
    assert max_diff(sc_only, tavlib.predict(official, x, contexts=CONDS)) > 1e-3
    a, b = (up.get_tav_patch(m).temporal_state_dict() for m in (official, identity))
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    assert differ == {k for k in a if k.endswith("attn_temp.to_out.0.bias")}
    bias = next(v for k, v in a.items() if k.endswith("to_out.0.bias"))
    bound = next(v for k, v in a.items() if k.endswith("to_out.0.weight")).shape[1] ** -0.5
    assert bias.abs().max() <= bound and bias.abs().max() > bound / 2 and bias.std() > 0  # U(-1/sqrt(fan_in), ..)
    assert all(not v.any() for k, v in a.items() if k.endswith("to_out.0.weight"))
    with pytest.raises(ValueError, match="temporal_init must be one of identity, tune_a_video"):
        up.apply_tav(base, up.TAVConfig(temporal_init="random"))


def test_trained_temporal_attention_connects_every_frame(base):
    frames = 5
    x = tavlib.latents(frames)
    x2 = x.clone()
    x2[-1] += 1.0
    model = patched(base, temporal=True, norm=False)
    # Without temporal weights, sparse-causal attention: the last frame influences only itself.
    a, b = tavlib.predict(model, x)[0], tavlib.predict(model, x2)[0]
    assert [(b[i] - a[i]).abs().max().item() > 1e-6 for i in range(frames)] == [False] * 4 + [True]

    g = torch.Generator().manual_seed(9)
    weights = {k: (0.1 * torch.randn(v.shape, generator=g) if "to_out" in k else v)
               for k, v in up.get_tav_patch(model).temporal_state_dict().items()}
    tuned = up.apply_tav(model, up.TAVConfig(frame_shared_norm=False), temporal_weights=weights)
    a, b = tavlib.predict(tuned, x)[0], tavlib.predict(tuned, x2)[0]
    assert all((b[i] - a[i]).abs().max().item() > 1e-6 for i in range(frames))
    assert all((p2.abs().sum() == 0) for n, p2 in up.get_tav_patch(model).temporal.named_parameters()
               if "to_out.0" in n), "the original patch's temporal weights must stay untouched"
    with pytest.raises(ValueError, match="do not fit this UNet"):
        up.apply_tav(model, up.TAVConfig(), temporal_weights={"input_blocks.9.norm_temp.weight": torch.ones(3)})


def test_base_model_is_bit_identical_after_patched_clones_run(base):
    x = tavlib.latents(4)
    keys_before = set(base.model.state_dict().keys())
    before = tavlib.predict(base, x, contexts=CONDS)
    for mode in MODES:
        tavlib.predict(patched(base, mode, temporal=True, norm=True), x, contexts=CONDS)
    after = tavlib.predict(base, x, contexts=CONDS)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert set(base.model.state_dict().keys()) == keys_before
    assert "patches_replace" not in base.model_options.get("transformer_options", {})
    leftovers = [n for n, m in base.model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert leftovers == [], f"hooks left on the shared model: {leftovers[:3]}"


def test_weight_patches_before_and_after_the_node_take_effect(base):
    """LoRA-style diffs on the base (before) or on the patched clone (after) reach the clone."""
    unet = base.model.diffusion_model
    path, _, block = next(up.transformer_blocks(unet))
    key = f"diffusion_model.{path}.attn1.to_q.weight"
    delta = 0.5 * torch.randn(block.attn1.to_q.weight.shape, generator=torch.Generator().manual_seed(4))
    x = tavlib.latents(1)  # one frame: the patched model is plain self-attention
    plain = tavlib.predict(base, x)[0]

    lora_base = base.clone()
    lora_base.add_patches({key: ("diff", (delta,))})
    before_node = tavlib.predict(patched(lora_base, temporal=True, norm=True), x)[0]
    assert (before_node - plain).abs().max().item() > 1e-3
    assert (before_node - tavlib.predict(lora_base, x)[0]).abs().max().item() <= 1e-5

    after_node = patched(base, temporal=True, norm=True)
    after_node.add_patches({key: ("diff", (delta,))})
    assert (tavlib.predict(after_node, x)[0] - before_node).abs().max().item() <= 1e-5
    assert torch.equal(tavlib.predict(base, x)[0], plain)


def test_reapplying_switches_mode_and_keeps_temporal_weights(base):
    first = patched(base, "sparse_causal", temporal=True)
    second = patched(first, "full", temporal=True)
    assert up.get_tav_patch(second).temporal is up.get_tav_patch(first).temporal
    assert up.get_tav_patch(second).config.attention_mode == "full"
    assert up.get_tav_patch(first).config.attention_mode == "sparse_causal"
    x = tavlib.latents(3)
    assert max_diff(tavlib.predict(second, x), tavlib.predict(patched(base, "full", temporal=True), x)) <= 1e-6


def test_temporal_state_dict_keys_name_the_unet_blocks(base):
    model = patched(base, temporal=True)
    sd = up.get_tav_patch(model).temporal_state_dict()
    unet_keys = set(base.model.diffusion_model.state_dict().keys())
    blocks = {k.split(".attn_temp.")[0].split(".norm_temp.")[0] for k in sd}
    assert len(blocks) == len(list(up.transformer_blocks(base.model.diffusion_model))) == 7
    for b in blocks:
        assert f"{b}.attn1.to_q.weight" in unet_keys
    suffixes = {"attn_temp.to_q.weight", "attn_temp.to_k.weight", "attn_temp.to_v.weight",
                "attn_temp.to_out.0.weight", "attn_temp.to_out.0.bias", "norm_temp.weight", "norm_temp.bias"}
    assert set(sd) == {f"{b}.{s}" for b in blocks for s in suffixes}


def test_one_frame_is_plain_self_attention(base):
    x = tavlib.latents(1)
    for mode in MODES:
        got = tavlib.predict(patched(base, mode, norm=True, temporal=True), x, contexts=CONDS)
        assert max_diff(got, tavlib.predict(base, x, contexts=CONDS)) <= 1e-5


def test_unsupported_model_family_is_a_clear_error():
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.ops
    import comfy.model_patcher

    dit = mmdit.MMDiT(input_size=None, patch_size=2, in_channels=4, depth=1, num_patches=64,
                      pos_embed_max_size=8, adm_in_channels=None, context_embedder_config=None,
                      dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)

    class DiTModel(torch.nn.Module):  # the shape ComfyUI's BaseModel gives: .diffusion_model
        def __init__(self):
            super().__init__()
            self.diffusion_model = dit

    mp = comfy.model_patcher.ModelPatcher(DiTModel(), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="supports SD1.x, SD2.x and SDXL"):
        up.apply_tav(mp, up.TAVConfig())


def test_invalid_switches_are_clear_errors(base):
    with pytest.raises(ValueError, match="attention_mode"):
        up.apply_tav(base, up.TAVConfig("sideways"))
    with pytest.raises(ValueError, match="window_radius"):
        up.apply_tav(base, up.TAVConfig("window", -1))


def test_patch_built_under_inference_mode_runs_and_trains(base):
    """ComfyUI runs nodes under torch.inference_mode(): the patch must still work and be trainable."""
    with torch.inference_mode():
        model = patched(base, temporal=True, norm=True)
        out = tavlib.predict(model, tavlib.latents(3))[0]
    assert torch.isfinite(out).all()
    temporal = up.get_tav_patch(model).temporal
    assert not any(p.is_inference() for p in temporal.parameters())


@pytest.mark.parametrize("mode", ["sparse_causal", "window"])
def test_sdxl_layout_unet_matches_reference(mode):
    """SDXL's UNet layout (linear transformer projections, 2 blocks per transformer, a `y` input)."""
    sdxl = tavlib.tiny_model(seed=3, sdxl=True)
    blocks = list(up.transformer_blocks(sdxl.model.diffusion_model))
    assert {key[2] for _, key, _ in blocks} == {0, 1}
    x = tavlib.latents(4)
    got = tavlib.predict(patched(sdxl, mode, radius=1), x, contexts=CONDS)
    want = tavlib.predict(reference_model(sdxl, mode, 1, norm=False), x, contexts=CONDS)
    assert max_diff(got, want) <= 1e-5
    assert max_diff(got, tavlib.predict(sdxl, x, contexts=CONDS)) > 1e-3


def test_frame_attention_hands_transformer_options_to_comfys_attention(base):
    """Attention-override nodes put transformer_options["optimized_attention_override"]; newer ComfyUI's
    optimized_attention honours it when it gets the transformer_options, so frame attention passes them."""
    import inspect

    import comfy.ldm.modules.attention as comfy_attention

    if "optimized_attention_override" not in inspect.getsource(comfy_attention):
        pytest.skip("this ComfyUI has no attention overrides")
    seen = []

    def override(func, q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1]))
        return func(q, k, v, *args, **kwargs)

    model = patched(base, "sparse_causal")
    model.model_options["transformer_options"]["optimized_attention_override"] = override
    x = tavlib.latents(3)
    out = tavlib.predict(model, x, contexts=CONDS[:1])
    plain = tavlib.predict(patched(base, "sparse_causal"), x, contexts=CONDS[:1])
    assert any(nk == 2 * nq for nq, nk in seen), "sparse-causal attention (keys of 2 frames) went past the override"
    torch.testing.assert_close(out[0], plain[0], atol=1e-5, rtol=0)

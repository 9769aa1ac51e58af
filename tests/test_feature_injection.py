"""Feature injection (Invert feature_injection, past the paper): what inversion records, what the Sampler uses."""
import pytest
import torch

import tavlib

vs = tavlib.pack_module("sampling.video_sampler")
fi = tavlib.pack_module("attention_patches.feature_injection")
up = tavlib.pack_module("attention_patches.unet_patch")
nodes = tavlib.pack_module("nodes.inversion_nodes")
snodes = tavlib.pack_module("nodes.sampler_nodes")

BLOCK = 2  # tavlib.tiny_model has 4 decoder blocks (2 levels x 2)


def test_store_keeps_frames_at_their_positions_and_replays_them_per_clip():
    store = fi.FeatureStore(4, [3.0, 2.0], "output_blocks.2.0")
    x = torch.randn(4, 3, 5, 5)  # 2 clips of the frames at clip positions 1 and 3
    store.record(0, (1, 3), x)
    assert torch.equal(store.features[0][[1, 3]], x[:2]) and store.features[0][[0, 2]].abs().sum() == 0
    assert torch.equal(store.replay(0, (1, 3), torch.zeros(6, 3, 5, 5)), x[:2].repeat(3, 1, 1, 1))
    assert torch.equal(store.replay(0, (3,), torch.zeros(1, 3, 5, 5)), x[1:2])
    assert store.step({"sigmas": torch.tensor([2.0001])}) == 1
    assert store.step({"sigmas": torch.tensor([2.01])}) is None and store.step({}) is None
    with pytest.raises(ValueError, match="no source features recorded at sampling step 1"):
        store.replay(1, (1, 3), x)
    with pytest.raises(ValueError, match="do not fit this model call"):
        store.replay(0, (1, 3), torch.zeros(2, 3, 4, 4))


@pytest.fixture(scope="module")
def patched():
    model = up.apply_tav(tavlib.tiny_model(), up.TAVConfig())
    return model, [[tavlib.context(100), {}]], [[tavlib.context(101), {}]]


def watched(model, block):
    """A clone that logs (sigma, what the block's transformer gets from its res block) for every model call,
    through the test's own wrapper and hook (the pack's injection hook sits on the res block before it)."""
    import comfy.patcher_extension as pe

    seen = []

    def wrapper(executor, x, t, context, y, control, transformer_options, **kwargs):
        sigma = float(transformer_options["sigmas"].reshape(-1)[0])
        after = executor.class_obj.output_blocks[block][1]
        handle = after.register_forward_pre_hook(lambda m, args: seen.append((sigma, args[0].detach().clone())))
        try:
            return executor(x, t, context, y, control, transformer_options, **kwargs)
        finally:
            handle.remove()

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_watch", wrapper)
    return m, seen


def near(sigma, sigmas):
    return [i for i, s in enumerate(sigmas) if abs(s - sigma) <= 1e-4 * max(1.0, s)]


def test_inversion_records_the_block_output_and_the_sampler_uses_it_for_the_first_steps(patched, one_thread):
    model, source, edit = patched
    latent = {"samples": tavlib.latents(3)}
    m, seen = watched(model, BLOCK)
    with torch.inference_mode():
        (plain,) = nodes.TuneAVideoInvert().invert(m, latent, source, 10, 0)
        seen.clear()
        (inv,) = nodes.TuneAVideoInvert().invert(m, latent, source, 10, 0, "tune_a_video", 1.0, 0.4, BLOCK)
    info = inv[vs.INVERSION_KEY]
    store = info["feature_store"]
    assert "feature_store" not in plain[vs.INVERSION_KEY] and plain[vs.INVERSION_KEY]["feature_injection"] == 0.0
    assert torch.equal(inv["samples"], plain["samples"])  # recording leaves the inversion as it was
    assert (info["feature_injection"], info["injection_block"], store.path) == (0.4, BLOCK, f"output_blocks.{BLOCK}.0")
    assert store.sigmas == info["sigmas"][:4].tolist()  # the noise levels of the sampler's first 4 of 10 steps
    for sigma, x in seen:  # inversion: each level's block output, as the next module saw it
        for i in near(sigma, store.sigmas):
            assert torch.equal(store.features[i], x)
    assert sorted(store.features) == [0, 1, 2, 3]

    seen.clear()
    with torch.inference_mode():
        (out,) = snodes.TuneAVideoSampler().sample(m, edit, source, inv, 0, 10, 5.0, "ddim", "ddim_uniform", 1.0)
    injected = [(near(s, store.sigmas), x) for s, x in seen if near(s, store.sigmas)]
    assert sorted({i[0] for i, _ in injected}) == [0, 1, 2, 3]
    for (i,), x in injected:  # cond and uncond, alone or batched: every clip gets the source's features
        assert torch.equal(x, store.features[i].repeat(x.shape[0] // 3, 1, 1, 1))
    later = [x for s, x in seen if not near(s, store.sigmas)]
    assert later and all(not torch.equal(x[:3], store.features[3]) for x in later)
    with torch.inference_mode():
        (free,) = snodes.TuneAVideoSampler().sample(m, edit, source, plain, 0, 10, 5.0, "ddim", "ddim_uniform", 1.0)
    assert torch.isfinite(out["samples"]).all() and not torch.allclose(out["samples"], free["samples"])
    assert fi.STORE_KEY not in model.model_options.get("transformer_options", {})  # the input model is untouched
    assert fi.STORE_KEY not in m.model_options.get("transformer_options", {})


def test_feature_injection_bad_input(patched, one_thread):
    model, source, edit = patched
    latent = {"samples": tavlib.latents(2)}
    invert = nodes.TuneAVideoInvert().invert
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="feature_injection must be a number from 0.0 to 1.0"):
            invert(model, latent, source, 4, 0, "tune_a_video", 1.0, bad, BLOCK)
    with pytest.raises(ValueError, match="injection_block must be a decoder block from 0 to 3 of this UNet, got 4"):
        invert(model, latent, source, 4, 0, "tune_a_video", 1.0, 0.5, 4)
    with pytest.raises(ValueError, match="feature injection needs a Tune-A-Video model"):
        invert(tavlib.tiny_model(), latent, source, 4, 0, "tune_a_video", 1.0, 0.5, BLOCK)
    with torch.inference_mode():
        (inv,) = invert(model, latent, source, 4, 0, "tune_a_video", 1.0, 0.5, BLOCK)
    with pytest.raises(ValueError, match="Sampler: feature injection needs a Tune-A-Video model"):
        snodes.TuneAVideoSampler().sample(tavlib.tiny_model(), edit, source, inv, 0, 4, 5.0, "ddim",
                                          "ddim_uniform", 1.0)

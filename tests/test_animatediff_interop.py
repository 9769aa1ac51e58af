"""Interop with the real AnimateDiff-Evolved 1.5.7 (../shared/runtimes), imported in-process as ComfyUI
imports a custom node: its context options and Tune-A-Video Apply Attention -> Long Clip, in either
order, sample a 12-frame clip in chunks of 4, and the pack sees each window's real frame indices."""
import importlib.util
import sys
import tarfile

import pytest
import torch

import comfy.patcher_extension
import comfy.sample

import comfy_runtime
import tavlib

TARBALL = comfy_runtime.SHARED_RUNTIMES / "ComfyUI-AnimateDiff-Evolved-1.5.7.tar.gz"
if not TARBALL.is_file():
    pytest.skip(f"AnimateDiff-Evolved is not here ({TARBALL})", allow_module_level=True)

up = tavlib.pack_module("attention_patches.unet_patch")
lc = tavlib.pack_module("sampling.long_clip")
layout = tavlib.pack_module("attention_patches.layout")

FRAMES, CHUNK, OVERLAP = 12, 4, 1
CONTEXT_LENGTH, CONTEXT_OVERLAP = 8, 4  # AnimateDiff-Evolved windows: frames 0-7 and 4-11


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    """AnimateDiff-Evolved's node classes, its tarball unpacked into a custom_nodes folder."""
    custom_nodes = tmp_path_factory.mktemp("custom_nodes")
    with tarfile.open(TARBALL) as tf:
        tf.extractall(custom_nodes, filter="data")
    (folder,) = custom_nodes.iterdir()
    spec = importlib.util.spec_from_file_location(
        "ComfyUI-AnimateDiff-Evolved", folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.NODE_CLASS_MAPPINGS


def with_ad_context(ade, model):
    options = ade["ADE_StandardStaticContextOptions"]().create_options(CONTEXT_LENGTH, CONTEXT_OVERLAP)[0]
    return ade["ADE_UseEvolvedSampling"]().use_evolved_sampling(model, "autoselect", context_options=options)[0]


def spy(model):
    """A clone recording, per UNet call, the real frame indices the pack reads (attention_patches.layout)."""
    calls = []

    def wrapper(executor, x, *args, **kwargs):
        options = args[4] if len(args) > 4 else kwargs["transformer_options"]
        calls.append(layout.clip_layout(x.shape[0], options).positions)
        return executor(x, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_spy", wrapper)
    return m, calls


def sample(model, steps=2):
    latent = torch.zeros(FRAMES, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    positive = [[tavlib.context(100), {}]]
    negative = [[tavlib.context(101), {}]]
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=0)


@pytest.mark.parametrize("order", ["long_clip_then_context_options", "context_options_then_long_clip"])
def test_long_clip_with_animatediff_context_options_in_either_order(ade, order, one_thread):
    model = up.apply_tav(tavlib.tiny_model(), up.TAVConfig())
    if order == "long_clip_then_context_options":
        model = with_ad_context(ade, lc.apply_long_clip(model, CHUNK, OVERLAP))
    else:
        model = lc.apply_long_clip(with_ad_context(ade, model), CHUNK, OVERLAP)
    model, calls = spy(model)
    out = sample(model)
    assert out.shape == (FRAMES, 4, 8, 8) and torch.isfinite(out).all()
    # Per step: AD's window 0-7 in chunks (frame 0 leads), then window 4-11, whose "first" frame is 4.
    per_step = [(0, 1, 2, 3), (0, 3, 4, 5, 6, 7), (4, 5, 6, 7), (4, 7, 8, 9, 10, 11)]
    assert calls == per_step * 2


def test_animatediff_windows_alone_give_real_frame_indices(ade, one_thread):
    model, calls = spy(with_ad_context(ade, up.apply_tav(tavlib.tiny_model(), up.TAVConfig())))
    sample(model, steps=1)
    assert calls == [tuple(range(0, 8)), tuple(range(4, 12))]

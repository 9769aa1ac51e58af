"""A full-size SD2.1-768-v checkpoint (v-prediction, OpenCLIP-H; seeded random weights written by
scripts/models/full_size.py in ComfyUI's own checkpoint format) through the real server and against the
independent reference. SD1.5 and SDXL at full size: scripts/benchmarks/real_size_check.py (not in CI: SDXL
needs ~20 GB of memory). 2 frames of 64^2, one tuning and one sampling step."""
import gc

import pytest
import torch

import comfy_runtime
import make_sample_clip
import real_size_check as rsc
from full_size import full_checkpoint

FRAMES = 2


@pytest.fixture(scope="module")
def sd21v():
    return full_checkpoint("sd21v")


@pytest.fixture(scope="module")
def real_server(tmp_path_factory, sd21v, random_checkpoint):
    base = tmp_path_factory.mktemp("real_size")
    srv = comfy_runtime.ComfyServer(base, checkpoints=[sd21v, random_checkpoint])
    srv.start()
    srv.video = srv.upload(make_sample_clip.make_sample_clip(base / "clip.mp4", seconds=1, fps=16, size=128))
    try:
        yield srv
    finally:
        srv.stop()


def test_unet_matches_the_reference_on_the_real_layout(sd21v):
    """The patched full SD2.1-v UNet (sparse-causal frame attention, temporal attention and the clip-wide
    GroupNorm in all 16 transformer blocks and every res block) against tests/tav_reference.py's diffusers
    UNet converted by diffusers from the same checkpoint, with the same moved queries and temporal attention
    (imported as an official Tune-A-Video UNet). v-prediction: the raw UNet outputs (velocities) compared."""
    import comfy.model_management
    import comfy.sd
    import tav_reference as ref
    import tavlib

    ad = tavlib.pack_module("sampling.adapters")
    adl = tavlib.pack_module("sampling.adapter_loading")
    # Runs before the server starts (file order), and shares the checkpoint's fp32 tensors with the reference
    # UNet: one full-size UNet in memory, not two.
    base = comfy.sd.load_checkpoint_guess_config(str(sd21v), output_vae=False, output_clip=False)[0]
    unet = ref.diffusers_unet(base.model.diffusion_model.state_dict(), base.model.model_config.unet_config, share=True)
    temporal = ref.inflate(unet, FRAMES)
    g = torch.Generator().manual_seed(3)
    tuned = {}
    for name, p in list(unet.named_parameters()):  # "tuned": moved queries (new tensors: the base is shared)
        if name.endswith(("attn1.to_q.weight", "attn2.to_q.weight")):
            moved = p.detach() + 0.1 * p.detach().abs().mean() * torch.randn(p.shape, generator=g)
            unet.get_submodule(name[:-len(".weight")]).weight = torch.nn.Parameter(moved, requires_grad=False)
            tuned[name] = moved
    for block, layer in temporal.items():
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        tuned.update({f"{block}.{k}": v.detach().clone() for k, v in layer.state_dict().items()})
    assert len(temporal) == 16
    with torch.inference_mode():
        model = ad.apply_adapter(base, adl.official_to_adapter(base, tuned))

    x_vp = torch.randn(FRAMES, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, 1024, generator=g)
    sampling = model.get_model_object("model_sampling")
    for t in (100, 700):
        sigma = float(sampling.sigmas[t])
        x = x_vp * (1 + sigma ** 2) ** 0.5  # ComfyUI's model space
        denoised = tavlib.predict(model, x, sigma, contexts=[context])[0]
        got = (x / (sigma ** 2 + 1) - denoised) * (sigma ** 2 + 1) ** 0.5 / sigma  # V_PREDICTION, inverted
        with torch.no_grad():
            want = ref.eps(unet, x_vp, t, context.expand(FRAMES, -1, -1))
        err = float((got - want).abs().max() / want.abs().max())
        print(f"real SD2.1-v layout, t={t}: rel {err:.2e}")
        assert err <= 1e-4, (t, err)
    del model, base, unet, temporal
    comfy.model_management.unload_all_models()
    gc.collect()


def test_generated_checkpoint_is_detected_as_sd21_v_prediction(sd21v):
    import comfy.model_base
    import comfy.sd
    import comfy.supported_models

    sd, metadata = comfy.utils.load_torch_file(str(sd21v), return_metadata=True)
    config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.", metadata=metadata)
    assert type(config) is comfy.supported_models.SD20
    assert config.model_type(sd, "model.diffusion_model.") == comfy.model_base.ModelType.V_PREDICTION
    assert sd["cond_stage_model.model.token_embedding.weight"].shape == (49408, 1024)  # OpenCLIP-H text tower
    assert sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model.")) == 865_910_724


def test_tune_and_edit_workflow_and_adapter_reload(real_server, sd21v):
    adapter, tuned, loaded, frames = rsc.tune_edit_and_reload(real_server, sd21v.name, real_server.video, FRAMES,
                                                              64, "sd21v")
    assert frames == FRAMES and tuned.shape == (FRAMES, 4, 8, 8)
    assert torch.isfinite(tuned).all() and tuned.abs().max() > 0
    # Save Adapter -> Load Adapter onto a fresh load of the checkpoint: exactly the tuned model's edit
    assert torch.equal(tuned, loaded), float((tuned - loaded).abs().max())
    meta = rsc_adapter_metadata(real_server, adapter)
    assert meta["model_family"] == "SD20"


def rsc_adapter_metadata(server, adapter):
    import safetensors

    with safetensors.safe_open(str(server.base_dir / "models" / "tune_a_video" / adapter), "pt") as f:
        return f.metadata()


def test_text_to_video_workflow(real_server, sd21v):
    frames = rsc.text_to_video(real_server, sd21v.name, FRAMES, 64)
    assert len(frames) == FRAMES and frames[0].shape == (64, 64, 3)


def test_adapter_of_another_family_is_a_clear_error(real_server, sd21v, random_checkpoint):
    adapter, *_ = rsc.tune_edit_and_reload(real_server, random_checkpoint.name, real_server.video, FRAMES, 64, "sd15")
    assert rsc_adapter_metadata(real_server, adapter)["model_family"] == "SD15"
    error = rsc.wrong_family_error(real_server, sd21v.name, adapter, 64)
    assert "TuneAVideoLoadAdapter" in error and "was tuned on a SD15 model but this model is SD20" in error, error

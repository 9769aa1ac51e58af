"""The pack against an independent Tune-A-Video reference (tests/tav_reference.py: diffusers' own UNet
converted from the same checkpoint, inflated from the paper, diffusers' DDIMScheduler as the official
code), fp32 on the CPU, same weights. The reference weights reach the pack the way a user's would:
as an official Tune-A-Video UNet file read by Load Adapter.  rel = max|pack - ref| / max|ref|."""
import pytest
import safetensors.torch
import torch

import comfy.utils

import tavlib
import tav_reference as ref

ad = tavlib.pack_module("sampling.adapters")
adl = tavlib.pack_module("sampling.adapter_loading")
ost = tavlib.pack_module("sampling.one_shot_tuning")
vs = tavlib.pack_module("sampling.video_sampler")
nodes = tavlib.pack_module("nodes.inversion_nodes")
snodes = tavlib.pack_module("nodes.sampler_nodes")

FRAMES = 4
PROMPT, EMPTY = tavlib.context(100), tavlib.context(0)
CLIP = tavlib.latents(FRAMES) * 4.0  # ordinary latent units (VAE latents / 0.18215 have std ~ 4-5)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def build(tmp_path, sdxl=False):
    """(pack model: checkpoint + official UNet via Load Adapter, reference diffusers UNet, y for SDXL)."""
    with torch.inference_mode():
        base = tavlib.tiny_model(seed=0, sdxl=sdxl, depth=2 if sdxl else 1)  # diffusers: mid depth = last level
    state = {k: v.clone() for k, v in base.model.diffusion_model.state_dict().items()}
    unet = ref.diffusers_unet(state, base.model.model_config.unet_config)
    temporal = ref.inflate(unet, FRAMES)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "tuned" weights: moved queries, a temporal attention that does something
        for name, p in list(unet.named_parameters()):
            if name.endswith(("attn1.to_q.weight", "attn2.to_q.weight")) or ".tav_temporal." in name:
                p.add_(0.1 * p.abs().mean().clamp(min=0.05) * torch.randn(p.shape, generator=g))
    path = tmp_path / "official_unet.safetensors"
    safetensors.torch.save_file(ref.official_state_dict(unet, temporal), str(path))
    with torch.inference_mode():
        model = ad.apply_adapter(base, adl.load_adapter_file(path, base))
    return model, unet, temporal


def pack_eps(model, x_vp, t, context):
    sigma = float(model.get_model_object("model_sampling").sigmas[t])
    x = x_vp * (1 + sigma ** 2) ** 0.5  # ComfyUI's model space: x0 + sigma * eps
    denoised = tavlib.predict(model, x, sigma, contexts=[context])[0]
    return (x - denoised) / sigma


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15_layout", "sdxl_layout"])
def test_unet_output_matches_the_reference(tmp_path, sdxl):
    model, unet, _ = build(tmp_path, sdxl)
    x = torch.randn(FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for t in (20, 500, 980):
        got = pack_eps(model, x, t, PROMPT)
        y = None
        if sdxl:  # tavlib's pooled vector for this context, as the model's class embedding input
            y = PROMPT.mean(1)[:, :1].expand(FRAMES, tavlib.ADM_DIM)
        with torch.no_grad():
            want = ref.eps(unet, x, t, PROMPT.expand(FRAMES, -1, -1), class_labels=y)
        print(f"reference UNet eps rel ({'sdxl' if sdxl else 'sd15'}, t={t}): {rel(got, want):.2e}")
        assert rel(got, want) <= 1e-4, (t, rel(got, want))


def test_one_tuning_step_gradient_matches_the_reference(tmp_path):
    model, unet, temporal = build(tmp_path)
    t = 400
    noise = torch.randn(CLIP.shape, generator=torch.Generator().manual_seed(11))
    grads = {}

    def grab(step, loss, params):
        grads.update({k: p.grad.detach().clone() for k, p in params.items()})
    ost.tune_clip(model, {"samples": CLIP}, [[PROMPT, {}]], steps=1, learning_rate=1e-4, trainable="tune_a_video",
                  precision="fp32", gradient_checkpointing=True, callback=grab, draw=lambda g, n, shape: (t, noise))

    scheduler = ref.official_scheduler()
    trainable = {n: p for n, p in unet.named_parameters()
                 if n.endswith(("attn1.to_q.weight", "attn2.to_q.weight")) or ".tav_temporal.attn_temp." in n}
    unet.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)
    loss = ref.tuning_loss(unet, scheduler, CLIP * ref.VAE_SCALE, noise, t, PROMPT.expand(FRAMES, -1, -1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)  # the official trainer's max_grad_norm

    to_diffusers = {c: d for d, c in comfy.utils.unet_to_diffusers(
        model.model.model_config.unet_config).items()}
    blocks = {c[:-len(".attn1.to_q.weight")]: d[:-len(".attn1.to_q.weight")]
              for c, d in to_diffusers.items() if c.endswith(".attn1.to_q.weight")}
    assert len(grads) == len(trainable) == 7 * 2 + 7 * 5  # 7 blocks: 2 queries; attn_temp q, k, v, out w+b
    largest = max(float(p.grad.abs().max()) for p in trainable.values())
    worst = 0.0
    for key, grad in grads.items():
        if key.startswith("diffusion_model."):
            name = to_diffusers[key[len("diffusion_model."):]]
        else:
            block, rest = key[len("temporal."):].split(".attn_temp.")
            name = f"{blocks[block]}.tav_temporal.attn_temp.{rest}"
        want = trainable[name].grad
        # a tensor whose gradient is structurally ~0 (a per-channel shift before the last GroupNorm with one
        # channel per group) is compared at 1e-2 of the largest gradient's scale
        scale = max(float(want.abs().max()), 1e-2 * largest)
        worst = max(worst, float((grad - want).abs().max()) / scale)
        assert float((grad - want).abs().max()) <= 1e-4 * scale, (key, float((grad - want).abs().max()) / scale)
    print(f"reference tuning gradient: worst rel {worst:.2e} over {len(grads)} tensors")


@pytest.mark.parametrize("steps", [10])
def test_inversion_and_guided_sampling_match_the_official_pipeline(tmp_path, steps):
    model, unet, _ = build(tmp_path)
    scheduler = ref.official_scheduler()
    with torch.inference_mode():
        (inverted,) = nodes.TuneAVideoInvert().invert(model, {"samples": CLIP}, [[EMPTY, {}]], steps, 0, "tune_a_video")
        (out,) = snodes.TuneAVideoSampler().sample(model, [[PROMPT, {}]], [[EMPTY, {}]], inverted, 0, steps, 12.5,
                                                  "ddim", "ddim_uniform", 1.0)
    empty, prompt = EMPTY.expand(FRAMES, -1, -1), PROMPT.expand(FRAMES, -1, -1)
    noise = ref.ddim_inversion(unet, scheduler, CLIP * ref.VAE_SCALE, empty, steps)
    final = ref.guided_sampling(unet, scheduler, noise, prompt, empty, steps, 12.5)

    a_top = scheduler.alphas_cumprod[int(scheduler.timesteps[0])]
    print(f"reference pipeline rel: inverted {rel(inverted['samples'], noise / a_top ** 0.5 / ref.VAE_SCALE):.2e}, "
          f"final x0 {rel(out['samples'], final / ref.VAE_SCALE):.2e}")
    assert rel(inverted["samples"], noise / a_top ** 0.5 / ref.VAE_SCALE) <= 1e-4
    assert rel(out["samples"], final / ref.VAE_SCALE) <= 1e-3, rel(out["samples"], final / ref.VAE_SCALE)


@pytest.mark.parametrize("steps", [10, 30, 50])
def test_tune_a_video_schedule_has_the_official_timesteps_and_endpoints(steps):
    with torch.inference_mode():
        model = tavlib.tiny_model()
    sampling = model.get_model_object("model_sampling")
    sigmas = vs.inversion_schedule(model, steps, "tune_a_video")
    scheduler = ref.official_scheduler()
    scheduler.set_timesteps(steps)
    assert [int(sampling.timestep(s)) for s in sigmas[:-1]] == scheduler.timesteps.tolist()
    a0 = float(scheduler.final_alpha_cumprod)  # set_alpha_to_one False: alphas_cumprod[0]
    assert float(sigmas[-1]) == pytest.approx(((1 - a0) / a0) ** 0.5, rel=1e-4)  # ComfyUI: float64 table
    comfy_steps = vs.inversion_schedule(model, steps, "comfyui")
    assert float(comfy_steps[-1]) == 0.0

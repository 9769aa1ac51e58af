"""One-shot tuning on a tiny UNet (ComfyUI's own classes, CPU, fp32), run the way ComfyUI runs a node:
the model is created and the node is called under torch.inference_mode()."""
import gc
import math
import weakref

import pytest
import torch

import comfy.model_management
import comfy.model_sampling
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

import tavlib

ost = tavlib.pack_module("sampling.one_shot_tuning")
obj = tavlib.pack_module("sampling.tuning_objective")
up = tavlib.pack_module("attention_patches.unet_patch")
nodes = tavlib.pack_module("nodes.tuning_nodes")
tc = tavlib.pack_module("sampling.checkpointing")

FRAMES = 4
PROMPT = tavlib.context(100)
POSITIVE = [[PROMPT, {}]]
CLIP = tavlib.latents(FRAMES)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def base():
    with torch.inference_mode():  # as the executor loads a checkpoint: weights are inference tensors
        return tavlib.tiny_model(seed=0)


def tune(model, steps=2, **kw):
    kw.setdefault("learning_rate", 1e-3)
    kw.setdefault("precision", "fp32")
    with torch.inference_mode():
        return ost.tune_clip(model, {"samples": CLIP}, POSITIVE, steps=steps, **kw)


def snapshot(model):
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def assert_bit_identical(model, snap):
    now = model.model.state_dict()
    assert now.keys() == snap.keys()
    changed = [k for k in snap if not torch.equal(now[k], snap[k])]
    assert changed == []


def assert_no_leftovers(model):
    """Nothing of a training run stays on the shared module tree or in ComfyUI's loaded models."""
    for name, module in model.model.diffusion_model.named_modules():
        assert "forward" not in module.__dict__, name
        assert not module.__dict__.get("weight_function") and not module.__dict__.get("bias_function"), name
    for loaded in comfy.model_management.current_loaded_models:
        assert loaded.model is None or not loaded.model.weight_wrapper_patches, "a training clone is still loaded"
    # no training state on the checkpoint's parameters (their values: assert_bit_identical). Not checked:
    # is_inference(): ComfyUI 0.33 restores unpatched weights as copies when a test runs a model outside
    # inference mode (values bit-identical), which the executor never does.
    params = list(model.model.diffusion_model.parameters())
    assert not any(p.requires_grad or p.grad is not None for p in params if not p.is_inference())


def eval_loss(model, base_model):
    """Noise-prediction MSE on a fixed batch (fixed timesteps and noise), through ComfyUI's model call."""
    ms = base_model.get_model_object("model_sampling")
    x0 = base_model.model.process_latent_in(CLIP)
    g = torch.Generator().manual_seed(123)
    total = 0.0
    timesteps = (50, 250, 500, 750, 950)
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=g)
        sigma = float(ms.sigmas[t])
        x_t = x0 + sigma * noise
        denoised = tavlib.predict(model, x_t, sigma, contexts=[PROMPT])[0]
        total += ((x_t - denoised) / sigma - noise).square().mean().item()
    return total / len(timesteps)


def expected_keys(model, trainable):
    layers, parts = ost.TRAINABLE[trainable]
    blocks = [path for path, _, _ in up.transformer_blocks(model.model.diffusion_model)]
    deltas = {f"diffusion_model.{p}.{layer}.weight" for p in blocks for layer in layers}
    init = up.get_tav_patch(up.apply_tav(model, up.TAVConfig())).temporal_state_dict()
    temporal = {k for k in init if any(f".{part}." in f".{k}" for part in parts)}
    return deltas, temporal


# --- the objective ------------------------------------------------------------------------------

def test_loss_is_noise_prediction_mse_for_eps_and_velocity_mse_for_v():
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    sigma = torch.tensor([2.5])
    eps = comfy.model_sampling.EPS()
    x_t = eps.noise_scaling(sigma, noise, x0)
    assert torch.allclose(x_t, x0 + 2.5 * noise)
    loss = obj.denoising_loss(eps, eps.calculate_denoised(sigma, out, x_t), x0, sigma)
    assert math.isclose(loss.item(), (out - noise).square().mean().item(), rel_tol=1e-5)

    v = comfy.model_sampling.V_PREDICTION()
    v.sigma_data = 1.0
    s = 2.5
    v_target = (noise - s * x0) / math.sqrt(s * s + 1)  # sqrt(a) noise - sqrt(1 - a) x0 in VP units
    loss = obj.denoising_loss(v, v.calculate_denoised(sigma, out, x_t), x0, sigma)
    assert math.isclose(loss.item(), (out - v_target).square().mean().item(), rel_tol=1e-5)


def test_one_timestep_for_all_frames_noise_per_frame_seeded():
    t1, n1 = obj.draw_step(torch.Generator().manual_seed(3), 1000, (FRAMES, 4, 8, 8))
    t2, n2 = obj.draw_step(torch.Generator().manual_seed(3), 1000, (FRAMES, 4, 8, 8))
    assert isinstance(t1, int) and 0 <= t1 < 1000 and t1 == t2 and torch.equal(n1, n2)
    assert not torch.equal(n1[0], n1[1])  # independent noise per frame


# --- tuning on the model ------------------------------------------------------------------------

def test_loss_falls_and_base_stays_bit_identical(base):
    snap = snapshot(base)
    base_out = tavlib.predict(base, tavlib.latents(FRAMES, seed=9), 2.0)[0]
    before = eval_loss(up.apply_tav(base, up.TAVConfig()), base)
    tuned, adapter, losses = tune(base, steps=60, learning_rate=1e-2, gradient_checkpointing=True)
    assert_bit_identical(base, snap)  # training wrote nothing, not even temporarily
    assert_no_leftovers(base)
    after = eval_loss(tuned, base)
    assert after <= 0.7 * before, (before, after)
    assert len(losses) == 60 and all(math.isfinite(v) for v in losses)
    assert torch.equal(tavlib.predict(base, tavlib.latents(FRAMES, seed=9), 2.0)[0], base_out)
    assert_bit_identical(base, snap)  # and after the tuned model's patches were loaded and unloaded


@pytest.mark.parametrize("trainable", list(ost.TRAINABLE))
def test_only_declared_trainables_change(base, trainable):
    seen = {}
    tuned, adapter, _ = tune(base, trainable=trainable, callback=lambda s, l, p: seen.update(p))
    deltas, temporal = expected_keys(base, trainable)
    assert {k[len("temporal."):] for k in seen if k.startswith("temporal.")} == temporal
    assert {k for k in seen if k.startswith("diffusion_model.")} == deltas
    assert set(adapter.deltas) == deltas and set(tuned.patches) == deltas
    assert all(d.abs().max() > 0 for d in adapter.deltas.values())
    init = up.get_tav_patch(up.apply_tav(base, up.TAVConfig())).temporal_state_dict()
    assert set(adapter.temporal) == set(init)  # the whole temporal attention: the model rebuilds from the file
    tuned_temporal = up.get_tav_patch(tuned).temporal_state_dict()
    changed = {k for k in init if not torch.equal(tuned_temporal[k].float(), init[k].float())}
    # only trained tensors move (q/k/v of attn_temp get gradients from step 2 on, once to_out is nonzero)
    assert changed <= temporal and (changed != set()) == (temporal != set())
    assert_no_leftovers(base)


@pytest.mark.parametrize("attention", ["comfy_default", "sdpa"])
def test_every_trainable_tensor_gets_a_gradient_with_and_without_checkpointing(base, monkeypatch, attention):
    """sdpa (ComfyUI's choice on GPUs): checkpointing keeps the fused attention outputs, recomputes the rest."""
    calls, kept = [], []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(k) or checkpoint(*a, **k))
    if attention == "sdpa":
        import comfy.ldm.modules.attention as comfy_attention
        monkeypatch.setattr(comfy_attention, "optimized_attention", comfy_attention.attention_pytorch)
        keep = tc._keep_attention

        def policy(ctx, op, *args, **kwargs):  # (decision, query tokens, key tokens or None)
            is_attention = op in tc._ATTENTION_OPS
            kept.append((keep(ctx, op, *args, **kwargs), *((args[0].shape[-2], args[1].shape[-2]) if is_attention
                                                          else (None, None))))
            return kept[-1][0]
        monkeypatch.setattr(tc, "_keep_attention", policy)
    grads = {}
    for checkpointing in (False, True):
        calls.clear()
        def grab(step, loss, params, store=grads.setdefault(checkpointing, {})):
            if step == 1:  # step 0: the zero output projection blocks gradients to q/k/v (as in TAV)
                store.update({k: None if p.grad is None else p.grad.clone() for k, p in params.items()})
        tune(base, trainable="attention+temporal", gradient_checkpointing=checkpointing, callback=grab)
        unet = base.model.diffusion_model
        transformers = sum(type(m).__name__ == "SpatialTransformer" for m in unet.modules())
        assert transformers == len(list(up.transformer_blocks(unet)))  # one block each: no nested regions
        res = sum(isinstance(m, ResBlock) for m in unet.modules())
        ups = sum(type(m).__name__ == "Upsample" for m in unet.modules())
        # whole transformers (temporal attention inside), res blocks, upsamplers and the output head, 2 steps;
        # always non-reentrant
        assert len(calls) == (2 * (transformers + res + ups + 1) if checkpointing else 0)
        assert all(not k["use_reentrant"] for k in calls)
        missing = [k for k, g in grads[checkpointing].items() if g is None or not g.abs().max() > 0]
        assert missing == [], f"checkpointing={checkpointing}: no gradient for {missing}"
    deltas, _ = expected_keys(base, "attention+temporal")
    assert deltas <= set(grads[True])
    assert any(k.startswith("diffusion_model.input_blocks") for k in grads[True])  # the down blocks too
    for k in grads[False]:
        assert torch.allclose(grads[True][k], grads[False][k], rtol=1e-4, atol=1e-7), k
    if attention == "comfy_default":
        # control: regions recomputed without the TAV hooks of their forward (temporal attention,
        # frame-shared GroupNorm; gone after the UNet call) do not reproduce it
        monkeypatch.setattr(up.TAVPatch, "hooks_in", lambda self, module: [])
        with pytest.raises(torch.utils.checkpoint.CheckpointError):
            tune(base, trainable="attention+temporal", gradient_checkpointing=True)
        assert_no_leftovers(base)
    if attention == "sdpa" and tc._SELECTIVE is not None:
        # kept: frame attention only (queries: g frames' 8x8 or 4x4 tokens, e.g. frames 0 and 1 share frame
        # 0's keys; keys: 1 or 2 frames' tokens); recomputed: temporal attention (FRAMES keys), cross-attention
        # (the prompt's tokens), everything else
        must_save = torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
        frame = {(g * n, m * n) for n in (64, 16) for g in range(1, FRAMES + 1) for m in (1, 2)}
        saved = {(q, k) for decision, q, k in kept if decision == must_save}
        assert saved and saved <= frame, saved
        recomputed = {(q, k) for decision, q, k in kept if decision != must_save and q is not None}
        assert (FRAMES, FRAMES) in recomputed and {k for _, k in recomputed} & {PROMPT.shape[1]}
        assert not recomputed & frame


def test_same_seed_same_result(base):
    _, a, la = tune(base, steps=3, seed=5)
    _, b, lb = tune(base, steps=3, seed=5)
    _, c, _ = tune(base, steps=3, seed=6)
    assert la == lb
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    assert any(not torch.equal(a.tensors()[k], c.tensors()[k]) for k in a.tensors())


def test_training_tensors_are_released(base):
    refs = []
    tune(base, callback=lambda s, l, p: refs.extend(weakref.ref(t) for t in p.values()) if s == 0 else None)
    gc.collect()
    assert refs and [r for r in refs if r() is not None] == []


def test_cancel_leaves_base_intact_and_the_next_run_works(base):
    snap = snapshot(base)

    def cancel(step, loss, params):
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        tune(base, steps=10, callback=cancel)
    assert not comfy.model_management.processing_interrupted()
    assert_bit_identical(base, snap)
    assert_no_leftovers(base)
    tuned, adapter, losses = tune(base, steps=2)
    assert len(losses) == 2 and adapter.deltas


def test_a_load_failing_half_way_leaves_nothing_applied(base, monkeypatch):
    """ComfyUI detaches a patcher whose load fails, which restores the weight aliases."""
    import comfy.model_patcher

    def failing_load(self, *args, **kwargs):
        raise RuntimeError("load failed")
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "load", failing_load)
    with pytest.raises(RuntimeError, match="load failed"):
        tune(base)
    monkeypatch.undo()
    assert_no_leftovers(base)


def test_nan_loss_is_a_clear_error(base):
    broken = base.clone()
    broken.set_model_attn2_output_patch(lambda n, extra: n * float("nan"))
    with pytest.raises(ValueError, match=r"output is nan on the first step, before any training.*adapter"):
        tune(broken)
    assert_no_leftovers(base)

    def poison(step, loss, params):  # a diverged optimizer step
        next(iter(params.values())).data.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"loss became nan at step 2 of 2 \(the tuning diverged\).*learning_rate") as e:
        tune(base, callback=poison)
    assert e.type is ValueError  # ComfyUI shows an exception's module path: no pack class in it
    assert_no_leftovers(base)


def test_out_of_memory_says_what_to_reduce(base):
    def oom(step, loss, params):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.OutOfMemoryError, match=r"Reduce: fewer frames \(now 4\), a lower resolution "
                                                     r"\(now 64x64\), precision bf16 or fp16, gradient_checkpointing on"):
        tune(base, gradient_checkpointing=False, callback=oom)
    assert_no_leftovers(base)


@pytest.mark.parametrize("bad, match", [
    ({"steps": 0}, "steps must be"), ({"learning_rate": -1.0}, "learning_rate must be"),
    ({"trainable": "everything"}, "trainable must be one of"), ({"precision": "fp8"}, "precision must be one of"),
])
def test_bad_arguments_are_clear_errors(base, bad, match):
    with pytest.raises(ValueError, match=match):
        tune(base, **bad)


def test_bad_inputs_are_clear_errors(base):
    with torch.inference_mode():
        with pytest.raises(ValueError, match="NaN or infinite"):
            ost.tune_clip(base, {"samples": CLIP * float("nan")}, POSITIVE, steps=1, precision="fp32")
        with pytest.raises(ValueError, match="latent has 16 channels but this model.s latents have 4"):
            ost.tune_clip(base, {"samples": torch.zeros(FRAMES, 16, 8, 8)}, POSITIVE, steps=1, precision="fp32")
        with pytest.raises(ValueError, match="positive is empty"):
            ost.tune_clip(base, {"samples": CLIP}, [], steps=1, precision="fp32")
        no_temporal = up.apply_tav(base, up.TAVConfig(temporal_attention=False))
        with pytest.raises(ValueError, match="temporal_attention off"):
            ost.tune_clip(no_temporal, {"samples": CLIP}, POSITIVE, steps=1, precision="fp32")
        tuned, adapter, _ = ost.tune_clip(no_temporal, {"samples": CLIP}, POSITIVE, steps=1, precision="fp32",
                                          trainable="queries")
        assert not adapter.temporal and up.get_tav_patch(tuned).temporal is None


def test_tuning_a_patched_model_keeps_its_attention_mode(base):
    patched = up.apply_tav(base, up.TAVConfig("window", 2, True, False))
    tuned, adapter, _ = tune(patched)
    assert up.get_tav_patch(tuned).config == up.TAVConfig("window", 2, True, False)
    assert adapter.metadata["attention_mode"] == "window" and adapter.metadata["frames"] == str(FRAMES)


@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_every_tensor_with_fp32_master_weights(base, precision, checkpointing):
    seen = {}

    def grab(step, loss, params):
        if step == 1:
            seen.update({k: (p.dtype, p.grad is not None and bool(p.grad.abs().max() > 0)) for k, p in params.items()})
    _, adapter, losses = tune(base, precision=precision, gradient_checkpointing=checkpointing, callback=grab)
    assert all(math.isfinite(v) for v in losses)
    assert {dtype for dtype, _ in seen.values()} == {torch.float32}
    assert [k for k, (_, has_grad) in seen.items() if not has_grad] == []
    assert adapter.metadata["precision"] == precision


@pytest.mark.skipif(comfy.model_management.get_torch_device().type != "cuda",
                    reason="needs ComfyUI on a CUDA device (TAV_DEVICE=cuda)")
def test_cuda_bf16_tuning_with_checkpointing():
    model = tavlib.tiny_model(seed=0)
    _, adapter, losses = tune(model, steps=3, precision="bf16", gradient_checkpointing=True)
    assert all(math.isfinite(v) for v in losses) and adapter.deltas


def test_tune_node_declares_its_inputs_and_returns_model_and_adapter(base):
    spec = nodes.TuneAVideoTune.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "latent", "positive", "steps", "learning_rate", "seed", "trainable",
                                      "precision", "gradient_checkpointing"]
    assert spec["required"]["steps"][1]["default"] == 500
    assert spec["required"]["learning_rate"][1]["default"] == 3e-5
    assert spec["required"]["trainable"][1]["default"] == "tune_a_video"
    assert spec["required"]["precision"][0] == ["bf16", "fp16", "fp32"]
    assert spec["required"]["gradient_checkpointing"][1]["default"] is True
    assert nodes.TuneAVideoTune.RETURN_TYPES == ("MODEL", "TAV_ADAPTER")
    with torch.inference_mode():
        model, adapter = nodes.TuneAVideoTune().tune(base, {"samples": CLIP}, POSITIVE, 2, 1e-3, 0,
                                                     "queries+temporal", "fp32", True, preview_every=1,
                                                     prompt_text="a man is skiing")
    assert up.get_tav_patch(model) is not None and adapter.metadata["prompt"] == "a man is skiing"

"""The compact setting for big UNets (issue 26): low-rank (LoRA) query deltas (One-Shot Tune query_rank) and a
narrow temporal attention (Apply Attention temporal_width), on a tiny SDXL built from ComfyUI's own SDXL
model class (size conditioning, pooled vector, linear projections, 64-wide heads)."""
import pytest
import safetensors.torch
import torch
import torch.utils.checkpoint

import comfy.lora
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
import folder_paths

import tavlib

ad = tavlib.pack_module("sampling.adapters")
lr = tavlib.pack_module("sampling.low_rank")
up = tavlib.pack_module("attention_patches.unet_patch")
ost = tavlib.pack_module("sampling.one_shot_tuning")
tnodes = tavlib.pack_module("nodes.tuning_nodes")
anodes = tavlib.pack_module("nodes.apply_attention")
inodes = tavlib.pack_module("nodes.inversion_nodes")
snodes = tavlib.pack_module("nodes.sampler_nodes")
lnodes = tavlib.pack_module("nodes.long_clip_nodes")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest
FRAMES, POOLED, RANK, WIDTH = 4, 16, 4, 64
CLIP = tavlib.latents(FRAMES)
X = tavlib.latents(FRAMES, seed=9)


def tiny_sdxl(seed=0):
    """ComfyUI's SDXL model class at a tiny size: one level of 2-block transformers 128 wide (2 heads of 64)."""
    config = comfy.supported_models.SDXL({
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 64, "channel_mult": [1, 2],
        "num_res_blocks": [1, 1], "transformer_depth": [0, 2], "transformer_depth_output": [0, 0, 2, 2],
        "transformer_depth_middle": 2, "context_dim": tavlib.CONTEXT_DIM, "num_head_channels": 64,
        "use_linear_in_transformer": True, "adm_in_channels": POOLED + 6 * 256, "num_classes": "sequential",
        "use_temporal_attention": False, "use_spatial_transformer": True, "legacy": False, "dtype": torch.float32})
    model = comfy.model_base.SDXL(config, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            else:
                p.copy_((1.0 if name.endswith("weight") and "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=torch.device("cpu"))


def cond(seed):
    g = torch.Generator().manual_seed(seed)
    return [[tavlib.context(seed), {"pooled_output": torch.randn(1, POOLED, generator=g), "width": 512, "height": 512}]]


SOURCE, EDIT = cond(100), cond(101)


def compact(model, width=WIDTH):
    with torch.inference_mode():
        return anodes.TuneAVideoApplyAttention().apply(model, "sparse_causal", 1, True, False, temporal_width=width)[0]


def tune(model, rank=RANK, steps=8, seed=0):
    with torch.inference_mode():
        return ost.tune_clip(model, {"samples": CLIP}, SOURCE, steps=steps, learning_rate=1e-2, seed=seed,
                             precision="fp32", query_rank=rank)


def out(model, x=X):
    """The model's denoised prediction for the source prompt, through ComfyUI's sampler (1 Euler step)."""
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": SOURCE})
    guider.set_cfg(1.0)
    with torch.inference_mode():
        return guider.sample(torch.zeros_like(x), x, comfy.samplers.sampler_object("euler"),
                             torch.tensor([2.0, 0.0]), seed=0)


@pytest.fixture(scope="module")
def tuned():
    base = tiny_sdxl()
    return base, tune(compact(base))


@pytest.fixture
def adapter_dir(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, tnodes.ADAPTER_FOLDER, ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def test_narrow_temporal_attention_has_the_width_asked_for():
    base = tiny_sdxl()
    full = up.get_tav_patch(compact(base, 0)).temporal_state_dict()
    narrow = up.get_tav_patch(compact(base)).temporal_state_dict()
    assert full.keys() == narrow.keys()  # the same keys: adapters keep their names
    for key, value in narrow.items():
        if key.endswith(("to_q.weight", "to_k.weight", "to_v.weight")):
            assert value.shape == (WIDTH, 128) and full[key].shape == (128, 128)
        elif key.endswith("to_out.0.weight"):
            assert value.shape == (128, WIDTH)
    with pytest.raises(ValueError, match="temporal_width must be 0 .* or a multiple of 64"):
        compact(base, 96)


def test_low_rank_tuning_trains_factors_and_the_model_carries_comfyui_lora_patches(tuned):
    base, (model, adapter, losses) = tuned
    blocks = [p for p, _, _ in up.transformer_blocks(base.model.diffusion_model)]
    modules = {f"diffusion_model.{b}.{a}.to_q" for b in blocks for a in ("attn1", "attn2")}
    assert not adapter.deltas and set(lr.modules(adapter.lora)) == modules
    for name, (down, up_, scale) in lr.modules(adapter.lora).items():
        assert down.shape == (RANK, 128) and up_.shape == (128, RANK) and scale == 1.0
        assert up_.abs().max() > 0  # trained away from its zero start
    assert adapter.metadata["query_rank"] == str(RANK) and adapter.metadata["temporal_width"] == str(WIDTH)
    assert set(model.patches) == {m + ".weight" for m in modules}
    # the patched weight is W + up @ down, computed by ComfyUI's own LoRA code
    key = sorted(modules)[0] + ".weight"
    weight = base.model.state_dict()[key]
    patched = comfy.lora.calculate_weight(model.patches[key], weight.clone(), key)
    assert torch.allclose(patched, weight + lr.dense(adapter.lora)[key], atol=1e-6)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_save_then_load_on_a_fresh_load_gives_the_tuned_output(tuned, adapter_dir):
    base, (model, adapter, _) = tuned
    with torch.inference_mode():
        name = tnodes.TuneAVideoSaveAdapter().save(adapter, "sdxl")["ui"]["text"][0]
    tensors = safetensors.torch.load_file(str(adapter_dir / name))
    assert any(k.endswith(".lora_up.weight") for k in tensors) and not any(k.endswith(".diff") for k in tensors)
    fresh = tiny_sdxl()  # a fresh load of the same checkpoint, unpatched: Load Adapter rebuilds the narrow layer
    with torch.inference_mode():
        loaded, loaded_adapter = tnodes.TuneAVideoLoadAdapter().load(fresh, name)
    assert up.get_tav_patch(loaded).config.temporal_width == WIDTH
    assert torch.equal(out(loaded), out(model))
    assert not torch.equal(out(loaded), out(compact(fresh)))
    # onto a model patched with the full-width layer: the file's width wins (its weights have that shape)
    with torch.inference_mode():
        onto_full, _ = tnodes.TuneAVideoLoadAdapter().load(compact(tiny_sdxl(), 0), name)
    assert torch.equal(out(onto_full), out(model))


def test_comfyui_lora_loader_applies_the_query_part(tuned, tmp_path):
    """core's LoRA loading (LoraLoaderModelOnly's code) reads the file's low-rank keys as they are."""
    base, (model, adapter, _) = tuned
    path = ad.save_adapter(adapter, tmp_path / "a.safetensors")
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)  # as LoraLoaderModelOnly reads it
    temporal_only = ad.TAVAdapter({}, adapter.temporal, adapter.metadata)
    with_temporal = ad.apply_adapter(tiny_sdxl(), temporal_only)
    by_core, _ = comfy.sd.load_lora_for_models(with_temporal, None, lora, 1.0, 0)
    assert torch.allclose(out(by_core), out(model), atol=1e-5)
    assert not torch.allclose(out(with_temporal), out(model), atol=1e-3)


def test_tuning_a_low_rank_tuned_model_stacks_exactly(tuned):
    base, (model, adapter, _) = tuned
    again, stacked, _ = tune(model, steps=3, seed=1)
    _, (down, up_, scale) = next(iter(lr.modules(stacked.lora).items()))
    assert down.shape[0] == 2 * RANK and scale == 1.0  # side by side: rank 2r, still low-rank
    rebuilt = ad.apply_adapter(tiny_sdxl(), stacked)
    assert torch.allclose(out(rebuilt), out(again), atol=1e-5)
    # a full-delta tune on top folds the low-rank deltas into one full delta per layer
    _, mixed, _ = tune(model, rank=0, steps=2, seed=2)
    assert not mixed.lora and set(mixed.deltas) == {m + ".weight" for m in lr.modules(adapter.lora)}


def test_long_clip_and_feature_injection_with_the_compact_setting(tuned):
    _, (model, _, _) = tuned
    latent = {"samples": tavlib.latents(6)}
    with torch.inference_mode():
        (chunked,) = lnodes.TuneAVideoLongClip().patch(model, 4, 2)
        (inv,) = inodes.TuneAVideoInvert().invert(chunked, latent, SOURCE, 6, 0, "tune_a_video", 1.0, 0.5, 2)
        (edit,) = snodes.TuneAVideoSampler().sample(chunked, EDIT, SOURCE, inv, 0, 6, 5.0, "ddim", "ddim_uniform", 1.0)
        (free,) = snodes.TuneAVideoSampler().sample(chunked, EDIT, SOURCE,
                                                    inodes.TuneAVideoInvert().invert(chunked, latent, SOURCE, 6, 0)[0],
                                                    0, 6, 5.0, "ddim", "ddim_uniform", 1.0)
    assert edit["samples"].shape == (6, 4, 8, 8) and torch.isfinite(edit["samples"]).all()
    assert not torch.allclose(edit["samples"], free["samples"])  # the injected source features changed the edit


def test_bad_inputs_name_the_input():
    base = tiny_sdxl()
    with pytest.raises(ValueError, match="query_rank must be a whole number from 0"):
        tune(compact(base), rank=-1)
    with pytest.raises(ValueError, match="Apply Attention: temporal_width must be 0"):
        compact(base, 100)
    bad = ad.TAVAdapter({}, {}, {"temporal_width": "96"}, {})
    with pytest.raises(ValueError, match="metadata temporal_width is '96'"):
        ad.parse_adapter({"diffusion_model.x.attn1.to_q.lora_up.weight": torch.zeros(2, 1)}, bad.metadata, "f")
    with pytest.raises(ValueError, match="needs lora_up.weight"):
        ad.parse_adapter({"diffusion_model.x.attn1.to_q.lora_up.weight": torch.zeros(2, 1)}, {}, "f")


def test_recompute_all_recomputes_everything_and_tunes_the_same(monkeypatch):
    """Tune recompute_all: checkpointing without the selective policy (nothing kept), the same tuning."""
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: calls.append("context_fn" in k) or checkpoint(*a, **k))
    base = compact(tiny_sdxl())
    with torch.inference_mode():
        kept = ost.tune_clip(base, {"samples": CLIP}, SOURCE, steps=3, learning_rate=1e-2, precision="fp32",
                             query_rank=RANK)[1]
        assert calls and all(calls)
        calls.clear()
        _, adapter = tnodes.TuneAVideoTune().tune(base, {"samples": CLIP}, SOURCE, 3, 1e-2, 0, "tune_a_video", "fp32",
                                                     True, 0, "", RANK, True)
    assert calls and not any(calls)
    for key, value in kept.lora.items():
        assert torch.allclose(adapter.lora[key], value, atol=1e-5), key


@pytest.mark.parametrize("attention", ["comfy_default", "sdpa"])
def test_nested_checkpointing_of_multi_block_transformers_tunes_as_without_checkpointing(monkeypatch, attention):
    """SDXL's transformers hold several blocks: each transformer is one checkpointed region with each block
    and its temporal attention checkpointed inside it, and the backward's recomputation of the transformer
    puts those inner regions back. Same tuning as without checkpointing; dropping the inner regions while
    recomputing changes what the backward saves and is caught. sdpa (ComfyUI's choice on GPUs): the selective
    policy keeps the frame-attention outputs inside the nested regions too."""
    tc = tavlib.pack_module("sampling.checkpointing")
    if attention == "sdpa":
        import comfy.ldm.modules.attention as comfy_attention
        monkeypatch.setattr(comfy_attention, "optimized_attention", comfy_attention.attention_pytorch)
        keep, kept = tc._keep_attention, []
        monkeypatch.setattr(tc, "_keep_attention", lambda *a, **k: kept.append(keep(*a, **k)) or kept[-1])
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    base = compact(tiny_sdxl())
    unet = base.model.diffusion_model
    transformers = [m for m in unet.modules() if type(m).__name__ == "SpatialTransformer"]
    blocks = sum(len(m.transformer_blocks) for m in transformers)
    assert transformers and blocks == 2 * len(transformers)
    res = sum(type(m).__name__ in ("ResBlock", "Upsample") for m in unet.modules()) + 1  # + the output head

    def run(checkpointing, steps=3):
        with torch.inference_mode():
            return ost.tune_clip(base, {"samples": CLIP}, SOURCE, steps=steps, learning_rate=1e-2, precision="fp32",
                                 query_rank=RANK, gradient_checkpointing=checkpointing)[1]

    plain = run(False)
    assert calls == []
    nested = run(True)
    # per model call: each transformer, each of its blocks and their temporal attention, each res block,
    # upsampler and the output head;
    # recomputing a transformer in the backward runs its inner regions again
    per_call = len(transformers) + 2 * blocks + res
    assert len(calls) == 3 * (per_call + 2 * blocks)
    for key, value in plain.lora.items():
        assert torch.allclose(nested.lora[key], value, atol=1e-5), key
    for key, value in plain.temporal.items():
        assert torch.allclose(nested.temporal[key], value, atol=1e-5), key
    if attention == "sdpa" and tc._SELECTIVE is not None:
        assert torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE in kept
    recompute = tc._recompute_as_forward
    monkeypatch.setattr(tc, "_recompute_as_forward",
                        lambda patch, hooks, nested, forward, *a, **k: recompute(patch, hooks, [], forward, *a, **k))
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        run(True, steps=1)

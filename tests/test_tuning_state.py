"""Tuning and imports start from the checkpoint's own weights, whatever other clones of it ran before;
re-tuning continues from a tuned model and its adapter rebuilds it; frozen weights never get gradients."""
import pytest
import torch

import comfy.model_management

import tavlib

ad = tavlib.pack_module("sampling.adapters")
adl = tavlib.pack_module("sampling.adapter_loading")
up = tavlib.pack_module("attention_patches.unet_patch")
ost = tavlib.pack_module("sampling.one_shot_tuning")

FRAMES = 4
PROMPT = tavlib.context(100)
CLIP = tavlib.latents(FRAMES)
X = tavlib.latents(FRAMES, seed=9)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def fresh_base():
    with torch.inference_mode():
        return tavlib.tiny_model(seed=0)


def tune(model, steps=3, **kw):
    kw.setdefault("learning_rate", 1e-2)
    kw.setdefault("precision", "fp32")
    with torch.inference_mode():
        return ost.tune_clip(model, {"samples": CLIP}, [[PROMPT, {}]], steps=steps, **kw)


def out(model):
    return tavlib.predict(model, X, 2.0, contexts=[PROMPT])[0]


def other_branch(base, value=None):
    """Another branch of the graph on the same checkpoint: a LoRA-like diff on every query and conv weight
    (NaN when value is nan), run once so ComfyUI patches the shared weights in place for it."""
    keys = [k for k in base.model.state_dict() if k.endswith(("to_q.weight", "in_layers.2.weight"))]
    g = torch.Generator().manual_seed(7)
    branch = base.clone()
    with torch.inference_mode():
        diffs = {}
        for k in keys:
            shape = base.model.state_dict()[k].shape
            diffs[k] = torch.full(shape, value) if value is not None else 0.3 * torch.randn(shape, generator=g)
        branch.add_patches({k: ("diff", (d,)) for k, d in diffs.items()})
    out(branch)
    live = base.model.state_dict()
    assert any(not torch.equal(live[k], base.backup[k].weight) for k in keys)  # patched in place right now
    return branch


@pytest.mark.parametrize("branch_value", [None, float("nan")], ids=["lora_branch", "nan_adapter_branch"])
def test_tuning_after_another_branch_equals_a_fresh_tune(branch_value):
    fresh_model, fresh_adapter, fresh_losses = tune(fresh_base())
    base = fresh_base()
    other_branch(base, branch_value)
    model, adapter, losses = tune(base)
    assert losses == pytest.approx(fresh_losses, rel=1e-5, abs=0)
    for key, value in fresh_adapter.tensors().items():
        assert torch.allclose(adapter.tensors()[key], value, rtol=0, atol=1e-5 * value.abs().max()), key
    assert torch.allclose(out(model), out(fresh_model), atol=1e-5)


def test_official_import_reads_the_checkpoints_own_weights_while_a_patched_clone_is_loaded(tmp_path):
    import safetensors.torch

    base = fresh_base()
    key = next(k for k in base.model.state_dict() if k.endswith("attn1.to_q.weight"))
    block = key[len("diffusion_model."):-len(".attn1.to_q.weight")]
    to_diffusers = {c: d for d, c in adl.official_block_paths(base).items()}
    official = {f"{to_diffusers[block]}.attn1.to_q.weight": base.model.state_dict()[key].float() + 0.25}
    path = tmp_path / "official.safetensors"
    safetensors.torch.save_file(official, str(path))
    clean = adl.load_adapter_file(path, base).deltas[key]
    other_branch(base)
    patched_meanwhile = adl.load_adapter_file(path, base).deltas[key]
    assert torch.equal(patched_meanwhile, clean) and torch.allclose(clean, torch.full_like(clean, 0.25), atol=1e-6)


def test_retuning_continues_and_its_adapter_rebuilds_the_model(tmp_path):
    base = fresh_base()
    once, first, _ = tune(base)
    twice, second, _ = tune(once)
    assert set(second.deltas) == set(first.deltas)
    assert any(not torch.equal(second.deltas[k], first.deltas[k]) for k in first.deltas)
    path = ad.save_adapter(second, tmp_path / "twice.safetensors")
    rebuilt = ad.apply_adapter(fresh_base(), adl.load_adapter_file(path, fresh_base()))
    assert torch.allclose(out(rebuilt), out(twice), atol=1e-5)
    assert not torch.allclose(out(rebuilt), out(once), atol=1e-3)

    # Load Adapter -> Tune: continues from the loaded adapter too
    loaded = ad.apply_adapter(fresh_base(), adl.load_adapter_file(path, fresh_base()))
    thrice, third, _ = tune(loaded, steps=2)
    rebuilt = ad.apply_adapter(fresh_base(), third)
    assert torch.allclose(out(rebuilt), out(thrice), atol=1e-5)


@pytest.mark.parametrize("inference", [True, False], ids=["inference_mode", "plain_python"])
def test_frozen_weights_get_no_gradient_buffers(inference):
    with torch.inference_mode(inference):
        base = tavlib.tiny_model(seed=0)
    counts = {}

    def count(step, loss, params):
        trainable = {id(p) for p in params.values()}
        loaded = [m.model for m in comfy.model_management.current_loaded_models if m.model is not None]
        with_grad = [p for m in loaded for p in m.model.parameters() if p.grad is not None and id(p) not in trainable]
        counts[step] = (len(with_grad), sum(p.grad is not None for p in params.values()), len(params))

    with torch.inference_mode(inference):
        ost.tune_clip(base, {"samples": CLIP}, [[PROMPT, {}]], steps=2, learning_rate=1e-3, precision="fp32",
                      callback=count)
    assert [c[0] for c in counts.values()] == [0, 0]  # no frozen tensor anywhere holds a .grad
    assert counts[1][1] == counts[1][2]  # every trainable does (from step 2, once to_out is nonzero)
    assert not any(p.grad is not None for p in base.model.parameters())

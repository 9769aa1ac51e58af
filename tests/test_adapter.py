"""Adapters: save/load of tuned weights, official Tune-A-Video (diffusers) import, clear errors."""
import json
import os

import pytest
import safetensors.torch
import torch

import comfy.lora
import comfy.utils
import folder_paths

import tavlib

ad = tavlib.pack_module("sampling.adapters")
adl = tavlib.pack_module("sampling.adapter_loading")
up = tavlib.pack_module("attention_patches.unet_patch")
ost = tavlib.pack_module("sampling.one_shot_tuning")
nodes = tavlib.pack_module("nodes.tuning_nodes")

FRAMES = 4
PROMPT = tavlib.context(100)
CLIP = tavlib.latents(FRAMES)
X = tavlib.latents(FRAMES, seed=9)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def fresh_base(**kw):
    with torch.inference_mode():
        return tavlib.tiny_model(seed=0, **kw)


def tune(model, trainable="queries+temporal", steps=20):
    with torch.inference_mode():
        return ost.tune_clip(model, {"samples": CLIP}, [[PROMPT, {}]], steps=steps, learning_rate=1e-2,
                             precision="fp32", trainable=trainable, prompt_text="a man is skiing")[:2]


@pytest.fixture(scope="module")
def tuned():
    return tune(fresh_base())


@pytest.fixture
def adapter_dir(tmp_path, monkeypatch):
    """models/tune_a_video in a temporary folder (as registered by the nodes module)."""
    monkeypatch.setitem(folder_paths.folder_names_and_paths, nodes.ADAPTER_FOLDER, ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def out(model):
    return tavlib.predict(model, X, 2.0, contexts=[PROMPT])[0]


def save_node(adapter, prefix="clip"):
    with torch.inference_mode():
        return nodes.TuneAVideoSaveAdapter().save(adapter, prefix)


def load_node(model, name):
    with torch.inference_mode():
        return nodes.TuneAVideoLoadAdapter().load(model, name)


def test_adapter_folder_is_registered_for_safetensors_only():
    paths, exts = folder_paths.folder_names_and_paths[nodes.ADAPTER_FOLDER]
    assert os.path.join(folder_paths.models_dir, "tune_a_video") in paths and exts == {".safetensors"}


def test_save_then_load_on_a_fresh_base_gives_the_tuned_output(tuned, adapter_dir):
    model, adapter = tuned
    ui = save_node(adapter, "runs/skiing")["ui"]
    name = ui["adapters"][0]["filename"]
    assert name == "runs/skiing_00001_.safetensors" and ui["text"] == [name]
    assert (adapter_dir / "runs" / "skiing_00001_.safetensors").is_file()
    assert name in nodes.TuneAVideoLoadAdapter.INPUT_TYPES()["required"]["adapter_name"][0]
    assert save_node(adapter, "runs/skiing")["ui"]["text"] == ["runs/skiing_00002_.safetensors"]

    base = fresh_base()
    snap = {k: v.clone() for k, v in base.model.state_dict().items()}
    loaded, loaded_adapter = load_node(base, name)
    assert torch.equal(out(loaded), out(model))
    assert not torch.equal(out(loaded), out(up.apply_tav(base, up.TAVConfig())))
    out(base)  # loads the base again: the loaded adapter's patches are unpatched
    assert all(torch.equal(v, snap[k]) for k, v in base.model.state_dict().items())
    assert loaded_adapter.metadata == {**adapter.metadata, "storage_dtype": "fp32"}


def test_file_holds_trained_deltas_and_temporal_attention_in_fp32_with_metadata(tuned, tmp_path):
    model, adapter = tuned
    path = ad.save_adapter(adapter, tmp_path / "a.safetensors")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()  # readable like any other model file
    tensors = safetensors.torch.load_file(str(path))
    blocks = [p for p, _, _ in up.transformer_blocks(model.model.diffusion_model)]
    queries = {f"diffusion_model.{b}.{a}.to_q.diff" for b in blocks for a in ("attn1", "attn2")}
    temporal = {"diffusion_model." + k for k in up.get_tav_patch(model).temporal_state_dict()}
    assert set(tensors) == queries | temporal
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert all(torch.equal(tensors[k], v) for k, v in adapter.tensors().items())
    with open(path, "rb") as f:
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    assert meta["format"] == "tune_a_video_adapter" and meta["model_family"] == "SD15"
    assert [b[0] for b in json.loads(meta["block_layout"])] == blocks
    for key, value in {"frames": "4", "latent_size": "8x8", "prompt": "a man is skiing", "steps": "20",
                       "learning_rate": "0.01", "attention_mode": "sparse_causal", "trainable": "queries+temporal",
                       "pack_version": ad.PACK_VERSION}.items():
        assert meta[key] == value, key
    assert float(meta["final_loss"]) > 0 and meta["storage_dtype"] == "fp32"
    assert meta["temporal_init"] == "identity"

    half = ad.save_adapter(adapter, tmp_path / "half.safetensors", storage="fp16")
    assert {t.dtype for t in safetensors.torch.load_file(str(half)).values()} == {torch.float16}
    reloaded = adl.load_adapter_file(half, fresh_base())
    assert reloaded.metadata["storage_dtype"] == "fp16"
    assert {t.dtype for t in reloaded.tensors().values()} == {torch.float32}  # fp32 in memory
    assert all(torch.equal(reloaded.tensors()[k], v.half().float()) for k, v in adapter.tensors().items())
    with pytest.raises(ValueError, match="storage must be one of fp32, fp16, bf16"):
        ad.save_adapter(adapter, tmp_path / "b.safetensors", storage="int8")

    _, temporal_only = tune(fresh_base(), trainable="temporal", steps=2)
    assert not any(k.endswith(".diff") for k in temporal_only.tensors())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_comfy_lora_loader_reads_the_query_deltas(tuned, tmp_path):
    model, adapter = tuned
    path = ad.save_adapter(adapter, tmp_path / "a.safetensors")
    base = fresh_base()
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    patches = comfy.lora.load_lora(comfy.utils.load_torch_file(str(path), safe_load=True), key_map, log_missing=False)
    assert set(patches) == set(adapter.deltas)
    assert all(patches[k][0] == "diff" and torch.equal(patches[k][1][0], adapter.deltas[k]) for k in patches)


def test_frame_position_encoding_is_recorded_and_restored(tmp_path):
    """An adapter tuned with the (past-the-paper) frame-index encoding reproduces only with it: the file says so and
    loading it onto a bare checkpoint switches it back on; files without the key load as the paper's layer."""
    with torch.inference_mode():
        encoded = up.apply_tav(fresh_base(), up.TAVConfig(temporal_position_encoding=True))
    model, adapter = tune(encoded, steps=5)
    assert adapter.metadata["temporal_position_encoding"] == "True"
    path = ad.save_adapter(adapter, tmp_path / "pe.safetensors")
    with torch.inference_mode():
        loaded = ad.apply_adapter(fresh_base(), adl.load_adapter_file(path, fresh_base()))
    assert up.get_tav_patch(loaded).config.temporal_position_encoding
    assert torch.equal(out(loaded), out(model))
    with torch.inference_mode():  # onto a model Apply Attention already patched (positions off): the file decides
        window = up.apply_tav(fresh_base(), up.TAVConfig("window", 2))
        onto_patched = ad.apply_adapter(window, adl.load_adapter_file(path, fresh_base()))
    assert up.get_tav_patch(onto_patched).config == up.TAVConfig("window", 2, temporal_position_encoding=True)
    with torch.inference_mode():
        plain = up.apply_tav(loaded, up.TAVConfig())  # same weights, the paper's layer
    assert (out(plain) - out(model)).abs().max().item() > 1e-4
    meta = dict(adapter.metadata)
    del meta["temporal_position_encoding"]
    assert not ad.config_from_metadata(meta).temporal_position_encoding


def test_patched_input_keeps_its_attention_mode_unpatched_gets_the_adapters(tuned):
    _, adapter = tuned
    base = fresh_base()
    window = up.apply_tav(base, up.TAVConfig("window", 3, False, False))
    assert up.get_tav_patch(ad.apply_adapter(window, adapter)).config == up.TAVConfig("window", 3, True, False)
    assert up.get_tav_patch(ad.apply_adapter(base, adapter)).config == up.TAVConfig()


def test_family_mismatch_is_a_clear_error(tuned, tmp_path):
    _, adapter = tuned
    other = ad.TAVAdapter(adapter.deltas, adapter.temporal, {**adapter.metadata, "model_family": "SDXL"})
    path = ad.save_adapter(other, tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match="tuned on a SDXL model but this model is SD15"):
        ad.apply_adapter(fresh_base(), adl.load_adapter_file(path, fresh_base()), "xl.safetensors")


def test_shape_mismatch_is_a_clear_error(tuned):
    _, adapter = tuned
    with pytest.raises(ValueError, match=r"has shape .* in the file but .* in this model"):
        ad.apply_adapter(fresh_base(model_channels=64), adapter)
    wider = ad.TAVAdapter({}, adapter.temporal, adapter.metadata)
    with pytest.raises(ValueError, match=r"_temp\..* has shape .* but this model needs"):
        ad.apply_adapter(fresh_base(model_channels=64), wider)


def test_layout_mismatch_is_a_clear_error(tuned):
    _, adapter = tuned
    with pytest.raises(ValueError, match="do not fit this UNet"):
        ad.apply_adapter(fresh_base(depth=2), adapter)


def test_truncated_file_is_a_clear_error(tuned, tmp_path):
    path = ad.save_adapter(tuned[1], tmp_path / "a.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file .* truncated"):
        adl.load_adapter_file(path, fresh_base())


def test_pickle_renamed_to_safetensors_is_refused_without_unpickling(tuned, tmp_path, monkeypatch):
    path = tmp_path / "evil.safetensors"
    torch.save({"diffusion_model.x.diff": torch.zeros(2)}, path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    with pytest.raises(ValueError, match="renamed pickle"):
        adl.load_adapter_file(path, fresh_base())
    ckpt = tmp_path / "evil.ckpt"
    ckpt.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="from .safetensors files only"):
        adl.load_adapter_file(ckpt, fresh_base())


def official_unet(model, adapter, prefix=""):
    """The tuned model as an official Tune-A-Video UNet state dict (diffusers keys, full query weights,
    every other UNet weight from the base), built with ComfyUI's own key mapping."""
    unet = model.model.diffusion_model
    to_diffusers = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    out = {}
    for dkey, ckey in to_diffusers.items():
        try:
            weight = comfy.utils.get_attr(unet, ckey).detach().float().clone()
        except AttributeError:  # a layer this tiny UNet does not have
            continue
        delta = adapter.deltas.get("diffusion_model." + ckey)
        out[prefix + dkey] = weight if delta is None else weight + delta.float()
    blocks = {c[:-len(".attn1.to_q.weight")]: d[:-len(".attn1.to_q.weight")]
              for d, c in to_diffusers.items() if d.endswith(".attn1.to_q.weight")}
    for key, value in adapter.temporal.items():
        block, rest = key.split(".attn_temp.") if ".attn_temp." in key else key.split(".norm_temp.")
        part = "attn_temp" if ".attn_temp." in key else "norm_temp"
        out[f"{prefix}{blocks[block]}.{part}.{rest}"] = value.float()
    return out


@pytest.mark.parametrize("prefix", ["", "unet."])
def test_official_diffusers_unet_import_reproduces_the_tuned_output(tuned, adapter_dir, prefix):
    model, adapter = tuned
    base = fresh_base()
    official = official_unet(base, adapter, prefix)
    assert any(k.endswith("transformer_blocks.0.attn_temp.to_out.0.weight") for k in official)
    safetensors.torch.save_file(official, str(adapter_dir / "official_unet.safetensors"))
    loaded, imported = load_node(base, "official_unet.safetensors")
    assert imported.metadata["source"] == "official_tune_a_video"
    assert set(imported.deltas) == set(adapter.deltas) and set(imported.temporal) == set(adapter.temporal)
    assert torch.allclose(out(loaded), out(model), atol=1e-6)


def test_official_unet_of_another_family_is_a_clear_error(tuned, tmp_path):
    official = official_unet(fresh_base(), tuned[1])
    path = tmp_path / "official.safetensors"
    safetensors.torch.save_file(official, str(path))
    with pytest.raises(ValueError, match="another model family"):
        adl.load_adapter_file(path, fresh_base(model_channels=64))


def test_a_file_with_no_tuned_weights_is_a_clear_error(tmp_path):
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="neither a Tune-A-Video adapter"):
        adl.load_adapter_file(path, fresh_base())


# --- the real server ------------------------------------------------------------------------------

def test_tune_save_load_and_sample_through_the_real_server(server, random_checkpoint):
    info = server.get("/object_info/TuneAVideoTune")["TuneAVideoTune"]
    assert info["display_name"] == "Tune-A-Video One-Shot Tune" and info["category"] == "Tune-A-Video"
    assert list(info["input"]["required"]) == ["model", "latent", "positive", "steps", "learning_rate", "seed",
                                               "trainable", "precision", "gradient_checkpointing"]
    assert info["output"] == ["MODEL", "TAV_ADAPTER"]
    ckpt = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_checkpoint.name}}
    text = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a man is skiing"}}
    tune_wf = {
        "1": ckpt, "2": text,
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": FRAMES}},
        "4": {"class_type": "TuneAVideoTune", "inputs": {
            "model": ["1", 0], "latent": ["3", 0], "positive": ["2", 0], "steps": 2, "learning_rate": 3e-5,
            "seed": 0, "trainable": "queries+temporal", "precision": "fp32", "gradient_checkpointing": True,
            "preview_every": 1, "prompt_text": "a man is skiing"}},
        "5": {"class_type": "TuneAVideoSaveAdapter", "inputs": {"adapter": ["4", 1], "filename_prefix": "e2e/skiing"}},
    }
    saved = server.run_ok(tune_wf)["outputs"]["5"]["adapters"][0]["filename"]
    assert (server.base_dir / "models" / "tune_a_video" / saved).is_file()
    assert saved in server.get("/object_info/TuneAVideoLoadAdapter")["TuneAVideoLoadAdapter"]["input"]["required"][
        "adapter_name"][0]
    sample_wf = {
        "1": ckpt, "2": text,
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": FRAMES}},
        "4": {"class_type": "TuneAVideoLoadAdapter", "inputs": {"model": ["1", 0], "adapter_name": saved}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0], "seed": 1,
            "steps": 1, "cfg": 1.0, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "tav_adapter_e2e"}},
    }
    assert len(server.run_ok(sample_wf)["outputs"]["8"]["images"]) == FRAMES

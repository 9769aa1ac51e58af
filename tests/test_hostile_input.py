"""Hostile and mistaken input through the HTTP API: a clear error naming the input, the server keeps
serving, and the shared checkpoint's output stays bit-identical."""
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import comfy_runtime
import make_sample_clip


def ckpt(random_checkpoint):
    return Path(random_checkpoint).name


def base_only(name, seed=3, uncached=False):
    """A plain txt2img branch on the shared checkpoint (no pack nodes).

    uncached: route the latent through an exact no-op (x 1.0) so ComfyUI's execution cache cannot
    answer the sampler from the first run, while the loaded checkpoint stays the cached object.
    """
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0],
            "seed": seed, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "tav_base"}},
    }
    if uncached:
        wf["7"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["3", 0], "multiplier": 1.0}}
        wf["4"]["inputs"]["latent_image"] = ["7", 0]
    return wf


def edit_workflow(name, video="tav_clip.mp4", frames=4, steps=2):
    """Load frames -> encode -> invert -> sample -> decode -> save video, small."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
        "2": {"class_type": "TuneAVideoApplyAttention", "inputs": {
            "model": ["1", 0], "attention_mode": "sparse_causal", "window_radius": 2,
            "temporal_attention": True, "frame_shared_norm": True}},
        "3": {"class_type": "TuneAVideoLoadFrames", "inputs": {
            "video": video, "frame_load_cap": frames, "skip_first_frames": 0, "select_every_nth": 1,
            "width": 64, "height": 64}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red kite"}},
        "7": {"class_type": "TuneAVideoInvert", "inputs": {
            "model": ["2", 0], "latent": ["4", 0], "conditioning": ["5", 0], "steps": steps,
            "fixed_point_iterations": 0}},
        "8": {"class_type": "TuneAVideoSampler", "inputs": {
            "model": ["2", 0], "positive": ["6", 0], "negative": ["5", 0], "latent": ["7", 0],
            "seed": 1, "steps": steps, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform",
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "TuneAVideoSaveVideo", "inputs": {
            "images": ["9", 0], "fps": 8.0, "format": "mp4", "filename_prefix": "tav_hostile"}},
    }


def txt2vid(name, frames=2):
    wf = edit_workflow(name)
    for k in ("3", "4", "7"):
        del wf[k]
    wf["11"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": frames}}
    wf["8"]["inputs"]["latent"] = ["11", 0]
    return wf


def put(wf, node, **inputs):
    wf = copy.deepcopy(wf)
    wf[node]["inputs"].update(inputs)
    return wf


def slice_between(wf, length=2):
    """Latent From Batch between Invert and the Sampler: the inverted clip loses frames."""
    wf = copy.deepcopy(wf)
    wf["12"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["7", 0], "batch_index": 0, "length": length}}
    wf["8"]["inputs"]["latent"] = ["12", 0]
    return wf


def nan_latent(wf):
    """A latent multiplied by NaN (JSON NaN is accepted by ComfyUI's parser)."""
    wf = copy.deepcopy(wf)
    wf["12"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["4", 0], "multiplier": float("nan")}}
    wf["7"]["inputs"]["latent"] = ["12", 0]
    return wf


# (id, workflow builder(name) -> prompt, expected: "ok" or (substring naming the input, other words))
CASES = [
    ("bad attention_mode", lambda n: put(edit_workflow(n), "2", attention_mode="sideways"), ("attention_mode",)),
    ("negative window_radius", lambda n: put(edit_workflow(n), "2", window_radius=-1), ("window_radius",)),
    ("missing video file", lambda n: put(edit_workflow(n), "3", video="nope.mp4"), ("video",)),
    ("corrupt video file", lambda n: edit_workflow(n, video="corrupt.mp4"), ("video",)),
    ("truncated video file", lambda n: edit_workflow(n, video="truncated.mp4"), ("video",)),
    ("text file named .mp4", lambda n: edit_workflow(n, video="notes.mp4"), ("video",)),
    ("path with ../", lambda n: put(edit_workflow(n), "3", video="../../etc/passwd"), ("video",)),
    ("absolute path", lambda n: put(edit_workflow(n), "3", video="/etc/passwd"), ("video",)),
    ("zero frames requested", lambda n: put(edit_workflow(n), "3", frame_load_cap=0), ("frame_load_cap",)),
    ("clip shorter than requested", lambda n: put(edit_workflow(n), "3", frame_load_cap=500), ("frame_load_cap",)),
    ("width not a multiple of 8", lambda n: put(edit_workflow(n), "3", width=100), ("width",)),
    ("huge width", lambda n: put(edit_workflow(n), "3", width=100000), ("width",)),
    ("huge height", lambda n: put(edit_workflow(n), "3", height=1 << 20), ("height",)),
    ("invert steps 0", lambda n: put(edit_workflow(n), "7", steps=0), ("steps",)),
    ("invert steps negative", lambda n: put(edit_workflow(n), "7", steps=-5), ("steps",)),
    ("sampler steps 0", lambda n: put(txt2vid(n), "8", steps=0), ("steps",)),
    ("steps differ from inversion", lambda n: put(edit_workflow(n), "8", steps=3), ("steps", "Invert")),
    ("inverted frames sliced away", lambda n: slice_between(edit_workflow(n)), ("frames",)),
    ("denoise < 1 on inverted latents", lambda n: put(edit_workflow(n), "8", denoise=0.5), ("denoise",)),
    ("NaN latents", lambda n: nan_latent(edit_workflow(n)), ("latent", "NaN")),
    ("unknown sampler", lambda n: put(txt2vid(n), "8", sampler_name="warp_drive"), ("sampler_name",)),
    ("zero-frame latent batch", lambda n: put(txt2vid(n), "11", batch_size=0), ("batch_size",)),
    ("filename_prefix leaves output", lambda n: put(txt2vid(n), "10", filename_prefix="../../evil"), ("filename_prefix",)),
    ("unknown video format", lambda n: put(txt2vid(n), "10", format="avi"), ("format",)),
    ("one frame", lambda n: txt2vid(n, frames=1), "ok"),
    ("unicode prompt", lambda n: put(txt2vid(n), "6", text="北京的雪景 🎿 — ça glisse, ñandú"), "ok"),
]


@pytest.fixture(scope="module")
def hostile_inputs(server):
    """Media in the server's input folder: a good clip and broken ones."""
    inp = server.base_dir / "input"
    good = make_sample_clip.make_sample_clip(inp / "tav_clip.mp4", seconds=1, fps=8, size=64)
    data = good.read_bytes()
    (inp / "truncated.mp4").write_bytes(data[: len(data) // 3])
    rng = np.random.default_rng(0)
    (inp / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + rng.bytes(4000))
    (inp / "notes.mp4").write_text("these are my notes, not a video\n")
    return inp


def first_image(server, entry, node="6"):
    img = entry["outputs"][node]["images"][0]
    path = server.base_dir / "output" / img["subfolder"] / img["filename"]
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())))


def test_hostile_inputs_get_clear_errors_and_the_base_stays_identical(server, random_checkpoint, hostile_inputs):
    name = ckpt(random_checkpoint)
    before = first_image(server, server.run_ok(base_only(name)))
    problems = []
    for case_id, build, expected in CASES:
        status, body = server.post("/prompt", {"prompt": build(name), "client_id": "hostile"})
        if status != 200:  # refused at validation: the message must name the input
            text = json.dumps(body)
            outcome = "refused"
        else:
            entry = server.wait(body["prompt_id"], timeout=600)
            outcome = entry["status"]["status_str"]
            text = comfy_runtime.execution_error(entry) if outcome == "error" else ""
        if expected == "ok":
            if outcome != "success":
                problems.append(f"{case_id}: expected success, got {outcome}: {text[:300]}")
        elif outcome == "success":
            problems.append(f"{case_id}: expected an error naming {expected}, but it succeeded")
        elif not all(word in text for word in expected):
            problems.append(f"{case_id}: error does not name {expected}: {text[:400]}")
        print(f"{case_id}: {outcome}: {text[:200]}")
        assert server.get("/system_stats")["system"], f"server stopped serving after {case_id}"
    assert problems == [], "\n".join(problems)
    entry = server.run_ok(base_only(name, uncached=True))
    cached = [m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached"]
    assert "4" not in sum(cached, []), "the sampler must run again, not come from the cache"
    after = first_image(server, entry)
    assert np.array_equal(before, after), "the shared checkpoint's output changed"
    assert len(CASES) >= 20

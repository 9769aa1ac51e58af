"""Hostile and mistaken input through the HTTP API: a clear error naming the input (no server path in it),
nothing written, the server keeps serving, and the shared checkpoint's output stays bit-identical."""
import copy
import io
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import comfy_client
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


def frames_to_video(video="tav_clip.mp4", prefix="tav_hostile_frames", **load):
    """Load Frames -> Save Video only: name and file cases without any sampling."""
    return {
        "3": {"class_type": "TuneAVideoLoadFrames", "inputs": {
            "video": video, "frame_load_cap": 2, "skip_first_frames": 0, "select_every_nth": 1,
            "width": 64, "height": 64, **load}},
        "10": {"class_type": "TuneAVideoSaveVideo", "inputs": {
            "images": ["3", 0], "fps": 8.0, "format": "gif", "filename_prefix": prefix}},
    }


def small_edit(name):
    return edit_workflow(name, frames=2)


def from_latent_file(name, file, node="8"):
    """A .latent file from input/ (Load Latent) straight into the Sampler ("8") or Invert ("7")."""
    if node == "8":
        wf = txt2vid(name)
        wf["11"] = {"class_type": "LoadLatent", "inputs": {"latent": file}}
        return wf
    wf = small_edit(name)
    del wf["3"]
    wf["4"] = {"class_type": "LoadLatent", "inputs": {"latent": file}}
    return wf


def adapter_graph(name, adapter="tav_hostile_valid_00001_.safetensors", prefix="tav_hostile/copy"):
    """Load Adapter onto the plain checkpoint -> Save Adapter: adapter and name cases, no sampling."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
        "15": {"class_type": "TuneAVideoLoadAdapter", "inputs": {"model": ["1", 0], "adapter_name": adapter}},
        "14": {"class_type": "TuneAVideoSaveAdapter", "inputs": {"adapter": ["15", 1], "filename_prefix": prefix}},
    }


def tune_graph(name, prefix="tav_hostile_valid", **tune):
    """A one-step tune of two empty frames -> Save Adapter (the valid adapter the adapter cases break)."""
    wf = txt2vid(name)
    wf["13"] = {"class_type": "TuneAVideoTune", "inputs": {
        "model": ["2", 0], "latent": ["11", 0], "positive": ["6", 0], "steps": 1, "learning_rate": 3e-5,
        "seed": 0, "trainable": "queries+temporal", "precision": "fp32", "gradient_checkpointing": False, **tune}}
    wf["14"] = {"class_type": "TuneAVideoSaveAdapter", "inputs": {"adapter": ["13", 1], "filename_prefix": prefix}}
    for node in ("8", "9", "10"):
        del wf[node]
    return wf


CLIP_VISION = "tav_hostile_vit_l.safetensors"


def clip_metric(frames=2, nan=False, text=None, images=None):
    """Load Frames -> (x NaN by Image Blend) -> CLIP Frame Consistency, or Text Alignment when `text` is given
    (with the checkpoint's CLIP), -> a preview of its plot. images: a link replacing the frames."""
    wf = frames_to_video(frame_load_cap=frames)
    del wf["10"]
    wf["20"] = {"class_type": "ImageBlend", "inputs": {
        "image1": ["3", 0], "image2": ["3", 0], "blend_factor": float("nan"), "blend_mode": "normal"}}
    wf["21"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION}}
    inputs = {"clip_vision": ["21", 0], "images": images or ["20" if nan else "3", 0]}
    if text is None:
        wf["22"] = {"class_type": "TuneAVideoCLIPFrameConsistency", "inputs": {**inputs, "pairs": "all"}}
    else:
        wf["22"] = {"class_type": "TuneAVideoCLIPTextAlignment", "inputs": {**inputs, "clip": ["1", 1], "text": text}}
    wf["23"] = {"class_type": "PreviewImage", "inputs": {"images": ["22", 1]}}
    if not nan:
        del wf["20"]
    return wf


def empty_frames():
    """The 0 frames of a video stream that decodes to none (core Load Video -> Get Video Components) into
    CLIP Frame Consistency."""
    wf = clip_metric(images=["25", 0])
    del wf["3"]
    wf["24"] = {"class_type": "LoadVideo", "inputs": {"file": "zero_frames.mp4"}}
    wf["25"] = {"class_type": "GetVideoComponents", "inputs": {"video": ["24", 0]}}
    return wf


def resize_between(wf):
    """Latent Upscale By between Invert and the Sampler: the inverted noise changes size."""
    wf = copy.deepcopy(wf)
    wf["12"] = {"class_type": "LatentUpscaleBy", "inputs": {
        "samples": ["7", 0], "upscale_method": "nearest-exact", "scale_by": 1.5}}
    wf["8"]["inputs"]["latent"] = ["12", 0]
    return wf


def edm_tune(name):
    """Tune on the model patched by core's Model Sampling Continuous EDM (a continuous noise schedule)."""
    wf = tune_graph(name)
    wf["16"] = {"class_type": "ModelSamplingContinuousEDM", "inputs": {
        "model": ["2", 0], "sampling": "edm", "sigma_max": 120.0, "sigma_min": 0.002}}
    wf["13"]["inputs"]["model"] = ["16", 0]
    return wf


SPOOFED_ADAPTER = "tav_hostile_\u202elanigiro.safetensors"  # shown as "tav_hostile_original.safetensors" reversed


def link(wf, node, **links):
    wf = copy.deepcopy(wf)
    wf[node]["inputs"].update(links)
    return wf


def without(wf, node, key):
    wf = copy.deepcopy(wf)
    del wf[node]["inputs"][key]
    return wf


LONG = "x" * 300


# (id, workflow builder(name) -> prompt, expected: "ok" or (substring naming the input, other words)).
# Every error must also leave no new file in output/ or models/tune_a_video and show no server path.
CASES = [
    # video files
    ("missing video file", lambda _: frames_to_video("nope.mp4"), ("video", "not found")),
    ("corrupt video file", lambda _: frames_to_video("corrupt.mp4"), ("video", "decoded")),
    ("truncated video file", lambda _: frames_to_video("truncated.mp4"), ("video", "decoded")),
    ("text file named .mp4", lambda _: frames_to_video("notes.mp4"), ("video", "decoded")),
    ("path with ../", lambda _: frames_to_video("../../etc/passwd"), ("video", "refused")),
    ("absolute path", lambda _: frames_to_video("/etc/passwd"), ("video", "refused")),
    ("video name with NUL", lambda _: frames_to_video("tav_clip.mp4\x00.png"), ("video", "control character")),
    ("named pipe as video", lambda _: frames_to_video("pipe.mp4"), ("video", "named pipe")),
    ("folder whose frames are pipes", lambda _: frames_to_video("pipes"), ("video", "no images")),
    ("video stream of 0 frames", lambda _: frames_to_video("zero_frames.mp4"), ("video", "0 frames")),
    ("link to a file outside input", lambda _: frames_to_video("escape.mp4"), ("video", "outside")),
    ("link to a folder outside input", lambda _: frames_to_video("escape_dir"), ("video", "outside")),
    ("folder with a frame linked outside", lambda _: frames_to_video("frames_link"), ("video", "outside")),
    ("link to /dev/zero", lambda _: frames_to_video("dev_zero.mp4"), ("video", "outside")),
    ("link inside input", lambda _: frames_to_video("alias.mp4"), "ok"),
    ("zero frames requested", lambda _: frames_to_video(frame_load_cap=0), ("frame_load_cap",)),
    ("clip shorter than requested", lambda _: frames_to_video(frame_load_cap=500), ("frame_load_cap",)),
    ("skip past the end", lambda _: frames_to_video(skip_first_frames=1000), ("skip_first_frames",)),
    ("stride past the end", lambda _: frames_to_video(select_every_nth=999), ("select_every_nth",)),
    ("width not a multiple of 8", lambda _: frames_to_video(width=100), ("width",)),
    ("huge width", lambda _: frames_to_video(width=100000), ("width",)),
    ("huge height", lambda _: frames_to_video(height=1 << 20), ("height",)),
    # latents
    ("NaN latents", lambda n: nan_latent(small_edit(n)), ("latent", "NaN")),
    ("zero-frame latent batch", lambda n: put(txt2vid(n), "11", batch_size=0), ("batch_size",)),
    ("latent of 0 frames into Sampler", lambda n: from_latent_file(n, "zero.latent"), ("latent", "0 frames")),
    ("latent of 0 frames into Invert", lambda n: from_latent_file(n, "zero.latent", "7"), ("latent", "0 frames")),
    ("3-channel latent into Sampler", lambda n: from_latent_file(n, "rgb.latent"), ("latent", "3 channels")),
    ("16-channel latent into Invert", lambda n: from_latent_file(n, "sd3.latent", "7"), ("latent", "16 channels")),
    ("1e30 latent into Sampler", lambda n: from_latent_file(n, "huge.latent"), ("latent", "1e+30")),
    ("1e30 latent into Invert", lambda n: from_latent_file(n, "huge.latent", "7"), ("latent", "1e+30")),
    ("infinite latent into Sampler", lambda n: from_latent_file(n, "inf.latent"), ("latent", "infinite")),
    ("5-D latent into Sampler", lambda n: from_latent_file(n, "video5d.latent"), ("latent", "[frames, channels")),
    ("0x0 latent into Invert", lambda n: from_latent_file(n, "empty_hw.latent", "7"), ("latent", "0x0")),
    ("3-channel latent into Tune", lambda n: link(tune_graph(n), "13", latent=["12", 0]) | {
        "12": {"class_type": "LoadLatent", "inputs": {"latent": "rgb.latent"}}}, ("latent", "channels")),
    # adapters and their metadata
    ("adapter holding NaN", lambda n: adapter_graph(n, "bad_nan.safetensors"), ("bad_nan.safetensors", "NaN", ".diff")),
    ("adapter holding Inf", lambda n: adapter_graph(n, "bad_inf.safetensors"), ("bad_inf.safetensors", "infinite")),
    ("adapter of int8", lambda n: adapter_graph(n, "bad_int8.safetensors"), ("bad_int8.safetensors", "int8")),
    ("adapter of bool", lambda n: adapter_graph(n, "bad_bool.safetensors"), ("bad_bool.safetensors", "bool")),
    ("adapter of float64", lambda n: adapter_graph(n, "bad_f64.safetensors"), ("bad_f64.safetensors", "float64")),
    ("adapter with a foreign key", lambda n: adapter_graph(n, "bad_key.safetensors"), ("bad_key.safetensors", "unexpected key")),
    ("adapter with no tensors", lambda n: adapter_graph(n, "bad_empty.safetensors"), ("bad_empty.safetensors", "no tuned weights")),
    ("truncated adapter", lambda n: adapter_graph(n, "bad_truncated.safetensors"), ("bad_truncated.safetensors", "truncated")),
    ("pickle renamed .safetensors", lambda n: adapter_graph(n, "bad_pickle.safetensors"), ("bad_pickle.safetensors", "pickle")),
    ("adapter of the wrong shape", lambda n: adapter_graph(n, "bad_shape.safetensors"), ("bad_shape.safetensors", "shape")),
    ("adapter for another family", lambda n: adapter_graph(n, "bad_family.safetensors"), ("bad_family.safetensors", "SDXL")),
    ("metadata window_radius abc", lambda n: adapter_graph(n, "bad_radius_abc.safetensors"), ("bad_radius_abc.safetensors", "window_radius", "'abc'")),
    ("metadata window_radius -5", lambda n: adapter_graph(n, "bad_radius_neg.safetensors"), ("bad_radius_neg.safetensors", "window_radius", "'-5'")),
    ("metadata window_radius huge", lambda n: adapter_graph(n, "bad_radius_huge.safetensors"), ("bad_radius_huge.safetensors", "window_radius")),
    ("metadata attention_mode sideways", lambda n: adapter_graph(n, "bad_mode.safetensors"), ("bad_mode.safetensors", "attention_mode", "sideways")),
    ("metadata temporal_attention maybe", lambda n: adapter_graph(n, "bad_bool_meta.safetensors"), ("bad_bool_meta.safetensors", "temporal_attention")),
    ("metadata format_version 99", lambda n: adapter_graph(n, "bad_format_99.safetensors"), ("bad_format_99.safetensors", "format_version 99", "Update the pack")),
    ("metadata format_version 1.x", lambda n: adapter_graph(n, "bad_format_abc.safetensors"), ("bad_format_abc.safetensors", "format_version", "'1.x'")),
    ("adapter name with a bidi override", lambda n: adapter_graph(n, SPOOFED_ADAPTER), ("adapter_name",)),
    ("adapter_name with ../", lambda n: adapter_graph(n, "../../checkpoints/x.safetensors"), ("adapter_name",)),
    # numbers
    ("bad attention_mode", lambda n: put(edit_workflow(n), "2", attention_mode="sideways"), ("attention_mode",)),
    ("negative window_radius", lambda n: put(edit_workflow(n), "2", window_radius=-1), ("window_radius",)),
    ("invert steps 0", lambda n: put(edit_workflow(n), "7", steps=0), ("steps",)),
    ("invert steps negative", lambda n: put(edit_workflow(n), "7", steps=-5), ("steps",)),
    ("invert steps huge", lambda n: put(edit_workflow(n), "7", steps=10 ** 9), ("steps",)),
    ("sampler steps 0", lambda n: put(txt2vid(n), "8", steps=0), ("steps",)),
    ("sampler steps not a number", lambda n: put(txt2vid(n), "8", steps="abc"), ("steps",)),
    ("steps differ from inversion", lambda n: put(small_edit(n), "8", steps=3), ("steps", "Invert")),
    ("inverted frames sliced away", lambda n: slice_between(small_edit(n), length=1), ("frames",)),
    ("inverted noise resized", lambda n: resize_between(small_edit(n)), ("latent", "inverted at")),
    ("denoise < 1 on inverted latents", lambda n: put(small_edit(n), "8", denoise=0.5), ("denoise",)),
    ("denoise NaN", lambda n: put(txt2vid(n), "8", denoise=float("nan")), ("denoise",)),
    ("cfg NaN", lambda n: put(txt2vid(n), "8", cfg=float("nan")), ("cfg",)),
    ("cfg huge", lambda n: put(txt2vid(n), "8", cfg=1e9), ("cfg",)),
    ("negative seed", lambda n: put(txt2vid(n), "8", seed=-1), ("seed",)),
    ("fixed_point_iterations huge", lambda n: put(edit_workflow(n), "7", fixed_point_iterations=99), ("fixed_point_iterations",)),
    ("learning_rate NaN", lambda n: tune_graph(n, learning_rate=float("nan")), ("learning_rate",)),
    ("tune steps 0", lambda n: tune_graph(n, steps=0), ("steps",)),
    ("tune an EDM-sampling model", edm_tune, ("model", "discrete")),
    ("fps NaN", lambda _: put(frames_to_video(), "10", fps=float("nan")), ("fps",)),
    ("gif above 50 fps", lambda _: put(frames_to_video(), "10", fps=120.0), ("fps", "50")),
    ("gif at 1000 fps through a link", lambda _: link(frames_to_video(), "10", fps=["26", 0]) | {
        "26": {"class_type": "PrimitiveFloat", "inputs": {"value": 1000.0}}}, ("fps", "50")),
    ("unknown sampler", lambda n: put(txt2vid(n), "8", sampler_name="warp_drive"), ("sampler_name",)),
    ("unknown video format", lambda n: put(txt2vid(n), "10", format="avi"), ("format",)),
    # names to write
    ("filename_prefix leaves output", lambda n: put(txt2vid(n), "10", filename_prefix="../../evil"), ("filename_prefix",)),
    ("video prefix absolute", lambda _: frames_to_video(prefix="/tmp/evil"), ("filename_prefix", "leaves")),
    ("video prefix with NUL", lambda _: frames_to_video(prefix="clip\x00x"), ("filename_prefix", "control")),
    ("video prefix with newline", lambda _: frames_to_video(prefix="clip\nx"), ("filename_prefix", "control")),
    ("video prefix too long", lambda _: frames_to_video(prefix=LONG), ("filename_prefix", "too long")),
    ("video prefix empty", lambda _: frames_to_video(prefix=""), ("filename_prefix", "empty")),
    ("video prefix dot", lambda _: frames_to_video(prefix="."), ("filename_prefix", "names no file")),
    ("video prefix hidden", lambda _: frames_to_video(prefix="TuneAVideo/.clip"), ("filename_prefix", "hidden")),
    ("video prefix through a file", lambda _: frames_to_video(prefix="taken.txt/clip"), ("filename_prefix", "not a folder")),
    ("video prefix through a link out", lambda _: frames_to_video(prefix="linkout/clip"), ("filename_prefix", "outside")),
    ("video prefix with a bidi override", lambda _: frames_to_video(prefix="clip\u202egpj.exe"), ("filename_prefix", "U+202E")),
    ("video prefix with a zero-width space", lambda _: frames_to_video(prefix="cl\u200bip"), ("filename_prefix", "U+200B")),
    ("video prefix in unicode", lambda _: frames_to_video(prefix="ça/клип 北京"), "ok"),
    ("adapter prefix leaves models", lambda n: adapter_graph(n, prefix="../../evil"), ("filename_prefix", "leaves")),
    ("adapter prefix with NUL", lambda n: adapter_graph(n, prefix="a\x00b"), ("filename_prefix", "control")),
    ("adapter prefix with newline", lambda n: adapter_graph(n, prefix="a\nb"), ("filename_prefix", "control")),
    ("adapter prefix too long", lambda n: adapter_graph(n, prefix=LONG), ("filename_prefix", "too long")),
    ("adapter prefix empty", lambda n: adapter_graph(n, prefix=""), ("filename_prefix", "empty")),
    ("adapter prefix dot", lambda n: adapter_graph(n, prefix="."), ("filename_prefix", "names no file")),
    ("adapter prefix through a file", lambda n: adapter_graph(n, prefix="taken.txt/a"), ("filename_prefix", "not a folder")),
    ("adapter prefix through a link out", lambda n: adapter_graph(n, prefix="linkout/a"), ("filename_prefix", "outside")),
    ("adapter prefix with a bidi isolate", lambda n: adapter_graph(n, prefix="a\u2067b"), ("filename_prefix", "U+2067")),
    ("adapter prefix with a byte order mark", lambda n: adapter_graph(n, prefix="\ufeffadapter"), ("filename_prefix", "U+FEFF")),
    ("adapter copied", lambda n: adapter_graph(n), "ok"),
    # metrics
    ("frame consistency of NaN frames", lambda _: clip_metric(nan=True), ("images", "NaN", "Fix the node")),
    ("text alignment of NaN frames", lambda n: clip_metric(nan=True, text="a kite") | {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": n}}}, ("images", "NaN", "Fix the node")),
    ("frame consistency of one frame", lambda _: clip_metric(frames=1), ("images", "2 or more", "frame_load_cap")),
    ("frame consistency of 0 frames", lambda _: empty_frames(), ("images", "empty")),
    # graph shape
    ("sampler without latent", lambda n: without(txt2vid(n), "8", "latent"), ("latent",)),
    ("IMAGE into latent", lambda n: link(edit_workflow(n), "7", latent=["3", 0]), ("latent",)),
    ("TAV_ADAPTER into model", lambda n: link(adapter_graph(n), "14", adapter=["1", 0]), ("adapter",)),
    ("link to a missing node", lambda n: link(txt2vid(n), "8", latent=["99", 0]), ("99",)),
    ("unknown node type", lambda n: {**txt2vid(n), "12": {"class_type": "TuneAVideoWarp", "inputs": {}}}, ("TuneAVideoWarp",)),
    ("no output node", lambda n: {k: v for k, v in txt2vid(n).items() if k != "10"}, ("output",)),
    ("one frame", lambda n: txt2vid(n, frames=1), "ok"),
    ("unicode prompt", lambda n: put(txt2vid(n, frames=1), "6", text="北京的雪景 🎿 — ça glisse, ñandú"), "ok"),
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


def zero_frame_video(src: Path, dst: Path):
    """An mp4 whose video stream decodes to 0 frames: every sample size in its stsz box set to 0."""
    data = bytearray(src.read_bytes())
    at = data.find(b"stsz")
    count = int.from_bytes(data[at + 12:at + 16], "big")
    data[at + 16:at + 16 + 4 * count] = bytes(4 * count)
    dst.write_bytes(data)


def fresh(path: Path) -> Path:
    """path, with whatever was there (file, link, pipe) removed: fixtures are set up once per module."""
    if path.is_symlink() or path.exists():
        path.unlink()
    return path


def save_latent(path: Path, samples):
    import safetensors.torch
    import torch

    safetensors.torch.save_file({"latent_tensor": samples, "latent_format_version_0": torch.tensor([])}, str(path))


@pytest.fixture(scope="module")
def hostile_media(server, hostile_inputs):
    """Pipes, links out of the folders, 0-frame video, odd latents, files where folders are expected, a CLIP
    vision file."""
    import torch
    from safetensors.torch import save_file

    base, inp = server.base_dir, hostile_inputs
    outside = base / "outside"
    (outside / "frames").mkdir(parents=True, exist_ok=True)
    make_sample_clip.make_sample_clip(outside / "secret.mp4", seconds=1, fps=8, size=64)
    Image.new("RGB", (64, 64), "red").save(outside / "frames" / "0001.png")
    zero_frame_video(inp / "tav_clip.mp4", inp / "zero_frames.mp4")
    os.mkfifo(fresh(inp / "pipe.mp4"))
    (inp / "pipes").mkdir(exist_ok=True)
    os.mkfifo(fresh(inp / "pipes" / "0001.png"))
    (inp / "frames_link").mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), "blue").save(inp / "frames_link" / "0001.png")
    fresh(inp / "frames_link" / "0002.png").symlink_to(outside / "frames" / "0001.png")
    fresh(inp / "escape.mp4").symlink_to(outside / "secret.mp4")
    fresh(inp / "escape_dir").symlink_to(outside / "frames", target_is_directory=True)
    fresh(inp / "dev_zero.mp4").symlink_to("/dev/zero")
    fresh(inp / "alias.mp4").symlink_to("tav_clip.mp4")
    for name, samples in (("zero", torch.zeros(0, 4, 8, 8)), ("rgb", torch.zeros(2, 3, 8, 8)),
                          ("sd3", torch.randn(2, 16, 8, 8)), ("huge", torch.full((2, 4, 8, 8), 1e30)),
                          ("inf", torch.full((2, 4, 8, 8), float("inf"))), ("video5d", torch.zeros(1, 4, 2, 8, 8)),
                          ("empty_hw", torch.zeros(2, 4, 0, 0))):
        save_latent(inp / f"{name}.latent", samples)
    clip_vision = base / "models" / "clip_vision"
    clip_vision.mkdir(parents=True, exist_ok=True)
    # Only the keys by which ComfyUI recognises CLIP ViT-L/14 (its other weights stay unset): the metric cases
    # must be refused before the model runs.
    save_file({"vision_model.encoder.layers.0.layer_norm1.weight": torch.ones(1024),
               "vision_model.encoder.layers.22.layer_norm1.weight": torch.ones(1024),
               "vision_model.embeddings.position_embedding.weight": torch.zeros(257, 1024)},
              str(clip_vision / CLIP_VISION))
    for folder in (base / "output", base / "models" / "tune_a_video"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "taken.txt").write_text("a file, not a folder\n")
        fresh(folder / "linkout").symlink_to(outside, target_is_directory=True)
    yield inp
    for pipe in (inp / "pipe.mp4", inp / "pipes" / "0001.png"):  # later tests need no pipes around
        fresh(pipe)


def valid_adapter(server, random_checkpoint) -> Path:
    """models/tune_a_video/tav_hostile_valid_00001_.safetensors, made once per server by a one-step tune."""
    path = server.base_dir / "models" / "tune_a_video" / "tav_hostile_valid_00001_.safetensors"
    if not path.exists():
        server.run_ok(tune_graph(ckpt(random_checkpoint)))
    return path


@pytest.fixture(scope="module")
def hostile_adapters(server, random_checkpoint, hostile_media):
    """A valid adapter (a one-step tune) and broken copies of it in models/tune_a_video."""
    import safetensors.torch
    import torch
    from safetensors import safe_open

    valid = valid_adapter(server, random_checkpoint)
    folder = valid.parent
    with safe_open(str(valid), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    delta = next(k for k in tensors if k.endswith(".diff"))
    temporal = next(k for k in tensors if ".attn_temp." in k)

    def write(name, changed=None, meta=None, drop=()):
        out = {k: v for k, v in tensors.items() if k not in drop} | (changed or {})
        safetensors.torch.save_file(out, str(folder / name), metadata=metadata | (meta or {}))

    poisoned = tensors[delta].clone()
    poisoned[0, 0] = float("nan")
    write("bad_nan.safetensors", {delta: poisoned})
    write("bad_inf.safetensors", {temporal: torch.full_like(tensors[temporal], float("inf"))})
    write("bad_int8.safetensors", {delta: tensors[delta].to(torch.int8)})
    write("bad_bool.safetensors", {temporal: tensors[temporal] > 0})
    write("bad_f64.safetensors", {delta: tensors[delta].double()})
    write("bad_key.safetensors", {"diffusion_model.output_blocks.9.evil": torch.zeros(2)})
    write("bad_empty.safetensors", drop=tuple(tensors))
    write("bad_shape.safetensors", {temporal: torch.zeros(3, 3, dtype=torch.float16)})
    write("bad_family.safetensors", meta={"model_family": "SDXL"})
    write("bad_radius_abc.safetensors", meta={"window_radius": "abc"})
    write("bad_radius_neg.safetensors", meta={"window_radius": "-5"})
    write("bad_radius_huge.safetensors", meta={"window_radius": "100000"})
    write("bad_mode.safetensors", meta={"attention_mode": "sideways"})
    write("bad_bool_meta.safetensors", meta={"temporal_attention": "maybe"})
    write("bad_format_99.safetensors", meta={"format_version": "99"})
    write("bad_format_abc.safetensors", meta={"format_version": "1.x"})
    write(SPOOFED_ADAPTER)
    data = valid.read_bytes()
    (folder / "bad_truncated.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "bad_pickle.safetensors").write_bytes(pickle.dumps({"state_dict": {}}))
    return folder


def files_under(*folders) -> set[str]:
    return {str(p) for folder in folders for p in folder.rglob("*") if not p.is_dir()}


def first_image(server, entry, node="6"):
    img = entry["outputs"][node]["images"][0]
    path = server.base_dir / "output" / img["subfolder"] / img["filename"]
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())))


def test_load_adapter_lists_no_name_with_invisible_characters(server, hostile_adapters):
    listed = server.get("/object_info/TuneAVideoLoadAdapter")["TuneAVideoLoadAdapter"]["input"]["required"]
    names = listed["adapter_name"][0]
    assert "tav_hostile_valid_00001_.safetensors" in names and SPOOFED_ADAPTER not in names


@pytest.mark.parametrize("fps", [8.0, 30.0, 50.0])
def test_gif_plays_at_the_rate_history_and_the_video_output_report(server, hostile_inputs, fps):
    """The gif's frame delays, read back, put frame i at i / frame_rate (to the nearest 1/100 s), none under
    2/100 s (browsers play those at 10 fps); the VIDEO output (re-saved through its own fps) reports that rate."""
    wf = put(frames_to_video(frame_load_cap=8, prefix="tav_hostile_gif"), "10", fps=fps)
    wf["11"] = {"class_type": "GetVideoComponents", "inputs": {"video": ["10", 0]}}
    wf["12"] = {"class_type": "TuneAVideoSaveVideo", "inputs": {
        "images": ["11", 0], "fps": ["11", 2], "format": "webp", "filename_prefix": "tav_hostile_gif_again"}}
    outputs = server.run_ok(wf)["outputs"]
    saved, again = outputs["10"]["images"][0], outputs["12"]["images"][0]
    rate = saved["frame_rate"]
    assert rate == again["frame_rate"] == fps and saved["frame_count"] == 8
    with Image.open(server.base_dir / "output" / saved["subfolder"] / saved["filename"]) as gif:
        durations = []
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
    assert len(durations) == 8, "the clip's frames all differ, so none may be merged"
    assert min(durations) >= 20, f"delays under 20 ms play at 10 fps in browsers: {durations}"
    starts = np.cumsum([0] + durations)
    assert np.abs(starts - 1000 * np.arange(9) / rate).max() <= 5, f"{durations} ms is not {rate} fps"


def test_hostile_inputs_get_clear_errors_and_the_base_stays_identical(server, random_checkpoint, hostile_adapters):
    name = ckpt(random_checkpoint)
    before = first_image(server, server.run_ok(base_only(name)))
    written = (server.base_dir / "output", hostile_adapters, server.base_dir / "outside")
    problems = []
    # Graphs without the checkpoint first: ComfyUI's cache drops nodes a prompt lacks, so mixing them
    # would reload the checkpoint again and again.
    for case_id, build, expected in sorted(CASES, key=lambda case: "1" in case[1](name)):
        files, started = files_under(*written), time.time()
        status, body = server.post("/prompt", {"prompt": build(name), "client_id": "hostile"})
        if status != 200:  # refused at validation: the message must name the input
            text = json.dumps(body, ensure_ascii=False)
            outcome = "refused"
        else:
            entry = server.wait(body["prompt_id"], timeout=120)  # a hang (e.g. a named pipe) fails here
            outcome = entry["status"]["status_str"]
            text = comfy_client.failure_message(entry) if outcome == "error" else ""
        if expected == "ok":
            if outcome != "success":
                problems.append(f"{case_id}: expected success, got {outcome}: {text[:300]}")
        elif outcome == "success":
            problems.append(f"{case_id}: expected an error naming {expected}, but it succeeded")
        elif not all(word in text for word in expected):
            problems.append(f"{case_id}: error does not name {expected}: {text[:400]}")
        elif str(server.base_dir) in text:
            problems.append(f"{case_id}: the message shows a server path: {text[:400]}")
        elif files_under(*written) != files:
            problems.append(f"{case_id}: failed but wrote {sorted(files_under(*written) - files)}")
        print(f"{case_id}: {outcome} in {time.time() - started:.1f}s: {text[:160]}")
        assert server.get("/system_stats")["system"], f"server stopped serving after {case_id}"
    assert problems == [], "\n".join(problems)
    entry = server.run_ok(base_only(name, uncached=True))
    cached = [m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached"]
    assert "4" not in sum(cached, []), "the sampler must run again, not come from the cache"
    after = first_image(server, entry)
    assert np.array_equal(before, after), "the shared checkpoint's output changed"
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES) >= 60

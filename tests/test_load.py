"""Load: a queue of mixed prompts sharing one checkpoint; each output equals the prompt run alone."""
import time
from pathlib import Path

import numpy as np

from test_cancel import long_tune, video_frames
from test_hostile_input import base_only, edit_workflow, first_image, hostile_inputs, put, txt2vid  # noqa: F401

MODES = ["sparse_causal", "first_frame", "causal", "full", "window"]
# On CPU, ComfyUI sizes attention chunks and VAE batches from the free memory, so the last bits of
# a result depend on what else is loaded, and random weights amplify them (measured: up to mean 1.2,
# max 28 of 255 between identical prompts). A leaked mode or switch changes the output by far more
# (the control below: mean ~9), so "equal" here is: mean |difference| <= NOISE levels of 255.
NOISE = 2.0
# Tuning (AdamW) turns such last-bit gradient differences into sign flips of lr-sized updates:
# measured mean 2.9 (queued vs alone) for the same 2-step tune.
NOISE_TUNED = 5.0


def tuned(name, steps=2):
    wf = put(long_tune(name), "13", steps=steps)
    wf["14"] = {"class_type": "TuneAVideoSaveAdapter", "inputs": {"adapter": ["13", 1], "filename_prefix": "tav_load"}}
    return put(wf, "10", filename_prefix="tav_load_tuned")


def from_adapter(name, adapter):
    wf = put(txt2vid(name, frames=3), "10", filename_prefix="tav_load_adapter")
    wf["15"] = {"class_type": "TuneAVideoLoadAdapter", "inputs": {"model": ["2", 0], "adapter_name": adapter}}
    wf["8"]["inputs"]["model"] = ["15", 0]
    return wf


def variants(name, adapter):
    """(kind, prompt): modes, seeds, switches, tuned, adapters, inversion edits, base-model branches."""
    out = [("video", tuned(name)), ("video", from_adapter(name, adapter))]
    for i, mode in enumerate(MODES):
        wf = put(txt2vid(name, frames=3), "2", attention_mode=mode, window_radius=1,
                 temporal_attention=bool(i % 2), frame_shared_norm=i != 2)
        out.append(("video", put(put(wf, "8", seed=100 + i), "10", filename_prefix=f"tav_load_{i}")))
    out.append(("video", put(edit_workflow(name), "10", filename_prefix="tav_load_edit")))
    out.append(("video", put(put(edit_workflow(name), "2", attention_mode="full"), "10", filename_prefix="tav_load_edit_full")))
    out.append(("image", base_only(name, seed=5)))
    out.append(("video", put(put(txt2vid(name, frames=3), "8", seed=100), "10", filename_prefix="tav_load_repeat")))
    out.append(("image", base_only(name, seed=6)))
    return out


def result(server, kind, entry):
    if kind == "image":
        return first_image(server, entry)
    node = next(k for k, v in entry["outputs"].items() if "images" in v)
    return video_frames(server, entry, node)


def mean_diff(a, b):
    assert a.shape == b.shape
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def test_mixed_queue_matches_each_prompt_alone(server, random_checkpoint, hostile_inputs):
    name = Path(random_checkpoint).name
    saved = server.run_ok(tuned(name, steps=3))["outputs"]["14"]["adapters"][0]["filename"]
    work = variants(name, saved)
    assert len(work) >= 12
    ids = [server.queue(p) for _, p in work]  # all queued at once
    together = []
    for (kind, _), pid in zip(work, ids):
        entry = server.wait(pid, timeout=900)
        assert entry["status"]["status_str"] == "success", entry["status"]
        together.append(result(server, kind, entry))
    diffs = []
    for (kind, prompt), got in zip(work, together):
        # Alone: models unloaded and the execution cache reset, so everything is recomputed.
        server.post("/free", {"unload_models": True, "free_memory": True})
        time.sleep(1.5)
        diffs.append(mean_diff(got, result(server, kind, server.run_ok(prompt))))
    print("mean |together - alone| per prompt:", [round(d, 3) for d in diffs])
    limits = [NOISE_TUNED if "13" in p else NOISE for _, p in work]
    assert all(d <= lim for d, lim in zip(diffs, limits)), diffs
    # Control: one switch leaking between prompts would be far above the noise level.
    first = next(i for i, (_, p) in enumerate(work) if p["10"]["inputs"]["filename_prefix"] == "tav_load_0")
    leaked = put(work[first][1], "2", attention_mode="full", frame_shared_norm=False)
    control = mean_diff(together[first], result(server, "video", server.run_ok(leaked)))
    print("control (another mode, same seed):", round(control, 2))
    assert control > 2 * NOISE

"""Cancel (/interrupt) mid-run on the real server: the prompt stops, nothing is half-applied, the next
prompt succeeds with the same result as before, and the server's memory returns to where it was."""
import time
from pathlib import Path

import psutil
import pytest

import comfy_client
from test_hostile_input import edit_workflow, hostile_inputs, put, txt2vid  # noqa: F401 (fixture)

LONG_STEPS = 400


def long_invert(name):
    wf = put(edit_workflow(name), "7", steps=LONG_STEPS)
    return put(wf, "8", steps=LONG_STEPS)


def long_sample(name):
    return put(txt2vid(name, frames=4), "8", steps=LONG_STEPS)


def long_tune(name):
    """Tune (many steps) -> invert -> sample: cancel lands inside the tuning loop."""
    wf = edit_workflow(name)
    wf["13"] = {"class_type": "TuneAVideoTune", "inputs": {
        "model": ["2", 0], "latent": ["4", 0], "positive": ["6", 0], "steps": LONG_STEPS,
        "learning_rate": 3e-5, "seed": 0, "trainable": "queries+temporal", "precision": "fp32",
        "gradient_checkpointing": True}}
    wf["7"]["inputs"]["model"] = ["13", 0]
    wf["8"]["inputs"]["model"] = ["13", 0]
    return wf


def short_run(name, seed, uncached=False):
    wf = put(txt2vid(name, frames=2), "8", seed=seed)
    if uncached:  # an exact no-op (x 1.0) before the sampler so the cache cannot answer it
        wf["13"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["11", 0], "multiplier": 1.0}}
        wf["8"]["inputs"]["latent"] = ["13", 0]
    return wf


def wait_until_running(server, prompt_id, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = server.get("/queue")["queue_running"]
        if any(item[1] == prompt_id for item in running):
            return
        time.sleep(0.2)
    raise TimeoutError("the prompt never started")


def rss_mib(server):
    return psutil.Process(server.proc.pid).memory_info().rss / 2**20


def video_frames(server, entry, node="10"):
    import av
    import numpy as np

    item = entry["outputs"][node]["images"][0]
    with av.open(str(server.base_dir / "output" / item["subfolder"] / item["filename"])) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize("build,stage", [(long_tune, "TuneAVideoTune"), (long_invert, "TuneAVideoInvert"),
                                         (long_sample, "TuneAVideoSampler")],
                         ids=["tuning", "inversion", "sampling"])
def test_interrupt_mid_run_then_the_next_prompt_works(server, random_checkpoint, hostile_inputs, build, stage):
    name = Path(random_checkpoint).name
    reference = server.run_ok(short_run(name, seed=11))
    server.run_ok(edit_workflow(name))  # caches frame loading and VAE encoding: the long run starts at `stage`
    warm_rss = rss_mib(server)

    prompt_id = server.queue(build(name))
    wait_until_running(server, prompt_id)
    time.sleep(2.0)  # well inside the long run
    started = time.time()
    status, _ = server.post("/interrupt", {})
    assert status == 200
    entry = server.wait(prompt_id, timeout=300)
    assert time.time() - started < 60, "cancel must stop the run promptly, not after all steps"
    assert entry["status"]["status_str"] == "error"
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, comfy_client.failure_message(entry)
    interrupted = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"][0]
    assert interrupted["node_type"] == stage

    # The next prompt succeeds and reproduces the earlier result exactly (recomputed, not cached).
    again = server.run_ok(short_run(name, seed=11, uncached=True))
    cached = sum([m[1]["nodes"] for m in again["status"]["messages"] if m[0] == "execution_cached"], [])
    assert "8" not in cached
    assert (video_frames(server, again) == video_frames(server, reference)).all()
    assert rss_mib(server) < warm_rss + 300, f"server memory grew: {warm_rss:.0f} -> {rss_mib(server):.0f} MiB"

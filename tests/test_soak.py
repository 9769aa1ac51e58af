"""Soak: 50 mixed prompts (plain, patched, tuned, adapter, long clip) on one server, 5 of them cancelled at
seeded random points (a cancelled prompt runs a many-step sampler, so the cancel lands inside it). Every finished output equals the same prompt run alone, and the server's memory
after the last prompt is within 5 % of its memory after the first."""
import random
import time
from pathlib import Path

import numpy as np

from test_cancel import LONG_STEPS, rss_mib, wait_until_running
from test_hostile_input import base_only, put, txt2vid, valid_adapter
from test_load import NOISE, NOISE_TUNED, mean_diff, result

PROMPTS = 50
CANCELS = 5
SEED = 12


def small(wf, latent_node):
    """32x32 pixels (4x4 latents): the soak is about state and memory, not pictures."""
    return put(wf, latent_node, width=32, height=32)


def plain(name, seed):
    return put(small(base_only(name, seed=seed), "3"), "4", steps=1)


def patched(name, seed, mode="sparse_causal"):
    wf = put(put(small(txt2vid(name), "11"), "2", attention_mode=mode, window_radius=1), "8", seed=seed, steps=1)
    return put(wf, "10", filename_prefix="tav_soak/patched")


def tuned(name, seed):
    wf = patched(name, seed)
    wf["13"] = {"class_type": "TuneAVideoTune", "inputs": {
        "model": ["2", 0], "latent": ["11", 0], "positive": ["6", 0], "steps": 1, "learning_rate": 3e-5,
        "seed": seed, "trainable": "queries+temporal", "precision": "fp32", "gradient_checkpointing": False}}
    return put(put(wf, "8", model=["13", 0]), "10", filename_prefix="tav_soak/tuned")


def with_adapter(name, seed, adapter):
    wf = patched(name, seed)
    wf["15"] = {"class_type": "TuneAVideoLoadAdapter", "inputs": {"model": ["2", 0], "adapter_name": adapter}}
    return put(put(wf, "8", model=["15", 0]), "10", filename_prefix="tav_soak/adapter")


def long_clip(name, seed):
    wf = put(patched(name, seed), "11", batch_size=4)
    wf["16"] = {"class_type": "TuneAVideoLongClip", "inputs": {"model": ["2", 0], "chunk_frames": 2, "overlap": 1}}
    return put(put(wf, "8", model=["16", 0]), "10", filename_prefix="tav_soak/long")


def distinct_prompts(name, adapter):
    """(kind, prompt) for every prompt the soak draws from: five kinds, two variants each."""
    out = []
    for seed in (21, 22):
        out += [("image", plain(name, seed)), ("video", patched(name, seed, "window" if seed % 2 else "full")),
                ("video", tuned(name, seed)), ("video", with_adapter(name, seed, adapter)), ("video", long_clip(name, seed))]
    return out


def long_variant(kind, prompt):
    """The same prompt with a many-step sampler: a cancel at any drawn delay lands inside it on any machine."""
    return put(prompt, "4" if kind == "image" else "8", steps=LONG_STEPS)


def soak_order(count, rng):
    """Indices into the distinct prompts, never the same twice in a row (the cache would answer it)."""
    order = [rng.randrange(count)]
    while len(order) < PROMPTS:
        order.append(rng.choice([i for i in range(count) if i != order[-1]]))
    return order


def test_soak_mixed_prompts_with_cancels(server, random_checkpoint):
    name = Path(random_checkpoint).name
    adapter = valid_adapter(server, random_checkpoint).name
    prompts = distinct_prompts(name, adapter)
    alone = []
    for kind, prompt in prompts:  # each prompt alone: models unloaded and the execution cache reset first
        server.post("/free", {"unload_models": True, "free_memory": True})
        time.sleep(1.5)
        alone.append(result(server, kind, server.run_ok(prompt)))

    rng = random.Random(SEED)
    order = soak_order(len(prompts), rng)
    cancel_at = dict(zip(rng.sample(range(1, PROMPTS), CANCELS), (rng.uniform(0.0, 0.6) for _ in range(CANCELS))))
    started, rss, diffs, cancelled = time.time(), [], [], 0
    for step, index in enumerate(order):
        kind, prompt = prompts[index]
        prompt_id = server.queue(long_variant(kind, prompt) if step in cancel_at else prompt)
        if step in cancel_at:
            wait_until_running(server, prompt_id)
            time.sleep(cancel_at[step])
            assert server.post("/interrupt", {"prompt_id": prompt_id})[0] == 200
        entry = server.wait(prompt_id, timeout=300)
        if entry["status"]["status_str"] != "success":
            kinds = [m[0] for m in entry["status"]["messages"]]
            assert step in cancel_at and "execution_interrupted" in kinds, entry["status"]
            cancelled += 1
        else:
            got = result(server, kind, entry)
            diffs.append((index, mean_diff(got, alone[index]), int(np.abs(got.astype(int) - alone[index]).max())))
        rss.append(rss_mib(server))
    elapsed = time.time() - started
    print(f"soak: {PROMPTS} prompts in {elapsed:.0f}s, {cancelled} cancelled; RSS after the first "
          f"{rss[0]:.0f} MiB, after the last {rss[-1]:.0f} MiB, peak {max(rss):.0f} MiB")
    print("worst |soak - alone| per prompt (mean, max):",
          {i: max((d[1], d[2]) for d in diffs if d[0] == i) for i in sorted({d[0] for d in diffs})})
    assert cancelled == CANCELS, "every cancel must land inside its prompt"
    limits = [NOISE_TUNED if "13" in p else NOISE for _, p in prompts]
    assert all(mean <= limits[i] for i, mean, _ in diffs), diffs
    assert abs(rss[-1] - rss[0]) <= 0.05 * rss[0], f"server memory: {rss[0]:.0f} -> {rss[-1]:.0f} MiB"

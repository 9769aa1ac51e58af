"""scripts/toy_world/ -- a world small enough to train on a CPU, where an edit can be scored. build_toy_world.py
trains its checkpoint, toy_vae.py is its hand-made VAE, make_sample_clip.py renders the demo's clip; this script
runs scored Tune-A-Video edits on it, through the shipped workflow on a real ComfyUI server (docs/toy-world.md).

For each held-out source clip (one object moving, 8 frames; trajectories, colours and shapes used by no
test): workflows/api/tav_tune_and_edit_api.json tunes on the clip and its prompt, inverts it and samples
each edited prompt, with the toy settings (per-frame GroupNorm, stronger tuning, cfg 3, and three settings
past the paper: frame positions in the temporal attention, inversion to strength 0.8 and Plug-and-Play
feature injection; README, the toy world). In the same graphs: the same tuned model without feature
injection, and two baselines: the untuned, unpatched model editing each frame on its own (inversion per
frame, same strength, no injection), and Tune-A-Video without inversion (random start noise). Every result
is scored from its frames alone (sampling/toy_world.py: edit accuracy, motion error, colour/size spread,
background kept), next to the scores of a perfect edit through the VAE (the floor no method can beat).

    python scripts/toy_world/toy_world_edit.py                    # all 12 edits; table + strip in out/toy_world/
    python scripts/toy_world/toy_world_edit.py --fresh            # 12 more edits (used to choose the settings past the paper)
    python scripts/toy_world/toy_world_edit.py --unseen           # 12 more, run only with the final settings
    python scripts/toy_world/toy_world_edit.py --demo             # one edit, prints its scores and the video path
    python scripts/toy_world/toy_world_edit.py --checkpoint other.safetensors --tune-steps 100 --lr 1e-4 --cfg 7.5
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)
import build_toy_world  # noqa: E402
import comfy_client  # noqa: E402
import comfy_runtime  # noqa: E402
import cpu_threads  # noqa: E402
import edit_progress  # noqa: E402
from edit_report import IDEAL, METHODS, paired, table  # noqa: E402,F401  (the score tables)
import strip_png  # noqa: E402
import workflow_substitute  # noqa: E402

FRAMES, SIZE = 8, build_toy_world.FRAME_SIZE
WORKFLOW = comfy_runtime.PACK_DIR / "workflows" / "api" / "tav_tune_and_edit_api.json"
EDITS = [  # (source colour, shape, trajectory), edited prompts: colour, shape, both
    (("green", "ring", "arc"), ["a yellow ring", "a green circle", "a blue bar"]),
    (("blue", "bar", "zigzag"), ["a red bar", "a blue ring", "a yellow circle"]),
    (("yellow", "circle", "anti_diagonal"), ["a green circle", "a yellow bar", "a red ring"]),
    (("red", "ring", "circle"), ["a blue ring", "a red circle", "a green bar"]),
]
# 12 more, looked at only after the toy settings were chosen on EDITS: how far those settings carry. The
# settings past the paper (frame positions, inversion strength) were then chosen on these.
FRESH_EDITS = [
    (("red", "circle", "right_to_left"), ["a blue circle", "a red bar", "a green ring"]),
    (("yellow", "ring", "top_to_bottom"), ["a red ring", "a yellow circle", "a blue bar"]),
    (("blue", "circle", "diagonal"), ["a yellow circle", "a blue ring", "a red bar"]),
    (("green", "bar", "bottom_to_top"), ["a blue bar", "a green circle", "a yellow ring"]),
]
# 12 more, written down before any of them was run, after every toy setting was chosen: the final check.
UNSEEN_EDITS = [
    (("blue", "ring", "wave"), ["a green ring", "a blue circle", "a red bar"]),
    (("red", "bar", "left_to_right"), ["a yellow bar", "a red ring", "a blue circle"]),
    (("green", "circle", "back_and_forth"), ["a red circle", "a green bar", "a yellow ring"]),
    (("yellow", "bar", "drop"), ["a blue bar", "a yellow circle", "a green ring"]),
]
SCORE_FILES = {"held_out": "scores.json", "fresh": "scores_fresh.json", "unseen": "scores_unseen.json"}
def edit_graph(clip_dir: str, ckpt: str, source_prompt: str, edited: str, a) -> dict:
    """The shipped workflow with the toy settings, plus both baselines and a SaveImage per method."""
    p = workflow_substitute.substitute(json.loads(WORKFLOW.read_text()), video=clip_dir, positive=edited,
                                source_prompt=source_prompt, checkpoint=ckpt, frames=FRAMES, width=SIZE,
                                height=SIZE, steps=a.steps, cfg=a.cfg, tune_steps=a.tune_steps,
                                precision=a.precision, seed=a.seed, filename_prefix="toy_world/tune_edit")
    (load,) = workflow_substitute.nodes_of(p, "TuneAVideoLoadFrames")
    (tune,) = workflow_substitute.nodes_of(p, "TuneAVideoTune")
    (sampler,) = workflow_substitute.nodes_of(p, "TuneAVideoSampler")
    (invert,) = workflow_substitute.nodes_of(p, "TuneAVideoInvert")
    (apply,) = workflow_substitute.nodes_of(p, "TuneAVideoApplyAttention")
    p[load]["inputs"]["select_every_nth"] = 1
    # This UNet was trained on single frames: normalising a clip's frames together loses the object in
    # some frames (README, the toy world), so the toy setting normalises each frame on its own.
    p[apply]["inputs"]["frame_shared_norm"] = False
    p[apply]["inputs"]["temporal_position_encoding"] = a.position_encoding == "on"
    p[invert]["inputs"]["strength"] = a.strength  # every inverted method, the per-frame baseline too
    p[invert]["inputs"].update(feature_injection=a.feature_injection, injection_block=a.injection_block)
    p[tune]["inputs"].update(learning_rate=a.lr, seed=a.seed, gradient_checkpointing=False)
    if a.invert_with == "source":  # invert with the clip's own prompt (TAV inverts with ""): the edit keeps
        p[invert]["inputs"]["conditioning"] = p[tune]["inputs"]["positive"]  # the motion (README)
    s = p[sampler]["inputs"]
    ckpt_model = [workflow_substitute.nodes_of(p, "CheckpointLoaderSimple")[0], 0]
    vae = [ckpt_model[0], 2]
    decoded = {"tune_a_video": [workflow_substitute.nodes_of(p, "VAEDecode")[0], 0]}
    p["100"] = {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": FRAMES}}
    p["101"] = {"class_type": "TuneAVideoSampler", "inputs": {**s, "latent": ["100", 0]}}
    p["102"] = {"class_type": "VAEDecode", "inputs": {"samples": ["101", 0], "vae": vae}}
    decoded["no_inversion"] = ["102", 0]
    p["110"] = {"class_type": "TuneAVideoInvert",  # the untuned, unpatched model: no feature injection
                "inputs": {**p[invert]["inputs"], "model": ckpt_model, "feature_injection": 0.0}}
    p["111"] = {"class_type": "TuneAVideoSampler", "inputs": {**s, "model": ckpt_model, "latent": ["110", 0]}}
    p["112"] = {"class_type": "VAEDecode", "inputs": {"samples": ["111", 0], "vae": vae}}
    decoded["per_frame"] = ["112", 0]
    if a.demo or not a.feature_injection:  # the demo: the edit and both baselines
        return _save_all(p, decoded)
    p["132"] = {"class_type": "TuneAVideoInvert", "inputs": {**p[invert]["inputs"], "feature_injection": 0.0}}
    p["133"] = {"class_type": "TuneAVideoSampler", "inputs": {**s, "latent": ["132", 0]}}
    p["134"] = {"class_type": "VAEDecode", "inputs": {"samples": ["133", 0], "vae": vae}}
    decoded["no_injection"] = ["134", 0]
    return _save_all(p, decoded)


def _save_all(p: dict, decoded: dict) -> dict:
    for i, (method, link) in enumerate(decoded.items()):
        p[str(120 + i)] = {"class_type": "SaveImage", "inputs": {"images": link,
                                                                  "filename_prefix": f"toy_world/{method}"}}
    return p


def _frames(paths):
    import numpy as np
    import torch
    from PIL import Image

    return torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255)
                        for f in paths])


def write_clip(base_dir: Path, colour: str, shape: str, kind: str):
    """Render a source clip into the server's input folder; returns (frames, folder name)."""
    from PIL import Image

    source = build_toy_world.load_pack_modules()[0].render_clip(colour, shape, kind, FRAMES, SIZE)
    clip_dir = f"toy_{colour}_{shape}_{kind}"
    (base_dir / "input" / clip_dir).mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(source):
        Image.fromarray((frame * 255).round().byte().numpy()).save(base_dir / "input" / clip_dir / f"{i:04d}.png")
    return source, clip_dir


def edit_once(server, a, ckpt_name: str, source, clip_dir: str, colour: str, shape: str, kind: str,
              edited: str) -> tuple[dict, dict]:
    """One edit graph on the server; returns (scores per method + paths, decoded clips per method)."""
    toy_world = build_toy_world.load_pack_modules()[0]
    t0 = time.time()
    graph = edit_graph(clip_dir, ckpt_name, toy_world.prompt(colour, shape), edited, a)
    progress = edit_progress.PhaseProgress(graph, label=f"{edited}: ")
    entry = comfy_client.run_prompt(edit_progress.PatientServer(server), graph, 7200, progress)
    results = {"source": toy_world.prompt(colour, shape), "trajectory": kind, "edited": edited,
               "wall_s": round(time.time() - t0)}
    clips = {"source": source}
    for node in entry["outputs"].values():
        for item in node.get("images", []):
            path = server.base_dir / "output" / item["subfolder"] / item["filename"]
            method = item["filename"].split("_0")[0]
            if method in METHODS:
                clips.setdefault(method, []).append(path)
            elif item.get("format"):
                results["video"] = str(path)
    for method in [m for m in METHODS if m in clips]:
        clips[method] = _frames(sorted(clips[method]))
        results[method] = toy_world.score_edit(clips[method], source, *toy_world.parse_prompt(edited))
    results["ideal"] = ideal_scores(source, kind, edited)
    return results, clips


def ideal_scores(source, kind: str, edited: str) -> dict:
    """Scores of a perfect edit of `source` (IMAGE): the edited object drawn on its path, through the toy VAE.

    What no method can beat in this world (the VAE rounds edges differently at each position, so even this
    clip has some size spread); the toy VAE's reference functions, which the tests check against ComfyUI's.
    """
    import toy_vae

    toy_world = build_toy_world.load_pack_modules()[0]
    target = toy_world.parse_prompt(edited)
    perfect = toy_world.render_clip(*target, kind, FRAMES, SIZE)
    decoded = toy_vae.decode_reference(toy_vae.encode_reference(perfect))
    return toy_world.score_edit(decoded, source, *target)


def run(a) -> list[dict]:
    """Every edit of the chosen set (one with --demo) on a server it starts; scores JSON and strips in a.out."""
    import os

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    threads = cpu_threads.choose(a.threads, log, "toy_world_edit")
    ckpt = Path(a.checkpoint) if a.checkpoint else build_toy_world.build(log=log, threads=threads)
    named = {"held_out": EDITS, "fresh": FRESH_EDITS, "unseen": UNSEEN_EDITS}
    edits = [(EDITS[0][0], [a.prompt or EDITS[0][1][0]])] if a.demo else named[a.edits]
    scores = a.out / ("demo_scores.json" if a.demo else SCORE_FILES[a.edits])
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the server's torch threads (it inherits the environment)
    server = comfy_runtime.ComfyServer(a.base_dir, checkpoints=[ckpt],
                                       extra_args=["--deterministic", "--use-pytorch-cross-attention"])
    rows = []
    log(f"toy_world_edit: starting ComfyUI ({threads} thread(s)); its log: {server.log_path}")
    with server:
        for (colour, shape, kind), targets in edits:
            source, clip_dir = write_clip(a.base_dir, colour, shape, kind)
            for edited in targets:
                results, clips = edit_once(server, a, ckpt.name, source, clip_dir, colour, shape, kind, edited)
                record(rows, results, clips, scores, a.out / f"{clip_dir}__{edited.replace(' ', '_')}.png")
                log(summary_line(results))
    return rows


def record(rows: list, results: dict, clips: dict, scores: Path, strip: Path):
    """Save the edit's labelled strip (rows: source, then each method), then append the results (with the
    strip's path) to rows and write all rows to the scores JSON."""
    results["strip"] = strip_png.save_strip({k: clips[k] for k in ("source", *METHODS) if k in clips}, strip)
    rows.append(results)
    scores.write_text(json.dumps(rows, indent=1))


def summary_line(r) -> str:
    s = r["tune_a_video"]
    return (f"{r['source']} ({r['trajectory']}) -> {r['edited']}: edit accuracy {s['edit_accuracy']:.2f}, "
            f"motion error {s['motion_error_px']:.1f} px, background kept {s['background_kept']:.2f}"
            + (f"; video {r['video']}" if r.get("video") else ""))


def resolve_precision(choice: str) -> str:
    """--precision: auto is bf16 autocast on a CPU with bf16 instructions (0.8 s against 1.4 s of CPU per tuning
    step on this UNet), else fp32."""
    return ("bf16" if cpu_threads.fast_bf16() else "fp32") if choice == "auto" else choice


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", action="store_true", help="one edit only: a green ring on an arc")
    p.add_argument("--prompt", help="with --demo: the edited prompt (default 'a yellow ring')")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--fresh", dest="edits", action="store_const", const="fresh", default="held_out",
                       help="the 12 fresh edits (FRESH_EDITS) instead")
    which.add_argument("--unseen", dest="edits", action="store_const", const="unseen",
                       help="the 12 unseen edits (UNSEEN_EDITS: the final check) instead")
    p.add_argument("--checkpoint", help="a toy-world checkpoint (default: build or reuse the cached one)")
    # Toy settings (README, the toy world): TAV's 500 steps at 3e-5 and cfg 12.5 are for SD1.5 at 512 px
    p.add_argument("--tune-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-4, help="tuning learning rate")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="tuning precision (auto: bf16 autocast where the CPU has bf16 instructions, else fp32)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (inversion and sampling)")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--invert-with", choices=("source", "empty"), default="source",
                   help="the prompt DDIM inversion conditions on: the source clip's (default) or \"\" (TAV's)")
    p.add_argument("--position-encoding", choices=("on", "off"), default="on",
                   help="frame positions in the temporal attention (past the paper)")
    p.add_argument("--strength", type=float, default=0.8,
                   help="how far up the schedule to invert (1.0: Tune-A-Video's full inversion)")
    p.add_argument("--feature-injection", type=float, default=0.5,
                   help="share of sampling steps fed the source's decoder features (past the paper: "
                        "Plug-and-Play; above 0 adds a row without it, on the same tuned model; 0: off)")
    p.add_argument("--injection-block", type=int, default=2,
                   help="the decoder block injected (this UNet has 4; Plug-and-Play's 4 is for SD1.5's 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for the build and the server (default: one per free core)")
    p.add_argument("--base-dir", type=Path, default=comfy_runtime.PACK_DIR / "out" / "toy_world" / "comfy")
    a = p.parse_args(argv)
    if not 0.05 <= a.strength <= 1.0:
        p.error(f"--strength must be from 0.05 to 1.0 (Invert's range), got {a.strength}")
    if not 0.0 <= a.feature_injection <= 1.0:
        p.error(f"--feature-injection must be from 0.0 to 1.0 (Invert's range), got {a.feature_injection}")
    if a.demo and a.edits != "held_out":
        p.error(f"--demo and --{a.edits}: choose one")
    if a.prompt:
        if not a.demo:
            p.error("--prompt goes with --demo (the 12 held-out edits have their own prompts)")
        try:
            build_toy_world.load_pack_modules()[0].parse_prompt(a.prompt)
        except ValueError as e:
            p.error(f"--prompt: {e}")
    a.precision = resolve_precision(a.precision)
    a.base_dir = a.base_dir.resolve()
    a.out = a.base_dir.parent
    a.out.mkdir(parents=True, exist_ok=True)
    rows = run(a)
    print(table(rows))
    print(paired(rows))
    if a.demo:
        r = rows[0]
        print(f"\nSource clip: {r['source']} moving along an {r['trajectory']}; edited prompt: {r['edited']}")
        print(f"Strip (rows: source, {', '.join(v for k, v in METHODS.items() if k in r)}): {r['strip']}")
        if r.get("video"):
            print(f"Edited video: {r['video']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

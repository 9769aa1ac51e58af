"""The toy world: renderer and frame scores (exact), the constructed VAE through ComfyUI's own VAE class
(measured PSNR), and the checkpoint format through ComfyUI's loader (a 2-step build: format, not quality)."""
import math

import pytest
import torch

import tavlib

SIZE = 96


@pytest.fixture(scope="module")
def tw():
    return tavlib.pack_module("sampling.toy_world")


@pytest.fixture(scope="module")
def toy_vae():
    import toy_vae
    return toy_vae


def test_renderer_places_every_object_where_asked(tw):
    lo, hi = tw.position_range(SIZE)
    for colour in tw.COLOURS:
        for shape in tw.SHAPES:
            for centre in [(lo, lo), (hi, hi), (lo + 7.3, hi - 11.6)]:
                frame = tw.render([colour], [shape], [centre], SIZE)[0]
                found = tw.find_object(frame)
                assert (found["colour"], found["shape"]) == (colour, shape)
                assert math.dist(found["centre"], centre) < 0.6  # the area centroid, for every shape
                expected = tw.AREA_FACTOR[shape] * tw.object_size(SIZE) ** 2
                tolerance = 0.07 if shape == "bar" else 0.04  # the 15.4 px bar rasterises to 15 or 16 rows
                assert abs(found["area"] - expected) < tolerance * expected
                edge = torch.cat([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
                assert edge.max() == 0  # inside the frame, with a margin


def test_trajectories_and_prompts(tw):
    for kind in tw.TRAJECTORIES:
        path = tw.trajectory(kind, 8, SIZE)
        lo, hi = tw.position_range(SIZE)
        assert path.shape == (8, 2) and path.min() >= lo - 1e-4 and path.max() <= hi + 1e-4
    assert tw.trajectory("left_to_right", 8, SIZE)[:, 0].diff().min() > 0
    assert tw.parse_prompt("A Yellow ring, drifting") == ("yellow", "ring")
    with pytest.raises(ValueError, match="one colour"):
        tw.parse_prompt("a red blue circle")
    with pytest.raises(ValueError, match="unknown trajectory"):
        tw.trajectory("spiral", 8, SIZE)


def test_score_edit_exact_values(tw):
    source = tw.render_clip("red", "circle", "diagonal", 8, SIZE)
    same = tw.score_edit(source, source, "red", "circle")
    assert same == {"frames": 8, "edit_accuracy": 1.0, "colour_accuracy": 1.0, "shape_accuracy": 1.0,
                    "motion_error_px": 0.0, "colour_spread": 0.0, "size_spread": same["size_spread"],
                    "background_kept": 1.0}
    assert same["size_spread"] < 0.02
    edit = tw.render_clip("green", "bar", "diagonal", 8, SIZE)
    scores = tw.score_edit(edit, source, "green", "bar")
    assert scores["edit_accuracy"] == 1.0 and scores["motion_error_px"] < 0.6
    # one frame of the wrong colour, the object shifted 5 px, the background disturbed
    bad = edit.clone()
    bad[3] = tw.render(["blue"], ["bar"], [tw.trajectory("diagonal", 8, SIZE)[3]], SIZE)[0]
    s = tw.score_edit(bad, source, "green", "bar")
    assert (s["edit_accuracy"], s["colour_accuracy"], s["shape_accuracy"]) == (7 / 8, 7 / 8, 1.0)
    assert s["colour_spread"] > 0.2
    shifted = tw.render(["green"] * 8, ["bar"] * 8, tw.trajectory("diagonal", 8, SIZE) + torch.tensor([5.0, 0.0]), SIZE)
    assert tw.score_edit(shifted, source, "green", "bar")["motion_error_px"] == pytest.approx(5.0, abs=0.3)
    noisy = edit.clone()
    noisy[:, :10] = 0.5
    assert tw.score_edit(noisy, source, "green", "bar")["background_kept"] < 0.95
    empty = torch.zeros_like(edit)
    assert tw.score_edit(empty, source, "green", "bar")["motion_error_px"] == SIZE


def test_vae_round_trip_through_comfyui(tw, toy_vae, one_thread):
    """ComfyUI's VAE with the constructed fp16 weights computes the documented reference functions."""
    import comfy.sd

    vae = comfy.sd.VAE(sd={k: v.half() for k, v in toy_vae.toy_vae_state_dict().items()})
    g = torch.Generator().manual_seed(1)
    frames = tw.render(*tw.random_scenes(4, SIZE, g), SIZE)
    with torch.inference_mode():
        z = vae.encode(frames)
        assert torch.allclose(z * toy_vae.SCALE, toy_vae.encode_reference(frames), atol=2e-3)
        decoded = vae.decode(z)
    assert torch.allclose(decoded, toy_vae.decode_reference(z * toy_vae.SCALE), atol=2e-2)
    psnr = 10 * torch.log10(1 / ((decoded - frames) ** 2).mean((1, 2, 3)))
    assert psnr.min() > 21


def test_vae_psnr_and_recognisability(tw, toy_vae):
    g = torch.Generator().manual_seed(2)
    colours, shapes, centres = tw.random_scenes(120, SIZE, g)
    frames = tw.render(colours, shapes, centres, SIZE)
    decoded = toy_vae.decode_reference(toy_vae.encode_reference(frames))
    psnr = 10 * torch.log10(1 / ((decoded - frames) ** 2).mean((1, 2, 3)))
    assert psnr.mean() >= 25 and psnr.min() >= 20, (float(psnr.mean()), float(psnr.min()))
    found = [tw.find_object(f) for f in decoded]
    assert all((o["colour"], o["shape"]) == (c, s) for o, c, s in zip(found, colours, shapes))
    assert max(math.dist(o["centre"], c.tolist()) for o, c in zip(found, centres)) < 1.5


TINY = {"steps": 3, "batch": 16}  # two micro-batches per step: both workers have one


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """A 3-step build on one thread, its state kept (fp32 weights): (checkpoint, state file)."""
    import build_toy_world

    path = tmp_path_factory.mktemp("toy") / "toy.safetensors"
    build_toy_world.build(path=path, threads=1, save_every=1, keep_state=True, log=lambda s: None, **TINY)
    return path, path.with_name("toy.state.pt")


def _weights(state_path):
    return torch.load(state_path, weights_only=False)["unet"]


def test_build_is_bit_identical_on_any_thread_count(tiny_build, tmp_path):
    """Micro-batches on 1 or 2 worker threads, one intra-op thread each, summed in a fixed order: the same bits."""
    import build_toy_world

    path = tmp_path / "toy.safetensors"
    build_toy_world.build(path=path, threads=2, save_every=1, keep_state=True, log=lambda s: None, **TINY)
    one, two = _weights(tiny_build[1]), _weights(path.with_name("toy.state.pt"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in one.items() if k.startswith("out.2"))  # it trained


def test_interrupted_build_resumes_to_the_same_weights(tiny_build, tmp_path, monkeypatch):
    """Interrupted right after its step-2 save, the build leaves its state; the next build says it resumes at
    step 2 and ends bit-identical to the uninterrupted build (the checkpoint too)."""
    import build_toy_world
    import safetensors.torch
    import toy_train

    save = toy_train._save_state

    def save_then_interrupt(path, unet, opt, sched, g, step, *rest):
        save(path, unet, opt, sched, g, step, *rest)
        if step == 2:
            raise KeyboardInterrupt  # as Ctrl-C after the save
    monkeypatch.setattr(toy_train, "_save_state", save_then_interrupt)
    path = tmp_path / "toy.safetensors"
    with pytest.raises(KeyboardInterrupt):
        build_toy_world.build(path=path, threads=2, save_every=1, log=lambda s: None, **TINY)
    assert not path.exists() and torch.load(path.with_name("toy.state.pt"), weights_only=False)["step"] == 2
    monkeypatch.setattr(toy_train, "_save_state", save)
    logged = []
    build_toy_world.build(path=path, threads=1, save_every=1, keep_state=True, log=logged.append, **TINY)
    assert any("resuming the interrupted build at step 2/3" in line for line in logged), logged
    one, resumed = _weights(tiny_build[1]), _weights(path.with_name("toy.state.pt"))
    assert all(torch.equal(one[k], resumed[k]) for k in one)
    a, b = (safetensors.torch.load_file(str(f)) for f in (tiny_build[0], path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    build_toy_world.build(path=path, force=True, threads=1, log=logged.append, **TINY)  # force: from scratch
    assert not path.with_name("toy.state.pt").exists() and sum("resuming" in line for line in logged) == 1


def test_checkpoint_format_through_comfyui(tiny_build, one_thread):
    """A 3-step build (format only): ComfyUI detects SD15; CLIP Text Encode, KSampler and VAE run on it."""
    import comfy.sd
    import comfy.supported_models
    import nodes

    path = tiny_build[0]
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    assert type(model.model.model_config) is comfy.supported_models.SD15
    with torch.inference_mode():
        (cond,) = nodes.CLIPTextEncode().encode(clip, "a red circle")
        (latent,) = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)
        (out,) = nodes.KSampler().sample(model, 0, 2, 5.0, "ddim", "ddim_uniform", cond, cond, latent)
        (image,) = nodes.VAEDecode().decode(vae, out)
    assert image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(image).all()


def test_built_clip_tells_vocabulary_words_apart(tw, tiny_build, one_thread):
    """The built CLIP-L: the 7 words' token rows are large and mutually orthogonal (nothing else changes),
    so "a red circle" and "a red ring" differ clearly at the shape word, unlike with the random CLIP."""
    import build_toy_world
    import comfy.sd
    import random_models
    import safetensors.torch

    built = safetensors.torch.load_file(str(tiny_build[0]))
    base = safetensors.torch.load_file(str(random_models.random_checkpoint()))
    key = build_toy_world.TOKEN_EMBEDDING
    clips = {name: comfy.sd.load_state_dict_guess_config(sd, output_vae=False, output_model=False)[1]
             for name, sd in (("built", dict(built)), ("random", dict(base)))}
    words = [*tw.COLOURS, *tw.SHAPES]
    ids = build_toy_world.vocabulary_token_ids(clips["built"], words)
    rows = built[key][list(ids.values())].float()
    gram = rows @ rows.T / build_toy_world.VOCAB_NORM ** 2
    assert torch.allclose(gram, torch.eye(len(words)), atol=1e-2)
    changed = (built[key] != base[key]).any(1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(ids.values())
    assert all(torch.equal(built[k], base[k]) for k in base if k.startswith("cond_stage_model.") and k != key)
    cos = {}
    for name, clip in clips.items():
        ctx = build_toy_world.encode_texts(clip, ["a red circle", "a red ring"])
        cos[name] = float(torch.nn.functional.cosine_similarity(ctx[0, 3], ctx[1, 3], dim=0))  # the shape word
    assert cos["random"] > 0.9 and cos["built"] < 0.3, cos


def test_object_weights_mark_the_object_cells(tw):
    import toy_train

    frames = tw.render(["red", "blue"], ["bar", "circle"], [(30.0, 30.0), (60.0, 50.0)], SIZE)
    w = toy_train.object_weights(frames, 3.0)
    assert w.shape == (2, 1, SIZE // 8, SIZE // 8)
    assert w.min() == 1 and w.max() == 4  # 1 on plain background, 1 + 3 on cells the object fills
    assert w[0, 0, 3, 3] == 4 and w[0, 0, 11, 11] == 1 and w[1, 0, 6, 7] == 4 and w[1, 0, 0, 0] == 1


def test_held_out_fresh_and_unseen_edits_are_distinct_clips_with_each_kind_of_edit(tw):
    """Each source clip is edited in colour only, shape only and both; the three sets (settings chosen on the first,
    the settings past the paper on the second, the third run only with the final settings) share no source clip
    and no trajectory."""
    import toy_world_edit

    sets = {"held_out": toy_world_edit.EDITS, "fresh": toy_world_edit.FRESH_EDITS,
            "unseen": toy_world_edit.UNSEEN_EDITS}
    for name, edits in sets.items():
        assert len(edits) == 4 and sum(len(targets) for _, targets in edits) == 12, name
        for (colour, shape, kind), targets in edits:
            assert kind in tw.TRAJECTORIES
            edited = [tw.parse_prompt(t) for t in targets]
            assert sorted((c != colour, s != shape) for c, s in edited) == [(False, True), (True, False), (True, True)]
    kinds = {name: {kind for (_, _, kind), _ in edits} for name, edits in sets.items()}
    sources = {name: {(c, s) for (c, s, _), _ in edits} for name, edits in sets.items()}
    for a, b in (("held_out", "fresh"), ("held_out", "unseen"), ("fresh", "unseen")):
        assert not kinds[a] & kinds[b] and not sources[a] & sources[b], (a, b)
    for flag in ("--fresh", "--unseen"):
        with pytest.raises(SystemExit):
            toy_world_edit.main(["--demo", flag])
    for bad in (["--fresh", "--unseen"], ["--strength", "1.5"], ["--strength", "0"],
                ["--feature-injection", "1.5"]):
        with pytest.raises(SystemExit):
            toy_world_edit.main(bad)


def test_ideal_edit_is_the_floor_every_method_is_compared_with(tw):
    """The perfect edit through the VAE: every frame right and on the source's path; its spread is the
    rasterisation's and the VAE's rounding alone (small, not zero); the score table prints it as a row."""
    import toy_world_edit

    (colour, shape, kind), targets = toy_world_edit.EDITS[1]
    rows = []
    source = tw.render_clip(colour, shape, kind, toy_world_edit.FRAMES, toy_world_edit.SIZE)
    for edited in targets:
        ideal = toy_world_edit.ideal_scores(source, kind, edited)
        assert ideal["edit_accuracy"] == 1.0 and ideal["background_kept"] == 1.0
        assert ideal["motion_error_px"] < 1.0 and ideal["colour_spread"] < 0.01
        assert 0 < ideal["size_spread"] < 0.05
        rows.append({"source": tw.prompt(colour, shape), "edited": edited, "ideal": ideal})
    table = toy_world_edit.table(rows)
    assert f"| {toy_world_edit.IDEAL} | all (3) |" in table


def test_paired_consistency_line_compares_edit_by_edit():
    import toy_world_edit

    spreads = [(0.05, 0.04), (0.03, 0.06)]  # (Tune-A-Video, per-frame) size spread of two edits
    rows = [{"tune_a_video": {"colour_spread": 0.0, "size_spread": t},
             "per_frame": {"colour_spread": 0.0, "size_spread": p}} for t, p in spreads]
    colour, size = toy_world_edit.paired(rows).splitlines()
    assert size == ("size_spread, tune_a_video minus per_frame, per edit: mean -0.0100, median -0.0100, "
                    "lower in 1 of 2")
    assert colour.endswith("mean +0.0000, median +0.0000, lower in 0 of 2")


def test_demo_records_the_labelled_strip_in_its_scores_and_reports_each_phase(tiny_build, tmp_path, monkeypatch,
                                                                              capsys):
    """The demo on a real server (the tiny build, 1 tuning step, 2 DDIM steps): the scores JSON names the
    strip (it was written before the strip's path was set), the strip has a label margin with text in every
    row, and the server's tuning, inversion and sampling progress reaches the terminal."""
    import json

    import numpy as np
    import strip_png
    import toy_world_edit
    from PIL import Image

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the demo sets it for its server; restored afterwards
    base = tmp_path / "comfy"
    assert toy_world_edit.main(["--demo", "--checkpoint", str(tiny_build[0]), "--tune-steps", "1", "--steps", "2",
                                "--base-dir", str(base), "--threads", "1"]) == 0
    (row,) = json.loads((tmp_path / "demo_scores.json").read_text())
    strip = np.asarray(Image.open(row["strip"]).convert("L"))
    rows = ["source", *(m for m in toy_world_edit.METHODS if m in row)]
    assert strip.shape == (SIZE * len(rows), strip_png.MARGIN + toy_world_edit.FRAMES * SIZE)
    for i in range(len(rows)):  # white label text in every row's margin
        assert (strip[i * SIZE:(i + 1) * SIZE, :strip_png.MARGIN] > 200).sum() > 20, rows[i]
    err = capsys.readouterr().err
    for phase in ("tuning step 1/1", "inversion step", "sampling step", "thread(s)"):
        assert phase in err, phase


def test_edit_precision_is_bf16_only_on_cpus_with_bf16_instructions(tmp_path, monkeypatch):
    """--precision auto: bf16 autocast where /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (faster there), else
    fp32 (bf16 is emulated and slower); the choice reaches the Tune node of the edit graph."""
    import argparse

    import cpu_threads
    import toy_world_edit

    info = tmp_path / "cpuinfo"
    for flags, fast in (("fpu sse avx2 avx512f", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_bf16", True)):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert cpu_threads.fast_bf16(str(info)) is fast, flags
    assert cpu_threads.fast_bf16(str(tmp_path / "missing")) is False
    for fast, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(cpu_threads, "fast_bf16", lambda fast=fast: fast)
        assert toy_world_edit.resolve_precision("auto") == want
        assert toy_world_edit.resolve_precision("fp32") == "fp32"
    a = argparse.Namespace(steps=2, cfg=3.0, tune_steps=1, precision="bf16", seed=0, position_encoding="on",
                           strength=0.8, feature_injection=0.5, injection_block=2, lr=2e-4, invert_with="source",
                           demo=True)
    graph = toy_world_edit.edit_graph("clip", "toy.safetensors", "a green ring", "a yellow ring", a)
    (tune,) = [n for n in graph.values() if n["class_type"] == "TuneAVideoTune"]
    assert tune["inputs"]["precision"] == "bf16"


def test_threads_follow_the_cores_busy_now_not_a_lagging_load_average(tmp_path, monkeypatch):
    """Free cores = cores - min(1-minute load average, cores busy now from /proc/stat): right after a job ends
    (the demo's environment install) the average still says busy, the cores are idle."""
    import cpu_threads

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0 0 0 0 0 0\n")
    before = cpu_threads._cpu_times(str(stat))
    stat.write_text("cpu  250 0 150 1000 0 0 0 0 0 0\n")  # +200 busy, +200 idle jiffies over 2 cores: 1 busy
    after = cpu_threads._cpu_times(str(stat))
    assert before == (800, 1000) and after == (1000, 1400)
    assert cpu_threads.busy_cores(before, after, 2) == pytest.approx(1.0)
    assert cpu_threads._cpu_times(str(tmp_path / "missing")) is None
    assert [cpu_threads.free_cores(2, x) for x in (0.0, 0.4, 0.6, 1.5, 3.0)] == [2, 2, 1, 1, 1]
    times = iter([(0, 0), (180, 200)])  # 10 % of 2 cores busy over the sample
    monkeypatch.setattr(cpu_threads, "_cpu_times", lambda: next(times))
    monkeypatch.setattr(cpu_threads, "load", lambda: 1.22)  # the average still counts a finished job
    assert cpu_threads.current_load(2, interval=0) == pytest.approx(0.2)
    monkeypatch.setattr(cpu_threads, "_cpu_times", lambda: None)  # no /proc/stat: the average
    assert cpu_threads.current_load(2, interval=0) == 1.22

"""The shipped workflows against a real ComfyUI: UI files load, API files run, the runner CLI works."""
import json
import subprocess
import sys
from pathlib import Path

import av
import pytest

import api_to_ui
import make_sample_clip
import run_workflow
import workflow_substitute

PACK_DIR = Path(__file__).resolve().parent.parent
API_FILES = sorted((PACK_DIR / "workflows" / "api").glob("*_api.json"))
SMALL = dict(frames=4, steps=2, width=64, height=64)  # seconds per run on 2 CPU cores
SMALL_TUNE = dict(tune_steps=2, precision="fp32")  # for workflows with TuneAVideoTune (fp32: fastest on CPU)


def _ids(paths):
    return [p.name for p in paths]


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


@pytest.fixture(scope="module")
def sample_clip(tmp_path_factory):
    # 16 frames: enough for 4 frames at the workflows' select_every_nth=2
    return make_sample_clip.make_sample_clip(tmp_path_factory.mktemp("clip") / "tav_sample.mp4",
                                             seconds=1, fps=16, size=128)


def decode(path):
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return frames


def test_shipped_workflows_come_in_pairs():
    assert {p.name for p in API_FILES} >= {"tav_video_edit_api.json", "tav_text_to_video_api.json",
                                           "tav_tune_and_edit_api.json"}
    for api in API_FILES:
        assert api_to_ui.ui_path(api).is_file(), f"{api.name} has no UI twin; run scripts/client/api_to_ui.py"


# --- UI files against the real /object_info -------------------------------------------------

def _accepts(input_type, link_type):
    return "*" in (input_type, link_type) or link_type in str(input_type).split(",")


def _spec(info, name):
    for group in ("required", "optional"):
        if name in info["input"].get(group, {}):
            return info["input"][group][name]
    raise KeyError(name)


@pytest.mark.parametrize("api_path", API_FILES, ids=_ids(API_FILES))
def test_ui_workflow_matches_object_info(api_path, object_info):
    ui = json.loads(api_to_ui.ui_path(api_path).read_text())
    assert ui["version"] == 0.4
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]), "duplicate node ids"
    missing = sorted({n["type"] for n in ui["nodes"]} - set(object_info))
    assert not missing, f"node types the server does not know: {missing}"
    assert ui["last_node_id"] >= max(nodes)
    assert ui["last_link_id"] >= max(link[0] for link in ui["links"])

    seen = set()
    for link_id, src, src_slot, dst, dst_slot, ltype in ui["links"]:
        assert link_id not in seen
        seen.add(link_id)
        assert src in nodes and dst in nodes, f"link {link_id} joins missing nodes"
        out = nodes[src]["outputs"][src_slot]
        assert out["type"] == ltype == object_info[nodes[src]["type"]]["output"][src_slot]
        assert link_id in out["links"]
        slot = nodes[dst]["inputs"][dst_slot]
        assert slot["link"] == link_id
        server_type = _spec(object_info[nodes[dst]["type"]], slot["name"])[0]
        assert slot["type"] == ("COMBO" if isinstance(server_type, list) else server_type)
        assert _accepts(slot["type"], ltype), f"link {link_id}: {ltype} into {slot['type']}"
    for node in ui["nodes"]:  # every socket's link is in the links array and vice versa
        assert {s["link"] for s in node["inputs"] if s["link"] is not None} <= seen
        for out in node["outputs"]:
            assert set(out["links"] or []) <= seen

    for node in ui["nodes"]:
        info = object_info[node["type"]]
        required = [(name, spec) for group in ("required", "optional")
                    for name, spec in info["input"].get(group, {}).items()]
        # frontend 1.32: one value per widget input, + "control after generate" after a seed INT,
        # + the upload button's value for a media upload combo
        expected = 0
        for name, spec in required:
            opts = spec[1] if len(spec) > 1 and spec[1] else {}
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            if kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") and not opts.get("forceInput"):
                expected += 1
                expected += bool(kind == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")))
                expected += bool(kind == "COMBO" and (opts.get("video_upload") or opts.get("image_upload")))
        assert len(node["widgets_values"]) == expected, node["type"]
        for (name, kind), value in zip(api_to_ui.widget_layout(info), node["widgets_values"]):
            spec = _spec(info, name)
            opts = spec[1] if len(spec) > 1 else {}
            if kind in ("INT", "FLOAT"):
                assert isinstance(value, (int, float)) and opts.get("min", value) <= value <= opts.get("max", value)
            elif kind == "COMBO" and name not in ("ckpt_name", "video"):  # file lists depend on the machine
                assert value in spec[0], f"{node['type']}.{name}={value!r}"


@pytest.mark.parametrize("api_path", API_FILES, ids=_ids(API_FILES))
def test_ui_workflow_is_generated_from_api_workflow(api_path, object_info):
    ui_path = api_to_ui.ui_path(api_path)
    regenerated = api_to_ui.api_to_ui(json.loads(api_path.read_text()), object_info,
                                      json.loads(ui_path.read_text())["id"])
    assert json.loads(ui_path.read_text()) == json.loads(json.dumps(regenerated)), \
        f"{ui_path.name} is stale: python scripts/client/api_to_ui.py workflows/api/*_api.json"


# --- substitution (no server) ----------------------------------------------------------------

def test_substitute_finds_nodes_by_type():
    api = json.loads((PACK_DIR / "workflows" / "api" / "tav_video_edit_api.json").read_text())
    # share one empty-prompt encoder between inversion and negative, under unusual ids
    api = {f"n{k}": {**v, "inputs": {name: ([f"n{x[0]}", x[1]] if isinstance(x, list) else x)
                                     for name, x in v["inputs"].items()}} for k, v in api.items()}
    sampler = workflow_substitute.nodes_of(api, "TuneAVideoSampler")[0]
    invert = workflow_substitute.nodes_of(api, "TuneAVideoInvert")[0]
    api[invert]["inputs"]["conditioning"] = list(api[sampler]["inputs"]["negative"])
    out = workflow_substitute.substitute(api, positive="a cat", source_prompt="a ball", negative="blurry",
                                  seed=5, steps=3, frames=6, width=96, height=80, video="x.mp4")

    def text(node, name):
        return out[out[node]["inputs"][name][0]]["inputs"]["text"]

    assert (text(sampler, "positive"), text(sampler, "negative"), text(invert, "conditioning")) == \
        ("a cat", "blurry", "a ball")
    assert out[sampler]["inputs"]["steps"] == out[invert]["inputs"]["steps"] == 3
    frames = out[workflow_substitute.nodes_of(out, "TuneAVideoLoadFrames")[0]]["inputs"]
    assert (frames["video"], frames["frame_load_cap"], frames["width"], frames["height"]) == ("x.mp4", 6, 96, 80)
    assert api[sampler]["inputs"]["seed"] == 33, "substitute must not modify its input"
    t2v = json.loads((PACK_DIR / "workflows" / "api" / "tav_text_to_video_api.json").read_text())
    with pytest.raises(run_workflow.WorkflowError, match="TuneAVideoLoadFrames"):
        workflow_substitute.substitute(t2v, video="x.mp4")
    latent = workflow_substitute.substitute(t2v, frames=5)[workflow_substitute.nodes_of(t2v, "EmptyLatentImage")[0]]
    assert latent["inputs"]["batch_size"] == 5
    with pytest.raises(run_workflow.WorkflowError, match="TuneAVideoTune"):
        workflow_substitute.substitute(t2v, tune_steps=3)


def test_substitute_tuning_workflow():
    api = json.loads((PACK_DIR / "workflows" / "api" / "tav_tune_and_edit_api.json").read_text())
    out = workflow_substitute.substitute(api, source_prompt="a ball", steps=3, tune_steps=7, precision="fp32")
    tune = out[workflow_substitute.nodes_of(out, "TuneAVideoTune")[0]]["inputs"]
    invert = out[workflow_substitute.nodes_of(out, "TuneAVideoInvert")[0]]["inputs"]
    sampler = out[workflow_substitute.nodes_of(out, "TuneAVideoSampler")[0]]["inputs"]
    assert (tune["steps"], tune["precision"], tune["prompt_text"]) == (7, "fp32", "a ball")
    assert out[tune["positive"][0]]["inputs"]["text"] == "a ball"
    assert out[invert["conditioning"][0]]["inputs"]["text"] == ""  # TAV inverts with the empty prompt
    assert sampler["steps"] == invert["steps"] == 3
    assert tune["model"] == api[workflow_substitute.nodes_of(api, "TuneAVideoTune")[0]]["inputs"]["model"]
    assert invert["model"][0] == sampler["model"][0] == workflow_substitute.nodes_of(out, "TuneAVideoTune")[0]
    kept = workflow_substitute.substitute(api, steps=3)[workflow_substitute.nodes_of(api, "TuneAVideoTune")[0]]["inputs"]
    assert (kept["steps"], kept["learning_rate"], kept["precision"]) == (500, 3e-5, "bf16")


# --- running them on the real server ---------------------------------------------------------

@pytest.mark.parametrize("api_path", API_FILES, ids=_ids(API_FILES))
def test_api_workflow_runs(api_path, server, sample_clip, random_checkpoint):
    api = json.loads(api_path.read_text())
    client = run_workflow.Client(server.url)
    video = client.upload(sample_clip) if workflow_substitute.nodes_of(api, "TuneAVideoLoadFrames") else None
    tunes = bool(workflow_substitute.nodes_of(api, "TuneAVideoTune"))
    prompt = workflow_substitute.substitute(api, video=video, checkpoint=random_checkpoint.name, **SMALL,
                                     **(SMALL_TUNE if tunes else {}))
    entry = run_workflow.run_prompt(client, prompt, timeout=900)
    files = run_workflow.output_files(entry)
    adapters = [f for f in files if f["type"] == "tune_a_video"]
    videos = [f for f in files if f["type"] == "output"]
    assert len(adapters) == tunes and len(videos) == 1, files
    for item in adapters:
        located = Path(run_workflow.locate(client, item, None, server.base_dir))
        assert located == (server.base_dir / "models" / "tune_a_video" / item["filename"]).resolve()
        assert located.suffix == ".safetensors" and located.stat().st_size > 0
    path = server.base_dir / "output" / videos[0]["subfolder"] / videos[0]["filename"]
    frames = decode(path)
    assert len(frames) == SMALL["frames"]
    assert frames[0].shape == (SMALL["height"], SMALL["width"], 3)


def _runner(*args, timeout=900):
    return subprocess.run([sys.executable, str(PACK_DIR / "scripts" / "client" / "run_workflow.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=PACK_DIR)


def test_runner_cli_prints_output_path(server, sample_clip, random_checkpoint):
    res = _runner(PACK_DIR / "workflows" / "api" / "tav_video_edit_api.json", "--server", server.url,
                  "--video", sample_clip, "--checkpoint", random_checkpoint.name, "--prompt", "a red ball",
                  "--seed", 7, "--frames", 3, "--steps", 1, "--width", 64, "--height", 64)
    assert res.returncode == 0, res.stderr
    assert "Tune-A-Video Sampler" in res.stderr  # progress
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.is_absolute() and path.is_file() and path.is_relative_to((server.base_dir / "output").resolve())
    assert len(decode(path)) == 3


def test_runner_cli_fails_with_node_error(server):
    res = _runner(PACK_DIR / "workflows" / "api" / "tav_text_to_video_api.json", "--server", server.url,
                  "--checkpoint", "no_such_model.safetensors", "--steps", 1, timeout=120)
    assert res.returncode == 1
    assert "ckpt_name" in res.stderr and "no_such_model.safetensors" in res.stderr, res.stderr
    assert res.stdout == ""


# --- the toy world's scored edit graph (scripts/toy_world/toy_world_edit.py) --------------------------------

def test_toy_world_edit_graph_runs_every_method(server, random_checkpoint):
    import argparse

    import torch
    import toy_world_edit

    a = argparse.Namespace(demo=False, steps=2, cfg=3.0, tune_steps=2, lr=1e-4, seed=0, invert_with="source",
                           position_encoding="on", strength=0.5, feature_injection=0.8, injection_block=2,
                           precision="fp32")
    (colour, shape, kind), targets = toy_world_edit.EDITS[0]
    source, clip_dir = toy_world_edit.write_clip(server.base_dir, colour, shape, kind)
    results, clips = toy_world_edit.edit_once(server, a, random_checkpoint.name, source, clip_dir, colour,
                                              shape, kind, targets[0])
    assert set(clips) == {"source", *toy_world_edit.METHODS}
    for method in toy_world_edit.METHODS:
        assert clips[method].shape == (toy_world_edit.FRAMES, toy_world_edit.SIZE, toy_world_edit.SIZE, 3)
        assert 0 <= results[method]["edit_accuracy"] <= 1
    assert results["ideal"]["edit_accuracy"] == 1.0  # the floor row: the perfect edit, not a model's
    # The same tuned model and inversion; only the feature injection differs
    assert not torch.equal(clips["tune_a_video"], clips["no_injection"])

    def nodes(**change):
        graph = toy_world_edit.edit_graph(clip_dir, "x.safetensors", "a red ring", "a red bar",
                                          argparse.Namespace(**{**vars(a), **change}))
        return lambda kind, key: [n["inputs"][key] for n in graph.values() if n["class_type"] == kind]
    full = nodes()
    assert full("TuneAVideoApplyAttention", "temporal_position_encoding") == [True]
    assert full("TuneAVideoInvert", "strength") == [0.5] * 3  # both Tune-A-Video rows and the per-frame baseline
    assert sorted(full("TuneAVideoInvert", "feature_injection")) == [0.0, 0.0, 0.8]  # per-frame: never
    assert set(full("TuneAVideoInvert", "injection_block")) == {2}
    assert "toy_world/no_injection" in full("SaveImage", "filename_prefix")
    assert "toy_world/no_injection" not in nodes(feature_injection=0.0)("SaveImage", "filename_prefix")
    demo = nodes(demo=True)
    assert demo("TuneAVideoApplyAttention", "frame_shared_norm") == [False]  # the demo runs the toy setting only
    assert demo("TuneAVideoApplyAttention", "temporal_position_encoding") == [True]
    assert nodes(position_encoding="off")("TuneAVideoApplyAttention", "temporal_position_encoding") == [False]

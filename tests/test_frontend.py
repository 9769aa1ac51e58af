"""The real ComfyUI frontend in headless Chromium against the real server with this pack.

One browser session (tests/browser/frontend_check.mjs, playwright-core driving Debian's chromium)
checks: every node of the pack in the Node Library under its display name; every shipped UI workflow
loading with all node types known, every link intact and no missing-nodes dialog; the text-to-video
workflow, shrunk, queued with the Run button, finishing with its video preview on the page; one node's
help page (web/docs/) in the node documentation panel; every template opened from the Templates browser.
Without a browser: the server serves every help page and lists exactly the UI graphs as templates.
Screenshots go to test-artifacts/frontend/. scripts/env/setup_browser.sh (run by scripts/test.sh) installs chromium and playwright-core;
without them these tests fail (they never skip).
"""
import json
import os
import random
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

import random_models

PACK_DIR = Path(__file__).resolve().parent.parent
SCRIPT = PACK_DIR / "tests" / "browser" / "frontend_check.mjs"
NODE_PREFIX = PACK_DIR / ".cache" / "node"
ARTIFACTS = PACK_DIR / "test-artifacts" / "frontend"
UI_WORKFLOWS = sorted(p for p in (PACK_DIR / "workflows").glob("*.json"))
CATEGORY = "Tune-A-Video"
RUN_WORKFLOW = "tav_text_to_video.json"
RUN_SIZE = dict(width=64, height=64, frames=4, steps=2)
RUN_PREFIX = "TuneAVideo/frontend_test"
PACK_FOLDER = "comfyui-tune-a-video"  # the pack's folder name in the test server's custom_nodes
HELP_NODE = "TuneAVideoInvert"
HELP_TEXT = "Sampling that noise with an edited prompt"  # in its help page, not in its DESCRIPTION
HELP_IMAGE = "toy_world_edit.png"
SESSION_S = 420  # the whole browser session; on 2 busy cores it takes about 2-4 min
SETUP_HINT = "run scripts/env/setup_browser.sh (as root it installs Debian's chromium and playwright-core into .cache/node)"


def _partial(work):
    """The phases a timed-out session finished (its result file is written after every phase)."""
    try:
        result = json.loads((work / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return {"timings_ms": result.get("timings_ms"),
            "phases": {k: v.get("ok") or v.get("error", "")[:300] for k, v in result.get("phases", {}).items()}}


def _browser_tools():
    """(node, chromium) or pytest.fail with what is missing: these tests must not skip."""
    chromium = os.environ.get("TAV_CHROMIUM", "/usr/bin/chromium")
    node = shutil.which("node")
    problems = []
    if not (os.path.isfile(chromium) and os.access(chromium, os.X_OK)):
        problems.append(f"no Chromium at {chromium} (set TAV_CHROMIUM to use another)")
    if not node:
        problems.append("no `node` on PATH (Node.js >= 20)")
    if not (NODE_PREFIX / "node_modules" / "playwright-core" / "package.json").is_file():
        problems.append(f"playwright-core is not installed in {NODE_PREFIX}")
    if problems:
        pytest.fail("frontend test cannot start a browser: " + "; ".join(problems) + f". Fix: {SETUP_HINT}.",
                    pytrace=False)
    return node, chromium


@pytest.fixture(scope="module")
def pack_nodes(server):
    info = server.get("/object_info")
    nodes = [{"type": name, "display_name": spec["display_name"], "category": spec["category"]}
             for name, spec in info.items()
             if spec.get("category", "").split("/")[0] == CATEGORY]
    ours = {name for name, spec in info.items() if "tune-a-video" in spec.get("python_module", "").lower()}
    assert ours, "the server lists no node of this pack"
    assert ours == {n["type"] for n in nodes}, \
        f"pack nodes outside the {CATEGORY} category: {sorted(ours - {n['type'] for n in nodes})}"
    return nodes


@pytest.fixture(scope="module")
def frontend(server, pack_nodes, tmp_path_factory):
    """Run the browser session once for this module; returns its JSON result."""
    node, chromium = _browser_tools()
    work = tmp_path_factory.mktemp("frontend")
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    run_graph = json.loads((PACK_DIR / "workflows" / RUN_WORKFLOW).read_text())
    seed = random.randrange(1, 2**31)  # a fresh seed: ComfyUI would otherwise reuse a cached result
    widgets = [
        ["CheckpointLoaderSimple", "ckpt_name", random_models.CHECKPOINT_NAME],
        ["EmptyLatentImage", "width", RUN_SIZE["width"]],
        ["EmptyLatentImage", "height", RUN_SIZE["height"]],
        ["EmptyLatentImage", "batch_size", RUN_SIZE["frames"]],
        ["TuneAVideoSampler", "steps", RUN_SIZE["steps"]],
        ["TuneAVideoSampler", "seed", seed],
        ["TuneAVideoSaveVideo", "filename_prefix", RUN_PREFIX],
    ]
    config = {
        "url": server.url + "/",
        "chromium": chromium,
        "node_prefix": str(NODE_PREFIX),
        "artifacts": str(ARTIFACTS),
        "result": str(work / "result.json"),
        "nodes": pack_nodes,
        "workflows": [{"name": p.name, "graph": json.loads(p.read_text())} for p in UI_WORKFLOWS],
        "run": {"name": RUN_WORKFLOW, "graph": run_graph, "widgets": widgets,
                "output_type": "TuneAVideoSaveVideo", "timeout_ms": 150_000},
        "help": {"type": HELP_NODE, "text": HELP_TEXT, "image": HELP_IMAGE},
        "templates": {"module": PACK_FOLDER, "names": [p.stem for p in UI_WORKFLOWS]},
    }
    (work / "config.json").write_text(json.dumps(config))
    try:
        proc = subprocess.run([node, str(SCRIPT), str(work / "config.json")], capture_output=True,
                              text=True, timeout=SESSION_S, cwd=PACK_DIR)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the browser session did not end within {SESSION_S} s: {e.stdout}\n{e.stderr}"
                    f"\nphases so far: {_partial(work)}", pytrace=False)
    result_path = work / "result.json"
    if not result_path.is_file():
        pytest.fail(f"the browser session gave no result (exit {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", pytrace=False)
    result = json.loads(result_path.read_text())
    (ARTIFACTS / "result.json").write_text(json.dumps(result, indent=1))
    result["_log"] = f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    result["_server"] = server
    return result


def _phase(frontend, name):
    assert "fatal" not in frontend, f"browser session failed: {frontend['fatal']}\n{frontend['_log']}"
    startup = frontend["phases"].get("startup", {})
    assert startup.get("ok"), f"the frontend did not load: {startup.get('error')}\n{frontend['_log']}"
    out = frontend["phases"].get(name)
    assert out is not None, f"phase {name} did not run\n{frontend['_log']}"
    assert out["ok"], f"{name}: {out.get('error')} (screenshot: {out.get('screenshot')})"
    return out


def test_browser_tools_installed():
    """A clear failure (not a skip) where setup could not install the browser."""
    _browser_tools()


def test_every_pack_node_is_in_the_node_library(frontend, pack_nodes):
    out = _phase(frontend, "node_library")
    assert len(pack_nodes) >= 5
    not_found = {n["display_name"]: out["found"].get(n["type"]) for n in pack_nodes
                 if out["found"].get(n["type"]) != {"search": True, "tree": True}}
    assert not not_found, f"nodes not findable in the Node Library (search / category tree): {not_found}"
    assert sorted(out["listed"] or []) == sorted(n["display_name"] for n in pack_nodes), \
        f"the {CATEGORY} folder lists {out['listed']}"


# --- what the server hands the frontend: help pages and templates (no browser needed) ---------------

def _get(server, path):
    """(status, content type, body bytes) of a GET on the real server."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), b""


def test_server_serves_each_node_help_page_and_its_images(server, pack_nodes):
    """GET /extensions/<pack folder>/docs/<Node>.md: the URL the frontend's node help fetches."""
    assert (server.base_dir / "custom_nodes" / PACK_FOLDER).resolve() == PACK_DIR
    for node in pack_nodes:
        status, _, body = _get(server, f"/extensions/{PACK_FOLDER}/docs/{node['type']}.md")
        assert status == 200 and body == (PACK_DIR / "web" / "docs" / f"{node['type']}.md").read_bytes(), node["type"]
    status, kind, body = _get(server, f"/extensions/{PACK_FOLDER}/docs/toy_world_edit.png")
    assert status == 200 and kind == "image/png" and body[:4] == b"\x89PNG"
    assert _get(server, f"/extensions/{PACK_FOLDER}/docs/NoSuchNode.md")[0] == 404  # control


def test_template_listing_holds_only_the_ui_graphs_with_thumbnails(server):
    """/api/workflow_templates is what the Templates browser lists for custom nodes."""
    status, _, body = _get(server, "/api/workflow_templates")
    assert status == 200
    listed = sorted(json.loads(body).get(PACK_FOLDER, []))
    assert listed == [p.stem for p in UI_WORKFLOWS], listed
    for name in listed:
        status, _, graph = _get(server, f"/api/workflow_templates/{PACK_FOLDER}/{name}.json")
        assert status == 200 and "nodes" in json.loads(graph), name
        status, kind, image = _get(server, f"/api/workflow_templates/{PACK_FOLDER}/{name}.jpg")
        assert status == 200 and kind == "image/jpeg" and image[:3] == b"\xff\xd8\xff", name


def test_node_help_opens_in_the_documentation_panel(frontend, server):
    """The user's way in: select the node, press the info button; the page's text and picture show."""
    page = (PACK_DIR / "web" / "docs" / f"{HELP_NODE}.md").read_text()
    assert HELP_TEXT in " ".join(page.split()) and f"]({HELP_IMAGE})" in page
    description = server.get("/object_info")[HELP_NODE]["description"]
    assert HELP_TEXT not in description, "the frontend shows the description when the page fails to load"
    out = _phase(frontend, "node_help")
    assert out["text_visible"], out
    assert f"/extensions/{PACK_FOLDER}/docs/{HELP_NODE}.md" in out["requests"] or \
        any(r.startswith(f"/extensions/{PACK_FOLDER}/docs/{HELP_NODE}") for r in out["requests"]), out["requests"]
    pictures = [i for i in out["images"] if i["src"].endswith(f"/extensions/{PACK_FOLDER}/docs/{HELP_IMAGE}")]
    assert pictures and pictures[0]["width"] > 0 and pictures[0]["visible"], out["images"]


def _assert_loaded_cleanly(out, path):
    assert not out["dialogs"], f"dialogs after opening {path.stem}: {out['dialogs']}"
    # (newer frontends also list, as a notice, the model file this server lacks: not a missing node)
    missing = [d for d in out.get("notices", []) if "missing node" in d["text"].lower()]
    assert not missing, f"the frontend reports missing nodes in {path.stem}: {missing}"
    unknown = [(n["id"], n["type"]) for n in out["nodes"] if not n["registered"] or n["placeholder"]]
    assert not unknown, f"node types the frontend does not know: {unknown}"
    saved = json.loads(path.read_text())
    assert sorted(n["id"] for n in out["nodes"]) == sorted(n["id"] for n in saved["nodes"])
    assert not out["problems"], "broken links:\n" + "\n".join(out["problems"])


def test_templates_browser_shows_the_pack_templates_with_thumbnails(frontend):
    """Templates browser, Extensions > the pack: exactly the UI graphs, each card showing its thumbnail;
    a click on a card opens that graph."""
    out = _phase(frontend, "templates_browser")
    cards = {c["name"]: c["images"] for c in out["cards"]}
    assert sorted(cards) == [p.stem for p in UI_WORKFLOWS], sorted(cards)
    assert out["thumbnail_status"] == {p.stem: 200 for p in UI_WORKFLOWS}, out["thumbnail_status"]
    blank = [name for name, images in cards.items() if not any(i["width"] > 0 for i in images)]
    assert not blank, f"cards without a thumbnail: {blank} ({cards})"
    clicked = out["clicked"]
    _assert_loaded_cleanly(clicked, PACK_DIR / "workflows" / f"{clicked['name']}.json")


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_template_opens_from_the_template_listing(frontend, path):
    """Each template as the browser loads it (/api/workflow_templates, then its file into the canvas):
    every node known, every link intact, no missing-node dialog."""
    out = _phase(frontend, f"template:{path.stem}")
    assert sorted(out["listed"] or []) == [p.stem for p in UI_WORKFLOWS], out["listed"]
    _assert_loaded_cleanly(out, path)


def test_ui_workflows_exist():
    assert {p.name for p in UI_WORKFLOWS} >= {"tav_video_edit.json", "tav_text_to_video.json"}


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.name for p in UI_WORKFLOWS])
def test_ui_workflow_loads_in_the_frontend(frontend, path):
    out = _phase(frontend, f"workflow:{path.name}")
    saved = json.loads(path.read_text())
    assert not out["dialogs"], f"dialogs after loading {path.name}: {out['dialogs']}"
    unknown = [(n["id"], n["type"]) for n in out["nodes"] if not n["registered"] or n["placeholder"]]
    assert not unknown, f"node types the frontend does not know: {unknown}"
    # has_errors: on older frontends only an unknown type; newer ones also flag, on load, a node whose
    # model / input file the server lacks (this test server has neither the workflows' checkpoint nor
    # their sample video). Any other error fails.
    errors = [(n["id"], n["type"]) for n in out["nodes"] if n["has_errors"] and not n["missing_values"]]
    assert not errors, f"nodes with errors after loading {path.name}: {errors}"
    missing = [d for d in out.get("notices", []) if "missing node" in d["text"].lower()]
    assert not missing, f"the frontend reports missing nodes in {path.name}: {missing}"
    assert sorted(n["id"] for n in out["nodes"]) == sorted(n["id"] for n in saved["nodes"])
    assert not out["problems"], "broken links:\n" + "\n".join(out["problems"])
    # the frontend drops links it cannot connect: all of the file's links must have survived
    assert sorted(map(tuple, out["links"])) == sorted(tuple(link) for link in saved["links"])


def test_missing_node_detection_works(frontend):
    """Control: the checks above do catch an unknown node type (so their silence means something)."""
    out = _phase(frontend, "missing_node_control")
    assert any(not n["registered"] for n in out["nodes"])
    shown = out["dialogs"] + out.get("notices", [])
    assert any(d["id"] == "global-missing-nodes" or "missing" in d["text"].lower() for d in shown), shown
    assert any(n["placeholder"] for n in out["nodes"]), "the unknown node is not a placeholder"


def test_workflow_queued_from_the_ui_shows_its_video(frontend):
    out = _phase(frontend, "run")
    assert out["prompt_response"] and out["prompt_response"]["status"] == 200, \
        f"/prompt refused the workflow: {out['prompt_response']}"
    errors = [e["detail"] for e in out["events"] if e["type"] in ("execution_error", "execution_interrupted")]
    assert not errors, f"the run failed: {json.dumps(errors)[:3000]}"
    assert any(e["type"] == "execution_success" for e in out["events"]), out["events"]
    # the widgets set through app.graph are what the UI sent
    prompt = out["prompt"]
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    assert by_type["TuneAVideoSampler"]["steps"] == RUN_SIZE["steps"]
    assert by_type["EmptyLatentImage"]["batch_size"] == RUN_SIZE["frames"]
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == random_models.CHECKPOINT_NAME
    # the save node ran (not served from cache) and reported the file
    executed = [e["detail"] for e in out["events"] if e["type"] == "executed"]
    saved = [img for d in executed for img in d["output"].get("images", [])]
    assert len(saved) == 1 and saved[0]["filename"].startswith("frontend_test_"), executed
    server = frontend["_server"]
    file = server.base_dir / "output" / saved[0]["subfolder"] / saved[0]["filename"]
    assert file.is_file() and file.stat().st_size > 0
    # ... and the page shows it: a <video> (or an animated <img>) with src=/view?filename=<it>
    previews = [p for p in out.get("preview", [])
                if urllib.parse.parse_qs(urllib.parse.urlsplit(p["src"]).query).get("filename") == [saved[0]["filename"]]]
    assert previews, f"no preview of {saved[0]['filename']} on the page: {out.get('preview')}"
    preview = previews[0]
    assert preview["tag"] in ("video", "img") and preview["visible"], preview
    assert (preview["width"], preview["height"]) == (RUN_SIZE["width"], RUN_SIZE["height"]), \
        f"the browser did not decode the preview: {preview}"
    assert (ARTIFACTS / f"04_run_{RUN_WORKFLOW.removesuffix('.json')}.png").is_file()

"""Turn an API-format workflow (POST /prompt) into the UI workflow the ComfyUI frontend loads.

Widget order and typed slots come from the real server's /object_info, laid out the way frontend
1.32 builds a node: sockets for non-widget inputs (input_order: required, then optional); widget
values in the same order, an INT seed (or control_after_generate input) followed by its
"control after generate" value, and a media upload combo followed by its upload button's value.

    python scripts/client/api_to_ui.py workflows/api/*_api.json            # starts a server for /object_info
    python scripts/client/api_to_ui.py --server http://127.0.0.1:8188 workflows/api/tav_video_edit_api.json

Each workflows/api/X_api.json is written as workflows/X.json: the Templates browser lists only the UI graphs.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)
import comfy_runtime  # noqa: E402

WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}  # the frontend adds a control widget to these INTs by name
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
SEED_CONTROL = "fixed"  # shipped workflows reproduce their result; the UI can switch to randomize
OPTIONAL_SHAPE = 7  # LiteGraph RenderShape.HollowCircle: how optional sockets are saved
COLUMN_WIDTH, NODE_WIDTH, GAP = 380, 320, 40


def input_specs(info: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, optional) of a node's visible inputs, in the frontend's order."""
    groups = {g: info.get("input", {}).get(g, {}) for g in ("required", "optional")}
    order = info.get("input_order") or {g: list(groups[g]) for g in groups}
    specs = []
    for group in ("required", "optional"):
        for name in order.get(group, []):
            if name in groups[group]:
                spec = groups[group][name]
                kind = "COMBO" if isinstance(spec[0], list) else spec[0]
                specs.append((name, kind, spec[1] if len(spec) > 1 and spec[1] else {}, group == "optional"))
    return specs


def is_widget(kind: str, options: dict) -> bool:
    return kind in WIDGET_TYPES and not options.get("forceInput")


def widget_layout(info: dict) -> list[tuple[str, str]]:
    """The node's widgets_values slots: (input name or extra widget, kind) in saved order."""
    slots, upload = [], None
    for name, kind, options, _ in input_specs(info):
        if not is_widget(kind, options):
            continue
        slots.append((name, kind))
        control = options.get("control_after_generate")
        if kind == "INT" and (control if control is not None else name in SEED_NAMES):
            slots.append((name, "control_after_generate"))
        elif kind == "COMBO" and control:
            slots += [(name, "control_after_generate"), (name, "control_filter_list")]
        if kind == "COMBO" and upload is None and any(options.get(f) for f in UPLOAD_FLAGS):
            upload = name
    if upload is not None:  # the frontend appends a required "upload" input after all others
        slots.append((upload, "upload"))
    return slots


def _extra_value(kind: str):
    return {"control_after_generate": SEED_CONTROL, "control_filter_list": "", "upload": "image"}[kind]


def _default(kind: str, options: dict, spec: list):
    if "default" in options:
        return options["default"]
    if kind == "COMBO":
        values = spec[0] if isinstance(spec[0], list) else options.get("options", [])
        return values[0] if values else ""
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}.get(kind)


def _columns(api: dict) -> dict[str, int]:
    """Column of each node: the longest chain of links leading to it."""
    col: dict[str, int] = {}

    def depth(nid, seen=()):
        if nid not in col:
            if nid in seen:
                raise ValueError(f"the workflow has a cycle through node {nid}")
            srcs = [str(v[0]) for v in api[nid]["inputs"].values() if isinstance(v, list)]
            col[nid] = 1 + max((depth(s, seen + (nid,)) for s in srcs), default=-1)
        return col[nid]

    for nid in api:
        depth(nid)
    return col


def api_to_ui(api: dict, object_info: dict, workflow_id: str | None = None) -> dict:
    """The UI-format (LiteGraph 0.4) workflow for an API-format prompt. KeyError names unknown types."""
    ids = {nid: int(nid) if nid.isdigit() else None for nid in api}
    next_id = max([i for i in ids.values() if i is not None], default=0)
    for nid in api:
        if ids[nid] is None:
            next_id += 1
            ids[nid] = next_id
    missing = sorted({n["class_type"] for n in api.values()} - set(object_info))
    if missing:
        raise KeyError(f"node types unknown to the server: {', '.join(missing)}")

    nodes, links = {}, []
    for nid, node in api.items():
        info = object_info[node["class_type"]]
        specs = input_specs(info)
        inputs = [{"name": name, "type": kind, **({"shape": OPTIONAL_SHAPE} if opt else {}), "link": None}
                  for name, kind, options, opt in specs if not is_widget(kind, options)]
        nodes[nid] = {
            "id": ids[nid], "type": node["class_type"], "pos": [0, 0], "size": [NODE_WIDTH, 0],
            "flags": {}, "order": 0, "mode": 0, "inputs": inputs,
            "outputs": [{"name": oname, "type": otype, "slot_index": i, "links": None}
                        for i, (otype, oname) in enumerate(zip(info["output"], info["output_name"]))],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": [],
        }
        if node.get("_meta", {}).get("title"):
            nodes[nid]["title"] = node["_meta"]["title"]
        spec_by_name = {s[0]: s for s in specs}
        values = node["inputs"]
        for name, kind in widget_layout(info):
            if kind in ("control_after_generate", "control_filter_list", "upload"):
                nodes[nid]["widgets_values"].append(_extra_value(kind))
                continue
            value = values.get(name)
            if isinstance(value, list) or name not in values:  # linked or absent: the widget keeps its default
                raw = info["input"].get("optional" if spec_by_name[name][3] else "required")[name]
                value = _default(kind, spec_by_name[name][2], raw)
            nodes[nid]["widgets_values"].append(value)
        unknown = set(values) - set(spec_by_name)
        if unknown:
            raise KeyError(f"node {nid} ({node['class_type']}) has inputs the server does not know: {sorted(unknown)}")
        multiline = sum(1 for name, kind, options, _ in specs if kind == "STRING" and options.get("multiline"))
        nodes[nid]["size"][1] = (14 + 20 * max(len(inputs), len(nodes[nid]["outputs"]))
                                 + 24 * len(nodes[nid]["widgets_values"]) + 76 * multiline)

    for nid, node in api.items():  # links, in target-node then input order (stable ids)
        for name, value in node["inputs"].items():
            if not isinstance(value, list):
                continue
            src, slot = str(value[0]), int(value[1])
            out = nodes[src]["outputs"][slot]
            target = nodes[nid]
            slot_in = next((i for i, s in enumerate(target["inputs"]) if s["name"] == name), None)
            if slot_in is None:  # a widget fed by a link: the frontend saves it as a socket after the others
                spec = next(s for s in input_specs(object_info[node["class_type"]]) if s[0] == name)
                target["inputs"].append({"name": name, "type": spec[1],
                                         **({"shape": OPTIONAL_SHAPE} if spec[3] else {}),
                                         "widget": {"name": name}, "link": None})
                slot_in = len(target["inputs"]) - 1
            want = target["inputs"][slot_in]["type"]
            if "*" not in (want, out["type"]) and out["type"] not in want.split(","):
                raise ValueError(f"node {nid} ({node['class_type']}).{name} takes {want}, but node {src} "
                                 f"({api[src]['class_type']}) output {slot} is {out['type']}")
            link_id = len(links) + 1
            target["inputs"][slot_in]["link"] = link_id
            out["links"] = (out["links"] or []) + [link_id]
            links.append([link_id, ids[src], slot, ids[nid], slot_in, out["type"]])

    columns = _columns(api)
    order = sorted(api, key=lambda n: (columns[n], ids[n]))
    heights: dict[int, int] = {}
    for i, nid in enumerate(order):
        n = nodes[nid]
        y = heights.get(columns[nid], 80)
        n["pos"] = [50 + COLUMN_WIDTH * columns[nid], y]
        heights[columns[nid]] = y + n["size"][1] + 30 + GAP  # 30: the title bar above pos
        n["order"] = i

    return {
        "id": workflow_id or str(uuid.uuid4()), "revision": 0,
        "last_node_id": max(ids.values(), default=0), "last_link_id": len(links),
        "nodes": [nodes[nid] for nid in sorted(api, key=lambda n: ids[n])],
        "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4,
    }


def ui_path(api_path: Path) -> Path:
    stem = api_path.name.removesuffix(".json").removesuffix("_api")
    return api_path.parent.parent / (stem + ".json")


def convert_files(paths: list[Path], object_info: dict) -> list[Path]:
    written = []
    for path in paths:
        api = json.loads(path.read_text())
        # a stable id per file keeps regenerated files identical
        wid = str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-tune-a-video/" + ui_path(path).name))
        out = ui_path(path)
        out.write_text(json.dumps(api_to_ui(api, object_info, wid), indent=1) + "\n")
        written.append(out)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("api_workflows", nargs="+", type=Path)
    p.add_argument("--server", help="a running ComfyUI with this pack (default: start one)")
    a = p.parse_args(argv)
    if a.server:
        from comfy_client import Client
        object_info = Client(a.server).get("/object_info")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            server = comfy_runtime.ComfyServer(Path(tmp)).start()
            try:
                object_info = server.get("/object_info")
            finally:
                server.stop()
    for out in convert_files(a.api_workflows, object_info):
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run a Tune-A-Video API-format workflow headless and print the files it wrote.

Against a running ComfyUI (--server URL), or one this script starts with this pack installed
(in --base-dir, default out/comfy). The obvious inputs are substituted into the workflow by node
type, not by node id: the video, the prompts, checkpoint, seed, frames, steps, size, and the one-shot
tuning's steps and precision (--tune-steps, --precision; --steps is the DDIM schedule only).

    python scripts/run_workflow.py workflows/tav_video_edit_api.json --video clip.mp4 \\
        --prompt "a tiger walking in the snow" --checkpoint v1-5-pruned-emaonly.safetensors

Progress goes to stderr; stdout gets one line per output file (an absolute path when the server's
output folder is on this machine, else its /view URL), saved adapters included (models/tune_a_video/...,
absolute when the server's base folder is on this machine). Exit status 1 with the server's error message
when the workflow is refused or fails.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_runtime  # noqa: E402

SAMPLER, INVERT, TUNE = "TuneAVideoSampler", "TuneAVideoInvert", "TuneAVideoTune"
ADAPTER_KEY, ADAPTER_FOLDER = "adapters", "tune_a_video"  # TuneAVideoSaveAdapter's ui output
LOAD_FRAMES, SAVE_VIDEO = "TuneAVideoLoadFrames", "TuneAVideoSaveVideo"
TEXT_ENCODE, CHECKPOINT, EMPTY_LATENT = "CLIPTextEncode", "CheckpointLoaderSimple", "EmptyLatentImage"


class WorkflowError(Exception):
    """The workflow cannot take an option, or the server refused or failed it."""


# --- substitution: find nodes by class_type and follow links --------------------------------

def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, node in prompt.items() if node.get("class_type") == class_type]


def _set_inputs(prompt, class_types, values: dict, option: str) -> None:
    ids = [nid for ct in class_types for nid in nodes_of(prompt, ct)]
    if not ids:
        raise WorkflowError(f"{option}: the workflow has no {' or '.join(class_types)} node to take it")
    for nid in ids:
        prompt[nid]["inputs"].update(values)


def _text_node(prompt: dict, consumer: str, input_name: str, option: str) -> str:
    """The CLIPTextEncode feeding consumer.input_name; cloned first if other inputs share it."""
    link = prompt[consumer]["inputs"].get(input_name)
    if not (isinstance(link, list) and prompt.get(str(link[0]), {}).get("class_type") == TEXT_ENCODE):
        raise WorkflowError(f"{option}: {prompt[consumer]['class_type']}.{input_name} is not fed by a "
                            f"{TEXT_ENCODE} node, so there is no text to replace")
    src = str(link[0])
    users = [(nid, name) for nid, node in prompt.items() for name, v in node["inputs"].items()
             if isinstance(v, list) and str(v[0]) == src]
    if len(users) > 1:  # the same encoder also feeds something else: give this input its own copy
        new_id = str(max((int(n) for n in prompt if n.isdigit()), default=0) + 1)
        prompt[new_id] = copy.deepcopy(prompt[src])
        prompt[consumer]["inputs"][input_name] = [new_id, link[1]]
        src = new_id
    return src


def _set_text(prompt, class_type, input_name, text, option) -> None:
    ids = nodes_of(prompt, class_type)
    if not ids:
        raise WorkflowError(f"{option}: the workflow has no {class_type} node")
    for nid in ids:
        prompt[_text_node(prompt, nid, input_name, option)]["inputs"]["text"] = text


def substitute(prompt: dict, *, video=None, positive=None, source_prompt=None, negative=None,
               checkpoint=None, seed=None, frames=None, steps=None, cfg=None, width=None, height=None,
               fps=None, filename_prefix=None, tune_steps=None, precision=None) -> dict:
    """A copy of the API-format prompt with the given options set (None = leave as is).

    source_prompt is the clip's prompt: the tuning's positive text (and its prompt_text) when the workflow
    tunes, else the inversion's conditioning. steps sets sampling and inversion, never the tuning's steps.
    Raises WorkflowError when an option has no node to go to (e.g. video in text-to-video).
    """
    p = copy.deepcopy(prompt)
    if video is not None:
        _set_inputs(p, [LOAD_FRAMES], {"video": video}, "--video")
    if checkpoint is not None:
        _set_inputs(p, [CHECKPOINT], {"ckpt_name": checkpoint}, "--checkpoint")
    if positive is not None:
        _set_text(p, SAMPLER, "positive", positive, "--prompt")
    if negative is not None:
        _set_text(p, SAMPLER, "negative", negative, "--negative")
    if source_prompt is not None:
        if nodes_of(p, TUNE):  # Tune-A-Video: tune on the clip's prompt, invert with the empty prompt
            _set_text(p, TUNE, "positive", source_prompt, "--source-prompt")
            _set_inputs(p, [TUNE], {"prompt_text": source_prompt}, "--source-prompt")
        else:
            _set_text(p, INVERT, "conditioning", source_prompt, "--source-prompt")
    if tune_steps is not None:
        _set_inputs(p, [TUNE], {"steps": tune_steps}, "--tune-steps")
    if precision is not None:
        _set_inputs(p, [TUNE], {"precision": precision}, "--precision")
    if seed is not None:
        _set_inputs(p, [SAMPLER], {"seed": seed}, "--seed")
    if cfg is not None:
        _set_inputs(p, [SAMPLER], {"cfg": cfg}, "--cfg")
    if steps is not None:  # inversion and sampling must walk the same schedule
        _set_inputs(p, [SAMPLER], {"steps": steps}, "--steps")
        for nid in nodes_of(p, INVERT):
            p[nid]["inputs"]["steps"] = steps
    if frames is not None:
        if nodes_of(p, LOAD_FRAMES):
            _set_inputs(p, [LOAD_FRAMES], {"frame_load_cap": frames}, "--frames")
        else:
            _set_inputs(p, [EMPTY_LATENT], {"batch_size": frames}, "--frames")
    for option, key, value in (("--width", "width", width), ("--height", "height", height)):
        if value is not None:
            _set_inputs(p, [LOAD_FRAMES, EMPTY_LATENT], {key: value}, option)
    if fps is not None:
        _set_inputs(p, [SAVE_VIDEO], {"fps": fps}, "--fps")
    if filename_prefix is not None:
        _set_inputs(p, [SAVE_VIDEO], {"filename_prefix": filename_prefix}, "--filename-prefix")
    return p


# --- the server ---------------------------------------------------------------------------

class Client:
    """Minimal ComfyUI HTTP client (stdlib)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=60) as r:
            return json.loads(r.read())

    def post(self, route: str, data: bytes, content_type="application/json"):
        req = urllib.request.Request(self.url + route, data=data, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                body = r.read()
                return r.status, json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def upload(self, path: Path) -> str:
        """Upload a file into the server's input/ folder; returns the name to put in a workflow."""
        boundary = uuid.uuid4().hex
        name = path.name.replace('"', "_")
        body = b"".join([
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode(), path.read_bytes(),
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="type"\r\n\r\ninput\r\n'
            f"--{boundary}--\r\n".encode()])
        status, res = self.post("/upload/image", body, f"multipart/form-data; boundary={boundary}")
        if status != 200 or not isinstance(res, dict):
            raise WorkflowError(f"uploading {path} to {self.url} failed ({status}): {res}")
        return f"{res['subfolder']}/{res['name']}" if res.get("subfolder") else res["name"]

    def folders(self) -> dict:
        """The server's base and output folders, if it runs on this machine (from its argv)."""
        argv = self.get("/system_stats").get("system", {}).get("argv") or []
        opts = {}
        for i, a in enumerate(argv):
            key, eq, val = a.partition("=")
            if key in ("--base-directory", "--output-directory"):
                opts[key] = val if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        main = Path(argv[0]) if argv else Path()
        base = Path(opts["--base-directory"]) if opts.get("--base-directory") else main.parent
        output = Path(opts["--output-directory"]) if opts.get("--output-directory") else base / "output"
        found = {"base": base, "output": output}
        return {k: v for k, v in found.items() if v.is_absolute() and v.is_dir()}


def _node_errors(body) -> str:
    if not isinstance(body, dict):
        return str(body)
    lines = []
    err = body.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('message', '')} {err.get('details', '')}".strip())
    for nid, ne in (body.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            lines.append(f"node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines) or json.dumps(body)[:2000]


def queue(client: Client, prompt: dict, client_id: str) -> str:
    status, body = client.post("/prompt", json.dumps({"prompt": prompt, "client_id": client_id}).encode())
    if status != 200:
        raise WorkflowError(f"the server refused the workflow:\n{_node_errors(body)}")
    return body["prompt_id"]


def _finished(client: Client, prompt_id: str):
    entry = client.get(f"/history/{prompt_id}").get(prompt_id)
    if entry and entry.get("status", {}).get("completed") is not None:
        return entry
    return None


class Progress:
    """One line per node; step progress as n/total (rewritten in place on a terminal)."""

    def __init__(self, prompt: dict, stream=sys.stderr):
        self.prompt, self.stream, self.tty = prompt, stream, stream.isatty()
        self.last = None

    def node(self, nid):
        if nid is not None and nid in self.prompt:
            title = self.prompt[nid].get("_meta", {}).get("title") or self.prompt[nid]["class_type"]
            self._line(f"[{nid}] {title}")

    def step(self, value, total):
        mark = (value, total)
        if self.tty:
            self.stream.write(f"\r    step {value}/{total}" + ("\n" if value >= total else ""))
            self.stream.flush()
        elif mark != self.last and (value >= total or value % max(1, total // 5) == 0):
            self._line(f"    step {value}/{total}")
        self.last = mark

    def _line(self, text):
        print(text, file=self.stream, flush=True)


async def _watch_ws(client: Client, prompt: dict, client_id: str, progress: Progress, deadline: float):
    import aiohttp

    ws_url = client.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, heartbeat=30) as ws:
        prompt_id = queue(client, prompt, client_id)
        while time.time() < deadline:
            try:
                msg = await ws.receive(timeout=2.0)
            except asyncio.TimeoutError:
                msg = None
            check = msg is None
            if msg is not None and msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                kind, body = data.get("type"), data.get("data") or {}
                if body.get("prompt_id", prompt_id) != prompt_id:
                    continue
                if kind == "executing":
                    progress.node(body.get("node"))
                    check = body.get("node") is None
                elif kind == "progress":
                    progress.step(body["value"], body["max"])
                check = check or kind in ("execution_success", "execution_error", "execution_interrupted")
            elif msg is not None and msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                                  aiohttp.WSMsgType.ERROR):
                break  # the polling loop in run_prompt takes over
            if check and (entry := _finished(client, prompt_id)):
                return prompt_id, entry
        return prompt_id, None


def run_prompt(client: Client, prompt: dict, timeout: float = 3600, progress: Progress | None = None) -> dict:
    """Queue, show progress, wait; the /history entry. WorkflowError if refused or failed."""
    progress = progress or Progress(prompt)
    client_id = uuid.uuid4().hex
    deadline = time.time() + timeout
    try:
        prompt_id, entry = asyncio.run(_watch_ws(client, prompt, client_id, progress, deadline))
    except ImportError:  # no aiohttp: poll
        prompt_id, entry = queue(client, prompt, client_id), None
    while entry is None and time.time() < deadline:
        entry = _finished(client, prompt_id)
        time.sleep(0.5)
    if entry is None:
        raise WorkflowError(f"the workflow did not finish within {timeout:.0f}s (prompt {prompt_id})")
    if entry["status"].get("status_str") != "success":
        raise WorkflowError(f"the workflow failed:\n{failure_message(entry)}")
    return entry


def failure_message(entry: dict) -> str:
    for kind, body in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return (f"node {body.get('node_id')} ({body.get('node_type')}): "
                    f"{body.get('exception_type')}: {body.get('exception_message')}").strip()
        if kind == "execution_interrupted":
            return f"interrupted at node {body.get('node_id')} ({body.get('node_type')})"
    return json.dumps(entry.get("status"))[:2000]


def output_files(entry: dict) -> list[dict]:
    """Every {filename, subfolder, type='output'} the output nodes reported, in node order, and every
    saved adapter ({filename (relative to models/tune_a_video), type='tune_a_video'})."""
    found = []
    for nid in sorted(entry.get("outputs", {}), key=lambda n: (len(n), n)):
        for key, items in entry["outputs"][nid].items():
            for item in items if isinstance(items, list) else []:
                if not (isinstance(item, dict) and item.get("filename")):
                    continue
                if key == ADAPTER_KEY:
                    found.append({"filename": item["filename"], "type": ADAPTER_FOLDER})
                elif item.get("type", "output") == "output":
                    found.append(item)
    return found


def locate(client: Client, item: dict, output_dir: Path | None, base_dir: Path | None = None) -> str:
    if item.get("type") == ADAPTER_FOLDER:  # not servable by /view: a path under the server's models/
        rel = Path("models") / ADAPTER_FOLDER / item["filename"]
        return str((base_dir / rel).resolve()) if base_dir is not None else rel.as_posix()
    if output_dir is not None:
        path = output_dir / item.get("subfolder", "") / item["filename"]
        if path.is_file():
            return str(path.resolve())
    query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                    "type": "output"})
    return f"{client.url}/view?{query}"


# --- the command line ---------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", type=Path, help="an API-format workflow JSON (workflows/*_api.json)")
    p.add_argument("--server", help="URL of a running ComfyUI (default: start one with this pack)")
    p.add_argument("--base-dir", type=Path, default=comfy_runtime.PACK_DIR / "out" / "comfy",
                   help="base directory of the ComfyUI this script starts (default: %(default)s)")
    p.add_argument("--video", type=Path, help="source clip, uploaded into the server's input/")
    p.add_argument("--prompt", help="the (edited) prompt")
    p.add_argument("--source-prompt", help="the source clip's prompt: what it is tuned on (TuneAVideoTune), "
                   "else what it is inverted with (default: empty)")
    p.add_argument("--negative", help="the negative prompt")
    p.add_argument("--checkpoint", help="a checkpoint name the server knows, or a file path "
                                        "(linked into the server's models/checkpoints)")
    p.add_argument("--seed", type=int)
    p.add_argument("--frames", type=int, help="frames to load from the clip, or to generate")
    p.add_argument("--steps", type=int, help="DDIM steps (inversion and sampling; not the tuning)")
    p.add_argument("--tune-steps", type=int, help="optimizer steps of the one-shot tuning (TuneAVideoTune)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="precision of the one-shot tuning (fp32 on a CPU)")
    p.add_argument("--cfg", type=float)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--fps", type=float, help="frame rate of the saved video")
    p.add_argument("--filename-prefix")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the result")
    p.add_argument("--deterministic", action="store_true",
                   help="start the server with ComfyUI's --deterministic: bit-identical results run to run "
                        "(multithreaded CPU kernels otherwise differ in the last bits; tuning amplifies that). "
                        "Not for --server: start that ComfyUI with --deterministic yourself")
    p.add_argument("--check-args", action="store_true",
                   help="only check the arguments (files exist, sizes are valid) and exit")
    return p.parse_args(argv)


CHECKPOINT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")


def check_args(args):
    """Errors a user can make on the command line, found before any server starts."""
    if not args.workflow.is_file():
        raise WorkflowError(f"{args.workflow}: no such workflow file (see workflows/*_api.json)")
    if args.checkpoint and not args.server:
        path = Path(args.checkpoint).expanduser()
        known = (args.base_dir / "models" / "checkpoints" / args.checkpoint).is_file()
        if not path.is_file() and not known:
            raise WorkflowError(f"--checkpoint {args.checkpoint}: no such file. Give the path of an SD1.5, SD2 or "
                                "SDXL checkpoint file (e.g. v1-5-pruned-emaonly.safetensors); a bare name works "
                                "only with --server, for a ComfyUI that lists it.")
        if path.is_file() and path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise WorkflowError(f"--checkpoint {args.checkpoint}: not a checkpoint file (expected one of "
                                f"{', '.join(CHECKPOINT_SUFFIXES)}).")
    if args.video is not None and not args.video.is_file():
        raise WorkflowError(f"--video {args.video}: no such file")
    for name in ("frames", "steps", "tune_steps", "width", "height"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise WorkflowError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value < 64 or value % 8):
            raise WorkflowError(f"--{name} {value}: must be a multiple of 8, at least 64 (the VAE works on 8x8 pixels)")
    if args.fps is not None and not args.fps > 0:
        raise WorkflowError(f"--fps {args.fps}: must be greater than 0")
    if args.cfg is not None and args.cfg < 0:
        raise WorkflowError(f"--cfg {args.cfg}: must not be negative")


def _link_checkpoint(path: Path, folders: dict) -> str:
    if "base" not in folders:
        raise WorkflowError(f"--checkpoint {path}: the server's models folder is not on this machine; "
                            "copy the file into its models/checkpoints and pass the file name instead")
    dst = folders["base"] / "models" / "checkpoints" / path.name
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(path.resolve())
    return path.name


def run(args) -> list[str]:
    check_args(args)
    workflow = json.loads(args.workflow.read_text())
    if "nodes" in workflow or not all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
        raise WorkflowError(f"{args.workflow} is not an API-format workflow; use the *_api.json file "
                            "(or ComfyUI's Export (API))")
    ckpt_path = Path(args.checkpoint).expanduser() if args.checkpoint else None
    ckpt_path = ckpt_path if ckpt_path is not None and ckpt_path.is_file() else None
    server = None
    if args.server:
        client = Client(args.server)
    else:
        server = comfy_runtime.ComfyServer(args.base_dir, checkpoints=[ckpt_path] if ckpt_path else [],
                                           extra_args=["--deterministic"] if args.deterministic else [])
        print(f"Starting ComfyUI in {args.base_dir} (log: {server.log_path}) ...", file=sys.stderr, flush=True)
        try:
            server.start()
        except RuntimeError as e:
            raise WorkflowError(f"ComfyUI did not start: {e}") from e
        client = Client(server.url)
    try:
        folders = client.folders()
        checkpoint = args.checkpoint
        if ckpt_path is not None:
            checkpoint = ckpt_path.name if server else _link_checkpoint(ckpt_path, folders)
        video = client.upload(args.video) if args.video is not None else None
        prompt = substitute(workflow, video=video, positive=args.prompt, source_prompt=args.source_prompt,
                            negative=args.negative, checkpoint=checkpoint, seed=args.seed,
                            frames=args.frames, steps=args.steps, cfg=args.cfg, width=args.width,
                            height=args.height, fps=args.fps, filename_prefix=args.filename_prefix,
                            tune_steps=args.tune_steps, precision=args.precision)
        entry = run_prompt(client, prompt, args.timeout)
        files = output_files(entry)
        if not files:
            raise WorkflowError("the workflow finished but reported no output files")
        return [locate(client, item, folders.get("output"), folders.get("base")) for item in files]
    finally:
        if server is not None:
            server.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.check_args:
            check_args(args)
            return 0
        paths = run(args)
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, ConnectionError) as e:
        print(f"error: cannot reach ComfyUI at {args.server}: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

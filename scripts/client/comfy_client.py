"""scripts/client/ -- talking to a running ComfyUI: the HTTP client, the headless runner, graph editing.

This module is the client; run_workflow.py runs a shipped API graph headless (the demo's engine),
workflow_substitute.py fills a graph's inputs, api_to_ui.py turns API graphs into the UI templates.
Everything here needs only a server URL, so it works against any ComfyUI, local or remote.

The one ComfyUI HTTP client (stdlib) of the scripts and end-to-end tests.

Client talks to any ComfyUI by URL: object info, uploads, queueing prompts, waiting for their /history
entry. comfy_runtime.ComfyServer is a Client of the server it starts. run_prompt adds progress from
the websocket (aiohttp, which ComfyUI requires; polling without it); output_files and locate read
what a finished prompt wrote.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ADAPTER_KEY, ADAPTER_FOLDER = "adapters", "tune_a_video"  # TuneAVideoSaveAdapter's ui output


class WorkflowError(RuntimeError):
    """The workflow cannot take an option, or the server refused or failed it."""


class Client:
    """Minimal ComfyUI HTTP client."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=60) as r:
            return json.loads(r.read())

    def post(self, route: str, payload, content_type="application/json"):
        """POST a JSON-able payload (or raw bytes); (status, decoded JSON body, or its text)."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + route, data=data, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                body = r.read()
                return r.status, json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body or b"null")
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

    def queue(self, prompt: dict, client_id: str = "tav") -> str:
        """Queue an API-format prompt; its id. WorkflowError with the node errors if refused."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
        if status != 200:
            raise WorkflowError(f"the server refused the workflow ({status}):\n{node_errors(body)}")
        return body["prompt_id"]

    def finished(self, prompt_id: str) -> dict | None:
        """The prompt's /history entry once it has ended (success or error), else None."""
        entry = self.get(f"/history/{prompt_id}").get(prompt_id)
        status = (entry or {}).get("status", {})
        if status.get("completed") is not None and status.get("status_str") in ("success", "error"):
            return entry
        return None

    def check_alive(self):
        """Hook: raise when the server is known to be gone (ComfyServer watches its process)."""

    def wait(self, prompt_id: str, timeout: float = 1200, on_poll=None) -> dict:
        """Poll /history until the prompt ends; returns its history entry."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.finished(prompt_id)
            if entry is not None:
                return entry
            self.check_alive()
            if on_poll:
                on_poll()
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")

    def run(self, prompt: dict, timeout: float = 1200) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def run_ok(self, prompt: dict, timeout: float = 1200) -> dict:
        """Run a prompt and fail loudly, with the node's error, unless it succeeds."""
        entry = self.run(prompt, timeout)
        if entry["status"]["status_str"] != "success":
            raise WorkflowError(f"the workflow failed:\n{failure_message(entry)}")
        return entry


def node_errors(body) -> str:
    """The validation errors of a refused /prompt, one line each."""
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


def failure_message(entry: dict) -> str:
    """The node error of a failed /history entry, in one line (node, type, exception message)."""
    for kind, body in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return (f"node {body.get('node_id')} ({body.get('node_type')}): "
                    f"{body.get('exception_type')}: {body.get('exception_message')}").strip()
        if kind == "execution_interrupted":
            return f"interrupted at node {body.get('node_id')} ({body.get('node_type')})"
    return json.dumps(entry.get("status"))[:2000]


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
        prompt_id = client.queue(prompt, client_id)
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
            if check and (entry := client.finished(prompt_id)):
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
        prompt_id, entry = client.queue(prompt, client_id), None
    while entry is None and time.time() < deadline:
        entry = client.finished(prompt_id)
        time.sleep(0.5)
    if entry is None:
        raise WorkflowError(f"the workflow did not finish within {timeout:.0f}s (prompt {prompt_id})")
    if entry["status"].get("status_str") != "success":
        raise WorkflowError(f"the workflow failed:\n{failure_message(entry)}")
    return entry


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
    """An output file as an absolute path where it is on this machine, else its /view URL."""
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

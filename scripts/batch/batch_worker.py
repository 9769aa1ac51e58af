"""One batch worker (scripts/batch/run_batch.py): owns one ComfyUI server and runs one edit at a time on it.

Run as a Ray actor, one per GPU (or per share of the CPU cores), each with its own ComfyUI: started
here (scripts/env/comfy_runtime.py ComfyServer, in <work-dir>/worker-<n>) or attached to a given server URL.
An edit is the shipped tune-and-edit workflow; when its clip already has a tuned adapter, the workflow's
One-Shot Tune is swapped for Load Adapter (and its Save Adapter dropped), so each clip is tuned once.

`run` returns a result dict with status "ok" or "error" (the item's own failure: a missing clip, a node
error), or "lost" (the server died or stopped answering: the driver moves the item to another worker;
this worker restarts its own server before its next edit).
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
import urllib.error
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)
import comfy_runtime  # noqa: E402
import comfy_client as cc  # noqa: E402
import workflow_substitute as ws  # noqa: E402

SAVE_ADAPTER, LOAD_ADAPTER = "TuneAVideoSaveAdapter", "TuneAVideoLoadAdapter"
LINKED_ADAPTERS = "batch_adapters"  # subfolder of the server's models/tune_a_video for reused adapters
EDIT_KEYS = ("negative", "seed", "cfg", "steps")  # may differ per edit of one clip
TUNE_KEYS = ("tune_steps", "precision")  # only where the workflow tunes


def with_adapter(workflow: dict, adapter_name: str) -> dict:
    """The tune-and-edit workflow with One-Shot Tune replaced by Load Adapter(adapter_name): same links
    (MODEL at output 0, TAV_ADAPTER at 1), no Save Adapter (the adapter is already on disk)."""
    p = {nid: dict(node, inputs=dict(node["inputs"])) for nid, node in workflow.items()
         if node.get("class_type") != SAVE_ADAPTER}
    tunes = ws.nodes_of(p, ws.TUNE)
    if not tunes:
        raise cc.WorkflowError(f"the workflow has no {ws.TUNE} node, so there is no tuning to reuse")
    for nid in tunes:
        p[nid] = {"class_type": LOAD_ADAPTER, "_meta": {"title": "Load adapter (tuned earlier)"},
                  "inputs": {"model": p[nid]["inputs"]["model"], "adapter_name": adapter_name}}
    return p


class NodeTimes(cc.Progress):
    """comfy_client.Progress, kept quiet, recording how long each node ran (from `executing` events)."""

    def __init__(self, prompt: dict, stream):
        super().__init__(prompt, stream)
        self.marks: list[tuple[str | None, float]] = []

    def node(self, nid):
        self.marks.append((nid, time.monotonic()))
        super().node(nid)

    def seconds(self) -> dict:
        out: dict[str, float] = {}
        for (nid, t0), (_, t1) in zip(self.marks, self.marks[1:]):
            if nid in self.prompt:
                name = self.prompt[nid]["class_type"]
                out[name] = round(out.get(name, 0.0) + t1 - t0, 3)
        return out


def _scores(prompt: dict, entry: dict) -> dict:
    """Numbers that output nodes report in their UI (e.g. a metric node shown in the workflow)."""
    found = {}
    for nid, ui in entry.get("outputs", {}).items():
        for key, values in ui.items():
            if isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values):
                found[f"{prompt.get(nid, {}).get('class_type', nid)}.{key}"] = values
    return found


class BatchWorker:
    """One ComfyUI server and the edits sent to it (wrapped by ray.remote in scripts/batch/run_batch.py)."""

    def __init__(self, index: int, work_dir: str, checkpoint: str | None = None, server_url: str | None = None,
                 threads: int | None = None, extra_args: tuple = ()):
        self.index, self.host = index, socket.gethostname()
        self.base = Path(work_dir) / f"worker-{index}"
        self.base.mkdir(parents=True, exist_ok=True)
        self.log = open(self.base / "progress.log", "a", buffering=1)
        self.server, self.restarts = None, 0
        if threads:  # the server inherits them: one worker per share of the cores, no oversubscription
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = str(threads)
        if server_url:
            self.url = server_url.rstrip("/")
        else:
            ckpts = [Path(checkpoint)] if checkpoint and Path(checkpoint).is_file() else []
            self.server = comfy_runtime.ComfyServer(self.base, checkpoints=ckpts, extra_args=list(extra_args))
            self.url = self.server.url
            self._start()
        self.client = cc.Client(self.url)
        self.folders = self.client.folders()

    def _start(self):
        t0 = time.monotonic()
        self.server.start(timeout=300)
        (self.base / "server.pid").write_text(str(self.server.proc.pid))
        self.start_s = round(time.monotonic() - t0, 2)

    def info(self) -> dict:
        return {"worker": self.index, "host": self.host, "url": self.url,
                "server_start_s": getattr(self, "start_s", None)}

    def alive(self) -> bool:
        if self.server is not None and self.server.proc.poll() is not None:
            return False
        try:
            self.client.get("/system_stats")
            return True
        except (OSError, urllib.error.URLError):
            return False

    def stop(self):
        if self.server is not None:
            self.server.stop()

    def _adapter_name(self, job: dict) -> str | None:
        """The name Load Adapter takes for the clip's adapter on this server, or None (tune here)."""
        found = job.get("adapter")
        if not found:
            return None
        if found.get("url") == self.url and found.get("name"):
            return found["name"]  # tuned on this very server
        path = Path(found.get("path") or "")
        if "base" not in self.folders or not path.is_file():
            return None  # not reachable from here (another machine, no shared disk): tune again
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        name = f"{LINKED_ADAPTERS}/{path.stem}-{digest}.safetensors"
        dst = self.folders["base"] / "models" / cc.ADAPTER_FOLDER / name
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(path.resolve())
        return name

    def run(self, job: dict) -> dict:
        """One edit: {key, clip_id, clip, source_prompt, edit: {prompt, ...}, settings, adapter, workflow,
        checkpoint, timeout} -> result {status, videos, adapter, tuned, timings, scores, error}."""
        t0 = time.monotonic()
        res = {"worker": self.index, "host": self.host, "server": self.url}
        try:
            if self.server is not None and not self.alive():  # lost during an earlier edit: a fresh one
                self.server.stop()  # a killed server may still be exiting: wait for it (port, memory)
                self.restarts += 1
                self._start()
            res.update(self._run(job))
            res["status"] = "ok"
        except Exception as e:  # noqa: BLE001  one item's failure must not stop the worker
            if not self.alive():
                res.update(status="lost", error=f"ComfyUI at {self.url} died or stopped answering: {e}")
            else:
                text = str(e) if isinstance(e, cc.WorkflowError) else f"{type(e).__name__}: {e}"
                res.update(status="error", error=text)
                if "did not finish within" in text:  # still running there: stop it before the next edit
                    self.client.post("/interrupt", b"")
        res.setdefault("timings", {})["total_s"] = round(time.monotonic() - t0, 3)
        return res

    def _run(self, job: dict) -> dict:
        clip = Path(job["clip"])
        if not clip.is_file():
            raise cc.WorkflowError(f"clip {clip}: no such file on {self.host} (item {job['id']}); "
                                   "fix the manifest's clip path, or put the clip where every worker can read it")
        timings = {}
        t = time.monotonic()
        video = self.client.upload(clip)
        timings["upload_s"] = round(time.monotonic() - t, 3)
        s, e = job.get("settings", {}), job["edit"]
        adapter_name = self._adapter_name(job)
        tuned = adapter_name is None
        workflow = job["workflow"] if tuned else with_adapter(job["workflow"], adapter_name)
        values = {k: s.get(k) for k in ("frames", "width", "height", "fps")}
        values.update({k: e.get(k, s.get(k)) for k in EDIT_KEYS})
        if tuned:
            values.update({k: s.get(k) for k in TUNE_KEYS}, source_prompt=job["source_prompt"])
        prefix = f"batch/{job['clip_id']}"
        prompt = ws.substitute(workflow, video=video, positive=e["prompt"], checkpoint=job.get("checkpoint"),
                               filename_prefix=f"{prefix}/edit", **values)
        for nid in ws.nodes_of(prompt, SAVE_ADAPTER):
            prompt[nid]["inputs"]["filename_prefix"] = f"{prefix}/adapter"
        progress = NodeTimes(prompt, self.log)
        print(f"--- {job['id']} ({'tune + edit' if tuned else 'edit with ' + adapter_name})", file=self.log)
        entry = cc.run_prompt(self.client, prompt, timeout=job.get("timeout", 3600), progress=progress)
        timings["nodes_s"] = progress.seconds()
        files = cc.output_files(entry)
        videos = [cc.locate(self.client, f, self.folders.get("output"), self.folders.get("base"))
                  for f in files if f["type"] == "output"]
        if not videos:
            raise cc.WorkflowError("the workflow finished but saved no video")
        saved = [f for f in files if f["type"] == cc.ADAPTER_FOLDER]
        if saved:
            path = cc.locate(self.client, saved[0], None, self.folders.get("base"))
            adapter = {"path": path, "name": saved[0]["filename"], "url": self.url}
        else:
            adapter = job["adapter"]
        return {"videos": videos, "adapter": adapter, "tuned": tuned, "timings": timings,
                "scores": _scores(prompt, entry)}

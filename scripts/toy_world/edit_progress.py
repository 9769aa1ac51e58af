"""The toy-world edit's terminal output: each server phase (tuning, inversion, sampling, decoding) as it runs,
with its step count, elapsed time and ETA, from the server's websocket progress messages."""
from __future__ import annotations

import sys
import time

import comfy_client

PHASES = {"TuneAVideoTune": "tuning", "TuneAVideoInvert": "inversion", "TuneAVideoSampler": "sampling",
          "VAEDecode": "decoding", "VAEEncode": "encoding", "CheckpointLoaderSimple": "loading the checkpoint"}


class PhaseProgress(comfy_client.Progress):
    """comfy_client.Progress with phase names, the time since the graph started and an ETA per phase.

    On a terminal the step line is rewritten in place; otherwise a line at every quarter of a phase and at
    least every every_s seconds.
    """

    def __init__(self, prompt: dict, stream=None, label: str = "", every_s: float = 20.0):
        super().__init__(prompt, stream or sys.stderr)  # sys.stderr now, not at import (it may be replaced)
        self.label, self.every_s, self.t_node, self.t_all = label, every_s, time.time(), time.time()
        self.t_line = time.time()
        self.phase = ""

    def node(self, nid):
        if nid is None or nid not in self.prompt:
            return
        kind = self.prompt[nid]["class_type"]
        self.phase, self.t_node = PHASES.get(kind, kind), time.time()
        title = self.prompt[nid].get("_meta", {}).get("title") or kind
        self._line(f"{self.label}[{time.time() - self.t_all:4.0f}s] {self.phase}: node {nid} ({title})")

    def step(self, value, total):
        mark = (value, total)
        elapsed = time.time() - self.t_node
        eta = elapsed / value * (total - value) if value else 0.0
        text = f"    {self.phase} step {value}/{total}, {elapsed:.0f}s elapsed, ETA {eta:.0f}s"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if value >= total else ""))
            self.stream.flush()
        elif mark != self.last and (value >= total or value % max(1, total // 4) == 0
                                    or time.time() - self.t_line >= self.every_s):
            self._line(text)
            self.t_line = time.time()
        self.last = mark


class PatientServer:
    """The server as comfy_client.run_prompt's client, patient with a busy machine: a /history request that
    times out (measured: over 60 s at load 29 on 2 cores, while a 1-thread server tuned) counts as "not
    finished yet" instead of ending the run; a server process that died still raises at once."""

    def __init__(self, server):
        self.server, self.url = server, server.url

    def queue(self, prompt: dict, client_id: str = "tav") -> str:
        return self.server.queue(prompt, client_id)

    def finished(self, prompt_id: str):
        import urllib.error

        self.server.check_alive()
        try:
            return self.server.finished(prompt_id)
        except (TimeoutError, urllib.error.URLError, ConnectionError):
            return None

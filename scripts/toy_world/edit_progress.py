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

    def __init__(self, prompt: dict, stream=sys.stderr, label: str = "", every_s: float = 20.0):
        super().__init__(prompt, stream)
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

"""A short, deterministic sample clip for the demo and tests (no external media needed).

A red disc slides left to right over a slowly shifting gradient while a blue square bobs up and
down: enough motion for inversion and editing to be visible. h264 mp4 (yuv420p), same pixels every run.

    python scripts/toy_world/make_sample_clip.py out/tav_sample.mp4 [--seconds 2 --fps 24 --size 512]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import av
import numpy as np


def render_frame(t: float, size: int) -> np.ndarray:
    """Frame at time fraction t in [0, 1]: uint8 RGB [size, size, 3]."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    frame = np.stack([0.25 + 0.25 * xs, 0.35 + 0.3 * ys, 0.55 + 0.2 * np.sin(2 * np.pi * (xs + t))], -1)
    cx, cy, r = 0.15 + 0.7 * t, 0.6, 0.12
    frame[(xs - cx) ** 2 + (ys - cy) ** 2 < r * r] = (0.9, 0.15, 0.1)
    sy = 0.25 + 0.12 * np.sin(2 * np.pi * t)
    frame[(np.abs(xs - 0.7) < 0.08) & (np.abs(ys - sy) < 0.08)] = (0.1, 0.2, 0.85)
    return (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)


def make_sample_clip(path: Path, seconds: float = 2.0, fps: int = 24, size: int = 512) -> Path:
    """Write the clip (seconds * fps frames, size x size, h264) to path and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = max(1, round(seconds * fps))
    tmp = path.with_name(path.stem + ".part" + path.suffix)
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1  # one encoder thread: identical bytes on every machine
        stream.options = {"crf": "18"}
        for i in range(frames):
            image = av.VideoFrame.from_ndarray(render_frame(i / max(1, frames - 1), size), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--size", type=int, default=512, help="width = height in pixels (even)")
    a = p.parse_args(argv)
    if a.size % 2 or a.size < 16:
        p.error("--size must be an even number >= 16 (h264 yuv420p)")
    print(make_sample_clip(a.path, a.seconds, a.fps, a.size).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())

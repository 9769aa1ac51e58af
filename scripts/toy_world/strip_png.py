"""The toy-world strip as a PNG: one row of frames per clip, each row's name drawn in a margin at its left."""
from __future__ import annotations

from pathlib import Path

ROW_LABELS = {"source": "source", "tune_a_video": "Tune-A-Video", "no_injection": "TAV, no injection",
              "no_inversion": "TAV, random noise", "per_frame": "per-frame"}
MARGIN = 120  # px of label column: the longest label in PIL's default bitmap font fits


def labelled_strip(clips: dict, labels: dict | None = None):
    """PIL image: clips (name -> IMAGE [F, H, W, 3], same shapes; rows in dict order) side by side per row,
    each row's label (labels, else ROW_LABELS, else its name) written in white on the left margin."""
    import numpy as np
    from PIL import Image, ImageDraw

    labels = {**ROW_LABELS, **(labels or {})}
    rows = [np.concatenate([(f.float().numpy() * 255).round().astype(np.uint8) for f in clip], axis=1)
            for clip in clips.values()]
    height = rows[0].shape[0]
    image = Image.new("RGB", (MARGIN + rows[0].shape[1], height * len(rows)), (32, 32, 32))
    draw = ImageDraw.Draw(image)
    for i, (name, row) in enumerate(zip(clips, rows)):
        image.paste(Image.fromarray(row), (MARGIN, i * height))
        draw.text((4, i * height + height // 2 - 6), labels.get(name, name), fill=(255, 255, 255))
    return image


def save_strip(clips: dict, path: Path, labels: dict | None = None) -> str:
    """Write labelled_strip(clips) to path (PNG); the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_strip(clips, labels).save(path)
    return str(path)

"""Template thumbnails and node-help pictures, cut from the toy-world strip (docs/toy_world_edits.png).

The strip is what `toy_world_edit.py` wrote for the README: two edits, each 5 rows of 8 frames (96x96):
source, Tune-A-Video (toy settings), the same without feature injection, random start noise, per-frame
editing; top: a green circle out and back -> "a red circle", bottom: a blue bar on a zigzag -> "a yellow
circle"; an 8-pixel white line between them. From it:

  workflows/<template>.jpg     ComfyUI's Templates browser shows `<name>.jpg` beside a custom node's
                               workflows/<name>.json (frontend: mediaSubtype "jpg", no "-1" suffix)
  web/docs/toy_world_edit.png  the top edit, all 5 rows, for the node help pages

    python scripts/toy_world/make_thumbnails.py [--strip docs/toy_world_edits.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[2]
FRAME, FRAMES, ROWS, GAP = 96, 8, 5, 8  # the strip's layout (toy_world_edit.py)
SOURCE, TAV, NO_INJECTION, RANDOM_NOISE, PER_FRAME = range(ROWS)
THUMB = 384  # square: cards crop to their own aspect; the black margin is the toy world's background

# template -> (edit: 0 top / 1 bottom, rows shown): what each graph does, shown by the toy world
TEMPLATES = {
    "tav_tune_and_edit": (0, (SOURCE, TAV)),         # tune on the source, invert, sample the edit
    "tav_video_edit": (1, (SOURCE, PER_FRAME)),      # untuned: invert and sample the edit
    "tav_text_to_video": (0, (RANDOM_NOISE,)),       # frames sampled from noise, no source clip
}


def row(strip, edit: int, r: int, frames=range(0, FRAMES, 2)):
    """Frames of one row of one edit, side by side (every other frame: 4 of 8)."""
    from PIL import Image

    top = edit * (ROWS * FRAME + GAP) + r * FRAME
    out = Image.new("RGB", (FRAME * len(frames), FRAME))
    for i, f in enumerate(frames):
        out.paste(strip.crop((f * FRAME, top, (f + 1) * FRAME, top + FRAME)), (i * FRAME, 0))
    return out


def thumbnail(strip, edit: int, rows) -> "Image.Image":
    """The rows stacked with a frame's height between them, centred on a black THUMB x THUMB square."""
    from PIL import Image

    parts = [row(strip, edit, r) for r in rows]
    height = len(parts) * FRAME + (len(parts) - 1) * FRAME // 2
    out = Image.new("RGB", (THUMB, THUMB))
    y = (THUMB - height) // 2
    for part in parts:
        out.paste(part, ((THUMB - part.width) // 2, y))
        y += FRAME + FRAME // 2
    return out


def main(argv=None) -> int:
    from PIL import Image

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strip", type=Path, default=PACK_DIR / "docs" / "toy_world_edits.png")
    a = p.parse_args(argv)
    strip = Image.open(a.strip).convert("RGB")
    expected = (FRAMES * FRAME, 2 * ROWS * FRAME + GAP)
    if strip.size != expected:
        raise SystemExit(f"{a.strip}: {strip.size[0]}x{strip.size[1]}, expected the toy-world strip's {expected}")
    for name, (edit, rows) in TEMPLATES.items():
        path = PACK_DIR / "workflows" / f"{name}.jpg"
        thumbnail(strip, edit, rows).save(path, quality=90)
        print(path)
    help_picture = PACK_DIR / "web" / "docs" / "toy_world_edit.png"
    help_picture.parent.mkdir(parents=True, exist_ok=True)
    strip.crop((0, 0, FRAMES * FRAME, ROWS * FRAME)).save(help_picture, optimize=True)
    print(help_picture)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

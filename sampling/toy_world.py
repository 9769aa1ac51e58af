"""The toy world: one flat-coloured object on black, its clips, and scores computed from frames alone.

A closed vocabulary small enough to train a checkpoint for on a CPU (scripts/toy_world/build_toy_world.py) and
to score an edit automatically: prompts are "a <colour> <shape>" with COLOURS x SHAPES. An object has
a colour, a shape, a size (object_size(frame_size), the same for every shape) and a position: its area
centroid in pixels (x, y). A clip is the object moved along a trajectory (TRAJECTORIES).

    frames = render_clip("red", "circle", "left_to_right", frames=8, frame_size=64)  # [8, 64, 64, 3]
    scores = score_edit(edited_frames, frames, "blue", "ring")

Frames are ComfyUI IMAGE tensors: float [frames, height, width, 3] in 0..1.
"""
from __future__ import annotations

import math

import torch

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
           "yellow": (1.0, 1.0, 0.0)}
# Shapes that differ at the scale of the 12x12 latent grid (4.8 cells per object): a disc, a ring (a hole of
# 2.4 cells) and a flat bar (aspect 25:8). Squares and triangles, which differ from a disc only in their corners,
# were drawn as blobs by a UNet trained within the CPU budget (v3: 32 % each, circles 100 %).
SHAPES = ("circle", "ring", "bar")
SIZE_FRACTION = 0.4  # object size / frame size: 38.4 px at 96x96, 4.8 latent cells
RING_HOLE = 0.5      # ring: inner diameter / outer diameter (= size)
BAR_WIDTH, BAR_HEIGHT = 1.25, 0.4  # bar: width and height / size
# Area of each shape / size^2.
AREA_FACTOR = {"circle": math.pi / 4, "ring": math.pi / 4 * (1 - RING_HOLE ** 2), "bar": BAR_WIDTH * BAR_HEIGHT}

# Named paths in unit coordinates (0..1 of the range where the object stays inside the frame).
TRAJECTORIES = {
    "left_to_right": lambda t: (t, 0.5),
    "right_to_left": lambda t: (1 - t, 0.5),
    "top_to_bottom": lambda t: (0.5, t),
    "bottom_to_top": lambda t: (0.5, 1 - t),
    "diagonal": lambda t: (t, t),
    "anti_diagonal": lambda t: (1 - t, t),
    "arc": lambda t: (t, 1 - math.sin(math.pi * t)),
    "zigzag": lambda t: (t, 1 - abs(2 * ((2 * t) % 1) - 1)),
    "circle": lambda t: (0.5 + 0.5 * math.cos(2 * math.pi * t), 0.5 + 0.5 * math.sin(2 * math.pi * t)),
    "wave": lambda t: (t, 0.5 + 0.5 * math.sin(2 * math.pi * t)),
    "back_and_forth": lambda t: (1 - abs(2 * t - 1), 0.25 + 0.5 * t),
    "drop": lambda t: (0.3 + 0.4 * t, t * t),
    "still": lambda t: (0.5, 0.5),
}


def prompt(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def parse_prompt(text: str) -> tuple[str, str]:
    """(colour, shape) named in a toy-world prompt, or ValueError listing the vocabulary."""
    words = text.lower().replace(",", " ").split()
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    if len(colours) != 1 or len(shapes) != 1:
        raise ValueError(f"a toy-world prompt names one colour ({', '.join(COLOURS)}) and one shape "
                         f"({', '.join(SHAPES)}), e.g. 'a red circle'; got {text!r}")
    return colours[0], shapes[0]


def object_size(frame_size: int) -> float:
    return SIZE_FRACTION * frame_size


def position_range(frame_size: int) -> tuple[float, float]:
    """Lowest and highest centroid coordinate (both axes) that keeps every shape inside the frame (1 px margin)."""
    reach = object_size(frame_size) * max(0.5, BAR_WIDTH / 2)  # the bar's ends reach furthest
    return reach + 1, frame_size - reach - 1


def shape_masks(shapes, centres, frame_size: int, size: float | None = None) -> torch.Tensor:
    """Bool masks [N, frame_size, frame_size]: shapes[i] with its area centroid at centres[i] = (x, y).

    Pixel (row, col) covers [col, col+1) x [row, row+1); it is inside when its centre is. Every shape is
    centred on its centroid: circle (diameter size), ring (the same with a hole of RING_HOLE * size), bar
    (BAR_WIDTH * size wide, BAR_HEIGHT * size high).
    """
    size = object_size(frame_size) if size is None else size
    c = torch.stack([torch.as_tensor(p, dtype=torch.float32).reshape(2) for p in centres])
    grid = torch.arange(frame_size, dtype=torch.float32) + 0.5
    dx = grid.view(1, 1, -1) - c[:, 0].view(-1, 1, 1)
    dy = grid.view(1, -1, 1) - c[:, 1].view(-1, 1, 1)
    half = size / 2
    r2 = dx ** 2 + dy ** 2
    circle = r2 <= half ** 2
    ring = circle & (r2 > (half * RING_HOLE) ** 2)
    bar = (dx.abs() <= half * BAR_WIDTH) & (dy.abs() <= half * BAR_HEIGHT)
    index = torch.tensor([SHAPES.index(s) for s in shapes]).view(-1, 1, 1)
    return torch.where(index == 0, circle, torch.where(index == 1, ring, bar))


def render(colours, shapes, centres, frame_size: int = 64) -> torch.Tensor:
    """IMAGE [N, H, W, 3]: object i of colours[i], shapes[i] at centres[i] on black."""
    masks = shape_masks(shapes, centres, frame_size)
    rgb = torch.tensor([COLOURS[c] for c in colours]).view(-1, 1, 1, 3)
    return masks.unsqueeze(-1).float() * rgb


def trajectory(kind: str, frames: int, frame_size: int = 64) -> torch.Tensor:
    """Centroids [frames, 2] (x, y) in pixels along TRAJECTORIES[kind], first to last frame."""
    if kind not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory {kind!r}; one of {', '.join(TRAJECTORIES)}")
    lo, hi = position_range(frame_size)
    ts = [i / max(1, frames - 1) for i in range(frames)]
    unit = torch.tensor([TRAJECTORIES[kind](t) for t in ts], dtype=torch.float32)
    return lo + unit * (hi - lo)


def render_clip(colour: str, shape: str, kind: str, frames: int = 8, frame_size: int = 64) -> torch.Tensor:
    """IMAGE [frames, H, W, 3]: the object moving along trajectory `kind`."""
    centres = trajectory(kind, frames, frame_size)
    return render([colour] * frames, [shape] * frames, centres, frame_size)


def random_scenes(n: int, frame_size: int, generator: torch.Generator):
    """n random (colours, shapes, centres): uniform vocabulary, uniform position in range."""
    names = list(COLOURS)
    ci = torch.randint(len(names), (n,), generator=generator)
    si = torch.randint(len(SHAPES), (n,), generator=generator)
    lo, hi = position_range(frame_size)
    centres = lo + torch.rand(n, 2, generator=generator) * (hi - lo)
    return [names[i] for i in ci], [SHAPES[i] for i in si], centres


# --- scores from frames alone ---------------------------------------------------------------

def find_object(frame: torch.Tensor) -> dict | None:
    """The object in one frame [H, W, 3]: colour, shape, centroid (x, y), area, mean rgb; None if empty.

    Object pixels: brightest channel > 0.5. Colour: the palette entry nearest the mean object colour.
    Shape: best overlap (IoU) with each shape rendered at the object's centroid and area.
    """
    frame = frame.float()
    mask = frame.amax(-1) > 0.5
    area = int(mask.sum())
    if area == 0:
        return None
    rows, cols = torch.nonzero(mask, as_tuple=True)
    centre = (float(cols.float().mean()) + 0.5, float(rows.float().mean()) + 0.5)
    mean_rgb = frame[mask].mean(0)
    palette = torch.tensor(list(COLOURS.values()))
    colour = list(COLOURS)[int(((palette - mean_rgb) ** 2).sum(-1).argmin())]
    ious = {}
    for shape in SHAPES:
        size = math.sqrt(area / AREA_FACTOR[shape])
        template = shape_masks([shape], [centre], frame.shape[0], size)[0]
        ious[shape] = float((template & mask).sum() / (template | mask).sum())
    shape = max(ious, key=ious.get)
    return {"colour": colour, "shape": shape, "centre": centre, "area": area, "rgb": mean_rgb,
            "iou": ious[shape]}


def score_edit(edited: torch.Tensor, source: torch.Tensor, colour: str, shape: str,
               background_tolerance: float = 0.1) -> dict:
    """Toy-world scores of an edited clip against its source clip (IMAGE [F, H, W, 3] each).

    edit_accuracy: share of frames whose object has the prompt's colour and shape (colour_accuracy,
      shape_accuracy: each alone). motion_error_px: mean distance between edited and source centroids
      (a frame without an object counts as frame_size px). colour_spread: mean distance of each frame's
      object colour to the clip's mean (0 = constant colour); size_spread: std/mean of the object's area
      (0 = constant size). background_kept: share of pixels away from both objects (2 px margin) that
      stay within background_tolerance of the source.
    """
    if edited.shape != source.shape:
        raise ValueError(f"edited clip {tuple(edited.shape)} and source clip {tuple(source.shape)} differ in shape")
    frames, size = edited.shape[0], edited.shape[1]
    found = [find_object(f) for f in edited]
    ref = [find_object(f) for f in source]
    colour_ok = [o is not None and o["colour"] == colour for o in found]
    shape_ok = [o is not None and o["shape"] == shape for o in found]
    dists = [math.dist(o["centre"], r["centre"]) if o is not None and r is not None else float(size)
             for o, r in zip(found, ref)]
    present = [o for o in found if o is not None]
    if present:
        rgb = torch.stack([o["rgb"] for o in present])
        colour_spread = float((rgb - rgb.mean(0)).norm(dim=-1).mean())
        areas = torch.tensor([float(o["area"]) for o in present])
        size_spread = float(areas.std(unbiased=False) / areas.mean())
    else:
        colour_spread = size_spread = float("nan")
    objects = (edited.float().amax(-1) > 0.5) | (source.float().amax(-1) > 0.5)
    near = torch.nn.functional.max_pool2d(objects.float().unsqueeze(1), 5, 1, 2).squeeze(1) > 0
    kept = ((edited.float() - source.float()).abs().amax(-1) <= background_tolerance)[~near]
    return {
        "frames": frames,
        "edit_accuracy": sum(c and s for c, s in zip(colour_ok, shape_ok)) / frames,
        "colour_accuracy": sum(colour_ok) / frames,
        "shape_accuracy": sum(shape_ok) / frames,
        "motion_error_px": sum(dists) / frames,
        "colour_spread": colour_spread,
        "size_spread": size_spread,
        "background_kept": float(kept.float().mean()) if kept.numel() else 1.0,
    }


def strip(clips) -> torch.Tensor:
    """IMAGE [1, rows * H, F * W, 3]: one row per clip (IMAGE [F, H, W, 3], same shapes), frames side by side."""
    return torch.cat([torch.cat(list(c.float()), 1) for c in clips], 0).unsqueeze(0)

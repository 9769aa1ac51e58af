"""Video decoding for Tune-A-Video: streaming frame sampling with resize + centre crop.

Decoding uses PyAV (FFmpeg), which ComfyUI itself requires; animated WebP, which FFmpeg cannot
decode, and folders of images use Pillow. Frames are pulled one at a time: only frames that are
picked get converted to RGB and resized, and reading stops at the last picked frame, so memory is
bounded by the output clip, not by the length of the file. Plain file/array work (ComfyUI's VIDEO
type is imported only when one is passed); which file a node's `video` names is video_inputs.py.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from functools import partial

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .video_encode import to_uint8

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif", ".webp")
PILLOW_ANIMATED = (".webp",)  # FFmpeg has no animated-WebP decoder
DEFAULT_FPS = 8.0  # for sources without a frame rate (image folders); Tune-A-Video's own save rate


@dataclass
class LoadedClip:
    frames: torch.Tensor  # [F, H, W, 3] float32 in [0, 1]
    fps: float            # rate of the returned frames: source fps / select_every_nth
    source_fps: float
    frames_read: int      # source frames pulled from the decoder (streaming stops at the last one needed)


def check_sampling(frame_load_cap, skip_first_frames, select_every_nth, width, height):
    """ValueError naming the input when a sampling setting cannot give a Tune-A-Video clip."""
    if frame_load_cap < 1:
        raise ValueError(f"frame_load_cap={frame_load_cap}: at least 1 frame must be loaded "
                         "(Tune-A-Video uses 8-24).")
    if skip_first_frames < 0:
        raise ValueError(f"skip_first_frames={skip_first_frames} must be 0 or more.")
    if select_every_nth < 1:
        raise ValueError(f"select_every_nth={select_every_nth} must be 1 (every frame) or more.")
    for name, value in (("width", width), ("height", height)):
        if value < 8 or value % 8:
            lower, upper = max(8, value // 8 * 8), (value // 8 + 1) * 8
            raise ValueError(f"{name}={value} is not a multiple of 8 (the VAE works on 8x8 pixel "
                             f"blocks): use {lower} or {upper}.")


def resize_center_crop(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [height, width, 3]: the largest centred box of the target aspect
    ratio, resized (Lanczos) to exactly width x height. Nothing is stretched."""
    src_h, src_w = rgb.shape[:2]
    if (src_w, src_h) == (width, height):
        return rgb
    if src_w * height > width * src_h:  # source is wider: cut left and right
        box_w, box_h = src_h * width / height, src_h
    else:                                # source is taller: cut top and bottom
        box_w, box_h = src_w, src_w * height / width
    x0, y0 = (src_w - box_w) / 2, (src_h - box_h) / 2
    image = Image.fromarray(rgb).resize((width, height), Image.Resampling.LANCZOS,
                                        box=(x0, y0, x0 + box_w, y0 + box_h))
    return np.asarray(image)


# --- Frame sources: each yields (fps or None, iterator of zero-argument loaders -> uint8 RGB). ---
# A loader is called only for frames that are picked, so skipped frames are never converted.

@contextlib.contextmanager
def _open_av(source):
    container = av.open(source, mode="r")
    with container:
        if not container.streams.video:
            raise ValueError("it contains no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        yield (float(rate) if rate else None), (
            partial(frame.to_ndarray, format="rgb24") for frame in container.decode(stream))


@contextlib.contextmanager
def _open_pillow_animation(path):
    with Image.open(path) as image:
        image.load()  # per-frame info such as duration is only set once a frame is read
        duration = image.info.get("duration") or 0

        def frames():
            for index in range(getattr(image, "n_frames", 1)):
                image.seek(index)
                yield lambda: np.asarray(image.convert("RGB"))
        yield (1000.0 / duration if duration else None), frames()


def _natural_key(name):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def image_files(folder) -> list[str]:
    """Image files of a folder in natural order (frame2 before frame10); regular files only (a named
    pipe would block reading)."""
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)
             and not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _read_image(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@contextlib.contextmanager
def _open_folder(folder):
    files = image_files(folder)
    if not files:
        raise ValueError(f"the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    yield None, (partial(_read_image, f) for f in files)


def _open_path(path):
    if os.path.isdir(path):
        return _open_folder(path)
    if path.lower().endswith(PILLOW_ANIMATED):
        return _open_pillow_animation(path)
    return _open_av(path)


def _tensor_frames(images: torch.Tensor):
    return (partial(to_uint8, frame) for frame in images)


def _sample(frames, frame_load_cap, skip_first_frames, select_every_nth, width, height, label):
    """Pick frames skip_first_frames + k * select_every_nth (k < frame_load_cap), resizing each as
    it is picked; stop reading at the last one. Returns (uint8 [F, H, W, 3], frames read)."""
    picked, read = [], 0
    for index, load in enumerate(frames):
        read = index + 1
        offset = index - skip_first_frames
        if offset >= 0 and offset % select_every_nth == 0:
            picked.append(resize_center_crop(load(), width, height))
            if len(picked) == frame_load_cap:
                break
    if read == 0:
        raise ValueError(f"{label} decodes to 0 frames (its video stream is empty or unreadable). "
                         "Re-export the video, or choose another file.")
    if len(picked) < frame_load_cap:
        available = len(picked)
        if available == 0:
            hint = f"lower skip_first_frames below {read}"
        else:
            hint = (f"lower frame_load_cap to {available}, or lower select_every_nth or "
                    "skip_first_frames")
        raise ValueError(
            f"{label} has {read} frames: skip_first_frames={skip_first_frames} and "
            f"select_every_nth={select_every_nth} leave {available}, but frame_load_cap asks for "
            f"{frame_load_cap}. Use a longer video or {hint}.")
    return np.stack(picked), read


def _load(open_source, label, frame_load_cap, skip_first_frames, select_every_nth, width, height):
    check_sampling(frame_load_cap, skip_first_frames, select_every_nth, width, height)
    try:
        with open_source() as (source_fps, frames):
            clip, read = _sample(frames, frame_load_cap, skip_first_frames, select_every_nth,
                                 width, height, label)
    except (av.error.FFmpegError, UnidentifiedImageError, OSError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__  # str(error) names the server path
        raise ValueError(f"{label} could not be decoded ({reason}). Check that the file is a complete "
                         "mp4/webm/mov/gif/webp video or a folder of images; re-export it if "
                         "it is damaged.") from error
    except ValueError as error:
        if str(error).startswith(label):
            raise
        raise ValueError(f"{label}: {error}.") from error
    source_fps = source_fps or DEFAULT_FPS
    frames = torch.from_numpy(clip).to(torch.float32).div_(255.0)
    return LoadedClip(frames, source_fps / select_every_nth, source_fps, read)


def load_frames(path, frame_load_cap=24, skip_first_frames=0, select_every_nth=2,
                width=512, height=512, label=None) -> LoadedClip:
    """Sample a clip from a video file, an animated gif/webp or a folder of images.

    Frames are indexed in decode order (no resampling to a constant rate). Raises ValueError when
    the source is missing, damaged or too short for the request (no silent clamping: downstream
    latents and prompts are set up for an exact frame count).
    """
    label = label or f"video '{os.path.basename(os.path.normpath(path))}'"
    if not os.path.exists(path):
        raise ValueError(f"{label} does not exist.")
    return _load(partial(_open_path, path), label, frame_load_cap, skip_first_frames,
                 select_every_nth, width, height)


def load_frames_from_video(video, frame_load_cap=24, skip_first_frames=0, select_every_nth=2,
                           width=512, height=512, label="video_input") -> LoadedClip:
    """The same sampling for ComfyUI's VIDEO type: file-backed videos are streamed; videos built
    from components (CreateVideo) are already in memory and are indexed."""
    from .video_encode import core_video_api

    VideoFromFile = core_video_api()[1]
    if isinstance(video, VideoFromFile):
        return _load(partial(_open_av, video.get_stream_source()), label, frame_load_cap,
                     skip_first_frames, select_every_nth, width, height)
    components = video.get_components()

    @contextlib.contextmanager
    def open_components():
        yield float(components.frame_rate or 0) or None, _tensor_frames(components.images)
    return _load(open_components, label, frame_load_cap, skip_first_frames, select_every_nth,
                 width, height)

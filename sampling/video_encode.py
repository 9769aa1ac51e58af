"""Video encoding for Tune-A-Video: IMAGE frames to mp4/gif/webp, into ComfyUI's output folder.

encode_clip is plain file/array work; save_clip and as_video use ComfyUI (folder_paths, comfy_api).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from fractions import Fraction

import av
import numpy as np
import torch
from PIL import Image

from .validation import check_filename_prefix, check_save_folder

SAVE_FORMATS = {  # format -> (extension, MIME-like tag reported to the UI/API)
    "mp4": ("mp4", "video/h264-mp4"),
    "gif": ("gif", "image/gif"),
    "webp": ("webp", "image/webp"),
}
MP4_CRF = 19  # visually near-lossless h264
GIF_TICKS = 100  # gif frame delays are whole 1/100 s
GIF_MIN_DELAY = 2  # browsers play a delay under 2/100 s as 1/10 s
GIF_MAX_FPS = GIF_TICKS / GIF_MIN_DELAY


def to_uint8(frame: torch.Tensor) -> np.ndarray:
    """One IMAGE frame [H, W, C] (float 0..1, C = 1, 3 or 4) -> uint8 RGB [H, W, 3]."""
    frame = frame.detach().to("cpu", torch.float32)
    if frame.shape[-1] == 1:
        frame = frame.expand(*frame.shape[:-1], 3)
    return (frame[..., :3] * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def _even_crop(frame: np.ndarray) -> np.ndarray:
    # h264 in yuv420p (what browsers play) needs even sides: drop a last odd row/column.
    h, w = frame.shape[:2]
    return frame[: h - h % 2, : w - w % 2]


def gif_delays(frames: int, fps: float) -> list[int]:
    """Each frame's delay in 1/100 s for a gif that plays at `fps` (at most GIF_MAX_FPS): frame i starts at
    i / fps rounded to the nearest 1/100 s (halves up), so every delay is 100 / fps rounded down or up (8 fps:
    13, 12, 13, 12, ...) and the clip lasts frames / fps to the nearest 1/100 s."""
    starts = [math.floor(GIF_TICKS * i / fps + 0.5) for i in range(frames + 1)]
    return [end - start for start, end in zip(starts, starts[1:])]


def check_fps(fps, fmt: str):
    """fps > 0, and at most GIF_MAX_FPS for gif; ValueError naming fps and what to do."""
    if not fps > 0:
        raise ValueError(f"fps={fps} must be greater than 0: connect Load Frames' fps or type a rate such as 8.")
    if fmt == "gif" and fps > GIF_MAX_FPS:
        raise ValueError(f"fps={fps:g} is too fast for a gif: gif frame delays are whole 1/100 s and browsers play "
                         f"delays under 2/100 s at 10 fps, so a gif plays at most {GIF_MAX_FPS:g} fps. Set fps to "
                         f"{GIF_MAX_FPS:g} or less (Load Frames' select_every_nth 2 halves a clip's rate), or "
                         "choose format mp4 or webp.")


def encode_clip(images: torch.Tensor, path, fmt: str, fps: float, metadata: dict | None = None):
    """Write IMAGE frames [F, H, W, C] to path as mp4 (h264, yuv420p, crf 19), gif or webp.

    Frames are converted one at a time. mp4 drops a last odd row/column (yuv420p needs even sides).
    webp stores durations in whole milliseconds; gif in 1/100 s (gif_delays: each frame at i / fps to the
    nearest 1/100 s; over GIF_MAX_FPS is refused, browsers would play it at 10 fps). Their encoders may merge
    identical (webp: near-identical) consecutive frames into one longer frame (same playback). metadata (mp4 only):
    str -> JSON-able values written as container tags, as core SaveVideo does.
    """
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"format='{fmt}' is not one of {', '.join(SAVE_FORMATS)}.")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty IMAGE batch [frames, height, width, channels], "
                         f"got shape {tuple(images.shape)}.")
    check_fps(fps, fmt)
    frames = (to_uint8(frame) for frame in images)
    if fmt == "mp4":
        height, width = images.shape[1] - images.shape[1] % 2, images.shape[2] - images.shape[2] % 2
        if width < 2 or height < 2:
            raise ValueError(f"images of {images.shape[2]}x{images.shape[1]} are too small for mp4.")
        with av.open(str(path), mode="w", options={"movflags": "use_metadata_tags+faststart"}) as out:
            for key, value in (metadata or {}).items():
                out.metadata[key] = json.dumps(value)
            stream = out.add_stream("libx264", rate=Fraction(round(fps * 1000), 1000))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(MP4_CRF)}
            for frame in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(_even_crop(frame), format="rgb24")))
            out.mux(stream.encode())
        return
    first = Image.fromarray(next(frames))
    rest = (Image.fromarray(frame) for frame in frames)
    if fmt == "webp":
        options = {"quality": 90, "method": 4, "duration": max(1, round(1000 / fps))}
    else:  # Pillow takes milliseconds and writes whole 1/100 s
        options = {"optimize": False, "duration": [10 * d for d in gif_delays(images.shape[0], fps)]}
    first.save(str(path), format=fmt.upper(), save_all=True, append_images=rest, loop=0, **options)


def core_video_api():
    """(VideoFromComponents, VideoFromFile, VideoComponents) from ComfyUI's pinned API version
    (comfy_api.v0_0_2, which maintainers recommend over `latest`), else from the older module paths
    (now compatibility re-exports); None where this ComfyUI has no core VIDEO type."""
    try:
        from comfy_api.v0_0_2 import InputImpl, Types
        return InputImpl.VideoFromComponents, InputImpl.VideoFromFile, Types.VideoComponents
    except (ImportError, AttributeError):
        pass
    try:
        from comfy_api.input_impl import VideoFromComponents, VideoFromFile
        from comfy_api.util import VideoComponents
    except ImportError:
        return None
    return VideoFromComponents, VideoFromFile, VideoComponents


def core_video_type() -> bool:
    """Whether this ComfyUI has the core VIDEO type."""
    return core_video_api() is not None


def as_video(images: torch.Tensor, fps: float):
    """IMAGE frames as a core VIDEO (in memory: the frames themselves, not a re-decoded file)."""
    VideoFromComponents, _, VideoComponents = core_video_api()
    return VideoFromComponents(VideoComponents(images=images, frame_rate=Fraction(round(fps * 1000), 1000)))


def save_clip(images, fps, fmt, filename_prefix, metadata=None) -> dict:
    """Encode into ComfyUI's output folder with the usual prefix/counter; return the UI result.

    The result is what the node returns under "ui" (and what /history lists as its outputs):
    {"images": [{"filename", "subfolder", "type": "output", "format", "frame_rate", "frame_count"}],
     "animated": (True,)}. Frontend 1.32 shows "animated" results named *.webp/*.png as an animated
    <img> and all others in a <video> element (core SaveVideo/SaveAnimatedWEBP do the same). A <video>
    cannot play a gif, so gif results omit "animated" and are shown as an image.
    """
    import folder_paths

    if fmt not in SAVE_FORMATS:
        raise ValueError(f"format='{fmt}' is not one of {', '.join(SAVE_FORMATS)}.")
    check_filename_prefix(filename_prefix)
    check_fps(fps, fmt)
    output = folder_paths.get_output_directory()
    check_save_folder(output, filename_prefix)
    extension, tag = SAVE_FORMATS[fmt]
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, output, images.shape[2], images.shape[1])
    file = f"{filename}_{counter:05}_.{extension}"
    try:
        encode_clip(images, os.path.join(folder, file), fmt, fps, metadata)
    except BaseException:  # an error or a cancel mid-encoding leaves no half-written video
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, file))
        raise
    entry = {"filename": file, "subfolder": subfolder, "type": "output", "format": tag,
             "frame_rate": float(fps), "frame_count": int(images.shape[0])}
    ui = {"images": [entry]}
    if fmt != "gif":
        ui["animated"] = (True,)
    return ui

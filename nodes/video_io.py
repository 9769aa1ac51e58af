"""Video in and out for Tune-A-Video: streaming frame sampling, resize + centre crop, mp4/gif/webp.

Decoding uses PyAV (FFmpeg), which ComfyUI itself requires; animated WebP, which FFmpeg cannot
decode, and folders of images use Pillow. Frames are pulled one at a time: only frames that are
picked get converted to RGB and resized, and reading stops at the last picked frame, so memory is
bounded by the output clip, not by the length of the file.

The functions below the "ComfyUI glue" line use folder_paths; everything above is plain
file/array work, testable without ComfyUI.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..sampling.validation import (check_filename_prefix, check_name, check_readable, check_save_folder,
                                   inside)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif", ".webp")
PILLOW_ANIMATED = (".webp",)  # FFmpeg has no animated-WebP decoder
DEFAULT_FPS = 8.0  # for sources without a frame rate (image folders); Tune-A-Video's own save rate
SAVE_FORMATS = {  # format -> (extension, MIME-like tag reported to the UI/API)
    "mp4": ("mp4", "video/h264-mp4"),
    "gif": ("gif", "image/gif"),
    "webp": ("webp", "image/webp"),
}
MP4_CRF = 19  # visually near-lossless h264


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


def _to_uint8(frame: torch.Tensor) -> np.ndarray:
    """One IMAGE frame [H, W, C] (float 0..1, C = 1, 3 or 4) -> uint8 RGB [H, W, 3]."""
    frame = frame.detach().to("cpu", torch.float32)
    if frame.shape[-1] == 1:
        frame = frame.expand(*frame.shape[:-1], 3)
    return (frame[..., :3] * 255).round().clamp(0, 255).to(torch.uint8).numpy()


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
    return (partial(_to_uint8, frame) for frame in images)


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
    from comfy_api.input_impl import VideoFromFile

    if isinstance(video, VideoFromFile):
        return _load(partial(_open_av, video.get_stream_source()), label, frame_load_cap,
                     skip_first_frames, select_every_nth, width, height)
    components = video.get_components()

    @contextlib.contextmanager
    def open_components():
        yield float(components.frame_rate or 0) or None, _tensor_frames(components.images)
    return _load(open_components, label, frame_load_cap, skip_first_frames, select_every_nth,
                 width, height)


# --- Encoding ---

def _even_crop(frame: np.ndarray) -> np.ndarray:
    # h264 in yuv420p (what browsers play) needs even sides: drop a last odd row/column.
    h, w = frame.shape[:2]
    return frame[: h - h % 2, : w - w % 2]


def encode_clip(images: torch.Tensor, path, fmt: str, fps: float, metadata: dict | None = None):
    """Write IMAGE frames [F, H, W, C] to path as mp4 (h264, yuv420p, crf 19), gif or webp.

    Frames are converted one at a time. mp4 drops a last odd row/column (yuv420p needs even sides).
    gif/webp store durations in whole milliseconds (gif: 10 ms steps), and their encoders may merge
    identical (webp: near-identical) consecutive frames into one longer frame (same playback). metadata (mp4 only):
    str -> JSON-able values written as container tags, as core SaveVideo does.
    """
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"format='{fmt}' is not one of {', '.join(SAVE_FORMATS)}.")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty IMAGE batch [frames, height, width, channels], "
                         f"got shape {tuple(images.shape)}.")
    if not fps > 0:
        raise ValueError(f"fps={fps} must be greater than 0: connect Load Frames' fps or type a rate such as 8.")
    frames = (_to_uint8(frame) for frame in images)
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
    options = {"quality": 90, "method": 4} if fmt == "webp" else {"optimize": False}
    first.save(str(path), format=fmt.upper(), save_all=True, append_images=rest,
               duration=max(1, round(1000 / fps)), loop=0, **options)


# --- ComfyUI glue (folder_paths) ---

def check_input_name(name) -> tuple[str, str, str]:
    """A `video` value -> (name relative to its folder, that folder, the folder in words). ValueError for
    empty, absolute or '..' names and control characters. Core's ' [input]'/' [output]'/' [temp]'
    suffixes pick the folder."""
    import folder_paths

    if not isinstance(name, str) or not name.strip():
        raise ValueError("video: no file chosen. Upload a video with the node's upload button or "
                         "copy one into ComfyUI's input folder.")
    relative, base = folder_paths.annotated_filepath(name.strip())
    tag = next((t for t in ("output", "temp") if name.strip().endswith(f"[{t}]")), "input")
    words = f"ComfyUI's {tag} folder"
    check_name(relative, "video", "clip.mp4", words)
    return relative, base or folder_paths.get_input_directory(), words


def resolve_input_path(name) -> str:
    """A `video` value -> path of an existing regular file or folder inside its ComfyUI folder (links
    are resolved: none may lead out of it); ValueError as check_input_name, or when that fails."""
    relative, base, words = check_input_name(name)
    path = check_readable(base, relative, "video", words)
    if os.path.isdir(path):
        outside = next((f for f in image_files(path) if not inside(base, f)), None)
        if outside is not None:
            raise ValueError(f"video: '{name}': {os.path.basename(outside)} is a link to a file outside {words}; "
                             "links leaving it are refused. Copy the images into the folder.")
    return path


def list_input_videos() -> list[str]:
    """Videos, animated gif/webp and image folders at the top of ComfyUI's input folder."""
    import folder_paths

    base = folder_paths.get_input_directory()
    if not os.path.isdir(base):
        return []
    names = []
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if name.startswith("."):
            continue
        if os.path.isfile(path):
            if name.lower().endswith(VIDEO_EXTENSIONS) or folder_paths.filter_files_content_types([name], ["video"]):
                names.append(name)
        elif os.path.isdir(path) and image_files(path):
            names.append(name)
    return sorted(names)


def input_signature(name) -> str:
    """Changes when the chosen file (or any image in the chosen folder) changes; for IS_CHANGED."""
    try:
        path = resolve_input_path(name)
    except ValueError:
        return ""  # the node itself reports the error
    paths = image_files(path) if os.path.isdir(path) else [path]
    return ";".join(f"{os.path.basename(p)}:{os.stat(p).st_mtime_ns}:{os.stat(p).st_size}" for p in paths)


def core_video_type() -> bool:
    """Whether this ComfyUI has the core VIDEO type (comfy_api VideoFromComponents)."""
    try:
        from comfy_api.input_impl import VideoFromComponents  # noqa: F401
        from comfy_api.util import VideoComponents  # noqa: F401
    except ImportError:
        return False
    return True


def as_video(images: torch.Tensor, fps: float):
    """IMAGE frames as a core VIDEO (in memory: the frames themselves, not a re-decoded file)."""
    from comfy_api.input_impl import VideoFromComponents
    from comfy_api.util import VideoComponents

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

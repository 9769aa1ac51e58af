"""The clip a Load Frames `video` value names, in ComfyUI's input folder (folder_paths).

Names are checked (no absolute or '..' paths, no links leaving the folder) before anything is opened.
"""
from __future__ import annotations

import os

from .validation import check_name, check_readable, inside
from .video_decode import VIDEO_EXTENSIONS, image_files

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

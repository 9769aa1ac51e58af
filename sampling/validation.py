"""Input checks shared by the nodes. Each raises ValueError naming the node input and saying what to do.

Plain functions of values and paths (no ComfyUI import): latents, step counts, adapter files and their
metadata, names of files to read or write and the folders they must stay in. Messages never show
absolute server paths: names are given as the user typed them.
"""
from __future__ import annotations

import math
import os
import re
import stat
import unicodedata

import torch

from ..attention_patches.frame_attention import MODES
from ..attention_patches.temporal_attention import TEMPORAL_INITS

MAX_STEPS = 10000
MAX_WINDOW_RADIUS = 64
MAX_FIXED_POINT_ITERATIONS = 20  # DDIM inversion refinements per step
MAX_CHUNK_FRAMES = 4096  # Long Clip
MAX_OVERLAP = 64
# VAE latents stay within about +-60 and inverted noise within a few sigma_max (~15); 1e4 is far
# beyond both and far below where fp16/fp32 model math overflows into NaN.
MAX_LATENT_MAGNITUDE = 1e4
ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BOOLEANS = ("True", "False")
MAX_NAME_BYTES = 200  # per file or folder name: 255 minus the counter and extension ComfyUI appends
MAX_PREFIX_CHARS = 1024
# Shown as nothing (or as a blank) although they are not spaces: Hangul fillers, the combining grapheme joiner.
BLANK_LOOKING = "\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0"


# --- numbers and latents ------------------------------------------------------------------------

def check_count(value, name: str, maximum: int, hint: str):
    """An integer from 1 to maximum (steps, frames), else a ValueError naming the input."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise ValueError(f"{name} must be an integer from 1 to {maximum}, got {value!r}. {hint}")


def check_steps(steps, name="steps"):
    check_count(steps, name, MAX_STEPS, "Use 50 for Tune-A-Video's DDIM inversion and sampling.")


def check_latent(latent, channels: int | None = None, name="latent") -> torch.Tensor:
    """The clip's samples [F, C, H, W] (F >= 1, C == channels when given, finite, of sane magnitude)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.is_nested or samples.ndim != 4:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) and not samples.is_nested else None
        raise ValueError(f"{name} must be a LATENT batch of frames [frames, channels, height, width], "
                         f"got {shape or type(samples).__name__}. Encode the clip's frames with VAE Encode.")
    frames, got, height, width = samples.shape
    if frames == 0:
        raise ValueError(f"{name} has 0 frames. Connect a batch with one latent per frame: VAE Encode of the "
                         "clip's frames, or Empty Latent Image with batch_size = the number of frames.")
    if height == 0 or width == 0:
        raise ValueError(f"{name} is {width}x{height} latent pixels. Encode frames of at least 8x8 pixels.")
    if channels is not None and got != channels:
        raise ValueError(f"{name} has {got} channels but this model's latents have {channels}. Encode the "
                         "frames with this checkpoint's VAE (VAE Encode), or use Empty Latent Image.")
    peak = float(samples.detach().abs().amax())
    if not math.isfinite(peak):
        raise ValueError(f"{name} contains NaN or infinite values. Re-encode the clip (VAE Encode in "
                         "fp32 if the VAE overflows) or check the node that produced it.")
    if peak > MAX_LATENT_MAGNITUDE:
        raise ValueError(f"{name} holds values up to {peak:.3g}; latents stay within about +-100, and the model "
                         "would return NaN. Check the node that produced it (a multiplier, another VAE, a damaged "
                         ".latent file) and encode the frames with VAE Encode.")
    return samples


# --- images -------------------------------------------------------------------------------------

def check_images(images, name="images", min_frames=1, why="") -> torch.Tensor:
    """An IMAGE batch [frames, height, width, channels] of at least min_frames frames of 1x1 pixels or more, all
    finite; else a ValueError naming the input (`why`: what needs min_frames frames, for the message)."""
    if not isinstance(images, torch.Tensor) or images.is_nested or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) and not images.is_nested else None
        raise ValueError(f"{name} must be an IMAGE batch [frames, height, width, channels], got "
                         f"{shape or type(images).__name__}. Connect the clip's frames (Load Frames or VAE Decode).")
    frames, height, width, _ = images.shape
    if frames == 0 or height == 0 or width == 0:
        empty = "0 frames" if frames == 0 else f"frames of {width}x{height} pixels"
        raise ValueError(f"{name} is empty ({empty}). Connect the clip's frames (Load Frames, or VAE Decode of the "
                         "clip's latents).")
    if frames < min_frames:
        raise ValueError(f"{name} has {frames} frame{'s' if frames != 1 else ''}, but {why} needs {min_frames} or "
                         f"more. Connect the whole clip (Load Frames with frame_load_cap {min_frames} or more).")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or infinite values (e.g. VAE Decode of a NaN latent), so no score "
                         "can be computed. Fix the node that produced the frames (a NaN latent, a VAE overflowing "
                         "in fp16: start ComfyUI with --fp32-vae) and score finite frames.")
    return images


# --- adapters -----------------------------------------------------------------------------------

def check_adapter(tensors: dict, metadata: dict, name: str):
    """A loaded adapter file's tensors (floating, finite) and attention metadata, before anything is applied."""
    redo = "Save the adapter again with Tune-A-Video Save Adapter, or tune again."
    for key, value in tensors.items():
        if value.dtype not in ADAPTER_DTYPES:
            raise ValueError(f"{name}: tensor {key} holds {str(value.dtype).replace('torch.', '')} values, but "
                             f"adapter weights are fp32, fp16 or bf16; the file is damaged or "
                             f"from another tool. {redo}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name}: tensor {key} contains NaN or infinite values; every clip sampled with it "
                             f"would be NaN (a black video). The tuning that made it diverged or the file is "
                             f"damaged. {redo}")
    bad = None
    mode, radius = metadata.get("attention_mode"), metadata.get("window_radius")
    if mode is not None and mode not in MODES:
        bad = ("attention_mode", mode, f"one of {', '.join(MODES)}")
    elif radius is not None and not (re.fullmatch(r"\d{1,5}", radius) and int(radius) <= MAX_WINDOW_RADIUS):
        bad = ("window_radius", radius, f"a whole number from 0 to {MAX_WINDOW_RADIUS}")
    init = metadata.get("temporal_init")
    if bad is None and init is not None and init not in TEMPORAL_INITS:
        bad = ("temporal_init", init, f"one of {', '.join(TEMPORAL_INITS)}")
    for key in ("temporal_attention", "frame_shared_norm", "temporal_position_encoding"):
        if bad is None and metadata.get(key, "True") not in BOOLEANS:
            bad = (key, metadata[key], "True or False")
    width = metadata.get("temporal_width", "0")  # low-rank/narrow setting (attention_patches/unet_patch.py)
    if bad is None and not (re.fullmatch(r"\d{1,5}", width) and int(width) % 64 == 0):
        bad = ("temporal_width", width, "0 or a multiple of 64")
    if bad:
        key, value, expected = bad
        raise ValueError(f"{name}: metadata {key} is {value!r}, not {expected}; the file's metadata was edited or "
                         f"damaged. Fix that value in the file or save the adapter again with Tune-A-Video Save "
                         "Adapter.")


def check_format_version(metadata: dict, supported: int, name: str):
    """An adapter's metadata format_version: absent, or a whole number no newer than `supported`."""
    version = metadata.get("format_version")
    if version is None:
        return
    if not re.fullmatch(r"\d{1,9}", version):
        raise ValueError(f"{name}: metadata format_version is {version!r}, not a whole number; the file's metadata "
                         f"was edited or damaged. Fix that value in the file (this pack writes {supported}) or save "
                         "the adapter again with Tune-A-Video Save Adapter.")
    if int(version) > supported:
        raise ValueError(f"{name} has adapter format_version {int(version)}, but this version of the Tune-A-Video "
                         f"pack reads format_version {supported} and older: the file was saved by a newer pack. "
                         "Update the pack (ComfyUI Manager, or git pull in its custom_nodes folder) to load it.")


# --- names and folders --------------------------------------------------------------------------

def _parts(name: str) -> list[str]:
    return re.split(r"[\\/]", name)


def leaves_folder(name: str) -> bool:
    """True for absolute paths (any OS) and paths with a '..' component."""
    return (os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None
            or ".." in _parts(name))


def check_name(value, name: str, example: str, folder: str):
    """A relative name inside `folder` (words for messages): no control characters, no way out."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} is empty. Give a name such as {example}.")
    control = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise ValueError(f"{name}: {value!r} contains the control character {control!r} (a NUL, tab or line "
                         f"break). Use a name such as {example}.")
    if leaves_folder(value):
        raise ValueError(f"{name}: {value!r} leaves {folder} (absolute paths and '..' are refused). Use a name "
                         f"such as {example}.")


def invisible_character(value: str) -> str | None:
    """The first character of `value` that is shown as nothing or reorders the text around it, else None:
    Unicode format characters (bidi controls U+202A-U+202E, U+2066-U+2069, U+200E/F, U+061C; zero-width
    U+200B-U+200D, U+2060, U+FEFF, soft hyphen ...), line/paragraph separators and blank-looking letters.
    A name holding one can display as another name, or reversed ("Trojan Source" spoofing)."""
    return next((c for c in value if unicodedata.category(c) in ("Cf", "Zl", "Zp") or c in BLANK_LOOKING), None)


def check_filename_prefix(prefix, name="filename_prefix", example="TuneAVideo/clip", folder="the output folder"):
    """A save prefix ('sub/folder/name', a counter is appended) that makes a visible file inside `folder`."""
    check_name(prefix, name, example, folder)
    hidden_char = invisible_character(prefix)
    if hidden_char is not None:
        raise ValueError(f"{name}: {prefix!r} contains the invisible character U+{ord(hidden_char):04X} "
                         f"({unicodedata.name(hidden_char, 'unnamed')}), which hides or reverses part of the name "
                         f"where it is shown. Remove it; use a name such as {example}.")
    parts = [p for p in _parts(prefix) if p not in ("", ".")]  # 'a//b' and './a' mean 'a/b' and 'a'
    if not parts:
        raise ValueError(f"{name}: {prefix!r} names no file. Give a name such as {example}.")
    hidden = next((p for p in parts if p.startswith(".")), None)
    if hidden is not None:
        raise ValueError(f"{name}: {prefix!r}: '{hidden}' would be a hidden file or folder. Start each name "
                         f"with a letter or digit, e.g. {example}.")
    longest = max(parts, key=lambda p: len(p.encode()))
    if len(longest.encode()) > MAX_NAME_BYTES or len(prefix) > MAX_PREFIX_CHARS:
        raise ValueError(f"{name} is too long ({len(prefix)} characters; a file or folder name may have at most "
                         f"{MAX_NAME_BYTES} bytes). Use a shorter name such as {example}.")


def inside(root: str, path: str) -> bool:
    """Whether `path`, with every link resolved, lies in `root` (itself resolved)."""
    root, path = os.path.realpath(root), os.path.realpath(path)
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # Windows: another drive
        return False


def check_save_folder(base: str, prefix: str, name="filename_prefix", folder="the output folder"):
    """The prefix's subfolders under `base` are folders (or absent) and do not link out of it."""
    subfolder = os.path.dirname(os.path.normpath(prefix))
    if not subfolder:
        return
    if not inside(base, os.path.join(base, subfolder)):
        raise ValueError(f"{name}: {prefix!r}: '{subfolder}' is a link to a place outside {folder}; links leaving "
                         f"it are refused. Use a real subfolder, or none.")
    path = base
    for part in _parts(subfolder):
        path = os.path.join(path, part)
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ValueError(f"{name}: {prefix!r}: '{part}' is an existing file, not a folder. Choose another "
                             "subfolder name.")


def check_readable(base: str, relative: str, name: str, folder: str) -> str:
    """base/relative as a path to open: it exists, is a regular file or a folder, and does not link out of
    base (a named pipe would block the queue; a link could expose any file of the server)."""
    path = os.path.join(base, relative)
    if not os.path.exists(path):
        raise ValueError(f"{name}: '{relative}' was not found in {folder}. Upload it with the node's upload "
                         f"button or copy it there.")
    if not inside(base, path):
        raise ValueError(f"{name}: '{relative}' is a link to a file outside {folder}; links leaving it are refused. "
                         f"Copy the file into {folder}.")
    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ValueError(f"{name}: '{relative}' is not a regular file or folder (a named pipe, device or socket). "
                         f"Choose a video file or a folder of images.")
    return path


def validation_message(check, value, **words):
    """For a node's VALIDATE_INPUTS: True, or the check's message (None means linked: checked at run time)."""
    if value is None:
        return True
    try:
        check(value, **words)
    except ValueError as error:
        return str(error)
    return True

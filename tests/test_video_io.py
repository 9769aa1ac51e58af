"""Video I/O: frame sampling from real encoded media, streaming, saving and decoding back, errors.

All media is generated here (frame i is a uniform gray level LEVEL(i), so the index can be read
back from the pixels even after lossy coding).
"""
import os

import av
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

import tavlib

dec = tavlib.pack_module("sampling.video_decode")
enc = tavlib.pack_module("sampling.video_encode")
vnodes = tavlib.pack_module("nodes.video_nodes")


def level(i):
    return 20 + 6 * i  # distinct gray levels for i < 38


def index_of(frame):
    """Frame index from the gray level at the frame's centre (tolerant of codec error)."""
    h, w = frame.shape[:2]
    value = float(frame[h // 4: 3 * h // 4, w // 4: 3 * w // 4].mean()) * 255
    return round((value - 20) / 6)


def gray_frames(n, h=64, w=64):
    return [np.full((h, w, 3), level(i), np.uint8) for i in range(n)]


def write_ffmpeg(path, frames, fps, codec="libx264"):
    """Encode with imageio-ffmpeg's own ffmpeg binary (independent of the code under test)."""
    h, w = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec=codec, macro_block_size=1,
                                         output_params=["-crf", "10"], ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def write_gif(path, frames, duration_ms):
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


@pytest.fixture
def dirs(tmp_path):
    """ComfyUI's input/output folders pointed at temp folders (restored afterwards)."""
    import folder_paths

    saved = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    (tmp_path / "input").mkdir()
    (tmp_path / "output").mkdir()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    folder_paths.set_output_directory(str(tmp_path / "output"))
    try:
        yield tmp_path / "input", tmp_path / "output"
    finally:
        folder_paths.set_input_directory(saved[0])
        folder_paths.set_output_directory(saved[1])


def load_node(video, cap=24, skip=0, nth=2, width=64, height=64, **kw):
    return vnodes.TuneAVideoLoadFrames().load(video, cap, skip, nth, width, height, **kw)


# --- Loading ---

@pytest.mark.parametrize("ext,codec", [("mp4", "libx264"), ("webm", "libvpx-vp9"), ("mov", "libx264")])
def test_video_file_start_stride_cap_crop_fps(dirs, ext, codec):
    write_ffmpeg(dirs[0] / f"clip.{ext}", gray_frames(30, h=48, w=80), fps=12, codec=codec)
    frames, count, fps = load_node(f"clip.{ext}", cap=6, skip=4, nth=3, width=64, height=40)
    assert frames.shape == (6, 40, 64, 3) and frames.dtype == torch.float32
    assert count == 6 and fps == pytest.approx(12 / 3)
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert [index_of(f) for f in frames] == [4, 7, 10, 13, 16, 19]


def test_gif_default_stride(dirs):
    write_gif(dirs[0] / "clip.gif", gray_frames(20), duration_ms=100)
    frames, count, fps = load_node("clip.gif", cap=8)  # default stride 2
    assert count == 8 and frames.shape == (8, 64, 64, 3)
    assert [index_of(f) for f in frames] == list(range(0, 16, 2))
    assert fps == pytest.approx(10 / 2)


def test_image_folder_natural_order_and_exact_centre_crop(dirs):
    folder = dirs[0] / "shots"
    folder.mkdir()
    for i in range(12):  # 96x64: black 16-pixel band left, white right, frame level between
        a = np.zeros((64, 96, 3), np.uint8)
        a[:, 16:80], a[:, 80:] = level(i), 255
        Image.fromarray(a).save(folder / f"frame{i + 1}.png")  # frame2 must come before frame10
    (folder / "notes.txt").write_text("not an image")
    frames, count, fps = load_node("shots", cap=4, skip=1, nth=3, width=64, height=64)
    assert count == 4 and fps == pytest.approx(dec.DEFAULT_FPS / 3)
    expected = torch.tensor([level(i) for i in (1, 4, 7, 10)], dtype=torch.float32) / 255
    # The 64x64 centre of 96x64 is exactly the gray band: no border pixel may survive.
    assert torch.equal(frames, expected[:, None, None, None].expand(4, 64, 64, 3))
    tall = load_node("shots", cap=1, width=32, height=64)[0]  # narrower than the band
    assert tall.shape == (1, 64, 32, 3) and torch.all(tall == level(0) / 255)


def test_resize_covers_then_crops_without_stretching():
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, 50:150] = 200  # centre square
    out = dec.resize_center_crop(a, 48, 48)
    assert out.shape == (48, 48, 3)
    assert out[4:-4, 4:-4].min() >= 195  # only the centre square remains, scaled down
    wide = dec.resize_center_crop(a, 64, 16)
    assert wide.shape == (16, 64, 3) and wide[:, 0].max() < 10  # black borders kept: box 200x50


def test_streaming_stops_at_last_needed_frame(dirs):
    write_ffmpeg(dirs[0] / "long.mp4", [np.full((64, 64, 3), i % 250, np.uint8) for i in range(300)],
                 fps=24)
    clip = dec.load_frames(str(dirs[0] / "long.mp4"), frame_load_cap=3, skip_first_frames=5,
                           select_every_nth=2, width=64, height=64)
    assert clip.frames.shape[0] == 3
    assert clip.frames_read == 5 + 2 * 2 + 1  # frames 0..9 read, not 300
    assert clip.source_fps == pytest.approx(24)


def test_core_video_type(dirs):
    from fractions import Fraction

    from comfy_api.input_impl import VideoFromComponents, VideoFromFile
    from comfy_api.util import VideoComponents

    write_ffmpeg(dirs[0] / "clip.mp4", gray_frames(16), fps=8)
    from_file = load_node("", cap=4, skip=2, nth=3, video_input=VideoFromFile(str(dirs[0] / "clip.mp4")))
    assert [index_of(f) for f in from_file[0]] == [2, 5, 8, 11] and from_file[2] == pytest.approx(8 / 3)
    images = torch.from_numpy(np.stack(gray_frames(16, h=32, w=48))).float() / 255
    video = VideoFromComponents(VideoComponents(images=images, frame_rate=Fraction(16)))
    frames, count, fps = load_node("", cap=5, nth=2, width=32, height=32, video_input=video)
    assert frames.shape == (5, 32, 32, 3) and fps == pytest.approx(8)
    assert [index_of(f) for f in frames] == [0, 2, 4, 6, 8]
    (saved,) = vnodes.TuneAVideoSaveVideo().save(images, 12.5, "gif", "tav/video")["result"]
    components = saved.get_components()  # Save Video's VIDEO output: the frames themselves, at fps
    assert torch.equal(components.images, images) and components.frame_rate == Fraction(25, 2)


# --- Errors ---

def test_too_short_is_an_error_not_a_clamp(dirs):
    write_gif(dirs[0] / "short.gif", gray_frames(9), duration_ms=100)
    with pytest.raises(ValueError, match=r"has 9 frames.*leave 5.*frame_load_cap asks for 24.*"
                                         r"lower frame_load_cap to 5"):
        load_node("short.gif", cap=24, nth=2)
    with pytest.raises(ValueError, match="lower skip_first_frames below 9"):
        load_node("short.gif", cap=1, skip=9)


def test_missing_corrupt_and_unsafe_names(dirs):
    with pytest.raises(ValueError, match=r"video: 'nope.mp4' was not found"):
        load_node("nope.mp4")
    with pytest.raises(ValueError, match="no file chosen"):
        load_node("")
    (dirs[0] / "bad.mp4").write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"video 'bad.mp4' could not be decoded"):
        load_node("bad.mp4")
    (dirs[0] / "empty").mkdir()
    with pytest.raises(ValueError, match=r"video 'empty'.*no images"):
        load_node("empty")
    outside = dirs[0].parent / "secret.mp4"
    write_ffmpeg(outside, gray_frames(4), fps=8)
    for name in ("../secret.mp4", str(outside), "sub/../../secret.mp4", "..\\secret.mp4"):
        with pytest.raises(ValueError, match="refused"):
            load_node(name, cap=1)
        assert "refused" in vnodes.TuneAVideoLoadFrames.VALIDATE_INPUTS(name)
    assert vnodes.TuneAVideoLoadFrames.VALIDATE_INPUTS("any.mp4 [output]") is True


def test_bad_sampling_settings(dirs):
    write_gif(dirs[0] / "clip.gif", gray_frames(4), duration_ms=100)
    with pytest.raises(ValueError, match="frame_load_cap=0"):
        load_node("clip.gif", cap=0)
    with pytest.raises(ValueError, match="select_every_nth=0"):
        load_node("clip.gif", cap=1, nth=0)
    with pytest.raises(ValueError, match="width=500 is not a multiple of 8.*496 or 504"):
        load_node("clip.gif", cap=1, width=500)
    with pytest.raises(ValueError, match="height=60"):
        load_node("clip.gif", cap=1, height=60)


# --- Saving ---

@pytest.mark.parametrize("fmt", ["mp4", "gif", "webp"])
def test_save_then_decode_back(dirs, fmt):
    images = torch.from_numpy(np.stack(gray_frames(7, h=48, w=64))).float() / 255
    node = vnodes.TuneAVideoSaveVideo()
    ui = node.save(images, 10.0, fmt, "tav/clip", prompt={"1": {"class_type": "X"}})["ui"]
    entry, = ui["images"]
    assert entry["filename"] == f"clip_00001_.{fmt}" and entry["subfolder"] == "tav"
    assert entry["type"] == "output" and entry["format"] == enc.SAVE_FORMATS[fmt][1]
    assert entry["frame_count"] == 7 and entry["frame_rate"] == 10.0
    assert ("animated" in ui) == (fmt != "gif")  # the frontend plays gif only as an <img>
    path = dirs[1] / "tav" / entry["filename"]
    clip = dec.load_frames(str(path), frame_load_cap=7, select_every_nth=1, width=64, height=48)
    assert clip.frames.shape == (7, 48, 64, 3)
    assert [index_of(f) for f in clip.frames] == list(range(7))
    assert clip.source_fps == pytest.approx(10.0)
    again = node.save(images, 10.0, fmt, "tav/clip")["ui"]["images"][0]["filename"]
    assert again == f"clip_00002_.{fmt}"


def test_mp4_odd_size_and_metadata(dirs):
    images = torch.rand(3, 45, 63, 4)  # RGBA, odd sides
    entry = vnodes.TuneAVideoSaveVideo().save(images, 8.0, "mp4", "odd", prompt={"3": {}})["ui"]["images"][0]
    with av.open(str(dirs[1] / entry["filename"])) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (62, 44)
        assert stream.codec_context.name == "h264" and stream.frames == 3
        assert container.metadata.get("prompt") == '{"3": {}}'


def test_save_errors(dirs):
    node = vnodes.TuneAVideoSaveVideo()
    with pytest.raises(ValueError, match="filename_prefix: '../evil'"):
        node.save(torch.rand(2, 16, 16, 3), 8.0, "gif", "../evil")
    with pytest.raises(ValueError, match="non-empty IMAGE batch"):
        node.save(torch.rand(0, 16, 16, 3), 8.0, "gif", "x")
    with pytest.raises(ValueError, match="format='avi'"):
        node.save(torch.rand(2, 16, 16, 3), 8.0, "avi", "x")


# --- Node surface ---

def test_node_surface_and_file_list(dirs):
    write_gif(dirs[0] / "a.gif", gray_frames(2), duration_ms=100)
    write_ffmpeg(dirs[0] / "b.mp4", gray_frames(2), fps=8)
    (dirs[0] / "c.txt").write_text("x")
    (dirs[0] / "frames").mkdir()
    Image.fromarray(gray_frames(1)[0]).save(dirs[0] / "frames" / "0.png")
    (dirs[0] / "nothing").mkdir()
    load_inputs = vnodes.TuneAVideoLoadFrames.INPUT_TYPES()
    assert list(load_inputs["required"]) == ["video", "frame_load_cap", "skip_first_frames",
                                             "select_every_nth", "width", "height"]
    assert load_inputs["required"]["video"][0] == ["a.gif", "b.mp4", "frames"]
    assert load_inputs["required"]["video"][1]["video_upload"] is True
    assert load_inputs["optional"]["video_input"][0] == "VIDEO"
    assert vnodes.TuneAVideoLoadFrames.RETURN_TYPES == ("IMAGE", "INT", "FLOAT")
    save_inputs = vnodes.TuneAVideoSaveVideo.INPUT_TYPES()["required"]
    assert list(save_inputs) == ["images", "fps", "format", "filename_prefix"]
    assert vnodes.TuneAVideoSaveVideo.OUTPUT_NODE is True
    assert vnodes.TuneAVideoSaveVideo.RETURN_TYPES == (("VIDEO",) if enc.core_video_type() else ())
    for cls in (vnodes.TuneAVideoLoadFrames, vnodes.TuneAVideoSaveVideo):
        spec = cls.INPUT_TYPES()
        assert all("tooltip" in opts for group in ("required", "optional")
                   for _, opts in spec.get(group, {}).values())


def test_is_changed_follows_the_file(dirs):
    write_gif(dirs[0] / "a.gif", gray_frames(2), duration_ms=100)
    before = vnodes.TuneAVideoLoadFrames.IS_CHANGED("a.gif")
    write_gif(dirs[0] / "a.gif", gray_frames(3), duration_ms=100)
    os.utime(dirs[0] / "a.gif", ns=(1, 1))
    assert vnodes.TuneAVideoLoadFrames.IS_CHANGED("a.gif") != before

"""The shared input checks as plain functions (the end-to-end cases are in test_hostile_input.py)."""
import os

import pytest
import torch

import tavlib

validation = tavlib.pack_module("sampling.validation")


@pytest.mark.parametrize("prefix,words", [
    ("C:\\Windows\\x", "leaves"), ("..\\up", "leaves"), ("a/../../b", "leaves"), ("\\\\server\\share", "leaves"),
    ("clip\tx", "control"), ("clip\x7f", "control"), ("   ", "empty"), ("./", "names no file"),
    ("a/.git/x", "hidden"), ("a/" + "é" * 101, "too long"),
])
def test_refused_prefixes(prefix, words):
    with pytest.raises(ValueError, match=words):
        validation.check_filename_prefix(prefix)


@pytest.mark.parametrize("prefix", ["clip", "TuneAVideo/clip", "a//b", "./a", "ça/клип 北京", "a" * 200])
def test_accepted_prefixes(prefix):
    validation.check_filename_prefix(prefix)


def test_save_folder_and_readable_file(tmp_path):
    base, outside = tmp_path / "base", tmp_path / "outside"
    (base / "sub").mkdir(parents=True)
    outside.mkdir()
    (base / "file").write_text("x")
    (base / "in").symlink_to(base / "sub", target_is_directory=True)
    (base / "out").symlink_to(outside, target_is_directory=True)
    validation.check_save_folder(str(base), "sub/new/clip")
    validation.check_save_folder(str(base), "in/clip")  # a link that stays inside is fine
    with pytest.raises(ValueError, match="outside"):
        validation.check_save_folder(str(base), "out/deeper/clip")
    with pytest.raises(ValueError, match="'file' is an existing file"):
        validation.check_save_folder(str(base), "file/clip")
    os.mkfifo(base / "pipe.mp4")
    with pytest.raises(ValueError, match="named pipe"):
        validation.check_readable(str(base), "pipe.mp4", "video", "the input folder")
    with pytest.raises(ValueError, match="outside") as error:
        validation.check_readable(str(base), "out", "video", "the input folder")
    assert str(tmp_path) not in str(error.value)


def test_latent_and_adapter_checks():
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    assert validation.check_latent(latent, 4) is latent["samples"]
    for samples, words in ((torch.zeros(0, 4, 8, 8), "0 frames"), (torch.zeros(2, 4, 8, 8), "4 channels"),
                           (torch.full((1, 4, 2, 2), -2e4), "up to 2e\\+04")):
        with pytest.raises(ValueError, match=words):
            validation.check_latent({"samples": samples}, 16 if words == "4 channels" else 4)
    good = {"diffusion_model.x.attn1.to_q.diff": torch.zeros(2, 2, dtype=torch.float16)}
    validation.check_adapter(good, {"window_radius": "3", "attention_mode": "window"}, "a.safetensors")
    with pytest.raises(ValueError, match="a.safetensors: metadata frame_shared_norm is 'yes'"):
        validation.check_adapter(good, {"frame_shared_norm": "yes"}, "a.safetensors")
    with pytest.raises(ValueError, match="metadata temporal_position_encoding is 'on', not True or False"):
        validation.check_adapter(good, {"temporal_position_encoding": "on"}, "a.safetensors")
    with pytest.raises(ValueError, match="window_radius is '2.5'"):
        validation.check_adapter(good, {"window_radius": "2.5"}, "a.safetensors")

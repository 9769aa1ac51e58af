"""Metric math on constructed embeddings (exact values), and the metric nodes on ComfyUI's own CLIP
vision model (a tiny random one: plumbing) and the random SD1.5 checkpoint's CLIP."""
import json
import math

import pytest
import torch

import tavlib


@pytest.fixture(scope="module")
def cm():
    return tavlib.pack_module("sampling.clip_metrics")


@pytest.fixture(scope="module")
def nodes():
    return tavlib.pack_module("nodes.metric_nodes")


def test_frame_consistency_exact_values(cm):
    same = torch.randn(1, 16).expand(6, 16)
    assert cm.frame_consistency(same) == pytest.approx(1.0, abs=1e-6)
    assert cm.frame_consistency(same, "consecutive") == pytest.approx(1.0, abs=1e-6)
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # cosines: (0,1) 0, (0,2) 1, (1,2) 0
    assert cm.frame_consistency(e, "all") == pytest.approx(1 / 3)
    assert cm.frame_consistency(e, "consecutive") == pytest.approx(0.0)
    assert cm.pair_similarities(e, "all").tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_a_swapped_frame_lowers_consistency(cm):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 32, generator=g)
    frames = base + 0.1 * torch.randn(8, 32, generator=g)
    swapped = frames.clone()
    swapped[4] = torch.randn(32, generator=g)
    for pairs in ("all", "consecutive"):
        assert cm.frame_consistency(swapped, pairs) < cm.frame_consistency(frames, pairs) - 0.05


def test_text_alignment_exact_values(cm):
    text = torch.tensor([0.0, 3.0, 4.0])
    frames = torch.tensor([[0.0, 3.0, 4.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert cm.frame_scores(frames, text).tolist() == pytest.approx([100.0, 0.0, 80.0])
    assert cm.text_alignment(frames, text.view(1, 3)) == pytest.approx(60.0)
    with pytest.raises(ValueError, match="different sizes"):
        cm.text_alignment(frames, torch.ones(4))
    with pytest.raises(ValueError, match="2 or more frames"):
        cm.frame_consistency(frames[:1])


def test_plot_values_draws_one_bar_per_value(cm):
    plot = cm.plot_values([0.0, 0.5, 1.0], width=30, height=11)
    assert plot.shape == (1, 11, 30, 3)
    bar = (plot[0, :, :, 2] > 0.5)
    heights = [int(bar[:, x].sum()) for x in (4, 14, 24)]
    assert heights == [1, 5, 10]  # 1 px at the minimum, a 1 px margin above the maximum


@pytest.fixture(scope="module")
def tiny_clip_vision(tmp_path_factory):
    """ComfyUI's ClipVisionModel with a tiny config (2 layers) and seeded random weights."""
    import comfy.clip_vision

    config = {"hidden_act": "quick_gelu", "hidden_size": 64, "image_size": 224, "intermediate_size": 128,
              "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2,
              "num_channels": 3, "num_hidden_layers": 2, "patch_size": 32, "projection_dim": 768}
    path = tmp_path_factory.mktemp("clip_vision") / "tiny.json"
    path.write_text(json.dumps(config))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.05 if v.ndim >= 2 else torch.ones(v.shape) if "norm" in k
              else torch.zeros(v.shape)) for k, v in model.get_sd().items()}
    model.load_sd(sd)
    return model


def _frames(seed, n=4, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def test_frame_consistency_node(nodes, tiny_clip_vision, one_thread):
    node = nodes.TuneAVideoCLIPFrameConsistency()
    same = _frames(1, 1).expand(4, -1, -1, -1)
    score, plot = node.score(tiny_clip_vision, same, "all")
    assert score == pytest.approx(100.0, abs=1e-3)
    assert plot.shape == (1, 96, 256, 3)
    mixed = same.clone()
    mixed[2] = _frames(2, 1)[0]
    for pairs in ("all", "consecutive"):
        lower, _ = node.score(tiny_clip_vision, mixed, pairs)
        assert lower < score - 1e-3


def test_text_alignment_node_on_the_checkpoint_clip(nodes, tiny_clip_vision, random_checkpoint, one_thread):
    import comfy.sd

    _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(random_checkpoint), output_vae=False,
                                                          output_model=False)
    node = nodes.TuneAVideoCLIPTextAlignment()
    score, plot = node.score(tiny_clip_vision, clip, _frames(3), "a red circle")
    _, pooled = clip.encode_from_tokens(clip.tokenize("a red circle"), return_pooled=True)
    embeds = tiny_clip_vision.encode_image(_frames(3))["image_embeds"]
    expected = 100 * torch.nn.functional.cosine_similarity(embeds.float(), pooled.float(), dim=-1).mean()
    assert math.isfinite(score) and score == pytest.approx(float(expected), abs=1e-3)
    assert plot.shape == (1, 96, 256, 3)


def test_a_clip_vision_model_returning_nan_is_a_clear_error(nodes, tiny_clip_vision, one_thread):
    """Finite frames, but a damaged model: the node names clip_vision instead of returning a NaN score."""
    sd = {k: v.clone() for k, v in tiny_clip_vision.get_sd().items()}  # get_sd gives the live tensors
    broken = {k: v.clone() for k, v in sd.items()}
    key = next(k for k, v in broken.items() if k.endswith("post_layernorm.weight"))
    broken[key][0] = float("nan")
    tiny_clip_vision.load_sd(broken)
    try:
        with pytest.raises(ValueError, match="clip_vision returned NaN"):
            nodes.TuneAVideoCLIPFrameConsistency().score(tiny_clip_vision, _frames(4), "all")
    finally:
        tiny_clip_vision.load_sd(sd)
    score, _ = nodes.TuneAVideoCLIPFrameConsistency().score(tiny_clip_vision, _frames(4), "all")
    assert math.isfinite(score)


def test_toy_world_score_node_exact_values(nodes):
    tw = tavlib.pack_module("sampling.toy_world")
    source = tw.render_clip("red", "circle", "left_to_right", 8, 96)
    edited = tw.render_clip("blue", "ring", "left_to_right", 8, 96)
    node = nodes.TuneAVideoToyWorldScore()
    acc, motion, colour_spread, size_spread, kept, report, strip = node.score(edited, source, "a blue ring")
    assert (acc, colour_spread, kept) == (1.0, 0.0, 1.0)
    assert motion < 0.5 and size_spread < 0.02 and "edit_accuracy 1" in report  # pixel-grid area jitter
    assert strip.shape == (1, 2 * 96, 8 * 96, 3)
    acc, *_ = node.score(edited, source, "a green ring")
    assert acc == 0.0
    with pytest.raises(ValueError, match="one colour"):
        node.score(edited, source, "a purple blob")

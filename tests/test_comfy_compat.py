"""ComfyUI internals that change after the versions we run (docs/comfyui-versions.md): the newer behaviour is
reproduced here on 0.3.75 / 0.33.0 with ComfyUI's own classes, and the pack is run against it.

- the temporal attention's keys are frozen (adapters, the official import) and owe nothing to core's
  CrossAttention, which gains a `comfy_attention` child with a saved config in 0.40;
- ComfyUI's Linear defers its tensors while dynamic VRAM is on (0.33+ on GPUs);
"""
import sys

import pytest
import safetensors.torch
import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.ops

import tavlib

ta = tavlib.pack_module("attention_patches.temporal_attention")
up = tavlib.pack_module("attention_patches.unet_patch")
ad = tavlib.pack_module("sampling.adapters")
adl = tavlib.pack_module("sampling.adapter_loading")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

# The tiny SD1.5-layout UNet (tavlib.tiny_model: 32 channels, levels x1 x2, 4 heads): its transformer blocks,
# their width, and the official (diffusers) name of each. Written out by hand: this is the frozen format.
TINY_BLOCKS = {
    "input_blocks.1.1.transformer_blocks.0": (32, "down_blocks.0.attentions.0.transformer_blocks.0"),
    "input_blocks.3.1.transformer_blocks.0": (64, "down_blocks.1.attentions.0.transformer_blocks.0"),
    "middle_block.1.transformer_blocks.0": (64, "mid_block.attentions.0.transformer_blocks.0"),
    "output_blocks.0.1.transformer_blocks.0": (64, "up_blocks.0.attentions.0.transformer_blocks.0"),
    "output_blocks.1.1.transformer_blocks.0": (64, "up_blocks.0.attentions.1.transformer_blocks.0"),
    "output_blocks.2.1.transformer_blocks.0": (32, "up_blocks.1.attentions.0.transformer_blocks.0"),
    "output_blocks.3.1.transformer_blocks.0": (32, "up_blocks.1.attentions.1.transformer_blocks.0"),
}


def frozen_temporal_shapes() -> dict[str, tuple]:
    """Every temporal-attention key of the tiny layout and its shape (to_q/k/v: no bias)."""
    out = {}
    for block, (dim, _) in TINY_BLOCKS.items():
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            out[f"{block}.attn_temp.{name}.weight"] = (dim, dim)
        out[f"{block}.attn_temp.to_out.0.bias"] = (dim,)
        out[f"{block}.norm_temp.weight"] = (dim,)
        out[f"{block}.norm_temp.bias"] = (dim,)
    return out


def fresh_base():
    with torch.inference_mode():
        return tavlib.tiny_model(seed=0)


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def seeded_temporal(seed=5):
    """Nonzero temporal weights for every tiny-layout key (as a tuned adapter would hold)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(s, generator=g) for k, s in frozen_temporal_shapes().items()}


# --- the temporal attention's keys and ownership -------------------------------------------------------------

def test_temporal_keys_are_frozen():
    model = up.apply_tav(fresh_base(), up.TAVConfig(temporal_attention=True))
    assert shapes(up.get_tav_patch(model).temporal_state_dict()) == frozen_temporal_shapes()


def test_temporal_attention_uses_no_core_attention_class():
    layer = ta.TemporalAttention(16, heads=2, dim_head=8, dtype=torch.float32)
    core = tuple(c for c in (getattr(comfy_attention, n, None) for n in ("CrossAttention", "ComfyAttention"))
                 if isinstance(c, type))
    assert core and not any(isinstance(m, core) for m in layer.modules())
    assert sorted(layer.state_dict()) == ["attn_temp.to_k.weight", "attn_temp.to_out.0.bias",
                                          "attn_temp.to_out.0.weight", "attn_temp.to_q.weight",
                                          "attn_temp.to_v.weight", "norm_temp.bias", "norm_temp.weight"]


def test_official_import_maps_the_frozen_block_names(tmp_path):
    """An official (diffusers-named) UNet file's temporal tensors land on the frozen keys, values unchanged."""
    base = fresh_base()
    assert adl.official_block_paths(base) == {d: c for c, (_, d) in TINY_BLOCKS.items()}
    temporal = seeded_temporal()
    official = {}
    for key, value in temporal.items():
        block, part, rest = next((key.partition(p) for p in (".attn_temp.", ".norm_temp.") if p in key))
        official[f"unet.{TINY_BLOCKS[block][1]}{part}{rest}"] = value
    path = tmp_path / "official.safetensors"
    safetensors.torch.save_file(official, str(path))
    adapter = adl.load_adapter_file(path, base)
    assert set(adapter.temporal) == set(temporal)
    assert all(torch.equal(adapter.temporal[k], v) for k, v in temporal.items())
    with torch.inference_mode():
        loaded = ad.apply_adapter(base, adapter)
    got = up.get_tav_patch(loaded).temporal_state_dict()
    assert shapes(got) == frozen_temporal_shapes()
    assert all(torch.equal(got[k].float(), v) for k, v in temporal.items())


def config_carrying_cross_attention():
    """Core CrossAttention as 0.40 builds it: a child whose state dict holds a `config` entry when one is set
    (a uint8 tensor of JSON) and whose loader pops it. Reproduced here with a stand-in child."""

    class ConfigChild(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = {"attention": "stand_in"}

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            destination[prefix + "config"] = torch.tensor(list(b'{"attention": "stand_in"}'), dtype=torch.uint8)

        def _load_from_state_dict(self, state_dict, prefix, *args):
            state_dict.pop(prefix + "config", None)
            super()._load_from_state_dict(state_dict, prefix, *args)

    class NewerCrossAttention(comfy_attention.CrossAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.comfy_attention = ConfigChild()

    return NewerCrossAttention


def test_core_cross_attention_with_a_config_child_leaves_temporal_keys_alone(monkeypatch, tmp_path):
    newer, older = config_carrying_cross_attention(), comfy_attention.CrossAttention
    monkeypatch.setattr(comfy_attention, "CrossAttention", newer)
    for module in [m for n, m in sys.modules.items() if n.startswith(tavlib.PACK_NAME)]:
        if getattr(module, "CrossAttention", None) is older:  # what `from ... import CrossAttention` gets on 0.40
            monkeypatch.setattr(module, "CrossAttention", newer)
    base = fresh_base()  # its transformer blocks are built from the newer CrossAttention
    unet_keys = base.model.diffusion_model.state_dict()
    assert "input_blocks.1.1.transformer_blocks.0.attn1.comfy_attention.config" in unet_keys  # the reproduction holds
    model = up.apply_tav(base, up.TAVConfig(temporal_attention=True), temporal_weights=seeded_temporal())
    patch = up.get_tav_patch(model)
    assert shapes(patch.temporal_state_dict()) == frozen_temporal_shapes()
    adapter = ad.make_adapter(model, {}, patch.temporal_state_dict())
    path = ad.save_adapter(adapter, tmp_path / "a.safetensors")
    again = adl.load_adapter_file(path, fresh_base())
    with torch.inference_mode():
        ad.apply_adapter(fresh_base(), again)  # check_fits: the file fits a model built the newer way
    assert set(again.temporal) == set(frozen_temporal_shapes())


# --- dynamic VRAM: ComfyUI's Linear defers its tensors --------------------------------------------------------

@pytest.fixture
def deferred_linears(monkeypatch):
    """ComfyUI's Linear as 0.33+ builds it while dynamic VRAM is on (comfy.memory_management.aimdo_enabled,
    set by main.py on GPUs unless --disable-dynamic-vram): weight and bias None until a state dict is loaded,
    except in subclasses with their own state-dict loader. 0.33.0 has the switch; on 0.3.75 a stand-in
    __init__ reproduces it."""
    try:
        import comfy.memory_management as mm
    except ImportError:
        mm = None
    if mm is not None and hasattr(mm, "aimdo_enabled"):
        monkeypatch.setattr(mm, "aimdo_enabled", True)
    else:
        linear = comfy.ops.disable_weight_init.Linear

        def deferring_init(self, in_features, out_features, bias=True, device=None, dtype=None):
            if type(self)._load_from_state_dict is not linear._load_from_state_dict:
                return torch.nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = in_features, out_features
            self.weight = self.bias = None

        monkeypatch.setattr(linear, "__init__", deferring_init)
    assert comfy.ops.manual_cast.Linear(4, 4).weight is None  # the reproduction holds


def test_temporal_attention_builds_and_loads_while_linears_defer_their_tensors(deferred_linears):
    """The temporal attention must still be seeded, checked against adapters and loaded in its own dtype."""
    layer = ta.TemporalAttention(16, heads=2, dim_head=8, dtype=torch.float16)
    layer.reset_parameters(torch.Generator().manual_seed(0))
    assert all(p is not None and p.dtype == torch.float16 for p in layer.parameters())
    assert len(layer.state_dict()) == 7
    x = torch.randn(6, 3, 16, dtype=torch.float16)
    assert torch.equal(layer(x, 3), x)  # the untuned layer is still exactly the identity
    weights = {k: torch.randn(v.shape) for k, v in layer.state_dict().items()}
    to_q = layer.attn_temp.to_q.weight
    layer.load_state_dict(weights)
    assert layer.attn_temp.to_q.weight is to_q and to_q.dtype == torch.float16  # loaded in place, own dtype
    model = up.apply_tav(fresh_base(), up.TAVConfig(temporal_attention=True), temporal_weights=seeded_temporal())
    adapter = ad.make_adapter(model, {}, up.get_tav_patch(model).temporal_state_dict())
    ad.check_fits(fresh_base(), adapter)  # builds TemporalAttention on the meta device for its shapes

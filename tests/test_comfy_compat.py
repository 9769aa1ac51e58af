"""ComfyUI internals that change after the versions we run (docs/comfyui-versions.md): the newer behaviour is
reproduced here on 0.3.75 / 0.33.0 with ComfyUI's own classes, and the pack is run against it.

- the temporal attention's keys are frozen (adapters, the official import) and owe nothing to core's
  CrossAttention, which gains a `comfy_attention` child with a saved config in 0.40;
- ComfyUI's Linear defers its tensors while dynamic VRAM is on (0.33+ on GPUs);
- attention backends (Model Attention Backend) and overrides stacked on top of each other (0.40's sparse
  attention node) before or after Apply Attention; q/k/v in attention tensor containers;
- patcher classes whose __init__ takes fast_disk (0.40); dynamic-VRAM patchers (loads that drop the weight
  wrappers of small layers, a classic delegate); a Linear forward that skips weight wrappers.
"""
import sys

import pytest
import safetensors.torch
import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.model_patcher
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


# --- attention overrides: Model Attention Backend, stacked overrides (nodes_sparse_attention) ------------------

FRAMES = 3
CONDS = [tavlib.context(1), tavlib.context(2)]


def counting_backend(calls):
    """An attention backend that records each call's (query length, key length) and runs ComfyUI's basic
    attention (a different kernel from the default one: results agree within fp32 rounding)."""
    def attention(q, k, v, heads, *args, **kwargs):
        calls.append((q.shape[-2], k.shape[-2]))
        return comfy_attention.attention_basic(q, k, v, heads, *args, **kwargs)
    return attention


def with_backend(model, attention):
    """What core's Model Attention Backend node does (ModelPatcher.set_model_optimized_attention, 0.33+);
    on 0.3.75 the same override, installed by hand."""
    m = model.clone()
    if hasattr(m, "set_model_optimized_attention"):
        m.set_model_optimized_attention(attention)
    else:
        def optimized_attention_override(_, *args, **kwargs):
            return attention(*args, **kwargs)
        m.model_options["transformer_options"]["optimized_attention_override"] = optimized_attention_override
    return m


def with_declining_override(model, declined):
    """nodes_sparse_attention's way (0.40+): its override goes on top of whatever override is there, declines
    calls it cannot take (here: all, as it does for SD's head sizes on the CPU) by running the previous
    override or the plain function, and is installed again before every step."""
    def install(transformer_options):
        previous = transformer_options.get("optimized_attention_override")
        if getattr(previous, "declining", False):
            return

        def override(func, *args, **kwargs):
            declined.append(1)
            return func(*args, **kwargs) if previous is None else previous(func, *args, **kwargs)
        override.declining = True
        transformer_options["optimized_attention_override"] = override

    m = model.clone()
    install(m.model_options["transformer_options"])
    m.add_callback_with_key(  # newer ComfyUI passes the step's model_options; 0.3.75 only (patcher, timestep)
        "on_prepare_state", "declining_override",
        lambda patcher, timestep, *options: install((options[0] if options else patcher.model_options)
                                                    ["transformer_options"]))
    return m


@pytest.fixture(scope="module")
def tav_base():
    """The tiny base and the plain Tune-A-Video prediction (every part on, nonzero temporal weights)."""
    base = fresh_base()
    config = up.TAVConfig(temporal_attention=True, frame_shared_norm=True)
    x = tavlib.latents(FRAMES)
    plain = tavlib.predict(up.apply_tav(base, config, temporal_weights=seeded_temporal()), x, contexts=CONDS)
    return base, config, x, plain


def tav(model, config):
    return up.apply_tav(model, config, temporal_weights=seeded_temporal())


def close(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a, b))


@pytest.mark.parametrize("order", ["backend_then_tav", "tav_then_backend"])
def test_frame_and_temporal_attention_follow_an_attention_backend(tav_base, order):
    base, config, x, plain = tav_base
    calls = []
    backend = counting_backend(calls)
    model = tav(with_backend(base, backend), config) if order == "backend_then_tav" \
        else with_backend(tav(base, config), backend)
    got = tavlib.predict(model, x, contexts=CONDS)
    assert close(got, plain) <= 1e-5
    tokens = {q for q, _ in calls}
    assert any(k == 2 * q for q, k in calls), "frame attention (each frame: itself and one earlier) must use it"
    assert FRAMES in tokens, "temporal attention (a sequence of the clip's frames) must use it"


@pytest.mark.parametrize("order", ["override_then_tav", "tav_then_override", "backend_override_tav"])
def test_stacked_declining_overrides_leave_the_result_alone(tav_base, order):
    base, config, x, plain = tav_base
    declined, calls = [], []
    if order == "override_then_tav":
        model = tav(with_declining_override(base, declined), config)
    elif order == "tav_then_override":
        model = with_declining_override(tav(base, config), declined)
    else:  # Model Attention Backend, then the stacked override on top of it, then Apply Attention
        model = tav(with_declining_override(with_backend(base, counting_backend(calls)), declined), config)
    got = tavlib.predict(model, x, contexts=CONDS)
    assert close(got, plain) <= 1e-5
    assert declined and (order != "backend_override_tav" or len(calls) == len(declined))


def test_core_model_attention_backend_node_before_and_after_apply_attention(tav_base):
    """The real node where this ComfyUI has it (0.33.0 and newer; 0.3.75: the reproduction above covers it)."""
    advanced = pytest.importorskip("comfy_extras.nodes_model_advanced")
    if not hasattr(advanced, "ModelAttentionBackend"):
        pytest.skip("no Model Attention Backend node in this ComfyUI (added after 0.3.75)")
    base, config, x, plain = tav_base
    node = advanced.ModelAttentionBackend()
    for model in (tav(node.patch(base, "pytorch attention")[0], config),
                  node.patch(tav(base, config), "pytorch attention")[0]):
        assert "optimized_attention_override" in model.model_options["transformer_options"]
        assert close(tavlib.predict(model, x, contexts=CONDS), plain) <= 1e-5


def test_attn1_replace_takes_tensors_out_of_attention_containers(tav_base):
    """0.33+ has AttentionTensorContainer (single-owner q/k/v; core's CrossAttention passes them to
    optimized_attention since 0.40). Should a replace patch get them, the result is the same."""
    base, config, _, _ = tav_base
    container = getattr(comfy_attention, "AttentionTensorContainer", None)
    if container is None:  # 0.3.75: the same interface
        class container:
            def __init__(self, tensor):
                self.tensor = tensor

            def take(self):
                tensor, self.tensor = self.tensor, None
                return tensor
    patch = up.get_tav_patch(tav(base, config))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2 * FRAMES, 16, 32, generator=g) for _ in range(3))
    options = {"n_heads": 4, "cond_or_uncond": [0, 1], "attn_precision": None}
    want = patch.attn1_replace(q, k, v, options)
    boxes = [container(t) for t in (q, k, v)]
    assert torch.equal(patch.attn1_replace(*boxes, options), want)
    assert all(b.tensor is None for b in boxes)  # taken, as core's backends take them


# --- patchers: fast_disk (0.40+, PR #16333), dynamic VRAM (ModelPatcherDynamic, 0.28+ on GPUs) ----------------

ost = tavlib.pack_module("sampling.one_shot_tuning")
lc = tavlib.pack_module("sampling.long_clip")
CLIP = tavlib.latents(4)
POSITIVE = [[tavlib.context(100), {}]]


class FastDiskPatcher(comfy.model_patcher.ModelPatcher):
    """ModelPatcher as of 0.40: __init__ takes fast_disk, and clone() hands it to the patcher's class."""

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False, fast_disk=False):
        super().__init__(model, load_device, offload_device, size, weight_inplace_update)
        self.fast_disk = fast_disk

    def clone(self, *args, **kwargs):
        n = super().clone(*args, **kwargs)
        n.fast_disk = self.fast_disk
        return n


class DynamicLikePatcher(comfy.model_patcher.ModelPatcher):
    """ModelPatcherDynamic as a node meets it (on a CPU core hands out the classic patcher, so it is reproduced):
    is_dynamic(); its load leaves layers of at most 16 KiB without their weight wrappers (ModelPatcherDynamic.load
    force-loads those without setup_param); get_non_dynamic_delegate() is a classic ModelPatcher on a fresh copy
    of the weights (core reloads the checkpoint with the loader that made it), or raises where nothing can."""
    reloadable = True

    def is_dynamic(self):
        return True

    def load(self, *args, **kwargs):
        out = super().load(*args, **kwargs)
        for m in self.model.modules():
            if hasattr(m, "weight_function") and comfy.model_management.module_size(m) <= 16 * 1024:
                m.weight_function, m.bias_function = [], []
        return out

    def get_non_dynamic_delegate(self):
        if not self.reloadable:
            raise RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not initialized.")
        n = comfy.model_patcher.ModelPatcher.clone(self)
        n.__class__ = comfy.model_patcher.ModelPatcher
        n.model = fresh_base().model  # the loader's reload: the same checkpoint weights in a tree of its own
        n.backup, n.object_patches_backup = {}, {}
        for name, empty in (("backup_buffers", {}), ("pinned", set())):
            if hasattr(n, name):
                setattr(n, name, empty)
        return n


def as_patcher(cls, **kw):
    tiny = fresh_base()
    return cls(tiny.model, tiny.load_device, tiny.offload_device, **kw)


def tune(model, steps=3):
    with torch.inference_mode():
        return ost.tune_clip(model, {"samples": CLIP}, POSITIVE, steps=steps, learning_rate=1e-2, precision="fp32",
                             trainable="queries+temporal")


def test_nodes_work_on_a_patcher_class_whose_init_takes_fast_disk():
    base = as_patcher(FastDiskPatcher, fast_disk=True)
    model = lc.apply_long_clip(up.apply_tav(base, up.TAVConfig(temporal_attention=True)), chunk_frames=2)
    assert type(model) is FastDiskPatcher and model.fast_disk
    x = tavlib.latents(FRAMES)
    plain = lc.apply_long_clip(up.apply_tav(fresh_base(), up.TAVConfig(temporal_attention=True)), chunk_frames=2)
    assert close(tavlib.predict(model, x, contexts=CONDS), tavlib.predict(plain, x, contexts=CONDS)) <= 1e-6
    tuned, adapter, losses = tune(base, steps=2)
    assert type(tuned) is FastDiskPatcher and tuned.fast_disk and len(losses) == 2
    assert any(d.abs().max() > 0 for d in adapter.deltas.values())


def test_tuning_under_dynamic_vram_trains_on_the_classic_delegate():
    """Were the run left on the dynamic patcher, the tiny UNet's query layers would load without their deltas
    (all are under 16 KiB): nothing would train. On the delegate it trains exactly as on the classic patcher."""
    base = as_patcher(DynamicLikePatcher)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    _, adapter, losses = tune(base)
    _, want, want_losses = tune(fresh_base())
    assert losses == pytest.approx(want_losses, rel=1e-6, abs=1e-7)
    assert set(adapter.deltas) == set(want.deltas)
    assert all(torch.allclose(adapter.deltas[k], want.deltas[k], atol=1e-6) for k in want.deltas)
    assert any(d.abs().max() > 0 for d in adapter.deltas.values())
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items())  # the base is untouched


def test_tuning_on_a_dynamic_patcher_without_a_delegate_is_a_clear_error():
    base = as_patcher(DynamicLikePatcher)
    DynamicLikePatcher.reloadable = False
    try:
        with pytest.raises(RuntimeError, match="without their training hook.*--disable-dynamic-vram"):
            tune(base, steps=1)
    finally:
        DynamicLikePatcher.reloadable = True
    model = up.apply_tav(base, up.TAVConfig(temporal_attention=True))
    assert tavlib.predict(model, tavlib.latents(FRAMES), contexts=CONDS)[0].isfinite().all()  # nothing left behind


def test_temporal_attention_stays_on_a_classic_patcher_under_a_dynamic_model():
    """Its parameters are trained in place; a dynamic patcher would stage copies and train nothing."""
    model = up.apply_tav(as_patcher(DynamicLikePatcher), up.TAVConfig(temporal_attention=True))
    extra = model.get_nested_additional_models()
    assert extra and not any(getattr(m, "is_dynamic", lambda: False)() for m in extra)


def test_a_linear_forward_that_skips_weight_wrappers_is_a_clear_error(monkeypatch):
    """PR #16816 (0.40) reworked Linear's forward and could not be read: should a Linear stop running its weight
    wrappers, the trained query deltas get no gradient and the run says so after its first step."""
    def fused_forward(self, input):  # casts the weight like core, runs no weight function
        bias = None if self.bias is None else self.bias.to(input, copy=True)
        return torch.nn.functional.linear(input, self.weight.to(input, copy=True), bias)
    monkeypatch.setattr(comfy.ops.disable_weight_init.Linear, "forward_comfy_cast_weights", fused_forward)
    with pytest.raises(RuntimeError, match="trained tensors got no gradient .*attn1.to_q"):
        tune(fresh_base(), steps=1)

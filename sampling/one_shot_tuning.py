"""One-shot tuning (Tune-A-Video): fit a patched model to one text-video pair.

The objective is the paper's, on the model's own schedule: every step takes ALL frames of the clip,
draws ONE timestep t ~ U{0..T-1} shared by the frames and Gaussian noise per frame, noises the clip
(x_t = x_0 + sigma_t * noise in ComfyUI's units, i.e. sqrt(a_t) x_0 + sqrt(1 - a_t) noise at the UNet
input) and minimises the MSE of the noise prediction (the velocity for v-prediction models). AdamW
(weight decay 1e-2) with the gradient norm clipped to 1, as the official trainer.

Trained, never written into the base: query deltas through ModelPatcher weight wrappers (W + delta is
formed per call) and the temporal attention of a private copy of the patch, all fp32 master weights
(bf16/fp16: autocast compute, fp16 with loss scaling). The loop runs inside ComfyUI's CFGGuider like a
sampler, so every forward carries the patcher's wrappers, hooks and cond_or_uncond. Frozen weights that
ComfyUI loaded under inference_mode reach autograd as zero-copy aliases (object patches, restored at
unload). Gradient checkpointing is non-reentrant, per transformer block and temporal attention.

The result is an adapter (attention_patches/adapter.py) and the model built from it, so a saved and
reloaded adapter gives exactly the tuned model.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.utils.checkpoint
from tqdm.auto import trange

import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.samplers
import comfy.utils

from ..attention_patches.adapter import apply_adapter, make_adapter
from ..attention_patches.unet_patch import TAVConfig, apply_tav, get_tav_patch, unet_of

QUERIES = ("attn1.to_q", "attn2.to_q")
ATTENTION = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))
# name -> (linear layers of every transformer block that get a delta, temporal attention trained?)
TRAINABLE = {
    "queries+temporal": (QUERIES, True),  # Tune-A-Video
    "temporal": ((), True),                # motion only; appearance and text response untouched
    "queries": (QUERIES, False),
    "attention+temporal": (ATTENTION, True),  # closer fit, bigger adapter, overfits sooner
}
DEFAULT_TRAINABLE = "queries+temporal"
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_STEPS = 100000
CHECKPOINT_KEY = "tune_a_video_checkpointing"
NODE = "Tune-A-Video One-Shot Tune"


class TuningDiverged(RuntimeError):
    pass


# --- the objective (pure) ---------------------------------------------------------------------

def prediction_scale(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """b(sigma) in ComfyUI's denoised = a(sigma) * x - b(sigma) * model_output (eps: sigma)."""
    zero = torch.zeros(1, 1, 1, 1, device=sigma.device)
    return (model_sampling.calculate_denoised(sigma, zero, zero)
            - model_sampling.calculate_denoised(sigma, zero + 1, zero)).reshape(())


def denoising_loss(model_sampling, denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor):
    """MSE of the model's own prediction target, from ComfyUI's denoised output.

    denoised = a x_t - b out, and the out that denoises exactly is its target, so out - target =
    (x0 - denoised) / b: for eps models that is noise_pred - noise (TAV's loss), for v models v - v_target.
    """
    return ((denoised.float() - x0) / prediction_scale(model_sampling, sigma)).square().mean()


def draw_step(generator: torch.Generator, num_timesteps: int, shape) -> tuple[int, torch.Tensor]:
    """One training draw: a timestep shared by all frames, Gaussian noise per frame (CPU, seeded)."""
    t = int(torch.randint(num_timesteps, (1,), generator=generator))
    return t, torch.randn(shape, generator=generator)


def run_tuning(denoise, x0, model_sampling, params: dict, steps: int, learning_rate: float, seed: int,
               autocast_dtype=None, grad_scaling=False, callback=None, disable_pbar=True) -> list[float]:
    """The training loop. denoise(x_t, sigma[frames]) -> denoised (ComfyUI's model call); x0: the clip in
    model space [F, C, H, W]; params: name -> trainable tensor. callback(step, loss, params) after each
    optimizer step (gradients still attached). Returns the loss per step.
    """
    device = x0.device
    sigmas = model_sampling.sigmas.detach().float().cpu().clone()
    optimizer = torch.optim.AdamW(list(params.values()), lr=learning_rate, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type) if grad_scaling else None
    generator = torch.Generator().manual_seed(seed)
    losses = []
    pbar = trange(steps, desc="Tune-A-Video tuning", disable=disable_pbar)
    for step in pbar:
        comfy.model_management.throw_exception_if_processing_interrupted()
        t, noise = draw_step(generator, len(sigmas), x0.shape)
        sigma = sigmas[t:t + 1].to(device)
        x_t = model_sampling.noise_scaling(sigma, noise.to(device), x0)
        optimizer.zero_grad(set_to_none=True)
        with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()):
            denoised = denoise(x_t, sigma.expand(x0.shape[0]))
        loss = denoising_loss(model_sampling, denoised, x0, sigma)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TuningDiverged(
                f"{NODE}: the loss became {value} at step {step + 1} of {steps}. Lower learning_rate, use bf16 "
                "or fp32 precision, and check the latent (VAE Encode in fp32) and the model's own output.")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        losses.append(value)
        pbar.set_postfix(loss=f"{value:.4f}")
        if callback is not None:
            callback(step, value, params)
    return losses


# --- plugging the trainables into ComfyUI's model ---------------------------------------------

class WeightDelta(torch.nn.Module):
    """A weight wrapper (ModelPatcher.add_weight_wrapper): W -> W + delta, summed in the delta's dtype."""

    def __init__(self, delta: torch.nn.Parameter):
        super().__init__()
        self.delta = delta

    def forward(self, weight):
        return (weight.to(self.delta.dtype) + self.delta).to(weight.dtype)

    def move_to(self, device):
        self.to(device=device)
        return self.delta.nelement() * self.delta.element_size()


def autograd_alias(tensor: torch.Tensor) -> torch.nn.Parameter:
    """A frozen Parameter sharing `tensor`'s storage that autograd may save for backward.

    Weights loaded under the executor's inference_mode are inference tensors, which autograd refuses
    to save; this normal tensor views the same memory (no copy; values are never written).
    """
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
    return torch.nn.Parameter(alias, requires_grad=False)


def _checkpointed(forward, *args, **kwargs):
    # The UNet mutates transformer_options ("block", "block_index", ...) between this forward and
    # the backward's recomputation: recompute with the values of this call.
    args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


class Checkpointing:
    """DIFFUSION_MODEL wrapper: non-reentrant gradient checkpointing of the given modules' forwards for
    the duration of one model call (restored afterwards). Transformer blocks and temporal attention are
    where the activations are; their TAV forward hooks run outside the checkpointed forward, so the
    recomputation never depends on hooks that are gone by backward time. Non-reentrant: parameters get
    gradients even where no input requires grad (the reentrant variant silently skips them).
    """

    def __init__(self, modules):
        self.modules = list(modules)

    def __call__(self, executor, *args, **kwargs):
        saved = []
        try:
            for module in self.modules:
                saved.append((module, module.__dict__.get("forward")))
                module.forward = functools.partial(_checkpointed, module.forward)
            return executor(*args, **kwargs)
        finally:
            for module, previous in saved:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous


class _TuningSampler(comfy.samplers.Sampler):
    """Runs the training loop where a sampler would run, so ComfyUI's guider prepares everything
    (model loading, conds, hooks, wrappers, cond_or_uncond) exactly as for sampling."""

    def __init__(self, **loop_args):
        self.loop_args = loop_args
        self.losses = []

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x0 = latent_image.detach().float().clone()

        def denoise(x, sigma):
            return model_wrap(x, sigma, **extra_args)

        self.losses = run_tuning(denoise, x0, model_wrap.inner_model.model_sampling, **self.loop_args)
        return latent_image


class TuningRun:
    """A private training clone of a TAV-patched model with its trainable tensors. close() unloads it and
    removes every trace from the shared module tree."""

    def __init__(self, patched, queries=QUERIES, train_temporal=True, precision="fp32", checkpointing=True):
        patch = get_tav_patch(patched)
        self.model = apply_tav(patched, patch.config, temporal_weights=patch.temporal_state_dict() or None)
        self.patch = get_tav_patch(self.model)
        self.device = self.model.load_device
        self.compute_dtype = PRECISIONS[precision]
        self.params: dict[str, torch.nn.Parameter] = {}
        self._wrapped: list[tuple[str, object]] = []
        unet = unet_of(self.model)

        for path, _ in self.patch.blocks:
            for name in queries:
                key = f"diffusion_model.{path}.{name}.weight"
                weight = comfy.utils.get_attr(self.model.model, key)
                delta = torch.nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=self.device))
                self._wrap(key, WeightDelta(delta))
                self.params[key] = delta
        temporal = self.patch.temporal
        if temporal is not None:
            temporal.float().requires_grad_(train_temporal)
            if train_temporal:
                self.params.update({f"temporal.{k}": p for k, p in temporal.named_parameters()})
        self._guard_inference_weights(unet)

        if self.compute_dtype != self.model.model_dtype():
            self.model.set_model_compute_dtype(self.compute_dtype)
        if checkpointing:
            modules = [unet.get_submodule(path) for path, _ in self.patch.blocks]
            if temporal is not None:
                modules += [temporal.block(path) for path, _ in self.patch.blocks]
            self.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CHECKPOINT_KEY,
                                            Checkpointing(modules))

    def _wrap(self, key, function):
        self.model.add_weight_wrapper(key, function)
        self._wrapped.append((key, function))

    def _guard_inference_weights(self, unet):
        """Frozen inference-tensor weights are swapped for autograd_alias views while the training clone is
        loaded: ComfyUI object patches, applied at load and restored at unload like any other."""
        for module_name, module in unet.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                key = f"diffusion_model.{module_name}.{pname}"
                if param.is_inference():
                    self.model.add_object_patch(key, autograd_alias(param))

    def load(self):
        models = [self.model] + self.model.get_nested_additional_models()
        # Training owns the device: everything else is unloaded, this model is loaded in full.
        comfy.model_management.load_models_gpu(models, memory_required=1e20, force_full_load=True)

    def train(self, samples, positive, steps, learning_rate, seed, callback=None):
        self.load()
        autocast = None if self.compute_dtype == torch.float32 else self.compute_dtype
        sampler = _TuningSampler(params=self.params, steps=steps, learning_rate=learning_rate, seed=seed,
                                 autocast_dtype=autocast, grad_scaling=self.compute_dtype == torch.float16,
                                 callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        guider = comfy.samplers.CFGGuider(self.model)
        guider.inner_set_conds({"positive": positive})
        guider.set_cfg(1.0)
        guider.sample(torch.zeros_like(samples), samples, sampler, torch.ones(2), seed=seed)
        return sampler.losses

    def trained(self) -> tuple[dict, dict]:
        """(query deltas by model key, temporal weights by temporal key), fp32 on CPU; only trained ones."""
        deltas = {k: p.detach().float().cpu() for k, p in self.params.items() if k.startswith("diffusion_model.")}
        temporal = {}
        if any(k.startswith("temporal.") for k in self.params):
            temporal = {k: v.detach().float().cpu() for k, v in self.patch.temporal_state_dict().items()}
        return deltas, temporal

    def close(self):
        """Unload the training clone (restoring its object patches) and drop its weight wrappers from the
        shared modules, which ComfyUI only clears at the next load: the base keeps nothing."""
        mine = {id(self.model)} | {id(m) for m in self.model.get_nested_additional_models()}
        loaded = comfy.model_management.current_loaded_models
        for i in range(len(loaded) - 1, -1, -1):
            if id(loaded[i].model) in mine:
                loaded.pop(i).model_unload()
        functions = {id(f) for _, f in self._wrapped}
        unet = unet_of(self.model)
        for key, _ in self._wrapped:
            module_name, pname = key[len("diffusion_model."):].rsplit(".", 1)
            module = unet.get_submodule(module_name)
            attr = "weight_function" if pname == "weight" else "bias_function"
            if attr in module.__dict__:
                setattr(module, attr, [f for f in getattr(module, attr) if id(f) not in functions])
        self._wrapped.clear()
        self.params.clear()
        comfy.model_management.soft_empty_cache()


# --- the node's entry point -------------------------------------------------------------------

def check_latent(latent) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.is_nested or samples.ndim != 4 or samples.shape[0] < 1:
        raise ValueError(f"{NODE}: latent must be a LATENT batch of frames [frames, channels, height, width] "
                         "(VAE Encode of the clip's frames).")
    if not torch.isfinite(samples).all():
        raise ValueError(f"{NODE}: latent contains NaN or infinite values. Re-encode the clip (VAE Encode in "
                         "fp32 if the VAE overflows).")
    return samples


def check_arguments(model, steps, learning_rate, trainable, precision):
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{NODE}: steps must be an integer from 1 to {MAX_STEPS}, got {steps!r} "
                         "(Tune-A-Video: 300-500).")
    if not isinstance(learning_rate, (int, float)) or not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"{NODE}: learning_rate must be a positive number, got {learning_rate!r} (Tune-A-Video: 3e-5).")
    if trainable not in TRAINABLE:
        raise ValueError(f"{NODE}: trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}.")
    if precision not in PRECISIONS:
        raise ValueError(f"{NODE}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    device = model.load_device
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{NODE}: this GPU has no bfloat16; choose precision fp16 (or fp32).")
    if not isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.EPS) or \
            not hasattr(model.get_model_object("model_sampling"), "sigmas"):
        raise ValueError(f"{NODE} supports discrete eps- and v-prediction models (SD1.x, SD2.x, SDXL); this "
                         f"model samples with {type(model.get_model_object('model_sampling')).__name__}.")


def _out_of_memory_message(samples, precision, checkpointing) -> str:
    f, _, h, w = samples.shape
    tips = [f"fewer frames (now {f})", f"a lower resolution (now {w * 8}x{h * 8})"]
    if precision == "fp32":
        tips.append("precision bf16 or fp16")
    if not checkpointing:
        tips.append("gradient_checkpointing on")
    return f"{NODE} ran out of memory. Reduce: {', '.join(tips)}."


def loss_curve_image(losses, size=(256, 96)):
    """A tiny loss plot (PIL image) for the node's live preview."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    if len(losses) > 1:
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0
        pts = [(i * (w - 1) / (len(losses) - 1), (h - 1) - (v - lo) / span * (h - 1)) for i, v in enumerate(losses)]
        ImageDraw.Draw(img).line(pts, fill=(30, 90, 200), width=2)
    return img


def tune_clip(model, latent, positive, steps=500, learning_rate=3e-5, seed=0, trainable=DEFAULT_TRAINABLE,
              precision="bf16", gradient_checkpointing=True, preview_every=0, prompt_text="", callback=None):
    """One-shot tune `model` on a clip. Returns (tuned MODEL, TAVAdapter, losses per step).

    model: a MODEL, patched by TuneAVideoApplyAttention or patched here with TAV's defaults. latent:
    {"samples": [F, 4, H, W]} of the clip (all frames in every step). positive: CONDITIONING of the
    source prompt. The input model and its checkpoint are never written; on cancel (ComfyUI's interrupt)
    or error nothing is left applied. callback(step, loss, params) is called after every step.
    """
    check_arguments(model, steps, learning_rate, trainable, precision)
    samples = check_latent(latent)
    channels = model.get_model_object("latent_format").latent_channels
    if samples.shape[1] != channels:
        raise ValueError(f"{NODE}: latent has {samples.shape[1]} channels but this model expects {channels}; "
                         "encode the frames with this checkpoint's VAE.")
    if not positive:
        raise ValueError(f"{NODE}: positive is empty; connect CLIP Text Encode with the clip's prompt.")
    patched = model if get_tav_patch(model) is not None else apply_tav(model, TAVConfig())
    queries, train_temporal = TRAINABLE[trainable]
    if train_temporal and get_tav_patch(patched).temporal is None:
        raise ValueError(f"{NODE}: trainable {trainable!r} trains temporal attention, but the model was patched "
                         "with temporal_attention off. Turn it on in Apply Attention, or train 'queries'.")

    pbar = comfy.utils.ProgressBar(steps)
    losses = []

    def on_step(step, loss, params):
        losses.append(loss)
        preview = None
        if preview_every and ((step + 1) % preview_every == 0 or step + 1 == steps):
            preview = ("JPEG", loss_curve_image(losses), 512)
        pbar.update_absolute(step + 1, steps, preview)
        if callback is not None:
            callback(step, loss, params)

    with torch.inference_mode(False), torch.enable_grad():
        # Inputs are inference tensors (the executor runs nodes under inference_mode): use copies.
        conds = [[c.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in d.items()}]
                 for c, d in positive]
        run = TuningRun(patched, queries, train_temporal, precision, gradient_checkpointing)
        try:
            run.train(samples.clone(), conds, steps, learning_rate, seed, on_step)
            deltas, temporal = run.trained()
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(_out_of_memory_message(samples, precision, gradient_checkpointing)) from e
        except RuntimeError as e:
            if "can't allocate memory" not in str(e):
                raise
            raise RuntimeError(_out_of_memory_message(samples, precision, gradient_checkpointing)) from e
        finally:
            run.close()
            del run

    h, w = samples.shape[-2:]
    adapter = make_adapter(patched, deltas, temporal, frames=samples.shape[0], latent_size=f"{w}x{h}",
                           prompt=prompt_text, steps=steps, learning_rate=learning_rate, seed=seed,
                           trainable=trainable, precision=precision, final_loss=losses[-1])
    return apply_adapter(patched, adapter), adapter, losses

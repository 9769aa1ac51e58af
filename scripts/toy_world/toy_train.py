"""The toy world's UNet training loop: deterministic on any thread count, resumable, with a progress bar.

Reproducible: every step's batch is split into fixed micro-batches (MICRO frames each); each micro-batch's
gradient is computed with one intra-op thread (torch.set_num_threads(1): no thread-count-dependent
reduction inside a kernel) and the gradients are summed in micro-batch order. `workers` threads only
decide which micro-batches run at the same time, so 1 or 2 (or 16) workers give the same bits.
Resumable: every `save_every` steps the model, optimizer, schedule, data RNG, step and losses go to one
state file; train_unet given that file continues from it and ends where an uninterrupted run ends.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Frames per micro-batch: part of the recipe (changing it changes the checkpoint's last bits). 8: at batch 16 two
# micro-batches, one per core of a 2-core machine; measured 2.2 s CPU per step against 2.45 s with 4 (fewer, larger
# matmuls) and 2.5 s for v4's unfused single batch (load 3-5, 2026-12-07).
MICRO = 8


def object_weights(frames, weight: float):
    """Loss weight per latent cell [N, 1, h, w]: 1 + weight near the object (its cells dilated by one).

    Most cells are plain background; the shape lives in the few cells of the object's outline.
    """
    import torch.nn.functional as F

    cover = F.avg_pool2d((frames.amax(-1) > 0.5).float().unsqueeze(1), 8)
    return 1 + weight * F.max_pool2d(cover, 3, 1, 1)


class ProgressBar:
    """`step n/N [####....] loss, elapsed, ETA, CPU s`: one line rewritten in place on a terminal, else a
    line every `every_s` seconds (and at the end), so logs stay short."""

    def __init__(self, total: int, start: int = 0, stream=None, every_s: float = 30.0, label="toy world"):
        stream = stream or sys.stderr  # sys.stderr now, not at import (it may be replaced)
        self.total, self.start, self.stream, self.every_s, self.label = total, start, stream, every_s, label
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0, self.c0, self.last = time.time(), time.process_time(), 0.0

    def update(self, step: int, loss: float):
        now = time.time()
        done = step - self.start
        eta = (now - self.t0) / done * (self.total - step) if done else float("nan")
        bar = "#" * int(20 * step / self.total) + "." * (20 - int(20 * step / self.total))
        text = (f"{self.label}: step {step}/{self.total} [{bar}] loss {loss:.4f} "
                f"{now - self.t0:.0f}s elapsed, ETA {_mmss(eta)}, CPU {time.process_time() - self.c0:.0f}s")
        if self.tty:
            self.stream.write("\r" + text + ("\n" if step >= self.total else ""))
            self.stream.flush()
        elif step >= self.total or now - self.last >= self.every_s or done == 1:
            print(text, file=self.stream, flush=True)
            self.last = now


def _mmss(seconds: float) -> str:
    return "?" if not math.isfinite(seconds) else f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


@contextlib.contextmanager
def deterministic_torch():
    """One intra-op thread, deterministic algorithms, PyTorch's math attention; restored afterwards."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        # The math SDPA backend: about 15 % less CPU per training step than the flash kernel at these sizes.
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def _micro_grads(unet, params, xt, t, ctx, noise, w, denom):
    """Gradients (tuple, one per param) of this micro-batch's share of the step's weighted loss."""
    import torch

    torch.set_num_threads(1)  # per thread: a pool thread does not inherit the caller's setting everywhere
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls (AVX512-BF16/AMX where the CPU has them)
        pred = unet(xt, timesteps=t.float(), context=ctx)
    part = (w * (pred.float() - noise) ** 2).sum() / denom
    return torch.autograd.grad(part, params), float(part.detach())


def train_unet(unet, contexts, empty, toy_world, toy_vae, cfg: dict, frame_size: int, workers: int = 1,
               state_path: Path | None = None, save_every: int = 50, log=print, progress=None) -> list[float]:
    """Train unet (in place, fp32 weights) to predict the noise of rendered toy-world latents; the losses.

    cfg: steps, batch, lr, seed, dropout, object_weight, min_snr. Resumes from state_path when it holds a
    state of the same cfg; saves it there every save_every steps and at the end.
    """
    import torch

    steps, batch = cfg["steps"], cfg["batch"]
    if batch % MICRO:
        raise ValueError(f"batch must be a multiple of {MICRO} (the micro-batch), got {batch}")
    g = torch.Generator().manual_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0).float()  # SD1.5's DDPM schedule (scaled_linear)
    unet.requires_grad_(True)  # newer ComfyUI ops create their Parameters with requires_grad=False
    params = [p for p in unet.parameters()]
    # fused: one kernel per tensor instead of ~10 (the unfused step cost ~0.1 s of CPU per training step)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.01, fused=True)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1, (i + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / steps))))
    losses, start = [], 0
    key = {k: cfg[k] for k in ("steps", "batch", "lr", "seed", "dropout", "object_weight", "min_snr")}
    key["micro"] = MICRO
    if state_path is not None and Path(state_path).is_file():
        state = torch.load(state_path, weights_only=False)
        if state["cfg"] == key:
            unet.load_state_dict(state["unet"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            g.set_state(state["g"])
            torch.set_rng_state(state["torch_rng"])
            losses, start = state["losses"], state["step"]
            log(f"toy world: resuming the interrupted build at step {start}/{steps} ({state_path})")
        else:
            log(f"toy world: {state_path} is another recipe's build state; starting over")
    progress = progress or ProgressBar(steps, start)
    names = list(toy_world.COLOURS)
    unet.train()
    with deterministic_torch(), ThreadPoolExecutor(max(1, workers)) as pool:
        for step in range(start, steps):
            colours, shapes, centres = toy_world.random_scenes(batch, frame_size, g)
            frames = toy_world.render(colours, shapes, centres, frame_size)
            x0 = toy_vae.encode_reference(frames)
            w = object_weights(frames, cfg["object_weight"])
            idx = torch.tensor([names.index(c) * len(toy_world.SHAPES) + toy_world.SHAPES.index(s)
                                for c, s in zip(colours, shapes)])
            ctx = contexts[idx]
            drop = torch.rand(batch, generator=g) < cfg["dropout"]
            ctx[drop] = empty
            t = torch.randint(0, 1000, (batch,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            if cfg["min_snr"]:  # min-SNR-gamma weighting (Hang et al. 2023): less weight on the nearly clean steps
                w = w * (cfg["min_snr"] / (a / (1 - a))).clamp(max=1)
            # the whole batch's mean of w * err^2 over every element, normalised by w's mean (as one batch)
            denom = w.mean() * x0.numel()
            jobs = [pool.submit(_micro_grads, unet, params, *(v[i:i + MICRO] for v in (xt, t, ctx, noise, w)), denom)
                    for i in range(0, batch, MICRO)]
            loss = 0.0
            for i in range(len(jobs)):  # a fixed summation order: micro-batch 0, 1, 2, ...
                grads, part = jobs[i].result()
                jobs[i] = None  # frees this micro-batch's gradients once summed (memory: ~2 copies, not n)
                loss += part
                for p, gi in zip(params, grads):
                    if i == 0:
                        p.grad = gi
                    else:
                        p.grad += gi
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss)
            recent = sum(losses[-50:]) / len(losses[-50:])
            if state_path is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
                _save_state(state_path, unet, opt, sched, g, step + 1, losses, key)
            progress.update(step + 1, recent)
    unet.eval()
    return losses


def _save_state(path: Path, unet, opt, sched, g, step: int, losses, key: dict):
    """Everything a resumed run needs to continue bit-identically, written atomically."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"unet": unet.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "g": g.get_state(), "torch_rng": torch.get_rng_state(), "step": step, "losses": losses,
                "cfg": key}, tmp)
    tmp.replace(path)

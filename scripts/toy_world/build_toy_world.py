"""Build the toy-world checkpoint: an SD1.5-format model whose pictures follow "a <colour> <shape>".

ComfyUI detects it as SD15 and its own nodes (Load Checkpoint, CLIP Text Encode, VAE Encode/Decode,
KSampler, the Tune-A-Video nodes) work on it unchanged. Parts:
  - text encoder: the seeded random CLIP-L of scripts/models/random_models.py's random checkpoint (distinct
    prompts give distinct embeddings; the UNet learns to read them);
  - VAE: constructed by hand (scripts/toy_world/toy_vae.py), no training;
  - UNet: the random checkpoint's reduced SD1.5 layout, trained from scratch here on rendered toy-world
    frames (sampling/toy_world.py) with the eps objective on SD1.5's schedule, 10 % empty prompts (for
    classifier-free guidance), AdamW. Seeded; cached in .cache/toy_world/ (never committed).

    python scripts/toy_world/build_toy_world.py                 # build once (or reuse), print the checkpoint path
    python scripts/toy_world/build_toy_world.py --evaluate 20   # generation accuracy, 20 samples per prompt
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)
import comfy_runtime  # noqa: E402
import cpu_threads  # noqa: E402
import random_models  # noqa: E402
import toy_train  # noqa: E402

VERSION = 5  # bump when the recipe changes: the cached file name changes with it
FRAME_SIZE = 96
DEFAULTS = {"steps": 800, "batch": 16, "lr": 1e-3, "seed": 0, "dropout": 0.1, "object_weight": 3.0, "min_snr": 5.0}
VOCAB_NORM = 256.0  # norm of each vocabulary word's token embedding (the random CLIP's rows: about 0.55)
TOKEN_EMBEDDING = "cond_stage_model.transformer.embeddings.token_embedding.weight"


def checkpoint_path() -> Path:
    return comfy_runtime.CACHE / "toy_world" / f"tav_toy_world_v{VERSION}.safetensors"


def load_pack_modules():
    comfy_runtime.import_comfy()
    import comfy.cli_args

    # PyTorch's SDPA: its backward is far cheaper on a CPU than ComfyUI's default sub-quadratic attention.
    comfy.cli_args.args.use_pytorch_cross_attention = True
    pack = comfy_runtime.load_pack()
    import importlib
    import toy_vae

    return importlib.import_module(f"{pack.__name__}.sampling.toy_world"), toy_vae


def prompts(toy_world) -> list[str]:
    return [toy_world.prompt(c, s) for c in toy_world.COLOURS for s in toy_world.SHAPES]


def encode_texts(clip, texts):
    """[len(texts), 77, 768]: CLIP Text Encode's conditioning for each text."""
    import torch

    return torch.cat([clip.encode_from_tokens(clip.tokenize(t)) for t in texts]).float()


def vocabulary_token_ids(clip, words) -> dict[str, int]:
    """The CLIP tokenizer's id of each word (each vocabulary word is one token)."""
    special = {clip.tokenizer.clip_l.start_token, clip.tokenizer.clip_l.end_token}
    ids = {}
    for word in words:
        found = [t[0] for t in clip.tokenize(word)["l"][0] if t[0] not in special]
        if len(found) != 1:
            raise ValueError(f"vocabulary word {word!r} is {len(found)} CLIP tokens, not one")
        ids[word] = int(found[0])
    return ids


def distinct_vocabulary(clip_sd: dict, ids: dict[str, int], seed: int = 0) -> dict:
    """clip_sd with each vocabulary word's token-embedding row set to a large vector, all mutually orthogonal.

    The random CLIP maps every prompt to nearly the same embedding (cosine 0.94-0.99), from which a UNet
    learns colour but hardly shape; distinct, dominant word rows make each word visible in the context.
    Only rows of the token table change: the text encoder stays a normal SD1.5 CLIP-L.
    """
    import torch

    table = clip_sd[TOKEN_EMBEDDING]
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(table.shape[1], len(ids), generator=g, dtype=torch.float64))
    table = table.clone()
    for i, row in enumerate(ids.values()):
        table[row] = (q[:, i] * VOCAB_NORM).to(table.dtype)
    return {**clip_sd, TOKEN_EMBEDDING: table}


def _reinit(unet):
    """PyTorch's default init, with SD's zero-initialised output convs (each block starts as identity)."""
    import torch

    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.Linear.reset_parameters(m)  # ComfyUI's ops skip init: call torch's own
        elif isinstance(m, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(m)
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            torch.nn.init.ones_(m.weight), torch.nn.init.zeros_(m.bias)
        if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
            torch.nn.init.zeros_(m.weight), torch.nn.init.zeros_(m.bias)


def build(force=False, log=print, path: Path | None = None, threads: int | None = None, save_every: int = 50,
          keep_state: bool = False, **overrides) -> Path:
    """The cached toy-world checkpoint (or `path`), built first when missing (or when force).

    threads: how many micro-batches train at once (default: one per free core); the result does not
    depend on it. An interrupted build leaves `<path stem>.state.pt` beside the checkpoint (every
    save_every steps) and the next build continues from it (keep_state: keep it after the build).
    """
    path = Path(path) if path else checkpoint_path()
    if path.is_file() and not force:
        return path
    toy_world, toy_vae = load_pack_modules()
    import torch
    import comfy.sd
    import safetensors.torch

    cfg = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    t0, c0 = time.time(), time.process_time()
    threads = threads or cpu_threads.choose(log=log, what="the toy-world build")
    torch.manual_seed(cfg["seed"])
    base_sd = safetensors.torch.load_file(str(random_models.random_checkpoint()))
    _, clip, _, _ = comfy.sd.load_state_dict_guess_config(dict(base_sd), output_vae=False, output_model=False)
    words = [*toy_world.COLOURS, *toy_world.SHAPES]
    clip_sd = distinct_vocabulary({k: v for k, v in base_sd.items() if k.startswith("cond_stage_model.")},
                                  vocabulary_token_ids(clip, words), cfg["seed"])
    model, clip, _, _ = comfy.sd.load_state_dict_guess_config({**base_sd, **clip_sd}, output_vae=False)
    contexts = encode_texts(clip, prompts(toy_world))
    empty = encode_texts(clip, [""])[0]
    unet = model.model.diffusion_model.float()
    _reinit(unet)
    log(f"toy world: training the UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M params), "
        f"{cfg['steps']} steps of {cfg['batch']} frames, {threads} thread(s) (same result on any count)")
    state = path.with_name(path.stem + ".state.pt")
    if force and not keep_state:
        state.unlink(missing_ok=True)
    losses = toy_train.train_unet(unet, contexts, empty, toy_world, toy_vae, cfg, FRAME_SIZE, threads, state,
                                  save_every, log)
    sd = {**clip_sd, **{f"first_stage_model.{k}": v.half() for k, v in toy_vae.toy_vae_state_dict().items()}}
    sd.update({f"model.diffusion_model.{k}": v.detach().half() for k, v in unet.state_dict().items()})
    meta = {**cfg, "version": VERSION, "frame_size": FRAME_SIZE, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "build_wall_s": round(time.time() - t0), "build_cpu_s": round(time.process_time() - c0),
            "threads": threads, "prompts": prompts(toy_world)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file(sd, str(tmp), metadata={"tav_toy_world": json.dumps(meta)})
    tmp.replace(path)
    if not keep_state:
        state.unlink(missing_ok=True)
    log(f"toy world: built in {meta['build_wall_s']} s wall, {meta['build_cpu_s']} s CPU (this process; "
        f"load {cpu_threads.load():.1f}) -> {path}")
    return path


def generate(path: Path, texts, samples: int, seed=0, steps=20, cfg=7.5):
    """IMAGE [samples, H, W, 3] per text, generated from the prompt alone with ComfyUI's sampler."""
    import torch
    import comfy.sample
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    out = {}
    with torch.inference_mode():  # as ComfyUI runs nodes; outside it the sampler's autograd graph grew past 20 GB
        neg = [[clip.encode_from_tokens(clip.tokenize("")), {}]]
        for i, text in enumerate(texts):
            out[text] = _generate_one(model, clip, vae, text, neg, samples, seed + 1000 * i, seed + i, steps, cfg)
    return out


def _generate_one(model, clip, vae, text, neg, samples, noise_seed, seed, steps, cfg):
    """IMAGE [samples, H, W, 3] for one text, sampled 4 at a time (noise seeds noise_seed + chunk start)."""
    import torch
    import comfy.sample

    pos = [[clip.encode_from_tokens(clip.tokenize(text)), {}]]
    images = []
    for chunk in range(0, samples, 4):
        latent = torch.zeros(min(4, samples - chunk), 4, FRAME_SIZE // 8, FRAME_SIZE // 8)
        noise = comfy.sample.prepare_noise(latent, noise_seed + chunk)
        out_latent = comfy.sample.sample(model, noise, steps, cfg, "ddim", "ddim_uniform", pos, neg, latent,
                                         seed=seed, disable_pbar=True)
        images.append(vae.decode(out_latent))
    return torch.cat(images)


def evaluate(path: Path, samples: int, log=print, steps=20, cfg=7.5) -> dict:
    """Per prompt: share of generated frames whose object has the prompt's colour / shape."""
    toy_world, _ = load_pack_modules()
    results = {}
    for text, images in generate(path, prompts(toy_world), samples, steps=steps, cfg=cfg).items():
        colour, shape = toy_world.parse_prompt(text)
        found = [toy_world.find_object(im) for im in images]
        results[text] = {"colour": sum(o is not None and o["colour"] == colour for o in found) / samples,
                         "shape": sum(o is not None and o["shape"] == shape for o in found) / samples}
        log(f"{text:20s} colour {results[text]['colour']:.2f} shape {results[text]['shape']:.2f}")
    n = len(results)
    log(f"mean: colour {sum(r['colour'] for r in results.values()) / n:.3f} "
        f"shape {sum(r['shape'] for r in results.values()) / n:.3f}")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("--evaluate", type=int, metavar="N", help="then generate N samples per prompt and score them")
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key}", type=type(value), help=f"default {value}")
    p.add_argument("--eval-steps", type=int, default=20, help="DDIM steps when evaluating")
    p.add_argument("--eval-cfg", type=float, default=7.5, help="classifier-free guidance when evaluating")
    p.add_argument("--checkpoint", type=Path, help="evaluate this file instead of building")
    p.add_argument("--threads", type=int, help="CPU threads (default: one per free core; the checkpoint is the "
                   "same on any count)")
    p.add_argument("--out", type=Path, help="build into this file instead of the cache")
    p.add_argument("--save-every", type=int, default=50, help="steps between build-state saves (resume points)")
    p.add_argument("--keep-state", action="store_true", help="keep the build state (fp32 weights) after the build")
    a = p.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    threads = cpu_threads.choose(a.threads, log, "build_toy_world")
    import torch

    torch.set_num_threads(threads)  # evaluation; the build trains with one intra-op thread per worker
    path = a.checkpoint or build(a.force, log, a.out, threads, a.save_every, a.keep_state,
                                 **{k: getattr(a, k) for k in DEFAULTS})
    if a.evaluate:
        evaluate(path, a.evaluate, log, steps=a.eval_steps, cfg=a.eval_cfg)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

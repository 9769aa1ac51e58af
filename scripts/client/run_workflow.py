"""Run a Tune-A-Video API-format workflow headless and print the files it wrote.

Against a running ComfyUI (--server URL), or one this script starts with this pack installed
(in --base-dir, default out/comfy). The obvious inputs are substituted into the workflow by node
type, not by node id: the video, the prompts, checkpoint, seed, frames, steps, size, and the one-shot
tuning's steps and precision (--tune-steps, --precision; --steps is the DDIM schedule only).

    python scripts/client/run_workflow.py workflows/api/tav_video_edit_api.json --video clip.mp4 \\
        --prompt "a tiger walking in the snow" --checkpoint v1-5-pruned-emaonly.safetensors

Progress goes to stderr; stdout gets one line per output file (an absolute path when the server's
output folder is on this machine, else its /view URL), saved adapters included (models/tune_a_video/...,
absolute when the server's base folder is on this machine). Exit status 1 with the server's error message
when the workflow is refused or fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _paths  # noqa: E402,F401  (puts the purpose folders of scripts/ on sys.path)
import comfy_runtime  # noqa: E402
from comfy_client import Client, WorkflowError, locate, output_files, run_prompt  # noqa: E402,F401
from workflow_substitute import substitute  # noqa: E402


# --- the command line ---------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", type=Path, help="an API-format workflow JSON (workflows/api/*_api.json)")
    p.add_argument("--server", help="URL of a running ComfyUI (default: start one with this pack)")
    p.add_argument("--base-dir", type=Path, default=comfy_runtime.PACK_DIR / "out" / "comfy",
                   help="base directory of the ComfyUI this script starts (default: %(default)s)")
    p.add_argument("--video", type=Path, help="source clip, uploaded into the server's input/")
    p.add_argument("--prompt", help="the (edited) prompt")
    p.add_argument("--source-prompt", help="the source clip's prompt: what it is tuned on (TuneAVideoTune), "
                   "else what it is inverted with (default: empty)")
    p.add_argument("--negative", help="the negative prompt")
    p.add_argument("--checkpoint", help="a checkpoint name the server knows, or a file path "
                                        "(linked into the server's models/checkpoints)")
    p.add_argument("--seed", type=int)
    p.add_argument("--frames", type=int, help="frames to load from the clip, or to generate")
    p.add_argument("--steps", type=int, help="DDIM steps (inversion and sampling; not the tuning)")
    p.add_argument("--tune-steps", type=int, help="optimizer steps of the one-shot tuning (TuneAVideoTune)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="precision of the one-shot tuning (fp32 on a CPU)")
    p.add_argument("--cfg", type=float)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--fps", type=float, help="frame rate of the saved video")
    p.add_argument("--filename-prefix")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the result")
    p.add_argument("--deterministic", action="store_true",
                   help="start the server with ComfyUI's --deterministic: bit-identical results run to run "
                        "(multithreaded CPU kernels otherwise differ in the last bits; tuning amplifies that). "
                        "Not for --server: start that ComfyUI with --deterministic yourself")
    p.add_argument("--check-args", action="store_true",
                   help="only check the arguments (files exist, sizes are valid) and exit")
    return p.parse_args(argv)


CHECKPOINT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")


def check_args(args):
    """Errors a user can make on the command line, found before any server starts."""
    if not args.workflow.is_file():
        raise WorkflowError(f"{args.workflow}: no such workflow file (see workflows/api/*_api.json)")
    if args.checkpoint and not args.server:
        path = Path(args.checkpoint).expanduser()
        known = (args.base_dir / "models" / "checkpoints" / args.checkpoint).is_file()
        if not path.is_file() and not known:
            raise WorkflowError(f"--checkpoint {args.checkpoint}: no such file. Give the path of an SD1.5, SD2 or "
                                "SDXL checkpoint file (e.g. v1-5-pruned-emaonly.safetensors); a bare name works "
                                "only with --server, for a ComfyUI that lists it.")
        if path.is_file() and path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise WorkflowError(f"--checkpoint {args.checkpoint}: not a checkpoint file (expected one of "
                                f"{', '.join(CHECKPOINT_SUFFIXES)}).")
    if args.video is not None and not args.video.is_file():
        raise WorkflowError(f"--video {args.video}: no such file")
    for name in ("frames", "steps", "tune_steps", "width", "height"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise WorkflowError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value < 64 or value % 8):
            raise WorkflowError(f"--{name} {value}: must be a multiple of 8, at least 64 (the VAE works on 8x8 pixels)")
    if args.fps is not None and not args.fps > 0:
        raise WorkflowError(f"--fps {args.fps}: must be greater than 0")
    if args.cfg is not None and args.cfg < 0:
        raise WorkflowError(f"--cfg {args.cfg}: must not be negative")


def _link_checkpoint(path: Path, folders: dict) -> str:
    if "base" not in folders:
        raise WorkflowError(f"--checkpoint {path}: the server's models folder is not on this machine; "
                            "copy the file into its models/checkpoints and pass the file name instead")
    dst = folders["base"] / "models" / "checkpoints" / path.name
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(path.resolve())
    return path.name


def run(args) -> list[str]:
    check_args(args)
    workflow = json.loads(args.workflow.read_text())
    if "nodes" in workflow or not all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
        raise WorkflowError(f"{args.workflow} is not an API-format workflow; use the *_api.json file "
                            "(or ComfyUI's Export (API))")
    ckpt_path = Path(args.checkpoint).expanduser() if args.checkpoint else None
    ckpt_path = ckpt_path if ckpt_path is not None and ckpt_path.is_file() else None
    server = None
    if args.server:
        client = Client(args.server)
    else:
        server = comfy_runtime.ComfyServer(args.base_dir, checkpoints=[ckpt_path] if ckpt_path else [],
                                           extra_args=["--deterministic"] if args.deterministic else [])
        print(f"Starting ComfyUI in {args.base_dir} (log: {server.log_path}) ...", file=sys.stderr, flush=True)
        try:
            server.start()
        except RuntimeError as e:
            raise WorkflowError(f"ComfyUI did not start: {e}") from e
        client = Client(server.url)
    try:
        folders = client.folders()
        checkpoint = args.checkpoint
        if ckpt_path is not None:
            checkpoint = ckpt_path.name if server else _link_checkpoint(ckpt_path, folders)
        video = client.upload(args.video) if args.video is not None else None
        prompt = substitute(workflow, video=video, positive=args.prompt, source_prompt=args.source_prompt,
                            negative=args.negative, checkpoint=checkpoint, seed=args.seed,
                            frames=args.frames, steps=args.steps, cfg=args.cfg, width=args.width,
                            height=args.height, fps=args.fps, filename_prefix=args.filename_prefix,
                            tune_steps=args.tune_steps, precision=args.precision)
        entry = run_prompt(client, prompt, args.timeout)
        files = output_files(entry)
        if not files:
            raise WorkflowError("the workflow finished but reported no output files")
        return [locate(client, item, folders.get("output"), folders.get("base")) for item in files]
    finally:
        if server is not None:
            server.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.check_args:
            check_args(args)
            return 0
        paths = run(args)
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, ConnectionError) as e:
        print(f"error: cannot reach ComfyUI at {args.server}: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

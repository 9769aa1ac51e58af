#!/usr/bin/env bash
# Tune-A-Video on a generated sample clip, headless: scripts/demo.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
Usage: scripts/demo.sh [--ckpt CHECKPOINT | --random] [--prompt TEXT] [options]

One-shot tunes Tune-A-Video on a clip and its prompt, saves the adapter, inverts the clip with the
tuned model and samples the edited prompt, headless in a ComfyUI server it starts; prints where the
adapter and the video were written. The first run builds .venv (CPU PyTorch, ComfyUI's requirements)
and fetches ComfyUI 0.3.75 into .cache; nothing comes from model hubs.

  (no --ckpt)      the toy world (docs/toy-world.md): builds its checkpoint on the first run
                   (about 14 min on 2 idle cores, resumable; cached in .cache/toy_world/), tunes on a green ring moving
                   along an arc, edits it to --prompt (default "a yellow ring"; any "a <red|green|
                   blue|yellow> <circle|ring|bar>") and prints the edit's scores. Other options
                   go to scripts/toy_world/toy_world_edit.py (--tune-steps, --lr, --steps, --cfg, --invert-with,
                   --position-encoding on|off, --strength, --feature-injection, --injection-block, --seed).
  --ckpt FILE      an SD1.5 checkpoint file (.safetensors): Tune-A-Video's settings (tune 500 steps,
                   24 frames at 512x512, 50 DDIM steps, cfg 12.5; a GPU job) on a generated 2-second
                   sample clip.
  --random         a seeded random-weight SD1.5 on the sample clip: proves the pipeline runs in
                   about 2 min (the video is noise).
  --prompt TEXT    the edited prompt (default with --ckpt/--random: an oil-painted sun and kite)
  --threads N      CPU threads (default: one per free core, from the load average; never more than
                   the cores). The toy-world checkpoint is the same on any count.
  -h, --help       this help

With --ckpt or --random, other options go to scripts/client/run_workflow.py, e.g. --seed 1, --tune-steps 300, --precision fp16,
--source-prompt "...", --server http://127.0.0.1:8188 (a running ComfyUI; --ckpt may then be a
name it lists). Environment: COMFYUI_PATH (your own ComfyUI), TAV_VENV (default .venv).
EOF
}

die() { echo "demo.sh: $*" >&2; echo "See scripts/demo.sh --help" >&2; exit 2; }
CKPT=""
RANDOM_CKPT=0
PROMPT=""
THREADS=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ckpt) { [ $# -ge 2 ] && [ -n "$2" ]; } || die "--ckpt needs a checkpoint file"; CKPT=$2; shift 2 ;;
    --random) RANDOM_CKPT=1; shift ;;
    --prompt) { [ $# -ge 2 ] && [ -n "$2" ]; } || die "--prompt needs a text"; PROMPT=$2; shift 2 ;;
    --threads) { [ $# -ge 2 ] && [ "$2" -ge 1 ] 2>/dev/null; } || die "--threads needs a number >= 1"
               THREADS=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
[ -n "$CKPT" ] && [ "$RANDOM_CKPT" = 1 ] && die "give --ckpt or --random, not both"
if [ -z "$CKPT" ] && [ "$RANDOM_CKPT" = 0 ]; then
  scripts/env/setup.sh
  echo "No --ckpt given: the toy world (the first run builds its checkpoint, about 14 min on 2 idle cores;" >&2
  echo "interrupted, the build resumes from its last saved step when run again)." >&2
  exec "${TAV_VENV:-.venv}/bin/python" scripts/toy_world/toy_world_edit.py --demo ${PROMPT:+--prompt "$PROMPT"} \
    ${THREADS:+--threads "$THREADS"} ${EXTRA[@]+"${EXTRA[@]}"}
fi
# The server run_workflow.py starts inherits OMP_NUM_THREADS: torch's thread count there.
OMP_NUM_THREADS=$("${PYTHON:-python3}" scripts/toy_world/cpu_threads.py ${THREADS:+"$THREADS"})
export OMP_NUM_THREADS
[ -n "$PROMPT" ] || PROMPT="a glowing orange sun drifting over a purple sea, a blue kite bobbing in the sky, oil painting"
WORKFLOW=workflows/api/tav_tune_and_edit_api.json
# Check the arguments now (stdlib Python), not after minutes of setup and a server start.
"${PYTHON:-python3}" scripts/client/run_workflow.py "$WORKFLOW" --check-args --prompt "$PROMPT" \
  ${CKPT:+--checkpoint "$CKPT"} ${EXTRA[@]+"${EXTRA[@]}"} || die "fix the arguments above"

scripts/env/setup.sh
PY="${TAV_VENV:-.venv}/bin/python"
CLIP=$("$PY" scripts/toy_world/make_sample_clip.py out/tav_sample.mp4)  # 2 s, 24 fps, 512x512, deterministic

# Tuning precision: bf16 autocast on a GPU (TAV's default) and on a CPU with bf16 instructions (AVX512-BF16,
# AMX); fp32 on other CPUs, where bf16 is emulated and slower. A later --precision in the arguments wins.
PRECISION=$(PYTHONPATH=scripts/toy_world "$PY" -c "import torch, cpu_threads
print('bf16' if torch.cuda.is_available() or cpu_threads.fast_bf16() else 'fp32')")

if [ -n "$CKPT" ]; then
  # Tune-A-Video's settings: tune 500 steps (lr 3e-5), 24 frames (every 2nd), 512x512, 50 DDIM steps, cfg 12.5.
  SETTINGS=(--tune-steps 500 --precision "$PRECISION" --frames 24 --width 512 --height 512 --steps 50 --cfg 12.5)
  echo "Checkpoint: $CKPT (Tune-A-Video settings; ~10-20 min on a GPU, a day on a CPU)" >&2
else
  CKPT=$("$PY" scripts/models/random_models.py checkpoint)
  SETTINGS=(--tune-steps 5 --precision "$PRECISION" --frames 8 --width 64 --height 64 --steps 10)
  echo "--random: using a random-weight SD1.5 checkpoint ($CKPT)." >&2
  echo "Random weights prove the pipeline runs end to end; the picture is noise, not an edit." >&2
fi

OUT=$("$PY" scripts/client/run_workflow.py "$WORKFLOW" --video "$CLIP" \
      --checkpoint "$CKPT" --prompt "$PROMPT" --deterministic "${SETTINGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"})
echo "Adapter written to:"
grep '\.safetensors$' <<<"$OUT" || true
echo "Video written to:"
grep -v '\.safetensors$' <<<"$OUT" || true

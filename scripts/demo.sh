#!/usr/bin/env bash
# Tune-A-Video on a generated sample clip, headless: one-shot tune on the clip and its prompt, save the
# adapter, invert with the tuned model, sample the edited prompt; print where the adapter and video went.
#
#   scripts/demo.sh                          # random-weight SD1.5: proves the pipeline, not quality
#   scripts/demo.sh --ckpt path/to/sd15.safetensors [--prompt "..."]   # Tune-A-Video's settings
#
# Any other arguments go to scripts/run_workflow.py (e.g. --server http://127.0.0.1:8188, --seed 1,
# --tune-steps 300, --precision fp16, --source-prompt "...").
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=""
PROMPT="a glowing orange sun drifting over a purple sea, a blue kite bobbing in the sky, oil painting"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ckpt) CKPT=${2:?--ckpt needs a checkpoint file (or a name the --server knows)}; shift 2 ;;
    --prompt) PROMPT=${2:?--prompt needs a text}; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

scripts/setup.sh
PY="${TAV_VENV:-.venv}/bin/python"
CLIP=$("$PY" scripts/make_sample_clip.py out/tav_sample.mp4)  # 2 s, 24 fps, 512x512, deterministic

# Tuning precision: bf16 autocast on a GPU (TAV's default); fp32 on a CPU, where bf16 autocast runs
# but is slower than fp32. A later --precision in the arguments wins.
PRECISION=$("$PY" -c "import torch; print('bf16' if torch.cuda.is_available() else 'fp32')")

if [ -n "$CKPT" ]; then
  # Tune-A-Video's settings: tune 500 steps (lr 3e-5), 24 frames (every 2nd), 512x512, 50 DDIM steps, cfg 12.5.
  SETTINGS=(--tune-steps 500 --precision "$PRECISION" --frames 24 --width 512 --height 512 --steps 50 --cfg 12.5)
  echo "Checkpoint: $CKPT (Tune-A-Video settings; ~10-20 min on a GPU, a day on a CPU)" >&2
else
  CKPT=$("$PY" scripts/comfy_runtime.py checkpoint)
  SETTINGS=(--tune-steps 5 --precision "$PRECISION" --frames 8 --width 64 --height 64 --steps 10)
  echo "No --ckpt given: using a random-weight SD1.5 checkpoint ($CKPT)." >&2
  echo "Random weights prove the pipeline runs end to end; the picture is noise, not an edit." >&2
fi

OUT=$("$PY" scripts/run_workflow.py workflows/tav_tune_and_edit_api.json --video "$CLIP" \
      --checkpoint "$CKPT" --prompt "$PROMPT" "${SETTINGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"})
echo "Adapter written to:"
grep '\.safetensors$' <<<"$OUT" || true
echo "Video written to:"
grep -v '\.safetensors$' <<<"$OUT" || true

#!/usr/bin/env bash
# Edit a generated sample clip with Tune-A-Video, headless, and print where the video was written.
#
#   scripts/demo.sh                          # random-weight SD1.5: proves the pipeline, not quality
#   scripts/demo.sh --ckpt path/to/sd15.safetensors [--prompt "..."]   # Tune-A-Video's settings
#
# Any other arguments go to scripts/run_workflow.py (e.g. --server http://127.0.0.1:8188, --seed 1).
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=""
PROMPT="a glowing orange sun drifting over a purple sea, a blue kite bobbing in the sky, oil painting"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ckpt) CKPT=${2:?--ckpt needs a checkpoint file (or a name the --server knows)}; shift 2 ;;
    --prompt) PROMPT=${2:?--prompt needs a text}; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

scripts/setup.sh
PY="${TAV_VENV:-.venv}/bin/python"
CLIP=$("$PY" scripts/make_sample_clip.py out/tav_sample.mp4)  # 2 s, 24 fps, 512x512, deterministic

if [ -n "$CKPT" ]; then
  # Tune-A-Video's inference settings: 24 frames (every 2nd), 512x512, 50 DDIM steps, cfg 12.5.
  SETTINGS=(--frames 24 --width 512 --height 512 --steps 50 --cfg 12.5)
  echo "Checkpoint: $CKPT (Tune-A-Video settings; minutes on a GPU, hours on a CPU)" >&2
else
  CKPT=$("$PY" scripts/comfy_runtime.py checkpoint)
  SETTINGS=(--frames 8 --width 64 --height 64 --steps 10)
  echo "No --ckpt given: using a random-weight SD1.5 checkpoint ($CKPT)." >&2
  echo "Random weights prove the pipeline runs end to end; the picture is noise, not an edit." >&2
fi

OUT=$("$PY" scripts/run_workflow.py workflows/tav_video_edit_api.json --video "$CLIP" \
      --checkpoint "$CKPT" --prompt "$PROMPT" "${SETTINGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"})
echo "Video written to:"
echo "$OUT"

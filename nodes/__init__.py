"""Thin ComfyUI node classes; the logic lives in attention_patches/ and sampling/."""
from .apply_attention import TuneAVideoApplyAttention

NODE_CLASS_MAPPINGS = {
    "TuneAVideoApplyAttention": TuneAVideoApplyAttention,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TuneAVideoApplyAttention": "Tune-A-Video Apply Attention",
}

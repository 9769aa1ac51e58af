"""Thin ComfyUI node classes; the logic lives in attention_patches/ and sampling/."""
from .apply_attention import TuneAVideoApplyAttention
from .inversion_nodes import TuneAVideoInvert, TuneAVideoSampler
from .video_nodes import TuneAVideoLoadFrames, TuneAVideoSaveVideo

NODE_CLASS_MAPPINGS = {
    "TuneAVideoApplyAttention": TuneAVideoApplyAttention,
    "TuneAVideoInvert": TuneAVideoInvert,
    "TuneAVideoSampler": TuneAVideoSampler,
    "TuneAVideoLoadFrames": TuneAVideoLoadFrames,
    "TuneAVideoSaveVideo": TuneAVideoSaveVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TuneAVideoApplyAttention": "Tune-A-Video Apply Attention",
    "TuneAVideoInvert": "Tune-A-Video Invert (DDIM)",
    "TuneAVideoSampler": "Tune-A-Video Sampler",
    "TuneAVideoLoadFrames": "Tune-A-Video Load Frames",
    "TuneAVideoSaveVideo": "Tune-A-Video Save Video",
}

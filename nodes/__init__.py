"""Thin ComfyUI node classes; the logic lives in attention_patches/ and sampling/."""
from .apply_attention import TuneAVideoApplyAttention
from .inversion_nodes import TuneAVideoInvert
from .long_clip_nodes import TuneAVideoLongClip
from .sampler_nodes import TuneAVideoSampler
from .tuning_nodes import TuneAVideoLoadAdapter, TuneAVideoSaveAdapter, TuneAVideoTune
from .video_nodes import TuneAVideoLoadFrames, TuneAVideoSaveVideo

NODE_CLASS_MAPPINGS = {
    "TuneAVideoApplyAttention": TuneAVideoApplyAttention,
    "TuneAVideoInvert": TuneAVideoInvert,
    "TuneAVideoSampler": TuneAVideoSampler,
    "TuneAVideoLongClip": TuneAVideoLongClip,
    "TuneAVideoTune": TuneAVideoTune,
    "TuneAVideoSaveAdapter": TuneAVideoSaveAdapter,
    "TuneAVideoLoadAdapter": TuneAVideoLoadAdapter,
    "TuneAVideoLoadFrames": TuneAVideoLoadFrames,
    "TuneAVideoSaveVideo": TuneAVideoSaveVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TuneAVideoApplyAttention": "Tune-A-Video Apply Attention",
    "TuneAVideoInvert": "Tune-A-Video Invert (DDIM)",
    "TuneAVideoSampler": "Tune-A-Video Sampler",
    "TuneAVideoLongClip": "Tune-A-Video Long Clip",
    "TuneAVideoTune": "Tune-A-Video One-Shot Tune",
    "TuneAVideoSaveAdapter": "Tune-A-Video Save Adapter",
    "TuneAVideoLoadAdapter": "Tune-A-Video Load Adapter",
    "TuneAVideoLoadFrames": "Tune-A-Video Load Frames",
    "TuneAVideoSaveVideo": "Tune-A-Video Save Video",
}
from .metric_nodes import NODE_CLASS_MAPPINGS as _METRICS, NODE_DISPLAY_NAME_MAPPINGS as _METRIC_NAMES  # noqa: E402
NODE_CLASS_MAPPINGS.update(_METRICS), NODE_DISPLAY_NAME_MAPPINGS.update(_METRIC_NAMES)

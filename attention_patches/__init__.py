"""Tune-A-Video's attention for ComfyUI's UNet: pure tensor functions + their attachment to a MODEL."""

"""Inversion, video sampling and the one-shot tuning objective (pure functions over ComfyUI models)."""

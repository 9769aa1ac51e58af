"""Tune-A-Video for ComfyUI: one-shot video generation and editing on ComfyUI's own SD models."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# Served at /extensions/<pack folder>/: web/docs/<NodeClass>.md is each node's page in the frontend's
# node documentation panel (images there are relative to web/docs/).
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

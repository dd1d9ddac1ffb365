"""ComfyUI custom nodes for ssg-engine: load a next-scale model (VAR, Infinity, HART; a shipped name, a folder written
by ``save_pretrained`` or a released layout), sample it with or without SSG, and compare baseline and SSG side by side.

Install: ``pip install ssg-engine`` into ComfyUI's Python, then copy or symlink this folder into ComfyUI's
``custom_nodes/`` (``ln -s "$PWD/comfyui/ssg_engine_nodes" ComfyUI/custom_nodes/``) and restart ComfyUI; the nodes are
under the "ssg-engine" category."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

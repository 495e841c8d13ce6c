"""Wallaroo for ComfyUI: the engine (engine/), the node classes (nodes.py) and the optional ComfyUI bridge."""

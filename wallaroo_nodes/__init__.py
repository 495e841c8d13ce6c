"""Wallaroo for ComfyUI: the engine (engine/) and, later, the node classes."""

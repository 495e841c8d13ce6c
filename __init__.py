"""ComfyUI entry point of the Wallaroo node pack.

ComfyUI imports this folder as a package (named after the folder: comfyui-wallaroo, ComfyUI-Wallaroo, ...)
and reads NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS and WEB_DIRECTORY.

The engine package `wallaroo_nodes` is imported under that top-level name, not as a sub-package of this
folder, so the nodes, the Python SDK and anything else in the ComfyUI process share one module and so one
model cache. Importing this file outside ComfyUI only defines the mappings.
"""
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ENGINE = "wallaroo_nodes"


def _shared_engine():
    """This checkout's `wallaroo_nodes` under its top-level name, or None when another copy holds that name."""
    ours = _HERE / _ENGINE / "__init__.py"
    loaded = sys.modules.get(_ENGINE)
    if loaded is not None:
        same = getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == ours
        return loaded if same else None
    spec = importlib.util.spec_from_file_location(_ENGINE, ours, submodule_search_locations=[str(ours.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_ENGINE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(_ENGINE, None)
        raise
    return module


if _shared_engine() is not None:
    _nodes = importlib.import_module(_ENGINE + ".nodes")
elif __package__:
    logging.getLogger("wallaroo").warning(
        "Wallaroo: another 'wallaroo_nodes' (%s) is already imported; the node pack at %s uses its own copy and "
        "its own model cache", getattr(sys.modules.get(_ENGINE), "__file__", "?"), _HERE)
    from .wallaroo_nodes import nodes as _nodes
else:
    raise ImportError(f"another 'wallaroo_nodes' is already imported; cannot load the node pack at {_HERE}")

_nodes.bridge.setup()

NODE_CLASS_MAPPINGS = _nodes.NODE_CLASS_MAPPINGS
NODE_DISPLAY_NAME_MAPPINGS = _nodes.NODE_DISPLAY_NAME_MAPPINGS
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

"""Wallaroo SDK: the `wallaroo` command line (and, later, a Python API over the engine).

Importing this package stays light (no torch); the engine is imported by the commands that need it.
"""
__version__ = "0.1.0"

__all__ = ["__version__"]

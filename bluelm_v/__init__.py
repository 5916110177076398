"""bluelm-v: BlueLM-V-3B as a plugin-based, Ray-distributed framework.

Importing this package is cheap: it pulls in pluggy and the standard library only.
torch, ray, deepspeed and transformers are imported by the plugins and jobs that need them.
"""
import pluggy

__version__ = "0.1.0"

PROJECT = "bluelm_v"
hookimpl = pluggy.HookimplMarker(PROJECT)
hookspec = pluggy.HookspecMarker(PROJECT)

FAMILIES = ("tiler", "encoder", "downsampler", "projector", "llm", "engine", "quantizer", "backend")

__all__ = ["hookimpl", "hookspec", "FAMILIES", "PROJECT", "__version__"]

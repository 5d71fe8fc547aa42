"""Loading a compiled folder: weights bound to devices and kernels, and the CompiledModel users hold."""

from fiddlerc.loader.model import CompiledModel, load

__all__ = ["CompiledModel", "load"]

"""fiddlerc: an ahead-of-time compiler that runs big Mixture-of-Experts models on a small GPU.

Experts that do not fit on the GPU run on the CPU; only activations cross the bus.

`compile` and `load` are imported on first use, so that importing a part of the package (the
runtime a generated module.py calls, say) does not import the compiler.
"""

from fiddlerc.errors import FiddlerError
from fiddlerc.version import __version__

__all__ = ["FiddlerError", "__version__", "compile", "load"]


def __getattr__(name: str):
    if name in ("compile", "load"):
        from fiddlerc import api

        return getattr(api, name)
    raise AttributeError(f"module 'fiddlerc' has no attribute {name!r}")

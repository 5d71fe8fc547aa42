"""fiddlerc: an ahead-of-time compiler that runs big Mixture-of-Experts models on a small GPU.

Experts that do not fit on the GPU run on the CPU; only activations cross the bus.
"""

__version__ = "0.2.0"

from fiddlerc.api import compile, load  # noqa: E402
from fiddlerc.errors import FiddlerError  # noqa: E402

__all__ = ["FiddlerError", "__version__", "compile", "load"]

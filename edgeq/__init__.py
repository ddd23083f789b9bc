"""edgeq: an edge-deployment compiler.

Kept import-light on purpose: the on-device runtime (`edgeq.runtime`) imports
this package, and a device has neither torch nor the compiler's dependencies.
"""

__version__ = "0.1.0"

"""edgeq: an edge-deployment compiler.

Kept import-light on purpose: the on-device runtime (`edgeq.runtime`) imports
this package, and a device has neither torch nor the compiler's dependencies.
The compiler's API (edgeq/api.py) is reached through the functions below,
which import it when first called.
"""

__version__ = "0.1.0"


def export(*args, **kwargs):
    """`edgeq export` (edgeq.api.export)."""
    from edgeq import api

    return api.export(*args, **kwargs)


def plan(*args, **kwargs):
    """`edgeq plan` (edgeq.api.plan)."""
    from edgeq import api

    return api.plan(*args, **kwargs)


def calibrate(*args, **kwargs):
    """`edgeq calibrate` (edgeq.api.calibrate)."""
    from edgeq import api

    return api.calibrate(*args, **kwargs)


def evaluate(*args, **kwargs):
    """`edgeq eval` (edgeq.api.evaluate)."""
    from edgeq import api

    return api.evaluate(*args, **kwargs)


def inspect(*args, **kwargs):
    """`edgeq inspect` (edgeq.api.inspect)."""
    from edgeq import api

    return api.inspect(*args, **kwargs)


def export_module(*args, **kwargs):
    """Export a torch CNN to a bundle (edgeq.api.export_module)."""
    from edgeq import api

    return api.export_module(*args, **kwargs)

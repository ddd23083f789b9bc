"""edgeq: an edge-deployment compiler.

Kept import-light on purpose: the on-device runtime (`edgeq.runtime`) imports
this package, and a device has neither torch nor the compiler's dependencies.
"""

__version__ = "0.1.0"


def export_module(*args, **kwargs):
    """Export a torch CNN to an ONNX bundle (see edgeq.pipeline.export_module); imports the compiler lazily."""
    from edgeq.pipeline import export_module as run

    return run(*args, **kwargs)

"""GELU as an expression (x/2 (1 + erf(x/sqrt 2)), erf as topi's fast_erf), so it can sit inside another kernel's
epilogue (ops.py's TE linears and emit_gelu, amx.py's and f32_linear.py's kernels)."""

from __future__ import annotations

import numpy as np
from tvm import tirx as tir

_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
               -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
             -1.42647390514189e-02)


def fast_erf_expr(x: tir.PrimExpr) -> tir.PrimExpr:
    """erf(x) for float32 as topi's fast_erf computes it (Eigen's rational approximation on [-4, 4]), as an
    expression, so it can sit inside another kernel's epilogue."""
    f32 = lambda v: tir.const(v, "float32")                                  # noqa: E731
    x = tir.max(tir.min(x, f32(4.0)), f32(-4.0))
    x2 = x * x
    p = f32(_ERF_ALPHA[0])
    for c in _ERF_ALPHA[1:]:
        p = x2 * p + f32(c)
    q = f32(_ERF_BETA[0])
    for c in _ERF_BETA[1:]:
        q = x2 * q + f32(c)
    return x * p / q


def gelu_expr(x: tir.PrimExpr) -> tir.PrimExpr:
    """x/2 (1 + erf(x/sqrt 2)) with fast_erf_expr."""
    return x * tir.const(0.5, "float32") * (tir.const(1.0, "float32")
                                             + fast_erf_expr(x * tir.const(float(np.sqrt(0.5)), "float32")))

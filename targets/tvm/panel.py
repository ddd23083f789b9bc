"""How TVM weights are stored in panels (no TVM import: the target reads it when it decides widths)."""

from __future__ import annotations

import math

PANEL = 64      # outputs per stored weight panel (one 64-byte cache line per input row for the 8-bit formats)


def panel_width(n_out: int) -> int:
    """Outputs per panel: 64, or the largest power of two dividing a width that 64 does not."""
    return math.gcd(n_out, PANEL)

"""How numbers are written: one format for every printed table and report."""

from __future__ import annotations

import math


def fmt(v, digits: int = 4) -> str:
    """One number format for every table: `digits` significant digits, scientific when tiny or huge."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{max(digits - 2, 1)}e}"
        return f"{v:.{digits}g}"
    return str(v)

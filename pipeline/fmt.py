"""Human-readable numbers for the jobs' lines: bytes and durations."""
from __future__ import annotations

import math

__all__ = ["fmt_bytes", "fmt_time"]


def fmt_bytes(n: float) -> str:
    """``512 B``, ``1.5 MB``, ... (powers of 1000, one decimal; whole bytes below 1 kB)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover - the loop returns at TB


def fmt_time(s: float) -> str:
    """``1m05s``, ``2h03m``; ``?`` when unknown (an infinite ETA)."""
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

"""Tile sizes for attention computed in pieces under a memory budget (shared by the attention upsamplers).

An attention upsampler's intermediates grow with the number of output positions it computes at once. Computing the
output in tiles of rows, each tile's intermediates bounded by a byte budget, keeps peak memory at about the budget
plus the output itself, whatever the output size.
"""
from __future__ import annotations

from collections.abc import Iterator

from .errors import ConfigError

__all__ = ["rows_per_tile", "tile_spans"]


def rows_per_tile(n_rows: int, bytes_per_row: int, max_bytes: int | None) -> int:
    """How many rows one tile may hold so that its intermediates fit ``max_bytes``.

    Args:
        n_rows: rows to cover (>= 1).
        bytes_per_row: bytes of intermediates one row needs (>= 1; an estimate from the tensors a tile allocates).
        max_bytes: the budget; None = no budget (one tile of ``n_rows``).

    Returns:
        Rows per tile in ``[1, n_rows]``: at least one row even when a single row exceeds the budget.

    Raises:
        ConfigError: a non-positive row count, row size or budget.
    """
    if n_rows < 1 or bytes_per_row < 1:
        raise ConfigError(f"rows_per_tile: need n_rows >= 1 and bytes_per_row >= 1, got {n_rows}, {bytes_per_row}")
    if max_bytes is None:
        return int(n_rows)
    if max_bytes < 1:
        raise ConfigError(f"rows_per_tile: max_bytes must be positive or None, got {max_bytes}")
    return int(max(1, min(n_rows, max_bytes // bytes_per_row)))


def tile_spans(n: int, step: int) -> Iterator[tuple[int, int]]:
    """The half-open spans ``[start, stop)`` of consecutive tiles of ``step`` covering ``range(n)``.

    Args:
        n: length to cover (>= 0).
        step: tile length (>= 1).

    Yields:
        ``(start, stop)`` pairs, the last one possibly shorter.
    """
    if step < 1:
        raise ConfigError(f"tile_spans: step must be >= 1, got {step}")
    for start in range(0, n, step):
        yield start, min(start + step, n)

"""Geometry of binary masks shared by the prompts and the metrics."""

from __future__ import annotations

import numpy as np

__all__ = ["bounding_slices"]


def bounding_slices(mask: np.ndarray) -> tuple[slice, slice]:
    """The rows and columns of a non-empty ``(H, W)`` mask's bounding box, as slices into the mask.

    Two ``any`` reductions rather than scipy's ``find_objects``, which costs 1.6 ms against 0.1 ms at 1024 px, and
    this runs per prompt mode, channel and region of every evaluated image.

    Args:
        mask: ``(H, W)`` bool mask with at least one True pixel.

    Returns:
        ``(rows, cols)`` slices whose stop is one past the last row and column of the mask.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)

"""Binary masks: the one rule that turns probabilities into masks, and the geometry the prompts and metrics share."""

from __future__ import annotations

import numpy as np

__all__ = ["binarise", "bounding_slices"]


def binarise(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Foreground where the probability is at least ``threshold``, compared in float32.

    The written masks, the measurements and the metrics all use this rule, the one of MONAI's
    ``AsDiscrete(threshold=...)`` that training's validation Dice uses, so a pixel at exactly the threshold counts
    the same everywhere. The comparison is in float32, the network's probabilities' type, as torch compares a
    float32 tensor with a number: ``float32(0.7)`` is below 0.7, so a float64 comparison would call background a
    pixel the masks call foreground.

    Args:
        probabilities: probabilities of any shape.
        threshold: the probability from which a pixel is foreground.

    Returns:
        A bool array of the same shape.
    """
    return np.asarray(probabilities, dtype=np.float32) >= np.float32(threshold)


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

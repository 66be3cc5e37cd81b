"""Clinical measurements from binary fundus masks: cup-to-disc ratios, and vessel density, shape and calibre.

A segmentation mask is not what a glaucoma or cardiovascular study records. These pure functions turn ``(H, W)``
binary masks (bool, or numbers holding only 0 and 1) into the measurements such studies do record: the optic disc
and cup measures REFUGE scores (Orlando et al., "REFUGE Challenge: a unified framework for evaluating automated
methods for glaucoma assessment from fundus photographs", MedIA 59:101570, 2020), and the vessel measures AutoMorph
reports (Zhou et al., "AutoMorph: automated retinal vascular morphology quantification via a deep learning
pipeline", TVST 11(7):12, 2022): area density, fractal dimension, calibre and distance tortuosity (not its curvature
tortuosity), defined as :func:`vessel_measurements` says, not with AutoMorph's formulas, so their values are not
comparable with AutoMorph's. They need no network and no GPU.

Conventions shared by every function:

- lengths and areas are in pixels; the ``*_mm`` and ``*_mm2`` variants are added when the caller gives
  ``pixel_size_mm`` (the side of one square pixel in millimetres), and :data:`MEASURE_UNITS` names every unit;
- the content of a mask is never an error: an empty disc, a cup outside its disc, an empty vessel map or FOV give
  NaN for what they leave undefined, and the record's ``notes`` says why (``""`` when nothing needs saying);
- :class:`MeasurementError` is raised only for a caller's programming error: an array that is not ``(H, W)``,
  values other than 0 and 1, masks of different shapes, or a pixel size that is not a positive number.

Skeleton graphs (:func:`vessel_segments`) count neighbours with m-adjacency (Gonzalez and Woods, *Digital Image
Processing*, "mixed adjacency"): the eight neighbours, except a diagonal one that is also reached through a shared
4-neighbour. With plain 8-adjacency every corner of a staircase and both pixels beside a T junction would have
three neighbours and count as junctions.
"""

from __future__ import annotations

import logging
import math
import numbers

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from scripts.masks import bounding_slices

__all__ = [
    "MEASURE_UNITS",
    "STRUCTURE_NAMES",
    "MeasurementError",
    "disc_cup_measurements",
    "fill_holes",
    "fractal_dimension",
    "mean_calibre",
    "measure_structures",
    "structure_of",
    "tortuosity",
    "vessel_measurements",
    "vessel_segments",
    "vessel_skeleton",
    "warn_about_unmeasured_channels",
]

logger = logging.getLogger(__name__)

MEASURE_UNITS: dict[str, str] = {
    "vertical_cdr": "ratio",
    "horizontal_cdr": "ratio",
    "area_cdr": "ratio",
    "disc_area_px": "px²",
    "cup_area_px": "px²",
    "rim_area_px": "px²",
    "disc_area_mm2": "mm²",
    "cup_area_mm2": "mm²",
    "rim_area_mm2": "mm²",
    "cup_offset_x": "disc width",
    "cup_offset_y": "disc height",
    "vessel_density": "ratio",
    "skeleton_density": "1/px",  # centre-line pixels (its length) per FOV pixel (its area): it scales with 1/size
    "skeleton_density_mm": "1/mm",
    "fractal_dimension": "",  # dimensionless, unlike the ratios it is no quotient of two measures
    "tortuosity_mean": "ratio",
    "tortuosity_median": "ratio",
    "calibre_mean_px": "px",
    "calibre_mean_mm": "mm",
    "segments": "count",
    "branch_points": "count",
    "end_points": "count",
    "small_fragments": "count",
    "notes": "",
}
"""Unit of every key :func:`disc_cup_measurements` and :func:`vessel_measurements` can return, for CSV headers such
as ``disc_area_px [px²]``. ``cup_offset_x`` and ``cup_offset_y`` are fractions of the disc's width and height."""

# Neighbour offsets (row, col), 4-neighbours first so that a walk along a staircase takes its 4-steps (see
# _m_adjacency). Bit b of a pixel's neighbour code stands for _OFFSETS[b].
_OFFSETS = ((-1, 0), (0, 1), (1, 0), (0, -1), (-1, 1), (1, 1), (1, -1), (-1, -1))
_CODE_BITS = tuple(tuple(bit for bit in range(len(_OFFSETS)) if code >> bit & 1) for code in range(256))
_CODE_DEGREE = np.array([len(bits) for bits in _CODE_BITS], dtype=np.int8)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# Pixels between the vertices of the polyline that measures a segment's arc length (see tortuosity): on lines drawn
# at every angle the error stays under 0.5%, and on semicircles of radius 10 to 100 px under 0.4%.
_SAMPLE_STEP = 5


class MeasurementError(ValueError):
    """A measurement was called with arrays or settings it cannot take; the message names the argument."""


def _as_mask(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` as an ``(H, W)`` bool mask; anything but a 2-D array of 0 and 1 (or bool) is a caller's error."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise MeasurementError(f"{name} must be a 2-D (H, W) mask, got an array of shape {array.shape}")
    if array.dtype == np.bool_:
        return array
    # Thresholding silently (a probability map, a 0/255 PNG) would measure something the caller did not mean.
    if not np.all((array == 0) | (array == 1)):
        found = np.unique(array)[:6].tolist()
        raise MeasurementError(f"{name} must hold only 0 and 1 (or bool), found values {found}")
    return array.astype(bool)


def _same_shape(first: np.ndarray, first_name: str, second: np.ndarray, second_name: str) -> None:
    """Raise a :class:`MeasurementError` naming both shapes when two masks differ in shape."""
    if first.shape != second.shape:
        raise MeasurementError(
            f"{first_name} and {second_name} must have the same shape, got {first.shape} and {second.shape}"
        )


def _check_pixel_size(pixel_size_mm: float | None) -> float | None:
    """``pixel_size_mm`` as a float, or None; anything but a finite positive number is a caller's error."""
    if pixel_size_mm is None:
        return None
    number = isinstance(pixel_size_mm, numbers.Real) and not isinstance(pixel_size_mm, bool)
    if not (number and math.isfinite(pixel_size_mm) and pixel_size_mm > 0):
        raise MeasurementError(f"pixel_size_mm must be a positive number of millimetres, got {pixel_size_mm!r}")
    return float(pixel_size_mm)


# A vessel crossing the disc can split a disc or cup mask into pieces. The vessels there are up to about a tenth of
# the disc's diameter wide (the central retinal vein, about 0.15-0.2 mm, in a disc of about 1.8 mm), whatever the
# size of the cup: a piece within 0.12 disc diameters of the largest (a fifth more, for the segmentation's blur) is
# taken for a part of the structure, one further away for a stray speck, which would stretch the diameters.
SPLIT_GAP_OF_DISC = 0.12
# A piece a vessel splits off is a part of the structure's outline cut across, hundreds of pixels at any size a disc
# is measured at (a cap cut 5 px deep from a 160 px disc is about 190 px, 0.9% of it); a speck the thresholding left
# beside it (a few pixels) is not, and joined it would stretch a diameter by the whole gap (a 4 px speck 16 px above
# a 160 px disc moved its vertical CDR by 0.05). Nearby pieces under this share of the largest are left out.
SMALLEST_SPLIT_PIECE = 0.005
# Over twice the densest of DRIVE's 40 first-observer vessel maps (0.168 of the field of view; mean 0.126).
IMPLAUSIBLE_VESSEL_DENSITY = 0.4
# Below this diameter in pixels, one pixel more or less changes a cup-to-disc ratio by more than 0.05.
SMALLEST_MEASURABLE_DISC = 20

SMALLEST_VESSEL_FRAGMENT = 10
"""Default ``min_fragment_px`` of :func:`vessel_measurements`: the counts of segments, branch points and end points
leave out pieces of a vessel mask under this many pixels. DRIVE's 20 manual training maps hold 9 such pieces in
all. On the 16 training photographs of tools.prepare's DRIVE split, the top-hat baseline (tools.baseline, fitted on
them) made 244 per photograph, and leaving them out brought its mean absolute error against the manual maps from
222 to 121 segments and from 428 to 171 end points (103 branch points either way). Taken out of the other measures
as well, they moved its density's error from 0.0195 to 0.0199 and its calibre's from 1.03 to 1.20 px, so those
take every piece."""


def _equivalent_diameter(mask: np.ndarray) -> float:
    """The diameter of the circle with ``mask``'s area."""
    return 2.0 * math.sqrt(np.count_nonzero(mask) / math.pi)


def _main_structure(mask: np.ndarray, reach: float, within: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The largest 8-connected component of ``mask`` with the pieces near it.

    Args:
        mask: ``(H, W)`` bool mask.
        reach: the distance in pixels from the largest component within which a piece joins it (at least 2), if
            it holds at least :data:`SMALLEST_SPLIT_PIECE` of the largest's pixels.
        within: only components overlapping it are candidates for the largest (the cup's pieces in the disc); when
            none does, every component is.

    Returns:
        The structure, and the number of pieces joined to the largest.
    """
    labels, count = ndimage.label(mask, _EIGHT_CONNECTED)
    if count <= 1:
        return mask.copy(), 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    candidates = sizes.copy()
    if within is not None and within.any():
        overlapping = np.zeros(count + 1, dtype=bool)
        overlapping[np.unique(labels[within])] = True
        if overlapping[1:].any():
            candidates[~overlapping] = 0
    largest_label = int(np.argmax(candidates))
    largest = labels == largest_label
    reach = max(2.0, reach)
    rows, cols = bounding_slices(largest)
    margin = math.ceil(reach) + 1
    window = (
        slice(max(rows.start - margin, 0), rows.stop + margin),
        slice(max(cols.start - margin, 0), cols.stop + margin),
    )
    near = ndimage.distance_transform_edt(~largest[window]) <= reach
    kept = np.unique(labels[window][near & mask[window]])
    kept = kept[(kept > 0) & (sizes[kept] >= SMALLEST_SPLIT_PIECE * sizes[largest_label])]
    return np.isin(labels, kept), len(kept) - 1


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled (background that no 4-connected path joins to the picture's border, as the
    8-connected pieces' outlines enclose it): a disc or cup has none, which is how the measurements and the written
    label image take a structure whose mask has one.

    Args:
        mask: ``(H, W)`` bool mask.

    Returns:
        A new ``(H, W)`` bool mask.
    """
    filled = mask.copy()
    if filled.any():
        rows, cols = bounding_slices(filled)
        box = filled[rows, cols]
        box |= ndimage.binary_fill_holes(box)
    return filled


def _diameter(mask: np.ndarray, axis: int) -> int:
    """The longest extent of a mask along one column (``axis=0``, vertical) or one row (``axis=1``), from its first
    pixel there to its last.

    On a mask without gaps this is REFUGE's diameter (its evaluation code counts the most pixels in one column), and
    across a gap that a vessel leaves in a structure, the structure's whole extent (the count fell by the vessel's
    width).
    """
    present = mask.any(axis=axis)
    if not present.any():
        return 0
    length = mask.shape[axis]
    first = np.argmax(mask, axis=axis)
    last = length - 1 - np.argmax(np.flip(mask, axis=axis), axis=axis)
    return int((last - first + 1)[present].max())


def disc_cup_measurements(
    disc: np.ndarray, cup: np.ndarray | None, pixel_size_mm: float | None = None
) -> dict[str, float | str]:
    """Cup-to-disc ratios, disc, cup and rim areas, and the cup's offset in its disc.

    Each mask is reduced to its largest 8-connected component (for the cup, the largest in the disc) and the
    pieces within 0.12 disc diameters of it (:data:`SPLIT_GAP_OF_DISC`: a vessel may split a disc or cup) holding at
    least 0.5% of its pixels (:data:`SMALLEST_SPLIT_PIECE`), which is noted: a stray speck would otherwise stretch
    the diameters the ratios divide. Leaving out more than 1% of a mask's pixels so is noted. The holes of each
    structure are filled (a disc or cup has none), noted where they held over 1% of it.

    - ``vertical_cdr``: the cup's vertical diameter over the disc's, the vertical cup-to-disc ratio REFUGE scores
      (Orlando et al., MedIA 2020). A diameter is the longest extent in one column, from the structure's first
      pixel there to its last: on a mask without gaps, the diameter of REFUGE's evaluation code (the most pixels in
      one column), and across the gap a vessel leaves, the whole structure (the count would lose the vessel);
    - ``horizontal_cdr``: the same with the longest extent in one row;
    - ``area_cdr``: area of the cup inside the disc over the disc's area;
    - ``disc_area_px``, ``cup_area_px``: the structures' pixel counts, holes filled (the cup as segmented, even
      where it leaves the disc); ``rim_area_px``: the disc's area less that of the cup inside it (the neuroretinal rim);
    - ``cup_offset_x``, ``cup_offset_y``: the centroid of the cup inside the disc less the disc's centroid, as
      fractions of the disc's width and height; x grows to the right, y downwards.

    Degenerate content gives defined values and a reason in ``notes``:

    - an empty disc: every ratio and offset is NaN;
    - an empty cup in a non-empty disc: the ratios are 0 (a disc without a visible cup) and the offsets NaN;
    - a cup partly outside the disc: measured clipped to the disc;
    - a cup wholly outside the disc: every ratio and offset is NaN;
    - a disc touching the picture's border: measured as it is, with a note (it may be cut off, and its ratios);
    - a disc under 20 pixels across (:data:`SMALLEST_MEASURABLE_DISC`): measured, with a note;
    - no cup mask at all (a model without a cup channel): the disc is measured, with its notes; the cup, rim,
      ratios and offsets are NaN, and noted.

    Args:
        disc: ``(H, W)`` optic disc mask.
        cup: ``(H, W)`` optic cup mask, or None where the cup is not segmented.
        pixel_size_mm: side of a pixel in millimetres; when given the areas are also reported in mm².

    Returns:
        ``{key: value}`` with the keys above, ``disc_area_mm2``, ``cup_area_mm2`` and ``rim_area_mm2`` when
        ``pixel_size_mm`` is given, and ``notes``: ``""``, or the reasons joined by ``"; "``. Units are in
        :data:`MEASURE_UNITS`.

    Raises:
        MeasurementError: a mask is not 2-D or not binary, the masks differ in shape, or ``pixel_size_mm`` is not a
            positive number.
    """
    disc_mask = _as_mask(disc, "disc")
    cup_mask = np.zeros_like(disc_mask) if cup is None else _as_mask(cup, "cup")
    _same_shape(disc_mask, "disc", cup_mask, "cup")
    pixel_size = _check_pixel_size(pixel_size_mm)

    # The disc's size before its pieces are told apart: its largest piece alone may be half of it.
    disc_region, disc_joined = _main_structure(disc_mask, SPLIT_GAP_OF_DISC * _equivalent_diameter(disc_mask))
    # A disc or cup has no hole: one in the mask (the pale cup missed in a disc's) would take its pixels off the
    # areas, and set a cup there outside its disc.
    disc_region = fill_holes(disc_region)
    # The cup is the largest piece in the disc (a larger false cup outside it would otherwise take its place), with
    # the pieces within the disc's reach.
    cup_region, cup_joined = _main_structure(
        cup_mask, SPLIT_GAP_OF_DISC * _equivalent_diameter(disc_region if disc_region.any() else cup_mask), disc_region
    )
    cup_region = fill_holes(cup_region)
    inside = cup_region & disc_region
    disc_area = int(np.count_nonzero(disc_region))
    cup_area = int(np.count_nonzero(cup_region))
    inside_area = int(np.count_nonzero(inside))

    record: dict[str, float | str] = {
        "vertical_cdr": math.nan,
        "horizontal_cdr": math.nan,
        "area_cdr": math.nan,
        "disc_area_px": float(disc_area),
        "cup_area_px": float(cup_area),
        "rim_area_px": float(disc_area - inside_area),
    }
    if pixel_size is not None:
        for key in ("disc", "cup", "rim"):
            record[f"{key}_area_mm2"] = float(record[f"{key}_area_px"]) * pixel_size**2
    record["cup_offset_x"] = math.nan
    record["cup_offset_y"] = math.nan

    notes = []
    for name, mask, joined, region in (
        ("disc", disc_mask, disc_joined, disc_region),
        ("cup", cup_mask, cup_joined, cup_region),
    ):
        # Counted against the mask once the holes are filled: a piece away from the structure that lies in one of its
        # holes is measured, not left out.
        holes = int(np.count_nonzero(region & ~mask))
        left_out = int(np.count_nonzero(mask & ~region))
        if joined:
            notes.append(f"{name}: {joined + 1} pieces measured as one (split by a vessel?)")
        if holes > 0.01 * np.count_nonzero(region):
            notes.append(f"{name}: holes of {holes} px ({100.0 * holes / np.count_nonzero(region):.1f}%) filled")
        if left_out > 0.01 * (left_out + np.count_nonzero(region)):
            share = 100.0 * left_out / (left_out + np.count_nonzero(region))
            notes.append(f"{name}: {left_out} px ({share:.1f}%) of pieces away from the {name} left out")
    if disc_area and (disc_region[[0, -1]].any() or disc_region[:, [0, -1]].any()):
        notes.append("disc touches the picture's border: it may be cut off, and its ratios with it")
    if 0 < disc_area and _equivalent_diameter(disc_region) < SMALLEST_MEASURABLE_DISC:
        notes.append(
            f"disc is {_equivalent_diameter(disc_region):.0f} px across: one pixel changes its ratios by more than 0.05"
        )
    if disc_area == 0:
        notes.append("disc mask is empty" + (" (the cup mask is not)" if cup_area else ""))
    elif cup is not None:
        if cup_area == 0:
            notes.append("cup mask is empty: ratios are 0 (a disc without a visible cup), the cup offset is undefined")
            record.update(vertical_cdr=0.0, horizontal_cdr=0.0, area_cdr=0.0)
        elif inside_area == 0:
            notes.append("cup lies wholly outside the disc: the ratios and the rim are undefined")
            record.update({key: math.nan for key in record if key.startswith("rim_")})
        else:
            if inside_area < cup_area:
                outside = 100.0 * (cup_area - inside_area) / cup_area
                notes.append(f"cup extends outside the disc ({outside:.1f}% of its pixels); measured inside the disc")
            disc_rows, disc_cols = bounding_slices(disc_region)
            disc_height, disc_width = disc_rows.stop - disc_rows.start, disc_cols.stop - disc_cols.start
            disc_row, disc_col = ndimage.center_of_mass(disc_region)
            cup_row, cup_col = ndimage.center_of_mass(inside)
            record.update(
                vertical_cdr=_diameter(inside, 0) / _diameter(disc_region, 0),
                horizontal_cdr=_diameter(inside, 1) / _diameter(disc_region, 1),
                area_cdr=inside_area / disc_area,
                cup_offset_x=float(cup_col - disc_col) / disc_width,
                cup_offset_y=float(cup_row - disc_row) / disc_height,
            )
    if cup is None:
        notes.append("no cup channel: the cup and the ratios are not measured")
        unknown = [key for key in record if key.startswith(("cup_", "rim_")) or key.endswith("_cdr")]
        record.update(dict.fromkeys(unknown, math.nan))
    record["notes"] = "; ".join(notes)
    return record


def fractal_dimension(mask: np.ndarray, box_sizes: list[int] | tuple[int, ...] | None = None) -> float:
    """Box-counting (Minkowski-Bouligand) dimension of a binary mask.

    For each box side ``s`` the mask is padded with background and tiled with ``s x s`` boxes; ``N(s)`` counts the
    boxes holding at least one foreground pixel, the fewest of four grids shifted by half a box along each axis
    (so that where a grid happens to fall matters little). The dimension is the least-squares slope of
    ``log N(s)`` against ``log(1 / s)``.

    The fit covers a finite range of scales, so a shape only a few of the largest boxes across measures less than
    its dimension (a 200 px square in a 256 px mask measures 1.87 with the default sides, a 210 px segment of a
    line 0.93), and a vessel map's value depends on its resolution: compare values measured with the same box
    sides on masks of similar size, as a study does.

    Args:
        mask: ``(H, W)`` binary mask.
        box_sizes: box sides in pixels, at least two distinct positive integers. The default is the powers of two
            from 2 to a quarter of the mask's smaller side (2 and 4 for a mask smaller than 16 pixels), so that
            the largest boxes still number at least 16. A self-similar set is measured exactly with its own scale
            factor, e.g. powers of 3 for the Sierpinski carpet.

    Returns:
        the dimension (about 1 for a line, 2 for a filled region), or NaN for an empty mask.

    Raises:
        MeasurementError: ``mask`` is not a 2-D binary array, or ``box_sizes`` has fewer than two distinct
            positive sides.
    """
    binary = _as_mask(mask, "mask")
    if box_sizes is None:
        largest = max(4, min(binary.shape) // 4)
        sizes = [2**power for power in range(1, int(math.log2(largest)) + 1)]
    else:
        sizes = sorted({int(size) for size in box_sizes})
        if len(sizes) < 2 or sizes[0] < 1:
            raise MeasurementError(f"box_sizes must hold at least two distinct positive sides, got {box_sizes!r}")
    if not binary.any():
        return math.nan
    # The fewest boxes of four grids, shifted by half a box along each axis: where one grid falls moved a 200 px
    # square's dimension from 1.83 to 1.87, and a DRIVE vessel map's by up to 0.012.
    if all(size & (size - 1) == 0 for size in sizes):
        counts = _fewest_boxes_by_halving(binary, sizes)
    else:
        counts = [_fewest_boxes(binary, size) for size in sizes]
    slope, _ = np.polyfit(-np.log(sizes), np.log(counts), 1)
    return float(slope)


def _fewest_boxes(mask: np.ndarray, size: int) -> int:
    """Boxes of ``size`` holding foreground, the fewest of the grids shifted by 0 or half a box along each axis."""
    shifts = sorted({0, size // 2})
    return min(_occupied(_boxes(mask, size, row, col)) for row in shifts for col in shifts)


def _fewest_boxes_by_halving(mask: np.ndarray, sizes: list[int]) -> list[int]:
    """:func:`_fewest_boxes` for each of ``sizes``, powers of two, from a pyramid of occupied boxes.

    A box of side ``2s`` holds foreground where one of the four ``s`` boxes it covers does, and a grid of ``2s``
    boxes shifted by half a box pairs the ``s`` boxes from one box earlier: every grid comes from the one below it,
    instead of each of the 4 x ``len(sizes)`` grids re-reading the whole mask (an 8 MP vessel map: 1.4 s -> 0.05 s).
    """
    fewest = {1: _occupied(mask)}
    level, side = mask, 1  # the unshifted grid of boxes of this side: True where a box holds foreground
    while side < sizes[-1]:
        paired_rows = [_pair_up(level, shift) for shift in (0, 1)]
        grids = [_pair_up(rows.T, shift).T for rows in paired_rows for shift in (0, 1)]
        level, side = grids[0], 2 * side
        fewest[side] = min(_occupied(grid) for grid in grids)
    return [fewest[size] for size in sizes]


def _pair_up(boxes: np.ndarray, shift: int) -> np.ndarray:
    """Rows of boxes merged two by two, the first pair starting ``shift`` (0 or 1) rows before the first row."""
    parts = []
    if shift:
        parts.append(boxes[:1])
        boxes = boxes[1:]
    paired = len(boxes) // 2 * 2
    parts.append(boxes[0:paired:2] | boxes[1:paired:2])
    if paired < len(boxes):
        parts.append(boxes[paired:])
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _boxes(mask: np.ndarray, size: int, row_shift: int, col_shift: int) -> np.ndarray:
    """Which boxes of ``size`` hold foreground, the grid shifted down and right by the given pixels."""
    rows, cols = mask.shape
    padded = np.pad(mask, ((row_shift, -(rows + row_shift) % size), (col_shift, -(cols + col_shift) % size)))
    return padded.reshape(padded.shape[0] // size, size, -1, size).any(axis=(1, 3))


def _occupied(boxes: np.ndarray) -> int:
    return int(np.count_nonzero(boxes))


def _m_adjacency(skeleton: np.ndarray) -> np.ndarray:
    """Per pixel, a bit code of its m-adjacent skeleton neighbours (bit ``b`` for ``_OFFSETS[b]``); 0 off it.

    A diagonal neighbour counts only when neither 4-neighbour the two pixels share is on the skeleton: otherwise
    it is also reached through that pixel, and counting it as well would make staircase corners and the pixels
    beside a T junction look like junctions.
    """
    height, width = skeleton.shape
    padded = np.pad(skeleton, 1)

    def shifted(row: int, col: int) -> np.ndarray:
        return padded[1 + row : 1 + row + height, 1 + col : 1 + col + width]

    codes = np.zeros(skeleton.shape, dtype=np.uint8)
    for bit, (row, col) in enumerate(_OFFSETS):
        present = shifted(row, col)
        if row and col:
            present = present & ~shifted(row, 0) & ~shifted(0, col)
        codes |= present.astype(np.uint8) << bit
    codes[~skeleton] = 0
    return codes


def _skeleton_graph(skeleton: np.ndarray) -> tuple[list[np.ndarray], int, int]:
    """Segments, branch points and end points of a one-pixel-wide skeleton; see :func:`vessel_segments`.

    Returns:
        the segments as ordered ``(N, 2)`` (row, col) arrays, the number of branch points (8-connected clusters
        of junction pixels, i.e. pixels with more than two m-adjacent neighbours) and of end points (pixels with
        one).
    """
    width = skeleton.shape[1]
    codes = _m_adjacency(skeleton).ravel()
    degree = _CODE_DEGREE[codes]
    on_skeleton = skeleton.ravel()
    node = on_skeleton & (degree != 2)
    # A junction is often a cluster of adjacent pixels (a crossing's 2 x 2 block): one branch point.
    clusters, branch_points = ndimage.label(skeleton & (degree >= 3).reshape(skeleton.shape), _EIGHT_CONNECTED)
    cluster = clusters.ravel()
    end_points = int(np.count_nonzero(on_skeleton & (degree == 1)))
    steps = [row * width + col for row, col in _OFFSETS]
    visited = np.zeros(on_skeleton.shape, dtype=bool)

    def neighbours(pixel: int) -> list[int]:
        return [pixel + steps[bit] for bit in _CODE_BITS[codes[pixel]]]

    def walk(start: int, first: int) -> list[int]:
        """Pixels from ``start`` through ``first`` along degree-2 pixels to the next node, or back to ``start``."""
        path = [start]
        previous, current = start, first
        while not node[current] and current != start:
            visited[current] = True
            path.append(current)
            one, other = neighbours(current)
            previous, current = current, other if one == previous else one
        path.append(current)
        return path

    paths: list[list[int]] = []
    for start in np.flatnonzero(node):
        start = int(start)
        if degree[start] == 0:
            paths.append([start])  # an isolated pixel: a segment of length 0
            continue
        for first in neighbours(start):
            if node[first]:
                # Two adjacent nodes make a segment without interior pixels, unless both belong to one branch point.
                if start < first and not (cluster[start] and cluster[start] == cluster[first]):
                    paths.append([start, first])
            elif not visited[first]:
                path = walk(start, first)
                # One pixel leading back into the branch point it left is part of that branch point, not a loop.
                if not (len(path) == 3 and cluster[start] and cluster[start] == cluster[path[-1]]):
                    paths.append(path)
    # What no walk from a node reached are closed loops without junctions or ends.
    for start in np.flatnonzero(on_skeleton & ~node & ~visited):
        start = int(start)
        if not visited[start]:
            visited[start] = True
            paths.append(walk(start, neighbours(start)[0]))
    segments = [np.column_stack(np.divmod(np.asarray(path, dtype=np.int64), width)) for path in paths]
    return segments, int(branch_points), end_points


def vessel_segments(skeleton: np.ndarray) -> list[np.ndarray]:
    """Split a one-pixel-wide skeleton into vessel segments between junctions and end points.

    Neighbours are m-adjacent skeleton pixels (see the module docstring). Junctions have more than two neighbours,
    end points one; adjacent junction pixels form one branch point. A segment runs from a junction or end point
    along pixels with two neighbours to the next junction or end point, both included, so segments meeting at a
    branch point share its pixels. A closed loop without junction or end point is one segment that starts at an
    arbitrary pixel and repeats it at its end; an isolated pixel is a one-pixel segment.

    Args:
        skeleton: ``(H, W)`` one-pixel-wide skeleton, e.g. from :func:`skimage.morphology.skeletonize`. A thicker
            mask is not an error, but its interior pixels become junctions.

    Returns:
        segments as ordered ``(N, 2)`` int64 arrays of (row, col) pixel coordinates, consecutive pixels adjacent:
        the sum of their steps (1 or sqrt 2) is the pixel path's length (:func:`tortuosity` measures a polyline
        through every few pixels instead).

    Raises:
        MeasurementError: ``skeleton`` is not a 2-D binary array.
    """
    return _skeleton_graph(_as_mask(skeleton, "skeleton"))[0]


def _arc_length(segment: np.ndarray, sample_step: int) -> float:
    """Length of the polyline through every ``sample_step``-th pixel of ``segment`` and its last one."""
    samples = np.unique(np.append(np.arange(0, len(segment), sample_step), len(segment) - 1))
    return float(np.linalg.norm(np.diff(segment[samples].astype(np.float64), axis=0), axis=1).sum())


def tortuosity(segment: np.ndarray, sample_step: int = _SAMPLE_STEP) -> float:
    """Distance tortuosity of a vessel segment: its arc length over its chord length.

    The distance metric of AutoMorph and of Grisan et al. ("A novel method for the automatic grading of retinal
    vessel tortuosity", IEEE TMI 27(3), 2008): 1 for a straight segment, pi / 2 for a semicircle. The chord joins
    the first and last pixels. The arc is the polyline through every ``sample_step``-th pixel: summing the
    pixel-to-pixel steps (1 or sqrt 2) instead overestimates a line's length by up to 8% depending on its
    direction (by 8.2% at 22.5 degrees, 5.5% on average), which would make straight vessels look tortuous. The
    price is bends tighter than the step, which the polyline cuts: a 3 px wide sinusoid of amplitude 4 px and
    wavelength 16 px (arc over chord 1.46) measures 1.31, one of amplitude 3 px and wavelength 20 px (1.19) 1.17.

    Args:
        segment: ordered ``(N, 2)`` pixel coordinates of a segment, as :func:`vessel_segments` returns.
        sample_step: pixels between the polyline's vertices; 1 sums the pixel steps.

    Returns:
        the tortuosity, at least 1; NaN when the chord is 0 (a closed loop, a single pixel).

    Raises:
        MeasurementError: ``segment`` is not an ``(N, 2)`` array, or ``sample_step`` is not a positive integer.
    """
    points = np.asarray(segment)
    if points.ndim != 2 or points.shape[1] != 2:
        raise MeasurementError(f"segment must be an (N, 2) array of (row, col) points, got shape {points.shape}")
    if int(sample_step) != sample_step or sample_step < 1:
        raise MeasurementError(f"sample_step must be a positive integer, got {sample_step!r}")
    if len(points) < 2:
        return math.nan
    chord = float(np.linalg.norm(points[-1].astype(np.float64) - points[0]))
    if chord == 0.0:
        return math.nan
    return _arc_length(points, int(sample_step)) / chord


def mean_calibre(vessels: np.ndarray, skeleton: np.ndarray) -> float:
    """Mean vessel width in pixels: the vessels' area over the length of their centre lines.

    Area over length measures a straight bar's width at every angle to the pixel grid (within 1% from 2 px wide),
    where twice the distance transform along the skeleton reads up to 30% low for a vessel running obliquely: its
    nearest background pixel centre lies nearer than its edge. The centre line is the skeleton's segments, each
    measured as a polyline as :func:`tortuosity` measures them; a free end is extended by the distance from its
    pixel to the vessel's edge (or to the image's border, where the vessel leaves the picture), since a skeleton
    stops about a radius short of a vessel's tip.

    Args:
        vessels: ``(H, W)`` vessel mask, cut to the region measured (a cut vessel ends at the region's border).
        skeleton: ``(H, W)`` one-pixel-wide skeleton of the vessels, e.g. :func:`vessel_skeleton`'s.

    Returns:
        the mean width, or NaN when the skeleton has no pixel on the vessels.

    Raises:
        MeasurementError: a mask is not 2-D or not binary, or the two differ in shape.
    """
    vessel_mask = _as_mask(vessels, "vessels")
    skeleton_mask = _as_mask(skeleton, "skeleton")
    _same_shape(vessel_mask, "vessels", skeleton_mask, "skeleton")
    return _calibre(vessel_mask, skeleton_mask & vessel_mask, _skeleton_graph(skeleton_mask & vessel_mask)[0])


def _calibre(vessels: np.ndarray, skeleton: np.ndarray, segments: list[np.ndarray]) -> float:
    """:func:`mean_calibre` of checked masks, from the skeleton's segments already found."""
    if not skeleton.any():
        return math.nan
    degree = _CODE_DEGREE[_m_adjacency(skeleton)]
    length = sum(_arc_length(segment, _SAMPLE_STEP) for segment in segments if len(segment) > 1)
    # From an end pixel's centre to the edge is its distance less half a pixel; an isolated pixel has two ends.
    length += float((_distance_to_background(vessels, skeleton & (degree == 1)) - 0.5).sum())
    length += float((2.0 * _distance_to_background(vessels, skeleton & (degree == 0)) - 1.0).sum())
    # A skeleton of junction pixels alone (a blob too thick to thin) has no segment and no end: no length.
    return float(np.count_nonzero(vessels)) / length if length > 0 else math.nan


def _distance_to_background(
    mask: np.ndarray, pixels: np.ndarray, reach: int = 16, pixels_at_once: int = 4096
) -> np.ndarray:
    """Euclidean distance from each of ``pixels`` to the nearest pixel off ``mask``, as scipy's distance transform.

    Beyond the image's border lies background, so a pixel on the border is one pixel from it. Each pixel's
    neighbourhood within ``reach`` pixels is searched first: a vessel's end lies a few pixels from its edge, and the
    distance transform of a whole 8 MP vessel map took 3 s for the few thousand ends the calibre needs.

    Args:
        mask: ``(H, W)`` bool mask.
        pixels: ``(H, W)`` bool mask of the pixels to measure, all on ``mask``.
        reach: half the side of the square searched around each pixel before the whole mask's transform.
        pixels_at_once: pixels whose squares are searched together (memory: 9 kB each at the default reach).

    Returns:
        the distances, in the row-major order of ``pixels``.
    """
    rows, cols = np.nonzero(pixels)
    if rows.size == 0:
        return np.zeros(0)
    padded = np.pad(mask, reach + 1)  # the border's one background pixel, and room for every square
    squares = np.lib.stride_tricks.sliding_window_view(padded, (2 * reach + 1, 2 * reach + 1))
    offsets = np.arange(-reach, reach + 1)
    to_centre = np.hypot(offsets[:, None], offsets[None, :])
    distances = np.empty(rows.size)
    for start in range(0, rows.size, pixels_at_once):  # a noisy mask's isolated pixels can number 10^5
        chosen = slice(start, start + pixels_at_once)
        around = squares[rows[chosen] + 1, cols[chosen] + 1]
        distances[chosen] = np.where(around, np.inf, to_centre).min(axis=(1, 2))
    # Background nearer than the reach lies in the square; only farther (or no) background needs the whole map.
    unresolved = distances > reach
    if unresolved.any():
        whole = ndimage.distance_transform_edt(padded)[reach + 1 : -reach - 1, reach + 1 : -reach - 1]
        distances[unresolved] = whole[rows[unresolved], cols[unresolved]]
    return distances


def vessel_skeleton(vessels: np.ndarray) -> np.ndarray:
    """The vessels' one-pixel-wide skeleton, by Lee's thinning (:func:`skimage.morphology.skeletonize`).

    Zhang's thinning, skimage's default, erodes a two-pixel-thick diagonal line from its ends: it kept half of a
    3 px wide bar at 45 degrees, which halves that vessel's length (and doubles its calibre).

    Args:
        vessels: ``(H, W)`` vessel mask.

    Returns:
        the ``(H, W)`` bool skeleton.
    """
    return skeletonize(_as_mask(vessels, "vessels"), method="lee").astype(bool)


def _small_fragments(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Labels of ``mask``'s 8-connected pieces of fewer than ``min_pixels`` pixels, 0 elsewhere."""
    if min_pixels <= 1 or not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    labels, _ = ndimage.label(mask, _EIGHT_CONNECTED)
    small = np.bincount(labels.ravel()) < min_pixels
    small[0] = False  # the background
    return np.where(small[labels], labels, 0)


def vessel_measurements(
    vessels: np.ndarray,
    fov: np.ndarray | None = None,
    pixel_size_mm: float | None = None,
    min_length_px: float = 10.0,
    min_fragment_px: int = SMALLEST_VESSEL_FRAGMENT,
) -> dict[str, float | str]:
    """The vessel measures AutoMorph reports, of a vessel mask inside the field of view, with our definitions.

    AutoMorph's own formulas differ: it divides by the whole picture's pixels for the density, counts the boxes on
    the vessels' boundary (neither empty nor full, sides of 4 px up) for the fractal dimension, and divides the
    vessels' area by the count of skeleton pixels for the calibre. On DRIVE's first-observer test masks, with the
    field of view as given: density 0.127 here and 0.088 by its formula, fractal dimension 1.481 and 1.503
    (Pearson r 0.90 over the 20), calibre 2.95 and 3.26 px.

    The vessel mask is cut to the FOV (the whole image when ``fov`` is None). The skeleton is that of the whole
    mask (:func:`vessel_skeleton`), kept inside the FOV: skeletonising the cut mask would add spurious branches where
    the FOV border cuts a vessel.

    - ``vessel_density``: vessel pixels over FOV pixels (the vessel area density);
    - ``skeleton_density``: skeleton pixels over FOV pixels, the centre lines' length in pixels per pixel of area
      (1/px: a picture of twice the side halves it), and ``skeleton_density_mm``, the same in mm per mm² (1/mm,
      OCT angiography's vessel length density), with ``pixel_size_mm``;
    - ``fractal_dimension``: :func:`fractal_dimension` of the cut vessel mask;
    - ``tortuosity_mean``: :func:`tortuosity` averaged over the segments, each weighted by its arc length;
      ``tortuosity_median``: their plain median. Segments shorter than ``min_length_px`` are left out: a few
      pixels' chord is too coarse for a ratio;
    - ``calibre_mean_px``: :func:`mean_calibre` of the cut vessels, and ``calibre_mean_mm`` with ``pixel_size_mm``;
    - ``segments``, ``branch_points``, ``end_points``: counts of :func:`vessel_segments`' graph (as floats, so
      that an undefined count can be NaN), leaving out the pieces of the vessel mask (8-connected) under
      ``min_fragment_px`` pixels: a network's specks, each of which would count as a segment (a speck of two pixels
      or more with two end points).
      A piece's size is taken on the whole mask, so a vessel the FOV's border cuts short counts. The other measures
      take every piece: on DRIVE's training photographs, the top-hat baseline's specks brought its area density
      and calibre nearer the manual maps' (see ``SMALLEST_VESSEL_FRAGMENT``);
    - ``small_fragments``: the pieces the counts leave out that lie (partly) inside the FOV.

    An empty vessel mask in the FOV gives densities and counts of 0 and NaN for the rest; an empty FOV gives NaN
    for everything; ``notes`` says so, and notes a vessel density over :data:`IMPLAUSIBLE_VESSEL_DENSITY` (a mask
    that is not a vessel map: all foreground, a disc mask given as vessels).

    Args:
        vessels: ``(H, W)`` vessel mask.
        fov: ``(H, W)`` field-of-view mask, or None for the whole image.
        pixel_size_mm: side of a pixel in millimetres; when given the skeleton density and the calibre are also
            reported in mm.
        min_length_px: shortest arc length, in pixels, of a segment that counts towards the tortuosity.
        min_fragment_px: fewest pixels of a piece of the vessel mask the counts take; 0 counts every piece.

    Returns:
        ``{key: value}`` with the keys above and ``notes``: ``""``, or the reasons joined by ``"; "``. Units are in
        :data:`MEASURE_UNITS`.

    Raises:
        MeasurementError: a mask is not 2-D or not binary, ``fov`` and ``vessels`` differ in shape, or
            ``pixel_size_mm`` is not a positive number, or ``min_fragment_px`` is not a whole number from 0.
    """
    vessel_mask = _as_mask(vessels, "vessels")
    if fov is None:
        region = np.ones(vessel_mask.shape, dtype=bool)
    else:
        region = _as_mask(fov, "fov")
        _same_shape(vessel_mask, "vessels", region, "fov")
    pixel_size = _check_pixel_size(pixel_size_mm)
    if isinstance(min_fragment_px, bool) or not isinstance(min_fragment_px, numbers.Integral) or min_fragment_px < 0:
        raise MeasurementError(f"min_fragment_px must be a whole number of pixels from 0, got {min_fragment_px!r}")

    keys = ["vessel_density", "skeleton_density"] + (["skeleton_density_mm"] if pixel_size is not None else [])
    keys += ["fractal_dimension", "tortuosity_mean", "tortuosity_median"]
    keys += ["calibre_mean_px"] + (["calibre_mean_mm"] if pixel_size is not None else [])
    keys += ["segments", "branch_points", "end_points", "small_fragments"]
    record: dict[str, float | str] = dict.fromkeys(keys, math.nan)
    region_area = int(np.count_nonzero(region))
    if region_area == 0:
        record["notes"] = "FOV mask is empty"
        return record

    cut = vessel_mask & region
    skeleton = vessel_skeleton(vessel_mask) & region
    record["vessel_density"] = float(np.count_nonzero(cut)) / region_area
    record["skeleton_density"] = float(np.count_nonzero(skeleton)) / region_area
    if pixel_size is not None:
        record["skeleton_density_mm"] = record["skeleton_density"] / pixel_size
    speck_labels = _small_fragments(vessel_mask, int(min_fragment_px))
    specks = speck_labels > 0
    record["small_fragments"] = float(len(np.unique(speck_labels[specks & region])))
    notes = []
    if not cut.any():
        notes.append("vessel mask is empty inside the FOV")
        record.update(segments=0.0, branch_points=0.0, end_points=0.0)
        record["notes"] = "; ".join(notes)
        return record

    if record["vessel_density"] > IMPLAUSIBLE_VESSEL_DENSITY:
        notes.append(
            f"vessels cover {record['vessel_density']:.0%} of the FOV, more than a vessel map does (DRIVE's manual "
            "maps: 9-17%): not a vessel segmentation?"
        )
    record["fractal_dimension"] = fractal_dimension(cut)
    segments, branch_points, end_points = _skeleton_graph(skeleton)
    counts = np.array([len(segments), branch_points, end_points], dtype=np.float64)
    if record["small_fragments"]:
        # No pixel of one piece is a neighbour of another's, so each count is a sum over pieces: the specks' own
        # graph is subtracted rather than the rest's built again (its walk, in Python, goes over their pixels only).
        speck_segments, speck_branch_points, speck_end_points = _skeleton_graph(skeleton & specks)
        counts -= [len(speck_segments), speck_branch_points, speck_end_points]
    record.update(segments=counts[0], branch_points=counts[1], end_points=counts[2])
    lengths, values = [], []
    for segment in segments:
        length = _arc_length(segment, _SAMPLE_STEP) if len(segment) > 1 else 0.0
        value = tortuosity(segment)
        if length >= min_length_px and math.isfinite(value):
            lengths.append(length)
            values.append(value)
    if values:
        record["tortuosity_mean"] = float(np.average(values, weights=lengths))
        record["tortuosity_median"] = float(np.median(values))
    else:
        notes.append(f"no open vessel segment is at least {min_length_px:g} px long: tortuosity is undefined")
    calibre = _calibre(cut, skeleton, segments)
    if math.isnan(calibre):
        notes.append("the vessel skeleton lies outside the FOV: calibre is undefined")
    record["calibre_mean_px"] = calibre
    if pixel_size is not None:
        record["calibre_mean_mm"] = calibre * pixel_size
    record["notes"] = "; ".join(notes)
    return record


STRUCTURE_NAMES: dict[str, frozenset[str]] = {
    "vessels": frozenset({"vessels", "vessel"}),
    "disc": frozenset({"disc", "od", "optic disc"}),
    "cup": frozenset({"cup", "oc", "optic cup"}),
}
"""The names, compared lower-case, under which a channel (or a labelme shape) holds each measured structure."""


def structure_of(channel_name: str) -> str | None:
    """The structure a channel holds by its name (``"vessels"``, ``"disc"`` or ``"cup"``), or None: not measured."""
    name = channel_name.strip().lower()
    return next((structure for structure, names in STRUCTURE_NAMES.items() if name in names), None)


def warn_about_unmeasured_channels(channel_names: list[str] | tuple[str, ...]) -> list[str]:
    """Log, once for a run, the channels no measurement is taken of: their names are no structure's, or a cup's
    without a disc channel (the cup is measured in its disc).

    Returns:
        Those channels' names.
    """
    structures = [structure_of(name) for name in channel_names]
    unmeasured = [
        name
        for name, structure in zip(channel_names, structures)
        if structure is None or (structure == "cup" and "disc" not in structures)
    ]
    if unmeasured:
        known = "; ".join(f"{structure}: {', '.join(sorted(names))}" for structure, names in STRUCTURE_NAMES.items())
        logger.warning(
            f"Channel(s) {', '.join(map(repr, unmeasured))} are not measured: measurements know a structure by its "
            f"channel's name, in any case ({known}). Their masks are written as usual."
        )
    return unmeasured


def measure_structures(
    masks: np.ndarray,
    channel_names: list[str] | tuple[str, ...],
    fov: np.ndarray | None = None,
    pixel_size_mm: float | None = None,
    min_fragment_px: int = SMALLEST_VESSEL_FRAGMENT,
) -> dict[str, float | str]:
    """The measurements of a segmentation's structures, chosen by its channels' names.

    A channel holding the vessels (:func:`structure_of`: ``vessels``, ``Vessel``...) gets
    :func:`vessel_measurements` inside ``fov``; the disc and cup channels get :func:`disc_cup_measurements`; a disc
    without a cup channel (a disc-only model) gets its disc measures, and NaN for the cup, the rim and the ratios,
    which it did not segment (not the 0 of a disc without a visible cup). Other channels are not measured
    (:func:`warn_about_unmeasured_channels` says so once for a run).

    Args:
        masks: ``(C, H, W)`` bool masks, one per channel.
        channel_names: one name per channel.
        fov: ``(H, W)`` field of view (vessels only; the whole picture when None).
        pixel_size_mm: the side of a pixel in millimetres, for the ``*_mm`` and ``*_mm2`` measures.
        min_fragment_px: pieces of the vessel mask under this many pixels are left out of its counts
            (:func:`vessel_measurements`).

    Returns:
        The measures of every measured structure, and ``notes`` joining their notes.

    Raises:
        MeasurementError: masks and names disagree in number, or arrays are not masks.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3 or len(masks) != len(channel_names):
        raise MeasurementError(
            f"masks must be (C, H, W) with one channel per name {list(channel_names)}; got shape {masks.shape}."
        )
    by_structure: dict[str | None, np.ndarray] = {}
    for name, mask in zip(channel_names, masks):
        by_structure.setdefault(structure_of(name), mask)
    record: dict[str, float | str] = {}
    notes = []
    if "vessels" in by_structure:
        measured = vessel_measurements(by_structure["vessels"], fov, pixel_size_mm, min_fragment_px=min_fragment_px)
        notes.append(measured.pop("notes"))
        record.update(measured)
    if "disc" in by_structure:
        measured = disc_cup_measurements(by_structure["disc"], by_structure.get("cup"), pixel_size_mm)
        notes.append(measured.pop("notes"))
        record.update(measured)
    record["notes"] = "; ".join(note for note in notes if note)
    return record

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.draw import circle_perimeter, disk, ellipse, line
from skimage.measure import regionprops
from skimage.morphology import skeletonize

from scripts.measurements import (
    MEASURE_UNITS,
    MeasurementError,
    disc_cup_measurements,
    fractal_dimension,
    mean_calibre,
    measure_structures,
    tortuosity,
    vessel_measurements,
    vessel_segments,
    warn_about_unmeasured_channels,
)

SIERPINSKI = math.log(8) / math.log(3)


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[disk(centre, radius, shape=shape)] = True
    return mask


def _polyline(shape: tuple[int, int], *points: tuple[int, int]) -> np.ndarray:
    """One-pixel-wide lines from ``points[0]`` to each of the other points."""
    mask = np.zeros(shape, dtype=bool)
    for end in points[1:]:
        mask[line(*points[0], *end)] = True
    return mask


def _semicircle(radius: int) -> np.ndarray:
    """The upper half of a Bresenham circle: an 8-connected arc of ``radius`` pixels around (radius + 2, radius + 2)."""
    size = 2 * radius + 5
    rows, cols = circle_perimeter(radius + 2, radius + 2, radius, shape=(size, size))
    mask = np.zeros((size, size), dtype=bool)
    upper = rows <= radius + 2
    mask[rows[upper], cols[upper]] = True
    return mask


def _carpet(level: int) -> np.ndarray:
    """Sierpinski carpet of side ``3**level``: each step keeps 8 of the 9 sub-squares."""
    carpet = np.ones((1, 1), dtype=bool)
    for _ in range(level):
        hole = np.zeros_like(carpet)
        carpet = np.block([[carpet, carpet, carpet], [carpet, hole, carpet], [carpet, carpet, carpet]])
    return carpet


def _only_segment(mask: np.ndarray) -> np.ndarray:
    segments = vessel_segments(mask)
    assert len(segments) == 1
    return segments[0]


def _extent(mask: np.ndarray, axis: int) -> int:
    """Rows (0) or columns (1) spanned, computed from the pixel coordinates rather than as the module does."""
    coordinates = np.nonzero(mask)[axis]
    return int(coordinates.max() - coordinates.min() + 1)


# --- tortuosity ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("end", [(5, 150), (150, 5), (150, 150)], ids=["horizontal", "vertical", "diagonal"])
def test_straight_axis_aligned_and_diagonal_lines_have_tortuosity_exactly_1(end: tuple[int, int]) -> None:
    segment = _only_segment(_polyline((160, 160), (5, 5), end))
    assert len(segment) == 146
    assert tortuosity(segment) == pytest.approx(1.0, abs=1e-9)
    # Reversing the walk changes nothing.
    assert tortuosity(segment[::-1]) == pytest.approx(1.0, abs=1e-9)


def test_line_at_22_5_degrees_is_straight_unlike_its_pixel_step_length() -> None:
    # 22.5 degrees is where a sum of 1 and sqrt 2 steps is longest: (cos + (sqrt 2 - 1) sin) = 1.082 times the line.
    end = (10 + round(200 * math.sin(math.pi / 8)), 10 + round(200 * math.cos(math.pi / 8)))
    segment = _only_segment(_polyline((100, 230), (10, 10), end))
    assert tortuosity(segment) == pytest.approx(1.0, abs=0.01)  # measured 1.0010
    assert tortuosity(segment, sample_step=1) > 1.07  # measured 1.082


def test_semicircle_has_tortuosity_pi_over_2() -> None:
    # Measured 1.5740 (+0.2%). The polyline's vertices are pixel centres, each up to half a pixel off the true
    # circle; over 5-pixel pieces that changes the length by well under 1%, while the sum of 1 and sqrt 2 steps this
    # guards against is 5% long (1.654 measured with sample_step=1).
    segment = _only_segment(_semicircle(100))
    assert np.array_equal(segment[0] - segment[-1], [0, 200]) or np.array_equal(segment[-1] - segment[0], [0, 200])
    assert tortuosity(segment) == pytest.approx(math.pi / 2, rel=0.01)
    assert tortuosity(segment, sample_step=1) > math.pi / 2 * 1.04


def test_tortuosity_is_nan_without_a_chord_and_rejects_a_bad_segment() -> None:
    assert math.isnan(tortuosity(np.array([[3, 4]])))
    assert math.isnan(tortuosity(np.array([[3, 4], [3, 5], [4, 5], [4, 4], [3, 4]])))  # a closed loop
    with pytest.raises(MeasurementError, match=r"segment .*\(3,\)"):
        tortuosity(np.array([1, 2, 3]))


# --- fractal dimension --------------------------------------------------------------------------------------------


def test_fractal_dimension_of_a_filled_square_is_2() -> None:
    assert fractal_dimension(np.ones((256, 256), dtype=bool)) == pytest.approx(2.0, abs=1e-9)
    # A side that is no power of two is padded so that boxes tile it: ceil(300 / s)**2 boxes, whose slope is 1.957.
    sizes = np.array([2, 4, 8, 16, 32, 64])
    expected = np.polyfit(np.log(1 / sizes), np.log(np.ceil(300 / sizes) ** 2), 1)[0]
    assert fractal_dimension(np.ones((300, 300), dtype=np.uint8)) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize("diagonal", [False, True], ids=["horizontal", "diagonal"])
def test_fractal_dimension_of_a_line_is_1(diagonal: bool) -> None:
    mask = np.eye(256, dtype=bool) if diagonal else np.zeros((256, 256), dtype=bool)
    mask[100, :] |= not diagonal
    assert fractal_dimension(mask) == pytest.approx(1.0, abs=1e-9)


def test_fractal_dimension_of_the_sierpinski_carpet() -> None:
    carpet = _carpet(6)  # 729 x 729
    # With boxes of its own scale factor the carpet's counts are exactly 8**k: the slope is log 8 / log 3.
    assert fractal_dimension(carpet, box_sizes=[3, 9, 27, 81]) == pytest.approx(SIERPINSKI, abs=1e-9)
    # With the default powers of two the boxes straddle the holes: measured 1.869.
    assert fractal_dimension(carpet) == pytest.approx(SIERPINSKI, abs=0.05)


def test_fractal_dimension_hardly_depends_on_where_the_box_grid_falls(drive_dir: Path) -> None:
    """The same square at four places, and a DRIVE vessel map shifted by 0 to 6 px: with a single grid the square
    measured 1.831 to 1.870 and the vessel map varied by 0.012."""
    squares = []
    for offset in (0, 20, 28, 56):
        mask = np.zeros((256, 256), dtype=bool)
        mask[offset : offset + 200, offset : offset + 200] = True
        squares.append(fractal_dimension(mask))
    assert max(squares) - min(squares) < 1e-9
    vessels = np.asarray(Image.open(drive_dir / "test" / "1st_manual" / "01_manual1.gif")) > 0
    shifted = [fractal_dimension(np.pad(vessels, ((row, 6 - row), (col, 6 - col)))) for row in (0, 2, 4, 6) for col in (0, 2, 4, 6)]
    assert max(shifted) - min(shifted) < 0.006, shifted


def _fewest_boxes_by_hand(mask: np.ndarray, size: int) -> int:
    """Boxes of ``size`` holding foreground, the fewest of the grids shifted by 0 or half a box, box by box."""
    counts = []
    for row_shift in sorted({0, size // 2}):
        for col_shift in sorted({0, size // 2}):
            occupied = set()
            for row, col in zip(*np.nonzero(mask)):
                occupied.add(((row + row_shift) // size, (col + col_shift) // size))
            counts.append(len(occupied))
    return min(counts)


@pytest.mark.parametrize("box_sizes", [[1, 2, 4, 8, 16], [2, 4, 8], [2, 3, 5, 8]], ids=["from_1", "powers_of_2", "mixed"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (17, 16), (37, 53), (64, 129)])
def test_fractal_dimension_counts_boxes_as_counted_one_by_one(shape: tuple[int, int], box_sizes: list[int]) -> None:
    """Powers of two are counted from a pyramid of boxes, other sides box by box: both as counted by hand."""
    rng = np.random.default_rng(sum(shape))
    for density in (0.002, 0.05, 0.5):
        mask = rng.random(shape) < density
        mask.flat[rng.integers(mask.size)] = True
        counts = [_fewest_boxes_by_hand(mask, size) for size in box_sizes]
        expected = np.polyfit(-np.log(box_sizes), np.log(counts), 1)[0]
        assert fractal_dimension(mask, box_sizes=box_sizes) == pytest.approx(expected, abs=1e-12), (density, counts)


def test_fractal_dimension_of_an_empty_mask_is_nan() -> None:
    assert math.isnan(fractal_dimension(np.zeros((64, 64), dtype=bool)))
    with pytest.raises(MeasurementError, match="box_sizes"):
        fractal_dimension(np.ones((64, 64), dtype=bool), box_sizes=[4])


# --- skeleton graph -----------------------------------------------------------------------------------------------


def _graph(skeleton: np.ndarray) -> tuple[float, float, float]:
    record = vessel_measurements(skeleton)
    return record["segments"], record["branch_points"], record["end_points"]


def _covers(segments: list[np.ndarray], skeleton: np.ndarray) -> bool:
    """Every skeleton pixel is in some segment, no segment pixel is off the skeleton, steps are 8-adjacent."""
    covered = np.zeros_like(skeleton)
    for segment in segments:
        covered[segment[:, 0], segment[:, 1]] = True
        if len(segment) > 1 and np.abs(np.diff(segment, axis=0)).max() > 1:
            return False
    return bool(np.array_equal(covered, skeleton))


@pytest.mark.parametrize(
    "arms",
    [((20, 50), (80, 20), (80, 80)), ((20, 50), (80, 10), (70, 95)), ((50, 10), (50, 90), (90, 50))],
    ids=["symmetric-Y", "skewed-Y", "T"],
)
def test_a_y_shaped_skeleton_has_one_branch_point_three_end_points_three_segments(
    arms: tuple[tuple[int, int], ...],
) -> None:
    skeleton = _polyline((100, 100), (50, 50), *arms)
    segments = vessel_segments(skeleton)
    assert len(segments) == 3
    assert _covers(segments, skeleton)
    # All three start or end at the junction pixel (50, 50), and every arm ends at its drawn end.
    assert all((50, 50) in {tuple(segment[0]), tuple(segment[-1])} for segment in segments)
    assert {tuple(segment[0]) for segment in segments} | {tuple(segment[-1]) for segment in segments} == {
        (50, 50),
        *arms,
    }
    assert _graph(skeleton) == (3, 1, 3)


def test_skeleton_of_a_thick_y_has_one_branch_point() -> None:
    vessels = ndimage.binary_dilation(_polyline((200, 200), (100, 100), (20, 100), (180, 30), (180, 170)), iterations=4)
    assert _graph(vessels) == (3, 1, 3)  # vessel_measurements skeletonises the mask itself


def test_a_staircase_is_one_segment_without_junctions() -> None:
    # A 4-connected staircase: with plain 8-adjacency each pixel would have 3 neighbours and count as a junction.
    skeleton = np.zeros((50, 50), dtype=bool)
    for step in range(40):
        skeleton[step, step : step + 2] = True
    segments = vessel_segments(skeleton)
    assert len(segments) == 1 and len(segments[0]) == 80
    assert _covers(segments, skeleton)


@pytest.mark.parametrize("ring", ["bresenham", "skeletonised"])
def test_a_closed_ring_is_one_segment_without_branch_or_end_points(ring: str) -> None:
    if ring == "bresenham":
        skeleton = np.zeros((100, 100), dtype=bool)
        skeleton[circle_perimeter(50, 50, 30)] = True
    else:
        skeleton = skeletonize(_disc((100, 100), (50, 50), 35) & ~_disc((100, 100), (50, 50), 25))
    segments = vessel_segments(skeleton)
    assert len(segments) == 1
    assert np.array_equal(segments[0][0], segments[0][-1])  # the loop closes on its start
    assert len(segments[0]) == np.count_nonzero(skeleton) + 1
    assert _covers(segments, skeleton)
    assert _graph(skeleton) == (1, 0, 0)


def test_a_crossing_is_one_branch_point_with_four_segments() -> None:
    skeleton = _polyline((100, 100), (50, 50), (50, 10), (50, 90), (10, 50), (90, 50))
    assert len(vessel_segments(skeleton)) == 4
    assert _graph(skeleton) == (4, 1, 4)


# --- calibre ------------------------------------------------------------------------------------------------------


def _bar(width: float, degrees: float, size: int = 512, length: int = 400) -> np.ndarray:
    """A straight bar ``width`` px wide and ``length`` long through the middle of the image at ``degrees``,
    rasterised by pixel centres (placed off the grid's symmetry, as a real vessel is)."""
    rows, cols = np.mgrid[:size, :size].astype(np.float64)
    rows -= size / 2 + 0.3
    cols -= size / 2 + 0.1
    angle = math.radians(degrees)
    along = rows * math.sin(angle) + cols * math.cos(angle)
    across = cols * math.sin(angle) - rows * math.cos(angle)
    return (np.abs(across) <= width / 2) & (np.abs(along) <= length / 2)


@pytest.mark.parametrize("width", [2, 3, 5, 9])
def test_a_bar_measures_its_width_at_every_angle(width: int) -> None:
    """The digital bar's own mean width (its pixels over its length) at 0 to 45 degrees; twice the distance
    transform along the skeleton read 3 px bars as 2.1-3.0 and 9 px bars as 7.8-9.0 depending on the angle."""
    for degrees in (0, 10, 22.5, 35, 45):
        vessels = _bar(width, degrees)
        record = vessel_measurements(vessels, pixel_size_mm=0.02)
        assert record["calibre_mean_px"] == pytest.approx(np.count_nonzero(vessels) / 400, rel=0.01), degrees
        assert record["calibre_mean_mm"] == pytest.approx(record["calibre_mean_px"] * 0.02, rel=1e-12)
        assert record["tortuosity_mean"] == pytest.approx(1.0, abs=0.01)
        assert (record["segments"], record["branch_points"], record["end_points"]) == (1, 0, 2)


@pytest.mark.parametrize("width", [5, 6])
def test_a_bar_across_the_image_has_its_width_up_to_the_border(width: int) -> None:
    vessels = np.zeros((40, 120), dtype=bool)
    vessels[18 : 18 + width, :] = True  # leaves the picture on both sides: no tip to add
    centre_line = np.zeros_like(vessels)
    centre_line[20, :] = True
    assert mean_calibre(vessels, centre_line) == pytest.approx(width, abs=1e-12)
    assert mean_calibre(vessels.T, centre_line.T) == pytest.approx(width, abs=1e-12)


def test_calibre_ends_lie_as_far_from_the_edge_as_scipy_measures() -> None:
    """A skeleton of isolated pixels has only ends: the length is the sum of twice their distances to the
    background less one, here at the centres of discs of radius 2 to 40 (farther than the 16 px first searched)
    and on the image's border (one pixel from the background beyond it)."""
    vessels = np.zeros((200, 260), dtype=bool)
    centres = [(100, 60), (30, 150), (160, 200), (20, 20), (0, 240)]
    for centre, radius in zip(centres, (40.0, 12.0, 5.5, 2.0, 6.0)):
        vessels |= _disc(vessels.shape, centre, radius)
    skeleton = np.zeros_like(vessels)
    skeleton[tuple(np.transpose(centres))] = True
    distance = ndimage.distance_transform_edt(np.pad(vessels, 1))[1:-1, 1:-1]
    expected = np.count_nonzero(vessels) / (2 * distance[skeleton] - 1).sum()
    assert mean_calibre(vessels, skeleton) == pytest.approx(expected, rel=1e-12)


def test_calibre_without_skeleton_on_the_vessels_is_nan() -> None:
    vessels = np.zeros((20, 20), dtype=bool)
    assert math.isnan(mean_calibre(vessels, vessels))
    vessels[5:12, 5:12] = True  # given as its own skeleton: every pixel a junction, no segment, no length
    assert math.isnan(mean_calibre(vessels, vessels))


# --- vessel measurements ------------------------------------------------------------------------------------------


def test_vessel_density_is_the_area_ratio_inside_the_fov() -> None:
    fov = np.zeros((128, 128), dtype=bool)
    fov[10:110, 20:120] = True  # 100 x 100
    vessels = np.zeros_like(fov)
    vessels[30:50, 40:90] = True  # 20 x 50, inside the FOV
    vessels[0:10, :] = True  # outside the FOV: not counted
    record = vessel_measurements(vessels, fov)
    assert record["vessel_density"] == pytest.approx(1000 / 10000, abs=1e-12)
    inside_skeleton = skeletonize(vessels, method="lee") & fov
    assert record["skeleton_density"] == pytest.approx(np.count_nonzero(inside_skeleton) / 10000, abs=1e-12)
    assert record["notes"] == ""
    assert "calibre_mean_mm" not in record and "skeleton_density_mm" not in record


def test_skeleton_density_in_mm_does_not_depend_on_the_picture_s_size() -> None:
    """Centre-line pixels per FOV pixel is a length per area (1/px), not a ratio: the same vessels at twice the
    side read half of it. Per mm (the pixel's side given) it is the same at every size."""
    vessels = np.zeros((60, 60), dtype=bool)
    vessels[10:13, 5:55] = True  # 50 px long, 3 wide
    vessels[15:45, 30:32] = True  # 30 px long, 2 wide
    records = [
        vessel_measurements(np.kron(vessels, np.ones((scale, scale), dtype=bool)), None, pixel_size_mm=0.02 / scale)
        for scale in (1, 2, 4)
    ]
    densities = [record["skeleton_density"] for record in records]
    assert densities[1] == pytest.approx(densities[0] / 2, rel=0.1)
    assert densities[2] == pytest.approx(densities[0] / 4, rel=0.1)
    lengths_mm = 80 * 0.02  # the two centre lines
    for record in records:
        assert record["skeleton_density_mm"] == pytest.approx(lengths_mm / (60 * 0.02) ** 2, rel=0.1)
    assert MEASURE_UNITS["skeleton_density"] == "1/px" and MEASURE_UNITS["skeleton_density_mm"] == "1/mm"


def test_vessel_measurements_of_a_semicircle() -> None:
    vessels = _semicircle(100)
    record = vessel_measurements(vessels)
    assert record["tortuosity_mean"] == pytest.approx(math.pi / 2, rel=0.01)
    assert record["tortuosity_median"] == pytest.approx(record["tortuosity_mean"], abs=1e-12)  # a single segment
    assert record["vessel_density"] == pytest.approx(np.count_nonzero(vessels) / vessels.size, abs=1e-12)


def test_short_segments_do_not_count_towards_tortuosity() -> None:
    vessels = _polyline((60, 60), (30, 5), (30, 55))
    vessels[5, 5:10] = True  # a straight 5 px piece
    vessels[10, 20:25] = True
    vessels[11:14, 24] = True  # and an L-shaped 8 px piece that would raise the mean
    # The short pieces are under the default smallest fragment, which the counts leave out: count every piece.
    record = vessel_measurements(vessels, min_length_px=10, min_fragment_px=0)
    assert record["segments"] == 3
    assert record["tortuosity_mean"] == pytest.approx(1.0, abs=1e-9)
    assert vessel_measurements(vessels, min_length_px=1, min_fragment_px=0)["tortuosity_mean"] > 1.0
    assert math.isnan(vessel_measurements(vessels, min_length_px=100, min_fragment_px=0)["tortuosity_mean"])


def _thick_y_with_specks(speck_sides: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A 9 px wide Y and, apart from it, square specks of the given sides; returns (with specks, the Y alone)."""
    tree = ndimage.binary_dilation(_polyline((200, 200), (100, 100), (20, 100), (180, 30), (180, 170)), iterations=4)
    vessels = tree.copy()
    for index, side in enumerate(speck_sides):
        row, col = 10 + 12 * (index // 3), 10 + 12 * (index % 3)
        vessels[row : row + side, col : col + side] = True
    assert ndimage.label(vessels, np.ones((3, 3)))[1] == 1 + len(speck_sides)  # no speck touches the Y
    return vessels, tree


def test_specks_under_the_smallest_fragment_are_left_out_of_the_counts_and_counted() -> None:
    sides = [1, 2, 3, 3, 1, 2]  # 1 to 9 px, all under the default 10 px
    vessels, tree = _thick_y_with_specks(sides)
    fov = np.ones(vessels.shape, dtype=bool)
    record = vessel_measurements(vessels, fov)
    every_piece = vessel_measurements(vessels, fov, min_fragment_px=0)
    counts = ("segments", "branch_points", "end_points")
    assert record["small_fragments"] == len(sides) and every_piece["small_fragments"] == 0
    assert tuple(record[key] for key in counts) == tuple(vessel_measurements(tree, fov)[key] for key in counts) == (3, 1, 3)
    # Counted, each speck is a segment: a dot without an end point (an isolated pixel), the others with two.
    assert every_piece["segments"] == 3 + len(sides) and every_piece["branch_points"] == 1
    assert every_piece["end_points"] == 3 + 2 * sum(side > 1 for side in sides)
    # The other measures take every piece.
    assert {key: value for key, value in record.items() if key not in (*counts, "small_fragments")} == {
        key: value for key, value in every_piece.items() if key not in (*counts, "small_fragments")
    }
    assert record["vessel_density"] == pytest.approx(np.count_nonzero(vessels) / vessels.size, abs=1e-12)


def test_a_fragment_of_exactly_the_smallest_size_is_measured_and_one_pixel_less_is_not() -> None:
    vessels, _ = _thick_y_with_specks([3])  # a 9 px speck
    assert vessel_measurements(vessels, min_fragment_px=9)["small_fragments"] == 0
    assert vessel_measurements(vessels, min_fragment_px=10)["small_fragments"] == 1
    assert vessel_measurements(vessels, min_fragment_px=9)["segments"] == 4


def test_a_piece_is_sized_on_the_whole_mask_so_a_vessel_the_fov_cuts_short_counts() -> None:
    vessel = _polyline((40, 40), (20, 5), (20, 34))  # 30 px, of which the FOV holds the last 5
    fov = np.zeros(vessel.shape, dtype=bool)
    fov[:, 30:] = True
    record = vessel_measurements(vessel, fov)
    assert (record["small_fragments"], record["segments"], record["end_points"]) == (0, 1, 2)
    speck = vessel & fov  # the same 5 px, a piece of its own
    record = vessel_measurements(speck, fov)
    assert (record["small_fragments"], record["segments"], record["end_points"]) == (1, 0, 0)


def test_a_mask_of_specks_alone_counts_no_segment() -> None:
    vessels, tree = _thick_y_with_specks([2, 3])
    record = vessel_measurements(vessels & ~tree)
    assert record["small_fragments"] == 2
    assert (record["segments"], record["branch_points"], record["end_points"]) == (0, 0, 0)
    assert record["vessel_density"] == pytest.approx(13 / vessels.size, abs=1e-12)


@pytest.mark.parametrize("bad", [-1, 2.5, "10", True, None])
def test_a_bad_smallest_fragment_is_named(bad: object) -> None:
    with pytest.raises(MeasurementError, match="min_fragment_px must be a whole number of pixels from 0"):
        vessel_measurements(np.zeros((32, 32), dtype=bool), min_fragment_px=bad)


def test_empty_vessels_give_zero_densities_and_nan_shape_measures() -> None:
    fov = _disc((64, 64), (32, 32), 30)
    vessels = np.zeros((64, 64), dtype=bool)
    vessels[0:3, 0:3] = True  # only outside the FOV
    for mask in (np.zeros((64, 64), dtype=bool), vessels):
        record = vessel_measurements(mask, fov, pixel_size_mm=0.01)
        assert record["vessel_density"] == 0.0 and record["skeleton_density"] == 0.0
        assert (record["segments"], record["branch_points"], record["end_points"]) == (0, 0, 0)
        for key in ("fractal_dimension", "tortuosity_mean", "tortuosity_median", "calibre_mean_px", "calibre_mean_mm"):
            assert math.isnan(record[key]), key
        assert "vessel mask is empty" in record["notes"]


def test_a_mask_denser_than_any_vessel_map_is_noted() -> None:
    fov = _disc((64, 64), (32, 32), 30)
    full = vessel_measurements(np.ones((64, 64), dtype=bool), fov)
    assert full["vessel_density"] == 1.0
    assert full["notes"].startswith("vessels cover 100% of the FOV, more than a vessel map does")
    vessels = np.zeros((64, 64), dtype=bool)
    vessels[::4] = True  # a quarter of the FOV
    assert "more than a vessel map does" not in vessel_measurements(vessels, fov)["notes"]


def test_an_empty_fov_gives_nan_everywhere() -> None:
    vessels = np.zeros((32, 32), dtype=bool)
    vessels[10, :] = True
    record = vessel_measurements(vessels, np.zeros((32, 32), dtype=bool))
    assert all(math.isnan(value) for key, value in record.items() if key != "notes")
    assert "FOV" in record["notes"]


# --- disc and cup -------------------------------------------------------------------------------------------------

SHAPE = (200, 220)
CENTRE = (100, 110)
DISC_RADIUS = 60


def test_centred_cup_of_half_the_radius_has_cdr_one_half() -> None:
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = _disc(SHAPE, CENTRE, DISC_RADIUS / 2)
    record = disc_cup_measurements(disc, cup, pixel_size_mm=0.01)
    # A digital disc of radius r spans 2r +- 1 pixels: one pixel of the 120-pixel disc diameter is 0.0083.
    assert record["vertical_cdr"] == pytest.approx(0.5, abs=0.01)
    assert record["horizontal_cdr"] == pytest.approx(0.5, abs=0.01)
    assert record["vertical_cdr"] == _extent(cup, 0) / _extent(disc, 0)
    # Digitising pi r^2 errs by about the perimeter's pixels: under 1% of the disc here, so 0.25 +- 0.01.
    assert record["area_cdr"] == pytest.approx(0.25, abs=0.01)
    (disc_props,), (cup_props,) = regionprops(disc.astype(np.uint8)), regionprops(cup.astype(np.uint8))
    assert record["disc_area_px"] == disc_props.area
    assert record["cup_area_px"] == cup_props.area
    assert record["disc_area_px"] == pytest.approx(math.pi * DISC_RADIUS**2, rel=0.01)
    assert record["rim_area_px"] == disc_props.area - cup_props.area
    for key in ("disc", "cup", "rim"):
        assert record[f"{key}_area_mm2"] == pytest.approx(record[f"{key}_area_px"] * 0.01**2, rel=1e-12)
    assert record["cup_offset_x"] == pytest.approx(0.0, abs=1e-12)
    assert record["cup_offset_y"] == pytest.approx(0.0, abs=1e-12)
    assert record["notes"] == ""


def test_vertical_and_horizontal_ratios_use_columns_and_rows() -> None:
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = np.zeros(SHAPE, dtype=bool)
    cup[ellipse(*CENTRE, 40, 20, shape=SHAPE)] = True  # tall and narrow
    record = disc_cup_measurements(disc, cup)
    assert record["vertical_cdr"] == _extent(cup, 0) / _extent(disc, 0)
    assert record["horizontal_cdr"] == _extent(cup, 1) / _extent(disc, 1)
    assert record["vertical_cdr"] > 1.8 * record["horizontal_cdr"]


def _refuge_diameter(mask: np.ndarray, axis: int) -> float:
    """As REFUGE's evaluation code measures a vertical diameter (axis 0): the largest column sum."""
    return float(np.max(np.sum(mask, axis=axis)))


def test_a_tilted_cup_has_refuges_vertical_diameter_not_its_bounding_box() -> None:
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = np.zeros(SHAPE, dtype=bool)
    cup[ellipse(*CENTRE, 40, 20, shape=SHAPE, rotation=math.radians(30))] = True
    record = disc_cup_measurements(disc, cup)
    assert record["vertical_cdr"] == _refuge_diameter(cup, 0) / _refuge_diameter(disc, 0)
    assert record["horizontal_cdr"] == _refuge_diameter(cup, 1) / _refuge_diameter(disc, 1)
    assert record["vertical_cdr"] < _extent(cup, 0) / _extent(disc, 0) - 0.02, "no column crosses the whole tilt"


def test_a_disc_and_cup_split_by_a_vessel_are_measured_whole() -> None:
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = _disc(SHAPE, CENTRE, DISC_RADIUS / 2)
    intact = disc_cup_measurements(disc, cup)
    for width in (3, 12):  # a vessel at the disc is up to about a tenth of its diameter (121 px) wide
        split_disc, split_cup = disc.copy(), cup.copy()
        split_disc[92 : 92 + width, :] = split_cup[92 : 92 + width, :] = False  # across both, above the cup's centre
        split = disc_cup_measurements(split_disc, split_cup)
        assert split["cup_area_px"] == np.count_nonzero(split_cup), width
        assert split["disc_area_px"] == np.count_nonzero(split_disc), width
        # The vessel crosses the structures without shortening them: REFUGE's count of pixels per column would
        # lose its width in both (0.49 at 3 px, 0.45 at 12), the largest piece alone gave 0.35 and 0.23.
        assert split["vertical_cdr"] == intact["vertical_cdr"] == _extent(cup, 0) / _extent(disc, 0), width
        assert split["horizontal_cdr"] == intact["horizontal_cdr"], width
        assert split["notes"] == (
            "disc: 2 pieces measured as one (split by a vessel?); cup: 2 pieces measured as one (split by a vessel?)"
        ), width
    # A vessel across the cup alone (the disc mask whole): the cup's column count fell 0.50 -> 0.45 at 12 px.
    split_cup = cup.copy()
    split_cup[92:104, :] = False
    assert disc_cup_measurements(disc, split_cup)["vertical_cdr"] == intact["vertical_cdr"]


def test_a_speck_beyond_a_vessels_width_from_the_disc_is_left_out() -> None:
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = _disc(SHAPE, CENTRE, DISC_RADIUS / 2)
    clean = disc_cup_measurements(disc, cup)
    top = CENTRE[0] - DISC_RADIUS
    for gap, joined in ((10, True), (16, False)):  # 0.08 and 0.13 disc diameters above the disc
        specked = disc.copy()
        specked[top - gap - 15 : top - gap, CENTRE[1] - 5 : CENTRE[1] + 5] = True  # 150 px, 1.3% of the disc
        record = disc_cup_measurements(specked, cup)
        if joined:  # as close as a vessel is wide: taken for a piece the vessel split off, and said
            assert record["vertical_cdr"] == _extent(cup, 0) / _extent(specked, 0) < clean["vertical_cdr"] - 0.05
            assert record["notes"] == "disc: 2 pieces measured as one (split by a vessel?)"
        else:
            assert record["vertical_cdr"] == clean["vertical_cdr"]
            assert record["notes"] == "disc: 150 px (1.3%) of pieces away from the disc left out"


def test_a_speck_of_a_few_pixels_beside_the_disc_or_cup_is_not_joined_to_it() -> None:
    """Joined, a 2 x 2 speck within a vessel's width stretched a diameter by the whole gap (vertical CDR 0.05-0.09)."""
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = _disc(SHAPE, CENTRE, DISC_RADIUS / 2)
    clean = disc_cup_measurements(disc, cup)
    top, cup_bottom = CENTRE[0] - DISC_RADIUS, CENTRE[0] + DISC_RADIUS // 2
    specked_disc, specked_cup = disc.copy(), cup.copy()
    specked_disc[top - 8 : top - 6, CENTRE[1] : CENTRE[1] + 2] = True  # 6 px above the disc: within its reach
    specked_cup[cup_bottom + 6 : cup_bottom + 8, CENTRE[1] : CENTRE[1] + 2] = True  # below the cup, in the disc
    for specked in (disc_cup_measurements(specked_disc, cup), disc_cup_measurements(disc, specked_cup)):
        assert specked["vertical_cdr"] == clean["vertical_cdr"] == _extent(cup, 0) / _extent(disc, 0)
        assert specked["notes"] == "", "4 px are under 1% of the mask: left out without a note"
    assert disc_cup_measurements(specked_disc, cup)["disc_area_px"] == np.count_nonzero(disc)


def test_holes_in_the_disc_or_cup_are_filled_and_noted() -> None:
    """A disc mask missing the pale cup took the cup's pixels off its area and set the cup outside the disc."""
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = _disc(SHAPE, CENTRE, DISC_RADIUS / 2)
    clean = disc_cup_measurements(disc, cup)
    hole = _disc(SHAPE, CENTRE, 20)
    holed = disc_cup_measurements(disc & ~hole, cup & ~hole)
    assert holed == {**clean, "notes": holed["notes"]}
    assert clean["area_cdr"] == np.count_nonzero(cup) / np.count_nonzero(disc)
    share = 100 * np.count_nonzero(hole) / np.count_nonzero(disc)
    cup_share = 100 * np.count_nonzero(hole) / np.count_nonzero(cup)
    assert holed["notes"] == (
        f"disc: holes of {np.count_nonzero(hole)} px ({share:.1f}%) filled; "
        f"cup: holes of {np.count_nonzero(hole)} px ({cup_share:.1f}%) filled"
    )
    pinhole = disc.copy()
    pinhole[CENTRE] = False
    assert disc_cup_measurements(pinhole, cup) == clean, "a pixel's hole, under 1%, is filled without a note"


def test_a_piece_of_disc_inside_its_hole_is_measured_not_noted_as_left_out() -> None:
    """A disc mask that missed the pale cup but kept a speck in its middle: the speck, too far from the ring to join
    it, lies in the hole that is filled, so it is measured with the disc; the notes said it was left out, and counted
    its pixels among the holes."""
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = _disc(SHAPE, CENTRE, DISC_RADIUS / 2)
    hole = _disc(SHAPE, CENTRE, 35)
    speck = _disc(SHAPE, CENTRE, 10)  # 4% of the mask, 25 px from the ring: beyond 0.12 disc diameters
    record = disc_cup_measurements((disc & ~hole) | speck, cup)
    clean = disc_cup_measurements(disc, cup)
    assert record == {**clean, "notes": record["notes"]}
    filled = np.count_nonzero(hole & ~speck)
    assert record["notes"] == f"disc: holes of {filled} px ({100 * filled / np.count_nonzero(disc):.1f}%) filled"


def test_a_larger_false_cup_outside_the_disc_does_not_replace_the_cup_in_it() -> None:
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = _disc(SHAPE, CENTRE, 25)
    false_cup = _disc(SHAPE, (30, 30), 28)  # outside the disc, larger than the cup
    clean = disc_cup_measurements(disc, cup)
    record = disc_cup_measurements(disc, cup | false_cup)
    assert record["vertical_cdr"] == clean["vertical_cdr"] == _extent(cup, 0) / _extent(disc, 0)
    assert record["cup_area_px"] == np.count_nonzero(cup)
    share = 100 * np.count_nonzero(false_cup) / np.count_nonzero(cup | false_cup)
    left_out = np.count_nonzero(false_cup)
    assert record["notes"] == f"cup: {left_out} px ({share:.1f}%) of pieces away from the cup left out"


def test_a_disc_too_small_to_measure_is_noted() -> None:
    for radius, noted in ((4, True), (12, False)):
        disc = _disc(SHAPE, CENTRE, radius)
        record = disc_cup_measurements(disc, _disc(SHAPE, CENTRE, radius / 2))
        assert ("one pixel changes its ratios by more than 0.05" in record["notes"]) == noted, radius
        assert math.isfinite(record["vertical_cdr"])


def test_a_large_piece_far_from_the_disc_is_left_out_with_a_note() -> None:
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = _disc(SHAPE, CENTRE, DISC_RADIUS / 2)
    clean = disc_cup_measurements(disc, cup)
    blob = _disc(SHAPE, (20, 200), 12)  # 2% of the disc, 100 px from it
    record = disc_cup_measurements(disc | blob, cup)
    assert record["vertical_cdr"] == clean["vertical_cdr"] and record["disc_area_px"] == clean["disc_area_px"]
    share = 100 * np.count_nonzero(blob) / np.count_nonzero(disc | blob)
    assert record["notes"] == f"disc: {np.count_nonzero(blob)} px ({share:.1f}%) of pieces away from the disc left out"


def test_a_disc_cut_by_the_pictures_border_is_noted() -> None:
    disc = _disc(SHAPE, (20, 110), DISC_RADIUS)
    cup = _disc(SHAPE, (20, 110), DISC_RADIUS / 2)
    record = disc_cup_measurements(disc, cup)
    assert "disc touches the picture's border" in record["notes"]
    assert math.isfinite(record["vertical_cdr"])


def test_cup_offset_is_right_and_down_in_fractions_of_the_disc() -> None:
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = _disc(SHAPE, (CENTRE[0] + 12, CENTRE[1] - 20), 20)
    record = disc_cup_measurements(disc, cup)
    assert record["cup_offset_x"] == pytest.approx(-20 / _extent(disc, 1), abs=1e-12)
    assert record["cup_offset_y"] == pytest.approx(12 / _extent(disc, 0), abs=1e-12)


def test_only_the_largest_component_of_each_mask_is_measured() -> None:
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = _disc(SHAPE, CENTRE, DISC_RADIUS / 2)
    clean = disc_cup_measurements(disc, cup)
    disc[5, 5] = cup[195, 215] = cup[100, 55] = True  # specks, one of them inside the disc, 25 px from the cup
    assert disc_cup_measurements(disc, cup) == clean


def test_empty_disc_gives_nan_ratios_with_a_reason() -> None:
    empty = np.zeros(SHAPE, dtype=bool)
    cup = _disc(SHAPE, CENTRE, 20)
    for cup_mask in (empty, cup):  # an empty pair, and a cup without a disc
        record = disc_cup_measurements(empty, cup_mask)
        for key in ("vertical_cdr", "horizontal_cdr", "area_cdr", "cup_offset_x", "cup_offset_y"):
            assert math.isnan(record[key]), key
        assert record["disc_area_px"] == 0
        assert "disc mask is empty" in record["notes"]


def test_empty_cup_in_a_disc_gives_zero_ratios_with_a_reason() -> None:
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    record = disc_cup_measurements(disc, np.zeros(SHAPE, dtype=bool))
    assert (record["vertical_cdr"], record["horizontal_cdr"], record["area_cdr"]) == (0.0, 0.0, 0.0)
    assert record["rim_area_px"] == np.count_nonzero(disc)
    assert math.isnan(record["cup_offset_x"])
    assert "cup mask is empty" in record["notes"]


def test_a_disc_only_model_measures_its_disc_and_leaves_the_cup_unknown() -> None:
    """Without a cup channel nothing says the cup is empty: NaN ratios, not the 0 of a disc without a visible cup."""
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    record = measure_structures(disc[None], ["disc"], pixel_size_mm=0.01)
    assert record["disc_area_px"] == np.count_nonzero(disc)
    assert record["disc_area_mm2"] == pytest.approx(np.count_nonzero(disc) * 0.01**2)
    for key in ("vertical_cdr", "horizontal_cdr", "area_cdr", "cup_area_px", "rim_area_px", "cup_area_mm2"):
        assert math.isnan(record[key]), key
    assert record["notes"] == "no cup channel: the cup and the ratios are not measured"
    both = measure_structures(np.stack([disc, np.zeros(SHAPE, dtype=bool)]), ["disc", "cup"])
    assert both["vertical_cdr"] == 0.0, "a segmented cup channel that is empty is a disc without a visible cup"
    # The disc's own notes stay: one touching the border, and a speck away from it.
    at_border = _disc(SHAPE, (DISC_RADIUS - 5, CENTRE[1]), DISC_RADIUS)
    speck = np.zeros(SHAPE, dtype=bool)
    speck[-18:-3, 3:18] = True  # 225 px: over 1% of the disc
    noted = measure_structures((at_border | speck)[None], ["disc"])["notes"]
    assert noted == (
        f"disc: 225 px ({100 * 225 / (225 + np.count_nonzero(at_border)):.1f}%) of pieces away from the disc left out; "
        "disc touches the picture's border: it may be cut off, and its ratios with it; "
        "no cup channel: the cup and the ratios are not measured"
    )
    assert measure_structures(np.zeros((1, *SHAPE), dtype=bool), ["disc"])["notes"] == (
        "disc mask is empty; no cup channel: the cup and the ratios are not measured"
    )


def test_structures_are_known_by_their_channels_names_in_any_case_and_the_others_are_warned_about(caplog) -> None:
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = _disc(SHAPE, CENTRE, DISC_RADIUS / 2)
    expected = disc_cup_measurements(disc, cup)
    for names in (["disc", "cup"], ["Disc", "Cup"], ["OD", "OC"], ["optic disc", "optic cup"]):
        assert measure_structures(np.stack([disc, cup]), names) == expected, names
    vessels = _polyline(SHAPE, (20, 20), (180, 200))
    assert measure_structures(vessels[None], ["Vessels"]) == vessel_measurements(vessels, None)
    with caplog.at_level(logging.WARNING, logger="scripts.measurements"):
        assert warn_about_unmeasured_channels(["Vessels", "disc"]) == []
        assert not caplog.records
        odd = ["vessel_mask", "optic_disc"]
        assert warn_about_unmeasured_channels([*odd, "cup"]) == [*odd, "cup"], "a cup is measured in its disc"
        caplog.clear()
        assert warn_about_unmeasured_channels([*odd, "OC", "OD"]) == odd
    assert measure_structures(np.stack([vessels, disc]), ["vessel_mask", "optic_disc"]) == {"notes": ""}
    (record,) = caplog.records
    assert record.getMessage().startswith("Channel(s) 'vessel_mask', 'optic_disc' are not measured:")
    assert "disc: disc, od, optic disc" in record.getMessage()


def test_cup_partly_outside_the_disc_is_clipped_with_a_reason() -> None:
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    cup = _disc(SHAPE, (CENTRE[0], CENTRE[1] + DISC_RADIUS), 20)  # centred on the disc's right edge
    inside = cup & disc
    record = disc_cup_measurements(disc, cup)
    assert record["horizontal_cdr"] == _extent(inside, 1) / _extent(disc, 1)
    assert record["vertical_cdr"] == _extent(inside, 0) / _extent(disc, 0)
    assert record["area_cdr"] == np.count_nonzero(inside) / np.count_nonzero(disc)
    assert record["rim_area_px"] == np.count_nonzero(disc) - np.count_nonzero(inside)
    outside = 100 * (1 - np.count_nonzero(inside) / np.count_nonzero(cup))
    assert f"cup extends outside the disc ({outside:.1f}% of its pixels)" in record["notes"]


def test_cup_wholly_outside_the_disc_gives_nan_ratios_and_rim_with_a_reason() -> None:
    """The rim (disc less cup) is as undefined as the ratios: it read the whole disc, which an evaluation's MAE
    counted as a finite value."""
    disc = _disc(SHAPE, (100, 60), 40)
    cup = _disc(SHAPE, (100, 170), 20)
    record = disc_cup_measurements(disc, cup, pixel_size_mm=0.01)
    for key in ("vertical_cdr", "horizontal_cdr", "area_cdr", "cup_offset_x", "cup_offset_y", "rim_area_px",
                "rim_area_mm2"):
        assert math.isnan(record[key]), key
    assert record["disc_area_px"] == np.count_nonzero(disc) and record["cup_area_px"] == np.count_nonzero(cup)
    assert "cup lies wholly outside the disc: the ratios and the rim are undefined" in record["notes"]


# --- units and errors ---------------------------------------------------------------------------------------------


def test_measure_units_name_every_returned_key() -> None:
    disc = _disc(SHAPE, CENTRE, DISC_RADIUS)
    keys = set(disc_cup_measurements(disc, disc, pixel_size_mm=0.01)) | set(vessel_measurements(disc, None, 0.01))
    assert keys == set(MEASURE_UNITS)
    assert MEASURE_UNITS["notes"] == ""
    assert MEASURE_UNITS["disc_area_px"] == "px²" and MEASURE_UNITS["calibre_mean_mm"] == "mm"


def test_masks_of_different_shapes_raise_naming_both_shapes() -> None:
    with pytest.raises(MeasurementError, match=r"disc and cup .*\(10, 10\) and \(10, 12\)"):
        disc_cup_measurements(np.zeros((10, 10)), np.zeros((10, 12)))
    with pytest.raises(MeasurementError, match=r"vessels and fov .*\(10, 10\) and \(12, 10\)"):
        vessel_measurements(np.zeros((10, 10)), np.zeros((12, 10)))
    with pytest.raises(MeasurementError, match=r"vessels and skeleton .*\(10, 10\) and \(5, 5\)"):
        mean_calibre(np.zeros((10, 10)), np.zeros((5, 5)))


def test_arrays_that_are_not_binary_2d_masks_raise() -> None:
    with pytest.raises(MeasurementError, match=r"disc must be a 2-D \(H, W\) mask, .*\(1, 10, 10\)"):
        disc_cup_measurements(np.zeros((1, 10, 10)), np.zeros((10, 10)))
    with pytest.raises(MeasurementError, match=r"vessels must be a 2-D .*\(3, 8, 8\)"):
        vessel_measurements(np.zeros((3, 8, 8)))
    with pytest.raises(MeasurementError, match=r"skeleton must be a 2-D"):
        vessel_segments(np.zeros(10))
    with pytest.raises(MeasurementError, match=r"fov must hold only 0 and 1 .*255"):
        vessel_measurements(np.zeros((8, 8)), np.full((8, 8), 255))


@pytest.mark.parametrize("pixel_size_mm", [0.0, -0.01, math.nan, math.inf, "0.01"])
def test_a_pixel_size_that_is_not_positive_raises(pixel_size_mm: object) -> None:
    disc = _disc((32, 32), (16, 16), 10)
    with pytest.raises(MeasurementError, match="pixel_size_mm must be a positive number"):
        disc_cup_measurements(disc, disc, pixel_size_mm=pixel_size_mm)  # type: ignore[arg-type]
    with pytest.raises(MeasurementError, match="pixel_size_mm"):
        vessel_measurements(disc, pixel_size_mm=pixel_size_mm)  # type: ignore[arg-type]


def test_image_flags_name_low_quality_and_pictures_that_are_not_fundus_photographs():
    from scripts.handlers.measurement import FOV_RANGE, image_flags

    assert image_flags(0.6, 0.8, quality_threshold=0.5) == ""
    assert image_flags(0.6, None, quality_threshold=0.5) == "", "no IoU head (U-Net): no quality flag"
    assert image_flags(0.6, 0.3, quality_threshold=0.5) == "low predicted quality (IoU 0.30 < 0.5)"
    assert "covers 20% of the picture: not a fundus photograph?" in image_flags(0.2, 0.9, 0.5)
    assert "no dark border" in image_flags(FOV_RANGE[1], 0.9, 0.5)
    both = image_flags(0.1, 0.2, 0.5)
    assert "low predicted quality" in both and "not a fundus photograph" in both

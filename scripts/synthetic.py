"""A synthetic retinal fundus dataset: the bundle's embedded default data, since real datasets cannot be shipped.

Each picture is drawn from a per-image random generator seeded by ``(seed, index)``, so image ``i`` is the same
whatever the dataset size, and the same seed always gives byte-identical files. A picture has a circular field of
view with vignetting, arterial and venous trees growing out of an elliptical optic disc (with a cup), bifurcating
with decreasing width down to about one pixel, a darker macula, choroidal texture, uneven illumination and sensor
noise, so that a global threshold does not segment the vessels.

Layout written by :func:`write_dataset` (all masks 0/255 PNG, matching stems)::

    <output>/images/synthetic_0000.png   vessels/  disc/  cup/  fov/
    <output>/datalist.json               vessel task: label = vessels/<stem>.png
    <output>/datalist_disc_cup.json      disc/cup task: label = [disc/<stem>.png, cup/<stem>.png]

Command line: ``python -m scripts.synthetic --output DIR --count N --seed S [--size 512]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, signal

from scripts.atomic import write_json_atomic
from scripts.errors import command_line
from scripts.fundus_io import write_png
from scripts.inputs import InputError, read_datalist

__all__ = [
    "MASK_FOLDERS",
    "MIN_COUNT",
    "SyntheticFundus",
    "ensure_dataset",
    "main",
    "render_fundus",
    "split_indices",
    "write_dataset",
]

MASK_FOLDERS = ("vessels", "disc", "cup", "fov")
"""Folders holding the 0/255 masks, beside ``images/``."""

DATASET_NAME = "synthetic"
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
MIN_COUNT = 3
"""Fewest pictures in a dataset: one for each split."""
MIN_SIZE = 64
"""Smallest picture side in pixels."""

# Light absorbed per unit vessel "thickness", per RGB channel: blood absorbs green and blue far more than red, and
# venous blood (less oxygen) more than arterial blood, which is why veins look darker and arteries redder.
_ARTERY_ABSORPTION = np.array([0.16, 0.55, 0.45], np.float32)
_VEIN_ABSORPTION = np.array([0.30, 0.85, 0.70], np.float32)
_ARTERY, _VEIN = 0, 1


@dataclass(frozen=True)
class SyntheticFundus:
    """One synthetic fundus photograph with its ground truth.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB picture.
        vessels: ``(H, W)`` bool vessel mask (inside the field of view).
        disc: ``(H, W)`` bool optic disc mask.
        cup: ``(H, W)`` bool optic cup mask (inside the disc).
        fov: ``(H, W)`` bool field of view.
    """

    image: np.ndarray
    vessels: np.ndarray
    disc: np.ndarray
    cup: np.ndarray
    fov: np.ndarray


@dataclass(frozen=True)
class _Anatomy:
    """Where things are, in pixels: field-of-view circle, disc and cup ellipses, fovea."""

    fov_center: tuple[float, float]
    fov_radius: float
    disc_center: tuple[float, float]
    disc_radii: tuple[float, float]
    disc_angle: float
    cup_center: tuple[float, float]
    cup_radii: tuple[float, float]
    fovea_center: tuple[float, float]
    temporal_sign: float  # +1 when the fovea is right of the disc (a left eye as photographed), else -1


@dataclass
class _Sprout:
    """A vessel about to grow: start point, heading, width and the growth habits it passes to its children.

    The heading relaxes towards ``target`` (an image angle) at rate ``pull`` per pixel while random turning of
    strength ``tortuosity`` pushes it away: straight vessels have a strong pull and little tortuosity.
    """

    x: float
    y: float
    angle: float
    target: float
    pull: float
    width: float
    kind: int
    tortuosity: float
    contrast: float


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation (texture at a scale of ``sigma`` px)."""
    # Large scales are drawn on a coarse grid and zoomed: same look, a fraction of the filtering cost.
    factor = max(1, int(sigma // 4))
    coarse_shape = (-(-shape[0] // factor), -(-shape[1] // factor))
    field = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), sigma / factor, mode="wrap")
    if factor > 1:
        field = ndimage.zoom(field, factor, order=1, mode="nearest")[: shape[0], : shape[1]]
    return (field - field.mean()) / (field.std() + 1e-8)


def _place_anatomy(rng: np.random.Generator, size: int) -> _Anatomy:
    """Draw the positions and sizes of the field of view, disc, cup and fovea, in proportions of real photos."""
    fov_center = (size / 2 + rng.uniform(-0.01, 0.01) * size, size / 2 + rng.uniform(-0.01, 0.01) * size)
    fov_radius = rng.uniform(0.45, 0.48) * size
    temporal_sign = float(rng.choice([-1.0, 1.0]))
    disc_radius = rng.uniform(0.068, 0.082) * size
    disc_center = (
        fov_center[0] - temporal_sign * rng.uniform(0.24, 0.29) * size,
        fov_center[1] + rng.uniform(-0.05, 0.05) * size,
    )
    # Discs are slightly taller than wide.
    disc_radii = (disc_radius * rng.uniform(0.9, 1.0), disc_radius * rng.uniform(1.02, 1.15))
    cup_ratio = rng.uniform(0.3, 0.65)
    cup_radii = (disc_radii[0] * cup_ratio * rng.uniform(0.9, 1.05), disc_radii[1] * cup_ratio * rng.uniform(0.9, 1.05))
    # Cups sit slightly temporal; the offset leaves the whole cup ellipse inside the disc ellipse.
    room = min(disc_radii) - max(cup_radii)
    cup_center = (
        disc_center[0] + temporal_sign * rng.uniform(0.0, 0.5) * room,
        disc_center[1] + rng.uniform(-0.3, 0.3) * room,
    )
    fovea_center = (
        disc_center[0] + temporal_sign * rng.uniform(2.3, 2.7) * 2 * disc_radius,
        disc_center[1] + rng.uniform(0.0, 0.5) * disc_radius,
    )
    return _Anatomy(
        fov_center=fov_center,
        fov_radius=fov_radius,
        disc_center=disc_center,
        disc_radii=disc_radii,
        disc_angle=rng.uniform(-0.3, 0.3),
        cup_center=cup_center,
        cup_radii=cup_radii,
        fovea_center=fovea_center,
        temporal_sign=temporal_sign,
    )


def _image_angle(elevation: float, temporal_sign: float) -> float:
    """Image angle (x right, y down) of a heading given as an elevation above the temporal direction."""
    return float(np.arctan2(-np.sin(elevation), temporal_sign * np.cos(elevation)))


def _wrap_angle(angle: float) -> float:
    """``angle`` wrapped into ``[-pi, pi)``."""
    return float((angle + np.pi) % (2 * np.pi) - np.pi)


def _trunk_sprouts(rng: np.random.Generator, anatomy: _Anatomy, scale: float) -> list[_Sprout]:
    """The main vessels leaving the disc: temporal arcades arching around the macula, nasal vessels, small twigs."""
    sign = anatomy.temporal_sign
    sprouts = []
    # Headings are planned as elevations above the temporal direction (towards the fovea), upwards positive, and
    # converted to image angles. The temporal arcades leave steeply and are pulled to the horizontal, arching
    # around the macula; nasal vessels fan out.
    # (start elevation, target elevation, pull in rad/px, vein width in px, at 512 px)
    plan = [
        (1.35, -0.3, 0.0065, 7.4),
        (-1.35, 0.3, 0.0065, 7.4),
        (2.1, 2.6, 0.004, 5.6),
        (-2.1, -2.6, 0.004, 5.6),
        (np.pi, np.pi, 0.003, 4.0),
    ]
    for elevation, target, pull, vein_width in plan:
        for kind in (_VEIN, _ARTERY):
            spread = (0.12 if kind == _ARTERY else -0.12) * np.sign(np.sin(elevation))
            jitter = rng.normal(0.0, 0.12)
            width = vein_width * (1.0 if kind == _VEIN else rng.uniform(0.7, 0.8)) * rng.uniform(0.9, 1.1) * scale
            sprouts.append(
                _Sprout(
                    x=anatomy.disc_center[0] + rng.normal(0, 0.15) * anatomy.disc_radii[0],
                    y=anatomy.disc_center[1] + rng.normal(0, 0.15) * anatomy.disc_radii[1],
                    angle=_image_angle(elevation + spread + jitter, sign),
                    target=_image_angle(target + spread + rng.normal(0.0, 0.1), sign),
                    pull=pull * rng.uniform(0.8, 1.2) / scale,
                    width=float(width),
                    kind=kind,
                    tortuosity=rng.uniform(0.002, 0.006) / scale,
                    contrast=rng.uniform(0.75, 1.15),
                )
            )
    # Thin papillomacular twigs head straight for the macula.
    for _ in range(int(rng.integers(3, 6))):
        sprouts.append(
            _Sprout(
                x=anatomy.disc_center[0] + sign * anatomy.disc_radii[0] * 0.8,
                y=anatomy.disc_center[1] + rng.normal(0, 0.4) * anatomy.disc_radii[1],
                angle=_image_angle(rng.normal(0, 0.35), sign),
                target=_image_angle(rng.normal(0, 0.2), sign),
                pull=0.004 / scale,
                width=float(rng.uniform(1.4, 2.2) * scale),
                kind=int(rng.integers(0, 2)),
                tortuosity=rng.uniform(0.004, 0.01) / scale,
                contrast=rng.uniform(0.6, 1.0),
            )
        )
    return sprouts


def _grow_vessels(rng: np.random.Generator, anatomy: _Anatomy, size: int) -> dict[str, np.ndarray]:
    """Grow the vessel trees as densely sampled centrelines.

    Each vessel grows one segment at a time (its path integrated from a smoothly varying random turning rate, all
    steps of a segment at once), then bifurcates following Murray's law (parent width cubed = sum of the children's
    widths cubed) with the thinner child leaving at a wider angle. Growth stops at the edge of the field of view, in
    the avascular zone of the fovea, or when the width falls below about one pixel.

    Returns:
        centreline samples: ``x``, ``y``, ``radius`` (px), ``kind`` (0 artery, 1 vein) and ``contrast``.
    """
    scale = size / 512.0
    step = 0.5
    min_width = 0.9 * scale
    fovea_radius = 0.035 * size
    limit_radius = anatomy.fov_radius - 1.5
    pending = _trunk_sprouts(rng, anatomy, scale)
    pieces: list[tuple[np.ndarray, ...]] = []
    while pending:
        sprout = pending.pop()
        mean_length = (12.0 + 8.0 * sprout.width / scale) * scale
        length = max(6.0 * scale, float(rng.gamma(2.0, mean_length / 2.0)))
        steps = int(length / step) + 1
        # The random turning rate is interpolated between knots about 20 px apart (tortuous vessels wiggle, they
        # do not zig-zag); the heading's deviation from the target decays at the pull rate: a first-order
        # recursive filter, run over all steps at once.
        knot_spacing = 40.0 * scale
        knots = rng.standard_normal(int(steps / knot_spacing) + 2)
        wiggle = np.interp(np.arange(steps) / knot_spacing, np.arange(knots.size), knots) * sprout.tortuosity * step
        decay = 1.0 - sprout.pull * step
        wiggle[0] += decay * _wrap_angle(sprout.angle - sprout.target)
        angles = sprout.target + signal.lfilter([1.0], [1.0, -decay], wiggle)
        xs = sprout.x + np.cumsum(np.cos(angles)) * step
        ys = sprout.y + np.cumsum(np.sin(angles)) * step
        widths = sprout.width * np.exp(-np.arange(steps) * step / (400.0 * scale))
        from_fov = np.hypot(xs - anatomy.fov_center[0], ys - anatomy.fov_center[1])
        from_fovea = np.hypot(xs - anatomy.fovea_center[0], ys - anatomy.fovea_center[1])
        stopped = (from_fov > limit_radius) | (from_fovea < fovea_radius * (1.0 + 0.25 * sprout.width / scale))
        stop_at = int(np.argmax(stopped)) if stopped.any() else steps
        if stop_at == 0:
            continue
        pieces.append(
            (
                xs[:stop_at],
                ys[:stop_at],
                widths[:stop_at] / 2.0,
                np.full(stop_at, sprout.kind),
                np.full(stop_at, sprout.contrast),
            )
        )
        if stop_at < steps:
            continue
        parent_width = float(widths[-1])
        asymmetry = rng.uniform(0.35, 1.0)
        major = parent_width / (1.0 + asymmetry**3) ** (1.0 / 3.0)
        minor = asymmetry * major
        side = float(rng.choice([-1.0, 1.0]))
        for width, deviation in ((major, rng.uniform(0.05, 0.3) * (1.1 - asymmetry)), (minor, rng.uniform(0.6, 1.2))):
            if width < min_width:
                continue
            turn_side = -side if width == major else side
            pending.append(
                _Sprout(
                    x=float(xs[-1]),
                    y=float(ys[-1]),
                    angle=float(angles[-1] + turn_side * deviation),
                    target=sprout.target if width == major else float(angles[-1] + turn_side * deviation),
                    pull=sprout.pull if width == major else 0.003 / scale,
                    width=width,
                    kind=sprout.kind,
                    tortuosity=float(np.clip(sprout.tortuosity * scale * rng.uniform(0.9, 1.4), 0.002, 0.012) / scale),
                    contrast=float(sprout.contrast * rng.uniform(0.85, 1.1)),
                )
            )
    names = ("x", "y", "radius", "kind", "contrast")
    return {name: np.concatenate([piece[i] for piece in pieces]) for i, name in enumerate(names)}


def _render_vessels(samples: dict[str, np.ndarray], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Draw centreline samples as tubes: per-pixel absorption for arteries and veins, and the vessel mask.

    A distance transform to the rasterised centrelines gives every pixel its nearest sample; the exact distance to
    that sample's sub-pixel position then sets the tube's anti-aliased edge. Thick, medium and thin vessels get
    separate transforms so that a thin vessel crossing a thick one does not cut a notch in it.

    Returns:
        ``(2, H, W)`` float32 absorption (artery, vein) and the ``(H, W)`` bool vessel mask.
    """
    height, width = shape
    rows, cols = np.mgrid[:height, :width]
    absorption = np.zeros((2, height, width), np.float32)
    mask = np.zeros(shape, bool)
    col_index = np.clip(np.round(samples["x"]).astype(np.int64), 0, width - 1)
    row_index = np.clip(np.round(samples["y"]).astype(np.int64), 0, height - 1)
    pixel_id = row_index * width + col_index
    for low, high in ((0.0, 1.0), (1.0, 2.0), (2.0, np.inf)):
        members = np.flatnonzero((samples["radius"] >= low) & (samples["radius"] < high))
        if members.size == 0:
            continue
        # One sample per centreline pixel (the widest one), chosen deterministically.
        order = members[np.lexsort((samples["radius"][members], pixel_id[members]))]
        last_of_pixel = np.r_[pixel_id[order][1:] != pixel_id[order][:-1], True]
        chosen = order[last_of_pixel]
        owner = np.full(height * width, -1, np.int64)
        owner[pixel_id[chosen]] = chosen
        owner = owner.reshape(shape)
        pixel_distance, (near_row, near_col) = ndimage.distance_transform_edt(owner < 0, return_indices=True)
        # Only pixels within reach of the widest tube of this class can be covered: compute on those alone.
        reach = np.flatnonzero(pixel_distance.ravel() <= samples["radius"][chosen].max() + 1.5)
        nearest = owner.ravel()[near_row.ravel()[reach] * width + near_col.ravel()[reach]]
        radius = samples["radius"][nearest].astype(np.float32)
        distance = np.hypot(rows.ravel()[reach] - samples["y"][nearest], cols.ravel()[reach] - samples["x"][nearest])
        distance = distance.astype(np.float32)
        coverage = np.clip(radius + 0.5 - distance, 0.0, 1.0)
        # Light crosses more blood through the middle of a tube; thicker vessels are darker.
        thickness = np.sqrt(np.clip(1.0 - (distance / (radius + 0.5)) ** 2, 0.0, 1.0))
        strength = samples["contrast"][nearest].astype(np.float32) * np.minimum(0.45 + radius / 3.0, 1.3)
        amount = coverage * thickness * strength
        kind = samples["kind"][nearest]
        # Large arteries show a bright central light reflex.
        reflex = (kind == _ARTERY) & (radius >= 2.0)
        amount = np.where(reflex, amount * (1.0 - 0.4 * np.exp(-((distance / (0.35 * radius)) ** 2))), amount)
        for vessel_kind in (_ARTERY, _VEIN):
            flat = absorption[vessel_kind].reshape(-1)
            flat[reach] = np.maximum(flat[reach], np.where(kind == vessel_kind, amount, 0.0))
        mask.reshape(-1)[reach] |= distance <= np.maximum(radius, 0.55)
    return absorption, mask


def _ellipse_radius(
    rows: np.ndarray, cols: np.ndarray, center: tuple[float, float], radii: tuple[float, float], angle: float
) -> np.ndarray:
    """Normalised elliptical radius: 1 on the ellipse boundary, <1 inside."""
    dx, dy = cols - center[0], rows - center[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    return np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2)


def render_fundus(size: int = 512, seed: int = 0, index: int = 0) -> SyntheticFundus:
    """Render one synthetic fundus photograph and its masks.

    Args:
        size: side of the square picture in pixels (proportions scale with it; 512 matches DRIVE's resolution).
        seed: dataset seed.
        index: picture number; together with ``seed`` it seeds this picture alone.

    Returns:
        the picture and its vessel, disc, cup and field-of-view masks.

    Raises:
        ValueError: when ``size`` is below :data:`MIN_SIZE`.
    """
    _check_size(size)
    rng = np.random.default_rng([seed, index])
    shape = (size, size)
    scale = size / 512.0
    anatomy = _place_anatomy(rng, size)
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    from_center = np.hypot(cols - anatomy.fov_center[0], rows - anatomy.fov_center[1]) / anatomy.fov_radius

    # Background: an orange-red retina lit unevenly, darker towards the edge of the lens and at the macula.
    brightness = rng.uniform(0.75, 1.1)
    base = np.array([rng.uniform(0.8, 0.92), rng.uniform(0.4, 0.5), rng.uniform(0.2, 0.32)], np.float32)
    gradient_angle = rng.uniform(0, 2 * np.pi)
    gradient = ((cols - size / 2) * np.cos(gradient_angle) + (rows - size / 2) * np.sin(gradient_angle)) / size
    unevenness = _smooth_noise(rng, shape, 60 * scale)
    illumination = 1.0 + rng.uniform(0.2, 0.5) * gradient + rng.uniform(0.05, 0.1) * unevenness
    vignetting = 1.0 - rng.uniform(0.3, 0.5) * np.clip(from_center, 0, 1) ** rng.uniform(2.5, 4.0)
    light = (brightness * illumination * vignetting)[..., None]
    choroid = _smooth_noise(rng, shape, 2.0 * scale) * rng.uniform(0.02, 0.04)
    mottling = _smooth_noise(rng, shape, 12.0 * scale) * rng.uniform(0.01, 0.025)
    retina = base * light * (1.0 + (choroid + mottling)[..., None] * np.array([0.6, 1.0, 0.8], np.float32))
    fovea_distance2 = (cols - anatomy.fovea_center[0]) ** 2 + (rows - anatomy.fovea_center[1]) ** 2
    macula = np.exp(-fovea_distance2 / (2 * (rng.uniform(0.05, 0.07) * size) ** 2))
    retina *= 1.0 - macula[..., None] * np.array([0.12, 0.3, 0.3], np.float32) * rng.uniform(0.7, 1.2)

    # Optic disc: pale yellow, brightest at the cup, with a soft rim and a lighter peripapillary halo.
    disc_radius = _ellipse_radius(rows, cols, anatomy.disc_center, anatomy.disc_radii, anatomy.disc_angle)
    cup_radius = _ellipse_radius(rows, cols, anatomy.cup_center, anatomy.cup_radii, anatomy.disc_angle)
    disc_blend = 1.0 / (1.0 + np.exp((disc_radius - 1.0) / rng.uniform(0.025, 0.05)))
    cup_blend = 1.0 / (1.0 + np.exp((cup_radius - 1.0) / rng.uniform(0.08, 0.15)))
    halo = np.exp(-np.clip(disc_radius - 1.0, 0.0, None) ** 2 / 0.25) * (disc_radius > 0.95)
    disc_colour = np.array([1.0, rng.uniform(0.75, 0.88), rng.uniform(0.4, 0.55)], np.float32) * brightness
    cup_colour = np.array([1.0, 0.93, rng.uniform(0.65, 0.8)], np.float32) * brightness
    retina = retina * (1.0 + 0.12 * halo[..., None])
    disc_strength = rng.uniform(0.55, 0.8)
    retina = retina + (disc_colour - retina) * (disc_strength * disc_blend)[..., None]
    retina = retina + (cup_colour - retina) * (rng.uniform(0.4, 0.7) * cup_blend)[..., None]

    # Vessels absorb light multiplicatively, then the optics blur and the sensor adds noise.
    samples = _grow_vessels(rng, anatomy, size)
    absorption, vessels = _render_vessels(samples, shape)
    optical_depth = (
        absorption[_ARTERY, ..., None] * _ARTERY_ABSORPTION + absorption[_VEIN, ..., None] * _VEIN_ABSORPTION
    )
    picture = retina * np.exp(-optical_depth * rng.uniform(0.7, 1.0))
    picture = ndimage.gaussian_filter(picture, sigma=(0.7 * scale, 0.7 * scale, 0))
    picture += rng.normal(0.0, rng.uniform(0.008, 0.02), picture.shape).astype(np.float32)

    # The camera's circular aperture: soft edge, near-black noisy surround.
    inside = np.clip((1.0 - from_center) * anatomy.fov_radius + 0.5, 0.0, 1.0)[..., None]
    surround = rng.uniform(0.01, 0.035) + rng.normal(0.0, 0.004, picture.shape).astype(np.float32)
    picture = np.clip(picture * inside + surround * (1.0 - inside), 0.0, 1.0)

    fov = from_center <= 1.0
    disc = disc_radius <= 1.0
    return SyntheticFundus(
        image=np.round(picture * 255.0).astype(np.uint8),
        vessels=vessels & fov,
        disc=disc,
        cup=(cup_radius <= 1.0) & disc,
        fov=fov,
    )


def _check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")


def split_indices(count: int, seed: int, fractions: Sequence[float] = SPLIT_FRACTIONS) -> dict[str, list[int]]:
    """Shuffle ``range(count)`` with ``seed`` into training, validation and test lists, none of them empty.

    Args:
        count: number of items, at least 3.
        seed: seed of the shuffle.
        fractions: training, validation and test fractions (normalised).

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` with sorted indices.

    Raises:
        ValueError: when ``count`` is below 3 or ``fractions`` is not three non-negative numbers.
    """
    if count < MIN_COUNT:
        raise ValueError(
            f"count must be at least {MIN_COUNT} (one image each for training, validation, test), got {count}"
        )
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    total = float(sum(fractions))
    n_validation = max(1, round(count * fractions[1] / total))
    n_test = max(1, round(count * fractions[2] / total))
    n_training = count - n_validation - n_test
    if n_training < 1:
        n_training, n_validation, n_test = 1, (count - 1) // 2, count - 1 - (count - 1) // 2
    order = np.random.default_rng(seed).permutation(count)
    bounds = np.cumsum([n_training, n_validation])
    return {
        "training": sorted(int(i) for i in order[: bounds[0]]),
        "validation": sorted(int(i) for i in order[bounds[0] : bounds[1]]),
        "test": sorted(int(i) for i in order[bounds[1] :]),
    }


def write_dataset(output: str | os.PathLike, count: int, seed: int = 0, size: int = 512) -> dict[str, Path]:
    """Render ``count`` synthetic pictures into ``output`` with their masks and MONAI datalists.

    Every file is written atomically and the datalists last, so a datalist only ever lists complete files; the
    datalists of an earlier dataset in ``output`` go first, so that one killed while rendering over it is never
    taken for that dataset (its images would be a mix of both). Paths in
    the datalists are relative to ``output``, which can therefore be moved; load them with
    ``monai.data.load_decathlon_datalist(output / "datalist.json", data_list_key="training")``.

    Args:
        output: dataset folder, created if needed.
        count: number of pictures, at least 3 (every split gets one).
        seed: dataset seed; picture ``i`` depends only on ``(seed, i)`` and ``size``.
        size: side of the square pictures in pixels.

    Returns:
        paths of the two datalists: ``{"vessels": .../datalist.json, "disc_cup": .../datalist_disc_cup.json}``.

    Raises:
        ValueError: when ``count`` is below 3, ``size`` is too small, or ``output`` is not a usable folder; checked
            before anything in ``output`` is touched.
        OutputError: a file cannot be written.
    """
    output = Path(output)
    splits = split_indices(count, seed)
    _check_size(size)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} exists and is not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        for folder in ("images",) + MASK_FOLDERS:
            (output / folder).mkdir(exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the dataset folders in {output}: {error.strerror or error}") from None
    if not os.access(output, os.W_OK):
        raise ValueError(f"output folder {output} is not writable")

    paths = _datalist_paths(output)
    for path in paths.values():
        path.unlink(missing_ok=True)
    stems = [f"{DATASET_NAME}_{index:04d}" for index in range(count)]
    for index, stem in enumerate(stems):
        sample = render_fundus(size=size, seed=seed, index=index)
        # Noisy pictures barely shrink at higher zlib levels, which cost four times the time.
        write_png(output / "images" / f"{stem}.png", sample.image, compress_level=3)
        for folder in MASK_FOLDERS:
            write_png(output / folder / f"{stem}.png", getattr(sample, folder))

    def entry(index: int, label: str | list[str]) -> dict:
        stem = stems[index]
        return {"image": f"images/{stem}.png", "label": label, "fov": f"fov/{stem}.png", "dataset": DATASET_NAME}

    description = {
        "name": DATASET_NAME,
        "description": "Synthetic fundus photographs rendered by scripts/synthetic.py",
        "seed": seed,
        "size": size,
        "split": {"method": "seeded random permutation", "seed": seed, "fractions": list(SPLIT_FRACTIONS)},
    }
    vessel_list = {
        **description,
        "labels": {"0": "vessel"},
        "task": "vessels",
        "structures": ["vessels"],
        **{key: [entry(i, f"vessels/{stems[i]}.png") for i in indices] for key, indices in splits.items()},
    }
    disc_cup_list = {
        **description,
        "labels": {"0": "optic disc", "1": "optic cup"},
        "task": "disc_cup",
        "structures": ["disc", "cup"],  # the label order, as tools.prepare records it: workflows check channel_names by it
        **{
            key: [entry(i, [f"disc/{stems[i]}.png", f"cup/{stems[i]}.png"]) for i in indices]
            for key, indices in splits.items()
        },
    }
    write_json_atomic(paths["vessels"], vessel_list)
    write_json_atomic(paths["disc_cup"], disc_cup_list)
    return paths


def ensure_dataset(output: str | os.PathLike, count: int, seed: int = 0, size: int = 512) -> dict[str, str]:
    """The datalists of a synthetic dataset in ``output``, rendering it only if it is not there yet.

    A dataset already in ``output`` is reused when its datalists record the same seed, size and number of pictures;
    otherwise it is rendered again (every file is rewritten atomically).

    Args:
        output: dataset folder.
        count: number of pictures.
        seed: dataset seed.
        size: side of the square pictures in pixels.

    Returns:
        paths of the two datalists, as strings: ``{"vessels": ..., "disc_cup": ...}``.
    """
    output = Path(output)
    paths = _datalist_paths(output)
    if not all(path.is_file() for path in paths.values()) or not _matches(paths["vessels"], count, seed, size):
        paths = write_dataset(output, count, seed=seed, size=size)
    return {task: str(path) for task, path in paths.items()}


def _datalist_paths(output: Path) -> dict[str, Path]:
    return {"vessels": output / "datalist.json", "disc_cup": output / "datalist_disc_cup.json"}


def _matches(datalist: Path, count: int, seed: int, size: int) -> bool:
    try:
        content = read_datalist(datalist)
    except InputError:
        return False
    listed = sum(len(content.get(split, [])) for split in ("training", "validation", "test"))
    return content.get("seed") == seed and content.get("size") == size and listed == count


@command_line
def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: ``python -m scripts.synthetic --output DIR --count N --seed S [--size 512]``.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        the process exit status (0 on success; argparse exits with 2 on bad arguments, and a file that cannot be
        written is reported in one line with status 1).
    """
    parser = argparse.ArgumentParser(prog="python -m scripts.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, type=Path, help="dataset folder (created if needed)")
    parser.add_argument("--count", required=True, type=int, help=f"number of pictures (at least {MIN_COUNT})")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--size", type=int, default=512, help="picture side in pixels (default 512)")
    arguments = parser.parse_args(argv)
    try:
        paths = write_dataset(arguments.output, arguments.count, seed=arguments.seed, size=arguments.size)
    except ValueError as error:  # --output, --count or --size cannot be used
        parser.error(str(error))
    print(f"wrote {arguments.count} synthetic pictures; datalists: {paths['vessels']}, {paths['disc_cup']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

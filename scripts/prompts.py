"""Prompts for the SAM head: drawn from a reference mask (the paper's evaluation modes), made by the model for itself
from a first prompt-free pass, or given by a person in a prompts file or with clicks.

A prompt is a :class:`Prompt`: points ``(x, y, label)`` (x to the right, y down, in the photograph's own pixels;
label 1 positive, 0 negative) and an optional box ``(x0, y0, x1, y1)``. :meth:`Prompt.to_network` turns it into
the coordinates of the picture the network sees.

Modes (``PROMPT_MODES``):

- ``none``: SAM 2's prompt-free input;
- oracle modes, drawn from the reference mask as SAM2LoRA's evaluation does: ``1_point``, ``2_points``,
  ``5_points`` (positive points inside the structure eroded as training's are, :data:`PROMPT_EROSION_PX`), ``box``
  (its bounding box) and ``5_points_box``. They are seeded by the image's file name, so every run and every model
  sees the same prompts for the same image, and nested: ``1_point``'s point is the first of ``2_points``', which
  are the first of ``5_points``', the points of ``5_points_box``;
- automatic modes, needing no person and no reference: ``auto_box`` (the bounding box, with a margin, of the
  largest connected component of a first prompt-free pass) and ``auto_points`` (the most confident locations of
  that pass, optionally with negatives far outside it).

With several output channels (optic disc and cup) prompts are drawn from channel 0, the outer structure (the disc):
one prompt locates the disc, and the network reads the cup from its second mask token as in prompt-free use.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from scripts.errors import ConfigError, FundusError
from scripts.masks import binarise, bounding_slices

__all__ = [
    "AUTO_MODES",
    "BOX_BOTTOM_RIGHT",
    "BOX_TOP_LEFT",
    "ORACLE_MODES",
    "POINT_NEGATIVE",
    "POINT_PADDING",
    "POINT_POSITIVE",
    "PROMPTS_RECORD_FORMAT",
    "PROMPT_EROSION_PX",
    "PROMPT_MODES",
    "PROMPT_SOURCES",
    "Prompt",
    "PromptError",
    "auto_prompt",
    "auto_prompts",
    "check_head_takes_prompts",
    "check_prompt_modes",
    "mode_channel_names",
    "oracle_prompt",
    "oracle_prompts",
    "parse_prompt",
    "read_prompts_file",
]

logger = logging.getLogger(__name__)

ORACLE_MODES = ("1_point", "2_points", "5_points", "box", "5_points_box")
AUTO_MODES = ("auto_box", "auto_points")
PROMPT_MODES = ("none", *ORACLE_MODES, *AUTO_MODES)
PROMPT_SOURCES = ("none", *AUTO_MODES)
"""What inference does for an image without a prompt of its own."""

PROMPT_EROSION_PX = 2
"""Points drawn from a reference keep this many pixels of the network's input away from the structure's border,
where the reference itself is uncertain: in training (:class:`scripts.transforms.SamplePromptsd`) and, scaled to
the photograph, in evaluation's oracle modes."""

PROMPTS_RECORD_FORMAT = "sam2lora-prompts/1"
"""The ``format`` of the record of the prompts a run used (``prompts_used.json``, evaluation's ``prompts.json``):
``{"format": ..., "images": {image file name: {mode: prompt}}}``, prompts in the photograph's pixels."""

POINT_POSITIVE, POINT_NEGATIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, POINT_PADDING = 1, 0, 2, 3, -1
"""SAM's point labels: a positive or negative click, a box's corners, and a point that only fills a batch."""


class PromptError(FundusError, ValueError):
    """A prompt or prompts file cannot be used; the message names the file, the image and the value."""


@dataclass(frozen=True)
class Prompt:
    """Points and an optional box in a photograph's pixel coordinates (x right, y down).

    Args:
        points: ``(x, y, label)`` triples, label 1 positive, 0 negative.
        box: ``(x0, y0, x1, y1)`` with ``x0 <= x1`` and ``y0 <= y1``, or None.
    """

    points: tuple[tuple[float, float, int], ...] = ()
    box: tuple[float, float, float, float] | None = None
    _note: str = field(default="", compare=False)

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None

    def to_json(self) -> dict[str, Any]:
        content: dict[str, Any] = {"points": [[float(x), float(y), int(label)] for x, y, label in self.points]}
        if self.box is not None:
            content["box"] = [float(value) for value in self.box]
        if self._note:
            content["note"] = self._note
        return content

    def rescaled(self, from_size: tuple[int, int], to_size: tuple[int, int]) -> Prompt:
        """The same prompt in a picture of another ``(height, width)`` (the same rule as :meth:`to_network`)."""
        sx, sy = to_size[1] / from_size[1], to_size[0] / from_size[0]
        points = tuple((x * sx, y * sy, label) for x, y, label in self.points)
        box = None if self.box is None else (self.box[0] * sx, self.box[1] * sy, self.box[2] * sx, self.box[3] * sy)
        return Prompt(points, box, self._note)

    def to_network(
        self, image_size: tuple[int, int], network_size: tuple[int, int], device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The prompt as :meth:`scripts.network.SAM2LoRA.decode` keyword arguments for one image.

        Args:
            image_size: the photograph's ``(height, width)``, the frame of the prompt.
            network_size: ``(height, width)`` of the picture given to the network.
            device: where the tensors go.

        Returns:
            ``{}`` for an empty prompt (SAM 2's prompt-free input), else ``point_coords`` (1, N, 2) and
            ``point_labels`` (1, N), the box as corner points labelled 2 and 3 first.
        """
        if self.empty:
            return {}
        scale = np.array([network_size[1] / image_size[1], network_size[0] / image_size[0]], np.float32)
        coords, labels = [], []
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            coords += [(x0, y0), (x1, y1)]
            labels += [BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]
        coords += [(x, y) for x, y, _ in self.points]
        labels += [label for _, _, label in self.points]
        # As SAM 2's own predictor maps a photograph's pixels onto its square input: x * side / width.
        scaled = np.asarray(coords, np.float32) * scale
        return {
            "point_coords": torch.as_tensor(scaled, device=device)[None],
            "point_labels": torch.as_tensor(labels, dtype=torch.int64, device=device)[None],
        }


def check_prompt_modes(modes: Sequence[str], architecture: str = "sam") -> list[str]:
    """``modes`` as a list if every one is known and the head takes prompts.

    Raises:
        ConfigError: an unknown mode, a repeated one, an empty list, or prompts for the U-Net head.
    """
    modes = [modes] if isinstance(modes, str) else list(modes)
    unknown = [mode for mode in modes if mode not in PROMPT_MODES]
    if not modes or unknown:
        raise ConfigError(f"Setting 'prompt_modes' takes modes among {', '.join(PROMPT_MODES)}; got {modes!r}.")
    repeated = sorted({mode for mode in modes if modes.count(mode) > 1})
    if repeated:
        raise ConfigError(f"Setting 'prompt_modes' names {repeated[0]!r} more than once: {modes!r}.")
    if architecture != "sam" and modes != ["none"]:
        raise ConfigError(f"Prompt modes {modes} need architecture 'sam'; the '{architecture}' head is prompt-free.")
    return modes


def check_head_takes_prompts(architecture: str, prompts_file: str | None, prompt_source: str) -> None:
    """Refuse an inference's prompts (``prompts_file``, ``prompt_source``) for a prompt-free head, before anything runs.

    Raises:
        ConfigError: prompts asked of a head other than ``sam``.
    """
    if architecture == "sam":
        return
    for name, value in (("prompts_file", prompts_file), ("prompt_source", prompt_source)):
        if value not in (None, "", "none"):
            raise ConfigError(
                f"Setting '{name}' ({value!r}) needs architecture 'sam'; the '{architecture}' head is prompt-free."
            )


def mode_channel_names(channel_names: Sequence[str], modes: Sequence[str]) -> list[str]:
    """The names of the channels of an evaluation over several prompt modes, mode-major (``vessels@box``).

    With the prompt-free mode alone the names stay the model's own.
    """
    if list(modes) == ["none"]:
        return list(channel_names)
    return [f"{name}@{mode}" for mode in modes for name in channel_names]


def _seeded(name: str, seed: int) -> np.random.Generator:
    # crc32 of the file name, not of the path: the same image gets the same prompts wherever it lies.
    return np.random.default_rng([seed, zlib.crc32(Path(name).name.encode())])


def _box_of(window: tuple[slice, slice]) -> tuple[float, float, float, float]:
    rows, cols = window
    return float(cols.start), float(rows.start), float(cols.stop - 1), float(rows.stop - 1)


def oracle_prompts(
    mask: np.ndarray, modes: Sequence[str], name: str, seed: int = 0, erosion_px: int = PROMPT_EROSION_PX
) -> dict[str, Prompt]:
    """The prompts of oracle modes, drawn from one reference mask, the same for the same image name and seed.

    The points of every mode come from one draw of the structure's eroded core in random order, each mode taking
    as many as it needs from its start: more points add to fewer, so modes differ only by what they add. A core
    of fewer pixels than a mode needs gives them again. The core and the bounding box are computed once.

    Args:
        mask: ``(H, W)`` reference mask (bool) of the structure prompted for.
        modes: any of :data:`ORACLE_MODES`, and ``none``.
        name: the image's file name (with ``seed``, it seeds the draw).
        seed: the evaluation's seed.
        erosion_px: pixels of the mask's own to erode before drawing points (the inferer scales
            :data:`PROMPT_EROSION_PX` from the network's input to the photograph).

    Returns:
        ``{mode: prompt}``; a prompt is empty when the reference has no foreground (nothing to point at).
    """
    unknown = [mode for mode in modes if mode != "none" and mode not in ORACLE_MODES]
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not an oracle prompt mode ({', '.join(ORACLE_MODES)}).")
    mask = np.asarray(mask, dtype=bool)
    drawn = [mode for mode in modes if mode != "none"]
    prompts = {mode: Prompt() for mode in modes if mode == "none"}
    if not drawn:
        return prompts
    if not mask.any():
        return {**prompts, **{mode: Prompt(_note="empty reference: no prompt") for mode in drawn}}
    window = bounding_slices(mask)
    drawn_order = None
    for mode in drawn:
        count = {"1_point": 1, "2_points": 2, "5_points": 5, "box": 0, "5_points_box": 5}[mode]
        points: tuple[tuple[float, float, int], ...] = ()
        if count:
            if drawn_order is None:
                core = _core_pixels(mask[window], erosion_px) + (window[0].start, window[1].start)
                drawn_order = core[_seeded(name, seed).permutation(len(core))]
            points = tuple((float(col), float(row), POINT_POSITIVE) for row, col in np.resize(drawn_order, (count, 2)))
        prompts[mode] = Prompt(points, _box_of(window) if mode in ("box", "5_points_box") else None)
    return prompts


def _core_pixels(structure: np.ndarray, erosion_px: int) -> np.ndarray:
    """``(row, col)`` in raster order of the structure eroded by ``erosion_px`` (all of it if that is empty).

    Eroding only the structure's bounding box gives the whole picture's result: scipy counts what lies outside the
    array as background, as the picture around the box is, and a disc is a small part of a 1024 px picture.
    """
    core = ndimage.binary_erosion(structure, iterations=erosion_px) if erosion_px > 0 else structure
    return np.argwhere(core if core.any() else structure)


def oracle_prompt(mask: np.ndarray, mode: str, name: str, seed: int = 0, erosion_px: int = PROMPT_EROSION_PX) -> Prompt:
    """The prompt of one oracle mode (or ``none``): :func:`oracle_prompts` for a single mode."""
    return oracle_prompts(mask, [mode], name, seed, erosion_px)[mode]


def auto_prompts(
    probability: np.ndarray,
    modes: Sequence[str],
    fov: np.ndarray | None = None,
    threshold: float = 0.5,
    box_margin: float = 0.1,
    points: int = 3,
    negative_points: int = 0,
) -> dict[str, Prompt]:
    """The prompts the model makes for itself from its prompt-free pass.

    ``auto_box``: the bounding box of the largest connected component of ``probability >= threshold``, widened by
    ``box_margin`` of its size on each side (clipped to the picture). ``auto_points``: the ``points`` most confident
    locations of that component (the first in raster order among equals), at least a tenth of its size apart, and
    ``negative_points`` spread evenly, in raster order, over the places inside the field of view where the
    probability is below ``1 - threshold`` and that lie over twice that spacing from the component. The component is
    found once for both modes.

    Args:
        probability: ``(H, W)`` prompt-free probabilities of the structure prompted for.
        modes: ``auto_box`` and/or ``auto_points``.
        fov: ``(H, W)`` field of view, where negatives may go (the whole picture when None).
        threshold: probability from which a pixel is found (the masks' rule: :func:`scripts.masks.binarise`).
        box_margin: the box's margin, as a fraction of its width and height.
        points: positive points of ``auto_points``.
        negative_points: negative points of ``auto_points``.

    Returns:
        ``{mode: prompt}``; a prompt is empty (prompt-free again) when the first pass found nothing.
    """
    unknown = [mode for mode in modes if mode not in AUTO_MODES]
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not an automatic prompt mode ({', '.join(AUTO_MODES)}).")
    probability = np.asarray(probability, dtype=np.float32)
    regions, count = ndimage.label(binarise(probability, threshold))
    if count == 0:
        return {mode: Prompt(_note="the prompt-free pass found nothing: prompt-free result kept") for mode in modes}
    component = regions == 1 + int(np.argmax(np.bincount(regions.ravel())[1:]))
    window = bounding_slices(component)
    height, width = probability.shape
    x0, y0, x1, y1 = _box_of(window)
    prompts = {}
    if "auto_box" in modes:
        dx, dy = box_margin * (x1 - x0 + 1), box_margin * (y1 - y0 + 1)
        box = (max(0.0, x0 - dx), max(0.0, y0 - dy), min(width - 1.0, x1 + dx), min(height - 1.0, y1 + dy))
        prompts["auto_box"] = Prompt(box=box)
    if "auto_points" in modes:
        spacing = max(1.0, 0.1 * max(x1 - x0, y1 - y0))
        prompts["auto_points"] = Prompt(
            _confident_points(probability, component, window, spacing, fov, threshold, points, negative_points)
        )
    return prompts


def _confident_points(
    probability: np.ndarray,
    component: np.ndarray,
    window: tuple[slice, slice],
    spacing: float,
    fov: np.ndarray | None,
    threshold: float,
    points: int,
    negative_points: int,
) -> tuple[tuple[float, float, int], ...]:
    """``auto_points``' points, ``spacing`` pixels apart at least: see :func:`auto_prompts`.

    The positives are ranked inside the component's bounding box ``window`` only: raster order there is the
    picture's raster order, so ties are broken alike.
    """
    chosen: list[tuple[float, float, int]] = []
    top, left = window[0].start, window[1].start
    for row, col in _most_confident_first(probability[window], component[window]):
        if len(chosen) == points:
            break
        row, col = row + top, col + left
        if all(math.hypot(col - x, row - y) >= spacing for x, y, _ in chosen):
            chosen.append((float(col), float(row), POINT_POSITIVE))
    if negative_points:
        far = ndimage.distance_transform_edt(~component) > 2 * spacing
        far &= probability < 1.0 - threshold
        if fov is not None:
            far &= np.asarray(fov, dtype=bool)
        candidates = np.argwhere(far)
        if len(candidates):
            picks = np.linspace(0, len(candidates) - 1, negative_points).round().astype(int)
            chosen += [(float(col), float(row), POINT_NEGATIVE) for row, col in candidates[picks]]
    return tuple(chosen)


def _most_confident_first(probability: np.ndarray, component: np.ndarray) -> Iterator[tuple[int, int]]:
    """``(row, col)`` of the component's pixels from the most confident down, the first in raster order among equals.

    A vessel tree or a wrong first pass can hold most of a 1024 px picture, and sorting it all costs more than a
    mask decoder call, while a few points are usually found among the first pixels. So the ranking is built in
    growing slices: all pixels at least as confident as the ``k``-th most confident one (ties included), ``k``
    quadrupling until the caller stops asking; the order is exactly that of one full stable sort.
    """
    width = probability.shape[1]
    inside = np.flatnonzero(component)
    values = probability.ravel()[inside]
    given = 0
    wanted = 256
    while given < len(inside):
        if wanted >= len(inside):
            ranked = inside[np.argsort(-values, kind="stable")]
        else:
            floor = -np.partition(-values, wanted - 1)[wanted - 1]
            top = values >= floor
            ranked = inside[top][np.argsort(-values[top], kind="stable")]
        for index in ranked[given:]:
            yield divmod(int(index), width)
        given = len(ranked)
        # Ties can make a slice longer than asked for: the next one must go past it, not sort it again.
        wanted = 4 * max(wanted, given)


def auto_prompt(probability: np.ndarray, mode: str, fov: np.ndarray | None = None, **settings: Any) -> Prompt:
    """The prompt of one automatic mode: :func:`auto_prompts` for a single mode (``settings`` as there)."""
    return auto_prompts(probability, [mode], fov, **settings)[mode]


def _numbers(value: Any, count: int) -> bool:
    """Whether ``value`` is a list of ``count`` numbers; JSON's true and false are not (Python reads them as 1, 0)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == count
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _finite(values: Iterable[int | float]) -> bool:
    """Whether every value is a finite number as a float; JSON's integers have no limit, and one beyond a float's
    range raised OverflowError."""
    try:
        return all(math.isfinite(float(value)) for value in values)
    except OverflowError:
        return False


def _point(value: Any, where: str, size: tuple[int, int]) -> tuple[float, float, int]:
    if not _numbers(value, 3):
        raise PromptError(f"{where}: a point is [x, y, label]; got {value!r}.")
    x, y, label = value
    height, width = size
    if not _finite((x, y)):
        raise PromptError(f"{where}: point {value!r} has a coordinate that is not a finite number.")
    if not (0 <= x < width and 0 <= y < height):
        raise PromptError(f"{where}: point {value!r} lies outside the {width}x{height} image.")
    if label not in (POINT_POSITIVE, POINT_NEGATIVE):
        raise PromptError(f"{where}: point label must be 1 (positive) or 0 (negative); got {label!r}.")
    return float(x), float(y), int(label)


def _box(value: Any, where: str, size: tuple[int, int]) -> tuple[float, float, float, float]:
    if not _numbers(value, 4):
        raise PromptError(f"{where}: a box is [x0, y0, x1, y1]; got {value!r}.")
    if not _finite(value):
        raise PromptError(f"{where}: box {value!r} has a coordinate that is not a finite number.")
    x0, y0, x1, y1 = (float(v) for v in value)
    height, width = size
    if x0 > x1 or y0 > y1:
        raise PromptError(f"{where}: box {value!r} needs x0 <= x1 and y0 <= y1.")
    # x1 = width (y1 = height) is the picture's edge, where a client that ends boxes one past the last pixel (Python
    # slices, a selection tool's rectangle) puts a box reaching the border.
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise PromptError(f"{where}: box {value!r} reaches outside the {width}x{height} image.")
    return x0, y0, x1, y1


def parse_prompt(content: Any, where: str, size: tuple[int, int]) -> Prompt:
    """One image's prompt from its JSON form ``{"points": [[x, y, label], ...], "box": [x0, y0, x1, y1]}``.

    Args:
        content: the JSON value.
        where: the file and image, for messages.
        size: the image's ``(height, width)``.

    Raises:
        PromptError: a malformed value, or coordinates outside the image.
    """
    if not isinstance(content, Mapping) or not set(content) <= {"points", "box"} or not content:
        raise PromptError(f"{where}: a prompt is an object with 'points' and/or 'box'; got {json.dumps(content)[:100]}.")
    points = content.get("points", [])
    if not isinstance(points, list):
        raise PromptError(f"{where}: 'points' must be a list of [x, y, label]; got {points!r}.")
    box = content.get("box")
    return Prompt(tuple(_point(p, where, size) for p in points), None if box is None else _box(box, where, size))


def read_prompts_file(
    path: str | os.PathLike, image_sizes: Mapping[str, tuple[int, int]], left_out: Collection[str] = ()
) -> dict[str, Prompt]:
    """The prompts of a prompts file, checked against the images they name.

    The file maps image file names (as in the image folder, e.g. ``"01_test.tif"``) to prompts::

        {"01_test.tif": {"points": [[292, 310, 1], [120, 40, 0]], "box": [250, 260, 340, 360]}}

    A run's own record of the prompts it used (``prompts_used.json``, :data:`PROMPTS_RECORD_FORMAT`) is read too,
    so a run can be repeated with the same prompts: its ``given`` prompts (those of the run's prompts file) are
    taken; those the run drew itself (automatic modes; evaluation's oracle modes) are not, ``prompt_source`` draws
    automatic ones again.

    Args:
        path: the JSON file.
        image_sizes: file name to ``(height, width)`` of every image of the run.
        left_out: file names of the folder's images the run leaves out (unreadable, too small): their prompts are
            not used, with a log line, so that one bad file does not stop the others.

    Returns:
        File name to prompt.

    Raises:
        PromptError: the file is missing or not JSON, names an image that is not in the run, holds a malformed
            prompt or coordinates outside an image (the message names the file, the image and the value), or is a
            record of another format.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PromptError(f"Prompts file {path} cannot be read as JSON ({error}).") from None
    if not isinstance(content, dict):
        raise PromptError(f"Prompts file {path} must map image file names to prompts; it holds a {type(content).__name__}.")
    if "format" in content:  # no image file name is "format": it lacks an image suffix
        content = _given_prompts_of_record(path, content)
    unused = sorted(set(content) & set(left_out))
    if unused:
        logger.warning(
            f"Prompts file {path}: the prompts of {len(unused)} images left out of the run are not used, e.g. "
            f"{unused[0]!r} (why it is left out is said at the end)."
        )
    unknown = sorted(set(content) - set(image_sizes) - set(left_out))
    if unknown:
        raise PromptError(
            f"Prompts file {path} names {len(unknown)} images that are not in the image folder, e.g. {unknown[0]!r}."
        )
    return {
        name: parse_prompt(value, f"{path}, image {name}", image_sizes[name])
        for name, value in content.items()
        if name in image_sizes
    }


def _given_prompts_of_record(path: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """The ``given`` prompts of a run's record of the prompts it used, as a prompts file maps them.

    Args:
        path: the record, for messages.
        record: its content, ``{"format": PROMPTS_RECORD_FORMAT, "images": {name: {mode: prompt}}}``.

    Returns:
        Image file name to the JSON form of its given prompt, for the images that had one.

    Raises:
        PromptError: another format, or an ``images`` entry that is not a mapping of modes to prompts.
    """
    images = record.get("images")
    if record["format"] != PROMPTS_RECORD_FORMAT or set(record) != {"format", "images"} or not isinstance(images, dict):
        raise PromptError(
            f"Prompts file {path} is not a prompts file nor a run record of format {PROMPTS_RECORD_FORMAT!r} "
            f"(its 'format' is {record['format']!r}): write one mapping image file names to prompts, e.g. "
            '{"01_test.tif": {"box": [250, 260, 340, 360]}}.'
        )
    odd = next((name for name, modes in images.items() if not isinstance(modes, dict)), None)
    if odd is not None:
        raise PromptError(
            f"Prompts file {path}, image {odd}: a run record maps each image to its prompts per mode; got "
            f"{json.dumps(images[odd])[:100]}."
        )
    given = {name: modes["given"] for name, modes in images.items() if "given" in modes}
    drawn = sorted(name for name, modes in images.items() if set(modes) - {"given", "none"})
    skipped = (
        f"; the prompts the run drew itself (automatic or oracle modes) for {len(drawn)} images (e.g. {drawn[0]!r}) "
        "are not: --prompt_source draws automatic ones again"
        if drawn
        else ""
    )
    logger.info(f"Prompts file {path} is a run record: the given prompts of {len(given)} images are used{skipped}.")
    return given

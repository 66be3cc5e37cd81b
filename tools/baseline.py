"""A classical, training-free vessel segmentation baseline for the model card: a thresholded green-channel top-hat.

Vessels are thin structures darker than the retina around them, best contrasted in the green channel. A
morphological black top-hat (closing minus image) with a disk wider than the widest vessel keeps exactly such thin
dark structures and flattens the slowly varying background (illumination, optic disc, macula). The response is
divided by its standard deviation inside the field of view, so that one threshold suits images of different contrast,
and thresholded.

The footprint radius, the Gaussian pre-smoothing and the threshold are chosen on the datalist's ``training`` split
only: the combination maximising the mean per-image Dice inside the FOV. The evaluated split (``test`` by default)
is never looked at until the parameters are fixed; the JSON report records the parameters, their training Dice and
the training images they were fitted on.

Radius and smoothing are given at DRIVE's scale (a field of view about 540 pixels wide) and scaled with each image's
FOV width, so that one setting can serve higher-resolution datasets.

The dataset's FOV mask (or, where an entry has none, :func:`scripts.fundus_io.estimate_fov`) is part of the input:
the dark camera border is replaced by the nearest retina before filtering (otherwise the border's edge reads as a
vessel) and the prediction outside the FOV is background. Predictions are written as probabilities
``sigmoid(normalised response - threshold)``, a strictly increasing map (AUC unchanged) that puts the threshold at
0.5, and evaluated by :mod:`scripts.metrics` exactly as the model: inside the FOV and over the whole image.

An earlier baseline's reports in the output folder are moved to ``earlier_evaluations/<time>/`` before the new ones
are written, with a warning naming the folder (:func:`scripts.handlers.evaluation.keep_earlier_evaluation`); a
model's evaluation reports there (``metrics_*``) are not this tool's and stay.

Command line::

    python -m tools.baseline --datalist datalists/drive.json --output eval/baseline_drive [--split test]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.special import expit
from skimage.morphology import black_tophat, disk

from scripts.errors import ConfigError, FundusError, command_line
from scripts.fundus_io import estimate_fov, read_image, read_label_mask
from scripts.handlers.evaluation import keep_earlier_evaluation
from scripts.inputs import InputError, load_split
from scripts.metrics import (
    empty_fov_problem,
    entry_fov_source,
    evaluate_case,
    format_summary_table,
    report_names,
    summarise,
    write_reports,
)
from tools import path_argument

__all__ = [
    "DEFAULT_RADII",
    "DEFAULT_SIGMAS",
    "DEFAULT_THRESHOLDS",
    "REFERENCE_FOV_WIDTH",
    "BaselineFit",
    "TopHatParameters",
    "VesselCase",
    "evaluate_cases",
    "fit_parameters",
    "iter_cases",
    "main",
    "predict_probability",
    "run_baseline",
    "vessel_response",
]

REFERENCE_FOV_WIDTH = 540.0
"""FOV width in pixels at which radii and smoothing are expressed (DRIVE's is about 540)."""

DEFAULT_RADII = (3, 5, 7, 9, 11)
"""Candidate disk radii at DRIVE scale: DRIVE's widest vessels are about 8-10 pixels across."""

DEFAULT_SIGMAS = (0.0, 1.0, 2.0)
"""Candidate Gaussian pre-smoothing at DRIVE scale (0: none)."""

DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.5, 6.0 + 1e-9, 0.05), 2).tolist())
"""Candidate thresholds on the response normalised by its standard deviation inside the FOV."""

REPORT_PREFIX = "baseline"
"""The reports' file name prefix (``baseline_per_image.csv``...): beside a model's ``metrics_*`` they stay its own."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VesselCase:
    """One image of a vessel datalist, loaded.

    Args:
        filename: the image path, identifying the case in reports.
        dataset: the dataset name.
        image: ``(H, W, 3)`` float32 RGB in ``[0, 1]``.
        label: ``(H, W)`` bool vessel mask.
        fov: ``(H, W)`` bool field of view.
        fov_source: ``"given"`` (the datalist's mask) or ``"estimated"`` (from the photograph).
    """

    filename: str
    dataset: str
    image: np.ndarray
    label: np.ndarray
    fov: np.ndarray
    fov_source: str


@dataclass(frozen=True)
class TopHatParameters:
    """The baseline's parameters.

    Args:
        radius: disk footprint radius in pixels at DRIVE scale.
        sigma: Gaussian pre-smoothing in pixels at DRIVE scale (0: none).
        threshold: threshold on the normalised top-hat response.
    """

    radius: int
    sigma: float
    threshold: float


def iter_cases(
    datalist: str | os.PathLike, split: str, left_out: dict[str, str] | None = None
) -> Iterator[VesselCase]:
    """Load the images, vessel labels and FOV masks of one split of a MONAI datalist, one at a time.

    Streaming keeps one image in memory however large the split (FIVES and HRF images are 2048 and 3504 pixels wide).
    Masks follow the datalist convention 0 = background, > 0 = structure. An entry without ``"fov"`` gets an
    estimated field of view.

    Args:
        datalist: datalist JSON; relative paths are resolved against its folder.
        split: list key, e.g. ``"training"`` or ``"test"``.
        left_out: where given, a case that cannot be used is named in the log, recorded here (``{image: why}``) and
            passed over, the others yielded; None: its error is raised.

    Yields:
        the split's cases, in datalist order.

    Raises:
        ValueError: when the split is missing or empty; without ``left_out``, also when an entry's label is not a
            single vessel mask (disc/cup datalists list two), image and masks differ in size, or the FOV is empty.
        FundusImageError: without ``left_out``, when a file cannot be read.
    """
    datalist = Path(datalist)
    for entry in load_split(datalist, split):
        try:
            case = _load_case(entry, datalist)
        except FundusError as error:
            if left_out is None:
                raise
            left_out[str(entry["image"])] = str(error)
            logger.error("%s; left out", error)
            continue
        yield case


def _load_case(entry: dict[str, Any], datalist: Path) -> VesselCase:
    """One entry of ``datalist`` (its paths resolved), loaded and checked as :func:`iter_cases` describes."""
    if not isinstance(entry.get("label"), (str, os.PathLike)):
        raise InputError(
            f"the baseline segments vessels: entry {entry.get('image')} of {datalist} has label "
            f"{entry.get('label')!r}, not one vessel mask"
        )
    image = read_image(entry["image"])
    label = read_label_mask(entry["label"])
    fov = read_label_mask(entry["fov"]) if entry.get("fov") else estimate_fov(image)
    if label.shape != image.shape[:2] or fov.shape != image.shape[:2]:
        raise InputError(
            f"{entry['image']}: image {image.shape[:2]}, label {label.shape} and fov {fov.shape} differ in size"
        )
    problem = empty_fov_problem(fov, entry["fov"]) if entry.get("fov") else None  # an estimate is never empty
    if problem:
        raise InputError(problem)
    source = entry_fov_source(entry)
    return VesselCase(str(entry["image"]), str(entry.get("dataset", "unknown")), image, label, fov, source)


def _fov_scale(fov: np.ndarray) -> float:
    """The FOV width relative to :data:`REFERENCE_FOV_WIDTH`."""
    columns = np.flatnonzero(fov.any(axis=0))
    return (columns[-1] - columns[0] + 1) / REFERENCE_FOV_WIDTH


def vessel_response(image: np.ndarray, fov: np.ndarray, radius: float, sigma: float) -> np.ndarray:
    """Normalised black top-hat response of the green channel: large on thin dark structures.

    Args:
        image: ``(H, W, 3)`` RGB in ``[0, 1]``.
        fov: ``(H, W)`` bool field of view (non-empty).
        radius: disk radius in pixels at DRIVE scale.
        sigma: Gaussian pre-smoothing in pixels at DRIVE scale (0: none).

    Returns:
        ``(H, W)`` float64 response divided by its standard deviation inside the FOV; 0 outside the FOV.
    """
    return _top_hat(_smoothed_green(image, fov, sigma), fov, radius)


def _smoothed_green(image: np.ndarray, fov: np.ndarray, sigma: float) -> np.ndarray:
    """The green channel, filled outside the FOV with the nearest retina, smoothed by ``sigma`` at DRIVE scale."""
    green = image[..., 1].astype(np.float64)
    nearest = ndimage.distance_transform_edt(~fov, return_distances=False, return_indices=True)
    green = green[tuple(nearest)]
    if sigma > 0:
        green = ndimage.gaussian_filter(green, sigma * _fov_scale(fov))
    return green


def _top_hat(green: np.ndarray, fov: np.ndarray, radius: float) -> np.ndarray:
    """Black top-hat of ``green`` with a disk of ``radius`` at DRIVE scale, normalised inside the FOV."""
    # The "crosses" decomposition is several times faster than the full disk. It is the exact disk up to radius 12
    # (the default radii, 3 to 11, on a DRIVE-sized field of view); at many larger radii (a wider field of view
    # scales the radius up) it adds pixels on the disk's rim, under 2% of its area up to radius 120, alike in the
    # fit and the evaluation.
    footprint = disk(max(1, round(radius * _fov_scale(fov))), decomposition="crosses")
    response = black_tophat(green, footprint)
    spread = response[fov].std()
    response = response / spread if spread > 0 else response
    response[~fov] = 0.0
    return response


def _dice_per_threshold(response: np.ndarray, case: VesselCase, thresholds: np.ndarray) -> np.ndarray:
    """Dice inside the FOV of ``response >= threshold`` for every threshold at once (from sorted responses)."""
    inside = response[case.fov]
    vessel = np.sort(inside[case.label[case.fov]])
    everything = np.sort(inside)
    predicted = everything.size - np.searchsorted(everything, thresholds, side="left")
    true_positive = vessel.size - np.searchsorted(vessel, thresholds, side="left")
    denominator = predicted + vessel.size
    return np.where(denominator > 0, 2.0 * true_positive / np.maximum(denominator, 1), 1.0)


@dataclass(frozen=True)
class BaselineFit:
    """Outcome of :func:`fit_parameters`.

    Args:
        parameters: the chosen parameters.
        training_fov_dice: their mean per-image Dice inside the FOV on the training images.
        fitted_on: the training images' file names.
    """

    parameters: TopHatParameters
    training_fov_dice: float
    fitted_on: list[str]


def fit_parameters(
    training_cases: Iterable[VesselCase],
    radii: Sequence[int] = DEFAULT_RADII,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> BaselineFit:
    """Choose radius, smoothing and threshold maximising the mean training Dice inside the FOV (grid search).

    Every combination is scored on each image as it streams by, so one image is in memory at a time.

    Args:
        training_cases: the training split only.
        radii: candidate radii at DRIVE scale.
        sigmas: candidate smoothing at DRIVE scale.
        thresholds: candidate thresholds on the normalised response.

    Returns:
        the best combination (ties: the first in sigma, radius, threshold order) and its mean training Dice.

    Raises:
        ValueError: when there are no training cases or a candidate list is empty.
    """
    if not radii or not sigmas or not len(thresholds):
        raise ValueError("fit_parameters needs non-empty radius, sigma and threshold candidates")
    threshold_grid = np.asarray(thresholds, dtype=np.float64)
    dice_sum = np.zeros((len(sigmas), len(radii), len(threshold_grid)), dtype=np.float64)
    fitted_on = []
    for case in training_cases:
        fitted_on.append(case.filename)
        for i, sigma in enumerate(sigmas):
            green = _smoothed_green(case.image, case.fov, sigma)
            for j, radius in enumerate(radii):
                dice_sum[i, j] += _dice_per_threshold(_top_hat(green, case.fov, radius), case, threshold_grid)
    if not fitted_on:
        raise InputError("fit_parameters needs at least one training case")
    mean_dice = dice_sum / len(fitted_on)
    i, j, k = np.unravel_index(int(np.argmax(mean_dice)), mean_dice.shape)
    parameters = TopHatParameters(int(radii[j]), float(sigmas[i]), float(threshold_grid[k]))
    return BaselineFit(parameters, float(mean_dice[i, j, k]), fitted_on)


def predict_probability(response: np.ndarray, fov: np.ndarray, threshold: float) -> np.ndarray:
    """Map a normalised response to probabilities with the threshold at 0.5; background outside the FOV.

    Args:
        response: output of :func:`vessel_response`.
        fov: ``(H, W)`` bool field of view.
        threshold: the fitted threshold.

    Returns:
        ``(H, W)`` float64 probabilities in ``[0, 1]``.
    """
    probability = expit(response - threshold)
    probability[~fov] = 0.0
    return probability


def evaluate_cases(cases: Iterable[VesselCase], parameters: TopHatParameters) -> list[dict[str, Any]]:
    """Segment and evaluate every case with fixed parameters.

    Args:
        cases: the cases to evaluate.
        parameters: fitted parameters.

    Returns:
        one :func:`scripts.metrics.evaluate_case` record per case, with ``filename``, ``dataset`` and ``fov_source``.
    """
    records = []
    for case in cases:
        response = vessel_response(case.image, case.fov, parameters.radius, parameters.sigma)
        probability = predict_probability(response, case.fov, parameters.threshold)
        metrics = evaluate_case(probability[None], case.label[None], case.fov, channel_names=["vessels"])
        records.append({"filename": case.filename, "dataset": case.dataset, "fov_source": case.fov_source, **metrics})
    return records


def run_baseline(
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    split: str = "test",
    radii: Sequence[int] = DEFAULT_RADII,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, Any]:
    """Fit the baseline on the datalist's training split, evaluate it on ``split`` and write the reports.

    Args:
        datalist: vessel datalist JSON with a ``training`` split and ``split``.
        output_dir: folder for the reports (``baseline_per_image.csv``, ``baseline_summary.json`` and ``.csv``); an
            earlier baseline's reports there are moved to ``earlier_evaluations/<time>/`` first, with a warning.
        split: the evaluated split; must not be ``"training"`` (the parameters are fitted there).
        radii: candidate radii at DRIVE scale.
        sigmas: candidate smoothing at DRIVE scale.
        thresholds: candidate thresholds on the normalised response.

    Returns:
        ``{"summary": ..., "metadata": ..., "paths": ..., "left_out": ..., "earlier_reports": ...}``: what was
        written, the evaluated images that could not be used (``{image: why}``), named in the log and passed over so
        that the fit and the other images' figures are kept, and where an earlier baseline's reports were moved
        (None when there were none).

    Raises:
        ValueError: when ``split`` is the training split, on datalist problems or a training image that cannot be
            used (see :func:`iter_cases`), or when no image of ``split`` can be (nothing is written then).
    """
    if split == "training":
        raise ConfigError("the baseline is fitted on the training split; evaluate it on another split (--split)")
    # The evaluated split's list and files are checked before the fit, which takes minutes; its pixels are read only
    # once the parameters are fixed.
    load_split(datalist, split)
    started = time.monotonic()
    fit = fit_parameters(iter_cases(datalist, "training"), radii, sigmas, thresholds)
    logger.info("fitted on %d training images: %s", len(fit.fitted_on), fit.parameters)
    logger.info("training FOV Dice %.4f", fit.training_fov_dice)
    # The evaluated split is read only now that the parameters are fixed. An image that cannot be used then is left
    # out: stopping there would lose the fit, minutes of work, and the other images' figures.
    left_out: dict[str, str] = {}
    records = evaluate_cases(iter_cases(datalist, split, left_out), fit.parameters)
    if not records:
        image, why = next(iter(left_out.items()))
        raise InputError(f"no image of split '{split}' of {datalist} could be used (e.g. {image}: {why})")
    summary = summarise(records)
    metadata = {
        "method": "green-channel black top-hat, normalised by its FOV standard deviation, thresholded",
        "parameters": asdict(fit.parameters),
        "parameter_units": "radius and sigma in pixels at a 540-pixel-wide FOV, scaled per image with its FOV width",
        "selection": "grid search maximising the mean per-image Dice inside the FOV on the training split",
        "training_fov_dice": fit.training_fov_dice,
        "fitted_on": fit.fitted_on,
        "candidates": {"radius": list(radii), "sigma": list(sigmas), "threshold": list(thresholds)},
        "datalist": str(Path(datalist).absolute()),
        "evaluated_split": split,
        "left_out": left_out,
        "seconds": round(time.monotonic() - started, 1),
    }
    # Only now, with reports to write, as tools.score: an earlier baseline's reports are moved aside, never replaced,
    # and stay where they were when this run fails before (a datalist problem, no usable image).
    earlier = keep_earlier_evaluation(output_dir, tuple(report_names(REPORT_PREFIX).values()))
    paths = write_reports(records, summary, output_dir, prefix=REPORT_PREFIX, metadata=metadata)
    logger.info("baseline on %s split:\n%s", split, format_summary_table(summary))
    if left_out:
        logger.error(
            "%d of the %d images of split '%s' were left out (named above): the reports cover the others",
            len(left_out),
            len(left_out) + len(records),
            split,
        )
    return {"summary": summary, "metadata": metadata, "paths": paths, "left_out": left_out, "earlier_reports": earlier}


def _radius(text: str) -> int:
    """A ``--radii`` value: a radius of 0 or less was a disk of radius 1 (:func:`_top_hat`), fitted without a word."""
    try:
        radius: int | None = int(text)
    except ValueError:
        radius = None
    if radius is None or radius < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a disk radius is a whole number of pixels, at least 1")
    return radius


def _sigma(text: str) -> float:
    """A ``--sigmas`` value: 0 (none) or a finite width; a negative or NaN one was no smoothing (:func:`_smoothed_green`)
    without a word."""
    try:
        sigma = float(text)
    except ValueError:
        sigma = math.nan
    if not math.isfinite(sigma) or sigma < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a smoothing is 0 (none) or a positive number of pixels")
    return sigma


def _parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.baseline",
        description="Fit a green-channel top-hat vessel baseline on the training split and evaluate it.",
    )
    parser.add_argument("--datalist", required=True, type=path_argument, help="vessel datalist JSON (MONAI format)")
    parser.add_argument("--output", required=True, type=path_argument, help="folder for the reports")
    parser.add_argument("--split", default="test", help="evaluated split (default: test)")
    parser.add_argument("--radii", type=_radius, nargs="+", default=list(DEFAULT_RADII), help="candidate disk radii")
    parser.add_argument("--sigmas", type=_sigma, nargs="+", default=list(DEFAULT_SIGMAS), help="candidate smoothing")
    return parser.parse_args(argv)


@command_line
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        0 when every evaluated image was used; 1 when some were left out (the others are evaluated and reported) or
        the datalist, images or output folder are unusable (the error is printed in one line); 2 for a bad option.
    """
    arguments = _parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_baseline(arguments.datalist, arguments.output, arguments.split, arguments.radii, arguments.sigmas)
    logger.info("reports: %s", ", ".join(str(path) for path in result["paths"].values()))
    return 1 if result["left_out"] else 0


if __name__ == "__main__":
    sys.exit(main())

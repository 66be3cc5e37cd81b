"""Evaluation of fundus segmentations: per-image metrics, per-dataset summaries and reports.

Every metric is computed per image, per channel (``"vessels"``, or ``"disc"`` and ``"cup"``), in two regions:

- ``"fov"``: only the pixels inside the field-of-view mask, the field's convention for DRIVE, CHASE_DB1, STARE...;
- ``"image"``: every pixel of the image, the convention of the SAM2LoRA paper (no FOV mask).

Mixing the two is the main inconsistency across published vessel results (the dark border outside the FOV is a
large, easy true negative that inflates accuracy and specificity), so both are always reported side by side.

Predictions are probabilities binarised with ``prob >= threshold`` in float32 (as MONAI's ``AsDiscrete(threshold=...)``
and the written masks: :func:`scripts.masks.binarise`). The
metrics, their MONAI implementation and their conventions for degenerate cases (an empty label and/or an empty
prediction inside the region):

============  =========================================================  ==========================================
key           computed by                                                degenerate cases
============  =========================================================  ==========================================
dice          ``compute_confusion_matrix_metric("f1 score")``            1 when label and prediction are both empty
iou           ``compute_confusion_matrix_metric("threat score")``        1 when label and prediction are both empty
auc           rank statistic equal to MONAI's ``compute_roc_auc``        NaN when the label has one class only
sensitivity   ``compute_confusion_matrix_metric("sensitivity")``         NaN when the label is empty
specificity   ``compute_confusion_matrix_metric("specificity")``         NaN when the label fills the region
accuracy      ``compute_confusion_matrix_metric("accuracy")``            always defined
precision     ``compute_confusion_matrix_metric("precision")``           0 when the prediction is empty and the
                                                                         label is not; NaN when both are empty
mcc           ``compute_confusion_matrix_metric("mcc")``                 0 when the prediction is constant and the
                                                                         label is not; NaN when the label is constant
hd95          as ``compute_hausdorff_distance(percentile=95)``, pixels   0 when both are empty; NaN when exactly
                                                                         one is empty (no distance to nothing)
cldice        here (Shit et al., CVPR 2021), only with ``topology``      1 when both are empty; 0 when one is
============  =========================================================  ==========================================

The confusion matrix is counted over the region's pixels only (MONAI's ``get_confusion_matrix`` counts every pixel).
For the FOV region, HD95 compares the prediction and the label cut to the FOV, and clDice intersects the skeletons of
the whole-image masks with the FOV (skeletonising the cut masks would invent skeleton branches at the FOV border).

Summaries average over images (each image weighs the same) and ignore undefined (NaN) values, reporting how many
there were: a mean HD95 over the images where it is defined says nothing about images where a structure was missed
entirely, so read it together with its NaN count.

The field of view is the dataset's mask where the datalist gives one, else estimated from the photograph (when it is
read, or by ``tools.prepare`` for a dataset distributed without masks: :func:`entry_fov_source`); each record says
which (``fov_source``: ``"given"`` or ``"estimated"``), and each summary group counts them: FOV metrics over
estimated fields of view are not those of the dataset's published protocol.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics.confusion_matrix import compute_confusion_matrix_metric
from scipy import ndimage
from scipy.spatial import KDTree
from skimage.morphology import skeletonize

from scripts.acceleration import usable_cores
from scripts.atomic import OutputError, write_text_atomic
from scripts.masks import binarise, bounding_slices

__all__ = [
    "FORMULA_STARTS",
    "FOV_SOURCES",
    "METRICS",
    "METRIC_UNITS",
    "REGIONS",
    "ReportWriteError",
    "csv_text",
    "empty_fov_problem",
    "entry_fov_source",
    "evaluate_case",
    "format_summary_table",
    "json_safe",
    "report_names",
    "summarise",
    "write_reports",
]

REGIONS = ("fov", "image")
"""Region names, in report order: inside the field of view, and the whole image."""

METRICS = ("dice", "iou", "auc", "sensitivity", "specificity", "accuracy", "precision", "mcc", "hd95", "cldice")
"""Metric names, in report order. ``cldice`` is only computed with ``topology=True``."""

METRIC_UNITS = {"hd95": "px"}
"""Units of the metrics that have one (pixels of the photograph as evaluated); the others are ratios. The reports'
CSV headers and table say them (``vessels/fov/hd95 [px]``), as the measurement reports do."""

IDENTITY_COLUMNS = ("filename", "dataset", "fov_source")
"""Record fields that identify an image rather than measure it; every other ``a/b/c`` field is a metric."""

FOV_SOURCES = ("given", "estimated")
"""Where an image's field of view came from: the dataset's mask, or :func:`scripts.fundus_io.estimate_fov`."""

UNKNOWN_DATASET = "unknown"

_RESAMPLING_ROUNDING = 1e-6

# Our metric names mapped to MONAI's confusion-matrix metric names.
_CONFUSION_MATRIX_METRICS = {
    "dice": "f1 score",
    "iou": "threat score",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "accuracy": "accuracy",
    "precision": "precision",
    "mcc": "matthews correlation coefficient",
}


class ReportWriteError(OutputError):
    """The evaluation reports cannot be written into the requested output folder."""


def entry_fov_source(entry: Mapping[str, Any]) -> str:
    """Where a datalist entry's field of view comes from (one of :data:`FOV_SOURCES`).

    Estimated when the entry names no mask (it is estimated from the photograph as it is read), or when it names one
    that ``tools.prepare`` estimated for a dataset distributed without (its ``"fov_source"`` says so); given
    otherwise.
    """
    if not entry.get("fov") or entry.get("fov_source") == FOV_SOURCES[1]:
        return FOV_SOURCES[1]
    return FOV_SOURCES[0]


def empty_fov_problem(fov: np.ndarray, path: str | os.PathLike) -> str | None:
    """Why a field-of-view mask read from a file cannot be scored, or None when it can.

    A mask without a pixel inside leaves nothing to measure in the ``"fov"`` region (:func:`evaluate_case` refuses it)
    and no width to scale a filter by. The tools that read a datalist's masks (``tools.score``, ``tools.baseline``)
    ask this as they read one, so that the message names the file.

    Args:
        fov: ``(H, W)`` bool field of view, as :func:`scripts.fundus_io.read_label_mask` reads it.
        path: the mask's file.

    Returns:
        what is wrong, naming the file; None for a mask with a pixel inside.
    """
    if fov.any():
        return None
    return (
        f"field-of-view mask {path} is empty (no pixel inside): nothing to score inside the field of view; a mask is "
        "0 outside and 255 (or 1) inside, or set the entry's fov to null to estimate it from the photograph"
    )


def _map_on_cores(function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[function(item) for item in items]``, the items shared among threads, one per usable core.

    The per-channel metrics are numpy, scipy and scikit-image work that releases the GIL, and an evaluation over
    prompt modes scores every mode as a channel: on a GPU machine they, not the network, set the evaluation's pace.
    """
    threads = min(len(items), usable_cores())
    if threads < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fundus-metrics") as pool:
        return list(pool.map(function, items))


def _to_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy array from an array or a (possibly CUDA, possibly MetaTensor) tensor."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
        # numpy has no bfloat16 (mixed-precision outputs); both half precisions are exact in float32.
        return (tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor).numpy()
    return np.asarray(array)


def _channel_first(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` as ``(C, H, W)``; a single ``(H, W)`` plane becomes one channel."""
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"{name} must be (C, H, W) or (H, W), got shape {array.shape}")
    return array


def _as_binary(array: np.ndarray, name: str) -> np.ndarray:
    """A 0/1 (or bool) mask as bool; any other value is an error rather than silently thresholded."""
    if array.dtype == np.bool_:
        return array
    if not np.all((array == 0) | (array == 1)):
        found = np.unique(array)[:6].tolist()
        raise ValueError(f"{name} must hold only 0 and 1 (or bool), found values {found}")
    return array.astype(bool)


def _confusion_matrix(pred: np.ndarray, label: np.ndarray, region: np.ndarray | None) -> torch.Tensor:
    """Per-channel ``[tp, fp, tn, fn]`` counted over the region's pixels, as MONAI's ``(C, 4)`` float64 layout.

    Args:
        pred: ``(C, H, W)`` bool prediction.
        label: ``(C, H, W)`` bool label.
        region: ``(H, W)`` bool region, or None for every pixel.

    Returns:
        ``(C, 4)`` float64 tensor of pixel counts.
    """
    if region is not None:
        pred = pred[:, region]
        label = label[:, region]
    pixels = pred[0].size
    axes = tuple(range(1, pred.ndim))
    tp = np.count_nonzero(pred & label, axis=axes)
    fp = np.count_nonzero(pred, axis=axes) - tp
    fn = np.count_nonzero(label, axis=axes) - tp
    tn = pixels - tp - fp - fn
    return torch.from_numpy(np.stack([tp, fp, tn, fn], axis=-1).astype(np.float64))


def _roc_auc(prob: np.ndarray, label: np.ndarray) -> float:
    """Exact ROC AUC of one channel's probabilities against its label; NaN when the label has a single class.

    The value is the Mann-Whitney statistic (ties count one half), exactly what MONAI's ``compute_roc_auc`` returns:
    for each positive pixel, the negatives below it plus half those equal to it, found by binary search in the
    sorted negatives. MONAI's implementation walks the sorted pixels in a Python loop, about 0.25 s per DRIVE image
    and region, and ranking all pixels (scipy's ``rankdata``) took 2.6 times this one sort: the AUC is computed
    per channel, region and prompt mode of every image. ``tests/test_metrics.py`` checks it against MONAI and
    scikit-learn, ties included.
    """
    label = np.asarray(label, dtype=bool)
    positives, negatives = prob[label], np.sort(prob[~label])
    if positives.size == 0 or negatives.size == 0:
        return math.nan
    below = np.searchsorted(negatives, positives, side="left").sum(dtype=np.float64)
    below_or_tied = np.searchsorted(negatives, positives, side="right").sum(dtype=np.float64)
    return float((below + below_or_tied) / 2.0 / (float(positives.size) * float(negatives.size)))


def _hd95(pred: np.ndarray, label: np.ndarray, workers: int = -1) -> float:
    """Symmetric 95th-percentile Hausdorff distance in pixels between two ``(H, W)`` bool masks.

    MONAI's ``compute_hausdorff_distance(percentile=95)`` computed here in numpy: boundary pixels are those that
    scipy's erosion removes (what lies outside the picture counts as background), each boundary's distances to the
    other's nearest boundary pixel come from a KD-tree (queried on ``workers`` threads), and the larger of the two 95th
    percentiles is the result. MONAI finds the same boundaries after whole-picture tensor passes (bounding box,
    padding) that took 0.2 s a call at 1024 px, more than the distances, and HD95 is computed per channel, region and
    prompt mode of every image. ``tests/test_metrics.py`` checks it against MONAI. ``workers``: the KD-tree
    queries' threads (-1: every core).
    """
    pred_empty, label_empty = not pred.any(), not label.any()
    if pred_empty and label_empty:
        return 0.0
    if pred_empty or label_empty:
        return math.nan
    window = bounding_slices(pred | label)
    pred_boundary, label_boundary = (
        np.argwhere(mask ^ ndimage.binary_erosion(mask)).astype(np.float64) for mask in (pred[window], label[window])
    )
    to_label = KDTree(label_boundary, leafsize=32).query(pred_boundary, k=1, workers=workers)[0]
    to_pred = KDTree(pred_boundary, leafsize=32).query(label_boundary, k=1, workers=workers)[0]
    return float(max(np.quantile(to_label, 0.95), np.quantile(to_pred, 0.95)))


def _cldice(
    pred: np.ndarray,
    label: np.ndarray,
    pred_skeleton: np.ndarray,
    label_skeleton: np.ndarray,
    region: np.ndarray | None,
) -> float:
    """Centerline Dice (Shit et al., CVPR 2021) of one channel, restricted to a region.

    Topology precision is the fraction of the prediction's skeleton lying on the label, topology sensitivity the
    fraction of the label's skeleton covered by the prediction; clDice is their harmonic mean.

    Args:
        pred: ``(H, W)`` bool prediction.
        label: ``(H, W)`` bool label.
        pred_skeleton: skeleton of the whole-image ``pred``.
        label_skeleton: skeleton of the whole-image ``label``.
        region: ``(H, W)`` bool region, or None for every pixel.

    Returns:
        clDice in ``[0, 1]``: 1 when neither skeleton reaches into the region, 0 when only one does.
    """
    if region is not None:
        pred_skeleton = pred_skeleton & region
        label_skeleton = label_skeleton & region
    pred_length = np.count_nonzero(pred_skeleton)
    label_length = np.count_nonzero(label_skeleton)
    if pred_length == 0 and label_length == 0:
        return 1.0
    if pred_length == 0 or label_length == 0:
        return 0.0
    topology_precision = np.count_nonzero(pred_skeleton & label) / pred_length
    topology_sensitivity = np.count_nonzero(label_skeleton & pred) / label_length
    if topology_precision + topology_sensitivity == 0:
        return 0.0
    return float(2.0 * topology_precision * topology_sensitivity / (topology_precision + topology_sensitivity))


def evaluate_case(
    prob: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    fov: np.ndarray | torch.Tensor | None = None,
    channel_names: Sequence[str] = ("vessels",),
    threshold: float = 0.5,
    topology: bool = True,
) -> dict[str, float]:
    """Compute every metric of one image, per channel, inside the FOV and over the whole image.

    Args:
        prob: ``(C, H, W)`` (or ``(H, W)``) foreground probabilities in ``[0, 1]``, e.g. after a sigmoid.
        label: ``(C, H, W)`` (or ``(H, W)``) reference masks holding 0 and 1 (or bool).
        fov: ``(1, H, W)`` or ``(H, W)`` field-of-view mask holding 0 and 1 (or bool); None when the dataset has
            none, in which case only the whole-image region is reported.
        channel_names: one name per channel, e.g. ``["vessels"]`` or ``["disc", "cup"]``; they prefix the keys.
        threshold: probabilities ``>= threshold`` are foreground.
        topology: also compute clDice (meant for vessels; it costs a skeletonisation per channel).

    Returns:
        flat record ``{"<channel>/<region>/<metric>": value}`` of Python floats, regions and metrics in the order of
        :data:`REGIONS` and :data:`METRICS`; undefined values are NaN (see the module docstring).

    Raises:
        ValueError: on mismatched shapes, probabilities outside ``[0, 1]`` or non-finite, non-binary masks, an
            empty FOV, or channel names that are not one unique, ``/``-free name per channel.
    """
    # The AUC sorts the probabilities as given (float32 sorts faster, and widening them keeps order and ties); the
    # other metrics compare them with the threshold in float64.
    prob_given = _channel_first(_to_numpy(prob), "prob")
    prob_array = prob_given.astype(np.float64, copy=False)
    label_mask = _as_binary(_channel_first(_to_numpy(label), "label"), "label")
    if prob_array.shape != label_mask.shape:
        raise ValueError(f"prob and label shapes differ: {prob_array.shape} and {label_mask.shape}")
    if not np.all(np.isfinite(prob_array)):
        raise ValueError("prob must hold probabilities in [0, 1], found NaN or infinite values")
    lowest, highest = prob_array.min(), prob_array.max()
    if lowest < -_RESAMPLING_ROUNDING or highest > 1.0 + _RESAMPLING_ROUNDING:
        raise ValueError(
            f"prob must hold probabilities in [0, 1] (apply the sigmoid first), found range [{lowest}, {highest}]"
        )
    if lowest < 0.0 or highest > 1.0:
        # Resampled back to a photograph's size, probabilities can end a rounding step outside [0, 1]: they are the
        # bound's, which they would otherwise not tie with in the AUC's ranking.
        prob_given = np.clip(prob_given, 0, 1)
        prob_array = prob_given.astype(np.float64, copy=False)
    names = list(channel_names)
    if len(names) != prob_array.shape[0] or len(set(names)) != len(names) or any("/" in n or not n for n in names):
        raise ValueError(
            f"channel_names must give one unique, non-empty name without '/' per channel "
            f"({prob_array.shape[0]} channels), got {names}"
        )

    regions: dict[str, np.ndarray | None] = {}
    if fov is not None:
        fov_array = _to_numpy(fov)
        if fov_array.ndim == 3 and fov_array.shape[0] == 1:
            fov_array = fov_array[0]
        fov_mask = _as_binary(fov_array, "fov")
        if fov_mask.shape != prob_array.shape[1:]:
            raise ValueError(f"fov shape {fov_mask.shape} does not match the image size {prob_array.shape[1:]}")
        if not fov_mask.any():
            raise ValueError("fov mask is empty: no pixel to evaluate inside the field of view")
        regions["fov"] = fov_mask
    regions["image"] = None

    pred_mask = binarise(prob_array, threshold)
    channels = range(len(names))
    if topology:  # one pool for both: a single channel's two skeletons also run side by side
        # skimage's default thinning (Zhang's), as clDice's authors use it; the measurements thin by Lee's method.
        skeletons = _map_on_cores(skeletonize, [*pred_mask, *label_mask])
        pred_skeletons, label_skeletons = skeletons[: len(names)], skeletons[len(names) :]

    per_region: dict[str, list[dict[str, float]]] = {}
    for region_name, region in regions.items():
        counts = _confusion_matrix(pred_mask, label_mask, region)
        from_counts = {
            metric: compute_confusion_matrix_metric(monai_name, counts)
            for metric, monai_name in _CONFUSION_MATRIX_METRICS.items()
        }
        per_region[region_name] = []
        for channel in channels:
            values = {metric: float(per_channel[channel]) for metric, per_channel in from_counts.items()}
            tp, fp, tn, fn = counts[channel].tolist()
            if tp + fp + fn == 0:
                # Nothing to find and nothing found: perfect overlap, where MONAI's ratio would be 0/0.
                values["dice"] = values["iou"] = 1.0
            # A structure missed entirely scores 0 (scikit-learn's value) where MONAI's ratio is 0/0: as NaN it
            # would be left out of the means, and a model that misses structures would read better than one that
            # finds them badly.
            if tp + fp == 0 and tp + fn > 0:
                values["precision"] = 0.0
            if tp + fn > 0 and tn + fp > 0 and (tp + fp == 0 or tn + fn == 0):
                values["mcc"] = 0.0  # a reference of both classes against a constant prediction
            per_region[region_name].append(values)

    jobs = [(region_name, channel) for region_name in regions for channel in channels]
    kd_tree_workers = max(1, usable_cores() // len(jobs))  # the cores the jobs leave to each KD-tree query

    def costly_metrics(job: tuple[str, int]) -> dict[str, float]:
        """AUC, HD95 and clDice of one channel in one region: the metrics that sort, search or skeletonise."""
        region_name, channel = job
        region = regions[region_name]
        pred_c, label_c = pred_mask[channel], label_mask[channel]
        if region is None:
            values = {
                "auc": _roc_auc(prob_given[channel].ravel(), label_c.ravel()),
                "hd95": _hd95(pred_c, label_c, kd_tree_workers),
            }
        else:
            values = {
                "auc": _roc_auc(prob_given[channel][region], label_c[region]),
                "hd95": _hd95(pred_c & region, label_c & region, kd_tree_workers),
            }
        if topology:
            values["cldice"] = _cldice(pred_c, label_c, pred_skeletons[channel], label_skeletons[channel], region)
        return values

    for (region_name, channel), values in zip(jobs, _map_on_cores(costly_metrics, jobs)):
        per_region[region_name][channel].update(values)

    return {
        f"{name}/{region_name}/{metric}": per_region[region_name][channel][metric]
        for channel, name in enumerate(names)
        for region_name in REGIONS
        if region_name in per_region
        for metric in METRICS
        if metric in per_region[region_name][channel]
    }


def _metric_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Metric keys (``channel/region/metric``) of all records, in first-seen order."""
    keys: dict[str, None] = {}
    for record in records:
        for key in record:
            if key not in IDENTITY_COLUMNS and key.count("/") == 2:
                keys.setdefault(key)
    return list(keys)


def _with_unit(name: str) -> str:
    """A metric's name or ``a/b/metric`` key with its unit where it has one: ``vessels/fov/hd95 [px]``."""
    unit = METRIC_UNITS.get(name.rsplit("/", 1)[-1])
    return f"{name} [{unit}]" if unit else name


def _describe(values: list[float]) -> dict[str, float | int]:
    """Mean and population standard deviation of the finite values, with counts of used and undefined values."""
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    return {
        "mean": float(finite.mean()) if finite.size else math.nan,
        "std": float(finite.std()) if finite.size else math.nan,
        "n": int(finite.size),
        "nan": int(array.size - finite.size),
    }


def _summarise_group(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """The image count, the count of each field-of-view source and per-metric statistics of one group of records."""
    metrics = {}
    for key in keys:
        values = [float(record[key]) for record in records if key in record]
        if values:
            metrics[key] = _describe(values)
    fov_sources = {source: sum(record.get("fov_source") == source for record in records) for source in FOV_SOURCES}
    return {"images": len(records), "fov_sources": fov_sources, "metrics": metrics}


def summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Average per-image records per dataset and over all images.

    Args:
        records: records from :func:`evaluate_case`, each optionally with ``"dataset"`` (missing: ``"unknown"``),
            ``"filename"`` and ``"fov_source"`` (one of :data:`FOV_SOURCES`).

    Returns:
        ``{"all": group, "datasets": {name: group}}`` where each group is ``{"images": count, "fov_sources":
        {"given": count, "estimated": count}, "metrics": {key: {"mean", "std", "n", "nan"}}}`` (an image without a
        field of view counts in neither source): mean and population standard deviation over the images where the value is
        defined (``n`` of them), ``nan`` counting the images where it is not. ``"all"`` pools the images of every
        dataset (each image weighs the same, so larger datasets weigh more). A metric missing from a record (e.g.
        FOV metrics for a dataset without FOV masks) is not counted at all.
    """
    keys = _metric_keys(records)
    by_dataset: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_dataset.setdefault(str(record.get("dataset", UNKNOWN_DATASET)), []).append(record)
    return {
        "all": _summarise_group(records, keys),
        "datasets": {name: _summarise_group(group, keys) for name, group in sorted(by_dataset.items())},
    }


def _format_statistic(statistic: Mapping[str, float | int] | None) -> str:
    """``mean±std`` with four decimals, ``-`` where no value is defined."""
    if statistic is None or not statistic["n"]:
        return "-"
    return f"{statistic['mean']:.4f}±{statistic['std']:.4f}"


def format_summary_table(summary: Mapping[str, Any]) -> str:
    """A fixed-width text table of a summary, for logs: one row per dataset, channel and region, mean±std per metric.

    Undefined values that were left out of a mean, and groups with estimated fields of view, are listed below the
    table.

    Args:
        summary: output of :func:`summarise`.

    Returns:
        the table as one multi-line string.
    """
    groups = list(summary["datasets"].items())
    if len(groups) != 1:
        groups.append(("all", summary["all"]))
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    estimates: list[str] = []
    for group_name, group in groups:
        metrics = group["metrics"]
        prefixes = list(dict.fromkeys(key.rsplit("/", 1)[0] for key in metrics))
        for prefix in prefixes:
            channel, region = prefix.split("/")
            cells = [_format_statistic(metrics.get(f"{prefix}/{metric}")) for metric in METRICS]
            # The images this row measured: FOV rows leave out those without a field of view.
            images = max(s["n"] + s["nan"] for key, s in metrics.items() if key.rsplit("/", 1)[0] == prefix)
            rows.append((group_name, channel, region, str(images), *cells))
        for key, statistic in metrics.items():
            if statistic["nan"]:
                notes.append(f"{group_name} {key}: {statistic['nan']} of {statistic['n'] + statistic['nan']} undefined")
        estimated = group.get("fov_sources", {}).get("estimated", 0)
        if estimated:
            estimates.append(f"{group_name}: {estimated} of {group['images']}")
    header = ("dataset", "channel", "region", "images", *map(_with_unit, METRICS))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if notes:
        lines.append("undefined values (left out of the means): " + "; ".join(notes))
    if estimates:
        lines.append("fields of view estimated from the photograph (no FOV mask in the datalist): " + "; ".join(estimates))
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf as None (strict JSON has no NaN), and paths, numpy scalars and arrays as plain types."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""The first characters that make a spreadsheet (Excel, LibreOffice, Google Sheets) read a text cell as a formula."""


def csv_text(rows: Sequence[Sequence[Any]]) -> str:
    """Rows as CSV text, NaN written as ``nan``, text that a spreadsheet would run as a formula kept as text.

    Image and dataset names come from users' folders: a photograph named ``=HYPERLINK(...).png`` or ``@SUM(A1).png``
    would otherwise run as a formula when the report is opened in a spreadsheet (CSV injection). Such text cells get a
    leading apostrophe, as OWASP advises, which spreadsheets show as text; numbers, negative ones included, are
    written as they are.

    Args:
        rows: the rows, the header included.

    Returns:
        The CSV text, one ``\\n``-terminated line per row.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for row in rows:
        writer.writerow([_csv_cell(value) for value in row])
    return buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    """One cell of :func:`csv_text`."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def report_names(prefix: str = "metrics") -> dict[str, str]:
    """The file names :func:`write_reports` gives its reports.

    Args:
        prefix: file name prefix.

    Returns:
        ``{"per_image_csv": name, "summary_json": name, "summary_csv": name}``.
    """
    return {
        "per_image_csv": f"{prefix}_per_image.csv",
        "summary_json": f"{prefix}_summary.json",
        "summary_csv": f"{prefix}_summary.csv",
    }


def write_reports(
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    output_dir: str | os.PathLike,
    prefix: str = "metrics",
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the per-image CSV, the summary JSON and the summary CSV, each atomically.

    Args:
        records: per-image records (metrics plus ``"filename"`` and ``"dataset"``), one CSV row each.
        summary: output of :func:`summarise`.
        output_dir: destination folder, created when missing.
        prefix: file name prefix.
        metadata: extra JSON-serialisable information (e.g. the parameters that produced the predictions), stored
            under ``"metadata"`` in the summary JSON.

    Returns:
        ``{"per_image_csv": path, "summary_json": path, "summary_csv": path}``.

    Raises:
        ReportWriteError: when ``output_dir`` cannot be created or written; the message names the folder.
    """
    folder = Path(output_dir)
    keys = _metric_keys(records)
    per_image = [list(IDENTITY_COLUMNS) + [_with_unit(key) for key in keys]]
    for record in records:
        per_image.append([record.get(c, "") for c in IDENTITY_COLUMNS] + [record.get(k, "") for k in keys])
    summary_rows: list[list[Any]] = [["dataset", "channel", "region", "metric", "unit", "mean", "std", "n", "nan"]]
    for group_name, group in [*summary["datasets"].items(), ("all", summary["all"])]:
        for key, statistic in group["metrics"].items():
            channel, region, metric = key.split("/")
            summary_rows.append(
                [group_name, channel, region, metric, METRIC_UNITS.get(metric, ""),
                 *(statistic[s] for s in ("mean", "std", "n", "nan"))]
            )
    document = {"summary": summary, "units": METRIC_UNITS, "metadata": dict(metadata or {})}
    paths = {key: folder / name for key, name in report_names(prefix).items()}
    texts = {
        "per_image_csv": csv_text(per_image),
        "summary_json": json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n",
        "summary_csv": csv_text(summary_rows),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, path in paths.items():
            write_text_atomic(path, texts[name])
    except OSError as error:
        reason = error.strerror or str(error)
        raise ReportWriteError(f"cannot write evaluation reports into folder {folder}: {reason}") from error
    return paths

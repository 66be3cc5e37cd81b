"""Charts and pictures of training and evaluation runs: curves, per-dataset bar charts, error overlays.

The handlers in :mod:`scripts.handlers` decide when to draw; these functions draw. Charts use matplotlib's headless
``Agg`` backend and are written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot's import

import matplotlib.pyplot as plt
import numpy as np

from scripts.atomic import atomic_path

__all__ = ["overlay_errors", "plot_bland_altman", "plot_dataset_metrics", "plot_training_curves"]

AGREEMENT, FALSE_POSITIVE, MISSED = (0.1, 0.85, 0.1), (0.95, 0.1, 0.1), (0.15, 0.35, 1.0)


def _save_figure(figure: plt.Figure, path: Path) -> None:
    # Closed even when the write fails: pyplot keeps every open figure, and a run draws charts every epoch.
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=100)
    finally:
        plt.close(figure)


def _smoothed(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Training loss and learning rate per iteration and validation metrics per epoch, in one PNG.

    Args:
        records: ``training_log.jsonl`` records: ``{"kind": "train", "iteration", "loss", "lr"}`` and
            ``{"kind": "validation", "epoch", "metrics": {name: value}}``.
        path: the PNG to write (atomically).

    Returns:
        ``path``.
    """
    train = [r for r in records if r.get("kind") == "train"]
    validation = [r for r in records if r.get("kind") == "validation"]
    figure, (loss_axis, lr_axis, metric_axis) = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        iterations = np.array([r["iteration"] for r in train])
        losses = np.array([r["loss"] for r in train], dtype=float)
        loss_axis.plot(iterations, losses, color="0.75", linewidth=0.8, label="per iteration")
        window = max(1, len(losses) // 50)
        if window > 1:
            loss_axis.plot(iterations[window - 1 :], _smoothed(losses, window), label=f"mean of {window}")
        loss_axis.legend()
        lr_axis.plot(iterations, [r["lr"] for r in train])
    for name in sorted({key for r in validation for key in r["metrics"]}):
        points = [(r["epoch"], r["metrics"][name]) for r in validation if name in r["metrics"]]
        metric_axis.plot(*zip(*points), marker="o", label=name)
    if validation:
        metric_axis.legend()
    for axis, title, xlabel in (
        (loss_axis, "training loss", "iteration"),
        (lr_axis, "learning rate", "iteration"),
        (metric_axis, "validation", "epoch"),
    ):
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    _save_figure(figure, Path(path))
    return Path(path)


def plot_dataset_metrics(
    values: Mapping[str, Mapping[str, float | None]],
    path: str | os.PathLike,
    title: str,
    counts: Mapping[str, int] | None = None,
) -> Path:
    """A grouped bar chart: one group per dataset, one bar per metric (or channel).

    Args:
        values: dataset name to ``{metric name: value}``; NaN and None values (a mean that is undefined, which
            ``metrics_summary.json`` writes as null) are left out, their bar labelled "n/a".
        path: the PNG to write (atomically).
        title: the chart's title.
        counts: dataset name to its number of images, shown under the name.

    Returns:
        ``path``.
    """
    datasets = sorted(values)
    names = sorted({name for metrics in values.values() for name in metrics})
    figure, axis = plt.subplots(figsize=(max(5.0, 1.2 * len(datasets) * max(1, len(names)) + 2), 4))
    width = 0.8 / max(1, len(names))
    for index, name in enumerate(names):
        heights = [math.nan if (value := values[d].get(name)) is None else float(value) for d in datasets]
        positions = np.arange(len(datasets)) + (index - (len(names) - 1) / 2) * width
        bars = axis.bar(positions, np.nan_to_num(heights), width, label=name)
        axis.bar_label(bars, labels=[f"{h:.3f}" if not math.isnan(h) else "n/a" for h in heights], fontsize=8)
    labels = [f"{d}\n({counts[d]} images)" if counts and d in counts else d for d in datasets]
    axis.set_xticks(np.arange(len(datasets)), labels)
    axis.set_ylim(0, 1.05)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    if len(names) > 1:
        axis.legend()
    figure.tight_layout()
    _save_figure(figure, Path(path))
    return Path(path)


def overlay_errors(image: np.ndarray, prediction: np.ndarray, label: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """The image with agreement, false positives and misses coloured (green, red, blue), channels merged.

    Args:
        image: (3, H, W) RGB in [0, 1].
        prediction: (C, H, W) binary prediction.
        label: (C, H, W) binary label.
        opacity: weight of the colours over the image.

    Returns:
        (H, W, 3) float RGB in [0, 1].
    """
    picture = np.clip(np.moveaxis(np.asarray(image, dtype=np.float32), 0, -1), 0, 1).copy()
    predicted, truth = np.asarray(prediction).astype(bool), np.asarray(label).astype(bool)
    # Later channels are drawn over earlier ones (the cup over the disc).
    for channel_prediction, channel_truth in zip(predicted, truth):
        for mask, colour in (
            (channel_prediction & channel_truth, AGREEMENT),
            (channel_prediction & ~channel_truth, FALSE_POSITIVE),
            (~channel_prediction & channel_truth, MISSED),
        ):
            picture[mask] = (1 - opacity) * picture[mask] + opacity * np.asarray(colour, dtype=np.float32)
    return np.clip(picture, 0, 1)


def plot_bland_altman(
    reference: Sequence[float], predicted: Sequence[float], path: str | os.PathLike, title: str, unit: str = ""
) -> Path:
    """A Bland–Altman plot: the difference (predicted - reference) against the mean of the two, per image, with the
    mean difference (bias) and the 95% limits of agreement (bias ± 1.96 SD).

    Args:
        reference: the measure on the reference masks.
        predicted: the same measure on the predictions, in the same order.
        path: the PNG to write (atomically).
        title: the chart's title (the measure).
        unit: the measure's unit, for the axes.

    Returns:
        ``path``.
    """
    reference, predicted = np.asarray(reference, dtype=float), np.asarray(predicted, dtype=float)
    defined = np.isfinite(reference) & np.isfinite(predicted)
    mean = (reference[defined] + predicted[defined]) / 2
    difference = predicted[defined] - reference[defined]
    figure, axis = plt.subplots(figsize=(6, 4.5))
    axis.scatter(mean, difference, s=18, alpha=0.8)
    if difference.size:
        bias, spread = float(difference.mean()), float(difference.std(ddof=1)) if difference.size > 1 else 0.0
        upper, lower = bias + 1.96 * spread, bias - 1.96 * spread
        for value, style, label in ((bias, "-", f"bias {bias:.3g}"), (upper, "--", f"+1.96 SD {upper:.3g}"),
                                    (lower, "--", f"-1.96 SD {lower:.3g}")):
            axis.axhline(value, linestyle=style, color="0.3", linewidth=1)
            axis.annotate(label, (1.0, value), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=8)
    suffix = f" ({unit})" if unit and unit not in ("1", "ratio") else ""
    axis.set_xlabel(f"mean of prediction and reference{suffix}")
    axis.set_ylabel(f"prediction - reference{suffix}")
    axis.set_title(f"{title}: {int(defined.sum())} images")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    _save_figure(figure, Path(path))
    return Path(path)

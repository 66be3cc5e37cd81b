"""Pictures of a training run: loss and validation curves, validation Dice per dataset, prediction overlays.

``TrainingPictures`` records the run as it goes into ``<output_dir>/training_log.jsonl`` (one JSON line per
training iteration and per validation, appended, so a killed run loses nothing already written and a resumed run
goes on from its checkpoint's iteration) and, after each validation, writes:

- ``training_curves.png``: training loss per iteration (raw and smoothed), learning rate, validation metrics;
- ``validation_by_dataset.png``: validation Dice (inside the FOV) per source dataset and channel, latest epoch;
- ``overlays/epoch_NNNN/<image>.png``: the first validation images with the prediction compared to the label
  (green: both, red: predicted only, blue: missed).

``EvaluationChart`` draws ``metrics_by_dataset.png`` from the evaluation workflow's ``metrics_summary.json``.

Charts use matplotlib's headless ``Agg`` backend.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot's import

import ignite.distributed as idist
import matplotlib.pyplot as plt
import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts.atomic import atomic_path, write_text_atomic
from scripts.fundus_io import write_png
from scripts.transforms import SAM_PIXEL_MEAN, SAM_PIXEL_STD

__all__ = [
    "EvaluationChart",
    "TrainingPictures",
    "overlay_errors",
    "plot_dataset_metrics",
    "plot_training_curves",
    "read_training_log",
]

logger = logging.getLogger(__name__)

AGREEMENT, FALSE_POSITIVE, MISSED = (0.1, 0.85, 0.1), (0.95, 0.1, 0.1), (0.15, 0.35, 1.0)


def _save_figure(figure: plt.Figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
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
    values: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    title: str,
    counts: Mapping[str, int] | None = None,
) -> Path:
    """A grouped bar chart: one group per dataset, one bar per metric (or channel).

    Args:
        values: dataset name to ``{metric name: value}``; NaN values are left out.
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
        heights = [values[d].get(name, math.nan) for d in datasets]
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


def read_training_log(path: str | os.PathLike, up_to_iteration: int | None = None) -> list[dict[str, Any]]:
    """The records of ``training_log.jsonl``, skipping a line cut short by a kill.

    Args:
        path: the log file (missing: no records).
        up_to_iteration: keep only records at or before this training iteration (a resumed run's start).

    Returns:
        The records in file order.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if up_to_iteration is None or record.get("iteration", 0) <= up_to_iteration:
            records.append(record)
    return records


def _dice(prediction: np.ndarray, label: np.ndarray) -> float:
    total = prediction.sum() + label.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(prediction, label).sum() / total)


def _to_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _gather(value: Any) -> list[Any]:
    """``value`` of every rank (just ``[value]`` outside distributed training)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


class TrainingPictures:
    """Ignite handler recording a training run and drawing its curves, per-dataset chart and overlays.

    Attach it to the trainer before the ``TrainingCheckpoint``: an iteration is logged before a checkpoint can
    include it, so a kill between the two never loses it from the log (a resumed run drops the logged iterations
    after its checkpoint, which it trains again). In distributed training attach it on every rank: per-dataset Dice
    values are gathered from all ranks; only the writing rank writes.

    Args:
        output_dir: the folder of the pictures and ``training_log.jsonl``.
        validator: the validation engine (its outputs after post-processing: binary ``pred``, ``label``,
            ``image``, ``dataset``).
        channel_names: names of the label channels, for the per-dataset chart.
        overlay_count: how many validation images to draw overlays of at each validation.
        write: whether this process writes; by default only rank 0 of a distributed run does.
    """

    LOG_NAME = "training_log.jsonl"
    CURVES_NAME = "training_curves.png"
    DATASETS_NAME = "validation_by_dataset.png"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        validator: Engine | None = None,
        channel_names: Sequence[str] = ("vessels",),
        overlay_count: int = 4,
        write: bool | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.validator = validator
        self.channel_names = list(channel_names)
        self.overlay_count = overlay_count
        self.write = idist.get_rank() == 0 if write is None else write
        self.log_path = self.output_dir / self.LOG_NAME
        self.records: list[dict[str, Any]] = []
        self.latest_files: list[Path] = []
        self._trainer: Engine | None = None
        self._dice_by_dataset: dict[str, list[list[float]]] = defaultdict(list)
        self._overlays: list[tuple[str, np.ndarray]] = []
        self._log_ready = False

    def attach(self, engine: Engine) -> None:
        self._trainer = engine
        engine.add_event_handler(Events.STARTED, self._reset_run)
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record_iteration)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_STARTED, self._reset_validation)
            self.validator.add_event_handler(Events.ITERATION_COMPLETED, self._collect_validation)
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self._finish_validation)

    def _reset_run(self, _: Engine) -> None:
        self._log_ready = False

    def _start(self, engine: Engine) -> None:
        # At the first epoch start, when every STARTED handler (the checkpoint's resume included) is done.
        if not self.write or self._log_ready:
            return
        self._log_ready = True
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # A fresh run starts a fresh log; a resumed one (iteration > 0) keeps the records up to its checkpoint.
        self.records = read_training_log(self.log_path, engine.state.iteration) if engine.state.iteration else []
        write_text_atomic(self.log_path, "".join(json.dumps(r) + "\n" for r in self.records))

    def _append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _record_iteration(self, engine: Engine) -> None:
        if not self.write:
            return
        output = engine.state.output
        loss = output[0]["loss"] if isinstance(output, list) else output["loss"]
        self._append(
            {
                "kind": "train",
                "epoch": engine.state.epoch,
                "iteration": engine.state.iteration,
                "loss": float(loss),
                "lr": float(engine.optimizer.param_groups[0]["lr"]),
            }
        )

    def _reset_validation(self, _: Engine) -> None:
        self._dice_by_dataset = defaultdict(list)
        self._overlays = []

    def _collect_validation(self, engine: Engine) -> None:
        # MONAI keeps the post-processed prediction and label in the output and the datalist's keys in the batch.
        for source, item in zip(engine.state.batch, engine.state.output):
            prediction, label = _to_numpy(item["pred"]).astype(bool), _to_numpy(item["label"]).astype(bool)
            self._dice_by_dataset[str(source.get("dataset", "all"))].append(
                [_dice(p, t) for p, t in zip(prediction, label)]
            )
            if self.write and len(self._overlays) < self.overlay_count:
                image = _to_numpy(item["image"]) * np.reshape(SAM_PIXEL_STD, (3, 1, 1)) + np.reshape(
                    SAM_PIXEL_MEAN, (3, 1, 1)
                )
                filename = getattr(source.get("image"), "meta", {}).get("filename_or_obj", "")
                name = Path(str(filename)).stem or f"image_{len(self._overlays)}"
                self._overlays.append((name, overlay_errors(image, prediction, label)))

    def _finish_validation(self, engine: Engine) -> None:
        merged: dict[str, list[list[float]]] = defaultdict(list)
        for part in _gather(dict(self._dice_by_dataset)):
            for dataset, values in part.items():
                merged[dataset].extend(values)
        if not self.write or self._trainer is None:
            return
        epoch = self._trainer.state.epoch
        by_dataset = {
            dataset: {
                "images": len(values),
                "dice": dict(zip(self.channel_names, np.mean(np.asarray(values), axis=0).tolist())),
            }
            for dataset, values in merged.items()
        }
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        self._append(
            {
                "kind": "validation",
                "epoch": epoch,
                "iteration": self._trainer.state.iteration,
                "metrics": metrics,
                "by_dataset": by_dataset,
            }
        )
        files = [plot_training_curves(self.records, self.output_dir / self.CURVES_NAME)]
        files.append(
            plot_dataset_metrics(
                {dataset: summary["dice"] for dataset, summary in by_dataset.items()},
                self.output_dir / self.DATASETS_NAME,
                title=f"validation Dice inside the FOV per dataset, epoch {epoch}",
                counts={dataset: summary["images"] for dataset, summary in by_dataset.items()},
            )
        )
        for name, picture in self._overlays:
            path = self.output_dir / "overlays" / f"epoch_{epoch:04d}" / f"{name}.png"
            write_png(path, picture)
            files.append(path)
        self.latest_files = files
        logger.info(f"Wrote the training curves and {len(self._overlays)} overlays into {self.output_dir}.")


class EvaluationChart:
    """Ignite handler drawing the mean of chosen metrics per dataset from an evaluation's summary JSON.

    Attach it to the evaluator after ``scripts.metrics.FundusMetricsWriter``, which writes the summary when the
    evaluation epoch completes.

    Args:
        summary_file: the ``metrics_summary.json`` written by ``FundusMetricsWriter``.
        output_file: the PNG to write.
        metrics: metric names to draw (``scripts.metrics.METRICS``), for every channel.
        region: ``"fov"`` or ``"image"``.
    """

    def __init__(
        self,
        summary_file: str | os.PathLike,
        output_file: str | os.PathLike,
        metrics: Sequence[str] = ("dice", "iou", "sensitivity", "specificity", "auc"),
        region: str = "fov",
    ) -> None:
        self.summary_file = Path(summary_file)
        self.output_file = Path(output_file)
        self.metrics = list(metrics)
        self.region = region

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, _: Engine) -> None:
        summary = json.loads(self.summary_file.read_text(encoding="utf-8"))["summary"]
        values, counts = {}, {}
        for dataset, group in summary["datasets"].items():
            counts[dataset] = group["images"]
            values[dataset] = {
                f"{key.split('/')[0]} {key.split('/')[2]}": statistic["mean"]
                for key, statistic in group["metrics"].items()
                if key.split("/")[1] == self.region and key.split("/")[2] in self.metrics
            }
        plot_dataset_metrics(values, self.output_file, f"mean per image per dataset ({self.region})", counts)
        logger.info(f"Wrote {self.output_file}.")

"""Pictures of a training run, drawn after every validation from its :class:`TrainingLog`.

- ``training_curves.png``: training loss per iteration (raw and smoothed), learning rate, validation metrics;
- ``validation_by_dataset.png``: validation Dice (inside the FOV) per source dataset and channel, latest epoch;
- ``overlays/epoch_NNNN/<image>.png``: the first validation images with the prediction compared to the label
  (green: both, red: predicted only, blue: missed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts.fundus_io import write_png
from scripts.handlers.training_log import TrainingLog
from scripts.plots import overlay_errors, plot_dataset_metrics, plot_training_curves
from scripts.transforms import SAM_PIXEL_MEAN, SAM_PIXEL_STD

__all__ = ["TrainingPictures"]

logger = logging.getLogger(__name__)


def _to_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


class TrainingPictures:
    """Ignite handler drawing a training run's curves, per-dataset chart and overlays after each validation.

    It draws from the records of the trainer's :class:`TrainingLog` (into the log's folder, on the log's writing
    rank) and collects the overlays from the log's validator. List it after the log in the trainer's handlers.

    Args:
        overlay_count: how many validation images to draw overlays of at each validation.

    Attributes:
        latest_files: the pictures written at the latest validation (MLflow sends them).
    """

    CURVES_NAME = "training_curves.png"
    DATASETS_NAME = "validation_by_dataset.png"

    def __init__(self, overlay_count: int = 4) -> None:
        self.log: TrainingLog | None = None
        self.output_dir: Path | None = None
        self.overlay_count = overlay_count
        self.latest_files: list[Path] = []
        self._overlays: list[tuple[str, np.ndarray]] = []

    def attach(self, engine: Engine) -> None:
        self.log = TrainingLog.of(engine)
        self.output_dir = self.log.output_dir
        if self.log.validator is not None and self.log.write:
            self.log.validator.add_event_handler(Events.EPOCH_STARTED, self._reset)
            self.log.validator.add_event_handler(Events.ITERATION_COMPLETED, self._collect_overlays)
        self.log.add_validation_listener(self._draw)

    def _reset(self, _: Engine) -> None:
        self._overlays = []

    def _collect_overlays(self, engine: Engine) -> None:
        for source, item in zip(engine.state.batch, engine.state.output):
            if len(self._overlays) >= self.overlay_count:
                return
            image = _to_numpy(item["image"]) * np.reshape(SAM_PIXEL_STD, (3, 1, 1))
            image += np.reshape(SAM_PIXEL_MEAN, (3, 1, 1))
            filename = getattr(source.get("image"), "meta", {}).get("filename_or_obj", "")
            name = self._unused_name(Path(str(filename)).stem or "image", source.get("dataset"))
            prediction, label = _to_numpy(item["pred"]).astype(bool), _to_numpy(item["label"]).astype(bool)
            self._overlays.append((name, overlay_errors(image, prediction, label)))

    def _unused_name(self, stem: str, dataset: Any) -> str:
        """The overlay's file name: the image's, prefixed with its dataset when another validation image has that
        name (clinics pooled with ``tools.prepare --pool`` both number their photographs ``001.jpg``...), numbered
        when that too is taken."""
        taken = {name for name, _ in self._overlays}
        name = stem if stem not in taken or not dataset else f"{dataset}_{stem}"
        number = 2
        while name in taken:
            name, number = f"{stem}_{number}", number + 1
        return name

    def _draw(self, record: dict[str, Any]) -> None:
        epoch = record["epoch"]
        files = [plot_training_curves(self.log.records, self.output_dir / self.CURVES_NAME)]
        files.append(
            plot_dataset_metrics(
                {dataset: summary["dice"] for dataset, summary in record["by_dataset"].items()},
                self.output_dir / self.DATASETS_NAME,
                title=f"validation Dice inside the FOV per dataset, epoch {epoch}",
                counts={dataset: summary["images"] for dataset, summary in record["by_dataset"].items()},
            )
        )
        for name, picture in self._overlays:
            path = self.output_dir / "overlays" / f"epoch_{epoch:04d}" / f"{name}.png"
            write_png(path, picture)
            files.append(path)
        self.latest_files = files
        logger.info(f"Wrote the training curves and {len(self._overlays)} overlays into {self.output_dir}.")

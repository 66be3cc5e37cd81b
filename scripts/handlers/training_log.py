"""The record of a training run, ``training_log.jsonl``: what the pictures draw and what MLflow is sent.

One JSON line per training iteration (``{"kind": "train", "epoch", "iteration", "loss", "lr", "images", "time",
"data_seconds"}``: the images of the iteration over all ranks, the Unix time it ended and the seconds it waited for
its batch, from which :func:`training_throughput` reads the images per second the trainer sustained and the share
of the time spent waiting for data) and per validation
(``{"kind": "validation", "epoch", "iteration", "metrics": {name: value}, "by_dataset": {dataset: {"images",
"dice": {channel: value}}}}``), appended as they happen, so a killed run loses nothing already written and a resumed
run goes on from its checkpoint's iteration.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_dice

from scripts.atomic import write_text_atomic
from scripts.engines import all_ranks
from scripts.errors import ConfigError

__all__ = ["TrainingLog", "first_iteration_time", "read_training_log", "training_throughput"]

logger = logging.getLogger(__name__)

# The log attached to each trainer: handlers that draw from it find it through the trainer they are attached to, so
# the config needs no reference to the log's place in a handler list (MONAI Label inserts handlers into that list).
_LOG_OF_TRAINER: WeakKeyDictionary[Engine, TrainingLog] = WeakKeyDictionary()


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


def first_iteration_time(records: Sequence[dict[str, Any]]) -> float | None:
    """When a log's first training iteration ended (Unix time): what tells one run's log from another's.

    Args:
        records: the records of ``training_log.jsonl`` (:func:`read_training_log`).

    Returns:
        the ``time`` of the first training record, or None when there is none (or it has no time: a log written
        before records carried one).
    """
    first = next((record for record in records if record.get("kind") == "train"), None)
    return None if first is None else first.get("time")


def training_throughput(records: Sequence[dict[str, Any]], skip_epochs: int = 1) -> dict[str, float] | None:
    """Images per second the trainer sustained, data loading included and validation left out.

    Within each epoch after the first ``skip_epochs`` (caching, workers' start, compilation), the images of every
    iteration but the epoch's first over the time from the end of that first iteration to the end of the last; and
    the part of that time those iterations waited for their batches, which tells whether data loading starves the
    step (more DataLoader workers help) or not.

    Args:
        records: the records of ``training_log.jsonl`` (:func:`read_training_log`).
        skip_epochs: epochs left out at the start.

    Returns:
        ``{"images_per_second", "seconds", "images", "epochs"}``, with ``"data_seconds"`` and ``"data_fraction"``
        (of ``seconds``) when every counted iteration records its wait; None when no counted epoch has two
        iterations with times (a log written before records carried them, or too short a run).
    """
    by_epoch: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record["kind"] == "train" and "time" in record:
            by_epoch[record["epoch"]].append(record)
    first_counted = min(by_epoch, default=0) + skip_epochs
    seconds = images = epochs = 0
    waits: list[float | None] = []
    for epoch, iterations in by_epoch.items():
        if epoch < first_counted or len(iterations) < 2:
            continue
        seconds += iterations[-1]["time"] - iterations[0]["time"]
        images += sum(r["images"] for r in iterations[1:])
        waits += [r.get("data_seconds") for r in iterations[1:]]
        epochs += 1
    if not epochs or seconds <= 0:
        return None
    figures = {"images_per_second": images / seconds, "seconds": seconds, "images": images, "epochs": epochs}
    if None not in waits:
        figures["data_seconds"] = sum(waits)
        figures["data_fraction"] = figures["data_seconds"] / seconds
    return figures


class TrainingLog:
    """Ignite handler keeping ``training_log.jsonl``: the loss and learning rate of every iteration, and every
    validation's metrics with its Dice per source dataset and channel.

    Attach it to the trainer before the ``TrainingCheckpoint``: an iteration is logged before a checkpoint can
    include it, so a kill between the two never loses it from the log (a resumed run drops the logged iterations
    after its checkpoint, which it trains again). In distributed training attach it on every rank: per-dataset Dice
    values are gathered from all ranks; only the writing rank writes.

    Others follow the run through :meth:`add_validation_listener` (pictures, MLflow), called with each validation
    record once it is written.

    Args:
        output_dir: the folder of ``training_log.jsonl``.
        validator: the validation engine (its outputs after post-processing: binary ``pred`` and ``label``; the
            batch's ``dataset``).
        channel_names: names of the label channels.
        write: whether this process writes; by default only rank 0 of a distributed run does.
    """

    LOG_NAME = "training_log.jsonl"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        validator: Engine | None = None,
        channel_names: Sequence[str] = ("vessels",),
        write: bool | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.validator = validator
        self.channel_names = list(channel_names)
        self.write = idist.get_rank() == 0 if write is None else write
        self.path = self.output_dir / self.LOG_NAME
        self.records: list[dict[str, Any]] = []
        self.trainer: Engine | None = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._dice_by_dataset: dict[str, list[list[float]]] = defaultdict(list)
        self._open = False
        self._batch_requested = self._batch_wait = 0.0

    def add_validation_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(record)`` after each validation record is written (on the writing rank only)."""
        self._listeners.append(listener)

    @staticmethod
    def attached_to(trainer: Engine) -> TrainingLog | None:
        """The :class:`TrainingLog` attached to ``trainer``, or None."""
        return _LOG_OF_TRAINER.get(trainer)

    @staticmethod
    def of(trainer: Engine) -> TrainingLog:
        """The :class:`TrainingLog` attached to ``trainer``.

        Raises:
            ConfigError: none is attached (yet): list the log before the handlers that draw from it.
        """
        log = _LOG_OF_TRAINER.get(trainer)
        if log is None:
            raise ConfigError(
                "No TrainingLog is attached to the trainer: list scripts.handlers.TrainingLog in train#handlers "
                "before the handlers that draw from it (TrainingPictures)."
            )
        return log

    def attach(self, engine: Engine) -> None:
        self.trainer = engine
        _LOG_OF_TRAINER[engine] = self
        engine.add_event_handler(Events.STARTED, self._close)
        engine.add_event_handler(Events.EPOCH_STARTED, self._open_log)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._request_batch)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._receive_batch)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record_iteration)
        engine.add_event_handler(Events.COMPLETED, self._report_throughput)
        engine.add_event_handler(Events.COMPLETED, self._warn_without_validation)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_STARTED, self._reset_validation)
            self.validator.add_event_handler(Events.ITERATION_COMPLETED, self._collect_validation)
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self._record_validation)

    def _close(self, _: Engine) -> None:
        self._open = False

    def _open_log(self, engine: Engine) -> None:
        # At the first epoch start, when every STARTED handler (the checkpoint's resume included) is done.
        if not self.write or self._open:
            return
        self._open = True
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # A fresh run starts a fresh log; a resumed one (iteration > 0) keeps the records up to its checkpoint.
        self.records = read_training_log(self.path, engine.state.iteration) if engine.state.iteration else []
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def _append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _request_batch(self, _: Engine) -> None:
        self._batch_requested = time.perf_counter()

    def _receive_batch(self, _: Engine) -> None:
        self._batch_wait = time.perf_counter() - self._batch_requested

    def _record_iteration(self, engine: Engine) -> None:
        if not self.write:
            return
        output = engine.state.output
        loss = output[0]["loss"] if isinstance(output, list) else output["loss"]
        images = len(output) if isinstance(output, list) else len(output["image"])
        self._append(
            {
                "kind": "train",
                "epoch": engine.state.epoch,
                "iteration": engine.state.iteration,
                "loss": float(loss),
                "lr": float(engine.optimizer.param_groups[0]["lr"]),
                "images": images * idist.get_world_size(),
                "time": round(time.time(), 3),
                "data_seconds": round(self._batch_wait, 4),
            }
        )

    def _report_throughput(self, _: Engine) -> None:
        figures = training_throughput(self.records) if self.write else None
        if figures is None:
            return
        waiting = f", {figures['data_fraction']:.0%} of it waiting for batches" if "data_fraction" in figures else ""
        logger.info(
            "Training sustained %.2f images per second over %d epochs after the first (validation left out%s).",
            figures["images_per_second"],
            figures["epochs"],
            waiting,
        )

    def _warn_without_validation(self, engine: Engine) -> None:
        # A time limit can end a run before its first validation: what validations write is then missing, silently.
        if not self.write or self.validator is None or any(r["kind"] == "validation" for r in self.records):
            return
        logger.warning(
            "Training ended at epoch %d, iteration %d, before its first validation: no model_best.pt, training "
            "curves or validation overlays were written. Give it more time (max_training_minutes) or validate "
            "more often (val_interval).",
            engine.state.epoch,
            engine.state.iteration,
        )

    def _reset_validation(self, _: Engine) -> None:
        self._dice_by_dataset = defaultdict(list)

    def _collect_validation(self, engine: Engine) -> None:
        # MONAI keeps the post-processed prediction and label in the output and the datalist's keys in the batch.
        for source, item in zip(engine.state.batch, engine.state.output):
            prediction = torch.as_tensor(item["pred"]).detach().cpu().bool()[None]
            label = torch.as_tensor(item["label"]).detach().cpu().bool()[None]
            dice = compute_dice(prediction, label, include_background=True, ignore_empty=False)[0]
            self._dice_by_dataset[str(source.get("dataset", "all"))].append(dice.tolist())

    def _record_validation(self, engine: Engine) -> None:
        merged: dict[str, list[list[float]]] = defaultdict(list)
        for part in all_ranks(dict(self._dice_by_dataset)):
            for dataset, values in part.items():
                merged[dataset].extend(values)
        if not self.write or self.trainer is None:
            return
        record = {
            "kind": "validation",
            "epoch": self.trainer.state.epoch,
            "iteration": self.trainer.state.iteration,
            "metrics": {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))},
            "by_dataset": {
                dataset: {
                    "images": len(values),
                    "dice": dict(zip(self.channel_names, np.mean(np.asarray(values), axis=0).tolist())),
                }
                for dataset, values in merged.items()
            },
        }
        self._append(record)
        for listener in self._listeners:
            listener(record)

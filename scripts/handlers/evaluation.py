"""Handlers of the evaluation workflow: per-image metrics and reports, and the per-dataset chart; and moving an
earlier evaluation's reports aside before a new one writes its own (:func:`keep_earlier_evaluation`)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import decollate_batch

from scripts.atomic import keep_earlier_outputs
from scripts.metrics import (
    FOV_SOURCES,
    METRICS,
    REGIONS,
    UNKNOWN_DATASET,
    evaluate_case,
    format_summary_table,
    summarise,
    write_reports,
)
from scripts.plots import plot_dataset_metrics

__all__ = ["EVALUATION_OUTPUTS", "EvaluationChart", "FundusMetricsWriter", "keep_earlier_evaluation"]

logger = logging.getLogger(__name__)

EVALUATION_OUTPUTS = (
    "metrics_per_image.csv",
    "metrics_summary.json",
    "metrics_summary.csv",
    "metrics_by_dataset.png",
    "metrics_by_prompt_mode.png",
    "prompts.json",
    "measurements_per_image.csv",
    "measurement_agreement.json",
    "measurement_agreement.csv",
    "bland_altman_*.png",
)
"""What ``evaluate.json`` writes into its output folder (file names and patterns); which of them a run writes
depends on its settings (prompt modes, the channels measured)."""


def keep_earlier_evaluation(
    output_dir: str | os.PathLike, outputs: Sequence[str] = EVALUATION_OUTPUTS, reason: str | None = None
) -> Path | None:
    """Move an earlier evaluation's reports out of ``output_dir`` before a new evaluation writes its own, or a
    training run changes the model they describe (:func:`scripts.atomic.keep_earlier_outputs`).

    A report the new run does not write (``prompts.json`` and ``metrics_by_prompt_mode.png`` of a prompted
    evaluation, after a prompt-free one) would otherwise sit beside its reports and pass for one of them; moving,
    not deleting, keeps the earlier figures should the new run fail.

    Args:
        output_dir: the evaluation's output folder.
        outputs: the names (or patterns) of the reports the evaluation writes: ``evaluate.json``'s by default,
            another method's (``tools.baseline``'s ``baseline_*``) where it writes its own.
        reason: the end of the log line, saying why they were moved (by default: before this evaluation writes
            its own).

    Returns:
        The folder the earlier reports went to, ``<output_dir>/earlier_evaluations/<time>``, or None when there were
        none.
    """
    return keep_earlier_outputs(output_dir, outputs, "evaluation", reason)


class FundusMetricsWriter:
    """Ignite handler evaluating every image of an evaluation run and writing the reports at the end of the epoch.

    At ``ITERATION_COMPLETED`` it reads ``engine.state.output``: a MONAI evaluator decollates it into a list of
    per-image dicts (a single batched dict is decollated here) holding the probabilities under ``pred_key``, already
    inverted to the original image size, and the label under ``label_key``. The FOV mask and the dataset name are
    looked up in the output item first, then in the matching ``engine.state.batch`` item (MONAI keeps the input
    keys there); without a FOV only whole-image metrics are computed, without a dataset it is ``"unknown"``. The file
    name comes from the ``filename_or_obj`` meta data of the prediction, of the image, or of
    ``"<image_key>_meta_dict"``, else a running ``case_NNNN`` name.

    At ``EPOCH_COMPLETED`` it summarises, writes the reports into ``output_dir`` (overwriting the previous epoch's,
    atomically), logs the summary table, and publishes every overall mean in ``engine.state.metrics`` under
    ``metric_name_format`` (default ``"{channel}_{region}_{metric}"``, e.g. ``vessels_fov_dice``) so that handlers
    attached after this one (checkpoint saver, MLflow) can use them. Undefined means are published as NaN.

    Each process only sees its own images: in distributed evaluation attach it to a single-process evaluator.

    Args:
        output_dir: folder for the reports.
        channel_names: one name per prediction channel, e.g. ``["vessels"]`` or ``["disc", "cup"]``; a multiple of the
            label's channels when the prediction holds several prompt modes (``vessels@none``, ``vessels@box``...).
        threshold: probabilities ``>= threshold`` are foreground.
        topology: also compute clDice.
        pred_key: output key of the probabilities.
        label_key: output key of the label.
        fov_key: key of the FOV mask.
        dataset_key: key of the dataset name.
        image_key: key of the input image, whose meta data names the file.
        metric_name_format: ``str.format`` pattern with ``{channel}``, ``{region}`` and ``{metric}`` fields for the
            ``engine.state.metrics`` keys; it must keep them distinct (``"{region}_{metric}"`` suits one channel).
        prefix: report file name prefix.
        metadata: extra information stored in the summary JSON.

    Attributes:
        records: the current epoch's per-image records.
        summary: the last summary (None before the first epoch ends).
        paths: the last written report files.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        channel_names: Sequence[str],
        threshold: float = 0.5,
        topology: bool = True,
        pred_key: str = "pred",
        label_key: str = "label",
        fov_key: str = "fov",
        dataset_key: str = "dataset",
        image_key: str = "image",
        metric_name_format: str = "{channel}_{region}_{metric}",
        prefix: str = "metrics",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.channel_names = list(channel_names)
        self.threshold = threshold
        self.topology = topology
        self.pred_key = pred_key
        self.label_key = label_key
        self.fov_key = fov_key
        self.dataset_key = dataset_key
        self.image_key = image_key
        self.metric_name_format = metric_name_format
        self.prefix = prefix
        self.metadata = dict(metadata or {})
        names = [
            metric_name_format.format(channel=c, region=r, metric=m)
            for c in self.channel_names
            for r in REGIONS
            for m in METRICS
        ]
        if len(set(names)) != len(names):
            raise ValueError(f"metric_name_format {metric_name_format!r} gives the same name to different metrics")
        self.records: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self.paths: dict[str, Path] = {}

    def attach(self, engine: Engine) -> None:
        """Register the handler's callbacks on ``engine``.

        Args:
            engine: the evaluator.
        """
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finish)

    def _reset(self, engine: Engine) -> None:
        self.records = []

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output
        if isinstance(outputs, Mapping):
            outputs = decollate_batch(outputs)
        batch = engine.state.batch
        inputs = batch if isinstance(batch, list) and len(batch) == len(outputs) else [None] * len(outputs)
        for output, item in zip(outputs, inputs):
            self.records.append(self._evaluate(output, item if isinstance(item, Mapping) else {}))

    def _lookup(self, output: Mapping[str, Any], item: Mapping[str, Any], key: str) -> Any:
        """``key`` from the output item, else from the input item, else None."""
        if key in output:
            return output[key]
        return item.get(key)

    def _filename(self, output: Mapping[str, Any], item: Mapping[str, Any]) -> str:
        for key in (self.pred_key, self.image_key):
            meta = getattr(self._lookup(output, item, key), "meta", None)
            if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
                return str(meta["filename_or_obj"])
        meta_dict = self._lookup(output, item, f"{self.image_key}_meta_dict")
        if isinstance(meta_dict, Mapping) and meta_dict.get("filename_or_obj"):
            return str(meta_dict["filename_or_obj"])
        return f"case_{len(self.records):04d}"

    def _evaluate(self, output: Mapping[str, Any], item: Mapping[str, Any]) -> dict[str, Any]:
        for key in (self.pred_key, self.label_key):
            if key not in output:
                raise KeyError(f"FundusMetricsWriter: engine output has no {key!r} (keys: {sorted(output)})")
        dataset = self._lookup(output, item, self.dataset_key)
        if isinstance(dataset, (list, tuple)) and len(dataset) == 1:
            dataset = dataset[0]
        label = torch.as_tensor(output[self.label_key])
        # With several prompt modes the prediction holds each mode's channels in turn: each is scored on the label.
        label = label.repeat(len(self.channel_names) // label.shape[0], 1, 1)
        fov = self._lookup(output, item, self.fov_key)
        metrics = evaluate_case(
            output[self.pred_key],
            label,
            fov=fov,
            channel_names=self.channel_names,
            threshold=self.threshold,
            topology=self.topology,
        )
        record = {"filename": self._filename(output, item), "dataset": str(dataset) if dataset is not None else UNKNOWN_DATASET}
        if fov is not None:
            # LoadFundusd marks the fields of view it estimated; the flag stays in the mask's meta data.
            estimated = getattr(fov, "meta", {}).get("fov_estimated", False)
            record["fov_source"] = FOV_SOURCES[1] if bool(estimated) else FOV_SOURCES[0]
        return {**record, **metrics}

    def _finish(self, engine: Engine) -> None:
        self.summary = summarise(self.records)
        self.paths = write_reports(self.records, self.summary, self.output_dir, self.prefix, self.metadata)
        logger.info("evaluation of %d images:\n%s", len(self.records), format_summary_table(self.summary))
        for key, statistic in self.summary["all"]["metrics"].items():
            channel, region, metric = key.split("/")
            name = self.metric_name_format.format(channel=channel, region=region, metric=metric)
            engine.state.metrics[name] = statistic["mean"]


class EvaluationChart:
    """Ignite handler drawing the mean of chosen metrics per dataset from an evaluation's summary JSON.

    Attach it to the evaluator after :class:`FundusMetricsWriter`, which writes the summary when the evaluation
    epoch completes.

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

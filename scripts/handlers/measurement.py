"""From masks to what a study records: ``measurements.csv`` and ``report.html`` of an inference run, and the agreement
of measures on predictions and references in an evaluation, with per-image quality flags.

Quality flags: SAM's IoU head predicts each mask's IoU with the truth; an image whose predicted IoU is below
``quality_threshold`` is flagged for a person to look at. So is a picture that does not look like a fundus
photograph: an estimated field of view covering less than ``FOV_RANGE[0]`` of it, or all of it (no dark border).
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

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.metrics import compute_dice
from scipy.stats import pearsonr, spearmanr

from scripts.atomic import FileState, append_text, write_text_atomic
from scripts.fundus_io import UNREADABLE_KEY
from scripts.masks import binarise
from scripts.measurements import (
    MEASURE_UNITS,
    SMALLEST_VESSEL_FRAGMENT,
    measure_structures,
    structure_of,
    warn_about_unmeasured_channels,
)
from scripts.metrics import UNKNOWN_DATASET, csv_text, json_safe
from scripts.plots import plot_bland_altman
from scripts.report import ReportColumn, write_html_report

__all__ = ["FOV_RANGE", "InferenceReport", "MeasurementAgreement", "image_flags"]

logger = logging.getLogger(__name__)

FOV_RANGE = (0.3, 0.995)
"""Share of a picture an estimated field of view covers in a fundus photograph; outside it the picture is flagged."""

# The measures whose agreement is drawn as a Bland–Altman plot, per structure.
BLAND_ALTMAN = {"disc": ("vertical_cdr",), "vessels": ("vessel_density", "fractal_dimension")}


def image_flags(fov_fraction: float, predicted_iou: float | None, quality_threshold: float) -> str:
    """Why an image needs a person's look ("" when it does not).

    Args:
        fov_fraction: the share of the picture its estimated field of view covers.
        predicted_iou: the lowest IoU SAM's head predicts for the image's channels (None: no IoU head).
        quality_threshold: predicted IoU under which an image is flagged.
    """
    flags = []
    if predicted_iou is not None and predicted_iou < quality_threshold:
        flags.append(f"low predicted quality (IoU {predicted_iou:.2f} < {quality_threshold:g})")
    if fov_fraction < FOV_RANGE[0]:
        flags.append(f"field of view covers {fov_fraction:.0%} of the picture: not a fundus photograph?")
    elif fov_fraction >= FOV_RANGE[1]:
        flags.append("no dark border around a field of view: not a fundus photograph, or cropped inside its field of view")
    return "; ".join(flags)


def _ious(inferer: Any, batch_size: int, channels: int) -> list[list[float] | None]:
    """Per image of the latest batch, SAM's predicted IoU of each channel (first prompt mode), or None."""
    latest = getattr(inferer, "last_iou", None)
    if latest is None:
        return [None] * batch_size
    return torch.as_tensor(latest).detach().float().cpu()[:, :channels].tolist()


def _unit(column: str) -> str:
    """The unit of a measure's column, ``pred_`` and ``ref_`` ones included ("" for other columns)."""
    for side in ("pred_", "ref_"):
        column = column.removeprefix(side)
    return MEASURE_UNITS.get(column, "")


def _csv_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The CSV lines of ``rows`` under ``columns`` (a missing value empty), without the header: see :func:`csv_text`."""
    return csv_text([[row.get(column, "") for column in columns] for row in rows])


def _agreement_phrase(measure: str, agreement: Mapping[str, Any]) -> str:
    """One measure's agreement for the log, with the images its MAE leaves out where there are any."""
    phrase = f"{measure} MAE {agreement['mae']:.4g} (r {agreement['pearson_r']:.3f}"
    if agreement["undefined_in_prediction"]:
        phrase += (
            f"; over {agreement['n']} images: {agreement['undefined_in_prediction']} predictions have none, left out"
        )
    return phrase + ")"


def _csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A whole CSV: the header, each column with its unit (``disc_area_px [px²]``), then :func:`_csv_rows`."""
    header = [f"{column} [{_unit(column)}]" if _unit(column) else column for column in columns]
    return csv_text([header]) + _csv_rows(rows, columns)


class InferenceReport:
    """Inference handler writing ``measurements.csv`` and ``report.html`` into the output folder.

    It reads the records the bundle's prediction writer (:class:`scripts.writers.SaveFundusPredictiond` with
    ``measure=True``) leaves under ``<key>_record``, adds SAM's predicted IoU and the flags, and writes the CSV (one row
    per image, units in the header) after each batch, so an interrupted run keeps what it measured, and the report
    when the run completes. The batch's rows are added at the end of the file (:func:`scripts.atomic.append_text`,
    whole lines or none); the file is written whole, atomically, only when the columns change (the first batch, a
    record with a value the earlier ones lack) or someone else changed it, as rewriting it after every batch costs
    the square of the number of images (15 minutes over a run of 10,000 at batch size 1).

    Args:
        output_dir: the inference output folder.
        channel_names: the model's channels.
        inferer: the run's :class:`scripts.inferers.FundusInferer` (its predicted IoU).
        quality_threshold: predicted IoU under which an image is flagged.
        settings: the run's settings, shown in the report.
        record_key: where the prediction writer leaves its records.
        left_out: where to add why a photograph could not be read at its turn (its record has no measurements:
            :class:`scripts.inputs.FolderDataset`), e.g. :attr:`scripts.inputs.ImageFolder.unreadable`, which the
            run reports at its end.
        embedded_thumbnails: how many overlays the report embeds as thumbnails (the records' ``thumbnail``, 25 to 35
            KB each in the page), the flagged images first, then in the run's order; the others it shows from their files
            beside it. The bound keeps the page a few MB at any run's size (every one embedded, 10,000 photographs
            made a page of about 1.1 GB), and the thumbnails held until the end to at most twice that many.
    """

    CSV_NAME = "measurements.csv"
    REPORT_NAME = "report.html"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        channel_names: Sequence[str],
        inferer: Any = None,
        quality_threshold: float = 0.5,
        settings: Mapping[str, Any] | None = None,
        record_key: str = "pred_record",
        left_out: list[str] | None = None,
        embedded_thumbnails: int = 500,
    ) -> None:
        if embedded_thumbnails < 0:
            raise ValueError(f"embedded_thumbnails must be 0 or more, got {embedded_thumbnails}")
        self.output_dir = Path(output_dir)
        self.channel_names = list(channel_names)
        self.inferer = inferer
        self.quality_threshold = quality_threshold
        self.settings = dict(settings or {})
        self.record_key = record_key
        self.left_out = left_out if left_out is not None else []
        self.embedded_thumbnails = embedded_thumbnails
        # The first embedded_thumbnails of the flagged images' thumbnails and of the others', by image name.
        self._thumbnails: dict[str, bytes] = {}
        self._held = {True: 0, False: 0}
        self.rows: list[dict[str, Any]] = []
        # Kept as the rows come, not gathered from them per batch: that too would grow with the square of the run.
        self._keys: dict[str, None] = {}
        # The columns of this run's measurements.csv and its state on disk as last written (None: not written yet).
        self._written: tuple[list[str], FileState] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self.write_report)

    def _start(self, _: Engine) -> None:
        """Forget an earlier run's rows: the first batch writes the CSV whole, with this run's rows alone."""
        self.rows.clear()
        self._keys.clear()
        self._written = None
        self._thumbnails.clear()
        self._held = {True: 0, False: 0}

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output
        added: list[dict[str, Any]] = []
        for item, ious in zip(outputs, _ious(self.inferer, len(outputs), len(self.channel_names))):
            record = dict(item[self.record_key])
            if record.get(UNREADABLE_KEY):
                self.left_out.append(record[UNREADABLE_KEY])
                continue
            thumbnail = record.pop("thumbnail", None)
            predicted = {f"predicted_iou_{name}": iou for name, iou in zip(self.channel_names, ious or [])}
            record.update(predicted)
            record["flags"] = image_flags(record["fov_fraction"], min(ious) if ious else None, self.quality_threshold)
            flagged = bool(record["flags"])
            if thumbnail and self._held[flagged] < self.embedded_thumbnails:
                self._thumbnails[record["image"]] = thumbnail
                self._held[flagged] += 1
            added.append(record)
            self._keys.update(dict.fromkeys(key for key in record if key not in ("image", "overlay", "flags", "notes")))
        self.rows.extend(added)
        self._write_csv(added)

    def _write_csv(self, added: Sequence[Mapping[str, Any]]) -> None:
        """Bring ``measurements.csv`` up to date with the batch's rows ``added``: each row written so far stays."""
        path, columns = self.output_dir / self.CSV_NAME, self.columns()
        if self._written is not None and self._written[0] == columns:
            if not added:
                return
            state = append_text(path, _csv_rows(added, columns), self._written[1])
            if state is not None:
                self._written = columns, state
                return
        write_text_atomic(path, _csv(self.rows, columns))
        self._written = columns, FileState.of(path)

    def columns(self) -> list[str]:
        """The CSV's columns: the image, its flags, then every value the records hold, in first-seen order."""
        return ["image", "flags", *self._keys, "notes"]

    def write_report(self, _: Engine | None = None) -> None:
        """Write ``report.html``: each image's overlay, measurements and flags, sortable, with the run's settings."""
        # The flagged first (sorted is stable: in the run's order otherwise): those a reader must look at.
        flagged_first = sorted(self.rows, key=lambda row: not row["flags"])
        embedded = [row["image"] for row in flagged_first if row["image"] in self._thumbnails]
        thumbnails = {name: self._thumbnails[name] for name in embedded[: self.embedded_thumbnails]}
        linked = {
            row["image"]: Path(row["overlay"]).as_posix()
            for row in self.rows
            if row["image"] not in thumbnails and (self.output_dir / row["overlay"]).is_file()
        }
        columns = [
            ReportColumn(key, key.replace("_", " "), MEASURE_UNITS.get(key, ""))
            for key in self.columns()
            if key not in ("image", "flags")
        ]
        path = write_html_report(
            self.output_dir / self.REPORT_NAME,
            self.rows,
            columns,
            thumbnails,
            self.settings,
            title="Fundus segmentation",
            linked=linked,
        )
        flagged = sum(bool(row["flags"]) for row in self.rows)
        from_files = f" ({len(linked)} overlays shown from their files, not embedded)" if linked else ""
        logger.info(
            f"Wrote {self.output_dir / self.CSV_NAME} and {path}: {len(self.rows)} images, {flagged} flagged{from_files}."
        )


def _dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    pair = [torch.from_numpy(mask)[None, None] for mask in (prediction, reference)]
    return float(compute_dice(*pair, include_background=True, ignore_empty=False))


class MeasurementAgreement:
    """Evaluation handler measuring the structures on each prediction and on its reference, and reporting how well the
    measures agree per dataset: mean absolute error, Pearson's r, a Bland–Altman plot (vertical cup-to-disc ratio;
    vessel density and fractal dimension), and how well SAM's predicted IoU ranks the real Dice (Spearman).

    Writes ``measurements_per_image.csv`` (prediction and reference side by side, the flags), ``measurement_agreement
    .json`` and ``.csv``, and ``bland_altman_<measure>.png``; publishes the agreement over all images in
    ``engine.state.metrics`` (``<measure>_mae``, ``<measure>_pearson_r``, ``quality_spearman``), where MLflow finds it.
    With several prompt modes, the first mode's channels are measured.

    Args:
        output_dir: the evaluation output folder.
        channel_names: the model's channels.
        inferer: the run's :class:`scripts.inferers.FundusInferer` (its predicted IoU).
        threshold: probabilities ``>= threshold`` are foreground, as for the evaluation's metrics (:mod:`scripts.metrics`).
        quality_threshold: predicted IoU under which an image is flagged.
        pixel_size_mm: the side of a pixel in millimetres (None: pixels only).
        min_fragment_px: pieces of a vessel mask under this many pixels are not counted as vessel segments,
            branch or end points, on either side.
        fov_key: the field of view at the image's own size, where the vessel measures are taken.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        channel_names: Sequence[str],
        inferer: Any = None,
        threshold: float = 0.5,
        quality_threshold: float = 0.5,
        pixel_size_mm: float | None = None,
        min_fragment_px: int = SMALLEST_VESSEL_FRAGMENT,
        fov_key: str = "fov",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.channel_names = list(channel_names)
        self.inferer = inferer
        self.threshold = threshold
        self.quality_threshold = quality_threshold
        self.pixel_size_mm = pixel_size_mm
        self.min_fragment_px = min_fragment_px
        self.fov_key = fov_key
        self.rows: list[dict[str, Any]] = []
        warn_about_unmeasured_channels(self.channel_names)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finish)

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output
        outputs = decollate_batch(outputs) if isinstance(outputs, Mapping) else outputs
        channels = len(self.channel_names)
        for output, item, ious in zip(outputs, engine.state.batch, _ious(self.inferer, len(outputs), channels)):
            prediction = binarise(torch.as_tensor(output["pred"]).detach().float().cpu().numpy()[:channels], self.threshold)
            reference = torch.as_tensor(output["label"]).detach().cpu().numpy() > 0.5
            fov = item.get(self.fov_key, output.get(self.fov_key))
            fov = None if fov is None else torch.as_tensor(fov).cpu().numpy()[0] > 0.5
            name = Path(str(getattr(output["pred"], "meta", {}).get("filename_or_obj", f"case_{len(self.rows)}"))).name
            self.add(name, str(item.get("dataset", UNKNOWN_DATASET)), prediction, reference, fov, ious)

    def add(
        self,
        name: str,
        dataset: str,
        prediction: np.ndarray,
        reference: np.ndarray,
        fov: np.ndarray | None = None,
        ious: Sequence[float] | None = None,
    ) -> None:
        """Measure one image's prediction and reference; :meth:`report` gathers them. What the handler calls per image
        of a batch, and ``tools.score`` per prediction made elsewhere.

        Args:
            name: the image's file name.
            dataset: its dataset.
            prediction: ``(C, H, W)`` bool masks, one per channel.
            reference: ``(C, H, W)`` bool reference masks.
            fov: ``(H, W)`` bool field of view (None: the whole picture).
            ious: SAM's predicted IoU per channel, or None (no IoU head).
        """
        fov = np.ones(reference.shape[1:], bool) if fov is None else fov
        row: dict[str, Any] = {"image": name, "dataset": dataset}
        for side, masks in (("pred", prediction), ("ref", reference)):
            measured = measure_structures(masks, self.channel_names, fov, self.pixel_size_mm, self.min_fragment_px)
            row.update({f"{side}_{key}": value for key, value in measured.items()})
        # The lowest channel's Dice, as the predicted IoU is the lowest channel's: Spearman ranks like with like.
        row["dice"] = min(_dice(pred & fov, ref & fov) for pred, ref in zip(prediction, reference))
        row["predicted_iou"] = min(ious) if ious else math.nan
        row["flags"] = image_flags(float(fov.mean()), None if not ious else min(ious), self.quality_threshold)
        self.rows.append(row)

    def _measures(self) -> list[str]:
        return [
            key[len("pred_") :]
            for key in dict.fromkeys(k for row in self.rows for k in row)
            if key.startswith("pred_") and key != "pred_notes" and f"ref_{key[len('pred_'):]}" in self.rows[0]
        ]

    def _agreement(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {"images": len(rows)}
        for measure in self._measures():
            pred = np.array([row[f"pred_{measure}"] for row in rows], dtype=float)
            ref = np.array([row[f"ref_{measure}"] for row in rows], dtype=float)
            defined = np.isfinite(pred) & np.isfinite(ref)
            count = int(defined.sum())
            varied = count > 2 and np.ptp(pred[defined]) > 0 and np.ptp(ref[defined]) > 0
            result[measure] = {
                "mae": float(np.abs(pred[defined] - ref[defined]).mean()) if count else math.nan,
                "pearson_r": float(pearsonr(pred[defined], ref[defined])[0]) if varied else math.nan,
                "n": count,
                # Failures of the segmentation (no disc found, a cup wholly outside it) have no value to subtract:
                # counted apart, as a MAE over the rest alone read better the more discs were missed.
                "undefined_in_prediction": int((~np.isfinite(pred) & np.isfinite(ref)).sum()),
            }
        iou = np.array([row["predicted_iou"] for row in rows], dtype=float)
        dice = np.array([row["dice"] for row in rows], dtype=float)
        ranked = np.isfinite(iou)
        rankable = ranked.sum() > 2 and np.ptp(iou[ranked]) > 0 and np.ptp(dice[ranked]) > 0
        result["quality_spearman"] = float(spearmanr(iou[ranked], dice[ranked])[0]) if rankable else math.nan
        result["flagged"] = [row["image"] for row in rows if row["flags"]]
        return result

    def _finish(self, engine: Engine) -> None:
        agreement = self.report()
        for measure in self._measures():
            engine.state.metrics[f"{measure}_mae"] = agreement["all"][measure]["mae"]
            engine.state.metrics[f"{measure}_pearson_r"] = agreement["all"][measure]["pearson_r"]
            engine.state.metrics[f"{measure}_undefined_in_prediction"] = agreement["all"][measure]["undefined_in_prediction"]
        engine.state.metrics["quality_spearman"] = agreement["all"]["quality_spearman"]

    def report(self) -> dict[str, Any]:
        """Write the reports of the images :meth:`add` measured, and log the agreement over all of them.

        Returns:
            ``{"all": agreement, "datasets": {dataset: agreement}}``, as ``measurement_agreement.json`` holds it.
        """
        by_dataset: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in self.rows:
            by_dataset[row["dataset"]].append(row)
        agreement = {"all": self._agreement(self.rows), "datasets": {d: self._agreement(r) for d, r in by_dataset.items()}}
        columns = ["image", "dataset", "flags", "dice", "predicted_iou"]
        columns += [f"{side}_{m}" for m in self._measures() for side in ("pred", "ref")] + ["pred_notes", "ref_notes"]
        write_text_atomic(self.output_dir / "measurements_per_image.csv", _csv(self.rows, columns))
        write_text_atomic(self.output_dir / "measurement_agreement.json", json.dumps(json_safe(agreement), indent=2) + "\n")
        # The MAE is in the measure's unit; n images gave it, undefined_in_prediction others (left out) did not.
        summary = [["dataset", "measure", "unit", "mae", "pearson_r", "n", "undefined_in_prediction"]]
        for dataset, result in [*agreement["datasets"].items(), ("all", agreement["all"])]:
            summary += [
                [dataset, m, _unit(m), *(result[m][key] for key in ("mae", "pearson_r", "n", "undefined_in_prediction"))]
                for m in self._measures()
            ]
        write_text_atomic(self.output_dir / "measurement_agreement.csv", csv_text(summary))
        segmented = {structure_of(name) for name in self.channel_names}
        structures = [structure for structure in BLAND_ALTMAN if structure in segmented]
        for measure in (m for structure in structures for m in BLAND_ALTMAN[structure]):
            plot_bland_altman(
                [row[f"ref_{measure}"] for row in self.rows],
                [row[f"pred_{measure}"] for row in self.rows],
                self.output_dir / f"bland_altman_{measure}.png",
                measure.replace("_", " "),
                MEASURE_UNITS.get(measure, ""),
            )
        quality = agreement["all"]["quality_spearman"]
        ranking = (
            f"predicted IoU ranks Dice with Spearman {quality:.3f}"
            if math.isfinite(quality)
            else "no ranking by predicted IoU (the head predicts none, or fewer than three images differ)"
        )
        logger.info(
            "Measurements agree with the references over %d images: %s; %s; %d images flagged.",
            len(self.rows),
            ", ".join(_agreement_phrase(m, agreement["all"][m]) for m in self._measures()[:4]),
            ranking,
            len(agreement["all"]["flagged"]),
        )
        return agreement


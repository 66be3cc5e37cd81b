"""The measurement handlers on real ignite engines: `InferenceReport` (measurements.csv and report.html of an
inference run) and `MeasurementAgreement` (measures on predictions against references in an evaluation).

Their aggregates are checked against numpy's and against ranks computed here, on disc/cup pictures whose vertical
cup-to-disc ratio is known by construction.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from scipy.stats import rankdata

from scripts.atomic import write_text_atomic
from scripts.fundus_io import write_png
from scripts.handlers import InferenceReport, MeasurementAgreement, measurement
from scripts.measurements import measure_structures
from scripts.report import thumbnail_jpeg

SIZE = 96


class LatestIoU:
    """What the handlers read of the run's inferer: SAM's predicted IoU of the latest batch, ``(B, C)``."""

    def __init__(self) -> None:
        self.last_iou: torch.Tensor | None = None


def disc_and_cup(disc_rows: int, cup_rows: int, size: int = SIZE) -> np.ndarray:
    """``(2, H, W)`` bool: a centred square disc and cup spanning the given numbers of rows (vertical CDR = ratio)."""
    masks = np.zeros((2, size, size), bool)
    for channel, rows in enumerate((disc_rows, cup_rows)):
        start = (size - rows) // 2
        masks[channel, start : start + rows, start : start + rows] = True
    return masks


def fundus_fov(size: int = SIZE) -> np.ndarray:
    """A round field of view covering about 70% of the picture, as in a fundus photograph."""
    rows, cols = np.mgrid[:size, :size]
    return (rows - size / 2 + 0.5) ** 2 + (cols - size / 2 + 0.5) ** 2 <= (0.47 * size) ** 2


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV, keyed by column names without their units (``disc_area_px [px²]``: ``disc_area_px``)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [{key.split(" [")[0]: value for key, value in row.items()} for row in csv.DictReader(handle)]


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks of distinct values (Spearman's correlation is Pearson's on them)."""
    assert len(np.unique(values)) == len(values)
    return np.argsort(np.argsort(values)).astype(float)


# Four disc/cup cases per dataset: (disc rows, predicted cup rows, reference cup rows), predicted IoU.
CASES = {
    "REFUGE": [((60, 30, 36), 0.9), ((50, 30, 30), 0.8), ((70, 21, 28), 0.3), ((40, 24, 20), 0.7)],
    "ORIGA": [((64, 32, 40), 0.6), ((56, 42, 28), 0.95), ((48, 12, 24), 0.2)],
}


@pytest.fixture
def evaluation(tmp_path):
    """An evaluation over CASES, two images a batch, with MeasurementAgreement attached; its engine and handler."""
    inferer = LatestIoU()
    images = []
    for dataset, cases in CASES.items():
        for index, ((disc, pred_cup, ref_cup), iou) in enumerate(cases):
            prediction, reference = disc_and_cup(disc, pred_cup), disc_and_cup(disc, ref_cup)
            images.append({"name": f"{dataset.lower()}_{index}.png", "dataset": dataset, "prediction": prediction,
                           "reference": reference, "iou": iou, "fov": torch.from_numpy(fundus_fov()[None])})

    def step(engine: Engine, batch: list[dict]) -> list[dict]:
        # The evaluator's batch and outputs are decollated: one dict per image.
        inferer.last_iou = torch.tensor([[item["iou"]] * 2 for item in batch])
        return [
            {
                "pred": MetaTensor(torch.from_numpy(item["prediction"].astype(np.float32)),
                                   meta={"filename_or_obj": f"/in/{item['name']}"}),
                "label": torch.from_numpy(item["reference"].astype(np.float32)),
            }
            for item in batch
        ]

    engine = Engine(step)
    handler = MeasurementAgreement(tmp_path, ["disc", "cup"], inferer=inferer, quality_threshold=0.5)
    handler.attach(engine)
    engine.run([images[start : start + 2] for start in range(0, len(images), 2)], max_epochs=1)
    return engine, handler, images, tmp_path


def test_agreement_matches_numpy_per_dataset_and_overall(evaluation):
    engine, _, images, folder = evaluation
    per_image = {row["image"]: row for row in read_csv(folder / "measurements_per_image.csv")}
    assert sorted(per_image) == sorted(item["name"] for item in images)
    for item in images:
        row, dataset, prediction, reference = per_image[item["name"]], item["dataset"], item["prediction"], item["reference"]
        assert row["dataset"] == dataset
        # By construction: the cup spans pred_cup (ref_cup) of the disc's rows.
        assert float(row["pred_vertical_cdr"]) == pytest.approx(prediction[1].any(1).sum() / prediction[0].any(1).sum())
        assert float(row["ref_vertical_cdr"]) == pytest.approx(reference[1].any(1).sum() / reference[0].any(1).sum())
        assert float(row["pred_disc_area_px"]) == measure_structures(prediction, ["disc", "cup"])["disc_area_px"]

    agreement = json.loads((folder / "measurement_agreement.json").read_text())
    for scope, names in [("all", list(per_image)), *[(d, [i["name"] for i in images if i["dataset"] == d]) for d in CASES]]:
        pred = np.array([float(per_image[n]["pred_vertical_cdr"]) for n in names])
        ref = np.array([float(per_image[n]["ref_vertical_cdr"]) for n in names])
        result = agreement["all"] if scope == "all" else agreement["datasets"][scope]
        assert result["images"] == len(names)
        assert result["vertical_cdr"]["n"] == len(names)
        assert result["vertical_cdr"]["mae"] == pytest.approx(np.abs(pred - ref).mean())
        assert result["vertical_cdr"]["pearson_r"] == pytest.approx(np.corrcoef(pred, ref)[0, 1])
    assert engine.state.metrics["vertical_cdr_mae"] == pytest.approx(agreement["all"]["vertical_cdr"]["mae"])
    assert engine.state.metrics["vertical_cdr_pearson_r"] == pytest.approx(agreement["all"]["vertical_cdr"]["pearson_r"])

    header = (folder / "measurements_per_image.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert "pred_vertical_cdr [ratio]" in header and "ref_disc_area_px [px²]" in header
    summary = read_csv(folder / "measurement_agreement.csv")
    assert {(r["measure"], r["unit"]) for r in summary} >= {("vertical_cdr", "ratio"), ("disc_area_px", "px²")}
    refuge = next(r for r in summary if r["dataset"] == "REFUGE" and r["measure"] == "vertical_cdr")
    assert float(refuge["mae"]) == pytest.approx(agreement["datasets"]["REFUGE"]["vertical_cdr"]["mae"])


def test_predictions_without_a_ratio_are_counted_apart_from_the_mae_in_every_report(tmp_path, caplog):
    good = disc_and_cup(60, 30)
    no_disc = np.zeros_like(good)
    cup_outside = disc_and_cup(30, 10)
    cup_outside[1] = np.roll(cup_outside[1], SIZE // 2, axis=0)  # wholly below the disc
    reference = disc_and_cup(60, 36)
    predictions = {"good.png": good, "no_disc.png": no_disc, "cup_outside.png": cup_outside}

    def step(engine: Engine, batch: list[dict]) -> list[dict]:
        return [
            {
                "pred": MetaTensor(torch.from_numpy(item["mask"].astype(np.float32)), meta={"filename_or_obj": f"/in/{item['name']}"}),
                "label": torch.from_numpy(reference.astype(np.float32)),
            }
            for item in batch
        ]

    engine = Engine(step)
    MeasurementAgreement(tmp_path, ["disc", "cup"]).attach(engine)
    with caplog.at_level("INFO", logger=measurement.logger.name):
        engine.run([[{"name": name, "mask": mask} for name, mask in predictions.items()]], max_epochs=1)

    per_image = {row["image"]: row for row in read_csv(tmp_path / "measurements_per_image.csv")}
    measured = [name for name in predictions if np.isfinite(float(per_image[name]["pred_vertical_cdr"]))]
    assert measured == ["good.png"]  # the others have no ratio: no disc, or no cup inside it
    expected_mae = abs(float(per_image["good.png"]["pred_vertical_cdr"]) - 36 / 60)
    agreement = json.loads((tmp_path / "measurement_agreement.json").read_text())["all"]["vertical_cdr"]
    assert agreement == {**agreement, "n": 1, "undefined_in_prediction": 2}
    assert agreement["mae"] == pytest.approx(expected_mae)
    row = next(r for r in read_csv(tmp_path / "measurement_agreement.csv") if r["measure"] == "vertical_cdr" and r["dataset"] == "all")
    assert (row["n"], row["undefined_in_prediction"]) == ("1", "2")
    assert engine.state.metrics["vertical_cdr_undefined_in_prediction"] == 2
    assert "vertical_cdr MAE" in caplog.text and "over 1 images: 2 predictions have none, left out" in caplog.text


def test_low_predicted_quality_is_flagged(evaluation):
    engine, _, images, folder = evaluation
    per_image = read_csv(folder / "measurements_per_image.csv")
    assert sorted(float(row["predicted_iou"]) for row in per_image) == pytest.approx(sorted(i["iou"] for i in images))
    flagged = json.loads((folder / "measurement_agreement.json").read_text())["all"]["flagged"]
    assert sorted(flagged) == sorted(item["name"] for item in images if item["iou"] < 0.5)
    # The predicted IoU is the lowest channel's, so it ranks the lowest channel's Dice (here the cup's: every disc
    # matches its reference), inside the field of view.
    fov = fundus_fov()
    lowest = {
        item["name"]: min(2 * (p & r & fov).sum() / ((p & fov).sum() + (r & fov).sum())
                          for p, r in zip(item["prediction"], item["reference"]))
        for item in images
    }
    assert [float(row["dice"]) for row in per_image] == pytest.approx([lowest[row["image"]] for row in per_image])
    names = sorted(lowest)
    iou_ranks = ranks(np.array([next(i["iou"] for i in images if i["name"] == n) for n in names]))
    dice_ranks = rankdata([lowest[n] for n in names])  # two cups tie: average ranks
    assert engine.state.metrics["quality_spearman"] == pytest.approx(np.corrcoef(iou_ranks, dice_ranks)[0, 1])
    for row in per_image:
        assert ("low predicted quality" in row["flags"]) == (float(row["predicted_iou"]) < 0.5)


def test_bland_altman_plots_for_the_structures_segmented(evaluation):
    _, _, _, folder = evaluation
    assert (folder / "bland_altman_vertical_cdr.png").stat().st_size > 1000
    assert not (folder / "bland_altman_vessel_density.png").exists()


def test_vessel_agreement_and_spearman_against_ranks(tmp_path):
    rng = np.random.default_rng(0)
    fov = fundus_fov()
    inferer = LatestIoU()
    images = []
    for index, width in enumerate((1, 2, 3, 4, 5)):
        reference = np.zeros((1, SIZE, SIZE), bool)
        reference[0, 20:76, 48 - width // 2 : 48 - width // 2 + width] = True
        prediction = reference.copy()
        prediction[0, 30 : 30 + 8 * index, 30] = True  # a spurious branch, longer in later images
        images.append((f"v{index}.png", prediction, reference, float(rng.uniform(0.55, 1.0))))

    def step(engine: Engine, batch: list) -> list[dict]:
        inferer.last_iou = torch.tensor([[iou] for *_, iou in batch])
        engine.state.batch = [{}] * len(batch)  # decollated items without a dataset name
        return [
            {
                "pred": MetaTensor(torch.from_numpy(p.astype(np.float32)), meta={"filename_or_obj": n}),
                "label": torch.from_numpy(r.astype(np.float32)),
                "fov": torch.from_numpy(fov[None].astype(np.float32)),
            }
            for n, p, r, _ in batch
        ]

    engine = Engine(step)
    # A channel named in another case is the vessels all the same (until 0.3.17: not measured, no plot).
    MeasurementAgreement(tmp_path, ["Vessels"], inferer=inferer).attach(engine)
    engine.run([[image] for image in images], max_epochs=1)

    rows = read_csv(tmp_path / "measurements_per_image.csv")
    assert [row["dataset"] for row in rows] == ["unknown"] * len(images)
    for row, (_, prediction, reference, _) in zip(rows, images):
        inside = fov[None]
        assert float(row["dice"]) == pytest.approx(
            2 * (prediction & reference & inside).sum() / ((prediction & inside).sum() + (reference & inside).sum())
        )
        assert float(row["ref_vessel_density"]) == pytest.approx((reference[0] & fov).sum() / fov.sum())
    iou = np.array([float(row["predicted_iou"]) for row in rows])
    dice = np.array([float(row["dice"]) for row in rows])
    assert engine.state.metrics["quality_spearman"] == pytest.approx(np.corrcoef(ranks(iou), ranks(dice))[0, 1])
    for measure in ("vessel_density", "fractal_dimension"):
        assert (tmp_path / f"bland_altman_{measure}.png").stat().st_size > 1000
    assert not (tmp_path / "bland_altman_vertical_cdr.png").exists()
    assert all(row["flags"] == "" for row in rows)  # fundus-like FOV, predicted IoU above 0.5


def inference_record(folder: Path, name: str, fov_fraction: float, cup_rows: int) -> dict:
    """A record as the prediction writer leaves it, with the overlay it writes."""
    masks = disc_and_cup(60, cup_rows)
    overlay = f"{Path(name).stem}_overlay.png"
    picture = np.stack([masks[0], masks[1], np.zeros_like(masks[0])], -1).astype(np.uint8) * 255
    write_png(folder / overlay, picture)
    measured = measure_structures(masks, ["disc", "cup"])
    return {"image": name, "overlay": overlay, "thumbnail": thumbnail_jpeg(picture), "fov_fraction": fov_fraction, **measured}


def test_inference_report_writes_csv_after_each_batch_and_the_report_at_the_end(tmp_path):
    inferer = LatestIoU()
    batches = [
        [("eye_a.png", 0.7, 30, 0.9), ("eye_b.png", 1.0, 18, 0.8)],  # b: no dark border
        [("eye_c.png", 0.6, 42, 0.2)],  # c: low predicted quality
    ]
    after_first_batch: dict = {}

    def step(engine: Engine, batch: list) -> list[dict]:
        inferer.last_iou = torch.tensor([[iou, iou] for *_, iou in batch])
        return [{"pred_record": inference_record(tmp_path, name, fov, cup)} for name, fov, cup, _ in batch]

    engine = Engine(step)
    report = InferenceReport(tmp_path, ["disc", "cup"], inferer=inferer, quality_threshold=0.5, settings={"model": "m.pt"})
    report.attach(engine)
    # Registered after the report's own handler: what an interrupted run would have on disk after the first batch.
    def keep_what_is_on_disk(_: Engine) -> None:
        if not after_first_batch:
            after_first_batch["rows"] = read_csv(tmp_path / InferenceReport.CSV_NAME)
            after_first_batch["report"] = (tmp_path / InferenceReport.REPORT_NAME).exists()

    engine.add_event_handler(Events.ITERATION_COMPLETED, keep_what_is_on_disk)
    engine.run(batches, max_epochs=1)

    assert [row["image"] for row in after_first_batch["rows"]] == ["eye_a.png", "eye_b.png"]
    assert not after_first_batch["report"]  # the report is written when the run completes
    with open(tmp_path / InferenceReport.CSV_NAME, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert header[:2] == ["image", "flags"] and header[-1] == "notes"
    assert "vertical_cdr [ratio]" in header and "disc_area_px [px²]" in header
    assert "predicted_iou_disc" in header and "predicted_iou_cup" in header
    rows = {row["image"]: row for row in read_csv(tmp_path / InferenceReport.CSV_NAME)}
    assert float(rows["eye_a.png"]["vertical_cdr"]) == pytest.approx(0.5)
    assert float(rows["eye_c.png"]["vertical_cdr"]) == pytest.approx(0.7)
    assert rows["eye_a.png"]["flags"] == ""
    assert "no dark border" in rows["eye_b.png"]["flags"]
    assert rows["eye_c.png"]["flags"].startswith("low predicted quality (IoU 0.20 < 0.5)")
    page = (tmp_path / InferenceReport.REPORT_NAME).read_text(encoding="utf-8")
    for name in rows:
        assert name in page
    assert "low predicted quality" in page and "m.pt" in page



def test_inference_report_adds_each_batch_to_the_csv_and_rewrites_it_only_when_the_columns_change(tmp_path, monkeypatch):
    """At batch size 1 the CSV was rewritten whole after every image: 309 s of writing over 6,000 images. Each
    batch's rows are now appended, and the file after every batch is the whole CSV a rewrite would have written."""
    rewrites = []
    monkeypatch.setattr(measurement, "write_text_atomic", lambda path, text: rewrites.append(path) or write_text_atomic(path, text))
    records = [inference_record(tmp_path, f"eye_{index}.png", 0.7, 20 + index) for index in range(6)]
    records[3]["disc_area_mm2"] = 1.5  # a value the earlier records lack: a new column
    on_disk: list[tuple[int, str]] = []

    def step(engine: Engine, batch: list) -> list[dict]:
        return [{"pred_record": record} for record in batch]

    engine = Engine(step)
    report = InferenceReport(tmp_path, ["disc", "cup"])
    report.attach(engine)
    engine.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda _: on_disk.append((len(rewrites), (tmp_path / InferenceReport.CSV_NAME).read_text(encoding="utf-8"))),
    )
    engine.run([[record] for record in records], max_epochs=1)

    assert [count for count, _ in on_disk] == [1, 1, 1, 2, 2, 2], "written whole at the start and for the new column"
    for done, (_, text) in enumerate(on_disk, 1):
        columns = [column for column in report.columns() if done > 3 or column != "disc_area_mm2"]
        assert text == measurement._csv(report.rows[:done], columns), f"after image {done}: not the CSV of the rows so far"
        rows = list(csv.reader(io.StringIO(text)))
        assert [row[0] for row in rows[1:]] == [f"eye_{index}.png" for index in range(done)]
        assert {len(row) for row in rows} == {len(rows[0])}
    header = on_disk[-1][1].splitlines()[0].split(",")
    assert "disc_area_mm2 [mm²]" in header
    table = read_csv(tmp_path / InferenceReport.CSV_NAME)
    assert [row["disc_area_mm2"] for row in table] == ["", "", "", "1.5", "", ""]


def test_measurement_tables_keep_names_a_spreadsheet_would_run_as_formulas_as_text(tmp_path):
    """measurements.csv, appended batch by batch, neutralises formula-like names as the evaluation reports do."""
    names = ["=cmd.png", "@A1.png", "eye.png"]
    records = [inference_record(tmp_path, name, 0.7, 20 + index) for index, name in enumerate(names)]
    engine = Engine(lambda engine, batch: [{"pred_record": record} for record in batch])
    InferenceReport(tmp_path, ["disc", "cup"]).attach(engine)
    engine.run([[record] for record in records], max_epochs=1)
    assert [row["image"] for row in read_csv(tmp_path / InferenceReport.CSV_NAME)] == ["'=cmd.png", "'@A1.png", "eye.png"]


@pytest.mark.parametrize("change", ["removed", "cut", "replaced", "edited"])
def test_inference_report_writes_the_csv_whole_again_when_someone_else_changed_it(tmp_path, change):
    """Rows are added to the file only while it is as the run left it; appended to a file cut short, replaced or
    edited (same size here: the size alone would not tell), they would follow half a line or another table."""
    records = [inference_record(tmp_path, f"eye_{index}.png", 0.7, 20 + index) for index in range(3)]
    engine = Engine(lambda engine, batch: [{"pred_record": record} for record in batch])
    report = InferenceReport(tmp_path, ["disc", "cup"])
    report.attach(engine)
    path = tmp_path / InferenceReport.CSV_NAME

    def meddle(engine: Engine) -> None:
        if engine.state.iteration != 2:
            return
        size, other = path.stat().st_size, tmp_path / "other.csv"
        if change == "removed":
            path.unlink()
        elif change == "cut":
            path.write_bytes(path.read_bytes()[:-7])
        elif change == "replaced":  # a new file moved into its place
            other.write_bytes(b"another,table\n" + b"x" * (size - 14))
            other.replace(path)
        else:  # rewritten in place a second later
            path.write_bytes(b"another,table\n" + b"x" * (size - 14))
            os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
        assert change in ("removed", "cut") or path.stat().st_size == size

    engine.add_event_handler(Events.ITERATION_COMPLETED, meddle)
    engine.run([[record] for record in records], max_epochs=1)

    assert path.read_text(encoding="utf-8") == measurement._csv(report.rows, report.columns())
    assert [row["image"] for row in read_csv(path)] == ["eye_0.png", "eye_1.png", "eye_2.png"]


@pytest.mark.parametrize(
    ("bound", "expected"),
    [(2, {"eye_c.png", "eye_d.png"}), (3, {"eye_c.png", "eye_d.png", "eye_a.png"}), (0, set())],
)
def test_the_report_embeds_the_flagged_overlays_first_and_shows_the_others_from_their_files(tmp_path, bound, expected):
    """At 10,000 photographs embedding every overlay made a page of about 1.1 GB; past the bound they are linked."""
    inferer = LatestIoU()
    # eye_c has no dark border and eye_d a low predicted IoU: both flagged, after two that are not
    eyes = [("eye_a.png", 0.7, 0.9), ("eye b#1.png", 0.7, 0.9), ("eye_c.png", 1.0, 0.9), ("eye_d.png", 0.6, 0.2)]
    thumbnails = {}

    def step(engine: Engine, batch: list) -> list[dict]:
        inferer.last_iou = torch.tensor([[iou, iou] for *_, iou in batch])
        records = [inference_record(tmp_path, name, fov, 20) for name, fov, _ in batch]
        thumbnails.update((record["image"], record["thumbnail"]) for record in records)
        return [{"pred_record": record} for record in records]

    engine = Engine(step)
    report = InferenceReport(tmp_path, ["disc", "cup"], inferer=inferer, embedded_thumbnails=bound)
    report.attach(engine)
    engine.run([[eye] for eye in eyes], max_epochs=1)

    page = (tmp_path / InferenceReport.REPORT_NAME).read_text(encoding="utf-8")
    sources = {name: source for source, name in re.findall(r'<img src="([^"]+)"[^>]* alt="overlay of ([^"]+)"', page)}
    assert len(sources) == 4
    embedded = {name for name, source in sources.items() if source.startswith("data:image/jpeg;base64,")}
    assert embedded == expected
    for name in embedded:
        assert base64.b64decode(sources[name].split(",", 1)[1]) == thumbnails[name], "the writer's thumbnail"
    if "eye_a.png" not in embedded:
        assert sources["eye_a.png"] == "eye_a_overlay.png"
    assert sources["eye b#1.png"] == "eye%20b%231_overlay.png", "a file name's space and # escaped in the address"
    assert (tmp_path / "eye b#1_overlay.png").is_file()
    assert page.count('loading="lazy"') == 4 - len(expected)
    assert f"The overlays of {4 - len(expected)} of them are shown from their files" in page
    assert len(report._thumbnails) <= 2 * bound, "held until the end: the first of the flagged and of the others"
    assert all("thumbnail" not in row for row in read_csv(tmp_path / InferenceReport.CSV_NAME))


def test_bland_altman_lines_carry_the_bias_and_limits_of_agreement(tmp_path, monkeypatch):
    from scripts import plots

    texts: list[str] = []
    original = plots._save_figure

    def keep_texts(figure, path):
        texts.extend(text.get_text() for text in figure.axes[0].texts)
        original(figure, path)

    monkeypatch.setattr(plots, "_save_figure", keep_texts)
    reference = [0.30, 0.42, 0.35, 0.51, float("nan")]
    predicted = [0.33, 0.40, 0.41, 0.55, 0.38]  # the last image has no reference value: left out
    plots.plot_bland_altman(reference, predicted, tmp_path / "ba.png", "vertical CDR")
    difference = np.array(predicted[:4]) - np.array(reference[:4])
    bias, spread = difference.mean(), difference.std(ddof=1)
    assert texts == [f"bias {bias:.3g}", f"+1.96 SD {bias + 1.96 * spread:.3g}", f"-1.96 SD {bias - 1.96 * spread:.3g}"]

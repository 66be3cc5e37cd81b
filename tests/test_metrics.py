from __future__ import annotations

import csv
import json
import logging
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.metrics import compute_hausdorff_distance, compute_roc_auc
from monai.transforms import Activationsd, AsDiscrete
from scipy import ndimage
from skimage.morphology import skeletonize
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    jaccard_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

from scripts.handlers import FundusMetricsWriter
from scripts.masks import binarise
from scripts.metrics import (
    METRICS,
    ReportWriteError,
    evaluate_case,
    format_summary_table,
    summarise,
    write_reports,
)


def _disc(shape: tuple[int, int], radius: float) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - shape[0] / 2) ** 2 + (cols - shape[1] / 2) ** 2 <= radius**2


def _sklearn_metrics(prob: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Independent reference values for flat probabilities and labels."""
    pred = prob >= 0.5
    return {
        "dice": f1_score(label, pred),
        "iou": jaccard_score(label, pred),
        "auc": roc_auc_score(label, prob),
        "sensitivity": recall_score(label, pred),
        "specificity": recall_score(label, pred, pos_label=0),
        "accuracy": accuracy_score(label, pred),
        "precision": precision_score(label, pred),
        "mcc": matthews_corrcoef(label, pred),
    }


@pytest.fixture
def random_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two channels of random probabilities correlated with random labels, and a disc-shaped FOV."""
    rng = np.random.default_rng(7)
    label = rng.random((2, 48, 64)) < np.array([0.15, 0.4])[:, None, None]
    # Rounding creates tied probabilities, which AUC implementations must handle alike.
    prob = np.round(np.clip(0.35 * label + 0.65 * rng.random(label.shape), 0.0, 1.0), 2)
    return prob, label.astype(np.uint8), _disc((48, 64), 22).astype(np.uint8)


def test_matches_sklearn_inside_fov_and_over_image(random_case):
    prob, label, fov = random_case
    record = evaluate_case(prob, label, fov, channel_names=["disc", "cup"], topology=False)
    inside = fov.astype(bool)
    for channel, name in enumerate(["disc", "cup"]):
        expected = {
            "fov": _sklearn_metrics(prob[channel][inside], label[channel][inside]),
            "image": _sklearn_metrics(prob[channel].ravel(), label[channel].ravel()),
        }
        for region, values in expected.items():
            for metric, value in values.items():
                assert record[f"{name}/{region}/{metric}"] == pytest.approx(value, abs=1e-12), (name, region, metric)


def test_auc_equals_monai_compute_roc_auc(random_case):
    prob, label, _ = random_case
    record = evaluate_case(prob, label, None, channel_names=["disc", "cup"], topology=False)
    for channel, name in enumerate(["disc", "cup"]):
        monai_auc = compute_roc_auc(torch.from_numpy(prob[channel].ravel()), torch.from_numpy(label[channel].ravel()))
        assert record[f"{name}/image/auc"] == pytest.approx(float(monai_auc), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_network_precisions_give_the_metrics_of_the_same_values_in_float64(random_case, dtype):
    """A network's float32 or bf16 probabilities are evaluated as given (the AUC sorts them in their own precision):
    the record equals that of the same values widened to float64, and scikit-learn's AUC of them."""
    prob, label, fov = random_case
    given = torch.from_numpy(prob).to(dtype)
    widened = given.double().numpy()
    record = evaluate_case(given, label, fov, channel_names=["disc", "cup"], topology=False)
    assert record == evaluate_case(widened, label, fov, channel_names=["disc", "cup"], topology=False)
    inside = fov.astype(bool)
    for channel, name in enumerate(["disc", "cup"]):
        expected = roc_auc_score(label[channel][inside], widened[channel][inside])
        assert record[f"{name}/fov/auc"] == pytest.approx(expected, abs=1e-12)


def test_probabilities_a_rounding_step_outside_0_1_are_evaluated_as_their_bound(random_case):
    """Probabilities resampled to a photograph's size can end a float32 step above 1 or below 0: the record is the
    one of the clipped values, not an error that stops the evaluation."""
    prob, label, fov = random_case
    clipped = prob.astype(np.float32)
    clipped[0, :3] = 1.0
    clipped[1, :3] = 0.0
    overshot = clipped.copy()
    overshot[0, :3] = np.nextafter(np.float32(1), np.float32(2))
    overshot[1, :3] = -np.float32(1e-7)
    record = evaluate_case(overshot, label, fov, channel_names=["disc", "cup"], topology=False)
    assert record == evaluate_case(clipped, label, fov, channel_names=["disc", "cup"], topology=False)


def test_keys_are_named_by_channel_region_metric(random_case):
    prob, label, fov = random_case
    tensors = [torch.from_numpy(array) for array in (prob, label, fov[None])]
    record = evaluate_case(*tensors, channel_names=["disc", "cup"])
    expected = [f"{c}/{r}/{m}" for c in ("disc", "cup") for r in ("fov", "image") for m in METRICS]
    assert list(record) == expected
    assert all(isinstance(value, float) for value in record.values())


def test_without_fov_only_whole_image_is_reported(random_case):
    prob, label, _ = random_case
    record = evaluate_case(prob[0], label[0], None, channel_names=["vessels"], topology=False)
    assert record and all(key.startswith("vessels/image/") for key in record)


def test_hand_computed_case():
    # 2 x 4 image: tp = 2, fp = 1, fn = 1, tn = 4.
    label = np.array([[[1, 1, 1, 0], [0, 0, 0, 0]]])
    prob = np.array([[[0.9, 0.5, 0.2, 0.7], [0.1, 0.0, 0.3, 0.4]]])
    record = evaluate_case(prob, label, None, topology=False)
    assert record["vessels/image/dice"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert record["vessels/image/iou"] == pytest.approx(2 / 4)
    assert record["vessels/image/sensitivity"] == pytest.approx(2 / 3)
    assert record["vessels/image/specificity"] == pytest.approx(4 / 5)
    assert record["vessels/image/precision"] == pytest.approx(2 / 3)
    assert record["vessels/image/accuracy"] == pytest.approx(6 / 8)
    assert record["vessels/image/mcc"] == pytest.approx((2 * 4 - 1 * 1) / math.sqrt(3 * 3 * 5 * 5))
    # Positives 0.9, 0.5, 0.2 against negatives 0.7, 0.1, 0.0, 0.3, 0.4: 11 of 15 pairs ordered correctly.
    assert record["vessels/image/auc"] == pytest.approx(11 / 15)


def test_threshold_is_inclusive_as_monai_asdiscrete():
    label = np.array([[[1, 0]]])
    assert evaluate_case(np.array([[[0.5, 0.49]]]), label, topology=False)["vessels/image/dice"] == 1.0
    assert evaluate_case(np.array([[[0.5, 0.49]]]), label, threshold=0.6, topology=False)["vessels/image/dice"] == 0.0


def test_both_empty():
    record = evaluate_case(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)))
    assert record["vessels/image/dice"] == 1.0
    assert record["vessels/image/iou"] == 1.0
    assert record["vessels/image/cldice"] == 1.0
    assert record["vessels/image/hd95"] == 0.0
    assert record["vessels/image/accuracy"] == 1.0
    assert record["vessels/image/specificity"] == 1.0
    for metric in ("auc", "sensitivity", "precision", "mcc"):
        assert math.isnan(record[f"vessels/image/{metric}"]), metric


def test_empty_label_with_prediction():
    prob = np.zeros((1, 8, 8))
    prob[0, 2:4, 2:4] = 0.9
    record = evaluate_case(prob, np.zeros((1, 8, 8)))
    assert record["vessels/image/dice"] == 0.0
    assert record["vessels/image/precision"] == 0.0
    assert record["vessels/image/cldice"] == 0.0
    for metric in ("auc", "sensitivity", "hd95", "mcc"):
        assert math.isnan(record[f"vessels/image/{metric}"]), metric


def test_empty_prediction_with_label():
    label = np.zeros((1, 8, 8))
    label[0, 2:4, 2:4] = 1
    record = evaluate_case(np.full((1, 8, 8), 0.1), label)
    assert record["vessels/image/dice"] == 0.0
    assert record["vessels/image/sensitivity"] == 0.0
    assert record["vessels/image/cldice"] == 0.0
    assert record["vessels/image/auc"] == 0.5
    # A missed structure scores 0, as scikit-learn scores it, rather than NaN, which the means would leave out.
    flat_label, nothing = label.ravel().astype(bool), np.zeros(64, bool)
    assert record["vessels/image/precision"] == precision_score(flat_label, nothing, zero_division=0) == 0.0
    assert record["vessels/image/mcc"] == matthews_corrcoef(flat_label, nothing) == 0.0
    assert math.isnan(record["vessels/image/hd95"]), "no distance to nothing"
    everything = evaluate_case(np.full((1, 8, 8), 0.9), label)
    assert everything["vessels/image/mcc"] == matthews_corrcoef(flat_label, ~nothing) == 0.0
    assert everything["vessels/image/precision"] == precision_score(flat_label, ~nothing) == 4 / 64
    # Against an empty reference a correlation is undefined, as the AUC is; nothing to find and nothing found has
    # no precision.
    neither = evaluate_case(np.full((1, 8, 8), 0.1), np.zeros((1, 8, 8)))
    assert math.isnan(neither["vessels/image/mcc"]) and math.isnan(neither["vessels/image/precision"])


def test_cldice_penalises_a_gap_in_a_line():
    label = np.zeros((1, 21, 41))
    label[0, 9:12, 2:39] = 1  # a horizontal vessel three pixels wide
    gapped = label.copy()
    gapped[0, :, 18:23] = 0
    perfect = evaluate_case(label, label)
    broken = evaluate_case(gapped, label)
    assert perfect["vessels/image/cldice"] == 1.0
    assert 0.5 < broken["vessels/image/cldice"] < 1.0
    # The prediction's skeleton lies on the label (topology precision 1); the label's skeleton loses the 5 gap
    # pixels (topology sensitivity 1 - 5 / length).
    sensitivity = 1.0 - 5.0 / np.count_nonzero(skeletonize(label[0].astype(bool)))
    assert broken["vessels/image/cldice"] == pytest.approx(2 * sensitivity / (1 + sensitivity))


def test_hd95_equals_monais_on_the_whole_picture():
    """HD95 is computed in numpy, on the masks' bounding box (for speed): it must equal MONAI's over the whole
    picture, also for masks that touch the picture's edges, where the edge pixels count as boundary."""
    generator = np.random.default_rng(11)
    cases = []
    for _ in range(12):
        field = ndimage.gaussian_filter(generator.random((90, 120)), sigma=generator.uniform(2, 6))
        pred, label = field > np.quantile(field, generator.uniform(0.6, 0.95)), field > np.quantile(field, 0.8)
        cases.append((pred, label))
    corner = np.zeros((90, 120), bool)
    corner[:30, :25] = True  # touches two edges of the picture
    cases += [(corner, np.roll(corner, 3, axis=0)), (corner, np.flip(corner, axis=(0, 1)).copy())]
    for pred, label in cases:
        expected = compute_hausdorff_distance(
            torch.from_numpy(pred[None, None]), torch.from_numpy(label[None, None]), include_background=True, percentile=95
        )
        ours = evaluate_case(pred.astype(float), label)["vessels/image/hd95"]
        assert ours == pytest.approx(float(expected.item()), rel=1e-6)


def test_channels_scored_on_shared_cores_give_each_channels_own_metrics(monkeypatch):
    """Several channels (prompt modes) are scored in threads: each must get its own values, as when scored alone."""
    import scripts.metrics

    rng = np.random.default_rng(3)
    shape = (56, 72)
    label = np.stack([ndimage.binary_dilation(rng.random(shape) < 0.02, iterations=radius) for radius in (1, 2, 3, 4)])
    prob = np.clip(0.3 * label + 0.8 * ndimage.uniform_filter(rng.random(label.shape), (1, 3, 3)), 0.0, 1.0)
    fov = _disc(shape, 30)
    names = ["a", "b", "c", "d"]
    together = evaluate_case(prob, label, fov, names, topology=True)

    for channel, name in enumerate(names):
        alone = evaluate_case(prob[channel], label[channel], fov, [name], topology=True)
        assert {key: together[key] for key in alone} == pytest.approx(alone, nan_ok=True)
    assert len({together[f"{name}/image/auc"] for name in names}) == len(names)  # the channels do differ

    monkeypatch.setattr(scripts.metrics, "usable_cores", lambda: 1)
    assert evaluate_case(prob, label, fov, names, topology=True) == pytest.approx(together, nan_ok=True)


def test_hd95_of_a_shifted_square():
    label = np.zeros((1, 40, 40))
    label[0, 10:20, 10:20] = 1
    shifted = np.zeros((1, 40, 40))
    shifted[0, 13:23, 10:20] = 1
    assert evaluate_case(shifted, label)["vessels/image/hd95"] == pytest.approx(3.0)


def test_fov_restriction_ignores_errors_outside_the_fov():
    fov = _disc((40, 40), 15)
    label = np.zeros((1, 40, 40))
    label[0, 18:22, 8:32] = 1
    prob = label.copy()
    prob[0][~fov] = 1.0  # every pixel outside the FOV is a false positive
    record = evaluate_case(prob, label, fov.astype(np.uint8))
    assert record["vessels/fov/specificity"] == 1.0
    assert record["vessels/fov/accuracy"] == 1.0
    assert record["vessels/fov/dice"] == 1.0
    assert record["vessels/fov/hd95"] == 0.0
    assert record["vessels/fov/cldice"] == 1.0
    assert record["vessels/image/specificity"] < 0.5
    assert record["vessels/image/accuracy"] < 0.5
    assert record["vessels/image/dice"] < 0.5


@pytest.mark.parametrize(
    "prob, label, fov, names, message",
    [
        (np.full((1, 4, 4), 1.5), np.zeros((1, 4, 4)), None, ["vessels"], "probabilities"),
        (np.full((1, 4, 4), 1.0 + 1e-5), np.zeros((1, 4, 4)), None, ["vessels"], "probabilities"),
        (np.full((1, 4, 4), -1e-5), np.zeros((1, 4, 4)), None, ["vessels"], "probabilities"),
        (np.full((1, 4, 4), np.nan), np.zeros((1, 4, 4)), None, ["vessels"], "probabilities"),
        (np.zeros((1, 4, 4)), np.full((1, 4, 4), 255), None, ["vessels"], "only 0 and 1"),
        (np.zeros((1, 4, 4)), np.zeros((1, 4, 5)), None, ["vessels"], "shapes differ"),
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), None, ["vessels"], "channel_names"),
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), None, ["disc", "disc"], "channel_names"),
        (np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), np.zeros((4, 4)), ["vessels"], "fov mask is empty"),
        (np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), np.ones((3, 4)), ["vessels"], "fov shape"),
    ],
)
def test_invalid_inputs_are_reported(prob, label, fov, names, message):
    with pytest.raises(ValueError, match=message):
        evaluate_case(prob, label, fov, names)


def _records() -> list[dict]:
    return [
        {"filename": "a.png", "dataset": "DRIVE", "fov_source": "given", "vessels/fov/dice": 0.8, "vessels/fov/hd95": 2.0},
        {"filename": "b.png", "dataset": "DRIVE", "fov_source": "given", "vessels/fov/dice": 0.6,
         "vessels/fov/hd95": math.nan},
        {"filename": "c.png", "dataset": "STARE", "fov_source": "estimated", "vessels/fov/dice": 0.7,
         "vessels/fov/hd95": 4.0},
        {"filename": "d.png", "vessels/image/dice": 0.5},
    ]


def test_summarise_groups_by_dataset_and_counts_nan():
    summary = summarise(_records())
    drive = summary["datasets"]["DRIVE"]
    assert drive["images"] == 2
    dice = drive["metrics"]["vessels/fov/dice"]
    assert dice == {"mean": pytest.approx(0.7), "std": pytest.approx(0.1), "n": 2, "nan": 0}
    assert drive["metrics"]["vessels/fov/hd95"] == {"mean": 2.0, "std": 0.0, "n": 1, "nan": 1}
    assert set(summary["datasets"]) == {"DRIVE", "STARE", "unknown"}
    overall = summary["all"]["metrics"]
    assert overall["vessels/fov/dice"]["mean"] == pytest.approx(0.7)
    assert overall["vessels/fov/dice"]["std"] == pytest.approx(np.std([0.8, 0.6, 0.7]))
    assert overall["vessels/fov/hd95"]["n"] == 2 and overall["vessels/fov/hd95"]["nan"] == 1
    # A metric missing from a record is neither a value nor a NaN.
    assert overall["vessels/image/dice"] == {"mean": 0.5, "std": 0.0, "n": 1, "nan": 0}
    # d.png has no field of view: it counts in neither source.
    assert drive["fov_sources"] == {"given": 2, "estimated": 0}
    assert summary["all"]["fov_sources"] == {"given": 2, "estimated": 1}


def test_format_summary_table_lists_groups_and_undefined_values():
    table = format_summary_table(summarise(_records()))
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["dataset", "channel", "region", "images"]
    assert "hd95 [px]" in lines[0]
    assert any(line.startswith("DRIVE") and "0.7000±0.1000" in line for line in lines)
    assert any(line.startswith("all") for line in lines)
    assert "DRIVE vessels/fov/hd95: 1 of 2 undefined" in table
    assert lines[-1] == "fields of view estimated from the photograph (no FOV mask in the datalist): STARE: 1 of 1; all: 1 of 4"


def test_write_reports(tmp_path):
    records = _records()
    summary = summarise(records)
    paths = write_reports(records, summary, tmp_path / "new" / "folder", metadata={"threshold": 0.5})
    with open(paths["per_image_csv"], newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["filename"] for row in rows] == ["a.png", "b.png", "c.png", "d.png"]
    assert rows[1]["dataset"] == "DRIVE" and rows[1]["vessels/fov/hd95 [px]"] == "nan", "its unit in the header"
    assert rows[3]["dataset"] == "" and rows[3]["vessels/fov/dice"] == ""
    assert [row["fov_source"] for row in rows] == ["given", "given", "estimated", ""]
    assert float(rows[0]["vessels/fov/dice"]) == 0.8
    document = json.loads(paths["summary_json"].read_text())
    assert document["metadata"] == {"threshold": 0.5}
    assert document["summary"]["datasets"]["DRIVE"]["metrics"]["vessels/fov/hd95"]["mean"] == 2.0
    assert set(document["summary"]["datasets"]) == {"DRIVE", "STARE", "unknown"}
    with open(paths["summary_csv"], newline="") as stream:
        summary_rows = list(csv.DictReader(stream))
    overall_dice = [r for r in summary_rows if r["dataset"] == "all" and r["region"] == "fov" and r["metric"] == "dice"]
    assert len(overall_dice) == 1 and float(overall_dice[0]["mean"]) == pytest.approx(0.7)
    assert overall_dice[0]["channel"] == "vessels" and overall_dice[0]["n"] == "3" and overall_dice[0]["nan"] == "0"
    assert {(r["metric"], r["unit"]) for r in summary_rows} == {("dice", ""), ("hd95", "px")}
    assert document["units"] == {"hd95": "px"}
    assert sorted(p.name for p in paths["summary_json"].parent.iterdir()) == sorted(p.name for p in paths.values())


def test_reports_keep_names_a_spreadsheet_would_run_as_formulas_as_text(tmp_path):
    """CSV injection: a cell starting with = + - @ (or a tab) runs as a formula when the report is opened in a
    spreadsheet. Names from users' folders get OWASP's leading apostrophe; numbers, negative ones too, stay numbers."""
    names = ['=HYPERLINK("http://example.org/x","open").png', "@SUM(A1).png", "+1.png", "-left.png", "\tx.png", "eye=1.png"]
    records = [
        {"filename": name, "dataset": "=1+1", "fov_source": "given", "vessels/fov/mcc": -0.25, "vessels/fov/dice": 0.5}
        for name in names
    ]
    paths = write_reports(records, summarise(records), tmp_path)
    with open(paths["per_image_csv"], newline="") as stream:
        rows = list(csv.DictReader(stream))
    kept = [name if name[0] not in "=+-@\t" else "'" + name for name in names]
    assert [row["filename"] for row in rows] == kept and kept[-1] == "eye=1.png"
    assert {row["dataset"] for row in rows} == {"'=1+1"}
    assert [float(row["vessels/fov/mcc"]) for row in rows] == [-0.25] * len(names)
    with open(paths["summary_csv"], newline="") as stream:
        summary_rows = list(csv.DictReader(stream))
    assert {row["dataset"] for row in summary_rows} == {"'=1+1", "all"}
    assert {float(row["mean"]) for row in summary_rows if row["metric"] == "mcc"} == {-0.25}


def test_write_reports_nan_becomes_json_null(tmp_path):
    records = [{"filename": "a", "dataset": "x", "vessels/image/hd95": math.nan}]
    paths = write_reports(records, summarise(records), tmp_path)
    statistic = json.loads(paths["summary_json"].read_text())["summary"]["all"]["metrics"]["vessels/image/hd95"]
    assert statistic == {"mean": None, "std": None, "n": 0, "nan": 1}


def test_write_reports_unwritable_folder_names_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / "reports"
    with pytest.raises(ReportWriteError, match=str(target)):
        write_reports(_records(), summarise(_records()), target)


def _vessel_sample(seed: int, with_meta: bool) -> tuple[dict, dict]:
    """A per-image (output, input) pair shaped like a decollated MONAI evaluator's."""
    rng = np.random.default_rng(seed)
    label = np.zeros((1, 32, 32), dtype=np.float32)
    label[0, 14:17, 3:29] = 1
    prob = np.clip(label * 0.8 + rng.random(label.shape) * 0.4, 0, 1).astype(np.float32)
    meta = {"filename_or_obj": f"/data/case_{seed}.png"} if with_meta else {}
    output = {"pred": MetaTensor(torch.from_numpy(prob), meta=meta), "label": torch.from_numpy(label)}
    fov = torch.from_numpy(_disc((32, 32), 14)[None].astype(np.float32))
    return output, {"fov": fov, "dataset": "DRIVE" if seed % 2 else "CHASE_DB1"}


def test_writer_handler_with_a_real_engine(tmp_path, caplog):
    batches = [[_vessel_sample(0, True), _vessel_sample(1, True)], [_vessel_sample(2, False)]]

    def step(engine: Engine, batch: list[tuple[dict, dict]]) -> list[dict]:
        # As MONAI after decollation: state.output and state.batch are lists of per-image dicts.
        engine.state.batch = [item for _, item in batch]
        return [output for output, _ in batch]

    engine = Engine(step)
    writer = FundusMetricsWriter(tmp_path / "eval", channel_names=["vessels"])
    writer.attach(engine)
    with caplog.at_level(logging.INFO, logger="scripts.handlers.evaluation"):
        engine.run(batches, max_epochs=2)

    assert len(writer.records) == 3  # reset at each epoch
    assert [r["filename"] for r in writer.records] == ["/data/case_0.png", "/data/case_1.png", "case_0002"]
    assert [r["dataset"] for r in writer.records] == ["CHASE_DB1", "DRIVE", "CHASE_DB1"]
    assert "vessels/fov/dice" in writer.records[0]
    assert engine.state.metrics["vessels_fov_dice"] == pytest.approx(
        np.mean([r["vessels/fov/dice"] for r in writer.records])
    )
    assert "vessels_image_cldice" in engine.state.metrics
    with open(writer.paths["per_image_csv"], newline="") as stream:
        assert len(list(csv.DictReader(stream))) == 3
    document = json.loads(writer.paths["summary_json"].read_text())
    assert set(document["summary"]["datasets"]) == {"CHASE_DB1", "DRIVE"}
    assert "evaluation of 3 images" in caplog.text and "vessels" in caplog.text


def test_writer_handler_batched_output_without_fov_or_dataset(tmp_path):
    label = torch.zeros(2, 2, 16, 16)
    label[:, 0, 4:12, 4:12] = 1
    label[:, 1, 6:10, 6:10] = 1

    def step(engine: Engine, batch: torch.Tensor) -> dict:
        return {"pred": batch, "label": label}

    engine = Engine(step)
    writer = FundusMetricsWriter(
        tmp_path, ["disc", "cup"], topology=False, metric_name_format="{channel}/{region}/{metric}"
    )
    writer.attach(engine)
    engine.run([label * 0.9], max_epochs=1)
    assert [r["dataset"] for r in writer.records] == ["unknown", "unknown"]
    assert not any("/fov/" in key for key in writer.records[0])
    assert engine.state.metrics["disc/image/dice"] == 1.0
    assert engine.state.metrics["cup/image/dice"] == 1.0
    assert "disc/image/cldice" not in engine.state.metrics


def test_writer_handler_rejects_ambiguous_metric_names(tmp_path):
    with pytest.raises(ValueError, match="same name"):
        FundusMetricsWriter(tmp_path, ["disc", "cup"], metric_name_format="{region}_{metric}")


def test_writer_handler_reports_unwritable_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    output, item = _vessel_sample(0, True)

    def step(engine: Engine, batch: int) -> list[dict]:
        engine.state.batch = [item]
        return [output]

    engine = Engine(step)
    FundusMetricsWriter(blocker / "eval", ["vessels"]).attach(engine)
    with pytest.raises(ReportWriteError, match="a_file"):
        engine.run([0], max_epochs=1)


def test_writer_handler_in_a_monai_supervised_evaluator(tmp_path):
    samples = []
    for index in range(3):
        output, item = _vessel_sample(index, True)
        label = output["label"]
        image = MetaTensor(label * 8.0 - 4.0, meta={"filename_or_obj": f"/data/image_{index}.png"})
        samples.append({"image": image, "label": label, **item})
    network = torch.nn.Identity()  # logits +-4: the sigmoid gives the label back
    writer = FundusMetricsWriter(tmp_path, ["vessels"], metric_name_format="{region}_{metric}")
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(samples), batch_size=2),
        network=network,
        postprocessing=Activationsd(keys="pred", sigmoid=True),
        val_handlers=[writer],
    )
    evaluator.run()
    assert [r["filename"] for r in writer.records] == [f"/data/image_{i}.png" for i in range(3)]
    assert [r["dataset"] for r in writer.records] == ["CHASE_DB1", "DRIVE", "CHASE_DB1"]
    assert evaluator.state.metrics["fov_dice"] == 1.0
    assert evaluator.state.metrics["image_auc"] == 1.0


def test_accepts_low_precision_tensors(random_case):
    prob, label, _ = random_case
    low = torch.from_numpy(prob).to(torch.bfloat16)
    record = evaluate_case(low, torch.from_numpy(label), None, ["disc", "cup"])
    # The same probabilities in float32 (bfloat16's values exactly) must give the same figures.
    reference = evaluate_case(low.float().numpy(), label, None, ["disc", "cup"])
    assert record.keys() == reference.keys()
    for key, value in reference.items():
        assert record[key] == pytest.approx(value, nan_ok=True), key


@pytest.mark.parametrize("threshold", [0.7, 0.9, 0.45])
def test_a_pixel_at_a_threshold_float32_rounds_counts_as_the_masks_count_it(threshold):
    # float32(threshold) differs from threshold: the metrics must binarise as MONAI's AsDiscrete and the masks do.
    probabilities = np.full((4, 5), np.float32(threshold), np.float32)
    probabilities[0, 0] = 0.0
    label = probabilities > 0
    monai_masks = AsDiscrete(threshold=threshold)(torch.from_numpy(probabilities)[None])[0].numpy() > 0
    assert np.array_equal(binarise(probabilities, threshold), monai_masks) and monai_masks.sum() == 19
    record = evaluate_case(probabilities, label, threshold=threshold, topology=False)
    assert record["vessels/image/dice"] == 1.0 and record["vessels/image/sensitivity"] == 1.0


def test_the_table_counts_the_images_each_row_measured():
    label = np.zeros((20, 20))
    label[5:9, 5:9] = 1
    # Three images of one dataset, one of them with a field of view: its FOV row measured one image.
    records = [
        {**evaluate_case(label, label, np.ones((20, 20)) if index == 0 else None, topology=False), "dataset": "A"}
        for index in range(3)
    ]
    rows = {tuple(line.split()[1:4]) for line in format_summary_table(summarise(records)).splitlines()[2:]}
    assert ("vessels", "fov", "1") in rows and ("vessels", "image", "3") in rows


def test_reports_take_numpy_values_in_their_metadata(tmp_path):
    records = _records()
    metadata = {"flag": np.bool_(True), "thresholds": np.array([0.5, np.nan]), "count": np.int64(3)}
    paths = write_reports(records, summarise(records), tmp_path, metadata=metadata)
    written = json.loads(paths["summary_json"].read_text())["metadata"]
    assert written == {"flag": True, "thresholds": [0.5, None], "count": 3}

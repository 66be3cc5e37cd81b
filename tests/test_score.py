"""tools.score: predictions made elsewhere, scored as the bundle's evaluation scores, checked against scikit-learn."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

from scripts.errors import ConfigError
from scripts.fundus_io import FundusImageError, read_label_mask, write_png
from tools.prepare import prepare_dataset
from tools.score import main, read_prediction, score_predictions


def _case(folder: Path, name: str, seed: int, size: int = 96) -> dict[str, str]:
    """A photograph with a circular field of view and a random vessel-like label, written as PNG files."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    fov = (rows - size / 2) ** 2 + (cols - size / 2) ** 2 <= (0.45 * size) ** 2
    label = np.zeros((size, size), dtype=bool)
    for row in rng.choice(np.arange(10, size - 10, 6), size=4, replace=False):
        label[row : row + 2, 5:-5] = True
    label &= fov
    image = np.where(fov[..., None], 0.6, 0.02) * np.ones((size, size, 3))
    for kind, array in (("image", image), ("label", label), ("fov", fov)):
        write_png(folder / f"{name}_{kind}.png", array)
    return {"image": f"{name}_image.png", "label": f"{name}_label.png", "fov": f"{name}_fov.png", "dataset": "toy"}


@pytest.fixture
def datalist(tmp_path: Path) -> Path:
    cases = [_case(tmp_path, f"case{i}", i) for i in range(3)]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": cases[:1], "validation": [], "test": cases[1:]}))
    return path


def _noisy_probabilities(label: np.ndarray, seed: int) -> np.ndarray:
    """Probabilities that rank vessels mostly above background, with errors both ways."""
    rng = np.random.default_rng(seed)
    return np.clip(0.35 * label + rng.uniform(0.0, 0.65, label.shape), 0.0, 1.0)


def _per_image(output: Path) -> dict[str, dict[str, str]]:
    with open(output / "metrics_per_image.csv", newline="") as table:
        return {Path(row["filename"]).name: row for row in csv.DictReader(table)}


def test_scores_probability_maps_as_scikit_learn_does(datalist: Path, tmp_path: Path):
    predictions = tmp_path / "predictions"
    expected = {}
    for seed, name in enumerate(("case1", "case2")):
        label = read_label_mask(tmp_path / f"{name}_label.png")
        fov = read_label_mask(tmp_path / f"{name}_fov.png")
        write_png(predictions / f"{name}_image_prob.png", _noisy_probabilities(label, seed))  # run inference's name
        stored, _ = read_prediction(predictions / f"{name}_image_prob.png", "probabilities")  # 8-bit, as scored
        expected[f"{name}_image.png"] = {
            "vessels/fov/dice": f1_score(label[fov], stored[fov] >= 0.5),
            "vessels/fov/auc": roc_auc_score(label[fov], stored[fov]),
            "vessels/image/dice": f1_score(label.ravel(), stored.ravel() >= 0.5),
        }

    result = score_predictions(datalist, predictions, tmp_path / "scores")

    rows = _per_image(tmp_path / "scores")
    assert set(rows) == set(expected) and result["left_out"] == {}
    for name, metrics in expected.items():
        assert rows[name]["fov_source"] == "given" and rows[name]["dataset"] == "toy"
        for key, value in metrics.items():
            assert float(rows[name][key]) == pytest.approx(value, abs=1e-6), (name, key)
        assert "vessels/fov/cldice" in rows[name]  # vessels get the topology metric
    summary = json.loads((tmp_path / "scores" / "metrics_summary.json").read_text())
    assert summary["metadata"]["scored"] == 2 and summary["metadata"]["threshold"] == 0.5
    mean_dice = np.mean([metrics["vessels/fov/dice"] for metrics in expected.values()])
    assert summary["summary"]["all"]["metrics"]["vessels/fov/dice"]["mean"] == pytest.approx(mean_dice, abs=1e-6)


def test_float_tiff_and_16_bit_probabilities_are_read_at_their_precision(tmp_path: Path):
    probabilities = np.linspace(0.0, 1.0, 64 * 48, dtype=np.float32).reshape(48, 64)
    Image.fromarray(probabilities, mode="F").save(tmp_path / "float.tif")
    Image.fromarray(np.round(probabilities * 65535).astype(np.uint16)).save(tmp_path / "sixteen.png")
    for read_as in ("auto", "probabilities"):
        np.testing.assert_array_equal(read_prediction(tmp_path / "float.tif", read_as)[0], probabilities)
        read, kind = read_prediction(tmp_path / "sixteen.png", read_as)
        np.testing.assert_allclose(read, probabilities, atol=0.5 / 65535)
        assert kind == "probabilities"
    faint = np.where(probabilities < 0.5, 0, 1 / 255).astype(np.float32)  # a float file means what it holds
    Image.fromarray(faint, mode="F").save(tmp_path / "faint.tif")
    assert read_prediction(tmp_path / "faint.tif", "auto") == (pytest.approx(faint), "probabilities")

    Image.fromarray(probabilities * 255, mode="F").save(tmp_path / "logits.tif")
    with pytest.raises(FundusImageError, match=r"logits.tif holds floating-point values from 0 to 255"):
        read_prediction(tmp_path / "logits.tif")
    overlay = np.zeros((48, 64, 3))
    overlay[..., 1] = probabilities
    write_png(tmp_path / "overlay.png", overlay)
    with pytest.raises(FundusImageError, match=r"overlay.png is a colour picture"):
        read_prediction(tmp_path / "overlay.png")


def test_a_mask_saved_as_0_and_1_is_read_as_a_mask_in_8_and_16_bits(tmp_path: Path):
    """Many methods save masks as 0/1; read as probabilities of at most 1/255 they scored Dice 0. A 0/1 mask that is
    foreground everywhere holds the one value 1: it was read as probabilities of 1/255, an empty prediction."""
    mask = np.random.default_rng(0).random((48, 64)) > 0.7
    everywhere = np.ones((48, 64), bool)
    for name, values in {"zero_one.png": mask.astype(np.uint8), "zero_one_16.png": mask.astype(np.uint16),
                         "ones.png": everywhere.astype(np.uint8), "ones_16.png": everywhere.astype(np.uint16)}.items():
        Image.fromarray(values).save(tmp_path / name)
        read, kind = read_prediction(tmp_path / name, "auto")
        np.testing.assert_array_equal(read, values.astype(np.float32), err_msg=name)
        assert kind == "0/1 mask", name
        assert read_prediction(tmp_path / name, "masks") == (pytest.approx(values.astype(np.float32)), "masks")
        assert read_prediction(tmp_path / name, "probabilities")[0].max() <= 1 / 255 + 1e-9, name
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "zero_255.png")
    for read_as in ("auto", "probabilities", "masks"):
        np.testing.assert_array_equal(read_prediction(tmp_path / "zero_255.png", read_as)[0], mask.astype(np.float32))
    faint = (mask * 2).astype(np.uint8)  # 0 and 2/255: probabilities, all below any threshold
    Image.fromarray(faint).save(tmp_path / "faint.png")
    assert read_prediction(tmp_path / "faint.png", "auto")[0].max() == pytest.approx(2 / 255)
    assert read_prediction(tmp_path / "faint.png", "masks")[0].max() == 1


def test_8_bit_levels_saved_in_16_bits_are_read_as_8_bit_levels(tmp_path: Path):
    """As probabilities of at most 255 / 65535 they would all fall below the threshold: Dice 0, no word."""
    levels = np.random.default_rng(1).integers(0, 256, (48, 64))
    Image.fromarray(levels.astype(np.uint16)).save(tmp_path / "levels_16.png")
    Image.fromarray(levels.astype(np.uint8)).save(tmp_path / "levels_8.png")
    read, kind = read_prediction(tmp_path / "levels_16.png", "auto")
    np.testing.assert_allclose(read, levels / 255, atol=1e-6)
    np.testing.assert_allclose(read, read_prediction(tmp_path / "levels_8.png", "auto")[0], atol=1e-6)
    assert kind == "8-bit levels in 16 bits"
    np.testing.assert_allclose(read_prediction(tmp_path / "levels_16.png", "probabilities")[0], levels / 65535, atol=1e-7)


def test_run_inference_s_own_files_are_read_as_probabilities_whatever_they_hold(datalist: Path, tmp_path: Path, caplog):
    """A network that found nothing writes probabilities of 0.002-0.006 as the 8-bit levels 0 and 1: read as a 0/1
    mask, nearly the whole field of view was scored as foreground (FOV Dice 0.23 on DRIVE where the bundle's own mask
    is empty). The bundle's own files are read as probabilities; with --pattern, --read-as auto reads them as masks,
    in a warning that names --read-as probabilities, which scores them as what they are."""
    predictions = tmp_path / "predictions"
    labels = {}
    for seed, name in enumerate(("case1", "case2")):
        labels[name] = read_label_mask(tmp_path / f"{name}_label.png")
        nothing = np.random.default_rng(seed).uniform(0.0005, 0.005, labels[name].shape)
        write_png(predictions / f"{name}_image_prob.png", nothing)  # as the bundle's writer stores them
        assert set(np.unique(np.round(nothing * 255))) == {0, 1}

    own = score_predictions(datalist, predictions, tmp_path / "own")
    with caplog.at_level(logging.INFO, logger="tools.score"):
        guessed = score_predictions(datalist, predictions, tmp_path / "guessed", pattern="{stem}_prob.png")
    told = score_predictions(datalist, predictions, tmp_path / "told", pattern="{stem}_prob.png", read_as="probabilities")

    empty = {"vessels/fov/dice": 0.0, "vessels/fov/sensitivity": 0.0, "vessels/fov/specificity": 1.0}
    for result in (own, told):
        assert {key: result["summary"]["all"]["metrics"][key]["mean"] for key in empty} == empty
    assert (own["metadata"]["read_as"], guessed["metadata"]["read_as"], told["metadata"]["read_as"]) == (
        "probabilities", "auto", "probabilities")
    rows = _per_image(tmp_path / "guessed")
    for name, label in labels.items():
        fov = read_label_mask(tmp_path / f"{name}_fov.png")
        everything = f1_score(label[fov], np.ones(fov.sum(), bool))  # what marking every pixel scores
        assert float(rows[f"{name}_image.png"]["vessels/fov/dice"]) < everything + 1e-9
        assert float(rows[f"{name}_image.png"]["vessels/fov/sensitivity"]) > 0.5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 of 2 predictions hold only the values 0 and 1: read as 0/1 masks; --read-as probabilities reads them" in (
        " ".join(warnings))
    assert any(r.getMessage().endswith("case1_image_prob.png read as 0/1 mask (--read-as auto)") for r in caplog.records)


def test_bad_predictions_are_named_and_left_out_and_the_others_scored(datalist: Path, tmp_path: Path, caplog, capsys):
    predictions = tmp_path / "predictions"
    label = read_label_mask(tmp_path / "case1_label.png")
    write_png(predictions / "case1_image.png", _noisy_probabilities(label, 0))
    # case2: another method's picture at half size, and nothing at all for a third test entry.
    write_png(predictions / "case2_image.png", _noisy_probabilities(label[::2, ::2], 1))
    lists = json.loads(datalist.read_text())
    lists["test"].append({**lists["test"][0], "image": "case0_image.png"})
    lists["test"].append(_case(tmp_path, "case3", 3))
    datalist.write_text(json.dumps(lists))
    (predictions / "case3_image.TIF").write_bytes(b"saved under another suffix")

    with caplog.at_level(logging.INFO):
        status = main(["--datalist", str(datalist), "--predictions", str(predictions), "--output",
                       str(tmp_path / "scores"), "--pattern", "{stem}.png"])

    assert status == 1
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert any("case2_image.png is 48x48 but photograph" in message and "96x96" in message for message in errors)
    assert any(message.startswith(f"{predictions / 'case0_image.png'}: no prediction for") for message in errors)
    assert any(message.endswith("case3_image.png (found case3_image.TIF: --pattern names the "
                                "files); left out") for message in errors)
    assert "3 predictions were left out" in errors[-1]
    assert set(_per_image(tmp_path / "scores")) == {"case1_image.png"}
    metadata = json.loads((tmp_path / "scores" / "metrics_summary.json").read_text())["metadata"]
    assert metadata["scored"] == 1 and len(metadata["left_out"]) == 3
    assert "Traceback" not in capsys.readouterr().err



def test_photographs_that_would_share_a_prediction_are_left_out_and_the_others_scored(datalist: Path, tmp_path: Path):
    """Two clinics' case1_image.png in a pooled split, and case3_image.png beside case3_image.jpg, each pair with one
    prediction file of its name: before 0.3.25 both photographs were scored against it, and the run exited 0. A
    photograph the split lists twice (the bundle accepts it, with a warning) shares only its own prediction."""
    lists = json.loads(datalist.read_text())
    pooled = []
    for clinic in ("clinicA", "clinicB"):
        case = _case(tmp_path / clinic, "case1", 1 if clinic == "clinicA" else 5)
        pooled.append({key: f"{clinic}/{value}" if key != "dataset" else clinic for key, value in case.items()})
    case3 = _case(tmp_path, "case3", 3)
    Image.open(tmp_path / "case3_image.png").save(tmp_path / "case3_image.jpg")
    lists["test"] = [*pooled, lists["test"][1], lists["test"][1], case3, {**case3, "image": "case3_image.jpg"}]
    datalist.write_text(json.dumps(lists))
    predictions = tmp_path / "predictions"
    for name in ("case1", "case2", "case3"):
        label = read_label_mask(tmp_path / ("clinicA" if name == "case1" else "") / f"{name}_label.png")
        write_png(predictions / f"{name}_image_prob.png", _noisy_probabilities(label, 0))

    result = score_predictions(datalist, predictions, tmp_path / "scores")

    advice = ("inference writes one file per name, so it is the prediction of one of them at most; rename the "
              "photographs apart and predict them again, or score each dataset's split on its own")
    assert result["left_out"] == {
        str(predictions / "case1_image_prob.png"): f"photographs {tmp_path / 'clinicA' / 'case1_image.png'} and "
        f"{tmp_path / 'clinicB' / 'case1_image.png'} would both be scored against {predictions / 'case1_image_prob.png'}"
        f": {advice}",
        str(predictions / "case3_image_prob.png"): f"photographs {tmp_path / 'case3_image.png'} and "
        f"{tmp_path / 'case3_image.jpg'} would both be scored against {predictions / 'case3_image_prob.png'}: {advice}",
    }
    assert set(_per_image(tmp_path / "scores")) == {"case2_image.png"}
    assert result["metadata"]["scored"] == 2, "the photograph listed twice is scored, as run evaluating scores it"
    status = main(["--datalist", str(datalist), "--predictions", str(predictions), "--output", str(tmp_path / "again")])
    assert status == 1  # a partial comparison is not taken for a whole one


def test_a_prediction_path_that_is_a_broken_link_or_a_folder_is_named_as_such(datalist: Path, tmp_path: Path):
    """Before 0.3.25 the hint named the very file reported missing: "(found case2_image_prob.png: --pattern names the
    files)" for case2_image_prob.png."""
    lists = json.loads(datalist.read_text())
    lists["test"].append(_case(tmp_path, "case3", 3))
    datalist.write_text(json.dumps(lists))
    predictions = tmp_path / "predictions"
    write_png(predictions / "case1_image_prob.png", _noisy_probabilities(read_label_mask(tmp_path / "case1_label.png"), 0))
    (predictions / "case2_image_prob.png").mkdir()
    (predictions / "case3_image_prob.png").symlink_to(tmp_path / "gone" / "case3_image_prob.png")

    result = score_predictions(datalist, predictions, tmp_path / "scores")

    assert result["left_out"] == {
        str(predictions / "case2_image_prob.png"): f"no prediction for {tmp_path / 'case2_image.png'}: "
        "case2_image_prob.png is a folder, not a file",
        str(predictions / "case3_image_prob.png"): f"no prediction for {tmp_path / 'case3_image.png'}: "
        f"case3_image_prob.png is a broken link (to {tmp_path / 'gone' / 'case3_image_prob.png'}), not a file",
    }
    assert set(_per_image(tmp_path / "scores")) == {"case1_image.png"}


def test_an_earlier_evaluations_reports_in_the_output_folder_are_moved_aside_not_replaced(
    datalist: Path, tmp_path: Path
):
    """Before 0.3.25 the scoring replaced an evaluation's metrics_* without a word, and left its
    measurement_agreement.* and bland_altman_*.png beside another method's metrics, to pass for them."""
    scores = tmp_path / "scores"
    scores.mkdir()
    earlier = {name: f"the model's {name}" for name in (
        "metrics_summary.json", "metrics_summary.csv", "metrics_per_image.csv", "measurement_agreement.json",
        "bland_altman_vessel_density.png")}
    for name, text in earlier.items():
        (scores / name).write_text(text)
    (scores / "baseline_summary.json").write_text("the baseline's")  # not this tool's name: left where it is
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    with pytest.raises(ConfigError, match="could be scored"):  # nothing to write: nothing is moved either
        score_predictions(datalist, predictions, scores)
    assert {path.name for path in scores.iterdir()} == {*earlier, "baseline_summary.json"}
    for name in ("case1", "case2"):
        label = read_label_mask(tmp_path / f"{name}_label.png")
        write_png(predictions / f"{name}_image_prob.png", _noisy_probabilities(label, 0))

    result = score_predictions(datalist, predictions, scores)

    [kept] = (scores / "earlier_evaluations").iterdir()
    assert result["earlier_reports"] == kept
    assert {path.name: path.read_text() for path in kept.iterdir()} == earlier
    assert {path.name for path in scores.iterdir()} == {
        "metrics_summary.json", "metrics_summary.csv", "metrics_per_image.csv", "baseline_summary.json",
        "earlier_evaluations", "measurements_per_image.csv", "measurement_agreement.json", "measurement_agreement.csv",
        "bland_altman_vessel_density.png", "bland_altman_fractal_dimension.png"}
    assert json.loads((scores / "metrics_summary.json").read_text())["metadata"]["scored"] == 2


@pytest.mark.parametrize("channels", [[""], ["a/b"], ["vessels", "vessels"]])
def test_channel_names_the_bundle_refuses_are_refused_before_any_prediction_is_read(
    datalist: Path, tmp_path: Path, channels, capsys, monkeypatch
):
    """Before 0.3.25 '' and 'a/b' passed, every prediction was read, and evaluate_case's ValueError gave a traceback."""
    predictions = tmp_path / "predictions"
    for name in ("case1", "case2"):
        label = read_label_mask(tmp_path / f"{name}_label.png")
        write_png(predictions / f"{name}_image_prob.png", _noisy_probabilities(label, 0))

    def read(path: Path, read_as: str) -> None:
        pytest.fail(f"{path} was read before the channel names were checked")  # not an Exception: not caught by main

    monkeypatch.setattr("tools.score.read_prediction", read)

    status = main(["--datalist", str(datalist), "--predictions", str(predictions), "--output", str(tmp_path / "scores"),
                   "--channels", *channels])

    assert status == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --channels {channels!r} must be a non-empty list of distinct names without '/', e.g. ['vessels'] or "
        "['disc', 'cup']"
    )
    assert not (tmp_path / "scores").exists()

def test_an_empty_field_of_view_mask_is_named_and_its_case_left_out(datalist: Path, tmp_path: Path):
    """A mask without a pixel inside leaves nothing to score: before 0.3.22 evaluate_case's error stopped the run."""
    write_png(tmp_path / "case2_fov.png", np.zeros((96, 96), dtype=bool))
    predictions = tmp_path / "predictions"
    for name in ("case1", "case2"):
        label = read_label_mask(tmp_path / f"{name}_label.png")
        write_png(predictions / f"{name}_image_prob.png", _noisy_probabilities(label, 0))

    result = score_predictions(datalist, predictions, tmp_path / "scores")

    assert result["left_out"] == {
        str(predictions / "case2_image_prob.png"): f"field-of-view mask {tmp_path / 'case2_fov.png'} is empty (no "
        "pixel inside): nothing to score inside the field of view; a mask is 0 outside and 255 (or 1) inside, or set "
        "the entry's fov to null to estimate it from the photograph"
    }
    assert set(_per_image(tmp_path / "scores")) == {"case1_image.png"}


def test_disc_and_cup_predictions_are_found_by_channel(tmp_path: Path):
    cases = []
    for index in range(2):
        case = _case(tmp_path, f"eye{index}", index)
        disc = read_label_mask(tmp_path / case["fov"])
        rows, cols = np.mgrid[: disc.shape[0], : disc.shape[1]]
        cup = (rows - 48) ** 2 + (cols - 48) ** 2 <= (10 + index) ** 2
        write_png(tmp_path / f"eye{index}_cup.png", cup)
        cases.append({**case, "label": [case["fov"], f"eye{index}_cup.png"]})
        write_png(tmp_path / "predictions" / f"eye{index}_image_disc.png", disc)
        write_png(tmp_path / "predictions" / f"eye{index}_image_cup.png", (rows - 48) ** 2 + (cols - 48) ** 2 <= 100)
    datalist = tmp_path / "disc_cup.json"
    datalist.write_text(json.dumps({"test": cases}))

    score_predictions(datalist, tmp_path / "predictions", tmp_path / "scores", channel_names=["disc", "cup"],
                      pattern="{stem}_{channel}.png")

    rows = _per_image(tmp_path / "scores")
    assert float(rows["eye0_image.png"]["disc/fov/dice"]) == 1.0
    assert float(rows["eye0_image.png"]["cup/fov/dice"]) == 1.0  # the same radius-10 disc
    cup1 = read_label_mask(tmp_path / "eye1_cup.png").ravel()
    predicted = read_label_mask(tmp_path / "predictions" / "eye1_image_cup.png").ravel()
    assert float(rows["eye1_image.png"]["cup/fov/dice"]) == pytest.approx(f1_score(cup1, predicted), abs=1e-6)
    assert "cup/fov/cldice" not in rows["eye0_image.png"]
    # The cup-to-disc ratio's agreement, as run evaluating reports it: the vertical ratio is the rows each mask spans.
    def vertical_cdr(disc: np.ndarray, cup: np.ndarray) -> float:
        return cup.any(1).sum() / disc.any(1).sum()

    errors = []
    for index in range(2):
        disc = read_label_mask(tmp_path / cases[index]["fov"])
        reference = vertical_cdr(disc, read_label_mask(tmp_path / f"eye{index}_cup.png"))
        predicted = vertical_cdr(disc, read_label_mask(tmp_path / "predictions" / f"eye{index}_image_cup.png"))
        errors.append(abs(predicted - reference))
    agreement = json.loads((tmp_path / "scores" / "measurement_agreement.json").read_text())["all"]["vertical_cdr"]
    assert errors[0] == 0 < errors[1] and agreement["n"] == 2
    assert agreement["mae"] == pytest.approx(np.mean(errors))
    assert (tmp_path / "scores" / "bland_altman_vertical_cdr.png").is_file()


def test_channels_of_another_size_are_named_with_both_sizes_and_left_out(tmp_path: Path):
    """A disc map and a cup map of different sizes: before 0.3.22 numpy's stacking stopped the run with a traceback."""
    cases = []
    for index in range(2):
        case = _case(tmp_path, f"eye{index}", index)
        cases.append({**case, "label": [case["fov"], case["fov"]]})
        disc = read_label_mask(tmp_path / case["fov"])
        write_png(tmp_path / "predictions" / f"eye{index}_image_disc.png", disc)
        write_png(tmp_path / "predictions" / f"eye{index}_image_cup.png", disc[::2] if index == 0 else disc)
    datalist = tmp_path / "disc_cup.json"
    datalist.write_text(json.dumps({"test": cases}))

    result = score_predictions(datalist, tmp_path / "predictions", tmp_path / "scores", channel_names=["disc", "cup"],
                               pattern="{stem}_{channel}.png")

    cup, photograph = tmp_path / "predictions" / "eye0_image_cup.png", tmp_path / "eye0_image.png"
    why = (
        f"prediction {cup} is 96x48 but photograph {photograph} is 96x96: predictions are scored at the photograph's "
        "own size"
    )
    assert list(result["left_out"].values()) == [why]
    assert set(_per_image(tmp_path / "scores")) == {"eye1_image.png"}


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"pattern": "prediction.png"}, re.escape("has no {stem}: every photograph would read the same file")),
        ({"pattern": "{stem}_{colour}.png"}, re.escape("cannot be filled: use {stem} and {channel} only")),
        # Fields that would fail on the first photograph (AttributeError, TypeError) or name files no method writes.
        ({"pattern": "{stem.suffix}.png"}, re.escape("'{stem.suffix}.png' cannot be filled: use {stem} and {channel} "
                                                     "only, as they are, not {stem.suffix}")),
        ({"pattern": "{stem[a]}.png"}, re.escape("only, as they are, not {stem[a]}")),
        ({"pattern": "{stem!r}.png"}, re.escape("only, as they are, not {stem!r}")),
        ({"pattern": "{stem}_{channel:>8}.png", "channel_names": ["disc", "cup"]}, re.escape("not {channel:>8}")),
        ({"pattern": "{stem}_{channel.upper}.png", "channel_names": ["disc", "cup"]}, re.escape("not {channel.upper}")),
        ({"pattern": "{{stem}}.png"}, re.escape("'{{stem}}.png' has no {stem}")),  # a literal {stem}, no field
        ({"pattern": "{stem}}.png"}, re.escape("(Single '}' encountered in format string)")),
        ({"pattern": "{stem}.png", "channel_names": ["disc", "cup"]}, re.escape("has no {channel}")),
        ({"threshold": 1.0}, re.escape("--threshold 1 is outside (0, 1)")),
        ({"pattern": "{stem}.tif"}, r"no prediction in .* could be scored against the 2 images of split 'test'"),
    ],
)
def test_settings_that_cannot_score_are_refused_and_nothing_is_written(datalist, tmp_path, settings, message):
    (tmp_path / "predictions").mkdir()
    with pytest.raises(ConfigError, match=message):
        score_predictions(datalist, tmp_path / "predictions", tmp_path / "scores", **settings)
    assert not (tmp_path / "scores").exists()


def test_drive_second_observer_scored_against_the_first_as_scikit_learn_counts(drive_dir: Path, tmp_path: Path):
    """DRIVE's second annotator (test split) as a method's binary predictions, against the reference annotator."""
    datalist = tmp_path / "drive.json"
    prepare_dataset("DRIVE", drive_dir, datalist)
    predictions = tmp_path / "second"
    predictions.mkdir()
    for annotation in sorted((drive_dir / "test" / "2nd_manual").glob("*_manual2.gif")):
        shutil.copy(annotation, predictions / annotation.name.replace("_manual2", "_test"))

    result = score_predictions(datalist, predictions, tmp_path / "scores", pattern="{stem}.gif")

    rows = _per_image(tmp_path / "scores")
    assert len(rows) == 20 and result["left_out"] == {}
    for entry in json.loads(datalist.read_text())["test"][:5]:
        name = Path(entry["image"]).name
        fov = read_label_mask(entry["fov"])
        first = read_label_mask(entry["label"])[fov]
        second = read_label_mask(predictions / name.replace(".tif", ".gif"))[fov]
        negatives_right, false_positives, false_negatives, positives_right = confusion_matrix(first, second).ravel()
        row = rows[name]
        assert float(row["vessels/fov/sensitivity"]) == pytest.approx(
            positives_right / (positives_right + false_negatives), abs=1e-6
        )
        assert float(row["vessels/fov/specificity"]) == pytest.approx(
            negatives_right / (negatives_right + false_positives), abs=1e-6
        )
        assert float(row["vessels/fov/accuracy"]) == pytest.approx(np.mean(first == second), abs=1e-6)
        assert float(row["vessels/fov/dice"]) == pytest.approx(f1_score(first, second), abs=1e-6)

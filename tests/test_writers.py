from __future__ import annotations

import io
import logging

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from PIL import Image

from scripts.fundus_io import UNREADABLE_KEY, FundusImageError, write_png
from scripts.measurements import disc_cup_measurements
from scripts.metrics import evaluate_case
from scripts.writers import SaveFundusPredictiond, label_map


@pytest.fixture
def photo(tmp_path):
    """A 30 x 20 (width x height) RGB photograph with a dark border, as a fundus camera takes it."""
    image = np.zeros((20, 30, 3), dtype=np.float32)
    rows, cols = np.mgrid[:20, :30]
    image[(rows - 10) ** 2 + (cols - 15) ** 2 < 81] = (0.8, 0.4, 0.2)
    path = tmp_path / "eye.png"
    write_png(path, image)
    return path


def prediction(array: np.ndarray, source) -> MetaTensor:
    return MetaTensor(torch.as_tensor(array), meta={"filename_or_obj": str(source)})


def test_writes_mask_probability_overlay_and_nifti(photo, tmp_path):
    probabilities = np.zeros((1, 20, 30), dtype=np.float32)
    probabilities[0, 5:8, 10:20] = 0.9
    probabilities[0, 0, 0] = 0.7  # outside the field of view
    out = tmp_path / "out"
    writer = SaveFundusPredictiond("pred", out, ["vessels"], nifti=True)
    writer({"pred": prediction(probabilities, photo)})
    mask = np.asarray(Image.open(out / "eye_mask.png"))
    assert mask.shape == (20, 30)
    assert np.array_equal(mask == 255, probabilities[0] > 0.5)
    assert np.asarray(Image.open(out / "eye_prob.png"))[6, 12] == round(0.9 * 255)
    overlay = np.asarray(Image.open(out / "eye_overlay.png")).astype(int)
    assert overlay[6, 12, 1] > overlay[6, 12, 0], "vessel pixels are painted green"
    assert np.array_equal(overlay[15, 15], [204, 102, 51]), "others keep the photograph's colour"
    volume = np.asarray(nib.load(out / "eye_mask.nii.gz").dataobj)
    assert volume.shape == (30, 20) and np.array_equal(volume.T, (probabilities[0] > 0.5).astype(np.uint8))
    # As ITK-based viewers read them (ITK's NIfTI and PNG readers, through SimpleITK), the NIfTI label lies on the
    # photograph: resampled onto the photograph's grid in physical space, it is the PNG mask.
    on_photograph = sitk.Resample(sitk.ReadImage(str(out / "eye_mask.nii.gz")), sitk.ReadImage(str(photo)),
                                  sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    assert np.array_equal(sitk.GetArrayFromImage(on_photograph) > 0, mask == 255)

    SaveFundusPredictiond("pred", tmp_path / "fov", ["vessels"], restrict_to_fov=True)(
        {"pred": prediction(probabilities, photo)}
    )
    restricted = np.asarray(Image.open(tmp_path / "fov" / "eye_mask.png"))
    assert restricted[0, 0] == 0 and restricted[6, 12] == 255


def test_every_channel_of_a_model_with_many_gets_its_own_overlay_colour(photo, tmp_path):
    names = [f"structure{n}" for n in range(7)]
    probabilities = np.zeros((len(names), 20, 30), dtype=np.float32)
    for channel in range(len(names)):
        probabilities[channel, 10, 4 * channel] = 0.9  # one pixel of each, nowhere else
    SaveFundusPredictiond("pred", tmp_path, names, overlay_opacity=1.0)({"pred": prediction(probabilities, photo)})
    overlay = np.asarray(Image.open(tmp_path / "eye_overlay.png")).astype(int)
    painted = [tuple(overlay[10, 4 * channel]) for channel in range(len(names))]
    background = tuple(overlay[10, 1])
    assert background not in painted and len(set(painted)) == len(names), painted


def test_disc_and_cup_become_one_label_image(photo, tmp_path):
    probabilities = np.zeros((2, 20, 30), dtype=np.float32)
    probabilities[0, 4:16, 8:22] = 0.8  # disc
    probabilities[1, 8:12, 12:18] = 0.8  # cup, inside the disc
    SaveFundusPredictiond("pred", tmp_path, ["disc", "cup"])({"pred": prediction(probabilities, photo)})
    mask = np.asarray(Image.open(tmp_path / "eye_mask.png"))
    assert mask[0, 0] == 0 and mask[5, 9] == 128 and mask[10, 15] == 255
    assert (tmp_path / "eye_prob_disc.png").is_file() and (tmp_path / "eye_prob_cup.png").is_file()
    assert label_map(probabilities > 0.5, ["disc", "cup"])[10, 15] == 2


def test_a_cup_in_a_ring_shaped_disc_is_labelled_cup_as_it_is_measured(photo, tmp_path):
    """A disc mask that missed the pale cup (a ring) with the cup predicted in its hole: the measurements fill the
    disc's hole and measure the cup there; the file wrote that cup as background (its vertical ratio 0)."""
    rows, cols = np.mgrid[:20, :30]
    distance = np.hypot(rows - 10, cols - 15)
    probabilities = np.zeros((2, 20, 30), dtype=np.float32)
    probabilities[0][(distance <= 9) & (distance > 4)] = 0.8  # disc, its middle missed
    probabilities[1][distance <= 4] = 0.8  # cup, in the hole
    SaveFundusPredictiond("pred", tmp_path, ["disc", "cup"])({"pred": prediction(probabilities, photo)})
    mask = np.asarray(Image.open(tmp_path / "eye_mask.png"))
    np.testing.assert_array_equal(mask == 255, distance <= 4)
    np.testing.assert_array_equal(mask >= 128, distance <= 9)
    cup_rows, disc_rows = (mask == 255).any(1).sum(), (mask >= 128).any(1).sum()
    measured = disc_cup_measurements(probabilities[0] > 0.5, probabilities[1] > 0.5)["vertical_cdr"]
    assert cup_rows / disc_rows == pytest.approx(measured) == pytest.approx(9 / 19)


def test_a_cup_outside_the_disc_is_labelled_inside_it_only_as_it_is_measured(photo, tmp_path):
    probabilities = np.zeros((2, 20, 30), dtype=np.float32)
    probabilities[0, 6:18, 8:22] = 0.8  # disc, rows 6-17
    probabilities[1, 2:10, 12:18] = 0.8  # cup, rows 2-9: its top four rows above the disc
    SaveFundusPredictiond("pred", tmp_path, ["disc", "cup"])({"pred": prediction(probabilities, photo)})
    mask = np.asarray(Image.open(tmp_path / "eye_mask.png"))
    assert (mask[2:6, 12:18] == 0).all() and (mask[6:10, 12:18] == 255).all() and mask[12, 9] == 128
    # The file's own vertical ratio is the one the measurements give (rows 6-9 of the disc's 6-17).
    cup_rows, disc_rows = (mask == 255).any(1).sum(), (mask >= 128).any(1).sum()
    measured = disc_cup_measurements((probabilities[0] > 0.5), (probabilities[1] > 0.5))["vertical_cdr"]
    assert cup_rows / disc_rows == pytest.approx(measured) == pytest.approx(4 / 12)
    # Other channels are written as given: the highest present wins.
    assert label_map(probabilities > 0.5, ["vessels", "cup"])[3, 14] == 2
    assert np.asarray(Image.open(tmp_path / "eye_prob_cup.png"))[3, 14] > 0  # the probability keeps the prediction


def test_mismatches_are_named(photo, tmp_path):
    writer = SaveFundusPredictiond("pred", tmp_path, ["vessels"])
    with pytest.raises(FundusImageError, match=r"30x20 but its prediction is 20x30"):
        writer({"pred": prediction(np.zeros((1, 30, 20), np.float32), photo)})
    with pytest.raises(ValueError, match="2 channels but 1 channel names"):
        writer({"pred": prediction(np.zeros((2, 20, 30), np.float32), photo)})


def test_a_probability_at_the_threshold_is_foreground_in_the_mask_as_in_the_metrics(photo, tmp_path):
    probabilities = np.zeros((1, 20, 30), dtype=np.float32)
    probabilities[0, 5:8, 10:20] = 0.5
    probabilities[0, 12:14, 10:20] = np.nextafter(np.float32(0.5), np.float32(0))
    SaveFundusPredictiond("pred", tmp_path, ["vessels"])({"pred": prediction(probabilities, photo)})
    written = np.asarray(Image.open(tmp_path / "eye_mask.png")) == 255
    assert written.sum() == 30 and written[5:8, 10:20].all()
    # The metrics read the same rule: the written mask as the reference gives a perfect score.
    dice = evaluate_case(probabilities, written[None].astype(np.uint8), topology=False)["vessels/image/dice"]
    assert dice == 1.0


def test_a_prediction_holding_nan_writes_nothing(photo, tmp_path):
    probabilities = np.full((1, 20, 30), 0.9, dtype=np.float32)
    probabilities[0, 3, 4] = np.nan
    with pytest.raises(FundusImageError, match="the prediction holds NaN or infinite values"):
        SaveFundusPredictiond("pred", tmp_path / "out", ["vessels"], nifti=True)({"pred": prediction(probabilities, photo)})
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_photograph_gone_or_changed_since_its_batch_was_loaded_is_left_out(photo, tmp_path, caplog):
    """The writer reads the photograph again for its overlay: one removed or replaced in between stopped the run, and
    the photographs after it were not segmented. Measuring (as the bundle's inference does), it is left out with its
    reason for the run's report, nothing is written for it, and the next photograph is written."""
    probabilities = np.full((1, 20, 30), 0.9, dtype=np.float32)
    out = tmp_path / "out"
    writer = SaveFundusPredictiond("pred", out, ["vessels"], measure=True)
    replaced = tmp_path / "replaced.png"
    write_png(replaced, np.zeros((10, 10, 3), np.float32))
    nan = probabilities.copy()
    nan[0, 3, 4] = np.nan
    gone = tmp_path / "gone.png"
    cases = (
        (gone, probabilities, "image file not found"),
        (replaced, probabilities, "is 10x10 but its prediction is 30x20"),
        (photo, nan, "the prediction holds NaN or infinite values"),
    )
    with caplog.at_level(logging.ERROR, logger="scripts.writers"):
        for source, array, reason in cases:
            record = writer({"pred": prediction(array, source)})["pred_record"]
            assert record.keys() == {"image", UNREADABLE_KEY} and record["image"] == source.name
            assert str(source) in record[UNREADABLE_KEY] and reason in record[UNREADABLE_KEY]
            assert f"Left out: {record[UNREADABLE_KEY]}" in caplog.text
    assert not out.exists() or not any(out.iterdir()), "nothing is written for them"
    assert writer({"pred": prediction(probabilities, photo)})["pred_record"]["image"] == "eye.png"
    assert (out / "eye_mask.png").is_file() and (out / "eye_overlay.png").is_file()


def test_an_earlier_run_s_outputs_of_a_photograph_left_out_at_its_turn_are_removed(photo, tmp_path, caplog):
    """With --overwrite True, the outputs an earlier run wrote for a photograph this run cannot read stayed among
    this run's, undated, and passed for them."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = ["eye_mask.png", "eye_prob.png", "eye_overlay.png", "eye_mask.nii.gz"]
    for name in [*earlier, "other_mask.png", "notes.txt"]:
        (out / name).write_bytes(b"an earlier run's")
    writer = SaveFundusPredictiond("pred", out, ["vessels"], measure=True)
    stand_in = prediction(np.zeros((1, 20, 30), np.float32), photo)
    stand_in.meta[UNREADABLE_KEY] = f"{photo}: cut short"
    with caplog.at_level(logging.WARNING, logger="scripts.writers"):
        record = writer({"pred": stand_in})["pred_record"]
    assert record[UNREADABLE_KEY] == f"{photo}: cut short"
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt", "other_mask.png"]
    assert "Removed 4 outputs an earlier run wrote for eye.png" in caplog.text

    for name in earlier:  # read again at the writer's turn, the photograph is gone
        (out / name).write_bytes(b"an earlier run's")
    photo.unlink()
    record = writer({"pred": prediction(np.zeros((1, 20, 30), np.float32), photo)})["pred_record"]
    assert "image file not found" in record[UNREADABLE_KEY]
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt", "other_mask.png"]


def test_measured_counts_leave_out_specks_under_min_fragment_px_and_the_mask_keeps_them(photo, tmp_path):
    probabilities = np.zeros((1, 20, 30), dtype=np.float32)
    probabilities[0, 10, 8:23] = 0.9  # a 15 px vessel
    probabilities[0, 5, 10:12] = 0.9  # a 2 px speck: one segment with two end points when counted
    records = {}
    for min_fragment_px in (0, 10):
        out = tmp_path / str(min_fragment_px)
        writer = SaveFundusPredictiond("pred", out, ["vessels"], measure=True, min_fragment_px=min_fragment_px)
        records[min_fragment_px] = writer({"pred": prediction(probabilities, photo)})["pred_record"]
        assert np.array_equal(np.asarray(Image.open(out / "eye_mask.png")) == 255, probabilities[0] > 0.5)
    assert (records[0]["segments"], records[0]["end_points"], records[0]["small_fragments"]) == (2, 4, 0)
    assert (records[10]["segments"], records[10]["end_points"], records[10]["small_fragments"]) == (1, 2, 1)
    assert records[0]["vessel_density"] == records[10]["vessel_density"]


def test_the_record_carries_a_thumbnail_of_the_overlay_written(photo, tmp_path):
    probabilities = np.zeros((1, 20, 30), dtype=np.float32)
    probabilities[0, 8:12, 5:25] = 0.9
    writer = SaveFundusPredictiond("pred", tmp_path / "out", ["vessels"], measure=True)
    record = writer({"pred": prediction(probabilities, photo)})["pred_record"]
    thumbnail = Image.open(io.BytesIO(record["thumbnail"]))
    assert thumbnail.format == "JPEG" and thumbnail.size == (30, 20), "a small picture is not enlarged"
    # The overlay file read back and encoded by PIL at the thumbnails' settings: the same picture, pixel for pixel.
    encoded = io.BytesIO()
    Image.open(tmp_path / "out" / record["overlay"]).save(encoded, format="JPEG", quality=85, subsampling=0)
    assert np.array_equal(np.asarray(thumbnail), np.asarray(Image.open(encoded)))

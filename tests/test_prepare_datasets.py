"""Preparers of every dataset on miniature trees in their distributed layouts, with bad inputs, splits and pooling."""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from monai.data import load_decathlon_datalist
from PIL import Image

from scripts.fundus_io import read_label_mask, read_mask
from tools.datasets import (
    DatasetError,
    decode_binary_masks,
    decode_contour_files,
    decode_labelme_json,
    folder_description,
    get_description,
)
from tools.prepare import Case, find_cases, main, pool_datalists, prepare_dataset, split_cases

# Non-square so that a width/height mix-up shows.
HEIGHT, WIDTH = 48, 64


def _photo(seed: int) -> np.ndarray:
    """A fundus-like photo: a bright elliptic retina with noise inside a black border."""
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    inside = ((cols - WIDTH / 2 + 0.5) / (0.46 * WIDTH)) ** 2 + ((rows - HEIGHT / 2 + 0.5) / (0.46 * HEIGHT)) ** 2 <= 1
    noise = np.random.default_rng(seed).integers(0, 30, (HEIGHT, WIDTH, 3))
    photo = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    photo[inside] = (np.array([190, 80, 30]) + noise[inside]).astype(np.uint8)
    return photo


def _random_mask(seed: int, shape: tuple[int, int] = (HEIGHT, WIDTH)) -> np.ndarray:
    """A random binary mask, different per seed."""
    return np.random.default_rng(seed).random(shape) < 0.2


def _save(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Save an array (bool saved 0/255) with PIL, in the format of the file's suffix, optionally gzipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8) * 255 if array.dtype == bool else array)
    if gz:
        buffer = io.BytesIO()
        image.save(buffer, format=Image.registered_extensions()[Path(path.name[:-3]).suffix.lower()])
        path.write_bytes(gzip.compress(buffer.getvalue()))
    else:
        image.save(path, format=Image.registered_extensions()[path.suffix.lower()])
    return path


def _rectangle(left: float, top: float, right: float, bottom: float) -> list[list[float]]:
    """Polygon points (x, y) of an axis-aligned rectangle."""
    return [[left, top], [right, top], [right, bottom], [left, bottom]]


def _box_mask(left: int, top: int, right: int, bottom: int) -> np.ndarray:
    """The pixels whose centres lie inside a rectangle, edges included."""
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[top : bottom + 1, left : right + 1] = True
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _entries(datalist: dict) -> list[dict]:
    return datalist["training"] + datalist["validation"] + datalist["test"]


# --------------------------------------------------------------------------------------------- miniature trees


def _make_drive(root: Path, train_ids=(21, 22, 23, 24, 25), test_ids=(1, 2, 3)) -> Path:
    for part, ids in (("training", train_ids), ("test", test_ids)):
        for number in ids:
            _save(root / part / "images" / f"{number:02d}_{part}.tif", _photo(number))
            _save(root / part / "1st_manual" / f"{number:02d}_manual1.gif", _random_mask(number))
            _save(root / part / "mask" / f"{number:02d}_{part}_mask.gif", np.ones((HEIGHT, WIDTH), bool))
            if part == "test":
                _save(root / part / "2nd_manual" / f"{number:02d}_manual2.gif", _random_mask(100 + number))
    return root


def _make_chase(root: Path, count: int = 28) -> Path:
    for index in range(count):
        stem = f"{index // 2 + 1:02d}{'LR'[index % 2]}"
        _save(root / f"Image_{stem}.jpg", _photo(index))
        _save(root / f"Image_{stem}_1stHO.png", _random_mask(index))
        _save(root / f"Image_{stem}_2ndHO.png", _random_mask(1000 + index))
    return root


@pytest.fixture
def drive_tree(tmp_path: Path) -> Path:
    return _make_drive(tmp_path / "src")


@pytest.fixture
def chase_tree(tmp_path: Path) -> Path:
    return _make_chase(tmp_path / "chase")


# --------------------------------------------------------------------------------------------- vessel datasets


def test_drive_miniature_in_extra_top_folder_official_split(tmp_path: Path) -> None:
    _make_drive(tmp_path / "src" / "DRIVE")
    # Archive debris that looks like an image by name but is not one.
    (tmp_path / "src" / "__MACOSX" / "DRIVE" / "test" / "images").mkdir(parents=True)
    (tmp_path / "src" / "__MACOSX" / "DRIVE" / "test" / "images" / "04_test.tif").write_bytes(b"resource fork")
    (tmp_path / "src" / "DRIVE" / "test" / "images" / "._05_test.tif").write_bytes(b"resource fork")
    datalist = prepare_dataset("drive", tmp_path / "src", tmp_path / "out" / "drive.json")
    assert datalist["dataset"] == "DRIVE" and datalist["split"] == "official"
    assert [e["case"] for e in datalist["test"]] == ["01", "02", "03"]
    assert sorted(e["case"] for e in datalist["training"] + datalist["validation"]) == ["21", "22", "23", "24", "25"]
    assert datalist["numValidation"] == 1  # round(0.2 * 5)
    for entry in _entries(datalist):
        assert "/DRIVE/" in entry["fov"] and entry["fov"].endswith("_mask.gif") and entry["fov_source"] == "given"
        assert entry["label"].endswith("_manual1.gif") and Path(entry["label"]).is_file()
    assert not (tmp_path / "out" / "drive_derived").exists()  # everything distributed is used as it is
    assert datalist["completeness_note"].startswith("8 usable images found where the complete DRIVE has 40: figures")


def test_a_partial_download_is_warned_about_and_recorded(drive_tree: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level("WARNING", logger="tools.prepare"):
        datalist = prepare_dataset("DRIVE", drive_tree, tmp_path / "drive.json")
    assert "DRIVE: 8 usable images found where the complete DRIVE has 40" in caplog.text
    assert json.loads((tmp_path / "drive.json").read_text())["completeness_note"] == datalist["completeness_note"]


def test_drive_union_falls_back_to_first_on_training(drive_tree: Path, tmp_path: Path) -> None:
    datalist = prepare_dataset("DRIVE", drive_tree, tmp_path / "out" / "drive.json", annotator="union")
    assert "3 of 8" not in (datalist["annotator_note"] or "") and "5 of 8" in datalist["annotator_note"]
    for entry in datalist["training"] + datalist["validation"]:
        assert entry["annotator"] == "first" and entry["label"].endswith("_manual1.gif")
    for entry in datalist["test"]:
        number = int(entry["case"])
        assert entry["annotator"] == "union"
        assert Path(entry["label"]) == tmp_path / "out" / "drive_derived" / "union" / "vessels" / f"{entry['case']}.png"
        np.testing.assert_array_equal(read_mask(entry["label"]) > 0, _random_mask(number) | _random_mask(100 + number))


def test_drive_second_annotator(drive_tree: Path, tmp_path: Path) -> None:
    datalist = prepare_dataset("DRIVE", drive_tree, tmp_path / "drive.json", annotator="second")
    assert {e["annotator"] for e in datalist["test"]} == {"second"}
    assert all(e["label"].endswith("_manual2.gif") for e in datalist["test"])


def test_masks_without_zero_background_are_rewritten(drive_tree: Path, tmp_path: Path) -> None:
    # Like DRIVE's real 2nd_manual GIFs (levels 3 and 253); a 0/1 FOV is fine as it is, a 10/240 one is not.
    levels = np.where(_random_mask(102), 253, 3).astype(np.uint8)
    _save(drive_tree / "test" / "2nd_manual" / "02_manual2.gif", levels)
    _save(drive_tree / "test" / "mask" / "01_test_mask.gif", _box_mask(5, 5, 50, 40).astype(np.uint8))
    fov_levels = np.where(_box_mask(5, 5, 50, 40), 240, 10).astype(np.uint8)
    _save(drive_tree / "test" / "mask" / "02_test_mask.gif", fov_levels)
    datalist = prepare_dataset("DRIVE", drive_tree, tmp_path / "out" / "drive.json", annotator="second")
    entries = {e["case"]: e for e in datalist["test"]}
    derived = tmp_path / "out" / "drive_derived"
    assert entries["01"]["label"].endswith("01_manual2.gif") and entries["01"]["fov"].endswith("01_test_mask.gif")
    assert entries["02"]["label"] == str(derived / "second" / "vessels" / "02.png")
    assert entries["02"]["fov"] == str(derived / "fov" / "02.png")
    np.testing.assert_array_equal(read_mask(entries["02"]["label"]) > 0, _random_mask(102))
    np.testing.assert_array_equal(read_mask(entries["02"]["fov"]) > 0, _box_mask(5, 5, 50, 40))


def test_chase_official_is_first_20_and_second_annotator(chase_tree: Path, tmp_path: Path) -> None:
    datalist = prepare_dataset("CHASE_DB1", chase_tree, tmp_path / "chase.json", annotator="second", val_fraction=0)
    assert datalist["split"] == "official" and datalist["numValidation"] == 0
    assert [e["case"] for e in datalist["test"]] == [f"Image_{n}{s}" for n in range(11, 15) for s in "LR"]
    assert len(datalist["training"]) == 20 and all(e["label"].endswith("_2ndHO.png") for e in datalist["training"])
    assert datalist["completeness_note"] is None  # all 28 images of the distribution
    fov = read_mask(datalist["test"][0]["fov"]) > 0  # estimated: CHASE_DB1 has no FOV masks
    assert all(entry["fov_source"] == "estimated" for entry in _entries(datalist)), "evaluation says so"
    assert fov.shape == (HEIGHT, WIDTH) and fov[HEIGHT // 2, WIDTH // 2] and not fov[0, 0]


def test_chase_official_split_refuses_a_partial_download_that_would_split_a_child(tmp_path: Path) -> None:
    src = _make_chase(tmp_path / "chase")
    for path in src.glob("Image_05R*"):  # one image (and its labels) missing: the 20th image is child 11's left eye
        path.unlink()
    with pytest.raises(DatasetError) as caught:
        prepare_dataset("CHASE_DB1", src, tmp_path / "chase.json")
    assert "puts images of person 11 in both training and test: 27 images were found" in str(caught.value)
    seeded = prepare_dataset("CHASE_DB1", src, tmp_path / "chase.json", split="seeded")
    children = {split: {entry["case"][6:8] for entry in seeded[split]} for split in ("training", "validation", "test")}
    assert not children["test"] & (children["training"] | children["validation"]), "whole children are drawn"


def test_chase_seeded_split_uses_paper_fraction(chase_tree: Path, tmp_path: Path) -> None:
    datalist = prepare_dataset("CHASE_DB1", chase_tree, tmp_path / "chase.json", split="seeded", seed=3)
    assert datalist["split"] == "seeded" and datalist["test_fraction"] == 0.27
    assert datalist["numTest"] == round(0.27 * 28)
    assert datalist["numValidation"] == round(0.2 * (28 - datalist["numTest"]))


def test_stare_gzipped_anchored_on_labels(tmp_path: Path) -> None:
    src = tmp_path / "stare"
    for number in range(1, 9):
        _save(src / "stare-images" / f"im{number:04d}.ppm.gz", _photo(number), gz=True)
    for number in range(1, 5):  # only some images of the archive are annotated
        _save(src / "labels-ah" / f"im{number:04d}.ah.ppm.gz", _random_mask(number), gz=True)
        _save(src / "labels-vk" / f"im{number:04d}.vk.ppm.gz", _random_mask(50 + number), gz=True)
    datalist = prepare_dataset("STARE", src, tmp_path / "out" / "stare.json", annotator="union", val_fraction=0)
    assert datalist["split"] == "seeded" and datalist["numTest"] == 1 and datalist["numTraining"] == 3
    for entry in _entries(datalist):
        number = int(entry["case"][2:])
        assert entry["image"].endswith(f"im{number:04d}.ppm.gz")
        np.testing.assert_array_equal(read_mask(entry["label"]) > 0, _random_mask(number) | _random_mask(50 + number))


def test_hrf_upper_case_extensions(tmp_path: Path) -> None:
    src = tmp_path / "hrf"
    for number, kind in ((1, "h"), (1, "g"), (2, "dr"), (3, "dr")):
        stem = f"{number:02d}_{kind}"
        _save(src / "images" / f"{stem}.JPG" if kind == "dr" else src / "images" / f"{stem}.jpg", _photo(number))
        _save(src / "manual1" / f"{stem}.tif", _random_mask(number))
        _save(src / "mask" / f"{stem}_mask.tif", np.ones((HEIGHT, WIDTH), bool))
    datalist = prepare_dataset("HRF", src, tmp_path / "hrf.json")
    assert sorted(e["case"] for e in _entries(datalist)) == ["01_g", "01_h", "02_dr", "03_dr"]
    assert datalist["test_fraction"] == 0.27 and datalist["numTest"] == 1
    assert all(e["fov"].endswith("_mask.tif") for e in _entries(datalist))


def test_fives_repeated_stems_across_parts(tmp_path: Path) -> None:
    src = tmp_path / "FIVES"
    for part, count in (("train", 3), ("test", 2)):
        for number in range(1, count + 1):
            _save(src / part / "Original" / f"{number}_A.png", _photo(number))
            _save(src / part / "Ground truth" / f"{number}_A.png", _random_mask(number))
    datalist = prepare_dataset("FIVES", src, tmp_path / "fives.json")
    assert [e["case"] for e in datalist["test"]] == ["test_1_A", "test_2_A"]
    assert all("/test/" in e["image"] and "/test/Ground truth/" in e["label"] for e in datalist["test"])
    assert datalist["numTraining"] + datalist["numValidation"] == 3


# --------------------------------------------------------------------------------------------- disc/cup datasets


def test_drishti_soft_maps_thresholded(tmp_path: Path) -> None:
    src = tmp_path / "Drishti-GS1_files"
    disc_core, cup_core = _box_mask(20, 10, 45, 35), _box_mask(28, 18, 38, 28)
    for part, gt_folder, stem in (("Training", "GT", "drishtiGS_002"), ("Test", "Test_GT", "drishtiGS_001")):
        _save(src / part / "Images" / f"{stem}.png", _photo(1))
        softmaps = src / part / gt_folder / stem / "SoftMap"
        # A faint halo (one expert of four) around each core must be thresholded away.
        halo = np.where(_box_mask(15, 5, 50, 40), 64, 0)
        _save(softmaps / f"{stem}_ODsegSoftmap.png", np.where(disc_core, 255, halo).astype(np.uint8))
        _save(softmaps / f"{stem}_cupsegSoftmap.png", np.where(cup_core, 191, 0).astype(np.uint8))
    datalist = prepare_dataset("DRISHTI-GS", src, tmp_path / "drishti.json", val_fraction=0)
    assert [e["case"] for e in datalist["test"]] == ["drishtiGS_001"]
    for entry in _entries(datalist):
        disc, cup = (read_mask(path) > 0 for path in entry["label"])
        np.testing.assert_array_equal(disc, disc_core)
        np.testing.assert_array_equal(cup, cup_core)


@pytest.mark.parametrize("name, disc_label, cup_label", [("G1020", "disc", "cup"), ("GRAPE", "OD", "oc")])
def test_labelme_polygons(tmp_path: Path, name: str, disc_label: str, cup_label: str) -> None:
    src = tmp_path / name
    for number in range(4):
        image = _save(src / "Images" / f"image_{number}.jpg", _photo(number))
        shapes = [
            {"label": disc_label, "points": _rectangle(10, 8, 40, 30), "shape_type": "polygon"},
            {"label": "vessel", "points": _rectangle(0, 0, 5, 5), "shape_type": "polygon"},
        ]
        if number != 1:  # G1020 leaves the cup out where it is not visible
            shapes.append({"label": cup_label, "points": _rectangle(20, 12, 30, 22)})
        annotation = {"shapes": shapes, "imagePath": f"image_{number}.jpg", "imageHeight": HEIGHT, "imageWidth": WIDTH}
        if number == 3:  # annotation kept elsewhere, naming its image with a Windows-style relative path
            annotation["imagePath"] = "..\\Images\\image_3.jpg"
            json_path = src / "json" / "image_3.json"
        else:
            json_path = image.with_suffix(".json")
        json_path.parent.mkdir(exist_ok=True)
        json_path.write_text(json.dumps(annotation))
    datalist = prepare_dataset(name, src, tmp_path / "out.json")
    entries = {e["case"]: e for e in _entries(datalist)}
    assert sorted(entries) == [f"image_{n}" for n in range(4)]
    assert entries["image_3"]["image"] == str(src / "Images" / "image_3.jpg")
    for case, entry in entries.items():
        disc, cup = (read_mask(path) > 0 for path in entry["label"])
        assert _iou(disc, _box_mask(10, 8, 40, 30)) > 0.9 and not disc[:5, :5].any()
        if case == "image_1":
            assert not cup.any()
        else:
            assert _iou(cup, _box_mask(20, 12, 30, 22)) > 0.8
            # Shoelace area of the 10 x 10 rectangle, within a one-pixel border.
            assert abs(int(cup.sum()) - 100) <= 2 * (10 + 10) + 1


def test_a_labelme_file_without_a_disc_is_warned_about_naming_its_labels(tmp_path: Path, caplog) -> None:
    path = tmp_path / "image_0.json"
    path.write_text(json.dumps({"shapes": [{"label": "optic_disc", "points": _rectangle(10, 8, 40, 30)},
                                           {"label": "cup", "points": _rectangle(20, 12, 30, 22)}]}))
    with caplog.at_level("WARNING", logger="tools.datasets"):
        disc, cup = decode_labelme_json([path], (HEIGHT, WIDTH))
    assert not disc.any() and cup.any()
    assert f"{path} has no disc: its entry's disc mask is empty. Labels found: 'cup', 'optic_disc'" in caplog.text


def test_origa_mat_cropped_centred(tmp_path: Path) -> None:
    src = tmp_path / "ORIGA"
    pad = 8
    padded = np.zeros((HEIGHT, WIDTH + 2 * pad), np.uint8)
    padded[10:40, pad + 15 : pad + 45] = 1
    padded[18:30, pad + 25 : pad + 35] = 2
    (src / "Semi-automatic-annotations").mkdir(parents=True)
    for number in range(1, 5):
        _save(src / "Images" / f"{number:03d}.jpg", _photo(number))
        scipy.io.savemat(src / "Semi-automatic-annotations" / f"{number:03d}.mat", {"mask": padded})
    datalist = prepare_dataset("ORIGA", src, tmp_path / "origa.json")
    disc, cup = (read_mask(path) > 0 for path in datalist["test"][0]["label"])
    expected_disc = np.zeros((HEIGHT, WIDTH), bool)
    expected_disc[10:40, 15:45] = True
    expected_cup = np.zeros((HEIGHT, WIDTH), bool)
    expected_cup[18:30, 25:35] = True
    np.testing.assert_array_equal(disc, expected_disc)
    np.testing.assert_array_equal(cup, expected_cup)


def test_papila_contours_two_experts(tmp_path: Path) -> None:
    src = tmp_path / "PAPILA"
    contours = src / "ExpertsSegmentations" / "Contours"
    contours.mkdir(parents=True)
    boxes = {"exp1": ((10, 8, 40, 30), (20, 12, 30, 22)), "exp2": ((12, 8, 44, 32), (22, 14, 34, 24))}
    for stem in ("RET002OD", "RET002OS", "RET004OD", "RET008OS"):
        _save(src / "FundusImages" / f"{stem}.jpg", _photo(len(stem)))
        for expert, (disc_box, cup_box) in boxes.items():
            for structure, box in (("disc", disc_box), ("cup", cup_box)):
                np.savetxt(contours / f"{stem}_{structure}_{expert}.txt", np.asarray(_rectangle(*box)), fmt="%.4e")
    union = prepare_dataset("PAPILA", src, tmp_path / "union.json", annotator="union")
    second = prepare_dataset("PAPILA", src, tmp_path / "second.json", annotator="second")
    entry = union["test"][0]
    disc, cup = (read_mask(path) > 0 for path in entry["label"])
    np.testing.assert_array_equal(disc, _box_mask(10, 8, 40, 30) | _box_mask(12, 8, 44, 32))
    np.testing.assert_array_equal(cup, _box_mask(20, 12, 30, 22) | _box_mask(22, 14, 34, 24))
    assert "union_derived/union/disc" in entry["label"][0] and "union_derived/union/cup" in entry["label"][1]
    disc2 = read_mask(second["test"][0]["label"][0]) > 0
    assert _iou(disc2, _box_mask(12, 8, 44, 32)) > 0.95 and disc.sum() > disc2.sum()


def test_refuge2_values_and_official_validation(tmp_path: Path) -> None:
    src = tmp_path / "REFUGE2"
    values = np.full((HEIGHT, WIDTH), 255, np.uint8)
    values[10:40, 15:45] = 128
    values[20:30, 25:35] = 0
    layout = (
        ("train", ("g0001", "n0001", "n0002"), ".bmp"),
        ("val", ("V0001",), ".png"),
        ("test", ("T0001", "T0002"), ".png"),
    )
    for part, stems, suffix in layout:
        for stem in stems:
            _save(src / part / "images" / f"{stem}.jpg", _photo(len(stem)))
            _save(src / part / "mask" / f"{stem}{suffix}", values)
    # Re-encoded elsewhere (0 background, 255 cup): decoded as REFUGE's, its "disc" would cover 97% of the picture.
    _save(src / "train" / "images" / "n0003.jpg", _photo(5))
    _save(src / "train" / "mask" / "n0003.bmp", 255 - values)
    datalist = prepare_dataset("REFUGE2", src, tmp_path / "refuge.json")
    assert datalist["validation_split"] == "official" and datalist["val_fraction"] is None
    assert [e["case"] for e in datalist["validation"]] == ["V0001"]
    assert [e["case"] for e in datalist["test"]] == ["T0001", "T0002"] and datalist["numTraining"] == 3
    (refused,) = datalist["left_out"]
    assert refused["case"] == "n0003" and "would make a disc of 97% of the picture" in refused["reason"]
    assert "REFUGE's masks are 255 background, 128 disc rim, 0 cup" in refused["reason"]
    for entry in _entries(datalist):
        disc, cup = (read_mask(path) for path in entry["label"])
        assert set(np.unique(disc)) <= {0, 255}
        assert (disc > 0).sum() == 30 * 30 and (cup > 0).sum() == 10 * 10
        assert not (cup > 0)[~(disc > 0)].any()


def test_output_inside_dataset_is_not_taken_for_data(tmp_path: Path) -> None:
    src = tmp_path / "GRAPE"
    for number in range(3):
        _save(src / f"{number}.jpg", _photo(number))
        disc = {"label": "OD", "points": _rectangle(10, 8, 40, 30)}
        (src / f"{number}.json").write_text(json.dumps({"shapes": [disc]}))
    first = prepare_dataset("GRAPE", src, src / "grape.json")
    again = prepare_dataset("GRAPE", src, src / "grape.json")
    assert first == again and sorted(e["case"] for e in _entries(again)) == ["0", "1", "2"]


def test_folder_disc_cup(tmp_path: Path) -> None:
    src = tmp_path / "mine"
    for number in range(4):
        _save(src / "images" / f"{number}.jpg", _photo(number))
        _save(src / "masks" / "disc" / f"{number}.png", _box_mask(10, 8, 40, 30))
        _save(src / "masks" / "cup" / f"{number}.png", _box_mask(20, 12, 30, 22))
    datalist = prepare_dataset("folder", src, tmp_path / "mine.json", task="disc_cup")
    assert datalist["task"] == "disc_cup" and datalist["structures"] == ["disc", "cup"]
    entry = datalist["test"][0]
    assert entry["label"] == [str(src / "masks" / part / f"{entry['case']}.png") for part in ("disc", "cup")]
    with pytest.raises(DatasetError, match="--name other.* applies to folder datasets only, not DRIVE"):
        prepare_dataset("DRIVE", src, tmp_path / "x.json", folder_name="other")
    with pytest.raises(DatasetError, match="dataset REFUGE2 is a disc_cup dataset, not vessels"):
        prepare_dataset("REFUGE2", src, tmp_path / "x.json", task="vessels")


def test_masks_the_bundle_would_misread_are_rewritten(tmp_path: Path) -> None:
    """A 3/253 label (the levels of DRIVE's 2nd_manual GIFs) has a background that is not 0, which the datalist
    promises and other readers of it would take for structure, and a whole-picture FOV stored as 1s has a single
    level: both reach the datalist as the bundle reads them."""
    src = tmp_path / "mine"
    for number in range(3):
        _save(src / "images" / f"case{number}.png", _photo(number))
        _save(src / "masks" / f"case{number}.png", (_random_mask(number) * 250 + 3).astype(np.uint8))
        _save(src / "fov" / f"case{number}.png", np.ones((HEIGHT, WIDTH), np.uint8))
    datalist = prepare_dataset("folder", src, tmp_path / "out" / "mine.json", folder_name="mine")
    for entry in _entries(datalist):
        number = int(entry["case"][-1])
        derived = tmp_path / "out" / "mine_derived" / "first" / "vessels"
        assert entry["label"] == str(derived / f"{entry['case']}.png")
        np.testing.assert_array_equal(read_label_mask(entry["label"]), _random_mask(number))
        assert entry["fov"] == str(src / "fov" / f"{entry['case']}.png"), "a 0/1 FOV is read as it is"
        assert read_label_mask(entry["fov"]).all()


def test_two_sources_prepared_into_one_folder_keep_their_own_derived_masks(tmp_path: Path) -> None:
    """Two folder datasets whose masks must be rewritten (3/253) and whose fields of view are estimated."""
    datalists = {}
    for name, offset in (("a", 0), ("b", 10)):
        src = tmp_path / name
        for number in range(3):
            _save(src / "images" / f"case{number}.png", _photo(number + offset))
            _save(src / "masks" / f"case{number}.png", (_random_mask(number + offset) * 250 + 3).astype(np.uint8))
        datalists[name] = prepare_dataset("folder", src, tmp_path / "out" / f"{name}.json")
    for name, offset in (("a", 0), ("b", 10)):
        for entry in _entries(datalists[name]):
            number = int(entry["case"][-1])
            assert entry["label"].startswith(str(tmp_path / "out" / f"{name}_derived"))
            np.testing.assert_array_equal(read_label_mask(entry["label"]), _random_mask(number + offset))


def test_two_photographs_of_one_name_are_left_out_and_the_others_prepared(tmp_path: Path, caplog) -> None:
    src = tmp_path / "mine"
    for number in range(5):
        _save(src / "images" / f"case{number}.png", _photo(number))
        _save(src / "masks" / f"case{number}.png", _random_mask(number))
    _save(src / "images" / "case2.jpg", _photo(20))
    with caplog.at_level(logging.WARNING):
        datalist = prepare_dataset("folder", src, tmp_path / "out" / "mine.json")
    (left_out,) = datalist["left_out"]
    assert left_out["case"] == "case2"
    assert left_out["reason"] == f"two images named case2 in {src / 'images'}: case2.jpg and case2.png; keep one"
    assert sorted(entry["case"] for entry in _entries(datalist)) == ["case0", "case1", "case3", "case4"]
    assert "used by no image" not in caplog.text, "both photographs are named in the left-out reason"


def test_folder_with_partial_fov(tmp_path: Path) -> None:
    src = tmp_path / "mine"
    for number in range(5):
        _save(src / "images" / f"case{number}.png", _photo(number))
        _save(src / "masks" / f"case{number}.png", _random_mask(number))
    _save(src / "fov" / "case0.png", np.ones((HEIGHT, WIDTH), bool))
    datalist = prepare_dataset("folder", src, tmp_path / "out" / "mine.json", folder_name="mine")
    fovs = {e["case"]: e["fov"] for e in _entries(datalist)}
    assert fovs["case0"] == str(src / "fov" / "case0.png")
    assert fovs["case1"] == str(tmp_path / "out" / "mine_derived" / "fov" / "case1.png")
    sources = {e["case"]: e["fov_source"] for e in _entries(datalist)}
    assert sources == {"case0": "given", **{f"case{number}": "estimated" for number in range(1, 5)}}
    assert all(e["dataset"] == "mine" for e in _entries(datalist))


def _jpeg_of_zero_one_mask(path: Path, mask: np.ndarray) -> Path:
    """Save a 0/1 mask as JPEG, as a researcher's script might: compression noise turns it into levels 0, 1, 2..."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8)).save(path, format="JPEG", quality=90)
    values = read_mask(path)
    assert 2 <= values.max() < 128 and len(np.unique(values)) > 2, "the picture this test is about"
    return path


def _vessel_lines() -> np.ndarray:
    """Thin diagonal lines, vessel-like enough that JPEG keeps them (it rounds scattered 0/1 pixels away)."""
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    return (rows + cols) % 9 < 2


def _own_folder(root: Path, count: int = 12) -> Path:
    """A user's folder of ``count`` good cases, ``c01.png``... with masks of the same names."""
    for number in range(1, count + 1):
        _save(root / "images" / f"c{number:02d}.png", _photo(number))
        _save(root / "masks" / f"c{number:02d}.png", _random_mask(number))
    return root


def test_a_folder_with_good_and_bad_cases_writes_the_good_ones_and_names_every_bad_one(tmp_path: Path, caplog) -> None:
    src = _own_folder(tmp_path / "mine", count=7)
    for stem in ("d24", "e25", "f26", "g27", "h28"):
        _save(src / "images" / f"{stem}.png", _photo(len(stem)))
    _save(src / "masks" / "d24_mask.png", _random_mask(24))
    _save(src / "masks" / "e25_manual1.png", _random_mask(25))
    # f26 has no mask at all; g27's mask is of another size; h28's is a 0/1 mask saved as JPEG.
    _save(src / "masks" / "g27.png", _random_mask(27, (HEIGHT - 1, WIDTH)))
    jpeg = _jpeg_of_zero_one_mask(src / "masks" / "h28.jpg", _vessel_lines())
    with caplog.at_level("WARNING", logger="tools.prepare"):
        datalist = prepare_dataset("folder", src, tmp_path / "out" / "mine.json", folder_name="mine")
    assert sorted(e["case"] for e in _entries(datalist)) == [f"c{n:02d}" for n in range(1, 8)]
    reasons = {item["case"]: item["reason"] for item in datalist["left_out"]}
    assert sorted(reasons) == ["d24", "e25", "f26", "g27", "h28"]
    assert reasons["d24"].endswith(
        f"not found: expected {src / 'masks' / 'd24.*'}; found masks/d24_mask.png: rename it d24.png, "
        "the name the layout expects"
    )
    assert "found masks/e25_manual1.png: rename it e25.png" in reasons["e25"]
    assert reasons["f26"] == f"annotation of image {src / 'images' / 'f26.png'} not found: expected {src / 'masks' / 'f26.*'}"
    assert reasons["g27"] == f"mask {src / 'masks' / 'g27.png'} is 64x47 pixels but its image is 64x48"
    assert reasons["h28"].startswith(f"mask {jpeg} has ") and "a 0/1 mask saved in a lossy format" in reasons["h28"]
    # One warning names them all, with the split they were taken out of.
    (warning,) = [record.getMessage() for record in caplog.records if "cannot be used" in record.getMessage()]
    assert warning.startswith("mine: 5 of 12 images cannot be used and were left out of the datalist (")
    assert "the split (seeded random split, test fraction 0.25) keeps the other images in their sets" in warning
    assert all(f"\n  {case}: {reason}" in warning for case, reason in reasons.items())
    assert json.loads((tmp_path / "out" / "mine.json").read_text())["left_out"] == datalist["left_out"]
    # Mending the files changes nobody else's set: the split was drawn with the bad cases.
    for stem in ("d24", "e25", "f26", "g27", "h28"):
        _save(src / "masks" / f"{stem}.png", _random_mask(len(stem)))
    for misnamed in ("d24_mask.png", "e25_manual1.png", "h28.jpg"):
        (src / "masks" / misnamed).unlink()
    mended = prepare_dataset("folder", src, tmp_path / "out" / "mine.json", folder_name="mine")
    assert mended["left_out"] == []
    for split in ("training", "validation", "test"):
        assert {e["case"] for e in datalist[split]} <= {e["case"] for e in mended[split]}


def test_a_zero_one_mask_saved_as_jpeg_is_named_and_left_out_as_a_label_and_as_a_field_of_view(tmp_path: Path) -> None:
    src = _own_folder(tmp_path / "mine", count=6)
    (src / "masks" / "c02.png").unlink()
    label = _jpeg_of_zero_one_mask(src / "masks" / "c02.jpg", _vessel_lines())
    fov = _jpeg_of_zero_one_mask(src / "fov" / "c05.jpg", _box_mask(4, 4, 60, 44))
    datalist = prepare_dataset("folder", src, tmp_path / "mine.json")
    assert [item["case"] for item in datalist["left_out"]] == ["c02", "c05"]
    assert _reason(datalist, "c02").startswith(f"mask {label} has ") and "save masks losslessly" in _reason(datalist, "c02")
    assert _reason(datalist, "c05").startswith(f"mask {fov} has ")
    with pytest.raises(DatasetError, match=re.escape(f"mask {label} has ")):
        decode_binary_masks([label], (HEIGHT, WIDTH))


def test_a_folder_of_which_no_case_can_be_used_is_an_error_listing_every_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "mine"
    for number in range(3):
        _save(src / "images" / f"x{number}.png", _photo(number))
        _save(src / "masks" / f"x{number}_mask.png", _random_mask(number))
    output = tmp_path / "mine.json"
    assert main(["--dataset", "folder", "--src", str(src), "--output", str(output)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: folder: none of the 3 images under {src} can be used: x0: annotation of image")
    assert all(f"found masks/x{n}_mask.png: rename it x{n}.png" in error for n in range(3))
    assert len(error.splitlines()) == 1 and not output.exists()


def test_files_a_folder_dataset_does_not_use_are_named(tmp_path: Path, caplog) -> None:
    src = _own_folder(tmp_path / "mine", count=4)
    _save(src / "images" / "batch2" / "x.png", _photo(9))
    _save(src / "images" / "y.webp", _photo(10))
    _save(src / "masks" / "z.png", _random_mask(11))
    (src / "notes.txt").write_text("beside the layout, not in its folders: not named")
    with caplog.at_level("WARNING", logger="tools.prepare"):
        datalist = prepare_dataset("folder", src, tmp_path / "mine.json")
    assert len(_entries(datalist)) == 4 and datalist["left_out"] == []
    assert (
        f"folder: 3 file(s) under {src} are used by no image and were passed over: "
        "images/batch2/x.png (subfolder images/batch2/ is not part of the layout), "
        "images/y.webp (suffix .webp is not an image suffix read), masks/z.png (names no image)"
    ) in caplog.text
    for number in range(5):  # beyond five, the count and five examples
        _save(src / "masks" / f"extra{number}.png", _random_mask(number))
    caplog.clear()
    with caplog.at_level("WARNING", logger="tools.prepare"):
        prepare_dataset("folder", src, tmp_path / "mine.json")
    assert "folder: 8 file(s) under" in caplog.text and "(names no image) and 3 more" in caplog.text


def test_a_distribution_s_extra_files_are_not_warned_about(drive_tree: Path, tmp_path: Path, caplog) -> None:
    (drive_tree / "training" / "images" / "README.txt").write_text("an archive's readme")
    _save(drive_tree / "training" / "2nd_manual" / "21_manual2.gif", _random_mask(5))
    with caplog.at_level("WARNING", logger="tools.prepare"):
        prepare_dataset("DRIVE", drive_tree, tmp_path / "drive.json")
    assert "passed over" not in caplog.text and "cannot be used" not in caplog.text


def test_a_missing_folder_of_a_folder_dataset_is_named_once(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        prepare_dataset("folder", tmp_path / "nowhere", tmp_path / "x.json")
    assert str(caught.value) == f"folder {tmp_path / 'nowhere'} does not exist"


# --------------------------------------------------------------------------------------------- datalist format


def test_datalist_readable_by_monai(chase_tree: Path, tmp_path: Path) -> None:
    output = tmp_path / "chase.json"
    prepare_dataset("CHASE_DB1", chase_tree, output)
    for key in ("training", "validation", "test"):
        entries = load_decathlon_datalist(output, data_list_key=key)
        assert entries and all(Path(e["image"]).is_file() and Path(e["label"]).is_file() for e in entries)
    recorded = json.loads(output.read_text())
    for key in ("dataset", "task", "annotator", "split", "seed", "test_fraction", "val_fraction"):
        assert key in recorded
    assert list(tmp_path.glob("*.tmp")) == [] and list(tmp_path.glob(".*")) == []


def test_rerun_rewrites_derived_files(tmp_path: Path) -> None:
    src = _make_chase(tmp_path / "chase", count=4)
    first = prepare_dataset("CHASE_DB1", src, tmp_path / "out" / "a.json", annotator="union", split="seeded")
    _save(src / "Image_01L_2ndHO.png", np.ones((HEIGHT, WIDTH), bool))
    second = prepare_dataset("CHASE_DB1", src, tmp_path / "out" / "a.json", annotator="union", split="seeded")
    entry = next(e for e in _entries(second) if e["case"] == "Image_01L")
    assert entry["label"] in [e["label"] for e in _entries(first)]
    assert (read_mask(entry["label"]) > 0).all()
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------- splits


def _cases(tree: Path, name: str = "CHASE_DB1") -> tuple:
    description = get_description(name)
    return description, find_cases(description, tree)


def test_seeded_split_deterministic_disjoint_and_by_fraction(chase_tree: Path) -> None:
    description, cases = _cases(chase_tree)
    ids = lambda parts: {k: [c.case_id for c in v] for k, v in parts.items()}
    first, provenance = split_cases(description, cases, "seeded", seed=7, test_fraction=0.25, val_fraction=0.3)
    again, _ = split_cases(description, list(reversed(cases)), "seeded", seed=7, test_fraction=0.25, val_fraction=0.3)
    other, _ = split_cases(description, cases, "seeded", seed=8, test_fraction=0.25, val_fraction=0.3)
    assert ids(first) == ids(again) and ids(first)["test"] != ids(other)["test"]
    # 0.25 of 28 asks for 7 images, drawn as whole children (two eyes each): 8; then 0.3 of the 20 left: 6.
    assert len(first["test"]) == 8 and len(first["validation"]) == 6
    all_ids = [c for part in ids(first).values() for c in part]
    assert sorted(all_ids) == sorted(c.case_id for c in cases)
    assert provenance == {
        "split": "seeded",
        "split_summary": "seeded random split, test fraction 0.25",
        "validation_split": "seeded",
        "seed": 7,
        "test_fraction": 0.25,
        "val_fraction": 0.3,
        "patient_pattern": description.patient_pattern,
        "patients": {"training": 7, "validation": 3, "test": 4},
    }


def _child(case_id: str) -> str:
    return case_id.removeprefix("Image_")[:-1]  # Image_07L -> 07


@pytest.mark.parametrize("method", ["seeded", "official"])
def test_no_child_has_eyes_on_two_sides_of_a_split(chase_tree: Path, method: str) -> None:
    description, cases = _cases(chase_tree)
    for seed in range(12):
        parts, _ = split_cases(description, cases, method, seed=seed, val_fraction=0.3)
        children = {name: {_child(case.case_id) for case in part} for name, part in parts.items()}
        assert not children["training"] & children["validation"]
        assert not children["training"] & children["test"] and not children["validation"] & children["test"]
        assert all(len(part) == 2 * len(children[name]) for name, part in parts.items())
        if method == "seeded":
            assert round(0.27 * 28) <= len(parts["test"]) <= round(0.27 * 28) + 1


def _named_cases(*case_ids: str) -> list[Case]:
    return [Case(case_id, Path(f"{case_id}.png"), {"first": ()}, None, {}) for case_id in case_ids]


def test_images_of_unknown_people_are_drawn_one_by_one_as_before() -> None:
    """Where no name says whose an image is, the draw is the seeded permutation of the images, as it always was."""
    cases = _named_cases(*(f"im{n:02d}" for n in range(1, 21)))
    description = folder_description()
    for seed in (0, 5):
        parts, provenance = split_cases(description, cases, "seeded", seed=seed, test_fraction=0.25, val_fraction=0)
        test_seed = np.random.SeedSequence(seed).spawn(2)[0]
        expected = {cases[int(i)].case_id for i in np.random.default_rng(test_seed).permutation(20)[:5]}
        assert {case.case_id for case in parts["test"]} == expected
        assert provenance["patient_pattern"] is None and provenance["patients"] is None


def _owner(case_id: str) -> str:
    return case_id[:2].lower() if case_id.lower().startswith("p") else case_id


def test_patient_pattern_groups_named_images_and_leaves_the_others_alone(caplog: pytest.LogCaptureFixture) -> None:
    cases = _named_cases("P1_OD", "p1_os", "P2_OD", "P2_OS", "P3_OD", "P3_OS", "P4_OD", "scan7", "scan8")
    description = folder_description()
    pattern = r"(?P<patient>p\d+)_O[DS]"
    split_cases(description, cases, "seeded", patient_pattern=pattern)
    assert "folder: 2 of 9 image names do not match --patient-pattern" in caplog.text and "(e.g. scan7)" in caplog.text
    for seed in range(10):
        parts, provenance = split_cases(description, cases, "seeded", seed, 0.3, 0.3, patient_pattern=pattern)
        owners = {name: {_owner(case.case_id) for case in part} for name, part in parts.items()}
        assert not owners["training"] & owners["test"] and not owners["training"] & owners["validation"]
        assert not owners["validation"] & owners["test"]
        # P1-P4 (p1_os with P1_OD: names match whatever their case), and scan7 and scan8 each their own person.
        assert provenance["patient_pattern"] == pattern and sum(provenance["patients"].values()) == 6
        assert 3 <= len(parts["test"]) <= 4  # 0.3 of 9 asks for 3 images; a person adds at most one more


def test_patient_pattern_errors_name_the_setting(
    chase_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    description, cases = _cases(chase_tree)
    with pytest.raises(DatasetError, match=r"--patient-pattern '\(P\\d' is not a regular expression"):
        split_cases(description, cases, "seeded", patient_pattern=r"(P\d")
    with pytest.raises(DatasetError, match=r"--patient-pattern 'P\\d\+' has no group named 'patient'"):
        split_cases(description, cases, "seeded", patient_pattern=r"P\d+")
    unmatched = r"P(\d+)_(?P<patient>[LR])"  # CHASE_DB1's names are Image_NNL: it matches none of them
    with pytest.raises(DatasetError, match=re.escape(f"'{unmatched}' matches none of the 28 image names (e.g. Image_01L)")):
        split_cases(description, cases, "seeded", patient_pattern=unmatched)
    with pytest.raises(DatasetError, match="a seeded split needs images of at least 2 people, found 28 image"):
        split_cases(description, cases, "seeded", patient_pattern=r"(?P<patient>Image)_.*")
    for number in range(4):  # the command line, on a folder dataset: P1 and P2, two images each
        _save(tmp_path / "mine" / "images" / f"P{number // 2 + 1}_{number}.png", _photo(number))
        _save(tmp_path / "mine" / "masks" / f"P{number // 2 + 1}_{number}.png", _random_mask(number))
    arguments = ["--dataset", "folder", "--src", str(tmp_path / "mine"), "--output", str(tmp_path / "mine.json")]
    assert main([*arguments, "--patient-pattern", r"(?P<patient>P\d+)_\d", "--val-fraction", "0"]) == 0
    assert "2 training, 0 validation, 2 test images of 1, 0 and 1 people" in capsys.readouterr().out
    datalist = json.loads((tmp_path / "mine.json").read_text())
    assert datalist["patients"] == {"training": 1, "validation": 0, "test": 1}
    assert {entry["case"][:2] for entry in datalist["test"]} != {entry["case"][:2] for entry in datalist["training"]}


def test_test_set_independent_of_validation_fraction(chase_tree: Path) -> None:
    description, cases = _cases(chase_tree)
    a, _ = split_cases(description, cases, "seeded", seed=1, val_fraction=0.1)
    b, _ = split_cases(description, cases, "seeded", seed=1, val_fraction=0.5)
    assert a["test"] == b["test"] and len(b["validation"]) > len(a["validation"])


def test_official_validation_comes_from_training_pool(drive_tree: Path) -> None:
    description, cases = _cases(drive_tree, "DRIVE")
    parts, _ = split_cases(description, cases, "official", seed=0, val_fraction=0.4)
    assert {c.groups["part"] for c in parts["validation"] + parts["training"]} == {"training"}
    assert len(parts["validation"]) == 2 and len(parts["test"]) == 3


def test_split_argument_errors(drive_tree: Path, chase_tree: Path) -> None:
    description, cases = _cases(drive_tree, "DRIVE")
    with pytest.raises(DatasetError, match="--test-fraction applies to seeded splits; DRIVE uses its official"):
        split_cases(description, cases, "auto", test_fraction=0.3)
    with pytest.raises(DatasetError, match=r"--val-fraction must be in \[0, 1\), got 1.5"):
        split_cases(description, cases, val_fraction=1.5)
    # From Python, settings of other types are named too, not a TypeError (or, for a seed of None, a draw that no
    # recorded seed repeats).
    for seed in (-1, 1.5, "3", True, None):
        with pytest.raises(DatasetError, match=re.escape(f"--seed must be a non-negative integer, got {seed!r}")):
            split_cases(description, cases, "seeded", seed=seed)
    with pytest.raises(DatasetError, match=r"--val-fraction must be in \[0, 1\), got None"):
        split_cases(description, cases, val_fraction=None)
    with pytest.raises(DatasetError, match=r"--test-fraction must be in \(0, 1\), got '0.3'"):
        split_cases(description, cases, "seeded", test_fraction="0.3")
    stare = get_description("STARE")
    with pytest.raises(DatasetError, match="STARE has no official split"):
        split_cases(stare, cases, "official")
    description, cases = _cases(_make_chase(chase_tree.parent / "few", count=6))
    with pytest.raises(DatasetError, match="needs more than 20 images, found 6; use --split seeded"):
        split_cases(description, cases, "official")


# --------------------------------------------------------------------------------------------- bad inputs


def test_a_seed_that_is_not_a_non_negative_integer_is_an_argument_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["--dataset", "folder", "--src", str(tmp_path), "--output", str(tmp_path / "x.json")]
    for seed, shown in (("-1", "-1"), ("1.5", "'1.5'")):
        with pytest.raises(SystemExit) as stopped:
            main([*arguments, "--seed", seed])
        assert stopped.value.code == 2
        assert f"error: argument --seed: must be a non-negative integer, got {shown}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_missing_src(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"DRIVE folder {tmp_path / 'nowhere'} does not exist"):
        prepare_dataset("DRIVE", tmp_path / "nowhere", tmp_path / "x.json")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DatasetError, match=f"STARE folder {tmp_path / 'file'} is not a folder"):
        prepare_dataset("STARE", tmp_path / "file", tmp_path / "x.json")


def test_unknown_choices(chase_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown annotator 'third': expected one of first, second, union"):
        prepare_dataset("CHASE_DB1", chase_tree, tmp_path / "x.json", annotator="third")
    with pytest.raises(DatasetError, match="unknown split method 'random': expected one of auto, official, seeded"):
        prepare_dataset("CHASE_DB1", chase_tree, tmp_path / "x.json", split="random")
    assert not (tmp_path / "x.json").exists()


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no HRF images found under .*empty: expected images/NN_h"):
        prepare_dataset("HRF", tmp_path / "empty", tmp_path / "x.json")


def test_wrong_layout_names_lookalike(chase_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no DRIVE images found .* \(the folder looks like CHASE_DB1\)"):
        prepare_dataset("DRIVE", chase_tree, tmp_path / "x.json")


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'MESSIDOR': expected one of DRIVE, CHASE_DB1"):
        prepare_dataset("MESSIDOR", tmp_path, tmp_path / "x.json")


def test_missing_manual_leaves_its_image_out(drive_tree: Path, tmp_path: Path) -> None:
    expected = drive_tree / "training" / "1st_manual" / "23_manual1.gif"
    expected.unlink()
    datalist = prepare_dataset("DRIVE", drive_tree, tmp_path / "x.json")
    assert sorted(e["case"] for e in _entries(datalist)) == ["01", "02", "03", "21", "22", "24", "25"]
    image = drive_tree / "training" / "images" / "23_training.tif"
    (left_out,) = datalist["left_out"]
    assert left_out["case"] == "23" and left_out["image"] == str(image)
    assert left_out["reason"] == f"first annotator's annotation of image {image} not found: expected {expected}"


def test_second_annotator_missing_is_an_error_where_not_partial(chase_tree: Path, tmp_path: Path) -> None:
    (chase_tree / "Image_03L_2ndHO.png").unlink()
    assert prepare_dataset("CHASE_DB1", chase_tree, tmp_path / "first.json")["numTest"] == 8
    datalist = prepare_dataset("CHASE_DB1", chase_tree, tmp_path / "x.json", annotator="second")
    assert [item["case"] for item in datalist["left_out"]] == ["Image_03L"]
    assert re.fullmatch("second annotator's annotation of image .*Image_03L.jpg not found: expected .*",
                        datalist["left_out"][0]["reason"])
    assert datalist["annotator_note"] is None, "the left-out image is not counted as falling back to the first"


def test_the_second_annotator_alone_does_not_need_the_first_annotators_file(tmp_path: Path) -> None:
    src = _make_chase(tmp_path / "chase")
    (src / "Image_12L_1stHO.png").unlink()
    second = prepare_dataset("CHASE_DB1", src, tmp_path / "second.json", annotator="second", val_fraction=0)
    assert second["left_out"] == [] and len(_entries(second)) == 28
    union = prepare_dataset("CHASE_DB1", src, tmp_path / "union.json", annotator="union", val_fraction=0)
    (left_out,) = union["left_out"]
    assert left_out["case"] == "Image_12L" and left_out["reason"].startswith("first annotator's annotation of image")


def test_second_annotator_on_single_annotator_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="HRF has a single annotator: --annotator union needs a second one"):
        prepare_dataset("HRF", tmp_path, tmp_path / "x.json", annotator="union")


def test_truncated_images_are_left_out_and_a_refused_run_keeps_existing_output(drive_tree: Path, tmp_path: Path) -> None:
    def truncate(number: int) -> Path:
        image = drive_tree / "test" / "images" / f"{number:02d}_test.tif"
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
        return image

    output = tmp_path / "drive.json"
    truncated = truncate(2)
    datalist = prepare_dataset("DRIVE", drive_tree, output)
    assert [e["case"] for e in datalist["test"]] == ["01", "03"]
    assert [(item["case"], item["split"]) for item in datalist["left_out"]] == [("02", "test")]
    assert str(truncated) in datalist["left_out"][0]["reason"]
    # Every test image unusable: refused, naming each, and nothing written.
    output.write_text("previous")
    truncate(1)
    truncate(3)
    with pytest.raises(DatasetError, match=r"no image of the test set \(.*\) can be used: 01: .*01_test.tif.*; 02: .*; 03"):
        prepare_dataset("DRIVE", drive_tree, output)
    assert output.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["drive.json", "src"]


def _reason(datalist: dict, case: str) -> str:
    """The reason a datalist records for leaving a case out."""
    return next(item["reason"] for item in datalist["left_out"] if item["case"] == case)


def test_mask_size_differs(chase_tree: Path, tmp_path: Path) -> None:
    _save(chase_tree / "Image_05R_1stHO.png", _random_mask(0, (HEIGHT, WIDTH - 1)))
    datalist = prepare_dataset("CHASE_DB1", chase_tree, tmp_path / "x.json")
    assert re.search(r"Image_05R_1stHO.png is 63x48 pixels but its image is 64x48", _reason(datalist, "Image_05R"))
    # The official split (first 20, last 8) keeps every other image where it was, rather than refusing the download.
    assert [e["case"] for e in datalist["test"]] == [f"Image_{n}{s}" for n in range(11, 15) for s in "LR"]
    assert datalist["numTraining"] + datalist["numValidation"] == 19


def test_fov_size_differs(drive_tree: Path, tmp_path: Path) -> None:
    _save(drive_tree / "test" / "mask" / "01_test_mask.gif", np.ones((HEIGHT + 2, WIDTH), bool))
    datalist = prepare_dataset("DRIVE", drive_tree, tmp_path / "x.json")
    assert re.search(r"mask .*01_test_mask.gif is 64x50 pixels but its image is 64x48", _reason(datalist, "01"))


def test_bad_annotations(tmp_path: Path) -> None:
    src = tmp_path / "ORIGA"
    (src / "Semi-automatic-annotations").mkdir(parents=True)
    for number in range(6):
        _save(src / "Images" / f"{number}.jpg", _photo(number))
        scipy.io.savemat(src / "Semi-automatic-annotations" / f"{number}.mat", {"mask": np.zeros((HEIGHT, WIDTH + 4))})
    scipy.io.savemat(src / "Semi-automatic-annotations" / "1.mat", {"other": np.zeros((HEIGHT, WIDTH))})
    scipy.io.savemat(src / "Semi-automatic-annotations" / "4.mat", {"mask": np.zeros((HEIGHT, WIDTH - 4))})
    datalist = prepare_dataset("ORIGA", src, tmp_path / "x.json")
    assert re.search(r"ORIGA annotation .*1.mat has no 2D variable 'mask'", _reason(datalist, "1"))
    assert re.search(r"4.mat is 60x48 pixels, smaller than its image 64x48", _reason(datalist, "4"))
    assert sorted(e["case"] for e in _entries(datalist)) == ["0", "2", "3", "5"]


def test_labelme_size_and_format_errors(tmp_path: Path) -> None:
    src = tmp_path / "G1020"
    for number in range(2):
        _save(src / f"image_{number}.jpg", _photo(number))
        annotation = {"shapes": [], "imageHeight": HEIGHT, "imageWidth": WIDTH}
        (src / f"image_{number}.json").write_text(json.dumps(annotation))
    (src / "image_1.json").write_text(json.dumps({"shapes": [], "imageHeight": 100, "imageWidth": WIDTH}))
    with pytest.raises(DatasetError, match=r"image_1.json is for a 64x100 image but its image is 64x48"):
        prepare_dataset("G1020", src, tmp_path / "x.json")
    (src / "image_1.json").write_text('{"shapes": [{"label": "disc", "points": [[1, 2], [3')  # truncated
    with pytest.raises(DatasetError, match=r"cannot read labelme annotation .*image_1.json"):
        prepare_dataset("G1020", src, tmp_path / "x.json")


def test_malformed_labelme_shapes_leave_their_case_out_naming_the_file_and_the_others_are_prepared(
    tmp_path: Path,
) -> None:
    src = tmp_path / "G1020"
    disc = {"label": "disc", "points": _rectangle(10, 8, 40, 30)}
    malformed = {
        "not_an_object": (["disc"], 'shape 1 is "disc", not an object'),
        "ragged": ([{"label": "disc", "points": [[10, 8], [40], [40, 30]]}], "has a point [40] that is not an [x, y]"),
        "text": ([{"label": "OD", "points": [["a", 8], [40, 8], [40, 30]]}], "shape 'od' has a point [\"a\", 8]"),
        "nan": ([{"label": "disc", "points": [[float("nan"), 8], [40, 8], [40, 30]]}], "not finite (NaN or infinite)"),
        "infinite": ([disc, {"label": "cup", "points": [[20, 12], [1e999, 12], [30, 22]]}], "not finite"),
        "no_points": ([{"label": "disc"}], "shape 'disc' has no 'points'"),
        "points_null": ([{"label": "disc", "points": None}], "the 'points' of shape 'disc' are null, not a list"),
    }
    for name, (shapes, _) in [*((f"good_{n}", ([disc], "")) for n in range(8)), *malformed.items()]:
        _save(src / f"{name}.png", _photo(len(name)))
        # json.dumps writes NaN and Infinity, as some tools exporting labelme files do; Python's parser reads them.
        (src / f"{name}.json").write_text(json.dumps({"shapes": shapes, "imageHeight": HEIGHT, "imageWidth": WIDTH}))
    datalist = prepare_dataset("G1020", src, tmp_path / "out.json", seed=1)
    assert sorted(entry["case"] for entry in _entries(datalist)) == [f"good_{n}" for n in range(8)]
    reasons = {item["case"]: item["reason"] for item in datalist["left_out"]}
    assert sorted(reasons) == sorted(malformed)
    for name, (_, expected) in malformed.items():
        assert reasons[name].startswith(f"{src / name}.json: ") and expected in reasons[name], reasons[name]
    # Contour files are rasterised by the same rule: a NaN point is named, not an empty mask.
    contour = tmp_path / "disc.txt"
    contour.write_text("10 8\nnan 8\n40 30\n")
    with pytest.raises(DatasetError, match=f"{re.escape(str(contour))}: a polygon has a point that is not finite"):
        decode_contour_files([contour], (HEIGHT, WIDTH))


def test_json_files_that_are_not_labelme_annotations_are_passed_over(tmp_path: Path, caplog) -> None:
    src = tmp_path / "GRAPE"
    for number in range(2):
        _save(src / f"image_{number}.jpg", _photo(number))
        annotation = {"shapes": [], "imageHeight": HEIGHT, "imageWidth": WIDTH}
        (src / f"image_{number}.json").write_text(json.dumps(annotation))
    (src / "metadata.json").write_text(json.dumps({"version": "1.0", "images": 1}))
    with caplog.at_level("WARNING", logger="tools.prepare"):
        datalist = prepare_dataset("GRAPE", src, tmp_path / "out.json", val_fraction=0)
    assert sorted(entry["case"] for entry in _entries(datalist)) == ["image_0", "image_1"]
    assert f"1 file(s) under {src} are not its annotations and were passed over (e.g. {src / 'metadata.json'})" in (
        caplog.text
    )
    for number in range(2):
        (src / f"image_{number}.json").write_text(json.dumps(["not", "labelme"]))
    with pytest.raises(DatasetError, match=r"no GRAPE images found .*; 3 file\(s\) there are not GRAPE annotations"):
        prepare_dataset("GRAPE", src, tmp_path / "out.json")


@pytest.mark.parametrize("name", ["G1020", "GRAPE"])
def test_each_labelme_file_is_read_and_parsed_once_per_preparation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    src = tmp_path / name
    for number in range(5):
        _save(src / "Images" / f"image_{number}.jpg", _photo(number))
        annotation = {"shapes": [{"label": "disc", "points": _rectangle(10, 8, 40, 30)}],
                      "imagePath": f"image_{number}.jpg", "imageHeight": HEIGHT, "imageWidth": WIDTH}
        folder = src / "Images"
        if number == 4:  # kept elsewhere, naming its image: read for the image's path as well
            annotation["imagePath"] = "../Images/image_4.jpg"
            folder = src / "json"
            folder.mkdir()
        (folder / f"image_{number}.json").write_text(json.dumps(annotation))
    (src / "metadata.json").write_text(json.dumps({"version": "1.0"}))  # passed over, read to find that out
    annotations = sorted(src.rglob("*.json"))
    # Every way a dataset file can be opened (Path.read_text and read_bytes go through io.open) and every JSON parse,
    # whatever does it, in the decoding threads too.
    opened, parsed, lock = Counter(), Counter(), threading.Lock()
    real_open, real_loads = io.open, json.loads

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file).is_relative_to(src):
            with lock:
                opened[Path(file)] += 1
        return real_open(file, *args, **kwargs)

    def counting_loads(text, *args, **kwargs):
        with lock:
            parsed[text if isinstance(text, str) else bytes(text).decode()] += 1
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr("builtins.open", counting_open)
    monkeypatch.setattr(json, "loads", counting_loads)
    datalist = prepare_dataset(name, src, tmp_path / "out.json", val_fraction=0)
    assert len(_entries(datalist)) == 5
    assert {path: count for path, count in opened.items() if path.suffix == ".json"} == dict.fromkeys(annotations, 1)
    assert parsed == Counter(path.read_text() for path in annotations)
    # Once per preparation, not once for good: the next one reads the files again (they may have changed).
    opened.clear()
    assert len(find_cases(get_description(name), src)) == 5
    assert opened == dict.fromkeys(annotations, 1)


def test_duplicate_copies(drive_tree: Path, tmp_path: Path) -> None:
    _make_drive(drive_tree / "copy", train_ids=(21,), test_ids=())
    with pytest.raises(DatasetError, match="DRIVE image 21 found twice"):
        prepare_dataset("DRIVE", drive_tree, tmp_path / "x.json")


# --------------------------------------------------------------------------------------------- pooling


def test_pool_keeps_dataset_names_and_rejects_mixed_tasks(drive_tree: Path, chase_tree: Path, tmp_path: Path) -> None:
    drive = prepare_dataset("DRIVE", drive_tree, tmp_path / "drive.json")
    chase = prepare_dataset("CHASE_DB1", chase_tree, tmp_path / "chase.json", split="seeded")
    pooled = pool_datalists([tmp_path / "drive.json", tmp_path / "chase.json"], tmp_path / "pooled.json")
    assert pooled["datasets"] == ["DRIVE", "CHASE_DB1"] and pooled["task"] == "vessels"
    for key in ("training", "validation", "test"):
        assert pooled[key] == drive[key] + chase[key]
    assert [s["split"] for s in pooled["sources"]] == ["official", "seeded"]
    assert len(load_decathlon_datalist(tmp_path / "pooled.json", data_list_key="training")) == pooled["numTraining"]
    with pytest.raises(DatasetError, match="dataset DRIVE appears in more than one"):
        pool_datalists([tmp_path / "pooled.json", tmp_path / "drive.json"], tmp_path / "again.json")
    refuge = tmp_path / "refuge.json"
    empty_lists = {key: [] for key in ("training", "validation", "test")}
    refuge.write_text(json.dumps({"task": "disc_cup", "dataset": "REFUGE2", **empty_lists}))
    mixed = r"cannot pool datalists of different tasks: .*drive.json \(vessels\), .*refuge.json \(disc_cup\)"
    with pytest.raises(DatasetError, match=mixed):
        pool_datalists([tmp_path / "drive.json", refuge], tmp_path / "mixed.json")
    assert not (tmp_path / "mixed.json").exists()
    unnamed = tmp_path / "unnamed.json"
    unnamed.write_text(json.dumps({"task": "vessels", **empty_lists}))
    with pytest.raises(DatasetError, match=r"unnamed.json is not a prepared datalist: no 'dataset' name"):
        pool_datalists([tmp_path / "drive.json", unnamed], tmp_path / "unnamed_pool.json")

"""The DRIVE preparer on the real dataset (``$FUNDUS_DRIVE_DIR``), and the command line end to end."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from PIL import Image

from scripts.fundus_io import read_mask, write_png
from tools.datasets import DatasetError
from tools.prepare import main, prepare_dataset

REPOSITORY = Path(__file__).resolve().parents[1]


def _size(path: str) -> tuple[int, int]:
    """Width and height from the file header only (no pixel decoding)."""
    with Image.open(path) as image:
        return image.size


@pytest.fixture(scope="module")
def drive_datalists(drive_dir: Path, module_folder) -> tuple[Path, dict, dict]:
    """DRIVE prepared once with the first annotator and once with the union of both."""
    output = module_folder("datalists")
    first = prepare_dataset("DRIVE", drive_dir, output / "first" / "drive.json")
    union = prepare_dataset("DRIVE", drive_dir, output / "union" / "drive.json", annotator="union", seed=1)
    return output, first, union


def test_drive_official_split(drive_datalists: tuple[Path, dict, dict]) -> None:
    _, datalist, _ = drive_datalists
    provenance = (datalist["dataset"], datalist["task"], datalist["split"], datalist["annotator"])
    assert provenance == ("DRIVE", "vessels", "official", "first")
    assert [e["case"] for e in datalist["test"]] == [f"{n:02d}" for n in range(1, 21)]
    pool = datalist["training"] + datalist["validation"]
    assert sorted(int(e["case"]) for e in pool) == list(range(21, 41))
    assert (datalist["numTraining"], datalist["numValidation"], datalist["numTest"]) == (16, 4, 20)
    assert datalist["validation_split"] == "seeded" and datalist["seed"] == 0 and datalist["val_fraction"] == 0.2
    assert datalist["completeness_note"] is None  # the distributed DRIVE, all 40 images


def test_drive_entries_point_at_distributed_files(drive_datalists: tuple[Path, dict, dict], drive_dir: Path) -> None:
    output, datalist, _ = drive_datalists
    root = Path(os.path.abspath(drive_dir))
    for split in ("training", "validation", "test"):
        folder = suffix = "test" if split == "test" else "training"
        for entry in datalist[split]:
            case = entry["case"]
            assert entry["image"] == str(root / folder / "images" / f"{case}_{suffix}.tif")
            assert entry["label"] == str(root / folder / "1st_manual" / f"{case}_manual1.gif")
            assert entry["fov"] == str(root / folder / "mask" / f"{case}_{suffix}_mask.gif")
            assert entry["dataset"] == "DRIVE" and entry["annotator"] == "first"
            assert _size(entry["image"]) == _size(entry["label"]) == _size(entry["fov"]) == (565, 584)
    assert not (output / "first" / "drive_derived").exists()


def test_drive_loads_with_monai(drive_datalists: tuple[Path, dict, dict]) -> None:
    output, datalist, _ = drive_datalists
    for key in ("training", "validation", "test"):
        entries = load_decathlon_datalist(output / "first" / "drive.json", data_list_key=key)
        assert [e["image"] for e in entries] == [e["image"] for e in datalist[key]]


def test_drive_given_by_a_relative_path_loads_with_monai(
    drive_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source named relative to the working folder (``../shared/...``) still gives paths MONAI's loader reads."""
    relative = Path(os.path.relpath(drive_dir.absolute(), tmp_path))
    monkeypatch.chdir(tmp_path)
    assert relative.parts[0] == ".."
    datalist = prepare_dataset("DRIVE", relative, tmp_path / "lists" / "drive.json")
    entries = load_decathlon_datalist(tmp_path / "lists" / "drive.json", data_list_key="test")
    assert [e["image"] for e in entries] == [e["image"] for e in datalist["test"]]
    assert all(Path(e["image"]).is_file() for e in entries)


def test_drive_union_uses_both_annotators_on_test_only(
    drive_datalists: tuple[Path, dict, dict], drive_dir: Path
) -> None:
    output, first, union = drive_datalists
    derived = output / "union" / "drive_derived" / "union" / "vessels"
    assert union["annotator"] == "union" and "20 of 40 images have no second annotation" in union["annotator_note"]
    assert union["test"] == [
        {**entry, "label": str(derived / f"{entry['case']}.png"), "annotator": "union"}
        for entry in first["test"]
    ]
    assert {e["annotator"] for e in union["training"] + union["validation"]} == {"first"}
    # Another seed draws another validation set from the same training pool.
    assert {e["case"] for e in union["validation"]} != {e["case"] for e in first["validation"]}
    sample = union["test"][4]
    manual1 = read_mask(drive_dir / "test" / "1st_manual" / f"{sample['case']}_manual1.gif")
    manual2 = read_mask(drive_dir / "test" / "2nd_manual" / f"{sample['case']}_manual2.gif")
    # DRIVE's 2nd_manual GIFs are not 0/255: their two levels are 3 and 253.
    assert set(np.unique(manual1)) == {0, 255} and set(np.unique(manual2)) == {3, 253}
    merged = read_mask(sample["label"])
    assert set(np.unique(merged)) == {0, 255}
    np.testing.assert_array_equal(merged > 0, (manual1 > 128) | (manual2 > 128))
    assert (merged > 0).sum() > (manual1 > 128).sum() and (merged > 0).sum() > (manual2 > 128).sum()


def test_drive_second_annotator_rewritten_with_zero_background(drive_dir: Path, tmp_path: Path) -> None:
    datalist = prepare_dataset("DRIVE", drive_dir, tmp_path / "drive.json", annotator="second")
    assert {e["annotator"] for e in datalist["test"]} == {"second"}
    assert {e["annotator"] for e in datalist["training"] + datalist["validation"]} == {"first"}
    sample = datalist["test"][0]
    assert sample["label"] == str(tmp_path / "drive_derived" / "second" / "vessels" / "01.png")
    manual2 = read_mask(drive_dir / "test" / "2nd_manual" / "01_manual2.gif")
    np.testing.assert_array_equal(read_mask(sample["label"]) > 0, manual2 > 128)


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    rows, cols = np.mgrid[0:30, 0:40]
    for number in range(6):
        write_png(src / "images" / f"{number}.png", np.dstack([(rows + cols + number) / 80.0] * 3))
        write_png(src / "masks" / f"{number}.png", (rows + number) % 7 == 0)
    output = tmp_path / "out" / "mine.json"
    arguments = ["--dataset", "folder", "--name", "mine", "--src", str(src), "--output", str(output)]
    assert main([*arguments, "--seed", "5", "--test-fraction", "0.5"]) == 0
    assert str(output) in capsys.readouterr().out
    datalist = json.loads(output.read_text())
    assert (datalist["dataset"], datalist["split"], datalist["seed"], datalist["numTest"]) == ("mine", "seeded", 5, 3)

    # A real process, to see the exit status and that no traceback reaches the user.
    output.write_text("kept")
    failed = subprocess.run(
        [sys.executable, "-m", "tools.prepare", "--dataset", "DRIVE", "--src", str(src), "--output", str(output)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert failed.returncode != 0
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in failed.stderr
    assert lines[0].startswith("error: no DRIVE images found under") and str(src) in lines[0]
    assert output.read_text() == "kept"


def test_an_earlier_datalist_is_moved_aside_with_its_masks_not_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another --seed into the same --output used to replace the split a model was trained on without a word."""
    src = tmp_path / "src"
    rows, cols = np.mgrid[0:30, 0:40]
    for number in range(6):  # no fov/ folder: the fields of view are estimated, derived masks
        write_png(src / "images" / f"{number}.png", np.dstack([(rows + cols + number) / 80.0] * 3))
        write_png(src / "masks" / f"{number}.png", (rows + number) % 7 == 0)
    output = tmp_path / "out" / "mine.json"
    arguments = ["--dataset", "folder", "--name", "mine", "--src", str(src), "--output", str(output)]
    assert main([*arguments, "--seed", "5", "--test-fraction", "0.5"]) == 0
    first = json.loads(output.read_text())
    (output.parent / "mine_derived" / "fov" / "0.png").write_bytes(b"the earlier run's")  # tells the files apart

    assert main([*arguments, "--seed", "6", "--test-fraction", "0.5"]) == 0

    [folder] = (output.parent / "earlier_datalists").iterdir()
    kept, masks = folder / "mine.json", folder / "mine_derived"
    earlier = json.loads(kept.read_text())
    assert earlier["seed"] == 5 and json.loads(output.read_text())["seed"] == 6
    assert [e["case"] for e in earlier["test"]] == [e["case"] for e in first["test"]]
    fovs = [entry["fov"] for split in ("training", "validation", "test") for entry in earlier[split]]
    assert all(Path(fov).parent == masks / "fov" for fov in fovs), fovs
    assert (masks / "fov" / "0.png").read_bytes() == b"the earlier run's"
    assert read_mask(output.parent / "mine_derived" / "fov" / "0.png").any()  # the new run's own
    assert caplog.messages[-1] == (
        f"{output} held an earlier datalist: moved to {kept} with its derived masks ({masks}); a model trained on "
        "it must be evaluated with that datalist, whose split the new one does not keep"
    )

    pooled = output.parent / "pooled.json"
    assert main(["--pool", str(output), "--output", str(pooled)]) == 0
    assert main(["--pool", str(kept), "--output", str(pooled)]) == 0
    assert json.loads(pooled.read_text())["sources"][0]["seed"] == 5
    [kept_pool] = (output.parent / "earlier_datalists").glob("*/pooled.json")
    assert json.loads(kept_pool.read_text())["sources"][0]["seed"] == 6


def _write_folder_dataset(src: Path, count: int = 6) -> None:
    """``count`` photographs with vessel masks, no field-of-view masks (derived: estimated from the photographs)."""
    rows, cols = np.mgrid[0:30, 0:40]
    for number in range(count):
        write_png(src / "images" / f"{number}.png", np.dstack([(rows + cols + number) / 80.0] * 3))
        write_png(src / "masks" / f"{number}.png", (rows + number) % 7 == 0)


def test_a_rerun_that_changes_nothing_leaves_the_datalist_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rerunning the same preparation kept a copy aside each time, announced as a split the new one does not keep."""
    caplog.set_level(logging.INFO, logger="tools.prepare")
    _write_folder_dataset(tmp_path / "src")
    output = tmp_path / "out" / "mine.json"
    arguments = ["--dataset", "folder", "--name", "mine", "--src", str(tmp_path / "src"), "--output", str(output)]
    assert main(arguments) == 0
    first = output.read_text()
    masks = {path: path.read_bytes() for path in (output.parent / "mine_derived").rglob("*.png")}
    assert masks  # the estimated fields of view

    assert main(arguments) == 0
    assert not (output.parent / "earlier_datalists").exists()
    assert sorted(path.name for path in output.parent.iterdir()) == ["mine.json", "mine_derived"]  # no staging left
    assert output.read_text() == first
    assert {path: path.read_bytes() for path in (output.parent / "mine_derived").rglob("*.png")} == masks
    assert caplog.messages[-1] == (
        f"{output}: the same datalist and derived masks as the one already there, which stays as it was"
    )

    # The same datalist over other masks (an earlier version's, mended since) is an earlier datalist all the same.
    changed = next(iter(masks))
    changed.write_bytes(b"the earlier run's")
    assert main(arguments) == 0
    [folder] = (output.parent / "earlier_datalists").iterdir()
    assert (folder / "mine_derived" / changed.relative_to(output.parent / "mine_derived")).read_bytes() == (
        b"the earlier run's"
    )
    assert changed.read_bytes() == masks[changed]

    pooled = output.parent / "pooled.json"
    assert main(["--pool", str(output), "--output", str(pooled)]) == 0
    assert main(["--pool", str(output), "--output", str(pooled)]) == 0
    assert not list((output.parent / "earlier_datalists").glob("*/pooled.json"))


def test_a_refused_preparation_leaves_no_empty_output_folder(tmp_path: Path) -> None:
    """Every photograph unreadable: refused once they were decoded, after the output folder had been created."""
    src = tmp_path / "src"
    _write_folder_dataset(src, count=3)
    for image in (src / "images").iterdir():
        image.write_bytes(b"not a picture")
    with pytest.raises(DatasetError, match="none of the 3 images"):
        prepare_dataset("folder", src, tmp_path / "new" / "deeper" / "mine.json", task="vessels")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"]


def test_completeness_counts_the_images_the_datalist_holds(drive_dir: Path, tmp_path: Path) -> None:
    """A stray picture without annotations is no extended DRIVE; an image left out for its missing mask makes a
    partial one."""
    copy = tmp_path / "DRIVE"
    # Links to absolute paths: CI names DRIVE by a relative one, which the links would resolve from their own folder.
    shutil.copytree(drive_dir.absolute(), copy, copy_function=os.symlink)
    shutil.copy(drive_dir / "test" / "images" / "01_test.tif", copy / "test" / "images" / "41_test.tif")
    complete = prepare_dataset("DRIVE", copy, tmp_path / "complete.json")
    assert [entry["case"] for entry in complete["left_out"]] == ["41"]
    assert complete["completeness_note"] is None

    (copy / "test" / "1st_manual" / "07_manual1.gif").unlink()
    partial = prepare_dataset("DRIVE", copy, tmp_path / "partial.json")
    assert [entry["case"] for entry in partial["left_out"]] == ["07", "41"]
    assert partial["completeness_note"].startswith("39 usable images found where the complete DRIVE has 40")

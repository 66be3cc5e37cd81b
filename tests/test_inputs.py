from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.inputs import InputError, image_folder_datalist, load_split, require_file, writable_folder


def write_datalist(folder: Path, entries: list[dict], split: str = "training") -> Path:
    path = folder / "datalist.json"
    path.write_text(json.dumps({split: entries}))
    return path


def test_load_split_resolves_file_keys_against_the_datalist_folder(tmp_path):
    for name in ("a.png", "a_label.png", "a_fov.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "DRIVE").mkdir()  # a folder named like the dataset must not turn the name into a path
    entry = {"image": "a.png", "label": ["a_label.png"], "fov": "a_fov.png", "dataset": "DRIVE", "case": "01"}
    entries = load_split(write_datalist(tmp_path, [entry]), "training")
    assert entries == [
        {
            "image": str(tmp_path / "a.png"),
            "label": [str(tmp_path / "a_label.png")],
            "fov": str(tmp_path / "a_fov.png"),
            "dataset": "DRIVE",
            "case": "01",
        }
    ]


def test_load_split_names_every_problem(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_split(tmp_path / "none.json", "training")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InputError, match=f"{broken}.*cannot be read as JSON"):
        load_split(broken, "training")
    datalist = write_datalist(tmp_path, [{"image": "missing.png"}])
    with pytest.raises(InputError, match="has no 'validation' list"):
        load_split(datalist, "validation")
    with pytest.raises(InputError, match=r"1 missing files in 'training', e\.g\. entry 0 image: .*missing\.png"):
        load_split(datalist, "training")
    with pytest.raises(InputError, match="'training' list is empty"):
        load_split(write_datalist(tmp_path, []), "training")


def test_image_folder_datalist(tmp_path):
    for name in ("b.PNG", "a.tif", "c.ppm.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [Path(e["image"]).name for e in image_folder_datalist(tmp_path)] == ["a.tif", "b.PNG", "c.ppm.gz"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"{empty} holds no image"):
        image_folder_datalist(empty)
    with pytest.raises(InputError, match="does not exist"):
        image_folder_datalist(tmp_path / "nowhere")


def test_require_file_and_writable_folder(tmp_path):
    present = tmp_path / "model.pt"
    present.write_bytes(b"")
    assert require_file(present, "Trained model") == str(present)
    with pytest.raises(InputError, match="Trained model .*gone.pt does not exist. Train one first"):
        require_file(tmp_path / "gone.pt", "Trained model", "Train one first.")
    assert writable_folder(tmp_path / "new" / "out") == str(tmp_path / "new" / "out")
    assert (tmp_path / "new" / "out").is_dir()
    with pytest.raises(InputError, match="cannot be written"):
        writable_folder(present / "under_a_file")

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.errors import ConfigError, install_error_hook, is_bundle_command_line
from scripts.fundus_io import write_png
from scripts.inputs import (
    ImageFolder,
    InputError,
    check_command_line,
    hold_output_folder,
    load_split,
    release_output_folder,
    warn_about_batch_size,
    warn_about_overlap,
    warn_without_validation,
    writable_folder,
)
from tests.helpers import BUNDLE_MAIN, EVALUATE, INFER, TRAIN, held_by_another_process


def write_datalist(folder: Path, entries: list[dict], split: str = "training") -> Path:
    path = folder / "datalist.json"
    path.write_text(json.dumps({split: entries}))
    return path


def test_load_split_resolves_file_keys_against_the_datalist_folder(tmp_path):
    photograph(tmp_path / "a.png")
    for name in ("a_label.png", "a_fov.png"):
        write_png(tmp_path / name, np.eye(40, dtype=bool))
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
    datalist = write_datalist(tmp_path, [{"image": "missing.png", "label": "missing_label.png"}])
    with pytest.raises(InputError, match="has no 'validation' list"):
        load_split(datalist, "validation")
    with pytest.raises(InputError, match=r"2 missing files in 'training', e\.g\. entry 0 image: .*missing\.png"):
        load_split(datalist, "training")
    with pytest.raises(InputError, match=r"'training' list is empty\.$"):
        load_split(write_datalist(tmp_path, []), "training")
    with pytest.raises(InputError, match=r"'validation' list is empty \(tools\.prepare writes one with --val-fraction above 0\)"):
        load_split(write_datalist(tmp_path, [], split="validation"), "validation")


@pytest.mark.parametrize(
    "channel_names", [["disc", "cup"], ["OD", "oc"], ["rim", "cup"], ["first", "second"], 2], ids=str
)
def test_channels_named_in_the_datalist_s_order_or_after_no_structure_are_taken(tmp_path, channel_names):
    photograph(tmp_path / "a.png")
    for name in ("disc.png", "cup.png"):
        write_png(tmp_path / name, np.eye(40, dtype=bool))
    datalist = tmp_path / "datalist.json"
    entry = {"image": "a.png", "label": ["disc.png", "cup.png"]}
    datalist.write_text(json.dumps({"structures": ["disc", "cup"], "training": [entry]}))
    (loaded,) = load_split(datalist, "training", channel_names)
    assert loaded["label"] == [str(tmp_path / "disc.png"), str(tmp_path / "cup.png")]


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"image": 5, "label": "l.png"}, "entry 0 image must be a path; got 5"),
        ({"image": ["a.png"], "label": "l.png"}, 'entry 0 image must be a path; got ["a.png"]'),
        ({"image": "a.png", "label": ["l.png", None]}, 'entry 0 label must be a path or a list of paths; got ["l.png", null]'),
        ({"image": "a.png", "label": "l.png", "fov": 3}, "entry 0 fov must be a path or null; got 3"),
    ],
)
def test_a_datalist_value_of_the_wrong_kind_is_named(tmp_path, entry, named):
    with pytest.raises(InputError, match=re.escape(f"'training' {named}.")):
        load_split(write_datalist(tmp_path, [entry]), "training")


def test_a_null_field_of_view_is_one_to_estimate_and_a_split_that_is_no_list_is_no_overlap(tmp_path):
    photograph(tmp_path / "a.png")
    write_png(tmp_path / "a_label.png", np.eye(40, dtype=bool))
    (entry,) = load_split(write_datalist(tmp_path, [{"image": "a.png", "label": "a_label.png", "fov": None}]), "training")
    assert entry["fov"] is None and entry["image"] == str(tmp_path / "a.png")
    (tmp_path / "datalist.json").write_text(json.dumps({"training": None, "validation": 5}))
    warn_about_overlap(tmp_path / "datalist.json")  # load_split names what is wrong, not this warning


def photograph(path: Path, size: int = 40) -> Path:
    write_png(path, np.full((size, size, 3), 0.5, dtype=np.float32))
    return path


def test_image_folder_lists_the_images_sorted(tmp_path, caplog):
    images = tmp_path / "photos [2024]"  # brackets: a glob pattern would match nothing
    images.mkdir()
    for name in ("b.png", "a.png"):
        photograph(images / name)
    (images / "notes.txt").write_text("not an image")
    (images / "sub.png").mkdir()
    (images / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (images / "gone.png").symlink_to(tmp_path / "moved.png")
    with caplog.at_level("WARNING", logger="scripts.inputs"):
        folder = ImageFolder(images, tmp_path / "out")
    assert [Path(e["image"]).name for e in folder.entries] == ["a.png", "b.png"]
    folder.report_unreadable()  # nothing to report: hidden files are not images
    assert f"Passed over 3 entries of {images}, not photographs read here: gone.png (a link to a file that does " \
        "not exist), notes.txt (suffix .txt is not a photograph's read here: convert it to PNG or TIFF), sub.png/ " \
        "(subfolders are not searched)." in caplog.text
    assert "._a.png" not in caplog.text, "hidden files are not named"
    caplog.clear()
    (images / "a_mask.nii.gz").write_bytes(b"an earlier run's label")  # outputs in the image folder are not named
    (images / "out").mkdir()
    with caplog.at_level("WARNING", logger="scripts.inputs"):
        ImageFolder(images, images / "out", allow_output_in_dataset_dir=True, overwrite=True)
    assert "Passed over 3 entries" in caplog.text and "a_mask.nii.gz" not in caplog.text and "out/" not in caplog.text
    caplog.clear()
    (images / "earlier_reports").mkdir()  # where --overwrite moved an earlier run's reports, the output folder here
    with caplog.at_level("WARNING", logger="scripts.inputs"):
        ImageFolder(images, images, allow_output_in_dataset_dir=True, overwrite=True)
    assert "Passed over 4 entries" in caplog.text and "earlier_reports/" not in caplog.text and "out/" in caplog.text
    empty = tmp_path / "empty"
    (empty / "patient1").mkdir(parents=True)
    with pytest.raises(InputError, match=f"{empty} holds no image .*; it holds patient1/ \\(subfolders are not"):
        ImageFolder(empty, tmp_path / "out")
    with pytest.raises(InputError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(InputError, match="a.png is a file, not a folder: give the folder holding the photographs"):
        ImageFolder(images / "a.png", tmp_path / "out")


def test_grayscale_photographs_are_warned_about_and_segmented(tmp_path, caplog):
    """A red-free photograph is read as gray in all three channels; the model was trained on colour ones."""
    images = tmp_path / "images"
    photograph(images / "colour.png")
    write_png(images / "red_free.png", np.full((40, 40), 0.5, dtype=np.float32))
    Image.fromarray(np.full((40, 40), 1000, dtype=np.uint16)).save(images / "red_free_16.png")
    with caplog.at_level("WARNING", logger="scripts.inputs"):
        folder = ImageFolder(images, tmp_path / "out")
    assert len(folder.entries) == 3
    assert f"2 of the 3 photographs of {images} are grayscale (red-free?), e.g. red_free.png: the model was " in (
        caplog.text
    )


def test_a_photograph_whose_outputs_names_would_be_too_long_is_left_out_and_the_others_segmented(tmp_path):
    images = tmp_path / "images"
    # 242 bytes; b_xxx..._overlay.png is 250, allowed, but written as .b_xxx..._overlay.png.<8 random>.png, 264.
    long_name = "b_" + "x" * 236 + ".png"
    for name in ("a.png", "b.png", "c.png"):
        photograph(images / name)
    (images / "b.png").rename(images / long_name)  # written under a short name: its temporary name is longer
    photograph(images / "d.png")
    latin = os.fsencode(images) + b"/d_" + b"\xfc" * 236 + b".png"  # too long, and not UTF-8
    os.rename(os.fsencode(images / "d.png"), latin)
    folder = ImageFolder(images, tmp_path / "out")
    assert [Path(e["image"]).name for e in folder.entries] == ["a.png", "c.png"]
    assert folder.left_out == [long_name, os.fsdecode(latin).rsplit("/", 1)[1]]
    with pytest.raises(InputError, match="its output b_x+_overlay.png is written under a name of 264 bytes, more "
                       "than the 255") as caught:
        folder.report_unreadable()
    assert "d_\\xfc\\xfc" in str(caught.value) and str(caught.value).encode("utf-8"), "printable: bytes escaped"


def test_the_output_folder_is_created_only_once_the_checks_passed(tmp_path):
    images = tmp_path / "images"
    photograph(images / "eye.png")
    with pytest.raises(InputError, match="or inside it"):
        ImageFolder(images, images / "sub")
    assert sorted(path.name for path in images.iterdir()) == ["eye.png"], "a refused run leaves nothing behind"
    folder = ImageFolder(images, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists(), "checking writes nothing"
    assert folder.prepare_output() == str(tmp_path / "new" / "out")
    assert (tmp_path / "new" / "out").is_dir()


def test_overwrite_removes_every_earlier_output_of_a_photograph_left_out_at_start(tmp_path):
    images = tmp_path / "images"
    photograph(images / "eye.png")
    (images / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    output = tmp_path / "out"
    output.mkdir()
    for name in ("eye_mask.png", "cut_mask.png", "cut_prob.png", "cut_overlay.png"):
        (output / name).write_bytes(b"earlier")
    folder = ImageFolder(images, output, overwrite=True)
    assert folder.left_out == ["cut.png"]
    assert folder.stale == [output / "cut_mask.png", output / "cut_overlay.png", output / "cut_prob.png"]
    folder.prepare_output()
    left = sorted(path.name for path in output.iterdir() if not path.name.startswith("."))  # but the run's lock
    assert left == ["eye_mask.png"], "this run replaces eye's"


def test_overwrite_removes_only_the_outputs_of_these_images_this_run_does_not_write(tmp_path, caplog):
    images = tmp_path / "images"
    photograph(images / "eye.png")
    output = tmp_path / "out"
    output.mkdir()
    earlier = ["eye_mask.png", "eye_prob.png", "eye_overlay.png", "eye_mask.nii.gz", "prompts_used.json"]
    others = ["gone_mask.nii.gz", "notes.txt"]  # an image no longer in the folder; the user's own file
    for name in earlier + others:
        (output / name).write_bytes(b"earlier")
    with pytest.raises(InputError, match="holds 4 files this run would replace"):
        ImageFolder(images, output)  # the NIfTI label is not counted: this run does not write it
    assert ImageFolder(images, output, nifti=True, overwrite=True).stale == [], "a NIfTI run rewrites it"
    folder = ImageFolder(images, output, overwrite=True)
    assert folder.stale == [output / "eye_mask.nii.gz"]
    assert (output / "eye_mask.nii.gz").exists(), "checking removes nothing"
    assert folder.earlier_reports == [output / "prompts_used.json"]
    with caplog.at_level("INFO", logger="scripts.inputs"):
        folder.prepare_output()
    assert "Removed 1 outputs of an earlier run" in caplog.text and "eye_mask.nii.gz" in caplog.text
    assert "held an earlier run's reports (prompts_used.json): moved to" in caplog.text
    kept = sorted(set(earlier + others) - {"eye_mask.nii.gz", "prompts_used.json"})
    assert sorted(path.name for path in output.iterdir()) == sorted([*kept, ".output.lock", "earlier_reports"])
    [aside] = (output / "earlier_reports").iterdir()
    assert (aside / "prompts_used.json").read_bytes() == b"earlier"


def test_an_output_folder_another_run_is_writing_is_refused_before_anything_is_moved(tmp_path):
    """Two inferences into one folder both ended well with their outputs mixed (masks of both, the reports of one):
    the folder is checked only at start-up. The second is refused, naming the folder and the run holding it."""
    images, output = tmp_path / "images", tmp_path / "out"
    photograph(images / "eye.png")
    output.mkdir()
    (output / "eye_mask.png").write_bytes(b"the other run's")
    (output / "measurements.csv").write_bytes(b"the other run's")
    in_use = rf"Output folder {output} is in use by another run still going \(process \d+ on .*\): wait for it"
    before = sorted((path.name, path.read_bytes()) for path in output.iterdir() if path.name != ".output.lock")
    with held_by_another_process(output) as holder:
        for overwrite in (False, True):  # its outputs are no earlier run's to replace or to be told about
            with pytest.raises(InputError, match=in_use) as refused:
                ImageFolder(images, output, overwrite=overwrite)
            assert refused.match(rf"process {holder} on ") and "\n" not in str(refused.value)
        with pytest.raises(InputError, match=in_use):
            hold_output_folder(output)
    checked = ImageFolder(images, output, overwrite=True)  # the other run has ended
    # ... and another one started between this run's check and its start
    with held_by_another_process(output), pytest.raises(InputError, match=in_use):
        checked.prepare_output()
    assert sorted((p.name, p.read_bytes()) for p in output.iterdir() if p.name != ".output.lock") == before
    assert checked.prepare_output() == str(output)
    assert (output / ".output.lock").read_text().startswith(f"process {os.getpid()} on ")
    assert not (output / "earlier_reports" / ".output.lock").exists(), "the lock is no report to move aside"
    assert ImageFolder(images, output, overwrite=True).earlier_reports == [], "nor an output this run replaces"
    checked.release_output()
    release_output_folder(output)  # twice does no harm


def test_inference_and_evaluation_hold_their_output_folder_before_moving_anything():
    inference = json.loads(Path(INFER).read_text())
    assert inference["initialize"][-1] == "$@image_folder.prepare_output()"
    assert inference["finalize"] == ["$inputs.release_output_folder(@output_dir)"]
    evaluation = json.loads(Path(EVALUATE).read_text())
    held = evaluation["initialize"].index("$inputs.hold_output_folder(inputs.writable_folder(@output_dir))")
    assert held < evaluation["initialize"].index("$handlers.keep_earlier_evaluation(@output_dir)")
    assert "$inputs.release_output_folder(@output_dir)" in evaluation["finalize"]


def test_writable_folder(tmp_path):
    present = tmp_path / "model.pt"
    present.write_bytes(b"")
    assert writable_folder(tmp_path / "new" / "out") == str(tmp_path / "new" / "out")
    assert (tmp_path / "new" / "out").is_dir()
    with pytest.raises(InputError, match="cannot be written"):
        writable_folder(present / "under_a_file")
    with pytest.raises(InputError, match="model.pt is a file, not a folder: name a folder there"):
        writable_folder(present)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--dataset_dir", "--output_dir", "out"], "--dataset_dir has no value, and MONAI's command line would set it"),
        (["--output_dir"], "--output_dir has no value"),  # an expression default, but a folder
        (["--prompts_file"], "--prompts_file has no value"),  # default None
        (["--dataset_dir", ""], "--dataset_dir is empty, which would name the folder the run started in"),
        (["--output_dir= "], "--output_dir is empty"),
    ],
)
def test_an_option_without_a_value_or_an_empty_folder_is_refused(options, message):
    """An unset shell variable (``--dataset_dir $DATA``) gives MONAI True or the folder the run started in."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_command_line([BUNDLE_MAIN, "run", "inference", "--config_file", INFER, *options])


def test_an_option_without_a_value_that_may_be_a_boolean_is_accepted():
    for config, option in ((INFER, "--overwrite"), (TRAIN, "--amp")):  # amp's default is an expression
        assert check_command_line([BUNDLE_MAIN, "run", "x", "--config_file", config, option]) == []


def test_a_program_running_the_workflow_in_its_process_keeps_its_command_line_and_error_report(caplog):
    """A pipeline with its own --config_file and --overwrite options and crash reporter, calling ConfigWorkflow: the
    bundle refused its options and replaced its uncaught-error report (``sys.excepthook``) for good."""
    pipeline = ["/srv/pipeline.py", "--config_file", "pipeline.yaml", "--overwrite", "false", "--output_dir", "2024"]
    assert not is_bundle_command_line(pipeline)
    with caplog.at_level(logging.WARNING, logger="scripts.inputs"):
        assert check_command_line(pipeline) == []
    assert not caplog.records
    hook = sys.excepthook

    def crash_reporter(*error: object) -> None:  # the pipeline's own
        pass

    try:
        sys.excepthook = crash_reporter
        install_error_hook()
        assert sys.excepthook is crash_reporter
        sys.excepthook = sys.__excepthook__  # Python's default: a bundle command line's, MONAI Label's training's
        install_error_hook()
        assert sys.excepthook not in (crash_reporter, sys.__excepthook__)
    finally:
        sys.excepthook = hook
    with pytest.raises(ConfigError, match="--overwrite false"):
        check_command_line([BUNDLE_MAIN, "run", "inference", "--config_file", INFER, "--overwrite", "false"])
    assert not is_bundle_command_line([BUNDLE_MAIN, "run", "inference"])  # no config: not a workflow's


def test_a_run_that_will_never_validate_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="scripts.inputs"):
        assert not warn_without_validation(max_epochs=4, val_interval=4)
        assert warn_without_validation(max_epochs=1, val_interval=2)
    assert caplog.text.count("will never validate") == 1
    assert "val_interval 2 is more than max_epochs 1" in caplog.text and "no model_best.pt" in caplog.text


def test_an_optimiser_step_larger_than_the_training_split_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="scripts.inputs"):
        assert not warn_about_batch_size(images=8, batch_size=2, accumulation_steps=4)
        assert not warn_about_batch_size(images=20, batch_size=2, accumulation_steps=4, processes=2)
        assert warn_about_batch_size(images=6, batch_size=8, accumulation_steps=1)
        assert warn_about_batch_size(images=6, batch_size=2, accumulation_steps=4)
        assert warn_about_batch_size(images=20, batch_size=4, accumulation_steps=2, processes=4)
    first, second, third = (record.getMessage() for record in caplog.records)
    assert first.startswith("batch_size 8 asks for 8 images per optimiser step, but the split has 6 training images")
    assert "every step takes 6" in first and "Lower --batch_size, or add" in first
    assert second.startswith("batch_size 2 x accumulation_steps 4 asks for 8 images")
    assert "--accumulation_steps" in second
    assert "5 training images per process: every step takes 5" in third


def test_the_end_of_run_report_counts_photographs_lost_during_the_run(tmp_path):
    """Photographs lost at their turn are added to ``unreadable`` (scripts.handlers.InferenceReport)."""
    images = tmp_path / "images"
    for name in ("a.png", "b.png"):
        photograph(images / name)
    folder = ImageFolder(images, tmp_path / "out")
    folder.unreadable.append("a.png: gone")
    with pytest.raises(InputError, match=r"1 image\(s\) could not be segmented \(the others were\)"):
        folder.report_unreadable()
    folder.unreadable.append("b.png: gone")
    with pytest.raises(InputError, match=r"2 image\(s\) could not be segmented \(no other image could be\)"):
        folder.report_unreadable()

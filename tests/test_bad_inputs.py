"""Bad input, table by table: each case gets one of the project's errors (one line naming the file or setting and
what is wrong, what the command line prints as ``error: ...`` with exit status 1), and every file present before is
byte-identical after. docs/bad_inputs.md lists what each bad input gets; the workflows' own cases (a conflicting
setting, an unwritable output folder, a missing model...) are in tests/test_bundle.py and tests/test_export.py.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.adapters import CHECKPOINT_FORMAT, check_finetune, read_model_file
from scripts.atomic import write_text_atomic
from scripts.errors import ConfigError, FundusError, user_error
from scripts.fundus_io import write_png
from scripts.handlers import GradientClipping, TrainingTimeLimit
from scripts.handlers.checkpoint import keep_earlier_run
from scripts.inferers import FundusInferer, check_input_mode, window_fit
from scripts.inputs import (
    ImageFolder,
    check_command_line,
    check_settings,
    load_split,
    warn_about_overlap,
    warn_unknown_overrides,
)
from scripts.lora import LoRALinear
from scripts.network import build_network
from scripts.prompts import check_head_takes_prompts
from scripts.sam2_models import resolve_hiera_size
from scripts.transforms import SamplePromptsd
from tests.helpers import (
    BUNDLE_MAIN,
    INFER,
    QUICKSTART,
    REPO,
    TRAIN,
    bundle_command,
    fail_message,
    run_bundle,
    run_in_process,
    write_model_file,
)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def photograph(path: Path, size: tuple[int, int] = (48, 64)) -> Path:
    """A small fundus-like picture: a bright disc on black."""
    rows, cols = np.mgrid[: size[0], : size[1]]
    disc = (rows - size[0] / 2) ** 2 + (cols - size[1] / 2) ** 2 < (0.45 * min(size)) ** 2
    write_png(path, (np.stack([disc * 180, disc * 90, disc * 40], -1)).astype(np.uint8))
    return path


def vessel_label(path: Path, size: tuple[int, int] = (48, 64), colour: tuple[int, int, int] | None = None) -> Path:
    mask = np.zeros(size, np.uint8)
    mask[:, size[1] // 2] = 255
    write_png(path, mask if colour is None else np.stack([mask * (c // 255) for c in colour], -1).astype(np.uint8))
    return path


def expect_error(action: Callable[[], object], *fragments: str) -> FundusError:
    """Run ``action``, expecting one of our errors in one line that holds every fragment."""
    with pytest.raises(Exception) as caught:
        action()
    error = user_error(caught.value)
    assert error is not None, f"not one of our errors: {caught.value!r}"
    message = str(error)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return error


# Settings: (name, value, what the message says).
BAD_SETTINGS = [
    ("image_size", "abc", "a whole number of pixels, a multiple of 32"),
    ("image_size", 100, "a multiple of 32"),
    ("image_size", 0, "at least 64"),
    ("lora_rank", 0, "a positive whole number"),
    ("batch_size", 0, "a positive whole number"),
    ("max_epochs", -1, "a positive whole number"),
    ("num_workers", -2, "0 or a positive whole number"),
    ("learning_rate", float("nan"), "a positive number"),
    ("threshold", 1.5, "between 0 and 1"),
    ("pixel_size_mm", 0, "a positive number of millimetres per pixel, or '$None' on the command line"),
    ("pixel_size_mm", "0.01mm", "a positive number of millimetres per pixel, or '$None' on the command line"),
    ("min_fragment_px", -1, "0 (count every piece of a vessel mask) or a positive whole number of pixels"),
    ("min_fragment_px", 2.5, "0 (count every piece of a vessel mask) or a positive whole number of pixels"),
    ("channel_names", [], "a non-empty list of distinct names"),
    ("channel_names", ["disc", "disc"], "a non-empty list of distinct names"),
    ("channel_names", "vessels", "a non-empty list of distinct names"),
    ("quality_threshold", "high", "a predicted IoU between 0 and 1"),
    ("quality_threshold", 1.2, "a predicted IoU between 0 and 1"),
    ("report_thumbnails", -1, "0 (show every overlay from its file) or a positive whole number"),
    ("report_thumbnails", 2.5, "0 (show every overlay from its file) or a positive whole number"),
    ("amp_dtype", "bf16", "one of bfloat16, float16"),
    ("auto_box_margin", -0.6, "0 or a positive fraction of the box's size"),
    ("auto_points", 2.5, "a positive whole number"),
    ("auto_points", 0, "a positive whole number"),
    ("auto_negative_points", -1, "0 or a positive whole number"),
    ("weight_decay", -1, "0 or a positive number"),
    ("weight_decay", "abc", "0 or a positive number"),
    ("lr_restart_steps", 0, "a positive whole number of optimiser steps"),
    ("lr_restart_steps", 2.5, "a positive whole number of optimiser steps"),
    ("crops_per_image", 0, "a positive whole number"),
    ("seed", "abc", "0 or a positive whole number"),
    ("seed", -1, "0 or a positive whole number"),
    ("seed", None, "0 or a positive whole number"),
    ("overlay_count", "abc", "0 or a positive whole number of pictures"),
    ("loss_weights", {"bce": "x", "dice": 1, "focal_tversky": 1, "iou": 0.1}, "each 0 or a positive number"),
    ("loss_weights", {"bce": -1, "dice": 1, "focal_tversky": 1, "iou": 0.1}, "each 0 or a positive number"),
    ("loss_weights", {"bce": 0, "dice": 0, "focal_tversky": 0, "iou": 0.1}, "one of the mask terms positive"),
    ("loss_weights", {"bce": 1, "dice": 1}, "weights of bce, dice, focal_tversky, iou"),
    ("tracking_retry_interval", "abc", "a positive number of seconds"),
    ("tracking_flush_timeout", "soon", "0 or a positive number of seconds"),
    ("checkpoint_interval", -1, "0 (epoch ends only) or a positive number of iterations"),
    ("max_training_minutes", -5, "positive, or none for no limit"),
    ("gradient_clip_norm", 0, "a positive number (the largest total L2 norm of the gradients)"),
    ("cache_rate", 1.5, "a number from 0 (read every photograph from disk every epoch) to 1 (keep them all in memory)"),
    ("cache_rate", "all", "a number from 0 (read every photograph from disk every epoch) to 1 (keep them all in memory)"),
]


@pytest.mark.parametrize(("name", "value", "expected"), BAD_SETTINGS)
def test_bad_setting_values_are_named_with_what_is_expected(name, value, expected):
    expect_error(lambda: check_settings(**{name: value}), f"Setting '{name}'", repr(value), expected)


def test_an_unknown_hiera_size_is_named_with_the_known_ones():
    expect_error(lambda: resolve_hiera_size("huge"), "Setting 'model_size'", "'huge'", "base_plus, large, small, tiny")


def datalist_cases(folder: Path) -> dict[str, tuple[object, tuple[str, ...], dict]]:
    """Datalist content, what the message must hold, and load_split's arguments, per case."""
    image = photograph(folder / "a.png").name
    label = vessel_label(folder / "a_label.png").name
    photograph(folder / "b.png")
    empty = folder / "empty_label.png"
    write_png(empty, np.zeros((48, 64), np.uint8))
    green = vessel_label(folder / "green_label.png", colour=(0, 255, 0)).name
    tiny = "tiny.png"
    write_png(folder / tiny, np.full((1, 1, 3), 128, np.uint8))
    lossy = "lossy_label.jpg"  # a 0/1 mask saved as JPEG: its compression noise is as large as the mask
    rows, cols = np.mgrid[:48, :64]
    vessels = (abs(rows - 0.6 * cols - 5) < 2) | (abs(rows + 0.8 * cols - 50) < 1.5) | ((rows - 24) ** 2 + (cols - 40) ** 2 < 36)
    Image.fromarray(vessels.astype(np.uint8)).save(folder / lossy, quality=75)
    small_fov = "small_fov.png"
    write_png(folder / small_fov, np.ones((40, 60), np.uint8))
    good = {"image": image, "label": label}
    return {
        "a list, not an object": ([good], ("holds a JSON list, not an object",), {}),
        "no such split": ({"validation": [good]}, ("has no 'training' list",), {}),
        "an empty split": ({"training": []}, ("the 'training' list is empty",), {}),
        "an entry that is a string": (
            {"training": ["a.png"]},
            ("'training' entry 0 must be an object with 'image' and 'label'",),
            {},
        ),
        "an entry without label": ({"training": [good, {"image": image}]}, ("entry 1 must be an object",), {}),
        "entries with other keys": (
            {"training": [good, good, {**good, "fov": label}]},
            ("entries must all have the same keys; entry 2 has ['fov', 'image', 'label']",),
            {},
        ),
        "a missing file": (
            {"training": [{"image": "gone.png", "label": label}]},
            ("names 1 missing files", "gone.png"),
            {},
        ),
        "a fov_source of another value": (
            {"training": [{**good, "fov": label, "fov_source": "manual"}]},
            ("'training' entry 0 fov_source must be one of given, estimated", '"manual"'),
            {},
        ),
        "a mask of another size than its image": (
            {"training": [{**good, "fov": small_fov}]},
            (
                "1 masks in 'training' are not the size of their image",
                f"entry 0 fov {folder / small_fov} is 60x40 but its image {folder / image} is 64x48",
            ),
            {},
        ),
        "paths written on Windows": (
            {"training": [{"image": "C:\\eyes\\a.png", "label": label}]},
            ("names 1 missing files", "its paths are written for Windows", "write them with /"),
            {},
        ),
        "masks for another number of channels": (
            {"training": [{"image": image, "label": [label, label]}]},
            ("has 2 label masks but the workflow has 1 output channels", "channel_names"),
            {"channels": 1},
        ),
        "disc and cup channels in the other order than the datalist's masks": (
            {"structures": ["disc", "cup"], "training": [{"image": image, "label": [label, label]}]},
            (
                "holds its label masks in the order ['disc', 'cup'] (its 'structures'), but channel_names is ['Cup', 'OD']",
                "channel 0 'Cup' is the cup, the masks there the disc; channel 1 'OD' is the disc, the masks there the cup",
                "Set channel_names to ['disc', 'cup'].",
            ),
            {"channels": ["Cup", "OD"]},
        ),
        "every label empty": (
            {"training": [{"image": image, "label": empty.name}, {"image": "b.png", "label": empty.name}]},
            ("every label of 'training' is empty (no foreground pixel in 2 entries)",),
            {},
        ),
        "a colour label (green vessels on black)": (
            {"training": [{"image": image, "label": green}]},
            ("green_label.png is a colour picture whose channels differ", "labels must be grayscale masks"),
            {},
        ),
        "a 0/1 label saved as JPEG": (
            {"training": [{"image": image, "label": lossy}]},
            ("lossy_label.jpg has", "a 0/1 mask saved in a lossy format such as JPEG", "save masks losslessly"),
            {},
        ),
        "a 1x1 image": (
            {"training": [good, {"image": tiny, "label": label}]},
            (
                "1 images in 'training' are too small for a fundus photograph (at least 32 pixels per side)",
                "tiny.png (1x1)",
            ),
            {},
        ),
        "photographs smaller than a training window": (
            {"training": [good]},
            ("1 images in 'training' cannot be used", "is smaller than the 1024-pixel window", "input_mode 'resize'"),
            {"size_check": window_fit("sliding_window", 1024)},
        ),
    }


CASE_NAMES = [
    "a list, not an object",
    "no such split",
    "an empty split",
    "an entry that is a string",
    "an entry without label",
    "entries with other keys",
    "a missing file",
    "a fov_source of another value",
    "a mask of another size than its image",
    "paths written on Windows",
    "masks for another number of channels",
    "disc and cup channels in the other order than the datalist's masks",
    "every label empty",
    "a colour label (green vessels on black)",
    "a 0/1 label saved as JPEG",
    "a 1x1 image",
    "photographs smaller than a training window",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_datalists_are_named_and_nothing_is_written(tmp_path, case):
    content, fragments, arguments = datalist_cases(tmp_path)[case]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(content))
    before = snapshot(tmp_path)
    expect_error(lambda: load_split(datalist, "training", **arguments), *fragments)
    assert snapshot(tmp_path) == before


def test_images_in_both_training_and_validation_are_flagged_however_their_paths_are_written(tmp_path, caplog):
    photograph(tmp_path / "a.png")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "a.png"}], "validation": [{"image": "./a.png"}]}))
    with caplog.at_level(logging.WARNING):
        warn_about_overlap(datalist)
    assert "1 images are in both 'training' and 'validation'" in caplog.text


def folder_cases(root: Path) -> dict[str, tuple[dict, tuple[str, ...]]]:
    """ImageFolder arguments and what the message must hold, per case, over the images of ``root/images``."""
    images = root / "images"
    photograph(images / "eye.png")
    (root / "done").mkdir()
    photograph(root / "done" / "eye_mask.png")  # an earlier run's output
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("no picture here")
    twins = root / "twins"
    photograph(twins / "eye.png")
    photograph(twins / "eye.jpg")
    cased = root / "cased"
    photograph(cased / "Eye.png")
    photograph(cased / "eye.png")
    accented = root / "accented"
    photograph(accented / "caf\u00e9.png")  # composed, as Windows and Linux keep it
    photograph(accented / "cafe\u0301.png")  # decomposed, as macOS's HFS+ wrote it
    photograph(root / "german" / "Stra\u00dfe.png")
    photograph(root / "german" / "Strasse.png")  # another name everywhere: not refused
    (root / "linked").mkdir()
    (root / "linked" / "eye_mask.png").symlink_to(images / "eye.png")  # an output name that is the photograph itself
    return {
        "output folder is the image folder": (
            {"folder": images, "output_dir": images},
            (f"Output folder {images} is the image folder", "--allow_output_in_dataset_dir"),
        ),
        "output folder inside the image folder": (
            {"folder": images, "output_dir": images / "out"},
            ("is the image folder", "or inside it"),
        ),
        "two images with the same outputs": (
            {"folder": twins, "output_dir": root / "out"},
            ("eye.jpg and", "eye.png would both write eye_mask.png", "rename one of them"),
        ),
        "two images whose outputs differ only in case": (
            {"folder": cased, "output_dir": root / "out"},
            ("Eye.png and", "eye.png would write Eye_mask.png and eye_mask.png", "differ only in case",
             "Rename one of them"),
        ),
        "two images whose outputs differ only in how an accent is encoded": (
            {"folder": accented, "output_dir": root / "out"},
            ("would write cafe\u0301_mask.png and caf\u00e9_mask.png", "or in how an accent is encoded"),
        ),
        "outputs of an earlier run": (
            {"folder": images, "output_dir": root / "done"},
            ("holds 1 files this run would replace, e.g. eye_mask.png", "--overwrite True"),
        ),
        "an output that is an input image, even with --overwrite": (
            {"folder": images, "output_dir": root / "linked", "overwrite": True},
            (
                f"Outputs would replace the input image {root / 'linked' / 'eye_mask.png'}",
                "choose another --output_dir",
            ),
        ),
        "a folder that does not exist": ({"folder": root / "nowhere", "output_dir": root / "out"}, ("does not exist",)),
        "a folder without images": ({"folder": root / "notes", "output_dir": root / "out"}, ("notes holds no image",)),
    }


@pytest.mark.parametrize(
    "case",
    [
        "output folder is the image folder",
        "output folder inside the image folder",
        "two images with the same outputs",
        "two images whose outputs differ only in case",
        "two images whose outputs differ only in how an accent is encoded",
        "outputs of an earlier run",
        "an output that is an input image, even with --overwrite",
        "a folder that does not exist",
        "a folder without images",
    ],
)
def test_image_folders_that_would_lose_or_mix_files_are_refused(tmp_path, case):
    arguments, fragments = folder_cases(tmp_path)[case]
    before = snapshot(tmp_path)
    expect_error(lambda: ImageFolder(**arguments), *fragments)
    assert snapshot(tmp_path) == before


def test_names_that_only_a_case_mapping_would_join_are_both_segmented(tmp_path):
    """Straße and Strasse are two names to NTFS, exFAT and APFS alike: comparing them case-folded would refuse them."""
    folder_cases(tmp_path)
    folder = ImageFolder(tmp_path / "german", tmp_path / "out")
    assert sorted(Path(entry["image"]).name for entry in folder.entries) == ["Strasse.png", "Stra\u00dfe.png"]


def test_unreadable_images_are_left_out_and_named_one_line_each(tmp_path):
    photograph(tmp_path / "good_1.png")
    photograph(tmp_path / "good_2.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    photograph(tmp_path / "tiny.png", size=(10, 10))
    images = ImageFolder(tmp_path, tmp_path.parent / "out")
    assert [Path(e["image"]).name for e in images.entries] == ["good_1.png", "good_2.png"]
    with pytest.raises(FundusError) as caught:
        images.report_unreadable()
    first, *lines = str(caught.value).splitlines()
    assert first == "2 image(s) could not be segmented (the others were):"
    assert len(lines) == 2 and "broken.png" in lines[0] and "tiny.png: 10x10 pixels is too small" in lines[1]
    assert images.left_out == ["broken.png", "tiny.png"]


def test_a_folder_of_unreadable_images_alone_is_refused_at_once(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    with pytest.raises(FundusError) as caught:
        ImageFolder(tmp_path, tmp_path.parent / "out")
    first, *lines = str(caught.value).splitlines()
    assert first == "1 image(s) could not be segmented (no other image is in the folder):"
    assert len(lines) == 1 and "broken.png" in lines[0]


def test_a_photograph_whose_name_is_not_utf8_is_left_out_and_named(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    photograph(folder / "good.png")
    photograph(Path(os.fsdecode(os.fsencode(folder) + b"/Auge_M\xfcller.png")))  # a Latin-1 name
    images = ImageFolder(folder, tmp_path / "out")
    assert [Path(e["image"]).name for e in images.entries] == ["good.png"]
    with pytest.raises(FundusError) as caught:
        images.report_unreadable()
    assert "Auge_M\\xfcller.png: the file name is not UTF-8" in str(caught.value)
    str(caught.value).encode("utf-8")  # the message itself can be printed and recorded


class RunsCode:
    """A pickle that runs a command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def truncated_model(folder: Path) -> Path:
    model = write_model_file(folder / "model.pt", architecture="sam", image_size=64)
    truncated = folder / "truncated.pt"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    return truncated


def pickle_running_code(folder: Path) -> Path:
    with open(folder / "unsafe.pt", "wb") as handle:
        pickle.dump({"model": RunsCode(folder / "code_ran")}, handle)
    return folder / "unsafe.pt"


def weights_without_record(folder: Path) -> Path:
    torch.save({"weight": torch.zeros(2)}, folder / "bare.pt")
    return folder / "bare.pt"


def training_checkpoint(folder: Path) -> Path:
    """What TrainingCheckpoint writes (its keys; tensors of no consequence here)."""
    content = {"format": CHECKPOINT_FORMAT, "network_trainable": {"weight": torch.zeros(2)}, "optimizer": {}}
    torch.save(content, folder / "latest_checkpoint.pt")
    return folder / "latest_checkpoint.pt"


def garbage(folder: Path) -> Path:
    (folder / "garbage.pt").write_bytes(b"not a model at all")
    return folder / "garbage.pt"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (truncated_model, "truncated.pt cannot be read"),
        (garbage, "garbage.pt cannot be read"),
        (pickle_running_code, "unsafe.pt cannot be read"),
        (weights_without_record, "bare.pt records no network settings"),
        (training_checkpoint, "latest_checkpoint.pt is a training run's checkpoint, which --resume continues from"),
        (lambda folder: folder / "absent.pt", "absent.pt does not exist"),
    ],
    ids=["truncated", "not a model", "code in the pickle", "weights without our record", "training checkpoint", "missing"],
)
def test_damaged_or_unsafe_model_files_are_refused_in_one_line(tmp_path, make, expected):
    path = make(tmp_path)
    before = snapshot(tmp_path)
    message = expect_error(lambda: read_model_file(path), str(tmp_path), expected)
    assert "weights_only" not in str(message), "torch's advice to load the file unsafely is not passed on"
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "code_ran").exists()


def test_a_misspelt_override_is_named_with_the_nearest_setting(caplog):
    configs = str([TRAIN, QUICKSTART])
    argv = [BUNDLE_MAIN, "run", "training", "--config_file", configs, "--learning_rte", "0.5"]
    with caplog.at_level(logging.WARNING):
        assert warn_unknown_overrides(argv) == ["learning_rte"]
    assert (
        "--learning_rte is defined by no config of this workflow and has no effect; did you mean --learning_rate?"
        in caplog.text
    )
    tracked = [
        BUNDLE_MAIN,
        "run",
        "training",
        "--config_file",
        configs,
        "--tracking",
        "mlflow",
        "--tracking_uri",
        "http://127.0.0.1:5000",
        "--run_name",
        "first",
    ]
    assert warn_unknown_overrides(tracked) == []  # MONAI's own tracking settings
    # The same options written --key=value, which MONAI's command line takes as well.
    joined = [*tracked[:3], f"--config_file={configs}", "--tracking=mlflow", "--run_name=first", "--learning_rte=0.5"]
    assert warn_unknown_overrides(joined) == ["learning_rte"]
    # Files separated by commas, which MONAI's command line takes too.
    assert warn_unknown_overrides([*argv[:3], "--config_file", f"{TRAIN},{QUICKSTART}", "--datalist", "d.json"]) == []


@pytest.mark.parametrize("value", ["false", "true", "no", "0"])
def test_a_boolean_setting_written_otherwise_than_true_or_false_is_refused(value):
    """MONAI's command line (fire) reads only True and False as booleans: --overwrite false would reach the run as
    the text 'false', which counts as true, and replace earlier outputs."""
    import fire.parser

    assert bool(fire.parser.DefaultParseValue(value)) is (value != "0"), "the reading this check guards against"
    argv = [BUNDLE_MAIN, "run", "inference", "--config_file", INFER, "--overwrite", value]
    with pytest.raises(ConfigError, match=f"--overwrite {value}: write True or False, capitalised"):
        check_command_line(argv)
    for accepted in (["--overwrite", "False"], ["--overwrite=True"], ["--overwrite"], ["--resume", "auto"]):
        check_command_line([*argv[:5], *accepted])


@pytest.mark.parametrize(
    "configs, key, value, advice",
    [
        (INFER, "output_dir", "2024", "./2024"),
        (INFER, "dataset_dir", "photos,2024", "./photos,2024"),
        (INFER, "prompts_file", "2024", "./2024"),
        (TRAIN, "experiment_name", "2024", "\"'2024'\""),
        (TRAIN, "experiment_name", "True", "\"'True'\""),
    ],
    ids=[
        "a folder named by a number",
        "a folder with a comma",
        "a file whose default is none",
        "a name that is a number",
        "a name that is a word",
    ],
)
def test_text_settings_that_the_command_line_reads_as_other_values_are_refused(configs, key, value, advice):
    """MONAI's command line (fire) reads 2024 as a number and a,b as a tuple: --output_dir 2024 would fail deep in
    the run (a number plus a text), so it is refused with a way of writing it that stays text."""
    import fire.parser

    assert not isinstance(fire.parser.DefaultParseValue(value), str), "the reading this check guards against"
    written_so = advice.strip('"')
    assert isinstance(fire.parser.DefaultParseValue(written_so), str), "the advice keeps it text"
    argv = [BUNDLE_MAIN, "run", "inference", "--config_file", configs, f"--{key}", value]
    with pytest.raises(ConfigError, match=re.escape(f"--{key} {value}: MONAI's command line reads this as")) as caught:
        check_command_line(argv)
    assert f"write --{key} {advice}" in str(caught.value)
    check_command_line([*argv[:5], f"--{key}", written_so])


def test_a_setting_holding_a_hash_is_refused_as_monai_would_read_another_path(tmp_path):
    """MONAI's config parser turns every '#' of a config's text into '::' (its id separator): --output_dir "out #3"
    wrote its masks and reports into "out ::3" and exited 0; an image folder or model folder with a '#' was said not
    to exist under a name nobody typed."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({"output_dir": "$@root + '/eval'", "root": "."})
    parser["output_dir"] = str(tmp_path / "out #3")
    assert parser.get_parsed_content("output_dir") == str(tmp_path / "out ::3"), "the reading this check guards against"

    images = tmp_path / "photos #1"
    images.mkdir()
    write_png(images / "eye.png", np.full((64, 64, 3), 0.5))
    write_model_file(tmp_path / "model" / "model.pt", architecture="sam", image_size=64)
    output = tmp_path / "out #3"
    result = run_bundle("inference", [INFER], tmp_path, ckpt_dir=tmp_path / "model", dataset_dir=images,
                        output_dir=output, num_workers=0)
    assert result.returncode == 1, fail_message(result)
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --dataset_dir {images}: MONAI's config parser turns every '#' in a setting into '::', so the run "
        f"would use {tmp_path / 'photos ::1'}: rename it, or give a link to it whose path has no '#'."
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "photos #1"], "nothing written"
    argv = [BUNDLE_MAIN, "run", "training", "--config_file", TRAIN]
    with pytest.raises(ConfigError, match=re.escape("--experiment_name run #2: MONAI's config parser turns every '#' "
                                                    "in a setting into '::', so the run would use run ::2: write it "
                                                    "without '#'.")):
        check_command_line([*argv, "--experiment_name", "run #2"])
    # A reference or an expression uses '#' as a separator on purpose.
    check_command_line([*argv, "--val_interval", "@max_epochs", "--output_dir", "$@bundle_root + '/a#b'"])
    # From Python (a pipeline's own process) the parser's reading cannot be refused beforehand: the error says it.
    error = run_in_process("inference", [INFER], ckpt_dir=str(tmp_path / "model"), dataset_dir=str(images),
                           output_dir=str(output), num_workers=0)
    assert str(error) == (
        f"Image folder {tmp_path / 'photos ::1'} does not exist (MONAI's config parser turns every '#' in a setting "
        "into '::': a path holding '#' cannot be given to the bundle; rename it, or give a link to it whose path has "
        "no '#')."
    )


@pytest.mark.parametrize("uri", ["file:///data/mlruns", "./mlruns", "/data/mlruns"])
def test_an_mlflow_file_store_is_refused_before_the_run(uri, tmp_path, monkeypatch):
    """MONAI's MLFlowHandler refuses a folder as its store deep inside the run (two tracebacks), even where
    MLFLOW_ALLOW_FILE_STORE would let MLflow accept it: it is named before anything, with no advice to set it."""
    from monai.handlers import MLFlowHandler

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with pytest.raises(ValueError, match="no longer supports the filesystem"):  # the refusal this check runs ahead of
        MLFlowHandler(tracking_uri=f"file://{tmp_path}/mlruns")
    argv = [BUNDLE_MAIN, "run", "training", "--config_file", str([TRAIN, QUICKSTART]), "--tracking", "mlflow"]
    with pytest.raises(ConfigError, match=re.escape(f"--tracking_uri {uri} is an MLflow file store (a folder)")) as caught:
        check_command_line([*argv, "--tracking_uri", uri])
    assert "sqlite:///" in str(caught.value) and "MLFLOW_ALLOW_FILE_STORE" not in str(caught.value)
    for accepted in (f"sqlite:///{tmp_path}/mlruns.db", "http://localhost:5000"):
        check_command_line([*argv, "--tracking_uri", accepted])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # which MONAI takes over --tracking_uri
    with pytest.raises(ConfigError, match=re.escape(f"MLFLOW_TRACKING_URI {uri} is an MLflow file store")):
        check_command_line([*argv, "--tracking_uri", "http://localhost:5000"])
    check_command_line([*argv[:5], "--tracking_uri", "http://localhost:5000"])  # without --tracking, no store is used


def test_an_sqlite_store_that_cannot_be_written_is_refused_before_the_run(tmp_path, monkeypatch):
    """MLflow retried such a store for about 100 s, then MONAI failed with a traceback (and the earlier run's files
    had been moved aside for a run that never trained)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = [BUNDLE_MAIN, "run", "training", "--config_file", str([TRAIN, QUICKSTART]), "--tracking", "mlflow"]
    refused = {
        f"sqlite:///{tmp_path}": "it is a folder",
        "sqlite:////proc/mlruns.db": "/proc cannot be written",
        f"sqlite:///{tmp_path}/a_file/mlruns.db": "cannot be written",
    }
    (tmp_path / "a_file").write_text("not a folder")
    for uri, problem in refused.items():
        expected = re.escape(f"--tracking_uri {uri}: MLflow cannot keep its database")
        with pytest.raises(ConfigError, match=expected) as caught:
            check_command_line([*argv, "--tracking_uri", uri])
        assert problem in str(caught.value)
    check_command_line([*argv, "--tracking_uri", f"sqlite:///{tmp_path}/new/folders/mlruns.db"])  # MLflow makes them
    assert [path.name for path in tmp_path.iterdir()] == ["a_file"]  # the check leaves nothing


def test_an_output_folder_that_tracking_cannot_write_into_is_one_line(tmp_path):
    """MONAI writes the executed config of a run with --tracking into --output_dir while it builds the workflow,
    before the bundle's own check of the folder: a file there, or above it, was a traceback from pathlib."""
    (tmp_path / "a_file").write_text("not a folder")
    expected = {
        tmp_path / "a_file": f"Output folder {tmp_path / 'a_file'} cannot hold the executed config that --tracking "
        f"records ({tmp_path / 'a_file'} is a file, not a folder): name a folder that can be written with --output_dir.",
        tmp_path / "a_file" / "eval": f"Output folder {tmp_path / 'a_file' / 'eval'} cannot hold the executed config "
        f"that --tracking records ({tmp_path / 'a_file'} is a file, not a folder): name a folder that can be written "
        "with --output_dir.",
    }
    for output, message in expected.items():
        error = run_in_process("training", [TRAIN, QUICKSTART], tracking="mlflow", output_dir=str(output),
                               ckpt_dir=str(tmp_path / "models"))
        assert str(error) == message
    # A command line reports it before its workflow's initialize list runs: the config parser's import of
    # scripts.errors installs the hook. A forked preloaded child has that module imported already, so a real
    # interpreter runs it.
    command = bundle_command("training", [TRAIN, QUICKSTART], tracking="mlflow", output_dir=tmp_path / "a_file",
                             ckpt_dir=tmp_path / "models")
    result = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, fail_message(result)
    assert "Traceback" not in result.stderr, fail_message(result)
    assert result.stderr.strip().splitlines()[-1] == f"error: {expected[tmp_path / 'a_file']}"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file"], "nothing written"


def test_a_setting_given_as_none_is_refused_where_the_command_line_would_drop_it():
    """MONAI's command line drops None overrides: --max_training_minutes None would train with the quick start's
    10-minute limit, not without one."""
    from monai.bundle.scripts import update_kwargs

    assert update_kwargs(max_training_minutes=None) == {}, "the dropping this check guards against"
    argv = [BUNDLE_MAIN, "run", "training", "--config_file", str([TRAIN, QUICKSTART])]
    with pytest.raises(ConfigError, match=re.escape("--max_training_minutes None: MONAI's command line drops")) as caught:
        check_command_line([*argv, "--max_training_minutes", "None"])
    assert "('$None' for no value, where the setting takes none)" in str(caught.value)
    check_command_line([*argv, "--max_training_minutes", "$None"])
    # A setting whose default is None, or the word none, loses nothing.
    for key in ("pixel_size_mm", "prompts_file", "prompt_source"):
        check_command_line([BUNDLE_MAIN, "run", "inference", "--config_file", INFER, f"--{key}", "None"])


FILLING_WRITE = """
import resource, sys
from scripts.atomic import write_text_atomic
from scripts.errors import install_error_hook
install_error_hook()
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
write_text_atomic(sys.argv[1], "x" * 1_000_000)
"""


def test_a_write_the_file_system_refuses_is_one_line_and_keeps_the_earlier_file(tmp_path):
    """The kernel refuses the write part-way (a file-size limit: what a full disk does to a writer, EFBIG not ENOSPC)."""
    target = tmp_path / "measurements.csv"
    target.write_text("the earlier run's rows\n")
    before = snapshot(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", FILLING_WRITE, str(target)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: Cannot write {target} in folder {tmp_path} (File too large).", (
        result.stderr
    )
    assert snapshot(tmp_path) == before  # no temporary file left, the earlier file intact


def test_a_new_run_keeps_each_earlier_run_even_within_one_second(tmp_path, caplog):
    ckpt, output = tmp_path / "models", tmp_path / "eval"
    ckpt.mkdir()
    output.mkdir()
    kept = []
    for run in ("first", "second"):
        (ckpt / "model.pt").write_text(f"{run} run's model")
        (output / "training_log.jsonl").write_text(f"{run} run's log\n")
        (ckpt / "model_best.pt").write_text(f"{run} run's best")
        (ckpt / "latest_checkpoint.pt").write_text(f"{run} run's checkpoint")
        (output / "overlays" / "epoch_0002").mkdir(parents=True)
        (output / "overlays" / "epoch_0002" / "a.png").write_text(f"{run} run's picture")
        with caplog.at_level(logging.WARNING):
            kept.append(keep_earlier_run(ckpt, output, resume=False))
        # Only the model a fine-tuning run starts from stays: nothing else of the earlier run passes for the new one's.
        assert sorted(path.name for path in ckpt.iterdir()) == ["earlier_runs", "model.pt"]
        assert (ckpt / "model.pt").read_text() == f"{run} run's model"
        assert not any(output.iterdir())
    assert kept[0] != kept[1] and kept[0].parent == kept[1].parent == ckpt / "earlier_runs"
    for folder, run in zip(kept, ("first", "second")):
        assert (folder / "model.pt").read_text() == f"{run} run's model"
        assert (folder / "training_log.jsonl").read_text() == f"{run} run's log\n"
        assert (folder / "model_best.pt").read_text() == f"{run} run's best"
        assert (folder / "latest_checkpoint.pt").read_text() == f"{run} run's checkpoint"
        assert (folder / "overlays" / "epoch_0002" / "a.png").read_text() == f"{run} run's picture"
    assert f"were copied to {kept[1]} before this new run replaces them" in caplog.text
    assert keep_earlier_run(ckpt, output, resume=True) is None


def test_resume_auto_without_a_checkpoint_keeps_the_earlier_run_as_a_new_run_does(tmp_path):
    """`auto` without a checkpoint starts a new run, which wrote over the earlier run's models, log and pictures
    (a run whose latest_checkpoint.pt was deleted to save space); with one it goes on, and nothing moves."""
    ckpt, output = tmp_path / "models", tmp_path / "eval"
    ckpt.mkdir()
    output.mkdir()
    (ckpt / "model.pt").write_text("the earlier run's model")
    (ckpt / "model_best.pt").write_text("the earlier run's best")
    (output / "training_log.jsonl").write_text("the earlier run's log\n")
    kept = keep_earlier_run(ckpt, output, resume="auto")
    assert kept is not None and (kept / "model_best.pt").read_text() == "the earlier run's best"
    assert (kept / "training_log.jsonl").read_text() == "the earlier run's log\n"
    assert sorted(path.name for path in ckpt.iterdir()) == ["earlier_runs", "model.pt"]

    (ckpt / "latest_checkpoint.pt").write_text("a run to go on with")
    (ckpt / "model_best.pt").write_text("its best")
    assert keep_earlier_run(ckpt, output, resume="auto") is None
    assert (ckpt / "model_best.pt").read_text() == "its best"
    assert len(list((ckpt / "earlier_runs").iterdir())) == 1

    # No checkpoint file for the run to go on from (the handler's test): a new run, so its files are kept aside too.
    (ckpt / "latest_checkpoint.pt").unlink()
    (ckpt / "latest_checkpoint.pt").mkdir()
    kept = keep_earlier_run(ckpt, output, resume="auto")
    assert kept is not None and (kept / "model_best.pt").read_text() == "its best"


@pytest.mark.parametrize("resume", [False, True])
def test_training_moves_an_evaluation_of_the_model_it_changes_out_of_the_shared_output_folder(tmp_path, caplog, resume):
    """Training and evaluation share bundle/eval by default: an earlier evaluation's figures stayed beside a new
    (or resumed) run's log and passed for the new model's."""
    ckpt, output = tmp_path / "models", tmp_path / "eval"
    ckpt.mkdir()
    output.mkdir()
    (ckpt / "model_best.pt").write_text("the evaluated model")
    (ckpt / "latest_checkpoint.pt").write_text("its checkpoint")
    reports = ("metrics_summary.json", "metrics_per_image.csv", "measurement_agreement.csv", "bland_altman_vertical_cdr.png")
    for name in reports:
        (output / name).write_text(f"the evaluation's {name}")
    with caplog.at_level(logging.WARNING):
        keep_earlier_run(ckpt, output, resume=resume)
    assert sorted(path.name for path in output.iterdir()) == ["earlier_evaluations"]
    (moved,) = (output / "earlier_evaluations").iterdir()
    assert {path.name: path.read_text() for path in moved.iterdir()} == {n: f"the evaluation's {n}" for n in reports}
    assert f"moved to {moved} as this training run changes the model they describe" in caplog.text


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    previous = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "atomic.csv", "rows\n")
        (tmp_path / "plain.csv").write_text("rows\n")
    finally:
        os.umask(previous)
    assert (tmp_path / "atomic.csv").stat().st_mode & 0o777 == (tmp_path / "plain.csv").stat().st_mode & 0o777 == 0o640


def test_an_image_named_like_another_image_s_output_is_not_segmented_and_it_is_said(tmp_path, caplog):
    photograph(tmp_path / "eye.png")
    photograph(tmp_path / "eye_mask.png")
    with caplog.at_level(logging.INFO):
        images = ImageFolder(tmp_path, tmp_path.parent / "out")
    assert [Path(e["image"]).name for e in images.entries] == ["eye.png"]
    assert f"Not segmenting {tmp_path / 'eye_mask.png'}: it is named like an output of another image" in caplog.text


def test_repeated_images_and_labels_with_more_than_two_levels_are_warned_about(tmp_path, caplog):
    photograph(tmp_path / "a.png")
    grey = np.zeros((48, 64), np.uint8)
    grey[:, 30:34] = [255, 128, 128, 255]  # an anti-aliased drawing: four gray levels
    write_png(tmp_path / "a_label.png", grey)
    entry = {"image": "a.png", "label": "a_label.png"}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [entry, entry]}))
    with caplog.at_level(logging.WARNING):
        entries = load_split(datalist, "training")
    assert len(entries) == 2
    assert f"Datalist {datalist}: 'training' lists 1 images more than once, e.g. {tmp_path / 'a.png'}." in caplog.text
    assert (
        f"Label {tmp_path / 'a_label.png'} has 3 gray levels (0, 128, 255...), not two: thresholded at 127."
        in caplog.text
    )


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (lambda: check_finetune("partial"), "Setting 'finetune' must be one of lora, lora+decoder, full; got 'partial'."),
        (lambda: build_network("vit"), "Setting 'architecture' must be one of sam, unet; got 'vit'."),
        (lambda: check_input_mode("tiles"), "Setting 'input_mode' must be one of resize, sliding_window; got 'tiles'."),
        (lambda: check_input_mode("sliding_window", 0), "Setting 'pixel_scale' must be a positive number"),
        (
            lambda: TrainingTimeLimit(0),
            (
                "Setting 'max_training_minutes' must be positive, or none for no limit (null in a config file, '$None' "
                "on the command line); got 0."
            ),
        ),
        # A command line's number that is not one arrives as a string: the setting's own line, not a TypeError.
        (
            lambda: TrainingTimeLimit("ten"),
            (
                "Setting 'max_training_minutes' must be positive, or none for no limit (null in a config file, '$None' "
                "on the command line); got 'ten'."
            ),
        ),
        (
            lambda: GradientClipping("one"),
            (
                "Setting 'gradient_clip_norm' must be a positive number (the largest total L2 norm of the gradients); "
                "got 'one'."
            ),
        ),
        (lambda: FundusInferer(overlap="half"), "Setting 'window_overlap' must be in [0, 1); got 'half'."),
        (
            lambda: LoRALinear(4, 4, rank=2, alpha=4.0, dropout="0.1"),
            "Setting 'lora_dropout' must be at least 0 and below 1; got '0.1'.",
        ),
        (
            lambda: LoRALinear(4, 4, rank=2, alpha=0),
            "Setting 'lora_alpha' must be a positive number (the paper's: twice the rank); got 0.",
        ),
        (
            lambda: SamplePromptsd(no_prompt_prob="half"),
            "Setting 'prompt_free_probability' must be a probability in [0, 1]; got 'half'.",
        ),
        (
            lambda: SamplePromptsd(num_positive=0),
            "Settings 'prompt_positive_points', 'prompt_negative_points' and 'prompt_box' give no prompt slot",
        ),
        (
            lambda: check_head_takes_prompts("unet", None, "auto_box"),
            "Setting 'prompt_source' ('auto_box') needs architecture 'sam'; the 'unet' head is prompt-free.",
        ),
        (
            lambda: check_head_takes_prompts("unet", "p.json", "none"),
            "Setting 'prompts_file' ('p.json') needs architecture 'sam'",
        ),
    ],
    ids=[
        "finetune", "architecture", "input_mode", "pixel_scale", "max_training_minutes", "max_training_minutes_text",
        "gradient_clip_norm_text", "window_overlap_text", "lora_dropout_text", "lora_alpha_zero",
        "prompt_free_probability_text",
        "no_prompt_slot", "prompt_source_for_unet", "prompts_file_for_unet",
    ],
)
def test_bad_setting_values_are_refused_by_their_checks_in_one_line(check: Callable[[], object], message: str):
    with pytest.raises(ConfigError) as caught:
        check()
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    ("tool", "argv", "option"),
    [
        ("score", ["--datalist", "d.json", "--predictions", "p", "--output", ""], "--output"),
        ("baseline", ["--datalist", "d.json", "--output", " "], "--output"),
        ("prepare", ["--pool", "a.json", "--output", ""], "--output"),
        ("export", ["--output", ""], "--output"),
        ("deploy", ["--format", "onnx", "--output", "out.onnx", "--ckpt_path", ""], "--ckpt_path"),
        ("benchmark", ["--output-dir", ""], "--output-dir"),
    ],
)
def test_an_empty_path_given_to_a_tool_is_refused_before_it_runs(tool, argv, option, tmp_path, monkeypatch, capsys):
    """An unset shell variable named the folder the tool ran in: tools.score wrote its reports there unasked."""
    import importlib

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        importlib.import_module(f"tools.{tool}").main(argv)
    assert caught.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        f"python -m tools.{tool}: error: argument {option}: an empty name would be the folder the command runs in: "
        "give the folder or file (./ for that folder)"
    )
    assert not any(tmp_path.iterdir())

"""The MONAI bundle end to end: train, infer and evaluate on synthetic data and on real DRIVE, plus MONAI's checks."""

from __future__ import annotations

import copy
import csv
import json
import re
import shutil
import sys
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata, verify_net_in_out
from monai.bundle import run as monai_run
from monai.data import MetaTensor
from PIL import Image
from scipy import ndimage

from scripts.adapters import ModelFileError
from scripts.errors import user_error
from scripts.handlers import FundusMetricsWriter, MeasurementAgreement
from scripts.handlers.evaluation import EVALUATION_OUTPUTS
from scripts.inputs import OUTPUT_LOCK, ImageFolder
from scripts.prompts import PROMPT_EROSION_PX, oracle_prompt
from scripts.synthetic import write_dataset
from tests.helpers import (
    BUNDLE,
    EVALUATE,
    FAST,
    INFER,
    LOGGING,
    META,
    QUICKSTART,
    QUICKSTART_DISC_CUP,
    REPO,
    TRAIN,
    fail_message,
    held_by_another_process,
    run_bundle,
    run_in_process,
    write_model_file,
)
from tools.prepare import prepare_dataset


@pytest.fixture(scope="module")
def quickstart_run(module_folder) -> dict[str, Path]:
    """The quick start (synthetic data generated on the fly, random init, Hiera tiny) at a test-sized scale."""
    root = module_folder("quickstart")
    paths = {"data": root / "synthetic", "models": root / "models", "eval": root / "eval"}
    result = run_bundle(
        "training",
        [TRAIN, QUICKSTART],
        cwd=root,
        dataset_dir=paths["data"],
        synthetic_images=6,
        synthetic_image_size=128,
        ckpt_dir=paths["models"],
        output_dir=paths["eval"],
        **FAST,
    )
    assert result.returncode == 0, fail_message(result)
    paths["log"] = result.stdout + result.stderr
    return paths


def test_quickstart_trains_and_writes_the_model(quickstart_run):
    assert (quickstart_run["data"] / "datalist.json").is_file(), "the synthetic dataset was generated"
    for name in ("model.pt", "model_best.pt"):
        assert (quickstart_run["models"] / name).is_file(), name
    assert list(quickstart_run["models"].glob("latest*.pt")), "the latest training checkpoint is kept"
    assert "RANDOM weights" in quickstart_run["log"], "random initialisation is logged"
    assert "train_loss" in quickstart_run["log"] and "val_fov_dice" in quickstart_run["log"]
    record = torch.load(quickstart_run["models"] / "model.pt", map_location="cpu", weights_only=True)["_extra_state"]
    quickstart = json.loads(Path(QUICKSTART).read_text())
    for key in ("architecture", "finetune", "model_size"):
        assert record[key] == quickstart[key], key
    assert record["base_weights"] == "random" and record["image_size"] == FAST["image_size"]


def test_disc_cup_quick_start_trains_the_sam_head_and_evaluates_its_prompt_modes(quickstart_run, tmp_path):
    """quickstart_disc_cup.json on top of the quick start: the paper's SAM head on the synthetic disc and cup,
    trained with prompts (points and boxes), then evaluated over prompt-free, oracle and automatic modes."""
    configs = [TRAIN, QUICKSTART, QUICKSTART_DISC_CUP]
    models = tmp_path / "models"
    shared = {"cwd": tmp_path, "dataset_dir": quickstart_run["data"], "synthetic_images": 6, **FAST}
    result = run_bundle("training", configs, ckpt_dir=models, output_dir=tmp_path / "train", **shared)
    assert result.returncode == 0, fail_message(result)
    record = torch.load(models / "model.pt", map_location="cpu", weights_only=True)["_extra_state"]
    overlay = json.loads(Path(QUICKSTART_DISC_CUP).read_text())
    assert (record["architecture"], record["channel_names"]) == ("sam", ["disc", "cup"])
    assert (record["finetune"], record["recorded"]["input_mode"]) == (overlay["finetune"], "resize")

    output = tmp_path / "metrics"
    modes = ["none", "box", "auto_box"]
    result = run_bundle(
        "evaluating",
        [*configs, EVALUATE],
        ckpt_path=models / "model_best.pt",
        output_dir=output,
        prompt_modes=modes,
        **shared,
    )
    assert result.returncode == 0, fail_message(result)
    metrics = json.loads((output / "metrics_summary.json").read_text())["summary"]["all"]["metrics"]
    assert {f"{channel}@{mode}/fov/dice" for channel in ("disc", "cup") for mode in modes} <= set(metrics)


def test_inference_writes_masks_at_each_images_size(quickstart_run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    source = next((quickstart_run["data"] / "images").glob("*.png"))
    shutil.copy(source, images / "square.png")
    Image.open(source).resize((100, 72)).save(images / "wide.jpg")
    output = tmp_path / "out"
    result = run_bundle(
        "inference",
        [INFER, QUICKSTART],
        cwd=tmp_path,
        dataset_dir=images,
        ckpt_path=quickstart_run["models"] / "model.pt",
        output_dir=output,
        write_nifti=True,
        restrict_to_fov=True,
        **FAST,
    )
    assert result.returncode == 0, fail_message(result)
    for stem, size in (("square", Image.open(source).size), ("wide", (100, 72))):
        mask = Image.open(output / f"{stem}_mask.png")
        assert mask.size == size
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert Image.open(output / f"{stem}_prob.png").size == size
        assert Image.open(output / f"{stem}_overlay.png").mode == "RGB"
        assert (output / f"{stem}_mask.nii.gz").is_file()


def test_evaluation_writes_per_image_and_summary_metrics(quickstart_run, tmp_path):
    # The test split without its FOV masks, as for CHASE_DB1 or STARE: the field of view is estimated, and said so.
    generated = json.loads((quickstart_run["data"] / "datalist.json").read_text())
    datalist = quickstart_run["data"] / "datalist_without_fov.json"
    datalist.write_text(json.dumps({**generated, "test": [
        {key: value for key, value in entry.items() if key != "fov"} for entry in generated["test"]
    ]}))
    output = tmp_path / "metrics"
    result = run_bundle(
        "evaluating",
        [TRAIN, EVALUATE, QUICKSTART],
        cwd=tmp_path,
        datalist=datalist,
        ckpt_path=quickstart_run["models"] / "model.pt",
        output_dir=output,
        **FAST,
    )
    assert result.returncode == 0, fail_message(result)
    summary = json.loads((output / "metrics_summary.json").read_text())
    overall = summary["summary"]["all"]["metrics"]
    for region in ("fov", "image"):
        for metric in ("dice", "iou", "auc", "sensitivity", "specificity", "accuracy", "mcc", "hd95", "cldice"):
            assert f"vessels/{region}/{metric}" in overall, (region, metric)
    with open(output / "metrics_per_image.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    assert len(rows) == 1, "one test image in a 6-image synthetic dataset"
    assert rows[0]["fov_source"] == "estimated"
    assert summary["summary"]["all"]["fov_sources"] == {"given": 0, "estimated": 1}
    log = result.stdout + result.stderr
    assert "vessels" in log, "the summary table is logged"
    assert "fields of view estimated from the photograph (no FOV mask in the datalist): synthetic: 1 of 1" in log


def test_evaluation_reports_each_prompt_mode_with_the_prompts_it_drew(tmp_path):
    """A disc/cup model evaluated over prompt-free, oracle and automatic modes: metrics per mode and channel, the
    prompts written next to them, oracle prompts drawn from the disc (channel 0) of the reference at the
    photograph's size and seeded by the image's name, and the chart per mode. The datalist is an external test set
    (a test list alone): evaluation reads no other split."""
    data = tmp_path / "data"
    datalists = write_dataset(data, count=3, size=96, seed=4)
    test_set = data / "test_only.json"
    test_set.write_text(json.dumps({"test": json.loads(Path(datalists["disc_cup"]).read_text())["test"]}))
    model = write_model_file(tmp_path / "models" / "model.pt", channel_names=["disc", "cup"])
    modes = ["none", "box", "5_points", "auto_box"]
    output = tmp_path / "metrics"
    result = run_bundle(
        "evaluating",
        [TRAIN, EVALUATE],
        cwd=tmp_path,
        datalist=test_set,
        ckpt_path=model,
        output_dir=output,
        prompt_modes=modes,
        **FAST,
    )
    assert result.returncode == 0, fail_message(result)
    metrics = json.loads((output / "metrics_summary.json").read_text())["summary"]["all"]["metrics"]
    for mode in modes:
        for channel in ("disc", "cup"):
            assert f"{channel}@{mode}/fov/dice" in metrics and f"{channel}@{mode}/image/dice" in metrics, (channel, mode)
    assert (output / "metrics_by_prompt_mode.png").is_file()

    entry = json.loads(datalists["disc_cup"].read_text())["test"][0]
    name = Path(entry["image"]).name
    disc = np.asarray(Image.open(data / entry["label"][0])) > 127
    recorded = json.loads((output / "prompts.json").read_text())["images"]
    # Under each image's path, as metrics_per_image.csv names it: pooled datasets may number photographs alike.
    with open(output / "metrics_per_image.csv", newline="") as table:
        assert set(recorded) == {row["filename"] for row in csv.DictReader(table)}
    [path] = [path for path in recorded if Path(path).name == name]
    used = recorded[path]
    assert set(used) == set(modes)
    assert used["none"] == {"points": []}
    rows, cols = np.nonzero(disc)
    assert used["box"] == {"points": [], "box": [cols.min(), rows.min(), cols.max(), rows.max()]}
    # Training's erosion, 2 px of the network's 64 px input, is 3 px of the 96 px photograph.
    assert disc.shape == (96, 96) and round(PROMPT_EROSION_PX * 96 / 64) == 3
    core = ndimage.binary_erosion(disc, iterations=3)
    points = used["5_points"]["points"]
    assert len(points) == 5 and all(label == 1 and core[int(y), int(x)] for x, y, label in points)
    expected = oracle_prompt(disc, "5_points", name, erosion_px=3).to_json()["points"]
    assert points == expected, "seeded by the image's name"
    assert "box" in used["auto_box"] or used["auto_box"]["points"] == [], used["auto_box"]

    # Each file the evaluation wrote is one the next evaluation moves aside, so that a prompt-free evaluation into
    # the same folder leaves no prompts or per-mode chart of this one to pass for its own. Its lock stays: no report.
    written = sorted(path.name for path in output.iterdir() if path.name != OUTPUT_LOCK)
    assert all(any(fnmatch(name, pattern) for pattern in EVALUATION_OUTPUTS) for name in written), written
    again = run_bundle("evaluating", [TRAIN, EVALUATE], cwd=tmp_path, datalist=test_set, ckpt_path=model,
                       output_dir=output, **FAST)
    assert again.returncode == 0, fail_message(again)
    assert not (output / "prompts.json").exists() and not (output / "metrics_by_prompt_mode.png").exists()
    assert "disc/fov/dice" in json.loads((output / "metrics_summary.json").read_text())["summary"]["all"]["metrics"]
    [earlier] = (output / "earlier_evaluations").iterdir()
    assert sorted(path.name for path in earlier.iterdir()) == written
    assert json.loads((earlier / "prompts.json").read_text())["images"][path]["box"] == used["box"]


@pytest.fixture(scope="module")
def drive_run(drive_dir, module_folder) -> dict[str, Path]:
    root = module_folder("drive")
    datalist = root / "datalist.json"
    prepare_dataset("DRIVE", drive_dir, datalist)
    paths = {"datalist": datalist, "models": root / "models", "eval": root / "eval", "root": root}
    result = run_bundle(
        "training",
        [TRAIN, QUICKSTART],
        cwd=root,
        datalist=datalist,
        ckpt_dir=paths["models"],
        output_dir=paths["eval"],
        **FAST,
    )
    assert result.returncode == 0, fail_message(result)
    return paths


def test_drive_end_to_end_keeps_orientation(drive_run, drive_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for case in ("01", "02"):
        shutil.copy(drive_dir / "test" / "images" / f"{case}_test.tif", images)
    output = tmp_path / "masks"
    result = run_bundle(
        "inference",
        [INFER, QUICKSTART],
        cwd=tmp_path,
        dataset_dir=images,
        ckpt_path=drive_run["models"] / "model.pt",
        output_dir=output,
        **FAST,
    )
    assert result.returncode == 0, fail_message(result)
    for case in ("01", "02"):
        truth = np.asarray(Image.open(drive_dir / "test" / "1st_manual" / f"{case}_manual1.gif"))
        mask = np.asarray(Image.open(output / f"{case}_test_mask.png"))
        assert truth.shape == (584, 565)
        assert mask.shape == truth.shape, "the mask of a 565 x 584 image must be 584 rows by 565 columns"


def test_drive_evaluation_inside_the_fov(drive_run, tmp_path):
    # Four of DRIVE's 20 test images (each costs seconds of sliding windows and metrics on two cores); beside the
    # prepared datalist, whose relative paths it keeps.
    prepared = json.loads(drive_run["datalist"].read_text())
    datalist = drive_run["datalist"].with_name("datalist_four_test_images.json")
    datalist.write_text(json.dumps({**prepared, "test": prepared["test"][:4]}))
    output = tmp_path / "metrics"
    result = run_bundle(
        "evaluating",
        [TRAIN, EVALUATE, QUICKSTART],
        cwd=tmp_path,
        datalist=datalist,
        ckpt_path=drive_run["models"] / "model.pt",
        output_dir=output,
        **FAST,
    )
    assert result.returncode == 0, fail_message(result)
    rows = (output / "metrics_per_image.csv").read_text().strip().splitlines()
    assert len(prepared["test"]) == 20 and len(rows) == 1 + 4, "the datalist's test images are evaluated"
    summary = json.loads((output / "metrics_summary.json").read_text())
    assert "DRIVE" in json.dumps(summary)
    assert summary["summary"]["datasets"]["DRIVE"]["fov_sources"] == {"given": 4, "estimated": 0}, "DRIVE's masks"
    with open(output / "metrics_per_image.csv", newline="") as table:
        assert [row["fov_source"] for row in csv.DictReader(table)] == ["given"] * 4


def test_verify_metadata_against_the_model_zoo_schema(tmp_path):
    schema = tmp_path / "schema.json"
    shutil.copy(REPO / "tests" / "fixtures" / "meta_schema_20240725.json", schema)  # no download offline
    verify_metadata(meta_file=META, filepath=str(schema))
    metadata = json.loads(Path(META).read_text())
    assert metadata["version"] in metadata["changelog"]
    packaged = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert packaged and packaged[1] == metadata["version"], "the package and the bundle are released together"
    assert metadata["network_data_format"]["inputs"]["image"]["num_channels"] == 3


@pytest.mark.parametrize("architecture", ["sam", "unet"])
def test_verify_net_in_out(tmp_path, architecture):
    """MONAI's check with its default sizes: the metadata's shapes are ones both heads take (the U-Net head takes
    no input under 31 px, which a "*" would have MONAI try as 1 px)."""
    model = write_model_file(tmp_path / "model.pt", architecture=architecture)
    verify_net_in_out(net_id="network_def", meta_file=META, config_file=[INFER], device="cpu", ckpt_path=str(model))


@pytest.mark.parametrize("workflow_type, configs", [("train", [TRAIN, QUICKSTART]), ("infer", [INFER])])
def test_config_workflow_properties(workflow_type, configs, tmp_path):
    write_model_file(tmp_path / "model.pt")
    datalist = write_dataset(tmp_path / "data", count=3, size=64)["vessels"]
    workflow = ConfigWorkflow(
        config_file=configs,
        meta_file=META,
        logging_file=LOGGING,
        workflow_type=workflow_type,
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "out"),
        ckpt_path=str(tmp_path / "model.pt"),
        datalist=str(datalist),
        dataset_dir=str(tmp_path / "data" / "images"),
        **FAST,
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_inference_builds_the_network_the_model_file_records(tmp_path):
    """inference.json states no network setting of its own: a model trained with other settings runs as trained."""
    from monai.bundle import ConfigParser

    recorded = {"channel_names": ["disc", "cup"], "lora_rank": 8, "lora_alpha": 8.0, "finetune": "lora+decoder"}
    model = write_model_file(tmp_path / "model.pt", architecture="unet", image_size=96, **recorded)
    parser = ConfigParser()
    parser.read_config([INFER])
    parser["ckpt_path"] = str(model)
    network = parser.get_parsed_content("network_def")
    assert type(network).__name__ == "SAM2UNet"
    assert network.settings["image_size"] == 96
    for key, value in recorded.items():
        assert network.settings[key] == value, key


@pytest.mark.parametrize(("config", "head"), [(INFER, "unet"), (EVALUATE, "sam")])
def test_a_setting_conflicting_with_the_model_file_is_refused_before_building(tmp_path, config, head):
    """The other head (whose LoRA targets name no module of this one's) or image size: one line naming both values."""
    from monai.bundle import ConfigParser

    model = write_model_file(tmp_path / "model.pt", architecture=head, image_size=64)
    other = "sam" if head == "unet" else "unet"
    parser = ConfigParser()
    parser.read_config([TRAIN, config] if config == EVALUATE else [config])
    parser.update({"ckpt_path": str(model), "architecture": other, "image_size": 128})
    with pytest.raises(Exception) as caught:
        parser.get_parsed_content("network_def")
    error = user_error(caught.value)
    assert isinstance(error, ModelFileError), caught.value
    assert f"architecture: trained with '{head}', this run sets '{other}'" in str(error)
    assert "image_size: trained with 64, this run sets 128" in str(error)


def test_a_datalist_naming_missing_files_is_refused_before_any_folder_is_created(tmp_path):
    datalist = tmp_path / "datalist.json"
    entry = {"image": "nowhere/a.png", "label": "nowhere/a_label.png", "fov": "nowhere/a_fov.png"}
    datalist.write_text(json.dumps({"training": [entry], "validation": [entry], "test": []}))
    error = run_in_process("training", [TRAIN, QUICKSTART], datalist=str(datalist), ckpt_dir=str(tmp_path / "models"),
                           output_dir=str(tmp_path / "eval"), **FAST)
    assert str(datalist) in str(error) and "a.png" in str(error) and "missing" in str(error)
    assert not (tmp_path / "models").exists() and not (tmp_path / "eval").exists()


def test_empty_datalist(tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "validation": [], "test": []}))
    error = run_in_process("training", [TRAIN, QUICKSTART], datalist=str(datalist), ckpt_dir=str(tmp_path),
                           output_dir=str(tmp_path / "eval"), **FAST)
    assert "'training' list is empty" in str(error)


def test_missing_base_checkpoint_says_how_to_get_it(tmp_path):
    datalist = write_dataset(tmp_path / "data", count=3, size=64)["vessels"]
    error = run_in_process("training", [TRAIN], datalist=str(datalist), ckpt_dir=str(tmp_path),
                           output_dir=str(tmp_path / "eval"), **FAST)
    message = str(error)
    assert "sam2.1_hiera_large.pt" in message and "download_large_files" in message


def test_missing_model_file(tmp_path):
    (tmp_path / "images").mkdir()
    error = run_in_process(
        "inference",
        [INFER],
        dataset_dir=str(tmp_path / "images"),
        ckpt_path=str(tmp_path / "model.pt"),
        output_dir=str(tmp_path / "out"),
    )
    assert f"Trained model {tmp_path / 'model.pt'} does not exist" in str(error)


def refused_inference(folder: Path, architecture: str = "sam", **settings) -> Exception:
    """The error of an inference run on ``folder`` with a model of ``architecture`` and these settings."""
    write_model_file(folder / "model.pt", architecture=architecture)
    settings = {"dataset_dir": str(folder), "output_dir": str(folder / "out"), **settings}
    return run_in_process("inference", [INFER], ckpt_path=str(folder / "model.pt"), **settings)


def test_prompts_for_a_unet_model_are_refused_before_any_image_is_read(tmp_path):
    """The U-Net head is prompt-free: inference's prompts (as evaluation's prompt modes) stop the run at start-up."""
    error = refused_inference(tmp_path, architecture="unet", prompt_source="auto_box")
    expected = "Setting 'prompt_source' ('auto_box') needs architecture 'sam'; the 'unet' head is prompt-free."
    assert str(error) == expected
    assert not (tmp_path / "out").exists()


def test_a_prompts_file_naming_an_unreadable_photograph_prompts_the_others(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(images / "good.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps({"good.png": {"box": [5, 5, 40, 30]}, "broken.png": {"box": [1, 1, 5, 5]}}))
    error = refused_inference(images, prompts_file=str(prompts_file), output_dir=str(tmp_path / "out"))
    assert str(error).startswith("1 image(s) could not be segmented (the others were):") and "broken.png" in str(error)
    assert (tmp_path / "out" / "good_mask.png").is_file()
    used = json.loads((tmp_path / "out" / "prompts_used.json").read_text())["images"]
    assert used == {"good.png": {"given": {"points": [], "box": [5, 5, 40, 30]}}}


def test_a_bad_pixel_size_is_refused_before_the_model_runs(tmp_path):
    error = refused_inference(tmp_path, pixel_size_mm=0)
    assert str(error).startswith("Setting 'pixel_size_mm' must be a positive number of millimetres per pixel")


def test_unwritable_output_folder(tmp_path):
    photograph(tmp_path / "images" / "eye.png")  # the image folder's checks come first
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    error = refused_inference(tmp_path / "images", output_dir=str(blocker / "out"))
    assert f"Output folder {blocker / 'out'} cannot be written" in str(error)


def photograph(path: Path, size: tuple[int, int] = (60, 80)) -> Path:
    """A random RGB photograph of ``(height, width)``: a model of random weights segments anything."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def infer(model: Path, images: Path, output: Path, **settings) -> None:
    """Run inference in this process (faster than a fresh one), expecting it to succeed."""
    monai_run(
        "inference", meta_file=META, config_file=[INFER], bundle_root=str(BUNDLE), ckpt_path=str(model),
        dataset_dir=str(images), output_dir=str(output), **settings,
    )


@pytest.mark.parametrize(
    "case",
    [
        "output inside the images",
        "no image",
        "no folder",
        "bad prompts file",
        "a setting the model contradicts",
        "prompts with compile",
        "negative points below 0",
        "a word for the quality threshold",
        "an autocast type torch lacks",
    ],
)
def test_a_refused_inference_creates_no_output_folder(tmp_path, case):
    """Every input is checked before the output folder is made: a refused run leaves no folder behind, least of all
    one inside the user's image folder."""
    model = write_model_file(tmp_path / "model" / "model.pt")
    images, output = tmp_path / "images", tmp_path / "out"
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"other.png": {"box": [1, 1, 5, 5]}}))
    if case != "no folder":
        images.mkdir()
    if case not in ("no image", "no folder"):
        photograph(images / "eye.png")
    settings, expected = {
        "output inside the images": ({"output_dir": str(images / "sub")}, "is the image folder"),
        "no image": ({}, "holds no image"),
        "no folder": ({}, "does not exist"),
        "bad prompts file": ({"prompts_file": str(prompts)}, "not in the image folder, e.g. 'other.png'"),
        "a setting the model contradicts": ({"image_size": 128}, "image_size: trained with 64, this run sets 128"),
        "prompts with compile": ({"prompt_source": "auto_box", "compile": True}, "Prompts need compile false"),
        "negative points below 0": (
            {"prompt_source": "auto_points", "auto_negative_points": -1},
            "Setting 'auto_negative_points' must be 0 or a positive whole number; got -1.",
        ),
        "a word for the quality threshold": ({"quality_threshold": "high"}, "Setting 'quality_threshold'"),
        "an autocast type torch lacks": ({"amp_dtype": "bf16"}, "Setting 'amp_dtype' must be one of bfloat16"),
    }[case]
    before = sorted(tmp_path.rglob("*"))
    error = run_in_process(
        "inference", [INFER], ckpt_path=str(model), dataset_dir=str(images), **{"output_dir": str(output), **settings}
    )
    assert expected in str(error)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "case", ["an empty test list", "a setting the model contradicts", "prompt modes with compile"]
)
def test_a_refused_evaluation_creates_no_output_folder(tmp_path, case):
    """A refused evaluation creates no folder, and into a folder of an earlier evaluation it moves nothing aside: the
    inferer's settings are checked before either, as the data's and the network's are."""
    model = write_model_file(tmp_path / "model.pt")
    datalist = tmp_path / "datalist.json"
    if case == "an empty test list":
        datalist.write_text(json.dumps({"test": []}))
        settings, expected = {}, "'test' list is empty"
    else:
        datalist = write_dataset(tmp_path / "data", count=3, size=96, seed=4)["vessels"]
        settings, expected = {
            "a setting the model contradicts": ({"image_size": 128}, "image_size: trained with 64, this run sets 128"),
            "prompt modes with compile": ({"prompt_modes": ["none", "box"], "compile": True}, "need compile false"),
        }[case]
    output = tmp_path / "eval"
    if case == "prompt modes with compile":
        output.mkdir()
        (output / "metrics_summary.json").write_text("{}")
    before = sorted(tmp_path.rglob("*"))
    error = run_in_process("evaluating", [TRAIN, EVALUATE], datalist=str(datalist), ckpt_path=str(model),
                           output_dir=str(output), num_workers=0, **settings)
    assert expected in str(error)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_batch_larger_than_the_training_split_is_warned_about_at_start_up(tmp_path, capsys):
    datalist = write_dataset(tmp_path / "data", count=6, size=96, seed=4)["vessels"]  # 4 training images
    capsys.readouterr()
    # The network's refusal, which comes after the warning, ends the run before any training.
    run_in_process("training", [TRAIN, QUICKSTART], datalist=str(datalist), ckpt_dir=str(tmp_path / "models"),
                   output_dir=str(tmp_path / "eval"), finetune="everything", batch_size=8, **FAST)
    printed = capsys.readouterr().out  # the bundle's logging.conf prints it
    assert "batch_size 8 asks for 8 images per optimiser step, but the split has 4 training images" in printed


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"finetune": "everything"}, "everything"),
        ({"resume": True}, "Cannot resume: "),  # until 0.3.26 both folders were made, then left empty
    ],
    ids=["a setting its network refuses", "resume without a checkpoint"],
)
def test_a_refused_training_creates_no_folder(tmp_path, settings, expected):
    datalist = write_dataset(tmp_path / "data", count=6, size=96, seed=4)["vessels"]
    error = run_in_process("training", [TRAIN, QUICKSTART], datalist=str(datalist), ckpt_dir=str(tmp_path / "models"),
                           output_dir=str(tmp_path / "eval"), **{**FAST, **settings})
    assert expected in str(error)
    assert not (tmp_path / "models").exists() and not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("tracking_flush_timeout", "soon"),
        ("weight_decay", -1),
        ("loss_weights#bce", -1),
        ("seed", "abc"),
        ("checkpoint_interval", -1),
        ("max_training_minutes", -5),
        ("gradient_clip_norm", 0),
        ("window_overlap", 2),
    ],
)
def test_a_bad_training_setting_is_refused_before_the_earlier_run_is_moved(tmp_path, setting, value):
    """These failed after the earlier run's checkpoints were moved aside (a flush timeout after training, and then
    left its MLflow run RUNNING), or trained silently (a negative BCE weight reversed its term)."""
    datalist = write_dataset(tmp_path / "data", count=6, size=96, seed=4)["vessels"]
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    (ckpt / "latest_checkpoint.pt").write_text("the earlier run's checkpoint")
    error = run_in_process("training", [TRAIN, QUICKSTART], datalist=str(datalist), ckpt_dir=str(ckpt),
                           output_dir=str(tmp_path / "eval"), **{setting: value}, **FAST)
    assert f"Setting '{setting.split('#')[0]}' must be" in str(error), error
    assert sorted(path.name for path in ckpt.iterdir()) == ["latest_checkpoint.pt"]
    assert not (tmp_path / "eval").exists()

def test_overwrite_leaves_no_output_of_the_earlier_run_behind(tmp_path, capsys, monkeypatch):
    """A run with prompts and NIfTI labels, then one over it with neither: no NIfTI label and no prompt of the first
    is left to disagree with the second's masks, the user's own file is kept, and the report says what each wrote."""
    model = write_model_file(tmp_path / "model.pt")
    images, output = tmp_path / "images", tmp_path / "out"
    for name in ("a.png", "b.png"):
        photograph(images / name)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a.png": {"box": [5, 5, 40, 30]}}))
    infer(model, images, output, prompts_file=str(prompts), write_nifti=True)
    assert (output / "b_mask.nii.gz").is_file() and "write_nifti</th><td>True" in (output / "report.html").read_text()
    (output / "notes.txt").write_text("the user's")
    # The image folder is checked once, at start-up, and the same one segmented (MONAI keeps what it built).
    built, check = [], ImageFolder.__init__

    def counted(self: ImageFolder, *args, **kwargs) -> None:
        built.append(self)
        check(self, *args, **kwargs)

    monkeypatch.setattr(ImageFolder, "__init__", counted)
    capsys.readouterr()
    infer(model, images, output, overwrite=True)
    assert len(built) == 1
    assert "Removed 2 outputs of an earlier run" in capsys.readouterr().out  # the bundle's logging.conf prints it
    assert not list(output.glob("*.nii.gz")) and (output / "notes.txt").read_text() == "the user's"
    assert json.loads((output / "prompts_used.json").read_text()) == {"format": "sam2lora-prompts/1", "images": {}}
    report = (output / "report.html").read_text()
    for setting in ("<th>write_nifti</th><td>False", "<th>backend</th><td>torch", "<th>onnx_int8</th><td>False"):
        assert setting in report, setting
    # The first run's reports are kept aside, moved before the second wrote anything: stopped halfway, the second
    # would otherwise have left them beside masks they do not describe.
    [earlier] = (output / "earlier_reports").iterdir()
    assert sorted(path.name for path in earlier.iterdir()) == ["measurements.csv", "prompts_used.json", "report.html"]
    assert "write_nifti</th><td>True" in (earlier / "report.html").read_text()
    assert json.loads((earlier / "prompts_used.json").read_text())["images"]["a.png"]["given"]["box"] == [5, 5, 40, 30]


def test_an_inference_into_a_folder_another_inference_is_writing_is_refused(tmp_path):
    """Two inferences started into one folder (two thresholds tried at once) both ended well, with the masks of both
    and the reports of one: the second is refused before it writes or moves anything, and runs once the first ends."""
    model = write_model_file(tmp_path / "model.pt")
    images, output = tmp_path / "images", tmp_path / "out"
    photograph(images / "a.png")
    infer(model, images, output)
    # The lock aside, which names its holder.
    before = {path.name: path.read_bytes() for path in output.iterdir() if path.name != OUTPUT_LOCK}
    with held_by_another_process(output) as holder:
        error = run_in_process("inference", [INFER], ckpt_path=str(model), dataset_dir=str(images),
                               output_dir=str(output), overwrite=True, threshold=0.7)
    assert str(error).startswith(f"Output folder {output} is in use by another run still going (process {holder} on ")
    assert {path.name: path.read_bytes() for path in output.iterdir() if path.name != OUTPUT_LOCK} == before
    infer(model, images, output, overwrite=True, threshold=0.7)
    assert (output / "earlier_reports").is_dir() and not (output / "earlier_reports" / OUTPUT_LOCK).exists()


def test_a_runs_record_of_its_prompts_repeats_its_given_prompts(tmp_path):
    """prompts_used.json given back as --prompts_file, into the same folder: the image with a prompt of the file gets
    it again (the same mask), the one whose prompt the run drew itself (auto_box) is left to --prompt_source."""
    model = write_model_file(tmp_path / "model.pt")
    images, output = tmp_path / "images", tmp_path / "out"
    for name in ("a.png", "b.png"):
        photograph(images / name)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a.png": {"points": [[20, 30, 1]], "box": [5, 5, 40, 30]}}))
    infer(model, images, output, prompts_file=str(prompts), prompt_source="auto_box")
    first = json.loads((output / "prompts_used.json").read_text())["images"]
    assert set(first["b.png"]) == {"auto_box"}
    mask = (output / "a_mask.png").read_bytes()
    infer(model, images, output, prompts_file=str(output / "prompts_used.json"), overwrite=True)
    again = json.loads((output / "prompts_used.json").read_text())["images"]
    assert again == {"a.png": first["a.png"], "b.png": {"none": {"points": []}}}
    assert (output / "a_mask.png").read_bytes() == mask


def test_the_report_records_the_backend_and_whether_nifti_was_written(tmp_path):
    """An int8 onnxruntime report differs from a PyTorch one (evaluation records its backend too)."""
    parser = ConfigParser()
    parser.read_config([INFER])
    parser.update({"ckpt_path": str(write_model_file(tmp_path / "model.pt")), "backend": "onnxruntime",
                   "onnx_int8": True, "write_nifti": True})
    (index,) = [i for i, handler in enumerate(parser["handlers"]) if "InferenceReport" in str(handler)]
    settings = parser.get_parsed_content(f"handlers#{index}#settings")
    assert (settings["backend"], settings["onnx_int8"], settings["write_nifti"]) == ("onnxruntime", True, True)


def test_cli_reports_user_errors_in_one_line(tmp_path):
    result = run_bundle(
        "inference", [INFER], cwd=tmp_path, dataset_dir=tmp_path, ckpt_path=tmp_path / "none.pt",
        output_dir=tmp_path / "out",
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"error: Trained model {tmp_path / 'none.pt'} does not exist" in result.stderr


def test_large_files_name_metas_checkpoints():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "large_files.yml"))
    files = {item["path"]: item["url"] for item in parser.get()["large_files"]}
    for size in ("tiny", "small", "base_plus", "large"):
        name = f"sam2.1_hiera_{size}.pt"
        assert files[f"models/{name}"].endswith(f"/092824/{name}")
    # train.json looks for them where download_large_files puts them, whatever --ckpt_dir a run writes into.
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"bundle_root": "/opt/bundle", "ckpt_dir": "runs/a", "model_size": "small"})
    assert parser.get_parsed_content("base_checkpoint") == "/opt/bundle/models/sam2.1_hiera_small.pt"


def test_evaluation_scores_inside_the_files_own_field_of_view(drive_dir, tmp_path):
    """In ``resize`` mode the photograph and its FOV go to the network's size; the metrics and the measurements must
    read the FOV mask as the dataset distributes it, not one resized there and back (1500 pixels off on DRIVE)."""
    model = write_model_file(tmp_path / "model.pt", image_size=256)
    datalist = tmp_path / "datalist.json"
    prepare_dataset("DRIVE", drive_dir, datalist)
    parser = ConfigParser()
    parser.read_config([TRAIN, EVALUATE])
    parser.update({"ckpt_path": str(model), "datalist": str(datalist), "bundle_root": str(REPO / "bundle")})
    item = parser.get_parsed_content("validate#dataset")[0]
    assert item["image"].shape[1:] == (256, 256) and item["fov"].shape[1:] == (256, 256)
    item["pred"] = MetaTensor(torch.rand(1, 256, 256))
    item["pred"].applied_operations = copy.deepcopy(item["image"].applied_operations)
    out = parser.get_parsed_content("validate#postprocessing")(item)
    handlers = parser.get_parsed_content("validate#handlers")
    fov_keys = {h.fov_key for h in handlers if isinstance(h, (FundusMetricsWriter, MeasurementAgreement))}
    assert len(fov_keys) == 1, "both read one FOV"
    truth = np.asarray(Image.open(drive_dir / "test" / "mask" / "01_test_mask.gif")) > 0
    assert out["pred"].shape[1:] == truth.shape
    assert np.array_equal(np.asarray(out[fov_keys.pop()])[0] > 0.5, truth)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_photograph_gone_after_start_up_is_left_out_and_the_others_segmented(tmp_path, num_workers):
    """A photograph removed between the start-up check and its turn (a network share, a folder a sync tool fills)
    stopped the run there, the later ones unsegmented and no report written. Batch 2: its stand-in shares a batch."""
    model = write_model_file(tmp_path / "model.pt")
    source = write_dataset(tmp_path / "data", count=3, size=64)["vessels"].parent / "images"
    images = tmp_path / "images"
    shutil.copytree(source, images)
    names = sorted(path.stem for path in images.iterdir())
    output = tmp_path / "out"
    workflow = ConfigWorkflow(config_file=[INFER], meta_file=META, logging_file=LOGGING, workflow_type="infer",
                              run_id="inference", ckpt_path=str(model), dataset_dir=str(images),
                              output_dir=str(output), num_workers=num_workers, batch_size=2,
                              prompt_source="auto_box")
    workflow.initialize()
    gone = images / f"{names[0]}.png"
    gone.unlink()
    with pytest.raises(Exception) as caught:
        workflow.run()
    message = str(user_error(caught.value))
    assert message.startswith("1 image(s) could not be segmented (the others were):") and str(gone) in message
    assert not list(output.glob(f"{names[0]}_*")), "nothing is written for it"
    for name in names[1:]:
        assert {path.name for path in output.glob(f"{name}_*")} == {f"{name}_mask.png", f"{name}_prob.png",
                                                                    f"{name}_overlay.png"}
    with open(output / "measurements.csv", newline="") as table:
        assert [row["image"] for row in csv.DictReader(table)] == [f"{name}.png" for name in names[1:]]
    assert (output / "report.html").is_file()
    used = json.loads((output / "prompts_used.json").read_text())["images"]
    assert sorted(used) == [f"{name}.png" for name in names[1:]], "no prompt is recorded for what was not segmented"


def test_a_device_given_by_name_runs_on_the_command_line_and_from_python(tmp_path):
    """``--device cpu`` (a string, where the configs' default is a ``torch.device``) ended in a traceback from
    ``@device.type``: inference runs with it from the command line, and training's parts build with it from Python."""
    model = write_model_file(tmp_path / "model.pt")
    images, output = tmp_path / "images", tmp_path / "out"
    photograph(images / "a.png")
    result = run_bundle("inference", [INFER], cwd=tmp_path, ckpt_path=model, dataset_dir=images, output_dir=output,
                        device="cpu")
    assert result.returncode == 0, fail_message(result)
    assert (output / "a_mask.png").is_file()

    datalist = write_dataset(tmp_path / "data", count=3, size=64)["vessels"]
    workflow = ConfigWorkflow(
        config_file=[TRAIN, QUICKSTART], meta_file=META, logging_file=LOGGING, workflow_type="train", device="cpu",
        ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"), datalist=str(datalist), **FAST,
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.device == torch.device("cpu") and trainer.amp is False
    assert workflow.parser.get_parsed_content("validate#dataloader").pin_memory is False
    workflow.finalize()


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("gpu", "error: Setting 'device' must be 'cpu', 'cuda' or 'cuda:N' (N counting the GPUs torch sees from 0)"),
        ("cuda:1", "error: Setting 'device' is 'cuda:1', but torch sees no CUDA device: use 'cpu'."),
    ],
)
def test_a_device_torch_cannot_use_is_refused_in_one_line(tmp_path, device, expected):
    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this machine has a GPU")
    model = write_model_file(tmp_path / "model.pt")
    photograph(tmp_path / "images" / "a.png")
    result = run_bundle("inference", [INFER], cwd=tmp_path, ckpt_path=model, dataset_dir=tmp_path / "images",
                        output_dir=tmp_path / "out", device=device)
    assert result.returncode == 1 and "Traceback" not in result.stderr, fail_message(result)
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith(expected), line
    assert not (tmp_path / "out").exists(), "refused before the output folder is made"


def test_a_gpu_is_picked_by_name_among_those_torch_sees(monkeypatch):
    """On a two-GPU host ``--device cuda:1`` is the second GPU; ``cuda:2`` is refused naming the two there are."""
    from scripts.acceleration import usable_device
    from scripts.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert usable_device("cuda:1") == torch.device("cuda", 1)
    assert usable_device(torch.device("cuda")) == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"^Setting 'device' is 'cuda:2', but torch sees 2 CUDA device\(s\): cuda:0 to cuda:1\.$"):
        usable_device("cuda:2")


@pytest.mark.parametrize(
    "arguments",
    [{"workflow_type": "inference"}, {}, {"workflow_type": "inference", "net_override": {"channels_last": True}}],
    ids=["inference", "default workflow type", "net_override"],
)
def test_monai_bundle_load_gives_the_trained_network(tmp_path, monkeypatch, arguments):
    """``monai.bundle.load`` as docs/distribution.md shows it, on a bundle folder as downloaded (configs and a trained
    ``models/model.pt``), from another folder: the network the file records with its weights, as
    :func:`scripts.network.load_trained` reads them, in eval mode; no output folder, lock or error hook left."""
    from monai.bundle import load

    from scripts.network import load_trained

    bundle = tmp_path / "bundles" / "sam2lora_fundus"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    model = write_model_file(bundle / "models" / "model.pt", architecture="unet", channel_names=["disc", "cup"])
    monkeypatch.chdir(tmp_path)
    hook = sys.excepthook
    network = load(
        name="sam2lora_fundus", bundle_dir=str(tmp_path / "bundles"), device="cpu",
        workflow_name="scripts.bundle_load.TrainedNetworkWorkflow", copy_model_args={"exclude_vars": "_extra_state"},
        **arguments,
    )
    expected = load_trained(model)
    assert type(network) is type(expected) and network.settings["channel_names"] == ["disc", "cup"]
    assert not network.training
    state, expected_state = network.state_dict(), expected.state_dict()
    assert set(state) == set(expected_state)
    assert all(torch.equal(state[key], expected_state[key]) for key in state if not key.endswith("_extra_state"))
    assert network.channels_last == ("net_override" in arguments)
    assert sorted(path.name for path in bundle.iterdir()) == ["configs", "models"], "no output folder"
    assert sys.excepthook is hook

"""The bundle archive: packaged, served over HTTP, downloaded with monai.bundle and run away from this repository."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import zipfile
from collections.abc import Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.bundle import verify_net_in_out
from PIL import Image

from scripts.network import SAM2LoRA
from scripts.sam2_models import build_sam2_base
from scripts.synthetic import write_dataset
from tests.helpers import bundle_command, random_adapted_network
from tests.preloaded import preloaded_python
from tools.export import BUNDLE_NAME, ExportError, export_bundle, main

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
INFER = str(CONFIGS / "inference.json")
VERSION = json.loads((CONFIGS / "metadata.json").read_text())["version"]
IMAGE_SIZE = 64


def same_entry(first, second) -> bool:
    """Tensors bit for bit; the settings record (a dict) by value."""
    return torch.equal(first, second) if isinstance(first, torch.Tensor) else first == second


def trained_model(path: Path, base: Path | None, seed: int) -> Path:
    """A SAM2LoRA with non-zero adapters, saved as the training workflow saves model.pt."""
    torch.save(random_adapted_network(IMAGE_SIZE, seed=seed, checkpoint=base).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def models(module_folder) -> dict[str, Path]:
    """A Meta-format base checkpoint (seeded random weights: Meta's cannot be fetched offline), a model trained
    on it, and a model trained from random initialisation."""
    root = module_folder("models")
    torch.manual_seed(0)
    base = root / "base" / "sam2.1_hiera_tiny.pt"
    base.parent.mkdir()
    torch.save({"model": build_sam2_base("tiny", image_size=IMAGE_SIZE).state_dict()}, base)
    return {
        "base": base,
        "on_base": trained_model(root / "on_base.pt", base, seed=1),
        "random_init": trained_model(root / "random_init.pt", None, seed=2),
    }


@pytest.fixture(scope="module")
def images(module_folder) -> Path:
    folder = module_folder("images")
    write_dataset(folder / "synthetic", count=3, size=96, seed=3)
    target = folder / "in"
    target.mkdir()
    sources = sorted((folder / "synthetic" / "images").glob("*.png"))
    shutil.copy(sources[0], target / "square.png")
    Image.open(sources[1]).resize((110, 80)).save(target / "wide.jpg")  # another format, another size
    return target


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_and_download(archive: Path, bundle_dir: Path) -> Path:
    """Serve ``archive`` from 127.0.0.1 and fetch it with ``python -m monai.bundle download --url``."""
    handler = functools.partial(QuietHandler, directory=str(archive.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
        command = ["-m", "monai.bundle", "download", "--name", BUNDLE_NAME, "--url", url, "--bundle_dir", bundle_dir]
        # Fetching needs no isolation (what runs afterwards does): the preloaded interpreter saves importing MONAI.
        result = preloaded_python().run(command, cwd=bundle_dir.parent, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    return bundle_dir / BUNDLE_NAME


def isolated_python(arguments: list, cwd: Path, path: Sequence[Path] = ()) -> subprocess.CompletedProcess:
    """Python with the venv's packages but nothing of this repository: ``-S`` skips the site .pth files, among
    them the editable install's import hook for ``scripts``; PYTHONPATH names site-packages and ``path`` alone."""
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "PYTHONPATH": os.pathsep.join([*map(str, path), sysconfig.get_paths()["purelib"]]),
        # The thread count the repository's runs get (tests/conftest.py): float sums in the same order, same masks.
        **{key: os.environ[key] for key in ("OMP_NUM_THREADS",) if key in os.environ},
    }
    command = [sys.executable, "-S", *map(str, arguments)]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600, check=False)


def repository_inference(images: Path, output: Path, ckpt: Path, **overrides) -> None:
    arguments = bundle_command(
        "inference", [INFER], launcher=(), dataset_dir=images, output_dir=output, ckpt_path=ckpt, **overrides
    )
    result = preloaded_python().run(arguments, cwd=output.parent, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def downloaded_inference(bundle: Path, images: Path, output: Path, elsewhere: Path | None = None) -> str:
    """Inference as a user runs it from the downloaded bundle's folder (MONAI's convention for `scripts`), or from
    the folder ``elsewhere`` as distribution.md says: the bundle on PYTHONPATH and as ``--bundle_root``."""
    command = ["-m", "monai.bundle", "run", "inference", "--meta_file", bundle / "configs/metadata.json"]
    command += ["--config_file", bundle / "configs/inference.json", "--logging_file", bundle / "configs/logging.conf"]
    command += ["--dataset_dir", images, "--output_dir", output]
    if elsewhere is None:
        result = isolated_python(command, cwd=bundle)
    else:
        result = isolated_python([*command, "--bundle_root", bundle], cwd=elsewhere, path=[bundle])
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def assert_same_masks(first: Path, second: Path, images: Path) -> None:
    stems = sorted(path.stem for path in images.iterdir())
    for stem in stems:
        for kind in ("mask", "prob"):
            a = np.asarray(Image.open(first / f"{stem}_{kind}.png"))
            b = np.asarray(Image.open(second / f"{stem}_{kind}.png"))
            np.testing.assert_array_equal(a, b, err_msg=f"{stem}_{kind}")
        probability = np.asarray(Image.open(first / f"{stem}_prob.png"))
        assert probability.min() < probability.max(), "a constant map would make the comparison vacuous"


def test_repository_scripts_are_not_importable_in_the_isolated_process(tmp_path):
    result = isolated_python(["-c", "import scripts"], cwd=tmp_path)
    assert result.returncode != 0 and "No module named 'scripts'" in result.stderr


def test_adapters_archive_downloaded_over_http_reproduces_the_repository(models, images, tmp_path):
    result = export_bundle(
        tmp_path / "dist",
        models["on_base"],
        base_checkpoint=models["base"],
    )
    assert result.weights == "adapters" and result.reason == ""
    assert result.archive.name == f"{BUNDLE_NAME}_{VERSION}.zip"
    with zipfile.ZipFile(result.archive) as archive:
        names = archive.namelist()
    assert {name.split("/")[0] for name in names} == {BUNDLE_NAME}, "one top-level bundle folder"
    for required in (
        "configs/inference.json",
        "configs/metadata.json",
        "scripts/network.py",
        "LICENSE",
        "large_files.yml",
        "docs/data_license.txt",
        "docs/weights.md",
        "models/adapters.pt",
    ):
        assert f"{BUNDLE_NAME}/{required}" in names, required
    assert f"{BUNDLE_NAME}/models/model.pt" not in names
    assert result.archive.stat().st_size < models["on_base"].stat().st_size / 10, "adapters are a small fraction"

    bundle = serve_and_download(result.archive, tmp_path / "downloaded")
    large_files = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert [Path(entry["path"]).name for entry in large_files] == ["sam2.1_hiera_tiny.pt"]
    assert large_files[0]["hash_val"] == hashlib.sha256(models["base"].read_bytes()).hexdigest()
    # What download_large_files does with Meta's file (no internet here): put the base where the config expects it.
    shutil.copy(models["base"], bundle / "models" / "sam2.1_hiera_tiny.pt")

    from_download = tmp_path / "from_download"
    log = downloaded_inference(bundle, images, from_download)
    assert "fine-tuned tensors from models/adapters.pt" in log
    from_repository = tmp_path / "from_repository"
    from_repository.mkdir()
    repository_inference(images, from_repository, models["on_base"])
    assert_same_masks(from_repository, from_download, images)
    elsewhere = tmp_path / "pipeline"
    elsewhere.mkdir()
    downloaded_inference(bundle, images, tmp_path / "from_elsewhere", elsewhere=elsewhere)
    assert_same_masks(from_repository, tmp_path / "from_elsewhere", images)

    # Evaluation from the archive builds the same network (its evaluate.json pointed at models/model.pt until 0.3.19).
    command = ["-m", "monai.bundle", "run", "evaluating", "--meta_file", "configs/metadata.json"]
    command += ["--config_file", "['configs/train.json','configs/evaluate.json']"]
    command += ["--logging_file", "configs/logging.conf"]
    command += ["--datalist", images.parent / "synthetic" / "datalist.json", "--output_dir", tmp_path / "evaluated"]
    evaluated = isolated_python(command, cwd=bundle)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "fine-tuned tensors from models/adapters.pt" in evaluated.stdout + evaluated.stderr
    summary = json.loads((tmp_path / "evaluated" / "metrics_summary.json").read_text())
    assert Path(summary["metadata"]["checkpoint"]) == Path("models/adapters.pt")


def test_random_init_model_ships_full_weights_and_says_why(models, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="tools.export"):
        result = export_bundle(tmp_path / "dist", models["random_init"])
    assert result.weights == "full" and "random initialisation" in result.reason
    assert "random initialisation" in caplog.text
    with zipfile.ZipFile(result.archive) as archive:
        assert f"{BUNDLE_NAME}/models/adapters.pt" not in archive.namelist()
        assert "random initialisation" in archive.read(f"{BUNDLE_NAME}/docs/weights.md").decode()
        inference = json.loads(archive.read(f"{BUNDLE_NAME}/configs/inference.json"))
        large_files = yaml.safe_load(archive.read(f"{BUNDLE_NAME}/large_files.yml"))
        state = torch.load(archive.open(f"{BUNDLE_NAME}/models/model.pt"), weights_only=True)
    trained = torch.load(models["random_init"], weights_only=True)
    assert state.keys() == trained.keys() and all(same_entry(state[key], trained[key]) for key in trained)
    assert inference["ckpt_path"].endswith("/model.pt'")
    assert large_files == {"large_files": []}, "full weights need no base checkpoint"


def test_the_archive_describes_the_exported_model(tmp_path):
    """The bundle's metadata.json describes its default one-channel vessel model and its own figures: a disc/cup
    archive's describes two channels, its model and the figures of its own evaluation, and MONAI's verify_net_in_out,
    run on the unpacked archive with MONAI's default sizes, agrees."""
    model = tmp_path / "disc_cup.pt"
    torch.save(random_adapted_network(IMAGE_SIZE, seed=4, channel_names=["disc", "cup"]).state_dict(), model)
    summary = {"summary": {"datasets": {"REFUGE2": {"metrics": {
        "disc/fov/dice": {"mean": 0.912345, "std": 0.02, "n": 9, "nan": 0},
        "disc/fov/hd95": {"mean": 7.0, "std": 1.0, "n": 9, "nan": 0},
        "cup/fov/auc": {"mean": None, "std": None, "n": 0, "nan": 9},
        "cup/image/dice": {"mean": 0.8, "std": 0.1, "n": 9, "nan": 0}}}}}, "metadata": {"split": "test",
                                                                                    "checkpoint": str(model)}}
    (tmp_path / "metrics_summary.json").write_text(json.dumps(summary))
    result = export_bundle(tmp_path / "dist", model, weights="full", evaluation=tmp_path / "metrics_summary.json")
    with zipfile.ZipFile(result.archive) as archive:
        archive.extractall(tmp_path / "unpacked")
    root = tmp_path / "unpacked" / BUNDLE_NAME
    metadata = json.loads((root / "configs" / "metadata.json").read_text())
    prediction = metadata["network_data_format"]["outputs"]["pred"]
    assert (prediction["num_channels"], prediction["channel_def"]) == (2, {"0": "disc logit", "1": "cup logit"})
    assert metadata["eval_metrics"] == {"REFUGE2_test_disc_fov_dice": 0.9123}, "the model's own, not the bundle's"
    assert "fetched with download_large_files" not in metadata["description"], "full weights fetch nothing"
    assert metadata["description"].endswith(
        f"This archive's model: the sam head on Hiera-tiny, {IMAGE_SIZE} px, channels disc, cup, fine-tuned (lora) "
        "from random initialisation; it ships the full weights as trained; nothing is fetched (docs/weights.md)."
    )
    other = tmp_path / "other.pt"
    torch.save(random_adapted_network(IMAGE_SIZE, seed=5, channel_names=["disc", "cup"]).state_dict(), other)
    summary["metadata"]["checkpoint"] = str(other)
    (tmp_path / "other_summary.json").write_text(json.dumps(summary))
    with pytest.raises(ExportError, match=f"is of model {other}, whose content differs from the exported {model}"):
        export_bundle(tmp_path / "dist2", model, weights="full", evaluation=tmp_path / "other_summary.json")
    (tmp_path / "not_a_summary.json").write_text("{}")
    with pytest.raises(ExportError, match="not_a_summary.json cannot be read .no 'metadata'.: give the "
                       "metrics_summary.json that `run evaluating` wrote"):
        export_bundle(tmp_path / "dist2", model, weights="full", evaluation=tmp_path / "not_a_summary.json")
    summary["metadata"]["checkpoint"] = str(model)
    summary["summary"]["datasets"]["REFUGE2"]["metrics"]["dice"] = {"mean": 0.9}
    (tmp_path / "odd_summary.json").write_text(json.dumps(summary))
    with pytest.raises(ExportError, match="odd_summary.json cannot be read .metric 'dice' of REFUGE2 is not named "
                       "<channel>/<region>/<metric>.: give the"):
        export_bundle(tmp_path / "dist2", model, weights="full", evaluation=tmp_path / "odd_summary.json")
    summary["summary"]["datasets"]["REFUGE2"]["metrics"] = {"disc/fov/dice": 0.9}
    (tmp_path / "odd_summary.json").write_text(json.dumps(summary))
    with pytest.raises(ExportError, match="odd_summary.json cannot be read"):
        export_bundle(tmp_path / "dist2", model, weights="full", evaluation=tmp_path / "odd_summary.json")
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(root / "configs" / "metadata.json"),
        config_file=str(root / "configs" / "inference.json"),
        device="cpu",
        bundle_root=str(root),
    )


def test_adapters_trained_on_another_base_fall_back_to_full_weights(models, tmp_path):
    other_base = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.manual_seed(5)
    torch.save({"model": build_sam2_base("tiny", image_size=IMAGE_SIZE).state_dict()}, other_base)
    result = export_bundle(
        tmp_path / "dist",
        models["on_base"],
        base_checkpoint=other_base,
    )
    assert result.weights == "full"
    assert str(other_base) in result.reason and "differ" in result.reason
    with zipfile.ZipFile(result.archive) as archive:
        state = torch.load(archive.open(f"{BUNDLE_NAME}/models/model.pt"), weights_only=True)
    trained = torch.load(models["on_base"], weights_only=True)
    assert all(same_entry(state[key], trained[key]) for key in trained)


def test_merged_weights_compute_what_the_adapters_compute(models, tmp_path):
    result = export_bundle(
        tmp_path / "dist",
        models["on_base"],
        weights="merged",
    )
    assert result.weights == "merged"
    with zipfile.ZipFile(result.archive) as archive:
        merged_state = torch.load(archive.open(f"{BUNDLE_NAME}/models/model.pt"), weights_only=True)
    assert merged_state["_extra_state"]["image_size"] == IMAGE_SIZE
    merged = SAM2LoRA("tiny", image_size=IMAGE_SIZE, random_init=True).eval()
    merged.load_state_dict(merged_state)
    adapted = [layer for layer in merged.sam2.modules() if hasattr(layer, "lora_merged")]
    assert adapted and all(layer.merged for layer in adapted)
    unmerged = SAM2LoRA("tiny", image_size=IMAGE_SIZE, random_init=True).eval()
    unmerged.load_state_dict(torch.load(models["on_base"], weights_only=True))
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(images), unmerged(images), atol=1e-4, rtol=1e-4)


def test_a_model_saved_with_merged_adapters_ships_them_merged_and_says_why(models, tmp_path, caplog):
    """Adapters asked for (the default) of a model.pt saved merged: they cannot be split from the base again."""
    network = SAM2LoRA("tiny", image_size=IMAGE_SIZE, weights_follow=True)
    network.load_state_dict(torch.load(models["on_base"], weights_only=True))
    network.merge_adapters()
    merged = tmp_path / "merged.pt"
    torch.save(network.state_dict(), merged)
    with caplog.at_level("WARNING", logger="tools.export"):
        result = export_bundle(tmp_path / "dist", merged, base_checkpoint=models["base"])
    assert result.weights == "merged" and "merged into the base weights" in result.reason
    assert "Exporting merged weights instead of adapters" in caplog.text
    with zipfile.ZipFile(result.archive) as archive:
        assert f"{BUNDLE_NAME}/models/adapters.pt" not in archive.namelist()
        assert "merged into the base weights" in archive.read(f"{BUNDLE_NAME}/docs/weights.md").decode()
        state = torch.load(archive.open(f"{BUNDLE_NAME}/models/model.pt"), weights_only=True)
    saved = torch.load(merged, weights_only=True)
    assert state.keys() == saved.keys() and all(same_entry(state[key], saved[key]) for key in saved)


def test_adapters_without_the_base_checkpoint_say_how_to_get_it(models, tmp_path):
    missing = tmp_path / "nowhere" / "sam2.1_hiera_tiny.pt"
    with pytest.raises(ExportError, match="download_large_files") as caught:
        export_bundle(
            tmp_path / "dist",
            models["on_base"],
            base_checkpoint=missing,
        )
    assert str(missing) in str(caught.value)
    assert not (tmp_path / "dist").exists(), "the output folder made for the archive is removed with it"


def test_an_adapters_archive_is_exported_again_from_its_adapter_file_on_the_base_given(models, tmp_path):
    """--base_checkpoint was used for the reproduction check only: re-exporting a downloaded adapters archive
    (merged, say) was refused with advice to pass that very option (found by a review)."""
    first = export_bundle(tmp_path / "first", models["on_base"], base_checkpoint=models["base"])
    with zipfile.ZipFile(first.archive) as archive:
        archive.extract(f"{BUNDLE_NAME}/models/adapters.pt", tmp_path / "downloaded")
    adapters = tmp_path / "downloaded" / BUNDLE_NAME / "models" / "adapters.pt"
    for weights in ("adapters", "merged"):
        again = export_bundle(tmp_path / weights, adapters, weights=weights, base_checkpoint=models["base"])
        assert (again.weights, again.reason) == (weights, "")
    with zipfile.ZipFile(first.archive) as one, zipfile.ZipFile(tmp_path / "adapters" / first.archive.name) as other:
        name = f"{BUNDLE_NAME}/models/adapters.pt"
        saved, resaved = (torch.load(archive.open(name), weights_only=True)["state_dict"] for archive in (one, other))
    assert saved.keys() == resaved.keys() and all(torch.equal(saved[key], resaved[key]) for key in saved)


def test_an_output_inside_a_folder_the_archive_packs_is_refused(models, tmp_path):
    """Staged inside bundle/configs (or docs), the archive's folder was copied into itself until the path grew too
    long: a traceback (found by a review)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "data", "eval"))
    before = sorted(path.relative_to(bundle) for path in bundle.rglob("*"))
    for inside in (bundle / "configs", bundle / "docs" / "dist", bundle / "configs" / ".." / "docs"):
        with pytest.raises(ExportError, match=r"lies inside .*, which the archive packs: choose a folder outside it"):
            export_bundle(inside, models["random_init"], bundle_dir=bundle)
    assert sorted(path.relative_to(bundle) for path in bundle.rglob("*")) == before, "nothing made or left"
    assert export_bundle(bundle / "dist", models["random_init"], bundle_dir=bundle).archive.is_file()


def test_version_must_have_a_changelog_entry(models, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "data", "eval"))
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    metadata["version"] = "9.9.9"
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ExportError, match="9.9.9 has no entry in 'changelog'"):
        export_bundle(tmp_path / "dist", models["random_init"], bundle_dir=bundle)


def test_model_that_does_not_fit_its_own_record_or_has_none(models, tmp_path):
    state = torch.load(models["random_init"], weights_only=True)
    state["_extra_state"]["lora_rank"] = 8  # the tensors have rank 32
    lying = tmp_path / "lying.pt"
    torch.save(state, lying)
    with pytest.raises(ExportError, match=f"{lying} does not fit the settings it records"):
        export_bundle(tmp_path / "dist", lying)
    del state["_extra_state"]
    silent = tmp_path / "silent.pt"
    torch.save(state, silent)
    with pytest.raises(ExportError, match=f"{silent} records no network settings"):
        export_bundle(tmp_path / "dist", silent)
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def test_cli_reports_a_missing_model_in_one_line(tmp_path):
    missing = tmp_path / "model.pt"
    result = preloaded_python().run(
        ["-m", "tools.export", "--output", tmp_path, "--ckpt_path", missing], cwd=REPO, timeout=300
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"error: Trained model {missing} does not exist." in result.stderr


@pytest.mark.parametrize(
    "summary",
    [{}, {"metadata": {"split": "test", "checkpoint": "other.pt"}, "summary": {"datasets": {}}}],
    ids=["not a summary", "a summary of another model"],
)
def test_a_missing_model_is_named_before_the_evaluation_given_with_it(summary, tmp_path, capsys, monkeypatch):
    """The evaluation summary was read first: a bad one hid the missing model, and one naming a model file that
    exists was checked against the missing model's content, a FileNotFoundError traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other.pt").write_bytes(b"the evaluated model")
    (tmp_path / "metrics_summary.json").write_text(json.dumps(summary))
    missing = tmp_path / "model.pt"
    arguments = ["--output", str(tmp_path / "dist"), "--ckpt_path", str(missing), "--evaluation", "metrics_summary.json"]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: Trained model {missing} does not exist.") and error.count("\n") == 1, error
    assert not (tmp_path / "dist").exists()


def test_cli_writes_the_archive(models, tmp_path, capsys):
    status = main(
        [
            "--output",
            str(tmp_path),
            "--ckpt_path",
            str(models["random_init"]),
            "--weights",
            "full",
        ]
    )
    assert status == 0
    archive = tmp_path / f"{BUNDLE_NAME}_{VERSION}.zip"
    assert capsys.readouterr().out.strip() == str(archive)
    with zipfile.ZipFile(archive) as content:
        assert f"{BUNDLE_NAME}/models/model.pt" in content.namelist()

    # Run again, the archive is refused and kept as it was; --overwrite replaces it.
    written = archive.read_bytes()
    arguments = ["--output", str(tmp_path), "--ckpt_path", str(models["random_init"]), "--weights", "full"]
    assert main(arguments) == 1
    assert f"error: {archive} exists: choose another --output, or pass --overwrite to replace it." in (
        capsys.readouterr().err
    )
    assert archive.read_bytes() == written
    assert main([*arguments, "--overwrite"]) == 0
    with zipfile.ZipFile(archive) as content:
        assert f"{BUNDLE_NAME}/models/model.pt" in content.namelist()

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from scipy import ndimage

from scripts.fundus_io import read_image, read_mask
from scripts.inputs import InputError, load_split
from scripts.synthetic import MASK_FOLDERS, main, render_fundus, split_indices, write_dataset

SPLITS = ("training", "validation", "test")


@pytest.fixture(scope="module")
def dataset(module_folder) -> Path:
    output = module_folder("synthetic") / "data"
    write_dataset(output, count=5, seed=3, size=256)
    return output


@pytest.fixture(scope="module")
def samples() -> list:
    return [render_fundus(size=512, seed=11, index=index) for index in range(3)]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_same_seed_same_bytes_and_images_independent_of_count(tmp_path: Path, dataset: Path) -> None:
    write_dataset(tmp_path / "again", count=5, seed=3, size=256)
    assert _files(tmp_path / "again") == _files(dataset)
    write_dataset(tmp_path / "fewer", count=3, seed=3, size=256)
    fewer = _files(tmp_path / "fewer")
    for name, content in fewer.items():
        if not name.startswith("datalist"):
            assert _files(dataset)[name] == content, name


def test_seed_changes_pictures() -> None:
    first, second = render_fundus(size=128, seed=0, index=0), render_fundus(size=128, seed=1, index=0)
    assert not np.array_equal(first.image, second.image)
    assert not np.array_equal(render_fundus(size=128, seed=0, index=1).vessels, first.vessels)


def test_layout_and_mask_values(dataset: Path) -> None:
    stems = sorted(path.stem for path in (dataset / "images").glob("*.png"))
    assert len(stems) == 5
    for folder in MASK_FOLDERS:
        assert sorted(path.stem for path in (dataset / folder).glob("*.png")) == stems
    image = read_image(dataset / "images" / f"{stems[0]}.png")
    assert image.shape == (256, 256, 3)
    for folder in MASK_FOLDERS:
        mask = read_mask(dataset / folder / f"{stems[0]}.png")
        assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 255}
    assert not [path for path in dataset.rglob("*") if path.name.startswith(".")]  # no temporary files left


def test_masks_are_anatomically_consistent(samples: list) -> None:
    for sample in samples:
        assert not (sample.vessels & ~sample.fov).any()
        assert not (sample.cup & ~sample.disc).any() and sample.cup.sum() > 0.05 * sample.disc.sum()
        assert not (sample.disc & ~sample.fov).any()
        fraction = sample.vessels[sample.fov].mean()
        assert 0.08 <= fraction <= 0.15, fraction  # DRIVE's manual annotations: 8.7% to 16.8% of the FOV
        fov_fraction = sample.fov.mean()
        assert 0.55 < fov_fraction < 0.75  # a circle nearly touching the frame


def test_vessels_range_from_thick_to_one_pixel(samples: list) -> None:
    for sample in samples:
        depth = ndimage.distance_transform_edt(sample.vessels)
        skeleton_depths = depth[sample.vessels & (depth >= ndimage.maximum_filter(depth, size=3))]
        assert np.quantile(skeleton_depths, 0.25) <= 1.0  # many vessels about one or two pixels wide
        assert skeleton_depths.max() >= 3.0  # trunks at least five pixels wide


def test_looks_like_a_fundus_photo(samples: list) -> None:
    for sample in samples:
        image = sample.image.astype(np.float32) / 255.0
        retina = image[sample.fov & ~sample.vessels & ~sample.disc]
        red, green, blue = retina.mean(axis=0)
        assert red > green > blue and red > 0.45 and blue < 0.35  # orange-red
        assert image[~sample.fov].max(axis=-1).mean() < 0.06  # black surround
        disc_green = image[..., 1][sample.disc & ~sample.vessels].mean()
        assert disc_green > green + 0.15  # pale yellow disc
        # Vessels are darker than the retina right beside them, in every picture.
        beside = ndimage.binary_dilation(sample.vessels, iterations=3) & ~sample.vessels & sample.fov & ~sample.disc
        assert image[..., 1][sample.vessels & ~sample.disc].mean() < image[..., 1][beside].mean() - 0.02


def test_global_threshold_fails(samples: list) -> None:
    """The best single threshold of the green channel (chosen knowing the answer) segments vessels poorly."""
    for sample in samples:
        green = sample.image[..., 1][sample.fov].astype(np.float32)
        truth = sample.vessels[sample.fov]
        dice = [
            2 * (truth & (green < threshold)).sum() / (truth.sum() + (green < threshold).sum())
            for threshold in np.quantile(green, np.linspace(0.01, 0.5, 50))
        ]
        assert max(dice) < 0.5


def test_datalists_load_with_monai_and_survive_moving(dataset: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)
    seen = []
    for split in SPLITS:
        vessels = load_decathlon_datalist(moved / "datalist.json", data_list_key=split)
        disc_cup = load_decathlon_datalist(moved / "datalist_disc_cup.json", data_list_key=split)
        assert len(vessels) >= 1 and len(vessels) == len(disc_cup)
        for vessel_item, disc_cup_item in zip(vessels, disc_cup):
            assert Path(vessel_item["image"]).is_file() and str(moved) in vessel_item["image"]
            assert Path(vessel_item["label"]).parent.name == "vessels" and Path(vessel_item["label"]).is_file()
            assert Path(vessel_item["fov"]).is_file() and vessel_item["dataset"] == "synthetic"
            disc, cup = disc_cup_item["label"]
            assert Path(disc).parent.name == "disc" and Path(cup).parent.name == "cup"
            assert Path(disc).stem == Path(cup).stem == Path(vessel_item["image"]).stem
            seen.append(Path(vessel_item["image"]).stem)
    assert sorted(seen) == sorted(path.stem for path in (moved / "images").glob("*.png"))  # disjoint and complete
    content = json.loads((moved / "datalist.json").read_text())
    assert content["split"]["seed"] == 3 and "permutation" in content["split"]["method"]


def test_the_disc_cup_datalist_records_its_label_order_so_swapped_channels_are_refused(dataset: Path) -> None:
    disc_cup = dataset / "datalist_disc_cup.json"
    assert json.loads(disc_cup.read_text())["structures"] == ["disc", "cup"]
    assert len(load_split(disc_cup, "training", ["disc", "cup"])) >= 1
    with pytest.raises(InputError, match=r"channel 0 'cup' is the cup, the masks there the disc"):
        load_split(disc_cup, "training", ["cup", "disc"])


@pytest.mark.parametrize("count", [3, 4, 5, 10, 37])
def test_split_sizes(count: int) -> None:
    splits = split_indices(count, seed=0)
    assert all(len(splits[name]) >= 1 for name in SPLITS)
    assert sorted(index for part in splits.values() for index in part) == list(range(count))
    if count >= 10:
        assert abs(len(splits["training"]) - 0.6 * count) <= 1
    assert split_indices(count, seed=0) == splits
    if count >= 10:
        assert split_indices(count, seed=1) != splits


def test_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        write_dataset(tmp_path / "small", count=2)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="not a folder"):
        write_dataset(blocker, count=3)
    with pytest.raises(ValueError, match="cannot create"):
        write_dataset(blocker / "below", count=3)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--output", str(tmp_path / "cli"), "--count", "3", "--seed", "5", "--size", "128"]) == 0
    assert len(list((tmp_path / "cli" / "images").glob("*.png"))) == 3
    assert read_image(tmp_path / "cli" / "images" / "synthetic_0000.png").shape == (128, 128, 3)
    with pytest.raises(SystemExit) as exit_info:
        main(["--output", str(tmp_path / "cli2"), "--count", "1"])
    assert exit_info.value.code == 2
    assert "at least 3" in capsys.readouterr().err


def test_a_bad_size_is_refused_before_an_existing_dataset_is_touched(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    write_dataset(folder, count=3, size=64)
    before = _files(folder)
    with pytest.raises(ValueError, match="size must be at least 64"):
        write_dataset(folder, count=3, size=32)
    assert _files(folder) == before, "the datalists are still there"


def test_command_line_reports_an_unwritable_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocked = tmp_path / "data" / "images" / "synthetic_0000.png"
    blocked.mkdir(parents=True)  # a folder where the first picture should go
    assert main(["--output", str(tmp_path / "data"), "--count", "3", "--size", "64"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: Cannot write {blocked}") and error.count("\n") == 1, error


def test_ensure_dataset_renders_once_and_reuses(tmp_path):
    from scripts.synthetic import ensure_dataset

    first = ensure_dataset(tmp_path / "data", count=3, seed=4, size=64)
    image = tmp_path / "data" / "images" / "synthetic_0000.png"
    stamp = image.stat().st_mtime_ns
    assert ensure_dataset(tmp_path / "data", count=3, seed=4, size=64) == first
    assert image.stat().st_mtime_ns == stamp, "an existing dataset with the same settings is reused"
    ensure_dataset(tmp_path / "data", count=4, seed=4, size=64)
    listed = json.loads(Path(first["vessels"]).read_text())
    assert sum(len(listed[split]) for split in ("training", "validation", "test")) == 4


def test_a_dataset_killed_while_rendering_over_another_is_not_reused(tmp_path, monkeypatch):
    """Rendering over an earlier dataset removes its datalists first: killed half-way, the folder holds pictures of
    both, and the earlier settings must not find it complete."""
    from scripts import synthetic

    folder = tmp_path / "data"
    synthetic.ensure_dataset(folder, count=3, seed=4, size=64)
    rendered = []

    def killed_after_one(size, seed, index):
        if rendered:
            raise KeyboardInterrupt  # the kill, after the first picture of the new seed
        rendered.append(index)
        return real_render(size=size, seed=seed, index=index)

    real_render = synthetic.render_fundus
    monkeypatch.setattr(synthetic, "render_fundus", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_dataset(folder, count=3, seed=5, size=64)
    monkeypatch.setattr(synthetic, "render_fundus", real_render)
    image = folder / "images" / "synthetic_0000.png"
    stamp = image.stat().st_mtime_ns
    synthetic.ensure_dataset(folder, count=3, seed=4, size=64)
    assert image.stat().st_mtime_ns != stamp, "rendered again, not reused"
    fresh = synthetic.write_dataset(tmp_path / "fresh", count=3, seed=4, size=64)
    assert image.read_bytes() == (Path(fresh["vessels"]).parent / "images" / "synthetic_0000.png").read_bytes()


def test_an_untrained_network_fails_on_it(tmp_path):
    """The embedded default must be a task to learn: SAM2-LoRA before training finds no vessels in it."""
    import torch

    from scripts.network import SAM2LoRA
    from scripts.transforms import SAM_PIXEL_MEAN, SAM_PIXEL_STD

    torch.manual_seed(0)
    network = SAM2LoRA("tiny", random_init=True, image_size=128).eval()
    mean, std = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1), torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    for index in range(3):
        sample = render_fundus(size=128, seed=3, index=index)
        image = (torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255 - mean) / std
        with torch.no_grad():
            predicted = (network(image[None])[0, 0] > 0).numpy()
        truth = sample.vessels > 0
        dice = 2 * (predicted & truth).sum() / max(predicted.sum() + truth.sum(), 1)
        calling_everything_vessel = 2 * truth.mean() / (1 + truth.mean())
        assert dice < calling_everything_vessel + 0.02, "the untrained network does better than chance"

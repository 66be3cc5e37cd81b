from __future__ import annotations

import colorsys
import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Compose, Invertd
from PIL import Image
from scipy import ndimage
from torch.utils.data import default_collate

from scripts.fundus_io import FundusImageError
from scripts.transforms import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    LoadFundusd,
    RandHueShiftd,
    SamNormalized,
    SamplePromptsd,
    network_size,
    training_augmentations,
)

KEYS = ["image", "label", "fov"]


def _dice(first: torch.Tensor, second: torch.Tensor) -> float:
    first, second = first > 0.5, second > 0.5
    return float(2 * (first & second).sum() / (first.sum() + second.sum()))


def _drive_item(drive_dir: Path, number: int = 21) -> dict:
    training = drive_dir / "training"
    return {
        "image": str(training / "images" / f"{number}_training.tif"),
        "label": str(training / "1st_manual" / f"{number}_manual1.gif"),
        "fov": str(training / "mask" / f"{number}_training_mask.gif"),
    }


@pytest.fixture
def tiny(tmp_path: Path) -> dict:
    """A 5-row, 9-column picture with one marked pixel (row 1, column 6) and masks in assorted formats."""
    image = np.full((5, 9, 3), 40, np.uint8)
    image[1, 6] = (250, 10, 120)
    Image.fromarray(image).save(tmp_path / "image.tif")
    disc = np.zeros((5, 9), np.uint8)
    disc[1:4, 4:8] = 255
    cup = np.zeros((5, 9), np.uint8)
    cup[1, 6] = 1  # a 0/1 mask
    Image.fromarray(disc).save(tmp_path / "disc.gif")
    Image.fromarray(cup).save(tmp_path / "cup.png")
    Image.fromarray(np.full((5, 9), 255, np.uint8)).save(tmp_path / "fov.bmp")
    return {
        "image": str(tmp_path / "image.tif"),
        "label": [str(tmp_path / "disc.gif"), str(tmp_path / "cup.png")],
        "fov": str(tmp_path / "fov.bmp"),
        "dataset": "tiny",
    }


def test_load_shapes_orientation_and_metadata(tiny: dict) -> None:
    item = LoadFundusd()(tiny)
    image, label, fov = item["image"], item["label"], item["fov"]
    assert isinstance(image, MetaTensor) and image.shape == (3, 5, 9) and image.dtype == torch.float32
    torch.testing.assert_close(image[:, 1, 6], torch.tensor([250, 10, 120]) / 255.0)
    assert float(image[0, 0, 0]) == pytest.approx(40 / 255) and float(image[0, 1, 5]) == pytest.approx(40 / 255)
    assert label.shape == (2, 5, 9) and set(torch.unique(label).tolist()) == {0.0, 1.0}
    assert label[0].sum() == 12 and label[0, 2, 5] == 1  # disc, channel 0
    assert label[1].sum() == 1 and label[1, 1, 6] == 1  # cup, channel 1, read from a 0/1 mask
    assert fov.shape == (1, 5, 9) and bool(fov.all())
    assert image.meta["filename_or_obj"] == tiny["image"]
    assert tuple(image.meta["spatial_shape"]) == (5, 9)
    assert label.meta["filename_or_obj"] == tiny["label"][0]
    assert item["dataset"] == "tiny"
    # Paths as pathlib objects, one or a list, read the same.
    as_paths = LoadFundusd()({**tiny, "label": Path(tiny["label"][0]), "fov": Path(tiny["fov"])})
    assert torch.equal(as_paths["label"], label[:1]) and as_paths["label"].meta["filename_or_obj"] == tiny["label"][0]
    assert torch.equal(LoadFundusd()({**tiny, "label": [Path(p) for p in tiny["label"]]})["label"], label)
    with pytest.raises(FundusImageError, match=f"the label of {tiny['image']} names no mask file"):
        LoadFundusd()({**tiny, "label": []})


def test_load_assorted_formats(tmp_path: Path) -> None:
    rgba = np.zeros((6, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((6, 4), 30000, np.uint16)).save(tmp_path / "gray16.png")
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 4, 3), 90, np.uint8)).save(buffer, format="PPM")
    (tmp_path / "im.ppm.gz").write_bytes(gzip.compress(buffer.getvalue()))
    mask16 = np.zeros((6, 4), np.uint16)
    mask16[2:4] = 65535
    Image.fromarray(mask16).save(tmp_path / "mask16.png")
    expected = {"rgba.png": (200 / 255, 0.0, 0.0), "gray16.png": (30000 / 65535,) * 3, "im.ppm.gz": (90 / 255,) * 3}
    for name, colour in expected.items():
        item = LoadFundusd()({"image": str(tmp_path / name), "label": str(tmp_path / "mask16.png")})
        assert item["image"].shape == (3, 6, 4)
        torch.testing.assert_close(item["image"][:, 0, 0], torch.tensor(colour, dtype=torch.float32))
        assert item["label"].shape == (1, 6, 4) and item["label"].sum() == 8


def test_missing_fov_is_estimated_and_label_optional(tmp_path: Path) -> None:
    rows, cols = np.mgrid[:40, :50]
    disc = (rows - 20) ** 2 + (cols - 25) ** 2 < 18**2
    image = np.zeros((40, 50, 3), np.uint8)
    image[disc] = (200, 100, 50)
    Image.fromarray(image).save(tmp_path / "photo.jpg", quality=95)
    item = LoadFundusd()({"image": str(tmp_path / "photo.jpg")})
    assert "label" not in item
    fov = item["fov"]
    assert fov.shape == (1, 40, 50) and fov.meta["fov_estimated"] is True
    assert _dice(fov[0], torch.from_numpy(disc)) > 0.95
    assert "fov" not in LoadFundusd(estimate_missing_fov=False)({"image": str(tmp_path / "photo.jpg")})
    assert "fov" not in LoadFundusd(estimate_missing_fov=False)({"image": str(tmp_path / "photo.jpg"), "fov": None})
    # A mask tools.prepare estimated for a dataset distributed without is no dataset's mask either (until 0.3.17 its
    # evaluation reported it as given).
    Image.fromarray(disc).save(tmp_path / "fov.png")
    for source, estimated in ((None, False), ("given", False), ("estimated", True)):
        entry = {"image": str(tmp_path / "photo.jpg"), "fov": str(tmp_path / "fov.png")}
        entry.update({} if source is None else {"fov_source": source})
        assert LoadFundusd()(entry)["fov"].meta["fov_estimated"] is estimated, source


def test_mask_size_mismatch_names_both_files(tiny: dict, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((9, 5), np.uint8)).save(tmp_path / "transposed.gif")
    with pytest.raises(FundusImageError) as error:
        LoadFundusd()({**tiny, "label": str(tmp_path / "transposed.gif")})
    message = str(error.value)
    assert "transposed.gif" in message and tiny["image"] in message and "5x9" in message and "9x5" in message
    with pytest.raises(FundusImageError, match="not found"):
        LoadFundusd()({**tiny, "fov": str(tmp_path / "absent.png")})


def test_drive_orientation_vessels_on_label(drive_dir: Path) -> None:
    item = LoadFundusd()(_drive_item(drive_dir))
    image, label, fov = item["image"], item["label"], item["fov"]
    assert image.shape == (3, 584, 565) and label.shape == (1, 584, 565) and fov.shape == (1, 584, 565)
    green, vessel, inside = image[1].numpy(), label[0].numpy() > 0.5, fov[0].numpy() > 0.5

    def vessel_contrast(vessel: np.ndarray) -> float:
        """Green just beside the labelled vessels minus green on them (vessels are dark in green)."""
        beside = ndimage.binary_dilation(vessel, iterations=3) & ~vessel & inside
        return float(green[beside].mean() - green[vessel & inside].mean())

    contrast = vessel_contrast(vessel)
    assert contrast > 0.03
    # The same measure on a mirrored label finds no vessels: the check above can fail on misalignment.
    assert vessel_contrast(vessel[:, ::-1]) < contrast / 2
    assert vessel_contrast(vessel[::-1]) < contrast / 2


def test_resize_and_invert_restore_original_grid(drive_dir: Path) -> None:
    preprocess = Compose([LoadFundusd(), *network_size("resize", 256)])
    item = preprocess(_drive_item(drive_dir))
    assert item["image"].shape == (3, 256, 256) and item["label"].shape == (1, 256, 256)
    original = LoadFundusd()(_drive_item(drive_dir))
    # A "prediction" at 256 x 256: the resized label and field of view, inverted to the file's grid.
    # Invertd takes the inverse from the "image" entry; the prediction just has to be a MetaTensor.
    item["pred"] = MetaTensor(torch.cat([item["label"], item["fov"]]).as_tensor())
    restored = Invertd("pred", transform=preprocess, orig_keys="image", nearest_interp=False)(item)["pred"]
    assert restored.shape == (2, 584, 565)
    assert _dice(restored[1], original["fov"][0]) > 0.99
    vessel_dice = _dice(restored[0], original["label"][0])
    assert vessel_dice > 0.6  # thin vessels cannot survive 256 px, but the rest must land where it was
    assert vessel_dice > 3 * _dice(torch.flip(restored[0], dims=[0]), original["label"][0])
    # At the network's full size nothing is lost on the way there and back, not even half a pixel of position.
    preprocess = Compose([LoadFundusd(), *network_size("resize", 1024)])
    item = preprocess(_drive_item(drive_dir))
    item["pred"] = MetaTensor(item["label"].as_tensor())
    restored = Invertd("pred", transform=preprocess, orig_keys="image", nearest_interp=False)(item)["pred"]
    assert restored.shape == (1, 584, 565) and _dice(restored[0], original["label"][0]) > 0.999


def test_resized_masks_stay_on_their_photograph() -> None:
    """A mask resized (or scaled for windows) lands where the photograph's own pixels go: the centre of a disc drawn
    in both moves by under a tenth of a pixel between them, as pixel centres map to pixel centres."""
    rows, cols = np.mgrid[:584, :565]
    disc = torch.as_tensor((((rows - 250.0) ** 2 + (cols - 300.0) ** 2) <= 150.0**2).astype(np.float32))[None]
    for transforms in (network_size("resize", 1024), network_size("resize", 400), network_size("sliding_window", 64, 1.7)):
        out = Compose(transforms)({"image": disc.repeat(3, 1, 1), "label": disc.clone(), "fov": disc.clone()})
        image_centre = ndimage.center_of_mass(out["image"][0].numpy())
        for key in ("label", "fov"):
            shift = np.subtract(ndimage.center_of_mass(out[key][0].numpy()), image_centre)
            assert np.abs(shift).max() < 0.1, (out[key].shape, key, shift)


def test_a_shrinking_photograph_is_smoothed_first_so_thin_vessels_do_not_alias() -> None:
    """A one-pixel dark line in a 3504 px wide photograph keeps some contrast at 1024 px wherever it falls between
    the samples; without the low-pass filter it ranged from nothing (the line gone) to 0.6."""
    contrasts = []
    for column in range(1000, 1008):
        image = torch.ones(3, 64, 3504)
        image[:, :, column] = 0.0
        shrunk = Compose(network_size("resize", 1024, keys=("image",)))({"image": image})["image"]
        contrasts.append(1.0 - float(shrunk[0, 32].min()))
    assert min(contrasts) > 0.1 and max(contrasts) < 0.4, contrasts  # without the filter: 0.0 to 0.82
    windows = Compose(network_size("sliding_window", 256, 0.3, keys=("image",)))
    contrasts = [1.0 - float(windows({"image": _line_image(column)})["image"][0, 10].min()) for column in range(500, 508)]
    assert min(contrasts) > 0.1 and max(contrasts) < 0.4, contrasts  # without the filter: 0.0 to 0.83


def test_the_low_pass_gives_the_anti_aliased_resize_of_sam_2s_own_preprocessing() -> None:
    """Resized through the low pass, a photograph is what torch's anti-aliased resize (torchvision's, which SAM 2's
    SAM2Transforms use) makes of it, but for the float rounding of the round trip."""
    photograph = torch.rand(3, 700, 1100, generator=torch.Generator().manual_seed(0))
    resized = Compose(network_size("resize", 256, keys=("image",)))({"image": photograph})["image"]
    expected = F.interpolate(photograph[None], size=(256, 256), mode="bilinear", antialias=True, align_corners=False)[0]
    assert float((resized - expected).abs().max()) < 1e-4


def _line_image(column: int) -> torch.Tensor:
    image = torch.ones(3, 64, 1200)
    image[:, :, column] = 0.0
    return image


def test_sam_normalisation(tiny: dict) -> None:
    item = LoadFundusd()(tiny)
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    expected = (item["image"].as_tensor() - mean) / std
    normalised = SamNormalized()(item)["image"]
    torch.testing.assert_close(normalised.as_tensor(), expected)
    assert isinstance(normalised, MetaTensor) and normalised.meta["filename_or_obj"] == tiny["image"]


def _hsv(rgb: torch.Tensor) -> np.ndarray:
    """HSV of a (3, H, W) RGB tensor by the standard library, pixel by pixel: an independent reference."""
    pixels = rgb.permute(1, 2, 0).reshape(-1, 3).tolist()
    return np.array([colorsys.rgb_to_hsv(*pixel) for pixel in pixels]).T.reshape(3, *rgb.shape[1:])


def test_hue_shift_rotates_pure_red_around_the_colour_wheel() -> None:
    shift = RandHueShiftd("image", max_shift=0.5)
    shift.set_random_state(3)
    rotated = shift({"image": torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)})["image"]
    assert abs(shift.shift) > 0.05, "the seed draws a visible rotation"
    expected = colorsys.hsv_to_rgb(shift.shift % 1.0, 1.0, 1.0)  # red has hue 0: the result's hue is the shift
    torch.testing.assert_close(torch.as_tensor(rotated).flatten(), torch.tensor(expected), atol=1e-5, rtol=0)


def test_rand_hue_shift_transform() -> None:
    image = MetaTensor(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1)), meta={"filename_or_obj": "x"})
    image[:, 0, 0] = 0.3  # a gray pixel
    shift = RandHueShiftd("image", max_shift=0.02)
    shift.set_random_state(7)
    shifted = shift({"image": image})["image"]
    assert isinstance(shifted, MetaTensor) and shifted.meta["filename_or_obj"] == "x"
    before, after = _hsv(image.as_tensor()), _hsv(shifted.as_tensor())
    np.testing.assert_allclose(after[1:], before[1:], atol=1e-5)  # saturation and value untouched
    delta = (after[0] - before[0] + 0.5) % 1.0 - 0.5
    coloured = before[1] > 0.05
    assert 0 < abs(float(delta[coloured].mean())) <= 0.02 and float(delta[coloured].std()) < 1e-4
    torch.testing.assert_close(shifted[:, 0, 0], image[:, 0, 0])
    again = RandHueShiftd("image", max_shift=0.02)
    again.set_random_state(7)
    torch.testing.assert_close(again({"image": image})["image"], shifted)
    assert torch.equal(RandHueShiftd("image", prob=0.0)({"image": image})["image"], image)
    with pytest.raises(ValueError, match="max_shift"):
        RandHueShiftd("image", max_shift=0.7)


def _checkerboard_item(size: int = 64) -> dict:
    """Image whose red channel is exactly the label, in large blocks, so that misaligned warps show."""
    rows, cols = np.mgrid[:size, :size]
    label = (((rows // 16) + (cols // 8)) % 2).astype(np.float32)
    label[:16, :] = 0  # break the symmetry so flips change something
    image = np.stack([label, np.full_like(label, 0.4), np.full_like(label, 0.2)])
    return {
        "image": MetaTensor(torch.from_numpy(image)),
        "label": MetaTensor(torch.from_numpy(label[None].copy())),
        "fov": MetaTensor(torch.ones(1, size, size)),
    }


def test_training_augmentations_move_image_and_masks_together() -> None:
    augment = training_augmentations(64)
    augment.set_random_state(0)
    changed = 0
    for _ in range(30):
        source = _checkerboard_item()
        out = augment(source)
        assert out["image"].shape == (3, 64, 64)
        assert out["label"].shape == (1, 64, 64) and out["fov"].shape == (1, 64, 64)
        assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
        assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
        # Where the image is clearly inside a block (not at a blurred edge), the label must say the same.
        red, label = out["image"][0], out["label"][0]
        clear = (red > 0.8) | ((red < 0.2) & (out["fov"][0] > 0.5))
        agreement = float(((red[clear] > 0.5) == (label[clear] > 0.5)).float().mean())
        assert agreement > 0.97
        changed += not torch.equal(out["label"], _checkerboard_item()["label"])
    assert changed >= 10  # flips and warps do happen


def test_training_augmentations_are_reproducible() -> None:
    first, second = training_augmentations(64), training_augmentations(64)
    first.set_random_state(3)
    second.set_random_state(3)
    for _ in range(5):
        a, b = first(_checkerboard_item()), second(_checkerboard_item())
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["label"], b["label"])


def test_training_augmentations_keep_masks_on_their_photograph() -> None:
    """A grey photograph that is its own label: after any augmentation, the image thresholded at half its range is
    the label again but for the blurred or sharpened edges (each sample's Dice above 0.92; the legacy "nearest"
    resize of the crop branch, half a pixel off, fell to 0.89)."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:64, :64]
    label = np.zeros((64, 64), np.float32)
    for _ in range(12):
        row, col, radius = rng.uniform(8, 56), rng.uniform(8, 56), rng.uniform(2, 5)
        label[(rows - row) ** 2 + (cols - col) ** 2 <= radius**2] = 1
    augment = training_augmentations(64)
    augment.set_random_state(0)
    for _ in range(200):
        item = {"image": torch.tensor(label).repeat(3, 1, 1), "label": torch.tensor(label)[None], "fov": torch.ones(1, 64, 64)}
        out = augment(item)
        if out["label"].any():
            assert _dice(out["image"][0] > 0.5, out["label"][0] > 0.5) > 0.92


def _blob_item(size: int = 64) -> dict:
    label = torch.zeros(2, size, size)
    label[0, 10:20, 40:50] = 1  # rows 10-19, columns 40-49
    label[1, 30:34, 5:9] = 1
    fov = torch.zeros(1, size, size)
    fov[:, :, : size - 8] = 1
    return {"label": label, "fov": fov}


def test_prompts_positive_negative_box() -> None:
    sampler = SamplePromptsd(num_positive=5, num_negative=4, use_box=True, box_noise=0.0, erosion_radius=2)
    sampler.set_random_state(0)
    out = sampler(_blob_item())
    coords, labels = out["point_coords"], out["point_labels"]
    assert coords.shape == (11, 2) and coords.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels.tolist() == [1] * 5 + [0] * 4 + [2, 3]
    assert not out["ignored_points"].any()
    x, y = coords[:5, 0], coords[:5, 1]
    assert bool(((x >= 42) & (x <= 47) & (y >= 12) & (y <= 17)).all())  # inside the eroded blob, (x, y) order
    negatives = coords[5:9]
    item = _blob_item()
    for col, row in negatives.long().tolist():
        assert item["label"][0, row, col] == 0 and item["fov"][0, row, col] == 1
    torch.testing.assert_close(coords[9:], torch.tensor([[40.0, 10.0], [49.0, 19.0]]))


def test_prompts_channel_noise_and_fallback() -> None:
    sampler = SamplePromptsd(channel=1, num_positive=3, use_box=True, box_noise=0.5, box_noise_bound=1.0)
    sampler.set_random_state(1)
    out = sampler(_blob_item())
    assert bool(((out["point_coords"][:3, 0] >= 5) & (out["point_coords"][:3, 0] <= 8)).all())
    box = out["point_coords"][3:]
    assert float((box - torch.tensor([[5.0, 30.0], [8.0, 33.0]])).abs().max()) <= 1.0  # bounded jitter
    thin = {"label": torch.zeros(1, 32, 32)}
    thin["label"][0, 16, 3:30] = 1  # erosion removes a 1-pixel line: fall back to the line itself
    out = SamplePromptsd(num_positive=4, erosion_radius=3)(thin)
    assert out["point_labels"].tolist() == [1] * 4 and bool((out["point_coords"][:, 1] == 16).all())
    with pytest.raises(ValueError, match="channel"):
        SamplePromptsd(channel=2)(_blob_item())


def test_prompts_empty_label_and_no_prompt() -> None:
    empty = {"label": torch.zeros(1, 16, 16), "fov": torch.ones(1, 16, 16)}
    out = SamplePromptsd(num_positive=2, num_negative=1, use_box=True)(empty)
    assert out["point_labels"].tolist() == [-1, -1, 0, -1, -1]
    assert float(out["point_coords"][[0, 1, 3, 4]].abs().sum()) == 0
    assert out["ignored_points"].tolist() == [True, True, False, True, True]  # the negative point alone
    silent = SamplePromptsd(num_positive=2, use_box=True, no_prompt_prob=1.0)(_blob_item())
    assert silent["point_labels"].tolist() == [-1] * 4 and float(silent["point_coords"].abs().sum()) == 0
    # SAM 2's prompt-free input: one padding point, the first slot; the others only fill the length.
    assert silent["ignored_points"].tolist() == [False, True, True, True]
    assert silent["ignored_points"].dtype == torch.bool
    with pytest.raises(ValueError, match="slot"):
        SamplePromptsd(num_positive=0, num_negative=0, use_box=False)


def test_prompts_reproducible_and_collatable() -> None:
    def draw(seed: int) -> list[dict]:
        sampler = SamplePromptsd(num_positive=3, num_negative=2, use_box=True, no_prompt_prob=0.3)
        sampler.set_random_state(seed)
        return [sampler(_blob_item()) for _ in range(6)]

    first, second, other = draw(5), draw(5), draw(6)
    for a, b in zip(first, second):
        torch.testing.assert_close(a["point_coords"], b["point_coords"])
    assert any(not torch.equal(a["point_coords"], c["point_coords"]) for a, c in zip(first, other))
    keys = ("point_coords", "point_labels", "ignored_points")
    batch = default_collate([{key: item[key] for key in keys} for item in first])
    assert batch["point_coords"].shape == (6, 7, 2) and batch["point_labels"].shape == (6, 7)
    assert batch["ignored_points"].shape == (6, 7)
    assert list_data_collate(first)["point_labels"].shape == (6, 7)


def test_full_pipeline_on_drive(drive_dir: Path) -> None:
    def run(normalise: bool) -> dict:
        pipeline = Compose(
            [
                LoadFundusd(),
                *network_size("resize", 128),
                training_augmentations(128),
                SamplePromptsd(num_positive=2, num_negative=2, use_box=True),
                *([SamNormalized()] if normalise else []),
            ]
        )
        pipeline.set_random_state(0)
        return pipeline(_drive_item(drive_dir))

    out, unnormalised = run(True), run(False)
    assert out["image"].shape == (3, 128, 128) and out["label"].shape == (1, 128, 128)
    # The same draws, then SAM's normalisation, computed here from its published ImageNet statistics.
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(torch.as_tensor(out["image"]), (torch.as_tensor(unnormalised["image"]) - mean) / std)
    coords, labels = out["point_coords"], out["point_labels"]
    for (col, row), kind in zip(coords.long().tolist(), labels.tolist()):
        if kind == 1:
            assert out["label"][0, row, col] == 1
        if kind == 0:
            assert out["label"][0, row, col] == 0 and out["fov"][0, row, col] == 1

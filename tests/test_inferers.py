"""Sliding-window inference at native resolution: no seams, windows outside the field of view skipped and counted,
clear errors; checked with a pointwise network whose whole-image answer is known exactly."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from scripts.errors import ConfigError, FundusError
from scripts.fundus_io import write_png
from scripts.inferers import BACKGROUND_LOGIT, FundusInferer, window_fit
from scripts.inputs import ImageFolder

HEIGHT, WIDTH, WINDOW, OVERLAP = 300, 460, 64, 0.25


def pointwise_network() -> nn.Module:
    """Logits that depend on each pixel alone: windows blended without error give the whole image's answer."""
    network = nn.Conv2d(3, 2, kernel_size=1)
    torch.manual_seed(0)
    nn.init.normal_(network.weight)
    return network.eval()


def window_starts(size: int) -> list[int]:
    """Where windows start along one side, as MONAI documents its scan: every int(window * (1 - overlap)) pixels,
    the last window flush with the border."""
    step = int(WINDOW * (1 - OVERLAP))
    count = math.ceil((size - WINDOW) / step) + 1
    return sorted({min(index * step, size - WINDOW) for index in range(count)})


def test_windows_blend_into_the_whole_image_answer_without_seams():
    network = pointwise_network()
    images = torch.rand(2, 3, HEIGHT, WIDTH)
    inferer = FundusInferer("sliding_window", image_size=WINDOW, out_channels=2, overlap=OVERLAP)
    with torch.no_grad():
        torch.testing.assert_close(inferer(images, network), network(images), atol=1e-5, rtol=1e-5)


def test_a_large_photograph_with_one_pixel_vessels_comes_back_at_its_size_and_orientation():
    """2000 x 1300 (wider than high, as fundus cameras take them) with one-pixel vessels along a row and a column:
    the blended windows equal the whole-image computation everywhere, so each vessel stays one pixel wide and where
    it was."""
    height, width = 1300, 2000
    images = torch.full((1, 3, height, width), 0.2)
    images[..., 333, :] = 1.0  # a horizontal vessel
    images[..., :, 1111] = 1.0  # a vertical one
    network = pointwise_network()
    inferer = FundusInferer("sliding_window", image_size=256, out_channels=2, overlap=OVERLAP, window_batch_size=8)
    with torch.no_grad():
        logits, expected = inferer(images, network), network(images)
    assert logits.shape == (1, 2, height, width)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    differs = (logits[0, 0] - logits[0, 0, 0, 0]).abs() > 1e-3
    assert torch.equal(differs.nonzero()[:, 0].unique(), torch.arange(height)), "the vertical vessel in every row"
    assert set(differs.sum(dim=1).tolist()) == {1, width}, "one pixel wide, or the whole horizontal vessel's row"
    assert bool(differs[333].all()) and bool(differs[:, 1111].all())


@pytest.mark.parametrize("architecture", ["sam", "unet"])
def test_both_heads_tile_a_photograph_window_by_window(architecture):
    """Windows that do not overlap: each tile of the answer is the head's own answer for that window alone, at the
    picture's size and not transposed (3 x 2 windows of 64 px)."""
    from scripts.network import build_network

    torch.manual_seed(0)
    network = build_network(architecture, model_size="tiny", random_init=True, image_size=WINDOW).eval()
    images = torch.rand(1, 3, 2 * WINDOW, 3 * WINDOW)
    inferer = FundusInferer("sliding_window", image_size=WINDOW, out_channels=1, overlap=0.0)
    with torch.no_grad():
        logits = inferer(images, network)
        assert logits.shape == (1, 1, 2 * WINDOW, 3 * WINDOW)
        for top in (0, WINDOW):
            for left in (0, WINDOW, 2 * WINDOW):
                window = (..., slice(top, top + WINDOW), slice(left, left + WINDOW))
                torch.testing.assert_close(logits[window], network(images[window]), atol=1e-4, rtol=1e-4)


def test_windows_outside_the_field_of_view_are_skipped_and_counted():
    network = pointwise_network()
    images = torch.rand(1, 3, HEIGHT, WIDTH)
    fov = torch.zeros(1, 1, HEIGHT, WIDTH)
    fov[..., 40:200, 30:220] = 1  # the left part of the picture
    inferer = FundusInferer("sliding_window", image_size=WINDOW, out_channels=2, overlap=OVERLAP, window_batch_size=5)
    with torch.no_grad():
        logits = inferer(images, network, fov=fov)
        expected = network(images)
    rows, cols = window_starts(HEIGHT), window_starts(WIDTH)
    touching = sum(bool(fov[..., r : r + WINDOW, c : c + WINDOW].any()) for r in rows for c in cols)
    assert inferer.windows_total == len(rows) * len(cols)
    assert inferer.windows_computed == touching < inferer.windows_total
    # Deep inside the field of view every window is computed; a window's side away from it, none is.
    torch.testing.assert_close(
        logits[..., 40 + WINDOW : 200 - WINDOW, 30 + WINDOW : 220 - WINDOW],
        expected[..., 40 + WINDOW : 200 - WINDOW, 30 + WINDOW : 220 - WINDOW],
        atol=1e-5,
        rtol=1e-5,
    )
    outside = logits[..., :, 220 + WINDOW :]
    torch.testing.assert_close(outside, torch.full_like(outside, BACKGROUND_LOGIT))  # up to the blending's rounding


def test_an_image_smaller_than_a_window_is_named():
    inferer = FundusInferer("sliding_window", image_size=WINDOW, pixel_scale=0.5)
    image = MetaTensor(torch.rand(1, 3, 50, 100), meta={"filename_or_obj": ["/photos/small_eye.png"]})
    expected = (
        "small_eye.png: 100x50 pixels after pixel_scale 0.5 is smaller than the model's 64-pixel window (it was "
        "trained on windows cut at that scale): enlarge the photograph, or segment it with a model trained with "
        "input_mode 'resize'"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        inferer(image, pointwise_network())


def test_an_image_folder_leaves_out_photographs_smaller_than_a_window(tmp_path):
    """Checked on the photograph's own size before it is read for segmenting, so the others are segmented; the
    window fits a photograph whose scaled side (floor of side x scale, as MONAI's Zoomd) reaches the window."""
    fits = window_fit("sliding_window", image_size=WINDOW, pixel_scale=0.5)
    assert fits((128, 200)) is None and fits((200, 129)) is None
    assert fits((127, 200)) == (
        "200x127 pixels at pixel_scale 0.5 is smaller than the 64-pixel window: lower image_size, raise pixel_scale, "
        "or use input_mode 'resize'"
    )
    assert window_fit("resize", image_size=1024)((40, 40)) is None
    # At inference and evaluation the settings are the model's: the advice is about the photograph or the model.
    assert window_fit("sliding_window", image_size=WINDOW, pixel_scale=0.5, trained=True)((127, 200)) == (
        "200x127 pixels at pixel_scale 0.5 is smaller than the model's 64-pixel window (it was trained on windows cut "
        "at that scale): enlarge the photograph, or segment it with a model trained with input_mode 'resize'"
    )
    for name, size in (("large.png", (130, 140)), ("small.png", (100, 140))):
        write_png(tmp_path / name, np.full((*size, 3), 90, np.uint8))
    images = ImageFolder(tmp_path, tmp_path.parent / "out", size_check=fits)
    assert [Path(entry["image"]).name for entry in images.entries] == ["large.png"]
    with pytest.raises(FundusError, match=r"small.png: 140x100 pixels at pixel_scale 0.5 is smaller than the 64-pixel"):
        images.report_unreadable()


def test_resize_mode_is_one_forward_pass():
    calls = []

    def network(images: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape)
        return images[:, :1]

    images = torch.rand(3, 3, WINDOW, WINDOW)
    assert torch.equal(FundusInferer("resize", image_size=WINDOW)(images, network), images[:, :1])
    assert calls == [images.shape]


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="window_overlap"):
        FundusInferer("sliding_window", overlap=1.0)
    with pytest.raises(ConfigError, match="Prompts need input_mode 'resize'"):
        FundusInferer("sliding_window", prompt_modes=["box"])
    with pytest.raises(ConfigError, match="Setting 'auto_negative_points' must be 0 or a positive whole number"):
        FundusInferer(prompt_source="auto_points", auto_negative_points=-1)


def test_prompts_are_refused_with_a_compiled_network():
    """MONAI's engines pass a compiled network's images on without the metadata naming each image and its size,
    which prompts are matched and mapped by: refused when built, not an AttributeError at the first image."""
    for prompted in ({"prompt_modes": ["none", "box"]}, {"prompt_source": "auto_box"}):
        with pytest.raises(ConfigError, match="Prompts need compile false"):
            FundusInferer(compiled=True, **prompted)
    automatic = FundusInferer(compiled=True)  # prompt-free: compiled runs are welcome
    with pytest.raises(ConfigError, match="Prompts need compile false"):
        automatic.with_prompts({"eye.png": {"box": [1, 1, 5, 5]}}, {"eye.png": (16, 16)}, "a click")

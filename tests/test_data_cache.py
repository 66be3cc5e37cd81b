"""The training workflow's caches: stored as bytes, measured before they are built, refused where memory is short."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose
from PIL import Image

from scripts import data_cache
from scripts.data_cache import CACHE_SHARE_OF_AVAILABLE, available_memory, cached_bytes, check_cache_fits
from scripts.errors import ConfigError
from scripts.synthetic import ensure_dataset
from scripts.transforms import CompactCached, FloatFromCache, LoadFundusd, SamNormalized, network_size
from tests.helpers import BUNDLE, QUICKSTART, TRAIN, run_in_process
from tools.prepare import prepare_dataset


def _parser(datalist: Path, **settings) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([TRAIN])
    parser.update({"bundle_root": str(BUNDLE), "datalist": str(datalist), "num_workers": 0, **settings})
    return parser


def _held_bytes(*datasets) -> int:
    """What the datasets' caches hold, tensor by tensor."""
    return sum(
        value.nbytes for dataset in datasets for item in dataset._cache for value in item.values()
        if isinstance(value, torch.Tensor)
    )


@pytest.fixture(scope="module")
def drive_datalist(drive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    datalist = tmp_path_factory.mktemp("drive") / "datalist.json"
    prepare_dataset("DRIVE", drive_dir, datalist)
    return datalist


@pytest.mark.parametrize(
    "input_mode, image_size, pixel_scale",
    [("resize", 256, 1.0), ("sliding_window", 64, 1.0), ("sliding_window", 64, 0.45)],
)
def test_the_predicted_size_is_what_the_bundles_caches_hold(drive_datalist, input_mode, image_size, pixel_scale):
    """Predicted from the photographs' headers before anything is read; held: the bytes of the cached tensors."""
    parser = _parser(drive_datalist, input_mode=input_mode, image_size=image_size, pixel_scale=pixel_scale)
    training = parser.get_parsed_content("train#dataset#data")
    validation = parser.get_parsed_content("validate#dataset#data")
    predicted = check_cache_fits(training, validation, input_mode, image_size, pixel_scale)
    held = _held_bytes(parser.get_parsed_content("train#dataset"), parser.get_parsed_content("validate#dataset"))
    assert predicted == held
    if input_mode == "resize":  # 20 photographs of 256 x 256, 5 planes of one byte: 4 times less than float32
        assert held == 20 * 256 * 256 * 5


def test_the_predicted_size_counts_every_label_mask(tmp_path):
    """Disc and cup: two label planes per photograph."""
    datalist = ensure_dataset(tmp_path / "synthetic", count=10, size=128)["disc_cup"]
    parser = _parser(Path(datalist), channel_names=["disc", "cup"], input_mode="sliding_window", image_size=64)
    training = parser.get_parsed_content("train#dataset#data")
    assert cached_bytes(training, "sliding_window", 64) == len(training) * 128 * 128 * 6
    assert cached_bytes(training, "sliding_window", 64) == _held_bytes(parser.get_parsed_content("train#dataset"))


def test_cached_bytes_give_back_the_photograph_and_masks(drive_dir):
    """At the photograph's own size the 8-bit file comes back exactly; resized, within half a level; masks exactly."""
    training = drive_dir / "training"
    item = {
        "image": str(training / "images" / "21_training.tif"),
        "label": str(training / "1st_manual" / "21_manual1.gif"),
        "fov": str(training / "mask" / "21_training_mask.gif"),
    }
    for mode, size in (("sliding_window", 64), ("resize", 256)):
        loaded = Compose([LoadFundusd(), *network_size(mode, size)])(item)
        stored = CompactCached()(loaded)
        assert {stored[key].dtype for key in ("image", "label", "fov")} == {torch.uint8}
        restored = FloatFromCache()(stored)
        assert {restored[key].dtype for key in ("image", "label", "fov")} == {torch.float32}
        error = (restored["image"] - loaded["image"]).abs().max().item()
        assert error < (1e-6 if mode == "sliding_window" else 0.5 / 255 + 1e-6)
        for key in ("label", "fov"):
            assert torch.equal(restored[key], loaded[key])
        assert restored["image"].applied_operations == loaded["image"].applied_operations


def test_validation_stores_bytes_and_normalises_every_epoch(drive_datalist):
    """Validation has no randomised transform: FloatFromCache, not being a MONAI Transform, ends what is stored."""
    parser = _parser(drive_datalist, input_mode="resize", image_size=256)
    dataset = parser.get_parsed_content("validate#dataset")
    assert dataset._cache[0]["image"].dtype == torch.uint8
    item = dataset[0]
    uncached = Compose([LoadFundusd(), *network_size("resize", 256), SamNormalized()])(dataset.data[0])
    assert item["image"].dtype == torch.float32
    assert np.allclose(item["image"], uncached["image"], atol=0.5 / 255 / min(0.229, 0.224, 0.225) + 1e-5)
    assert torch.equal(item["label"], uncached["label"])


def test_a_cache_the_machine_cannot_hold_is_refused_with_the_rate_that_fits():
    entries = [{"image": "unused.png", "label": "unused.png"}] * 100  # resize mode reads no header
    needed = 120 * 1024 * 1024 * 5  # 100 training and 20 validation photographs at 1024 px
    assert check_cache_fits(entries, entries[:20], "resize", 1024, available=needed * 2) == needed
    with pytest.raises(ConfigError) as refused:
        check_cache_fits(entries, entries[:20], "resize", 1024, available=needed)
    message = str(refused.value)
    assert "cache_rate" in message and "600 MiB" in message and "--cache_rate 0.8" in message
    check_cache_fits(entries, entries[:20], "resize", 1024, cache_rate=0.8, available=needed)  # the advice fits
    # torchrun: every process on the machine holds its own copy.
    with pytest.raises(ConfigError, match="for the 4 processes on this machine.*--cache_rate 0.6"):
        check_cache_fits(entries, entries[:20], "resize", 1024, processes=4, available=needed * 3)
    with pytest.raises(ConfigError, match="--cache_rate 0 "):
        check_cache_fits(entries, entries[:20], "resize", 1024, available=needed // 100)
    with pytest.raises(ConfigError, match="Setting 'cache_rate' must be a number from 0"):  # its rule: test_bad_inputs
        check_cache_fits(entries, entries, "resize", 1024, cache_rate=-0.1, available=needed)


def _advice(refused: pytest.ExceptionInfo) -> float:
    return float(re.search(r"set --cache_rate ([0-9.]+)", str(refused.value)).group(1))


def test_the_advised_cache_rate_fits_whatever_the_photographs_sizes(tmp_path):
    """CacheDataset caches each split's first entries: with large photographs first, half the rate is more than half
    the memory. The advice is the largest rate, in steps of 0.05, whose cached entries fit."""
    entries = []
    for index, side in enumerate([512] * 10 + [64] * 10):
        path = tmp_path / f"{index:02d}.png"
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(path)
        entries.append({"image": str(path), "label": str(path)})
    large = 512 * 512 * 5
    available = round(5 * large / CACHE_SHARE_OF_AVAILABLE)  # room for 5 of the large ones
    with pytest.raises(ConfigError) as refused:
        check_cache_fits(entries, entries[:0], "sliding_window", 64, available=available)
    assert _advice(refused) == 0.25  # the first 5 photographs; proportion to the bytes would have said 0.5
    check_cache_fits(entries, entries[:0], "sliding_window", 64, cache_rate=0.25, available=available)
    # A refused rate below 1: its entries are counted as CacheDataset counts them (int(len * rate)).
    three = [{"image": "unused.png", "label": "unused.png"}] * 3
    with pytest.raises(ConfigError) as refused:
        check_cache_fits(three[:2], three[:1], "resize", 1024, cache_rate=0.7, available=5 * 2**20)
    check_cache_fits(three[:2], three[:1], "resize", 1024, cache_rate=_advice(refused), available=5 * 2**20)


def test_a_training_run_that_cannot_cache_its_photographs_stops_before_caching_them(tmp_path, monkeypatch):
    """The check runs in the bundle's initialize, before the datasets and the output folders."""
    datalist = ensure_dataset(tmp_path / "synthetic", count=10, size=128)["vessels"]
    monkeypatch.setattr(data_cache, "available_memory", lambda: 64 * 1024)
    read = []
    monkeypatch.setattr(LoadFundusd, "__call__", lambda self, data: read.append(data))
    error = run_in_process("training", [TRAIN, QUICKSTART], datalist=datalist, ckpt_dir=str(tmp_path / "models"),
                           output_dir=str(tmp_path / "eval"), image_size=64, max_epochs=1, num_workers=0)
    assert isinstance(error, ConfigError) and "Setting 'cache_rate' 1" in str(error) and "set --cache_rate 0." in str(error)
    assert not read and not (tmp_path / "models").exists()


def test_available_memory_is_the_least_of_the_machines_and_its_cgroups(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   10000000 kB\n")
    assert available_memory(meminfo, tmp_path / "none", tmp_path / "none") == 10000000 * 1024
    # cgroup v2: a limit on a slice above the process's own group, which sets none.
    root = tmp_path / "v2"
    (root / "slice" / "job").mkdir(parents=True)
    (root / "slice" / "memory.max").write_text("8000000000\n")
    (root / "slice" / "memory.current").write_text("3000000000\n")
    (root / "slice" / "job" / "memory.max").write_text("max\n")
    (root / "slice" / "job" / "memory.current").write_text("1000000000\n")
    membership = tmp_path / "cgroup"
    membership.write_text("0::/slice/job\n")
    assert available_memory(meminfo, root, membership) == 5000000000
    # Page cache the kernel reclaims first (a dataset read once in the container) is room, as MemAvailable counts it.
    (root / "slice" / "memory.stat").write_text("anon 1000000000\nfile 2000000000\ninactive_file 1500000000\n")
    assert available_memory(meminfo, root, membership) == 6500000000
    # cgroup v1 in a container that lists its host's path: the limit is found at the mount's root.
    root = tmp_path / "v1"
    (root / "memory").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("4000000000\n")
    (root / "memory" / "memory.usage_in_bytes").write_text("1500000000\n")
    membership.write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert available_memory(meminfo, root, membership) == 2500000000
    (root / "memory" / "memory.stat").write_text("cache 900000000\ntotal_inactive_file 700000000\n")
    assert available_memory(meminfo, root, membership) == 3200000000
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert available_memory(meminfo, root, membership) == 10000000 * 1024
    # This machine: some memory, no more than it has.
    assert 0 < available_memory() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

"""The memory the training workflow's ``CacheDataset`` takes, checked against what the machine has before caching.

``train.json`` keeps every training and validation photograph in memory at the network's size (decoded and resized
once rather than every epoch), with its masks, as bytes (:class:`scripts.transforms.CompactCached`). Pooled datasets
outgrow a workstation: the six disc/cup datasets of the SAM2LoRA paper hold over 4,000 photographs, 6 MiB each at
1024 px with a disc and a cup mask, and under ``torchrun`` every process on a machine keeps its own copy. Caching more
than the machine has ends with the kernel killing the process, without a word of why, after minutes of caching; the
check here says how much is needed and what ``cache_rate`` fits, before the first photograph is read.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.errors import ConfigError
from scripts.fundus_io import image_size as header_size
from scripts.inferers import check_input_mode
from scripts.inputs import check_settings

__all__ = ["CACHE_SHARE_OF_AVAILABLE", "available_memory", "cached_bytes", "check_cache_fits"]

logger = logging.getLogger(__name__)

CACHE_SHARE_OF_AVAILABLE = 0.8
"""The largest share of the available memory the caches may take: the rest is for the network, its optimiser, the
batches and the data-loader workers."""

# Bytes a cached pixel takes per plane: 3 for the RGB photograph, 1 for the field of view, 1 per label mask.
_PHOTOGRAPH_PLANES = 3
_FOV_PLANES = 1


def _label_planes(entry: Mapping[str, Any]) -> int:
    label = entry.get("label")
    if label is None:
        return 0
    return 1 if isinstance(label, (str, os.PathLike)) else len(label)


def _entry_bytes(
    entries: Sequence[Mapping[str, Any]], input_mode: str, image_size: int, pixel_scale: float = 1.0
) -> list[int]:
    """The bytes ``CacheDataset`` takes for each entry; see :func:`cached_bytes`."""
    check_input_mode(input_mode, pixel_scale)
    planes = [_PHOTOGRAPH_PLANES + _FOV_PLANES + _label_planes(entry) for entry in entries]
    if input_mode == "resize":
        return [plane * image_size * image_size for plane in planes]
    pixels: list[float | None] = []
    for entry in entries:
        size = header_size(entry["image"])
        # MONAI's Zoomd floors each side (and a scale of 1 leaves it as it is).
        pixels.append(None if size is None else math.floor(size[0] * pixel_scale) * math.floor(size[1] * pixel_scale))
    known = [count for count in pixels if count is not None]
    mean = sum(known) / len(known) if known else 0
    return [round(plane * (mean if count is None else count)) for plane, count in zip(planes, pixels)]


def cached_bytes(
    entries: Sequence[Mapping[str, Any]], input_mode: str, image_size: int, pixel_scale: float = 1.0
) -> int:
    """The bytes ``CacheDataset`` takes for ``entries`` (pixel data, to within a few kB of metadata per entry).

    Args:
        entries: datalist entries with ``image`` and ``label`` paths (one path, or one per channel).
        input_mode: ``"resize"`` (every photograph an ``image_size`` square) or ``"sliding_window"`` (its own size
            times ``pixel_scale``).
        image_size: the network's side.
        pixel_scale: the scale of ``"sliding_window"``.

    Returns:
        the bytes; a photograph whose header cannot be read counts as the mean of the others.
    """
    return sum(_entry_bytes(entries, input_mode, image_size, pixel_scale))


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_bytes(path: Path) -> int | None:
    """A cgroup file's number of bytes; None where it is absent, unreadable or ``max`` (no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# Per cgroup version: the folder its memory controller is mounted at (under the cgroup root), the files giving the
# limit and the usage, and memory.stat's key for the page cache the kernel reclaims first (counted in the usage, but
# as free to a cache as MemAvailable counts it: a container that has read its dataset once holds much of it there).
# v1 writes "no limit" as a number near 2**63.
_CGROUP_MEMORY_FILES = {
    "v2": ("", "memory.max", "memory.current", "inactive_file"),
    "v1": ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}
_NO_LIMIT = 2**60


def _reclaimable(stat: Path, key: str) -> int:
    """memory.stat's ``key`` in bytes; 0 where it cannot be read."""
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_headroom(cgroup_root: Path, own_cgroup: Path) -> int | None:
    """The least room under a memory limit of this process's cgroup or of one above it (a container's limit, a
    systemd slice's), cgroup v2 or v1, its reclaimable page cache counted as room; None where no limit is set.

    A container without its own cgroup namespace lists its host's cgroup path, which its mount lacks: the walk up
    then finds the limit at the mount's root.
    """
    try:
        lines = own_cgroup.read_text().splitlines()
    except OSError:
        return None
    memberships = {}
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if line.startswith("0::"):
            memberships["v2"] = path
        elif "memory" in controllers.split(","):
            memberships["v1"] = path
    headrooms = []
    for version, path in memberships.items():
        mount, limit_file, usage_file, reclaimable_key = _CGROUP_MEMORY_FILES[version]
        top = cgroup_root / mount
        folder = top / path.strip().lstrip("/")
        for level in [folder, *folder.parents]:
            limit, usage = _read_bytes(level / limit_file), _read_bytes(level / usage_file)
            if limit is not None and usage is not None and limit < _NO_LIMIT:
                headrooms.append(limit - usage + _reclaimable(level / "memory.stat", reclaimable_key))
            if level == top:
                break
    return max(0, min(headrooms)) if headrooms else None


def available_memory(
    meminfo: str | os.PathLike = "/proc/meminfo",
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
    own_cgroup: str | os.PathLike = "/proc/self/cgroup",
) -> int | None:
    """The memory this process can still take without the kernel reclaiming what others use or killing it.

    The least of Linux's ``MemAvailable`` (free memory and what the page cache can give back) and the room under
    any cgroup memory limit over the process (a Docker or Kubernetes limit, which ``MemAvailable`` does not show).

    Args:
        meminfo: the kernel's memory report.
        cgroup_root: where the cgroup file system is mounted.
        own_cgroup: the process's cgroup membership.

    Returns:
        bytes, or None where neither can be read (not Linux).
    """
    known = [
        value
        for value in (_meminfo_available(Path(meminfo)), _cgroup_headroom(Path(cgroup_root), Path(own_cgroup)))
        if value is not None
    ]
    return min(known) if known else None


def _amount(count: float) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def check_cache_fits(
    training: Sequence[Mapping[str, Any]],
    validation: Sequence[Mapping[str, Any]],
    input_mode: str,
    image_size: int,
    pixel_scale: float = 1.0,
    cache_rate: float = 1.0,
    processes: int | None = None,
    available: int | None = None,
) -> int:
    """Log what the training and validation caches will take, and refuse a ``cache_rate`` the machine cannot hold.

    ``CacheDataset`` caches the first ``int(len(data) * cache_rate)`` entries and reads the others from disk every
    epoch; every process of a ``torchrun`` run on this machine caches its own copy.

    Args:
        training: the training split's entries.
        validation: the validation split's entries.
        input_mode: the workflow's input mode.
        image_size: the network's side.
        pixel_scale: the scale of ``"sliding_window"``.
        cache_rate: the share of each split cached.
        processes: processes on this machine that cache the same splits; None reads ``LOCAL_WORLD_SIZE`` (torchrun),
            else 1.
        available: the memory the caches may use a share of; None: :func:`available_memory`.

    Returns:
        the bytes the caches take on this machine, all its processes together.

    Raises:
        ConfigError: ``cache_rate`` is not within [0, 1], or the caches would take over
            :data:`CACHE_SHARE_OF_AVAILABLE` of the available memory; the message gives the ``cache_rate`` that fits.
    """
    check_settings(cache_rate=cache_rate)
    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    sizes = [_entry_bytes(entries, input_mode, image_size, pixel_scale) for entries in (training, validation)]

    def needed_at(rate: float) -> int:
        # CacheDataset caches the first int(len(data) * cache_rate) entries of each split.
        return processes * sum(sum(split[: int(len(split) * rate)]) for split in sizes)

    cached = [int(len(split) * cache_rate) for split in sizes]
    needed = needed_at(cache_rate)
    if available is None:
        available = available_memory()
    whose = f" for the {processes} processes on this machine" if processes > 1 else ""
    logger.info(
        f"Caching {cached[0]} training and {cached[1]} validation photographs in memory (cache_rate "
        f"{cache_rate:g}): about {_amount(needed)}{whose}"
        + (f", of {_amount(available)} available." if available is not None else ".")
    )
    if available is not None and needed > CACHE_SHARE_OF_AVAILABLE * available:
        room = CACHE_SHARE_OF_AVAILABLE * available
        # The largest rate in steps of 0.05 that fits: photographs of different sizes are not cached evenly.
        fitting = next(step / 20 for step in range(math.floor(20 * cache_rate), -1, -1) if needed_at(step / 20) <= room)
        advice = (
            f"set --cache_rate {fitting:g} (the rest is read from disk every epoch)"
            if fitting > 0
            else "set --cache_rate 0 (every photograph is read from disk every epoch)"
        )
        raise ConfigError(
            f"Setting 'cache_rate' {cache_rate:g}: caching {cached[0]} training and {cached[1]} validation "
            f"photographs{whose} takes about {_amount(needed)}, more than {CACHE_SHARE_OF_AVAILABLE:.0%} of the "
            f"{_amount(available)} of memory available: {advice}, or use a machine with more memory."
        )
    return needed

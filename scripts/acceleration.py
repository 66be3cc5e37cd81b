"""Speed switches of the bundle that MONAI's engines do not offer themselves.

MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator`` already take ``amp``/``amp_kwargs`` (autocast dtype)
and ``compile``/``compile_kwargs`` (``torch.compile``); channels-last and activation checkpointing are network
arguments, and :class:`scripts.handlers.MergeAdapters` folds the adapters in for inference. This module adds TF32
matrix products, the share of the machine's cores a process may use (DataLoader workers, metric threads), and
the reuse of freed memory on Linux, and the one rule for the ``device`` setting (:func:`usable_device`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Any

import torch

from scripts.errors import ConfigError

__all__ = ["keep_freed_memory", "loader_workers", "set_tf32", "usable_cores", "usable_device"]

logger = logging.getLogger(__name__)

# The training loader's default number of workers where cores allow: on an NVIDIA H200 machine (16 cores) the
# bundle's trainer at Hiera-large, 1024 px sustained 8.65 images per second with 8 workers and 7.75 with 2, as
# each 1024 px sample's augmentation takes about 0.13 s of one core (docs/performance.md).
LOADER_WORKERS = 8


def usable_device(value: Any, setting: str = "Setting 'device'") -> torch.device:
    """The ``torch.device`` that a ``device`` setting names, refused in one line where torch cannot use it.

    The configs' default ``device`` is a ``torch.device``, but ``--device cpu`` on the command line (and
    ``device="cpu"`` from Python, or MONAI Label's train task) gives a string: the configs read the device through
    this function (``.type`` for AMP and pinned memory), so a name works as well as a ``torch.device``, and a GPU
    index beyond those torch sees is refused before anything is built rather than deep inside the first ``.to()``.

    Args:
        value: a ``torch.device``, or a name torch takes (``cpu``, ``cuda``, ``cuda:1``).
        setting: how the message names the setting.

    Returns:
        the device.

    Raises:
        ConfigError: ``value`` names no device, a device type other than CPU or CUDA, or a CUDA device torch does
            not see.
    """
    expected = "'cpu', 'cuda' or 'cuda:N' (N counting the GPUs torch sees from 0)"
    try:
        # Names and devices only: torch.device(1) would take a bare number for a CUDA index, more likely a slip.
        device = torch.device(value) if isinstance(value, (str, torch.device)) else None
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise ConfigError(f"{setting} must be {expected}; got {value!r}.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting} is {str(device)!r}, but torch sees no CUDA device: use 'cpu'.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{setting} is {str(device)!r}, but torch sees {count} CUDA device(s): cuda:0 to cuda:{count - 1}."
            )
    return device


def set_tf32(enabled: bool) -> None:
    """Let CUDA float32 matrix products and convolutions use TF32 tensor cores (Ampere and newer GPUs).

    TF32 keeps float32's range with a 10-bit mantissa, so outside autocast regions matrix products run several
    times faster for a relative error around 1e-3. CUDA only: CPU computations are not affected.

    Args:
        enabled: TF32 on (``True``) or full IEEE float32 (``False``).
    """
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def keep_freed_memory() -> bool:
    """Keep the memory a training step or an inference frees in the process for the next (glibc's ``malloc``, Linux).

    glibc hands every freed block above its mmap threshold straight back to the kernel, so each CPU training step
    gets its activations and gradients as fresh pages that the kernel must zero again: on a 2-core CPU that was a
    third of the quick start's step (1.5 of 4.7 s, system time). With memory mapping off and the heap's top kept
    (up to 2 GiB), freed blocks are reused: the step took 3.0 s, and inference at 1024 px ran 17-21% faster, for
    2-20% more peak memory (docs/performance.md). Training, inference and evaluation call it in their
    ``initialize``; MONAI Label's server, which builds the bundle's parts without it, keeps glibc's defaults.
    Elsewhere (macOS, Windows, musl) nothing changes.

    Returns:
        whether glibc took the settings.
    """
    library = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(library), "mallopt", None) if library else None
    if mallopt is None:
        return False
    # mallopt's parameter numbers from glibc's <malloc.h>; it returns 1 where it took a setting.
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    took = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    logger.debug("Freed memory %s in the process (glibc mallopt).", "stays" if took else "does not stay")
    return took


def usable_cores() -> int:
    """This process's share of the cores it may run on.

    Under ``torchrun`` every rank on a machine loads and scores its own images at the same time, so each takes its
    share (``LOCAL_WORLD_SIZE``, set by torchrun) instead of all of them.

    Returns:
        at least 1.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks_here = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, cores // int(ranks_here)) if ranks_here.isdigit() and int(ranks_here) > 0 else cores


def loader_workers(most: int = LOADER_WORKERS) -> int:
    """DataLoader workers for this process: one per usable core, at most ``most``.

    Args:
        most: the largest number returned.

    Returns:
        ``min(most, usable_cores())``.
    """
    return min(most, usable_cores())

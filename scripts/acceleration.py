"""Speed switches of the bundle that MONAI's engines do not offer themselves.

MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator`` already take ``amp``/``amp_kwargs`` (autocast dtype)
and ``compile``/``compile_kwargs`` (``torch.compile``); channels-last and activation checkpointing are network
arguments, and :class:`scripts.handlers.MergeAdapters` folds the adapters in for inference. This module adds TF32
matrix products, and the share of the machine's cores a process may use (DataLoader workers, metric threads).
"""

from __future__ import annotations

import os

import torch

__all__ = ["loader_workers", "set_tf32", "usable_cores"]

# The training loader's default number of workers where cores allow: on an NVIDIA H200 machine (16 cores) the
# bundle's trainer at Hiera-large, 1024 px sustained 8.65 images per second with 8 workers and 7.75 with 2, as
# each 1024 px sample's augmentation takes about 0.13 s of one core (docs/performance.md).
LOADER_WORKERS = 8


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

"""Speed switches of the bundle that MONAI's engines do not offer themselves.

MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator`` already take ``amp``/``amp_kwargs`` (autocast dtype)
and ``compile``/``compile_kwargs`` (``torch.compile``); channels-last and activation checkpointing are network
arguments, and :class:`scripts.handlers.MergeAdapters` folds the adapters in for inference. This module adds TF32
matrix products.
"""

from __future__ import annotations

import torch

__all__ = ["set_tf32"]


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

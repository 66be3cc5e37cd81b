"""Speed switches of the bundle that MONAI's engines do not offer themselves.

MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator`` already take ``amp``/``amp_kwargs`` (autocast dtype)
and ``compile``/``compile_kwargs`` (``torch.compile``); channels-last and activation checkpointing are
:class:`scripts.network.SAM2LoRA` arguments. This module adds TF32 matrix products and an ignite handler that
folds the LoRA adapters into the base weights for the length of an inference or evaluation run.
"""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events

from scripts.network import SAM2LoRA

__all__ = ["MergeAdapters", "set_tf32"]


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


class MergeAdapters:
    """Fold the adapters into the base weights when an engine starts and take them out again when it completes.

    While merged, every adapted layer costs what the plain SAM 2 layer costs (one matrix product, no low-rank
    path). Attach it after the handler that loads the checkpoint (``CheckpointLoader`` also acts on
    ``STARTED``; ignite calls handlers of one event in the order they were attached), so that the loaded
    adapters are the ones merged. Unmerging at the end leaves the network trainable again.

    Args:
        network: the adapted network the engine runs (not a ``torch.compile`` wrapper of it).
    """

    def __init__(self, network: SAM2LoRA) -> None:
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.merge)
        engine.add_event_handler(Events.COMPLETED, self.unmerge)

    def merge(self, engine: Engine) -> None:
        self.network.merge_adapters()

    def unmerge(self, engine: Engine) -> None:
        self.network.unmerge_adapters()

"""Folding LoRA adapters into the base weights for the length of an inference or evaluation run."""

from __future__ import annotations

from ignite.engine import Engine, Events
from torch import nn

__all__ = ["MergeAdapters"]


class MergeAdapters:
    """Fold the adapters into the base weights when an engine starts and take them out again when it completes.

    While merged, every adapted layer costs what the plain SAM 2 layer costs (one matrix product, no low-rank
    path). Attach it after the handler that loads the checkpoint (``CheckpointLoader`` also acts on
    ``STARTED``; ignite calls handlers of one event in the order they were attached), so that the loaded
    adapters are the ones merged. The network is put in evaluation mode for the run: MONAI's evaluators put a
    network found in training mode back into it after every iteration, and training mode unmerges the adapters
    (:meth:`scripts.adapters.AdaptedNetwork.train`). Unmerging at the end, in the mode it was found in, leaves the
    network trainable again.

    Args:
        network: the adapted network the engine runs (not a ``torch.compile`` wrapper of it); any network with
            ``merge_adapters`` and ``unmerge_adapters`` methods.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self._was_training = network.training

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.merge)
        engine.add_event_handler(Events.COMPLETED, self.unmerge)

    def merge(self, engine: Engine) -> None:
        self._was_training = self.network.training
        self.network.eval()
        self.network.merge_adapters()

    def unmerge(self, engine: Engine) -> None:
        self.network.unmerge_adapters()
        self.network.train(self._was_training)

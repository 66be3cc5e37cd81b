"""Rules of MONAI's engines that handlers, the inferer and the MLflow recorder need, written once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine
from monai.bundle import ReferenceResolver
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["all_ranks", "built", "count_parameters", "optimizer_steps_now", "stop_loader_workers", "unwrap_network"]


def optimizer_steps_now(engine: Engine, iteration: int | None = None) -> bool:
    """Whether MONAI's ``SupervisedTrainer`` steps the optimiser after the current iteration (or after ``iteration``).

    Its gradient-accumulation rule: with ``accumulation_steps`` k > 1 the optimiser steps after every k-th iteration
    of an epoch and after the epoch's last one, so no gradient is left pending at an epoch's end.

    Args:
        engine: the trainer, during or right after an iteration.
        iteration: another iteration of the run (counted from 1 over all epochs), e.g. the previous one.

    Returns:
        True when no gradient is pending after that iteration.
    """
    steps = getattr(engine, "accumulation_steps", 1)
    if steps <= 1:
        return True
    iteration = engine.state.iteration if iteration is None else iteration
    epoch_length = engine.state.epoch_length
    position = (iteration - 1) % epoch_length + 1 if epoch_length else iteration
    return position % steps == 0 or position == epoch_length


def unwrap_network(network: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (which adds ``module.`` keys)."""
    return network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network


def count_parameters(network: nn.Module) -> tuple[int, int]:
    """The numbers of trainable and of all parameters of a (possibly wrapped) network."""
    parameters = list(unwrap_network(network).parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def all_ranks(value: Any) -> list[Any]:
    """``value`` of every rank of a distributed run (just ``[value]`` outside one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def built(resolved: Mapping[str, Any], *ids: str) -> list[Any]:
    """The components ``ids`` that a bundle workflow has built so far, in that order; those it has not are left out.

    A config's ``finalize`` runs after a failed ``initialize`` too (a caller's ``try``/``finally``), and there a
    plain ``@id`` would build what was never taken: the whole cached training set to stop its loader workers, or
    the model file's reading again, raising its error a second time over the first. ``finalize`` passes MONAI's own
    record of what it built, ``__local_refs`` (the parser's resolved items, which every config expression sees;
    ``initialize`` starts it afresh), and releases only those:
    ``"$engines.stop_loader_workers(*engines.built(__local_refs, 'train#dataloader'))"``.

    Args:
        resolved: the workflow's resolved items by id (``__local_refs`` in a config expression).
        ids: config ids, e.g. ``train#dataloader``.

    Returns:
        The built components among ``ids``.
    """
    # MONAI keeps ids as "train::dataloader" (it rewrites a config's "#" so too, but not a caller's in Python).
    ids = tuple(ReferenceResolver.normalize_id(id) for id in ids)
    return [resolved[id] for id in ids if id in resolved]


def stop_loader_workers(*loaders: DataLoader) -> None:
    """Stop the persistent worker processes of ``loaders`` now, as a run's last step.

    Left to the interpreter's exit, torch 2.11 (among others) waits 5 s for each persistent worker of a loader with
    pinned memory, since its exit hook joins the workers without first telling them to stop (pytorch/pytorch#81794):
    16 workers made a finished training run on a GPU linger for 80 s. torch 2.14 stops them properly itself. The
    loader starts new workers if it is iterated again.

    Args:
        loaders: DataLoaders, iterated or not, with or without workers.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # where a DataLoader keeps its persistent workers
        if iterator is not None:
            loader._iterator = None
            iterator._shutdown_workers()

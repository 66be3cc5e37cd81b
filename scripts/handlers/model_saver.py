"""MONAI's ``CheckpointSaver`` writing ``model.pt`` and ``model_best.pt`` atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from scripts.atomic import save_torch_atomic

__all__ = ["AtomicCheckpointSaver"]


class _AtomicFileSaver(BaseSaveHandler):
    """Ignite save handler writing through :func:`scripts.atomic.save_torch_atomic`.

    With a fixed file name (``model_best.pt``) ignite's ``Checkpoint`` removes the previous best before saving the new
    one: the removal is skipped, since the atomic write replaces the file in one step, so a kill at any moment leaves
    either the previous best or the new one, whole.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None) -> None:
        self.dirname = Path(dirname)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        save_torch_atomic(dict(checkpoint), self.dirname / (self.filename or filename))

    def remove(self, filename: str) -> None:
        if self.filename is None:
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` whose files are written atomically, with the permissions of a plain file.

    MONAI's saver writes in place (``atomic=False``, because ignite's atomic mode leaves files readable by their owner
    only): a kill while a new best model is written truncates ``model_best.pt``. Same arguments as MONAI's.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        fixed_names = {
            "_final_checkpoint": kwargs.get("final_filename"),
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": None,
        }
        for attribute, filename in fixed_names.items():
            checkpoint = getattr(self, attribute)
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicFileSaver(save_dir, filename)

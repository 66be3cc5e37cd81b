"""Resumable training: one atomic checkpoint of everything a run needs to go on after a kill, and its loader.

The checkpoint (``latest_checkpoint.pt`` in the checkpoint folder) holds:

- the network's trainable state (LoRA adapters and any other parameter with ``requires_grad``, and the buffers, such
  as batch normalisation's running statistics, which training changes without a gradient) and a fingerprint of
  the frozen weights, which are not saved again: they come from the base checkpoint (or the seeded random init) and
  the fingerprint proves the resumed run rebuilt the same ones;
- the optimiser, the learning-rate scheduler, the AMP gradient scaler;
- the trainer's position (epoch, iteration, epoch length) and the best validation metric so far, so that
  ``model_best.pt`` is only replaced by a better model after a resume, and the identity of that ``model_best.pt``
  (size, modification time, SHA-256): one written after the checkpoint, by a validation whose checkpoint a kill
  prevented, has no recorded score, so a resume keeps it aside and saves a new best model;
- the run's settings, so that a resume with different hyper-parameters or data is refused instead of silently
  mixing two experiments; and any extra state registered by other components (the MLflow run id).

It is written every ``interval`` iterations (on iterations that close a gradient-accumulation window, so no
half-accumulated gradient is lost, and not on an epoch's last iteration), at the end of every epoch once its
validation is done and when training completes, always to a temporary file renamed over the previous checkpoint: a
kill during a write leaves the previous checkpoint intact, and a kill during a validation resumes before it, so the
validation (and the best model it may save) is done again.

A new run (``resume`` false) into folders that hold an earlier run keeps that run: :func:`keep_earlier_run` copies
its models, log and pictures into ``<ckpt_dir>/earlier_runs/<time>/`` before anything is overwritten.

Resuming mid-epoch follows ignite: the trainer restarts at the saved iteration and runs the epoch's remaining
iterations on a freshly shuffled pass of the training data, so iteration counts, the learning-rate schedule and the
epoch boundaries (validation, epoch checkpoints) are those of an uninterrupted run; the batches of the interrupted
epoch are not replayed exactly. A resumed run draws its random numbers (shuffling, crops, augmentations, prompts,
dropout) afresh, from the run's seed and the iteration it resumes at: seeded as at its start, it drew again the
first epochs' batches, so a job preempted every few epochs trained on those epochs over and over.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data.utils import set_rnd
from monai.handlers import CheckpointSaver
from monai.utils import set_determinism
from torch import nn

from scripts.adapters import CHECKPOINT_FORMAT
from scripts.atomic import file_sha256, hold_folder, move_aside, new_stamped_folder, release_folder, save_torch_atomic
from scripts.engines import optimizer_steps_now, unwrap_network
from scripts.errors import FundusError, unreadable_torch_file
from scripts.handlers.evaluation import keep_earlier_evaluation
from scripts.handlers.training_log import TrainingLog, first_iteration_time, read_training_log
from scripts.inputs import check_settings

__all__ = [
    "CHECKPOINT_FORMAT",
    "ResumeError",
    "TrainingCheckpoint",
    "claim_checkpoint_folder",
    "frozen_fingerprint",
    "keep_another_run_s_outputs",
    "keep_earlier_run",
    "release_checkpoint_folder",
    "require_checkpoint_to_resume",
    "resumable_state",
    "resumed_seed",
]

RESUME_CHOICES = ("false", "true", "auto")

# Settings a resumed run may change: training longer than first planned is a normal reason to resume.
CHANGEABLE_ON_RESUME = frozenset({"max_epochs", "max_training_minutes"})

# What a training run writes that a new run in the same folders would replace.
CHECKPOINT_FILE = "latest_checkpoint.pt"
EARLIER_RUN_MODELS = ("model.pt", "model_best.pt", CHECKPOINT_FILE)
EARLIER_RUN_OUTPUTS = ("training_log.jsonl", "training_curves.png", "validation_by_dataset.png", "overlays")

# The lock a training run holds on its checkpoint folder for as long as its process lives.
RUN_LOCK = ".training.lock"

logger = logging.getLogger(__name__)


class ResumeError(FundusError, ValueError):
    """A run cannot be resumed as asked; the message names the checkpoint or the setting and what is wrong."""


def frozen_fingerprint(network: nn.Module) -> str:
    """A digest of the names, shapes and values of the network's frozen parameters.

    Args:
        network: the network (unwrapped or wrapped by DistributedDataParallel).

    Returns:
        A hex digest; equal for two networks whose frozen weights are equal.
    """
    digest = hashlib.sha256()
    for name, parameter in unwrap_network(network).named_parameters():
        if parameter.requires_grad:
            continue
        values = parameter.detach().to("cpu", torch.float64)
        # Sums weighted by position catch permutations and sign flips that a plain sum would miss.
        weights = (
            torch.arange(1, values.numel() + 1, dtype=torch.float64).reshape(values.shape) if values.numel() else values
        )
        digest.update(
            f"{name}{tuple(values.shape)}{float(values.sum()):.10e}{float((values * weights).sum()):.10e}".encode()
        )
    return digest.hexdigest()


def resumable_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """What a resume restores of the network: its trainable parameters and its saved buffers (batch normalisation's
    running statistics move with training, though no gradient reaches them; the others are a few hundred numbers).

    Args:
        network: the network (unwrapped or wrapped by DistributedDataParallel).

    Returns:
        Those entries of the network's state dict, on the CPU.
    """
    network = unwrap_network(network)
    wanted = {name for name, parameter in network.named_parameters() if parameter.requires_grad}
    wanted |= {name for name, _ in network.named_buffers()}
    return {key: value.detach().cpu() for key, value in network.state_dict().items() if key in wanted}


def _parse_resume(resume: bool | str) -> str:
    text = str(resume).strip().lower()
    if text not in RESUME_CHOICES:
        raise ResumeError(f"Setting 'resume' must be one of {', '.join(RESUME_CHOICES)}; got {resume!r}.")
    return text


def _nothing_to_resume(path: Path) -> ResumeError:
    return ResumeError(
        f"Cannot resume: {path} does not exist (the checkpoint folder holds no resumable run; "
        "pass --resume auto to start afresh when there is none)."
    )


def require_checkpoint_to_resume(ckpt_dir: str | os.PathLike, resume: bool | str) -> None:
    """Refuse ``resume`` true where ``ckpt_dir`` holds no checkpoint, at start-up, before any folder is made.

    Args:
        ckpt_dir: the run's checkpoint folder.
        resume: the run's ``resume`` setting.

    Raises:
        ResumeError: ``resume`` is not a choice, or is true and there is no checkpoint to resume.
    """
    path = Path(ckpt_dir) / CHECKPOINT_FILE
    if _parse_resume(resume) == "true" and not path.is_file():
        raise _nothing_to_resume(path)


def resumed_seed(seed: int, iteration: int) -> int:
    """The seed of a run resumed at ``iteration`` (each resume of a run its own, the same for the same checkpoint).

    Args:
        seed: the run's seed.
        iteration: the iteration the run resumes after.

    Returns:
        A seed in ``[0, 2**32)``, as numpy takes it.
    """
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0])


class TrainingCheckpoint:
    """Ignite handler that keeps a resumable checkpoint of a training run and resumes from it when asked.

    Attach it to the trainer (list it in ``train#handlers``): the trainer adds itself to the checkpoint, which is why
    this handler, unlike MONAI's ``CheckpointSaver``, needs no reference to the trainer in the config.

    Args:
        checkpoint_dir: the folder of the checkpoint (the bundle's ``ckpt_dir``).
        network: the trained network (wrapped by DistributedDataParallel or not).
        optimizer: its optimiser.
        lr_scheduler: the learning-rate scheduler, stepped by the trainer's handlers.
        settings: the run's hyper-parameters and data description (plain values); a resume requires equal ones,
            except those of :data:`CHANGEABLE_ON_RESUME` (``max_epochs``, ``max_training_minutes``).
        resume: ``false`` starts afresh (an earlier run's files are kept by :func:`keep_earlier_run`),
            ``true`` resumes from the checkpoint and fails if there is none, ``auto`` resumes when there is one.
        interval: save every this many iterations (rounded to the next iteration that closes an accumulation
            window); 0 saves at epoch ends only.
        validator: the validation engine, whose best metric is kept across a resume.
        validate_handlers: the validator's handlers: the record of the best score of the ``CheckpointSaver`` among
            them that saves on the key metric (``model_best.pt``) is kept.
        filename: the checkpoint's file name.
        save: whether this process writes the checkpoint; by default only rank 0 of a distributed run does.
        seed: the run's seed (``set_determinism`` at start-up): a resumed run is seeded from it and the iteration it
            resumes at (:func:`resumed_seed`); None leaves the random state as it is.

    Raises:
        ConfigError: a bad ``interval`` (its rule: :data:`scripts.inputs.SETTING_RULES`).
        ResumeError: a bad ``resume`` value; at attach: ``resume=true`` without a checkpoint, an unreadable
            checkpoint, or one written with other settings or another base network.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any | None = None,
        settings: Mapping[str, Any] | None = None,
        resume: bool | str = False,
        interval: int = 0,
        validator: Engine | None = None,
        validate_handlers: Sequence[Any] | None = None,
        filename: str = CHECKPOINT_FILE,
        save: bool | None = None,
        seed: int | None = None,
    ) -> None:
        check_settings(checkpoint_interval=interval)  # also at start-up, before an earlier run is moved aside
        self.path = Path(checkpoint_dir) / filename
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.settings = _plain(dict(settings or {}))
        self.resume = _parse_resume(resume)
        self.interval = interval
        self.validator = validator
        # MONAI's CheckpointSaver offers load_state_dict for this record but no state_dict: its Checkpoint has both.
        self.best_model_savers = [
            handler._key_metric_checkpoint
            for handler in validate_handlers or []
            if isinstance(handler, CheckpointSaver) and getattr(handler, "_key_metric_checkpoint", None) is not None
        ]
        self.save_enabled = idist.get_rank() == 0 if save is None else save
        self.seed = seed
        self.extra_state: dict[str, Callable[[], Mapping[str, Any]]] = {}
        self.resumed: dict[str, Any] | None = None
        self._fingerprint = frozen_fingerprint(network)
        self._hashed: dict[Path, tuple[list[int], str]] = {}
        self._last_saved_iteration = -1
        self._start_iteration = 0

    def attach(self, engine: Engine) -> None:
        """Save on ``engine``'s iterations and epochs; load the checkpoint now (to fail early) and apply it at start."""
        self.resumed = self._read_resumable()
        if self.save_enabled:
            # Temporary files of writes cut short by a SIGKILL (the checkpoint itself is whole).
            for leftover in self.path.parent.glob(f".{self.path.name}.*"):
                leftover.unlink(missing_ok=True)
        engine.add_event_handler(Events.STARTED, self._apply_resume)
        if self.save_enabled:
            if self.interval:
                engine.add_event_handler(Events.ITERATION_COMPLETED, self._save_on_interval)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
            engine.add_event_handler(Events.COMPLETED, self.save)

    def register_state(self, name: str, provider: Callable[[], Mapping[str, Any]]) -> Mapping[str, Any] | None:
        """Save ``provider()`` under ``name`` in every checkpoint.

        Returns:
            What the resumed checkpoint holds under ``name`` (None when starting afresh).
        """
        self.extra_state[name] = provider
        return None if self.resumed is None else self.resumed.get("extra", {}).get(name)

    def resumed_log_started(self) -> float | None:
        """When the resumed run's first iteration ended, as its checkpoint records it (None: starting afresh, or a
        checkpoint of bundle 0.3.25 or earlier): what tells its ``training_log.jsonl`` from another run's."""
        return None if self.resumed is None else self.resumed.get("training_log", {}).get("started")

    def keep_another_run_s_log(self, log: TrainingLog) -> None:
        """Before a resumed run reads its log (its MLflow backfill, its first epoch): move another run's log and
        pictures out of the way (:func:`keep_another_run_s_outputs`)."""
        started = self.resumed_log_started()
        if self.save_enabled and started is not None:
            keep_another_run_s_outputs(log.output_dir, started)

    def state_dict(self, engine: Engine) -> dict[str, Any]:
        """Everything the checkpoint holds, for ``engine`` at its current iteration."""
        log = TrainingLog.attached_to(engine)
        content: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "settings": self.settings,
            "frozen_fingerprint": self._fingerprint,
            "network_trainable": resumable_state(self.network),
            "optimizer": self.optimizer.state_dict(),
            "trainer": engine.state_dict(),
            "extra": {name: dict(provider()) for name, provider in self.extra_state.items()},
        }
        if log is not None:
            content["training_log"] = {"started": first_iteration_time(log.records)}
        if self.lr_scheduler is not None:
            content["lr_scheduler"] = self.lr_scheduler.state_dict()
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            content["scaler"] = scaler.state_dict()
        if self.validator is not None:
            content["validator"] = {
                "best_metric": getattr(self.validator.state, "best_metric", None),
                "best_metric_epoch": getattr(self.validator.state, "best_metric_epoch", None),
            }
        content["best_model_savers"] = [saver.state_dict() for saver in self.best_model_savers]
        content["best_model_files"] = [
            self._identity(path) for path in self._best_model_paths([saver.state_dict() for saver in self.best_model_savers])
        ]
        return content

    def _best_model_paths(self, recorded: Sequence[Mapping[str, Any]]) -> list[Path | None]:
        """The best model file of each saver: its fixed name (``model_best.pt``), or the newest its record (ignite's
        ``{"_saved": [(priority, filename), ...]}``) names; None where it has neither."""
        paths: list[Path | None] = []
        for saver, state in zip(self.best_model_savers, recorded):
            saved = state.get("_saved") or []
            handler = saver.save_handler
            name = getattr(handler, "filename", None) or (saved[-1][1] if saved else None)
            paths.append(Path(handler.dirname) / name if name else None)
        return paths

    def _identity(self, path: Path | None) -> dict[str, Any] | None:
        """Size, modification time (ns) and SHA-256 of a best model file; None where there is none. The hash is
        computed once per new file (a best model is written far less often than the checkpoint)."""
        if path is None or not path.is_file():
            return None
        status = path.stat()
        stamp = [status.st_size, status.st_mtime_ns]
        known = self._hashed.get(path)
        if known is None or known[0] != stamp:
            known = (stamp, file_sha256(path))
            self._hashed[path] = known
        return {"size_mtime": stamp, "sha256": known[1]}

    def save(self, engine: Engine) -> None:
        """Write the checkpoint for ``engine``'s current iteration (once per iteration), atomically."""
        if engine.state.iteration == self._last_saved_iteration:
            return
        save_torch_atomic(self.state_dict(engine), self.path)
        self._last_saved_iteration = engine.state.iteration
        logger.info(
            f"Saved resumable checkpoint {self.path} (epoch {engine.state.epoch}, iteration {engine.state.iteration})."
        )

    def _save_on_interval(self, engine: Engine) -> None:
        since = engine.state.iteration - max(self._last_saved_iteration, self._start_iteration)
        # An epoch's last iteration is saved at EPOCH_COMPLETED, after the validation: saved before it, a resume
        # would count the epoch as done and skip the validation and the best model it may save.
        last_of_epoch = engine.state.iteration % engine.state.epoch_length == 0
        if since >= self.interval and optimizer_steps_now(engine) and not last_of_epoch:
            self.save(engine)

    def _read_resumable(self) -> dict[str, Any] | None:
        exists = self.path.is_file()
        if self.resume == "false":
            return None
        if not exists:
            if self.resume == "true":
                raise _nothing_to_resume(self.path)
            logger.info(f"No checkpoint {self.path} to resume from: starting afresh.")
            return None
        try:
            content = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds (pickle, zip, EOF...) for a damaged file
            reason = unreadable_torch_file(error)
            raise ResumeError(f"Cannot resume: checkpoint {self.path} cannot be read ({reason}).") from None
        self._check_compatible(content)
        return content

    def _check_compatible(self, content: Any) -> None:
        if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
            raise ResumeError(f"Cannot resume: {self.path} is not a training checkpoint of format {CHECKPOINT_FORMAT}.")
        saved = dict(content.get("settings", {}))
        if "lr_restart_iterations" in saved and "lr_restart_steps" not in saved:
            # 0.3.11 and earlier: the same setting, whose schedule counted micro-batches instead of optimiser steps
            saved["lr_restart_steps"] = saved.pop("lr_restart_iterations")
            logger.warning(
                f"Resuming from {self.path}, written by bundle 0.3.11 or earlier: its learning-rate schedule counted "
                "micro-batches, and goes on from the position it reached, now counting optimiser steps."
            )
        unrecorded = sorted(set(self.settings) - set(saved) - CHANGEABLE_ON_RESUME)
        if unrecorded:
            # Settings a later bundle records (0.3.14: amp_dtype, tf32, val_interval, window_overlap) cannot be
            # compared with an earlier checkpoint's: its run is taken to have used this run's values.
            logger.warning(
                f"Resuming from {self.path}, written by an earlier bundle that did not record {', '.join(unrecorded)}: "
                "the resumed run takes this run's values; make sure they are those the first part trained with."
            )
        differences = [
            f"{key}: checkpoint {saved.get(key)!r}, now {self.settings.get(key)!r}"
            for key in sorted(set(saved) | set(self.settings))
            if key not in CHANGEABLE_ON_RESUME and key not in unrecorded and saved.get(key) != self.settings.get(key)
        ]
        if differences:
            raise ResumeError(
                f"Cannot resume from {self.path}: it belongs to a run with other settings ({'; '.join(differences)}). "
                "Use the same settings, or start a new run in another --ckpt_dir (or with --resume false)."
            )
        if content.get("frozen_fingerprint") != self._fingerprint:
            raise ResumeError(
                f"Cannot resume from {self.path}: the frozen base weights differ from those the run was trained on "
                "(another base checkpoint, or another seed with random_init)."
            )

    def _best_model_is_whole(self, recorded: Sequence[Mapping[str, Any]], identities: Sequence[Any] | None) -> bool:
        """Whether every best model the interrupted run recorded as saved (``recorded``: its savers' states) is on
        disk, loads, and is the file the checkpoint describes (``identities``; None in checkpoints of 0.3.11 and
        earlier). Another file there, saved by a validation after the checkpoint, has no recorded score: it is kept
        aside as ``<name>.unrecorded-<time>.pt``. Only the process that writes the checkpoint looks (the other ranks
        of a distributed run share its folder)."""
        if not self.save_enabled:
            return True
        for index, path in enumerate(self._best_model_paths(recorded)):
            if path is None:
                continue
            if not (recorded[index].get("_saved") or []):
                if identities is not None and path.is_file():  # saved after a checkpoint that recorded no best
                    self._keep_aside(path)
                    return False
                continue
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # missing, truncated or damaged: torch raises many kinds
                logger.warning(
                    f"Resuming: the best model {path} recorded by the interrupted run cannot be loaded "
                    f"({type(error).__name__}); the next validation saves a new best model."
                )
                return False
            if identities is not None and not _same_file(self._identity(path), identities[index]):
                self._keep_aside(path)
                return False
        return True

    @staticmethod
    def _keep_aside(path: Path) -> None:
        aside = path.with_name(f"{path.stem}.unrecorded-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
        os.replace(path, aside)
        logger.warning(
            f"Resuming: {path} was saved after the checkpoint (by a validation of the interrupted run whose score "
            f"the checkpoint does not hold); kept as {aside}. The next validation saves a new best model."
        )

    def _draw_afresh(self, engine: Engine) -> None:
        """Seed torch, numpy and Python from the run's seed and the resumed iteration, and the training data's random
        transforms with it where they run in this process (``num_workers`` 0: MONAI's DataLoader seeded them when it
        was built, from the start-up seed); workers are seeded from torch when each epoch's pass begins."""
        if self.seed is None:
            return
        seed = resumed_seed(self.seed, engine.state.iteration)
        set_determinism(seed=seed)
        loader = engine.state.dataloader
        if getattr(loader, "num_workers", None) == 0 and hasattr(loader, "dataset"):
            set_rnd(loader.dataset, seed)
        logger.info(f"Resumed at iteration {engine.state.iteration}: random numbers drawn afresh (seed {seed}).")

    def _apply_resume(self, engine: Engine) -> None:
        if self.resumed is None:
            return
        log = TrainingLog.attached_to(engine)
        if log is not None:
            self.keep_another_run_s_log(log)
        content = self.resumed
        network = unwrap_network(self.network)
        saved, expected = set(content["network_trainable"]), set(resumable_state(network))
        buffers = {name for name, _ in network.named_buffers()}
        differing = saved ^ expected
        if differing - buffers:
            raise ResumeError(
                f"Cannot resume from {self.path}: trainable parameters differ ({sorted(differing - buffers)[:3]}...)."
            )
        if differing:  # a checkpoint of bundle 0.3.10 or earlier held the parameters alone
            logger.warning(
                f"Resuming from {self.path}: it lacks {len(differing)} buffers ({min(differing)}, ...), which keep "
                "this run's values (batch normalisation's running statistics restart from their initial values)."
            )
        if hasattr(network, "unmerge_adapters"):  # a network loaded merged: the saved adapters go on its base weights
            network.unmerge_adapters()
        network.load_state_dict(content["network_trainable"], strict=False)
        self.optimizer.load_state_dict(content["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in content:
            self.lr_scheduler.load_state_dict(content["lr_scheduler"])
        scaler = getattr(engine, "scaler", None)
        if "scaler" in content and scaler is not None:
            scaler.load_state_dict(content["scaler"])
        # This run's max_epochs wins over the checkpoint's: resuming is how a run is extended (or shortened).
        trainer_state = {**content["trainer"], "max_epochs": engine.state.max_epochs}
        if trainer_state["iteration"] > engine.state.max_epochs * trainer_state["epoch_length"]:
            raise ResumeError(
                f"Cannot resume from {self.path}: it is at iteration {trainer_state['iteration']}, beyond "
                f"max_epochs {engine.state.max_epochs}; raise --max_epochs to train on."
            )
        engine.load_state_dict(trainer_state)
        if self.validator is not None and "validator" in content:
            self.validator.state.best_metric = content["validator"]["best_metric"]
            self.validator.state.best_metric_epoch = content["validator"]["best_metric_epoch"]
        recorded = content.get("best_model_savers", [])
        if self._best_model_is_whole(recorded, content.get("best_model_files")):
            for saver, state in zip(self.best_model_savers, recorded):
                saver.load_state_dict(state)
        elif self.validator is not None:
            # Without the record of a best score, the next validation saves a new best model.
            self.validator.state.best_metric = -1
            self.validator.state.best_metric_epoch = -1
        self._start_iteration = self._last_saved_iteration = engine.state.iteration
        self._draw_afresh(engine)
        total = engine.state.max_epochs * engine.state.epoch_length
        if engine.state.iteration == total:
            logger.warning(
                f"Resumed from {self.path}: that run is complete ({engine.state.max_epochs} epochs, iteration "
                f"{total} of {total}), so nothing is left to train; raise --max_epochs to train on."
            )
            return
        logger.info(
            f"Resumed from {self.path}: epoch {engine.state.epoch + 1} goes on after iteration {engine.state.iteration} "
            f"of {total}."
        )


def _same_file(found: Mapping[str, Any] | None, recorded: Mapping[str, Any] | None) -> bool:
    """Whether a best model file is the one a checkpoint recorded: the same size and time, or, for a copy that did
    not keep times (``cp -r``, ``scp``), the same content."""
    if found is None or recorded is None:
        return found is recorded
    return found["size_mtime"] == recorded.get("size_mtime") or found["sha256"] == recorded.get("sha256")


def _plain(value: Any) -> Any:
    """Settings as plain JSON-like values (tuples as lists, paths as strings), comparable after a torch round trip."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def claim_checkpoint_folder(ckpt_dir: str | os.PathLike) -> None:
    """Hold the checkpoint folder for this training run, refusing a folder another running training holds.

    A second run into the folder of one still training (the same command started twice, a scheduler resubmitting a
    job that still runs) would move the first run's checkpoints aside and clear its temporary files mid-write: the
    first run then failed at its next save and ``--resume`` found nothing. The hold is an advisory lock
    (``flock``) on ``<ckpt_dir>/.training.lock``, which the kernel releases whenever the process ends, killed
    included, so no stale lock is left to clear; under torchrun, rank 0 holds it. Where ``fcntl`` is missing
    (Windows), nothing is held.

    Args:
        ckpt_dir: the run's checkpoint folder, existing (``inputs.writable_folder`` makes it).

    Raises:
        ResumeError: another process holds the folder; the message names it and what to do.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return
    holder = hold_folder(ckpt_dir, RUN_LOCK)
    if holder is not None:
        raise ResumeError(
            f"Checkpoint folder {Path(ckpt_dir).absolute()} is in use by a training run still going ({holder}): wait "
            "for it to end (or stop it, then --resume true to continue it), or give this run another --ckpt_dir."
        )


def release_checkpoint_folder(ckpt_dir: str | os.PathLike) -> None:
    """Let go of the folder :func:`claim_checkpoint_folder` held, at the end of a run whose process goes on (a run
    started from Python, MONAI Label's); a process that ends lets go by itself.

    Args:
        ckpt_dir: the run's checkpoint folder.
    """
    release_folder(ckpt_dir, RUN_LOCK)


def keep_another_run_s_outputs(output_dir: str | os.PathLike, started: float) -> Path | None:
    """Move another run's training log and pictures out of a resumed run's output folder.

    Runs with checkpoint folders of their own may share an output folder (``bundle/eval`` by default): resumed, a
    run took over the log another run had written there since, cut it at its own checkpoint's iteration and went on
    appending to it, with that run's first iterations (and its learning rates, sent to MLflow as the resumed run's
    history) in front of its own. A log is the resumed run's when its first iteration ended when the checkpoint says.

    Args:
        output_dir: the resumed run's output folder.
        started: when the resumed run's first iteration ended, as its checkpoint records it.

    Returns:
        The folder the other run's outputs went to, or None when the log there is the resumed run's (or missing).
    """
    output_dir = Path(output_dir)
    found_started = first_iteration_time(read_training_log(output_dir / TrainingLog.LOG_NAME))
    if found_started is None or found_started == started:
        return None
    found = [output_dir / name for name in EARLIER_RUN_OUTPUTS if (output_dir / name).exists()]
    target = move_aside(found, output_dir / "earlier_runs")
    logger.warning(
        f"{output_dir / TrainingLog.LOG_NAME} is another run's (its first iteration ended at "
        f"{_local_time(found_started)}, the resumed run's at {_local_time(started)}): it and its pictures "
        f"({', '.join(path.name for path in found)}) were moved to {target}; this run's log goes on without the "
        "iterations before its checkpoint."
    )
    return target


def _local_time(unix_time: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_time))


def keep_earlier_run(ckpt_dir: str | os.PathLike, output_dir: str | os.PathLike, resume: bool | str) -> Path | None:
    """Copy an earlier run's files aside before a new run (``resume`` false, or ``auto`` without a checkpoint to go
    on from) writes over them.

    ``model.pt`` stays where it is, since a fine-tuning run (MONAI Label's) starts from the model it replaces; the
    other files are removed once copied, so that none passes for the new run's: its ``model_best.pt`` before its
    first validation (which tracking would record and evaluation would read), its ``latest_checkpoint.pt`` before
    its first save (which ``--resume auto`` would continue), its pictures. An evaluation's reports in ``output_dir``
    are moved to ``earlier_evaluations/`` (:func:`keep_earlier_evaluation`) by a resumed run too: it changes the
    model they describe.

    Args:
        ckpt_dir: the run's checkpoint folder (``model.pt``, ``model_best.pt``, ``latest_checkpoint.pt``).
        output_dir: the run's output folder (the training log and pictures).
        resume: the run's ``resume`` setting; nothing is copied when the run resumes (``true``, or ``auto`` with a
            checkpoint in ``ckpt_dir``).

    Returns:
        The folder the earlier run was copied into, or None when there was none (or the run resumes).
    """
    # torchrun's RANK: this runs in the workflow's initialize, before the process group exists.
    ckpt_dir, output_dir = Path(ckpt_dir), Path(output_dir)
    mode = _parse_resume(resume)
    resumes = mode == "true" or (mode == "auto" and (ckpt_dir / CHECKPOINT_FILE).is_file())  # as the handler asks
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    # Training and evaluation share an output folder by default (the quick start's bundle/eval): left there, an
    # evaluation of the model this run replaces, or goes on training, would pass for the new model's.
    keep_earlier_evaluation(output_dir, reason="as this training run changes the model they describe")
    if resumes:
        return None
    found = [ckpt_dir / name for name in EARLIER_RUN_MODELS if (ckpt_dir / name).exists()]
    found += [output_dir / name for name in EARLIER_RUN_OUTPUTS if (output_dir / name).exists()]
    if not found:
        return None
    target = new_stamped_folder(ckpt_dir / "earlier_runs")
    for path in found:
        if path.is_dir():
            shutil.copytree(path, target / path.name, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target / path.name)
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.name != "model.pt":
            path.unlink()
    logger.warning(
        f"{ckpt_dir} and {output_dir} hold an earlier run; its files ({', '.join(p.name for p in found)}) were "
        f"copied to {target} before this new run replaces them (pass --resume true to continue that run instead)."
    )
    return target

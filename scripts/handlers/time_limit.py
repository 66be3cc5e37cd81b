"""A wall-clock budget for training: stop after so many minutes, keeping the models and checkpoints a run writes."""

from __future__ import annotations

import logging
import time

import ignite.distributed as idist
from ignite.engine import Engine, Events

from scripts.engines import optimizer_steps_now
from scripts.errors import ConfigError
from scripts.inputs import check_settings

__all__ = ["TrainingTimeLimit"]

logger = logging.getLogger(__name__)


class TrainingTimeLimit:
    """Terminate training once ``minutes`` have passed since its run started.

    The trainer stops after the first iteration past the limit that completes a gradient-accumulation window (no
    accumulated gradient is dropped) and completes as usual: ``model.pt`` is written, ``model_best.pt`` holds the
    best validation so far, and ``--resume true`` goes on with a budget of its own. At an epoch's last iteration
    the check waits for the epoch's end, after its validation and checkpoint: ignite skips the epoch-end handlers
    of a run terminated during an iteration, so stopping there would lose that epoch's validation for good (its
    checkpoint would mark the epoch done). Under torchrun the ranks stop together: the decision is the same on all
    of them (any rank over the limit), since a rank that stops alone leaves the others waiting in their next
    gradient exchange.

    Args:
        minutes: the budget, in minutes of wall-clock time (validations included).
    """

    def __init__(self, minutes: float) -> None:
        if minutes is None:
            raise ConfigError("TrainingTimeLimit takes a number of minutes; leave it out for no limit.")
        check_settings(max_training_minutes=minutes)  # also at start-up, before an earlier run is moved aside
        self.limit_seconds = 60.0 * minutes
        self.started: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check)

    def _start(self, engine: Engine) -> None:
        self.started = time.monotonic()

    def _check(self, engine: Engine) -> None:
        state = engine.state
        during_epoch = engine.last_event_name == Events.ITERATION_COMPLETED
        if during_epoch and (state.iteration % state.epoch_length == 0 or not optimizer_steps_now(engine)):
            return
        over = int(time.monotonic() - self.started > self.limit_seconds)
        if idist.get_world_size() > 1:
            over = int(idist.all_reduce(over, op="MAX"))
        if over:
            logger.info(
                f"Reached the time limit of {self.limit_seconds / 60:g} minutes: training stops at epoch "
                f"{state.epoch}, iteration {state.iteration}."
            )
            engine.terminate()

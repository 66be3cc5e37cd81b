"""The learning-rate schedule stepped once per optimiser step, aware of MONAI's gradient accumulation."""

from __future__ import annotations

from ignite.engine import Engine, Events
from torch.optim.lr_scheduler import LRScheduler

from scripts.engines import optimizer_steps_now

__all__ = ["LrSchedulePerOptimizerStep"]


class LrSchedulePerOptimizerStep:
    """Step ``lr_scheduler`` once per optimiser step, as the iteration after that step starts.

    MONAI's ``LrScheduleHandler`` steps the scheduler after every iteration: with ``accumulation_steps`` k it would
    count micro-batches, so a schedule of T steps would run k times faster than the updates it schedules, and three
    of every four values (k = 4) would never reach an update. Stepping as the next iteration starts also leaves the
    learning rate an iteration ran with in the optimiser until that iteration's end, where the training log and
    MLflow read it. A checkpoint written at an iteration's end holds the schedule before its pending step, which the
    resumed run's first iteration then takes.

    Args:
        lr_scheduler: any PyTorch learning-rate scheduler stepped without arguments, counting optimiser steps.
    """

    def __init__(self, lr_scheduler: LRScheduler) -> None:
        self.lr_scheduler = lr_scheduler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        previous = engine.state.iteration - 1
        if previous >= 1 and optimizer_steps_now(engine, previous):
            self.lr_scheduler.step()

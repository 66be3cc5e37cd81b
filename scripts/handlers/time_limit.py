"""A wall-clock budget for training: stop after so many minutes, keeping the models and checkpoints a run writes."""

from __future__ import annotations

from ignite.engine import Engine, Events
from ignite.handlers import TimeLimit

from scripts.errors import ConfigError, is_real_number

__all__ = ["TrainingTimeLimit"]


class TrainingTimeLimit:
    """Terminate training once ``minutes`` have passed since it started (ignite's ``TimeLimit``, attachable).

    The trainer stops after the iteration that crosses the limit and completes as usual: ``model.pt`` is written,
    ``model_best.pt`` holds the best validation so far, and ``--resume true`` with a larger budget goes on.

    Args:
        minutes: the budget, in minutes of wall-clock time (validations included).
    """

    def __init__(self, minutes: float) -> None:
        if not (is_real_number(minutes) and minutes > 0):
            raise ConfigError(
                f"Setting 'max_training_minutes' must be positive (or null for no limit); got {minutes!r}."
            )
        self.limit = TimeLimit(limit_sec=int(minutes * 60))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.limit)

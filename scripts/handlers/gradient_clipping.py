"""Gradient clipping for MONAI's ``SupervisedTrainer``, aware of its gradient accumulation."""

from __future__ import annotations

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from scripts.engines import optimizer_steps_now
from scripts.inputs import check_settings

__all__ = ["GradientClipping"]


class GradientClipping:
    """Clip the gradient norm of the optimised parameters right before each optimiser step.

    Runs on MONAI's ``BACKWARD_COMPLETED`` event. With gradient accumulation it acts only on the micro-batch
    whose backward pass completes an accumulation window, so the clipped norm is that of the summed gradient.
    With mixed precision it unscales the gradients first (``GradScaler.step`` then skips its own unscaling).

    Args:
        max_norm: largest allowed total L2 norm (the SAM2LoRA paper uses 1.0).
    """

    def __init__(self, max_norm: float = 1.0) -> None:
        check_settings(gradient_clip_norm=max_norm)  # also at start-up, before an earlier run is moved aside
        self.max_norm = max_norm

    def attach(self, engine: SupervisedTrainer) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: SupervisedTrainer) -> None:
        if not optimizer_steps_now(engine):
            return
        if engine.amp and engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        parameters = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        engine.state.metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(parameters, self.max_norm))

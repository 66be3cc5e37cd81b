from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from torch import nn

from scripts.handlers import GradientClipping


def run_trainer(accumulation_steps: int, max_norm: float, iterations: int = 4):
    torch.manual_seed(0)
    network = nn.Linear(4, 1)
    optimiser = torch.optim.SGD(network.parameters(), lr=0.0)  # lr 0: the weights stay, only gradients matter
    data = [{"image": torch.randn(2, 4) * 100, "label": torch.randn(2, 1)} for _ in range(iterations)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=network,
        optimizer=optimiser,
        loss_function=nn.MSELoss(),
        accumulation_steps=accumulation_steps,
    )
    norms: list[float] = []
    clipping = GradientClipping(max_norm)
    clipping.attach(trainer)
    # after the clipping handler: what the optimiser step will see
    trainer.add_event_handler(
        IterationEvents.BACKWARD_COMPLETED,
        lambda engine: norms.append(float(torch.cat([p.grad.flatten() for p in network.parameters()]).norm())),
    )
    trainer.run()
    return norms


def test_clips_the_gradient_norm_before_each_step():
    unclipped = run_trainer(accumulation_steps=1, max_norm=1e9)
    clipped = run_trainer(accumulation_steps=1, max_norm=1.0)
    assert min(unclipped) > 10, "the data makes large gradients"
    assert all(norm == pytest.approx(1.0, rel=1e-4) for norm in clipped)


def test_with_accumulation_only_the_summed_gradient_is_clipped():
    norms = run_trainer(accumulation_steps=2, max_norm=1.0)
    # micro-batches 1 and 3 only accumulate (no step follows): their partial sums are left alone
    assert norms[0] > 10 and norms[2] > 10
    assert norms[1] == pytest.approx(1.0, rel=1e-4) and norms[3] == pytest.approx(1.0, rel=1e-4)


def test_max_norm_must_be_positive():
    with pytest.raises(ValueError, match="max_norm"):
        GradientClipping(0)

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from torch import nn

from scripts.handlers import (
    GradientClipping,
    LrSchedulePerOptimizerStep,
    TrainingLog,
    TrainingPictures,
    read_training_log,
    training_throughput,
)


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
    with pytest.raises(ValueError, match="gradient_clip_norm"):
        GradientClipping(0)


def test_the_learning_rate_schedule_counts_optimiser_steps_and_the_logged_rate_is_the_one_used():
    """Accumulation 4 over epochs of 6 iterations: the optimiser steps after iterations 4, 6 (the epoch's end), 10
    and 12. A cosine schedule restarting every 2 steps (no floor) gives those steps 1, 1/2, 1, 1/2."""
    network = nn.Linear(4, 1)
    optimiser = torch.optim.SGD(network.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimiser, T_0=2)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=[{"image": torch.randn(2, 4), "label": torch.randn(2, 1)} for _ in range(6)],
        network=network,
        optimizer=optimiser,
        loss_function=nn.MSELoss(),
        accumulation_steps=4,
        train_handlers=[LrSchedulePerOptimizerStep(schedule)],
    )
    stepped: dict[int, float] = {}
    original_step = optimiser.step
    optimiser.step = lambda *args, **kwargs: (  # type: ignore[method-assign]
        stepped.__setitem__(trainer.state.iteration, optimiser.param_groups[0]["lr"]), original_step(*args, **kwargs)
    )
    logged: dict[int, float] = {}  # read at each iteration's end, where the training log and MLflow read it
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda engine: logged.__setitem__(engine.state.iteration, optimiser.param_groups[0]["lr"])
    )
    trainer.run()
    assert stepped == pytest.approx({4: 1.0, 6: 0.5, 10: 1.0, 12: 0.5})
    assert all(logged[iteration] == lr for iteration, lr in stepped.items())
    assert schedule.last_epoch == 3, "the step after the run's last update is the next run's (or resume's) first"


class Clock:
    """A clock that moves only when told, standing in for the ``time`` module the training log reads."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def time(self) -> float:
        return self.now

    perf_counter = time


class SlowBatches:
    """Batches of ``batch`` images that take ``seconds`` of ``clock`` each to load, like a DataLoader that starves
    the step (whose own time, for a 4-weight network, the clock leaves at zero)."""

    def __init__(self, batches: int, batch: int, seconds: float, clock: Clock) -> None:
        self.batches, self.batch, self.seconds, self.clock = batches, batch, seconds, clock

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for _ in range(self.batches):
            self.clock.now += self.seconds
            yield {"image": torch.randn(self.batch, 4), "label": torch.randn(self.batch, 1)}


def test_the_training_log_gives_the_images_per_second_the_trainer_sustained(tmp_path, caplog, monkeypatch):
    clock = Clock()
    monkeypatch.setattr("scripts.handlers.training_log.time", clock)
    network = nn.Linear(4, 1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=3,
        train_data_loader=SlowBatches(batches=4, batch=3, seconds=0.05, clock=clock),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.01),
        loss_function=nn.MSELoss(),
    )
    TrainingLog(tmp_path).attach(trainer)
    with caplog.at_level(logging.INFO, logger="scripts.handlers.training_log"):
        trainer.run()

    records = read_training_log(tmp_path / TrainingLog.LOG_NAME)
    assert [r["images"] for r in records] == [3] * 12
    figures = training_throughput(records)
    # Epoch 1 left out; in epochs 2 and 3 the three iterations after the first, each waiting 0.05 s for its batch:
    # 18 images in 0.3 s, all of it waiting.
    assert figures["epochs"] == 2 and figures["images"] == 2 * 3 * 3
    assert figures["seconds"] == pytest.approx(2 * 3 * 0.05)
    assert figures["images_per_second"] == pytest.approx(18 / 0.3)
    assert all(r["data_seconds"] == pytest.approx(0.05) for r in records)
    assert figures["data_seconds"] == pytest.approx(2 * 3 * 0.05) and figures["data_fraction"] == pytest.approx(1.0)
    # The run ends by saying so in its log.
    assert "Training sustained 60.00 images per second over 2 epochs" in caplog.text
    assert "100% of it waiting for batches" in caplog.text
    # Logs without times (written before they were recorded) or one epoch long give no figure.
    assert training_throughput([{k: v for k, v in r.items() if k != "time"} for r in records]) is None
    without_waits = [{k: v for k, v in r.items() if k != "data_seconds"} for r in records]
    assert "data_fraction" not in training_throughput(without_waits)
    assert training_throughput([r for r in records if r["epoch"] == 1]) is None


@pytest.mark.parametrize("validations", [0, 1])
def test_a_run_that_ends_before_its_first_validation_says_what_it_did_not_write(tmp_path, caplog, validations):
    """A time limit stopped the quick start's recipe before its first validation: no model_best.pt, no curves, and
    no word of it in the log."""
    from ignite.engine import Engine

    network = nn.Linear(4, 1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=[{"image": torch.randn(2, 4), "label": torch.randn(2, 1)}] * 3,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.01),
        loss_function=nn.MSELoss(),
    )
    validator = Engine(lambda engine, batch: [{"pred": torch.ones(1, 4, 4), "label": torch.ones(1, 4, 4)}])
    TrainingLog(tmp_path, validator=validator).attach(trainer)
    if validations:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda _: validator.run([[{"dataset": "d"}]]))
    with caplog.at_level(logging.WARNING, logger="scripts.handlers.training_log"):
        trainer.run()
    warned = [r.getMessage() for r in caplog.records if "before its first validation" in r.getMessage()]
    if validations:
        assert not warned
    else:
        assert warned == [
            (
                "Training ended at epoch 2, iteration 6, before its first validation: no model_best.pt, training "
                "curves or validation overlays were written. Give it more time (max_training_minutes) or validate "
                "more often (val_interval)."
            )
        ]


def test_stop_loader_workers_ends_the_persistent_workers_and_the_loader_still_works():
    from torch.utils.data import DataLoader

    from scripts.engines import stop_loader_workers

    loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
    unused = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
    assert [len(batch) for batch in loader] == [2, 2, 2, 2]
    workers = list(loader._iterator._workers)
    assert all(worker.is_alive() for worker in workers)

    stop_loader_workers(loader, unused)

    assert not any(worker.is_alive() for worker in workers)
    assert loader._iterator is None
    assert sorted(int(value) for batch in loader for value in batch) == list(range(8))
    stop_loader_workers(loader)


@pytest.mark.parametrize(
    ("crossed_at", "stopped_at", "epochs_ended"),
    [(2, 2, []), (3, 3, [1]), (4, 4, [1])],
    ids=["mid-epoch", "an epoch's last iteration", "the next epoch's first"],
)
def test_the_time_limit_never_skips_the_end_of_the_epoch_it_stops_in(monkeypatch, crossed_at, stopped_at, epochs_ended):
    """Crossed during an epoch's last iteration, the limit stops training at the epoch's end, after its handlers
    (validation, checkpoint), which ignite would skip for a run terminated during the iteration."""
    from ignite.engine import Engine

    from scripts.handlers import TrainingTimeLimit

    clock = {"now": 0.0}
    monkeypatch.setattr("scripts.handlers.time_limit.time.monotonic", lambda: clock["now"])
    engine = Engine(lambda engine, batch: clock.update(now=60.0 * engine.state.iteration))
    TrainingTimeLimit(minutes=crossed_at - 0.5).attach(engine)
    ended, completed = [], []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: ended.append(e.state.epoch))
    engine.add_event_handler(Events.COMPLETED, lambda e: completed.append(e.state.iteration))
    engine.run(range(3), max_epochs=5)
    assert (engine.state.iteration, ended, completed) == (stopped_at, epochs_ended, [stopped_at])


def test_the_time_limit_stops_at_the_end_of_a_gradient_accumulation_window(monkeypatch):
    from ignite.engine import Engine

    from scripts.handlers import TrainingTimeLimit

    clock = {"now": 0.0}
    monkeypatch.setattr("scripts.handlers.time_limit.time.monotonic", lambda: clock["now"])
    engine = Engine(lambda engine, batch: clock.update(now=60.0 * engine.state.iteration))
    engine.accumulation_steps = 4  # as MONAI's SupervisedTrainer holds it
    TrainingTimeLimit(minutes=4.5).attach(engine)  # crossed at iteration 5, in the second window of an epoch of 10
    engine.run(range(10), max_epochs=2)
    assert engine.state.iteration == 8


def test_a_time_limit_under_a_second_is_a_limit_not_an_error(monkeypatch):
    from ignite.engine import Engine

    from scripts.handlers import TrainingTimeLimit

    clock = {"now": 0.0}
    monkeypatch.setattr("scripts.handlers.time_limit.time.monotonic", lambda: clock["now"])
    engine = Engine(lambda engine, batch: clock.update(now=0.02 * engine.state.iteration))  # 20 ms an iteration
    TrainingTimeLimit(minutes=0.0005).attach(engine)  # 30 ms: crossed in the second iteration
    engine.run(range(100), max_epochs=1)
    assert engine.state.iteration == 2


def test_validation_overlays_of_images_with_the_same_name_keep_their_own_files():
    """Two pooled clinics both number their photographs 001.jpg: neither overlay replaces the other."""
    pictures = TrainingPictures(overlay_count=4)
    pictures._reset(None)
    sources, outputs = [], []
    for dataset, folder in (("clinicA", "a"), ("clinicB", "b"), ("clinicB", "c")):
        image = MetaTensor(torch.zeros(3, 8, 8), meta={"filename_or_obj": f"/data/{folder}/001.jpg"})
        sources.append({"image": image, "dataset": dataset})
        outputs.append({"image": torch.zeros(3, 8, 8), "pred": torch.ones(1, 8, 8), "label": torch.zeros(1, 8, 8)})
    pictures._collect_overlays(SimpleNamespace(state=SimpleNamespace(batch=sources, output=outputs)))
    assert [name for name, _ in pictures._overlays] == ["001", "clinicB_001", "001_2"]

"""Resumable training: exact state round trip, atomic writes under SIGKILL, and a real run killed and resumed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import torch
from ignite.engine import Events
from ignite.metrics import MeanAbsoluteError
from monai.bundle import run as monai_run
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MLFlowHandler, ValidationHandler, from_engine
from torch import nn

from scripts.adapters import AdaptedNetwork
from scripts.atomic import save_torch_atomic
from scripts.handlers import (
    AtomicCheckpointSaver,
    LrSchedulePerOptimizerStep,
    ResumeError,
    TrainingCheckpoint,
    TrainingLog,
    read_training_log,
)
from scripts.handlers.checkpoint import CHECKPOINT_FORMAT
from scripts.lora import LoRALinear
from scripts.synthetic import write_dataset
from scripts.tracking import MLflowRecorder
from tests.helpers import (
    BUNDLE,
    FAST,
    META,
    QUICKSTART,
    TRAIN,
    bundle_command,
    fail_message,
    held_by_another_process,
    run_in_process,
)
from tests.preloaded import preloaded_python

REPO = Path(__file__).resolve().parents[1]


class _Frozen(nn.Module):
    """A frozen layer, then a trainable one with batch normalisation: the shape of a LoRA-adapted U-Net."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 4)
        self.base.requires_grad_(False)
        self.norm = nn.BatchNorm1d(4, affine=False)
        self.adapter = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.norm(torch.relu(self.base(x))))


class _Adapted(AdaptedNetwork, _Frozen):
    """:class:`_Frozen` whose frozen layer carries a LoRA adapter, with the bundle's merge and unmerge."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = {}
        self.base = LoRALinear.from_linear(self.base, rank=2, alpha=4)
        with torch.no_grad():
            self.base.lora_B.normal_()  # an adapter that changes the function, so that merging shows


def _trainer(checkpoint_dir: Path, resume: str, seed: int, max_epochs: int = 3, validate: bool = False,
             accumulation_steps: int = 1, settings: dict | None = None, network_class: type = _Frozen,
             **kwargs) -> tuple:
    """A small trainer with the bundle's checkpoint; ``validate``: validated after every epoch, the best model saved
    to ``model_best.pt`` as train.json does (the checkpoint's ``validator``)."""
    torch.manual_seed(seed)
    network = network_class()
    if seed != 0:  # the same frozen base as the first run, as a rebuilt SAM 2 base would be
        torch.manual_seed(0)
        network.base.load_state_dict(network_class().base.state_dict())
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=3)
    data = [{"image": torch.randn(2, 4), "label": torch.randn(2, 1)} for _ in range(5)]
    handlers = [LrSchedulePerOptimizerStep(scheduler)]
    if validate:
        generator = torch.Generator().manual_seed(7)
        validation = [{"image": torch.randn(2, 4, generator=generator), "label": torch.randn(2, 1, generator=generator)}
                      for _ in range(2)]
        score = MeanAbsoluteError(output_transform=lambda output: (output["pred"], output["label"]))
        validator = SupervisedEvaluator(torch.device("cpu"), validation, network, key_val_metric={"score": score},
                                        decollate=False)
        best_model = AtomicCheckpointSaver(str(checkpoint_dir), {"model": network}, save_key_metric=True,
                                           key_metric_filename="model_best.pt")
        best_model.attach(validator)
        handlers.append(ValidationHandler(interval=1, validator=validator))
        kwargs.update(validator=validator, validate_handlers=[best_model])
    checkpoint = TrainingCheckpoint(
        checkpoint_dir,
        network,
        optimizer,
        scheduler,
        settings={"lr": 0.1, "max_epochs": max_epochs, **(settings or {})},
        resume=resume,
        **kwargs,
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=data,
        network=network,
        optimizer=optimizer,
        loss_function=nn.MSELoss(),
        train_handlers=[*handlers, checkpoint],
        accumulation_steps=accumulation_steps,
    )
    return trainer, network, optimizer, scheduler, checkpoint


def test_resume_restores_the_trainable_state_optimiser_scheduler_and_position(tmp_path):
    trainer, *_ = _trainer(tmp_path, "false", seed=0, interval=2)

    def crash(engine):
        if engine.state.iteration == 8:
            raise RuntimeError("crash in iteration 8")

    trainer.add_event_handler(Events.ITERATION_STARTED, crash)
    with pytest.raises(RuntimeError, match="crash in iteration 8"):
        trainer.run()
    saved = torch.load(tmp_path / "latest_checkpoint.pt", weights_only=True)
    assert saved["format"] == CHECKPOINT_FORMAT
    # Saved at 2, 4, the end of epoch 1 (5), then 2 iterations later: 7, in the middle of epoch 2.
    assert saved["trainer"]["iteration"] == 7
    running = {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    assert set(saved["network_trainable"]) == {"adapter.weight", "adapter.bias", *running}, "frozen ones are not saved"
    assert saved["network_trainable"]["norm.num_batches_tracked"] == 7

    resumed, network2, optimizer2, _, _ = _trainer(tmp_path, "true", seed=123, interval=2)
    seen = {}
    resumed.add_event_handler(Events.ITERATION_STARTED, lambda engine: seen.setdefault("first", engine.state.iteration))

    def capture(engine):
        seen["adapter"] = network2.adapter.weight.detach().clone()
        seen["running_var"] = network2.norm.running_var.detach().clone()
        seen["lr"] = optimizer2.param_groups[0]["lr"]
        seen["step"] = optimizer2.state_dict()["state"][0]["step"].item()
        seen["epoch"] = engine.state.epoch

    resumed.add_event_handler(Events.STARTED, capture)
    resumed.run()
    assert torch.equal(seen["adapter"], saved["network_trainable"]["adapter.weight"])
    assert torch.equal(seen["running_var"], saved["network_trainable"]["norm.running_var"]), "statistics go on too"
    assert seen["step"] == 7 and seen["lr"] == pytest.approx(saved["lr_scheduler"]["_last_lr"][0])
    assert seen["epoch"] == 1 and seen["first"] == 8, "goes on with iteration 8, the third of epoch 2"
    assert resumed.state.iteration == 15 and resumed.state.epoch == 3


def test_the_learning_rate_goes_on_across_a_resume_as_without_one(tmp_path):
    """Accumulation 2 over epochs of 5 iterations (updates after iterations 2, 4, 5, 7, 9, 10, ...): a run killed
    after a checkpoint mid-epoch and resumed uses, iteration by iteration, the learning rates of a run never
    killed (the pending schedule step is taken once, by the resumed run's first iteration)."""
    def rates(trainer, optimizer) -> dict[int, float]:
        used: dict[int, float] = {}
        trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                  lambda engine: used.__setitem__(engine.state.iteration, optimizer.param_groups[0]["lr"]))
        return used

    whole, _, optimizer, *_ = _trainer(tmp_path / "whole", "false", seed=0, accumulation_steps=2)
    expected = rates(whole, optimizer)
    whole.run()

    killed, _, optimizer, *_ = _trainer(tmp_path / "killed", "false", seed=0, accumulation_steps=2, interval=2)
    first = rates(killed, optimizer)

    def kill(engine):
        if engine.state.iteration == 9:
            raise RuntimeError("killed in iteration 9")

    killed.add_event_handler(Events.ITERATION_STARTED, kill)
    with pytest.raises(RuntimeError, match="killed in iteration 9"):
        killed.run()
    assert torch.load(tmp_path / "killed" / "latest_checkpoint.pt", weights_only=True)["trainer"]["iteration"] == 7
    resumed, _, optimizer, *_ = _trainer(tmp_path / "killed", "true", seed=1, accumulation_steps=2, interval=2)
    second = rates(resumed, optimizer)
    resumed.run()
    assert len(set(expected.values())) == 3, "the schedule (3 steps a cycle) moves over the run"
    assert {**{i: lr for i, lr in first.items() if i <= 7}, **second} == pytest.approx(expected)


def test_a_network_loaded_with_its_adapters_merged_resumes_onto_its_base_weights(tmp_path):
    trainer, network, *_ = _trainer(tmp_path, "false", seed=0, max_epochs=1, network_class=_Adapted)
    base_weight = network.base.weight.detach().clone()
    trainer.run()
    saved = torch.load(tmp_path / "latest_checkpoint.pt", weights_only=True)["network_trainable"]
    assert {"base.lora_A", "base.lora_B", "base.lora_merged"} <= set(saved)

    resumed, network2, *_ = _trainer(tmp_path, "true", seed=123, max_epochs=2, network_class=_Adapted)
    with torch.no_grad():  # a model file saved merged (tools.export --weights merged), loaded to go on training
        network2.base.lora_B.normal_()
    network2.merge_adapters()
    seen = {}

    def capture(engine):
        seen["weight"] = network2.base.weight.detach().clone()
        seen["lora_B"] = network2.base.lora_B.detach().clone()
        seen["merged"] = network2.base.merged

    resumed.add_event_handler(Events.STARTED, capture)
    resumed.run()
    assert torch.allclose(seen["weight"], base_weight, atol=1e-6), "the merged adapter is taken off the base first"
    assert torch.equal(seen["lora_B"], saved["base.lora_B"]) and not seen["merged"]


def test_a_checkpoint_of_0_3_11_resumes_its_learning_rate_schedule_with_a_warning(tmp_path, caplog):
    """0.3.11 named the schedule's period lr_restart_iterations (it counted micro-batches)."""
    trainer, *_ = _trainer(tmp_path, "false", seed=0, max_epochs=1, settings={"lr_restart_steps": 3})
    trainer.run()
    path = tmp_path / "latest_checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    saved["settings"]["lr_restart_iterations"] = saved["settings"].pop("lr_restart_steps")
    torch.save(saved, path)
    resumed, *_ = _trainer(tmp_path, "true", seed=1, max_epochs=2, settings={"lr_restart_steps": 3})
    with caplog.at_level(logging.WARNING):
        resumed.run()
    assert "written by bundle 0.3.11 or earlier: its learning-rate schedule counted micro-batches" in caplog.text
    assert resumed.state.epoch == 2
    saved["settings"]["lr_restart_iterations"] = 4  # another period is another run
    torch.save(saved, path)
    with pytest.raises(ResumeError, match="lr_restart_steps: checkpoint 4, now 3"):
        _trainer(tmp_path, "true", seed=1, max_epochs=2, settings={"lr_restart_steps": 3})


def test_settings_an_earlier_checkpoint_did_not_record_are_taken_from_this_run_with_a_warning(tmp_path, caplog):
    """0.3.14 records amp_dtype, tf32, val_interval and window_overlap; a checkpoint of 0.3.13 has none of them."""
    settings = {"lr_restart_steps": 3, "amp_dtype": "bfloat16", "val_interval": 1}
    trainer, *_ = _trainer(tmp_path, "false", seed=0, max_epochs=1, settings=settings)
    trainer.run()
    path = tmp_path / "latest_checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    for key in ("amp_dtype", "val_interval"):
        del saved["settings"][key]
    torch.save(saved, path)
    resumed, *_ = _trainer(tmp_path, "true", seed=1, max_epochs=2, settings=settings)
    with caplog.at_level(logging.WARNING):
        resumed.run()
    assert "written by an earlier bundle that did not record amp_dtype, val_interval: the resumed run takes" in (
        caplog.text
    )
    assert resumed.state.epoch == 2
    with pytest.raises(ResumeError, match="lr_restart_steps: checkpoint 3, now 4"):  # recorded ones still compared
        _trainer(tmp_path, "true", seed=1, max_epochs=2, settings={**settings, "lr_restart_steps": 4})


def test_a_tracked_resume_of_an_untracked_first_part_is_recorded_as_resumed(tmp_path, caplog):
    """The first part ran without --tracking, so its checkpoint holds no MLflow run: a new run, tagged resumed, given
    the first part's losses from the training log."""
    first, *_ = _trainer(tmp_path, "false", seed=0, max_epochs=1)
    TrainingLog(tmp_path).attach(first)
    first.run()
    resumed, network, _, _, checkpoint = _trainer(tmp_path, "true", seed=1, max_epochs=2)
    log = TrainingLog(tmp_path)
    log.attach(resumed)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="resumed", output_transform=from_engine("loss", True))
    handler.attach(resumed)
    recorder = MLflowRecorder(resumed, [handler, checkpoint, log], None, {"lr": 0.1}, network, flush_timeout=30)
    with caplog.at_level(logging.INFO):
        recorder.start()
    assert "sending 10 values the training logged before it was resumed (its earlier part was not recorded" in (
        caplog.text
    ) and "killed run" not in caplog.text
    resumed.run()
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert run.data.tags["resumed"] == "true" and run.info.status == "FINISHED"
    steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "Loss")]
    assert steps == list(range(6, 11)), "epoch 2's iterations, numbered on from the first part's"
    first_part = [metric.step for metric in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(first_part) == list(range(1, 6))


def test_a_resumed_run_keeps_its_own_log_and_moves_another_run_s_out_of_the_shared_output_folder(tmp_path, caplog):
    """Two runs with checkpoint folders of their own and one output folder (bundle/eval by default): resumed, the
    first took over the log the second had written there since, cut it at its own checkpoint and appended to it."""
    output = tmp_path / "eval"
    first, *_ = _trainer(tmp_path / "a", "false", seed=0, max_epochs=1)
    TrainingLog(output).attach(first)
    first.run()
    first_log = read_training_log(output / "training_log.jsonl")
    assert len(first_log) == 5

    # Its own log: resumed, it goes on after the records up to its checkpoint.
    resumed, *_ = _trainer(tmp_path / "a", "true", seed=1, max_epochs=2)
    TrainingLog(output).attach(resumed)
    resumed.run()
    own = read_training_log(output / "training_log.jsonl")
    assert own[:5] == first_log and [r["iteration"] for r in own] == list(range(1, 11))
    assert not (output / "earlier_runs").exists()

    second, *_ = _trainer(tmp_path / "b", "false", seed=2, max_epochs=1)
    TrainingLog(output).attach(second)
    second.run()
    second_log = (output / "training_log.jsonl").read_text()
    (output / "overlays" / "epoch_0001").mkdir(parents=True)

    again, *_ = _trainer(tmp_path / "a", "true", seed=1, max_epochs=3)
    TrainingLog(output).attach(again)
    with caplog.at_level(logging.WARNING):
        again.run()
    (kept,) = (output / "earlier_runs").iterdir()
    assert (kept / "training_log.jsonl").read_text() == second_log and (kept / "overlays" / "epoch_0001").is_dir()
    assert f"{output / 'training_log.jsonl'} is another run's" in caplog.text and f"moved to {kept}" in caplog.text
    resumed_log = read_training_log(output / "training_log.jsonl")
    assert [r["iteration"] for r in resumed_log] == list(range(11, 16)), "its own iterations only, none of the other's"
    assert not (output / "overlays").exists()


def test_a_checkpoint_without_buffers_resumes_with_a_warning(tmp_path, caplog):
    """Checkpoints of bundle 0.3.10 and earlier held the trainable parameters alone."""
    trainer, *_ = _trainer(tmp_path, "false", seed=0, max_epochs=1)
    trainer.run()
    saved = torch.load(tmp_path / "latest_checkpoint.pt", weights_only=True)
    saved["network_trainable"] = {k: v for k, v in saved["network_trainable"].items() if k.startswith("adapter.")}
    torch.save(saved, tmp_path / "latest_checkpoint.pt")
    resumed, network, *_ = _trainer(tmp_path, "true", seed=123, max_epochs=2)
    with caplog.at_level(logging.WARNING):
        resumed.run()
    assert "lacks 3 buffers (norm.num_batches_tracked, ...)" in caplog.text
    # Epoch 2's five batches alone: the statistics restarted, as the warning says.
    assert resumed.state.epoch == 2 and network.norm.num_batches_tracked == 5


def test_resume_refuses_other_settings_and_missing_checkpoints(tmp_path):
    trainer, *_ = _trainer(tmp_path, "false", seed=0, max_epochs=1)
    trainer.run()
    torch.manual_seed(0)
    other = _Frozen()
    optimizer = torch.optim.AdamW(other.adapter.parameters())
    checkpoint = TrainingCheckpoint(tmp_path, other, optimizer, settings={"lr": 0.5, "max_epochs": 1}, resume="true")
    with pytest.raises(ResumeError, match=r"lr: checkpoint 0.1, now 0.5"):
        checkpoint.attach(trainer)
    longer = TrainingCheckpoint(tmp_path, other, optimizer, settings={"lr": 0.1, "max_epochs": 9}, resume="true")
    longer.attach(trainer)  # training longer is what resuming is for
    torch.manual_seed(5)
    changed_base = _Frozen()
    checkpoint = TrainingCheckpoint(
        tmp_path, changed_base, optimizer, settings={"lr": 0.1, "max_epochs": 1}, resume=True
    )
    with pytest.raises(ResumeError, match="frozen base weights differ"):
        checkpoint.attach(trainer)
    with pytest.raises(ResumeError, match="does not exist"):
        TrainingCheckpoint(tmp_path / "empty", other, optimizer, resume="true").attach(trainer)
    with pytest.raises(ResumeError, match="must be one of"):
        TrainingCheckpoint(tmp_path, other, optimizer, resume="yes")


def test_resume_refuses_damaged_checkpoints_and_one_past_max_epochs_in_one_line(tmp_path):
    trainer, *_ = _trainer(tmp_path, "false", seed=0, max_epochs=3)
    trainer.run()
    path = tmp_path / "latest_checkpoint.pt"
    whole = path.read_bytes()
    assert torch.load(path, weights_only=True)["trainer"]["iteration"] == 15

    with pytest.raises(ResumeError) as caught:
        _trainer(tmp_path, "true", seed=1, max_epochs=2)[0].run()
    assert str(caught.value) == (
        f"Cannot resume from {path}: it is at iteration 15, beyond max_epochs 2; raise --max_epochs to train on."
    )

    torch.save({"weights": torch.zeros(3)}, path)  # a torch file, but not a training checkpoint
    with pytest.raises(ResumeError, match=f"{path} is not a training checkpoint of format {CHECKPOINT_FORMAT}"):
        _trainer(tmp_path, "true", seed=1)[0].run()
    for damaged in (whole[: len(whole) // 2], b"\x00garbage" * 100):
        path.write_bytes(damaged)
        with pytest.raises(ResumeError) as caught:
            _trainer(tmp_path, "true", seed=1)[0].run()
        message = str(caught.value)
        assert message.startswith(f"Cannot resume: checkpoint {path} cannot be read (") and "\n" not in message
        assert path.read_bytes() == damaged, "the damaged file is left for the user to inspect"


def test_resuming_a_complete_run_says_so_and_trains_nothing(tmp_path, caplog):
    trainer, network, *_ = _trainer(tmp_path, "false", seed=0, max_epochs=3)
    trainer.run()
    finished = network.adapter.weight.detach().clone()
    resumed, network2, *_ = _trainer(tmp_path, "true", seed=1, max_epochs=3)
    iterations = []
    resumed.add_event_handler(Events.ITERATION_STARTED, lambda engine: iterations.append(engine.state.iteration))
    with caplog.at_level(logging.INFO, logger="scripts.handlers.checkpoint"):
        resumed.run()
    assert iterations == [] and resumed.state.iteration == 15
    assert torch.equal(network2.adapter.weight, finished)
    assert "that run is complete (3 epochs, iteration 15 of 15), so nothing is left to train; raise --max_epochs" in caplog.text
    assert "goes on after iteration" not in caplog.text


def test_a_run_stopped_during_a_validation_redoes_it_and_checks_the_best_model_on_resume(tmp_path, caplog):
    trainer, *_, checkpoint = _trainer(tmp_path, "false", seed=0, validate=True)

    def stop(_):
        if trainer.state.epoch == 2:
            raise RuntimeError("stopped during the validation of epoch 2")

    checkpoint.validator.add_event_handler(Events.ITERATION_COMPLETED, stop)
    with pytest.raises(RuntimeError, match="stopped during the validation of epoch 2"):
        trainer.run()
    saved = torch.load(tmp_path / "latest_checkpoint.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 5, "the newest checkpoint is epoch 1's, taken after its validation"
    best = tmp_path / "model_best.pt"
    assert "adapter.weight" in torch.load(best, weights_only=True), "epoch 1's validation saved a best model"
    best.write_bytes(best.read_bytes()[:100])  # damaged, as an in-place write cut short leaves it

    resumed, *_, checkpoint = _trainer(tmp_path, "true", seed=1, validate=True)
    validated_after = []
    checkpoint.validator.add_event_handler(Events.COMPLETED, lambda _: validated_after.append(resumed.state.epoch))
    with caplog.at_level(logging.WARNING):
        resumed.run()
    assert validated_after == [2, 3], "the interrupted validation of epoch 2 is done again"
    assert f"the best model {best} recorded by the interrupted run cannot be loaded" in caplog.text
    assert "adapter.weight" in torch.load(best, weights_only=True), "a new best model replaced the damaged one"
    assert checkpoint.validator.state.best_metric_epoch >= 2


def test_a_best_model_saved_after_the_checkpoint_is_kept_aside_on_resume(tmp_path, caplog):
    """Killed between epoch 2's validation (which saved a new model_best.pt) and epoch 2's checkpoint: the checkpoint
    holds epoch 1's best score, not the newer file's, which the resumed run keeps aside (nothing lost) instead of
    passing it off as the best of a score it never had."""
    trainer, *_, checkpoint = _trainer(tmp_path, "false", seed=0, validate=True)
    best = tmp_path / "model_best.pt"
    saved_in_epoch = {}

    def kill_after_a_new_best(_):
        saved_in_epoch[trainer.state.epoch] = best.stat().st_mtime_ns
        if trainer.state.epoch == 2:
            raise RuntimeError("killed after the validation of epoch 2")

    checkpoint.validator.add_event_handler(Events.COMPLETED, kill_after_a_new_best)
    with pytest.raises(RuntimeError, match="killed after the validation of epoch 2"):
        trainer.run()
    assert saved_in_epoch[2] != saved_in_epoch[1], "epoch 2's validation saved a new best model"
    newer = best.read_bytes()
    assert torch.load(tmp_path / "latest_checkpoint.pt", weights_only=True)["trainer"]["iteration"] == 5

    recorded = torch.load(tmp_path / "latest_checkpoint.pt", weights_only=True)["best_model_files"][0]
    assert recorded["sha256"] != hashlib.sha256(newer).hexdigest(), "the checkpoint describes epoch 1's best model"

    resumed, *_, checkpoint = _trainer(tmp_path, "true", seed=1, validate=True)
    with caplog.at_level(logging.WARNING):
        resumed.run()
    (aside,) = tmp_path.glob("model_best.unrecorded-*.pt")
    assert f"{best} was saved after the checkpoint" in caplog.text and f"kept as {aside}" in caplog.text
    assert aside.read_bytes() == newer
    assert checkpoint.validator.state.best_metric_epoch >= 2 and best.is_file(), "a new best model of its own"
    recorded = torch.load(tmp_path / "latest_checkpoint.pt", weights_only=True)["best_model_files"][0]
    assert recorded == {"size_mtime": [best.stat().st_size, best.stat().st_mtime_ns],
                        "sha256": hashlib.sha256(best.read_bytes()).hexdigest()}


def test_a_best_model_copied_without_its_time_is_still_the_recorded_one(tmp_path, caplog):
    trainer, *_, checkpoint = _trainer(tmp_path, "false", seed=0, max_epochs=2, validate=True)
    trainer.run()
    best = tmp_path / "model_best.pt"
    content, written = best.read_bytes(), best.stat().st_mtime_ns
    best.unlink()
    best.write_bytes(content)  # as cp -r or scp leave it: the same bytes, a new modification time
    assert best.stat().st_mtime_ns != written
    recorded = torch.load(tmp_path / "latest_checkpoint.pt", weights_only=True)["validator"]

    resumed, *_, checkpoint = _trainer(tmp_path, "true", seed=1, max_epochs=3, validate=True)
    restored = {}
    resumed.add_event_handler(Events.STARTED, lambda _: restored.update(
        best_metric=checkpoint.validator.state.best_metric, best_metric_epoch=checkpoint.validator.state.best_metric_epoch))
    with caplog.at_level(logging.WARNING):
        resumed.run()
    assert "was saved after the checkpoint" not in caplog.text and not list(tmp_path.glob("*.unrecorded-*"))
    assert restored == recorded and restored["best_metric_epoch"] >= 1, "the recorded best score goes on"


def test_a_best_model_saved_before_any_checkpoint_recorded_one_is_kept_aside(tmp_path, caplog):
    """An interval checkpoint in epoch 1, then epoch 1's validation saves the first model_best.pt, then a kill."""
    trainer, *_, checkpoint = _trainer(tmp_path, "false", seed=0, validate=True, interval=2)
    best = tmp_path / "model_best.pt"

    def kill_after_the_first_best(_):
        if trainer.state.epoch == 1:
            raise RuntimeError("killed after the validation of epoch 1")

    checkpoint.validator.add_event_handler(Events.COMPLETED, kill_after_the_first_best)
    with pytest.raises(RuntimeError, match="killed after the validation of epoch 1"):
        trainer.run()
    saved = torch.load(tmp_path / "latest_checkpoint.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 4 and saved["best_model_files"] == [None] and best.is_file()
    first = best.read_bytes()

    resumed, *_ = _trainer(tmp_path, "true", seed=1, validate=True, interval=2)
    with caplog.at_level(logging.WARNING):
        resumed.run()
    (aside,) = tmp_path.glob("model_best.unrecorded-*.pt")
    assert aside.read_bytes() == first and f"kept as {aside}" in caplog.text


WRITER = textwrap.dedent(
    """
    import sys, torch
    from scripts.atomic import save_torch_atomic
    big = torch.zeros(4 * 1024 * 1024)
    step = 0
    while True:
        step += 1
        save_torch_atomic({"step": step, "big": big + step}, sys.argv[1])
        print(step, flush=True)
    """
)


def test_sigkill_during_writes_never_leaves_a_corrupt_checkpoint(tmp_path):
    target = tmp_path / "latest_checkpoint.pt"
    for delay in (0.02, 0.11):
        process = preloaded_python().start(["-c", WRITER, target], cwd=REPO)
        deadline = time.monotonic() + 60
        while not process.output():  # the first whole checkpoint is written
            assert process.poll() is None and time.monotonic() < deadline, process.errors()[-3000:]
            time.sleep(0.01)
        time.sleep(delay)  # lands somewhere inside a 16 MB write
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        content = torch.load(target, weights_only=True)
        assert torch.all(content["big"] == content["step"]), "a whole checkpoint, never a mix or a torn file"
    plain = tmp_path / "plain.pt"
    torch.save({}, plain)
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777, "readable like any torch.save output"


def _bundle_arguments(root: Path, datalist: Path, **overrides) -> list[str]:
    settings = {**FAST, "datalist": datalist, "ckpt_dir": root / "models", "output_dir": root / "eval", **overrides}
    return bundle_command("training", [TRAIN, QUICKSTART], launcher=(), **settings)


def test_a_run_killed_mid_epoch_resumes_from_its_checkpoint(tmp_path):
    datalist = write_dataset(tmp_path / "data", count=6, size=128)["vessels"]
    settings = {"max_epochs": 3, "batch_size": 1, "checkpoint_interval": 1, "tracking": "mlflow"}
    process = preloaded_python().start(_bundle_arguments(tmp_path, datalist, **settings), tmp_path, merge_stderr=True)
    deadline = time.monotonic() + 300
    while "(epoch 1, iteration 2)" not in process.output():
        assert process.poll() is None, process.output()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s:\n" + process.output()[-4000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # in the middle of epoch 1 (4 iterations), maybe inside a write
    process.wait(timeout=30)
    checkpoint = torch.load(tmp_path / "models" / "latest_checkpoint.pt", weights_only=True)
    killed_at = checkpoint["trainer"]["iteration"]
    assert 2 <= killed_at < 4 and checkpoint["trainer"]["epoch_length"] == 4, "killed mid-epoch"
    assert not (tmp_path / "models" / "model.pt").exists(), "the first run never finished"
    logged_before = read_training_log(tmp_path / "eval" / "training_log.jsonl")

    # Resumed to stop an epoch sooner: max_epochs may change on resume (as it does to extend a run).
    result = preloaded_python().run(
        _bundle_arguments(tmp_path, datalist, **{**settings, "max_epochs": 2}, resume="true"), tmp_path, timeout=600
    )
    assert result.returncode == 0, fail_message(result)
    log = result.stdout + result.stderr
    assert f"goes on after iteration {killed_at} of 8" in log
    final = torch.load(tmp_path / "models" / "latest_checkpoint.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 8
    assert (tmp_path / "models" / "model.pt").is_file()
    iterations = [
        r["iteration"] for r in read_training_log(tmp_path / "eval" / "training_log.jsonl") if r["kind"] == "train"
    ]
    assert iterations == list(range(1, 9)), f"each iteration once across the kill; before it: {logged_before}"

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sam2lora_fundus").experiment_id])
    assert len(runs) == 1, "the resumed training goes on in the MLflow run of the killed one"
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags.get("resumed") == "true"
    # MLflow keeps a parameter's first value: the extended run's goes into a tag beside it.
    assert runs[0].data.params["max_epochs"] == "3" and runs[0].data.tags["resumed.max_epochs"] == "2"
    assert "max_epochs=2 (recorded 3)" in log
    steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")})
    assert steps == list(range(1, 9))
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_fov_dice")) == [1, 2]


class BatchDigests:
    """A training handler that appends a digest of each batch's images to ``path``, one ``epoch digest`` line each
    (a file: the bundle imports this module again under its own name)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine) -> None:
        images = engine.state.batch["image"].detach().cpu().contiguous().numpy()
        with open(self.path, "a") as record:
            record.write(f"{engine.state.epoch} {hashlib.sha256(images.tobytes()).hexdigest()}\n")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_resumed_run_draws_new_batches_not_its_first_epochs_again(tmp_path, num_workers):
    """Seeded at start-up as a new run, a resumed one drew again the crops, augmentations and prompts of its first
    epochs: its epochs 3 and 4 were epochs 1 and 2 over again, and a job preempted every 2 epochs trained on those
    two for ever (found by a review). It now draws from the seed and the iteration it resumes at."""
    datalist = write_dataset(tmp_path / "data", count=5, size=64)["vessels"]
    record = tmp_path / "batches.txt"
    handler = tmp_path / "digests.json"
    handler.write_text(json.dumps({"+train#handlers": [{"_target_": "tests.test_resume.BatchDigests", "path": str(record)}]}))

    def train(root: Path, max_epochs: int, resume: str = "false") -> dict[int, list[str]]:
        record.unlink(missing_ok=True)
        settings = {**FAST, "num_workers": num_workers, "datalist": str(datalist), "ckpt_dir": str(root / "models"),
                    "output_dir": str(root / "eval"), "max_epochs": max_epochs, "resume": resume}
        monai_run("training", meta_file=META, config_file=[TRAIN, QUICKSTART, str(handler)], bundle_root=str(BUNDLE),
                  **settings)
        batches: dict[int, list[str]] = {}
        for line in record.read_text().splitlines():
            epoch, digest = line.split()
            batches.setdefault(int(epoch), []).append(digest)
        return batches

    whole = train(tmp_path / "whole", 4)
    first = train(tmp_path / "parts", 2)
    resumed = train(tmp_path / "parts", 4, resume="true")

    assert sorted(whole) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert first == {epoch: whole[epoch] for epoch in (1, 2)}, "the same seed draws the same batches"
    assert len({digest for batches in whole.values() for digest in batches}) == sum(map(len, whole.values()))
    drawn_before = {digest for batches in first.values() for digest in batches}
    assert not drawn_before & {digest for batches in resumed.values() for digest in batches}, "first epochs again"
    assert resumed[3] != whole[3] or resumed[4] != whole[4], "drawn from the resumed iteration's own seed"


def test_resume_with_other_settings_is_a_clear_error(tmp_path):
    datalist = write_dataset(tmp_path / "data", count=3, size=64)["vessels"]
    models = tmp_path / "models"
    torch.manual_seed(0)
    models.mkdir()
    save_torch_atomic({"format": CHECKPOINT_FORMAT, "settings": {"lora_rank": 8}}, models / "latest_checkpoint.pt")
    error = run_in_process(
        "training",
        [TRAIN, QUICKSTART],
        datalist=str(datalist),
        ckpt_dir=str(models),
        output_dir=str(tmp_path / "eval"),
        resume="true",
        **FAST,
    )
    assert "lora_rank: checkpoint 8, now 32" in str(error) and str(models / "latest_checkpoint.pt") in str(error)


def test_a_checkpoint_folder_a_running_training_holds_is_refused_until_that_process_ends(tmp_path):
    """A second run into a folder still training moved its checkpoints aside and cleared its temporary files mid-write
    (the first run failed at its next save). The hold goes when its process does, even killed: no stale lock."""
    from scripts.handlers.checkpoint import RUN_LOCK, ResumeError, claim_checkpoint_folder, release_checkpoint_folder

    # Another training process, as its initialize claims the folder.
    with held_by_another_process(tmp_path, claim_checkpoint_folder) as holder, pytest.raises(
        ResumeError, match=f"Checkpoint folder {tmp_path} is in use by a training run still going"
        rf" \(process {holder} on .*\): wait for it to end"
    ):
        claim_checkpoint_folder(tmp_path)
    claim_checkpoint_folder(tmp_path)  # the killed process let go
    assert (tmp_path / RUN_LOCK).read_text().startswith(f"process {os.getpid()} on ")
    release_checkpoint_folder(tmp_path)


def test_training_claims_its_checkpoint_folder_before_moving_an_earlier_run_aside():
    initialize = json.loads(Path(TRAIN).read_text())["initialize"]
    claim = initialize.index("$handlers.checkpoint.claim_checkpoint_folder(@ckpt_dir)")
    assert initialize.index("$inputs.writable_folder(@ckpt_dir)") < claim
    assert claim < initialize.index("$handlers.checkpoint.keep_earlier_run(@ckpt_dir, @output_dir, @resume)")
    finalize = json.loads(Path(TRAIN).read_text())["finalize"]
    assert "$handlers.checkpoint.release_checkpoint_folder(@ckpt_dir)" in finalize

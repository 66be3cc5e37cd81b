"""Multi-process training with DistributedDataParallel: two CPU processes with gloo, launched by torchrun."""

from __future__ import annotations

import re
import subprocess
import sys

import mlflow
import torch

from scripts.handlers import read_training_log
from scripts.network import SAM2LoRA
from scripts.synthetic import write_dataset
from tests.helpers import FAST, MULTI_GPU, QUICKSTART, SAM_LORA, TRAIN, bundle_command, fail_message


def test_two_gloo_processes_write_one_model_one_record_and_agree_on_the_metrics(tmp_path):
    # 10 images: 6 training (3 per process), 2 validation (1 per process).
    datalist = write_dataset(tmp_path / "data", count=10, size=128)["vessels"]
    models, output = tmp_path / "models", tmp_path / "eval"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # lora+decoder trains SAM's whole mask decoder: DistributedDataParallel waits for a gradient of every trainable
    # weight in each step, so the parts one image never runs (the object-score head) must stay frozen.
    paper_head = {**SAM_LORA, "finetune": "lora+decoder"}
    overrides = {**FAST, **paper_head, "datalist": datalist, "ckpt_dir": models, "output_dir": output, "tracking": "mlflow"}
    command = bundle_command("training", [TRAIN, QUICKSTART, MULTI_GPU], launcher=torchrun, **overrides)
    result = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, fail_message(result)
    log = result.stdout + result.stderr

    # The same checkpoint format as one process: DistributedDataParallel's "module." prefix never reaches a file.
    reference = SAM2LoRA(model_size="tiny", random_init=True, image_size=64).state_dict()
    final = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert set(final) == set(reference)
    resumable = torch.load(models / "latest_checkpoint.pt", map_location="cpu", weights_only=True)
    assert resumable["trainer"]["epoch_length"] == 2, "each process trained on its half: 3 images, batches of 2"
    assert resumable["settings"]["world_size"] == 2
    assert not any(key.startswith("module.") for key in resumable["network_trainable"])

    # Only rank 0 writes checkpoints, pictures and MLflow records.
    assert log.count("Saved resumable checkpoint") == 1, "at the epoch's end (completion is the same iteration)"
    assert log.count("saved final checkpoint") == 1
    assert log.count("MLflow: recording run") == 1
    client = mlflow.MlflowClient(f"sqlite:///{output / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sam2lora_fundus").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["world_size"] == "2"

    # Validation metrics are reduced across ranks: both processes report the mean over both validation images.
    reported = [float(value) for value in re.findall(r"Epoch\[1\] Metrics -- val_fov_dice: ([0-9.]+)", log)]
    assert len(reported) == 2 and reported[0] == reported[1]
    validation = [r for r in read_training_log(output / "training_log.jsonl") if r["kind"] == "validation"]
    by_dataset = validation[-1]["by_dataset"]["synthetic"]
    assert by_dataset["images"] == 2, "the per-dataset chart gathers both processes' images"
    assert abs(by_dataset["dice"]["vessels"] - reported[0]) < 1e-3
    assert float(runs[0].data.metrics["val_fov_dice"]) == validation[-1]["metrics"]["val_fov_dice"]


def test_a_validation_split_smaller_than_the_processes_is_one_line(tmp_path):
    datalist = write_dataset(tmp_path / "data", count=5, size=128)["vessels"]  # 1 validation image
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    overrides = {**FAST, "datalist": datalist, "ckpt_dir": tmp_path / "models", "output_dir": tmp_path / "eval"}
    command = bundle_command("training", [TRAIN, QUICKSTART, MULTI_GPU], launcher=torchrun, **overrides)
    result = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    errors = re.findall(r"\[rank[01]\]: error: (.*)", result.stderr)
    assert len(errors) == 2, fail_message(result)
    assert errors[0] == (
        f"The 'validation' split of {datalist} holds 1 image(s), fewer than the 2 processes torchrun started: each "
        "process validates at least one. Add images to the split, or start no more processes than it has images "
        "(--nproc_per_node)."
    )
    assert "Traceback" not in "".join(line for line in result.stderr.splitlines(True) if line.startswith("[rank"))
    assert not (tmp_path / "models" / "model.pt").exists()

"""MLflow tracking: the embedded SQLite store, a real tracking server, and a server that goes away mid-run."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from PIL import Image

from scripts.engines import built as built_components
from scripts.errors import ConfigError, user_error
from scripts.inputs import check_command_line
from scripts.network import SAM2LoRA
from scripts.synthetic import write_dataset
from scripts.tracking import (
    TrackingError,
    _Delivery,
    describe_training_data,
    flatten_settings,
    http_retry_settings,
    settings_in_use,
)
from tests.helpers import (
    BUNDLE_MAIN,
    EVALUATE,
    FAST,
    INFER,
    LOGGING,
    META,
    QUICKSTART,
    SAM_LORA,
    TRAIN,
    bundle_command,
    fail_message,
    run_bundle,
    run_in_process,
    write_model_file,
)
from tests.preloaded import preloaded_python

EXPERIMENT = "sam2lora_fundus"


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def _only_run(client: mlflow.MlflowClient):
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 1, [run.info.run_name for run in runs]
    return runs[0]


def test_training_with_tracking_mlflow_records_the_run_in_the_default_sqlite_store(tmp_path):
    datalist = write_dataset(tmp_path / "data", count=6, size=128)["vessels"]
    # A dataset named as tools.prepare --name allows, with characters MLflow refuses in a metric's name.
    content = json.loads(Path(datalist).read_text())
    for entry in (entry for split in ("training", "validation", "test") for entry in content[split]):
        entry["dataset"] = "Clinic A (2024)"
    Path(datalist).write_text(json.dumps(content))
    output = tmp_path / "eval"
    result = run_bundle(
        "training",
        [TRAIN, QUICKSTART],
        cwd=tmp_path,
        datalist=datalist,
        ckpt_dir=tmp_path / "models",
        output_dir=output,
        tracking="mlflow",
        **FAST,
        **SAM_LORA,
    )
    assert result.returncode == 0, fail_message(result)
    database = output / "mlruns.db"
    assert database.is_file(), "MONAI's default: a SQLite store in the output folder"
    client = mlflow.MlflowClient(f"sqlite:///{database}")
    run = _only_run(client)
    assert run.info.status == "FINISHED"
    params = run.data.params
    expected = {
        "model_size": "tiny",
        "image_size": "64",
        "lora_rank": "32",
        "lora_alpha": "64",
        "lora_dropout": "0.1",
        "loss_weights.bce": "1.0",
        "loss_weights.focal_tversky": "1.0",
        "loss_weights.iou": "0.1",
        "learning_rate": "0.001",
        "lr_schedule": "CosineAnnealingWarmRestarts",
        "lr_restart_steps": "1000",
        "batch_size": "2",
        "accumulation_steps": "1",
        "seed": "0",
        "training_data.datasets": "Clinic A (2024) (4)",
        "training_data.annotators": "n/a",
        "world_size": "1",
        "max_epochs": "1",
    }
    assert {key: params.get(key) for key in expected} == expected
    assert "attn.qkv" in params["lora_targets"]
    trainable, total = int(params["trainable_parameters"]), int(params["total_parameters"])
    assert 0 < trainable < total / 10, "LoRA trains a small fraction of SAM 2"
    network = SAM2LoRA(model_size="tiny", random_init=True, image_size=64)
    assert total == sum(p.numel() for p in network.parameters()), "every parameter, frozen ones included"
    assert trainable == sum(p.numel() for p in network.parameters() if p.requires_grad)

    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == [1, 2], "the loss of every iteration (test_resume checks 8 iterations, 2 epochs)"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_fov_dice")] == [1]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice_Clinic A _2024__vessels")] == [1]
    artifacts = _artifacts(client, run.info.run_id)
    assert "model/model_best.pt" in artifacts
    assert {"pictures/training_curves.png", "pictures/validation_by_dataset.png"} <= set(artifacts)
    assert any(path.startswith("overlays/epoch_0001/") for path in artifacts)
    executed = [path for path in artifacts if path.startswith("config_") and path.endswith(".json")]
    assert executed, artifacts
    config = json.loads(Path(client.download_artifacts(run.info.run_id, executed[0], str(tmp_path))).read_text())
    assert config["image_size"] == 64 and config["datalist"] == str(datalist), "as executed, overrides included"
    for name in ("training_curves.png", "validation_by_dataset.png"):
        assert Image.open(output / name).size[0] > 300, name


def test_delivery_reports_what_was_not_recorded(caplog):
    delivery = _Delivery("http://nowhere", retry_interval=60, queue_size=10)

    def refuse() -> None:
        raise ConnectionError("connection refused")

    delivery.submit("metric train_loss", {"metric train_loss": (2, 7, 8)}, refuse)
    delivery.submit("metric train_loss", {"metric train_loss": (1, 9, 9)}, lambda: None)  # offline: dropped
    assert delivery.flush(timeout=10)
    with caplog.at_level("WARNING"):
        delivery.report()
    assert "connection refused" in caplog.text
    assert "Not recorded: metric train_loss x3 (steps 7-9)" in caplog.text


_STOPPED_RUNS = """
import sys
import torch
from ignite.engine import Engine
from monai.handlers import MLFlowHandler
from scripts.tracking import EvaluationRecorder, MLflowRecorder

uri, output = sys.argv[1:]


def step(engine, batch):
    if engine.state.epoch == 2:
        raise RuntimeError("stopped in epoch 2")
    engine.state.metrics["vessels@box_fov_dice"] = 0.5  # an evaluation over several prompt modes names it so
    return 0.25


engines = {}
for kind in ("evaluation", "training"):
    handler = MLFlowHandler(tracking_uri=uri, experiment_name=kind, output_transform=lambda loss: loss)
    engines[kind] = Engine(step)
    handler.attach(engines[kind])
    if kind == "training":
        recorder = MLflowRecorder(engines[kind], [handler], None, {"seed": 0}, torch.nn.Linear(2, 2), None, output, 5, 20)
    else:
        recorder = EvaluationRecorder([handler], output, retry_interval=5, flush_timeout=20)
    recorder.start()
with open(f"{output}/metrics_summary.json", "w") as report:  # a report the evaluation wrote before the error
    report.write("{}")
engines["evaluation"].run([0, 1], max_epochs=1)
engines["training"].run([0, 1], max_epochs=3)
"""


def test_runs_stopped_by_an_error_are_closed_as_failed_with_what_they_recorded(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    result = subprocess.run(
        [sys.executable, "-c", _STOPPED_RUNS, uri, str(tmp_path)],
        check=False, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1 and "stopped in epoch 2" in result.stderr, fail_message(result)
    client = mlflow.MlflowClient(uri)
    for kind in ("evaluation", "training"):
        (run,) = client.search_runs([client.get_experiment_by_name(kind).experiment_id])
        assert run.info.status == "FAILED", f"{kind}: closed by the exit, not left RUNNING"
        # Epoch 1's values, delivered by the background thread before the process ended, under a name MLflow takes.
        assert run.data.metrics["vessels_box_fov_dice"] == 0.5, kind
    history = client.get_metric_history(run.info.run_id, "Loss")
    assert [metric.value for metric in history] == [0.25, 0.25], "the training's iterations before the error"
    (evaluation,) = client.search_runs([client.get_experiment_by_name("evaluation").experiment_id])
    assert [artifact.path for artifact in client.list_artifacts(evaluation.info.run_id)] == ["metrics_summary.json"]


def test_describe_training_data_and_flatten_settings(tmp_path):
    datalist = tmp_path / "datalist.json"
    entry = {"image": "a.png", "label": "a_label.png", "dataset": "DRIVE", "annotator": "first"}
    datalist.write_text(json.dumps({"training": [entry, {**entry, "image": "b.png", "dataset": "STARE"}]}))
    described = describe_training_data(datalist)
    assert described["datasets"] == "DRIVE (1), STARE (1)" and described["annotators"] == "first"
    assert described["images"] == 2 and len(described["digest"]) == 16
    assert flatten_settings({"loss": {"bce": 1.0}, "targets": ["a", "b"]}) == {"loss.bce": "1.0", "targets": "a, b"}


def test_a_full_fine_tuning_records_no_adapter_setting():
    adapters = {"lora_rank": 32, "lora_alpha": 64, "lora_dropout": 0.1, "lora_targets": []}
    for finetune in ("lora", "lora+decoder"):
        settings = {"finetune": finetune, "seed": 0, **adapters}
        assert settings_in_use(settings) == settings
    assert settings_in_use({"finetune": "full", "seed": 0, **adapters}) == {"finetune": "full", "seed": 0}


def test_an_unavailable_tracking_server_is_a_clear_error_after_the_run_s_retries(tmp_path, monkeypatch):
    settings = http_retry_settings(retry_interval=4)
    for name in settings:
        monkeypatch.setenv(name, "")  # restored (removed) after the test; removed now so that the run sets it
        monkeypatch.delenv(name)
    calls = []

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            calls.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    datalist = write_dataset(tmp_path / "data", count=6, size=64)["vessels"]
    try:
        error = run_in_process(
            "training",
            [TRAIN, QUICKSTART],
            datalist=str(datalist),
            ckpt_dir=str(tmp_path / "models"),
            output_dir=str(tmp_path / "eval"),
            tracking="mlflow",
            tracking_uri=uri,
            tracking_retry_interval=4,
            **FAST,
        )
    finally:
        server.shutdown()
    assert isinstance(error, TrackingError)
    assert f"MLflow tracking at {uri} cannot be used" in str(error)
    # One call and the run's two retries (mlflow alone makes eight, over about four minutes), 1 s and 2 s apart.
    assert len(calls) == 1 + int(settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), calls
    assert settings["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert {name: os.environ[name] for name in settings} == settings


@pytest.fixture
def tracking_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1, started and stopped here; yields its URI and its process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = tmp_path / "server"
    store.mkdir()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        str(store / "artifacts"),
    ]
    # MLflow 3 also starts seven job-runner processes (GenAI jobs, unused by tracking), each importing mlflow: on
    # a loaded two-core machine they kept the server from answering for over five minutes.
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(tmp_path / "server.log", "w") as log:
        # Its own session: the server's worker processes are stopped with it.
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environment
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        # Unloaded, this machine takes 136 s to bring it up (mlflow is imported twice, by the CLI and by uvicorn).
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer within 600 s"
            time.sleep(0.3)
        # The server's first store query initialises its database, which outlasts the short HTTP timeouts the
        # tests give training on a loaded machine: have it done before.
        mlflow.MlflowClient(uri).search_experiments()
        yield uri, server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=20)


def test_training_goes_on_when_the_tracking_server_goes_away(tracking_server, tmp_path):
    uri, server = tracking_server
    datalist = write_dataset(tmp_path / "data", count=6, size=128)["vessels"]
    overrides = {
        **FAST,
        "max_epochs": 2,
        "datalist": datalist,
        "ckpt_dir": tmp_path / "models",
        "output_dir": tmp_path / "eval",
        "tracking": "mlflow",
        "tracking_uri": uri,
        "tracking_flush_timeout": 5,
        "tracking_retry_interval": 1,
    }
    arguments = bundle_command("training", [TRAIN, QUICKSTART], launcher=(), **overrides)
    training = preloaded_python().start(arguments, tmp_path, merge_stderr=True)
    client = mlflow.MlflowClient(uri)
    try:
        deadline = time.monotonic() + 300
        # The first validation is recorded on the server; then the server goes away for good.
        while "Epoch[1] Metrics -- val_fov_dice" not in training.output():
            assert training.poll() is None, training.output()[-4000:]
            assert time.monotonic() < deadline, training.output()[-4000:]
            time.sleep(0.05)
        time.sleep(1.0)  # the delivery thread sends what epoch 1 queued
        run = _only_run(client)
        assert run.data.params["model_size"] == "tiny" and "train_loss" in run.data.metrics
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=20)
        training.wait(timeout=600)
    finally:
        if training.poll() is None:
            training.kill()
            training.wait(timeout=30)
    log = training.output()
    assert training.returncode == 0, log[-4000:]
    assert (tmp_path / "models" / "model.pt").is_file(), "training completed without the server"
    assert "Epoch[2] Metrics -- val_fov_dice" in log, "epoch 2 trained and validated without the server"
    assert f"MLflow: this run's record at {uri} is incomplete. Not recorded:" in log
    summary = next(line for line in log.splitlines() if "is incomplete" in line)
    assert "metric train_loss" in summary and "metric val_fov_dice" in summary and "model_best.pt" in summary


def test_evaluation_draws_its_metrics_per_dataset_and_records_them_in_mlflow(tmp_path):
    datalist = write_dataset(tmp_path / "data", count=6, size=64)["vessels"]
    network = SAM2LoRA(model_size="tiny", random_init=True, image_size=64, channel_names=["vessels"])
    torch.save(network.state_dict(), tmp_path / "model.pt")
    output = tmp_path / "metrics"
    result = run_bundle(
        "evaluating",
        [TRAIN, QUICKSTART, EVALUATE],  # evaluate.json last: the model file's settings win
        cwd=tmp_path,
        datalist=datalist,
        ckpt_path=tmp_path / "model.pt",
        output_dir=output,
        tracking="mlflow",
        prompt_modes=["none", "box"],  # channels vessels@none and vessels@box: '@' is no name MLflow takes
        **FAST,
    )
    assert result.returncode == 0, fail_message(result)
    chart = Image.open(output / "metrics_by_dataset.png")
    assert chart.size[0] >= 500 and chart.mode in ("RGB", "RGBA")

    # The evaluation has a finished run of its own, holding its figures as its report files give them (Dice and
    # the measurements' agreement) and the reports themselves.
    client = mlflow.MlflowClient(f"sqlite:///{output / 'mlruns.db'}")
    run = _only_run(client)
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("evaluation_")
    # What was evaluated, as parameters to compare runs by (until 0.3.17 only in the reports, as MONAI logs none).
    expected = {"split": "test", "checkpoint": str(tmp_path / "model.pt"), "datalist": str(datalist),
                "prompt_modes": "none, box", "backend": "torch", "min_fragment_px": "10"}
    assert {key: run.data.params.get(key) for key in expected} == expected
    summary = json.loads((output / "metrics_summary.json").read_text())["summary"]["all"]["metrics"]
    agreement = json.loads((output / "measurement_agreement.json").read_text())["all"]
    metrics = run.data.metrics
    for mode in ("none", "box"):
        assert metrics[f"vessels_{mode}_fov_dice"] == pytest.approx(summary[f"vessels@{mode}/fov/dice"]["mean"])
    assert metrics["vessel_density_mae"] == pytest.approx(agreement["vessel_density"]["mae"])
    # The report files write an undefined figure (too few images, or no IoU head) as null, MLflow as NaN.
    for name, figure in [
        ("fractal_dimension_pearson_r", agreement["fractal_dimension"]["pearson_r"]),
        ("quality_spearman", agreement["quality_spearman"]),
    ]:
        assert metrics[name] == pytest.approx(math.nan if figure is None else figure, nan_ok=True), name
    artifacts = {each.path for each in client.list_artifacts(run.info.run_id)}
    assert {"metrics_summary.json", "measurement_agreement.json", "metrics_by_dataset.png"} <= artifacts, artifacts


def _older_mlflow_database(path: Path) -> Path:
    """An MLflow SQLite store whose schema an older MLflow wrote: a current one marked with an old revision."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # In another process: MLflow keeps the stores it opened, and would not check this one again in this one.
    create = f"import mlflow; mlflow.MlflowClient('sqlite:///{path}').search_experiments()"
    subprocess.run([sys.executable, "-c", create], check=True, capture_output=True)
    with sqlite3.connect(path) as database:
        database.execute("update alembic_version set version_num = '0584bdc529eb'")  # MLflow 2.x's revision
    return path


def test_a_store_mlflow_cannot_open_is_refused_before_the_run(tmp_path, monkeypatch):
    """Each failed in MONAI's MLFlowHandler as the workflow was built, in a hundred-line traceback, after the earlier
    run's checkpoints were moved aside; the first line of MLflow's own error is quoted (for an older database, its
    `mlflow db upgrade` advice)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("not a database")
    older = _older_mlflow_database(tmp_path / "older.db")
    argv = [BUNDLE_MAIN, "run", "training", "--config_file", str([TRAIN, QUICKSTART]), "--tracking", "mlflow"]
    refused = {
        "foo://bar": "unsupported URI 'foo://bar'",
        "sqlite://mlruns.db": "Invalid SQLite URL",
        f"sqlite:///{not_a_database}": "file is not a database",
        f"sqlite:///{older}": "out-of-date database schema",
    }
    for uri, reason in refused.items():
        with pytest.raises(ConfigError, match=re.escape(f"--tracking_uri {uri}: MLflow cannot open this store (")) as caught:
            check_command_line([*argv, "--tracking_uri", uri])
        assert reason in str(caught.value)
    check_command_line([*argv, "--tracking_uri", f"sqlite:///{tmp_path}/new.db"], tmp_path)  # MLflow creates it
    assert not (tmp_path / "new.db").exists()

    datalist = write_dataset(tmp_path / "data", count=6, size=96, seed=4)["vessels"]
    ckpt, output = tmp_path / "models", tmp_path / "eval"
    ckpt.mkdir()
    (ckpt / "latest_checkpoint.pt").write_text("the earlier run's checkpoint")
    _older_mlflow_database(output / "mlruns.db")  # the default store, after mlflow was upgraded
    result = run_bundle("training", [TRAIN, QUICKSTART], cwd=tmp_path, datalist=datalist, ckpt_dir=ckpt,
                        output_dir=output, tracking="mlflow", **FAST)
    assert result.returncode == 1, fail_message(result)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: The default tracking store sqlite:///{output / 'mlruns.db'}: MLflow cannot open"), last
    assert "mlflow db upgrade" in last
    assert sorted(path.name for path in ckpt.iterdir()) == ["latest_checkpoint.pt"]
    # MONAI writes the executed config (config_<time>.json) as it builds the workflow, before any check of ours.
    assert sorted(path.name for path in output.iterdir() if not path.name.startswith("config_")) == ["mlruns.db"]


def _workflow(run_id: str, configs: list[str], **overrides: object) -> ConfigWorkflow:
    """A bundle workflow as a long-lived process (a service, a pipeline) builds it, tracked in MLflow."""
    workflow_type = {"training": "train", "evaluating": "eval", "inference": "infer"}[run_id]
    return ConfigWorkflow(config_file=configs, meta_file=META, logging_file=LOGGING, workflow_type=workflow_type,
                          run_id=run_id, **overrides)


def _delivery_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "mlflow-delivery"]


def _run_failing_in_an_iteration(workflow: ConfigWorkflow, engine_id: str) -> None:
    """Run ``workflow`` with the engine ``engine_id`` raising after its first iteration, as a bug would."""

    def stop(engine: object) -> None:
        raise RuntimeError("stopped during an iteration")

    workflow.parser.get_parsed_content(engine_id).add_event_handler(Events.ITERATION_COMPLETED, stop)
    with pytest.raises(RuntimeError) as caught:
        workflow.run()
    assert "stopped during an iteration" in str(caught.value.__cause__)


def test_a_failed_run_from_python_is_closed_as_failed_by_finalize_and_stops_its_delivery(tmp_path):
    """A service runs the workflow again and again in one process: each failed run is FAILED once finalized, not
    RUNNING until the process ends, and leaves no delivery thread behind; a finished one stays FINISHED."""
    datalist = write_dataset(tmp_path / "data", count=4, size=64)["vessels"]
    threads = _delivery_threads()
    output = tmp_path / "eval"
    for attempt, fails in enumerate((True, False)):
        workflow = _workflow("training", [TRAIN, QUICKSTART], datalist=str(datalist), ckpt_dir=str(tmp_path / "models"),
                             output_dir=str(output), tracking="mlflow", resume="false", **FAST)
        workflow.initialize()
        if fails:
            _run_failing_in_an_iteration(workflow, "train#trainer")
        else:
            workflow.run()
        workflow.finalize()
        client = mlflow.MlflowClient(f"sqlite:///{output / 'mlruns.db'}")
        runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                  order_by=["attributes.start_time DESC"])
        assert len(runs) == attempt + 1
        assert runs[0].info.status == ("FAILED" if fails else "FINISHED"), attempt
        assert _delivery_threads() == threads, "the run's delivery thread ended with it"
    assert [run.info.status for run in runs] == ["FINISHED", "FAILED"], "finalize left the finished run as it was"


def test_a_failed_evaluation_from_python_is_closed_as_failed_by_finalize(tmp_path):
    datalist = write_dataset(tmp_path / "data", count=3, size=64)["vessels"]
    write_model_file(tmp_path / "model.pt", architecture="unet")
    threads = _delivery_threads()
    output = tmp_path / "metrics"
    workflow = _workflow("evaluating", [TRAIN, QUICKSTART, EVALUATE], datalist=str(datalist),
                         ckpt_path=str(tmp_path / "model.pt"), output_dir=str(output), tracking="mlflow", **FAST)
    workflow.initialize()
    _run_failing_in_an_iteration(workflow, "validate#evaluator")
    workflow.finalize()
    client = mlflow.MlflowClient(f"sqlite:///{output / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FAILED"
    assert _delivery_threads() == threads


@pytest.mark.parametrize(
    "run_id, configs, overrides, built",
    [
        ("training", [TRAIN, QUICKSTART], {"learning_rate": -1}, ["train#dataset", "validate#dataset"]),
        ("inference", [INFER], {}, ["image_folder", "network_def"]),
        ("evaluating", [TRAIN, QUICKSTART, EVALUATE], {}, ["validate#dataset", "network_def"]),
    ],
)
def test_finalize_after_a_failed_initialize_raises_nothing_new_and_builds_nothing(
    run_id, configs, overrides, built, tmp_path
):
    """A caller's ``try: initialize(); run() finally: finalize()``: finalize releases what initialize took, and
    neither builds what initialize did not (the cached datasets) nor raises its error again over the first."""
    datalist = write_dataset(tmp_path / "data", count=3, size=64)["vessels"]
    workflow = _workflow(run_id, configs, datalist=str(datalist), dataset_dir=str(datalist.parent / "images"),
                         ckpt_dir=str(tmp_path / "models"), ckpt_path=str(tmp_path / "missing.pt"),
                         output_dir=str(tmp_path / "out"), tracking="mlflow", **{**FAST, **overrides})
    with pytest.raises(Exception) as caught:
        workflow.initialize()
    assert user_error(caught.value) is not None, caught.value
    workflow.finalize()
    resolved = workflow.parser.ref_resolver.resolved_content
    assert built_components(resolved, *built) == [], "finalize built what initialize had not"

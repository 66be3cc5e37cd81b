"""MLflow experiment tracking for the training and evaluation workflows, on top of MONAI's ``--tracking mlflow``.

``--tracking mlflow`` makes MONAI add its ``MLFlowHandler`` to the trainer (loss and learning rate per iteration,
the executed config) and to the validator (metrics per epoch). ``MLflowRecorder`` completes the record and makes it
dependable:

- one MLflow run per training run: a fresh run always gets a new MLflow run (MONAI alone would append to any
  unfinished run of the experiment, e.g. one that was killed), and a resumed run goes on in its own MLflow run;
- every hyper-parameter that shapes the result, the datasets, the trainable and total parameter counts;
- per-dataset validation Dice per epoch (from the run's ``TrainingLog``), the pictures of ``TrainingPictures``
  (curves, per-dataset chart, overlays) and, at the end, the best model;
- records are sent by a background thread: a slow or vanished tracking server never stops training. What cannot be
  delivered is logged as a warning when it happens, and summarised (which metrics, which steps, which files) at the
  end of the run; delivery is retried every ``retry_interval`` seconds and resumes when the server is back.

``EvaluationRecorder`` does the same for an evaluation: a run of its own, the reports as artifacts, closed at the end.
A training or evaluation stopped by an error closes its run as FAILED when its workflow is finalized (a run started
from Python, :func:`close_unfinished` in the configs' ``finalize``) or else when the process exits (the command line,
which does not finalize a workflow whose run raised). Closing a run stops its delivery thread.

Without ``--tracking mlflow`` there is no ``MLFlowHandler`` in the handler lists and the recorders do nothing.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler
from monai.utils import optional_import
from torch import nn

from scripts.engines import count_parameters
from scripts.errors import FundusError, first_line
from scripts.handlers import TrainingCheckpoint, TrainingLog, TrainingPictures, read_training_log
from scripts.inputs import read_datalist

__all__ = [
    "EvaluationRecorder",
    "MLflowRecorder",
    "TrackingError",
    "close_unfinished",
    "describe_training_data",
    "flatten_settings",
    "http_retry_settings",
    "mlflow_metric_name",
    "settings_in_use",
    "validation_metric_name",
]

logger = logging.getLogger(__name__)

# Needed only with ``--tracking mlflow``: a run without it (a clinic's pipeline, a lent GPU) trains without mlflow.
mlflow, _ = optional_import("mlflow")

# The longest parameter value MLflow stores (6000 characters since MLflow 2.x).
PARAM_LENGTH = 6000
ADAPTER_SETTINGS = frozenset({"lora_rank", "lora_alpha", "lora_dropout", "lora_targets"})


def mlflow_metric_name(name: str) -> str:
    """``name`` with the characters MLflow refuses in a metric's name replaced by ``_``.

    MLflow refuses names with characters other than letters, digits, ``_ . - : /`` and spaces, and a refused batch
    is taken for a store that is down (every record of the next minute is dropped). A dataset named by
    ``tools.prepare --name`` may hold any (``Clinic A (2024)``), and an evaluation over several prompt modes names
    its channels ``vessels@box``. ``:`` and ``/`` become ``_`` too (``/`` would make the name a path).
    """
    return re.sub(r"[^\w.\- ]", "_", name)


def validation_metric_name(dataset: str, channel: str) -> str:
    """The MLflow name of a dataset's validation Dice for a channel, ``val_dice_<dataset>_<channel>``
    (:func:`mlflow_metric_name`: ``Clinic A (2024)`` gives ``val_dice_Clinic A _2024__vessels``)."""
    return mlflow_metric_name(f"val_dice_{dataset}_{channel}")


class TrackingError(FundusError, RuntimeError):
    """The MLflow tracking store cannot be used at the start of a run; the message names it and why."""


def describe_training_data(datalist: str | os.PathLike, split: str = "training") -> dict[str, Any]:
    """What a run trains on, as recordable values: datasets, annotators, image count and a digest of the list.

    Args:
        datalist: the JSON datalist (``tools.prepare`` / ``scripts.synthetic``); its entries may name their
            ``dataset`` and ``annotator``.
        split: the list to describe.

    Returns:
        ``{"datasets", "annotators", "images", "digest"}``; the digest covers the entries' file names as written
        in the datalist (relative), so it survives moving the data folder but not changing the list.
    """
    path = Path(datalist)
    entries = read_datalist(path).get(split, [])
    datasets = Counter(str(entry.get("dataset", path.parent.name)) for entry in entries)
    annotators = sorted({str(entry["annotator"]) for entry in entries if "annotator" in entry})
    names = sorted(json.dumps([entry.get("image"), entry.get("label")]) for entry in entries)
    return {
        "datasets": ", ".join(f"{name} ({count})" for name, count in sorted(datasets.items())),
        "annotators": ", ".join(annotators) or "n/a",
        "images": len(entries),
        "digest": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16],
    }


def settings_in_use(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that shaped the run: those of the adapters are left out of a full fine-tuning, which trains none
    (MLflow's run comparison would show a LoRA rank for a run without adapters)."""
    if settings.get("finetune") != "full":
        return dict(settings)
    return {key: value for key, value in settings.items() if key not in ADAPTER_SETTINGS}


def _mlflow_params(settings: Mapping[str, Any]) -> list[Any]:
    """``settings`` as MLflow parameters (:func:`flatten_settings`), each value cut to what MLflow stores."""
    return [mlflow.entities.Param(key, value[:PARAM_LENGTH]) for key, value in flatten_settings(settings).items()]


def flatten_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow parameters: ``{"loss_weights": {"bce": 1}}`` becomes ``{"loss_weights.bce": "1"}``."""
    flat: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_settings(value, prefix=f"{name}."))
        else:
            flat[name] = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return flat


class _Delivery:
    """A background thread sending MLflow writes in order; failures are logged and summarised, never raised."""

    def __init__(self, where: str, retry_interval: float, queue_size: int) -> None:
        self.where = where
        self.retry_interval = retry_interval
        self.queue: queue.Queue[tuple[str, dict[str, tuple[int, int, int]], Callable[[], Any]] | None] = queue.Queue(
            maxsize=queue_size
        )
        self.lost: dict[str, list[int]] = {}  # what -> [records, first step, last step]
        self.offline_until = 0.0
        self.in_flight: dict[str, tuple[int, int, int]] | None = None
        self.stopped = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._work, name="mlflow-delivery", daemon=True)
        self.thread.start()

    def submit(self, what: str, steps: dict[str, tuple[int, int, int]], call: Callable[[], Any]) -> None:
        """Queue ``call``; ``steps`` describes its records as ``{name: (count, first step, last step)}``."""
        if self.stopped:  # no thread takes it any more: say so rather than leave it in the queue unsent
            self._lose(steps, "the run is closed")
            return
        try:
            self.queue.put_nowait((what, steps, call))
        except queue.Full:
            self._lose(steps, "the delivery queue is full")

    def _lose(self, steps: dict[str, tuple[int, int, int]], reason: str | None = None) -> None:
        with self.lock:
            for name, (count, first, last) in steps.items():
                record = self.lost.setdefault(name, [0, first, last])
                record[0] += count
                record[1], record[2] = min(record[1], first), max(record[2], last)
        if reason:
            logger.warning(f"MLflow: not recorded ({reason}): {', '.join(steps)}.")

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                what, steps, call = item
                if time.monotonic() < self.offline_until:
                    self._lose(steps)
                    continue
                self.in_flight = steps
                try:
                    call()
                except Exception as error:  # any failure of the store (HTTP, database, artifact upload) is survivable
                    self.offline_until = time.monotonic() + self.retry_interval
                    self._lose(steps)
                    logger.warning(
                        f"MLflow tracking at {self.where} failed ({type(error).__name__}: {first_line(error)}); "
                        f"not recorded: {what}. Training goes on; records are dropped until a retry in "
                        f"{self.retry_interval:.0f} s succeeds."
                    )
                finally:
                    self.in_flight = None
            finally:
                self.queue.task_done()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for queued records to be sent; whether everything was."""
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.queue.unfinished_tasks

    def abandon(self) -> int:
        """Count what is still queued or being sent as not recorded (the run ends without it); how many deliveries."""
        abandoned = 0
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            self.queue.task_done()
            if item is not None:
                self._lose(item[1])
                abandoned += 1
        in_flight = self.in_flight
        if in_flight is not None:
            self._lose(in_flight)
            abandoned += 1
        return abandoned

    def conclude(self, timeout: float, run_id: str) -> None:
        """Wait (at most ``timeout`` s) for queued records, then report what was not recorded."""
        if self.flush(timeout):
            logger.info(f"MLflow: run {run_id} delivered to {self.where}.")
        else:
            abandoned = self.abandon()
            logger.warning(
                f"MLflow: {abandoned} deliveries to {self.where} were still waiting after {timeout:.0f} s at the end "
                "of the run; they are abandoned."
            )
        self.report()

    def stop(self, timeout: float) -> None:
        """End the thread once what is queued is handled (:meth:`conclude` first); later submissions are lost.

        Without it every tracked run of a long-lived process (a service calling the workflow again and again) would
        leave its thread waiting for records forever.

        Args:
            timeout: seconds to wait for the thread to end; one stuck in a call to a vanished server ends after it.
        """
        if self.stopped:
            return
        self.stopped = True
        deadline = time.monotonic() + timeout
        try:
            # The sentinel _work ends on, behind anything still queued (none after conclude, which empties it).
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return  # the daemon thread stays with the queue; it can no longer be given anything
        self.thread.join(max(0.0, deadline - time.monotonic()))

    def report(self) -> None:
        """Log what was not recorded during the run (nothing: no message)."""
        with self.lock:
            lost = dict(self.lost)
        if not lost:
            return
        details = "; ".join(
            f"{name} x{count}" + (f" (steps {first}-{last})" if last >= 0 else "")
            for name, (count, first, last) in sorted(lost.items())
        )
        logger.warning(f"MLflow: this run's record at {self.where} is incomplete. Not recorded: {details}.")


def _steps(metrics: Sequence[Any] = (), params: Sequence[Any] = ()) -> dict[str, tuple[int, int, int]]:
    steps: dict[str, tuple[int, int, int]] = {}
    for metric in metrics:
        count, first, last = steps.get(f"metric {metric.key}", (0, metric.step, metric.step))
        steps[f"metric {metric.key}"] = (count + 1, min(first, metric.step), max(last, metric.step))
    for param in params:
        steps[f"param {param.key}"] = (1, -1, -1)
    return steps


class _DeliveringClient:
    """What MONAI's ``MLFlowHandler`` gets as its ``client``: writes go through the delivery thread, metric names
    as MLflow takes them (:func:`mlflow_metric_name`).

    Other reads pass through to the real ``MlflowClient``; ``get_run`` of the recorded run returns it as opened,
    without a request (MONAI's validator calls it at every validation). Parameters are sent once per key: MLflow
    parameters cannot change, and MONAI's validator would otherwise log its own ``max_epochs`` over the trainer's.
    """

    def __init__(self, client: mlflow.MlflowClient, delivery: _Delivery, run: Any, logged_params: dict[str, str]):
        self._client = client
        self._delivery = delivery
        self._run = run
        self._logged_params = logged_params

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_run(self, run_id: str) -> Any:
        if run_id != self._run.info.run_id:
            return self._client.get_run(run_id)
        # The run as opened: MONAI only reads it for the parameters already logged, which log_batch tracks itself,
        # and a synchronous request to a vanished server would block training while MLflow retries for minutes.
        return self._run

    def log_batch(self, run_id: str, metrics: Sequence[Any] = (), params: Sequence[Any] = (), tags=(), **_: Any):
        metrics = [
            metric
            if metric.key == mlflow_metric_name(metric.key)
            else mlflow.entities.Metric(mlflow_metric_name(metric.key), metric.value, metric.timestamp, metric.step)
            for metric in metrics
        ]
        new_params = [p for p in params if p.key not in self._logged_params]
        self._logged_params.update({p.key: p.value for p in new_params})
        if not (metrics or new_params or tags):
            return
        steps = _steps(metrics, new_params)
        what = ", ".join(steps) or "tags"
        call = functools.partial(
            self._client.log_batch, run_id, metrics=list(metrics), params=new_params, tags=list(tags)
        )
        self._delivery.submit(what, steps, call)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        name = f"artifact {artifact_path + '/' if artifact_path else ''}{Path(local_path).name}"
        self._delivery.submit(
            name, {name: (1, -1, -1)}, lambda: self._client.log_artifact(run_id, local_path, artifact_path)
        )

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        self._delivery.submit(
            f"run status {status}",
            {f"run status {status}": (1, -1, -1)},
            lambda: self._client.set_terminated(run_id, status, end_time),
        )


def http_retry_settings(retry_interval: float) -> dict[str, str]:
    """mlflow's HTTP settings (environment variables) for a run retrying every ``retry_interval`` seconds.

    mlflow retries a failed call seven times, doubling a 2 s wait: about four minutes before an unreachable server
    gives an error. With two retries, urllib3 waiting 0 then ``2b`` seconds, ``b = retry_interval // 4`` (at least
    1), a call gives up within about half of ``retry_interval`` seconds plus the request timeouts, so the start-up
    error and the delivery's retries follow ``--tracking_retry_interval``.
    """
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(max(1, int(retry_interval) // 4)),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(5, int(retry_interval))),
    }


def _experiment(handler: MLFlowHandler, where: str) -> Any:
    """The handler's experiment, created when missing; a store that cannot be used or a deleted experiment is a
    :class:`TrackingError`."""
    client = handler.client
    try:
        experiment = client.get_experiment_by_name(handler.experiment_name)
        if experiment is None:
            experiment_id = client.create_experiment(
                handler.experiment_name, artifact_location=handler.artifact_location
            )
            experiment = client.get_experiment(experiment_id)
    except Exception as error:  # connection refused, bad URI, unwritable database...
        raise TrackingError(
            f"MLflow tracking at {where} cannot be used ({type(error).__name__}: {first_line(error)}). "
            "Check --tracking_uri (or start the server), or run without --tracking."
        ) from None
    if experiment.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment '{handler.experiment_name}' at {where} is deleted; restore it in the MLflow UI "
            "or choose another --experiment_name."
        )
    return experiment


class MLflowRecorder:
    """Completes and safeguards the MLflow record of a training run made with ``--tracking mlflow``.

    Call :meth:`start` before running the trainer (``train.json`` does it in its ``training`` list): the recorder
    needs the trainer's handler list, so it cannot be one of those handlers.

    Args:
        trainer: the training engine.
        train_handlers: the trainer's handlers (``@train#handlers``), where MONAI adds its ``MLFlowHandler``; the
            ``TrainingCheckpoint``, ``TrainingLog`` and ``TrainingPictures`` among them are used too.
        validate_handlers: the validator's handlers (``@validate#handlers``).
        settings: the run's hyper-parameters and data description, logged as parameters.
        network: the trained network, for its parameter counts.
        best_model: path of the best model file, logged as an artifact when training completes (None: not logged).
        output_dir: the workflow's output folder, where MONAI writes the executed config.
        retry_interval: seconds to wait after a failed delivery before trying again.
        flush_timeout: seconds to wait at the end of the run for queued records to be delivered.
        queue_size: records waiting for delivery beyond which new ones are dropped (and reported).
    """

    def __init__(
        self,
        trainer: Engine,
        train_handlers: Sequence[Any],
        validate_handlers: Sequence[Any] | None,
        settings: Mapping[str, Any],
        network: nn.Module,
        best_model: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
        retry_interval: float = 60.0,
        flush_timeout: float = 60.0,
        queue_size: int = 100_000,
    ) -> None:
        self.trainer = trainer
        self.handlers = [h for h in [*train_handlers, *(validate_handlers or [])] if isinstance(h, MLFlowHandler)]
        self.trainer_handlers = [h for h in train_handlers if isinstance(h, MLFlowHandler)]
        self.settings = dict(settings)
        self.network = network
        # The trainer's TrainingCheckpoint keeps the MLflow run id (a resumed run goes on in its MLflow run), its
        # TrainingLog holds what is sent after every validation, and its TrainingPictures draws what goes with it.
        self.checkpoint = next((h for h in train_handlers if isinstance(h, TrainingCheckpoint)), None)
        self.log = next((h for h in train_handlers if isinstance(h, TrainingLog)), None)
        self.pictures = next((h for h in train_handlers if isinstance(h, TrainingPictures)), None)
        self.best_model = Path(best_model) if best_model else None
        self.output_dir = Path(output_dir) if output_dir else None
        self.retry_interval = retry_interval
        self.flush_timeout = flush_timeout
        self.queue_size = queue_size
        self.run: Any = None
        self.client: _DeliveringClient | None = None
        self.delivery: _Delivery | None = None
        self._store: mlflow.MlflowClient | None = None

    @property
    def enabled(self) -> bool:
        """Whether MLflow tracking was asked for (MONAI added its handlers)."""
        return bool(self.handlers)

    def start(self) -> None:
        """Open (or reopen) the run, log the settings, and hook the pictures and the end of training."""
        if not self.enabled:
            return
        trainer = self.trainer
        handler = self.trainer_handlers[0] if self.trainer_handlers else self.handlers[0]
        self._store = handler.client
        where = handler.client.tracking_uri
        for name, value in http_retry_settings(self.retry_interval).items():
            os.environ.setdefault(name, value)  # what the user set in the environment stays
        resumed = self.checkpoint.register_state("mlflow", self._state) if self.checkpoint is not None else None
        # A resumed training whose first part was not tracked holds no run id: a new run, still tagged and backfilled.
        resuming = self.checkpoint is not None and self.checkpoint.resumed is not None
        experiment = _experiment(handler, where)
        try:
            self.run = self._open_run(handler, experiment, resumed, where)
        except Exception as error:  # the store answered for the experiment but fails to create the run
            raise TrackingError(
                f"MLflow tracking at {where} cannot open a run ({type(error).__name__}: {first_line(error)})."
            ) from None
        logged_params = dict(self.run.data.params)
        self.delivery = _Delivery(where, self.retry_interval, self.queue_size)
        for each in self.handlers:
            each.experiment = experiment
            each.cur_run = self.run
            each.client = _DeliveringClient(each.client, self.delivery, self.run, logged_params)
        self.client = self.handlers[0].client
        for each in self.trainer_handlers:
            # Closing the run is moved after this recorder's own end-of-training records.
            if trainer.has_event_handler(each.close, Events.COMPLETED):
                trainer.remove_event_handler(each.close, Events.COMPLETED)
        self._log_settings(resuming)
        if resuming:
            continued = self.run.info.run_id == (resumed or {}).get("run_id")
            self._backfill(self.checkpoint.resumed["trainer"]["iteration"], continued)
        self._log_executed_config()
        if self.log is not None:
            self.log.add_validation_listener(self._log_validation)
        trainer.add_event_handler(Events.COMPLETED, self._complete)
        atexit.register(self.close_unfinished)
        logger.info(
            f"MLflow: recording run {self.run.info.run_name} ({self.run.info.run_id}) of experiment "
            f"'{experiment.name}' at {where}."
        )

    def _state(self) -> dict[str, Any]:
        return {"run_id": self.run.info.run_id if self.run else None}

    def _open_run(self, handler: MLFlowHandler, experiment: Any, resumed: Mapping[str, Any] | None, where: str):
        client = handler.client
        run_id = (resumed or {}).get("run_id")
        if run_id:
            try:
                run = client.get_run(run_id)
                if run.info.experiment_id == experiment.experiment_id:
                    client.update_run(run_id, status="RUNNING")
                    return client.get_run(run_id)
            except Exception as error:  # a run of another tracking store
                logger.debug(f"MLflow run {run_id} not found at {where}: {error}")
            logger.warning(
                f"MLflow: the resumed training's run {run_id} is not in experiment '{experiment.name}' at {where}; "
                "recording the rest of the training in a new run."
            )
        run_name = handler.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
        return client.create_run(experiment.experiment_id, run_name=run_name, tags={"resumed_from": run_id or ""})

    def _log_settings(self, resumed: bool) -> None:
        trainable, total = count_parameters(self.network)
        params = flatten_settings(settings_in_use(self.settings))
        params.update(
            trainable_parameters=str(trainable),
            total_parameters=str(total),
            trainable_fraction=f"{trainable / max(total, 1):.6f}",
            torch_version=torch.__version__,
        )
        params = {key: value[:PARAM_LENGTH] for key, value in params.items()}
        entities = [mlflow.entities.Param(key, value) for key, value in params.items()]
        tags = [mlflow.entities.RunTag("resumed", str(resumed).lower())] if resumed else []
        # A resumed run may change max_epochs or max_training_minutes (or run another torch); MLflow keeps a
        # parameter's first value, so the value this part of the run trained with goes into a tag beside it.
        recorded = self.run.data.params
        changed = {key: value for key, value in params.items() if key in recorded and recorded[key] != value}
        tags += [mlflow.entities.RunTag(f"resumed.{key}", value) for key, value in changed.items()]
        if changed:
            logger.info(
                "MLflow: parameters keep the first value they were recorded with; this resumed run's "
                + ", ".join(f"{key}={value} (recorded {recorded[key]})" for key, value in changed.items())
                + " go into tags named resumed.<parameter>."
            )
        self.client.log_batch(self.run.info.run_id, params=entities, tags=tags)

    def _backfill(self, iteration: int, continued: bool) -> None:
        """Send what the training logged locally up to the checkpoint but the MLflow run does not have.

        Deliveries are asynchronous, so a SIGKILL loses those still queued; the iterations up to the checkpoint are
        not trained again, and ``training_log.jsonl`` (written before every checkpoint) still has them. A new run
        (the first part was not tracked, or tracked in another store) gets the whole history.

        Args:
            iteration: the checkpoint's iteration, the last one sent.
            continued: whether this run is the one the first part recorded into.
        """
        if self.log is None:
            return
        self.checkpoint.keep_another_run_s_log(self.log)  # its history is not this run's to send
        history: dict[str, set[int]] = {}

        def missing(key: str, step: int) -> bool:
            if key not in history:
                history[key] = {m.step for m in self._store.get_metric_history(self.run.info.run_id, key)}
            return step not in history[key]

        now = int(time.time() * 1000)
        metrics = []
        try:
            for record in read_training_log(self.log.path, iteration):
                if record["kind"] == "train" and missing("train_loss", record["iteration"]):
                    metrics.append(mlflow.entities.Metric("train_loss", record["loss"], now, record["iteration"]))
                    metrics.append(mlflow.entities.Metric("lr_group_0", record["lr"], now, record["iteration"]))
                elif record["kind"] == "validation":
                    metrics += [
                        mlflow.entities.Metric(key, value, now, record["epoch"])
                        for key, value in record["metrics"].items()
                        if missing(key, record["epoch"])
                    ]
        except Exception as error:  # the backfill is a courtesy: the run goes on without it
            logger.warning(f"MLflow: cannot read the resumed run's history ({first_line(error)}); no backfill.")
            return
        if metrics:
            if continued:
                logger.info(f"MLflow: sending {len(metrics)} values the killed run logged but had not delivered.")
            else:
                logger.info(
                    f"MLflow: sending {len(metrics)} values the training logged before it was resumed "
                    "(its earlier part was not recorded in this run)."
                )
            self.client.log_batch(self.run.info.run_id, metrics=metrics)

    def _log_executed_config(self) -> None:
        """The config as this run executes it (MONAI writes ``config_<time>.json`` into the output folder).

        Logged at the start so that a run killed before its end still has it. MONAI's own record of the file at the
        end of training misses it when ``--output_dir`` is given on the command line (it builds the path as the
        plain text "<dir> + '/config_<time>.json'"), hence the search for the newest file.
        """
        if self.output_dir is None:
            return
        written = sorted(self.output_dir.glob("config_*.json"), key=lambda path: path.stat().st_mtime)
        if written:
            self.client.log_artifact(self.run.info.run_id, str(written[-1]))

    def _log_validation(self, record: Mapping[str, Any]) -> None:
        metrics = [
            mlflow.entities.Metric(
                validation_metric_name(dataset, channel), value, int(time.time() * 1000), record["epoch"]
            )
            for dataset, summary in record["by_dataset"].items()
            for channel, value in summary["dice"].items()
        ]
        self.client.log_batch(self.run.info.run_id, metrics=metrics)
        for path in self.pictures.latest_files if self.pictures is not None else []:
            folder = "pictures" if path.parent == self.pictures.output_dir else f"overlays/{path.parent.name}"
            self.client.log_artifact(self.run.info.run_id, str(path), folder)

    def _complete(self, engine: Engine) -> None:
        if self.best_model is not None and self.best_model.is_file():
            self.client.log_artifact(self.run.info.run_id, str(self.best_model), "model")
        self._close("FINISHED")

    def close_unfinished(self) -> None:
        """Close the run as FAILED if the training stopped before completing (an error, Ctrl-C), after delivering
        what is queued, and say what was not recorded; nothing when the run was closed already or never opened.

        ``train.json``'s ``finalize`` calls it (:func:`close_unfinished`), so that a workflow run from Python (a
        service, a pipeline) does not leave its run RUNNING until the process ends; it is also registered to run at
        the exit of a process that does not finalize (the command line, whose workflow is not finalized when the
        training raised). A SIGKILL leaves the run RUNNING, to be resumed. Errors are logged, never raised: the
        error that stopped the training is the one to see.
        """
        try:
            self._close("FAILED")
        except Exception as error:  # never mask the error that stopped the training
            logger.warning(f"MLflow: could not close run {self.run.info.run_id} as FAILED ({first_line(error)}).")

    def _close(self, status: str) -> None:
        """Deliver what is queued, close the run as ``status``, report what was not recorded and stop the delivery
        thread, within ``flush_timeout`` seconds; once per run."""
        atexit.unregister(self.close_unfinished)
        if self.delivery is None or self.delivery.stopped:  # never opened (start failed early), or closed
            return
        deadline = time.monotonic() + self.flush_timeout
        self.delivery.flush(self.flush_timeout)  # MONAI's close also releases the SQLite store: deliver first
        for each in self.trainer_handlers:
            each.run_finish_status = status
            each.close()
        self.delivery.conclude(max(0.0, deadline - time.monotonic()), self.run.info.run_id)
        self.delivery.stop(max(0.0, deadline - time.monotonic()))


class EvaluationRecorder:
    """Gives an evaluation made with ``--tracking mlflow`` an MLflow run of its own, with its reports, closed at the end.

    MONAI adds its validator ``MLFlowHandler`` to ``validate#handlers``, which logs the evaluator's metrics (Dice and
    the others per channel and region, the measurements' agreement) but would append them to any unfinished run of
    the experiment (a training run still going, or one that was killed) and never closes the run. ``evaluate.json``
    calls :meth:`start` before the evaluator runs and :meth:`finish` after it. Records go through the same
    background delivery as training's (a server that goes away never stops the evaluation), and an evaluation that
    stops on an error closes its run as FAILED when the process exits.

    Args:
        handlers: the evaluator's handlers (``@validate#handlers``).
        output_dir: the evaluation's output folder: the report files it writes there are logged as artifacts.
        settings: what was evaluated (model file, datalist, split, prompt modes, backend), logged as parameters, so
            that runs can be told apart and compared in MLflow's table without opening their reports.
        retry_interval: seconds to wait after a failed delivery before trying again.
        flush_timeout: seconds to wait at the end for queued records to be delivered.
        queue_size: records waiting for delivery beyond which new ones are dropped (and reported).
    """

    def __init__(
        self,
        handlers: Sequence[Any],
        output_dir: str | os.PathLike,
        settings: Mapping[str, Any] | None = None,
        retry_interval: float = 60.0,
        flush_timeout: float = 60.0,
        queue_size: int = 100_000,
    ) -> None:
        self.handlers = [h for h in handlers if isinstance(h, MLFlowHandler)]
        self.output_dir = Path(output_dir)
        self.settings = dict(settings or {})
        self.retry_interval = retry_interval
        self.flush_timeout = flush_timeout
        self.queue_size = queue_size
        self.started_at: float | None = None
        self.deliveries: list[_Delivery] = []

    def start(self) -> None:
        """Open a new run (named ``evaluation_<time>`` unless ``--run_name`` is given)."""
        if not self.handlers:
            return
        self.started_at = time.time()
        # Before any run exists: a SIGTERM just after a run was created left it RUNNING.
        atexit.register(self.close_unfinished)
        for name, value in http_retry_settings(self.retry_interval).items():
            os.environ.setdefault(name, value)  # what the user set in the environment stays
        for handler in self.handlers:
            where = handler.client.tracking_uri
            handler.experiment = _experiment(handler, where)
            run_name = handler.run_name or f"evaluation_{time.strftime('%Y%m%d_%H%M%S')}"
            try:
                run = handler.client.create_run(handler.experiment.experiment_id, run_name=run_name)
            except Exception as error:  # the store answered for the experiment but fails to create the run
                raise TrackingError(
                    f"MLflow tracking at {where} cannot open a run ({type(error).__name__}: {first_line(error)})."
                ) from None
            delivery = _Delivery(where, self.retry_interval, self.queue_size)
            handler.cur_run = run
            handler.client = _DeliveringClient(handler.client, delivery, run, dict(run.data.params))
            self.deliveries.append(delivery)
            handler.client.log_batch(run.info.run_id, params=_mlflow_params(self.settings))
            logger.info(f"MLflow: recording evaluation run {run_name} ({run.info.run_id}) at {where}.")

    def finish(self, status: str = "FINISHED") -> None:
        """Log the report files this evaluation wrote and the executed config, close the run with ``status`` and
        stop its delivery thread; nothing for a run closed already."""
        atexit.unregister(self.close_unfinished)
        reports = self._reports()
        for handler, delivery in zip(self.handlers, self.deliveries):
            if handler.cur_run is None or delivery.stopped:
                continue
            run_id = handler.cur_run.info.run_id
            for path in reports:
                handler.client.log_artifact(run_id, str(path))
            deadline = time.monotonic() + self.flush_timeout
            delivery.flush(self.flush_timeout)  # MONAI's close also releases the SQLite store: deliver first
            handler.run_finish_status = status
            handler.close()
            delivery.conclude(max(0.0, deadline - time.monotonic()), run_id)
            delivery.stop(max(0.0, deadline - time.monotonic()))

    def close_unfinished(self) -> None:
        """For an evaluation stopped by an error: log the reports written so far and close its run as FAILED; nothing
        when :meth:`finish` closed it already or none was opened.

        ``evaluate.json``'s ``finalize`` calls it (:func:`close_unfinished`), and it runs at the exit of a process
        that does not finalize (the command line). Errors are logged, never raised: the evaluation's error is the one
        to see.
        """
        try:
            self.finish("FAILED")
        except Exception as error:  # never mask the error that stopped the evaluation
            logger.warning(f"MLflow: could not close the evaluation run as FAILED ({first_line(error)}).")

    def _reports(self) -> list[Path]:
        """Top-level files of the output folder written since :meth:`start`, and the newest executed config."""
        since = self.started_at or 0.0
        written = [
            path
            for path in sorted(self.output_dir.glob("*"))
            # Hidden files are no report: the output folder's lock, a report while it is written.
            if path.is_file()
            and not path.name.startswith(("mlruns.db", "config_", "."))
            and path.stat().st_mtime >= since
        ]
        configs = sorted(self.output_dir.glob("config_*.json"), key=lambda path: path.stat().st_mtime)
        return written + configs[-1:]


def close_unfinished(*recorders: MLflowRecorder | EvaluationRecorder) -> None:
    """Close the MLflow runs ``recorders`` left open, as FAILED, and stop their delivery threads: a config's
    ``finalize`` step, given the recorders the workflow built (:func:`scripts.engines.built`: none when the
    workflow stopped before building one). A run that completed was closed as FINISHED already; it stays so.

    Args:
        recorders: the workflow's :class:`MLflowRecorder` or :class:`EvaluationRecorder`, if built.
    """
    for recorder in recorders:
        recorder.close_unfinished()

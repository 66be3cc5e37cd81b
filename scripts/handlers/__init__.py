"""Ignite handlers the bundle's workflows attach to MONAI's engines, referenced as ``scripts.handlers.<Name>``.

Training: :class:`LrSchedulePerOptimizerStep`, :class:`GradientClipping`, :class:`TrainingTimeLimit`, :class:`TrainingLog` (the run's record), :class:`TrainingPictures` (drawn from
the log), :class:`TrainingCheckpoint` (resumable checkpoints), :class:`AtomicCheckpointSaver` (``model.pt`` and
``model_best.pt``). Inference and evaluation: :class:`MergeAdapters`, :class:`InferenceReport` and :class:`MeasurementAgreement`
(measurements, flags, the report),
:class:`FundusMetricsWriter` (metrics and reports), :class:`EvaluationChart`. Every engine: :class:`ReportErrors`.
"""

from scripts.handlers.checkpoint import ResumeError, TrainingCheckpoint
from scripts.handlers.errors import ReportErrors
from scripts.handlers.evaluation import EvaluationChart, FundusMetricsWriter, keep_earlier_evaluation
from scripts.handlers.gradient_clipping import GradientClipping
from scripts.handlers.lr_schedule import LrSchedulePerOptimizerStep
from scripts.handlers.measurement import InferenceReport, MeasurementAgreement
from scripts.handlers.merge_adapters import MergeAdapters
from scripts.handlers.model_saver import AtomicCheckpointSaver
from scripts.handlers.time_limit import TrainingTimeLimit
from scripts.handlers.training_log import TrainingLog, read_training_log, training_throughput
from scripts.handlers.training_pictures import TrainingPictures

__all__ = [
    "AtomicCheckpointSaver",
    "EvaluationChart",
    "FundusMetricsWriter",
    "GradientClipping",
    "InferenceReport",
    "LrSchedulePerOptimizerStep",
    "MeasurementAgreement",
    "MergeAdapters",
    "ReportErrors",
    "ResumeError",
    "TrainingCheckpoint",
    "TrainingLog",
    "TrainingPictures",
    "TrainingTimeLimit",
    "keep_earlier_evaluation",
    "read_training_log",
    "training_throughput",
]

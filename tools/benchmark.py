"""Speed and memory benchmark of SAM2LoRA, written as a JSON file and a Markdown table.

For each Hiera size and image size asked for, it measures:

- inference latency (batch of 1) and throughput (``--batch-size``) of SAM 2 without adapters, of the adapted
  network with its adapters unmerged, and with them merged into the base weights;
- the training step time (forward, loss, backward, gradient clipping, an AdamW step every iteration; see
  :func:`measure_training` for how it differs from the trainer's) and the peak memory of LoRA fine-tuning and of
  full fine-tuning (``finetune="full"`` as the bundle builds it: every SAM 2 weight the network runs trainable, no
  adapters) at the same batch and size, with the trainable parameter counts;
- the bundle's own training data pipeline (``train.json`` + ``quickstart.json``: CacheDataset, augmentation in
  DataLoader workers) run by its SupervisedTrainer: time waiting for a batch against the time of the step,
  after the first epoch;
- the cost of evaluating one photograph over the paper's eight prompt modes against the prompt-free mode alone
  (adapters merged; the bundle's ``FundusInferer``: one encoder pass, the mask decoder once prompt-free and once
  for all prompts);
- on the CPU, the merged network in PyTorch eager mode against the onnxruntime backend in float32 and int8:
  latency, and the agreement of their masks and probabilities with PyTorch's on real photographs (``--drive-dir``);
- what inference does to a photograph outside the network, at each ``--photographs`` size: reading it (decoding,
  estimating its field of view), writing its outputs (mask, probabilities, overlay) and measuring its vessels;
- the speed switches, each against the same configuration without it: in inference, channels-last and on CUDA
  bf16 autocast, TF32 and ``torch.compile`` on the merged network; in training, activation checkpointing on LoRA
  and on full fine-tuning, the others on LoRA. The other parts run without switches.

Every figure is the median over ``--repeats`` runs after ``--warmup`` runs, the variants compared in one part taking
turns in an order reversed every other round; the JSON report keeps each timed run of
the inference, backend and training figures (``latency_samples_ms``, ``step_samples_s``), and the Markdown shows
their range. Each training configuration runs in a
fresh process, because a process's resident-memory high-water mark never goes down: peak memory is that process's
maximum resident set size on CPU and ``torch.cuda.max_memory_allocated`` on CUDA. Networks start from random
weights (speed and memory do not depend on the values), with non-zero adapters as after training.

Usage::

    python -m tools.benchmark --quick                      # Hiera tiny at 256 px, a few minutes on a CPU
    python -m tools.benchmark --model-sizes tiny large --image-sizes 1024 --output-dir docs/benchmarks

An earlier run's ``benchmark.json``, ``benchmark.md`` and ``benchmark.partial.json`` in ``--output-dir`` are moved to
``earlier_benchmarks/<time>/`` there before a run starts, with a warning naming the folder: another run (other
``--parts``, say) never replaces what they measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import logging
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from scripts.atomic import keep_earlier_outputs, write_text_atomic
from scripts.errors import ConfigError, command_line
from tools import path_argument

__all__ = [
    "QUICK_SETTINGS",
    "BenchmarkSettings",
    "main",
    "measure_backends",
    "measure_data_loading",
    "measure_inference",
    "measure_input_modes",
    "measure_photograph_io",
    "measure_prompt_modes",
    "measure_training",
    "render_markdown",
    "run_benchmark",
    "training_recipe",
]

BUNDLE_CONFIGS = Path(__file__).resolve().parent.parent / "bundle" / "configs"
CUDA_ONLY_SWITCHES = ("bf16", "tf32", "compile")
SWITCHES = ("channels_last", "activation_checkpointing", *CUDA_ONLY_SWITCHES)
PARTS = ("inference", "prompt_modes", "training", "data_loading", "backends", "input_modes", "photograph_io")
# Photographs of the input-mode measurement, (width, height): HRF's and DRIVE's.
PHOTOGRAPHS = ((3504, 2336), (565, 584))

# Targets of the issue "Speed and memory": (name, measured ratio's key, limit); None: shown, no limit.
TARGETS = (
    ("merged inference latency / SAM 2 latency", "merged_latency_ratio", 1.02),
    ("LoRA training peak memory / full fine-tuning peak memory", "lora_memory_ratio", 0.7),
    ("LoRA / full fine-tuning memory growth during the steps (peak - before)", "lora_step_memory_ratio", None),
    ("LoRA training step time / full fine-tuning step time", "lora_step_time_ratio", 1.0),
    ("evaluation over the eight prompt modes / over one: the network (time per image)", "prompt_modes_ratio", 2.0),
    (
        "evaluation over the eight prompt modes / over one: network and metrics (time per image)",
        "prompt_modes_metrics_ratio",
        2.0,
    ),
)
# Targets whose limit must be beaten, not just reached.
STRICT_TARGETS = ("lora_step_time_ratio", "prompt_modes_ratio", "prompt_modes_metrics_ratio")
# Targets of the issue "Speed where users run it" (backend, row key, name, lower limit), for every size measured;
# the issue states them at Hiera-large.
BACKEND_TARGETS = (
    ("onnxruntime float32", "speed_up", "onnxruntime float32 speed-up over PyTorch eager (CPU, batch 1)", 2.0),
    ("onnxruntime float32", "mask_dice", "onnxruntime float32 mask agreement with PyTorch (Dice)", 0.99),
    ("onnxruntime int8", "speed_up", "onnxruntime int8 speed-up over PyTorch eager (CPU, batch 1)", 2.0),
    ("onnxruntime int8", "mask_dice", "onnxruntime int8 mask agreement with PyTorch (Dice)", 0.97),
)
# Loggers that warn about the random weights every case builds on purpose (see _quiet_logs).
QUIET_LOGGERS = ("scripts.sam2_models", "scripts.adapters")
# What a run has measured so far, rewritten after each measurement and removed once the full report is written.
PARTIAL_REPORT = "benchmark.partial.json"
# The full report, as JSON and as Markdown.
REPORT_FILES = ("benchmark.json", "benchmark.md")
DATA_TARGET = ("data-loading time / training step time (after the first epoch)", 0.1)


@dataclass(frozen=True)
class BenchmarkSettings:
    """What to measure and how often.

    Args:
        model_sizes: Hiera sizes (``tiny``, ``small``, ``base_plus``, ``large``).
        image_sizes: sides of the square encoder input.
        batch_size: batch of the training steps, of the throughput measurement and of the data pipeline.
        repeats: timed runs per figure; the median is reported.
        warmup: untimed runs before them.
        device: ``cuda``, ``cpu`` or ``auto`` (CUDA when available).
        lora_rank: rank of the adapters (alpha = 2 x rank as in the paper).
        switches: speed switches to measure; CUDA-only ones are skipped on a CPU.
        data_images: synthetic pictures rendered for the data-pipeline measurement (about 60% train).
        data_epochs: epochs of the data-pipeline measurement; the first is not counted.
        num_workers: DataLoader workers of the data pipeline.
        parts: what to measure, of ``PARTS`` (all by default; fewer where a GPU is lent for minutes).
        drive_dir: DRIVE's folder, whose test photographs the CPU backends' agreement is measured on.
        photographs: ``(width, height)`` of the photographs segmented in each input mode and read and written in
            ``photograph_io``.
    """

    model_sizes: tuple[str, ...] = ("tiny", "large")
    image_sizes: tuple[int, ...] = (1024,)
    batch_size: int = 2
    repeats: int = 5
    warmup: int = 1
    device: str = "auto"
    lora_rank: int = 32
    switches: tuple[str, ...] = SWITCHES
    data_images: int = 20
    data_epochs: int = 3
    num_workers: int = 2
    parts: tuple[str, ...] = PARTS
    drive_dir: str | None = None
    photographs: tuple[tuple[int, int], ...] = PHOTOGRAPHS


QUICK_SETTINGS = BenchmarkSettings(model_sizes=("tiny",), image_sizes=(256,), repeats=9, data_images=10)


# --------------------------------------------------------------------------------------------- measuring helpers


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device: cuda, cpu or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device.")
    return device


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _in_turns(variants: Mapping[Any, Any], round_index: int) -> list[tuple[Any, Any]]:
    """The variants of one timed round, in their order in even rounds and reversed in odd ones: whatever running
    first or after a given variant costs (a cache filled by the one before, a clock still ramping up) falls on each
    variant alike instead of always on the first."""
    items = list(variants.items())
    return items[::-1] if round_index % 2 else items


def _timed(function: Callable[..., Any], device: torch.device, *args: Any) -> float:
    """Seconds one call ``function(*args)`` takes, with the GPU's queued work included."""
    _synchronise(device)
    start = time.perf_counter()
    function(*args)
    _synchronise(device)
    return time.perf_counter() - start


def _peak_memory_mib(device: torch.device) -> float:
    """CUDA: most memory allocated by tensors since the last reset; CPU: this process's resident high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING, force=True)
    # The benchmark builds from random weights on purpose; the warnings about it (random SAM 2 weights, LoRA on
    # them) would repeat per case.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _network(
    model_size: str, image_size: int, lora_rank: int, adapters: bool = True, finetune: str = "lora", **switches: bool
):
    """A randomly initialised SAM2LoRA with non-zero adapters (as after training), or SAM 2 without adapters.

    Args:
        model_size: Hiera size.
        image_size: encoder input side.
        lora_rank: adapter rank.
        adapters: False for SAM 2 without adapters (nothing trainable).
        finetune: the bundle's fine-tuning mode, which decides what trains (``"full"``: no adapters).
        switches: ``channels_last``, ``activation_checkpointing``.

    Returns:
        The network, on the CPU.
    """
    from scripts.lora import lora_modules
    from scripts.network import SAM2LoRA

    torch.manual_seed(0)
    targets = {} if adapters else {"lora_targets": ()}
    network = SAM2LoRA(
        model_size, random_init=True, image_size=image_size, lora_rank=lora_rank, finetune=finetune, **targets,
        **switches,
    )
    with torch.no_grad():
        for _, layer in lora_modules(network.sam2):
            layer.lora_B.normal_(std=0.02)
    return network


def training_recipe() -> dict[str, Any]:
    """The training recipe's values that a training step uses, read from the bundle's ``train.json`` (their one
    place): learning rate, weight decay, gradient clipping norm, number of positive prompt points."""
    config = json.loads((BUNDLE_CONFIGS / "train.json").read_text(encoding="utf-8"))
    keys = ("learning_rate", "weight_decay", "gradient_clip_norm", "prompt_positive_points")
    return {key: config[key] for key in keys}


def _tf32(enabled: bool) -> None:
    if torch.cuda.is_available():
        from scripts.acceleration import set_tf32

        set_tf32(enabled)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------- inference


def measure_inference(
    model_size: str,
    image_size: int,
    batch_size: int,
    repeats: int,
    warmup: int,
    device: str,
    lora_rank: int,
    switches: Sequence[str],
) -> list[dict]:
    """Latency and throughput of SAM 2, of the adapted network unmerged and merged, and of the switches on merged.

    The variants run in turns (one timed run of each, then the next round), so a load change on a shared
    machine affects them alike.

    Args:
        model_size: Hiera size.
        image_size: encoder input side; the inputs are already that size.
        batch_size: batch of the throughput measurement.
        repeats: timed rounds.
        warmup: untimed rounds first.
        device: ``cuda`` or ``cpu``.
        lora_rank: adapter rank.
        switches: switches to measure on the merged network (``channels_last``, ``bf16``, ``tf32``, ``compile``).

    Returns:
        One row per variant: ``latency_ms`` (median, batch 1), ``throughput`` (images per second at
        ``batch_size``), ``relative_latency`` (to SAM 2 without adapters, or to merged for a switch).
    """
    from scripts.adapters import tensor_state

    _quiet_logs()
    target = torch.device(device)
    _tf32(False)
    adapted = _network(model_size, image_size, lora_rank).to(target).eval()
    plain = _network(model_size, image_size, lora_rank, adapters=False).to(target).eval()
    plain.load_state_dict(tensor_state(adapted), strict=False)
    merged = copy.deepcopy(adapted)
    merged.merge_adapters()

    def call(network: torch.nn.Module, bf16: bool = False, tf32: bool = False) -> Callable[[torch.Tensor], Any]:
        def run(images: torch.Tensor) -> Any:
            _tf32(tf32)
            with torch.inference_mode(), _autocast(target, bf16):
                return network(images)

        return run

    variants: dict[str, Callable[[torch.Tensor], Any]] = {
        "SAM 2 (no adapters)": call(plain),
        "adapters unmerged": call(adapted),
        "adapters merged": call(merged),
    }
    if "channels_last" in switches:
        switched = _network(model_size, image_size, lora_rank, channels_last=True).to(target).eval()
        switched.load_state_dict(adapted.state_dict())
        switched.merge_adapters()
        variants["merged + channels_last"] = call(switched)
    if target.type == "cuda":
        if "bf16" in switches:
            variants["merged + bf16 autocast"] = call(merged, bf16=True)
        if "tf32" in switches:
            variants["merged + tf32"] = call(merged, tf32=True)
        if "compile" in switches:
            # Static shapes: batch 1 and then batch N would otherwise recompile into one dynamic-shape graph.
            variants["merged + compile"] = call(torch.compile(merged, dynamic=False))

    single = torch.randn(1, 3, image_size, image_size, device=target)
    batch = torch.randn(batch_size, 3, image_size, image_size, device=target)
    latencies: dict[str, list[float]] = {name: [] for name in variants}
    batch_times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + repeats):
        for name, run in _in_turns(variants, round_index):
            one, many = _timed(run, target, single), _timed(run, target, batch)
            if round_index >= warmup:
                latencies[name].append(one)
                batch_times[name].append(many)

    rows = []
    for name in variants:
        latency = statistics.median(latencies[name])
        reference = "adapters merged" if name.startswith("merged +") else "SAM 2 (no adapters)"
        rows.append(
            {
                "model_size": model_size,
                "image_size": image_size,
                "variant": name,
                "latency_ms": 1000 * latency,
                "latency_samples_ms": [1000 * seconds for seconds in latencies[name]],
                "throughput": batch_size / statistics.median(batch_times[name]),
                "relative_latency": latency / statistics.median(latencies[reference]),
                "relative_to": reference,
            }
        )
    return rows


def _drive_photographs(drive_dir: str, count: int = 4) -> list[Path]:
    """DRIVE's first ``count`` test photographs: the pictures of ``<drive_dir>/test/images``
    (:func:`scripts.fundus_io.image_files`: other files there, such as ``Thumbs.db``, are passed over).

    Args:
        drive_dir: DRIVE's folder, as ``--drive-dir`` gives it.
        count: how many photographs, at most.

    Returns:
        Their paths, sorted by name.

    Raises:
        ConfigError: the folder is missing or holds no photograph.
    """
    from scripts.fundus_io import SUPPORTED_SUFFIXES, image_files

    folder = Path(drive_dir) / "test" / "images"
    if not folder.is_dir():
        raise ConfigError(f"--drive-dir {drive_dir}: there is no folder {folder} of DRIVE's test photographs.")
    files = image_files(folder)
    if not files:
        raise ConfigError(
            f"--drive-dir {drive_dir}: {folder} holds no photograph ({', '.join(SUPPORTED_SUFFIXES)}, optionally .gz)."
        )
    return files[:count]


def _agreement_images(image_size: int, drive_dir: str | None, count: int = 4) -> tuple[torch.Tensor, str]:
    """Photographs resized to ``image_size`` and SAM-normalised: DRIVE's first test images, else synthetic ones."""
    import numpy as np
    from PIL import Image

    from scripts.fundus_io import read_image
    from scripts.synthetic import render_fundus
    from scripts.transforms import SAM_PIXEL_MEAN, SAM_PIXEL_STD

    if drive_dir:
        files = _drive_photographs(drive_dir, count)
        # read_image reads what the bundle reads (gzipped, 16-bit...) or names the file it cannot; PIL resizes 8 bits.
        pictures = [Image.fromarray(np.round(read_image(path) * 255).astype(np.uint8)) for path in files]
        source = f"DRIVE test images {', '.join(path.name for path in files)}"
    else:
        pictures = [Image.fromarray(render_fundus(512, index=index).image) for index in range(count)]
        source = "synthetic photographs (no --drive-dir given)"
    mean, std = np.array(SAM_PIXEL_MEAN), np.array(SAM_PIXEL_STD)
    arrays = [(np.asarray(p.resize((image_size, image_size), Image.BILINEAR)) / 255 - mean) / std for p in pictures]
    return torch.as_tensor(np.stack(arrays), dtype=torch.float32).permute(0, 3, 1, 2).contiguous(), source


def measure_backends(
    model_size: str, image_size: int, repeats: int, warmup: int, lora_rank: int, drive_dir: str | None = None
) -> list[dict]:
    """Latency (batch 1, CPU) of the merged network in PyTorch eager mode and through the onnxruntime backend in
    float32 and int8, and how far the backends' masks and probabilities are from PyTorch's on real photographs.

    The three run in turns. The exports are built first, in a temporary folder, and their build time is reported.

    Args:
        model_size: Hiera size.
        image_size: encoder input side.
        repeats: timed rounds.
        warmup: untimed rounds first.
        lora_rank: adapter rank.
        drive_dir: DRIVE's folder (``test/images``) for the agreement; synthetic photographs without it.

    Returns:
        One row per backend: ``latency_ms``, ``speed_up`` (PyTorch's latency over this one), ``export_s``,
        ``mask_dice`` (masks at logit 0 against PyTorch's, all images together), ``max_probability_difference``.
    """
    from scripts.onnx_backend import OnnxBackend

    _quiet_logs()
    network = _network(model_size, image_size, lora_rank).eval()
    network.merge_adapters()
    images, source = _agreement_images(image_size, drive_dir)
    device = torch.device("cpu")
    with torch.inference_mode():
        reference = torch.cat([network(image[None]) for image in images])

    def eager(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return network(batch)

    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"PyTorch eager (float32)": eager}
    exports: dict[str, float] = {"PyTorch eager (float32)": 0.0}
    with tempfile.TemporaryDirectory() as folder:
        for name, int8 in (("onnxruntime float32", False), ("onnxruntime int8", True)):
            backend = OnnxBackend(Path(folder) / f"model-{int8}.onnx", int8=int8)
            start = time.perf_counter()
            backend(images[:1], network)
            exports[name] = time.perf_counter() - start
            runs[name] = functools.partial(_call_backend, backend, network)
        latencies: dict[str, list[float]] = {name: [] for name in runs}
        for round_index in range(warmup + repeats):
            for name, run in _in_turns(runs, round_index):
                seconds = _timed(run, device, images[:1])
                if round_index >= warmup:
                    latencies[name].append(seconds)
        rows = []
        eager_latency = statistics.median(latencies["PyTorch eager (float32)"])
        for name, run in runs.items():
            logits = torch.cat([run(image[None]) for image in images])
            masks, expected = logits > 0, reference > 0
            overlap = 2 * (masks & expected).sum().item() / max(masks.sum().item() + expected.sum().item(), 1)
            latency = statistics.median(latencies[name])
            rows.append(
                {
                    "model_size": model_size,
                    "image_size": image_size,
                    "backend": name,
                    "latency_ms": 1000 * latency,
                    "latency_samples_ms": [1000 * seconds for seconds in latencies[name]],
                    "speed_up": eager_latency / latency,
                    "export_s": exports[name],
                    "mask_dice": overlap,
                    "max_probability_difference": (torch.sigmoid(logits) - torch.sigmoid(reference)).abs().max().item(),
                    "images": source,
                }
            )
    return rows


def _call_backend(backend: Any, network: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return backend(images, network)


def measure_prompt_modes(
    model_size: str, image_size: int, repeats: int, warmup: int, device: str, lora_rank: int
) -> list[dict]:
    """Seconds per photograph of the evaluation's inferer over the prompt-free mode alone and over all eight modes
    (:data:`scripts.prompts.PROMPT_MODES`), in turns, on one image with a disc-shaped reference for the oracle modes,
    and of the evaluation's metrics of those outputs (:func:`scripts.metrics.evaluate_case`, inside a circular
    field of view and over the whole image, as the bundle's evaluation computes them). The adapters are merged, as
    the evaluation merges them; the encoder's pass is shared by the modes; the metrics are computed once per mode.

    Args:
        model_size: Hiera size.
        image_size: encoder input side (the photograph is already that size).
        repeats: timed rounds.
        warmup: untimed rounds first.
        device: ``cuda`` or ``cpu``.
        lora_rank: adapter rank.

    Returns:
        Two rows: ``prompt_modes`` (1 or 8), ``seconds_per_image`` (the network's, median), ``relative`` (to the
        prompt-free mode), ``metrics_seconds_per_image`` (median), ``relative_with_metrics`` (network and metrics,
        to the same for the prompt-free mode).
    """
    from monai.data import MetaTensor

    from scripts.inferers import FundusInferer
    from scripts.metrics import evaluate_case
    from scripts.prompts import PROMPT_MODES

    _quiet_logs()
    target = torch.device(device)
    network = _network(model_size, image_size, lora_rank).to(target).eval()
    network.merge_adapters()  # as evaluate.json runs it (scripts.handlers.MergeAdapters)
    image = MetaTensor(
        torch.randn(1, 3, image_size, image_size, device=target),
        meta={"filename_or_obj": ["benchmark.png"], "spatial_shape": [[image_size, image_size]]},
    )
    rows, cols = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")
    disc = ((rows - image_size / 2) ** 2 + (cols - image_size / 3) ** 2 <= (image_size / 8) ** 2).float()
    fov = (rows - image_size / 2) ** 2 + (cols - image_size / 2) ** 2 <= (0.48 * image_size) ** 2
    label = disc[None, None].to(target)
    modes = {1: ["none"], len(PROMPT_MODES): list(PROMPT_MODES)}
    inferers = {count: FundusInferer(image_size=image_size, prompt_modes=names) for count, names in modes.items()}

    def infer(inferer: FundusInferer, outputs: list[torch.Tensor]) -> None:
        with torch.inference_mode():
            outputs.append(inferer(image, network, label=label))

    def score(logits: torch.Tensor, names: list[str]) -> None:
        probabilities = torch.sigmoid(logits[0].float())
        evaluate_case(probabilities, disc[None].repeat(len(names), 1, 1), fov, [f"disc@{n}" for n in names], topology=False)

    times: dict[int, list[float]] = {count: [] for count in modes}
    metric_times: dict[int, list[float]] = {count: [] for count in modes}
    for round_index in range(warmup + repeats):
        for count, inferer in _in_turns(inferers, round_index):
            outputs: list[torch.Tensor] = []
            elapsed = _timed(infer, target, inferer, outputs)
            scored = _timed(score, target, outputs[0], modes[count])
            if round_index >= warmup:
                times[count].append(elapsed)
                metric_times[count].append(scored)
    network_time = {count: statistics.median(values) for count, values in times.items()}
    metric_time = {count: statistics.median(values) for count, values in metric_times.items()}
    return [
        {
            "model_size": model_size,
            "image_size": image_size,
            "prompt_modes": count,
            "seconds_per_image": network_time[count],
            "relative": network_time[count] / network_time[1],
            "metrics_seconds_per_image": metric_time[count],
            "relative_with_metrics": (network_time[count] + metric_time[count]) / (network_time[1] + metric_time[1]),
        }
        for count in modes
    ]


def measure_input_modes(
    model_size: str,
    image_size: int,
    photograph: tuple[int, int],
    input_mode: str,
    repeats: int,
    warmup: int,
    device: str,
    lora_rank: int,
) -> dict:
    """Seconds per photograph and peak memory of one input mode; call it in a fresh process for the peak.

    ``resize``: the photograph resized to ``image_size`` square, one network pass, the logits resized back (what the
    bundle's anti-aliased ``Resized`` and ``Invertd`` do). ``sliding_window``: windows of ``image_size`` at native resolution
    (pixel scale 1), blended with the bundle's overlap, windows wholly outside the circular field of view skipped.
    Both give probabilities at the photograph's size.

    Args:
        model_size: Hiera size.
        image_size: encoder input side (the window's side in ``sliding_window``).
        photograph: ``(width, height)`` of the photograph.
        input_mode: ``resize`` or ``sliding_window``.
        repeats: timed runs.
        warmup: untimed runs first.
        device: ``cuda`` or ``cpu``.
        lora_rank: adapter rank.

    Returns:
        ``seconds_per_image`` (median), ``peak_memory_mib``, ``memory_before_mib`` (after the network and the
        photograph were built), ``windows_computed`` and ``windows_total`` per photograph (1 and 1 for ``resize``).
    """
    import torch.nn.functional as F

    from scripts.inferers import FundusInferer

    _quiet_logs()
    target = torch.device(device)
    network = _network(model_size, image_size, lora_rank).to(target).eval()
    network.merge_adapters()
    width, height = photograph
    overlap = json.loads((BUNDLE_CONFIGS / "inference.json").read_text(encoding="utf-8"))["window_overlap"]
    inferer = FundusInferer(input_mode, image_size=image_size, overlap=overlap)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, height, width, generator=generator).to(target)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    radius = 0.47 * min(height, width)  # a fundus camera's circular field of view, black corners outside it
    fov = (((rows - height / 2) ** 2 + (cols - width / 2) ** 2) <= radius**2).float()[None, None].to(target)

    def segment(photo: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if input_mode == "resize":
                side = (image_size, image_size)
                square = F.interpolate(photo, size=side, mode="bilinear", align_corners=False, antialias=True)
                logits = inferer(square, network)
                return torch.sigmoid(F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False))
            return torch.sigmoid(inferer(photo, network, fov=fov))

    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    before = _peak_memory_mib(target)
    times = [_timed(segment, target, image) for _ in range(warmup + repeats)][warmup:]
    runs = warmup + repeats
    return {
        "model_size": model_size,
        "image_size": image_size,
        "photograph": f"{width} x {height}",
        "input_mode": input_mode,
        "seconds_per_image": statistics.median(times),
        "peak_memory_mib": _peak_memory_mib(target),
        "memory_before_mib": before,
        "windows_computed": inferer.windows_computed // runs if input_mode == "sliding_window" else 1,
        "windows_total": inferer.windows_total // runs if input_mode == "sliding_window" else 1,
    }


def _window_too_large(model_size: str, image_size: int, photograph: tuple[int, int]) -> dict:
    """The row of a photograph smaller than the window: there is nothing to slide over at native resolution."""
    return {
        "model_size": model_size,
        "image_size": image_size,
        "photograph": f"{photograph[0]} x {photograph[1]}",
        "input_mode": "sliding_window",
        "seconds_per_image": None,
        "note": f"not measured: the photograph is smaller than the {image_size} px window at native resolution",
    }


# ---------------------------------------------------------------------------------------------------- training


def measure_training(
    model_size: str,
    image_size: int,
    batch_size: int,
    repeats: int,
    warmup: int,
    device: str,
    lora_rank: int,
    full: bool,
    switches: Sequence[str] = (),
) -> dict:
    """Step time and peak memory of one training configuration; call it in a fresh process for the peak.

    One step, timed alone: SAM2LoRA forward on a fixed random batch with ``train.json``'s number of positive points
    per image, the paper's composite loss (BCE + Dice + focal Tversky + IoU term), backward, gradient clipping at
    ``train.json``'s norm, then an AdamW step with its learning rate and weight decay. The optimiser steps every
    iteration and the step runs in float32 (without TF32) unless ``bf16`` or ``tf32`` is among ``switches``; the
    bundle's trainer instead accumulates gradients over ``train.json``'s ``accumulation_steps`` (4) iterations per
    optimiser step and, on CUDA, autocasts to bf16 (``amp``) with TF32 on, and its batches come from the data
    pipeline (see :func:`measure_data_loading`).

    Args:
        model_size: Hiera size.
        image_size: encoder input side.
        batch_size: images per step.
        repeats: timed steps.
        warmup: untimed steps first (they also allocate AdamW's state).
        device: ``cuda`` or ``cpu``.
        lora_rank: adapter rank (LoRA only).
        full: full fine-tuning (``finetune="full"`` as the bundle builds it: every SAM 2 weight the network runs
            trainable, no adapters) instead of LoRA.
        switches: ``channels_last``, ``activation_checkpointing``, ``bf16``, ``tf32``, ``compile``.

    Returns:
        ``step_time_s`` (median), ``peak_memory_mib``, ``memory_before_steps_mib`` (same measure, after the
        network and the batch were built), ``trainable_parameters`` and ``total_parameters``.
    """
    from scripts.losses import CompositeLoss

    _quiet_logs()
    target = torch.device(device)
    _tf32("tf32" in switches)
    network_switches = {name: True for name in ("channels_last", "activation_checkpointing") if name in switches}
    finetune = "full" if full else "lora"
    network = _network(model_size, image_size, lora_rank, finetune=finetune, **network_switches).to(target).train()
    trainable, total = network.count_parameters()
    parameters = [p for p in network.parameters() if p.requires_grad]
    recipe = training_recipe()
    optimizer = torch.optim.AdamW(parameters, lr=recipe["learning_rate"], weight_decay=recipe["weight_decay"])
    loss_function = CompositeLoss(iou_source=network)
    forward = torch.compile(network) if "compile" in switches else network

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(target)
    labels = (torch.rand(batch_size, 1, image_size, image_size, generator=generator) > 0.85).float().to(target)
    count = recipe["prompt_positive_points"]
    points = (torch.rand(batch_size, count, 2, generator=generator) * image_size).to(target)
    point_labels = torch.ones(batch_size, count, dtype=torch.int64, device=target)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(target, "bf16" in switches):
            loss = loss_function(forward(images, points, point_labels), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, recipe["gradient_clip_norm"])
        optimizer.step()

    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    before = _peak_memory_mib(target)
    times = [_timed(step, target) for _ in range(warmup + repeats)][warmup:]
    return {
        "model_size": model_size,
        "image_size": image_size,
        "batch_size": batch_size,
        "mode": "full fine-tuning" if full else "LoRA",
        "switches": list(switches),
        "step_time_s": statistics.median(times),
        "step_samples_s": times,
        "peak_memory_mib": _peak_memory_mib(target),
        "memory_before_steps_mib": before,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }


# ------------------------------------------------------------------------------------------------ data pipeline


def measure_data_loading(
    model_size: str,
    image_size: int,
    batch_size: int,
    device: str,
    num_workers: int,
    data_images: int,
    epochs: int,
) -> dict:
    """Run the bundle's training workflow and time the wait for each batch against the step that uses it.

    ``train.json`` + ``quickstart.json`` (synthetic pictures rendered into a temporary folder) are parsed with
    MONAI's ConfigParser and their ``train#trainer`` is run as configured, without its handlers (validation,
    checkpoints and logging are not the data pipeline). Iterations of the first epoch are not counted: caching
    happens when the CacheDataset is built, and the first batches pay the workers' start-up.

    Args:
        model_size: Hiera size of the trained network.
        image_size: encoder input side (the cached, resized image size).
        batch_size: images per step.
        device: ``cuda`` or ``cpu``.
        num_workers: DataLoader workers.
        data_images: synthetic pictures to render (about 60% of them train).
        epochs: epochs to run, at least 2.

    Returns:
        Medians of ``data_time_ms`` and ``step_time_ms`` per iteration, their ratio ``data_fraction``, the
        number of measured ``iterations`` and ``cache_time_s`` (building the CacheDataset).
    """
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    _quiet_logs()
    with tempfile.TemporaryDirectory(prefix="sam2lora-benchmark-") as folder:
        parser = ConfigParser()
        parser.read_config([str(BUNDLE_CONFIGS / "train.json"), str(BUNDLE_CONFIGS / "quickstart.json")])
        parser.update(
            {
                "bundle_root": folder,
                "ckpt_dir": folder,
                "dataset_dir": folder,
                "device": f"$torch.device('{device}')",
                "model_size": model_size,
                "image_size": image_size,
                "batch_size": batch_size,
                "num_workers": num_workers,
                "max_epochs": epochs,
                "synthetic_images": data_images,
                "synthetic_image_size": max(image_size, 256),
                "train#handlers": [],
            }
        )
        parser.get_parsed_content("datalist")  # render the pictures before the clock starts
        start = time.perf_counter()
        dataset = parser.get_parsed_content("train#dataset")
        cache_time = time.perf_counter() - start
        trainer = parser.get_parsed_content("train#trainer")
        target = torch.device(device)
        marks: dict[str, float] = {}
        data_times: list[float] = []
        step_times: list[float] = []

        def mark(name: str) -> Callable[[Any], None]:
            def record(engine: Any) -> None:
                if name.endswith("completed"):
                    _synchronise(target)
                marks[name] = time.perf_counter()
                if name == "iteration_completed" and engine.state.epoch > 1:
                    data_times.append(marks["batch_completed"] - marks["batch_started"])
                    step_times.append(marks["iteration_completed"] - marks["iteration_started"])

            return record

        trainer.add_event_handler(Events.GET_BATCH_STARTED, mark("batch_started"))
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED, mark("batch_completed"))
        trainer.add_event_handler(Events.ITERATION_STARTED, mark("iteration_started"))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, mark("iteration_completed"))
        trainer.run()
    data_time, step_time = statistics.median(data_times), statistics.median(step_times)
    return {
        "model_size": model_size,
        "image_size": image_size,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "training_images": len(dataset),
        "iterations": len(data_times),
        "cache_time_s": cache_time,
        "data_time_ms": 1000 * data_time,
        "step_time_ms": 1000 * step_time,
        "data_fraction": data_time / step_time,
    }


# ------------------------------------------------------------------------------------------- photograph I/O


def measure_photograph_io(photograph: tuple[int, int], repeats: int) -> dict:
    """Seconds per photograph of what inference does outside the network, in the bundle's own components.

    The photograph is a synthetic fundus picture (:func:`scripts.synthetic.render_fundus`) on a black canvas of the
    photograph's proportions, at its size, saved as a JPEG as cameras write them; its vessel mask stands for the
    network's probabilities. ``read``: :class:`scripts.transforms.LoadFundusd` without a field-of-view file
    (decoding, estimating the field of view); ``write``: :class:`scripts.writers.SaveFundusPredictiond` as
    ``inference.json`` sets it, without measuring (mask, probabilities and overlay, restricted to the estimated
    field of view); ``measure``: the same writer measuring too, less ``write``.

    Args:
        photograph: ``(width, height)``.
        repeats: timed runs of each step; their medians are reported.

    Returns:
        ``read_s``, ``write_s`` and ``measure_s`` per photograph, and ``megapixels``.
    """
    import numpy as np
    from PIL import Image

    from scripts.synthetic import MIN_SIZE, render_fundus
    from scripts.transforms import LoadFundusd
    from scripts.writers import SaveFundusPredictiond

    width, height = photograph
    side = max(min(width, height), MIN_SIZE)
    picture = render_fundus(size=side, seed=0)
    canvas = (side * width // min(width, height), side * height // min(width, height))
    top, left = (canvas[1] - side) // 2, (canvas[0] - side) // 2
    image, vessels = np.zeros((canvas[1], canvas[0], 3), np.uint8), np.zeros((canvas[1], canvas[0]), np.uint8)
    image[top : top + side, left : left + side] = picture.image
    vessels[top : top + side, left : left + side] = 255 * picture.vessels
    inference = json.loads((BUNDLE_CONFIGS / "inference.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="sam2lora-benchmark-") as folder:
        source = Path(folder) / "photograph.jpg"
        Image.fromarray(image).resize(photograph, Image.BILINEAR).save(source, quality=95)
        probabilities = np.asarray(Image.fromarray(vessels).resize(photograph, Image.BILINEAR), np.float32)[None] / 255
        load = LoadFundusd()
        writers = {
            measure: SaveFundusPredictiond(
                "pred",
                Path(folder) / "outputs",
                threshold=inference["threshold"],
                restrict_to_fov=inference["restrict_to_fov"],
                measure=measure,
            )
            for measure in (False, True)
        }

        def timed(step: Callable[[], Any]) -> float:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        read = timed(lambda: load({"image": str(source)}))
        write = timed(lambda: writers[False].write(probabilities, source))
        write_and_measure = timed(lambda: writers[True].write(probabilities, source))
    return {
        "photograph": f"{width} x {height}",
        "megapixels": width * height / 1e6,
        "read_s": read,
        "write_s": write,
        "measure_s": max(write_and_measure - write, 0.0),
    }


# ----------------------------------------------------------------------------------------------------- running


def _as_the_bundle_runs(function: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Call ``function`` after the process settings the bundle's workflows make in their ``initialize``."""
    from scripts.acceleration import keep_freed_memory

    keep_freed_memory()
    return function(**kwargs)


def _in_fresh_process(function: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``function`` in a new (spawned) Python process, so that its peak memory is its own, keeping freed memory
    as the bundle's workflows do."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_as_the_bundle_runs, function, kwargs).result()


def _machine(device: torch.device) -> dict:
    import monai

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    machine = {
        "device": device.type,
        "accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)",
        "cpu": cpu,
        "cpu_cores": multiprocessing.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": _load_average(),
    }
    return machine


def _load_average() -> float | None:
    """The system's load average over the last minute; None where the system does not say (Windows)."""
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _measured_switches(switches: Sequence[str], device: torch.device) -> tuple[str, ...]:
    """The switches of ``switches`` that are measured on ``device``: the CUDA-only ones are left out on a CPU."""
    return tuple(s for s in switches if device.type == "cuda" or s not in CUDA_ONLY_SWITCHES)


def run_benchmark(settings: BenchmarkSettings, progress: Callable[[dict], None] | None = None) -> dict:
    """Measure everything ``settings`` asks for; every training and data configuration in its own process.

    Args:
        settings: what to measure.
        progress: called with the report so far after each measurement (``main`` saves it, so a run stopped
            part-way keeps what it measured).

    Returns:
        The report: ``machine``, ``settings``, ``inference``, ``training``, ``data_loading``, ``targets`` rows.
    """
    device = _resolve_device(settings.device)
    measured_switches = _measured_switches(settings.switches, device)
    common = {"batch_size": settings.batch_size, "device": str(device)}
    timing = {"repeats": settings.repeats, "warmup": settings.warmup, "lora_rank": settings.lora_rank}
    report: dict[str, Any] = {
        "machine": _machine(device),
        "settings": {**asdict(settings), "measured_switches": list(measured_switches)},
        "inference": [],
        "training": [],
        "prompt_modes": [],
        "data_loading": [],
        "backends": [],
        "input_modes": [],
        "photograph_io": [],
    }

    def add(part: str, rows: list[dict]) -> None:
        # The benchmark alone keeps about torch_threads cores busy: a higher load means other work shared the CPU.
        load = _load_average()
        report[part] += [{**row, "load_average_1min": load} for row in rows]
        if progress is not None:
            progress(report)

    for model_size in settings.model_sizes:
        for image_size in settings.image_sizes:
            case = {"model_size": model_size, "image_size": image_size, **common}
            if "inference" in settings.parts:
                _log(f"inference: Hiera-{model_size}, {image_size} px")
                add("inference", _in_fresh_process(measure_inference, **case, **timing, switches=measured_switches))
            if "prompt_modes" in settings.parts:
                _log(f"prompt modes: Hiera-{model_size}, {image_size} px")
                add(
                    "prompt_modes",
                    _in_fresh_process(
                        measure_prompt_modes, model_size=model_size, image_size=image_size, device=str(device), **timing
                    ),
                )
            if "backends" in settings.parts:
                _log(f"CPU backends: Hiera-{model_size}, {image_size} px")
                add(
                    "backends",
                    _in_fresh_process(
                        measure_backends, model_size=model_size, image_size=image_size, drive_dir=settings.drive_dir,
                        **timing,
                    ),
                )
            for photograph in settings.photographs if "input_modes" in settings.parts else ():
                for input_mode in ("resize", "sliding_window"):
                    _log(f"input mode {input_mode}: Hiera-{model_size}, {image_size} px, {photograph[0]} x {photograph[1]}")
                    if input_mode == "sliding_window" and min(photograph) < image_size:
                        add("input_modes", [_window_too_large(model_size, image_size, photograph)])
                        continue
                    add(
                        "input_modes",
                        [
                            _in_fresh_process(
                                measure_input_modes,
                                model_size=model_size,
                                image_size=image_size,
                                photograph=photograph,
                                input_mode=input_mode,
                                device=str(device),
                                **timing,
                            )
                        ],
                    )
            if "training" not in settings.parts:
                continue
            # The switches first: a compilation is what outlasts a GPU stage's time, after the plain steps.
            configurations: list[tuple[bool, tuple[str, ...]]] = [
                (False, (s,)) for s in measured_switches if s != "activation_checkpointing"
            ]
            if "activation_checkpointing" in measured_switches:
                configurations += [(False, ("activation_checkpointing",)), (True, ("activation_checkpointing",))]
            configurations += [(False, ()), (True, ())]
            for full, switches in configurations:
                name = ("full fine-tuning" if full else "LoRA") + "".join(f" + {s}" for s in switches)
                _log(f"training: Hiera-{model_size}, {image_size} px, {name}")
                add("training", [_in_fresh_process(measure_training, **case, **timing, full=full, switches=switches)])
    for image_size in settings.image_sizes if "data_loading" in settings.parts else ():
        model_size = settings.model_sizes[0]
        _log(f"data pipeline: Hiera-{model_size}, {image_size} px, {settings.num_workers} workers")
        add(
            "data_loading",
            [
                _in_fresh_process(
                    measure_data_loading,
                    model_size=model_size,
                    image_size=image_size,
                    num_workers=settings.num_workers,
                    data_images=settings.data_images,
                    epochs=settings.data_epochs,
                    **common,
                )
            ],
        )
    for photograph in settings.photographs if "photograph_io" in settings.parts else ():
        _log(f"photograph I/O: {photograph[0]} x {photograph[1]}")
        add(
            "photograph_io",
            [_in_fresh_process(measure_photograph_io, photograph=photograph, repeats=settings.repeats)],
        )
    report["targets"] = _targets(report)
    return report


def _targets(report: dict) -> list[dict]:
    """The issue's targets for every size measured: ratio, limit and whether it is met."""
    rows = []
    for model_size in report["settings"]["model_sizes"]:
        for image_size in report["settings"]["image_sizes"]:
            inference = {r["variant"]: r for r in _select(report["inference"], model_size, image_size)}
            training = {r["mode"]: r for r in _select(report["training"], model_size, image_size) if not r["switches"]}
            prompt_modes = [r for r in _select(report["prompt_modes"], model_size, image_size) if r["prompt_modes"] > 1]
            ratios = {}  # only those whose measurements were asked for (--parts)
            if "adapters merged" in inference:
                ratios["merged_latency_ratio"] = inference["adapters merged"]["relative_latency"]
            if "LoRA" in training and "full fine-tuning" in training:
                lora, full = training["LoRA"], training["full fine-tuning"]
                ratios["lora_memory_ratio"] = lora["peak_memory_mib"] / full["peak_memory_mib"]
                ratios["lora_step_memory_ratio"] = _memory_growth(lora) / max(_memory_growth(full), 1e-9)
                ratios["lora_step_time_ratio"] = lora["step_time_s"] / full["step_time_s"]
            if prompt_modes:
                ratios["prompt_modes_ratio"] = prompt_modes[0]["relative"]
                ratios["prompt_modes_metrics_ratio"] = prompt_modes[0]["relative_with_metrics"]
            for name, key, limit in TARGETS:
                if key in ratios:
                    rows.append(
                        _target_row(name, model_size, image_size, ratios[key], limit, strict=key in STRICT_TARGETS)
                    )
    name, limit = DATA_TARGET
    for row in report["data_loading"]:
        rows.append(_target_row(name, row["model_size"], row["image_size"], row["data_fraction"], limit))
    for row in report.get("backends", []):
        for backend, key, name, limit in BACKEND_TARGETS:
            if row["backend"] == backend:
                rows.append(_target_row(name, row["model_size"], row["image_size"], row[key], limit, at_least=True))
    return rows


def _memory_growth(row: dict) -> float:
    return row["peak_memory_mib"] - row["memory_before_steps_mib"]


def _target_row(
    name: str,
    model_size: str,
    image_size: int,
    value: float,
    limit: float | None,
    strict: bool = False,
    at_least: bool = False,
) -> dict:
    if limit is None:
        met = None
    elif at_least:
        met = value >= limit
    else:
        met = value < limit if strict else value <= limit
    return {
        "target": name,
        "model_size": model_size,
        "image_size": image_size,
        "value": value,
        "limit": limit,
        "met": met,
    }


def _select(rows: list[dict], model_size: str, image_size: int) -> Iterator[dict]:
    return (r for r in rows if r["model_size"] == model_size and r["image_size"] == image_size)


# ------------------------------------------------------------------------------------------------------ output


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _load_note(report: dict) -> str:
    """The load average the parts ran under, and a caution where other work shared the CPU."""
    machine, threads = report["machine"], report["machine"]["torch_threads"]
    # The data pipeline's DataLoader workers are the benchmark's own load too.
    own = {part: threads + (report["settings"]["num_workers"] if part == "data_loading" else 0) for part in PARTS}
    rows = [(part, row) for part in PARTS for row in report.get(part, []) if row.get("load_average_1min") is not None]
    start = machine.get("load_average_at_start")
    if not rows or start is None:
        return "Load average: not recorded."
    loads = [row["load_average_1min"] for _, row in rows]
    note = f"Load average (1 min): {start:g} at the start, {min(loads):g}-{max(loads):g} at the end of the parts."
    busy = start > threads + 0.5 or any(row["load_average_1min"] > own[part] + 0.5 for part, row in rows)
    if busy:
        note += (
            f" Above the {machine['torch_threads']} threads the benchmark keeps busy: other work shared the CPU, and "
            "these figures (their ratios too) are not the machine's."
        )
    return note


def _with_range(median: float, samples: Sequence[float], decimals: int) -> str:
    """A median and the range of the timed runs it is the median of, e.g. ``812.4 (790.1-860.7)``: where the range
    is wide, the machine was not quiet or the figure is noise."""
    return f"{median:.{decimals}f} ({min(samples):.{decimals}f}-{max(samples):.{decimals}f})"


def render_markdown(report: dict) -> str:
    """The report as Markdown: the machine, then one table per measurement and the targets."""
    machine, settings = report["machine"], report["settings"]
    memory = "max allocated CUDA memory" if machine["device"] == "cuda" else "process peak RSS"
    parts = [
        "## Benchmark",
        (
            f"Machine: {machine['accelerator']}; CPU {machine['cpu']} ({machine['cpu_cores']} cores, "
            f"{machine['torch_threads']} torch threads); Python {machine['python']}, torch {machine['torch']}, "
            f"MONAI {machine['monai']}; {machine['date']}."
        ),
        _load_note(report),
        (
            f"Medians of {settings['repeats']} runs after {settings['warmup']} warm-up; batch "
            f"{settings['batch_size']}; LoRA rank {settings['lora_rank']}; random weights. Switches measured: "
            f"{', '.join(settings['measured_switches']) or 'none'}."
        ),
        "### Inference",
        _table(
            [
                "Hiera",
                "px",
                "variant",
                "latency (ms, batch 1; range)",
                f"throughput (img/s, batch {settings['batch_size']})",
                "latency ratio",
            ],
            [
                [
                    r["model_size"],
                    r["image_size"],
                    r["variant"],
                    _with_range(r["latency_ms"], r["latency_samples_ms"], 1),
                    f"{r['throughput']:.2f}",
                    f"{r['relative_latency']:.3f} (vs {r['relative_to']})",
                ]
                for r in report["inference"]
            ],
        ),
        "### Training step",
        _table(
            [
                "Hiera",
                "px",
                "configuration",
                "step (s; range)",
                f"peak memory (MiB, {memory})",
                "before steps (MiB)",
                "trainable / total parameters",
            ],
            [
                [
                    r["model_size"],
                    r["image_size"],
                    r["mode"] + "".join(f" + {s}" for s in r["switches"]),
                    _with_range(r["step_time_s"], r["step_samples_s"], 3),
                    f"{r['peak_memory_mib']:.0f}",
                    f"{r['memory_before_steps_mib']:.0f}",
                    f"{r['trainable_parameters']:,} / {r['total_parameters']:,}",
                ]
                for r in report["training"]
            ],
        ),
        (
            "### Evaluation over prompt modes (batch 1; one encoder pass, the mask decoder once prompt-free and once"
            " for all prompts; the metrics once per mode, inside the FOV and over the image)"
        ),
        _table(
            ["Hiera", "px", "prompt modes", "network (s / image)", "vs prompt-free alone", "metrics (s / image)",
             "network and metrics vs prompt-free alone"],
            [
                [r["model_size"], r["image_size"], r["prompt_modes"], f"{r['seconds_per_image']:.3f}",
                 f"{r['relative']:.2f}", f"{r['metrics_seconds_per_image']:.3f}", f"{r['relative_with_metrics']:.2f}"]
                for r in report["prompt_modes"]
            ],
        ),
        "### Data pipeline (bundle train.json, after the first epoch)",
        _table(
            [
                "Hiera",
                "px",
                "workers",
                "training images",
                "iterations",
                "CacheDataset build (s)",
                "data wait (ms/iteration)",
                "step (ms/iteration)",
                "data / step",
            ],
            [
                [
                    r["model_size"],
                    r["image_size"],
                    r["num_workers"],
                    r["training_images"],
                    r["iterations"],
                    f"{r['cache_time_s']:.1f}",
                    f"{r['data_time_ms']:.1f}",
                    f"{r['step_time_ms']:.0f}",
                    f"{r['data_fraction']:.3f}",
                ]
                for r in report["data_loading"]
            ],
        ),
        "### CPU backends (batch 1; masks and probabilities against PyTorch's)",
        _table(
            ["Hiera", "px", "backend", "latency (ms; range)", "speed-up", "export (s)", "mask Dice",
             "max probability diff.", "images"],
            [
                [r["model_size"], r["image_size"], r["backend"], _with_range(r["latency_ms"], r["latency_samples_ms"], 1),
                 f"{r['speed_up']:.2f}",
                 f"{r['export_s']:.0f}", f"{r['mask_dice']:.4f}", f"{r['max_probability_difference']:.2e}",
                 r["images"]]
                for r in report.get("backends", [])
            ],
        ),
        "### Input modes (batch 1; probabilities at the photograph's size; sliding window at native resolution)",
        _table(
            ["Hiera", "px", "photograph", "input mode", "s / image", f"peak memory (MiB, {memory})",
             "before (MiB)", "windows computed / total"],
            [
                [r["model_size"], r["image_size"], r["photograph"], r["input_mode"], f"{r['seconds_per_image']:.3f}",
                 f"{r['peak_memory_mib']:.0f}", f"{r['memory_before_mib']:.0f}",
                 f"{r['windows_computed']} / {r['windows_total']}"]
                if r["seconds_per_image"] is not None
                else [r["model_size"], r["image_size"], r["photograph"], r["input_mode"], r["note"], "-", "-", "-"]
                for r in report.get("input_modes", [])
            ],
        ),
        "### Photograph I/O (outside the network; seconds per photograph)",
        _table(
            ["photograph", "megapixels", "read: decode, FOV", "write: mask, probabilities, overlay", "measure"],
            [
                [r["photograph"], f"{r['megapixels']:.2f}", f"{r['read_s']:.3f}", f"{r['write_s']:.3f}",
                 f"{r['measure_s']:.3f}"]
                for r in report.get("photograph_io", [])
            ],
        ),
        "### Targets",
        _table(
            ["target", "Hiera", "px", "measured", "limit", "met"],
            [
                [
                    r["target"],
                    r["model_size"],
                    r["image_size"],
                    f"{r['value']:.3f}",
                    "-" if r["limit"] is None else r["limit"],
                    {None: "-", True: "yes", False: "**no**"}[r["met"]],
                ]
                for r in report["targets"]
            ],
        ),
    ]
    return "\n\n".join(parts) + "\n"


def write_report(report: dict, output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``benchmark.json`` and ``benchmark.md`` into ``output_dir``, each atomically.

    Returns:
        The two paths.

    Raises:
        OutputError: a file cannot be written (the previous one, if any, is left as it was).
    """
    folder = Path(output_dir)
    json_path, markdown_path = (folder / name for name in REPORT_FILES)
    markdown = render_markdown(report)  # first: should it fail, neither file is replaced
    write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
    write_text_atomic(markdown_path, markdown)
    return json_path, markdown_path


def _photograph(text: str) -> tuple[int, int]:
    """``"3504x2336"`` as ``(3504, 2336)``."""
    try:
        width, height = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 3504x2336") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be positive")
    return width, height


def _parse_arguments(argv: Sequence[str] | None) -> tuple[BenchmarkSettings, Path]:
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Hiera tiny at 256 px, 9 repeats: minutes on a CPU")
    parser.add_argument("--model-sizes", nargs="+", help="Hiera sizes (default: tiny large)")
    parser.add_argument("--image-sizes", nargs="+", type=int, help="encoder input sides (default: 1024)")
    parser.add_argument("--batch-size", type=int, help="training and throughput batch (default: 2)")
    parser.add_argument("--repeats", type=int, help="timed runs per figure (default: 5, quick: 9)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default: 1)")
    parser.add_argument("--device", help="cuda, cpu or auto (default)")
    parser.add_argument("--lora-rank", type=int, help="adapter rank (default: 32)")
    parser.add_argument(
        "--switches", nargs="*", choices=SWITCHES, help=f"switches to measure (default: all: {SWITCHES})"
    )
    parser.add_argument("--data-images", type=int, help="synthetic pictures for the data pipeline (default: 20)")
    parser.add_argument("--data-epochs", type=int, help="epochs of the data pipeline, first not counted (default: 3)")
    parser.add_argument("--num-workers", type=int, help="DataLoader workers of the data pipeline (default: 2)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, help=f"what to measure (default: all: {PARTS})")
    parser.add_argument("--drive-dir", type=path_argument, help="DRIVE folder: the CPU backends' agreement on its test photographs")
    parser.add_argument(
        "--photographs", nargs="+", type=_photograph, help="WIDTHxHEIGHT of the photographs of "
        "the input modes and photograph I/O (default: 3504x2336 565x584)"
    )
    parser.add_argument("--output-dir", default="benchmark", type=path_argument, help="where benchmark.json and benchmark.md go")
    arguments = parser.parse_args(argv)
    settings = QUICK_SETTINGS if arguments.quick else BenchmarkSettings()
    chosen = {
        "model_sizes": tuple(arguments.model_sizes) if arguments.model_sizes else None,
        "image_sizes": tuple(arguments.image_sizes) if arguments.image_sizes else None,
        "switches": tuple(arguments.switches) if arguments.switches is not None else None,
        "parts": tuple(arguments.parts) if arguments.parts else None,
        "photographs": tuple(arguments.photographs) if arguments.photographs else None,
        **{
            name: getattr(arguments, name)
            for name in (
                "batch_size",
                "repeats",
                "warmup",
                "device",
                "lora_rank",
                "data_images",
                "data_epochs",
                "num_workers",
                "drive_dir",
            )
        },
    }
    settings = replace(settings, **{name: value for name, value in chosen.items() if value is not None})
    from scripts.inputs import writable_folder
    from scripts.sam2_models import resolve_hiera_size
    from scripts.synthetic import MIN_COUNT

    # --data-images: the data pipeline's synthetic dataset needs an image for each of its three splits.
    least = {"repeats": 1, "batch_size": 1, "warmup": 0, "data_epochs": 2, "data_images": MIN_COUNT, "num_workers": 0}
    for name, value in least.items():
        if getattr(settings, name) < value:
            parser.error(f"--{name.replace('_', '-')} must be at least {value}, got {getattr(settings, name)}.")

    # Checked before anything is measured: a wrong name would otherwise stop the run in its worker, minutes in.
    device = _resolve_device(settings.device)
    if settings.warmup < 1 and "compile" in _measured_switches(settings.switches, device):
        raise ConfigError(
            "--warmup 0 with torch.compile measured (--switches compile, on CUDA): its compilation would be timed as "
            "a run; give --warmup 1 or more."
        )
    for model_size in settings.model_sizes:
        resolve_hiera_size(model_size)
    if settings.drive_dir is not None:
        _drive_photographs(settings.drive_dir)
    return settings, Path(writable_folder(arguments.output_dir))


@command_line
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the benchmark, print the Markdown table and write it as JSON and Markdown."""
    settings, output_dir = _parse_arguments(argv)
    # An earlier run's reports, a stopped run's partial one included, are moved aside before this run's first
    # progress write: a run with other --parts would replace measurements that took a GPU hours.
    keep_earlier_outputs(output_dir, (*REPORT_FILES, PARTIAL_REPORT), "benchmark")
    partial = output_dir / PARTIAL_REPORT
    report = run_benchmark(settings, progress=lambda so_far: write_text_atomic(partial, json.dumps(so_far, indent=2)))
    json_path, markdown_path = write_report(report, output_dir)
    partial.unlink(missing_ok=True)
    print(render_markdown(report))
    _log(f"written {json_path} and {markdown_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

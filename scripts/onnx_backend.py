"""The prompt-free network as ONNX, run by onnxruntime: the fast CPU inference path (``--backend onnxruntime``).

The network, adapters merged, is exported once with ``torch.onnx.export(dynamo=True)`` and cached next to the model
file; each later run checks that the cached file was built from the same weights, code and settings (a SHA-256 of
the merged weights, one of the code that defines the network, the versions of the libraries that export and run it,
the image size, the opset, int8 or not and how, the outputs) and that the file is the one its record describes (its own SHA-256),
and rebuilds it, with a log line, when it was not, or when onnxruntime cannot load it. ``onnx_int8`` adds onnxruntime's dynamic int8 quantization of the matrix products
(weights stored as int8 with a scale per output channel, activations quantized on the fly; convolutions and
attention stay float32).

The export takes ``image_size`` squares of SAM-normalised RGB (the bundle's preprocessing: the photograph resized,
or windows of it), has a dynamic batch dimension and returns mask logits (B, C, image_size, image_size) and, with the
SAM head, its predicted IoU of each channel's mask (B, C), which inference reports per image (``predicted_iou_*`` in
``measurements.csv``, the low-quality flag) and evaluation ranks (``quality_spearman``). Height and width are fixed:
SAM 2's code branches in Python on the input size, so torch.export specialises them; sliding-window inference
feeds windows of exactly that size. Prompts are not part of the exported function.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scripts.adapters import update_digest
from scripts.atomic import OutputError, atomic_path, file_sha256, write_json_atomic
from scripts.engines import unwrap_network
from scripts.errors import ConfigError, FundusError
from scripts.transforms import SAM_PIXEL_MEAN, SAM_PIXEL_STD

__all__ = [
    "BACKENDS",
    "DeployError",
    "OnnxBackend",
    "PromptFreeSegmenter",
    "check_onnx",
    "code_fingerprint",
    "cpu_network",
    "export_checked_onnx",
    "export_description",
    "export_onnx",
    "export_outputs",
    "inference_backend",
    "onnx_cache_path",
    "opset_range",
    "require_onnxruntime",
    "weights_fingerprint",
]

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")
# Opset 23 has ONNX's Attention operator: the exporter writes each scaled-dot-product attention as one node, which
# onnxruntime (1.23 and later) runs as one kernel instead of MatMul, Softmax and MatMul over the whole attention
# matrix. At Hiera-large, 1024 px, on the CPU: 10% faster in float32 and 15% faster in int8 than opset 18
# (docs/performance.md). Runtimes without opset 23 take ``python -m tools.deploy --opset 18``.
OPSET = 23
# The oldest opset torch's ONNX exporter (``torch.onnx.export(dynamo=True)``) writes: its operators (torchlib) are
# opset 18's, and onnxscript's version converter goes no lower. Asked for less, torch 2.14 logs a converter traceback
# and writes opset 18 all the same.
MIN_OPSET = 18
# The newest opset the exporter converts its graph to: onnxscript's version converter stops at 25 (0.7.2, with
# torch 2.14.1). Asked for more, the file keeps opset 18 with opset 23's Attention nodes, which onnxruntime refuses.
# The installed onnx and onnxruntime may stop earlier (:func:`opset_range`); each export's opset is checked anyway.
MAX_EXPORTER_OPSET = 25
# The first onnxruntime that runs opset 23 (pyproject's ``onnx`` extra asks for it; an older one already installed
# is named here rather than failing inside the export check).
MIN_ONNXRUNTIME = (1, 23)
# A build's own temporary files are younger: exporting and quantizing Hiera-large takes minutes.
LEFTOVER_AGE_S = 24 * 3600
# The largest batch the dynamic dimension admits; torch.export needs a bound, and 1024 images at 1024 px
# would not fit any accelerator anyway.
MAX_BATCH = 1024
# Largest logit difference between a fresh float32 export and PyTorch on one random image before it is refused;
# measured differences are about 1e-6 to 1e-4 (docs/distribution.md).
EXPORT_TOLERANCE = 1e-2
# onnxruntime's dynamic quantization of the matrix products, with a scale per output channel of each weight: at
# Hiera-large, 1024 px, the masks agree with PyTorch's at Dice 0.98-0.99 against 0.972 with one scale per tensor.
# Convolutions stay float32: onnxruntime's ConvInteger is slower than its float32 convolution (the U-Net head at
# 1024 px: 4.6 s with int8 convolutions against 1.6 s without), and the quantizer would turn ONNX's Attention
# nodes into its own QAttention, which does not take them (docs/performance.md). Recorded with each int8 export,
# so that an export made otherwise is rebuilt.
INT8_QUANTIZATION = {"weight_type": "QInt8", "per_channel": True, "op_types": ["MatMul"]}


class DeployError(FundusError, RuntimeError):
    """An export failed or its outputs do not match PyTorch's; the message names the file."""


def export_outputs(network: nn.Module) -> list[str]:
    """The outputs of an ONNX export of ``network``, in order: ``logits``, then ``iou_predictions`` for a network
    with SAM's IoU head (it keeps them as ``latest_iou_predictions``; the U-Net head has none)."""
    return ["logits", "iou_predictions"] if hasattr(network, "latest_iou_predictions") else ["logits"]


class PromptFreeSegmenter(nn.Module):
    """The network with its adapters merged, as one function of the image batch alone.

    ``forward`` returns the logits, as the network does (TorchScript and ``torch.export`` programs are of it);
    :meth:`outputs` returns what the ONNX export does, the SAM head's predicted IoU included.

    Args:
        network: a trained network of either head; its adapters are merged into the base weights (in place).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        network.merge_adapters()
        self.network = network
        self.image_size = network.settings["image_size"]
        self.output_names = export_outputs(network)
        self.eval()  # the wrapper too: exporters warn about a module left in training mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Mask logits (B, C, S, S) of ``images`` (B, 3, S, S)."""
        return self.network(images)

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The ONNX export's outputs for ``images``, in the order of :attr:`output_names`.

        Args:
            images: (B, 3, S, S), SAM-normalised.

        Returns:
            ``(logits,)`` for the U-Net head; ``(logits, iou_predictions)`` (B, C, S, S) and (B, C) for the SAM head.
        """
        if len(self.output_names) == 1:
            return (self.network(images),)
        # predict, not forward: the same computation without storing the IoU on the module while it is traced.
        output = self.network.predict(images)
        return output.logits, output.iou_predictions

    def example(self, batch: int = 2) -> torch.Tensor:
        """A random input of the exported shape."""
        generator = torch.Generator().manual_seed(0)
        return torch.randn(batch, 3, self.image_size, self.image_size, generator=generator)


class _OnnxOutputs(nn.Module):
    """What ``torch.onnx.export`` traces: :meth:`PromptFreeSegmenter.outputs` as a module's ``forward``.

    Args:
        model: the segmenter to export.
    """

    def __init__(self, model: PromptFreeSegmenter) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The export's outputs for ``images``; see :meth:`PromptFreeSegmenter.outputs`."""
        return self.model.outputs(images)


def batch_dim() -> torch.export.Dim:
    """The dynamic batch dimension of every export."""
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def export_description(model: PromptFreeSegmenter, source: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a pipeline needs to feed an export and read its output, as the ONNX file's ``metadata_props``
    (onnxruntime: ``session.get_modelmeta().custom_metadata_map``): the input's preparation and the settings the
    trained model records, values as JSON; and, as ``sam2lora.source``, where the export comes from when the
    caller says (``tools.deploy``: the model file's name and SHA-256, and the exporting release)."""
    settings = model.network.settings
    recorded = settings.get("recorded", {})
    description = {
        "input": "image (batch, 3, image_size, image_size): RGB in [0, 1], minus mean, over std, per channel",
        "mean": SAM_PIXEL_MEAN,
        "std": SAM_PIXEL_STD,
        "output": "logits (batch, channels, image_size, image_size): sigmoid, then threshold, per channel",
        **({"iou_predictions": "iou_predictions (batch, channels): SAM's predicted IoU of each channel's mask"}
           if "iou_predictions" in model.output_names else {}),
        "input_mode": recorded.get("input_mode", "resize"),
        "pixel_scale": recorded.get("pixel_scale", 1.0),
        **{key: settings[key] for key in ("image_size", "channel_names", "architecture", "model_size") if key in settings},
        **({"source": dict(source)} if source else {}),
    }
    return {f"sam2lora.{key}": json.dumps(value) for key, value in description.items()}


_EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")
"""The exporter's libraries, which log a line per folded constant and merged initialiser at INFO (about 280 for the
U-Net head): a run's own INFO lines would drown in them."""


@contextlib.contextmanager
def _exporter_logs_quiet() -> Iterator[None]:
    """Within the block, the exporter's libraries log warnings and errors only."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(max(each.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for each, level in zip(loggers, levels):
            each.setLevel(level)


def opset_range() -> tuple[range, str]:
    """The opsets an ONNX export can be written in and run with the installed libraries, and what bounds them.

    From :data:`MIN_OPSET` to the least of :data:`MAX_EXPORTER_OPSET`, the newest opset the installed onnx defines and
    the newest onnxruntime runs (the newest version of its operators: each opset changes at least one).

    Returns:
        The opsets, and a sentence naming each library's newest (``torch's exporter writes 18 to 25; ...``).

    Raises:
        ImportError: onnx or onnxruntime is not installed (:func:`require_onnxruntime` says so first).
    """
    import onnx
    import onnxruntime
    from onnxruntime.capi import _pybind_state

    onnxruntime_newest = max(
        schema.since_version
        for schema in _pybind_state.get_all_operator_schema()
        if schema.domain in ("", "ai.onnx")
    )
    newest = min(MAX_EXPORTER_OPSET, onnx.defs.onnx_opset_version(), onnxruntime_newest)
    limits = (
        f"torch's exporter writes {MIN_OPSET} to {MAX_EXPORTER_OPSET}; onnx {onnx.__version__} defines up to "
        f"{onnx.defs.onnx_opset_version()}; onnxruntime {onnxruntime.__version__} runs up to {onnxruntime_newest}"
    )
    return range(MIN_OPSET, newest + 1), limits


def _file_opset(path: str | os.PathLike) -> int | None:
    """The opset of the default (``ai.onnx``) domain an ONNX file imports; None where it imports none."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


def export_onnx(
    model: PromptFreeSegmenter,
    path: str | os.PathLike,
    opset: int = OPSET,
    source: Mapping[str, str] | None = None,
    destination: Path | None = None,
) -> Path:
    """Write ``model`` as ONNX (input ``image`` (batch, 3, S, S); outputs ``logits`` and, with the SAM head,
    ``iou_predictions`` (batch, C)), atomically, described by :func:`export_description` in its ``metadata_props``.

    Args:
        model: the network to export.
        path: the file to write.
        opset: the ONNX opset; a file the exporter writes in another is refused.
        source: where the export comes from, recorded as ``sam2lora.source`` (None: not recorded).
        destination: the file the export is for, named in errors (default ``path``, which may be a temporary file).

    Returns:
        ``path``.

    Raises:
        DeployError: the export failed, or the exporter wrote another opset than ``opset``; the message says why, and
            ``path`` is left as it was.
    """
    path = Path(path)
    destination = destination or path
    try:
        with _exporter_logs_quiet():
            program = torch.onnx.export(
                _OnnxOutputs(model),
                (model.example(),),
                dynamo=True,
                verbose=False,
                opset_version=opset,
                input_names=["image"],
                # The batch dimension of every output follows the input's, which is dynamic.
                output_names=model.output_names,
                dynamic_shapes={"images": {0: batch_dim()}},
            )
        program.model.metadata_props.update(export_description(model, source))
        # Each node's Python stack trace names this machine's files: the export would differ per checkout.
        for graph in program.model.graphs():
            for node in graph:
                node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
        with atomic_path(path) as partial:
            program.save(str(partial), external_data=False)
            # Where it cannot convert to the opset asked for, the exporter keeps its own (18), with a warning at most.
            written = _file_opset(partial)
            if written != opset:
                raise DeployError(
                    f"ONNX export to {destination} failed: torch's exporter wrote opset {written}, not the {opset} "
                    f"asked for (torch {torch.__version__}); it was not kept."
                )
    except (OutputError, DeployError):
        raise
    except Exception as error:  # the exporter raises many kinds of errors
        raise DeployError(f"ONNX export to {destination} failed ({type(error).__name__}: {error}).") from error
    return path


def export_checked_onnx(
    model: PromptFreeSegmenter,
    path: Path,
    destination: Path | None = None,
    opset: int = OPSET,
    images: torch.Tensor | None = None,
    source: Mapping[str, str] | None = None,
) -> float:
    """Export ``model`` to ``path`` and check it against PyTorch on ``images`` (default: one random image).

    Args:
        model: the network to export.
        path: the file to write (a temporary one while it is checked).
        destination: the file the export is for, named in errors (default ``path``).
        opset: the ONNX opset.
        images: the inputs of the check.
        source: where the export comes from (:func:`export_onnx`).

    Returns:
        The largest difference to PyTorch of its logits and, with the SAM head, predicted IoU.

    Raises:
        DeployError: the export failed, or its outputs differ from PyTorch's by more than ``EXPORT_TOLERANCE``.
    """
    destination = destination or path
    export_onnx(model, path, opset, source, destination)
    try:
        difference = check_onnx(path, model, model.example(batch=1) if images is None else images)
    except DeployError as error:
        cause = error.__cause__
        raise DeployError(f"onnxruntime cannot run the export for {destination} ({type(cause).__name__}: {cause}).") from cause
    if not difference <= EXPORT_TOLERANCE:
        raise DeployError(
            f"The float32 export for {destination} disagrees with PyTorch: largest logit difference "
            f"{difference:.3g} on random images (over {' and '.join(model.output_names)}; at most {EXPORT_TOLERANCE} "
            "expected); it was not kept."
        )
    return difference


def weights_fingerprint(network: nn.Module) -> str:
    """SHA-256 over every parameter's and buffer's name, dtype, shape and bytes, and the settings the network
    records: changes whenever a weight does."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            update_digest(digest, name, tensor)
        else:  # the settings record (``_extra_state``)
            digest.update(f"{name}:{json.dumps(tensor, sort_keys=True, default=str)};".encode())
    return digest.hexdigest()


def code_fingerprint(network: nn.Module) -> str:
    """SHA-256 over the code an export of ``network`` is made from: the bundle's ``scripts`` package, the source file
    of every other module class in the network (SAM 2's, MONAI's, torch's), and the versions of the libraries that
    export and run it. Changes when a ``git pull`` or an upgrade changes what the network computes."""
    own = Path(__file__).parent
    files = sorted(own.glob("*.py")) + sorted(own.glob("*/*.py"))
    for module in network.modules():
        # The class's module's file, not inspect.getsourcefile: MONAI Label unloads the bundle's modules between
        # requests, and inspect refuses a class whose module is no longer in sys.modules.
        source = getattr(sys.modules.get(type(module).__module__), "__file__", None)
        if source is not None and Path(source) not in files:
            files.append(Path(source))
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(own) if file.is_relative_to(own) else file.name}:".encode())
        digest.update(file.read_bytes())
    for library in ("torch", "sam2", "monai", "onnx", "onnxscript", "onnxruntime"):
        try:
            digest.update(f"{library}=={importlib.metadata.version(library)};".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{library} absent;".encode())
    return digest.hexdigest()


def cpu_network(network: nn.Module) -> nn.Module:
    """``network`` if it is on the CPU, else a CPU copy of it, built from its settings record and its weights moved
    tensor by tensor (a deep copy would first double its memory on the GPU). The export traces the CPU copy:
    onnxruntime runs on the CPU, and a trace on CUDA may pick CUDA-only kernels."""
    return network if next(network.parameters()).device.type == "cpu" else rebuilt_on_cpu(network)


def rebuilt_on_cpu(network: nn.Module) -> nn.Module:
    """A copy of the bundle's ``network`` on the CPU, built from its settings, with its weights (and merged state)."""
    from scripts.network import build_network, network_arguments

    copy_on_cpu = build_network(weights_follow=True, **network_arguments(dict(network.settings)))
    copy_on_cpu.load_state_dict({key: value.cpu() if isinstance(value, torch.Tensor) else value
                                 for key, value in network.state_dict().items()})
    return copy_on_cpu.eval()


def check_onnx(path: str | os.PathLike, model: PromptFreeSegmenter, images: torch.Tensor) -> float:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on ``images``.

    Args:
        path: the ONNX file.
        model: the network it was exported from.
        images: (B, 3, S, S) inputs.

    Returns:
        The largest difference between the two over every output of :attr:`PromptFreeSegmenter.output_names`
        (logits and, with the SAM head, predicted IoU, which the measurements and quality flags report).

    Raises:
        DeployError: onnxruntime cannot run the file, or it lacks one of those outputs.
    """
    try:
        onnx_outputs = _session(Path(path)).run(model.output_names, {"image": images.numpy().astype(np.float32)})
    except Exception as error:  # onnxruntime raises its own exception types per failure
        raise DeployError(f"onnxruntime cannot run {path} ({type(error).__name__}: {error}).") from error
    with torch.no_grad():
        torch_outputs = model.outputs(images)
    return max(float(np.abs(ours - theirs.numpy()).max()) for ours, theirs in zip(onnx_outputs, torch_outputs))


def _session(model: Path | bytes) -> Any:
    """An onnxruntime CPU session of an ONNX file, or of its bytes, running on as many threads as torch does.

    onnxruntime would take every core whatever the process was told (``OMP_NUM_THREADS``, ``torch.set_num_threads``):
    beside other workers of a clinic's server, or the processes of a pipeline, that oversubscribes the machine.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(
        model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"]
    )


class _ErrorsOnly(logging.Filter):
    """Passes errors (and worse) only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quantizer_logs_quiet() -> Iterator[None]:
    """Within the block, onnxruntime's quantizer logs errors only.

    It logs through the root logger itself (``logging.info``): a line per tensor without quantization parameters and
    advice to pre-process, 92 of an int8 run's 116 log lines, since the bundle's ``logging.conf`` puts the root at
    INFO. A filter on the root logger sees only what is logged on it directly, not the records of named loggers that
    reach its handlers, so the run's own lines (and other threads') still pass; the quantizer's named loggers are
    raised to ERROR. Both are restored on leaving, an error included.
    """
    root, named = logging.getLogger(), logging.getLogger("onnxruntime")
    quiet, level = _ErrorsOnly(), named.level
    root.addFilter(quiet)
    named.setLevel(max(named.getEffectiveLevel(), logging.ERROR))
    try:
        yield
    finally:
        root.removeFilter(quiet)
        named.setLevel(level)


class OnnxBackend:
    """Runs the prompt-free network through onnxruntime on the CPU, from an export cached at ``cache_path``.

    The first call exports the network it is given (adapters merged) unless the cache holds an export of the same
    weights and settings; later calls reuse the loaded session. A sidecar ``<cache_path>.json`` records what the
    file was built from, its outputs included: an export of the SAM head written before it had ``iou_predictions``
    is rebuilt, not run without them.

    Each call leaves the SAM head's predicted IoU of its images in :attr:`latest_iou_predictions`, as the PyTorch
    network does (None for the U-Net head), where :class:`scripts.inferers.FundusInferer` reads it.

    Args:
        cache_path: the ONNX file to keep (``model.pt`` -> ``model.onnxruntime.onnx`` in the bundle).
        int8: quantize the matrix products' weights to int8 (onnxruntime's dynamic quantization).
    """

    def __init__(self, cache_path: str | os.PathLike, int8: bool = False) -> None:
        self.cache_path = Path(cache_path)
        self.int8 = bool(int8)
        self.session: Any = None
        self.fingerprint: str | None = None
        self.rebuilt = False
        self.latest_iou_predictions: torch.Tensor | None = None

    def for_model(self, ckpt_path: str | os.PathLike) -> OnnxBackend:
        """A backend of the same kind whose export is cached next to ``ckpt_path``: a server whose model file is
        replaced (MONAI Label's training) or chosen per request takes a new one, since a backend keeps the session
        it built at its first call."""
        return OnnxBackend(onnx_cache_path(ckpt_path, self.int8), self.int8)

    def __call__(self, images: torch.Tensor, network: nn.Module) -> torch.Tensor:
        """Logits of ``images`` from the export of ``network``; the SAM head's predicted IoU goes to
        :attr:`latest_iou_predictions`.

        Args:
            images: (B, 3, S, S), SAM-normalised.
            network: the PyTorch network the export is (or is to be) made from.

        Returns:
            Logits (B, C, S, S) on ``images``' device.
        """
        if self.session is None:
            self.session = self._load_or_build(unwrap_network(getattr(network, "_orig_mod", network)))
        array = torch.as_tensor(images).detach().to("cpu", torch.float32).numpy()
        # The session's own outputs, checked against what the network exports when the cache was loaded or built.
        names = [output.name for output in self.session.get_outputs()]
        outputs = dict(zip(names, self.session.run(names, {"image": np.ascontiguousarray(array)})))
        iou = outputs.get("iou_predictions")
        self.latest_iou_predictions = None if iou is None else torch.from_numpy(iou).to(images.device)
        return torch.from_numpy(outputs["logits"]).to(images.device)

    def _settings(self, model: nn.Module) -> dict[str, Any]:
        return {
            "weights_sha256": weights_fingerprint(model),
            "image_size": int(model.settings["image_size"]),
            "opset": OPSET,
            # An int8 export records how it was quantized (a float32 one: False).
            "int8": INT8_QUANTIZATION if self.int8 else False,
            # The file's outputs: records of exports from before the SAM head's IoU was one have none, and their
            # files would run without it (no predicted IoU, no quality flags), so they are rebuilt.
            "outputs": export_outputs(model),
            "code_sha256": code_fingerprint(model),
        }

    def _load_or_build(self, network: nn.Module) -> Any:
        if getattr(network, "merge_adapters", None) is None or getattr(network, "settings", None) is None:
            raise ConfigError(
                f"backend 'onnxruntime' exports the bundle's SAM2LoRA or U-Net network; got {type(network).__name__}."
            )
        network.merge_adapters()
        wanted = self._settings(network)
        sidecar = self.cache_path.with_name(self.cache_path.name + ".json")
        # Read once: the bytes hashed are the bytes loaded, whatever another process moves into place meanwhile.
        cached = self.cache_path.read_bytes() if self.cache_path.is_file() else None
        reason = self._stale_reason(sidecar, wanted, cached)
        if reason is None:
            try:
                session = _session(cached)
                logger.info("onnxruntime: using the cached export %s.", self.cache_path)
                return session
            except Exception as error:  # onnxruntime raises its own exception types per failure
                reason = f"onnxruntime cannot load it ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        self.rebuilt = True
        folder = self.cache_path.parent
        if not os.access(folder, os.W_OK):  # a read-only mount, a shared install: export for this run only
            logger.warning(
                "onnxruntime: the model's folder %s cannot be written, so the export is not cached there (%s): this "
                "run exports the network for itself, and so will every run; make the folder writable, or copy the "
                "model into one that is.",
                folder,
                reason,
            )
            with tempfile.TemporaryDirectory(prefix="sam2lora-onnx-") as scratch:
                return self._build(network, Path(scratch) / self.cache_path.name)[0]
        self._remove_leftovers()
        if cached is None:
            logger.info("onnxruntime: exporting the network to %s (first use; later runs reuse it).", self.cache_path)
        else:
            logger.warning("onnxruntime: rebuilding %s: %s.", self.cache_path, reason)
        # The record goes first: an export killed or refused half-way must not pass later for the one it describes.
        sidecar.unlink(missing_ok=True)
        session, onnx_sha256 = self._build(network, self.cache_path)
        write_json_atomic(sidecar, {**wanted, "onnx_sha256": onnx_sha256})
        return session

    def _stale_reason(self, sidecar: Path, wanted: dict[str, Any], cached: bytes | None) -> str | None:
        """Why the cached export (its bytes, ``cached``; None: no file) cannot serve ``wanted``; None if it can."""
        if cached is None:
            return "no export yet"
        try:
            recorded = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return f"its record {sidecar.name} cannot be read ({type(error).__name__})"
        if not isinstance(recorded, dict):
            return f"its record {sidecar.name} is not a record of an export"
        changed = [key for key in wanted if recorded.get(key) != wanted[key]]
        if changed:
            names = {
                "weights_sha256": "other weights",
                "code_sha256": "other code or library versions",
                "outputs": f"other outputs than {' and '.join(wanted['outputs'])}",
            }
            return f"it was built from {', '.join(names.get(key, f'another {key}') for key in changed)}"
        # Another process's build, or a copy over the file, may have replaced it after its record was written.
        if recorded.get("onnx_sha256") != hashlib.sha256(cached).hexdigest():
            return f"it is not the file its record {sidecar.name} describes"
        return None

    def _remove_leftovers(self) -> None:
        """Remove what builds of this cache killed by SIGKILL left in its folder: hidden partial files and int8
        builds' float32 steps (about a GB at Hiera-large), those older than :data:`LEFTOVER_AGE_S`, so that a build
        another process is running keeps its own."""
        old = time.time() - LEFTOVER_AGE_S
        for path in self.cache_path.parent.glob(f".{self.cache_path.stem}.*"):
            try:
                if path.stat().st_mtime >= old:
                    continue
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                logger.info("onnxruntime: removed %s, left by a build that was killed.", path)
            except OSError as error:  # another process removed it first, or it cannot be: the build goes on
                logger.debug("onnxruntime: cannot remove %s (%s).", path, error)

    def _build(self, network: nn.Module, destination: Path) -> tuple[Any, str]:
        """Export (and quantize) into a file of this build's own, load it and hash it, then move it to
        ``destination``: two processes building one cache at once never check, quantize or describe each other's file.

        Returns:
            The onnxruntime session and the SHA-256 of the file it was loaded from.
        """
        model = PromptFreeSegmenter(cpu_network(network))
        with atomic_path(destination) as partial:
            if not self.int8:
                export_checked_onnx(model, partial, destination)
                return _session(partial), file_sha256(partial)
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with tempfile.TemporaryDirectory(prefix=f".{destination.stem}.", dir=destination.parent) as work:
                float_path = Path(work) / "float32.onnx"
                export_checked_onnx(model, float_path, destination)
                with _quantizer_logs_quiet():
                    quantize_dynamic(
                        str(float_path),
                        str(partial),
                        weight_type=QuantType[INT8_QUANTIZATION["weight_type"]],
                        per_channel=INT8_QUANTIZATION["per_channel"],
                        op_types_to_quantize=INT8_QUANTIZATION["op_types"],
                    )
            return _session(partial), file_sha256(partial)



def inference_backend(backend: str, ckpt_path: str | os.PathLike, int8: bool = False) -> OnnxBackend | None:
    """What ``inference.json``'s ``backend`` setting asks for: None for PyTorch, else an :class:`OnnxBackend` whose
    export is cached next to the model (``model.pt`` -> ``model.onnxruntime.onnx``, ``model.onnxruntime-int8.onnx``).

    Raises:
        ConfigError: an unknown backend, or onnxruntime is not installed.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}.")
    if backend == "torch":
        if int8:
            raise ConfigError("onnx_int8 True needs backend 'onnxruntime'.")
        return None
    require_onnxruntime("backend 'onnxruntime'")
    return OnnxBackend(onnx_cache_path(ckpt_path, int8), int8)


def require_onnxruntime(needed_by: str, opset: int = OPSET) -> None:
    """Check, before any export, that onnxruntime and the exporter's onnxscript are installed, and that onnxruntime
    runs ``opset`` (opset 23's ``Attention`` needs 1.23).

    Args:
        needed_by: what needs them, for the message (``"backend 'onnxruntime'"``).
        opset: the opset of the exports it will run.

    Raises:
        ConfigError: either is missing, or onnxruntime is too old; the message says what to install.
    """
    try:
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"{needed_by} needs onnxruntime and onnxscript ({error}): pip install onnxruntime onnxscript."
        ) from error
    installed = tuple(int(part) for part in re.findall(r"\d+", onnxruntime.__version__)[:2])
    if opset >= OPSET and installed < MIN_ONNXRUNTIME:
        raise ConfigError(
            f"{needed_by} needs onnxruntime {'.'.join(map(str, MIN_ONNXRUNTIME))} or later (its exports use opset "
            f"{OPSET}); installed: {onnxruntime.__version__}. pip install -U onnxruntime."
        )


def onnx_cache_path(ckpt_path: str | os.PathLike, int8: bool = False) -> Path:
    """Where the export of a model file is cached: ``model.pt`` -> ``model.onnxruntime.onnx`` (float32) or
    ``model.onnxruntime-int8.onnx``."""
    model = Path(ckpt_path)
    return model.with_name(model.stem + (".onnxruntime-int8.onnx" if int8 else ".onnxruntime.onnx"))

"""The prompt-free network as ONNX, run by onnxruntime: the fast CPU inference path (``--backend onnxruntime``).

The network, adapters merged, is exported once with ``torch.onnx.export(dynamo=True)`` and cached next to the model
file; each later run checks that the cached file was built from the same weights and settings (a SHA-256 of the
merged weights, the image size, the opset, int8 or not and how) and rebuilds it, with a log line, when it was not, or when
onnxruntime cannot load it. ``onnx_int8`` adds onnxruntime's dynamic int8 quantization of the matrix products
(weights stored as int8 with a scale per output channel, activations quantized on the fly; convolutions and
attention stay float32).

The export takes images already resized to ``image_size`` and SAM-normalised (the bundle's preprocessing), has a
dynamic batch dimension and returns mask logits (B, C, image_size, image_size). Height and width are fixed:
SAM 2's code branches in Python on the input size, so torch.export specialises them; sliding-window inference
feeds windows of exactly that size. Prompts are not part of the exported function.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scripts.atomic import OutputError, atomic_path, write_json_atomic
from scripts.engines import unwrap_network
from scripts.errors import ConfigError, FundusError

__all__ = [
    "BACKENDS",
    "DeployError",
    "OnnxBackend",
    "PromptFreeSegmenter",
    "check_onnx",
    "export_onnx",
    "inference_backend",
    "onnx_cache_path",
    "weights_fingerprint",
]

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")
# Opset 23 has ONNX's Attention operator: the exporter writes each scaled-dot-product attention as one node, which
# onnxruntime (1.23 and later) runs as one kernel instead of MatMul, Softmax and MatMul over the whole attention
# matrix. At Hiera-large, 1024 px, on the CPU: 10% faster in float32 and 15% faster in int8 than opset 18
# (docs/performance.md). Runtimes without opset 23 take ``python -m tools.deploy --opset 18``.
OPSET = 23
# The first onnxruntime that runs opset 23 (pyproject's ``onnx`` extra asks for it; an older one already installed
# is named here rather than failing inside the export check).
MIN_ONNXRUNTIME = (1, 23)
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


class PromptFreeSegmenter(nn.Module):
    """The network with its adapters merged, as one function of the image batch alone.

    Args:
        network: a trained network of either head; its adapters are merged into the base weights (in place).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        network.merge_adapters()
        self.network = network.eval()
        self.image_size = network.settings["image_size"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def example(self, batch: int = 2) -> torch.Tensor:
        """A random input of the exported shape."""
        generator = torch.Generator().manual_seed(0)
        return torch.randn(batch, 3, self.image_size, self.image_size, generator=generator)


def batch_dim() -> torch.export.Dim:
    """The dynamic batch dimension of every export."""
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def export_onnx(model: PromptFreeSegmenter, path: str | os.PathLike, opset: int = OPSET) -> Path:
    """Write ``model`` as ONNX (input ``image`` (batch, 3, S, S), output ``logits``), atomically.

    Raises:
        DeployError: the export failed; the message says why.
    """
    path = Path(path)
    try:
        with atomic_path(path) as partial:
            torch.onnx.export(
                model,
                (model.example(),),
                str(partial),
                dynamo=True,
                external_data=False,
                opset_version=opset,
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes={"images": {0: batch_dim()}},
            )
    except OutputError:
        raise
    except Exception as error:  # the exporter raises many kinds of errors
        raise DeployError(f"ONNX export to {path} failed ({type(error).__name__}: {error}).") from error
    return path


def weights_fingerprint(network: nn.Module) -> str:
    """SHA-256 over every parameter's and buffer's name, dtype, shape and bytes, and the settings the network
    records: changes whenever a weight does."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        if not isinstance(tensor, torch.Tensor):  # the settings record (``_extra_state``)
            digest.update(f"{name}:{json.dumps(tensor, sort_keys=True, default=str)};".encode())
            continue
        values = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{values.dtype}:{tuple(values.shape)};".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy() if values.numel() else b"")
    return digest.hexdigest()


def check_onnx(path: str | os.PathLike, model: PromptFreeSegmenter, images: torch.Tensor) -> float:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on ``images``; return the largest logit difference.

    Raises:
        DeployError: onnxruntime cannot run the file.
    """
    try:
        (onnx_logits,) = _session(Path(path)).run(["logits"], {"image": images.numpy().astype(np.float32)})
    except Exception as error:  # onnxruntime raises its own exception types per failure
        raise DeployError(f"onnxruntime cannot run {path} ({type(error).__name__}: {error}).") from error
    with torch.no_grad():
        torch_logits = model(images).numpy()
    return float(np.abs(onnx_logits - torch_logits).max())


def _session(path: Path) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class OnnxBackend:
    """Runs the prompt-free network through onnxruntime on the CPU, from an export cached at ``cache_path``.

    The first call exports the network it is given (adapters merged) unless the cache holds an export of the same
    weights and settings; later calls reuse the loaded session. A sidecar ``<cache_path>.json`` records what the
    file was built from.

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

    def for_model(self, ckpt_path: str | os.PathLike) -> OnnxBackend:
        """A backend of the same kind whose export is cached next to ``ckpt_path``: a server whose model file is
        replaced (MONAI Label's training) or chosen per request takes a new one, since a backend keeps the session
        it built at its first call."""
        return OnnxBackend(onnx_cache_path(ckpt_path, self.int8), self.int8)

    def __call__(self, images: torch.Tensor, network: nn.Module) -> torch.Tensor:
        """Logits of ``images`` (B, 3, S, S) from the export of ``network``; on ``images``' device."""
        if self.session is None:
            self.session = self._load_or_build(unwrap_network(getattr(network, "_orig_mod", network)))
        array = torch.as_tensor(images).detach().to("cpu", torch.float32).numpy()
        (logits,) = self.session.run(["logits"], {"image": np.ascontiguousarray(array)})
        return torch.from_numpy(logits).to(images.device)

    def _settings(self, model: nn.Module) -> dict[str, Any]:
        return {
            "weights_sha256": weights_fingerprint(model),
            "image_size": int(model.settings["image_size"]),
            "opset": OPSET,
            # An int8 export records how it was quantized (a float32 one: False).
            "int8": INT8_QUANTIZATION if self.int8 else False,
            "torch": torch.__version__,
        }

    def _load_or_build(self, network: nn.Module) -> Any:
        if getattr(network, "merge_adapters", None) is None or getattr(network, "settings", None) is None:
            raise ConfigError(
                f"backend 'onnxruntime' exports the bundle's SAM2LoRA or U-Net network; got {type(network).__name__}."
            )
        network.merge_adapters()
        wanted = self._settings(network)
        sidecar = self.cache_path.with_name(self.cache_path.name + ".json")
        reason = self._stale_reason(sidecar, wanted)
        if reason is None:
            try:
                session = _session(self.cache_path)
                logger.info("onnxruntime: using the cached export %s.", self.cache_path)
                return session
            except Exception as error:  # onnxruntime raises its own exception types per failure
                reason = f"onnxruntime cannot load it ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        logger.warning("onnxruntime: rebuilding %s: %s.", self.cache_path, reason)
        self.rebuilt = True
        # The record goes first: an export killed or refused half-way must not pass later for the one it describes.
        sidecar.unlink(missing_ok=True)
        session = self._build(network)
        write_json_atomic(sidecar, wanted)
        return session

    def _stale_reason(self, sidecar: Path, wanted: dict[str, Any]) -> str | None:
        if not self.cache_path.is_file():
            return "no export yet"
        try:
            recorded = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return f"its record {sidecar.name} cannot be read ({type(error).__name__})"
        changed = [key for key in wanted if recorded.get(key) != wanted[key]]
        if changed:
            what = "other weights" if "weights_sha256" in changed else ", ".join(f"another {key}" for key in changed)
            return f"it was built from {what}"
        return None

    def _build(self, network: nn.Module) -> Any:
        model = PromptFreeSegmenter(network)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.int8:
            self._export_checked(model, self.cache_path)
            return _session(self.cache_path)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # The float32 step gets a folder of its own per build: two processes building one int8 cache at once must
        # not quantize, or delete, each other's intermediate file.
        with tempfile.TemporaryDirectory(prefix=f".{self.cache_path.stem}.", dir=self.cache_path.parent) as work:
            float_path = Path(work) / "float32.onnx"
            self._export_checked(model, float_path)
            with atomic_path(self.cache_path) as partial:
                quantize_dynamic(
                    str(float_path),
                    str(partial),
                    weight_type=QuantType[INT8_QUANTIZATION["weight_type"]],
                    per_channel=INT8_QUANTIZATION["per_channel"],
                    op_types_to_quantize=INT8_QUANTIZATION["op_types"],
                )
        return _session(self.cache_path)

    def _export_checked(self, model: PromptFreeSegmenter, path: Path) -> None:
        export_onnx(model, path)
        difference = check_onnx(path, model, model.example(batch=1))
        if not difference <= EXPORT_TOLERANCE:
            raise DeployError(
                f"The float32 export for {self.cache_path} disagrees with PyTorch: largest logit difference "
                f"{difference:.3g} on a random image (at most {EXPORT_TOLERANCE} expected); use backend 'torch'."
            )


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
    try:
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"backend 'onnxruntime' needs onnxruntime and onnxscript ({error}): pip install onnxruntime onnxscript."
        ) from error
    if tuple(int(part) for part in re.findall(r"\d+", onnxruntime.__version__)[:2]) < MIN_ONNXRUNTIME:
        raise ConfigError(
            f"backend 'onnxruntime' needs onnxruntime {'.'.join(map(str, MIN_ONNXRUNTIME))} or later (its exports use "
            f"opset {OPSET}); installed: {onnxruntime.__version__}. pip install -U onnxruntime."
        )
    return OnnxBackend(onnx_cache_path(ckpt_path, int8), int8)


def onnx_cache_path(ckpt_path: str | os.PathLike, int8: bool = False) -> Path:
    """Where the export of a model file is cached: ``model.pt`` -> ``model.onnxruntime.onnx`` (float32) or
    ``model.onnxruntime-int8.onnx``."""
    model = Path(ckpt_path)
    return model.with_name(model.stem + (".onnxruntime-int8.onnx" if int8 else ".onnxruntime.onnx"))

"""Deployable exports of the prompt-free network, adapters merged: ONNX and torch.export programs.

``python -m tools.deploy --format onnx --ckpt_path model.pt --output model.onnx``

The network (head, Hiera size, image size, channels...) is built from the settings the model file records.

Every export takes ``image_size`` squares of SAM-normalised RGB (the whole photograph resized, or sliding windows at
``pixel_scale``, as the model's ``input_mode`` says; docs/distribution.md), has a dynamic batch dimension, and
returns mask logits (B, C, image_size, image_size); a SAM-head ONNX file also returns SAM's predicted IoU
(``iou_predictions``, (B, C)); ONNX files record how to feed them and which model file they come from in their
metadata. What works and what does not, measured with torch 2.15:

- ONNX through ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript): works, dynamic batch; checked
  against PyTorch with onnxruntime after writing. Height and width are fixed: SAM 2's code branches in Python
  on the input size (resize to ``image_size``, padding to Hiera's windows), so torch.export specialises them.
- TorchScript: not here but with MONAI's own ``python -m monai.bundle ckpt_export network_def --use_trace True
  --input_shape "[1, 3, S, S]" ...`` (docs/distribution.md), which works at the traced image size.
  ``torch.jit.script`` (``ckpt_export``'s default) does not: SAM 2's modules use Python constructs TorchScript
  cannot type (dictionaries keyed by tuples as caches, dataclass-like outputs, ``**kwargs``).
- torch.export (``.pt2``): works, dynamic batch, fixed height and width, as for ONNX; exported under
  ``torch.no_grad()`` so that the saved program loads again.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from scripts.adapters import ADAPTER_FORMAT, read_model_file
from scripts.atomic import OutputError, atomic_path, file_sha256
from scripts.errors import command_line
from scripts.onnx_backend import (
    MIN_OPSET,
    OPSET,
    DeployError,
    PromptFreeSegmenter,
    batch_dim,
    check_onnx,
    export_checked_onnx,
    export_onnx,
    opset_range,
    require_onnxruntime,
)
from tools import path_argument
from tools.export import ExportError, load_model, read_version

__all__ = [
    "FORMATS",
    "DeployError",
    "PromptFreeSegmenter",
    "base_in_use",
    "check_onnx",
    "check_output_name",
    "export_onnx",
    "export_program",
    "exporting_release",
    "main",
    "source_record",
]

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "exported_program")
SUFFIXES = {"onnx": ".onnx", "exported_program": ".pt2"}


def export_program(model: PromptFreeSegmenter, path: str | os.PathLike) -> Path:
    """Write ``model`` as a ``torch.export`` program (``.pt2``) with a dynamic batch, atomically.

    Raises:
        DeployError: the export failed.
    """
    path = Path(path)
    try:
        # Under no_grad: SAM 2's positional encoding is a @torch.no_grad() function, and a grad-mode switch inside
        # the graph becomes a node that torch.export.save writes but torch.export.load then rejects.
        with torch.no_grad():
            program = torch.export.export(model, (model.example(),), dynamic_shapes={"images": {0: batch_dim()}})
        with atomic_path(path) as partial:
            torch.export.save(program, str(partial))
    except OutputError:
        raise
    except Exception as error:  # torch.export raises many kinds of errors
        raise DeployError(f"torch.export to {path} failed ({type(error).__name__}: {error}).") from error
    return path


def load_segmenter(
    ckpt_path: str | os.PathLike, base_checkpoint: str | os.PathLike | None = None
) -> PromptFreeSegmenter:
    """The trained network of ``ckpt_path`` (a full state dict, or an adapter file on ``base_checkpoint``), built
    from the settings the file records."""
    return PromptFreeSegmenter(load_model(Path(ckpt_path), Path(base_checkpoint) if base_checkpoint else None))


def exporting_release() -> str:
    """This checkout's bundle release (``bundle/configs/metadata.json``): an editable install's package metadata
    keeps the version it was installed at, whatever the code has become since."""
    try:
        return f"sam2lora-fundus {read_version(Path(__file__).resolve().parents[1] / 'bundle')}"
    except ExportError:  # tools installed without the bundle's folder beside them
        try:
            return f"sam2lora-fundus {importlib.metadata.version('sam2lora-fundus')}"
        except importlib.metadata.PackageNotFoundError:
            return "sam2lora-fundus of an unknown release"


def source_record(ckpt_path: str | os.PathLike, base_checkpoint: str | os.PathLike | None = None) -> dict[str, str]:
    """Where an export comes from, for its ONNX metadata (``sam2lora.source``): the model file's name and SHA-256,
    the base checkpoint's where the model file holds adapters only, and the release that exported it
    (:func:`exporting_release`). A pipeline can check an ONNX file against the ``model.pt`` it was given with
    (``sha256sum model.pt``).

    Args:
        ckpt_path: the model file exported.
        base_checkpoint: the base checkpoint its adapters were loaded on, or None for a full model file.
    """
    record = {"model_file": Path(ckpt_path).name, "model_sha256": file_sha256(ckpt_path)}
    if base_checkpoint:
        record.update(base_checkpoint=Path(base_checkpoint).name, base_sha256=file_sha256(base_checkpoint))
    return {**record, "exported_by": exporting_release()}


def base_in_use(ckpt_path: str | os.PathLike, base_checkpoint: str | os.PathLike | None) -> str | os.PathLike | None:
    """``base_checkpoint`` if the model file holds adapters only (which need it), else None, with a warning when one
    was given for a full model file, which does not use it."""
    if base_checkpoint is None:
        return None
    if read_model_file(ckpt_path)[0].get("format") == ADAPTER_FORMAT:
        return base_checkpoint
    logger.warning(f"--base_checkpoint {base_checkpoint} is not used: {ckpt_path} holds the whole network.")
    return None


def check_output_name(export_format: str, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """``output`` if its suffix is the one of ``export_format`` and it does not exist (or may be replaced).

    Raises:
        DeployError: another suffix, which would give a file that tools expecting the format cannot open; or the
            file exists and ``overwrite`` is false.
    """
    path = Path(output)
    if path.suffix != SUFFIXES[export_format]:
        raise DeployError(
            f"--output {path} does not end in {SUFFIXES[export_format]}, the suffix of --format {export_format}."
        )
    if path.exists() and not overwrite:
        raise DeployError(f"{path} exists: choose another --output, or pass --overwrite to replace it.")
    return path


@command_line
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m tools.deploy --format FORMAT --ckpt_path model.pt --output FILE [...]``.

    Returns:
        The process exit status (0 on success).
    """
    parser = argparse.ArgumentParser(
        prog="python -m tools.deploy",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--ckpt_path", default="bundle/models/model.pt", type=path_argument, help="the trained model (model.pt)")
    parser.add_argument(
        "--base_checkpoint", default=None, type=path_argument, help="Meta's checkpoint, for a --ckpt_path holding adapters only"
    )
    parser.add_argument("--output", required=True, type=path_argument, help="the file to write (.onnx or .pt2)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--opset",
        type=int,
        help=f"--format onnx only: the ONNX opset, {MIN_OPSET} up to the newest the installed exporter, onnx and "
        f"onnxruntime all handle (default {OPSET}, whose Attention operator onnxruntime 1.23+ runs as one kernel; {MIN_OPSET} for runtimes "
        "without it)",
    )
    args = parser.parse_args(argv)
    if args.opset is not None and args.format != "onnx":  # an exported program has no opset: it would be ignored
        parser.error(f"argument --opset: --format {args.format} has no opset; --opset is for --format onnx.")
    if args.format == "onnx":  # it checks the export with onnxruntime: known before minutes of exporting
        args.opset = OPSET if args.opset is None else args.opset
        require_onnxruntime("--format onnx", args.opset)
        opsets, limits = opset_range()
        if args.opset not in opsets:
            parser.error(
                f"argument --opset: {args.opset} is not an opset this installation exports: choose "
                f"{opsets.start} to {opsets.stop - 1} ({limits})."
            )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = check_output_name(args.format, args.output, args.overwrite)
    model = load_segmenter(args.ckpt_path, args.base_checkpoint)
    base_checkpoint = base_in_use(args.ckpt_path, args.base_checkpoint)
    if args.format == "onnx":
        # Checked before it replaces --output: an export that disagrees with PyTorch is not kept.
        with atomic_path(output) as partial:
            difference = export_checked_onnx(
                model, partial, output, args.opset, model.example(batch=3), source_record(args.ckpt_path, base_checkpoint)
            )
        logger.info(
            "onnxruntime vs PyTorch on 3 random images: largest difference %.2e (%s).",
            difference,
            " and ".join(model.output_names),
        )
        path = output
    else:
        path = export_program(model, output)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Package the bundle as one self-contained archive that ``python -m monai.bundle download --url`` can fetch.

``python -m tools.export --output dist --ckpt_path runs/models/model.pt`` writes
``dist/sam2lora_fundus_<version>.zip`` holding one folder, ``sam2lora_fundus/``, with the configs, the custom
components (``scripts/``, so the bundle runs without this repository), the fine-tuned weights, the docs, the
LICENSE and ``large_files.yml``.

Weights (``--weights``):

- ``adapters`` (default): only the LoRA tensors (``models/adapters.pt``, a few MB); Meta's base checkpoint is named
  in ``large_files.yml`` with its SHA-256 and fetched by ``download_large_files``. Written only after checking
  that the base checkpoint plus the adapters rebuild the trained network bit for bit. A network trained from
  random initialisation, or on another base, has no public base to put the adapters on: the archive then
  carries the full weights instead, and says why in the log and in ``docs/weights.md``.
- ``full``: the trained state dict as it is (``models/model.pt``), base and adapters.
- ``merged``: the full weights with every adapter folded into its base weight, which makes inference as cheap
  as plain SAM 2 (the result equals ``full`` up to float rounding).

The network settings the model was trained with (Hiera size, image size, LoRA rank...) are read from the
bundle configs given with ``--config_file`` and ``--<key> <value>`` overrides, exactly as for
``python -m monai.bundle run``, and written into the archive's ``configs/inference.json``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.bundle import ConfigParser

import scripts
from scripts.atomic import atomic_path
from scripts.errors import FundusError, command_line
from scripts.network import SAM2LoRA
from scripts.sam2_models import CheckpointError, resolve_hiera_size

__all__ = [
    "BUNDLE_NAME",
    "NETWORK_SETTINGS",
    "WEIGHT_MODES",
    "ExportError",
    "ExportResult",
    "config_files",
    "export_bundle",
    "main",
    "parse_overrides",
]

logger = logging.getLogger(__name__)

BUNDLE_NAME = "sam2lora_fundus"
WEIGHT_MODES = ("adapters", "full", "merged")
# The config entries that define the network; inference.json in the archive gets their trained values.
NETWORK_SETTINGS = ("channel_names", "model_size", "image_size", "lora_rank", "lora_alpha", "lora_dropout")
ADAPTER_FILE = "adapters.pt"
FULL_FILE = "model.pt"
# What the archive copies from the bundle folder; models/, data/ and eval/ hold local files and run outputs.
BUNDLE_ITEMS = ("configs", "docs", "LICENSE", "large_files.yml")
# A fixed timestamp makes two exports of the same inputs byte-identical archives.
ZIP_DATE = (2020, 1, 1, 0, 0, 0)


class ExportError(FundusError, ValueError):
    """The bundle, the trained model or a setting cannot be packaged; the message names which and why."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_bundle` wrote.

    Args:
        archive: the zip file.
        weights: the weight mode used.
        reason: why it differs from the mode asked for; empty when it does not.
        settings: the network settings written into the archive's inference.json.
    """

    archive: Path
    weights: str
    reason: str
    settings: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_version(bundle_dir: Path) -> str:
    """The bundle's version from ``configs/metadata.json``, which must also be the newest changelog entry.

    Raises:
        ExportError: metadata.json is missing or unreadable, or its version has no changelog entry.
    """
    path = bundle_dir / "configs" / "metadata.json"
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(f"Bundle metadata {path} cannot be read ({error}).") from None
    version = metadata.get("version")
    changelog = metadata.get("changelog") or {}
    if not isinstance(version, str) or not version:
        raise ExportError(f"Bundle metadata {path} has no 'version'.")
    if version not in changelog:
        raise ExportError(f"Bundle metadata {path}: version {version} has no entry in 'changelog'; add one first.")
    if next(iter(changelog)) != version:
        raise ExportError(
            f"Bundle metadata {path}: version {version} is not the newest changelog entry ({next(iter(changelog))})."
        )
    return version


def network_settings(config_files: Sequence[str | os.PathLike], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The network settings resolved from bundle configs and overrides, as ``monai.bundle run`` resolves them.

    Returns:
        The values of :data:`NETWORK_SETTINGS` plus ``random_init``.

    Raises:
        ExportError: a config file is missing or a setting is absent.
    """
    for file in config_files:
        if not Path(file).is_file():
            raise ExportError(f"Config file {file} does not exist.")
    parser = ConfigParser()
    parser.read_config([str(file) for file in config_files])
    parser.update(dict(overrides))
    settings = {}
    for key in (*NETWORK_SETTINGS, "random_init"):
        if key not in parser:
            raise ExportError(f"The configs {[str(f) for f in config_files]} do not set '{key}'.")
        settings[key] = parser.get_parsed_content(key)
    settings["channel_names"] = list(settings["channel_names"])
    settings["model_size"] = resolve_hiera_size(settings["model_size"]).name
    settings["lora_alpha"] = float(settings["lora_alpha"])
    return settings


@contextmanager
def _quiet_random_init() -> Any:
    # The network is built from random weights only to have the right shapes: the trained weights replace them
    # at once, so the network module's "RANDOM weights" warning would be misleading here.
    network_logger = logging.getLogger("scripts.network")
    level = network_logger.level
    network_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        network_logger.setLevel(level)


def _build(settings: Mapping[str, Any], **weights: Any) -> SAM2LoRA:
    network = SAM2LoRA(
        model_size=settings["model_size"],
        out_channels=len(settings["channel_names"]),
        image_size=settings["image_size"],
        lora_rank=settings["lora_rank"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        **weights,
    )
    return network.eval()


def load_trained(ckpt_path: Path, settings: Mapping[str, Any]) -> SAM2LoRA:
    """The trained network: a ``model.pt`` written by the bundle (a state dict, or a training checkpoint whose
    ``"model"`` entry is one) loaded strictly into a network built with ``settings``.

    Raises:
        ExportError: the file is missing, unreadable, or does not fit the settings.
    """
    if not ckpt_path.is_file():
        raise ExportError(f"Trained model {ckpt_path} does not exist.")
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds of errors for damaged files
        raise ExportError(f"Trained model {ckpt_path} cannot be read ({type(error).__name__}: {error}).") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not any(key.endswith(".lora_A") for key in state):
        raise ExportError(f"Trained model {ckpt_path} is not a SAM2LoRA state dict (no LoRA adapter tensors).")
    with _quiet_random_init():
        network = _build(settings, random_init=True)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        summary = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(
            f"Trained model {ckpt_path} does not fit the network settings {dict(settings)} ({summary}); "
            "pass the configs and overrides it was trained with."
        ) from None
    return network


def differing_tensors(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors are not bit-identical in two state dicts, or present in one only."""
    keys = sorted(set(first) | set(second))
    return [key for key in keys if key not in first or key not in second or not torch.equal(first[key], second[key])]


def adapters_reproduce(trained: SAM2LoRA, settings: Mapping[str, Any], base: Path, adapters: Path) -> list[str]:
    """Rebuild the network as the archive's inference config will (Meta's base checkpoint plus the adapter
    file) and list the tensors that differ from the trained network; an empty list means a faithful archive."""
    rebuilt = _build(settings, checkpoint=base, adapter_checkpoint=adapters)
    return differing_tensors(trained.state_dict(), rebuilt.state_dict())


def _write_weights(
    trained: SAM2LoRA, settings: Mapping[str, Any], mode: str, base: Path | None, models: Path
) -> tuple[str, str]:
    """Write the weights of ``mode`` into ``models``; return the mode used and why it differs from ``mode``."""
    if mode == "adapters":
        reason = ""
        if settings["random_init"]:
            reason = (
                "the model was trained from random initialisation (random_init=True): there is no public base "
                "checkpoint to put its adapters on, so the archive carries the full weights"
            )
        elif base is None or not base.is_file():
            raise ExportError(
                f"Base checkpoint {base} does not exist; it is needed to check that the adapters alone reproduce "
                f"the trained model. Fetch it (python -m monai.bundle download_large_files --bundle_path bundle), "
                "name it with --base_checkpoint, or export the full weights with --weights full."
            )
        else:
            trained.save_adapters(models / ADAPTER_FILE)
            try:
                differences = adapters_reproduce(trained, settings, base, models / ADAPTER_FILE)
            except CheckpointError as error:
                raise ExportError(f"Base checkpoint {base} cannot serve the adapters: {error}") from None
            if not differences:
                return "adapters", ""
            (models / ADAPTER_FILE).unlink()
            reason = (
                f"the trained model's weights differ from base checkpoint {base} plus its adapters in "
                f"{len(differences)} tensors (e.g. {differences[:3]}): it was not trained on that base, so the "
                "adapters alone cannot reproduce it and the archive carries the full weights"
            )
        logger.warning("Exporting full weights instead of adapters: %s.", reason)
        mode = "full"
    else:
        reason = ""
    if mode == "merged":
        trained.merge_adapters()
    # Saved before unmerging: state_dict() shares its tensors with the network.
    torch.save(trained.state_dict(), models / FULL_FILE)
    if mode == "merged":
        trained.unmerge_adapters()
    return mode, reason


def _inference_config(source: Path, settings: Mapping[str, Any], mode: str) -> dict:
    config = json.loads(source.read_text(encoding="utf-8"))
    for key in NETWORK_SETTINGS:
        config[key] = settings[key]
    loaders = [handler for handler in config.get("handlers", []) if handler.get("_target_") == "CheckpointLoader"]
    if len(loaders) != 1:
        raise ExportError(f"{source} should load the trained model with one CheckpointLoader handler.")
    if mode == "adapters":
        # Meta's base (fetched by download_large_files) plus the adapter file build the trained network; the
        # CheckpointLoader, which expects a full state dict, has nothing to load.
        config["random_init"] = False
        config["ckpt_path"] = f"$@ckpt_dir + '/{ADAPTER_FILE}'"
        config["network_def"]["adapter_checkpoint"] = "@ckpt_path"
        loaders[0]["_disabled_"] = True
    else:
        # The full weights replace every tensor, so no base checkpoint needs to be fetched.
        config["random_init"] = True
        config["ckpt_path"] = f"$@ckpt_dir + '/{FULL_FILE}'"
    return config


def _large_files(source: Path, model_size: str, base: Path | None, mode: str) -> dict:
    content = yaml.safe_load(source.read_text(encoding="utf-8"))
    name = f"sam2.1_hiera_{model_size}.pt"
    entries = [entry for entry in content.get("large_files", []) if Path(entry["path"]).name == name]
    if not entries:
        raise ExportError(f"{source} names no base checkpoint {name}.")
    if mode == "adapters":
        # The adapters are only valid on exactly this base: download_large_files refuses any other file.
        entries = [{**entries[0], "hash_val": _sha256(base), "hash_type": "sha256"}]
    return {"large_files": entries}


def _weights_doc(mode: str, reason: str, settings: Mapping[str, Any], version: str, ckpt_sha: str) -> str:
    base = f"sam2.1_hiera_{settings['model_size']}.pt"
    lines = [
        f"# Weights of {BUNDLE_NAME} {version}",
        "",
        f"Network: SAM 2.1 Hiera-{settings['model_size']}, {settings['image_size']} px, LoRA rank "
        f"{settings['lora_rank']} (alpha {settings['lora_alpha']:g}), output channels {settings['channel_names']}.",
        f"Exported from a trained model with SHA-256 {ckpt_sha}.",
        "",
    ]
    if mode == "adapters":
        lines += [
            f"`models/{ADAPTER_FILE}` holds the LoRA adapters only. They sit on Meta's `{base}`, which "
            "`large_files.yml` names with its SHA-256: fetch it before inference with",
            "",
            f"    python -m monai.bundle download_large_files --bundle_path {BUNDLE_NAME}",
            "",
            "The export checked that this base plus the adapters rebuild the trained network bit for bit.",
        ]
    else:
        kind = "with every adapter merged into its base weight" if mode == "merged" else "as trained"
        lines += [
            f"`models/{FULL_FILE}` holds the full network weights ({kind}); no base checkpoint is needed for "
            "inference. The log line saying that SAM 2 starts from random weights refers to the network before "
            "these weights are loaded into it.",
        ]
        if reason:
            lines += ["", f"Adapters alone were asked for, but {reason}."]
    return "\n".join(lines) + "\n"


def _zip_folder(folder: Path, archive: Path) -> None:
    with atomic_path(archive) as partial, zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as bundle_zip:
        for path in sorted(folder.rglob("*")):
            if path.is_dir():
                continue
            name = path.relative_to(folder.parent).as_posix()
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            # Weights barely compress and deflating hundreds of MB takes long: they are stored as they are.
            info.compress_type = zipfile.ZIP_STORED if path.suffix == ".pt" else zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with open(path, "rb") as source, bundle_zip.open(info, "w") as target:
                shutil.copyfileobj(source, target, 1 << 20)


def export_bundle(
    output: str | os.PathLike,
    ckpt_path: str | os.PathLike,
    config_file: Sequence[str | os.PathLike] | None = None,
    weights: str = "adapters",
    base_checkpoint: str | os.PathLike | None = None,
    bundle_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write ``<output>/sam2lora_fundus_<version>.zip``.

    Args:
        output: the folder to write the archive into (created if needed).
        ckpt_path: the trained model (``model.pt`` of the training workflow).
        config_file: the bundle configs the model was trained with; default ``<bundle_dir>/configs/inference.json``.
        weights: ``adapters``, ``full`` or ``merged`` (see the module docstring).
        base_checkpoint: Meta's checkpoint the model was trained on, to check the adapters against; default
            ``<bundle_dir>/models/sam2.1_hiera_<model_size>.pt``.
        bundle_dir: the bundle folder to package; default the repository's ``bundle/``.
        overrides: config overrides, as ``--key value`` of ``monai.bundle run``.

    Returns:
        The archive's path, the weight mode used, the reason if it is not the one asked for, and the settings.

    Raises:
        ExportError: a missing or inconsistent input; nothing is left behind in ``output``.
    """
    if weights not in WEIGHT_MODES:
        raise ExportError(f"--weights must be one of {list(WEIGHT_MODES)}, got {weights!r}.")
    bundle = Path(bundle_dir) if bundle_dir is not None else Path(__file__).resolve().parents[1] / "bundle"
    if not (bundle / "configs").is_dir():
        raise ExportError(f"Bundle folder {bundle} has no configs/ folder.")
    version = read_version(bundle)
    configs = list(config_file) if config_file else [bundle / "configs" / "inference.json"]
    settings = network_settings(configs, overrides or {})
    if base_checkpoint is None and not settings["random_init"]:
        base_checkpoint = bundle / "models" / f"sam2.1_hiera_{settings['model_size']}.pt"
    base = Path(base_checkpoint) if base_checkpoint is not None else None
    ckpt = Path(ckpt_path)
    trained = load_trained(ckpt, settings)

    output_dir = Path(output)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"Output folder {output_dir} cannot be created ({error.strerror or error}).") from None
    archive = output_dir / f"{BUNDLE_NAME}_{version}.zip"
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as staging:
        root = Path(staging) / BUNDLE_NAME
        root.mkdir()
        for item in BUNDLE_ITEMS:
            source = bundle / item
            if not source.exists():
                raise ExportError(f"Bundle folder {bundle} lacks {item}.")
            if source.is_dir():
                shutil.copytree(source, root / item)
            else:
                shutil.copy2(source, root / item)
        shutil.copytree(
            Path(scripts.__file__).resolve().parent, root / "scripts", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        models = root / "models"
        models.mkdir()
        mode, reason = _write_weights(trained, settings, weights, base, models)
        inference = _inference_config(bundle / "configs" / "inference.json", settings, mode)
        (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=4) + "\n", encoding="utf-8")
        large_files = _large_files(bundle / "large_files.yml", settings["model_size"], base, mode)
        (root / "large_files.yml").write_text(yaml.safe_dump(large_files, sort_keys=False), encoding="utf-8")
        (root / "docs" / "weights.md").write_text(
            _weights_doc(mode, reason, settings, version, _sha256(ckpt)), encoding="utf-8"
        )
        _zip_folder(root, archive)
    logger.info("Wrote %s (%s weights, %.1f MB).", archive, mode, archive.stat().st_size / 1e6)
    return ExportResult(archive=archive, weights=mode, reason=reason, settings=dict(settings))


def _override_value(text: str) -> Any:
    # As `python -m monai.bundle run` (fire) reads `--key value`: a Python literal if it is one, else a string.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def config_files(text: str) -> list[str]:
    """``--config_file`` as ``monai.bundle run`` takes it: one path, or a Python list of paths."""
    value = _override_value(text)
    return [value] if isinstance(value, str) else [str(item) for item in value]


def parse_overrides(extra: Sequence[str]) -> dict[str, Any]:
    """``["--image_size", "64", "--random_init", "True"]`` as ``{"image_size": 64, "random_init": True}``.

    Raises:
        ExportError: an argument is not a ``--key value`` pair.
    """
    overrides: dict[str, Any] = {}
    items = list(extra)
    while items:
        key = items.pop(0)
        if not key.startswith("--") or len(key) < 3:
            raise ExportError(f"Unexpected argument {key!r}: config overrides are given as --key value.")
        name, separator, value = key[2:].partition("=")
        if not separator:
            if not items:
                raise ExportError(f"Config override {key} has no value.")
            value = items.pop(0)
        overrides[name] = _override_value(value)
    return overrides


@command_line
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m tools.export --output DIR [--ckpt_path model.pt] [--weights MODE] ...``.

    Returns:
        The process exit status (0 on success).
    """
    parser = argparse.ArgumentParser(
        prog="python -m tools.export",
        description=__doc__.splitlines()[0],
        epilog="Any further --key value pairs override config entries, as with `python -m monai.bundle run`.",
    )
    parser.add_argument("--output", required=True, help="folder to write sam2lora_fundus_<version>.zip into")
    parser.add_argument("--ckpt_path", default="bundle/models/model.pt", help="the trained model (model.pt)")
    parser.add_argument(
        "--config_file",
        default=None,
        help="the configs the model was trained with, one path or a Python list (default: the bundle's inference.json)",
    )
    parser.add_argument("--weights", choices=WEIGHT_MODES, default="adapters", help="which weights to ship")
    parser.add_argument("--base_checkpoint", default=None, help="Meta's checkpoint the adapters were trained on")
    parser.add_argument("--bundle_dir", default=None, help="the bundle folder to package (default: bundle/)")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configs = config_files(args.config_file) if args.config_file else None
    result = export_bundle(
        output=args.output,
        ckpt_path=args.ckpt_path,
        config_file=configs,
        weights=args.weights,
        base_checkpoint=args.base_checkpoint,
        bundle_dir=args.bundle_dir,
        overrides=parse_overrides(extra),
    )
    print(result.archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Package the bundle as one self-contained archive that ``python -m monai.bundle download --url`` can fetch.

``python -m tools.export --output dist --ckpt_path bundle/models/model.pt`` writes
``dist/sam2lora_fundus_<version>.zip`` holding one folder, ``sam2lora_fundus/``, with the configs, the custom
components (``scripts/``, so the bundle runs without this repository), the fine-tuned weights, the docs, the
LICENSE and ``large_files.yml``.

Weights (``--weights``):

- ``adapters`` (default): only the LoRA tensors (``models/adapters.pt``, a few MB); Meta's base checkpoint is named
  in ``large_files.yml`` with its SHA-256 and fetched by ``download_large_files``. Written only after checking
  that the base checkpoint plus the adapters rebuild the trained network bit for bit. A network trained from
  random initialisation, or on another base, has no public base to put the adapters on: the archive then
  carries the full weights instead, and says why in the log and in ``docs/weights.md``. A model file saved with
  its adapters merged into the base weights (``--weights merged`` writes one) cannot be split into base and
  adapters again bit for bit (float rounding): the archive then carries those merged weights, and says so alike.
- ``full``: the trained state dict as it is (``models/model.pt``), base and adapters.
- ``merged``: the full weights with every adapter folded into its base weight, which makes inference as cheap
  as plain SAM 2 (the result equals ``full`` up to float rounding).

The network settings (head, Hiera size, image size, channels, LoRA rank...) are those the model file records;
the archive's ``configs/inference.json`` reads them from the weights it ships, as the bundle's own does, and its
``configs/metadata.json`` describes the model's output channels.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

import scripts
from scripts.adapters import AdaptedNetwork, ModelFileError, frozen_weights_digest, tensor_state
from scripts.atomic import atomic_path, file_sha256
from scripts.errors import FundusError, command_line
from scripts.network import build_network, load_trained, network_arguments
from scripts.sam2_models import CheckpointError
from tools import path_argument

__all__ = [
    "BUNDLE_NAME",
    "WEIGHT_MODES",
    "ExportError",
    "ExportResult",
    "export_bundle",
    "load_model",
    "main",
]

logger = logging.getLogger(__name__)

BUNDLE_NAME = "sam2lora_fundus"
WEIGHT_MODES = ("adapters", "full", "merged")
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


def load_model(ckpt_path: Path, base_checkpoint: Path | None = None) -> AdaptedNetwork:
    """The trained network of ``ckpt_path``, built from the settings the file records (an adapter file on
    ``base_checkpoint``: :func:`scripts.network.load_trained`).

    Raises:
        ExportError: the file is missing, unreadable, or not a model of this bundle.
    """
    try:
        return load_trained(ckpt_path, base_checkpoint)
    except (ModelFileError, CheckpointError) as error:
        raise ExportError(str(error)) from None


def differing_tensors(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors are not bit-identical in two state dicts, or present in one only."""
    keys = sorted(set(first) | set(second))
    return [key for key in keys if key not in first or key not in second or not torch.equal(first[key], second[key])]


def adapters_reproduce(trained: AdaptedNetwork, base: Path, adapters: Path) -> list[str]:
    """Rebuild the network as the archive's inference config will (Meta's base checkpoint plus the adapter
    file) and list the tensors that differ from the trained network; an empty list means a faithful archive.
    On another base (which the adapter file refuses) the list names the base's differing tensors."""
    rebuilt = build_network(checkpoint=base, **network_arguments(trained.settings)).eval()
    if frozen_weights_digest(rebuilt) != frozen_weights_digest(trained):
        frozen = {name for name, parameter in trained.named_parameters() if not parameter.requires_grad}
        return [key for key in differing_tensors(tensor_state(trained), tensor_state(rebuilt)) if key in frozen]
    rebuilt.load_adapters(adapters)
    return differing_tensors(tensor_state(trained), tensor_state(rebuilt))


def _write_weights(trained: AdaptedNetwork, mode: str, base: Path | None, models: Path) -> tuple[str, str]:
    """Write the weights of ``mode`` into ``models``; return the mode used and why it differs from ``mode``."""
    if mode == "adapters":
        reason, fallback = "", "full"
        if trained.settings["base_weights"] == "random":
            reason = (
                "the model was trained from random initialisation (random_init=True): there is no public base "
                "checkpoint to put its adapters on, so the archive carries the full weights"
            )
        elif trained.settings["finetune"] == "full":
            reason = "the model was fine-tuned in full (finetune='full'): every weight changed, so the archive carries them all"
        elif trained.adapters_merged():
            reason = (
                "the model file holds its adapters merged into the base weights (as --weights merged writes them): "
                "float rounding keeps unmerging them from giving the base weights back bit for bit, so the archive "
                "carries the merged weights"
            )
            fallback = "merged"
        elif base is None or not base.is_file():
            raise ExportError(
                f"Base checkpoint {base} does not exist; it is needed to check that the adapters alone reproduce "
                f"the trained model. Fetch it (python -m monai.bundle download_large_files --bundle_path bundle), "
                "name it with --base_checkpoint, or export the full weights with --weights full."
            )
        else:
            trained.save_adapters(models / ADAPTER_FILE)
            try:
                differences = adapters_reproduce(trained, base, models / ADAPTER_FILE)
            except (CheckpointError, ModelFileError) as error:
                raise ExportError(f"Base checkpoint {base} cannot serve the adapters: {error}") from None
            if not differences:
                return "adapters", ""
            (models / ADAPTER_FILE).unlink()
            reason = (
                f"the trained model's weights differ from base checkpoint {base} plus its adapters in "
                f"{len(differences)} tensors (e.g. {differences[:3]}): it was not trained on that base, so the "
                "adapters alone cannot reproduce it and the archive carries the full weights"
            )
        logger.warning("Exporting %s weights instead of adapters: %s.", fallback, reason)
        mode = fallback
    else:
        reason = ""
    if mode == "merged":
        trained.merge_adapters()
    # Saved before unmerging: state_dict() shares its tensors with the network.
    torch.save(trained.state_dict(), models / FULL_FILE)
    if mode == "merged":
        trained.unmerge_adapters()
    return mode, reason


def _pointed_at_weights(source: Path, model_size: str, mode: str, handlers_id: str) -> dict:
    """An archive's inference.json (``handlers_id`` ``handlers``) or evaluate.json (``validate#handlers``, read over
    train.json): the bundle's, which reads every network setting from the model file, pointed at the archive's
    weights."""
    config = json.loads(source.read_text(encoding="utf-8"))
    handlers = [handler for handler in config.get(handlers_id, []) if isinstance(handler, dict)]
    loaders = [handler for handler in handlers if handler.get("_target_") == "CheckpointLoader"]
    if len(loaders) != 1:
        raise ExportError(f"{source} should load the trained model with one CheckpointLoader handler.")
    if mode == "adapters":
        # Meta's base (fetched by download_large_files) plus the adapter file build the trained network; the
        # CheckpointLoader, which expects a full state dict, has nothing to load.
        config["ckpt_path"] = f"$@ckpt_dir + '/{ADAPTER_FILE}'"
        network = {
            "weights_follow": False,
            "checkpoint": f"$@ckpt_dir + '/sam2.1_hiera_{model_size}.pt'",
            "adapter_checkpoint": "@ckpt_path",
        }
        for key, value in network.items():
            if isinstance(config.get("network_def"), dict):
                config["network_def"][key] = value
            else:  # evaluate.json overrides train.json's network_def by nested ids
                config[f"network_def#{key}"] = value
        loaders[0]["_disabled_"] = True
    else:
        config["ckpt_path"] = f"$@ckpt_dir + '/{FULL_FILE}'"
    return config


_FETCHED_BASE = " The base SAM 2.1 weights are Meta's and are fetched with download_large_files."
"""The sentence of the bundle's description that holds for an adapters-only archive alone."""

EVALUATION_METRICS = ("dice", "auc")
"""The FOV metrics of an evaluation summary that go into an archive's ``eval_metrics``."""


def evaluation_metrics(summary_file: Path, ckpt: Path) -> dict[str, float]:
    """``eval_metrics`` for an archive from the ``metrics_summary.json`` of the exported model's evaluation:
    ``<dataset>_<split>_<channel>_fov_<metric>`` per dataset, the means of :data:`EVALUATION_METRICS`.

    Args:
        summary_file: the evaluation's summary, which records the model file it evaluated.
        ckpt: the exported model file.

    Raises:
        ExportError: the file cannot be read, is not an evaluation summary of this bundle, or evaluated a model file
            whose content differs from ``ckpt``'s.
    """
    try:
        document = json.loads(summary_file.read_text(encoding="utf-8"))
        split = document["metadata"]["split"]
        metrics = {}
        for dataset, group in document["summary"]["datasets"].items():
            for key, statistic in group["metrics"].items():
                if key.count("/") != 2:
                    raise ValueError(f"metric {key!r} of {dataset} is not named <channel>/<region>/<metric>")
                channel, region, metric = key.split("/")
                if region == "fov" and metric in EVALUATION_METRICS and statistic["mean"] is not None:
                    metrics[f"{dataset}_{split}_{channel}_fov_{metric}"] = round(float(statistic["mean"]), 4)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        if isinstance(error, OSError):
            reason = error.strerror
        else:
            reason = f"no {error}" if isinstance(error, KeyError) else error
        raise ExportError(
            f"Evaluation summary {summary_file} cannot be read ({reason}): give the metrics_summary.json that "
            "`run evaluating` wrote for the exported model."
        ) from None
    evaluated = Path(str(document["metadata"].get("checkpoint", "")))
    if not evaluated.is_file():
        logger.warning("Evaluation summary %s names model %s, which is not there: it cannot be checked.", summary_file,
                       evaluated)
    elif evaluated.resolve() != ckpt.resolve() and file_sha256(evaluated) != file_sha256(ckpt):
        raise ExportError(
            f"Evaluation summary {summary_file} is of model {evaluated}, whose content differs from the exported "
            f"{ckpt}: its figures are not this model's."
        )
    return metrics


def _metadata(source: Path, settings: Mapping[str, Any], mode: str, metrics: Mapping[str, float]) -> dict:
    """The archive's metadata.json: the bundle's, its description and output made the exported model's, and its
    ``eval_metrics`` those given (:func:`evaluation_metrics`): the bundle's are its own model's, not this one's.

    The bundle's output describes the default one-channel vessel model; MONAI's ``verify_net_in_out`` checks the
    channel count."""
    metadata = json.loads(source.read_text(encoding="utf-8"))
    channel_names = settings["channel_names"]
    prediction = metadata["network_data_format"]["outputs"]["pred"]
    prediction["num_channels"] = len(channel_names)
    prediction["channel_def"] = {str(index): f"{name} logit" for index, name in enumerate(channel_names)}
    base = {"meta": "Meta's SAM 2.1 weights", "random": "random initialisation"}.get(
        settings.get("base_weights"), "base weights it does not record"
    )
    shipped = {
        "adapters": "the LoRA adapters alone; Meta's base is fetched with download_large_files",
        "full": "the full weights as trained; nothing is fetched",
        "merged": "the full weights, adapters merged; nothing is fetched",
    }[mode]
    description = metadata["description"].replace(_FETCHED_BASE, "")
    metadata["description"] = (
        f"{description} This archive's model: the {settings['architecture']} head on Hiera-{settings['model_size']}, "
        f"{settings['image_size']} px, channels {', '.join(channel_names)}, fine-tuned ({settings['finetune']}) from "
        f"{base}; it ships {shipped} (docs/weights.md)."
    )
    metadata["eval_metrics"] = dict(metrics)
    return metadata


def _large_files(source: Path, model_size: str, base: Path | None, mode: str) -> dict:
    if mode != "adapters":
        return {"large_files": []}  # the full weights replace every tensor: nothing needs to be fetched
    content = yaml.safe_load(source.read_text(encoding="utf-8"))
    name = f"sam2.1_hiera_{model_size}.pt"
    entries = [entry for entry in content.get("large_files", []) if Path(entry["path"]).name == name]
    if not entries:
        raise ExportError(f"{source} names no base checkpoint {name}.")
    # The adapters are only valid on exactly this base: download_large_files refuses any other file.
    return {"large_files": [{**entries[0], "hash_val": file_sha256(base), "hash_type": "sha256"}]}


def _weights_doc(mode: str, reason: str, settings: Mapping[str, Any], version: str, ckpt_sha: str) -> str:
    base = f"sam2.1_hiera_{settings['model_size']}.pt"
    lines = [
        f"# Weights of {BUNDLE_NAME} {version}",
        "",
        (
            f"Network: SAM 2.1 Hiera-{settings['model_size']} ({settings['architecture']} head, finetune "
            f"{settings['finetune']}), {settings['image_size']} px, LoRA rank "
            f"{settings['lora_rank']} (alpha {settings['lora_alpha']:g}), output channels {settings['channel_names']}."
        ),
        f"Exported from a trained model with SHA-256 {ckpt_sha}.",
        "",
    ]
    if mode == "adapters":
        lines += [
            (
                f"`models/{ADAPTER_FILE}` holds the LoRA adapters only. They sit on Meta's `{base}`, which "
                "`large_files.yml` names with its SHA-256: fetch it before inference with"
            ),
            "",
            f"    python -m monai.bundle download_large_files --bundle_path {BUNDLE_NAME}",
            "",
            "The export checked that this base plus the adapters rebuild the trained network bit for bit.",
        ]
    else:
        kind = "with every adapter merged into its base weight" if mode == "merged" else "as trained"
        lines += [
            f"`models/{FULL_FILE}` holds the full network weights ({kind}); no base checkpoint is needed for inference.",
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


def _package(
    bundle: Path,
    version: str,
    archive: Path,
    trained: AdaptedNetwork,
    weights: str,
    base: Path,
    ckpt: Path,
    metrics: Mapping[str, float],
) -> tuple[str, str]:
    """Stage the archive's folder next to ``archive`` and zip it there (:func:`export_bundle`'s work).

    Returns:
        the weight mode written and the reason when it is not ``weights``.
    """
    settings = trained.settings
    with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".export-") as staging:
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
            Path(scripts.__file__).resolve().parent,
            root / "scripts",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        models = root / "models"
        models.mkdir()
        mode, reason = _write_weights(trained, weights, base, models)
        for name, handlers_id in (("inference.json", "handlers"), ("evaluate.json", "validate#handlers")):
            config = _pointed_at_weights(bundle / "configs" / name, settings["model_size"], mode, handlers_id)
            (root / "configs" / name).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        metadata = _metadata(bundle / "configs" / "metadata.json", settings, mode, metrics)
        (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n", encoding="utf-8")
        large_files = _large_files(bundle / "large_files.yml", settings["model_size"], base, mode)
        (root / "large_files.yml").write_text(yaml.safe_dump(large_files, sort_keys=False), encoding="utf-8")
        (root / "docs" / "weights.md").write_text(
            _weights_doc(mode, reason, settings, version, file_sha256(ckpt)), encoding="utf-8"
        )
        _zip_folder(root, archive)
    return mode, reason


def export_bundle(
    output: str | os.PathLike,
    ckpt_path: str | os.PathLike,
    weights: str = "adapters",
    base_checkpoint: str | os.PathLike | None = None,
    bundle_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    evaluation: str | os.PathLike | None = None,
) -> ExportResult:
    """Write ``<output>/sam2lora_fundus_<version>.zip``.

    Args:
        output: the folder to write the archive into (created if needed).
        ckpt_path: the trained model (``model.pt`` of the training workflow); it records its network settings.
        weights: ``adapters``, ``full`` or ``merged`` (see the module docstring).
        base_checkpoint: Meta's checkpoint the model was trained on, to check the adapters against (and to build
            the network on, where ``ckpt_path`` is an adapter file: an adapters-only archive's ``adapters.pt``);
            default ``<bundle_dir>/models/sam2.1_hiera_<model_size>.pt``.
        bundle_dir: the bundle folder to package; default the repository's ``bundle/``.
        overwrite: replace an archive of the same name in ``output`` (otherwise refused, before any work).
        evaluation: the ``metrics_summary.json`` of the exported model's evaluation, whose FOV Dice and AUC become
            the archive's ``eval_metrics`` (:func:`evaluation_metrics`); None: the archive states none.

    Returns:
        The archive's path, the weight mode used, the reason if it is not the one asked for, and the settings.

    Raises:
        ExportError: a missing or inconsistent input, an ``output`` inside a folder the archive packs, or an archive
            already in ``output`` (unless ``overwrite``); nothing is left behind in ``output``.
    """
    if weights not in WEIGHT_MODES:
        raise ExportError(f"--weights must be one of {list(WEIGHT_MODES)}, got {weights!r}.")
    bundle = Path(bundle_dir) if bundle_dir is not None else Path(__file__).resolve().parents[1] / "bundle"
    if not (bundle / "configs").is_dir():
        raise ExportError(f"Bundle folder {bundle} has no configs/ folder.")
    version = read_version(bundle)
    output_dir = Path(output)
    packed = next((item for item in BUNDLE_ITEMS if output_dir.resolve().is_relative_to((bundle / item).resolve())), None)
    if packed is not None:
        # Staged there, the archive's folder would be copied into itself (a traceback once the path grew too long),
        # and an archive kept there packed into the next.
        raise ExportError(
            f"--output {output_dir} lies inside {bundle / packed}, which the archive packs: choose a folder outside it "
            f"(e.g. {bundle.parent / 'dist'})."
        )
    archive = output_dir / f"{BUNDLE_NAME}_{version}.zip"
    if archive.exists() and not overwrite:
        raise ExportError(f"{archive} exists: choose another --output, or pass --overwrite to replace it.")
    ckpt = Path(ckpt_path)
    # The model first: a summary is checked against its content, and a missing model is the error to report.
    trained = load_model(ckpt, Path(base_checkpoint) if base_checkpoint is not None else None)
    metrics = evaluation_metrics(Path(evaluation), ckpt) if evaluation is not None else {}
    settings = dict(trained.settings)
    if base_checkpoint is None:
        base_checkpoint = bundle / "models" / f"sam2.1_hiera_{settings['model_size']}.pt"
    base = Path(base_checkpoint)

    created = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]  # deepest first
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"Output folder {output_dir} cannot be created ({error.strerror or error}).") from None
    try:
        mode, reason = _package(bundle, version, archive, trained, weights, base, ckpt, metrics)
    except BaseException:
        for folder in created:  # made for this archive, and empty again now that the staging folder is gone
            folder.rmdir()
        raise
    logger.info("Wrote %s (%s weights, %.1f MB).", archive, mode, archive.stat().st_size / 1e6)
    return ExportResult(archive=archive, weights=mode, reason=reason, settings=dict(settings))


@command_line
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m tools.export --output DIR [--ckpt_path model.pt] [--weights MODE] ...``.

    Returns:
        The process exit status (0 on success).
    """
    parser = argparse.ArgumentParser(
        prog="python -m tools.export",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--output", required=True, type=path_argument, help="folder to write sam2lora_fundus_<version>.zip into")
    parser.add_argument("--ckpt_path", default="bundle/models/model.pt", type=path_argument, help="the trained model (model.pt)")
    parser.add_argument("--weights", choices=WEIGHT_MODES, default="adapters", help="which weights to ship")
    parser.add_argument("--base_checkpoint", default=None, type=path_argument, help="Meta's checkpoint the adapters were trained on")
    parser.add_argument("--bundle_dir", default=None, type=path_argument, help="the bundle folder to package (default: bundle/)")
    parser.add_argument("--overwrite", action="store_true", help="replace an archive of the same name in --output")
    parser.add_argument(
        "--evaluation", default=None, type=path_argument, help="the model's metrics_summary.json (run evaluating): its eval_metrics"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = export_bundle(
        output=args.output,
        ckpt_path=args.ckpt_path,
        weights=args.weights,
        base_checkpoint=args.base_checkpoint,
        bundle_dir=args.bundle_dir,
        overwrite=args.overwrite,
        evaluation=args.evaluation,
    )
    print(result.archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())

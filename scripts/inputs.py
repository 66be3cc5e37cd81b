"""What the bundle workflows read and write, checked before any work starts: settings, datalists, image folders,
output folders, and the command line's own overrides.

Checking every path, label and setting at start-up turns a typo in entry 900 into a one-line error at once rather
than a crash hours into training, and keeps an inference run from writing over what the user has.
"""

from __future__ import annotations

import ast
import difflib
import json
import logging
import os
import re
import tempfile
import unicodedata
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

from monai.data import Dataset
from monai.transforms import apply_transform
from monai.utils import path_to_sqlite_uri

from scripts.atomic import folder_holder, hold_folder, move_aside, name_while_written, release_folder
from scripts.errors import (
    ConfigError,
    FundusError,
    first_line,
    hash_sign_hint,
    is_bundle_command_line,
    is_real_number,
    is_whole_number,
    user_error,
)
from scripts.fundus_io import (
    SUPPORTED_SUFFIXES,
    UNREADABLE_KEY,
    FundusImageError,
    image_files,
    image_size,
    is_grayscale,
    read_label_mask,
    readable_image_size,
)
from scripts.measurements import structure_of
from scripts.metrics import FOV_SOURCES
from scripts.writers import REPORT_FILES, output_names

__all__ = [
    "FolderDataset",
    "ImageFolder",
    "InputError",
    "check_command_line",
    "check_settings",
    "config_ids",
    "config_values",
    "each_process_gets_one",
    "hold_output_folder",
    "load_split",
    "read_datalist",
    "release_output_folder",
    "warn_about_batch_size",
    "warn_about_overlap",
    "warn_unknown_overrides",
    "warn_without_validation",
    "writable_folder",
]

logger = logging.getLogger(__name__)

CHECKED_KEYS = ("image", "label", "fov")
WINDOWS_PATH = re.compile(r"\\|(^|/)[A-Za-z]:/")
"""A backslash, or a drive letter (``C:/``), in a datalist path as resolved: a datalist written on Windows."""
# The smallest picture accepted as a photograph: Hiera's patches are 4 pixels and a field of view needs a border.
MIN_IMAGE_SIDE = 32
EARLIER_REPORTS_FOLDER = "earlier_reports"
"""The subfolder of the output folder that ``--overwrite True`` moves an earlier run's reports into."""
OUTPUT_LOCK = ".output.lock"
"""The lock an inference or evaluation run holds on its output folder while its process lives
(:func:`hold_output_folder`); hidden, so no folder check takes it for an output or an image."""


class InputError(FundusError, ValueError):
    """A datalist, image folder, file or output folder cannot serve a workflow; the message names it and why."""


def _positive_int(value: Any) -> bool:
    return is_whole_number(value) and value > 0


def _positive_number(value: Any) -> bool:
    return is_real_number(value) and value > 0


def _names(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(name, str) and name and "/" not in name for name in value)
        and len(set(value)) == len(value)
    )


LOSS_TERMS = ("bce", "dice", "focal_tversky", "iou")
"""The weighted terms of :class:`scripts.losses.CompositeLoss`, as ``loss_weights`` names them; all but ``iou``
compare the masks."""


def _loss_weights(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == set(LOSS_TERMS)
        and all(is_real_number(weight) and weight >= 0 for weight in value.values())
        and any(value[term] > 0 for term in LOSS_TERMS if term != "iou")
    )


AMP_DTYPES = ("bfloat16", "float16")
"""What ``amp_dtype`` may name: the lower precisions torch's autocast runs in."""

# One rule per setting, with what the message says is expected. Settings not listed here are checked by the component
# that uses them.
SETTING_RULES: dict[str, tuple[Any, str]] = {
    "image_size": (
        lambda v: _positive_int(v) and v >= 64 and v % 32 == 0,
        "a whole number of pixels, a multiple of 32, at least 64",
    ),
    "lora_rank": (_positive_int, "a positive whole number"),
    "batch_size": (_positive_int, "a positive whole number"),
    "max_epochs": (_positive_int, "a positive whole number"),
    "val_interval": (_positive_int, "a positive whole number of epochs"),
    "accumulation_steps": (_positive_int, "a positive whole number"),
    "num_workers": (
        lambda v: is_whole_number(v) and v >= 0,
        "0 or a positive whole number",
    ),
    "learning_rate": (_positive_number, "a positive number"),
    "lora_alpha": (_positive_number, "a positive number"),
    "threshold": (lambda v: is_real_number(v) and 0 < v < 1, "a number between 0 and 1"),
    "pixel_size_mm": (
        lambda v: v is None or _positive_number(v),
        "a positive number of millimetres per pixel, or '$None' on the command line (null in a config) for pixels",
    ),
    "min_fragment_px": (
        lambda v: is_whole_number(v) and v >= 0,
        "0 (count every piece of a vessel mask) or a positive whole number of pixels",
    ),
    "channel_names": (_names, "a non-empty list of distinct names without '/', e.g. ['vessels'] or ['disc', 'cup']"),
    "quality_threshold": (lambda v: is_real_number(v) and 0 <= v <= 1, "a predicted IoU between 0 and 1"),
    "report_thumbnails": (
        lambda v: is_whole_number(v) and v >= 0,
        "0 (show every overlay from its file) or a positive whole number of overlays report.html embeds",
    ),
    "amp_dtype": (lambda v: v in AMP_DTYPES, f"one of {', '.join(AMP_DTYPES)}"),
    "auto_box_margin": (
        lambda v: is_real_number(v) and v >= 0,
        "0 or a positive fraction of the box's size (0.1 widens each side by a tenth)",
    ),
    "auto_points": (_positive_int, "a positive whole number"),
    "auto_negative_points": (lambda v: is_whole_number(v) and v >= 0, "0 or a positive whole number"),
    "weight_decay": (lambda v: is_real_number(v) and v >= 0, "0 or a positive number"),
    "lr_restart_steps": (_positive_int, "a positive whole number of optimiser steps"),
    "crops_per_image": (_positive_int, "a positive whole number"),
    # A fixed seed: evaluation's automatic prompts and torchrun's per-rank seeds (seed + rank) need one.
    "seed": (lambda v: is_whole_number(v) and v >= 0, "0 or a positive whole number"),
    "overlay_count": (lambda v: is_whole_number(v) and v >= 0, "0 or a positive whole number of pictures"),
    "loss_weights": (
        _loss_weights,
        f"weights of {', '.join(LOSS_TERMS)}, each 0 or a positive number, one of the mask terms positive",
    ),
    "window_overlap": (lambda v: is_real_number(v) and 0 <= v < 1, "in [0, 1)"),
    "cache_rate": (
        lambda v: is_real_number(v) and 0 <= v <= 1,
        "a number from 0 (read every photograph from disk every epoch) to 1 (keep them all in memory)",
    ),
    "checkpoint_interval": (
        lambda v: is_real_number(v) and v >= 0,
        "0 (epoch ends only) or a positive number of iterations",
    ),
    "max_training_minutes": (
        lambda v: v is None or _positive_number(v),
        "positive, or none for no limit (null in a config file, '$None' on the command line)",
    ),
    "gradient_clip_norm": (_positive_number, "a positive number (the largest total L2 norm of the gradients)"),
    "tracking_retry_interval": (_positive_number, "a positive number of seconds"),
    "tracking_flush_timeout": (
        lambda v: is_real_number(v) and v >= 0,
        "0 or a positive number of seconds to wait for undelivered records",
    ),
}


def check_settings(**settings: Any) -> None:
    """Check a workflow's settings before anything is built, each against its rule in :data:`SETTING_RULES`.

    Args:
        settings: setting name to value, as the workflow resolved it (after command-line overrides).

    Raises:
        ConfigError: the first setting with a value its rule refuses; the message names the setting, the value and
            what is expected (``--image_size abc`` is a string, not a size).
    """
    for name, value in settings.items():
        valid, expected = SETTING_RULES[name]
        if not valid(value):
            raise ConfigError(f"Setting '{name}' must be {expected}; got {value!r}.")


def read_datalist(datalist: str | os.PathLike) -> dict[str, Any]:
    """The content of a datalist file, as written (paths relative to its folder), checked to be a JSON object.

    Every reader of datalists goes through here (workflows, the run record, the baseline, pooling), so they agree
    on what a readable datalist is.

    Args:
        datalist: a JSON datalist (``tools.prepare``, ``scripts.synthetic``).

    Returns:
        The JSON object.

    Raises:
        InputError: the file is missing, unreadable, not JSON, or not a JSON object.
    """
    path = Path(datalist)
    if not path.is_file():
        raise InputError(f"Datalist {path} does not exist{hash_sign_hint(path)} (prepare one with `python -m tools.prepare`).")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"Datalist {path} cannot be read as JSON ({error}).") from None
    if not isinstance(content, dict):
        raise InputError(f"Datalist {path} holds a JSON {type(content).__name__}, not an object with split lists.")
    return content


def load_split(
    datalist: str | os.PathLike,
    split: str,
    channels: int | Sequence[str] | None = None,
    require_labels: bool = True,
    size_check: Callable[[tuple[int, int]], str | None] | None = None,
) -> list[dict]:
    """The entries of one split of a datalist, checked and with paths resolved against the datalist's folder.

    Args:
        datalist: a JSON datalist with ``training``, ``validation`` and ``test`` lists (``tools.prepare``,
            ``scripts.synthetic``).
        split: the list to read.
        channels: the output channels the workflow trains or evaluates, as their names or their number: every
            entry's label must have that many masks (one path for one channel, a list for several: disc and cup).
            Names are also held against the structures a datalist records in its label order (``structures``,
            written by ``tools.prepare``): a channel named after another structure would learn that one's masks.
        require_labels: entries must have a ``label``; its masks are read until one has foreground (a split whose
            labels are all empty cannot train or be evaluated, and a mask format the loader misreads shows here).
        size_check: why a photograph of this ``(height, width)`` cannot be used, or None
            (:func:`scripts.inferers.window_fit`: smaller than a training window).

    Returns:
        The entries, with ``image``, ``label`` (one path or a list of paths) and ``fov`` made absolute and normalised.

    Raises:
        InputError: the datalist is missing or unreadable, lacks the split, the split is empty, an entry is not an
            object with an ``image`` (and ``label``), entries differ in their keys, a file does not exist, a mask is
            not the size of its image, an image is smaller than 32 pixels per side or ``size_check`` refuses it, a
            label has another number of masks than ``channels``, a channel's name is another structure's than
            the masks' at its place, or every label is empty.
    """
    path = Path(datalist)
    content = read_datalist(path)
    if not isinstance(content.get(split), list):
        raise InputError(f"Datalist {path} has no '{split}' list.")
    raw = content[split]
    if not raw:
        advice = " (tools.prepare writes one with --val-fraction above 0)" if split == "validation" else ""
        raise InputError(f"Datalist {path}: the '{split}' list is empty{advice}.")
    required = ("image", "label") if require_labels else ("image",)
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict) or any(not entry.get(key) for key in required):
            raise InputError(
                f"Datalist {path}: '{split}' entry {index} must be an object with {' and '.join(repr(k) for k in required)} "
                f"paths; got {json.dumps(entry)[:120]}."
            )
        for key in CHECKED_KEYS:
            if key in entry and not _is_path_value(key, entry[key]):
                expected = {"label": "a path or a list of paths", "fov": "a path or null"}.get(key, "a path")
                raise InputError(
                    f"Datalist {path}: '{split}' entry {index} {key} must be {expected}; got {json.dumps(entry[key])[:80]}."
                )
        if "fov_source" in entry and entry["fov_source"] not in FOV_SOURCES:
            raise InputError(
                f"Datalist {path}: '{split}' entry {index} fov_source must be one of {', '.join(FOV_SOURCES)}; got "
                f"{json.dumps(entry['fov_source'])[:80]}."
            )
    keys = Counter(frozenset(entry) for entry in raw)
    if len(keys) > 1:
        (common, _), *_ = keys.most_common()
        odd = next(index for index, entry in enumerate(raw) if frozenset(entry) != common)
        raise InputError(
            f"Datalist {path}: '{split}' entries must all have the same keys; entry {odd} has {sorted(raw[odd])}, most "
            f"have {sorted(common)}."
        )
    # Only the file keys are resolved: MONAI's load_decathlon_datalist would also turn a value such as
    # "dataset": "DRIVE" into a path whenever a folder of that name lies beside the datalist.
    entries = [
        {
            key: _resolve(value, path.parent) if key in CHECKED_KEYS and value is not None else value
            for key, value in entry.items()
        }
        for entry in raw
    ]
    missing_files = [
        (index, key, file)
        for index, entry in enumerate(entries)
        for key in CHECKED_KEYS
        for file in _as_list(entry.get(key))
        if not os.path.isfile(file)
    ]
    if missing_files:
        missing = [f"entry {index} {key}: {file}" for index, key, file in missing_files]
        windows = any(WINDOWS_PATH.search(file) for _, _, file in missing_files)
        advice = (
            ": its paths are written for Windows (backslashes, a drive letter); write them with / and relative to "
            "the datalist's folder (or absolute on this machine)"
            if windows
            else ""
        )
        raise InputError(
            f"Datalist {path} names {len(missing)} missing files in '{split}', e.g. " + "; ".join(missing[:3]) + advice
        )
    sizes = [image_size(entry["image"]) for entry in entries]  # (width, height) from the headers; None: unreadable
    small = [
        f"entry {index} {entry['image']} ({size[0]}x{size[1]})"
        for index, (entry, size) in enumerate(zip(entries, sizes))
        if size is not None and min(size) < MIN_IMAGE_SIDE
    ]
    if small:
        raise InputError(
            f"Datalist {path}: {len(small)} images in '{split}' are too small for a fundus photograph (at least "
            f"{MIN_IMAGE_SIDE} pixels per side), e.g. " + "; ".join(small[:3])
        )
    # Read from the headers now: found as its image is loaded, in a data-loader worker, it was a traceback (the
    # worker passes on only the error's text), after every earlier image had been run.
    mismatched = [
        f"entry {index} {key} {file} is {mask_size[0]}x{mask_size[1]} but its image {entry['image']} is "
        f"{size[0]}x{size[1]}"
        for index, (entry, size) in enumerate(zip(entries, sizes))
        if size is not None
        for key in ("label", "fov")
        for file in _as_list(entry.get(key))
        if (mask_size := image_size(file)) is not None and mask_size != size
    ]
    if mismatched:
        raise InputError(
            f"Datalist {path}: {len(mismatched)} masks in '{split}' are not the size of their image (width x height), "
            "e.g. " + "; ".join(mismatched[:2])
        )
    refused = [
        f"entry {index} {entry['image']}: {problem}"
        for index, (entry, size) in enumerate(zip(entries, sizes))
        if size is not None and size_check is not None and (problem := size_check((size[1], size[0])))
    ]
    if refused:
        raise InputError(f"Datalist {path}: {len(refused)} images in '{split}' cannot be used, e.g. " + "; ".join(refused[:2]))
    if channels is not None and require_labels:
        count = channels if isinstance(channels, int) else len(channels)
        wrong = next((entry for entry in entries if len(_as_list(entry["label"])) != count), None)
        if wrong is not None:
            raise InputError(
                f"Datalist {path}: '{split}' entry {wrong['image']} has {len(_as_list(wrong['label']))} label masks but "
                f"the workflow has {count} output channels: set channel_names to match the datalist (one name per "
                "mask, e.g. \"['disc', 'cup']\")."
            )
        if not isinstance(channels, int):
            _check_channel_order(path, content.get("structures"), channels)
    repeated = [image for image, count in Counter(entry["image"] for entry in entries).items() if count > 1]
    if repeated:
        logger.warning(f"Datalist {path}: '{split}' lists {len(repeated)} images more than once, e.g. {repeated[0]}.")
    if require_labels:
        _require_foreground(path, split, entries)
    return entries


def _check_channel_order(path: Path, structures: Any, channel_names: Sequence[str]) -> None:
    """Refuse channel names that put a known structure where the datalist's masks hold another one.

    Only the channel count was checked: ``channel_names ['cup', 'disc']`` on a disc-then-cup datalist trained the
    "cup" channel on discs, and every figure after it came out swapped (the cup-to-disc ratios all 1.0, with the
    reference measured under the same swapped names, so their error read 0). Names of no known structure and
    datalists without ``structures`` (written by hand) are not checked.
    """
    if not isinstance(structures, list) or len(structures) != len(channel_names):
        return
    clashes = [
        f"channel {index} '{name}' is the {named}, the masks there the {structure}"
        for index, (name, structure) in enumerate(zip(channel_names, structures))
        if (named := structure_of(name)) is not None and isinstance(structure, str) and named != structure_of(structure)
    ]
    if clashes:
        raise InputError(
            f"Datalist {path} holds its label masks in the order {structures} (its 'structures'), but channel_names "
            f"is {list(channel_names)}: " + "; ".join(clashes) + f". Set channel_names to {structures}."
        )


def _require_foreground(path: Path, split: str, entries: Sequence[Mapping[str, Any]]) -> None:
    for entry in entries:
        for label in _as_list(entry["label"]):
            if read_label_mask(label).any():
                return
    raise InputError(
        f"Datalist {path}: every label of '{split}' is empty (no foreground pixel in {len(entries)} entries); masks "
        "must be 0 for background and, for the structure, 1 in a 0/1 mask or 128-255 otherwise."
    )


def each_process_gets_one(dataset: Sized, split: str, datalist: str | os.PathLike, processes: int) -> Sized:
    """Check that a split spread over the processes of a torchrun gives each of them an image.

    A validation split is spread without repeats (each image counted once), so a process would be left without an
    image and MONAI's ``DistributedSampler`` refuses that deep in the config parser.

    Args:
        dataset: the split's dataset.
        split: its name in the datalist, for the message.
        datalist: the datalist, for the message.
        processes: the number of processes (``torch.distributed.get_world_size()``).

    Returns:
        ``dataset``, unchanged.

    Raises:
        InputError: the split has fewer images than there are processes.
    """
    if len(dataset) < processes:
        raise InputError(
            f"The '{split}' split of {datalist} holds {len(dataset)} image(s), fewer than the {processes} processes "
            f"torchrun started: each process validates at least one. Add images to the split, or start no more "
            f"processes than it has images (--nproc_per_node)."
        )
    return dataset


def warn_about_overlap(datalist: str | os.PathLike, first: str = "training", second: str = "validation") -> None:
    """Warn when images of one split are also in another (validation on training images measures nothing).

    What is not a list of entries with an image path is passed over: :func:`load_split` names it afterwards.
    """
    content = read_datalist(datalist)
    base = Path(datalist).parent
    images = [
        {
            str(_resolve(entry["image"], base))
            for entry in (content.get(name) if isinstance(content.get(name), list) else [])
            if isinstance(entry, dict) and isinstance(entry.get("image"), str) and entry["image"]
        }
        for name in (first, second)
    ]
    shared = sorted(images[0] & images[1])
    if shared:
        logger.warning(
            f"Datalist {datalist}: {len(shared)} images are in both '{first}' and '{second}', e.g. {shared[0]}."
        )


def warn_without_validation(max_epochs: int, val_interval: int) -> bool:
    """Warn when a training run will never validate (``val_interval`` beyond ``max_epochs``).

    Args:
        max_epochs: the run's epochs.
        val_interval: validation every this many epochs.

    Returns:
        Whether the warning was given.
    """
    if val_interval <= max_epochs:
        return False
    logger.warning(
        f"val_interval {val_interval} is more than max_epochs {max_epochs}: this run will never validate, so it writes "
        "no model_best.pt, no validation metrics and no training curves (model.pt is the last iteration's); lower "
        "--val_interval to validate."
    )
    return True


def warn_about_batch_size(images: int, batch_size: int, accumulation_steps: int, processes: int = 1) -> bool:
    """Warn when an optimiser step is set to take more images than the training split gives a process.

    The data loader's last batch of an epoch is the images left, and MONAI's trainer steps the optimiser at the end
    of every epoch, so such a run trains on smaller batches than its settings (and MLflow's record) say.

    Args:
        images: the training split's images.
        batch_size: images per batch.
        accumulation_steps: batches whose gradients are summed before each optimiser step.
        processes: the processes the split is shared among (torchrun's ``WORLD_SIZE``).

    Returns:
        Whether the warning was given.
    """
    each = -(-images // processes)
    if batch_size * accumulation_steps <= each:
        return False
    setting, lower = f"batch_size {batch_size}", "--batch_size"
    if accumulation_steps > 1:
        setting, lower = f"{setting} x accumulation_steps {accumulation_steps}", f"{lower} or --accumulation_steps"
    split = f"{each} training images per process" if processes > 1 else f"{images} training images"
    logger.warning(
        f"{setting} asks for {batch_size * accumulation_steps} images per optimiser step, but the split has {split}: "
        f"every step takes {each} (one step per epoch). Lower {lower}, or add training images."
    )
    return True


class ImageFolder:
    """The images of a folder to segment, checked before anything is written.

    It checks that the run can write its outputs without destroying anything:

    - the output folder must not be the image folder or inside it (``allow_output_in_dataset_dir`` allows it; files
      named like outputs are then not read as images);
    - two images must not share the names of their outputs (``eye.png`` and ``eye.jpg``), nor names that differ only
      in case (``Eye.png`` and ``eye.png``) or in an accent's encoding, which a folder that ignores them takes for one;
    - no output may replace a file that is there already, unless ``overwrite`` is set, and never one of the images;
    - no other running process may hold the output folder (:func:`hold_output_folder`): its files are no earlier
      run's, and the two runs' outputs would mix;
    - images that cannot be read, or that ``size_check`` refuses, are left out and logged; :meth:`report_unreadable`
      names them after the run, so one bad file does not keep the others from being segmented.

    It writes nothing: :meth:`prepare_output` then creates the output folder, so a refused run leaves none behind.

    Args:
        folder: the images.
        output_dir: where the outputs go.
        channel_names: the model's output channels (the outputs' names depend on them).
        nifti: whether NIfTI labels are written too.
        overwrite: replace outputs of an earlier run; those of the same images that this run does not write (a
            ``<name>_mask.nii.gz`` when ``nifti`` is off; every output of an image left out) are removed by
            :meth:`prepare_output`, since they would disagree with this run's or pass for its, and its reports (:data:`scripts.writers.REPORT_FILES`) are moved to
            ``earlier_reports/<time>/``: until this run writes its own, they would describe other outputs.
        allow_output_in_dataset_dir: allow the output folder to be the image folder or inside it.
        size_check: given a photograph's ``(height, width)``, why it cannot be segmented, or None
            (:func:`scripts.inferers.window_fit`).

    Attributes:
        entries: one ``{"image": path, "size": [height, width], "unreadable": ""}`` per image readable at start-up,
            sorted (:class:`FolderDataset`).
        sizes: file name to ``(height, width)`` of every readable image (prompts are checked against them).
        left_out: file names of the images left out.
        unreadable: one line per image left out, with the reason.
        output_dir: the output folder.
        stale: with ``overwrite``, the outputs there of an earlier run for these images that this run does not write
            (those of the images left out included).
        earlier_reports: with ``overwrite``, an earlier run's reports there.

    Raises:
        InputError: the folder does not exist, is a file or holds no image, or one of the checks above fails.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        output_dir: str | os.PathLike,
        channel_names: Sequence[str] = ("vessels",),
        nifti: bool = False,
        overwrite: bool = False,
        allow_output_in_dataset_dir: bool = False,
        size_check: Callable[[tuple[int, int]], str | None] | None = None,
    ) -> None:
        folder, output = Path(folder), Path(output_dir)
        if folder.is_file():
            raise InputError(f"Image folder {folder} is a file, not a folder: give the folder holding the photographs.")
        if not folder.is_dir():
            raise InputError(f"Image folder {folder} does not exist{hash_sign_hint(folder)}.")
        inside = output.resolve() == folder.resolve() or folder.resolve() in output.resolve().parents
        if inside and not allow_output_in_dataset_dir:
            raise InputError(
                f"Output folder {output} is the image folder {folder} or inside it: outputs would mix with the images "
                "and could replace files there. Choose another --output_dir (or pass --allow_output_in_dataset_dir True)."
            )
        files = [str(path) for path in image_files(folder)]
        own_outputs = {name for file in files for name in output_names(file, channel_names, nifti)}
        images = [file for file in files if Path(file).name not in own_outputs]
        for file in sorted(set(files) - set(images)):
            logger.info(f"Not segmenting {file}: it is named like an output of another image in the folder.")
        # Outputs (a NIfTI label of an earlier run too) and the output folder, where they are in the image folder.
        considered = {Path(file).name for file in files}
        considered |= {name for file in files for name in output_names(file, channel_names, nifti=True)}
        considered |= {output.name} if output.resolve().parent == folder.resolve() else set()
        considered |= {EARLIER_REPORTS_FOLDER} if output.resolve() == folder.resolve() else set()
        passed_over = _passed_over(folder, considered)
        if not images:
            there = f"; it holds {_first_few(passed_over)}" if passed_over else ""
            raise InputError(f"Image folder {folder} holds no image ({', '.join(sorted(SUPPORTED_SUFFIXES))}){there}.")
        if passed_over:
            logger.warning(f"Passed over {len(passed_over)} entries of {folder}, not photographs read here: "
                           f"{_first_few(passed_over)}.")
        name_max = _longest_name(output)
        too_long = {
            image: f"{_shown(image)}: its output {_shown(name)} is written under a name of "
            f"{len(os.fsencode(name_while_written(name)))} bytes, more than the {name_max} the output folder's file "
            "system allows: rename the photograph"
            for image in images
            for name in output_names(image, channel_names, nifti)
            if len(os.fsencode(name_while_written(name))) > name_max
        }
        planned: dict[str, str] = {}
        # Keyed as a share or drive that ignores case (Windows', macOS's, exFAT) compares names too, where one
        # photograph's outputs would replace the other's. macOS also takes a composed and a decomposed accent for one.
        by_folded_name: dict[str, str] = {}
        for image in (image for image in images if image not in too_long):
            for name in output_names(image, channel_names, nifti):
                if name in planned:
                    raise InputError(
                        f"Images {planned[name]} and {image} would both write {name} into {output}: rename one of them."
                    )
                folded = unicodedata.normalize("NFC", name).lower()
                if folded in by_folded_name:
                    other = by_folded_name[folded]
                    raise InputError(
                        f"Images {planned[other]} and {image} would write {_shown(other)} and {_shown(name)} into "
                        f"{output}, names that differ only in case or in how an accent is encoded: where the output "
                        "folder ignores that (Windows, macOS, exFAT drives), one would replace the other. Rename one "
                        "of them."
                    )
                planned[name] = image
                by_folded_name[folded] = name
        # Files another run is writing there now are no earlier run's: name that run rather than its files.
        holder = folder_holder(output, OUTPUT_LOCK)
        if holder is not None:
            raise InputError(_output_in_use(output, holder))
        inputs = {Path(image).resolve() for image in images}
        taken = [output / name for name in [*planned, *REPORT_FILES] if (output / name).exists()]
        replaced_inputs = [path for path in taken if path.resolve() in inputs]
        if replaced_inputs:
            raise InputError(
                f"Outputs would replace the input image {replaced_inputs[0]}: choose another --output_dir."
            )
        if taken and not overwrite:
            raise InputError(
                f"Output folder {output} holds {len(taken)} files this run would replace, e.g. {taken[0].name}: choose "
                "another --output_dir, or pass --overwrite True to replace them."
            )
        self.output_dir = output
        # What this model writes for these images under another setting (a NIfTI label) and this run does not: left
        # beside the replaced outputs, it would disagree with them.
        self.stale: list[Path] = []
        self.earlier_reports = [output / name for name in REPORT_FILES if (output / name).is_file()] if overwrite else []
        self.entries: list[dict[str, Any]] = []
        self.sizes: dict[str, tuple[int, int]] = {}
        self.left_out: list[str] = []
        self.unreadable: list[str] = []
        for image in images:
            try:
                if image in too_long:
                    raise FundusImageError(too_long[image])
                self.sizes[Path(image).name] = _photograph_size(image, size_check)
            except FundusImageError as error:  # its message names the image
                self.left_out.append(Path(image).name)
                self.unreadable.append(str(error))
                logger.error(f"Left out: {error}")
                continue
            self.entries.append({"image": image, "size": list(self.sizes[Path(image).name]), UNREADABLE_KEY: ""})
        self._left_out_at_start = len(self.unreadable)
        if overwrite:
            # Every output of a photograph left out is stale too: kept, an earlier run's mask passed for this run's.
            written = {name for entry in self.entries for name in output_names(entry["image"], channel_names, nifti)}
            others = {name for image in images for name in output_names(image, channel_names, nifti=True)}
            candidates = [output / name for name in sorted(others - written)]
            self.stale = [path for path in candidates if path.is_file() and path.resolve() not in inputs]
        if not self.entries:
            self.report_unreadable()
        grayscale = [Path(entry["image"]).name for entry in self.entries if is_grayscale(entry["image"])]
        if grayscale:
            logger.warning(
                f"{len(grayscale)} of the {len(self.entries)} photographs of {folder} are grayscale (red-free?), e.g. "
                f"{grayscale[0]}: the model was trained on colour photographs and reads each as gray in all three "
                "channels; check their masks."
            )

    def prepare_output(self) -> str:
        """Create the output folder, once every check has passed, remove the :attr:`stale` outputs there and move the
        :attr:`earlier_reports` aside (moved, not removed: a prompts file given back from there is one).

        ``inference.json`` calls this last at start-up, after building the inferer (which reads the prompts file
        against this folder), so a run refused for any of its inputs creates no folder.

        Returns:
            The output folder.

        Raises:
            InputError: the folder cannot be created or written, another running process holds it (checked again
                here, where this run takes the hold, before anything is moved), or a stale output cannot be removed
                or an earlier report moved.
        """
        folder = hold_output_folder(writable_folder(self.output_dir))
        if self.earlier_reports:
            try:
                target = move_aside(self.earlier_reports, Path(folder) / EARLIER_REPORTS_FOLDER)
            except OSError as error:
                raise InputError(
                    f"The reports of an earlier run in {folder} cannot be moved aside ({error.strerror or error}): "
                    "move them yourself, or choose another --output_dir."
                ) from None
            # An interrupted run would otherwise leave them beside outputs they do not describe.
            logger.warning(
                f"{folder} held an earlier run's reports ({', '.join(p.name for p in self.earlier_reports)}): moved "
                f"to {target} before this run (--overwrite True) writes its own."
            )
        for path in self.stale:
            try:
                path.unlink()
            except OSError as error:
                raise InputError(
                    f"Output {path} of an earlier run, which this run does not rewrite, cannot be removed "
                    f"({error.strerror or error}): remove it, or choose another --output_dir."
                ) from None
        if self.stale:
            logger.info(
                "Removed %d outputs of an earlier run from %s that this run does not write, e.g. %s: they would "
                "disagree with this run's (--overwrite True).",
                len(self.stale),
                folder,
                self.stale[0].name,
            )
        return folder

    def release_output(self) -> None:
        """At the end of the run: let go of the output folder :meth:`prepare_output` held (a process that ends lets
        go by itself; one that goes on, a run started from Python, would keep it)."""
        release_output_folder(self.output_dir)

    def report_unreadable(self) -> None:
        """After the run: fail with one line per image that was left out, if any.

        Raises:
            InputError: some images could not be read (the others, if any, were segmented and their outputs
                written).
        """
        if self.unreadable:
            lines = "\n  ".join(self.unreadable)
            segmented = len(self.entries) - (len(self.unreadable) - self._left_out_at_start)
            others = (
                "the others were" if segmented > 0 else "no other image could be" if self.entries
                else "no other image is in the folder"
            )
            raise InputError(f"{len(self.unreadable)} image(s) could not be segmented ({others}):\n  {lines}")


_PASSED_OVER_EXAMPLES = 5
"""How many passed-over entries of an image folder a message names."""


def _passed_over(folder: Path, considered: set[str]) -> list[str]:
    """The entries of an image folder that are not segmented nor the run's own outputs, each with why.

    Hidden files (``._eye.jpg``, ``.DS_Store``) are not named, as :func:`scripts.fundus_io.image_files` leaves them
    out as a shell's ``*`` does.

    Args:
        folder: the image folder.
        considered: the names the run reads as images, or skips as its own outputs.

    Returns:
        ``"<name> (<why>)"`` per entry, sorted: subfolders, links to missing files, files of other suffixes.
    """
    entries = []
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or path.name in considered or path.name in REPORT_FILES:
            continue
        name = _shown(path.name)
        if path.is_dir():
            entries.append(f"{name}/ (subfolders are not searched)")
        elif not path.exists():
            entries.append(f"{name} (a link to a file that does not exist)")
        elif not path.name.lower().removesuffix(".gz").endswith(SUPPORTED_SUFFIXES):
            suffix = _shown("".join(path.suffixes[-1:])) or "(none)"
            entries.append(f"{name} (suffix {suffix} is not a photograph's read here: convert it to PNG or TIFF)")
    return entries


def _shown(name: str) -> str:
    """A file name as a message can print it: the bytes of a name in another encoding than UTF-8 escaped."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _first_few(entries: Sequence[str]) -> str:
    """The first :data:`_PASSED_OVER_EXAMPLES` entries joined, and how many more."""
    shown = ", ".join(entries[:_PASSED_OVER_EXAMPLES])
    more = len(entries) - _PASSED_OVER_EXAMPLES
    return shown + (f" and {more} more" if more > 0 else "")


def _longest_name(output: Path) -> int:
    """The longest file name, in bytes, the file system of ``output`` (or of its nearest existing folder) allows."""
    existing = next((folder for folder in (output, *output.parents) if folder.is_dir()), Path.cwd())
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not on POSIX, or the file system does not say
        return 255


class FolderDataset(Dataset):
    """The :attr:`ImageFolder.entries` through the preprocessing, where a photograph that cannot be read at its turn
    (removed or replaced since start-up: a network share, a folder a sync tool fills) does not stop the run.

    Its item is logged (``Left out: ...``) and loaded as a gray stand-in of the size recorded at start-up, with why
    under :data:`scripts.fundus_io.UNREADABLE_KEY` in its metadata: the batch goes through the network, the writer
    writes nothing for it, and :class:`scripts.handlers.InferenceReport` adds it to :attr:`ImageFolder.unreadable`,
    which the run reports at its end with the images left out at start-up.
    """

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as error:  # MONAI wraps a transform's error in its own RuntimeError
            own = user_error(error)
            if not isinstance(own, FundusImageError):
                raise
            logger.error(f"Left out: {own}")
            return apply_transform(self.transform, {**self.data[index], UNREADABLE_KEY: str(own)})


def _photograph_size(image: str, size_check: Callable[[tuple[int, int]], str | None] | None) -> tuple[int, int]:
    """The ``(height, width)`` of an image that can be segmented.

    Raises:
        FundusImageError: the file's name is not UTF-8, the image cannot be read, is too small to be a photograph,
            or ``size_check`` refuses it; the message names the image.
    """
    try:
        image.encode("utf-8")
    except UnicodeEncodeError:  # Linux hands over the bytes of a name written in another encoding (Latin-1...)
        raise FundusImageError(
            f"{_shown(image)}: the file name is not UTF-8 (written in another system's encoding), which the reports "
            "cannot record: rename the file"
        ) from None
    height, width = readable_image_size(image)
    if min(height, width) < MIN_IMAGE_SIDE:
        raise FundusImageError(
            f"{image}: {width}x{height} pixels is too small for a fundus photograph (at least {MIN_IMAGE_SIDE} per side)"
        )
    problem = size_check((height, width)) if size_check is not None else None
    if problem:
        raise FundusImageError(f"{image}: {problem}")
    return height, width


def _is_path_value(key: str, value: Any) -> bool:
    """Whether a datalist entry's file value has a kind the workflows read: a path; for a label, also a list of
    paths (one per channel); for a field of view, also null (estimated from the photograph)."""
    if isinstance(value, str) and value:
        return True
    if key == "label":
        return isinstance(value, list) and bool(value) and all(isinstance(item, str) and item for item in value)
    return key == "fov" and value is None


def _resolve(value: str | list[str], base: Path) -> str | list[str]:
    if isinstance(value, str):
        return os.path.normpath(base / value)
    return [os.path.normpath(base / item) for item in value]


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def writable_folder(path: str | os.PathLike) -> str:
    """``path`` unchanged after making sure it exists (created if needed) and files can be written into it.

    Raises:
        InputError: the folder cannot be created or written.
    """
    folder = Path(path)
    if folder.is_file():
        raise InputError(f"Output folder {folder} is a file, not a folder: name a folder there.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise InputError(f"Output folder {folder} cannot be written ({error.strerror or error}).") from None
    return str(path)


def _output_in_use(folder: str | os.PathLike, holder: str) -> str:
    """The one-line refusal of an output folder another run holds, naming the folder and the holder."""
    return (
        f"Output folder {Path(folder).absolute()} is in use by another run still going ({holder}): wait for it to "
        "end, or choose another --output_dir."
    )


def hold_output_folder(output_dir: str | os.PathLike) -> str:
    """Hold an inference's or evaluation's output folder for this run while its process lives, refusing one another
    running process holds.

    Two runs into one folder (the same command started twice, two thresholds tried at once) would otherwise both
    end well with their outputs mixed: masks of both, the reports of one, each moving the other's reports aside. The
    hold is :func:`scripts.atomic.hold_folder`'s lock on ``<output_dir>/.output.lock``, as training's on its
    checkpoint folder; the kernel releases it when the process ends, killed included.

    Args:
        output_dir: the output folder, existing (:func:`writable_folder` makes it).

    Returns:
        ``output_dir`` unchanged.

    Raises:
        InputError: another process holds the folder; the message names the folder and that process.
    """
    holder = hold_folder(output_dir, OUTPUT_LOCK)
    if holder is not None:
        raise InputError(_output_in_use(output_dir, holder))
    return str(output_dir)


def release_output_folder(output_dir: str | os.PathLike) -> None:
    """Let go of the output folder :func:`hold_output_folder` held, at the end of a run whose process goes on.

    Args:
        output_dir: the output folder.
    """
    release_folder(output_dir, OUTPUT_LOCK)


# `python -m monai.bundle run` arguments that are MONAI's own, not config entries.
RUN_ARGUMENTS = frozenset(
    {
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
        "bundle_root",
    }
)


# Boolean settings that also take words of their own (resume: true, false or auto), read by their component.
WORDED_SETTINGS = frozenset({"resume"})

# Settings that name a folder or a file, whatever their default's expression evaluates to.
PATH_SETTING_ENDINGS = ("_dir", "_root", "_path", "_file", "_checkpoint", "datalist")


def check_command_line(argv: Sequence[str], output_dir: str | os.PathLike | None = None) -> list[str]:
    """Check the overrides of a ``python -m monai.bundle run`` command line before anything is built: warn about
    the unknown ones (:func:`warn_unknown_overrides`), and refuse values that MONAI's command line would turn into
    something else than what they were written for.

    MONAI's command line (``fire``) reads only ``True`` and ``False`` as booleans: ``--overwrite false`` gives the
    text ``'false'``, which Python takes as true, so the run would replace earlier outputs. It drops a setting
    given as ``None`` (the default stays). It reads numbers, lists and comma-separated words as Python values:
    ``--output_dir 2024`` gives the number 2024, which a setting made of text cannot use.

    Args:
        argv: the command line (``sys.argv``); nothing is checked where it is not the bundle's own
            (:func:`scripts.errors.is_bundle_command_line`).
        output_dir: the workflow's output folder, which holds MONAI's default tracking store (``mlruns.db``).

    Returns:
        The unknown keys.

    Raises:
        ConfigError: an option whose config default is a boolean is given as another word (``false``, ``yes``...),
            an option given as ``None`` (which MONAI's command line drops, keeping a default that is not None), a
            text holding ``#`` (which MONAI's config parser turns into ``::``: another folder or file), an
            option whose default is text (or that names a folder or file) given as a value MONAI's command line
            reads as a number, a boolean, a list or a tuple, an option without a value (True to MONAI) whose default
            is neither a boolean nor an expression, or an empty folder or file name; with ``--tracking``, a store
            MLflow cannot use.
    """
    if not is_bundle_command_line(argv):  # a program running the workflow in its process: its options are its own
        return []
    options = _command_line_options(argv)
    defaults = config_values(options["config_file"] or "[]")
    unknown = _warn_unknown(options, set(defaults))
    for key, value in options.items():
        if key not in defaults:
            continue
        if value is None:
            _refuse_bare_option(key, defaults[key])
            continue
        _refuse_worded_boolean(key, value, defaults[key])
        _refuse_dropped_none(key, value, defaults[key])
        _refuse_text_read_otherwise(key, value, defaults[key])
        _refuse_empty_path(key, value)
        _refuse_hash_sign(key, value)
    if options.get("tracking"):
        # MONAI takes the store from the environment first (MLFLOW_TRACKING_URI), then from --tracking_uri.
        environment = os.environ.get("MLFLOW_TRACKING_URI")
        stores = [("MLFLOW_TRACKING_URI", environment), ("--tracking_uri", options.get("tracking_uri"))]
        if output_dir is not None:
            # MONAI's default (monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS), built as MONAI builds it
            stores.append(("The default tracking store", path_to_sqlite_uri(os.path.join(output_dir, "mlruns.db"))))
        for where, uri in stores:
            if uri:
                _refuse_file_store(where, uri)
                _refuse_unwritable_database(where, uri)
                _refuse_unopenable_store(where, uri)
                break
    return unknown


def _refuse_file_store(where: str, uri: str) -> None:
    """Refuse an MLflow file store (a folder: ``./mlruns``, ``file:///...``) as the tracking store, which MONAI's
    MLFlowHandler refuses in its own deep error once the run has started (whatever ``MLFLOW_ALLOW_FILE_STORE``
    says: MLflow 3 would accept a folder with it, MONAI 1.6 does not)."""
    if urllib.parse.urlparse(uri).scheme not in ("", "file"):
        return
    raise ConfigError(
        f"{where} {uri} is an MLflow file store (a folder), which MLflow 3 and MONAI no longer accept: give a "
        "database, e.g. sqlite:////abs/path/mlruns.db (leave --tracking_uri out for <output_dir>/mlruns.db), or a "
        "tracking server, http://host:5000 (mlflow migrate-filestore moves a folder's runs into a database)."
    )


def _refuse_unwritable_database(where: str, uri: str) -> None:
    """Refuse a SQLite store MLflow cannot create or write, where MLflow would retry for about 100 s and MONAI then
    fail with a traceback. A folder to be made is checked at its nearest existing parent; nothing is left behind."""
    if not uri.startswith("sqlite:///"):
        return
    database = Path(uri[len("sqlite:///") :]).absolute()
    problem = None
    if database.is_dir():
        problem = "it is a folder"
    elif database.exists():
        problem = None if os.access(database, os.R_OK | os.W_OK) else "the file cannot be written"
    else:
        parent = next(folder for folder in database.parents if folder.exists())
        try:
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError as error:
            problem = f"{parent} cannot be written ({error.strerror or error})"
    if problem:
        raise ConfigError(
            f"{where} {uri}: MLflow cannot keep its database {database} there: {problem}. Give a file in a folder "
            "you can write, sqlite:////abs/path/mlruns.db (or leave --tracking_uri out for <output_dir>/mlruns.db)."
        )


def _refuse_unopenable_store(where: str, uri: str) -> None:
    """Open a database store as MONAI's MLFlowHandler will once the workflow is built, after the earlier run's files
    were moved aside: a file that is not a database, one of an older MLflow (whose first line says to run ``mlflow
    db upgrade``), an unknown scheme or a database server's missing driver failed there in a hundred-line traceback.
    A new SQLite file is MLflow's to create; a tracking server is checked as the run starts (``TrackingError``)."""
    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        return
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return
    import mlflow  # only for runs with --tracking: it takes a few seconds to import

    try:
        mlflow.MlflowClient(tracking_uri=uri)
    except Exception as error:  # MLflow, SQLAlchemy and the drivers each raise their own
        raise ConfigError(f"{where} {uri}: MLflow cannot open this store ({first_line(error)}).") from None


def _refuse_bare_option(key: str, default: Any) -> None:
    """Refuse an option given without a value (``--dataset_dir --output_dir out``: an unset shell variable), which
    MONAI's command line sets to True, unless its default is a boolean or an expression (whose value may be one, as
    ``amp``'s) for a setting that names no folder or file."""
    expression = isinstance(default, str) and default.startswith("$")
    if isinstance(default, bool) or (expression and not key.endswith(PATH_SETTING_ENDINGS)):
        return
    raise ConfigError(f"--{key} has no value, and MONAI's command line would set it to True: give one, --{key} VALUE.")


def _refuse_empty_path(key: str, value: str) -> None:
    """Refuse an empty folder or file name (``--dataset_dir "$UNSET"``), which names the folder the run started in."""
    if key.endswith(PATH_SETTING_ENDINGS) and not value.strip():
        raise ConfigError(
            f"--{key} is empty, which would name the folder the run started in: give the folder or file (--{key} ./ "
            "for that folder)."
        )


def _refuse_hash_sign(key: str, value: str) -> None:
    """Refuse text holding ``#`` (a folder named ``batch #2``): MONAI's config parser turns every ``#`` of a config's
    text into ``::``, its id separator (``#`` was the old one), so the run would read or write another path without
    a word (outputs written to ``batch ::2``). References and expressions (``@...``, ``$...``) use ``#`` as a
    separator on purpose."""
    if "#" not in value or value.startswith(("$", "@", "%")):
        return
    advice = (
        "rename it, or give a link to it whose path has no '#'" if key.endswith(PATH_SETTING_ENDINGS) else "write it without '#'"
    )
    raise ConfigError(
        f"--{key} {value}: MONAI's config parser turns every '#' in a setting into '::', so the run would use "
        f"{value.replace('#', '::')}: {advice}."
    )


def _refuse_worded_boolean(key: str, value: str, default: Any) -> None:
    """Refuse a boolean setting given as another word than ``True`` or ``False`` (``resume`` has words of its own)."""
    if isinstance(default, bool) and key not in WORDED_SETTINGS and value not in ("True", "False"):
        raise ConfigError(
            f"--{key} {value}: write True or False, capitalised. MONAI's command line reads only those as "
            f"booleans; {value!r} would reach the setting as text, which counts as true."
        )


def _refuse_dropped_none(key: str, value: str, default: Any) -> None:
    """Refuse a setting given as ``None``, which MONAI's command line drops, where that keeps another default (a
    default that is None, or the word ``none``, loses nothing)."""
    from fire.parser import DefaultParseValue  # how MONAI's command line reads the value

    if default is None or (isinstance(default, str) and default.lower() == "none"):
        return
    if DefaultParseValue(value) is None:
        raise ConfigError(
            f"--{key} {value}: MONAI's command line drops a setting given as None, so the default ({default!r}) would "
            f"stay; give the value you mean ('$None' for no value, where the setting takes none)."
        )


def _refuse_text_read_otherwise(key: str, value: str, default: Any) -> None:
    """Refuse a value MONAI's command line reads as a number, a boolean, a list or a tuple for a setting that takes
    text: one whose default is plain text (not an expression, whose value may be a number), or one that names a
    folder or file (:data:`PATH_SETTING_ENDINGS`; a default of None included)."""
    from fire.parser import DefaultParseValue

    names_a_path = key.endswith(PATH_SETTING_ENDINGS)
    plain_text = isinstance(default, str) and not default.startswith(("$", "@", "%"))
    if not (plain_text or (names_a_path and (default is None or isinstance(default, str)))):
        return
    read = DefaultParseValue(value)
    if read is None or isinstance(read, str):  # None: _refuse_dropped_none's
        return
    if isinstance(read, bool):
        kind = "a boolean"
    elif isinstance(read, (int, float)):
        kind = "a number"
    else:
        kind = f"a {type(read).__name__} ({read!r})"
    advice = f"--{key} ./{value}" if names_a_path else f"--{key} \"'{value}'\" (quoted twice)"
    raise ConfigError(
        f"--{key} {value}: MONAI's command line reads this as {kind}, not as the text this setting takes; write "
        f"{advice} to keep it text."
    )


def warn_unknown_overrides(argv: Sequence[str]) -> list[str]:
    """Warn about ``--key value`` overrides on the command line that no config defines, suggesting the nearest.

    MONAI's ``run`` adds an unknown key to the config silently: ``--learning_rte 0.5`` trains with the default
    learning rate and nobody is told.

    Args:
        argv: the command line of ``python -m monai.bundle run ...`` (``sys.argv``); its ``--config_file`` names
            the configs whose ids are known.

    Returns:
        The unknown keys (none when ``argv`` is not such a command line, e.g. a bundle run from Python).
    """
    options = _command_line_options(argv)
    if "config_file" not in options:
        return []
    return _warn_unknown(options, config_ids(options["config_file"] or "[]"))


def _warn_unknown(options: Mapping[str, str | None], config_keys: set[str]) -> list[str]:
    """:func:`warn_unknown_overrides` of a command line's options, given the ids its configs define."""
    known = config_keys | RUN_ARGUMENTS
    if "tracking" in options:  # MONAI adds its tracking settings (tracking_uri, run_name...) to the config
        from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

        known |= set(DEFAULT_MLFLOW_SETTINGS["configs"])
    unknown = [key for key in options if key not in known]
    for key in unknown:
        nearest = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean --{nearest[0]}?" if nearest else ""
        logger.warning(f"Setting --{key} is defined by no config of this workflow and has no effect{hint}")
    return unknown


def _command_line_options(argv: Sequence[str]) -> dict[str, str | None]:
    """The ``--key value`` and ``--key=value`` options of a command line (both forms reach MONAI's ``run``), in
    order, key to value (None for a flag without one)."""
    options: dict[str, str | None] = {}
    for index, argument in enumerate(argv):
        if not argument.startswith("--"):
            continue
        key, equals, value = argument[2:].partition("=")
        if not equals:
            following = argv[index + 1] if index + 1 < len(argv) else None
            value = following if following is not None and not following.startswith("--") else None
        options[key] = value
    return options


def config_ids(config_files: str | Sequence[str]) -> set[str]:
    """Every id (``a``, ``a#b``...) the given config files define; ``config_files`` as ``--config_file`` takes it."""
    return set(config_values(config_files))


def config_values(config_files: str | Sequence[str]) -> dict[str, Any]:
    """Every id the given config files define, with its value as written (the last file's, where several define it);
    ``config_files`` as ``--config_file`` takes it: one file, a list, or files separated by commas."""
    if isinstance(config_files, str):
        if config_files.startswith("["):
            config_files = ast.literal_eval(config_files)
        elif "," in config_files and not Path(config_files).is_file():  # as MONAI's ConfigParser splits them
            config_files = config_files.split(",")
        else:
            config_files = [config_files]
    values: dict[str, Any] = {}
    for file in config_files:
        try:
            content = json.loads(Path(file).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        values.update(_id_values(content))
    return values


def _id_values(content: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Every ``(id, value)`` pair of a config's content, nested ids joined by ``#``."""
    if isinstance(content, dict):
        for key, value in content.items():
            key = key.lstrip("+")
            yield f"{prefix}{key}", value
            yield from _id_values(value, f"{prefix}{key}#")
    elif isinstance(content, list):
        for index, value in enumerate(content):
            yield from _id_values(value, f"{prefix}{index}#")

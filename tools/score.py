"""Score predictions made elsewhere (another method, an earlier run) against a datalist's reference masks.

The same metrics, regions and reports as the bundle's ``run evaluating`` (:mod:`scripts.metrics`): each image inside
its field of view (the dataset's mask, or one estimated from the photograph where the datalist gives none) and over
the whole image, at the photograph's own size, with foreground from probability 0.5 unless ``--threshold`` says
otherwise; clDice for vessels; and the measurements of its structures against the references' (cup-to-disc ratios,
vessel density, calibre...: ``measurements_per_image.csv``, ``measurement_agreement.csv``/``.json`` with their MAE and
Pearson r, the Bland-Altman plots), as :class:`scripts.handlers.MeasurementAgreement` reports them for the bundle. So a
published method's probability maps and the bundle's model are compared by one protocol on one split.

Predictions are found by name: ``--pattern`` with ``{stem}`` (the photograph's file name without its suffix) and,
for several channels, ``{channel}``. By default the names ``run inference`` writes: ``<stem>_prob.png``, or
``<stem>_prob_<channel>.png`` for several channels. A prediction is a grayscale picture (8-bit 0-255 or 16-bit
0-65535, read as probabilities from 0 to 1) or a floating-point TIFF holding probabilities from 0 to 1; a binary mask
is scored too (0/255, or 0/1 as many methods save them), its AUC then being that of its single operating point
(logged). ``--read-as`` says how the pictures' values are read (:data:`READ_AS`): run inference's own files are
probabilities; other methods' files (``--pattern``) are by default read as probabilities too, except a file holding
only 0 and 1 (a 0/1 mask) and a 16-bit file holding values up to 255 only (8-bit levels), both said in a warning with
the option that reads them otherwise. A prediction that is missing, unreadable, in colour or of another size than its photograph, or whose
field-of-view mask is empty, is named in one line and left out; so are the photographs that would share one
prediction file (two datasets' ``0001.png`` in a pooled split, or ``eye.png`` beside ``eye.jpg``), none of which could be
told apart. The others are scored and the command exits with status 1, so that a partial comparison is not taken for a
whole one. An earlier evaluation's or scoring's reports in ``--output`` are moved to ``earlier_evaluations/<time>``
before the new ones are written, as ``run evaluating`` moves them.

Command line::

    python -m tools.score --datalist datalists/drive.json --predictions results/other_method \\
        --output eval/other_method [--split test] [--channels vessels] [--pattern "{stem}.png"] \\
        [--read-as auto|probabilities|masks]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from string import Formatter
from typing import Any

import numpy as np
from PIL import Image

from scripts.errors import ConfigError, FundusError, command_line
from scripts.fundus_io import GRAY_TINT_TOLERANCE, FundusImageError, estimate_fov, read_image, read_label_mask
from scripts.handlers.evaluation import keep_earlier_evaluation
from scripts.handlers.measurement import MeasurementAgreement
from scripts.inputs import SETTING_RULES, InputError, load_split
from scripts.masks import binarise
from scripts.measurements import structure_of
from scripts.metrics import (
    ReportWriteError,
    empty_fov_problem,
    entry_fov_source,
    evaluate_case,
    format_summary_table,
    summarise,
    write_reports,
)
from scripts.writers import output_names, output_stem
from tools import path_argument

__all__ = ["DEFAULT_THRESHOLD", "READ_AS", "check_pattern", "prediction_paths", "read_prediction", "score_predictions"]

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
"""Foreground from this probability, as the bundle's evaluation and the field's published figures take it."""

READ_AS = {
    "probabilities": "every value a probability, scaled by the picture's bit depth (run inference's own files)",
    "masks": "every value above 0 foreground (binary masks saved with any foreground value)",
    "auto": "probabilities, but a file holding only 0 and 1 as a 0/1 mask and a 16-bit file holding values up to 255 "
    "only as 8-bit levels, each said in a warning",
}
"""How ``--read-as`` reads a prediction's values. Nothing in a file tells a 0/1 mask from probabilities of at most
1/255 (a network that found nothing), nor 8-bit levels saved in 16 bits from faint 16-bit probabilities: ``auto``
takes the likelier reading for other methods' files, and run inference's own files, written by the bundle as 8-bit
probabilities, are never read otherwise."""

# What ``auto`` reads a picture as when not as probabilities, and what the run's warning says of such files.
_ZERO_ONE = "0/1 mask"
_SIXTEEN_BIT_LEVELS = "8-bit levels in 16 bits"
_AUTO_WARNINGS = {
    _ZERO_ONE: "hold only the values 0 and 1: read as 0/1 masks; --read-as probabilities reads them as probabilities "
    "of at most 1/255 (a network that found nothing)",
    _SIXTEEN_BIT_LEVELS: "are 16-bit pictures holding values up to 255 only: read as 8-bit levels (0-255); --read-as "
    "probabilities reads them as probabilities of at most 255/65535",
}

def prediction_paths(image: str | Path, folder: Path, channel_names: Sequence[str], pattern: str | None) -> list[Path]:
    """The prediction files of one photograph, one per channel.

    Args:
        image: the photograph's path as the datalist gives it.
        folder: the predictions' folder.
        channel_names: the channels, in the datalist's label order.
        pattern: file name with ``{stem}`` and, for several channels, ``{channel}``; None for ``run inference``'s
            names.

    Returns:
        one path per channel.
    """
    if pattern is None:
        return [folder / name for name in output_names(image, channel_names)[1 : 1 + len(channel_names)]]
    stem = output_stem(image)
    return [folder / pattern.format(stem=stem, channel=channel) for channel in channel_names]


_PATTERN_FIELDS = ("stem", "channel")
"""The fields a ``--pattern`` may hold, each as it is: ``{stem}``, ``{channel}``."""


def check_pattern(pattern: str | None, channel_names: Sequence[str]) -> None:
    """Refuse a ``--pattern`` that cannot name each photograph's (and each channel's) prediction apart.

    The pattern's fields are read as ``str.format`` reads them, and each must be a bare ``{stem}`` or ``{channel}``:
    an attribute or index (``{stem.suffix}``, ``{stem[0]}``) would fail on the first photograph, and a conversion or
    format (``{stem!r}``, ``{channel:>8}``) would name files no method writes (quoted, padded).

    Raises:
        ConfigError: the pattern is not a well-formed ``str.format`` string, holds any other field, lacks ``{stem}``,
            or lacks ``{channel}`` for several channels.
    """
    if pattern is None:
        return
    try:
        fields = [
            (name, conversion, spec) for _, name, spec, conversion in Formatter().parse(pattern) if name is not None
        ]
    except ValueError as error:
        raise ConfigError(
            f"--pattern {pattern!r} cannot be filled: use {{stem}} and {{channel}} only ({error})"
        ) from None
    for name, conversion, spec in fields:
        if name not in _PATTERN_FIELDS or conversion or spec:
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ConfigError(
                f"--pattern {pattern!r} cannot be filled: use {{stem}} and {{channel}} only, as they are, not {field}"
            )
    names = {name for name, _, _ in fields}
    if "stem" not in names:
        raise ConfigError(f"--pattern {pattern!r} has no {{stem}}: every photograph would read the same file")
    if len(channel_names) > 1 and "channel" not in names:
        raise ConfigError(
            f"--pattern {pattern!r} has no {{channel}}: the channels {list(channel_names)} would share one file"
        )


def read_prediction(path: str | Path, read_as: str = "auto") -> tuple[np.ndarray, str]:
    """One channel's probabilities from a prediction file, and what its values were read as.

    Args:
        path: a grayscale picture (8 or 16 bits) or a floating-point TIFF in ``[0, 1]``.
        read_as: a key of :data:`READ_AS`.

    Returns:
        ``(H, W)`` float32 in ``[0, 1]``, and ``"probabilities"``, ``"masks"``, or what ``auto`` read the file as
        otherwise (``"0/1 mask"``, ``"8-bit levels in 16 bits"``).

    Raises:
        FundusImageError: the file is missing or unreadable, in colour, or holds floats outside ``[0, 1]``.
        ValueError: ``read_as`` is not a key of :data:`READ_AS`.
    """
    if read_as not in READ_AS:
        raise ValueError(f"read_as {read_as!r} is none of {', '.join(READ_AS)}")
    gray, floating = _gray_values(Path(path))
    if read_as == "masks":
        return (gray > 0).astype(np.float32), read_as
    # A floating-point file's values are what they say: only a picture's levels can be another kind of value.
    if read_as == "auto" and not floating and gray.max() > 0:
        # Levels 0 and 1 are read as 1/255 in 8 bits, 1/65535 in 16: a file holding no other level is a 0/1 mask,
        # also where its foreground is everywhere. (The maximum first: no other file needs its values sorted, 0.09 s
        # at 3504 x 2336.)
        if gray.max() <= 1 / 255 + 1e-9:
            above_zero = np.unique(gray[gray > 0])
            if len(above_zero) == 1 and any(abs(above_zero[0] * depth - 1) < 1e-3 for depth in (255, 65535)):
                return (gray > 0).astype(np.float32), _ZERO_ONE
        # Only a 16-bit file can stay at or below 255 / 65535 without being 0 and 1 only.
        if gray.max() <= 255 / 65535 + 1e-9:
            return np.minimum(gray * np.float32(65535 / 255), 1).astype(np.float32), _SIXTEEN_BIT_LEVELS
    return gray, "probabilities"


def _gray_values(path: Path) -> tuple[np.ndarray, bool]:
    """The file's values as ``(H, W)`` float32 in ``[0, 1]``, and whether the file holds floats: a float TIFF's as
    they are, a picture's scaled by its bit depth; see :func:`read_prediction`."""
    if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
        try:
            with Image.open(path) as opened:
                floating = np.asarray(opened, dtype=np.float32) if opened.mode == "F" else None
        except (OSError, ValueError):
            floating = None  # read_image below names what is wrong with the file
        if floating is not None:
            if not np.isfinite(floating).all() or floating.min() < 0 or floating.max() > 1:
                raise FundusImageError(
                    f"prediction {path} holds floating-point values from {np.nanmin(floating):g} to "
                    f"{np.nanmax(floating):g} (or non-finite ones): probabilities from 0 to 1 are expected"
                )
            return floating, True
    picture = read_image(path)
    # A colour picture is refused, a faintly tinted gray one read, as masks are.
    if round(float(np.ptp(picture, axis=-1).max()) * 255) > GRAY_TINT_TOLERANCE:
        raise FundusImageError(
            f"prediction {path} is a colour picture: a grayscale probability map or mask is expected (an overlay?)"
        )
    return np.ascontiguousarray(picture.mean(axis=-1)), False


def _namesake_hint(missing: Path) -> str:
    """What is at the missing prediction's path when it is no file (a broken link, a folder), or else, where a file
    of its name but another suffix (or letter case) is there, a hint naming that file."""
    # A path that is there but no file was hinted at as its own namesake ("found X_prob.png" for X_prob.png).
    if missing.is_symlink() and not missing.exists():
        return f": {missing.name} is a broken link (to {os.readlink(missing)}), not a file"
    if missing.is_dir():
        return f": {missing.name} is a folder, not a file"
    if missing.exists() or missing.is_symlink():  # a link looping on itself, a FIFO, a socket...
        return f": {missing.name} is not a regular file"
    if not missing.parent.is_dir():
        return ""
    stem = missing.stem.lower()
    namesakes = sorted(
        path.name for path in missing.parent.iterdir() if path.stem.lower() == stem and path.name != missing.name
    )
    return f" (found {namesakes[0]}: --pattern names the files)" if namesakes else ""


def _file_key(path: Path) -> tuple[int, int] | str:
    """What tells two prediction paths apart: the file itself where there is one (two names for one file, on a drive
    that ignores letter case or through a link, are one prediction), else the path."""
    try:
        status = path.stat()
    except OSError:
        return str(path)
    return (status.st_dev, status.st_ino) if path.is_file() else str(path)


def _shared_predictions(entries: Sequence[dict[str, Any]], planned: Sequence[list[Path]]) -> dict[int, tuple[Path, str]]:
    """The entries whose prediction file another entry's would be too, each with that path and why it is left out.

    ``run inference`` writes one file per name, so the one file of photographs that share a stem (two datasets'
    ``0001.png`` in a pooled split, ``eye.png`` and ``eye.jpg``) is the prediction of one of them at most, and which
    one cannot be told: each is left out, rather than one scored against another's prediction without a word. A
    photograph the split lists twice (which the bundle accepts, with a warning) shares its own prediction: scored.

    Args:
        entries: the split's entries.
        planned: each entry's prediction paths (:func:`prediction_paths`).

    Returns:
        ``{entry index: (shared path, reason)}``, the reason naming the photographs and the path.
    """
    users: dict[tuple[int, int] | str, dict[int, Path]] = {}
    for index, paths in enumerate(planned):
        for path in paths:
            users.setdefault(_file_key(path), {}).setdefault(index, path)
    shared: dict[int, tuple[Path, str]] = {}
    for index, paths in enumerate(planned):
        for path in paths:
            sharers = users[_file_key(path)]
            names = list(dict.fromkeys(str(entries[other]["image"]) for other in sharers))
            if len(names) < 2:
                continue
            photographs = ", ".join(names[:-1]) + f" and {names[-1]}"
            files = sorted({str(other_path) for other_path in sharers.values()})
            against = files[0] if len(files) == 1 else f"one file ({' and '.join(files)} are one file)"
            why = (
                f"photographs {photographs} would {'both' if len(names) == 2 else 'all'} be scored against {against}: "
                "inference writes one file per name, so it is the prediction of one of them at most; rename the "
                "photographs apart and predict them again, or score each dataset's split on its own"
            )
            shared[index] = (next(iter(sharers.values())), why)  # one path for them all: one left-out line
            break
    return shared


def _reference(entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The entry's reference masks ``(C, H, W)`` and field of view ``(H, W)``, both bool."""
    labels = entry["label"] if isinstance(entry["label"], list) else [entry["label"]]
    label = np.stack([read_label_mask(path) for path in labels])
    if not entry.get("fov"):
        return label, estimate_fov(read_image(entry["image"]))  # never empty: all of it without a border
    fov = read_label_mask(entry["fov"])
    problem = empty_fov_problem(fov, entry["fov"])
    if problem:
        raise InputError(problem)
    return label, fov


def _score_entry(
    entry: dict[str, Any],
    paths: list[Path],
    channel_names: Sequence[str],
    threshold: float,
    topology: bool,
    agreement: MeasurementAgreement,
    read_as: str,
) -> tuple[dict[str, Any], bool, set[str]]:
    """The entry's metrics record, whether its prediction is binary (every channel holds two values at most), and
    what :func:`read_prediction` read its files as; its structures are measured on the prediction and the reference
    into ``agreement``."""
    label, fov = _reference(entry)
    height, width = label.shape[1:]  # the photograph's: load_split refuses masks of another size than their image
    maps, read = [], set()
    # Each channel's file against the photograph, so that the message names the one of another size (stacked
    # unchecked, channels of different sizes stopped the run with numpy's error).
    for path in paths:
        probability, kind = read_prediction(path, read_as)
        read.add(kind)
        if kind in _AUTO_WARNINGS:
            logger.info("%s read as %s (--read-as auto)", path, kind)
        if probability.shape != (height, width):
            raise FundusImageError(
                f"prediction {path} is {probability.shape[1]}x{probability.shape[0]} but photograph "
                f"{entry['image']} is {width}x{height}: predictions are scored at the photograph's own size"
            )
        maps.append(probability)
    probabilities = np.stack(maps)
    metrics = evaluate_case(probabilities, label, fov, channel_names, threshold=threshold, topology=topology)
    record = {"filename": str(entry["image"]), "dataset": str(entry.get("dataset", "unknown"))}
    agreement.add(Path(entry["image"]).name, record["dataset"], binarise(probabilities, threshold), label, fov)
    binary = all(len(np.unique(channel)) <= 2 for channel in probabilities)
    return {**record, "fov_source": entry_fov_source(entry), **metrics}, binary, read


def score_predictions(
    datalist: str | Path,
    predictions: str | Path,
    output_dir: str | Path,
    split: str = "test",
    channel_names: Sequence[str] = ("vessels",),
    pattern: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    read_as: str | None = None,
) -> dict[str, Any]:
    """Score every prediction of a split and write ``metrics_per_image.csv``, ``metrics_summary.json`` and ``.csv``,
    and the measurements' agreement with the references (``measurements_per_image.csv``, ``measurement_agreement.*``,
    ``bland_altman_*.png``).

    Args:
        datalist: MONAI datalist JSON (``tools.prepare``); its labels give one mask per channel.
        predictions: the predictions' folder.
        output_dir: folder for the reports.
        split: the datalist's list to score.
        channel_names: one name per label mask, e.g. ``["vessels"]`` or ``["disc", "cup"]``.
        pattern: prediction file names (:func:`prediction_paths`); None for ``run inference``'s.
        threshold: probability from which a pixel is foreground.
        read_as: how the files' values are read, a key of :data:`READ_AS`; None: ``probabilities`` for run
            inference's own files (``pattern`` None), which the bundle writes as 8-bit probabilities, ``auto`` for
            other methods' (:func:`read_prediction`).

    Returns:
        ``{"summary", "metadata", "paths", "left_out", "earlier_reports"}``: what was written, the predictions that
        could not be scored (``{path: why}``), and the folder an earlier evaluation's reports in ``output_dir`` were
        moved to (None when there were none).

    Raises:
        ConfigError: a bad setting, or no prediction could be scored (nothing is written or moved then).
        InputError: the datalist or its split is unusable (:func:`scripts.inputs.load_split`).
        ReportWriteError: the output folder cannot be written, or its earlier reports not moved aside.
    """
    folder = Path(predictions)
    if not folder.is_dir():
        raise ConfigError(f"--predictions {folder} is not a folder")
    if not 0 < threshold < 1:
        raise ConfigError(f"--threshold {threshold:g} is outside (0, 1)")
    read_as = read_as or ("auto" if pattern else "probabilities")
    if read_as not in READ_AS:
        raise ConfigError(f"--read-as {read_as!r} is none of {', '.join(READ_AS)}")
    # The bundle's own rule for channel_names: a name with '/' (or an empty one) passed a looser check here and
    # stopped the run with evaluate_case's ValueError after every prediction had been read.
    valid, expected = SETTING_RULES["channel_names"]
    if not valid(channel_names):
        shown = list(channel_names) if isinstance(channel_names, (list, tuple)) else channel_names
        raise ConfigError(f"--channels {shown!r} must be {expected}")
    check_pattern(pattern, channel_names)
    entries = load_split(datalist, split, channels=channel_names)
    topology = [structure_of(name) for name in channel_names] == ["vessels"]
    records, left_out, binary, guessed = [], {}, 0, Counter()
    agreement = MeasurementAgreement(output_dir, channel_names, threshold=threshold)
    planned = [prediction_paths(entry["image"], folder, channel_names, pattern) for entry in entries]
    shared = _shared_predictions(entries, planned)
    for index, (entry, paths) in enumerate(zip(entries, planned)):
        if index in shared:
            path, why = shared[index]
            if str(path) not in left_out:  # one line for the photographs that share it
                left_out[str(path)] = why
                logger.error("%s; left out", why)
            continue
        missing = [path for path in paths if not path.is_file()]
        if missing:
            left_out[str(missing[0])] = f"no prediction for {entry['image']}" + _namesake_hint(missing[0])
            logger.error("%s: %s; left out", missing[0], left_out[str(missing[0])])
            continue
        try:
            record, is_binary, read = _score_entry(entry, paths, channel_names, threshold, topology, agreement, read_as)
        except FundusError as error:
            left_out[str(paths[0])] = str(error)
            logger.error("%s; left out", error)
            continue
        records.append(record)
        binary += is_binary
        guessed.update(read & _AUTO_WARNINGS.keys())
    if not records:
        raise ConfigError(
            f"no prediction in {folder} could be scored against the {len(entries)} images of split '{split}' "
            f"(e.g. {next(iter(left_out))}: {next(iter(left_out.values()))}); --pattern names the files"
        )
    for kind, count in guessed.items():
        logger.warning("%d of %d predictions %s (--read-as auto; each named above)", count, len(records), _AUTO_WARNINGS[kind])
    if binary:
        logger.warning(
            "%d of %d predictions are binary masks: their AUC is that of one operating point, below what their "
            "probabilities would give",
            binary,
            len(records),
        )
    summary = summarise(records)
    metadata = {
        "predictions": str(folder.absolute()),
        "pattern": pattern or "run inference's names (<stem>_prob.png, <stem>_prob_<channel>.png)",
        "datalist": str(Path(datalist).absolute()),
        "evaluated_split": split,
        "channel_names": list(channel_names),
        "threshold": threshold,
        "read_as": read_as,
        "scored": len(records),
        "left_out": left_out,
    }
    # Only now, with reports to write: an earlier evaluation's or scoring's reports stay where they were when this
    # scoring writes nothing, and are moved (never replaced) when it does, as run evaluating moves them. Reports it
    # would not rewrite (measurement_agreement.*, bland_altman_*.png) would otherwise pass for this method's.
    try:
        earlier = keep_earlier_evaluation(output_dir)
    except OSError as error:
        raise ReportWriteError(
            f"cannot move the earlier reports in folder {output_dir} aside: {error.strerror or error}"
        ) from error
    paths = write_reports(records, summary, output_dir, metadata=metadata)
    agreement.report()
    table = format_summary_table(summary)
    logger.info("%d of %d predictions scored on split %s:\n%s", len(records), len(entries), split, table)
    return {"summary": summary, "metadata": metadata, "paths": paths, "left_out": left_out, "earlier_reports": earlier}


def _parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.score",
        description="Score predictions made elsewhere against a datalist's reference masks, as run evaluating does.",
    )
    parser.add_argument("--datalist", required=True, type=path_argument, help="datalist JSON (MONAI format, tools.prepare)")
    parser.add_argument("--predictions", required=True, type=path_argument, help="folder of probability maps or masks")
    parser.add_argument("--output", required=True, type=path_argument, help="folder for the reports")
    parser.add_argument("--split", default="test", help="the datalist's list to score (default: test)")
    parser.add_argument("--channels", nargs="+", default=["vessels"], help="one name per label mask (default: vessels)")
    parser.add_argument("--pattern", help="prediction file name with {stem} (and {channel}); default: inference's")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="foreground from (default 0.5)")
    parser.add_argument(
        "--read-as",
        choices=list(READ_AS),
        help="how the files' values are read: "
        + "; ".join(f"{key}: {meaning}" for key, meaning in READ_AS.items())
        + " (default: probabilities for run inference's own files, auto with --pattern)",
    )
    return parser.parse_args(argv)


@command_line
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        0 when every prediction was scored; 1 when some were left out (the others are scored and reported) or the
        settings, datalist or output folder are unusable (the error is printed in one line).
    """
    arguments = _parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = score_predictions(
        arguments.datalist,
        arguments.predictions,
        arguments.output,
        arguments.split,
        arguments.channels,
        arguments.pattern,
        arguments.threshold,
        arguments.read_as,
    )
    logger.info("reports: %s", ", ".join(str(path) for path in result["paths"].values()))
    if result["left_out"]:
        left_out = len(result["left_out"])
        logger.error("%d predictions were left out (named above): the reports cover the others", left_out)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

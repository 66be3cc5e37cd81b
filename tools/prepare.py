"""Build MONAI datalists from fundus datasets as they are distributed, and pool datalists for cross-dataset training.

One generic loader serves every dataset of :mod:`tools.datasets`: it finds the cases a description's patterns
match under the source folder, splits them (official or seeded), decodes and checks every image and annotation once,
writes the masks it has to derive (decoded annotations, annotator unions, estimated fields of view) as PNG files into
``<output folder>/<datalist name>_derived/`` (each datalist its own: two sources prepared into one folder never
share a mask), and writes the datalist atomically. A datalist already at ``--output`` (with its derived folder) is
first moved to ``<output folder>/earlier_datalists/<time>/``, its paths pointed at the moved masks, with a warning:
a model trained on it is evaluated with it, not with a new split of the same images. A rerun that would write the
same datalist and masks leaves them where they are.

Command line::

    python -m tools.prepare --dataset DRIVE --src /data/DRIVE --output datalists/drive.json
    python -m tools.prepare --pool datalists/drive.json datalists/chase.json --output datalists/vessels.json

Defaults and choices:

- ``--annotator first`` (default) is the field's reference annotator; ``second`` and ``union`` (pixelwise OR, the
  SAM2LoRA protocol) need a dataset with a second annotator (DRIVE, CHASE_DB1, STARE, PAPILA). DRIVE's training
  images have no second annotation: they keep the first one, their entries record ``"annotator": "first"`` and the
  datalist's ``annotator_note`` says how many images fell back.
- ``--split auto`` (default) takes the official split where a dataset has one (DRIVE, FIVES, DRISHTI-GS, REFUGE2)
  and, for CHASE_DB1, the field's convention (first 20 images training, last 8 test); other datasets get a seeded
  random split with SAM2LoRA's test fractions (0.27 CHASE_DB1 and HRF, 0.25 otherwise; ``--test-fraction``
  overrides). ``--split seeded`` forces the random split (SAM2LoRA's protocol for CHASE_DB1).
- validation is REFUGE2's official val/ set, otherwise a seeded ``--val-fraction`` (default 0.2) of the training
  pool, drawn independently of the test draw.
- seeded draws take whole people, so that one person's images (both eyes, repeat visits) never sit on both sides of
  a split: CHASE_DB1 (``Image_NNL``/``NNR``: child NN) and PAPILA (``RETnnnOD``/``OS``: patient nnn) say whose each
  image is; for other names, ``--patient-pattern REGEX`` (its group ``patient``, matched against the whole case id)
  says it. A drawn set then holds at least its fraction, up to one person's images more.

Datalist (JSON): ``training``, ``validation`` and ``test`` lists of entries ``{"image", "label", "fov",
"fov_source", "dataset", "case", "annotator"}`` with absolute paths (``label`` is one mask for vessels, ``[disc,
cup]`` for disc/cup; masks are 0 = background, > 0 = structure; ``fov_source`` is ``"given"``, the dataset's mask,
or ``"estimated"`` from the photograph for a dataset distributed without), plus the provenance keys ``dataset``,
``task``, ``structures``, ``annotator``, ``annotator_note``, ``completeness_note`` (set where fewer or more usable
images were found than the complete dataset holds), ``left_out`` (the cases that cannot be used, each ``{"case",
"image", "split", "reason"}``; they are also named in one warning, and the other cases are prepared), ``split``,
``split_summary``, ``validation_split``, ``seed``, ``test_fraction``, ``val_fraction``, ``patient_pattern``,
``patients`` (people per split, where a pattern applies), ``source`` and the counts ``numTraining``,
``numValidation``, ``numTest``.
Distributed files are referenced where they already follow that convention, otherwise rewritten into the derived
folder. Images are referenced as distributed (tif, gif, ppm.gz...): read them with :mod:`scripts.fundus_io`.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import logging
import os
import posixpath
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from scripts.atomic import move_aside, write_json_atomic
from scripts.errors import FundusError, command_line, is_real_number, is_whole_number
from scripts.fundus_io import SUPPORTED_SUFFIXES, estimate_fov, read_image, write_png
from scripts.metrics import FOV_SOURCES
from tools import path_argument
from tools.datasets import (
    ANNOTATORS,
    DATASETS,
    TASK_STRUCTURES,
    DatasetDescription,
    DatasetError,
    Template,
    decode_binary_masks,
    get_description,
    read_annotations_once,
    read_binary_mask,
)

__all__ = [
    "EARLIER_DATALISTS",
    "SPLITS",
    "SPLIT_METHODS",
    "Case",
    "find_cases",
    "main",
    "pool_datalists",
    "prepare_dataset",
    "split_cases",
]

SPLIT_METHODS = ("auto", "official", "seeded")
"""``auto``: the official (or conventional) split where the dataset has one, seeded otherwise."""

SPLITS = ("training", "validation", "test")
"""Datalist list keys."""

_COUNT_KEYS = {"training": "numTraining", "validation": "numValidation", "test": "numTest"}
EARLIER_DATALISTS = "earlier_datalists"
"""The folder beside a datalist that earlier datalists written to its name are moved to, each in ``<time>/``."""

logger = logging.getLogger(__name__)

# Archive debris (macOS resource forks, hidden files) that must never be taken for images.
_IGNORED_PARTS = re.compile(r"^(\..*|__MACOSX)$")


@dataclass(frozen=True)
class Case:
    """One image of a dataset with the files found for it.

    Args:
        case_id: unique id within the dataset, names derived files.
        image: the fundus photograph.
        annotations: annotator to its annotation files (annotators without files for this image are absent).
        fov: the distributed field-of-view mask, or None.
        groups: the case pattern's named groups (e.g. the distributed split folder).
        problem: why the case cannot be used (a file it needs is missing or ambiguous), naming the file; None for a
            case whose files were all found. ``image`` is then the file the case was found by where its image was
            not found.
    """

    case_id: str
    image: Path
    annotations: Mapping[str, tuple[Path, ...]]
    fov: Path | None
    groups: Mapping[str, str]
    problem: str | None = None


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute and normalised (``..`` removed, symlinks kept), as MONAI's datalist loader reads paths."""
    return Path(os.path.abspath(Path(path).expanduser()))


def _logical_path(relative: str) -> str:
    """A relative path as patterns see it: a trailing ``.gz`` removed (STARE gzips its files)."""
    return relative[:-3] if relative.lower().endswith(".gz") else relative


class _FileIndex:
    """The files below a folder, looked up case-insensitively by relative path (``.gz`` transparent).

    ``ignore`` lists files and folders to leave out: this preparer's own outputs when they lie inside the dataset.
    """

    def __init__(self, root: Path, ignore: Sequence[Path] = ()) -> None:
        self.root = root
        self.files: dict[str, Path] = {}
        self.logical: dict[str, str] = {}
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if any(_IGNORED_PARTS.match(part) for part in relative.parts) or not path.is_file():
                continue
            if any(path == skipped or skipped in path.parents for skipped in ignore):
                continue
            logical = _logical_path(relative.as_posix())
            key = logical.lower()
            # Where both x.ppm and x.ppm.gz exist, the uncompressed file wins.
            if key not in self.files or self.files[key].name.lower().endswith(".gz"):
                self.files[key] = path
                self.logical[key] = logical
        self.by_stem: dict[str, list[Path]] = {}
        for key, path in self.files.items():
            suffix = Path(key).suffix
            if suffix in SUPPORTED_SUFFIXES:
                self.by_stem.setdefault(key[: -len(suffix)], []).append(path)

    def resolve(self, template: Template, root: str, groups: Mapping[str, str]) -> Path | None:
        """The file a template names below ``root`` (a relative folder ending in ``/`` or empty), or None.

        Raises:
            DatasetError: when a ``.*`` template matches several image files.
        """
        for alternative in (template,) if isinstance(template, str) else template:
            relative = root + alternative.format(**groups)
            if relative.endswith(".*"):
                found = self.by_stem.get(relative[:-2].lower(), [])
                if len(found) > 1:
                    raise DatasetError(f"ambiguous files for {self.root / relative}: {', '.join(map(str, found))}")
                if found:
                    return found[0]
            elif relative.lower() in self.files:
                return self.files[relative.lower()]
        return None

    def expected(self, template: Template, root: str, groups: Mapping[str, str]) -> str:
        """The absolute path(s) a template names, for error messages."""
        alternatives = (template,) if isinstance(template, str) else template
        return " or ".join(str(self.root / (root + alternative.format(**groups))) for alternative in alternatives)


def _natural_key(text: str) -> list:
    """Sort key ordering embedded numbers by value (``im2`` before ``im10``)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _groups(match: re.Match) -> dict[str, str]:
    """The named groups of a case-pattern match, without the internal root group."""
    return {name: value for name, value in match.groupdict().items() if name != "_root" and value is not None}


def _matches(description: DatasetDescription, index: _FileIndex) -> list[tuple[re.Match, Path]]:
    """The files of ``index`` matching the description's case pattern below any folder."""
    pattern = re.compile(r"(?P<_root>(?:[^/]+/)*?)" + description.case_pattern, re.IGNORECASE)
    found = []
    for key, path in index.files.items():
        match = pattern.fullmatch(index.logical[key])
        if match:
            found.append((match, path))
    return found


def _no_cases_message(description: DatasetDescription, index: _FileIndex) -> str:
    """Why no case was found, naming the datasets the folder looks like instead."""
    lookalikes = [
        other.name for other in DATASETS.values() if other.name != description.name and _matches(other, index)
    ]
    message = f"no {description.name} images found under {index.root}: expected {description.layout}"
    if lookalikes:
        message += f" (the folder looks like {' or '.join(lookalikes)})"
    return message


def _resolve_image(description: DatasetDescription, index: _FileIndex, match: re.Match, anchor: Path) -> Path:
    """The image of a case: the matched file, the file its annotation names, or the image template's file.

    Raises:
        DatasetError: when the image is not found, or a ``.*`` template matches several files.
    """
    if description.image is None:
        return anchor
    groups = _groups(match)
    if description.image_hint is not None:
        hint = description.image_hint(anchor)
        if hint:
            for candidate in (anchor.parent / hint, anchor.parent / Path(hint).name):
                if candidate.is_file():
                    return Path(os.path.normpath(candidate))
    image = index.resolve(description.image, match["_root"], groups)
    if image is None:
        raise DatasetError(
            f"{description.name}: image of annotation {anchor} not found: expected "
            f"{index.expected(description.image, match['_root'], groups)}"
        )
    return image


def _alternatives(template: Template) -> tuple[str, ...]:
    """The alternative templates of a template."""
    return (template,) if isinstance(template, str) else template


def _misnamed_hint(index: _FileIndex, template: Template, root: str, groups: Mapping[str, str]) -> str:
    """Where a missing file seems to be present under another name (``d24_mask.png`` for ``d24.*``), how to rename it.

    Candidates are the image files in the expected folder whose name is the expected one followed by a separator and
    more (``_mask``, ``-manual1``): a user's naming habit, not another case (``d240`` is one).

    Returns:
        ``"; found PATH: rename it NAME..."``, or an empty string when no such file is there.
    """
    for alternative in _alternatives(template):
        expected = root + alternative.format(**groups)
        stem = expected[:-2] if expected.endswith(".*") else expected[: -len(Path(expected).suffix) or None]
        prefix = stem.lower()
        found = sorted(
            path
            for key, paths in index.by_stem.items()
            for path in paths
            if key.startswith(prefix)
            and len(key) > len(prefix)
            and not key[len(prefix)].isalnum()
            and "/" not in key[len(prefix) :]
        )
        if found:
            suffix = Path(_logical_path(found[0].name)).suffix if expected.endswith(".*") else ""
            new_name = Path(stem).name + suffix if suffix else Path(expected).name
            listed = ", ".join(path.relative_to(index.root).as_posix() for path in found)
            which = "it" if len(found) == 1 else "the right one"
            return f"; found {listed}: rename {which} {new_name}, the name the layout expects"
    return ""


def _locate_case(
    description: DatasetDescription, index: _FileIndex, match: re.Match, anchor: Path, required: set[str]
) -> Case:
    """The files of the case a case-pattern match found; a missing required file is the case's problem, not an error.

    Args:
        description: the dataset's description.
        index: the files of the dataset folder.
        match: the case pattern's match.
        anchor: the matched file.
        required: the annotators whose annotation the case needs.

    Returns:
        the case, with its ``problem`` set where an image, annotation or required FOV file is missing or ambiguous.
    """
    groups = _groups(match)
    root = match["_root"]
    case_id = description.case_id.format(**groups)
    image, annotations, fov = anchor, {}, None
    try:
        image = _resolve_image(description, index, match, anchor)
        for name, templates in description.annotations.items():
            files = [index.resolve(template, root, groups) for template in templates]
            if all(files):
                annotations[name] = tuple(files)
            elif name in required:
                missing = next(t for t, f in zip(templates, files) if f is None)
                whose = "annotation" if len(description.annotations) == 1 else f"{name} annotator's annotation"
                raise DatasetError(
                    f"{whose} of image {image} not found: expected {index.expected(missing, root, groups)}"
                    + _misnamed_hint(index, missing, root, groups)
                )
        fov = index.resolve(description.fov, root, groups) if description.fov else None
        if description.fov and fov is None and description.fov_required:
            raise DatasetError(
                f"FOV mask of image {image} not found: expected {index.expected(description.fov, root, groups)}"
                + _misnamed_hint(index, description.fov, root, groups)
            )
    except DatasetError as error:
        return Case(case_id, image, annotations, fov, groups, problem=str(error))
    return Case(case_id, image, annotations, fov, groups)


_UNUSED_EXAMPLES = 5
"""How many unused files a warning names."""


def _unused_files(
    description: DatasetDescription, index: _FileIndex, matches: Sequence[tuple[re.Match, Path]], cases: Sequence[Case]
) -> list[str]:
    """The files in the layout's folders that no case uses, each with why (``images/a.webp (suffix ...)``).

    The layout's folders are those its templates name for the cases found (``images/``, ``masks/``, ``fov/``) and
    their subfolders; other files (a readme beside them) are not the layout's.
    """
    used = {path for case in cases for path in (case.image, case.fov, *sum(case.annotations.values(), ())) if path}
    used.update(anchor for _, anchor in matches)  # a photograph left out for a twin of another suffix is named there
    folders = set()
    for match, anchor in matches:
        root, groups = match["_root"], _groups(match)
        folders.add(posixpath.dirname(_logical_path(anchor.relative_to(index.root).as_posix()).lower()))
        templates = [description.image, description.fov, *(t for ts in description.annotations.values() for t in ts)]
        for template in filter(None, templates):
            folders.update(posixpath.dirname((root + a.format(**groups)).lower()) for a in _alternatives(template))
    unused = []
    for key, path in index.files.items():
        folder = posixpath.dirname(key)
        if path in used or not any(folder == f or not f or folder.startswith(f + "/") for f in folders):
            continue
        logical = index.logical[key]
        suffix = posixpath.splitext(logical)[1]
        if suffix.lower() not in SUPPORTED_SUFFIXES:
            why = f"suffix {suffix or '(none)'} is not an image suffix read"
        elif folder not in folders:
            why = f"subfolder {posixpath.dirname(logical)}/ is not part of the layout"
        else:
            why = "names no image"
        unused.append(f"{logical} ({why})")
    return unused


# Telling a case from another file, finding its image and decoding it read the same labelme file: parsed once.
@read_annotations_once()
def find_cases(
    description: DatasetDescription, src: str | os.PathLike, annotator: str = "first", ignore: Sequence[Path] = ()
) -> list[Case]:
    """Find every case of a dataset below ``src`` with its image, annotation and FOV files.

    A case missing a file it needs is returned with its ``problem`` set rather than stopping the search, so that every
    such case is named at once. Where the description says so (``folder`` datasets), files of the layout's folders
    that no case uses (an image in a subfolder or of another suffix, a mask named after no image) are named in a
    warning.

    Args:
        description: the dataset's description.
        src: the folder the dataset was unpacked into (its layout may sit in a subfolder).
        annotator: ``first``, ``second`` or ``union``: which annotation files must exist.
        ignore: absolute files and folders below ``src`` that are not part of the dataset (earlier outputs).

    Returns:
        the cases in natural order of their ids.

    Raises:
        DatasetError: when ``src`` is not a folder, nothing matches the layout, or a case id repeats.
    """
    root = _absolute(src)
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        # The generic dataset is named "folder": "folder folder X" would repeat it.
        owner = "folder" if description.name.lower() == "folder" else f"{description.name} folder"
        raise DatasetError(f"{owner} {root} {problem}")
    index = _FileIndex(root, ignore)
    matches, skipped = [], []
    for match, anchor in _matches(description, index):
        is_case = description.is_case is None or description.is_case(anchor)
        (matches if is_case else skipped).append((match, anchor))
    if not matches:
        message = _no_cases_message(description, index)
        if skipped:
            message += f"; {len(skipped)} file(s) there are not {description.name} annotations (e.g. {skipped[0][1]})"
        raise DatasetError(message)
    if skipped:
        logger.warning(
            "%s: %d file(s) under %s are not its annotations and were passed over (e.g. %s)",
            description.name, len(skipped), root, skipped[0][1],
        )
    required = _required_annotators(description, annotator)
    cases: dict[str, Case] = {}
    for match, anchor in matches:
        case = _locate_case(description, index, match, anchor, required)
        found = cases.get(case.case_id)
        if found is not None and found.image.parent != case.image.parent:
            raise DatasetError(
                f"{description.name} image {case.case_id} found twice: {found.image} and {case.image}; "
                "point --src at one copy of the dataset"
            )
        if found is not None:
            # One folder holding the same name under two suffixes: no mask can say which photograph it belongs to.
            case = replace(
                found,
                problem=f"two images named {case.case_id} in {case.image.parent}: {found.image.name} and "
                f"{case.image.name}; keep one",
            )
        cases[case.case_id] = case
    if description.reports_unused_files:
        unused = _unused_files(description, index, matches, list(cases.values()))
        if unused:
            more = f" and {len(unused) - _UNUSED_EXAMPLES} more" if len(unused) > _UNUSED_EXAMPLES else ""
            logger.warning(
                "%s: %d file(s) under %s are used by no image and were passed over: %s%s",
                description.name, len(unused), root, ", ".join(unused[:_UNUSED_EXAMPLES]), more,
            )
    return [cases[case_id] for case_id in sorted(cases, key=_natural_key)]


def _count(total: int, fraction: float, minimum: int) -> int:
    """How many of ``total`` items a fraction takes: rounded half up, at least ``minimum``, leaving one behind."""
    if fraction <= 0 or total < 2:
        return 0
    return min(max(int(np.floor(fraction * total + 0.5)), minimum), total - 1)


PatientOf = Callable[[Case], tuple[str, str]]
"""The person a case was photographed from, as a key: ``("patient", name)``, or ``("image", case id)`` if unknown."""


def _patient_rule(pattern: str | None, setting: str) -> PatientOf:
    """The person of each case: the pattern's ``patient`` group where it matches the whole case id, else the image.

    Args:
        pattern: regular expression with a group named ``patient``, matched case-insensitively; None: every image is
            its own person.
        setting: where the pattern came from, named in errors.

    Raises:
        DatasetError: when the pattern does not compile or has no ``patient`` group.
    """
    if pattern is None:
        return lambda case: ("image", case.case_id)
    try:
        compiled = re.compile(pattern, re.IGNORECASE)
    except re.error as error:
        raise DatasetError(f"{setting} '{pattern}' is not a regular expression ({error})") from None
    if "patient" not in compiled.groupindex:
        raise DatasetError(f"{setting} '{pattern}' has no group named 'patient', e.g. (?P<patient>\\d+)_[LR]")

    def patient_of(case: Case) -> tuple[str, str]:
        match = compiled.fullmatch(case.case_id)
        return ("patient", match["patient"].lower()) if match and match["patient"] else ("image", case.case_id)

    return patient_of


def _by_patient(cases: Sequence[Case], patient_of: PatientOf) -> list[list[Case]]:
    """The cases grouped by person, people in order of their first case."""
    people: dict[tuple[str, str], list[Case]] = {}
    for case in cases:
        people.setdefault(patient_of(case), []).append(case)
    return list(people.values())


def _seeded_pick(
    cases: Sequence[Case], count: int, seed_sequence: np.random.SeedSequence, patient_of: PatientOf
) -> set[str]:
    """Ids of at least ``count`` cases drawn at random from ``cases`` (in natural order), whole people at a time.

    People are drawn in a seeded random order until their images reach ``count``, always leaving one out; where each
    image is its own person this is exactly ``count`` images.
    """
    people = _by_patient(cases, patient_of)
    order = np.random.default_rng(seed_sequence).permutation(len(people))
    picked: set[str] = set()
    for index in order[:-1]:
        if len(picked) >= count:
            break
        picked.update(case.case_id for case in people[int(index)])
    return picked


def _official_parts(description: DatasetDescription, cases: Sequence[Case]) -> dict[str, list[Case]]:
    """The cases per split of the dataset's official split (cases in natural order)."""
    rule = description.official_split
    parts: dict[str, list[Case]] = {name: [] for name in SPLITS}
    if rule.first_training is not None:
        if len(cases) <= rule.first_training:
            raise DatasetError(
                f"{description.name}'s official split ({rule.summary}) needs more than {rule.first_training} "
                f"images, found {len(cases)}; use --split seeded"
            )
        parts["training"] = list(cases[: rule.first_training])
        parts["test"] = list(cases[rule.first_training :])
    else:
        for case in cases:
            parts[rule.parts[case.groups[rule.group].lower()]].append(case)
    return parts


def _seed_problem(seed: object) -> str | None:
    """What is wrong with a seed of the random draws, or None: numpy's ``SeedSequence`` takes non-negative integers
    only, and None would draw from fresh entropy, a split no seed recorded can repeat."""
    return None if is_whole_number(seed) and seed >= 0 else f"must be a non-negative integer, got {seed!r}"


def split_cases(
    description: DatasetDescription,
    cases: Sequence[Case],
    method: str = "auto",
    seed: int = 0,
    test_fraction: float | None = None,
    val_fraction: float = 0.2,
    patient_pattern: str | None = None,
) -> tuple[dict[str, list[Case]], dict[str, object]]:
    """Split cases into training, validation and test.

    The test set is the official one (``official``) or a seeded random ``test_fraction`` of all cases (``seeded``);
    validation is the official one where the dataset has it (REFUGE2), otherwise a seeded random ``val_fraction`` of
    the training pool, never of the test set. The test draw does not depend on ``val_fraction``. Seeded draws take
    whole people (see ``patient_pattern``), so that one person's eyes never sit on both sides of a split; a set then
    holds at least its fraction, up to one person's images more.

    Args:
        description: the dataset's description.
        cases: the dataset's cases, as returned by :func:`find_cases`.
        method: ``auto`` (official where the dataset has a split, seeded otherwise), ``official`` or ``seeded``.
        seed: seed of the random draws, a non-negative integer.
        test_fraction: seeded test fraction; None for the dataset's default (SAM2LoRA's: 0.27 or 0.25).
        val_fraction: fraction of the training pool used for validation, in ``[0, 1)``.
        patient_pattern: regular expression whose group ``patient`` names the person in a case id (see
            :class:`tools.datasets.DatasetDescription`); None: the dataset's own (CHASE_DB1, PAPILA), if any.

    Returns:
        the cases per split (natural order), and the split's provenance for the datalist.

    Raises:
        DatasetError: for an invalid method, seed, fraction or patient pattern, an official split the dataset does
            not have, or too few cases or people.
    """
    if method not in SPLIT_METHODS:
        raise DatasetError(f"unknown split method {method!r}: expected one of {', '.join(SPLIT_METHODS)}")
    seed_problem = _seed_problem(seed)
    if seed_problem:
        raise DatasetError(f"--seed {seed_problem}")
    rule = description.official_split
    if method == "auto":
        method = "official" if rule is not None else "seeded"
    # is_real_number first: a fraction given as text or None (from Python) would fail the comparison with a TypeError.
    if not is_real_number(val_fraction) or not 0 <= val_fraction < 1:
        raise DatasetError(f"--val-fraction must be in [0, 1), got {val_fraction!r}")
    if method == "official" and rule is None:
        raise DatasetError(f"{description.name} has no official split: use --split seeded")
    if method == "official" and test_fraction is not None:
        raise DatasetError(
            f"--test-fraction applies to seeded splits; {description.name} uses its official split (add --split seeded)"
        )
    if test_fraction is None:
        test_fraction = description.test_fraction if method == "seeded" else None
    if test_fraction is not None and not (is_real_number(test_fraction) and 0 < test_fraction < 1):
        raise DatasetError(f"--test-fraction must be in (0, 1), got {test_fraction!r}")
    setting = f"{description.name}'s patient pattern" if patient_pattern is None else "--patient-pattern"
    if patient_pattern is None:
        patient_pattern = description.patient_pattern
    patient_of = _patient_rule(patient_pattern, setting)
    unnamed = [case.case_id for case in cases if patient_of(case)[0] == "image"]
    if patient_pattern and unnamed:
        if len(unnamed) == len(cases) and setting == "--patient-pattern":
            raise DatasetError(
                f"--patient-pattern '{patient_pattern}' matches none of the {len(cases)} image names (e.g. "
                f"{unnamed[0]}): it must match a whole name"
            )
        logger.warning(
            "%s: %d of %d image names do not match %s '%s' (e.g. %s); each of them counts as a person of its own",
            description.name, len(unnamed), len(cases), setting, patient_pattern, unnamed[0],
        )
    # Natural order of ids, so that the draws depend on the seed only, not on how the files were listed.
    cases = sorted(cases, key=lambda case: _natural_key(case.case_id))
    test_seed, validation_seed = np.random.SeedSequence(seed).spawn(2)
    if method == "official":
        summary = rule.summary
        parts = _official_parts(description, cases)
        # A split by image counts (CHASE_DB1's first 20 / last 8) cuts between people only on a complete download.
        straddling = {patient_of(case) for case in parts["training"]} & {patient_of(case) for case in parts["test"]}
        if any(kind == "patient" for kind, _ in straddling):
            person = min(name for kind, name in straddling if kind == "patient")
            raise DatasetError(
                f"{description.name}'s official split ({summary}) puts images of person {person} in both training "
                f"and test: {len(cases)} images were found under the source, so some are missing. Complete the "
                "download, or use --split seeded (which draws whole people)"
            )
    else:
        summary = f"seeded random split, test fraction {test_fraction}"
        people = len(_by_patient(cases, patient_of))
        if people < 2:
            raise DatasetError(
                f"{description.name}: a seeded split needs images of at least 2 people, found {len(cases)} "
                f"image(s) of {people}"
            )
        test_ids = _seeded_pick(cases, _count(len(cases), test_fraction, minimum=1), test_seed, patient_of)
        parts = {
            "training": [case for case in cases if case.case_id not in test_ids],
            "validation": [],
            "test": [case for case in cases if case.case_id in test_ids],
        }
    if not parts["training"] or not parts["test"]:
        empty = "training" if not parts["training"] else "test"
        raise DatasetError(f"{description.name}: the {empty} set of the {method} split is empty ({summary})")
    validation_split = "official" if parts["validation"] else "seeded"
    if validation_split == "seeded":
        pool = parts["training"]
        validation_ids = _seeded_pick(pool, _count(len(pool), val_fraction, minimum=1), validation_seed, patient_of)
        parts["validation"] = [case for case in pool if case.case_id in validation_ids]
        parts["training"] = [case for case in pool if case.case_id not in validation_ids]
    provenance = {
        "split": method,
        "split_summary": summary,
        "validation_split": validation_split,
        "seed": seed,
        "test_fraction": test_fraction,
        "val_fraction": val_fraction if validation_split == "seeded" else None,
        "patient_pattern": patient_pattern,
        "patients": {name: len(_by_patient(part, patient_of)) for name, part in parts.items()}
        if patient_pattern
        else None,
    }
    return parts, provenance


def _required_annotators(description: DatasetDescription, annotator: str) -> set[str]:
    """The annotators whose annotation every case needs for the chosen ``annotator``.

    A partial second annotator (DRIVE's, test images only) is not required: its cases fall back to the first one.
    """
    if annotator == "first" or "second" in description.partial_annotators:
        return {"first"}
    return {"second"} if annotator == "second" else {"first", "second"}


def _used_annotators(case: Case, annotator: str) -> tuple[str, tuple[str, ...]]:
    """The annotator recorded for a case and the annotators whose masks it uses.

    A case without a second annotation (DRIVE's training images) falls back to the first annotator.
    """
    if annotator == "first" or "second" not in case.annotations:
        return "first", ("first",)
    if annotator == "second":
        return "second", ("second",)
    return "union", ("first", "second")


@dataclass(frozen=True)
class _LeftOut:
    """A case that cannot be used, and why (naming the file)."""

    case: Case
    reason: str


class _CasePreparer:
    """Decodes and checks one case's files and writes the masks it has to derive."""

    def __init__(self, description: DatasetDescription, annotator: str, derived: Path, staging: Path) -> None:
        self.description = description
        self.annotator = annotator
        self.derived = derived
        self.staging = staging

    def _write(self, mask: np.ndarray, *parts: str) -> Path:
        """Write a derived mask as ``<staging folder>/<parts...>.png``; return its path once the staging folder is
        renamed to the derived folder."""
        relative = Path(*parts[:-1], f"{parts[-1]}.png")
        write_png(self.staging / relative, mask)
        return self.derived / relative

    def _read_labels(
        self, case: Case, used: tuple[str, ...], shape: tuple[int, int]
    ) -> list[Path] | list[list[np.ndarray]]:
        """The distributed label files where usable as they are, else the decoded masks of each annotator used.

        Raises:
            FundusError: when an annotation cannot be read or decoded, or does not fit its image.
        """
        if self.description.decoder is None and len(used) == 1:
            files = case.annotations[used[0]]
            decoded, usable = zip(*(read_binary_mask(path, shape) for path in files))
            return list(files) if all(usable) else [list(decoded)]
        decoder = self.description.decoder or decode_binary_masks
        return [decoder(case.annotations[name], shape) for name in used]

    def _write_labels(
        self, case: Case, per_annotator: list[list[np.ndarray]], recorded: str, shape: tuple[int, int]
    ) -> list[Path]:
        """Write the union of the annotators' masks of each structure as derived PNGs.

        Raises:
            DatasetError: when a decoder broke its contract (one mask of the image's size per structure).
        """
        description = self.description
        # Guards the contract of the decoders, which a new dataset description may bring.
        for masks in per_annotator:
            if len(masks) != len(description.structures) or any(mask.shape != shape for mask in masks):
                raise DatasetError(
                    f"{description.name} {case.case_id}: the decoder gave masks of shapes "
                    f"{[mask.shape for mask in masks]}, expected {len(description.structures)} of {shape}"
                )
        return [
            self._write(np.logical_or.reduce(masks), recorded, structure, case.case_id)
            for structure, masks in zip(description.structures, zip(*per_annotator))
        ]

    def _read_fov(self, case: Case, image: np.ndarray) -> Path | np.ndarray:
        """The distributed FOV mask where usable as it is, else the mask to derive (rewritten or estimated).

        Raises:
            FundusError: when the FOV file cannot be read or does not fit its image.
        """
        if case.fov is None:
            return estimate_fov(image)
        mask, usable = read_binary_mask(case.fov, image.shape[:2])
        return case.fov if usable else mask

    def __call__(self, case: Case) -> dict[str, object] | _LeftOut:
        """The datalist entry of a case, or why it cannot be used."""
        if case.problem is not None:
            return _LeftOut(case, case.problem)
        recorded, used = _used_annotators(case, self.annotator)
        try:
            image = read_image(case.image)
            shape = image.shape[:2]
            labels = self._read_labels(case, used, shape)
            fov = self._read_fov(case, image)
        except FundusError as error:
            # One unreadable or misfitting file leaves its case out; the others are still prepared.
            return _LeftOut(case, str(error))
        if not isinstance(labels[0], Path):
            labels = self._write_labels(case, labels, recorded, shape)
        label_names = [str(path) for path in labels]
        return {
            "image": str(case.image),
            "label": label_names[0] if self.description.task == "vessels" else label_names,
            "fov": str(fov if isinstance(fov, Path) else self._write(fov, "fov", case.case_id)),
            # A mask estimated from the photograph is not the dataset's: evaluation says so (entry_fov_source).
            "fov_source": FOV_SOURCES[1] if case.fov is None else FOV_SOURCES[0],
            "dataset": self.description.name,
            "case": case.case_id,
            "annotator": recorded,
        }


def _relocate_masks(datalist: Path, old: Path, new: Path) -> None:
    """Point a moved datalist's entries at the derived masks moved with it (its paths are absolute).

    Args:
        datalist: the moved datalist JSON, rewritten in place; left as it is when it is no prepared datalist.
        old: the derived folder its entries name.
        new: where that folder is now.
    """
    try:
        content = _read_datalist(datalist)
    except DatasetError:
        return  # not a datalist this tool wrote: kept as it was, whatever it names

    def moved(path: object) -> object:
        if isinstance(path, list):
            return [moved(item) for item in path]
        if isinstance(path, str) and Path(path).is_relative_to(old):
            return str(new / Path(path).relative_to(old))
        return path

    for split_name in SPLITS:
        for entry in content[split_name]:
            entry.update({key: moved(entry[key]) for key in ("label", "fov") if key in entry})
    write_json_atomic(datalist, content)


def _keep_earlier_datalist(output: Path, derived: Path | None = None) -> Path | None:
    """Move a datalist already at ``output`` aside before a new one is written there, and say where.

    A new datalist (another ``--seed``, split or source) would otherwise replace the split a model was trained on,
    without a word: evaluated with the new one, its test set may hold its training images. Its derived masks move
    with it: the new run's masks take that folder's place (from another source, or mended annotations, they differ)
    and hold none of the cases it no longer holds.

    Args:
        output: the datalist JSON about to be written.
        derived: its derived-mask folder (``<name>_derived``), None for a pool, which has none.

    Returns:
        The moved datalist, ``<output folder>/earlier_datalists/<time>/<name>.json``, or None when there was none.
    """
    if not output.exists():
        return None
    moving = [output, *([derived] if derived is not None and derived.exists() else [])]
    target = move_aside(moving, output.parent / EARLIER_DATALISTS)
    kept = target / output.name
    if derived is not None and len(moving) == 2:
        _relocate_masks(kept, derived, target / derived.name)
    logger.warning(
        "%s held an earlier datalist: moved to %s%s; a model trained on it must be evaluated with that datalist, "
        "whose split the new one does not keep",
        output, kept, f" with its derived masks ({target / derived.name})" if len(moving) == 2 else "",
    )
    return kept


def _same_as_earlier(output: Path, datalist: Mapping[str, object], derived: Path | None = None,
                     staging: Path | None = None) -> bool:
    """Whether the datalist at ``output`` is the one about to be written, derived masks included.

    A rerun that changes nothing keeps it where it is: moved aside, it would be one more copy, announced as a
    split the new datalist does not keep.

    Args:
        output: the datalist JSON about to be written.
        datalist: its new content.
        derived: its derived-mask folder, None for a pool, which has none.
        staging: the folder the new run's derived masks were written to (with ``derived``).
    """
    try:
        earlier = json.loads(output.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if earlier != json.loads(json.dumps(datalist)):
        return False
    if derived is None or staging is None:
        return True
    before, now = _files_under(derived), _files_under(staging)
    return before.keys() == now.keys() and all(filecmp.cmp(before[name], now[name], shallow=False) for name in now)


def _files_under(folder: Path) -> dict[Path, Path]:
    """The files under ``folder`` (none where it does not exist), by their path relative to it."""
    return {path.relative_to(folder): path for path in folder.rglob("*") if path.is_file()}


def _reasons(left_out: Sequence[_LeftOut]) -> str:
    """The left-out cases with their reasons, on one line."""
    return "; ".join(f"{item.case.case_id}: {item.reason}" for item in left_out)


@read_annotations_once()
def prepare_dataset(
    name: str,
    src: str | os.PathLike,
    output: str | os.PathLike,
    annotator: str = "first",
    split: str = "auto",
    seed: int = 0,
    test_fraction: float | None = None,
    val_fraction: float = 0.2,
    task: str | None = None,
    folder_name: str | None = None,
    workers: int | None = None,
    patient_pattern: str | None = None,
) -> dict[str, object]:
    """Prepare one dataset: find, split, check and decode its cases, write derived masks and the datalist.

    Derived masks go to ``<output folder>/<datalist name>_derived/{fov,<annotator>/<structure>}/<case>.png``
    (``drive_derived/`` beside ``drive.json``); each file is written atomically. A datalist already at ``output``
    is moved with its derived folder to ``earlier_datalists/<time>/`` beside it, with a warning, once the new
    datalist is complete (its masks are written into a hidden folder beside it, renamed to the derived folder then);
    one identical to the new one, masks included, stays as it is.

    A case that cannot be used (a missing or misnamed annotation, an unreadable image or mask, a mask of another size
    than its image, a 0/1 mask saved as JPEG) is left out rather than stopping the others: every such case is named
    with its reason in one warning and in the datalist's ``left_out``. The split is drawn with them and they are then
    taken out, so that each other case keeps its set (the official one included).

    Args:
        name: dataset name (:data:`tools.datasets.DATASETS`, any letter case) or ``folder``.
        src: the folder the dataset was unpacked into.
        output: the datalist JSON file to write.
        annotator: ``first`` (the reference), ``second`` or ``union`` (pixelwise OR of both, as in SAM2LoRA).
        split: ``auto``, ``official`` or ``seeded`` (see :func:`split_cases`).
        seed: seed of the random draws.
        test_fraction: seeded test fraction (None: the dataset's default).
        val_fraction: validation fraction of the training pool.
        task: task of a ``folder`` dataset (``vessels`` or ``disc_cup``).
        folder_name: dataset name recorded for a ``folder`` dataset (default ``folder``).
        workers: threads decoding cases in parallel (None: up to 8, by CPU count).
        patient_pattern: regular expression whose group ``patient`` names the person in a case id, so that seeded
            draws keep each person's images together (None: the dataset's own, see :func:`split_cases`).

    Returns:
        the datalist as written.

    Raises:
        DatasetError: for a bad argument, folder or layout, a case id found twice, or when no image can be used or
            the training or test set is left empty (the message lists every unusable case with its reason); no
            datalist, derived mask or output folder is left then, and an earlier datalist and its masks stay as
            they were.
    """
    if folder_name is not None and name.lower() != "folder":
        raise DatasetError(f"a dataset name (--name {folder_name}) applies to folder datasets only, not {name}")
    description = get_description(name, task, folder_name or "folder")
    if annotator not in ANNOTATORS:
        raise DatasetError(f"unknown annotator {annotator!r}: expected one of {', '.join(ANNOTATORS)}")
    if annotator != "first" and "second" not in description.annotations:
        having = ", ".join(known for known, other in DATASETS.items() if "second" in other.annotations)
        raise DatasetError(
            f"{description.name} has a single annotator: --annotator {annotator} needs a second one ({having} have it)"
        )
    output = _absolute(output)
    # Named after the datalist, not the dataset: two folders prepared as the same dataset (two "folder" sets,
    # two copies of DRIVE) into one output folder would otherwise overwrite each other's masks.
    derived = output.parent / f"{output.stem}_derived"
    earlier = output.parent / EARLIER_DATALISTS
    cases = find_cases(description, src, annotator, ignore=(output, derived, earlier))
    if all(case.problem is not None for case in cases):
        unusable = [_LeftOut(case, case.problem) for case in cases]
        raise DatasetError(
            f"{description.name}: none of the {len(cases)} images under {src} can be used: {_reasons(unusable)}"
        )
    completeness_note = None
    # The images the datalist will hold: a stray picture without annotations is not a larger dataset, and an image
    # left out for a missing mask makes a partial one.
    usable = sum(case.problem is None for case in cases)
    if description.distributed_images is not None and usable != description.distributed_images:
        completeness_note = (
            f"{usable} usable images found where the complete {description.name} has {description.distributed_images}"
            f": figures measured on this datalist are not comparable with those published on {description.name}"
        )
        logger.warning("%s: %s (a partial or extended download?)", description.name, completeness_note)
    # Split with the unusable cases, then leave them out: each other case keeps its set (the official one, CHASE_DB1's
    # first 20, the seeded draw), as it will once the bad files are mended.
    parts, provenance = split_cases(description, cases, split, seed, test_fraction, val_fraction, patient_pattern)
    note = None
    if annotator != "first":
        located = [case for case in cases if case.problem is None]
        lacking = [case.case_id for case in located if "second" not in case.annotations]
        if len(lacking) == len(located):
            raise DatasetError(f"{description.name}: no image under {src} has a second annotation")
        if lacking:
            note = (
                f"{len(lacking)} of {len(located)} images have no second annotation (e.g. {lacking[0]}) and use the "
                "first annotator; their entries record annotator 'first'"
            )
            logger.warning("%s: %s", description.name, note)
    # The masks are written into a folder of their own, renamed to the derived folder only once the datalist is
    # complete: a refused run leaves the earlier datalist's masks as they were, and a finished one moves them aside
    # with it, unchanged.
    created = [folder for folder in (output.parent, *output.parent.parents) if not folder.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{derived.name}.", dir=output.parent))
    try:
        preparer = _CasePreparer(description, annotator, derived, staging)
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            try:
                prepared = {split_name: list(pool.map(preparer, parts[split_name])) for split_name in SPLITS}
            except BaseException:
                # Report an unexpected failure now rather than after decoding the rest of the dataset.
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        entries = {name: [item for item in items if isinstance(item, dict)] for name, items in prepared.items()}
        left_out = sorted(
            ((name, item) for name, items in prepared.items() for item in items if isinstance(item, _LeftOut)),
            key=lambda pair: _natural_key(pair[1].case.case_id),
        )
        if not any(entries.values()):
            raise DatasetError(
                f"{description.name}: none of the {len(cases)} images under {src} can be used: "
                f"{_reasons([item for _, item in left_out])}"
            )
        for required_split in ("training", "test"):
            if not entries[required_split]:
                raise DatasetError(
                    f"{description.name}: no image of the {required_split} set ({provenance['split_summary']}) can be "
                    f"used: {_reasons([item for name, item in left_out if name == required_split])}"
                )
        if left_out:
            per_split = Counter(name for name, _ in left_out)
            counts = ", ".join(f"{per_split[name]} {name}" for name in SPLITS if per_split[name])
            listing = "".join(f"\n  {item.case.case_id}: {item.reason}" for _, item in left_out)
            logger.warning(
                "%s: %d of %d images cannot be used and were left out of the datalist (%s); the split (%s) keeps the "
                "other images in their sets:%s",
                description.name, len(left_out), len(cases), counts, provenance["split_summary"], listing,
            )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # innermost first: a refused run leaves no empty output folder behind
            if not any(folder.iterdir()):
                folder.rmdir()
        raise
    datalist: dict[str, object] = {
        "dataset": description.name,
        "task": description.task,
        "structures": list(description.structures),
        "annotator": annotator,
        "annotator_note": note,
        "completeness_note": completeness_note,
        "left_out": [
            {"case": item.case.case_id, "image": str(item.case.image), "split": name, "reason": item.reason}
            for name, item in left_out
        ],
        **provenance,
        "source": str(_absolute(src)),
        **{_COUNT_KEYS[split_name]: len(entries[split_name]) for split_name in SPLITS},
        **entries,
    }
    if _same_as_earlier(output, datalist, derived, staging):
        shutil.rmtree(staging)
        logger.info("%s: the same datalist and derived masks as the one already there, which stays as it was", output)
        return datalist
    _keep_earlier_datalist(output, derived)
    if derived.exists():  # masks of no datalist (a refused run's, before masks were staged): kept aside as well
        move_aside([derived], output.parent / EARLIER_DATALISTS)
    if any(staging.iterdir()):
        staging.rename(derived)
    else:
        staging.rmdir()
    write_json_atomic(output, datalist)
    return datalist


def _read_datalist(path: Path) -> dict[str, object]:
    """Load a datalist written by :func:`prepare_dataset` or :func:`pool_datalists`, checking its keys."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"datalist {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"cannot read datalist {path}: {error}") from None
    if not isinstance(content, dict) or content.get("task") not in TASK_STRUCTURES:
        raise DatasetError(f"{path} is not a prepared datalist: no 'task' key (vessels or disc_cup)")
    sources = content.get("sources", [content])  # a pool names its datasets in its sources
    named = isinstance(sources, list) and all(isinstance(source, dict) for source in sources)
    named = named and all(isinstance(source.get("dataset"), str) for source in sources)
    if not named:
        raise DatasetError(f"{path} is not a prepared datalist: no 'dataset' name (nor the 'sources' of a pool)")
    for split_name in SPLITS:
        entries = content.get(split_name)
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "dataset" in e for e in entries):
            raise DatasetError(f"{path}: '{split_name}' must be a list of entries that each name their 'dataset'")
    return content


def pool_datalists(paths: Sequence[str | os.PathLike], output: str | os.PathLike) -> dict[str, object]:
    """Pool prepared datalists of one task into one for cross-dataset training; entries keep their ``dataset``.

    Args:
        paths: datalists written by :func:`prepare_dataset` (or earlier pools).
        output: the pooled datalist JSON file to write; one already there is moved to ``earlier_datalists/<time>/``
            beside it first, with a warning, unless it is the same pool.

    Returns:
        the pooled datalist: ``dataset`` ``"pooled"``, ``datasets`` (names), ``task``, ``structures``, ``sources``
        (each input's provenance and path), the counts and the three lists.

    Raises:
        DatasetError: when an input is unreadable, tasks differ, or a dataset appears in two inputs.
    """
    inputs = [(_absolute(path), _read_datalist(Path(path).expanduser())) for path in paths]
    tasks = {content["task"] for _, content in inputs}
    if len(tasks) > 1:
        listing = ", ".join(f"{path} ({content['task']})" for path, content in inputs)
        raise DatasetError(f"cannot pool datalists of different tasks: {listing}")
    sources: list[dict[str, object]] = []
    for path, content in inputs:
        if "sources" in content:
            sources.extend(content["sources"])
        else:
            provenance = {key: value for key, value in content.items() if key not in SPLITS}
            for count_key in _COUNT_KEYS.values():
                provenance.pop(count_key, None)
            sources.append({**provenance, "datalist": str(path)})
    names = [str(source["dataset"]) for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DatasetError(f"dataset {', '.join(repeated)} appears in more than one of the pooled datalists")
    (task,) = tasks
    pooled: dict[str, object] = {
        "dataset": "pooled",
        "datasets": names,
        "task": task,
        "structures": list(TASK_STRUCTURES[task]),
        "sources": sources,
    }
    lists = {split_name: [entry for _, content in inputs for entry in content[split_name]] for split_name in SPLITS}
    pooled.update({_COUNT_KEYS[split_name]: len(lists[split_name]) for split_name in SPLITS})
    pooled.update(lists)
    if _same_as_earlier(_absolute(output), pooled):
        logger.info("%s: the same pool as the one already there, which stays as it was", output)
        return pooled
    _keep_earlier_datalist(_absolute(output))
    write_json_atomic(output, pooled)
    return pooled


def _seed_option(text: str) -> int:
    """``--seed``'s value, refused by argparse (naming the option, exit status 2) where :func:`_seed_problem` says."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(_seed_problem(text)) from None
    problem = _seed_problem(seed)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return seed


def _parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.prepare",
        description="Write a MONAI datalist (training/validation/test) for a fundus dataset as distributed, "
        "or pool several datalists.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help=f"one of {', '.join(DATASETS)}, or folder (images/, masks/, optional fov/)")
    source.add_argument("--pool", nargs="+", type=path_argument, metavar="DATALIST", help="datalists to pool (same task)")
    parser.add_argument("--src", type=path_argument, help="folder the dataset was unpacked into")
    parser.add_argument("--output", type=path_argument, required=True, help="datalist JSON to write")
    parser.add_argument("--annotator", default="first", help="first (default, the reference), second, or union")
    parser.add_argument(
        "--split", default="auto", help="auto (default: official/conventional where the dataset has one, else seeded), "
        "official, or seeded",
    )
    parser.add_argument(
        "--seed", type=_seed_option, default=0, help="seed of the random splits, a non-negative integer (default 0)"
    )
    parser.add_argument("--test-fraction", type=float, help="test fraction of a seeded split (default: 0.27 or 0.25)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation fraction of the training pool")
    parser.add_argument(
        "--patient-pattern",
        metavar="REGEX",
        help="regular expression matching a whole image name (its case id) whose group 'patient' names the person, "
        "e.g. '(?P<patient>P\\d+)_(OD|OS)': seeded draws keep each person's images in one set (default: the "
        "dataset's own, for CHASE_DB1 and PAPILA; otherwise each image is its own person)",
    )
    parser.add_argument("--task", help="folder datasets only: vessels (default) or disc_cup")
    parser.add_argument("--name", help="folder datasets only: the dataset name to record (default folder)")
    return parser


@command_line
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; errors are printed as one line, without a traceback.

    Args:
        argv: arguments (None: ``sys.argv[1:]``).

    Returns:
        the exit status: 0 on success, 1 on a data or argument error.
    """
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if arguments.pool:
        datalist = pool_datalists(arguments.pool, arguments.output)
    else:
        if arguments.src is None:
            raise DatasetError("--src is required with --dataset")
        datalist = prepare_dataset(
            arguments.dataset,
            arguments.src,
            arguments.output,
            annotator=arguments.annotator,
            split=arguments.split,
            seed=arguments.seed,
            test_fraction=arguments.test_fraction,
            val_fraction=arguments.val_fraction,
            task=arguments.task,
            folder_name=arguments.name,
            patient_pattern=arguments.patient_pattern,
        )
    people = datalist.get("patients")
    print(
        f"wrote {arguments.output}: {datalist['dataset']} ({datalist['task']}), {datalist['numTraining']} training, "
        f"{datalist['numValidation']} validation, {datalist['numTest']} test images"
        + (f" of {people['training']}, {people['validation']} and {people['test']} people" if people else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Declarative descriptions of the public fundus segmentation datasets, in the layout each is distributed in.

One :class:`DatasetDescription` per dataset says where its files are (path templates relative to the dataset folder),
which annotators it has, how its official split is defined and how its annotations are decoded into binary masks.
:mod:`tools.prepare` is the one generic loader that turns any description plus a folder into a MONAI datalist;
adding a dataset means adding a description here, not a loader.

Path templates are ``str.format`` strings filled with the named groups of the description's ``case_pattern``.
They are matched case-insensitively, may name a gzipped file without its ``.gz``, and a template ending in ``.*``
matches any image suffix of :data:`scripts.fundus_io.SUPPORTED_SUFFIXES`. A tuple of templates lists alternatives,
the first that exists wins.

Decoders take the annotation files of one annotator for one image, plus the image's ``(height, width)``, and return
one bool mask per structure of the task (vessels; or optic disc then cup).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from skimage.draw import polygon as fill_polygon

from scripts.errors import FundusError
from scripts.fundus_io import SUPPORTED_SUFFIXES, label_foreground, mask_levels_problem, read_mask
from scripts.measurements import STRUCTURE_NAMES

__all__ = [
    "ANNOTATORS",
    "DATASETS",
    "TASK_STRUCTURES",
    "AnnotationDecoder",
    "DatasetDescription",
    "DatasetError",
    "OfficialSplit",
    "Template",
    "binarise",
    "decode_binary_masks",
    "decode_contour_files",
    "decode_labelme_json",
    "decode_origa_mat",
    "decode_refuge_mask",
    "decode_soft_maps",
    "folder_description",
    "get_description",
    "is_labelme_annotation",
    "labelme_image_path",
    "read_annotations_once",
    "read_binary_mask",
]

logger = logging.getLogger(__name__)

Template = str | tuple[str, ...]
"""A path template relative to the dataset folder, or a tuple of alternative templates (first existing wins)."""

AnnotationDecoder = Callable[[Sequence[Path], tuple[int, int]], list[np.ndarray]]
"""``decoder(annotation_files, (height, width)) -> [bool mask per structure]``."""

TASK_STRUCTURES: dict[str, tuple[str, ...]] = {"vessels": ("vessels",), "disc_cup": ("disc", "cup")}
"""Label channels of each task, in datalist order."""

ANNOTATORS = ("first", "second", "union")
"""Annotator choices: the first (reference) annotator, the second one, or the pixelwise union of both."""

# labelme shape labels, compared lower-case and stripped, are the bundle's names of the structures.
_DISC_LABELS = STRUCTURE_NAMES["disc"]
_CUP_LABELS = STRUCTURE_NAMES["cup"]


class DatasetError(FundusError, ValueError):
    """A dataset folder, file or annotation does not match what its description expects."""


@dataclass(frozen=True)
class OfficialSplit:
    """How a dataset's official (or conventional) split is defined.

    Either ``group`` names a group of the case pattern whose value (compared lower-case) is mapped by ``parts`` to
    ``training``, ``validation`` or ``test``; or ``first_training`` puts the first N cases, in natural order of their
    ids, into training and the rest into test.

    Args:
        summary: one line describing the split, recorded in logs.
        group: case-pattern group naming the distributed part (e.g. ``training``/``test`` folders).
        parts: lower-case group value to split name.
        first_training: number of leading cases that form the training pool.
    """

    summary: str
    group: str | None = None
    parts: Mapping[str, str] = field(default_factory=dict)
    first_training: int | None = None


@dataclass(frozen=True)
class DatasetDescription:
    """Where one dataset's files are and how to read its annotations.

    Args:
        name: dataset name as used on the command line and in the datalist.
        task: ``vessels`` or ``disc_cup`` (see :data:`TASK_STRUCTURES`).
        layout: the expected distributed layout in words, shown when a folder does not match.
        case_pattern: regular expression matched case-insensitively against every file's path relative to the
            dataset folder (``/``-separated, a trailing ``.gz`` removed); each match is one case. The folder may be
            nested deeper inside ``--src`` (e.g. an archive unpacked with its top folder): templates are resolved
            relative to the folder where the pattern matched.
        annotations: annotator (``first``, ``second``) to the templates of its annotation files; one file per
            structure when ``decoder`` is None, otherwise whatever ``decoder`` takes.
        image: template of the image; None when the matched file is the image itself.
        image_hint: reads an annotation file (the matched file) and returns the image path it names, relative to
            the annotation's folder, tried before ``image``.
        decoder: turns annotation files into masks; None when they are binary mask files (referenced as they are
            where their background is 0, see :func:`read_binary_mask`).
        partial_annotators: annotators that only some cases have (e.g. DRIVE's second annotator, test set only).
        fov: template of the field-of-view mask; None when the dataset has none (it is estimated from the image).
        fov_required: whether a missing FOV file is an error (False: estimated from the image instead).
        official_split: the official or conventional split, if the dataset has one.
        test_fraction: test fraction of the seeded split (SAM2LoRA: 0.27 for CHASE_DB1 and HRF, 0.25 otherwise).
        case_id: template of the case id, unique within the dataset; names derived files.
        patient_pattern: regular expression matched (whole, case-insensitively) against the case id whose group
            ``patient`` names the person photographed, where the dataset's names say it (both eyes of one person);
            seeded draws then keep each person's images in one set. None: every image is its own person.
        is_case: tells whether a file the case pattern matched is one of the dataset's cases (a labelme annotation,
            not another JSON file of the download); None: every matched file is.
        distributed_images: how many cases the complete distribution holds, where its publication fixes it;
            another count found means a partial (or extended) download, on which published figures were not
            measured. None: not checked.
        reports_unused_files: whether files in the layout's folders that no case uses are named in a warning: a
            user's own folder holds no file by chance (a subfolder, a ``.webp`` image, a misnamed mask), whereas a
            distribution's extra files (STARE's unannotated images, a readme) are expected.
    """

    name: str
    task: str
    layout: str
    case_pattern: str
    annotations: Mapping[str, tuple[Template, ...]]
    image: Template | None = None
    image_hint: Callable[[Path], str | None] | None = None
    decoder: AnnotationDecoder | None = None
    partial_annotators: frozenset[str] = frozenset()
    fov: Template | None = None
    fov_required: bool = True
    official_split: OfficialSplit | None = None
    test_fraction: float = 0.25
    case_id: str = "{stem}"
    patient_pattern: str | None = None
    is_case: Callable[[Path], bool] | None = None
    distributed_images: int | None = None
    reports_unused_files: bool = False

    @property
    def structures(self) -> tuple[str, ...]:
        """Names of the label channels, in datalist order."""
        return TASK_STRUCTURES[self.task]


def _check_shape(mask: np.ndarray, shape: tuple[int, int], path: Path) -> None:
    """Raise when a decoded mask's size differs from its image's."""
    if mask.shape[:2] != tuple(shape):
        raise DatasetError(
            f"mask {path} is {mask.shape[1]}x{mask.shape[0]} pixels but its image is {shape[1]}x{shape[0]}"
        )


def binarise(values: np.ndarray) -> np.ndarray:
    """Split a two-level mask at the middle between its lowest and highest value.

    Distributed masks do not all keep background at 0: DRIVE's 2nd_manual GIFs use 3 and 253, others 0 and 1 or
    0 and 255. A mask with a single level is read as the bundle reads masks (:func:`label_foreground`): full for 1
    and from 128 on, empty otherwise.

    Args:
        values: ``(H, W)`` uint8 raw mask values.

    Returns:
        bool mask, True on the structure.
    """
    low, high = int(values.min()), int(values.max())
    if low == high:
        return label_foreground(values)
    return values > (low + high) / 2


def read_binary_mask(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """Read a binary mask file and check its size.

    Args:
        path: mask file.
        shape: ``(height, width)`` of its image.

    Returns:
        the bool mask, and whether the file can be listed as it is: 0 = background and > 0 = structure, as the
        datalist promises, and read as this mask by the bundle's own reader (which takes 1-127 for background
        in a mask that also holds values above 127).

    Raises:
        DatasetError: when the mask's size differs from the image's, or its values cannot be read as a mask
            (:func:`scripts.fundus_io.mask_levels_problem`: a 0/1 mask saved as JPEG), as the bundle's reader refuses
            it.
        FundusImageError: when the file cannot be read.
    """
    values = read_mask(path)
    _check_shape(values, shape, path)
    problem = mask_levels_problem(values)
    if problem:
        raise DatasetError(f"mask {path} {problem}")
    mask = binarise(values)
    return mask, bool(np.array_equal(mask, values > 0) and np.array_equal(mask, label_foreground(values)))


def decode_binary_masks(files: Sequence[Path], shape: tuple[int, int]) -> list[np.ndarray]:
    """Read one binary mask file per structure (see :func:`binarise` for the foreground level).

    Args:
        files: one mask file per structure.
        shape: ``(height, width)`` of the image.

    Returns:
        one bool ``(H, W)`` mask per file.
    """
    return [read_binary_mask(path, shape)[0] for path in files]


def decode_soft_maps(files: Sequence[Path], shape: tuple[int, int]) -> list[np.ndarray]:
    """Threshold soft maps (DRISHTI-GS: the fraction of experts marking a pixel) above half their maximum.

    Where some pixel was marked by every expert (255 in DRISHTI-GS's 8-bit maps), this keeps the pixels at least half
    of the experts marked (two of four, 128, included); a map whose peak is lower (no pixel marked by all) is read
    relative to that peak, so that a map saved with another gray scale reads alike.

    Args:
        files: one soft map per structure.
        shape: ``(height, width)`` of the image.

    Returns:
        one bool ``(H, W)`` mask per file; empty where a map is all zero.
    """
    masks = []
    for path in files:
        soft = read_mask(path)
        _check_shape(soft, shape, path)
        peak = int(soft.max())
        masks.append(soft > 0.5 * peak if peak > 0 else np.zeros(shape, dtype=bool))
    return masks


def decode_refuge_mask(files: Sequence[Path], shape: tuple[int, int]) -> list[np.ndarray]:
    """Decode a REFUGE mask, 0 = cup, 128 = rim, 255 = background, into disc (cup or rim) and cup.

    Each pixel is assigned to the nearest of the three values, so that masks that were resampled or saved lossy
    still decode. A mask in another encoding (inverted, or 0/1/2 levels) would decode as a disc over most of the
    picture, where REFUGE's discs cover a few percent: it is refused.

    Args:
        files: the single REFUGE mask file.
        shape: ``(height, width)`` of the image.

    Returns:
        ``[disc, cup]`` bool masks.

    Raises:
        DatasetError: the mask is not the image's size, or its disc would cover half the picture or more.
    """
    (path,) = files
    values = read_mask(path)
    _check_shape(values, shape, path)
    disc = values < 192
    if disc.mean() >= 0.5:
        levels = ", ".join(str(level) for level in np.unique(values)[:5])
        raise DatasetError(
            f"mask {path} would make a disc of {disc.mean():.0%} of the picture (levels {levels}...): REFUGE's masks "
            "are 255 background, 128 disc rim, 0 cup; re-encoded masks (inverted, 0/1/2) cannot be read as REFUGE's"
        )
    return [disc, values < 64]


def decode_origa_mat(files: Sequence[Path], shape: tuple[int, int]) -> list[np.ndarray]:
    """Decode an ORIGA ``.mat`` annotation: variable ``mask`` with 0 background, 1 rim, 2 cup.

    ORIGA's masks can be wider or taller than their image (padded); they are cropped centred to the image.

    Args:
        files: the single ``.mat`` file.
        shape: ``(height, width)`` of the image.

    Returns:
        ``[disc, cup]`` bool masks (disc = rim or cup).

    Raises:
        DatasetError: when the file cannot be read, has no 2D ``mask`` variable or is smaller than the image.
    """
    (path,) = files
    try:
        content = scipy.io.loadmat(str(path))
    except (OSError, ValueError, TypeError, NotImplementedError) as error:
        raise DatasetError(f"cannot read ORIGA annotation {path}: {error}") from None
    mask = content.get("mask")
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise DatasetError(f"ORIGA annotation {path} has no 2D variable 'mask' (variables: {sorted(content)})")
    height, width = shape
    if mask.shape[0] < height or mask.shape[1] < width:
        raise DatasetError(
            f"ORIGA annotation {path} is {mask.shape[1]}x{mask.shape[0]} pixels, "
            f"smaller than its image {width}x{height}"
        )
    top = (mask.shape[0] - height) // 2
    left = (mask.shape[1] - width) // 2
    mask = mask[top : top + height, left : left + width]
    return [mask >= 1, mask == 2]


def _rasterise(points: np.ndarray, shape: tuple[int, int], source: Path) -> np.ndarray:
    """Fill a polygon given as ``(N, 2)`` x, y points into a bool mask of ``shape``.

    Raises:
        DatasetError: when there are fewer than 3 points, or a coordinate is not finite (NaN or infinite, which
            both JSON and text files can hold: the polygon would fill nothing, silently).
    """
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
        raise DatasetError(f"{source}: a polygon needs at least 3 (x, y) points, got an array of shape {points.shape}")
    if not np.isfinite(points).all():
        bad = points[~np.isfinite(points).all(axis=1)][0]
        raise DatasetError(
            f"{source}: a polygon has a point that is not finite (NaN or infinite): ({bad[0]:g}, {bad[1]:g})"
        )
    mask = np.zeros(shape, dtype=bool)
    rows, cols = fill_polygon(points[:, 1], points[:, 0], shape=shape)
    mask[rows, cols] = True
    return mask


def decode_contour_files(files: Sequence[Path], shape: tuple[int, int]) -> list[np.ndarray]:
    """Rasterise contour text files (PAPILA: one ``x y`` point per line), one file per structure.

    Args:
        files: one contour file per structure (disc, cup).
        shape: ``(height, width)`` of the image.

    Returns:
        one filled bool mask per file.

    Raises:
        DatasetError: when a file is not a list of at least three x y points.
    """
    masks = []
    for path in files:
        try:
            points = np.loadtxt(path, dtype=np.float64, ndmin=2)
        except (OSError, ValueError) as error:
            raise DatasetError(f"cannot read contour {path}: expected one 'x y' point per line ({error})") from None
        masks.append(_rasterise(points, shape, path))
    return masks


# The keys of a labelme file that are read: labelme may also embed the whole image (imageData, base64), which a
# parsed file kept for a whole preparation must not hold on to.
_LABELME_KEYS = ("shapes", "imagePath", "imageHeight", "imageWidth")

# The labelme files parsed in the preparation under way (see read_annotations_once), by path: the parsed keys, None
# for JSON that is not labelme, or the error reading it raised. None outside a preparation.
_parsed_labelme: dict[Path, dict | DatasetError | None] | None = None


@contextmanager
def read_annotations_once() -> Iterator[None]:
    """Within this context (or a function it decorates), each labelme annotation is read and parsed once.

    Finding a G1020 or GRAPE case reads its JSON file to tell a labelme annotation from another JSON file and to
    find the image it names, then decoding reads it for its shapes: the first of these parses the file and the others
    reuse what it found, until the outermost context ends (so that a later preparation reads changed files afresh).
    The annotations of the other datasets are read by their decoder alone, once.

    Returns:
        the context, reentrant: an inner one shares the outer one's parsed files.
    """
    global _parsed_labelme
    if _parsed_labelme is not None:
        yield
        return
    _parsed_labelme = {}
    try:
        yield
    finally:
        _parsed_labelme = None


def _parse_labelme(path: Path) -> dict | None:
    """Read and parse a JSON file: its labelme keys (:data:`_LABELME_KEYS`), or None if it is not labelme.

    Raises:
        DatasetError: when the file cannot be read or is not JSON (truncated), naming it.
    """
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"cannot read labelme annotation {path}: {error}") from None
    if not isinstance(content, dict) or not isinstance(content.get("shapes"), list):
        return None
    return {key: content[key] for key in _LABELME_KEYS if key in content}


def _read_labelme(path: Path) -> dict | None:
    """:func:`_parse_labelme`, reusing the file's first parse within :func:`read_annotations_once`."""
    parsed = _parsed_labelme
    if parsed is None:
        return _parse_labelme(path)
    if path not in parsed:
        try:
            parsed[path] = _parse_labelme(path)
        except DatasetError as error:
            parsed[path] = error
    found = parsed[path]
    if isinstance(found, DatasetError):
        # A fresh exception each time: raising the stored one again would pile up its tracebacks.
        raise DatasetError(*found.args)
    return found


def _load_labelme(path: Path) -> dict:
    """Load a labelme annotation, checking it is an object with a ``shapes`` list."""
    content = _read_labelme(path)
    if content is None:
        raise DatasetError(f"{path} is not a labelme annotation: expected a JSON object with a 'shapes' list")
    return content


def is_labelme_annotation(path: Path) -> bool:
    """Whether a JSON file is a labelme annotation, or may be one.

    Args:
        path: JSON file.

    Returns:
        False for well-formed JSON that is not an object with a ``shapes`` list (a download's metadata file);
        True otherwise, unreadable or truncated files included, so that decoding them says what is wrong.
    """
    try:
        return _read_labelme(path) is not None
    except DatasetError:
        return True


def labelme_image_path(path: Path) -> str | None:
    """The image a labelme annotation names in ``imagePath``, relative to the annotation's folder.

    Args:
        path: labelme JSON file.

    Returns:
        the ``imagePath`` with ``/`` separators (Windows paths are common in labelme files), or None if absent.
    """
    image_path = _load_labelme(path).get("imagePath")
    return image_path.replace("\\", "/") if isinstance(image_path, str) and image_path else None


_EXCERPT_LENGTH = 60
"""How much of a malformed JSON value an error quotes: enough to recognise it, not a whole embedded list."""


def _excerpt(value: object) -> str:
    """A JSON value as the file writes it, cut to :data:`_EXCERPT_LENGTH` characters."""
    text = json.dumps(value)
    return text if len(text) <= _EXCERPT_LENGTH else text[: _EXCERPT_LENGTH - 3] + "..."


def _labelme_points(item: Mapping[str, object], label: str, path: Path) -> np.ndarray:
    """The ``(N, 2)`` x, y points of a labelme shape, checked to be a list of ``[x, y]`` pairs of numbers.

    Checked here, naming the shape, because numpy would otherwise fail on a ragged list with an error that names
    neither the file nor the shape, and read ``"12"`` as a number. Too few points and non-finite ones are
    :func:`_rasterise`'s to refuse, for every polygon source alike.

    Raises:
        DatasetError: when ``points`` is missing, not a list, or holds something other than a pair of numbers.
    """
    if "points" not in item:
        raise DatasetError(f"{path}: shape {label!r} has no 'points'")
    points = item["points"]
    if not isinstance(points, list):
        raise DatasetError(
            f"{path}: the 'points' of shape {label!r} are {_excerpt(points)}, not a list of [x, y] pairs"
        )
    for point in points:
        pair = isinstance(point, list) and len(point) == 2
        # bool is an int to Python, but true/false is no coordinate.
        if not pair or not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in point):
            raise DatasetError(
                f"{path}: shape {label!r} has a point {_excerpt(point)} that is not an [x, y] pair of numbers"
            )
    return np.array(points, dtype=np.float64).reshape(-1, 2)


def decode_labelme_json(files: Sequence[Path], shape: tuple[int, int]) -> list[np.ndarray]:
    """Rasterise the disc and cup polygons of a labelme annotation (G1020, GRAPE).

    Shapes labelled ``disc``/``od`` or ``cup``/``oc`` (any case) are filled and OR-ed per structure; other labels
    are ignored. A structure without a shape stays empty (G1020 leaves the cup out where it is not visible); a file
    without a disc is warned about, naming the labels it has (``optic_disc`` is not one of the disc's names).

    Args:
        files: the single labelme JSON file.
        shape: ``(height, width)`` of the image.

    Returns:
        ``[disc, cup]`` bool masks.

    Raises:
        DatasetError: when the file is not labelme JSON, a shape is not a JSON object, its recorded image size
            differs from the image, or a disc or cup shape is not a polygon of at least 3 [x, y] pairs of finite
            numbers (shapes of other labels are not read).
    """
    (path,) = files
    content = _load_labelme(path)
    recorded = (content.get("imageHeight"), content.get("imageWidth"))
    if all(isinstance(size, int) for size in recorded) and recorded != tuple(shape):
        raise DatasetError(
            f"labelme annotation {path} is for a {recorded[1]}x{recorded[0]} image but its image is "
            f"{shape[1]}x{shape[0]}"
        )
    disc = np.zeros(shape, dtype=bool)
    cup = np.zeros(shape, dtype=bool)
    for number, item in enumerate(content["shapes"], 1):
        if not isinstance(item, dict):
            raise DatasetError(
                f"{path}: shape {number} is {_excerpt(item)}, not an object with a 'label' and 'points'"
            )
        label = str(item.get("label", "")).strip().lower()
        target = disc if label in _DISC_LABELS else cup if label in _CUP_LABELS else None
        if target is None:
            continue
        shape_type = item.get("shape_type") or "polygon"
        if shape_type != "polygon":
            raise DatasetError(f"{path}: shape {label!r} is a {shape_type!r}; only polygons are supported")
        target |= _rasterise(_labelme_points(item, label, path), shape, path)
    if not disc.any():
        labels = sorted({str(item.get("label", "")) for item in content["shapes"]})
        logger.warning(
            "%s has no disc: its entry's disc mask is empty. Labels found: %s (the disc's: %s).",
            path, ", ".join(repr(label) for label in labels) or "none", ", ".join(sorted(_DISC_LABELS)),
        )
    return [disc, cup]


def _split_by_folder(summary: str, **parts: str) -> OfficialSplit:
    """An official split given by the distributed folder, captured as case-pattern group ``part``."""
    return OfficialSplit(summary=summary, group="part", parts=parts)


_DRIVE = DatasetDescription(
    name="DRIVE",
    task="vessels",
    layout="training|test/images/NN_training.tif|NN_test.tif with 1st_manual/NN_manual1.gif and mask/NN_*_mask.gif",
    case_pattern=r"(?P<part>training|test)/images/(?P<stem>\d+)_(?:training|test)\.tif",
    annotations={
        "first": ("{part}/1st_manual/{stem}_manual1.gif",),
        "second": ("{part}/2nd_manual/{stem}_manual2.gif",),
    },
    partial_annotators=frozenset({"second"}),
    fov="{part}/mask/{stem}_{part}_mask.gif",
    official_split=_split_by_folder(
        "training/ (20) is the training pool, test/ (20) the test set", training="training", test="test"
    ),
    distributed_images=40,
)

_CHASE_DB1 = DatasetDescription(
    name="CHASE_DB1",
    task="vessels",
    layout="Image_NNL.jpg / Image_NNR.jpg with Image_NNX_1stHO.png and Image_NNX_2ndHO.png in one folder",
    case_pattern=r"Image_(?P<stem>\d+[LR])\.jpg",
    annotations={"first": ("Image_{stem}_1stHO.png",), "second": ("Image_{stem}_2ndHO.png",)},
    official_split=OfficialSplit(
        summary="first 20 images training, last 8 test (the field's convention)", first_training=20
    ),
    test_fraction=0.27,
    case_id="Image_{stem}",
    # Images NNL and NNR are the left and right eye of child NN.
    patient_pattern=r"Image_(?P<patient>\d+)[LR]",
    distributed_images=28,
)

# Cases are anchored on the first annotator's labels: STARE's full image archive (all-images) holds about 400
# photographs, of which the 20 of stare-images are annotated.
_STARE = DatasetDescription(
    name="STARE",
    task="vessels",
    layout="labels-ah/imNNNN.ah.ppm[.gz] with stare-images/imNNNN.ppm[.gz] and labels-vk/imNNNN.vk.ppm[.gz]",
    case_pattern=r"labels-ah/(?P<stem>im\d+)\.ah\.ppm",
    image="stare-images/{stem}.ppm",
    annotations={"first": ("labels-ah/{stem}.ah.ppm",), "second": ("labels-vk/{stem}.vk.ppm",)},
    distributed_images=20,
)

_HRF = DatasetDescription(
    name="HRF",
    task="vessels",
    layout="images/NN_h|g|dr.jpg with manual1/NN_x.tif and mask/NN_x_mask.tif",
    case_pattern=r"images/(?P<stem>\d+_(?:h|g|dr))\.jpe?g",
    annotations={"first": ("manual1/{stem}.tif",)},
    fov="mask/{stem}_mask.tif",
    test_fraction=0.27,
    distributed_images=45,
)

_FIVES = DatasetDescription(
    name="FIVES",
    task="vessels",
    layout="train|test/Original/*.png with train|test/Ground truth/*.png",
    case_pattern=r"(?P<part>train|test)/Original/(?P<stem>[^/]+)\.png",
    annotations={"first": ("{part}/Ground truth/{stem}.png",)},
    official_split=_split_by_folder("train/ is the training pool, test/ the test set", train="training", test="test"),
    # FIVES numbers train/ and test/ images independently, so stems repeat across the two.
    case_id="{part}_{stem}",
    distributed_images=800,
)


def _drishti_soft_map(kind: str) -> tuple[str, ...]:
    """Templates of a DRISHTI-GS soft map: the test set's ground truth is distributed in Test_GT/, not GT/."""
    return tuple(f"{{part}}/{folder}/{{stem}}/SoftMap/{{stem}}_{kind}Softmap.png" for folder in ("GT", "Test_GT"))


_DRISHTI_GS = DatasetDescription(
    name="DRISHTI-GS",
    task="disc_cup",
    layout=(
        "Training|Test/Images/NAME.png with Training|Test/GT/NAME/SoftMap/NAME_ODsegSoftmap.png "
        "and NAME_cupsegSoftmap.png"
    ),
    case_pattern=r"(?P<part>training|test)/Images/(?P<stem>[^/]+)\.png",
    annotations={"first": (_drishti_soft_map("ODseg"), _drishti_soft_map("cupseg"))},
    decoder=decode_soft_maps,
    official_split=_split_by_folder(
        "Training/ is the training pool, Test/ the test set", training="training", test="test"
    ),
    distributed_images=101,
)


def _labelme_description(name: str) -> DatasetDescription:
    """G1020 and GRAPE share a layout: one labelme JSON per image, the image next to it or named by imagePath."""
    return DatasetDescription(
        name=name,
        task="disc_cup",
        layout=(
            "labelme JSON files (shapes labelled disc/OD and cup/OC) next to their images or naming them in imagePath"
        ),
        case_pattern=r"(?P<stem>[^/]+)\.json",
        image="{stem}.*",
        image_hint=labelme_image_path,
        annotations={"first": ("{stem}.json",)},
        decoder=decode_labelme_json,
        is_case=is_labelme_annotation,
    )


_ORIGA = DatasetDescription(
    name="ORIGA",
    task="disc_cup",
    layout="Images/NAME.jpg with Semi-automatic-annotations/NAME.mat (variable 'mask': 0 background, 1 rim, 2 cup)",
    case_pattern=r"Images/(?P<stem>[^/]+)\.jpg",
    annotations={"first": ("Semi-automatic-annotations/{stem}.mat",)},
    decoder=decode_origa_mat,
    distributed_images=650,
)

_PAPILA = DatasetDescription(
    name="PAPILA",
    task="disc_cup",
    layout="FundusImages/NAME.jpg with ExpertsSegmentations/Contours/NAME_disc_exp1.txt, NAME_cup_exp1.txt (and exp2)",
    case_pattern=r"FundusImages/(?P<stem>[^/]+)\.jpg",
    annotations={
        annotator: tuple(
            f"ExpertsSegmentations/Contours/{{stem}}_{structure}_{expert}.txt" for structure in ("disc", "cup")
        )
        for annotator, expert in (("first", "exp1"), ("second", "exp2"))
    },
    decoder=decode_contour_files,
    # RETnnnOD and RETnnnOS are the right and left eye of patient nnn.
    patient_pattern=r"(?P<patient>RET\d+)O[DS]",
    distributed_images=488,
)

_REFUGE2 = DatasetDescription(
    name="REFUGE2",
    task="disc_cup",
    layout="train|val|test/images/NAME.jpg with train|val|test/mask/NAME.png|bmp (0 cup, 128 rim, 255 background)",
    case_pattern=r"(?P<part>train|val|test)/images/(?P<stem>[^/]+)\.jpg",
    annotations={"first": ("{part}/mask/{stem}.*",)},
    decoder=decode_refuge_mask,
    official_split=_split_by_folder(
        "train/ is training, val/ validation, test/ test", train="training", val="validation", test="test"
    ),
)

DATASETS: dict[str, DatasetDescription] = {
    description.name: description
    for description in (
        _DRIVE,
        _CHASE_DB1,
        _STARE,
        _HRF,
        _FIVES,
        _DRISHTI_GS,
        _labelme_description("G1020"),
        _labelme_description("GRAPE"),
        _ORIGA,
        _PAPILA,
        _REFUGE2,
    )
}
"""The public datasets by name."""


def folder_description(task: str = "vessels", name: str = "folder") -> DatasetDescription:
    """A generic dataset: ``images/NAME.*`` with ``masks/NAME.*`` (vessels) or ``masks/disc|cup/NAME.*``
    (disc_cup), binary masks, and optional ``fov/NAME.*``.

    Args:
        task: ``vessels`` or ``disc_cup``.
        name: dataset name recorded in the datalist.

    Returns:
        the description.
    """
    if task not in TASK_STRUCTURES:
        raise DatasetError(f"unknown task {task!r}: expected one of {', '.join(TASK_STRUCTURES)}")
    if task == "vessels":
        labels: tuple[Template, ...] = ("masks/{stem}.*",)
        layout = "images/NAME.<image suffix> with masks/NAME.<image suffix>, optional fov/NAME.<image suffix>"
    else:
        labels = ("masks/disc/{stem}.*", "masks/cup/{stem}.*")
        layout = "images/NAME.<image suffix> with masks/disc/NAME.* and masks/cup/NAME.*, optional fov/NAME.*"
    return DatasetDescription(
        name=name,
        task=task,
        layout=layout,
        case_pattern=r"images/(?P<stem>[^/]+)(?:" + "|".join(map(re.escape, SUPPORTED_SUFFIXES)) + ")",
        annotations={"first": labels},
        fov="fov/{stem}.*",
        fov_required=False,
        reports_unused_files=True,
    )


def get_description(name: str, task: str | None = None, folder_name: str = "folder") -> DatasetDescription:
    """Look up a dataset description by name (any letter case); ``folder`` builds the generic one.

    Args:
        name: one of :data:`DATASETS` or ``folder``.
        task: the task of a ``folder`` dataset (default ``vessels``); must be None or match for named datasets.
        folder_name: the name a ``folder`` dataset is recorded under (to pool several folders).

    Returns:
        the description.

    Raises:
        DatasetError: for an unknown name, or a task that contradicts the named dataset.
    """
    if name.lower() == "folder":
        return folder_description(task or "vessels", folder_name)
    by_lower = {known.lower(): description for known, description in DATASETS.items()}
    description = by_lower.get(name.lower())
    if description is None:
        raise DatasetError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)} or folder")
    if task is not None and task != description.task:
        raise DatasetError(f"dataset {description.name} is a {description.task} dataset, not {task}")
    return description

"""Reading and writing fundus photographs and their masks, and estimating a photo's field of view.

Public datasets ship fundus images as tif, gif, jpg, png, ppm (STARE gzips them) or bmp, in RGB, palette or
grayscale, 8 or 16 bit. This module turns all of them into one in-memory convention so that dataset preparers and
transforms never look at file formats again:

- images: ``(H, W, 3)`` float32 RGB in ``[0, 1]``;
- masks: ``(H, W)`` uint8 raw values, to be thresholded by the caller.

Every failure is reported as :class:`FundusImageError` naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError
from PIL.TiffImagePlugin import IMAGELENGTH, IMAGEWIDTH
from scipy import ndimage

from scripts.atomic import atomic_path
from scripts.errors import FundusError

__all__ = [
    "GRAYSCALE_MODES",
    "SUPPORTED_SUFFIXES",
    "UNREADABLE_KEY",
    "FundusImageError",
    "estimate_fov",
    "image_files",
    "image_size",
    "is_grayscale",
    "label_foreground",
    "mask_levels_problem",
    "read_image",
    "read_label_mask",
    "read_mask",
    "readable_image_size",
    "write_png",
]

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".tif", ".tiff", ".gif", ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pnm", ".bmp")
"""File suffixes (case-insensitive) that :func:`read_image` and :func:`read_mask` accept, each optionally + ``.gz``."""

UNREADABLE_KEY = "unreadable"
"""Item and metadata key of an inference photograph that could not be read at its turn, holding why (empty for one
that was read): it goes through the run as a gray stand-in (:class:`scripts.transforms.LoadFundusd`), so that the
others go on, and nothing is written for it."""

# PIL modes holding one 16-bit sample per pixel ("I" is how some Pillow versions open 16-bit grayscale PNGs); their
# true maximum is 65535 whatever values the file happens to use.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# A gray mask may be stored in colour with a faint tint (DRIVE's 2nd_manual GIFs: palette colours 4,2,4 and
# 252,254,252); a colour drawing (green vessels on black) differs between its channels by far more.
GRAY_TINT_TOLERANCE = 8


class FundusImageError(FundusError, ValueError):
    """An image or mask file is missing, unreadable, truncated, of an unsupported kind, or cannot be written."""


def _image_suffix(path: Path) -> str:
    """The lower-case image suffix of ``path``, looking through a trailing ``.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


_UNREADABLE = (OSError, EOFError, ValueError, SyntaxError, zlib.error, struct.error, Image.DecompressionBombError)
"""What a damaged, cut-short or forged file raises while it is opened or decoded: besides PIL's own (OSError,
UnidentifiedImageError among them) and gzip's, zlib's for a damaged ``.gz``, struct's for malformed EXIF, and PIL's
for a header claiming more pixels than it decodes."""

_ORIENTATION_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""The turn each EXIF orientation asks for, as ``ImageOps.exif_transpose`` applies it. Applied here to the pixels
alone: exif_transpose also rewrites the EXIF block, and fails on a malformed one that the pixels do not need."""

_TURNED: set[str] = set()
"""Pictures turned by their EXIF orientation that were named in the log already (once per file, not per epoch)."""


def _open_decoded(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` with PIL and decode every pixel now, so that truncated or corrupt files fail here.

    Args:
        path: image file, optionally gzip-compressed (``.gz``).

    Returns:
        the fully loaded PIL image, detached from the file, turned upright as its EXIF orientation says (what a
        viewer shows, and where a person clicks a prompt).

    Raises:
        FundusImageError: when the file is missing, of an unsupported suffix, or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FundusImageError(f"image file not found: {path}")
    suffix = _image_suffix(path)
    if suffix not in SUPPORTED_SUFFIXES:
        raise FundusImageError(
            f"unsupported image format {suffix or '(no suffix)'!r} for {path}; expected one of "
            f"{', '.join(SUPPORTED_SUFFIXES)} (optionally gzipped)"
        )
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix.lower() == ".gz" else path.read_bytes()
        with Image.open(io.BytesIO(raw)) as opened:
            # Asked before decoding: PIL's TIFF reader turns the picture itself as it decodes, and drops the tag.
            orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
            opened.load()
            if orientation in _ORIENTATION_TURNS and str(path) not in _TURNED:
                _TURNED.add(str(path))
                logger.warning(
                    "%s is turned upright as its EXIF orientation (%s) says, as a viewer shows it: its masks, prompts "
                    "and outputs are in that frame.",
                    path,
                    orientation,
                )
            # The turn still to make once decoded (none where the reader made it). A multi-frame file (animated gif,
            # tiff stack) is read as its first frame.
            turn = _ORIENTATION_TURNS.get(opened.getexif().get(ExifTags.Base.Orientation, 1))
            image = opened.transpose(turn) if turn is not None else opened.copy()
    except UnidentifiedImageError:
        if not raw:
            raise FundusImageError(f"cannot read image {path}: the file is empty (0 bytes)") from None
        raise FundusImageError(
            f"cannot read image {path}: not an image file PIL recognises (damaged, cut short, or another format)"
        ) from None
    except _UNREADABLE as error:
        reason = str(error) or type(error).__name__
        raise FundusImageError(f"cannot read image {path}: {reason}") from None
    if image.width == 0 or image.height == 0:
        raise FundusImageError(f"image {path} is empty ({image.width}x{image.height} pixels)")
    return image


def _sixteen_bit_to_float(image: Image.Image) -> np.ndarray:
    """A one-channel 16-bit PIL image as float32 scaled by 65535 into ``[0, 1]``."""
    return np.asarray(image, dtype=np.float32) / np.float32(65535.0)


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The pictures of a folder, sorted by name: its files whose names end in one of :data:`SUPPORTED_SUFFIXES`
    (any letter case, optionally ``.gz``), subfolders not searched.

    Listed with ``iterdir``, not ``glob(folder + "/*")``, which reads a folder named ``photos [2024]`` as a pattern.
    Hidden files are left out as a shell's ``*`` leaves them (macOS writes ``._eye.jpg`` beside ``eye.jpg`` on
    foreign disks), and so are files of other kinds (``Thumbs.db``).
    """
    return sorted(
        path
        for path in Path(folder).iterdir()
        if not path.name.startswith(".")
        and path.is_file()
        and path.name.lower().removesuffix(".gz").endswith(SUPPORTED_SUFFIXES)
    )


@contextlib.contextmanager
def _header(path: Path) -> Iterator[Image.Image]:
    """``path`` opened by PIL for its header: its pixels are not decoded, and a ``.gz`` is decompressed only as far
    as PIL reads (decompressing a whole photograph to read its size took as long as reading it).

    Raises:
        what :data:`_UNREADABLE` lists, where the file cannot be opened or is not a picture.
    """
    compressed = path.suffix.lower() == ".gz"
    with gzip.open(path, "rb") if compressed else open(path, "rb") as stream, Image.open(stream) as opened:
        yield opened


GRAYSCALE_MODES = ("1", "L", "LA", *_SIXTEEN_BIT_MODES)
"""PIL modes of a picture with one gray channel (a red-free fundus photograph), which :func:`read_image` copies into
all three channels."""


def is_grayscale(path: str | os.PathLike) -> bool:
    """Whether a picture's header says it has one gray channel (:data:`GRAYSCALE_MODES`), without decoding it;
    False where it cannot be opened (:func:`read_image` says why when it is read)."""
    try:
        with _header(Path(path)) as opened:
            return opened.mode in GRAYSCALE_MODES
    except _UNREADABLE:
        return False


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """The ``(width, height)`` a picture's header gives, without decoding its pixels; None where it cannot be opened
    (:func:`read_image` then says why, when the picture is read)."""
    try:
        with _header(Path(path)) as opened:
            width, height = opened.size
            # EXIF orientations 5 to 8 turn the picture a quarter: it is read upright (_open_decoded). PIL's TIFF
            # reader gives the turned size already (the size its tags store, swapped).
            turned = opened.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
            stored = getattr(opened, "tag_v2", {})
            if turned and (stored.get(IMAGEWIDTH), stored.get(IMAGELENGTH)) == (height, width):
                return width, height
            return (height, width) if turned else (width, height)
    except _UNREADABLE:
        return None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a fundus photograph as an RGB float array.

    Transparent pixels are laid over black, as the dark border around a fundus photograph's field of view (a
    photograph cut out with transparency often keeps white or any colour under it, which would otherwise read as
    retina), unless the alpha channel hides every pixel (then it is ignored as meaningless); palette images are
    expanded through their palette, grayscale is replicated to three channels, and 8- or 16-bit samples are scaled
    by the maximum of their bit depth (not by the image's own maximum, so that intensities stay comparable between
    images).

    Args:
        path: image file (tif, tiff, gif, jpg, jpeg, png, ppm, pgm, pnm, bmp; any letter case; optionally ``.gz``).

    Returns:
        ``(H, W, 3)`` float32 array in ``[0, 1]``.

    Raises:
        FundusImageError: when the file is missing, truncated, corrupt or of an unsupported kind.
    """
    image = _open_photograph(path)
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = _sixteen_bit_to_float(image)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    if _has_alpha(image):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / np.float32(255.0)
        if rgba[..., 3].any():  # an alpha channel that hides the whole picture says nothing: it is ignored
            return np.ascontiguousarray(rgba[..., :3] * rgba[..., 3:])
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(rgb)


def _has_alpha(image: Image.Image) -> bool:
    """Whether a PIL image holds transparency: an alpha channel, or a palette's transparent entry."""
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def readable_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """The ``(height, width)`` of a photograph :func:`read_image` can read, checked by decoding every pixel as it
    does, without its conversion to floats (three quarters of its time on a 3504 x 2336 JPEG).

    Args:
        path: image file, as for :func:`read_image`.

    Returns:
        ``(height, width)`` as read (turned upright as its EXIF orientation says).

    Raises:
        FundusImageError: whenever :func:`read_image` would raise it.
    """
    image = _open_photograph(path)
    return image.height, image.width


def _open_photograph(path: str | os.PathLike) -> Image.Image:
    """:func:`_open_decoded`, refusing pixel kinds a photograph cannot have."""
    image = _open_decoded(path)
    if image.mode == "F":
        raise FundusImageError(f"unsupported image {path}: floating-point samples (mode F) have no defined range")
    if image.mode == "I":  # 32-bit integers, as PIL opens 16-bit PNGs too: only 16-bit values have a defined range
        low, high = image.getextrema()
        if low < 0 or high > 65535:
            raise FundusImageError(
                f"unsupported image {path}: 32-bit integer samples from {low} to {high} have no defined range "
                "(a photograph has 8 or 16 bits per sample)"
            )
    return image


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a segmentation mask as raw 8-bit values.

    RGB(A) masks give their first channel, palette masks the gray level of their palette colours, 16-bit masks are
    rescaled to ``0..255`` (unless their values are all within ``0..255``, which are kept). No thresholding happens
    here: datasets disagree on their foreground values (255, 1, 128...), so callers decide.

    Args:
        path: mask file, in any format accepted by :func:`read_image`.

    Returns:
        ``(H, W)`` uint8 array.

    Raises:
        FundusImageError: when the file is missing, truncated, corrupt or of an unsupported kind.
    """
    return _mask_values(_open_decoded(path), path)


def _mask_values(image: Image.Image, path: str | os.PathLike) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        # A 16-bit file often holds 8-bit levels (0/1, 0/128/255): scaled by 255/65535 they would round to 0.
        if values.max(initial=0) <= 255:
            return np.clip(values, 0, 255).astype(np.uint8)
        return np.round(_sixteen_bit_to_float(image) * 255.0).astype(np.uint8)
    if image.mode == "F":
        raise FundusImageError(f"unsupported mask {path}: floating-point samples (mode F) have no defined range")
    if image.mode in ("L", "1", "P", "PA", "LA"):
        return np.asarray(image.convert("L"), dtype=np.uint8).copy()
    return np.asarray(image.convert("RGB"), dtype=np.uint8)[..., 0].copy()


def label_foreground(values: np.ndarray) -> np.ndarray:
    """The foreground of raw mask values (:func:`read_mask`) as every reader of labels and fields of view sees it:
    any non-zero value in a mask whose values all stay below 128 (0/1 masks, which some datasets store, and other
    low levels such as 0/2), values above 127 otherwise (0/255). A half-scale threshold would silently empty a
    low-valued mask (:func:`mask_levels_problem` says which of those cannot be read).

    Args:
        values: uint8 mask values.

    Returns:
        bool array of the same shape.
    """
    return values > 0 if values.max(initial=0) < 128 else values > 127


def mask_levels_problem(values: np.ndarray) -> str | None:
    """Why raw mask values cannot be read as one structure's mask, or None when they can.

    A 0/1 mask saved in a lossy format (JPEG) comes back as 0, 1, 2...: its compression noise is as large as the
    mask itself, so no threshold recovers the structure (the middle one kept 7-10% of DRIVE's vessels, the half-scale
    one none). A 0/255 mask saved so keeps far apart levels and is thresholded at 127.

    Args:
        values: uint8 mask values (:func:`read_mask`).

    Returns:
        what is wrong, to follow the file's name in a message; None for a readable mask.
    """
    high = int(values.max(initial=0))
    if high < 2 or high > 127:
        return None
    levels = np.unique(values)
    if len(levels) <= 2:
        return None
    return (
        f"has {len(levels)} levels from {levels[0]} to {high}: a 0/1 mask saved in a lossy format such as JPEG, "
        "whose compression noise cannot be told from the structure, or a map of several classes (0 background, 1 "
        "disc, 2 cup); save masks losslessly (PNG, TIFF), 0/1 or 0/255, one per structure"
    )


def read_label_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a label (or field-of-view) mask as bool, refusing pictures that are not masks.

    Foreground as :func:`label_foreground` says: any non-zero value in a mask whose values stay below 128, values
    above 127 otherwise, read from the picture's gray levels (a colour file's luminance). A colour picture whose
    channels differ by more than a faint tint (:data:`GRAY_TINT_TOLERANCE`; green vessels drawn on black) is refused,
    as is a low-valued mask of more than two levels (:func:`mask_levels_problem`: a 0/1 mask saved as JPEG). Another
    mask with more than two levels (a 0/255 JPEG, an anti-aliased drawing) is thresholded, with a warning naming the
    file. Transparent pixels are laid over black, as :func:`read_image` lays them (a mask painted on a transparent
    layer), unless the alpha channel hides every pixel.

    Args:
        path: mask file, in any format accepted by :func:`read_image`.

    Returns:
        ``(H, W)`` bool array.

    Raises:
        FundusImageError: the file is missing or unreadable, a colour picture whose channels differ, or a
            low-valued mask of more than two levels.
    """
    image = _open_decoded(path)
    if _has_alpha(image):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        if rgba[..., 3].any():  # laid over black, as read_image lays a photograph: what is hidden is background
            image = Image.fromarray(((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8))
    if image.mode not in (*_SIXTEEN_BIT_MODES, "L", "1", "F"):
        rgb = np.asarray(image.convert("RGB"))
        if int(np.ptp(rgb, axis=-1).max(initial=0)) > GRAY_TINT_TOLERANCE:
            means = ", ".join(f"{name} {rgb[..., i].mean():.1f}" for i, name in enumerate(("red", "green", "blue")))
            raise FundusImageError(
                f"label {path} is a colour picture whose channels differ (mean {means}): labels must be grayscale "
                "masks, 0 for background and 255 (or 1) for the structure"
            )
        # Its luminance: a faint tint spreads over the channels (a 0/1 mask tinted green has no red at all).
        values = np.asarray(image.convert("L"), dtype=np.uint8).copy()
    else:
        values = _mask_values(image, path)
    problem = mask_levels_problem(values)
    if problem:
        raise FundusImageError(f"label {path} {problem}")
    levels = np.unique(values)
    if len(levels) > 2:
        logger.warning(
            "Label %s has %d gray levels (%s...), not two: thresholded at 127.",
            path,
            len(levels),
            ", ".join(map(str, levels[:5])),
        )
    return label_foreground(values)


def _to_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """Convert a bool, uint8 or float ``[0, 1]`` array to uint8 for PNG writing (bool becomes 0/255)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min(initial=0.0) < 0.0 or array.max(initial=0.0) > 1.0:
            raise FundusImageError(f"cannot write {path}: float arrays must be finite and within [0, 1]")
        return np.round(array * 255.0).astype(np.uint8)
    raise FundusImageError(f"cannot write {path}: unsupported dtype {array.dtype} (use uint8, bool or float in [0, 1])")


def write_png(path: str | os.PathLike, array: np.ndarray, compress_level: int = 6) -> None:
    """Write a gray or RGB array as a PNG file, atomically.

    The picture is written to a temporary file in the destination folder and then renamed over ``path``, so readers
    never see a half-written file and an interrupted run leaves no corrupt output.

    Args:
        path: destination file; its parent folders are created.
        array: ``(H, W)`` or ``(H, W, 3)`` array of dtype uint8, bool (written 0/255) or float in ``[0, 1]``.
        compress_level: zlib level, 0 (none, fastest) to 9 (smallest); lossless at every level.

    Raises:
        FundusImageError: when the array has an unsupported shape or dtype.
        OutputError: when the file cannot be written (the message names the file and its folder).
    """
    path = Path(path)
    array = np.asarray(array)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3) or 0 in array.shape:
        raise FundusImageError(f"cannot write {path}: expected an (H, W) or (H, W, 3) array, got shape {array.shape}")
    pixels = Image.fromarray(np.ascontiguousarray(_to_uint8(array, path)))
    with atomic_path(path) as temporary:
        pixels.save(temporary, format="PNG", compress_level=compress_level)


# The median filter's window, and how many of its medians set the border and retina levels: above this many pixels
# the levels are taken from a regular sample of the filtered picture (its 1st and 90th percentiles barely move).
_FOV_MEDIAN_SIZE = 5
_FOV_LEVEL_SAMPLES = 2**20


def estimate_fov(image: np.ndarray, relative_threshold: float = 0.15) -> np.ndarray:
    """Estimate the field of view of a fundus photograph: the bright disc of retina inside the dark camera border.

    The brightest channel (red in a fundus photo) is median-filtered against sensor noise (a median, unlike a mean,
    leaves the border edge where it is) and thresholded at ``relative_threshold`` of the way from the dark border
    level to the retina level, both taken from percentiles of the image itself so that dim or overexposed photos
    work alike. The largest connected region is kept and its
    holes (dark vessels, pathology) are filled. A photo without a dark border gives a mask of the whole image.

    Args:
        image: ``(H, W, 3)`` or ``(H, W)`` array; float in ``[0, 1]`` or uint8/uint16 (only relative levels matter).
        relative_threshold: position of the threshold between the border level (0) and the retina level (1).

    Returns:
        ``(H, W)`` bool array, True inside the field of view.

    Raises:
        ValueError: when ``image`` is not a 2D gray or RGB array.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        # Channel by channel: numpy's max over the last axis of a photograph is several times slower.
        brightness = np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2]).astype(np.float32)
    elif image.ndim == 2:
        brightness = image.astype(np.float32)
    else:
        raise ValueError(f"estimate_fov expects an (H, W) or (H, W, 3) image, got shape {image.shape}")
    levels = _median_filtered_sample(brightness)
    border_level = float(np.percentile(levels, 1))
    retina_level = float(np.percentile(levels, 90))
    if retina_level - border_level <= 0.25 * max(retina_level, np.finfo(np.float32).tiny):
        # No clearly dark border: the photo is cropped inside the field of view (or blank).
        return np.ones(brightness.shape, dtype=bool)
    threshold = border_level + relative_threshold * (retina_level - border_level)
    regions, count = ndimage.label(_median_filtered_above(brightness, threshold))
    if count == 0:
        return np.ones(brightness.shape, dtype=bool)
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    largest = regions == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(largest)


def _median_filtered_above(brightness: np.ndarray, threshold: float) -> np.ndarray:
    """Where ``brightness`` median-filtered (``_FOV_MEDIAN_SIZE`` square windows, edges mirrored as scipy's
    ``median_filter`` does) is above ``threshold``, without filtering every pixel (seconds on an 8-megapixel
    photograph): a window's median is above it exactly where more than half of the window's pixels are."""
    above = (brightness > threshold).astype(np.float32)
    return ndimage.uniform_filter(above, size=_FOV_MEDIAN_SIZE, mode="reflect") > 0.5


def _median_filtered_sample(brightness: np.ndarray, rows_at_once: int = 128) -> np.ndarray:
    """The median-filtered ``brightness`` (as :func:`_median_filtered_above` filters it) at every pixel of a picture
    of at most ``_FOV_LEVEL_SAMPLES`` pixels, and on a regular grid of at most that many pixels of a larger one; the
    windows are gathered ``rows_at_once`` grid rows at a time (25 values per pixel would take 100 bytes each)."""
    stride = max(1, int(np.ceil(np.sqrt(brightness.size / _FOV_LEVEL_SAMPLES))))
    half, count = _FOV_MEDIAN_SIZE // 2, _FOV_MEDIAN_SIZE**2
    padded = np.pad(brightness, half, mode="symmetric")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (_FOV_MEDIAN_SIZE, _FOV_MEDIAN_SIZE))[::stride, ::stride]
    medians = np.empty(windows.shape[:2], dtype=brightness.dtype)
    for start in range(0, windows.shape[0], rows_at_once):
        values = np.array(windows[start : start + rows_at_once]).reshape(-1, count)  # a copy, sorted here
        values.partition(count // 2, axis=1)
        medians[start : start + rows_at_once] = values[:, count // 2].reshape(-1, windows.shape[1])
    return medians.ravel()

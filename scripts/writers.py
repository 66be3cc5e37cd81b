"""Writing segmentation results a person and a pipeline can use: masks, probability maps, overlays, NIfTI."""

from __future__ import annotations

import colorsys
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.atomic import atomic_path
from scripts.fundus_io import (
    SUPPORTED_SUFFIXES,
    UNREADABLE_KEY,
    FundusImageError,
    estimate_fov,
    read_image,
    write_png,
)
from scripts.masks import binarise
from scripts.measurements import (
    SMALLEST_VESSEL_FRAGMENT,
    fill_holes,
    measure_structures,
    structure_of,
    warn_about_unmeasured_channels,
)
from scripts.report import thumbnail_jpeg

__all__ = ["REPORT_FILES", "SaveFundusPredictiond", "label_map", "output_names", "output_stem"]

logger = logging.getLogger(__name__)

REPORT_FILES = ("measurements.csv", "report.html", "prompts_used.json")
"""What an inference run writes once into its output folder, beside each image's files."""

# One colour per output channel for the overlay: vessels / disc in green, cup in magenta.
CHANNEL_COLOURS = np.array([(0, 255, 64), (255, 0, 255), (0, 160, 255), (255, 200, 0)], dtype=np.float32) / 255


def channel_colour(channel: int) -> np.ndarray:
    """The overlay's RGB colour in ``[0, 1]`` for an output channel: :data:`CHANNEL_COLOURS`, then hues of full
    saturation, each its own, for channels beyond them (a model given more ``channel_names``)."""
    if channel < len(CHANNEL_COLOURS):
        return CHANNEL_COLOURS[channel]
    hue = ((channel - len(CHANNEL_COLOURS)) * 0.618034) % 1.0  # golden-ratio steps keep neighbours apart
    return np.asarray(colorsys.hsv_to_rgb(hue, 1.0, 1.0), dtype=np.float32)


def output_stem(source: str | os.PathLike) -> str:
    """The name an image's outputs start with: its file name without the image suffix (and ``.gz``).

    Only the suffix goes: ``scan.v1.png`` and ``scan.v2.png`` keep apart, while ``eye.png`` and ``eye.jpg`` collide
    (:class:`scripts.inputs.ImageFolder` refuses such a pair before the run).
    """
    name = Path(source).name
    name = name[: -len(".gz")] if name.lower().endswith(".gz") else name
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in SUPPORTED_SUFFIXES else name


def output_names(source: str | os.PathLike, channel_names: Sequence[str], nifti: bool = False) -> list[str]:
    """The file names :class:`SaveFundusPredictiond` writes for one image, in the order it writes them."""
    stem = output_stem(source)
    probabilities = ["prob"] if len(channel_names) == 1 else [f"prob_{name}" for name in channel_names]
    names = [f"{stem}_mask.png", *(f"{stem}_{kind}.png" for kind in probabilities), f"{stem}_overlay.png"]
    return names + [f"{stem}_mask.nii.gz"] if nifti else names


def label_map(masks: np.ndarray, channel_names: Sequence[str]) -> np.ndarray:
    """Binary channels (C, H, W) as one label image: 0 background, ``c + 1`` where channel ``c`` is the highest one
    present (optic disc 1, cup 2).

    A cup counts only inside the disc of the channel before it, its holes filled, as the measurements clip it
    (:func:`scripts.measurements.disc_cup_measurements`): one label cannot say "cup but no disc", and labelled 2 a cup
    pixel outside the disc read as disc too (a cup 40% outside a disc gave the file a vertical ratio of 0.46 where
    ``measurements.csv`` said 0.34); a cup in a disc that missed it (a ring: the pale cup left out of the disc's
    mask) was written as background where ``measurements.csv`` measured it. The cup's probability map keeps what
    the network predicted.

    Args:
        masks: ``(C, H, W)`` bool, one mask per channel.
        channel_names: the channels' names, by which the disc and the cup are known (:func:`structure_of`).

    Returns:
        the ``(H, W)`` uint8 label image.
    """
    structures = [structure_of(name) for name in channel_names]
    labels = np.zeros(masks.shape[1:], dtype=np.uint8)
    for channel, mask in enumerate(masks):
        if channel and structures[channel - 1 : channel + 1] == ["disc", "cup"]:
            mask = mask & fill_holes(masks[channel - 1])
        labels[mask] = channel + 1
    return labels


class SaveFundusPredictiond(MapTransform):
    """Write each prediction next to its image's name, at the image's own size.

    For an image ``<stem>.<ext>`` it writes into ``output_dir``:

    - ``<stem>_mask.png``: the binary mask; with several channels, a label image (:func:`label_map`) with values
      ``round(255 * label / C)`` (disc/cup: 0 background, 128 disc rim, 255 cup, only inside the disc);
    - ``<stem>_prob.png`` (one channel) or ``<stem>_prob_<channel>.png``: probabilities scaled to 0-255;
    - ``<stem>_overlay.png``: the photograph with the mask painted over it, to look at;
    - ``<stem>_mask.nii.gz`` when ``nifti`` is set: the label image as NIfTI (x = column, y = row), uint8.

    Args:
        keys: the probability map key, (C, H, W) in [0, 1], already brought back to the image's size.
        output_dir: destination folder, created if needed.
        channel_names: one name per channel, e.g. ``["vessels"]`` or ``["disc", "cup"]``.
        threshold: probability from which a pixel belongs to the structure (:func:`scripts.masks.binarise`).
        restrict_to_fov: clear the prediction outside the field of view, estimated from the photograph
            (the dark border of a fundus camera picture holds no retina).
        nifti: also write the label image as NIfTI.
        overlay_opacity: opacity of the mask colour on the overlay.
        measure: also measure the structures (:func:`scripts.measurements.measure_structures`, vessels inside the
            estimated field of view) into ``<key>_record``, for the run's ``measurements.csv`` and report, with
            the overlay's thumbnail for the report (``thumbnail``: :func:`scripts.report.thumbnail_jpeg`). A
            prediction for a stand-in (its metadata's :data:`scripts.fundus_io.UNREADABLE_KEY` says why the
            photograph could not be read) is not written; its record holds the image's name and that reason.
        pixel_size_mm: the side of a pixel in millimetres, for measures in mm (None: pixels only).
        min_fragment_px: pieces of a vessel mask under this many pixels are not counted as vessel segments,
            branch or end points (they are written).
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        channel_names: Sequence[str] = ("vessels",),
        threshold: float = 0.5,
        restrict_to_fov: bool = False,
        nifti: bool = False,
        overlay_opacity: float = 0.6,
        measure: bool = False,
        pixel_size_mm: float | None = None,
        min_fragment_px: int = SMALLEST_VESSEL_FRAGMENT,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.channel_names = list(channel_names)
        self.threshold = threshold
        self.restrict_to_fov = restrict_to_fov
        self.nifti = nifti
        self.overlay_opacity = overlay_opacity
        self.measure = measure
        self.pixel_size_mm = pixel_size_mm
        self.min_fragment_px = min_fragment_px
        if measure:
            warn_about_unmeasured_channels(self.channel_names)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            probabilities = d[key]
            source = Path(str(probabilities.meta["filename_or_obj"]))
            unreadable = probabilities.meta.get(UNREADABLE_KEY)
            if unreadable:  # a stand-in for a photograph that could not be read (scripts.inputs.FolderDataset)
                record = {"image": source.name, UNREADABLE_KEY: unreadable}
                self._remove_earlier_outputs(source)
            else:
                array = np.asarray(probabilities.detach().cpu(), dtype=np.float32)
                try:
                    image = self.photograph(array, source)
                except FundusImageError as error:
                    if not self.measure:  # no record to carry it to the run's report
                        raise
                    # A photograph removed or replaced since its batch was loaded, or a prediction that cannot be
                    # written for it: nothing is written for it, and the run goes on and reports it at its end.
                    logger.error(f"Left out: {error}")
                    record = {"image": source.name, UNREADABLE_KEY: str(error)}
                    self._remove_earlier_outputs(source)
                else:
                    record = self.write(array, source, image)
            if self.measure:
                d[f"{key}_record"] = record
        return d

    def _remove_earlier_outputs(self, source: Path) -> None:
        """Remove the outputs an earlier run wrote for a photograph this run leaves out at its turn.

        Kept, they passed for this run's. Any there are an earlier run's that ``--overwrite True`` let this run
        replace: without it the run refuses to start over them (:class:`scripts.inputs.ImageFolder`).
        """
        earlier = [path for name in output_names(source, self.channel_names, nifti=True)
                   if (path := self.output_dir / name).is_file()]
        for path in earlier:
            path.unlink(missing_ok=True)
        if earlier:
            logger.warning(
                f"Removed {len(earlier)} outputs an earlier run wrote for {source.name} ({earlier[0].name}, ...): this "
                "run left it out, and they would pass for its."
            )

    def photograph(self, probabilities: np.ndarray, source: Path) -> np.ndarray:
        """The photograph ``probabilities`` were predicted from, read again for its overlay and field of view, once
        the prediction is known to be writable for it.

        Args:
            probabilities: (C, H, W) probabilities at the size of ``source``.
            source: the image they were predicted from.

        Returns:
            ``source`` as :func:`scripts.fundus_io.read_image` reads it.

        Raises:
            ValueError: the prediction has another number of channels than the writer's channel names.
            FundusImageError: the prediction holds NaN or infinite values, ``source`` cannot be read, or it is not
                the prediction's size.
        """
        if probabilities.shape[0] != len(self.channel_names):
            raise ValueError(
                f"{source}: prediction has {probabilities.shape[0]} channels but {len(self.channel_names)} channel "
                f"names were given ({self.channel_names})."
            )
        if not np.isfinite(probabilities).all():
            raise FundusImageError(
                f"{source}: the prediction holds NaN or infinite values (weights that diverged in training?): nothing "
                "is written for it."
            )
        image = read_image(source)
        if image.shape[:2] != probabilities.shape[1:]:
            raise FundusImageError(
                f"{source} is {image.shape[1]}x{image.shape[0]} but its prediction is {probabilities.shape[2]}x"
                f"{probabilities.shape[1]}: the prediction was not brought back to the image's size."
            )
        return image

    def write(self, probabilities: np.ndarray, source: Path, image: np.ndarray | None = None) -> dict[str, Any]:
        """Write every output for one image.

        Args:
            probabilities: (C, H, W) probabilities at the size of ``source``.
            source: the image they were predicted from.
            image: ``source`` as :meth:`photograph` gave it; None reads it (and checks the prediction) here.

        Returns:
            The image's record: its name, the share of the picture its estimated field of view covers, and, with
            ``measure``, the measurements of its structures (empty otherwise).
        """
        if image is None:
            image = self.photograph(probabilities, source)
        fov = estimate_fov(image) if self.restrict_to_fov or self.measure else None
        if self.restrict_to_fov:
            probabilities = probabilities * fov
        masks = binarise(probabilities, self.threshold)
        labels = label_map(masks, self.channel_names)
        mask_file, *probability_files, overlay_file = output_names(source, self.channel_names)
        write_png(self.output_dir / mask_file, np.round(labels * (255 / len(self.channel_names))).astype(np.uint8))
        for name, channel in zip(probability_files, probabilities):
            write_png(self.output_dir / name, np.clip(channel, 0, 1))
        # A photograph barely compresses: zlib's level 1 writes an overlay 3.3 x (DRIVE) to 4.7 x (3504 x 2336)
        # faster than the default 6, for a file 10-14% larger.
        overlay = self._overlay(image, masks)
        write_png(self.output_dir / overlay_file, overlay, compress_level=1)
        if self.nifti:
            self._write_nifti(self.output_dir / output_names(source, self.channel_names, nifti=True)[-1], labels)
        if not self.measure:
            return {}
        return {
            "image": source.name,
            "overlay": overlay_file,
            # made here from the overlay in memory (0.12 s at 3504 x 2336): read back at the run's end it took 0.56 s
            "thumbnail": thumbnail_jpeg(overlay),
            "fov_fraction": float(fov.mean()),
            **measure_structures(masks, self.channel_names, fov, self.pixel_size_mm, self.min_fragment_px),
        }

    def _overlay(self, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """The photograph (float ``[0, 1]``) with each channel's mask painted over it, as 8-bit RGB."""
        image = image.copy()
        for channel, mask in enumerate(masks):
            colour = channel_colour(channel)
            image[mask] = (1 - self.overlay_opacity) * image[mask] + self.overlay_opacity * colour
        return np.round(image * 255.0).astype(np.uint8)

    @staticmethod
    def _write_nifti(path: Path, labels: np.ndarray) -> None:
        # Columns first, as MONAI's readers lay out a 2D picture, with the affine ITK writes for a PNG: ITK-based
        # viewers (ITK-SNAP, 3D Slicer) turn NIfTI's RAS into their LPS by negating x and y, so this places the
        # label on the photograph as they read it (an identity affine put it 180 degrees round, off the picture).
        with atomic_path(path) as temporary:
            nib.save(nib.Nifti1Image(np.ascontiguousarray(labels.T), affine=np.diag([-1.0, -1.0, 1.0, 1.0])), temporary)

"""MONAI dictionary transforms for fundus photographs, declared in the bundle configs as ``scripts.transforms.<Name>``.

MONAI's own transforms are used wherever they fit (``Resized``, ``Invertd``, ``RandFlipd``, ``RandRotated``,
``RandAffined``, ``RandGaussianSmoothd``, ...); this module adds what is missing:

- :class:`LoadFundusd`: image, label(s) and field of view as channel-first MetaTensors, in (H, W) order;
- :class:`SamNormalized`: SAM's ImageNet normalisation;
- :class:`RandHueShiftd`: the hue part of colour jitter;
- :func:`network_size`: photographs brought to what the network sees (resized, or scaled for windows), anti-aliased
  where they shrink (:class:`AntiAliasedResized`);
- :class:`CompactCached` and :class:`FloatFromCache`: what ``CacheDataset`` stores, in a quarter of the memory;
- :func:`training_crops`: windows cut for training at the scale of inference, vessel-rich ones favoured;
- :func:`training_augmentations`: the SAM2LoRA paper's augmentation, as one ``Compose``;
- :class:`SamplePromptsd`: SAM point and box prompts drawn from the ground truth.

Typical preprocessing (``Invertd`` with ``orig_keys="image"`` later brings a prediction back to the file's size)::

    Compose([LoadFundusd(), *network_size("resize", 1024), training_augmentations(1024), SamplePromptsd(num_positive=1),
             SamNormalized()])
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    Identityd,
    InvertibleTransform,
    MapTransform,
    NormalizeIntensityd,
    OneOf,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianSharpend,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandRotated,
    RandScaleIntensityd,
    RandSpatialCropd,
    Resized,
    ScaleIntensityRanged,
    Zoomd,
)
from monai.utils import convert_to_dst_type
from scipy import ndimage
from torchvision.transforms.v2.functional import adjust_hue

from scripts.errors import ConfigError, is_real_number, is_whole_number
from scripts.fundus_io import UNREADABLE_KEY, FundusImageError, estimate_fov, read_image, read_label_mask
from scripts.inferers import check_input_mode
from scripts.metrics import FOV_SOURCES, entry_fov_source
from scripts.prompts import (
    BOX_BOTTOM_RIGHT,
    BOX_TOP_LEFT,
    POINT_NEGATIVE,
    POINT_PADDING,
    POINT_POSITIVE,
    PROMPT_EROSION_PX,
)

# Masks resample with "nearest-exact", which samples each output pixel's centre as bilinear does; torch's legacy
# "nearest" samples its top-left corner, moving every mask about half a pixel down and right of its photograph.
MASK_RESAMPLING = "nearest-exact"

__all__ = [
    "MASK_RESAMPLING",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "AntiAliasedResized",
    "CompactCached",
    "FloatFromCache",
    "LoadFundusd",
    "RandHueShiftd",
    "SamNormalized",
    "SamplePromptsd",
    "network_size",
    "training_augmentations",
    "training_crops",
]

SAM_PIXEL_MEAN = (0.485, 0.456, 0.406)
"""ImageNet channel means of ``[0, 1]`` RGB, as SAM and SAM 2 normalise their input."""
SAM_PIXEL_STD = (0.229, 0.224, 0.225)
"""ImageNet channel standard deviations of ``[0, 1]`` RGB."""


def _as_metatensor(array: np.ndarray, path: str, original_channel_dim: float, extra: dict) -> MetaTensor:
    """A channel-first array as a MetaTensor with the metadata that ``LoadImage`` would give it."""
    meta = {
        "filename_or_obj": path,
        "spatial_shape": np.asarray(array.shape[1:]),
        "original_channel_dim": original_channel_dim,
        **extra,
    }
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return MetaTensor(tensor, affine=torch.eye(4, dtype=torch.float64), meta=meta)


class LoadFundusd(MapTransform):
    """Load a fundus photograph, its label mask(s) and field of view as channel-first MetaTensors.

    Images become ``(3, H, W)`` float32 RGB in ``[0, 1]``, labels ``(C, H, W)`` float32 in ``{0, 1}`` (a list of paths
    stacks one channel per file, in order), the field of view ``(1, H, W)`` in ``{0, 1}``. When an item has no field of
    view (arbitrary photos at inference), it is estimated from the image with :func:`scripts.fundus_io.estimate_fov`
    and ``fov_estimated`` is set in its metadata, as it is for a mask ``tools.prepare`` estimated
    (:func:`scripts.metrics.entry_fov_source`).

    Why not ``LoadImaged``: MONAI's 2D readers return ``(W, H)`` arrays by default, read masks as intensities, and
    know nothing of fundus formats (gzipped PPM, 16-bit depth scaling) or of the field of view. This loader reads
    every format through :mod:`scripts.fundus_io`, keeps the ``(H, W)`` order of the file, thresholds masks, checks
    that masks match their image, and records the metadata that ``Invertd`` and ``SaveImaged`` use
    (``filename_or_obj``, ``spatial_shape`` = original ``(H, W)``, ``original_channel_dim``, identity affine).

    Args:
        image_key: key of the image path. An item of an inference folder (:class:`scripts.inputs.ImageFolder`) also
            holds its ``size`` and :data:`scripts.fundus_io.UNREADABLE_KEY`; where the latter says why the image
            cannot be read, a mid-gray stand-in of that size is loaded, its metadata keeping the reason.
        label_key: key of the label path or list of paths; may be absent (inference).
        fov_key: key of the field-of-view mask path; absent or None means "estimate it".
        estimate_missing_fov: estimate absent fields of view (otherwise they stay absent).

    Raises:
        FundusImageError: when a file cannot be read, or a mask's size differs from its image's (the message names
            both files and both sizes).
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        fov_key: str = "fov",
        estimate_missing_fov: bool = True,
    ) -> None:
        super().__init__([image_key, label_key, fov_key], allow_missing_keys=True)
        self.image_key = image_key
        self.label_key = label_key
        self.fov_key = fov_key
        self.estimate_missing_fov = estimate_missing_fov

    def _read_masks(self, paths: str | Sequence[str], image_path: str, image_size: tuple[int, int]) -> np.ndarray:
        """Read one mask per path as a ``(C, H, W)`` float32 stack, checking each against the image size."""
        masks = []
        for path in _path_list(paths):
            mask = read_label_mask(path)
            if mask.shape != image_size:
                raise FundusImageError(
                    f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (width x height) but its image {image_path} is "
                    f"{image_size[1]}x{image_size[0]}"
                )
            masks.append(mask)
        return np.stack(masks).astype(np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """
        Args:
            data: a datalist item with file paths under the configured keys (other keys pass through).

        Returns:
            a copy of ``data`` with the paths replaced by MetaTensors (and an estimated field of view if needed).
        """
        result = dict(data)
        image_path = str(data[self.image_key])
        unreadable = result.pop(UNREADABLE_KEY, None)
        folder_size = result.pop("size", None)
        if unreadable:
            # A folder's photograph that could not be read at its turn (scripts.inputs.FolderDataset): a gray
            # stand-in of its size keeps the batch and the run going; the writer writes nothing for it.
            image = np.full((*folder_size, 3), 0.5, dtype=np.float32)
        else:
            image = read_image(image_path)
        size = image.shape[:2]
        # Every item of a folder carries the key, so that a batch's metadata collates.
        extra = {UNREADABLE_KEY: unreadable or ""} if unreadable is not None else {}
        result[self.image_key] = _as_metatensor(image.transpose(2, 0, 1), image_path, -1, extra)
        if data.get(self.label_key) is not None:
            paths = data[self.label_key]
            paths = _path_list(paths)
            if not paths:
                raise FundusImageError(f"the label of {image_path} names no mask file")
            first = paths[0]
            result[self.label_key] = _as_metatensor(self._read_masks(paths, image_path, size), first, 0, {})
        if data.get(self.fov_key) is not None:
            fov_path = str(data[self.fov_key])
            fov = self._read_masks(fov_path, image_path, size)
            estimated = entry_fov_source(data) == FOV_SOURCES[1]  # a mask tools.prepare estimated
            result[self.fov_key] = _as_metatensor(fov, fov_path, 0, {"fov_estimated": estimated})
        elif self.estimate_missing_fov:
            fov = estimate_fov(image)[None].astype(np.float32)
            result[self.fov_key] = _as_metatensor(fov, image_path, 0, {"fov_estimated": True})
        else:
            result.pop(self.fov_key, None)  # a None left here would reach the resizing transforms
        return result


def _path_list(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A label's mask files: one path, or one per channel (disc and cup)."""
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(path) for path in paths]


class SamNormalized(NormalizeIntensityd):
    """SAM's input normalisation: ``(image - mean) / std`` per RGB channel with ImageNet statistics.

    Args:
        keys: keys of ``(3, H, W)`` RGB images in ``[0, 1]``.
        mean: channel means to subtract.
        std: channel standard deviations to divide by.
        allow_missing_keys: do not fail on absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mean: Sequence[float] = SAM_PIXEL_MEAN,
        std: Sequence[float] = SAM_PIXEL_STD,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys,
            subtrahend=np.asarray(mean, np.float32),
            divisor=np.asarray(std, np.float32),
            channel_wise=True,
            allow_missing_keys=allow_missing_keys,
        )


class RandHueShiftd(RandomizableTransform, MapTransform):
    """Randomly rotate the hue of RGB images, the hue part of torchvision's ``ColorJitter`` as a MONAI transform.

    MONAI has no hue transform; the rotation itself is torchvision's ``adjust_hue`` (torchvision comes with sam2).

    Args:
        keys: keys of ``(3, H, W)`` RGB images in ``[0, 1]``.
        max_shift: the shift is drawn uniformly in ``[-max_shift, max_shift]`` turns of the colour wheel (0.5 max).
        prob: probability of shifting.
        allow_missing_keys: do not fail on absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        max_shift: float = 0.02,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        if not 0.0 <= max_shift <= 0.5:
            raise ValueError(f"max_shift must be in [0, 0.5] turns, got {max_shift}")
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.max_shift = max_shift
        self.shift = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.shift = float(self.R.uniform(-self.max_shift, self.max_shift))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """
        Args:
            data: item holding ``(3, H, W)`` RGB images under ``keys``.

        Returns:
            a copy of ``data`` with the hue of those images shifted by one common random amount.
        """
        result = dict(data)
        self.randomize()
        if not self._do_transform:
            return result
        for key in self.key_iterator(result):
            image = result[key]
            tensor = torch.as_tensor(image.as_tensor() if isinstance(image, MetaTensor) else image, dtype=torch.float32)
            if tensor.shape[0] != 3:
                raise ValueError(f"RandHueShiftd expects RGB images (3, H, W) under {key!r}, got {tuple(tensor.shape)}")
            result[key] = convert_to_dst_type(adjust_hue(tensor.clamp(0.0, 1.0), self.shift), image)[0]
        return result


def network_size(
    input_mode: str,
    image_size: int,
    pixel_scale: float = 1.0,
    keys: Sequence[str] = ("image", "label", "fov"),
) -> list[MapTransform]:
    """Bring loaded photographs (and their masks) to what the network sees, invertibly (``Invertd`` undoes it).

    Args:
        input_mode: ``"resize"``: every picture becomes an ``image_size`` square (the paper's protocol);
            ``"sliding_window"``: pictures keep their shape at ``pixel_scale`` times their resolution.
        image_size: the network's side.
        pixel_scale: the scale of ``"sliding_window"`` (1.0: native resolution).
        keys: the image first (bilinear, anti-aliased where it shrinks: :class:`AntiAliasedResized`), then masks
            (:data:`MASK_RESAMPLING`);
            absent keys are skipped.

    Returns:
        The transforms (for ``"sliding_window"`` at scale 1, a recorded no-op: ``Invertd`` warns on every picture when
        there is nothing to invert).
    """
    check_input_mode(input_mode, pixel_scale)
    modes = ["bilinear"] + [MASK_RESAMPLING] * (len(keys) - 1)
    if input_mode == "resize":
        return [AntiAliasedResized(Resized(keys, (image_size, image_size), mode=modes, allow_missing_keys=True), keys[0])]
    if pixel_scale == 1:
        return [Resized(keys, (-1, -1), mode=modes, allow_missing_keys=True)]
    return [AntiAliasedResized(Zoomd(keys, zoom=pixel_scale, mode=modes, keep_size=False, allow_missing_keys=True), keys[0])]


class AntiAliasedResized(MapTransform, InvertibleTransform):
    """``resize`` (MONAI's ``Resized`` or ``Zoomd`` of a photograph and its masks), the photograph's pixels taken from
    torch's anti-aliased resize wherever it shrinks, as SAM 2's own preprocessing (torchvision's) makes them.

    Without it a one-pixel vessel keeps or loses its contrast depending on where it falls between the samples.
    MONAI's own ``anti_aliasing`` (a Gaussian over every input pixel) took 1.25 s for a 3504 x 2336 photograph,
    against 0.05 s here. ``resize`` still records the geometry, so ``Invertd`` undoes it as before.

    Args:
        resize: the resize of the photograph and its masks.
        image_key: the photograph's key.
    """

    def __init__(self, resize: Resized | Zoomd, image_key: str = "image") -> None:
        super().__init__(resize.keys, allow_missing_keys=True)
        self.resize = resize
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        source = data.get(self.image_key)
        d = self.resize(data)
        if source is None:
            return d
        image = d[self.image_key]
        size = tuple(image.shape[-2:])
        if any(new < old for new, old in zip(size, source.shape[-2:])):
            pixels = torch.as_tensor(source.as_tensor() if isinstance(source, MetaTensor) else source, dtype=torch.float32)
            with torch.no_grad():
                image.copy_(F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0])
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.resize.inverse(data)


class CompactCached(MapTransform):
    """The last transform whose output ``CacheDataset`` stores: the photograph as 8-bit RGB, masks as bytes.

    Float32 takes four times the memory, which pooled datasets do not have: at 1024 px a photograph with its vessel
    mask and field of view is 20 MiB in float32 and 5 MiB here, so the 800 photographs of FIVES alone would take 15.6 GiB.
    Photographs read from 8-bit files at their own size (``sliding_window`` at scale 1) are stored exactly; resized
    ones, 16-bit ones and transparent ones laid over black are rounded to the nearest of 256 levels (at most 0.5/255
    off). Inference and evaluation do not cache, so they read every photograph at its full depth. Masks are 0/1
    after loading and nearest-neighbour resampling, so they are stored exactly. :class:`FloatFromCache` turns them back.

    Args:
        keys: the photograph and its masks; absent keys are skipped.
        image_key: the photograph's key (the others are masks).
    """

    def __init__(self, keys: KeysCollection = ("image", "label", "fov"), image_key: str = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if key == self.image_key:
                value = (value * 255).round().clamp(0, 255)
            d[key] = value.to(torch.uint8)
        return d


class FloatFromCache:
    """The first step after what ``CacheDataset`` stores: :class:`CompactCached`'s bytes back to float32 in [0, 1].

    Deliberately not a MONAI ``Transform``: ``CacheDataset`` stores the output of the transforms up to the first
    randomised one or the first that is not a ``Transform``, so this step marks where the stored part ends even in
    a validation chain that has no randomised transform (every epoch then converts, and normalises, a stored item).

    Args:
        keys: the photograph and its masks; absent keys are skipped.
        image_key: the photograph's key (divided by 255; masks keep their 0/1 values).
    """

    def __init__(self, keys: Sequence[str] = ("image", "label", "fov"), image_key: str = "image") -> None:
        self.keys = tuple(keys)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            if key in d:
                value = d[key].to(torch.float32)
                d[key] = value / 255 if key == self.image_key else value
        return d


def training_crops(
    input_mode: str,
    image_size: int,
    crops_per_image: int = 4,
    vessel_fraction: float = 0.75,
    keys: Sequence[str] = ("image", "label", "fov"),
) -> list[MapTransform]:
    """Windows of ``image_size`` cut from each training picture (``"sliding_window"``; none for ``"resize"``).

    A crop is centred on a foreground pixel of the label with probability ``vessel_fraction``, else on a background
    pixel inside the field of view (a crop of the black border teaches nothing).

    Args:
        input_mode: the workflow's input mode.
        image_size: the window side.
        crops_per_image: windows per picture and epoch.
        vessel_fraction: share of windows centred on the structure.
        keys: image, label and field of view.
    """
    check_input_mode(input_mode)
    if input_mode == "resize":
        return []
    _, label, fov = keys
    return [
        RandCropByPosNegLabeld(
            keys=list(keys),
            label_key=label,
            spatial_size=(image_size, image_size),
            pos=vessel_fraction,
            neg=1.0 - vessel_fraction,
            num_samples=crops_per_image,
            image_key=fov,
            image_threshold=0.5,
            allow_smaller=False,
        )
    ]


def training_augmentations(
    image_size: int,
    image_key: str = "image",
    mask_keys: Sequence[str] = ("label", "fov"),
    rotation_degrees: float = 8.0,
    brightness: float = 0.1,
    hue: float = 0.02,
) -> Compose:
    """The SAM2LoRA paper's training augmentation, to follow the resize to ``image_size``.

    Horizontal and vertical flips (p = 0.5 each); with p = 0.5 one of: rotation within ``rotation_degrees``, a mild
    affine transform, or a random resized crop (60-100% of the side, resized back); with p = 0.5 one of: colour jitter
    (brightness and hue), Gaussian blur or sharpening. Spatial steps move the image (bilinear) and the masks
    (nearest neighbour, aligned on pixel centres) together; colour steps touch the image alone and keep it in ``[0, 1]``.

    Args:
        image_size: side of the square images at this point of the pipeline (crops are resized back to it).
        image_key: key of the RGB image.
        mask_keys: keys of masks moving with the image (absent ones are skipped).
        rotation_degrees: largest rotation either way.
        brightness: relative brightness change either way.
        hue: largest hue shift either way, in turns of the colour wheel.

    Returns:
        a ``Compose`` of MONAI random transforms; seed it with ``set_random_state``.
    """
    keys = [image_key, *mask_keys]
    # Rotations and affine maps sample through a grid at pixel centres, where "nearest" is already aligned.
    grid_modes = ["bilinear"] + ["nearest"] * len(mask_keys)
    resize_modes = ["bilinear"] + [MASK_RESAMPLING] * len(mask_keys)
    angle = math.radians(rotation_degrees)
    spatial = {"keys": keys, "mode": grid_modes, "padding_mode": "zeros", "allow_missing_keys": True}
    geometric = OneOf(
        transforms=[
            Identityd(keys, allow_missing_keys=True),
            RandRotated(range_x=angle, prob=1.0, **spatial),
            RandAffined(
                prob=1.0,
                rotate_range=angle,
                shear_range=(0.05, 0.05),
                translate_range=(0.05 * image_size, 0.05 * image_size),
                scale_range=(0.1, 0.1),
                **spatial,
            ),
            Compose(
                [
                    RandSpatialCropd(keys, roi_size=int(0.6 * image_size), random_size=True, allow_missing_keys=True),
                    Resized(keys, (image_size, image_size), mode=resize_modes, allow_missing_keys=True),
                ]
            ),
        ],
        # Identity carries half the weight: "with p = 0.5 one of the three".
        weights=[3.0, 1.0, 1.0, 1.0],
    )
    colour = OneOf(
        transforms=[
            Identityd(image_key),
            Compose(
                [RandScaleIntensityd(image_key, factors=brightness, prob=1.0), RandHueShiftd(image_key, hue, prob=1.0)]
            ),
            RandGaussianSmoothd(image_key, sigma_x=(0.1, 1.5), sigma_y=(0.1, 1.5), prob=1.0),
            RandGaussianSharpend(
                image_key,
                sigma1_x=(0.5, 1.0),
                sigma1_y=(0.5, 1.0),
                sigma2_x=0.5,
                sigma2_y=0.5,
                alpha=(1.0, 3.0),
                prob=1.0,
            ),
        ],
        weights=[3.0, 1.0, 1.0, 1.0],
    )
    return Compose(
        [
            RandFlipd(keys, prob=0.5, spatial_axis=1, allow_missing_keys=True),
            RandFlipd(keys, prob=0.5, spatial_axis=0, allow_missing_keys=True),
            geometric,
            colour,
            ScaleIntensityRanged(image_key, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        ]
    )


class SamplePromptsd(RandomizableTransform, MapTransform):
    """Draw SAM prompts (points and an optional box) from a ground-truth mask.

    Positive points come from the label eroded by ``erosion_radius`` (the un-eroded label when erosion empties it)
    so that they sit well inside the structure; negative points from the background inside the field of view; the
    box is the label's bounding box, its corners moved by up to ``box_noise`` of its side (at most
    ``box_noise_bound`` px), as SAM 2's training does. With probability ``no_prompt_prob`` every slot is padding.

    Padding only fills the fixed length, so ``ignored_points`` marks it to be kept out of the decoder's attention
    (:meth:`scripts.network.SAM2LoRA.decode`): each item then decodes as its prompts would alone at inference, and
    an item without prompts as SAM 2's prompt-free input (one padding point, the first slot, which is kept). SAM's
    padding token is a real token, so without the mark a prompt-free item of N slots would train on N padding
    tokens where inference gives one.

    Outputs follow SAM's convention, with a fixed length ``N = num_positive + num_negative + (2 if use_box)`` so that
    the default collate stacks them: ``point_coords`` ``(N, 2)`` float32 ``(x, y)`` = (column, row) pixel coordinates
    of the image as it is at this point of the pipeline, ``point_labels`` ``(N,)`` int64: 1 positive, 0 negative, 2/3
    box top-left/bottom-right, -1 padding (coordinates 0), ``ignored_points`` ``(N,)`` bool. An empty label gives
    only negatives and padding.

    Args:
        label_key: key of the ``(C, H, W)`` label.
        fov_key: key of the ``(1, H, W)`` field of view; when absent the whole image counts as inside.
        channel: label channel the prompts are for.
        num_positive: positive points.
        num_negative: negative points.
        use_box: add a box prompt (two slots).
        erosion_radius: erosion, in pixels, before drawing positive points.
        box_noise: largest corner displacement, as a fraction of the box's width/height.
        box_noise_bound: largest corner displacement in pixels.
        no_prompt_prob: probability of giving no prompt at all.
        coords_key: output key of the coordinates.
        labels_key: output key of the point labels.
        ignored_key: output key of the padding slots to keep out of the decoder's attention.
    """

    def __init__(
        self,
        label_key: str = "label",
        fov_key: str = "fov",
        channel: int = 0,
        num_positive: int = 1,
        num_negative: int = 0,
        use_box: bool = False,
        erosion_radius: int = PROMPT_EROSION_PX,
        box_noise: float = 0.1,
        box_noise_bound: float = 20.0,
        no_prompt_prob: float = 0.0,
        coords_key: str = "point_coords",
        labels_key: str = "point_labels",
        ignored_key: str = "ignored_points",
    ) -> None:
        counts = {"prompt_positive_points": num_positive, "prompt_negative_points": num_negative}
        for name, count in counts.items():
            if not (is_whole_number(count) and count >= 0):
                raise ConfigError(f"Setting '{name}' must be 0 or a positive whole number; got {count!r}.")
        if num_positive + num_negative + (2 if use_box else 0) == 0:
            raise ConfigError(
                "Settings 'prompt_positive_points', 'prompt_negative_points' and 'prompt_box' give no prompt slot: "
                "ask for at least one point or the box."
            )
        if not (is_real_number(no_prompt_prob) and 0.0 <= no_prompt_prob <= 1.0):
            raise ConfigError(
                f"Setting 'prompt_free_probability' must be a probability in [0, 1]; got {no_prompt_prob!r}."
            )
        MapTransform.__init__(self, [label_key, fov_key], allow_missing_keys=True)
        RandomizableTransform.__init__(self, prob=1.0)
        self.label_key, self.fov_key, self.channel = label_key, fov_key, channel
        self.num_positive, self.num_negative, self.use_box = num_positive, num_negative, use_box
        self.erosion_radius = erosion_radius
        self.box_noise, self.box_noise_bound = box_noise, box_noise_bound
        self.no_prompt_prob = no_prompt_prob
        self.coords_key, self.labels_key, self.ignored_key = coords_key, labels_key, ignored_key

    @property
    def num_slots(self) -> int:
        """Number of prompt slots ``N`` per item."""
        return self.num_positive + self.num_negative + (2 if self.use_box else 0)

    def randomize(self, data: Any = None) -> None:
        # Every draw comes from self.R in a fixed order, so set_random_state makes the prompts reproducible.
        self._do_transform = self.R.rand() >= self.no_prompt_prob

    def _points(self, candidates: np.ndarray, count: int) -> np.ndarray:
        """``count`` (x, y) points drawn from the ``(row, col)`` rows of ``candidates`` (repeats when too few)."""
        chosen = self.R.choice(len(candidates), size=count, replace=len(candidates) < count)
        return candidates[chosen][:, ::-1].astype(np.float32)

    def _box(self, foreground: np.ndarray) -> np.ndarray:
        """The two jittered corners ``[[x0, y0], [x1, y1]]`` of the bounding box of ``foreground``."""
        rows, cols = np.nonzero(foreground)
        box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], np.float32)
        width, height = box[2] - box[0], box[3] - box[1]
        reach = np.minimum(np.array([width, height, width, height]) * self.box_noise, self.box_noise_bound)
        box = box + self.R.uniform(-1.0, 1.0, size=4).astype(np.float32) * reach
        bounds = np.array([foreground.shape[1], foreground.shape[0]] * 2, np.float32) - 1.0
        return np.clip(box, 0.0, bounds).reshape(2, 2)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """
        Args:
            data: item holding a ``(C, H, W)`` label (and optionally a ``(1, H, W)`` field of view).

        Returns:
            a copy of ``data`` with ``point_coords`` ``(N, 2)`` float32, ``point_labels`` ``(N,)`` int64 and
            ``ignored_points`` ``(N,)`` bool added.

        Raises:
            KeyError: when the label is absent.
            ValueError: when ``channel`` is not a channel of the label.
        """
        result = dict(data)
        label = np.asarray(torch.as_tensor(data[self.label_key]).detach().cpu())
        if not 0 <= self.channel < label.shape[0]:
            raise ValueError(f"prompt channel {self.channel} is not in the label of shape {label.shape}")
        foreground = label[self.channel] > 0.5
        if self.fov_key in data:
            inside = np.asarray(torch.as_tensor(data[self.fov_key]).detach().cpu())[0] > 0.5
        else:
            inside = np.ones_like(foreground)
        coords = np.zeros((self.num_slots, 2), np.float32)
        labels = np.full(self.num_slots, POINT_PADDING, np.int64)
        self.randomize()
        if self._do_transform:
            slot = 0
            if self.num_positive and foreground.any():
                core = foreground
                if self.erosion_radius:
                    eroded = ndimage.binary_erosion(foreground, iterations=self.erosion_radius)
                    core = eroded if eroded.any() else foreground
                coords[: self.num_positive] = self._points(np.argwhere(core), self.num_positive)
                labels[: self.num_positive] = POINT_POSITIVE
            slot += self.num_positive
            background = inside & ~foreground
            if self.num_negative and background.any():
                coords[slot : slot + self.num_negative] = self._points(np.argwhere(background), self.num_negative)
                labels[slot : slot + self.num_negative] = POINT_NEGATIVE
            slot += self.num_negative
            if self.use_box and foreground.any():
                coords[slot : slot + 2] = self._box(foreground)
                labels[slot : slot + 2] = (BOX_TOP_LEFT, BOX_BOTTOM_RIGHT)
        ignored = labels == POINT_PADDING
        ignored[0] &= not ignored.all()
        result[self.coords_key] = torch.from_numpy(coords)
        result[self.labels_key] = torch.from_numpy(labels)
        result[self.ignored_key] = torch.from_numpy(ignored)
        return result

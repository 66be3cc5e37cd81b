"""How the bundle runs its network over a photograph: the whole picture resized to the network's side, or windows at a
chosen pixel scale, skipping those that see no retina; with the SAM head, prompts too.

``input_mode="resize"`` (the SAM2LoRA paper's protocol) squeezes every photograph into one ``image_size`` square.
``"sliding_window"`` keeps the photograph at ``pixel_scale`` times its own resolution (1.0: native) and runs the
network on ``image_size`` windows with MONAI's sliding-window inference and Gaussian blending, so capillaries keep
the width they had in training crops; windows wholly outside the field of view are not computed.

Prompts (:mod:`scripts.prompts`) need the SAM head and ``"resize"``. The image encoder runs once per image, whatever
the number of prompts decoded from it, and an image's prompts are decoded together, the shorter ones padded with
points the decoder ignores (:mod:`scripts.token_attention`): an evaluation over the paper's eight prompt modes
costs one encoder pass and two calls of the small mask decoder per image (the prompt-free one, then one for all
prompted modes), not eight.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer

from scripts.atomic import write_json_atomic
from scripts.engines import unwrap_network
from scripts.errors import ConfigError, is_real_number
from scripts.fundus_io import UNREADABLE_KEY
from scripts.inputs import check_settings
from scripts.prompts import (
    AUTO_MODES,
    ORACLE_MODES,
    POINT_PADDING,
    PROMPT_EROSION_PX,
    PROMPT_SOURCES,
    PROMPTS_RECORD_FORMAT,
    Prompt,
    auto_prompts,
    check_prompt_modes,
    oracle_prompts,
    parse_prompt,
)

__all__ = ["INPUT_MODES", "FundusInferer", "check_input_mode", "window_fit"]

INPUT_MODES = ("resize", "sliding_window")

# The logit given to pixels only skipped windows cover: certainly background after the sigmoid (about 2e-9).
BACKGROUND_LOGIT = -20.0


def check_input_mode(input_mode: str, pixel_scale: float = 1.0) -> str:
    """``input_mode`` if it and ``pixel_scale`` can be used.

    Raises:
        ConfigError: an unknown mode, or a scale that is not a positive number.
    """
    if input_mode not in INPUT_MODES:
        raise ConfigError(f"Setting 'input_mode' must be one of {', '.join(INPUT_MODES)}; got {input_mode!r}.")
    if not (is_real_number(pixel_scale) and pixel_scale > 0):
        raise ConfigError(f"Setting 'pixel_scale' must be a positive number (1.0: native resolution); got {pixel_scale!r}.")
    return input_mode


def _smaller_than_window(size: str, image_size: int, trained: bool) -> str:
    if trained:  # the window and the scale are the trained model's: only the photograph or the model can change
        return (
            f"{size} is smaller than the model's {image_size}-pixel window (it was trained on windows cut at that "
            "scale): enlarge the photograph, or segment it with a model trained with input_mode 'resize'"
        )
    return (
        f"{size} is smaller than the {image_size}-pixel window: lower image_size, raise pixel_scale, or use "
        "input_mode 'resize'"
    )


def window_fit(
    input_mode: str, image_size: int, pixel_scale: float = 1.0, trained: bool = False
) -> Callable[[tuple[int, int]], str | None]:
    """A check of a photograph's ``(height, width)`` before it is read for segmenting: why it cannot be segmented in
    this input mode (smaller than one window once scaled, as ``Zoomd`` scales: floor of side x scale), or None.

    An image folder leaves such photographs out and names them after the run (:class:`scripts.inputs.ImageFolder`),
    so one of them does not stop the others.

    Args:
        input_mode: ``"resize"`` or ``"sliding_window"``.
        image_size: the window's side.
        pixel_scale: the scale photographs are read at.
        trained: the three settings are a trained model's (inference, evaluation), which a run cannot change: the
            advice is then about the photograph or the model; otherwise (training) about the settings.

    Returns:
        the check: why a photograph of that size does not fit, or None.
    """

    def misfit(size: tuple[int, int]) -> str | None:
        height, width = size
        if input_mode != "sliding_window" or min(math.floor(side * pixel_scale) for side in size) >= image_size:
            return None
        return _smaller_than_window(f"{width}x{height} pixels at pixel_scale {pixel_scale}", image_size, trained)

    return misfit


def _file_paths(inputs: Any) -> list[str]:
    """The files of a batch, as its MetaTensor's metadata names them (empty without it)."""
    files = getattr(inputs, "meta", {}).get("filename_or_obj", [])
    # One image given without a collated batch (MONAI Label adds the batch axis itself) names one file.
    files = [files] if isinstance(files, (str, os.PathLike)) else files
    return [str(path) for path in files]


def _file_names(inputs: Any) -> list[str]:
    """The file names of a batch, from the metadata of its MetaTensor (empty without it)."""
    return [Path(path).name for path in _file_paths(inputs)]


def _stand_ins(inputs: Any) -> list[bool]:
    """Which items of a batch stand in for a photograph that could not be read at its turn
    (:class:`scripts.inputs.FolderDataset`): their prompts are not recorded, since nothing is segmented for them."""
    reasons = getattr(inputs, "meta", {}).get(UNREADABLE_KEY, [])
    reasons = [reasons] if isinstance(reasons, str) else list(reasons)
    return [bool(reason) for reason in reasons] or [False] * len(_file_names(inputs))


def _check_prompts_fit(input_mode: str, compiled: bool) -> None:
    if input_mode != "resize":
        raise ConfigError("Prompts need input_mode 'resize': windows are segmented without prompts.")
    if compiled:
        # MONAI's engines hand a compiled network's inputs over without their metadata, which names each image
        # and its size: the prompts could not be told apart. The prompted pass runs uncompiled anyway.
        raise ConfigError("Prompts need compile false: runs with prompts or prompt modes are not compiled.")


class FundusInferer(Inferer):
    """The bundle's inferer for both input modes; MONAI engines call it as ``inferer(images, network, **kwargs)``.

    Prompts: ``prompt_modes`` (evaluation: several modes per image, oracle ones drawn from the ``label`` the engine
    passes; the logits of the modes are stacked mode-major along the channels, see
    :func:`scripts.prompts.mode_channel_names`) or ``prompts`` and ``prompt_source`` (inference: an image's own
    prompt, else the source's). Attached to the engine as a handler, it writes the prompts it used, in each
    photograph's pixels, to ``prompts_file`` when the run completes.

    Args:
        input_mode: ``"resize"`` (the images already have the network's side: one forward pass) or
            ``"sliding_window"`` (windows of ``image_size``).
        image_size: the window side.
        out_channels: the network's output channels (the logits skipped windows get).
        overlap: the windows' overlap, in ``[0, 1)``.
        window_batch_size: windows computed together.
        pixel_scale: the scale the images were brought to (only named in error messages).
        prompt_modes: evaluation prompt modes (:data:`scripts.prompts.PROMPT_MODES`).
        prompts: inference: image file name to its prompt (:func:`scripts.prompts.read_prompts_file`).
        prompt_source: inference: ``none``, ``auto_box`` or ``auto_points`` for images without a prompt.
        seed: seeds the oracle prompts, with each image's name (not the mode: the modes are nested, each adding to
            the points of the one before).
        auto_box_margin: margin of ``auto_box``, a fraction of the box's size.
        auto_points: positive points of ``auto_points``.
        auto_negative_points: negative points of ``auto_points``.
        prompts_file: where the prompts used are written (None: not written).
        backend: runs the prompt-free network instead of PyTorch, called as ``backend(images, network)``, leaving
            SAM's predicted IoU, if it has one, in its ``latest_iou_predictions`` as the network does
            (:func:`scripts.onnx_backend.inference_backend`; None: PyTorch). Prompts need PyTorch.
        compiled: the engine compiles the network (its ``compile`` setting); prompts need it uncompiled.

    Raises:
        ConfigError: a setting out of its range, or prompts with a setting they cannot run with (``sliding_window``,
            a backend other than PyTorch, ``compiled``).

    Attributes:
        windows_total: windows of the images seen so far (sliding window).
        windows_computed: those actually computed, the others lying wholly outside the field of view.
        last_iou: SAM's predicted IoU of the latest batch's outputs (B, channels), None for the U-Net head and windows.
        prompts_used: image to mode to the prompt used, in the photograph's pixels; the image by its file name in
            inference (as prompts files name it), by its path with ``prompt_modes`` (evaluation: pooled datasets may
            number their photographs alike; ``metrics_per_image.csv`` names it so).
    """

    def __init__(
        self,
        input_mode: str = "resize",
        image_size: int = 1024,
        out_channels: int = 1,
        overlap: float = 0.25,
        window_batch_size: int = 4,
        pixel_scale: float = 1.0,
        prompt_modes: Sequence[str] = ("none",),
        prompts: Mapping[str, Prompt] | None = None,
        prompt_source: str = "none",
        seed: int = 0,
        auto_box_margin: float = 0.1,
        auto_points: int = 3,
        auto_negative_points: int = 0,
        prompts_file: str | os.PathLike | None = None,
        backend: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
        compiled: bool = False,
    ) -> None:
        super().__init__()
        self.input_mode = check_input_mode(input_mode, pixel_scale)
        check_settings(
            window_overlap=overlap,
            auto_box_margin=auto_box_margin,
            auto_points=auto_points,
            auto_negative_points=auto_negative_points,
        )
        self.prompt_modes = check_prompt_modes(prompt_modes)
        if prompt_source not in PROMPT_SOURCES:
            raise ConfigError(f"Setting 'prompt_source' must be one of {', '.join(PROMPT_SOURCES)}; got {prompt_source!r}.")
        self.prompts = dict(prompts or {})
        self.prompt_source = prompt_source
        self.prompted = self.prompt_modes != ["none"] or bool(self.prompts) or prompt_source != "none"
        self.compiled = compiled
        if self.prompted:
            _check_prompts_fit(input_mode, compiled)
        if self.prompted and backend is not None:
            raise ConfigError("Prompts need backend 'torch': the onnxruntime export is the prompt-free network alone.")
        self.backend = backend
        self.seed = seed
        self.auto = {"box_margin": auto_box_margin, "points": auto_points, "negative_points": auto_negative_points}
        self.prompts_file = Path(prompts_file) if prompts_file is not None else None
        self.prompts_used: dict[str, dict[str, Any]] = {}
        self.last_iou: torch.Tensor | None = None
        self.image_size = image_size
        self.out_channels = out_channels
        self.pixel_scale = pixel_scale
        self.windows = SlidingWindowInferer(
            roi_size=(image_size, image_size), sw_batch_size=window_batch_size, overlap=overlap, mode="gaussian"
        )
        self.windows_total = 0
        self.windows_computed = 0

    def with_prompts(
        self, prompts: Mapping[str, Any], sizes: Mapping[str, tuple[int, int]], source: str
    ) -> FundusInferer:
        """A copy of this inferer that segments the named images with these prompts (one request of an interactive
        client such as MONAI Label), leaving this one, which may serve other requests, as it is.

        Args:
            prompts: image file name to its prompt in the prompts file's form (:func:`scripts.prompts.parse_prompt`),
                in the photograph's pixels.
            sizes: image file name to the photograph's ``(height, width)``.
            source: where the prompts come from, for messages.

        Raises:
            PromptError: a malformed prompt or coordinates outside the image.
            ConfigError: windows (``sliding_window``) and a compiled network are run without prompts.
        """
        _check_prompts_fit(self.input_mode, self.compiled)
        parsed = {name: parse_prompt(value, f"{source}, image {name}", sizes[name]) for name, value in prompts.items()}
        prompted = copy.copy(self)
        prompted.backend = None  # prompts need the PyTorch network's decoder, whatever runs the automatic task
        prompted.prompts = {**self.prompts, **parsed}
        prompted.prompted = True
        prompted.prompts_used = {}
        return prompted

    def attach(self, engine: Engine) -> None:
        """Write the record of the prompts used when ``engine`` completes, if there is a ``prompts_file``.

        A prompt-free run writes it too (no image in it): an earlier run's record left in the output folder would
        otherwise name prompts this run never used.

        Args:
            engine: the engine running this inferer.
        """
        if self.prompts_file is not None:
            engine.add_event_handler(Events.COMPLETED, self.write_prompts)

    def write_prompts(self, _: Engine | None = None) -> None:
        """Write the prompts used, per image and mode, to ``prompts_file`` (:data:`PROMPTS_RECORD_FORMAT`)."""
        write_json_atomic(self.prompts_file, {"format": PROMPTS_RECORD_FORMAT, "images": self.prompts_used})

    def __call__(
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        *args: Any,
        fov: Any = None,
        label: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Logits for ``inputs`` (B, 3, H, W).

        Args:
            inputs: the images, resized (``resize``) or scaled (``sliding_window``); a MetaTensor whose metadata
                name the files and their own sizes when prompts are used.
            network: the network.
            args: passed on to the network.
            fov: (B, 1, H, W) field of view; windows where it is all zero are skipped (sliding window).
            label: (B, C, H0, W0) reference masks at the photographs' size, for oracle prompt modes.
            kwargs: passed on to the network.

        Raises:
            ConfigError: an image smaller than a window (sliding window), or oracle modes without a label.
        """
        self.last_iou = None
        if self.prompted:
            return self._prompted(inputs, network, label, fov)
        if self.backend is not None:
            network = _BackendNetwork(self.backend, network)
        if self.input_mode == "resize":
            logits = network(inputs, *args, **kwargs)
            # The PyTorch network's, or the backend's through _BackendNetwork: the same (B, C) tensor either way.
            self.last_iou = getattr(unwrap_network(network), "latest_iou_predictions", None)
            return logits
        height, width = inputs.shape[-2:]
        if min(height, width) < self.image_size:
            names = ", ".join(_file_names(inputs)) or "An image"
            size = f"{width}x{height} pixels after pixel_scale {self.pixel_scale}"
            raise ConfigError(f"{names}: {_smaller_than_window(size, self.image_size, trained=True)}.")
        if fov is None:
            return self.windows(inputs, network, *args, **kwargs)
        inside_fov = _WindowsInsideFov(network, self)
        # MONAI cuts a `condition` tensor of the images' shape into the same windows and hands each window's part over.
        condition = torch.as_tensor(fov).to(inputs).expand_as(inputs)
        return self.windows(inputs, inside_fov, *args, condition=condition, **kwargs)


    def _prompted(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], label: Any, fov: Any
    ) -> torch.Tensor:
        model = unwrap_network(getattr(network, "_orig_mod", network))
        names = _file_names(inputs)
        recorded_as = _file_paths(inputs) if self.prompt_modes != ["none"] else names
        sizes = [tuple(int(v) for v in size) for size in torch.as_tensor(inputs.meta["spatial_shape"]).reshape(-1, 2)]
        side = tuple(inputs.shape[-2:])
        embeddings = model.encode_images(inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs)
        free = model.decode(embeddings)
        logits, ious = [], []
        for index, (name, record, size, stand_in) in enumerate(zip(names, recorded_as, sizes, _stand_ins(inputs))):
            one = type(embeddings)(
                embeddings.image_embedding[index : index + 1],
                None if embeddings.high_res_features is None else tuple(h[index : index + 1] for h in embeddings.high_res_features),
                embeddings.input_size,
            )
            used = {} if stand_in else self.prompts_used.setdefault(record, {})
            prompts = self._prompts(self._modes_for(name), name, size, side, free.logits[index], label, fov, index)
            decoded = _decode_prompts_together(model, one, prompts, size, side, inputs.device)
            for mode, prompt in prompts.items():
                used[mode] = prompt.to_json()
                output = decoded.get(mode)
                logits.append(free.logits[index : index + 1] if output is None else output[0])
                ious.append(free.iou_predictions[index : index + 1] if output is None else output[1])
        modes = len(self._modes_for(names[0]))
        self.last_iou = torch.cat(ious).reshape(len(names), -1)
        return torch.cat(logits).reshape(len(names), modes * self.out_channels, *side)

    def _modes_for(self, name: str) -> list[str]:
        if self.prompt_modes != ["none"]:
            return self.prompt_modes
        return ["given" if name in self.prompts else self.prompt_source]

    def _prompts(
        self,
        modes: list[str],
        name: str,
        size: tuple[int, int],
        side: tuple[int, int],
        free: torch.Tensor,
        label: Any,
        fov: Any,
        index: int,
    ) -> dict[str, Prompt]:
        """``{mode: prompt}`` of one image, in the photograph's pixels, in the order of ``modes``.

        What several modes share (the reference's eroded core, the first pass's largest component) is computed once.
        ``fov`` (B, 1, H, W), at the network's size as ``free``, keeps automatic negative points on the retina.
        """
        prompts: dict[str, Prompt] = {}
        auto = [mode for mode in modes if mode in AUTO_MODES]
        if auto:
            probability = torch.sigmoid(free[0].float()).cpu().numpy()
            retina = None if fov is None else torch.as_tensor(fov[index, 0]).detach().cpu().numpy() > 0.5
            drawn = auto_prompts(probability, auto, fov=retina, **self.auto)
            prompts.update({mode: prompt.rescaled(side, size) for mode, prompt in drawn.items()})
        oracle = [mode for mode in modes if mode in ORACLE_MODES]
        if oracle:
            if label is None:
                raise ConfigError(f"Prompt mode {oracle[0]!r} draws its prompts from the reference mask: evaluate with labels.")
            reference = torch.as_tensor(label[index, 0]).detach().cpu().numpy() > 0.5
            # Training's erosion is in the network's pixels; the reference is at the photograph's size.
            scale = (size[0] / side[0] + size[1] / side[1]) / 2
            prompts.update(oracle_prompts(reference, oracle, name, self.seed, round(PROMPT_EROSION_PX * scale)))
        if "given" in modes:
            prompts["given"] = self.prompts[name]
        return {mode: prompts.get(mode, Prompt()) for mode in modes}


class _BackendNetwork:
    """The network as a backend runs it, called as the network is: the backend's logits of the images, carrying the
    images' metadata as the network's own output would, and its predicted IoU of them, kept as the PyTorch network
    keeps its own (``latest_iou_predictions``), so the measurements and quality flags do not depend on the backend.

    Args:
        backend: called as ``backend(images, network)``; after each call, its ``latest_iou_predictions`` (B, C), if
            it has one, is SAM's predicted IoU of those images (:class:`scripts.onnx_backend.OnnxBackend`).
        network: the PyTorch network the backend runs an export of.
    """

    def __init__(self, backend: Callable[[torch.Tensor, Any], torch.Tensor], network: Any) -> None:
        self.backend = backend
        self.network = network
        self.latest_iou_predictions: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The backend's logits (B, C, H, W) of ``images`` (B, 3, H, W), a MetaTensor if ``images`` is one."""
        logits = self.backend(images, self.network)
        self.latest_iou_predictions = getattr(self.backend, "latest_iou_predictions", None)
        if isinstance(images, MetaTensor) and not isinstance(logits, MetaTensor):
            logits = MetaTensor(logits)
            logits.is_batch = images.is_batch
            logits.copy_meta_from(images, copy_attr=not images.is_batch)
        return logits


def _decode_prompts_together(
    model: Any, embeddings: Any, prompts: dict[str, Prompt], size: tuple[int, int], side: tuple[int, int], device: Any
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{mode: (logits, iou predictions)}`` of one image's non-empty prompts, all in one decoder call.

    The mask decoder is launch-bound on a GPU, so the modes share one batched call: shorter prompts are padded to
    the longest with points the decoder's attention leaves out (:mod:`scripts.token_attention`), so each mode's
    answer is the one it would get alone.
    """
    sets = [(mode, prompt.to_network(size, side, device)) for mode, prompt in prompts.items() if not prompt.empty]
    if not sets:
        return {}
    length = max(arguments["point_labels"].shape[1] for _, arguments in sets)
    coords, labels, ignored = [], [], []
    for _, arguments in sets:
        given = arguments["point_labels"].shape[1]
        coords.append(F.pad(arguments["point_coords"], (0, 0, 0, length - given)))
        labels.append(F.pad(arguments["point_labels"], (0, length - given), value=POINT_PADDING))
        ignored.append(torch.arange(length, device=device)[None] >= given)
    output = model.decode(
        embeddings,
        point_coords=torch.cat(coords),
        point_labels=torch.cat(labels),
        prompts_per_image=len(sets),
        ignored_points=torch.cat(ignored),
    )
    return {
        mode: (output.logits[position : position + 1], output.iou_predictions[position : position + 1])
        for position, (mode, _) in enumerate(sets)
    }


class _WindowsInsideFov:
    """The network over a batch of windows, computed only for those with some field of view in them."""

    def __init__(self, network: Callable[..., torch.Tensor], counts: FundusInferer) -> None:
        self.network = network
        self.counts = counts

    def __call__(self, windows: torch.Tensor, *args: Any, condition: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        inside = condition.flatten(1).amax(dim=1) > 0.5
        self.counts.windows_total += len(windows)
        self.counts.windows_computed += int(inside.sum())
        if bool(inside.all()):
            return self.network(windows, *args, **kwargs)
        logits = windows.new_full((len(windows), self.counts.out_channels, *windows.shape[-2:]), BACKGROUND_LOGIT)
        if bool(inside.any()):
            logits[inside] = self.network(windows[inside], *args, **kwargs).to(logits.dtype)
        return logits

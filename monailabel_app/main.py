"""MONAI Label app serving the SAM2-LoRA fundus bundle: automatic and click-to-segment segmentation of a 2D fundus
photograph, and training on the labels that graders save to the datastore.

Why not MONAI Label's stock ``monaibundle`` sample app (measured with MONAI Label 0.8.5, see docs/monailabel.md):

- the bundle's inference postprocessing ends in a float probability map and the bundle's own file writer; MONAI
  Label's ITK writer refuses floats for PNG, and its ``Restored`` step and writer assume MONAI's ``(W, H)`` array
  layout for 2D images, whereas the bundle keeps the file's ``(H, W)``: labels would come back transposed;
- the label names come from ``metadata.json``'s ``channel_def`` with the channel index as label value, so the
  vessel label would have value 0, the background's;
- its train task runs the run id ``run`` (ours is ``training``), passes the device as a string where the bundle
  expects a ``torch.device``, replaces the datasets but not the datalist that the bundle's run record reads, and
  trains with the archive's default network settings (Hiera large at 1024 pixels) rather than those the served
  model was trained with;
- it downloads bundles it does not find locally from the model zoo, and Meta's SAM 2 checkpoint for its own
  interactive model;
- each task builds the bundle's network and serves a deep copy of it, keeping the original for reloads: with the
  click-to-segment model, three copies of the weights (Hiera-large: about 0.9 GB each).

This app reuses MONAI Label's bundle tasks and changes only those points. Bundles are read from
``<app>/model/<name>`` (default name ``sam2lora_fundus``, ``--conf models a,b`` for several): an extracted archive
of ``python -m tools.export --weights full`` (or ``merged``), which carries its own ``scripts`` package.

Results: ``POST /infer/<model>?image=<id>`` returns a PNG label of the image's width and height, values
0 = background and ``c + 1`` for channel ``c`` (vessels: 1; disc/cup: 1 = disc rim, 2 = cup), whatever the
image's format (a JPEG label would be lossy). ``POST /infer/<model>_interactive?image=<id>`` (SAM-head bundles)
does the same with the request's ``foreground``/``background`` clicks and ``roi`` box as the image's prompt.
``POST /train/<model>`` fine-tunes ``models/model.pt`` on the images
that have a ``final`` label in the datastore and replaces it (``model_best.pt`` keeps the best validation Dice); the
labels are those ``/infer`` returns, corrected (a disc/cup label is split into one mask per channel for the bundle).
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import monailabel
import numpy as np
import torch
from fastapi import HTTPException
from monai.bundle import ConfigParser
from monai.bundle.config_item import ConfigExpression
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.class_utils import unload_module
from monailabel.utils.others.generic import device_list, name_to_device, strtobool
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sam2lora_fundus"
# The click-to-segment model of a bundle is served as <bundle name><suffix>.
INTERACTIVE_SUFFIX = "_interactive"
# The network settings a served model was trained with, which fine-tuning it must keep; the model file records them
# (the bundle's train.json holds only defaults).
NETWORK_SETTINGS = (
    "architecture",
    "channel_names",
    "model_size",
    "image_size",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "finetune",
)
# The bundle's errors (by class name: MONAI Label loads each bundle's `scripts` anew) that a request's input causes,
# answered as client errors; its other errors (a full disk, missing base weights) are the server's.
REQUEST_ERRORS = ("FundusImageError", "PromptError", "ModelFileError")
# Transforms of the bundle's postprocessing that write files of their own (the bundle's prediction writer, by
# class name because its class lives in the bundle's `scripts` package, which MONAI Label reloads per bundle).
FILE_WRITERS = ("SaveImaged", "SaveFundusPredictiond")
# Train request settings passed to the bundle's train.json as they are, with the bundle's defaults.
TRAIN_SETTINGS = ("learning_rate", "batch_size", "accumulation_steps", "val_interval", "num_workers")
# Train request settings MONAI Label itself reads as numbers.
TRAIN_NUMBERS = ("max_epochs", "val_split")
# Train request settings MONAI Label passes on as text (the last three into train.json as overrides, whole: a
# list's items would be parsed as config values too); model_filename may be a list, whose first item it takes.
TRAIN_TEXTS = ("run_id", "model_filename", "tracking_uri", "tracking_experiment_name", "tracking_run_name")
# What MONAI's config parser reads in a string that starts with it: Python to evaluate, a reference, a macro.
CONFIG_SYNTAX = ("$", "@", "%")
# A label is always a lossless PNG of uint8 values, whatever the image's format or the request.
RESULT_FORMAT = {"result_extension": ".png", "result_dtype": "uint8"}
# Label files the bundle's loader reads (scripts.fundus_io, lossless formats only).
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".gif", ".bmp", ".ppm", ".pgm", ".pnm")
# The structures, outer first, that one label of several channels holds: /infer writes the last channel present
# (FundusLabeld) and training reads channel c as every value from c + 1 up (split_label), which gives back every
# channel only when each lies inside the one before it, as the optic cup lies inside the disc.
NESTED_STRUCTURES = ("disc", "cup")
# Where the train task of a bundle of several channels writes the one mask per channel that the bundle reads, split
# from each final label, under the bundle's eval folder beside its datalist (eval/monailabel_datalist.json).
SPLIT_LABELS = "monailabel_labels"


def bundle_init_error(bundle: str | os.PathLike, error: Exception) -> MONAILabelException:
    """The start-up error for a bundle whose config refused to resolve: the bundle's own message (the cause MONAI's
    config parser wraps), in one line."""
    cause = error.__cause__ or error
    return MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"Bundle {bundle}: {str(cause).splitlines()[-1]}")


def bundle_error(error: BaseException | None) -> BaseException | None:
    """The bundle's own error (its message names the file and the fix) in ``error``'s chain of causes, if any.

    The bundle's ``scripts.errors.user_error`` finds it by class, but MONAI Label loads each bundle's ``scripts``
    anew, so the app finds it by the name of the bundle's base class.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if any(kind.__name__ == "FundusError" for kind in type(error).__mro__):
            return error
        error = error.__cause__
    return None


def conf_flag(conf: Mapping[str, str], key: str) -> bool:
    """A yes/no ``--conf`` setting, read as MONAI Label reads its own (``preload``): true/false, yes/no, 1/0, on/off.

    Raises:
        MONAILabelException: another value.
    """
    try:
        return strtobool(conf.get(key, "false"))
    except ValueError:
        raise MONAILabelException(
            MONAILabelError.APP_INIT_ERROR, f"--conf {key} must be true or false, got {conf[key]!r}."
        ) from None


def served_network_settings(bundle: Path) -> dict[str, Any]:
    """The settings the served model file records, read as the bundle's inference.json reads them (its
    ``trained_settings``, with the bundle's own ``scripts``), including those its workflow recorded (input mode);
    both tasks read them at start-up, so a model whose channels a label cannot hold is refused there
    (:func:`check_label_channels`).

    Raises:
        MONAILabelException: the model file is missing or records no settings (not a model of this bundle), or its
            channels are several and not the disc then the cup.
    """
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    sys.path.insert(0, str(bundle))
    unload_module("scripts")
    try:
        trained = parser.get_parsed_content("trained_settings")
        # Which structure a channel holds, by the bundle's own reading of its name ('OD' is the disc), from the
        # scripts the parser has just loaded.
        structure_of = importlib.import_module("scripts.measurements").structure_of
    except Exception as error:  # the bundle's own error (missing or foreign model file), wrapped by the parser
        raise bundle_init_error(bundle, error) from None
    finally:
        sys.path.remove(str(bundle))
    settings = {**{key: trained[key] for key in NETWORK_SETTINGS}, **trained.get("recorded", {})}
    check_label_channels(bundle, settings["channel_names"], structure_of)
    return settings


def check_label_channels(
    bundle: Path, channel_names: Sequence[str], structure_of: Callable[[str], str | None]
) -> None:
    """Refuse a model of several channels that one label cannot hold: each channel must lie inside the one before
    it (:data:`NESTED_STRUCTURES`), or the label hides a channel and training on saved labels reads wrong masks
    (``['cup', 'disc']``: the disc drawn over the cup, and the cup read as the whole disc).

    Args:
        bundle: the bundle folder, named in the error.
        channel_names: the served model's channels, in order.
        structure_of: the bundle's ``scripts.measurements.structure_of``.

    Raises:
        MONAILabelException: the channels are several and not the disc then the cup.
    """
    structures = [structure_of(name) for name in channel_names]
    if len(channel_names) < 2 or tuple(structures) == NESTED_STRUCTURES:
        return
    found = ", ".join(f"{name!r} ({structure or 'no structure known by this name'})"
                      for name, structure in zip(channel_names, structures))
    raise MONAILabelException(
        MONAILabelError.APP_INIT_ERROR,
        f"Bundle {bundle}: the model's channels are, in this order, {found}, but a MONAI Label label holds one value "
        "per pixel, that of the last channel present, which keeps every channel only when each lies inside the one "
        f"before it: the app serves a model of one channel, or of {' then '.join(NESTED_STRUCTURES)} (channel_names "
        f"{list(NESTED_STRUCTURES)}, or other names of theirs, e.g. 'OD', 'OC'). Segment with this model through "
        "`python -m monai.bundle run inference` (one mask per channel), or train one with such channels.",
    )


class FundusLabeld:
    """Probability maps ``(C, H, W)`` to one uint8 label image laid out as MONAI Label's writer expects.

    Label values: 0 background, ``c + 1`` where channel ``c`` is the highest channel at or above ``threshold``
    (nested structures: optic disc 1, cup 2, the only several channels the app serves, :func:`check_label_channels`),
    each channel counted only inside the one before it, its holes filled (a cup pixel outside the disc is
    background; one in a hole of a ring-shaped disc is cup), as the bundle's
    own prediction writer labels them (``scripts.masks.binarise``, ``scripts.writers.label_map``; the app loads a
    bundle's scripts only inside its tasks). The result is transposed to ``(W, H)``: MONAI Label keeps 2D images in MONAI's
    ITK-reader layout and its writer transposes back when writing, whereas the bundle's loader keeps the file's
    ``(H, W)``.

    Args:
        key: the probability map, already brought back to the image's size (the bundle's ``Invertd``).
        threshold: probability from which a pixel belongs to a structure (the bundle's ``threshold``).
    """

    def __init__(self, key: str, threshold: float) -> None:
        self.key = key
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        probabilities = d[self.key]
        probabilities = probabilities.detach().cpu().numpy() if torch.is_tensor(probabilities) else probabilities
        probabilities = np.asarray(probabilities, dtype=np.float32)
        if probabilities.ndim != 3:
            raise ValueError(f"Expected a (C, H, W) probability map, got shape {probabilities.shape}.")
        labels = np.zeros(probabilities.shape[1:], dtype=np.uint8)
        for channel, probability in enumerate(probabilities):
            inside = labels == channel if channel == 0 else ndimage.binary_fill_holes(labels == channel)
            labels[(probability >= self.threshold) & inside] = channel + 1
        d[self.key] = np.ascontiguousarray(labels.T)
        return d


class FundusInferTask(BundleInferTask):
    """Automatic segmentation with a served bundle: its own preprocessing, network and inversion, then a label.

    Args:
        path: the bundle folder.
        conf: the app's ``--conf`` settings.
    """

    def __init__(self, path: str, conf: dict[str, str], type: InferType = InferType.SEGMENTATION) -> None:
        # The onnxruntime backend serving the current model file: (file_identity, backend).
        self._served_backend: tuple[tuple[Any, ...], Any] | None = None
        # Held by a request from its first transform to its label: the served network is reloaded and merged in
        # place, and MONAI_LABEL_INFER_CONCURRENCY > 0 runs requests on a thread pool.
        self._serving = threading.Lock()
        # add_post_restore=False: MONAI Label's Restored assumes a channel axis and the (W, H) layout; the bundle's
        # Invertd already brings the prediction back to the image's size.
        super().__init__(path, conf, type=type, add_post_restore=False, load_strict=True)
        if not self.valid:
            return
        # A request is one image and no prompts file; the bundle reads a prompts file against its own image folder,
        # which the server does not have.
        self.bundle_config["user_prompts"] = {}
        for key, value in self._backend_settings(conf).items():
            self.bundle_config[key] = value
        self._check_inferer(path)
        self.network_settings = served_network_settings(Path(path))
        self.channel_names = list(self.network_settings["channel_names"])
        # Label value c + 1 for channel c, the values FundusLabeld writes (channel_def's index would give 0).
        self.labels = {name: index + 1 for index, name in enumerate(self.channel_names)}
        self.threshold = float(self.bundle_config.get("threshold", 0.5))
        if self.bundle_config.get("restrict_to_fov", False):
            logger.warning(f"{path}: restrict_to_fov is not applied to MONAI Label results (labels cover the image).")

    def _backend_settings(self, conf: Mapping[str, str]) -> dict[str, Any]:
        return backend_settings(conf)

    def __call__(self, request: Any, callbacks: Any = None) -> Any:
        """MONAI Label's inference of one request, with the bundle's own errors answered in one line instead of a bare
        HTTP 500: those of the request's input (an unreadable picture, bad clicks, a model file that is not a model)
        as client errors (422), the others (a full disk) as the server's (500, with the bundle's message)."""
        image = request.get("image") if isinstance(request, Mapping) else None
        if isinstance(image, str) and exif_turned(image):
            raise HTTPException(status_code=422, detail=turned_message(image))
        if isinstance(request, Mapping):
            problem = device_problem(request.get("device"))
            if problem:
                raise HTTPException(status_code=422, detail=problem)
            # Not settings of the request: a JPEG label would carry compression values (2 is the cup).
            request = {**request, **RESULT_FORMAT}
        with self._serving:
            try:
                return super().__call__(request, callbacks)
            except HTTPException:
                raise
            except Exception as error:
                own = bundle_error(error)
                if own is None:
                    raise
                status = 422 if type(own).__name__ in REQUEST_ERRORS else 500
                raise HTTPException(status_code=status, detail=str(own).splitlines()[0]) from None

    def _check_inferer(self, path: str) -> None:
        """Build the bundle's inferer now, so that a setting it refuses (``--conf backend``, ``onnx_int8``, a missing
        onnxruntime) stops the server at start-up with the bundle's own message rather than failing each request."""
        try:
            BundleInferTask.inferer(self)
        except Exception as error:  # the bundle's ConfigError, wrapped by MONAI's config parser
            raise bundle_init_error(path, error) from None

    def inferer(self, data: Any = None) -> Any:
        """The bundle's inferer; with the onnxruntime backend, one whose export follows the model file served.

        The bundle's backend exports the network at its first call and keeps that session, while a server's model
        file changes (training replaces it; a request may name another as ``model_filename``): a new backend is
        taken for each file and modification time, which reuses the export cached next to that file or rebuilds
        it (:class:`scripts.onnx_backend.OnnxBackend`).
        """
        inferer = super().inferer(data)
        backend = getattr(inferer, "backend", None)
        if backend is None:
            return inferer
        path = self._model_path(data)
        served = file_identity(path)
        if self._served_backend is None or self._served_backend[0] != served:
            self._served_backend = (served, backend.for_model(path))
        inferer = copy.copy(inferer)
        inferer.backend = self._served_backend[1]
        return inferer

    def post_transforms(self, data: Any = None) -> Sequence[Callable]:
        post = [t for t in super().post_transforms(data) if type(t).__name__ not in FILE_WRITERS]
        return [*post, FundusLabeld(self.output_label_key, self.threshold)]

    def _get_network(self, device: Any, data: Any) -> Any:
        """The network serving ``device``, with the weights of the model file the request names, held once.

        MONAI Label's ``BasicInferTask`` keeps the network it was built with as a template and deep-copies it for
        every device it serves, so a CPU server would hold the weights twice (Hiera-large: about 0.9 GB each). Here
        the network built at start-up is the one served, and a model file that changed since it was loaded
        (training replaced it, or a request names another file of ``models/`` as ``model_filename``) is loaded into
        it in place; a request holds the task's lock (shared with the click task) from start to end, so none sees
        weights half replaced, whatever MONAI Label's concurrency. A second device gets a copy of its own.
        """
        path = self._model_path(data)
        loaded = file_identity(path)
        cached = self._networks.get(device)
        if cached is not None and cached[1] == loaded:
            return cached[0]
        if cached is not None:
            network = cached[0]
            logger.info(f"Reloading {path}: the file changed since it was loaded.")
        else:
            network = copy.deepcopy(self.network) if self._networks else self.network
            network.to(torch.device(device))
        state = self._read_state(path, device, network)
        try:
            network.load_state_dict(state, strict=self.load_strict)
        except BaseException:
            # Tensors that fit were copied before the error: the next request reloads every one of its file's.
            self._networks.pop(device, None)
            raise
        network.eval()
        # As the bundle's inference does (MergeAdapters): fold the adapters into the base weights, which is what
        # makes REST results equal to `monai.bundle run inference`. Loading restores the file's unmerged state.
        if hasattr(network, "merge_adapters"):
            network.merge_adapters()
        self._networks[device] = (network, loaded)
        return network

    def _read_state(self, path: str, device: Any, network: torch.nn.Module) -> dict[str, Any]:
        """The state dict of a model file, checked against the served network before anything is loaded into it.

        ``load_state_dict`` copies every tensor that fits before it reports those that do not, so a file of another
        network (``latest_checkpoint.pt``, which a request may name as ``model_filename``) would leave the served
        network half replaced.

        Raises:
            HTTPException: 422, the file cannot be read, or its tensors are not the served network's.
        """
        name = os.path.basename(path)
        advice = (
            "name a model.pt or model_best.pt trained with the served model's settings (latest_checkpoint.pt is a "
            "training checkpoint, which --resume continues from)"
        )
        try:
            checkpoint = torch.load(path, map_location=torch.device(device), weights_only=True)
        except Exception as error:  # damaged or unsafe files raise many kinds of errors inside torch.load
            detail = f"Model file {name} cannot be read ({type(error).__name__}): {advice}."
            raise HTTPException(status_code=422, detail=detail) from None
        state = checkpoint.get(self.model_state_dict, checkpoint) if isinstance(checkpoint, dict) else None
        expected = network.state_dict()
        if not isinstance(state, dict):
            raise HTTPException(status_code=422, detail=f"Model file {name} holds no state dict: {advice}.")
        missing = [key for key in expected if key not in state]
        unexpected = [key for key in state if key not in expected]
        reshaped = [
            key
            for key, value in expected.items()
            if isinstance(value, torch.Tensor) and isinstance(state.get(key), torch.Tensor)
            and state[key].shape != value.shape
        ]
        if missing or unexpected or reshaped:
            found = [
                f"{what} {len(keys)}, e.g. {keys[0]}"
                for what, keys in (("lacks", missing), ("holds others", unexpected), ("other shapes", reshaped))
                if keys
            ]
            detail = f"Model file {name} does not fit the served network ({'; '.join(found)}): {advice}."
            raise HTTPException(status_code=422, detail=detail)
        return state

    def _model_path(self, data: Any) -> str:
        """``models/model.pt``, or the file of ``models/`` a request names as ``model_filename`` (MONAI Label's option,
        listing the bundle's ``*.pt`` files, e.g. ``model_best.pt`` after training through MONAI Label)."""
        path = self.get_path()
        requested = (data or {}).get("model_filename")
        if isinstance(requested, list):
            requested = requested[0] if requested else None
        if requested:
            candidate = os.path.join(os.path.dirname(path), os.path.basename(str(requested)))
            if os.path.isfile(candidate):
                return candidate
            logger.warning(f"Ignoring model_filename {requested!r}: {candidate} does not exist; serving {path}.")
        return path


class FundusInteractiveTask(FundusInferTask):
    """Click-to-segment with a served SAM-head bundle: MONAI Label's ``foreground`` and ``background`` clicks and an
    optional ``roi`` box become the image's prompt, decoded as ``monai.bundle run inference --prompts_file`` decodes
    it; the response is the same label PNG as the automatic model's.

    Request fields, in the image's pixels (x: column from the left, y: row from the top, as MONAI Label's clients
    send them for 2D images; a third coordinate, the slice, must be 0): ``foreground`` ``[[x, y], ...]`` (positive
    points), ``background`` ``[[x, y], ...]`` (negative points), ``roi`` ``[x0, y0, x1, y1]``. No click and no box
    gives the prompt-free result.

    Args:
        path: the bundle folder.
        conf: the app's ``--conf`` settings.
        automatic: the bundle's automatic task, whose network this one shares (one copy of the weights in memory).
    """

    def __init__(self, path: str, conf: dict[str, str], automatic: FundusInferTask) -> None:
        # Set first: MONAI Label's `preload` setting asks for the network while the task is being built.
        self.automatic = automatic
        super().__init__(path, conf, type=InferType.DEEPGROW)
        self._serving = automatic._serving  # one network, one lock
        self.description = "Click-to-segment: foreground/background clicks and an optional ROI box as SAM 2 prompts"

    @staticmethod
    def accepts_prompts(settings: Mapping[str, Any]) -> bool:
        """Whether a model of these settings takes prompts: the SAM head on resized photographs."""
        return settings["architecture"] == "sam" and settings.get("input_mode", "resize") == "resize"

    def _load_bundle_config(self, path: str, config: str) -> ConfigParser:
        bundle_config = super()._load_bundle_config(path, config)
        # BundleInferTask builds the bundle's network for every task; requests here run the automatic task's, so
        # this task builds none (Hiera-large: 0.9 GB and its start-up time saved).
        bundle_config[self.const.key_network_def()] = "$None"
        return bundle_config

    def _backend_settings(self, conf: Mapping[str, str]) -> dict[str, Any]:
        # Prompts need the PyTorch decoder: clicks run PyTorch, whatever --conf backend says.
        return {"backend": "torch", "onnx_int8": False}

    def _get_network(self, device: Any, data: Any) -> Any:
        return self.automatic._get_network(device, data)

    def inferer(self, data: Any = None) -> Any:
        inferer = super().inferer(data)
        image = data[self.input_key]
        name = Path(str(image.meta["filename_or_obj"])).name
        size = tuple(int(value) for value in image.meta["spatial_shape"])
        try:
            return inferer.with_prompts({name: clicks_as_prompt(data)}, {name: size}, "MONAI Label request")
        except ValueError as error:  # the bundle's PromptError: names the image and the value
            raise HTTPException(status_code=422, detail=str(error)) from None


def exif_turned(path: str) -> bool:
    """Whether the picture at ``path`` carries an EXIF orientation that turns it (2 to 8, those PIL's
    ``exif_transpose`` applies, as the bundle's reader does); False where PIL cannot open it (the bundle's reader then
    names the problem)."""
    try:
        with Image.open(path) as picture:
            return picture.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9)
    except Exception:  # PIL raises many kinds for files it cannot open
        return False


def turned_message(path: str) -> str:
    return (
        f"{os.path.basename(path)} carries an EXIF orientation: MONAI Label's viewers show it as stored, while the "
        "bundle reads it turned upright, so labels and clicks would not line up with it. Save it upright (e.g. "
        "PIL.ImageOps.exif_transpose, or exiftool) and add it again."
    )


def file_identity(path: str) -> tuple[Any, ...]:
    """What tells one version of a model file from another: its path, inode, size and modification and change times
    in nanoseconds. The modification time alone is not enough: ``tools.export`` dates every archive entry
    2020-01-01, so a ``model.pt`` unzipped from another archive and moved over the served one keeps it."""
    status = os.stat(path)
    return path, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def clicks_as_prompt(request: Mapping[str, Any]) -> dict[str, Any]:
    """MONAI Label's click fields as a prompt in the bundle's prompts-file form (points ``[x, y, label]``, box).

    ``roi`` is ``[x0, y0, x1, y1]``, or MONAI Label's 3D form ``[x0, y0, x1, y1, z0, z1]`` (its SAM 2 task's) with a
    slice range that holds slice 0.

    Raises:
        HTTPException: 422, a field that is not a list of ``[x, y]`` points or a ``[x0, y0, x1, y1]`` box.
    """
    points = []
    for field, label in (("foreground", 1), ("background", 0)):
        # Only a missing field or null is no click: 0, false or "" is a mistake, not an empty list.
        clicks = request.get(field)
        clicks = [] if clicks is None else clicks
        if not isinstance(clicks, list):
            raise HTTPException(status_code=422, detail=f"'{field}' must be a list of [x, y] points; got {clicks!r}.")
        for click in clicks:
            well_formed = isinstance(click, list) and len(click) in (2, 3)
            # JSON's false equals 0 in Python: a slice given as false is no slice number.
            if not (well_formed and (len(click) == 2 or (click[2] == 0 and not isinstance(click[2], bool)))):
                raise HTTPException(
                    status_code=422, detail=f"'{field}' point {click!r}: a point of a 2D image is [x, y] (or [x, y, 0])."
                )
            points.append([*click[:2], label])
    prompt: dict[str, Any] = {"points": points}
    roi = request.get("roi")
    if roi is not None and roi != []:  # any other value is a box the bundle checks (0 or false is none)
        if isinstance(roi, list) and len(roi) == 6:
            slices = roi[4:]
            numbers = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in slices)
            if not (numbers and slices[0] <= 0 <= slices[1]):
                raise HTTPException(
                    status_code=422, detail=f"'roi' {roi!r}: a 2D image has slice 0 only; its slice range must hold 0."
                )
            roi = roi[:4]
        prompt["box"] = roi
    return prompt


def label_values_text(channel_names: Sequence[str]) -> str:
    """The label values of a bundle, as its ``/infer`` writes them: ``0 background, 1 disc, 2 cup``."""
    return ", ".join(["0 background", *(f"{index + 1} {name}" for index, name in enumerate(channel_names))])


def read_label_map(path: str) -> np.ndarray:
    """A final label as saved to the datastore: its ``(H, W)`` integer values, turned upright as its EXIF
    orientation says (as the bundle's mask reader turns it).

    A palette PNG's values are its palette indices (an annotation tool's label map), not the luminance of its
    colours; a grey picture stored as RGB gives its grey values.

    Args:
        path: the label file.

    Returns:
        ``(H, W)`` array of the label's values.

    Raises:
        MONAILabelException: the file cannot be read, is a colour picture, or does not hold integer values.
    """
    try:
        with Image.open(path) as opened:
            picture = ImageOps.exif_transpose(opened)
            picture.load()
    except (OSError, UnidentifiedImageError) as error:
        raise MONAILabelException(
            MONAILabelError.INVALID_INPUT, f"Final label {path} cannot be read ({error}): save it again as a PNG."
        ) from None
    if picture.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        rgb = np.asarray(picture.convert("RGB"))
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"Final label {path} is a colour picture: a label is one grey index map; save it as /infer returns it.",
            )
        return rgb[..., 0]
    values = np.asarray(picture)
    if values.dtype == np.bool_:  # mode "1"
        return values.astype(np.uint8)
    if values.ndim != 2 or not np.issubdtype(values.dtype, np.integer):
        raise MONAILabelException(
            MONAILabelError.INVALID_INPUT,
            f"Final label {path} does not hold one integer value per pixel (PIL mode {picture.mode}): save it as "
            "/infer returns it, a uint8 PNG.",
        )
    return values


def split_label(path: str, channel_names: Sequence[str], folder: Path) -> list[str]:
    """One binary mask per channel from a final label, the list of mask files the bundle reads for a label of
    several channels (``label: [disc.png, cup.png]``).

    The label is an index map as :class:`FundusLabeld` writes it: 0 background and ``c + 1`` where channel ``c`` is
    the highest channel present. The structures of a multi-channel bundle are nested (the cup lies inside the
    disc), so channel ``c``'s mask is every pixel of value ``c + 1`` or above (disc: rim and cup; cup: value 2),
    which undoes FundusLabeld exactly. A bundle whose channels were not nested would need another reading, and
    FundusLabeld could not have written its overlaps either: the app refuses one at start-up
    (:func:`check_label_channels`).

    The masks are 0/255 PNGs, in which the bundle's reader (``scripts.fundus_io.read_label_mask``) takes values
    above 127 as foreground; a 0/1 mask would also read right, but 0/255 ones show as masks in any viewer.

    Args:
        path: the final label.
        channel_names: the bundle's channels, in order.
        folder: where the masks go, one subfolder per channel, each mask named after the label's image.

    Returns:
        the mask files, one per channel in channel order.

    Raises:
        MONAILabelException: the label cannot be read, or holds a value above the number of channels (a 0/255
            mask, or a label of another bundle).
    """
    values = read_label_map(path)
    found = np.unique(values)
    unexpected = found[(found < 0) | (found > len(channel_names))]
    if unexpected.size:
        shown = ", ".join(str(int(value)) for value in found[:12]) + (", ..." if found.size > 12 else "")
        raise MONAILabelException(
            MONAILabelError.INVALID_INPUT,
            f"Final label {path} holds the values {shown}, but a label of this bundle's {len(channel_names)} "
            f"channels holds only {label_values_text(channel_names)} (the values /infer returns; a 0/255 mask is "
            "not one): save it again with those values.",
        )
    paths = []
    for index, name in enumerate(channel_names):
        mask = folder / channel_folder(channel_names, index) / f"{Path(path).stem}.png"
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.where(values >= index + 1, 255, 0).astype(np.uint8)).save(mask)
        paths.append(str(mask))
    return paths


def channel_folder(channel_names: Sequence[str], index: int) -> str:
    """The folder name of channel ``index``'s masks: its name (``disc``), or ``channel_<index>`` where the name is not
    a plain file name (names hold no '/', as the bundle checks, but may hold spaces or be '..')."""
    name = channel_names[index]
    return name if re.fullmatch(r"\w[\w.-]*", name) else f"channel_{index}"


class FundusTrainTask(BundleTrainTask):
    """The bundle's ``train.json`` workflow on the datastore's labelled images, fine-tuning the served model.

    Args:
        path: the bundle folder.
        conf: the app's ``--conf`` settings.
    """

    def __init__(self, path: str, conf: dict[str, str]) -> None:
        super().__init__(path, conf, load_strict=True)
        if not self.valid:
            return
        self.network_settings = served_network_settings(Path(path))
        self._request: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        options = super().config()
        options["multi_gpu"] = False  # the bundle's multi_gpu_train.json is not wired for MONAI Label's torchrun
        options["max_epochs"] = 10
        options["val_split"] = 0.2
        options["run_id"] = "training"
        options["tracking"] = ["None", "mlflow"]
        for key in TRAIN_SETTINGS:
            default = self.bundle_config.get(key)
            # An expression (num_workers: one per core, at most 8) is the bundle's to evaluate with its own scripts,
            # which the app does not import: left empty, the bundle's default applies.
            options[key] = None if ConfigExpression.is_expression(default) else default
        return options

    def _fetch_datalist(self, request: dict[str, Any], datastore: Datastore) -> list[dict[str, Any]]:
        datalist = super()._fetch_datalist(request, datastore)
        if not datalist:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                "No image in the datastore has a final label: save corrected labels first "
                "(PUT /datastore/label?image=<id>&tag=final, or Submit Label in the viewer).",
            )
        turned = [entry["image"] for entry in datalist if exif_turned(entry["image"])]
        if turned:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"{len(turned)} images: {turned_message(turned[0])}")
        # The bundle reads 2D masks (PNG, TIFF...); a volume label (3D Slicer's default .nii.gz) would fail deep in
        # the data loader, so it is named here.
        unreadable = [entry["label"] for entry in datalist if not entry["label"].lower().endswith(LABEL_SUFFIXES)]
        channel_names = list(self.network_settings["channel_names"])
        if unreadable:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"{len(unreadable)} final labels are not 2D mask images ({', '.join(LABEL_SUFFIXES)}), e.g. "
                f"{unreadable[0]}; save labels as PNG ({label_values_text(channel_names)}).",
            )
        if len(channel_names) > 1:
            # A label of /infer is one index map (1 disc, 2 cup) where the bundle reads one mask file per channel:
            # split each into masks the bundle reads, written afresh so that no mask of an earlier run is trained on.
            folder = Path(self.bundle_path) / "eval" / SPLIT_LABELS
            shutil.rmtree(folder, ignore_errors=True)
            datalist = [{**entry, "label": split_label(entry["label"], channel_names, folder)} for entry in datalist]
        return datalist

    def _partition_datalist(self, datalist: list, request: dict[str, Any], shuffle: bool = False) -> tuple:
        train, validation = super()._partition_datalist(datalist, request, shuffle=shuffle)
        if not validation:
            # The bundle validates after every `val_interval` epochs and keeps the best model; with too few
            # labelled images for a split it validates on the training images (no estimate of generalisation).
            logger.warning("Too few labelled images for a validation split: validating on the training images.")
            validation = list(train)
        return train, validation

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        check_train_request(request)
        request = dict(request)
        if not request.get("run_id"):
            request["run_id"] = "training"
        self._request = request
        return super().__call__(request, datastore)

    def _load_checkpoint(self, model_pytorch: str, pretrained: bool, train_handlers: list[dict[str, Any]]) -> None:
        # MONAI Label asks os.path.exists(None) when a request sets "pretrained": false, a TypeError; without the
        # served model's weights, training starts from Meta's SAM 2 weights instead (_update_overrides).
        if pretrained:
            super()._load_checkpoint(model_pytorch, pretrained, train_handlers)

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        train = overrides.pop(self.const.key_train_dataset_data())
        validation = overrides.pop(self.const.key_validate_dataset_data(), None) or train
        # The bundle reads its splits (and describes them in the run record) from a datalist file.
        datalist = Path(self.bundle_path) / "eval" / "monailabel_datalist.json"
        datalist.parent.mkdir(parents=True, exist_ok=True)
        datalist.write_text(json.dumps({"training": train, "validation": validation}, indent=2) + "\n")
        overrides["datalist"] = str(datalist)
        # The served model's architecture. Its weights come from models/model.pt (CheckpointLoader below), so no
        # base checkpoint is needed (random_init only skips reading Meta's file); with "pretrained": false there is
        # no such loader and the bundle builds on Meta's SAM 2 checkpoint, which it names if it is missing.
        overrides.update(self.network_settings)
        handlers = overrides[self.const.key_train_handlers()]
        overrides["random_init"] = any(handler.get("_target_") == "CheckpointLoader" for handler in handlers)
        overrides["device"] = f"$torch.device({str(torch.device(overrides[self.const.key_device()]))!r})"
        overrides["max_epochs"] = overrides[self.const.key_train_trainer_max_epochs()]
        for key in TRAIN_SETTINGS:
            if self._request.get(key) not in (None, ""):
                overrides[key] = self._request[key]
        for handler in handlers:
            if handler.get("_target_") == "CheckpointLoader":
                handler.setdefault("map_location", "@device")  # a model saved on a GPU loads on a CPU server
        return overrides


def device_problem(value: Any) -> str | None:
    """Why a request's ``device`` is no device of this server, or None (absent: MONAI Label's default).

    Args:
        value: the request's ``device``: a name (``cpu``, ``cuda:0``, a GPU's name as ``/info`` lists it) or a list
            whose first item is one.
    """
    if value in (None, "", []):
        return None
    name = value[0] if isinstance(value, list) else value
    known = ", ".join(dict.fromkeys(["cpu", *device_list()]))  # a GPU server lists its GPUs only, and takes cpu too
    if not isinstance(name, str):
        return f"device {value!r} is not a device name: one of {known}."
    try:
        device = torch.device(name_to_device(name))
    except (RuntimeError, ValueError):
        return f"device {name!r} is not a device: one of {known}."
    usable = (device.type == "cpu" and device.index in (None, 0)) or (
        device.type == "cuda" and (device.index or 0) < torch.cuda.device_count()
    )
    return None if usable else f"device {name!r} is not a device of this server: one of {known}."


def check_train_request(request: Mapping[str, Any]) -> None:
    """Refuse the values of a train request that the bundle's config would not take as plain data.

    MONAI Label passes a request's settings on as overrides of ``train.json``, whose parser evaluates a string that
    starts with ``$`` as Python: a setting must be a number, a device name, a tracking choice or plain text.

    Raises:
        MONAILabelException: ``INVALID_INPUT``, naming the setting and its value.
    """

    def refuse(message: str) -> None:
        raise MONAILabelException(MONAILabelError.INVALID_INPUT, message)

    for key in TRAIN_SETTINGS + TRAIN_NUMBERS:
        value = request.get(key)
        empty = value is None or (key in TRAIN_SETTINGS and value == "")  # the bundle's default
        if not empty and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            refuse(f"Train setting '{key}' must be a number; got {value!r}.")
    problem = device_problem(request.get("device"))
    if problem:
        refuse(problem)
    tracking = request.get("tracking")
    tracking = tracking[0] if isinstance(tracking, list) and tracking else tracking
    if tracking not in (None, "", [], "None", "none", "mlflow"):
        refuse(f"Train setting 'tracking' must be mlflow or None; got {tracking!r}.")
    for key in TRAIN_TEXTS:
        value = request.get(key)
        text = value[0] if key == "model_filename" and isinstance(value, list) and value else value
        if text is None or text in ("", []):
            continue
        if not isinstance(text, str) or text.startswith(CONFIG_SYNTAX):
            syntax = ", ".join(CONFIG_SYNTAX)
            refuse(f"Train setting '{key}' must be plain text (not starting with {syntax}); got {text!r}.")
        if key == "model_filename" and os.path.basename(text) != text:
            refuse(f"Train setting 'model_filename' names a file of the bundle's models folder; got {text!r}.")


def backend_settings(conf: Mapping[str, str]) -> dict[str, Any]:
    """The bundle settings that ``--conf backend torch|onnxruntime`` and ``--conf onnx_int8 true|false`` give the
    automatic models (absent: the bundle's inference.json decides). The bundle checks the backend's name.

    Raises:
        MONAILabelException: ``onnx_int8`` is not a yes/no value.
    """
    settings: dict[str, Any] = {}
    if "backend" in conf:
        settings["backend"] = conf["backend"]
    if "onnx_int8" in conf:
        settings["onnx_int8"] = conf_flag(conf, "onnx_int8")
    return settings


class FundusApp(MONAILabelApp):
    """MONAI Label app for colour fundus photographs served by SAM2-LoRA bundles.

    ``--conf models <name>[,<name>...]``: bundle folders under ``<app>/model`` (default ``sam2lora_fundus``).
    ``--conf skip_trainers true``: inference only.
    ``--conf backend onnxruntime`` (``--conf onnx_int8 true``): the automatic models run the bundle's onnxruntime
    CPU backend (clicks run PyTorch).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.model_dir = Path(app_dir) / "model"
        names = [name.strip() for name in conf.get("models", DEFAULT_MODEL).split(",") if name.strip()]
        self.bundles = {name: self.model_dir / name for name in names}
        for name, folder in self.bundles.items():
            # No zoo download: a clinician's workstation serves only the archive it was given.
            if not (folder / "configs" / "inference.json").is_file():
                raise MONAILabelException(
                    MONAILabelError.APP_INIT_ERROR,
                    f"Bundle '{name}' not found: {folder} holds no configs/inference.json. Extract an archive of "
                    "`python -m tools.export --weights full` there (monailabel_app/serve.sh --bundle does it).",
                )
            if not (folder / "models" / "model.pt").is_file():
                raise MONAILabelException(
                    MONAILabelError.APP_INIT_ERROR,
                    f"Bundle '{name}' has no models/model.pt (an adapters-only archive?). MONAI Label loads full "
                    "weights: export with `python -m tools.export --weights full` (or merged).",
                )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"SAM2-LoRA fundus (MONAI Label {monailabel.__version__})",
            description="Retinal vessel / optic disc and cup segmentation of colour fundus photographs",
            version=monailabel.__version__,
        )

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's inference, with an image id the datastore lacks, or a model it does not serve, answered as a
        client error.

        MONAI Label 0.8.5 turns an unknown id into the image path ``""`` and runs the task on it, which fails deep in
        the bundle's reader (HTTP 500, ``image file not found: .``). Its own ``MONAILabelException`` gets no HTTP
        status of its own either (the server registers no handler for it: 500), so this raises FastAPI's
        ``HTTPException`` 404, as MONAI Label's datastore endpoints answer an image they do not hold.

        Raises:
            HTTPException: 404, ``image`` is neither a file on the server nor an image id of the datastore, or the
                ``model`` asked for is not served (MONAI Label's own answer is a bare 500).
        """
        model = request.get("model")
        if model and model not in self._infers:
            raise HTTPException(
                status_code=404,
                detail=f"No model '{model}' is served here (GET /info/ lists them: {', '.join(self._infers)}); a "
                f"bundle with the unet head or sliding-window input has no click-to-segment model "
                f"(<bundle>{INTERACTIVE_SUFFIX}).",
            )
        image = request.get("image")
        # MONAI Label reads an existing path as it is (an uploaded file, a session's image): only ids are looked up.
        is_id = isinstance(image, str) and bool(image) and not os.path.exists(image)
        if is_id and not (datastore or self.datastore()).get_image_uri(image):
            raise HTTPException(
                status_code=404,
                detail=f"Image '{image}' is not in the datastore: an image's id is its file name without the "
                "extension (GET /datastore/?output=all lists them); add the picture to the studies folder.",
            )
        return super().infer(request, datastore)

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, folder in self.bundles.items():
            task = FundusInferTask(str(folder), self.conf)
            if not task.is_valid():
                continue
            infers[name] = task
            if FundusInteractiveTask.accepts_prompts(task.network_settings):
                infers[f"{name}{INTERACTIVE_SUFFIX}"] = FundusInteractiveTask(str(folder), self.conf, task)
            else:
                logger.info(f"{name}: no click-to-segment model (prompts need the SAM head and input_mode 'resize').")
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        if conf_flag(self.conf, "skip_trainers"):
            return {}
        trainers: dict[str, TrainTask] = {}
        for name, folder in self.bundles.items():
            task = FundusTrainTask(str(folder), self.conf)
            if task.is_valid():
                trainers[name] = task
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        # Which image to label next: the first unlabelled one, or a random one.
        return {"first": First(), "random": Random()}

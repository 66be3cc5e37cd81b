"""What the bundle's two networks share: fine-tuning modes, the record of their settings, merging adapters, and the
small files that carry only what fine-tuning changed.

The networks (:class:`scripts.network.SAM2LoRA`, SAM 2's own mask decoder; :class:`scripts.unet.SAM2UNet`, MONAI's
U-Net decoder on the Hiera encoder) derive from :class:`AdaptedNetwork`. Their settings travel inside every saved
state dict (``_extra_state``, PyTorch's hook for module state that is not a tensor), so a ``model.pt`` says what it
is: loading it into a network built with other settings fails in one line naming both values, and inference,
evaluation, export and MONAI Label build the network from what the file records (:func:`read_model_settings`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scripts.atomic import save_torch_atomic
from scripts.errors import ConfigError, FundusError, hash_sign_hint, unreadable_torch_file
from scripts.lora import lora_modules, merge_lora, unmerge_lora

__all__ = [
    "ADAPTER_FORMAT",
    "FINETUNE_MODES",
    "MODEL_FORMAT",
    "AdaptedNetwork",
    "ModelFileError",
    "base_weights_source",
    "check_finetune",
    "check_fits",
    "frozen_weights_digest",
    "read_model_file",
    "read_model_settings",
    "tensor_state",
    "update_digest",
]

logger = logging.getLogger(__name__)

FINETUNE_MODES = ("lora", "lora+decoder", "full")
"""``lora``: the adapters train (and modules that have no pretrained weights); ``lora+decoder``: the whole decoder
too; ``full``: every weight, without adapters."""

MODEL_FORMAT = "sam2lora-model/1"
ADAPTER_FORMAT = "sam2lora-adapters/2"
CHECKPOINT_FORMAT = "sam2lora-training/1"  # a training run's resumable checkpoint (scripts.handlers.checkpoint)

# Settings that decide what trained weights mean; a model file must agree on each of them with the network it is
# loaded into. Others (LoRA dropout, speed switches, the fine-tuning mode of a further run) may differ.
DEFINING_SETTINGS = (
    "architecture",
    "model_size",
    "sam2_version",
    "image_size",
    "channel_names",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
)


class ModelFileError(FundusError, ValueError):
    """A model or adapter file cannot be used: missing, unreadable, not ours, or made with other settings."""


def _plain(value: Any) -> Any:
    """Settings as plain values (tuples as lists, floats that are whole as floats), comparable after a save."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _differences(recorded: Mapping[str, Any], own: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    return [
        f"{key}: trained with {recorded.get(key)!r}, this run sets {own.get(key)!r}"
        for key in keys
        if _plain(recorded.get(key)) != _plain(own.get(key))
    ]


def check_fits(recorded: Mapping[str, Any], own: Mapping[str, Any]) -> None:
    """Check that a run's network settings are those a trained model file records.

    Compared: the defining settings (:data:`DEFINING_SETTINGS`) that ``own`` holds, and the workflow settings the file
    records (input mode, pixel scale); a file written before a workflow recorded one of them says nothing about it.

    Args:
        recorded: the settings the file records (:func:`read_model_settings`).
        own: the run's settings, with its workflow settings under ``"recorded"``.

    Raises:
        ModelFileError: naming each differing setting with both values.
    """
    keys = [key for key in DEFINING_SETTINGS if key in own] + list(recorded.get("recorded", {}))
    differences = _differences(
        {**recorded, **recorded.get("recorded", {})}, {**own, **own.get("recorded", {})}, keys
    )
    if differences:
        raise ModelFileError(
            f"The trained model does not fit this run's settings ({'; '.join(differences)}): leave these settings "
            "unset to take the model's, or point --ckpt_path at a model trained with them."
        )


def read_model_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings a trained model file records (``model.pt`` or an adapter file), read without building a network.

    Args:
        path: a ``model.pt`` written by the bundle (a state dict, or a dict whose ``"model"`` entry is one) or an
            adapter file of :meth:`AdaptedNetwork.save_adapters`.

    Returns:
        The recorded settings: ``architecture``, ``model_size``, ``sam2_version``, ``image_size``, ``channel_names``,
        ``lora_rank``, ``lora_alpha``, ``lora_targets``, ``finetune`` and what the training workflow added.

    Raises:
        ModelFileError: the file is missing, unreadable (or unsafe: only tensors and plain values are read), or
            records no settings.
    """
    return read_model_file(path)[1]


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The content of a trained model file (read once) and the settings it records; see :func:`read_model_settings`.

    Returns:
        The file's content (the state dict of a ``model.pt``, or an adapter file's payload) and its settings.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(
            f"Trained model {path} does not exist{hash_sign_hint(path)}. Train one first (python -m monai.bundle run "
            "training ...) or point --ckpt_path at one; a downloaded bundle run from another folder needs --bundle_root "
            "<its folder>."
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged or unsafe files raise many kinds of errors inside torch.load
        raise ModelFileError(f"Trained model {path} cannot be read ({unreadable_torch_file(error)}).") from None
    if isinstance(content, dict) and content.get("format") == ADAPTER_FORMAT:
        state = content.get("settings")
    else:
        if isinstance(content, dict) and isinstance(content.get("model"), dict):
            content = content["model"]
        state = content.get("_extra_state") if isinstance(content, dict) else None
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        if isinstance(content, dict) and any(str(key).startswith("image_encoder.trunk.") for key in content):
            raise ModelFileError(
                f"{path} is a SAM 2 base checkpoint (Meta's weights), not a model trained with this bundle: give it "
                "as --base_checkpoint to train from, and a trained model.pt as --ckpt_path."
            )
        if isinstance(content, dict) and content.get("format") == CHECKPOINT_FORMAT:
            raise ModelFileError(
                f"{path} is a training run's checkpoint, which --resume continues from; the trained model is the "
                f"model.pt (or model_best.pt) the run writes next to it, in {path.parent}."
            )
        raise ModelFileError(
            f"Trained model {path} records no network settings: it is not a model of this bundle, or was written "
            "by a version before 0.2.0 (train it again)."
        )
    return content, {key: value for key, value in state.items() if key != "format"}


class AdaptedNetwork:
    """Mixin of the bundle's networks: a frozen pretrained base with LoRA adapters, and modules of their own.

    A subclass builds its modules, injects its adapters, loads Meta's weights, then calls
    :meth:`_configure_training` once. ``settings`` is the record saved with the weights.
    """

    settings: dict[str, Any]
    _base_keys: frozenset[str] = frozenset()
    # The base weights' digest taken before adapters were first merged into them, since merging and unmerging does
    # not give them back bit for bit; "" where they were loaded merged (unknowable); None: take it from the weights.
    _recorded_base_digest: str | None = None

    def _configure_training(
        self,
        finetune: str,
        base: str,
        decoder: nn.Module,
        new_modules: Sequence[nn.Module] = (),
        base_weights: str = "meta",
        never_run: Sequence[nn.Module | nn.Parameter] = (),
    ) -> None:
        """Choose what trains, and remember which weights are Meta's untouched ones.

        Args:
            finetune: one of :data:`FINETUNE_MODES`.
            base: the attribute path of the module holding Meta's weights (``"sam2"``, ``"encoder.trunk"``).
            decoder: the module ``lora+decoder`` trains whole.
            new_modules: modules without pretrained weights, which train in every mode.
            base_weights: where the base's weights come from, recorded with the model: ``"meta"`` (a checkpoint of
                Meta's), ``"random"`` (``lora`` then adapts noise: warned about) or ``"follows"`` (a trained model's,
                loaded next, whose record then replaces this one).
            never_run: parts of the base the network never runs (SAM 2's video memory, its object-score head),
                frozen in every mode: DistributedDataParallel waits for a gradient of every trainable weight in each
                step, and the trainable count is then what trains.
        """
        self.settings["base_weights"] = base_weights
        network: nn.Module = self  # type: ignore[assignment]
        network.requires_grad_(finetune == "full")
        for module in new_modules:
            module.requires_grad_(True)
        if finetune != "full":
            for _, layer in lora_modules(network):
                layer.lora_A.requires_grad_(True)
                layer.lora_B.requires_grad_(True)
        if finetune == "lora+decoder":
            decoder.requires_grad_(True)
        for part in never_run:
            part.requires_grad_(False)
        if base_weights == "random" and finetune == "lora":
            logger.warning(
                "finetune='lora' on a randomly initialised SAM 2 adapts random weights: the adapters have almost "
                "nothing to adapt and the model barely learns. Without Meta's checkpoint choose finetune='full' (or "
                "'lora+decoder', with architecture='unet')."
            )
        trainable = {name for name, parameter in network.named_parameters() if parameter.requires_grad}
        never_run_ids = {
            id(parameter)
            for part in never_run
            for parameter in (part.parameters() if isinstance(part, nn.Module) else [part])
        }
        self._never_run_keys = frozenset(
            name for name, parameter in network.named_parameters() if id(parameter) in never_run_ids
        )
        prefix = f"{base}."
        self._base_keys = frozenset(
            key
            for key in network.state_dict()
            if key.startswith(prefix) and key not in trainable and not key.endswith((".lora_A", ".lora_B", ".lora_merged"))
        )
        trained, total = self.count_parameters()
        logger.info(
            "%s Hiera-%s, %d px, finetune=%s: %d trainable of %d parameters (%.2f%%).",
            type(self).__name__,
            self.settings["model_size"],
            self.settings["image_size"],
            finetune,
            trained,
            total,
            100.0 * trained / total,
        )

    def count_parameters(self) -> tuple[int, int]:
        """The numbers of trainable and of all parameters."""
        parameters = list(self.parameters())  # type: ignore[attr-defined]
        return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)

    def adapters_merged(self) -> bool:
        """Whether the adapters are folded into the base weights (:meth:`merge_adapters`, or loaded so)."""
        return any(layer.merged for _, layer in lora_modules(self))  # type: ignore[arg-type]

    def merge_adapters(self) -> None:
        """Fold every adapter into its base weight: inference then costs what the network without adapters costs."""
        if self._recorded_base_digest is None:
            self._recorded_base_digest = self.base_digest() or ""
        merge_lora(self)  # type: ignore[arg-type]

    def unmerge_adapters(self) -> None:
        """Undo :meth:`merge_adapters`, e.g. to go on training."""
        unmerge_lora(self)  # type: ignore[arg-type]

    def train(self, mode: bool = True) -> AdaptedNetwork:
        """Set training (or evaluation) mode, as ``nn.Module.train`` does; adapters merged into the base weights
        (a model file saved merged, e.g. by ``tools.export --weights merged``) are unmerged first, since training
        updates them apart from the base."""
        if mode and self.adapters_merged():
            logger.info("Unmerging the adapters to train: the weights were loaded with them merged.")
            self.unmerge_adapters()
        return super().train(mode)  # type: ignore[misc]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load weights as ``nn.Module.load_state_dict`` does; base weights loaded anew get their digest anew."""
        loads_base = not self._base_keys.isdisjoint(state_dict)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
        if loads_base:
            merged = self.adapters_merged()
            self._recorded_base_digest = "" if merged else None
        return result

    def base_digest(self) -> str | None:
        """The :func:`frozen_weights_digest` of the base weights the adapters go on, as loaded, even after a merge
        and unmerge; None where the weights were loaded with adapters merged into them (then it cannot be known)."""
        if self._recorded_base_digest is not None:
            return self._recorded_base_digest or None
        if self.adapters_merged():
            return None
        return frozen_weights_digest(self)  # type: ignore[arg-type]

    def get_extra_state(self) -> dict[str, Any]:
        """The settings record saved with the weights (``_extra_state`` of the state dict)."""
        return {"format": MODEL_FORMAT, **_plain(self.settings)}

    def set_extra_state(self, state: Any) -> None:
        """Check, on loading a state dict, that it was trained with this network's defining settings.

        Raises:
            ModelFileError: the record is not ours, or differs from this network's settings.
        """
        if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
            raise ModelFileError("The trained model's weights carry no record of this bundle's network settings.")
        check_fits(state, self.settings)
        self.settings["base_weights"] = state.get("base_weights", "unknown")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything fine-tuning changed or added: the state without Meta's untouched base weights."""
        state = self.state_dict()  # type: ignore[attr-defined]
        return {key: value for key, value in state.items() if key not in self._base_keys and key != "_extra_state"}

    def save_adapters(self, path: str | os.PathLike) -> Path:
        """Write what fine-tuning changed (a small file to use on top of Meta's base checkpoint), atomically.

        Args:
            path: the file to write.

        Returns:
            The written path.

        Raises:
            ModelFileError: the adapters are merged, or the network was fine-tuned in full (every weight changed:
                save the whole model instead).
        """
        if self.adapters_merged():
            raise ModelFileError("Adapters are merged into the base weights; unmerge_adapters() before saving them.")
        if self.settings["finetune"] == "full":
            raise ModelFileError("A network fine-tuned in full has no adapter file: every weight changed.")
        payload = {
            "format": ADAPTER_FORMAT,
            "settings": self.get_extra_state(),
            "state_dict": self.adapter_state_dict(),
            # The adapters are right on these base weights alone: load_adapters refuses others.
            "base_digest": self.base_digest(),
        }
        if payload["base_digest"] is None:
            logger.warning("Adapter file %s records no base weights to check them against: the network's were loaded "
                           "with adapters merged into them, which unmerging does not give back bit for bit.", path)
        save_torch_atomic(payload, path)
        return Path(path)

    def load_adapters(self, path: str | os.PathLike) -> None:
        """Load a file written by :meth:`save_adapters` on top of the base weights.

        Raises:
            ModelFileError: the file is missing, unreadable, not an adapter file, made for other settings, or made on
                other base weights than this network's.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"Adapter checkpoint {path} does not exist.")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # damaged files raise many different errors inside torch.load
            reason = unreadable_torch_file(error)
            raise ModelFileError(f"Adapter checkpoint {path} cannot be read ({reason}).") from None
        if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT:
            raise ModelFileError(f"{path} is not an adapter file of this bundle (format {ADAPTER_FORMAT}).")
        differences = _differences(payload["settings"], self.settings, DEFINING_SETTINGS)
        if differences:
            raise ModelFileError(f"Adapter checkpoint {path} was made for other settings ({'; '.join(differences)}).")
        tensors = payload["state_dict"]
        expected = set(self.adapter_state_dict())
        # Until 0.3.10 lora+decoder also saved the object-score head, which no step changes and which is now frozen.
        frozen_since = sorted(set(tensors) & self._never_run_keys)
        if frozen_since:
            logger.warning(
                "Adapter checkpoint %s holds %d weights of parts this network never runs (%s, ...): left out.",
                path,
                len(frozen_since),
                frozen_since[0],
            )
            tensors = {key: value for key, value in tensors.items() if key not in self._never_run_keys}
        kept_at_meta = sorted(set(tensors) & self._base_keys)
        if kept_at_meta:
            # e.g. a lora+decoder file in a lora network, which would run Meta's decoder instead of the trained one
            raise ModelFileError(
                f"Adapter checkpoint {path} was fine-tuned with finetune={payload['settings'].get('finetune')!r} and "
                f"holds {len(kept_at_meta)} trained weights that this network (finetune="
                f"{self.settings['finetune']!r}) keeps at Meta's values (e.g. {kept_at_meta[0]}): build the network "
                f"with finetune={payload['settings'].get('finetune')!r}."
            )
        if set(tensors) != expected:
            raise ModelFileError(
                f"Adapter checkpoint {path} holds {len(tensors)} tensors where the network expects {len(expected)}; "
                f"e.g. missing {sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]}."
            )
        own_base = self.base_digest()
        self.unmerge_adapters()
        recorded_base = payload.get("base_digest")
        if recorded_base is None:  # written by bundle 0.3.19 or earlier, or on weights loaded merged
            logger.warning("Adapter checkpoint %s does not record its base weights: they cannot be checked.", path)
        elif own_base is None:
            logger.warning("Adapter checkpoint %s: the base weights cannot be checked on a network whose weights were "
                           "loaded with adapters merged into them.", path)
        elif recorded_base != own_base:
            raise ModelFileError(
                f"Adapter checkpoint {path} was trained on other base weights than this network's (the base "
                f"checkpoint's values differ): its adapters would segment wrongly. Use Meta's sam2.1_hiera_"
                f"{self.settings.get('model_size', '<size>')}.pt the bundle names (python -m monai.bundle "
                "download_large_files --bundle_path <bundle> fetches it and checks its SHA-256)."
            )
        self.load_state_dict(tensors, strict=False)  # type: ignore[attr-defined]
        logger.info("Loaded %d fine-tuned tensors from %s.", len(tensors), path)


def update_digest(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Add a tensor's name, dtype, shape and exact bytes to a :mod:`hashlib` digest.

    Args:
        digest: e.g. ``hashlib.sha256()``.
        name: the tensor's name in its network.
        tensor: on any device.
    """
    values = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}:{values.dtype}:{tuple(values.shape)};".encode())
    digest.update(values.reshape(-1).view(torch.uint8).numpy() if values.numel() else b"")


def frozen_weights_digest(network: nn.Module) -> str:
    """The SHA-256 of the names, dtypes, shapes and exact bytes of the network's frozen parameters.

    Exact, unlike a sum, which a different thread count can round differently: an adapter file records it to be
    refused on any other base. Merging adapters changes it (merging and unmerging does not give the weights back
    bit for bit): :meth:`AdaptedNetwork.base_digest` keeps the one taken before the first merge.

    Args:
        network: the network, on any device.

    Returns:
        A hex digest; equal for two networks whose frozen weights are bit-identical.
    """
    digest = hashlib.sha256()
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            update_digest(digest, name, parameter)
    return digest.hexdigest()


def tensor_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """The network's state dict without its settings record (``_extra_state``): the weights alone."""
    return {key: value for key, value in network.state_dict().items() if not key.endswith("_extra_state")}


def base_weights_source(random_init: bool, weights_follow: bool) -> str:
    """What a network records as the source of its base weights (see :meth:`AdaptedNetwork._configure_training`)."""
    return "random" if random_init else "follows" if weights_follow else "meta"


def check_finetune(finetune: str) -> str:
    """``finetune`` if it is one of :data:`FINETUNE_MODES`.

    Raises:
        ConfigError: any other value.
    """
    if finetune not in FINETUNE_MODES:
        raise ConfigError(f"Setting 'finetune' must be one of {', '.join(FINETUNE_MODES)}; got {finetune!r}.")
    return finetune

"""SAM 2 base models: building them from the sam2 package's own configs and loading Meta's released checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sam2  # noqa: F401  (importing the package registers its configs with hydra)
import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.checkpoint import checkpoint

from scripts.errors import ConfigError, FundusError, unreadable_torch_file

__all__ = [
    "CHECKPOINT_URL",
    "HIERA_SIZES",
    "CheckpointError",
    "HieraSize",
    "build_hiera_trunk",
    "build_sam2_base",
    "check_initial_weights",
    "checkpoint_hiera_size",
    "load_meta_checkpoint",
    "recompute_in_backward",
    "resolve_hiera_size",
]

logger = logging.getLogger(__name__)

CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_{name}.pt"

# Parameters of the state dict that the prompt-free and prompted single-image path reads; anything else in
# Meta's checkpoints (memory attention, memory encoder, object pointers) serves video tracking only.
SEGMENTATION_PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")
# Keys of the adapters, which Meta's checkpoints do not have.
LORA_KEYS = (".lora_A", ".lora_B", ".lora_merged")


@dataclass(frozen=True)
class HieraSize:
    """One of the four released Hiera image encoders.

    Args:
        name: the size's name in Meta's checkpoint file names (``sam2.1_hiera_<name>.pt``).
        config_code: the suffix of the sam2 package's config files (``sam2.1_hiera_<code>.yaml``).
        embed_dim: channels of the patch embedding, which tells checkpoints of different sizes apart.
        num_blocks: number of Hiera blocks.
    """

    name: str
    config_code: str
    embed_dim: int
    num_blocks: int

    def config_name(self, version: str) -> str:
        if version == "2.1":
            return f"configs/sam2.1/sam2.1_hiera_{self.config_code}.yaml"
        if version == "2":
            return f"configs/sam2/sam2_hiera_{self.config_code}.yaml"
        raise ConfigError(f"Setting 'sam2_version' must be '2' or '2.1'; got {version!r}.")

    @property
    def checkpoint_url(self) -> str:
        return CHECKPOINT_URL.format(name=self.name)


HIERA_SIZES: dict[str, HieraSize] = {
    size.name: size
    for size in (
        HieraSize("tiny", "t", embed_dim=96, num_blocks=12),
        HieraSize("small", "s", embed_dim=96, num_blocks=16),
        HieraSize("base_plus", "b+", embed_dim=112, num_blocks=24),
        HieraSize("large", "l", embed_dim=144, num_blocks=48),
    )
}
_ALIASES = {"t": "tiny", "s": "small", "b+": "base_plus", "base+": "base_plus", "b": "base_plus", "l": "large"}


class CheckpointError(FundusError, RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the network; the message names the file."""


def resolve_hiera_size(model_size: str) -> HieraSize:
    """Look up a Hiera size by name (``tiny``, ``small``, ``base_plus``, ``large``) or short code (``t``, ``b+``...).

    Raises:
        ConfigError: for an unknown name, listing the known ones.
    """
    key = _ALIASES.get(model_size.lower(), model_size.lower())
    if key not in HIERA_SIZES:
        raise ConfigError(f"Setting 'model_size' must be one of {', '.join(sorted(HIERA_SIZES))}; got {model_size!r}.")
    return HIERA_SIZES[key]


def build_sam2_base(model_size: str = "tiny", sam2_version: str = "2.1", image_size: int = 1024) -> nn.Module:
    """Build a randomly initialised ``SAM2Base`` from the sam2 package's own model config.

    Args:
        model_size: Hiera size, see :func:`resolve_hiera_size`.
        sam2_version: ``"2.1"`` (default) or ``"2"``.
        image_size: side of the square input. Meta trained at 1024; smaller sizes suit CPU work.
            Must be a multiple of 32 (Hiera's window positional embedding tiles the stride-4 feature map by 8).

    Returns:
        The SAM 2 model, in training mode.
    """
    size = resolve_hiera_size(model_size)
    if image_size < 64 or image_size % 32:
        raise ConfigError(f"Setting 'image_size' must be a multiple of 32 and at least 64, got {image_size}.")
    cfg = compose(config_name=size.config_name(sam2_version), overrides=[f"++model.image_size={image_size}"])
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True)


def build_hiera_trunk(model_size: str = "tiny", sam2_version: str = "2.1") -> nn.Module:
    """Build a randomly initialised Hiera trunk (SAM 2's image encoder without its FPN neck) from the sam2 config.

    Args:
        model_size: Hiera size, see :func:`resolve_hiera_size`.
        sam2_version: ``"2.1"`` (default) or ``"2"``.

    Returns:
        The Hiera module: images (B, 3, H, W), H and W multiples of 32, to four feature maps of strides 4 to 32.
    """
    size = resolve_hiera_size(model_size)
    cfg = compose(config_name=size.config_name(sam2_version))
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model.image_encoder.trunk, _recursive_=True)


def check_initial_weights(
    model_size: str, checkpoint: str | Path | None, random_init: bool, weights_follow: bool
) -> None:
    """Where a network's starting weights come from must be said, and said once: Meta's checkpoint, random weights
    on purpose (logged as a warning), or a trained model loaded right after building.

    Raises:
        CheckpointError: none of the three was given (the message says how to get Meta's weights).
        ConfigError: more than one was.
    """
    size = resolve_hiera_size(model_size)
    sources = {"checkpoint": checkpoint is not None, "random_init": random_init, "weights_follow": weights_follow}
    given = [name for name, value in sources.items() if value]
    if len(given) > 1:
        raise ConfigError(f"Give one of a SAM 2 checkpoint, random_init=True or weights_follow=True, not {given}.")
    if not given:
        raise CheckpointError(
            f"No SAM 2 base checkpoint given for Hiera-{size.name}. Download Meta's weights ({size.checkpoint_url}, "
            "or `python -m monai.bundle download_large_files` in the bundle) and pass its path as `checkpoint`, or "
            "set random_init=True to train from scratch."
        )
    if random_init:
        logger.warning(
            "SAM 2 Hiera-%s starts from RANDOM weights (random_init=True): no pretrained checkpoint is loaded, and "
            "results stay far below what Meta's weights give.",
            size.name,
        )


def recompute_in_backward(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Call ``forward`` keeping only its input for the backward pass, which runs it again (activation checkpointing).

    Set as a Hiera block's ``forward`` instance attribute, so that the state dict keys stay Meta's.
    """
    if not torch.is_grad_enabled():
        return forward(x)
    return checkpoint(forward, x, use_reentrant=False)


def checkpoint_hiera_size(state_dict: dict[str, torch.Tensor]) -> HieraSize | None:
    """Which Hiera size a SAM 2 state dict holds, from its patch-embedding width and block count (None if unknown)."""
    patch = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if patch is None:
        return None
    blocks = {key.split(".")[3] for key in state_dict if key.startswith("image_encoder.trunk.blocks.")}
    for size in HIERA_SIZES.values():
        if size.embed_dim == patch.shape[0] and size.num_blocks == len(blocks):
            return size
    return None


def _download_advice(path: Path) -> str:
    """How to fetch a missing base checkpoint: with MONAI, where it is one of a bundle's large files."""
    bundle = path.parent.parent
    if path.parent.name == "models" and (bundle / "large_files.yml").is_file():
        return f"`python -m monai.bundle download_large_files --bundle_path {bundle}` fetches it there"
    return "or `python -m monai.bundle download_large_files --bundle_path <bundle folder>` into a bundle's models/"


def _read_meta_state_dict(path: Path, size: HieraSize) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(
            f"SAM 2 checkpoint {path} does not exist. Download Meta's weights from {size.checkpoint_url} "
            f"({_download_advice(path)}); a training run can start from scratch instead with random_init=True."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError... for damaged files
        raise CheckpointError(
            f"SAM 2 checkpoint {path} cannot be read ({unreadable_torch_file(error)}); "
            "the file is corrupt or truncated: download it again."
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise CheckpointError(
            f"SAM 2 checkpoint {path} is not in Meta's format {{'model': state_dict}}: {_kind_of(payload)}."
        )
    if _is_bundle_model(payload["model"]):
        raise CheckpointError(f"SAM 2 checkpoint {path} is a model trained with this bundle: {_BUNDLE_MODEL_HINT}.")
    return payload["model"]


_BUNDLE_MODEL_HINT = (
    "give it as --ckpt_path (inference, evaluation), and Meta's sam2.1_hiera_<size>.pt as --base_checkpoint (training)"
)


def _is_bundle_model(content: dict) -> bool:
    """Whether a state dict is a model this bundle wrote (its networks keep SAM 2 under ``sam2.`` or ``encoder.``)."""
    return "_extra_state" in content or any(str(key).startswith(("sam2.", "encoder.trunk.")) for key in content)


def _kind_of(payload: object) -> str:
    """What a file that is not Meta's checkpoint holds, in a few words, with the fix where one is known."""
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}"
    if _is_bundle_model(payload):
        return f"it is a model trained with this bundle; {_BUNDLE_MODEL_HINT}"
    keys = sorted(str(key) for key in payload)
    if any(key.startswith("image_encoder.") for key in keys):
        return "it is a bare state dict; save it as torch.save({'model': state_dict}, path)"
    return f"it holds the keys {keys[:5]}{' ...' if len(keys) > 5 else ''}"


def load_meta_checkpoint(
    model: nn.Module, path: str | Path, model_size: str, prefix: str = ""
) -> tuple[list[str], list[str]]:
    """Load one of Meta's SAM 2 checkpoints (``{"model": state_dict}``) into ``model`` with ``weights_only=True``.

    Missing and unexpected keys are logged. A key missing from the single-image segmentation path (image
    encoder, prompt encoder, mask decoder) is an error, since it would leave those weights random.

    Args:
        model: a SAM2Base built for ``model_size``, or one of its parts (e.g. the Hiera trunk).
        path: the checkpoint file, e.g. ``sam2.1_hiera_tiny.pt``.
        model_size: the Hiera size the model was built with.
        prefix: the part's prefix in SAM2Base's keys (``"image_encoder.trunk."``); only those keys are loaded, and
            every parameter of the part must be among them.

    Returns:
        The missing and unexpected keys.

    Raises:
        CheckpointError: the file is missing, unreadable, not in Meta's format, of another Hiera size,
            or lacks weights the segmentation needs.
    """
    path = Path(path)
    expected = resolve_hiera_size(model_size)
    state_dict = _read_meta_state_dict(path, expected)
    found = checkpoint_hiera_size(state_dict)
    if found is not None and found != expected:
        raise CheckpointError(
            f"SAM 2 checkpoint {path} holds Hiera-{found.name} weights (patch embedding of {found.embed_dim} "
            f"channels, {found.num_blocks} blocks), but the network is Hiera-{expected.name} "
            f"({expected.embed_dim} channels, {expected.num_blocks} blocks): set model_size='{found.name}' "
            f"or use sam2.1_hiera_{expected.name}.pt."
        )
    if prefix:
        state_dict = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    own = {key: value for key, value in model.state_dict().items() if not key.endswith(LORA_KEYS)}
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs network {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and own[key].shape != value.shape
    ]
    if mismatched:
        raise CheckpointError(
            f"SAM 2 checkpoint {path} does not fit the Hiera-{expected.name} network; {len(mismatched)} tensors "
            f"differ in shape, e.g. {'; '.join(mismatched[:3])}."
        )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [key for key in missing if not key.endswith(LORA_KEYS)]
    # A part (the trunk) needs all its weights; the whole SAM2Base needs those of single-image segmentation.
    needed = [key for key in missing if prefix or key.startswith(SEGMENTATION_PREFIXES)]
    if needed:
        raise CheckpointError(
            f"SAM 2 checkpoint {path} lacks {len(needed)} weights of the segmentation network, e.g. {needed[:5]}."
        )
    if missing:
        logger.warning("SAM 2 checkpoint %s: %d keys missing (video-only modules): %s", path, len(missing), missing)
    if unexpected:
        logger.warning("SAM 2 checkpoint %s: %d unexpected keys ignored: %s", path, len(unexpected), unexpected)
    logger.info("Loaded SAM 2 Hiera-%s weights from %s.", expected.name, path)
    return list(missing), list(unexpected)

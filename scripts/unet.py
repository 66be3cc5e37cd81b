"""SAM 2's Hiera encoder with LoRA adapters as a backbone of MONAI's FlexibleUNet (the SAM2-UNet design).

Importing this module registers the adapted encoder in MONAI's own backbone registry,
``monai.networks.nets.flexible_unet.FLEXUNET_BACKBONE``, under ``sam2-hiera-tiny``, ``sam2-hiera-small``,
``sam2-hiera-base_plus`` and ``sam2-hiera-large``::

    import scripts.unet  # noqa: F401  (registers the backbones)
    from monai.networks.nets import FlexibleUNet

    net = FlexibleUNet(in_channels=3, out_channels=1, backbone="sam2-hiera-large", pretrained=True)

builds Hiera-large with rank-32 adapters on every block's ``qkv`` (the SAM2LoRA paper's placement) under MONAI's
U-Net decoder. Why: SAM's mask decoder predicts at a quarter of the encoder's side (256 px at 1024), where retinal
capillaries are one or two pixels wide; a U-Net decoder brings the encoder's multi-scale features back to full
resolution (Xiong et al., SAM2-UNet, arXiv 2408.08870, 2024). :class:`SAM2UNet` is that network with the bundle's
settings (LoRA rank, Meta's checkpoint, fine-tuning mode, the settings record).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.blocks import BaseEncoder, Convolution
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE, FlexibleUNet
from torch import nn

from scripts.adapters import AdaptedNetwork, base_weights_source, check_finetune
from scripts.errors import ConfigError
from scripts.lora import inject_lora, lora_modules, remove_lora
from scripts.sam2_models import (
    HIERA_SIZES,
    CheckpointError,
    build_hiera_trunk,
    check_initial_weights,
    load_meta_checkpoint,
    recompute_in_backward,
    resolve_hiera_size,
)

__all__ = ["ENCODER_LORA_TARGETS", "STEM_CHANNELS", "HieraEncoder", "SAM2UNet"]

logger = logging.getLogger(__name__)

ENCODER_LORA_TARGETS = ("blocks.*.attn.qkv",)
"""The paper's encoder placement, as patterns on the trunk's module names: the fused q/k/v of every Hiera block."""

STEM_CHANNELS = 32
"""Channels of the stride-2 level (see :class:`HieraEncoder`)."""

# Hiera tiles its window positional embedding over the stride-4 map in windows of 8: sides must be multiples of 32.
SIDE_MULTIPLE = 32


class HieraEncoder(nn.Module, BaseEncoder):
    """SAM 2's Hiera trunk with LoRA adapters, giving FlexibleUNet its five levels of strides 2, 4, 8, 16 and 32.

    Hiera's four stages give strides 4 to 32 (``embed_dim`` times 1, 2, 4, 8 channels). FlexibleUNet wants a stride-2
    level too, and Hiera has none: its patch embedding jumps from the pixels straight to stride 4. The stride-2
    level here is a small convolutional stem on the image itself (two 3x3 convolutions, batch norm, ReLU; 32
    channels): upsampling Hiera's stride-4 map instead would add no detail, while vessels one or two pixels wide
    need a path from the pixels that does not go through 4x4 patches. The stem has no pretrained weights and trains
    in every fine-tuning mode.

    Inputs of any size work: they are padded (zeros, bottom and right) to a multiple of 32, as Hiera needs, and each
    level is cut back to ``floor(side / stride)``, the sizes MONAI's U-Net decoder expects of any backbone. The
    trunk is frozen; the adapters (``B = 0`` at first, so an untrained encoder computes exactly Hiera) train.

    Args:
        model_size: Hiera size: ``tiny``, ``small``, ``base_plus`` or ``large``.
        spatial_dims: 2 (fundus photographs are 2D; Hiera is a 2D network).
        in_channels: 3 (Hiera's patch embedding takes RGB).
        pretrained: ``False`` for random weights, ``True`` for Meta's SAM 2.1 checkpoint from torch hub's cache
            (``<torch hub dir>/checkpoints/sam2.1_hiera_<size>.pt``, downloaded there from Meta when missing), or
            the path of a checkpoint in Meta's format.
        sam2_version: ``"2.1"`` or ``"2"``, the config family of the sam2 package.
        lora_rank: rank of every adapter.
        lora_alpha: scale numerator; default ``2 * lora_rank`` as in the paper.
        lora_dropout: dropout on the adapters' inputs.
        lora_targets: ``fnmatch`` patterns on the trunk's module names; empty for no adapters.

    Raises:
        CheckpointError: a checkpoint is missing, unreadable or does not fit.
        ConfigError: unsupported settings.
    """

    def __init__(
        self,
        model_size: str = "large",
        spatial_dims: int = 2,
        in_channels: int = 3,
        pretrained: bool | str | os.PathLike = False,
        sam2_version: str = "2.1",
        lora_rank: int = 32,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.1,
        lora_targets: Sequence[str] = ENCODER_LORA_TARGETS,
    ) -> None:
        super().__init__()
        if spatial_dims != 2 or in_channels != 3:
            raise ConfigError(
                f"The SAM 2 Hiera backbone takes 2D RGB images (spatial_dims=2, in_channels=3); got spatial_dims="
                f"{spatial_dims}, in_channels={in_channels}."
            )
        self.size = resolve_hiera_size(model_size)
        self.stem = nn.Sequential(
            Convolution(2, 3, STEM_CHANNELS, strides=2, kernel_size=3, norm="batch", act="relu"),
            Convolution(2, STEM_CHANNELS, STEM_CHANNELS, kernel_size=3, norm="batch", act="relu"),
        )
        self.trunk = build_hiera_trunk(self.size.name, sam2_version)
        if pretrained:
            path = _hub_checkpoint(self.size.name) if pretrained is True else Path(pretrained)
            load_meta_checkpoint(self.trunk, path, self.size.name, prefix="image_encoder.trunk.")
        self.trunk.requires_grad_(False)
        self.set_adapters(lora_rank, lora_alpha, lora_dropout, lora_targets)

    def set_adapters(
        self, rank: int, alpha: float | None = None, dropout: float = 0.1, targets: Sequence[str] = ENCODER_LORA_TARGETS
    ) -> list[str]:
        """Replace the trunk's adapters by new, untrained ones (none when ``targets`` is empty).

        Returns:
            The adapted layers' names.
        """
        remove_lora(self.trunk)
        if not targets:
            return []
        return inject_lora(self.trunk, tuple(targets), rank, float(2 * rank if alpha is None else alpha), dropout)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        height, width = images.shape[-2:]
        padded = F.pad(images, (0, -width % SIDE_MULTIPLE, 0, -height % SIDE_MULTIPLE))
        levels = [self.stem(images), *self.trunk(padded)]
        return [level[..., : height // 2**i, : width // 2**i] for i, level in enumerate(levels, start=1)]

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [
            {"model_size": name, "spatial_dims": 2, "in_channels": 3, "pretrained": False} for name in HIERA_SIZES
        ]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [(STEM_CHANNELS, *(size.embed_dim * 2**i for i in range(4))) for size in HIERA_SIZES.values()]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [5] * len(HIERA_SIZES)

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return [f"sam2-hiera-{name}" for name in HIERA_SIZES]


def _hub_checkpoint(model_size: str) -> Path:
    """Meta's checkpoint in torch hub's cache, downloaded there first when missing (as MONAI's other backbones do)."""
    size = resolve_hiera_size(model_size)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(size.checkpoint_url).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(size.checkpoint_url, str(path))
        except Exception as error:  # no network, proxy, HTTP errors... all mean the same to the user
            raise CheckpointError(
                f"Meta's SAM 2.1 Hiera-{size.name} checkpoint is not in {path.parent} and cannot be downloaded from "
                f"{size.checkpoint_url} ({type(error).__name__}: {error}). Put the file there, or pass its path as "
                "pretrained."
            ) from None
    return path


def register_backbones() -> None:
    """Add the Hiera backbones to MONAI's FlexibleUNet registry, once; other backbones are left as they are."""
    if not set(HieraEncoder.get_encoder_names()) <= set(FLEXUNET_BACKBONE.register_dict):
        FLEXUNET_BACKBONE.register_class(HieraEncoder)


register_backbones()


class SAM2UNet(AdaptedNetwork, FlexibleUNet):
    """The bundle's U-Net head: MONAI's FlexibleUNet on the LoRA-adapted Hiera encoder, with the bundle's settings.

    Prompt-free: it segments from the image alone (prompts belong to the SAM head). It takes SAM-normalised RGB
    images of any size and returns logits of the same size. The stem, the U-Net decoder and the segmentation head are
    new and train in every fine-tuning mode; ``finetune="lora"`` and ``"lora+decoder"`` therefore train the same
    parameters here, ``"full"`` trains Hiera too (without adapters).

    Args:
        model_size: Hiera size.
        channel_names: one name per sigmoid output channel, e.g. ``["vessels"]`` or ``["disc", "cup"]``.
        checkpoint: Meta's SAM 2 checkpoint for ``model_size``; its image encoder's trunk is loaded.
        random_init: start Hiera from random weights; must be asked for and is logged as a warning.
        weights_follow: a trained model's full state dict is loaded right after building (inference, export): no
            base checkpoint is read and the random placeholders are not warned about.
        image_size: the side training and inference resize to (or their window side); recorded with the weights.
        sam2_version: ``"2.1"`` or ``"2"``.
        lora_rank: rank of every adapter.
        lora_alpha: scale numerator; default ``2 * lora_rank``.
        lora_dropout: dropout on the adapters' inputs.
        lora_targets: patterns on the trunk's module names.
        finetune: ``"lora"``, ``"lora+decoder"`` or ``"full"``.
        decoder_channels: channels of the five U-Net decoder levels, finest last.
        adapter_checkpoint: a file of :meth:`save_adapters` to load on top of ``checkpoint``.
        channels_last: keep convolution weights and inputs in the channels-last memory format (tensor cores).
        activation_checkpointing: recompute each Hiera block's activations in the backward pass.
        recorded: workflow settings saved with the weights and required to match on loading (e.g. the input mode).

    Raises:
        CheckpointError: a checkpoint is missing, unreadable or does not fit.
        ConfigError: contradictory or invalid settings.
    """

    def __init__(
        self,
        model_size: str = "large",
        channel_names: Sequence[str] = ("vessels",),
        checkpoint: str | os.PathLike | None = None,
        random_init: bool = False,
        weights_follow: bool = False,
        image_size: int = 1024,
        sam2_version: str = "2.1",
        lora_rank: int = 32,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.1,
        lora_targets: Sequence[str] = ENCODER_LORA_TARGETS,
        finetune: str = "lora",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        adapter_checkpoint: str | os.PathLike | None = None,
        channels_last: bool = False,
        activation_checkpointing: bool = False,
        recorded: dict | None = None,
    ) -> None:
        size = resolve_hiera_size(model_size)
        check_finetune(finetune)
        check_initial_weights(size.name, checkpoint, random_init, weights_follow)
        if image_size < 64 or image_size % SIDE_MULTIPLE:
            raise ConfigError(f"Setting 'image_size' must be a multiple of 32 and at least 64, got {image_size}.")
        if not channel_names:
            raise ConfigError("Setting 'channel_names' must name at least one output channel.")
        super().__init__(
            in_channels=3,
            out_channels=len(channel_names),
            backbone=f"sam2-hiera-{size.name}",
            pretrained=False,
            decoder_channels=tuple(decoder_channels),
            spatial_dims=2,
        )
        encoder: HieraEncoder = self.encoder
        targets = () if finetune == "full" else tuple(lora_targets)
        alpha = float(2 * lora_rank if lora_alpha is None else lora_alpha)
        encoder.set_adapters(lora_rank, alpha, lora_dropout, targets)
        if checkpoint is not None:
            load_meta_checkpoint(encoder.trunk, checkpoint, size.name, prefix="image_encoder.trunk.")
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if activation_checkpointing:
            for block in encoder.trunk.blocks:
                block.forward = partial(recompute_in_backward, block.forward)
        self.settings = {
            "architecture": "unet",
            "model_size": size.name,
            "sam2_version": sam2_version,
            "image_size": image_size,
            "channel_names": list(channel_names),
            "lora_rank": lora_rank,
            "lora_alpha": alpha,
            "lora_dropout": lora_dropout,
            "lora_targets": list(targets),
            "finetune": finetune,
            "decoder_channels": list(decoder_channels),
            "recorded": dict(recorded or {}),
        }
        self._configure_training(
            finetune,
            base="encoder.trunk",
            decoder=self.decoder,
            new_modules=(encoder.stem, self.decoder, self.segmentation_head),
            base_weights=base_weights_source(random_init, weights_follow),
        )
        if adapter_checkpoint is not None:
            self.load_adapters(adapter_checkpoint)

    @property
    def adapted_layers(self) -> list[str]:
        return [name for name, _ in lora_modules(self)]

    def forward(
        self,
        images: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mask logits (B, C, H, W) at the size of ``images`` (B, 3, H, W), SAM-normalised.

        Raises:
            ConfigError: prompts were given: they belong to ``architecture="sam"``.
        """
        if point_coords is not None or point_labels is not None or boxes is not None:
            raise ConfigError("architecture 'unet' segments without prompts: points and boxes need architecture 'sam'.")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"SAM2UNet expects images of shape (B, 3, H, W), got {tuple(images.shape)}.")
        height, width = images.shape[-2:]
        # Padded to even sides: the decoder's last level doubles a stride-2 map, which would lose an odd pixel.
        padded = F.pad(images, (0, width % 2, 0, height % 2))
        if self.channels_last:
            padded = padded.contiguous(memory_format=torch.channels_last)
        return super().forward(padded)[..., :height, :width]

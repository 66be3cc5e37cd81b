"""SAM 2 adapted to fundus segmentation with low-rank adapters (SAM2LoRA, arXiv 2510.10288), and the choice of head.

:func:`build_network` is what the bundle configs build: ``architecture="sam"`` is :class:`SAM2LoRA` (SAM 2's own
prompt encoder and mask decoder, the paper's), ``"unet"`` is :class:`scripts.unet.SAM2UNet` (MONAI's U-Net decoder
on the same adapted Hiera encoder, prompt-free, full resolution).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from scripts.adapters import (
    ADAPTER_FORMAT,
    AdaptedNetwork,
    ModelFileError,
    base_weights_source,
    check_finetune,
    check_fits,
    read_model_file,
)
from scripts.errors import ConfigError, first_line
from scripts.lora import inject_lora
from scripts.sam2_models import (
    build_sam2_base,
    check_initial_weights,
    load_meta_checkpoint,
    recompute_in_backward,
    resolve_hiera_size,
)
from scripts.token_attention import allow_ignored_tokens, ignoring_tokens
from scripts.unet import SAM2UNet

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_LORA_TARGETS",
    "ImageEmbeddings",
    "SAM2LoRA",
    "SegmentationOutput",
    "build_network",
    "load_trained",
    "network_arguments",
]

logger = logging.getLogger(__name__)

ARCHITECTURES = ("sam", "unet")

# The paper's placement: the fused q/k/v projection of every Hiera block, and every linear layer of the
# attention modules (self-attention, both cross-attentions, final token-to-image attention) of the mask
# decoder's two-way transformer. Decoder MLPs, hypernetworks, IoU head, upscaling and prompt encoder stay frozen.
DEFAULT_LORA_TARGETS = (
    "image_encoder.trunk.blocks.*.attn.qkv",
    "sam_mask_decoder.transformer.layers.*.*.*_proj",
    "sam_mask_decoder.transformer.final_attn_token_to_image.*_proj",
)


class SegmentationOutput(NamedTuple):
    """Mask logits (B, C, H, W) at the input's size and SAM's predicted IoU per channel (B, C)."""

    logits: torch.Tensor
    iou_predictions: torch.Tensor


class ImageEmbeddings(NamedTuple):
    """What the image encoder computes for a batch, decodable with any number of prompt sets.

    ``image_embedding`` (B, 256, S/16, S/16) already holds SAM 2's "no memory" embedding; ``high_res_features``
    are the stride-4 and stride-8 maps the mask decoder upsamples with (None for SAM 2 configs without them);
    ``input_size`` is the (H, W) of the images before resizing to the encoder's side S, the frame of the prompts
    and of the returned logits.
    """

    image_embedding: torch.Tensor
    high_res_features: tuple[torch.Tensor, ...] | None
    input_size: tuple[int, int]


class SAM2LoRA(AdaptedNetwork, nn.Module):
    """SAM 2 (Hiera image encoder, prompt encoder and mask decoder from the sam2 package) with LoRA adapters.

    With ``finetune="lora"`` (the paper's) only the adapters train and every SAM 2 weight is frozen;
    ``"lora+decoder"`` trains the whole mask decoder too, ``"full"`` every weight (without adapters). ``forward``
    returns a plain logits tensor, as MONAI inferers and ignite engines expect; the IoU predictions of the last
    forward pass stay available as :attr:`latest_iou_predictions` for the loss's IoU term (see
    :class:`scripts.losses.CompositeLoss`). With no prompts the network segments automatically (SAM 2's own
    prompt-free input: a single padding point); points and boxes may be given per image. Output channel ``i`` is read
    from SAM's mask token ``i`` (token 0 is SAM's single-mask output), so there are at most 4 channels: one for vessels
    or optic disc, two for optic disc and cup as two sigmoid channels.

    Args:
        model_size: Hiera size: ``tiny``, ``small``, ``base_plus`` or ``large``.
        out_channels: number of sigmoid output channels, 1 to 4 (``len(channel_names)`` when names are given).
        checkpoint: Meta's SAM 2 checkpoint for ``model_size`` (e.g. ``sam2.1_hiera_tiny.pt``).
        random_init: start SAM 2 from random weights instead of a checkpoint. Must be asked for explicitly
            and is logged as a warning: without pretrained weights, results are far below the paper's.
        weights_follow: a trained model's full state dict is loaded right after building (inference, export): no
            base checkpoint is read and the random placeholders are not warned about.
        image_size: side of the square image the encoder sees; inputs of any size are resized to it.
        sam2_version: ``"2.1"`` or ``"2"``, the config family of the sam2 package.
        lora_rank: rank of every adapter.
        lora_alpha: scale numerator of every adapter; default ``2 * lora_rank`` as in the paper.
        lora_dropout: dropout on the adapters' inputs.
        lora_targets: ``fnmatch`` patterns on SAM2Base's module names selecting the linear layers to adapt.
        finetune: ``"lora"``, ``"lora+decoder"`` or ``"full"``.
        channel_names: one name per output channel, recorded with the weights (default ``channel_0``...).
        adapter_checkpoint: a file written by :meth:`save_adapters` to load on top of the base weights.
        channels_last: keep convolution weights and encoder inputs in the channels-last memory format, which
            tensor-core convolutions (CUDA, bf16/fp16) run without layout conversions. Outputs are unchanged.
        activation_checkpointing: recompute each Hiera block's activations in the backward pass instead of
            storing them: less training memory for about one more encoder forward pass per step. Only acts
            while gradients are recorded; inference is unaffected.
        recorded: workflow settings saved with the weights and required to match on loading (e.g. the input mode).

    Raises:
        CheckpointError: a checkpoint is missing, unreadable or does not fit.
        ConfigError: contradictory or invalid settings.
    """

    def __init__(
        self,
        model_size: str = "large",
        out_channels: int | None = None,
        checkpoint: str | Path | None = None,
        random_init: bool = False,
        weights_follow: bool = False,
        image_size: int = 1024,
        sam2_version: str = "2.1",
        lora_rank: int = 32,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.1,
        lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        finetune: str = "lora",
        channel_names: Sequence[str] | None = None,
        adapter_checkpoint: str | Path | None = None,
        channels_last: bool = False,
        activation_checkpointing: bool = False,
        recorded: dict | None = None,
    ) -> None:
        super().__init__()
        size = resolve_hiera_size(model_size)
        check_finetune(finetune)
        names = _channel_names(out_channels, channel_names)
        if not 1 <= len(names) <= 4:
            raise ConfigError(
                f"out_channels must be between 1 and 4 (SAM 2 has 4 mask tokens), got {len(names)} ({names})."
            )
        check_initial_weights(size.name, checkpoint, random_init, weights_follow)
        self.image_size = image_size
        self.out_channels = len(names)
        self.channels_last = channels_last
        targets = () if finetune == "full" else tuple(lora_targets)
        alpha = float(2 * lora_rank if lora_alpha is None else lora_alpha)

        self.sam2 = build_sam2_base(size.name, sam2_version, image_size)
        if checkpoint is not None:
            load_meta_checkpoint(self.sam2, checkpoint, size.name)
        self.latest_iou_predictions: torch.Tensor | None = None
        self.adapted_layers = inject_lora(self.sam2, targets, lora_rank, alpha, lora_dropout) if targets else []
        allow_ignored_tokens(self.sam2.sam_mask_decoder.transformer)
        if channels_last:
            # Loading a state dict later copies into these tensors and keeps their layout.
            self.sam2.to(memory_format=torch.channels_last)
        if activation_checkpointing:
            for block in self.sam2.image_encoder.trunk.blocks:
                block.forward = partial(recompute_in_backward, block.forward)
        self.settings = {
            "architecture": "sam",
            "model_size": size.name,
            "sam2_version": sam2_version,
            "image_size": image_size,
            "channel_names": names,
            "lora_rank": lora_rank,
            "lora_alpha": alpha,
            "lora_dropout": lora_dropout,
            "lora_targets": list(targets),
            "finetune": finetune,
            "recorded": dict(recorded or {}),
        }
        self._configure_training(
            finetune,
            base="sam2",
            decoder=self.sam2.sam_mask_decoder,
            base_weights=base_weights_source(random_init, weights_follow),
            never_run=self._never_run(),
        )
        if adapter_checkpoint is not None:
            self.load_adapters(adapter_checkpoint)

    def _never_run(self) -> list[nn.Module | nn.Parameter]:
        """SAM 2's parts that one image's segmentation does not run: the video memory and object pointers, the
        encoding of mask prompts, and the object-score head, whose output nothing reads."""
        runs = {"image_encoder", "sam_prompt_encoder", "sam_mask_decoder", "no_mem_embed"}
        parts: list[nn.Module | nn.Parameter] = [
            part
            for name, part in [*self.sam2.named_children(), *self.sam2.named_parameters(recurse=False)]
            if name not in runs
        ]
        parts.append(self.sam2.sam_prompt_encoder.mask_downscaling)
        score_head = getattr(self.sam2.sam_mask_decoder, "pred_obj_score_head", None)
        return parts if score_head is None else [*parts, score_head]

    def forward(
        self,
        images: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        ignored_points: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mask logits (B, C, H, W) at the size of ``images``; see :meth:`predict` for the arguments."""
        output = self.predict(images, point_coords, point_labels, boxes, ignored_points)
        self.latest_iou_predictions = output.iou_predictions
        return output.logits

    def predict(
        self,
        images: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        ignored_points: torch.Tensor | None = None,
    ) -> SegmentationOutput:
        """Segment a batch, each image with its own embedding and its own prompts.

        Args:
            images: (B, 3, H, W) float, normalised as SAM expects (ImageNet mean and std); any H and W.
            point_coords: (B, N, 2) ``(x, y)`` pixel coordinates in ``images``.
            point_labels: (B, N) SAM labels: 1 positive, 0 negative, 2 and 3 box corners, -1 padding.
            boxes: (B, 4) ``(x0, y0, x1, y1)`` pixel boxes in ``images``.
            ignored_points: (B, N) True for points that only pad their set to the batch's length N, see
                :meth:`decode` (training batches mark them: :class:`scripts.transforms.SamplePromptsd`).

        Returns:
            Mask logits (B, C, H, W) and SAM's predicted IoU (B, C).
        """
        return self.decode(self.encode_images(images), point_coords, point_labels, boxes, ignored_points=ignored_points)

    def encode_images(self, images: torch.Tensor) -> ImageEmbeddings:
        """Run the image encoder once; :meth:`decode` then reads its output for as many prompt sets as wanted.

        Args:
            images: (B, 3, H, W) float, normalised as SAM expects (ImageNet mean and std); any H and W.

        Returns:
            The embeddings of the batch, see :class:`ImageEmbeddings`.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"SAM2LoRA expects images of shape (B, 3, H, W), got {tuple(images.shape)}.")
        height, width = images.shape[-2:]
        side = self.image_size
        if (height, width) != (side, side):
            # Anti-aliased, as SAM 2's own preprocessing and the bundle's transforms shrink photographs.
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.sam2.forward_image(images)["backbone_fpn"][-self.sam2.num_feature_levels :]
        # SAM 2 adds the "no memory" embedding to the coarsest level of a frame that has no video memory.
        image_embedding = features[-1] + self.sam2.no_mem_embed.view(1, -1, 1, 1)
        high_res_features = tuple(features[:-1]) if self.sam2.use_high_res_features_in_sam else None
        return ImageEmbeddings(image_embedding, high_res_features, (int(height), int(width)))

    def decode(
        self,
        embeddings: ImageEmbeddings,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        prompts_per_image: int = 1,
        ignored_points: torch.Tensor | None = None,
    ) -> SegmentationOutput:
        """Decode encoded images with ``K = prompts_per_image`` prompt sets per image in one call.

        With ``B`` encoded images the prompts hold ``P = B * K`` prompt sets, image-major: sets ``i * K`` to
        ``i * K + K - 1`` belong to image ``i``. Each image's embedding is shared by its ``K`` sets, so the
        image encoder's cost is paid once however many prompts are tried (e.g. several evaluation prompt modes).

        Args:
            embeddings: output of :meth:`encode_images` for ``B`` images.
            point_coords: (P, N, 2) ``(x, y)`` pixel coordinates in the images given to :meth:`encode_images`.
            point_labels: (P, N) SAM labels: 1 positive, 0 negative, 2 and 3 box corners, -1 padding.
            boxes: (P, 4) ``(x0, y0, x1, y1)`` pixel boxes in those images.
            prompts_per_image: ``K``; without prompts every set is SAM 2's prompt-free input.
            ignored_points: (P, N) True for points that only pad their set to the length N of the others: they are
                kept out of the decoder's attention, so that each set decodes exactly as it would alone
                (:mod:`scripts.token_attention`).

        Returns:
            Mask logits (P, C, H, W) at the images' input size and SAM's predicted IoU (P, C).
        """
        if prompts_per_image < 1:
            raise ValueError(f"prompts_per_image must be a positive integer, got {prompts_per_image}.")
        image_embedding, high_res_features, (height, width) = embeddings
        prompt_sets = image_embedding.shape[0] * prompts_per_image
        if prompts_per_image > 1:
            image_embedding = image_embedding.repeat_interleave(prompts_per_image, dim=0)
            if high_res_features is not None:
                high_res_features = tuple(level.repeat_interleave(prompts_per_image, 0) for level in high_res_features)

        coords, labels = self._prompt_points(
            prompt_sets, width, height, point_coords, point_labels, boxes, image_embedding.device
        )
        prompt_encoder = self.sam2.sam_prompt_encoder
        # Without a box argument SAM appends its own padding token to the points; it is never ignored.
        sparse, dense = prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        ignored = self._ignored_tokens(ignored_points, point_labels, boxes, prompt_sets)
        decoder = self.sam2.sam_mask_decoder
        with ignoring_tokens(decoder.transformer, ignored):
            masks, iou_predictions, _, _ = decoder.predict_masks(
                image_embeddings=image_embedding,
                image_pe=prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                repeat_image=False,
                high_res_features=high_res_features,
            )
        logits = masks[:, : self.out_channels]
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return SegmentationOutput(logits, iou_predictions[:, : self.out_channels])

    @staticmethod
    def _ignored_tokens(
        ignored_points: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        prompt_sets: int,
    ) -> torch.Tensor | None:
        """(P, prompt tokens) True for the tokens of ``ignored_points``; None without ``ignored_points``.

        An all-False mask is kept rather than checked for: the check would wait for the GPU on every decode, and
        the masked attention decodes such a set as sam2's own attention does.
        """
        if ignored_points is None:
            return None
        if point_labels is None or ignored_points.shape != point_labels.shape:
            expected = None if point_labels is None else tuple(point_labels.shape)
            raise ValueError(f"ignored_points must have point_labels' shape {expected}, got {tuple(ignored_points.shape)}.")
        ignored = ignored_points.bool()
        box_corners = ignored.new_zeros(prompt_sets, 0 if boxes is None else 2)
        sam_padding = ignored.new_zeros(prompt_sets, 1)
        return torch.cat([box_corners, ignored, sam_padding], dim=1)

    def _prompt_points(
        self,
        batch: int,
        width: int,
        height: int,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All prompts as SAM points in the encoder's pixel frame; boxes become corner points labelled 2 and 3."""
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together.")
        coords: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        if boxes is not None:
            if boxes.shape != (batch, 4):
                raise ValueError(f"boxes must have shape ({batch}, 4), got {tuple(boxes.shape)}.")
            coords.append(boxes.reshape(batch, 2, 2).float())
            labels.append(torch.tensor([2, 3], device=device).expand(batch, 2))
        if point_coords is not None:
            if point_coords.ndim != 3 or point_coords.shape[0] != batch or point_coords.shape[2] != 2:
                raise ValueError(f"point_coords must have shape ({batch}, N, 2), got {tuple(point_coords.shape)}.")
            if point_labels.shape != point_coords.shape[:2]:
                raise ValueError(
                    f"point_labels must have shape {tuple(point_coords.shape[:2])}, got {tuple(point_labels.shape)}."
                )
            coords.append(point_coords.float())
            labels.append(point_labels)
        if not coords:
            # SAM 2's prompt-free input, as in SAM2Base._forward_sam_heads: one padding point.
            return torch.zeros(batch, 1, 2, device=device), -torch.ones(batch, 1, dtype=torch.int32, device=device)
        scale = torch.tensor([self.image_size / width, self.image_size / height], device=device)
        return torch.cat(coords, dim=1).to(device) * scale, torch.cat(labels, dim=1).to(device, torch.int32)


def _channel_names(out_channels: int | None, channel_names: Sequence[str] | None) -> list[str]:
    if channel_names is None:
        return [f"channel_{index}" for index in range(1 if out_channels is None else out_channels)]
    if out_channels is not None and out_channels != len(channel_names):
        raise ConfigError(
            f"out_channels {out_channels} disagrees with the {len(channel_names)} channel_names {list(channel_names)}."
        )
    return list(channel_names)


def build_network(
    architecture: str = "sam", trained: Mapping[str, Any] | None = None, **settings: Any
) -> SAM2LoRA | SAM2UNet:
    """The bundle's network with the chosen head.

    Args:
        architecture: ``"sam"`` (:class:`SAM2LoRA`) or ``"unet"`` (:class:`scripts.unet.SAM2UNet`).
        trained: the settings recorded by the model file the weights will be loaded from: a conflicting setting is
            refused before building (one head's LoRA targets name no module of the other, which would fail deep
            inside the build instead).
        settings: the network's arguments (both take the same ones, but for ``lora_targets``, which name modules of
            their own, and ``out_channels``, which only ``"sam"`` takes besides ``channel_names``).

    Raises:
        ConfigError: an unknown architecture.
        ModelFileError: a setting differs from what ``trained`` records.
    """
    if trained is not None:
        check_fits(trained, {"architecture": architecture, **settings})
    if architecture == "sam":
        return SAM2LoRA(**settings)
    if architecture == "unet":
        return SAM2UNet(**settings)
    raise ConfigError(f"Setting 'architecture' must be one of {', '.join(ARCHITECTURES)}; got {architecture!r}.")


# The settings a model file records that are not arguments of the networks.
_RECORD_ONLY = ("format", "base_weights")


def network_arguments(settings: dict[str, Any]) -> dict[str, Any]:
    """The arguments of :func:`build_network` among the settings a network or model file records."""
    return {key: value for key, value in settings.items() if key not in _RECORD_ONLY}


def load_trained(path: str | Path, base_checkpoint: str | Path | None = None) -> SAM2LoRA | SAM2UNet:
    """The trained network of a ``model.pt`` written by the bundle, built from the settings the file records.

    Args:
        path: a state dict, or a training checkpoint whose ``"model"`` entry is one; or an adapter file (an
            adapters-only archive's ``adapters.pt``), with ``base_checkpoint``.
        base_checkpoint: Meta's checkpoint an adapter file was trained on; unused for a full model file.

    Returns:
        The network in eval mode, with the file's weights (adapters unmerged or merged, as saved).

    Raises:
        ModelFileError: the file is missing, unreadable, an adapter file without ``base_checkpoint`` (or on another
            base), or its tensors do not fit its record.
    """
    state, settings = read_model_file(path)
    if state.get("format") == ADAPTER_FORMAT:
        if base_checkpoint is None:
            raise ModelFileError(
                f"{path} holds adapters only: give Meta's base checkpoint they were trained on with it "
                f"(sam2.1_hiera_{settings.get('model_size', '<size>')}.pt; --base_checkpoint)."
            )
        return build_network(checkpoint=base_checkpoint, adapter_checkpoint=path, **network_arguments(settings)).eval()
    network = build_network(weights_follow=True, **network_arguments(settings))
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelFileError(
            f"Trained model {path} does not fit the settings it records ({first_line(error) or type(error).__name__})."
        ) from None
    return network.eval()

"""The SAM2LoRA training loss: BCE + soft Dice + focal Tversky on mask logits, plus an optional IoU-prediction term."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss, TverskyLoss
from monai.metrics import compute_iou
from torch import nn

__all__ = ["CompositeLoss"]


class CompositeLoss(nn.Module):
    """``w_bce * BCE + w_dice * soft Dice + w_tversky * focal Tversky (+ w_iou * |predicted IoU - IoU|)``.

    The SAM2LoRA paper's recipe: equal weights, Dice smooth 1, Tversky with 0.7 on false negatives and 0.3 on
    false positives, focal exponent 0.75, smooth 1, and 0.1 on the IoU-prediction error. Every term works on
    logits of any number of sigmoid channels; Dice and Tversky are computed per image and channel, then averaged.

    Args:
        bce_weight: weight of the binary cross-entropy term.
        dice_weight: weight of the soft Dice term.
        tversky_weight: weight of the focal Tversky term.
        dice_smooth: Dice smoothing, added to numerator and denominator.
        tversky_fn_weight: Tversky weight of false negatives (the paper's alpha).
        tversky_fp_weight: Tversky weight of false positives (the paper's beta).
        tversky_gamma: focal exponent: the Tversky term is ``(1 - TI) ** gamma``.
        tversky_smooth: Tversky smoothing, added to numerator and denominator.
        iou_weight: weight of the IoU-prediction term; used when ``iou_predictions`` are passed.
        iou_source: a network with a ``latest_iou_predictions`` attribute (:class:`scripts.network.SAM2LoRA`)
            to take the IoU predictions from when the caller passes none, as ignite trainers call
            ``loss(prediction, target)`` with the logits alone.
    """

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        tversky_weight: float = 1.0,
        dice_smooth: float = 1.0,
        tversky_fn_weight: float = 0.7,
        tversky_fp_weight: float = 0.3,
        tversky_gamma: float = 0.75,
        tversky_smooth: float = 1.0,
        iou_weight: float = 0.1,
        iou_source: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # Kept out of the module tree: the network's parameters must not become the loss's.
        self._iou_source = [iou_source] if iou_source is not None else []
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.tversky_weight = tversky_weight
        self.tversky_gamma = tversky_gamma
        self.iou_weight = iou_weight
        self.bce = nn.BCEWithLogitsLoss()
        self.dice = DiceLoss(sigmoid=True, smooth_nr=dice_smooth, smooth_dr=dice_smooth)
        # MONAI's alpha weighs false positives and beta false negatives: the reverse of the paper's names.
        self.tversky = TverskyLoss(
            sigmoid=True,
            alpha=tversky_fp_weight,
            beta=tversky_fn_weight,
            smooth_nr=tversky_smooth,
            smooth_dr=tversky_smooth,
            reduction="none",
        )

    def terms(
        self, logits: torch.Tensor, target: torch.Tensor, iou_predictions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Each unweighted term, for logging: ``bce``, ``dice``, ``focal_tversky`` and maybe ``iou``.

        Args:
            logits: (B, C, H, W) mask logits.
            target: (B, C, H, W) binary masks.
            iou_predictions: (B, C) the network's predicted IoU, or None.
        """
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape.")
        target = target.to(logits.dtype)
        # (1 - TI) is clamped because d/dx x**0.75 is unbounded at 0: a perfect prediction must not give inf grads.
        tversky_index_loss = self.tversky(logits, target).clamp_min(1e-6)
        terms = {
            "bce": self.bce(logits, target),
            "dice": self.dice(logits, target),
            "focal_tversky": (tversky_index_loss**self.tversky_gamma).mean(),
        }
        if iou_predictions is not None:
            # The IoU SAM's head learns to predict: of the thresholded mask, 1 when mask and target are both empty.
            prediction = (torch.sigmoid(logits.detach()) > 0.5).to(target.dtype)
            actual = compute_iou(prediction, target, include_background=True, ignore_empty=False)
            terms["iou"] = (iou_predictions - actual).abs().mean()
        return terms

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, iou_predictions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weighted sum of :meth:`terms`.

        Args:
            logits: (B, C, H, W) mask logits.
            target: (B, C, H, W) binary masks.
            iou_predictions: (B, C) the network's predicted IoU; adds the IoU term when given. Defaults to
                the ``iou_source`` network's predictions for these logits.

        Returns:
            The scalar loss.
        """
        if iou_predictions is None and self._iou_source and self.iou_weight:
            iou_predictions = self._iou_source[0].latest_iou_predictions
            if iou_predictions is None or iou_predictions.shape != logits.shape[:2]:
                raise RuntimeError("iou_source holds no IoU predictions for these logits: run the network first.")
        terms = self.terms(logits, target, iou_predictions)
        weights = {
            "bce": self.bce_weight,
            "dice": self.dice_weight,
            "focal_tversky": self.tversky_weight,
            "iou": self.iou_weight,
        }
        return sum(weights[name] * value for name, value in terms.items())

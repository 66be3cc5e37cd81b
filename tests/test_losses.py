from __future__ import annotations

import math

import pytest
import torch

from scripts.losses import CompositeLoss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def by_hand(logits: list[float], target: list[float], fn_weight=0.7, fp_weight=0.3, gamma=0.75, smooth=1.0):
    """The paper's three terms for one image and channel, written out term by term."""
    p = [sigmoid(x) for x in logits]
    bce = -sum(t * math.log(q) + (1 - t) * math.log(1 - q) for q, t in zip(p, target)) / len(p)
    tp = sum(q * t for q, t in zip(p, target))
    fn = sum((1 - q) * t for q, t in zip(p, target))
    fp = sum(q * (1 - t) for q, t in zip(p, target))
    dice = 1 - (2 * tp + smooth) / (sum(p) + sum(target) + smooth)
    tversky_index = (tp + smooth) / (tp + fn_weight * fn + fp_weight * fp + smooth)
    return bce, dice, (1 - tversky_index) ** gamma


def test_terms_match_hand_computation():
    logits, target = [0.0, 2.0, -1.0, 3.0], [0.0, 1.0, 1.0, 0.0]
    bce, dice, focal_tversky = by_hand(logits, target)
    terms = CompositeLoss().terms(torch.tensor(logits).view(1, 1, 2, 2), torch.tensor(target).view(1, 1, 2, 2))
    assert terms["bce"].item() == pytest.approx(bce, rel=1e-5)
    assert terms["dice"].item() == pytest.approx(dice, rel=1e-5)
    assert terms["focal_tversky"].item() == pytest.approx(focal_tversky, rel=1e-5)


def test_weighted_sum_and_tversky_asymmetry():
    logits = torch.tensor([1.5, -0.5, 0.2, -2.0, 0.7, 0.1]).view(1, 1, 2, 3)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 3)
    bce, dice, focal_tversky = by_hand(logits.flatten().tolist(), target.flatten().tolist())
    loss = CompositeLoss(bce_weight=0.5, dice_weight=2.0, tversky_weight=3.0)(logits, target)
    assert loss.item() == pytest.approx(0.5 * bce + 2.0 * dice + 3.0 * focal_tversky, rel=1e-5)
    # the paper weighs false negatives (0.7) above false positives (0.3): swapping them changes the value
    _, _, swapped = by_hand(logits.flatten().tolist(), target.flatten().tolist(), fn_weight=0.3, fp_weight=0.7)
    terms = CompositeLoss(tversky_fn_weight=0.3, tversky_fp_weight=0.7).terms(logits, target)
    assert terms["focal_tversky"].item() == pytest.approx(swapped, rel=1e-5)
    assert swapped != pytest.approx(focal_tversky, rel=1e-3)


def test_channels_and_images_are_averaged():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 3, 3)
    target = (torch.rand(2, 2, 3, 3) > 0.5).float()
    loss_fn = CompositeLoss()
    per_part = [
        loss_fn.terms(logits[b : b + 1, c : c + 1], target[b : b + 1, c : c + 1]) for b in range(2) for c in range(2)
    ]
    whole = loss_fn.terms(logits, target)
    for name in ("bce", "dice", "focal_tversky"):
        assert whole[name].item() == pytest.approx(sum(t[name].item() for t in per_part) / 4, rel=1e-5)


def test_perfect_prediction_gives_about_zero():
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1
    logits = (target * 2 - 1) * 30
    loss = CompositeLoss()(logits, target, iou_predictions=torch.ones(2, 1))
    assert 0 <= loss.item() < 1e-3


def test_a_wrong_prediction_costs_more_than_a_close_one():
    target = torch.zeros(1, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1
    close = (target * 2 - 1) * 3
    wrong = -close
    loss_fn = CompositeLoss()
    assert loss_fn(wrong, target) > loss_fn(close, target) + 1.0


def test_gradients_are_finite_on_empty_masks():
    for logits in (torch.randn(2, 2, 8, 8), torch.full((2, 2, 8, 8), -30.0)):
        logits.requires_grad_(True)
        loss = CompositeLoss()(logits, torch.zeros(2, 2, 8, 8), iou_predictions=torch.rand(2, 2))
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(logits.grad).all()


def test_iou_term():
    logits = torch.tensor([3.0, 3.0, -3.0, 3.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    # prediction {0, 1, 3}, truth {0, 1, 2}: intersection 2, union 4, IoU 0.5
    loss_fn = CompositeLoss(iou_weight=0.1)
    without = loss_fn(logits, target)
    predicted = torch.tensor([[0.9]], requires_grad=True)
    with_iou = loss_fn(logits, target, iou_predictions=predicted)
    assert (with_iou - without).item() == pytest.approx(0.1 * 0.4, rel=1e-5)
    with_iou.backward()
    assert predicted.grad.item() == pytest.approx(0.1)
    # nothing predicted, nothing to find: IoU 1, so predicting 1 costs nothing
    empty, nothing = torch.full((1, 1, 2, 2), -5.0), torch.zeros(1, 1, 2, 2)
    assert loss_fn.terms(empty, nothing, torch.tensor([[1.0]]))["iou"].item() == 0.0


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"logits \(1, 1, 4, 4\) and target \(1, 2, 4, 4\)"):
        CompositeLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4))


def test_iou_predictions_come_from_the_network_for_ignite_style_calls():
    from scripts.network import SAM2LoRA

    torch.manual_seed(0)
    network = SAM2LoRA("tiny", random_init=True, image_size=64).train()
    target = (torch.rand(2, 1, 64, 64) > 0.7).float()
    logits = network(torch.randn(2, 3, 64, 64))
    explicit = CompositeLoss()(logits, target, iou_predictions=network.latest_iou_predictions)
    implicit = CompositeLoss(iou_source=network)(logits, target)
    assert implicit.item() == pytest.approx(explicit.item())
    assert implicit.item() > CompositeLoss()(logits, target).item()
    implicit.backward()  # the IoU head's input depends on the decoder adapters: gradients reach them
    assert any(p.grad is not None for n, p in network.named_parameters() if "sam_mask_decoder" in n)
    assert not list(CompositeLoss(iou_source=network).parameters())

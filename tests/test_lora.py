from __future__ import annotations

import pytest
import torch
from torch import nn

from scripts.lora import LoRALinear, inject_lora, lora_state_dict


def test_new_adapter_computes_the_base_layer_exactly():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    layer = LoRALinear.from_linear(linear, rank=4, alpha=8, dropout=0.1).train()
    x = torch.randn(5, 12)
    assert torch.equal(layer(x), linear(x))
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.lora_A.std().item() == pytest.approx(0.5, rel=0.3)  # N(0, 1/rank)


def test_update_is_scaled_low_rank_product():
    torch.manual_seed(0)
    layer = LoRALinear(6, 3, rank=2, alpha=6).eval()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6)
    expected = x @ layer.weight.T + layer.bias + 3.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.merged
    layer.merge()  # merging twice must not add the update twice
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_inject_adapts_only_matching_linear_layers():
    model = nn.Sequential()
    model.add_module("encoder", nn.ModuleDict({"qkv": nn.Linear(4, 12), "mlp": nn.Linear(4, 4)}))
    model.add_module("head", nn.Linear(4, 1))
    names = inject_lora(model, ["encoder.qkv", "head"], rank=2, alpha=4)
    assert names == ["encoder.qkv", "head"]
    assert type(model.encoder["mlp"]) is nn.Linear
    assert set(lora_state_dict(model)) == {"encoder.qkv.lora_A", "encoder.qkv.lora_B", "head.lora_A", "head.lora_B"}


@pytest.mark.parametrize("rank, dropout", [(0, 0.1), (4, 1.0)])
def test_invalid_settings(rank, dropout):
    with pytest.raises(ValueError):
        LoRALinear(4, 4, rank=rank, alpha=8, dropout=dropout)

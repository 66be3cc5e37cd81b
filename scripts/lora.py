"""Low-rank adapters (LoRA) for the linear layers of a frozen network.

A :class:`LoRALinear` is a drop-in ``nn.Linear`` whose own ``weight`` and ``bias`` keep the pretrained values
under their original state-dict keys, so a checkpoint of the base network (Meta's SAM 2 release) loads into the
adapted network unchanged, and the adapted network's base weights can be written back in the same format.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scripts.errors import ConfigError, is_real_number, is_whole_number

__all__ = [
    "LoRALinear",
    "inject_lora",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "remove_lora",
    "unmerge_lora",
]


class LoRALinear(nn.Linear):
    """``y = W x + b + (alpha / rank) * B A dropout(x)``, with ``W`` and ``b`` frozen.

    ``A`` (rank x in_features) starts as a Gaussian with std ``1 / sqrt(rank)`` and ``B`` (out_features x rank)
    starts at zero, so before training the layer computes exactly what the base layer computes.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        rank: rank of the update ``B A``.
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout probability applied to the input of the low-rank path.
        bias: whether the base layer has a bias.
        device: device of the new parameters.
        dtype: dtype of the new parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not (is_whole_number(rank) and rank >= 1):
            raise ConfigError(f"Setting 'lora_rank' must be a positive whole number; got {rank!r}.")
        if not (is_real_number(alpha) and alpha > 0):
            raise ConfigError(f"Setting 'lora_alpha' must be a positive number (the paper's: twice the rank); got {alpha!r}.")
        if not (is_real_number(dropout) and 0.0 <= dropout < 1.0):
            raise ConfigError(f"Setting 'lora_dropout' must be at least 0 and below 1; got {dropout!r}.")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        # Persistent, so that a state dict saved while merged restores a merged layer rather than adding B A twice.
        self.register_buffer("lora_merged", torch.zeros((), dtype=torch.bool, device=device))
        # The same state as a Python bool for forward(): reading the buffer there would synchronise a CUDA
        # device on every call and break torch.compile graphs on a data-dependent branch.
        self._merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """Wrap an existing linear layer, sharing its weight and bias tensors.

        Args:
            linear: the pretrained layer to adapt.
            rank: rank of the update.
            alpha: scale numerator.
            dropout: dropout on the low-rank path.

        Returns:
            A LoRA layer computing the same function as ``linear``.
        """
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def reset_lora_parameters(self) -> None:
        """Re-initialise the adapter: ``A ~ N(0, 1/rank)``, ``B = 0`` (no change to the base function)."""
        if self.lora_A.device.type == "meta":
            return
        nn.init.normal_(self.lora_A, std=1.0 / math.sqrt(self.rank))
        nn.init.zeros_(self.lora_B)

    @property
    def merged(self) -> bool:
        return self._merged

    def _set_merged(self, merged: bool) -> None:
        self.lora_merged.fill_(merged)
        self._merged = merged

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._merged = bool(self.lora_merged)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``(alpha / rank) * B A`` of shape (out_features, in_features)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merge(self) -> None:
        """Fold the adapter into ``weight`` so inference costs exactly one plain linear layer."""
        if self.merged:
            return
        with torch.no_grad():
            self.weight += self.delta_weight().to(self.weight.dtype)
        self._set_merged(True)

    def unmerge(self) -> None:
        """Take the adapter out of ``weight`` again, e.g. to resume training."""
        if not self.merged:
            return
        with torch.no_grad():
            self.weight -= self.delta_weight().to(self.weight.dtype)
        self._set_merged(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training and self.lora_A.requires_grad:
                raise RuntimeError(
                    "LoRA adapters are merged into the base weights: call unmerge_adapters() before training."
                )
            return F.linear(x, self.weight, self.bias)
        output = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        # In place: linear's backward does not need its output, and this spares one (tokens x out_features) tensor.
        return output.add_(update, alpha=self.scaling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def inject_lora(
    model: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0
) -> list[str]:
    """Replace every ``nn.Linear`` whose qualified name matches one of ``targets`` by a :class:`LoRALinear`.

    Args:
        model: the network to adapt in place.
        targets: shell-style patterns (``fnmatch``) on qualified module names,
            e.g. ``"image_encoder.trunk.blocks.*.attn.qkv"``.
        rank: rank of every adapter.
        alpha: scale numerator of every adapter.
        dropout: dropout on every adapter's input.

    Returns:
        The qualified names of the adapted layers, in module order.

    Raises:
        ValueError: when a pattern matches no linear layer (a typo would otherwise silently train nothing).
    """
    matched: dict[str, list[str]] = {pattern: [] for pattern in targets}
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        hits = [pattern for pattern in targets if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            continue
        for pattern in hits:
            matched[pattern].append(name)
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, LoRALinear.from_linear(module, rank=rank, alpha=alpha, dropout=dropout))
    unmatched = [pattern for pattern, names in matched.items() if not names]
    if unmatched:
        raise ValueError(f"LoRA target patterns {unmatched} match no nn.Linear layer of {type(model).__name__}.")
    return [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yield ``(qualified name, layer)`` for every LoRA layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone (``*.lora_A``, ``*.lora_B``), keyed as in ``model.state_dict()``."""
    return {key: value for key, value in model.state_dict().items() if key.endswith((".lora_A", ".lora_B"))}


def merge_lora(model: nn.Module) -> None:
    """Merge every adapter of ``model`` into its base weight."""
    for _, layer in lora_modules(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every adapter of ``model`` out of its base weight."""
    for _, layer in lora_modules(model):
        layer.unmerge()


def remove_lora(model: nn.Module) -> None:
    """Replace every LoRA layer of ``model`` by a plain ``nn.Linear`` sharing its base weight and bias.

    The adapters are dropped (a merged adapter is taken out of the weight first), so the model computes its base
    function again; :func:`inject_lora` can then add new adapters, e.g. of another rank.
    """
    for name, layer in list(lora_modules(model)):
        layer.unmerge()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight, linear.bias = layer.weight, layer.bias
        linear.train(layer.training)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, linear)

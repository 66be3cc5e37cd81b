"""Prompt sets of different lengths decoded in one call of SAM's mask decoder, each exactly as if alone.

A batch of prompt sets must have one length, so shorter sets are padded with extra points. SAM 2's own padding
token (``not_a_point``) is a real token that the decoder attends to, so padding changes the answer. Here the
padding a batch needed is kept out of the decoder's attention instead: in SAM's two-way transformer the prompt
tokens are the keys of two attentions per layer (the tokens' self-attention and the image-to-token attention),
and masking a token out of those keys leaves every other token and the image embedding as they would be without
it. The padding tokens' own outputs are never read. The mask decoder is launch-bound on a GPU, so one call for
all of an image's prompt modes instead of one per length saves most of their cost there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TOKEN_KEYED_ATTENTIONS", "allow_ignored_tokens", "ignoring_tokens"]

# The attentions of each TwoWayAttentionBlock whose keys are the tokens (sam2/modeling/sam/transformer.py).
TOKEN_KEYED_ATTENTIONS = ("self_attn", "cross_attn_image_to_token")


def _token_keyed(transformer: nn.Module) -> list[nn.Module]:
    return [getattr(layer, name) for layer in transformer.layers for name in TOKEN_KEYED_ATTENTIONS]


def allow_ignored_tokens(transformer: nn.Module) -> None:
    """Let :func:`ignoring_tokens` keep tokens out of ``transformer``'s attention (SAM 2's ``TwoWayTransformer``).

    Without an :func:`ignoring_tokens` context the attentions run sam2's own code, unchanged.
    """
    for attention in _token_keyed(transformer):
        attention.ignored_tokens = None
        attention.forward = partial(_attend, attention, attention.forward)


@contextmanager
def ignoring_tokens(transformer: nn.Module, ignored: torch.Tensor | None) -> Iterator[None]:
    """Within the context, ``transformer``'s token-keyed attentions leave out the ``ignored`` tokens.

    Args:
        transformer: a ``TwoWayTransformer`` prepared by :func:`allow_ignored_tokens`.
        ignored: (P, L) True for each of the last ``L`` tokens of each of the ``P`` prompt sets to leave out (the
            prompt tokens come after SAM's output tokens); None leaves every token in.
    """
    attentions = _token_keyed(transformer)
    for attention in attentions:
        attention.ignored_tokens = ignored
    try:
        yield
    finally:
        for attention in attentions:
            attention.ignored_tokens = None


def _attend(
    attention: nn.Module, sam2_forward: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    ignored = attention.ignored_tokens
    if ignored is None:
        return sam2_forward(q, k, v)
    # sam2's Attention.forward, with the ignored keys masked out of the softmax.
    q, k, v = attention.q_proj(q), attention.k_proj(k), attention.v_proj(v)
    q, k, v = (attention._separate_heads(x, attention.num_heads) for x in (q, k, v))
    keep = ~F.pad(ignored, (k.shape[2] - ignored.shape[1], 0), value=False)
    dropout = attention.dropout_p if attention.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], dropout_p=dropout)
    return attention.out_proj(attention._recombine_heads(out))

"""Ulysses sequence parallelism: the all-to-alls that trade a group's tokens for heads and back.

Each of a group's d ranks holds an equal, consecutive slice of a sequence's tokens for the
linear layers. Attention needs whole sequences, so before it an all-to-all gives every rank
all tokens for 1/d of the heads, and after it a second one gives the tokens back. Both are
differentiable: the gradient of an all-to-all is the inverse all-to-all.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def tokens_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[t, h, ...] on each of the group's d ranks -> [d * t, h / d, ...]: the whole sequence
    (rank 0's slice first) for this rank's block of the heads. The identity without a group."""
    d = 1 if group is None else dist.get_world_size(group)
    if d == 1:
        return x
    t, h = x.shape[:2]
    chunks = x.reshape(t, d, h // d, *x.shape[2:]).transpose(0, 1).contiguous()  # chunk j goes to rank j
    return _all_to_all(chunks, group).reshape(d * t, h // d, *x.shape[2:])


def heads_to_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse of tokens_to_heads: [d * t, h / d, ...] -> [t, h, ...]."""
    d = 1 if group is None else dist.get_world_size(group)
    if d == 1:
        return x
    tokens, h = x.shape[:2]
    chunks = x.reshape(d, tokens // d, h, *x.shape[2:]).contiguous()  # chunk j: rank j's tokens
    received = _all_to_all(chunks, group)  # [the rank whose heads, t, h / d, ...]
    return received.transpose(0, 1).reshape(tokens // d, d * h, *x.shape[2:])


def replicate_kv_heads(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[t, kv heads, ...] with each head repeated so that a group of `group_size` ranks splits
    them evenly. With fewer key/value heads than ranks (grouped-query attention) neighbouring
    ranks get copies of one head, each beside the query heads it serves."""
    heads = x.size(1)
    copies = group_size // math.gcd(heads, group_size)
    return x.repeat_interleave(copies, dim=1) if copies > 1 else x


def _all_to_all(chunks: torch.Tensor, group) -> torch.Tensor:
    """Chunk j of dim 0 to rank j of the group, and back through autograd in the backward pass."""
    return dist_nn.all_to_all_single(torch.empty_like(chunks), chunks, group=group)

"""Attention over packed documents (`data.packing: documents`).

A micro-batch holds whole documents back to back with their cumulative lengths (megatron's
`PackedSeqParams`, `thd` layout). This module sits in the `core_attention` slot of megatron's
self-attention: it rotates queries and keys by each token's position within its own document
(the model's own rotary embedding is off, so they arrive unrotated) and runs causal attention
per document, so that no token attends across a document boundary. The rotation is megatron's
own (`RotaryEmbedding`, `apply_rotary_pos_emb`), so a document alone gives what the stock model
gives for it.

A micro-batch may run on a sequence-parallel group of several data-parallel ranks (the
planner's groups, Ulysses style): each rank holds an equal slice of the micro-batch's tokens,
and the group's process group arrives with the documents' lengths (`PackedSeqParams.cp_group`,
megatron's field for a per-step group). An all-to-all over the group then trades tokens for
heads, so that every rank holds all tokens of its share of the heads; attention runs per
document, and a second all-to-all trades back. Positions are applied after the first
exchange, because only then does a rank hold whole documents whose positions it can count.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from parallel.ulysses import heads_to_tokens, replicate_kv_heads, tokens_to_heads


def positions_in_documents(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document, from the documents' cumulative lengths."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths)
    return torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - starts


class DocumentAttention(MegatronModule):
    """Causal attention inside each packed document, rotary positions restarting at each one."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        rotary_base: int = 10000,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("attention over packed documents does not run with context parallelism")
        self.rotary = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_base=rotary_base,
            use_cpu_initialization=config.use_cpu_initialization,
        )
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """query [t, heads, d], key and value [t, query groups, d] -> [t, heads * d], where t is
        this rank's slice of the micro-batch's tokens."""
        if packed_seq_params is None:
            raise ValueError("DocumentAttention needs packed documents: their cumulative lengths (cu_seqlens)")
        group = packed_seq_params.cp_group
        if group is not None:
            size = dist.get_world_size(group)
            key, value = (replicate_kv_heads(x, size) for x in (key, value))
            query, key, value = (tokens_to_heads(x, group) for x in (query, key, value))
        out = heads_to_tokens(self._attend(query, key, value, packed_seq_params.cu_seqlens_q), group)
        return out.reshape(out.size(0), -1)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor):
        """Rotary positions and causal attention inside each document of the whole micro-batch."""
        positions = positions_in_documents(cu_seqlens)
        freqs = self.rotary(int(positions.max()) + 1)[positions].squeeze(1)  # [t, 1, d]
        query = apply_rotary_pos_emb(query, freqs, self.config)
        key = apply_rotary_pos_emb(key, freqs, self.config)
        if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
            return _flash_varlen(query, key, value, cu_seqlens, self.scale)
        repeat = query.size(1) // key.size(1)
        if repeat > 1:  # grouped-query attention: each key/value head serves `repeat` query heads
            key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        bounds = cu_seqlens.tolist()
        # One causal attention per document: a loop is faster on CPU than one block-diagonal mask.
        # As [batch 1, heads, t, d]: torch's CPU flash kernel takes only 4-D inputs; 3-D ones fall
        # back to the math kernel, which at 8K tokens is 15x slower forward and 5x backward.
        out = [
            F.scaled_dot_product_attention(
                query[None, a:b].transpose(1, 2),
                key[None, a:b].transpose(1, 2),
                value[None, a:b].transpose(1, 2),
                is_causal=True,
                scale=self.scale,
            )[0].transpose(0, 1)
            for a, b in zip(bounds, bounds[1:], strict=False)
        ]
        return torch.cat(out)


def _flash_varlen(query, key, value, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """On GPU: one flash-attention kernel over all documents, causal inside each (torch's varlen
    attention, which takes the cumulative lengths and grouped key/value heads directly)."""
    from torch.nn.attention.varlen import varlen_attn

    cu = cu_seqlens.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return varlen_attn(query, key, value, cu, cu, longest, longest, scale=scale, window_size=(-1, 0), enable_gqa=True)

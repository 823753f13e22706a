"""An RMSNorm that megatron's sequence parallelism accepts, for the local (non-TE) layer spec.

With sequence parallelism each TP rank normalises its own slice of the sequence, so the
norm weight's gradient is partial on every rank; marking the weight `sequence_parallel`
makes megatron's finalize_model_grads all-reduce it over the TP group. Torch's own
RMSNorm, which megatron's local spec uses, refuses sequence parallelism for lack of that mark.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class SequenceParallelRMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_ignored):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)

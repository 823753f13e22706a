"""What one training step does: the model chunks, the optimizer, forward/backward, the update.

The loop (trainer/loop.py) decides when things happen; this object only knows how.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from parallel.dims import ParallelDims
from trainer.config import Config
from trainer.model import build_model_chunks, param_dtype, transformer_config
from trainer.packing import PackedMicroBatch


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean token loss over the global batch."""
    grad_norm: float
    """Global gradient norm before clipping."""
    skipped: bool
    """The optimizer skipped the update (non-finite gradients)."""


class TrainStep:
    def __init__(self, config: Config, dims: ParallelDims, vocab_size: int):
        self.config = config
        self.dims = dims
        self.tconfig = transformer_config(config, dims)
        chunks = build_model_chunks(config, dims, vocab_size)
        if self.tconfig.bf16:
            chunks = [Float16Module(self.tconfig, chunk) for chunk in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=dims.distributed_optimizer,
        )
        self.model = [
            # Only the first chunk's buckets are overlapped with compute; see megatron's pretrain_gpt.
            DistributedDataParallel(self.tconfig, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(self._optimizer_config(), self.model)
        self._forward_backward = get_forward_backward_func()

    def _optimizer_config(self) -> OptimizerConfig:
        optim = self.config.optim
        return OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.beta1,
            adam_beta2=optim.beta2,
            adam_eps=optim.eps,
            clip_grad=optim.clip_grad,
            bf16=self.tconfig.bf16,
            params_dtype=param_dtype(self.config),
            use_distributed_optimizer=self.dims.distributed_optimizer,
        )

    @property
    def num_parameters(self) -> int:
        """Parameters held by this rank."""
        return sum(p.numel() for chunk in self.model for p in chunk.parameters())

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.config.optim.weight_decay * group.get("wd_mult", 1.0)

    def train(self, micro_batches: list[np.ndarray], before_update: Callable[[], None] = lambda: None) -> StepResult:
        """Forward/backward over this rank's micro-batches, then one optimizer update.

        `before_update` runs between the two: the last moment the weights are unchanged.
        """
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run(micro_batches, forward_only=False)
        before_update()
        updated, grad_norm, _ = self.optimizer.step()
        return StepResult(loss=self._global_mean(losses), grad_norm=float(grad_norm or 0.0), skipped=not updated)

    @torch.no_grad()
    def evaluate(self, micro_batches: list[np.ndarray]) -> float:
        for chunk in self.model:
            chunk.eval()
        return self._global_mean(self._run(micro_batches, forward_only=True))

    def _run(self, micro_batches: list, forward_only: bool) -> list[torch.Tensor]:
        packed = isinstance(micro_batches[0], PackedMicroBatch)
        if packed:  # one row of whole documents per micro-batch
            seq_length, micro_batch_size = len(micro_batches[0].tokens), 1
        else:
            seq_length, micro_batch_size = micro_batches[0].shape[1] - 1, micro_batches[0].shape[0]
        iterators = [iter(micro_batches) for _ in self.model]
        outputs = self._forward_backward(
            forward_step_func=partial(_forward_packed, dims=self.dims)
            if packed
            else partial(_forward_step, device=self.dims.device),
            data_iterator=iterators if len(self.model) > 1 else iterators[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
        return [out["lm loss"] for out in outputs] if outputs else []

    def _global_mean(self, losses: list[torch.Tensor]) -> float:
        """The step's mean token loss: on the last stage, reduced over DP (each micro-batch's mean
        weighted alike, or, with packed documents, every token alike), then shared along the pipeline."""
        total = torch.zeros(1, dtype=torch.float64, device=self.dims.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            stacked = torch.stack(losses).double()
            if stacked.dim() == 2:  # packed documents: (sum, tokens) per micro-batch
                sums = stacked.sum(dim=0)
                dist.all_reduce(sums, group=ps.get_data_parallel_group())
                total += sums[0] / sums[1].clamp(min=1)
            else:
                total += stacked.mean()
                dist.all_reduce(total, group=ps.get_data_parallel_group())
                total /= self.dims.dp
        if self.dims.pp > 1:
            dist.broadcast(
                total, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
            )
        return total.item()


def _forward_step(data_iterator, model, device: torch.device):
    batch = torch.from_numpy(next(data_iterator)).to(device)
    tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, positions, None, labels=labels)
    return output, _mean_token_loss


def _forward_packed(data_iterator, model, dims: ParallelDims):
    """One micro-batch of packed documents, or this rank's slice of one that its sequence-parallel
    group runs: the group travels to the attention with the documents' lengths."""
    batch: PackedMicroBatch = next(data_iterator)
    row = lambda values: torch.from_numpy(values).to(dims.device).unsqueeze(0)  # noqa: E731
    cu_seqlens = torch.from_numpy(batch.cu_seqlens).to(dims.device)
    longest = int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())
    documents = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
        cp_group=dims.sequence_groups[batch.group] if batch.group[1] > 1 else None,
    )
    output = model(row(batch.tokens), row(batch.positions), None, labels=row(batch.labels), packed_seq_params=documents)
    return output, partial(_summed_token_loss, loss_mask=row(batch.loss_mask))


def _summed_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor):
    """Packed documents: the sum of the real tokens' losses and their count. Megatron divides
    the gradients by the count over the whole global batch (calculate_per_token_loss)."""
    summed = (per_token_loss.float() * loss_mask).sum()
    tokens = loss_mask.sum().to(torch.int)
    return summed, tokens, {"lm loss": torch.stack([summed.detach(), tokens.detach().float()])}


def _mean_token_loss(per_token_loss: torch.Tensor):
    loss = per_token_loss.float().mean()
    # A copy: the schedule divides the returned loss by the micro-batch count in place.
    return loss, {"lm loss": loss.detach().clone()}

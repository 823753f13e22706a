"""Failing safely: every rank stops with the same message instead of some hanging."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class Retryable(RuntimeError):
    """A failure that a restart can get past (a snapshot or checkpoint write lost with a
    process), unlike bad input: ranks exit with the "crashed" code and a launcher restarts them."""


class RankFailed(RuntimeError):
    """Raised on every rank when any rank failed a step that all ranks run together."""

    def __init__(self, message: str, group=None, retryable: bool = False):
        super().__init__(message)
        self.group = group
        self.retryable = retryable
        """Every failing rank's error was Retryable."""

    def wait_for_every_rank(self) -> None:
        """Return once every rank has reached this point (call it after reporting the error).

        Every rank raises this at the same collective, so all are alive to meet here; without it
        the first rank to exit makes torchrun stop the others before they have said why.
        """
        dist.barrier(group=self.group)


def on_all_ranks(step: Callable[[], T], expected: tuple[type[BaseException], ...] = (Exception,), group=None) -> T:
    """Run `step` on every rank, then raise the first rank's error everywhere if any rank failed.

    Used around start-up work (config, data and tokenizer checks) that must not leave the
    healthy ranks waiting in a collective for a rank that already gave up.
    """
    try:
        result, error = step(), None
    except expected as e:
        result, error = None, (f"{e}", isinstance(e, Retryable))
    # One small all-reduce says whether any rank failed; the messages are gathered (pickled,
    # two collectives) only then. Snapshots run this every step.
    if not any_rank(error is not None, group):
        return result
    errors: list[tuple[str, bool] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    failed = [(rank, error) for rank, error in enumerate(errors) if error]
    if failed:
        rank, (message, _) = failed[0]
        others = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
        retryable = all(retry for _, (_, retry) in failed)
        raise RankFailed(f"{message} [rank {rank}{others}]", group, retryable)
    return result


def any_rank(flag: bool, group=None) -> bool:
    """Whether `flag` is set on any rank of `group`: one small all-reduce (NCCL reduces only
    tensors on the GPU)."""
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend(group) == "nccl" else "cpu"
    flags = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return bool(flags.item())

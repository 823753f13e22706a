"""Documents packed into micro-batches: who trains on which document, and how each rank's
documents fill its micro-batches.

Pure functions of the documents' lengths and the step's plan, so every rank computes the same
answer for the whole data-parallel group without talking to the others. A plan splits the
data-parallel ranks into sequence-parallel groups (parallel/plan.py); without the planner
every rank is a group of its own. A packed micro-batch holds whole documents back to back with
their cumulative lengths, so that attention and the loss stay inside each document and
positions restart at each one; the tail is padding that no loss reaches. On a group of
several ranks each rank holds an equal slice of the micro-batch's tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from parallel.plan import Group, in_rounds
from trainer.errors import DataError


@dataclass(frozen=True)
class PackedMicroBatch:
    """One micro-batch of whole documents: `tokens[i]` is read to predict `labels[i]`."""

    tokens: np.ndarray
    """[T] int64: the documents' inputs back to back, then padding."""
    labels: np.ndarray
    """[T] int64: each input's next token within its own document."""
    loss_mask: np.ndarray
    """[T] float32: 1 where a prediction counts, 0 on padding."""
    positions: np.ndarray
    """[T] int64: the position of each token within its document (0 at every document's start)."""
    cu_seqlens: np.ndarray
    """[documents + 1] int32: where each document starts and the last ends; padding counts as
    one more document, so that the lengths cover all T tokens. On a group of several ranks,
    those of the whole micro-batch, of which the other fields hold this rank's slice."""
    group: tuple[int, int] = (0, 1)
    """(first data-parallel rank, size) of the sequence-parallel group that runs the micro-batch."""

    @property
    def num_tokens(self) -> int:
        """Predictions that count (the loss's denominator)."""
        return int(self.loss_mask.sum())


def split_by_tokens(lengths: np.ndarray, ranks: int) -> list[np.ndarray]:
    """The documents (indices into `lengths`) each of `ranks` ranks trains on, balancing tokens:
    longest first, each to the rank with the fewest tokens so far (the lowest such rank on a
    tie). Every rank gets its documents in batch order."""
    if ranks < 1:
        raise DataError(f"ranks must be >= 1, got {ranks}")
    load = np.zeros(ranks, dtype=np.int64)
    owner = np.empty(len(lengths), dtype=np.int64)
    for i in np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable"):
        rank = int(np.argmin(load))
        owner[i] = rank
        load[rank] += lengths[i]
    return [np.flatnonzero(owner == rank) for rank in range(ranks)]


def pack_documents(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Documents (indices into `lengths`) grouped into micro-batches of at most `capacity`
    tokens: first fit, longest first; each micro-batch's documents in batch order."""
    if capacity < 1:
        raise DataError(f"a micro-batch must hold at least one token, got capacity {capacity}")
    too_long = [int(n) for n in lengths if n > capacity]
    if too_long:
        raise DataError(f"a document of {too_long[0]} tokens does not fit a micro-batch of {capacity} tokens")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable"):
        n = int(lengths[i])
        fit = next((b for b, left in enumerate(room) if left >= n), None)
        if fit is None:
            fit = len(bins)
            bins.append([])
            room.append(capacity)
        bins[fit].append(int(i))
        room[fit] -= n
    return [np.array(sorted(b), dtype=np.int64) for b in bins]


def packed_micro_batch(samples: list[np.ndarray], length: int) -> PackedMicroBatch:
    """`samples` (each a document's tokens: inputs and, shifted by one, labels) back to back,
    padded to `length` input tokens."""
    inputs = [s[:-1] for s in samples]
    used = sum(len(x) for x in inputs)
    if used > length:
        raise DataError(f"{used} tokens of documents do not fit a micro-batch of {length}")
    pad = length - used
    tokens = np.zeros(length, dtype=np.int64)
    labels = np.zeros(length, dtype=np.int64)
    positions = np.zeros(length, dtype=np.int64)
    loss_mask = np.zeros(length, dtype=np.float32)
    bounds = [0]
    for sample, x in zip(samples, inputs, strict=True):
        start, end = bounds[-1], bounds[-1] + len(x)
        tokens[start:end], labels[start:end] = x, sample[1:]
        positions[start:end] = np.arange(len(x))
        loss_mask[start:end] = 1.0
        bounds.append(end)
    if pad:
        positions[used:] = np.arange(pad)
        bounds.append(length)
    return PackedMicroBatch(tokens, labels, loss_mask, positions, np.array(bounds, dtype=np.int32))


def balanced_groups(lengths: np.ndarray, ranks: int, capacity: int) -> tuple[Group, ...]:
    """The plan without the planner: every rank a group of its own, the documents balanced by
    tokens (split_by_tokens) and packed into micro-batches of `capacity` tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    groups = []
    for rank, share in enumerate(split_by_tokens(lengths, ranks)):
        packs = pack_documents(lengths[share], capacity)
        groups.append(Group(rank, 1, tuple(tuple(int(i) for i in share[p]) for p in packs)))
    return tuple(groups)


def rank_micro_batches(
    groups: Sequence[Group],
    dp_rank: int,
    sample: Callable[[int], np.ndarray],
    multiple: int,
    tokens_per_rank: int | None = None,
) -> list[PackedMicroBatch]:
    """This rank's slices of its groups' micro-batches, round by round; `sample(i)` reads the
    step's document i.

    A micro-batch is padded to `tokens_per_rank` tokens per rank when given (pipelines send
    activations of one fixed shape), else to the next multiple of the group's size x `multiple`
    (tensor-parallel sequence parallelism splits each slice again). A rank whose groups have no
    document runs one micro-batch of padding alone: every rank joins the step's collectives
    outside its groups (the gradient reduction, the loss)."""
    batches = []
    for round_ in in_rounds(groups):
        group = next((g for g in round_ if g.start <= dp_rank < g.start + g.size), None)
        if group is None:
            raise DataError(f"the step's plan gives data-parallel rank {dp_rank} no group in round {round_[0].round}")
        for pack in group.microbatches:
            batches.append(_rank_slice_of_pack(group, dp_rank, [sample(i) for i in pack], multiple, tokens_per_rank))
    if not batches:
        alone = Group(dp_rank, 1, ((),))
        batches.append(_rank_slice_of_pack(alone, dp_rank, [], multiple, tokens_per_rank))
    return batches


def _rank_slice_of_pack(
    group: Group, dp_rank: int, samples: list[np.ndarray], multiple: int, tokens_per_rank: int | None
) -> PackedMicroBatch:
    quantum = group.size * multiple
    used = sum(len(s) - 1 for s in samples)
    length = group.size * tokens_per_rank if tokens_per_rank else max(quantum, -(-used // quantum) * quantum)
    return rank_slice(packed_micro_batch(samples, length), group, dp_rank - group.start)


def rank_slice(batch: PackedMicroBatch, group: Group, index: int) -> PackedMicroBatch:
    """The `index`-th of the group's equal slices of a micro-batch's tokens; the documents'
    cumulative lengths stay those of the whole micro-batch."""
    n = len(batch.tokens) // group.size
    part = slice(index * n, (index + 1) * n)
    return replace(
        batch,
        tokens=batch.tokens[part],
        labels=batch.labels[part],
        loss_mask=batch.loss_mask[part],
        positions=batch.positions[part],
        group=(group.start, group.size),
    )

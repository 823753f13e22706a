"""What a sequence-sharding plan is, how it is checked and what it costs.

A plan splits one step's global batch over the data-parallel ranks. It partitions the
ranks into groups of power-of-two sizes, each aligned to a multiple of its size so that all
their process groups can be created once at start-up. A group runs its sequences with
Ulysses sequence parallelism over its ranks, packed into micro-batches of at most
size x tokens_per_rank tokens, one after another. Groups meet only at the gradient
all-reduce, so a round lasts as long as its slowest group.

A step may run in rounds, one after another, the ranks partitioned anew for each: the
documents too long for one rank on wide groups first, then the rest on narrow ones, so that
short documents do not pay a wide group's all-to-all only because a long one shares their
step. The step lasts as long as its rounds together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from parallel.cost_model import CostModel


class PlanError(ValueError):
    """A batch that cannot be planned, or a plan that breaks a rule; the message says which."""


def largest_group(heads_per_rank: int) -> int:
    """The largest group attention heads allow: Ulysses splits each rank's query heads evenly
    over its group, so the size is the largest power of two that divides them."""
    return heads_per_rank & -heads_per_rank


@dataclass(frozen=True)
class Cluster:
    ranks: int
    """Data-parallel ranks the plan splits (sequence-parallel groups are carved out of them)."""
    ranks_per_node: int
    """Ranks that share a node; a group that spans nodes pays the slower all-to-all."""
    largest_group: int | None = None
    """The largest group the model allows: a group splits each rank's attention heads, so it can
    be no larger than they allow (largest_group). None: no limit but the ranks."""
    rounds: bool = True
    """Whether a step may run in rounds that regroup the ranks. Pipelines may not: each stage
    interleaves its micro-batches' forward and backward passes by their count (1F1B), so two
    ranks with different counts could meet a shared group's collectives in different orders."""

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise PlanError(f"ranks must be >= 1, got {self.ranks}")
        rpn = self.ranks_per_node
        if rpn < 1 or rpn & (rpn - 1):
            raise PlanError(f"ranks per node must be a power of two, got {rpn}")
        if self.ranks > rpn and self.ranks % rpn:
            raise PlanError(f"{self.ranks} ranks do not fill whole nodes of {rpn}")
        if self.largest_group is not None and self.largest_group < 1:
            raise PlanError(f"the largest group must be >= 1, got {self.largest_group}")

    def group_sizes(self) -> list[int]:
        """Every power of two up to the ranks and the largest group: the sizes a group may take."""
        limit = min(self.ranks, self.largest_group or self.ranks)
        return [1 << k for k in range(limit.bit_length()) if 1 << k <= limit]

    @property
    def widest(self) -> int:
        """The largest size a group may take."""
        return self.group_sizes()[-1]

    def crosses_nodes(self, start: int, size: int) -> bool:
        return start // self.ranks_per_node != (start + size - 1) // self.ranks_per_node


@dataclass(frozen=True)
class Group:
    start: int
    """First rank of the group; a multiple of size."""
    size: int
    """Ranks in the group, a power of two."""
    microbatches: tuple[tuple[int, ...], ...]
    """Indices into the step's lengths: the sequences of each micro-batch, packed in this order."""
    round: int = 0
    """The round of the step the group runs in; each round's groups partition the ranks."""

    @property
    def sequences(self) -> tuple[int, ...]:
        return tuple(i for mb in self.microbatches for i in mb)


@dataclass(frozen=True)
class Plan:
    groups: tuple[Group, ...]
    """Each round's partition of the ranks, in rank order, rounds in the order they run."""
    estimated_time: float
    """Seconds the step takes under the cost model: each round's slowest group, summed over the rounds."""
    lower_bound: float
    """Seconds no plan can beat (proven); estimated_time / lower_bound - 1 bounds how far from optimal it is."""
    method: str
    """How the plan was found: optimal (it meets the bound), mip-*, or greedy."""
    solve_seconds: float = 0.0
    """Wall seconds until this plan was in hand."""
    first_plan_seconds: float = 0.0
    """Wall seconds until the greedy construction had a feasible plan, before the MIP began improving it."""

    @property
    def rounds(self) -> list[tuple[Group, ...]]:
        return in_rounds(self.groups)

    def describe(self) -> str:
        """The group sizes, round by round: "2" or "2; 1,1"."""
        return "; ".join(",".join(str(g.size) for g in groups) for groups in self.rounds)

    @property
    def gap(self) -> float:
        """(estimated - lower bound) / estimated: 0 when the plan is proven optimal."""
        return max(0.0, 1.0 - self.lower_bound / self.estimated_time) if self.estimated_time > 0 else 0.0


def check_lengths(lengths: Sequence[int] | np.ndarray, cluster: Cluster, model: CostModel) -> np.ndarray:
    """The batch as an int64 array; raises PlanError on an empty batch, a bad length, or one nothing can hold."""
    array = np.asarray(lengths)
    if array.ndim != 1 or array.size == 0:
        raise PlanError("the batch is empty: there are no sequences to plan")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise PlanError(f"sequence lengths must be whole numbers of tokens; got {array[:5].tolist()} ...")
        array = array.astype(np.int64)
    bad = np.flatnonzero(array <= 0)
    if bad.size:
        raise PlanError(f"sequence {bad[0]} has length {array[bad[0]]}: lengths must be positive")
    widest = cluster.widest
    capacity = widest * model.tokens_per_rank
    too_long = np.flatnonzero(array > capacity)
    if too_long.size:
        i = too_long[0]
        raise PlanError(
            f"sequence {i} has {array[i]:,} tokens, more than the largest group of {widest} ranks holds "
            f"({widest} x {model.tokens_per_rank:,} tokens per rank = {capacity:,}); "
            "clip or split it, or plan over more ranks"
        )
    return array.astype(np.int64)


def group_time(group: Group, lengths: np.ndarray, model: CostModel, cluster: Cluster) -> float:
    cross = cluster.crosses_nodes(group.start, group.size)
    return sum(model.group_time([int(lengths[i]) for i in mb], group.size, cross) for mb in group.microbatches)


def in_rounds(groups: Sequence[Group]) -> list[tuple[Group, ...]]:
    """The groups of each round, rounds in order."""
    return [tuple(g for g in groups if g.round == r) for r in sorted({g.round for g in groups})]


def plan_time(groups: Sequence[Group], lengths: np.ndarray, model: CostModel, cluster: Cluster) -> float:
    """Each round lasts as long as its slowest group, and the rounds run one after another."""
    return sum(max(group_time(g, lengths, model, cluster) for g in round_) for round_ in in_rounds(groups))


def pack_microbatches(sequences: Sequence[int], lengths: np.ndarray, capacity: int) -> tuple[tuple[int, ...], ...]:
    """First-fit decreasing: the fewest micro-batches this simple rule finds, longest sequences first."""
    bins: list[list[int]] = []
    used: list[int] = []
    for i in sorted(sequences, key=lambda i: (-int(lengths[i]), i)):
        b = next((b for b in range(len(bins)) if used[b] + lengths[i] <= capacity), None)
        if b is None:
            bins.append([])
            used.append(0)
            b = len(bins) - 1
        bins[b].append(int(i))
        used[b] += int(lengths[i])
    return tuple(tuple(b) for b in bins)


def place_groups(sizes: Sequence[int]) -> list[int]:
    """Start ranks for groups of these power-of-two sizes: largest first, so every start is a multiple of its size."""
    order = sorted(range(len(sizes)), key=lambda k: -sizes[k])
    starts = [0] * len(sizes)
    offset = 0
    for k in order:
        starts[k] = offset
        offset += sizes[k]
    return starts


def check_plan(plan: Plan, lengths: np.ndarray, cluster: Cluster, model: CostModel) -> None:
    """Raise PlanError unless each round's groups partition the ranks (and the cluster allows rounds),
    every sequence runs exactly once and every micro-batch fits its group's memory."""
    rounds = in_rounds(plan.groups)
    if len(rounds) > 1 and not cluster.rounds:
        raise PlanError(f"the plan runs in {len(rounds)} rounds; this cluster's ranks may not regroup within a step")
    for groups in rounds:
        _check_partition(groups, cluster)
    seen = np.zeros(len(lengths), dtype=np.int64)
    for g in plan.groups:
        for mb in g.microbatches:
            if not mb:
                raise PlanError(f"group at rank {g.start} has an empty micro-batch")
            if any(not 0 <= i < len(lengths) for i in mb):
                raise PlanError(f"group at rank {g.start} names a sequence not in the batch: {mb}")
            tokens = int(sum(int(lengths[i]) for i in mb))
            if not model.fits(tokens, g.size):
                raise PlanError(
                    f"group at rank {g.start} of {g.size} packs {tokens:,} tokens in one micro-batch, over its "
                    f"capacity {g.size * model.tokens_per_rank:,}"
                )
            seen[list(mb)] += 1
    wrong = np.flatnonzero(seen != 1)
    if wrong.size:
        raise PlanError(f"sequence {wrong[0]} is planned {seen[wrong[0]]} times, not once")


def _check_partition(groups: Sequence[Group], cluster: Cluster) -> None:
    covered = np.zeros(cluster.ranks, dtype=np.int64)
    for g in groups:
        if g.size < 1 or g.size & (g.size - 1):
            raise PlanError(f"group at rank {g.start} has size {g.size}, not a power of two")
        if g.size > cluster.widest:
            widest = cluster.widest
            raise PlanError(f"group at rank {g.start} has size {g.size}, more than the largest allowed ({widest})")
        if g.start % g.size or g.start < 0 or g.start + g.size > cluster.ranks:
            raise PlanError(f"group [{g.start}, {g.start + g.size}) is not an aligned block of the ranks")
        covered[g.start : g.start + g.size] += 1
    if np.any(covered != 1):
        rank = int(np.flatnonzero(covered != 1)[0])
        raise PlanError(f"rank {rank} is in {covered[rank]} groups of round {groups[0].round}, not exactly one")

"""What the planner is measured against, scored by the same cost model on the same batches.

- Static sequence parallelism (Megatron-LM's context parallelism, DeepSpeed-Ulysses as usually run): one
  degree d for the whole run, at least what the run's maximum sequence length needs (the degree is set
  in the launch configuration, before any batch is seen). The ranks form groups of d; each
  group takes sequences longest first onto the least-loaded group and packs them into micro-batches of at
  most d x tokens_per_rank (first-fit decreasing). Groups run their micro-batches back to back and meet
  only at the gradient all-reduce, so a step lasts as long as the busiest group.
- The best homogeneous degree per batch: the same, with d chosen again for every batch.
- megatron-core's BalancedCPScheduler (hybrid context parallelism), run through its own code: it forms
  rounds of sequences with power-of-two CP sizes, each sequence its own micro-batch, and a barrier ends
  every round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from parallel.cost_model import CostModel
from parallel.plan import Cluster, PlanError, check_lengths


@dataclass(frozen=True)
class Baseline:
    name: str
    estimated_time: float
    """Seconds of the step under the cost model."""
    detail: str
    """The degree chosen, the number of rounds, and so on: for the report."""


def homogeneous_time(lengths: np.ndarray, cluster: Cluster, model: CostModel, degree: int) -> float:
    """One step with every group of `degree` ranks; inf when a sequence does not fit or degree does not divide."""
    if cluster.ranks % degree or lengths.max() > degree * model.tokens_per_rank:
        return float("inf")
    cross = degree > cluster.ranks_per_node
    groups = cluster.ranks // degree
    times = np.asarray(model.time(lengths.astype(np.float64), degree, cross))
    members: list[list[int]] = [[] for _ in range(groups)]
    loads = np.zeros(groups)
    for i in np.argsort(-times, kind="stable"):
        g = int(np.argmin(loads))
        members[g].append(int(i))
        loads[g] += times[i]
    return max(_group_with_microbatches(lengths[m], times[m], degree, model) for m in members)


def _group_with_microbatches(lengths: np.ndarray, times: np.ndarray, degree: int, model: CostModel) -> float:
    """A group's time: its sequences' times plus one overhead per micro-batch of first-fit-decreasing packing."""
    if not len(lengths):
        return 0.0
    capacity = degree * model.tokens_per_rank
    bins: list[int] = []
    for s in sorted(lengths.tolist(), reverse=True):
        b = next((b for b, used in enumerate(bins) if used + s <= capacity), None)
        if b is None:
            bins.append(s)
        else:
            bins[b] += s
    return float(times.sum()) + model.microbatch_overhead * len(bins)


def degrees_that_fit(longest: int, cluster: Cluster, model: CostModel) -> list[int]:
    return [d for d in cluster.group_sizes() if cluster.ranks % d == 0 and longest <= d * model.tokens_per_rank]


def best_static(
    batches: Sequence[np.ndarray], max_length: int, cluster: Cluster, model: CostModel
) -> tuple[int, list[float]]:
    """Of the degrees that hold the run's maximum length, the one that makes these batches fastest, and
    each batch's time under it."""
    longest = max(max_length, *(int(b.max()) for b in batches))
    degrees = degrees_that_fit(longest, cluster, model)
    if not degrees:
        raise PlanError(f"no static degree holds a {longest:,}-token sequence on {cluster.ranks} ranks")
    per_degree = {d: [homogeneous_time(b, cluster, model, d) for b in batches] for d in degrees}
    degree = min(per_degree, key=lambda d: sum(per_degree[d]))
    return degree, per_degree[degree]


def best_homogeneous(lengths: np.ndarray, cluster: Cluster, model: CostModel) -> Baseline:
    """The best single degree for this batch alone."""
    lengths = check_lengths(lengths, cluster, model)
    degrees = degrees_that_fit(int(lengths.max()), cluster, model)
    times = {d: homogeneous_time(lengths, cluster, model, d) for d in degrees}
    degree = min(times, key=times.get)
    return Baseline("homogeneous", times[degree], f"degree {degree}")


class _GroupOfSize:
    """BalancedCPScheduler reads only the size of its DP x CP process group, so it can plan offline."""

    def __init__(self, ranks: int):
        self.ranks = ranks

    def size(self) -> int:
        return self.ranks


def megatron_balanced_cp(lengths: np.ndarray, cluster: Cluster, model: CostModel) -> Baseline:
    """Schedule the batch with megatron-core's BalancedCPScheduler and score its rounds with the cost model."""
    from megatron.core.pipeline_parallel.hybrid_cp_schedule import BalancedCPScheduler

    lengths = check_lengths(lengths, cluster, model)
    scheduler = BalancedCPScheduler(model.tokens_per_rank, _GroupOfSize(cluster.ranks))
    samples = [(i, int(s)) for i, s in enumerate(lengths)]
    _, sample_ids = scheduler.get_groups_and_subsamples(samples, None)
    scheduled = sorted({int(i) for ids in sample_ids for rank in ids for i in rank})
    if scheduled != list(range(len(lengths))):
        raise PlanError(f"BalancedCPScheduler left out sequences {sorted(set(range(len(lengths))) - set(scheduled))}")
    total = sum(_megatron_round_time(ids, lengths, cluster, model) for ids in sample_ids)
    return Baseline("megatron", total, f"{len(sample_ids)} rounds")


def _megatron_round_time(ids_per_rank: list[list[int]], lengths: np.ndarray, cluster: Cluster, model: CostModel):
    """A round lasts as long as its busiest rank: each of its sequences is one micro-batch on the ranks sharing it."""
    ranks_of: dict[int, list[int]] = {}
    for rank, ids in enumerate(ids_per_rank):
        for i in ids:
            ranks_of.setdefault(int(i), []).append(rank)
    busiest = 0.0
    for ids in ids_per_rank:
        seconds = 0.0
        for i in ids:
            ranks = ranks_of[int(i)]
            cross = cluster.crosses_nodes(min(ranks), max(ranks) - min(ranks) + 1)
            seconds += model.time(float(lengths[i]), len(ranks), cross) + model.microbatch_overhead
        busiest = max(busiest, seconds)
    return busiest

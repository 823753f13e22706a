"""The heterogeneity-adaptive sequence-sharding planner.

Given one step's sequence lengths, it chooses the group sizes and which sequences each group
runs so that the slowest group finishes as early as possible (FlexSP's formulation), each
group packing its sequences into micro-batches that fit its memory.

The heart is a mixed-integer program solved by HiGHS. It places the longest sequences one by
one and spreads the others fluidly over group sizes, which keeps it small, keeps its bound a
proven lower bound, and is exact when every sequence is placed one by one. Greedy plans
warm-start it and stand in when it reaches its time limit; every plan is then polished by
moving and swapping sequences out of the slowest group.

`plan_step` is a pure function; parallel/plan_ahead.py runs it for the next step in a
background process while the current step trains.
"""

from __future__ import annotations

import functools
import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import highspy
import numpy as np

from parallel.config import PlannerConfig
from parallel.cost_model import CostModel
from parallel.plan import Cluster, Group, Plan, PlanError, check_lengths, pack_microbatches, place_groups, plan_time

# -- the problem, seen by every algorithm ------------------------------------------------------------------


@dataclass
class Problem:
    """One step's sequences and, per candidate group size, their times."""

    lengths: np.ndarray
    cluster: Cluster
    model: CostModel
    sizes: list[int]
    """Candidate group sizes (powers of two)."""
    times: np.ndarray
    """times[i, k]: seconds of sequence i on a group of sizes[k] (spanning nodes when that size must)."""
    holds: np.ndarray
    """holds[k]: tokens one micro-batch of a group of sizes[k] may pack."""

    def fits(self, i: int, k: int) -> bool:
        return self.lengths[i] <= self.holds[k]

    @functools.cached_property
    def as_lists(self) -> tuple[list[list[float]], list[int], list[float]]:
        """times, lengths and holds as Python lists: a loop over sequences reads them a hundred
        times faster than numpy scalars."""
        return self.times.tolist(), self.lengths.tolist(), self.holds.tolist()


def make_problem(lengths: np.ndarray, cluster: Cluster, model: CostModel) -> Problem:
    sizes = cluster.group_sizes()
    times = np.empty((len(lengths), len(sizes)))
    for k, d in enumerate(sizes):
        # Groups are aligned blocks, so a group spans nodes exactly when it is larger than one.
        times[:, k] = model.time(lengths.astype(np.float64), d, d > cluster.ranks_per_node)
    holds = np.array(sizes, dtype=np.float64) * model.tokens_per_rank
    return Problem(lengths, cluster, model, sizes, times, holds)


# -- the proven lower bound --------------------------------------------------------------------------------


def fluid_lower_bound(problem: Problem) -> float:
    """The smallest T no plan can beat: every sequence runs on some group within T (with one micro-batch
    overhead), and all of them need no more rank-seconds than ranks x T, each at its cheapest allowed size."""
    overhead = problem.model.microbatch_overhead
    eligible = problem.lengths[:, None] <= problem.holds[None, :]
    alone = np.where(eligible, problem.times, np.inf).min(axis=1) + overhead
    # No overhead here: one micro-batch may carry many sequences.
    rank_seconds = problem.times * np.array(problem.sizes)[None, :]

    def demand(t: float) -> float:
        usable = eligible & (problem.times + overhead <= t)
        return float(np.where(usable, rank_seconds, np.inf).min(axis=1).sum())

    low = high = float(alone.max())
    if demand(low) <= problem.cluster.ranks * low:
        return low
    while demand(high) > problem.cluster.ranks * high:
        high *= 2
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if demand(mid) > problem.cluster.ranks * mid else (low, mid)
    return low


# -- concrete assignments: loads, greedy construction, polish -----------------------------------------------


@dataclass
class Assignment:
    """Groups as size indices with the positions of their sequences."""

    size_of: list[int]
    members: list[list[int]]

    def load(self, problem: Problem, g: int) -> float:
        """Sum of times plus one overhead per micro-batch (counted as the fewest the tokens allow)."""
        m = self.members[g]
        if not m:
            return 0.0
        k = self.size_of[g]
        batches = math.ceil(problem.lengths[m].sum() / problem.holds[k])
        return float(problem.times[m, k].sum()) + problem.model.microbatch_overhead * batches

    def makespan(self, problem: Problem) -> float:
        return max(self.load(problem, g) for g in range(len(self.members)))


def smallest_sizes(problem: Problem, limit: float) -> np.ndarray:
    """Per sequence, the smallest size that holds it and runs it within limit, else the largest size."""
    holds = problem.lengths[:, None] <= problem.holds[None, :]
    within = holds & (problem.times <= limit)
    return np.where(within.any(axis=1), np.argmax(within, axis=1), len(problem.sizes) - 1)


def greedy_homogeneous(problem: Problem, k: int) -> Assignment | None:
    """Every group of size sizes[k]; sequences longest first, each to the least-loaded group."""
    d = problem.sizes[k]
    if problem.cluster.ranks % d or problem.lengths.max() > problem.holds[k]:
        return None
    groups = problem.cluster.ranks // d
    a = Assignment([k] * groups, [[] for _ in range(groups)])
    loads = [(0.0, g) for g in range(groups)]  # a heap: the least loaded group, the lowest on a tie
    times = problem.times[:, k]
    for i in np.argsort(-times, kind="stable").tolist():
        load, g = loads[0]
        a.members[g].append(i)
        heapq.heapreplace(loads, (load + float(times[i]), g))
    return a


def greedy_within(problem: Problem, limit: float, wide_first: bool = False) -> Assignment | None:
    """A plan whose groups all finish within `limit`, or None if this construction finds none.

    Each sequence takes the smallest group size that runs it within the limit (the fewest rank-seconds).
    Sequences that need two or more ranks go first-fit, longest first, into groups of their size; every
    rank left over becomes a one-rank group; the rest go longest first to the one-rank group that finishes
    them first, else to any group with time to spare. With wide_first, the wider groups' spare time is
    filled first, longest first: a long sequence pays a wide group's fixed all-to-all cost least often.
    """
    o = problem.model.microbatch_overhead
    wanted = smallest_sizes(problem, limit - o)
    if np.any(problem.times[np.arange(len(wanted)), wanted] + o > limit):
        return None
    size_of: list[int] = []
    members: list[list[int]] = []
    loads: list[float] = []
    times, sizes = problem.as_lists[0], problem.sizes
    wanted = wanted.tolist()
    wide = [i for i, k in enumerate(wanted) if sizes[k] > 1]
    for i in sorted(wide, key=lambda i: (-sizes[wanted[i]], -times[i][wanted[i]])):
        k, t = wanted[i], times[i][wanted[i]] + o
        g = next((g for g in range(len(members)) if size_of[g] == k and loads[g] + t <= limit), None)
        if g is None:
            size_of.append(k)
            members.append([])
            loads.append(0.0)
            g = len(members) - 1
        members[g].append(i)
        loads[g] += t
    free = problem.cluster.ranks - sum(problem.sizes[k] for k in size_of)
    if free < 0:
        return None
    a = Assignment(size_of + [0] * free, members + [[] for _ in range(free)])
    narrow = sorted((i for i, k in enumerate(wanted) if sizes[k] == 1), key=lambda i: -times[i][0])
    return _fill(problem, a, narrow, limit, wide_first)


def _fill(problem: Problem, a: Assignment, order: list[int], limit: float, wide_first: bool) -> Assignment | None:
    """Each sequence of `order` in turn to the group that finishes it first, preferring one-rank
    groups (or, with wide_first, the wider ones) while one of them finishes it within `limit`.

    All groups of one size add the same time for a sequence, so per size the group that finishes
    first is the one whose own finishing time is least: one heap per size answers in log time."""
    o = problem.model.microbatch_overhead
    heaps: dict[int, list[tuple[float, int]]] = {}
    work: list[float] = []
    tokens: list[float] = []
    for g, (m, k) in enumerate(zip(a.members, a.size_of, strict=True)):
        work.append(float(problem.times[m, k].sum()))
        tokens.append(float(problem.lengths[m].sum()))
        heaps.setdefault(k, []).append((_finish(work[g], tokens[g], float(problem.holds[k]), o), g))
    for heap in heaps.values():
        heapq.heapify(heap)
    preferred = [k for k in heaps if (k == 0) != wide_first]
    others = [k for k in heaps if (k == 0) == wide_first]
    times, lengths, holds = problem.as_lists
    for i in order:
        best = None
        for sizes in (preferred, others):
            for k in sizes:
                if lengths[i] <= holds[k]:
                    key, g = heaps[k][0]
                    candidate = (key + times[i][k], g, k)
                    if candidate[0] <= limit and (best is None or candidate[:2] < best[:2]):
                        best = candidate
            if best is not None:
                break
        if best is None:
            return None
        _, g, k = best
        a.members[g].append(int(i))
        work[g] += times[i][k]
        tokens[g] += lengths[i]
        heapq.heapreplace(heaps[k], (_finish(work[g], tokens[g], holds[k], o), g))
    return a


def _finish(work: float, tokens: float, holds: float, overhead: float) -> float:
    """When a group would finish, before the time of what it is given next: its work, and one more
    overhead than its tokens may need (an upper bound on its micro-batches once it grows)."""
    return work + overhead * (math.ceil(tokens / holds) + 1)


BISECTION_TOLERANCE = 0.002
"""The bisection stops once its bracket is this narrow (relative): finer limits change the plan's time
by less than the cost model's own error, and each try is a full greedy fill (25 ms at 512 ranks)."""


def greedy_bisection(
    problem: Problem, lower: float, upper: float, wide_first: bool, steps: int = 12
) -> Assignment | None:
    """The tightest limit greedy_within meets, found by bisection between a bound and a plan's time."""
    best = greedy_within(problem, upper, wide_first)
    if best is None:
        return None
    upper = best.makespan(problem)
    for _ in range(steps):
        if upper <= lower * (1 + BISECTION_TOLERANCE):
            break
        limit = (lower + upper) / 2
        found = greedy_within(problem, limit, wide_first)
        if found is None:
            lower = limit
        else:
            best, upper = found, found.makespan(problem)
    return best


def polish(problem: Problem, assignment: Assignment, max_moves: int = 5000) -> Assignment:
    """Move or swap sequences out of the slowest group while that lowers the step's time."""
    state = _Loads(problem, assignment)
    for _ in range(max_moves):
        if not (state.move_out_of_worst() or state.swap_out_of_worst()):
            break
    return assignment


class _Loads:
    """An assignment with its group loads and tokens kept current, for cheap what-if questions."""

    def __init__(self, problem: Problem, a: Assignment):
        self.p, self.a = problem, a
        self.size = np.array(a.size_of, dtype=np.int64)
        self.holds = problem.holds[self.size]
        self.group_of = np.full(len(problem.lengths), -1, dtype=np.int64)
        for g, m in enumerate(a.members):
            self.group_of[m] = g
        self.work = np.array([problem.times[m, k].sum() for m, k in zip(a.members, a.size_of, strict=True)])
        self.tokens = np.array([problem.lengths[m].sum() for m in a.members], dtype=np.float64)
        self.loads = self._load(self.work, self.tokens, self.holds)

    def _load(self, work: np.ndarray, tokens: np.ndarray, holds: np.ndarray) -> np.ndarray:
        return work + self.p.model.microbatch_overhead * np.ceil(tokens / holds)

    def _move(self, i: int, g: int) -> None:
        f = int(self.group_of[i])
        self.a.members[f].remove(i)
        self.a.members[g].append(i)
        self.group_of[i] = g
        for h, sign in ((f, -1.0), (g, 1.0)):
            self.work[h] += sign * self.p.times[i, self.size[h]]
            self.tokens[h] += sign * self.p.lengths[i]
            self.loads[h] = self._load(self.work[h], self.tokens[h], self.holds[h])

    def move_out_of_worst(self) -> bool:
        p = self.p
        w = int(np.argmax(self.loads))
        top = self.loads[w]
        members = np.array(self.a.members[w])
        if members.size == 0:
            return False
        left = self._load(
            self.work[w] - p.times[members, self.size[w]], self.tokens[w] - p.lengths[members], self.holds[w]
        )
        gained = self._load(
            self.work[None, :] + p.times[members][:, self.size],
            self.tokens[None, :] + p.lengths[members][:, None],
            self.holds[None, :],
        )
        fits = p.lengths[members][:, None] <= self.holds[None, :]
        after = np.where(fits, np.maximum(gained, left[:, None]), np.inf)
        after[:, w] = np.inf
        i, g = np.unravel_index(np.argmin(after), after.shape)
        if after[i, g] >= top * (1 - 1e-9):
            return False
        self._move(int(members[i]), int(g))
        return True

    def swap_out_of_worst(self) -> bool:
        p = self.p
        w = int(np.argmax(self.loads))
        top = self.loads[w]
        others = np.flatnonzero((self.group_of >= 0) & (self.group_of != w))
        if others.size == 0:
            return False
        gs = self.group_of[others]
        kw, kg = self.size[w], self.size[gs]
        for i in sorted(self.a.members[w], key=lambda i: -p.times[i, kw]):
            worst_after = self._load(
                self.work[w] - p.times[i, kw] + p.times[others, kw],
                self.tokens[w] - p.lengths[i] + p.lengths[others],
                self.holds[w],
            )
            other_after = self._load(
                self.work[gs] - p.times[others, kg] + p.times[i, kg],
                self.tokens[gs] - p.lengths[others] + p.lengths[i],
                self.holds[gs],
            )
            fits = (p.lengths[i] <= self.holds[gs]) & (p.lengths[others] <= self.holds[w])
            after = np.where(fits, np.maximum(worst_after, other_after), np.inf)
            j = int(np.argmin(after))
            if after[j] < top * (1 - 1e-9):
                g = int(gs[j])
                self._move(int(i), g)
                self._move(int(others[j]), w)
                return True
        return False


# -- the mixed-integer program -----------------------------------------------------------------------------


def split_long_short(problem: Problem, exact_sequences: int) -> tuple[np.ndarray, np.ndarray]:
    """The sequences the MIP places one by one (the longest-running) and the rest, which it spreads fluidly
    over group sizes: a short sequence moves a group's time too little to be worth branching on."""
    order = np.argsort(-problem.times.min(axis=1), kind="stable")
    return np.sort(order[:exact_sequences]), np.sort(order[exact_sequences:])


@dataclass
class MipResult:
    assignment: Assignment | None
    bound: float
    status: str


def solve_mip(problem: Problem, start: Assignment, config: PlannerConfig) -> MipResult:
    """Minimise the slowest group with HiGHS from a warm start; its best assignment and the bound it proved."""
    mip = _MipModel(problem, config.exact_sequences, start.makespan(problem))
    highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("time_limit", float(config.time_limit_s))
    highs.setOptionValue("mip_rel_gap", float(config.mip_gap))
    highs.setOptionValue("threads", 1)
    highs.setOptionValue("random_seed", 0)
    # Without presolve: HiGHS's presolve of this model checks the clock too rarely (0.1-0.6 s past the
    # limit at 64-256 ranks) and, cut short, leaves no proven bound; the solve without it keeps to the limit.
    highs.setOptionValue("presolve", "off")
    mip.pass_to(highs)
    solution = highspy.HighsSolution()
    solution.col_value = list(mip.columns_of(start))
    solution.value_valid = True
    highs.setSolution(solution)
    highs.run()
    status = highs.modelStatusToString(highs.getModelStatus())
    info = highs.getInfo()
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else 0.0
    if info.primal_solution_status != 2:  # no feasible solution in hand
        return MipResult(None, bound, status)
    return MipResult(mip.assignment_of(np.asarray(highs.getSolution().col_value)), bound, status)


class _MipModel:
    """A relaxation of the step's problem that is exact for the long sequences, so its bound is proven.

    Per group size d: "slots", groups that may take long sequences (as many as there are long sequences
    that may use d), each with a switch u, a binary x per long sequence, fluid short work w, fluid short
    tokens v and a micro-batch count m; and "plain" groups that take only fluid short work, counted in
    binary digits z, with work P, tokens V and micro-batches M in total. Short sequence i spreads over sizes
    as y[i, d] in [0, 1]. The plain groups' capacity, count x T, is linear through the digits: each T * z is
    a column held to it by McCormick's inequalities, exact because z is binary and T <= `upper`.
    """

    def __init__(self, problem: Problem, exact_sequences: int, upper: float):
        self.p, self.upper = problem, upper
        self.long, self.short = split_long_short(problem, exact_sequences)
        self.lower = fluid_lower_bound(problem)
        self.n_cols = 1  # column 0 is T
        self.slots: list[tuple[int, int, dict[int, int], int, int, int, int]] = []  # size, u, {i: x}, w, v, m, T*u
        self.digits: list[list[tuple[int, int, int]]] = []  # per size: (2^j, z, T*z)
        self.plain: list[tuple[int, int, int]] = []  # per size: (P, V, M)
        self.y: list[dict[int, int]] = []  # per size: {short i: y}
        for k, d in enumerate(problem.sizes):
            fitting = [int(i) for i in self.long if self._usable(int(i), k)]
            for _ in range(min(problem.cluster.ranks // d, len(fitting))):
                u, xs = self._new(), {i: self._new() for i in fitting}
                self.slots.append((k, u, xs, self._new(), self._new(), self._new(), self._new()))
            places = (problem.cluster.ranks // d).bit_length()
            self.digits.append([(1 << j, self._new(), self._new()) for j in range(places)])
            self.plain.append((self._new(), self._new(), self._new()))
            self.y.append({int(i): self._new() for i in self.short if self._usable(int(i), k)})

    def _usable(self, i: int, k: int) -> bool:
        """Sequence i may run on size k: it fits, and alone it finishes within the plan already in hand."""
        return self.p.fits(i, k) and self.p.times[i, k] + self.p.model.microbatch_overhead <= self.upper

    def _new(self) -> int:
        self.n_cols += 1
        return self.n_cols - 1

    def pass_to(self, highs: highspy.Highs) -> None:
        p, inf = self.p, highspy.kHighsInf
        lower, upper = np.zeros(self.n_cols), np.full(self.n_cols, inf)
        integer = np.zeros(self.n_cols, dtype=np.int32)
        lower[0], upper[0] = self.lower * (1 - 1e-9), self.upper * (1 + 1e-9)
        binaries = [u for _, u, *_ in self.slots] + [x for _, _, xs, *_ in self.slots for x in xs.values()]
        binaries += [z for digits in self.digits for _, z, _ in digits]
        upper[binaries], integer[binaries] = 1.0, 1
        integer[[slot[5] for slot in self.slots]] = 1
        integer[[m for _, _, m in self.plain]] = 1
        for ys in self.y:
            upper[list(ys.values())] = 1.0
        highs.addVars(self.n_cols, lower, upper)
        cols = np.arange(self.n_cols, dtype=np.int32)
        cost = np.zeros(self.n_cols)
        cost[0] = 1.0
        highs.changeColsCost(self.n_cols, cols, cost)
        highs.changeColsIntegrality(self.n_cols, cols, integer)
        rows = _Rows()
        self._ranks_and_coverage(rows)
        for s in range(len(self.slots)):
            self._slot(rows, s)
        for k in range(len(p.sizes)):
            self._size(rows, k)
        rows.pass_to(highs)

    def _ranks_and_coverage(self, rows: _Rows) -> None:
        p = self.p
        ranks = {u: p.sizes[k] for k, u, *_ in self.slots}
        for k, digits in enumerate(self.digits):
            ranks.update({z: p.sizes[k] * weight for weight, z, _ in digits})
        rows.add(ranks, p.cluster.ranks, p.cluster.ranks)
        for i in self.long:
            rows.add({xs[int(i)]: 1.0 for _, _, xs, *_ in self.slots if int(i) in xs}, 1.0, 1.0)
        for i in self.short:
            rows.add({ys[int(i)]: 1.0 for ys in self.y if int(i) in ys}, 1.0, 1.0)

    def _slot(self, rows: _Rows, s: int) -> None:
        p, inf = self.p, highspy.kHighsInf
        k, u, xs, w, v, m, tu = self.slots[s]
        load = self._slot_load(s)
        # A slot offers T * u of time: with u fractional, as the LP relaxation has it, only that share.
        rows.add({**load, tu: -1.0}, -inf, 0.0)
        self._mccormick(rows, u, tu)
        for x in xs.values():
            rows.add({x: 1.0, u: -1.0}, -inf, 0.0)
        tokens = {x: float(p.lengths[i]) for i, x in xs.items()}
        rows.add({**tokens, v: 1.0, m: -float(p.holds[k])}, -inf, 0.0)  # micro-batches hold the tokens
        rows.add({m: 1.0, u: -1.0}, 0.0, inf)  # a used slot runs at least one micro-batch
        rows.add({m: 1.0, u: -float(len(p.lengths))}, -inf, 0.0)
        if s + 1 < len(self.slots) and self.slots[s + 1][0] == k:  # symmetry breaking
            rows.add({u: 1.0, self.slots[s + 1][1]: -1.0}, 0.0, inf)
            rows.add(_minus(load, self._slot_load(s + 1)), 0.0, inf)

    def _mccormick(self, rows: _Rows, z: int, tz: int) -> None:
        """tz = T * z for binary z and 0 <= T <= upper, as linear inequalities."""
        inf = highspy.kHighsInf
        rows.add({tz: 1.0, 0: -1.0}, -inf, 0.0)
        rows.add({tz: 1.0, z: -self.upper}, -inf, 0.0)
        rows.add({0: 1.0, tz: -1.0, z: self.upper}, -inf, self.upper)

    def _slot_load(self, s: int) -> dict[int, float]:
        k, _, xs, w, _, m, _ = self.slots[s]
        load = {x: float(self.p.times[i, k]) for i, x in xs.items()}
        load[w] = 1.0
        load[m] = self.p.model.microbatch_overhead
        return load

    def _size(self, rows: _Rows, k: int) -> None:
        p, inf = self.p, highspy.kHighsInf
        work, tokens, batches = self.plain[k]
        ours = [slot for slot in self.slots if slot[0] == k]
        fluid_work = {slot[3]: 1.0 for slot in ours} | {work: 1.0}
        fluid_work.update({y: -float(p.times[i, k]) for i, y in self.y[k].items()})
        rows.add(fluid_work, 0.0, 0.0)
        fluid_tokens = {slot[4]: 1.0 for slot in ours} | {tokens: 1.0}
        fluid_tokens.update({y: -float(p.lengths[i]) for i, y in self.y[k].items()})
        rows.add(fluid_tokens, 0.0, 0.0)
        rows.add({tokens: 1.0, batches: -float(p.holds[k])}, -inf, 0.0)
        capacity = {work: 1.0, batches: p.model.microbatch_overhead}
        for weight, z, tz in self.digits[k]:
            capacity[tz] = -float(weight)
            self._mccormick(rows, z, tz)
        rows.add(capacity, -inf, 0.0)

    def columns_of(self, a: Assignment) -> np.ndarray:
        """A warm start from a concrete assignment (slots cover every group that has a long sequence)."""
        p, values = self.p, np.zeros(self.n_cols)
        is_long = np.zeros(len(p.lengths), dtype=bool)
        is_long[self.long] = True
        free_slots: dict[int, list[int]] = {}
        for s, (k, *_) in enumerate(self.slots):
            free_slots.setdefault(k, []).append(s)
        loads = [a.load(p, g) for g in range(len(a.members))]
        plain_count = [0] * len(p.sizes)
        for g in sorted(range(len(a.members)), key=lambda g: -loads[g]):
            k, members = a.size_of[g], a.members[g]
            short = [i for i in members if not is_long[i]]
            for i in short:
                values[self.y[k][i]] = 1.0
            short_work, short_tokens = float(p.times[short, k].sum()), float(p.lengths[short].sum())
            batches = math.ceil(p.lengths[members].sum() / p.holds[k]) if members else 0
            if any(is_long[i] for i in members):
                _, u, xs, w, v, m, _ = self.slots[free_slots[k].pop(0)]
                values[[u, w, v, m]] = 1.0, short_work, short_tokens, batches
                for i in members:
                    if is_long[i]:
                        values[xs[i]] = 1.0
            else:
                plain_count[k] += 1
                work, tokens, total = self.plain[k]
                values[work] += short_work
                values[tokens] += short_tokens
                values[total] += batches
        t = min(max(max(loads), self.lower), self.upper)
        values[0] = t
        for _, u, *_, tu in self.slots:
            values[tu] = t * values[u]
        for k, digits in enumerate(self.digits):
            for weight, z, tz in digits:
                values[z] = 1.0 if plain_count[k] & weight else 0.0
                values[tz] = t * values[z]
        return values

    def _homes(self, values: np.ndarray) -> dict[int, int]:
        """Per short sequence, the size that carries most of it in the fluid solution (the smallest on a tie)."""
        share = np.full((len(self.p.lengths), len(self.p.sizes)), -np.inf)
        for k, ys in enumerate(self.y):
            if ys:
                share[list(ys), k] = values[list(ys.values())]
        return {int(i): int(np.argmax(share[i])) for i in self.short}

    def assignment_of(self, values: np.ndarray) -> Assignment:
        """Groups from a solution: the used slots with their long sequences and the plain groups; then each
        short sequence, longest first, to the least-loaded group of its size (the size with most of its y)."""
        p = self.p
        size_of, members = [], []
        for k, u, xs, *_ in self.slots:
            if values[u] > 0.5:
                size_of.append(k)
                members.append([i for i, x in xs.items() if values[x] > 0.5])
        for k, digits in enumerate(self.digits):
            count = sum(weight for weight, z, _ in digits if values[z] > 0.5)
            size_of += [k] * count
            members += [[] for _ in range(count)]
        home = self._homes(values)
        times = p.as_lists[0]
        groups = _GroupLoads(p, Assignment(size_of, members))
        for i in sorted(home, key=lambda i: -times[i][home[i]]):
            sizes = [home[i]] if home[i] in groups.heaps else [k for k in groups.heaps if p.fits(i, k)]
            # Its size has no group after all: any group that holds it, the one that finishes it first.
            k = min(sizes, key=lambda k: (groups.heaps[k][0][0] + times[i][k], groups.heaps[k][0][1]))
            groups.add(i, k)
        return groups.a


class _GroupLoads:
    """The groups of an assignment in one heap per size, least loaded first, as sequences are added."""

    def __init__(self, problem: Problem, a: Assignment):
        self.p, self.a = problem, a
        self.work = [float(problem.times[m, k].sum()) for m, k in zip(a.members, a.size_of, strict=True)]
        self.tokens = [float(problem.lengths[m].sum()) for m in a.members]
        self.heaps: dict[int, list[tuple[float, int]]] = {}
        for g, k in enumerate(a.size_of):
            self.heaps.setdefault(k, []).append((self._load(g), g))
        for heap in self.heaps.values():
            heapq.heapify(heap)

    def _load(self, g: int) -> float:
        k = self.a.size_of[g]
        batches = math.ceil(self.tokens[g] / self.p.holds[k]) if self.tokens[g] else 0
        return self.work[g] + self.p.model.microbatch_overhead * batches

    def add(self, i: int, k: int) -> None:
        """Sequence i to the least-loaded group of size k."""
        _, g = self.heaps[k][0]
        self.a.members[g].append(i)
        self.work[g] += self.p.as_lists[0][i][k]
        self.tokens[g] += self.p.as_lists[1][i]
        heapq.heapreplace(self.heaps[k], (self._load(g), g))


class _Rows:
    """Constraint rows gathered as sparse dicts, handed to HiGHS in one call."""

    def __init__(self):
        self.starts, self.index, self.value, self.lower, self.upper = [0], [], [], [], []

    def add(self, coefficients: dict[int, float], lower: float, upper: float) -> None:
        for col, v in coefficients.items():
            if v != 0.0:
                self.index.append(col)
                self.value.append(v)
        self.starts.append(len(self.index))
        self.lower.append(lower)
        self.upper.append(upper)

    def pass_to(self, highs: highspy.Highs) -> None:
        highs.addRows(
            len(self.lower),
            np.array(self.lower, dtype=np.float64),
            np.array(self.upper, dtype=np.float64),
            len(self.index),
            np.array(self.starts[:-1], dtype=np.int32),
            np.array(self.index, dtype=np.int32),
            np.array(self.value, dtype=np.float64),
        )


def _minus(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    out = dict(a)
    for col, v in b.items():
        out[col] = out.get(col, 0.0) - v
    return out


# -- one step -------------------------------------------------------------------------------------------------


POLISH_WITHIN = 0.1
"""Polish only the greedy plans within this fraction of the best one: polishing moves a plan by about
1% (a few % at most), never enough to lift a plan from further behind, and at 512 ranks polishing all
of them took most of the planner's time."""


def greedy_candidates(problem: Problem, lower: float) -> list[Assignment]:
    """Every homogeneous plan and the mixed plans of greedy_bisection; those close to the best, polished."""
    found = [a for k in range(len(problem.sizes)) if (a := greedy_homogeneous(problem, k)) is not None]
    upper = min(a.makespan(problem) for a in found) if found else _largest_fitting_limit(problem)
    for wide_first in (True, False):  # the wide-first fill is usually the better: the other only has to beat it
        mixed = greedy_bisection(problem, lower, upper, wide_first)
        if mixed is not None:
            found.append(mixed)
            upper = min(upper, mixed.makespan(problem))
    times = [a.makespan(problem) for a in found]
    best = min(times)
    return [polish(problem, a) for a, t in zip(found, times, strict=True) if t <= best * (1 + POLISH_WITHIN)]


def _largest_fitting_limit(problem: Problem) -> float:
    """A limit that every sequence meets on the largest group that holds it (a start for the bisection)."""
    return float(problem.times.sum(axis=0).max() + len(problem.lengths) * problem.model.microbatch_overhead)


MIP_STOP_FRACTION = 0.9
"""The MIP stops this fraction of planner.time_limit_s after the start, keeping back the rest of the budget for
polishing its plan and packing micro-batches."""
MIP_SETUP_RATIO = 2.0
"""The MIP starts only when the time left is this many times what the greedy plans took: building and
decoding its model grows with the batch as the greedy construction does, about 1.5x its time, and its
time limit bounds only the solve. At 512 ranks and 4,096 sequences the MIP would otherwise double the
planner's latency."""


def plan_step(lengths: Sequence[int] | np.ndarray, cluster: Cluster, model: CostModel, config: PlannerConfig) -> Plan:
    """The plan for one step's batch; raises PlanError on a batch that cannot be planned."""
    began = time.perf_counter()
    lengths = check_lengths(lengths, cluster, model)
    problem = make_problem(lengths, cluster, model)
    lower = fluid_lower_bound(problem)
    best = min(greedy_candidates(problem, lower), key=lambda a: a.makespan(problem))
    method = "greedy"
    # Reported apart from the total: the MIP's share is capped by the time limit, this share is not.
    first_plan_seconds = time.perf_counter() - began
    left = config.time_limit_s * MIP_STOP_FRACTION - first_plan_seconds
    if best.makespan(problem) > lower * (1 + config.mip_gap) and left > max(0.02, MIP_SETUP_RATIO * first_plan_seconds):
        mip = solve_mip(problem, best, replace(config, time_limit_s=left))
        lower = max(lower, mip.bound)
        if mip.assignment is not None:
            found = polish(problem, mip.assignment)
            if found.makespan(problem) < best.makespan(problem):
                best, method = found, f"mip-{_status_word(mip.status)}"
    rounds = two_rounds(problem, best.makespan(problem))
    if rounds is not None:
        # The MIP's bound holds for one round only; the fluid bound holds for any number.
        seconds = time.perf_counter() - began
        return _assemble_rounds(rounds, problem, fluid_lower_bound(problem), seconds, first_plan_seconds)
    return _assemble(best, problem, lower, method, time.perf_counter() - began, first_plan_seconds)


# -- rounds ------------------------------------------------------------------------------------------------


@dataclass
class Round:
    """One round's assignment, over the sub-problem of some of the step's sequences."""

    problem: Problem
    assignment: Assignment
    sequences: np.ndarray
    """The step's index of each of the sub-problem's sequences."""


ROUNDS_MIN_GAIN = 0.02
"""Two rounds replace one only when the cost model says they save this fraction of the step: they add
micro-batches and a regrouping, and a smaller estimated gain is inside the model's error."""


def two_rounds(problem: Problem, to_beat: float) -> list[Round] | None:
    """The documents no single rank holds in a first round, the others in a second, when their
    two plans together beat `to_beat` (the best plan of one round) by ROUNDS_MIN_GAIN; else None.

    One round makes every document that shares a wide group's step pay for the width (its
    all-to-all, its share of idle ranks); two rounds let the short ones run on narrow groups
    after. A few wide documents among many ranks fit beside the short ones, and a round of
    their own only idles ranks: the rounds' lower bounds rule that out before any plan is built.
    The second round's documents each fit one rank, so they take one size for all, without the
    bisection: at 512 ranks that would add a third to the planner's latency."""
    if not problem.cluster.rounds:
        return None
    wide = problem.lengths > problem.holds[0]
    if wide.all() or not wide.any():
        return None
    goal = to_beat * (1 - ROUNDS_MIN_GAIN)
    (first, first_sequences), (second, second_sequences) = [
        _sub_problem(problem, np.flatnonzero(mask)) for mask in (wide, ~wide)
    ]
    first_bound = fluid_lower_bound(first)
    if first_bound + fluid_lower_bound(second) >= goal:
        return None
    narrow = _narrowest_best_homogeneous(second)
    if first_bound + narrow.makespan(second) >= goal:
        return None
    wide_plan = min(greedy_candidates(first, first_bound), key=lambda a: a.makespan(first))
    if wide_plan.makespan(first) + narrow.makespan(second) >= goal:
        return None
    return [Round(first, wide_plan, first_sequences), Round(second, polish(second, narrow), second_sequences)]


def _narrowest_best_homogeneous(problem: Problem) -> Assignment:
    """One size for every sequence, the narrowest first, until a wider one no longer helps: with many
    short sequences (the usual second round) that is one rank each, found in one or two tries."""
    best = greedy_homogeneous(problem, 0)  # every sequence here fits one rank
    for k in range(1, len(problem.sizes)):
        wider = greedy_homogeneous(problem, k)
        if wider is None or wider.makespan(problem) >= best.makespan(problem):
            break
        best = wider
    return best


def _sub_problem(problem: Problem, sequences: np.ndarray) -> tuple[Problem, np.ndarray]:
    return replace(problem, lengths=problem.lengths[sequences], times=problem.times[sequences]), sequences


def homogeneous_plan(lengths: Sequence[int] | np.ndarray, cluster: Cluster, model: CostModel, degree: int) -> Plan:
    """One sequence-parallel degree for the whole step (the static baseline): groups of `degree`
    ranks, each sequence, longest first, to the least-loaded group."""
    lengths = check_lengths(lengths, cluster, model)
    problem = make_problem(lengths, cluster, model)
    if degree not in problem.sizes:
        raise PlanError(f"degree {degree} is not a group size of {cluster.ranks} ranks (sizes {problem.sizes})")
    found = greedy_homogeneous(problem, problem.sizes.index(degree))
    if found is None:
        raise PlanError(f"degree {degree} cannot hold this batch's longest sequence or does not divide the ranks")
    return _assemble(found, problem, fluid_lower_bound(problem), f"degree-{degree}", 0.0, 0.0)


def _status_word(status: str) -> str:
    return {"Time limit reached": "time-limit", "Optimal": "within-gap"}.get(status, status.lower().replace(" ", "-"))


def _assemble(
    a: Assignment, problem: Problem, lower: float, method: str, seconds: float, first_plan_seconds: float
) -> Plan:
    """Concrete groups at aligned ranks, each with its micro-batches."""
    groups = _groups(a, problem, np.arange(len(problem.lengths)), 0)
    estimated = plan_time(groups, problem.lengths, problem.model, problem.cluster)
    if estimated <= lower * (1 + 1e-9):
        method = "optimal"
    return Plan(tuple(groups), estimated, min(lower, estimated), method, seconds, first_plan_seconds)


def _assemble_rounds(
    rounds: list[Round], problem: Problem, lower: float, seconds: float, first_plan_seconds: float
) -> Plan:
    groups = [g for r, part in enumerate(rounds) for g in _groups(part.assignment, part.problem, part.sequences, r)]
    estimated = plan_time(groups, problem.lengths, problem.model, problem.cluster)
    method = "optimal" if estimated <= lower * (1 + 1e-9) else "greedy-rounds"
    return Plan(tuple(groups), estimated, min(lower, estimated), method, seconds, first_plan_seconds)


def _groups(a: Assignment, problem: Problem, sequences: np.ndarray, round_: int) -> list[Group]:
    """One round's groups at aligned ranks, in rank order; `sequences` maps the problem's sequences
    to the step's."""
    sizes = [problem.sizes[k] for k in a.size_of]
    groups = []
    for start, size, k, members in zip(place_groups(sizes), sizes, a.size_of, a.members, strict=True):
        packed = pack_microbatches(members, problem.lengths, int(problem.holds[k]))
        groups.append(Group(start, size, tuple(tuple(int(sequences[i]) for i in mb) for mb in packed), round_))
    return sorted(groups, key=lambda g: g.start)

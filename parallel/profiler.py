"""Fit a CostModel's coefficients from timed runs of a sequence-parallel layer stack on this machine.

For each point (s, d), d real processes (gloo over loopback TCP) run a Ulysses-style transformer
stack forward and backward on one sequence of s tokens, s/d tokens per rank, with two all-to-alls
per layer. Each point is timed as the median over repeats of the slowest rank, and the CostModel's
coefficients are the non-negative least-squares fit of these times in relative-error form.

Two choices keep the measurement honest on a small CPU machine:

- Every rank runs with one thread (torch.set_num_threads(1)). A rank then stands for one device:
  d ranks on d cores divide the compute by d, as d GPUs would, instead of d processes fighting over
  the same cores with several threads each. So d may not exceed the machine's core count.
- All ranks share one machine, so only the intra-node all-to-all is measured, and the profile
  copies it to the inter-node coefficients. A cross-node figure needs the same runs over 2 nodes,
  which this profiler does not do.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import queue
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from parallel.cost_model import CostModel
from parallel.ulysses import heads_to_tokens, tokens_to_heads

Point = tuple[int, int]
"""(s, d): a sequence of s tokens on a sequence-parallel group of d ranks."""

OVERHEAD_POINT: Point = (8, 1)
"""A sequence so short that its time is nearly all per-micro-batch overhead; it anchors the intercept."""

FIT_POINTS: tuple[Point, ...] = (OVERHEAD_POINT, *((s, d) for d in (1, 2) for s in (256, 512, 1024, 2048, 4096)))
HELD_OUT_POINTS: tuple[Point, ...] = tuple((s, d) for d in (1, 2) for s in (768, 1536, 3072))
QUICK_FIT_POINTS: tuple[Point, ...] = (OVERHEAD_POINT, *((s, d) for d in (1, 2) for s in (256, 512, 1024, 2048)))
QUICK_HELD_OUT_POINTS: tuple[Point, ...] = tuple((s, d) for d in (1, 2) for s in (768, 1536))
REPEATS = 5
"""Rounds over the points; each point's time is the median of its steps in them."""
QUICK_REPEATS = 3

FEATURES = ("attention", "linear", "a2a_latency", "a2a_per_token", "microbatch_overhead")
"""The fitted coefficients, in the order of the columns of `features`."""

WARMUP_STEPS = 1
"""Untimed steps before each point; the first point of a set of ranks gets one more, for the cold start."""
MIN_POINT_SECONDS = 0.3
"""Short points repeat until their timed steps add up to this, so that their median is not one noisy step."""
MAX_REPEATS = 50
CPU_SHARE_WARNING = 0.65
"""Below this share of a core, a point was most likely slowed by other work on the machine (quiet: >= 0.75)."""


class ProfilerError(RuntimeError):
    """A profiling run that failed or hung; the message says which ranks and why."""


class FitError(ValueError):
    """Measurements from which the coefficients cannot be fitted; the message says what is missing."""


@dataclass(frozen=True)
class ProfileShape:
    hidden: int = 256
    """Model width."""
    heads: int = 8
    """Attention heads; between the all-to-alls each of d ranks holds heads / d of them."""
    ffn: int = 1024
    """Inner width of the SwiGLU MLP."""
    layers: int = 2
    """Transformer layers in the timed stack."""

    def validate(self) -> None:
        for name in ("hidden", "heads", "ffn", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"profile shape: {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"profile shape: hidden ({self.hidden}) must be a multiple of heads ({self.heads})")


class Measurement(NamedTuple):
    s: int
    d: int
    seconds: float
    """One micro-batch of one sequence, forward and backward, overhead included."""
    cpu_share: float = 1.0
    """The least share of a core that a rank's process used while timed: well under 1, other work took its core."""


class HeldOutError(NamedTuple):
    s: int
    d: int
    measured: float
    predicted: float
    rel_error: float
    """(predicted - measured) / measured."""


# ---------------------------------------------------------------------------------------------
# The timed layer stack: Ulysses sequence parallelism.


class UlyssesLayer(nn.Module):
    """A pre-norm transformer layer (causal attention, SwiGLU MLP) whose s/d tokens sit on one rank."""

    def __init__(self, shape: ProfileShape) -> None:
        super().__init__()
        self.heads = shape.heads
        self.attention_norm = nn.RMSNorm(shape.hidden)
        self.qkv = nn.Linear(shape.hidden, 3 * shape.hidden, bias=False)
        self.out = nn.Linear(shape.hidden, shape.hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(shape.hidden)
        self.gate_up = nn.Linear(shape.hidden, 2 * shape.ffn, bias=False)
        self.down = nn.Linear(shape.ffn, shape.hidden, bias=False)

    def forward(self, x: torch.Tensor, group=None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), group)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

    def attention(self, x: torch.Tensor, group) -> torch.Tensor:
        tokens = x.shape[0]
        # Head-major, so that one all-to-all moves each head's q, k and v together.
        qkv = tokens_to_heads(self.qkv(x).view(tokens, self.heads, 3, -1), group)
        # 4-d [1, heads/d, s, head_dim]: with 3-d inputs PyTorch's CPU flash kernel declines and the
        # math path materialises the s x s scores.
        q, k, v = qkv.permute(2, 1, 0, 3).unsqueeze(1).unbind(0)
        # Each rank now holds the whole sequence for its heads, so plain causal attention is exact.
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)[0]
        return self.out(heads_to_tokens(attended.transpose(0, 1), group).reshape(tokens, -1))


class UlyssesStack(nn.Module):
    def __init__(self, shape: ProfileShape) -> None:
        super().__init__()
        self.layers = nn.ModuleList(UlyssesLayer(shape) for _ in range(shape.layers))

    def forward(self, x: torch.Tensor, group=None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, group)
        return x


# ---------------------------------------------------------------------------------------------
# Ranks: d spawned processes on a loopback gloo group, watched by the parent with a deadline.

RankTarget = Callable[[int, int, Any, Callable[[Any], None]], None]
"""target(rank, world_size, payload, report): runs on every rank; report(value) sends value to the parent."""


STARTUP_TIMEOUT_S = 300.0
"""For a rank to start: an interpreter, importing torch, the gloo rendezvous (slow on a loaded machine)."""


def _rank_main(
    rank: int, world: int, rendezvous: str, timeout_s: float, target: RankTarget, payload: Any, messages
) -> None:
    # One thread per rank: a rank stands for one device, and d ranks must not share cores (module docstring).
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=rendezvous,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S + timeout_s),
        )
        messages.put(("ready", rank, None))
        target(rank, world, payload, lambda value: messages.put(("result", rank, value)))
        dist.destroy_process_group()
        messages.put(("done", rank, None))
    except BaseException:
        # No further collectives: the parent stops the other ranks when it reads this.
        messages.put(("error", rank, traceback.format_exc(limit=6)))


def run_on_ranks(
    target: RankTarget, world: int, payload: Any, timeout_s: float, on_result: Callable[[int, Any], None]
) -> None:
    """Run target on `world` fresh gloo ranks; call on_result(rank, value) for each report, in the parent.

    Raises ProfilerError, after killing every rank, if one fails or dies, if they have not all
    started within STARTUP_TIMEOUT_S, or if they have not all finished timeout_s after that.
    """
    context = mp.get_context("spawn")
    messages = context.Queue()
    with tempfile.TemporaryDirectory(prefix="stalwart-ranks-") as rendezvous:
        # A file rendezvous: no port to pick and lose to another process before the ranks bind it.
        init = f"file://{rendezvous}/store"
        ranks = [
            context.Process(target=_rank_main, args=(r, world, init, timeout_s, target, payload, messages), daemon=True)
            for r in range(world)
        ]
        for process in ranks:
            process.start()
        try:
            _collect(ranks, messages, timeout_s, on_result)
            for process in ranks:
                process.join(timeout=10)
        finally:
            for process in ranks:
                if process.is_alive():
                    process.kill()
                    process.join()


def _collect(ranks: list, messages, timeout_s: float, on_result: Callable[[int, Any], None]) -> None:
    """Relay the ranks' reports until every rank is done; the work's deadline starts once all are ready."""
    started, finished = set(), set()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while len(finished) < len(ranks):
        if time.monotonic() > deadline:
            raise ProfilerError(_late_ranks(len(ranks), started, finished, timeout_s))
        try:
            kind, rank, value = messages.get(timeout=0.5)
        except queue.Empty:
            dead = [r for r, p in enumerate(ranks) if p.exitcode not in (None, 0) and r not in finished]
            if dead:
                raise ProfilerError(f"rank {dead[0]} died with exit code {ranks[dead[0]].exitcode}") from None
            continue
        if kind == "error":
            raise ProfilerError(f"rank {rank} failed:\n{value}")
        if kind == "ready":
            started.add(rank)
            if len(started) == len(ranks):
                deadline = time.monotonic() + timeout_s
        elif kind == "done":
            finished.add(rank)
        else:
            on_result(rank, value)


def _late_ranks(world: int, started: set[int], finished: set[int], timeout_s: float) -> str:
    if len(started) < world:
        missing = sorted(set(range(world)) - started)
        return f"ranks {missing} did not start within {STARTUP_TIMEOUT_S:.0f} s"
    missing = sorted(set(range(world)) - finished)
    return f"ranks {missing} did not finish within {timeout_s:g} s of every rank starting"


# ---------------------------------------------------------------------------------------------
# Timing one point.


@dataclass(frozen=True)
class _MeasureJob:
    shape: ProfileShape
    lengths: tuple[int, ...]
    repeats: int


class _RoundDone(NamedTuple):
    """Rank 0 finished one of `rounds` rounds of point (s, d): progress for the parent's bar."""

    s: int
    d: int
    rounds: int


def repeats_for(step_seconds: float, repeats: int) -> int:
    """At least `repeats`; more for short steps, until they add up to MIN_POINT_SECONDS."""
    wanted = math.ceil(MIN_POINT_SECONDS / max(step_seconds, 1e-9))
    return max(repeats, min(MAX_REPEATS, wanted))


def _reduce_over_ranks(values: list[float], op, group) -> list[float]:
    if group is None:
        return values
    reduced = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(reduced, op=op, group=group)
    return reduced.tolist()


def _timed_step(stack: UlyssesStack, x: torch.Tensor, group) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one forward and backward, between two barriers."""
    stack.zero_grad(set_to_none=True)
    x.grad = None
    dist.barrier(group)
    wall, cpu = time.perf_counter(), time.process_time()
    stack(x, group).sum().backward()
    dist.barrier(group)
    return time.perf_counter() - wall, time.process_time() - cpu


def _summarise(samples: list[tuple[float, float]], s: int, d: int, group) -> Measurement:
    walls = _reduce_over_ranks([wall for wall, _ in samples], dist.ReduceOp.MAX, group)
    share = sum(cpu for _, cpu in samples) / sum(wall for wall, _ in samples)
    (least_share,) = _reduce_over_ranks([share], dist.ReduceOp.MIN, group)
    return Measurement(s, d, statistics.median(walls), round(least_share, 3))


def _steps_per_round(stack: UlyssesStack, x: torch.Tensor, group, repeats: int, warmup: int) -> int:
    """Warm up on x, and say how many timed steps each of the `repeats` rounds takes at this length."""
    warm = _reduce_over_ranks([_timed_step(stack, x, group)[0] for _ in range(warmup)], dist.ReduceOp.MAX, group)
    # Every rank derives the count from the same reduced figure, so all run the same number of barriers.
    return math.ceil(repeats_for(min(warm), repeats) / repeats)


def _measure_on_rank(rank: int, world: int, job: _MeasureJob, report: Callable[[Any], None]) -> None:
    torch.manual_seed(0)
    stack = UlyssesStack(job.shape)
    group = dist.group.WORLD if world > 1 else None
    inputs = {s: torch.randn(s // world, job.shape.hidden, requires_grad=True) for s in job.lengths}
    steps = {
        s: _steps_per_round(stack, inputs[s], group, job.repeats, WARMUP_STEPS + (1 if i == 0 else 0))
        for i, s in enumerate(job.lengths)
    }
    samples: dict[int, list[tuple[float, float]]] = {s: [] for s in job.lengths}
    # Rounds over all lengths, rather than all repeats of one length in a row: a burst of other work on
    # the machine then spoils a few samples of several points, which the median discards, and not all of one.
    for _ in range(job.repeats):
        for s in job.lengths:
            samples[s] += [_timed_step(stack, inputs[s], group) for _ in range(steps[s])]
            if rank == 0:
                report(_RoundDone(s, world, job.repeats))
    for s in job.lengths:
        measurement = _summarise(samples[s], s, world, group)
        if rank == 0:
            report(measurement)


def check_points(shape: ProfileShape, points: Sequence[Point]) -> None:
    cores = os.cpu_count() or 1
    for s, d in points:
        if s < 1 or d < 1 or s % d:
            raise ValueError(f"point (s={s}, d={d}): s and d must be >= 1 and s a multiple of d")
        if shape.heads % d:
            raise ValueError(f"point (s={s}, d={d}): d must divide heads ({shape.heads})")
        if d > cores:
            raise ValueError(f"point (s={s}, d={d}): d ranks need d cores, this machine has {cores}")


def _expected_work(s: int, d: int) -> float:
    """A rough relative cost of measuring a point, so that the progress bar's ETA is not skewed by long points.

    Short points cost a floor, as they repeat for MIN_POINT_SECONDS.
    """
    return max((s + s * s / 4096) / d, 400.0)


def measure(
    shape: ProfileShape,
    points: Sequence[Point],
    repeats: int = REPEATS,
    progress: bool = False,
    timeout_s: float = 600.0,
) -> list[Measurement]:
    """Time each point: the median over `repeats` rounds of the slowest rank's time.

    The points of one degree d share one set of d processes.
    """
    from tqdm import tqdm  # here, not at the top, like scipy in fit()

    shape.validate()
    points = sorted(set(points), key=lambda point: (point[1], point[0]))
    check_points(shape, points)
    measurements: list[Measurement] = []
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}"
    total = sum(_expected_work(s, d) for s, d in points)
    with tqdm(total=total, desc="profiling", bar_format=bar_format, disable=not progress) as bar:

        def record(rank: int, report: _RoundDone | Measurement) -> None:
            if isinstance(report, _RoundDone):
                bar.set_postfix_str(f"d={report.d} s={report.s}")
                # min(): float sums of the parts can pass the total by a rounding error, which tqdm complains of.
                bar.update(min(_expected_work(report.s, report.d) / report.rounds, bar.total - bar.n))
            else:
                measurements.append(report)

        for d in sorted({d for _, d in points}):
            lengths = tuple(s for s, point_d in points if point_d == d)
            run_on_ranks(_measure_on_rank, d, _MeasureJob(shape, lengths, repeats), timeout_s, record)
    starved = [(m.s, m.d) for m in measurements if m.cpu_share < CPU_SHARE_WARNING]
    if starved:
        warnings.warn(
            f"ranks used under {CPU_SHARE_WARNING:.0%} of a core at points {starved}: other work on this machine "
            "(or long all-to-all waits) inflates these times",
            stacklevel=2,
        )
    return measurements


# ---------------------------------------------------------------------------------------------
# Fitting: pure.


def features(s: float, d: int) -> list[float]:
    """The row of the design matrix for one point; the columns are FEATURES."""
    spans = 1.0 if d > 1 else 0.0
    return [s * s / d, s / d, spans, spans * s * (d - 1) / (d * d), 1.0]


def _check_fit_input(measurements: Sequence[Measurement]) -> None:
    if len(measurements) < len(FEATURES):
        raise FitError(f"fit needs at least {len(FEATURES)} measurements, one per coefficient, got {len(measurements)}")
    for m in measurements:
        if not (m.s >= 1 and m.d >= 1):
            raise FitError(f"measurement {tuple(m)}: s and d must be >= 1")
        if not (math.isfinite(m.seconds) and m.seconds > 0):
            raise FitError(
                f"measurement (s={m.s}, d={m.d}): time must be a positive number of seconds, got {m.seconds}"
            )
    if all(m.d == 1 for m in measurements):
        raise FitError("fit needs measurements with d > 1 to fit the all-to-all coefficients")


def fit(measurements: Sequence[Measurement], tokens_per_rank: int, name: str = "fitted") -> CostModel:
    """The non-negative least-squares CostModel for the measurements, minimising relative errors.

    The measurements come from one machine, so the inter-node all-to-all copies the intra-node one.
    """
    from scipy.optimize import nnls  # here, not at the top: the spawned ranks import this module and never fit

    _check_fit_input(measurements)
    seconds = np.array([m.seconds for m in measurements])
    # Dividing each row by its time weighs a 5 ms point like a 5 s one: the residuals are relative errors.
    rows = np.array([features(m.s, m.d) for m in measurements]) / seconds[:, None]
    # The columns span ten orders of magnitude (s^2 against 1); scaling them keeps nnls well-conditioned.
    scale = np.linalg.norm(rows, axis=0)
    rank = np.linalg.matrix_rank(rows / scale)
    if rank < len(FEATURES):
        raise FitError(
            f"the points determine only {rank} of the {len(FEATURES)} coefficients ({', '.join(FEATURES)}): "
            "measure at least three lengths at d = 1 and two at some d > 1"
        )
    solution, _ = nnls(rows / scale, np.ones(len(measurements)))
    attention, linear, latency, per_token, overhead = (solution / scale).tolist()
    return CostModel(
        attention=attention,
        linear=linear,
        a2a_latency_intra=latency,
        a2a_per_token_intra=per_token,
        a2a_latency_inter=latency,
        a2a_per_token_inter=per_token,
        microbatch_overhead=overhead,
        tokens_per_rank=tokens_per_rank,
        name=name,
    )


def predict_seconds(model: CostModel, s: int, d: int) -> float:
    """What one timed point costs in the model: one sequence in a micro-batch of its own."""
    return model.group_time([s], d)


def held_out_errors(model: CostModel, measurements: Sequence[Measurement]) -> list[HeldOutError]:
    errors = []
    for m in measurements:
        predicted = predict_seconds(model, m.s, m.d)
        errors.append(HeldOutError(m.s, m.d, m.seconds, predicted, (predicted - m.seconds) / m.seconds))
    return errors


def error_summary(errors: Sequence[HeldOutError]) -> tuple[float, float]:
    """(mean, max) of the absolute relative errors."""
    absolute = [abs(e.rel_error) for e in errors]
    return statistics.fmean(absolute), max(absolute)


# ---------------------------------------------------------------------------------------------
# The whole profile, and the `stalwart plan-profile` command.


def profile_machine(
    shape: ProfileShape | None = None,
    fit_points: Sequence[Point] = FIT_POINTS,
    held_out_points: Sequence[Point] = HELD_OUT_POINTS,
    repeats: int = REPEATS,
    tokens_per_rank: int | None = None,
    progress: bool = False,
    timeout_s: float = 600.0,
) -> tuple[CostModel, list[Measurement], list[HeldOutError]]:
    """Measure all points, fit on fit_points, and check the fit on held_out_points.

    tokens_per_rank defaults to the most tokens one rank held in the profile: it vouches for no more.
    """
    shape = shape or ProfileShape()
    overlap = sorted(set(fit_points) & set(held_out_points))
    if overlap:
        raise ValueError(f"points {overlap} are both fitted and held out")
    measurements = measure(shape, [*fit_points, *held_out_points], repeats, progress, timeout_s)
    fitted = [m for m in measurements if (m.s, m.d) in set(fit_points)]
    held_out = [m for m in measurements if (m.s, m.d) in set(held_out_points)]
    capacity = tokens_per_rank or max(s // d for s, d in [*fit_points, *held_out_points])
    model = fit(fitted, capacity)
    return model, fitted, held_out_errors(model, held_out)


def profile_notes(
    shape: ProfileShape,
    fitted: Sequence[Measurement],
    errors: Sequence[HeldOutError],
    load_before: float,
    description: str | None = None,
) -> dict:
    """The notes a measured profile carries: machine, shape, method and held-out accuracy, as plain YAML types.

    load_before is the 1-minute load average when profiling began: other work on the machine slows the ranks.
    """
    mean_error, max_error = error_summary(errors)
    notes = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_before": round(load_before, 2),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": str(torch.__version__),  # a str subclass that yaml.safe_dump refuses
        },
        "shape": asdict(shape),
        "method": (
            "stalwart plan-profile: Ulysses sequence-parallel stack, forward and backward, one thread per rank, gloo "
            "on loopback; median over rounds of the slowest rank's step; nnls on relative errors. All ranks on one "
            "machine, so the inter-node all-to-all coefficients are copies of the intra-node ones."
        ),
        "fitted_on": [
            {"s": m.s, "d": m.d, "measured_ms": round(m.seconds * 1e3, 3), "cpu_share": m.cpu_share} for m in fitted
        ],
        "held_out": {
            "mean_abs_rel_error": round(mean_error, 4),
            "max_abs_rel_error": round(max_error, 4),
            "points": [
                {
                    "s": e.s,
                    "d": e.d,
                    "measured_ms": round(e.measured * 1e3, 3),
                    "predicted_ms": round(e.predicted * 1e3, 3),
                }
                for e in errors
            ],
        },
    }
    if description:
        notes["description"] = description
    return notes


def format_held_out_table(errors: Sequence[HeldOutError]) -> str:
    lines = [f"{'s':>7}{'d':>4}{'measured ms':>14}{'predicted ms':>14}{'error %':>10}"]
    for e in errors:
        lines.append(f"{e.s:>7}{e.d:>4}{e.measured * 1e3:>14.2f}{e.predicted * 1e3:>14.2f}{e.rel_error * 100:>+10.1f}")
    mean_error, max_error = error_summary(errors)
    lines.append(f"mean |error| {mean_error * 100:.1f}%, max |error| {max_error * 100:.1f}%")
    return "\n".join(lines)


def run_profile(args: argparse.Namespace) -> int:
    if args.quick:
        fit_points, held_out_points, repeats = QUICK_FIT_POINTS, QUICK_HELD_OUT_POINTS, QUICK_REPEATS
    else:
        fit_points, held_out_points, repeats = FIT_POINTS, HELD_OUT_POINTS, REPEATS
    load_before = os.getloadavg()[0]
    shape = ProfileShape()
    model, fitted, errors = profile_machine(
        shape, fit_points, held_out_points, repeats, args.tokens_per_rank, progress=True
    )
    out = Path(args.out)
    notes = profile_notes(shape, fitted, errors, load_before, args.description)
    dataclasses.replace(model, name=out.stem, notes=notes).save(out)
    print(format_held_out_table(errors))
    print(f"wrote {out}")
    return 0

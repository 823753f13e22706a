"""Fit the planner's cost model from training steps of a run's own model on this machine.

Each (s, d) point times real training steps, the trainer's own (megatron-core's layers, the
attention over documents with its all-to-alls over a group of d ranks, the gradient reduction
and the optimizer), of one document of s tokens on every group of d ranks; parallel/profiler.fit
turns the times into a profile. So the profile measures what the trainer runs, not a stand-in.

    python -m torch.distributed.run --nproc-per-node=2 -m trainer.step_profile CONFIG OUT [--quick]

(`stalwart plan-profile --config CONFIG --out FILE` starts it.) A rank uses one thread: it
stands for one device, so d ranks need d cores.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from parallel.cost_model import CostModel
from parallel.dims import ParallelDims
from parallel.plan import Group
from parallel.profiler import Measurement, fit
from trainer.packing import rank_micro_batches
from trainer.step import TrainStep

Reader = Callable[[int], np.ndarray]
"""read(i): the tokens of the step's document i."""


def timed_step(step: TrainStep, dims: ParallelDims, groups: Sequence[Group], read: Reader) -> float:
    """Wall seconds of one training step under `groups` (documents read by `read`), between two
    barriers: the time of the slowest rank."""
    micro_batches = rank_micro_batches(groups, dims.dp_rank, read, dims.tp, None)
    dist.barrier()
    began = time.perf_counter()
    step.train(micro_batches)
    dist.barrier()
    return time.perf_counter() - began


def time_points(
    step: TrainStep, dims: ParallelDims, vocab: int, points: Sequence[tuple[int, int]], repeats: int
) -> list[Measurement]:
    """The median of `repeats` steps (after one to warm up) at each point: a document of s random
    tokens on every group of d data-parallel ranks."""
    rng = np.random.default_rng(0)
    measured = []
    for s, d in points:
        if dims.dp % d:
            raise ValueError(f"point (s={s}, d={d}): d must divide the {dims.dp} data-parallel ranks")
        document = rng.integers(1, vocab, s + 1)
        groups = tuple(Group(g * d, d, ((0,),)) for g in range(dims.dp // d))
        read = dict.fromkeys([0], document).__getitem__
        times = [timed_step(step, dims, groups, read) for _ in range(repeats + 1)][1:]
        measured.append(Measurement(s, d, statistics.median(times)))
    return measured


def default_points(capacity: int, widest: int, quick: bool) -> list[tuple[int, int]]:
    """Lengths from a few hundred tokens to what each group size holds, and one tiny document
    that anchors the per-micro-batch overhead."""
    points = [(8, 1)]
    d = 1
    while d <= widest:
        top = capacity * d
        lengths = [top // 8, top // 2, top] if quick else [top // 16, top // 8, top // 4, top // 2, top]
        points += [(s, d) for s in lengths if s >= 64]
        d *= 2
    return points


def profile_training_steps(
    config_path: str, overrides: Sequence[str], quick: bool, repeats: int, name: str
) -> tuple[TrainStep, ParallelDims, list[Measurement], CostModel]:
    """On every rank: the config's model in the planner's setting (documents on groups of
    data-parallel ranks, one thread per rank, fp32 on CPU), timed at the default points and
    fitted; the step is returned for more timing."""
    from parallel.megatron_import import prepare_megatron_import

    prepare_megatron_import()
    from parallel.dims import build_parallel_dims, init_distributed
    from trainer.config import load_config
    from trainer.data import read_dataset_info

    torch.set_num_threads(1)
    planned = ["data.packing=documents", "planner.enabled=true", "parallel.tp=1", "parallel.pp=1", "parallel.dp=null"]
    config = load_config(config_path, [*planned, "run.precision=fp32", *overrides])
    init_distributed(config.parallel)
    widest = config.largest_sequence_group(dist.get_world_size())
    dims = build_parallel_dims(config.parallel, config.train.seed, widest)
    vocab = config.model.vocab_size or read_dataset_info(config.data.path).vocab_size
    step = TrainStep(config, dims, vocab)
    capacity = config.train.micro_batch_tokens
    measured = time_points(step, dims, vocab, default_points(capacity, widest, quick), repeats)
    return step, dims, measured, fit(measured, capacity, name=name)


def main(argv: list[str]) -> int:
    config_path, out, quick = argv[0], Path(argv[1]), "--quick" in argv[2:]
    _, dims, measured, model = profile_training_steps(config_path, [], quick, 2 if quick else 3, out.stem)
    if dims.rank == 0:
        notes = {
            "method": "trainer.step_profile: training steps of the config's model (megatron-core layers, the "
            "attention over documents, gradient reduction, optimizer), one thread per rank, gloo on loopback",
            "config": str(config_path),
            "fitted_on": [{"s": m.s, "d": m.d, "measured_ms": round(m.seconds * 1e3, 3)} for m in measured],
        }
        CostModel(**{**model.to_dict(), "notes": notes}).save(out)
        for m in measured:
            print(f"s={m.s:>6} d={m.d}: {m.seconds * 1e3:9.1f} ms, fitted {model.group_time([m.s], m.d) * 1e3:9.1f} ms")
        print(f"wrote {out}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

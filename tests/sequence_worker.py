"""Rank entry for the exactness test of sequence-parallel plans (tests/test_sequence_parallel.py).

Every rank trains one step of the tiny model on the same documents under each plan, from the
same initial weights, and compares its pieces of the loss, of every parameter's gradient and
of every parameter after the optimizer step with a one-process reference that ran each
document alone. The largest relative errors over all ranks go to a JSON file.
usage: torchrun ... tests/sequence_worker.py REFERENCE OUT TP PP
"""

from __future__ import annotations

from parallel.megatron_import import prepare_megatron_import

prepare_megatron_import()  # before megatron-core's first import: 3.5 s less per rank

import json  # noqa: E402
import sys  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from checkpoint.layout import tp_regions  # noqa: E402
from checkpoint.state import global_param_name, param_layout  # noqa: E402
from parallel.config import ParallelConfig  # noqa: E402
from parallel.dims import build_parallel_dims, destroy_parallel_dims, init_distributed  # noqa: E402
from parallel.plan import Group  # noqa: E402
from trainer.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from trainer.packing import rank_micro_batches  # noqa: E402
from trainer.step import TrainStep  # noqa: E402

VOCAB = 300
TOKENS_PER_RANK = 128
LENGTHS = (97, 33, 50, 20, 41, 12, 77, 25)
"""Tokens each document trains on (it holds one more)."""

PLANS = {
    4: {
        "2,1,1": (Group(0, 2, ((0, 1, 2, 3),)), Group(2, 1, ((4, 5), (6,))), Group(3, 1, ((7,),))),
        "4": (Group(0, 4, ((0, 1, 2, 3, 4, 5, 6, 7),)),),
        "2,2": (Group(0, 2, ((0, 6), (1, 2))), Group(2, 2, ((3, 4, 5, 7),))),
        "1,1,1,1": (
            Group(0, 1, ((0,),)),
            Group(1, 1, ((1, 2), (3,))),
            Group(2, 1, ((4, 5), (6,))),
            Group(3, 1, ((7,),)),
        ),
        "2,1,1 two idle": (Group(0, 2, ((0, 1, 2, 3), (4, 5, 6, 7))), Group(2, 1, ()), Group(3, 1, ())),
        # The ranks regroup between rounds: rank 1 meets rank 0 first, rank 3 after.
        "2,1,1; 1,1,2": (
            Group(0, 2, ((0, 6),)),
            Group(2, 1, ((1,),)),
            Group(3, 1, ((2, 3),)),
            Group(0, 1, ((4,),), round=1),
            Group(1, 1, (), round=1),
            Group(2, 2, ((5, 7),), round=1),
        ),
    },
    2: {
        "2": (Group(0, 2, ((0, 1, 2, 3), (4, 5, 6, 7))),),
        "1,1": (Group(0, 1, ((0,), (1, 2, 3))), Group(1, 1, ((4, 5), (6, 7)))),
        "2; 1,1": (Group(0, 2, ((0, 6),)), Group(0, 1, ((1, 2), (3,)), round=1), Group(1, 1, ((4, 5, 7),), round=1)),
    },
}
"""Plans by data-parallel size: groups and the documents of each of their micro-batches."""


def plans_for(dp: int, pp: int) -> dict[str, tuple[Group, ...]]:
    """The plans a layout may run: pipelines run a step in one round (parallel.plan.Cluster.rounds)."""
    return {name: groups for name, groups in PLANS[dp].items() if pp == 1 or ";" not in name}


def exactness_config(tp: int = 1, pp: int = 1) -> Config:
    return Config(
        model=ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2),
        train=TrainConfig(seq_length=TOKENS_PER_RANK, micro_batch_size=1),
        # Adam moves an element by about lr * g / (|g| + eps): where |g| is near eps, a difference
        # of 1e-9 in g (summation order alone, fp32) moves the element by a few percent of lr.
        # An eps well above such differences keeps the update a smooth function of the gradient.
        optim=OptimConfig(lr=1e-3, warmup_steps=0, eps=1e-5),
        data=DataConfig(packing="documents"),
        parallel=ParallelConfig(tp=tp, pp=pp, sp=tp > 1),
    )


def documents() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1, VOCAB, (n + 1,), generator=generator).numpy() for n in LENGTHS]


def named(step: TrainStep, value) -> dict[str, tuple[torch.Tensor, list[tuple]]]:
    """For every parameter this rank holds, by its name in the whole model: value(parameter),
    and how its regions map onto the whole tensor [(whole region, local region)]."""
    dims, out = step.dims, {}
    for chunk in step.model:
        module = chunk.module
        for name, param in module.named_parameters():
            full = global_param_name(module, name)
            regions = tp_regions(param_layout(full, param, dims.tp, VOCAB), dims.tp_rank, dims.tp, True)
            out[full] = (value(param).detach().clone(), list(regions))
    return out


def capture_grads(step: TrainStep, into: dict) -> None:
    """Called between backward and the optimizer step: the reduced gradients, by name."""
    into.update(named(step, lambda p: p.main_grad))


def relative_error(mine: dict, reference: dict[str, torch.Tensor]) -> float:
    """The largest |mine - reference| / |reference| (norms) over every region of every parameter."""
    worst = 0.0
    for name, (values, regions) in mine.items():
        for whole, local in regions:
            expected, found = reference[name][whole], values[local]
            worst = max(worst, float((found - expected).norm() / expected.norm().clamp(min=1e-30)))
    return worst


def main() -> None:
    reference_path, out_path, tp, pp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    config = exactness_config(tp, pp)
    init_distributed(config.parallel)
    dims = build_parallel_dims(config.parallel, config.train.seed, largest_sequence_group=4)
    reference = torch.load(reference_path, weights_only=False)
    docs = documents()
    errors = {}
    fixed = TOKENS_PER_RANK if pp > 1 else None  # pipelines send activations of one shape
    for name, groups in plans_for(dims.dp, pp).items():
        step = TrainStep(config, dims, VOCAB)
        batches = rank_micro_batches(groups, dims.dp_rank, docs.__getitem__, multiple=dims.tp, tokens_per_rank=fixed)
        grads: dict = {}
        result = step.train(batches, before_update=partial(capture_grads, step, grads))
        found = torch.tensor(
            [
                abs(result.loss - reference["loss"]) / reference["loss"],
                relative_error(grads, reference["grads"]),
                relative_error(named(step, lambda p: p), reference["params"]),
            ],
            dtype=torch.float64,
        )
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        errors[name] = dict(zip(("loss", "grads", "params"), found.tolist(), strict=True))
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(errors, f)
    destroy_parallel_dims()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

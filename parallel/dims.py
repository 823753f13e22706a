"""The one owner of the process groups of a run."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel import cpu_compat
from parallel.config import ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    """Degrees and this rank's coordinates in the TP x PP x DP layout.

    Megatron's parallel_state holds the actual groups (its schedules and layers read them
    from there); this object is created once per layout, checks that the degrees fill the
    world, and is passed to whatever needs to know the layout.
    """

    tp: int
    pp: int
    dp: int
    vpp: int | None
    sp: bool
    distributed_optimizer: bool
    world_size: int
    rank: int
    device: torch.device
    sequence_groups: dict[tuple[int, int], dist.ProcessGroup] = field(default_factory=dict, repr=False, compare=False)
    """This rank's sequence-parallel groups, by (first data-parallel rank, size): one for every
    aligned power-of-two block of data-parallel ranks that holds this rank, size 2 and up."""

    @property
    def tp_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank()

    @property
    def dp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def last_stage_global_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_last_rank()

    @property
    def model_chunks(self) -> int:
        return self.vpp or 1

    def describe(self) -> str:
        vpp = f" vpp{self.vpp}" if self.vpp else ""
        extras = (" +sp" if self.sp else "") + (" +distopt" if self.distributed_optimizer else "")
        return f"tp{self.tp} pp{self.pp}{vpp} dp{self.dp}{extras}"


def init_distributed(config: ParallelConfig) -> None:
    """Join the job's process group (torchrun/srun set RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    if dist.is_initialized():
        return
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        cpu_compat.install()
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=config.timeout_minutes))


def build_parallel_dims(config: ParallelConfig, seed: int, largest_sequence_group: int = 1) -> ParallelDims:
    """Create megatron's model-parallel groups for this layout, the sequence-parallel groups up
    to `largest_sequence_group` ranks, and seed megatron's RNG streams."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    world_size = dist.get_world_size()
    dp = config.data_parallel_size(world_size)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=config.tp,
        pipeline_model_parallel_size=config.pp,
        virtual_pipeline_model_parallel_size=config.vpp,
        distributed_timeout_minutes=config.timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return ParallelDims(
        tp=config.tp,
        pp=config.pp,
        dp=dp,
        vpp=config.vpp,
        sp=config.sp,
        distributed_optimizer=config.distributed_optimizer,
        world_size=world_size,
        rank=dist.get_rank(),
        device=device,
        sequence_groups=_sequence_groups(min(largest_sequence_group, dp)),
    )


def _sequence_groups(largest: int) -> dict[tuple[int, int], dist.ProcessGroup]:
    """Process groups for the aligned power-of-two blocks of every data-parallel group, created
    once, in the same order on every rank (as torch requires); this rank keeps those it is in.

    They live inside the data-parallel dimension: a block of data-parallel ranks at one tensor-
    and pipeline-parallel coordinate, so tensor and pipeline parallelism stay as they are."""
    from megatron.core import parallel_state as ps

    if largest < 2:
        return {}
    mine = tuple(dist.get_process_group_ranks(ps.get_data_parallel_group()))
    every: list[tuple[int, ...] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    groups = {}
    size = 2
    while size <= largest:
        for ranks in sorted(set(every)):
            for start in range(0, len(ranks), size):
                group = dist.new_group(list(ranks[start : start + size]))
                if ranks == mine and dist.get_rank() in ranks[start : start + size]:
                    groups[(start, size)] = group
        size *= 2
    return groups


def destroy_parallel_dims() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()

"""The one owner of the process groups of a run."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

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


def build_parallel_dims(config: ParallelConfig, seed: int) -> ParallelDims:
    """Create megatron's model-parallel groups for this layout and seed its RNG streams."""
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
    )


def destroy_parallel_dims() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()

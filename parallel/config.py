"""The parallel layout section of the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainer.schema import ConfigError


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel degree (Megatron's tensor_model_parallel_size)."""
    pp: int = 1
    """Pipeline-parallel degree (number of pipeline stages)."""
    vpp: int | None = None
    """Virtual pipeline stages per rank for the interleaved schedule; None disables interleaving."""
    dp: int | None = None
    """Data-parallel degree; None derives it as world_size / (tp * pp)."""
    sp: bool = False
    """Megatron sequence parallelism: shard norm and dropout activations over the TP group."""
    distributed_optimizer: bool = False
    """Shard optimizer state and fp32 master weights over the data-parallel group (ZeRO-1)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend; auto picks nccl when CUDA is present, gloo otherwise."""
    timeout_minutes: int = 10
    """Timeout of collectives, so that a lost rank fails the job instead of hanging it."""

    def validate(self) -> None:
        for key in ("tp", "pp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.dp is not None and self.dp < 1:
            raise ConfigError("parallel.dp", f"must be >= 1 or null, got {self.dp}")
        if self.vpp is not None:
            if self.vpp < 2:
                raise ConfigError("parallel.vpp", f"must be >= 2 or null (no interleaving), got {self.vpp}")
            if self.pp < 2:
                raise ConfigError("parallel.vpp", "interleaving needs parallel.pp >= 2")
        if self.sp and self.tp < 2:
            raise ConfigError("parallel.sp", "sequence parallelism needs parallel.tp >= 2")
        if self.timeout_minutes < 1:
            raise ConfigError("parallel.timeout_minutes", f"must be >= 1, got {self.timeout_minutes}")

    def data_parallel_size(self, world_size: int) -> int:
        """The DP degree for a world size; raises when the layout does not fill the world exactly."""
        model_parallel = self.tp * self.pp
        if self.dp is None and world_size % model_parallel:
            raise ConfigError(
                "parallel",
                f"world size {world_size} != tp {self.tp} x pp {self.pp} x dp: it is not a multiple of "
                f"tp x pp = {model_parallel}; change the number of ranks or the degrees",
            )
        dp = self.dp if self.dp is not None else world_size // model_parallel
        if model_parallel * dp != world_size:
            raise ConfigError(
                "parallel",
                f"world size {world_size} != tp {self.tp} x pp {self.pp} x dp {dp} = {model_parallel * dp}"
                f"; run with {model_parallel * dp} ranks or change the degrees",
            )
        return dp

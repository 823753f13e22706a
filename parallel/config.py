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


@dataclass
class PlannerConfig:
    enabled: bool = False
    """Plan every step (data.packing: documents): the data-parallel ranks split into sequence-parallel
    groups of different sizes, each running its documents with Ulysses attention. Off: every rank
    runs its own documents."""
    profile: str = "h100-gpt7b"
    """Cost-model profile: a YAML file, or the name of one in parallel/profiles/ (`stalwart plan-profile` fits one)."""
    tokens_per_rank: int | None = None
    """Tokens one rank holds in a micro-batch; None takes the profile's."""
    ranks_per_node: int = 8
    """Ranks (GPUs) per node; groups larger than a node pay the across-node all-to-all."""
    time_limit_s: float = 0.8
    """Wall-clock budget of one plan; the MIP stops within it and the best plan found so far is used."""
    mip_gap: float = 0.01
    """Stop the MIP once its plan is proven within this fraction of optimal."""
    exact_sequences: int = 16
    """The MIP places this many of the longest sequences one by one and spreads the rest fluidly."""

    def validate(self) -> None:
        if self.tokens_per_rank is not None and self.tokens_per_rank < 1:
            raise ConfigError("planner.tokens_per_rank", f"must be >= 1 or null, got {self.tokens_per_rank}")
        rpn = self.ranks_per_node
        if rpn < 1 or rpn & (rpn - 1):
            raise ConfigError("planner.ranks_per_node", f"must be a power of two, got {rpn}")
        if self.time_limit_s <= 0:
            raise ConfigError("planner.time_limit_s", f"must be > 0, got {self.time_limit_s}")
        if not 0 <= self.mip_gap < 1:
            raise ConfigError("planner.mip_gap", f"must be in [0, 1), got {self.mip_gap}")
        if self.exact_sequences < 0:
            raise ConfigError("planner.exact_sequences", f"must be >= 0, got {self.exact_sequences}")

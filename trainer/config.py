"""The run's config tree: YAML -> typed dataclasses, the single source of truth.

Each package owns its section (`ParallelConfig` lives in parallel/); this module owns the
model, training, optimiser, data and run sections and the root that ties them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from checkpoint.config import CheckpointConfig, SnapshotConfig
from parallel.config import ParallelConfig, PlannerConfig
from parallel.plan import largest_group
from trainer.schema import ConfigError, apply_override, from_dict


@dataclass
class ModelConfig:
    num_layers: int = 4
    """Transformer layers."""
    hidden_size: int = 128
    """Model width."""
    ffn_hidden_size: int = 352
    """SwiGLU inner width (each of the gate and up projections)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means one per query head."""
    vocab_size: int | None = None
    """Tokenizer vocabulary; None takes it from the dataset."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this (kept independent of TP so layouts agree)."""
    max_position_embeddings: int | None = None
    """Longest sequence the RoPE tables cover; None means train.seq_length."""
    rotary_base: int = 10000
    """RoPE base frequency (Llama 3 uses 500000)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init; output projections are scaled by 1/sqrt(2L)."""
    spec: Literal["auto", "local", "te"] = "auto"
    """Layer implementation: Transformer Engine when CUDA and TE are present (auto), or megatron's local layers."""

    def validate(self) -> None:
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                "model.hidden_size",
                f"{self.hidden_size} is not divisible by model.num_attention_heads {self.num_attention_heads}",
            )
        if self.query_groups < 1 or self.num_attention_heads % self.query_groups:
            raise ConfigError(
                "model.num_query_groups",
                f"{self.query_groups} must divide model.num_attention_heads {self.num_attention_heads}",
            )

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to train for."""
    seq_length: int = 128
    """Tokens per training sequence."""
    global_batch_tokens: int = 2048
    """Tokens per optimizer step over all data-parallel ranks (a multiple of seq_length)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch on one rank; gradient accumulation makes up the rest."""
    seed: int = 1234
    """Seed of weight init, data order and dropout."""
    eval_interval: int = 50
    """Compute the validation loss every this many steps (0 disables)."""
    eval_batches: int = 4
    """Global batches of validation data per evaluation."""
    log_interval: int = 1
    """Write metrics every this many steps."""

    max_seq_length: int | None = None
    """With data.packing: documents, the most tokens one sample trains on (a longer document is
    cut into pieces of this many); None: as many as a micro-batch holds."""

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step (data.packing: concat)."""
        return self.global_batch_tokens // self.seq_length

    @property
    def micro_batch_tokens(self) -> int:
        """Tokens a micro-batch holds: with packed documents, its one row of whole documents."""
        return self.seq_length * self.micro_batch_size

    @property
    def longest_sample(self) -> int:
        return self.max_seq_length or self.micro_batch_tokens

    def validate(self, dp: int, documents: bool = False, largest_group: int = 1) -> None:
        """`largest_group`: the most data-parallel ranks one sample may be spread over (the
        planner's sequence-parallel groups); 1 without the planner."""
        for key in ("steps", "seq_length", "global_batch_tokens", "micro_batch_size", "log_interval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.eval_interval < 0 or self.eval_batches < 1:
            raise ConfigError("train.eval_interval", "must be >= 0 with train.eval_batches >= 1")
        if documents:
            # A global batch is whole documents up to global_batch_tokens: nothing need divide.
            holds = self.micro_batch_tokens * largest_group
            if not 1 <= self.longest_sample <= holds:
                where = f" x {largest_group}, the planner's largest group" if largest_group > 1 else ""
                raise ConfigError(
                    "train.max_seq_length",
                    f"must be in [1, {holds}] (train.seq_length x train.micro_batch_size, the tokens of a "
                    f"micro-batch on one rank{where}), got {self.max_seq_length}",
                )
            return
        if self.global_batch_tokens % self.seq_length:
            raise ConfigError(
                "train.global_batch_tokens",
                f"{self.global_batch_tokens} is not a multiple of train.seq_length {self.seq_length}",
            )
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(
                "train.global_batch_tokens",
                f"{self.global_batch_size} sequences per step do not split into micro-batches of "
                f"{self.micro_batch_size} over {dp} data-parallel ranks",
            )


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Warmup then cosine decay, warmup-stable-decay, or warmup then constant."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """For `wsd`: the final fraction of steps that decays linearly to min_lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW); norms and biases are exempt."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""

    def validate(self) -> None:
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("optim.min_lr", f"must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError("optim.decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        if self.clip_grad < 0:
            raise ConfigError("optim.clip_grad", f"must be >= 0, got {self.clip_grad}")


@dataclass
class DataConfig:
    path: str = "data/stdlib"
    """Dataset prefix written by `stalwart data prepare` (files PREFIX-train.bin/.idx, ...)."""
    tokenizer: str | None = None
    """tokenizer.json to use; None uses the one saved beside the dataset."""
    sources: list[str] = field(default_factory=list)
    """What `stalwart run` prepares when the dataset is missing: paths, or "stdlib" for the demo corpus."""
    vocab_size: int = 8192
    """Vocabulary of the tokenizer trained when preparing from `sources`."""
    valid_fraction: float = 0.01
    """Share of documents held out for validation when preparing."""
    packing: Literal["concat", "documents"] = "documents"
    """How training samples are cut: `concat` cuts the documents, back to back, into windows of
    train.seq_length tokens (attention crosses documents); `documents` makes each document a
    sample (pieces of train.max_seq_length tokens when longer) and packs whole documents into
    each micro-batch, with attention and positions inside each document."""

    def validate(self) -> None:
        if not 0 < self.valid_fraction < 1:
            raise ConfigError("data.valid_fraction", f"must be in (0, 1), got {self.valid_fraction}")
        if self.vocab_size < 256:
            raise ConfigError("data.vocab_size", f"must be >= 256, got {self.vocab_size}")


@dataclass
class RunConfig:
    dir: str = "runs/demo"
    """Output directory: metrics.jsonl, plots, checkpoints."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 on GPU and fp32 on CPU when auto."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s per device for MFU; None looks the GPU up, or measures a CPU matmul."""
    progress: bool = True
    """Show a progress bar on rank 0 (a line per train.log_interval steps when stderr is not a terminal)."""
    max_restarts: int = 3
    """`stalwart run` restarts crashed ranks inside the job, at most this many times in a row without a
    newer snapshot or checkpoint; the crash after that ends the run (exit code 3: do not requeue)."""
    hang_timeout_s: float | None = None
    """A rank that finishes no step for this long is killed by its node's snapshot daemon, and the ranks
    restart from the newest snapshot. None: max(60 s, 5x the rank's median step). Needs the daemons
    (snapshot.interval != 0)."""

    def validate(self) -> None:
        if self.max_restarts < 0:
            raise ConfigError("run.max_restarts", f"must be >= 0, got {self.max_restarts}")
        if self.hang_timeout_s is not None and self.hang_timeout_s <= 0:
            given = self.hang_timeout_s
            raise ConfigError("run.hang_timeout_s", f"must be > 0 seconds, or null for automatic, got {given}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)

    def validate(self, world_size: int | None = None) -> None:
        """Raise ConfigError on the first problem; with a world size also check the layout fits it."""
        self.run.validate()
        self.model.validate()
        self.optim.validate()
        self.data.validate()
        self.parallel.validate()
        self.checkpoint.validate()
        self.snapshot.validate()
        self.planner.validate()
        dp = self.parallel.data_parallel_size(world_size) if world_size else (self.parallel.dp or 1)
        if self.planner.enabled and self.data.packing != "documents":
            raise ConfigError("planner.enabled", "the planner places documents: it needs data.packing: documents")
        self.train.validate(dp, self.data.packing == "documents", self.largest_sequence_group(dp))
        self._validate_layout()

    def largest_sequence_group(self, dp: int) -> int:
        """The most data-parallel ranks a sequence-parallel group of this run spans: 1 without the
        planner, else the largest power of two within `dp` that splits each tensor-parallel
        rank's attention heads evenly."""
        if not self.planner.enabled:
            return 1
        heads = self.model.num_attention_heads // self.parallel.tp
        return min(1 << (dp.bit_length() - 1), largest_group(heads))

    def _validate_layout(self) -> None:
        tp, pp, model = self.parallel.tp, self.parallel.pp, self.model
        if model.num_attention_heads % tp or model.query_groups % tp:
            raise ConfigError(
                "parallel.tp",
                f"{tp} must divide model.num_attention_heads ({model.num_attention_heads}) and "
                f"the query groups ({model.query_groups})",
            )
        if model.ffn_hidden_size % tp:
            raise ConfigError("parallel.tp", f"{tp} must divide model.ffn_hidden_size {model.ffn_hidden_size}")
        if model.make_vocab_size_divisible_by % tp:
            raise ConfigError(
                "parallel.tp",
                f"{tp} must divide model.make_vocab_size_divisible_by {model.make_vocab_size_divisible_by}",
            )
        stages = pp * (self.parallel.vpp or 1)
        if model.num_layers % stages:
            raise ConfigError(
                "model.num_layers",
                f"{model.num_layers} layers do not split evenly over {stages} pipeline stages "
                f"(parallel.pp x parallel.vpp)",
            )
        if self.parallel.sp and self.train.seq_length % tp:
            raise ConfigError("train.seq_length", f"sequence parallelism needs it divisible by tp {tp}")
        if self.data.packing == "documents" and self.model.spec == "te":
            raise ConfigError("model.spec", "packed documents (data.packing: documents) run on the local layers")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `section.key=value` overrides, and type-check it (no layout checks)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("<file>", f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("<file>", f"{path} is not valid YAML: {e}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    return from_dict(Config, raw)

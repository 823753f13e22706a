"""The checkpoint section of the config."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.schema import ConfigError


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save a universal checkpoint every this many steps (0 disables)."""
    dir: str | None = None
    """Where checkpoints go; None means run.dir/checkpoints."""
    keep: int = 3
    """Keep the newest this many complete checkpoints."""
    keep_every: int | None = None
    """Also keep every checkpoint whose step is a multiple of this (None: none)."""
    resume: bool = True
    """Resume from the newest complete checkpoint in `dir` when there is one."""
    staging_mb: int = 256
    """Host memory per rank for staging a checkpoint (a shared-memory ring; saving waits when it is full)."""

    def validate(self) -> None:
        if self.interval < 0:
            raise ConfigError("checkpoint.interval", f"must be >= 0, got {self.interval}")
        if self.keep < 1:
            raise ConfigError("checkpoint.keep", f"must be >= 1, got {self.keep}")
        if self.staging_mb < 1:
            raise ConfigError("checkpoint.staging_mb", f"must be >= 1, got {self.staging_mb}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ConfigError("checkpoint.keep_every", f"must be >= 1 or null, got {self.keep_every}")

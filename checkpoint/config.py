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


@dataclass
class SnapshotConfig:
    interval: int | None = None
    """Snapshot into the node daemons every this many steps when daemons run (None: every step; 0: never)."""
    listen: str = "127.0.0.1:50151"
    """host:port this node's snapshot daemon binds to (port 0: any free port, printed at start)."""
    memory_mb: int = 4096
    """Host memory one daemon may hold for snapshots; a delivery beyond it is refused."""
    parity: int = 1
    """Parity blocks per stripe across the daemons of a node group: 1 is XOR, 2 or more Reed-Solomon."""
    keep: int = 1
    """Committed snapshots a daemon keeps (the previous one stays until the next is committed)."""
    token_file: str | None = None
    """The job's secret, readable by its user only; None means run.dir/snapshot.token."""
    deadline_s: float = 30.0
    """Deadline of every call to a daemon."""
    max_message_mb: int = 4
    """Largest gRPC message a daemon accepts or sends; bulk data streams in chunks below it."""

    def validate(self) -> None:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError("snapshot.listen", f"must be host:port, got {self.listen!r}")
        for key in ("memory_mb", "parity", "keep", "max_message_mb"):
            if getattr(self, key) < 1:
                raise ConfigError(f"snapshot.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.interval is not None and self.interval < 0:
            raise ConfigError("snapshot.interval", f"must be >= 0 or null, got {self.interval}")
        if self.deadline_s <= 0:
            raise ConfigError("snapshot.deadline_s", f"must be > 0, got {self.deadline_s}")

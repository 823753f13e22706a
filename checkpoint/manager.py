"""Saving and resuming universal checkpoints from inside a run (every rank calls these)."""

from __future__ import annotations

import datetime
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint.config import CheckpointConfig
from checkpoint.engine import BlockedTime, CheckpointEngine
from checkpoint.state import RankState, rng_state
from checkpoint.universal import (
    FORMAT,
    VERSION,
    CheckpointError,
    CheckpointReader,
    Found,
    create_root_group,
    find_resume_checkpoint,
    step_dir_name,
    write_json_atomic,
)
from checkpoint.writer import CreateArrays, FinishStep
from parallel.errors import on_all_ranks


@dataclass(frozen=True)
class Resumed:
    step: int
    state: dict
    """state.json of the checkpoint: the run's state, its config and layout."""
    path: Path
    skipped: list[str]


class Checkpointer:
    def __init__(self, config: CheckpointConfig, run_dir: str, state: RankState, timeout_minutes: int):
        self.config = config
        self.dir = Path(config.dir or Path(run_dir) / "checkpoints")
        self.state = state
        self.dims = dims = state.dims
        # Checkpoint traffic gets its own group and timeout, apart from training's collectives.
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
        self.timeout_minutes = timeout_minutes
        self._engine: CheckpointEngine | None = None
        # Names this run's saves, so that writers never mistake a leftover directory for them.
        token = [secrets.token_hex(8) if dims.rank == 0 else None]
        dist.broadcast_object_list(token, src=0, group=self.group)
        self.token = token[0]
        self.blocked = BlockedTime()

    @property
    def engine(self) -> CheckpointEngine:
        """The staging ring and writer process, started at the first save made by the ranks
        (a run whose checkpoints the snapshot daemons write never starts them)."""
        if self._engine is None:
            self._engine = CheckpointEngine(self.config.staging_mb << 20)
        return self._engine

    # -- saving ------------------------------------------------------------------------

    def begin(self) -> None:
        """Hand a checkpoint of the state as it is now to the engine; returns once it is being staged.

        A failure of the previous save's staging or writing on any rank stops every rank
        here with that rank's message; this save's own failures surface at the next one.
        """
        with self.blocked:
            run_state = self.state.run.state_dict()
            step = run_state["step"]
            root = self.dir / step_dir_name(step)
            on_all_ranks(lambda: self._prepare(root, step, run_state), (CheckpointError,), self.group)
            self._hand_over(root, step)

    def _prepare(self, root: Path, step: int, run_state: dict) -> None:
        self.engine.check()
        if self.dims.rank == 0:  # the root group exists before any writer creates its arrays
            if root.exists():
                shutil.rmtree(root)  # an unfinished earlier attempt at this step
            attrs = {"format": FORMAT, "version": VERSION, "writer_token": self.token}
            create_root_group(root, attrs)
            write_json_atomic(root / "state.json", {**run_state, "step": step, "layout": self.state.layout()})

    def _hand_over(self, root: Path, step: int) -> None:
        timeout_s = 60.0 * self.timeout_minutes
        tensors = [(name, layout.to_attrs()) for name, layout in self.state.arrays_this_rank_creates()]
        create = CreateArrays(str(root), self.token, tensors, self.dims.tp, timeout_s)
        finish = FinishStep(
            root=str(root),
            step=step,
            rank=self.dims.rank,
            world_size=self.dims.world_size,
            rng=rng_state(),
            commit=self.dims.rank == 0,
            keep=self.config.keep,
            keep_every=self.config.keep_every,
            timeout_s=timeout_s,
        )
        self.engine.stage(create, self.state.pieces, self.dims.tp_rank, self.dims.tp, finish)

    def wait_staged(self) -> None:
        """Before the next optimizer step: the state being saved must not change under the copy."""
        with self.blocked:
            self.engine.wait_staged()

    def take_blocked_time(self) -> float:
        """Seconds the loop spent on checkpointing since the last call (handing over + waiting)."""
        return self.blocked.take()

    @property
    def staging_peak_bytes(self) -> int:
        return self.engine.ring.peak_bytes

    def finish(self) -> None:
        """Block until every checkpoint handed over is written and committed, on every rank.

        A writer's failure on any rank stops every rank with that rank's message.
        """
        timeout_s = 60.0 * self.timeout_minutes
        # First every rank's own share, so that a rank whose writer is gone stops everyone at
        # once; then rank 0's commits, which wait for every rank's share.
        on_all_ranks(lambda: self.engine.wait_written(timeout_s), (CheckpointError,), self.group)
        on_all_ranks(lambda: self.engine.wait_written(timeout_s, commits=True), (CheckpointError,), self.group)

    def save(self) -> None:
        """A blocking save: begin, then wait for the commit."""
        self.begin()
        self.finish()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    # -- resuming ----------------------------------------------------------------------

    def find(self) -> Found | None:
        return find_resume_checkpoint(self.dir)

    @torch.no_grad()
    def load(self, found: Found) -> Resumed:
        """Load model, optimizer, run state and RNG streams saved at any layout into this rank.

        RNG streams continue exactly on the same layout; another layout keeps its fresh seeds.
        """
        reader = CheckpointReader(found.path)
        rng = None
        if reader.state["layout"] == self.state.layout():
            rng = (found.path / "rng" / f"rank_{self.dims.rank:05d}.pt").read_bytes()
        self.state.load(reader, found.step, reader.state, rng)
        return Resumed(found.step, reader.state, found.path, found.skipped)

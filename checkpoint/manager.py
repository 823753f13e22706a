"""Saving and resuming universal checkpoints from inside a run (every rank calls these)."""

from __future__ import annotations

import datetime
import io
import random
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from checkpoint.config import CheckpointConfig
from checkpoint.engine import CheckpointEngine
from checkpoint.layout import TensorLayout
from checkpoint.state import (
    ModelParam,
    is_writer,
    load_optimizer_state,
    model_params,
    model_pieces,
    optimizer_pieces,
    optimizer_state_keys,
)
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
from parallel.dims import ParallelDims
from parallel.errors import on_all_ranks


@dataclass(frozen=True)
class Resumed:
    step: int
    state: dict
    """state.json of the checkpoint: sampler, config, layout, ..."""
    path: Path
    skipped: list[str]


class Checkpointer:
    def __init__(
        self, config: CheckpointConfig, run_dir: str, dims: ParallelDims, step_fn, vocab_size: int, timeout_minutes: int
    ):
        self.config = config
        self.dir = Path(config.dir or Path(run_dir) / "checkpoints")
        self.dims = dims
        self.step_fn = step_fn
        self.params: list[ModelParam] = model_params(step_fn.model, dims.tp, vocab_size)
        # Checkpoint traffic gets its own group and timeout, apart from training's collectives.
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
        self.timeout_minutes = timeout_minutes
        self.engine = CheckpointEngine(config.staging_mb << 20)
        # Names this run's saves, so that writers never mistake a leftover directory for them.
        token = [secrets.token_hex(8) if dims.rank == 0 else None]
        dist.broadcast_object_list(token, src=0, group=self.group)
        self.token = token[0]
        self.blocked_s = 0.0

    # -- saving ------------------------------------------------------------------------

    def begin(self, step: int, run_state: dict) -> None:
        """Hand a checkpoint of `step` to the engine; returns once it is being staged.

        A failure of the previous save's staging or writing on any rank stops every rank
        here with that rank's message; this save's own failures surface at the next one.
        """
        start = time.perf_counter()
        root = self.dir / step_dir_name(step)
        on_all_ranks(lambda: self._prepare(root, step, run_state), (CheckpointError,), self.group)
        self._hand_over(root, step)
        self.blocked_s += time.perf_counter() - start

    def _prepare(self, root: Path, step: int, run_state: dict) -> None:
        self.engine.check()
        if self.dims.rank == 0:  # the root group exists before any writer creates its arrays
            if root.exists():
                shutil.rmtree(root)  # an unfinished earlier attempt at this step
            attrs = {"format": FORMAT, "version": VERSION, "writer_token": self.token}
            create_root_group(root, attrs)
            write_json_atomic(root / "state.json", {**run_state, "step": step, "layout": self._layout()})

    def _hand_over(self, root: Path, step: int) -> None:
        timeout_s = 60.0 * self.timeout_minutes
        tensors = [(name, layout.to_attrs()) for name, layout in self._arrays_this_rank_creates()]
        create = CreateArrays(str(root), self.token, tensors, self.dims.tp, timeout_s)
        finish = FinishStep(
            root=str(root),
            step=step,
            rank=self.dims.rank,
            world_size=self.dims.world_size,
            rng=self._rng_state(),
            commit=self.dims.rank == 0,
            keep=self.config.keep,
            keep_every=self.config.keep_every,
            timeout_s=timeout_s,
        )
        self.engine.stage(create, self._pieces, self.dims.tp_rank, self.dims.tp, finish)

    def wait_staged(self) -> None:
        """Before the next optimizer step: the state being saved must not change under the copy."""
        start = time.perf_counter()
        self.engine.wait_staged()
        self.blocked_s += time.perf_counter() - start

    def take_blocked_time(self) -> float:
        """Seconds the loop spent on checkpointing since the last call (handing over + waiting)."""
        blocked, self.blocked_s = self.blocked_s, 0.0
        return blocked

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

    def save(self, step: int, run_state: dict) -> None:
        """A blocking save: begin, then wait for the commit."""
        self.begin(step, run_state)
        self.finish()

    def close(self) -> None:
        self.engine.close()

    def _pieces(self):
        yield from model_pieces(self.params, self.dims)
        yield from optimizer_pieces(self.step_fn.optimizer, self.params, self.dims)

    def _arrays_this_rank_creates(self) -> list[tuple[str, TensorLayout]]:
        """Model and optimizer tensors whose first writer is this rank."""
        keys = optimizer_state_keys(self.step_fn.optimizer)
        tensors = []
        for p in self.params:
            if is_writer(p.name, p.layout, self.dims) and self.dims.tp_rank == 0:
                tensors += [(f"model/{p.name}", p.layout), *((f"optim/{key}/{p.name}", p.layout) for key in keys)]
        return tensors

    def _layout(self) -> dict:
        d = self.dims
        return {
            "tp": d.tp,
            "pp": d.pp,
            "vpp": d.vpp,
            "dp": d.dp,
            "sp": d.sp,
            "distributed_optimizer": d.distributed_optimizer,
            "world_size": d.world_size,
        }

    def _rng_state(self) -> bytes:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        states = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states(),
        }
        buffer = io.BytesIO()
        torch.save(states, buffer)
        return buffer.getvalue()

    # -- resuming ----------------------------------------------------------------------

    def find(self) -> Found | None:
        return find_resume_checkpoint(self.dir)

    @torch.no_grad()
    def load(self, found: Found) -> Resumed:
        """Load model, optimizer and RNG state saved at any layout into this rank's pieces."""
        reader = CheckpointReader(found.path)
        model = [(f"model/{p.name}", p.layout, p.param) for p in self.params]
        reader.read_many(model, self.dims.tp_rank, self.dims.tp)
        load_optimizer_state(self.step_fn.optimizer, self.params, reader, self.dims, found.step)
        self._load_rng(found.path, reader.state["layout"])
        return Resumed(found.step, reader.state, found.path, found.skipped)

    def _load_rng(self, root: Path, saved_layout: dict) -> None:
        """RNG streams continue exactly on the same layout; another layout keeps its fresh seeds."""
        if saved_layout != self._layout():
            return
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        states = torch.load(root / "rng" / f"rank_{self.dims.rank:05d}.pt", weights_only=False)
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.set_rng_state(states["torch"])
        if states["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])
        get_cuda_rng_tracker().set_states(states["tracker"])

"""Saving and resuming universal checkpoints from inside a run (every rank calls these)."""

from __future__ import annotations

import datetime
import io
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import zarr

from checkpoint.config import CheckpointConfig
from checkpoint.retention import checkpoints_to_delete
from checkpoint.state import (
    ModelParam,
    Piece,
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
    CheckpointReader,
    Found,
    commit,
    complete_checkpoints,
    create_arrays,
    find_resume_checkpoint,
    step_dir_name,
    write_json_atomic,
    write_pieces,
)
from parallel.dims import ParallelDims


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

    # -- saving ------------------------------------------------------------------------

    @torch.no_grad()
    def save(self, step: int, run_state: dict) -> Path:
        """Write a complete checkpoint of `step` and commit it; blocks until it is durable."""
        root = self.dir / step_dir_name(step)
        if self.dims.rank == 0:
            if root.exists():
                shutil.rmtree(root)  # an unfinished earlier attempt at this step
            zarr.open_group(root, mode="w", attributes={"format": FORMAT, "version": VERSION})
        self._barrier()
        create_arrays(root, self._arrays_this_rank_creates(), self.dims.tp)
        self._barrier()
        reports = {}
        for piece in [*model_pieces(self.params, self.dims), *self._optimizer_pieces()]:
            if piece.writes:
                reports.update(write_pieces(root, [piece], self.dims.tp_rank, self.dims.tp))
        self._write_rng(root)
        if self.dims.rank == 0:
            write_json_atomic(root / "state.json", {**run_state, "step": step, "layout": self._layout()})
        all_reports = [None] * self.dims.world_size
        dist.all_gather_object(all_reports, reports, group=self.group)
        if self.dims.rank == 0:
            commit(self.dir, root, all_reports, step)
            self._apply_retention()
        self._barrier()
        return root

    def _optimizer_pieces(self):
        return optimizer_pieces(self.step_fn.optimizer, self.params, self.dims)

    def _arrays_this_rank_creates(self) -> list:
        """(name, layout) of arrays whose first writer is this rank: model and optimizer tensors."""
        keys = optimizer_state_keys(self.step_fn.optimizer)
        pieces = []
        for p in self.params:
            if is_writer(p.name, p.layout, self.dims) and self.dims.tp_rank == 0:
                names = [f"model/{p.name}", *(f"optim/{key}/{p.name}" for key in keys)]
                pieces += [Piece(name, p.layout, p.param, True) for name in names]
        return pieces

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

    def _write_rng(self, root: Path) -> None:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        states = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states(),
        }
        (root / "rng").mkdir(exist_ok=True)
        buffer = io.BytesIO()
        torch.save(states, buffer)
        path = root / "rng" / f"rank_{self.dims.rank:05d}.pt"
        path.write_bytes(buffer.getvalue())

    def _apply_retention(self) -> None:
        steps = [step for step, _ in complete_checkpoints(self.dir)]
        for step in checkpoints_to_delete(steps, self.config.keep, self.config.keep_every):
            shutil.rmtree(self.dir / step_dir_name(step), ignore_errors=True)

    def _barrier(self) -> None:
        dist.barrier(group=self.group)

    # -- resuming ----------------------------------------------------------------------

    def find(self) -> Found | None:
        return find_resume_checkpoint(self.dir)

    @torch.no_grad()
    def load(self, found: Found) -> Resumed:
        """Load model, optimizer and RNG state saved at any layout into this rank's pieces."""
        reader = CheckpointReader(found.path)
        for p in self.params:
            reader.read_into(f"model/{p.name}", p.layout, p.param, self.dims.tp_rank, self.dims.tp)
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

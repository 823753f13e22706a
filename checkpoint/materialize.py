"""Writing a committed snapshot as a universal checkpoint, straight from the daemons' memory.

Each daemon runs this in a process of its own for its node's share (forked warm from a fork
server that imported this module; `stalwart-writer` in ps), so that the training ranks copy their state once
per step (into the daemon) and a checkpoint write that dies never harms the snapshot tier:
the daemon keeps the step pinned until the process has exited. The chunks, RNG files, done
markers, commit and retention are those of the checkpoint writer (checkpoint/writer.py), so
the result is the checkpoint the ranks would have written themselves: the process holding
rank 0 creates the root group and state.json first, and commits once every rank's marker is
there, whichever daemon wrote it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from checkpoint.layout import TensorLayout, chunks_of, join_shards, local_shape
from checkpoint.snapshot_client import SnapshotClient
from checkpoint.snapshot_store import MappedSegment, attach
from checkpoint.universal import FORMAT, VERSION, create_arrays, create_root_group, write_json_atomic
from checkpoint.writer import FinishStep, apply_retention, finish_step, rank_markers, write_chunk_file
from parallel.processes import name_process, warm_forks

META, RNG = "meta.json", "rng"
"""The small buffers of a rank's snapshot beside its pieces (see checkpoint/snapshot_sink.py)."""


@dataclass(frozen=True)
class MaterializeJob:
    root: str
    """The checkpoint directory of this step, e.g. run/checkpoints/step_000000100."""
    step: int
    token: str
    """Written into the root group: the markers of this save, not of a leftover directory."""
    world_size: int
    keep: int
    keep_every: int | None
    timeout_s: float
    segments: list[tuple[int, str, dict[str, tuple[int, int]]]]
    """(rank, shared-memory segment, buffer name -> (offset, bytes)) of this daemon's ranks."""
    peers: list[str] = dataclasses.field(default_factory=list)
    """The group's other daemons: they hold the other DP ranks' shards of the distributed
    optimizer's state that this daemon's ranks write."""
    job_id: str = ""
    job_token: str = ""
    """The job's credentials, for fetching those shards."""
    deadline_s: float = 30.0


class RankSegment:
    """One rank's committed snapshot, mapped read-only from the daemon's segment."""

    def __init__(self, rank: int, segment: str, buffers: dict[str, tuple[int, int]]):
        self.rank, self.buffers = rank, buffers
        self.shm: MappedSegment = attach(segment)
        self.meta = json.loads(self.bytes(META))

    def bytes(self, name: str) -> bytes:
        offset, nbytes = self.buffers[name]
        return bytes(self.shm.buf[offset : offset + nbytes])

    def piece(self, name: str) -> tuple[TensorLayout, np.ndarray]:
        """A whole piece: 1-D for a shard (see `shard`)."""
        layout = TensorLayout.from_attrs(self.meta["pieces"][name])
        offset, nbytes = self.buffers[name]
        values = np.frombuffer(self.shm.buf, np.float32, nbytes // 4, offset)
        return layout, values if self.shard(name) else values.reshape(local_shape(layout, self.meta["layout"]["tp"]))

    def shard(self, name: str) -> tuple[int, int] | None:
        return shard_of(self.meta, name)

    def holds_whole(self, name: str) -> bool:
        """Whether this rank holds all of piece `name` (not a shard, nor nothing of it)."""
        return name in self.buffers and not self.shard(name)

    def close(self) -> None:
        release(self.shm)


def shard_of(meta: dict, name: str) -> tuple[int, int] | None:
    """The element range of its TP piece that a rank's snapshot (`meta`) holds of piece
    `name`: a distributed optimizer's shard; None for a whole piece."""
    shard = meta.get("shards", {}).get(name)
    return tuple(shard) if shard else None


def release(shm: MappedSegment) -> None:
    """Unmap a daemon's segment once the arrays viewing it are gone (a view kept alive by a
    reference cycle goes at the next collection; one still alive keeps the mapping, harmlessly,
    until the process exits: the daemon owns the segment either way). A full collection is
    only worth its time (a tenth of a second in a trainer) when a view is still alive."""
    for attempt in range(2):
        try:
            shm.close()
            return
        except BufferError:
            if attempt == 0:
                gc.collect()


def materialize(job: MaterializeJob) -> None:
    """Write this daemon's ranks' share of the checkpoint; commit it if rank 0 is among them."""
    root = Path(job.root)
    ranks = [RankSegment(*segment) for segment in sorted(job.segments)]
    try:
        first = next((r for r in ranks if r.rank == 0), None)
        if first is not None:
            _create_root(root, job, first.meta)
        else:
            _wait_for(lambda: _root_is_ours(root, job.token), job.timeout_s, job, "the checkpoint's root group")
        elsewhere = fetch_shards_held_elsewhere(job, ranks)
        for rank in ranks:
            _write_rank(root, job, rank, ranks, elsewhere)
    finally:
        for rank in ranks:
            rank.close()
    # Every daemon keeps the step pinned until every rank's share is written, so that none
    # drops shards another daemon's writer has yet to fetch.
    _wait_for(lambda: rank_markers(root / "done", job.world_size) is not None, job.timeout_s, job, "every rank's share")
    if first is not None:
        _commit(root, job)


Shards = dict[tuple[int, str], list[tuple[tuple[int, int], np.ndarray]]]
"""(TP rank, piece name) -> the DP ranks' shards of it: ((start, end), values)."""


def fetch_shards_held_elsewhere(job: MaterializeJob, ranks: list[RankSegment]) -> Shards:
    """The shards of the pieces these ranks write that ranks on other daemons hold."""
    wanted = {(r.meta["tp_rank"], name) for r in ranks for name in r.meta["writes"] if not r.holds_whole(name)}
    seen, found = {r.rank for r in ranks}, {}
    for address in job.peers if wanted else []:
        client = SnapshotClient(address, job.job_id, job.job_token, job.deadline_s)
        try:
            held = next((s for s in client.list() if s.step == job.step), None)
            for rank in sorted(set(held.ranks if held else ()) - seen):
                seen.add(rank)
                meta = json.loads(client.fetch_remote(job.step, rank, [META])[META])
                names = [n for n in meta.get("shards", {}) if (meta["tp_rank"], n) in wanted]
                for name, data in client.fetch_remote(job.step, rank, names).items() if names else ():
                    part = (tuple(meta["shards"][name]), np.frombuffer(data, np.float32))
                    found.setdefault((meta["tp_rank"], name), []).append(part)
        finally:
            client.close()
    return found


def _whole_piece(rank: RankSegment, name: str, ranks: list[RankSegment], elsewhere: Shards) -> tuple:
    if rank.holds_whole(name):
        return rank.piece(name)
    layout = TensorLayout.from_attrs(rank.meta["pieces"][name])
    tp_rank, tp = rank.meta["tp_rank"], rank.meta["layout"]["tp"]
    here = [(r.shard(name), r.piece(name)[1]) for r in ranks if r.meta["tp_rank"] == tp_rank and r.shard(name)]
    return layout, join_shards(name, here + elsewhere.get((tp_rank, name), []), local_shape(layout, tp))


def _create_root(root: Path, job: MaterializeJob, meta: dict) -> None:
    if root.exists():
        shutil.rmtree(root)  # an unfinished earlier attempt at this step
    create_root_group(root, {"format": FORMAT, "version": VERSION, "writer_token": job.token})
    state = {**meta["run_state"], "step": job.step, "layout": meta["layout"]}
    write_json_atomic(root / "state.json", state)


def _write_rank(root: Path, job: MaterializeJob, rank: RankSegment, ranks: list[RankSegment], elsewhere: Shards):
    meta = rank.meta
    tp, tp_rank = meta["layout"]["tp"], meta["tp_rank"]
    create_arrays(root, [(name, TensorLayout.from_attrs(attrs)) for name, attrs in meta["creates"]], tp)
    written: dict[str, list[str]] = {}
    for name in meta["writes"]:
        layout, local = _whole_piece(rank, name, ranks, elsewhere)
        for array, chunks, region, values in chunks_of(name, layout, local, tp_rank, tp):
            pairs = tuple((s.start, s.stop) for s in region)
            written.setdefault(array, []).append(write_chunk_file(root / array, pairs, chunks, values))
    finish = FinishStep(
        str(root), job.step, rank.rank, job.world_size, rank.bytes(RNG), False, job.keep, job.keep_every, job.timeout_s
    )
    finish_step(finish, written)  # RNG file, the directories' fsyncs, then this rank's marker


def _commit(root: Path, job: MaterializeJob) -> None:
    from checkpoint.universal import commit

    commit(root.parent, root, rank_markers(root / "done", job.world_size), job.step)
    apply_retention(root.parent, job.keep, job.keep_every)


def failure_marker(root: str, token: str) -> Path:
    """Left beside a checkpoint's directory when one daemon's writer of it fails, so that the
    other daemons' writers of the same attempt stop waiting for its share and give up."""
    path = Path(root)
    return path.with_name(f".{path.name}.{token}.failed")


def _root_is_ours(root: Path, token: str) -> bool:
    try:
        return json.loads((root / "zarr.json").read_text())["attributes"].get("writer_token") == token
    except (OSError, KeyError, json.JSONDecodeError):
        return False


def _wait_for(condition, timeout_s: float, job: MaterializeJob, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    abandoned = failure_marker(job.root, job.token)
    while not condition():
        if abandoned.exists():
            raise RuntimeError(f"{job.root}: another daemon's writer failed; abandoned while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{job.root}: {what} did not appear within {job.timeout_s:.0f} s")
        time.sleep(0.02)


class Materializations:
    """The daemon's side: one writer process at a time, in the order requested, watched; what
    became of each, for Status. In order, as a rank's checkpoint writer works: a checkpoint's
    retention removes unfinished older saves, which must therefore be abandoned, not running."""

    KEEP = 256
    """Records kept for Status: every queued or running one, and the newest finished ones."""

    def __init__(self):
        self.by_root: dict[str, dict] = {}  # root -> {"step", "root", "state", "error"}, oldest first
        self.queue: list[tuple[MaterializeJob, dict, object]] = []
        self.process: multiprocessing.process.BaseProcess | None = None
        self.stopped = False
        self.lock = threading.Lock()

    @property
    def records(self) -> list[dict]:
        with self.lock:
            return list(self.by_root.values())

    def start(self, job: MaterializeJob, on_exit) -> None:
        """Write `job` after the ones before it; `on_exit()` once its process has ended, however."""
        record = {"step": job.step, "root": job.root, "state": "queued", "error": ""}
        with self.lock:
            self.by_root.pop(job.root, None)  # a root written again: its newest attempt
            self.by_root[job.root] = record
            finished = [root for root, r in self.by_root.items() if r["state"] in ("done", "failed")]
            for root in finished[: max(0, len(self.by_root) - self.KEEP)]:
                del self.by_root[root]
            self.queue.append((job, record, on_exit))
            if self.process is None:
                self._next()

    def _next(self) -> None:
        """Start the oldest queued job (called with the lock held)."""
        if not self.queue or self.stopped:
            return
        job, record, on_exit = self.queue.pop(0)
        record["state"] = "running"
        errors, report = multiprocessing.Pipe(duplex=False)
        self.process = process = writer_forks().Process(target=write_share, args=(job, report), daemon=True)
        process.start()
        report.close()

        def watch() -> None:
            try:
                process.join()
                record["error"] = "" if process.exitcode == 0 else _failure(errors, process.exitcode)
                record["state"] = "done" if process.exitcode == 0 else "failed"
                if process.exitcode != 0:
                    _leave_failure_marker(job)
            finally:
                errors.close()
                on_exit()
                with self.lock:
                    self.process = None
                    self._next()

        threading.Thread(target=watch, name=f"stalwart-materialize-{job.step}", daemon=True).start()

    def stop(self) -> None:
        """A stopping daemon leaves no writer behind (an unfinished checkpoint is never committed)."""
        with self.lock:
            self.stopped = True
            if self.process is not None:
                self.process.kill()


def _failure(errors, exitcode: int) -> str:
    """What a failed writer reported, or how it ended (killed: no report)."""
    try:
        return errors.recv()
    except EOFError:
        return f"the writer was killed by signal {-exitcode}" if exitcode < 0 else f"the writer exited with {exitcode}"


def _leave_failure_marker(job: MaterializeJob) -> None:
    try:
        marker = failure_marker(job.root, job.token)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass  # the others time out instead


WRITER_NAME = "stalwart-writer"
"""What ps and top show for a daemon's checkpoint writer."""


def writer_forks(start_now: bool = False):
    """Where a daemon's writers are forked from: a fork server that imported this module once
    (half a CPU-second per checkpoint otherwise, taken from the training ranks' cores)."""
    return warm_forks("checkpoint.materialize", start_now)


def write_share(job: MaterializeJob, report) -> None:
    """A writer's body, in a process of its own; a failure's last lines go to `report`."""
    name_process(WRITER_NAME)
    # Background work, at a low priority but not idle-only: where training takes every core, a
    # writer that got no CPU at all would pin its snapshot (and the next ones) indefinitely.
    os.nice(10)
    try:
        materialize(job)
    except BaseException:
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)  # the daemon's log
        report.send("\n".join(text.strip().splitlines()[-5:]))
        sys.exit(1)

"""The checkpoint writer: a separate process per rank that turns staged chunks into zarr files.

It reads chunks from the shared-memory ring the trainer staged them in, writes and fsyncs
each one, and frees its bytes in the ring. When a step's last chunk is written it leaves a
`done/rank_R.json` marker; the writer of rank 0 commits (manifest, then `latest`) once every
marker is there, and applies retention. Coordination goes through files, never through a
collective, so a dead rank or writer can only leave a checkpoint uncommitted. A writer
never stops reading its trainer's requests to wait for another rank's: a commit waits on
the side, so that a lost peer cannot back up the ring and stall training.
"""

from __future__ import annotations

import argparse
import enum
import json
import mmap
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import crc32c
import numpy as np

from checkpoint.layout import TensorLayout
from checkpoint.retention import checkpoints_to_delete
from checkpoint.universal import (
    commit,
    complete_checkpoints,
    create_arrays,
    fsync_file,
    step_dir_name,
    step_dirs,
    write_json_atomic,
)


@dataclass(frozen=True)
class ChunkWrite:
    root: str
    array: str
    region: tuple[tuple[int, int], ...]
    ring_start: int
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    """The array's chunk shape (its zarr.json may be another rank's, not yet written)."""

    @property
    def nbytes(self) -> int:
        return 4 * int(np.prod(self.shape))


@dataclass(frozen=True)
class CreateArrays:
    """Create the metadata of this rank's share of a checkpoint's arrays."""

    root: str
    token: str
    """The root group this save belongs to carries this token (a stale directory does not)."""
    tensors: list[tuple[str, dict]]
    """(array name, TensorLayout attributes) of the arrays this rank creates."""
    tp: int
    timeout_s: float


@dataclass(frozen=True)
class FinishStep:
    root: str
    step: int
    rank: int
    world_size: int
    rng: bytes
    commit: bool
    """Rank 0's writer commits once every rank's marker is there."""
    keep: int
    keep_every: int | None
    timeout_s: float


@dataclass(frozen=True)
class Flush:
    """Reply once every request before this one is done; with `commits`, also once every
    commit waiting for other ranks has been made or has timed out."""

    token: int
    commits: bool


HEADER_BYTES = 64
"""The ring's shared memory starts with a header of int64 slots (below), then the data."""
FREED, WRITER_PHASE, STAGING = 0, 1, 2
"""Header slots: bytes the writer has freed so far; the writer's Phase; 1 while the trainer copies."""


class Phase(enum.IntEnum):
    """What the writer is doing, published in the ring's header so that an observer (a crash
    test, an operator's debugger) can tell which part of a save a process is in."""

    IDLE = 0
    WRITING = 1
    """Between a save's CreateArrays and its FinishStep: creating arrays, writing chunk files."""
    FINISHING = 2
    """Fsyncing the save's directories, writing this rank's RNG file and done marker."""
    COMMITTING = 3
    """Rank 0's writer: the manifest, `latest` and retention of a save every rank finished."""


def ring_views(buffer, ring_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(header slots, data ring) over the shared memory of a staging ring."""
    header = np.ndarray((HEADER_BYTES // 8,), dtype=np.int64, buffer=buffer)
    ring = np.ndarray((ring_size,), dtype=np.uint8, buffer=buffer, offset=HEADER_BYTES)
    return header, ring


def serve(ring_fd: int, ring_size: int, requests: Connection, replies: Connection, trainer_pid: int) -> None:
    """Handle requests until told to stop or until the trainer is gone (its pipe closes)."""
    shm = mmap.mmap(ring_fd, HEADER_BYTES + ring_size)
    header, ring = ring_views(shm, ring_size)
    written: dict[str, dict[str, list[str]]] = {}
    commits = PendingCommits(trainer_pid, header)
    try:
        while True:
            if commits and not requests.poll(COMMIT_POLL_S):
                commits.make_ready()
                continue
            if (request := _next_request(requests)) is None:
                break
            if isinstance(request, CreateArrays):
                header[WRITER_PHASE] = Phase.WRITING
                _create_arrays(request, trainer_pid)
            elif isinstance(request, ChunkWrite):
                _write_chunk(request, ring, ring_size, written)
                header[FREED] = request.ring_start + request.nbytes
            elif isinstance(request, FinishStep):
                header[WRITER_PHASE] = Phase.FINISHING
                finish_step(request, written.pop(request.root, {}))
                header[WRITER_PHASE] = Phase.IDLE
                if request.commit:
                    commits.add(request)
            elif isinstance(request, Flush):
                if request.commits:
                    commits.settle()
                replies.send(("flushed", request.token))
            else:
                raise TypeError(f"unknown request {request!r}")
            commits.make_ready(at_most_every_s=COMMIT_POLL_S)
    except Exception:  # the trainer re-raises it at its next check
        replies.send(("error", traceback.format_exc()))
    finally:
        del header, ring
        commits.header = None
        shm.close()


COMMIT_POLL_S = 0.05
"""How often rank 0's writer looks for the markers of the saves it has yet to commit."""


class PendingCommits:
    """Rank 0's saves whose own share is written, each waiting for every rank's done marker."""

    def __init__(self, trainer_pid: int, header: np.ndarray):
        self.trainer_pid = trainer_pid
        self.header = header
        self.waiting: list[tuple[FinishStep, float]] = []  # (request, deadline), oldest first
        self.last_look = 0.0

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def add(self, request: FinishStep) -> None:
        self.waiting.append((request, time.monotonic() + request.timeout_s))

    def make_ready(self, at_most_every_s: float = 0.0) -> None:
        """Commit, in step order, every save whose markers are all there; drop the expired."""
        now = time.monotonic()
        if not self.waiting or now - self.last_look < at_most_every_s:
            return
        self.last_look = now
        if os.getppid() != self.trainer_pid:  # a job being torn down commits nothing more
            self.waiting.clear()
            return
        while self.waiting:
            request, deadline = self.waiting[0]
            reports = rank_markers(Path(request.root) / "done", request.world_size)
            if reports is None and now < deadline:
                return
            self.waiting.pop(0)
            if reports is not None:
                self._commit(request, reports)

    def _commit(self, request: FinishStep, reports: list) -> None:
        root = Path(request.root)
        phase, self.header[WRITER_PHASE] = int(self.header[WRITER_PHASE]), Phase.COMMITTING
        commit(root.parent, root, reports, request.step)
        apply_retention(root.parent, request.keep, request.keep_every)
        self.header[WRITER_PHASE] = phase

    def settle(self) -> None:
        """Wait until every waiting save is committed or has expired."""
        while self.waiting:
            self.make_ready()
            if self.waiting:
                time.sleep(0.005)


def rank_markers(directory: Path, world_size: int) -> list | None:
    """Every rank's marker in `directory`, or None while one is missing."""
    paths = [directory / f"rank_{rank:05d}.json" for rank in range(world_size)]
    if not all(p.is_file() for p in paths):
        return None
    return [json.loads(p.read_text()) for p in paths]


def _next_request(requests: Connection):
    try:
        return requests.recv()
    except EOFError:
        return None


def _create_arrays(request: CreateArrays, trainer_pid: int) -> None:
    root = Path(request.root)
    wait_for_root(root, request.token, request.timeout_s, trainer_pid)
    tensors = [(name, TensorLayout.from_attrs(attrs)) for name, attrs in request.tensors]
    create_arrays(root, tensors, request.tp)


def wait_for_root(root: Path, token: str, timeout_s: float, trainer_pid: int) -> None:
    """Rank 0's trainer creates the root group before any rank hands a save over (shared
    file systems may show it late); a leftover from an earlier attempt has another token."""

    def root_is_ours() -> bool:
        try:
            return json.loads((root / "zarr.json").read_text())["attributes"].get("writer_token") == token
        except (OSError, KeyError, json.JSONDecodeError):
            return False

    if not _wait_until(root_is_ours, timeout_s, trainer_pid):
        raise TimeoutError(f"{root}: the checkpoint root group did not appear in {timeout_s:.0f} s")


def _wait_until(condition, timeout_s: float, trainer_pid: int) -> bool:
    """Poll `condition`; False on timeout or once our trainer is gone (we must not outlive it)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline or os.getppid() != trainer_pid:
            return False
        time.sleep(0.005)
    return True


def _write_chunk(request: ChunkWrite, ring: np.ndarray, ring_size: int, written: dict) -> None:
    offset = request.ring_start % ring_size
    data = ring[offset : offset + request.nbytes].view(np.float32).reshape(request.shape)
    key = write_chunk_file(Path(request.root) / request.array, request.region, request.chunks, data)
    written.setdefault(request.root, {}).setdefault(request.array, []).append(key)


def write_chunk_file(array_dir: Path, region, chunks: tuple[int, ...], data: np.ndarray) -> str:
    """Write and fsync the chunk of an array whose global `region` ((start, stop) per dimension)
    holds `data`; returns its chunk key."""
    index = [start // size for (start, _), size in zip(region, chunks, strict=True)]
    chunk_key = "/".join(["c", *map(str, index)])
    path = array_dir / chunk_key
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.writelines(encode_chunk(data, chunks))
        f.flush()
        os.fsync(f.fileno())
    return chunk_key


def encode_chunk(data: np.ndarray, chunk_shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """A chunk as the arrays' codecs store it: little-endian float32 bytes, then their CRC-32C
    (kept apart, so that a chunk's bytes are not copied once more to append four).

    Done here rather than through zarr's array API, whose per-call overhead made writing
    the chunks of a small model cost more than the bytes; every read of these chunks,
    by us or by plain zarr, decodes them with zarr's own codecs and checks the checksum.
    An edge chunk is padded to the full chunk shape with the fill value, as zarr does.
    """
    if data.shape != chunk_shape:
        data = np.pad(data, [(0, full - part) for full, part in zip(chunk_shape, data.shape, strict=True)])
    raw = np.ascontiguousarray(data, dtype="<f4").tobytes()
    return raw, np.array([crc32c.crc32c(raw)], dtype="<u4").tobytes()


def finish_step(request: FinishStep, report: dict[str, list[str]]) -> None:
    root = Path(request.root)
    _fsync_new_directories(root, report)
    (root / "rng").mkdir(exist_ok=True)
    rng_path = root / "rng" / f"rank_{request.rank:05d}.pt"
    rng_path.write_bytes(request.rng)
    fsync_file(rng_path)
    (root / "done").mkdir(exist_ok=True)
    write_json_atomic(root / "done" / f"rank_{request.rank:05d}.json", report)


def _fsync_new_directories(root: Path, report: dict[str, list[str]]) -> None:
    """The directories that gained chunk files: their entries must be durable before `done`."""
    directories = {root}
    for name, keys in report.items():
        for key in keys:
            path = (root / name / key).parent
            while path != root:
                directories.add(path)
                path = path.parent
    for directory in sorted(directories, key=lambda p: -len(p.parts)):
        fsync_file(directory)


def apply_retention(ckpt_dir: Path, keep: int, keep_every: int | None) -> None:
    complete = [step for step, _ in complete_checkpoints(ckpt_dir)]
    if not complete:
        return
    doomed = checkpoints_to_delete(complete, keep, keep_every)
    # Unfinished saves older than the newest complete checkpoint are leftovers of crashes;
    # newer ones may still be in progress.
    doomed += [step for step, _ in step_dirs(ckpt_dir) if step < max(complete) and step not in complete]
    for step in doomed:
        shutil.rmtree(ckpt_dir / step_dir_name(step), ignore_errors=True)
    for marker in ckpt_dir.glob(".step_*.failed"):  # of abandoned writes (checkpoint/materialize.py)
        if int(marker.name.split(".")[1].removeprefix("step_")) < max(complete):
            marker.unlink(missing_ok=True)


def main() -> None:
    """Entry of the writer process, started by checkpoint.engine with inherited pipe ends."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--ring-fd", type=int, required=True, help="the staging ring (memfd), inherited")
    parser.add_argument("--ring-size", type=int, required=True)
    parser.add_argument("--requests-fd", type=int, required=True)
    parser.add_argument("--replies-fd", type=int, required=True)
    args = parser.parse_args()
    # Background work: the writer runs only on CPU time that training leaves idle.
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    requests = Connection(args.requests_fd, writable=False)
    replies = Connection(args.replies_fd, readable=False)
    # The trainer that started us; once it is gone (we are re-parented) we stop waiting for anything.
    serve(args.ring_fd, args.ring_size, requests, replies, trainer_pid=os.getppid())


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: requests unpickle as
    # checkpoint.writer classes, and isinstance() must see those.
    from checkpoint import writer

    writer.main()

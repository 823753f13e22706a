"""What one snapshot daemon holds: per step, each local rank's buffers in a shared-memory
segment the daemon owns, so that a rank's crash loses nothing it delivered.

A step is invisible until committed, and committing it needs every expected rank's
delivery; the previous committed step is dropped only after that, so there is never a
moment without a valid snapshot. Memory is bounded: a reservation that would pass the
limit is refused, never an OOM kill. Thread-safe: the gRPC server calls it from a pool.
"""

from __future__ import annotations

import secrets
import threading
import zlib
from dataclasses import dataclass, field
from multiprocessing import resource_tracker, shared_memory


class SnapshotError(Exception):
    """A request the store refuses; `kind` picks the gRPC status."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # invalid | not_found | exhausted | precondition


@dataclass(frozen=True)
class BufferInfo:
    name: str
    offset: int
    nbytes: int
    crc32: int


@dataclass
class Segment:
    shm: shared_memory.SharedMemory
    nbytes: int
    buffers: list[BufferInfo] | None = None
    """None until the rank has delivered."""

    def view(self) -> memoryview:
        return self.shm.buf[: self.nbytes]


@dataclass
class Step:
    segments: dict[int, Segment] = field(default_factory=dict)
    committed: bool = False

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments.values())

    def delivered(self) -> list[int]:
        return sorted(r for r, s in self.segments.items() if s.buffers is not None)


class SnapshotStore:
    def __init__(self, job: str, node: int, expected_ranks: list[int], memory_limit: int, keep: int = 1):
        self.job, self.node = job, node
        self.expected = sorted(expected_ranks)
        self.memory_limit, self.keep = memory_limit, keep
        self.steps: dict[int, Step] = {}
        self.lock = threading.Lock()

    # -- deliveries ----------------------------------------------------------------------

    def reserve(self, step: int, rank: int, nbytes: int) -> str:
        """A fresh segment for (step, rank); one reserved earlier for it (a rank restarted) is freed."""
        self._check_rank(rank)
        if step < 0 or nbytes < 0:
            raise SnapshotError("invalid", f"step and size must be >= 0, got step {step}, {nbytes} bytes")
        with self.lock:
            if self.steps.get(step, Step()).committed:
                raise SnapshotError("precondition", f"step {step} is already committed")
            newest = self._newest_committed()
            if newest is not None and step < newest:
                raise SnapshotError("precondition", f"step {step} is older than the committed step {newest}")
            current = self.steps.get(step)
            old = current.segments.pop(rank, None) if current else None
            if old is not None:
                _release(old)
            if self.memory_used() + nbytes > self.memory_limit:
                raise SnapshotError(
                    "exhausted",
                    f"{nbytes} bytes for rank {rank} of step {step} would pass this daemon's memory limit: "
                    f"{self.memory_used()} of {self.memory_limit} bytes in use",
                )
            name = f"stalwart-{self.job}-n{self.node}-s{step}-r{rank}-{secrets.token_hex(4)}"
            # Mode 0600: only the job's user can map it. The daemon owns it; nothing else unlinks it.
            shm = shared_memory.SharedMemory(name=name, create=True, size=max(1, nbytes))
            self.steps.setdefault(step, Step()).segments[rank] = Segment(shm, nbytes)
            return shm.name

    def deliver(self, step: int, rank: int, buffers: list[BufferInfo]) -> tuple[int, int]:
        """Record that `rank`'s buffers of `step` are in its segment, after checking them."""
        self._check_rank(rank)
        with self.lock:
            segment = self._segment(step, rank)
            if segment.buffers is not None:
                raise SnapshotError("precondition", f"rank {rank} already delivered step {step}")
            _check_layout(buffers, segment.nbytes, rank)
            view = segment.view()
            for b in buffers:
                if zlib.crc32(view[b.offset : b.offset + b.nbytes]) != b.crc32:
                    raise SnapshotError("invalid", f"buffer {b.name!r} of rank {rank}: checksum mismatch")
            segment.buffers = list(buffers)
            return len(self.steps[step].delivered()), len(self.expected)

    def commit(self, step: int) -> list[int]:
        """Commit `step` if every expected rank delivered; the ranks still missing otherwise."""
        with self.lock:
            entry = self.steps.get(step)
            if entry is None:
                raise SnapshotError("not_found", f"no rank delivered step {step}")
            missing = [r for r in self.expected if r not in entry.delivered()]
            if missing or entry.committed:
                return missing
            entry.committed = True
            self._drop_superseded(step)
            return []

    def _drop_superseded(self, step: int) -> None:
        committed = sorted(s for s, e in self.steps.items() if e.committed)
        doomed = committed[: -self.keep]
        doomed += [s for s, e in self.steps.items() if not e.committed and s < step]  # never to commit
        for s in doomed:
            for segment in self.steps.pop(s).segments.values():
                _release(segment)

    # -- reading -------------------------------------------------------------------------

    def locate(self, step: int, rank: int) -> tuple[str, list[BufferInfo]]:
        with self.lock:
            segment = self._committed_segment(step, rank)
            return segment.shm.name, list(segment.buffers or [])

    def read(self, step: int, rank: int, offset: int, nbytes: int) -> bytes:
        with self.lock:
            segment = self._committed_segment(step, rank)
            return bytes(segment.view()[offset : offset + nbytes])

    def segment_size(self, step: int, rank: int) -> int:
        with self.lock:
            return self._committed_segment(step, rank).nbytes

    def verify(self, step: int) -> list[str]:
        """Problems found re-checking every buffer of a committed step (empty: all good)."""
        with self.lock:
            entry = self._committed(step)
            problems = []
            for rank, segment in sorted(entry.segments.items()):
                view = segment.view()
                for b in segment.buffers or []:
                    if zlib.crc32(view[b.offset : b.offset + b.nbytes]) != b.crc32:
                        problems.append(f"step {step} rank {rank} buffer {b.name!r}: checksum mismatch")
            return problems

    def listing(self) -> list[tuple[int, int, list[int], bool]]:
        """(step, bytes, delivered ranks, committed) of the committed steps, oldest first."""
        with self.lock:
            return [(s, e.nbytes, e.delivered(), True) for s, e in sorted(self.steps.items()) if e.committed]

    def drop(self, step: int) -> bool:
        with self.lock:
            entry = self.steps.pop(step, None)
            for segment in entry.segments.values() if entry else ():
                _release(segment)
            return entry is not None

    def memory_used(self) -> int:
        return sum(e.nbytes for e in self.steps.values())

    def close(self) -> None:
        with self.lock:
            for entry in self.steps.values():
                for segment in entry.segments.values():
                    _release(segment)
            self.steps.clear()

    # -- helpers -------------------------------------------------------------------------

    def _check_rank(self, rank: int) -> None:
        if rank not in self.expected:
            raise SnapshotError("invalid", f"rank {rank} is not one of this node's ranks {self.expected}")

    def _segment(self, step: int, rank: int) -> Segment:
        entry = self.steps.get(step)
        if entry is None or rank not in entry.segments:
            raise SnapshotError("precondition", f"rank {rank} reserved no segment for step {step}")
        return entry.segments[rank]

    def _committed(self, step: int) -> Step:
        entry = self.steps.get(step)
        if entry is None or not entry.committed:
            raise SnapshotError("not_found", f"no committed snapshot of step {step}")
        return entry

    def _committed_segment(self, step: int, rank: int) -> Segment:
        entry = self._committed(step)
        if rank not in entry.segments:
            raise SnapshotError("not_found", f"step {step} holds no buffers of rank {rank}")
        return entry.segments[rank]

    def _newest_committed(self) -> int | None:
        return max((s for s, e in self.steps.items() if e.committed), default=None)


def _check_layout(buffers: list[BufferInfo], nbytes: int, rank: int) -> None:
    names = set()
    spans = sorted((b.offset, b.offset + b.nbytes, b.name) for b in buffers)
    for b in buffers:
        if not b.name or b.name in names:
            raise SnapshotError("invalid", f"rank {rank}: buffer names must be unique and non-empty ({b.name!r})")
        names.add(b.name)
        if b.offset + b.nbytes > nbytes:
            raise SnapshotError("invalid", f"buffer {b.name!r} of rank {rank} ends past its {nbytes}-byte segment")
    for (_, end, name), (start, _, other) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise SnapshotError("invalid", f"buffers {name!r} and {other!r} of rank {rank} overlap")


def _release(segment: Segment) -> None:
    segment.shm.close()
    try:
        segment.shm.unlink()
    except FileNotFoundError:
        pass


def attach(name: str) -> shared_memory.SharedMemory:
    """Map a daemon's segment without adopting it: this process's exit must not unlink it
    (Python 3.11 registers even attached segments for removal)."""
    shm = shared_memory.SharedMemory(name=name)
    resource_tracker.unregister(shm._name, "shared_memory")
    return shm

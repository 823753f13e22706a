"""What one snapshot daemon holds: per step, each local rank's buffers in a shared-memory
segment the daemon owns, so that a rank's crash loses nothing it delivered.

A step is invisible until committed, and committing it needs every expected rank's
delivery; the previous committed step is dropped only after that, so there is never a
moment without a valid snapshot. Memory is bounded: a reservation that would pass the
limit is refused, never an OOM kill. Thread-safe: the gRPC server calls it from a pool.

Segments are recycled: a dropped step's segments wait (one per local rank at most) for the
next reservation of their size, so that a rank copies into memory that is already mapped
rather than into fresh pages the kernel must fault in and zero (ten times a copy's cost).
Checksums are CRC-32C, computed by the daemon once a rank has delivered (`receive`, then
`settle`), off the rank's path, and checked where the bytes are used (a restore, a fetch, a
rebuild, `verify`). A rank counts as delivered once its checksums are in: until then the step
can be neither committed nor restored, and the calls that ask wait for them.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import threading
from dataclasses import dataclass, field, replace
from multiprocessing import shared_memory
from pathlib import Path

import crc32c
import numpy as np

from checkpoint.snapshot_group import Encoding, GroupPlan, ParityBlock, share_meta

SETTLE_TIMEOUT_S = 60.0
"""How long a call that needs every delivery checksummed waits for them (they take
milliseconds; a daemon starved of CPU for a minute has bigger problems)."""


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
    crc32c: int


@dataclass
class Segment:
    shm: shared_memory.SharedMemory
    nbytes: int
    buffers: list[BufferInfo] | None = None
    """None until the rank has delivered and the daemon has checksummed its buffers."""
    received: list[BufferInfo] | None = None
    """The buffers a rank delivered, while the daemon computes their checksums."""

    def view(self) -> memoryview:
        return self.shm.buf[: self.nbytes]


@dataclass
class Step:
    segments: dict[int, Segment] = field(default_factory=dict)
    committed: bool = False
    encoding: Encoding | None = None
    """In a group: this node's blocks streaming to the parity holders, once all delivered."""

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments.values())

    def delivered(self) -> list[int]:
        return sorted(r for r, s in self.segments.items() if s.buffers is not None)


@dataclass(frozen=True)
class Received:
    """A delivery whose checksums the daemon has yet to compute (`SnapshotStore.settle`)."""

    step: int
    rank: int
    segment: Segment


@dataclass(frozen=True)
class StepState:
    """Where one step stands on this daemon (Status reports it)."""

    step: int
    phase: str  # delivering | encoding | awaiting_parity | ready | committed
    reserved: list[int]
    delivered: list[int]
    blocks_sent: int
    blocks_to_send: int
    missing_stripes: list[int]
    encode_error: str
    segments: list[str]
    """The shared-memory segment of each reserved rank (recycled segments serve many steps)."""


class SnapshotStore:
    def __init__(
        self,
        job: str,
        node: int,
        expected_ranks: list[int],
        memory_limit: int,
        keep: int = 1,
        group: GroupPlan | None = None,
    ):
        self.job, self.node = job, node
        self.expected = sorted(expected_ranks)
        self.memory_limit, self.keep = memory_limit, keep
        self.group = group
        self.steps: dict[int, Step] = {}
        self.parity: dict[int, dict[int, ParityBlock]] = {}
        """Step -> stripe -> the parity block this daemon holds for the group."""
        self.pins: dict[int, int] = {}
        """Step -> readers (checkpoint writes) that need its segments: kept until unpinned."""
        self.spares: list[Segment] = []
        """Segments of dropped steps, mapped and faulted in, for the next reservations."""
        self.lock = threading.Lock()
        self.settled = threading.Condition(self.lock)
        """Notified whenever a received delivery is settled (`unsettled` falls)."""
        self.unsettled = 0
        """Deliveries received whose checksums are not computed yet."""

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
                self._retire(old)
            self._make_room(nbytes)
            if self.memory_used() + nbytes > self.memory_limit:
                raise SnapshotError(
                    "exhausted",
                    f"{nbytes} bytes for rank {rank} of step {step} would pass this daemon's memory limit: "
                    f"{self.memory_used()} of {self.memory_limit} bytes in use",
                )
            segment = self._new_segment(rank, nbytes)
            self.steps.setdefault(step, Step()).segments[rank] = segment
            return segment.shm.name

    def _new_segment(self, rank: int, nbytes: int, zeroed: bool = False) -> Segment:
        """A spare segment of this size if there is one, else a fresh one (zeros, as
        `zeroed` asks of a spare too)."""
        spare = next((s for s in self.spares if s.nbytes == nbytes), None)
        if spare is not None:
            self.spares.remove(spare)
            if zeroed:
                np.frombuffer(spare.view(), np.uint8)[:] = 0
            return Segment(spare.shm, nbytes)
        # Named by rank, not step: a recycled segment serves later steps.
        name = f"{segment_prefix(self.job, self.node)}r{rank}-{secrets.token_hex(4)}"
        # Mode 0600: only the job's user can map it. The daemon owns it; nothing else unlinks it.
        return Segment(shared_memory.SharedMemory(name=name, create=True, size=max(1, nbytes)), nbytes)

    def _retire(self, segment: Segment) -> None:
        """Keep a dropped segment for reuse (up to one per local rank), else free it."""
        if len(self.spares) < len(self.expected):
            self.spares.append(Segment(segment.shm, segment.nbytes))
        else:
            _release(segment)

    def _make_room(self, nbytes: int) -> None:
        """Free spares until `nbytes` more fit under the limit (or none is left)."""
        while self.spares and self.memory_used() + self.spare_bytes() + nbytes > self.memory_limit:
            _release(self.spares.pop(0))

    def spare_bytes(self) -> int:
        return sum(s.nbytes for s in self.spares)

    def receive(self, step: int, rank: int, layout: list[BufferInfo]) -> Received:
        """Take `rank`'s word that its buffers of `step` (their checksums not set) are in its
        segment: the rank goes back to training, and `settle` checksums them."""
        self._check_rank(rank)
        with self.lock:
            segment = self._undelivered(step, rank, layout)
            segment.received = list(layout)
            self.unsettled += 1
            return Received(step, rank, segment)

    def settle(self, received: Received) -> bool:
        """Checksum a received delivery's buffers and deliver them; whether that made this
        node's share of the step whole (its blocks are then due to the parity holders). A
        delivery superseded meanwhile (the rank restarted, the step was dropped) is let go."""
        segment, buffers, whole = received.segment, None, False
        try:
            buffers = [
                replace(b, crc32c=checksum(segment.shm.buf[b.offset : b.offset + b.nbytes])) for b in segment.received
            ]
        finally:
            # One turn of the lock: a call woken by the notification sees the delivery.
            with self.lock:
                self.unsettled -= 1
                self.settled.notify_all()
                entry = self.steps.get(received.step)
                if buffers is not None and entry is not None and entry.segments.get(received.rank) is segment:
                    segment.received = None
                    whole = self._delivered(entry, segment, buffers)
        return whole

    def _undelivered(self, step: int, rank: int, buffers: list[BufferInfo]) -> Segment:
        segment = self._segment(step, rank)
        if segment.buffers is not None or segment.received is not None:
            raise SnapshotError("precondition", f"rank {rank} already delivered step {step}")
        _check_layout(buffers, segment.nbytes, rank)
        return segment

    def _delivered(self, entry: Step, segment: Segment, buffers: list[BufferInfo]) -> bool:
        segment.buffers = list(buffers)
        whole = entry.delivered() == self.expected
        if self.group is not None and whole:
            # Set here, under the lock, so that Status never shows the step past encoding
            # before its blocks have been streamed.
            entry.encoding = Encoding(self.group.blocks_to_send)
        return whole

    def received_ranks(self, step: int) -> list[int]:
        """The ranks that delivered `step`, settled or not."""
        with self.lock:
            entry = self.steps.get(step, Step())
            return sorted(r for r, s in entry.segments.items() if s.buffers is not None or s.received is not None)

    def _await_settled(self) -> None:
        """Under the lock: until every received delivery is checksummed (milliseconds), so
        that a rank's delivery counts from the moment its Deliver call returned."""
        if not self.settled.wait_for(lambda: self.unsettled == 0, timeout=SETTLE_TIMEOUT_S):
            raise SnapshotError("exhausted", f"deliveries still being checksummed after {SETTLE_TIMEOUT_S} s")

    def encoding(self, step: int) -> Encoding | None:
        with self.lock:
            entry = self.steps.get(step)
            return entry.encoding if entry else None

    def commit(self, step: int, prepare: bool = False) -> tuple[list[int], list[int]]:
        """Commit `step` (with `prepare`, only check) once every expected rank delivered and
        every parity block held for it is complete; (missing ranks, incomplete stripes)."""
        with self.lock:
            self._await_settled()
            entry = self.steps.get(step, Step())  # ranks may not have started delivering yet
            missing = [r for r in self.expected if r not in entry.delivered()]
            stripes = self._incomplete_parity(step)
            if missing or stripes or entry.committed or prepare:
                return missing, stripes
            entry.committed = True
            self._drop_superseded(step)
            return [], []

    def local_complete(self, step: int) -> bool:
        with self.lock:
            self._await_settled()
            entry = self.steps.get(step)
            return entry is not None and entry.delivered() == self.expected

    def _incomplete_parity(self, step: int) -> list[int]:
        if self.group is None:
            return []
        held = self.parity.get(step, {})
        return [
            s.index
            for s in self.group.parity_stripes(self.node)
            if s.index not in held or not held[s.index].complete(self.group.k)
        ]

    def _drop_superseded(self, step: int) -> None:
        committed = sorted(s for s, e in self.steps.items() if e.committed)
        doomed = committed[: -self.keep]
        doomed += [s for s, e in self.steps.items() if not e.committed and s < step]  # never to commit
        doomed = [s for s in doomed if s not in self.pins]  # dropped once unpinned
        for s in doomed:
            for segment in self.steps.pop(s).segments.values():
                self._retire(segment)
        for s in [s for s in self.parity if s in doomed or (s < step and s not in self.steps)]:
            del self.parity[s]

    # -- the group: shares as blocks, parity held for others -------------------------------

    def share(self, step: int) -> dict:
        """The description of this node's share of `step` (its ranks' segments in order)."""
        with self.lock:
            entry = self.steps[step]
            return share_meta([(r, entry.segments[r].nbytes, entry.segments[r].buffers or []) for r in self.expected])

    def hold_share(self, step: int) -> list[memoryview]:
        """Views of this node's share of `step` (its ranks' segments in order), pinned until
        unpin(step): its blocks are sent straight from the segments."""
        with self.lock:
            entry = self.steps.get(step)
            if entry is None or entry.delivered() != self.expected:
                raise SnapshotError("not_found", f"step {step} is not held whole here")
            self.pins[step] = self.pins.get(step, 0) + 1
            return [entry.segments[r].view() for r in self.expected]

    def add_parity(self, chunk) -> None:
        """Fold one chunk of another node's data block into the parity block held for it."""
        group = self.group
        if group is None:
            raise SnapshotError("precondition", "this daemon is not part of an erasure-coding group")
        stripe = next((s for s in group.stripes if s.index == chunk.stripe), None)
        if stripe is None or self.node not in stripe.parity_nodes or chunk.source not in stripe.data_nodes:
            raise SnapshotError(
                "invalid", f"node {self.node} holds no parity of stripe {chunk.stripe} for node {chunk.source}"
            )
        if chunk.offset + len(chunk.data) > chunk.block_bytes:
            raise SnapshotError("invalid", f"chunk at {chunk.offset} runs past its {chunk.block_bytes}-byte block")
        with self.lock:
            newest = self._newest_committed()
            if newest is not None and chunk.step < newest:
                raise SnapshotError("precondition", f"step {chunk.step} is older than the committed step {newest}")
            block = self.parity.setdefault(chunk.step, {}).setdefault(
                stripe.index, ParityBlock(position=stripe.parity_nodes.index(self.node))
            )
            source = block.sources.setdefault(chunk.source, {"block_bytes": chunk.block_bytes, "received": 0})
            if chunk.offset != source["received"]:
                raise SnapshotError(
                    "precondition", f"node {chunk.source}'s block of stripe {stripe.index} arrived out of order"
                )
            if chunk.meta:
                source["meta"] = json.loads(chunk.meta)
            growth = max(0, chunk.block_bytes - block.data.size)
            if growth and self.memory_used() + growth > self.memory_limit:
                raise SnapshotError("exhausted", f"parity of step {chunk.step} would pass this daemon's memory limit")
            block.grow(chunk.block_bytes)
            if chunk.data:
                data = np.frombuffer(chunk.data, np.uint8)
                position = stripe.data_nodes.index(chunk.source)
                out = block.data[chunk.offset : chunk.offset + data.size]
                group.code.accumulate(block.position, position, data, out)
            source["received"] += len(chunk.data)

    def parity_block(self, step: int, stripe: int) -> tuple[memoryview, dict]:
        with self.lock:
            block = self.parity.get(step, {}).get(stripe)
            entry = self.steps.get(step)
            if block is None or entry is None or not (entry.committed or self._ready(step)):
                raise SnapshotError("not_found", f"no whole parity of stripe {stripe}, step {step}")
            # Complete, so no longer written to: sent as it is (the array lives as long as the view).
            return memoryview(block.data), {"sources": block.sources}

    def new_share(self, meta: dict) -> list[Segment]:
        """Zeroed segments for the ranks of a share being rebuilt (in `meta`'s order), part of
        no step yet: `install` or `adopt` takes them once filled, `discard` frees them."""
        with self.lock:
            total = meta["nbytes"]
            self._make_room(total)
            if self.memory_used() + total > self.memory_limit:
                raise SnapshotError("exhausted", f"a rebuilt share of {total} bytes would pass the memory limit")
            return [self._new_segment(item["rank"], item["nbytes"], zeroed=True) for item in meta["segments"]]

    def discard(self, segments: list[Segment]) -> None:
        with self.lock:
            for segment in segments:
                self._retire(segment)

    def install(self, step: int, meta: dict, segments: list[Segment]) -> None:
        """Take this node's rebuilt share (filled `new_share` segments) as committed `step`,
        once every buffer passed its checksum. The parity it holds comes later (`restore_parity`)."""
        for item in meta["segments"]:
            self._check_rank(item["rank"])
        with self.lock:
            self._take_checked(meta, segments)
            entry = self.steps.setdefault(step, Step())
            for item, segment in zip(meta["segments"], segments, strict=True):
                old = entry.segments.pop(item["rank"], None)
                if old is not None:
                    self._retire(old)
                entry.segments[item["rank"]] = segment
            entry.committed = True
            entry.encoding = None  # rebuilt: its blocks are already where they belong
            self._drop_superseded(step)

    def restore_parity(self, step: int, parity: dict[int, ParityBlock]) -> bool:
        """Hold the recomputed parity blocks of `step` (a replacement's), unless the step is gone."""
        with self.lock:
            if step not in self.steps:
                return False
            self.parity.setdefault(step, {}).update(parity)
            return True

    def adopt(self, step: int, meta: dict, segments: list[Segment]) -> None:
        """Hold a lost node's rebuilt segments of committed `step` (filled `new_share` ones),
        so that its ranks can restart elsewhere and fetch them here (a stand-in; parity stays
        with a replacement)."""
        with self.lock:
            entry = self._committed(step)
            for item in meta["segments"]:
                if item["rank"] in entry.segments:
                    raise SnapshotError("precondition", f"step {step} already holds rank {item['rank']}")
            self._take_checked(meta, segments)
            for item, segment in zip(meta["segments"], segments, strict=True):
                entry.segments[item["rank"]] = segment

    def _take_checked(self, meta: dict, segments: list[Segment]) -> None:
        """Give each rebuilt segment its buffers once all of them passed their checksums."""
        buffers = [[BufferInfo(*b) for b in item["buffers"]] for item in meta["segments"]]
        for item, segment, held in zip(meta["segments"], segments, buffers, strict=True):
            _check_layout(held, segment.nbytes, item["rank"])
            _check_checksums(segment, held, item["rank"])
        for segment, held in zip(segments, buffers, strict=True):
            segment.buffers = held

    # -- reading -------------------------------------------------------------------------

    def locate(self, step: int, rank: int) -> tuple[str, list[BufferInfo]]:
        with self.lock:
            segment = self._committed_segment(step, rank)
            return segment.shm.name, list(segment.buffers or [])

    def hold_segment(self, step: int, rank: int) -> memoryview:
        """`rank`'s segment of committed `step`, pinned until unpin(step): a restore on
        another node reads its bytes from it."""
        with self.lock:
            segment = self._committed_segment(step, rank)
            self.pins[step] = self.pins.get(step, 0) + 1
            return segment.view()

    def verify(self, step: int) -> list[str]:
        """Problems found re-checking every buffer of a committed step (empty: all good)."""
        with self.lock:
            self._await_settled()
            entry = self._committed(step)
            problems = []
            for rank, segment in sorted(entry.segments.items()):
                for b in segment.buffers or []:
                    if checksum(segment.shm.buf[b.offset : b.offset + b.nbytes]) != b.crc32c:
                        problems.append(f"step {step} rank {rank} buffer {b.name!r}: checksum mismatch")
            return problems

    def listing(self, include_ready: bool = False) -> list[tuple[int, int, list[int], bool]]:
        """(step, bytes, delivered ranks, committed) of the committed steps (and, with
        `include_ready`, of those that could commit here), oldest first."""
        with self.lock:
            self._await_settled()
            return [
                (s, e.nbytes, e.delivered(), e.committed)
                for s, e in sorted(self.steps.items())
                if e.committed or (include_ready and self._ready(s))
            ]

    def states(self) -> list[StepState]:
        """Every step held (segments or parity), oldest first."""
        with self.lock:
            return [self._state(s) for s in sorted(set(self.steps) | set(self.parity))]

    def _state(self, step: int) -> StepState:
        entry = self.steps.get(step, Step())
        delivered, missing = entry.delivered(), self._incomplete_parity(step)
        encoding = entry.encoding or Encoding(0, done=True)
        if entry.committed:
            phase = "committed"
        elif delivered != self.expected:
            phase = "delivering"
        elif not encoding.done:
            phase = "encoding"
        else:
            phase = "awaiting_parity" if missing else "ready"
        reserved = sorted(entry.segments)
        segments = [entry.segments[r].shm.name for r in reserved]
        return StepState(
            step, phase, reserved, delivered, encoding.sent, encoding.blocks, missing, encoding.error, segments
        )

    def _ready(self, step: int) -> bool:
        entry = self.steps.get(step)
        return entry is not None and entry.delivered() == self.expected and not self._incomplete_parity(step)

    def require_whole(self, step: int) -> None:
        """Raise NOT_FOUND unless `step` is committed here or could be (served for rebuilds)."""
        with self.lock:
            self._await_settled()
            entry = self.steps.get(step)
            if entry is None or not (entry.committed or self._ready(step)):
                raise SnapshotError("not_found", f"no whole snapshot of step {step}")

    def pin(self, step: int) -> list[tuple[int, str, list[BufferInfo]]]:
        """Keep committed `step` until unpin(); (rank, segment name, buffers) of every rank held."""
        with self.lock:
            entry = self._committed(step)
            self.pins[step] = self.pins.get(step, 0) + 1
            return [(r, seg.shm.name, list(seg.buffers or [])) for r, seg in sorted(entry.segments.items())]

    def unpin(self, step: int) -> None:
        with self.lock:
            self.pins[step] -= 1
            if not self.pins[step]:
                del self.pins[step]
                newest = self._newest_committed()
                if newest is not None:
                    self._drop_superseded(newest)

    def drop(self, step: int) -> bool:
        with self.lock:
            entry = self.steps.pop(step, None)
            for segment in entry.segments.values() if entry else ():
                self._retire(segment)
            return entry is not None

    def memory_used(self) -> int:
        parity = sum(b.data.size for blocks in self.parity.values() for b in blocks.values())
        return sum(e.nbytes for e in self.steps.values()) + parity

    def close(self) -> None:
        with self.lock:
            for entry in self.steps.values():
                for segment in entry.segments.values():
                    _release(segment)
            self.steps.clear()
            for segment in self.spares:
                _release(segment)
            self.spares.clear()

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


def _check_checksums(segment: Segment, buffers: list[BufferInfo], rank: int) -> None:
    if problem := checksum_problem(segment.shm.buf, buffers):
        raise SnapshotError("invalid", f"rank {rank}: {problem}")


CHECKSUM_CHUNK = 256 << 10
"""Copy and checksum this much at a time: the checksum then reads the bytes from cache."""


def checksum(data) -> int:
    """CRC-32C (hardware instructions where the CPU has them) of a bytes-like object. The
    library lets go of the GIL while it runs: a restore checks buffers on several threads,
    and a daemon's other threads serve calls while it checksums a delivery."""
    return crc32c.crc32c(np.frombuffer(data, np.uint8))


def copy_bytes(target, source) -> None:
    """Copy bytes-like `source` into writable bytes-like `target` of the same length (one
    memcpy: a big one streams past the cache)."""
    dst, src = np.frombuffer(target, np.uint8), np.frombuffer(source, np.uint8)
    if dst.size != src.size:
        raise ValueError(f"copying {src.size} bytes into {dst.size}")
    np.copyto(dst, src)


def copy_checksummed(target, source) -> int:
    """Copy bytes-like `source` into writable bytes-like `target` (same length) and return
    the CRC-32C of the copy, in one pass over memory: each piece is checksummed while it is
    still in cache."""
    dst, src = np.frombuffer(target, np.uint8), np.frombuffer(source, np.uint8)
    if dst.size != src.size:
        raise ValueError(f"copying {src.size} bytes into {dst.size}")
    crc = 0
    for start in range(0, src.size, CHECKSUM_CHUNK):
        piece = dst[start : start + CHECKSUM_CHUNK]
        piece[:] = src[start : start + CHECKSUM_CHUNK]
        crc = crc32c.crc32c(piece, crc)
    return crc


def checksum_problem(buf, buffers) -> str | None:
    """The first buffer (of `buffers`, laid out in `buf`) whose bytes fail their checksum."""
    for b in buffers:
        if checksum(buf[b.offset : b.offset + b.nbytes]) != b.crc32c:
            return f"buffer {b.name!r}: checksum mismatch"
    return None


SHM_DIR = Path("/dev/shm")
"""Where POSIX shared memory lives on Linux (shm_open's names)."""


def segment_prefix(job: str, node: int) -> str:
    """How the names of a daemon's segments begin (in /dev/shm)."""
    return f"stalwart-{job}-n{node}-"


def unlink_segments(job: str, node: int) -> int:
    """Free the segments a daemon of `job` left when it was killed (SIGKILL runs no cleanup,
    and shared memory outlives its processes); how many there were."""
    doomed = list(SHM_DIR.glob(segment_prefix(job, node) + "*"))
    for path in doomed:
        path.unlink(missing_ok=True)
    return len(doomed)


def _release(segment: Segment) -> None:
    """Free a segment's name, then unmap it. The name first: a view still exported (a reply
    gRPC has not let go of yet, as a daemon stops) keeps the mapping alive until it is dropped
    or the process exits, but never keeps the memory past that."""
    try:
        segment.shm.unlink()
    except FileNotFoundError:
        pass
    try:
        segment.shm.close()
    except BufferError:
        _STILL_VIEWED.append(segment.shm)  # unmapped at exit; collected now, it would retry and complain


_STILL_VIEWED: list[shared_memory.SharedMemory] = []


class MappedSegment:
    """A daemon's segment as another process maps it: `buf` as with SharedMemory, but no
    resource tracker is told of it. Python 3.11's SharedMemory registers even a segment it
    only attaches, for removal at exit; undoing that at once, as this once did, removed the
    daemon's own registration from the tracker a writer forked from the daemon's fork server
    shares with it."""

    def __init__(self, name: str):
        fd = os.open(SHM_DIR / name.lstrip("/"), os.O_RDWR)
        try:
            self._mmap = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self.name, self.size = name, len(self._mmap)
        self.buf: memoryview | None = memoryview(self._mmap)

    def close(self) -> None:
        """Unmap; BufferError (and still mapped) while an array viewing it is alive."""
        if self.buf is not None:
            self.buf.release()
            self.buf = None
        self._mmap.close()


def attach(name: str) -> MappedSegment:
    """Map a daemon's segment without adopting it: this process's exit leaves it be."""
    return MappedSegment(name)

"""Lazy asynchronous checkpointing: stage in the background, write in another process.

Parameters and optimizer state do not change between one optimizer step and the next, so
at a checkpoint step the loop only hands over; a thread copies the state chunk by chunk
into a fixed shared-memory ring while the next forward/backward runs, and the loop waits
only if that copy is unfinished when the next optimizer step starts. The rank's writer
process (checkpoint/writer.py) writes the chunks from the ring. A full ring makes the
copy wait for the writer (back-pressure); staging memory never grows past the ring.
"""

from __future__ import annotations

import mmap
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from checkpoint.layout import chunks_of
from checkpoint.state import Piece
from checkpoint.universal import CheckpointError
from checkpoint.writer import FREED, HEADER_BYTES, STAGING, ChunkWrite, CreateArrays, FinishStep, Flush, ring_views


class WriterDied(CheckpointError):
    """The rank's writer process is gone; the same words whether staging, checking or flushing noticed."""

    def __init__(self):
        super().__init__("the checkpoint writer process died")


class StagingRing:
    """A fixed shared-memory byte ring; its header's freed counter is advanced by the writer.

    Anonymous memory (memfd) handed to the writer by descriptor: it has no name in /dev/shm,
    so nothing can be left behind there, whichever process dies, and no other user can map it.
    """

    def __init__(self, size: int):
        self.size = size
        self.fd = os.memfd_create("stalwart-staging-ring", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size + HEADER_BYTES)
        self.map = mmap.mmap(self.fd, size + HEADER_BYTES)
        self.header, self.buffer = ring_views(self.map, size)
        self.header[:] = 0
        self.head = 0
        self.peak_bytes = 0

    def reserve(self, nbytes: int, writer_alive: Callable[[], bool]) -> int:
        """Ring position for `nbytes`, waiting (never growing) while the writer frees space."""
        if nbytes > self.size:
            raise CheckpointError(f"a {nbytes}-byte chunk does not fit the {self.size}-byte staging ring")
        start = self.head
        if start % self.size + nbytes > self.size:
            start += self.size - start % self.size  # no chunk wraps around the end
        while start + nbytes - int(self.header[FREED]) > self.size:
            if not writer_alive():
                raise WriterDied()
            time.sleep(0.0005)
        self.head = start + nbytes
        self.peak_bytes = max(self.peak_bytes, self.head - int(self.header[FREED]))
        return start

    def view(self, start: int, shape: tuple[int, ...]) -> np.ndarray:
        offset = start % self.size
        return self.buffer[offset : offset + 4 * int(np.prod(shape))].view(np.float32).reshape(shape)

    def close(self) -> None:
        del self.header, self.buffer
        self.map.close()
        os.close(self.fd)


class Sink(Protocol):
    """Where a save's pieces go while training goes on: the checkpoint writer's staging ring
    (RingSink, below) or a snapshot daemon's segment (checkpoint/snapshot_sink.py)."""

    def begin(self) -> None:
        """Before the first piece."""

    def put(self, piece: Piece) -> None:
        """Copy one piece out of the training state (the state must not change meanwhile)."""

    def end(self) -> None:
        """After the last piece: the save is handed over."""


class BlockedTime:
    """Seconds the training loop spent in a saver's calls (handing over, waiting for a copy)
    since it last asked: `with blocked: ...`, then `blocked.take()` once a step."""

    def __init__(self):
        self.seconds, self._start = 0.0, 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._start

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class StagingThread:
    """Copies a save's pieces into a sink in the background, one save at a time.

    The state does not change between one optimizer step and the next, so a save only hands
    its pieces over, and the loop waits (wait_staged) before the next optimizer step.
    A failure is kept for take_error(), which every rank calls at the same step, so that it
    stops all ranks with one message rather than this rank alone in mid-step.
    """

    def __init__(self, name: str, niceness: int):
        self.name, self.niceness = name, niceness
        # One thread for the whole run, fed a save at a time: starting a thread per save took
        # half a millisecond of the training thread's time at every snapshot step.
        self._thread: threading.Thread | None = None
        self._saves: queue.SimpleQueue = queue.SimpleQueue()
        self._staged = threading.Event()
        self._staged.set()
        self._error: BaseException | None = None

    def start(self, sink: Sink, pieces: Callable[[], Iterable[Piece]]) -> None:
        self.wait_staged()
        self._staged.clear()
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        self._saves.put((sink, pieces))

    def _serve(self) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.niceness)
        while True:
            sink, pieces = self._saves.get()
            self._error = _stage(sink, pieces)
            self._staged.set()

    def wait_staged(self) -> None:
        """Block until the last save has copied everything (called before an optimizer step)."""
        self._staged.wait()

    def take_error(self) -> BaseException | None:
        self.wait_staged()
        error, self._error = self._error, None
        return error


def _stage(sink: Sink, pieces: Callable[[], Iterable[Piece]]) -> BaseException | None:
    """Copy one save's pieces into `sink`; the first failure, if any.

    Collecting the pieces may run collectives (the distributed optimizer's state is gathered
    over DP): once the sink fails, the pieces are still drained, so that this rank's peers,
    whose sinks may be fine, are not left waiting in a gather forever.
    """
    failed = None
    try:
        with torch.no_grad():
            failed = _attempt(sink.begin)
            for piece in pieces():
                failed = failed or _attempt(lambda piece=piece: sink.put(piece))
            failed = failed or _attempt(sink.end)
    except BaseException as e:  # collecting the state itself failed
        failed = failed or e
    return failed


def _attempt(call) -> BaseException | None:
    """The exception `call` raised, if any (kept for take_error)."""
    try:
        call()
    except BaseException as e:
        return e
    return None


class RingSink:
    """A checkpoint's share of this rank, cut into chunks, staged in the ring for the writer."""

    def __init__(self, engine: CheckpointEngine, create: CreateArrays, tp_rank: int, tp: int, finish: FinishStep):
        self.engine, self.create, self.finish = engine, create, finish
        self.tp_rank, self.tp = tp_rank, tp

    def begin(self) -> None:
        self.engine.ring.header[STAGING] = 1
        self.engine.send(self.create)

    def put(self, piece: Piece) -> None:
        if not piece.writes:
            return
        ring = self.engine.ring
        cut = chunks_of(piece.name, piece.layout, piece.local, self.tp_rank, self.tp)
        for array, chunks, global_region, source in cut:
            start = ring.reserve(4 * source.numel(), self.engine.writer_alive)
            ring.view(start, tuple(source.shape))[...] = source.detach().to("cpu", torch.float32).numpy()
            region = tuple((s.start, s.stop) for s in global_region)
            self.engine.send(ChunkWrite(self.create.root, array, region, start, tuple(source.shape), chunks))

    def end(self) -> None:
        self.engine.send(self.finish)
        self.engine.ring.header[STAGING] = 0


class CheckpointEngine:
    """One per rank: a staging ring, a staging thread, and a writer process."""

    def __init__(self, staging_bytes: int):
        self.ring = StagingRing(staging_bytes)
        self.writer, self.requests, self.replies = _start_writer(self.ring)
        # Lowest priority: where every core trains, a checkpoint's copy takes idle time rather
        # than the training thread's (the copies release the GIL).
        self.staging = StagingThread("stalwart-ckpt-stage", niceness=19)
        self._flushes = 0

    def send(self, request) -> None:
        try:
            self.requests.send(request)
        except OSError as e:  # the pipe broke: the writer is gone
            raise WriterDied() from e

    def writer_alive(self) -> bool:
        return self.writer.poll() is None

    def stage(
        self,
        create: CreateArrays,
        pieces: Callable[[], Iterable[Piece]],
        tp_rank: int,
        tp: int,
        finish: FinishStep,
    ) -> None:
        """Start handing a save to the writer in the background; returns at once.

        The writer gets `create`, then every chunk of `pieces()` as it is copied to the ring,
        then `finish`. A failure is kept for check().
        """
        self.staging.start(RingSink(self, create, tp_rank, tp, finish), pieces)

    def wait_staged(self) -> None:
        """Block until the last stage() has copied everything (called before an optimizer step)."""
        self.staging.wait_staged()

    def check(self) -> None:
        """Raise the failure of an earlier hand-over, in staging or in the writer, if any."""
        error = self.staging.take_error()
        if error is not None:
            self.ring.header[STAGING] = 0
            if isinstance(error, WriterDied):  # one failure, one message, wherever it is noticed
                raise error
            raise CheckpointError(f"staging the checkpoint failed: {error}") from error
        if self.replies.poll(0):  # outside wait_written() the writer only ever reports errors
            self._reply()
        if not self.writer_alive():
            raise WriterDied()

    def _reply(self):
        """The writer's next reply: raises its error, or that it is gone."""
        try:
            kind, value = self.replies.recv()
        except EOFError:
            raise WriterDied() from None
        if kind == "error":
            raise CheckpointError(f"the checkpoint writer failed:\n{value}")
        return value

    def wait_written(self, timeout_s: float, commits: bool = False) -> None:
        """Block until the writer has written everything handed over; with `commits`, until
        rank 0's writer has also committed (or given up on) every save it waits for."""
        self.check()
        self._flushes += 1
        self.send(Flush(self._flushes, commits))
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.replies.poll(0.5):
                if not self.writer_alive():
                    raise WriterDied()
                if time.monotonic() > deadline:
                    raise CheckpointError(f"the checkpoint writer did not finish in {timeout_s:.0f} s")
                continue
            if self._reply() == self._flushes:
                return

    def close(self) -> None:
        self.requests.close()  # the writer sees end-of-file and stops after its last request
        if self.writer_alive():
            try:
                self.writer.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.writer.kill()
        self.replies.close()
        self.ring.close()


def _start_writer(ring: StagingRing) -> tuple[subprocess.Popen, Connection, Connection]:
    """A fresh interpreter running checkpoint.writer, talking over two inherited pipes.

    Not a multiprocessing child: those re-import the trainer's main module (megatron, torch)
    before they start, which costs seconds per rank.
    """
    requests_read, requests_write = os.pipe()
    replies_read, replies_write = os.pipe()
    command = [sys.executable, "-m", "checkpoint.writer", "--ring-fd", str(ring.fd), "--ring-size", str(ring.size)]
    command += ["--requests-fd", str(requests_read), "--replies-fd", str(replies_write)]
    writer = subprocess.Popen(command, pass_fds=(ring.fd, requests_read, replies_write), env=_writer_env())
    os.close(requests_read)
    os.close(replies_write)
    return writer, Connection(requests_write, readable=False), Connection(replies_read, writable=False)


def _writer_env() -> dict:
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env

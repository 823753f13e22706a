"""A rank's (and the operator CLI's) handle on a snapshot daemon.

client = SnapshotClient("127.0.0.1:50151", job="j42", token=read_token(path))
client.deliver(step, rank, {"model/w": tensor_bytes, ...})   # into the daemon's memory
client.commit(step)                                          # once every rank delivered
buffers = client.fetch(step, rank)                           # after a restart
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

import grpc
import numpy as np

from checkpoint.block_transport import get_block, read_range
from checkpoint.proto import snapshot_pb2 as pb
from checkpoint.proto import snapshot_pb2_grpc as pb_grpc
from checkpoint.snapshot_group import call_metadata
from checkpoint.snapshot_store import MappedSegment, attach, checksum, copy_bytes

ALIGN = 64
"""Buffers start at multiples of this in a segment (cache lines; SIMD-friendly reads)."""

MAPPED_SEGMENTS = 4
"""Segments a client keeps mapped. A daemon recycles a few segments per rank step after step;
a kept mapping spares faulting their pages in again at every step."""


class SnapshotClient:
    def __init__(self, address: str, job: str, token: str, deadline_s: float = 30.0, max_message_mb: int = 4):
        limit = max_message_mb << 20
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.SnapshotDaemonStub(self.channel)
        self.metadata = call_metadata(job, token)
        self.address, self.job, self.token = address, job, token
        self.deadline_s = deadline_s
        self._mapped: dict[str, MappedSegment] = {}  # the most recently used last
        self._block_address: str | None = None
        self._report = None  # the last progress report in flight

    def mapped(self, segment: str) -> MappedSegment:
        """The daemon's segment `segment`, mapped into this process (kept for the next use)."""
        shm = self._mapped.pop(segment, None) or attach(segment)
        self._mapped[segment] = shm
        while len(self._mapped) > MAPPED_SEGMENTS:
            _unmap(self._mapped.pop(next(iter(self._mapped))))
        return shm

    def _call(self, method: str, request):
        return getattr(self.stub, method)(request, timeout=self.deadline_s, metadata=self.metadata)

    def deliver(self, step: int, rank: int, buffers: Mapping[str, object]) -> pb.DeliverReply:
        """Copy `buffers` (name -> bytes-like or contiguous array) into a daemon-owned segment."""
        views = {name: _bytes_view(value) for name, value in buffers.items()}
        offsets, size = {}, 0
        for name, view in views.items():
            offsets[name] = size
            size += -(-view.nbytes // ALIGN) * ALIGN
        reply = self._call("Reserve", pb.ReserveRequest(step=step, rank=rank, nbytes=size))
        shm = self.mapped(reply.segment)
        table = []
        for name, view in views.items():
            start = offsets[name]
            copy_bytes(shm.buf[start : start + view.nbytes], view)  # the daemon checksums it
            table.append(pb.Buffer(name=name, offset=start, nbytes=view.nbytes))
        return self._call("Deliver", pb.DeliverRequest(step=step, rank=rank, buffers=table))

    def reserve(self, step: int, rank: int, nbytes: int) -> pb.ReserveReply:
        return self._call("Reserve", pb.ReserveRequest(step=step, rank=rank, nbytes=nbytes))

    def deliver_table(self, step: int, rank: int, table: list[pb.Buffer]) -> pb.DeliverReply:
        """Report the buffers a rank wrote into the segment reserve() gave it."""
        return self._call("Deliver", pb.DeliverRequest(step=step, rank=rank, buffers=table))

    def materialize(self, request: pb.MaterializeRequest) -> pb.MaterializeReply:
        return self._call("Materialize", request)

    def locate(self, step: int, rank: int) -> pb.LocateReply:
        return self._call("Locate", pb.FetchRequest(step=step, rank=rank))

    def commit(self, step: int, prepare: bool = False) -> pb.CommitReply:
        return self._call("Commit", pb.CommitRequest(step=step, prepare=prepare))

    def rebuild(self, node: int | None = None) -> pb.RebuildReply:
        """Rebuild this daemon's own share, or hold lost node `node`'s share here."""
        return self._call("Rebuild", pb.RebuildRequest(node=node) if node is not None else pb.RebuildRequest())

    def list(self, include_ready: bool = False) -> list[pb.SnapshotInfo]:
        """Committed snapshots (and, with `include_ready`, steps every local rank delivered whole)."""
        return list(self._call("List", pb.ListRequest(include_ready=include_ready)).snapshots)

    def progress(self, step: int, rank: int) -> None:
        """Tell the daemon this rank (this process) finished `step`, without waiting for the
        answer: a report lost now and then only delays hang detection a little."""
        request = pb.ProgressRequest(rank=rank, step=step, pid=os.getpid())
        self._report = self.stub.Progress.future(request, timeout=self.deadline_s, metadata=self.metadata)

    def leaving(self, rank: int) -> None:
        """Tell the daemon this rank is ending: it is no longer watched for hangs."""
        with contextlib.suppress(grpc.RpcError):
            self._call("Progress", pb.ProgressRequest(rank=rank, pid=os.getpid(), leaving=True))

    def status(self) -> pb.StatusReply:
        return self._call("Status", pb.StatusRequest())

    def set_peers(self, addresses: list[str]) -> pb.SetPeersReply:
        """Tell a group's daemon every daemon's address, by node index."""
        return self._call("SetPeers", pb.SetPeersRequest(peers=addresses))

    def verify(self, step: int) -> pb.VerifyReply:
        return self._call("Verify", pb.VerifyRequest(step=step))

    def drop(self, step: int) -> bool:
        return self._call("Drop", pb.DropRequest(step=step)).dropped

    def fetch(self, step: int, rank: int) -> dict[str, bytes]:
        """A rank's buffers of a committed step, mapped from the daemon's segment (same node)."""
        reply = self._call("Locate", pb.FetchRequest(step=step, rank=rank))
        shm = attach(reply.segment)
        try:
            out = {b.name: bytes(shm.buf[b.offset : b.offset + b.nbytes]) for b in reply.buffers}
        finally:
            shm.close()
        for b in reply.buffers:
            if checksum(out[b.name]) != b.crc32c:
                raise ValueError(f"buffer {b.name!r} of rank {rank}, step {step}: checksum mismatch")
        return out

    def fetch_remote(self, step: int, rank: int, names: list[str] | None = None) -> dict[str, bytes]:
        """The same over the network (from another node, or the CLI), from the daemon's block
        port; only the buffers `names`, when given."""
        buffers = {b.name: b for b in self.locate(step, rank).buffers}
        missing = sorted(set(names or ()) - set(buffers))
        if missing:
            raise KeyError(f"rank {rank} holds no buffer {missing[0]!r} in step {step}")
        out = {}
        for name in names or buffers:
            b, data = buffers[name], bytearray(buffers[name].nbytes)
            self.read_into(step, rank, b.offset, memoryview(data))
            if checksum(data) != b.crc32c:
                raise ValueError(f"buffer {name!r} of rank {rank}, step {step}: checksum mismatch")
            out[name] = bytes(data)
        return out

    def read_into(self, step: int, rank: int, offset: int, out: memoryview) -> None:
        """Bytes [offset, offset + out.nbytes) of `rank`'s committed segment of `step`, into `out`."""
        request = {"step": step, "rank": rank, "offset": offset, "nbytes": out.nbytes, **self._credentials()}
        read_range(self.block_address(), request, out, self.deadline_s)

    def block(self, step: int, stripe: int, parity: bool) -> np.ndarray:
        """The daemon's data block of `stripe` (or the parity it holds), from its block port."""
        request = {"step": step, "stripe": stripe, "parity": parity, **self._credentials()}
        return get_block(self.block_address(), request, self.deadline_s)[0]

    def block_address(self) -> str:
        """host:port of the daemon's block port, where bulk bytes come from (asked once)."""
        if self._block_address is None:
            self._block_address = f"{self.address.rpartition(':')[0]}:{self.status().block_port}"
        return self._block_address

    def _credentials(self) -> dict[str, str]:
        return {"job": self.job, "token": self.token}

    def close(self) -> None:
        for shm in self._mapped.values():
            _unmap(shm)
        self._mapped.clear()
        self.channel.close()


def _unmap(shm: MappedSegment) -> None:
    try:
        shm.close()
    except BufferError:  # a view of it is still alive: the mapping goes with the process
        pass


def _bytes_view(value) -> memoryview:
    if isinstance(value, np.ndarray):
        if not value.flags.c_contiguous:
            raise ValueError("snapshot buffers must be contiguous arrays")
        return memoryview(value.reshape(-1).view(np.uint8))
    if hasattr(value, "numpy"):  # a CPU torch tensor
        return _bytes_view(value.detach().contiguous().numpy())
    return memoryview(value).cast("B")


def commit_group(clients: list[SnapshotClient], step: int, timeout_s: float = 60.0) -> None:
    """Commit `step` on every daemon of a group in two phases: once all are ready, all commit,
    so that none drops its previous snapshot before the whole group holds this one."""
    import time

    deadline = time.monotonic() + timeout_s
    while not all(c.commit(step, prepare=True).ready for c in clients):
        if time.monotonic() > deadline:
            raise TimeoutError(f"step {step} did not become ready on every daemon in {timeout_s:.0f} s")
        time.sleep(0.02)
    for client in clients:
        client.commit(step)

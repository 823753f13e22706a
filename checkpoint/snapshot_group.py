"""Erasure coding across the snapshot daemons of a node group, and rebuilding a lost node.

A node's share of a step is its ranks' segments laid end to end, in rank order. Once every
local rank has delivered, the daemon streams each of its k data blocks to the m daemons
holding that stripe's parity (checkpoint/erasure.py places them); those fold each chunk
into their parity as it arrives. A daemon is ready to commit a step when its ranks have
delivered and every parity block it holds is complete; a group commits in two phases
(every daemon ready, then every daemon commits), so that no daemon drops the previous
snapshot before the whole group holds the next.

A daemon that replaces a lost node (same index, empty) rebuilds that node's share of the
newest step committed on the survivors: per stripe it fetches k blocks from them and
decodes its own data block, or recomputes its parity block.

Addresses with port 0 are not known yet: daemons started so bind a free port each, and the
group learns its addresses afterwards (SetPeers), as survivors learn a replacement's.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

import grpc
import numpy as np

from checkpoint.erasure import Code, Stripe, block_bytes, make_code, stripes
from checkpoint.proto import snapshot_pb2 as pb
from checkpoint.proto import snapshot_pb2_grpc as pb_grpc


def chunk_bytes(max_message_bytes: int) -> int:
    """Bytes of data per streamed message: well inside the message-size limit."""
    return max(4096, min(1 << 20, max_message_bytes // 2))


@dataclass
class GroupPlan:
    node: int
    peers: list[str]
    """Every daemon's address, by node index (this one included)."""
    parity: int
    stripes: list[Stripe] = field(init=False)
    code: Code = field(init=False)

    def __post_init__(self):
        self.stripes = stripes(len(self.peers), self.parity)
        self.code = make_code(len(self.peers) - self.parity, self.parity, threads=1)

    @property
    def k(self) -> int:
        return len(self.peers) - self.parity

    @property
    def blocks_to_send(self) -> int:
        """Data blocks this node streams per step: one to each parity holder of its stripes."""
        return sum(len(s.parity_nodes) for s in self.data_stripes(self.node))

    def unknown_peers(self) -> list[int]:
        return [n for n, address in enumerate(self.peers) if address_port(address) == 0]

    def data_stripes(self, node: int) -> list[Stripe]:
        return [s for s in self.stripes if node in s.data_nodes]

    def parity_stripes(self, node: int) -> list[Stripe]:
        return [s for s in self.stripes if node in s.parity_nodes]


def address_port(address: str) -> int:
    """The port of a host:port address (0: not known yet)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not host:port")
    return int(port)


@dataclass
class Encoding:
    """How far this daemon has streamed its data blocks of one step to their parity holders
    (written by the streaming thread, read by Status)."""

    blocks: int
    sent: int = 0
    done: bool = False
    error: str = ""


@dataclass
class ParityBlock:
    """One parity block this daemon holds: folded in from the stripe's k data blocks."""

    position: int
    """Which of the stripe's m parity blocks (0..m-1)."""
    data: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    sources: dict[int, dict] = field(default_factory=dict)
    """Data node -> {"block_bytes", "received", "meta"}."""

    def complete(self, k: int) -> bool:
        return len(self.sources) == k and all(s["received"] == s["block_bytes"] for s in self.sources.values())

    def grow(self, nbytes: int) -> None:
        if nbytes > self.data.size:  # missing bytes of shorter blocks count as zeros
            grown = np.zeros(nbytes, np.uint8)
            grown[: self.data.size] = self.data
            self.data = grown


# ---------------------------------------------------------------------------------------
# A share as blocks


def share_meta(segments: list[tuple[int, int, list]]) -> dict:
    """(rank, nbytes, buffers) of each local segment, in rank order, as the share's description."""
    return {
        "nbytes": sum(n for _, n, _ in segments),
        "segments": [
            {"rank": rank, "nbytes": n, "buffers": [[b.name, b.offset, b.nbytes, b.crc32] for b in buffers]}
            for rank, n, buffers in segments
        ],
    }


def read_range(views: list[memoryview], start: int, length: int) -> bytes:
    """Bytes [start, start + length) of the segments laid end to end, zeros past their end."""
    out = bytearray(length)
    base = 0
    for view in views:
        lo, hi = max(start, base), min(start + length, base + len(view))
        if lo < hi:
            out[lo - start : hi - start] = view[lo - base : hi - base]
        base += len(view)
    return bytes(out)


def block_range(meta: dict, k: int, block: int) -> tuple[int, int]:
    """(start, length) of data block `block` of a share described by `meta`."""
    size = block_bytes(meta["nbytes"], k)
    return block * size, size


# ---------------------------------------------------------------------------------------
# Talking to peers


class Peers:
    """gRPC stubs to the other daemons of the group, with the job's credentials."""

    def __init__(self, plan: GroupPlan, metadata, deadline_s: float, max_message_bytes: int):
        self.plan = plan
        self.options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # A replaced daemon must be reachable again within a second, not after minutes of backoff.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self.channels: dict[int, grpc.Channel] = {}
        self.stubs: dict[int, pb_grpc.SnapshotDaemonStub] = {}
        self.lock = threading.Lock()
        self.metadata, self.deadline_s = metadata, deadline_s
        self.chunk = chunk_bytes(max_message_bytes)
        self.set_addresses(list(plan.peers))

    def set_addresses(self, addresses: list[str]) -> None:
        """Point the group at `addresses` (by node). A changed address gets a fresh channel and
        the old one is closed, which ends calls still waiting on a lost daemon."""
        with self.lock:
            for node, address in enumerate(addresses):
                if node in self.channels and self.plan.peers[node] == address:
                    continue
                old = self.channels.pop(node, None)
                self.stubs.pop(node, None)
                if address_port(address) != 0:
                    self.channels[node] = grpc.insecure_channel(address, options=self.options)
                    self.stubs[node] = pb_grpc.SnapshotDaemonStub(self.channels[node])
                if old is not None:
                    old.close()
            self.plan.peers[:] = addresses

    def put_block(self, node: int, chunks) -> None:
        self.stubs[node].PutBlock(chunks, timeout=self.deadline_s, metadata=self.metadata, wait_for_ready=True)

    def get_block(self, node: int, step: int, stripe: int, parity: bool) -> tuple[bytes, dict, int] | None:
        """(bytes, meta, block_bytes) of a block a survivor holds; None if it cannot serve it."""
        request = pb.BlockRequest(step=step, stripe=stripe, parity=parity)
        try:
            chunks = list(self.stubs[node].GetBlock(request, timeout=self.deadline_s, metadata=self.metadata))
        except grpc.RpcError:
            return None
        data = b"".join(c.data for c in chunks)
        return data, json.loads(chunks[0].meta), chunks[0].block_bytes

    def whole_steps(self, node: int) -> dict[int, bool] | None:
        """Step -> committed, of the steps a daemon holds whole (committed or ready); None if unreachable."""
        request = pb.ListRequest(include_ready=True)
        try:
            reply = self.stubs[node].List(request, timeout=self.deadline_s, metadata=self.metadata)
        except grpc.RpcError:
            return None
        return {s.step: s.committed for s in reply.snapshots}

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


def block_chunks(step: int, stripe: int, source: int, data_reader, size: int, meta: dict, chunk: int):
    """The BlockChunk stream of one block; `data_reader(offset, length)` supplies its bytes."""
    meta_bytes = json.dumps(meta).encode()
    for offset in range(0, max(size, 1), chunk):
        length = min(chunk, size - offset)
        yield pb.BlockChunk(
            step=step,
            stripe=stripe,
            source=source,
            block_bytes=size,
            offset=offset,
            data=data_reader(offset, length),
            meta=meta_bytes if offset == 0 else b"",
        )


def send_share(plan: GroupPlan, peers: Peers, step: int, meta: dict, reader, progress: Encoding) -> threading.Thread:
    """Stream this node's data blocks of `step` to their parity holders, in the background,
    counting them in `progress`."""

    def run():
        try:
            for stripe in plan.data_stripes(plan.node):
                start, size = block_range(meta, plan.k, stripe.block_of(plan.node))
                for holder in stripe.parity_nodes:
                    chunks = block_chunks(
                        step, stripe.index, plan.node, lambda o, n, s=start: reader(s + o, n), size, meta, peers.chunk
                    )
                    peers.put_block(holder, chunks)
                    progress.sent += 1
        except Exception as e:  # reported by Status and by a prepare that never becomes ready
            progress.error = f"{type(e).__name__}: {e}"
        finally:
            progress.done = True

    thread = threading.Thread(target=run, name=f"stalwart-encode-{step}", daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------
# Rebuilding a lost node's share


@dataclass
class RebuiltShare:
    step: int
    meta: dict
    data: bytes
    parity: dict[int, ParityBlock]
    """Stripe -> the parity block this node holds."""


def newest_common_step(plan: GroupPlan, peers: Peers, lost: int) -> int:
    """The newest step every reachable daemon holds whole and at least one has committed.

    A crash between the two phases of a group commit leaves the step committed on some
    daemons and only ready on the others, which still hold the previous one: the step
    counts as committed if any daemon committed it (phase two had begun)."""
    whole, committed = None, set()
    for node in range(len(plan.peers)):
        if node == lost:
            continue
        steps = peers.whole_steps(node)
        if steps is None:
            continue  # another lost node
        whole = set(steps) if whole is None else whole & set(steps)
        committed |= {s for s, c in steps.items() if c}
    candidates = (whole or set()) & committed
    if not candidates:
        raise RuntimeError("no snapshot is held by every reachable daemon of the group")
    return max(candidates)


def rebuild(plan: GroupPlan, peers: Peers, step: int, lost: int) -> RebuiltShare:
    """Node `lost`'s share (and the parity it held) of `step`, from the other daemons."""
    n, k = lost, plan.k
    blocks: dict[int, bytes] = {}
    my_meta: dict | None = None
    parity: dict[int, ParityBlock] = {}
    for stripe in plan.stripes:
        present, sizes, metas = _gather(plan, peers, step, stripe, lost)
        length = max([len(b) for b in present.values()] + [0])
        if len(present) < k:
            raise RuntimeError(f"stripe {stripe.index}: only {len(present)} of the {k} blocks needed are reachable")
        padded = {p: pad_block(b, length) for p, b in present.items()}
        if n in stripe.data_nodes:
            position = stripe.data_nodes.index(n)
            out = np.zeros(length, np.uint8)
            plan.code.decode(padded, {position: out})
            my_meta = metas[n]
            blocks[stripe.block_of(n)] = out[: sizes[n]].tobytes()
        else:
            j = stripe.parity_nodes.index(n)
            out = np.zeros(length, np.uint8)
            plan.code.decode(padded, {k + j: out})
            sources = {d: {"block_bytes": sizes[d], "received": sizes[d], "meta": metas[d]} for d in stripe.data_nodes}
            parity[stripe.index] = ParityBlock(position=j, data=out, sources=sources)
    if my_meta is None:
        raise RuntimeError(f"node {n} holds no data blocks")
    share = b"".join(blocks[b] for b in range(k))[: my_meta["nbytes"]]
    return RebuiltShare(step, my_meta, share, parity)


def _gather(plan: GroupPlan, peers: Peers, step: int, stripe: Stripe, lost: int):
    """Blocks of `stripe` the survivors serve, by code position, with every data node's
    block size and share description (from its own block or from a parity holder)."""
    present: dict[int, bytes] = {}
    sizes: dict[int, int] = {}
    metas: dict[int, dict] = {}
    for position, node in enumerate(stripe.data_nodes):
        got = None if node == lost else peers.get_block(node, step, stripe.index, parity=False)
        if got is not None:
            present[position], metas[node], sizes[node] = got
    for j, node in enumerate(stripe.parity_nodes):
        got = None if node == lost else peers.get_block(node, step, stripe.index, parity=True)
        if got is not None:
            present[plan.k + j] = got[0]
            for source, info in got[1]["sources"].items():
                sizes.setdefault(int(source), info["block_bytes"])
                metas.setdefault(int(source), info["meta"])
    return present, sizes, metas


def pad_block(block: bytes, length: int) -> np.ndarray:
    """A block as `length` bytes: missing bytes of a shorter block count as zeros in its stripe."""
    out = np.zeros(length, np.uint8)
    out[: len(block)] = np.frombuffer(block, np.uint8)
    return out

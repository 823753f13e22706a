"""Erasure coding across the snapshot daemons of a node group, and rebuilding a lost node.

A node's share of a step is its ranks' segments laid end to end, in rank order. Once every
local rank has delivered, the daemon streams each of its k data blocks to the m daemons
holding that stripe's parity (checkpoint/erasure.py places them); those fold each chunk
into their parity as it arrives. A daemon is ready to commit a step when its ranks have
delivered and every parity block it holds is complete; a group commits in two phases
(every daemon ready, then every daemon commits), so that no daemon drops the previous
snapshot before the whole group holds the next.

A daemon that replaces a lost node (same index, empty) rebuilds that node's share of the
newest step committed on the survivors: per stripe k blocks stream in from them and are
folded into its own data block, or into the parity block it held, as they arrive.

Addresses with port 0 are not known yet: daemons started so bind a free port each, and the
group learns its addresses afterwards (SetPeers), as survivors learn a replacement's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np

from checkpoint.block_transport import PIECE, BlockRefused, IncomingBlock, open_block, put_block
from checkpoint.erasure import Code, Stripe, block_bytes, make_code, stripes
from checkpoint.proto import snapshot_pb2 as pb
from checkpoint.proto import snapshot_pb2_grpc as pb_grpc

JOB_KEY = "x-stalwart-job"
"""The gRPC metadata key of the job's id; its token goes as `authorization: Bearer TOKEN`."""


def call_metadata(job: str, token: str) -> tuple[tuple[str, str], ...]:
    """What every call to a daemon of `job` carries."""
    return ((JOB_KEY, job), ("authorization", f"Bearer {token}"))


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
            {"rank": rank, "nbytes": n, "buffers": [[b.name, b.offset, b.nbytes, b.crc32c] for b in buffers]}
            for rank, n, buffers in segments
        ],
    }


def range_pieces(views: list[memoryview], start: int, length: int) -> Iterator[memoryview | bytes]:
    """Bytes [start, start + length) of the segments laid end to end, zeros past their end, in
    pieces of at most PIECE bytes: views of the segments, so that a socket sends them
    without a copy (the segments must stay pinned until they are sent)."""
    covered = 0
    for offset, span in spans(views, start, length):
        for piece in range(0, len(span), PIECE):
            yield span[piece : piece + PIECE]
        covered = offset + len(span)
    for offset in range(covered, length, PIECE):
        yield bytes(min(PIECE, length - offset))


def spans(views: list[memoryview], start: int, length: int) -> Iterator[tuple[int, memoryview]]:
    """(offset from `start`, view) of each part of bytes [start, start + length) of the
    segments laid end to end that lies in a segment, in order."""
    base, end = 0, start + length
    for view in views:
        low, high = max(start, base), min(end, base + len(view))
        if low < high:
            yield low - start, view[low - base : high - base]
        base += len(view)


def block_range(meta: dict, k: int, block: int) -> tuple[int, int]:
    """(start, length) of data block `block` of a share described by `meta`."""
    size = block_bytes(meta["nbytes"], k)
    return block * size, size


# ---------------------------------------------------------------------------------------
# Talking to peers


class Peers:
    """gRPC stubs to the other daemons of the group, with the job's credentials."""

    def __init__(self, plan: GroupPlan, job: str, token: str, deadline_s: float, max_message_bytes: int):
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
        self.metadata, self.deadline_s = call_metadata(job, token), deadline_s
        self.credentials = {"job": job, "token": token}  # on the block port
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

    def _block_address(self, node: int, wait: bool) -> str:
        """host:port of a daemon's block port, asked anew each time (a replacement at the same
        address has another block port). `wait`: for a daemon that is not reachable yet, up to
        the deadline; else an unreachable daemon fails at once (a rebuild asks lost ones too)."""
        status = self.stubs[node].Status(
            pb.StatusRequest(), timeout=self.deadline_s, metadata=self.metadata, wait_for_ready=wait
        )
        return f"{self.plan.peers[node].rpartition(':')[0]}:{status.block_port}"

    def put_block(self, node: int, request: dict, pieces) -> None:
        """Send a data block to the daemon holding its stripe's parity."""
        put_block(self._block_address(node, wait=True), {**request, **self.credentials}, pieces, self.deadline_s)

    def reachable_block_address(self, node: int) -> str | None:
        """Where a survivor's blocks are to be asked for, once per rebuild; None if unreachable."""
        try:
            return self._block_address(node, wait=False)
        except grpc.RpcError:
            return None

    def open_block(self, address: str | None, step: int, stripe: int, parity: bool) -> IncomingBlock | None:
        """A block a survivor holds, its bytes still to be read; None if it cannot serve it."""
        if address is None:
            return None
        request = {"step": step, "stripe": stripe, "parity": parity, **self.credentials}
        try:
            return open_block(address, request, self.deadline_s)
        except (BlockRefused, OSError):
            return None

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


def send_share(
    plan: GroupPlan, peers: Peers, step: int, meta: dict, views: list[memoryview], release, progress: Encoding
) -> threading.Thread:
    """Stream this node's data blocks of `step` (its segments' `views`, pinned until
    `release()`) to their parity holders, in the background, counting them in `progress`."""

    def run():
        try:
            for stripe in plan.data_stripes(plan.node):
                start, size = block_range(meta, plan.k, stripe.block_of(plan.node))
                request = {"step": step, "stripe": stripe.index, "source": plan.node, "block_bytes": size, "meta": meta}
                for holder in stripe.parity_nodes:
                    peers.put_block(holder, request, range_pieces(views, start, size))
                    progress.sent += 1
        except Exception as e:  # reported by Status and by a prepare that never becomes ready
            progress.error = f"{type(e).__name__}: {e}"
        finally:
            release()
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
    """The share's description (its ranks' segments and buffers), as its node had it."""


def newest_common_step(plan: GroupPlan, peers: Peers, lost: int) -> int:
    """The newest step every reachable daemon holds whole and at least one has committed.

    A crash between the two phases of a group commit leaves the step committed on some
    daemons and only ready on the others, which still hold the previous one: the step
    counts as committed if any daemon committed it (phase two had begun)."""
    whole, committed = None, set()
    others = [node for node in range(len(plan.peers)) if node != lost]
    with ThreadPoolExecutor(max_workers=max(1, len(others))) as pool:  # a lost node may take its deadline
        held = list(pool.map(peers.whole_steps, others))
    for steps in held:
        if steps is None:
            continue  # another lost node
        whole = set(steps) if whole is None else whole & set(steps)
        committed |= {s for s, c in steps.items() if c}
    candidates = (whole or set()) & committed
    if not candidates:
        raise RuntimeError("no snapshot is held by every reachable daemon of the group")
    return max(candidates)


ShareSegments = Callable[[dict], list[memoryview]]
"""A share's description -> zeroed segments for it, laid end to end, to rebuild it into."""


def rebuild(plan: GroupPlan, peers: Peers, step: int, lost: int, into: ShareSegments) -> RebuiltShare:
    """Node `lost`'s share of `step`, rebuilt into the segments `into` gives, from the other
    daemons: per stripe, k blocks stream in from the survivors at once and are folded piece by
    piece into the lost block's place as they arrive, so that no block is held whole, nor
    copied once rebuilt. (The parity the node held: `rebuild_parity`.)"""
    data_stripes = [s for s in plan.stripes if lost in s.data_nodes]
    if not data_stripes:
        raise RuntimeError(f"node {lost} holds no data blocks")

    def place(rebuilds: list[StripeRebuild]) -> None:
        meta = rebuilds[0].metas[lost]
        segments = into(meta)
        for rebuilt in rebuilds:
            rebuilt.place(segments, *block_range(meta, plan.k, rebuilt.stripe.block_of(lost)))

    rebuilds = _fold_stripes(plan, peers, step, lost, data_stripes, place)
    return RebuiltShare(step, rebuilds[0].metas[lost])


def rebuild_parity(plan: GroupPlan, peers: Peers, step: int, lost: int) -> dict[int, ParityBlock]:
    """Stripe -> the parity block node `lost` held of `step`, recomputed from the stripes' data."""
    parity_stripes = [s for s in plan.stripes if lost in s.parity_nodes]
    rebuilds = _fold_stripes(plan, peers, step, lost, parity_stripes, place=lambda rebuilds: None)
    return {r.stripe.index: r.parity_block() for r in rebuilds}


def _fold_stripes(plan: GroupPlan, peers: Peers, step: int, lost: int, stripes: list[Stripe], place):
    """Fold the survivors' blocks of `stripes` into node `lost`'s, once `place` has been handed
    the stripes' rebuilds (their blocks' answers are in) to say where the data blocks go."""
    opened = _open_sources(plan, peers, step, lost, stripes)
    try:
        rebuilds = [StripeRebuild(plan, s, lost, sources) for s, sources in zip(stripes, opened, strict=True)]
        place(rebuilds)
        work = [(rebuilt, position) for rebuilt in rebuilds for position in rebuilt.sources]
        with ThreadPoolExecutor(max_workers=max(1, len(work))) as pool:  # every survivor sends at once
            list(pool.map(lambda w: w[0].fold_in(w[1]), work))
    except OSError as e:
        raise RuntimeError(f"a survivor's block stopped arriving: {e}") from e
    finally:
        for sources in opened:
            for block in sources.values():
                block.close()
    return rebuilds


class StripeRebuild:
    """The lost node's block of one stripe (its data block, or the parity it held), folded
    in from k blocks of the survivors; with every data node's block size and share description,
    from the data blocks' own answers or from a parity holder's."""

    READ = PIECE
    """Bytes read from a socket and folded in at a time (4 MiB measured a little faster than 1 MiB or 256 KiB)."""

    def __init__(self, plan: GroupPlan, stripe: Stripe, lost: int, sources: dict[int, IncomingBlock]):
        self.stripe, self.sources = stripe, sources
        self.sizes: dict[int, int] = {}
        self.metas: dict[int, dict] = {}
        for position, block in sorted(sources.items()):
            if position < plan.k:
                node = stripe.data_nodes[position]
                self.sizes[node], self.metas[node] = block.nbytes, block.meta
            else:
                for source, info in block.meta["sources"].items():
                    self.sizes.setdefault(int(source), info["block_bytes"])
                    self.metas.setdefault(int(source), info["meta"])
        self.is_parity = lost not in stripe.data_nodes
        if self.is_parity:
            self.target = plan.k + stripe.parity_nodes.index(lost)
        else:
            self.target = stripe.data_nodes.index(lost)
        self.fold = plan.code.folding(tuple(sorted(sources)), self.target)
        # A parity block is as long as the stripe's longest data block (shorter ones count as
        # padded with zeros); a data block goes into the share's segments (`place`).
        self.parity = np.zeros(max(self.sizes.values()) if self.is_parity else 0, np.uint8)
        self.segments: list[memoryview] = []
        self.start = self.size = 0
        # Folding is a read-modify-write of the target: one lock per READ-sized range, where
        # every source's piece of that range lands (one per stripe was measured 5% slower).
        longest = max(block.nbytes for block in sources.values())
        self.locks = [threading.Lock() for _ in range(-(-longest // self.READ))]

    def place(self, segments: list[memoryview], start: int, size: int) -> None:
        """The lost data block is bytes [start, start + size) of the share in `segments` (its
        part past the share's end is padding, dropped)."""
        self.segments, self.start, self.size = segments, start, size

    def fold_in(self, position: int) -> None:
        buffer = np.empty(self.READ, np.uint8)
        for offset, piece in self.sources[position].read_pieces(buffer):
            with self.locks[offset // self.READ]:
                for at, out in self._targets(offset, piece.size):
                    self.fold(position, piece[at : at + out.size], out)

    def _targets(self, offset: int, length: int) -> Iterator[tuple[int, np.ndarray]]:
        """(offset into the piece, the part of the target it folds into) for a piece at `offset`."""
        if self.is_parity:
            yield 0, self.parity[offset : offset + length]
            return
        # A parity block may be longer than the lost block: what lies past it is not the lost node's.
        for at, view in spans(self.segments, self.start + offset, min(length, self.size - offset)):
            yield at, np.frombuffer(view, np.uint8)

    def parity_block(self) -> ParityBlock:
        sources = {
            d: {"block_bytes": self.sizes[d], "received": self.sizes[d], "meta": self.metas[d]}
            for d in self.stripe.data_nodes
        }
        return ParityBlock(position=self.target - len(self.stripe.data_nodes), data=self.parity, sources=sources)


def _open_sources(
    plan: GroupPlan, peers: Peers, step: int, lost: int, stripes: list[Stripe]
) -> list[dict[int, IncomingBlock]]:
    """Per stripe of `stripes`, k of the survivors' blocks by code position, asked for all at
    once (the survivors answer in parallel); blocks beyond the k needed are hung up on unread."""
    requests = [
        (i, position, node, parity, stripe.index)
        for i, stripe in enumerate(stripes)
        for position, node, parity in _sources(plan, stripe)
        if node != lost
    ]
    with ThreadPoolExecutor(max_workers=max(1, min(len(requests), 2 * len(plan.peers)))) as pool:
        nodes = sorted({r[2] for r in requests})
        addresses = dict(zip(nodes, pool.map(peers.reachable_block_address, nodes), strict=True))
        got = list(pool.map(lambda r: peers.open_block(addresses[r[2]], step, r[4], parity=r[3]), requests))
    opened: list[dict[int, IncomingBlock]] = [{} for _ in stripes]
    for (i, position, _, _, _), block in zip(requests, got, strict=True):
        if block is None:
            continue
        if len(opened[i]) < plan.k:
            opened[i][position] = block
        else:
            block.close()
    short = [
        (stripe.index, len(sources)) for stripe, sources in zip(stripes, opened, strict=True) if len(sources) < plan.k
    ]
    if short:
        for sources in opened:
            for block in sources.values():
                block.close()
        index, count = short[0]
        raise RuntimeError(f"stripe {index}: only {count} of the {plan.k} blocks needed are reachable")
    return opened


def _sources(plan: GroupPlan, stripe: Stripe) -> list[tuple[int, int, bool]]:
    """(code position, node, is parity) of every block of `stripe`."""
    data = [(position, node, False) for position, node in enumerate(stripe.data_nodes)]
    return data + [(plan.k + j, node, True) for j, node in enumerate(stripe.parity_nodes)]


def pad_block(block: np.ndarray, length: int) -> np.ndarray:
    """A block as `length` bytes: missing bytes of a shorter block count as zeros in its stripe."""
    if block.size == length:
        return block
    out = np.zeros(length, np.uint8)
    out[: block.size] = block
    return out

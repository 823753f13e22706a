"""A rank's state into its node's snapshot daemon, and back out of it.

Each snapshot step a rank reserves one daemon-owned shared-memory segment and copies its
state there in the background (checkpoint/engine.py's StagingThread, as for checkpoints):
every piece of `RankState.own_pieces()` as float32 (with the distributed optimizer, its own
shards of the optimizer's state: no gather), then `meta.json` (each piece's layout, the
run's state, the saved layout) and `rng`. The daemon keeps the segment when the rank dies.
A restarted rank reads it back through `SegmentReader`, which offers the same `read_many`
as a checkpoint on disk, so that `RankState.load` serves both tiers.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from checkpoint.layout import TensorLayout, join_shards, local_shape, padded_shape, tp_regions
from checkpoint.materialize import META, RNG, release, shard_of
from checkpoint.proto import snapshot_pb2 as pb
from checkpoint.snapshot_client import ALIGN, SnapshotClient
from checkpoint.snapshot_store import attach, checksum, copy_bytes, copy_checksummed
from checkpoint.state import Piece, PlannedPiece, RankState, ShardItem, read_shards_of_pieces


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class SegmentSink:
    """One step of one rank, copied into the daemon's segment and delivered."""

    def __init__(self, client: SnapshotClient, plan: list[PlannedPiece], step: int, rank: int, extra: dict[str, bytes]):
        self.client, self.step, self.rank = client, step, rank
        self.extra = extra
        """Small buffers known when the snapshot is taken: meta.json, rng."""
        self.offsets: dict[str, int] = {}
        size = 0
        planned = [(p.name, p.nbytes) for p in plan]
        for name, nbytes in [*planned, *((n, len(b)) for n, b in extra.items())]:
            self.offsets[name] = size
            size += _aligned(nbytes)
        self.nbytes = size
        self.table: list[pb.Buffer] = []
        self.shm = None

    def begin(self) -> None:
        reply = self.client.reserve(self.step, self.rank, self.nbytes)
        self.shm = self.client.mapped(reply.segment)

    def put(self, piece: Piece) -> None:
        values = piece.local.detach().to("cpu", torch.float32).contiguous().numpy()
        self._write(piece.name, memoryview(values.reshape(-1).view(np.uint8)))

    def _write(self, name: str, data: memoryview) -> None:
        if name not in self.offsets:
            raise ValueError(f"snapshot buffer {name!r} was not planned (the state changed shape mid-save)")
        start, nbytes = self.offsets[name], data.nbytes
        copy_bytes(self.shm.buf[start : start + nbytes], data)  # the daemon checksums it
        self.table.append(pb.Buffer(name=name, offset=start, nbytes=nbytes))

    def end(self) -> None:
        for name, data in self.extra.items():
            self._write(name, memoryview(data))
        self.client.deliver_table(self.step, self.rank, self.table)


def snapshot_placement(state: RankState, plan: list[PlannedPiece]) -> bytes:
    """What places each piece of a snapshot, as JSON: the same at every step once the optimizer
    has its states, so a snapshotter encodes it once rather than per step."""
    placement = {
        "layout": state.layout(),
        "rank": state.dims.rank,
        "tp_rank": state.dims.tp_rank,
        # Every piece's layout, also of those this rank holds no shard of.
        "pieces": {name: layout.to_attrs() for name, layout in state.piece_layouts()},
        # The element range of its TP piece that each shard holds (distributed optimizer).
        "shards": {p.name: list(p.shard) for p in plan if p.shard is not None},
        # What this rank would write of a checkpoint: a daemon writes it from here (materialize).
        "writes": state.names_this_rank_writes(),
        "creates": [(name, layout.to_attrs()) for name, layout in state.arrays_this_rank_creates()],
    }
    return json.dumps(placement).encode()


def snapshot_extra(state: RankState, placement: bytes, rng: bytes) -> dict[str, bytes]:
    """The small buffers of a snapshot: meta.json (the run's state and the placement, one JSON
    object) and the RNG streams."""
    run_state = json.dumps({"run_state": state.run.state_dict()}).encode()
    return {META: run_state[:-1] + b", " + placement[1:], RNG: rng}


class SegmentReader:
    """A committed snapshot of one rank, from its daemon's memory: mapped when the daemon runs
    on this node (`local`), else read over the network from its block port.

    Offers CheckpointReader's read_many for the same layout: each piece is this rank's own.
    Every buffer is checked against its checksum before its bytes are used.
    """

    writes_every_element = True
    """Each piece it fills is copied whole (padding included): fresh tensors need no zeroing."""

    def __init__(self, client: SnapshotClient, step: int, rank: int, local: bool = True):
        reply = client.locate(step, rank)
        self.client, self.step, self.rank = client, step, rank
        self.shm = attach(reply.segment) if local else None
        self.received = 0
        """Bytes read over the network."""
        self.buffers = {b.name: (b.offset, b.nbytes) for b in reply.buffers}
        self.checksums = {b.name: b.crc32c for b in reply.buffers}
        self.meta = json.loads(bytes(self._checked(META)))
        self.state = {**self.meta["run_state"], "layout": self.meta["layout"]}

    def _checked(self, name: str) -> memoryview:
        """Buffer `name`'s bytes, once they passed their checksum: a view of the mapped segment
        (checked the first time), or read anew from the daemon (checked every time)."""
        offset, nbytes = self.buffers[name]
        if self.shm is not None:
            view, expected = self.shm.buf[offset : offset + nbytes], self.checksums.pop(name, None)
        else:
            view, expected = memoryview(bytearray(nbytes)), self.checksums[name]
            self.client.read_into(self.step, self.rank, offset, view)
            self.received += nbytes
        if expected is not None and checksum(view) != expected:
            raise ValueError(f"snapshot of step {self.step}, rank {self.rank}: buffer {name!r} failed its checksum")
        return view

    @property
    def rng(self) -> bytes:
        return bytes(self._checked(RNG))

    @property
    def optimizer_state_keys(self) -> list[str]:
        return sorted({name.split("/")[1] for name in self.buffers if name.startswith("optim/")})

    def shard(self, name: str) -> tuple[int, int] | None:
        return shard_of(self.meta, name)

    def array(self, name: str, tp: int) -> np.ndarray:
        """A saved piece as an array (over the mapped segment: no copy); 1-D for a shard."""
        values = np.frombuffer(self._checked(name), np.float32)
        if self.shard(name):
            return values
        return values.reshape(local_shape(TensorLayout.from_attrs(self.meta["pieces"][name]), tp))

    def read_many(self, items: list[tuple[str, TensorLayout, torch.Tensor]], tp_rank: int, tp: int) -> None:
        self._same_layout(tp_rank, tp)
        for name, _, _ in items:
            if self.shard(name):
                raise KeyError(f"the snapshot of rank {self.rank} holds only a shard of {name}")
        self._copy_all([(name, out) for name, _, out in items])

    def read_shards(self, items: list[ShardItem], tp_rank: int, tp: int) -> None:
        """This rank's own shards, as it saved them."""
        self._same_layout(tp_rank, tp)
        whole = []
        for name, _, wanted, out in items:
            saved = self.shard(name)
            if saved is None and name in self.buffers:
                out.data.copy_(torch.from_numpy(self.array(name, tp).reshape(-1)[wanted[0] : wanted[1]]))
            elif saved != wanted:
                raise KeyError(f"the snapshot of rank {self.rank} holds {name} elements {saved}, not {wanted}")
            else:
                whole.append((name, out))
        self._copy_all(whole)

    def _same_layout(self, tp_rank: int, tp: int) -> None:
        if tp_rank != self.meta["tp_rank"] or tp != self.meta["layout"]["tp"]:
            raise ValueError("a rank's own snapshot is read back on the layout that saved it")

    def _copy_all(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """Buffers into tensors on as many threads as torch's intra-op pool, the largest first:
        nothing else runs during a restore, and the copies (and the page faults of fresh
        optimizer state they take) release the GIL."""
        pairs = sorted(pairs, key=lambda pair: -pair[1].numel())
        with ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="stalwart-restore") as pool:
            for copied in [pool.submit(self._copy, name, out) for name, out in pairs]:
                copied.result()

    def _copy(self, name: str, out: torch.Tensor) -> None:
        """Buffer `name` into `out` (of its size), its checksum checked."""
        if name not in self.buffers:
            raise KeyError(f"the snapshot holds no {name}")
        target = out.data
        plain = target.dtype == torch.float32 and target.device.type == "cpu" and target.is_contiguous()
        if self.shm is None or not plain:
            target.copy_(torch.from_numpy(np.frombuffer(self._checked(name), np.float32)).view(out.shape).to(out.dtype))
            return
        # The copy and the checksum check in one pass over the bytes.
        offset, nbytes = self.buffers[name]
        crc = copy_checksummed(target.numpy().reshape(-1).view(np.uint8), self.shm.buf[offset : offset + nbytes])
        if name in self.checksums and crc != self.checksums.pop(name):
            raise ValueError(f"snapshot of step {self.step}, rank {self.rank}: buffer {name!r} failed its checksum")

    def close(self) -> None:
        if self.shm is not None:
            release(self.shm)


class GroupReader:
    """A committed snapshot of every rank of a job, mapped from the daemons that hold it (after
    a node's loss, a survivor holds that node's rebuilt segments too), read onto any layout.

    The same mapping as a checkpoint's: each saved piece is placed in its logical tensor by its
    layout, and the new rank's piece is cut out of that. `clients[local]` is the daemon of this
    rank's node: the segments it holds are mapped, and read first (a piece that DP replicas
    hold alike comes from here); the other daemons' are read over the network.
    """

    def __init__(self, clients: list[SnapshotClient], step: int, local: int | None = None):
        self.ranks: dict[int, SegmentReader] = {}
        order = sorted(range(len(clients)), key=lambda i: i != local)
        for i in order:
            held = next((s for s in clients[i].list() if s.step == step), None)
            for rank in held.ranks if held else ():
                if rank not in self.ranks:
                    self.ranks[rank] = SegmentReader(clients[i], step, rank, local=i == local)
        if not self.ranks:
            raise KeyError(f"no daemon holds a committed snapshot of step {step}")
        first = self.ranks[min(self.ranks)]
        self.meta, self.state = first.meta, first.state
        self.saved_tp = self.meta["layout"]["tp"]
        if len(self.ranks) != self.meta["layout"]["world_size"]:
            missing = sorted(set(range(self.meta["layout"]["world_size"])) - set(self.ranks))
            raise KeyError(f"the daemons hold step {step} of ranks {sorted(self.ranks)} only; ranks {missing} are lost")

    @property
    def optimizer_state_keys(self) -> list[str]:
        return next(iter(self.ranks.values())).optimizer_state_keys

    @property
    def received(self) -> int:
        """Bytes read over the network from other nodes' daemons."""
        return sum(reader.received for reader in self.ranks.values())

    def _saved_pieces(self, name: str) -> dict[int, np.ndarray]:
        """TP rank -> that rank's saved piece of `name`: from whichever DP replica comes first,
        or put together from the DP ranks' shards (distributed optimizer)."""
        pieces: dict[int, np.ndarray] = {}
        shards: dict[int, list[tuple[tuple[int, int], np.ndarray]]] = {}
        for reader in self.ranks.values():
            tp_rank = reader.meta["tp_rank"]
            if name not in reader.buffers or tp_rank in pieces:
                continue
            if reader.shard(name):
                shards.setdefault(tp_rank, []).append((reader.shard(name), reader.array(name, self.saved_tp)))
            else:
                pieces[tp_rank] = reader.array(name, self.saved_tp)
        layout = TensorLayout.from_attrs(self.meta["pieces"][name]) if name in self.meta["pieces"] else None
        for tp_rank, parts in shards.items():
            if tp_rank not in pieces:
                pieces[tp_rank] = join_shards(name, parts, local_shape(layout, self.saved_tp))
        return pieces

    def read_many(self, items: list[tuple[str, TensorLayout, torch.Tensor]], tp_rank: int, tp: int) -> None:
        for name, layout, out in items:
            pieces = self._saved_pieces(name)
            if sorted(pieces) != list(range(self.saved_tp)):
                raise KeyError(f"the snapshot holds {name} of TP ranks {sorted(pieces)} of {self.saved_tp} only")
            if tp == self.saved_tp:
                values = pieces[tp_rank]
            else:
                full = np.zeros(padded_shape(layout), np.float32)
                for saved_rank, piece in pieces.items():
                    for global_region, local_region in tp_regions(layout, saved_rank, self.saved_tp, padded=True):
                        full[global_region] = piece[local_region]
                values = np.zeros(local_shape(layout, tp), np.float32)
                for global_region, local_region in tp_regions(layout, tp_rank, tp, padded=True):
                    values[local_region] = full[global_region]
            out.data.copy_(torch.from_numpy(np.array(values)).view(out.shape).to(out.dtype))
            del values, pieces

    def read_shards(self, items: list[ShardItem], tp_rank: int, tp: int) -> None:
        read_shards_of_pieces(self, items, tp_rank, tp)

    def close(self) -> None:
        for reader in self.ranks.values():
            reader.close()

"""Snapshots from inside a run: every `snapshot.interval` steps each rank's state goes to its
node's daemon, and a restarted run restores from the newest snapshot the whole job holds.

The launcher (`stalwart run --nodes K`, launcher/pretrain.slurm) starts the daemons and tells
the ranks where they are through the environment (see `Daemons.from_env`).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import grpc
import torch.distributed as dist

from checkpoint.config import SnapshotConfig
from checkpoint.daemon import read_token
from checkpoint.engine import BlockedTime, StagingThread
from checkpoint.manager import Checkpointer
from checkpoint.proto import snapshot_pb2 as pb
from checkpoint.snapshot_client import SnapshotClient
from checkpoint.snapshot_sink import GroupReader, SegmentReader, SegmentSink, snapshot_extra, snapshot_placement
from checkpoint.state import PlannedPiece, RankState, optimizer_state_keys, rng_state
from checkpoint.universal import CheckpointError, step_dir_name
from parallel.errors import Retryable, on_all_ranks


class SnapshotFailed(Retryable):
    """A snapshot could not be taken, delivered or committed (a daemon refused or is gone)."""


class CheckpointWriteFailed(CheckpointError, Retryable):
    """A daemon's writer of a checkpoint from a snapshot failed or was killed; the snapshot is
    unharmed, so the ranks restart from it and the next checkpoint is written anew."""


@dataclass(frozen=True)
class Daemons:
    """Where this job's snapshot daemons are, as the launcher tells every rank."""

    job: str
    addresses: list[str]
    """Every daemon, by node index."""
    node: int
    """This rank's node."""
    token_file: str

    ENV = ("STALWART_JOB", "STALWART_DAEMONS", "STALWART_NODE", "STALWART_TOKEN_FILE")

    @classmethod
    def from_env(cls) -> Daemons | None:
        if "STALWART_DAEMONS" not in os.environ:
            return None
        job, addresses, node, token_file = (os.environ[key] for key in cls.ENV)
        return cls(job, addresses.split(","), int(node), token_file)

    def env(self, node: int) -> dict[str, str]:
        """The environment of a rank on `node`."""
        return dict(zip(self.ENV, (self.job, ",".join(self.addresses), str(node), self.token_file), strict=True))


@dataclass(frozen=True)
class Restored:
    step: int
    layout: dict
    seconds: float
    origin: str
    """Which daemons the state came from, in words."""


RESTORE_FROM, RESTORE_STEP = "STALWART_RESTORE_FROM", "STALWART_RESTORE_STEP"
"""Set by a launcher after a node's loss: the surviving daemons of the previous group (one of
them holding the lost node's rebuilt share), in the new group's node order (the i-th runs on
new node i), and the step to restore from them."""


class Snapshotter:
    """Every snapshot step: the state into the node daemon (copied during the next step), then
    committed on every daemon; a universal checkpoint, when one is due, written by the daemons
    from that snapshot's memory rather than copied out of training a second time."""

    def __init__(self, config: SnapshotConfig, daemons: Daemons, state: RankState, checkpointer: Checkpointer):
        self.config, self.daemons, self.state = config, daemons, state
        self.checkpointer = checkpointer
        self.dims = state.dims
        token = read_token(daemons.token_file)
        connect = lambda address: SnapshotClient(  # noqa: E731
            address, daemons.job, token, config.deadline_s, config.max_message_mb
        )
        self.client = connect(daemons.addresses[daemons.node])
        # Rank 0 commits each step on every daemon once all are ready (two phases).
        self.committer = Committer([connect(a) for a in daemons.addresses]) if self.dims.rank == 0 else None
        # Normal priority, unlike a checkpoint's copy: a step is safe only once its snapshot is
        # delivered, so the copy should finish early in the next step, not at its end.
        self.staging = StagingThread("stalwart-snapshot-stage", niceness=0)
        self.blocked = BlockedTime()
        self._placed: tuple[tuple[str, ...], list[PlannedPiece], bytes] | None = None

    # -- taking snapshots ------------------------------------------------------------------

    def begin(self, checkpoint: bool = False, final: bool = False) -> None:
        """Hand the state as it is now to the daemon; the copy runs during the next step. With
        `checkpoint`, the daemons also write it as a universal checkpoint once committed (unless
        the previous one is still being written and this one is not `final`).

        An earlier snapshot's or checkpoint's failure, on any rank, stops every rank here.
        """
        with self.blocked:
            on_all_ranks(self._check, (SnapshotFailed, CheckpointError))
            step = self.state.run.step
            plan, placement = self._placement()
            extra = snapshot_extra(self.state, placement, rng_state())
            sink = SegmentSink(self.client, plan, step, self.dims.rank, extra)
            self.staging.start(sink, self.state.own_pieces)
            if self.committer is not None:
                self._submit(step, checkpoint, final)

    def _placement(self) -> tuple[list[PlannedPiece], bytes]:
        """The pieces a snapshot holds and the JSON that places them, worked out again only when
        the optimizer's states change (they appear at its first step)."""
        keys = tuple(optimizer_state_keys(self.state.optimizer))
        if self._placed is None or self._placed[0] != keys:
            plan = self.state.own_piece_plan()
            self._placed = (keys, plan, snapshot_placement(self.state, plan))
        return self._placed[1], self._placed[2]

    def _submit(self, step: int, checkpoint: bool, final: bool) -> None:
        """Rank 0: the step to the committer, with the checkpoint order when one is due."""
        if checkpoint and not final and self.committer.ordered:
            # The last checkpoint is still being written: writes queued behind each other
            # would pin ever more snapshots. The snapshots cover the gap; the next is ordered.
            print(
                f"stalwart: checkpoint of step {step} skipped: {sorted(self.committer.ordered)[0]} is "
                "still being written (checkpoint.interval is shorter than a write takes)",
                flush=True,
            )
            checkpoint = False
        self.committer.submit(step, self._checkpoint_order(step) if checkpoint else None)

    def _checkpoint_order(self, step: int) -> CheckpointOrder:
        ckpt = self.checkpointer
        return CheckpointOrder(
            root=str(ckpt.dir.resolve() / step_dir_name(step)),
            writer_token=ckpt.token,
            world_size=self.dims.world_size,
            keep=ckpt.config.keep,
            keep_every=ckpt.config.keep_every,
            timeout_s=60.0 * ckpt.timeout_minutes,
        )

    def _check(self) -> None:
        error = self.staging.take_error()
        if error is None and self.committer is not None:
            error = self.committer.take_error()
        if error is not None:
            raise SnapshotFailed(f"snapshot failed: {_describe(error)}") from error
        if self.committer is not None:
            self.committer.checkpoints_pending()  # raises a failed checkpoint write

    def wait_staged(self) -> None:
        with self.blocked:
            self.staging.wait_staged()

    def take_blocked_time(self) -> float:
        return self.blocked.take()

    def finish(self) -> None:
        """Wait until the last snapshot is committed on every daemon and every checkpoint
        ordered is written and committed."""
        self.staging.wait_staged()
        on_all_ranks(self._settle, (SnapshotFailed, CheckpointError))

    def _settle(self) -> None:
        if self.committer is not None:
            self.committer.drain(self.config.deadline_s * 4)
            deadline = time.monotonic() + 60.0 * self.checkpointer.timeout_minutes
            while self.committer.checkpoints_pending() and time.monotonic() < deadline:
                time.sleep(0.05)
        self._check()
        if self.committer is not None and self.committer.checkpoints_pending():
            pending = self.committer.checkpoints_pending()
            raise CheckpointWriteFailed(f"checkpoints {pending} were not written in time")

    def report_progress(self, step: int) -> None:
        """This rank finished `step`: its node's daemon watches for ranks that stop doing so."""
        self.client.progress(step, self.dims.rank)

    def leave(self) -> None:
        self.client.leaving(self.dims.rank)

    # -- restoring -------------------------------------------------------------------------

    def restore(self) -> Restored | None:
        """Load the newest snapshot every rank delivered, if any, straight from shared memory.

        Every rank takes part; None when the daemons hold no snapshot of this job.
        """
        if RESTORE_FROM in os.environ:
            return on_all_ranks(self._restore_from_survivors, (KeyError, SnapshotFailed, grpc.RpcError))
        start = time.perf_counter()
        whole = on_all_ranks(lambda: {s.step for s in self.client.list(include_ready=True)}, (grpc.RpcError,))
        held: list[set[int] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(held, whole)
        common = set.intersection(*held)
        if not common:
            return None
        step = max(common)
        if self.dims.rank == 0:  # a step every rank delivered may not have been committed yet
            for client in self.committer.clients:
                client.commit(step)
        dist.barrier()
        reader = SegmentReader(self.client, step, self.dims.rank)
        try:
            if reader.meta["layout"] != self.state.layout():
                raise SnapshotFailed(
                    f"the snapshot of step {step} was taken on another layout ({reader.meta['layout']}); "
                    "restoring it on a new layout is not supported yet: resume from a checkpoint"
                )
            self.state.load(reader, step, reader.state, reader.rng)
        finally:
            reader.close()
        return Restored(step, reader.meta["layout"], time.perf_counter() - start, "this node's snapshot daemon")

    def _restore_from_survivors(self) -> Restored:
        """After a node's loss: every rank's state of the launcher's step, from the surviving
        daemons of the old group, mapped onto this (smaller) layout: this node's old daemon's
        segments mapped, the other nodes' read over the network."""
        start = time.perf_counter()
        step = int(os.environ[RESTORE_STEP])
        token = read_token(self.daemons.token_file)
        addresses = os.environ[RESTORE_FROM].split(",")
        clients = [SnapshotClient(a, self.daemons.job, token, self.config.deadline_s) for a in addresses]
        reader = GroupReader(clients, step, local=self.daemons.node)
        try:
            same = reader.meta["layout"] == self.state.layout()
            rng = reader.ranks[self.dims.rank].rng if same else None  # another layout keeps fresh seeds
            self.state.load(reader, step, reader.state, rng)
        finally:
            reader.close()
            for client in clients:
                client.close()
        origin = (
            f"the surviving daemons {','.join(addresses)}, the lost node's share rebuilt from parity; "
            f"{reader.received / 2**20:.2f} MiB read from other nodes"
        )
        return Restored(step, reader.meta["layout"], time.perf_counter() - start, origin)

    def close(self) -> None:
        self.staging.wait_staged()
        if self.committer is not None:
            self.committer.close()
        self.client.close()


@dataclass(frozen=True)
class CheckpointOrder:
    """Write a committed snapshot as this universal checkpoint (every daemon its node's share)."""

    root: str
    writer_token: str
    world_size: int
    keep: int
    keep_every: int | None
    timeout_s: float


class Committer:
    """Rank 0's background thread: commits snapshot steps on every daemon, then orders the
    checkpoint written from one if it was due.

    It commits the newest submitted step that every daemon holds whole, skipping older ones
    (only the newest matters), but never one a checkpoint needs. Waiting for the newest
    step instead would never end whenever a step takes less time than a snapshot takes to
    become whole: each would be superseded before it was ready.
    """

    POLL_S = 0.01

    def __init__(self, clients: list[SnapshotClient]):
        self.clients = clients
        self.pending: list[tuple[int, CheckpointOrder | None]] = []
        """Submitted steps not yet committed or skipped, oldest first."""
        self.busy = False
        self.error: BaseException | None = None
        self.ordered: dict[str, int] = {}
        """Checkpoints ordered and not yet seen committed: root -> step."""
        self.wake = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="stalwart-snapshot-commit", daemon=True)
        self.thread.start()

    def submit(self, step: int, checkpoint: CheckpointOrder | None = None) -> None:
        with self.wake:
            self.pending.append((step, checkpoint))
            self.wake.notify_all()

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.pending and not self.closed:
                    self.wake.wait()
                if self.closed:
                    return
                pending = list(self.pending)
                self.busy = True
            try:
                step = step_to_commit([(s, c is not None) for s, c in pending], self._whole_everywhere())
                if step is not None:
                    self._commit(step, dict(pending)[step])
                else:
                    time.sleep(self.POLL_S)
            except BaseException as e:  # surfaced by take_error() at the next snapshot
                self.error = e
                step = pending[-1][0]  # the run stops on the error: nothing pending is committed
            with self.wake:
                if step is not None:
                    self.pending = [(s, c) for s, c in self.pending if s > step]
                self.busy = False
                self.wake.notify_all()

    def _whole_everywhere(self) -> set[int]:
        """Steps every daemon holds whole (ready to commit, or committed)."""
        return set.intersection(*({s.step for s in c.list(include_ready=True)} for c in self.clients))

    def _commit(self, step: int, checkpoint: CheckpointOrder | None) -> None:
        """The second phase: every daemon holds `step` whole, so every daemon commits it."""
        for client in self.clients:
            client.commit(step)
        if checkpoint is not None:
            self._order(step, checkpoint)

    def _order(self, step: int, order: CheckpointOrder) -> None:
        request = pb.MaterializeRequest(
            step=step,
            root=order.root,
            writer_token=order.writer_token,
            world_size=order.world_size,
            keep=order.keep,
            keep_every=order.keep_every or 0,
            timeout_s=order.timeout_s,
        )
        for client in self.clients:
            client.materialize(request)
        self.ordered[order.root] = step

    def checkpoints_pending(self) -> list[str]:
        """Roots of ordered checkpoints not yet written; raises the first failure a daemon reports."""
        if not self.ordered:
            return []
        records: dict[str, list] = {}
        for client in self.clients:
            for m in client.status().materializations:  # one per root: its newest attempt
                records.setdefault(m.root, []).append(m)
        for root in list(self.ordered):
            states = [m.state for m in records.get(root, [])]
            failed = [m for m in records.get(root, []) if m.state == "failed"]
            if failed:
                del self.ordered[root]
                raise CheckpointWriteFailed(f"writing checkpoint {root} from the snapshot failed:\n{failed[0].error}")
            if len(states) == len(self.clients) and all(state == "done" for state in states):
                del self.ordered[root]
        return list(self.ordered)

    def take_error(self) -> BaseException | None:
        error, self.error = self.error, None
        return error

    def drain(self, timeout_s: float) -> None:
        """Wait until every submitted step is committed or skipped (or failed: see take_error)."""
        deadline = time.monotonic() + timeout_s
        with self.wake:
            while self.pending or self.busy:
                if not self.wake.wait(timeout=max(0.0, deadline - time.monotonic())):
                    self.error = self.error or TimeoutError(f"snapshots were not committed in {timeout_s:.0f} s")
                    return

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify_all()
        self.thread.join(timeout=5)
        for client in self.clients:
            client.close()


def step_to_commit(pending: list[tuple[int, bool]], whole: set[int]) -> int | None:
    """Which of the `pending` steps (oldest first; True: a checkpoint is written from it) to
    commit now: the newest that every daemon holds `whole`, but none past the oldest that a
    checkpoint needs, since committing a step drops the uncommitted steps before it."""
    candidates = []
    for step, needed in pending:
        candidates.append(step)
        if needed:
            break
    ready = [step for step in candidates if step in whole]
    return max(ready) if ready else None


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        return f"the snapshot daemon answered {error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"

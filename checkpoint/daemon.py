"""The snapshot daemon: one process per node serving its SnapshotStore over gRPC.

`stalwart daemon CONFIG --job ID --node N --ranks 0,1,...` (or `python -m checkpoint.daemon`).
In a group (`--peers`), an address with port 0 is not known yet: the daemon fills in its own
from the port it bound, and learns the others from a SetPeers call before ranks deliver.
Every call needs the job's id and secret token (see checkpoint/proto/snapshot.proto); the
standard grpc.health.v1 service answers without them, so that launchers can wait for it.
"""

from __future__ import annotations

import argparse
import hmac
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from checkpoint.block_transport import PIECE, BlockRefused, BlockServer
from checkpoint.config import SnapshotConfig
from checkpoint.erasure import ErasureError
from checkpoint.materialize import Materializations, MaterializeJob, writer_forks
from checkpoint.proto import snapshot_pb2 as pb
from checkpoint.proto import snapshot_pb2_grpc as pb_grpc
from checkpoint.snapshot_group import (
    JOB_KEY,
    GroupPlan,
    Peers,
    address_port,
    block_range,
    newest_common_step,
    range_pieces,
    rebuild,
    rebuild_parity,
    send_share,
)
from checkpoint.snapshot_store import BufferInfo, Received, SnapshotError, SnapshotStore, StepState
from checkpoint.watchdog import HangWatch, watch_forever

SERVICE = "stalwart.snapshot.v1.SnapshotDaemon"

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}

_STATUS = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "precondition": grpc.StatusCode.FAILED_PRECONDITION,
}


def read_token(path: str | Path) -> str:
    """The job's secret; refused if others than its owner could read the file."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except OSError as e:
        raise SnapshotError("invalid", f"cannot read the token file {path}: {e.strerror}") from e
    if mode & 0o077:
        raise SnapshotError("invalid", f"token file {path} is readable by others (mode {mode & 0o777:o}); chmod 600 it")
    if len(token) < 16:
        raise SnapshotError("invalid", f"token file {path} holds no token of at least 16 characters")
    return token


def write_token(path: str | Path) -> str:
    """Create a fresh job token in `path`, readable by its owner only."""
    import secrets

    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


class TokenCheck(grpc.ServerInterceptor):
    """Refuses every call to the snapshot service that lacks this job's id and token."""

    def __init__(self, job: str, token: str):
        self.job, self.secret = job.encode(), f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        if not details.method.startswith(f"/{SERVICE}/"):
            return continuation(details)  # health checks
        metadata = dict(details.invocation_metadata)
        job, auth = metadata.get(JOB_KEY, ""), metadata.get("authorization", "")
        if not hmac.compare_digest(str(auth).encode(), self.secret):
            return _refusal(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong job token")
        if not hmac.compare_digest(str(job).encode(), self.job):
            return _refusal(grpc.StatusCode.PERMISSION_DENIED, "this daemon serves another job")
        return continuation(details)


def _refusal(code: grpc.StatusCode, message: str):
    def refuse(request, context):
        context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=None, response_serializer=None)


def _mapped(method):
    """Store errors become the matching gRPC status; the daemon keeps serving."""

    def call(self, request, context):
        try:
            return method(self, request, context)
        except SnapshotError as e:
            context.abort(_STATUS[e.kind], str(e))

    call.__name__ = method.__name__
    return call


class Servicer(pb_grpc.SnapshotDaemonServicer):
    def __init__(self, store: SnapshotStore, peers: Peers | None = None, hang_timeout_s: float | None = None):
        self.store, self.peers = store, peers
        self.hangs = HangWatch(hang_timeout_s)
        """The node's ranks by their progress reports (killed, when hung, by watch_forever)."""
        self.materializations = Materializations()
        self.checksums = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stalwart-checksum")
        """Deliveries are checksummed here, one at a time, in the order they arrived."""
        self.block_port = 0
        """Where bulk bytes go: the group's blocks, and reads of a snapshot from another node."""

    def _require_addresses(self) -> None:
        unknown = self.store.group.unknown_peers() if self.store.group else []
        if unknown:
            raise SnapshotError(
                "precondition", f"the addresses of nodes {unknown} are not known yet: tell the group them (SetPeers)"
            )

    @_mapped
    def Reserve(self, request, context):
        self._require_addresses()  # else this step's blocks could not reach their parity holders
        name = self.store.reserve(request.step, request.rank, request.nbytes)
        return pb.ReserveReply(segment=name, nbytes=request.nbytes)

    @_mapped
    def Deliver(self, request, context):
        # The rank's checksums are not asked for: the daemon computes them, off the rank's path.
        layout = [BufferInfo(b.name, b.offset, b.nbytes, 0) for b in request.buffers]
        received = self.store.receive(request.step, request.rank, layout)
        self.checksums.submit(self._settle, received)
        delivered = self.store.received_ranks(request.step)
        return pb.DeliverReply(delivered_ranks=len(delivered), expected_ranks=len(self.store.expected))

    def _settle(self, received: Received) -> None:
        """The checksum thread: a delivery checksummed, and this node's share of the step sent
        to the parity holders once it is whole."""
        try:
            whole = self.store.settle(received)
        except Exception as e:  # noqa: BLE001 (the thread must go on; the step never commits)
            print(f"stalwart daemon: rank {received.rank}, step {received.step}: {e}", file=sys.stderr, flush=True)
            return
        progress = self.store.encoding(received.step)
        if whole and self.peers is not None and progress is not None:
            step, meta = received.step, self.store.share(received.step)
            try:
                views = self.store.hold_share(step)
            except SnapshotError as e:  # dropped meanwhile (a newer step committed): nothing to send
                progress.error, progress.done = str(e), True
            else:
                release = lambda: self.store.unpin(step)  # noqa: E731
                send_share(self.store.group, self.peers, step, meta, views, release, progress)

    @_mapped
    def Commit(self, request, context):
        missing, stripes = self.store.commit(request.step, request.prepare)
        ready = not missing and not stripes
        return pb.CommitReply(
            committed=ready and not request.prepare, missing_ranks=missing, missing_stripes=stripes, ready=ready
        )

    def block(self, request: dict) -> tuple[dict, int, Iterator[bytes]]:
        """A get on the block port: this node's data block of a stripe, or the parity it holds."""
        group = self.store.group
        if group is None:
            raise SnapshotError("precondition", "this daemon is not part of an erasure-coding group")
        step, index = int(request["step"]), int(request["stripe"])
        if not 0 <= index < len(group.stripes):
            raise SnapshotError("invalid", f"no stripe {index} in a group of {len(group.stripes)}")
        if request.get("parity"):
            view, meta = self.store.parity_block(step, index)
            return meta, len(view), _pieces(lambda offset, n: view[offset : offset + n], len(view))
        if group.node not in group.stripes[index].data_nodes:
            raise SnapshotError("invalid", f"node {group.node} has no data block in stripe {index}")
        self.store.require_whole(step)
        meta = self.store.share(step)
        start, size = block_range(meta, group.k, group.stripes[index].block_of(group.node))
        views = self.store.hold_share(step)
        return meta, size, _Then(range_pieces(views, start, size), lambda: self.store.unpin(step))

    def read(self, request: dict) -> tuple[dict, int, Iterator[memoryview]]:
        """A read on the block port: bytes of a rank's committed snapshot, for a restore on
        another node (this node's ranks map the segment instead)."""
        step, rank, offset, nbytes = (int(request[key]) for key in ("step", "rank", "offset", "nbytes"))
        view = self.store.hold_segment(step, rank)
        if offset < 0 or nbytes < 0 or offset + nbytes > view.nbytes:
            self.store.unpin(step)
            raise SnapshotError("invalid", f"bytes {offset}..{offset + nbytes} lie outside rank {rank}'s {view.nbytes}")
        pieces = _pieces(lambda at, n: view[offset + at : offset + at + n], nbytes)
        return {}, nbytes, _Then(pieces, lambda: self.store.unpin(step))

    @_mapped
    def Rebuild(self, request, context):
        if self.peers is None:
            raise SnapshotError("precondition", "this daemon is not part of an erasure-coding group")
        self._require_addresses()
        lost = request.node if request.HasField("node") else self.store.node
        if not 0 <= lost < len(self.store.group.peers):
            raise SnapshotError("invalid", f"no node {lost} in a group of {len(self.store.group.peers)}")
        segments = []

        def into(meta: dict) -> list[memoryview]:
            segments.extend(self.store.new_share(meta))
            return [segment.view() for segment in segments]

        try:
            step = newest_common_step(self.store.group, self.peers, lost)
            rebuilt = rebuild(self.store.group, self.peers, step, lost, into)
            if lost == self.store.node:  # a replacement: the share and its parity duties are ours again
                self.store.install(step, rebuilt.meta, segments)
                threading.Thread(target=self._rebuild_parity, args=(step,), name="stalwart-parity", daemon=True).start()
            else:  # a survivor standing in: serves the lost node's ranks until they restart elsewhere
                self.store.adopt(step, rebuilt.meta, segments)
        except RuntimeError as e:
            self.store.discard(segments)
            raise SnapshotError("precondition", f"cannot rebuild node {lost}: {e}") from e
        except BaseException:
            self.store.discard(segments)
            raise
        return pb.RebuildReply(step=step, nbytes=rebuilt.meta["nbytes"])

    def _rebuild_parity(self, step: int) -> None:
        """A replacement's parity blocks of the step it rebuilt, recomputed after its share is
        back (the ranks need the share, not the parity; until then Status lists the stripes)."""
        node = self.store.node
        try:
            self.store.restore_parity(step, rebuild_parity(self.store.group, self.peers, step, node))
        except (RuntimeError, SnapshotError) as e:  # a newer step will bring parity anew
            message = f"stalwart daemon: node {node}: the parity of step {step} was not rebuilt: {e}"
            print(message, file=sys.stderr, flush=True)

    @_mapped
    def SetPeers(self, request, context):
        if self.peers is None:
            raise SnapshotError("precondition", "this daemon is not part of an erasure-coding group")
        addresses = list(request.peers)
        if len(addresses) != len(self.store.group.peers):
            raise SnapshotError(
                "invalid", f"the group has {len(self.store.group.peers)} daemons, got {len(addresses)} addresses"
            )
        for address in addresses:
            if _port_or_none(address) in (None, 0):
                raise SnapshotError("invalid", f"{address!r} is not a known host:port (port 0 is not an address)")
        self.peers.set_addresses(addresses)
        return pb.SetPeersReply()

    @_mapped
    def Materialize(self, request, context):
        if not request.root or request.world_size < 1:
            raise SnapshotError("invalid", "a checkpoint directory and the job's world size are needed")
        segments = self.store.pin(request.step)
        job = MaterializeJob(
            root=request.root,
            step=request.step,
            token=request.writer_token,
            world_size=request.world_size,
            keep=max(1, request.keep),
            keep_every=request.keep_every or None,
            timeout_s=request.timeout_s or 600.0,
            segments=[
                (rank, name, {b.name: (b.offset, b.nbytes) for b in buffers}) for rank, name, buffers in segments
            ],
            **self._group_credentials(),
        )
        self.materializations.start(job, lambda: self.store.unpin(request.step))
        return pb.MaterializeReply()

    def _group_credentials(self) -> dict:
        """What a checkpoint writer needs to fetch shards from the group's other daemons."""
        if self.peers is None:
            return {}
        plan, credentials = self.peers.plan, self.peers.credentials
        others = [a for node, a in enumerate(plan.peers) if node != plan.node]
        return {"peers": others, "job_id": credentials["job"], "job_token": credentials["token"]}

    @_mapped
    def Progress(self, request, context):
        self.hangs.report(request.rank, request.step, request.pid, request.leaving, time.monotonic())
        return pb.ProgressReply()

    @_mapped
    def List(self, request, context):
        return pb.ListReply(snapshots=_infos(self.store, request.include_ready))

    @_mapped
    def Locate(self, request, context):
        name, buffers = self.store.locate(request.step, request.rank)
        return pb.LocateReply(segment=name, buffers=[_buffer(b) for b in buffers])

    @_mapped
    def Verify(self, request, context):
        problems = self.store.verify(request.step)
        return pb.VerifyReply(ok=not problems, problems=problems)

    @_mapped
    def Drop(self, request, context):
        return pb.DropReply(dropped=self.store.drop(request.step))

    @_mapped
    def Status(self, request, context):
        store = self.store
        return pb.StatusReply(
            job=store.job,
            node=store.node,
            memory_used=store.memory_used(),
            memory_limit=store.memory_limit,
            expected_ranks=store.expected,
            snapshots=_infos(store),
            steps=[_step_state(state) for state in store.states()],
            peers=store.group.peers if store.group else [],
            materializations=[pb.Materialization(**r) for r in self.materializations.records],
            block_port=self.block_port,
        )


def _port_or_none(address: str) -> int | None:
    try:
        return address_port(address)
    except ValueError:
        return None


def _step_state(state: StepState) -> pb.StepState:
    return pb.StepState(
        step=state.step,
        phase=pb.Phase.Value(f"PHASE_{state.phase.upper()}"),
        reserved_ranks=state.reserved,
        delivered_ranks=state.delivered,
        blocks_sent=state.blocks_sent,
        blocks_to_send=state.blocks_to_send,
        missing_stripes=state.missing_stripes,
        encode_error=state.encode_error,
        segments=state.segments,
    )


def _refusing(handler):
    """A block-port handler: the store's refusals go back to the caller as they would on gRPC."""

    def call(*args):
        try:
            return handler(*args)
        except SnapshotError as e:
            raise BlockRefused(e.kind, str(e)) from e

    return call


class _Then:
    """`pieces`, then `done()` exactly once: when they run out or when closed, also when closed
    before the first piece (where a generator's `finally` would never run)."""

    def __init__(self, pieces: Iterator, done):
        self.pieces, self.done = pieces, done

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.pieces)
        except StopIteration:
            self.close()
            raise

    def close(self) -> None:
        done, self.done = self.done, None
        if done is not None:
            done()


def _pieces(read, size: int) -> Iterator[bytes | bytearray | memoryview]:
    for offset in range(0, size, PIECE):
        yield read(offset, min(PIECE, size - offset))


def _buffer(b: BufferInfo) -> pb.Buffer:
    return pb.Buffer(name=b.name, offset=b.offset, nbytes=b.nbytes, crc32c=b.crc32c)


def _infos(store: SnapshotStore, include_ready: bool = False) -> list[pb.SnapshotInfo]:
    return [
        pb.SnapshotInfo(step=step, nbytes=nbytes, ranks=ranks, committed=committed)
        for step, nbytes, ranks, committed in store.listing(include_ready)
    ]


def serve(
    config: SnapshotConfig, store: SnapshotStore, token: str, hang_timeout_s: float | None = None
) -> tuple[grpc.Server, int, Servicer]:
    """Start the daemon's gRPC server; returns it, the port it is bound to, and its servicer."""
    limit = config.max_message_mb << 20
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="stalwart-daemon"),
        interceptors=[TokenCheck(store.job, token)],
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        maximum_concurrent_rpcs=64,
    )
    port = server.add_insecure_port(config.listen)
    if port == 0:
        raise SnapshotError("invalid", f"cannot bind the snapshot daemon to {config.listen}")
    group = None
    if store.group is not None:
        _fill_own_address(store.group, port)
        group = Peers(store.group, store.job, token, config.deadline_s, limit)
    servicer = Servicer(store, group, hang_timeout_s)
    host = config.listen.rpartition(":")[0]
    get, read, put = _refusing(servicer.block), _refusing(servicer.read), _refusing(store.add_parity)
    blocks = BlockServer(host, store.job, token, get, read, put, config.deadline_s)
    servicer.block_port = blocks.port
    pb_grpc.add_SnapshotDaemonServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.start()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, servicer


def _fill_own_address(plan: GroupPlan, port: int) -> None:
    """A daemon started with its own --peers entry at port 0 is reachable at the port it got."""
    host, _, own = plan.peers[plan.node].rpartition(":")
    if own == "0":
        plan.peers[plan.node] = f"{host}:{port}"


def check_peers(node: int, peers: list[str]) -> None:
    for address in peers:
        if _port_or_none(address) is None:
            raise SnapshotError("invalid", f"--peers: {address!r} is not host:port")
    if not 0 <= node < len(peers):
        raise SnapshotError("invalid", f"--node {node} is not one of the {len(peers)} daemons of --peers")


def parse_ranks(text: str) -> list[int]:
    """Rank lists like "0,1,4-7" -> [0, 1, 4, 5, 6, 7]."""
    ranks = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        if not first.strip().isdigit() or (last and not last.strip().isdigit()):
            raise SnapshotError("invalid", f"--ranks: {text!r} is not a list like 0,1,4-7")
        ranks += range(int(first), int(last or first) + 1)
    return ranks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The daemon's command line, shared by `stalwart daemon` and `python -m checkpoint.daemon`."""
    parser.add_argument("config", nargs="?", help="run config (its snapshot section); defaults otherwise")
    parser.add_argument("--job", required=True, help="the job's id (clients must send the same)")
    parser.add_argument("--node", type=int, default=0, help="this node's index in its group")
    parser.add_argument("--ranks", required=True, help="the job's ranks on this node, e.g. 0-7")
    parser.add_argument(
        "--peers",
        help="every daemon of the node group, by node index (host:port,...); erasure-codes across them. "
        "Port 0: not known yet (this daemon's own: the port it binds; the others': given later by SetPeers)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stalwart daemon", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; exit 2 with one line naming a bad config or token file."""
    try:
        config, token_file, hang_timeout_s = _daemon_config(args.config, args.overrides)
        peers = args.peers.split(",") if args.peers else None
        if peers:
            check_peers(args.node, peers)
        writer_forks(start_now=True)  # before the mask below, which its writers would inherit
        # Every thread the server starts inherits this mask: the stop signals are left to
        # wait_for_stop() below, and no gRPC or rebuild thread is interrupted by them.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        group = GroupPlan(args.node, peers, config.parity) if peers else None
        store = SnapshotStore(args.job, args.node, parse_ranks(args.ranks), config.memory_mb << 20, config.keep, group)
        server, port, servicer = serve(config, store, read_token(token_file), hang_timeout_s)
        watch_forever(servicer.hangs, args.node)
    except ErasureError as e:
        print(f"stalwart daemon: error: --peers: {e}", file=sys.stderr, flush=True)
        return 2
    except SnapshotError as e:
        print(f"stalwart daemon: error: {e}", file=sys.stderr, flush=True)
        return 2
    host = config.listen.rpartition(":")[0]
    print(f"stalwart daemon: job {args.job} node {args.node} listening on {host}:{port}", flush=True)
    wait_for_stop()
    server.stop(grace=2).wait(timeout=5)  # calls in flight get 2 s; the segments are freed regardless
    servicer.materializations.stop()
    store.close()
    return 0


def wait_for_stop() -> None:
    """Until SIGTERM or SIGINT. The threads `run` started after blocking them never take them;
    this thread and any started before (numpy's BLAS pool, at import) may, and a handler
    catches them there: without one, the default action would kill the process. Python runs
    a handler only in this thread, between bytecodes, so the wait wakes twice a second to let
    it; the handler takes no lock, since this thread may hold it. (Not sigtimedwait: after a
    SIGSTOP that outlasts its timeout, CPython's returns an uninitialised siginfo rather than
    None, and a daemon stalled for a while stopped when it was resumed.)"""
    caught = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, _: caught.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    while not caught:
        time.sleep(0.5)


def _daemon_config(path: str | None, overrides: list[str]) -> tuple[SnapshotConfig, Path, float | None]:
    """The snapshot section, the token file, and the run's hang timeout (None: automatic)."""
    from trainer.config import load_config
    from trainer.schema import ConfigError

    try:
        if path:
            config = load_config(path, overrides)
            run_dir, hang_timeout_s = Path(config.run.dir), config.run.hang_timeout_s
            snapshot = config.snapshot
        else:
            from trainer.schema import apply_override, from_dict

            raw: dict = {}
            for assignment in overrides:
                apply_override(raw, assignment)
            snapshot = from_dict(SnapshotConfig, raw.get("snapshot", {}), "snapshot")
            snapshot.validate()
            run_dir, hang_timeout_s = Path("."), None
    except ConfigError as e:
        raise SnapshotError("invalid", str(e)) from e
    return snapshot, Path(snapshot.token_file or run_dir / "snapshot.token"), hang_timeout_s


if __name__ == "__main__":
    sys.exit(main())

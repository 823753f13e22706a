"""The snapshot daemon as a real process on loopback: deliveries, commits, limits, security."""

import inspect
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from checkpoint.daemon import write_token
from checkpoint.proto import snapshot_pb2 as pb
from checkpoint.snapshot_client import SnapshotClient
from checkpoint.snapshot_store import BufferInfo, SnapshotError, SnapshotStore, attach, checksum, unlink_segments
from tests.conftest import REPO, Started, rank_env

START_TIMEOUT_S = 120
"""A daemon prints its address within this, even on a machine busy with other jobs."""


def unique_job() -> str:
    """A job id of this test alone: segments in /dev/shm are named after it, so that another
    run (concurrent, or stale from one that was killed) never shows among this test's."""
    return f"job-{uuid.uuid4().hex[:12]}"


def segments_of(job: str) -> list[str]:
    """The /dev/shm segments the daemons of `job` hold."""
    pattern = rf"stalwart-{re.escape(job)}-n\d+-r\d+-[0-9a-f]{{8}}"
    return sorted(name for name in os.listdir("/dev/shm") if re.fullmatch(pattern, name))


def segment_of(client: SnapshotClient, step: int, rank: int) -> str:
    """The segment holding `rank`'s buffers of `step`, as the daemon reports it."""
    state = step_state(client, step)
    return state.segments[list(state.reserved_ranks).index(rank)]


def assert_no_segment_leaked(client: SnapshotClient, job: str, local_ranks: int = 2) -> None:
    """/dev/shm holds the committed step's segments and at most one spare per local rank."""
    [held] = client.list()
    committed = {segment_of(client, held.step, rank) for rank in held.ranks}
    assert committed <= set(segments_of(job)), "a committed segment is gone"
    assert len(segments_of(job)) <= len(committed) + local_ranks, f"leaked: {segments_of(job)}"


def wait_for(condition, what: str, timeout_s: float = 300):
    """Poll `condition` until it returns something true, and return that; fail after
    `timeout_s` naming `what` was awaited. For waiting on observable state, not on time."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.005)
    return result


def step_state(client: SnapshotClient, step: int) -> pb.StepState | None:
    """Where `step` stands on the daemon, per its Status; None if it holds nothing of it."""
    return next((s for s in client.status().steps if s.step == step), None)


class Daemon:
    def __init__(
        self,
        tmp_path: Path,
        ranks: str = "0,1",
        memory_mb: int = 64,
        job: str | None = None,
        extra: list[str] = (),
        listen: str = "127.0.0.1:0",
        token_file: Path | None = None,
        wait: bool = True,
    ):
        """Start the daemon and (with `wait`) read its address; without, call printed_address()
        later, so that several start at once. Its output goes to files, never to a pipe that
        could fill up, so that a daemon that died unexpectedly can always say why."""
        self.job = job or unique_job()
        self.token_file = token_file or tmp_path / f"{self.job}.token"
        if not self.token_file.exists():
            write_token(self.token_file)
        self.token = self.token_file.read_text().strip()
        command = [sys.executable, "-m", "checkpoint.daemon", "--job", self.job, "--ranks", ranks, *extra]
        command += ["--set", f"snapshot.listen={listen}", "--set", f"snapshot.memory_mb={memory_mb}"]
        command += ["--set", f"snapshot.token_file={self.token_file}", "--set", "snapshot.max_message_mb=1"]
        self.started = Started(command, env=rank_env(1), cwd=REPO)
        self.process = self.started.process
        self.killed = False  # by the test, on purpose
        self.node = int(extra[list(extra).index("--node") + 1]) if "--node" in extra else 0
        self.address = self.printed_address() if wait else ""

    def printed_address(self) -> str:
        """The address the daemon bound (port 0: the one it got), from its first line."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (match := re.search(r"listening on (\S+)", self.started.output()[0])):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.started.fail(f"the daemon printed no address within {START_TIMEOUT_S} s")
            time.sleep(0.01)
        return match.group(1)

    def client(self, token: str | None = None, job: str | None = None) -> SnapshotClient:
        return SnapshotClient(self.address, job or self.job, token or self.token, deadline_s=60, max_message_mb=1)

    def healthy(self) -> bool:
        with grpc.insecure_channel(self.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    def kill(self) -> None:
        self.killed = True
        self.started.kill()

    def stderr(self) -> str:
        return self.started.output()[1][-4000:]

    def stop(self) -> None:
        """SIGTERM, which must end the daemon and free every segment it made. The daemon bounds its
        own server stop to 5 s; the rest of the guard is for a loaded machine. A daemon that the
        test did not kill and that is gone already fails the test with what it printed."""
        if self.killed:  # its shared memory outlived it, as it would in a run: free it, as a launcher does
            unlink_segments(self.job, self.node)
            return
        if self.process.poll() is not None:
            code = self.process.returncode
            raise AssertionError(f"the daemon at {self.address} died unexpectedly ({code}):\n{self.stderr()}")
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.started.fail("the daemon did not stop within 60 s of SIGTERM")
        assert self.process.returncode == 0, self.stderr()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    d.stop()


def buffers_of(rank: int, step: int, size: int = 1 << 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rank * 1000 + step)
    return {
        "model/w": rng.standard_normal(size // 4, dtype=np.float32),
        "optim/exp_avg/w": rng.standard_normal(size // 8, dtype=np.float32),
        "rng": np.frombuffer(rng.bytes(77), np.uint8),
    }


def test_a_step_commits_only_when_every_rank_delivered_and_reads_back_byte_identical(daemon):
    client = daemon.client()
    client.deliver(5, 0, buffers_of(0, 5))
    assert list(client.commit(5).missing_ranks) == [1]
    assert client.list() == []  # half-delivered: invisible
    client.deliver(5, 1, buffers_of(1, 5))
    assert client.commit(5).committed
    [info] = client.list()
    assert (info.step, list(info.ranks)) == (5, [0, 1])
    for rank in (0, 1):
        expected = {k: v.tobytes() for k, v in buffers_of(rank, 5).items()}
        assert client.fetch(5, rank) == expected
        assert client.fetch_remote(5, rank) == expected
    assert client.verify(5).ok


def test_the_previous_snapshot_stays_until_the_next_is_committed(daemon):
    client = daemon.client()
    for rank in (0, 1):
        client.deliver(1, rank, buffers_of(rank, 1))
    client.commit(1)
    client.deliver(2, 0, buffers_of(0, 2))
    assert [s.step for s in client.list()] == [1]
    assert client.fetch(1, 0)["model/w"] == buffers_of(0, 1)["model/w"].tobytes()
    client.deliver(2, 1, buffers_of(1, 2))
    client.commit(2)
    assert [s.step for s in client.list()] == [2]
    assert client.status().memory_used == client.list()[0].nbytes


def test_segments_are_readable_by_the_jobs_user_only(daemon):
    client = daemon.client()
    segment = client._call("Reserve", pb.ReserveRequest(step=3, rank=0, nbytes=4096)).segment
    mode = stat.S_IMODE(os.stat(f"/dev/shm/{segment.lstrip('/')}").st_mode)
    assert mode == 0o600


def test_a_delivery_past_the_memory_limit_is_refused_and_nothing_is_lost(daemon):
    client = daemon.client()
    for rank in (0, 1):
        client.deliver(1, rank, buffers_of(rank, 1))
    client.commit(1)
    with pytest.raises(grpc.RpcError) as refused:
        client.deliver(2, 0, {"big": np.zeros(70 << 20, np.uint8)})
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "memory limit" in refused.value.details()
    assert client.fetch(1, 1)["rng"] == buffers_of(1, 1)["rng"].tobytes()
    assert daemon.process.poll() is None


def test_the_daemon_checksums_a_delivery_after_answering_and_it_counts_only_then():
    """Deliver answers before the checksums are computed (`settle`, on the daemon's checksum
    thread); until they are, the step neither commits nor is listed, and a call that asks
    waits for them. A delivery superseded while it is checksummed (its rank restarted and
    reserved the step again) is let go."""
    job, page = unique_job(), 4096
    store = SnapshotStore(job, 0, [0, 1], memory_limit=16 * page)
    try:
        tickets = {}
        for rank in (0, 1):
            store.reserve(1, rank, page)
            store.steps[1].segments[rank].shm.buf[:page] = bytes([rank + 1]) * page  # as a rank would
            tickets[rank] = store.receive(1, rank, [BufferInfo("x", 0, page, 0)])
        assert store.received_ranks(1) == [0, 1] and store.states()[0].delivered == []
        with pytest.raises(SnapshotError, match="already delivered"):
            store.receive(1, 0, [BufferInfo("x", 0, page, 0)])
        listing = []
        waiter = threading.Thread(target=lambda: listing.extend(store.listing(include_ready=True)))
        waiter.start()
        waiter.join(timeout=0.3)
        assert waiter.is_alive()  # waits for the checksums: the listing cannot end before them
        assert store.settle(tickets[0]) is False and store.settle(tickets[1]) is True
        waiter.join(timeout=30)
        assert listing == [(1, 2 * page, [0, 1], False)]
        assert store.commit(1) == ([], [])
        assert [b.crc32c for b in store.locate(1, 1)[1]] == [checksum(bytes([2]) * page)]
        # Rank 0 restarts while its step-2 delivery is being checksummed, and delivers again.
        for rank in (0, 1):
            store.reserve(2, rank, page)
        stale = store.receive(2, 0, [BufferInfo("x", 0, page, 0)])
        store.reserve(2, 0, page)
        assert store.settle(stale) is False and store.received_ranks(2) == []
        assert store.commit(2, prepare=True) == ([0, 1], [])
    finally:
        store.close()
    assert segments_of(job) == []


def test_dropped_segments_serve_later_steps_and_give_way_to_the_memory_limit():
    """A step's segments, once superseded, are the next steps' (no fresh pages to fault in);
    at most one per local rank waits, and waiting ones are freed before a reservation is refused."""
    job, page = unique_job(), 4096
    store = SnapshotStore(job, 0, [0, 1], memory_limit=6 * page)
    try:
        names = {}
        for step in range(1, 6):
            for rank in (0, 1):
                names[step, rank] = store.reserve(step, rank, page)
                value = np.full(page, step * 10 + rank, np.uint8)
                store.steps[step].segments[rank].shm.buf[:page] = value.tobytes()  # as a rank would
                store.settle(store.receive(step, rank, [BufferInfo("x", 0, page, 0)]))
            store.commit(step)
            assert len(segments_of(job)) <= 4  # the committed step's two and at most two spares
        assert {names[5, 0], names[5, 1]} <= {names[s, r] for s in (1, 2, 3) for r in (0, 1)}
        assert store.verify(5) == []
        # 4 pages in use (step 5, two spares) of 6: 3 more fit once one spare is freed ...
        store.reserve(6, 0, 3 * page)
        assert len(segments_of(job)) == 4
        # ... and 3 more again do not, even without the other spare, which is freed trying.
        with pytest.raises(SnapshotError, match="would pass this daemon's memory limit"):
            store.reserve(6, 1, 3 * page)
        assert len(segments_of(job)) == 3
    finally:
        store.close()
    assert segments_of(job) == []


def test_a_store_closed_while_a_view_of_a_segment_is_alive_still_frees_every_segment():
    """A daemon stops while something still holds a view of one of its segments (a reply gRPC
    has not dropped yet): every segment's name is freed regardless, not just those before it."""
    job, page = unique_job(), 4096
    store = SnapshotStore(job, 0, [0, 1], memory_limit=4 * page)
    for rank in (0, 1):
        store.reserve(1, rank, page)
    held = np.frombuffer(store.steps[1].segments[0].shm.buf, np.uint8)  # an export of the mapping
    store.close()
    assert segments_of(job) == []
    held[:] = 7  # the mapping itself lives on with its view
    del held


def test_bad_requests_get_a_status_naming_the_problem(daemon):
    client = daemon.client()
    cases = [
        (lambda: client.deliver(1, 7, {"x": b"1"}), grpc.StatusCode.INVALID_ARGUMENT, "not one of this node's ranks"),
        (lambda: client.fetch(9, 0), grpc.StatusCode.NOT_FOUND, "no committed snapshot of step 9"),
        (
            lambda: client._call("Deliver", pb.DeliverRequest(step=8, rank=0, buffers=[pb.Buffer(name="x")])),
            grpc.StatusCode.FAILED_PRECONDITION,
            "reserved no segment",
        ),
    ]
    assert list(client.commit(4).missing_ranks) == [0, 1] and not client.commit(4).committed
    for call, code, words in cases:
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == code and words in refused.value.details(), refused.value.details()
    client._call("Reserve", pb.ReserveRequest(step=8, rank=0, nbytes=128))
    overlapping = [pb.Buffer(name="a", offset=0, nbytes=64), pb.Buffer(name="b", offset=32, nbytes=64)]
    with pytest.raises(grpc.RpcError, match="overlap"):
        client._call("Deliver", pb.DeliverRequest(step=8, rank=0, buffers=overlapping))
    # The daemon computes the checksums (a rank's are not read), and checks them where the
    # bytes are used: bytes changed in the segment after delivery fail verify and fetch.
    wrong_crc = [pb.Buffer(name="a", offset=0, nbytes=64, crc32c=1)]
    client._call("Deliver", pb.DeliverRequest(step=8, rank=0, buffers=wrong_crc))
    client.deliver(8, 1, {"a": bytes(64)})
    assert client.commit(8).committed
    assert list(client.verify(8).problems) == []
    located = client.locate(8, 0)
    assert located.buffers[0].crc32c == checksum(bytes(64))
    client.mapped(located.segment).buf[5] = 1  # a stray write into the committed segment
    assert list(client.verify(8).problems) == ["step 8 rank 0 buffer 'a': checksum mismatch"]
    with pytest.raises(ValueError, match="buffer 'a' of rank 0, step 8: checksum mismatch"):
        client.fetch(8, 0)
    assert client.fetch(8, 1) == {"a": bytes(64)}


def test_calls_without_the_jobs_token_are_refused_and_the_daemon_keeps_serving(daemon):
    owner = daemon.client()
    for rank in (0, 1):
        owner.deliver(1, rank, buffers_of(rank, 1))
    owner.commit(1)
    intruders = [
        (daemon.client(token="x" * 64), grpc.StatusCode.UNAUTHENTICATED),
        (daemon.client(job="another-job"), grpc.StatusCode.PERMISSION_DENIED),
    ]
    anonymous = daemon.client()
    anonymous.metadata = ()
    intruders.append((anonymous, grpc.StatusCode.UNAUTHENTICATED))
    for intruder, code in intruders:
        for call in (intruder.list, lambda i=intruder: i.fetch_remote(1, 0), lambda i=intruder: i.drop(1)):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == code
        with pytest.raises(grpc.RpcError):
            intruder.deliver(2, 0, {"x": b"1"})
    assert [s.step for s in owner.list()] == [1] and owner.verify(1).ok
    assert daemon.healthy()


def test_oversized_and_malformed_messages_are_refused(daemon):
    client = daemon.client()
    huge = pb.DeliverRequest(step=1, rank=0, buffers=[pb.Buffer(name="x" * (2 << 20))])
    with pytest.raises(grpc.RpcError) as refused:
        client._call("Deliver", huge)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    raw = client.channel.unary_unary("/stalwart.snapshot.v1.SnapshotDaemon/Deliver")
    for garbage in (b"\xff" * 40, b"\x0a\xff\xff\xff\xff\x0f", bytes(random.Random(1).randbytes(300))):
        with pytest.raises(grpc.RpcError) as refused:
            raw(garbage, timeout=60, metadata=client.metadata)
        assert refused.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    assert daemon.healthy() and client.list() == []


BIG = 200 << 20
HALF = BIG // 2
"""A rank's segment holds its "model" buffer, then its "optim" buffer, HALF bytes each."""


def _buffer(name: str, rank: int, step: int, first_word: int, words: int) -> np.ndarray:
    base = np.arange(first_word, first_word + words, dtype=np.uint32)
    base *= np.uint32(2654435761)
    return base ^ np.uint32(rank * 7919 + step) if name == "model" else base + np.uint32(step * 31 + rank)


def big_state(rank: int, step: int) -> dict[str, np.ndarray]:
    """200 MB per rank that differ by rank and step, cheap to make."""
    return {name: _buffer(name, rank, step, 0, HALF // 4) for name in ("model", "optim")}


RANK_MAIN = """
address, job, token_file, rank, step = *sys.argv[1:4], int(sys.argv[4]), int(sys.argv[5])
client = SnapshotClient(address, job, read_token(token_file), deadline_s=300)
client.deliver(step, rank, big_state(rank, step))
while not client.commit(step).committed:  # the other rank may still be delivering, or dead
    time.sleep(0.01)
"""


def rank_script() -> str:
    """A rank process delivering big_state: the same code, without this module's imports,
    which (through conftest) would load the trainer and megatron into every rank."""
    imports = "import sys, time\nimport numpy as np\nfrom checkpoint.daemon import read_token\n"
    imports += "from checkpoint.snapshot_client import SnapshotClient\n"
    functions = "\n\n".join(inspect.getsource(f) for f in (_buffer, big_state))
    return f"{imports}\nHALF = {HALF}\n\n{functions}\n{RANK_MAIN}"


def segment_bytes(rank: int, step: int, offset: int, nbytes: int = 64) -> bytes:
    """Bytes [offset, offset + nbytes) of a rank's segment once it has copied its state in
    (word-aligned, within one buffer)."""
    name, start = ("model", offset) if offset < HALF else ("optim", offset - HALF)
    return _buffer(name, rank, step, start // 4, nbytes // 4).tobytes()


BOTH_MID_COPY = "both killed while copying into their segments"
ONE_MID_COPY = "one killed while copying, the other survives"
BOTH_DELIVERED = "both killed after both delivered"
ONE_DELIVERED = "one killed after both delivered, the other survives"
KILL_PLAN = [BOTH_DELIVERED, BOTH_MID_COPY, ONE_MID_COPY, ONE_DELIVERED] * 2
"""Each kind twice, in this order: every trial after a mid-copy kill commits a newer step,
which frees the half-written segments (memory for three 400 MB steps at most)."""


class KillTrials:
    """Rank processes that each deliver 200 MB of one step and wait for its commit, killed
    (SIGKILL) at points the daemon's Status and the segments' bytes pin down."""

    def __init__(self, daemon: "Daemon", script: Path, rng: random.Random):
        self.daemon, self.script, self.rng = daemon, script, rng
        self.client = daemon.client()
        self.committed, self.step = 0, 0
        self.processes: list[subprocess.Popen] = []
        self.survivors: list[int] = []
        """The rank left alive in each trial that killed one (each checked, then done)."""

    def run(self, kind: str) -> None:
        """One trial of `kind` on a fresh step. A mid-copy kill that finds the copy already
        over (the rank outran the poll) lets that step commit and tries a fresh one."""
        trial = {
            BOTH_MID_COPY: self.both_mid_copy,
            ONE_MID_COPY: self.one_mid_copy,
            BOTH_DELIVERED: self.both_delivered,
            ONE_DELIVERED: self.one_delivered,
        }[kind]
        for _ in range(5):
            self.step += 1
            landed = trial(self.step)
            print(f"step {self.step}: {kind}: {'done' if landed else 'a copy outran the poll; committed instead'}")
            if landed:
                self.expect_listed(self.committed)
                return
        raise AssertionError(f"{kind}: no kill landed mid-copy in 5 tries")

    # -- the kinds of trial ----------------------------------------------------------------

    def both_mid_copy(self, step: int) -> bool:
        ranks = self.start_ranks(step)
        if not self.freeze_mid_copy(step, ranks):
            return self.let_finish(step, ranks)
        for process in ranks.values():
            self.kill(process)
        # Neither copy ended, so neither rank sent Deliver: the step must show no delivery.
        state = self.state(step)
        assert (state.phase, list(state.reserved_ranks), list(state.delivered_ranks)) == (
            pb.PHASE_DELIVERING,
            [0, 1],
            [],
        ), state
        assert list(self.client.commit(step, prepare=True).missing_ranks) == [0, 1]
        return True

    def one_mid_copy(self, step: int) -> bool:
        victim = self.rng.choice([0, 1])
        survivor = 1 - victim
        ranks = self.start_ranks(step)
        if not self.freeze_mid_copy(step, {victim: ranks[victim]}):
            return self.let_finish(step, ranks)
        self.kill(ranks[victim])
        wait_for(lambda: list(self.state(step).delivered_ranks) == [survivor], f"rank {survivor} to deliver")
        # The survivor keeps waiting for the commit; the daemon shows nothing of the step.
        assert ranks[survivor].poll() is None, "the surviving rank stopped waiting for the commit"
        assert self.state(step).phase == pb.PHASE_DELIVERING
        assert list(self.client.commit(step, prepare=True).missing_ranks) == [victim]
        self.expect_listed(self.committed)
        with pytest.raises(grpc.RpcError) as hidden:
            self.client.fetch(step, survivor)
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        # The killed rank restarts and delivers again: the survivor's wait ends in the commit.
        self.expect_success(self.start(victim, step), ranks[survivor])
        self.survivors.append(survivor)
        self.committed = step
        return True

    def both_delivered(self, step: int) -> bool:
        ranks = self.start_ranks(step)
        self.wait_delivered(step)
        for process in ranks.values():
            self.kill(process)
        assert self.client.commit(step).committed  # by a rank before its kill, or now
        self.committed = step
        return True

    def one_delivered(self, step: int) -> bool:
        victim = self.rng.choice([0, 1])
        ranks = self.start_ranks(step)
        self.wait_delivered(step)
        self.kill(ranks[victim])
        self.expect_success(ranks[1 - victim])  # the survivor's own commit goes through
        self.survivors.append(1 - victim)
        self.committed = step
        return True

    # -- the parts ---------------------------------------------------------------------------

    def start(self, rank: int, step: int) -> subprocess.Popen:
        d = self.daemon
        command = [sys.executable, str(self.script), d.address, d.job, str(d.token_file), str(rank), str(step)]
        process = subprocess.Popen(command, cwd=REPO, env=rank_env(1))
        self.processes.append(process)
        return process

    def start_ranks(self, step: int) -> dict[int, subprocess.Popen]:
        return {rank: self.start(rank, step) for rank in (0, 1)}

    def freeze_mid_copy(self, step: int, ranks: dict[int, subprocess.Popen]) -> bool:
        """SIGSTOP each of `ranks` once its copy into its segment has passed a random point of
        its first half; True if every copy was still unfinished then, so that none of them
        can have sent Deliver (it follows the copy). Each rank's segment is watched from the
        moment the daemon reports it reserved, however late the other rank starts."""
        marks = {rank: self.rng.randrange(0, HALF, 64) for rank in ranks}
        segments = {}
        pending = set(ranks)

        def stop_those_past_their_mark() -> bool:
            unwatched = pending - set(segments)
            for rank in sorted(unwatched & set(self.state(step).reserved_ranks) if unwatched else ()):
                segments[rank] = attach(self.segment(step, rank))
            for rank in [r for r in pending if r in segments and self.copied(segments[r], r, step, marks[r])]:
                ranks[rank].send_signal(signal.SIGSTOP)
                pending.discard(rank)
            assert all(ranks[r].poll() is None for r in pending), "a rank ended before its copy passed its mark"
            return not pending

        try:
            wait_for(stop_those_past_their_mark, f"ranks {sorted(ranks)} to copy past {marks}")
            return not any(self.copied(segments[r], r, step, BIG - 64) for r in ranks)
        finally:
            for shm in segments.values():
                shm.close()

    def state(self, step: int) -> pb.StepState:
        return step_state(self.client, step) or pb.StepState(step=step)

    def segment(self, step: int, rank: int) -> str:
        return segment_of(self.client, step, rank)

    @staticmethod
    def copied(shm, rank: int, step: int, offset: int) -> bool:
        return bytes(shm.buf[offset : offset + 64]) == segment_bytes(rank, step, offset)

    def let_finish(self, step: int, ranks: dict[int, subprocess.Popen]) -> bool:
        """A copy outran the poll: resume the ranks and let the step commit normally."""
        for process in ranks.values():
            process.send_signal(signal.SIGCONT)
        self.expect_success(*ranks.values())
        self.committed = step
        self.expect_listed(step)
        return False

    def wait_delivered(self, step: int) -> None:
        wait_for(lambda: list(self.state(step).delivered_ranks) == [0, 1], f"both ranks to deliver step {step}")

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        process.kill()
        process.wait(timeout=60)

    @staticmethod
    def expect_success(*processes: subprocess.Popen) -> None:
        for process in processes:
            assert process.wait(timeout=300) == 0, f"a rank process ended with {process.returncode}"

    def expect_listed(self, step: int) -> None:
        """`step`, whole and byte-identical, is the one snapshot listed: never none, never two."""
        listed = self.client.list()
        assert [(s.step, list(s.ranks)) for s in listed] == [(step, [0, 1])], listed
        for rank in (0, 1):
            got = self.client.fetch(step, rank)
            for name, value in big_state(rank, step).items():
                assert np.array_equal(np.frombuffer(got[name], np.uint32), value), f"rank {rank} {name} of step {step}"

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                self.kill(process)


@pytest.mark.timeout(1500)
def test_ranks_killed_while_delivering_200_mb_never_expose_a_half_delivered_step(tmp_path):
    """Two rank processes deliver 200 MB each of a step and commit it. Each trial SIGKILLs one
    or both (KILL_PLAN) at a point pinned down by the daemon's Status and the segments' bytes:
    at a random point of a rank's copy into its segment (before its Deliver), or once the
    daemon shows both deliveries. Killed mid-copy, the previous step stays the only one listed,
    and a surviving rank keeps waiting until the killed one restarts; killed after both
    deliveries, the step is committed (by a rank, or by the test). Whatever is listed reads
    back byte-identical, and the half-written segments are freed."""
    daemon = Daemon(tmp_path, memory_mb=1700)
    script = tmp_path / "rank.py"
    script.write_text(rank_script())
    trials = KillTrials(daemon, script, random.Random(20))
    try:
        for rank in (0, 1):
            trials.client.deliver(0, rank, big_state(rank, 0))
        assert trials.client.commit(0).committed
        for kind in KILL_PLAN:
            trials.run(kind)
        assert len(trials.survivors) == KILL_PLAN.count(ONE_MID_COPY) + KILL_PLAN.count(ONE_DELIVERED)
        assert_no_segment_leaked(trials.client, daemon.job)
        assert trials.client.status().memory_used == trials.client.list()[0].nbytes
    finally:
        trials.kill_all()
        daemon.stop()


def test_the_generated_grpc_modules_match_the_checked_in_proto(tmp_path):
    """Compared as descriptors, not text, so that another protoc version does not matter."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "snapshot.desc"
    assert protoc.main(["protoc", f"-I{REPO}", f"--descriptor_set_out={out}", "checkpoint/proto/snapshot.proto"]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in fresh.message_type:  # the generated modules leave out the derived JSON names
        for field in message.field:
            field.ClearField("json_name")
    assert fresh == descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb), (
        "checkpoint/proto is stale: run python -m checkpoint.proto"
    )


def test_a_token_file_others_can_read_is_refused(tmp_path):
    token = tmp_path / "token"
    write_token(token)
    token.chmod(0o644)
    command = [sys.executable, "-m", "checkpoint.daemon", "--job", unique_job(), "--ranks", "0"]
    command += ["--set", "snapshot.listen=127.0.0.1:0", "--set", f"snapshot.token_file={token}"]
    done = subprocess.run(command, cwd=REPO, env=rank_env(1), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "readable by others" in done.stderr, done.stderr


def _mutated(rng: random.Random, message: bytes) -> bytes:
    data = bytearray(message)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.7:
            data = data[: rng.randrange(len(data) + 1)]
        else:
            data += rng.randbytes(rng.randint(1, 64))
    return bytes(data)


def _random_request(rng: random.Random) -> tuple[str, bytes]:
    step, rank = rng.choice([-5, 0, 1, 7, 2**40]), rng.choice([-1, 0, 1, 3, 2**30])
    messages = [
        ("Reserve", pb.ReserveRequest(step=abs(step) % 50, rank=rank % 3, nbytes=rng.choice([0, 64, 4096, 10**12]))),
        ("Deliver", pb.DeliverRequest(step=step, rank=rank, buffers=[pb.Buffer(name="x", nbytes=rng.randrange(9**9))])),
        ("Commit", pb.CommitRequest(step=step, prepare=rng.random() < 0.5)),
        ("List", pb.ListRequest()),
        ("Locate", pb.FetchRequest(step=step, rank=rank)),
        ("Verify", pb.VerifyRequest(step=step)),
        ("Drop", pb.DropRequest(step=step)),
        ("Status", pb.StatusRequest()),
        ("Rebuild", pb.RebuildRequest()),
        ("SetPeers", pb.SetPeersRequest(peers=rng.choice([[], ["127.0.0.1:1"], ["x", "127.0.0.1:0"]]))),
        ("Fetch", pb.FetchRequest(step=step, rank=rank)),
    ]
    method, message = rng.choice(messages)
    payload = message.SerializeToString()
    kind = rng.random()
    if kind < 0.3:
        payload = _mutated(rng, payload)
    elif kind < 0.4:
        payload = rng.randbytes(rng.randint(0, 200))
    return method, payload


def _rss_kb(pid: int) -> int:
    return int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")).split()[1])


FUZZ_DEADLINE_S = 30
"""Far above what any answer takes even on a loaded machine: running out of it means a
handler hung."""


@pytest.mark.timeout(600)
def test_a_thousand_random_and_mutated_requests_neither_crash_nor_leak(daemon):
    """Fuzzing: every request gets an answer before its deadline, the daemon keeps serving,
    and what it holds afterwards is exactly what the last commit left, in memory and in
    /dev/shm."""
    client = daemon.client()
    rng = random.Random(20261123)
    service = "/stalwart.snapshot.v1.SnapshotDaemon/"
    streaming = {"Fetch"}

    def fire(count: int) -> None:
        for _ in range(count):
            method, payload = _random_request(rng)
            metadata = client.metadata if rng.random() < 0.9 else ()
            options = {"timeout": FUZZ_DEADLINE_S, "metadata": metadata}
            try:
                if method in streaming:
                    list(client.channel.unary_stream(service + method)(payload, **options))
                else:
                    client.channel.unary_unary(service + method)(payload, **options)
            except grpc.RpcError as e:
                assert e.code() != grpc.StatusCode.UNAVAILABLE, f"{method}: the daemon stopped answering"
                assert e.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: no answer in {FUZZ_DEADLINE_S} s"

    fire(200)  # warm-up: thread pools and caches reach their steady size
    rss = _rss_kb(daemon.process.pid)
    fire(1000)
    assert daemon.process.poll() is None and daemon.healthy()
    for rank in (0, 1):
        client.deliver(100, rank, buffers_of(rank, 100))
    assert client.commit(100).committed
    [held] = client.list()
    assert client.status().memory_used == held.nbytes, "fuzzed reservations were not all freed"
    assert_no_segment_leaked(client, daemon.job)
    assert _rss_kb(daemon.process.pid) - rss < 30_000, "the daemon's memory grew over 1,000 requests"


def test_a_sigterm_the_kernel_hands_to_any_thread_of_a_daemon_stops_it_cleanly(tmp_path):
    """A process-directed SIGTERM goes to any thread that does not block it. The daemon's own
    threads block it, leaving it to the main thread; a thread started at import (numpy's BLAS
    pool) does not, and a SIGTERM landing there once killed a daemon outright (exit -15). Sent
    straight to such a thread (tgkill), it must stop the daemon cleanly all the same."""
    import ctypes
    import platform

    tgkill = {"x86_64": 234, "aarch64": 131}[platform.machine()]
    daemon = Daemon(tmp_path)
    pid = daemon.process.pid
    unblocked = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = open(f"/proc/{pid}/task/{tid}/status").read()
        blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
        if not blocked & (1 << (signal.SIGTERM - 1)):
            unblocked.append(int(tid))
    others = [t for t in unblocked if t != pid]  # the main thread waits for it
    assert others, "no thread of the daemon leaves SIGTERM unblocked: nothing to test here"
    target = others[0]
    assert ctypes.CDLL(None, use_errno=True).syscall(tgkill, pid, target, signal.SIGTERM) == 0
    daemon.process.wait(timeout=60)
    assert daemon.process.returncode == 0, daemon.stderr()


def test_a_daemon_stalled_by_sigstop_serves_on_after_sigcont(daemon):
    """A stalled node (SIGSTOP: a debugger, a frozen VM, a job suspended) must not stop its
    daemon when it resumes. It once did: CPython's sigtimedwait, the daemon's wait then,
    returns an uninitialised siginfo instead of None when a stop outlasts its timeout, and the
    daemon took that for SIGTERM. Whatever the machine's load, a daemon that is still serving
    two seconds after it resumed did not take the stop for a signal."""
    client = daemon.client()
    client.deliver(1, 0, buffers_of(0, 1))
    daemon.process.send_signal(signal.SIGSTOP)
    time.sleep(1.5)  # longer than the wait's own timeout (0.5 s) was
    daemon.process.send_signal(signal.SIGCONT)
    time.sleep(2)
    assert daemon.process.poll() is None, daemon.stderr()
    assert daemon.healthy() and client.status().steps[0].step == 1


class RunCounter:
    """The run's own state, as the trainer's: saved and restored by the state it belongs to."""

    def __init__(self, step: int = 0):
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def test_a_plain_optimizers_rank_state_comes_back_from_a_daemon_bit_identical_and_trains_on_alike(tmp_path):
    """A rank's state (fp32, no distributed optimizer: the parameters are their own main weights)
    through a daemon's segment and back into a fresh model and optimizer, as a restarted rank
    restores it: every weight and Adam state bit-identical (read on several threads, the fresh
    states in huge pages where large, each weight once), and the next step's loss the same."""
    from checkpoint.snapshot_sink import SegmentReader, SegmentSink, snapshot_extra, snapshot_placement
    from checkpoint.state import RankState, params_that_are_their_main_weights, rng_state
    from tests.test_cpu_compat import one_rank
    from trainer.config import Config, DataConfig, ModelConfig, TrainConfig
    from trainer.step import TrainStep

    model = ModelConfig(num_layers=1, hidden_size=512, ffn_hidden_size=1024, num_attention_heads=4, num_query_groups=2)
    config = Config(model=model, train=TrainConfig(seq_length=16), data=DataConfig(packing="concat"))
    vocab = 2048  # embedding and output layer: 4 MiB each, large enough to ask for huge pages
    batches = [[np.random.default_rng(i).integers(0, vocab, size=(2, 17))] for i in range(3)]
    daemon = Daemon(tmp_path, ranks="0", memory_mb=256)
    client = daemon.client()
    try:
        with one_rank(tmp_path, distributed_optimizer=False) as dims:
            trained = TrainStep(config, dims, vocab_size=vocab)
            for batch in batches[:2]:
                trained.train(batch)
            saved = RankState(trained.model, trained.optimizer, dims, vocab, RunCounter(2))
            assert params_that_are_their_main_weights(trained.optimizer) == {p.param for p in saved.params}
            plan = saved.own_piece_plan()
            sink = SegmentSink(client, plan, 2, 0, snapshot_extra(saved, snapshot_placement(saved, plan), rng_state()))
            sink.begin()
            for piece in saved.own_pieces():
                sink.put(piece)
            sink.end()
            assert client.commit(2).committed

            fresh = TrainStep(config, dims, vocab_size=vocab)
            restored = RankState(fresh.model, fresh.optimizer, dims, vocab, RunCounter())
            reader = SegmentReader(client, 2, 0)
            try:
                restored.load(reader, 2, reader.state, reader.rng)
            finally:
                reader.close()
            assert restored.run.step == 2
            for before, after in zip(saved.own_pieces(), restored.own_pieces(), strict=True):
                assert before.name == after.name and torch.equal(before.local, after.local), before.name
            assert trained.train(batches[2]).loss == fresh.train(batches[2]).loss
    finally:
        client.close()
        daemon.stop()

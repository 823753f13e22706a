"""The snapshot daemon as a real process on loopback: deliveries, commits, limits, security."""

import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from checkpoint.daemon import write_token
from checkpoint.proto import snapshot_pb2 as pb
from checkpoint.snapshot_client import SnapshotClient
from tests.conftest import REPO, rank_env

JOB = "job-test"


class Daemon:
    def __init__(
        self,
        tmp_path: Path,
        ranks: str = "0,1",
        memory_mb: int = 64,
        job: str = JOB,
        extra: list[str] = (),
        listen: str = "127.0.0.1:0",
        token_file: Path | None = None,
    ):
        self.token_file = token_file or tmp_path / f"{job}.token"
        if not self.token_file.exists():
            write_token(self.token_file)
        self.token = self.token_file.read_text().strip()
        command = [sys.executable, "-m", "checkpoint.daemon", "--job", job, "--ranks", ranks, *extra]
        command += ["--set", f"snapshot.listen={listen}", "--set", f"snapshot.memory_mb={memory_mb}"]
        command += ["--set", f"snapshot.token_file={self.token_file}", "--set", "snapshot.max_message_mb=1"]
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=rank_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        line = self.process.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        assert match, line + self.process.stderr.read()
        self.address = match.group(1)

    def client(self, token: str | None = None, job: str = JOB) -> SnapshotClient:
        return SnapshotClient(self.address, job, token or self.token, deadline_s=10, max_message_mb=1)

    def healthy(self) -> bool:
        with grpc.insecure_channel(self.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    def stop(self) -> None:
        """SIGTERM, which must end the daemon promptly and free every segment it made."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                raise AssertionError("the daemon did not stop within 10 s of SIGTERM") from None
            assert self.process.returncode == 0, self.process.stderr.read()[-2000:]


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
        assert client.fetch_streamed(5, rank) == expected
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
    wrong_crc = [pb.Buffer(name="a", offset=0, nbytes=64, crc32=1)]
    with pytest.raises(grpc.RpcError, match="checksum mismatch"):
        client._call("Deliver", pb.DeliverRequest(step=8, rank=0, buffers=wrong_crc))


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
        for call in (intruder.list, lambda i=intruder: i.fetch_streamed(1, 0), lambda i=intruder: i.drop(1)):
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
            raw(garbage, timeout=10, metadata=client.metadata)
        assert refused.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    assert daemon.healthy() and client.list() == []


RANK_SCRIPT = """
import sys, time
from checkpoint.snapshot_client import SnapshotClient
from tests.test_snapshot_daemon import big_state
address, job, token, rank, first = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
client = SnapshotClient(address, job, token, deadline_s=60)
for step in range(first, first + 1000):
    client.deliver(step, rank, big_state(rank, step))
    while not client.commit(step).committed:  # the other rank may still be delivering
        time.sleep(0.01)
"""

BIG = 200 << 20


def big_state(rank: int, step: int) -> dict[str, np.ndarray]:
    """200 MB per rank that differ by rank and step, cheap to make."""
    base = np.arange(BIG // 4 // 2, dtype=np.uint32) * np.uint32(2654435761)
    return {"model": base ^ np.uint32(rank * 7919 + step), "optim": base + np.uint32(step * 31 + rank)}


def test_ranks_killed_while_delivering_200_mb_never_expose_a_half_delivered_step(tmp_path):
    """20 trials: two rank processes deliver and commit 200 MB each per step; one or both are
    SIGKILLed at a random moment. The committed step is always whole and byte-identical."""
    daemon = Daemon(tmp_path, memory_mb=1700)
    try:
        client = daemon.client()
        script = tmp_path / "rank.py"
        script.write_text(RANK_SCRIPT)
        rng = random.Random(20)
        for rank in (0, 1):
            client.deliver(0, rank, big_state(rank, 0))
        assert client.commit(0).committed
        first, committed_before, commits = 1, 0, 0
        for trial in range(20):
            ranks = [
                subprocess.Popen(
                    [sys.executable, str(script), daemon.address, JOB, daemon.token, str(r), str(first)],
                    cwd=REPO,
                    env=rank_env(1),
                )
                for r in (0, 1)
            ]
            time.sleep(rng.uniform(1.0, 7.0))
            for victim in rng.sample(ranks, rng.choice([1, 2])):
                victim.kill()
            for r in ranks:
                r.kill()
                r.wait()
            listed = client.list()
            assert len(listed) == 1, f"trial {trial}: {listed}"  # never none, never two
            step = listed[0].step
            assert step >= committed_before
            commits += step > committed_before
            for rank in (0, 1):
                got = client.fetch(step, rank)
                expected = big_state(rank, step)
                assert got.keys() == expected.keys()
                for name, value in expected.items():
                    assert got[name] == value.tobytes(), f"trial {trial}: rank {rank} {name} of step {step}"
            committed_before = step
            first = step + 1
        assert commits >= 3, f"only {commits} trials committed a new step: they killed too early to test much"
    finally:
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
    command = [sys.executable, "-m", "checkpoint.daemon", "--job", JOB, "--ranks", "0"]
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
        ("GetBlock", pb.BlockRequest(step=step, stripe=rank)),
        ("PutBlock", pb.BlockChunk(step=step, stripe=rank, data=rng.randbytes(16))),
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


def test_a_thousand_random_and_mutated_requests_neither_crash_nor_leak(daemon):
    """Fuzzing: every request gets an answer, the daemon keeps serving, and what it holds
    afterwards is exactly what the last commit left, in memory and in /dev/shm."""
    client = daemon.client()
    rng = random.Random(20261123)
    service = "/stalwart.snapshot.v1.SnapshotDaemon/"
    streaming = {"Fetch", "GetBlock"}

    def fire(count: int) -> None:
        for _ in range(count):
            method, payload = _random_request(rng)
            metadata = client.metadata if rng.random() < 0.9 else ()
            try:
                if method == "PutBlock":
                    call = client.channel.stream_unary(service + method)
                    call(iter([payload]), timeout=10, metadata=metadata)
                elif method in streaming:
                    list(client.channel.unary_stream(service + method)(payload, timeout=10, metadata=metadata))
                else:
                    client.channel.unary_unary(service + method)(payload, timeout=10, metadata=metadata)
            except grpc.RpcError as e:
                assert e.code() != grpc.StatusCode.UNAVAILABLE, "the daemon stopped answering"

    fire(200)  # warm-up: thread pools and caches reach their steady size
    rss = _rss_kb(daemon.process.pid)
    fire(1000)
    assert daemon.process.poll() is None and daemon.healthy()
    for rank in (0, 1):
        client.deliver(100, rank, buffers_of(rank, 100))
    assert client.commit(100).committed
    [held] = client.list()
    assert client.status().memory_used == held.nbytes, "fuzzed reservations were not all freed"
    segments = [name for name in os.listdir("/dev/shm") if name.startswith(f"stalwart-{JOB}-")]
    assert len(segments) == 2, segments
    assert _rss_kb(daemon.process.pid) - rss < 30_000, "the daemon's memory grew over 1,000 requests"

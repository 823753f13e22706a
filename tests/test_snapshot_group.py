"""Erasure coding across several snapshot daemons on loopback: losing nodes loses nothing."""

import itertools
import json
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest

from checkpoint.proto import snapshot_pb2 as pb
from checkpoint.snapshot_client import commit_group
from checkpoint.snapshot_commands import missing_stripes, verify
from checkpoint.snapshot_group import GroupPlan
from checkpoint.snapshot_store import unlink_segments
from tests.conftest import REPO, rank_env
from tests.test_snapshot_daemon import Daemon, buffers_of, segment_of, step_state, unique_job, wait_for

UNKNOWN = "127.0.0.1:0"
"""A peer's address before it is known: every daemon binds port 0 and prints the port it got."""


class Group:
    """`nodes` daemons, two ranks each (node i holds ranks 2i and 2i+1), with `parity` parity.
    Each binds port 0; once all have printed their addresses, the group is told them
    (SetPeers), as a launcher would, and so are the survivors when a replacement starts."""

    def __init__(self, tmp_path, nodes: int, parity: int, settings: list[str] = (), announce: bool = True):
        self.tmp_path, self.parity, self.settings = tmp_path, parity, list(settings)
        self.job, self.token_file = unique_job(), tmp_path / "job.token"
        self.killed: set[int] = set()  # nodes whose daemon the test killed
        self.peers = [UNKNOWN] * nodes
        self.daemons = [self._start(n) for n in range(nodes)]
        for daemon in self.daemons:
            daemon.address = daemon.printed_address()
        self.peers = [d.address for d in self.daemons]
        if announce:
            self.announce()

    def _start(self, node: int) -> Daemon:
        peers = [*self.peers[:node], UNKNOWN, *self.peers[node + 1 :]]  # its own: the port it will bind
        extra = ["--node", str(node), "--peers", ",".join(peers), "--set", f"snapshot.parity={self.parity}"]
        for setting in self.settings:
            extra += ["--set", setting]
        ranks = f"{2 * node},{2 * node + 1}"
        return Daemon(self.tmp_path, ranks=ranks, job=self.job, extra=extra, token_file=self.token_file, wait=False)

    def announce(self) -> None:
        """Every live daemon learns every daemon's address."""
        for daemon in self.daemons:
            if daemon.process.poll() is None:
                daemon.client().set_peers(self.peers)
                assert list(daemon.client().status().peers) == self.peers

    def deliver(self, node: int, step: int, size: int) -> None:
        client = self.daemons[node].client()
        for rank in (2 * node, 2 * node + 1):
            client.deliver(step, rank, buffers_of(rank, step, size + 4096 * rank))  # shares of unequal size

    def deliver_and_commit(self, step: int, size: int) -> None:
        for node in range(len(self.daemons)):
            self.deliver(node, step, size)
        commit_group([d.client() for d in self.daemons], step)

    def expect_held(self, node: int, step: int, size: int) -> None:
        """Node `node` serves its ranks' buffers of `step`, byte-identical, and verifies them."""
        client = self.daemons[node].client()
        for rank in (2 * node, 2 * node + 1):
            expected = {k: v.tobytes() for k, v in buffers_of(rank, step, size + 4096 * rank).items()}
            assert client.fetch(step, rank) == expected, f"rank {rank} of step {step}"
        assert client.verify(step).ok

    def kill(self, node: int) -> None:
        self.daemons[node].kill()
        self.killed.add(node)

    def replace(self, node: int, announce: bool = True) -> Daemon:
        """A fresh daemon for lost node `node`, at the new port it binds."""
        daemon = self.daemons[node] = self._start(node)
        daemon.address = self.peers[node] = daemon.printed_address()
        if announce:
            self.announce()
        return daemon

    def parity_restored(self, node: int, step: int) -> None:
        """Wait until a replacement holds again the parity it held of `step` (it recomputes
        that after its rebuild answered); only then may the group lose another node."""
        client = self.daemons[node].client()
        wait_for(lambda: missing_stripes(client, step) == [], f"node {node}'s parity of step {step}")

    def stop(self):
        """Stop every daemon, then fail naming each that died unexpectedly, with its output."""
        errors = []
        for d in self.daemons:
            if d.process.poll() is None:
                d.process.send_signal(signal.SIGCONT)  # a test that stalled one may have failed
            try:
                d.stop()
            except AssertionError as e:
                errors.append(str(e))
        for node in self.killed:  # what they left (shared memory outlives them), as a launcher would
            unlink_segments(self.job, node)
        assert not errors, "\n".join(errors)


def test_a_group_on_port_0_learns_its_addresses_before_ranks_deliver(tmp_path):
    group = Group(tmp_path, 4, 1, announce=False)
    try:
        client = group.daemons[2].client()
        assert list(client.status().peers) == [UNKNOWN, UNKNOWN, group.peers[2], UNKNOWN]  # its own is known
        with pytest.raises(grpc.RpcError) as refused:  # its blocks could not reach their parity holders
            client.deliver(1, 4, buffers_of(4, 1))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "nodes [0, 1, 3] are not known yet" in refused.value.details()
        for wrong in (group.peers[:3], [*group.peers[:3], UNKNOWN], [*group.peers[:3], "nohost"]):
            with pytest.raises(grpc.RpcError) as refused:
                client.set_peers(wrong)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        group.announce()
        group.deliver_and_commit(1, 1 << 16)
        for node in range(4):
            group.expect_held(node, 1, 1 << 16)
    finally:
        group.stop()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("nodes,parity", [(2, 1), (4, 1), (6, 2)])
def test_any_m_killed_daemons_are_rebuilt_byte_identically(tmp_path, nodes, parity):
    group = Group(tmp_path, nodes, parity)
    try:
        group.deliver_and_commit(1, 1 << 18)
        group.deliver_and_commit(2, 1 << 18)
        for lost in itertools.combinations(range(nodes), parity):  # every set of m nodes
            for node in lost:
                group.kill(node)
            for node in lost:  # a replacement per lost node, rebuilt from the survivors
                replacement = group.replace(node)
                reply = replacement.client().rebuild()
                assert reply.step == 2
            for node in lost:
                group.parity_restored(node, 2)
            for node, daemon in enumerate(group.daemons):
                assert [s.step for s in daemon.client().list()] == [2]
                group.expect_held(node, 2, 1 << 18)
            code, rows = verify([d.client() for d in group.daemons], 2, parity)  # the parity recomputed too
            assert code == 0, rows
        group.deliver_and_commit(3, 1 << 18)  # the rebuilt daemons hold parity again
        assert all([s.step for s in d.client().list()] == [3] for d in group.daemons)
    finally:
        group.stop()


def test_the_block_port_refuses_strangers_and_garbage_and_keeps_serving(tmp_path):
    """The blocks travel on a plain TCP port: it must hold to the same job token as gRPC,
    answer garbage with a refusal, and serve the group afterwards as before."""
    import socket
    import struct

    from checkpoint.block_transport import BlockRefused, get_block, read_frame
    from checkpoint.erasure import stripes

    group = Group(tmp_path, 3, 1)
    own = next(s.index for s in stripes(3, 1) if 0 in s.data_nodes)  # a stripe node 0 holds data of
    try:
        group.deliver_and_commit(1, 1 << 16)
        client = group.daemons[0].client()
        address = f"127.0.0.1:{client.status().block_port}"
        good = {"step": 1, "stripe": own, "parity": False, "job": group.job, "token": client.token}
        refusals = [
            ({**good, "token": "x" * 64}, "unauthenticated"),
            ({**good, "job": "another-job"}, "permission"),
            ({**good, "stripe": 99}, "invalid"),
            ({**good, "step": 7}, "not_found"),
        ]
        for request, kind in refusals:
            with pytest.raises(BlockRefused) as refused:
                get_block(address, request, timeout_s=30)
            assert refused.value.kind == kind, str(refused.value)
        for garbage in (b"\xff\xff\xff\xff", struct.pack("!I", 5) + b"[1,2]", b"", struct.pack("!I", 100) + b"{"):
            with socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])), timeout=30) as conn:
                conn.sendall(garbage)
                conn.shutdown(socket.SHUT_WR)
                try:
                    assert read_frame(conn)["ok"] is False
                except ConnectionError:
                    pass  # a frame cut short: the daemon closed without an answer
        data, meta = get_block(address, good, timeout_s=30)
        assert data.size > 0 and meta["segments"][0]["rank"] == 0
        group.kill(1)  # and a rebuild still gathers its blocks
        assert group.replace(1).client().rebuild().step == 1
        group.expect_held(1, 1, 1 << 16)
    finally:
        group.stop()


def test_a_group_step_is_not_ready_until_every_parity_block_is_in(tmp_path):
    group = Group(tmp_path, 4, 1)
    try:
        group.deliver_and_commit(1, 1 << 16)
        clients = [d.client() for d in group.daemons]
        group.deliver(0, 2, 1 << 16)  # node 0 delivers; nodes 1-3 do not
        sent = wait_for(
            lambda: (s := step_state(clients[0], 2)).phase != pb.PHASE_ENCODING and s,
            "node 0 to stream its blocks of step 2",
        )
        assert (sent.blocks_sent, sent.blocks_to_send, sent.encode_error) == (3, 3, "")
        # Node 0 holds the parity of stripe 0, whose data nodes 1-3 did not deliver.
        assert sent.phase == pb.PHASE_AWAITING_PARITY and list(sent.missing_stripes) == [0]
        reply = clients[0].commit(2, prepare=True)
        assert not reply.ready and list(reply.missing_stripes) == [0]
        assert not clients[0].commit(2).committed
        for node in (1, 2, 3):  # each holds node 0's block of its stripe, and nothing else of step 2
            held = step_state(clients[node], 2)
            assert (held.phase, list(held.reserved_ranks), list(held.missing_stripes)) == (
                pb.PHASE_DELIVERING,
                [],
                [node],
            )
        assert list(clients[1].commit(2, prepare=True).missing_ranks) == [2, 3]
        assert all([s.step for s in c.list()] == [1] for c in clients)
    finally:
        group.stop()


def node_1_sends_to() -> list[tuple[int, int]]:
    """(parity holder, stripe) of each block node 1 streams, in its order (4 nodes, parity 1)."""
    plan = GroupPlan(1, [UNKNOWN] * 4, 1)
    return [(holder, stripe.index) for stripe in plan.data_stripes(1) for holder in stripe.parity_nodes]


def test_a_daemon_killed_while_encoding_loses_no_committed_snapshot(tmp_path):
    """Node 1 is SIGKILLed while it streams its blocks of step 2 to their parity holders: two
    of its three are in, the third is under way to a holder that stalls (SIGSTOP), so that
    the kill lands in that phase by construction, whatever the machine's load. Every survivor
    keeps step 1, the stalled holder can never complete step 2, node 1's replacement rebuilds
    step 1 byte-identically, and the group commits again."""
    # The calls to a stalled or lost peer must outlast this test's waits, not end within them.
    group = Group(tmp_path, 4, 1, settings=["snapshot.deadline_s=600"])
    blocks = node_1_sends_to()
    (first, first_stripe), (stalled, stalled_stripe) = blocks[0], blocks[-1]
    try:
        group.deliver_and_commit(1, 1 << 20)
        clients = [d.client() for d in group.daemons]
        for node in (0, 2, 3):
            group.deliver(node, 2, 8 << 20)
        group.daemons[stalled].process.send_signal(signal.SIGSTOP)
        try:
            group.deliver(1, 2, 8 << 20)
            encoding = wait_for(
                lambda: (s := step_state(clients[1], 2)).blocks_sent == len(blocks) - 1 and s,
                f"node 1 to stream its blocks of step 2 but the one to node {stalled}",
            )
            assert (encoding.phase, encoding.blocks_to_send, encoding.encode_error) == (pb.PHASE_ENCODING, 3, "")
            group.kill(1)
        finally:
            group.daemons[stalled].process.send_signal(signal.SIGCONT)
        for node in (0, 2, 3):
            assert [s.step for s in clients[node].list()] == [1]
        # Node 1's block for the stalled holder never arrived whole: step 2 can never commit.
        reply = clients[stalled].commit(2, prepare=True)
        assert not reply.ready and list(reply.missing_stripes) == [stalled_stripe]
        # Its first block did: with the others' (the stalled one resumed), that parity is whole.
        wait_for(
            lambda: step_state(clients[first], 2).phase == pb.PHASE_READY,
            f"node {first} to hold the parity of stripe {first_stripe}, node 1's block included",
        )
        assert group.replace(1).client().rebuild().step == 1
        for node in range(4):
            group.expect_held(node, 1, 1 << 20)
        group.deliver_and_commit(3, 1 << 20)
        assert all([s.step for s in c.list()] == [3] for c in [d.client() for d in group.daemons])
    finally:
        group.stop()


@pytest.mark.timeout(900)
def test_the_operator_commands_see_verify_fetch_and_drop_snapshots(tmp_path):
    group = Group(tmp_path, 4, 1)
    try:
        group.deliver_and_commit(1, 1 << 16)
        base = [
            sys.executable,
            "-m",
            "launcher.cli",
            "snapshot",
            "--job",
            group.job,
            "--daemons",
            ",".join(group.peers),
        ]
        base += ["--token-file", str(tmp_path / "job.token")]

        def stalwart(*args, json_out=True):
            done = subprocess.run(
                [*base, *(["--json"] if json_out else []), *args],
                cwd=REPO,
                env=rank_env(1),
                capture_output=True,
                text=True,
                timeout=120,
            )
            parsed = json_out and done.stdout.startswith("[")
            return done.returncode, (json.loads(done.stdout) if parsed else done.stdout + done.stderr)

        code, rows = stalwart("status")
        assert code == 0 and [r["snapshots"] for r in rows] == [[1]] * 4
        code, text = stalwart("ls", json_out=False)
        assert code == 0 and "step" in text.splitlines()[0] and text.splitlines()[1].startswith("1 ")
        code, rows = stalwart("verify", "1")
        assert code == 0 and rows[0]["ok"]
        out = tmp_path / "rank5.npz"
        code, rows = stalwart("fetch", "1", "--rank", "5", "--out", str(out))
        assert code == 0
        with np.load(out) as saved:
            for name, value in buffers_of(5, 1, (1 << 16) + 4096 * 5).items():
                assert saved[name].tobytes() == value.tobytes()
        # A flipped byte in node 2's memory: verify names it and exits 1.
        segment = segment_of(group.daemons[2].client(), step=1, rank=4)
        flip_byte(f"/dev/shm/{segment}", 100)
        code, rows = stalwart("verify", "1")
        assert code == 1 and any("rank 4" in p and "checksum mismatch" in p for p in rows[0]["problems"]), rows
        flip_byte(f"/dev/shm/{segment}", 100)  # restored: a rebuild from a corrupt survivor is refused
        group.kill(3)
        code, rows = stalwart("status")
        assert code == 1 and rows[3] == {"node": 3, "reachable": False}
        group.replace(3, announce=False)  # at a new port, which the survivors learn from set-peers
        base[base.index("--daemons") + 1] = ",".join(group.peers)
        code, rows = stalwart("set-peers")
        assert code == 0 and [r["told"] for r in rows] == [True] * 4, rows
        assert all(list(d.client().status().peers) == group.peers for d in group.daemons)
        code, rows = stalwart("rebuild", "--node", "3")
        assert code == 0 and rows[0]["step"] == 1 and rows[0]["parity_s"] >= rows[0]["share_s"], rows
        code, rows = stalwart("verify", "1")  # the replacement's share and its recomputed parity
        assert code == 0, rows
        code, rows = stalwart("drop", "1")
        assert code == 0 and rows[0]["dropped_on"] == [0, 1, 2, 3]
        code, rows = stalwart("ls")
        assert code == 0 and rows == []
        code, _ = stalwart("status", json_out=False)
        assert code == 0
        wrong = tmp_path / "wrong.token"
        wrong.write_text("y" * 64)
        wrong.chmod(0o600)
        base[base.index("--token-file") + 1] = str(wrong)
        code, text = stalwart("ls", json_out=False)
        assert code == 2 and "UNAUTHENTICATED" in text
    finally:
        group.stop()


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_survivor_stands_in_for_a_lost_node_on_request(tmp_path):
    """No replacement machine: node 0 rebuilds lost node 1's share and serves ranks 2 and 3."""
    group = Group(tmp_path, 4, 1)
    try:
        group.deliver_and_commit(1, 1 << 18)
        group.kill(1)
        survivor = group.daemons[0].client()
        assert survivor.rebuild(1).step == 1
        for rank in (2, 3):
            expected = {k: v.tobytes() for k, v in buffers_of(rank, 1, (1 << 18) + 4096 * rank).items()}
            assert survivor.fetch(1, rank) == expected
        assert list(next(iter(survivor.list())).ranks) == [0, 1, 2, 3]
        assert survivor.verify(1).ok
    finally:
        group.stop()


def test_a_crash_between_the_two_commit_phases_still_rebuilds_the_step_some_committed(tmp_path):
    """Step 2 is ready everywhere but committed only on nodes 0 and 1 when node 0 dies: the
    replacement rebuilds step 2, which the others still hold whole."""
    group = Group(tmp_path, 4, 1)
    try:
        group.deliver_and_commit(1, 1 << 16)
        clients = [d.client() for d in group.daemons]
        for node in range(4):
            group.deliver(node, 2, 1 << 16)
        wait_for(lambda: all(step_state(c, 2).phase == pb.PHASE_READY for c in clients), "step 2 ready everywhere")
        for client in clients[:2]:  # phase two reaches nodes 0 and 1 only
            assert client.commit(2).committed
        group.kill(0)
        replacement = group.replace(0)
        assert replacement.client().rebuild().step == 2
        group.expect_held(0, 2, 1 << 16)
    finally:
        group.stop()


def test_a_block_get_or_read_given_up_before_its_first_piece_still_unpins_its_step():
    """A data block is sent straight from its pinned segments. A peer that hangs up before the
    first piece goes out (the block port then closes the pieces unstarted) must not leave the
    step pinned: a pinned step is never dropped, and its memory would be lost to the run."""
    from types import SimpleNamespace

    from checkpoint.daemon import Servicer
    from checkpoint.snapshot_store import BufferInfo, SnapshotError, SnapshotStore
    from tests.test_snapshot_daemon import segments_of

    job, page = unique_job(), 4096
    group = GroupPlan(0, ["127.0.0.1:1", "127.0.0.1:2"], parity=1)  # node 1's mirror is held here
    store = SnapshotStore(job, 0, [0, 1], memory_limit=1 << 24, group=group)
    servicer = Servicer(store)
    try:
        for rank in (0, 1):
            store.reserve(1, rank, page)
            value = np.full(page, rank + 1, np.uint8)
            store.steps[1].segments[rank].shm.buf[:page] = value.tobytes()  # as a rank would
            store.settle(store.receive(1, rank, [BufferInfo("x", 0, page, 0)]))
        mirror = next(s.index for s in group.stripes if 0 in s.parity_nodes)
        chunk = SimpleNamespace(step=1, stripe=mirror, source=1, offset=0, block_bytes=page, data=bytes(page), meta="")
        store.add_parity(chunk)
        assert store.commit(1) == ([], [])
        own = {"step": 1, "stripe": next(s.index for s in group.stripes if 0 in s.data_nodes)}

        _, _, pieces = servicer.block(own)
        assert store.pins == {1: 1}
        pieces.close()
        assert store.pins == {}
        _, size, pieces = servicer.block(own)  # sent whole: unpinned once the last piece is out
        assert sum(len(p) for p in pieces) == size == 2 * page and store.pins == {}
        # The same for a read of a rank's bytes (a restore on another node), which also
        # refuses a range past the segment without leaving the step pinned.
        read = {"step": 1, "rank": 1, "offset": 100, "nbytes": 50}
        _, size, pieces = servicer.read(read)
        assert store.pins == {1: 1}
        pieces.close()
        _, size, pieces = servicer.read(read)
        assert b"".join(pieces) == bytes([2]) * 50 and store.pins == {}
        with pytest.raises(SnapshotError, match=f"bytes {page - 10}..{page + 40} lie outside rank 1's {page}"):
            servicer.read({**read, "offset": page - 10})
        assert store.pins == {}
    finally:
        store.close()
    assert segments_of(job) == []

"""Erasure coding across several snapshot daemons on loopback: losing nodes loses nothing."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from checkpoint.snapshot_client import commit_group
from tests.conftest import REPO, rank_env
from tests.test_snapshot_daemon import JOB, Daemon, buffers_of


def free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Group:
    """`nodes` daemons, two ranks each (node i holds ranks 2i and 2i+1), with `parity` parity."""

    def __init__(self, tmp_path, nodes: int, parity: int):
        self.tmp_path, self.parity = tmp_path, parity
        self.peers = [f"127.0.0.1:{p}" for p in free_ports(nodes)]
        self.daemons = [self._start(n) for n in range(nodes)]

    def _start(self, node: int) -> Daemon:
        listen = self.peers[node]
        return Daemon(
            self.tmp_path,
            ranks=f"{2 * node},{2 * node + 1}",
            extra=["--node", str(node), "--peers", ",".join(self.peers), "--set", f"snapshot.parity={self.parity}"],
            listen=listen,
            token_file=self.tmp_path / "job.token",
        )

    def deliver_and_commit(self, step: int, size: int) -> None:
        for node, daemon in enumerate(self.daemons):
            client = daemon.client()
            for rank in (2 * node, 2 * node + 1):
                client.deliver(step, rank, buffers_of(rank, step, size + 4096 * rank))  # shares of unequal size
        commit_group([d.client() for d in self.daemons], step)

    def kill(self, node: int) -> None:
        self.daemons[node].process.send_signal(signal.SIGKILL)
        self.daemons[node].process.wait()

    def replace(self, node: int) -> Daemon:
        self.daemons[node] = self._start(node)
        return self.daemons[node]

    def stop(self):
        for d in self.daemons:
            d.stop()


@pytest.mark.parametrize("nodes,parity", [(4, 1), (6, 2)])
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
            for node, daemon in enumerate(group.daemons):
                client = daemon.client()
                assert [s.step for s in client.list()] == [2]
                for rank in (2 * node, 2 * node + 1):
                    expected = {k: v.tobytes() for k, v in buffers_of(rank, 2, (1 << 18) + 4096 * rank).items()}
                    assert client.fetch(2, rank) == expected, f"rank {rank} after losing nodes {lost}"
                assert client.verify(2).ok
        group.deliver_and_commit(3, 1 << 18)  # the rebuilt daemons hold parity again
        assert all([s.step for s in d.client().list()] == [3] for d in group.daemons)
    finally:
        group.stop()


def test_a_group_step_is_not_ready_until_every_parity_block_is_in(tmp_path):
    group = Group(tmp_path, 4, 1)
    try:
        group.deliver_and_commit(1, 1 << 16)
        clients = [d.client() for d in group.daemons]
        for rank in (0, 1):  # node 0 delivers; nodes 1-3 do not
            clients[0].deliver(2, rank, buffers_of(rank, 2))
        time.sleep(0.5)  # its blocks are sent
        reply = clients[0].commit(2, prepare=True)
        assert not reply.ready and list(reply.missing_stripes), "node 0 holds parity of nodes that did not deliver"
        assert not clients[0].commit(2).committed
        assert list(clients[1].commit(2, prepare=True).missing_ranks) == [2, 3]
        assert all([s.step for s in c.list()] == [1] for c in clients)
    finally:
        group.stop()


def test_a_daemon_killed_while_encoding_loses_no_committed_snapshot(tmp_path):
    """Node 1 dies while the group encodes step 2: every node's step 1 survives, and node 1's
    replacement rebuilds its share of step 1 byte-identically."""
    group = Group(tmp_path, 4, 1)
    try:
        group.deliver_and_commit(1, 1 << 20)
        clients = [d.client() for d in group.daemons]
        for node, client in enumerate(clients):
            for rank in (2 * node, 2 * node + 1):
                client.deliver(2, rank, buffers_of(rank, 2, 8 << 20))
            if node == 1:  # its blocks are on their way to the parity holders
                group.kill(1)
        time.sleep(1.0)
        for node, client in enumerate(clients):
            if node != 1:  # step 2 can never complete: node 1's blocks and parity are gone
                assert [s.step for s in client.list()] == [1]
                assert not client.commit(2, prepare=True).ready
        assert group.replace(1).client().rebuild().step == 1
        for node, daemon in enumerate(group.daemons):
            client = daemon.client()
            for rank in (2 * node, 2 * node + 1):
                expected = {k: v.tobytes() for k, v in buffers_of(rank, 1, (1 << 20) + 4096 * rank).items()}
                assert client.fetch(1, rank) == expected
    finally:
        group.stop()


def test_the_operator_commands_see_verify_fetch_and_drop_snapshots(tmp_path):
    group = Group(tmp_path, 4, 1)
    try:
        group.deliver_and_commit(1, 1 << 16)
        base = [sys.executable, "-m", "launcher.cli", "snapshot", "--job", JOB, "--daemons", ",".join(group.peers)]
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
        segment = next(n for n in os.listdir("/dev/shm") if n.startswith(f"stalwart-{JOB}-n2-s1-r4-"))
        flip_byte(f"/dev/shm/{segment}", 100)
        code, rows = stalwart("verify", "1")
        assert code == 1 and any("rank 4" in p and "checksum mismatch" in p for p in rows[0]["problems"]), rows
        flip_byte(f"/dev/shm/{segment}", 100)  # restored: a rebuild from a corrupt survivor is refused
        group.kill(3)
        code, rows = stalwart("status")
        assert code == 1 and rows[3] == {"node": 3, "reachable": False}
        group.replace(3)
        code, rows = stalwart("rebuild", "--node", "3")
        assert code == 0 and rows[0]["step"] == 1, rows
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
        for node, client in enumerate(clients):
            for rank in (2 * node, 2 * node + 1):
                client.deliver(2, rank, buffers_of(rank, 2))
        deadline = time.monotonic() + 30
        while not all(c.commit(2, prepare=True).ready for c in clients):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for client in clients[:2]:  # phase two reaches nodes 0 and 1 only
            assert client.commit(2).committed
        group.kill(0)
        replacement = group.replace(0).client()
        assert replacement.rebuild().step == 2
        for rank in (0, 1):
            assert replacement.fetch(2, rank) == {k: v.tobytes() for k, v in buffers_of(rank, 2).items()}
    finally:
        group.stop()

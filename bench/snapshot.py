"""In-memory snapshots against memory copies, fsync'd files and file reads, side by side.

usage: python bench/snapshot.py [--quick]

1. Erasure codes: XOR parity (3 + 1) and Reed-Solomon (4 + 2, on every core) encoding and
   decoding the same bytes a plain memory copy moves.
2. Two rank processes deliver their buffers to a real daemon and commit, against writing the
   same bytes to a file with fsync.
3. Four daemons with XOR parity: one is SIGKILLed and a replacement rebuilds its share from
   the others, against reading the same bytes from a local file.

Prints a table, then one JSON line with xor_vs_memcpy, rs_vs_memcpy, commit_vs_fsync,
rebuild_vs_file_read (each a ratio of throughputs or of times, as its row says).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from checkpoint.erasure import make_code  # noqa: E402


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def code_throughputs(total: int) -> dict:
    """GB/s of memcpy, and of encoding and decoding `total` data bytes with each code."""
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, total, dtype=np.uint8)
    target = np.zeros_like(source)
    out = {"memcpy": total / best_of(lambda: np.copyto(target, source)) / 1e9}
    for name, k, m in (("xor", 3, 1), ("rs", 4, 2)):
        code = make_code(k, m, threads=os.cpu_count() or 1)
        data = list(source[: total // k * k].reshape(k, -1))
        parity = [np.zeros(data[0].size, np.uint8) for _ in range(m)]
        out[f"{name}_encode"] = total / best_of(lambda: code.encode(data, parity)) / 1e9  # noqa: B023
        blocks = data + parity
        present = {p: b for p, b in enumerate(blocks) if p >= m}  # the first m data blocks lost
        lost = {p: np.zeros(data[0].size, np.uint8) for p in range(m)}
        out[f"{name}_decode"] = total / best_of(lambda: code.decode(present, lost)) / 1e9  # noqa: B023
        for p in range(m):
            assert np.array_equal(lost[p], blocks[p])
    return out


def start_daemon(tmp: Path, token: Path, node: int, ranks: str, memory_mb: int, peers=None, listen="127.0.0.1:0"):
    command = [sys.executable, "-m", "checkpoint.daemon", "--job", "bench", "--node", str(node), "--ranks", ranks]
    command += ["--set", f"snapshot.listen={listen}", "--set", f"snapshot.memory_mb={memory_mb}"]
    command += ["--set", f"snapshot.token_file={token}", "--set", "snapshot.deadline_s=600"]
    if peers:
        command += ["--peers", ",".join(peers)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, env=_env())
    line = process.stdout.readline()
    return process, line.rsplit(" ", 1)[-1].strip()


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


RANK_SCRIPT = """
import sys, time, numpy as np
from checkpoint.snapshot_client import SnapshotClient
address, token, rank, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
buffers = {f"b{i}": np.full(nbytes // 8, i + rank, np.uint8) for i in range(8)}
client = SnapshotClient(address, "bench", token, deadline_s=600)
print("ready", flush=True)
sys.stdin.readline()
client.deliver(1, rank, buffers)
print("done", flush=True)
"""


def commit_latency(tmp: Path, token_file: Path, total: int) -> dict:
    from checkpoint.daemon import read_token
    from checkpoint.snapshot_client import SnapshotClient

    daemon, address = start_daemon(tmp, token_file, 0, "0,1", memory_mb=(total >> 20) * 2 + 64)
    token = read_token(token_file)
    try:
        script = tmp / "rank.py"
        script.write_text(RANK_SCRIPT)
        ranks = [
            subprocess.Popen(
                [sys.executable, str(script), address, token, str(r), str(total // 2)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=_env(),
            )
            for r in (0, 1)
        ]
        for r in ranks:
            assert r.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        for r in ranks:
            r.stdin.write("go\n")
            r.stdin.flush()
        for r in ranks:
            assert r.stdout.readline().strip() == "done"
        client = SnapshotClient(address, "bench", token, deadline_s=600)
        assert client.commit(1).committed
        snapshot_s = time.perf_counter() - start
        for r in ranks:
            r.wait()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
    data = np.full(total, 7, np.uint8)
    path = tmp / "file.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())
    fsync_s = time.perf_counter() - start
    path.unlink()
    return {"snapshot_commit_s": snapshot_s, "file_fsync_s": fsync_s}


def rebuild_time(tmp: Path, token_file: Path, per_rank: int) -> dict:
    import socket

    from checkpoint.daemon import read_token
    from checkpoint.snapshot_client import SnapshotClient, commit_group

    token = read_token(token_file)
    sockets = [socket.socket() for _ in range(4)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    peers = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    memory_mb = (per_rank * 4 >> 20) + 64
    daemons = [start_daemon(tmp, token_file, n, str(n), memory_mb, peers, peers[n])[0] for n in range(4)]
    try:
        clients = [SnapshotClient(a, "bench", token, deadline_s=600) for a in peers]
        rng = np.random.default_rng(1)
        for n, client in enumerate(clients):
            client.deliver(1, n, {"state": rng.integers(0, 256, per_rank, dtype=np.uint8)})
        commit_group(clients, 1, timeout_s=600)
        expected = clients[2].fetch(1, 2)
        daemons[2].send_signal(signal.SIGKILL)
        daemons[2].wait()
        daemons[2] = start_daemon(tmp, token_file, 2, "2", memory_mb, peers, peers[2])[0]
        replacement = SnapshotClient(peers[2], "bench", token, deadline_s=600)
        start = time.perf_counter()
        replacement.rebuild()
        rebuild_s = time.perf_counter() - start
        assert replacement.fetch(1, 2) == expected, "the rebuilt share differs"
    finally:
        for d in daemons:
            d.send_signal(signal.SIGTERM)
            d.wait()
    path = tmp / "share.bin"
    path.write_bytes(expected["state"])
    read_s = best_of(lambda: path.read_bytes(), 3)
    return {"rebuild_s": rebuild_s, "file_read_s": read_s, "rebuilt_bytes": per_rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller buffers")
    args = parser.parse_args()
    from tqdm import tqdm

    from checkpoint.daemon import write_token

    code_bytes = (64 if args.quick else 256) << 20
    commit_bytes = (256 if args.quick else 1024) << 20
    rebuild_bytes = (32 if args.quick else 128) << 20
    with tempfile.TemporaryDirectory(prefix="stalwart-bench-") as tmp_name, tqdm(total=3, unit="phase") as bar:
        tmp = Path(tmp_name)
        token = tmp / "token"
        write_token(token)
        codes = code_throughputs(code_bytes)
        bar.update(1)
        commit = commit_latency(tmp, token, commit_bytes)
        bar.update(1)
        rebuilt = rebuild_time(tmp, token, rebuild_bytes)
        bar.update(1)
    report(codes, commit, rebuilt, code_bytes, commit_bytes)


def report(codes: dict, commit: dict, rebuilt: dict, code_bytes: int, commit_bytes: int) -> None:
    figures = {
        "xor_vs_memcpy": min(codes["xor_encode"], codes["xor_decode"]) / codes["memcpy"],
        "rs_vs_memcpy": min(codes["rs_encode"], codes["rs_decode"]) / codes["memcpy"],
        "commit_vs_fsync": commit["snapshot_commit_s"] / commit["file_fsync_s"],
        "rebuild_vs_file_read": rebuilt["rebuild_s"] / rebuilt["file_read_s"],
    }
    rows = [
        (f"memory copy of {code_bytes >> 20} MiB (GB/s)", f"{codes['memcpy']:.2f}", ""),
        ("XOR 3+1 encode / decode (GB/s)", f"{codes['xor_encode']:.2f} / {codes['xor_decode']:.2f}", ""),
        ("  xor_vs_memcpy (slower of the two)", f"{figures['xor_vs_memcpy']:.3f}", "target >= 0.8"),
        ("Reed-Solomon 4+2 encode / decode (GB/s)", f"{codes['rs_encode']:.2f} / {codes['rs_decode']:.2f}", ""),
        ("  rs_vs_memcpy (slower of the two)", f"{figures['rs_vs_memcpy']:.3f}", "target >= 0.25"),
        (f"deliver + commit {commit_bytes >> 20} MiB from 2 ranks (s)", f"{commit['snapshot_commit_s']:.3f}", ""),
        ("write + fsync the same bytes to a file (s)", f"{commit['file_fsync_s']:.3f}", ""),
        ("  commit_vs_fsync (time)", f"{figures['commit_vs_fsync']:.3f}", "lower is better"),
        (f"rebuild a lost node's {rebuilt['rebuilt_bytes'] >> 20} MiB share (s)", f"{rebuilt['rebuild_s']:.3f}", ""),
        ("read the same bytes from a local file (s)", f"{rebuilt['file_read_s']:.3f}", ""),
        ("  rebuild_vs_file_read (time)", f"{figures['rebuild_vs_file_read']:.3f}", "lower is better"),
    ]
    print()
    for name, value, target in rows:
        print(f"{name:<48}{value:>16}  {target}")
    print(json.dumps({key: round(value, 4) for key, value in figures.items()}))


if __name__ == "__main__":
    main()

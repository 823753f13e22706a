"""In-memory snapshots against memory copies, fsync'd files and file reads, side by side.

usage: python bench/snapshot.py [--quick]

1. Erasure codes: XOR parity (3 + 1) and Reed-Solomon (4 + 2, given every core) encoding and
   decoding the same bytes a memory copy moves, the copy split over as many threads as the
   code runs on; runs in turn, medians.
2. Two rank processes deliver their buffers to a real daemon and commit, against the same two
   processes each writing its half to a file with fsync; five of each in turn, medians.
3. Four daemons with XOR parity: one is SIGKILLed and a replacement rebuilds its share from
   the others (and then the parity it held), against reading the same bytes from a local file.

Prints a table, then one JSON line with xor_vs_memcpy, rs_vs_memcpy_same_threads,
commit_vs_parallel_fsync, rebuild_vs_file_read, parity_restored_vs_file_read (each a ratio of
throughputs or of times, as its row says).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from checkpoint.erasure import ALIGN, make_code  # noqa: E402

CODE_REPEATS = 7
COMMIT_REPEATS = 5
REBUILD_REPEATS = 3


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def medians_in_turn(runs: dict[str, Callable[[], None]], repeats: int, untimed=None) -> dict[str, float]:
    """Median seconds of each run, all run in turn (the order reversed every other round),
    so that a machine getting slower or faster weighs on every run alike. `untimed` may map
    a run's name to set-up done before each of its runs, outside the timing."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats):
        names = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in names:
            if untimed and name in untimed:
                untimed[name]()
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def copy_on_threads(target: np.ndarray, source: np.ndarray, threads: int) -> None:
    """np.copyto split into `threads` ranges on a pool of `threads`, as the codes split their
    work (numpy releases the GIL while it copies), so the baseline gets the same cores."""
    if threads == 1:
        np.copyto(target, source)
        return
    cuts = [source.size * i // threads // ALIGN * ALIGN for i in range(threads)] + [source.size]

    def copy_range(i: int) -> None:
        np.copyto(target[cuts[i] : cuts[i + 1]], source[cuts[i] : cuts[i + 1]])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(copy_range, range(threads)))


def code_throughputs(total: int) -> dict:
    """GB/s of encoding and decoding `total` data bytes with each code, and of copying them on
    as many threads as each code runs on."""
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, total, dtype=np.uint8)
    target = np.zeros_like(source)
    runs, threads, checks = {}, {}, []
    for name, k, m in (("xor", 3, 1), ("rs", 4, 2)):
        code = make_code(k, m, threads=os.cpu_count() or 1)
        data = list(source[: total // k * k].reshape(k, -1))
        parity = [np.zeros(data[0].size, np.uint8) for _ in range(m)]
        blocks = data + parity
        present = {p: b for p, b in enumerate(blocks) if p >= m}  # the first m data blocks lost
        lost = {p: np.zeros(data[0].size, np.uint8) for p in range(m)}
        runs[f"{name}_encode"] = lambda code=code, data=data, parity=parity: code.encode(data, parity)
        runs[f"{name}_decode"] = lambda code=code, present=present, lost=lost: code.decode(present, lost)
        threads[name] = code.threads_for(data[0].size)
        checks.append((lost, blocks))
    for count in sorted(set(threads.values())):
        runs[f"memcpy_{count}"] = lambda count=count: copy_on_threads(target, source, count)
    seconds = medians_in_turn(runs, CODE_REPEATS)  # the first round encodes before it decodes
    for lost, blocks in checks:
        for p, block in lost.items():
            assert np.array_equal(block, blocks[p]), "a decoded block differs"
    assert np.array_equal(target, source), "the copy differs"
    out = {name: total / s / 1e9 for name, s in seconds.items()}
    return out | {f"{name}_threads": count for name, count in threads.items()}


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
import os, sys, numpy as np
from checkpoint.snapshot_client import SnapshotClient
address, token, rank, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
buffers = {f"b{i}": np.full(nbytes // 8, i + rank, np.uint8) for i in range(8)}
client = SnapshotClient(address, "bench", token, deadline_s=600)
print("ready", flush=True)
for line in sys.stdin:  # "deliver STEP" or "file PATH", each answered "done"
    verb, argument = line.split()
    if verb == "deliver":
        client.deliver(int(argument), rank, buffers)
    else:
        with open(argument, "wb") as f:
            f.writelines(memoryview(b) for b in buffers.values())
            f.flush()
            os.fsync(f.fileno())
    print("done", flush=True)
"""


def start_ranks(tmp: Path, address: str, token: str, total: int) -> list[subprocess.Popen]:
    """Two rank processes, each holding half of `total` bytes, waiting for commands."""
    script = tmp / "rank.py"
    script.write_text(RANK_SCRIPT)
    command = [sys.executable, str(script), address, token]
    ranks = [
        subprocess.Popen(
            [*command, str(r), str(total // 2)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env()
        )
        for r in (0, 1)
    ]
    for r in ranks:
        assert r.stdout.readline().strip() == "ready"
    return ranks


def on_every_rank(ranks: list[subprocess.Popen], commands: list[str]) -> None:
    """Send each rank its command at once, and wait until every rank is done."""
    for r, command in zip(ranks, commands, strict=True):
        r.stdin.write(command + "\n")
        r.stdin.flush()
    for r in ranks:
        assert r.stdout.readline().strip() == "done"


def commit_latency(tmp: Path, token_file: Path, total: int) -> dict:
    """Median seconds of two ranks delivering `total` bytes to a daemon and committing them,
    and of the same two ranks each writing and fsyncing its half to a file, in turn."""
    from checkpoint.daemon import read_token
    from checkpoint.snapshot_client import SnapshotClient

    daemon, address = start_daemon(tmp, token_file, 0, "0,1", memory_mb=(total >> 20) * 2 + 64)
    token = read_token(token_file)
    client = SnapshotClient(address, "bench", token, deadline_s=600)
    files = [tmp / f"rank{r}.bin" for r in (0, 1)]
    steps = itertools.count(1)
    ranks: list[subprocess.Popen] = []

    def snapshot() -> None:
        step = next(steps)
        on_every_rank(ranks, [f"deliver {step}"] * len(ranks))
        assert client.commit(step).committed

    def files_fsynced() -> None:
        on_every_rank(ranks, [f"file {path}" for path in files])

    def remove_files() -> None:  # each write makes a new file, as a save does
        for path in files:
            path.unlink(missing_ok=True)

    runs = {"snapshot_commit_s": snapshot, "file_fsync_s": files_fsynced}
    try:
        ranks += start_ranks(tmp, address, token, total)
        seconds = medians_in_turn(runs, COMMIT_REPEATS, untimed={"file_fsync_s": remove_files})
    finally:
        for r in ranks:
            r.stdin.close()
            r.wait()
        client.close()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
        remove_files()
    return seconds


def rebuild_time(tmp: Path, token_file: Path, per_rank: int) -> dict:
    import socket

    from checkpoint.daemon import read_token
    from checkpoint.snapshot_client import SnapshotClient, commit_group
    from checkpoint.snapshot_commands import missing_stripes

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
        path = tmp / "share.bin"
        path.write_bytes(expected["state"])
        rebuilds, parities, reads = [], [], []
        for _ in range(REBUILD_REPEATS):  # in turn with the file reads
            daemons[2].send_signal(signal.SIGKILL)
            daemons[2].wait()
            daemons[2] = start_daemon(tmp, token_file, 2, "2", memory_mb, peers, peers[2])[0]
            replacement = SnapshotClient(peers[2], "bench", token, deadline_s=600)
            start = time.perf_counter()
            replacement.rebuild()
            rebuilds.append(time.perf_counter() - start)
            while missing_stripes(replacement, 1):
                time.sleep(0.001)  # the parity the lost node held follows the share
            parities.append(time.perf_counter() - start)
            assert replacement.fetch(1, 2) == expected, "the rebuilt share differs"
            replacement.close()
            reads.append(best_of(lambda: path.read_bytes(), 3))
    finally:
        for d in daemons:
            d.send_signal(signal.SIGTERM)
            d.wait()
    rebuild_s, parity_s, read_s = (statistics.median(x) for x in (rebuilds, parities, reads))
    return {"rebuild_s": rebuild_s, "parity_s": parity_s, "file_read_s": read_s, "rebuilt_bytes": per_rank}


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
    xor_threads, rs_threads = codes["xor_threads"], codes["rs_threads"]
    xor_code = min(codes["xor_encode"], codes["xor_decode"])
    rs_code = min(codes["rs_encode"], codes["rs_decode"])
    figures = {
        "xor_vs_memcpy": xor_code / codes[f"memcpy_{xor_threads}"],
        "rs_vs_memcpy_same_threads": rs_code / codes[f"memcpy_{rs_threads}"],
        "commit_vs_parallel_fsync": commit["snapshot_commit_s"] / commit["file_fsync_s"],
        "rebuild_vs_file_read": rebuilt["rebuild_s"] / rebuilt["file_read_s"],
        "parity_restored_vs_file_read": rebuilt["parity_s"] / rebuilt["file_read_s"],
    }
    copies = [
        (f"memory copy of {code_bytes >> 20} MiB on {on_threads(n)} (GB/s)", f"{codes[f'memcpy_{n}']:.2f}", "")
        for n in sorted({xor_threads, rs_threads})
    ]
    rows = [
        *copies,
        (f"XOR 3+1 on {on_threads(xor_threads)}, enc / dec (GB/s)", both(codes, "xor"), ""),
        (f"  xor_vs_memcpy (slower / copy on {xor_threads})", f"{figures['xor_vs_memcpy']:.3f}", "target >= 0.8"),
        (f"Reed-Solomon 4+2 on {on_threads(rs_threads)}, enc / dec (GB/s)", both(codes, "rs"), ""),
        (
            f"  rs_vs_memcpy_same_threads (slower / copy on {rs_threads})",
            f"{figures['rs_vs_memcpy_same_threads']:.3f}",
            "target >= 0.25",
        ),
        (f"2 ranks deliver + commit {commit_bytes >> 20} MiB (s)", f"{commit['snapshot_commit_s']:.3f}", ""),
        ("the same 2 ranks write + fsync a half each (s)", f"{commit['file_fsync_s']:.3f}", ""),
        ("  commit_vs_parallel_fsync (time)", f"{figures['commit_vs_parallel_fsync']:.3f}", "lower is better"),
        (f"rebuild a lost node's {rebuilt['rebuilt_bytes'] >> 20} MiB share (s)", f"{rebuilt['rebuild_s']:.3f}", ""),
        ("read the same bytes from a local file (s)", f"{rebuilt['file_read_s']:.3f}", ""),
        ("  rebuild_vs_file_read (time)", f"{figures['rebuild_vs_file_read']:.3f}", "target <= 3"),
        ("... and the parity it held recomputed too (s)", f"{rebuilt['parity_s']:.3f}", ""),
        ("  parity_restored_vs_file_read (time)", f"{figures['parity_restored_vs_file_read']:.3f}", ""),
    ]
    print(
        f"\nmedians of {CODE_REPEATS} (codes, copies), {COMMIT_REPEATS} (commit, fsync) and {REBUILD_REPEATS} "
        "(rebuild, file read), run in turn"
    )
    for name, value, target in rows:
        print(f"{name:<54}{value:>16}  {target}")
    print(json.dumps({key: round(value, 4) for key, value in figures.items()}))


def on_threads(count: int) -> str:
    return f"{count} thread{'s' if count > 1 else ''}"


def both(codes: dict, name: str) -> str:
    return f"{codes[f'{name}_encode']:.2f} / {codes[f'{name}_decode']:.2f}"


if __name__ == "__main__":
    main()

"""Fault tolerance costs and gains, measured side by side in one run.

usage: python bench/recovery.py [--quick]

1. Throughput: the demo model on one rank trains without snapshots, with a snapshot every
   step, and with a snapshot every step plus a checkpoint every 10 steps (written by the
   daemon from the snapshots), in turn, through `stalwart run`; once with one core training
   and one spare (a GPU node's host has spare cores), once with both cores training.
2. Restore: a ~100M-parameter model's rank state restored from the daemon's memory and from
   the universal checkpoint on disk (its files dropped from the page cache), in turn.
3. Kill to step: a rank SIGKILLed mid-run; the wall time until the restarted run completes a
   step, and the part of it that is process start-up.
4. Deliver: bytes per second a rank delivers into a daemon's segment, against a memory copy
   (the daemon checksums them after; that time is reported apart).

Prints a table, then one JSON line with snapshot_throughput_ratio(_both_cores),
snapshot_copy_step_ratio (the copy's cost alone, measured between neighbouring steps of one run),
checkpoint_throughput_ratio(_both_cores), restore_memory_vs_disk, kill_to_step_s,
kill_startup_s, deliver_vs_memcpy.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO_MODEL = {"num_layers": 4, "hidden_size": 128, "ffn_hidden_size": 352, "num_attention_heads": 4}
BIG_MODEL = {"num_layers": 8, "hidden_size": 1024, "ffn_hidden_size": 2816, "num_attention_heads": 16}
"""About 100M parameters (with the 2,048-token vocabulary of the benchmark's corpus)."""


def write_config(path: Path, data: Path, run_dir: Path, model: dict, **sections) -> Path:
    config = {
        "run": {"dir": str(run_dir), "precision": "fp32", "progress": False},
        "model": {**model, "num_query_groups": 2},
        "train": {"seq_length": 128, "global_batch_tokens": 2048, "micro_batch_size": 4, "eval_interval": 0},
        "data": {"path": str(data), "packing": "concat"},
        "checkpoint": {"interval": 0},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}


def stalwart_run(config: Path, threads: int, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "launcher.cli", "run", str(config), "--nproc", "1", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env(threads), cwd=REPO, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result


def seconds_per_step(metrics: Path, skip: int = 5) -> float:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    window = records[skip:]
    return (window[-1]["time"] - window[0]["time"]) / (len(window) - 1)


def throughput(tmp: Path, data: Path, steps: int, rounds: int, threads: int) -> dict:
    """Seconds per step of each kind, medians over rounds run in turn (ABC CBA ...), and each
    kind's ratio to no snapshots: the median over rounds of the ratio within a round. The
    machine drifts by 10-30% from minute to minute, more than the few percent measured here;
    runs a minute apart share most of it, so ratios are taken within a round, not across."""
    kinds = {
        "none": {"snapshot": {"interval": 0}},
        "snapshots": {"snapshot": {"interval": 1}},
        "snapshots_checkpoints": {"snapshot": {"interval": 1}, "checkpoint": {"interval": 10, "keep": 2}},
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    names = list(kinds)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            run_dir = tmp / f"tp-{threads}-{name}-{round_}"
            config = write_config(
                tmp / f"{name}.yaml", data, run_dir, DEMO_MODEL, train={"steps": steps}, **kinds[name]
            )
            stalwart_run(config, threads)
            times[name].append(seconds_per_step(run_dir / "metrics.jsonl"))
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {
        f"{name}_ratio": statistics.median(n / t for n, t in zip(times["none"], times[name], strict=True))
        for name in names[1:]
    }
    return medians | ratios


def copy_step_ratio(tmp: Path, data: Path, steps: int) -> float:
    """Within one run with a snapshot every second step: a step that carries no copy / the
    next step, which carries the copy of the snapshot taken at its start. Neighbouring steps
    share the machine's drift, which whole runs a minute apart do not; this isolates the cost
    of the copy running beside training (the hand-over at the end of a step, a few ms, is in
    both halves of the pair, so the snapshot's full cost is somewhat higher)."""
    run_dir = tmp / "copy-step"
    every_second = {"interval": 2}
    config = write_config(tmp / "copy.yaml", data, run_dir, DEMO_MODEL, train={"steps": steps}, snapshot=every_second)
    stalwart_run(config, threads=1)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    took = {b["step"]: b["time"] - a["time"] for a, b in zip(records, records[1:], strict=False)}
    # A snapshot begins after each even step; its copy runs during the odd step after it.
    pairs = [took[s - 1] / took[s] for s in took if s > 10 and s % 2 == 1 and s - 1 in took]
    return statistics.median(pairs)


def drop_from_page_cache(root: Path) -> None:
    """Evict a checkpoint's files from the page cache (they are clean: written and fsynced)."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def restore_times(tmp: Path, data: Path, rounds: int) -> dict:
    """A rank restoring the big model's state from the daemon's memory and from disk, in turn."""
    from launcher.local import LocalDaemons, LocalRanks, trainer_args

    run_dir = tmp / "restore"
    config = write_config(
        tmp / "big.yaml",
        data,
        run_dir,
        BIG_MODEL,
        train={"steps": 2, "global_batch_tokens": 512, "micro_batch_size": 1},
        checkpoint={"interval": 2},
        snapshot={"memory_mb": 8192},
    )
    daemons = LocalDaemons(str(config), [], run_dir, nodes=1, nproc=1, parity=1)
    try:

        def ranks(with_daemons: bool) -> None:
            extra = daemons.env(0) if with_daemons else {}
            overrides = [] if with_daemons else ["snapshot.interval=0"]
            launched = LocalRanks(trainer_args(str(config), overrides), 1, [{**env(2), **extra}])
            codes = launched.wait()
            if codes != [0]:
                raise RuntimeError(f"the restoring rank exited with {codes}")

        ranks(with_daemons=True)  # trains 2 steps: a snapshot and its checkpoint at step 2
        checkpoint = run_dir / "checkpoints" / "step_000000002"
        seconds: dict[str, list[float]] = {"memory": [], "disk": []}
        for round_ in range(rounds):
            for source in ("memory", "disk") if round_ % 2 == 0 else ("disk", "memory"):
                drop_from_page_cache(checkpoint)
                ranks(with_daemons=source == "memory")
                event = json.loads((run_dir / "events.jsonl").read_text().splitlines()[-1])
                assert event["source"] == source, event
                seconds[source].append(event["seconds"])
        nbytes = sum(p.stat().st_size for p in checkpoint.rglob("c/*") if p.is_file())
    finally:
        daemons.stop()
    return {f"restore_{k}_s": statistics.median(v) for k, v in seconds.items()} | {"checkpoint_bytes": nbytes}


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of a rank `stalwart run` forked (named `stalwart-rN`, below its fork server)."""
    stack = [launcher_pid]
    while stack:
        pid = stack.pop()
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in open(f"/proc/{pid}/task/{task}/children").read().split():
                if open(f"/proc/{child}/comm").read().strip() == f"stalwart-r{rank}":
                    return int(child)
                stack.append(int(child))
    raise RuntimeError(f"no rank {rank} below process {launcher_pid}")


def kill_to_step(tmp: Path, data: Path) -> dict:
    """SIGKILL one of two ranks mid-run; from the kill to the next completed step."""
    run_dir = tmp / "kill"
    config = write_config(tmp / "kill.yaml", data, run_dir, DEMO_MODEL, train={"steps": 60}, parallel={"dp": 2})
    command = [sys.executable, "-m", "launcher.cli", "run", str(config), "--nodes", "2"]
    launcher = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(1), cwd=REPO
    )
    metrics = run_dir / "metrics.jsonl"
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 10:
        time.sleep(0.05)
    killed_at = time.time()
    os.kill(rank_pid(launcher.pid, 1), signal.SIGKILL)
    launcher.communicate(timeout=600)
    event = json.loads((run_dir / "events.jsonl").read_text().splitlines()[-1])
    first = next(r for r in map(json.loads, metrics.read_text().splitlines()) if r["step"] == event["step"] + 1)
    restored_at = event["time"]
    return {
        "kill_to_step_s": first["time"] - killed_at,
        "kill_startup_s": restored_at - event["seconds"] - killed_at,
        "kill_restore_s": event["seconds"],
        "kill_first_step_s": first["time"] - restored_at,
    }


def deliver_vs_memcpy(tmp: Path, nbytes: int, rounds: int) -> dict:
    """A rank's delivery of `nbytes` into a daemon (reserve, copy, deliver) against a plain
    memory copy of the same bytes into memory already in use, in turn; and, apart, how long the
    daemon then takes to checksum them (off the rank's path: the commit waits for it).
    In steady state, as in training: two steps first, after which the daemon recycles segments."""
    from checkpoint.daemon import read_token
    from checkpoint.snapshot_client import SnapshotClient
    from launcher.local import LocalDaemons

    config = write_config(tmp / "deliver.yaml", tmp / "none", tmp / "deliver", DEMO_MODEL, snapshot={"memory_mb": 4096})
    daemons = LocalDaemons(str(config), [], tmp / "deliver", nodes=1, nproc=1, parity=1)
    try:
        d = daemons.daemons
        client = SnapshotClient(d.addresses[0], d.job, read_token(d.token_file))
        source = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
        target = np.zeros_like(source)
        times: dict[str, list[float]] = {"deliver": [], "memcpy": [], "checksummed": []}
        for step in range(WARM_UP_STEPS + rounds):
            start = time.perf_counter()
            client.deliver(step, 0, {"state": source})
            delivered = time.perf_counter() - start
            client.commit(step)  # by rank 0's committer in training, off the ranks' path
            checksummed = time.perf_counter() - start - delivered
            start = time.perf_counter()
            np.copyto(target, source)
            copied = time.perf_counter() - start
            if step >= WARM_UP_STEPS:
                times["deliver"].append(delivered)
                times["memcpy"].append(copied)
                times["checksummed"].append(checksummed)
        client.close()
    finally:
        daemons.stop()
    return {f"{k}_s": statistics.median(v) for k, v in times.items()} | {"deliver_bytes": nbytes}


WARM_UP_STEPS = 2
"""The first two deliveries map fresh segments; from the third on the daemon recycles them."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    args = parser.parse_args()
    from tqdm import tqdm

    from trainer.prepare import prepare_dataset, stdlib_source_dir

    steps, rounds = (30, 2) if args.quick else (40, 5)
    with tempfile.TemporaryDirectory(prefix="stalwart-recovery-") as name, tqdm(total=6, desc="recovery bench") as bar:
        tmp = Path(name)
        data = tmp / "data"
        sources = [stdlib_source_dir() / d for d in ("email", "json", "logging", "asyncio")]
        prepare_dataset(sources, str(data), vocab_size=2048, show_progress=False)
        bar.update(1)
        spare = throughput(tmp, data, steps, rounds, threads=1)
        spare["copy_step_ratio"] = copy_step_ratio(tmp, data, steps=60 if args.quick else 200)
        bar.update(1)
        both = throughput(tmp, data, steps, rounds, threads=2)
        bar.update(1)
        restore = restore_times(tmp, data, rounds=2 if args.quick else 3)
        bar.update(1)
        killed = kill_to_step(tmp, data)
        bar.update(1)
        delivered = deliver_vs_memcpy(tmp, (64 if args.quick else 256) << 20, rounds=3 if args.quick else 5)
        bar.update(1)
    report(spare, both, restore, killed, delivered)


def report(spare: dict, both: dict, restore: dict, killed: dict, delivered: dict) -> None:
    results = {
        "snapshot_throughput_ratio": spare["snapshots_ratio"],
        "snapshot_throughput_ratio_both_cores": both["snapshots_ratio"],
        "snapshot_copy_step_ratio": spare["copy_step_ratio"],
        "checkpoint_throughput_ratio": spare["snapshots_checkpoints_ratio"],
        "checkpoint_throughput_ratio_both_cores": both["snapshots_checkpoints_ratio"],
        "restore_memory_vs_disk": restore["restore_memory_s"] / restore["restore_disk_s"],
        "kill_to_step_s": killed["kill_to_step_s"],
        "kill_startup_s": killed["kill_startup_s"],
        "deliver_vs_memcpy": delivered["memcpy_s"] / delivered["deliver_s"],
    }
    rows = [
        ("s/step, no snapshots (1 core + 1 spare | 2 cores)", f"{spare['none']:.4f}", f"{both['none']:.4f}"),
        ("s/step, snapshot every step", f"{spare['snapshots']:.4f}", f"{both['snapshots']:.4f}"),
        (
            "s/step, + checkpoint every 10 steps",
            f"{spare['snapshots_checkpoints']:.4f}",
            f"{both['snapshots_checkpoints']:.4f}",
        ),
        (
            "ratio none / snapshots (median within rounds)",
            f"{spare['snapshots_ratio']:.3f}",
            f"{both['snapshots_ratio']:.3f}",
        ),
        (
            "ratio none / + checkpoints (median within rounds)",
            f"{spare['snapshots_checkpoints_ratio']:.3f}",
            f"{both['snapshots_checkpoints_ratio']:.3f}",
        ),
        ("step without / with a snapshot's copy, one run (1 core + 1 spare)", f"{spare['copy_step_ratio']:.3f}", ""),
        (
            "restore ~100M params: memory | disk (s)",
            f"{restore['restore_memory_s']:.3f}",
            f"{restore['restore_disk_s']:.3f}",
        ),
        ("kill to next step | start-up part (s)", f"{killed['kill_to_step_s']:.2f}", f"{killed['kill_startup_s']:.2f}"),
        ("restore | first step after it (s)", f"{killed['kill_restore_s']:.2f}", f"{killed['kill_first_step_s']:.2f}"),
        (
            f"deliver | memcpy {delivered['deliver_bytes'] >> 20} MiB (s)",
            f"{delivered['deliver_s']:.3f}",
            f"{delivered['memcpy_s']:.3f}",
        ),
        ("the daemon's checksums after the delivery, to commit (s)", f"{delivered['checksummed_s']:.3f}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    for label, a, b in rows:
        print(f"{label:<{width}}  {a:>10}  {b:>10}")
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()

"""Recovery under Slurm, timed on the real test cluster (tests/slurm_cluster.py: slurmctld and
three slurmd on this machine), with the demo model and one CPU rank per node.

usage: python bench/slurm.py [--quick]

1. Rank kill: one rank of a 2-node job SIGKILLed mid-run; the wall time from the kill to the
   first step the restarted ranks complete, against the launch time of the job's first
   training step (from the job's start to its first step).
2. Node loss: one node of a 3-node job lost (its slurmd and every process of the job on it
   SIGKILLed); the time to the first step on the two survivors, and, apart, the time Slurm
   itself takes to mark the node DOWN (SlurmdTimeout; the recovery does not wait for it).
3. USR1: the time-limit warning sent to the batch shell; the time until a checkpoint is
   committed on disk.

Each is measured --rounds times (1 with --quick) and the median reported. Prints a table, then
one JSON line with node_loss_to_step_s, rank_kill_to_step_s, usr1_to_checkpoint_s, and the
figures beside them.
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.recovery import DEMO_MODEL, write_config  # noqa: E402
from tests.slurm_cluster import SlurmCluster  # noqa: E402

SCRIPT = REPO / "launcher" / "pretrain.slurm"
TIMEOUT_S = 600


class Job:
    """One submission of launcher/pretrain.slurm, and the moment each line of its output appeared."""

    def __init__(self, cluster: SlurmCluster, config: Path, out: Path, *options: str):
        self.cluster, self.out = cluster, out
        env = {**cluster.env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "STALWART_PYTHON": sys.executable}
        command = ["sbatch", "--parsable", "--gpus-per-node=0", f"--output={out}", *options, str(SCRIPT), str(config)]
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True)
        self.id = done.stdout.strip().split(";")[0]
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        seen = 0
        while not self._stop.is_set():
            if self.out.is_file():
                text = self.out.read_text(errors="replace")
                complete = text[: text.rfind("\n") + 1]
                for line in complete[seen:].splitlines():
                    self.lines.append((time.time(), line))
                seen = len(complete)
            time.sleep(0.02)

    def when(self, fragment: str) -> float:
        """When the first output line holding `fragment` appeared (waits for it)."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            found = next((t for t, line in list(self.lines) if fragment in line), None)
            if found is not None:
                return found
            time.sleep(0.05)
        raise RuntimeError(f"job {self.id}: no {fragment!r} in its output:\n{self.out.read_text()[-3000:]}")

    def state(self) -> str:
        shown = subprocess.run(
            ["squeue", "--noheader", "--format=%T", f"--jobs={self.id}"], env=self.cluster.env, capture_output=True
        )
        return shown.stdout.decode().strip()

    def end(self) -> None:
        """Cancel the job if it still runs, and wait until it has left the queue."""
        subprocess.run(["scancel", self.id], env=self.cluster.env, capture_output=True)
        deadline = time.monotonic() + TIMEOUT_S
        while self.state() and time.monotonic() < deadline:
            time.sleep(0.2)
        self._stop.set()


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {TIMEOUT_S} s: {what}")
        time.sleep(0.02)


def first_step_after(run_dir: Path, moment: float) -> float:
    """When the restarted ranks' first step ended: the step after the first restore after
    `moment` (the old ranks may still log a step after it, which the restart rewinds)."""
    events = run_dir / "events.jsonl"

    def restore() -> dict | None:
        rows = [json.loads(line) for line in events.read_text().splitlines()] if events.is_file() else []
        return next((row for row in rows if row["time"] > moment), None)

    wait_for(lambda: restore() is not None, "a restore")
    event = restore()
    after = lambda: [
        r["time"] for r in records(run_dir) if r["step"] == event["step"] + 1 and r["time"] > event["time"]
    ]  # noqa: E731
    wait_for(lambda: after(), "the first step after the restore")
    return after()[0]


def job_rank_pid(job: str, rank: int) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = dict(i.split(b"=", 1) for i in (entry / "environ").read_bytes().split(b"\0") if b"=" in i)
        except OSError:
            continue
        is_rank = argv[1:4] == [b"-m", b"launcher.slurm", b"--rank"]
        if is_rank and env.get(b"SLURM_JOB_ID") == job.encode() and env.get(b"SLURM_PROCID") == str(rank).encode():
            return int(entry.name)
    raise RuntimeError(f"no rank {rank} of job {job}")


def rank_kill(cluster: SlurmCluster, tmp: Path, data: Path) -> dict:
    run_dir = tmp / "kill"
    config = write_config(tmp / "kill.yaml", data, run_dir, DEMO_MODEL, train={"steps": 100000}, parallel={"dp": 2})
    job = Job(cluster, config, tmp / "kill.out", "--nodes=2", "--ntasks-per-node=1")
    try:
        wait_for(lambda: job.state() == "RUNNING", "the job running")
        running = time.time()
        wait_for(lambda: len(records(run_dir)) >= 5, "five steps")
        launch = records(run_dir)[0]["time"] - running
        killed = time.time()
        os.kill(job_rank_pid(job.id, 1), signal.SIGKILL)
        restarted = job.when("restarting the ranks")
        first = first_step_after(run_dir, killed)
    finally:
        job.end()
    return {"rank_kill_to_step_s": first - killed, "launch_s": launch, "kill_to_restart_s": restarted - killed}


def node_loss(cluster: SlurmCluster, tmp: Path, data: Path) -> dict:
    run_dir = tmp / "node"
    train = {"steps": 100000, "global_batch_tokens": 3072, "micro_batch_size": 2}  # 24 sequences: DP3 and DP2
    parallel = {"dp": 3, "distributed_optimizer": True}
    config = write_config(tmp / "node.yaml", data, run_dir, DEMO_MODEL, train=train, parallel=parallel)
    job = Job(cluster, config, tmp / "node.out", "--nodes=3", "--ntasks-per-node=1")
    try:
        wait_for(lambda: len(records(run_dir)) >= 5, "five steps")
        lost = time.time()
        cluster.lose_node("n3")
        rebuilt = job.when("rebuilt from parity")
        first = first_step_after(run_dir, lost)
        wait_for(lambda: cluster.node_states().get("n3", "").startswith("down"), "Slurm marking n3 down")
        down = time.time()
    finally:
        job.end()
        cluster.bring_back("n3")
    return {"node_loss_to_step_s": first - lost, "node_loss_to_rebuilt_s": rebuilt - lost, "slurm_down_s": down - lost}


def usr1(cluster: SlurmCluster, tmp: Path, data: Path) -> dict:
    from checkpoint.universal import find_resume_checkpoint

    run_dir = tmp / "usr1"
    config = write_config(tmp / "usr1.yaml", data, run_dir, DEMO_MODEL, train={"steps": 100000}, parallel={"dp": 2})
    job = Job(cluster, config, tmp / "usr1.out", "--nodes=2", "--ntasks-per-node=1")
    try:
        wait_for(lambda: len(records(run_dir)) >= 5, "five steps")
        sent = time.time()
        subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], env=cluster.env, check=True)
        wait_for(lambda: find_resume_checkpoint(run_dir / "checkpoints") is not None, "a checkpoint")
        saved = time.time()
    finally:
        job.end()
    return {"usr1_to_checkpoint_s": saved - sent}


def median(rows: list[dict]) -> dict:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of each")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from tqdm import tqdm

    from trainer.prepare import prepare_dataset, stdlib_source_dir

    rounds = 1 if args.quick else args.rounds
    with tempfile.TemporaryDirectory(prefix="stalwart-slurm-bench-") as name:
        tmp = Path(name)
        data = tmp / "data"
        sources = [stdlib_source_dir() / d for d in ("email", "json", "logging", "asyncio")]
        prepare_dataset(sources, str(data), vocab_size=2048, show_progress=False)
        cluster = SlurmCluster.start(tmp / "cluster")
        results: dict[str, list[dict]] = {"kill": [], "node": [], "usr1": []}
        try:
            with tqdm(total=3 * rounds, desc="slurm bench") as bar:
                for r in range(rounds):  # alternated, so that the machine's drift hits each alike
                    for key, measure in (("kill", rank_kill), ("node", node_loss), ("usr1", usr1)):
                        (tmp / f"{key}{r}").mkdir()
                        results[key].append(measure(cluster, tmp / f"{key}{r}", data))
                        bar.update(1)
        finally:
            cluster.stop()
    report({**median(results["kill"]), **median(results["node"]), **median(results["usr1"])}, rounds)


def report(results: dict, rounds: int) -> None:
    rows = [
        (
            "rank SIGKILL -> next step",
            results["rank_kill_to_step_s"],
            f"<= launch + 3 s = {results['launch_s'] + 3:.1f} s",
        ),
        ("  of which: kill -> restart begins", results["kill_to_restart_s"], ""),
        ("launch: job running -> first step", results["launch_s"], ""),
        ("node loss -> step on the survivors", results["node_loss_to_step_s"], "<= 20 s"),
        ("  of which: loss -> share rebuilt", results["node_loss_to_rebuilt_s"], ""),
        ("Slurm marks the node DOWN (apart)", results["slurm_down_s"], "not waited for"),
        ("USR1 -> checkpoint committed", results["usr1_to_checkpoint_s"], "reported"),
    ]
    print(f"\nRecovery under Slurm (test cluster, demo model, one CPU rank per node; median of {rounds})")
    print(f"{'':40s} {'seconds':>8s}  target")
    for name, value, target in rows:
        print(f"{name:40s} {value:8.2f}  {target}")
    print(json.dumps({key: round(value, 3) for key, value in results.items()}))


if __name__ == "__main__":
    main()

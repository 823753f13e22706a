"""The Slurm test cluster itself: what the launcher's Slurm tests stand on."""

import os
import re
import stat
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, rank_env, start_stalwart_run, write_tiny_config
from tests.slurm_cluster import NODES, SlurmCluster
from trainer.metrics import read_metrics


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def test_the_test_cluster_runs_a_step_on_each_of_its_three_nodes(slurm):
    command = ["srun", "-N3", "--ntasks-per-node=1", "printenv", "SLURMD_NODENAME"]
    done = subprocess.run(command, env=slurm.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + slurm.logs()
    assert sorted(done.stdout.split()) == list(NODES)


def test_a_batch_job_runs_to_completion_and_reports_its_exit_code(slurm, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=2\nsrun -N2 true\nexit 7\n")
    done = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--output={tmp_path / 'out.txt'}", str(script)],
        env=slurm.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 7, done.stdout + done.stderr + slurm.logs()


SLURM_SCRIPT = REPO / "launcher" / "pretrain.slurm"


def sbatch(
    slurm, script_args: list, tmp_path, *options: str, timeout: float = 900, wait: bool = True
) -> subprocess.CompletedProcess:
    """`sbatch --wait` of launcher/pretrain.slurm on the test cluster: CPU ranks (no GPUs, one
    thread each), this checkout's code and interpreter; its output in tmp_path/slurm.out."""
    env = {
        **slurm.env,
        **rank_env(4),
        "OMP_NUM_THREADS": "1",
        "STALWART_PYTHON": sys.executable,
    }
    command = ["sbatch", *(["--wait"] if wait else []), "--parsable", "--gpus-per-node=0"]
    command.append(f"--output={tmp_path / 'slurm.out'}")
    command += [*options, str(SLURM_SCRIPT), *[str(a) for a in script_args]]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_sbatch_trains_with_a_daemon_step_per_node_as_stalwart_run_does(slurm, tmp_path, small_dataset):
    """`sbatch launcher/pretrain.slurm CONFIG` on two nodes x two ranks: a snapshot daemon per
    node as its own job step, the ranks in a training step, every step snapshotted and the
    checkpoints written from the snapshots; the losses are those of `stalwart run` on two
    emulated nodes, bit for bit, and nothing is left in shared memory."""
    steps = ("train.steps=12", "train.eval_interval=0", "checkpoint.interval=6")
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, *steps)
    before = set(os.listdir("/dev/shm"))
    done = sbatch(slurm, [config], tmp_path, "--nodes=2", "--ntasks-per-node=2", "--time=10")
    out = (tmp_path / "slurm.out").read_text() if (tmp_path / "slurm.out").exists() else ""
    assert done.returncode == 0, done.stderr + out[-6000:] + slurm.logs()
    job = done.stdout.strip().split(";")[0]
    assert f"stalwart: job {job} on 2 node(s) x 2 rank(s), snapshot daemons at" in out, out[-3000:]
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    assert sorted(losses) == list(range(1, 13))
    newest = tmp_path / "run" / "checkpoints" / "step_000000012"
    verified = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "ckpt", "verify", str(newest)], capture_output=True, text=True, cwd=REPO
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert stat.S_IMODE((tmp_path / "run" / "snapshot.token").stat().st_mode) == 0o600
    assert not [name for name in set(os.listdir("/dev/shm")) - before if name.startswith(f"stalwart-slurm-{job}-")]

    local = write_tiny_config(tmp_path / "local.yaml", tmp_path / "local", small_dataset, *steps)
    code, _, err = start_stalwart_run(local, "parallel.dp=4", nodes=2, ranks=4).finish(600)
    assert code == 0, err[-3000:]
    assert losses == {r["step"]: r["loss"] for r in read_metrics(tmp_path / "local" / "metrics.jsonl")}


def test_what_the_launcher_reads_from_slurm():
    from launcher.slurm import SlurmError, node_addresses, rank_env, ranks_per_node, rendezvous_port

    shown = "NodeName=n1 Arch=x86_64 NodeAddr=10.0.0.1 NodeHostName=gpu1\nNodeName=n2 NodeAddr=10.0.0.2 CPUTot=2"
    assert node_addresses(shown) == {"n1": "10.0.0.1", "n2": "10.0.0.2"}
    assert ranks_per_node({"SLURM_NTASKS_PER_NODE": "8"}) == 8
    assert ranks_per_node({"SLURM_TASKS_PER_NODE": "4(x2)"}) == 4
    with pytest.raises(SlurmError, match="--ntasks-per-node"):
        ranks_per_node({"SLURM_TASKS_PER_NODE": "(x2)"})
    ports = {rendezvous_port(1234, requeues, restart) for requeues in range(3) for restart in range(20)}
    assert len(ports) == 60 and all(20000 <= p < 40000 for p in ports)  # a fresh port per attempt
    slurm_vars = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4"}
    assert rank_env(slurm_vars) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    with_daemons = rank_env({**slurm_vars, "SLURM_NODEID": "1", "STALWART_DAEMONS": "a:1,b:2"})
    assert with_daemons["STALWART_NODE"] == "1"  # its node in this step: the daemon group's index


def job_fields(slurm, job: str) -> dict[str, str]:
    """`scontrol show job` of `job` as a dict (JobState, Restarts, ExitCode, ...)."""
    shown = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job], env=slurm.env, capture_output=True, text=True
    )
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


def wait_for_job(slurm, job: str, condition, what: str, timeout: float = 600) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while not condition(fields := job_fields(slurm, job)):
        assert time.monotonic() < deadline, f"job {job}: no {what} in {timeout} s: {fields}\n{slurm.logs()}"
        time.sleep(0.5)
    return fields


def newest_step(metrics) -> int:
    return max((r["step"] for r in read_metrics(metrics)), default=0) if metrics.is_file() else 0


def test_usr1_before_the_time_limit_saves_requeues_and_the_job_resumes_bit_exactly(slurm, tmp_path, small_dataset):
    """The time limit's warning (`--signal=B:USR1@N` signals the batch shell; sent here with
    `scancel --signal=USR1 --batch`) stops every rank at a step boundary with a checkpoint;
    the job requeues itself, eligible at once, and the requeued job resumes from that
    checkpoint and finishes with the losses of an uninterrupted run."""
    steps = ("train.steps=24", "train.eval_interval=0", "checkpoint.interval=100")
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, *steps)
    submitted = sbatch(slurm, [config], tmp_path, "--nodes=2", "--ntasks-per-node=2", wait=False)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while newest_step(metrics) < 4:
        assert time.monotonic() < deadline, (tmp_path / "slurm.out").read_text()[-3000:] + slurm.logs()
        time.sleep(0.2)
    signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env, capture_output=True)
    assert signalled.returncode == 0, signalled.stderr
    final = wait_for_job(slurm, job, lambda f: f.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "end")
    out = (tmp_path / "slurm.out").read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", f"{final}\n{out[-4000:]}"
    assert f"stalwart: requeueing job {job}" in out
    stopped_at = int(re.search(r"restored step (\d+) from disk", out).group(1))
    assert 4 <= stopped_at < 24
    losses = {r["step"]: r["loss"] for r in read_metrics(metrics)}

    reference = write_tiny_config(tmp_path / "ref.yaml", tmp_path / "ref", small_dataset, *steps)
    code, _, err = start_stalwart_run(reference, "parallel.dp=4", nodes=2, ranks=4).finish(600)
    assert code == 0, err[-3000:]
    assert losses == {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")}


def test_a_cancelled_job_is_not_requeued(slurm, tmp_path, small_dataset):
    """`scancel` sends SIGTERM: the ranks save and stop, and the job ends cancelled, not requeued."""
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, "train.steps=400")
    submitted = sbatch(slurm, [config], tmp_path, "--nodes=2", "--ntasks-per-node=1", wait=False)
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 300
    while newest_step(tmp_path / "run" / "metrics.jsonl") < 2:
        assert time.monotonic() < deadline, (tmp_path / "slurm.out").read_text()[-3000:] + slurm.logs()
        time.sleep(0.2)
    assert subprocess.run(["scancel", job], env=slurm.env).returncode == 0
    final = wait_for_job(slurm, job, lambda f: f.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "end")
    assert final["JobState"] == "CANCELLED" and final["Restarts"] == "0", final
    out = (tmp_path / "slurm.out").read_text()
    assert "stalwart: requeueing" not in out and "restarting the ranks" not in out, out[-3000:]


def test_only_the_time_limit_warning_requeues():
    import signal

    from launcher.slurm import should_requeue

    assert should_requeue(75, [signal.SIGUSR1])
    assert not should_requeue(75, [signal.SIGUSR1, signal.SIGTERM])  # cancelled or preempted meanwhile
    assert not should_requeue(75, [signal.SIGTERM]) and not should_requeue(0, [signal.SIGUSR1])
    assert not should_requeue(3, [signal.SIGUSR1])  # gave up: do not requeue

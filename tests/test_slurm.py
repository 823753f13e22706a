"""The Slurm test cluster itself: what the launcher's Slurm tests stand on."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.conftest import (
    REPO,
    all_pids,
    argv,
    environment,
    layout_change_reference,
    rank_env,
    start_stalwart_run,
    write_tiny_config,
)
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


STEPS = ("train.steps=24", "train.eval_interval=0")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_dataset) -> dict[int, float]:
    """Step -> loss of the tests' run (STEPS) under `stalwart run` on two emulated nodes x two
    ranks, uninterrupted: what every Slurm job of that run must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("uninterrupted")
    config = write_tiny_config(root / "run.yaml", root / "run", small_dataset, *STEPS)
    code, _, err = start_stalwart_run(config, "parallel.dp=4", nodes=2, ranks=4).finish(600)
    assert code == 0, err[-3000:]
    return {r["step"]: r["loss"] for r in read_metrics(root / "run" / "metrics.jsonl")}


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def test_sbatch_trains_with_a_daemon_step_per_node_as_stalwart_run_does(slurm, tmp_path, small_dataset, uninterrupted):
    """`sbatch launcher/pretrain.slurm CONFIG` on two nodes x two ranks: a snapshot daemon per
    node as its own job step, the ranks in a training step, every step snapshotted and the
    checkpoints written from the snapshots; the losses are those of `stalwart run` on two
    emulated nodes, bit for bit, and nothing is left in shared memory."""
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, *STEPS, "checkpoint.interval=12")
    before = set(os.listdir("/dev/shm"))
    done = sbatch(slurm, [config], tmp_path, "--nodes=2", "--ntasks-per-node=2", "--time=10")
    out = (tmp_path / "slurm.out").read_text() if (tmp_path / "slurm.out").exists() else ""
    assert done.returncode == 0, done.stderr + out[-6000:] + slurm.logs()
    job = done.stdout.strip().split(";")[0]
    assert f"stalwart: job {job} on 2 node(s) x 2 rank(s), snapshot daemons at" in out, out[-3000:]
    assert losses(tmp_path / "run") == uninterrupted
    newest = tmp_path / "run" / "checkpoints" / "step_000000024"
    verified = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "ckpt", "verify", str(newest)], capture_output=True, text=True, cwd=REPO
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert stat.S_IMODE((tmp_path / "run" / "snapshot.token").stat().st_mode) == 0o600
    assert not [name for name in set(os.listdir("/dev/shm")) - before if name.startswith(f"stalwart-slurm-{job}-")]

    # Submitted again, the finished run has nothing to do: no daemons, no ranks, no requeue.
    again = sbatch(slurm, [config], tmp_path, "--nodes=2", "--ntasks-per-node=2", "--time=10")
    out = (tmp_path / "slurm.out").read_text()
    assert again.returncode == 0, again.stderr + out[-3000:]
    assert "stalwart: the run already finished (checkpoint of step 24, train.steps=24); nothing to do" in out
    assert out.count("snapshot daemons at") == 1 and losses(tmp_path / "run") == uninterrupted


def test_the_batch_script_passes_bash_n_and_shellcheck():
    for check in (["bash", "-n"], ["shellcheck", "--shell=bash"]):
        done = subprocess.run([*check, str(SLURM_SCRIPT)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(check)}: {done.stdout}{done.stderr}"


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


def test_the_time_limit_warning_saves_and_requeues_the_job_which_resumes_bit_exactly_and_scancel_never_requeues(
    slurm, tmp_path, small_dataset
):
    """A real time limit: `--time=2 --signal=B:USR1@80` makes Slurm send USR1 to the batch
    shell 40-70 s into the job. Every rank stops at a step boundary with a checkpoint, the job
    requeues itself, eligible at once, and the requeued job resumes from that checkpoint; its
    losses continue those of an uninterrupted run bit for bit. Then `scancel`: the job ends
    cancelled, and is not requeued again. (A constant learning rate, so that the uninterrupted
    run need only be as long as the job got.)"""
    settings = ("train.eval_interval=0", "checkpoint.interval=0", "optim.schedule=constant")
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, "train.steps=100000", *settings)
    job = submit(slurm, config, tmp_path, "--nodes=2", "--ntasks-per-node=1", "--time=2", "--signal=B:USR1@80")
    deadline = time.monotonic() + 300
    while not (resumed := re.search(r"restored step (\d+) from disk", slurm_out(tmp_path))):
        assert time.monotonic() < deadline, f"{job_fields(slurm, job)}\n{slurm_out(tmp_path)[-3000:]}{slurm.logs()}"
        time.sleep(0.2)
    stopped_at = int(resumed.group(1))
    wait_for_step(slurm, tmp_path, stopped_at + 5)
    assert subprocess.run(["scancel", job], env=slurm.env).returncode == 0
    final = wait_for_job(slurm, job, lambda f: f.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "end")
    out = slurm_out(tmp_path)
    # A requeued job gets the same time limit, and its own warning may come before the cancel.
    assert final["JobState"] == "CANCELLED" and int(final["Restarts"]) >= 1, f"{final}\n{out[-4000:]}"
    assert out.count(f"stalwart: requeueing job {job}") == int(final["Restarts"]), out[-4000:]
    assert f"stopped after step {stopped_at} on a signal; checkpoint committed" in out
    got = losses(tmp_path / "run")
    reached = max(got)

    steps = f"train.steps={reached}"
    reference = write_tiny_config(tmp_path / "ref.yaml", tmp_path / "ref", small_dataset, steps, *settings)
    code, _, err = start_stalwart_run(reference, "parallel.dp=2", nodes=2, ranks=2).finish(600)
    assert code == 0, err[-3000:]
    assert got == losses(tmp_path / "ref")


def test_only_the_time_limit_warning_requeues():
    import signal

    from launcher.slurm import should_requeue

    assert should_requeue(75, [signal.SIGUSR1])
    assert not should_requeue(75, [signal.SIGUSR1, signal.SIGTERM])  # cancelled or preempted meanwhile
    assert not should_requeue(75, [signal.SIGTERM]) and not should_requeue(0, [signal.SIGUSR1])
    assert not should_requeue(3, [signal.SIGUSR1])  # gave up: do not requeue


def job_ranks(job: str) -> dict[int, int]:
    """Rank -> pid of the job's training ranks (every node of the test cluster is this host)."""
    found = {}
    for pid in all_pids():
        if argv(pid)[1:4] == ["-m", "launcher.slurm", "--rank"]:
            env = environment(pid)
            if env.get("SLURM_JOB_ID") == job:
                found[int(env["SLURM_PROCID"])] = pid
    return found


def events(run_dir) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def submit(slurm, config, tmp_path, *options: str) -> str:
    """Submit the run without waiting; its job id."""
    submitted = sbatch(slurm, [config], tmp_path, *options, wait=False)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def wait_for_step(slurm, tmp_path, step: int) -> None:
    deadline = time.monotonic() + 300
    while newest_step(tmp_path / "run" / "metrics.jsonl") < step:
        assert time.monotonic() < deadline, slurm_out(tmp_path)[-3000:] + slurm.logs()
        time.sleep(0.05)


def slurm_out(tmp_path) -> str:
    path = tmp_path / "slurm.out"
    return path.read_text() if path.is_file() else ""


def test_a_rank_sigkilled_is_restored_from_memory_inside_the_job_losing_at_most_the_step_in_flight(
    slurm, tmp_path, small_dataset, uninterrupted
):
    """SIGKILL of one rank: srun ends the training step on every node, the supervisor starts a
    new one inside the job (no requeue), and every rank restores from its node daemon's memory
    a step at most one behind the newest one logged; the losses are the uninterrupted run's."""
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, *STEPS, "checkpoint.interval=0")
    job = submit(slurm, config, tmp_path, "--nodes=2", "--ntasks-per-node=2")
    wait_for_step(slurm, tmp_path, 4)
    ranks = job_ranks(job)
    assert sorted(ranks) == [0, 1, 2, 3], ranks
    os.kill(ranks[3], signal.SIGKILL)
    reached, deadline = 0, time.monotonic() + 300
    while not events(tmp_path / "run"):  # the newest step logged before the restore
        reached = max(reached, newest_step(tmp_path / "run" / "metrics.jsonl"))
        assert time.monotonic() < deadline, slurm_out(tmp_path)[-3000:] + slurm.logs()
        time.sleep(0.01)
    final = wait_for_job(slurm, job, lambda f: f.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "end")
    out = slurm_out(tmp_path)
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "0", f"{final}\n{out[-4000:]}"
    assert "a rank crashed; restarting the ranks (restart 1)" in out
    restored = events(tmp_path / "run")
    assert len(restored) == 1 and restored[0]["source"] == "memory", restored
    assert reached - restored[0]["step"] <= 1, (reached, restored)
    assert losses(tmp_path / "run") == uninterrupted


def test_a_rank_that_fails_at_the_same_step_every_time_stops_the_job_with_the_do_not_requeue_code(
    slurm, tmp_path, small_dataset
):
    """Every restarted rank dies before it gets past the step it restores: after run.max_restarts
    restarts the job fails with exit code 3 and is not requeued."""
    config = write_tiny_config(
        tmp_path / "run.yaml", tmp_path / "run", small_dataset, "train.steps=400", "run.max_restarts=1"
    )
    job = submit(slurm, config, tmp_path, "--nodes=2", "--ntasks-per-node=1")
    wait_for_step(slurm, tmp_path, 3)
    killed: set[int] = set()
    deadline = time.monotonic() + 600
    while job_fields(slurm, job).get("JobState") in ("PENDING", "RUNNING", "COMPLETING"):
        for pid in set(job_ranks(job).values()) - killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        assert time.monotonic() < deadline, slurm_out(tmp_path)[-3000:]
        time.sleep(0.02)
    final = job_fields(slurm, job)
    out = slurm_out(tmp_path)
    assert final["JobState"] == "FAILED" and final["ExitCode"] == "3:0" and final["Restarts"] == "0", final
    assert "the run crashed 2 times in a row at step" in out and "giving up (run.max_restarts=1)" in out, out[-3000:]
    assert len(killed) == 2 * 2  # the first attempt's ranks and one restart's


@pytest.mark.timeout(1200)
def test_losing_a_node_continues_on_the_other_two_from_the_rebuilt_snapshot(slurm, tmp_path, small_dataset):
    """Three nodes x one rank with parity 1; node n3 fails (its slurmd and all its processes
    SIGKILLed). The job survives (--no-kill), the survivors rebuild n3's share of the newest
    snapshot from parity, and a new training step on n1 and n2 continues at DP2 from memory,
    matching a run that changes from DP3 to DP2 through a disk checkpoint at the same step."""
    settings = ("train.steps=30", "train.global_batch_tokens=768", "train.eval_interval=0")  # 12 sequences
    run_settings = (*settings, "checkpoint.interval=0", "parallel.distributed_optimizer=true")
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, *run_settings)
    before = set(os.listdir("/dev/shm"))
    job = submit(slurm, config, tmp_path, "--nodes=3", "--ntasks-per-node=1")
    try:
        wait_for_step(slurm, tmp_path, 6)
        slurm.lose_node("n3")
        final = wait_for_job(slurm, job, lambda f: f.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "end")
    finally:
        slurm.bring_back("n3")
    out = slurm_out(tmp_path)
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "0", f"{final}\n{out[-4000:]}"
    assert "node(s) [2] lost" in out and "continuing on 2 node(s)" in out, out[-3000:]
    # Both daemon groups freed their segments, the lost node's share rebuilt on n1 included.
    assert not [name for name in set(os.listdir("/dev/shm")) - before if name.startswith(f"stalwart-slurm-{job}-")]
    restored = events(tmp_path / "run")
    assert len(restored) == 1, restored
    assert restored[0]["source"] == "memory" and restored[0]["layout"] == "tp1 pp1 dp3 +distopt", restored
    lost_at = restored[0]["step"]
    assert lost_at >= 5  # step 6 was logged before the loss: at most the step after it was in flight
    expected = layout_change_reference(tmp_path / "ref", small_dataset, settings, lost_at, 3, 2)
    got = losses(tmp_path / "run")
    assert sorted(got) == sorted(expected) == list(range(1, 31))
    assert max(abs(got[s] - expected[s]) for s in got) <= 1e-5


def test_a_rank_stopped_with_sigstop_is_found_hung_killed_and_the_job_recovers_from_memory(
    slurm, tmp_path, small_dataset, uninterrupted
):
    """SIGSTOP of one rank: the other ranks wait for it in a collective, nobody finishes a step,
    and after run.hang_timeout_s the node daemons kill the ranks that stopped reporting,
    naming rank and step; the job restarts the ranks from memory and ends with the losses of
    an uninterrupted run."""
    settings = (*STEPS, "checkpoint.interval=0", "run.hang_timeout_s=10")
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, *settings)
    job = submit(slurm, config, tmp_path, "--nodes=2", "--ntasks-per-node=2")
    wait_for_step(slurm, tmp_path, 4)
    ranks = job_ranks(job)
    os.kill(ranks[1], signal.SIGSTOP)
    final = wait_for_job(slurm, job, lambda f: f.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "end")
    out = slurm_out(tmp_path)
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "0", f"{final}\n{out[-4000:]}"
    found = re.search(
        rf"rank 1 \(pid {ranks[1]}, stopped by a signal\) made no progress for (\d+) s after step (\d+)", out
    )
    assert found, out[-4000:]
    assert int(found.group(1)) >= 10  # killed only once the timeout had passed
    restored = events(tmp_path / "run")
    assert len(restored) == 1 and restored[0]["source"] == "memory", restored
    assert restored[0]["step"] >= int(found.group(2)) - 1  # at most the step in flight lost
    assert losses(tmp_path / "run") == uninterrupted

"""Recovery inside the job: ranks SIGKILLed at random points of training are restarted by the
launcher and restore from their node daemons' memory, and training goes on bit-exactly."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint.materialize import WRITER_NAME
from tests.conftest import (
    REPO,
    children_of,
    descendants,
    layout_change_reference,
    process_name,
    rank_env,
    ranks_below,
    start_stalwart_run,
    write_tiny_config,
)
from trainer.metrics import read_metrics

# The demo's model (configs/demo.yaml) on the small dataset, 4 ranks on 2 emulated nodes.
DEMO_MODEL = (
    "model.hidden_size=128",
    "model.ffn_hidden_size=352",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.num_layers=4",
)
LAYOUT = ("parallel.dp=4", "parallel.distributed_optimizer=true")
STEPS = 120
KILLS = 20
TIMEOUT_S = 900


def start_run(config, *overrides):
    return start_stalwart_run(config, *overrides, nodes=2, ranks=4)


def finish(run, timeout=TIMEOUT_S):
    return run.finish(timeout)


def ranks_of(launcher_pid: int) -> list[int]:
    """The launcher's training ranks' pids, in rank order."""
    return [pid for _, pid in sorted(ranks_below(launcher_pid).items())]


def newest_step(metrics) -> int:
    """The newest step in metrics.jsonl; 0 while rank 0 rewrites it at a restart."""
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a line rank 0 is writing right now
            continue
    return max(steps, default=0)


def reached_before_restore(metrics, run_dir, restores_before: int, process) -> int:
    """The newest step rank 0 logged before a restart restored: a restart rewrites metrics.jsonl
    back to the restored step, so the file is watched until the restore is announced (which
    rank 0 does before it rewrites the file) and the highest step seen is kept. Missing a
    line only makes the figure lower, never higher."""
    reached, deadline = 0, time.monotonic() + TIMEOUT_S
    while True:
        step = newest_step(metrics)
        if len(restores(run_dir)) > restores_before:  # `step` may have been read after the rewrite
            return reached
        reached = max(reached, step)
        if process.poll() is not None:
            process.fail(f"the run ended (exit code {process.poll()}) before restore {restores_before + 1}")
        if time.monotonic() > deadline:
            process.fail(f"restore {restores_before + 1}: not within {TIMEOUT_S} s")
        time.sleep(0.01)


def restores(run_dir) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_until(condition, process, what):
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            process.fail(f"the run ended (exit code {process.poll()}) while waiting for {what}")
        if time.monotonic() > deadline:
            process.fail(f"{what}: not within {TIMEOUT_S} s")
        time.sleep(0.05)


@pytest.mark.timeout(1500)  # twenty restarts of four ranks, each importing megatron-core
def test_twenty_sigkills_of_random_ranks_each_restore_from_memory_and_train_on_bit_exactly(
    tmp_path, small_dataset, report
):
    settings = (f"train.steps={STEPS}", "train.eval_interval=0", "checkpoint.interval=0", "run.max_restarts=30")
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, *DEMO_MODEL, *settings)
    reference = write_tiny_config(tmp_path / "ref.yaml", tmp_path / "ref", small_dataset, *DEMO_MODEL, *settings)
    rng = random.Random(20261130)
    run, run_dir = start_run(config, *LAYOUT), tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    kills = []  # (newest step logged before the restart, victim rank)
    killed_at = []  # wall-clock time of each kill
    for kill in range(KILLS):
        # The restart must have trained on after its restore before the next kill.
        since = restores(run_dir)[-1]["step"] if kill else 0
        wait_until(lambda s=since: newest_step(metrics) >= s + 2, run, f"training after restore {kill}")
        time.sleep(rng.uniform(0.0, 0.4))
        victim = rng.randrange(4)
        pids = ranks_of(run.pid)
        assert len(pids) == 4, pids
        killed_at.append(time.time())
        os.kill(pids[victim], signal.SIGKILL)
        # The survivors may log the step the victim finished just before it died.
        kills.append((reached_before_restore(metrics, run_dir, kill, run), victim))
        if kills[-1][0] >= STEPS - 2:
            pytest.fail("the run ended before all kills: give it more steps")
    code, out, err = finish(run)
    assert code == 0, err[-3000:]

    events = restores(run_dir)
    assert len(events) == KILLS, out[-3000:]
    assert all(e["source"] == "memory" and e["layout"] == "tp1 pp1 dp4 +distopt" for e in events)
    lost = [reached - event["step"] for (reached, _), event in zip(kills, events, strict=True)]
    # A logged step is done on every rank; its snapshot is copied during the step after it.
    assert all(n <= 1 for n in lost), f"steps lost per kill {lost}; (reached, victim) {kills}; restores {events}"

    code, _, err = finish(start_run(reference, *LAYOUT))
    assert code == 0, err[-3000:]
    got = {r["step"]: (r["loss"], r["consumed_samples"]) for r in read_metrics(metrics)}
    expected = {r["step"]: (r["loss"], r["consumed_samples"]) for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")}
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # every loss to the last bit; every step consumed the same samples
    seconds = sorted(e["seconds"] for e in events)
    median = seconds[len(seconds) // 2]
    report(f"recovery: {KILLS} SIGKILLs, steps lost per kill {sorted(lost)}, restore from memory p50 {median:.2f} s")
    # The work a kill threw away: from the end of the step it restored to the kill, in steps.
    # A kill during the victim's copy of the step before loses that step, but barely any of the
    # next: either way about one step of work, never two. Reported: it is a matter of timing.
    ended = {r["step"]: r["time"] for r in read_metrics(metrics)}
    step_s = sorted(ended[s + 1] - ended[s] for s in range(1, STEPS))[STEPS // 2]  # restarts fall out
    work = sorted((t - ended[e["step"]]) / step_s for t, e in zip(killed_at, events, strict=True))
    report(f"recovery: work lost per kill, in steps of {step_s:.2f} s: max {work[-1]:.2f}, p50 {work[KILLS // 2]:.2f}")


def newest_committed(run_dir) -> int:
    """The newest step committed on any of a live run's daemons (steps are committed in order,
    so by the time of a kill soon after, this one at least is committed)."""
    listed = snapshot_command(run_dir, "ls")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return max(row["step"] for row in json.loads(listed.stdout))


def snapshot_command(run_dir, *args):
    command = [sys.executable, "-m", "launcher.cli", "snapshot", "--run", str(run_dir), "--json", *args]
    return subprocess.run(command, capture_output=True, text=True, env=rank_env(1), cwd=REPO, timeout=300)


def test_snapshot_materialize_writes_the_checkpoint_the_ranks_would_and_it_resumes_on_another_layout(
    tmp_path, small_dataset
):
    """A committed snapshot of a live job, materialized by the operator, is the very checkpoint
    the ranks write themselves at that step (chunk for chunk), verifies, and resumes at TP2."""
    # snapshot.keep=3: a step pinned by one daemon stays on the others for two more commits.
    steps = ("train.steps=400", "train.eval_interval=0", "snapshot.keep=3")
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, *steps, "checkpoint.interval=0")
    run = start_run(config, *LAYOUT)
    wait_until(lambda: newest_step(tmp_path / "run" / "metrics.jsonl") >= 3, run, "three steps")
    listed = snapshot_command(tmp_path / "run", "ls")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    # The newest step may be committed on one daemon and not yet on the other (two phases).
    assert any(row["ranks"] == [0, 1, 2, 3] and row["daemons"] == [0, 1] for row in json.loads(listed.stdout))
    out = tmp_path / "materialized"
    made = snapshot_command(tmp_path / "run", "materialize", "latest", str(out))
    assert made.returncode == 0, made.stdout + made.stderr
    step = json.loads(made.stdout)[0]["step"]
    assert json.loads(made.stdout)[0]["ranks"] == 4
    os.kill(run.pid, signal.SIGUSR1)
    code, _, err = finish(run)
    assert code == 75
    assert "Traceback" not in err, err[-3000:]  # the daemons' writers and their resource trackers

    root = out / f"step_{step:09d}"
    verified = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "ckpt", "verify", str(root)], capture_output=True, text=True, cwd=REPO
    )
    assert verified.returncode == 0, verified.stdout
    assert (out / "latest").read_text().strip() == root.name

    # The same steps, saved by the ranks through the checkpoint writers (no daemons), with the
    # same train.steps (the learning-rate schedule depends on it), stopped once past `step`.
    ranks_config = write_tiny_config(
        tmp_path / "ranks.yaml",
        tmp_path / "ranks",
        small_dataset,
        *steps,
        f"checkpoint.interval={step}",
        "checkpoint.keep=1000",
        "snapshot.interval=0",
    )
    by_ranks_run = start_run(ranks_config, *LAYOUT)
    wait_until(lambda: newest_step(tmp_path / "ranks" / "metrics.jsonl") > step, by_ranks_run, f"step {step + 1}")
    os.kill(by_ranks_run.pid, signal.SIGUSR1)
    assert finish(by_ranks_run)[0] == 75
    by_ranks = tmp_path / "ranks" / "checkpoints" / root.name
    manifest = json.loads((root / "manifest.json").read_text())["arrays"]
    assert manifest == json.loads((by_ranks / "manifest.json").read_text())["arrays"]
    for name, keys in manifest.items():
        for key in keys:
            assert (root / name / key).read_bytes() == (by_ranks / name / key).read_bytes(), f"{name}/{key}"

    resume = write_tiny_config(
        tmp_path / "tp2.yaml",
        tmp_path / "tp2",
        small_dataset,
        f"train.steps={step + 2}",
        "train.eval_interval=0",
        f"checkpoint.dir={out}",
        "checkpoint.interval=0",
        "snapshot.interval=0",
        "parallel.tp=2",
    )
    command = [sys.executable, "-m", "launcher.cli", "run", str(resume)]
    result = subprocess.run(command, capture_output=True, text=True, env=rank_env(2), cwd=REPO, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"restored step {step} from disk ({root}, saved at tp1 pp1 dp4 +distopt)" in result.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "tp2" / "metrics.jsonl")][-2:] == [step + 1, step + 2]


def test_losing_a_node_continues_on_the_survivors_from_the_rebuilt_snapshot(tmp_path, small_dataset):
    """3 emulated nodes x 2 ranks with parity 1; node 2's daemon and ranks are SIGKILLed together.
    The run continues at DP4 on the two survivors from memory, loses no committed step, and
    matches a run that changes from DP6 to DP4 through a disk checkpoint at the same step."""
    steps = 40  # the loss comes after step 10: some 30 steps at DP4 to compare with the reference
    settings = (
        f"train.steps={steps}",
        "train.global_batch_tokens=1536",  # 24 sequences: micro-batches of 2 over 6 and over 4 ranks
        "train.eval_interval=0",
        "checkpoint.interval=0",
    )
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, *settings)
    run = start_stalwart_run(config, "parallel.dp=6", "parallel.distributed_optimizer=true", nodes=3, ranks=6)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_until(lambda: newest_step(metrics) >= 10, run, "ten steps")
    children = children_of(run.pid)
    daemon = [
        pid for pid, cmd in children.items() if "checkpoint.daemon" in cmd and cmd[cmd.index("--node") + 1] == "2"
    ]
    ranks = ranks_below(run.pid)
    assert len(daemon) == 1 and sorted(ranks) == list(range(6)), children
    committed = newest_committed(tmp_path / "run")
    for pid in [*daemon, ranks[4], ranks[5]]:  # node 2: its daemon and ranks 4 and 5
        os.kill(pid, signal.SIGKILL)
    code, out, err = finish(run)
    assert code == 0, err[-3000:]
    assert "node(s) [2] lost" in err
    event = restores(tmp_path / "run")[-1]
    assert event["source"] == "memory" and event["layout"] == "tp1 pp1 dp6 +distopt", event
    lost_at = event["step"]
    assert lost_at >= committed  # no committed step lost
    # Rank 0 maps its own node's segments and reads the other survivor's over the network.
    received = re.search(r"([\d.]+) MiB read from other nodes", event["origin"])
    assert received and float(received.group(1)) > 0, event["origin"]

    # The reference: DP6 with a checkpoint at that step, resumed at DP4 from disk.
    expected = layout_change_reference(tmp_path / "ref", small_dataset, settings[:-1], lost_at, 6, 4)
    got = {r["step"]: r["loss"] for r in read_metrics(metrics)}
    assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
    assert max(abs(got[s] - expected[s]) for s in got) <= 1e-5


def test_a_checkpoint_writer_killed_mid_write_costs_no_snapshot(tmp_path, small_dataset):
    """The daemon's checkpoint writer is SIGKILLed while it writes: the snapshot it was writing
    from is untouched, the ranks restart from it (a write failure is worth a restart), the next
    checkpoints are written, and training goes on bit-exactly."""
    # 15 checkpoints in which to catch a writer at work (polled every 2 ms: usually the first).
    settings = ("train.steps=60", "train.eval_interval=0", "checkpoint.interval=4", "checkpoint.keep=100")
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, *settings)
    run, run_dir = start_run(config, *LAYOUT), tmp_path / "run"
    root = None
    deadline = time.monotonic() + TIMEOUT_S
    while root is None and time.monotonic() < deadline and run.poll() is None:
        for daemon in [p for p, cmd in children_of(run.pid).items() if "checkpoint.daemon" in cmd]:
            for writer, _ in descendants(daemon):  # forked by the daemon's fork server
                if process_name(writer) == WRITER_NAME:
                    os.kill(writer, signal.SIGKILL)
                    root = writer
        if root is None:
            time.sleep(0.002)
    assert root is not None, "no checkpoint writer was caught at work"
    code, out, err = finish(run)
    assert code == 0, err[-3000:]
    assert "writing checkpoint" in err and "from the snapshot failed" in err
    events = restores(run_dir)
    assert [e["source"] for e in events] == ["memory"], events
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    complete = [c for c in checkpoints if (c / "manifest.json").is_file()]
    assert complete[-1].name == "step_000000060"
    for checkpoint in complete[-2:]:
        assert (
            subprocess.run(
                [sys.executable, "-m", "launcher.cli", "ckpt", "verify", str(checkpoint)], capture_output=True, cwd=REPO
            ).returncode
            == 0
        )

    reference = write_tiny_config(tmp_path / "ref.yaml", tmp_path / "ref", small_dataset, *settings)
    assert finish(start_run(reference, *LAYOUT))[0] == 0
    got = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}
    assert got == {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")}


def test_a_daemon_killed_while_ranks_deliver_loses_no_committed_snapshot_or_checkpoint(tmp_path, small_dataset):
    """Node 1's daemon alone is SIGKILLed while the ranks deliver a snapshot every step: its
    ranks fail to deliver, every rank stops, and the run goes on on node 0 from the newest
    snapshot (node 1's share rebuilt from its mirror); every committed checkpoint stays whole."""
    settings = ("train.steps=60", "train.eval_interval=0", "checkpoint.interval=5", "checkpoint.keep=100")
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, *settings)
    run, run_dir = start_run(config, *LAYOUT), tmp_path / "run"
    wait_until(lambda: newest_step(run_dir / "metrics.jsonl") >= 12, run, "twelve steps")
    committed = newest_committed(run_dir)
    daemon = [
        p
        for p, cmd in children_of(run.pid).items()
        if "checkpoint.daemon" in cmd and cmd[cmd.index("--node") + 1] == "1"
    ]
    committed_before = [c.name for c in (run_dir / "checkpoints").glob("step_*") if (c / "manifest.json").is_file()]
    os.kill(daemon[0], signal.SIGKILL)
    code, out, err = finish(run)
    assert code == 0, err[-3000:]
    assert "node(s) [1] lost" in err
    event = restores(run_dir)[-1]
    assert event["source"] == "memory" and event["step"] >= committed, event  # no committed step lost
    for name in committed_before:  # still there, still whole
        verified = subprocess.run(
            [sys.executable, "-m", "launcher.cli", "ckpt", "verify", str(run_dir / "checkpoints" / name)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert verified.returncode == 0, verified.stdout
    assert (run_dir / "checkpoints" / "step_000000060" / "manifest.json").is_file()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 61))
    # The killed daemon's shared memory, which outlives it, is freed too.
    assert not list(Path("/dev/shm").glob(f"stalwart-run-{run.pid}-*"))


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_launcher_killed_leaves_no_rank_or_daemon_behind(tmp_path, small_dataset):
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, "train.steps=400")
    run = start_run(config, *LAYOUT)
    wait_until(lambda: newest_step(tmp_path / "run" / "metrics.jsonl") >= 2, run, "two steps")
    below = dict(descendants(run.pid))  # the daemons, the ranks, their fork server and helpers
    daemons = [pid for pid, cmd in below.items() if "checkpoint.daemon" in cmd]
    assert len(daemons) == 2 and sorted(ranks_below(run.pid)) == [0, 1, 2, 3], below
    os.kill(run.pid, signal.SIGKILL)
    run.process.wait()
    deadline = time.monotonic() + 60
    while left := [pid for pid in below if alive(pid)]:
        assert time.monotonic() < deadline, f"outlived the launcher: {[below[pid] for pid in left]}"
        time.sleep(0.1)


def test_a_run_that_crashes_at_the_same_step_again_and_again_gives_up_after_max_restarts(tmp_path, small_dataset):
    """Every restarted rank is SIGKILLed as soon as it appears, so no newer snapshot is ever
    committed: after run.max_restarts restarts the launcher gives up with exit code 3."""
    config = write_tiny_config(tmp_path / "run.yaml", tmp_path / "run", small_dataset, "train.steps=400")
    run = start_run(config, *LAYOUT, "run.max_restarts=2")
    wait_until(lambda: newest_step(tmp_path / "run" / "metrics.jsonl") >= 3, run, "three steps")
    killed: set[int] = set()
    deadline = time.monotonic() + TIMEOUT_S
    while run.poll() is None and time.monotonic() < deadline:
        for pid in set(ranks_of(run.pid)) - killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.02)
    code, out, err = finish(run)
    assert code == 3, err[-3000:]
    assert "the run crashed 3 times in a row at step" in err and "giving up (run.max_restarts=2)" in err
    assert "training exited with code 3 (crashed at the same step too often: not requeueing)" in err
    assert len(killed) == 3 * 4  # the first run's ranks and two restarts', no third restart


def test_restart_decisions():
    from launcher.supervise import job_exit_code, should_restart

    assert job_exit_code([0, 0]) == 0
    assert job_exit_code([75, 75]) == 75
    assert job_exit_code([-9, 1]) == 1 and job_exit_code([2, 2]) == 2 and job_exit_code([2, -9]) == 1
    assert not should_restart(1, [5], max_restarts=0)
    assert should_restart(1, [5], max_restarts=1) and not should_restart(1, [5, 5], max_restarts=1)
    assert should_restart(1, [5, 5], max_restarts=2) and not should_restart(1, [5, 5, 5], max_restarts=2)
    assert should_restart(1, [5, 5, 6], max_restarts=2)  # progress resets the count
    assert not should_restart(2, [5], max_restarts=3) and not should_restart(75, [5], max_restarts=3)


def test_the_committer_commits_the_newest_whole_step_but_never_skips_one_a_checkpoint_needs():
    from checkpoint.snapshotter import step_to_commit

    plain = lambda *steps: [(s, False) for s in steps]  # noqa: E731
    assert step_to_commit(plain(4, 5, 6), whole=set()) is None
    # Steps shorter than a snapshot takes: the newest is never whole yet, an older one is.
    assert step_to_commit(plain(4, 5, 6), whole={3, 4, 5}) == 5
    assert step_to_commit(plain(4, 5, 6), whole={3, 4, 5, 6}) == 6
    # Step 5 is to be written as a checkpoint: nothing past it is committed before it.
    assert step_to_commit([(4, False), (5, True), (6, False)], whole={4, 6}) == 4
    assert step_to_commit([(5, True), (6, False)], whole={6}) is None
    assert step_to_commit([(5, True), (6, False)], whole={5, 6}) == 5

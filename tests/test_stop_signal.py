"""A scheduler's warning signal: every rank stops after the same step, saves, and says "requeue me"."""

import json
import os
import signal
import time

from checkpoint.commands import verify_checkpoint
from checkpoint.universal import find_resume_checkpoint
from tests.conftest import ranks_below, start_stalwart_run, write_tiny_config
from trainer.errors import EXIT_REQUEUE
from trainer.metrics import read_metrics

STEPS = 24
LAYOUT = ("parallel.dp=2", "parallel.distributed_optimizer=true")
TIMEOUT_S = 300


def start_run(config, *overrides):
    return start_stalwart_run(config, *overrides, nodes=1, ranks=2)


def finish(run):
    return run.finish(TIMEOUT_S)


def rank_pids(launcher_pid: int) -> list[int]:
    """The launcher's ranks (its other child is the snapshot daemon), in rank order."""
    return [pid for _, pid in sorted(ranks_below(launcher_pid).items())]


def wait_for_step(metrics, step, process):
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            process.fail(f"the run ended early (exit code {process.poll()})")
        if metrics.is_file() and any(r["step"] >= step for r in read_metrics(metrics)):
            return
        time.sleep(0.1)
    process.fail(f"step {step} not reached in {TIMEOUT_S} s")


def test_sigusr1_to_one_rank_stops_every_rank_at_one_step_saves_and_resumes_bit_exactly(tmp_path, small_dataset):
    """SIGUSR1 to one rank: the others must agree to stop after the same step. (SIGUSR1 to the
    launcher, which passes it on to every rank: tests/test_recovery.py, the materialize test.)"""
    reference = write_tiny_config(tmp_path / "ref.yaml", tmp_path / "ref", small_dataset, f"train.steps={STEPS}")
    config = write_tiny_config(
        tmp_path / "run.yaml", tmp_path / "run", small_dataset, f"train.steps={STEPS}", "checkpoint.interval=0"
    )
    run = start_run(config, *LAYOUT)
    wait_for_step(tmp_path / "run" / "metrics.jsonl", 4, run)
    os.kill(rank_pids(run.pid)[1], signal.SIGUSR1)
    code, out, err = finish(run)

    assert code == EXIT_REQUEUE, err[-3000:]
    found = find_resume_checkpoint(tmp_path / "run" / "checkpoints")
    assert found is not None, "no checkpoint was committed before the stop"
    stopped_at = found.step
    assert f"stalwart: stopped after step {stopped_at} on a signal; checkpoint committed" in out
    assert 4 <= stopped_at < STEPS
    assert verify_checkpoint(found.path) == []
    # Both ranks' markers are in the committed checkpoint: each stopped after the same step.
    assert sorted(p.name for p in (found.path / "done").iterdir()) == ["rank_00000.json", "rank_00001.json"]

    code, _, err = finish(start_run(config, *LAYOUT))
    assert code == 0, err[-3000:]
    code, _, err = finish(start_run(reference, *LAYOUT))
    assert code == 0, err[-3000:]
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")}
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == expected  # to the last bit, before and after the stop
    assert json.loads((found.path / "state.json").read_text())["step"] == stopped_at

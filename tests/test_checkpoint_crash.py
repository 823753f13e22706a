"""Crash safety: SIGKILL a rank or a checkpoint writer at random points during saves.

Ten crash-restart cycles of one run that checkpoints every step: after each kill, `latest`
must name a complete checkpoint whose every chunk passes its checksum, and the restart must
resume from exactly that checkpoint.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from checkpoint.universal import completeness_problem, find_resume_checkpoint
from tests.conftest import REPO, rank_env, write_tiny_config

TRIALS = 10


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            try:
                cmdline = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            found.append((child, cmdline))
            stack.append(child)
    return found


def start_job(config: Path) -> subprocess.Popen:
    """Two ranks of `python -m trainer CONFIG` under torchrun, in their own session, output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["-m", "trainer", str(config)]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=rank_env(2),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def assert_latest_is_complete(ckpt_dir: Path) -> int | None:
    """`latest` names a complete checkpoint whose every chunk passes its checksum; returns the
    step a resume takes: the newest complete one (a kill between a manifest and `latest`
    leaves `latest` one behind it, which is allowed: both are complete)."""
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    named = ckpt_dir / latest.read_text().strip()
    assert completeness_problem(named) is None, f"latest names {named.name}: {completeness_problem(named)}"
    manifest = json.loads((named / "manifest.json").read_text())
    for array in manifest["arrays"]:
        values = zarr.open(str(named / array), mode="r")[...]  # every chunk's checksum is checked
        assert np.isfinite(values).all(), array
    found = find_resume_checkpoint(ckpt_dir)
    assert found is not None and found.path.name >= named.name
    return found.step


@pytest.fixture
def crash_config(tmp_path, small_dataset) -> Path:
    return write_tiny_config(
        tmp_path / "crash.yaml",
        tmp_path / "run",
        small_dataset,
        "train.steps=400",
        "train.eval_interval=0",
        "checkpoint.interval=1",
        "checkpoint.keep=2",
        "parallel.tp=2",
    )


def test_sigkill_during_saves_never_exposes_an_incomplete_checkpoint(crash_config, tmp_path):
    rng = random.Random(20261122)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    kinds = []
    for trial in range(TRIALS):
        before = assert_latest_is_complete(ckpt_dir)
        job = start_job(crash_config)
        try:
            _wait_for_a_new_commit(ckpt_dir, before, job, timeout=120)
            time.sleep(rng.uniform(0.0, 1.5))
            kind = "writer" if trial % 2 == 0 else "rank"
            victims = [
                p
                for p, cmd in descendants(job.pid)
                if ("checkpoint.writer" in cmd) == (kind == "writer")
                and ("-m trainer" in cmd or "checkpoint.writer" in cmd)
            ]
            assert victims, f"no {kind} process found to kill"
            os.kill(rng.choice(victims), signal.SIGKILL)
            kinds.append(kind)
            try:
                output, _ = job.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
                pytest.fail(
                    f"trial {trial}: the job did not stop within 120 s of killing a {kind}:\n"
                    + job.communicate()[0][-4000:]
                )
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
        assert job.returncode != 0, "the job must fail when a rank or its writer is killed"
        if before is not None:
            resumed = re.search(r"resumed from \S+/step_(\d+)", output)
            assert resumed and int(resumed.group(1)) == before, output[-2000:]
        assert _no_writer_left(timeout=20), "a checkpoint writer outlived its job"
        assert_latest_is_complete(ckpt_dir)  # once the job's last process is gone
    assert kinds.count("writer") == kinds.count("rank") == TRIALS // 2


def _no_writer_left(timeout: float) -> bool:
    """Writers stop once their trainer is gone; none may linger as an orphan."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [pid for pid, cmd in descendants(1) if "checkpoint.writer" in cmd]:
            return True
        time.sleep(0.2)
    return False


def _wait_for_a_new_commit(ckpt_dir: Path, before: int | None, job, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find_resume_checkpoint(ckpt_dir) if (ckpt_dir / "latest").exists() else None
        if found is not None and found.step != before:
            return
        assert job.poll() is None, job.stdout.read()[-3000:]
        time.sleep(0.05)
    pytest.fail("no checkpoint was committed in time")


def test_a_writer_lost_mid_training_stops_every_rank_with_its_message(crash_config, tmp_path):
    """Rank 1's writer dies between saves: both ranks stop at the next checkpoint, naming rank 1."""
    ckpt_dir = tmp_path / "run" / "checkpoints"
    job = start_job(crash_config)
    try:
        _wait_for_a_new_commit(ckpt_dir, None, job, timeout=120)
        victim = [pid for pid, cmd in descendants(job.pid) if "checkpoint.writer" in cmd and _rank_of(pid) == 1]
        assert len(victim) == 1, descendants(job.pid)
        os.kill(victim[0], signal.SIGKILL)
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0
    message = "stalwart: error: the checkpoint writer process died [rank 1]"
    assert output.count(message) == 2, output[-3000:]  # the same line from each rank
    assert assert_latest_is_complete(ckpt_dir) is not None


def _rank_of(writer_pid: int) -> int:
    """The RANK of the trainer that started this writer (writers inherit its environment)."""
    environ = (Path("/proc") / str(writer_pid) / "environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])

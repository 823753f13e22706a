"""Crash safety: SIGKILL a rank or a checkpoint writer in every phase of a save.

Ten crash-restart cycles of one run that checkpoints every step. Each kill is aimed at a
named phase of a save (a trainer staging, a writer writing chunks, finishing its share,
committing), confirmed by freezing the process and reading the phase its staging ring
publishes before the kill lands. After each kill, `latest` must name a complete checkpoint
whose every chunk passes its checksum, and the restart must resume from exactly that
checkpoint.
"""

import json
import os
import random
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

from checkpoint.engine import CheckpointEngine
from checkpoint.universal import CheckpointError, completeness_problem, find_resume_checkpoint
from checkpoint.writer import STAGING, WRITER_PHASE, CreateArrays, FinishStep, Phase
from tests.conftest import REPO, Started, all_pids, descendants, environment, parent_of, rank_env, write_tiny_config

JOB_MARKER = "STALWART_TEST_JOB"
"""Set in a job's environment, which its ranks and their writers inherit: it tells this job's
processes from any other run's on the machine."""


def start_job(config: Path, marker: str) -> Started:
    """Two ranks of `python -m trainer CONFIG` under torchrun, in their own session, output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["-m", "trainer", str(config)]
    return Started(command, env={**rank_env(2), JOB_MARKER: marker}, cwd=REPO, merge_output=True)


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


@dataclass(frozen=True)
class Process:
    pid: int
    rank: int
    role: str
    """"trainer" or "writer"."""
    header: np.ndarray
    """The int64 header slots of the staging ring shared by this rank's trainer and writer."""


@dataclass(frozen=True)
class Kill:
    """SIGKILL a `victim` process while the `watched` process of the same rank is in `phase`."""

    victim: str
    watched: str
    phase: str
    rank: int | None = None
    """Only this rank's processes (committing is rank 0's writer's work)."""

    @property
    def name(self) -> str:
        return f"{self.victim} killed while the {self.watched} is {self.phase}"

    def in_phase(self, header: np.ndarray) -> bool:
        if self.phase == "staging":
            return int(header[STAGING]) == 1
        return int(header[WRITER_PHASE]) == Phase[self.phase.upper()]


KILLS = [
    Kill("trainer", "trainer", "staging"),
    Kill("writer", "writer", "writing"),
    Kill("trainer", "writer", "writing"),
    Kill("writer", "writer", "finishing"),
    Kill("writer", "writer", "committing", rank=0),
]
TRIALS = 2 * len(KILLS)


def job_processes(job: Started) -> list[Process]:
    """The trainers and writers of a running job, each with a view of its rank's ring header."""
    found = []
    for pid, cmd in descendants(job.pid):
        if "checkpoint.writer" in cmd:
            ring = cmd[cmd.index("--ring-fd") + 1]  # anonymous memory: mapped through the writer's descriptor
            header = np.memmap(f"/proc/{pid}/fd/{ring}", dtype=np.int64, mode="r", shape=(8,))
            trainer = parent_of(pid)
            rank = int(environment(pid)["RANK"])
            found += [Process(pid, rank, "writer", header), Process(trainer, rank, "trainer", header)]
    return found


def kill_in_phase(job: Started, kill: Kill, rng: random.Random, timeout: float) -> None:
    """Poll the rings until `kill.watched` is in its phase, freeze it (and the victim), confirm
    the phase while nothing can move, then SIGKILL the victim and let the watched one go on."""
    processes = job_processes(job)
    ranks = sorted({p.rank for p in processes if kill.rank in (None, p.rank)})
    assert ranks, f"no process of rank {kill.rank}: {processes}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert job.poll() is None, job.output()[0][-3000:]
        rank = rng.choice(ranks)
        watched, victim = (
            next(p for p in processes if p.rank == rank and p.role == r) for r in (kill.watched, kill.victim)
        )
        if not kill.in_phase(watched.header):
            time.sleep(0.0002)
            continue
        frozen = {watched.pid, victim.pid}
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        if all(_stopped(pid) for pid in frozen) and kill.in_phase(watched.header):
            os.kill(victim.pid, signal.SIGKILL)
            for pid in frozen - {victim.pid}:
                os.kill(pid, signal.SIGCONT)
            return
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    pytest.fail(f"no chance to kill a {kill.name} within {timeout:.0f} s")


def _stopped(pid: int) -> bool:
    """Wait until a SIGSTOP has taken effect (delivery is asynchronous)."""
    for _ in range(2000):
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state in ("T", "t"):
            return True
        time.sleep(0.0005)
    return False


@pytest.mark.timeout(1800)  # ten runs of a job: a guard against a hang on a loaded machine
def test_sigkill_in_every_phase_of_a_save_never_exposes_an_incomplete_checkpoint(crash_config, tmp_path):
    rng = random.Random(20261122)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    killed = []
    for trial in range(TRIALS):
        kill = KILLS[trial % len(KILLS)]
        before = assert_latest_is_complete(ckpt_dir)
        marker = uuid.uuid4().hex
        job = start_job(crash_config, marker)
        try:
            _wait_for_a_new_commit(ckpt_dir, before, job, timeout=600)
            time.sleep(rng.uniform(0.0, 1.0))  # a random save, not always the second
            kill_in_phase(job, kill, rng, timeout=600)
            killed.append(kill.name)
            code, output, _ = job.finish(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
        assert code != 0, f"the job must fail when a {kill.victim} is killed"
        if before is not None:
            resumed = re.search(r"restored step (\d+) from disk \(\S+/step_(\d+),", output)
            assert resumed and int(resumed.group(1)) == int(resumed.group(2)) == before, output[-2000:]
        # Orphaned writers run at idle priority: on a busy machine noticing takes a while.
        assert _none_left(marker, timeout=300), f"a process of the job outlived it after a {kill.name}"
        assert_latest_is_complete(ckpt_dir)  # once the job's last process is gone
    assert sorted(killed) == sorted(k.name for k in KILLS for _ in range(TRIALS // len(KILLS)))


def _none_left(marker: str, timeout: float) -> bool:
    """Writers stop once their trainer is gone; none of this job's processes may linger as an orphan."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [pid for pid in all_pids() if environment(pid).get(JOB_MARKER) == marker]:
            return True
        time.sleep(0.2)
    return False


def _wait_for_a_new_commit(ckpt_dir: Path, before: int | None, job, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find_resume_checkpoint(ckpt_dir) if (ckpt_dir / "latest").exists() else None
        if found is not None and found.step != before:
            return
        assert job.poll() is None, job.output()[0][-3000:]
        time.sleep(0.05)
    pytest.fail("no checkpoint was committed in time")


def test_a_writer_found_dead_while_staging_is_reported_in_the_same_words_as_anywhere_else(tmp_path):
    """One failure, one message: the staging thread, check() and a flush all say the same."""
    engine = CheckpointEngine(1 << 20)
    try:
        engine.writer.kill()
        engine.writer.wait()
        root = str(tmp_path / "step_000000001")
        create = CreateArrays(root, "token", [], tp=1, timeout_s=5)
        finish = FinishStep(root, 1, 0, 1, b"", commit=False, keep=1, keep_every=None, timeout_s=5)
        engine.stage(create, lambda: iter(()), tp_rank=0, tp=1, finish=finish)  # noticed while staging
        with pytest.raises(CheckpointError) as noticed:
            engine.check()
        assert str(noticed.value) == "the checkpoint writer process died"
        with pytest.raises(CheckpointError) as again:
            engine.wait_written(timeout_s=5)
        assert str(again.value) == str(noticed.value)
    finally:
        engine.close()


def test_a_writer_lost_mid_training_stops_every_rank_with_its_message(crash_config, tmp_path):
    """Rank 1's writer dies between saves: both ranks stop at the next checkpoint, naming rank 1."""
    ckpt_dir = tmp_path / "run" / "checkpoints"
    job = start_job(crash_config, uuid.uuid4().hex)
    try:
        _wait_for_a_new_commit(ckpt_dir, None, job, timeout=600)
        victim = [pid for pid, cmd in descendants(job.pid) if "checkpoint.writer" in cmd and _rank_of(pid) == 1]
        assert len(victim) == 1, descendants(job.pid)
        os.kill(victim[0], signal.SIGKILL)
        code, output, _ = job.finish(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert code != 0
    message = "stalwart: error: the checkpoint writer process died [rank 1]"
    assert output.count(message) == 2, output[-3000:]  # the same line from each rank
    assert assert_latest_is_complete(ckpt_dir) is not None


def _rank_of(writer_pid: int) -> int:
    """The RANK of the trainer that started this writer (writers inherit its environment)."""
    return int(environment(writer_pid)["RANK"])

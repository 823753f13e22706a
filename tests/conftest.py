"""Shared fixtures: a small real dataset, tiny configs, and a torchrun helper with timeouts."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.data import prepare_dataset, stdlib_source_dir
from trainer.schema import apply_override

REPO = Path(__file__).resolve().parents[1]

TINY_CONFIG = {
    "run": {"precision": "fp32", "progress": False},
    "model": {
        "num_layers": 4,
        "hidden_size": 64,
        "ffn_hidden_size": 176,
        "num_attention_heads": 4,
        "num_query_groups": 2,
    },
    "train": {
        "steps": 5,
        "seq_length": 64,
        "global_batch_tokens": 1024,
        "micro_batch_size": 2,
        "eval_interval": 5,
        "eval_batches": 1,
    },
    "optim": {"lr": 1.0e-3, "warmup_steps": 2},
}


_REPORTS: list[str] = []


@pytest.fixture(scope="session")
def report():
    """report(line): shown in pytest's summary at the end. For figures a reader wants to see
    (how long the demo took) that must not be asserted on: machine speed is not behaviour."""
    return _REPORTS.append


def pytest_terminal_summary(terminalreporter):
    if _REPORTS:
        terminalreporter.section("stalwart figures (reported, not asserted)")
        for line in _REPORTS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> str:
    """A real indexed dataset from three stdlib packages, with a 512-token BPE tokenizer."""
    root = tmp_path_factory.mktemp("data")
    stdlib = stdlib_source_dir()
    sources = [stdlib / "email", stdlib / "json", stdlib / "logging"]
    prefix = str(root / "small")
    prepare_dataset(sources, prefix, vocab_size=512, valid_fraction=0.1, show_progress=False)
    return prefix


def write_tiny_config(path: Path, run_dir: Path, dataset: str, *overrides: str) -> Path:
    """The tiny model on `dataset` as a YAML file, with `section.key=value` overrides applied."""
    config = copy.deepcopy(TINY_CONFIG)
    for assignment in (f"run.dir={run_dir}", f"data.path={dataset}", *overrides):
        apply_override(config, assignment)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_config(tmp_path, small_dataset) -> Path:
    """A YAML file of the tiny model on the small dataset, writing into tmp_path/run."""
    return write_tiny_config(tmp_path / "tiny.yaml", tmp_path / "run", small_dataset)


def rank_env(nproc: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def run_command(command: list[str], timeout: float, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group and fail."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {timeout} s\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def torchrun(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Start `nproc` real ranks (gloo) with torchrun on this machine."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return run_command(command, timeout, env=rank_env(nproc), cwd=REPO)


def start_stalwart_run(config: Path, *overrides: str, nodes: int = 1, ranks: int = 2) -> subprocess.Popen:
    """`stalwart run CONFIG --nodes N --set ...` in its own session, left running (see finish())."""
    command = [sys.executable, "-m", "launcher.cli", "run", str(config), "--nodes", str(nodes)]
    command += [f"--set={o}" for o in overrides]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=rank_env(ranks),
        cwd=REPO,
        start_new_session=True,  # a timeout kills the launcher, its ranks and daemons together
    )


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait for a process started by start_stalwart_run(); on timeout kill its session and fail."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the run did not end in {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    return process.returncode, out, err

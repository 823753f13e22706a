"""Shared fixtures: a small real dataset, tiny configs, and a torchrun helper with timeouts."""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from trainer.metrics import read_metrics
from trainer.prepare import prepare_dataset, stdlib_source_dir
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
    "data": {"packing": "concat"},
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


@pytest.fixture
def single_rank(tmp_path):
    """A real one-rank gloo process group in this process, torn down afterwards."""
    import torch.distributed as dist

    from parallel import cpu_compat
    from parallel.config import ParallelConfig
    from parallel.dims import build_parallel_dims, destroy_parallel_dims

    cpu_compat.install()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield build_parallel_dims(ParallelConfig(), seed=1)
    destroy_parallel_dims()
    dist.destroy_process_group()


def rank_env(nproc: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


class Started:
    """A command running in its own session (a timeout kills it with all its children), its
    output going to temporary files: a pipe that nobody reads while a test waits fills up, and
    then every process writing to it stops."""

    def __init__(self, command: list, env: dict | None = None, cwd=None, merge_output: bool = False):
        self.command = [str(part) for part in command]
        self._out = tempfile.TemporaryFile()
        self._err = self._out if merge_output else tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            self.command, stdout=self._out, stderr=self._err, env=env, cwd=cwd, start_new_session=True
        )
        self.dump_stacks_signal: int | None = None  # asks the process to print its stacks before a kill

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def output(self) -> tuple[str, str]:
        """What it printed so far (read without moving the offset that the process writes at)."""
        return _read_all(self._out), "" if self._err is self._out else _read_all(self._err)

    def kill(self) -> None:
        """SIGKILL to its session: the process and every child it left."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def fail(self, reason: str):
        """Kill it and fail the test with `reason` and the ends of what it printed."""
        if self.dump_stacks_signal is not None and self.poll() is None:
            os.kill(self.pid, self.dump_stacks_signal)
            time.sleep(5)
        self.kill()
        out, err = self.output()
        pytest.fail(f"{reason}\n{' '.join(self.command)}\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-12000:]}")

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Its exit code and output once it ends; kill it and fail after `timeout` seconds."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"did not end in {timeout} s")
        return (self.process.returncode, *self.output())


def _read_all(file) -> str:
    fd = file.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


def run_command(command: list[str], timeout: float, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group and fail."""
    code, stdout, stderr = Started(command, env, cwd).finish(timeout)
    return subprocess.CompletedProcess(command, code, stdout, stderr)


def torchrun(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Start `nproc` real ranks (gloo) with torchrun on this machine."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return run_command(command, timeout, env=rank_env(nproc), cwd=REPO)


def start_stalwart_run(config: Path, *overrides: str, nodes: int = 1, ranks: int = 2) -> Started:
    """`stalwart run CONFIG --nodes N --set ...`, left running; a failure first has the ranks
    print their stacks (the launcher passes SIGUSR2 on to them)."""
    command = [sys.executable, "-m", "launcher.cli", "run", str(config), "--nodes", str(nodes)]
    command += [f"--set={o}" for o in overrides]
    run = Started(command, env=rank_env(ranks), cwd=REPO)
    run.dump_stacks_signal = signal.SIGUSR2
    return run


def layout_change_reference(
    run_dir: Path, dataset: str, settings: tuple[str, ...], step: int, dp_before: int, dp_after: int
) -> dict[int, float]:
    """Step -> loss of a run (the tiny model with `settings`, the distributed optimizer) that
    changes from `dp_before` to `dp_after` data-parallel ranks at `step` the plain way, through
    a disk checkpoint: what a run that lost a node at `step` and went on with fewer ranks from
    memory must match."""
    config = write_tiny_config(
        run_dir.with_suffix(".yaml"),
        run_dir,
        dataset,
        *settings,
        f"checkpoint.interval={step}",
        "checkpoint.keep=100",
        "snapshot.interval=0",
        "parallel.distributed_optimizer=true",
    )
    base = [sys.executable, "-m", "launcher.cli", "run", str(config)]
    first = run_command([*base, f"--set=parallel.dp={dp_before}"], 900, env=rank_env(dp_before), cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    for later in (run_dir / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    second = run_command([*base, f"--set=parallel.dp={dp_after}"], 900, env=rank_env(dp_after), cwd=REPO)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"restored step {step} from disk" in second.stdout
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


# -- the processes a test started, seen through /proc (any of them may be ending meanwhile) --


def all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def parent_of(pid: int) -> int | None:
    try:  # the command name, in parentheses, may itself hold spaces and parentheses
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):  # gone (FileNotFoundError, or ProcessLookupError mid-exit)
        return None


def argv(pid: int) -> list[str]:
    """A process's command line, [] once it is gone."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def environment(pid: int) -> dict[str, str]:
    try:
        raw = (Path("/proc") / str(pid) / "environ").read_bytes()
    except OSError:  # gone, or another user's
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def children_of(pid: int) -> dict[int, list[str]]:
    """The live children of `pid` -> their command lines."""
    found = {child: argv(child) for child in all_pids() if parent_of(child) == pid}
    return {child: command for child, command in found.items() if command}


def descendants(pid: int) -> list[tuple[int, list[str]]]:
    """(pid, command line) of every live process below `pid`."""
    parents = {child: parent_of(child) for child in all_pids()}
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        for child in [c for c, p in parents.items() if p == parent]:
            if command := argv(child):
                found.append((child, command))
            stack.append(child)
    return found


def ranks_below(pid: int) -> dict[int, int]:
    """Rank -> pid of the training ranks below `pid` (a launcher). `stalwart run` forks them
    from its fork server and names each after its rank (`stalwart-r3`: trainer/warm.py)."""
    found = {}
    for child, _ in descendants(pid):
        if match := re.fullmatch(r"stalwart-r(\d+)", process_name(child)):
            found[int(match.group(1))] = child
    return found


def process_name(pid: int) -> str:
    """What ps and top show for `pid` (a process names itself: parallel/processes.py); "" once gone."""
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def plan_group_sizes(described: str) -> list[int]:
    """The group sizes in a metrics record's plan_groups, every round's ("2; 1,1" -> [2, 1, 1])."""
    return [int(size) for size in re.split(r"[ ,;]+", described.strip())]

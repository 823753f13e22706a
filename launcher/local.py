"""Launching on one machine: N ranks, started, watched and stopped together."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.supervise import ServingDaemons, already_finished, rebuild_lost, supervise
from parallel.processes import die_with_parent, warm_forks
from trainer.config import Config
from trainer.errors import (
    EXIT_OK,
    DataError,
)


def dataset_exists(prefix: str) -> bool:
    return Path(f"{prefix}-meta.json").is_file()


def prepare_missing_dataset(config: Config) -> None:
    """Build the config's dataset from `data.sources` when it is not there yet (the demo's first run)."""
    if dataset_exists(config.data.path):
        return
    if not config.data.sources:
        raise DataError(
            f"dataset {config.data.path} not found ({config.data.path}-meta.json is missing); "
            "run `stalwart data prepare` or set data.sources"
        )
    Path(config.data.path).parent.mkdir(parents=True, exist_ok=True)
    print(f"stalwart: preparing dataset {config.data.path} from {', '.join(config.data.sources)}", flush=True)
    from trainer.prepare import prepare_dataset

    prepare_dataset(
        config.data.sources,
        config.data.path,
        tokenizer_path=Path(config.data.tokenizer) if config.data.tokenizer else None,
        vocab_size=config.data.vocab_size,
        valid_fraction=config.data.valid_fraction,
        seed=config.train.seed,
    )


def threads_per_rank(nproc: int) -> int:
    """Split the machine's cores between ranks so that CPU ranks do not oversubscribe it."""
    return max(1, (os.cpu_count() or 1) // nproc)


def trainer_args(config_path: str, overrides: list[str]) -> list[str]:
    """The arguments of `python -m trainer` for this config and overrides."""
    args = [config_path]
    for assignment in overrides:
        args += ["--set", assignment]
    return args


PEER_EXIT_GRACE_S = 5.0
"""After one rank ends badly, how long the others get to end on their own (ranks that agreed on
an error print it and exit together) before they are killed: one that waits in a collective
for a dead peer would otherwise wait for the whole process-group timeout."""


class LocalRanks:
    """The ranks of one attempt of a run on this machine: started together, watched, and
    stopped together. The rendezvous store lives here, on a port the system picked, so that
    nothing can take the port between choosing and binding it.

    Each rank is forked warm (trainer/warm.py): from a fork server that imported torch and
    megatron-core once for the whole run, first start and restarts alike."""

    def __init__(self, args: list[str], nproc: int, env: list[dict]):
        from torch.distributed import TCPStore

        self.store = TCPStore("127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False)
        forks = warm_forks("trainer.warm")  # its ranks die with it: see trainer.warm
        self.processes = []
        for rank in range(nproc):
            process = forks.Process(target=_warm_rank, args=(args, self._env(env[rank], rank, nproc)))
            process.start()
            self.processes.append(process)

    def _env(self, env: dict, rank: int, nproc: int) -> dict:
        return {
            **env,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(self.store.port),
            # The ranks join this process's store rather than rank 0 starting one.
            "TORCHELASTIC_USE_AGENT_STORE": "True",
        }

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def signal(self, signum: int) -> None:
        for process in self.processes:
            if process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):  # it ended just now
                    os.kill(process.pid, signum)

    def wait(self) -> list[int]:
        """Every rank's exit code (negative: killed by that signal); once one ends badly, the
        rest get PEER_EXIT_GRACE_S, then SIGKILL."""
        deadline = None
        while any(p.exitcode is None for p in self.processes):
            bad = [p for p in self.processes if p.exitcode not in (None, EXIT_OK)]
            if bad and deadline is None:
                deadline = time.monotonic() + PEER_EXIT_GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
            time.sleep(0.05)
        return [p.exitcode for p in self.processes]


def _warm_rank(args: list[str], env: dict[str, str]) -> None:
    """A rank's body, run in the fork server's child (trainer.warm is imported there already;
    importing it here, in the launcher, would cost the very seconds the fork server saves)."""
    from trainer.warm import run_rank

    run_rank(args, env)


class LocalDaemons(ServingDaemons):
    """One snapshot daemon per emulated node of this machine, each with its own address and its
    share of the ranks, erasure-coding across each other: started before the ranks, stopped
    after them, also when the run fails."""

    START_TIMEOUT_S = 120.0

    def __init__(
        self,
        config_path: str,
        overrides: list[str],
        run_dir: Path,
        nodes: int,
        nproc: int,
        parity: int,
        job: str | None = None,
    ):
        """`job`: the job these daemons continue (its token stays); None starts a new job."""
        from checkpoint.daemon import write_token
        from checkpoint.snapshotter import Daemons

        run_dir.mkdir(parents=True, exist_ok=True)
        token_file = run_dir / "snapshot.token"
        if job is None:
            write_token(token_file)  # a fresh secret for every job
            job = f"{run_dir.resolve().name}-{os.getpid()}"
        self.config_path, self.overrides, self.run_dir, self.parity = config_path, overrides, run_dir, parity
        self.job = job
        per_node = nproc // nodes
        self.processes: list[subprocess.Popen] = []
        self.record: Path | None = None
        try:
            for node in range(nodes):
                self.processes.append(self._start(config_path, overrides, job, node, per_node, nodes))
            addresses = [self._address(node, process) for node, process in enumerate(self.processes)]
        except BaseException:
            self.stop()
            raise
        self.daemons = Daemons(job, addresses, 0, str(token_file))
        self.nodes, self.per_node = nodes, per_node
        self.announce(run_dir, parity)

    def _start(self, config_path, overrides, job, node, per_node, nodes) -> subprocess.Popen:
        ranks = f"{node * per_node}-{(node + 1) * per_node - 1}"
        command = [sys.executable, "-m", "checkpoint.daemon", config_path, "--job", job, "--node", str(node)]
        command += ["--ranks", ranks, "--set", "snapshot.listen=127.0.0.1:0"]
        if nodes > 1:
            command += ["--peers", ",".join(["127.0.0.1:0"] * nodes)]
        for assignment in overrides:
            command += ["--set", assignment]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        # SIGTERM, not SIGKILL: a daemon that stops frees its shared-memory segments.
        arm = functools.partial(die_with_parent, signal.SIGTERM)
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=arm)

    def _address(self, node: int, process: subprocess.Popen) -> str:
        """The address a daemon bound, from the line it prints once it serves."""
        line = process.stdout.readline()  # the daemon prints it, or exits (end of file)
        if "listening on" not in line:
            process.wait(timeout=self.START_TIMEOUT_S)
            raise DaemonStartFailed(
                f"the snapshot daemon of node {node} did not start (exit code {process.returncode})"
            )
        return line.split("listening on", 1)[1].strip()

    def dead_nodes(self) -> list[int]:
        """Nodes whose daemon is gone: with it, the node's snapshots (its share survives as parity)."""
        return [node for node, process in enumerate(self.processes) if process.poll() is not None]

    def without(self, lost: list[int]) -> tuple[LocalDaemons, dict[str, str]]:
        """After losing `lost`: a fresh group on the surviving nodes (same job and token), and
        what the ranks need to restore the newest snapshot from the survivors of this group."""
        from checkpoint.snapshot_store import unlink_segments

        for node in lost:  # the node's memory is gone with it (and the new group reuses its index)
            unlink_segments(self.job, node)
        survivors = [n for n in range(self.nodes) if n not in lost]
        restore = rebuild_lost(self.daemons, lost, survivors, self.parity)
        nproc = len(survivors) * self.per_node
        group = LocalDaemons(
            self.config_path, self.overrides, self.run_dir, len(survivors), nproc, self.parity, job=self.daemons.job
        )
        return group, restore

    def stop(self) -> None:
        """Stop every daemon; free what one that was killed left in shared memory."""
        from checkpoint.snapshot_store import unlink_segments

        self.forget()
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for node, process in enumerate(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            unlink_segments(self.job, node)  # nothing, after a daemon that stopped cleanly


class DaemonStartFailed(RuntimeError):
    pass


REPO = Path(__file__).resolve().parents[1]


def launch_local(config: Config, config_path: str, overrides: list[str], nproc: int, nodes: int = 1) -> int:
    """Run the ranks on this machine until they end, with one snapshot daemon per emulated node;
    restart crashed ranks inside the job; SIGTERM/SIGUSR1 are passed on to the ranks."""
    # In this process's own environment: the fork server the ranks come from starts with it.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    env = dict(os.environ)
    if already_finished(config):
        return EXIT_OK
    snapshots = config.snapshot.interval != 0
    run_dir, parity = Path(config.run.dir), config.snapshot.parity
    daemons = LocalDaemons(config_path, overrides, run_dir, nodes, nproc, parity) if snapshots else None

    def start(overrides: list[str], nproc: int, daemons: LocalDaemons | None, restore: dict) -> LocalRanks:
        rank_env = [dict(env, **(daemons.env(rank) if daemons else {}), **restore) for rank in range(nproc)]
        return LocalRanks(trainer_args(config_path, overrides), nproc, rank_env)

    return supervise(config, overrides, nproc, daemons, start)

"""Slurm: `sbatch launcher/pretrain.slurm CONFIG [--set KEY=VALUE ...]`.

The batch script execs `python -m launcher.slurm CONFIG ...` in the batch shell, on the
allocation's first node. That process supervises the job: it starts one snapshot daemon per
node as a job step of its own, which outlives a node's failure (`srun --no-kill --overlap`:
with `--overlap` alone Slurm kills it on the surviving nodes too, and the snapshots with it),
then the training step (`srun --wait=5`: once one rank has ended, the rest get 5 s to end as
well, so that a failing rank ends the step on every node within seconds, not after a
collective's 30-minute timeout), and restarts the training
step inside the job after a crash, with the recovery loop `stalwart run` uses
(launcher/supervise.py). Signals the batch shell gets (USR1 before the time limit) go on to
srun, which passes them on to every rank.

Inside those steps, `python -m launcher.slurm --daemon ...` and `--rank ...` turn Slurm's
per-task variables into a daemon's arguments and a rank's environment.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.supervise import (
    FORWARDED,
    ServingDaemons,
    already_finished,
    data_parallel_override,
    rebuild_lost,
    supervise,
)
from trainer.errors import EXIT_OK, EXIT_REQUEUE


@dataclass(frozen=True)
class Allocation:
    """The nodes Slurm gave this job, and how many ranks each runs."""

    job_id: int
    nodes: list[str]
    """Host names, in Slurm's order: the first runs the batch shell and the rendezvous."""
    addresses: list[str]
    """Each node's address (Slurm's NodeAddr)."""
    ranks_per_node: int
    requeues: int
    """How often the job was requeued before this run of it (SLURM_RESTART_COUNT)."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Allocation:
        env = dict(os.environ if env is None else env)
        missing = [key for key in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST") if key not in env]
        if missing:
            raise SlurmError(f"{', '.join(missing)} not set: run this through `sbatch launcher/pretrain.slurm`")
        nodes = _scontrol("show", "hostnames", env["SLURM_JOB_NODELIST"]).split()
        addresses = node_addresses(_scontrol("show", "node", "--oneliner", ",".join(nodes)))
        return cls(
            job_id=int(env["SLURM_JOB_ID"]),
            nodes=nodes,
            addresses=[addresses.get(node, node) for node in nodes],
            ranks_per_node=ranks_per_node(env),
            requeues=int(env.get("SLURM_RESTART_COUNT", "0")),
        )


class SlurmError(RuntimeError):
    pass


def node_addresses(scontrol_nodes: str) -> dict[str, str]:
    """Node name -> NodeAddr, from `scontrol show node --oneliner`."""
    found = {}
    for line in scontrol_nodes.splitlines():
        name, addr = re.search(r"NodeName=(\S+)", line), re.search(r"NodeAddr=(\S+)", line)
        if name and addr:
            found[name.group(1)] = addr.group(1)
    return found


def ranks_per_node(env: dict[str, str]) -> int:
    """Slurm's tasks per node (`--ntasks-per-node`; one rank per GPU on a GPU cluster)."""
    raw = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
    count = re.match(r"\d+", raw)  # SLURM_TASKS_PER_NODE reads like "8(x4)"
    if count is None or int(count.group()) < 1:
        raise SlurmError(f"cannot read the ranks per node from {raw!r}: pass --ntasks-per-node")
    return int(count.group())


def rendezvous_port(job_id: int, requeues: int, restart: int) -> int:
    """The ranks' rendezvous port: from the job, its requeues and the restart inside it, so
    that a restart never meets the previous attempt's socket, and two jobs sharing a first
    node rarely meet each other's (in 20000-39999, below Linux's ephemeral ports)."""
    return 20000 + (job_id * 1009 + requeues * 101 + restart) % 20000


def _scontrol(*args: str, cwd: str | None = None) -> str:
    done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    if done.returncode != 0:
        raise SlurmError(f"scontrol {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


class SlurmDaemons(ServingDaemons):
    """One snapshot daemon per node of `nodes` (indices into the allocation), as one job step
    that survives a node's failure; the i-th node of the step is the group's node i."""

    START_TIMEOUT_S = 120.0
    lost: list[int] = []
    """This group's nodes lost (once a group on the survivors replaced it)."""
    started = 0
    """Groups this job started (each its own step, named after its number)."""

    def __init__(
        self,
        alloc: Allocation,
        nodes: list[int],
        config_path: str,
        overrides: list[str],
        run_dir: Path,
        parity: int,
        job: str | None = None,
    ):
        from checkpoint.daemon import write_token
        from checkpoint.snapshotter import Daemons

        run_dir.mkdir(parents=True, exist_ok=True)
        token_file = run_dir / "snapshot.token"
        if job is None:
            write_token(token_file)  # a fresh secret for every job, readable by its user only
            job = f"slurm-{alloc.job_id}-{alloc.requeues}"
        self.alloc, self.node_indices = alloc, nodes
        self.config_path, self.overrides, self.run_dir, self.parity = config_path, overrides, run_dir, parity
        self.nodes, self.per_node = len(nodes), alloc.ranks_per_node
        addresses = [alloc.addresses[n] for n in nodes]
        SlurmDaemons.started += 1
        self.step_name = f"stalwart-daemons-{SlurmDaemons.started}"
        command = [
            *srun_command(alloc, nodes, 1, self.step_name),
            "--no-kill",
            "--overlap",
            "--kill-on-bad-exit=0",
            sys.executable,
            "-m",
            "launcher.slurm",
            "--daemon",
            config_path,
            "--job",
            job,
            "--ranks-per-node",
            str(self.per_node),
            "--addresses",
            ",".join(addresses),
        ]
        for assignment in overrides:
            command += ["--set", assignment]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        try:
            bound = self._bound_addresses()
        except BaseException:
            self.stop()
            raise
        self.daemons = Daemons(job, bound, 0, str(token_file))
        self.announce(run_dir, parity)

    def _bound_addresses(self) -> list[str]:
        """Each daemon's address, from the line it prints once it serves."""
        found: dict[int, str] = {}
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while len(found) < self.nodes:
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.process.stdout.readline() if ready else ""
            if not line:
                raise SlurmError(f"the snapshot daemons did not all start (started: nodes {sorted(found)})")
            if match := re.search(r" node (\d+) listening on (\S+)", line):
                found[int(match.group(1))] = match.group(2)
        return [found[node] for node in range(self.nodes)]

    def dead_nodes(self) -> list[int]:
        """Nodes whose daemon no longer answers (its node is gone, or the daemon is)."""
        from checkpoint.daemon import read_token
        from checkpoint.snapshot_client import SnapshotClient

        token, dead = read_token(self.daemons.token_file), []
        for node, address in enumerate(self.daemons.addresses):
            client = SnapshotClient(address, self.daemons.job, token, deadline_s=5)
            try:
                client.list()
            except Exception:
                dead.append(node)
            finally:
                client.close()
        return dead

    def without(self, lost: list[int]) -> tuple[SlurmDaemons, dict[str, str]]:
        self.lost = lost
        survivors = [n for n in range(self.nodes) if n not in lost]
        restore = rebuild_lost(self.daemons, lost, survivors, self.parity)
        nodes = [self.node_indices[n] for n in survivors]
        release_nodes(self.alloc, [self.node_indices[n] for n in lost], nodes)
        group = SlurmDaemons(
            self.alloc, nodes, self.config_path, self.overrides, self.run_dir, self.parity, job=self.daemons.job
        )
        return group, restore

    def stop(self) -> None:
        """Stop the daemons with SIGTERM, each freeing its segments as it stops. Through
        scancel: srun itself answers SIGTERM by killing its tasks outright."""
        self.forget()
        if self.process.poll() is None:
            step = step_id(self.alloc.job_id, self.step_name)
            if step is not None:
                subprocess.run(["scancel", "--signal=TERM", step], capture_output=True, timeout=60)
            # srun may end before its tasks do; the step is listed until the last has ended, or,
            # with a lost node among its own, until Slurm notices that node is gone (minutes):
            # then srun's end, once it has given up on that node, is the end of the rest.
            deadline = time.monotonic() + 60
            while step is not None and step_id(self.alloc.job_id, self.step_name) and time.monotonic() < deadline:
                if self.lost and self.process.poll() is not None:
                    break
                time.sleep(0.2)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def release_nodes(alloc: Allocation, lost: list[int], keep: list[int]) -> None:
    """Give the lost nodes back: the job shrinks to `keep` at once, rather than holding nodes it
    no longer uses until Slurm itself notices they are dead (after SlurmdTimeout, minutes on
    most clusters), and the site's health checks can take them over."""
    names = ",".join(alloc.nodes[n] for n in keep)
    print(f"stalwart: releasing node(s) {', '.join(alloc.nodes[n] for n in lost)} from job {alloc.job_id}", flush=True)
    try:  # in a directory of its own: a resize leaves scripts that update a shell's SLURM_* there
        with tempfile.TemporaryDirectory() as scratch:
            _scontrol("update", f"JobId={alloc.job_id}", f"NodeList={names}", cwd=scratch)
    except SlurmError as e:  # the job goes on regardless; Slurm removes dead nodes itself later
        print(f"stalwart: could not release the lost node(s): {e}", file=sys.stderr, flush=True)


def step_id(job_id: int, name: str) -> str | None:
    """The id (JOB.STEP) of the job's running step named `name`, if there is one."""
    listed = subprocess.run(
        ["squeue", "--steps", f"--jobs={job_id}", "--noheader", "--format=%i %j"], capture_output=True, text=True
    )
    return next((line.split()[0] for line in listed.stdout.splitlines() if line.split()[1:] == [name]), None)


def srun_command(alloc: Allocation, nodes: list[int], per_node: int, name: str) -> list[str]:
    """srun on exactly these nodes of the allocation, `per_node` tasks each."""
    names = ",".join(alloc.nodes[n] for n in nodes)
    # --ntasks too: srun reads the batch's SLURM_NTASKS otherwise, which is the whole job's.
    counts = [f"--nodes={len(nodes)}", f"--ntasks={len(nodes) * per_node}", f"--ntasks-per-node={per_node}"]
    return ["srun", f"--job-name={name}", *counts, f"--nodelist={names}"]


PEER_EXIT_GRACE_S = 5
"""Once one rank has ended, how long srun gives the others before it ends them (as the local
launcher does: ranks that agreed on an error or a stop end together)."""


HEALTH_PERIOD_S = 2.0
"""How often the supervisor asks the daemons whether their nodes are alive while ranks train."""


class SrunRanks:
    """The training step: every rank of one attempt, started by srun on `nodes`, watched through
    the nodes' daemons."""

    def __init__(
        self,
        alloc: Allocation,
        nodes: list[int],
        args: list[str],
        env: dict[str, str],
        restart: int,
        daemons: SlurmDaemons | None = None,
    ):
        env = {
            **env,
            "MASTER_ADDR": alloc.addresses[nodes[0]],
            "MASTER_PORT": str(rendezvous_port(alloc.job_id, alloc.requeues, restart)),
        }
        self.alloc, self.daemons, self.name = alloc, daemons, f"stalwart-train-{restart}"
        # Not --kill-on-bad-exit: it kills the other ranks the moment the first exits with the
        # requeue code, while they are still on their way out with the same code. --overlap:
        # after a node's loss srun gives up on the step before Slurm has noticed the node is
        # gone, and the step is listed as running, holding the survivors' CPUs, until Slurm
        # does (after SlurmdTimeout, minutes); a step that does not overlap could not start.
        grace = ["--kill-on-bad-exit=0", f"--wait={PEER_EXIT_GRACE_S}", "--overlap"]
        command = [*srun_command(alloc, nodes, alloc.ranks_per_node, self.name), *grace]
        command += [sys.executable, "-m", "launcher.slurm", "--rank", *args]
        self.process = subprocess.Popen(command, env=env)

    def wait(self) -> list[int]:
        """srun's exit code stands for every rank's: theirs when they agree, else a crash's.

        A node whose daemon stops answering twice in a row is taken as lost, and the step is
        ended at once: srun would wait for that node's tasks until its own timeout."""
        missed: dict[int, int] = {}
        while True:
            try:
                return [self.process.wait(timeout=HEALTH_PERIOD_S)]
            except subprocess.TimeoutExpired:
                pass
            if self.daemons is None:
                continue
            dead = set(self.daemons.dead_nodes())
            missed = {node: missed.get(node, 0) + 1 for node in dead}
            if lost := sorted(node for node, count in missed.items() if count >= 2):
                self._end(lost)
                return [self.process.wait()]

    def _end(self, lost: list[int]) -> None:
        names = [self.alloc.nodes[self.daemons.node_indices[n]] for n in lost]
        print(f"stalwart: the daemon(s) of {', '.join(names)} stopped answering: ending the training step", flush=True)
        self.process.kill()
        # The ranks on the other nodes too, which may wait for the lost node's in a collective.
        # Not waited for: scancel waits for the lost node's slurmd, in vain, for MessageTimeout.
        step = step_id(self.alloc.job_id, self.name)
        if step is not None:
            subprocess.Popen(["scancel", "--signal=KILL", step], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)


def launch_slurm(config_path: str, overrides: list[str]) -> int:
    """The batch shell's part: daemons, then training steps until the run ends."""
    from launcher.local import prepare_missing_dataset, trainer_args
    from trainer.config import load_config

    # From the start: the time limit's warning may come while the daemons start, and must not
    # kill this shell. It is not passed on to ranks that start later (they would die of it
    # while importing); the job then ends at its limit, on SIGTERM.
    signals: list[int] = []
    for signum in FORWARDED:
        signal.signal(signum, lambda signum, frame: signals.append(signum))
    alloc = Allocation.from_env()
    nproc = len(alloc.nodes) * alloc.ranks_per_node
    config = load_config(config_path, overrides)
    overrides = [*overrides, data_parallel_override(config, nproc)]  # the layout this allocation has
    config = load_config(config_path, overrides)
    config.validate(world_size=nproc)
    if already_finished(config):
        return EXIT_OK
    prepare_missing_dataset(config)
    every = list(range(len(alloc.nodes)))
    run_dir = Path(config.run.dir)
    snapshots = config.snapshot.interval != 0
    daemons = SlurmDaemons(alloc, every, config_path, overrides, run_dir, config.snapshot.parity) if snapshots else None
    restarts = itertools.count()
    print(
        f"stalwart: job {alloc.job_id} on {len(alloc.nodes)} node(s) x {alloc.ranks_per_node} rank(s)"
        + (f", snapshot daemons at {', '.join(daemons.daemons.addresses)}" if daemons else ""),
        flush=True,
    )

    def start(overrides: list[str], nproc: int, daemons: SlurmDaemons | None, restore: dict) -> SrunRanks:
        env = {**os.environ, **(daemons.env(0) if daemons else {}), **restore}
        nodes = daemons.node_indices if daemons else every
        return SrunRanks(alloc, nodes, trainer_args(config_path, overrides), env, next(restarts), daemons)

    code = supervise(config, overrides, nproc, daemons, start, signals)
    if should_requeue(code, signals):
        requeue(alloc.job_id)
    return code


def should_requeue(code: int, signals: list[int]) -> bool:
    """Requeue when the ranks saved and stopped on the time limit's warning (USR1, from
    `--signal=B:USR1@N`), and never after a cancel or a preemption (SIGTERM) nor once the
    run has finished or failed (a pure decision)."""
    return code == EXIT_REQUEUE and signal.SIGUSR1 in signals and signal.SIGTERM not in signals


def requeue(job_id: int) -> None:
    """Put this job back in the queue; Slurm then ends this batch shell. The requeued job is
    eligible again once the cluster's job credentials have expired (AuthInfo cred_expire,
    120 s by default): Slurm sets that begin time when the job has ended, after this shell,
    so nothing inside the job can bring it forward."""
    print(f"stalwart: requeueing job {job_id} to continue from its newest checkpoint", flush=True)
    done = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        print(f"stalwart: scontrol requeue {job_id} failed: {done.stderr.strip()}", file=sys.stderr, flush=True)


def run_daemon(args: argparse.Namespace) -> int:
    """One task of the daemon step: this node's daemon, its index and ranks from Slurm."""
    from checkpoint.daemon import main as daemon_main

    node, addresses = int(os.environ["SLURM_NODEID"]), args.addresses.split(",")
    first = node * args.ranks_per_node
    argv = [
        args.config,
        "--job",
        args.job,
        "--node",
        str(node),
        "--ranks",
        f"{first}-{first + args.ranks_per_node - 1}",
    ]
    if len(addresses) > 1:
        argv += ["--peers", ",".join(f"{address}:0" for address in addresses)]
    for assignment in [*args.overrides, f"snapshot.listen={addresses[node]}:0"]:
        argv += ["--set", assignment]
    return daemon_main(argv)


def rank_env(env: dict[str, str]) -> dict[str, str]:
    """What a rank that srun started needs besides Slurm's variables: torch's, and its node's
    index in the daemon group (its node in this step)."""
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": str(ranks_per_node(env)),
        **({"STALWART_NODE": env["SLURM_NODEID"]} if "STALWART_DAEMONS" in env else {}),
    }


def run_rank(trainer_argv: list[str]) -> int:
    from trainer.__main__ import main as trainer_main

    os.environ.update(rank_env(dict(os.environ)))
    return trainer_main(trainer_argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank"]:
        return run_rank(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m launcher.slurm", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--daemon", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--ranks-per-node", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--addresses", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.daemon:
        return run_daemon(args)
    from trainer.errors import EXIT_BAD_INPUT, DataError
    from trainer.schema import ConfigError

    try:
        return launch_slurm(args.config, args.overrides)
    except (SlurmError, ConfigError, DataError) as e:
        print(f"stalwart: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

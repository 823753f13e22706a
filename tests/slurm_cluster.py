"""A real Slurm cluster on this machine for the tests: one slurmctld and three slurmd, each
started as its own node (`slurmd -N n1`), on ports of their own.

Debian's slurm-wlm (22.05) is built with multiple-slurmd support, which lets one host play
several nodes; authentication and credentials are off (`auth/none`, `cred/none`: both ship
with the package), which is safe on loopback and spares a munge daemon. Nothing here mocks
Slurm: sbatch, srun, scontrol and scancel are the real ones, talking to real daemons.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import all_pids, environment, parent_of

NODES = ("n1", "n2", "n3")
START_TIMEOUT_S = 120


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (held open together, so that they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def slurm_conf(root: Path, controller_port: int, node_ports: list[int], cpus: int) -> str:
    """slurm.conf of a cluster whose every node is this host, each slurmd on its own port."""
    lines = [
        "ClusterName=stalwart-test",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={controller_port}",
        "AuthType=auth/none",
        "CredType=cred/none",
        "ProctrackType=proctrack/pgid",
        "TaskPlugin=task/none",
        "SlurmdParameters=config_overrides",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool' / '%n'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        "SchedulerType=sched/backfill",
        "SelectType=select/linear",
        "ReturnToService=2",  # a node that comes back is usable again
        "MpiDefault=none",
        "JobRequeue=1",
        "KillWait=5",
        "SlurmdTimeout=20",
        # A requeued job may start again once its credentials expire (120 s by default).
        "AuthInfo=cred_expire=10",
    ]
    for name, port in zip(NODES, node_ports, strict=True):
        lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus}")
    lines.append(f"PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES")
    return "\n".join(lines) + "\n"


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    """The environment that points sbatch, srun and friends at this cluster (SLURM_CONF)."""

    @classmethod
    def start(cls, root: Path) -> SlurmCluster:
        missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(
                f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm, as .ci/run does"
            )
        for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        controller, *nodes = free_ports(1 + len(NODES))
        conf = root / "slurm.conf"
        conf.write_text(slurm_conf(root, controller, nodes, cpus=os.cpu_count() or 1))
        cluster = cls(root, {**os.environ, "SLURM_CONF": str(conf)})
        try:
            cluster._run("slurmctld", "-c")  # -c: a clean state, no jobs from an earlier cluster
            for node in NODES:
                cluster._run("slurmd", "-N", node)
            cluster.wait_until_idle(NODES)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}{self.logs()}")
        return done

    def node_states(self) -> dict[str, str]:
        """Node -> its state as sinfo reports it (idle, alloc, down*, ...)."""
        out = self._run("sinfo", "--noheader", "--Node", "--format=%N %t").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_until_idle(self, nodes) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while any(self.node_states().get(n) != "idle" for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle after {START_TIMEOUT_S} s: {self.node_states()}{self.logs()}")
            time.sleep(0.2)

    def lose_node(self, name: str) -> None:
        """Node `name` fails as a machine that loses power: its slurmd and every process of its
        job steps (the tasks, which carry its name in SLURMD_NODENAME, and the slurmstepd
        above each) are SIGKILLed together; the other nodes, on this same host, carry on."""
        tasks = [pid for pid in all_pids() if environment(pid).get("SLURMD_NODENAME") == name]
        stepds = {parent_of(pid) for pid in tasks} - {None, 1}
        slurmd = int((self.root / f"slurmd-{name}.pid").read_text())
        memory = {path for pid in tasks for path in shared_memory_of(pid)}
        for pid in [slurmd, *stepds, *tasks]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for path in memory:  # a lost machine's memory is gone with it; this host's would stay
            Path(path).unlink(missing_ok=True)

    def bring_back(self, name: str) -> None:
        """Start a lost node's slurmd again and wait until Slurm schedules on it."""
        self._run("slurmd", "-N", name)
        self.wait_until_idle([name])

    def logs(self) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"\n--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        return "".join(parts)

    def stop(self) -> None:
        """Stop every daemon of the cluster; what does not stop in time is killed."""
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=60)
        pid_files = [self.root / "slurmctld.pid", *(self.root / f"slurmd-{n}.pid" for n in NODES)]
        deadline = time.monotonic() + 30
        for pid_file in pid_files:
            pid = int(pid_file.read_text()) if pid_file.is_file() else None
            while pid is not None and _alive(pid):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.1)


def shared_memory_of(pid: int) -> set[str]:
    """The files under /dev/shm that a process has mapped or open."""
    found = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            if " /dev/shm/" in line:
                found.add(line[line.index("/dev/shm/") :].removesuffix(" (deleted)"))
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if (target := os.readlink(fd)).startswith("/dev/shm/"):
                    found.add(target.removesuffix(" (deleted)"))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False

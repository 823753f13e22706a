"""A run's ranks supervised inside the job, whatever starts them: the one recovery loop of
`stalwart run` on one machine (launcher/local.py) and of a Slurm job (launcher/slurm.py).

The ranks run until they end. A crash restarts them, restoring from the node daemons'
memory; a lost node's share is rebuilt from parity and the run goes on on the survivors at a
smaller data-parallel size; a run that crashes again and again at the same step gives up
with a code that says "do not requeue". The launcher passes the scheduler's signals on to
the ranks.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from trainer.config import Config
from trainer.errors import EXIT_BAD_INPUT, EXIT_CRASHED, EXIT_GAVE_UP, EXIT_OK, EXIT_REQUEUE


class Ranks(Protocol):
    """One attempt's ranks, started together."""

    def wait(self) -> list[int]:
        """Their exit codes (negative: killed by that signal), once all have ended."""

    def signal(self, signum: int) -> None: ...


class DaemonGroup(Protocol):
    """The snapshot daemons of one attempt, one per node."""

    nodes: int
    per_node: int
    """Ranks per node."""

    def env(self, rank: int) -> dict[str, str]:
        """What rank `rank` needs to find its node's daemon."""

    def dead_nodes(self) -> list[int]: ...

    def without(self, lost: list[int]) -> tuple[DaemonGroup, dict[str, str]]:
        """A group on the survivors, and what the ranks need to restore from the old one."""

    def newest_step(self) -> int | None: ...

    def stop(self) -> None: ...


class ServingDaemons:
    """What every launcher's daemon group does once its daemons serve: `self.daemons`
    (checkpoint.snapshotter.Daemons), `self.per_node` ranks per node, `self.record`."""

    daemons: object
    per_node: int
    record: Path | None = None

    def announce(self, run_dir: Path, parity: int) -> None:
        """Tell every daemon the others' addresses (they erasure-code across each other), and
        write where they are for operators (`stalwart snapshot --run RUN_DIR status`)."""
        from checkpoint.daemon import read_token
        from checkpoint.snapshot_client import SnapshotClient
        from checkpoint.snapshot_commands import DAEMONS_FILE

        d = self.daemons
        token = read_token(d.token_file)
        for address in d.addresses if len(d.addresses) > 1 else []:
            client = SnapshotClient(address, d.job, token)
            client.set_peers(d.addresses)
            client.close()
        self.record = run_dir / DAEMONS_FILE
        about = {
            "job": d.job,
            "daemons": d.addresses,
            "token_file": str(Path(d.token_file).resolve()),
            "parity": parity,
        }
        self.record.write_text(json.dumps(about, indent=1))

    def forget(self) -> None:
        """Remove the operators' record of a group that is stopping."""
        if self.record is not None:
            self.record.unlink(missing_ok=True)

    def env(self, rank: int) -> dict[str, str]:
        return self.daemons.env(rank // self.per_node)

    def newest_step(self) -> int | None:
        return newest_common_step(self.daemons)


StartRanks = Callable[[list[str], int, "DaemonGroup | None", dict[str, str]], Ranks]
"""(overrides, ranks, daemons, restore environment) -> the started ranks."""

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
"""Signals the launcher passes on to every rank (a scheduler signals the launcher, not the ranks):
the two that stop a run, and SIGUSR2, on which every rank prints its threads' stacks."""


def stop_requested(signals: list[int]) -> bool:
    """Whether the job was asked to stop (SIGTERM: cancelled or preempted; SIGUSR1: the time
    limit is near): after that a crash is not worth a restart."""
    return signal.SIGTERM in signals or signal.SIGUSR1 in signals


def supervise(
    config: Config,
    overrides: list[str],
    nproc: int,
    daemons: DaemonGroup | None,
    start: StartRanks,
    signals: list[int] | None = None,
) -> int:
    """Run ranks until they end, restarting them inside the job after a crash; the job's exit
    code. The signals passed on to the ranks are appended to `signals`."""
    retired: list[DaemonGroup] = []  # groups that lost a node: the source of the next restore
    current: list[Ranks] = []
    signals = [] if signals is None else signals

    def forward(signum, frame) -> None:
        signals.append(signum)
        if current:
            current[-1].signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    steps_at_crashes: list[int | None] = []
    layout: list[str] = []  # overrides of a smaller layout after a node's loss
    restore: dict[str, str] = {}
    try:
        while True:
            current.append(start([*overrides, *layout], nproc, daemons, restore))
            code = job_exit_code(current[-1].wait())
            lost = daemons.dead_nodes() if daemons else []
            if code == EXIT_CRASHED and lost and len(lost) < daemons.nodes:
                retired.append(daemons)
                daemons, restore = daemons.without(lost)
                nproc = daemons.nodes * daemons.per_node
                layout = [data_parallel_override(config, nproc)]
                continue
            newest = daemons.newest_step() if daemons else _newest_checkpoint_step(config)
            if newest is not None and daemons is not None:
                restore = {}  # the new group holds a snapshot of its own now
            steps_at_crashes.append(newest)
            if stop_requested(signals) or not should_restart(code, steps_at_crashes, config.run.max_restarts):
                break  # after a stop signal the job is ending (cancelled, preempted, out of time)
            print(f"stalwart: a rank crashed; restarting the ranks (restart {len(current)})", file=sys.stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # The newest group first: an older one shares its job and node indices, and stopping
        # it frees the segments its killed daemons left under those names.
        for group in [*([daemons] if daemons else []), *reversed(retired)]:
            group.stop()
    if code == EXIT_CRASHED and len(current) > 1 and not stop_requested(signals):
        code = EXIT_GAVE_UP
        print(
            f"stalwart: error: the run crashed {config.run.max_restarts + 1} times in a row at step "
            f"{steps_at_crashes[-1]}; giving up (run.max_restarts={config.run.max_restarts})",
            file=sys.stderr,
        )
    if code != EXIT_OK:
        print(f"stalwart: training exited with code {code} ({EXIT_MEANINGS[code]})", file=sys.stderr)
    return code


def rebuild_lost(daemons, lost: list[int], survivors: list[int], parity: int) -> dict[str, str]:
    """Rebuild the lost nodes' shares of the newest snapshot from parity onto the first
    survivor (`daemons`: checkpoint.snapshotter.Daemons of the old group); what the new
    ranks need to restore it from the survivors. Nothing when more nodes are lost than the
    parity covers: the new ranks then find no snapshot and resume from disk."""
    from checkpoint.daemon import read_token
    from checkpoint.snapshot_client import SnapshotClient
    from checkpoint.snapshotter import RESTORE_FROM, RESTORE_STEP

    if not survivors or len(lost) > parity:
        print(f"stalwart: node(s) {lost} lost, more than snapshot.parity covers: resuming from disk", file=sys.stderr)
        return {}
    token = read_token(daemons.token_file)
    holder = SnapshotClient(daemons.addresses[survivors[0]], daemons.job, token, deadline_s=600)
    try:
        steps = [holder.rebuild(node).step for node in lost]
    finally:
        holder.close()
    print(
        f"stalwart: node(s) {lost} lost; their share of step {steps[-1]} rebuilt from parity on node "
        f"{survivors[0]}; continuing on {len(survivors)} node(s)",
        file=sys.stderr,
        flush=True,
    )
    return {RESTORE_FROM: ",".join(daemons.addresses[n] for n in survivors), RESTORE_STEP: str(steps[-1])}


def newest_common_step(daemons) -> int | None:
    """The newest snapshot step every daemon of `daemons` (checkpoint.snapshotter.Daemons)
    holds whole: what a restart would continue from. A daemon that is gone holds nothing."""
    from checkpoint.daemon import read_token
    from checkpoint.snapshot_client import SnapshotClient

    token = read_token(daemons.token_file)
    steps = None
    for address in daemons.addresses:
        client = SnapshotClient(address, daemons.job, token, deadline_s=10)
        try:
            held = {s.step for s in client.list(include_ready=True)}
        except Exception:
            held = set()
        finally:
            client.close()
        steps = held if steps is None else steps & held
    return max(steps) if steps else None


def data_parallel_override(config: Config, nproc: int) -> str:
    """The layout for `nproc` ranks: the config's TP and PP, the rest data-parallel."""
    return f"parallel.dp={nproc // (config.parallel.tp * config.parallel.pp)}"


def job_exit_code(codes: list[int]) -> int:
    """One exit code for the job from its ranks' (a pure decision, see trainer/errors.py).

    A rank killed by a signal (negative code) or crashed makes the job crashed; otherwise the
    ranks agree (they stop together), and a bad-input error wins over a stop.
    """
    if all(code == EXIT_OK for code in codes):
        return EXIT_OK
    if any(code < 0 or code not in KNOWN_EXITS for code in codes):
        return EXIT_CRASHED
    for code in (EXIT_BAD_INPUT, EXIT_GAVE_UP, EXIT_CRASHED, EXIT_REQUEUE):
        if code in codes:
            return code
    return EXIT_CRASHED


KNOWN_EXITS = {EXIT_OK, EXIT_CRASHED, EXIT_BAD_INPUT, EXIT_GAVE_UP, EXIT_REQUEUE}

EXIT_MEANINGS = {
    EXIT_CRASHED: "a rank crashed",
    EXIT_BAD_INPUT: "bad input, named above",
    EXIT_GAVE_UP: "crashed at the same step too often: not requeueing",
    EXIT_REQUEUE: "stopped on a signal after saving: requeue to continue",
}


def should_restart(code: int, steps_at_crashes: list[int | None], max_restarts: int) -> bool:
    """Restart after a crash unless the run crashed more than `max_restarts` times in a row
    without getting past the step it restarts from (a crash loop: a restart would crash alike)."""
    if code != EXIT_CRASHED:
        return False
    last = steps_at_crashes[-1]
    in_a_row = 0
    for step in reversed(steps_at_crashes):
        if step != last:
            break
        in_a_row += 1
    return in_a_row <= max_restarts


def already_finished(config: Config) -> bool:
    """Whether the run's newest checkpoint is its last step: a finished run submitted again (a
    requeue after the end, a resubmitted script) then has nothing to do, and says so."""
    step = _newest_checkpoint_step(config)
    if step is None or step < config.train.steps:
        return False
    steps = config.train.steps
    print(f"stalwart: the run already finished (checkpoint of step {step}, train.steps={steps}); nothing to do")
    return True


def _newest_checkpoint_step(config: Config) -> int | None:
    from checkpoint.universal import find_resume_checkpoint

    found = find_resume_checkpoint(Path(config.checkpoint.dir or Path(config.run.dir) / "checkpoints"))
    return found.step if found else None

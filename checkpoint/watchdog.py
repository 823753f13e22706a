"""Hang detection on a node: its ranks report every finished step to the node's snapshot daemon,
and the daemon kills a rank that reports nothing for the run's hang timeout. Its death ends the
training step on every node (the launcher gives the others seconds), and the launcher restarts
the ranks from the snapshots: a hung collective or a stopped process costs minutes, not the
30 minutes of a collective's timeout or a job that idles to its time limit.

A rank is watched from its first finished step (start-up and restoring are not: a rank that
never gets that far fails its rendezvous) until it says it is leaving.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

MIN_TIMEOUT_S = 60.0
STEPS_OF_TIMEOUT = 5
"""Without run.hang_timeout_s a rank may take max(60 s, 5x its median step) between reports."""

PROCESS_STATES = {
    "R": "running",
    "S": "waiting (in a collective or on I/O)",
    "D": "in uninterruptible I/O",
    "T": "stopped by a signal",
    "t": "stopped by a debugger",
    "Z": "a zombie",
}


def hang_timeout(intervals: list[float], configured: float | None) -> float:
    """How long a rank may go without a report (a pure decision): run.hang_timeout_s when set,
    else max(60 s, 5x the median of its intervals between reports so far)."""
    if configured is not None:
        return configured
    return max(MIN_TIMEOUT_S, STEPS_OF_TIMEOUT * statistics.median(intervals)) if intervals else MIN_TIMEOUT_S


@dataclass
class Watched:
    """A rank's last report."""

    pid: int
    started: str
    """Its process's start time (/proc/PID/stat): a pid the kernel reused is not killed."""
    step: int
    at: float
    intervals: deque = field(default_factory=lambda: deque(maxlen=64))


@dataclass(frozen=True)
class Hung:
    rank: int
    pid: int
    started: str
    step: int
    idle_s: float
    timeout_s: float


class HangWatch:
    """The ranks of one node, by their reports; `overdue` says which are hung."""

    def __init__(self, configured_s: float | None):
        self.configured_s = configured_s
        self.ranks: dict[int, Watched] = {}
        self.lock = threading.Lock()

    def report(self, rank: int, step: int, pid: int, leaving: bool, now: float) -> None:
        with self.lock:
            if leaving:
                self.ranks.pop(rank, None)
                return
            known = self.ranks.get(rank)
            if known is None or known.pid != pid:  # a new rank, or a restarted one
                self.ranks[rank] = Watched(pid, start_time(pid), step, now)
                return
            if step > known.step:
                known.intervals.append((now - known.at) / (step - known.step))
            known.step, known.at = step, now

    def overdue(self, now: float) -> list[Hung]:
        """The ranks past their timeout, no longer watched from now on."""
        with self.lock:
            hung = []
            for rank, w in sorted(self.ranks.items()):
                timeout = hang_timeout(list(w.intervals), self.configured_s)
                if now - w.at > timeout:
                    hung.append(Hung(rank, w.pid, w.started, w.step, now - w.at, timeout))
            for h in hung:
                del self.ranks[h.rank]
            return hung


def start_time(pid: int) -> str:
    """A process's start time since boot (field 22 of /proc/PID/stat); "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_state(pid: int) -> str:
    try:
        code = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    return PROCESS_STATES.get(code, code)


def kill_hung(hung: Hung, node: int) -> None:
    """SIGKILL a hung rank (still the process that reported) and say why, naming rank and step."""
    if start_time(hung.pid) != hung.started:
        return  # it ended meanwhile
    state = process_state(hung.pid)
    print(
        f"stalwart daemon: node {node}: rank {hung.rank} (pid {hung.pid}, {state}) made no progress for "
        f"{hung.idle_s:.0f} s after step {hung.step} (hang timeout {hung.timeout_s:.0f} s): killing it, "
        "so that the ranks restart from the newest snapshot",
        file=sys.stderr,
        flush=True,
    )
    try:
        os.kill(hung.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def watch_forever(watch: HangWatch, node: int, period_s: float = 1.0) -> threading.Thread:
    """A daemon thread that kills the node's hung ranks as it finds them."""

    def loop() -> None:
        while True:
            time.sleep(period_s)
            for hung in watch.overdue(time.monotonic()):
                kill_hung(hung, node)

    thread = threading.Thread(target=loop, name="stalwart-hang-watch", daemon=True)
    thread.start()
    return thread

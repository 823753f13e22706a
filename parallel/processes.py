"""Processes that start warm, carry a name and die with their parent.

Stalwart forks its short-lived workers (training ranks, the daemons' checkpoint writers) from
multiprocessing's fork server, which imports their modules once: a restart or a checkpoint
then costs none of the imports (seconds for a rank, half a CPU-second for a writer, taken
from the training ranks' cores). Each process names itself for ps and top, and Linux's
parent-death signal ties its life to its parent's, even when the parent is SIGKILLed.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver

PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15


def warm_forks(module: str, start_now: bool = False) -> multiprocessing.context.BaseContext:
    """Where this process's workers are forked from: multiprocessing's fork server with
    `module` imported (one fork server per process, so one kind of worker per process). It
    takes this process's environment when it starts, at the first worker unless `start_now`,
    and ends when this process does."""
    forks = multiprocessing.get_context("forkserver")
    forks.set_forkserver_preload([module])
    if start_now:  # it imports in the background: the first worker then starts warm too
        multiprocessing.forkserver.ensure_running()
    return forks


def die_with_parent(signum: int) -> None:
    """Get `signum` when the parent process ends, however it ends (kept across exec, so it
    also serves as Popen's preexec_fn through `functools.partial`)."""
    _prctl(PR_SET_PDEATHSIG, signum)


def name_process(name: str) -> None:
    """What ps, top and /proc/PID/comm show for this process (at most 15 bytes are kept)."""
    _prctl(PR_SET_NAME, name.encode())


def _prctl(option: int, value) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")

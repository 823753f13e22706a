"""Ranks started warm: `stalwart run` forks every rank from one process that has imported
torch, megatron-core and the trainer once (multiprocessing's fork server, which imports this
module), so that neither the first start nor a restart after a crash pays those imports per
rank: seconds each, most of the time from a crash to the next step.

A forked rank is `python -m trainer` in all but its start: its own environment (RANK, the
rendezvous, the daemons), a name of its own (`stalwart-r3` in ps and top), and death with
the fork server, which itself ends with the launcher.
"""

from __future__ import annotations

import os
import signal
import sys

from parallel.megatron_import import prepare_megatron_import
from parallel.processes import die_with_parent, name_process

prepare_megatron_import()

import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401  (torch's optimizers import it when built: a second a rank, here once)

import trainer.loop  # noqa: E402,F401  (megatron-core, the model, the checkpoints: what a restart skips)
from trainer.__main__ import main  # noqa: E402


def process_name(rank: int) -> str:
    """What ps, top and /proc/PID/comm show for a rank (at most 15 characters)."""
    return f"stalwart-r{rank}"


def run_rank(argv: list[str], env: dict[str, str]) -> None:
    """The body of a forked rank: `python -m trainer ARGV` with environment `env`."""
    die_with_parent(signal.SIGKILL)  # the fork server's end is ours
    if os.getppid() == 1:  # it ended before the line above took effect
        os._exit(1)
    os.environ.clear()
    os.environ.update(env)
    name_process(process_name(int(env["RANK"])))
    # The fork server's OpenMP read its thread count once; a smaller job after a node's loss
    # gives each rank more cores.
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.exit(main(argv))

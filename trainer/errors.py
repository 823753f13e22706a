"""Errors that name bad input, kept in a module that imports nothing heavy: the CLI catches
them on every command, and an operator command must not pay for importing megatron-core."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the data, the dataset files or the tokenizer."""


# Exit codes of a rank and of `stalwart run`, read by launchers (launcher/pretrain.slurm):
EXIT_OK = 0
EXIT_CRASHED = 1
"""An unexpected failure (Python's own code for an uncaught exception): worth a restart."""
EXIT_BAD_INPUT = 2
"""A config, data or checkpoint problem named on stderr: fix it; a restart or requeue would fail alike."""
EXIT_GAVE_UP = 3
"""The run crashed at the same step `run.max_restarts` times in a row: do not requeue."""
EXIT_REQUEUE = 75
"""Stopped on SIGTERM or SIGUSR1 after committing a checkpoint: requeue the job (sysexits' EX_TEMPFAIL)."""

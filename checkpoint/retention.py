"""Which checkpoints to delete: a pure function of the complete steps."""

from __future__ import annotations


def checkpoints_to_delete(complete_steps: list[int], keep: int, keep_every: int | None) -> list[int]:
    """Steps to delete so that the newest `keep` and every multiple of `keep_every` remain.

    The newest complete checkpoint is never deleted, whatever `keep` says.
    """
    ordered = sorted(complete_steps)
    kept = set(ordered[-max(keep, 1) :])
    if keep_every:
        kept |= {step for step in ordered if step % keep_every == 0}
    return [step for step in ordered if step not in kept]

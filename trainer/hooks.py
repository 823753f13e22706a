"""What happens around a step, as hooks: the loop (trainer/loop.py) owns when, hooks own what.

A hook may act at three points of every step: before the optimizer step (the last moment
the weights of the step before are unchanged), after the step (with the step's record,
which it may add to), and at the end of the run. A new concern (snapshots, curricula, the
planner) is a new hook, not a new branch of the loop.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from checkpoint.manager import Checkpointer
from parallel.errors import any_rank
from trainer.metrics import MetricsLog, Progress, plot_losses, plot_plan_estimates, run_summary


class Hook:
    def before_update(self) -> None:
        """After forward/backward, before the optimizer changes the state."""

    def after_step(self, step: int, record: dict, stopping: bool) -> None:
        """After step `step`; `stopping` when every rank agreed to stop after it."""

    def at_end(self, step: int) -> None:
        """Once, after the last step (also after a stop)."""


class EvalHook(Hook):
    """The validation loss every `interval` steps and at the last step."""

    def __init__(self, evaluate, interval: int, last_step: int):
        self.evaluate, self.interval, self.last_step = evaluate, interval, last_step

    def after_step(self, step: int, record: dict, stopping: bool) -> None:
        if self.interval and not stopping and (step % self.interval == 0 or step == self.last_step):
            record["val_loss"] = self.evaluate()


class CheckpointHook(Hook):
    """A universal checkpoint every `interval` steps, at the last step, and before a stop."""

    def __init__(self, checkpointer: Checkpointer, interval: int, last_step: int):
        self.checkpointer, self.interval, self.last_step = checkpointer, interval, last_step

    def before_update(self) -> None:
        self.checkpointer.wait_staged()  # the copy of the last save must finish before the update

    def after_step(self, step: int, record: dict, stopping: bool) -> None:
        due = self.interval and (step % self.interval == 0 or step == self.last_step)
        if due or stopping:
            self.checkpointer.begin()
            record["checkpoint_staging_peak_mb"] = self.checkpointer.staging_peak_bytes / 2**20
        # Waiting for the last copy before this step's update, plus handing this one over.
        record["checkpoint_blocked_s"] = self.checkpointer.take_blocked_time()

    def at_end(self, step: int) -> None:
        self.checkpointer.finish()


class SnapshotHook(Hook):
    """A snapshot into the node daemons every `interval` steps, copied during the next step's
    forward/backward; universal checkpoints every `checkpoint_interval` steps, at the last step
    and before a stop, written by the daemons from the snapshot of that step."""

    def __init__(self, snapshotter, interval: int, checkpoint_interval: int, last_step: int):
        self.snapshotter, self.interval = snapshotter, interval
        self.checkpoint_interval, self.last_step = checkpoint_interval, last_step

    def before_update(self) -> None:
        self.snapshotter.wait_staged()

    def after_step(self, step: int, record: dict, stopping: bool) -> None:
        every, final = self.checkpoint_interval, stopping or step == self.last_step
        checkpoint = bool(every) and (step % every == 0 or final) or stopping
        if checkpoint or step % self.interval == 0:
            self.snapshotter.begin(checkpoint=checkpoint, final=final)
        record["snapshot_blocked_s"] = self.snapshotter.take_blocked_time()

    def at_end(self, step: int) -> None:
        self.snapshotter.finish()


class ProgressHook(Hook):
    """Every finished step reported to the node's snapshot daemon, which kills a rank that stops
    reporting for run.hang_timeout_s (checkpoint/watchdog.py); unwatched from the end on."""

    def __init__(self, snapshotter):
        self.snapshotter = snapshotter

    def after_step(self, step: int, record: dict, stopping: bool) -> None:
        self.snapshotter.report_progress(step)

    def at_end(self, step: int) -> None:
        self.snapshotter.leave()  # before the final saves, which may take long


class MetricsHook(Hook):
    """Rank 0: metrics.jsonl, the progress bar or log lines, the loss plot and the run summary."""

    def __init__(
        self, run_dir: Path, start_step: int, total_steps: int, log_interval: int, progress: bool, newest_checkpoint
    ):
        self.run_dir, self.start_step, self.log_interval = run_dir, start_step, log_interval
        self.newest_checkpoint = newest_checkpoint
        """Returns the path of the newest complete checkpoint, or None."""
        self.log = MetricsLog(run_dir / "metrics.jsonl", start_step=start_step)
        self.progress = Progress(total_steps, start_step, enabled=progress, log_interval=log_interval)
        self.last: dict | None = None
        self.last_eval: dict | None = None
        self.started = time.monotonic()

    def after_step(self, step: int, record: dict, stopping: bool) -> None:
        self.last = record
        if "val_loss" in record:
            self.last_eval = record
        if step % self.log_interval == 0 or "val_loss" in record or stopping:
            self.log.write(record)
        self.progress.update(record)

    def at_end(self, step: int) -> None:
        self.close()
        plot_losses(self.log.path, self.run_dir / "loss.png")
        plot_plan_estimates(self.log.path, self.run_dir / "plan.png")
        seconds = time.monotonic() - self.started
        checkpoint = self.newest_checkpoint()
        print(run_summary(self.start_step, self.last, self.last_eval, seconds, self.run_dir, checkpoint), flush=True)

    def close(self) -> None:
        self.progress.close()
        self.log.close()


class StopRequest:
    """SIGTERM or SIGUSR1 (a scheduler's warning before the time limit) only sets a flag; the
    ranks agree on it at the next step boundary, so that every rank stops after the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}

    def _note(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """Whether any rank received a stop signal (one small all-reduce, every step)."""
        return any_rank(self.received is not None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

"""Plan the next step while this one trains, without taking CPU from the training ranks.

The data pipeline knows the next step's sequence lengths a step early, so `PlanAhead.submit`
hands them to a background process and `PlanAhead.result` collects the plan when the step
starts. The process runs under SCHED_IDLE: the kernel gives it only CPU time that no
training thread wants, so a busy trainer is never slowed by it; the planner's own time
limit (planner.time_limit_s) bounds how late a plan can be when cores are scarce.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from multiprocessing.connection import Connection

import numpy as np

from parallel.config import PlannerConfig
from parallel.cost_model import CostModel
from parallel.plan import Cluster, Plan, PlanError


class PlanAhead:
    def __init__(self, cluster: Cluster, model: CostModel, config: PlannerConfig):
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, cluster, model, config), name="stalwart-planner", daemon=True
        )
        self._process.start()
        child.close()
        self._pending: set[int] = set()
        # Wait until the process has loaded the planner and lowered its priority, so that the first
        # plan is not late by an import.
        if not self._conn.poll(120) or self._conn.recv() != "ready":
            self.close()
            raise RuntimeError("the planner process did not start")

    @property
    def pid(self) -> int:
        return self._process.pid

    def submit(self, step: int, lengths: np.ndarray) -> None:
        """Start planning `step`; call result(step) to collect it."""
        self._conn.send((step, np.asarray(lengths)))
        self._pending.add(step)

    def pending(self, step: int) -> bool:
        """`step` was submitted and its plan not yet collected."""
        return step in self._pending

    def result(self, step: int, timeout: float = 60.0) -> Plan:
        """The plan of a submitted step, in submission order; raises PlanError for a batch it cannot plan."""
        if step not in self._pending:
            raise PlanError(f"step {step} was not submitted to the planner")
        while True:
            if not self._conn.poll(timeout):
                raise TimeoutError(f"the planner process gave no plan for step {step} within {timeout:.0f} s")
            try:
                done, plan, error = self._conn.recv()
            except EOFError:
                raise RuntimeError(f"the planner process died (exit code {self._process.exitcode})") from None
            self._pending.discard(done)
            if done == step:
                if error is not None:
                    raise PlanError(error)
                return plan

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

    def __enter__(self) -> PlanAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(conn: Connection, cluster: Cluster, model: CostModel, config: PlannerConfig) -> None:
    # The import first, at normal priority and during start-up: under SCHED_IDLE on cores that
    # training keeps busy, a second of imports could take minutes.
    from parallel.planner import plan_step

    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return  # the trainer is gone
        if request is None:
            return
        step, lengths = request
        try:
            conn.send((step, plan_step(lengths, cluster, model, config), None))
        except PlanError as e:
            conn.send((step, None, str(e)))

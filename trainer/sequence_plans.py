"""Who runs which documents at each step: the plan of the step's global batch (data.packing: documents).

Without the planner every data-parallel rank is a group of its own and the documents are
balanced by tokens, a pure function every rank computes alike. With `planner.enabled`, the
data-parallel ranks split into sequence-parallel groups of different sizes (parallel/plan.py):
global rank 0 plans step n+1 in a background process (parallel/plan_ahead.py) while step n
trains, and broadcasts every plan, so that all ranks run the same one even when the solver's
time limit would cut it short at different points on different ranks.
"""

from __future__ import annotations

import numpy as np
import torch.distributed as dist

from parallel.cost_model import CostModel, load_profile
from parallel.plan import Cluster, Plan
from parallel.plan_ahead import PlanAhead
from parallel.planner import plan_step
from trainer.config import Config
from trainer.packing import balanced_groups


class StepPlans:
    def __init__(self, config: Config, dp: int, tp: int, pp: int, rank: int):
        self.config, self.dp, self.rank = config, dp, rank
        self.capacity = config.train.micro_batch_tokens
        self.enabled = config.planner.enabled
        self._ahead: PlanAhead | None = None
        self._fixed: dict[bytes, Plan] = {}
        if self.enabled:
            self.cluster = planner_cluster(config, dp, tp, pp)
            self.model: CostModel = load_profile(config.planner.profile).with_capacity(self.capacity)
            if rank == 0:
                self._ahead = PlanAhead(self.cluster, self.model, config.planner)

    def for_step(self, step: int, lengths: np.ndarray, upcoming: np.ndarray) -> Plan:
        """The plan of `step`, whose documents have `lengths`; `upcoming` are those of the next
        step, which rank 0 starts planning now."""
        if not self.enabled:
            return self._balanced(lengths)
        plan = None
        if self._ahead is not None:
            if not self._ahead.pending(step):
                self._ahead.submit(step, lengths)
            plan = self._ahead.result(step)
            self._ahead.submit(step + 1, upcoming)
        return self._shared(plan)

    def fixed(self, lengths: np.ndarray) -> Plan:
        """The plan of a batch that recurs (evaluation), planned once and kept."""
        if not self.enabled:
            return self._balanced(lengths)
        key = np.asarray(lengths, dtype=np.int64).tobytes()
        if key not in self._fixed:
            plan = plan_step(lengths, self.cluster, self.model, self.config.planner) if self.rank == 0 else None
            self._fixed[key] = self._shared(plan)
        return self._fixed[key]

    def _balanced(self, lengths: np.ndarray) -> Plan:
        return Plan(balanced_groups(lengths, self.dp, self.capacity), 0.0, 0.0, "balanced")

    @staticmethod
    def _shared(plan: Plan | None) -> Plan:
        """Rank 0's plan, on every rank."""
        box = [plan]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None


def planner_cluster(config: Config, dp: int, tp: int, pp: int) -> Cluster:
    """The data-parallel ranks as the planner sees them: a node holds ranks_per_node GPUs, so
    ranks_per_node / (tp x pp) data-parallel ranks (a power of two), and no group may exceed
    what the heads allow. Pipelines run each step in one round (Cluster.rounds)."""
    per_node = max(1, config.planner.ranks_per_node // (tp * pp))
    return Cluster(dp, 1 << (per_node.bit_length() - 1), config.largest_sequence_group(dp), rounds=pp == 1)

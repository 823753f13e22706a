"""The training loop: when things happen. What a step does lives in trainer/step.py."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from checkpoint.commands import layout_text
from checkpoint.manager import Checkpointer
from checkpoint.snapshotter import Daemons, Snapshotter
from checkpoint.state import RankState
from checkpoint.universal import CheckpointError
from parallel.dims import ParallelDims, build_parallel_dims, destroy_parallel_dims, init_distributed
from parallel.errors import on_all_ranks
from parallel.plan import Plan
from trainer.config import Config
from trainer.data import (
    SPLITS,
    DocumentSamples,
    GlobalBatchSampler,
    TokenWindows,
    batches_in_order,
    check_tokenizer_matches,
    read_dataset_info,
)
from trainer.errors import DataError
from trainer.hooks import CheckpointHook, EvalHook, Hook, MetricsHook, ProgressHook, SnapshotHook, StopRequest
from trainer.metrics import model_flops_per_token, peak_flops_per_device
from trainer.model import padded_vocab_size
from trainer.schedule import learning_rate
from trainer.schema import ConfigError, to_dict
from trainer.sequence_plans import StepPlans
from trainer.step import TrainStep


def plan_record(plan: Plan | None) -> dict:
    """A planned step's metrics: its groups and the cost model's estimate of its time, to set
    against the measured step time."""
    if plan is None or plan.method == "balanced":
        return {}
    return {"plan_groups": plan.describe(), "plan_estimate_s": plan.estimated_time, "plan_method": plan.method}


@dataclass
class RunData:
    """The opened dataset splits and the sampler's position."""

    train: TokenWindows | DocumentSamples
    valid: TokenWindows | DocumentSamples
    sampler: GlobalBatchSampler
    vocab_size: int
    micro_batch: int
    """Windows per micro-batch, or a packed micro-batch's tokens."""


def open_data(config: Config) -> RunData:
    """Open and check the dataset; raises DataError / ConfigError naming what is wrong."""
    info = read_dataset_info(config.data.path)
    tokenizer = Path(config.data.tokenizer or f"{config.data.path}-tokenizer.json")
    check_tokenizer_matches(info, tokenizer)
    vocab = config.model.vocab_size or info.vocab_size
    if vocab < info.vocab_size:
        raise ConfigError(
            "model.vocab_size", f"{vocab} is smaller than the dataset's tokenizer vocabulary {info.vocab_size}"
        )
    cfg = config.train
    if config.data.packing == "documents":
        train, valid = (DocumentSamples(config.data.path, split, cfg.longest_sample) for split in SPLITS)
        budget, micro_batch = cfg.global_batch_tokens, cfg.micro_batch_tokens
    else:
        train, valid = (TokenWindows(config.data.path, split, cfg.seq_length) for split in SPLITS)
        budget, micro_batch = cfg.global_batch_size, cfg.micro_batch_size
    sampler = GlobalBatchSampler(len(train), budget, cfg.seed, costs=train.costs)
    return RunData(train, valid, sampler, vocab, micro_batch)


class RunState:
    """The run's own state, saved and restored as one: step, sampler position, tokens consumed.

    state_dict() also carries the config, so that a checkpoint says how it was trained.
    """

    def __init__(self, config: Config, sampler: GlobalBatchSampler):
        self.config, self.sampler = config, sampler
        self.step = 0
        self.consumed_tokens = 0
        """Tokens trained on (predicted) so far."""

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "consumed_tokens": self.consumed_tokens,
            "config": to_dict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.consumed_tokens = int(state["consumed_tokens"])
        self.sampler.load_state_dict(state["sampler"])


Outcome = Literal["finished", "stopped"]


class Trainer:
    """Owns one run on one rank: layout, data, step object, the state it saves, its hooks."""

    def __init__(self, config: Config):
        self.config = config
        init_distributed(config.parallel)
        world = dist.get_world_size()
        on_all_ranks(lambda: config.validate(world), (ConfigError,))
        self.data = on_all_ranks(lambda: open_data(config), (ConfigError, DataError))
        dp = config.parallel.data_parallel_size(world)
        self.dims: ParallelDims = build_parallel_dims(
            config.parallel, config.train.seed, config.largest_sequence_group(dp)
        )
        self.plans = StepPlans(config, self.dims.dp, self.dims.tp, self.dims.pp, self.dims.rank)
        self.step_fn = TrainStep(config, self.dims, self.data.vocab_size)
        self.run = RunState(config, self.data.sampler)
        self.state = RankState(self.step_fn.model, self.step_fn.optimizer, self.dims, self.data.vocab_size, self.run)
        self.run_dir = Path(config.run.dir)
        self.is_logger = self.dims.rank == 0
        padded = padded_vocab_size(self.data.vocab_size, config.model.make_vocab_size_divisible_by)
        self.flops_per_token = model_flops_per_token(config.model, config.train.seq_length, padded)
        self.peak_flops = peak_flops_per_device(config.run.peak_tflops) * world
        self.checkpointer = Checkpointer(config.checkpoint, config.run.dir, self.state, config.parallel.timeout_minutes)
        self.snapshotter = self._snapshotter()
        if not self._restore_from_memory() and config.checkpoint.resume:
            self._resume()

    def _snapshotter(self) -> Snapshotter | None:
        daemons = Daemons.from_env()
        if daemons is None or self.snapshot_interval == 0:
            return None
        return Snapshotter(self.config.snapshot, daemons, self.state, self.checkpointer)

    @property
    def snapshot_interval(self) -> int:
        interval = self.config.snapshot.interval
        return 1 if interval is None else interval

    def _restore_from_memory(self) -> bool:
        """Continue from the newest snapshot the daemons hold (a restart inside the job)."""
        if self.snapshotter is None:
            return False
        restored = self.snapshotter.restore()
        if restored is None:
            return False
        where = layout_text(restored.layout)
        self._say_restored("memory", restored.step, where, restored.seconds, restored.origin)
        return True

    def _say_restored(self, source: str, step: int, layout: str, seconds: float, origin: str) -> None:
        """Every restore says where the state came from, which step and layout, and how long it took."""
        if not self.is_logger:
            return
        print(
            f"stalwart: restored step {step} from {source} ({origin}, saved at {layout}) in {seconds:.2f} s", flush=True
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        event = {"event": "restore", "source": source, "step": step, "layout": layout, "seconds": seconds}
        with open(self.run_dir / "events.jsonl", "a") as f:
            f.write(json.dumps({**event, "origin": origin, "time": time.time()}) + "\n")

    @property
    def step(self) -> int:
        return self.run.step

    def _resume(self) -> None:
        """Continue from the newest complete checkpoint, whichever layout saved it."""
        found = [self.checkpointer.find() if self.dims.rank == 0 else None]
        dist.broadcast_object_list(found, src=0)  # every rank takes rank 0's choice
        if found[0] is None:
            return
        start = time.perf_counter()
        resumed = on_all_ranks(lambda: self.checkpointer.load(found[0]), (CheckpointError,))
        seconds = time.perf_counter() - start
        self._say_restored("disk", resumed.step, layout_text(resumed.state["layout"]), seconds, str(resumed.path))
        if self.is_logger:
            for reason in resumed.skipped:
                print(f"stalwart: skipped newer checkpoint {reason}", flush=True)

    def hooks(self) -> list[Hook]:
        """In the order they act: evaluation adds to a step's record before anything saves or logs it."""
        cfg = self.config
        hooks: list[Hook] = [EvalHook(self.evaluate, cfg.train.eval_interval, cfg.train.steps)]
        if self.snapshotter is not None:  # checkpoints are written from the snapshots
            hooks.append(ProgressHook(self.snapshotter))
            hooks.append(
                SnapshotHook(self.snapshotter, self.snapshot_interval, cfg.checkpoint.interval, cfg.train.steps)
            )
        else:
            hooks.append(CheckpointHook(self.checkpointer, cfg.checkpoint.interval, cfg.train.steps))
        if self.is_logger:
            newest = lambda: (found := self.checkpointer.find()) and found.path  # noqa: E731
            hooks.append(
                MetricsHook(self.run_dir, self.step, cfg.train.steps, cfg.train.log_interval, cfg.run.progress, newest)
            )
        return hooks

    def fit(self) -> Outcome:
        """Train to train.steps, or until a stop signal: then every rank saves after the same step."""
        hooks, stop = self.hooks(), StopRequest()
        # The model, optimizer and data live as long as the run: moving them out of the
        # collector's reach turns its full collections from a ~0.2 s pause of one rank (which
        # stalls every rank at the next collective) into a scan of this step's garbage only.
        gc.collect()
        gc.freeze()
        stopping = False
        try:
            while self.step < self.config.train.steps and not stopping:
                record = self._train_one_step(lambda: [h.before_update() for h in hooks])
                stopping = stop.agreed()
                for hook in hooks:
                    hook.after_step(self.step, record, stopping)
            for hook in hooks:
                hook.at_end(self.step)
        finally:
            gc.unfreeze()
            # Once the ranks agreed to stop, a further stop signal changes nothing: the save is
            # done and the rank exits with the requeue code. srun, seeing the first rank exit
            # with it, sends SIGTERM to the rest, which must not die of it on their way out.
            if not stopping:
                stop.restore()
            for hook in hooks:
                if isinstance(hook, MetricsHook):
                    hook.close()
        if stopping and self.is_logger:
            print(f"stalwart: stopped after step {self.step} on a signal; checkpoint committed", flush=True)
        return "stopped" if stopping else "finished"

    def _train_one_step(self, before_update) -> dict:
        cfg = self.config.train
        lr = learning_rate(self.step, cfg.steps, self.config.optim)
        self.step_fn.set_learning_rate(lr)
        data = self.data
        batch = data.sampler.next_global_batch()
        plan = None
        if isinstance(data.train, DocumentSamples):
            costs = data.train.costs
            plan = self.plans.for_step(self.step, costs[batch], costs[data.sampler.upcoming_global_batch()])
        batches = self._micro_batches(data.train, batch, plan)
        start = time.perf_counter()
        result = self.step_fn.train(batches, before_update=before_update)
        elapsed = time.perf_counter() - start
        self.run.step += 1
        tokens = data.train.tokens_in(batch)
        self.run.consumed_tokens += tokens
        tokens_per_s = tokens / elapsed
        memory = {"peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}
        return (
            memory
            | plan_record(plan)
            | {
                "step": self.step,
                "loss": result.loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "skipped": result.skipped,
                "step_time_s": elapsed,
                "tokens_per_s": tokens_per_s,
                "mfu": self.flops_per_token * tokens_per_s / self.peak_flops,
                "consumed_samples": self.data.sampler.state_dict()["consumed_samples"],
                "time": time.time(),
            }
        )

    def evaluate(self) -> float:
        """Mean loss over the first `eval_batches` global batches of the validation split (fixed order)."""
        data = self.data
        count = self.config.train.eval_batches
        batches = batches_in_order(len(data.valid), data.sampler.budget, count, data.valid.costs)
        losses = []
        for batch in batches:
            plan = self.plans.fixed(data.valid.costs[batch]) if isinstance(data.valid, DocumentSamples) else None
            losses.append(self.step_fn.evaluate(self._micro_batches(data.valid, batch, plan)))
        return float(np.mean(losses))

    def _micro_batches(self, samples: TokenWindows | DocumentSamples, batch: np.ndarray, plan: Plan | None) -> list:
        """This rank's micro-batches of a global batch: its slice of the windows, or its slices of
        its group's packed documents under the step's plan."""
        dims = self.dims
        if isinstance(samples, TokenWindows):
            return samples.micro_batches(batch, dims.dp_rank, dims.dp, self.data.micro_batch)
        # Pipelines send activations of one fixed shape; without them a micro-batch is as long as its documents.
        fixed = self.data.micro_batch if dims.pp > 1 else None
        return samples.micro_batches(batch, dims.dp_rank, plan.groups, dims.tp, fixed)

    def close(self) -> None:
        self.plans.close()
        if self.snapshotter is not None:
            self.snapshotter.close()
        self.checkpointer.close()
        destroy_parallel_dims()

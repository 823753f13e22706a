"""The training loop: when things happen. What a step does lives in trainer/step.py."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist

from checkpoint.commands import layout_text
from checkpoint.manager import Checkpointer
from checkpoint.universal import CheckpointError
from parallel.dims import ParallelDims, build_parallel_dims, destroy_parallel_dims, init_distributed
from parallel.errors import on_all_ranks
from trainer.config import Config
from trainer.data import (
    DataError,
    GlobalBatchSampler,
    TokenWindows,
    check_tokenizer_matches,
    read_dataset_info,
    shard_for_rank,
)
from trainer.metrics import MetricsLog, Progress, model_flops_per_token, peak_flops_per_device, plot_losses
from trainer.model import padded_vocab_size
from trainer.schedule import learning_rate
from trainer.schema import ConfigError, to_dict
from trainer.step import TrainStep


@dataclass
class RunData:
    """The opened dataset splits and the sampler's position."""

    train: TokenWindows
    valid: TokenWindows
    sampler: GlobalBatchSampler
    vocab_size: int


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
    train = TokenWindows(config.data.path, "train", config.train.seq_length)
    valid = TokenWindows(config.data.path, "valid", config.train.seq_length)
    sampler = GlobalBatchSampler(len(train), config.train.global_batch_size, config.train.seed)
    return RunData(train=train, valid=valid, sampler=sampler, vocab_size=vocab)


def micro_batches(windows: TokenWindows, indices: np.ndarray, micro_batch_size: int) -> list[np.ndarray]:
    samples = np.stack([windows[int(i)] for i in indices])
    return [samples[i : i + micro_batch_size] for i in range(0, len(samples), micro_batch_size)]


class Trainer:
    """Owns one run on one rank: layout, data, step object, metrics."""

    def __init__(self, config: Config):
        self.config = config
        init_distributed(config.parallel)
        world = dist.get_world_size()
        on_all_ranks(lambda: config.validate(world), (ConfigError,))
        self.data = on_all_ranks(lambda: open_data(config), (ConfigError, DataError))
        self.dims: ParallelDims = build_parallel_dims(config.parallel, config.train.seed)
        self.step_fn = TrainStep(config, self.dims, self.data.vocab_size)
        self.run_dir = Path(config.run.dir)
        self.is_logger = self.dims.rank == 0
        padded = padded_vocab_size(self.data.vocab_size, config.model.make_vocab_size_divisible_by)
        self.flops_per_token = model_flops_per_token(config.model, config.train.seq_length, padded)
        self.peak_flops = peak_flops_per_device(config.run.peak_tflops) * world
        self.step = 0
        self.checkpointer = Checkpointer(
            config.checkpoint,
            config.run.dir,
            self.dims,
            self.step_fn,
            self.data.vocab_size,
            config.parallel.timeout_minutes,
        )
        if config.checkpoint.resume:
            self._resume()

    def _resume(self) -> None:
        """Continue from the newest complete checkpoint, whichever layout saved it."""
        found = [self.checkpointer.find() if self.dims.rank == 0 else None]
        dist.broadcast_object_list(found, src=0)  # every rank takes rank 0's choice
        if found[0] is None:
            return
        resumed = on_all_ranks(lambda: self.checkpointer.load(found[0]), (CheckpointError,))
        self.step = resumed.step
        self.data.sampler.load_state_dict(resumed.state["sampler"])
        if self.is_logger:
            saved_at = layout_text(resumed.state["layout"])
            print(f"stalwart: resumed from {resumed.path} (step {resumed.step}, saved at {saved_at})", flush=True)
            for reason in resumed.skipped:
                print(f"stalwart: skipped newer checkpoint {reason}", flush=True)

    def save_checkpoint(self) -> None:
        sampler = self.data.sampler.state_dict()
        run_state = {
            "sampler": sampler,
            "consumed_tokens": sampler["consumed_samples"] * self.config.train.seq_length,
            "config": to_dict(self.config),
        }
        self.checkpointer.begin(self.step, run_state)

    def _checkpoint_due(self) -> bool:
        interval = self.config.checkpoint.interval
        return bool(interval) and (self.step % interval == 0 or self.step == self.config.train.steps)

    def fit(self) -> None:
        cfg = self.config.train
        log = MetricsLog(self.run_dir / "metrics.jsonl", start_step=self.step) if self.is_logger else None
        progress = Progress(cfg.steps, self.step, enabled=self.is_logger and self.config.run.progress)
        # The model, optimizer and data live as long as the run: moving them out of the
        # collector's reach turns its full collections from a ~0.2 s pause of one rank (which
        # stalls every rank at the next collective) into a scan of this step's garbage only.
        gc.collect()
        gc.freeze()
        try:
            while self.step < cfg.steps:
                record = self._train_one_step()
                if cfg.eval_interval and (self.step % cfg.eval_interval == 0 or self.step == cfg.steps):
                    record["val_loss"] = self.evaluate()
                if self._checkpoint_due():
                    self.save_checkpoint()
                    record["checkpoint_staging_peak_mb"] = self.checkpointer.staging_peak_bytes / 2**20
                # Waiting for the last copy before this step's update, plus handing this one over.
                record["checkpoint_blocked_s"] = self.checkpointer.take_blocked_time()
                if log and (self.step % cfg.log_interval == 0 or "val_loss" in record):
                    log.write(record)
                progress.update(record)
            self.checkpointer.finish()
        finally:
            gc.unfreeze()
            progress.close()
            if log:
                log.close()
        if self.is_logger:
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")

    def _train_one_step(self) -> dict:
        cfg = self.config.train
        lr = learning_rate(self.step, cfg.steps, self.config.optim)
        self.step_fn.set_learning_rate(lr)
        indices = shard_for_rank(self.data.sampler.next_global_batch(), self.dims.dp_rank, self.dims.dp)
        batches = micro_batches(self.data.train, indices, cfg.micro_batch_size)
        start = time.perf_counter()
        result = self.step_fn.train(batches, before_update=self.checkpointer.wait_staged)
        elapsed = time.perf_counter() - start
        self.step += 1
        tokens_per_s = cfg.global_batch_tokens / elapsed
        return {
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

    def evaluate(self) -> float:
        """Mean loss over the first `eval_batches` global batches of the validation split (fixed order)."""
        cfg = self.config.train
        per_batch = cfg.global_batch_size
        available = len(self.data.valid) // per_batch
        losses = []
        for b in range(min(cfg.eval_batches, max(available, 1))):
            indices = np.arange(b * per_batch, (b + 1) * per_batch) % len(self.data.valid)
            shard = shard_for_rank(indices, self.dims.dp_rank, self.dims.dp)
            losses.append(self.step_fn.evaluate(micro_batches(self.data.valid, shard, cfg.micro_batch_size)))
        return float(np.mean(losses))

    def close(self) -> None:
        self.checkpointer.close()
        destroy_parallel_dims()

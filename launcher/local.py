"""Launching on one machine: torchrun with N ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from trainer.config import Config
from trainer.data import DataError, prepare_dataset


def dataset_exists(prefix: str) -> bool:
    return Path(f"{prefix}-meta.json").is_file()


def prepare_missing_dataset(config: Config) -> None:
    """Build the config's dataset from `data.sources` when it is not there yet (the demo's first run)."""
    if dataset_exists(config.data.path):
        return
    if not config.data.sources:
        raise DataError(
            f"dataset {config.data.path} not found ({config.data.path}-meta.json is missing); "
            "run `stalwart data prepare` or set data.sources"
        )
    Path(config.data.path).parent.mkdir(parents=True, exist_ok=True)
    print(f"stalwart: preparing dataset {config.data.path} from {', '.join(config.data.sources)}", flush=True)
    prepare_dataset(
        config.data.sources,
        config.data.path,
        tokenizer_path=Path(config.data.tokenizer) if config.data.tokenizer else None,
        vocab_size=config.data.vocab_size,
        valid_fraction=config.data.valid_fraction,
        seed=config.train.seed,
    )


def threads_per_rank(nproc: int) -> int:
    """Split the machine's cores between ranks so that CPU ranks do not oversubscribe it."""
    return max(1, (os.cpu_count() or 1) // nproc)


def torchrun_command(config_path: str, overrides: list[str], nproc: int) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "trainer", config_path]
    for assignment in overrides:
        command += ["--set", assignment]
    return command


def launch_local(config_path: str, overrides: list[str], nproc: int) -> int:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    env.setdefault("PYTHONWARNINGS", "ignore")
    result = subprocess.run(torchrun_command(config_path, overrides, nproc), env=env)
    if result.returncode != 0:
        print(f"stalwart: training exited with code {result.returncode}", file=sys.stderr)
    return result.returncode

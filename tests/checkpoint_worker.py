"""Rank entry for the checkpoint tests: resume under several layouts in turn.

For each layout: copy the source checkpoint into a fresh run directory, resume from it,
save the state just loaded into a second directory (to compare with the source array by
array), then train the remaining steps.
usage: torchrun ... tests/checkpoint_worker.py CONFIG SOURCE_CKPT_STEP_DIR OUT NAME=K=V,K=V ...
"""

import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from parallel.dims import init_distributed
from trainer.config import load_config
from trainer.loop import Trainer


def main() -> None:
    config_path, source, out, *layouts = sys.argv[1:]
    init_distributed(load_config(config_path).parallel)
    for layout in layouts:
        name, _, overrides = layout.partition("=")
        run_dir = Path(out) / name
        if dist.get_rank() == 0:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, run_dir / "checkpoints" / Path(source).name)
        dist.barrier()
        config = load_config(config_path, [s for s in overrides.split(",") if s] + [f"run.dir={run_dir}"])
        trainer = Trainer(config)
        try:
            trainer.checkpointer.dir = run_dir / "resaved"
            trainer.checkpointer.save()
            trainer.checkpointer.dir = run_dir / "checkpoints"
            trainer.fit()
        finally:
            trainer.close()


if __name__ == "__main__":
    main()

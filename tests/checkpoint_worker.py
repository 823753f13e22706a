"""Rank entry for the checkpoint tests: resume under several layouts in turn.

For each layout: copy the source checkpoint into a fresh run directory, resume from it,
save the state just loaded into a second directory (to compare with the source array by
array), then train the remaining steps.
usage: torchrun ... tests/checkpoint_worker.py CONFIG SOURCE_CKPT_STEP_DIR OUT NAME=K=V,K=V ...
"""

from parallel.megatron_import import prepare_megatron_import

prepare_megatron_import()  # before megatron-core's first import: 3.5 s less per rank

import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.distributed as dist  # noqa: E402

from parallel.dims import init_distributed  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.loop import Trainer  # noqa: E402


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

"""Rank entry for the layout-equivalence test: trains one config under several layouts in turn.

Sharing one torchrun launch between layouts of the same world size saves the
start-up (imports, rendezvous), which dominates such short runs on a small CPU.
usage: torchrun ... tests/layout_worker.py CONFIG NAME=KEY=VALUE,KEY=VALUE ...
"""

from parallel.megatron_import import prepare_megatron_import

prepare_megatron_import()  # before megatron-core's first import: 3.5 s less per rank

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.loop import Trainer  # noqa: E402


def main() -> None:
    config_path, *layouts = sys.argv[1:]
    for layout in layouts:
        name, _, overrides = layout.partition("=")
        base = load_config(config_path)
        sets = [s for s in overrides.split(",") if s] + [f"run.dir={Path(base.run.dir) / name}"]
        trainer = Trainer(load_config(config_path, sets))
        try:
            trainer.fit()
        finally:
            trainer.close()


if __name__ == "__main__":
    main()

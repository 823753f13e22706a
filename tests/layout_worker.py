"""Rank entry for the layout-equivalence test: trains one config under several layouts in turn.

Sharing one torchrun launch between layouts of the same world size saves the
start-up (imports, rendezvous), which dominates such short runs on a small CPU.
usage: torchrun ... tests/layout_worker.py CONFIG NAME=KEY=VALUE,KEY=VALUE ...
"""

import sys
from pathlib import Path

from trainer.config import load_config
from trainer.loop import Trainer


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

"""Per-rank entry point, started by torchrun or srun: `python -m trainer CONFIG [--set k=v ...]`."""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys

from checkpoint.universal import CheckpointError
from parallel.errors import RankFailed
from parallel.megatron_import import prepare_megatron_import
from trainer.errors import EXIT_BAD_INPUT, EXIT_CRASHED, EXIT_OK, EXIT_REQUEUE, DataError
from trainer.schema import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    # `kill -USR2 LAUNCHER`: every rank prints where each of its threads is (for a run that hangs).
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    prepare_megatron_import()
    trainer = None
    try:
        from trainer.config import load_config
        from trainer.loop import Trainer

        trainer = Trainer(load_config(args.config, args.overrides))
        outcome = trainer.fit()
    except (ConfigError, DataError, CheckpointError, RankFailed) as e:
        # Said before closing: once one rank exits, torchrun stops the others.
        print(f"stalwart: error: {e}", file=sys.stderr, flush=True)
        if isinstance(e, RankFailed):
            e.wait_for_every_rank()
            if e.retryable:  # a restart gets past it: the launcher restores from the snapshots
                return EXIT_CRASHED
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"stalwart: rank {rank} interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        if trainer is not None:
            trainer.close()
    return EXIT_REQUEUE if outcome == "stopped" else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

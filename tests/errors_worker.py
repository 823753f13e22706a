"""Rank entry for the error tests: rank 1 alone cannot see the dataset (as when a node lacks a mount)."""

import sys

import torch.distributed as dist

from parallel.dims import init_distributed
from parallel.errors import RankFailed, on_all_ranks
from trainer.config import load_config
from trainer.errors import DataError
from trainer.loop import open_data


def main() -> int:
    config = load_config(sys.argv[1])
    init_distributed(config.parallel)
    if dist.get_rank() == 1:
        config.data.path = config.data.path + "-not-mounted-here"
    try:
        on_all_ranks(lambda: open_data(config), (DataError,))
    except RankFailed as e:
        # One write per line: both ranks share the pipe, and print() may split a line in two writes.
        sys.stdout.write(f"rank {dist.get_rank()} stopped: {e}\n")
        sys.stdout.flush()
        e.wait_for_every_rank()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

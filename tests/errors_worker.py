"""Rank entry for the error tests: rank 1 alone cannot see the dataset (as when a node lacks a mount)."""

from parallel.megatron_import import prepare_megatron_import

prepare_megatron_import()  # before megatron-core's first import: 3.5 s less per rank

import sys  # noqa: E402

import torch.distributed as dist  # noqa: E402

from parallel.dims import init_distributed  # noqa: E402
from parallel.errors import RankFailed, on_all_ranks  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.errors import DataError  # noqa: E402
from trainer.loop import open_data  # noqa: E402


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

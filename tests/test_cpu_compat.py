"""The CPU compat layer: version pin, real per-TP-rank RNG streams, torch left untouched."""

import pytest
import torch

from parallel import cpu_compat


def test_untested_megatron_version_fails_loudly():
    with pytest.raises(cpu_compat.UntestedMegatronVersion, match="0.99.0"):
        cpu_compat.check_megatron_version("0.99.0")


def test_installed_megatron_version_is_a_tested_one():
    from megatron.core import package_info

    cpu_compat.check_megatron_version(package_info.__version__)


def _draws_in_tp_stream(tp_rank: int) -> torch.Tensor:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
    with get_cuda_rng_tracker().fork():
        return torch.rand(4)


def test_rng_tracker_keeps_distinct_reproducible_streams_per_tp_rank():
    assert cpu_compat.install() is True
    rank0, rank1 = _draws_in_tp_stream(0), _draws_in_tp_stream(1)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(rank0, _draws_in_tp_stream(0))


def test_forking_the_tp_stream_restores_the_default_generator():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    cpu_compat.install()
    model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        torch.rand(3)
    assert torch.equal(before, torch.get_rng_state())


def test_torch_itself_is_not_patched():
    from megatron.core.tensor_parallel import layers

    cpu_compat.install()
    assert layers.torch is not torch and layers.torch.cuda.current_device() == "cpu"
    assert torch.cuda.current_device is not layers.torch.cuda.current_device
    assert torch.Tensor.type(torch.zeros(1)) == "torch.FloatTensor"

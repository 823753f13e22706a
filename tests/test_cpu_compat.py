"""The CPU compat layer: version pin, real per-TP-rank RNG streams, torch left untouched."""

import contextlib
import json
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.distributed as dist

from parallel import cpu_compat
from parallel.config import ParallelConfig
from parallel.dims import build_parallel_dims, destroy_parallel_dims
from tests.conftest import REPO, rank_env, run_command
from trainer.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from trainer.step import TrainStep


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


def test_install_refuses_an_untested_megatron_before_patching_anything():
    """install() itself runs the version check (a fresh process: install() only acts once)."""
    script = (
        "import json, torch\n"
        "from megatron.core import package_info\n"
        "from megatron.core.tensor_parallel import layers\n"
        "from parallel import cpu_compat\n"
        "package_info.__version__ = '0.99.0'\n"
        "try:\n"
        "    cpu_compat.install()\n"
        "    refusal = None\n"
        "except cpu_compat.UntestedMegatronVersion as error:\n"
        "    refusal = str(error)\n"
        "print(json.dumps({'refusal': refusal, 'layers_see_torch': layers.torch is torch}))\n"
    )
    env = rank_env(1) | {"CUDA_VISIBLE_DEVICES": ""}  # install() does nothing where CUDA is present
    result = run_command([sys.executable, "-c", script], timeout=120, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["refusal"] is not None, "install() accepted megatron-core 0.99.0"
    assert "but 0.99.0 is installed" in outcome["refusal"]
    assert outcome["layers_see_torch"], "install() patched megatron before checking the version"


def test_megatron_imports_without_the_compiler_and_a_deferred_kernel_still_compiles_on_first_call():
    """prepare_megatron_import: megatron-core's torch.compile decorators no longer set up
    TorchDynamo at import, and what they decorate compiles when first called (a fresh process:
    the compiler is loaded in this one)."""
    script = (
        "import json, sys\n"
        "from parallel.megatron_import import prepare_megatron_import\n"
        "prepare_megatron_import()\n"
        "import torch\n"
        "import megatron.core.transformer, megatron.core.fusions.fused_bias_swiglu\n"
        "at_import = 'torch._dynamo' in sys.modules\n"
        "double = torch.compile(lambda x: x * 2, backend='eager')\n"
        "before_call = 'torch._dynamo' in sys.modules\n"
        "value = double(torch.ones(3)).tolist()\n"
        "module = torch.compile(torch.nn.Linear(2, 2), backend='eager')\n"
        "compiled = 'torch._dynamo' in sys.modules\n"
        "print(json.dumps({'at_import': at_import, 'before_call': before_call, 'value': value,\n"
        "                  'compiled': compiled, 'module': isinstance(module, torch.nn.Module)}))\n"
    )
    result = run_command([sys.executable, "-c", script], timeout=120, env=rank_env(1), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"at_import": False, "before_call": False, "value": [2.0] * 3, "compiled": True, "module": True}


# A step of a tiny model whose gradient norm (~O(1) at init) is far above CLIP, so clipping scales.
TINY_MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2)
VOCAB = 200
SEQ = 16
CLIP = 1e-3


TORCH_TENSOR_TYPE = torch.Tensor.type  # torch's own method, as imported


@dataclass
class TensorTypeWatch:
    called: set[str] = field(default_factory=set)
    """Names of the Python functions that ran while watching."""
    swapped_in: list[str] = field(default_factory=list)
    """Functions entered while `torch.Tensor.type` was not torch's own."""

    def __call__(self, frame, event, _arg) -> None:
        if event in ("call", "c_call"):
            self.called.add(frame.f_code.co_name)
            if torch.Tensor.type is not TORCH_TENSOR_TYPE:
                self.swapped_in.append(frame.f_code.co_qualname)


@contextlib.contextmanager
def watching_tensor_type():
    """Checks on entry to every Python and C function that `torch.Tensor.type` is torch's own."""
    watch = TensorTypeWatch()
    sys.setprofile(watch)
    try:
        yield watch
    finally:
        sys.setprofile(None)


@contextlib.contextmanager
def one_rank(tmp_path, distributed_optimizer: bool):
    cpu_compat.install()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield build_parallel_dims(ParallelConfig(distributed_optimizer=distributed_optimizer), seed=1)
    finally:
        destroy_parallel_dims()
        dist.destroy_process_group()


def main_grads_norm(step: TrainStep) -> float:
    """torch's own L2 norm of every gradient the optimizer sees (one rank: no TP/DP duplicates)."""
    grads = [param.main_grad for chunk in step.model for param in chunk.parameters()]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["plain_optimizer", "distributed_optimizer"])
def test_a_real_step_clips_the_right_norm_without_swapping_tensor_type(tmp_path, distributed_optimizer):
    windows = DataConfig(packing="concat")  # the micro-batches below are windows of one token stream
    config = Config(
        model=TINY_MODEL, train=TrainConfig(seq_length=SEQ), optim=OptimConfig(clip_grad=CLIP), data=windows
    )
    micro_batches = [np.random.default_rng(i).integers(0, VOCAB, size=(2, SEQ + 1)) for i in range(2)]
    norms = []
    with one_rank(tmp_path, distributed_optimizer) as dims, watching_tensor_type() as watch:
        step = TrainStep(config, dims, vocab_size=VOCAB)
        result = step.train(micro_batches, before_update=lambda: norms.append(main_grads_norm(step)))
        norms.append(main_grads_norm(step))
    unclipped, clipped = norms

    assert not watch.swapped_in, f"torch.Tensor.type was swapped while {watch.swapped_in[0]} ran"
    assert "clip_grad_by_total_norm_fp32" in watch.called  # the watch covered megatron's clip
    assert ("_build_model_and_main_param_groups" in watch.called) == distributed_optimizer
    assert not result.skipped
    assert result.grad_norm == pytest.approx(unclipped, rel=1e-5)
    assert unclipped > 100 * CLIP
    assert clipped == pytest.approx(CLIP, rel=1e-5)
    params = [param for chunk in step.model for param in chunk.parameters()]
    assert not any("type" in vars(tensor) for tensor in params + [p.main_grad for p in params])
    assert torch.zeros(1).type() == "torch.FloatTensor"

"""Run megatron-core on machines without CUDA (development, tests, CI, the demo).

megatron-core hard-codes CUDA in a few places: ``torch.cuda.current_device()`` as a
device, ``device="cuda"`` literals, ``tensor.type() == "torch.cuda.FloatTensor"`` checks
and a CUDA RNG tracker. Rather than patching torch for the whole process, each affected
megatron module gets its own view of torch (``_CpuTorch``) whose ``cuda`` namespace and
tensor factories resolve to the CPU; the two megatron functions that check
``type() == "torch.cuda.FloatTensor"`` are replaced by wrappers under their own names that
let just the tensors being checked answer with CUDA names; the RNG tracker is re-pointed at
the real CPU generator so that per-TP-rank streams stay distinct. torch itself (``torch.cuda``,
``torch.Tensor.type``, ...) is never modified. Nothing here is active when CUDA is available,
and it refuses megatron-core versions it was not tested against.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any

import torch

TESTED_MEGATRON_VERSIONS = ("0.16.1",)

# megatron modules whose `torch.cuda...` / `device="cuda"` uses lie on the CPU path.
_MODULES_SEEING_CPU_TORCH = (
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.transformer.module",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.utils",
)

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like")


def _cpu_device(device: Any) -> Any:
    if isinstance(device, (int, str, torch.device)) and str(device).startswith(("cuda", "0")):
        return "cpu"
    if isinstance(device, int):
        return "cpu"
    return device


def _factory_on_cpu(fn):
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapped


class _CudaOnCpu(types.SimpleNamespace):
    """The parts of `torch.cuda` megatron touches on its CPU path."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _null_stream(*_args, **_kwargs):
    return contextlib.nullcontext()


def _make_cuda_namespace() -> _CudaOnCpu:
    random_ns = types.SimpleNamespace(get_rng_state=lambda device=None: torch.get_rng_state())
    return _CudaOnCpu(
        current_device=lambda: "cpu",
        is_available=lambda: False,
        device_count=lambda: 0,
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        manual_seed=torch.manual_seed,
        get_rng_state=lambda device=None: torch.get_rng_state(),
        set_rng_state=lambda state, device=None: torch.set_rng_state(state),
        random=random_ns,
        current_stream=lambda *a, **k: None,
        stream=_null_stream,
        nvtx=types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None),
        FloatTensor=torch.FloatTensor,
        HalfTensor=torch.HalfTensor,
        BFloat16Tensor=torch.BFloat16Tensor,
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
    )


class _CpuTorch(types.ModuleType):
    """`torch` as megatron's modules see it on a CPU-only machine."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _make_cuda_namespace()
        for name in _FACTORIES:
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))
        self.autocast = lambda device_type="cuda", **kw: torch.autocast("cpu", **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cuda_type_name(tensor: torch.Tensor):
    """`tensor.type` for this one tensor, naming its type as megatron expects on a GPU."""

    def type_(*args, **kwargs):
        name = torch.Tensor.type(tensor, *args, **kwargs)
        if args or kwargs or name.startswith("torch.cuda."):
            return name  # a conversion, or already CUDA
        return name.replace("torch.", "torch.cuda.", 1)

    return type_


@contextlib.contextmanager
def _named_as_cuda(tensors: list[torch.Tensor]):
    """For the duration, `t.type()` of each of `tensors` says `torch.cuda.FloatTensor` etc.

    megatron asserts `param.type() == 'torch.cuda.FloatTensor'` where it means "fp32". An
    instance attribute shadows the `Tensor.type` method for just these tensors, so the class
    (and every other tensor in the process) keeps torch's own `type` at every moment.
    """
    named = {id(t): t for t in tensors}.values()  # a tensor may be listed twice
    for tensor in named:
        tensor.type = _cuda_type_name(tensor)
    try:
        yield
    finally:
        for tensor in named:
            del tensor.type


def _build_param_groups_with_cuda_names(original):
    """megatron's `DistributedOptimizer._build_model_and_main_param_groups` (a classmethod), run
    with the model parameters it sorts into fp32/fp16 groups by `param.type()` named as CUDA."""

    def build(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, *args, **kwargs):
        params = [param for group in opt_group_ranges for param in group["params"]]
        with _named_as_cuda(params):
            return original(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, *args, **kwargs)

    return classmethod(build)


def _clip_with_cuda_names(original):
    """megatron's `clip_grad_by_total_norm_fp32`, run with the gradients it asserts are
    `torch.cuda.FloatTensor` named as CUDA tensors."""

    def clip(parameters, *args, **kwargs):
        parameters = list(parameters)
        grads = [param.grad for param in parameters if param.grad is not None]
        with _named_as_cuda(grads):
            return original(parameters, *args, **kwargs)

    return clip


class UntestedMegatronVersion(RuntimeError):
    pass


def check_megatron_version(version: str) -> None:
    """Refuse to patch a megatron-core this layer was not tested with."""
    if version not in TESTED_MEGATRON_VERSIONS:
        raise UntestedMegatronVersion(
            f"parallel.cpu_compat was tested with megatron-core {', '.join(TESTED_MEGATRON_VERSIONS)}"
            f" but {version} is installed; run the CPU test suite against it and add the version"
            " to TESTED_MEGATRON_VERSIONS once it passes"
        )


_installed = False


def install() -> bool:
    """Make megatron-core run on the CPU. Returns False (and does nothing) when CUDA is present."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    from megatron.core import package_info

    check_megatron_version(package_info.__version__)
    cpu_torch = _CpuTorch()
    for name in _MODULES_SEEING_CPU_TORCH:
        importlib.import_module(name).torch = cpu_torch

    from megatron.core.optimizer import distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random

    random._set_cuda_rng_state = _set_cpu_rng_state
    random._get_cuda_rng_state = _get_cpu_rng_state
    # Replace the names megatron calls (never a torch attribute): the distributed optimizer's
    # group builder, and the clip as `optimizer.py` imported it.
    distopt = distrib_optimizer.DistributedOptimizer
    build = vars(distopt)["_build_model_and_main_param_groups"].__func__
    distopt._build_model_and_main_param_groups = _build_param_groups_with_cuda_names(build)
    optimizer.clip_grad_by_total_norm_fp32 = _clip_with_cuda_names(optimizer.clip_grad_by_total_norm_fp32)
    _installed = True
    return True

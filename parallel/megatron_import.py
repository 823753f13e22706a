"""What a process does before it imports megatron-core: start-up time and log noise.

megatron-core decorates a dozen fused kernels (bias-GeLU, SwiGLU, fused cross-entropy, ...)
with torch.compile as its modules are imported, and torch.compile sets up TorchDynamo and
Inductor to build each wrapper: 3.5 s of the 9 s it takes to import the trainer on a 2-core
machine, although our CPU path calls none of those kernels. Deferring each wrapper to the
kernel's first call keeps its behaviour (torch.compile compiles on the first call anyway).
torch's optimizers still import TorchDynamo when they are built, so a rank reaches its
first step 1-3 s sooner (measured: 8.2-9.2 s -> 6.5-7.1 s to import the trainer and build
an Adam), on every start: torchrun and srun ranks, the warm fork server, the test workers.
"""

from __future__ import annotations

import functools
import inspect
import warnings


def quiet_fallback_warnings() -> None:
    """megatron-core warns at import that Apex/TE are absent; on CPU that is the expected state."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")


def prepare_megatron_import() -> None:
    """Call before the first import of megatron-core: it binds torch.compile at import."""
    import torch

    quiet_fallback_warnings()
    if not getattr(torch.compile, "deferred", False):
        torch.compile = compile_on_first_call(torch.compile)


def compile_on_first_call(compile_now):
    """torch.compile, but a plain function is handed to it on its first call rather than now.
    Modules and anything else go straight through: only megatron's function decorators are
    deferred."""

    def compile(model=None, **options):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: compile(fn, **options)
        if not inspect.isfunction(model):
            return compile_now(model, **options)
        compiled = None

        @functools.wraps(model)
        def first_call_compiles(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **options)
            return compiled(*args, **kwargs)

        return first_call_compiles

    compile.deferred = True
    return compile

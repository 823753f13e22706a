"""Collecting a rank's training state as pieces of logical tensors, and putting it back.

One path for checkpoints and snapshots: model weights and every optimizer state (read
from the optimizer, not assumed to be Adam's) become `Piece`s - a rank's full TP piece
of one logical tensor plus the `TensorLayout` that places it. The same layouts place the
pieces of any other layout on load, and place the weights a fresh model draws
(trainer/model.py): parameter names and tensor-parallel slicing are decided here and in
checkpoint/layout.py only. `RankState` bundles a rank's pieces with its RNG streams and
the run's own state (step, sampler), saved and restored by one object.
"""

from __future__ import annotations

import ctypes
import io
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from checkpoint.layout import TensorLayout, local_shape
from parallel.dims import ParallelDims

VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class Piece:
    name: str
    """Logical tensor, e.g. `model/decoder.layers.3.mlp.linear_fc1.weight` or `optim/exp_avg/...`."""
    layout: TensorLayout
    local: torch.Tensor
    """This rank's whole TP piece, vocabulary padding included."""
    writes: bool
    """Whether this rank is the single writer of this piece (others hold replicas)."""
    shard: tuple[int, int] | None = None
    """For a distributed-optimizer shard: the element range of the TP piece (flattened) that
    `local` (1-D) holds; the other ranges are on this rank's DP peers. None: the whole piece."""


@dataclass(frozen=True)
class ModelParam:
    name: str
    """Name in the whole model (global layer index)."""
    param: torch.nn.Parameter
    layout: TensorLayout


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP and Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def global_param_name(module: torch.nn.Module, local_name: str) -> str:
    """`decoder.layers.<i>...` with i the layer's index in the whole model, not in this stage."""
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        layer = module.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
    return ".".join(parts)


def param_layout(name: str, param: torch.Tensor, tp: int, vocab_size: int) -> TensorLayout:
    tp_dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    shape = list(param.shape)
    if tp_dim is not None:
        shape[tp_dim] *= tp
    padded_rows = None
    if name in VOCAB_PARAMS:
        padded_rows, shape[0] = shape[0], vocab_size
    return TensorLayout(tuple(shape), tp_dim, name.endswith("mlp.linear_fc1.weight"), padded_rows)


def model_params(chunks: list[torch.nn.Module], tp: int, vocab_size: int) -> list[ModelParam]:
    params = []
    for chunk in chunks:
        model = unwrap(chunk)
        for local_name, param in model.named_parameters():
            name = global_param_name(model, local_name)
            params.append(ModelParam(name, param, param_layout(name, param, tp, vocab_size)))
    return params


def writer_dp_rank(name: str, dp: int) -> int:
    """The DP rank that writes a tensor: spread by name so that every DP rank writes a share."""
    return zlib.crc32(name.encode()) % dp


def is_writer(name: str, layout: TensorLayout, dims: ParallelDims) -> bool:
    replicated_over_tp = layout.tp_dim is None
    return dims.dp_rank == writer_dp_rank(name, dims.dp) and (not replicated_over_tp or dims.tp_rank == 0)


def model_pieces(params: list[ModelParam], dims: ParallelDims) -> list[Piece]:
    return [Piece(f"model/{p.name}", p.layout, p.param.detach(), is_writer(p.name, p.layout, dims)) for p in params]


@dataclass(frozen=True)
class PlannedPiece:
    name: str
    layout: TensorLayout
    shard: tuple[int, int] | None
    nbytes: int


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RankState:
    """Everything one rank saves and restores, collected once for checkpoints and snapshots.

    Its pieces of the model and of the optimizer (with the layouts that place them), its RNG
    streams, and `run`: the run's own state (step, sampler, tokens consumed), an object
    that saves and restores itself.
    """

    def __init__(self, model_chunks: list, optimizer, dims: ParallelDims, vocab_size: int, run: Stateful):
        self.optimizer, self.dims, self.run = optimizer, dims, run
        self.params: list[ModelParam] = model_params(model_chunks, dims.tp, vocab_size)

    def pieces(self) -> Iterator[Piece]:
        """Model weights, then main weights and optimizer states, each a whole TP piece: with
        the distributed optimizer they are gathered over DP (for a checkpoint's writers)."""
        yield from model_pieces(self.params, self.dims)
        yield from optimizer_pieces(self.optimizer, self.params, self.dims)

    def own_pieces(self) -> Iterator[Piece]:
        """What a snapshot holds: model weights, then the main weights and optimizer states
        this rank owns (with the distributed optimizer, its shards: no collective, so a rank's
        copy never waits for a peer and a peer's death cannot stop it)."""
        yield from model_pieces(self.params, self.dims)
        yield from optimizer_pieces(self.optimizer, self.params, self.dims, gather=False)

    def piece_layouts(self) -> list[tuple[str, TensorLayout]]:
        """The name and layout of every piece pieces() yields, without collecting them."""
        keys = optimizer_state_keys(self.optimizer)
        model = [(f"model/{p.name}", p.layout) for p in self.params]
        return model + [(f"optim/{key}/{p.name}", p.layout) for key in keys for p in self.params]

    def own_piece_plan(self) -> list[PlannedPiece]:
        """What own_pieces() will yield, without collecting it."""
        keys = optimizer_state_keys(self.optimizer)
        plan = [PlannedPiece(f"model/{p.name}", p.layout, None, 4 * p.param.numel()) for p in self.params]
        for p, shard in optimizer_shards(self.optimizer, self.params):
            nbytes = 4 * (shard[1] - shard[0] if shard else p.param.numel())
            plan += [PlannedPiece(f"optim/{key}/{p.name}", p.layout, shard, nbytes) for key in keys]
        return plan

    def names_this_rank_writes(self) -> list[str]:
        """The pieces whose chunks this rank writes in a checkpoint (Piece.writes)."""
        keys = optimizer_state_keys(self.optimizer)
        written = [p for p in self.params if is_writer(p.name, p.layout, self.dims)]
        return [f"model/{p.name}" for p in written] + [f"optim/{key}/{p.name}" for key in keys for p in written]

    def arrays_this_rank_creates(self) -> list[tuple[str, TensorLayout]]:
        """Model and optimizer tensors whose first writer is this rank."""
        keys = optimizer_state_keys(self.optimizer)
        tensors = []
        for p in self.params:
            if is_writer(p.name, p.layout, self.dims) and self.dims.tp_rank == 0:
                tensors += [(f"model/{p.name}", p.layout), *((f"optim/{key}/{p.name}", p.layout) for key in keys)]
        return tensors

    def layout(self) -> dict:
        d = self.dims
        return {
            "tp": d.tp,
            "pp": d.pp,
            "vpp": d.vpp,
            "dp": d.dp,
            "sp": d.sp,
            "distributed_optimizer": d.distributed_optimizer,
            "world_size": d.world_size,
        }

    @torch.no_grad()
    def load(self, reader, step: int, run_state: dict, rng: bytes | None) -> None:
        """Fill model, optimizer, run state and (when given: same layout only) RNG streams from
        `reader`, whatever layout saved it."""
        # A parameter that is its own main weight (fp32, no distributed optimizer) is filled
        # once, from the optimizer's copy, as it was when both were read in turn.
        own_main = (
            params_that_are_their_main_weights(self.optimizer) if "param" in reader.optimizer_state_keys else set()
        )
        model = [(f"model/{p.name}", p.layout, p.param) for p in self.params if p.param not in own_main]
        reader.read_many(model, self.dims.tp_rank, self.dims.tp)
        load_optimizer_state(self.optimizer, self.params, reader, self.dims, step)
        self.run.load_state_dict(run_state)
        if rng is not None:
            restore_rng(rng)


def rng_state() -> bytes:
    """Every RNG stream of this process: Python, NumPy, torch (CPU, CUDA) and megatron's tracker."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    buffer = io.BytesIO()
    torch.save(states, buffer)
    return buffer.getvalue()


def restore_rng(blob: bytes) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = torch.load(io.BytesIO(blob), weights_only=False)
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    get_cuda_rng_tracker().set_states(states["tracker"])


# ---------------------------------------------------------------------------------------
# Optimizer state


def optimizer_pieces(optimizer, params: list[ModelParam], dims: ParallelDims, gather: bool = True) -> Iterator[Piece]:
    """Main (fp32) weights and every per-parameter optimizer state, as pieces of logical tensors.

    With the distributed optimizer each DP rank holds flat sub-ranges of parameters. With
    `gather` they are gathered over DP one bucket at a time (memory stays bounded by the
    bucket size) into whole pieces; without, each owned sub-range is a shard piece.
    """
    by_param = {p.param: p for p in params}
    for inner in _inner_optimizers(optimizer):
        if _is_distributed(inner) and gather:
            yield from _distributed_pieces(inner, by_param, dims)
        elif _is_distributed(inner):
            for model_param in _owned_params(inner):
                p, shard = by_param[model_param], _owned_range(inner, model_param)
                writes = is_writer(p.name, p.layout, dims)
                for key, flat in _per_element_states(inner, model_param).items():
                    yield Piece(f"optim/{key}/{p.name}", p.layout, flat.detach(), writes, shard)
        else:
            for model_param, states in _replicated_states(inner):
                p = by_param[model_param]
                for key, tensor in states.items():
                    name = f"optim/{key}/{p.name}"
                    yield Piece(
                        name, p.layout, tensor.detach().view(model_param.shape), is_writer(p.name, p.layout, dims)
                    )


def optimizer_shards(optimizer, params: list[ModelParam]) -> Iterator[tuple[ModelParam, tuple[int, int] | None]]:
    """Each parameter whose optimizer state this rank holds, with the element range it holds
    (None: all of it; a range: a distributed optimizer's shard)."""
    by_param = {p.param: p for p in params}
    for inner in _inner_optimizers(optimizer):
        if _is_distributed(inner):
            for model_param in _owned_params(inner):
                yield by_param[model_param], _owned_range(inner, model_param)
        else:
            for model_param, _ in _main_params(inner):
                yield by_param[model_param], None


def _owned_range(inner, model_param) -> tuple[int, int]:
    owned = inner._get_model_param_range_map(model_param)["param"]
    return owned.start, owned.end


def optimizer_state_keys(optimizer) -> list[str]:
    """Names of the per-element states the optimizer keeps, plus "param" for the main weights."""
    for inner in _inner_optimizers(optimizer):
        if _is_distributed(inner):
            return sorted(_per_element_states(inner, next(iter(_owned_params(inner)))))
        for _, states in _replicated_states(inner):
            return sorted(states)
    return ["param"]


def load_optimizer_state(optimizer, params: list[ModelParam], reader, dims: ParallelDims, step: int) -> None:
    """Fill main weights and optimizer states through `reader.read_many`, or `read_shards` for
    a distributed optimizer's shards (any saved layout)."""
    by_param = {p.param: p for p in params}
    keys = reader.optimizer_state_keys
    # A reader that writes every element of a piece (a rank's own snapshot) fills fresh state
    # as it is: its copies fault the pages in on every thread. Another may leave padding rows
    # as they are, which must then be zeros.
    fresh = empty_in_huge_pages if getattr(reader, "writes_every_element", False) else torch.zeros_like
    for inner in _inner_optimizers(optimizer):
        if _is_distributed(inner):
            _ensure_distributed_state(inner)
            items = []
            for model_param in _owned_params(inner):
                p, shard = by_param[model_param], _owned_range(inner, model_param)
                # The optimizer's own tensors, filled in place (what megatron returns for
                # reading may be a copy: its precision-aware optimizer unscales).
                group_index, group_order = inner.model_param_group_index_map[model_param]
                main = inner.optimizer.param_groups[group_index]["params"][group_order]
                state = inner.optimizer.state[main]
                targets = {key: main if key == "param" else state[key] for key in keys}
                items += [(f"optim/{key}/{p.name}", p.layout, shard, targets[key]) for key in keys]
                state["step"] = torch.tensor(float(step))
            reader.read_shards(items, dims.tp_rank, dims.tp)
        else:
            items = []
            for model_param, main in _main_params(inner):
                p = by_param[model_param]
                state = inner.optimizer.state.setdefault(main, {})
                for key in keys:
                    if key != "param" and key not in state:
                        state[key] = fresh(main)
                    items.append((f"optim/{key}/{p.name}", p.layout, main if key == "param" else state[key]))
                state["step"] = torch.tensor(float(step))
            reader.read_many(items, dims.tp_rank, dims.tp)


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
"""Linux's madvise advice for transparent huge pages (with `enabled` at `madvise`, the
kernel's default, a region gets them only when asked)."""


def empty_in_huge_pages(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor like `like`, its CPU memory asked to come in huge pages, as NumPy asks
    for every large array: filling a fresh 100M-parameter model's Adam state then takes
    hundreds of page faults instead of 200,000 (a quarter of a restore from memory here)."""
    tensor = torch.empty_like(like)
    start, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    first, end = -(-start // HUGE_PAGE) * HUGE_PAGE, (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    # Large tensors only (NumPy's threshold): they have their own mapping, not the heap's.
    if tensor.device.type == "cpu" and nbytes >= 2 * HUGE_PAGE and _madvise is not None:
        _madvise(first, end - first, MADV_HUGEPAGE)  # advice only: a refusal changes nothing
    return tensor


def _libc_madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):  # not Linux: no advice
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


_madvise = _libc_madvise()


def params_that_are_their_main_weights(optimizer) -> set[torch.Tensor]:
    """The model parameters a (non-distributed) optimizer updates in place, as its main weights."""
    return {
        model_param
        for inner in _inner_optimizers(optimizer)
        if not _is_distributed(inner)
        for model_param, main in _main_params(inner)
        if main is model_param
    }


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(inner) -> bool:
    return hasattr(inner, "gbuf_ranges")


def _main_params(inner) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(model param, fp32 main param) for the non-distributed megatron optimizers."""
    if hasattr(inner, "float16_groups"):  # Float16OptimizerWithFloat16Params
        for model_group, main_group in zip(inner.float16_groups, inner.fp32_from_float16_groups, strict=True):
            yield from zip(model_group, main_group, strict=True)
        for group in inner.fp32_from_fp32_groups:
            for param in group:
                yield param, param
    else:  # FP32Optimizer: the model params are the main params
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                yield param, param


def _replicated_states(inner) -> Iterator[tuple[torch.nn.Parameter, dict[str, torch.Tensor]]]:
    for model_param, main in _main_params(inner):
        state = inner.optimizer.state.get(main, {})
        per_element = {k: v for k, v in state.items() if torch.is_tensor(v) and v.numel() == main.numel()}
        yield model_param, {"param": main, **per_element}


def _owned_params(inner) -> Iterator[torch.nn.Parameter]:
    for gbuf_range_maps in inner.gbuf_ranges:
        for bucket_maps in gbuf_range_maps.values():
            for bucket_map in bucket_maps:
                yield from bucket_map["param_map"]


def _per_element_states(inner, model_param) -> dict[str, torch.Tensor]:
    tensors = inner._get_main_param_and_optimizer_states(model_param)
    return {k: v for k, v in tensors.items() if torch.is_tensor(v) and v.dim() > 0}


def _distributed_pieces(inner, by_param: dict, dims: ParallelDims) -> Iterator[Piece]:
    # The gloo DP group, not training's: this runs in the staging thread beside training.
    group = inner.data_parallel_group_gloo
    for gbuf_index, gbuf_range_maps in enumerate(inner.gbuf_ranges):
        buffer = inner.buffers[gbuf_index]
        for bucket_maps in gbuf_range_maps.values():
            for bucket_index, bucket_map in enumerate(bucket_maps):
                bucket = buffer.buckets[bucket_index]
                gathered = _gather_bucket(inner, bucket_map, bucket.grad_data.numel(), group, dims)
                for model_param in bucket.params_list:
                    p = by_param[model_param]
                    start, end, _ = buffer.param_index_map[model_param]
                    start, end = start - bucket.offset, end - bucket.offset
                    writes = is_writer(p.name, p.layout, dims)
                    for key, flat in gathered.items():
                        yield Piece(f"optim/{key}/{p.name}", p.layout, flat[start:end].view(model_param.shape), writes)


def _gather_bucket(inner, bucket_map: dict, bucket_numel: int, group, dims: ParallelDims) -> dict[str, torch.Tensor]:
    """Every DP rank's owned slice of one bucket, for each state, gathered onto every DP rank."""
    shard_numel = bucket_numel // dims.dp
    keys = _state_keys_of_bucket(inner, bucket_map)
    gathered = {}
    for key in keys:
        shard = torch.zeros(shard_numel, dtype=torch.float32)
        for model_param, ranges in bucket_map["param_map"].items():
            local = ranges["gbuf_local"]
            shard[local.start : local.end].copy_(_per_element_states(inner, model_param)[key])
        full = torch.empty(shard_numel * dims.dp, dtype=torch.float32)
        dist.all_gather_into_tensor(full, shard, group=group)
        gathered[key] = full
    return gathered


def _state_keys_of_bucket(inner, bucket_map: dict) -> list[str]:
    """State names, agreed by all DP ranks even when some own nothing in this bucket."""
    for model_param in bucket_map["param_map"]:
        return sorted(_per_element_states(inner, model_param))
    return sorted(_per_element_states(inner, next(iter(_owned_params(inner)))))


def _ensure_distributed_state(inner) -> None:
    """A fresh distributed optimizer has no Adam state yet; create it so that it can be filled."""
    params = [p for group in inner.optimizer.param_groups for p in group["params"]]
    if params and not inner.optimizer.state.get(params[0]):
        inner._init_optimizer_states_with_dummy_values()


ShardItem = tuple[str, TensorLayout, tuple[int, int], torch.Tensor]
"""(piece name, its layout, an element range of this rank's TP piece, the 1-D tensor to fill)."""


def read_shards_of_pieces(reader, items: list[ShardItem], tp_rank: int, tp: int) -> None:
    """`read_shards` for a reader of whole pieces: each piece is read whole, then cut."""
    whole = [(name, layout, torch.empty(local_shape(layout, tp))) for name, layout, _, _ in items]
    reader.read_many(whole, tp_rank, tp)
    for (_, _, (start, end), out), (_, _, piece) in zip(items, whole, strict=True):
        out.data.copy_(piece.flatten()[start:end].to(out.dtype))

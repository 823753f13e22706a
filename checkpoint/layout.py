"""How a rank's piece of a parameter maps onto the logical (global, unpadded) tensor.

Pure functions shared by saving and loading, by checkpoints and snapshots: a save maps
local pieces to global regions, a load on any other layout maps the new local pieces back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Region = tuple[slice, ...]

PADDING_SUFFIX = ".vocab_padding"
"""The array holding a vocabulary-sized tensor's padding rows is named after it with this suffix."""


@dataclass(frozen=True)
class TensorLayout:
    """What a checkpoint must know about one logical tensor to place any rank's piece of it."""

    shape: tuple[int, ...]
    """Global shape without vocabulary padding."""
    tp_dim: int | None = None
    """Dimension split over tensor-parallel ranks; None when every TP rank holds all of it."""
    gate_up: bool = False
    """SwiGLU's fused fc1: [gate; up] along tp_dim, and each TP rank holds [gate_r; up_r]."""
    padded_rows: int | None = None
    """For vocabulary-sized tensors: rows including padding (dim 0); None otherwise."""

    def to_attrs(self) -> dict:
        return {
            "shape": list(self.shape),
            "tp_dim": self.tp_dim,
            "gate_up": self.gate_up,
            "padded_rows": self.padded_rows,
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> TensorLayout:
        return cls(tuple(attrs["shape"]), attrs["tp_dim"], attrs["gate_up"], attrs["padded_rows"])


def local_shape(layout: TensorLayout, tp: int) -> tuple[int, ...]:
    """Shape of one TP rank's piece (vocabulary padding included)."""
    shape = list(layout.shape)
    if layout.padded_rows is not None:
        shape[0] = layout.padded_rows
    if layout.tp_dim is not None:
        shape[layout.tp_dim] //= tp
    return tuple(shape)


def chunk_shape(layout: TensorLayout, tp: int, max_chunk_bytes: int = 64 << 20) -> tuple[int, ...]:
    """A chunk grid in which every TP rank's piece covers whole chunks (one writer per chunk).

    Chunks are the piece (or each half of a fused gate/up piece), cut along dim 0 into an
    exact divisor of its rows so that no chunk exceeds `max_chunk_bytes` of float32: the
    unit of staging and of writing stays small whatever the size of the tensor.
    """
    shape = [max(1, n) for n in local_shape(layout, tp)]
    if layout.gate_up:
        shape[layout.tp_dim] //= 2
    row_bytes = 4 * math.prod(shape[1:])
    max_rows = max(1, max_chunk_bytes // row_bytes)
    shape[0] = max(d for d in _divisors(shape[0]) if d <= max_rows)
    return tuple(shape)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def padded_shape(layout: TensorLayout) -> tuple[int, ...]:
    """The global shape with the vocabulary padding rows (what a model holds over all TP ranks)."""
    return (layout.padded_rows or layout.shape[0], *layout.shape[1:])


def tp_regions(layout: TensorLayout, tp_rank: int, tp: int, padded: bool = False) -> list[tuple[Region, Region]]:
    """(global region, local region) pairs that together make up one TP rank's piece.

    Vocabulary padding rows are left out (they belong to no global region), unless `padded`:
    then the global regions index the padded_shape() tensor and cover the whole piece.
    """
    full = tuple(slice(0, n) for n in local_shape(layout, tp))
    if layout.tp_dim is None:
        pairs = [(full, full)]
    elif layout.gate_up:
        half = local_shape(layout, tp)[layout.tp_dim] // 2
        global_half = layout.shape[layout.tp_dim] // 2
        pairs = [
            (_along(full, layout.tp_dim, start + tp_rank * half, half), _along(full, layout.tp_dim, local, half))
            for start, local in ((0, 0), (global_half, half))
        ]
    else:
        size = local_shape(layout, tp)[layout.tp_dim]
        pairs = [(_along(full, layout.tp_dim, tp_rank * size, size), full)]
    if padded:
        return pairs
    return [clipped for pair in pairs if (clipped := _clip_rows(pair, layout))]


def padding_region(layout: TensorLayout, tp_rank: int, tp: int) -> tuple[Region, Region] | None:
    """(region of the padding array, local region) for the padding rows this TP rank holds."""
    if layout.padded_rows is None or layout.padded_rows == layout.shape[0]:
        return None
    rows = local_shape(layout, tp)[0]
    start = tp_rank * rows if layout.tp_dim == 0 else 0
    first, last = max(start, layout.shape[0]), start + rows
    if first >= last:
        return None
    rest = tuple(slice(0, n) for n in local_shape(layout, tp)[1:])
    pad_start = first - layout.shape[0]
    return (slice(pad_start, pad_start + last - first), *rest), (slice(first - start, rows), *rest)


def padding_shape(layout: TensorLayout) -> tuple[int, ...]:
    rows = (layout.padded_rows or layout.shape[0]) - layout.shape[0]
    return (rows, *layout.shape[1:])


def padding_chunk_shape(layout: TensorLayout) -> tuple[int, ...]:
    """The padding array is chunked by row: each padded row has exactly one writer at any TP."""
    return (1, *padding_shape(layout)[1:])


def _along(full: Region, dim: int, start: int, size: int) -> Region:
    region = list(full)
    region[dim] = slice(start, start + size)
    return tuple(region)


def _clip_rows(pair: tuple[Region, Region], layout: TensorLayout) -> tuple[Region, Region] | None:
    """Drop the rows of a (global, local) pair that fall in the vocabulary padding."""
    global_region, local_region = pair
    rows = global_region[0]
    keep = min(rows.stop, layout.shape[0]) - rows.start
    if keep <= 0:
        return None
    if keep == rows.stop - rows.start:
        return pair
    local_rows = local_region[0]
    return (
        (slice(rows.start, rows.start + keep), *global_region[1:]),
        (slice(local_rows.start, local_rows.start + keep), *local_region[1:]),
    )


def split_rows(pair: tuple[Region, Region], rows_per_chunk: int) -> list[tuple[Region, Region]]:
    """Cut a (global, local) region pair along dim 0 at the chunk grid: one pair per chunk."""
    global_region, local_region = pair
    rows, local_rows = global_region[0], local_region[0]
    out = []
    for start in range(rows.start, rows.stop, rows_per_chunk):
        stop = min(start + rows_per_chunk, rows.stop)
        offset = local_rows.start + start - rows.start
        out.append(
            ((slice(start, stop), *global_region[1:]), (slice(offset, offset + stop - start), *local_region[1:]))
        )
    return out


def chunks_of(name: str, layout: TensorLayout, local, tp_rank: int, tp: int):
    """(array, its chunk shape, global region, this rank's values) of each chunk of TP rank
    `tp_rank`'s piece `local` (a tensor or array) of tensor `name`, vocabulary padding included."""
    chunks = chunk_shape(layout, tp)
    pairs = [(name, chunks, pair) for pair in tp_regions(layout, tp_rank, tp)]
    padding = padding_region(layout, tp_rank, tp)
    if padding:
        pairs.append((name + PADDING_SUFFIX, padding_chunk_shape(layout), padding))
    for array, array_chunks, pair in pairs:
        for global_region, local_region in split_rows(pair, array_chunks[0]):
            yield array, array_chunks, global_region, local[local_region]


def join_shards(name: str, parts: list[tuple[tuple[int, int], np.ndarray]], shape: tuple[int, ...]) -> np.ndarray:
    """A whole TP piece from its DP ranks' shards ((start, end), values); every element must
    be covered exactly once."""
    whole = np.empty(int(np.prod(shape)), np.float32)
    covered = 0
    for (start, end), values in sorted(parts, key=lambda part: part[0]):
        if start != covered:
            what = "overlap at element" if start < covered else f"leave elements {covered}..{start - 1} uncovered after"
            raise KeyError(f"the shards of {name} {what} {start}")
        whole[start:end] = values
        covered = end
    if covered != whole.size:
        raise KeyError(f"the shards of {name} cover {covered} of its {whole.size} elements")
    return whole.reshape(shape)

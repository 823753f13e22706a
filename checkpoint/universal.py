"""The universal checkpoint on disk: one zarr v3 array per logical tensor, and its commit protocol.

Layout of one checkpoint (see docs/checkpoint-format.md):

    CKPT_DIR/step_000000100/
        zarr.json                          root group; attrs: format, version
        model/<param>                      global, unpadded weights (float32)
        model/<param>.vocab_padding        the padding rows of vocabulary-sized tensors
        optim/<state>/<param>              fp32 main weights ("param") and optimizer states
        state.json                         step, sampler, config, layout (rank 0)
        rng/rank_00000.json                each rank's RNG states
        manifest.json                      written last: the checkpoint is complete
    CKPT_DIR/latest                        name of the newest complete checkpoint
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from checkpoint.layout import (
    PADDING_SUFFIX,
    TensorLayout,
    chunk_shape,
    padding_chunk_shape,
    padding_region,
    padding_shape,
    tp_regions,
)

if TYPE_CHECKING:  # the writer process imports this module and needs no torch
    import torch

FORMAT = "stalwart-universal"
VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit the model."""


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


# ---------------------------------------------------------------------------------------
# Writing


def create_arrays(root: Path, tensors: list[tuple[str, TensorLayout]], tp: int) -> None:
    """Create the metadata of the arrays this rank is the first writer of (before any chunk).

    The zarr.json files are rendered from a template that zarr itself produced, rather than
    through zarr's API, which costs milliseconds per array: a Llama-8B checkpoint has over
    a thousand arrays, created at every save.
    """
    for name, layout in tensors:
        _write_array_meta(
            root, name, layout.shape, chunk_shape(layout, tp), {"layout": layout.to_attrs(), "saved_tp": tp}
        )
        if padding_shape(layout)[0]:
            meta = {"padding_of": name}
            _write_array_meta(root, name + PADDING_SUFFIX, padding_shape(layout), padding_chunk_shape(layout), meta)


@functools.cache
def _array_meta_template() -> str:
    store = zarr.storage.MemoryStore()
    zarr.create_array(
        store,
        shape=(1,),
        chunks=(1,),
        dtype="float32",
        serializer=BytesCodec(),
        compressors=[Crc32cCodec()],  # a checksum per chunk, verified on every read
        fill_value=0.0,
    )
    return store._store_dict["zarr.json"].to_bytes().decode()


def _write_array_meta(root: Path, name: str, shape, chunks, attrs: dict) -> None:
    meta = json.loads(_array_meta_template())
    meta["shape"] = list(shape)
    meta["chunk_grid"]["configuration"]["chunk_shape"] = list(chunks)
    meta["attributes"] = attrs
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    _write_group_meta_of_parents(root, name)
    write_atomic(path / "zarr.json", json.dumps(meta, indent=1))


def create_root_group(root: Path, attributes: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / "zarr.json", json.dumps({"attributes": attributes, "zarr_format": 3, "node_type": "group"}))


def _write_group_meta_of_parents(root: Path, name: str) -> None:
    parts = Path(name).parts[:-1]
    for depth in range(1, len(parts) + 1):
        meta = root.joinpath(*parts[:depth]) / "zarr.json"
        if not meta.exists():
            write_atomic(meta, json.dumps({"attributes": {}, "zarr_format": 3, "node_type": "group"}))


def write_atomic(path: Path, text: str) -> None:
    """write-temp, fsync, rename, fsync the directory: readers see the old file or the new
    one, never a part, and it survives a crash. Several writers may write the same group
    metadata: each renames a whole file of its own into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_file(path.parent)


def chunk_keys(array, region: tuple[slice, ...]) -> list[str]:
    """Keys of the chunks that `region` covers (regions are aligned to the chunk grid)."""
    ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(region, array.chunks, strict=True)]
    encode = array.metadata.chunk_key_encoding.encode_chunk_key
    return [encode(index) for index in itertools.product(*ranges)]


def write_json_atomic(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def commit(ckpt_dir: Path, root: Path, reports: list[dict[str, list[str]]], step: int) -> None:
    """Rank 0, after every rank reported durable writes: manifest last, then `latest`."""
    chunks: dict[str, list[str]] = {}
    for report in reports:  # duplicates are kept: `stalwart ckpt verify` reports a chunk written twice
        for name, keys in report.items():
            chunks.setdefault(name, []).extend(keys)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "arrays": {name: sorted(keys) for name, keys in sorted(chunks.items())},
    }
    write_json_atomic(root / "manifest.json", manifest)
    write_atomic(ckpt_dir / "latest", root.name + "\n")


def fsync_file(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its new entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# Finding and reading


@dataclass(frozen=True)
class Found:
    path: Path
    step: int
    skipped: list[str]
    """Why newer checkpoints were not taken."""


def step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory, complete or not, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_DIR.match(p.name)))


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    return [(step, path) for step, path in step_dirs(ckpt_dir) if completeness_problem(path) is None]


def find_resume_checkpoint(ckpt_dir: Path) -> Found | None:
    """The newest complete checkpoint; incomplete newer ones are skipped with a reason."""
    skipped = []
    for step, path in reversed(step_dirs(ckpt_dir)):
        problem = completeness_problem(path)
        if problem is None:
            return Found(path, step, skipped)
        skipped.append(f"{path.name}: {problem}")
    return None


def completeness_problem(path: Path) -> str | None:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "manifest.json is not valid JSON"
    for name, keys in manifest["arrays"].items():
        missing = [k for k in keys if not (path / name / k).is_file()]
        if missing:
            return f"tensor {name} is missing chunk {missing[0]}"
    if not (path / "state.json").is_file():
        return "no state.json"
    return None


class CheckpointReader:
    """Reads the pieces a rank of any layout needs, chunk by chunk."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest = json.loads((path / "manifest.json").read_text())
        self.state = json.loads((path / "state.json").read_text())
        self.arrays = set(self.manifest["arrays"])

    @property
    def optimizer_state_keys(self) -> list[str]:
        return sorted({name.split("/")[1] for name in self.arrays if name.startswith("optim/")})

    def read_many(self, items: list[tuple[str, TensorLayout, torch.Tensor]], tp_rank: int, tp: int) -> None:
        """Fill many pieces at once: every region is read concurrently through zarr's async API.

        Per-call latency, not bandwidth, dominates reading hundreds of arrays one by one.
        """
        import torch

        staging, plans = [], []
        for index, (name, layout, out) in enumerate(items):
            saved = self._saved_layout(name, layout)
            staging.append(out.detach().to("cpu", torch.float32).numpy().copy())
            plans += [(index, name, g, local) for g, local in tp_regions(layout, tp_rank, tp)]
            pad = padding_region(layout, tp_rank, tp)
            padding_name = name + PADDING_SUFFIX
            if pad and padding_name in self.arrays and saved.padded_rows == layout.padded_rows:
                plans.append((index, padding_name, pad[0], pad[1]))
        values = asyncio.run(_read_regions([(self.path / name, region) for _, name, region, _ in plans]))
        for (index, name, region, local), value in zip(plans, values, strict=True):
            if isinstance(value, Exception):
                self._raise_read_error(name, region, value)
            staging[index][local] = value
        for (_, _, out), values_of_piece in zip(items, staging, strict=True):
            out.data.copy_(torch.from_numpy(values_of_piece).view(out.shape).to(out.dtype))

    def read_shards(self, items, tp_rank: int, tp: int) -> None:
        """Element ranges of this rank's pieces (a distributed optimizer's shards)."""
        from checkpoint.state import read_shards_of_pieces

        read_shards_of_pieces(self, items, tp_rank, tp)

    def _saved_layout(self, name: str, layout: TensorLayout) -> TensorLayout:
        if name not in self.arrays:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name}")
        meta = json.loads((self.path / name / "zarr.json").read_text())
        saved = TensorLayout.from_attrs(meta["attributes"]["layout"])
        if saved.shape != layout.shape:
            raise CheckpointError(
                f"tensor {name}: checkpoint shape {saved.shape} does not match the model's {layout.shape}"
            )
        return saved

    def _raise_read_error(self, name: str, region: tuple[slice, ...], error: Exception) -> None:
        if not isinstance(error, ValueError) or "checksum" not in str(error):
            raise CheckpointError(f"checkpoint {self.path}: reading tensor {name} failed: {error}") from error
        bad = _first_corrupted_chunk(zarr.open_array(self.path / name, mode="r"), region)
        raise CheckpointError(
            f"checkpoint {self.path}: tensor {name} chunk {bad} failed its checksum (corrupted on disk)"
        ) from None


async def _read_regions(requests: list[tuple[Path, tuple[slice, ...]]], concurrency: int = 32) -> list:
    """The values of every (array, region), or the exception reading it raised."""
    from zarr.api import asynchronous

    limit = asyncio.Semaphore(concurrency)
    arrays: dict[Path, asyncio.Task] = {}

    async def read(path: Path, region: tuple[slice, ...]):
        async with limit:
            if path not in arrays:
                arrays[path] = asyncio.ensure_future(asynchronous.open_array(store=str(path), mode="r"))
            array = await arrays[path]
            return await array.getitem(region)

    return await asyncio.gather(*(read(path, region) for path, region in requests), return_exceptions=True)


def _first_corrupted_chunk(array, region: tuple[slice, ...]) -> str:
    for key in chunk_keys(array, region):
        index = tuple(int(i) for i in key.split("/")[1:])
        chunk = tuple(
            slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, array.chunks, array.shape, strict=True)
        )
        try:
            array[chunk]
        except ValueError:
            return key
    return "?"

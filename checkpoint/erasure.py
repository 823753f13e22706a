"""Erasure codes across the snapshot daemons of a group of nodes.

XOR parity (m = 1) and Reed-Solomon (m >= 2) both run on Intel's ISA-L, called on numpy
buffers in place: its Python wrappers (pyeclib) copy every fragment, which cost ten times
the coding itself. ISA-L comes from the pyeclib wheel, which bundles it, or from the system.

A group of N daemons protects their snapshot shares with k = N - m data blocks per share:
share i is cut into k equal blocks, and N stripes each take one block from k nodes and put
their m parity blocks on the other m nodes, rotating (RAID-5/6 style). Losing any m nodes
costs each stripe at most m of its k + m blocks, so every lost block can be rebuilt.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

ALIGN = 64
"""Blocks are padded to a multiple of this many bytes (ISA-L's vector width)."""


class ErasureError(Exception):
    """A code cannot be built or a block set cannot be decoded."""


# ---------------------------------------------------------------------------------------
# Placement: pure functions of (nodes, parity)


@dataclass(frozen=True)
class Stripe:
    index: int
    data_nodes: tuple[int, ...]
    """The k nodes whose blocks are this stripe's data, in code position order."""
    parity_nodes: tuple[int, ...]
    """The m nodes holding this stripe's parity blocks, in code position order (k, k+1, ...)."""

    def block_of(self, node: int) -> int:
        """Which of `node`'s k blocks is its data in this stripe."""
        return sum(1 for s in range(self.index) if node not in _parity_nodes(s, len(self.data_nodes), self.m))

    @property
    def m(self) -> int:
        return len(self.parity_nodes)


def _parity_nodes(stripe: int, k: int, m: int) -> tuple[int, ...]:
    nodes = k + m
    return tuple((stripe + j) % nodes for j in range(m))


def stripes(nodes: int, parity: int) -> list[Stripe]:
    """The N stripes of a group of `nodes` daemons with `parity` parity blocks per stripe."""
    check_group(nodes, parity)
    k = nodes - parity
    out = []
    for s in range(nodes):
        parity_nodes = _parity_nodes(s, k, parity)
        data_nodes = tuple(n for n in range(nodes) if n not in parity_nodes)
        out.append(Stripe(s, data_nodes, parity_nodes))
    return out


def check_group(nodes: int, parity: int) -> None:
    if parity < 1:
        raise ErasureError(f"parity must be at least 1, not {parity}")
    mirrored = nodes == 2 and parity == 1  # two nodes: XOR parity of one block is a copy of it
    if nodes < parity + 2 and not mirrored:
        raise ErasureError(f"{nodes} nodes cannot hold {parity} parity blocks per stripe: need at least {parity + 2}")
    if nodes > 255:
        raise ErasureError(f"at most 255 nodes per erasure-coding group, not {nodes}")


def block_bytes(largest_share: int, k: int) -> int:
    """Size of every block of a group whose largest share has `largest_share` bytes."""
    return max(ALIGN, math.ceil(largest_share / k / ALIGN) * ALIGN)


# ---------------------------------------------------------------------------------------
# Codes


class Code:
    """k data blocks, m parity blocks, all of one length; positions 0..k-1 data, k.. parity."""

    def __init__(self, k: int, m: int, threads: int = 1):
        if k < 1 or m < 1 or k + m > 255:
            raise ErasureError(f"no code with k={k}, m={m}")
        self.k, self.m, self.threads = k, m, max(1, threads)
        self._matrix = _encode_matrix(k, m)

    def encode(self, data: list[np.ndarray], parity: list[np.ndarray]) -> None:
        """Write the parity of `data` (k uint8 arrays) into `parity` (m uint8 arrays)."""
        self._check(data, self.k, parity, self.m)
        rows = bytes(self._matrix[self.k * self.k :])
        self._apply(rows, data, parity)

    def accumulate(self, parity: int, source: int, data: np.ndarray, out: np.ndarray) -> None:
        """Add data block `source`'s contribution to parity block `parity` (0..m-1) in place.

        Parity is linear, so a parity holder can fold in each data block (or a range of it)
        as it arrives, in any order, holding nothing but the parity itself.
        """
        row = self._matrix[(self.k + parity) * self.k : (self.k + parity + 1) * self.k]
        self._folder(bytes(row), tuple(range(self.k)))(source, data, out)

    def folding(self, use: tuple[int, ...], target: int) -> Callable[[int, np.ndarray, np.ndarray], None]:
        """fold(position, data, out): add the block at `position` (one of the k of `use`), or a
        range of it, into the block at `target` being rebuilt in `out` (zeros at first). Once
        each block of `use` has been folded in whole, in any order and in pieces, `out` is the
        block at `target`: a rebuild folds blocks in as they arrive, holding none of them."""
        if len(use) != self.k or target in use:
            raise ErasureError(f"a block is rebuilt from k={self.k} others, not from positions {use}")
        return self._folder(_decode_rows(self._matrix, self.k, tuple(use), (target,)), tuple(use))

    def _folder(self, row: bytes, positions: tuple[int, ...]) -> Callable[[int, np.ndarray, np.ndarray], None]:
        """out += row[i] x data, for the block at positions[i], over GF(2^8)."""
        lib = _isal()
        tables = (ctypes.c_ubyte * (self.k * 32))()
        lib.ec_init_tables(self.k, 1, ctypes.c_char_p(row), tables)

        def fold(position: int, data: np.ndarray, out: np.ndarray) -> None:
            self._check([data], 1, [out], 1)
            coding = (_POINTER * 1)(_pointer(out, 0))
            source = positions.index(position)
            lib.ec_encode_data_update(data.size, self.k, 1, source, tables, _pointer(data, 0), coding)

        return fold

    def decode(self, present: dict[int, np.ndarray], lost: dict[int, np.ndarray]) -> None:
        """Rebuild the blocks at the positions of `lost` (filled in place) from k of `present`."""
        if len(present) < self.k:
            raise ErasureError(f"{len(present)} blocks left of a {self.k}+{self.m} stripe: at least {self.k} needed")
        if not lost:
            return
        use = sorted(present)[: self.k]
        sources = [present[p] for p in use]
        targets = [lost[p] for p in sorted(lost)]
        self._check(sources, self.k, targets, len(targets))
        self._apply(_decode_rows(self._matrix, self.k, tuple(use), tuple(sorted(lost))), sources, targets)

    def threads_for(self, length: int) -> int:
        """Threads an encode or decode of `length`-byte blocks runs on: ranges of at least 1 MiB."""
        return min(self.threads, max(1, length // (1 << 20)))

    def _apply(self, rows: bytes, sources: list[np.ndarray], targets: list[np.ndarray]) -> None:
        """targets = rows x sources over GF(2^8), split into ranges over `threads` threads."""
        length = sources[0].size
        if length == 0:
            return
        pieces = self.threads_for(length)
        cuts = [length * i // pieces // ALIGN * ALIGN for i in range(pieces)] + [length]
        if pieces == 1:
            _isal_matmul(rows, self.k, sources, targets, 0, length)
            return
        with ThreadPoolExecutor(pieces) as pool:  # ctypes releases the GIL during the call
            list(pool.map(lambda i: _isal_matmul(rows, self.k, sources, targets, cuts[i], cuts[i + 1]), range(pieces)))

    @staticmethod
    def _check(sources, count, targets, target_count) -> None:
        if len(sources) != count or len(targets) != target_count:
            raise ErasureError(f"expected {count} source and {target_count} target blocks")
        length = sources[0].size
        for block in [*sources, *targets]:
            if block.dtype != np.uint8 or block.ndim != 1 or block.size != length or not block.flags.c_contiguous:
                raise ErasureError("blocks must be contiguous 1-D uint8 arrays of one length")
        if any(not t.flags.writeable for t in targets):
            raise ErasureError("target blocks must be writable")


class XorCode(Code):
    """m = 1: the parity block is the XOR of the data blocks."""

    def __init__(self, k: int, threads: int = 1):
        super().__init__(k, 1, threads)

    def threads_for(self, length: int) -> int:
        return 1  # one ISA-L call, which does not split its work

    def encode(self, data: list[np.ndarray], parity: list[np.ndarray]) -> None:
        self._check(data, self.k, parity, 1)
        _xor_into(parity[0], data)

    def accumulate(self, parity: int, source: int, data: np.ndarray, out: np.ndarray) -> None:
        self._check([data], 1, [out], 1)
        np.bitwise_xor(out, data, out=out)

    def folding(self, use: tuple[int, ...], target: int) -> Callable[[int, np.ndarray, np.ndarray], None]:
        if len(use) != self.k or target in use:
            raise ErasureError(f"a block is rebuilt from k={self.k} others, not from positions {use}")
        return lambda position, data, out: self.accumulate(0, position, data, out)

    def decode(self, present: dict[int, np.ndarray], lost: dict[int, np.ndarray]) -> None:
        if not lost:
            return
        if len(lost) > 1 or len(present) < self.k:
            raise ErasureError(f"XOR parity rebuilds one lost block per stripe, not {len(lost)}")
        (target,) = lost.values()
        _xor_into(target, [present[p] for p in sorted(present)[: self.k]])


def make_code(k: int, m: int, threads: int = 1) -> Code:
    return XorCode(k, threads) if m == 1 else Code(k, m, threads)


XOR_ALIGN = 32
"""ISA-L's xor_gen loads and stores with aligned vector instructions: every block must start at
a multiple of 32 bytes, or the process dies of a segmentation fault."""


def _xor_into(out: np.ndarray, blocks: list[np.ndarray]) -> None:
    if len(blocks) == 1:
        np.copyto(out, blocks[0])
        return
    if any(b.ctypes.data % XOR_ALIGN for b in [*blocks, out]):
        np.bitwise_xor(blocks[0], blocks[1], out=out)
        for block in blocks[2:]:
            np.bitwise_xor(out, block, out=out)
        return
    pointers = (_POINTER * (len(blocks) + 1))(*[_pointer(b, 0) for b in blocks], _pointer(out, 0))
    if _isal().xor_gen(len(blocks) + 1, out.size, pointers) != 0:
        raise ErasureError("ISA-L xor_gen failed")


# ---------------------------------------------------------------------------------------
# ISA-L

_POINTER = ctypes.POINTER(ctypes.c_ubyte)


def _pointer(block: np.ndarray, offset: int):
    return ctypes.cast(block.ctypes.data + offset, _POINTER)


@functools.cache
def _isal() -> ctypes.CDLL:
    """ISA-L: the copy bundled in the pyeclib wheel, else a system libisal."""
    candidates = []
    try:
        import pyeclib

        libs = os.path.join(os.path.dirname(os.path.dirname(pyeclib.__file__)), "pyeclib.libs")
        candidates += sorted(glob.glob(os.path.join(libs, "libisal*.so*")))
    except ImportError:
        pass
    if system := ctypes.util.find_library("isal"):
        candidates.append(system)
    for path in candidates:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    raise ErasureError("ISA-L not found: install pyeclib (pip) or libisal2 (apt)")


@functools.cache
def _encode_matrix(k: int, m: int) -> bytes:
    """(k + m) x k Cauchy matrix, identity on top: every k x k submatrix is invertible."""
    matrix = (ctypes.c_ubyte * ((k + m) * k))()
    _isal().gf_gen_cauchy1_matrix(matrix, k + m, k)
    return bytes(matrix)


@functools.cache
def _decode_rows(matrix: bytes, k: int, use: tuple[int, ...], lost: tuple[int, ...]) -> bytes:
    """Rows that map the blocks at positions `use` to those at positions `lost`."""
    lib = _isal()
    lib.gf_mul.restype = ctypes.c_ubyte
    rows = np.frombuffer(matrix, np.uint8).reshape(-1, k)
    sub = (ctypes.c_ubyte * (k * k))(*rows[list(use)].ravel())
    inverse = (ctypes.c_ubyte * (k * k))()
    if lib.gf_invert_matrix(sub, inverse, k) != 0:
        raise ErasureError(f"the blocks at positions {use} do not determine the rest")
    inv = np.frombuffer(bytes(inverse), np.uint8).reshape(k, k)
    out = []
    for position in lost:
        # The lost block is row `position` of the code applied to the data, and the data is
        # the inverse applied to the blocks used: compose the two over GF(2^8).
        coefficients = rows[position]
        row = [0] * k
        for j in range(k):
            acc = 0
            for t in range(k):
                acc ^= lib.gf_mul(int(coefficients[t]), int(inv[t, j]))
            row[j] = acc
        out += row
    return bytes(out)


def _isal_matmul(rows: bytes, k: int, sources: list[np.ndarray], targets: list[np.ndarray], start: int, stop: int):
    lib = _isal()
    count = len(targets)
    tables = (ctypes.c_ubyte * (k * count * 32))()
    lib.ec_init_tables(k, count, ctypes.c_char_p(rows), tables)
    data = (_POINTER * k)(*[_pointer(s, start) for s in sources])
    coding = (_POINTER * count)(*[_pointer(t, start) for t in targets])
    lib.ec_encode_data(stop - start, k, count, tables, data, coding)

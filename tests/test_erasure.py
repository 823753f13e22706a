"""Erasure codes and their placement over a group of daemons."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from checkpoint.block_transport import PIECE
from checkpoint.erasure import ErasureError, block_bytes, make_code, stripes
from checkpoint.snapshot_group import range_pieces, spans


@pytest.mark.parametrize("nodes,parity", [(2, 1), (3, 1), (4, 1), (6, 2), (7, 3), (8, 2)])
def test_every_block_has_one_stripe_and_any_m_lost_nodes_leave_every_stripe_decodable(nodes, parity):
    k = nodes - parity
    plan = stripes(nodes, parity)
    assert len(plan) == nodes
    for node in range(nodes):
        blocks = [s.block_of(node) for s in plan if node in s.data_nodes]
        assert sorted(blocks) == list(range(k)), f"node {node} must give each of its {k} blocks to one stripe"
        assert sum(node in s.parity_nodes for s in plan) == parity
    for s in plan:
        assert len(set(s.data_nodes)) == k and not set(s.data_nodes) & set(s.parity_nodes)
    for lost in itertools.combinations(range(nodes), parity):
        for s in plan:
            survivors = [n for n in (*s.data_nodes, *s.parity_nodes) if n not in lost]
            assert len(survivors) >= k


@pytest.mark.parametrize("offset", [0, 1, 8, 16, 31])
def test_xor_parity_of_blocks_at_any_alignment_is_right(offset):
    """ISA-L's XOR needs blocks that start at 32-byte boundaries; blocks cut from a segment at
    any offset (and numpy's own allocations, aligned to 16) must give the same parity, not a crash."""
    rng = np.random.default_rng(offset)
    length, k = 64 * 1024 + 17, 3
    backing = [np.zeros(length + 64, np.uint8) for _ in range(k + 1)]
    starts = [(-b.ctypes.data % 32) + offset for b in backing]  # each block exactly `offset` past a boundary
    data = [b[s : s + length] for b, s in zip(backing[:k], starts[:k], strict=True)]
    for block in data:
        block[:] = rng.integers(0, 256, length, dtype=np.uint8)
    parity = backing[k][starts[k] : starts[k] + length]
    make_code(k, 1).encode(data, [parity])
    np.testing.assert_array_equal(parity, np.bitwise_xor.reduce(np.stack(data)))
    lost = data[1].copy()
    data[1][:] = 0
    make_code(k, 1).decode({0: data[0], 2: data[2], 3: parity}, {1: data[1]})
    np.testing.assert_array_equal(data[1], lost)


@pytest.mark.parametrize("k,m", [(3, 1), (4, 2), (5, 3), (1, 1), (2, 2)])
@pytest.mark.parametrize("length", [1, 63, 64, 1000, 4096 + 17])
def test_any_m_lost_blocks_are_rebuilt_exactly(k, m, length):
    rng = np.random.default_rng(k * 100 + m + length)
    code = make_code(k, m)
    data = [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(k)]
    parity = [np.zeros(length, np.uint8) for _ in range(m)]
    code.encode(data, parity)
    blocks = data + parity
    if m == 1:  # XOR parity is what it says
        np.testing.assert_array_equal(parity[0], np.bitwise_xor.reduce(np.stack(data)))
    for count in range(1, m + 1):
        for lost in itertools.combinations(range(k + m), count):
            present = {p: b for p, b in enumerate(blocks) if p not in lost}
            rebuilt = {p: np.full(length, 0xAA, np.uint8) for p in lost}
            code.decode(present, rebuilt)
            for p in lost:
                np.testing.assert_array_equal(rebuilt[p], blocks[p], err_msg=f"position {p} of lost {lost}")


@pytest.mark.parametrize("k,m", [(3, 1), (4, 2), (2, 2)])
def test_blocks_folded_in_pieces_in_any_order_rebuild_what_decode_does(k, m):
    """A rebuild folds each block in as its pieces arrive, blocks interleaved, shorter blocks
    (their missing tail counts as zeros) only as far as they go."""
    rng = np.random.default_rng(k * 10 + m)
    code, length = make_code(k, m), 4096 + 64
    data = [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(k)]
    data[-1][length - 1000 :] = 0  # the last data block is 1000 bytes shorter, padded with zeros
    parity = [np.zeros(length, np.uint8) for _ in range(m)]
    code.encode(data, parity)
    blocks = data + parity
    for target in range(k + m):
        others = [p for p in range(k + m) if p != target]
        for use in itertools.combinations(others, k):
            sent = {p: blocks[p][: length - 1000] if p == k - 1 else blocks[p] for p in use}
            pieces = [(p, a) for p in use for a in range(0, sent[p].size, 700)]
            out = np.zeros(length, np.uint8)
            fold = code.folding(use, target)
            for i in rng.permutation(len(pieces)):
                position, start = pieces[i]
                chunk = sent[position][start : start + 700]
                fold(position, chunk, out[start : start + chunk.size])
            np.testing.assert_array_equal(out, blocks[target], err_msg=f"target {target} from {use}")
    with pytest.raises(ErasureError, match="from k="):
        code.folding(tuple(range(k - 1)), k)


def test_threads_split_the_work_without_changing_the_result():
    rng = np.random.default_rng(7)
    length = (3 << 20) + 123
    data = [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(4)]
    one, two = [np.zeros(length, np.uint8) for _ in range(2)], [np.zeros(length, np.uint8) for _ in range(2)]
    make_code(4, 2, threads=1).encode(data, one)
    make_code(4, 2, threads=2).encode(data, two)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


def test_too_many_losses_and_bad_groups_are_refused_with_a_reason():
    code = make_code(3, 1)
    blocks = [np.zeros(64, np.uint8) for _ in range(4)]
    with pytest.raises(ErasureError, match="one lost block"):
        code.decode({0: blocks[0], 1: blocks[1]}, {2: blocks[2], 3: blocks[3]})
    with pytest.raises(ErasureError, match="at least 4 needed"):
        make_code(4, 2).decode({0: blocks[0]}, {1: blocks[1]})
    with pytest.raises(ErasureError, match="need at least 4"):
        stripes(3, 2)
    with pytest.raises(ErasureError, match="one length"):
        code.encode([np.zeros(64, np.uint8), np.zeros(64, np.uint8), np.zeros(65, np.uint8)], [blocks[3]])


def test_block_size_covers_the_largest_share_and_is_aligned():
    for share in (0, 1, 63, 64, 1000, 10**6 + 1):
        for k in (1, 3, 5):
            size = block_bytes(share, k)
            assert size % 64 == 0 and size * k >= share


@pytest.mark.parametrize("k,m", [(3, 1), (4, 2), (3, 3)])
def test_parity_folded_in_piece_by_piece_in_any_order_equals_the_encoded_parity(k, m):
    rng = np.random.default_rng(11)
    length = 5000
    data = [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(k)]
    code = make_code(k, m)
    expected = [np.zeros(length, np.uint8) for _ in range(m)]
    code.encode(data, expected)
    folded = [np.zeros(length, np.uint8) for _ in range(m)]
    pieces = [(i, start) for i in range(k) for start in range(0, length, 1024)]
    rng.shuffle(pieces)
    for i, start in pieces:
        stop = min(start + 1024, length)
        for j in range(m):
            code.accumulate(j, i, data[i][start:stop], folded[j][start:stop])
    for a, b in zip(expected, folded, strict=True):
        np.testing.assert_array_equal(a, b)


@given(st.lists(st.binary(max_size=40), max_size=5), st.data())
def test_spans_find_any_range_of_the_segments_laid_end_to_end(segments, data):
    """A rebuild folds each piece of a block straight into the segments it lands in."""
    joined = b"".join(segments)
    start = data.draw(st.integers(0, len(joined) + 8), "start")
    length = data.draw(st.integers(0, 50), "length")
    found = list(spans([memoryview(s) for s in segments], start, length))
    assert b"".join(bytes(view) for _, view in found) == joined[start : start + length]
    assert [at for at, _ in found] == [sum(len(v) for _, v in found[:i]) for i in range(len(found))]
    assert all(len(view) > 0 for _, view in found)


@given(st.lists(st.binary(max_size=40), max_size=4), st.data())
def test_a_data_block_is_sent_as_views_of_the_segments_padded_with_zeros(segments, data):
    """A daemon sends block bytes straight out of its ranks' segments; past their end, zeros."""
    joined = b"".join(segments)
    start = data.draw(st.integers(0, len(joined) + 8), "start")
    length = data.draw(st.integers(0, 3 * PIECE), "length")
    pieces = list(range_pieces([memoryview(s) for s in segments], start, length))
    assert all(len(p) <= PIECE for p in pieces)
    assert b"".join(bytes(p) for p in pieces) == (joined[start:] + bytes(length))[:length]

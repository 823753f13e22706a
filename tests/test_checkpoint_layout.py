"""The pure mapping between TP pieces and logical tensors, checked by reassembly."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from checkpoint.layout import TensorLayout, join_shards, local_shape, padding_region, padding_shape, tp_regions


def shard(full: np.ndarray, layout: TensorLayout, tp_rank: int, tp: int) -> np.ndarray:
    """What megatron holds on one TP rank, built independently of checkpoint.layout."""
    padded = full
    if layout.padded_rows:
        extra = layout.padded_rows - full.shape[0]
        padded = np.concatenate([full, -np.ones((extra, *full.shape[1:]))])
    if layout.tp_dim is None:
        return padded
    if layout.gate_up:
        gate, up = np.split(padded, 2, axis=layout.tp_dim)
        pieces = [np.split(half, tp, axis=layout.tp_dim)[tp_rank] for half in (gate, up)]
        return np.concatenate(pieces, axis=layout.tp_dim)
    return np.split(padded, tp, axis=layout.tp_dim)[tp_rank]


def reassemble(layout: TensorLayout, tp: int, pieces: list[np.ndarray]) -> np.ndarray:
    out = np.full(layout.shape, np.nan)
    for rank, piece in enumerate(pieces):
        assert piece.shape == local_shape(layout, tp)
        for global_region, local_region in tp_regions(layout, rank, tp):
            out[global_region] = piece[local_region]
    return out


layouts = st.sampled_from(
    [
        TensorLayout((8, 12), tp_dim=0),
        TensorLayout((8, 12), tp_dim=1),
        TensorLayout((6,), tp_dim=None),
        TensorLayout((16, 6), tp_dim=0, gate_up=True),
        TensorLayout((13, 6), tp_dim=0, padded_rows=16),
        TensorLayout((16, 6), tp_dim=0, padded_rows=16),
    ]
)


@given(layout=layouts, tp=st.sampled_from([1, 2, 4]))
def test_pieces_of_any_tp_reassemble_the_logical_tensor(layout, tp):
    full = np.arange(np.prod(layout.shape), dtype=float).reshape(layout.shape)
    pieces = [shard(full, layout, r, tp) for r in range(tp)]
    np.testing.assert_array_equal(reassemble(layout, tp, pieces), full)


@given(layout=layouts, tp=st.sampled_from([1, 2, 4]))
def test_regions_of_one_layout_never_overlap(layout, tp):
    covered = np.zeros(layout.shape, dtype=int)
    for rank in range(1 if layout.tp_dim is None else tp):
        for global_region, _ in tp_regions(layout, rank, tp):
            covered[global_region] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_padding_rows_are_placed_once(tp):
    layout = TensorLayout((13, 3), tp_dim=0, padded_rows=16)
    covered = np.zeros(padding_shape(layout))
    for rank in range(tp):
        region = padding_region(layout, rank, tp)
        if region:
            covered[region[0]] += 1
            assert region[1][0].stop - region[1][0].start == region[0][0].stop - region[0][0].start
    assert (covered == 1).all()


def test_chunks_encoded_by_the_writer_read_back_through_plain_zarr(tmp_path):
    """The writer encodes chunks itself; zarr must decode them and verify their checksums."""
    import zarr

    from checkpoint.universal import create_arrays
    from checkpoint.writer import encode_chunk

    layout = TensorLayout((13, 3), tp_dim=0, padded_rows=16)  # 2 chunks of 8 rows, the second an edge chunk
    create_arrays(tmp_path, [("model/w", layout)], tp=2)
    values = np.arange(39, dtype=np.float32).reshape(13, 3)
    for index, rows in ((0, slice(0, 8)), (1, slice(8, 13))):
        path = tmp_path / "model" / "w" / "c" / str(index) / "0"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(encode_chunk(values[rows], (8, 3))))
    np.testing.assert_array_equal(zarr.open(str(tmp_path / "model" / "w"), mode="r")[...], values)
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        zarr.open(str(tmp_path / "model" / "w"), mode="r")[8:13]


@given(st.lists(st.integers(0, 60), max_size=6), st.randoms())
def test_dp_shards_in_any_order_join_into_their_piece(cuts, random):
    """A distributed optimizer's shards of one TP piece (element ranges), in any order."""
    piece = np.arange(60, dtype=np.float32).reshape(6, 10)
    bounds = sorted({0, 60, *cuts})
    parts = [((a, b), piece.reshape(-1)[a:b]) for a, b in itertools.pairwise(bounds)]
    random.shuffle(parts)
    assert np.array_equal(join_shards("optim/exp_avg/w", parts, (6, 10)), piece)


@pytest.mark.parametrize(
    "ranges, problem",
    [
        ([(0, 20), (30, 60)], "elements 20..29 uncovered"),
        ([(0, 40), (30, 60)], "overlap at element 30"),
        ([(0, 50)], "50 of its 60"),
    ],
)
def test_shards_that_leave_a_gap_or_overlap_are_refused_naming_the_piece(ranges, problem):
    parts = [((a, b), np.zeros(b - a, np.float32)) for a, b in ranges]
    with pytest.raises(KeyError, match=problem) as refused:
        join_shards("optim/exp_avg/w", parts, (6, 10))
    assert "optim/exp_avg/w" in str(refused.value)

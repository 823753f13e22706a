"""Documents split over data-parallel ranks and packed into micro-batches (pure functions)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parallel.plan import Group
from trainer.errors import DataError
from trainer.packing import balanced_groups, pack_documents, packed_micro_batch, rank_micro_batches, split_by_tokens

lengths_strategy = st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_strategy, ranks=st.integers(min_value=1, max_value=8))
def test_every_document_goes_to_one_rank_and_the_token_loads_differ_by_at_most_one_document(lengths, ranks):
    lengths = np.array(lengths)
    shares = split_by_tokens(lengths, ranks)
    assert len(shares) == ranks
    assert sorted(np.concatenate(shares).tolist()) == list(range(len(lengths)))
    assert all((np.diff(share) > 0).all() for share in shares)  # batch order
    loads = [int(lengths[share].sum()) for share in shares]
    # Longest first to the least loaded rank: no rank exceeds another by more than a document.
    assert max(loads) - min(loads) <= lengths.max()


def test_the_split_is_the_same_on_every_call():
    lengths = np.array([5, 9, 9, 1, 7, 3, 3])
    first = split_by_tokens(lengths, 3)
    assert all((a == b).all() for a, b in zip(first, split_by_tokens(lengths.copy(), 3), strict=True))
    # 9, 9, 7 to ranks 0-2; then 5 to rank 2 (7); 3 and 3 to ranks 0 and 1 (9 each); 1 to rank 0.
    assert [share.tolist() for share in first] == [[1, 3, 5], [2, 6], [0, 4]]


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_strategy, capacity=st.integers(min_value=300, max_value=1000))
def test_packing_keeps_every_document_whole_and_under_the_capacity(lengths, capacity):
    lengths = np.array(lengths)
    bins = pack_documents(lengths, capacity)
    assert sorted(np.concatenate(bins).tolist()) == list(range(len(lengths)))
    assert all(lengths[b].sum() <= capacity for b in bins)
    # First fit: no two micro-batches could have been one.
    totals = sorted(int(lengths[b].sum()) for b in bins)
    assert len(bins) == 1 or totals[0] + totals[1] > capacity


def test_a_document_longer_than_a_micro_batch_is_refused_by_name():
    with pytest.raises(DataError, match="a document of 9 tokens does not fit a micro-batch of 8 tokens"):
        pack_documents(np.array([3, 9]), 8)


def test_a_packed_micro_batch_keeps_labels_and_positions_inside_each_document():
    first, second = np.array([10, 11, 12, 13]), np.array([20, 21, 22])
    batch = packed_micro_batch([first, second], length=8)
    assert batch.tokens.tolist() == [10, 11, 12, 20, 21, 0, 0, 0]
    # The last input of a document predicts that document's last token, not the next one's first.
    assert batch.labels.tolist() == [11, 12, 13, 21, 22, 0, 0, 0]
    assert batch.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert batch.loss_mask.tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 8]  # the padding is a document of its own
    assert batch.num_tokens == 5


def test_a_full_micro_batch_has_no_padding_document():
    batch = packed_micro_batch([np.array([1, 2, 3]), np.array([4, 5])], length=3)
    assert batch.cu_seqlens.tolist() == [0, 2, 3]
    assert batch.loss_mask.all()


def test_documents_that_overflow_the_micro_batch_are_refused():
    with pytest.raises(DataError, match="5 tokens of documents do not fit a micro-batch of 4"):
        packed_micro_batch([np.arange(4), np.arange(3)], length=4)


def test_without_the_planner_every_rank_is_its_own_group_of_balanced_documents():
    lengths = np.array([50, 20, 90, 10, 40])
    groups = balanced_groups(lengths, ranks=2, capacity=100)
    assert [(g.start, g.size) for g in groups] == [(0, 1), (1, 1)]
    assert sorted(i for g in groups for i in g.sequences) == list(range(5))
    for g in groups:
        assert all(sum(lengths[list(mb)]) <= 100 for mb in g.microbatches)


def test_a_group_splits_each_micro_batch_into_equal_slices_that_cover_it():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, n + 1) for n in (30, 7, 12)]
    group = Group(2, 4, ((0, 1, 2),))  # data-parallel ranks 2..5
    slices = [rank_micro_batches([Group(0, 2, ()), group], r, docs.__getitem__, multiple=2)[0] for r in range(2, 6)]
    whole = packed_micro_batch(docs, 56)  # 49 tokens, padded to a multiple of 4 ranks x 2
    assert {len(s.tokens) for s in slices} == {14}
    assert np.concatenate([s.tokens for s in slices]).tolist() == whole.tokens.tolist()
    assert np.concatenate([s.loss_mask for s in slices]).sum() == 49
    assert all(s.cu_seqlens.tolist() == whole.cu_seqlens.tolist() and s.group == (2, 4) for s in slices)


def test_a_rank_without_documents_runs_one_micro_batch_of_padding_alone():
    for idle_group in (Group(1, 1, ()), Group(0, 2, ())):
        [idle] = rank_micro_batches([idle_group, Group(2, 2, ((0,),))], 1, lambda i: np.arange(9), multiple=1)
        assert idle.num_tokens == 0 and len(idle.tokens) >= 1
        assert idle.group == (1, 1)  # no collective with a group whose other ranks may have documents elsewhere


def test_a_rank_runs_its_groups_micro_batches_round_by_round():
    docs = [np.arange(n + 1) for n in (40, 7, 12, 9)]
    plan = [
        Group(0, 1, ((3,),), round=1),  # listed first, runs second
        Group(1, 1, ((1, 2),), round=1),
        Group(0, 2, ((0,),)),
    ]
    batches = [rank_micro_batches(plan, r, docs.__getitem__, multiple=1) for r in (0, 1)]
    assert [[b.group for b in rank] for rank in batches] == [[(0, 2), (0, 1)], [(0, 2), (1, 1)]]
    assert [sum(b.num_tokens for b in rank) for rank in batches] == [20 + 9, 20 + 19]
    with pytest.raises(DataError, match="gives data-parallel rank 1 no group in round 1"):
        rank_micro_batches([Group(0, 2, ((0,),)), Group(0, 1, ((1,),), round=1)], 1, docs.__getitem__, 1)


def test_pipelines_get_micro_batches_of_one_length_and_a_rank_outside_the_plan_is_refused():
    docs = [np.arange(n + 1) for n in (5, 60, 33)]
    batches = rank_micro_batches([Group(0, 1, ((0,), (1, 2)))], 0, docs.__getitem__, 1, tokens_per_rank=128)
    assert [len(b.tokens) for b in batches] == [128, 128]
    with pytest.raises(DataError, match="gives data-parallel rank 3 no group"):
        rank_micro_batches([Group(0, 2, ())], 3, docs.__getitem__, 1)

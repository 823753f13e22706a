"""Documents split over data-parallel ranks and packed into micro-batches (pure functions)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.errors import DataError
from trainer.packing import pack_documents, packed_micro_batch, split_by_tokens

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

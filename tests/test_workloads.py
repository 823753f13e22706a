"""Sequence-length workloads: the synthetic Wikipedia distribution, corpus and file lengths, batches."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from parallel.workloads import (
    LONG_DOCUMENT_TOKENS,
    WIKIPEDIA_LONG_DOCUMENT_SHARE,
    WIKIPEDIA_LONG_TOKEN_SHARE,
    WIKIPEDIA_MIN_TOKENS,
    WIKIPEDIA_PERCENTILES,
    WIKIPEDIA_TAIL_EXPONENT,
    WorkloadError,
    corpus_lengths,
    draw_batches,
    read_lengths_file,
    solve_wikipedia_tail_exponent,
    wikipedia_batches,
    wikipedia_lengths,
    wikipedia_long_token_share,
    wikipedia_quantile,
    workload_lengths,
)
from trainer.data import read_dataset_info
from trainer.errors import DataError


@pytest.fixture(scope="module")
def wikipedia_draw() -> np.ndarray:
    return wikipedia_lengths(2_000_000, np.random.default_rng(0), clip=None)


# ---------------------------------------------------------------------------------------
# Synthetic Wikipedia lengths


@pytest.mark.parametrize(("percentile", "tokens"), WIKIPEDIA_PERCENTILES)
def test_wikipedia_draw_reproduces_published_percentiles(wikipedia_draw, percentile, tokens):
    assert np.percentile(wikipedia_draw, percentile) == pytest.approx(tokens, rel=0.03)


def test_wikipedia_draw_reproduces_published_long_document_shares(wikipedia_draw):
    is_long = wikipedia_draw > LONG_DOCUMENT_TOKENS
    token_share = wikipedia_draw[is_long].sum() / wikipedia_draw.sum()
    assert token_share == pytest.approx(WIKIPEDIA_LONG_TOKEN_SHARE, abs=0.02)
    assert is_long.mean() == pytest.approx(WIKIPEDIA_LONG_DOCUMENT_SHARE, abs=0.003)


def test_wikipedia_lengths_are_integers_above_the_floor(wikipedia_draw):
    assert wikipedia_draw.dtype == np.int64
    assert wikipedia_draw.min() == WIKIPEDIA_MIN_TOKENS


def test_quantile_passes_through_every_published_knot():
    tail_probabilities = np.array([1.0 - percentile / 100.0 for percentile, _ in WIKIPEDIA_PERCENTILES])
    expected = [tokens for _, tokens in WIKIPEDIA_PERCENTILES]
    np.testing.assert_allclose(wikipedia_quantile(tail_probabilities), expected, rtol=1e-9)


def test_tail_exponent_constant_is_the_solved_one():
    assert solve_wikipedia_tail_exponent() == pytest.approx(WIKIPEDIA_TAIL_EXPONENT, abs=0.01)
    assert wikipedia_long_token_share() == pytest.approx(WIKIPEDIA_LONG_TOKEN_SHARE, abs=0.001)


def test_clip_cuts_long_documents_and_keeps_short_ones():
    clip = 4096
    whole = wikipedia_lengths(100_000, np.random.default_rng(3), clip=None)
    clipped = wikipedia_lengths(100_000, np.random.default_rng(3), clip=clip)
    assert clipped.max() == clip
    np.testing.assert_array_equal(clipped, np.minimum(whole, clip))


@pytest.mark.parametrize("clip", [0, -5])
def test_clip_must_be_positive(clip):
    with pytest.raises(WorkloadError, match="clip"):
        wikipedia_lengths(10, np.random.default_rng(0), clip=clip)


def test_same_seed_same_batches_other_seed_other_batches():
    first, again, other = (wikipedia_batches(4, 256, clip=131_072, seed=seed) for seed in (7, 7, 8))
    assert len(first) == 4 and all(batch.shape == (256,) for batch in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_draw_batches_samples_the_pool_deterministically():
    pool = np.array([10, 200, 3000, 40000])
    batches = draw_batches(pool, batches=3, sequences_per_batch=50, seed=1)
    assert len(batches) == 3 and all(batch.shape == (50,) for batch in batches)
    assert set(np.concatenate(batches)) <= set(pool)
    assert all(np.array_equal(a, b) for a, b in zip(batches, draw_batches(pool, 3, 50, seed=1), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, draw_batches(pool, 3, 50, seed=2), strict=True))


@pytest.mark.parametrize(
    ("pool", "batches", "sequences_per_batch", "message"),
    [([], 1, 1, "non-empty"), ([5], 0, 1, "batches"), ([5], 1, 0, "sequences_per_batch")],
)
def test_draw_batches_refuses_bad_arguments(pool, batches, sequences_per_batch, message):
    with pytest.raises(WorkloadError, match=message):
        draw_batches(np.array(pool, dtype=np.int64), batches, sequences_per_batch, seed=0)


def test_named_workload_is_the_seeded_distribution():
    lengths = workload_lengths("wikipedia", clip=2048, n=1000, seed=5)
    np.testing.assert_array_equal(lengths, wikipedia_lengths(1000, np.random.default_rng(5), clip=2048))
    with pytest.raises(WorkloadError, match="unknown workload 'c4'.*wikipedia"):
        workload_lengths("c4", clip=None, n=10, seed=0)


# ---------------------------------------------------------------------------------------
# Lengths from a file


def test_read_lengths_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "lengths.txt"
    path.write_text("# lengths of one batch\n512\n\n  2048  # a long one\n7\n")
    np.testing.assert_array_equal(read_lengths_file(path), [512, 2048, 7])


def test_read_lengths_file_reads_a_json_list(tmp_path):
    path = tmp_path / "lengths.json"
    path.write_text("[512, 2048, 7]")
    np.testing.assert_array_equal(read_lengths_file(path), [512, 2048, 7])


@pytest.mark.parametrize(
    ("bad_value", "message"),
    [("12.5", "not an integer"), ("many", "not an integer"), ("0", "not positive"), ("-3", "not positive")],
)
def test_read_lengths_file_names_the_line_of_a_bad_value(tmp_path, bad_value, message):
    path = tmp_path / "lengths.txt"
    path.write_text(f"# header\n100\n{bad_value}\n200\n")
    with pytest.raises(WorkloadError, match=rf"lengths.txt, line 3: .*{message}"):
        read_lengths_file(path)


@pytest.mark.parametrize(
    ("bad_value", "message"), [("2.5", "not an integer"), ("true", "not an integer"), ("0", "not positive")]
)
def test_read_lengths_file_names_the_index_of_a_bad_json_value(tmp_path, bad_value, message):
    path = tmp_path / "lengths.json"
    path.write_text(f"[100, 200, {bad_value}]")
    with pytest.raises(WorkloadError, match=rf"lengths.json, index 2: .*{message}"):
        read_lengths_file(path)


@pytest.mark.parametrize("text", ["", "\n# only a comment\n\n", "[]"])
def test_read_lengths_file_refuses_a_file_without_lengths(tmp_path, text):
    path = tmp_path / "lengths.txt"
    path.write_text(text)
    with pytest.raises(WorkloadError, match="lengths.txt.*holds no lengths"):
        read_lengths_file(path)


def test_read_lengths_file_names_a_missing_file(tmp_path):
    with pytest.raises(WorkloadError, match="absent.txt"):
        read_lengths_file(tmp_path / "absent.txt")


# ---------------------------------------------------------------------------------------
# Lengths from a prepared corpus


def test_corpus_lengths_are_the_train_documents(small_dataset):
    info = read_dataset_info(small_dataset)
    lengths = corpus_lengths(small_dataset)
    assert len(lengths) == info.documents["train"]
    assert lengths.sum() == info.tokens["train"]
    np.testing.assert_array_equal(corpus_lengths(f"{small_dataset}-train"), lengths)


def test_corpus_lengths_sum_the_sequences_of_each_document(tmp_path):
    prefix = str(tmp_path / "multi")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for document in ([3, 4], [5], [6, 7, 8]):
        for sequence_length in document:
            builder.add_item(torch.zeros(sequence_length, dtype=torch.int64))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    np.testing.assert_array_equal(corpus_lengths(prefix), [7, 5, 21])


def test_corpus_lengths_says_what_is_missing(tmp_path, small_dataset):
    with pytest.raises(WorkloadError, match="no dataset at .*nothing.*meta.json"):
        corpus_lengths(tmp_path / "nothing")
    shutil.copyfile(f"{small_dataset}-train.idx", tmp_path / "lonely.idx")
    with pytest.raises(WorkloadError, match=r"lonely\.bin' does not exist"):
        corpus_lengths(tmp_path / "lonely")
    shutil.copyfile(f"{small_dataset}-train.idx", tmp_path / "unfinished-train.idx")
    with pytest.raises(DataError, match="unfinished-meta.json"):
        corpus_lengths(tmp_path / "unfinished")

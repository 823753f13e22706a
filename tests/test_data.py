"""Tests for trainer/data.py on small corpora built in tmp directories (real files, real
tokenizer training, real Megatron indexed datasets)."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from trainer.data import (
    DocumentSamples,
    GlobalBatchSampler,
    TokenWindows,
    check_tokenizer_matches,
    load_tokenizer,
    read_dataset_info,
    shard_for_rank,
)
from trainer.errors import DataError
from trainer.prepare import (
    EOD_TOKEN,
    assign_valid_documents,
    iter_documents,
    prepare_dataset,
    stdlib_source_dir,
    train_tokenizer,
)

WORDS = "alpha beta gamma delta epsilon def return class import for while if else".split()


def make_text(rng: random.Random, num_lines: int) -> str:
    lines = []
    for _ in range(num_lines):
        indent = " " * rng.choice([0, 4, 8])
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
        lines.append(indent + words + rng.choice(["", ":", "()", " = 1", " # é ü 漢字 🙂"]))
    return "\n".join(lines) + rng.choice(["", "\n", "\n\n\t"])


def make_corpus(root: Path, num_files: int = 40, num_jsonl: int = 10, seed: int = 0) -> tuple[list, list[str]]:
    """A directory of text files and a jsonl file; returns (sources, documents in order)."""
    rng = random.Random(seed)
    corpus_dir = root / "corpus"
    texts = []
    for i in range(num_files):
        path = corpus_dir / f"sub{i % 3}" / f"file{i:03d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = make_text(rng, rng.randint(1, 30))
        path.write_text(text, encoding="utf-8")
        texts.append((path, text))
    documents = [text for _, text in sorted(texts)]
    jsonl_texts = [make_text(rng, rng.randint(1, 10)) for _ in range(num_jsonl)]
    # The literal EOD text inside a document must survive as text, not become a boundary.
    jsonl_texts[0] = f"before {EOD_TOKEN} after"
    jsonl_path = root / "extra.jsonl"
    jsonl_path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(jsonl_texts)))
    return [corpus_dir, jsonl_path], documents + jsonl_texts


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One small dataset, prepared once for the read-only tests of this module."""
    root = tmp_path_factory.mktemp("prepared")
    sources, documents = make_corpus(root)
    prefix = root / "out" / "small"
    info = prepare_dataset(sources, prefix, vocab_size=400, valid_fraction=0.2, seed=7, show_progress=False)
    return {"sources": sources, "documents": documents, "prefix": str(prefix), "info": info}


def split_documents(prepared, split: str) -> list[str]:
    is_valid = assign_valid_documents(len(prepared["documents"]), 0.2, seed=7)
    wanted = split == "valid"
    return [doc for doc, valid in zip(prepared["documents"], is_valid, strict=True) if valid == wanted]


def copy_dataset(prefix: str, destination: Path) -> str:
    destination.mkdir()
    for path in Path(prefix).parent.glob(Path(prefix).name + "-*"):
        shutil.copy(path, destination / path.name)
    return str(destination / Path(prefix).name)


# --- documents -------------------------------------------------------------------------


def test_directory_documents_are_sorted_filtered_and_skip_site_packages(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "site-packages" / "pkg").mkdir(parents=True)
    (tmp_path / "b" / "z.md").write_text("markdown")
    (tmp_path / "a.py").write_text("python")
    (tmp_path / "c.rst").write_text("rest")
    (tmp_path / "data.bin").write_bytes(b"\x00\x01")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "site-packages" / "pkg" / "mod.py").write_text("installed package")

    assert list(iter_documents([tmp_path])) == ["python", "markdown", "rest", "caf\ufffd"]


def test_jsonl_and_single_text_file_sources(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "first"}\n\n{"text": "second", "meta": 1}\n')
    note = tmp_path / "note.md"
    note.write_text("# whole file\nis one document\n")
    assert list(iter_documents([jsonl, str(note)])) == ["first", "second", "# whole file\nis one document\n"]


def test_stdlib_source_holds_the_standard_library():
    json_package = stdlib_source_dir() / "json"
    documents = list(iter_documents([json_package]))
    expected = [path.read_text(encoding="utf-8") for path in sorted(json_package.glob("*.py"))]
    assert documents == [text for text in expected if text]
    assert (stdlib_source_dir() / "os.py").is_file()


def test_missing_source_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        list(iter_documents([missing]))


@pytest.mark.parametrize(
    "bad_line, reason",
    [("{not json", "not valid JSON"), ('{"content": "no text key"}', '"text"'), ('{"text": 3}', "string")],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad_line, reason):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok too"}\n' + bad_line + "\n")
    with pytest.raises(DataError, match=reason) as error:
        list(iter_documents([path]))
    assert "broken.jsonl" in str(error.value) and "line 3" in str(error.value)


# --- tokenizer -------------------------------------------------------------------------


def test_trained_tokenizer_is_byte_level_with_eod_zero(tmp_path):
    out = tmp_path / "tok" / "tokenizer.json"
    tokenizer = train_tokenizer(["hello world", "hello there"] * 20, vocab_size=300, out_path=out)
    assert tokenizer.token_to_id(EOD_TOKEN) == 0
    assert load_tokenizer(out).to_str() == tokenizer.to_str()
    unseen = "never seen: ж ✓ \x00\t"
    assert tokenizer.decode(tokenizer.encode(unseen).ids) == unseen


def test_load_tokenizer_rejects_missing_and_malformed_files(tmp_path):
    with pytest.raises(DataError, match="absent.json"):
        load_tokenizer(tmp_path / "absent.json")
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="bogus.json"):
        load_tokenizer(bogus)


def test_tokenizer_mismatch_names_both_hashes_and_vocab_sizes(prepared, tmp_path):
    other = tmp_path / "other.json"
    train_tokenizer(prepared["documents"], vocab_size=300, out_path=other)
    info = prepared["info"]
    with pytest.raises(DataError) as error:
        check_tokenizer_matches(info, other)
    message = str(error.value)
    assert info.tokenizer_sha256 in message and str(info.vocab_size) in message
    assert "300" in message and "stalwart data prepare" in message
    check_tokenizer_matches(info, Path(prepared["prefix"] + "-tokenizer.json"))


# --- prepared dataset ------------------------------------------------------------------


def test_prepared_documents_round_trip_and_end_with_eod(prepared):
    prefix, info = prepared["prefix"], prepared["info"]
    tokenizer = load_tokenizer(Path(prefix + "-tokenizer.json"))
    assert info.eod_id == 0
    for split in ("train", "valid"):
        expected = split_documents(prepared, split)
        dataset = IndexedDataset(f"{prefix}-{split}", mmap=True)
        assert len(dataset) == len(expected) == info.documents[split] >= 1
        assert len(dataset.document_indices) == len(expected) + 1
        assert dataset.index.dtype == np.uint16
        assert int(dataset.sequence_lengths.sum()) == info.tokens[split]
        for text, sequence in zip(expected, (dataset[i] for i in range(len(dataset))), strict=True):
            assert sequence[-1] == info.eod_id and info.eod_id not in sequence[:-1]
            assert tokenizer.decode(sequence[:-1].tolist(), skip_special_tokens=False) == text


def test_meta_matches_what_was_written(prepared):
    prefix, info = prepared["prefix"], prepared["info"]
    assert read_dataset_info(prefix) == info
    saved = json.loads(Path(prefix + "-meta.json").read_text())
    assert saved["documents"] == info.documents and saved["vocab_size"] == info.vocab_size
    assert sum(info.documents.values()) == len(prepared["documents"])
    assert not list(Path(prefix).parent.glob("*.partial"))


def test_split_is_deterministic_seeded_and_never_empty():
    first = assign_valid_documents(1000, 0.1, seed=3)
    assert np.array_equal(first, assign_valid_documents(1000, 0.1, seed=3))
    assert not np.array_equal(first, assign_valid_documents(1000, 0.1, seed=4))
    # A document's split depends on its index, not on how many documents follow it.
    assert np.array_equal(first[:500], assign_valid_documents(500, 0.1, seed=3)[:500])
    assert 50 < first.sum() < 150
    for fraction in (0.0, 0.99):
        few = assign_valid_documents(2, fraction, seed=0)
        assert few.sum() == 1
    assert not assign_valid_documents(1, 0.5, seed=0).any()


def test_preparing_again_gives_identical_files_and_copies_the_tokenizer(prepared, tmp_path):
    tokenizer_path = Path(prepared["prefix"] + "-tokenizer.json")
    prefix = tmp_path / "again"
    info = prepare_dataset(
        prepared["sources"],
        prefix,
        tokenizer_path=tokenizer_path,
        valid_fraction=0.2,
        seed=7,
        show_progress=False,
    )
    assert info.tokenizer_sha256 == prepared["info"].tokenizer_sha256
    assert Path(f"{prefix}-tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    for suffix in ("-train.bin", "-train.idx", "-valid.bin", "-valid.idx"):
        assert Path(f"{prefix}{suffix}").read_bytes() == Path(prepared["prefix"] + suffix).read_bytes()


def test_failed_prepare_leaves_no_complete_looking_dataset(prepared, tmp_path):
    prefix = copy_dataset(prepared["prefix"], tmp_path / "data")
    no_eod = tmp_path / "no_eod.json"
    train_tokenizer(["text"] * 10, vocab_size=300, out_path=no_eod)
    no_eod.write_text(no_eod.read_text().replace(EOD_TOKEN, "<|other|>"))
    with pytest.raises(DataError, match="no <|endoftext|> token"):
        prepare_dataset(prepared["sources"], prefix, tokenizer_path=no_eod, show_progress=False)
    assert not Path(prefix + "-meta.json").exists()
    assert not list((tmp_path / "data").glob("*.partial"))
    with pytest.raises(DataError, match="meta.json"):
        read_dataset_info(prefix)


def test_missing_idx_is_named(prepared, tmp_path):
    prefix = copy_dataset(prepared["prefix"], tmp_path / "data")
    Path(prefix + "-valid.idx").unlink()
    with pytest.raises(DataError, match="small-valid.idx"):
        read_dataset_info(prefix)
    with pytest.raises(DataError, match="small-valid.idx"):
        TokenWindows(prefix, "valid", seq_length=8)


# --- windows ---------------------------------------------------------------------------


def test_token_windows_cut_the_concatenated_stream(prepared):
    seq_length = 16
    windows = TokenWindows(prepared["prefix"], "train", seq_length)
    dataset = IndexedDataset(prepared["prefix"] + "-train", mmap=True)
    # A copy: the sequences are views of the memory map, which closes with `dataset`.
    stream = np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64)
    del dataset
    assert len(windows) == (len(stream) - 1) // seq_length > 10
    for i in (0, 1, len(windows) // 2, len(windows) - 1):
        window = windows[i]
        assert window.dtype == np.int64 and window.shape == (seq_length + 1,)
        assert np.array_equal(window, stream[i * seq_length : i * seq_length + seq_length + 1])
    with pytest.raises(IndexError):
        windows[len(windows)]
    assert windows.max_token_id() == stream.max() < prepared["info"].vocab_size


def test_too_short_split_is_refused(prepared):
    num_tokens = prepared["info"].tokens["valid"]
    with pytest.raises(DataError, match=f"has {num_tokens} tokens, fewer than seq_length\\+1"):
        TokenWindows(prepared["prefix"], "valid", seq_length=num_tokens)
    assert len(TokenWindows(prepared["prefix"], "valid", seq_length=num_tokens - 1)) == 1


def test_document_samples_are_whole_documents_or_pieces_that_never_reach_the_next_one(prepared):
    max_seq_length = 24
    samples = DocumentSamples(prepared["prefix"], "train", max_seq_length)
    dataset = IndexedDataset(prepared["prefix"] + "-train", mmap=True)
    documents = [dataset[i].astype(np.int64) for i in range(len(dataset))]
    del dataset
    # Every document with a token to predict, cut into pieces of at most max_seq_length predictions
    # that overlap by the one token that is the label of one piece and the input of the next.
    expected = []
    for doc in documents:
        for start in range(0, len(doc) - 1, max_seq_length):
            expected.append(doc[start : start + max_seq_length + 1])
    assert any(len(doc) - 1 > max_seq_length for doc in documents)  # some documents are cut
    assert len(samples) == len(expected)
    for i, want in enumerate(expected):
        assert np.array_equal(samples[i], want)
        assert samples.predictions[i] == len(want) - 1 <= max_seq_length
    assert int(samples.predictions.sum()) == sum(len(doc) - 1 for doc in documents)
    with pytest.raises(IndexError):
        samples[len(samples)]


def test_a_split_without_a_document_to_predict_is_refused(tmp_path):
    # Our preparation never writes such a split; a dataset from another tool may hold one.
    builder = IndexedDatasetBuilder(str(tmp_path / "lone-train.bin"), dtype=np.uint16)
    for _ in range(3):
        builder.add_item(torch.tensor([0]))  # an end-of-document token alone
        builder.end_document()
    builder.finalize(str(tmp_path / "lone-train.idx"))
    with pytest.raises(DataError, match="has no document of two or more tokens"):
        DocumentSamples(tmp_path / "lone", "train", 16)


# --- sampler ---------------------------------------------------------------------------


def consume(sampler: GlobalBatchSampler, steps: int) -> list[np.ndarray]:
    return [sampler.next_global_batch() for _ in range(steps)]


def test_sampler_is_deterministic_and_each_epoch_is_a_permutation():
    batches = consume(GlobalBatchSampler(num_samples=30, budget=4, seed=1), 30)
    again = consume(GlobalBatchSampler(num_samples=30, budget=4, seed=1), 30)
    other_seed = consume(GlobalBatchSampler(num_samples=30, budget=4, seed=2), 30)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other_seed, strict=True))
    order = np.concatenate(batches)  # 120 samples = 4 epochs, batches straddle epoch ends
    epochs = order.reshape(4, 30)
    assert all(sorted(epoch) == list(range(30)) for epoch in epochs)
    assert not np.array_equal(epochs[0], epochs[1])


def test_sampler_state_round_trip_continues_identically():
    reference = GlobalBatchSampler(num_samples=50, budget=8, seed=5)
    consume(reference, 3)
    state = reference.state_dict()
    assert state == {"consumed_samples": 24, "seed": 5, "num_samples": 50}
    resumed = GlobalBatchSampler(num_samples=50, budget=8, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    from_constructor = GlobalBatchSampler(50, 8, seed=5, consumed_samples=24)
    for expected in consume(reference, 10):
        assert np.array_equal(resumed.next_global_batch(), expected)
        assert np.array_equal(from_constructor.next_global_batch(), expected)


def test_sampler_refuses_state_from_another_seed_or_dataset():
    state = GlobalBatchSampler(50, 8, seed=5).state_dict()
    with pytest.raises(DataError, match="seed"):
        GlobalBatchSampler(50, 8, seed=6).load_state_dict(state)
    with pytest.raises(DataError, match="num_samples"):
        GlobalBatchSampler(51, 8, seed=5).load_state_dict(state)


def test_global_batches_do_not_depend_on_dp_size():
    steps, global_batch_size = 6, 8
    reference = consume(GlobalBatchSampler(37, global_batch_size, seed=9), steps)
    for dp_size in (1, 2, 4):
        # Every rank runs its own sampler, as in a real job, and keeps only its shard.
        samplers = [GlobalBatchSampler(37, global_batch_size, seed=9) for _ in range(dp_size)]
        for expected in reference:
            shards = [shard_for_rank(s.next_global_batch(), rank, dp_size) for rank, s in enumerate(samplers)]
            assert all(len(shard) == global_batch_size // dp_size for shard in shards)
            assert np.array_equal(np.concatenate(shards), expected)


def test_shard_for_rank_refuses_uneven_batches_and_bad_ranks():
    with pytest.raises(ValueError, match="divide"):
        shard_for_rank(np.arange(6), dp_rank=0, dp_size=4)
    with pytest.raises(ValueError, match="dp_rank"):
        shard_for_rank(np.arange(8), dp_rank=4, dp_size=4)


def test_a_global_batch_of_documents_is_the_next_documents_that_fit_the_token_budget():
    costs = np.array([5, 1, 7, 3, 30, 2, 2, 9])
    sampler = GlobalBatchSampler(len(costs), budget=10, seed=3, costs=costs)
    order = GlobalBatchSampler(len(costs), budget=len(costs), seed=3).next_global_batch()
    batches = consume(sampler, 6)
    flat = np.concatenate(batches)
    assert np.array_equal(flat[: len(costs)], order)  # the epoch's order, cut into batches
    taken = 0
    for batch in batches:
        taken += len(batch)
        following = costs[flat[taken]] if taken < len(flat) else None
        if len(batch) > 1 or costs[batch].sum() <= 10:  # a document over the budget is a batch alone
            assert costs[batch].sum() <= 10
            # The batch stops only where the next document would not fit.
            assert following is None or costs[batch].sum() + following > 10
    resumed = GlobalBatchSampler(len(costs), budget=10, seed=3, costs=costs, consumed_samples=len(batches[0]))
    assert all(np.array_equal(a, b) for a, b in zip(consume(resumed, 5), batches[1:], strict=True))


def test_costs_must_be_given_for_every_sample_and_be_positive():
    with pytest.raises(DataError, match="costs must be >= 1 for each of the 3 samples"):
        GlobalBatchSampler(3, budget=10, seed=0, costs=np.array([1, 2]))
    with pytest.raises(DataError, match="costs must be >= 1"):
        GlobalBatchSampler(3, budget=10, seed=0, costs=np.array([1, 0, 2]))

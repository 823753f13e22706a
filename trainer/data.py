"""Turn text corpora into Megatron indexed datasets, and cut them into training samples.

The data path has three stages, each usable on its own:

1. ``prepare_dataset`` reads documents (``iter_documents``), trains or copies a byte-level
   BPE tokenizer and writes ``{prefix}-train`` / ``{prefix}-valid`` indexed datasets
   (``.bin`` + ``.idx``), the tokenizer and a ``{prefix}-meta.json`` describing them.
2. ``TokenWindows`` views one split as a single token stream cut into fixed-length
   windows of ``seq_length + 1`` tokens (inputs plus labels shifted by one).
3. ``GlobalBatchSampler`` decides which windows make up each global batch, and
   ``shard_for_rank`` gives each data-parallel rank its slice of that batch.

The order of samples depends only on (seed, number of samples consumed), never on the
data-parallel size, so a run can be resumed on a different number of GPUs and still
see exactly the same global batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tokenizers
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tqdm import tqdm

from trainer.errors import DataError

EOD_TOKEN = "<|endoftext|>"
SPLITS = ("train", "valid")
DIRECTORY_SUFFIXES = (".py", ".txt", ".md", ".rst")
# Enough documents per encode_batch call to keep every tokenizer thread busy, few
# enough that one chunk of text never holds much memory.
ENCODE_CHUNK_DOCUMENTS = 256
# uint16 halves the .bin size; keep a margin below 65536 as Megatron's tools do.
UINT16_VOCAB_LIMIT = 65500
MAX_TOKEN_SCAN_CHUNK = 1 << 24


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What ``prepare_dataset`` built; stored as ``{prefix}-meta.json``."""

    prefix: str
    """Path prefix of the dataset files."""
    vocab_size: int
    """Vocabulary size of the tokenizer, special tokens included."""
    eod_id: int
    """Token id appended after every document."""
    tokenizer_sha256: str
    """sha256 of the tokenizer.json bytes the dataset was tokenised with."""
    documents: dict
    """Number of documents per split: {"train": n, "valid": n}."""
    tokens: dict
    """Number of tokens (EOD included) per split: {"train": n, "valid": n}."""


# ---------------------------------------------------------------------------------------
# Reading documents


def stdlib_source_dir() -> Path:
    """The running interpreter's standard library: a corpus every machine has."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_documents(sources: Sequence[str | Path]) -> Iterator[str]:
    """Yield the text of every document in ``sources``, in a deterministic order.

    A source is a directory (every *.py, *.txt, *.md, *.rst file below it is one
    document), a ``.jsonl`` file (one document per line, under key "text"), any other
    file (one document), or the string "stdlib". Empty documents are skipped.
    """
    for source in sources:
        path = stdlib_source_dir() if str(source) == "stdlib" else Path(source)
        if not path.exists():
            raise DataError(f"data source {str(path)!r} does not exist")
        if path.is_dir():
            texts = (_read_text(file) for file in _list_directory_files(path))
        elif path.suffix == ".jsonl":
            texts = _read_jsonl(path)
        else:
            texts = iter([_read_text(path)])
        yield from (text for text in texts if text)


def _list_directory_files(directory: Path) -> list[Path]:
    """Text files below ``directory``, sorted, not descending into site-packages."""
    files = []
    for parent, dirnames, filenames in os.walk(directory):
        # Pruned here rather than filtered later: a stdlib's site-packages can be
        # many times larger than the stdlib itself.
        dirnames[:] = [name for name in dirnames if name != "site-packages"]
        files += [Path(parent, name) for name in filenames if name.endswith(DIRECTORY_SUFFIXES)]
    return sorted(files)


def _read_text(path: Path) -> str:
    """The file's text, or "" when it cannot be read; bytes that are not UTF-8 become U+FFFD."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _read_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                yield _parse_jsonl_line(line, path, line_number)


def _parse_jsonl_line(line: str, path: Path, line_number: int) -> str:
    where = f"{path}, line {line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or "text" not in record:
        raise DataError(f'{where}: expected a JSON object with a "text" key')
    if not isinstance(record["text"], str):
        raise DataError(f'{where}: "text" must be a string, got {type(record["text"]).__name__}')
    return record["text"]


# ---------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(
    documents: Iterable[str], vocab_size: int, out_path: Path, *, show_progress: bool = False
) -> tokenizers.Tokenizer:
    """Train a byte-level BPE tokenizer (EOD_TOKEN has id 0) and save it as ``out_path``.

    The vocabulary may come out smaller than ``vocab_size`` on a tiny corpus.
    """
    byte_alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(byte_alphabet) + 1:
        raise DataError(f"vocab_size must exceed {len(byte_alphabet) + 1}, got {vocab_size}")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        # Every byte in the vocabulary, so any text encodes without an unknown token.
        initial_alphabet=byte_alphabet,
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(documents, trainer)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_path))
    return tokenizer


def load_tokenizer(path: Path) -> tokenizers.Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {str(path)!r} does not exist")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises plain Exception on a malformed file
        raise DataError(f"{str(path)!r} is not a tokenizer.json file: {error}") from None


def _eod_id(tokenizer: tokenizers.Tokenizer, path: Path) -> int:
    eod_id = tokenizer.token_to_id(EOD_TOKEN)
    if eod_id is None:
        raise DataError(f"tokenizer {str(path)!r} has no {EOD_TOKEN} token")
    return eod_id


def _sha256_of_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_tokenizer_matches(info: DatasetInfo, tokenizer_path: Path) -> None:
    """Refuse a tokenizer other than the one the dataset's token ids came from."""
    vocab_size = load_tokenizer(tokenizer_path).get_vocab_size()
    sha256 = _sha256_of_file(tokenizer_path)
    differences = []
    if sha256 != info.tokenizer_sha256:
        differences.append(f"sha256 {sha256} vs {info.tokenizer_sha256}")
    if vocab_size != info.vocab_size:
        differences.append(f"vocab size {vocab_size} vs {info.vocab_size}")
    if differences:
        raise DataError(
            f"tokenizer {str(tokenizer_path)!r} does not match dataset {info.prefix!r} "
            f"(tokenizer vs dataset: {'; '.join(differences)}); re-run `stalwart data prepare` "
            "with this tokenizer, or use the tokenizer the dataset was prepared with"
        )


# ---------------------------------------------------------------------------------------
# Preparing a dataset


def assign_valid_documents(num_documents: int, valid_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask: which documents go to the validation split.

    Document i goes to valid when the i-th draw of a generator seeded with ``seed`` is
    below ``valid_fraction``; the draw for document i does not depend on how many
    documents there are. With two or more documents each split gets at least one.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    draws = np.random.default_rng(seed).random(num_documents)
    is_valid = draws < valid_fraction
    if num_documents >= 2 and not is_valid.any():
        is_valid[np.argmin(draws)] = True
    if num_documents >= 2 and is_valid.all():
        is_valid[np.argmax(draws)] = False
    return is_valid


def prepare_dataset(
    sources: Sequence[str | Path],
    output_prefix: str | Path,
    *,
    tokenizer_path: Path | None = None,
    vocab_size: int = 8192,
    valid_fraction: float = 0.01,
    seed: int = 1234,
    show_progress: bool = True,
) -> DatasetInfo:
    """Tokenise ``sources`` into ``{prefix}-train`` and ``{prefix}-valid`` indexed datasets.

    Every file is written under a temporary name and renamed at the end, meta.json last:
    a dataset whose meta.json exists is complete.
    """
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    # From here until the new meta.json is in place the dataset at this prefix is incomplete.
    _meta_path(prefix).unlink(missing_ok=True)
    is_valid = assign_valid_documents(_count_documents(sources, show_progress), valid_fraction, seed)
    try:
        tokenizer = _obtain_tokenizer(sources, is_valid, prefix, tokenizer_path, vocab_size, show_progress)
        info = _write_splits(sources, is_valid, tokenizer, prefix, show_progress)
        for path in _dataset_files(prefix):
            os.replace(_partial(path), path)
        _write_meta(info)
    finally:
        for path in _dataset_files(prefix):
            Path(_partial(path)).unlink(missing_ok=True)
    return info


def _dataset_files(prefix: str) -> list[str]:
    """Every file of a dataset but its meta.json."""
    split_files = [f"{prefix}-{split}{suffix}" for split in SPLITS for suffix in (".bin", ".idx")]
    return [_tokenizer_path(prefix)] + split_files


def _partial(path: str) -> str:
    """Where ``path`` is written before it is complete."""
    return f"{path}.partial"


def _count_documents(sources: Sequence[str | Path], show_progress: bool) -> int:
    """A pass over the sources, so that the split is known before anything is tokenised."""
    documents = tqdm(iter_documents(sources), desc="scanning", unit="doc", disable=not show_progress)
    num_documents = sum(1 for _ in documents)
    if num_documents == 0:
        raise DataError(f"no documents found in {[str(source) for source in sources]}")
    return num_documents


def _obtain_tokenizer(
    sources: Sequence[str | Path],
    is_valid: np.ndarray,
    prefix: str,
    tokenizer_path: Path | None,
    vocab_size: int,
    show_progress: bool,
) -> tokenizers.Tokenizer:
    """Train (on the train split only) or copy the tokenizer to ``{prefix}-tokenizer.json``."""
    partial_path = _partial(_tokenizer_path(prefix))
    if tokenizer_path is None:
        # Not strict: if the sources changed since they were counted, _tokenise says so.
        documents = zip(iter_documents(sources), is_valid, strict=False)
        train_documents = (text for text, valid in documents if not valid)
        tokenizer = train_tokenizer(train_documents, vocab_size, partial_path, show_progress=show_progress)
    else:
        tokenizer = load_tokenizer(tokenizer_path)
        shutil.copyfile(tokenizer_path, partial_path)
        _eod_id(tokenizer, tokenizer_path)
    # A document that happens to contain the text "<|endoftext|>" must not get an EOD
    # token in its middle. This setting is not saved in tokenizer.json.
    tokenizer.encode_special_tokens = True
    return tokenizer


def _write_splits(
    sources: Sequence[str | Path],
    is_valid: np.ndarray,
    tokenizer: tokenizers.Tokenizer,
    prefix: str,
    show_progress: bool,
) -> DatasetInfo:
    """Tokenise every document into its split's builder; one sequence per document."""
    vocab_size = tokenizer.get_vocab_size()
    eod_id = _eod_id(tokenizer, prefix)
    dtype = np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32
    builders = {split: IndexedDatasetBuilder(_partial(f"{prefix}-{split}.bin"), dtype=dtype) for split in SPLITS}
    documents = {split: 0 for split in SPLITS}
    tokens = {split: 0 for split in SPLITS}
    for index, ids in _tokenise(sources, tokenizer, len(is_valid), show_progress):
        split = SPLITS[int(is_valid[index])]
        sequence = np.array(ids + [eod_id], dtype=dtype)
        builders[split].add_item(torch.from_numpy(sequence))
        builders[split].end_document()
        documents[split] += 1
        tokens[split] += len(sequence)
    for split in SPLITS:
        builders[split].finalize(_partial(f"{prefix}-{split}.idx"))
    return DatasetInfo(
        prefix=prefix,
        vocab_size=vocab_size,
        eod_id=eod_id,
        tokenizer_sha256=_sha256_of_file(_partial(_tokenizer_path(prefix))),
        documents=documents,
        tokens=tokens,
    )


def _tokenise(
    sources: Sequence[str | Path], tokenizer: tokenizers.Tokenizer, num_documents: int, show_progress: bool
) -> Iterator[tuple[int, list[int]]]:
    """(document index, token ids) for every document, encoded in parallel chunks."""
    with tqdm(total=num_documents, desc="tokenising", unit="doc", disable=not show_progress) as progress:
        for first_index, texts in _chunks(iter_documents(sources), ENCODE_CHUNK_DOCUMENTS):
            if first_index + len(texts) > num_documents:
                raise DataError("the data sources changed while the dataset was being prepared")
            encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
            yield from enumerate((encoding.ids for encoding in encodings), start=first_index)
            progress.update(len(texts))


def _chunks(texts: Iterator[str], size: int) -> Iterator[tuple[int, list[str]]]:
    """(index of the first text, up to ``size`` texts) pairs."""
    chunk, first_index = [], 0
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield first_index, chunk
            first_index += len(chunk)
            chunk = []
    if chunk:
        yield first_index, chunk


# ---------------------------------------------------------------------------------------
# Dataset metadata


def _meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}-meta.json")


def _tokenizer_path(prefix: str | Path) -> str:
    return f"{prefix}-tokenizer.json"


def _write_meta(info: DatasetInfo) -> None:
    meta_path = _meta_path(info.prefix)
    partial_path = Path(_partial(str(meta_path)))
    partial_path.write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")
    os.replace(partial_path, meta_path)


def read_dataset_info(prefix: str | Path) -> DatasetInfo:
    """The dataset's meta.json, after checking that every file it describes exists.

    ``prefix`` in the result is the one given here: the dataset may have been moved.
    """
    meta_path = _meta_path(prefix)
    if not meta_path.is_file():
        raise DataError(
            f"dataset metadata {str(meta_path)!r} does not exist: the dataset was never "
            "prepared, or its preparation did not finish (run `stalwart data prepare`)"
        )
    for split in SPLITS:
        for suffix in (".bin", ".idx"):
            path = Path(f"{prefix}-{split}{suffix}")
            if not path.is_file():
                raise DataError(f"dataset file {str(path)!r} does not exist")
    try:
        fields = json.loads(meta_path.read_text())
        return dataclasses.replace(DatasetInfo(**fields), prefix=str(prefix))
    except (json.JSONDecodeError, TypeError) as error:
        raise DataError(f"{str(meta_path)!r} is not a valid dataset metadata file: {error}") from None


# ---------------------------------------------------------------------------------------
# Samples and batches


class TokenWindows:
    """Fixed-length training samples cut from one split's token stream.

    Documents are packed back to back (each already ends with EOD), so windows cross
    document boundaries and no token is wasted on padding. Sample i is
    ``tokens[i * seq_length : i * seq_length + seq_length + 1]``: the model reads the
    first ``seq_length`` tokens and predicts the last ``seq_length``.
    """

    def __init__(self, prefix: str | Path, split: str, seq_length: int):
        if seq_length < 1:
            raise DataError(f"seq_length must be positive, got {seq_length}")
        split_prefix = f"{prefix}-{split}"
        for suffix in (".bin", ".idx"):
            if not Path(split_prefix + suffix).is_file():
                raise DataError(f"dataset file {split_prefix + suffix!r} does not exist")
        self._dataset = IndexedDataset(split_prefix, mmap=True)
        self._dtype = self._dataset.index.dtype
        self._itemsize = np.dtype(self._dtype).itemsize
        self.num_tokens = int(self._dataset.sequence_lengths.sum(dtype=np.int64))
        self.seq_length = seq_length
        self._num_windows = (self.num_tokens - 1) // seq_length if self.num_tokens else 0
        if self._num_windows == 0:
            raise DataError(
                f"split {split_prefix!r} has {self.num_tokens} tokens, fewer than "
                f"seq_length+1 = {seq_length + 1}: use more data or a shorter seq_length"
            )

    def __len__(self) -> int:
        return self._num_windows

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self._num_windows:
            raise IndexError(f"window {i} out of range for {self._num_windows} windows")
        return self._read_tokens(int(i) * self.seq_length, self.seq_length + 1).astype(np.int64)

    def max_token_id(self) -> int:
        """Largest token id in the split, read in chunks so memory stays small."""
        chunk_starts = range(0, self.num_tokens, MAX_TOKEN_SCAN_CHUNK)
        return max(
            int(self._read_tokens(start, min(MAX_TOKEN_SCAN_CHUNK, self.num_tokens - start)).max())
            for start in chunk_starts
        )

    def _read_tokens(self, start: int, count: int) -> np.ndarray:
        """A view of ``count`` tokens of the memory-mapped stream (nothing is copied)."""
        return self._dataset.bin_reader.read(dtype=self._dtype, count=count, offset=start * self._itemsize)


class GlobalBatchSampler:
    """Deterministic order of samples; its whole state is the number of samples consumed.

    Global sample g is position ``g % num_samples`` of epoch ``g // num_samples``, each
    epoch a fresh permutation seeded from (seed, epoch). The global batch at a step is
    the next ``global_batch_size`` samples whatever the data-parallel size.
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int, consumed_samples: int = 0):
        if num_samples < 1:
            raise DataError(f"num_samples must be positive, got {num_samples}")
        if global_batch_size < 1:
            raise DataError(f"global_batch_size must be positive, got {global_batch_size}")
        if consumed_samples < 0:
            raise DataError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self._cached_epoch, self._cached_permutation = -1, np.empty(0, dtype=np.int64)

    def next_global_batch(self) -> np.ndarray:
        """Sample indices of the next global batch; advances the state."""
        global_positions = np.arange(
            self.consumed_samples, self.consumed_samples + self.global_batch_size, dtype=np.int64
        )
        epochs, positions = np.divmod(global_positions, self.num_samples)
        batch = np.empty(self.global_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            batch[in_epoch] = self._permutation(int(epoch))[positions[in_epoch]]
        self.consumed_samples += self.global_batch_size
        return batch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cached_epoch, self._cached_permutation = epoch, rng.permutation(self.num_samples)
        return self._cached_permutation

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state``; refuses one from a different seed or dataset size."""
        for key in ("seed", "num_samples"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"sampler state has {key}={state[key]} but this run has {key}="
                    f"{getattr(self, key)}: the sample order would not continue where it stopped"
                )
        self.consumed_samples = int(state["consumed_samples"])


def shard_for_rank(global_batch: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    """Contiguous slice of the global batch that data-parallel rank ``dp_rank`` trains on."""
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    if len(global_batch) % dp_size != 0:
        raise DataError(
            f"global batch of {len(global_batch)} samples does not divide among {dp_size} data-parallel ranks"
        )
    shard_size = len(global_batch) // dp_size
    return global_batch[dp_rank * shard_size : (dp_rank + 1) * shard_size]

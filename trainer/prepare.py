"""Turn text corpora into Megatron indexed datasets: what `stalwart data prepare` runs.

``prepare_dataset`` reads documents (``iter_documents``: files, directories, JSONL), trains or
copies a byte-level BPE tokenizer and writes ``{prefix}-train`` / ``{prefix}-valid`` indexed
datasets (``.bin`` + ``.idx``, one sequence per document, each ending with the end-of-document
token), the tokenizer and a ``{prefix}-meta.json`` describing them. trainer/data.py reads
what this writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tokenizers
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm

from trainer.data import (
    SPLITS,
    DatasetInfo,
    file_sha256,
    load_tokenizer,
    meta_file,
    tokenizer_file,
)
from trainer.errors import DataError

EOD_TOKEN = "<|endoftext|>"
DIRECTORY_SUFFIXES = (".py", ".txt", ".md", ".rst")
# Enough documents per encode_batch call to keep every tokenizer thread busy, few
# enough that one chunk of text never holds much memory.
ENCODE_CHUNK_DOCUMENTS = 256
# uint16 halves the .bin size; keep a margin below 65536 as Megatron's tools do.
UINT16_VOCAB_LIMIT = 65500


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


def _eod_id(tokenizer: tokenizers.Tokenizer, path: Path) -> int:
    eod_id = tokenizer.token_to_id(EOD_TOKEN)
    if eod_id is None:
        raise DataError(f"tokenizer {str(path)!r} has no {EOD_TOKEN} token")
    return eod_id


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
    meta_file(prefix).unlink(missing_ok=True)
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
    return [tokenizer_file(prefix)] + split_files


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
    partial_path = _partial(tokenizer_file(prefix))
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
        tokenizer_sha256=file_sha256(_partial(tokenizer_file(prefix))),
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


def _write_meta(info: DatasetInfo) -> None:
    meta_path = meta_file(info.prefix)
    partial_path = Path(_partial(str(meta_path)))
    partial_path.write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")
    os.replace(partial_path, meta_path)

"""Read prepared datasets (trainer/prepare.py writes them) and cut them into training samples.

1. ``read_dataset_info`` and ``check_tokenizer_matches``: the dataset a run opens, and the
   tokenizer its token ids came from.
2. ``TokenWindows`` views one split as a single token stream cut into fixed-length
   windows of ``seq_length + 1`` tokens (inputs plus labels shifted by one).
3. ``GlobalBatchSampler`` decides which samples make up each global batch, and
   ``shard_for_rank`` gives each data-parallel rank its slice of that batch.

The order of samples depends only on (seed, number of samples consumed), never on the
data-parallel size, so a run can be resumed on a different number of GPUs and still
see exactly the same global batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tokenizers
from megatron.core.datasets.indexed_dataset import IndexedDataset

from parallel.plan import Group
from trainer.errors import DataError
from trainer.packing import PackedMicroBatch, rank_micro_batches

SPLITS = ("train", "valid")
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
# Dataset metadata and tokenizer


def meta_file(prefix: str | Path) -> Path:
    """The metadata that trainer/prepare.py writes last, once every other file is in place."""
    return Path(f"{prefix}-meta.json")


def tokenizer_file(prefix: str | Path) -> str:
    """The tokenizer saved beside a dataset."""
    return f"{prefix}-tokenizer.json"


def read_dataset_info(prefix: str | Path) -> DatasetInfo:
    """The dataset's meta.json, after checking that every file it describes exists.

    ``prefix`` in the result is the one given here: the dataset may have been moved.
    """
    meta_path = meta_file(prefix)
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


def load_tokenizer(path: Path) -> tokenizers.Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {str(path)!r} does not exist")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises plain Exception on a malformed file
        raise DataError(f"{str(path)!r} is not a tokenizer.json file: {error}") from None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_tokenizer_matches(info: DatasetInfo, tokenizer_path: Path) -> None:
    """Refuse a tokenizer other than the one the dataset's token ids came from."""
    vocab_size = load_tokenizer(tokenizer_path).get_vocab_size()
    sha256 = file_sha256(tokenizer_path)
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
# Samples and batches


def open_split(prefix: str | Path, split: str) -> IndexedDataset:
    """One split of a prepared dataset, memory-mapped: one sequence per document."""
    split_prefix = f"{prefix}-{split}"
    for suffix in (".bin", ".idx"):
        if not Path(split_prefix + suffix).is_file():
            raise DataError(f"dataset file {split_prefix + suffix!r} does not exist")
    return IndexedDataset(split_prefix, mmap=True)


class _TokenStream:
    """A split's documents back to back, as one memory-mapped stream of token ids."""

    def __init__(self, prefix: str | Path, split: str):
        self._dataset = open_split(prefix, split)
        self._dtype = self._dataset.index.dtype
        self._itemsize = np.dtype(self._dtype).itemsize
        self.num_tokens = int(self._dataset.sequence_lengths.sum(dtype=np.int64))
        self.name = f"{prefix}-{split}"

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


class TokenWindows(_TokenStream):
    """Fixed-length training samples cut from one split's token stream (`data.packing: concat`).

    Documents are packed back to back (each already ends with EOD), so windows cross
    document boundaries and no token is wasted on padding. Sample i is
    ``tokens[i * seq_length : i * seq_length + seq_length + 1]``: the model reads the
    first ``seq_length`` tokens and predicts the last ``seq_length``.
    """

    def __init__(self, prefix: str | Path, split: str, seq_length: int):
        if seq_length < 1:
            raise DataError(f"seq_length must be positive, got {seq_length}")
        super().__init__(prefix, split)
        self.seq_length = seq_length
        self._num_windows = (self.num_tokens - 1) // seq_length if self.num_tokens else 0
        if self._num_windows == 0:
            raise DataError(
                f"split {self.name!r} has {self.num_tokens} tokens, fewer than "
                f"seq_length+1 = {seq_length + 1}: use more data or a shorter seq_length"
            )

    def __len__(self) -> int:
        return self._num_windows

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self._num_windows:
            raise IndexError(f"window {i} out of range for {self._num_windows} windows")
        return self._read_tokens(int(i) * self.seq_length, self.seq_length + 1).astype(np.int64)

    costs = None
    """Every window costs 1 of a global batch's budget (train.global_batch_size windows)."""

    def tokens_in(self, batch: np.ndarray) -> int:
        return len(batch) * self.seq_length

    def micro_batches(self, batch: np.ndarray, dp_rank: int, dp: int, micro_batch_size: int) -> list[np.ndarray]:
        """This rank's contiguous slice of the global batch, as [micro_batch_size, seq_length + 1] arrays."""
        samples = np.stack([self[int(i)] for i in shard_for_rank(batch, dp_rank, dp)])
        return [samples[i : i + micro_batch_size] for i in range(0, len(samples), micro_batch_size)]


class DocumentSamples(_TokenStream):
    """One split's documents as training samples (`data.packing: documents`).

    Each document is one sample, or, when it has more than `max_seq_length` tokens to
    predict, pieces of that many (the last one shorter). A sample's tokens are its inputs
    and the label after the last one, all from its own document; `predictions[i]` is how
    many tokens sample i trains on. A document with nothing to predict (its end-of-document
    token alone) is no sample.
    """

    def __init__(self, prefix: str | Path, split: str, max_seq_length: int):
        if max_seq_length < 1:
            raise DataError(f"max_seq_length must be positive, got {max_seq_length}")
        super().__init__(prefix, split)
        lengths = self._dataset.sequence_lengths.astype(np.int64)
        first_token = self._dataset.index.sequence_pointers.astype(np.int64) // self._itemsize
        to_predict = lengths - 1
        pieces = -(-to_predict // max_seq_length)  # 0 for a document of one token
        document = np.repeat(np.arange(len(lengths)), pieces)
        piece = np.arange(len(document)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        self.starts = first_token[document] + piece * max_seq_length
        self.predictions = np.minimum(max_seq_length, to_predict[document] - piece * max_seq_length)
        if len(self.predictions) == 0:
            raise DataError(f"split {self.name!r} has no document of two or more tokens")

    def __len__(self) -> int:
        return len(self.predictions)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        return self._read_tokens(int(self.starts[i]), int(self.predictions[i]) + 1).astype(np.int64)

    @property
    def costs(self) -> np.ndarray:
        """A document costs the tokens it trains on, of a global batch's train.global_batch_tokens."""
        return self.predictions

    def tokens_in(self, batch: np.ndarray) -> int:
        return int(self.predictions[batch].sum())

    def micro_batches(
        self, batch: np.ndarray, dp_rank: int, groups: Sequence[Group], multiple: int, tokens_per_rank: int | None
    ) -> list[PackedMicroBatch]:
        """This rank's micro-batches of the global batch under the step's plan (`groups` name
        documents by their position in `batch`); see packing.rank_micro_batches."""
        return rank_micro_batches(groups, dp_rank, lambda i: self[int(batch[i])], multiple, tokens_per_rank)


class GlobalBatchSampler:
    """Deterministic order of samples; its whole state is the number of samples consumed.

    Global sample g is position ``g % num_samples`` of epoch ``g // num_samples``, each
    epoch a fresh permutation seeded from (seed, epoch). The global batch at a step is the
    next samples whose costs add up to at most `budget` (at least one sample), whatever the
    data-parallel size. Without `costs` every sample costs 1: a batch is `budget` samples;
    with documents, a sample costs the tokens it trains on and `budget` is the batch's tokens.
    """

    def __init__(
        self,
        num_samples: int,
        budget: int,
        seed: int,
        consumed_samples: int = 0,
        costs: np.ndarray | None = None,
        shuffle: bool = True,
    ):
        if num_samples < 1:
            raise DataError(f"num_samples must be positive, got {num_samples}")
        if budget < 1:
            raise DataError(f"the global batch's budget must be positive, got {budget}")
        if consumed_samples < 0:
            raise DataError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if costs is not None and (len(costs) != num_samples or costs.min() < 1):
            raise DataError(f"costs must be >= 1 for each of the {num_samples} samples")
        self.num_samples = num_samples
        self.budget = budget
        self.seed = seed
        self.consumed_samples = consumed_samples
        self.costs = costs
        self.shuffle = shuffle
        """False: every epoch in the order 0, 1, 2, ... (a validation split's fixed batches)."""
        self._cached_epoch, self._cached_permutation = -1, np.empty(0, dtype=np.int64)

    def upcoming_global_batch(self) -> np.ndarray:
        """The batch next_global_batch will return, without advancing (the planner plans it a step early)."""
        consumed = self.consumed_samples
        try:
            return self.next_global_batch()
        finally:
            self.consumed_samples = consumed

    def next_global_batch(self) -> np.ndarray:
        """Sample indices of the next global batch; advances the state."""
        # Every sample costs at least 1, so no batch holds more than `budget` samples.
        candidates = self._samples_at(np.arange(self.consumed_samples, self.consumed_samples + self.budget))
        if self.costs is None:
            batch = candidates
        else:
            spent = np.cumsum(self.costs[candidates])
            batch = candidates[: max(1, int(np.searchsorted(spent, self.budget, side="right")))]
        self.consumed_samples += len(batch)
        return batch

    def _samples_at(self, global_positions: np.ndarray) -> np.ndarray:
        epochs, positions = np.divmod(global_positions, self.num_samples)
        samples = np.empty(len(global_positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            samples[in_epoch] = self._permutation(int(epoch))[positions[in_epoch]]
        return samples

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
            self._cached_epoch, self._cached_permutation = epoch, order
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


def batches_in_order(num_samples: int, budget: int, count: int, costs: np.ndarray | None = None) -> list[np.ndarray]:
    """Global batches of samples 0, 1, 2, ... in order (wrapping around), cut by `budget` as
    GlobalBatchSampler cuts them: a validation split's fixed batches. At most `count`, and no
    more than the split fills once (at least one)."""
    total = num_samples if costs is None else int(costs.sum())
    order = GlobalBatchSampler(num_samples, budget, seed=0, costs=costs, shuffle=False)
    return [order.next_global_batch() for _ in range(min(count, max(total // budget, 1)))]

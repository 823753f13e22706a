"""Sequence-length workloads for the sequence-parallel planner benchmark.

A workload is a pool of document lengths in tokens, from one of three sources:

- ``wikipedia_lengths``: a synthetic distribution that reproduces published Wikipedia
  token-length statistics, so a benchmark can run without any corpus on disk;
- ``corpus_lengths``: the documents of a dataset written by ``stalwart data prepare``;
- ``read_lengths_file``: lengths listed in a text or JSON file.

``draw_batches`` turns a pool into global batches with a fixed seed, so two planners
compared on one seed see exactly the same batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import NormalDist

import numpy as np
from scipy.special import ndtri

WIKIPEDIA_PERCENTILES: tuple[tuple[float, int], ...] = ((50.0, 347), (90.0, 2_112), (99.0, 10_919), (99.9, 37_353))
"""Published Wikipedia document token-length percentiles: (percentile, tokens)."""
LONG_DOCUMENT_TOKENS = 8_192
"""Threshold of the published long-document shares below."""
WIKIPEDIA_LONG_DOCUMENT_SHARE = 0.016
"""Published share of documents longer than LONG_DOCUMENT_TOKENS."""
WIKIPEDIA_LONG_TOKEN_SHARE = 0.27
"""Published share of all tokens that lie in documents longer than LONG_DOCUMENT_TOKENS."""
WIKIPEDIA_MIN_TOKENS = 8
"""Shortest synthetic document: a stub article is still a title and a sentence, and
the unbounded log-normal body would otherwise produce 0- and 1-token documents.
About 0.4% of documents sit at this floor."""
WIKIPEDIA_TAIL_EXPONENT = 3.084
"""Pareto exponent of the lengths above the 99.9th percentile.

The percentiles fix everything below p99.9; the exponent is the one free parameter,
chosen so that documents over 8K hold WIKIPEDIA_LONG_TOKEN_SHARE of the tokens. It is
``solve_wikipedia_tail_exponent()`` rounded to 3 decimals: a bisection of
``wikipedia_long_token_share`` (which falls as the exponent rises) over [1.5, 10], each
share computed by quadrature of the quantile function. A test re-derives it. The
share is flat in the exponent here (26% at 10, 28.5% at 2), so the tail is only loosely
pinned down by the published figures.
"""

# Tail probabilities of the knots, largest first: p = 1 - percentile / 100.
_KNOT_TAIL_PROBABILITIES = np.array([1.0 - percentile / 100.0 for percentile, _ in WIKIPEDIA_PERCENTILES])
_KNOT_LOG_TOKENS = np.log([float(tokens) for _, tokens in WIKIPEDIA_PERCENTILES])
# Log-normal spread that puts p90 where it is published, given the median.
_BODY_SIGMA = (_KNOT_LOG_TOKENS[1] - _KNOT_LOG_TOKENS[0]) / NormalDist().inv_cdf(0.9)
# Steps of the quadrature over s = -log(p); stopping at s = 100 leaves out under e^-60 of the mean.
_QUADRATURE_STEPS = 200_000
_QUADRATURE_MAX_S = 100.0


class WorkloadError(ValueError):
    """A workload that cannot be built: a bad name, file, value or argument."""


# ---------------------------------------------------------------------------------------
# Synthetic Wikipedia lengths


def wikipedia_quantile(tail_probability: np.ndarray, tail_exponent: float = WIKIPEDIA_TAIL_EXPONENT) -> np.ndarray:
    """Document length (real-valued tokens) that a fraction ``tail_probability`` of documents exceed.

    Parameterised by the tail probability p = 1 - u rather than the quantile u, so that
    the far tail (p ~ 1e-12) keeps full precision. Three pieces, continuous at the knots:

    - p > 0.5 (below the median): log-normal with the published median, its spread fitted
      to p50 and p90, floored at WIKIPEDIA_MIN_TOKENS;
    - 0.001 <= p <= 0.5: log(length) linear in log(p) between the knots, i.e. a power law
      on each segment. Linear in p instead would put 2.6% of documents over 8K, not the
      published 1.6%; this puts 1.5% there;
    - p < 0.001: a Pareto tail with exponent ``tail_exponent``.
    """
    p = np.asarray(tail_probability, dtype=np.float64)
    median_p, last_knot_p = _KNOT_TAIL_PROBABILITIES[0], _KNOT_TAIL_PROBABILITIES[-1]
    lengths = np.empty_like(p)
    in_body, in_tail = p > median_p, p < last_knot_p
    between_knots = ~in_body & ~in_tail
    lengths[in_body] = _body_quantile(p[in_body])
    lengths[between_knots] = np.exp(
        np.interp(-np.log(p[between_knots]), -np.log(_KNOT_TAIL_PROBABILITIES), _KNOT_LOG_TOKENS)
    )
    lengths[in_tail] = np.exp(_KNOT_LOG_TOKENS[-1]) * (last_knot_p / p[in_tail]) ** (1.0 / tail_exponent)
    return np.maximum(lengths, WIKIPEDIA_MIN_TOKENS)


def _body_quantile(p: np.ndarray) -> np.ndarray:
    # 1 - p is exact for p >= 0.5.
    z = ndtri(1.0 - p)
    return np.exp(_KNOT_LOG_TOKENS[0] + _BODY_SIGMA * z)


def wikipedia_lengths(n: int, rng: np.random.Generator, clip: int | None = None) -> np.ndarray:
    """``n`` document lengths (int64 tokens) drawn from the synthetic Wikipedia distribution.

    ``clip`` cuts documents longer than a model's maximum sequence length to that length;
    None leaves them whole.
    """
    if n < 0:
        raise WorkloadError(f"the number of lengths must be >= 0, got {n}")
    # 1 - [0, 1) is (0, 1]: p = 0 would be an infinitely long document.
    tail_probabilities = 1.0 - rng.random(n)
    lengths = np.rint(wikipedia_quantile(tail_probabilities)).astype(np.int64)
    return clip_lengths(lengths, clip)


def clip_lengths(lengths: np.ndarray, clip: int | None) -> np.ndarray:
    """``lengths`` with every value above ``clip`` cut to ``clip``; None = unchanged."""
    if clip is None:
        return lengths
    if clip < 1:
        raise WorkloadError(f"clip must be a positive number of tokens or None, got {clip}")
    return np.minimum(lengths, clip)


def wikipedia_expected_tokens(longer_than: int = 0, tail_exponent: float = WIKIPEDIA_TAIL_EXPONENT) -> float:
    """Expected tokens per document that lie in documents longer than ``longer_than`` tokens.

    With ``longer_than=0`` this is the mean document length. Midpoint quadrature of the
    quantile function over s = -log(p), where dp = e^-s ds spreads the steps evenly over
    every decade of the tail.
    """
    step = _QUADRATURE_MAX_S / _QUADRATURE_STEPS
    s = (np.arange(_QUADRATURE_STEPS) + 0.5) * step
    lengths = wikipedia_quantile(np.exp(-s), tail_exponent)
    return float(np.sum(np.where(lengths > longer_than, lengths, 0.0) * np.exp(-s)) * step)


def wikipedia_long_token_share(tail_exponent: float = WIKIPEDIA_TAIL_EXPONENT) -> float:
    """Share of all tokens in documents longer than LONG_DOCUMENT_TOKENS (unclipped)."""
    long_tokens = wikipedia_expected_tokens(LONG_DOCUMENT_TOKENS, tail_exponent)
    return long_tokens / wikipedia_expected_tokens(0, tail_exponent)


def solve_wikipedia_tail_exponent(target_share: float = WIKIPEDIA_LONG_TOKEN_SHARE, iterations: int = 30) -> float:
    """The tail exponent whose long-document token share is ``target_share``, by bisection.

    How WIKIPEDIA_TAIL_EXPONENT was derived; 30 halvings of [1.5, 10] leave < 1e-8.
    """
    low, high = 1.5, 10.0
    for _ in range(iterations):
        middle = (low + high) / 2
        # A heavier tail (smaller exponent) puts more tokens in long documents.
        if wikipedia_long_token_share(middle) > target_share:
            low = middle
        else:
            high = middle
    return (low + high) / 2


# ---------------------------------------------------------------------------------------
# Lengths from a prepared corpus or a file


def corpus_lengths(prefix: str | Path) -> np.ndarray:
    """Token lengths (int64, EOD included) of the documents of a prepared dataset's train split.

    ``prefix`` is either a dataset prefix as given to ``stalwart data prepare --output``
    (its ``{prefix}-train`` split is read) or the prefix of one split's ``.bin``/``.idx``.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # slow to import; only corpora need it

    dataset = IndexedDataset(_split_prefix(str(prefix)), mmap=True)
    return _document_lengths(dataset.sequence_lengths, dataset.document_indices)


def _split_prefix(prefix: str) -> str:
    """The split prefix that ``prefix`` names, or a WorkloadError / DataError saying what is missing."""
    if Path(f"{prefix}.idx").is_file() or Path(f"{prefix}.bin").is_file():
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise WorkloadError(f"indexed dataset file {prefix + suffix!r} does not exist")
        return prefix
    if Path(f"{prefix}-meta.json").is_file() or Path(f"{prefix}-train.idx").is_file():
        from trainer.data import read_dataset_info  # imports megatron, which the synthetic workloads never need

        # Says whether the preparation never finished or a split file went missing.
        read_dataset_info(prefix)
        return f"{prefix}-train"
    raise WorkloadError(
        f"no dataset at {prefix!r}: expected {prefix}-meta.json (a dataset from `stalwart data prepare`) "
        f"or {prefix}.idx and {prefix}.bin (one split)"
    )


def _document_lengths(sequence_lengths: np.ndarray, document_indices: np.ndarray) -> np.ndarray:
    """Tokens per document, where document i is sequences document_indices[i]:document_indices[i + 1].

    ``stalwart data prepare`` writes one sequence per document, but other Megatron tools
    split a document into several. Empty documents are dropped: they are no sequence to plan.
    """
    token_offsets = np.concatenate([[0], np.cumsum(sequence_lengths, dtype=np.int64)])
    lengths = np.diff(token_offsets[np.asarray(document_indices, dtype=np.int64)])
    return lengths[lengths > 0]


def read_lengths_file(path: str | Path) -> np.ndarray:
    """Positive token lengths (int64) from a JSON list of integers or a text file of one per line.

    In a text file blank lines are skipped and ``#`` starts a comment. A bad value is an
    error naming the file and its line (text) or index (JSON), never silently skipped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise WorkloadError(f"cannot read lengths file {str(path)!r}: {error}") from None
    lengths = _parse_json_lengths(text, path) if text.lstrip().startswith("[") else _parse_text_lengths(text, path)
    if not lengths:
        raise WorkloadError(f"lengths file {str(path)!r} holds no lengths")
    return np.array(lengths, dtype=np.int64)


def _parse_text_lengths(text: str, path: Path) -> list[int]:
    lengths = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        value = line.split("#", 1)[0].strip()
        if value:
            lengths.append(_checked_length(value, f"{path}, line {line_number}"))
    return lengths


def _parse_json_lengths(text: str, path: Path) -> list[int]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise WorkloadError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(values, list):
        raise WorkloadError(f"{path}: expected a JSON list of integers, got {type(values).__name__}")
    return [_checked_length(value, f"{path}, index {index}") for index, value in enumerate(values)]


def _checked_length(value: object, where: str) -> int:
    """``value`` (a line's text or a JSON value) as a positive int, or an error naming ``where``."""
    length = _as_integer(value)
    if length is None:
        raise WorkloadError(f"{where}: length {value!r} is not an integer")
    if length < 1:
        raise WorkloadError(f"{where}: length {length} is not positive; a sequence has at least one token")
    return length


def _as_integer(value: object) -> int | None:
    # bool is an int subclass, and int(2.5) would truncate without a word: both are refused.
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ---------------------------------------------------------------------------------------
# Batches and named workloads


def draw_batches(lengths: np.ndarray, batches: int, sequences_per_batch: int, seed: int) -> list[np.ndarray]:
    """``batches`` global batches of ``sequences_per_batch`` lengths drawn with replacement from ``lengths``.

    The same (lengths, seed) always gives the same batches.
    """
    pool = np.asarray(lengths, dtype=np.int64)
    if pool.ndim != 1 or pool.size == 0:
        raise WorkloadError(f"lengths must be a non-empty 1-D array, got shape {pool.shape}")
    _check_batch_shape(batches, sequences_per_batch)
    picks = np.random.default_rng(seed).integers(0, pool.size, size=(batches, sequences_per_batch))
    return list(pool[picks])


def wikipedia_batches(batches: int, sequences_per_batch: int, clip: int | None, seed: int) -> list[np.ndarray]:
    """``batches`` global batches of synthetic Wikipedia lengths, each drawn fresh from the distribution."""
    _check_batch_shape(batches, sequences_per_batch)
    lengths = wikipedia_lengths(batches * sequences_per_batch, np.random.default_rng(seed), clip)
    return list(lengths.reshape(batches, sequences_per_batch))


def _check_batch_shape(batches: int, sequences_per_batch: int) -> None:
    if batches < 1:
        raise WorkloadError(f"batches must be positive, got {batches}")
    if sequences_per_batch < 1:
        raise WorkloadError(f"sequences_per_batch must be positive, got {sequences_per_batch}")


WORKLOAD_NAMES = ("wikipedia",)


def workload_lengths(name: str, clip: int | None, n: int, seed: int) -> np.ndarray:
    """``n`` lengths of the named synthetic workload (one of WORKLOAD_NAMES), drawn with ``seed``.

    A corpus or a file of lengths is not a name: use corpus_lengths or read_lengths_file.
    """
    if name == "wikipedia":
        return wikipedia_lengths(n, np.random.default_rng(seed), clip)
    raise WorkloadError(f"unknown workload {name!r}; known workloads: {', '.join(WORKLOAD_NAMES)}")

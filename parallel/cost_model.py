"""How long one sequence takes on a sequence-parallel group, and whether it fits.

Ulysses-style sequence parallelism over a group of d ranks: every rank holds s/d tokens for
the linear layers, and two all-to-alls per attention switch to holding all s tokens for h/d
heads. So the compute of a sequence divides by d, while the all-to-all volume per rank is
s (d - 1) / d^2 token-rows, over NVLink inside a node and over the network across nodes:

    time(s, d) = (attention * s^2 + linear * s) / d + a2a_latency(x) + a2a_per_token(x) * s (d - 1) / d^2

with x = intra or inter (whether the group spans nodes) and no all-to-all when d = 1. A group
runs its sequences packed into one micro-batch, which costs `microbatch_overhead` once, and
holds at most `tokens_per_rank` tokens per rank. The coefficients live in a profile file
(YAML): `stalwart plan-profile` fits them on the machine at hand, and parallel/profiles/ has
profiles built from published figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

PROFILE_DIR = Path(__file__).parent / "profiles"


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class CostModel:
    attention: float
    """Seconds per token^2 of causal attention, forward and backward, summed over layers."""
    linear: float
    """Seconds per token of everything else (projections, MLP, norms), forward and backward."""
    a2a_latency_intra: float
    """Fixed seconds of one step's all-to-alls inside a node."""
    a2a_per_token_intra: float
    """Seconds per token-row of all-to-all per rank inside a node (volume s (d - 1) / d^2)."""
    a2a_latency_inter: float
    """The same fixed cost when the group spans nodes."""
    a2a_per_token_inter: float
    """The same per-token cost when the group spans nodes."""
    microbatch_overhead: float
    """Seconds a group pays once per micro-batch (launches, loss, synchronisation)."""
    tokens_per_rank: int
    """Tokens one rank can hold in a micro-batch (activation memory)."""
    name: str = "unnamed"
    notes: dict = field(default_factory=dict, compare=False)
    """Where the figures come from: model, hardware, sources; free-form, kept for the reader."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "int") and not (isinstance(value, int | float) and value >= 0):
                raise ProfileError(f"profile {self.name!r}: {f.name} must be a number >= 0, got {value!r}")
        if self.tokens_per_rank < 1:
            raise ProfileError(f"profile {self.name!r}: tokens_per_rank must be >= 1, got {self.tokens_per_rank}")

    def compute(self, s: float, d: int) -> float:
        return (self.attention * s * s + self.linear * s) / d

    def comm(self, s: float, d: int, cross_node: bool) -> float:
        if d == 1:
            return 0.0
        if cross_node:
            return self.a2a_latency_inter + self.a2a_per_token_inter * s * (d - 1) / (d * d)
        return self.a2a_latency_intra + self.a2a_per_token_intra * s * (d - 1) / (d * d)

    def time(self, s: float, d: int, cross_node: bool = False) -> float:
        """Seconds for one sequence of s tokens on a group of d ranks, without the micro-batch overhead."""
        return self.compute(s, d) + self.comm(s, d, cross_node)

    def group_time(self, lengths, d: int, cross_node: bool = False) -> float:
        """One micro-batch of packed sequences on a group: the sum of their times plus the overhead once."""
        if not len(lengths):
            return 0.0
        return sum(self.time(s, d, cross_node) for s in lengths) + self.microbatch_overhead

    def fits(self, tokens: int, d: int) -> bool:
        return tokens <= d * self.tokens_per_rank

    def with_capacity(self, tokens_per_rank: int) -> CostModel:
        return CostModel(**{**self.to_dict(), "tokens_per_rank": tokens_per_rank})

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_profile(name_or_path: str | Path) -> CostModel:
    """A profile by file path, or by the name of one shipped in parallel/profiles/ (e.g. h100-gpt7b)."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = PROFILE_DIR / f"{name_or_path}.yaml"
        if not shipped.is_file():
            known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
            raise ProfileError(f"profile {str(name_or_path)!r} is neither a file nor a shipped profile ({known})")
        path = shipped
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a mapping of coefficients, got {type(raw).__name__}")
    known = {f.name for f in fields(CostModel)}
    unknown = sorted(set(raw) - known)
    missing = sorted(f.name for f in fields(CostModel) if f.name not in raw and f.name not in ("name", "notes"))
    if unknown:
        raise ProfileError(f"{path}: unknown key(s) {', '.join(unknown)}")
    if missing:
        raise ProfileError(f"{path}: missing key(s) {', '.join(missing)}")
    raw.setdefault("name", path.stem)
    return CostModel(**raw)

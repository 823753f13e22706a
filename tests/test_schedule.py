"""Learning-rate schedules are pure functions of the step."""

import math

import pytest

from trainer.config import OptimConfig
from trainer.schedule import learning_rate


def lrs(schedule: str, steps: int = 100, **kw) -> list[float]:
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule=schedule, **kw)
    return [learning_rate(s, steps, optim) for s in range(steps)]


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_linear_warmup_reaches_peak(schedule):
    values = lrs(schedule)
    assert values[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])


def test_cosine_decays_monotonically_to_min_lr():
    values = lrs("cosine")
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert values[-1] == pytest.approx(0.1)
    midpoint = 10 + (100 - 1 - 10) / 2
    assert learning_rate(int(midpoint), 100, OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi * (int(midpoint) - 10) / 89))
    )


def test_wsd_holds_then_decays_over_the_final_fraction():
    values = lrs("wsd", decay_fraction=0.2)
    assert values[10:80] == pytest.approx([1.0] * 70)
    assert all(a > b for a, b in zip(values[80:], values[81:], strict=False))
    assert values[-1] == pytest.approx(0.1)


def test_constant_stays_at_peak():
    assert lrs("constant")[10:] == pytest.approx([1.0] * 90)

"""Layout equivalence: the same seed, data and global batch give the same losses (to LOSS_RTOL) on every layout."""

import pytest

from tests.conftest import torchrun, write_tiny_config
from trainer.metrics import read_metrics

LOSS_RTOL = 1e-6
"""How far a layout's loss may lie from the single rank's, relative. Measured on this CPU: at most 2e-8
(reduction order in fp32; the losses are fp32 per micro-batch), so this is 50x headroom, not slack for drift."""

# name -> (world size, overrides); every layout trains the same 5 steps of the tiny model.
LAYOUTS = {
    "tp1pp1dp1": (1, ""),
    "tp2": (2, "parallel.tp=2"),
    "pp2": (2, "parallel.pp=2"),
    "dp2": (2, ""),
    "tp2_sp": (2, "parallel.tp=2,parallel.sp=true"),
    "pp2_vpp2": (2, "parallel.pp=2,parallel.vpp=2"),
    "dp2_distopt": (2, "parallel.distributed_optimizer=true"),
    "tp2pp2": (4, "parallel.tp=2,parallel.pp=2"),
}


@pytest.fixture(scope="module")
def layout_losses(tmp_path_factory, small_dataset):
    root = tmp_path_factory.mktemp("layouts")
    config_path = write_tiny_config(root / "tiny.yaml", root, small_dataset)
    for world in sorted({world for world, _ in LAYOUTS.values()}):
        args = [f"{name}={sets}" for name, (w, sets) in LAYOUTS.items() if w == world]
        result = torchrun(world, ["tests/layout_worker.py", str(config_path), *args], timeout=400)
        assert result.returncode == 0, result.stderr[-4000:]
    return {name: read_metrics(root / name / "metrics.jsonl") for name in LAYOUTS}


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "tp1pp1dp1"])
def test_layout_matches_single_rank(layout_losses, layout):
    reference = [r["loss"] for r in layout_losses["tp1pp1dp1"]]
    losses = [r["loss"] for r in layout_losses[layout]]
    assert len(losses) == len(reference) == 5
    for step, (got, want) in enumerate(zip(losses, reference, strict=True), start=1):
        assert abs(got - want) <= LOSS_RTOL * abs(want), f"{layout} step {step}: loss {got} vs {want}"


def test_training_moves_the_loss(layout_losses):
    """Guards the comparison above against a run that never updates (equal but meaningless losses)."""
    losses = [r["loss"] for r in layout_losses["tp1pp1dp1"]]
    assert losses[-1] < losses[0] - 0.05
    assert all(r["grad_norm"] > 0 and not r["skipped"] for r in layout_losses["tp1pp1dp1"])

"""The README's demo: a real pre-training run on the stdlib corpus, on this machine's CPU."""

import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, plan_group_sizes, rank_env, run_command
from trainer.metrics import read_metrics

# Guards against a hang, not speed checks: the first test also pays for the demo run.
pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, report):
    """`stalwart run configs/demo.yaml` from a fresh directory: prepares the dataset, then trains."""
    workdir = tmp_path_factory.mktemp("demo")
    shutil.copytree(REPO / "configs", workdir / "configs")
    # The console script sits beside the interpreter that installed the project.
    stalwart = shutil.which("stalwart", path=str(Path(sys.executable).parent)) or shutil.which("stalwart")
    assert stalwart, "the `stalwart` console script is not installed; run README's install command"
    start = time.monotonic()
    result = run_command([stalwart, "run", "configs/demo.yaml"], timeout=1200, env=rank_env(2), cwd=workdir)
    elapsed = time.monotonic() - start
    report(f"the demo (`stalwart run configs/demo.yaml`, data preparation included) took {elapsed:.0f} s")
    assert result.returncode == 0, result.stderr[-4000:]
    config = yaml.safe_load((workdir / "configs" / "demo.yaml").read_text())
    return workdir / config["run"]["dir"], config


def test_demo_leaves_metrics_and_a_loss_plot(demo_run):
    run_dir, config = demo_run
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, config["train"]["steps"] + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert all(key in r for r in records), key
    assert sum("val_loss" in r for r in records) == config["train"]["steps"] // config["train"]["eval_interval"]
    png = (run_dir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    json.dumps(records)  # every value is plain JSON


def test_loss_decreases_over_the_first_100_steps(demo_run):
    run_dir, _ = demo_run
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")][:100]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 1.5, f"mean loss of steps 1-10 {first:.3f}, of steps 91-100 {last:.3f}"


def test_validation_loss_decreases(demo_run):
    run_dir, _ = demo_run
    val = [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]
    assert val[-1] < val[0] - 0.5, val


def test_demo_checkpoints_and_stalwart_run_resumes_from_them(demo_run):
    run_dir, config = demo_run
    ckpt_dir = run_dir / "checkpoints"
    assert (ckpt_dir / "latest").read_text().strip() == "step_000000300"
    assert sorted(p.name for p in ckpt_dir.glob("step_*")) == ["step_000000200", "step_000000300"]  # keep: 2
    workdir = run_dir.parent.parent
    stalwart = shutil.which("stalwart", path=str(Path(sys.executable).parent)) or shutil.which("stalwart")
    result = run_command(
        [stalwart, "run", "configs/demo.yaml", "--set", "train.steps=310"], timeout=300, env=rank_env(2), cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(
        r"restored step 300 from disk \(runs/demo/checkpoints/step_000000300, "
        r"saved at tp1 pp1 dp2 \+distopt\) in [0-9.]+ s",
        result.stdout,
    ), result.stdout[-2000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 311))


def test_the_long_context_demo_learns_checkpoints_and_resumes_on_one_rank_without_the_planner(demo_run, report):
    """configs/long-context.yaml (documents of up to 8K tokens on 2 ranks of 4K, the planner on),
    shortened; then its checkpoint resumed on one rank holding 8K, the planner off."""
    workdir = demo_run[0].parent.parent  # the demo prepared data/stdlib there
    stalwart = shutil.which("stalwart", path=str(Path(sys.executable).parent)) or shutil.which("stalwart")
    short = ["train.steps=8", "train.eval_interval=0", "checkpoint.interval=8"]
    start = time.monotonic()
    command = [stalwart, "run", "configs/long-context.yaml", *(f"--set={s}" for s in short)]
    result = run_command(command, timeout=1200, env=rank_env(2), cwd=workdir)
    report(f"the long-context demo, 8 steps of 16K tokens on 2 ranks, took {time.monotonic() - start:.0f} s")
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = workdir / "runs" / "long-context"
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.3, f"mean loss of steps 1-2 {first:.3f}, of steps 7-8 {last:.3f}"
    # 8K-token documents run on a group of both ranks.
    assert any(2 in plan_group_sizes(r["plan_groups"]) for r in records), [r["plan_groups"] for r in records]

    alone = ["planner.enabled=false", "parallel.dp=1", "train.micro_batch_size=2", "train.steps=9"]
    command = [stalwart, "run", "configs/long-context.yaml", *(f"--set={s}" for s in short[1:] + alone)]
    result = run_command(command, timeout=900, env=rank_env(1), cwd=workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "restored step 8 from disk" in result.stdout, result.stdout[-2000:]
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps[-1:] == [9]

"""Sequence-parallel groups of every size give the step a single process gives: the planner's
plans change where documents run, never what the model learns."""

import json
import shutil
import sys
from functools import partial

import pytest
import torch
import yaml

from launcher.cli import main
from parallel.cost_model import load_profile
from parallel.plan import Group
from tests.conftest import REPO, plan_group_sizes, rank_env, run_command, torchrun, write_tiny_config
from tests.sequence_worker import LENGTHS, VOCAB, capture_grads, documents, exactness_config, named, plans_for
from tests.test_documents import documents_run
from trainer.metrics import plan_error, planned_steps, read_metrics
from trainer.packing import rank_micro_batches
from trainer.step import TrainStep


@pytest.fixture
def reference(tmp_path, single_rank):
    """One process, each document alone in its own micro-batch: the loss, every gradient and
    every parameter after one optimizer step."""
    step = TrainStep(exactness_config(), single_rank, VOCAB)
    docs = documents()
    alone = (Group(0, 1, tuple((i,) for i in range(len(LENGTHS)))),)
    batches = rank_micro_batches(alone, 0, lambda i: docs[i], multiple=1)
    assert [len(b.tokens) for b in batches] == list(LENGTHS)  # no padding: each document truly alone
    grads: dict = {}
    result = step.train(batches, before_update=partial(capture_grads, step, grads))
    params = named(step, lambda p: p)
    path = tmp_path / "reference.pt"
    # One rank holds every tensor whole.
    whole = lambda found: {name: value for name, (value, _) in found.items()}  # noqa: E731
    torch.save({"loss": result.loss, "grads": whole(grads), "params": whole(params)}, path)
    return path


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 2)], ids=["dp4", "tp2xdp2", "pp2xdp2"])
@pytest.mark.timeout(600)
def test_every_plan_gives_the_loss_gradients_and_update_of_each_document_alone(tmp_path, reference, report, tp, pp):
    out = tmp_path / "errors.json"
    result = torchrun(4, ["tests/sequence_worker.py", str(reference), str(out), str(tp), str(pp)], timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]
    errors = json.loads(out.read_text())
    assert sorted(errors) == sorted(plans_for(4 // (tp * pp), pp))
    for plan, found in errors.items():
        report(f"tp{tp} pp{pp} plan [{plan}]: " + ", ".join(f"{what} {e:.1e}" for what, e in found.items()))
        for what, error in found.items():
            assert error <= 1e-5, f"plan [{plan}]: {what} differs from each document alone by {error:.2e} (relative)"


DOCUMENTS_ON_GROUPS = ("data.packing=documents", "planner.enabled=true", "train.max_seq_length=256")
PLANNED = ("planner.enabled=true", "planner.profile=cpu-2core", "train.max_seq_length=256")
"""Documents of up to 256 tokens on ranks that hold 128 each: the longer ones need a group of 2.
The time limit is far above what these small plans need, so the solver always finishes and a
plan is a pure function of the batch (a plan cut short by the limit need not be)."""
SOLVER_FINISHES = "planner.time_limit_s=30"


@pytest.mark.timeout(900)
def test_planned_runs_learn_what_one_rank_learns_and_resume_bit_exactly(tmp_path, small_dataset, capsys):
    one_rank = documents_run(tmp_path, small_dataset, "one", 1, "train.max_seq_length=256", "train.micro_batch_size=4")
    planned = documents_run(tmp_path, small_dataset, "planned", 2, *PLANNED, SOLVER_FINISHES)
    assert planned.keys() == one_rank.keys()
    for step, loss in one_rank.items():
        assert planned[step] == pytest.approx(loss, rel=1e-5), step
    records = read_metrics(tmp_path / "planned" / "metrics.jsonl")
    assert all(r["plan_estimate_s"] > 0 for r in records if "loss" in r and "step_time_s" in r)
    assert any(2 in plan_group_sizes(r["plan_groups"]) for r in records if "plan_groups" in r)
    assert (tmp_path / "planned" / "plan.png").stat().st_size > 0
    # `stalwart plan --run`: each planned step's estimate against its measured time.
    assert main(["plan", "--run", str(tmp_path / "planned"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["estimated_s"], r["measured_s"]) for r in shown] == planned_steps(records)
    assert [r["step"] for r in shown] == sorted(planned)[1:]  # all but the first, which warms up

    every_second = ("checkpoint.interval=2", "checkpoint.keep=10")
    documents_run(tmp_path, small_dataset, "resumed", 2, *PLANNED, SOLVER_FINISHES, *every_second, "train.steps=2")
    (tmp_path / "narrower").mkdir()
    shutil.copytree(tmp_path / "resumed" / "checkpoints", tmp_path / "narrower" / "checkpoints")
    resumed = documents_run(tmp_path, small_dataset, "resumed", 2, *PLANNED, SOLVER_FINISHES, *every_second, restores=2)
    assert [resumed[s] for s in (3, 4)] == [planned[s] for s in (3, 4)]  # to the last bit
    # On one rank (no group of 2 to hold a 256-token document: bigger micro-batches) the same batches follow.
    narrower = documents_run(
        tmp_path, small_dataset, "narrower", 1, "train.max_seq_length=256", "train.micro_batch_size=4", *every_second
    )
    for step in (3, 4):
        assert narrower[step] == pytest.approx(one_rank[step], rel=1e-5), step


def test_the_planners_error_is_measured_on_every_planned_step_but_each_attempts_first():
    records = [
        {"step": 1, "plan_estimate_s": 1.0, "step_time_s": 3.0},  # warming up
        {"step": 2, "plan_estimate_s": 1.0, "step_time_s": 2.0},
        {"step": 2, "val_loss": 5.0},
        {"step": 3, "plan_estimate_s": 1.5, "step_time_s": 1.0},
        {"step": 3, "plan_estimate_s": 1.0, "step_time_s": 9.0},  # restarted at step 3
        {"step": 4, "plan_estimate_s": 1.0, "step_time_s": 1.0},
    ]
    assert planned_steps(records) == [(2, 1.0, 2.0), (3, 1.5, 1.0), (4, 1.0, 1.0)]
    assert plan_error(records) == pytest.approx((-0.5 + 0.5 + 0.0) / 3)
    assert plan_error([{"step": 1, "loss": 3.0, "step_time_s": 1.0}]) is None


@pytest.mark.timeout(600)
def test_a_profile_is_fitted_from_the_trainers_own_steps(tmp_path, small_dataset):
    """`stalwart plan-profile --config`: the cost model timed on the config's own model and attention."""
    config = write_tiny_config(tmp_path / "tiny.yaml", tmp_path / "run", small_dataset, *DOCUMENTS_ON_GROUPS)
    out = tmp_path / "mine.yaml"
    command = [sys.executable, "-m", "launcher.cli", "plan-profile", "--config", str(config), "--out", str(out)]
    result = run_command([*command, "--quick"], 500, env=rank_env(2), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_profile(out)
    assert model.tokens_per_rank == 128  # train.seq_length x train.micro_batch_size
    fitted = yaml.safe_load(out.read_text())["notes"]["fitted_on"]
    assert {p["d"] for p in fitted} == {1, 2} and all(p["measured_ms"] > 0 for p in fitted)
    assert all(model.group_time([p["s"]], p["d"]) > 0 for p in fitted)

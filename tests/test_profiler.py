"""The profiler: a pure fit, a real measurement on gloo ranks, and the Ulysses all-to-all checked against one rank."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
import torch.distributed as dist
import yaml

from launcher.cli import build_parser
from parallel.cost_model import CostModel, load_profile
from parallel.profiler import (
    FIT_POINTS,
    HELD_OUT_POINTS,
    FitError,
    Measurement,
    ProfilerError,
    ProfileShape,
    UlyssesStack,
    check_points,
    fit,
    format_held_out_table,
    held_out_errors,
    predict_seconds,
    profile_machine,
    profile_notes,
    repeats_for,
    run_on_ranks,
)
from parallel.ulysses import heads_to_tokens, tokens_to_heads

KNOWN = CostModel(
    attention=3.5e-8,
    linear=1.3e-4,
    a2a_latency_intra=1.5e-2,
    a2a_per_token_intra=2.7e-5,
    a2a_latency_inter=1.5e-2,
    a2a_per_token_inter=2.7e-5,
    microbatch_overhead=2.7e-3,
    tokens_per_rank=4096,
    name="known",
)
FITTED_KEYS = ("attention", "linear", "a2a_latency_intra", "a2a_per_token_intra", "microbatch_overhead")
SMALL_SHAPE = ProfileShape(hidden=64, heads=4, ffn=128, layers=1)


def synthesise(model: CostModel, points) -> list[Measurement]:
    return [Measurement(s, d, predict_seconds(model, s, d)) for s, d in points]


# --- fit: pure -------------------------------------------------------------------------------


def test_fit_recovers_the_coefficients_that_made_the_times():
    points = [*FIT_POINTS, (1024, 4), (4096, 4)]
    model = fit(synthesise(KNOWN, points), tokens_per_rank=4096, name="recovered")
    for key in FITTED_KEYS:
        assert getattr(model, key) == pytest.approx(getattr(KNOWN, key), rel=1e-6), key
    # One machine: the cross-node all-to-all is the same figure as the one inside the node.
    assert model.a2a_latency_inter == model.a2a_latency_intra
    assert model.a2a_per_token_inter == model.a2a_per_token_intra
    assert (model.name, model.tokens_per_rank) == ("recovered", 4096)


def test_held_out_errors_are_zero_for_the_model_that_made_the_times():
    errors = held_out_errors(KNOWN, synthesise(KNOWN, HELD_OUT_POINTS))
    assert [(e.s, e.d) for e in errors] == list(HELD_OUT_POINTS)
    assert all(abs(e.rel_error) < 1e-12 and e.measured == e.predicted for e in errors)
    high = held_out_errors(KNOWN, [Measurement(1024, 2, predict_seconds(KNOWN, 1024, 2) / 1.25)])
    assert high[0].rel_error == pytest.approx(0.25)


def test_fit_rejects_too_few_points():
    with pytest.raises(FitError, match="at least 5 measurements"):
        fit(synthesise(KNOWN, FIT_POINTS[:4]), tokens_per_rank=1024)


@pytest.mark.parametrize("seconds", [0.0, -0.1, math.nan, math.inf])
def test_fit_rejects_times_that_are_not_positive(seconds):
    measurements = synthesise(KNOWN, FIT_POINTS)
    measurements[3] = measurements[3]._replace(seconds=seconds)
    with pytest.raises(FitError, match=r"\(s=1024, d=1\): time must be a positive number"):
        fit(measurements, tokens_per_rank=1024)


def test_fit_rejects_points_that_cannot_separate_the_coefficients():
    with pytest.raises(FitError, match="d > 1"):
        fit(synthesise(KNOWN, [(s, 1) for s in (8, 256, 512, 1024, 2048)]), tokens_per_rank=1024)
    one_length_split = [(8, 1), (256, 1), (512, 1), (1024, 1), (1024, 2), (1024, 2)]
    with pytest.raises(FitError, match="determine only 4 of the 5"):
        fit(synthesise(KNOWN, one_length_split), tokens_per_rank=1024)


def test_points_are_checked_against_shape_and_cores():
    with pytest.raises(ValueError, match="multiple of d"):
        check_points(SMALL_SHAPE, [(255, 2)])
    with pytest.raises(ValueError, match="must divide heads"):
        check_points(ProfileShape(hidden=96, heads=3), [(256, 2)])
    with pytest.raises(ValueError, match="cores"):
        check_points(ProfileShape(hidden=1024, heads=1024), [(1024, 1024)])
    with pytest.raises(ValueError, match="both fitted and held out"):
        profile_machine(SMALL_SHAPE, FIT_POINTS, [FIT_POINTS[1]])


def test_short_steps_repeat_until_they_add_up():
    assert repeats_for(2.0, 5) == 5
    assert repeats_for(0.01, 3) == 30
    assert repeats_for(1e-6, 3) == 50


def test_profile_arguments():
    parser = build_parser()
    args = parser.parse_args(["plan-profile", "--out", "p.yaml", "--quick", "--tokens-per-rank", "8192"])
    assert (args.out, args.quick, args.tokens_per_rank, args.description) == ("p.yaml", True, 8192, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["plan-profile"])


# --- real ranks ------------------------------------------------------------------------------


@pytest.mark.timeout(600)  # a guard against a hang: the points' work takes seconds, launches more when loaded
def test_quick_profile_on_real_ranks_saves_a_profile_that_loads(tmp_path):
    fit_points = [(8, 1), (256, 1), (1024, 1), (2048, 1), (256, 2), (1024, 2), (2048, 2)]
    held_out = [(768, 1), (768, 2)]
    model, measured, errors = profile_machine(SMALL_SHAPE, fit_points, held_out, repeats=2, timeout_s=60)
    assert sorted((m.s, m.d) for m in measured) == sorted(fit_points)
    assert all(m.seconds > 0 and 0 < m.cpu_share < 1.5 for m in measured) and all(e.measured > 0 for e in errors)
    by_point = {(m.s, m.d): m.seconds for m in measured}
    assert by_point[(2048, 1)] > by_point[(256, 1)] and by_point[(2048, 2)] > by_point[(256, 2)]
    assert model.tokens_per_rank == 2048

    path = tmp_path / "measured.yaml"
    notes = profile_notes(SMALL_SHAPE, measured, errors, load_before=0.0, description="test machine")
    dataclasses.replace(model, name="measured", notes=notes).save(path)
    loaded = load_profile(path)
    assert loaded == dataclasses.replace(model, name="measured")
    assert loaded.notes["shape"] == {"hidden": 64, "heads": 4, "ffn": 128, "layers": 1}
    written = yaml.safe_load(path.read_text())["notes"]
    assert [p["s"] for p in written["held_out"]["points"]] == [768, 768] and len(written["fitted_on"]) == 7
    assert all(loaded.group_time([s], d) > 0 for s in (8, 512, 4096, 16384) for d in (1, 2, 4))
    table = format_held_out_table(errors)
    assert table.splitlines()[0].split() == ["s", "d", "measured", "ms", "predicted", "ms", "error", "%"]
    assert "mean |error|" in table.splitlines()[-1]


def compare_with_one_rank(rank: int, world: int, payload, report) -> None:
    """On each of 2 ranks: the sharded all-to-alls and layer stack against the same computation on one rank."""
    torch.manual_seed(0)
    tokens, heads, width = 16, 4, 3
    whole = torch.randn(tokens, heads, width, dtype=torch.float64)
    upstream = torch.randn(tokens, heads, width, dtype=torch.float64)
    mine = slice(rank * tokens // world, (rank + 1) * tokens // world)
    my_heads = slice(rank * heads // world, (rank + 1) * heads // world)
    local = whole[mine].clone().requires_grad_()
    by_heads = tokens_to_heads(local, dist.group.WORLD)
    (by_heads * upstream[:, my_heads]).sum().backward()
    errors = {
        "tokens_to_heads": (by_heads - whole[:, my_heads]).abs().max().item(),
        # The loss is the sum over ranks of <upstream, output>, so each rank's input gradient is its rows of upstream.
        "tokens_to_heads grad": (local.grad - upstream[mine]).abs().max().item(),
        "round trip": (heads_to_tokens(by_heads.detach(), dist.group.WORLD) - whole[mine]).abs().max().item(),
    }

    shape = ProfileShape(hidden=32, heads=4, ffn=64, layers=2)
    stack = UlyssesStack(shape).double()
    x = torch.randn(64, shape.hidden, dtype=torch.float64, requires_grad=True)
    reference = stack(x)
    reference.sum().backward()
    reference_grads = [p.grad.clone() for p in stack.parameters()]
    stack.zero_grad()
    rows = slice(rank * 64 // world, (rank + 1) * 64 // world)
    x_local = x.detach()[rows].clone().requires_grad_()
    sharded = stack(x_local, dist.group.WORLD)
    sharded.sum().backward()
    errors["layer output"] = (sharded - reference[rows]).abs().max().item()
    errors["input grad"] = (x_local.grad - x.grad[rows]).abs().max().item()
    for p, expected in zip(stack.parameters(), reference_grads, strict=True):
        # Each rank's weight gradient covers its own tokens; their sum is the whole sequence's.
        dist.all_reduce(p.grad)
        errors["weight grad"] = max(errors.get("weight grad", 0.0), (p.grad - expected).abs().max().item())
    report(errors)


@pytest.mark.timeout(600)
def test_two_rank_ulysses_stack_equals_one_rank():
    results = {}
    run_on_ranks(compare_with_one_rank, 2, None, timeout_s=45, on_result=results.__setitem__)
    assert sorted(results) == [0, 1]
    for rank, errors in results.items():
        assert errors.keys() >= {"tokens_to_heads", "tokens_to_heads grad", "layer output", "input grad", "weight grad"}
        for name, error in errors.items():
            assert error < 1e-10, f"rank {rank}: {name} differs by {error}"


def fail_on_rank_one(rank: int, world: int, payload, report) -> None:
    if rank == 1:
        raise RuntimeError("no dataset on this node")
    dist.barrier()  # rank 0 waits here for a rank that never comes: the parent must stop it


def hang_on_rank_zero(rank: int, world: int, payload, report) -> None:
    if rank == 0:
        time.sleep(3600)


@pytest.mark.timeout(600)  # a guard against a hang, not a speed check: two launches on a loaded machine
def test_a_failing_or_hanging_rank_stops_every_rank_with_a_clear_error():
    with pytest.raises(ProfilerError, match="rank 1 failed:(.|\n)*no dataset on this node"):
        run_on_ranks(fail_on_rank_one, 2, None, timeout_s=45, on_result=lambda rank, value: None)
    # The 8 s count from the moment both ranks have started (start-up is not what is tested):
    # rank 1 is done by then, rank 0 is not.
    with pytest.raises(ProfilerError, match=r"ranks \[0\] did not finish within 8 s of every rank starting"):
        run_on_ranks(hang_on_rank_zero, 2, None, timeout_s=8, on_result=lambda rank, value: None)

"""`stalwart plan`: a readable table, a PNG, JSON, and one clear error for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from launcher.cli import main
from parallel.cost_model import load_profile
from parallel.plan import Cluster, Group, Plan, check_plan, group_time
from parallel.plan_commands import plan_table


def test_plan_prints_groups_and_draws_the_chart(tmp_path, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("# one step\n60000\n" + "\n".join(["3000"] * 60) + "\n")
    png = tmp_path / "plan.png"
    code = main(["plan", "--lengths", str(lengths), "--ranks", "16", "--png", str(png), "--baselines"])
    out = capsys.readouterr().out
    assert code == 0
    assert "<- slowest" in out and "proven lower bound" in out
    rows = _group_rows(out)
    # The 60,000-token sequence needs a whole node (8 x 8,192 tokens); the largest group comes first.
    assert rows[0][:3] == ["0-7", "8", "one"] and rows[0][6].startswith("60,000")
    assert all(row[2] == "one" for row in rows)  # no group of <= 8 aligned ranks crosses an 8-rank node
    assert sum(int(row[1]) for row in rows) == 16
    assert sum(int(row[4]) for row in rows) == 61
    assert sum(int(row[5].replace(",", "")) for row in rows) == 240_000
    assert "homogeneous" in out and "megatron" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def _group_rows(out: str) -> list[list[str]]:
    """The table's group rows, split into columns after the round: ranks, size, nodes, mbs, seqs, tokens, longest..."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("round"))
    end = lines.index("", header)
    return [line.split()[1:] for line in lines[header + 1 : end]]


def test_plan_table_rows_give_each_groups_ranks_nodes_and_load():
    cluster, model = Cluster(16, 4), load_profile("h100-gpt7b")
    lengths = np.array([60_000, 3_000, 2_000, 500])
    groups = (Group(0, 8, ((0,),)), Group(8, 4, ((1, 2),)), Group(12, 4, ((3,),)))
    times = [group_time(g, lengths, model, cluster) for g in groups]
    plan = Plan(groups, max(times), max(times), "optimal")
    check_plan(plan, lengths, cluster, model)
    rows = plan_table(plan, lengths, cluster, model).splitlines()
    # Columns: round, ranks, size, nodes (8 ranks span two 4-rank nodes), mbs, seqs, tokens, longest three, time.
    assert rows[1:5] == [
        f"1     0-7            8  spans    1     1    60,000  60,000                {times[0]:8.3f}  <- slowest",
        f"1     8-11           4  one      1     2     5,000  3,000, 2,000          {times[1]:8.3f}",
        f"1     12-15          4  one      1     1       500  500                   {times[2]:8.3f}",
        "",
    ]


def test_plan_table_marks_the_slowest_group_of_every_round():
    cluster, model = Cluster(2, 8), load_profile("cpu-2core-long-context")
    lengths = np.array([7_000, 900, 1_500, 2_000, 300])
    groups = (Group(0, 2, ((0,),)), Group(0, 1, ((1, 3),), round=1), Group(1, 1, ((2, 4),), round=1))
    times = [group_time(g, lengths, model, cluster) for g in groups]
    plan = Plan(groups, times[0] + max(times[1:]), 0.0, "greedy-rounds")
    check_plan(plan, lengths, cluster, model)
    rows = plan_table(plan, lengths, cluster, model).splitlines()[1:4]
    assert [row.split()[:2] for row in rows] == [["1", "0-1"], ["2", "0"], ["2", "1"]]
    assert [row.endswith("<- slowest") for row in rows] == [True, times[1] > times[2], times[2] > times[1]]


def test_plan_as_json_is_a_valid_plan(tmp_path, capsys):
    lengths = tmp_path / "lengths.json"
    batch = [9000, 20000, 500, 700, 12000, 64, 3000]
    lengths.write_text(json.dumps(batch))
    assert main(["plan", "--lengths", str(lengths), "--ranks", "8", "--ranks-per-node", "4", "--json"]) == 0
    raw = json.loads(capsys.readouterr().out)["plan"]
    groups = tuple(
        Group(g["start"], g["size"], tuple(tuple(mb) for mb in g["microbatches"]), g["round"]) for g in raw["groups"]
    )
    plan = Plan(groups, raw["estimated_time"], raw["lower_bound"], raw["method"])
    check_plan(plan, np.array(batch), Cluster(8, 4), load_profile("h100-gpt7b"))


def test_plan_draws_from_a_workload_and_a_corpus(small_dataset, capsys):
    assert main(["plan", "--workload", "wikipedia", "--ranks", "64", "--clip", "131072", "--time-limit", "0.3"]) == 0
    assert "512 sequences" in capsys.readouterr().out
    assert main(["plan", "--corpus", small_dataset, "--ranks", "8", "--sequences", "40", "--clip", "8192"]) == 0
    assert "40 sequences" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("100\n0\n", [], "line 2"),
        ("100\n70000\n", [], "more than the largest group of 8 ranks holds"),
        ("100\n", ["--profile", "nope"], "neither a file nor a shipped profile"),
        ("100\n", ["--ranks-per-node", "3"], "power of two"),
    ],
)
def test_bad_input_exits_2_with_one_message(tmp_path, capsys, content, args, message):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text(content)
    assert main(["plan", "--lengths", str(lengths), "--ranks", "8", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1


def test_plan_run_names_a_directory_without_metrics_or_plans(tmp_path, capsys):
    assert main(["plan", "--run", str(tmp_path / "missing")]) == 2
    assert "missing/metrics.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 4.0, "step_time_s": 1.0}) + "\n")
    assert main(["plan", "--run", str(tmp_path)]) == 2
    assert "has no planned steps" in capsys.readouterr().err

"""`stalwart plan`: a readable table, a PNG, JSON, and one clear error for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from launcher.cli import main
from parallel.cost_model import load_profile
from parallel.plan import Cluster, Group, Plan, check_plan


def test_plan_prints_groups_and_draws_the_chart(tmp_path, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("# one step\n60000\n" + "\n".join(["3000"] * 60) + "\n")
    png = tmp_path / "plan.png"
    code = main(["plan", "--lengths", str(lengths), "--ranks", "16", "--png", str(png), "--baselines"])
    out = capsys.readouterr().out
    assert code == 0
    assert "<- slowest" in out and "proven lower bound" in out
    assert "spans" in out or "one" in out
    assert "homogeneous" in out and "megatron" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_plan_as_json_is_a_valid_plan(tmp_path, capsys):
    lengths = tmp_path / "lengths.json"
    batch = [9000, 20000, 500, 700, 12000, 64, 3000]
    lengths.write_text(json.dumps(batch))
    assert main(["plan", "--lengths", str(lengths), "--ranks", "8", "--ranks-per-node", "4", "--json"]) == 0
    raw = json.loads(capsys.readouterr().out)["plan"]
    groups = tuple(Group(g["start"], g["size"], tuple(tuple(mb) for mb in g["microbatches"])) for g in raw["groups"])
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
        ("100\n70000\n", [], "more than all 8 ranks hold together"),
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

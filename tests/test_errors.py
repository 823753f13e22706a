"""Bad input gets one clear error on every rank, and no rank hangs."""

import re
import sys

import yaml

from tests.conftest import REPO, rank_env, run_command, torchrun
from trainer.prepare import train_tokenizer


def stalwart(*args, timeout=120):
    return run_command([sys.executable, "-m", "launcher.cli", *args], timeout, env=rank_env(1), cwd=REPO)


def rewrite(path, **sections):
    config = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def test_config_error_is_reported_once_before_any_rank_starts(tiny_config):
    result = stalwart("run", str(tiny_config), "--nproc", "3", "--set", "parallel.tp=3")
    assert result.returncode == 2
    assert result.stderr.count("config error at 'parallel.tp'") == 1, result.stderr
    assert "must divide model.num_attention_heads" in result.stderr


def test_world_size_mismatch_names_the_degrees(tiny_config):
    result = stalwart("run", str(tiny_config), "--nproc", "3", "--set", "parallel.tp=2")
    assert result.returncode == 2
    assert "world size 3 != tp 2 x pp 1" in result.stderr


def test_missing_dataset_without_sources_names_the_file(tiny_config, tmp_path):
    rewrite(tiny_config, data={"path": str(tmp_path / "absent")})
    result = stalwart("run", str(tiny_config))
    assert result.returncode == 2
    assert "absent-meta.json" in result.stderr and "stalwart data prepare" in result.stderr


def test_every_rank_reports_missing_data_files(tiny_config, small_dataset, tmp_path):
    """Started directly (as srun would), each rank checks and each says what is missing."""
    rewrite(tiny_config, data={"path": str(tmp_path / "gone")})
    result = torchrun(2, ["-m", "trainer", str(tiny_config)], timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("stalwart: error:") == 2, result.stderr[-3000:]
    assert result.stderr.count("gone-meta.json") >= 2


def test_tokenizer_that_does_not_match_the_dataset_is_refused_on_every_rank(tiny_config, tmp_path):
    other = tmp_path / "other-tokenizer.json"
    train_tokenizer(["a completely different corpus " * 50, "with other words " * 40], 300, other)
    rewrite(tiny_config, data={"tokenizer": str(other)})
    result = torchrun(2, ["-m", "trainer", str(tiny_config)], timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("stalwart: error:") == 2, result.stderr[-3000:]
    assert "tokenizer" in result.stderr and "stalwart data prepare" in result.stderr


def test_one_rank_failing_stops_all_ranks_with_its_message(tiny_config):
    result = torchrun(2, ["tests/errors_worker.py", str(tiny_config)], timeout=120)
    assert result.returncode != 0
    reports = re.findall(r"rank (\d) stopped: (.*?\[rank \d\])", result.stdout)
    assert sorted(rank for rank, _ in reports) == ["0", "1"], result.stdout + result.stderr[-2000:]
    assert all("not-mounted-here-meta.json" in message and message.endswith("[rank 1]") for _, message in reports)

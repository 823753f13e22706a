"""Config loading and validation: every error names the key and what is allowed."""

from pathlib import Path

import pytest

from trainer.config import Config, load_config
from trainer.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    nproc = config.parallel.tp * config.parallel.pp * (config.parallel.dp or 1)
    config.validate(world_size=nproc)


def test_yaml_becomes_typed_dataclasses(tmp_path):
    config = load_config(write(tmp_path, "train:\n  steps: 7\noptim:\n  lr: 3e-4\nparallel:\n  tp: 2\n"))
    assert isinstance(config, Config)
    assert config.train.steps == 7 and config.parallel.tp == 2
    assert config.optim.lr == pytest.approx(3e-4) and isinstance(config.optim.lr, float)


def test_overrides_replace_values_and_parse_yaml_types(tmp_path):
    config = load_config(
        write(tmp_path, "train:\n  steps: 7\n"), ["train.steps=9", "parallel.sp=true", "parallel.vpp=null"]
    )
    assert config.train.steps == 9 and config.parallel.sp is True and config.parallel.vpp is None


@pytest.mark.parametrize(
    "text, overrides, key, words",
    [
        ("train:\n  stpes: 3\n", [], "train.stpes", ["unknown key", "steps"]),
        ("", ["trian.steps=3"], "trian", ["unknown key", "train"]),
        ("train:\n  steps: many\n", [], "train.steps", ["expected int", "'many'"]),
        ("parallel:\n  sp: 1\n", [], "parallel.sp", ["expected bool"]),
        ("optim:\n  schedule: linear\n", [], "optim.schedule", ["'cosine'", "'wsd'"]),
        ("run:\n  precision: fp16\n", [], "run.precision", ["'bf16'", "'fp32'"]),
        ("train: 5\n", [], "train", ["expected a mapping"]),
        ("", ["train.steps"], "train.steps", ["section.key=value"]),
    ],
)
def test_load_errors_name_the_key(tmp_path, text, overrides, key, words):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), overrides)
    assert error.value.key == key
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize(
    "overrides, world, key, words",
    [
        (["parallel.tp=3"], 3, "parallel.tp", ["must divide", "num_attention_heads"]),
        (["parallel.tp=2"], 3, "parallel", ["world size 3", "tp 2", "pp 1"]),
        (["parallel.tp=2", "parallel.pp=2", "parallel.dp=2"], 4, "parallel", ["world size 4", "dp 2"]),
        (["parallel.sp=true"], 1, "parallel.sp", ["tp >= 2"]),
        (["parallel.vpp=2"], 1, "parallel.vpp", ["pp >= 2"]),
        (["parallel.pp=2", "parallel.vpp=4", "model.num_layers=4"], 2, "model.num_layers", ["8 pipeline stages"]),
        (["train.global_batch_tokens=1000"], 1, "train.global_batch_tokens", ["multiple of train.seq_length"]),
        (["train.micro_batch_size=3"], 2, "train.global_batch_tokens", ["micro-batches of 3", "2 data-parallel"]),
        (["model.num_query_groups=3"], 1, "model.num_query_groups", ["must divide"]),
        (["optim.min_lr=1.0"], 1, "optim.min_lr", ["optim.lr"]),
        (["train.steps=0"], 1, "train.steps", [">= 1"]),
        (
            ["data.packing=documents", "train.seq_length=64", "train.micro_batch_size=2", "train.max_seq_length=200"],
            1,
            "train.max_seq_length",
            ["[1, 128]", "got 200"],
        ),
        (["data.packing=documents", "model.spec=te"], 1, "model.spec", ["local layers"]),
        (["planner.enabled=true"], 1, "planner.enabled", ["data.packing: documents"]),
        (
            # 4 ranks, but 4 heads over tp 2 leave 2 per rank: groups of at most 2, 2 x 128 tokens.
            ["data.packing=documents", "planner.enabled=true", "parallel.tp=2", "train.seq_length=64"]
            + ["train.micro_batch_size=2", "train.max_seq_length=300"],
            8,
            "train.max_seq_length",
            ["[1, 256]", "x 2, the planner's largest group", "got 300"],
        ),
    ],
)
def test_validation_errors_name_the_key(tmp_path, overrides, world, key, words):
    config = load_config(REPO / "configs" / "demo.yaml", ["parallel.dp=null", *overrides])
    with pytest.raises(ConfigError) as error:
        config.validate(world_size=world)
    assert error.value.key == key, str(error.value)
    for word in words:
        assert word in str(error.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_every_config_key_is_documented():
    import dataclasses

    docs = (REPO / "docs" / "configuration.md").read_text()
    for section in dataclasses.fields(Config):
        for key in dataclasses.fields(section.default_factory):
            assert f"`{section.name}.{key.name}`" in docs, f"{section.name}.{key.name} is missing from the docs"

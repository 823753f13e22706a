"""Universal checkpoints: exact resume, resume on other layouts, integrity, plain zarr access."""

import json
import shutil
import sys

import numpy as np
import pytest
import yaml
import zarr

from checkpoint.retention import checkpoints_to_delete
from checkpoint.universal import find_resume_checkpoint
from tests.conftest import REPO, TINY_CONFIG, rank_env, run_command, torchrun, write_tiny_config
from trainer.metrics import read_metrics

# 8 heads in 4 groups so that TP4 is possible; 4 layers so that PP4 and PP2 x VPP2 are.
MODEL_OVERRIDES = ("model.num_attention_heads=8", "model.num_query_groups=4")
MODEL = {**TINY_CONFIG["model"], "num_attention_heads": 8, "num_query_groups": 4}
SOURCE = {"parallel.tp": 2, "parallel.pp": 2}
# name -> (world size, overrides) of the layouts that resume the source's step-3 checkpoint.
RESUME_LAYOUTS = {
    "same": (4, "parallel.tp=2,parallel.pp=2"),
    "tp1_dp4": (4, ""),
    "tp4": (4, "parallel.tp=4"),
    "pp4": (4, "parallel.pp=4"),
    "tp2_sp_pp2_vpp2": (4, "parallel.tp=2,parallel.sp=true,parallel.pp=2,parallel.vpp=2"),
    "dp2_distopt": (2, "parallel.distributed_optimizer=true"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_dataset):
    root = tmp_path_factory.mktemp("ckpt")
    config_path = write_tiny_config(
        root / "config.yaml",
        root / "source",
        small_dataset,
        *MODEL_OVERRIDES,
        "train.steps=6",
        "train.eval_interval=0",
        "checkpoint.interval=3",
        "checkpoint.keep=5",
    )
    sets = [arg for key, value in SOURCE.items() for arg in ("--set", f"{key}={value}")]
    result = torchrun(4, ["-m", "trainer", str(config_path), *sets], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    source = root / "source" / "checkpoints" / "step_000000003"
    for world in sorted({w for w, _ in RESUME_LAYOUTS.values()}):
        layouts = [f"{name}={sets}" for name, (w, sets) in RESUME_LAYOUTS.items() if w == world]
        args = ["tests/checkpoint_worker.py", str(config_path), str(source), str(root), *layouts]
        result = torchrun(world, args, timeout=400)
        assert result.returncode == 0, result.stderr[-4000:]
    return root, config_path


def losses(path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(path / "metrics.jsonl")}


def test_resume_on_the_same_layout_is_bit_exact(runs):
    root, _ = runs
    reference, resumed = losses(root / "source"), losses(root / "same")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == reference[step], f"step {step}: {resumed[step]!r} != {reference[step]!r}"


@pytest.mark.parametrize("layout", [name for name in RESUME_LAYOUTS if name != "same"])
def test_resume_on_another_layout_matches_the_uninterrupted_run(runs, layout):
    root, _ = runs
    reference, resumed = losses(root / "source"), losses(root / layout)
    for step in (4, 5, 6):
        assert abs(resumed[step] - reference[step]) <= 1e-5 * abs(reference[step]), (layout, step)


def arrays(path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint through plain zarr, as any other reader would see it."""
    manifest = json.loads((path / "manifest.json").read_text())
    return {name: zarr.open(str(path / name), mode="r")[...] for name in manifest["arrays"]}


@pytest.mark.parametrize("layout", list(RESUME_LAYOUTS))
def test_state_loaded_on_any_layout_saves_back_identically(runs, layout):
    """Model weights and every optimizer state read back equal the saved ones."""
    root, _ = runs
    saved = arrays(root / "source" / "checkpoints" / "step_000000003")
    again = arrays(root / layout / "resaved" / "step_000000003")
    assert set(saved) == set(again)
    assert any(name.startswith("optim/exp_avg_sq/") for name in saved)
    for name, values in saved.items():
        np.testing.assert_array_equal(again[name], values, err_msg=name)


def test_resume_back_onto_the_source_layout(runs, tmp_path):
    """A checkpoint written at TP1 x DP4 resumes at TP2 x PP2 and continues the source run."""
    root, config_path = runs
    source = root / "tp1_dp4" / "resaved" / "step_000000003"
    args = [
        "tests/checkpoint_worker.py",
        str(config_path),
        str(source),
        str(tmp_path),
        "back=parallel.tp=2,parallel.pp=2",
    ]
    result = torchrun(4, args, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    reference, resumed = losses(root / "source"), losses(tmp_path / "back")
    for step in (4, 5, 6):
        assert abs(resumed[step] - reference[step]) <= 1e-5 * abs(reference[step])


def test_arrays_are_global_and_unpadded(runs, small_dataset):
    root, _ = runs
    saved = arrays(root / "source" / "checkpoints" / "step_000000003")
    vocab = json.loads(open(f"{small_dataset}-meta.json").read())["vocab_size"]
    assert saved["model/output_layer.weight"].shape == (vocab, MODEL["hidden_size"])
    assert saved["model/decoder.layers.3.mlp.linear_fc1.weight"].shape == (2 * MODEL["ffn_hidden_size"], 64)
    state = json.loads((root / "source" / "checkpoints" / "step_000000003" / "state.json").read_text())
    assert state["step"] == 3 and state["sampler"]["consumed_samples"] == 3 * 16
    assert state["layout"]["tp"] == 2 and state["layout"]["pp"] == 2


def test_a_flipped_byte_is_refused_on_resume_naming_the_tensor(runs, tmp_path):
    root, config_path = runs
    source = tmp_path / "step_000000003"
    shutil.copytree(root / "source" / "checkpoints" / "step_000000003", source)
    # An Adam state: a run whose parameters are their own main weights (fp32, no distributed
    # optimizer) reads their values from optim/param, not from model/.
    chunk = source / "optim" / "exp_avg" / "decoder.layers.1.self_attention.linear_qkv.weight" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0x40
    chunk.write_bytes(bytes(data))
    args = [
        "tests/checkpoint_worker.py",
        str(config_path),
        str(source),
        str(tmp_path),
        "bad=parallel.tp=2,parallel.pp=2",
    ]
    result = torchrun(4, args, timeout=300)
    assert result.returncode != 0
    assert (
        "optim/exp_avg/decoder.layers.1.self_attention.linear_qkv.weight chunk c/0/0 failed its checksum"
        in result.stderr
    )


def test_incomplete_checkpoints_are_skipped_with_a_reason(tmp_path, runs):
    root, _ = runs
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(root / "source" / "checkpoints", ckpt)
    (ckpt / "step_000000006" / "manifest.json").unlink()
    broken = ckpt / "step_000000009"
    shutil.copytree(ckpt / "step_000000003", broken)
    shutil.rmtree(broken / "model" / "output_layer.weight" / "c")
    found = find_resume_checkpoint(ckpt)
    assert found.step == 3
    assert found.skipped[0].startswith("step_000000009: tensor model/output_layer.weight is missing chunk")
    assert found.skipped[1] == "step_000000006: no manifest.json (the save did not finish)"


@pytest.mark.parametrize(
    "steps, keep, keep_every, deleted",
    [
        ([10, 20, 30, 40], 2, None, [10, 20]),
        ([10, 20, 30, 40], 1, 20, [10, 30]),
        ([10], 1, None, []),
        ([10, 20], 0, None, [10]),  # the newest complete one always stays
    ],
)
def test_retention(steps, keep, keep_every, deleted):
    assert checkpoints_to_delete(steps, keep, keep_every) == deleted


def stalwart(*args):
    return run_command([sys.executable, "-m", "launcher.cli", *args], 120, env=rank_env(1), cwd=REPO)


def test_ckpt_ls_lists_steps_layout_and_latest(runs):
    root, _ = runs
    result = stalwart("ckpt", "ls", str(root / "source"))
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(lines) == {"step_000000003", "step_000000006"}
    assert "tp2 pp2 dp1" in lines["step_000000003"] and "complete" in lines["step_000000003"]
    assert lines["step_000000006"].endswith("<- latest")


def test_ckpt_inspect_shows_tensors_with_shapes(runs):
    root, _ = runs
    result = stalwart("ckpt", "inspect", str(root / "source" / "checkpoints" / "step_000000003"), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    tensors = {t["name"]: t for t in info["tensors"]}
    assert tensors["model/decoder.layers.0.mlp.linear_fc2.weight"]["shape"] == [64, 176]
    assert tensors["model/decoder.layers.0.mlp.linear_fc2.weight"]["attributes"]["layout"]["tp_dim"] == 1
    assert info["state"]["step"] == 3


def test_ckpt_verify_passes_a_sound_checkpoint_and_names_every_problem(runs, tmp_path):
    root, _ = runs
    good = root / "source" / "checkpoints" / "step_000000006"
    assert stalwart("ckpt", "verify", str(good)).returncode == 0
    bad = tmp_path / "step_000000006"
    shutil.copytree(good, bad)
    flipped = bad / "optim" / "exp_avg" / "decoder.layers.2.mlp.linear_fc2.weight" / "c" / "0" / "0"
    data = bytearray(flipped.read_bytes())
    data[7] ^= 0x01
    flipped.write_bytes(bytes(data))
    (bad / "model" / "embedding.word_embeddings.weight" / "c" / "0" / "0").unlink()
    result = stalwart("ckpt", "verify", str(bad))
    assert result.returncode == 1
    assert "tensor optim/exp_avg/decoder.layers.2.mlp.linear_fc2.weight chunk c/0/0: checksum mismatch" in result.stdout
    assert "tensor model/embedding.word_embeddings.weight chunk c/0/0: missing on disk" in result.stdout


def test_export_hf_gives_a_llama_that_reproduces_our_loss(runs, tmp_path, small_dataset):
    """The exported weights, run by Hugging Face's Llama, give the loss we logged for step 4."""
    import torch
    from transformers import LlamaForCausalLM

    from trainer.data import GlobalBatchSampler, TokenWindows

    root, config_path = runs
    result = stalwart(
        "ckpt", "export-hf", str(root / "source" / "checkpoints" / "step_000000003"), str(tmp_path / "hf")
    )
    assert result.returncode == 0, result.stderr
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32, attn_implementation="eager")
    config = yaml.safe_load(config_path.read_text())
    assert model.config.vocab_size % 128 == 0, "with vocabulary padding the two softmaxes would differ"
    windows = TokenWindows(small_dataset, "train", config["train"]["seq_length"])
    sampler = GlobalBatchSampler(len(windows), 16, config["train"].get("seed", 1234))
    for _ in range(3):
        sampler.next_global_batch()
    batch = torch.from_numpy(np.stack([windows[int(i)] for i in sampler.next_global_batch()]))
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()
    logged = losses(root / "source")[4]
    assert abs(loss - logged) <= 1e-4 * logged, (loss, logged)

"""Documents as sequences (data.packing: documents): attention, positions and the loss stay
inside each document, and the step's loss is the same on every layout."""

import shutil
import sys

import numpy as np
import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from tests.conftest import REPO, rank_env, run_command, write_tiny_config
from trainer.attention import positions_in_documents
from trainer.config import Config, DataConfig, ModelConfig
from trainer.metrics import read_metrics
from trainer.model import build_model_chunks
from trainer.packing import packed_micro_batch

VOCAB = 300
MODEL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2)


def packed_logits(model, documents: list[np.ndarray], length: int) -> list[torch.Tensor]:
    """Each document's logits when `documents` are packed into one micro-batch of `length` tokens."""
    batch = packed_micro_batch(documents, length)
    cu = torch.from_numpy(batch.cu_seqlens)
    longest = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )
    tokens, positions = (torch.from_numpy(x).unsqueeze(0) for x in (batch.tokens, batch.positions))
    with torch.no_grad():
        logits = model(tokens, positions, None, packed_seq_params=params)[0]
    bounds = batch.cu_seqlens.tolist()
    n = len(documents)
    return [logits[a:b] for a, b in zip(bounds[:n], bounds[1 : n + 1], strict=True)]


def test_positions_restart_at_every_document():
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    assert positions_in_documents(cu).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]


def test_no_document_sees_another_and_each_reads_as_if_alone(single_rank):
    [model] = build_model_chunks(Config(model=MODEL, data=DataConfig(packing="documents")), single_rank, VOCAB)
    model.eval()
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, VOCAB, n + 1) for n in (37, 20, 51)]
    together = packed_logits(model, docs, length=128)

    # Another middle document changes nothing in the others.
    changed = [docs[0], rng.integers(1, VOCAB, 31 + 1), docs[2]]
    again = packed_logits(model, changed, length=128)
    for i in (0, 2):
        torch.testing.assert_close(again[i], together[i], rtol=0, atol=1e-6)
    assert not torch.allclose(again[1][:20], together[1])

    # Each document alone, at the start of a micro-batch: the same logits (positions restart).
    for doc, packed in zip(docs, together, strict=True):
        torch.testing.assert_close(packed_logits(model, [doc], length=64)[0], packed, rtol=0, atol=1e-5)

    # And the stock model (megatron's rotary embedding and attention) on a document alone agrees:
    # the same weights, by name and seed, read the same document the same way.
    [stock] = build_model_chunks(Config(model=MODEL, data=DataConfig(packing="concat")), single_rank, VOCAB)
    stock.eval()
    for doc, packed in zip(docs, together, strict=True):
        tokens = torch.from_numpy(doc[:-1]).unsqueeze(0)
        with torch.no_grad():
            logits = stock(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)[0]
        torch.testing.assert_close(logits, packed, rtol=0, atol=1e-5)


def documents_run(
    tmp_path, dataset: str, name: str, nproc: int, *settings: str, restores: int | None = None
) -> dict[int, float]:
    """Step -> loss of the tiny model on packed documents (with `restores`, checked to have
    resumed from that step's checkpoint)."""
    run_dir = tmp_path / name
    config = write_tiny_config(
        tmp_path / f"{name}.yaml",
        run_dir,
        dataset,
        "data.packing=documents",
        "train.steps=4",
        "train.eval_interval=2",
        "snapshot.interval=0",
        *settings,
    )
    command = [sys.executable, "-m", "launcher.cli", "run", str(config), "--nproc", str(nproc)]
    result = run_command(command, 600, env=rank_env(nproc), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    if restores is not None:
        assert f"restored step {restores} from disk" in result.stdout
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def test_the_loss_of_packed_documents_is_the_same_on_every_layout(tmp_path, small_dataset):
    """The loss is the mean over the global batch's real tokens whichever rank packs which
    documents: one rank, two data-parallel ranks (other packs), TP2 with sequence parallelism, PP2."""
    reference = documents_run(tmp_path, small_dataset, "one", 1)
    assert len(reference) == 4
    for name, settings in {
        "dp2": ("parallel.dp=2",),
        "tp2": ("parallel.tp=2", "parallel.sp=true"),
        "pp2": ("parallel.pp=2",),
    }.items():
        losses = documents_run(tmp_path, small_dataset, name, 2, *settings)
        assert losses.keys() == reference.keys()
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, rel=1e-5), (name, step)


def test_a_run_of_documents_resumes_bit_exactly_and_keeps_its_data_order_on_another_dp_size(tmp_path, small_dataset):
    reference = documents_run(tmp_path, small_dataset, "whole", 1)
    every_second = ("checkpoint.interval=2", "checkpoint.keep=10")
    documents_run(tmp_path, small_dataset, "resumed", 1, *every_second, "train.steps=2")
    (tmp_path / "wider").mkdir()
    shutil.copytree(tmp_path / "resumed" / "checkpoints", tmp_path / "wider" / "checkpoints")
    resumed = documents_run(tmp_path, small_dataset, "resumed", 1, *every_second, restores=2)
    assert [resumed[s] for s in (3, 4)] == [reference[s] for s in (3, 4)]  # to the last bit
    wider = documents_run(tmp_path, small_dataset, "wider", 2, *every_second, "parallel.dp=2", restores=2)
    for step in (3, 4):  # the same documents, packed by two ranks instead of one
        assert wider[step] == pytest.approx(reference[step], rel=1e-5)

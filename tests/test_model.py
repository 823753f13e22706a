"""The Llama-style model as built for one rank: architecture, parameter count, FLOP accounting."""

import pytest
import torch

from trainer.config import Config, ModelConfig
from trainer.metrics import model_flops_per_token
from trainer.model import build_model_chunks, padded_vocab_size


def test_padded_vocab_does_not_depend_on_tp():
    assert padded_vocab_size(8000, 128) == 8064
    assert padded_vocab_size(128256, 128) == 128256


def test_model_is_llama_shaped_and_flops_count_its_matmuls(single_rank):
    config = Config(
        model=ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2)
    )
    [model] = build_model_chunks(config, single_rank, vocab_size=500)
    params = dict(model.named_parameters())
    vocab = padded_vocab_size(500, 128)
    head_dim = 16
    assert params["embedding.word_embeddings.weight"].shape == (vocab, 64)
    assert params["output_layer.weight"].shape == (vocab, 64)  # untied from the embedding
    assert params["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (64 + 2 * 2 * head_dim, 64)  # GQA
    assert params["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 160, 64)  # SwiGLU gate + up
    assert not any(name.endswith("bias") for name in params)
    assert isinstance(model.decoder.final_layernorm, torch.nn.Module)

    matmul = sum(p.numel() for n, p in params.items() if "norm" not in n and "word_embeddings" not in n)
    attention_term = 12 * 2 * 64 * 128
    assert model_flops_per_token(config.model, 128, vocab) == 6 * matmul + attention_term


def test_initialisation_has_the_configured_scale(single_rank):
    config = Config(
        model=ModelConfig(num_layers=4, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4, init_std=0.02)
    )
    [model] = build_model_chunks(config, single_rank, vocab_size=1000)
    params = dict(model.named_parameters())
    assert params["decoder.layers.1.mlp.linear_fc1.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert params["decoder.layers.1.mlp.linear_fc2.weight"].std().item() == pytest.approx(0.02 / 8**0.5, rel=0.05)
    assert torch.equal(params["decoder.layers.1.input_layernorm.weight"], torch.ones(128))
    # Different layers get different draws.
    assert not torch.equal(
        params["decoder.layers.0.mlp.linear_fc2.weight"], params["decoder.layers.1.mlp.linear_fc2.weight"]
    )

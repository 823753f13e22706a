"""A Llama-style GPTModel from megatron-core: RMSNorm, SwiGLU, RoPE, GQA, untied embeddings."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from checkpoint.layout import padded_shape, tp_regions
from checkpoint.state import global_param_name, param_layout
from parallel.dims import ParallelDims
from parallel.norm import SequenceParallelRMSNorm
from trainer.attention import DocumentAttention
from trainer.config import Config, ModelConfig


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Embedding rows: the vocabulary rounded up to a multiple that does not depend on TP."""
    return math.ceil(vocab_size / divisible_by) * divisible_by


def use_transformer_engine(model: ModelConfig) -> bool:
    if model.spec == "local":
        return False
    try:
        import transformer_engine  # noqa: F401

        have_te = torch.cuda.is_available()
    except ImportError:
        have_te = False
    if model.spec == "te" and not have_te:
        raise RuntimeError("model.spec is 'te' but Transformer Engine or CUDA is not available")
    return have_te


def param_dtype(config: Config) -> torch.dtype:
    if config.run.precision == "bf16" or (config.run.precision == "auto" and torch.cuda.is_available()):
        return torch.bfloat16
    return torch.float32


def transformer_config(config: Config, dims: ParallelDims) -> TransformerConfig:
    model = config.model
    dtype = param_dtype(config)
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        # megatron marks TP-split parameters only when it initialises them; init_weights()
        # then overwrites every value so that all layouts start from the same weights.
        perform_initialization=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vpp,
        sequence_parallel=dims.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Fusions need apex/TE kernels; megatron falls back to torch without them.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
        # Batched p2p posts sends and receives in one order on every rank; gloo then matches a
        # gradient with an activation when both pipeline neighbours are the same rank (pp=2,
        # interleaved). Megatron's unbatched path orders them by rank parity, which pairs correctly.
        batch_p2p_comm=torch.cuda.is_available(),
        # Packed documents: the loss is a sum over tokens, and the gradients are divided by the
        # global batch's token count (megatron all-reduces it), the same on every layout.
        calculate_per_token_loss=config.data.packing == "documents",
    )


def decoder_block_spec(
    tconfig: TransformerConfig, model: ModelConfig, use_te: bool, vp_stage: int | None, documents: bool = False
) -> TransformerBlockSubmodules:
    """The layers of one model chunk; with `documents`, attention stays inside each packed
    document (trainer/attention.py)."""
    if use_te:
        return get_gpt_decoder_block_spec(
            tconfig, use_transformer_engine=True, normalization="RMSNorm", vp_stage=vp_stage
        )
    norm = ModuleSpec(module=SequenceParallelRMSNorm)
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = layer.submodules.self_attention
    if documents:
        core = ModuleSpec(module=DocumentAttention, params={"rotary_base": model.rotary_base})
        attention = dataclasses.replace(
            attention, submodules=dataclasses.replace(attention.submodules, core_attention=core)
        )
    layer = dataclasses.replace(
        layer,
        submodules=dataclasses.replace(
            layer.submodules, input_layernorm=norm, pre_mlp_layernorm=norm, self_attention=attention
        ),
    )
    layers = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=norm)


def build_model_chunks(config: Config, dims: ParallelDims, vocab_size: int) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), initialised and on the device."""
    from megatron.core import parallel_state as ps

    tconfig = transformer_config(config, dims)
    documents = config.data.packing == "documents"
    use_te = use_transformer_engine(config.model) and not documents  # packed documents: local layers
    vocab = padded_vocab_size(vocab_size, config.model.make_vocab_size_divisible_by)
    chunks = []
    for vp_stage in range(dims.model_chunks):
        vp = vp_stage if dims.vpp else None
        chunk = GPTModel(
            config=tconfig,
            transformer_layer_spec=decoder_block_spec(tconfig, config.model, use_te, vp, documents),
            vocab_size=vocab,
            max_sequence_length=config.model.max_position_embeddings or config.train.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=False,
            # Packed documents are rotated inside their attention, by position within each document.
            position_embedding_type="none" if documents else "rope",
            rotary_base=config.model.rotary_base,
            vp_stage=vp,
        )
        chunk.to(dims.device)
        init_weights(chunk, config.model, config.train.seed, dims.tp_rank, dims.tp, vocab_size)
        chunks.append(chunk)
    return chunks


def init_weights(module: torch.nn.Module, model: ModelConfig, seed: int, tp_rank: int, tp: int, vocab: int) -> None:
    """Initialise every parameter from a generator keyed by (seed, global name).

    The full tensor is drawn and this rank keeps its TP piece, placed by the same layout
    mapping that checkpoints and snapshots use, so any TP x PP layout starts from the same
    weights as a single-GPU run.
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            full_name = global_param_name(module, name)
            if "norm" in full_name:
                param.fill_(1.0)
            elif full_name.endswith("bias"):
                param.zero_()
            else:
                std = model.init_std
                if full_name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                    std /= math.sqrt(2 * model.num_layers)
                layout = param_layout(full_name, param, tp, vocab)
                full = _seeded_normal(full_name, seed, padded_shape(layout), std, param)
                for global_region, local_region in tp_regions(layout, tp_rank, tp, padded=True):
                    param[local_region] = full[global_region]


def _seeded_normal(name: str, seed: int, shape: tuple[int, ...], std: float, like: torch.Tensor) -> torch.Tensor:
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1
    generator = torch.Generator(device=like.device).manual_seed(key)
    out = torch.empty(shape, dtype=torch.float32, device=like.device)
    return out.normal_(0.0, std, generator=generator)

"""Operator commands on universal checkpoints: list, inspect, verify, export to Hugging Face.

Plain functions returning data; launcher/cli.py prints them.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from checkpoint.universal import completeness_problem, step_dirs


@dataclass(frozen=True)
class CheckpointRow:
    name: str
    step: int
    size_bytes: int
    status: str
    """`complete`, or why it is not."""
    layout: str
    latest: bool


def checkpoints_dir(path: Path) -> Path:
    """Accept a run directory or its checkpoints directory."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def list_checkpoints(path: Path) -> list[CheckpointRow]:
    ckpt_dir = checkpoints_dir(path)
    latest_file = ckpt_dir / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    rows = []
    for step, step_dir in step_dirs(ckpt_dir):
        problem = completeness_problem(step_dir)
        rows.append(
            CheckpointRow(
                name=step_dir.name,
                step=step,
                size_bytes=sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file()),
                status="complete" if problem is None else f"incomplete: {problem}",
                layout=_layout_text(step_dir),
                latest=step_dir.name == latest,
            )
        )
    return rows


def _layout_text(step_dir: Path) -> str:
    try:
        return layout_text(json.loads((step_dir / "state.json").read_text())["layout"])
    except (OSError, KeyError, json.JSONDecodeError):
        return "?"


def layout_text(layout: dict) -> str:
    """`tp2 pp2 dp1 +sp` from a saved layout."""
    text = f"tp{layout['tp']} pp{layout['pp']}" + (f" vpp{layout['vpp']}" if layout.get("vpp") else "")
    text += f" dp{layout['dp']}" + (" +sp" if layout.get("sp") else "")
    return text + (" +distopt" if layout.get("distributed_optimizer") else "")


def array_names(path: Path) -> list[str]:
    """Every array stored under a checkpoint, found from the files (not from the manifest)."""
    names = []
    for meta in path.rglob("zarr.json"):
        if json.loads(meta.read_text()).get("node_type") == "array":
            names.append(str(meta.parent.relative_to(path)))
    return sorted(names)


def inspect_checkpoint(path: Path) -> dict:
    state = json.loads((path / "state.json").read_text()) if (path / "state.json").is_file() else {}
    tensors = []
    for name in array_names(path):
        array = zarr.open_array(path / name, mode="r")
        tensors.append(
            {
                "name": name,
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "chunks": list(array.chunks),
                "attributes": dict(array.attrs),
            }
        )
    summary = {key: state.get(key) for key in ("step", "consumed_tokens", "layout", "sampler")}
    return {"path": str(path), "state": summary, "model": state.get("config", {}).get("model"), "tensors": tensors}


def verify_checkpoint(path: Path) -> list[str]:
    """Problems found (empty when sound): manifest, coverage of every chunk exactly once, checksums."""
    if not path.is_dir():
        return [f"{path}: no such checkpoint directory"]
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return [f"{path}: no manifest.json (the save did not finish)"]
    manifest = json.loads(manifest_path.read_text())["arrays"]
    problems = []
    for name in array_names(path):
        if name not in manifest:
            problems.append(f"tensor {name}: not in the manifest")
            continue
        problems += _verify_array(path, name, manifest[name])
    problems += [f"tensor {name}: in the manifest but not on disk" for name in manifest if not (path / name).is_dir()]
    return problems


def _verify_array(path: Path, name: str, written: list[str]) -> list[str]:
    array = zarr.open_array(path / name, mode="r")
    encode = array.metadata.chunk_key_encoding.encode_chunk_key
    grid = [range(-(-n // c)) for n, c in zip(array.shape, array.chunks, strict=True)]
    expected = {encode(index): index for index in itertools.product(*grid)}
    problems = []
    for key, count in _counts(written).items():
        if count > 1:
            problems.append(f"tensor {name} chunk {key}: written {count} times")
    for key, index in expected.items():
        if key not in written:
            problems.append(f"tensor {name} chunk {key}: never written")
            continue
        if not (path / name / key).is_file():  # zarr would read a missing chunk as zeros
            problems.append(f"tensor {name} chunk {key}: missing on disk")
            continue
        region = tuple(
            slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, array.chunks, array.shape, strict=True)
        )
        try:
            values = array[region]
        except (ValueError, FileNotFoundError) as e:
            problems.append(f"tensor {name} chunk {key}: {'checksum mismatch' if 'checksum' in str(e) else e}")
            continue
        if not np.isfinite(values).all():
            problems.append(f"tensor {name} chunk {key}: holds NaN or infinity")
    return problems


def _counts(keys: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------
# Hugging Face export


def export_hf(path: Path, out: Path) -> Path:
    """Write the model weights as a Hugging Face Llama checkpoint (config.json + model.safetensors)."""
    from safetensors.numpy import save_file

    state = json.loads((path / "state.json").read_text())
    model = state["config"]["model"]
    read = lambda name: zarr.open_array(path / "model" / name, mode="r")[...]  # noqa: E731
    heads, groups = model["num_attention_heads"], model["num_query_groups"] or model["num_attention_heads"]
    head_dim = model["hidden_size"] // heads
    tensors = {
        "model.embed_tokens.weight": read("embedding.word_embeddings.weight"),
        "model.norm.weight": read("decoder.final_layernorm.weight"),
        "lm_head.weight": read("output_layer.weight"),
    }
    for layer in range(model["num_layers"]):
        prefix, hf = f"decoder.layers.{layer}", f"model.layers.{layer}"
        q, k, v = split_fused_qkv(read(f"{prefix}.self_attention.linear_qkv.weight"), heads, groups, head_dim)
        gate, up = np.split(read(f"{prefix}.mlp.linear_fc1.weight"), 2, axis=0)
        tensors |= {
            f"{hf}.self_attn.q_proj.weight": q,
            f"{hf}.self_attn.k_proj.weight": k,
            f"{hf}.self_attn.v_proj.weight": v,
            f"{hf}.self_attn.o_proj.weight": read(f"{prefix}.self_attention.linear_proj.weight"),
            f"{hf}.mlp.gate_proj.weight": gate,
            f"{hf}.mlp.up_proj.weight": up,
            f"{hf}.mlp.down_proj.weight": read(f"{prefix}.mlp.linear_fc2.weight"),
            f"{hf}.input_layernorm.weight": _read_norm(path, prefix, "input_layernorm", "self_attention.linear_qkv"),
            f"{hf}.post_attention_layernorm.weight": _read_norm(path, prefix, "pre_mlp_layernorm", "mlp.linear_fc1"),
        }
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "model.safetensors"))
    config = hf_llama_config(model, tensors["lm_head.weight"].shape[0], state["config"]["train"]["seq_length"])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def split_fused_qkv(qkv: np.ndarray, heads: int, groups: int, head_dim: int) -> tuple[np.ndarray, ...]:
    """Megatron's fused QKV rows are grouped: per query group, its query heads, one key, one value."""
    per_group = heads // groups
    grouped = qkv.reshape(groups, per_group + 2, head_dim, -1)
    hidden = qkv.shape[-1]
    q = grouped[:, :per_group].reshape(heads * head_dim, hidden)
    k = grouped[:, per_group].reshape(groups * head_dim, hidden)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, hidden)
    return q, k, v


def _read_norm(path: Path, prefix: str, local_name: str, te_fused: str) -> np.ndarray:
    """Local layers keep the norm apart; Transformer Engine fuses it into the next linear."""
    for name in (f"{prefix}.{local_name}.weight", f"{prefix}.{te_fused}.layer_norm_weight"):
        if (path / "model" / name).is_dir():
            return zarr.open_array(path / "model" / name, mode="r")[...]
    raise FileNotFoundError(f"{path}: no norm weight for {prefix}.{local_name}")


def hf_llama_config(model: dict, vocab_size: int, seq_length: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model["hidden_size"],
        "intermediate_size": model["ffn_hidden_size"],
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": model["num_attention_heads"],
        "num_key_value_heads": model["num_query_groups"] or model["num_attention_heads"],
        "head_dim": model["hidden_size"] // model["num_attention_heads"],
        "vocab_size": vocab_size,
        "max_position_embeddings": model["max_position_embeddings"] or seq_length,
        "rms_norm_eps": model["norm_epsilon"],
        "rope_theta": float(model["rotary_base"]),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }

"""The GPU check: what only a GPU shows (NCCL, bf16, Transformer Engine when present, MFU).

On this (networked) machine, gather the wheels a bare GPU machine with a CUDA torch lacks:

    python bench/gpu_check.py --download build/wheels

On the GPU machine (no network; carry build/wheels along), install and measure, in about
5 minutes on one H200:

    python bench/gpu_check.py --wheels build/wheels

It trains configs/llama-1b.yaml (the Llama-3.2-1B shape) on one GPU for a few dozen steps in
bf16 with NCCL, shrunk to fit: one rank, micro-batches of one 4,096-token sequence, 16 per
step, on a tokenizer trained on the Python standard library (8K vocabulary, so the output
layer is smaller than Llama's 128K). It runs once with a snapshot every step into a daemon and
once without, in turn, and prints a table, then one JSON line: tokens_per_s, mfu,
snapshot_throughput_ratio, peak_memory_gb.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS, SKIP = 30, 5
SETTINGS = [
    "parallel.dp=1",
    f"train.steps={STEPS}",
    "train.global_batch_tokens=65536",
    "train.micro_batch_size=1",
    "train.eval_interval=0",
    "train.log_interval=1",
    "checkpoint.interval=0",
    "snapshot.memory_mb=65536",
]


def download(wheels: Path) -> None:
    """Wheels of every dependency but torch (the GPU machine has a CUDA build) for Linux x86_64."""
    requirements = [
        line.split("#")[0].strip().strip('",')
        for line in (REPO / "pyproject.toml").read_text().split("dependencies = [", 1)[1].split("]", 1)[0].splitlines()
    ]
    wanted = [r for r in requirements if r and not r.startswith("torch")] + ["setuptools>=68", "wheel"]
    command = [sys.executable, "-m", "pip", "download", "--dest", str(wheels), "--only-binary=:all:"]
    command += ["--platform", "manylinux2014_x86_64", "--python-version", "3.11", *wanted]
    subprocess.run(command, check=True)


def install(wheels: Path) -> None:
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels)]
    subprocess.run([*pip, "--no-build-isolation", "-e", str(REPO)], check=True)


def stalwart(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "launcher.cli", *args], check=True, cwd=REPO, env=env)


def measure(run_dir: Path, snapshots: bool, data: Path) -> dict:
    overrides = [*SETTINGS, f"run.dir={run_dir}", f"data.path={data}", f"snapshot.interval={1 if snapshots else 0}"]
    stalwart("run", "configs/llama-1b.yaml", "--nproc", "1", *(f"--set={o}" for o in overrides))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][SKIP:]
    seconds = (records[-1]["time"] - records[0]["time"]) / (len(records) - 1)
    return {
        "tokens_per_s": 65536 / seconds,
        "mfu": statistics.median(r["mfu"] for r in records),
        "peak_memory_gb": max(r.get("peak_memory_gb", 0.0) for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--download", type=Path, help="gather the wheels into this folder (networked machine)")
    parser.add_argument("--wheels", type=Path, help="install from this folder first (the GPU machine)")
    args = parser.parse_args()
    if args.download:
        download(args.download)
        return
    if args.wheels:
        install(args.wheels)
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py needs a CUDA GPU")
    started = time.monotonic()
    data = REPO / "data" / "gpu-check"
    if not Path(f"{data}-meta.json").is_file():
        stalwart("data", "prepare", "stdlib", "--output", str(data), "--vocab-size", "8192")
    runs = {"plain": [], "snapshots": []}
    for name in ("plain", "snapshots", "snapshots", "plain"):  # in turn, so that drift weighs on both
        runs[name].append(measure(REPO / "runs" / f"gpu-check-{name}-{len(runs[name])}", name == "snapshots", data))
    plain = statistics.median(r["tokens_per_s"] for r in runs["plain"])
    snap = statistics.median(r["tokens_per_s"] for r in runs["snapshots"])
    results = {
        "gpu": torch.cuda.get_device_name(),
        "tokens_per_s": round(plain, 1),
        "mfu": round(statistics.median(r["mfu"] for r in runs["plain"]), 4),
        "snapshot_throughput_ratio": round(snap / plain, 4),
        "peak_memory_gb": round(max(r["peak_memory_gb"] for r in runs["plain"]), 2),
        "wall_s": round(time.monotonic() - started, 1),
    }
    for key, value in results.items():
        print(f"{key:<28}{value}")
    print(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()

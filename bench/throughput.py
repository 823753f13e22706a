"""Training throughput of the demo model on CPU under several layouts, and launch-to-first-step time.

usage: python bench/throughput.py [--quick]

Every layout trains the demo config's model for the same steps on the same data, side by
side in one run, on all of this machine's cores; the figures are ratios against TP1 so that
they compare across machines. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launcher.cli import quiet_megatron_fallback_warnings  # noqa: E402

quiet_megatron_fallback_warnings()
from trainer.config import load_config  # noqa: E402
from trainer.data import prepare_dataset, stdlib_source_dir  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402

CORES = os.cpu_count() or 1
# name -> (ranks, overrides). TP1 runs as one rank using every core.
LAYOUTS = {
    "tp1": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2": (2, []),
}


def prepare_data(workdir: Path, quick: bool) -> str:
    prefix = workdir / "stdlib"
    sources = [stdlib_source_dir() / d for d in ("email", "json", "logging", "asyncio")] if quick else ["stdlib"]
    prepare_dataset(sources, prefix, vocab_size=8192 if not quick else 2048, show_progress=True)
    return str(prefix)


def run_layout(name: str, ranks: int, overrides: list[str], common: list[str], workdir: Path) -> dict:
    run_dir = workdir / name
    sets = [*common, *overrides, f"run.dir={run_dir}", "parallel.dp=null"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command += ["-m", "trainer", str(REPO / "configs" / "demo.yaml")]
    for assignment in sets:
        command += ["--set", assignment]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, CORES // ranks)), "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    launched = time.time()
    subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True, timeout=900)
    records = read_metrics(run_dir / "metrics.jsonl")
    steady = records[3:]  # the first steps include lazy allocation and warm-up
    first = records[0]
    return {
        "ranks": ranks,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
        "launch_to_first_step_s": first["time"] - first["step_time_s"] - launched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, a smaller corpus")
    args = parser.parse_args()
    steps = 12 if args.quick else 40
    with tempfile.TemporaryDirectory(prefix="stalwart-bench-") as tmp:
        workdir = Path(tmp)
        data = prepare_data(workdir, args.quick)
        common = [f"data.path={data}", f"train.steps={steps}", "train.eval_interval=0", "run.progress=false"]
        load_config(REPO / "configs" / "demo.yaml", common).validate(world_size=2)
        results = {}
        for name, (ranks, overrides) in tqdm(LAYOUTS.items(), desc="layouts", unit="layout"):
            results[name] = run_layout(name, ranks, overrides, common, workdir)
    base = results["tp1"]["tokens_per_s"]
    print(f"\ndemo model, {steps} steps per layout, {CORES} cores")
    print(f"{'layout':<8}{'ranks':>6}{'tokens/s':>11}{'vs tp1':>8}{'step s':>9}{'launch->step 1 s':>18}")
    for name, r in results.items():
        print(
            f"{name:<8}{r['ranks']:>6}{r['tokens_per_s']:>11.0f}{r['tokens_per_s'] / base:>8.2f}"
            f"{r['step_time_s']:>9.3f}{r['launch_to_first_step_s']:>18.1f}"
        )
    summary = {
        "tokens_per_s": {name: round(r["tokens_per_s"], 1) for name, r in results.items()},
        "vs_tp1": {name: round(r["tokens_per_s"] / base, 3) for name, r in results.items()},
        "launch_to_first_step_s": {name: round(r["launch_to_first_step_s"], 2) for name, r in results.items()},
        "steps": steps,
        "cores": CORES,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Training throughput of the demo model on CPU under several layouts, and launch-to-first-step time.

usage: python bench/throughput.py [--quick]

Every layout trains the demo config's model for the same steps on the same data, side by
side in one run, on all of this machine's cores; the figures are ratios against TP1 so that
they compare across machines. Step times on a shared machine drift by 10-30% from minute to
minute, so the layouts run in several passes, each pass running every layout once in an order
rotated by one from the pass before: in full mode there are as many passes as layouts, so every
layout runs once in every position and a steady drift weighs on all of them alike. Figures are
medians over the passes, with their spread (min-max). Prints a table, then one JSON line.
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

from parallel.megatron_import import prepare_megatron_import  # noqa: E402

prepare_megatron_import()
from trainer.config import load_config  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402
from trainer.prepare import prepare_dataset, stdlib_source_dir  # noqa: E402

CORES = os.cpu_count() or 1
# name -> (ranks, overrides). TP1 runs as one rank using every core.
LAYOUTS = {
    "tp1": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2": (2, []),
}
# One pass per layout in full mode makes the rotated orders a Latin square: each layout runs once in
# each position. Quick mode only exercises the rotation; two passes are too few to balance a drift.
FULL_PASSES = len(LAYOUTS)
QUICK_PASSES = 2


def prepare_data(workdir: Path, quick: bool) -> str:
    prefix = workdir / "stdlib"
    sources = [stdlib_source_dir() / d for d in ("email", "json", "logging", "asyncio")] if quick else ["stdlib"]
    prepare_dataset(sources, prefix, vocab_size=8192 if not quick else 2048, show_progress=True)
    return str(prefix)


def run_layout(ranks: int, overrides: list[str], common: list[str], run_dir: Path) -> dict:
    """One launch of one layout: its steady tokens/s and step time, and launch to the first step."""
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
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
        "launch_to_first_step_s": first["time"] - first["step_time_s"] - launched,
    }


def pass_order(names: list[str], p: int) -> list[str]:
    """Pass p's order: the layouts rotated by p, so that no layout always runs first or last."""
    shift = p % len(names)
    return names[shift:] + names[:shift]


def run_passes(passes: int, common: list[str], workdir: Path) -> list[dict[str, dict]]:
    """Per pass, every layout's figures from one launch each."""
    names = list(LAYOUTS)
    runs: list[dict[str, dict]] = [{} for _ in range(passes)]
    with tqdm(total=passes * len(names), desc="runs", unit="run") as bar:
        for p in range(passes):
            for name in pass_order(names, p):
                ranks, overrides = LAYOUTS[name]
                runs[p][name] = run_layout(ranks, overrides, common, workdir / f"{name}-pass{p}")
                bar.update(1)
    return runs


def summarise(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Per layout: medians over the passes, their range, and the ratio to TP1 two ways.

    vs_tp1 divides the medians; vs_tp1_per_pass is the median of each pass's own ratio, which
    cancels a drift slower than one pass."""
    summary = {}
    for name, (ranks, _) in LAYOUTS.items():
        tokens = [run[name]["tokens_per_s"] for run in runs]
        steps = [run[name]["step_time_s"] for run in runs]
        per_pass = [run[name]["tokens_per_s"] / run["tp1"]["tokens_per_s"] for run in runs]
        summary[name] = {
            "ranks": ranks,
            "tokens_per_s": statistics.median(tokens),
            "tokens_per_s_range": (min(tokens), max(tokens)),
            "step_time_s": statistics.median(steps),
            "step_time_s_range": (min(steps), max(steps)),
            "vs_tp1_per_pass": statistics.median(per_pass),
            "launch_to_first_step_s": statistics.median(run[name]["launch_to_first_step_s"] for run in runs),
        }
    base = summary["tp1"]["tokens_per_s"]
    for figures in summary.values():
        figures["vs_tp1"] = figures["tokens_per_s"] / base
    return summary


def print_table(summary: dict[str, dict], steps: int, passes: int) -> None:
    print(f"\ndemo model, {steps} steps per run, {passes} passes over the layouts (order rotated), {CORES} cores")
    print("medians over the passes, with their min-max; vs tp1: ratio of the medians, and median of per-pass ratios")
    print(
        f"{'layout':<8}{'ranks':>6}{'tokens/s':>10}{'min-max':>13}{'vs tp1':>8}{'per pass':>9}"
        f"{'step s':>8}{'min-max':>13}{'launch->step 1 s':>18}"
    )
    for name, r in summary.items():
        low, high = r["tokens_per_s_range"]
        step_low, step_high = r["step_time_s_range"]
        print(
            f"{name:<8}{r['ranks']:>6}{r['tokens_per_s']:>10.0f}{f'{low:.0f}-{high:.0f}':>13}{r['vs_tp1']:>8.2f}"
            f"{r['vs_tp1_per_pass']:>9.2f}{r['step_time_s']:>8.3f}{f'{step_low:.3f}-{step_high:.3f}':>13}"
            f"{r['launch_to_first_step_s']:>18.1f}"
        )


def json_line(summary: dict[str, dict], steps: int, passes: int) -> str:
    def per_layout(key: str, digits: int) -> dict:
        return {name: round(r[key], digits) for name, r in summary.items()}

    def ranges(key: str, digits: int) -> dict:
        return {name: [round(v, digits) for v in r[key]] for name, r in summary.items()}

    return json.dumps(
        {
            "tokens_per_s": per_layout("tokens_per_s", 1),
            "tokens_per_s_range": ranges("tokens_per_s_range", 1),
            "vs_tp1": per_layout("vs_tp1", 3),
            "vs_tp1_per_pass": per_layout("vs_tp1_per_pass", 3),
            "step_time_s": per_layout("step_time_s", 4),
            "step_time_s_range": ranges("step_time_s_range", 4),
            "launch_to_first_step_s": per_layout("launch_to_first_step_s", 2),
            "steps": steps,
            "passes": passes,
            "cores": CORES,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and passes, a smaller corpus")
    args = parser.parse_args()
    steps = 12 if args.quick else 40
    passes = QUICK_PASSES if args.quick else FULL_PASSES
    with tempfile.TemporaryDirectory(prefix="stalwart-bench-") as tmp:
        workdir = Path(tmp)
        data = prepare_data(workdir, args.quick)
        common = [f"data.path={data}", f"train.steps={steps}", "train.eval_interval=0", "run.progress=false"]
        load_config(REPO / "configs" / "demo.yaml", common).validate(world_size=2)
        runs = run_passes(passes, common, workdir)
    summary = summarise(runs)
    print_table(summary, steps, passes)
    print(json_line(summary, steps, passes))


if __name__ == "__main__":
    main()

"""Lazy asynchronous universal checkpoints against synchronous saving, on CPU, side by side.

usage: python bench/checkpoint.py [--quick]

Two ranks train the demo model (TP1 x DP2) in one launch: runs without checkpoints and runs
with one every 10 steps, alternating (ABBA...); then the same state is saved synchronously,
and loaded on the same layout and on TP2. The distributed optimizer is off so that both
loads read the same state per rank (with it, each DP rank reads only the optimizer state it
owns). A second launch repeats the alternating runs with one rank, leaving a core spare for
the checkpoint path. Prints a table, then one JSON line with blocking_ratio,
throughput_ratio, reshard_load_ratio, staging_peak_vs_bound, throughput_ratio_spare_core.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launcher.cli import quiet_megatron_fallback_warnings  # noqa: E402

quiet_megatron_fallback_warnings()

INTERVAL = 10


def steady_seconds_per_step(records: list[dict], skip: int) -> float:
    """Wall time per step between the end of step `skip` and the end of the second-to-last step."""
    window = records[skip:-1]
    return (window[-1]["time"] - window[0]["time"]) / (len(window) - 1)


def mean_steady_step(runs: list[list[dict]]) -> float:
    return statistics.mean(steady_seconds_per_step(records, 3) for records in runs)


def blocking_per_checkpoint(records: list[dict], steps: int) -> list[float]:
    """What each checkpoint cost the loop: handing over at its step plus waiting before the next update."""
    return [
        r["checkpoint_blocked_s"] + nxt["checkpoint_blocked_s"]
        for r, nxt in zip(records, records[1:], strict=False)
        if r["step"] % INTERVAL == 0 and r["step"] < steps
    ]


def timed_loads(trainer, found, repeats: int = 3) -> float:
    """Median wall time of loading `found` into this trainer, every rank done."""
    import torch.distributed as dist

    trainer.checkpointer.engine.wait_written(60)  # its writer process is up and idle, not importing
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        trainer.checkpointer.load(found)
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(config_path: str, out: str, pairs: int, spare_core: bool = False) -> None:
    """Rank code: the measurements, in one process group."""
    import torch.distributed as dist

    from parallel.dims import init_distributed
    from trainer.config import load_config
    from trainer.loop import Trainer
    from trainer.metrics import read_metrics

    init_distributed(load_config(config_path).parallel)
    results: dict = {}

    def trainer(name: str, *sets: str) -> Trainer:
        return Trainer(load_config(config_path, [f"run.dir={Path(out) / name}", *sets]))

    def alternating_runs(*sets: str) -> dict[str, list[list[dict]]]:
        """Runs without and with checkpoints, in the order ABBA ABBA ..., so that a machine
        getting slower or faster over the bench weighs on both alike; their metrics."""
        runs: dict[str, list[list[dict]]] = {"plain": [], "async": []}
        for pair in range(pairs):
            order = ("plain", "async") if pair % 2 == 0 else ("async", "plain")
            for kind in order:
                name = f"{kind}{len(runs[kind])}{'_1rank' if spare_core else ''}"
                interval = INTERVAL if kind == "async" else 0
                run = trainer(name, f"checkpoint.interval={interval}", *sets)
                run.fit()
                run.close()
                runs[kind].append(read_metrics(Path(out) / name / "metrics.jsonl"))
        return runs

    if spare_core:  # one rank, one core left for staging and writing, as on a GPU node
        runs = alternating_runs("parallel.dp=null")
        (Path(out) / "spare_core.json").write_text(json.dumps({"plain1": runs["plain"], "async1": runs["async"]}))
        return
    runs = alternating_runs()
    async_run = trainer("async", f"checkpoint.interval={INTERVAL}")
    async_run.fit()
    results["staging_peak_bytes"] = async_run.checkpointer.staging_peak_bytes
    results["staging_bound_bytes"] = async_run.checkpointer.engine.ring.size
    dist.barrier()
    start = time.perf_counter()
    async_run.checkpointer.save(async_run.step + 1000, {"sampler": async_run.data.sampler.state_dict()})
    results["sync_save_s"] = time.perf_counter() - start
    found = async_run.checkpointer.find()
    async_run.close()
    # Both loads go into a freshly built trainer, one of the saving layout and one of another.
    for key, sets in (("load_same_layout_s", ()), ("load_other_layout_s", ("parallel.tp=2", "parallel.dp=null"))):
        fresh = trainer(key, *sets, "checkpoint.resume=false")
        results[key] = timed_loads(fresh, found)
        fresh.close()
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, results["staging_peak_bytes"])
    if dist.get_rank() == 0:
        results["staging_peak_bytes"] = max(peaks)
        results |= runs
        (Path(out) / "results.json").write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and a smaller corpus")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--spare-core", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, default=None, help="runs without and with checkpoints, each")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, pairs=args.pairs, spare_core=args.spare_core)
        return
    from tqdm import tqdm

    from trainer.data import prepare_dataset, stdlib_source_dir

    steps = 40 if args.quick else 60
    pairs = args.pairs or (2 if args.quick else 4)
    with tempfile.TemporaryDirectory(prefix="stalwart-bench-") as tmp:
        out = Path(tmp)
        with tqdm(total=3, desc="checkpoint bench", unit="phase") as bar:
            sources = (
                [stdlib_source_dir() / d for d in ("email", "json", "logging", "asyncio")] if args.quick else ["stdlib"]
            )
            prepare_dataset(sources, out / "data", vocab_size=2048 if args.quick else 8192, show_progress=False)
            bar.update(1)
            config = out / "config.yaml"
            demo = (REPO / "configs" / "demo.yaml").read_text()
            config.write_text(demo)
            sets = [f"data.path={out / 'data'}", f"train.steps={steps}", "train.eval_interval=0", "run.progress=false"]
            sets.append("parallel.distributed_optimizer=false")
            _run_worker(config, out, sets, ranks=2, pairs=pairs)
            bar.update(1)
            _run_worker(config, out, [], ranks=1, pairs=pairs)
            bar.update(1)
        results = json.loads((out / "results.json").read_text())
        results |= json.loads((out / "spare_core.json").read_text())
    report(results, steps)


def _run_worker(config: Path, out: Path, sets: list[str], ranks: int, pairs: int) -> None:
    # Overrides go into the config file: the worker reads it on every rank.
    import yaml

    from trainer.schema import apply_override

    raw = yaml.safe_load(config.read_text())
    for assignment in sets:
        apply_override(raw, assignment)
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command += [str(Path(__file__).resolve()), "--worker", str(config), str(out), f"--pairs={pairs}"]
    command += ["--spare-core"] if ranks == 1 else []
    subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True, timeout=1800)


def report(results: dict, steps: int) -> None:
    blocking_s = statistics.mean(b for run in results["async"] for b in blocking_per_checkpoint(run, steps))
    plain_step, ckpt_step = mean_steady_step(results["plain"]), mean_steady_step(results["async"])
    plain1_step, ckpt1_step = mean_steady_step(results["plain1"]), mean_steady_step(results["async1"])
    figures = {
        "blocking_ratio": blocking_s / results["sync_save_s"],
        "throughput_ratio": plain_step / ckpt_step,
        "reshard_load_ratio": results["load_other_layout_s"] / results["load_same_layout_s"],
        "staging_peak_vs_bound": results["staging_peak_bytes"] / results["staging_bound_bytes"],
        "throughput_ratio_spare_core": plain1_step / ckpt1_step,
    }
    pairs = len(results["plain"])
    print(f"\ndemo model, 2 ranks (TP1 x DP2), {pairs} runs of {steps} steps each way, checkpoint every {INTERVAL}")
    rows = [
        ("blocking per checkpoint, lazy async (s)", f"{blocking_s:.4f}", ""),
        ("synchronous save of the same state (s)", f"{results['sync_save_s']:.4f}", ""),
        ("  blocking_ratio", f"{figures['blocking_ratio']:.3f}", "target <= 0.05"),
        ("step time without checkpoints (s)", f"{plain_step:.4f}", ""),
        (f"step time with one every {INTERVAL} steps (s)", f"{ckpt_step:.4f}", ""),
        ("  throughput_ratio (both cores training)", f"{figures['throughput_ratio']:.3f}", "target >= 0.97"),
        ("step time, 1 rank + 1 spare core, none (s)", f"{plain1_step:.4f}", ""),
        (f"step time, 1 rank + 1 spare core, every {INTERVAL}", f"{ckpt1_step:.4f}", ""),
        ("  throughput_ratio_spare_core", f"{figures['throughput_ratio_spare_core']:.3f}", "target >= 0.97"),
        ("load on the same layout (s)", f"{results['load_same_layout_s']:.3f}", ""),
        ("load on TP2 (s)", f"{results['load_other_layout_s']:.3f}", ""),
        ("  reshard_load_ratio", f"{figures['reshard_load_ratio']:.3f}", "target <= 1.2"),
        (
            "staging peak / bound (MiB)",
            f"{results['staging_peak_bytes'] / 2**20:.1f} / {results['staging_bound_bytes'] / 2**20:.0f}",
            "",
        ),
        ("  staging_peak_vs_bound", f"{figures['staging_peak_vs_bound']:.3f}", "must be <= 1"),
    ]
    for name, value, target in rows:
        print(f"{name:<44}{value:>16}  {target}")
    print(json.dumps({key: round(value, 4) for key, value in figures.items()}))


if __name__ == "__main__":
    main()

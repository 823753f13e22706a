"""Planner-driven training steps against one sequence-parallel degree, measured; the cost model's
error on them; and the planner's latency at 64 and 512 ranks.

    python bench/sequence_parallel.py [--quick]

1. Measured, on 2 ranks with one core and one thread each (gloo): the long-context demo's model
   (configs/long-context.yaml: documents of up to 8,192 tokens, 4,096 per rank) on global
   batches of the Python standard library as documents. First a cost model is fitted on this
   machine from training steps of that same model (the trainer's attention module, forward,
   backward, gradient reduction and optimizer) on one document at a time, at (s, d) points.
   Then every batch trains under the planner's plan and under each single degree that holds
   the longest document, alternating (A B A B A B in the full run; the first method rotated from
   batch to batch) so that a drift of the machine weighs on every method alike; a method's time
   on a batch is the median of its runs. Methods whose plans are the same (the planner often
   returns the single degree's plan) run that step once for all of them. `measured_vs_static`
   is the planner's total step time over the best single degree's; `model_error_mean` the mean
   of |estimated - measured| / measured over the planner's steps.
2. Planner latency, wall time on one core (this process pinned to one): batches of 8 sequences
   per rank from the Wikipedia-like distribution clipped at 128K tokens, the H100 profile, at 64
   and 512 ranks; p50 and p99 against the plans' estimated step time.

Prints a table, then one JSON line.
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

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from parallel.config import PlannerConfig  # noqa: E402
from parallel.cost_model import load_profile  # noqa: E402
from parallel.plan import Cluster  # noqa: E402
from parallel.planner import plan_step  # noqa: E402
from parallel.workloads import wikipedia_batches  # noqa: E402

CONFIG = REPO / "configs" / "long-context.yaml"
SEED = 1234
LATENCY_BATCHES = {"quick": 5, "full": 20}


# -- 1. measured, inside each of the 2 ranks -----------------------------------------------------------------


def worker(dataset: str, batches: int, repeats: int, alternations: int, out: str) -> None:
    """Rank entry (under torchrun): fit the cost model, then time the plans of each batch."""
    from parallel.megatron_import import prepare_megatron_import

    prepare_megatron_import()
    import torch.distributed as dist

    from parallel.planner import homogeneous_plan
    from trainer.config import load_config
    from trainer.data import DocumentSamples, GlobalBatchSampler
    from trainer.step_profile import profile_training_steps, timed_step

    overrides = [f"data.path={dataset}"]
    step, dims, measurements, model = profile_training_steps(str(CONFIG), overrides, repeats < 3, repeats, "bench")
    config, dp = load_config(CONFIG, overrides), dims.dp
    samples = DocumentSamples(dataset, "train", config.train.longest_sample)
    cluster = Cluster(dp, dp, config.largest_sequence_group(dp))
    sampler = GlobalBatchSampler(len(samples), config.train.global_batch_tokens, SEED, costs=samples.costs)
    degrees = [d for d in cluster.group_sizes() if config.train.longest_sample <= d * config.train.micro_batch_tokens]
    rows = []
    for n in range(batches):
        batch = sampler.next_global_batch()
        lengths = samples.costs[batch]
        box = [plan_step(lengths, cluster, model, config.planner) if dims.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)  # every rank runs rank 0's plan
        methods = {"planner": box[0]} | {f"degree {d}": homogeneous_plan(lengths, cluster, model, d) for d in degrees}
        # Methods that plan the same groups run the same step: it is timed once for all of them, so
        # that the comparison holds only the differences of the plans, not two samples of the noise.
        distinct = list({methods[name].groups: name for name in reversed(methods)}.values())[::-1]
        read = lambda i, batch=batch: samples[int(batch[i])]  # noqa: E731
        rotated = distinct[n % len(distinct) :] + distinct[: n % len(distinct)]
        timings = {name: [] for name in distinct}
        for _ in range(alternations):  # A B A B ...: the machine's drift weighs on each alike
            for name in rotated:
                timings[name].append(timed_step(step, dims, methods[name].groups, read))
        same = {name: next(d for d in distinct if methods[d].groups == methods[name].groups) for name in methods}
        measured = {name: statistics.median(timings[same[name]]) for name in methods}
        rows.append(
            {
                "tokens": int(lengths.sum()),
                "groups": box[0].describe(),
                "estimated": {name: plan.estimated_time for name, plan in methods.items()},
                "measured": measured,
                "timings": timings,
            }
        )
        if dims.rank == 0:
            print(f"batch {n + 1}/{batches}: " + ", ".join(f"{k} {v:.2f} s" for k, v in measured.items()), flush=True)
    if dims.rank == 0:
        fitted = [m._asdict() for m in measurements]
        Path(out).write_text(json.dumps({"fit": fitted, "model": model.to_dict(), "rows": rows}))


def measure_on_two_ranks(dataset: str, quick: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix="stalwart-sp-")) / "result.json"
    batches, repeats, alternations = (4, 2, 1) if quick else (12, 3, 3)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__]
    command += ["--worker", dataset, str(batches), str(repeats), str(alternations), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    print(f"training {batches} batches under each method on 2 ranks (a minute or more per batch) ...", flush=True)
    subprocess.run(command, env=env, cwd=REPO, check=True, timeout=3600)
    return json.loads(out.read_text())


def stdlib_dataset() -> str:
    from trainer.prepare import prepare_dataset, stdlib_source_dir

    prefix = Path(tempfile.gettempdir()) / "stalwart-bench" / "stdlib"
    if not Path(f"{prefix}-meta.json").is_file():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prepare_dataset([stdlib_source_dir()], str(prefix), vocab_size=8192, valid_fraction=0.02, show_progress=True)
    return str(prefix)


# -- 2. planner latency -------------------------------------------------------------------------------------


def latency(ranks: int, count: int) -> dict:
    model, config = load_profile("h100-gpt7b"), PlannerConfig()
    cluster = Cluster(ranks, 8)
    seconds, estimated = [], []
    for lengths in tqdm(wikipedia_batches(count, 8 * ranks, 131072, SEED), desc=f"planning at {ranks} ranks"):
        began = time.perf_counter()
        plan = plan_step(lengths, cluster, model, config)
        seconds.append(time.perf_counter() - began)
        estimated.append(plan.estimated_time)
    return {
        "p50": float(np.percentile(seconds, 50)),
        "p99": float(np.percentile(seconds, 99)),
        "estimated_step": float(np.median(estimated)),
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer batches and fit points")
    args = parser.parse_args()
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # planner latency "on one core"
    count = LATENCY_BATCHES["quick" if args.quick else "full"]
    latencies = {ranks: latency(ranks, count) for ranks in (64, 512)}
    os.sched_setaffinity(0, cores)  # the 2 ranks need a core each
    measured = measure_on_two_ranks(stdlib_dataset(), args.quick)
    rows = measured["rows"]
    static_names = [k for k in rows[0]["measured"] if k != "planner"]
    total = {k: sum(r["measured"][k] for r in rows) for k in rows[0]["measured"]}
    best_static = min(static_names, key=total.get)
    errors = [abs(r["estimated"]["planner"] - r["measured"]["planner"]) / r["measured"]["planner"] for r in rows]
    signed = [(r["estimated"]["planner"] - r["measured"]["planner"]) / r["measured"]["planner"] for r in rows]

    print("\n| batch | tokens | planner's groups | planner est / measured s | " + " | ".join(static_names) + " |")
    print("|---|---|---|---|" + "---|" * len(static_names))
    for n, r in enumerate(rows):
        static = " | ".join(f"{r['estimated'][k]:.2f} / {r['measured'][k]:.2f}" for k in static_names)
        planner = f"{r['estimated']['planner']:.2f} / {r['measured']['planner']:.2f}"
        print(f"| {n + 1} | {r['tokens']:,} | {r['groups']} | {planner} | {static} |")
    others = ", ".join(f"{k} {total[k]:.1f} s" for k in static_names)
    print(f"\ntotal measured: planner {total['planner']:.1f} s; {others}")
    mean_error, mean_signed = statistics.mean(errors), statistics.mean(signed)
    print(f"cost model error on the planner's steps: mean |error| {mean_error:.1%}, mean {mean_signed:+.1%}")
    print("\n| ranks | planner latency p50 s | p99 s | estimated step s |\n|---|---|---|---|")
    for ranks, figures in latencies.items():
        print(f"| {ranks} | {figures['p50']:.3f} | {figures['p99']:.3f} | {figures['estimated_step']:.3f} |")
    result = {
        "measured_vs_static": total["planner"] / total[best_static],
        "best_static": best_static,
        "model_error_mean": mean_error,
        "model_error_signed_mean": mean_signed,
        "latency_p50_64_s": latencies[64]["p50"],
        "latency_p99_64_s": latencies[64]["p99"],
        "estimated_step_64_s": latencies[64]["estimated_step"],
        "latency_p50_512_s": latencies[512]["p50"],
        "latency_p99_512_s": latencies[512]["p99"],
        "estimated_step_512_s": latencies[512]["estimated_step"],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

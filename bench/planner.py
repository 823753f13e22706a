"""The sequence-sharding planner against its baselines, under one cost model, on the same batches.

    python bench/planner.py [--quick] [--profile h100-gpt7b] [--png bench/planner.png]

For 8, 64 and 256 ranks (8 per node), global batches of 8 sequences per rank are drawn with
fixed seeds from the Wikipedia-like length distribution clipped at 128K tokens (and, at 64
ranks, at 64K and 192K, and from the demo corpus). Each batch is planned by the planner, by
the best single degree for that batch, and by megatron-core's BalancedCPScheduler; the best
static degree is the one degree that is fastest over all of a row's batches. Ratios are the
planner's total step time over the baseline's (below 1: the planner is faster). Planner
latency is wall time on one core (this process is pinned to one). The gap is
(plan - proven lower bound) / plan. Last comes the profiler: a model fitted on this machine
and its error on held-out (s, d) points.

Prints a table, then one JSON line with the figures at 64 ranks, Wikipedia-like, 128K.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel.config import PlannerConfig  # noqa: E402
from parallel.cost_model import CostModel, load_profile  # noqa: E402
from parallel.plan import Cluster, check_plan  # noqa: E402
from parallel.plan_baselines import best_homogeneous, best_static, megatron_balanced_cp  # noqa: E402
from parallel.planner import plan_step  # noqa: E402
from parallel.workloads import clip_lengths, corpus_lengths, draw_batches, wikipedia_batches  # noqa: E402

SEED = 1234
PER_RANK = 8


@dataclass
class Row:
    ranks: int
    workload: str
    planner: list[float]
    static: list[float]
    static_degree: int
    homogeneous: list[float]
    megatron: list[float]
    latency: list[float]
    gap: list[float]

    def ratio(self, baseline: list[float]) -> float:
        return float(sum(self.planner) / sum(baseline))


def run_row(ranks: int, workload: str, clip: int, batches: list[np.ndarray], model: CostModel, bar) -> Row:
    cluster = Cluster(ranks, 8)
    config = PlannerConfig()
    row = Row(ranks, workload, [], [], 0, [], [], [], [])
    row.static_degree, row.static = best_static(batches, clip, cluster, model)
    for lengths in batches:
        began = time.perf_counter()
        plan = plan_step(lengths, cluster, model, config)
        row.latency.append(time.perf_counter() - began)
        check_plan(plan, lengths, cluster, model)
        row.planner.append(plan.estimated_time)
        row.gap.append(plan.gap)
        row.homogeneous.append(best_homogeneous(lengths, cluster, model).estimated_time)
        row.megatron.append(megatron_balanced_cp(lengths, cluster, model).estimated_time)
        bar.update(1)
    return row


def demo_corpus_lengths() -> np.ndarray:
    """Document lengths of the Python standard library, tokenised as `stalwart data prepare stdlib` does."""
    from trainer.data import prepare_dataset, stdlib_source_dir

    prefix = Path(tempfile.gettempdir()) / "stalwart-bench" / "stdlib"
    if not Path(f"{prefix}-meta.json").is_file():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prepare_dataset([stdlib_source_dir()], str(prefix), vocab_size=8192, valid_fraction=0.01, show_progress=True)
    return corpus_lengths(prefix)


def workloads(quick: bool) -> list[tuple[int, str, int, list[np.ndarray]]]:
    """(ranks, name, maximum length, batches) per row."""
    count = {8: 12, 64: 12, 256: 4} if quick else {8: 40, 64: 40, 256: 10}
    k64, k128 = 65536, 131072
    # 8 ranks of 8,192 tokens hold at most 64K tokens.
    rows = [(8, "wikipedia 64K", k64, wikipedia_batches(count[8], PER_RANK * 8, k64, SEED))]
    rows += [(r, "wikipedia 128K", k128, wikipedia_batches(count[r], PER_RANK * r, k128, SEED)) for r in (64, 256)]
    for clip in (65536, 196608):
        batches = wikipedia_batches(count[64], PER_RANK * 64, clip, SEED)
        rows.append((64, f"wikipedia {clip // 1024}K", clip, batches))
    if not quick:
        pool = demo_corpus_lengths()
        batches = [clip_lengths(b, k128) for b in draw_batches(pool, count[64], PER_RANK * 64, SEED)]
        rows.append((64, "demo corpus 128K", k128, batches))
    return rows


def profile_error(quick: bool) -> tuple[float, float]:
    """Mean and largest relative error of a model fitted on this machine, on (s, d) points it did not see."""
    from parallel import profiler

    if quick:
        points = profiler.QUICK_FIT_POINTS, profiler.QUICK_HELD_OUT_POINTS, profiler.QUICK_REPEATS
    else:
        points = profiler.FIT_POINTS, profiler.HELD_OUT_POINTS, profiler.REPEATS
    _, _, held_out = profiler.profile_machine(None, *points, progress=True)
    return profiler.error_summary(held_out)


def print_table(rows: list[Row]) -> None:
    print(
        f"{'ranks':>5}  {'workload':<17}{'planner s':>10}{'vs static':>15}{'vs homog.':>10}{'vs megatron':>12}"
        f"{'p50 s':>7}{'p99 s':>7}{'gap mean':>9}{'gap max':>8}"
    )
    for r in rows:
        static = f"{r.ratio(r.static):.3f} (d={r.static_degree})"
        print(
            f"{r.ranks:>5}  {r.workload:<17}{np.mean(r.planner):>10.3f}{static:>15}{r.ratio(r.homogeneous):>10.3f}"
            f"{r.ratio(r.megatron):>12.3f}{np.percentile(r.latency, 50):>7.2f}{np.percentile(r.latency, 99):>7.2f}"
            f"{np.mean(r.gap):>9.1%}{np.max(r.gap):>8.1%}"
        )


def draw(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.5))
    names = [f"{r.ranks} ranks\n{r.workload}" for r in rows]
    x = np.arange(len(rows))
    for offset, (label, pick) in enumerate(
        [
            ("vs best static", lambda r: r.static),
            ("vs best per-batch degree", lambda r: r.homogeneous),
            ("vs megatron BalancedCP", lambda r: r.megatron),
        ]
    ):
        axes.bar(x + (offset - 1) * 0.27, [r.ratio(pick(r)) for r in rows], width=0.27, label=label)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.axhline(0.72, color="crimson", linestyle="--", linewidth=0.8, label="target vs static (0.72)")
    axes.set_xticks(x, names, fontsize=7)
    axes.set_ylabel("planner step time / baseline's")
    axes.set_title("Sequence-sharding planner: step time relative to the baselines (lower is better)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer batches, a quick profile, no corpus row")
    parser.add_argument("--profile", default="h100-gpt7b", help="cost-model profile the step times come from")
    parser.add_argument("--png", default=str(Path(__file__).with_suffix(".png")), help="where to draw the ratios")
    args = parser.parse_args()
    model = load_profile(args.profile)
    plans = workloads(args.quick)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # planner latency "on one core"
    rows = []
    with tqdm(total=sum(len(b) for *_, b in plans), desc="planning", unit="batch") as bar:
        for ranks, name, clip, batches in plans:
            rows.append(run_row(ranks, name, clip, batches, model, bar))
    os.sched_setaffinity(0, cores)  # the profiler's ranks need a core each
    error_mean, error_max = profile_error(args.quick)
    print_table(rows)
    print(f"profiler on this machine: held-out error mean {error_mean:.1%}, max {error_max:.1%}")
    draw(rows, args.png)
    print(f"wrote {args.png}")
    main_row = next(r for r in rows if r.ranks == 64 and r.workload == "wikipedia 128K")
    figures = {
        "vs_static": round(main_row.ratio(main_row.static), 4),
        "vs_homogeneous": round(main_row.ratio(main_row.homogeneous), 4),
        "vs_megatron": round(main_row.ratio(main_row.megatron), 4),
        "latency_p50_s": round(float(np.percentile(main_row.latency, 50)), 3),
        "latency_p99_s": round(float(np.percentile(main_row.latency, 99)), 3),
        "gap": round(float(np.mean(main_row.gap)), 4),
        "gap_max": round(float(np.max(main_row.gap)), 4),
        "profile_error": round(error_mean, 4),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

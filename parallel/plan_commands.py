"""`stalwart plan`: plan one step's batch and show why it takes as long as it does.

    stalwart plan --lengths FILE --ranks 64                 # one length per line, or a JSON list
    stalwart plan --corpus data/stdlib --ranks 64 --sequences 512 --clip 131072
    stalwart plan --workload wikipedia --ranks 64 --png plan.png --baselines
    stalwart plan --run runs/long-context                    # a run's plans: estimated against measured

Prints the groups (ranks, size, whether they span nodes, micro-batches, sequences, time), then
the step's estimate, the proven lower bound, the imbalance and, with --baselines, what one
sequence-parallel degree and megatron-core's BalancedCPScheduler would take on the same batch.
With --run, the planned steps of a run instead: each step's groups, the plan's estimate, the
measured step time and the estimate's error, so that a cost model that is wrong shows.
Exit codes: 0 planned, 2 bad input (named on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import numpy as np

from parallel.config import PlannerConfig
from parallel.cost_model import CostModel, ProfileError, load_profile
from parallel.plan import Cluster, Plan, PlanError, group_time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--lengths", metavar="FILE", help="sequence lengths: one per line, or a JSON list")
    source.add_argument("--corpus", metavar="DATASET", help="draw documents from a `stalwart data prepare` dataset")
    source.add_argument("--workload", choices=["wikipedia"], help="draw from a synthetic length distribution")
    source.add_argument("--run", metavar="RUN_DIR", help="a run's planned steps: estimated against measured")
    parser.add_argument("--ranks", type=int, help="data-parallel ranks to split into groups (not with --run)")
    parser.add_argument("--ranks-per-node", type=int, default=PlannerConfig.ranks_per_node)
    parser.add_argument("--profile", default=PlannerConfig.profile, help="cost-model profile: a file or a name")
    parser.add_argument("--tokens-per-rank", type=int, help="memory per rank in tokens (default: the profile's)")
    parser.add_argument("--time-limit", type=float, default=PlannerConfig.time_limit_s, help="seconds to plan")
    parser.add_argument("--sequences", type=int, default=512, help="batch size drawn from --corpus/--workload")
    parser.add_argument("--clip", type=int, help="cut longer sequences to this many tokens (the model's maximum)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn batch")
    parser.add_argument("--png", metavar="FILE", help="also draw the plan: groups over ranks against time")
    parser.add_argument("--baselines", action="store_true", help="also score one degree and megatron's scheduler")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from parallel.planner import plan_step
    from parallel.workloads import WorkloadError

    if args.run:
        return show_run(args.run, args.json)
    try:
        if args.ranks is None:
            raise PlanError("--ranks is required to plan a batch")
        config = PlannerConfig(
            profile=args.profile,
            tokens_per_rank=args.tokens_per_rank,
            ranks_per_node=args.ranks_per_node,
            time_limit_s=args.time_limit,
        )
        config.validate()
        model = load_profile(config.profile)
        if config.tokens_per_rank is not None:
            model = model.with_capacity(config.tokens_per_rank)
        cluster = Cluster(args.ranks, config.ranks_per_node)
        lengths = _batch(args)
        plan = plan_step(lengths, cluster, model, config)
    except (PlanError, ProfileError, WorkloadError, ValueError) as e:
        print(f"stalwart plan: error: {e}", file=sys.stderr)
        return 2
    baselines = _baselines(lengths, cluster, model) if args.baselines else []
    if args.json:
        print(json.dumps({"plan": asdict(plan), "gap": plan.gap, "baselines": [asdict(b) for b in baselines]}))
    else:
        print(plan_table(plan, lengths, cluster, model))
        for b in baselines:
            ratio = plan.estimated_time / b.estimated_time
            print(f"{b.name:<12} {b.estimated_time:9.3f} s  ({b.detail}): the plan takes {ratio:.2f}x")
    if args.png:
        draw_plan(plan, lengths, cluster, model, args.png)
        print(f"wrote {args.png}")
    return 0


def show_run(run_dir: str, as_json: bool) -> int:
    """The planner's estimate against the measured time of each planned step of a run."""
    from pathlib import Path

    from trainer.metrics import planned_steps, read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        print(f"stalwart plan: error: {path} does not exist: is {run_dir} a run directory?", file=sys.stderr)
        return 2
    records = read_metrics(path)
    steps = planned_steps(records)
    if not steps:
        print(f"stalwart plan: error: {path} has no planned steps (planner.enabled was off?)", file=sys.stderr)
        return 2
    groups = {r["step"]: r["plan_groups"] for r in records if "plan_groups" in r}
    rows = [
        {"step": s, "groups": groups.get(s, ""), "estimated_s": e, "measured_s": m, "error": (e - m) / m}
        for s, e, m in steps
    ]
    if as_json:
        print(json.dumps(rows))
        return 0
    print(f"{'step':>6}  {'groups':<24}{'estimated s':>12}{'measured s':>12}{'error':>9}")
    for r in rows:
        print(f"{r['step']:>6}  {r['groups']:<24}{r['estimated_s']:>12.3f}{r['measured_s']:>12.3f}{r['error']:>+9.0%}")
    errors = [r["error"] for r in rows]
    print(
        f"\n{len(rows)} planned steps (each attempt's first left out): the estimate is off by "
        f"{sum(errors) / len(errors):+.0%} on average, {sum(map(abs, errors)) / len(errors):.0%} in absolute value"
    )
    return 0


def _batch(args: argparse.Namespace) -> np.ndarray:
    from parallel.workloads import clip_lengths, corpus_lengths, draw_batches, read_lengths_file, workload_lengths

    if args.lengths:
        return clip_lengths(read_lengths_file(args.lengths), args.clip)
    if args.sequences < 1:
        raise PlanError(f"--sequences must be >= 1, got {args.sequences}")
    if args.corpus:
        pool = corpus_lengths(args.corpus)
        return clip_lengths(draw_batches(pool, 1, args.sequences, args.seed)[0], args.clip)
    return workload_lengths(args.workload, args.clip, args.sequences, args.seed)


def _baselines(lengths: np.ndarray, cluster: Cluster, model: CostModel):
    from parallel.plan_baselines import best_homogeneous, megatron_balanced_cp

    return [best_homogeneous(lengths, cluster, model), megatron_balanced_cp(lengths, cluster, model)]


def plan_table(plan: Plan, lengths: np.ndarray, cluster: Cluster, model: CostModel) -> str:
    """The plan as text: a row per group, then the step's figures."""
    rows = [
        f"{'round':<6}{'ranks':<11}{'size':>5}  {'nodes':<6}{'mbs':>4}{'seqs':>6}{'tokens':>10}  "
        f"{'longest':<22}{'time s':>8}"
    ]
    times = [group_time(g, lengths, model, cluster) for g in plan.groups]
    slowest: dict[int, float] = {}  # per round
    for g, t in zip(plan.groups, times, strict=True):
        slowest[g.round] = max(slowest.get(g.round, 0.0), t)
    for g, t in zip(plan.groups, times, strict=True):
        longest = sorted((int(lengths[i]) for i in g.sequences), reverse=True)[:3]
        spans = "spans" if cluster.crosses_nodes(g.start, g.size) else "one"
        ranks = f"{g.start}-{g.start + g.size - 1}" if g.size > 1 else f"{g.start}"
        tokens = sum(int(lengths[i]) for i in g.sequences)
        rows.append(
            f"{g.round + 1:<6}{ranks:<11}{g.size:>5}  {spans:<6}{len(g.microbatches):>4}{len(g.sequences):>6}"
            f"{tokens:>10,}  {', '.join(f'{s:,}' for s in longest):<22}{t:>8.3f}"
            + ("  <- slowest" if t == slowest[g.round] else "")
        )
    busy = sum(t * g.size for g, t in zip(plan.groups, times, strict=True)) / (cluster.ranks * plan.estimated_time)
    rows += [
        "",
        f"{len(lengths)} sequences, {int(lengths.sum()):,} tokens on {cluster.ranks} ranks "
        f"({cluster.ranks_per_node} per node, {model.tokens_per_rank:,} tokens per rank, profile {model.name})",
        f"step estimate {plan.estimated_time:.3f} s; proven lower bound {plan.lower_bound:.3f} s "
        f"(gap {plan.gap:.1%}); ranks busy {busy:.0%} of the step; {plan.method}, "
        f"first plan in {plan.first_plan_seconds:.2f} s, final plan in {plan.solve_seconds:.2f} s",
    ]
    return "\n".join(rows)


def _round_starts(plan: Plan, lengths: np.ndarray, cluster: Cluster, model: CostModel) -> dict[int, float]:
    """When each round begins: after the slowest group of every round before it."""
    starts, t = {}, 0.0
    for groups in plan.rounds:
        starts[groups[0].round] = t
        t += max(group_time(g, lengths, model, cluster) for g in groups)
    return starts


def draw_plan(plan: Plan, lengths: np.ndarray, cluster: Cluster, model: CostModel, path: str) -> None:
    """A Gantt-like chart: each group a band of its ranks, its sequences laid end to end in time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    norm = colors.LogNorm(vmin=max(1, int(lengths.min())), vmax=max(2, int(lengths.max())))
    figure, axes = plt.subplots(figsize=(11, max(3.5, min(14, cluster.ranks * 0.09 + 2))))
    round_starts = _round_starts(plan, lengths, cluster, model)
    for g in plan.groups:
        cross = cluster.crosses_nodes(g.start, g.size)
        t = round_starts[g.round]
        for mb in g.microbatches:
            for i in mb:
                width = model.time(float(lengths[i]), g.size, cross)
                axes.barh(
                    g.start,
                    width,
                    height=g.size * 0.92,
                    left=t,
                    align="edge",
                    color=cm.viridis(norm(int(lengths[i]))),
                    edgecolor="white",
                    linewidth=0.3,
                )
                t += width
            axes.barh(g.start, model.microbatch_overhead, height=g.size * 0.92, left=t, align="edge", color="0.75")
            t += model.microbatch_overhead
        axes.text(t, g.start + g.size * 0.46, f" {g.size}", va="center", fontsize=7)
    axes.axvline(plan.lower_bound, color="crimson", linestyle="--", linewidth=1, label="proven lower bound")
    axes.axvline(plan.estimated_time, color="black", linewidth=1, label="step estimate")
    for node in range(cluster.ranks_per_node, cluster.ranks, cluster.ranks_per_node):
        axes.axhline(node, color="0.85", linewidth=0.5, zorder=0)
    axes.set_ylim(cluster.ranks, 0)
    axes.set_xlabel("seconds (cost model)")
    axes.set_ylabel("rank (a bar spans its group's ranks; grey: micro-batch overhead)")
    axes.set_title(
        f"{len(lengths)} sequences on {cluster.ranks} ranks: {plan.estimated_time:.3f} s, gap {plan.gap:.1%}"
    )
    figure.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes, label="sequence length (tokens)")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """`stalwart plan-profile`: its arguments live here so that parsing them does not import torch."""
    parser.add_argument("--out", required=True, help="where to write the fitted profile (YAML)")
    parser.add_argument(
        "--quick", action="store_true", help="fewer and shorter points, fewer repeats (about 15 s on 2 cores)"
    )
    parser.add_argument(
        "--tokens-per-rank", type=int, default=None, help="tokens one rank can hold (default: the most it measured)"
    )
    parser.add_argument("--description", default=None, help="a line about the machine, kept in the profile's notes")
    parser.add_argument(
        "--config",
        help="time training steps of this run config's own model (its layers, attention over documents, "
        "optimizer) instead of the generic layer stack; tokens per rank come from the config",
    )
    parser.add_argument("--ranks", type=int, default=2, help="with --config: ranks to time on, one core each")


def run_profile(args: argparse.Namespace) -> int:
    if args.config:
        return _profile_training_steps(args)
    from parallel.profiler import run_profile

    return run_profile(args)


def _profile_training_steps(args: argparse.Namespace) -> int:
    """trainer/step_profile.py on `--ranks` ranks, one thread each."""
    import os
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}"]
    command += ["-m", "trainer.step_profile", args.config, args.out] + (["--quick"] if args.quick else [])
    # As `stalwart run` starts its ranks: megatron-core's warnings that Apex and TE are absent say nothing on CPU.
    env = {"PYTHONWARNINGS": "ignore", **os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env).returncode

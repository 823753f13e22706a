"""The `stalwart` command: a thin layer that parses arguments and calls plain functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from parallel.megatron_import import quiet_fallback_warnings
from trainer.schema import ConfigError


def cmd_run(args: argparse.Namespace) -> int:
    from launcher.local import launch_local, prepare_missing_dataset
    from trainer.config import load_config

    config = load_config(args.config, args.overrides)
    nproc = args.nproc or config.parallel.tp * config.parallel.pp * (config.parallel.dp or 1)
    config.validate(world_size=nproc)
    if args.nodes < 1 or nproc % args.nodes:
        raise ConfigError("--nodes", f"{args.nodes} emulated nodes must be >= 1 and divide the {nproc} ranks")
    if args.nodes > 1 and args.nodes <= config.snapshot.parity:
        raise ConfigError("snapshot.parity", f"{config.snapshot.parity} needs more than {args.nodes} nodes")
    prepare_missing_dataset(config)
    return launch_local(config, args.config, args.overrides, nproc, args.nodes)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from trainer.prepare import prepare_dataset

    info = prepare_dataset(
        args.sources,
        args.output,
        tokenizer_path=Path(args.tokenizer) if args.tokenizer else None,
        vocab_size=args.vocab_size,
        valid_fraction=args.valid_fraction,
        seed=args.seed,
    )
    print(
        f"wrote {args.output}-{{train,valid}}.bin/.idx: {info.documents['train']} + {info.documents['valid']} "
        f"documents, {info.tokens['train']:,} + {info.tokens['valid']:,} tokens, vocabulary {info.vocab_size}"
    )
    return 0


def _missing(path: str, what: str) -> int | None:
    """Exit code 2 with one line when an operator names a path that is not there."""
    if Path(path).is_dir():
        return None
    print(f"stalwart: error: {path}: no such {what}", file=sys.stderr)
    return 2


def cmd_ckpt_ls(args: argparse.Namespace) -> int:
    from checkpoint.commands import list_checkpoints

    if (code := _missing(args.run_dir, "run or checkpoints directory")) is not None:
        return code
    rows = list_checkpoints(Path(args.run_dir))
    if args.json:
        print(json.dumps([vars(r) for r in rows], indent=1))
        return 0
    print(f"{'checkpoint':<16}{'step':>8}{'size MB':>10}  {'layout':<24}status")
    for r in rows:
        marker = "  <- latest" if r.latest else ""
        print(f"{r.name:<16}{r.step:>8}{r.size_bytes / 1e6:>10.1f}  {r.layout:<24}{r.status}{marker}")
    return 0


def cmd_ckpt_inspect(args: argparse.Namespace) -> int:
    from checkpoint.commands import inspect_checkpoint, layout_text

    if (code := _missing(args.path, "checkpoint directory")) is not None:
        return code
    info = inspect_checkpoint(Path(args.path))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    state = info["state"]
    saved_at = layout_text(state["layout"])
    print(f"{info['path']}: step {state['step']}, {state['consumed_tokens']:,} tokens, saved at {saved_at}")
    print(f"{'tensor':<64}{'shape':<20}{'dtype':<9}{'tp dim':>7}")
    for t in info["tensors"]:
        tp_dim = t["attributes"].get("layout", {}).get("tp_dim")
        print(f"{t['name']:<64}{'x'.join(map(str, t['shape'])):<20}{t['dtype']:<9}{str(tp_dim):>7}")
    return 0


def cmd_ckpt_verify(args: argparse.Namespace) -> int:
    from checkpoint.commands import verify_checkpoint

    problems = verify_checkpoint(Path(args.path))
    for problem in problems:
        print(problem)
    print(f"{args.path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def cmd_ckpt_export_hf(args: argparse.Namespace) -> int:
    from checkpoint.commands import export_hf

    print(f"wrote {export_hf(Path(args.path), Path(args.out))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stalwart", description="Fault-tolerant pre-training on megatron-core.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train from a YAML config on this machine (torchrun)")
    run.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    run.add_argument("--nproc", type=int, default=None, help="ranks to start (default: tp x pp x dp from the config)")
    run.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="emulated nodes: one snapshot daemon each, with an equal share of the ranks, erasure-coding "
        "across each other (default 1)",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=50 (repeatable)",
    )
    run.set_defaults(func=cmd_run)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser("prepare", help="tokenise text/JSONL files into Megatron indexed datasets")
    prepare.add_argument("sources", nargs="+", help='files or directories (.txt, .jsonl with "text", ...), or "stdlib"')
    prepare.add_argument("--output", required=True, help="output prefix, e.g. data/mycorpus")
    prepare.add_argument("--tokenizer", help="an existing tokenizer.json (default: train a byte-level BPE)")
    prepare.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of a trained tokenizer")
    prepare.add_argument("--valid-fraction", type=float, default=0.01, help="share of documents held out")
    prepare.add_argument("--seed", type=int, default=1234)
    prepare.set_defaults(func=cmd_data_prepare)

    ckpt = commands.add_parser("ckpt", help="universal checkpoints").add_subparsers(dest="ckpt_command", required=True)
    ls = ckpt.add_parser("ls", help="list a run's checkpoints: step, size, complete or not, layout")
    ls.add_argument("run_dir", help="run directory (or its checkpoints/ directory)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ckpt_ls)
    inspect = ckpt.add_parser("inspect", help="tensors, shapes, dtypes and metadata of one checkpoint")
    inspect.add_argument("path", help="a checkpoint directory, e.g. runs/demo/checkpoints/step_000000300")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_ckpt_inspect)
    verify = ckpt.add_parser("verify", help="check every chunk once: coverage and checksums (exit 1 on problems)")
    verify.add_argument("path")
    verify.set_defaults(func=cmd_ckpt_verify)
    export = ckpt.add_parser("export-hf", help="write the weights as a Hugging Face Llama checkpoint")
    export.add_argument("path")
    export.add_argument("out")
    export.set_defaults(func=cmd_ckpt_export_hf)

    from checkpoint import daemon

    serve = commands.add_parser("daemon", help="run this node's in-memory snapshot daemon (gRPC)")
    daemon.add_arguments(serve)
    serve.set_defaults(func=daemon.run)

    from checkpoint import snapshot_commands

    snapshot = commands.add_parser("snapshot", help="the job's snapshot daemons: status, ls, verify, rebuild, ...")
    snapshot_commands.add_arguments(snapshot)
    snapshot.set_defaults(func=snapshot_commands.run)

    from parallel import plan_commands

    plan = commands.add_parser("plan", help="plan one step's sequence-parallel groups and show the plan (table, PNG)")
    plan_commands.add_arguments(plan)
    plan.set_defaults(func=plan_commands.run)
    profile = commands.add_parser(
        "plan-profile", help="fit the planner's cost model on this machine (real kernels, gloo all-to-all)"
    )
    plan_commands.add_profile_arguments(profile)
    profile.set_defaults(func=plan_commands.run_profile)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_fallback_warnings()
    from trainer.errors import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        print(f"stalwart: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

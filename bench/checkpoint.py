"""Lazy asynchronous universal checkpoints against synchronous saving, on CPU, side by side.

usage: python bench/checkpoint.py [--quick]

Two ranks train the demo model (TP1 x DP2) in one launch: runs without checkpoints and runs
with one every 10 steps, alternating (ABBA...). Then the same state is saved synchronously,
alternating two ways: through the asynchronous machinery waited on, and by a plain
in-process save of the same chunks at normal priority. A TP2 trainer then loads that TP1
save and a TP2 save of the same state, alternating. The distributed optimizer is off so
that every load reads the same state per rank. A second launch repeats the alternating
runs with one rank, leaving a core spare for the checkpoint path. Prints a table, then one
JSON line with blocking_vs_plain_save, blocking_ratio, async_save_waited_vs_plain_save,
throughput_ratio, throughput_ratio_spare_core, reshard_load_vs_native,
reshard_decoded_bytes_ratio, staging_ring_use.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from parallel.megatron_import import prepare_megatron_import  # noqa: E402

prepare_megatron_import()

INTERVAL = 10
LOAD_REPEATS = 12
"""Loads of each kind. Loading the demo model takes a fraction of a second, about as much as
this shared machine's noise, so many are needed, and they cost little."""


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


def timed(fn: Callable[[], object]) -> float:
    """Wall time of `fn` on every rank: from a barrier until every rank is done."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def medians_alternating(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each run `repeats` times in the order ABBA ABBA ..., so that a machine getting slower or
    faster weighs on every run alike; the median of the seconds each run returns."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            times[name].append(runs[name]())
    return {name: statistics.median(values) for name, values in times.items()}


def plain_save(ckpt, root: Path, step: int, run_state: dict) -> None:
    """The checkpoint Checkpointer.save() makes, made by this process at normal priority: the
    same metadata, chunks, RNG file, markers, commit and retention (through the same
    functions), with barriers in place of the writer process, its pipes, its idle priority
    and its polls."""
    import torch
    import torch.distributed as dist

    from checkpoint.layout import chunks_of
    from checkpoint.state import rng_state
    from checkpoint.universal import commit, create_arrays
    from checkpoint.writer import FinishStep, apply_retention, finish_step, rank_markers, write_chunk_file

    dims = ckpt.dims
    ckpt._prepare(root, step, run_state)  # rank 0: the root group and state.json
    dist.barrier(ckpt.group)
    create_arrays(root, ckpt.state.arrays_this_rank_creates(), dims.tp)
    written: dict[str, list[str]] = {}
    with torch.no_grad():
        for piece in ckpt.state.pieces():
            if piece.writes:
                cut = chunks_of(piece.name, piece.layout, piece.local, dims.tp_rank, dims.tp)
                for array, chunks, region, values in cut:
                    pairs = tuple((s.start, s.stop) for s in region)
                    key = write_chunk_file(
                        root / array, pairs, chunks, values.detach().to("cpu", torch.float32).numpy()
                    )
                    written.setdefault(array, []).append(key)
    rng = rng_state()
    finish = FinishStep(
        str(root), step, dims.rank, dims.world_size, rng, commit=False, keep=1, keep_every=None, timeout_s=60
    )
    finish_step(finish, written)  # the RNG file, the directories' fsyncs, this rank's marker
    dist.barrier(ckpt.group)
    if dims.rank == 0:
        commit(root.parent, root, rank_markers(root / "done", dims.world_size), step)
        apply_retention(root.parent, ckpt.config.keep, ckpt.config.keep_every)
    dist.barrier(ckpt.group)


def assert_same_chunks(plain: Path, machinery: Path) -> None:
    """The plain save wrote the very chunk files the writer processes wrote."""
    arrays = json.loads((plain / "manifest.json").read_text())["arrays"]
    assert arrays == json.loads((machinery / "manifest.json").read_text())["arrays"], "the saves' arrays differ"
    for name, keys in arrays.items():
        for key in keys:
            assert (plain / name / key).read_bytes() == (machinery / name / key).read_bytes(), f"{name}/{key} differs"


def save_times(run, plain_dir: Path, repeats: int) -> dict:
    """Median seconds of saving `run`'s state through the asynchronous machinery waited on,
    and by the plain in-process save, alternating."""
    import torch.distributed as dist

    from checkpoint.universal import find_resume_checkpoint, step_dir_name

    ckpt, steps = run.checkpointer, itertools.count(run.step + 1000)

    def machinery() -> float:
        run.run.step = next(steps)  # each save a step of its own
        return timed(ckpt.save)

    def plain() -> float:
        run.run.step = step = next(steps)
        return timed(lambda: plain_save(ckpt, plain_dir / step_dir_name(step), step, run.run.state_dict()))

    seconds = medians_alternating({"async_save_waited_s": machinery, "plain_save_s": plain}, repeats)
    if dist.get_rank() == 0:
        assert_same_chunks(find_resume_checkpoint(plain_dir).path, ckpt.find().path)
    return seconds


def decoded_bytes(save: Path, tp: int) -> int:
    """Chunk bytes the TP ranks of a `tp`-way load decode from `save`, all ranks together: a
    rank decodes every chunk its piece touches, whole, whatever part of it the rank keeps.
    Vocabulary padding arrays (a few rows) are left out."""
    from checkpoint.layout import TensorLayout, tp_regions

    total = 0
    for name in json.loads((save / "manifest.json").read_text())["arrays"]:
        meta = json.loads((save / name / "zarr.json").read_text())
        if "layout" not in meta["attributes"]:
            continue
        layout = TensorLayout.from_attrs(meta["attributes"]["layout"])
        chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
        for tp_rank in range(tp):
            for region, _ in tp_regions(layout, tp_rank, tp):
                touched = math.prod(-(-s.stop // c) - s.start // c for s, c in zip(region, chunks, strict=True))
                total += touched * 4 * math.prod(chunks)
    return total


def reshard_load_times(tp2, tp1_save, repeats: int) -> dict:
    """Median seconds of a TP2 trainer loading the TP1 save and loading a TP2 save of the same
    state, alternating, and the chunk bytes each load decodes."""
    ckpt = tp2.checkpointer
    ckpt.engine.wait_written(60)  # its writer process is up and idle, not importing
    ckpt.load(tp1_save)  # the same state, then saved by TP2
    ckpt.save()
    tp2_save = ckpt.find()
    loads = {
        "load_tp1_save_s": lambda: timed(lambda: ckpt.load(tp1_save)),
        "load_tp2_save_s": lambda: timed(lambda: ckpt.load(tp2_save)),
    }
    seconds = medians_alternating(loads, repeats)
    decoded = {
        f"decoded_{name}_bytes": decoded_bytes(found.path, 2)
        for name, found in (("tp1_save", tp1_save), ("tp2_save", tp2_save))
    }
    return seconds | decoded


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
    results["staging_ring_bytes"] = async_run.checkpointer.engine.ring.size
    results |= save_times(async_run, Path(out) / "plain_saves", repeats=2 * pairs)
    tp1_save = async_run.checkpointer.find()
    async_run.close()
    tp2 = trainer("load_tp2", "parallel.tp=2", "parallel.dp=null", "checkpoint.resume=false")
    results |= reshard_load_times(tp2, tp1_save, repeats=LOAD_REPEATS)
    tp2.close()
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

    from trainer.prepare import prepare_dataset, stdlib_source_dir

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
    waited_s, plain_save_s = results["async_save_waited_s"], results["plain_save_s"]
    figures = {
        "blocking_vs_plain_save": blocking_s / plain_save_s,
        "blocking_ratio": blocking_s / waited_s,
        "async_save_waited_vs_plain_save": waited_s / plain_save_s,
        "throughput_ratio": plain_step / ckpt_step,
        "throughput_ratio_spare_core": plain1_step / ckpt1_step,
        "reshard_load_vs_native": results["load_tp1_save_s"] / results["load_tp2_save_s"],
        "reshard_decoded_bytes_ratio": results["decoded_tp1_save_bytes"] / results["decoded_tp2_save_bytes"],
        "staging_ring_use": results["staging_peak_bytes"] / results["staging_ring_bytes"],
    }
    pairs = len(results["plain"])
    print(f"\ndemo model, 2 ranks (TP1 x DP2), {pairs} runs of {steps} steps each way, checkpoint every {INTERVAL};")
    print(f"saves: medians of {2 * pairs} of each kind, loads: of {LOAD_REPEATS}, alternating (ABBA...)")
    rows = [
        ("blocking per checkpoint, lazy async (s)", f"{blocking_s:.4f}", ""),
        ("plain in-process save of the same chunks (s)", f"{plain_save_s:.4f}", ""),
        ("  blocking_vs_plain_save", f"{figures['blocking_vs_plain_save']:.3f}", "target <= 0.05"),
        ("async machinery save, waited on (s)", f"{waited_s:.4f}", ""),
        ("  blocking_ratio (blocking / waited save)", f"{figures['blocking_ratio']:.3f}", ""),
        ("  async_save_waited_vs_plain_save", f"{figures['async_save_waited_vs_plain_save']:.3f}", ""),
        ("step time without checkpoints (s)", f"{plain_step:.4f}", ""),
        (f"step time with one every {INTERVAL} steps (s)", f"{ckpt_step:.4f}", ""),
        ("  throughput_ratio (both cores training)", f"{figures['throughput_ratio']:.3f}", "target >= 0.97"),
        ("step time, 1 rank + 1 spare core, none (s)", f"{plain1_step:.4f}", ""),
        (f"step time, 1 rank + 1 spare core, every {INTERVAL}", f"{ckpt1_step:.4f}", ""),
        ("  throughput_ratio_spare_core", f"{figures['throughput_ratio_spare_core']:.3f}", "target >= 0.97"),
        ("TP2 loads the TP1 save (s)", f"{results['load_tp1_save_s']:.3f}", ""),
        ("TP2 loads a TP2 save of the same state (s)", f"{results['load_tp2_save_s']:.3f}", ""),
        ("  reshard_load_vs_native", f"{figures['reshard_load_vs_native']:.3f}", "target <= 1.2"),
        (
            "chunk MiB TP2 decodes: TP1 save / TP2 save",
            mib_pair(results, "decoded_tp1_save_bytes", "decoded_tp2_save_bytes"),
            "",
        ),
        ("  reshard_decoded_bytes_ratio", f"{figures['reshard_decoded_bytes_ratio']:.3f}", ""),
        ("staging ring: peak use / size (MiB)", mib_pair(results, "staging_peak_bytes", "staging_ring_bytes"), ""),
        ("  staging_ring_use", f"{figures['staging_ring_use']:.3f}", "<= 1 by construction"),
    ]
    for name, value, target in rows:
        print(f"{name:<46}{value:>16}  {target}")
    print(json.dumps({key: round(value, 4) for key, value in figures.items()}))


def mib_pair(results: dict, first: str, second: str) -> str:
    return f"{results[first] / 2**20:.1f} / {results[second] / 2**20:.1f}"


if __name__ == "__main__":
    main()

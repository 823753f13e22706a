"""Per-step metrics: metrics.jsonl, the progress bar, MFU, and the loss plot."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from trainer.config import ModelConfig

# Dense bf16 peak TFLOP/s per GPU from the vendors' data sheets (without sparsity).
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def model_flops_per_token(model: ModelConfig, seq_length: int, vocab_size: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + the attention term 12 L h s.

    The PaLM paper's accounting (appendix B); the input embedding is a lookup and counts 0.
    """
    h, f, layers = model.hidden_size, model.ffn_hidden_size, model.num_layers
    head_dim = h // model.num_attention_heads
    attention = h * (h + 2 * model.query_groups * head_dim) + h * h
    mlp = 3 * h * f
    matmul_params = layers * (attention + mlp) + vocab_size * h
    return 6.0 * matmul_params + 12.0 * layers * h * seq_length


def peak_flops_per_device(configured_tflops: float | None) -> float:
    """FLOP/s one device can do: configured, looked up for known GPUs, or measured on the CPU."""
    if configured_tflops:
        return configured_tflops * 1e12
    import torch  # here, not above: `stalwart plan --run` reads metrics and should answer at once

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return float("nan")
    return _measured_cpu_matmul_flops()


def _measured_cpu_matmul_flops(n: int = 512, repeats: int = 8) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


class MetricsLog:
    """One JSON object per line in run_dir/metrics.jsonl (rank 0 only).

    A run that starts at step 0 replaces the file; a run resumed at step S keeps the lines
    of steps up to S (later ones were lost with the crash and are trained again) and appends.
    """

    def __init__(self, path: Path, start_step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        kept = [r for r in read_metrics(path) if r["step"] <= start_step] if start_step and path.exists() else []
        self._file = path.open("w", buffering=1)
        for record in kept:
            self.write(record)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """Rank 0's view of the run: a tqdm bar with ETA on a terminal; in a batch log (stderr is
    not a terminal, where a redrawn bar would be one endless line) a line every `log_interval`
    steps. Silent elsewhere."""

    def __init__(self, total: int, initial: int, enabled: bool, log_interval: int = 1, stream=None):
        self.total, self.log_interval = total, log_interval
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        self._lines = enabled and not self.stream.isatty()
        self._start, self._start_step = time.monotonic(), initial
        if enabled and not self._lines:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train", file=self.stream
            )

    def update(self, record: dict) -> None:
        if self._lines and (record["step"] % self.log_interval == 0 or "val_loss" in record):
            print(self._line(record), file=self.stream, flush=True)
        if self._bar is None:
            return
        shown = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"}
        if "val_loss" in record:
            shown["val"] = f"{record['val_loss']:.3f}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def _line(self, record: dict) -> str:
        step = record["step"]
        elapsed = time.monotonic() - self._start
        eta = elapsed / max(1, step - self._start_step) * (self.total - step)
        line = f"step {step}/{self.total}  loss {record['loss']:.4f}"
        if "val_loss" in record:
            line += f"  val {record['val_loss']:.4f}"
        return line + f"  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s  eta {duration_text(eta)}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def duration_text(seconds: float) -> str:
    """`2h05m`, `3m12s`, `41s`."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def run_summary(
    start_step: int, last: dict | None, last_eval: dict | None, seconds: float, run_dir: Path, checkpoint: Path | None
) -> str:
    """The few lines a finished run prints: what it did and where its outputs are."""
    lines = []
    if last is not None:
        lines.append(f"stalwart: trained steps {start_step + 1}-{last['step']} in {duration_text(seconds)}")
        loss = f"final loss {last['loss']:.4f}"
        if last_eval is not None:
            loss += f", validation loss {last_eval['val_loss']:.4f} at step {last_eval['step']}"
        lines.append(f"stalwart: {loss}")
    lines.append(f"stalwart: metrics {run_dir / 'metrics.jsonl'}, plot {run_dir / 'loss.png'}")
    error = plan_error(read_metrics(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").exists() else None
    if error is not None:
        lines.append(
            f"stalwart: the planner's estimate of a step was off by {error:+.0%} on average "
            f"(measured against estimated step times: {run_dir / 'plan.png'})"
        )
    lines.append(f"stalwart: newest checkpoint {checkpoint if checkpoint else '(none saved)'}")
    return "\n".join(lines)


def planned_steps(records: list[dict]) -> list[tuple[int, float, float]]:
    """(step, estimated, measured seconds) of the planned steps, leaving out each attempt's
    first step, which also pays for warming up."""
    steps, previous = [], None
    for r in records:
        if "plan_estimate_s" not in r or "step_time_s" not in r:
            continue
        if previous is not None and r["step"] > previous:  # a restart begins again at or before the last step
            steps.append((r["step"], r["plan_estimate_s"], r["step_time_s"]))
        previous = r["step"]
    return steps


def plan_error(records: list[dict]) -> float | None:
    """The mean of (estimated - measured) / measured over the planned steps; None if there are none."""
    steps = planned_steps(records)
    if not steps:
        return None
    return sum((estimated - measured) / measured for _, estimated, measured in steps) / len(steps)


def plot_plan_estimates(metrics_path: Path, out_path: Path) -> Path | None:
    """The planner's estimated step time against the measured one, as a PNG; None without plans."""
    steps = planned_steps(read_metrics(metrics_path))
    if not steps:
        return None
    lines = [
        ("measured", [(s, m) for s, _, m in steps], "-"),
        ("planner's estimate", [(s, e) for s, e, _ in steps], "-"),
    ]
    return _plot_lines(lines, "step time (s)", f"{metrics_path.parent.name}: planned step times", out_path)


def plot_losses(metrics_path: Path, out_path: Path) -> Path:
    """Training and validation loss against step, as a PNG."""
    records = read_metrics(metrics_path)
    lines = [
        ("train loss", [(r["step"], r["loss"]) for r in records if "loss" in r], "-"),
        ("validation loss", [(r["step"], r["val_loss"]) for r in records if "val_loss" in r], "o-"),
    ]
    return _plot_lines(lines, "cross-entropy (nats/token)", metrics_path.parent.name, out_path)


def _plot_lines(lines: list[tuple[str, list[tuple[int, float]], str]], ylabel: str, title: str, out_path: Path) -> Path:
    """(label, [(step, value)], matplotlib format) lines against the step, as a PNG; empty lines left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, points, style in lines:
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path

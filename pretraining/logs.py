"""Logging: console, train.log, TensorBoard and metrics.jsonl; the loss window, tokens/s and MFU."""

from __future__ import annotations

import contextlib
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from loguru import logger
from tqdm.auto import tqdm

from pretraining.safeguards import atomic_write, nonfinite_error
from pretraining.time_budget import dense_parameters

if TYPE_CHECKING:
    import transformers


def training_flops(config: "transformers.PretrainedConfig", tokens: int, predicted: int, seq_length: int) -> float:
    """FLOPs of one forward+backward pass, the usual 6·N·tokens estimate made specific to a sparse-head encoder.

      6 · N_dense · tokens            N_dense = L·(4·d² + 2·d·f): attention projections and feed-forward matrices
    + 12 · L · d · T · tokens         attention scores (QKᵀ) and weighted values, forward and backward
    + 6 · (d² + d·V) · predicted      the MLM head (transform + decoder), only at the predicted positions
    """
    layers, d, ff, vocab = config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    dense = dense_parameters(layers, d, ff)
    return 6 * dense * tokens + 12 * layers * d * seq_length * tokens + 6 * (d * d + d * vocab) * predicted


# Dense peak FLOP/s of common accelerators (from the vendors' data sheets), for MFU. "fp32" means TF32 tensor cores,
# which is what fp32 matmuls use on these GPUs with torch.set_float32_matmul_precision("high").
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},  # SXM; the PCIe card is ~25% lower
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """The device's dense peak FLOP/s for `dtype`, or None when unknown (always on CPU: MFU is "n/a")."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for model_name, peaks in PEAK_FLOPS.items():
        if model_name in name:
            return peaks.get(dtype)
    return None


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated accelerator memory on GPU, the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


CODE_DIR = Path(__file__).resolve().parent.parent  # the scripts' folder: its git state is recorded


def git_output(*args: str) -> str | None:
    """Output of a git command run in the script's directory, or None outside a repository / without git."""
    try:
        result = subprocess.run(["git", *args], cwd=CODE_DIR, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def record_code_version(experiment_dir: Path) -> None:
    """Write githash.log (the commit) and gitdiff.log (staged + unstaged changes, untracked files listed)."""
    commit = git_output("rev-parse", "HEAD")
    if commit is None:
        note = f"not a git repository (or git is not installed): {CODE_DIR}\n"
        (experiment_dir / "githash.log").write_text(note)
        (experiment_dir / "gitdiff.log").write_text(note)
        return
    (experiment_dir / "githash.log").write_text(commit)
    diff = git_output("diff", "HEAD") or ""
    untracked = git_output("ls-files", "--others", "--exclude-standard", "--directory") or ""  # a folder: one line
    untracked_note = "".join(f"# untracked: {name}\n" for name in untracked.splitlines())
    (experiment_dir / "gitdiff.log").write_text(diff + untracked_note or "# no changes against HEAD\n")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the results, recorded in hparams.json."""
    import datasets
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }


class MetricsLogger:
    """Sends each log record to loguru (stderr via tqdm + train.log), TensorBoard and metrics.jsonl."""

    def __init__(self, experiment_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl_path = experiment_dir / "metrics.jsonl"
        drop_lines_after_step(self.jsonl_path, resume_step)  # the crashed run may have logged past its checkpoint
        self.jsonl = open(self.jsonl_path, "a")
        self.tensorboard = SummaryWriter(str(experiment_dir / "tb_dir"), purge_step=resume_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (it must have a "step") to every sink."""
        step = record["step"]
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self.tensorboard.add_scalar(key, value, step)
        logger.info(log_line(record))

    def close(self) -> None:
        """Flush and close the files (also on errors and interruptions)."""
        self.tensorboard.close()
        self.jsonl.close()


def drop_lines_after_step(jsonl_path: Path, step: int) -> None:
    """Remove metrics.jsonl records from steps after `step` (written before a crash, redone after resume), and a
    test evaluation of `step` itself (the end phase was stopped before the export: a resume evaluates again)."""
    if not jsonl_path.is_file():
        return
    records = [(line, json.loads(line)) for line in jsonl_path.read_text().splitlines(keepends=True) if line.strip()]
    kept = [
        line
        for line, record in records
        if record["step"] < step or (record["step"] == step and "test_loss" not in record)
    ]
    atomic_write(jsonl_path, lambda file: file.writelines(kept), mode="w")


def format_number(value: Any, digits: int = 3) -> str:
    """Compact numbers for log lines: whole numbers from 1,000 up, `digits` significant digits below, e-notation
    only under 0.001 (learning rates)."""
    if not isinstance(value, float):
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if value == 0 or abs(value) >= 1e-3 else f"{value:.1e}"


# How each metric reads in a log line: (label, unit); the metrics.jsonl record keeps every key and full precision.
LOG_LINE_FIELDS = {
    "loss": ("loss", ""),
    "lr": ("lr", ""),
    "grad_norm": ("grad", ""),
    "loss_scale": ("scale", ""),
    "tokens_per_sec": ("", " tok/s"),
    "step_time_ms": ("", " ms/step"),
    "mfu": ("MFU", "%"),
    "peak_memory_mib": ("mem", " MiB"),
    "eta_s": ("eta", ""),
    "budget_spent_s": ("spent", " s"),
}


def log_line(record: dict[str, Any]) -> str:
    """One short line for a record: "step 10 | loss 9.86 | lr 2.0e-05 | 4,521 tok/s | 905 ms/step | ..." """
    parts = [f"step {record['step']:,}"]
    for key, value in record.items():
        if key == "step" or key in ("samples_per_sec", "elapsed_s"):  # derivable; kept in metrics.jsonl
            continue
        label, unit = LOG_LINE_FIELDS.get(key, (key, ""))
        if key == "eta_s":
            text = str(datetime.timedelta(seconds=round(value)))
        else:
            text = format_number(100 * value if key == "mfu" else value, digits=4 if key.endswith("loss") else 3)
        parts.append(f"{label} {text}{unit}".strip())
    return " | ".join(parts)


def console_logging() -> int:
    """loguru to stderr, short lines, through tqdm (so a progress bar stays intact); returns the sink id."""
    logger.remove()
    return logger.add(
        lambda message: tqdm.write(message, end="", file=sys.stderr),
        level="INFO",
        colorize=False,
        format="{time:HH:mm:ss} | {level: <7} | {message}",
    )


def setup_logging(experiment_dir: Path) -> list[int]:
    """loguru to stderr and to train.log; returns the sink ids."""
    return [
        console_logging(),
        logger.add(experiment_dir / "train.log", level="DEBUG", format="{time} | {level: <7} | {message}"),
    ]


@contextlib.contextmanager
def experiment_logging(experiment_dir: Path, start_step: int) -> Iterator[MetricsLogger]:
    """Log to stderr, train.log, TensorBoard and metrics.jsonl for the `with` block; close them all on any exit."""
    sinks = setup_logging(experiment_dir)
    metrics = MetricsLogger(experiment_dir, start_step)
    try:
        yield metrics
    finally:
        metrics.close()
        for sink in sinks:
            logger.remove(sink)
        console_logging()


class LossWindow:
    """The loss, the predicted-token count and the time between two log lines.

    The sums stay on the device and are read (.item()) only at log steps, so no training step waits on the
    accelerator. The first step with a non-finite loss is remembered the same way; in fp16 (`check_finite`
    False) overflowing steps are the loss scaler's to skip instead.
    """

    def __init__(self, device: torch.device, grad_accum_steps: int, check_finite: bool):
        self.loss = torch.zeros((), device=device)
        self.predicted = torch.zeros((), device=device, dtype=torch.long)
        self.first_nonfinite_step = torch.full((), -1, device=device, dtype=torch.long)
        self.grad_accum_steps, self.check_finite = grad_accum_steps, check_finite
        self.micro_batches, self.start, self.run_start = 0, time.perf_counter(), time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, masked_labels: torch.Tensor) -> None:
        """Count one micro-batch of optimizer step `step`: its mean loss and how many tokens it predicted."""
        self.loss += loss.detach() / self.grad_accum_steps
        self.predicted += (masked_labels >= 0).sum()  # not the padding (-100)
        self.first_nonfinite_step = torch.where(
            (self.first_nonfinite_step < 0) & ~torch.isfinite(loss.detach()), step, self.first_nonfinite_step
        )
        self.micro_batches += 1

    def raise_if_nonfinite(self, experiment_dir: Path) -> None:
        """Stop before anything from a bad step is logged or saved."""
        bad_step = int(self.first_nonfinite_step)
        if self.check_finite and bad_step >= 0:
            raise nonfinite_error(f"the loss became non-finite (NaN or inf) at step {bad_step}", experiment_dir)

    def record(
        self,
        step: int,
        lr: float,
        grad_norm: float | None,
        flags: dict[str, Any],
        model_config: "transformers.PretrainedConfig",
        device: torch.device,
        num_ranks: int = 1,
    ) -> dict[str, Any]:
        """The log line for the steps since the previous one, then start a new window.

        Throughput counts the tokens of all `num_ranks` ranks (the loss and predicted count must already be summed
        over ranks), and MFU divides by all their peaks. Values that do not apply (MFU on CPU) are left out.
        """
        now = time.perf_counter()
        steps = self.micro_batches / self.grad_accum_steps
        seconds_per_step = (now - self.start) / steps
        tokens_per_step = num_ranks * flags["batch_size"] * flags["max_seq_length"] * flags["grad_accum_steps"]
        flops = training_flops(model_config, tokens_per_step, int(self.predicted) / steps, flags["max_seq_length"])
        peak = peak_flops(device, flags["dtype"])
        record = {
            "step": step,
            "loss": float(self.loss) / steps,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens_per_step / seconds_per_step,
            "samples_per_sec": tokens_per_step / flags["max_seq_length"] / seconds_per_step,
            "step_time_ms": 1000 * seconds_per_step,
            "mfu": flops / seconds_per_step / (num_ranks * peak) if peak else None,
            "peak_memory_mib": peak_memory_mib(device),
            "elapsed_s": now - self.run_start,
            "eta_s": seconds_per_step * (flags["num_iterations"] - step),
        }
        self.loss.zero_(), self.predicted.zero_()
        self.micro_batches, self.start = 0, time.perf_counter()
        return {key: value for key, value in record.items() if value is not None}


class DurationForecast:
    """One log line saying how long a pass over `total` batches will take, for log files (where no progress bar shows):
    timed on the second batch, since the first may compile a graph."""

    def __init__(self, description: str, total: int):
        self.description, self.total, self.done_at = description, total, [time.perf_counter()]

    def batch_done(self, result: torch.Tensor) -> None:
        """Call after each batch with a tensor the batch computed; it is waited for after the first two batches only."""
        if len(self.done_at) < 3 and self.total > 2:
            result.sum().item()  # wait for the batch, to time it
            self.done_at.append(time.perf_counter())
            if len(self.done_at) == 3:
                left = (self.done_at[2] - self.done_at[1]) * (self.total - 2)
                expected = datetime.timedelta(seconds=round(self.done_at[2] - self.done_at[0] + left))
                logger.info(f"{self.description}: {self.total:,} batches, about {expected}")

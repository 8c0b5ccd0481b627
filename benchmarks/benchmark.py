"""Measure train_bert.py (and train_bert_ds.py) side by side with an upstream-style baseline.

Modes:

    python benchmarks/benchmark.py throughput --suite cpu      # tokens/s, MFU, peak memory: one markdown row each
    python benchmarks/benchmark.py ttq --budget_s 600          # validation loss after a fixed wall-clock budget
    python benchmarks/benchmark.py plot A.json B.json --png_path curve.png   # ttq results: loss vs minutes
    python benchmarks/benchmark.py profile --dtype bf16        # torch.profiler's top operators in a training step
    python benchmarks/benchmark.py ceiling                     # matmul FLOP/s here vs the model's FLOPs per token
    python benchmarks/benchmark.py memory                      # resident memory over a long run (must stay flat)
    python benchmarks/benchmark.py --help                      # the modes; `throughput --help` for their flags

Every configuration runs in a fresh process (so peak memory is its own) through the script's real `train()`: the
figures are the ones the script itself logs to metrics.jsonl. A configuration warms up for one log window, then
is timed over the next windows. The first row is the reference of the "x row 1" column; `--rounds N` repeats the
whole list N times, interleaved, and reports the median (noise on a shared machine then hits every row alike).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_bert  # noqa: E402
from pretraining import errors, safeguards, token_store  # noqa: E402
from pretraining.corpus import load_text_dataset, load_tokenizer, train_bpe_tokenizer  # noqa: E402
from pretraining.logs import MetricsLogger, peak_memory_mib, training_flops  # noqa: E402

DEFAULT_DATASET = str(ROOT.parent / "shared" / "data" / "wikitext")
DEFAULT_TOKENIZER = str(ROOT.parent / "shared" / "data" / "roberta-base")

# ----------------------------------------------------------------------------------------------------------------------
# Configurations. A row is a dict: a name, a kind ("plain": train_bert.py, "ds": train_bert_ds.py, "upstream-style":
# the baseline in upstream_style.py, "upstream": upstream's own script given by --upstream_script) and train() flags.
# ----------------------------------------------------------------------------------------------------------------------

# HelloDeepSpeed's model and BERT-base as published: RoBERTa's learned positions (and its flash attention on a GPU).
UPSTREAM_DIMS = {"num_layers": 6, "h_dim": 256, "ff_dim": 512, "num_heads": 8, "positions": "learned"}
BERT_BASE_DIMS = {"num_layers": 12, "h_dim": 768, "ff_dim": 3072, "num_heads": 12, "positions": "learned"}
TINY_DIMS = {"num_layers": 2, "h_dim": 64, "ff_dim": 128, "num_heads": 2}


def row(name: str, kind: str, **flags: Any) -> dict[str, Any]:
    """One configuration: `flags` are train() flags (dims, batch, dtype...) plus `zero_stage`/`offload_optimizer`
    for kind "ds", and optionally `memory_cap_gib` (cap the usable GPU memory, emulating a smaller card)."""
    return {"name": name, "kind": kind, "flags": flags}


def cpu_suite(batch_size: int, seq: int) -> list[dict[str, Any]]:
    """Upstream's model at one batch/length: the upstream-style baseline first, then each of our speed-ups."""
    dims = {**UPSTREAM_DIMS, "batch_size": batch_size, "max_seq_length": seq}
    return [
        row(
            "upstream-style (padded lines, eager attention, Adam), fp32",
            "upstream-style",
            **dims,
            dtype="fp32",
            dropout=0.1,
        ),
        row("train_bert.py fp32, dropout 0.1", "plain", **dims, dtype="fp32", dropout=0.1, compile=False),
        row("train_bert.py fp32, dropout 0", "plain", **dims, dtype="fp32", dropout=0.0, compile=False),
        row("train_bert.py bf16, dropout 0", "plain", **dims, dtype="bf16", dropout=0.0, compile=False),
        row("train_bert.py bf16 + compile, dropout 0", "plain", **dims, dtype="bf16", compile=True, dropout=0.0),
    ]


def ds_rows(dims: dict[str, Any], dtype: str, **extra: Any) -> list[dict[str, Any]]:
    """train_bert_ds.py at ZeRO 0, 1, 1 + CPU optimizer offload, 2 (only when the script exists)."""
    if not (ROOT / "train_bert_ds.py").is_file():
        return []
    return [
        row(f"train_bert_ds.py ZeRO-0 {dtype}", "ds", **dims, dtype=dtype, zero_stage=0, **extra),
        row(f"train_bert_ds.py ZeRO-1 {dtype}", "ds", **dims, dtype=dtype, zero_stage=1, **extra),
        row(
            f"train_bert_ds.py ZeRO-1 + CPU offload {dtype}",
            "ds",
            **dims,
            dtype=dtype,
            zero_stage=1,
            offload_optimizer="cpu",
            **extra,
        ),
        row(f"train_bert_ds.py ZeRO-2 {dtype}", "ds", **dims, dtype=dtype, zero_stage=2, **extra),
    ]


# A model that does not fit a 12 GiB GPU for mixed-precision Adam without ZeRO-Offload: 1.27B parameters (24 layers,
# d 2048, ff 8192) need ~20 GiB of model states (16 bytes/param: bf16 weights + grads, fp32 master + 2 Adam moments);
# with the optimizer offloaded to the CPU the GPU keeps ~5 GiB of bf16 weights and gradients.
OFFLOAD_DIMS = {"num_layers": 24, "h_dim": 2048, "ff_dim": 8192, "num_heads": 16, "positions": "learned"}
OFFLOAD_GPU_GIB = 12


def suite_rows(name: str, dry_run: bool = False) -> list[dict[str, Any]]:
    """The named list of configurations. `dry_run` turns the GPU suites into tiny CPU runs of the same rows."""
    cpu_dims = {**UPSTREAM_DIMS, "batch_size": 32, "max_seq_length": 128}
    gpu_dims = {**BERT_BASE_DIMS, "batch_size": 64, "max_seq_length": 128, "local_rank": 0}
    memory_dims = {**BERT_BASE_DIMS, "batch_size": 32, "max_seq_length": 128, "local_rank": 0}
    offload_dims = {
        **OFFLOAD_DIMS,
        "batch_size": 8,
        "max_seq_length": 128,
        "local_rank": 0,
        "memory_cap_gib": OFFLOAD_GPU_GIB,
    }
    if dry_run:
        gpu_dims = memory_dims = offload_dims = {**TINY_DIMS, "batch_size": 4, "max_seq_length": 32, "local_rank": -1}
    suites = {
        # Upstream's model on this CPU: the rows the performance targets are about. A row compiles only where its
        # name says so (train_bert.py's own default is --compile True).
        "cpu": cpu_suite(32, 128),
        "cpu512": cpu_suite(8, 512),
        # train_bert.py's default model (batch 16 x 128): what --dtype auto and --compile buy on this CPU.
        "cpu-default": [
            throughput_config(
                row(f"train_bert.py {dtype}{' + compile' if compile else ''}", "plain", dtype=dtype, compile=compile)
            )
            for compile in (False, True)
            for dtype in ("fp32", "bf16")
        ],
        # The DeepSpeed script on the CPU (DeepSpeed's CPU accelerator), next to the plain script.
        "cpu-ds": [
            row("train_bert.py bf16", "plain", **cpu_dims, dtype="bf16", compile=False),
            *ds_rows(cpu_dims, "bf16"),
        ],
        # BERT-base on one GPU: throughput and MFU, both scripts, compile off/on.
        "gpu": [
            row("train_bert.py bf16", "plain", **gpu_dims, dtype="bf16", compile=False),
            row("train_bert.py bf16 + compile", "plain", **gpu_dims, dtype="bf16", compile=True),
            row("train_bert_ds.py ZeRO-0 bf16", "ds", **gpu_dims, dtype="bf16", zero_stage=0),
            row("train_bert_ds.py ZeRO-1 bf16", "ds", **gpu_dims, dtype="bf16", zero_stage=1),
            row("train_bert_ds.py ZeRO-1 bf16 + compile", "ds", **gpu_dims, dtype="bf16", zero_stage=1, compile=True),
        ],
        # BERT-base at batch 256 x 128: enough work per step to hide the host's kernel launches; with and without
        # dropout (without it, attention can use the fused flash kernel under compile too).
        "gpu-batch256": [
            row(
                "train_bert.py bf16 + compile, batch 256",
                "plain",
                **{**gpu_dims, "batch_size": 256},
                dtype="bf16",
                compile=True,
            ),
            row(
                "train_bert.py bf16 + compile, batch 256, dropout 0",
                "plain",
                **{**gpu_dims, "batch_size": 256},
                dtype="bf16",
                compile=True,
                dropout=0.0,
            ),
        ],
        # One model's peak memory by precision and ZeRO (BERT-base, batch 32 x 128).
        "gpu-memory": [
            row("train_bert.py fp32", "plain", **memory_dims, dtype="fp32", compile=False),
            row("train_bert.py fp16", "plain", **memory_dims, dtype="fp16", compile=False),
            row("train_bert.py bf16", "plain", **memory_dims, dtype="bf16", compile=False),
            row("train_bert_ds.py ZeRO-1 bf16", "ds", **memory_dims, dtype="bf16", zero_stage=1),
            row(
                "train_bert_ds.py ZeRO-1 + CPU offload bf16",
                "ds",
                **memory_dims,
                dtype="bf16",
                zero_stage=1,
                offload_optimizer="cpu",
            ),
        ],
        # A 1.27B model on a GPU capped at OFFLOAD_GPU_GIB: out of memory without ZeRO-Offload, trains with it.
        "gpu-offload": [
            row(
                f"train_bert_ds.py ZeRO-1 bf16, GPU capped at {OFFLOAD_GPU_GIB} GiB",
                "ds",
                **offload_dims,
                dtype="bf16",
                zero_stage=1,
            ),
            row(
                f"train_bert_ds.py ZeRO-1 + CPU offload bf16, GPU capped at {OFFLOAD_GPU_GIB} GiB",
                "ds",
                **offload_dims,
                dtype="bf16",
                zero_stage=1,
                offload_optimizer="cpu",
            ),
        ],
        # Tiny dims: a quick end-to-end check of every kind of row (tests, dry runs).
        "smoke": [
            row("upstream-style fp32", "upstream-style", **TINY_DIMS, batch_size=4, max_seq_length=32, dtype="fp32"),
            row(
                "train_bert.py fp32", "plain", **TINY_DIMS, batch_size=4, max_seq_length=32, dtype="fp32", compile=False
            ),
            row(
                "train_bert.py bf16", "plain", **TINY_DIMS, batch_size=4, max_seq_length=32, dtype="bf16", compile=False
            ),
        ],
    }
    if name not in suites:
        raise errors.ConfigError(f"--suite must be one of {', '.join(suites)}; got {name!r}")
    return suites[name]


# ----------------------------------------------------------------------------------------------------------------------
# Data: a copy of the dataset's text with a short validation split, so the runs' own end-of-run evaluation is cheap.
# ----------------------------------------------------------------------------------------------------------------------


def prepare_corpus(dataset: str, dataset_config: str | None, directory: Path, validation_lines: int = 200) -> Path:
    """Write `directory/train.txt` (every train line) and `validation.txt` (the first `validation_lines` lines).

    The benchmark's measurements and evaluations use their own data; this keeps each run's own final evaluation
    (which every run does) from costing minutes. Returns `directory`.
    """
    raw = load_text_dataset(dataset, dataset_config)
    directory.mkdir(parents=True, exist_ok=True)
    for split, limit in (("train", None), ("validation", validation_lines)):
        lines = [text.rstrip("\n") for text in raw[split]["text"]]
        (directory / f"{split}.txt").write_text("\n".join(lines[:limit]) + "\n")
    return directory


def synthetic_corpus(directory: Path, num_lines: int = 40_000, num_words: int = 30_000, seed: int = 0) -> Path:
    """A made-up corpus (Zipf-distributed pseudo-words in lines of 5-150 words) for machines without ../shared.

    Enough distinct words for a BPE tokenizer of ~32k tokens, so the MLM head is BERT-sized; its loss means
    nothing, its speed is what a real corpus of the same token count gives.
    """
    rng = random.Random(seed)
    syllables = [
        consonant + vowel for consonant in "bcdfghjklmnprstvwz" for vowel in ("a", "e", "i", "o", "u", "ai", "ou")
    ]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(num_words)]
    weights = [1 / (rank + 1) for rank in range(num_words)]
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_lines), ("validation", max(200, num_lines // 50))):
        lines = [" ".join(rng.choices(words, weights, k=rng.randint(5, 150))) for _ in range(count)]
        (directory / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return directory


def bpe_tokenizer_folder(corpus: Path, directory: Path, vocab_size: int) -> Path:
    """Train train_bert.py's byte-level BPE tokenizer on `corpus/train.txt` once and save it as a folder."""
    import datasets

    texts = datasets.load_dataset("text", data_files={"train": str(corpus / "train.txt")})["train"]
    train_bpe_tokenizer(texts, vocab_size).save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------------------------------------------------
# One measurement, in its own process.
# ----------------------------------------------------------------------------------------------------------------------


class MeasurementDone(Exception):
    """Raised from the metrics logger once the timed windows are logged: skips the run's checkpoint and export."""


def script_flags(config: dict[str, Any], data: dict[str, str], work_dir: Path) -> dict[str, Any]:
    """train() flags for a throughput run: log windows of `window` steps, nothing else during them."""
    window, windows = data["window"], data["windows"]
    flags = dict(config["flags"])
    flags.pop("memory_cap_gib", None)
    steps = window * (1 + windows)
    return {
        "checkpoint_dir": str(work_dir / "experiments"),
        "dataset": data["dataset"],
        "dataset_config": None,
        "tokenizer": data["tokenizer"],
        "num_iterations": steps,
        "log_every": window,
        "eval_every": steps,
        "checkpoint_every": steps,
        "keep_last": 1,
        **flags,
    }


def measure_script(config: dict[str, Any], data: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    """Run train_bert.py's or train_bert_ds.py's train() and read what it logs; the first window is warm-up."""
    windows = data["windows"]
    records: list[dict[str, Any]] = []
    cpu_seconds: list[float] = []  # the process's CPU time (all threads) at each log line
    original_log = MetricsLogger.log

    def log(self: MetricsLogger, record: dict[str, Any]) -> None:
        if "tokens_per_sec" in record:
            cpu_seconds.append(time.process_time())
        original_log(self, record)
        if "tokens_per_sec" in record:
            records.append(record)
            if len(records) == windows + 1:
                raise MeasurementDone

    MetricsLogger.log = log
    flags = script_flags(config, data, work_dir)
    module = train_bert if config["kind"] == "plain" else importlib.import_module("train_bert_ds")
    with contextlib.suppress(MeasurementDone):
        module.train(**flags)
    timed = records[1:]
    seconds = [record["step_time_ms"] / 1000 * data["window"] for record in timed]
    tokens_per_step = flags["batch_size"] * flags["max_seq_length"] * flags.get("grad_accum_steps", 1)
    mfus = [record.get("mfu") for record in timed]
    return {
        "real_tokens_per_sec": tokens_per_step * data["window"] * len(timed) / sum(seconds),
        "computed_tokens_per_sec": tokens_per_step * data["window"] * len(timed) / sum(seconds),
        "step_time_ms": 1000 * sum(seconds) / (data["window"] * len(timed)),
        "cpu_ms_per_step": 1000 * (cpu_seconds[-1] - cpu_seconds[0]) / (data["window"] * len(timed)),
        "real_tokens_per_cpu_second": (
            tokens_per_step * data["window"] * len(timed) / (cpu_seconds[-1] - cpu_seconds[0])
        ),
        "mfu": None if None in mfus else sum(m * s for m, s in zip(mfus, seconds)) / sum(seconds),
        "peak_memory_mib": timed[-1]["peak_memory_mib"],
        "loss": timed[-1]["loss"],
    }


def measure_upstream_style(config: dict[str, Any], data: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    """Time the upstream-style loop (upstream_style.py) the same way: one window of warm-up, then timed steps."""
    import upstream_style

    flags = config["flags"]
    device = torch.device("cpu") if flags.get("local_rank", -1) < 0 else torch.device("cuda", flags["local_rank"])
    tokenizer = load_tokenizer(data["tokenizer"])
    texts = [text for text in load_text_dataset(data["dataset"], None)["train"]["text"] if text.strip()]
    torch.manual_seed(42)
    model = upstream_style.upstream_style_model(
        tokenizer,
        flags["num_layers"],
        flags["num_heads"],
        flags["ff_dim"],
        flags["h_dim"],
        flags.get("dropout", 0.1),
        flags["max_seq_length"],
    ).to(device)
    batches = (
        train_bert.to_device(batch, device)
        for batch in upstream_style.upstream_style_batches(
            texts, tokenizer, flags["batch_size"], flags["max_seq_length"]
        )
    )
    warmup, timed = data["window"], data["window"] * data["windows"]
    steps: list[tuple[float, int, int, float]] = []
    cpu_seconds: list[float] = []  # the process's CPU time after each step

    def on_step(step: int, seconds: float, real: int, padded: int, loss: float) -> None:
        steps.append((seconds, real, padded, loss))
        cpu_seconds.append(time.process_time())

    upstream_style.train_upstream_style(
        model, batches, tokenizer.pad_token_id, should_stop=lambda done, _: done >= warmup + timed, on_step=on_step
    )
    measured = steps[warmup:]
    seconds = sum(s for s, _, _, _ in measured)
    cpu = cpu_seconds[-1] - cpu_seconds[warmup - 1]
    return {
        "real_tokens_per_sec": sum(r for _, r, _, _ in measured) / seconds,
        "computed_tokens_per_sec": sum(p for _, _, p, _ in measured) / seconds,
        "step_time_ms": 1000 * seconds / len(measured),
        "cpu_ms_per_step": 1000 * cpu / len(measured),
        "real_tokens_per_cpu_second": sum(r for _, r, _, _ in measured) / cpu,
        "mfu": None,
        "peak_memory_mib": peak_memory_mib(device),
        "loss": measured[-1][3],
    }


def measure_upstream_script(config: dict[str, Any], data: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    """Run upstream's own HelloDeepSpeed `train_bert.py` (a local copy given by --upstream_script), unchanged.

    Its data iterator is wrapped to time each step (the time between two batches, as its loop fetches one batch
    per step) and to count real tokens; `datasets.load_dataset("wikitext", ...)` is pointed at the local copy and
    its two experiment-directory helpers' dependencies (pytz, sh) are stubbed when not installed.
    """
    import datasets

    for name, stub in (("pytz", upstream_stub_pytz), ("sh", upstream_stub_sh)):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = stub()
    original_load = datasets.load_dataset
    datasets.load_dataset = lambda path, *args, **kwargs: original_load(
        data["original_dataset"] if path == "wikitext" else path, *args, **kwargs
    )
    spec = importlib.util.spec_from_file_location("upstream_train_bert", data["upstream_script"])
    upstream = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(upstream)

    stamps: list[tuple[float, int, int]] = []
    original_iterator = upstream.create_data_iterator

    def timed_iterator(*args: Any, **kwargs: Any) -> Any:
        iterator = original_iterator(*args, **kwargs)

        class Timed:
            def __iter__(self) -> "Timed":
                return self

            def __next__(self) -> dict[str, torch.Tensor]:
                batch = next(iterator)
                stamps.append(
                    (
                        time.perf_counter(),
                        int(batch["attention_mask"].sum()),
                        batch["src_tokens"].numel(),
                        time.process_time(),
                    )
                )
                return batch

        return Timed()

    upstream.create_data_iterator = timed_iterator
    flags = config["flags"]
    warmup, timed = data["window"], data["window"] * data["windows"]
    torch.manual_seed(42)  # the seeds of upstream's __main__
    upstream.np.random.seed(0)
    random.seed(0)
    upstream.train(
        checkpoint_dir=str(work_dir / "upstream"),
        tokenizer=data["tokenizer"],
        max_seq_length=flags["max_seq_length"],
        batch_size=flags["batch_size"],
        num_layers=flags["num_layers"],
        num_heads=flags["num_heads"],
        ff_dim=flags["ff_dim"],
        h_dim=flags["h_dim"],
        num_iterations=warmup + timed + 1,
        checkpoint_every=10**9,
        log_every=data["window"],
    )
    # Batch k is trained between stamps k and k + 1.
    measured = [(stamps[k + 1][0] - stamps[k][0], stamps[k][1], stamps[k][2]) for k in range(warmup, warmup + timed)]
    seconds = sum(s for s, _, _ in measured)
    cpu = stamps[warmup + timed][3] - stamps[warmup][3]
    return {
        "real_tokens_per_sec": sum(r for _, r, _ in measured) / seconds,
        "computed_tokens_per_sec": sum(p for _, _, p in measured) / seconds,
        "step_time_ms": 1000 * seconds / len(measured),
        "cpu_ms_per_step": 1000 * cpu / len(measured),
        "real_tokens_per_cpu_second": sum(r for _, r, _ in measured) / cpu,
        "mfu": None,
        "peak_memory_mib": peak_memory_mib(torch.device("cpu")),
        "loss": None,
    }


def upstream_stub_pytz() -> types.ModuleType:
    """Upstream names its experiment folder in US/Pacific time; any zone does for a benchmark."""
    module = types.ModuleType("pytz")
    module.timezone = lambda name: datetime.timezone.utc
    return module


def upstream_stub_sh() -> types.ModuleType:
    """Upstream records `git log`/`git diff` through the `sh` package; an empty record does for a benchmark."""
    module = types.ModuleType("sh")
    module.ErrorReturnCode_128 = type("ErrorReturnCode_128", (Exception,), {})
    module.ErrorReturnCode_129 = type("ErrorReturnCode_129", (Exception,), {})
    module.git = types.SimpleNamespace(log=lambda *args, **kwargs: "", diff=lambda *args, **kwargs: "")
    return module


MEASURE = {
    "plain": measure_script,
    "ds": measure_script,
    "upstream-style": measure_upstream_style,
    "upstream": measure_upstream_script,
}


def read_job(job: str) -> tuple[Path, dict, dict]:
    """Read a child process's job file; apply its thread count. Returns (job file, config, data settings)."""
    job_path = Path(job)
    spec = json.loads(job_path.read_text())
    if spec["data"].get("threads"):
        torch.set_num_threads(spec["data"]["threads"])
    return job_path, spec["config"], spec["data"]


def run_one(job: str) -> None:
    """Child-process entry point: read a job file (config + data settings), measure, write the result next to it."""
    job_path, config, data = read_job(job)
    if config["flags"].get("memory_cap_gib") and torch.cuda.is_available():  # emulate a smaller GPU
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, config["flags"]["memory_cap_gib"] * 2**30 / total))
    work_dir = job_path.parent
    started = time.perf_counter()
    try:
        result = {"status": "ok", **MEASURE[config["kind"]](config, data, work_dir)}
    except Exception as error:  # noqa: BLE001  (a row that fails, e.g. out of memory, is reported, not fatal)
        out_of_memory = isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
        result = {"status": "out of memory" if out_of_memory else f"failed: {type(error).__name__}: {str(error)[:300]}"}
    result["wall_s"] = time.perf_counter() - started
    (work_dir / "result.json").write_text(json.dumps(result))


LIVE_CHILDREN: list[subprocess.Popen] = []


def stop_children_on_exit() -> None:
    """When the benchmark itself is stopped (Ctrl-C, SIGTERM, an error), stop the runs it started too."""

    def stop_children() -> None:
        for process in LIVE_CHILDREN:
            if process.poll() is None:
                process.terminate()  # `timeout` passes the signal on to the run

    atexit.register(stop_children)
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))


def run_child(
    command: str, config: dict[str, Any], data: dict[str, Any], work_dir: Path, timeout_s: float
) -> subprocess.Popen:
    """Start `benchmark.py <command>` for one job in `work_dir` (its output goes to work_dir/log.txt)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "job.json").write_text(json.dumps({"config": config, "data": data}))
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    log = open(work_dir / "log.txt", "w")
    process = subprocess.Popen(
        [
            "timeout",
            "--signal=KILL",
            str(int(timeout_s)),
            sys.executable,
            str(Path(__file__).resolve()),
            command,
            "--job",
            str(work_dir / "job.json"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
    )
    process.log = log
    LIVE_CHILDREN.append(process)
    return process


def child_result(process: subprocess.Popen, work_dir: Path) -> dict[str, Any]:
    """Wait for a child and read its result (a missing result reports the end of its log)."""
    process.wait()
    process.log.close()
    LIVE_CHILDREN.remove(process)
    result_path = work_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    tail = (work_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
    return {"status": f"failed (exit {process.returncode}): {' | '.join(tail)[-300:]}"}


# ----------------------------------------------------------------------------------------------------------------------
# Throughput: rows -> markdown table + JSON.
# ----------------------------------------------------------------------------------------------------------------------


def describe(config: dict[str, Any]) -> str:
    """The dims, batch and sequence length of a row, compactly: 6L/256/512/8h, 32x128."""
    f = config["flags"]
    return f"{f['num_layers']}L/{f['h_dim']}/{f['ff_dim']}/{f['num_heads']}h, {f['batch_size']}x{f['max_seq_length']}"


def format_value(value: float | None, digits: int = 0) -> str:
    """Numbers for the table: thousands separators, "n/a" when not applicable."""
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table; the "x row 1" columns divide by the first row's figure.

    On the CPU two more columns count the process's CPU time (all its threads) instead of the wall clock: on a
    machine shared with other work they stay comparable while wall-clock figures follow the load.
    """
    on_cpu = all(result["config"]["flags"].get("local_rank", -1) < 0 for result in rows)
    cpu_head, cpu_rule = (
        (" CPU s/step | real tokens per CPU-second | x row 1 (CPU) |", "---:|---:|---:|") if on_cpu else ("", "")
    )
    lines = [
        "| # | configuration | model, batch x seq | real tokens/s | x row 1 | tokens/s incl. padding | step (ms) |"
        f"{cpu_head} MFU | peak memory (MiB) |",
        f"|---|---|---|---:|---:|---:|---:|{cpu_rule}---:|---:|",
    ]
    reference = rows[0].get("real_tokens_per_sec") if rows else None
    cpu_reference = rows[0].get("real_tokens_per_cpu_second") if rows else None
    for number, result in enumerate(rows, start=1):
        config = result["config"]
        if result.get("status") != "ok":
            empty = "| " * (9 if on_cpu else 6)
            lines.append(f"| {number} | {config['name']} | {describe(config)} | {result['status']} {empty}|")
            continue
        ratio = f"{result['real_tokens_per_sec'] / reference:.2f}x" if reference else "n/a"
        spread = result.get("real_tokens_per_sec_range")
        spread_text = f" ({spread[0]:,.0f}-{spread[1]:,.0f})" if spread and spread[0] != spread[1] else ""
        mfu = "n/a" if result.get("mfu") is None else f"{100 * result['mfu']:.1f}%"
        cpu = ""
        if on_cpu:
            cpu_ratio = f"{result['real_tokens_per_cpu_second'] / cpu_reference:.2f}x" if cpu_reference else "n/a"
            cpu = (
                f" {result['cpu_ms_per_step'] / 1000:,.2f} | {result['real_tokens_per_cpu_second']:,.0f} "
                f"| {cpu_ratio} |"
            )
        lines.append(
            f"| {number} | {config['name']} | {describe(config)} | {result['real_tokens_per_sec']:,.0f}{spread_text} "
            f"| {ratio} | {result['computed_tokens_per_sec']:,.0f} | {result['step_time_ms']:,.0f} |{cpu} {mfu} "
            f"| {result['peak_memory_mib']:,.0f} |"
        )
    if any(result.get("mfu") is not None for result in rows):
        lines.append(
            "\nMFU = model FLOPs per step / step time / the GPU's dense peak for the dtype (PEAK_FLOPS); "
            "FLOPs per step = 6·N_dense·tokens + 12·L·d·T·tokens + 6·(d² + d·V)·predicted tokens, "
            "N_dense = L·(4·d² + 2·d·ff) (training_flops)."
        )
    return "\n".join(lines)


def machine_description() -> str:
    """One line naming the machine: CPU model and cores, GPU if any, torch version."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} CPU cores{gpu}; torch {torch.__version__}; load average {load} (1/5/15 min) "
        "at the end"
    )


def median_over_rounds(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine one row's rounds: the median of each figure, the range of real tokens/s."""
    good = [m for m in measurements if m.get("status") == "ok"]
    if not good:
        return measurements[-1]
    combined = {"status": "ok", "rounds": measurements}
    for key in (
        "real_tokens_per_sec",
        "computed_tokens_per_sec",
        "step_time_ms",
        "peak_memory_mib",
        "mfu",
        "cpu_ms_per_step",
        "real_tokens_per_cpu_second",
    ):
        values = [m[key] for m in good if m.get(key) is not None]
        combined[key] = statistics.median(values) if values else None
    values = [m["real_tokens_per_sec"] for m in good]
    combined["real_tokens_per_sec_range"] = [min(values), max(values)]
    return combined


def data_settings(
    dataset: str, dataset_config: str | None, tokenizer: str, work_dir: Path, **extra: Any
) -> dict[str, Any]:
    """Resolve the benchmark's data: "synthetic" makes a corpus and a BPE tokenizer; a dataset gets a short copy."""
    if dataset == "synthetic":  # made once per work_dir, reused by later calls with the same work_dir
        corpus = work_dir / "synthetic_corpus"
        if not (corpus / "validation.txt").is_file():
            synthetic_corpus(corpus)
        if tokenizer in ("bpe", "synthetic"):
            tokenizer = work_dir / "bpe_tokenizer"
            if not (tokenizer / "tokenizer.json").is_file():
                bpe_tokenizer_folder(corpus, tokenizer, vocab_size=32768)
        return {"dataset": str(corpus), "original_dataset": str(corpus), "tokenizer": str(tokenizer), **extra}
    corpus = prepare_corpus(dataset, dataset_config, work_dir / "corpus")
    return {
        "dataset": str(corpus),
        "original_dataset": dataset,
        "original_dataset_config": dataset_config,
        "tokenizer": tokenizer,
        **extra,
    }


def throughput(
    suite: str = "cpu",
    configs: str | None = None,
    rounds: int = 1,
    window: int = 5,
    windows: int = 2,
    threads: int | None = None,
    dataset: str = DEFAULT_DATASET,
    dataset_config: str | None = "wikitext-2-v1",
    tokenizer: str = DEFAULT_TOKENIZER,
    upstream_script: str | None = None,
    json_path: str | None = None,
    markdown_path: str | None = None,
    work_dir: str | None = None,
    timeout_s: int = 1800,
    time_limit_s: float | None = None,
    dry_run: bool = False,
) -> None:
    """Benchmark training throughput; print a markdown table, one row per configuration.

    Args:
        suite: Which rows: cpu (upstream's model, batch 32 x 128), cpu512 (batch 8 x 512), cpu-default
            (train_bert.py's model in fp32 / bf16, eager / compiled), cpu-ds (the DeepSpeed script on the CPU), gpu
            (BERT-base on GPU 0), smoke (tiny, seconds).
        configs: Instead of a suite, a JSON file with a list of rows ({"name", "kind", "flags"}).
        rounds: Run the whole list this many times, interleaved; the table shows medians (and the range).
        window: Steps per log window. The first window is warm-up (and compilation); then `windows` are timed.
        windows: Timed windows per configuration.
        threads: torch threads in each run (default: torch's choice, one per core).
        dataset: Text to train on (a datasets folder, a folder of .txt files, or "synthetic" for a made-up corpus).
        dataset_config: The dataset's configuration name.
        tokenizer: A tokenizer folder (or "bpe" with the synthetic dataset: train one once).
        upstream_script: Path to a local copy of upstream's HelloDeepSpeed train_bert.py: adds a row that runs it
            unchanged, right after the upstream-style row (needs deepspeed installed; pytz and sh are stubbed).
        json_path: Also write every measurement (all rounds) as JSON here.
        markdown_path: Also write the table (with the machine and the command) here.
        work_dir: Keep the runs' files here (default: a temporary folder, removed at the end).
        timeout_s: Kill a configuration's run after this many seconds (it is reported as failed).
        time_limit_s: Stop the whole benchmark after this many seconds: runs are cut at the limit and rows not
            started by then are reported as skipped (the GPU check uses it to end in time).
        dry_run: Run the GPU suites' rows with tiny dims on the CPU (checks the rows work, measures nothing).
    """
    deadline = time.monotonic() + time_limit_s if time_limit_s else math.inf
    stop_children_on_exit()
    rows = json.loads(Path(configs).read_text()) if configs else suite_rows(suite, dry_run)
    if upstream_script:  # right after the upstream-style row, with its dims, batch and length
        baseline = (
            rows[0]
            if rows[0]["kind"] == "upstream-style"
            else row("", "", **UPSTREAM_DIMS, batch_size=32, max_seq_length=128)
        )
        rows.insert(
            1 if rows[0]["kind"] == "upstream-style" else 0,
            {**baseline, "name": "upstream's train_bert.py, unchanged, fp32", "kind": "upstream"},
        )
    with working_directory(work_dir) as directory:
        data = data_settings(
            dataset,
            dataset_config,
            tokenizer,
            directory,
            window=window,
            windows=windows,
            threads=threads,
            upstream_script=upstream_script,
        )
        measurements: list[list[dict[str, Any]]] = [[] for _ in rows]
        for round_number in range(rounds):
            for index, config in enumerate(rows):
                job_dir = directory / f"round{round_number}" / f"row{index}"
                left = deadline - time.monotonic()
                if left < 10:
                    measurements[index].append({"status": "skipped (time limit)"})
                    continue
                result = child_result(run_child("run_one", config, data, job_dir, min(timeout_s, left)), job_dir)
                measurements[index].append(result)
                print(
                    f"[round {round_number + 1}/{rounds}] {config['name']}: "
                    f"{format_value(result.get('real_tokens_per_sec'))} real tokens/s ({result['status']})",
                    file=sys.stderr,
                    flush=True,
                )
    results = [{"config": config, **median_over_rounds(m)} for config, m in zip(rows, measurements)]
    table = markdown_table(results)
    header = f"Machine: {machine_description()}.\nCommand: `{command_line()}`\n"
    print(header + "\n" + table)
    if markdown_path:
        Path(markdown_path).write_text(header + "\n" + table + "\n")
    if json_path:
        Path(json_path).write_text(
            json.dumps({"machine": machine_description(), "command": command_line(), "results": results}, indent=2)
        )


def command_line() -> str:
    """The command that produced this output, as typed (relative to the project root)."""
    script = os.path.relpath(Path(sys.argv[0]).resolve(), ROOT) if sys.argv else "benchmarks/benchmark.py"
    return shlex.join(["python", script, *sys.argv[1:]])


@contextlib.contextmanager
def working_directory(path: str | None):
    """`path` (created) or a temporary folder removed afterwards."""
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix="bert_benchmark.") as temporary:
            yield Path(temporary)


# ----------------------------------------------------------------------------------------------------------------------
# Profile: where one training step's time goes, inside train_bert.py's own loop.
# ----------------------------------------------------------------------------------------------------------------------


def profile(
    dtype: str = "fp32",
    dropout: float = 0.1,
    compile: bool = False,
    batch_size: int = 32,
    max_seq_length: int = 128,
    window: int = 3,
    threads: int | None = None,
    rows: int = 15,
    model: str = "upstream",
    local_rank: int = -1,
    dataset: str = DEFAULT_DATASET,
    dataset_config: str | None = "wikitext-2-v1",
    tokenizer: str = DEFAULT_TOKENIZER,
) -> None:
    """Run train_bert.py's train() and profile one log window after a warm-up window.

    Prints torch.profiler's table of the operators with the most time of their own (self CPU time, or self CUDA
    time on a GPU), over `window` steps: the top costs to attack first.

    Args:
        model: default (train_bert.py's model), upstream (HelloDeepSpeed's 6 x 256), bert-base (12 x 768, learned
            positions) or bert-base-rotary.
        local_rank: -1 for the CPU, 0 for GPU 0.
        dtype: fp32, bf16 or fp16.
        dropout: The model's dropout (0 lets attention use the fused flash kernel on CPU).
        compile: Profile the --compile loss.
        batch_size: Blocks per step.
        max_seq_length: Tokens per block.
        window: Steps per log window: one window warms up, the next is profiled.
        threads: torch threads (default: one per core).
        rows: Operators shown.
        dataset: Training text.
        dataset_config: The dataset's configuration name.
        tokenizer: The tokenizer folder.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dims = {
        "default": {},
        "upstream": UPSTREAM_DIMS,
        "bert-base": BERT_BASE_DIMS,
        "bert-base-rotary": {**BERT_BASE_DIMS, "positions": "rotary"},
    }.get(model)
    if dims is None:
        raise errors.ConfigError(f"--model must be default, upstream, bert-base or bert-base-rotary; got {model!r}")
    if threads:
        torch.set_num_threads(threads)
    on_gpu = local_rank >= 0
    profiler = torch_profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])])
    original_log = MetricsLogger.log
    logged = []

    def log(self: MetricsLogger, record: dict[str, Any]) -> None:
        original_log(self, record)
        if "tokens_per_sec" in record:
            logged.append(record)
            if len(logged) == 1:
                profiler.start()
            else:
                profiler.stop()
                raise MeasurementDone

    MetricsLogger.log = log
    with working_directory(None) as directory, contextlib.suppress(MeasurementDone):
        data = data_settings(dataset, dataset_config, tokenizer, directory)
        train_bert.train(
            checkpoint_dir=str(directory),
            dataset=data["dataset"],
            dataset_config=None,
            tokenizer=data["tokenizer"],
            **dims,
            batch_size=batch_size,
            max_seq_length=max_seq_length,
            dtype=dtype,
            dropout=dropout,
            compile=compile,
            local_rank=local_rank,
            log_every=window,
            num_iterations=3 * window,
            eval_every=3 * window,
            checkpoint_every=3 * window,
        )
    mfu = f", MFU {100 * logged[-1]['mfu']:.1f}%" if logged[-1].get("mfu") else ""
    print(f"{model}, {window} steps, {logged[-1]['step_time_ms']:.0f} ms/step{mfu} ({machine_description()}):")
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=rows))


def ceiling(
    threads: int = 1, size: int = 2048, batch_size: int = 32, max_seq_length: int = 128, vocab_size: int = 50265
) -> None:
    """The fastest a training step could be here: large-matmul FLOP/s per dtype against the model's FLOPs per token.

    Prints the best of 5 [size x size] @ [size x size] products in fp32 and bf16 with `threads` threads, the
    training FLOPs per token of upstream's model on packed blocks (training_flops, 15% of the
    non-special tokens predicted), and the tokens/s that would take at 100% of each ceiling: no real step can
    beat that, since everything besides the matrix products only adds time.

    Args:
        threads: torch threads.
        size: Matrix side of the measured products.
        batch_size: Blocks per step.
        max_seq_length: Tokens per block.
        vocab_size: Vocabulary (roberta-base's by default).
    """
    from transformers import RobertaConfig

    torch.set_num_threads(threads)
    config = RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=UPSTREAM_DIMS["h_dim"],
        num_hidden_layers=UPSTREAM_DIMS["num_layers"],
        intermediate_size=UPSTREAM_DIMS["ff_dim"],
        num_attention_heads=UPSTREAM_DIMS["num_heads"],
    )
    tokens = batch_size * max_seq_length
    predicted = 0.15 * batch_size * (max_seq_length - 2)
    per_token = training_flops(config, tokens, predicted, max_seq_length) / tokens
    print(f"{machine_description()}; {threads} thread(s)")
    shape = describe(row("", "", **UPSTREAM_DIMS, batch_size=batch_size, max_seq_length=max_seq_length))
    print(f"training FLOPs per token, {shape}, vocab {vocab_size}: {per_token / 1e6:.1f} MFLOP")
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        best = 0.0
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
        print(f"{str(dtype).split('.')[1]}: {best / 1e9:.0f} GFLOP/s -> at most {best / per_token:,.0f} tokens/s")


# ----------------------------------------------------------------------------------------------------------------------
# Memory over a long run: the process's resident memory at every log line.
# ----------------------------------------------------------------------------------------------------------------------


def memory(
    steps: int = 120,
    log_every: int = 10,
    prediction_bucket: int = train_bert.PREDICTION_BUCKET,
    num_layers: int = 6,
    h_dim: int = 256,
    ff_dim: int = 1024,
    num_heads: int = 8,
    batch_size: int = 32,
    max_seq_length: int = 128,
    dataset: str = DEFAULT_DATASET,
    dataset_config: str | None = "wikitext-2-v1",
    tokenizer: str = DEFAULT_TOKENIZER,
) -> None:
    """Train `steps` steps and print the resident memory (RSS, now and peak) at each log line: it must stay flat.

    `--prediction_bucket 1` turns off the padding of the predicted positions (sparse_batch), which brings back a
    head of a different shape at every step, and with it the heap growth that the padding cures.

    Args:
        steps: Training steps.
        log_every: Steps between measurements.
        prediction_bucket: train_bert.PREDICTION_BUCKET for this run.
        num_layers: Model layers.
        h_dim: Hidden size.
        ff_dim: Feed-forward width.
        num_heads: Attention heads.
        batch_size: Blocks per step.
        max_seq_length: Tokens per block.
        dataset: Training text.
        dataset_config: The dataset's configuration name.
        tokenizer: The tokenizer folder.
    """
    import psutil

    train_bert.PREDICTION_BUCKET = prediction_bucket
    process, rows = psutil.Process(), []
    original_log = MetricsLogger.log

    def log(self: MetricsLogger, record: dict[str, Any]) -> None:
        original_log(self, record)
        if "tokens_per_sec" in record:
            rows.append((record["step"], process.memory_info().rss / 2**20, record["peak_memory_mib"]))
            if record["step"] == steps:
                raise MeasurementDone  # skip the final evaluation and export: not what is measured

    MetricsLogger.log = log
    with working_directory(None) as directory, contextlib.suppress(MeasurementDone):
        train_bert.train(
            checkpoint_dir=str(directory),
            dataset=dataset,
            dataset_config=dataset_config,
            tokenizer=tokenizer,
            num_layers=num_layers,
            h_dim=h_dim,
            ff_dim=ff_dim,
            num_heads=num_heads,
            batch_size=batch_size,
            max_seq_length=max_seq_length,
            num_iterations=steps,
            log_every=log_every,
            eval_every=10**9,
            checkpoint_every=10**9,
        )
    print(
        f"{num_layers}L/{h_dim}/{ff_dim}/{num_heads}h, batch {batch_size} x {max_seq_length}, prediction bucket "
        f"{prediction_bucket}; {machine_description()}\n"
    )
    print("| step | RSS (MiB) | peak RSS (MiB) |\n|---:|---:|---:|")
    for step, rss, peak in rows:
        print(f"| {step} | {rss:,.0f} | {peak:,.0f} |")
    print(
        f"\nRSS from step {rows[0][0]} to {rows[-1][0]}: {rows[-1][1] - rows[0][1]:+,.0f} MiB; peak "
        f"{rows[-1][2] - rows[0][2]:+,.0f} MiB"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Time to quality: train each recipe for the same wall-clock budget, then one evaluation with fixed masks.
# ----------------------------------------------------------------------------------------------------------------------

# Upstream's defaults (HelloDeepSpeed train_bert.py): batch 8 of lines up to 512 tokens, ff 512, Adam lr 1e-4.
UPSTREAM_RECIPE = row(
    "upstream-style defaults", "upstream-style", **UPSTREAM_DIMS, batch_size=8, max_seq_length=512, dropout=0.1
)
EVAL_BATCH_SIZE, EVAL_SEED = 32, 1234
# The flags a ttq table shows for a train_bert.py / train_bert_ds.py recipe, as the run resolved them.
TTQ_KEY_FLAGS = (
    "lr",
    "warmup_steps",
    "num_iterations",
    "time_budget",
    "batch_size",
    "dtype",
    "compile",
    "dropout",
    "num_layers",
    "h_dim",
    "ff_dim",
    "positions",
    "max_seq_length",
)


def recipe(spec: str | dict[str, Any]) -> dict[str, Any]:
    """A recipe from its name or a dict of flags.

    Names: "default" (train_bert.py's defaults), "upstream" (upstream's defaults, run by the upstream-style
    baseline), "run_mlm" (Hugging Face's run_mlm.py with its own defaults and train_bert.py's default model shape
    and sequence length, the flags it takes; needs --run_mlm_script). A dict may name itself ("name") and the script
    ("kind", default "plain"); its other keys are train() flags (for kind "ds", "warmup_fraction" sets --warmup_steps
    to that share of the steps fitted to the budget).
    """
    if spec == "upstream":
        return UPSTREAM_RECIPE
    if spec == "default":
        return row("train_bert.py defaults", "plain")
    if spec == "run_mlm":
        shape = {
            name: train_bert_default(name) for name in ("num_layers", "h_dim", "ff_dim", "num_heads", "max_seq_length")
        }
        return row("Hugging Face run_mlm.py defaults, same model", "run_mlm", **shape)
    if isinstance(spec, dict):
        flags = {key: value for key, value in spec.items() if key not in ("name", "kind")}
        name = spec.get("name") or ("train_bert.py " + " ".join(f"--{k} {v}" for k, v in flags.items()))
        return row(name, spec.get("kind", "plain"), **flags)
    raise errors.ConfigError(f"a recipe is 'default', 'upstream', 'run_mlm' or a dict of flags; got {spec!r}")


def ttq_one(job: str) -> None:
    """Child entry point of time-to-quality: train one recipe for the budget, evaluate it, write the result."""
    job_path, config, data = read_job(job)
    work_dir = job_path.parent
    trainers = {"upstream-style": train_upstream_style_for_budget, "run_mlm": train_run_mlm_for_budget}
    try:
        trained = trainers.get(config["kind"], train_script_for_budget)(config, data, work_dir)
        model, tokenizer = trained.pop("model"), trained.pop("tokenizer")
        result = {
            "status": "ok",
            **trained,
            **validation_losses(model, tokenizer, data),
            "fill_mask": fill_mask_predictions(model, tokenizer, work_dir),
        }
    except Exception as error:  # noqa: BLE001
        result = {"status": f"failed: {type(error).__name__}: {str(error)[:300]}"}
    (work_dir / "result.json").write_text(json.dumps(result))


def train_script_for_budget(config: dict[str, Any], data: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    """Run the script's train() for the budget.

    train_bert.py recipes without --num_iterations run with --time_budget (the run ends itself, its schedule
    fitted to the budget, its end-of-run evaluation and export inside it). Others (the DeepSpeed script, or a
    recipe with a step count) get SIGTERM when the budget is spent (they save a checkpoint and stop). The budget
    starts when the training loop starts (after data and model are ready, as for the baselines).
    """
    module = train_bert if config["kind"] == "plain" else importlib.import_module("train_bert_ds")
    flags = {
        "checkpoint_dir": str(work_dir / "experiments"),
        "dataset": data["dataset"],
        "dataset_config": None,
        "tokenizer": data["tokenizer"],
        "keep_last": 1,
        "log_every": 50,
        **config["flags"],
    }
    own_budget = config["kind"] == "plain" and "num_iterations" not in flags
    if own_budget:
        flags["time_budget"] = data["budget_s"]
    flags.setdefault("eval_every", flags.get("num_iterations", 10**6))
    flags.setdefault("checkpoint_every", flags.get("num_iterations", 10**6))
    timing: dict[str, float] = {}
    original_loop = module.training_loop

    def budgeted_loop(*args: Any, **kwargs: Any) -> Any:
        # A run with its own budget ends by itself; the signal is only a safety net for one that would not.
        timer = threading.Timer(data["budget_s"] * (1.5 if own_budget else 1), os.kill, (os.getpid(), signal.SIGTERM))
        timing["start"] = time.perf_counter()
        timer.start()
        try:
            return original_loop(*args, **kwargs)
        finally:
            timing["seconds"] = time.perf_counter() - timing["start"]
            timer.cancel()

    module.training_loop = budgeted_loop
    try:
        module.train(**flags)
    except errors.TrainingInterrupted:  # it leaves SIGTERM ignored, expecting the process to exit; this goes on
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    experiment_dir = next((work_dir / "experiments").glob("bert_pretrain.*"))
    hparams = json.loads((experiment_dir / "hparams.json").read_text())
    resolved = hparams["flags"]
    tokenizer = load_tokenizer(str(experiment_dir / "tokenizer"))
    if config["kind"] == "ds":
        # A DeepSpeed checkpoint is DeepSpeed's own format; the run's export at its end is the model to evaluate.
        # Its step count was fitted to end inside the budget, so only a much slower run than calibrated lacks it.
        if safeguards.COMPLETED_KEY not in hparams:
            raise RuntimeError(f"{experiment_dir} has no hf_model/: the run was stopped before its end")
        from transformers import AutoModelForMaskedLM

        model = AutoModelForMaskedLM.from_pretrained(experiment_dir / "hf_model")
        steps = hparams[safeguards.COMPLETED_KEY]
    else:
        checkpoint = safeguards.load_latest_checkpoint(experiment_dir)
        model = train_bert.create_model(
            resolved["num_layers"],
            resolved["num_heads"],
            resolved["ff_dim"],
            resolved["h_dim"],
            resolved["dropout"],
            tokenizer,
            resolved["max_seq_length"],
            resolved.get("init_from"),
            positions=resolved["positions"],
        )
        model.load_state_dict(checkpoint["model"])
        steps = checkpoint["step"]
    return {
        "model": model,
        "tokenizer": tokenizer,
        "steps": steps,
        "train_seconds": timing["seconds"],
        "tokens_trained": (steps * resolved["batch_size"] * resolved["max_seq_length"] * resolved["grad_accum_steps"]),
        "flags": {
            key: resolved[key]
            for key in TTQ_KEY_FLAGS
            if resolved.get(key) is not None and not (key == "num_iterations" and resolved.get("time_budget"))
        },
    }


def train_upstream_style_for_budget(config: dict[str, Any], data: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    """Train the upstream-style baseline until the budget is spent (it has no schedule to fit)."""
    import upstream_style

    flags = config["flags"]
    tokenizer = load_tokenizer(data["tokenizer"])
    texts = [text for text in load_text_dataset(data["dataset"], None)["train"]["text"] if text.strip()]
    torch.manual_seed(42)
    model = upstream_style.upstream_style_model(
        tokenizer,
        flags["num_layers"],
        flags["num_heads"],
        flags["ff_dim"],
        flags["h_dim"],
        flags.get("dropout", 0.1),
        flags["max_seq_length"],
    )
    batches = upstream_style.upstream_style_batches(texts, tokenizer, flags["batch_size"], flags["max_seq_length"])
    real_tokens = []
    start = time.perf_counter()
    steps = upstream_style.train_upstream_style(
        model,
        batches,
        tokenizer.pad_token_id,
        should_stop=lambda _, seconds: seconds >= data["budget_s"],
        on_step=lambda step, seconds, real, padded, loss: real_tokens.append(real),
    )
    return {
        "model": model,
        "tokenizer": tokenizer,
        "steps": steps,
        "train_seconds": time.perf_counter() - start,
        "tokens_trained": sum(real_tokens),
        "flags": {
            "lr": upstream_style.UPSTREAM_LR,
            "batch_size": flags["batch_size"],
            "dtype": "fp32",
            "dropout": flags.get("dropout", 0.1),
            "ff_dim": flags["ff_dim"],
            "max_seq_length": flags["max_seq_length"],
        },
    }


def train_run_mlm_for_budget(config: dict[str, Any], data: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    """Run Hugging Face's run_mlm.py (a local copy given by --run_mlm_script), unchanged, for the budget.

    It trains from scratch with its own defaults (Trainer: AdamW lr 5e-5, batch 8, linear decay over 3 epochs, no
    warmup; the RoBERTa config's dropout 0.1), on the same text and tokenizer, with the flags it takes from ours:
    the model shape (--config_overrides) and --max_seq_length. It has no time limit, so a TrainerCallback (added
    to every Trainer it builds) stops it when the budget is spent, counted from its first step; it then saves the
    model as it always does and the benchmark evaluates that. `evaluate` (imported by the script, used only with
    --do_eval) is stubbed if not installed.
    """
    import transformers

    if importlib.util.find_spec("evaluate") is None:
        sys.modules["evaluate"] = types.ModuleType("evaluate")
    flags, budget_s, timing = config["flags"], data["budget_s"], {}

    class StopAtBudget(transformers.TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timing["start"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if time.perf_counter() - timing["start"] >= budget_s:
                control.should_training_stop = True

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timing["seconds"], timing["steps"] = time.perf_counter() - timing["start"], state.global_step

    original_init = transformers.Trainer.__init__

    def init_with_budget(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.add_callback(StopAtBudget())

    transformers.Trainer.__init__ = init_with_budget
    output_dir = work_dir / "run_mlm"
    overrides = (
        f"num_hidden_layers={flags['num_layers']},hidden_size={flags['h_dim']},"
        f"intermediate_size={flags['ff_dim']},num_attention_heads={flags['num_heads']}"
    )
    sys.argv = [
        "run_mlm.py",
        "--model_type",
        "roberta",
        "--config_overrides",
        overrides,
        "--tokenizer_name",
        data["tokenizer"],
        "--train_file",
        str(Path(data["dataset"]) / "train.txt"),
        "--validation_file",
        str(Path(data["dataset"]) / "validation.txt"),
        "--max_seq_length",
        str(flags["max_seq_length"]),
        "--do_train",
        "--output_dir",
        str(output_dir),
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--logging_steps",
        "50",
    ]
    spec = importlib.util.spec_from_file_location("run_mlm", data["run_mlm_script"])
    run_mlm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_mlm)
    run_mlm.main()

    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(output_dir, attn_implementation="sdpa")
    trainer_state = json.loads((output_dir / "trainer_state.json").read_text())
    batch_size = trainer_state.get("train_batch_size") or 8
    return {
        "model": model,
        "tokenizer": AutoTokenizer.from_pretrained(output_dir),
        "steps": timing["steps"],
        "train_seconds": timing["seconds"],
        "tokens_trained": timing["steps"] * batch_size * flags["max_seq_length"],
        "flags": {
            "lr": 5e-5,
            "batch_size": batch_size,
            "dtype": "fp32",
            "dropout": 0.1,
            "num_layers": flags["num_layers"],
            "h_dim": flags["h_dim"],
            "ff_dim": flags["ff_dim"],
            "max_seq_length": flags["max_seq_length"],
        },
    }


def fill_mask_predictions(model: torch.nn.Module, tokenizer: Any, work_dir: Path) -> list[list[str]]:
    """The top-5 fill-mask tokens of the README's sentence (train_bert.FILL_MASK_SENTENCE) for the trained model."""
    folder = work_dir / "final_model"
    model.save_pretrained(folder)
    # The longest input the model's position table allows (RoBERTa numbers positions from pad_token_id + 1).
    tokenizer.model_max_length = model.config.max_position_embeddings - model.config.pad_token_id - 1
    tokenizer.save_pretrained(folder)
    return train_bert.fill_mask_demo(folder, torch.device("cpu"))


def validation_losses(model: torch.nn.Module, tokenizer: Any, data: dict[str, Any]) -> dict[str, float]:
    """MLM loss on the original dataset's validation split, 15% masking with masks fixed by EVAL_SEED, two ways.

    - packed: the split packed into 128-token blocks (train_bert.py's format), also the masked-token accuracy
      (the share of masked tokens whose top prediction is right), split by what the input showed at the position
      (<mask>: 80%; a random token: 10%; the token itself, unchanged: 10%, where copying the input is right) and,
      for scale, the accuracy of predicting the most frequent masked token everywhere (where a model stuck on the
      unigram plateau sits);
    - lines: each line alone, `<s> line </s>` truncated to 128 tokens and padded (upstream's format).
    (128 is `eval_seq_length`'s default.)
    Both are token-weighted means over the predicted tokens, in fp32, with the same masking rule.
    """
    import upstream_style

    model.eval()
    validation = load_text_dataset(data["original_dataset"], data.get("original_dataset_config"))["validation"]
    if data.get("validation_lines"):
        validation = validation.select(range(min(data["validation_lines"], len(validation))))
    masking = train_bert.MaskingConfig(tokenizer, 0.15, 0.1, 0.1)
    seq_length = data["eval_seq_length"]
    tokens = np.concatenate(token_store.tokenize_lines(validation, tokenizer)["input_ids"]).astype(np.int64)
    blocks = train_bert.pack_blocks(tokens, tokenizer, seq_length)
    batches = train_bert.EvalBatches(blocks, EVAL_BATCH_SIZE, EVAL_SEED, masking)
    packed = torch.zeros(2, dtype=torch.float64)
    by_input = {"mask": [0, 0], "random": [0, 0], "unchanged": [0, 0]}  # [correct, predicted] per input shown
    with torch.no_grad():
        for batch in batches:
            hidden = model.base_model(input_ids=batch["input_ids"]).last_hidden_state
            logits = train_bert.mlm_head(model)(hidden.flatten(0, 1).index_select(0, batch["masked_positions"])).float()
            loss_sum = torch.nn.functional.cross_entropy(logits, batch["masked_labels"], reduction="sum")
            labels = batch["masked_labels"]
            predicted = labels != train_bert.IGNORE_INDEX  # not the bucket's padding
            packed += torch.tensor([float(loss_sum), int(predicted.sum())], dtype=torch.float64)
            shown = batch["input_ids"].flatten().index_select(0, batch["masked_positions"])
            right = logits.argmax(-1) == labels
            for kind, where in (
                ("mask", shown == tokenizer.mask_token_id),
                ("unchanged", shown == labels),
                ("random", (shown != tokenizer.mask_token_id) & (shown != labels)),
            ):
                by_input[kind][0] += int((right & where & predicted).sum())
                by_input[kind][1] += int((where & predicted).sum())
    correct = sum(right for right, _ in by_input.values())
    labels = torch.cat([batch["masked_labels"] for batch in batches])
    labels = labels[labels != train_bert.IGNORE_INDEX]
    most_frequent_share = float(labels.bincount().max()) / len(labels)

    lines = [text for text in validation["text"] if text.strip()]
    generator = train_bert.seeded_generator(EVAL_SEED, 0x11E5)
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(lines), EVAL_BATCH_SIZE):
            encoded = tokenizer(
                lines[start : start + EVAL_BATCH_SIZE],
                truncation=True,
                max_length=seq_length,
                padding=True,
                return_tensors="pt",
            )
            masked, labels = train_bert.masking_function(encoded["input_ids"], tokenizer, generator=generator)
            labels = labels.masked_fill(labels == train_bert.IGNORE_INDEX, tokenizer.pad_token_id)
            batch = {"input_ids": masked, "labels": labels, "attention_mask": encoded["attention_mask"]}
            loss_sum = upstream_style.upstream_style_loss(model, batch, tokenizer.pad_token_id, reduction="sum")
            totals += torch.tensor(
                [float(loss_sum), float((labels != tokenizer.pad_token_id).sum())], dtype=torch.float64
            )
    return {
        "val_loss_packed": float(packed[0] / packed[1]),
        "val_loss_lines": float(totals[0] / totals[1]),
        "val_accuracy_packed": correct / float(packed[1]),
        "val_most_frequent_token_share": most_frequent_share,
        "val_accuracy_by_input": by_input,
        "val_tokens_packed": int(packed[1]),
        "val_tokens_lines": int(totals[1]),
    }


def ttq(
    budget_s: float = 600,
    recipes: Any = ("default", "upstream"),
    side_by_side: bool = True,
    threads: int | None = None,
    fit_schedule: bool = True,
    dataset: str = DEFAULT_DATASET,
    dataset_config: str | None = "wikitext-2-v1",
    tokenizer: str = DEFAULT_TOKENIZER,
    run_mlm_script: str | None = None,
    json_path: str | None = None,
    markdown_path: str | None = None,
    png_path: str | None = None,
    previous_json: Any = (),
    validation_lines: int | None = None,
    eval_seq_length: int = 128,
    work_dir: str | None = None,
) -> None:
    """Time to quality: train each recipe for `budget_s` seconds, then report its validation MLM loss and accuracy.

    Args:
        budget_s: Wall-clock seconds of training per recipe (from the first step; setup is not counted).
        recipes: A list of recipes: "default" (train_bert.py's defaults), "upstream" (upstream's defaults, run by
            the upstream-style baseline), "run_mlm" (Hugging Face's run_mlm.py, see --run_mlm_script) or dicts of
            train() flags, e.g. '[{"lr": 2e-3}, "upstream"]'.
        side_by_side: Run all recipes at the same time (each with `threads` threads, default cores / recipes), so
            a busy machine slows them alike; otherwise one after the other with all cores.
        threads: torch threads per recipe.
        fit_schedule: For train_bert_ds.py recipes without --num_iterations (train_bert.py recipes use its own
            --time_budget): first time a few steps of each and set num_iterations to the steps that fit the budget.
        dataset: Train and validation text (the validation split is evaluated in full).
        dataset_config: The dataset's configuration name.
        tokenizer: The tokenizer folder.
        run_mlm_script: Path to a local copy of Hugging Face's examples/pytorch/language-modeling/run_mlm.py (run
            unchanged; needs accelerate) for the "run_mlm" recipe.
        json_path: Also write the results as JSON here.
        markdown_path: Also write the table here.
        png_path: Also draw validation loss vs budget (minutes) per recipe, from this run and `previous_json`.
        previous_json: Earlier ttq JSON files (other budgets) to draw in the same picture.
        validation_lines: Evaluate on only the first this many lines of the validation split (default: all).
        eval_seq_length: Block length (and line truncation) of the evaluation; at most every recipe's length.
        work_dir: Keep the runs' files here (default: a temporary folder, removed at the end).
    """
    rows = [recipe(spec) for spec in ([recipes] if isinstance(recipes, (str, dict)) else recipes)]
    if any(config["kind"] == "run_mlm" for config in rows) and not (run_mlm_script and Path(run_mlm_script).is_file()):
        raise errors.ConfigError(
            f"the run_mlm recipe needs --run_mlm_script PATH (a local copy of Hugging "
            f"Face's run_mlm.py); got {run_mlm_script!r}"
        )
    previous = [previous_json] if isinstance(previous_json, str) else list(previous_json)
    missing = [path for path in previous if not Path(path).is_file()]
    if missing:
        raise errors.ConfigError(f"--previous_json: no such file(s) {missing}")
    stop_children_on_exit()
    threads = threads or (max(1, (os.cpu_count() or 1) // len(rows)) if side_by_side else None)
    with working_directory(work_dir) as directory:
        data = data_settings(
            dataset,
            dataset_config,
            tokenizer,
            directory,
            budget_s=budget_s,
            threads=threads,
            window=5,
            windows=2,
            validation_lines=validation_lines,
            eval_seq_length=eval_seq_length,
            run_mlm_script=str(Path(run_mlm_script).resolve()) if run_mlm_script else None,
        )
        if fit_schedule:
            fit_num_iterations(rows, data, directory, side_by_side)
        results = run_jobs("ttq_one", rows, data, directory / "ttq", side_by_side, timeout_s=budget_s * 3 + 1200)
    table = ttq_table(rows, results, budget_s)
    header = (
        f"Machine: {machine_description()}; {threads or 'all'} thread(s) per recipe"
        f"{', recipes side by side' if side_by_side else ''}.\nCommand: `{command_line()}`\n"
    )
    print(header + "\n" + table)
    if markdown_path:
        Path(markdown_path).write_text(header + "\n" + table + "\n")
    report = {
        "machine": machine_description(),
        "command": command_line(),
        "budget_s": budget_s,
        "rows": rows,
        "results": results,
    }
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    if png_path:
        plot_reports([json.loads(Path(path).read_text()) for path in previous] + [report], png_path)


def evaluate(
    *model_dirs: str,
    dataset: str = DEFAULT_DATASET,
    dataset_config: str | None = "wikitext-2-v1",
    validation_lines: int | None = None,
    eval_seq_length: int = 128,
) -> None:
    """Evaluate exported masked LMs (hf_model/ folders) exactly as `ttq` evaluates its recipes; print JSON lines.

    Args:
        model_dirs: Folders with a model and its tokenizer (save_pretrained), e.g. a run's hf_model/.
        dataset: The dataset whose validation split is evaluated (in full unless `validation_lines`).
        dataset_config: The dataset's configuration name.
        validation_lines: Evaluate on only the first this many lines of the validation split.
        eval_seq_length: Block length (and line truncation) of the evaluation.
    """
    from transformers import AutoModelForMaskedLM

    data = {
        "original_dataset": dataset,
        "original_dataset_config": dataset_config,
        "validation_lines": validation_lines,
        "eval_seq_length": eval_seq_length,
    }
    for model_dir in model_dirs:
        if not (Path(model_dir) / "config.json").is_file():
            raise errors.ConfigError(f"{model_dir!r} is not a saved model folder (no config.json)")
        model = AutoModelForMaskedLM.from_pretrained(model_dir)
        print(json.dumps({"model": model_dir, **validation_losses(model, load_tokenizer(model_dir), data)}))


def plot(*json_paths: str, png_path: str = "ttq.png") -> None:
    """Draw validation loss vs budget (minutes), one line per recipe, from ttq JSON files (one per budget)."""
    plot_reports([json.loads(Path(path).read_text()) for path in json_paths], png_path)


def plot_reports(reports: list[dict[str, Any]], png_path: str) -> None:
    """Validation loss and masked-token accuracy (packed blocks, the one evaluation for all) after each budget, one
    line per recipe, as a PNG."""
    import matplotlib  # a benchmark-only dependency, imported where the picture is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[float, float, float]]] = {}
    for report in reports:
        for config, result in zip(report["rows"], report["results"]):
            if result.get("status") == "ok":
                curves.setdefault(config["name"], []).append(
                    (report["budget_s"] / 60, result["val_loss_packed"], 100 * result["val_accuracy_packed"])
                )
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (name, points) in enumerate(curves.items()):
        minutes, losses, accuracies = zip(*sorted(points))
        style = {"marker": "os^D"[index % 4], "linestyle": ("-", "--", ":", "-.")[index % 4], "label": name}
        loss_axes.plot(minutes, losses, **style)  # distinct styles: equal values (e.g. two plateaus) stay visible
        accuracy_axes.plot(minutes, accuracies, **style)
    longest = max((minutes for points in curves.values() for minutes, _, _ in points), default=1)
    for axes, label in ((loss_axes, "validation MLM loss (nats)"), (accuracy_axes, "masked-token accuracy (%)")):
        axes.set_xlim(0, longest * 1.1)
        axes.set_xlabel("training budget (minutes, wall clock)")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    loss_axes.legend(fontsize=8)
    figure.suptitle("After a fixed time budget, one evaluation for all (benchmarks/benchmark.py ttq)")
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    plt.close(figure)


def run_jobs(
    command: str,
    rows: list[dict[str, Any]],
    data: dict[str, Any],
    directory: Path,
    side_by_side: bool,
    timeout_s: float,
) -> list[dict[str, Any]]:
    """Run one child per row, all at once or one after the other; return their results in order."""
    job_dirs = [directory / f"row{index}" for index in range(len(rows))]
    if side_by_side:
        processes = [run_child(command, config, data, job_dir, timeout_s) for config, job_dir in zip(rows, job_dirs)]
        return [child_result(process, job_dir) for process, job_dir in zip(processes, job_dirs)]
    return [
        child_result(run_child(command, config, data, job_dir, timeout_s), job_dir)
        for config, job_dir in zip(rows, job_dirs)
    ]


def fit_num_iterations(rows: list[dict[str, Any]], data: dict[str, Any], directory: Path, side_by_side: bool) -> None:
    """Set num_iterations of each train_bert_ds.py recipe that has none to the steps its measured speed fits."""
    to_fit = [
        index for index, config in enumerate(rows) if config["kind"] == "ds" and "num_iterations" not in config["flags"]
    ]
    if not to_fit:
        return
    # Calibrate every recipe at once when they will run side by side, so each sees the load it will see.
    calibration_rows = (
        [throughput_config(config) for config in rows]
        if side_by_side
        else [throughput_config(rows[index]) for index in to_fit]
    )
    for config in calibration_rows:
        config["flags"].pop("warmup_fraction", None)
    results = run_jobs("run_one", calibration_rows, data, directory / "calibration", side_by_side, timeout_s=1800)
    by_row = dict(zip(range(len(rows)) if side_by_side else to_fit, results))
    for index in to_fit:
        result = by_row[index]
        if result.get("status") != "ok":
            raise RuntimeError(f"calibrating {rows[index]['name']} failed: {result['status']}")
        steps = max(1, int(0.97 * data["budget_s"] / (result["step_time_ms"] / 1000)))
        rows[index]["flags"]["num_iterations"] = steps
        if "warmup_fraction" in rows[index]["flags"]:  # a warmup scaled to the steps that fit
            rows[index]["flags"]["warmup_steps"] = int(rows[index]["flags"].pop("warmup_fraction") * steps)
        print(
            f"{rows[index]['name']}: {result['step_time_ms']:.0f} ms/step -> --num_iterations {steps}",
            file=sys.stderr,
            flush=True,
        )


def train_bert_default(name: str) -> Any:
    """A train() flag's default."""
    import inspect

    return inspect.signature(train_bert.train).parameters[name].default


def throughput_config(config: dict[str, Any]) -> dict[str, Any]:
    """A recipe as a throughput row, with train_bert.py's defaults filled in where the recipe leaves a flag out."""
    names = ("num_layers", "h_dim", "ff_dim", "num_heads", "batch_size", "max_seq_length")
    # train_bert.py's --dtype default ("auto") is not a DeepSpeed precision: there ds_config.json decides.
    defaults = {name: train_bert_default(name) for name in names + (() if config["kind"] == "ds" else ("dtype",))}
    return {**config, "flags": {**defaults, **config["flags"]}}


def ttq_table(rows: list[dict[str, Any]], results: list[dict[str, Any]], budget_s: float) -> str:
    """Time-to-quality results as a markdown table."""
    lines = [
        "| recipe | steps | tokens trained | train time (s) | val loss, packed blocks | masked-token accuracy "
        "| accuracy where the input shows <mask> / the token unchanged | val loss, single lines "
        "| fill-mask top 5 (each <mask>) | key flags |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for config, result in zip(rows, results):
        if result.get("status") != "ok":
            lines.append(f"| {config['name']} | {result['status']} | | | | | | | | |")
            continue
        by_input = {
            kind: f"{100 * right / max(1, predicted):.2f}%"
            for kind, (right, predicted) in result.get("val_accuracy_by_input", {}).items()
        }  # absent from reports made before the split
        flags = ", ".join(f"{key} {value}" for key, value in result["flags"].items())
        fill_mask = " / ".join(
            " ".join(f"`{token}`" if token else "`␣`" for token in candidates)
            for candidates in result.get("fill_mask") or []
        )
        lines.append(
            f"| {config['name']} | {result['steps']:,} | {result['tokens_trained']:,} | "
            f"{result['train_seconds']:.0f} | {result['val_loss_packed']:.3f} | "
            f"{100 * result['val_accuracy_packed']:.2f}% | {by_input.get('mask', '-')} / "
            f"{by_input.get('unchanged', '-')} | {result['val_loss_lines']:.3f} | {fill_mask} "
            f"| {flags} |"
        )
    shares = [result["val_most_frequent_token_share"] for result in results if result.get("status") == "ok"]
    if shares:
        lines.append(
            f"\nPredicting the most frequent masked token everywhere (the unigram plateau) scores "
            f"{100 * shares[0]:.2f}% masked-token accuracy on these masks."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import fire

    fire.Fire(
        {
            "throughput": throughput,
            "ttq": ttq,
            "evaluate": evaluate,
            "plot": plot,
            "profile": profile,
            "ceiling": ceiling,
            "memory": memory,
            "run_one": run_one,
            "ttq_one": ttq_one,
        }
    )

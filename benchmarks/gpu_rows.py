"""The GPU check's rows: the training scripts run as a user runs them (their command lines), read back from the
metrics.jsonl and hparams.json they write.

    python benchmarks/gpu_rows.py throughput --out_dir DIR [--before OLD_train_bert.py] [--deadline_s 300]
    python benchmarks/gpu_rows.py budget --out_dir DIR [--time_budget 90s] [--deadline_s 250]
    python benchmarks/gpu_rows.py throughput --out_dir DIR --dry_run True   # tiny, on the CPU: checks the rows run

throughput: BERT-base (12 x 768, 12 heads, ff 3072), bf16, batch 256 x 128, dropout 0.1, --compile True, the
steady state after the first `--warmup_steps` steps: train_bert.py with rotary and learned positions,
train_bert_ds.py with ds_config.json as shipped, and, with --before, an older train_bert.py (the same flags) for a
before/after comparison. A run is killed once its last window is logged (no checkpoint or export is timed).
budget: `train_bert.py --time_budget 90s` with the defaults (the model sized for the budget and the device) against
the same with --auto_size False (the fixed default shape), each run to its end and compared on the same validation
evaluation (its last eval_loss: the same --eval_blocks blocks and masks in both).

Each row gets what is left of `--deadline_s`, so the whole part ends in time; a row cut short says so. Results go
to OUT_DIR/{part}.md and .json, each run's log to OUT_DIR/{part}-{row}.log.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import fire

ROOT = Path(__file__).resolve().parent.parent
BERT_BASE = ["--num_layers=12", "--h_dim=768", "--num_heads=12", "--ff_dim=3072"]
TINY = ["--num_layers=2", "--h_dim=64", "--num_heads=2", "--ff_dim=128"]


def run_row(
    name: str, argv: list[str], work_dir: Path, log_path: Path, timeout_s: float, stop_after_step: int | None = None
) -> dict[str, Any]:
    """Run one training command in `work_dir`'s experiments folder; return its metrics records and hparams.

    With `stop_after_step` the process is killed once that step's log line is in metrics.jsonl."""
    experiments = work_dir / name
    command = [sys.executable, *argv, f"--checkpoint_dir={experiments}"]
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write(shlex.join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        outcome = "finished"
        while process.poll() is None:
            time.sleep(1)
            records = read_metrics(experiments)
            if stop_after_step is not None and any(
                r.get("step", 0) >= stop_after_step and "tokens_per_sec" in r for r in records
            ):
                outcome = "measured"
                break
            if time.monotonic() - started > timeout_s:
                outcome = f"cut at its time limit ({timeout_s:.0f} s)"
                break
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        elif process.returncode != 0:
            outcome = f"failed (exit {process.returncode}; see {log_path.name})"
    hparams = next(experiments.glob("*/hparams.json"), None)
    return {
        "name": name,
        "command": shlex.join(["python", *argv]),
        "outcome": outcome,
        "wall_s": round(time.monotonic() - started, 1),
        "records": read_metrics(experiments),
        "flags": json.loads(hparams.read_text())["flags"] if hparams else {},
    }


def read_metrics(experiments: Path) -> list[dict[str, Any]]:
    """The records of the (one) experiment under `experiments`, [] before it exists."""
    path = next(experiments.glob("*/metrics.jsonl"), None)
    if path is None:
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def steady_state(result: dict[str, Any], warmup_steps: int) -> dict[str, Any]:
    """Time-weighted tokens/s and MFU of the log windows after `warmup_steps`; the first window's step time."""
    windows = [r for r in result["records"] if "tokens_per_sec" in r]
    timed = [r for r in windows if r["step"] > warmup_steps]
    if not timed:
        return {"name": result["name"], "outcome": result["outcome"], "command": result["command"]}
    seconds = [1 / r["tokens_per_sec"] for r in timed]  # per token: weights each window by its time
    return {
        "name": result["name"],
        "outcome": result["outcome"],
        "command": result["command"],
        "tokens_per_s": len(timed) / sum(seconds),
        "mfu": sum(r.get("mfu", 0) * s for r, s in zip(timed, seconds)) / sum(seconds),
        "step_ms": sum(r["step_time_ms"] for r in timed) / len(timed),
        "first_window_step_ms": windows[0]["step_time_ms"],
        "peak_memory_gib": max(r.get("peak_memory_mib", 0) for r in timed) / 1024,
        "steps": timed[-1]["step"],
    }


def budget_summary(result: dict[str, Any]) -> dict[str, Any]:
    """What a budgeted run reached: its shape, steps, last validation and test loss, speed."""
    records, flags = result["records"], result["flags"]
    last = lambda key: next((r[key] for r in reversed(records) if key in r), None)  # noqa: E731
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][1:]
    return {
        "name": result["name"],
        "outcome": result["outcome"],
        "command": result["command"],
        "shape": f"{flags.get('num_layers')} x {flags.get('h_dim')}, batch {flags.get('batch_size')}, "
        f"lr {flags.get('lr')}"
        if flags
        else "",
        "steps": last("step"),
        "eval_loss": last("eval_loss"),
        "test_loss": last("test_loss"),
        "budget_spent_s": last("budget_spent_s"),
        "median_tokens_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,
        "wall_s": result["wall_s"],
    }


def within_deadline(
    rows: list[tuple[str, list[str]]], deadline_s: float, measure: Callable[[str, list[str], float], dict[str, Any]]
) -> list[dict[str, Any]]:
    """`measure(name, argv, seconds_left)` for each row in turn while at least 30 s of `deadline_s` are left; the
    rows after that are reported as skipped."""
    started, results = time.monotonic(), []
    for name, argv in rows:
        left = deadline_s - (time.monotonic() - started)
        if left < 30:
            results.append({"name": name, "outcome": "skipped: the part's deadline", "command": shlex.join(argv)})
        else:
            results.append(measure(name, argv, left))
    return results


def write_report(out_dir: Path, part: str, rows: list[dict[str, Any]], columns: dict[str, str]) -> None:
    """OUT_DIR/part.json (every field) and OUT_DIR/part.md (a table of `columns`: key -> header)."""
    (out_dir / f"{part}.json").write_text(json.dumps(rows, indent=2))
    lines = ["| " + " | ".join(["row", *columns.values(), "outcome"]) + " |", "|" + "---|" * (len(columns) + 2)]
    for row in rows:
        cells = [format_cell(row.get(key)) for key in columns]
        lines.append("| " + " | ".join([row["name"], *cells, row["outcome"]]) + " |")
    lines += ["", "Commands:", ""] + [f"- {row['name']}: `{row['command']}`" for row in rows]
    (out_dir / f"{part}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 1000 else f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


def throughput(
    out_dir: str,
    before: str | None = None,
    deadline_s: float = 300,
    steps: int = 60,
    warmup_steps: int = 30,
    dataset: str = "../shared/data/wikitext",
    tokenizer: str = "../shared/data/roberta-base",
    dry_run: bool = False,
) -> None:
    """BERT-base throughput and MFU rows (see the module docstring). `before`: an older train_bert.py to compare."""
    out, work = Path(out_dir), Path(out_dir) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    shape, batch, device = (TINY, 4, ["--device=cpu"]) if dry_run else (BERT_BASE, 256, [])
    common = [
        *shape,
        f"--batch_size={batch}",
        "--max_seq_length=128",
        "--dropout=0.1",
        "--dtype=bf16",
        "--compile=True",
        f"--num_iterations={steps + 10}",
        "--log_every=10",
        "--eval_every=100000",
        "--checkpoint_every=100000",
        "--eval_blocks=64",
        f"--dataset={dataset}",
        "--dataset_config=wikitext-2-v1",
        f"--tokenizer={tokenizer}",
        "--data_cache=/tmp/gpu_rows_stores",
    ]
    rows = [
        ("train_bert.py rotary", ["train_bert.py", *common, *device]),
        ("train_bert_ds.py rotary, ds_config.json", ["train_bert_ds.py", *common, *device]),
        ("train_bert.py learned", ["train_bert.py", *common, *device, "--positions=learned"]),
    ]
    if before:  # the older script has no --device: its GPU is --local_rank 0
        rows.insert(
            2, ("before: train_bert.py rotary", [before, *common, "--local_rank=-1" if dry_run else "--local_rank=0"])
        )

    def measure(name: str, argv: list[str], left_s: float) -> dict[str, Any]:
        slug = name.split(":")[0].replace(" ", "_").replace(",", "").replace(".", "_")
        result = run_row(slug, argv, work, out / f"throughput-{slug}.log", left_s, stop_after_step=steps)
        return steady_state({**result, "name": name}, warmup_steps)

    results = within_deadline(rows, deadline_s, measure)
    write_report(
        out,
        "throughput",
        results,
        {
            "tokens_per_s": "tokens/s",
            "mfu": "MFU",
            "step_ms": "step (ms)",
            "first_window_step_ms": "first window (ms/step)",
            "peak_memory_gib": "peak memory (GiB)",
        },
    )


def budget(
    out_dir: str,
    time_budget: str = "90s",
    deadline_s: float = 250,
    dataset: str = "../shared/data/wikitext",
    tokenizer: str = "../shared/data/roberta-base",
    dry_run: bool = False,
) -> None:
    """The budget rows: the defaults (auto-sized) against --auto_size False, each given `time_budget`."""
    out, work = Path(out_dir), Path(out_dir) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    common = [
        "train_bert.py",
        f"--time_budget={time_budget}",
        f"--dataset={dataset}",
        "--dataset_config=wikitext-2-v1",
        f"--tokenizer={tokenizer}",
        "--data_cache=/tmp/gpu_rows_stores",
        *(["--device=cpu"] if dry_run else []),
    ]
    rows = [
        ("defaults, --auto_size False (fixed 2 x 128, batch 16)", [*common, "--auto_size=False"]),
        ("defaults (auto-sized for the budget)", common),
    ]

    def measure(name: str, argv: list[str], left_s: float) -> dict[str, Any]:
        slug = "auto" if "--auto_size=False" not in argv else "fixed"
        return budget_summary({**run_row(slug, argv, work, out / f"budget-{slug}.log", left_s), "name": name})

    results = within_deadline(rows, deadline_s, measure)
    write_report(
        out,
        "budget",
        results,
        {
            "shape": "model",
            "steps": "steps",
            "eval_loss": "validation loss",
            "test_loss": "test loss",
            "median_tokens_per_s": "tokens/s",
            "budget_spent_s": "budget spent (s)",
            "wall_s": "wall (s)",
        },
    )


# The DeepSpeed variants of the `ds` part: name -> (what changes against ds_config.json as shipped: a path of keys ->
# value, None deletes the key; extra flags). Counted on the CPU and read in DeepSpeed 0.19.8's source
# (benchmarks/README.md, GPU check, `ds`), the shipped config makes the host wait for the GPU 7 times a step: the
# throughput timer's synchronize at the start of forward and the end of step ("timers": {"throughput": ...}, on by
# default), overlap_comm's synchronize at the end of backward, ZeRO's bf16 overflow check (.item()) and the clip's
# three validity tests of the norm (bool()). train_bert.py waits 0 times between log steps.
NO_TIMER = {("timers",): {"throughput": {"enabled": False}}}
DS_VARIANTS: dict[str, tuple[dict[tuple[str, ...], Any], list[str]]] = {
    "ZeRO-2, no throughput timer, check_grad_overflow and overlap_comm off (2 waits)": (
        {**NO_TIMER, ("bf16", "check_grad_overflow"): False, ("zero_optimization", "overlap_comm"): False},
        [],
    ),
    "ZeRO-0, fp32 weights + torch_autocast bf16, no throughput timer (0 waits)": (
        {
            **NO_TIMER,
            ("zero_optimization", "stage"): 0,
            ("bf16", "enabled"): False,
            ("torch_autocast",): {"enabled": True, "dtype": "bfloat16"},
        },
        [],
    ),
    "ZeRO-2, fp32 weights + torch_autocast bf16, no throughput timer": (
        {**NO_TIMER, ("bf16", "enabled"): False, ("torch_autocast",): {"enabled": True, "dtype": "bfloat16"}},
        [],
    ),
    "ZeRO-1, fp32 weights + torch_autocast bf16, no throughput timer": (
        {
            **NO_TIMER,
            ("zero_optimization", "stage"): 1,
            ("bf16", "enabled"): False,
            ("torch_autocast",): {"enabled": True, "dtype": "bfloat16"},
        },
        [],
    ),
    "as shipped, no throughput timer (5 waits)": (NO_TIMER, []),
    "ZeRO-0, bf16 weights (about 208 waits)": ({("zero_optimization", "stage"): 0}, []),
    "as shipped, wall_clock_breakdown": ({("wall_clock_breakdown",): True, ("steps_per_print",): 1}, []),
}
# Run after ds_config.json as shipped, then train_bert.py --dropout 0, then LATE_DS_VARIANTS while time is left.
DEFAULT_DS_VARIANTS = (
    "ZeRO-2, no throughput timer, check_grad_overflow and overlap_comm off (2 waits)",
    "ZeRO-0, fp32 weights + torch_autocast bf16, no throughput timer (0 waits)",
)
LATE_DS_VARIANTS = ("as shipped, no throughput timer (5 waits)", "as shipped, wall_clock_breakdown")


def slug_of(name: str) -> str:
    """A file name for a row or variant name."""
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")[:70]


def variant_config(changes: dict[tuple[str, ...], Any], path: Path) -> Path:
    """ds_config.json as shipped with `changes` applied, written to `path`."""
    config = json.loads((ROOT / "ds_config.json").read_text())
    for keys, value in changes.items():
        parent = config
        for key in keys[:-1]:
            parent = parent.setdefault(key, {})
        if value is None:
            parent.pop(keys[-1], None)
        else:
            parent[keys[-1]] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


def engine_breakdown(log_path: Path, warmup_steps: int) -> dict[str, float]:
    """With "wall_clock_breakdown": DeepSpeed prints each step's global timers (`time (ms) | fwd: .. | bwd: .. |
    bwd_inner: .. | bwd_allreduce: .. | step: ..`); their means over the steps after `warmup_steps`."""
    lines = [
        line for line in log_path.read_text(errors="replace").splitlines() if "time (ms) |" in line and "| fwd:" in line
    ]
    timed = lines[warmup_steps:]
    sums: dict[str, list[float]] = {}
    for line in timed:
        for field in line.split("time (ms)", 1)[1].split("|")[1:]:
            name, _, value = field.partition(":")
            try:
                sums.setdefault(name.strip(), []).append(float(value))
            except ValueError:
                continue
    return {f"engine_{name}_ms": sum(values) / len(values) for name, values in sums.items()}


def ds(
    out_dir: str,
    deadline_s: float = 280,
    steps: int = 40,
    warmup_steps: int = 20,
    variants: str | tuple[str, ...] = DEFAULT_DS_VARIANTS,
    late: str | tuple[str, ...] = LATE_DS_VARIANTS,
    dataset: str = "../shared/data/wikitext",
    tokenizer: str = "../shared/data/roberta-base",
    dry_run: bool = False,
) -> None:
    """Where train_bert_ds.py's time goes against train_bert.py: BERT-base bf16, batch 256 x 128, dropout 0.1,
    --compile True, side by side in one run: train_bert.py (the reference), train_bert_ds.py with ds_config.json as
    shipped, the DeepSpeed `variants`, train_bert.py --dropout 0, then the `late` variants (names in DS_VARIANTS;
    on the command line separated by ";"). Each row is timed on its log windows after `warmup_steps` (the first
    holds the compile) and killed once step `steps` is logged. With "wall_clock_breakdown" DeepSpeed synchronizes
    around forward, backward and step and prints their times: that row's step time includes those waits."""
    out, work = Path(out_dir), Path(out_dir) / "runs"
    out.mkdir(parents=True, exist_ok=True)

    def split(value: str | tuple[str, ...]) -> list[str]:
        return [n.strip() for n in value.split(";") if n.strip()] if isinstance(value, str) else list(value)

    names, late = split(variants), split(late)
    unknown = [name for name in names + late if name not in DS_VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown DeepSpeed variant(s) {unknown}; known: {list(DS_VARIANTS)}")
    shape, batch, device = (TINY, 4, ["--device=cpu"]) if dry_run else (BERT_BASE, 256, [])
    if dry_run:  # six compiled rows on a small CPU: fewer steps, so that all of them run within the deadline
        steps, warmup_steps = min(steps, 20), min(warmup_steps, 10)
    common = [
        *shape,
        f"--batch_size={batch}",
        "--max_seq_length=128",
        "--dropout=0.1",
        "--dtype=bf16",
        "--compile=True",
        f"--num_iterations={steps + 10}",
        "--log_every=10",
        "--eval_every=100000",
        "--checkpoint_every=100000",
        "--eval_blocks=64",
        f"--dataset={dataset}",
        "--dataset_config=wikitext-2-v1",
        f"--tokenizer={tokenizer}",
        "--data_cache=/tmp/gpu_rows_stores",
    ]
    ds_common = [flag for flag in common if not flag.startswith("--dtype")]  # the config's bf16 section decides
    rows = [
        ("train_bert.py (reference)", ["train_bert.py", *common, *device]),
        ("train_bert_ds.py, ds_config.json as shipped", ["train_bert_ds.py", *ds_common]),
    ]

    def variant_row(name: str) -> tuple[str, list[str]]:
        changes, flags = DS_VARIANTS[name]
        config = variant_config(changes, out / "ds_configs" / f"{slug_of(name)}.json")
        return f"train_bert_ds.py, {name}", ["train_bert_ds.py", *ds_common, f"--ds_config={config}", *flags]

    rows += [variant_row(name) for name in names]
    rows.append(
        (
            "train_bert.py --dropout 0",
            ["train_bert.py", *[flag for flag in common if not flag.startswith("--dropout")], *device, "--dropout=0.0"],
        )
    )
    rows += [variant_row(name) for name in late if name not in names]

    def measure(name: str, argv: list[str], left_s: float) -> dict[str, Any]:
        slug = slug_of(name)
        log_path = out / f"ds-{slug}.log"
        result = steady_state(
            {**run_row(slug, argv, work, log_path, left_s, stop_after_step=steps), "name": name}, warmup_steps
        )
        return {**result, **engine_breakdown(log_path, warmup_steps)} if log_path.exists() else result

    results = within_deadline(rows, deadline_s, measure)
    reference = results[0].get("step_ms")
    for row in results:
        if reference and row.get("step_ms"):
            row["x_reference"] = f"{reference / row['step_ms']:.2f}x"
    write_report(
        out,
        "ds",
        results,
        {
            "tokens_per_s": "tokens/s",
            "x_reference": "x reference",
            "mfu": "MFU",
            "step_ms": "step (ms)",
            "first_window_step_ms": "first window (ms/step)",
            "peak_memory_gib": "peak memory (GiB)",
            "engine_fwd_ms": "engine fwd (ms)",
            "engine_bwd_ms": "engine bwd (ms)",
            "engine_step_ms": "engine step (ms)",
        },
    )


if __name__ == "__main__":
    fire.Fire({"throughput": throughput, "budget": budget, "ds": ds})

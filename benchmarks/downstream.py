"""Did pretraining help? Pretrain for a budget, then fine-tune every encoder and the no-pretraining baseline.

    python benchmarks/downstream.py --budget_s 600 --recipes '["default", "upstream"]'   # pretrain, then fine-tune
    python benchmarks/downstream.py --models '{"ours, 2,200 steps": "EXPERIMENT/hf_model"}'  # fine-tune exports

Pretraining is `benchmark.py ttq` (each recipe for the same wall-clock budget, side by side, evaluated alike:
MLM loss and masked-token accuracy on wikitext-2's validation split). Each encoder is then fine-tuned on a task
(SST-2 by default) by `finetune.py` with several seeds, and so is the same architecture from random weights
(`--scratch`); the table gives the dev metric's median and spread and the gain over that baseline, and the
picture each seed's result.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import benchmark  # noqa: E402  (sets the offline environment and sys.path for the project)

import finetune  # noqa: E402
from pretraining import cli, corpus, errors, safeguards  # noqa: E402

DEFAULT_TASK = str(HERE.parent.parent / "shared" / "data" / "sst2")
SIMILARITY_TEXTS = 256  # the first train texts of the task whose vectors are compared (their pairs: ~33,000)


def pretrain(
    budget_s: float,
    recipes: Any,
    threads: int | None,
    work_dir: Path,
    dataset: str,
    dataset_config: str | None,
    tokenizer: str,
) -> list[dict[str, Any]]:
    """Run `benchmark.py ttq` for the recipes; each recipe's name, saved model folder, steps and MLM figures."""
    report_path = work_dir / "ttq.json"
    benchmark.ttq(
        budget_s=budget_s,
        recipes=recipes,
        threads=threads,
        dataset=dataset,
        dataset_config=dataset_config,
        tokenizer=tokenizer,
        json_path=str(report_path),
        work_dir=str(work_dir),
    )
    report = json.loads(report_path.read_text())
    encoders = []
    for index, (config, result) in enumerate(zip(report["rows"], report["results"])):
        if result.get("status") != "ok":
            raise RuntimeError(f"pretraining {config['name']} failed: {result['status']}")
        # Every recipe's trained model is saved there, with its tokenizer, for the fill-mask demo.
        encoders.append(
            {
                "name": config["name"],
                "model_dir": str(work_dir / "ttq" / f"row{index}" / "final_model"),
                "steps": result["steps"],
                "val_loss": result["val_loss_packed"],
                "val_accuracy": result["val_accuracy_packed"],
            }
        )
    return encoders


def evaluate_exports(models: dict[str, str], dataset: str, dataset_config: str | None) -> list[dict[str, Any]]:
    """Saved encoders (name -> hf_model/ folder) with the MLM figures `ttq` gives, and the steps their experiment's
    hparams.json records (train_bert.py's exports)."""
    from transformers import AutoModelForMaskedLM

    encoders = []
    for name, model_dir in models.items():
        if not (Path(model_dir) / "config.json").is_file():
            raise errors.ConfigError(f"--models {name!r}: {model_dir!r} is not a saved model folder (no config.json)")
        hparams = Path(model_dir).parent / "hparams.json"
        steps = json.loads(hparams.read_text()).get(safeguards.COMPLETED_KEY) if hparams.is_file() else None
        tokenizer = corpus.load_tokenizer(model_dir)
        # ttq's 128-token blocks, or the model's own length if shorter (the export records it)
        data = {
            "original_dataset": dataset,
            "original_dataset_config": dataset_config,
            "eval_seq_length": min(128, tokenizer.model_max_length),
        }
        figures = benchmark.validation_losses(AutoModelForMaskedLM.from_pretrained(model_dir), tokenizer, data)
        encoders.append(
            {
                "name": name,
                "model_dir": model_dir,
                "steps": steps,
                "val_loss": figures["val_loss_packed"],
                "val_accuracy": figures["val_accuracy_packed"],
            }
        )
    return encoders


def architecture(model_dir: str) -> str:
    """The model's config without its bookkeeping: equal strings mean one random-weights baseline serves both."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return json.dumps(
        {
            key: value
            for key, value in config.items()
            if key not in ("architectures", "transformers_version", "dtype", "torch_dtype")
        },
        sort_keys=True,
    )


def slug(name: str) -> str:
    """A folder name for a row."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def vector_similarity(model_dir: str, scratch: bool, texts: list[tuple[str, ...]]) -> dict[str, float]:
    """How alike the encoder's vectors of different texts are: the mean cosine similarity over all pairs of
    `texts`, for the first token's vector and for the mean over tokens. Near 1, the vector is about the same for every
    text and says little about any (the first token's, after masked language modelling alone)."""
    torch.manual_seed(0)  # the random weights of a --scratch encoder
    encoder = finetune.load_encoder(model_dir, scratch, dropout=0.0).eval()
    tokenizer = finetune.load_tokenizer(model_dir)
    input_ids, attention_mask = finetune.pad_batch(finetune.tokenize(tokenizer, texts, 64), tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    similarity = {}
    for pooling in finetune.POOLINGS:
        vectors = torch.nn.functional.normalize(finetune.pool(hidden, attention_mask, pooling), dim=-1)
        count = len(vectors)
        similarity[pooling] = ((vectors @ vectors.T).sum().item() - count) / (count * (count - 1))
    return similarity


def fine_tune_all(
    encoders: list[dict[str, Any]], work_dir: Path, finetune_flags: dict[str, Any]
) -> list[dict[str, Any]]:
    """Fine-tune each encoder and, once per architecture, its random-weights baseline; one row each."""
    rows, baselines = [], {}
    for encoder in encoders:
        kind = architecture(encoder["model_dir"])
        if kind not in baselines:
            baselines[kind] = {
                "name": f"random weights ({encoder['name']}'s architecture)",
                "scratch": True,
                "model_dir": encoder["model_dir"],
                "steps": 0,
                "val_loss": None,
                "val_accuracy": None,
            }
            rows.append(baselines[kind])
        rows.append({**encoder, "scratch": False, "baseline": baselines[kind]["name"]})
    name, task_rows, _ = finetune.load_task_rows(finetune_flags["task"], None, None, None)
    columns = finetune.text_columns(list(task_rows["train"][0]), name)
    texts = [tuple(row[column] for column in columns) for row in task_rows["train"][:SIMILARITY_TEXTS]]
    for row in rows:
        row["similarity"] = vector_similarity(row["model_dir"], row["scratch"], texts)
        output = finetune.finetune(
            model_dir=row["model_dir"],
            scratch=row["scratch"],
            output_dir=str(work_dir / "finetune" / slug(row["name"])),
            **finetune_flags,
        )
        row["finetune"] = json.loads(Path(output, "results.json").read_text())
    return rows


def downstream_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: pretraining figures, the task metric's median and spread over seeds, the gain over the baseline."""
    metric = rows[0]["finetune"]["metric"]
    medians = {row["name"]: row["finetune"]["summary"][metric]["median"] for row in rows}
    split = rows[0]["finetune"]["eval_split"]
    lines = [
        f"| encoder | pretraining steps | MLM val loss | masked-token accuracy | cosine between texts' vectors, "
        f"<s> / mean | {split} {metric}: median (min-max) | each seed | gain over random weights |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        summary = row["finetune"]["summary"][metric]
        seeds = ", ".join(f"{100 * run[metric]:.1f}" for run in row["finetune"]["seeds"])
        gain = "-" if row["scratch"] else f"{100 * (summary['median'] - medians[row['baseline']]):+.1f} points"
        mlm = ("-", "-") if row["val_loss"] is None else (f"{row['val_loss']:.3f}", f"{100 * row['val_accuracy']:.2f}%")
        steps = "-" if row["steps"] is None else f"{row['steps']:,}"
        similarity = f"{row['similarity']['cls']:.2f} / {row['similarity']['mean']:.2f}"
        lines.append(
            f"| {row['name']} | {steps} | {mlm[0]} | {mlm[1]} | {similarity} | {100 * summary['median']:.1f}% "
            f"({100 * summary['min']:.1f}-{100 * summary['max']:.1f}) | {seeds} | {gain} |"
        )
    return "\n".join(lines)


def plot_rows(rows: list[dict[str, Any]], png_path: str, title: str) -> None:
    """Each seed's task metric (dots) and the median (a bar) per encoder, as a PNG."""
    import matplotlib  # a benchmark-only dependency, imported where the picture is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = rows[0]["finetune"]["metric"]
    figure, axes = plt.subplots(figsize=(2.2 + 1.6 * len(rows), 4.2))
    for position, row in enumerate(rows):
        values = [100 * run[metric] for run in row["finetune"]["seeds"]]
        median = 100 * row["finetune"]["summary"][metric]["median"]
        axes.bar(position, median, color="0.8" if row["scratch"] else "tab:blue", width=0.6)
        axes.plot([position] * len(values), values, "ko", markersize=4)
        axes.text(position, median + 0.3, f"{median:.1f}", ha="center", va="bottom", fontsize=9)
    low = min(100 * run[metric] for row in rows for run in row["finetune"]["seeds"])
    axes.set_ylim(max(0.0, low - 5), None)
    axes.set_xticks(range(len(rows)), [row["name"] for row in rows], fontsize=8, rotation=15, ha="right")
    axes.set_ylabel(f"{rows[0]['finetune']['eval_split']} {metric} (%), median and each seed")
    axes.set_title(title, fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    plt.close(figure)


def downstream(
    budget_s: float = 600,
    recipes: Any = ("default", "upstream"),
    models: dict[str, str] | None = None,
    task: str = DEFAULT_TASK,
    seeds: Any = (0, 1, 2),
    train_rows: int | None = 20000,
    epochs: int | None = None,
    lr: float | None = None,
    pooling: str | None = None,
    dropout: float | None = None,
    max_length: int | None = None,
    holdout: float = 0.0,
    threads: int | None = 1,
    dataset: str = benchmark.DEFAULT_DATASET,
    dataset_config: str | None = "wikitext-2-v1",
    tokenizer: str = benchmark.DEFAULT_TOKENIZER,
    work_dir: str = "./downstream_runs",
    json_path: str | None = None,
    markdown_path: str | None = None,
    png_path: str | None = None,
) -> None:
    """Pretrain each recipe for a budget (or take saved encoders), fine-tune them and the baseline; print a table.

    Args:
        budget_s: Wall-clock seconds of pretraining per recipe (benchmark.py ttq).
        recipes: ttq's recipes: "default", "upstream", "run_mlm" or dicts of train() flags.
        models: Instead of pretraining, saved encoders: a dict of name -> model folder (an hf_model/).
        task: The fine-tuning task (finetune.py --task): a GLUE-format folder, SST-2 by default.
        seeds: Fine-tuning seeds, each a run of its own; the table gives the median and the spread.
        train_rows: Fine-tune on the first this many rows of the task's train split (default 20,000 of SST-2's
            67,349: a run of 3 epochs takes minutes on one CPU thread).
        epochs: finetune.py --epochs (default: finetune.py's).
        lr: finetune.py --lr (default: finetune.py's).
        pooling: finetune.py --pooling (default: finetune.py's).
        dropout: finetune.py --dropout (default: finetune.py's).
        max_length: finetune.py --max_length (default: finetune.py's).
        holdout: finetune.py --holdout: evaluate on the end of train instead of dev (to choose settings).
        threads: torch threads for fine-tuning and for each pretraining recipe.
        dataset: The pretraining corpus (and the MLM evaluation's validation split).
        dataset_config: The corpus's configuration name (wikitext: "wikitext-2-v1"; ignored for .txt folders).
        tokenizer: The pretraining tokenizer.
        work_dir: Where the pretraining runs, models and fine-tuning results are kept.
        json_path: Also write every row (pretraining figures, each seed's fine-tuning results) as JSON here.
        markdown_path: Also write the table here.
        png_path: Also draw each encoder's task metric (median and seeds) here.
    """
    safeguards.check_writable(work_dir, "--work_dir")
    directory = Path(work_dir)
    directory.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    if models:
        encoders = evaluate_exports(models, dataset, dataset_config)
    else:
        encoders = pretrain(budget_s, recipes, threads, directory, dataset, dataset_config, tokenizer)
    defaults = {name: parameter.default for name, parameter in inspect.signature(finetune.finetune).parameters.items()}
    chosen = {"epochs": epochs, "lr": lr, "pooling": pooling, "dropout": dropout, "max_length": max_length}
    flags = {
        "task": task,
        "seeds": seeds,
        "train_rows": train_rows,
        "holdout": holdout,
        **{name: defaults[name] if value is None else value for name, value in chosen.items()},
    }
    rows = fine_tune_all(encoders, directory, flags)
    header = (
        f"Machine: {benchmark.machine_description()}.\nCommand: `{benchmark.command_line()}`\n"
        f"Fine-tuning: {Path(task).name}, {train_rows or 'all'} train rows, "
        + ", ".join(f"{name} {flags[name]}" for name in chosen)
        + f", seeds {finetune.parse_seeds(seeds)}.\n"
    )
    table = downstream_table(rows)
    print(header + "\n" + table)
    if markdown_path:
        Path(markdown_path).write_text(header + "\n" + table + "\n")
    if json_path:
        report = {
            "machine": benchmark.machine_description(),
            "command": benchmark.command_line(),
            "budget_s": None if models else budget_s,
            "finetune_flags": flags,
            "rows": rows,
        }
        Path(json_path).write_text(json.dumps(report, indent=2))
    if png_path:
        plot_rows(rows, png_path, f"{Path(task).name}: fine-tuned after pretraining, and from random weights")


if __name__ == "__main__":
    cli.main(downstream)

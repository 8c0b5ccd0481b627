"""A pretraining corpus with the task's own text in it: the corpus's splits, plus the task's train texts in train.

    python benchmarks/task_corpus.py --task ../shared/data/sst2 --output_dir ./wikitext2-sst2
    python train_bert.py --checkpoint_dir ./experiments --dataset ./wikitext2-sst2 --time_budget 10m

Pretraining on unlabelled text of the kind the task holds ("task-adaptive pretraining", Gururangan et al. 2020,
"Don't Stop Pretraining") teaches the encoder the task's words and style before any label is seen. Only the train
split's texts are used, never its labels and never dev's texts; with `--holdout` the last share of train (what
`finetune.py --holdout` evaluates on when choosing settings) is left out too.

The folder holds train.txt (the corpus's train lines, then one line per task text), validation.txt and test.txt
(the corpus's own), so `train_bert.py --dataset FOLDER` reads it and its MLM losses stay comparable.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import benchmark  # noqa: E402  (sets the offline environment and sys.path for the project)

import finetune  # noqa: E402
from pretraining import cli, corpus, safeguards  # noqa: E402
from pretraining.errors import ConfigError  # noqa: E402


def task_corpus(
    task: str,
    output_dir: str,
    holdout: float = 0.0,
    dataset: str = benchmark.DEFAULT_DATASET,
    dataset_config: str | None = "wikitext-2-v1",
    task_config: str | None = None,
) -> str:
    """Write `output_dir`/train.txt, validation.txt and test.txt; return the folder.

    Args:
        task: The fine-tuning task (finetune.py --task): a GLUE-format folder or a Hub dataset name.
        output_dir: The folder to write (created; its three files are replaced).
        holdout: Leave out the last share of the task's train split (as finetune.py --holdout does).
        dataset: The pretraining corpus: a Hub name, a datasets folder or a folder of .txt files.
        dataset_config: The corpus's configuration name (wikitext: "wikitext-2-v1"; ignored for .txt folders).
        task_config: The task's Hub configuration (glue: sst2, ...), for a Hub task.
    """
    if not 0 <= holdout < 1:
        raise ConfigError(f"--holdout {holdout!r} must be a share of the train split, at least 0 and below 1")
    safeguards.check_writable(output_dir, "--output_dir")
    name, rows, sources = finetune.load_task_rows(task, task_config, None, None)
    task_data = finetune.prepare_task(rows, sources, name, holdout, None)
    task_lines = [" ".join(text.split()) for texts in task_data.train_texts for text in texts if text.strip()]
    raw = corpus.load_text_dataset(dataset, dataset_config)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        if split not in raw:
            continue
        lines = [text.rstrip("\n") for text in raw[split]["text"]] + (task_lines if split == "train" else [])
        safeguards.atomic_write(folder / f"{split}.txt", lambda file: file.write("\n".join(lines) + "\n"), mode="w")
    print(
        f"{folder}: {len(raw['train']):,} corpus lines and {len(task_lines):,} {name} texts in train.txt "
        f"({len(task_data.train_texts):,} train rows; {len(task_data.eval_texts):,} "
        f"{'held out' if holdout else 'dev'} rows left out)"
    )
    return str(folder)


if __name__ == "__main__":
    cli.main(task_corpus)

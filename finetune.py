"""Fine-tune a pretrained encoder as a sentence (or sentence-pair) classifier: did pretraining teach anything useful?

Read top to bottom: task data -> metrics -> model (encoder, pooling, head) -> fine-tuning loop -> `finetune` -> __main__

Run it:

    python finetune.py --model_dir EXPERIMENT/hf_model --task ../shared/data/sst2 --output_dir ./experiments/sst2
    python finetune.py --model_dir EXPERIMENT/hf_model --task ../shared/data/sst2 --output_dir ... --scratch
    python finetune.py --help                                                   # every flag, documented

`--scratch` trains the same architecture from random weights: the no-pretraining baseline the gain is measured
against. The helpers it shares with pretraining (optimizer, schedule, precision, atomic writes, the command line)
come from `train_bert.py`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger
from tqdm.auto import tqdm

from pretraining.cli import main
from pretraining.corpus import offline_hint
from pretraining.errors import ConfigError, StoppedAtOnce, TrainingInterrupted
from pretraining.flag_rules import resolve_dtype
from pretraining.logs import git_output, library_versions
from pretraining.rotary import freeze_sinusoid_positions, use_fused_rotary_attention
from pretraining.safeguards import StopSignal, atomic_write, check_writable, start_command
from pretraining.time_budget import parse_duration
from train_bert import create_optimizer, make_autocast, warmup_then_decay

if TYPE_CHECKING:
    import transformers

# The GLUE metric of each task, by the task's name (its folder's name or the Hub config); every other task reports
# accuracy (classification) or Pearson's r (regression: numeric labels with fractions, as STS-B's).
GLUE_METRICS = {"cola": "mcc", "mrpc": "f1", "qqp": "f1", "stsb": "pearson", "sts-b": "pearson"}
POOLINGS = ("mean", "cls")

# ----------------------------------------------------------------------------------------------------------------------
# Task data: train and evaluation rows from GLUE-format TSVs, a CSV/JSON pair, or a Hub dataset.
# ----------------------------------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a .tsv (GLUE's format: a header, tabs, no quoting), .csv, .json (a list) or .jsonl file."""
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist")
    if path.suffix in (".tsv", ".csv"):
        with open(path, newline="", encoding="utf-8") as file:
            # GLUE's TSVs never quote: a sentence may start with a quotation mark that csv would otherwise swallow.
            dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {}
            return list(csv.DictReader(file, **dialect))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ConfigError(f"{str(path)!r} holds no list of rows; give a JSON list of objects or a .jsonl file")
        return rows
    raise ConfigError(f"{str(path)!r} is not a .tsv, .csv, .json or .jsonl file")


def load_task_rows(task: str | None, task_config: str | None, train_file: str | None, dev_file: str | None
                   ) -> tuple[str, dict[str, list[dict[str, Any]]], dict[str, str]]:
    """The task's name, its train and dev rows, and where each came from.

    `task` is a GLUE-format folder (train.tsv and dev.tsv) or a Hub dataset name with `task_config` ("glue",
    "sst2"); or `train_file` and `dev_file` name two .tsv/.csv/.json/.jsonl files.
    """
    if (task is None) == (train_file is None and dev_file is None):
        raise ConfigError("give either --task (a folder with train.tsv and dev.tsv, or a Hub dataset name) or "
                          "--train_file and --dev_file")
    if task is None:
        if train_file is None or dev_file is None:
            raise ConfigError("--train_file and --dev_file go together: give both")
        files = {"train": Path(train_file), "dev": Path(dev_file)}
        return files["train"].parent.name, {split: read_rows(path) for split, path in files.items()}, \
            {split: str(path) for split, path in files.items()}
    folder = Path(task)
    if folder.is_dir():
        missing = [name for name in ("train.tsv", "dev.tsv") if not (folder / name).is_file()]
        if missing:
            raise ConfigError(f"--task folder {task!r} has no {' and no '.join(missing)}; a task folder holds "
                              "train.tsv and dev.tsv (GLUE's format: a header line, tab-separated)")
        return folder.resolve().name, {split: read_rows(folder / f"{split}.tsv") for split in ("train", "dev")}, \
            {split: str(folder / f"{split}.tsv") for split in ("train", "dev")}
    if folder.exists() or task.startswith((".", "/", "~")) or task.count("/") > 1:  # a path, not "owner/name"
        raise ConfigError(f"--task {task!r} is not a folder; give a folder with train.tsv and dev.tsv, a Hub dataset "
                          "name, or --train_file and --dev_file")
    import datasets

    try:
        hub = datasets.load_dataset(task, task_config)
    except Exception as error:  # datasets raises many kinds (offline, unknown name, unknown config)
        raise ConfigError(f"--task {task!r} (config {task_config!r}) could not be loaded from the Hub: "
                          f"{str(error).splitlines()[0]}. A local copy works offline: --task FOLDER with train.tsv "
                          f"and dev.tsv. {offline_hint()}") from error
    if "train" not in hub or "validation" not in hub:
        raise ConfigError(f"--task {task!r} has splits {list(hub)}; fine-tuning needs train and validation")
    return task_config or task, {"train": hub["train"].to_list(), "dev": hub["validation"].to_list()}, \
        {"train": f"{task}/{task_config}:train", "dev": f"{task}/{task_config}:validation"}


def text_columns(columns: list[str], source: str) -> tuple[str, ...]:
    """("sentence",) for a single-sentence task, ("sentence1", "sentence2") for a pair; `label` must be there too."""
    for names in (("sentence1", "sentence2"), ("sentence",)):
        if all(name in columns for name in names) and "label" in columns:
            return names
    raise ConfigError(f"{source} has columns {columns}; a task needs a 'label' column and 'sentence' (or "
                      "'sentence1' and 'sentence2' for sentence pairs)")


def is_number(text: str) -> bool:
    """Whether `text` reads as a finite number."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def label_key(label: str) -> tuple:
    """Sort labels numerically where they are numbers ("2" before "10"), else alphabetically."""
    return (0, float(label), "") if is_number(label) else (1, 0.0, label)


@dataclasses.dataclass
class TaskData:
    """Texts and labels of the train and evaluation splits, and what kind of task they make."""

    name: str
    columns: tuple[str, ...]          # the text columns: one (a sentence) or two (a pair)
    label_names: list[str]            # classification: the label of each output; regression: []
    train_texts: list[tuple[str, ...]]
    train_labels: list[float]         # class indices, or the numbers themselves for regression
    eval_texts: list[tuple[str, ...]]
    eval_labels: list[float]
    eval_split: str                   # "dev", or "held-out" (the end of train) while choosing a recipe

    @property
    def regression(self) -> bool:
        return not self.label_names


def prepare_task(rows: dict[str, list[dict[str, Any]]], sources: dict[str, str], name: str, holdout: float,
                 train_rows: int | None) -> TaskData:
    """Check the columns and labels of both splits and turn them into texts and label indices.

    Labels with fractions (STS-B's similarity scores) make a regression task; any other labels are classes, and dev
    may use no class that train lacks. With `holdout` > 0 the last share of train is the evaluation split and dev
    is not used (recipes are chosen on it, never on dev); `train_rows` keeps the first rows of what is left.
    """
    columns = {}
    for split in ("train", "dev"):
        if not rows[split]:
            raise ConfigError(f"{sources[split]} holds no rows")
        columns[split] = text_columns(list(rows[split][0]), sources[split])
    if columns["train"] != columns["dev"]:
        raise ConfigError(f"{sources['train']} has text columns {list(columns['train'])} but {sources['dev']} has "
                          f"{list(columns['dev'])}; both splits need the same")
    labels = {split: [str(row["label"]).strip() for row in rows[split]] for split in rows}
    for split in rows:
        empty = [index for index, label in enumerate(labels[split]) if label in ("", "None")]
        if empty:
            raise ConfigError(f"{sources[split]} has rows without a label (row {empty[0] + 1} and {len(empty) - 1} "
                              "more); a test split without labels cannot be used for evaluation")
    numeric = all(is_number(label) for split in rows for label in labels[split])
    regression = numeric and any(not float(label).is_integer() for label in labels["train"])
    label_names = [] if regression else sorted(set(labels["train"]), key=label_key)
    if not regression:
        unknown = sorted(set(labels["dev"]) - set(label_names), key=label_key)
        if unknown:
            raise ConfigError(f"the labels of {sources['dev']} ({', '.join(sorted(set(labels['dev']), key=label_key))})"
                              f" do not match those of {sources['train']} ({', '.join(label_names)}): "
                              f"{', '.join(unknown)} never occurs in train")
        if len(label_names) < 2:
            raise ConfigError(f"{sources['train']} has a single label ({label_names[0]}); a classifier needs two or "
                              "more")
    index = {label: position for position, label in enumerate(label_names)}
    encoded = {split: [float(label) if regression else index[label] for label in labels[split]] for split in rows}
    texts = {split: [tuple(str(row[column] or "") for column in columns["train"]) for row in rows[split]]
             for split in rows}
    eval_split = "dev"
    if holdout > 0:
        cut = len(texts["train"]) - max(1, round(holdout * len(texts["train"])))
        texts["dev"], encoded["dev"] = texts["train"][cut:], encoded["train"][cut:]
        texts["train"], encoded["train"] = texts["train"][:cut], encoded["train"][:cut]
        eval_split = "held-out"
    if train_rows is not None:
        texts["train"], encoded["train"] = texts["train"][:train_rows], encoded["train"][:train_rows]
    return TaskData(name=name, columns=columns["train"], label_names=label_names, train_texts=texts["train"],
                    train_labels=encoded["train"], eval_texts=texts["dev"], eval_labels=encoded["dev"],
                    eval_split=eval_split)


def tokenize(tokenizer: "transformers.PreTrainedTokenizerBase", texts: list[tuple[str, ...]], max_length: int
             ) -> list[list[int]]:
    """Token ids of each text (or pair, joined the way the tokenizer joins pairs), cut to `max_length` tokens."""
    columns = list(zip(*texts))
    return tokenizer(*columns, truncation=True, max_length=max_length)["input_ids"]


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids padded to the longest sequence of the batch, and the attention mask (1: a real token)."""
    length = max(len(sequence) for sequence in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, sequence in enumerate(ids):
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
        attention_mask[row, :len(sequence)] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------------------------------------------
# Metrics: accuracy and the GLUE metrics, from predictions and labels.
# ----------------------------------------------------------------------------------------------------------------------


def matthews_correlation(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Matthews correlation coefficient (CoLA's metric), for any number of classes (Gorodkin's R_K); 0 if undefined."""
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (labels, predictions), 1)
    total, correct = confusion.sum(), np.trace(confusion)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    numerator = correct * total - true_counts @ predicted_counts
    denominator = math.sqrt((total**2 - predicted_counts @ predicted_counts) * (total**2 - true_counts @ true_counts))
    return float(numerator / denominator) if denominator else 0.0


def f1_score(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class (MRPC's and QQP's metric: label 1, "paraphrase"/"duplicate")."""
    true_positives = np.sum((predictions == positive) & (labels == positive))
    predicted, actual = np.sum(predictions == positive), np.sum(labels == positive)
    return float(2 * true_positives / (predicted + actual)) if predicted + actual else 0.0


def task_metrics(outputs: torch.Tensor, labels: list[float], num_classes: int) -> dict[str, float]:
    """Accuracy, MCC and F1 (binary tasks) for a classifier's logits; Pearson's r and MSE for a regression."""
    if num_classes == 0:
        predictions, targets = outputs.squeeze(-1).double().numpy(), np.asarray(labels)
        correlation = np.corrcoef(predictions, targets)[0, 1] if predictions.std() and targets.std() else 0.0
        return {"pearson": float(correlation), "mse": float(np.mean((predictions - targets) ** 2))}
    predictions, targets = outputs.argmax(-1).numpy(), np.asarray(labels, dtype=np.int64)
    metrics = {"accuracy": float(np.mean(predictions == targets)),
               "mcc": matthews_correlation(predictions, targets, num_classes)}
    if num_classes == 2:
        metrics["f1"] = f1_score(predictions, targets)
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# Model: the pretrained encoder, a pooling of its last hidden states, and a small head.
# ----------------------------------------------------------------------------------------------------------------------


class SentenceClassifier(torch.nn.Module):
    """An encoder, one vector per text pooled from its last hidden states, and a small head on that vector.

    `pooling` "cls" takes the first token's vector (`<s>` in RoBERTa, `[CLS]` in BERT), as Hugging Face's
    *ForSequenceClassification models do. A model pretrained with masked language modelling alone never had a
    loss at that position: `<s>` is never masked, so nothing asked its last-layer vector to summarise the sentence
    (BERT's next-sentence objective did). "mean" averages the vectors of the real tokens instead, each of which was
    trained to say which word fits there. The head is RoBERTa's: dropout, dense + tanh, dropout, linear.
    """

    def __init__(self, encoder: "transformers.PreTrainedModel", num_outputs: int, pooling: str, dropout: float):
        super().__init__()
        hidden_size = encoder.config.hidden_size
        self.encoder, self.pooling = encoder, pooling
        self.head = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(hidden_size, hidden_size),
                                        torch.nn.Tanh(), torch.nn.Dropout(dropout),
                                        torch.nn.Linear(hidden_size, num_outputs))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(pool(hidden, attention_mask, self.pooling))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per sequence from its last hidden states: the first token's ("cls") or the mean of the real
    tokens' ("mean"; padding left out)."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def classifier_config(model_dir: str) -> "transformers.PretrainedConfig":
    """The config of the model in `model_dir`, once it is known to be a model transformers can classify text with."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(f"--model_dir {model_dir!r} is not a Hugging Face model folder (no config.json); give an "
                          "hf_model/ folder that train_bert.py exported, or another encoder's folder")
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ConfigError(f"--model_dir {model_dir!r} holds a {config.model_type!r} model, which transformers "
                          "cannot use as a text classifier (it has no sequence-classification architecture); give a "
                          "text encoder such as the hf_model/ folder train_bert.py exports")
    return config


def load_encoder(model_dir: str, scratch: bool, dropout: float) -> "transformers.PreTrainedModel":
    """The encoder of the model in `model_dir` (its MLM head, if any, is left out), with `dropout` in its layers;
    with `scratch` the same architecture and sizes with fresh random weights (drawn from torch's seeded RNG)."""
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    config = classifier_config(model_dir)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(config, name):
            setattr(config, name, dropout)
    # Loading an exported masked LM as a bare encoder leaves its MLM head out: expected, not worth a report.
    transformers_logging.set_verbosity_error()
    encoder = AutoModel.from_config(config) if scratch else AutoModel.from_pretrained(model_dir, config=config)
    freeze_sinusoid_positions(encoder)
    use_fused_rotary_attention(encoder)  # RoFormer's attention in one fused kernel, as in pretraining
    return encoder


def load_tokenizer(model_dir: str) -> "transformers.PreTrainedTokenizerBase":
    """The tokenizer saved beside the model (train_bert.py's export holds one)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--model_dir {model_dir!r} holds no tokenizer the model can read its text with "
                          f"({str(error).splitlines()[0]})") from error


def usable_length(max_length: int, tokenizer: "transformers.PreTrainedTokenizerBase") -> int:
    """`max_length`, or less where the model was trained on shorter blocks (the export records its length)."""
    limit = tokenizer.model_max_length
    if limit < max_length:
        logger.warning(f"--max_length {max_length} is longer than the model's {limit} tokens; texts are cut at {limit}")
        return limit
    return max_length


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning: a few epochs over the train split, AdamW with warmup and linear decay, evaluation after each epoch.
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: SentenceClassifier, ids: list[list[int]], batch_size: int, pad_id: int, device: torch.device,
            autocast: Any) -> torch.Tensor:
    """The model's outputs (logits, or the predicted number) for every sequence, in order, in fp32 on the CPU."""
    model.eval()
    outputs = []
    starts = range(0, len(ids), batch_size)
    for start in tqdm(starts, desc="evaluating", unit="batch", file=sys.stderr, leave=False, disable=None):
        input_ids, attention_mask = pad_batch(ids[start:start + batch_size], pad_id)
        with autocast():
            outputs.append(model(input_ids.to(device), attention_mask.to(device)).float())
    return torch.cat(outputs).cpu()  # one copy at the end: a copy per batch would wait for the GPU at every batch


def train_classifier(model: SentenceClassifier, task: TaskData, train_ids: list[list[int]],
                     eval_ids: list[list[int]], flags: dict[str, Any], pad_id: int, device: torch.device,
                     seed: int) -> dict[str, Any]:
    """Fine-tune `model` for `flags["epochs"]` epochs (or until the time budget is spent); evaluate after each.

    The learning rate warms up linearly, then decays linearly to 0 at the end of the last epoch, or of the time
    budget if that comes first (the schedule follows whichever is further along). Returns the final evaluation
    metrics, each epoch's, the mean training loss of the last epoch and the steps made.
    """
    autocast = make_autocast(device, flags["dtype"])
    # One AdamW per part, each with its own peak learning rate: the new head's, and the pretrained encoder's.
    encoder_lr = flags["lr"] if flags["encoder_lr"] is None else flags["encoder_lr"]
    optimizers = {create_optimizer(model.head, flags["lr"], flags["weight_decay"]): flags["lr"],
                  create_optimizer(model.encoder, encoder_lr, flags["weight_decay"]): encoder_lr}
    generator = torch.Generator().manual_seed(seed)
    batch_size = flags["batch_size"]
    steps_per_epoch = math.ceil(len(train_ids) / batch_size)
    total_steps = steps_per_epoch * flags["epochs"]
    budget_s = parse_duration(flags["time_budget"]) if flags["time_budget"] is not None else math.inf
    labels = torch.tensor(task.train_labels, dtype=torch.float if task.regression else torch.long)
    num_classes = len(task.label_names)
    started, step, history, losses = time.perf_counter(), 0, [], []
    with tqdm(total=total_steps, desc=f"seed {seed}", unit="step", file=sys.stderr, dynamic_ncols=True) as progress_bar:
        for epoch in range(flags["epochs"]):
            model.train()
            losses = []
            for batch in torch.randperm(len(train_ids), generator=generator).split(batch_size):
                progress = max(step / total_steps, (time.perf_counter() - started) / budget_s)
                if progress >= 1:
                    break
                for optimizer, peak_lr in optimizers.items():
                    for group in optimizer.param_groups:
                        group["lr"] = peak_lr * warmup_then_decay(progress, flags["warmup"])
                input_ids, attention_mask = pad_batch([train_ids[index] for index in batch.tolist()], pad_id)
                with autocast():
                    outputs = model(input_ids.to(device), attention_mask.to(device)).float()
                targets = labels[batch].to(device)
                if task.regression:
                    loss = F.mse_loss(outputs.squeeze(-1), targets)
                else:
                    loss = F.cross_entropy(outputs, targets)
                model.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                for optimizer in optimizers:
                    optimizer.step()
                losses.append(loss.detach())
                step += 1
                progress_bar.update()
                if step % 50 == 0:  # reading a loss waits for the GPU: once every 50 steps, not at every step
                    progress_bar.set_postfix(loss=f"{torch.stack(losses[-50:]).mean():.3f}")
            metrics = task_metrics(predict(model, eval_ids, 4 * batch_size, pad_id, device, autocast), task.eval_labels,
                                   num_classes)
            history.append({"epoch": epoch + 1, "step": step, **metrics})
            logger.info(f"seed {seed}, epoch {epoch + 1}: {task.eval_split} "
                        + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
            if step < (epoch + 1) * steps_per_epoch:  # the time budget ran out within this epoch
                break
    return {"seed": seed, **history[-1], "train_loss": torch.stack(losses).double().mean().item() if losses else None,
            "train_time_s": round(time.perf_counter() - started, 1), "epochs_run": history}


def parse_seeds(seeds: Any) -> list[int]:
    """--seeds as a list: one number, a list, or "0,1,2" (fire reads 0,1,2 as a tuple already)."""
    values = seeds if isinstance(seeds, (list, tuple)) else str(seeds).split(",")
    try:
        parsed = [int(str(value).strip()) for value in values]
    except ValueError:
        parsed = []
    if not parsed or any(value < 0 for value in parsed) or len(set(parsed)) != len(parsed):
        raise ConfigError(f"--seeds must be distinct integers >= 0, such as 0 or 0,1,2; got {seeds!r}")
    return parsed


def validate_flags(flags: dict[str, Any]) -> None:
    """Reject bad flag values with one message naming the value and what is allowed. Creates nothing."""
    for name in ("epochs", "batch_size", "max_length"):
        value = flags[name]
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f"--{name} must be a positive integer; got {value!r}")
    if flags["train_rows"] is not None and not (isinstance(flags["train_rows"], int) and flags["train_rows"] > 0):
        raise ConfigError(f"--train_rows must be a positive integer; got {flags['train_rows']!r}")
    for name, low, high in (("lr", 0, 1), ("weight_decay", 0, 10), ("warmup", 0, 0.999), ("dropout", 0, 0.999),
                            ("holdout", 0, 0.5)):
        value = flags[name]
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high):
            raise ConfigError(f"--{name} must be a number in [{low}, {high}]; got {value!r}")
    if flags["lr"] == 0:
        raise ConfigError("--lr must be > 0")
    if flags["encoder_lr"] is not None and not (isinstance(flags["encoder_lr"], (int, float))
                                                and not isinstance(flags["encoder_lr"], bool)
                                                and 0 <= flags["encoder_lr"] <= 1):
        raise ConfigError(f"--encoder_lr must be a number in [0, 1]; got {flags['encoder_lr']!r}")
    if flags["pooling"] not in POOLINGS:
        raise ConfigError(f"--pooling must be one of {', '.join(POOLINGS)}; got {flags['pooling']!r}")
    if flags["time_budget"] is not None:
        parse_duration(flags["time_budget"])
    if flags["metric"] not in ("auto", "accuracy", "mcc", "f1", "pearson"):
        raise ConfigError(f"--metric must be auto, accuracy, mcc, f1 or pearson; got {flags['metric']!r}")


def finished_seeds(output: Path, flags: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The seeds an earlier run with the same flags (--seeds aside) finished in `output`, by seed: running a stopped
    command again continues it, and more --seeds extend it. Results of other flags are replaced, not reused."""
    try:
        earlier_flags = json.loads((output / "hparams.json").read_text())["flags"]
        earlier_runs = json.loads((output / "results.json").read_text())["seeds"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}

    def without_seeds(values: dict[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in json.loads(json.dumps(values)).items() if name != "seeds"}

    return {run["seed"]: run for run in earlier_runs} if without_seeds(earlier_flags) == without_seeds(flags) else {}


def summary(per_seed: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, float]]:
    """Median, minimum and maximum over the seeds of each metric in `names`."""
    return {name: {"median": statistics.median(run[name] for run in per_seed),
                   "min": min(run[name] for run in per_seed), "max": max(run[name] for run in per_seed)}
            for name in names}


def finetune(
    model_dir: str,
    output_dir: str,
    task: str | None = None,
    task_config: str | None = None,
    train_file: str | None = None,
    dev_file: str | None = None,
    scratch: bool = False,
    pooling: str = "mean",
    lr: float = 1e-3,
    encoder_lr: float | None = None,
    epochs: int = 3,
    batch_size: int = 32,
    max_length: int = 64,
    dropout: float = 0.0,
    weight_decay: float = 0.01,
    warmup: float = 0.1,
    seeds: Any = 0,
    train_rows: int | None = None,
    holdout: float = 0.0,
    time_budget: str | None = None,
    metric: str = "auto",
    dtype: str = "auto",
) -> str:
    """Fine-tune an encoder as a sentence or sentence-pair classifier and evaluate it; return the output folder.

    Fine-tune:  python finetune.py --model_dir EXPERIMENT/hf_model --task ../shared/data/sst2 --output_dir DIR
    Baseline:   the same with --scratch (the same architecture, random weights)

    The folder receives hparams.json (flags, data sizes, versions, commit) at the start and results.json (each
    seed's metrics, each epoch's, and the median, minimum and maximum over the seeds) after each seed, both written
    atomically. Ctrl-C or SIGTERM stops at once; the same command run again keeps the finished seeds. Runs on the GPU
    when there is one.

    Args:
        model_dir: A Hugging Face model folder with a tokenizer: the hf_model/ folder train_bert.py exports, or any
            encoder's (BERT, RoBERTa, RoFormer, ...). Its masked-LM head, if any, is dropped; a new head is trained.
        output_dir: Folder for hparams.json and results.json (created). Run again with the same flags (--seeds
            aside) it keeps the seeds finished there and trains the others; with other flags they are replaced.
        task: A GLUE-format folder holding train.tsv and dev.tsv (a header line; a `sentence` column, or
            `sentence1` and `sentence2`, and `label`), or a Hub dataset name (glue, with --task_config sst2) when
            online. Its name picks the reported GLUE metric (MCC for cola, F1 for mrpc and qqp, Pearson for sts-b).
        task_config: The Hub dataset's configuration (glue: sst2, cola, mrpc, ...).
        train_file: Instead of --task: the train split as a .tsv, .csv, .json (a list of objects) or .jsonl file.
        dev_file: Instead of --task: the dev split, in the same form.
        scratch: Train the same architecture from random weights: the no-pretraining baseline.
        pooling: How the encoder's last hidden states become one vector per text, "mean" (the average over the real
            tokens) or "cls" (the first token's, <s> or [CLS]). Mean by default. An encoder pretrained with masked
            language modelling alone was never trained to put anything about the sentence into <s> (no loss is
            ever computed there), and on a held-out 5% of SST-2 train mean pooling scored 83.7% against 82.1%
            (benchmarks/README.md).
        lr: Peak learning rate of AdamW (betas 0.9/0.98, weight decay on weight matrices only) for the head, and for
            the encoder unless --encoder_lr says otherwise. 1e-3 suits the small models train_bert.py makes, which
            were pretrained at 2e-3. On a held-out 5% of SST-2 train (one seed), 1 epoch of 20,000 sentences
            reached 83.7% at 1e-3 against 80.3% at 3e-4, 69.0% at 1e-4 and 72.4% at 3e-3. BERT-base-sized models
            want ~2e-5 to 5e-5.
        encoder_lr: The encoder's peak learning rate, if it should differ from the head's --lr (0 freezes the
            encoder's weights, a probe of what pretraining put into them). By default --lr.
        epochs: Passes over the train split; the learning rate decays linearly to 0 at the end of the last. Three by
            default, as on SST-2 (20,000 sentences) held-out accuracy (one seed, dropout 0.1) rose from 83.6%
            after the first to 86.6% after the third.
        batch_size: Texts per step.
        max_length: Tokens per text (pair), <s> and </s> included; longer ones are cut. SST-2's sentences average
            ~13 words; 64 tokens keeps almost all of them whole.
        dropout: Dropout in the head and in the encoder's layers (on hidden states and attention probabilities).
            0 by default, as the encoder was pretrained, which gave held-out accuracy 84.1% against 83.7% with 0.1.
        weight_decay: AdamW weight decay on weight matrices.
        warmup: Share of the run over which the learning rate rises linearly from 0 to --lr.
        seeds: One seed or several (0,1,2): each trains its own run (head initialisation, data order, dropout and,
            with --scratch, the encoder's weights); results give each and the median.
        train_rows: Train on the first this many rows of the train split only (default: all).
        holdout: Evaluate on the last share of the train split (0.05 is its last 5%) instead of dev, and train on
            the rest. Choose recipes on this, never on dev. 0 (the default) evaluates on dev.
        time_budget: Stop each seed's training after this much wall-clock time (600, "10m"); the learning rate
            schedule then follows the share of the budget spent, reaching 0 when it ends.
        metric: The GLUE metric to report besides accuracy: auto (from the task's name), accuracy, mcc, f1 or pearson.
        dtype: auto, fp32 or bf16 (autocast): auto is bf16 where the device computes it natively, else fp32.
    """
    flags = {name: value for name, value in locals().items()}
    validate_flags(flags)
    check_writable(output_dir, "--output_dir")  # before any loading, as a bad folder would otherwise fail at the end
    seed_list = parse_seeds(seeds)
    # Fine-tuning keeps no checkpoints (a seed takes minutes): a stop ends the run at once, and the seeds finished
    # so far are in results.json, which the same command, run again, keeps.
    progress = {"phase": "loading the task and the model", "finished": []}
    try:
        with StopSignal(at_once=True):
            return run_finetuning(flags, seed_list, progress)
    except StoppedAtOnce as stop:
        finished = ",".join(map(str, progress["finished"]))
        saved = f"{Path(output_dir) / 'results.json'} holds seed(s) {finished}" if finished else "no seed had finished"
        raise TrainingInterrupted(f"{stop} while {progress['phase']}; {saved}. Continue with the same command "
                                  f"(finished seeds are kept): {start_command()}", stop.signum) from None


def run_finetuning(flags: dict[str, Any], seed_list: list[int], progress: dict[str, Any]) -> str:
    """finetune()'s work once its flags are checked: load, tokenize, then train and evaluate seed after seed,
    writing results.json after each. `progress` says what it is doing and which seeds are saved, for a stop."""
    name, rows, sources = load_task_rows(flags["task"], flags["task_config"], flags["train_file"], flags["dev_file"])
    data = prepare_task(rows, sources, name, flags["holdout"], flags["train_rows"])
    metric = flags["metric"]
    metric_name = metric if metric != "auto" else "pearson" if data.regression else GLUE_METRICS.get(
        name.lower(), "accuracy")
    if data.regression != (metric_name == "pearson"):
        kind = "regression" if data.regression else "classification"
        raise ConfigError(f"--metric {metric_name} does not suit a {kind} "
                          f"task (labels {'with fractions' if data.regression else ', '.join(data.label_names)})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if flags["dtype"] not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--dtype must be auto, fp32 or bf16; got {flags['dtype']!r}")
    flags["dtype"] = resolve_dtype(flags["dtype"], device)
    model_dir, scratch, pooling = flags["model_dir"], flags["scratch"], flags["pooling"]
    classifier_config(model_dir)  # a bad model folder is reported before any tokenizing
    tokenizer = load_tokenizer(model_dir)
    length = usable_length(flags["max_length"], tokenizer)
    logger.info(f"tokenizing {len(data.train_texts):,} train and {len(data.eval_texts):,} {data.eval_split} texts")
    train_ids, eval_ids = tokenize(tokenizer, data.train_texts, length), tokenize(tokenizer, data.eval_texts, length)
    output = Path(flags["output_dir"])
    output.mkdir(parents=True, exist_ok=True)
    earlier = finished_seeds(output, flags)
    hparams = {"flags": flags, "seeds": seed_list, "task": name, "sources": sources, "columns": data.columns,
               "labels": data.label_names or "regression", "train_rows": len(train_ids), "eval_rows": len(eval_ids),
               "eval_split": data.eval_split, "max_length_used": length, "device": str(device),
               "commit": (git_output("rev-parse", "HEAD") or "").strip() or None, "versions": library_versions()}
    atomic_write(output / "hparams.json", lambda file: json.dump(hparams, file, indent=2), mode="w")
    logger.info(f"{name}: {len(train_ids)} train / {len(eval_ids)} {data.eval_split} rows, "
                f"{'regression' if data.regression else f'{len(data.label_names)} labels'}; "
                f"{'random weights (--scratch)' if scratch else model_dir}, {pooling} pooling; device {device}")
    if kept := [seed for seed in seed_list if seed in earlier]:
        logger.info(f"keeping seed(s) {','.join(map(str, kept))}, finished earlier in {output} with the same flags "
                    "(delete its results.json to train them again)")
    metric_names = ["pearson"] if data.regression else list(dict.fromkeys(["accuracy", metric_name]))
    per_seed = []
    for seed in seed_list:
        if seed in earlier:
            per_seed.append(earlier[seed])
        else:
            progress["phase"] = f"training seed {seed}"
            torch.manual_seed(seed)  # the head's (and with --scratch the encoder's) initial weights, and dropout
            encoder = load_encoder(model_dir, scratch, flags["dropout"])
            model = SentenceClassifier(encoder, 1 if data.regression else len(data.label_names), pooling,
                                       flags["dropout"])
            per_seed.append(train_classifier(model.to(device), data, train_ids, eval_ids, flags,
                                             tokenizer.pad_token_id, device, seed))
        results = {"task": name, "eval_split": data.eval_split, "metric": metric_name, "scratch": scratch,
                   "model_dir": model_dir, "pooling": pooling, "summary": summary(per_seed, metric_names),
                   "seeds": per_seed}
        atomic_write(output / "results.json", lambda file: json.dump(results, file, indent=2), mode="w")
        progress["finished"].append(seed)
    for reported in metric_names:
        values = " / ".join(f"{run[reported]:.4f}" for run in per_seed)
        logger.info(f"{data.eval_split} {reported}: seeds {','.join(map(str, seed_list))}: {values}; median "
                    f"{results['summary'][reported]['median']:.4f}")
    return str(output)


if __name__ == "__main__":
    main(finetune)

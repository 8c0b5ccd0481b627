"""The GPU check's Hugging Face Trainer row: transformers' `Trainer` pretraining a BERT-base-shaped RoBERTa masked
LM the way most tutorials do it, to set next to train_bert.py's throughput and memory.

    python benchmarks/hf_trainer_row.py --out_dir DIR [--steps 60] [--timed_from 30]
    python benchmarks/hf_trainer_row.py --out_dir DIR --dry_run True   # tiny model on the CPU: checks the row runs

The model: `RobertaForMaskedLM` (12 x 768, 12 heads, ff 3072, learned positions, max 128 tokens, dropout 0.1,
SDPA attention, the dense MLM head over every position). The data: WikiText-2's training split tokenized with the
roberta-base tokenizer, concatenated and cut into 128-token blocks (<s> + 126 tokens + </s>; no padding), masked by
`DataCollatorForLanguageModeling` (mlm_probability 0.15, the 80/10/10 rule). The training: `TrainingArguments` with
bf16=True, torch_compile=True, per_device_train_batch_size 256, dataloader_drop_last, the default random sampler
(transformers 5 has no group_by_length; blocks are all 128 tokens anyway), fused
torch AdamW (lr 5e-4, betas 0.9/0.98, eps 1e-6, weight decay 0.01), grad-norm clipping 1.0, no saving, no
evaluation, `--steps` optimizer steps.

Throughput is timed by a TrainerCallback (the device synchronized at the end of step `--timed_from` and of the last
step): tokens/s = (steps - timed_from) x batch x 128 / seconds; the steps before `--timed_from` hold the compile.
Peak memory: torch.cuda.max_memory_allocated over the whole run. Writes OUT_DIR/trainer.md and OUT_DIR/trainer.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fire
import torch

BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def blocks_from_wikitext(dataset: str, dataset_config: str, tokenizer: Any, seq_len: int) -> Any:
    """WikiText's training split as `seq_len`-token blocks: every line tokenized without special tokens, all of them
    concatenated, cut into runs of seq_len - 2 tokens (the remainder dropped), each wrapped in <s> ... </s>."""
    import datasets

    train = datasets.load_dataset(dataset, dataset_config, split="train")
    train = train.filter(lambda row: bool(row["text"].strip()))
    body = seq_len - 2

    def tokenize_and_cut(rows: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = [token for text in rows["text"] for token in tokenizer(text, add_special_tokens=False)["input_ids"]]
        cut = len(ids) // body * body
        return {
            "input_ids": [
                [tokenizer.cls_token_id, *ids[start : start + body], tokenizer.sep_token_id]
                for start in range(0, cut, body)
            ]
        }

    # One batch of 2,000 lines leaves at most one short run per batch behind (under 1% of WikiText-2).
    return train.map(tokenize_and_cut, batched=True, batch_size=2000, remove_columns=train.column_names)


class StepTimer:
    """A TrainerCallback (duck-typed: the Trainer calls only the hooks a callback has) that records the time at the
    end of step `timed_from` and of the last step, the device synchronized first."""

    def __init__(self, timed_from: int, device: torch.device):
        self.timed_from, self.device, self.ends = timed_from, device, {}
        self.started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.timed_from or state.global_step == args.max_steps:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.ends[state.global_step] = time.perf_counter()


def trainer_callback(timer: StepTimer) -> Any:
    """`timer` as a transformers.TrainerCallback subclass instance (the Trainer checks isinstance for classes)."""
    import transformers

    class Callback(transformers.TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timer.on_step_end(args, state, control, **kwargs)

    return Callback()


def run(
    out_dir: str,
    steps: int = 60,
    timed_from: int = 30,
    batch_size: int = 256,
    seq_len: int = 128,
    dataset: str = "../shared/data/wikitext",
    dataset_config: str = "wikitext-2-v1",
    tokenizer: str = "../shared/data/roberta-base",
    num_workers: int = 0,
    dry_run: bool = False,
) -> None:
    """Train with the Trainer for `steps` steps and write the row (see the module docstring)."""
    import transformers

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dry_run:
        steps, timed_from, batch_size = min(steps, 6), min(timed_from, 3), min(batch_size, 4)
    if not 0 < timed_from < steps:
        raise ValueError(f"--timed_from must be between 0 and --steps ({steps}); got {timed_from}")
    use_cpu = dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if use_cpu else "cuda", 0 if not use_cpu else None)
    torch.manual_seed(0)

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer)
    blocks = blocks_from_wikitext(dataset, dataset_config, tok, seq_len)
    if dry_run:
        blocks = blocks.select(range(steps * batch_size))
    shape = TINY if dry_run else BERT_BASE
    config = transformers.RobertaConfig(
        vocab_size=len(tok),
        max_position_embeddings=seq_len + 2,
        type_vocab_size=1,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **shape,
    )
    model = transformers.RobertaForMaskedLM(config)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
    timer = StepTimer(timed_from, device)
    with tempfile.TemporaryDirectory(prefix="hf_trainer_row.") as scratch:
        args = transformers.TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            bf16=True,
            torch_compile=True,
            dataloader_drop_last=True,
            dataloader_num_workers=num_workers,
            learning_rate=5e-4,
            warmup_steps=min(10, steps // 2),
            weight_decay=0.01,
            adam_beta1=0.9,
            adam_beta2=0.98,
            adam_epsilon=1e-6,
            max_grad_norm=1.0,
            optim="adamw_torch_fused",
            logging_steps=10,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            use_cpu=use_cpu,
            seed=0,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=blocks, data_collator=collator, callbacks=[trainer_callback(timer)]
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        output = trainer.train()
    seconds = timer.ends[steps] - timer.ends[timed_from]
    tokens = (steps - timed_from) * batch_size * seq_len
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    row = {
        "name": "transformers Trainer, RobertaForMaskedLM" + (" (dry run: tiny, CPU)" if dry_run else ""),
        "outcome": "measured",
        "command": " ".join(["python", *sys.argv]),
        "tokens_per_s": tokens / seconds,
        "step_ms": 1000 * seconds / (steps - timed_from),
        "first_steps_s": timer.ends[timed_from] - timer.started,
        "timed_steps": f"{timed_from + 1}-{steps}",
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "last_logged_loss": losses[-1] if losses else output.training_loss,
        "train_runtime_s": output.metrics.get("train_runtime"),
        "parameters": parameters,
        "blocks": len(blocks),
        "batch": f"{batch_size} x {seq_len}",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "wall_s": time.perf_counter() - started,
    }
    write_row(out, row)


def write_row(out: Path, row: dict[str, Any]) -> None:
    """OUT_DIR/trainer.json (every field) and OUT_DIR/trainer.md (a one-row table and the command)."""
    (out / "trainer.json").write_text(json.dumps([row], indent=2))
    peak = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "n/a"
    loss = row["last_logged_loss"]
    lines = [
        (
            "| row | parameters | batch | tokens/s | step (ms) | steps timed | first steps incl. compile (s) | "
            "peak memory (GiB) | last logged loss | outcome |"
        ),
        "|---|---:|---|---:|---:|---|---:|---:|---:|---|",
        (
            f"| {row['name']} | {row['parameters'] / 1e6:.1f}M | {row['batch']} | {row['tokens_per_s']:,.0f} | "
            f"{row['step_ms']:.1f} | {row['timed_steps']} | {row['first_steps_s']:.0f} | {peak} | "
            f"{loss if loss is None else round(loss, 3)} | {row['outcome']} |"
        ),
        "",
        (
            f"Command: `{row['command']}` ({row['device']}, transformers {row['transformers']}, torch "
            f"{row['torch']}; {row['wall_s']:.0f} s in all)."
        ),
        "",
    ]
    (out / "trainer.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fire.Fire(run)

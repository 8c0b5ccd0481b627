"""Masked language model (MLM) pretraining of a RoBERTa encoder in plain PyTorch.

Read top to bottom, in the tutorial's order: data -> masking -> model and loss -> optimizer and schedule ->
evaluation -> checkpoints and the experiment directory -> the training loop -> a run -> export and demo -> train().
What is not the lesson (the token store, streaming, flag checks, stop signals, locks, the time budget, --compile,
logging and MFU) lives in the `pretraining/` package beside this file, behind one call each.

Run it:

    python train_bert.py --checkpoint_dir ./experiments                        # train (wikitext-2, roberta-base)
    python train_bert.py --load_checkpoint_dir ./experiments/bert_pretrain...  # resume where it stopped
    python train_bert.py --help                                                 # every flag, documented

`train_bert_ds.py` imports the pieces below and changes only what DeepSpeed changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import random
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger
from tqdm.auto import tqdm

from pretraining import cli, corpus, flag_rules, logs, rotary, safeguards, speed, streaming, time_budget, token_store
from pretraining.errors import ConfigError
from pretraining.safeguards import CHECKPOINT_PATTERN, LATEST_POINTER  # the experiment folder's file names

if TYPE_CHECKING:
    import transformers

# The heavy Hugging Face imports (datasets, transformers, tokenizers) happen inside the functions that need them, so
# `--help` and bad flags answer at once.

FILL_MASK_SENTENCE = "In the beautiful season of <mask> the <mask> shed their leaves."
IGNORE_INDEX = -100  # the label that F.cross_entropy skips: "not a prediction target"


# ----------------------------------------------------------------------------------------------------------------------
# Data: load the text and a tokenizer, tokenize once into a token store, cut blocks from its memory map.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PreparedData:
    """Everything that comes from the dataset and the tokenizer, ready for the loop."""

    tokenizer: Any
    train_blocks: token_store.PackedBlocks | streaming.BlockStream
    validation_blocks: token_store.PackedBlocks | torch.Tensor  # the --eval_blocks subset that periodic evaluations use
    test_blocks: token_store.PackedBlocks | torch.Tensor | None
    masking: MaskingConfig

    @property
    def num_train_blocks(self) -> int | None:
        """Blocks per epoch (None for a stream, whose length is unknown)."""
        return None if isinstance(self.train_blocks, streaming.BlockStream) else len(self.train_blocks)


def prepare_data(flags: dict[str, Any], saved_tokenizer_dir: Path | None = None) -> PreparedData:
    """Load the dataset and the tokenizer (or train one); map each split's token store (built on first use).

    On a resume the tokenizer comes from the experiment directory, so it is exactly the one the run trained with.
    """
    raw = corpus.load_text_dataset(flags["dataset"], flags["dataset_config"], flags["streaming"]) if (
        flags["streaming"] or (flags["tokenizer"] == "bpe" and saved_tokenizer_dir is None)) else None
    if saved_tokenizer_dir is not None:
        tokenizer = corpus.load_tokenizer(str(saved_tokenizer_dir))
    elif flags["tokenizer"] == "bpe":
        logger.info(f"training a byte-level BPE tokenizer ({flags['bpe_vocab_size']} tokens) on the train split")
        tokenizer = corpus.train_bpe_tokenizer(raw["train"], flags["bpe_vocab_size"])
    else:
        tokenizer = corpus.load_tokenizer(flags["tokenizer"])
    corpus.check_block_length(tokenizer, flags["max_seq_length"], flags["tokenizer"])
    masking = MaskingConfig(tokenizer, flags["mask_prob"], flags["random_replace_prob"], flags["unmask_replace_prob"],
                            flags.get("whole_word_mask", False))
    if flags["streaming"]:
        return PreparedData(tokenizer, *streaming.open_streams(raw, tokenizer, flags), masking)
    tokens, meta = token_store.open_token_store(flags["dataset"], flags["dataset_config"], tokenizer,
                                                flags["data_cache"], flags["num_proc"] or os.cpu_count() or 1, raw)
    rows = {split: info["rows"] for split, info in meta["splits"].items()}
    blocks = {split: pack_blocks(tokens[split], tokenizer, flags["max_seq_length"],
                                 corpus.describe_split(flags["dataset"], rows, split)) for split in tokens}
    if len(blocks["train"]) < flags["batch_size"]:  # checked here, before the experiment directory is created
        raise ConfigError(f"{corpus.describe_split(flags['dataset'], rows, 'train')} has {len(blocks['train'])} "
                          f"blocks of --max_seq_length {flags['max_seq_length']} tokens, fewer than one batch "
                          f"(--batch_size {flags['batch_size']}); use more text or a smaller --batch_size")
    validation = eval_subset(blocks["validation"], flags["eval_blocks"], flags["seed"])
    return PreparedData(tokenizer, blocks["train"], validation, blocks.get("test"), masking)


def pack_blocks(tokens: np.ndarray, tokenizer: "transformers.PreTrainedTokenizerBase", max_seq_length: int,
                split_name: str = "the split") -> token_store.PackedBlocks:
    """The split's flat token array as full blocks `<s> ... </s>` of `max_seq_length` tokens (see PackedBlocks)."""
    start_id, end_id = corpus.block_framing_ids(tokenizer)
    blocks = token_store.PackedBlocks(tokens, start_id, end_id, max_seq_length)
    if len(blocks) == 0:
        raise ConfigError(
            f"{split_name} yields {len(tokens)} tokens, fewer than one block of --max_seq_length {max_seq_length} "
            f"needs ({max_seq_length - 2} plus <s> and </s>); use more text or a smaller --max_seq_length"
        )
    return blocks


def eval_subset(blocks: token_store.PackedBlocks, eval_blocks: int, seed: int) -> token_store.PackedBlocks:
    """`eval_blocks` blocks drawn once, by `seed`, from the split (all of it when it has no more), in file order."""
    if eval_blocks == 0 or eval_blocks >= len(blocks):
        return blocks
    rows = torch.randperm(len(blocks), generator=seeded_generator(seed, 0xE7A1B))[:eval_blocks]
    return blocks.select(np.sort(rows.numpy()))


# ----------------------------------------------------------------------------------------------------------------------
# Masking: BERT's 80/10/10 rule, vectorised, reproducible from a generator; batches made from masked blocks.
# ----------------------------------------------------------------------------------------------------------------------


def masking_function(input_ids: torch.Tensor, tokenizer: "transformers.PreTrainedTokenizerBase",
                     mask_prob: float = 0.15, random_replace_prob: float = 0.1, unmask_replace_prob: float = 0.1,
                     generator: torch.Generator | None = None, word_starts: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a batch of token ids for MLM; return `(masked_input_ids, labels)`.

    The exact rule, for every position of the LongTensor `input_ids` [B, T]:

    - A special token of the tokenizer (bos/eos/pad/unk/mask/cls/sep and any added special token) is never selected.
    - Every other token is selected, independently, with probability `mask_prob`.
    - A selected token is then, independently of everything else:
        * replaced by a uniformly random non-special token id with probability `random_replace_prob`
          (the replacement may by chance equal the original token: 1 in (vocab - specials));
        * left unchanged with probability `unmask_replace_prob`;
        * replaced by the mask token with probability `1 - random_replace_prob - unmask_replace_prob`.
      So with the defaults (0.15, 0.1, 0.1) a non-special token becomes <mask> with probability 0.15 * 0.8 = 0.12,
      a random token with 0.015, stays itself but is predicted with 0.015, and is not predicted with 0.85.
      "10% random" means 10% *of the selected tokens*, not of all tokens.
    - `labels` holds the original id at every selected position and -100 (ignored by the loss) everywhere else.

    Whole-word masking (BERT's): given `word_starts`, a bool table over the vocabulary saying which ids begin a word
    (`word_start_table`), the unit of selection is the word instead of the token: each word is selected with
    probability `mask_prob`, and all its pieces with it; the 80/10/10 choice is still made per piece, as in BERT.
    A word is a token that starts one plus the pieces that follow it; the first token of a row and every token after
    a special token also start a word (packing cuts a word at a block's start: its first piece there is a word).

    The same `generator` state gives the same masks; `input_ids` is not modified. Three random tensors are drawn
    whatever the probabilities, so a generator's stream does not depend on them.
    """
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=input_ids.device)
    is_special = torch.isin(input_ids, special_ids)
    selection_draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    replacement_draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    non_special_ids = torch.ones(len(tokenizer), dtype=torch.bool, device=input_ids.device)
    non_special_ids[special_ids] = False
    non_special_ids = non_special_ids.nonzero().squeeze(1)
    random_ids = non_special_ids[torch.randint(len(non_special_ids), input_ids.shape, generator=generator,
                                               device=input_ids.device)]

    if word_starts is not None:  # every piece of a word takes the selection draw of the word's first piece
        selection_draw = selection_draw.gather(1, corpus.word_start_positions(input_ids, is_special, word_starts))
    selected = (selection_draw < mask_prob) & ~is_special
    replace_randomly = selected & (replacement_draw < random_replace_prob)
    keep_unchanged = (selected & (replacement_draw >= random_replace_prob)
                      & (replacement_draw < random_replace_prob + unmask_replace_prob))
    replace_with_mask = selected & ~replace_randomly & ~keep_unchanged

    masked_input_ids = torch.where(replace_randomly, random_ids.to(input_ids.dtype), input_ids)
    masked_input_ids = masked_input_ids.masked_fill(replace_with_mask, tokenizer.mask_token_id)
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
    return masked_input_ids, labels


def seeded_generator(*numbers: int) -> torch.Generator:
    """A torch.Generator seeded from a tuple of integers (e.g. seed, epoch, batch index) without collisions."""
    seed = int(np.random.SeedSequence(list(numbers)).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


PREDICTION_BUCKET = 64  # the number of predicted positions per batch is padded to a multiple of this


def sparse_batch(masked_input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Turn (inputs, labels) into what the sparse MLM loss needs: inputs, flat masked positions, their labels.

    Computing the positions here, on the data side, keeps the training step free of the device->host sync that
    `hidden[labels != -100]` would force. Their number is padded up to a multiple of PREDICTION_BUCKET (position 0,
    label -100: ignored), so the head sees few distinct shapes: compiled kernels are reused, and glibc's allocator
    does not fragment the heap as it did with a new shape every step (benchmarks/README.md, "Memory over a long run").
    """
    flat_labels = labels.flatten()
    masked_positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    padding = -len(masked_positions) % PREDICTION_BUCKET
    masked_labels = F.pad(flat_labels[masked_positions].long(), (0, padding), value=IGNORE_INDEX)
    return {
        "input_ids": masked_input_ids.long(),
        "masked_positions": F.pad(masked_positions, (0, padding)),
        "masked_labels": masked_labels,
    }


@dataclasses.dataclass
class MaskingConfig:
    """The three masking probabilities and the tokenizer they apply to; whole words when `whole_word_mask`."""

    tokenizer: Any
    mask_prob: float
    random_replace_prob: float
    unmask_replace_prob: float
    whole_word_mask: bool = False

    def __post_init__(self):
        self.word_starts = corpus.word_start_table(self.tokenizer) if self.whole_word_mask else None

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        masked, labels = masking_function(
            input_ids, self.tokenizer, self.mask_prob, self.random_replace_prob, self.unmask_replace_prob, generator,
            self.word_starts,
        )
        return sparse_batch(masked, labels)


class TrainBatches(torch.utils.data.Dataset):
    """Item `i` is the i-th training batch of one epoch, for one rank, freshly masked.

    Batch `i` of epoch `e` is a fixed slice of that epoch's shuffled block order (a permutation seeded by
    (seed, e)), masked with a generator seeded by (seed, e, global batch index). Every random draw is therefore a
    pure function of the position, so (epoch, batch index) is the whole data state: a resumed run continues with
    exactly the batches and masks the uninterrupted run would have seen, for any `num_workers`, without replaying.
    With several ranks, rank r takes global batches r, r + world_size, ...: different blocks and masks per rank.
    The incomplete last batch of each epoch is skipped (a different one each epoch, since the order is reshuffled).
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, epoch: int, seed: int, masking: MaskingConfig,
                 rank: int = 0, world_size: int = 1):
        self.blocks, self.batch_size, self.epoch, self.seed = blocks, batch_size, epoch, seed
        self.masking, self.rank, self.world_size = masking, rank, world_size
        self.order = torch.randperm(len(blocks), generator=seeded_generator(seed, epoch))

    def __len__(self) -> int:
        return len(self.blocks) // (self.batch_size * self.world_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        global_index = index * self.world_size + self.rank
        rows = self.order[global_index * self.batch_size : (global_index + 1) * self.batch_size]
        return self.masking(self.blocks[rows], seeded_generator(self.seed, self.epoch, global_index))


def train_batches(blocks: "token_store.PackedBlocks | torch.Tensor | streaming.BlockStream", batch_size: int, seed: int,
                  masking: MaskingConfig, start: tuple, num_workers: int, pin_memory: bool, rank: int = 0,
                  world_size: int = 1) -> Iterator[tuple[tuple, dict[str, torch.Tensor]]]:
    """Yield `(next_position, batch)` forever, starting at `start` = (epoch, batch index).

    `next_position` is where the data continues after this batch: what a checkpoint stores. A BlockStream has
    positions of its own (see `streaming.stream_batches`).
    """
    if isinstance(blocks, streaming.BlockStream):
        yield from streaming.stream_batches(blocks, batch_size, start, rank, world_size, lambda rows, index: masking(
            rows, seeded_generator(seed, 0x57EA, index)))  # masks seeded by (seed, global batch index)
        return
    epoch, index = start
    while True:
        epoch_batches = TrainBatches(blocks, batch_size, epoch, seed, masking, rank, world_size)
        if len(epoch_batches) == 0:
            raise ConfigError(
                f"the train split has {len(blocks)} blocks, fewer than one batch (--batch_size {batch_size} x "
                f"{world_size} rank(s)); use more text or a smaller --batch_size"
            )
        loader = torch.utils.data.DataLoader(
            epoch_batches,
            batch_size=None,  # items already are batches
            sampler=range(index, len(epoch_batches)),
            num_workers=num_workers,
            pin_memory=pin_memory,
            worker_init_fn=safeguards.ignore_stop_signals_in_worker if num_workers else None,
            generator=torch.Generator(),  # otherwise creating the iterator draws from (and shifts) the global RNG
        )
        for batch_index, batch in enumerate(loader, start=index):
            yield (epoch, batch_index + 1), batch
        epoch, index = epoch + 1, 0


class EvalBatches:
    """The split's blocks in order, in batches, each masked with a generator fixed by (`seed`, its index): the same
    masks at every evaluation, batch by batch on demand (a whole test split is never held in memory).

    Fixed masks make evaluation numbers comparable across steps and across runs with the same seed. Slicing gives
    the batches of a shard (`batches[rank::world_size]`) with the same masks.
    """

    def __init__(self, blocks: "token_store.PackedBlocks | torch.Tensor", batch_size: int, seed: int,
                 masking: MaskingConfig, indices: range | None = None):
        self.blocks, self.batch_size, self.seed, self.masking = blocks, batch_size, seed, masking
        self.indices = range(math.ceil(len(blocks) / batch_size)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int | slice) -> "dict[str, torch.Tensor] | EvalBatches":
        if isinstance(index, slice):
            return EvalBatches(self.blocks, self.batch_size, self.seed, self.masking, self.indices[index])
        batch = self.indices[index]  # raises IndexError past the end, which ends a for loop
        rows = self.blocks[batch * self.batch_size : (batch + 1) * self.batch_size]
        # a tag so evaluation masks never coincide with a training batch's
        return self.masking(rows, seeded_generator(self.seed, 0xE7A1, batch))


# ----------------------------------------------------------------------------------------------------------------------
# Model and loss: a Hugging Face masked LM (RoFormer or RoBERTa) sized by the flags, and a sparse MLM loss.
# ----------------------------------------------------------------------------------------------------------------------


def create_model(num_layers: int, num_heads: int, ff_dim: int, h_dim: int, dropout: float,
                 tokenizer: "transformers.PreTrainedTokenizerBase", max_seq_length: int,
                 init_from: str | None = None, output_bias: torch.Tensor | None = None, positions: str = "rotary"
                 ) -> "transformers.PreTrainedModel":
    """Build a randomly initialised BERT-style masked LM whose sizes come from the arguments and the tokenizer.

    `positions` is how attention learns where the tokens are:
    - "rotary": `RoFormerForMaskedLM`, BERT with rotary position embeddings (RoPE, as in RoFormer, ModernBERT and
      Llama). Queries and keys are rotated by angles proportional to their positions, so every attention score
      depends on the two tokens' distance from the first step on; there is nothing about positions to learn.
    - "learned": `RobertaForMaskedLM`, RoBERTa's learned absolute positions: a trained vector per position, added
      to the token's. The model has to discover from data that neighbours matter, which takes a small model a long
      plateau (docs/flags.md). Released RoBERTa checkpoints use it.

    Vocabulary size and special ids come from the tokenizer (nothing is hard-coded to roberta-base). RoBERTa
    numbers positions from pad_token_id + 1, so a block of `max_seq_length` tokens needs that many more position
    embeddings. `output_bias` (see `unigram_output_bias`) becomes the initial bias of the output layer.

    With `init_from` (continued pretraining) the model is that masked-LM checkpoint instead, weights and config
    (its sizes must already agree with the arguments: `resolve_init_from` sees to it), with `dropout` applied.
    """
    from transformers import (
        AutoModelForMaskedLM,
        RobertaConfig,
        RobertaForMaskedLM,
        RoFormerConfig,
        RoFormerForMaskedLM,
    )

    if init_from is not None:
        model = AutoModelForMaskedLM.from_pretrained(init_from, hidden_dropout_prob=dropout,
                                                     attention_probs_dropout_prob=dropout)
        rotary.freeze_sinusoid_positions(model)
        rotary.use_fused_rotary_attention(model)
        return model
    start_id, end_id = corpus.block_framing_ids(tokenizer)
    sizes = dict(vocab_size=len(tokenizer), hidden_size=h_dim, num_hidden_layers=num_layers,
                 num_attention_heads=num_heads, intermediate_size=ff_dim, hidden_dropout_prob=dropout,
                 attention_probs_dropout_prob=dropout, type_vocab_size=1, layer_norm_eps=1e-5,
                 pad_token_id=tokenizer.pad_token_id, bos_token_id=start_id, eos_token_id=end_id)
    if positions == "rotary":
        model = RoFormerForMaskedLM._from_config(RoFormerConfig(max_position_embeddings=max_seq_length, **sizes))
        rotary.use_fused_rotary_attention(model)
    else:
        config = RobertaConfig(max_position_embeddings=max_seq_length + tokenizer.pad_token_id + 1, **sizes)
        model = RobertaForMaskedLM._from_config(config, attn_implementation="sdpa")
    if output_bias is not None:
        with torch.no_grad():
            model.get_output_embeddings().bias.copy_(output_bias)  # tied to the head's own bias
    return model


def mlm_head(model: "transformers.PreTrainedModel") -> torch.nn.Module:
    """The model's own MLM head (hidden states to vocabulary logits): `lm_head` in RoBERTa, `cls` in RoFormer."""
    return model.lm_head if hasattr(model, "lm_head") else model.cls


def unigram_output_bias(token_ids: np.ndarray, vocab_size: int) -> torch.Tensor:
    """The log frequency of every token in `token_ids` (add-one smoothed): the output layer's initial bias.

    With random weights the model starts out predicting every token alike (ln 50265 = 10.8 nats) and spends its
    first hundreds of steps learning how common each token is; starting from the corpus's unigram distribution
    (7.1 nats on wikitext-2), the steps go to context instead. The usual advice for any classifier's last layer.
    """
    counts = np.bincount(np.asarray(token_ids, dtype=np.int64), minlength=vocab_size)[:vocab_size] + 1.0
    return torch.from_numpy(np.log(counts / counts.sum())).float()


def mlm_loss(model: torch.nn.Module, input_ids: torch.Tensor, masked_positions: torch.Tensor,
             masked_labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the model's predictions at the masked positions only ("sparse prediction").

    The encoder runs on every token, but the MLM head (a d x d layer plus a d x vocab projection: most of a small
    model's FLOPs) runs only where there is something to predict, ~15% of positions. Logits go to fp32 before the
    softmax so autocast never computes the loss in half precision. `mlm_head` is the model's own head, so the
    trained weights load with `AutoModelForMaskedLM.from_pretrained`. No attention mask: packed blocks have no padding.
    """
    hidden = model.base_model(input_ids=input_ids).last_hidden_state
    hidden = hidden.flatten(0, 1).index_select(0, masked_positions)
    logits = mlm_head(model)(hidden)
    return F.cross_entropy(logits.float(), masked_labels, reduction=reduction)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct trained parameters (tied embedding/decoder weights counted once; a fixed table such as
    RoFormer's sinusoids not at all)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule.
# ----------------------------------------------------------------------------------------------------------------------


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: weight matrices decay, biases and LayerNorm weights do not (BERT's recipe)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:  # e.g. RoFormer's fixed sinusoid table
            continue
        (no_decay if parameter.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: biases and LayerNorm weights are not decayed (BERT's recipe).

    The fused implementation (one kernel for all parameters) on CPU and GPU.
    """
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)


def create_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int | float, num_iterations: int,
                        budget: "time_budget.TimeBudget | None" = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to `lr`, then linear decay to 0 at the end of the run.

    `warmup_steps` below 1 is a share of the run (0.06: its first 6%), a whole number a count of steps. With a
    `budget` the schedule follows the share of its wall-clock time spent (as Cramming does), so the learning rate
    reaches 0 when the budget ends however fast the steps are.
    """
    from transformers import get_linear_schedule_with_warmup

    if budget is None:
        return get_linear_schedule_with_warmup(optimizer, warmup_step_count(warmup_steps, num_iterations),
                                               num_iterations)
    # A closure, not an object: LambdaLR's state_dict would otherwise try to save the budget with the checkpoint.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: warmup_then_decay(budget.progress(), warmup_steps))


def warmup_step_count(warmup_steps: int | float, num_iterations: int) -> int:
    """--warmup_steps as a number of steps: a share of the run (< 1) times its steps, or the count itself."""
    return round(warmup_steps * num_iterations) if warmup_steps < 1 else int(warmup_steps)


def warmup_then_decay(progress: float, warmup_fraction: float) -> float:
    """The LR multiplier at `progress` (0 to 1) of the run: up linearly over the warmup, then down linearly to 0."""
    if progress < warmup_fraction:
        return progress / warmup_fraction
    return max(0.0, (1 - progress) / (1 - warmup_fraction))


def apply_lr_schedule(optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
                      lr: float) -> None:
    """After loading a checkpoint, use this run's peak `lr` and schedule from the checkpoint's step on.

    Loading the optimizer's state restores the saved peak lr: without this, a resume with a lower --lr (the cure
    for a NaN) would silently keep the old one. With unchanged flags it recomputes exactly the saved values.
    """
    lr_scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, lr_lambda in zip(optimizer.param_groups, lr_scheduler.lr_lambdas):
        group["lr"] = lr * lr_lambda(lr_scheduler.last_epoch)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
             autocast: Callable[[], contextlib.AbstractContextManager],
             loss_function: Callable[..., torch.Tensor] = mlm_loss, description: str = "evaluating") -> torch.Tensor:
    """Return a tensor [sum of token losses, number of predicted tokens] over `batches` (fixed masks).

    A sum and a count rather than a mean, so results from several ranks or splits combine exactly.
    `loss_function(model, **batch, reduction="sum")` computes the loss (the DeepSpeed script passes its engine's).
    Never silent: a progress bar on a terminal, and a log line with the expected duration for log files.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    forecast = logs.DurationForecast(description, len(batches))
    for batch in tqdm(batches, desc=description, unit="batch", leave=False, disable=None):
        batch = to_device(batch, device)
        with autocast():
            loss_sum = loss_function(model, **batch, reduction="sum")
        totals += torch.stack([loss_sum.double(), (batch["masked_labels"] != IGNORE_INDEX).sum().double()])
        forecast.batch_done(totals)
    model.train(was_training)
    return totals


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a batch to `device`; non-blocking, so a pinned-memory copy overlaps with compute on GPU."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def make_autocast(device: torch.device, dtype: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for `dtype` (a no-op context for fp32)."""
    if dtype == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=flag_rules.DTYPES[dtype])


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints and the experiment directory: one dict holds the whole run's state; files are written atomically.
# ----------------------------------------------------------------------------------------------------------------------


def checkpoint_path(experiment_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives; zero-padded so names sort by step."""
    return experiment_dir / f"checkpoint-{step:08d}.pt"


def seed_rngs(seed: int) -> None:
    """Seed every RNG the run draws from (python, numpy, torch): the initial weights and dropout follow --seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """Every RNG the run draws from (python, numpy, torch CPU, CUDA), in a form `weights_only` loading accepts."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": numpy_state[2],
                  "has_gauss": numpy_state[3], "cached_gaussian": numpy_state[4]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` captured, so dropout continues exactly as in the uninterrupted run."""
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state(("MT19937", numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(experiment_dir: Path, state: dict[str, Any], keep_last: int) -> Path:
    """Save the run's state atomically, then point `latest` at it, then delete checkpoints beyond `keep_last`.

    The order matters: the pointer moves only once the file is complete, and old checkpoints go only once the new
    one is safe, so a crash at any moment leaves a loadable checkpoint. A failed save (e.g. a full disk) raises
    `CheckpointError` and leaves the previous checkpoint as it was. Only checkpoints of earlier steps count towards
    `keep_last`: one of a later step exists only if it was unreadable and the run resumed from before it.
    """
    path = checkpoint_path(experiment_dir, state["step"])
    with safeguards.save_failure_reported(path.name, experiment_dir):  # a full disk: one line, the old one kept
        safeguards.atomic_write(path, lambda file: torch.save(state, file))
        safeguards.atomic_write(experiment_dir / LATEST_POINTER, lambda file: file.write(path.name + "\n"), mode="w")
    older = sorted(other for other in experiment_dir.glob(CHECKPOINT_PATTERN) if other.name < path.name)
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        old.unlink()
    for leftover in experiment_dir.glob(f".{CHECKPOINT_PATTERN}.*.tmp"):  # from a save that was killed midway
        leftover.unlink(missing_ok=True)
    return path


def restore_checkpoint(experiment_dir: Path, device: torch.device, lr: float, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, lr_scheduler: Any, scaler: torch.amp.GradScaler,
                       end: time_budget.StepLimit | time_budget.TimeBudget) -> tuple[int, tuple]:
    """Load the newest checkpoint into the run's objects (weights, AdamW's moments, schedule, loss scaler, every
    RNG, a time budget's spent time); return its step and the data position to continue from."""
    checkpoint = safeguards.load_latest_checkpoint(experiment_dir, map_location=device)  # skips corrupt files
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    apply_lr_schedule(optimizer, lr_scheduler, lr)
    scaler.load_state_dict(checkpoint["grad_scaler"])
    set_rng_states(checkpoint["rng"])
    if isinstance(end, time_budget.TimeBudget):
        end.spent_before_s = checkpoint.get("budget_spent_s", 0.0)
    return checkpoint["step"], tuple(checkpoint["data_position"])


def create_experiment(flags: dict[str, Any], data: PreparedData, model: torch.nn.Module, **extra: Any) -> Path:
    """Create `{checkpoint_dir}/bert_pretrain.YYYY.MM.DD.HH.MM.SS.{uuid4}` and write what reproduces the run in it:
    tokenizer, hparams.json, git state.

    Called only once all inputs have loaded, so a bad dataset or tokenizer leaves no directory behind. The uuid comes
    from the OS's entropy, never from the seeded RNGs: two runs with the same seed started in the same second still
    get different directories.
    """
    name = f"bert_pretrain.{datetime.datetime.now():%Y.%m.%d.%H.%M.%S}.{uuid.uuid4()}"
    experiment_dir = Path(flags["checkpoint_dir"]) / name
    experiment_dir.mkdir(parents=True)
    hparams = {"flags": flags, "vocab_size": len(data.tokenizer), "num_parameters": count_parameters(model),
               "train_blocks": data.num_train_blocks, "validation_blocks": len(data.validation_blocks),
               "versions": logs.library_versions(), **extra}
    with safeguards.removed_unless_complete(experiment_dir):  # a full disk or a stop leaves no half-made experiment
        data.tokenizer.save_pretrained(experiment_dir / "tokenizer")
        safeguards.atomic_write(experiment_dir / "hparams.json", lambda f: json.dump(hparams, f, indent=2), mode="w")
        logs.record_code_version(experiment_dir)
    return experiment_dir


# ----------------------------------------------------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------------------------------------------------


def training_loop(flags: dict[str, Any], device: torch.device, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, lr_scheduler: Any, scaler: torch.amp.GradScaler,
                  data: PreparedData, experiment_dir: Path, metrics: logs.MetricsLogger, start_step: int,
                  data_position: tuple[int, int], end: time_budget.StepLimit | time_budget.TimeBudget) -> int:
    """Train from `start_step` until `end` (a step count or a time budget) says stop, logging, evaluating and
    checkpointing along the way; return the last step."""
    loss_function = speed.compiled(mlm_loss) if flags["compile"] else mlm_loss  # --compile
    autocast = make_autocast(device, flags["dtype"])
    validation = EvalBatches(data.validation_blocks, flags["batch_size"], flags["seed"], data.masking)
    batches = train_batches(data.train_blocks, flags["batch_size"], flags["seed"], data.masking, data_position,
                            flags["num_workers"], pin_memory=device.type == "cuda")
    window = logs.LossWindow(device, flags["grad_accum_steps"], check_finite=flags["dtype"] != "fp16")

    def checkpoint_state(step: int) -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": scaler.state_dict(), "step": step,
                "data_position": list(data_position), "rng": rng_states(), "flags": flags,
                **end.log_fields()}  # a time budget's: the time spent, which a resume continues from

    if isinstance(end, time_budget.TimeBudget):  # time what the end of the run will cost, then start the clock
        time_budget.measure_end_of_run(end, model, validation,
                                       0 if data.test_blocks is None else len(data.test_blocks), flags,
                                       lambda: time_evaluation_batch(model, validation[:2], device, autocast))
    model.train()
    step = start_step
    progress = tqdm(total=end.total_steps, initial=start_step, desc="training", unit="step", disable=None)
    with safeguards.StopSignal() as stop, progress:  # the progress bar closes however the loop ends
        for step in end.steps(start_step):
            step_start = time.perf_counter()
            for _ in range(flags["grad_accum_steps"]):
                data_position, batch = next(batches)
                batch = to_device(batch, device)
                with autocast():
                    loss = loss_function(model, **batch)
                # Each micro-batch's mean loss is divided by the number of micro-batches so the summed gradient
                # is their average: the same update as one big batch.
                scaler.scale(loss / flags["grad_accum_steps"]).backward()
                window.add(step, loss, batch["masked_labels"])
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), flags["grad_clip"] or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            progress.update()
            evaluate_now, checkpoint_now = step % flags["eval_every"] == 0, step % flags["checkpoint_every"] == 0
            last = end.step_done(step, time.perf_counter() - step_start, evaluate_now, checkpoint_now)

            if step % flags["log_every"] == 0 or last:
                window.raise_if_nonfinite(experiment_dir)
                record = window.record(step, lr_scheduler.get_last_lr()[0], float(grad_norm), flags, model.config,
                                       device) | end.log_fields()
                if scaler.is_enabled():
                    record["loss_scale"] = scaler.get_scale()
                metrics.log(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}")
            if evaluate_now or last:
                with end.timed("evaluation"):
                    log_evaluation(metrics, step, "eval", evaluate(model, validation, device, autocast,
                                                                   description="validation"))
            if checkpoint_now or last or stop.signum is not None:
                window.raise_if_nonfinite(experiment_dir)
                safeguards.raise_if_weights_nonfinite(model, step, experiment_dir)
                with end.timed("checkpoint"):
                    path = save_checkpoint(experiment_dir, checkpoint_state(step), flags["keep_last"])
                logger.info(f"saved checkpoint {path.name}")
            if stop.signum is not None:
                raise stop.interruption(step, experiment_dir)
            if last:
                break
    end.training_ended = True
    log_test_evaluation(metrics, data, flags, lambda test: evaluate(model, test, device, autocast, description="test"),
                        step, end.test_blocks(flags["batch_size"]))
    return step


def log_evaluation(metrics: logs.MetricsLogger, step: int, prefix: str, totals: torch.Tensor) -> None:
    """Log the token-weighted mean loss and its perplexity from evaluate()'s [loss sum, token count]."""
    loss = float(totals[0] / totals[1])
    metrics.log({"step": step, f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 700))})


def log_test_evaluation(metrics: logs.MetricsLogger, data: PreparedData, flags: dict[str, Any],
                        evaluate_batches: Callable[[list[dict[str, torch.Tensor]]], torch.Tensor],
                        step: int | None = None, max_blocks: int | None = None) -> None:
    """At the end of training (`step`, default num_iterations), evaluate the test split (if the dataset has one)
    with `evaluate_batches`: all of it, or a fixed subset of `max_blocks` blocks (a short time budget's)."""
    if data.test_blocks is not None:
        blocks = data.test_blocks
        if max_blocks is not None and max_blocks < len(blocks):
            logger.info(f"test: {max_blocks:,} of the {len(blocks):,} test blocks (what the time budget's end holds)")
            blocks = blocks[:max_blocks] if isinstance(blocks, torch.Tensor) else eval_subset(blocks, max_blocks,
                                                                                              flags["seed"])
        test = EvalBatches(blocks, flags["batch_size"], flags["seed"], data.masking)
        log_evaluation(metrics, flags["num_iterations"] if step is None else step, "test", evaluate_batches(test))


# ----------------------------------------------------------------------------------------------------------------------
# A run: data, model and the experiment directory put together around the loop.
# ----------------------------------------------------------------------------------------------------------------------


def run_training(flags: dict[str, Any], device: torch.device, saved_tokenizer_dir: Path | None,
                 auto_size_keeping: set[str] | None = None) -> Path:
    """Prepare data and model, create or reopen the experiment directory, run the training loop, export.

    With `auto_size_keeping` (the user's own flags among AUTO_SIZED_FLAGS), the model's shape, batch size and lr
    are first chosen for the time budget (`choose_shape_for_budget`)."""
    seed_rngs(flags["seed"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls

    progress = safeguards.RunProgress(None if saved_tokenizer_dir is None else saved_tokenizer_dir.parent)
    with contextlib.ExitStack() as lock, safeguards.reported_stops(flags, progress):
        data = prepare_data(flags, saved_tokenizer_dir)
        auto_size_note = None
        if auto_size_keeping is not None:
            chosen, auto_size_note = time_budget.choose_shape_for_budget(
                flags, device, auto_size_keeping, lambda shape: measure_tokens_per_s(shape, data.tokenizer, device))
            flags.update(chosen)
            safeguards.check_memory(flags, device)
        new_model = saved_tokenizer_dir is None and not flags["init_from"]  # a resume loads its weights instead
        output_bias = unigram_output_bias(data.train_blocks.token_sample(), len(data.tokenizer)) if new_model else None
        model = create_model(flags["num_layers"], flags["num_heads"], flags["ff_dim"], flags["h_dim"], flags["dropout"],
                             data.tokenizer, flags["max_seq_length"], flags["init_from"], output_bias,
                             flags["positions"]).to(device)
        optimizer = create_optimizer(model, flags["lr"], flags["weight_decay"])
        progress.end = end = time_budget.run_end(flags)  # a StepLimit, or a TimeBudget with --time_budget
        lr_scheduler = create_lr_scheduler(optimizer, flags["warmup_steps"], flags["num_iterations"],
                                           end if isinstance(end, time_budget.TimeBudget) else None)
        scaler = torch.amp.GradScaler(device.type, enabled=flags["dtype"] == "fp16")

        safeguards.check_disk_space(Path(flags["checkpoint_dir"] or flags["load_checkpoint_dir"]),
                                    count_parameters(model))
        if progress.experiment_dir is None:  # a new experiment: only now, when all inputs loaded, create its directory
            progress.experiment_dir, progress.created = create_experiment(flags, data, model), True
            lock.enter_context(safeguards.experiment_lock(progress.experiment_dir))  # nobody else knows its name yet
            start_step, data_position = 0, (0, 0)
        else:
            start_step, data_position = restore_checkpoint(progress.experiment_dir, device, flags["lr"], model,
                                                           optimizer, lr_scheduler, scaler, end)
            flag_rules.record_flag_changes(progress.experiment_dir, flags, start_step)
        experiment_dir = progress.experiment_dir

        with logs.experiment_logging(experiment_dir, start_step) as metrics:
            log_run_start(experiment_dir, start_step, count_parameters(model), data, flags, device)
            if auto_size_note:
                logger.info(auto_size_note)  # here, so that train.log has it too
            progress.started = True
            training_loop(flags, device, model, optimizer, lr_scheduler, scaler, data, experiment_dir, metrics,
                          start_step, data_position, end)
            export_and_demo(model, data.tokenizer, experiment_dir, device, flags["max_seq_length"])
            safeguards.mark_completed(experiment_dir, safeguards.saved_step(experiment_dir))
            if isinstance(end, time_budget.TimeBudget):
                logger.info(f"time budget: {end.spent():.1f} s of {end.total_s:.0f} s spent{end.overrun_note()}")
    return experiment_dir


def log_run_start(experiment_dir: Path, start_step: int, num_parameters: int, data: PreparedData,
                  flags: dict[str, Any], device: torch.device) -> None:
    """The first log lines: which experiment, new or resumed, how big the model and the data are."""
    logger.info(f"experiment {experiment_dir}: {'resuming at step ' + str(start_step) if start_step else 'new'}")
    logger.info(f"model: {num_parameters / 1e6:.1f}M parameters; data: {data.num_train_blocks or 'streamed'} train / "
                f"{len(data.validation_blocks)} validation blocks of {flags['max_seq_length']} tokens; device {device}")


def measure_tokens_per_s(flags: dict[str, Any], tokenizer: Any, device: torch.device) -> float:
    """Training tokens per second of the model `flags` describe, on `device`: eager steps on random tokens. The
    weights and the RNG are thrown away afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = create_model(flags["num_layers"], flags["num_heads"], flags["ff_dim"], flags["h_dim"],
                             flags["dropout"], tokenizer, flags["max_seq_length"], positions=flags["positions"])
        model.to(device)
        optimizer = create_optimizer(model, flags["lr"], flags["weight_decay"])
        ids = torch.randint(len(tokenizer), (flags["batch_size"], flags["max_seq_length"]))
        batch = to_device(sparse_batch(*masking_function(ids, tokenizer)), device)
        tokens_per_s = speed.training_tokens_per_s(functools.partial(mlm_loss, model, **batch), optimizer,
                                                   make_autocast(device, flags["dtype"]),
                                                   flags["batch_size"] * flags["max_seq_length"])
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return tokens_per_s


def time_evaluation_batch(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                          autocast: Callable[[], contextlib.AbstractContextManager]) -> float:
    """Seconds one evaluation batch takes now: the fastest of `batches`, so that a one-off delay does not count."""
    return speed.fastest_s(lambda batch: float(evaluate(model, [batch], device, autocast)[0]), batches)


# ----------------------------------------------------------------------------------------------------------------------
# Export and demo: a Hugging Face folder anyone can load, and what it predicts.
# ----------------------------------------------------------------------------------------------------------------------


def export_and_demo(model: torch.nn.Module, tokenizer: Any, experiment_dir: Path, device: torch.device,
                    max_seq_length: int) -> None:
    """Save model and tokenizer as a Hugging Face folder `hf_model/` and show its fill-mask predictions.

    The folder is written under a temporary name and renamed into place, so `hf_model/` is always a complete export
    (or absent), however the run stops.
    """
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.model_max_length = max_seq_length  # what the model was trained on (and its position table allows)
        tokenizer.save_pretrained(folder)

    if not torch.cuda.is_available():  # save_pretrained imports deepspeed (through accelerate) where it is installed,
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # whose GPU detection would warn that it found none
    hf_model_dir = experiment_dir / "hf_model"
    safeguards.atomic_write_folder(hf_model_dir, write)  # an earlier export (of a run since extended) is replaced
    predictions = fill_mask_demo(hf_model_dir, device)
    logger.info(f"fill-mask: {FILL_MASK_SENTENCE}" + ("" if predictions else " (longer than max_seq_length; skipped)"))
    for number, candidates in enumerate(predictions, start=1):
        logger.info(f"fill-mask, <mask> #{number}: {' | '.join(candidates)}")


def fill_mask_demo(hf_model_dir: Path, device: torch.device, sentence: str = FILL_MASK_SENTENCE) -> list[list[str]]:
    """Load the exported model with `transformers.pipeline("fill-mask")` and return the top tokens per <mask>."""
    from transformers import pipeline

    fill_mask = pipeline("fill-mask", model=str(hf_model_dir), tokenizer=str(hf_model_dir), device=device)
    sentence = sentence.replace("<mask>", fill_mask.tokenizer.mask_token)
    if len(fill_mask.tokenizer(sentence)["input_ids"]) > fill_mask.tokenizer.model_max_length:
        return []  # the sentence does not fit the model's blocks (a tiny tokenizer splits it into many pieces)
    predictions = fill_mask(sentence, top_k=20)
    per_mask = predictions if isinstance(predictions[0], list) else [predictions]
    # A token that is only white space or a special token (</s>) shows nothing to a reader: skip it.
    specials = set(fill_mask.tokenizer.all_special_tokens)
    return [[word for word in (candidate["token_str"].strip() for candidate in candidates)
             if word and word not in specials][:5] for candidates in per_mask]


# ----------------------------------------------------------------------------------------------------------------------
# The command line: train() is the CLI (python train_bert.py --help).
# ----------------------------------------------------------------------------------------------------------------------


def train(checkpoint_dir: str | None = None, load_checkpoint_dir: str | None = None, dataset: str = "wikitext",
          dataset_config: str | None = "wikitext-2-v1", tokenizer: str = "roberta-base", bpe_vocab_size: int = 16384,
          mask_prob: float = 0.15, random_replace_prob: float = 0.1, unmask_replace_prob: float = 0.1,
          whole_word_mask: bool = False, max_seq_length: int = 128, num_layers: int = 2, num_heads: int = 2,
          ff_dim: int = 512, h_dim: int = 128, positions: str = "rotary", dropout: float = 0.0, batch_size: int = 16,
          grad_accum_steps: int = 1, num_iterations: int = 10000, time_budget: str | None = None,
          auto_size: bool = True, init_from: str | None = None, lr: float = 2e-3, weight_decay: float = 0.01,
          warmup_steps: float = 0.06, grad_clip: float = 1.0, dtype: str = "auto", compile: bool = True, seed: int = 42,
          log_every: int = 10, eval_every: int = 500, checkpoint_every: int = 1000, keep_last: int = 3,
          num_workers: int = 0, device: str = "auto", local_rank: int = -1, num_proc: int | None = None,
          data_cache: str | None = None, eval_blocks: int = 2048, streaming: bool = False) -> str:
    """Pretrain a RoBERTa encoder with masked language modelling; return the experiment directory.

    Start:  python train_bert.py --checkpoint_dir ./experiments [flags]
    Resume: python train_bert.py --load_checkpoint_dir ./experiments/bert_pretrain.YYYY... [--num_iterations N]
    Why each default is what it is: docs/flags.md.

    Args:
        checkpoint_dir: Start a new experiment in a new folder `bert_pretrain.<time>.<uuid>` inside this directory.
        load_checkpoint_dir: Resume this experiment from its newest intact checkpoint (flags left out keep its values).
        dataset: A Hub dataset name, a local datasets folder, a folder of train/validation[/test].txt, or one .txt file.
        dataset_config: The dataset's configuration name (wikitext: "wikitext-2-v1"; ignored for .txt files).
        tokenizer: A Hub name, a local tokenizer folder, or "bpe" to train a byte-level BPE on the train split.
        bpe_vocab_size: Vocabulary size of the tokenizer trained with --tokenizer bpe.
        mask_prob: Share of the non-special tokens selected for prediction (BERT: 0.15).
        random_replace_prob: Share of the selected tokens replaced by a random token (BERT: 0.1).
        unmask_replace_prob: Share of the selected tokens left unchanged (BERT: 0.1); the rest become <mask>.
        whole_word_mask: Select whole words: all pieces of a word are masked together.
        max_seq_length: Tokens per packed block, <s> and </s> included.
        num_layers: Transformer layers.
        num_heads: Attention heads per layer; must divide h_dim.
        ff_dim: Width of each layer's feed-forward block (4 x h_dim is usual).
        h_dim: Hidden size (also the size of the tied token embedding).
        positions: rotary (RoFormer's rotary position embeddings) or learned (RoBERTa's absolute positions).
        dropout: Dropout on hidden states and attention probabilities.
        batch_size: Blocks per micro-batch.
        grad_accum_steps: Micro-batches summed into each optimizer step.
        num_iterations: Optimizer steps in total (a resume continues up to it).
        time_budget: Train for this long instead ("600", "10m", "2h30m", "1d"); evaluation and export included.
        auto_size: With --time_budget, choose shape, batch size and lr for the budget and this device's speed.
        init_from: Continue pretraining a Hugging Face masked LM (an exported hf_model/ folder, or a Hub name).
        lr: Peak learning rate of AdamW (betas 0.9/0.98, eps 1e-6, as RoBERTa).
        weight_decay: AdamW weight decay, on weight matrices only.
        warmup_steps: Linear warmup, as a share of the run (below 1) or a number of steps; then linear decay to 0.
        grad_clip: Clip the global gradient norm to this (0: no clipping).
        dtype: auto (bf16 where the device computes it natively, else fp32), fp32, bf16 or fp16 (autocast).
        compile: Compile the loss (encoder, sparse head, cross-entropy) with torch.compile.
        seed: Seeds the data order, the masks, the initial weights and dropout.
        log_every: Steps between log lines.
        eval_every: Steps between evaluations on the --eval_blocks validation blocks.
        checkpoint_every: Steps between checkpoints (also at the end and when stopped).
        keep_last: Checkpoints kept; older ones are deleted once a newer one is safely written.
        num_workers: DataLoader processes that mask batches ahead of the step (0: in the main process).
        device: auto (the GPU where CUDA is available, else the CPU), cpu, cuda or cuda:N.
        local_rank: This process's GPU on its machine, as launchers pass it (-1: $LOCAL_RANK or 0).
        num_proc: Processes that tokenize the corpus into the token store (default: all cores).
        data_cache: Folder of the token stores (default: token_stores/ in the datasets cache).
        eval_blocks: Validation blocks of each evaluation, a fixed subset (0: the whole split).
        streaming: Read the corpus as a stream instead of a token store (for corpora too big to download).
    """
    flags, defaults = dict(locals()), flag_rules.flag_defaults(train)
    flag_rules.check_given_flags(flags, defaults)
    if load_checkpoint_dir is None:  # a new experiment
        flags, device, auto_size_keeping = flag_rules.resolve_new_run(flags, defaults)
        return str(run_training(flags, device, None, auto_size_keeping))
    experiment_dir = Path(load_checkpoint_dir)
    safeguards.check_resumable(experiment_dir)
    with safeguards.experiment_lock(experiment_dir):
        flags, device = flag_rules.resolve_resumed_run(flags, defaults)
        if not safeguards.check_resume_target(flags, experiment_dir):
            return str(experiment_dir)  # nothing left to do
        safeguards.check_memory(flags, device)
        return str(run_training(flags, device, experiment_dir / "tokenizer"))


if __name__ == "__main__":
    cli.main(train)

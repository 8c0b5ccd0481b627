"""Masked language model (MLM) pretraining of a RoBERTa encoder in plain PyTorch.

Read top to bottom, in the tutorial's order:

    data -> masking -> model -> checkpointing -> experiment directory -> train -> __main__

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
import inspect
import itertools
import json
import math
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger
from tqdm.auto import tqdm

from pretraining.budget import AUTO_SIZED_FLAGS, TimeBudget, choose_shape_for_budget, measure_end_of_run, parse_duration
from pretraining.cli import main
from pretraining.corpus import (
    block_framing_ids,
    check_tokenizer,
    describe_split,
    load_text_dataset,
    offline_hint,
    train_bpe_tokenizer,
)
from pretraining.errors import CheckpointError, ConfigError
from pretraining.flags import (
    DTYPES,
    resolve_device,
    resolve_dtype,
    resolve_init_from,
    resolve_resume_flags,
    validate_flags,
)
from pretraining.logs import LossWindow, MetricsLogger, experiment_logging, library_versions, record_code_version
from pretraining.safeguards import (
    CHECKPOINT_PATTERN,
    COMPLETED_KEY,
    LATEST_POINTER,
    RunProgress,
    StopSignal,
    atomic_write,
    check_disk_space,
    check_memory,
    check_resumable,
    check_resume_target,
    check_sequence_limits,
    check_writable,
    experiment_lock,
    ignore_stop_signals_in_worker,
    load_hparams,
    mark_completed,
    raise_if_weights_nonfinite,
    record_flag_changes,
    reported_stops,
    saved_step,
)
from pretraining.streaming import BlockStream
from pretraining.token_store import open_token_store

if TYPE_CHECKING:
    import datasets
    import transformers

# The heavy Hugging Face imports (datasets, transformers, tokenizers) happen inside the functions that need them, so
# `--help` and bad flags answer at once.

HERE = Path(__file__).resolve().parent
FILL_MASK_SENTENCE = "In the beautiful season of <mask> the <mask> shed their leaves."
IGNORE_INDEX = -100  # the label that F.cross_entropy skips: "not a prediction target"


# ----------------------------------------------------------------------------------------------------------------------
# Data: load text, tokenize once into a token store on disk, cut blocks from its memory map at batch time.
# ----------------------------------------------------------------------------------------------------------------------


def load_tokenizer(tokenizer: str) -> "transformers.PreTrainedTokenizerBase":
    """Load a pretrained tokenizer from a Hub name ("roberta-base") or a local folder, checking it can do MLM."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"could not load --tokenizer {tokenizer!r}: {first_line[:300]}. {offline_hint()}") from error
    check_tokenizer(loaded, tokenizer)
    return loaded


class PackedBlocks:
    """Blocks of `max_seq_length` tokens cut from a flat token array when asked for: `<s>`, the next
    `max_seq_length - 2` tokens of the split, `</s>`.

    Concatenating the whole split (not each `map` batch, as HF's `group_texts` does) loses only the final partial
    block, fewer than `max_seq_length - 2` tokens, and no block needs padding, so every token trains. Nothing is
    materialised: `blocks[rows]` reads just those rows from the store file (or the array) and returns an int32
    tensor [len(rows), max_seq_length], so any --max_seq_length reuses the same store. `rows` selects a subset.
    """

    def __init__(self, tokens: np.ndarray, start_id: int, end_id: int, max_seq_length: int,
                 rows: np.ndarray | None = None):
        self.tokens, self.start_id, self.end_id, self.max_seq_length = tokens, start_id, end_id, max_seq_length
        self.body_length = max_seq_length - 2
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.tokens) // self.body_length

    def __getitem__(self, index: slice | Any) -> torch.Tensor:
        blocks = np.arange(*index.indices(len(self))) if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        if self.rows is not None:
            blocks = self.rows[blocks]
        if isinstance(self.tokens, np.memmap):
            body = np.stack([self.read_file(block * self.body_length, self.body_length) for block in blocks.tolist()])
        else:
            body = self.tokens[blocks[:, None] * self.body_length + np.arange(self.body_length)]
        body = torch.from_numpy(body.astype(np.int32).reshape(len(blocks), self.body_length))
        column = lambda token_id: torch.full((len(blocks), 1), token_id, dtype=torch.int32)  # noqa: E731
        return torch.cat([column(self.start_id), body, column(self.end_id)], dim=1)

    def read_file(self, start: int, count: int) -> np.ndarray:
        """Tokens start..start+count of a store file, read with pread rather than through the memory map: a page
        fault maps a whole readahead window (megabytes on many systems) into the process, so RSS would grow with
        every block touched; pread copies just the block out of the page cache (still one copy per machine)."""
        if getattr(self, "file", None) is None:
            self.file = os.open(self.tokens.filename, os.O_RDONLY)
        itemsize = self.tokens.dtype.itemsize
        data = os.pread(self.file, count * itemsize, self.tokens.offset + start * itemsize)
        return np.frombuffer(data, dtype=self.tokens.dtype)

    def select(self, rows: np.ndarray) -> "PackedBlocks":
        """The blocks `rows` (indices into this one) as a new PackedBlocks."""
        return PackedBlocks(self.tokens, self.start_id, self.end_id, self.max_seq_length,
                            rows if self.rows is None else self.rows[rows])

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for a DataLoader worker) as the file's name, not its contents."""
        state = {**self.__dict__, "file": None}  # a worker opens the file itself
        if isinstance(self.tokens, np.memmap):
            state["tokens"] = str(self.tokens.filename)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self.tokens, str):
            self.tokens = np.load(self.tokens, mmap_mode="r")


def pack_blocks(tokens: np.ndarray, tokenizer: "transformers.PreTrainedTokenizerBase", max_seq_length: int,
                split_name: str = "the split") -> PackedBlocks:
    """The split's flat token array as full blocks `<s> ... </s>` of `max_seq_length` tokens (see PackedBlocks)."""
    start_id, end_id = block_framing_ids(tokenizer)
    blocks = PackedBlocks(tokens, start_id, end_id, max_seq_length)
    if len(blocks) == 0:
        raise ConfigError(
            f"{split_name} yields {len(tokens)} tokens, fewer than one block of --max_seq_length {max_seq_length} "
            f"needs ({max_seq_length - 2} plus <s> and </s>); use more text or a smaller --max_seq_length"
        )
    return blocks


def eval_subset(blocks: PackedBlocks, eval_blocks: int, seed: int) -> PackedBlocks:
    """`eval_blocks` blocks drawn once, by `seed`, from the split (all of it when it has no more), in file order."""
    if eval_blocks == 0 or eval_blocks >= len(blocks):
        return blocks
    rows = torch.randperm(len(blocks), generator=seeded_generator(seed, 0xE7A1B))[:eval_blocks]
    return blocks.select(np.sort(rows.numpy()))


# Streaming: a corpus too big to download first is read, tokenized and packed on the fly.


# ----------------------------------------------------------------------------------------------------------------------
# Masking: BERT's 80/10/10 rule, vectorised, reproducible from a generator.
# ----------------------------------------------------------------------------------------------------------------------


def masking_function(
    input_ids: torch.Tensor,
    tokenizer: "transformers.PreTrainedTokenizerBase",
    mask_prob: float = 0.15,
    random_replace_prob: float = 0.1,
    unmask_replace_prob: float = 0.1,
    generator: torch.Generator | None = None,
    word_starts: torch.Tensor | None = None,
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
    random_ids = non_special_ids[
        torch.randint(len(non_special_ids), input_ids.shape, generator=generator, device=input_ids.device)
    ]

    if word_starts is not None:  # every piece of a word takes the selection draw of the word's first piece
        selection_draw = selection_draw.gather(1, word_start_positions(input_ids, is_special, word_starts))
    selected = (selection_draw < mask_prob) & ~is_special
    replace_randomly = selected & (replacement_draw < random_replace_prob)
    keep_unchanged = selected & (replacement_draw >= random_replace_prob) & (
        replacement_draw < random_replace_prob + unmask_replace_prob
    )
    replace_with_mask = selected & ~replace_randomly & ~keep_unchanged

    masked_input_ids = torch.where(replace_randomly, random_ids.to(input_ids.dtype), input_ids)
    masked_input_ids = masked_input_ids.masked_fill(replace_with_mask, tokenizer.mask_token_id)
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
    return masked_input_ids, labels


def word_start_positions(input_ids: torch.Tensor, is_special: torch.Tensor, word_starts: torch.Tensor
                         ) -> torch.Tensor:
    """For every position of `input_ids` [B, T], the position of the first piece of its word (same shape)."""
    starts = word_starts.to(input_ids.device)[input_ids.long()] | is_special
    starts[:, 0] = True
    starts[:, 1:] |= is_special[:, :-1]  # the token after <s> or </s> begins a word
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return torch.where(starts, positions, 0).cummax(dim=1).values


def word_start_table(tokenizer: "transformers.PreTrainedTokenizerBase") -> torch.Tensor:
    """A bool tensor over the vocabulary: True where the token id begins a word. Computed once per tokenizer.

    WordPiece (BERT) marks the pieces that continue a word with "##"; byte-level BPE (RoBERTa, GPT-2) marks the
    pieces that begin one with "Ġ" (an encoded space), SentencePiece with "▁". Special tokens count as word starts.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    continues = [piece.startswith("##") for piece in pieces]
    begins = [piece.startswith(("Ġ", "▁")) for piece in pieces]
    # A BPE vocabulary may hold a few pieces that happen to start with "##" (and a WordPiece one no "Ġ"): the
    # marker that most of the vocabulary carries tells the scheme.
    if sum(continues) > sum(begins):
        starts = [not piece_continues for piece_continues in continues]
    elif any(begins):
        starts = begins
    else:
        raise ConfigError("--whole_word_mask needs a tokenizer that marks word boundaries (WordPiece '##' pieces, "
                          "byte-level BPE 'Ġ' or SentencePiece '▁'); this tokenizer has none")
    table = torch.tensor(starts, dtype=torch.bool)
    table[sorted(set(tokenizer.all_special_ids))] = True
    return table


def seeded_generator(*numbers: int) -> torch.Generator:
    """A torch.Generator seeded from a tuple of integers (e.g. seed, epoch, batch index) without collisions."""
    seed = int(np.random.SeedSequence(list(numbers)).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


PREDICTION_BUCKET = 64  # the number of predicted positions per batch is padded to a multiple of this


def sparse_batch(masked_input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Turn (inputs, labels) into what the sparse MLM loss needs: inputs, flat masked positions, their labels.

    Computing the positions here, on the data side, keeps the training step free of a device->host sync that
    `hidden[labels != -100]` would force. Their number varies from batch to batch; it is padded up to a multiple of
    PREDICTION_BUCKET (position 0, label -100: the loss ignores them), so the head's tensors take only a few
    distinct shapes. With a new shape every step, glibc's allocator on CPU fragmented its heap and the process grew
    by ~1.5 GiB over 120 steps (benchmarks/README.md, "Memory over a long run"); on GPU, fixed shapes let compiled
    kernels and CUDA graphs be reused.
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
        self.word_starts = word_start_table(self.tokenizer) if self.whole_word_mask else None

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


def train_batches(blocks: "PackedBlocks | torch.Tensor | BlockStream", batch_size: int, seed: int,
                  masking: MaskingConfig, start: tuple, num_workers: int, pin_memory: bool, rank: int = 0,
                  world_size: int = 1) -> Iterator[tuple[tuple, dict[str, torch.Tensor]]]:
    """Yield `(next_position, batch)` forever, starting at `start` = (epoch, batch index).

    `next_position` is where the data continues after this batch: what a checkpoint stores. A BlockStream has
    positions of its own (see `streamed_train_batches`).
    """
    if isinstance(blocks, BlockStream):
        yield from streamed_train_batches(blocks, batch_size, seed, masking, start, rank, world_size)
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
            worker_init_fn=ignore_stop_signals_in_worker if num_workers else None,
            generator=torch.Generator(),  # otherwise creating the iterator draws from (and shifts) the global RNG
        )
        for batch_index, batch in enumerate(loader, start=index):
            yield (epoch, batch_index + 1), batch
        epoch, index = epoch + 1, 0


def streamed_train_batches(stream: BlockStream, batch_size: int, seed: int, masking: MaskingConfig, start: tuple,
                           rank: int = 0, world_size: int = 1) -> Iterator[tuple[tuple, dict[str, torch.Tensor]]]:
    """Yield `(next_position, batch)` forever from a stream; a position is (batch index, *stream position).

    Every rank reads the same stream and takes its own `batch_size` of each `batch_size x world_size` consecutive
    blocks (global batch index x world_size + rank, as in TrainBatches): the ranks see disjoint blocks, and after each
    step they stand at the same position, so one position resumes them all. Masks are seeded by (seed, global batch
    index). `start` (0, 0) is a new run: the stream's first position.
    """
    index, *position = (0, *stream.first_position) if tuple(start) == (0, 0) else start
    blocks = stream.blocks(tuple(position))
    while True:
        step_blocks = [next(blocks) for _ in range(batch_size * world_size)]
        rows = torch.stack([block for block, _ in step_blocks[rank * batch_size : (rank + 1) * batch_size]])
        global_index = index * world_size + rank
        index += 1
        yield (index, *step_blocks[-1][1]), masking(rows, seeded_generator(seed, 0x57EA, global_index))


class EvalBatches:
    """The split's blocks in order, in batches, each masked with a generator fixed by (`seed`, its index): the same
    masks at every evaluation, batch by batch on demand (a whole test split is never held in memory).

    Fixed masks make evaluation numbers comparable across steps and across runs with the same seed. Slicing gives
    the batches of a shard (`batches[rank::world_size]`) with the same masks.
    """

    def __init__(self, blocks: "PackedBlocks | torch.Tensor", batch_size: int, seed: int, masking: MaskingConfig,
                 indices: range | None = None):
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


def eval_batches(blocks: "PackedBlocks | torch.Tensor", batch_size: int, seed: int, masking: MaskingConfig
                 ) -> EvalBatches:
    """The whole of `blocks` in order, masked the same way at every evaluation (see EvalBatches)."""
    return EvalBatches(blocks, batch_size, seed, masking)


# ----------------------------------------------------------------------------------------------------------------------
# Model: a Hugging Face BERT-style masked LM (RoFormer or RoBERTa), sized by the flags, with a sparse MLM loss.
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
      to the token's. The model has to discover from data that neighbours matter: a small model spends its first
      ~5,500 steps (an hour on a CPU) on a plateau where it predicts from word frequencies and the bag of words
      around the mask (benchmarks/README.md). Released RoBERTa checkpoints use it, and its attention runs through
      PyTorch's scaled_dot_product_attention (flash kernels), which transformers' RoFormer does not offer.

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
        freeze_sinusoid_positions(model)
        use_fused_rotary_attention(model)
        return model
    start_id, end_id = block_framing_ids(tokenizer)
    sizes = dict(vocab_size=len(tokenizer), hidden_size=h_dim, num_hidden_layers=num_layers,
                 num_attention_heads=num_heads, intermediate_size=ff_dim, hidden_dropout_prob=dropout,
                 attention_probs_dropout_prob=dropout, type_vocab_size=1, layer_norm_eps=1e-5,
                 pad_token_id=tokenizer.pad_token_id, bos_token_id=start_id, eos_token_id=end_id)
    if positions == "rotary":
        model = RoFormerForMaskedLM._from_config(RoFormerConfig(max_position_embeddings=max_seq_length, **sizes))
        use_fused_rotary_attention(model)
    else:
        config = RobertaConfig(max_position_embeddings=max_seq_length + tokenizer.pad_token_id + 1, **sizes)
        model = RobertaForMaskedLM._from_config(config, attn_implementation="sdpa")
    if output_bias is not None:
        with torch.no_grad():
            model.get_output_embeddings().bias.copy_(output_bias)  # tied to the head's own bias
    return model


def rotary_sdpa_attention(self: torch.nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          sinusoidal_pos: torch.Tensor | None = None, **_: Any) -> tuple[torch.Tensor, None]:
    """RoFormer's self-attention with the same weights and rotations, computed by `scaled_dot_product_attention`.

    transformers' RoFormer writes attention out (QKᵀ, softmax, dropout, ·V: the [tokens x tokens] matrices of every
    head go through memory three times, forward and backward). Rotating q and k first and handing them to PyTorch's
    fused kernel (flash attention on GPUs, a fused kernel on CPUs) computes the same function in one pass.
    """
    batch_shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    query, key, value = (projection(hidden_states).view(batch_shape).transpose(1, 2)
                         for projection in (self.query, self.key, self.value))
    if self.rotary_value:
        query, key, value = self.apply_rotary_position_embeddings(sinusoidal_pos, query, key, value)
    else:
        query, key = self.apply_rotary_position_embeddings(sinusoidal_pos, query, key)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             dropout_p=self.dropout.p if self.training else 0.0)
    return context.transpose(1, 2).flatten(2), None


def use_fused_rotary_attention(model: "transformers.PreTrainedModel") -> None:
    """Make every RoFormer self-attention layer of `model` run `rotary_sdpa_attention` (parameters, their names and
    the saved checkpoints stay RoFormer's own, so `from_pretrained` loads them into the stock class)."""
    from transformers.models.roformer.modeling_roformer import RoFormerSelfAttention

    for module in model.modules():
        if isinstance(module, RoFormerSelfAttention):
            module.forward = rotary_sdpa_attention.__get__(module)


def freeze_sinusoid_positions(model: "transformers.PreTrainedModel") -> None:
    """Keep RoFormer's sinusoid position table fixed: `from_pretrained` makes it trainable (a no-op for others)."""
    if model.config.model_type == "roformer":
        model.base_model.encoder.embed_positions.requires_grad_(False)


def mlm_head(model: "transformers.PreTrainedModel") -> torch.nn.Module:
    """The model's own MLM head (hidden states to vocabulary logits): `lm_head` in RoBERTa, `cls` in BERT-family
    models such as RoFormer."""
    return model.lm_head if hasattr(model, "lm_head") else model.cls


def unigram_output_bias(token_ids: np.ndarray, vocab_size: int) -> torch.Tensor:
    """The log frequency of every token in `token_ids` (add-one smoothed): the output layer's initial bias.

    With random weights the logits are near 0, so the model starts out predicting every token alike (loss ln 50265
    = 10.8 nats) and spends its first hundreds of steps learning how common each token is. Starting the bias at the
    corpus's log frequencies makes step 0 predict the unigram distribution (7.1 nats on wikitext-2) and the
    steps go to context instead: 0.26 nats lower after 3 minutes on a CPU (benchmarks/README.md). The usual advice
    for any classifier's last layer ("init well": start from the label distribution).
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


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
             autocast: Callable[[], contextlib.AbstractContextManager],
             loss_function: Callable[..., torch.Tensor] = mlm_loss, description: str = "evaluating") -> torch.Tensor:
    """Return a tensor [sum of token losses, number of predicted tokens] over `batches` (fixed masks).

    A sum and a count rather than a mean, so results from several ranks or splits combine exactly.
    `loss_function(model, **batch, reduction="sum")` computes the loss (the DeepSpeed script passes its engine's).
    Never silent: a progress bar on a terminal, and a log line with the batch count and the expected duration
    (timed on the first batch) for log files.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    start = time.perf_counter()
    for index, batch in enumerate(tqdm(batches, desc=description, unit="batch", leave=False, disable=None)):
        batch = to_device(batch, device)
        with autocast():
            loss_sum = loss_function(model, **batch, reduction="sum")
        totals += torch.stack([loss_sum.double(), (batch["masked_labels"] != IGNORE_INDEX).sum().double()])
        if index == 0 and len(batches) > 1:
            float(totals[1])  # wait for the first batch (one sync per evaluation) to time it
            expected = datetime.timedelta(seconds=round((time.perf_counter() - start) * len(batches)))
            logger.info(f"{description}: {len(batches):,} batches, about {expected}")
    model.train(was_training)
    return totals


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a batch to `device`; non-blocking, so a pinned-memory copy overlaps with compute on GPU."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


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
                        budget: "TimeBudget | None" = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to `lr`, then linear decay to 0 at the end of the run.

    `warmup_steps` below 1 is a share of the run (0.06: its first 6%), so every run length gets a warmup in
    proportion; a whole number >= 1 is a count of steps. The run ends after `num_iterations` steps, or, with a
    `budget`, when its wall-clock time is spent: the schedule then follows the share of the budget spent, as
    Cramming and academic-budget-bert do, so the learning rate reaches 0 when the budget ends however fast the
    steps are (a fixed step count would have to be guessed from a speed that changes with the machine's load).
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

    Loading the optimizer and scheduler states restores the saved peak lr, so without this a resume with a lower
    --lr (the cure for a NaN) would silently keep the old one. The schedule itself (--warmup_steps,
    --num_iterations) comes from the new scheduler. With unchanged flags this recomputes exactly the saved values.
    """
    lr_scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, lr_lambda in zip(optimizer.param_groups, lr_scheduler.lr_lambdas):
        group["lr"] = lr * lr_lambda(lr_scheduler.last_epoch)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpointing: one dict holds the whole run's state; files are written atomically.
# ----------------------------------------------------------------------------------------------------------------------

def checkpoint_path(experiment_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives; zero-padded so names sort by step."""
    return experiment_dir / f"checkpoint-{step:08d}.pt"


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
    try:
        atomic_write(path, lambda file: torch.save(state, file))
        atomic_write(experiment_dir / LATEST_POINTER, lambda file: file.write(path.name + "\n"), mode="w")
    except (OSError, RuntimeError) as error:
        # torch.save's zip writer turns a failed write (e.g. ENOSPC) into a RuntimeError while closing the archive.
        cause = error if isinstance(error, OSError) else error.__context__
        if not isinstance(cause, OSError):
            raise
        raise CheckpointError(
            f"could not save checkpoint {path.name} ({cause.strerror or cause}); the previous checkpoint is intact. "
            "Free disk space, then resume with --load_checkpoint_dir"
        ) from error
    older = sorted(other for other in experiment_dir.glob(CHECKPOINT_PATTERN) if other.name < path.name)
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        old.unlink()
    for leftover in experiment_dir.glob(f".{CHECKPOINT_PATTERN}.*.tmp"):  # from a save that was killed midway
        leftover.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(experiment_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the newest intact checkpoint of `experiment_dir`.

    Starts from the one `latest` points to (or the highest step if the pointer is missing); a truncated or corrupt
    file is skipped with a warning naming it, falling back to the next newest. `weights_only=True` means loading
    never runs pickled code; `map_location` lets a GPU checkpoint resume on CPU.
    """
    candidates = sorted(experiment_dir.glob(CHECKPOINT_PATTERN), reverse=True)
    pointer = experiment_dir / LATEST_POINTER
    if pointer.is_file():
        pointed = experiment_dir / pointer.read_text().strip()
        if pointed in candidates:
            candidates.remove(pointed)
            candidates.insert(0, pointed)
    if not candidates:
        raise ConfigError(f"--load_checkpoint_dir {str(experiment_dir)!r} holds no checkpoint ({CHECKPOINT_PATTERN})")
    for path in candidates:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:  # truncated zip, bad pickle, wrong format...
            logger.warning(f"checkpoint {path} is unreadable ({type(error).__name__}: {str(error)[:200]}); "
                           "trying an older one")
    raise CheckpointError(f"no intact checkpoint in {experiment_dir}: all of {[p.name for p in candidates]} are unreadable")


# ----------------------------------------------------------------------------------------------------------------------
# Experiment directory: everything needed to understand and reproduce a run.
# ----------------------------------------------------------------------------------------------------------------------


def new_experiment_dir(checkpoint_dir: str) -> Path:
    """Create `{checkpoint_dir}/bert_pretrain.YYYY.MM.DD.HH.MM.SS.{uuid4}`.

    The uuid comes from `uuid.uuid4` (the OS's entropy), never from the seeded RNGs: two runs with the same seed
    started in the same second still get different directories.
    """
    name = f"bert_pretrain.{datetime.datetime.now():%Y.%m.%d.%H.%M.%S}.{uuid.uuid4()}"
    path = Path(checkpoint_dir) / name
    path.mkdir(parents=True)
    return path


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
# Flags: validation (before anything is created) and resume.
# ----------------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------------
# Bookkeeping: one writer per experiment, commands that work as printed, finished runs, memory and length limits.
# ----------------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------------
# Hardening: a token store is checked before it is used, and rebuilt (or named) when damaged; a stop while
# tokenizing is reported once, by the main process.
# ----------------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PreparedData:
    """Everything that comes from the dataset and the tokenizer, ready for the loop."""

    tokenizer: Any
    train_blocks: PackedBlocks | BlockStream
    validation_blocks: PackedBlocks | torch.Tensor  # the --eval_blocks subset that periodic evaluations use
    test_blocks: PackedBlocks | torch.Tensor | None
    masking: MaskingConfig

    def token_sample(self, max_tokens: int = 2**20) -> np.ndarray:
        """The first `max_tokens` tokens (about) of the train split: enough to count how common each token is."""
        if isinstance(self.train_blocks, BlockStream):
            blocks = -(-max_tokens // self.train_blocks.max_seq_length)
            return self.train_blocks.take(blocks, self.train_blocks.first_position)[0].flatten().numpy()
        return np.asarray(self.train_blocks.tokens[:max_tokens])

    @property
    def num_train_blocks(self) -> int | None:
        """Blocks per epoch (None for a stream, whose length is unknown)."""
        return None if isinstance(self.train_blocks, BlockStream) else len(self.train_blocks)


def prepare_data(flags: dict[str, Any], saved_tokenizer_dir: Path | None = None) -> PreparedData:
    """Load the dataset and the tokenizer (or train one); map each split's token store (built on first use).

    On a resume the tokenizer comes from the experiment directory, so it is exactly the one the run trained with.
    """
    raw = load_text_dataset(flags["dataset"], flags["dataset_config"], flags["streaming"]) if (
        flags["streaming"] or (flags["tokenizer"] == "bpe" and saved_tokenizer_dir is None)) else None
    if saved_tokenizer_dir is not None:
        tokenizer = load_tokenizer(str(saved_tokenizer_dir))
    elif flags["tokenizer"] == "bpe":
        logger.info(f"training a byte-level BPE tokenizer ({flags['bpe_vocab_size']} tokens) on the train split")
        tokenizer = train_bpe_tokenizer(raw["train"], flags["bpe_vocab_size"])
    else:
        tokenizer = load_tokenizer(flags["tokenizer"])
    limit = tokenizer.model_max_length
    if limit < 1_000_000 and flags["max_seq_length"] > limit:
        raise ConfigError(f"--max_seq_length {flags['max_seq_length']} is larger than the {limit} tokens that "
                          f"tokenizer {flags['tokenizer']!r} is made for")
    masking = MaskingConfig(tokenizer, flags["mask_prob"], flags["random_replace_prob"], flags["unmask_replace_prob"],
                            flags.get("whole_word_mask", False))
    if flags["streaming"]:
        return prepare_streamed_data(raw, tokenizer, flags, masking)
    tokens, meta = open_token_store(flags["dataset"], flags["dataset_config"], tokenizer, flags["data_cache"],
                                    flags["num_proc"] or os.cpu_count() or 1, raw)
    rows = {split: info["rows"] for split, info in meta["splits"].items()}
    blocks = {split: pack_blocks(tokens[split], tokenizer, flags["max_seq_length"],
                                 describe_split(flags["dataset"], rows, split)) for split in tokens}
    if len(blocks["train"]) < flags["batch_size"]:  # checked here, before the experiment directory is created
        raise ConfigError(f"{describe_split(flags['dataset'], rows, 'train')} has {len(blocks['train'])} blocks of "
                          f"--max_seq_length {flags['max_seq_length']} tokens, fewer than one batch (--batch_size "
                          f"{flags['batch_size']}); use more text or a smaller --batch_size")
    validation = eval_subset(blocks["validation"], flags["eval_blocks"], flags["seed"])
    return PreparedData(tokenizer, blocks["train"], validation, blocks.get("test"), masking)


def make_autocast(device: torch.device, dtype: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for `dtype` (a no-op context for fp32)."""
    if dtype == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def train(
    checkpoint_dir: str | None = None,
    load_checkpoint_dir: str | None = None,
    dataset: str = "wikitext",
    dataset_config: str | None = "wikitext-2-v1",
    tokenizer: str = "roberta-base",
    bpe_vocab_size: int = 16384,
    mask_prob: float = 0.15,
    random_replace_prob: float = 0.1,
    unmask_replace_prob: float = 0.1,
    whole_word_mask: bool = False,
    max_seq_length: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    ff_dim: int = 512,
    h_dim: int = 128,
    positions: str = "rotary",
    dropout: float = 0.0,
    batch_size: int = 16,
    grad_accum_steps: int = 1,
    num_iterations: int = 10000,
    time_budget: str | None = None,
    auto_size: bool = True,
    init_from: str | None = None,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    warmup_steps: float = 0.06,
    grad_clip: float = 1.0,
    dtype: str = "auto",
    compile: bool = True,
    seed: int = 42,
    log_every: int = 10,
    eval_every: int = 500,
    checkpoint_every: int = 1000,
    keep_last: int = 3,
    num_workers: int = 0,
    device: str = "auto",
    local_rank: int = -1,
    num_proc: int | None = None,
    data_cache: str | None = None,
    eval_blocks: int = 2048,
    streaming: bool = False,
) -> str:
    """Pretrain a RoBERTa encoder with masked language modelling; return the experiment directory.

    Start:  python train_bert.py --checkpoint_dir ./experiments [flags]
    Resume: python train_bert.py --load_checkpoint_dir ./experiments/bert_pretrain.YYYY... [--num_iterations N]

    Args:
        checkpoint_dir: Start a new experiment in a new folder `bert_pretrain.<time>.<uuid>` inside this directory.
        load_checkpoint_dir: Resume the experiment in this folder from its newest intact checkpoint. Flags left at
            their defaults take the experiment's saved values; model/data-shape flags may not change.
        dataset: A Hugging Face Hub dataset name, a local datasets folder (../shared/data/wikitext), a folder with
            train.txt / validation.txt [/ test.txt], or one .txt file (its last 5% of lines validate).
        dataset_config: The dataset's configuration name (wikitext: "wikitext-2-v1"; ignored for .txt files).
        tokenizer: A Hub name ("roberta-base"), a local tokenizer folder (../shared/data/roberta-base), or "bpe" to
            train a byte-level BPE tokenizer on the train split (saved in the experiment directory).
        bpe_vocab_size: Vocabulary size of the tokenizer trained with --tokenizer bpe.
        mask_prob: Probability that a non-special token is selected for prediction (BERT: 0.15).
        random_replace_prob: Of the selected tokens, the share replaced by a random non-special token (BERT: 0.1).
        unmask_replace_prob: Of the selected tokens, the share left unchanged (BERT: 0.1); the rest become <mask>.
        whole_word_mask: Select whole words instead of single tokens: all pieces of a word are masked together
            (BERT's whole-word masking; the word starts come from the tokenizer's "Ġ"/"▁" or "##" markers).
        max_seq_length: Tokens per packed block, <s> and </s> included. 128, as in BERT's phase 1: attention cost grows
            with length, and short blocks let a model see more blocks per second early in training; raise it (e.g.
            512) for the last part of a long run, as BERT does, when the model must learn long contexts.
        num_layers: Transformer layers. The model defaults (2 layers, h_dim 128, 2 heads, ff 512) are a small
            model on purpose. In a short run on a CPU (minutes), what limits quality is how many tokens the model
            sees, and with roberta-base's 50k vocabulary most of a step is the embedding and output layer, so a
            narrow, shallow model sees several times the tokens of upstream's 6 x 256 and leaves the unigram
            plateau first (benchmarks/README.md, time to quality). They are sound for long runs too (they train
            stably at any length) but not the best use of a GPU for hours; there, size the model up, e.g. BERT-base
            (--num_layers 12 --h_dim 768 --num_heads 12 --ff_dim 3072) with --lr 5e-4 and a larger --batch_size.
        num_heads: Attention heads per layer; must divide h_dim (2 heads of 64 dimensions by default).
        ff_dim: Width of each layer's feed-forward block (4 x h_dim is the usual ratio).
        h_dim: Hidden size (also the embedding size: the tied 50k x h_dim embedding is most of a small model).
        positions: How attention knows where tokens are, "rotary" (RoFormer, BERT with rotary position
            embeddings) or "learned" (RoBERTa's learned absolute position embeddings). Rotary by default, because
            with learned positions a small model spends its first hour on a CPU (~5,500 steps) before it uses word
            order, and with rotary ones only minutes (after 10 minutes on a CPU the validation loss is 4.86 against
            6.25; benchmarks/README.md). "learned" is what released RoBERTa checkpoints use, and its attention has
            PyTorch's flash kernels.
        dropout: Dropout on hidden states and attention probabilities. 0 by default, as in Cramming and
            academic-budget-bert; a run that sees each token a few times (about two epochs of wikitext-2 in 10
            minutes on a CPU; once in a GPU run on a large corpus) has little to overfit, and dropout slows learning and
            costs time (its random masks; with 0, learned-position attention also takes the fused flash kernel).
            For many epochs of a small corpus (hours of GPU time on wikitext-2) use --dropout 0.1.
        batch_size: Blocks per micro-batch (tokens per micro-batch = batch_size x max_seq_length). 16 by default:
            early in training more, smaller steps learn more per second than fewer large ones (in 3-minute CPU
            runs batch 16 beat batch 32; benchmarks/README.md). On a GPU raise it (and --lr with it) until the
            device is busy.
        grad_accum_steps: Micro-batches summed into each optimizer step (effective batch = batch_size x this).
        num_iterations: Optimizer steps to train in total (exactly this many; a resume continues up to it).
        time_budget: Train for this much wall-clock time instead of a number of steps: seconds (600) or with units
            ("10m", "2h30m", "1d"). The clock starts at the first step; evaluations, checkpoints and the final
            export are inside the budget (training stops early enough for them), and the learning rate schedule
            follows the share of the budget spent, reaching 0 when it ends. A resume continues the budget from
            the time saved in the checkpoint; budgeted runs are not bit-reproducible (steps depend on speed).
        auto_size: With --time_budget, choose the model shape, batch size and lr for the budget from the speed
            measured on this device at start-up (the largest shape, up to BERT-base, that sees ~20 tokens per
            parameter, the compute-optimal balance; batch 128 on a GPU). Flags you give are kept; with False every
            flag is used as given.
        init_from: Continue pretraining a Hugging Face masked-LM checkpoint (a folder such as an hf_model/ this
            script exported, or a Hub name such as roberta-base), with its weights, config and tokenizer. Model flags
            must agree with it or be left out.
        lr: Peak learning rate of AdamW (betas 0.9/0.98, eps 1e-6, as RoBERTa). 2e-3 suits the small default model
            (small models tolerate a high one; 3e-3 was no better in a 3-minute CPU run); use ~5e-4 to 1e-3 for
            BERT-base-sized models.
        weight_decay: AdamW weight decay, applied to weight matrices only (not biases or LayerNorm).
        warmup_steps: Linear warmup from 0 to lr, as a share of the run below 1 (0.06: the first 6% of the steps or
            of the time budget) or as a number of steps; afterwards lr decays linearly to 0 at the end of the run.
            A share, so every run length gets a warmup in proportion (6% is about RoBERTa's); a fixed step count
            would be all of a short run and nothing of a long one.
        grad_clip: Clip the global gradient norm to this (0 disables clipping).
        dtype: auto, fp32, bf16 (autocast) or fp16 (autocast with a dynamic loss scaler); master weights and the
            loss stay fp32 in every case. auto (the default) is bf16 where the device computes it natively (Ampere
            or newer GPUs; CPUs with AMX or AVX-512 BF16), else fp32. bf16 trains more tokens per second at no cost
            in stability (1.2x fp32 on a 2-core Xeon with AMX, 1.3x on a 2-core EPYC; benchmarks/README.md), and
            emulated bf16 would be slower. The experiment records the precision chosen.
        compile: Compile the training loss (encoder, sparse head and cross-entropy) with torch.compile. On by
            default, as in nanoGPT; fusing the head's cross-entropy over the 50k-token vocabulary and the encoder's
            elementwise work made a step 1.67x faster in bf16 on a 2-core Xeon (benchmarks/README.md). The first
            steps take longer while it compiles (about 30 s on a small CPU; later runs reuse the compiled code).
            Falls back to eager, with a warning, where it cannot compile; --compile False for tiny models, where
            compiling takes longer than training.
        seed: Seeds the data order, the masks, the initial weights and dropout.
        log_every: Steps between log lines (loss averaged over the window, lr, grad norm, tokens/s, MFU, memory).
        eval_every: Steps between evaluations on the --eval_blocks validation blocks (also at the end, then with the
            test split).
        checkpoint_every: Steps between checkpoints (also at the end and when stopped by SIGTERM/Ctrl-C).
        keep_last: Checkpoints kept; older ones are deleted once a newer one is safely written.
        num_workers: DataLoader worker processes that mask batches ahead of the step (0: in the main process).
        device: auto (the GPU where CUDA is available, else the CPU), cpu, cuda or cuda:N. The log's first lines
            say which device was chosen and why.
        local_rank: The GPU of this process on its machine, as launchers pass it (-1: not given; $LOCAL_RANK or 0).
        num_proc: Processes that tokenize the corpus into the token store (default: all the machine's cores; at
            most one per 10,000 lines). Only the first run on a corpus and tokenizer tokenizes; later runs and
            resumes, at any --max_seq_length, reuse the store.
        data_cache: Folder of the token stores (default: token_stores/ in the datasets cache, $HF_DATASETS_CACHE or
            ~/.cache/huggingface/datasets). A store is one flat uint16 (uint32 for vocabularies over 65,536) token
            array per split, memory-mapped, keyed by the corpus and the tokenizer; delete it to reclaim the space.
        eval_blocks: Validation blocks of each periodic evaluation: a fixed subset drawn by --seed (0 or more than
            the split holds means the whole split). 2048 blocks of 128 tokens hold ~40k predicted tokens, enough for
            a loss to ~0.01 nats, and cost a forward pass each, about what 2048 / 3 training blocks cost (a step is
            forward + backward). WikiText-2's validation split (1,958 blocks of 128) is evaluated whole. The test
            evaluation at the end uses the whole test split (a fixed subset where a short --time_budget needs it).
        streaming: Read the corpus as a stream instead of preparing a token store: for corpora too big to download
            first (a Hub dataset such as allenai/c4 or HuggingFaceFW/fineweb, or local .txt files). Lines are
            tokenized and packed on the fly, in file order (no shuffling), every rank reading the stream and
            training on its own blocks; the stream position is checkpointed, so a resume continues exactly where
            it stopped. Validation uses the first --eval_blocks blocks of the validation split, or, without one, of
            the train split (then held out from training). Batches are made in the main process (--num_workers
            does not apply).
    """
    flags = {name: value for name, value in locals().items()}
    validate_flags(flags)
    defaults = {name: parameter.default for name, parameter in inspect.signature(train).parameters.items()}
    if time_budget is not None and num_iterations != defaults["num_iterations"]:
        raise ConfigError(f"give either --num_iterations ({num_iterations} steps) or --time_budget ({time_budget!r}), "
                          "not both: a budgeted run trains until its time is spent")
    if init_from is not None and load_checkpoint_dir is None:
        flags = resolve_init_from(flags, defaults)
    if load_checkpoint_dir is None:
        check_writable(checkpoint_dir)
        check_sequence_limits(flags)
        device = resolve_device(flags["device"], flags["local_rank"], flags["dtype"])
        flags["dtype"] = resolve_dtype(flags["dtype"], device)
        check_memory(flags, device)
        given = {name for name in AUTO_SIZED_FLAGS if flags[name] != defaults[name]}
        auto_size = flags["auto_size"] and time_budget is not None and init_from is None and not (
            {"num_layers", "h_dim", "num_heads", "ff_dim"} <= given)
        return str(run_training(flags, device, None, given if auto_size else None))
    experiment_dir = Path(load_checkpoint_dir)
    load_hparams(experiment_dir)
    if not any(experiment_dir.glob(CHECKPOINT_PATTERN)):
        raise ConfigError(f"--load_checkpoint_dir {load_checkpoint_dir!r} holds no checkpoint ({CHECKPOINT_PATTERN})")
    check_writable(load_checkpoint_dir, "--load_checkpoint_dir")  # the resumed run saves its checkpoints there
    check_resumable(experiment_dir)
    with experiment_lock(experiment_dir):
        hparams = load_hparams(experiment_dir)  # read under the lock: the last run may have updated it
        flags = resolve_resume_flags(flags, hparams["flags"], defaults)
        validate_flags(flags)
        device = resolve_device(flags["device"], flags["local_rank"], flags["dtype"])
        if not check_resume_target(flags, saved_step(experiment_dir), experiment_dir, hparams.get(COMPLETED_KEY)):
            return str(experiment_dir)
        check_memory(flags, device)
        return str(run_training(flags, device, experiment_dir / "tokenizer"))


def create_experiment(flags: dict[str, Any], data: PreparedData, model: torch.nn.Module, **extra: Any) -> Path:
    """Create the experiment directory and write what reproduces the run: tokenizer, hparams.json, git state.

    Called only once all inputs have loaded, so a bad dataset or tokenizer leaves no directory behind.
    """
    experiment_dir = new_experiment_dir(flags["checkpoint_dir"])
    hparams = {"flags": flags, "vocab_size": len(data.tokenizer), "num_parameters": count_parameters(model),
               "train_blocks": data.num_train_blocks, "validation_blocks": len(data.validation_blocks),
               "versions": library_versions(), **extra}
    try:
        data.tokenizer.save_pretrained(experiment_dir / "tokenizer")
        atomic_write(experiment_dir / "hparams.json", lambda f: json.dump(hparams, f, indent=2), mode="w")
        record_code_version(experiment_dir)
    except OSError as error:  # e.g. the disk filled up: leave no half-made experiment behind
        shutil.rmtree(experiment_dir, ignore_errors=True)
        raise CheckpointError(f"could not write the experiment directory {experiment_dir} "
                              f"({error.strerror or error}); nothing was kept. Free space and start again") from error
    except BaseException:  # a stop signal: the same, no half-made experiment
        shutil.rmtree(experiment_dir, ignore_errors=True)
        raise
    return experiment_dir


def run_training(flags: dict[str, Any], device: torch.device, saved_tokenizer_dir: Path | None,
                 auto_size_keeping: set[str] | None = None) -> Path:
    """Prepare data and model, create or reopen the experiment directory, run the training loop, export.

    With `auto_size_keeping` (the user's own flags among AUTO_SIZED_FLAGS), the model's shape, batch size and lr
    are first chosen for the time budget (`choose_shape_for_budget`)."""
    torch.manual_seed(flags["seed"])
    random.seed(flags["seed"])
    np.random.seed(flags["seed"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls

    progress = RunProgress(None if saved_tokenizer_dir is None else saved_tokenizer_dir.parent)
    with contextlib.ExitStack() as lock, reported_stops(flags, progress):
        data = prepare_data(flags, saved_tokenizer_dir)
        auto_size_note = None
        if auto_size_keeping is not None:
            chosen, auto_size_note = choose_shape_for_budget(
                flags, device, auto_size_keeping, lambda shape: measure_tokens_per_s(shape, data.tokenizer, device))
            flags.update(chosen)
            check_memory(flags, device)
        new_model = saved_tokenizer_dir is None and not flags["init_from"]  # a resume loads its weights instead
        output_bias = unigram_output_bias(data.token_sample(), len(data.tokenizer)) if new_model else None
        model = create_model(flags["num_layers"], flags["num_heads"], flags["ff_dim"], flags["h_dim"], flags["dropout"],
                             data.tokenizer, flags["max_seq_length"], flags["init_from"], output_bias,
                             flags["positions"]).to(device)
        optimizer = create_optimizer(model, flags["lr"], flags["weight_decay"])
        budget = TimeBudget(parse_duration(flags["time_budget"])) if flags["time_budget"] is not None else None
        progress.budget = budget
        lr_scheduler = create_lr_scheduler(optimizer, flags["warmup_steps"], flags["num_iterations"], budget)
        scaler = torch.amp.GradScaler(device.type, enabled=flags["dtype"] == "fp16")

        check_disk_space(Path(flags["checkpoint_dir"] or flags["load_checkpoint_dir"]), count_parameters(model))
        if progress.experiment_dir is None:  # a new experiment: only now, when all inputs loaded, create its directory
            progress.experiment_dir, progress.created = create_experiment(flags, data, model), True
            lock.enter_context(experiment_lock(progress.experiment_dir))  # nobody else knows its name yet
            start_step, data_position = 0, (0, 0)
        else:
            checkpoint = load_latest_checkpoint(progress.experiment_dir, map_location=device)
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            if budget is not None:
                budget.spent_before_s = checkpoint.get("budget_spent_s", 0.0)
            apply_lr_schedule(optimizer, lr_scheduler, flags["lr"])
            scaler.load_state_dict(checkpoint["grad_scaler"])
            set_rng_states(checkpoint["rng"])
            start_step, data_position = checkpoint["step"], tuple(checkpoint["data_position"])
            del checkpoint
            record_flag_changes(progress.experiment_dir, flags, start_step)
        experiment_dir = progress.experiment_dir

        with experiment_logging(experiment_dir, start_step) as metrics:
            log_run_start(experiment_dir, start_step, count_parameters(model), data, flags, device)
            if auto_size_note:
                logger.info(auto_size_note)  # here, so that train.log has it too
            progress.started = True
            training_loop(flags, device, model, optimizer, lr_scheduler, scaler, data, experiment_dir, metrics,
                          start_step, data_position, budget)
            export_and_demo(model, data.tokenizer, experiment_dir, device, flags["max_seq_length"])
            mark_completed(experiment_dir, saved_step(experiment_dir))
            if budget is not None:
                logger.info(f"time budget: {budget.spent():.1f} s of {budget.total_s:.0f} s spent{budget.overrun_note()}")
    return experiment_dir


def log_run_start(experiment_dir: Path, start_step: int, num_parameters: int, data: PreparedData,
                  flags: dict[str, Any], device: torch.device) -> None:
    """The first log lines: which experiment, new or resumed, how big the model and the data are."""
    logger.info(f"experiment {experiment_dir}: {'resuming at step ' + str(start_step) if start_step else 'new'}")
    logger.info(f"model: {num_parameters / 1e6:.1f}M parameters; data: {data.num_train_blocks or 'streamed'} train / "
                f"{len(data.validation_blocks)} validation blocks of {flags['max_seq_length']} tokens; device {device}")


def compiled_mlm_loss() -> Callable[..., torch.Tensor]:
    """`mlm_loss` through torch.compile: what `--compile` trains with (the model itself is not modified).

    The whole loss is one graph, so besides the encoder's elementwise work the head's cross-entropy fuses too: the
    fp32 upcast, log-softmax and their gradients over the [masked tokens x vocab] logits become a few passes
    instead of one kernel each (on CPU that alone made the head ~1.7x faster at a 50k vocabulary). The number of
    masked tokens changes every step, so that one dimension is marked dynamic: one graph serves every count, and
    the encoder's shapes stay static. Where compilation fails (no C++ compiler, unsupported platform), dynamo falls
    back to eager with a warning. train_bert_ds.py runs the same compiled loss inside its engine's forward.

    On CPU the compiled code is made deterministic, so that a resumed run equals the uninterrupted one bit for bit.
    Inductor writes the embeddings' gradient (a scatter-add of every token's gradient into its row) as a parallel
    loop of atomic adds: with several threads the order of the additions, hence the last bits of the sum, changed
    from run to run. In PyTorch's deterministic mode, switched on before the first call compiles anything, it calls
    ATen's sequential kernel for that one operation instead.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    compiled = torch.compile(mlm_loss)

    def loss(model: torch.nn.Module, input_ids: torch.Tensor, masked_positions: torch.Tensor,
             masked_labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if input_ids.device.type == "cpu" and not torch.are_deterministic_algorithms_enabled():
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch._dynamo.maybe_mark_dynamic(masked_positions, 0)
        torch._dynamo.maybe_mark_dynamic(masked_labels, 0)
        return compiled(model, input_ids, masked_positions, masked_labels, reduction)

    return loss


def training_loop(flags: dict[str, Any], device: torch.device, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, lr_scheduler: Any, scaler: torch.amp.GradScaler,
                  data: PreparedData, experiment_dir: Path, metrics: MetricsLogger, start_step: int,
                  data_position: tuple[int, int], budget: TimeBudget | None = None) -> int:
    """Train from `start_step` to `num_iterations` (or until the `budget` is spent), logging, evaluating and
    checkpointing along the way; return the last step."""
    loss_function = compiled_mlm_loss() if flags["compile"] else mlm_loss
    autocast = make_autocast(device, flags["dtype"])
    validation = eval_batches(data.validation_blocks, flags["batch_size"], flags["seed"], data.masking)
    batches = train_batches(data.train_blocks, flags["batch_size"], flags["seed"], data.masking, data_position,
                            flags["num_workers"], pin_memory=device.type == "cuda")
    window = LossWindow(device, flags["grad_accum_steps"], check_finite=flags["dtype"] != "fp16")

    def checkpoint_state(step: int) -> dict[str, Any]:
        budget_state = {"budget_spent_s": budget.spent()} if budget is not None else {}
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": scaler.state_dict(), "step": step,
                "data_position": list(data_position), "rng": rng_states(), "flags": flags, **budget_state}

    if budget is not None:
        measure_end_of_run(budget, model, validation, 0 if data.test_blocks is None else len(data.test_blocks), flags,
                           lambda: time_evaluation_batch(model, validation[:2], device, autocast))
    model.train()
    steps = range(start_step + 1, flags["num_iterations"] + 1) if budget is None else itertools.count(start_step + 1)
    if budget is not None and budget.exhausted(0):  # a resume of a run whose budget is already spent
        steps = []
    step = start_step
    progress = tqdm(total=flags["num_iterations"] if budget is None else None, initial=start_step, desc="training",
                    unit="step", disable=None)
    with StopSignal() as stop, progress:  # the progress bar closes however the loop ends
        for step in steps:
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
            if budget is None:
                last = step == flags["num_iterations"]
            else:  # stop if another step (and the evaluation/checkpoint due now) would eat into the end's reserve
                budget.record_step(time.perf_counter() - step_start)
                if budget.retime_due():  # the reserve for the end follows the machine's current speed
                    budget.set_evaluation_batch_s(time_evaluation_batch(model, validation[:2], device, autocast))
                last = budget.exhausted(budget.step_estimate_s() + evaluate_now * budget.evaluation_batch_s
                                        * len(validation) + checkpoint_now * budget.checkpoint_s)

            if step % flags["log_every"] == 0 or last:
                window.raise_if_nonfinite(experiment_dir)
                record = window.record(step, lr_scheduler.get_last_lr()[0], float(grad_norm), flags, model.config,
                                       device)
                if budget is not None:
                    record.update(budget_spent_s=budget.spent(), eta_s=max(0.0, budget.total_s - budget.spent()))
                if scaler.is_enabled():
                    record["loss_scale"] = scaler.get_scale()
                metrics.log(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}")

            if evaluate_now or last:
                evaluation_start = time.perf_counter()
                log_evaluation(metrics, step, "eval", evaluate(model, validation, device, autocast,
                                                              description="validation"))
                if budget is not None:
                    budget.set_evaluation_batch_s((time.perf_counter() - evaluation_start) / len(validation))
            if checkpoint_now or last or stop.signum is not None:
                window.raise_if_nonfinite(experiment_dir)
                raise_if_weights_nonfinite(model, step, experiment_dir)
                save_start = time.perf_counter()
                path = save_checkpoint(experiment_dir, checkpoint_state(step), flags["keep_last"])
                logger.info(f"saved checkpoint {path.name}")
                if budget is not None:
                    budget.checkpoint_s = time.perf_counter() - save_start
            if stop.signum is not None:
                raise stop.interruption(step, experiment_dir)
            if last:
                break
    if budget is not None:
        budget.training_ended = True
    log_test_evaluation(metrics, data, flags, lambda test: evaluate(model, test, device, autocast, description="test"),
                        step, None if budget is None else budget.test_batches * flags["batch_size"])
    return step


def log_evaluation(metrics: MetricsLogger, step: int, prefix: str, totals: torch.Tensor) -> None:
    """Log the token-weighted mean loss and its perplexity from evaluate()'s [loss sum, token count]."""
    loss = float(totals[0] / totals[1])
    metrics.log({"step": step, f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 700))})


def log_test_evaluation(metrics: MetricsLogger, data: PreparedData, flags: dict[str, Any],
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
        test = eval_batches(blocks, flags["batch_size"], flags["seed"], data.masking)
        log_evaluation(metrics, flags["num_iterations"] if step is None else step, "test", evaluate_batches(test))


def export_and_demo(model: torch.nn.Module, tokenizer: Any, experiment_dir: Path, device: torch.device,
                    max_seq_length: int) -> None:
    """Save model and tokenizer as a Hugging Face folder `hf_model/` and show its fill-mask predictions.

    The folder is written under a temporary name and renamed into place, so `hf_model/` is always a complete export
    (or absent), however the run stops; a killed export's leftovers are removed by the next one.
    """
    hf_model_dir = experiment_dir / "hf_model"
    for leftover in experiment_dir.glob(".hf_model.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    temporary, previous = (experiment_dir / f".hf_model.{os.getpid()}.{part}" for part in ("tmp", "old"))
    try:
        model.save_pretrained(temporary)
        tokenizer.model_max_length = max_seq_length  # what the model was trained on (and its position table allows)
        tokenizer.save_pretrained(temporary)
        if hf_model_dir.exists():  # an earlier export (before the run was extended): replaced only now
            os.replace(hf_model_dir, previous)
        os.replace(temporary, hf_model_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    predictions = fill_mask_demo(hf_model_dir, device)
    logger.info(f"fill-mask: {FILL_MASK_SENTENCE}" + ("" if predictions else " (longer than max_seq_length; skipped)"))
    for number, candidates in enumerate(predictions, start=1):
        logger.info(f"fill-mask, <mask> #{number}: {' | '.join(candidates)}")


# ----------------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    main(train)


def measure_tokens_per_s(flags: dict[str, Any], tokenizer: Any, device: torch.device, min_steps: int = 3,
                         min_seconds: float = 0.5) -> float:
    """Training tokens per second of the model `flags` describe, on `device`: eager forward, backward and AdamW step
    on random tokens, timed over at least `min_steps` steps and `min_seconds` after two untimed ones (first
    allocations, kernel selection). The weights and the RNG are thrown away afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = create_model(flags["num_layers"], flags["num_heads"], flags["ff_dim"], flags["h_dim"],
                             flags["dropout"], tokenizer, flags["max_seq_length"], positions=flags["positions"])
        model.to(device)
        optimizer = create_optimizer(model, flags["lr"], flags["weight_decay"])
        ids = torch.randint(len(tokenizer), (flags["batch_size"], flags["max_seq_length"]))
        batch = to_device(sparse_batch(*masking_function(ids, tokenizer)), device)
        autocast = make_autocast(device, flags["dtype"])
        steps, start = -2, 0.0
        while steps < min_steps or time.perf_counter() - start < min_seconds:
            with autocast():
                loss = mlm_loss(model, **batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss.detach())  # waits for the device
            steps += 1
            if steps == 0:
                start = time.perf_counter()
        seconds = (time.perf_counter() - start) / steps
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return flags["batch_size"] * flags["max_seq_length"] / seconds


def time_evaluation_batch(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                          autocast: Callable[[], contextlib.AbstractContextManager]) -> float:
    """Seconds one evaluation batch takes now: the fastest of `batches`, so a one-off delay does not count."""
    times = []
    for batch in batches:
        start = time.perf_counter()
        float(evaluate(model, [batch], device, autocast)[0])  # waits for the device
        times.append(time.perf_counter() - start)
    return min(times)


def prepare_streamed_data(raw: "datasets.IterableDatasetDict", tokenizer: Any, flags: dict[str, Any],
                          masking: MaskingConfig) -> PreparedData:
    """Streams instead of a store: validation and test are their splits' first --eval_blocks blocks, read now; a
    corpus without a validation split gives up the first --eval_blocks blocks of its train stream instead."""
    streams = {split: BlockStream(raw[split], tokenizer, flags["max_seq_length"])
               for split in raw if split in ("train", "validation", "test")}
    held_out = "validation" if "validation" in streams else "train"
    validation, after = streams[held_out].take(flags["eval_blocks"], streams[held_out].first_position)
    if held_out == "train":
        streams["train"].first_position = after
        logger.info(f"streaming: no validation split; the first {flags['eval_blocks']} train blocks validate")
    test = streams["test"].take(flags["eval_blocks"], streams["test"].first_position)[0] if "test" in streams else None
    return PreparedData(tokenizer, streams["train"], validation, test, masking)

"""Streaming: a corpus too big to download first is read, tokenized and packed on the fly."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from loguru import logger

from pretraining.corpus import block_framing_ids
from pretraining.errors import ConfigError

if TYPE_CHECKING:
    import datasets


class BlockStream:
    """The packed blocks of a streamed split, in file order, tokenized as they are read.

    A position in the stream is `(epoch, state, consumed)`: `state` is the `datasets` state (JSON) just before the
    line that holds the next unused token, `consumed` how many of that line's tokens are already used. Blocks are
    cut exactly as from the token store (lines concatenated, every line ending with </s>), and a stream resumed from
    a position yields exactly the blocks that followed it. At the end of the split it starts over (next epoch),
    in the same order: a stream has no shuffle buffer, since its contents would be lost on resume.
    """

    def __init__(self, split: "datasets.IterableDataset", tokenizer: Any, max_seq_length: int):
        self.split, self.tokenizer, self.max_seq_length = split, tokenizer, max_seq_length
        self.start_id, self.end_id = block_framing_ids(tokenizer)
        self.start_of_split = json.dumps(split.state_dict())
        self.first_position = (0, self.start_of_split, 0)  # where training starts; later if blocks are held out

    def lines(self, state: str, lines_per_call: int = 1000) -> Iterator[tuple[str, np.ndarray, str]]:
        """Yield (state before the line, its ids + </s>, state after it) for every non-empty line from `state` on."""
        self.split.load_state_dict(json.loads(state))
        pending: list[tuple[str, str, str]] = []
        for example in self.split:
            after = json.dumps(self.split.state_dict())
            if example["text"].strip():
                pending.append((state, example["text"], after))
            state = after
            if len(pending) == lines_per_call:
                yield from self.tokenized(pending)
                pending = []
        yield from self.tokenized(pending)

    def tokenized(self, pending: list[tuple[str, str, str]]) -> Iterator[tuple[str, np.ndarray, str]]:
        ids = self.tokenizer([text for _, text, _ in pending], add_special_tokens=False, verbose=False)["input_ids"]
        for (before, _, after), line_ids in zip(pending, ids):
            yield before, np.array(line_ids + [self.end_id], dtype=np.int32), after

    def blocks(self, position: tuple[int, str, int]) -> Iterator[tuple[torch.Tensor, tuple[int, str, int]]]:
        """Yield (block [max_seq_length] int32, position after it) forever, starting at `position`."""
        epoch, state, consumed = position
        body, filled = np.empty(self.max_seq_length - 2, dtype=np.int32), 0
        while True:
            found_tokens = False
            for before, ids, after in self.lines(state):
                found_tokens = True
                while consumed < len(ids):
                    take = min(len(body) - filled, len(ids) - consumed)
                    body[filled : filled + take] = ids[consumed : consumed + take]
                    filled, consumed = filled + take, consumed + take
                    if filled == len(body):
                        filled = 0
                        block = np.concatenate([[self.start_id], body, [self.end_id]]).astype(np.int32)
                        yield (
                            torch.from_numpy(block),
                            (epoch, before, consumed) if consumed < len(ids) else (epoch, after, 0),
                        )
                consumed = 0
            if not found_tokens and state == self.start_of_split:
                raise ConfigError("the streamed train split holds no text")
            epoch, state = epoch + 1, self.start_of_split  # the split ended: start it over, in the same order

    def token_sample(self, max_tokens: int = 2**20) -> np.ndarray:
        """About the first `max_tokens` tokens of the stream (as whole blocks), as PackedBlocks.token_sample."""
        return self.take(-(-max_tokens // self.max_seq_length), self.first_position)[0].flatten().numpy()

    def take(self, count: int, position: tuple[int, str, int]) -> tuple[torch.Tensor, tuple[int, str, int]]:
        """The first `count` blocks from `position` as one tensor, and the position after them."""
        blocks, stream = [], self.blocks(position)
        for _ in range(count):
            block, position = next(stream)
            blocks.append(block)
        return torch.stack(blocks), position


def open_streams(
    raw: "datasets.IterableDatasetDict", tokenizer: Any, flags: dict[str, Any]
) -> tuple[BlockStream, torch.Tensor, torch.Tensor | None]:
    """Streams instead of a token store: (the train stream, the validation blocks, the test blocks or None).
    Validation and test are their splits' first --eval_blocks blocks, read now; a corpus without a validation
    split gives up the first --eval_blocks blocks of its train stream instead."""
    streams = {
        split: BlockStream(raw[split], tokenizer, flags["max_seq_length"])
        for split in raw
        if split in ("train", "validation", "test")
    }
    held_out = "validation" if "validation" in streams else "train"
    validation, after = streams[held_out].take(flags["eval_blocks"], streams[held_out].first_position)
    if held_out == "train":
        streams["train"].first_position = after
        logger.info(f"streaming: no validation split; the first {flags['eval_blocks']} train blocks validate")
    test = streams["test"].take(flags["eval_blocks"], streams["test"].first_position)[0] if "test" in streams else None
    return streams["train"], validation, test


def stream_batches(
    stream: BlockStream,
    batch_size: int,
    start: tuple,
    rank: int,
    world_size: int,
    mask: Callable[[torch.Tensor, int], dict[str, torch.Tensor]],
) -> Iterator[tuple[tuple, dict[str, torch.Tensor]]]:
    """Yield `(next_position, batch)` forever from a stream; a position is (batch index, *stream position).

    Every rank reads the same stream and takes its own `batch_size` of each `batch_size x world_size` consecutive
    blocks (global batch index x world_size + rank, as in train_bert.TrainBatches): the ranks see disjoint blocks,
    and after each step they stand at the same position, so one position resumes them all. `mask(rows, global batch
    index)` makes the batch. `start` (0, 0) is a new run: the stream's first position.
    """
    index, *position = (0, *stream.first_position) if tuple(start) == (0, 0) else start
    blocks = stream.blocks(tuple(position))
    while True:
        step_blocks = [next(blocks) for _ in range(batch_size * world_size)]
        rows = torch.stack([block for block, _ in step_blocks[rank * batch_size : (rank + 1) * batch_size]])
        global_index = index * world_size + rank
        index += 1
        yield (index, *step_blocks[-1][1]), mask(rows, global_index)

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

import codecs
import collections
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import inspect
import io
import itertools
import json
import math
import os
import random
import re
import resource
import shutil
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger
from tqdm.auto import tqdm

# The heavy Hugging Face imports (datasets, transformers, tokenizers) happen inside the functions that need them, so
# `--help` and bad flags answer at once.

HERE = Path(__file__).resolve().parent
FILL_MASK_SENTENCE = "In the beautiful season of <mask> the <mask> shed their leaves."
IGNORE_INDEX = -100  # the label that F.cross_entropy skips: "not a prediction target"


class ConfigError(ValueError):
    """A bad flag or input: reported as one line, exit code 2, nothing written."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training stops before writing anything from the bad step."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or none could be loaded."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived: a checkpoint was saved and the message says how to resume.

    The process is expected to print that and exit: from here on it ignores SIGTERM (see `StopSignal.__exit__`).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StoppedAtOnce(BaseException):
    """SIGTERM/SIGINT outside the training steps (loading, the end phase): nothing to finish, the run stops now.

    A BaseException, like KeyboardInterrupt, so that libraries' `except Exception` cannot swallow or rewrap it.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class OutOfMemory(RuntimeError):
    """A step did not fit in memory: reported as one line naming the flags to lower; the last checkpoint is kept."""


# ----------------------------------------------------------------------------------------------------------------------
# Data: load text, tokenize once into a token store on disk, cut blocks from its memory map at batch time.
# ----------------------------------------------------------------------------------------------------------------------


def offline_hint() -> str:
    """The one sentence that tells a user how to run without the Hugging Face Hub."""
    return (
        "To run offline, pass local copies: --dataset PATH (a datasets folder such as ../shared/data/wikitext, a "
        "folder with train.txt/validation.txt[/test.txt], or one .txt file) and --tokenizer PATH (a tokenizer folder "
        "such as ../shared/data/roberta-base, or 'bpe' to train one), with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 set."
    )


def text_files(dataset: str) -> dict[str, Path]:
    """The .txt files of a local text corpus by split ({} for anything else: a Hub name, a datasets folder)."""
    path = Path(dataset)
    if path.is_file() and path.suffix == ".txt":
        return {"train": path}
    if path.is_dir() and (path / "train.txt").is_file():
        return {split: path / f"{split}.txt" for split in ("train", "validation", "test") if (path / f"{split}.txt").is_file()}
    return {}


def check_text_file(path: Path) -> None:
    """Name what is wrong with a .txt corpus file that `datasets` cannot read: empty, or not UTF-8 (where)."""
    if path.stat().st_size == 0:
        raise ConfigError(f"--dataset file {str(path)!r} is empty; give a UTF-8 text file with one line per paragraph")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                line += chunk.count(b"\n", 0, error.start)
                raise ConfigError(f"--dataset file {str(path)!r} is not UTF-8 text: byte {offset + error.start} (line "
                                  f"{line}, 0x{chunk[error.start]:02x}) cannot be decoded: {error.reason}; convert "
                                  "the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from error
            offset, line = offset + len(chunk), line + chunk.count(b"\n")


def load_text_dataset(dataset: str, dataset_config: str | None, streaming: bool = False
                      ) -> "datasets.DatasetDict | datasets.IterableDatasetDict":
    """Load `dataset` as a DatasetDict with a `text` column and at least `train` and `validation` splits.

    `dataset` is a Hub name ("wikitext"), a folder `datasets.load_dataset` understands (../shared/data/wikitext), a
    folder holding train.txt / validation.txt / test.txt, or a single .txt file (its last 5% of lines, at least one,
    become the validation split; lines stay in order so no paragraph leaks between splits).
    With `streaming`, the splits are read lazily (an IterableDatasetDict; a single .txt file is then not split: see
    `prepare_streamed_data`).
    """
    import datasets

    path = Path(dataset)
    files = text_files(dataset)
    try:
        if path.is_file() and path.suffix != ".txt":
            raise ConfigError(f"--dataset {dataset!r} is a file but not a .txt file; give a .txt file or a folder")
        if files:
            raw = datasets.load_dataset("text", data_files={split: str(file) for split, file in files.items()},
                                        streaming=streaming)
        else:
            raw = datasets.load_dataset(dataset, dataset_config, streaming=streaming)
        if streaming:  # a stream's columns may be unknown until read: then it must have a `text` one
            return datasets.IterableDatasetDict({split: raw[split].select_columns(["text"]) if raw[split].features is None
                                                 else with_text_column(raw[split], dataset) for split in raw})
    except ConfigError:
        raise
    except Exception as error:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError…)
        for file in files.values():  # "An error occurred while generating the dataset" hides the cause: find it
            check_text_file(file)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"could not load --dataset {dataset!r} (config {dataset_config!r}): {first_line[:300]}. {offline_hint()}"
        ) from error
    if path.is_file():
        raw = split_single_file(raw["train"], dataset)
    if not isinstance(raw, datasets.DatasetDict) or "train" not in raw or "validation" not in raw:
        splits = list(raw.keys()) if isinstance(raw, datasets.DatasetDict) else []
        raise ConfigError(f"--dataset {dataset!r} must have 'train' and 'validation' splits; it has {splits}")
    return datasets.DatasetDict({split: with_text_column(raw[split], dataset) for split in raw})


def split_single_file(lines: "datasets.Dataset", dataset: str) -> "datasets.DatasetDict":
    """Train on the first 95% of a single .txt file's lines and validate on the rest (at least one line each)."""
    import datasets

    num_validation = max(1, len(lines) // 20)
    if len(lines) - num_validation < 1:
        raise ConfigError(
            f"--dataset {dataset!r} has {len(lines)} line(s): a single .txt file is split by lines, its last 5% (at "
            f"least one line) validating, so no line is left to train on; give a file of many lines, or a folder "
            "with train.txt and validation.txt")
    return datasets.DatasetDict(train=lines.select(range(len(lines) - num_validation)),
                                validation=lines.select(range(len(lines) - num_validation, len(lines))))


def describe_split(dataset: str, rows: dict[str, int], split: str) -> str:
    """How a split came about, for error messages: one .txt file is split by lines, other corpora have real splits.
    `rows` is each split's number of lines (empty ones included)."""
    if Path(dataset).is_file():
        return (f"the {split} split ({rows[split]} of the {rows['train'] + rows['validation']} lines of {dataset!r}: "
                "the first 95% train, the last 5% validate)")
    return f"the {split} split"


def with_text_column(split: "datasets.Dataset", dataset: str) -> "datasets.Dataset":
    """Return `split` with only a `text` column (renaming its single string column if it has another name)."""
    string_columns = [name for name, feature in split.features.items() if getattr(feature, "dtype", None) == "string"]
    if "text" in split.column_names:
        column = "text"
    elif len(string_columns) == 1:
        column = string_columns[0]
    else:
        raise ConfigError(
            f"--dataset {dataset!r} has no text column: expected a string column named 'text' (or exactly one "
            f"string column); its columns are {split.column_names}"
        )
    split = split.select_columns([column])
    return split if column == "text" else split.rename_column(column, "text")


def train_bpe_tokenizer(texts: "datasets.Dataset", vocab_size: int) -> "transformers.PreTrainedTokenizerFast":
    """Train a byte-level BPE tokenizer (RoBERTa's kind) on `texts` with the `tokenizers` library.

    Its special tokens and their ids match RoBERTa's (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last), so everything
    downstream treats it like roberta-base. Takes seconds on wikitext-2.
    """
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        (batch["text"] for batch in texts.iter(batch_size=1000)),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )


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


def check_tokenizer(tokenizer: "transformers.PreTrainedTokenizerBase", name: str) -> None:
    """MLM needs a mask token, a pad token (RoBERTa's position ids count from it) and block framing tokens."""
    missing = [
        role
        for role, token_id in (
            ("mask_token", tokenizer.mask_token_id),
            ("pad_token", tokenizer.pad_token_id),
            ("bos_token or cls_token", tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id),
            ("eos_token or sep_token", tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id),
        )
        if token_id is None
    ]
    if missing:
        raise ConfigError(
            f"--tokenizer {name!r} has no {', '.join(missing)}; MLM pretraining needs them. Use a RoBERTa/BERT-style "
            "tokenizer or --tokenizer bpe to train one"
        )


def block_framing_ids(tokenizer: "transformers.PreTrainedTokenizerBase") -> tuple[int, int]:
    """The (start, end) ids that frame every block and end every line: <s>/</s> for RoBERTa, [CLS]/[SEP] for BERT."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return start, end


def tokenize_lines(split: "datasets.Dataset", tokenizer: "transformers.PreTrainedTokenizerBase", num_proc: int = 1,
                   cache_file_name: str | None = None) -> "datasets.Dataset":
    """Tokenize every non-empty line once, ending each with the end token so line boundaries stay visible.

    A batched `map` (the Rust tokenizer sees 1,000 lines at a time) in `num_proc` processes, each writing its share
    as an Arrow file, so no process holds the tokenized corpus in memory. Empty lines produce no row at all.
    """
    import datasets

    _, end_id = block_framing_ids(tokenizer)

    def tokenize_batch(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        lines = [line for line in batch["text"] if line.strip()]
        ids = tokenizer(lines, add_special_tokens=False, verbose=False)["input_ids"] if lines else []
        return {"input_ids": [line_ids + [end_id] for line_ids in ids]}

    return split.map(tokenize_batch, batched=True, remove_columns=split.column_names, desc="tokenizing",
                     num_proc=num_proc if num_proc > 1 else None,
                     features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
                     cache_file_name=cache_file_name, new_fingerprint=uuid.uuid4().hex)


STORE_FORMAT_VERSION = 1  # bump when the files of a token store change meaning: old stores are then not reused
LINES_PER_PROCESS = 10_000  # below this many lines per process, starting processes costs more than it saves


def tokenizer_fingerprint(tokenizer: "transformers.PreTrainedTokenizerBase") -> str:
    """A hash of everything that decides the token ids: vocabulary, merges, normalisation, special tokens."""
    import hashlib

    if tokenizer.is_fast:
        description = tokenizer.backend_tokenizer.to_str()
    else:
        description = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    return hashlib.sha256(f"{description}|{block_framing_ids(tokenizer)}".encode()).hexdigest()[:16]


def corpus_sources(dataset: str, dataset_config: str | None
                   ) -> tuple[dict[str, Any], "datasets.DatasetDict | None"]:
    """What identifies the corpus, and the corpus itself if identifying it meant loading it (else None).

    Local .txt files are identified without being read: their paths, sizes, modification times and first and last
    MiB (a prepared store then opens without loading the text at all). Anything else is loaded, and identified by
    `datasets`' fingerprint of each split.
    """
    import hashlib

    files = text_files(dataset)
    if not files:
        raw = datasets_splits(load_text_dataset(dataset, dataset_config), ("train", "validation", "test"))
        return {split: raw[split]._fingerprint for split in sorted(raw)}, raw
    sources = {"layout": "one file: last 5% of lines validate" if Path(dataset).is_file() else "one file per split"}
    for split, path in sorted(files.items()):
        status = path.stat()
        with open(path, "rb") as file:
            sample = file.read(1 << 20)
            file.seek(max(0, status.st_size - (1 << 20)))
            sample += file.read()
        sources[split] = [str(path.resolve()), status.st_size, status.st_mtime_ns, hashlib.sha256(sample).hexdigest()]
    return sources, None


def token_store_dir(sources: dict[str, Any], tokenizer: Any, data_cache: str | None) -> Path:
    """Where the token store of (this corpus, this tokenizer, this store format) lives: a folder named by a hash of
    `corpus_sources`, `tokenizer_fingerprint` and STORE_FORMAT_VERSION. The default folder sits next to the datasets
    cache ($HF_DATASETS_CACHE, ~/.cache/huggingface/datasets), so one cleanup clears both."""
    import hashlib

    import datasets

    key = json.dumps({"format": STORE_FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
                      "sources": sources})
    root = Path(data_cache) if data_cache else Path(datasets.config.HF_DATASETS_CACHE) / "token_stores"
    return root / hashlib.sha256(key.encode()).hexdigest()[:20]


def write_npy(path: Path, dtype: np.dtype, length: int, chunks: Iterator[np.ndarray]) -> None:
    """Write a 1-D .npy file of `length` items from `chunks`, with plain writes (a write to a full disk raises
    ENOSPC, where writing through a memory map would kill the process with SIGBUS), and fsync it."""
    written = 0
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(
            file, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)})
        for chunk in chunks:
            chunk.astype(dtype, copy=False).tofile(file)
            written += len(chunk)
        file.flush()
        os.fsync(file.fileno())
    assert written == length, f"{path}: wrote {written} of {length} items"


def write_token_split(token_lines: "datasets.Dataset", directory: Path, split: str, dtype: np.dtype) -> dict[str, int]:
    """Write a tokenized split as `<split>.tokens.npy` (every line's ids, end token included, one after the other)
    and `<split>.line_ends.npy` (where each line ends in it), streaming its Arrow files batch by batch."""
    import pyarrow as pa

    def arrow_batches() -> Iterator[pa.ListArray]:
        if not token_lines.cache_files:  # a dataset held in memory
            yield from token_lines.data.column("input_ids").chunks
        for cache_file in token_lines.cache_files:  # read, not memory-mapped: the process keeps one batch at a time
            with pa.OSFile(cache_file["filename"]) as source:
                for batch in pa.ipc.open_stream(source):
                    yield batch.column("input_ids")

    def line_ends() -> Iterator[np.ndarray]:
        total = 0
        for ids in arrow_batches():
            offsets = ids.offsets.to_numpy()
            yield offsets[1:] - offsets[0] + total
            total += int(offsets[-1] - offsets[0])

    num_lines = len(token_lines)
    num_tokens = sum(int(ids.offsets[-1].as_py() - ids.offsets[0].as_py()) for ids in arrow_batches())
    write_npy(directory / f"{split}.tokens.npy", dtype, num_tokens,
              (ids.flatten().to_numpy() for ids in arrow_batches()))
    write_npy(directory / f"{split}.line_ends.npy", np.int64, num_lines, line_ends())
    return {"tokens": num_tokens, "lines": num_lines}


def build_token_store(raw: "datasets.DatasetDict", tokenizer: Any, store: Path, num_proc: int) -> None:
    """Tokenize every split into `store`, all or nothing: it is written under a temporary name and renamed when
    complete, so a run killed or stopped by a full disk leaves no store that a later run would use."""
    temporary = store.with_name(f"{store.name}.tmp.{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
        splits = {}
        for split in raw:
            processes = max(1, min(num_proc, len(raw[split]) // LINES_PER_PROCESS))
            logger.info(f"token store: tokenizing the {split} split ({len(raw[split])} lines, {processes} "
                        f"process{'es' if processes > 1 else ''})")
            token_lines = tokenize_lines(raw[split], tokenizer, processes, str(temporary / f"{split}.arrow"))
            splits[split] = {**write_token_split(token_lines, temporary, split, dtype), "rows": len(raw[split])}
            for cache_file in token_lines.cache_files:  # the flat arrays replace them
                os.remove(cache_file["filename"])
        meta = {"format": STORE_FORMAT_VERSION, "dtype": np.dtype(dtype).name, "vocab_size": len(tokenizer),
                "tokenizer": tokenizer_fingerprint(tokenizer), "splits": splits}
        (temporary / "meta.json").write_text(json.dumps(store_record(temporary, meta), indent=2))
        install_store(temporary, store)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            raise ConfigError(f"could not write the token store in {store.parent} ({error.strerror or error}); nothing "
                              "was kept. Free space there or choose another folder with --data_cache DIR") from error
        raise


def open_token_store(dataset: str, dataset_config: str | None, tokenizer: Any, data_cache: str | None,
                     num_proc: int, raw: "datasets.DatasetDict | None" = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Each split's flat token array, memory-mapped from the store of (corpus, tokenizer), built first if missing;
    and the store's meta.json. `raw` is the loaded corpus if the caller has it.

    Processes that want the same store (the ranks of a job, two runs) take turns on a file lock: the first builds
    it, the others wait, then find it and only map it; the page cache holds one copy per machine for all of them.
    A store is checked against its meta.json before it is used, and rebuilt if damaged (see `store_damage`).
    """
    sources, loaded = corpus_sources(dataset, dataset_config)
    store = token_store_dir(sources, tokenizer, data_cache)
    with store_lock(store) as unwritable:
        damage = store_damage(store) if store.is_dir() else None
        if store.is_dir() and damage is None:
            logger.info(f"token store: reusing {store}")
        else:
            if unwritable is not None:  # a read-only cache: its store can be used as it is, not rebuilt
                raise damaged_store_error(store, damage, unwritable)
            if damage is not None:
                logger.warning(f"token store: {store} is damaged ({damage}); rebuilding it")
            for leftover in store.parent.glob(f"{store.name}.tmp.*"):  # a builder killed mid-write (we hold the lock)
                shutil.rmtree(leftover, ignore_errors=True)
            raw = raw if raw is not None else loaded if loaded is not None else load_text_dataset(dataset, dataset_config)
            build_token_store(datasets_splits(raw, ("train", "validation", "test")), tokenizer, store, num_proc)
            logger.info(f"token store: wrote {store}")
    meta = json.loads((store / "meta.json").read_text())
    return {split: np.load(store / f"{split}.tokens.npy", mmap_mode="r") for split in meta["splits"]}, meta


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
                        yield torch.from_numpy(block), (epoch, before, consumed) if consumed < len(ids) else (
                            epoch, after, 0)
                consumed = 0
            if not found_tokens and state == self.start_of_split:
                raise ConfigError("the streamed train split holds no text")
            epoch, state = epoch + 1, self.start_of_split  # the split ended: start it over, in the same order

    def take(self, count: int, position: tuple[int, str, int]) -> tuple[torch.Tensor, tuple[int, str, int]]:
        """The first `count` blocks from `position` as one tensor, and the position after them."""
        blocks, stream = [], self.blocks(position)
        for _ in range(count):
            block, position = next(stream)
            blocks.append(block)
        return torch.stack(blocks), position


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


def ignore_stop_signals_in_worker(_: int) -> None:
    """Ctrl-C (and SIGTERM from a scheduler such as SLURM) reaches the whole process group; only the main process
    should react (it finishes the step, saves and exits). A worker killed by the signal would instead crash the
    main process mid-step; ignoring it, the worker exits when the main process closes the DataLoader."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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

POSITIONS = ("rotary", "learned")


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
    from transformers import (AutoModelForMaskedLM, RobertaConfig, RobertaForMaskedLM, RoFormerConfig,
                              RoFormerForMaskedLM)

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


def dense_parameters(layers: int, d: int, ff: int) -> int:
    """Weights of the encoder's matrices, L·(4·d² + 2·d·f): attention projections and feed-forward layers (the
    embeddings and the head are left out; most of their rows are not touched by a given token)."""
    return layers * (4 * d * d + 2 * d * ff)


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


def parse_duration(value: str | int | float, flag: str = "--time_budget") -> float:
    """Seconds in a duration: a number of seconds (600), or amounts with units d/h/m/s ("10m", "2h30m", "1d")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
        if not text or parts is None:
            raise ConfigError(f"{flag} {value!r} is not a duration; give seconds (600) or amounts with units d, h, m, "
                              "s (10m, 2h30m, 1d)")
        seconds = sum(float(amount or 0) * unit for amount, unit in zip(parts.groups(), (86400, 3600, 60, 1)))
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{flag} {value!r} must be a positive duration (600, 10m, 2h30m, 1d)")
    return seconds


class TimeBudget:
    """The wall-clock budget of a --time_budget run: what is spent, what the end of the run needs, the progress.

    The clock runs from the first training step (loading data and building the model are not counted) and counts
    everything after it: steps, evaluations, checkpoints, and the end of the run (last evaluation and checkpoint,
    test evaluation, export and fill-mask demo). So that the end fits, training stops `reserve_s` early: an
    estimate of that end work from measurements (an evaluation batch and a checkpoint-sized save, timed at the
    start, again once the first steps are done, then the real ones as they happen). A resumed run adds the time its
    checkpoint says was spent before.

    A process's first steps are not its step time: they compile the model (torch.compile: a minute for BERT-base)
    and allocate memory. They count as spent, but the stop rule predicts the next step from the median of the
    recent steps after them, never from a compile.
    """

    END_MARGIN_S = 3.0  # the fill-mask demo loads the exported model into a pipeline: a few seconds, not timed ahead
    RETIME_EVERY_S = 30.0  # how often an evaluation batch is timed again: the machine's load changes during a run
    WARMUP_STEPS = 2  # a process's first steps (compilation, first allocations): spent, never extrapolated
    END_SHARE = 0.15  # the test evaluation is cut to a subset where the whole split would take more of the budget
    STEP_WINDOW = 9  # recent step times whose median predicts the next step

    def __init__(self, total_s: float, spent_before_s: float = 0.0):
        self.total_s, self.spent_before_s = total_s, spent_before_s
        self.clock_start = self.timed_at = time.perf_counter()
        self.evaluation_batch_s = self.checkpoint_s = 0.0
        self.validation_batches = self.all_test_batches = self.test_batches = 0
        self.step_times: collections.deque[float] = collections.deque(maxlen=self.STEP_WINDOW)
        self.steps_seen, self.first_step_s = 0, 0.0
        self.training_ended = False  # set after the last step: a stop from then on is in the end phase

    def retime_due(self) -> bool:
        """Whether the evaluation batch should be timed again: after each warm-up step and the first step after
        them (the timing at the start may have shared the machine with start-up work or a compile: it must not
        decide the first stop), then every RETIME_EVERY_S seconds."""
        return self.steps_seen <= self.WARMUP_STEPS + 1 or time.perf_counter() - self.timed_at >= self.RETIME_EVERY_S

    def start(self) -> None:
        """Start the clock (at the first training step)."""
        self.clock_start = time.perf_counter()

    def spent(self) -> float:
        """Seconds spent, earlier runs of a resumed experiment included."""
        return self.spent_before_s + time.perf_counter() - self.clock_start

    def record_step(self, seconds: float) -> None:
        """Count one optimizer step that took `seconds`; the warm-up steps are remembered but not averaged."""
        self.steps_seen += 1
        if self.steps_seen == 1:
            self.first_step_s = seconds
        if self.steps_seen > self.WARMUP_STEPS:
            self.step_times.append(seconds)

    def step_estimate_s(self) -> float:
        """The expected duration of the next step: the median of the recent steps after the warm-up (0 during it,
        so a compile never ends a run that has time left)."""
        return statistics.median(self.step_times) if self.step_times else 0.0

    def set_evaluation_batch_s(self, seconds: float) -> None:
        """A new measurement of one evaluation batch; the end's two evaluations (validation, then test) are given
        END_SHARE of the budget, so the test split is cut to what is left of it (at least one batch, at most the
        whole split)."""
        self.evaluation_batch_s, self.timed_at = seconds, time.perf_counter()
        room = int(self.END_SHARE * self.total_s / max(seconds, 1e-9)) - self.validation_batches
        self.test_batches = min(self.all_test_batches, max(1, room))

    def reserve_s(self) -> float:
        """The time kept for the end of the run: final and test evaluation, the last checkpoint, the export."""
        end_batches = self.validation_batches + self.test_batches
        return self.evaluation_batch_s * end_batches + 2 * self.checkpoint_s + self.END_MARGIN_S

    def training_s(self) -> float:
        """The point of the budget at which training stops (and the learning rate reaches 0)."""
        return max(self.total_s - self.reserve_s(), 1e-3)

    def progress(self) -> float:
        """The share of the training time spent: what the learning rate schedule follows."""
        return min(1.0, self.spent() / self.training_s())

    def exhausted(self, next_seconds: float) -> bool:
        """True if work of `next_seconds` (one more step and what follows it) would run into the reserve."""
        return self.spent() + next_seconds > self.training_s()

    def overrun_note(self) -> str:
        """Why a run that ended past its budget did, when its first step (a compile) took much of it; else ''."""
        if self.spent() <= 1.05 * self.total_s or self.first_step_s < 0.25 * self.total_s:
            return ""
        return (f"; the first step alone took {self.first_step_s:.0f} s of the {self.total_s:.0f} s budget (compiling "
                "the model): raise --time_budget or pass --compile False")


# Model shapes a --time_budget run chooses from (layers, width, heads, feed-forward, peak lr): BERT's family at a head
# width of 64, from this script's default up to BERT-base; the lr falls as the width grows, as in BERT's and
# Cramming's recipes.
AUTO_SHAPES = ((2, 128, 2, 512, 2e-3), (4, 256, 4, 1024, 1.5e-3), (6, 384, 6, 1536, 1e-3), (8, 512, 8, 2048, 7e-4),
               (12, 768, 12, 3072, 5e-4))
AUTO_SIZED_FLAGS = ("num_layers", "h_dim", "num_heads", "ff_dim", "lr", "batch_size")
TOKENS_PER_PARAMETER = 20  # compute-optimal training sees ~20 tokens per parameter (Hoffmann et al., 2022)
GPU_BATCH_SIZE = 128  # blocks per step a --time_budget run uses on a GPU: enough work per kernel to keep it busy


def choose_shape_for_budget(flags: dict[str, Any], tokenizer: Any, device: torch.device,
                            keep: set[str]) -> tuple[dict[str, Any], str]:
    """The model shape, batch size and lr for a --time_budget run: the largest of AUTO_SHAPES that sees at least
    TOKENS_PER_PARAMETER tokens per (non-embedding) parameter in the budget, at the speed measured here and now.

    A bigger model learns more per token, a smaller one sees more tokens; the compute-optimal balance (Chinchilla)
    is ~20 tokens per parameter. Each shape, smallest first, trains a few steps (eager, random tokens, this run's
    precision) to measure its tokens/s on this device; the search stops at the first shape that would see too few
    tokens. On a 2-core CPU that keeps the default (2 x 128); a GPU gets a wider, deeper model and a batch that
    fills it. Flags named in `keep` (given by the user) are never changed; the RNG is left as it was. Returns the
    chosen flags and a line that says why.
    """
    batch_size = flags["batch_size"] if "batch_size" in keep or device.type != "cuda" else GPU_BATCH_SIZE
    training_s = (1 - TimeBudget.END_SHARE) * parse_duration(flags["time_budget"])
    chosen = {}
    for layers, width, heads, ff, lr in AUTO_SHAPES:
        shape = {"num_layers": layers, "h_dim": width, "num_heads": heads, "ff_dim": ff, "lr": lr,
                 "batch_size": batch_size}
        shape = {name: flags[name] if name in keep else value for name, value in shape.items()}
        if shape["h_dim"] % shape["num_heads"]:
            continue
        tokens_per_s = measure_tokens_per_s({**flags, **shape}, tokenizer, device)
        parameters = dense_parameters(shape["num_layers"], shape["h_dim"], shape["ff_dim"])
        per_parameter = tokens_per_s * training_s / parameters
        logger.info(f"auto size: {shape['num_layers']} x {shape['h_dim']} (ff {shape['ff_dim']}), batch "
                    f"{batch_size}: {tokens_per_s:,.0f} tokens/s here, {per_parameter:.0f} tokens per parameter in "
                    f"{training_s:.0f} s of training")
        if chosen and per_parameter < TOKENS_PER_PARAMETER:
            break
        chosen = shape
    changed = {name: value for name, value in chosen.items() if value != flags[name]}
    return chosen, (f"auto size: {chosen['num_layers']} layers x {chosen['h_dim']} (ff {chosen['ff_dim']}, "
                    f"{chosen['num_heads']} heads), batch {chosen['batch_size']}, lr {chosen['lr']:g}: the largest shape "
                    f"that sees >= {TOKENS_PER_PARAMETER} tokens per parameter in this budget on {device}" +
                    (" (the defaults)" if not changed else "") + "; --auto_size False keeps the flags as given")


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

CHECKPOINT_PATTERN = "checkpoint-*.pt"
LATEST_POINTER = "latest"


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


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write a file so that `path` is either its old version or the complete new one, never half of it.

    Write to a temporary file in the same directory, flush and fsync it, `os.replace` it over `path` (atomic on
    POSIX), then fsync the directory so the rename itself survives a power cut. On any failure the temporary file
    is removed and `path` is untouched.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, mode) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


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


def git_output(*args: str) -> str | None:
    """Output of a git command run in the script's directory, or None outside a repository / without git."""
    try:
        result = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def record_code_version(experiment_dir: Path) -> None:
    """Write githash.log (the commit) and gitdiff.log (staged + unstaged changes, untracked files listed)."""
    commit = git_output("rev-parse", "HEAD")
    if commit is None:
        note = f"not a git repository (or git is not installed): {HERE}\n"
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

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__, "tokenizers": tokenizers.__version__, "numpy": np.__version__}


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
    kept = [line for line, record in records
            if record["step"] < step or (record["step"] == step and "test_loss" not in record)]
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
LOG_LINE_FIELDS = {"loss": ("loss", ""), "lr": ("lr", ""), "grad_norm": ("grad", ""), "loss_scale": ("scale", ""),
                   "tokens_per_sec": ("", " tok/s"), "step_time_ms": ("", " ms/step"), "mfu": ("MFU", "%"),
                   "peak_memory_mib": ("mem", " MiB"), "eta_s": ("eta", ""),
                   "budget_spent_s": ("spent", " s")}


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
    return logger.add(lambda message: tqdm.write(message, end="", file=sys.stderr), level="INFO", colorize=False,
                      format="{time:HH:mm:ss} | {level: <7} | {message}")


def setup_logging(experiment_dir: Path) -> list[int]:
    """loguru to stderr and to train.log; returns the sink ids."""
    return [console_logging(),
            logger.add(experiment_dir / "train.log", level="DEBUG", format="{time} | {level: <7} | {message}")]


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

# Flags that fix the model's or the data's shape: a resume must use the values the checkpoint was trained with.
RUN_DEFINING_FLAGS = ("dataset", "dataset_config", "tokenizer", "bpe_vocab_size", "max_seq_length", "num_layers",
                      "num_heads", "ff_dim", "h_dim", "positions", "batch_size", "grad_accum_steps", "seed",
                      "init_from", "streaming")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SEED = 2**32 - 1  # np.random.seed's limit (torch's is 2**64 - 1)
# Flags that describe this process, not the experiment: never recorded as a change of the experiment's flags.
PER_PROCESS_FLAGS = ("checkpoint_dir", "load_checkpoint_dir", "device", "local_rank", "ds_config")


def validate_flags(flags: dict[str, Any]) -> None:
    """Reject every bad flag value with one message naming the value and what is allowed. Creates nothing."""
    def require(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    given_dirs = [name for name in ("checkpoint_dir", "load_checkpoint_dir") if flags[name] is not None]
    require(len(given_dirs) == 1,
            "give exactly one of --checkpoint_dir DIR (start a new experiment in DIR) or --load_checkpoint_dir "
            f"EXPERIMENT_DIR (resume it); got {'both' if given_dirs else 'neither'}")
    for name in ("num_layers", "num_heads", "ff_dim", "h_dim", "batch_size", "grad_accum_steps", "num_iterations",
                 "checkpoint_every", "log_every", "eval_every", "keep_last", "bpe_vocab_size", "max_seq_length"):
        require(is_int(flags[name]) and flags[name] > 0, f"--{name} must be a positive integer; got {flags[name]!r}")
    for name in ("num_workers", "seed"):
        require(is_int(flags[name]) and flags[name] >= 0, f"--{name} must be an integer >= 0; got {flags[name]!r}")
    require(flags["seed"] <= MAX_SEED,
            f"--seed must be at most {MAX_SEED} (numpy seeds are 32-bit); got {flags['seed']}")
    warmup = flags["warmup_steps"]
    require((is_int(warmup) and warmup >= 0) or (is_number(warmup) and 0 <= warmup < 1),
            f"--warmup_steps must be a share of the run in [0, 1) (0.06: the first 6%) or a whole number of steps; "
            f"got {warmup!r}")
    if flags.get("time_budget") is not None:
        parse_duration(flags["time_budget"])
        require(not (is_int(warmup) and warmup >= 1),
                f"--warmup_steps {warmup} is a number of steps, but a --time_budget run has no fixed number of steps; "
                "give the warmup as a share of the budget (e.g. 0.06)")
    require(flags.get("positions", "rotary") in POSITIONS,
            f"--positions must be one of {', '.join(POSITIONS)}; got {flags.get('positions')!r}")
    for name in ("whole_word_mask", "auto_size"):
        require(isinstance(flags.get(name, False), bool), f"--{name} must be True or False; got {flags.get(name)!r}")
    require(flags.get("init_from") is None or (isinstance(flags["init_from"], str) and flags["init_from"] != ""),
            f"--init_from must be a Hugging Face masked-LM folder or Hub name; got {flags.get('init_from')!r}")
    for name in ("mask_prob", "random_replace_prob", "unmask_replace_prob", "dropout"):
        require(is_number(flags[name]) and 0 <= flags[name] <= 1,
                f"--{name} must be a probability in [0, 1]; got {flags[name]!r}")
    require(flags["mask_prob"] > 0, "--mask_prob must be > 0: with 0 no token is ever predicted and nothing trains")
    require(flags["dropout"] < 1, f"--dropout must be < 1; got {flags['dropout']!r}")
    require(flags["random_replace_prob"] + flags["unmask_replace_prob"] <= 1,
            f"--random_replace_prob + --unmask_replace_prob must be <= 1 (they split the selected tokens); got "
            f"{flags['random_replace_prob']} + {flags['unmask_replace_prob']} = "
            f"{flags['random_replace_prob'] + flags['unmask_replace_prob']}")
    for name in ("lr", "weight_decay", "grad_clip"):
        require(is_number(flags[name]) and math.isfinite(flags[name]) and flags[name] >= 0,
                f"--{name} must be a number >= 0; got {flags[name]!r}")
    require(flags["lr"] > 0, f"--lr must be > 0; got {flags['lr']!r}")
    require(flags["h_dim"] % flags["num_heads"] == 0,
            f"--h_dim {flags['h_dim']} must be divisible by --num_heads {flags['num_heads']}")
    require(flags["max_seq_length"] >= 8,
            f"--max_seq_length must be at least 8 (2 of its tokens are <s> and </s>); got {flags['max_seq_length']}")
    require(flags["dtype"] in ("auto", *DTYPES),
            f"--dtype must be one of auto, {', '.join(DTYPES)}; got {flags['dtype']!r}")
    require(isinstance(flags["compile"], bool), f"--compile must be True or False; got {flags['compile']!r}")
    require(is_int(flags["local_rank"]) and flags["local_rank"] >= -1,
            f"--local_rank must be -1 (not under a launcher) or a GPU index >= 0; got {flags['local_rank']!r}")
    require(isinstance(flags.get("device", "auto"), str) and
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", flags.get("device", "auto")) is not None,
            f"--device must be auto, cpu, cuda or cuda:N (N a GPU index); got {flags.get('device')!r}")
    for name in ("dataset", "tokenizer"):
        require(isinstance(flags[name], str) and flags[name] != "", f"--{name} must be a name or a path; got {flags[name]!r}")
    require(flags["num_proc"] is None or (is_int(flags["num_proc"]) and flags["num_proc"] > 0),
            f"--num_proc must be a positive integer (default: all {os.cpu_count()} cores); got {flags['num_proc']!r}")
    require(is_int(flags["eval_blocks"]) and flags["eval_blocks"] >= 0,
            f"--eval_blocks must be an integer >= 0 (0: the whole validation split); got {flags['eval_blocks']!r}")
    require(isinstance(flags["streaming"], bool), f"--streaming must be True or False; got {flags['streaming']!r}")
    require(flags["data_cache"] is None or (isinstance(flags["data_cache"], str) and flags["data_cache"] != ""),
            f"--data_cache must be a folder; got {flags['data_cache']!r}")
    require(not (flags["streaming"] and flags["tokenizer"] == "bpe"),
            "--tokenizer bpe trains on the whole train split, which a --streaming corpus never holds at once; train a "
            "tokenizer on a sample first and pass its folder as --tokenizer")
    require(not (flags["streaming"] and flags["eval_blocks"] == 0),
            "--eval_blocks 0 (the whole validation split) cannot be used with --streaming; give a number of blocks")


def resolve_device(device: str, local_rank: int, dtype: str) -> torch.device:
    """The device to train on, checked to exist and to support `dtype`, and logged with the reason.

    `--device auto` is GPU `--local_rank` (a launcher's, else $LOCAL_RANK, else 0) where CUDA is available, else
    the CPU; `cpu`, `cuda` (the same GPU as auto) and `cuda:N` choose. A `--local_rank N` given without --device
    asks for GPU N, as launchers expect.
    """
    rank = local_rank if local_rank >= 0 else int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto" and local_rank < 0 and not torch.cuda.is_available():
        logger.info("device cpu (--device auto: no CUDA GPU on this machine)")
        return torch.device("cpu")
    if device == "cpu":
        logger.info("device cpu (--device cpu)")
        return torch.device("cpu")
    index = int(device.split(":")[1]) if ":" in device else rank
    asked = f"--device {device}" if device != "auto" else f"--local_rank {local_rank}" if local_rank >= 0 else \
        "--device auto"
    if not torch.cuda.is_available():
        raise ConfigError(f"{asked} asks for GPU {index}, but this machine has no CUDA GPU; use --device cpu (or "
                          "auto) to train on the CPU")
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{asked} asks for GPU {index}, but there are only {torch.cuda.device_count()} "
                          f"(0..{torch.cuda.device_count() - 1})")
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--dtype bf16 needs an Ampere or newer GPU; {torch.cuda.get_device_name(index)} "
                          "cannot; use --dtype fp16 or fp32")
    logger.info(f"device cuda:{index} ({torch.cuda.get_device_name(index)}; {asked})")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`--dtype auto`: bf16 where `device` computes it natively, else fp32; any other value is kept.

    Native bf16 means tensor cores (Ampere or newer GPUs) or a CPU with AMX or AVX-512 BF16 (Sapphire Rapids and
    newer Xeons, Zen 4 and newer EPYCs); elsewhere bf16 is emulated and slower than fp32. fp16 is never chosen for
    you: it needs a loss scaler and can overflow.
    """
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    resolved = "bf16" if native else "fp32"
    logger.info(f"--dtype auto: {resolved} ({'native' if native else 'no native'} bf16 on {device.type})")
    return resolved


def resolve_resume_flags(flags: dict[str, Any], saved: dict[str, Any], defaults: dict[str, Any],
                         run_defining: tuple[str, ...] = RUN_DEFINING_FLAGS) -> dict[str, Any]:
    """Merge the flags of a resume with the experiment's hparams.json.

    A flag left at its default takes the saved value (so `--load_checkpoint_dir DIR` alone continues the run as it
    was last resumed: `record_flag_changes` keeps hparams.json's flags up to date). A flag given with another value
    is an error if it is one of `run_defining` (it would change the model's or the data's shape), and otherwise
    overrides the saved value (e.g. a larger --num_iterations to train further).
    """
    resolved = dict(flags)
    saved = {"positions": "learned"} | saved  # experiments from before --positions existed used learned positions
    for name, saved_value in saved.items():
        if name not in flags or name in ("checkpoint_dir", "load_checkpoint_dir"):
            continue
        if flags[name] == defaults[name] or flags[name] == saved_value:
            resolved[name] = saved_value
        elif name in run_defining:
            raise ConfigError(f"--{name} {flags[name]!r} differs from the checkpoint's {saved_value!r}; it changes the "
                              "model or data shape, so a resume must keep it (start a new experiment instead)")
        else:
            logger.info(f"resume: --{name} changed from {saved_value!r} to {flags[name]!r}")
    return resolved


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step, so the step in flight completes.

    With `at_once`, for the stretches outside the training steps (loading, the test evaluation, the export), where
    there is no step to finish and nothing to save, the signal raises `StoppedAtOnce` right away instead.
    """

    def __init__(self, at_once: bool = False):
        self.signum: int | None = None
        self.at_once = at_once
        self.previous = {}
        self.pid = os.getpid()

    def __enter__(self) -> "StopSignal":
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self.request_stop)
        return self

    def request_stop(self, signum: int, _frame: Any) -> None:
        if os.getpid() != self.pid:
            end_forked_helper(signum)
        if self.signum is not None:  # the stop is under way
            if signum == signal.SIGINT and not self.at_once:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
            return
        self.signum = signum
        if self.at_once:
            raise StoppedAtOnce(f"stopped by {signal.Signals(signum).name}", signum)
        # A raw write, not the logger: the signal may have interrupted a log call, and loguru is not re-entrant.
        os.write(sys.stderr.fileno(),
                 f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint\n".encode())

    def __exit__(self, _type: Any, error: BaseException | None, _traceback: Any) -> None:
        # A stopping run has saved what it can and only has to say so and exit; a launcher stopping the other ranks
        # SIGTERMs this one again, which must not cut that message short: SIGTERM stays ignored from here on.
        stopping = isinstance(error, TrainingInterrupted) or (self.at_once and self.signum is not None)
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_IGN if stopping and signum == signal.SIGTERM else handler)

    def interruption(self, step: int, experiment_dir: Path) -> TrainingInterrupted:
        """The error that ends the run once the checkpoint of `step` is saved; it says how to resume."""
        logger.warning(f"received {signal.Signals(self.signum).name}: stopping after the checkpoint of step {step}")
        return TrainingInterrupted(
            f"stopped by {signal.Signals(self.signum).name} after step {step}; checkpoint saved. Resume with: "
            f"{resume_command(experiment_dir)}", self.signum)


# ----------------------------------------------------------------------------------------------------------------------
# Bookkeeping: one writer per experiment, commands that work as printed, finished runs, memory and length limits.
# ----------------------------------------------------------------------------------------------------------------------

LOCK_FILE = "experiment.lock"
COMPLETED_KEY = "completed_step"  # in hparams.json: the step whose test evaluation and hf_model/ export are done


def launch_command() -> list[str]:
    """How to start this script again as it was started: `python SCRIPT`, or under a launcher with several ranks the
    launcher with as many processes (a DeepSpeed checkpoint must be resumed by as many ranks as saved it).

    The script is named as the user gave it, shortened to its file name when it is in the current directory.
    """
    script = sys.argv[0]
    if Path(script).resolve().parent == Path.cwd().resolve():
        script = Path(script).name
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return ["python", script]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size)
    nodes = world_size // per_node
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun
        return ["torchrun", f"--nnodes={nodes}" if nodes > 1 else "--standalone", f"--nproc_per_node={per_node}",
                script]
    return ["deepspeed", *([f"--num_nodes={nodes}"] if nodes > 1 else []), f"--num_gpus={per_node}", script]


def start_command() -> str:
    """The command line of this run, shell-quoted, to start it again (less the --local_rank a launcher adds)."""
    return shlex.join(launch_command() + [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank=")])


def resume_command(experiment_dir: Path) -> str:
    """The shell-quoted command that resumes `experiment_dir` (its flags come from its hparams.json)."""
    return shlex.join(launch_command() + ["--load_checkpoint_dir", str(experiment_dir)])


@contextlib.contextmanager
def experiment_lock(experiment_dir: Path) -> Iterator[None]:
    """Hold the experiment's lock for the `with` block: one writer per experiment directory.

    An OS lock (`flock`) on `experiment.lock`: the kernel drops it when its holder exits, however it exits (SIGKILL
    included), so it is never stale. Its holder's pid and host are written inside for the refusal message, and
    cleared when it is released.
    """
    path = experiment_dir / LOCK_FILE
    try:
        lock = open(path, "a+")
    except OSError as error:
        raise ConfigError(f"cannot open the lock file {path} ({error.strerror}); the experiment directory must be "
                          "writable") from error
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError(f"experiment {experiment_dir} is in use by {holder}; one run at a time may write to "
                              "an experiment: wait for it to end or stop it (it saves a checkpoint), then resume"
                              ) from None
        try:
            lock.truncate(0)
            lock.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
            lock.flush()
            yield
        finally:
            lock.truncate(0)
            fcntl.flock(lock, fcntl.LOCK_UN)


def saved_step(experiment_dir: Path) -> int | None:
    """The step of the checkpoint a resume starts from, read from the name `latest` holds (checkpoint-00000010.pt
    here, global_step10 for DeepSpeed), else from the newest checkpoint file; None if there is none."""
    pointer = experiment_dir / LATEST_POINTER
    names = [pointer.read_text().strip()] if pointer.is_file() else sorted(
        path.name for path in experiment_dir.glob(CHECKPOINT_PATTERN))
    digits = "".join(character for character in (names or [""])[-1] if character.isdigit())
    return int(digits) if digits else None


def check_resume_target(flags: dict[str, Any], step: int | None, experiment_dir: Path, completed_step: int | None
                        ) -> bool:
    """Whether the resume has anything to do: False if the run is finished (said in one line), an error if
    --num_iterations is below the checkpoint's step, True otherwise (train, or finish the test evaluation and
    export that a stop interrupted)."""
    if step is None:
        return True  # load_latest_checkpoint explains what is missing
    if flags["time_budget"] is not None:  # a budgeted run ends when its time is spent, at whatever step
        if completed_step == step:
            print(f"experiment {experiment_dir} is finished: trained for its --time_budget {flags['time_budget']} "
                  f"to step {step}, evaluated and exported to {experiment_dir / 'hf_model'}. To train further, start "
                  f"a new run with --init_from {experiment_dir / 'hf_model'}", file=sys.stderr)
            return False
        return True
    if flags["num_iterations"] < step:
        raise ConfigError(f"--num_iterations {flags['num_iterations']} is below step {step}, which the checkpoint in "
                          f"{experiment_dir} has reached; give --num_iterations {step} or more")
    if step == flags["num_iterations"] and completed_step == step:
        print(f"experiment {experiment_dir} is finished: trained to step {step} of --num_iterations {step}, "
              f"evaluated and exported to {experiment_dir / 'hf_model'}. To train further: "
              f"{resume_command(experiment_dir)} --num_iterations N (N > {step})", file=sys.stderr)
        return False
    return True


def record_flag_changes(experiment_dir: Path, flags: dict[str, Any], step: int) -> None:
    """Make hparams.json's flags the ones this resume runs with, keeping the old values in its `flag_history`.

    A plain `--load_checkpoint_dir DIR` then continues with the latest values (a run extended to 40 steps and then
    stopped continues to 40), and the history says which values trained which steps.
    """
    hparams = load_hparams(experiment_dir)
    changed = {name: {"from": hparams["flags"][name], "to": value} for name, value in flags.items()
               if name in hparams["flags"] and name not in PER_PROCESS_FLAGS and hparams["flags"][name] != value}
    if changed:
        hparams.setdefault("flag_history", []).append(
            {"from_step": step, "time": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}", "changed": changed})
        hparams["flags"] |= {name: change["to"] for name, change in changed.items()}
        atomic_write(experiment_dir / "hparams.json", lambda file: json.dump(hparams, file, indent=2), mode="w")


def mark_completed(experiment_dir: Path, step: int) -> None:
    """Record in hparams.json that the end phase (test evaluation, export) of `step` is done: a resume then says
    the run is finished instead of evaluating and exporting again."""
    hparams = load_hparams(experiment_dir)
    hparams[COMPLETED_KEY] = step
    atomic_write(experiment_dir / "hparams.json", lambda file: json.dump(hparams, file, indent=2), mode="w")


def stop_outcome(experiment_dir: Path | None, created_here: bool) -> str:
    """What a stop outside the training steps leaves, and the command to go on.

    An experiment directory this run created holds nothing a resume could use until its first checkpoint, so it is
    removed (every experiment directory that exists can be resumed) and the command to start again is given.
    """
    if experiment_dir is not None and (experiment_dir / LATEST_POINTER).is_file():
        return f"the last checkpoint in {experiment_dir} is intact. Resume with: {resume_command(experiment_dir)}"
    if experiment_dir is not None and not created_here:
        return f"{experiment_dir} is unchanged. Resume with: {resume_command(experiment_dir)}"
    if experiment_dir is not None:
        shutil.rmtree(experiment_dir, ignore_errors=True)
        return (f"nothing had been trained, so the new experiment directory {experiment_dir} was removed. Start "
                f"again with: {start_command()}")
    return f"nothing was created. Start again with: {start_command()}"


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), or the CPU allocator's failure (a RuntimeError), or Python's MemoryError."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def out_of_memory(error: BaseException, flags: dict[str, Any], phase: str, outcome: str) -> OutOfMemory:
    """The one-line error for an allocation that failed: where, which flags to lower, what was kept."""
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return OutOfMemory(
        f"out of memory {phase} ({detail}); lower --batch_size (now {flags['batch_size']}; --grad_accum_steps keeps "
        f"the effective batch) or --max_seq_length (now {flags['max_seq_length']}), or make the model smaller "
        f"(--num_layers, --h_dim, --ff_dim); {outcome}")


def estimate_step_memory(flags: dict[str, Any], attention_matrices: bool) -> tuple[int, int]:
    """A rough estimate, in bytes, of (the memory of one training step, its attention matrices' part).

    Parameters, gradients and AdamW's two moments take 16 bytes per parameter (fp32), the parameters counted
    without the vocabulary-sized embedding and head, which the estimate leaves out (so it errs low). Activations kept
    for the backward pass, per layer and token: about 10 x h_dim (attention inputs and outputs, residuals, layer
    norms) + 3 x ff_dim (the feed-forward block) numbers, plus, where the attention kernel materializes them
    (`attention_matrices`: PyTorch's CPU training path does; CUDA's flash / memory-efficient kernels do not),
    2 x num_heads x max_seq_length for the scores and probabilities, the part that grows with the square of the length:

        activations ~ batch_size x max_seq_length x num_layers x (10 h_dim + 3 ff_dim + 2 heads x max_seq_length)

    at 4 bytes a number (2 in bf16 / fp16). It is meant to catch a step that cannot fit, not to predict the peak.
    """
    h, ff, seq = flags["h_dim"], flags["ff_dim"], flags["max_seq_length"]
    parameters = flags["num_layers"] * (4 * h * h + 2 * h * ff) + (seq + 2) * h
    number_bytes = 4 if flags["dtype"] == "fp32" else 2
    tokens = flags["batch_size"] * seq * flags["num_layers"]
    attention = tokens * 2 * flags["num_heads"] * seq * number_bytes if attention_matrices else 0
    return 16 * parameters + tokens * (10 * h + 3 * ff) * number_bytes + attention, attention


def check_memory(flags: dict[str, Any], device: torch.device) -> None:
    """Fail before loading data or creating anything if one step clearly cannot fit (see `estimate_step_memory`):
    compared with the memory available now (RAM for the CPU, free memory for a GPU)."""
    import psutil

    needed, attention = estimate_step_memory(flags, attention_matrices=device.type == "cpu")
    available = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available)
    if needed > available:
        attention_part = (f" ({attention / 2**30:.1f} GiB of it attention matrices of --max_seq_length "
                          f"{flags['max_seq_length']} squared, per layer and head)" if attention else "")
        raise ConfigError(
            f"one training step needs about {needed / 2**30:.1f} GiB{attention_part}, more than the "
            f"{available / 2**30:.1f} GiB available on {device}; lower --max_seq_length or --batch_size (now "
            f"{flags['batch_size']}; --grad_accum_steps keeps the effective batch)")


def check_sequence_limits(flags: dict[str, Any]) -> None:
    """Fail before loading anything if --max_seq_length exceeds the positions of the model a tokenizer folder
    comes with (its config.json), which the tokenizer itself may not declare (roberta-base's tokenizer.json alone
    has no limit). The tokenizer's own model_max_length is checked once it is loaded (`prepare_data`)."""
    model_config = Path(flags["tokenizer"]) / "config.json"
    try:
        config = json.loads(model_config.read_text())
        positions = int(config["max_position_embeddings"])
    except (OSError, ValueError, TypeError, KeyError):
        return  # no folder, no config, or a config without a position limit
    # RoBERTa-style models number positions from pad_token_id + 1: two of their positions are never used.
    limit = positions - (config.get("pad_token_id", 1) + 1 if "roberta" in config.get("model_type", "") else 0)
    if flags["max_seq_length"] > limit:
        raise ConfigError(f"--max_seq_length {flags['max_seq_length']} is larger than the {limit} positions of the "
                          f"model that comes with --tokenizer {flags['tokenizer']!r} (max_position_embeddings "
                          f"{positions} in {model_config}); give --max_seq_length {limit} or less")


def check_resumable(experiment_dir: Path) -> None:
    """Fail before loading anything if this user cannot write what a resume appends to or replaces (e.g. the
    files belong to another user): the logs, metrics, pointer and the directories new files go into."""
    for name in (".", "tb_dir", "train.log", "metrics.jsonl", "hparams.json", LATEST_POINTER, LOCK_FILE):
        path = experiment_dir / name
        if path.exists() and not os.access(path, os.W_OK):
            info = path.stat()
            raise ConfigError(
                f"--load_checkpoint_dir {str(experiment_dir)!r} cannot be resumed by this user (uid {os.getuid()}): "
                f"{path} is not writable (owner uid {info.st_uid}, mode {info.st_mode & 0o777:o}); run as its owner "
                "or give this user write access to the experiment directory")


# ----------------------------------------------------------------------------------------------------------------------
# Hardening: a token store is checked before it is used, and rebuilt (or named) when damaged; a stop while
# tokenizing is reported once, by the main process.
# ----------------------------------------------------------------------------------------------------------------------


def end_forked_helper(signum: int) -> None:
    """End this process, a helper forked while `StopSignal` was installed, as the signal would without it.

    `datasets` tokenizes with `--num_proc` forked processes, which inherit the main process's handler: on a stop
    each of them raised StoppedAtOnce and printed its traceback (and the pool, waiting for them, raised a
    TimeoutError over the main process's own stop). A helper has nothing to save or report: it dies of the
    signal, quietly, and the main process, whose handler recorded the stop, reports it in one line whatever its
    unwinding raised (see `reported_stops`).
    """
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[OSError | None]:
    """Hold the file lock of `store` for the `with` block (see `open_token_store`); yield None.

    A cache folder where the lock cannot be created (a read-only mount of a shared cache) is no error while the
    store is there: nobody can be writing it, so it is read without the lock, and the OSError that says why is
    yielded instead, for the message should the store be damaged.
    """
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        lock = open(store.parent / f"{store.name}.lock", "w")
    except OSError as error:
        if store.is_dir():
            yield error
            return
        raise ConfigError(f"cannot create the token store folder {store.parent} ({error.strerror}); choose a "
                          "writable folder with --data_cache DIR") from error
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info(f"token store: waiting for another process (a rank, another run) preparing {store}")
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
        yield None


def checksum(data: bytes) -> str:
    """A short SHA-256 of `data`, as meta.json records it."""
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]


def store_record(store: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` with what a later run checks before trusting the store: every file's size, the checksums of the
    line-end indexes (a few MB; the tokens, a hundred times more, are checked by their size only), and a checksum
    of all that."""
    record = {**meta, "files": {path.name: path.stat().st_size for path in sorted(store.glob("*.npy"))},
              "checksums": {path.name: checksum(path.read_bytes()) for path in sorted(store.glob("*.line_ends.npy"))}}
    return {**record, "checksum": checksum(json.dumps(record, sort_keys=True).encode())}


def store_damage(store: Path) -> str | None:
    """What is wrong with the store in `store` (a missing or unreadable file, a size other than meta.json records,
    a checksum that does not match), in a few words; None if it is intact."""
    try:
        record = json.loads((store / "meta.json").read_text())
        recorded = record.pop("checksum")
        if checksum(json.dumps(record, sort_keys=True).encode()) != recorded:
            return "meta.json does not match its checksum"
        for name, size in record["files"].items():
            if not (store / name).is_file():
                return f"{name} is missing"
            if (store / name).stat().st_size != size:
                return f"{name} has {(store / name).stat().st_size:,} bytes, meta.json records {size:,}"
        for name, expected in record["checksums"].items():
            if checksum((store / name).read_bytes()) != expected:
                return f"{name} does not match its checksum"
    except OSError as error:
        return f"{Path(error.filename or 'meta.json').name} cannot be read: {error.strerror}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return "meta.json is not a token store's record (written by an older version, or damaged)"
    return None


def install_store(temporary: Path, store: Path) -> None:
    """Rename the complete store `temporary` to `store`. A damaged store there is first renamed out of the way (to a
    `.tmp.` name, which the next builder removes should this process die now), then deleted."""
    damaged = store.with_name(f"{store.name}.tmp.{os.getpid()}.damaged")
    if store.exists():
        os.rename(store, damaged)
    os.rename(temporary, store)
    shutil.rmtree(damaged, ignore_errors=True)


def damaged_store_error(store: Path, damage: str, unwritable: OSError) -> ConfigError:
    """The error for a damaged store that cannot be rebuilt where it is."""
    return ConfigError(f"token store {store} is damaged ({damage}) and cannot be rebuilt there ({unwritable.strerror}); "
                       f"delete that folder where it is writable, or choose a writable folder with --data_cache DIR")


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


def datasets_splits(raw: Any, names: tuple[str, ...]) -> Any:
    """`raw` with only the splits in `names` (a Hub dataset may have more)."""
    return type(raw)({split: raw[split] for split in raw if split in names})


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


def make_autocast(device: torch.device, dtype: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for `dtype` (a no-op context for fp32)."""
    if dtype == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest existing parent (where a missing directory would be created)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def check_disk_space(directory: Path, model: torch.nn.Module) -> None:
    """Fail before training (and before creating anything) if the disk cannot hold two checkpoints (model + 2 AdamW
    moments, fp32): a new checkpoint is written in full before the previous one is deleted."""
    needed = 2 * 3 * 4 * count_parameters(model)
    free = shutil.disk_usage(nearest_existing(directory)).free
    if free < needed:
        raise ConfigError(f"{directory} has {free / 2**20:.0f} MiB free; checkpoints of this model need about "
                          f"{needed / 2**20:.0f} MiB. Free space or choose another --checkpoint_dir")


def check_writable(directory: str, flag: str = "--checkpoint_dir") -> None:
    """Fail before loading anything if `directory` (or the parent it would be created in) is not writable.

    It tries to create (and at once deletes) a file there: `os.access` is not enough, since root passes it on a
    read-only mount or a virtual file system such as /proc.
    """
    for part in (Path(directory).absolute(), *Path(directory).absolute().parents):
        if part.is_symlink() and not part.exists():  # mkdir would fail on it after all the data loading
            raise ConfigError(f"{flag} {directory!r}: {part} is a symbolic link to {os.readlink(part)!r}, which does "
                              "not exist; create its target or choose another directory")
    path = nearest_existing(Path(directory))
    try:
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ConfigError(f"{flag} {directory!r} is not writable: {path} cannot hold new files ({error.strerror}); "
                          "choose a writable directory") from error


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


def resolve_init_from(flags: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """--init_from: the model flags and the tokenizer come from the checkpoint; a flag given must agree with it.

    A model flag left at its default takes the checkpoint's value; one given with another value is an error (the
    weights fix the shape). --dropout left at its default takes the checkpoint's dropout too.
    """
    from transformers import AutoConfig

    source = flags["init_from"]
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"could not load --init_from {source!r}: {first_line[:300]}. {offline_hint()}") from error
    learned_positions = config.model_type in ("roberta", "xlm-roberta", "camembert")
    if not learned_positions and config.model_type != "roformer":
        raise ConfigError(f"--init_from {source!r} is a {config.model_type!r} model; this script continues RoBERTa-"
                          "architecture masked LMs (roberta, xlm-roberta, camembert), RoFormer, or an hf_model/ it "
                          "exported")
    resolved = dict(flags)
    from_checkpoint = {"num_layers": config.num_hidden_layers, "num_heads": config.num_attention_heads,
                       "ff_dim": config.intermediate_size, "h_dim": config.hidden_size, "tokenizer": source,
                       "positions": "learned" if learned_positions else "rotary"}
    for name, value in from_checkpoint.items():
        if flags[name] not in (defaults[name], value):
            raise ConfigError(f"--{name} {flags[name]!r} disagrees with --init_from {source!r}, whose {name} is "
                              f"{value!r}; leave --{name} out (it comes from the checkpoint) or give {value!r}")
        resolved[name] = value
    if flags["dropout"] == defaults["dropout"]:
        resolved["dropout"] = config.hidden_dropout_prob
    # RoBERTa numbers positions from pad_token_id + 1 (see create_model); RoFormer from 0.
    limit = config.max_position_embeddings - (config.pad_token_id + 1 if learned_positions else 0)
    if flags["max_seq_length"] > limit:
        raise ConfigError(f"--max_seq_length {flags['max_seq_length']} is longer than the {limit} positions of "
                          f"--init_from {source!r}; use --max_seq_length {limit} or less")
    logger.info(f"init_from {source}: " + ", ".join(f"{name} {resolved[name]}" for name in (*from_checkpoint, "dropout")))
    return resolved


def load_hparams(experiment_dir: Path) -> dict[str, Any]:
    """An experiment's hparams.json (its resolved flags first); an error if the folder is not an experiment."""
    hparams_path = experiment_dir / "hparams.json"
    if not experiment_dir.is_dir():
        raise ConfigError(f"--load_checkpoint_dir {str(experiment_dir)!r} does not exist; give a bert_pretrain.* "
                          "folder made by --checkpoint_dir")
    if not hparams_path.is_file():
        raise ConfigError(f"--load_checkpoint_dir {str(experiment_dir)!r} is not an experiment directory "
                          "(no hparams.json); give a bert_pretrain.* folder made by --checkpoint_dir")
    try:
        hparams = json.loads(hparams_path.read_text())
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{hparams_path} cannot be read as JSON ({error}); it is written by --checkpoint_dir runs: "
                          "restore it from a backup or start a new experiment") from error
    if not isinstance(hparams, dict) or not isinstance(hparams.get("flags"), dict):
        raise ConfigError(f"{hparams_path} has no \"flags\" object (it holds {json.dumps(hparams)[:100]}); it is "
                          "written by --checkpoint_dir runs: restore it from a backup or start a new experiment")
    return hparams


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
            chosen, auto_size_note = choose_shape_for_budget(flags, data.tokenizer, device, auto_size_keeping)
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

        check_disk_space(Path(flags["checkpoint_dir"] or flags["load_checkpoint_dir"]), model)
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


@dataclasses.dataclass
class RunProgress:
    """How far a run got, for the message of a stop outside the training steps (see `reported_stops`)."""

    experiment_dir: Path | None  # None until a new experiment's directory exists
    created: bool = False  # this run created experiment_dir
    started: bool = False  # the training loop was entered
    budget: TimeBudget | None = None  # a --time_budget run's budget: it knows when training has ended


@contextlib.contextmanager
def reported_stops(flags: dict[str, Any], progress: RunProgress) -> Iterator[None]:
    """Report every stop of the `with` block like the training loop's: one message, the last checkpoint kept.

    SIGTERM/SIGINT outside the training steps (loading data, the test evaluation, the export) stop at once (the
    training loop's own handler finishes its step and saves instead). Running out of memory anywhere becomes one
    line naming the flags to lower. Either way a new experiment directory without a checkpoint is removed (see
    `stop_outcome`).
    """
    stop = StopSignal(at_once=True)
    try:
        with stop:
            yield
    except BaseException as error:
        if stop.signum is not None:  # StoppedAtOnce, or what a library's cleanup raised over it (see end_forked_helper)
            phase = run_phase(flags, progress)
            raise TrainingInterrupted(f"stopped by {signal.Signals(stop.signum).name} {phase}; "
                                      f"{stop_outcome(progress.experiment_dir, progress.created)}", stop.signum) from None
        if not isinstance(error, (RuntimeError, MemoryError)) or not is_out_of_memory(error):
            raise
        phase = run_phase(flags, progress)
        raise out_of_memory(error, flags, phase, stop_outcome(progress.experiment_dir, progress.created)) from None


def run_phase(flags: dict[str, Any], progress: RunProgress) -> str:
    """Where the run was, in words: before training, during it, or in the end phase after the last step."""
    if not progress.started:
        return "before the first step" if progress.created or progress.experiment_dir is None else \
            "before training resumed"
    if progress.budget is not None:  # a budgeted run ends at whatever step its time runs out
        training_ended = progress.budget.training_ended
    else:
        training_ended = (progress.experiment_dir / LATEST_POINTER).is_file() and \
            saved_step(progress.experiment_dir) == flags["num_iterations"]
    if training_ended:
        return ("after the last step, during the test evaluation or the hf_model export (a resume does only "
                "those)")
    return "during training"


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


def nonfinite_error(what: str, experiment_dir: Path) -> NonFiniteLossError:
    """The error for a NaN/inf: what happened, that the last good checkpoint is kept, and how to go on from it."""
    if (experiment_dir / LATEST_POINTER).is_file():
        kept = f"the last good checkpoint in {experiment_dir} is intact"
        go_on = f"then resume with --load_checkpoint_dir {experiment_dir}"
    else:
        kept, go_on = "no checkpoint had been saved yet", "then start again"
    return NonFiniteLossError(f"{what}; stopped without saving: {kept}. Lower --lr, raise --warmup_steps, keep "
                              f"--grad_clip on or use --dtype fp32, {go_on}")


def raise_if_weights_nonfinite(model: torch.nn.Module, step: int, experiment_dir: Path) -> None:
    """Refuse to save NaN/inf weights. A finite loss at a step does not prove them finite: the update that follows
    it can still overflow (a huge lr) or spread an inf gradient. One device->host sync, at checkpoint steps only."""
    if not bool(torch.stack([torch.isfinite(parameter).all() for parameter in model.parameters()]).all()):
        raise nonfinite_error(f"the model's weights became non-finite (NaN or inf) by step {step}", experiment_dir)


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
        self.predicted += (masked_labels != IGNORE_INDEX).sum()
        self.first_nonfinite_step = torch.where(
            (self.first_nonfinite_step < 0) & ~torch.isfinite(loss.detach()), step, self.first_nonfinite_step)
        self.micro_batches += 1

    def raise_if_nonfinite(self, experiment_dir: Path) -> None:
        """Stop before anything from a bad step is logged or saved."""
        bad_step = int(self.first_nonfinite_step)
        if self.check_finite and bad_step >= 0:
            raise nonfinite_error(f"the loss became non-finite (NaN or inf) at step {bad_step}", experiment_dir)

    def record(self, step: int, lr: float, grad_norm: float | None, flags: dict[str, Any],
               model_config: "transformers.PretrainedConfig", device: torch.device, num_ranks: int = 1
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
            "step": step, "loss": float(self.loss) / steps, "lr": lr, "grad_norm": grad_norm,
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
        measure_end_of_run(budget, model, validation, data, flags, device, autocast)
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


def time_evaluation_batch(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                          autocast: Callable[[], contextlib.AbstractContextManager]) -> float:
    """Seconds one evaluation batch takes now: the fastest of `batches`, so a one-off delay does not count."""
    times = []
    for batch in batches:
        start = time.perf_counter()
        float(evaluate(model, [batch], device, autocast)[0])  # waits for the device
        times.append(time.perf_counter() - start)
    return min(times)


def measure_end_of_run(budget: TimeBudget, model: torch.nn.Module, validation: list[dict[str, torch.Tensor]],
                       data: PreparedData, flags: dict[str, Any], device: torch.device,
                       autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Time what the end of a budgeted run costs, then start its clock: an evaluation batch and an in-memory save of
    a checkpoint-sized state (the weights and AdamW's two moments). `TimeBudget.reserve_s` multiplies them out;
    they are timed again once the first steps are done, and the real ones replace them later."""
    budget.validation_batches = len(validation)
    budget.all_test_batches = 0 if data.test_blocks is None else math.ceil(len(data.test_blocks) / flags["batch_size"])
    start = time.perf_counter()
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    torch.save({"model": state, "moments": [state, state]}, io.BytesIO())
    budget.checkpoint_s = time.perf_counter() - start
    budget.set_evaluation_batch_s(time_evaluation_batch(model, validation[:2], device, autocast))
    budget.start()
    logger.info(f"time budget {budget.total_s:.0f} s ({budget.spent_before_s:.0f} s spent before): training stops "
                f"{budget.reserve_s():.1f} s before the end, kept for the last evaluation, checkpoint and export "
                "(timed again after the first steps)")
    if budget.reserve_s() > 0.25 * (budget.total_s - budget.spent_before_s):
        logger.warning(f"the end of the run needs about {budget.reserve_s():.0f} s of the {budget.total_s:.0f} s budget "
                       f"(evaluating {budget.validation_batches} validation batches at {budget.evaluation_batch_s:.2f} s "
                       "each, a checkpoint, the export): lower --eval_blocks or raise --time_budget")
    if flags["compile"] and budget.total_s < 120:
        logger.warning(f"--time_budget {budget.total_s:.0f} s with --compile True: the first step compiles the model, "
                       "which can take a minute; it counts as spent, so a budget this short may train few steps "
                       "(--compile False for short runs)")


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


def check_command_line(argv: list[str], function: Callable) -> None:
    """Reject unknown flags and stray positional values before fire runs anything.

    fire would otherwise run the whole training first and complain about an unknown `--flag` afterwards, or bind a
    stray value to the first positional parameter.
    """
    known = set(inspect.signature(function).parameters)
    expecting_value = False
    for arg in argv:
        if arg == "--":
            return
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            bare = name[2:] if name.startswith("no") and name[2:] in known else name
            if bare not in known:
                raise ConfigError(f"unknown flag --{name}; see --help for the flags")
            expecting_value = "=" not in arg and bare == name
        elif expecting_value:
            expecting_value = False
        elif arg.startswith("-"):  # fire would read "-x" as the one flag starting with x (-h as --h_dim)
            raise ConfigError(f"unknown flag {arg}: flags are spelled out in full (--name value); see --help")
        else:
            raise ConfigError(f"unexpected value {arg!r}: every setting is a --flag (see --help)")


def help_text(function: Callable, program: str) -> str:
    """`--help`: the docstring's summary and description, then each flag with its type, default and meaning.

    Written here rather than by fire, whose help opens a pager, names types as `Optional['str | None']` and offers
    one-letter abbreviations (-t for --tokenizer) that collide as flags are added.
    """
    import textwrap

    from fire import docstrings

    doc = docstrings.parse(inspect.getdoc(function))
    meanings = {arg.name: arg.description for arg in doc.args or []}
    lines = [f"{program}: {doc.summary}", "", doc.description or "", "", "Flags:"]
    for name, parameter in inspect.signature(function).parameters.items():
        # The annotation as written (a string under `from __future__ import annotations`), also for the flags
        # train_bert_ds.py inherits, whose annotations live in this module.
        default = "required" if parameter.default is inspect.Parameter.empty else f"default: {parameter.default!r}"
        lines.append(f"  --{name} {parameter.annotation}  ({default})")
        lines += textwrap.wrap(meanings.get(name, ""), width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def main(function: Callable = None) -> None:
    """Run `function` (default: train) as a fire CLI; turn the errors users cause into one line and an exit code."""
    import fire

    function = function or train
    console_logging()  # the lines before an experiment's logs start (data preparation) look like the rest
    arguments = sys.argv[1:]
    if any(arg in ("-h", "--help") for arg in arguments[:arguments.index("--") if "--" in arguments else None]):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--help | head` ends quietly
        print(help_text(function, f"python {Path(sys.argv[0]).name}"))
        return
    # Under a launcher every rank runs this. Errors that all ranks share (a bad flag, a stop they agreed on) are
    # printed by rank 0 alone; errors only one rank knows (its save failed, its peer died) by that rank.
    other_rank = os.environ.get("RANK", "0") != "0"

    def report(message: str, shared: bool, exit_code: int) -> None:
        if not (shared and other_rank):
            print(message, file=sys.stderr)
        sys.exit(exit_code)

    try:
        check_command_line(arguments, function)
        fire.Fire(function)
    except ConfigError as error:
        report(f"error: {error}", shared=True, exit_code=2)
    except NonFiniteLossError as error:
        report(f"error: {error}", shared=True, exit_code=1)
    except (CheckpointError, OutOfMemory) as error:
        report(f"error: {error}", shared=False, exit_code=1)
    except TrainingInterrupted as error:
        report(str(error), shared=True, exit_code=128 + error.signum)
    except KeyboardInterrupt:  # a second Ctrl-C
        report("error: interrupted by Ctrl-C without saving; a run resumes from its last checkpoint with "
               "--load_checkpoint_dir EXPERIMENT_DIR", shared=True, exit_code=128 + signal.SIGINT)


if __name__ == "__main__":
    main()

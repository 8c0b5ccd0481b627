"""The token store: each split tokenized once into a flat, memory-mapped token array, shared by runs."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from loguru import logger

from pretraining.corpus import block_framing_ids, datasets_splits, load_text_dataset, text_files
from pretraining.errors import ConfigError

if TYPE_CHECKING:
    import datasets
    import transformers


def tokenize_lines(
    split: "datasets.Dataset",
    tokenizer: "transformers.PreTrainedTokenizerBase",
    num_proc: int = 1,
    cache_file_name: str | None = None,
) -> "datasets.Dataset":
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

    return split.map(
        tokenize_batch,
        batched=True,
        remove_columns=split.column_names,
        desc="tokenizing",
        num_proc=num_proc if num_proc > 1 else None,
        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
        cache_file_name=cache_file_name,
        new_fingerprint=uuid.uuid4().hex,
    )


STORE_FORMAT_VERSION = 2  # bump when the files of a token store change meaning: old stores are then not reused
# (2: .txt lines keep their line ends)


LINES_PER_PROCESS = 10_000  # below this many lines per process, starting processes costs more than it saves


def tokenizer_fingerprint(tokenizer: "transformers.PreTrainedTokenizerBase") -> str:
    """A hash of everything that decides the token ids: vocabulary, merges, normalisation, special tokens."""
    import hashlib

    if tokenizer.is_fast:
        description = tokenizer.backend_tokenizer.to_str()
    else:
        description = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    return hashlib.sha256(f"{description}|{block_framing_ids(tokenizer)}".encode()).hexdigest()[:16]


def corpus_sources(dataset: str, dataset_config: str | None) -> tuple[dict[str, Any], "datasets.DatasetDict | None"]:
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

    key = json.dumps(
        {"format": STORE_FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer), "sources": sources}
    )
    root = Path(data_cache) if data_cache else Path(datasets.config.HF_DATASETS_CACHE) / "token_stores"
    return root / hashlib.sha256(key.encode()).hexdigest()[:20]


def write_npy(path: Path, dtype: np.dtype, length: int, chunks: Iterator[np.ndarray]) -> None:
    """Write a 1-D .npy file of `length` items from `chunks`, with plain writes (a write to a full disk raises
    ENOSPC, where writing through a memory map would kill the process with SIGBUS), and fsync it."""
    written = 0
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(
            file, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)}
        )
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
    write_npy(
        directory / f"{split}.tokens.npy", dtype, num_tokens, (ids.flatten().to_numpy() for ids in arrow_batches())
    )
    write_npy(directory / f"{split}.line_ends.npy", np.int64, num_lines, line_ends())
    return {"tokens": num_tokens, "lines": num_lines}


def build_token_store(raw: "datasets.DatasetDict", tokenizer: Any, store: Path, num_proc: int) -> None:
    """Tokenize every split into `store`, all or nothing: it is written under a temporary name and renamed when
    complete, so a run killed or stopped by a full disk leaves no store that a later run would use."""
    # Checked before any tokenizing process starts: a disk that fills up under `datasets`' process pool can leave the
    # pool waiting forever for a worker that died (it replaces the worker while terminating). The store takes at least
    # about the text's size (a token id per 2-5 characters, in int32 while tokenizing).
    needed, free = sum(raw[split].data.nbytes for split in raw), shutil.disk_usage(store.parent).free
    if free < needed:
        raise ConfigError(
            f"could not write the token store in {store.parent} (No space left on device: it needs about "
            f"{needed / 2**20:.1f} MiB, the size of the text, and {free / 2**20:.1f} MiB are free); nothing was kept. "
            "Free space there or choose another folder with --data_cache DIR"
        )
    temporary = store.with_name(f"{store.name}.tmp.{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
        splits = {}
        for split in raw:
            processes = max(1, min(num_proc, len(raw[split]) // LINES_PER_PROCESS))
            logger.info(
                f"token store: tokenizing the {split} split ({len(raw[split])} lines, {processes} "
                f"process{'es' if processes > 1 else ''})"
            )
            token_lines = tokenize_lines(raw[split], tokenizer, processes, str(temporary / f"{split}.arrow"))
            splits[split] = {**write_token_split(token_lines, temporary, split, dtype), "rows": len(raw[split])}
            for cache_file in token_lines.cache_files:  # the flat arrays replace them
                os.remove(cache_file["filename"])
        meta = {
            "format": STORE_FORMAT_VERSION,
            "dtype": np.dtype(dtype).name,
            "vocab_size": len(tokenizer),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "splits": splits,
        }
        (temporary / "meta.json").write_text(json.dumps(store_record(temporary, meta), indent=2))
        install_store(temporary, store)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            raise ConfigError(
                f"could not write the token store in {store.parent} ({error.strerror or error}); nothing "
                "was kept. Free space there or choose another folder with --data_cache DIR"
            ) from error
        raise


def open_token_store(
    dataset: str,
    dataset_config: str | None,
    tokenizer: Any,
    data_cache: str | None,
    num_proc: int,
    raw: "datasets.DatasetDict | None" = None,
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
            if raw is None:
                raw = loaded if loaded is not None else load_text_dataset(dataset, dataset_config)
            build_token_store(datasets_splits(raw, ("train", "validation", "test")), tokenizer, store, num_proc)
            logger.info(f"token store: wrote {store}")
    meta = json.loads((store / "meta.json").read_text())
    return {split: np.load(store / f"{split}.tokens.npy", mmap_mode="r") for split in meta["splits"]}, meta


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
        raise ConfigError(
            f"cannot create the token store folder {store.parent} ({error.strerror}); choose a "
            "writable folder with --data_cache DIR"
        ) from error
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
    record = {
        **meta,
        "files": {path.name: path.stat().st_size for path in sorted(store.glob("*.npy"))},
        "checksums": {path.name: checksum(path.read_bytes()) for path in sorted(store.glob("*.line_ends.npy"))},
    }
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
    return ConfigError(
        f"token store {store} is damaged ({damage}) and cannot be rebuilt there "
        f"({unwritable.strerror}); delete that folder where it is writable, or choose a writable folder "
        "with --data_cache DIR"
    )


class PackedBlocks:
    """Blocks of `max_seq_length` tokens cut from a flat token array when asked for: `<s>`, the next
    `max_seq_length - 2` tokens of the split, `</s>`.

    Concatenating the whole split (not each `map` batch, as HF's `group_texts` does) loses only the final partial
    block, fewer than `max_seq_length - 2` tokens, and no block needs padding, so every token trains. Nothing is
    materialised: `blocks[rows]` reads just those rows from the store file (or the array) and returns an int32
    tensor [len(rows), max_seq_length], so any --max_seq_length reuses the same store. `rows` selects a subset.
    """

    def __init__(
        self, tokens: np.ndarray, start_id: int, end_id: int, max_seq_length: int, rows: np.ndarray | None = None
    ):
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

    def token_sample(self, max_tokens: int = 2**20) -> np.ndarray:
        """The first `max_tokens` tokens of the split: enough to count how common each token is."""
        return np.asarray(self.tokens[:max_tokens])

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
        return PackedBlocks(
            self.tokens, self.start_id, self.end_id, self.max_seq_length, rows if self.rows is None else self.rows[rows]
        )

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

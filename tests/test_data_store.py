"""The data path on disk: the token store (written once, atomically, reused by any run), streaming, several ranks,
and the errors a bad corpus gets.

Run: python -m pytest -q tests/test_data_store.py
"""

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_bert
from conftest import ROOT, TINY_MODEL_FLAGS, cli_args, run_cli, write_corpus
from conftest import small_disk as conftest_small_disk
from pretraining import errors, logs, safeguards, streaming, token_store
from pretraining.corpus import load_text_dataset, load_tokenizer, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """Enough lines (24,000) that tokenizing uses 2 processes and takes long enough to be interrupted."""
    return write_corpus(
        tmp_path_factory.mktemp("big_corpus"), seed=1, lines={"train": 24_000, "validation": 400, "test": 400}
    )


def reference_stream(texts: list[str], tokenizer) -> np.ndarray:
    """The token stream written the plainest way: each non-empty line's ids and </s>, one after the other."""
    ids = []
    for text in texts:
        if text.strip():
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.array(ids)


def reference_blocks(stream: np.ndarray, tokenizer, max_seq_length: int) -> torch.Tensor:
    body = max_seq_length - 2
    rows = [
        [tokenizer.bos_token_id, *stream[i : i + body], tokenizer.eos_token_id]
        for i in range(0, len(stream) - body + 1, body)
    ]
    return torch.tensor(rows, dtype=torch.int32)


class CallCounter:
    """Counts the calls of a function of `module`, made from within that module."""

    def __init__(self, monkeypatch, module, name: str):
        self.calls = 0
        original = getattr(module, name)

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)


def data_flags(tiny_flags: dict, tmp_path: Path, **changes) -> dict:
    """The flags prepare_data reads, for the tiny corpus, with the store under tmp_path."""
    defaults = {name: parameter.default for name, parameter in inspect.signature(train_bert.train).parameters.items()}
    return {**defaults, **tiny_flags, "dataset_config": None, "data_cache": str(tmp_path / "stores"), **changes}


# --------------------------------------------------------------------------------------------------------------------
# The token store.
# --------------------------------------------------------------------------------------------------------------------


def test_store_is_written_once_and_any_max_seq_length_reuses_it(tiny_flags, tokenizer, tmp_path, monkeypatch):
    """The first run tokenizes its 3 splits; later runs, at another --max_seq_length too, tokenize nothing and do
    not even load the text."""
    counter, loads = (
        CallCounter(monkeypatch, token_store, "tokenize_lines"),
        CallCounter(monkeypatch, token_store, "load_text_dataset"),
    )
    first = train_bert.prepare_data(data_flags(tiny_flags, tmp_path, max_seq_length=32))
    assert counter.calls == 3 and loads.calls == 1
    stores = [path for path in (tmp_path / "stores").iterdir() if path.is_dir()]
    assert len(stores) == 1 and not list(stores[0].glob("*.arrow*")), "one store, Arrow files removed once written"
    second = train_bert.prepare_data(data_flags(tiny_flags, tmp_path, max_seq_length=64))
    assert counter.calls == 3 and loads.calls == 1, "a prepared corpus must not be loaded or tokenized again"
    assert [path for path in (tmp_path / "stores").iterdir() if path.is_dir()] == stores

    raw = load_text_dataset(tiny_flags["dataset"], None)
    stream = reference_stream(raw["train"]["text"], tokenizer)
    for data, length in ((first, 32), (second, 64)):
        assert isinstance(data.train_blocks.tokens, np.memmap) and data.train_blocks.tokens.dtype == np.uint16
        assert torch.equal(data.train_blocks[:], reference_blocks(stream, tokenizer, length))


def test_store_keeps_every_token_and_line_boundary_with_any_number_of_processes(big_corpus, tokenizer, tmp_path):
    """1 or 2 tokenizing processes write byte-identical files: the reference stream, no token lost or added,
    every line's end recorded; blocks lose only the final partial one."""
    raw = load_text_dataset(str(big_corpus), None)
    token_store.open_token_store(str(big_corpus), None, tokenizer, str(tmp_path / "one"), num_proc=1)
    token_store.open_token_store(str(big_corpus), None, tokenizer, str(tmp_path / "two"), num_proc=2)
    [one], [two] = ([path for path in (tmp_path / name).iterdir() if path.is_dir()] for name in ("one", "two"))
    for file in ("train.tokens.npy", "train.line_ends.npy", "validation.tokens.npy", "test.line_ends.npy"):
        assert (one / file).read_bytes() == (two / file).read_bytes(), file

    texts = raw["train"]["text"]
    stream = reference_stream(texts, tokenizer)
    tokens = np.load(two / "train.tokens.npy", mmap_mode="r")
    assert np.array_equal(tokens, stream)
    line_ends = np.load(two / "train.line_ends.npy")
    assert len(line_ends) == sum(1 for text in texts if text.strip()) and line_ends[-1] == len(stream)
    assert (tokens[line_ends - 1] == tokenizer.eos_token_id).all()
    meta = json.loads((two / "meta.json").read_text())
    assert meta["splits"]["train"] == {"tokens": len(stream), "lines": len(line_ends), "rows": len(texts)}
    assert meta["dtype"] == "uint16"

    blocks = train_bert.pack_blocks(tokens, tokenizer, 48)
    assert len(blocks) == len(stream) // 46 and len(stream) - 46 * len(blocks) < 46
    rows = torch.tensor([0, 7, len(blocks) - 1])
    assert torch.equal(blocks[rows], reference_blocks(stream, tokenizer, 48)[rows])


def test_store_follows_the_data_and_the_tokenizer(tiny_corpus, tokenizer, tiny_tokenizer, tmp_path):
    """Another corpus or another tokenizer gets another store; the same tokenizer saved and reloaded (as a resume and
    every rank but the first load it) finds the same one."""
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)

    def store_of(dataset, tokenizer):
        return token_store.token_store_dir(token_store.corpus_sources(str(dataset), None)[0], tokenizer, str(tmp_path))

    store = store_of(corpus, tokenizer)
    tokenizer.save_pretrained(tmp_path / "saved")
    assert store_of(corpus, AutoTokenizer.from_pretrained(tmp_path / "saved")) == store
    assert store_of(corpus, tokenizer) == store

    raw = load_text_dataset(str(corpus), None)
    assert store_of(corpus, train_bpe_tokenizer(raw["train"], vocab_size=300)) != store
    assert store_of(corpus / "train.txt", tokenizer) != store, "one file is split otherwise: another corpus"
    lines = (corpus / "train.txt").read_text().splitlines()
    (corpus / "train.txt").write_text("\n".join(lines[:-2] + [lines[-1], lines[-2]]) + "\n")  # same size, new order
    assert store_of(corpus, tokenizer) != store


def test_a_killed_write_is_never_used(big_corpus, tiny_tokenizer, tokenizer, tmp_path):
    """SIGKILL while the store is being written: no store appears; the next run cleans up and builds a correct one."""
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pretraining import token_store\n"
        f"from transformers import AutoTokenizer\n"
        f"token_store.open_token_store({str(big_corpus)!r}, None, "
        f"AutoTokenizer.from_pretrained({str(tiny_tokenizer)!r}), {str(tmp_path)!r}, 1)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("*.tmp.*/*")):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert [path.name for path in tmp_path.iterdir() if path.is_dir() and ".tmp." not in path.name] == []

    raw = load_text_dataset(str(big_corpus), None)
    tokens, _ = token_store.open_token_store(str(big_corpus), None, tokenizer, str(tmp_path), 1)
    assert not list(tmp_path.glob("*.tmp.*")), "the killed writer's leftovers are removed"
    assert np.array_equal(tokens["train"], reference_stream(raw["train"]["text"], tokenizer))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs that fills up for real."""
    with conftest_small_disk(tmp_path / "small_disk", "1m") as mount_point:
        yield mount_point


def test_a_full_disk_is_one_clear_error_and_leaves_no_store(tiny_flags, big_corpus, small_disk, tmp_path):
    result = run_cli(
        "train_bert.py", {**tiny_flags, "dataset": str(big_corpus), "data_cache": str(small_disk), "num_proc": 2}
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not write the token store" in errors[0] and "No space left" in errors[0]
    assert "--data_cache" in errors[0] and "Traceback" not in result.stderr
    assert [path.name for path in small_disk.iterdir()] == [path.name for path in small_disk.glob("*.lock")]
    assert not (tmp_path / "experiments").exists()


# --------------------------------------------------------------------------------------------------------------------
# A damaged store is rebuilt, or named; a stop while tokenizing is one line.
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_store(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """The folder of token stores a 1-step CLI run on the tiny corpus wrote; tests damage copies of it."""
    root = tmp_path_factory.mktemp("built_store")
    result = run_cli(
        "train_bert.py",
        {
            "dataset": str(tiny_corpus),
            "tokenizer": str(tiny_tokenizer),
            **TINY_MODEL_FLAGS,
            "num_iterations": 1,
            "checkpoint_dir": root / "experiments",
            "data_cache": root / "stores",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "stores"


def the_store(stores: Path) -> Path:
    """The one token store in a --data_cache folder."""
    [store] = [path for path in stores.iterdir() if path.is_dir()]
    return store


STORE_DAMAGE = {
    "truncated_tokens": ("train.tokens.npy", lambda path: os.truncate(path, path.stat().st_size // 2)),
    "missing_tokens": ("train.tokens.npy", lambda path: path.unlink()),
    "index_of_the_wrong_size": ("validation.line_ends.npy", lambda path: os.truncate(path, path.stat().st_size - 8)),
    "index_rewritten_same_size": (
        "train.line_ends.npy",
        lambda path: path.write_bytes(path.read_bytes()[:-16] + bytes(16)),
    ),
}


@pytest.mark.parametrize("case", STORE_DAMAGE)
def test_a_damaged_store_is_named_and_rebuilt(tiny_flags, built_store, tmp_path, case):
    """Damage one file of a store for real: the next CLI run says which file is wrong, rebuilds the store in
    place (the same bytes as the intact one, no leftovers) and trains, with no traceback."""
    stores = Path(shutil.copytree(built_store, tmp_path / "stores"))
    intact = {path.name: path.read_bytes() for path in the_store(built_store).iterdir()}
    file, damage = STORE_DAMAGE[case]
    damage(the_store(stores) / file)

    result = run_cli("train_bert.py", {**tiny_flags, "num_iterations": 1, "data_cache": stores})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [warning] = [line for line in result.stderr.splitlines() if "is damaged" in line]
    assert str(the_store(stores)) in warning and file in warning and "rebuilding it" in warning, warning
    assert {path.name: path.read_bytes() for path in the_store(stores).iterdir()} == intact
    assert sorted(path.name for path in stores.iterdir()) == sorted(path.name for path in built_store.iterdir())


def test_a_damaged_store_in_a_read_only_cache_is_one_line_naming_the_folder(tiny_flags, built_store, tmp_path):
    """A read-only --data_cache: an intact store is used as it is; a damaged one cannot be rebuilt, so the run stops
    with one line naming the folder to delete, exit 2, nothing created."""
    with conftest_small_disk(tmp_path / "cache", "4m") as cache:
        shutil.copytree(built_store, cache, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
        intact = run_cli("train_bert.py", {**tiny_flags, "num_iterations": 1, "data_cache": cache})
        assert intact.returncode == 0 and "token store: reusing" in intact.stderr, intact.stderr[-3000:]

        subprocess.run(["mount", "-o", "remount,rw", str(cache)], check=True)
        os.truncate(the_store(cache) / "train.tokens.npy", 100)
        subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
        shutil.rmtree(tmp_path / "experiments")
        error = one_error_line(run_cli("train_bert.py", {**tiny_flags, "num_iterations": 1, "data_cache": cache}))
        assert all(piece in error for piece in (str(the_store(cache)), "train.tokens.npy", "delete")), error
        assert not (tmp_path / "experiments").exists()


@pytest.fixture(scope="module")
def large_corpus(tmp_path_factory) -> Path:
    """Enough lines (200,000) that 2 processes take seconds to tokenize the train split: a signal lands mid-way."""
    return write_corpus(
        tmp_path_factory.mktemp("large_corpus"), seed=2, lines={"train": 200_000, "validation": 400, "test": 400}
    )


def test_sigterm_while_two_processes_tokenize_is_one_line(tiny_flags, large_corpus, tmp_path):
    """SIGTERM to the CLI while its 2 tokenizing processes work on the train split: the processes end quietly, the
    run prints the one stop line of the README, exit 143; no store, no temporary folder, no experiment is left."""
    stores = tmp_path / "stores"
    log = tmp_path / "run.log"
    flags = {**tiny_flags, "dataset": str(large_corpus), "data_cache": stores, "num_proc": 2, "num_iterations": 1}
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "train_bert.py"), *cli_args(flags)],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not list(stores.glob("*.tmp.*/*")):  # the tokenizing processes have started writing the train split
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.002)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = log.read_text()
    assert "Traceback" not in output and "StoppedAtOnce" not in output, output[-3000:]
    assert "stopped by SIGTERM before the first step; nothing was created. Start again with: " in output, output[-3000:]
    assert [path.name for path in stores.iterdir()] == [path.name for path in stores.glob("*.lock")]
    assert not (tmp_path / "experiments").exists()


# --------------------------------------------------------------------------------------------------------------------
# Training on the store: resume, evaluation subset.
# --------------------------------------------------------------------------------------------------------------------


def metric_records(experiment_dir, key: str) -> list[dict]:
    lines = (Path(experiment_dir) / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if key in record]


def interrupted_copy(experiment: Path, step: int, destination: Path) -> Path:
    """The experiment as it stood after `step`: later checkpoints, the export and later metrics removed."""
    copy = destination / experiment.name
    shutil.copytree(experiment, copy)
    for path in copy.glob(safeguards.CHECKPOINT_PATTERN):
        if int(path.stem.split("-")[1]) > step:
            path.unlink()
    shutil.rmtree(copy / "hf_model", ignore_errors=True)
    (copy / "latest").write_text(train_bert.checkpoint_path(copy, step).name)
    logs.drop_lines_after_step(copy / "metrics.jsonl", step)
    return copy


def test_resume_on_a_rebuilt_store_is_bit_exact(tiny_flags, tmp_path):
    """Interrupted at step 6, resumed with the store deleted and rebuilt by 2 processes: the losses and final
    weights equal the uninterrupted 12-step run's bit for bit (CPU, fp32)."""
    flags = {
        **tiny_flags,
        "num_iterations": 12,
        "checkpoint_every": 6,
        "log_every": 1,
        "eval_every": 6,
        "data_cache": str(tmp_path / "stores"),
        "num_proc": 1,
    }
    full = Path(train_bert.train(**flags))
    resumed = interrupted_copy(full, 6, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "stores")
    train_bert.train(load_checkpoint_dir=str(resumed), num_proc=2, data_cache=str(tmp_path / "other_stores"))
    assert [r["loss"] for r in metric_records(resumed, "loss")] == [r["loss"] for r in metric_records(full, "loss")]
    assert metric_records(resumed, "eval_loss") == metric_records(full, "eval_loss")
    final, final_resumed = (
        torch.load(d / "checkpoint-00000012.pt", weights_only=True)["model"] for d in (full, resumed)
    )
    assert all(torch.equal(tensor, final_resumed[name]) for name, tensor in final.items())


def test_eval_blocks_is_a_fixed_seeded_subset(tiny_flags, tmp_path):
    """--eval_blocks N: N distinct validation blocks, the same for a seed, others for another; 0 is the whole split."""
    whole = train_bert.prepare_data(data_flags(tiny_flags, tmp_path, eval_blocks=0)).validation_blocks
    subsets = [
        train_bert.prepare_data(data_flags(tiny_flags, tmp_path, eval_blocks=10, seed=seed)).validation_blocks
        for seed in (0, 0, 1)
    ]
    assert len(whole) > 10 and all(len(subset) == 10 for subset in subsets)
    assert np.array_equal(subsets[0].rows, subsets[1].rows) and not np.array_equal(subsets[0].rows, subsets[2].rows)
    assert len(set(subsets[0].rows)) == 10 and torch.equal(subsets[0][:], whole[subsets[0].rows])
    masking = train_bert.MaskingConfig(load_tokenizer(tiny_flags["tokenizer"]), 0.15, 0.1, 0.1)
    batches = train_bert.EvalBatches(subsets[0], 4, 0, masking)
    assert len(batches) == 3 and [len(batch["input_ids"]) for batch in batches] == [4, 4, 2]
    shard = batches[1::2]  # a rank's share keeps the masks of the whole
    assert all(torch.equal(shard[0][key], batches[1][key]) for key in shard[0])


# --------------------------------------------------------------------------------------------------------------------
# Streaming.
# --------------------------------------------------------------------------------------------------------------------


def test_a_stream_packs_like_the_store_and_resumes_exactly_where_it_stopped(tiny_corpus, tokenizer, tmp_path):
    """Streamed blocks equal the store's, in order; from any saved position the stream goes on with the very blocks
    that followed it, across the end of the file (the next epoch starts over)."""
    raw = load_text_dataset(str(tiny_corpus), None, streaming=True)
    stream = streaming.BlockStream(raw["train"], tokenizer, 32)
    tokens, _ = token_store.open_token_store(str(tiny_corpus), None, tokenizer, str(tmp_path), 1)
    stored = train_bert.pack_blocks(tokens["train"], tokenizer, 32)
    blocks = stream.blocks(stream.first_position)
    walked = [next(blocks) for _ in range(len(stored) + 20)]  # past the end of the file
    assert torch.equal(torch.stack([block for block, _ in walked[: len(stored)]]), stored[:])
    assert walked[-1][1][0] == 1, "the stream went on into epoch 1"
    for k in (0, 1, 17, len(stored) - 1, len(stored) + 3):
        position = json.loads(json.dumps(walked[k][1]))  # as a checkpoint stores it
        resumed = stream.blocks(tuple(position))
        for expected, _ in walked[k + 1 : k + 6]:
            assert torch.equal(next(resumed)[0], expected)


def test_streaming_run_resumes_exactly(tiny_flags, tmp_path):
    """--streaming on a local .txt file with no validation split: interrupted at step 6 and resumed, the run equals
    the uninterrupted one bit for bit; the held-out validation blocks are never trained on."""
    single_file = tmp_path / "corpus.txt"
    single_file.write_text((Path(tiny_flags["dataset"]) / "train.txt").read_text())
    flags = {
        **tiny_flags,
        "dataset": str(single_file),
        "streaming": True,
        "eval_blocks": 8,
        "num_iterations": 12,
        "checkpoint_every": 6,
        "log_every": 1,
        "eval_every": 6,
    }
    full = Path(train_bert.train(**flags))
    resumed = interrupted_copy(full, 6, tmp_path / "resumed")
    train_bert.train(load_checkpoint_dir=str(resumed))
    assert [r["loss"] for r in metric_records(resumed, "loss")] == [r["loss"] for r in metric_records(full, "loss")]
    assert metric_records(resumed, "eval_loss") == metric_records(full, "eval_loss")
    position = torch.load(full / "checkpoint-00000006.pt", weights_only=True)["data_position"]
    assert position[0] == 6 and isinstance(position[2], str), "batch index and stream state are checkpointed"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"tokenizer": "bpe"}, "--tokenizer bpe trains on the whole train split"),
        ({"eval_blocks": 0}, "--eval_blocks 0 (the whole validation split) cannot be used with --streaming"),
    ],
)
def test_streaming_refuses_what_a_stream_cannot_do(tiny_flags, tmp_path, changes, message):
    with pytest.raises(errors.ConfigError, match=re.escape(message)):
        train_bert.train(**{**tiny_flags, "streaming": True, **changes})
    assert not (tmp_path / "experiments").exists()


# --------------------------------------------------------------------------------------------------------------------
# Several ranks.
# --------------------------------------------------------------------------------------------------------------------

RANK_SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from loguru import logger
import train_bert

dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
messages = []
logger.add(lambda message: messages.append(str(message)), level="INFO")
data = train_bert.prepare_data(json.loads({flags!r}))
batches = train_bert.TrainBatches(data.train_blocks, 4, 0, 0, lambda rows, generator: rows, rank, world_size)
rows = [[int(block) for block in batches.order[(i * world_size + rank) * 4 : (i * world_size + rank + 1) * 4]]
        for i in range(len(batches))]
store = str(data.train_blocks.tokens.filename)
record = {{"rank": rank, "store": store, "inode": os.stat(store).st_ino, "rows": rows,
          "built": sum("token store: wrote" in message for message in messages)}}
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as file:  # a file each: two ranks' prints can interleave
    json.dump(record, file)
dist.barrier()
"""


@pytest.mark.slow
def test_two_ranks_share_one_store_and_read_disjoint_blocks(tiny_flags, tmp_path):
    """Two torchrun ranks start together on an unprepared corpus: one builds the store while the other waits, both
    map the same file, and their batches never share a block."""
    flags = data_flags(tiny_flags, tmp_path)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(root=str(ROOT), flags=json.dumps(flags), out=str(tmp_path)))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sum(rank["built"] for rank in ranks) == 1, "exactly one rank tokenizes"
    assert ranks[0]["store"] == ranks[1]["store"] and ranks[0]["inode"] == ranks[1]["inode"]
    blocks_of = [{block for batch in rank["rows"] for block in batch} for rank in ranks]
    assert blocks_of[0] and not blocks_of[0] & blocks_of[1]


# --------------------------------------------------------------------------------------------------------------------
# A bad corpus: one line that says what is wrong with it.
# --------------------------------------------------------------------------------------------------------------------


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", ["train.txt", "is empty"]),
        (
            b"fine line\ncaf\xe9 latin-1\n",
            ["train.txt", "not UTF-8", "byte 13 (line 2, 0xe9)", "invalid continuation byte"],
        ),
    ],
    ids=["empty", "latin1"],
)
def test_an_unreadable_txt_corpus_is_named_with_its_problem(tiny_flags, tiny_corpus, tmp_path, content, expected):
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    (corpus / "train.txt").write_bytes(content)
    error = one_error_line(run_cli("train_bert.py", {**tiny_flags, "dataset": str(corpus)}))
    assert all(piece in error for piece in expected), error
    assert "An error occurred while generating" not in error
    assert not (tmp_path / "experiments").exists()


def test_a_one_line_txt_file_says_how_it_was_split(tiny_flags, tmp_path):
    one_line = tmp_path / "one_line.txt"
    one_line.write_text("the quick brown fox jumps over the lazy dog .\n")
    error = one_error_line(run_cli("train_bert.py", {**tiny_flags, "dataset": str(one_line)}))
    assert all(piece in error for piece in ("1 line", "last 5%", "no line is left to train on")), error

    few_lines = tmp_path / "few_lines.txt"
    few_lines.write_text("the quick brown fox jumps over the lazy dog .\n" * 3)
    error = one_error_line(run_cli("train_bert.py", {**tiny_flags, "dataset": str(few_lines)}))
    assert "2 of the 3 lines" in error and "the first 95% train, the last 5% validate" in error, error

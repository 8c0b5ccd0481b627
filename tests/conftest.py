"""Shared fixtures: a tiny corpus and a tiny tokenizer made on the spot: tests never need the network or ../shared."""

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread per process beats several fighting over 2 cores (and over the other processes
# a test starts), several-fold on a busy machine. Set before torch is imported, so it holds in-process too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A CI runner may start the suite with SIGTERM or SIGINT ignored (a shell does so for its background jobs), and every
# process a test starts would inherit that: the `deepspeed` runner, which sets no handler of its own, would shrug off
# the SIGTERM a test sends it. The stop tests signal processes as a terminal or a scheduler does, so they start from
# the defaults a user's shell gives.
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent


# The variables of a process group. An in-process DeepSpeed run (a test calling train_bert_ds.train) sets them for a
# group of one, whose port this process keeps listening on as long as it lives: a process a later test started would
# inherit them and fail to listen on that port (EADDRINUSE). Each test leaves them as it found them.
PROCESS_GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "CROSS_RANK")


@pytest.fixture(autouse=True)
def process_group_env_restored():
    before = {name: os.environ.get(name) for name in PROCESS_GROUP_ENV}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a multi-process or long test (over ~20 s); -m 'not slow' skips them")


sys.path.insert(0, str(ROOT))

# A handful of fixed sentences in random order: a masked word is predictable from its sentence, so a small model's
# MLM loss falls quickly from ln(vocab) towards zero.
SENTENCES = [
    "the quick brown fox jumps over the lazy dog .",
    "one two three four five six seven eight nine ten .",
    "red orange yellow green blue indigo violet .",
    "monday tuesday wednesday thursday friday saturday sunday .",
    "january february march april may june july august .",
    "north east south west and back to the north again .",
    "alpha beta gamma delta epsilon zeta eta theta .",
    "spring summer autumn winter and spring once more .",
]


def write_corpus(directory: Path, seed: int = 0, lines: dict[str, int] | None = None) -> Path:
    """Write train.txt / validation.txt / test.txt of paragraphs made of SENTENCES, with blank lines between."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (lines or {"train": 600, "validation": 60, "test": 60}).items():
        paragraphs = []
        for index in range(count):
            paragraphs.append(
                "" if index % 4 == 3 else " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 4)))
            )
        (directory / f"{split}.txt").write_text("\n".join(paragraphs) + "\n")
    return directory


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A folder with train.txt / validation.txt / test.txt (a few thousand tokens each)."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (RoBERTa's special tokens) trained on the tiny corpus, saved as a folder."""
    import datasets

    from pretraining import corpus

    texts = datasets.load_dataset("text", data_files={"train": str(tiny_corpus / "train.txt")})["train"]
    tokenizer = corpus.train_bpe_tokenizer(texts, vocab_size=400)
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


# Flags for a model small enough that a step takes milliseconds; compiling it would take longer than its whole run
# (tests that need --compile say so).
TINY_MODEL_FLAGS = {
    "num_layers": 2,
    "num_heads": 2,
    "h_dim": 32,
    "ff_dim": 64,
    "max_seq_length": 32,
    "batch_size": 4,
    "compile": False,
}


@pytest.fixture
def tiny_flags(tiny_corpus, tiny_tokenizer, tmp_path) -> dict:
    """Keyword arguments of train_bert.train for a fast run on the tiny corpus, writing under tmp_path."""
    return {
        "checkpoint_dir": str(tmp_path / "experiments"),
        "dataset": str(tiny_corpus),
        "tokenizer": str(tiny_tokenizer),
        **TINY_MODEL_FLAGS,
    }


def cli_args(flags: dict) -> list[str]:
    """Turn a flags dict into --name=value command-line arguments."""
    return [f"--{name}={value}" for name, value in flags.items()]


def run_cli(script: str, flags: dict, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run `python script --flag=value ...` as a user would; returns the completed process (text output)."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *cli_args(flags)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=kwargs.pop("cwd", ROOT),
        **kwargs,
    )


@contextlib.contextmanager
def small_disk(directory: Path, size: str):
    """A tmpfs of `size` mounted at `directory`: a real file system that fills up (needs root with mount rights;
    the test is skipped elsewhere)."""
    directory.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True
        ).returncode
        == 0
        if shutil.which("mount")
        else False
    )
    if not mounted:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)

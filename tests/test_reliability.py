"""Reliability of train_bert.py: every fault is provoked for real (signals, SIGKILL mid-save, truncated files, a full
disk, NaNs, bad flags), and each test checks that the run loses no more than the step in flight, keeps its last good
checkpoint and says in one line what went wrong.

Run: python -m pytest -q tests/test_reliability.py
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_bert
from conftest import ROOT, TINY_MODEL_FLAGS, cli_args, run_cli
from conftest import small_disk as conftest_small_disk
from pretraining import errors, safeguards

# Short runs: checkpoints only where a test asks for them, evaluation only at the end.
QUIET = {"eval_every": 1000, "checkpoint_every": 1000, "log_every": 5}
# One thread per training process: on a busy 2-core machine, two threads that wait on each other make a tiny step
# 50x slower. Every run a test compares uses the same setting.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process runs of this module use one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------------------------


def only_experiment(checkpoint_dir: Path) -> Path:
    """The single bert_pretrain.* folder a run created in `checkpoint_dir`."""
    [experiment] = checkpoint_dir.glob("bert_pretrain.*")
    return experiment


def checkpoint_steps(experiment: Path) -> list[int]:
    """Steps of the complete checkpoint files, oldest first."""
    return sorted(int(path.stem.split("-")[1]) for path in experiment.glob(safeguards.CHECKPOINT_PATTERN))


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: equal snapshots mean nothing was created, changed or deleted."""
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }


def start_cli(flags: dict, log: Path) -> subprocess.Popen:
    """Start `python train_bert.py --flags...` in its own process group (as a shell would), stderr going to `log`."""
    with open(log, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "train_bert.py"), *cli_args(flags)],
            cwd=ROOT,
            env=ONE_THREAD,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )


def wait_until(condition, process: subprocess.Popen, log: Path, poll_s: float = 0.01, timeout_s: float = 600) -> None:
    """Poll `condition()` until true; fail with the run's stderr if the process ends first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) too early:\n{log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(poll_s)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit code != 0, no traceback, exactly one `error:` line, containing every expected piece; returns the line."""
    assert result.returncode != 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    for piece in expected:
        assert piece in lines[0], f"{piece!r} missing from: {lines[0]}"
    return lines[0]


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and numbers are equal, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"differs at {where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def run_flags(tiny_corpus, tiny_tokenizer) -> dict:
    """Flags of a tiny run (without a checkpoint_dir), shared by the module's fixtures."""
    return {"dataset": str(tiny_corpus), "tokenizer": str(tiny_tokenizer), **TINY_MODEL_FLAGS}


@pytest.fixture(scope="module")
def trained_experiment(run_flags, tmp_path_factory) -> Path:
    """A finished 4-step experiment with checkpoints at steps 2 and 4 (trained once; tests work on copies)."""
    root = tmp_path_factory.mktemp("trained")
    train_bert.train(
        checkpoint_dir=str(root), num_iterations=4, checkpoint_every=2, log_every=2, eval_every=1000, **run_flags
    )
    return only_experiment(root)


@pytest.fixture
def experiment(trained_experiment, tmp_path) -> Path:
    """A private copy of the trained experiment."""
    return Path(shutil.copytree(trained_experiment, tmp_path / trained_experiment.name))


# --------------------------------------------------------------------------------------------------------------------
# Crash safety: SIGKILL in the middle of a save, keep_last.
# --------------------------------------------------------------------------------------------------------------------


def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_resume_picks_it(run_flags, tmp_path):
    """kill -9 while torch.save writes an 80 MB checkpoint: the previous one stays loadable and the resume uses it."""
    flags = {
        **run_flags,
        "checkpoint_dir": str(tmp_path / "experiments"),
        "num_layers": 2,
        "num_heads": 8,
        "h_dim": 512,
        "ff_dim": 2048,
        "batch_size": 2,
        "num_iterations": 50,
        "checkpoint_every": 1,
        "keep_last": 2,
        "log_every": 1,
        "eval_every": 1000,
    }
    log = tmp_path / "stderr.log"
    process = start_cli(flags, log)

    def save_in_progress() -> list[Path]:  # a later checkpoint's temporary file, with some bytes in it already
        return [
            path
            for path in (tmp_path / "experiments").glob("*/.checkpoint-*.tmp")
            if "checkpoint-00000001" not in path.name and path.exists() and path.stat().st_size > 0
        ]

    try:
        wait_until(save_in_progress, process, log, poll_s=0.002)
        process.kill()
    finally:
        process.kill()
        process.wait()
    experiment = only_experiment(tmp_path / "experiments")
    [partial] = [path for path in experiment.glob(".checkpoint-*.tmp")]
    killed_step = int(partial.name.split("-")[1].split(".")[0])
    with pytest.raises(Exception):  # really cut off in the middle
        load_state(partial)
    intact_step = killed_step - 1
    assert checkpoint_steps(experiment)[-1] == intact_step
    assert (experiment / "latest").read_text().strip() == f"checkpoint-{intact_step:08d}.pt"
    assert safeguards.load_latest_checkpoint(experiment)["step"] == intact_step

    result = run_cli(
        "train_bert.py", {"load_checkpoint_dir": str(experiment), "num_iterations": killed_step}, env=ONE_THREAD
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at step {intact_step}" in (experiment / "train.log").read_text()
    assert checkpoint_steps(experiment)[-2:] == [intact_step, killed_step]
    assert not list(experiment.glob(".checkpoint-*.tmp")), "the killed save's temporary file is cleaned up"


def test_keep_last_deletes_old_checkpoints_only_after_a_newer_one_is_complete(tmp_path, monkeypatch):
    """While checkpoint N is being written, all older ones still exist; a failed write deletes nothing."""
    state = {"model": {"weight": torch.randn(64, 64)}}
    seen_while_writing = {}
    real_save = torch.save

    def observing_save(obj, file, *args, **kwargs):
        seen_while_writing[obj["step"]] = checkpoint_steps(tmp_path)
        if obj["step"] == 5:
            file.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", observing_save)
    for step in (1, 2, 3, 4):
        train_bert.save_checkpoint(tmp_path, {**state, "step": step}, keep_last=2)
    assert seen_while_writing == {1: [], 2: [1], 3: [1, 2], 4: [2, 3]}
    assert checkpoint_steps(tmp_path) == [3, 4]

    with pytest.raises(errors.CheckpointError, match="No space left on device"):
        train_bert.save_checkpoint(tmp_path, {**state, "step": 5}, keep_last=2)
    assert checkpoint_steps(tmp_path) == [3, 4]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-00000004.pt"
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "checkpoint-00000003.pt",
        "checkpoint-00000004.pt",
        "latest",
    ], "no temporary file is left behind"


def test_keep_last_never_counts_an_unreadable_later_checkpoint(tmp_path):
    """After resuming from step 2 because checkpoint 4 was corrupt, saving step 3 with keep_last 1 keeps step 3."""
    state = {"model": {"weight": torch.randn(8)}}
    train_bert.save_checkpoint(tmp_path, {**state, "step": 2}, keep_last=1)
    (tmp_path / "checkpoint-00000004.pt").write_bytes(b"truncated")
    train_bert.save_checkpoint(tmp_path, {**state, "step": 3}, keep_last=1)
    assert safeguards.load_latest_checkpoint(tmp_path)["step"] == 3


# --------------------------------------------------------------------------------------------------------------------
# SIGTERM (preemption) and SIGINT (Ctrl-C): save, exit non-zero with the resume command; the resume is exact.
# --------------------------------------------------------------------------------------------------------------------

STOP_RUN = {**QUIET, "num_iterations": 60}


@pytest.fixture(scope="module")
def uninterrupted_final_state(run_flags, tmp_path_factory) -> dict:
    """The final checkpoint of the run the interrupted ones must reproduce."""
    root = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli("train_bert.py", {**run_flags, **STOP_RUN, "checkpoint_dir": str(root)}, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_state(train_bert.checkpoint_path(only_experiment(root), STOP_RUN["num_iterations"]))


@pytest.mark.parametrize(
    "signum, to_group, num_workers",
    [
        (signal.SIGTERM, False, 0),  # a container stop / Kubernetes preemption: the main process only
        (signal.SIGTERM, True, 2),  # SLURM-style preemption: every process of the job, DataLoader workers included
        (signal.SIGINT, True, 2),  # Ctrl-C in a terminal: the whole foreground process group
    ],
    ids=["SIGTERM-process", "SIGTERM-group-workers", "SIGINT-group-workers"],
)
def test_signal_saves_and_resume_reaches_the_uninterrupted_parameters(
    run_flags, uninterrupted_final_state, tmp_path, signum, to_group, num_workers
):
    flags = {**run_flags, **STOP_RUN, "checkpoint_dir": str(tmp_path / "experiments"), "num_workers": num_workers}
    log = tmp_path / "stderr.log"
    process = start_cli(flags, log)
    metrics = lambda: list((tmp_path / "experiments").glob("*/metrics.jsonl"))  # noqa: E731
    try:
        wait_until(lambda: metrics() and metrics()[0].stat().st_size > 0, process, log)  # training is under way
        os.killpg(process.pid, signum) if to_group else process.send_signal(signum)
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    experiment = only_experiment(tmp_path / "experiments")
    [stopped_at] = checkpoint_steps(experiment)
    assert 0 < stopped_at < STOP_RUN["num_iterations"], "the signal must arrive during training"
    assert f"received {signal.Signals(signum).name}" in (experiment / "train.log").read_text(), "the stop is logged"
    resume_command = stderr.split("Resume with: ")[1].splitlines()[0]
    assert resume_command == f"python train_bert.py --load_checkpoint_dir {experiment}"

    result = subprocess.run(
        [sys.executable, *resume_command.split()[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = load_state(train_bert.checkpoint_path(experiment, STOP_RUN["num_iterations"]))
    for part in ("model", "optimizer", "lr_scheduler", "data_position", "step"):
        assert_same_tensors(resumed[part], uninterrupted_final_state[part], part)


# --------------------------------------------------------------------------------------------------------------------
# Corrupt checkpoints.
# --------------------------------------------------------------------------------------------------------------------


class ExecutesCode:
    """A pickle that would create a file when loaded: weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


CORRUPTIONS = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "empty": lambda path: path.write_bytes(b""),
    "garbage": lambda path: path.write_bytes(os.urandom(4096)),
    "pickled-code": lambda path: torch.save({"step": 4, "payload": ExecutesCode(path.with_name("pwned"))}, path),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_newest_checkpoint_warns_and_resumes_from_the_newest_intact_one(experiment, corruption):
    from loguru import logger

    newest = train_bert.checkpoint_path(experiment, 4)
    CORRUPTIONS[corruption](newest)
    warnings = []
    sink = logger.add(warnings.append, level="WARNING")
    try:
        train_bert.train(load_checkpoint_dir=str(experiment), num_iterations=6)
    finally:
        with contextlib.suppress(ValueError):  # run_training may have removed it already
            logger.remove(sink)
    assert any(str(newest) in message and "unreadable" in message for message in warnings), warnings
    assert "resuming at step 2" in (experiment / "train.log").read_text()
    assert not (experiment / "pwned").exists(), "loading must never run pickled code"
    assert checkpoint_steps(experiment)[-1] == 6


# --------------------------------------------------------------------------------------------------------------------
# Non-finite loss.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(experiment, dtype):
    """Resume a healthy run with an absurd learning rate and no clipping: the loss goes NaN/inf within steps."""
    before = snapshot(experiment)
    result = run_cli(
        "train_bert.py",
        {
            "load_checkpoint_dir": str(experiment),
            "num_iterations": 40,
            "lr": 1e30,
            "grad_clip": 0,
            "log_every": 1,
            "dtype": dtype,
        },
        env=ONE_THREAD,
    )
    line = assert_one_line_error(
        result,
        "non-finite",
        f"last good checkpoint in {experiment} is intact",
        "--lr",
        f"--load_checkpoint_dir {experiment}",
    )
    bad_step = int(line.split(" at step ")[1].split(";")[0])
    assert bad_step > 4
    assert result.returncode == 1
    assert checkpoint_steps(experiment) == [2, 4], "nothing is saved from a bad step"

    def checkpoint_files(files: dict) -> dict:
        return {name: data for name, data in files.items() if name.startswith("checkpoint") or name == "latest"}

    assert checkpoint_files(snapshot(experiment)) == checkpoint_files(before), "checkpoints and pointer untouched"
    assert load_state(train_bert.checkpoint_path(experiment, 4))["step"] == 4
    records = [json.loads(line) for line in (experiment / "metrics.jsonl").read_text().splitlines()]
    assert all(record["step"] < bad_step for record in records), "no log line from a bad step"
    assert "NaN" not in (experiment / "metrics.jsonl").read_text()
    assert "Infinity" not in (experiment / "metrics.jsonl").read_text()


def test_weights_that_overflow_are_never_saved(run_flags, tmp_path):
    """lr 1e39 overflows the weights in the very first update while that step's loss is still finite."""
    result = run_cli(
        "train_bert.py",
        {
            **run_flags,
            "checkpoint_dir": str(tmp_path / "experiments"),
            "lr": 1e39,
            "warmup_steps": 0,
            "grad_clip": 0,
            "num_iterations": 10,
            "checkpoint_every": 1,
            "log_every": 10,
        },
        env=ONE_THREAD,
    )
    assert_one_line_error(result, "weights became non-finite", "by step 1", "no checkpoint had been saved yet")
    assert checkpoint_steps(only_experiment(tmp_path / "experiments")) == []


# --------------------------------------------------------------------------------------------------------------------
# Full disk and unwritable directories.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_failed_save_is_an_error_that_keeps_the_previous_checkpoint(experiment):
    """Step 6's checkpoint goes to /dev/full, where every write fails with ENOSPC (a real 'disk full')."""
    (experiment / f".checkpoint-00000006.pt.{os.getpid()}.tmp").symlink_to("/dev/full")
    before = snapshot(experiment)
    with pytest.raises(errors.CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        train_bert.train(load_checkpoint_dir=str(experiment), num_iterations=8, checkpoint_every=2)
    assert checkpoint_steps(experiment) == [2, 4]
    assert all(snapshot(experiment)[name] == before[name] for name in before if name.startswith("checkpoint"))
    assert (experiment / "latest").read_text().strip() == "checkpoint-00000004.pt"
    assert not list(experiment.glob(".checkpoint-*")), "the failed temporary file is removed"
    train_bert.train(load_checkpoint_dir=str(experiment), num_iterations=8, checkpoint_every=2)  # space is back
    assert checkpoint_steps(experiment)[-1] == 8


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs that fills up for real."""
    with conftest_small_disk(tmp_path / "small_disk", "2m") as mount_point:
        yield mount_point


def test_a_disk_filling_up_mid_run_keeps_the_last_checkpoint(run_flags, small_disk):
    """Checkpoints every step, none deleted, on a 2 MiB disk: a save fails for real, the previous one loads."""
    result = run_cli(
        "train_bert.py",
        {
            **run_flags,
            **QUIET,
            "checkpoint_dir": str(small_disk / "experiments"),
            "num_iterations": 100,
            "checkpoint_every": 1,
            "keep_last": 100,
        },
        env=ONE_THREAD,
    )
    assert_one_line_error(
        result, "could not save checkpoint", "No space left on device", "previous checkpoint is intact"
    )
    assert result.returncode == 1
    experiment = only_experiment(small_disk / "experiments")
    steps = checkpoint_steps(experiment)
    assert steps and safeguards.load_latest_checkpoint(experiment)["step"] == steps[-1]
    assert not list(experiment.glob(".checkpoint-*")), "no partial file is left to fill the disk further"


def test_too_little_free_space_is_detected_before_anything_is_created(run_flags, small_disk):
    result = run_cli(
        "train_bert.py",
        {
            **run_flags,
            **QUIET,
            "checkpoint_dir": str(small_disk / "experiments"),
            "h_dim": 128,
            "ff_dim": 256,
            "num_heads": 2,
        },
        env=ONE_THREAD,
    )
    assert_one_line_error(result, "MiB free", "checkpoints of this model need about", "--checkpoint_dir")
    assert list(small_disk.iterdir()) == []


def test_a_full_disk_while_writing_a_folder_leaves_the_old_one_or_nothing(small_disk):
    """The export's folder and a new experiment's first files, on a disk that fills up for real: the earlier
    `hf_model/` stays whole and no temporary folder is left; the half-made experiment folder is removed, with one
    CheckpointError naming it."""
    export = small_disk / "hf_model"
    export.mkdir()
    (export / "weights").write_bytes(b"old")

    def write_too_much(folder: Path) -> None:
        folder.mkdir()
        (folder / "weights").write_bytes(b"\0" * 4 * 2**20)  # 4 MiB on a 2 MiB disk

    with pytest.raises(OSError, match="No space left"):
        safeguards.atomic_write_folder(export, write_too_much)
    assert (export / "weights").read_bytes() == b"old" and sorted(small_disk.iterdir()) == [export]

    experiment = small_disk / "bert_pretrain.new"
    experiment.mkdir()
    with pytest.raises(
        errors.CheckpointError,
        match=f"could not write the experiment directory {experiment} "
        r"\(No space left on device\); nothing was kept",
    ):
        with safeguards.removed_unless_complete(experiment):
            write_too_much(experiment / "tokenizer")
    assert not experiment.exists()


def test_a_read_only_checkpoint_dir_is_detected_before_training(run_flags, small_disk):
    """A read-only mount stops even root, for whom permission bits mean nothing."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = run_cli("train_bert.py", {**run_flags, "checkpoint_dir": str(small_disk / "experiments")}, env=ONE_THREAD)
    assert_one_line_error(
        result, f"--checkpoint_dir {str(small_disk / 'experiments')!r} is not writable", "Read-only file system"
    )


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one table, each case run as a user would, checked for exit code, message, and nothing left behind.
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """Datasets and tokenizers that load but cannot be trained on."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("bad_inputs")
    made = {}
    made["csv"] = root / "csv"  # two string columns: which one is the text?
    made["csv"].mkdir()
    for split in ("train", "validation"):
        (made["csv"] / f"{split}.csv").write_text("title,body\n" + "".join(f"t{i},some words {i}\n" for i in range(50)))
    made["blank_validation"] = root / "blank_validation"
    made["blank_validation"].mkdir()
    shutil.copy(tiny_corpus / "train.txt", made["blank_validation"] / "train.txt")
    (made["blank_validation"] / "validation.txt").write_text("\n  \n\n")
    made["tiny_train"] = root / "tiny_train"  # one line: a block or two, fewer than one batch
    made["tiny_train"].mkdir()
    (made["tiny_train"] / "train.txt").write_text("one two three four five six seven eight nine ten .\n")
    shutil.copy(tiny_corpus / "validation.txt", made["tiny_train"] / "validation.txt")
    for name, changes in {
        "no_mask": {"mask_token": None},
        "no_pad": {"pad_token": None},
        "short": {"model_max_length": 16},
    }.items():
        tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
        for attribute, value in changes.items():
            setattr(tokenizer, attribute, value)
        made[f"tokenizer_{name}"] = root / f"tokenizer_{name}"
        tokenizer.save_pretrained(made[f"tokenizer_{name}"])
    made["a_file"] = root / "a_file"
    made["a_file"].write_text("not a directory\n")
    return made


# Each case: (id, arguments after `python train_bert.py`, pieces the error line must contain). In the arguments,
# NEW stands for the flags of a valid new run into {tmp}/experiments (less those the case sets), {EXP} for a copy of
# a trained experiment, {tmp} for the test's folder and {name} for a path from `bad_inputs`.
NEW = ["NEW"]
BAD_INPUT_CASES = [
    ("mask_prob>1", NEW + ["--mask_prob=1.5"], ["--mask_prob", "1.5", "[0, 1]"]),
    ("random_prob<0", NEW + ["--random_replace_prob=-0.1"], ["--random_replace_prob", "-0.1", "[0, 1]"]),
    ("replace_sum>1", NEW + ["--random_replace_prob=0.6", "--unmask_replace_prob=0.5"], ["0.6 + 0.5", "<= 1"]),
    ("mask_prob=0", NEW + ["--mask_prob=0"], ["--mask_prob", "> 0"]),
    ("h_dim%heads", NEW + ["--h_dim=30", "--num_heads=4"], ["--h_dim 30", "divisible by --num_heads 4"]),
    ("layers=0", NEW + ["--num_layers=0"], ["--num_layers", "positive integer", "0"]),
    ("positions=relative", NEW + ["--positions=relative"], ["--positions", "rotary, learned", "'relative'"]),
    ("iterations<0", NEW + ["--num_iterations=-5"], ["--num_iterations", "positive integer", "-5"]),
    ("batch_size=abc", NEW + ["--batch_size=abc"], ["--batch_size", "positive integer", "'abc'"]),
    ("seq_len<specials", NEW + ["--max_seq_length=4"], ["--max_seq_length", "at least 8", "4"]),
    ("seq_len>tokenizer", NEW + ["--tokenizer={tokenizer_short}"], ["--max_seq_length 32", "16 tokens"]),
    ("dtype=fp8", NEW + ["--dtype=fp8"], ["--dtype", "fp32, bf16, fp16", "'fp8'"]),
    ("local_rank_without_gpu", NEW + ["--local_rank=0"], ["--local_rank 0", "no CUDA GPU", "--device cpu"]),
    ("device_cuda_without_gpu", NEW + ["--device=cuda:1"], ["--device cuda:1", "GPU 1", "no CUDA GPU"]),
    ("device=tpu", NEW + ["--device=tpu"], ["--device", "auto, cpu, cuda or cuda:N", "'tpu'"]),
    ("unknown_flag", NEW + ["--lerning_rate=1e-3"], ["--lerning_rate", "--help"]),
    ("stray_value", NEW + ["oops"], ["'oops'", "--flag"]),
    ("both_dirs", NEW + ["--load_checkpoint_dir={EXP}"], ["exactly one of --checkpoint_dir", "both"]),
    ("neither_dir", ["--num_iterations=3"], ["exactly one of --checkpoint_dir", "neither"]),
    ("load_dir_missing", ["--load_checkpoint_dir={tmp}/nowhere"], ["nowhere", "does not exist"]),
    ("load_dir_not_experiment", ["--load_checkpoint_dir={tmp}"], ["no hparams.json", "--checkpoint_dir"]),
    ("load_dir_no_checkpoint", ["--load_checkpoint_dir={EXP}", "DELETE_CHECKPOINTS"], ["holds no checkpoint"]),
    (
        "load_dir_all_corrupt",
        ["--load_checkpoint_dir={EXP}", "--num_iterations=6", "CORRUPT_CHECKPOINTS"],
        ["no intact checkpoint", "checkpoint-00000002.pt", "checkpoint-00000004.pt"],
    ),
    ("resume_changes_shape", ["--load_checkpoint_dir={EXP}", "--h_dim=64"], ["--h_dim 64", "checkpoint's 32"]),
    ("resume_dtype_fp8", ["--load_checkpoint_dir={EXP}", "--dtype=fp8"], ["--dtype", "'fp8'"]),
    ("checkpoint_dir_under_file", NEW + ["--checkpoint_dir={a_file}/experiments"], ["not writable", "a_file"]),
    ("checkpoint_dir_in_proc", NEW + ["--checkpoint_dir=/proc/experiments"], ["/proc/experiments", "not writable"]),
    (
        "dataset_offline",
        NEW + ["--dataset=no-such-user/no-such-dataset"],
        ["no-such-user/no-such-dataset", "--dataset PATH", "--tokenizer PATH", "HF_HUB_OFFLINE=1"],
    ),
    (
        "tokenizer_offline",
        NEW + ["--tokenizer=no-such-user/no-such-tokenizer"],
        ["no-such-user/no-such-tokenizer", "--dataset PATH", "--tokenizer PATH", "HF_HUB_OFFLINE=1"],
    ),
    ("no_text_column", NEW + ["--dataset={csv}", "--dataset_config=None"], ["no text column", "['title', 'body']"]),
    ("split_without_tokens", NEW + ["--dataset={blank_validation}"], ["validation split yields 0 tokens"]),
    (
        "train_below_one_batch",
        NEW + ["--dataset={tiny_train}"],
        ["train split has", "fewer than one batch", "--batch_size 4"],
    ),
    ("tokenizer_without_mask", NEW + ["--tokenizer={tokenizer_no_mask}"], ["no mask_token"]),
    ("tokenizer_without_pad", NEW + ["--tokenizer={tokenizer_no_pad}"], ["no pad_token"]),
]


@pytest.mark.parametrize(
    "args, expected", [case[1:] for case in BAD_INPUT_CASES], ids=[case[0] for case in BAD_INPUT_CASES]
)
def test_bad_input_is_one_clear_line_and_leaves_nothing_behind(
    run_flags, bad_inputs, experiment, tmp_path, args, expected
):
    if ("--local_rank=0" in args or "--device=cuda:1" in args) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    overridden = {arg[2:].split("=")[0] for arg in args if arg.startswith("--")}
    new_run = cli_args(
        {
            name: value
            for name, value in {**run_flags, "checkpoint_dir": tmp_path / "experiments"}.items()
            if name not in overridden
        }
    )
    paths = {**bad_inputs, "tmp": tmp_path, "EXP": experiment}
    if "DELETE_CHECKPOINTS" in args:
        for path in experiment.glob(safeguards.CHECKPOINT_PATTERN):
            path.unlink()
    if "CORRUPT_CHECKPOINTS" in args:
        for path in experiment.glob(safeguards.CHECKPOINT_PATTERN):
            path.write_bytes(path.read_bytes()[:100])
    argv = []
    for arg in args:
        if arg == "NEW":
            argv += new_run
        elif arg not in ("DELETE_CHECKPOINTS", "CORRUPT_CHECKPOINTS"):
            argv.append(arg.format(**paths))
    before = snapshot(experiment)
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_bert.py"), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=ONE_THREAD,
    )
    assert_one_line_error(result, *[piece.format(**paths) for piece in expected])
    assert not (tmp_path / "experiments").exists(), "no experiment directory may be created"
    assert snapshot(experiment) == before, "the experiment must be unchanged, byte for byte"
    assert "thrown while requesting" not in result.stderr, "with HF_HUB_OFFLINE=1 nothing may touch the network"

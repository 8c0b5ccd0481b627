"""Safeguards: stop signals, the experiment lock, resume checks, memory/disk checks, atomic writes."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from loguru import logger

from pretraining.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    OutOfMemory,
    StoppedAtOnce,
    TrainingInterrupted,
)
from pretraining.token_store import end_forked_helper

if TYPE_CHECKING:
    from pretraining.time_budget import StepLimit, TimeBudget

    pass

# An experiment folder's checkpoint files, and the file that names the newest checkpoint.
CHECKPOINT_PATTERN = "checkpoint-*.pt"
LATEST_POINTER = "latest"


def ignore_stop_signals_in_worker(_: int) -> None:
    """Ctrl-C (and SIGTERM from a scheduler such as SLURM) reaches the whole process group; only the main process
    should react (it finishes the step, saves and exits). A worker killed by the signal would instead crash the
    main process mid-step; ignoring it, the worker exits when the main process closes the DataLoader."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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


def atomic_write_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Write a folder so that `folder` is either its old version or the complete new one, never half of it.

    `write(temporary)` fills a temporary folder beside it, which is then renamed into place; an earlier `folder`
    is replaced only at that moment. Leftovers of a write that was killed midway are removed first.
    """
    for leftover in folder.parent.glob(f".{folder.name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    temporary, previous = (folder.with_name(f".{folder.name}.{os.getpid()}.{part}") for part in ("tmp", "old"))
    try:
        write(temporary)
        if folder.exists():
            os.replace(folder, previous)
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)


FULL_DISK_BYTES = 64 * 2**20  # a save that failed with less than this free failed for want of space


@contextlib.contextmanager
def save_failure_reported(checkpoint: str, directory: Path) -> Iterator[None]:
    """Turn a checkpoint save into `directory` that failed for want of space into one CheckpointError line: saves
    are written so that the previous checkpoint and the `latest` pointer are still intact, and the run can resume.

    torch.save reports a failed write as a RuntimeError: its cause is the OSError (ENOSPC) when it writes into a file
    object, as train_bert.py's atomic save does, but only a C++ stream error when it is given a path to open, as a
    library's own checkpoint writer may do; then the free space left on the disk says whether it was full.
    """
    try:
        yield
    except (OSError, RuntimeError) as error:
        cause = error if isinstance(error, OSError) else error.__context__
        folder = nearest_existing(directory)
        free = shutil.disk_usage(folder).free
        if isinstance(cause, OSError):
            reason = cause.strerror or str(cause)
        elif free < FULL_DISK_BYTES:
            reason = f"{os.strerror(errno.ENOSPC)}: {free / 2**20:.1f} MiB free in {folder}"
        else:
            raise
        raise CheckpointError(
            f"could not save checkpoint {checkpoint} ({reason}); the previous checkpoint is intact. "
            "Free disk space, then resume with --load_checkpoint_dir"
        ) from error


@contextlib.contextmanager
def removed_unless_complete(experiment_dir: Path) -> Iterator[None]:
    """Delete the new `experiment_dir` if writing its first files fails or is stopped: no half-made experiment.

    A failed write (e.g. a full disk) becomes one CheckpointError line.
    """
    try:
        yield
    except OSError as error:
        shutil.rmtree(experiment_dir, ignore_errors=True)
        raise CheckpointError(
            f"could not write the experiment directory {experiment_dir} "
            f"({error.strerror or error}); nothing was kept. Free space and start again"
        ) from error
    except BaseException:  # a stop signal
        shutil.rmtree(experiment_dir, ignore_errors=True)
        raise


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
        os.write(
            sys.stderr.fileno(),
            f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint\n".encode(),
        )

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
            f"{resume_command(experiment_dir)}",
            self.signum,
        )


LOCK_FILE = "experiment.lock"


COMPLETED_KEY = "completed_step"  # in hparams.json: the step whose test evaluation and hf_model/ export are done


# What starts a script again: `python`, unless a multi-rank run's ranks.init_distributed puts its launcher here.
RELAUNCH_PREFIX = ["python"]


def launch_command() -> list[str]:
    """How to start this script again as it was started: RELAUNCH_PREFIX and the script, named as the user gave it
    (shortened to its file name when it is in the current directory)."""
    script = sys.argv[0]
    if Path(script).resolve().parent == Path.cwd().resolve():
        script = Path(script).name
    return [*RELAUNCH_PREFIX, script]


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
        raise ConfigError(
            f"cannot open the lock file {path} ({error.strerror}); the experiment directory must be writable"
        ) from error
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError(
                f"experiment {experiment_dir} is in use by {holder}; one run at a time may write to "
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
    """The step of the checkpoint a resume starts from: the number in the name `latest` holds (a checkpoint file's or
    folder's), else in the newest checkpoint file's; None if there is none."""
    pointer = experiment_dir / LATEST_POINTER
    names = (
        [pointer.read_text().strip()]
        if pointer.is_file()
        else sorted(path.name for path in experiment_dir.glob(CHECKPOINT_PATTERN))
    )
    digits = "".join(character for character in (names or [""])[-1] if character.isdigit())
    return int(digits) if digits else None


def check_resume_target(flags: dict[str, Any], experiment_dir: Path) -> bool:
    """Whether resuming `experiment_dir` with `flags` has anything to do: False if the run is finished (said in one
    line), an error if --num_iterations is below the checkpoint's step, True otherwise (train, or finish the test
    evaluation and export that a stop interrupted)."""
    step, completed_step = saved_step(experiment_dir), load_hparams(experiment_dir).get(COMPLETED_KEY)
    if step is None:
        return True  # load_latest_checkpoint explains what is missing
    if flags["time_budget"] is not None:  # a budgeted run ends when its time is spent, at whatever step
        if completed_step == step:
            print(
                f"experiment {experiment_dir} is finished: trained for its --time_budget {flags['time_budget']} "
                f"to step {step}, evaluated and exported to {experiment_dir / 'hf_model'}. To train further, start "
                f"a new run with --init_from {experiment_dir / 'hf_model'}",
                file=sys.stderr,
            )
            return False
        return True
    if flags["num_iterations"] < step:
        raise ConfigError(
            f"--num_iterations {flags['num_iterations']} is below step {step}, which the checkpoint in "
            f"{experiment_dir} has reached; give --num_iterations {step} or more"
        )
    if step == flags["num_iterations"] and completed_step == step:
        print(
            f"experiment {experiment_dir} is finished: trained to step {step} of --num_iterations {step}, "
            f"evaluated and exported to {experiment_dir / 'hf_model'}. To train further: "
            f"{resume_command(experiment_dir)} --num_iterations N (N > {step})",
            file=sys.stderr,
        )
        return False
    return True


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
        return (
            f"nothing had been trained, so the new experiment directory {experiment_dir} was removed. Start "
            f"again with: {start_command()}"
        )
    return f"nothing was created. Start again with: {start_command()}"


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), or the CPU allocator's failure (a RuntimeError), or Python's MemoryError."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def out_of_memory(error: BaseException, flags: dict[str, Any], phase: str, outcome: str) -> OutOfMemory:
    """The one-line error for an allocation that failed: where, which flags to lower, what was kept."""
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return OutOfMemory(
        f"out of memory {phase} ({detail}); lower --batch_size (now {flags['batch_size']}; --grad_accum_steps keeps "
        f"the effective batch) or --max_seq_length (now {flags['max_seq_length']}), or make the model smaller "
        f"(--num_layers, --h_dim, --ff_dim); {outcome}"
    )


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
    available = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    if needed > available:
        attention_part = (
            f" ({attention / 2**30:.1f} GiB of it attention matrices of --max_seq_length "
            f"{flags['max_seq_length']} squared, per layer and head)"
            if attention
            else ""
        )
        raise ConfigError(
            f"one training step needs about {needed / 2**30:.1f} GiB{attention_part}, more than the "
            f"{available / 2**30:.1f} GiB available on {device}; lower --max_seq_length or --batch_size (now "
            f"{flags['batch_size']}; --grad_accum_steps keeps the effective batch)"
        )


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
        raise ConfigError(
            f"--max_seq_length {flags['max_seq_length']} is larger than the {limit} positions of the "
            f"model that comes with --tokenizer {flags['tokenizer']!r} (max_position_embeddings "
            f"{positions} in {model_config}); give --max_seq_length {limit} or less"
        )


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
            logger.warning(
                f"checkpoint {path} is unreadable ({type(error).__name__}: {str(error)[:200]}); trying an older one"
            )
    raise CheckpointError(
        f"no intact checkpoint in {experiment_dir}: all of {[p.name for p in candidates]} are unreadable"
    )


def check_resumable(experiment_dir: Path, checkpoints: str = CHECKPOINT_PATTERN) -> None:
    """Fail before loading anything unless `experiment_dir` is an experiment with a checkpoint (a file matching
    `checkpoints`) that this user can resume: write what a resume appends to or replaces (the logs, metrics, pointer
    and the directories new files go into; they may belong to another user)."""
    load_hparams(experiment_dir)
    if not any(experiment_dir.glob(checkpoints)):
        raise ConfigError(f"--load_checkpoint_dir {str(experiment_dir)!r} holds no checkpoint ({checkpoints})")
    check_writable(str(experiment_dir), "--load_checkpoint_dir")  # the resumed run saves its checkpoints there
    for name in (".", "tb_dir", "train.log", "metrics.jsonl", "hparams.json", LATEST_POINTER, LOCK_FILE):
        path = experiment_dir / name
        if path.exists() and not os.access(path, os.W_OK):
            info = path.stat()
            raise ConfigError(
                f"--load_checkpoint_dir {str(experiment_dir)!r} cannot be resumed by this user (uid {os.getuid()}): "
                f"{path} is not writable (owner uid {info.st_uid}, mode {info.st_mode & 0o777:o}); run as its owner "
                "or give this user write access to the experiment directory"
            )


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest existing parent (where a missing directory would be created)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def check_disk_space(directory: Path, num_parameters: int) -> None:
    """Fail before training (and before creating anything) if the disk cannot hold two checkpoints (model + 2 AdamW
    moments, fp32): a new checkpoint is written in full before the previous one is deleted."""
    needed = 2 * 3 * 4 * num_parameters
    free = shutil.disk_usage(nearest_existing(directory)).free
    if free < needed:
        raise ConfigError(
            f"{directory} has {free / 2**20:.0f} MiB free; checkpoints of this model need about "
            f"{needed / 2**20:.0f} MiB. Free space or choose another --checkpoint_dir"
        )


def check_writable(directory: str, flag: str = "--checkpoint_dir") -> None:
    """Fail before loading anything if `directory` (or the parent it would be created in) is not writable.

    It tries to create (and at once deletes) a file there: `os.access` is not enough, since root passes it on a
    read-only mount or a virtual file system such as /proc.
    """
    for part in (Path(directory).absolute(), *Path(directory).absolute().parents):
        if part.is_symlink() and not part.exists():  # mkdir would fail on it after all the data loading
            raise ConfigError(
                f"{flag} {directory!r}: {part} is a symbolic link to {os.readlink(part)!r}, which does "
                "not exist; create its target or choose another directory"
            )
    path = nearest_existing(Path(directory))
    try:
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ConfigError(
            f"{flag} {directory!r} is not writable: {path} cannot hold new files ({error.strerror}); "
            "choose a writable directory"
        ) from error


def load_hparams(experiment_dir: Path) -> dict[str, Any]:
    """An experiment's hparams.json (its resolved flags first); an error if the folder is not an experiment."""
    hparams_path = experiment_dir / "hparams.json"
    if not experiment_dir.is_dir():
        raise ConfigError(
            f"--load_checkpoint_dir {str(experiment_dir)!r} does not exist; give a bert_pretrain.* "
            "folder made by --checkpoint_dir"
        )
    if not hparams_path.is_file():
        raise ConfigError(
            f"--load_checkpoint_dir {str(experiment_dir)!r} is not an experiment directory "
            "(no hparams.json); give a bert_pretrain.* folder made by --checkpoint_dir"
        )
    try:
        hparams = json.loads(hparams_path.read_text())
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(
            f"{hparams_path} cannot be read as JSON ({error}); it is written by --checkpoint_dir runs: "
            "restore it from a backup or start a new experiment"
        ) from error
    if not isinstance(hparams, dict) or not isinstance(hparams.get("flags"), dict):
        raise ConfigError(
            f'{hparams_path} has no "flags" object (it holds {json.dumps(hparams)[:100]}); it is '
            "written by --checkpoint_dir runs: restore it from a backup or start a new experiment"
        )
    return hparams


@dataclasses.dataclass
class RunProgress:
    """How far a run got, for the message of a stop outside the training steps (see `reported_stops`)."""

    experiment_dir: Path | None  # None until a new experiment's directory exists
    created: bool = False  # this run created experiment_dir
    started: bool = False  # the training loop was entered
    end: StepLimit | TimeBudget | None = None  # what ends the run (train_bert.py's): it knows when training has ended


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
            outcome = stop_outcome(progress.experiment_dir, progress.created)
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(stop.signum).name} {phase}; {outcome}", stop.signum
            ) from None
        if not isinstance(error, (RuntimeError, MemoryError)) or not is_out_of_memory(error):
            raise
        phase = run_phase(flags, progress)
        raise out_of_memory(error, flags, phase, stop_outcome(progress.experiment_dir, progress.created)) from None


def run_phase(flags: dict[str, Any], progress: RunProgress) -> str:
    """Where the run was, in words: before training, during it, or in the end phase after the last step."""
    if not progress.started:
        return (
            "before the first step"
            if progress.created or progress.experiment_dir is None
            else "before training resumed"
        )
    if progress.end is not None:
        training_ended = progress.end.training_ended
    else:
        training_ended = (progress.experiment_dir / LATEST_POINTER).is_file() and saved_step(
            progress.experiment_dir
        ) == flags["num_iterations"]
    if training_ended:
        return "after the last step, during the test evaluation or the hf_model export (a resume does only those)"
    return "during training"


def nonfinite_error(what: str, experiment_dir: Path) -> NonFiniteLossError:
    """The error for a NaN/inf: what happened, that the last good checkpoint is kept, and how to go on from it."""
    if (experiment_dir / LATEST_POINTER).is_file():
        kept = f"the last good checkpoint in {experiment_dir} is intact"
        go_on = f"then resume with --load_checkpoint_dir {experiment_dir}"
    else:
        kept, go_on = "no checkpoint had been saved yet", "then start again"
    return NonFiniteLossError(
        f"{what}; stopped without saving: {kept}. Lower --lr, raise --warmup_steps, keep "
        f"--grad_clip on or use --dtype fp32, {go_on}"
    )


def raise_if_weights_nonfinite(model: torch.nn.Module, step: int, experiment_dir: Path) -> None:
    """Refuse to save NaN/inf weights. A finite loss at a step does not prove them finite: the update that follows
    it can still overflow (a huge lr) or spread an inf gradient. One device->host sync, at checkpoint steps only."""
    if not bool(torch.stack([torch.isfinite(parameter).all() for parameter in model.parameters()]).all()):
        raise nonfinite_error(f"the model's weights became non-finite (NaN or inf) by step {step}", experiment_dir)

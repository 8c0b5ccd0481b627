"""Processes and ranks for train_bert_ds.py: the process group, peers that fail, a launcher that dies, and
DeepSpeed's one-time C++ op build."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from loguru import logger

from pretraining.errors import CheckpointError, ConfigError
from pretraining.logs import LossWindow
from pretraining.safeguards import (
    LATEST_POINTER,
    RELAUNCH_PREFIX,
    RunProgress,
    nonfinite_error,
    resume_command,
    start_command,
    stop_outcome,
)


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group of one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# How long a collective waits for a rank that neither answers nor disconnects (a hung process, a lost node). A rank
# that dies closes its connections, and the others notice that at once. Rank 0 alone prepares a new run's data while
# the others wait in a broadcast, so this must exceed the longest data preparation.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=15)


def launcher_command(world_size: int) -> list[str]:
    """The launcher that started these ranks, with as many processes (a DeepSpeed checkpoint must be resumed by
    as many ranks as saved it): torchrun's form under torchrun, else the `deepspeed` launcher's."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size)
    nodes = world_size // per_node
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return ["torchrun", f"--nnodes={nodes}" if nodes > 1 else "--standalone", f"--nproc_per_node={per_node}"]
    return ["deepspeed", *([f"--num_nodes={nodes}"] if nodes > 1 else []), f"--num_gpus={per_node}"]


def init_distributed(local_rank: int) -> tuple[int, int, torch.device]:
    """Join the launcher's process group (a group of one under plain `python`); return rank, world size, device.

    deepspeed, torchrun and mpirun-style launchers set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
    Without them DeepSpeed would try MPI discovery (and fail without mpi4py), so a single process fills them in.
    The accelerator is DeepSpeed's choice: CUDA where there is a GPU, else the CPU with the gloo backend
    (DS_ACCELERATOR=cpu forces it).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" in os.environ:
        stop_when_the_launcher_dies()
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if int(os.environ["WORLD_SIZE"]) > 1:  # printed resume commands start as many ranks as saved the checkpoint
        RELAUNCH_PREFIX[:] = launcher_command(int(os.environ["WORLD_SIZE"]))
    local_rank = int(os.environ["LOCAL_RANK"]) if local_rank < 0 else local_rank
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    deepspeed.init_distributed(
        dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False, timeout=COLLECTIVE_TIMEOUT
    )
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")
    return dist.get_rank(), dist.get_world_size(), device


LAUNCHER_NAMES = ("deepspeed", "torchrun", "torch.distributed.run")


def stop_when_the_launcher_dies() -> None:
    """SIGTERM this rank when the launcher that started it ends, so it saves a checkpoint and exits.

    `docker stop`, schedulers and process managers signal the top process, the `deepspeed` runner, which dies
    without passing the signal on (its child, the per-node launcher, survives it): the ranks would train on
    unsupervised until something SIGKILLs them. A thread checks the launcher processes above this rank five times
    a second; when one is gone, the rank signals itself and stops exactly as after a SIGTERM (all ranks agree on
    the step, save one checkpoint, exit 143).
    """
    import psutil

    launchers = [
        process
        for process in psutil.Process().parents()
        if any(name in " ".join(process.cmdline()) for name in LAUNCHER_NAMES)
    ]

    def watch() -> None:
        while all(process.is_running() for process in launchers):
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    if launchers:
        threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def run_on_rank0(function: Callable[[], Any], rank: int) -> Any:
    """Run `function` on rank 0 only and give every rank its (picklable) result.

    If it fails, the other ranks stop with its message instead of waiting forever for a broadcast.
    """
    outcome = [None]
    if rank == 0:
        try:
            outcome = [(True, function())]
        except BaseException as error:  # a stop signal too: the other ranks must not wait for the broadcast
            dist.broadcast_object_list([(False, f"{type(error).__name__}: {error}")], src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    succeeded, value = outcome[0]
    if not succeeded:
        raise ConfigError(f"rank 0 failed, so this rank stops too: {value}")
    return value


def is_peer_failure(error: BaseException) -> bool:
    """A collective failed because another rank is gone (closed connection) or silent (timeout)."""
    return isinstance(error, getattr(dist, "DistError", ())) or (
        isinstance(error, RuntimeError)
        and any(
            sign in str(error) for sign in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer")
        )
    )


@contextlib.contextmanager
def reported_peer_failures(rank: int, progress: RunProgress) -> Iterator[None]:
    """Turn a collective that failed because another rank died into one line instead of a traceback.

    This rank cannot save a checkpoint alone (each rank holds its ZeRO partition), so it names the last complete
    checkpoint, the one a resume will use, and stops (exit 1).
    """
    try:
        yield
    except RuntimeError as error:
        if not is_peer_failure(error):
            raise
        for signum in (signal.SIGTERM, signal.SIGINT):  # the launcher now stops the other ranks: nothing to save
            signal.signal(signum, signal.SIG_IGN)
        detail = re.sub(r"\[[^\]]*\.\w+:\d+\] ", "", str(error).strip().splitlines()[0]).split(". ")[0][:160]
        experiment_dir = progress.experiment_dir
        if experiment_dir is not None and (experiment_dir / LATEST_POINTER).is_file():
            outcome = (
                f"a resume uses the last complete checkpoint, {(experiment_dir / LATEST_POINTER).read_text()} "
                f"in {experiment_dir}: {resume_command(experiment_dir)}"
            )
        elif rank == 0 or experiment_dir is None:
            outcome = stop_outcome(experiment_dir, progress.created)
        else:
            outcome = f"no checkpoint had been saved yet. Start again with: {start_command()}"
        raise CheckpointError(
            f"rank {rank}: another rank stopped ({detail}); a DeepSpeed checkpoint needs every "
            f"rank, so this one cannot save alone and stops; {outcome}"
        ) from None


def any_rank(value: int, group: Any) -> int:
    """The largest of `value` over all ranks, via a CPU (gloo) group so no accelerator work waits on it."""
    flag = torch.tensor([value])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag)


def window_over_ranks(window: LossWindow, world_size: int) -> None:
    """Turn each rank's log window into the whole run's: mean loss over ranks, predicted tokens summed."""
    dist.all_reduce(window.loss)
    window.loss /= world_size
    dist.all_reduce(window.predicted)


def nonfinite_over_ranks(window: LossWindow) -> None:
    """Make every rank see a non-finite loss any rank saw, so they all stop together instead of one hanging."""
    dist.all_reduce(window.first_nonfinite_step, op=dist.ReduceOp.MAX)


def raise_if_weights_nonfinite_on_any_rank(engine: Any, step: int, experiment_dir: Path, control_group: Any) -> None:
    """train_bert.py's check before a save, on the weights each rank holds (under ZeRO-3 only its partition,
    `ds_tensor`), decided by all ranks together."""
    held = [getattr(parameter, "ds_tensor", parameter) for parameter in engine.module.parameters()]
    finite = all(bool(torch.isfinite(tensor).all()) for tensor in held)
    if any_rank(int(not finite), control_group):
        raise nonfinite_error(f"the model's weights became non-finite (NaN or inf) by step {step}", experiment_dir)


class QuietRank:
    """The logging of ranks other than 0: errors only, no metrics (rank 0 alone writes logs, TensorBoard and
    metrics.jsonl)."""

    def __enter__(self) -> "QuietRank":
        logger.remove()
        logger.add(sys.stderr, level="ERROR")
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def log(self, record: dict[str, Any]) -> None:
        pass


# How long a start waits for another live process to finish building DeepSpeed's op (it takes about a minute).
OP_BUILD_WAIT = datetime.timedelta(minutes=10)


def op_build_directory() -> Path | None:
    """Where torch JIT-builds the op DeepSpeed's CPU collectives use (`deepspeed_shm_comm`, on first start), or None
    where there is nothing to build: another accelerator, an incompatible CPU, or an op installed prebuilt."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME) or installed_ops.get(builder.name):
        return None
    return Path(_get_build_directory(builder.name, verbose=False))  # $TORCH_EXTENSIONS_DIR/<op>, or torch's default


def processes_holding(path: Path) -> list[int]:
    """The pids of this machine's processes that have `path` open, read from /proc."""
    pids = []
    for descriptors in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            if any(os.readlink(descriptor) == str(path) for descriptor in descriptors.iterdir()):
                pids.append(int(descriptors.parent.name))
    return pids


def prepare_op_build() -> None:
    """Before `deepspeed.init_distributed` builds its op: clear a stale build lock, say what a wait or a build is.

    torch builds an extension under a lock, `<build folder>/lock`, a plain file it creates (O_EXCL) and keeps open
    until it deletes it; any other process waits, silently, for as long as the file exists. A start killed while
    building (the first start takes about a minute) leaves the file behind, and every later start waited forever.
    A lock that no process holds open is stale, and is deleted (the checks and the deletion under an OS lock, so two
    starts cannot delete a lock the first of them just took); a live build is waited for, at most OP_BUILD_WAIT.
    """
    build_directory = op_build_directory()
    if build_directory is None or not Path("/proc/self/fd").is_dir():  # nothing to build, or no /proc to look in
        return
    lock, deadline, waiting_for = build_directory / "lock", time.monotonic() + OP_BUILD_WAIT.total_seconds(), None
    while lock.exists():
        with open(build_directory / "lock.check", "w") as check:
            fcntl.flock(check, fcntl.LOCK_EX)
            holders = processes_holding(lock)
            if not holders and lock.exists():
                lock.unlink()
                logger.warning(
                    f"removed the stale build lock {lock}: no process holds it (a start was killed while "
                    "it built DeepSpeed's op)"
                )
        if not holders:  # gone, or removed: look again (another start may have taken it since)
            continue
        if holders != waiting_for:
            waiting_for = holders
            logger.info(
                f"waiting for process {', '.join(map(str, holders))}, which is building DeepSpeed's op in "
                f"{build_directory} (about a minute)"
            )
        if time.monotonic() > deadline:
            raise ConfigError(
                f"DeepSpeed's op in {build_directory} has been building for over "
                f"{OP_BUILD_WAIT.total_seconds() / 60:.0f} minutes (process "
                f"{', '.join(map(str, holders))}); stop that process, or delete {build_directory}, "
                "then start again"
            )
        time.sleep(1)
    if not list(build_directory.glob("*.so")):
        logger.info(
            f"building DeepSpeed's {build_directory.name} op in {build_directory}, about a minute the first "
            "time (later starts reuse it)"
        )

"""Masked language model pretraining of a RoBERTa encoder with DeepSpeed: `train_bert.py` plus what DeepSpeed changes.

Data, masking, the model, the sparse MLM loss, the experiment directory, evaluation and logging all come from
`train_bert.py`. What is here, top to bottom:

    ds_config.json + flags -> processes and ranks -> the engine -> checkpoints and export -> training -> __main__

Run it:

    python train_bert_ds.py --checkpoint_dir ./experiments                  # one process (GPU 0, or the CPU)
    deepspeed train_bert_ds.py --checkpoint_dir ./experiments               # one process per GPU of this machine
    torchrun --nproc_per_node 2 train_bert_ds.py --checkpoint_dir ./experiments
    python train_bert_ds.py --load_checkpoint_dir ./experiments/bert_pretrain...   # resume (same number of ranks)
    python train_bert_ds.py --help                                           # every flag, documented
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import fcntl
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from loguru import logger
from tqdm.auto import tqdm

import train_bert
from train_bert import (COMPLETED_KEY, ConfigError, CheckpointError, LossWindow, MetricsLogger, PreparedData,
                        RunProgress, StopSignal, atomic_write, check_memory, check_resumable, check_resume_target,
                        check_sequence_limits, check_writable, compiled_mlm_loss, create_experiment, create_lr_scheduler,
                        create_model, eval_batches, evaluate, experiment_lock, experiment_logging, export_and_demo,
                        load_hparams, log_evaluation, log_run_start, log_test_evaluation, mark_completed, mlm_loss,
                        nonfinite_error, parameter_groups, prepare_data, record_flag_changes, reported_stops,
                        resolve_resume_flags, resume_command, rng_states, saved_step, set_rng_states, start_command,
                        stop_outcome, to_device, train_batches, unigram_output_bias, validate_flags)

HERE = Path(__file__).resolve().parent
DEFAULT_DS_CONFIG = HERE / "ds_config.json"
LATEST_POINTER = "latest"  # the file DeepSpeed's load_checkpoint and zero_to_fp32.py read the newest tag from
TAG_PREFIX = "global_step"  # DeepSpeed's own naming of checkpoint folders

# ----------------------------------------------------------------------------------------------------------------------
# Flags and ds_config.json: one source of truth per setting.
# ----------------------------------------------------------------------------------------------------------------------

# Settings that are both a flag and a field of ds_config.json (a path of keys). A flag the user passes wins and is
# written into the config; a flag left out takes the config's value (or train_bert.py's default if the config has
# none). `dtype` is one more, spread over fp16.enabled and bf16.enabled.
CONFIG_FIELDS = {
    "batch_size": ("train_micro_batch_size_per_gpu",),
    "grad_accum_steps": ("gradient_accumulation_steps",),
    "grad_clip": ("gradient_clipping",),
    "lr": ("optimizer", "params", "lr"),
    "weight_decay": ("optimizer", "params", "weight_decay"),
    "zero_stage": ("zero_optimization", "stage"),
    "offload_optimizer": ("zero_optimization", "offload_optimizer", "device"),
    "offload_param": ("zero_optimization", "offload_param", "device"),
}
FLAGS_FROM_CONFIG = (*CONFIG_FIELDS, "dtype")
OFFLOAD_DEVICES = ("none", "cpu")
# A DeepSpeed checkpoint's layout depends on these, so a resume keeps them (besides train_bert.py's shape flags).
DS_RUN_DEFINING_FLAGS = (*train_bert.RUN_DEFINING_FLAGS, "zero_stage", "dtype", "offload_optimizer", "offload_param")


def load_ds_config(path: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON config; a missing or malformed file is a one-line error."""
    try:
        config = json.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"--ds_config {path!r} cannot be read ({error.strerror or error})") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"--ds_config {path!r} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ConfigError(f"--ds_config {path!r} must hold a JSON object, not {type(config).__name__}")
    return config


def effective_ds_config(flags: dict[str, Any], config: dict[str, Any], world_size: int
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge flags and config both ways; return (resolved flags, the config DeepSpeed runs with).

    DeepSpeed checks train_batch_size == micro batch x accumulation steps x ranks; it is derived here, and a
    config that states another number is an error rather than silently one or the other.
    """
    flags, config = dict(flags), copy.deepcopy(config)
    fallback = {name: parameter.default for name, parameter in inspect.signature(train_bert.train).parameters.items()}
    fallback |= {"zero_stage": 0, "offload_optimizer": "none", "offload_param": "none"}
    for flag, path in CONFIG_FIELDS.items():
        *parents, key = path
        section = config
        for parent in parents:
            section = section.setdefault(parent, {})
        if flags[flag] is None:
            flags[flag] = section.get(key, fallback[flag])
        section[key] = flags[flag]
    if flags["dtype"] is None:
        enabled = [dtype for dtype in ("fp16", "bf16") if config.get(dtype, {}).get("enabled", False)]
        if len(enabled) == 2:
            raise ConfigError(f"--ds_config {flags['ds_config']!r} enables both fp16 and bf16; enable one")
        flags["dtype"] = enabled[0] if enabled else "fp32"
    for dtype in ("fp16", "bf16"):
        config.setdefault(dtype, {})["enabled"] = flags["dtype"] == dtype
    train_batch_size = flags["batch_size"] * flags["grad_accum_steps"] * world_size
    if config.get("train_batch_size", "auto") not in ("auto", train_batch_size):
        raise ConfigError(
            f"--ds_config sets train_batch_size {config['train_batch_size']}, but --batch_size {flags['batch_size']} "
            f"x --grad_accum_steps {flags['grad_accum_steps']} x {world_size} rank(s) = {train_batch_size}; "
            "remove train_batch_size (it is derived) or make them agree")
    config["train_batch_size"] = train_batch_size
    return flags, config


def fields_from_config(flags: dict[str, Any], config: dict[str, Any]) -> dict[str, str]:
    """The flags left out (None) whose value the config sets: {flag: its field, e.g. "zero_optimization.stage"}."""
    fields = {}
    for flag, path in CONFIG_FIELDS.items():
        section = config
        for key in path:
            section = section.get(key) if isinstance(section, dict) else None
        if flags[flag] is None and section is not None:
            fields[flag] = ".".join(path)
    enabled = [dtype for dtype in ("fp16", "bf16")
               if isinstance(config.get(dtype), dict) and config[dtype].get("enabled")]
    if flags["dtype"] is None and enabled:
        fields["dtype"] = f"{enabled[0]}.enabled"
    return fields


@contextlib.contextmanager
def errors_named_after_config(fields: dict[str, str], ds_config: str) -> Iterator[None]:
    """Reword a bad-value error so it names the ds_config.json field the value came from, not a flag the user
    never passed (`fields` from `fields_from_config`)."""
    try:
        yield
    except ConfigError as error:
        message = str(error)
        for flag, field in fields.items():
            message = re.sub(rf"--{flag}\b", f"{field} (in --ds_config {ds_config!r})", message, count=1)
        raise ConfigError(message) from None


def validate_ds_flags(flags: dict[str, Any]) -> None:
    """Reject bad values of the DeepSpeed flags with one line each (train_bert.validate_flags checks the rest)."""
    if flags["dtype"] not in train_bert.DTYPES:  # train_bert.py's "auto": here ds_config.json decides
        raise ConfigError(f"--dtype must be one of {', '.join(train_bert.DTYPES)} here, or left out (ds_config.json's "
                          f"fp16 / bf16 \"enabled\" decides); got {flags['dtype']!r}")
    if flags["zero_stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"--zero_stage must be 0, 1, 2 or 3; got {flags['zero_stage']!r}")
    for name in ("offload_optimizer", "offload_param"):
        if flags[name] not in OFFLOAD_DEVICES:
            raise ConfigError(f"--{name} must be one of {', '.join(OFFLOAD_DEVICES)}; got {flags[name]!r}")
    if flags["offload_optimizer"] != "none" and flags["zero_stage"] == 0:
        raise ConfigError("--offload_optimizer cpu needs ZeRO (--zero_stage 1, 2 or 3): only a partitioned optimizer "
                          "can live in CPU memory")
    if flags["offload_param"] != "none" and flags["zero_stage"] != 3:
        raise ConfigError(f"--offload_param cpu needs --zero_stage 3 (only stage 3 partitions the parameters); "
                          f"got --zero_stage {flags['zero_stage']}")
    if flags["compile"] and flags["zero_stage"] == 3:
        raise ConfigError("--compile is not supported with --zero_stage 3 here (ZeRO-3 gathers parameters in "
                          "module hooks that torch.compile would trace); use --zero_stage 0, 1 or 2")


def check_dtype_supported(dtype: str) -> None:
    """Fail at once, with the fix, where DeepSpeed's accelerator cannot train in `dtype`."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported[dtype]:
        hint = "use --dtype bf16 or fp32" if supported["bf16"] else "use --dtype fp16 or fp32"
        raise ConfigError(f"--dtype {dtype} is not supported by DeepSpeed's {accelerator.device_name()} accelerator "
                          f"on this machine; {hint}")


def inherit_flags(function: Callable, base: Callable, from_config: tuple[str, ...]) -> None:
    """Give `function(**flags)` the signature and flag documentation of `base` plus its own keyword flags (an own
    flag replaces the inherited one of its name).

    fire reads both (`__signature__` and the docstring's Args), so `--help` lists every flag and unknown flags
    are rejected, while the flags themselves stay defined once, in train_bert.train. Flags in `from_config`
    default to None: "take the value from ds_config.json".
    """
    own = [parameter for parameter in inspect.signature(function).parameters.values()
           if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
    own_names = {parameter.name for parameter in own}
    inherited = [parameter.replace(default=None) if parameter.name in from_config else parameter
                 for parameter in inspect.signature(base).parameters.values() if parameter.name not in own_names]
    keyword_only = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in inherited + own]
    function.__signature__ = inspect.signature(function).replace(parameters=keyword_only)
    head, own_args = function.__doc__.rstrip().split("Args:\n", 1)
    docs = flag_docs(base.__doc__.split("Args:\n", 1)[1]) | flag_docs(own_args)  # our wording wins
    names = [parameter.name for parameter in inherited + own]
    function.__doc__ = head + "Args:\n" + "".join(docs[name] for name in names)


def flag_docs(args_section: str) -> dict[str, str]:
    """Split a docstring's Args section into {flag: its lines}."""
    docs, name = {}, None
    # Without the closing quotes' indentation, the last entry would run into the next one joined after it.
    for line in args_section.rstrip().splitlines():
        stripped = line.strip()
        if stripped and not line.startswith(" " * 12) and ":" in stripped:
            name = stripped.split(":", 1)[0]
            docs[name] = ""
        if name is not None:
            docs[name] += line + "\n"
    return docs


# ----------------------------------------------------------------------------------------------------------------------
# Processes and ranks: every rank runs this script; rank 0 decides and writes, the others follow.
# ----------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group of one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# How long a collective waits for a rank that neither answers nor disconnects (a hung process, a lost node). A rank
# that dies closes its connections, and the others notice that at once. Rank 0 alone prepares a new run's data while
# the others wait in a broadcast, so this must exceed the longest data preparation.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=15)


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
    local_rank = int(os.environ["LOCAL_RANK"]) if local_rank < 0 else local_rank
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False,
                               timeout=COLLECTIVE_TIMEOUT)
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")
    return dist.get_rank(), dist.get_world_size(), device


LAUNCHER_NAMES = ("deepspeed", "torchrun", "torch.distributed.run")


def stop_when_the_launcher_dies() -> None:
    """SIGTERM this rank when the launcher that started it ends, so it saves a checkpoint and exits.

    `docker stop`, schedulers and process managers signal the top process, the `deepspeed` runner, which dies
    without passing the signal on (its child, the per-node launcher, survives it): the ranks would train on
    unsupervised until something SIGKILLs them. A thread checks the launcher processes above this rank once a
    second; when one is gone, the rank signals itself and stops exactly as after a SIGTERM (all ranks agree on
    the step, save one checkpoint, exit 143).
    """
    import psutil

    launchers = [process for process in psutil.Process().parents()
                 if any(name in " ".join(process.cmdline()) for name in LAUNCHER_NAMES)]

    def watch() -> None:
        while all(process.is_running() for process in launchers):
            time.sleep(1)
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
    return isinstance(error, getattr(dist, "DistError", ())) or (isinstance(error, RuntimeError) and any(
        sign in str(error) for sign in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer")))


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
            outcome = (f"a resume uses the last complete checkpoint, {(experiment_dir / LATEST_POINTER).read_text()} "
                       f"in {experiment_dir}: {resume_command(experiment_dir)}")
        elif rank == 0 or experiment_dir is None:
            outcome = stop_outcome(experiment_dir, progress.created)
        else:
            outcome = f"no checkpoint had been saved yet. Start again with: {start_command()}"
        raise CheckpointError(f"rank {rank}: another rank stopped ({detail}); a DeepSpeed checkpoint needs every "
                              f"rank, so this one cannot save alone and stops; {outcome}") from None


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


# ----------------------------------------------------------------------------------------------------------------------
# The engine: DeepSpeed wraps the model, the optimizer and the LR schedule.
# ----------------------------------------------------------------------------------------------------------------------


class SparseMLM(torch.nn.Module):
    """The model with train_bert.py's sparse MLM loss as its forward.

    DeepSpeed's engine calls the module's forward, and ZeRO-3 gathers and releases each layer's parameters in
    forward hooks that start from the root module, so the whole loss computation must run inside one forward.
    Checkpoint keys get a `model.` prefix; the export removes it.
    """

    def __init__(self, model: "transformers.PreTrainedModel", loss_function: Callable[..., torch.Tensor] = mlm_loss):
        super().__init__()
        self.model, self.loss_function = model, loss_function

    def forward(self, input_ids: torch.Tensor, masked_positions: torch.Tensor, masked_labels: torch.Tensor,
                reduction: str = "mean") -> torch.Tensor:
        return self.loss_function(self.model, input_ids, masked_positions, masked_labels, reduction)


def engine_loss(engine: torch.nn.Module, **batch: torch.Tensor) -> torch.Tensor:
    """The loss through the engine's forward (what train_bert.evaluate calls as its `loss_function`)."""
    return engine(**batch)


def create_engine(model: torch.nn.Module, flags: dict[str, Any], config: dict[str, Any]) -> Any:
    """`deepspeed.initialize`: the engine builds the optimizer from the config's "optimizer" section (torch's AdamW
    with "torch_adam": true, on train_bert.py's decay / no-decay groups) and wraps it for ZeRO and fp16/bf16;
    the LR schedule is train_bert.py's, stepped by the engine after each optimizer step."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=SparseMLM(model, compiled_mlm_loss() if flags["compile"] else mlm_loss),
        model_parameters=parameter_groups(model, flags["weight_decay"]),
        lr_scheduler=lambda optimizer: create_lr_scheduler(optimizer, flags["warmup_steps"], flags["num_iterations"]),
        config=config,
        dist_init_required=False,
    )
    return engine


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: DeepSpeed writes one folder per step (each rank its own shard); the client state carries the rest.
# ----------------------------------------------------------------------------------------------------------------------


def checkpoint_tags(experiment_dir: Path) -> list[str]:
    """The experiment's checkpoint folders (tags), oldest first."""
    tags = [path.name for path in experiment_dir.glob(f"{TAG_PREFIX}*") if path.is_dir()]
    return sorted(tags, key=lambda tag: int(tag.removeprefix(TAG_PREFIX)))


def save_ds_checkpoint(engine: Any, experiment_dir: Path, step: int, data_position: tuple[int, int],
                       flags: dict[str, Any], control_group: Any) -> str:
    """Save a checkpoint on every rank, then point `latest` at it, then delete those beyond `keep_last`.

    Only rank 0 writes the client state, so it carries every rank's RNG states. `engine.save_checkpoint` ends with
    a barrier: once it returns, every rank's shard is on disk, and only then does the pointer move (atomically),
    so a crash during a save leaves `latest` on the previous, complete checkpoint.
    """
    all_rng = [None] * dist.get_world_size()
    dist.all_gather_object(all_rng, rng_states(), group=control_group)
    tag = f"{TAG_PREFIX}{step}"
    client_state = {"step": step, "data_position": list(data_position), "rng": all_rng, "flags": flags}
    try:
        engine.save_checkpoint(str(experiment_dir), tag=tag, client_state=client_state, save_latest=False)
        if dist.get_rank() == 0:
            atomic_write(experiment_dir / LATEST_POINTER, lambda file: file.write(tag), mode="w")
            for old in checkpoint_tags(experiment_dir)[:-flags["keep_last"]]:
                shutil.rmtree(experiment_dir / old)
    except OSError as error:
        raise CheckpointError(f"could not save checkpoint {tag} ({error.strerror or error}); `latest` still points "
                              "at the previous one. Free disk space, then resume with --load_checkpoint_dir") from error
    dist.barrier(group=control_group)
    return tag


def load_ds_checkpoint(engine: Any, experiment_dir: Path) -> tuple[int, tuple[int, int]]:
    """Load the checkpoint `latest` names into the engine and this rank's RNGs; return (step, data position)."""
    path, client_state = engine.load_checkpoint(str(experiment_dir))
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint that {experiment_dir / LATEST_POINTER} names")
    set_rng_states(client_state["rng"][dist.get_rank()])
    return client_state["step"], tuple(client_state["data_position"])


def consolidated_model(engine: Any, experiment_dir: Path, tag: str, flags: dict[str, Any],
                       tokenizer: Any) -> torch.nn.Module:
    """The trained model as one fp32 masked LM (create_model's) on the CPU (call on rank 0 after the final checkpoint).

    With ZeRO or bf16 the fp32 master weights are partitioned across the ranks' optimizer states: DeepSpeed's
    zero_to_fp32 gathers them from the checkpoint (ZeRO-3 included). Without ZeRO in fp32 or fp16, every rank holds
    the whole model.
    """
    if engine.zero_optimization() or engine.bfloat16_enabled():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(experiment_dir), tag=tag)
    else:
        state = engine.module.state_dict()
    model = create_model(flags["num_layers"], flags["num_heads"], flags["ff_dim"], flags["h_dim"], flags["dropout"],
                         tokenizer, flags["max_seq_length"], positions=flags["positions"])
    prefix = "model."
    missing, unexpected = model.load_state_dict(
        {key.removeprefix(prefix): value.float().cpu() for key, value in state.items()}, strict=False)
    # zero_to_fp32 gathers the trained parameters only; a fixed one (RoFormer's sinusoid table) is create_model's.
    fixed = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    if unexpected or set(missing) - fixed:
        raise RuntimeError(f"{experiment_dir} / {tag} does not match the model: missing "
                           f"{sorted(set(missing) - fixed)}, unexpected {unexpected}")
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------------------------------


def train(ds_config: str = str(DEFAULT_DS_CONFIG), zero_stage: int | None = None, offload_optimizer: str | None = None,
          offload_param: str | None = None, compile: bool | None = None, **flags: Any) -> str | None:
    """Pretrain a RoBERTa encoder with masked language modelling using DeepSpeed; return the experiment directory.

    Start:  deepspeed train_bert_ds.py --checkpoint_dir ./experiments [flags]   (or torchrun, or plain python)
    Resume: deepspeed train_bert_ds.py --load_checkpoint_dir ./experiments/bert_pretrain.YYYY... (same rank count)

    Every flag of train_bert.py works here too. Those that ds_config.json also sets (--batch_size,
    --grad_accum_steps, --lr, --weight_decay, --grad_clip, --dtype and the ZeRO flags) take the config's value when
    not given, and override it when given. Each rank trains on its own batches: the effective batch is
    batch_size x grad_accum_steps x ranks. The device is DeepSpeed's accelerator: CUDA where there is a GPU, else
    the CPU (--device cpu, or DS_ACCELERATOR=cpu, chooses it on a GPU machine).

    Args:
        batch_size: Blocks per micro-batch on each rank (ds_config: train_micro_batch_size_per_gpu).
        dtype: fp32, bf16 or fp16 (DeepSpeed mixed precision: the model computes in 16 bits, the optimizer keeps
            fp32 master weights; fp16 adds dynamic loss scaling); the config's fp16 / bf16 "enabled" when not given.
        device: auto (each rank on the GPU its launcher gives it, or the CPU without CUDA) or cpu (DeepSpeed's CPU
            accelerator, as DS_ACCELERATOR=cpu).
        local_rank: This process's GPU on its machine; the deepspeed launcher passes it (torchrun sets LOCAL_RANK).
        ds_config: DeepSpeed JSON config (precision, ZeRO, optimizer, clipping). The merged, effective config is
            saved as ds_config.json in the experiment directory; a resume starts from that one unless given.
        zero_stage: ZeRO stage 0 (plain data parallelism), 1 (partition the optimizer states), 2 (and the
            gradients) or 3 (and the parameters); the config's when not given.
        offload_optimizer: none or cpu: keep the optimizer states and step in CPU memory (ZeRO-Offload, stage >= 1).
        offload_param: none or cpu: keep the parameters in CPU memory between uses (ZeRO-3 only).
        compile: Compile the loss (encoder, sparse head, cross-entropy) with torch.compile, as train_bert.py does;
            on by default for ZeRO stages 0-2, off for stage 3 (whose parameter hooks torch.compile cannot trace).
    """
    if os.environ.get("RANK", "0") != "0":  # under a launcher: rank 0 alone says what every rank would say
        logger.remove()
        logger.add(sys.stderr, level="ERROR")
    all_flags = inspect.signature(train).bind(ds_config=ds_config, zero_stage=zero_stage,
                                              offload_optimizer=offload_optimizer, offload_param=offload_param,
                                              compile=compile, **flags)
    all_flags.apply_defaults()
    flags = dict(all_flags.arguments)
    defaults = {name: parameter.default for name, parameter in inspect.signature(train).parameters.items()}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resuming = flags["load_checkpoint_dir"] is not None and flags["checkpoint_dir"] is None
    if resuming:
        experiment_dir = Path(flags["load_checkpoint_dir"])
        hparams = load_hparams(experiment_dir)
        if not (experiment_dir / LATEST_POINTER).is_file():
            raise ConfigError(f"--load_checkpoint_dir {str(experiment_dir)!r} holds no DeepSpeed checkpoint (no "
                              f"'{LATEST_POINTER}' file)")
        check_writable(flags["load_checkpoint_dir"], "--load_checkpoint_dir")
        check_resumable(experiment_dir)
        config_given = flags["ds_config"] != defaults["ds_config"]
        flags = resolve_resume_flags(flags, hparams["flags"], defaults, DS_RUN_DEFINING_FLAGS)
        if not config_given:
            flags["ds_config"] = str(experiment_dir / "ds_config.json")
        if hparams["world_size"] != world_size:
            raise ConfigError(
                f"the checkpoint in {experiment_dir} was saved by {hparams['world_size']} rank(s), this run has "
                f"{world_size}: ZeRO partitions the optimizer state per rank, so resume with {hparams['world_size']} "
                f"process(es); to change the rank count, convert the checkpoint to fp32 weights with "
                f"python {experiment_dir / 'zero_to_fp32.py'} {experiment_dir} OUTPUT_DIR and start a new run")
    config = load_ds_config(flags["ds_config"])
    with errors_named_after_config(fields_from_config(flags, config), flags["ds_config"]):
        flags, config = effective_ds_config(flags, config, world_size)
        if flags["compile"] is None:
            flags["compile"] = flags["zero_stage"] != 3
        validate_flags(flags)
        validate_ds_flags(flags)
        if flags["device"] not in ("auto", "cpu"):
            raise ConfigError(f"--device {flags['device']!r}: train_bert_ds.py puts each rank on the GPU its launcher "
                              "gives it (LOCAL_RANK); --device takes auto (that GPU, or the CPU without CUDA) or cpu")
        if flags["device"] == "cpu":  # read when deepspeed is first imported (in init_distributed)
            os.environ["DS_ACCELERATOR"] = "cpu"
        for name in ("time_budget", "init_from"):  # train_bert.py's loop and model have them; this script not yet
            if flags[name] is not None:
                raise ConfigError(f"--{name} is not supported by train_bert_ds.py yet; use train_bert.py for it")
        check_dtype_supported(flags["dtype"])
    if not resuming:
        check_writable(flags["checkpoint_dir"])
        check_sequence_limits(flags)
    prepare_op_build()
    rank, world_size, device = init_distributed(flags["local_rank"])
    check_memory(flags, device)
    experiment_dir = run_training(flags, config, rank, world_size, device)
    return str(experiment_dir) if rank == 0 else None  # fire prints what train returns: once, not once per rank


inherit_flags(train, train_bert.train, FLAGS_FROM_CONFIG)


def run_training(flags: dict[str, Any], config: dict[str, Any], rank: int, world_size: int,
                 device: torch.device) -> Path:
    """Prepare data and model on every rank, agree on the experiment directory, build the engine, train, export."""
    import deepspeed

    torch.manual_seed(flags["seed"])  # the same initial weights on every rank
    random.seed(flags["seed"])
    np.random.seed(flags["seed"])

    def prepare(tokenizer_dir: Path | None) -> tuple[PreparedData, torch.nn.Module]:
        # Every rank builds the same initial model (on a resume the checkpoint's weights replace it).
        data = prepare_data(flags, tokenizer_dir)
        model = create_model(flags["num_layers"], flags["num_heads"], flags["ff_dim"], flags["h_dim"],
                             flags["dropout"], data.tokenizer, flags["max_seq_length"],
                             output_bias=unigram_output_bias(data.token_sample(), len(data.tokenizer)),
                             positions=flags["positions"])
        return data, model

    resuming = flags["checkpoint_dir"] is None
    progress = RunProgress(Path(flags["load_checkpoint_dir"]) if resuming else None)
    with contextlib.ExitStack() as lock, reported_peer_failures(rank, progress), reported_stops(flags, progress):
        if resuming:
            def claim_experiment() -> bool:  # rank 0 holds the experiment's lock; False: the run is finished
                lock.enter_context(experiment_lock(progress.experiment_dir))
                completed_step = load_hparams(progress.experiment_dir).get(COMPLETED_KEY)
                return check_resume_target(flags, saved_step(progress.experiment_dir), progress.experiment_dir,
                                           completed_step)

            if not run_on_rank0(claim_experiment, rank):
                return progress.experiment_dir
            data, model = prepare(progress.experiment_dir / "tokenizer")
        else:  # rank 0 creates the directory once its inputs are loaded; the rest follow
            prepared = {}
            if flags["tokenizer"] != "bpe":
                # Every rank prepares at once: the first to take the token store's file lock builds the store while
                # the others wait on the lock (not in a collective, whose timeout a long tokenization would exceed),
                # then they all memory-map the same files.
                prepared["data"], prepared["model"] = prepare(None)

            def start_experiment() -> str:
                if not prepared:  # a BPE tokenizer is trained by rank 0 alone; the others load it from the experiment
                    prepared["data"], prepared["model"] = prepare(None)
                experiment_dir = create_experiment(flags, prepared["data"], prepared["model"], world_size=world_size,
                                                   deepspeed_version=deepspeed.__version__)
                lock.enter_context(experiment_lock(experiment_dir))  # nobody else knows its name yet
                return str(experiment_dir)

            progress.experiment_dir, progress.created = Path(run_on_rank0(start_experiment, rank)), rank == 0
            data, model = (prepared["data"], prepared["model"]) if prepared else prepare(
                progress.experiment_dir / "tokenizer")
        experiment_dir = progress.experiment_dir
        if rank > 0:  # its own dropout masks; rank 0 keeps the plain script's stream, so one process matches it exactly
            torch.manual_seed(int(np.random.SeedSequence([flags["seed"], rank]).generate_state(1)[0]))
        num_parameters = train_bert.count_parameters(model)  # ZeRO-3 empties the model's own tensors in the engine
        engine = create_engine(model, flags, config)
        control_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
        start_step, data_position = 0, (0, 0)
        if resuming:
            start_step, data_position = load_ds_checkpoint(engine, experiment_dir)
            if rank == 0:
                record_flag_changes(experiment_dir, flags, start_step)

        with experiment_logging(experiment_dir, start_step) if rank == 0 else QuietRank() as metrics:
            if rank == 0:
                atomic_write(experiment_dir / "ds_config.json", lambda file: json.dump(config, file, indent=2),
                             mode="w")
                log_run_start(experiment_dir, start_step, num_parameters, data, flags, device)
                logger.info(f"DeepSpeed {deepspeed.__version__}: {world_size} rank(s), ZeRO stage "
                            f"{flags['zero_stage']}, {flags['dtype']}; effective config "
                            f"{json.dumps(config, sort_keys=True)}")
            progress.started = True
            training_loop(flags, engine, data, experiment_dir, metrics, start_step, data_position, rank, world_size,
                          control_group)
            tag = f"{TAG_PREFIX}{flags['num_iterations']}"
            if rank == 0:
                exported = consolidated_model(engine, experiment_dir, tag, flags, data.tokenizer)
                export_and_demo(exported, data.tokenizer, experiment_dir, torch.device("cpu"), flags["max_seq_length"])
                mark_completed(experiment_dir, flags["num_iterations"])
        dist.barrier(group=control_group)
    return experiment_dir


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


def evaluate_on_ranks(engine: Any, batches: list[dict[str, torch.Tensor]], rank: int, world_size: int
                      ) -> torch.Tensor:
    """Each rank evaluates its share of `batches`; the [loss sum, count] totals add up over ranks.

    Every rank runs the same number of forwards (ZeRO-3 gathers each layer's parameters from all ranks inside
    forward), so a rank with one batch fewer than the others runs one more and drops its result. No autocast:
    the engine already holds the model in the training dtype.
    """
    shard = batches[rank::world_size]
    totals = evaluate(engine, shard, engine.device, contextlib.nullcontext, loss_function=engine_loss)
    if len(shard) < math.ceil(len(batches) / world_size):
        evaluate(engine, batches[:1], engine.device, contextlib.nullcontext, loss_function=engine_loss)
    dist.all_reduce(totals)
    return totals


def training_loop(flags: dict[str, Any], engine: Any, data: PreparedData, experiment_dir: Path,
                  metrics: MetricsLogger | QuietRank, start_step: int, data_position: tuple[int, int], rank: int,
                  world_size: int, control_group: Any) -> None:
    """Train from `start_step` to `num_iterations`, logging, evaluating and checkpointing along the way."""
    device = engine.device
    validation = eval_batches(data.validation_blocks, flags["batch_size"], flags["seed"], data.masking)
    batches = train_batches(data.train_blocks, flags["batch_size"], flags["seed"], data.masking, data_position,
                            flags["num_workers"], pin_memory=device.type == "cuda", rank=rank, world_size=world_size)
    window = LossWindow(device, flags["grad_accum_steps"], check_finite=flags["dtype"] != "fp16")

    engine.train()
    progress = tqdm(total=flags["num_iterations"], initial=start_step, desc="training", unit="step",
                    disable=None if rank == 0 else True)
    with StopSignal() as stop, progress:  # the progress bar closes however the loop ends
        for step in range(start_step + 1, flags["num_iterations"] + 1):
            for _ in range(flags["grad_accum_steps"]):
                data_position, batch = next(batches)
                batch = to_device(batch, device)
                loss = engine(**batch)
                # The engine divides the loss by grad_accum_steps (and multiplies it by the fp16 loss scale), and
                # steps the optimizer (clip, step, zero_grad, LR schedule) only after the last micro-batch.
                engine.backward(loss)
                engine.step()
                window.add(step, loss, batch["masked_labels"])
            progress.update()
            # A signal may reach the ranks at different steps; they must agree, or one would wait in a collective.
            stop.signum = any_rank(stop.signum or 0, control_group) or None

            if step % flags["log_every"] == 0 or step == flags["num_iterations"]:
                window_over_ranks(window, world_size)
                nonfinite_over_ranks(window)
                window.raise_if_nonfinite(experiment_dir)
                grad_norm = engine.get_global_grad_norm()
                record = window.record(step, engine.get_lr()[0], None if grad_norm is None else float(grad_norm),
                                       flags, engine.module.model.config, device, world_size)
                if flags["dtype"] == "fp16":
                    record["loss_scale"] = float(engine.optimizer.loss_scale)
                metrics.log(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}")

            if step % flags["eval_every"] == 0 or step == flags["num_iterations"]:
                log_evaluation(metrics, step, "eval", evaluate_on_ranks(engine, validation, rank, world_size))
            if step % flags["checkpoint_every"] == 0 or step == flags["num_iterations"] or stop.signum is not None:
                nonfinite_over_ranks(window)
                window.raise_if_nonfinite(experiment_dir)
                raise_if_weights_nonfinite_on_any_rank(engine, step, experiment_dir, control_group)
                tag = save_ds_checkpoint(engine, experiment_dir, step, data_position, flags, control_group)
                logger.info(f"saved checkpoint {tag}")
            if stop.signum is not None:
                raise stop.interruption(step, experiment_dir)
    log_test_evaluation(metrics, data, flags, lambda test: evaluate_on_ranks(engine, test, rank, world_size))


# ----------------------------------------------------------------------------------------------------------------------
# Hardening: DeepSpeed's start-up never waits silently on the build of its op.
# ----------------------------------------------------------------------------------------------------------------------

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
                logger.warning(f"removed the stale build lock {lock}: no process holds it (a start was killed while "
                               "it built DeepSpeed's op)")
        if not holders:  # gone, or removed: look again (another start may have taken it since)
            continue
        if holders != waiting_for:
            waiting_for = holders
            logger.info(f"waiting for process {', '.join(map(str, holders))}, which is building DeepSpeed's op in "
                        f"{build_directory} (about a minute)")
        if time.monotonic() > deadline:
            raise ConfigError(f"DeepSpeed's op in {build_directory} has been building for over "
                              f"{OP_BUILD_WAIT.total_seconds() / 60:.0f} minutes (process "
                              f"{', '.join(map(str, holders))}); stop that process, or delete {build_directory}, "
                              "then start again")
        time.sleep(1)
    if not list(build_directory.glob("*.so")):
        logger.info(f"building DeepSpeed's {build_directory.name} op in {build_directory}, about a minute the first "
                    "time (later starts reuse it)")


# ----------------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    train_bert.main(train)

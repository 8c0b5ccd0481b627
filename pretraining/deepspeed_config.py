"""ds_config.json and the flags: one source of truth per setting, merged and checked before DeepSpeed starts."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from loguru import logger

from pretraining import flag_rules
from pretraining.errors import ConfigError
from pretraining.flag_rules import DTYPES, RUN_DEFINING_FLAGS, resolve_resume_flags, validate_flags
from pretraining.safeguards import (
    LATEST_POINTER,
    atomic_write,
    check_resumable,
    check_sequence_limits,
    check_writable,
    load_hparams,
)

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
DS_RUN_DEFINING_FLAGS = (*RUN_DEFINING_FLAGS, "zero_stage", "dtype", "offload_optimizer", "offload_param")


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


def effective_ds_config(
    flags: dict[str, Any], config: dict[str, Any], world_size: int, plain_defaults: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge flags and config both ways; return (resolved flags, the config DeepSpeed runs with). A flag neither
    given nor in the config takes its default in `plain_defaults` (train_bert.py's).

    DeepSpeed checks train_batch_size == micro batch x accumulation steps x ranks; it is derived here, and a
    config that states another number is an error rather than silently one or the other.
    """
    flags, config = dict(flags), copy.deepcopy(config)
    fallback = {**(plain_defaults or {}), "zero_stage": 0, "offload_optimizer": "none", "offload_param": "none"}
    for flag, path in CONFIG_FIELDS.items():
        *parents, key = path
        section = config
        for parent in parents:
            section = section.setdefault(parent, {})
        if flags[flag] is None:
            flags[flag] = section[key] if key in section else fallback[flag]
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
            "remove train_batch_size (it is derived) or make them agree"
        )
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
    enabled = [
        dtype for dtype in ("fp16", "bf16") if isinstance(config.get(dtype), dict) and config[dtype].get("enabled")
    ]
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
    if flags["dtype"] not in DTYPES:  # train_bert.py's "auto": here ds_config.json decides
        raise ConfigError(
            f"--dtype must be one of {', '.join(DTYPES)} here, or left out (ds_config.json's "
            f'fp16 / bf16 "enabled" decides); got {flags["dtype"]!r}'
        )
    if flags["zero_stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"--zero_stage must be 0, 1, 2 or 3; got {flags['zero_stage']!r}")
    for name in ("offload_optimizer", "offload_param"):
        if flags[name] not in OFFLOAD_DEVICES:
            raise ConfigError(f"--{name} must be one of {', '.join(OFFLOAD_DEVICES)}; got {flags[name]!r}")
    if flags["offload_optimizer"] != "none" and flags["zero_stage"] == 0:
        raise ConfigError(
            "--offload_optimizer cpu needs ZeRO (--zero_stage 1, 2 or 3): only a partitioned optimizer "
            "can live in CPU memory"
        )
    if flags["offload_param"] != "none" and flags["zero_stage"] != 3:
        raise ConfigError(
            f"--offload_param cpu needs --zero_stage 3 (only stage 3 partitions the parameters); "
            f"got --zero_stage {flags['zero_stage']}"
        )
    if flags["compile"] and flags["zero_stage"] == 3:
        raise ConfigError(
            "--compile is not supported with --zero_stage 3 here (ZeRO-3 gathers parameters in "
            "module hooks that torch.compile would trace); use --zero_stage 0, 1 or 2"
        )


def check_dtype_supported(dtype: str) -> None:
    """Fail at once, with the fix, where DeepSpeed's accelerator cannot train in `dtype`."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported[dtype]:
        hint = "use --dtype bf16 or fp32" if supported["bf16"] else "use --dtype fp16 or fp32"
        raise ConfigError(
            f"--dtype {dtype} is not supported by DeepSpeed's {accelerator.device_name()} accelerator "
            f"on this machine; {hint}"
        )


def resolve_ds_flags(
    flags: dict[str, Any], defaults: dict[str, Any], plain_defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """train_bert_ds.py's flags resolved and checked before any rank starts: a resume's saved flags, ds_config.json
    merged with the flags (see `effective_ds_config`), every value validated. Returns (flags, effective config).

    `defaults`: every flag's default here (None for the flags ds_config.json sets: "take the config's value");
    `plain_defaults`: train_bert.py's, for a setting that neither the flags nor the config give."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resuming = flags["load_checkpoint_dir"] is not None and flags["checkpoint_dir"] is None
    if resuming:
        experiment_dir = Path(flags["load_checkpoint_dir"])
        check_resumable(experiment_dir, LATEST_POINTER)
        hparams = load_hparams(experiment_dir)
        config_given = flags["ds_config"] != defaults["ds_config"]
        flags = resolve_resume_flags(flags, hparams["flags"], defaults, DS_RUN_DEFINING_FLAGS)
        if not config_given:
            flags["ds_config"] = str(experiment_dir / "ds_config.json")
        if hparams["world_size"] != world_size:
            raise ConfigError(
                f"the checkpoint in {experiment_dir} was saved by {hparams['world_size']} rank(s), this run has "
                f"{world_size}: ZeRO partitions the optimizer state per rank, so resume with {hparams['world_size']} "
                f"process(es); to change the rank count, convert the checkpoint to fp32 weights with "
                f"python {experiment_dir / 'zero_to_fp32.py'} {experiment_dir} OUTPUT_DIR and start a new run"
            )
    config = load_ds_config(flags["ds_config"])
    with errors_named_after_config(fields_from_config(flags, config), flags["ds_config"]):
        flags, config = effective_ds_config(flags, config, world_size, plain_defaults)
        if flags["compile"] is None:
            flags["compile"] = flags["zero_stage"] != 3
        validate_flags(flags)
        validate_ds_flags(flags)
        if flags["device"] not in ("auto", "cpu"):
            raise ConfigError(
                f"--device {flags['device']!r}: train_bert_ds.py puts each rank on the GPU its launcher "
                "gives it (LOCAL_RANK); --device takes auto (that GPU, or the CPU without CUDA) or cpu"
            )
        if flags["device"] == "cpu":  # read when deepspeed is first imported (in init_distributed)
            os.environ["DS_ACCELERATOR"] = "cpu"
        check_dtype_supported(flags["dtype"])
    if not resuming:
        check_writable(flags["checkpoint_dir"])
        check_sequence_limits(flags)
    return flags, config


# Per-process flags do not enter a resume's flag history; neither does the config file's path (a resume may name another
# file: its values are compared field by field instead).
PER_PROCESS_FLAGS = (*flag_rules.PER_PROCESS_FLAGS, "ds_config")


def record_effective_config(
    experiment_dir: Path, config: dict[str, Any], flags: dict[str, Any], world_size: int
) -> None:
    """Write the merged config as the experiment's ds_config.json (a resume starts from it) and log it in one line."""
    import deepspeed

    atomic_write(experiment_dir / "ds_config.json", lambda file: json.dump(config, file, indent=2), mode="w")
    logger.info(
        f"DeepSpeed {deepspeed.__version__}: {world_size} rank(s), ZeRO stage {flags['zero_stage']}, {flags['dtype']}; "
        f"effective config {json.dumps(config, sort_keys=True)}"
    )

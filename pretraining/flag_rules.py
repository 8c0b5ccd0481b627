"""Flags: validation, device and precision resolution, resume rules, and the command line."""

from __future__ import annotations

import datetime
import inspect
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from loguru import logger

from pretraining.corpus import offline_hint
from pretraining.errors import ConfigError
from pretraining.safeguards import atomic_write, check_memory, check_sequence_limits, check_writable, load_hparams
from pretraining.time_budget import AUTO_SIZED_FLAGS, parse_duration

# Flags that fix the model's or the data's shape: a resume must use the values the checkpoint was trained with.
RUN_DEFINING_FLAGS = (
    "dataset",
    "dataset_config",
    "tokenizer",
    "bpe_vocab_size",
    "max_seq_length",
    "num_layers",
    "num_heads",
    "ff_dim",
    "h_dim",
    "positions",
    "batch_size",
    "grad_accum_steps",
    "seed",
    "init_from",
    "streaming",
)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


MAX_SEED = 2**32 - 1  # np.random.seed's limit (torch's is 2**64 - 1)


# Flags that describe this process, not the experiment: never recorded as a change of the experiment's flags.
PER_PROCESS_FLAGS = ("checkpoint_dir", "load_checkpoint_dir", "device", "local_rank")


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
    require(
        len(given_dirs) == 1,
        "give exactly one of --checkpoint_dir DIR (start a new experiment in DIR) or --load_checkpoint_dir "
        f"EXPERIMENT_DIR (resume it); got {'both' if given_dirs else 'neither'}",
    )
    for name in (
        "num_layers",
        "num_heads",
        "ff_dim",
        "h_dim",
        "batch_size",
        "grad_accum_steps",
        "num_iterations",
        "checkpoint_every",
        "log_every",
        "eval_every",
        "keep_last",
        "bpe_vocab_size",
        "max_seq_length",
    ):
        require(is_int(flags[name]) and flags[name] > 0, f"--{name} must be a positive integer; got {flags[name]!r}")
    for name in ("num_workers", "seed"):
        require(is_int(flags[name]) and flags[name] >= 0, f"--{name} must be an integer >= 0; got {flags[name]!r}")
    require(
        flags["seed"] <= MAX_SEED, f"--seed must be at most {MAX_SEED} (numpy seeds are 32-bit); got {flags['seed']}"
    )
    warmup = flags["warmup_steps"]
    require(
        (is_int(warmup) and warmup >= 0) or (is_number(warmup) and 0 <= warmup < 1),
        f"--warmup_steps must be a share of the run in [0, 1) (0.06: the first 6%) or a whole number of steps; "
        f"got {warmup!r}",
    )
    if flags.get("time_budget") is not None:
        parse_duration(flags["time_budget"])
        require(
            not (is_int(warmup) and warmup >= 1),
            f"--warmup_steps {warmup} is a number of steps, but a --time_budget run has no fixed number of steps; "
            "give the warmup as a share of the budget (e.g. 0.06)",
        )
    require(
        flags.get("positions", "rotary") in POSITIONS,
        f"--positions must be one of {', '.join(POSITIONS)}; got {flags.get('positions')!r}",
    )
    for name in ("whole_word_mask", "auto_size"):
        require(isinstance(flags.get(name, False), bool), f"--{name} must be True or False; got {flags.get(name)!r}")
    require(
        flags.get("init_from") is None or (isinstance(flags["init_from"], str) and flags["init_from"] != ""),
        f"--init_from must be a Hugging Face masked-LM folder or Hub name; got {flags.get('init_from')!r}",
    )
    for name in ("mask_prob", "random_replace_prob", "unmask_replace_prob", "dropout"):
        require(
            is_number(flags[name]) and 0 <= flags[name] <= 1,
            f"--{name} must be a probability in [0, 1]; got {flags[name]!r}",
        )
    require(flags["mask_prob"] > 0, "--mask_prob must be > 0: with 0 no token is ever predicted and nothing trains")
    require(flags["dropout"] < 1, f"--dropout must be < 1; got {flags['dropout']!r}")
    require(
        flags["random_replace_prob"] + flags["unmask_replace_prob"] <= 1,
        f"--random_replace_prob + --unmask_replace_prob must be <= 1 (they split the selected tokens); got "
        f"{flags['random_replace_prob']} + {flags['unmask_replace_prob']} = "
        f"{flags['random_replace_prob'] + flags['unmask_replace_prob']}",
    )
    for name in ("lr", "weight_decay", "grad_clip"):
        require(
            is_number(flags[name]) and math.isfinite(flags[name]) and flags[name] >= 0,
            f"--{name} must be a number >= 0; got {flags[name]!r}",
        )
    require(flags["lr"] > 0, f"--lr must be > 0; got {flags['lr']!r}")
    require(
        flags["h_dim"] % flags["num_heads"] == 0,
        f"--h_dim {flags['h_dim']} must be divisible by --num_heads {flags['num_heads']}",
    )
    require(
        flags["max_seq_length"] >= 8,
        f"--max_seq_length must be at least 8 (2 of its tokens are <s> and </s>); got {flags['max_seq_length']}",
    )
    require(
        flags["dtype"] in ("auto", *DTYPES), f"--dtype must be one of auto, {', '.join(DTYPES)}; got {flags['dtype']!r}"
    )
    require(isinstance(flags["compile"], bool), f"--compile must be True or False; got {flags['compile']!r}")
    require(
        is_int(flags["local_rank"]) and flags["local_rank"] >= -1,
        f"--local_rank must be -1 (not under a launcher) or a GPU index >= 0; got {flags['local_rank']!r}",
    )
    require(
        isinstance(flags.get("device", "auto"), str)
        and re.fullmatch(r"auto|cpu|cuda(:\d+)?", flags.get("device", "auto")) is not None,
        f"--device must be auto, cpu, cuda or cuda:N (N a GPU index); got {flags.get('device')!r}",
    )
    for name in ("dataset", "tokenizer"):
        require(
            isinstance(flags[name], str) and flags[name] != "",
            f"--{name} must be a name or a path; got {flags[name]!r}",
        )
    require(
        flags["num_proc"] is None or (is_int(flags["num_proc"]) and flags["num_proc"] > 0),
        f"--num_proc must be a positive integer (default: all {os.cpu_count()} cores); got {flags['num_proc']!r}",
    )
    require(
        is_int(flags["eval_blocks"]) and flags["eval_blocks"] >= 0,
        f"--eval_blocks must be an integer >= 0 (0: the whole validation split); got {flags['eval_blocks']!r}",
    )
    require(isinstance(flags["streaming"], bool), f"--streaming must be True or False; got {flags['streaming']!r}")
    require(
        flags["data_cache"] is None or (isinstance(flags["data_cache"], str) and flags["data_cache"] != ""),
        f"--data_cache must be a folder; got {flags['data_cache']!r}",
    )
    require(
        not (flags["streaming"] and flags["tokenizer"] == "bpe"),
        "--tokenizer bpe trains on the whole train split, which a --streaming corpus never holds at once; train a "
        "tokenizer on a sample first and pass its folder as --tokenizer",
    )
    require(
        not (flags["streaming"] and flags["eval_blocks"] == 0),
        "--eval_blocks 0 (the whole validation split) cannot be used with --streaming; give a number of blocks",
    )


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
    asked = (
        f"--device {device}"
        if device != "auto"
        else f"--local_rank {local_rank}"
        if local_rank >= 0
        else "--device auto"
    )
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{asked} asks for GPU {index}, but this machine has no CUDA GPU; use --device cpu (or "
            "auto) to train on the CPU"
        )
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"{asked} asks for GPU {index}, but there are only {torch.cuda.device_count()} "
            f"(0..{torch.cuda.device_count() - 1})"
        )
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"--dtype bf16 needs an Ampere or newer GPU; {torch.cuda.get_device_name(index)} "
            "cannot; use --dtype fp16 or fp32"
        )
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


def resolve_resume_flags(
    flags: dict[str, Any],
    saved: dict[str, Any],
    defaults: dict[str, Any],
    run_defining: tuple[str, ...] = RUN_DEFINING_FLAGS,
) -> dict[str, Any]:
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
            raise ConfigError(
                f"--{name} {flags[name]!r} differs from the checkpoint's {saved_value!r}; it changes the "
                "model or data shape, so a resume must keep it (start a new experiment instead)"
            )
        else:
            logger.info(f"resume: --{name} changed from {saved_value!r} to {flags[name]!r}")
    return resolved


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
        raise ConfigError(
            f"--init_from {source!r} is a {config.model_type!r} model; this script continues RoBERTa-"
            "architecture masked LMs (roberta, xlm-roberta, camembert), RoFormer, or an hf_model/ it "
            "exported"
        )
    resolved = dict(flags)
    from_checkpoint = {
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "ff_dim": config.intermediate_size,
        "h_dim": config.hidden_size,
        "tokenizer": source,
        "positions": "learned" if learned_positions else "rotary",
    }
    for name, value in from_checkpoint.items():
        if flags[name] not in (defaults[name], value):
            raise ConfigError(
                f"--{name} {flags[name]!r} disagrees with --init_from {source!r}, whose {name} is "
                f"{value!r}; leave --{name} out (it comes from the checkpoint) or give {value!r}"
            )
        resolved[name] = value
    if flags["dropout"] == defaults["dropout"]:
        resolved["dropout"] = config.hidden_dropout_prob
    # RoBERTa numbers positions from pad_token_id + 1 (see create_model); RoFormer from 0.
    limit = config.max_position_embeddings - (config.pad_token_id + 1 if learned_positions else 0)
    if flags["max_seq_length"] > limit:
        raise ConfigError(
            f"--max_seq_length {flags['max_seq_length']} is longer than the {limit} positions of "
            f"--init_from {source!r}; use --max_seq_length {limit} or less"
        )
    logger.info(
        f"init_from {source}: " + ", ".join(f"{name} {resolved[name]}" for name in (*from_checkpoint, "dropout"))
    )
    return resolved


POSITIONS = ("rotary", "learned")


def flag_defaults(function: Callable) -> dict[str, Any]:
    """{flag: default} of a script's `train` (its keyword parameters)."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD
    }


def record_flag_changes(
    experiment_dir: Path, flags: dict[str, Any], step: int, per_process: tuple[str, ...] = PER_PROCESS_FLAGS
) -> None:
    """Make hparams.json's flags the ones this resume runs with, keeping the old values in its `flag_history`
    (except the `per_process` ones, which belong to a process rather than to the run).

    A plain `--load_checkpoint_dir DIR` then continues with the latest values (a run extended to 40 steps and then
    stopped continues to 40), and the history says which values trained which steps.
    """
    hparams = load_hparams(experiment_dir)
    changed = {
        name: {"from": hparams["flags"][name], "to": value}
        for name, value in flags.items()
        if name in hparams["flags"] and name not in per_process and hparams["flags"][name] != value
    }
    if changed:
        hparams.setdefault("flag_history", []).append(
            {"from_step": step, "time": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}", "changed": changed}
        )
        hparams["flags"] |= {name: change["to"] for name, change in changed.items()}
        atomic_write(experiment_dir / "hparams.json", lambda file: json.dump(hparams, file, indent=2), mode="w")


def check_given_flags(flags: dict[str, Any], defaults: dict[str, Any]) -> None:
    """The flags as given, before anything else: each value valid, and no two that contradict each other."""
    validate_flags(flags)
    if flags["time_budget"] is not None and flags["num_iterations"] != defaults["num_iterations"]:
        raise ConfigError(
            f"give either --num_iterations ({flags['num_iterations']} steps) or --time_budget "
            f"({flags['time_budget']!r}), not both: a budgeted run trains until its time is spent"
        )


def resolve_new_run(flags: dict[str, Any], defaults: dict[str, Any]) -> tuple[dict[str, Any], torch.device, set | None]:
    """A new experiment's flags resolved and checked before anything is created: --init_from's shape, the device,
    the precision, that the checkpoint folder is writable and the model fits. Returns (flags, device, the flags to
    keep when auto-sizing for a time budget, or None for no auto-sizing)."""
    if flags["init_from"] is not None:
        flags = resolve_init_from(flags, defaults)
    check_writable(flags["checkpoint_dir"])
    check_sequence_limits(flags)
    device = resolve_device(flags["device"], flags["local_rank"], flags["dtype"])
    flags["dtype"] = resolve_dtype(flags["dtype"], device)
    check_memory(flags, device)
    given = {name for name in AUTO_SIZED_FLAGS if flags[name] != defaults[name]}
    auto_size = (
        flags["auto_size"]
        and flags["time_budget"] is not None
        and flags["init_from"] is None
        and not ({"num_layers", "h_dim", "num_heads", "ff_dim"} <= given)
    )
    return flags, device, given if auto_size else None


def resolve_resumed_run(flags: dict[str, Any], defaults: dict[str, Any]) -> tuple[dict[str, Any], torch.device]:
    """A resume's flags: the experiment's saved ones, with the changes a resume may make (checked), and the device.
    Call with the experiment's lock held: the last run may have updated its hparams.json."""
    experiment_dir = Path(flags["load_checkpoint_dir"])
    flags = resolve_resume_flags(flags, load_hparams(experiment_dir)["flags"], defaults)
    validate_flags(flags)
    return flags, resolve_device(flags["device"], flags["local_rank"], flags["dtype"])

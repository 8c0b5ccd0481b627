"""Masked language model pretraining of a RoBERTa encoder with DeepSpeed: `train_bert.py` plus what DeepSpeed changes.

Data, masking, the model, the sparse MLM loss, the experiment directory, evaluation and logging all come from
`train_bert.py` (as `train_bert.X`). What is here, top to bottom:

    the engine (deepspeed.initialize) -> checkpoints and export -> a run on every rank -> the training loop ->
    train() (the command line)

Merging ds_config.json with the flags, and the ranks' plumbing (process group, failed peers, DeepSpeed's op build),
live in pretraining/deepspeed_config.py and pretraining/ranks.py.

Run it:

    python train_bert_ds.py --checkpoint_dir ./experiments                  # one process (GPU 0, or the CPU)
    deepspeed train_bert_ds.py --checkpoint_dir ./experiments               # one process per GPU of this machine
    torchrun --nproc_per_node 2 train_bert_ds.py --checkpoint_dir ./experiments
    python train_bert_ds.py --load_checkpoint_dir ./experiments/bert_pretrain...   # resume (same number of ranks)
    python train_bert_ds.py --help                                           # every flag, documented
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from loguru import logger
from tqdm.auto import tqdm

import train_bert
from pretraining import cli, deepspeed_config, flag_rules, logs, ranks, safeguards, speed
from pretraining.errors import CheckpointError, ConfigError
from pretraining.safeguards import LATEST_POINTER  # the file that names the newest checkpoint

if TYPE_CHECKING:
    import transformers


# ----------------------------------------------------------------------------------------------------------------------
# The engine: deepspeed.initialize wraps the model, the optimizer and the LR schedule.
# ----------------------------------------------------------------------------------------------------------------------


class SparseMLM(torch.nn.Module):
    """The model with train_bert.py's sparse MLM loss as its forward.

    DeepSpeed's engine calls the module's forward, and ZeRO-3 gathers and releases each layer's parameters in
    forward hooks that start from the root module, so the whole loss computation must run inside one forward.
    Checkpoint keys get a `model.` prefix; the export removes it.
    """

    def __init__(self, model: "transformers.PreTrainedModel",
                 loss_function: Callable[..., torch.Tensor] = train_bert.mlm_loss):
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
        model=SparseMLM(model, speed.compiled(train_bert.mlm_loss) if flags["compile"] else train_bert.mlm_loss),
        model_parameters=train_bert.parameter_groups(model, flags["weight_decay"]),
        lr_scheduler=lambda optimizer: train_bert.create_lr_scheduler(optimizer, flags["warmup_steps"],
                                                                      flags["num_iterations"]),
        config=config,
        dist_init_required=False,
    )
    return engine


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints and export: one folder per step (each rank writes its shard); the client state carries the rest.
# ----------------------------------------------------------------------------------------------------------------------


TAG_PREFIX = "global_step"  # DeepSpeed's own naming of checkpoint folders


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
    dist.all_gather_object(all_rng, train_bert.rng_states(), group=control_group)
    tag = f"{TAG_PREFIX}{step}"
    client_state = {"step": step, "data_position": list(data_position), "rng": all_rng, "flags": flags}
    with safeguards.save_failure_reported(tag, experiment_dir):
        engine.save_checkpoint(str(experiment_dir), tag=tag, client_state=client_state, save_latest=False)
        if dist.get_rank() == 0:
            safeguards.atomic_write(experiment_dir / LATEST_POINTER, lambda file: file.write(tag), mode="w")
            for old in checkpoint_tags(experiment_dir)[:-flags["keep_last"]]:
                shutil.rmtree(experiment_dir / old)
    dist.barrier(group=control_group)
    return tag


def load_ds_checkpoint(engine: Any, experiment_dir: Path) -> tuple[int, tuple[int, int]]:
    """Load the checkpoint `latest` names into the engine and this rank's RNGs; return (step, data position)."""
    path, client_state = engine.load_checkpoint(str(experiment_dir))
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint that {experiment_dir / LATEST_POINTER} names")
    train_bert.set_rng_states(client_state["rng"][dist.get_rank()])
    return client_state["step"], tuple(client_state["data_position"])


def bf16_optimizer_master_weights(engine: Any) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights of an engine whose optimizer is DeepSpeed's BF16_Optimizer (what bf16 on ZeRO-1 with
    `"data_types": {"grad_accum_dtype": "fp32"}` uses), gathered from the ranks' partitions; None otherwise.

    zero_to_fp32 cannot read that optimizer's checkpoints, so they come from the live engine: a collective, which
    every rank calls.
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.utils import safe_get_full_fp32_param

    if not isinstance(engine.optimizer, BF16_Optimizer):
        return None
    parameters = engine.module.named_parameters(remove_duplicate=False)  # tied weights under each of their names
    return {name: safe_get_full_fp32_param(param).cpu() for name, param in parameters if param.requires_grad}


def consolidated_model(engine: Any, experiment_dir: Path, tag: str, flags: dict[str, Any], tokenizer: Any,
                       master_weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The trained model as one fp32 masked LM (create_model's) on the CPU (call on rank 0 after the final checkpoint).

    The fp32 master weights: `master_weights` (see bf16_optimizer_master_weights) when given; with ZeRO they are
    partitioned across the ranks' optimizer states, and DeepSpeed's zero_to_fp32 gathers them from the checkpoint
    (ZeRO-3 included). Without ZeRO every rank holds the whole model: its weights (16-bit ones under bf16 or fp16,
    as its forward used them).
    """
    if master_weights is not None:
        state = master_weights
    elif engine.zero_optimization():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(experiment_dir), tag=tag)
    else:
        state = engine.module.state_dict()
    model = train_bert.create_model(flags["num_layers"], flags["num_heads"], flags["ff_dim"], flags["h_dim"],
                                    flags["dropout"], tokenizer, flags["max_seq_length"], positions=flags["positions"])
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
# A run: every rank runs this script; rank 0 decides and writes, the others follow.
# ----------------------------------------------------------------------------------------------------------------------


def run_training(flags: dict[str, Any], config: dict[str, Any], rank: int, world_size: int,
                 device: torch.device) -> Path:
    """Prepare data and model on every rank, agree on the experiment directory, build the engine, train, export."""
    import deepspeed

    train_bert.seed_rngs(flags["seed"])  # the same initial weights on every rank

    def prepare(tokenizer_dir: Path | None) -> tuple[train_bert.PreparedData, torch.nn.Module]:
        # Every rank builds the same initial model (on a resume the checkpoint's weights replace it).
        data = train_bert.prepare_data(flags, tokenizer_dir)
        output_bias = train_bert.unigram_output_bias(data.train_blocks.token_sample(), len(data.tokenizer))
        model = train_bert.create_model(flags["num_layers"], flags["num_heads"], flags["ff_dim"], flags["h_dim"],
                                        flags["dropout"], data.tokenizer, flags["max_seq_length"],
                                        output_bias=output_bias, positions=flags["positions"])
        return data, model

    resuming = flags["checkpoint_dir"] is None
    progress = safeguards.RunProgress(Path(flags["load_checkpoint_dir"]) if resuming else None)
    stops = safeguards.reported_stops(flags, progress)
    with contextlib.ExitStack() as lock, ranks.reported_peer_failures(rank, progress), stops:
        if resuming:
            def claim_experiment() -> bool:  # rank 0 holds the experiment's lock; False: the run is finished
                lock.enter_context(safeguards.experiment_lock(progress.experiment_dir))
                return safeguards.check_resume_target(flags, progress.experiment_dir)

            if not ranks.run_on_rank0(claim_experiment, rank):
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
                experiment_dir = train_bert.create_experiment(
                    flags, prepared["data"], prepared["model"], world_size=world_size,
                    deepspeed_version=deepspeed.__version__)
                lock.enter_context(safeguards.experiment_lock(experiment_dir))  # nobody else knows its name yet
                return str(experiment_dir)

            progress.experiment_dir, progress.created = Path(ranks.run_on_rank0(start_experiment, rank)), rank == 0
            data, model = (prepared["data"], prepared["model"]) if prepared else prepare(
                progress.experiment_dir / "tokenizer")
        experiment_dir = progress.experiment_dir
        if rank > 0:  # its own dropout masks; rank 0 keeps the plain script's stream, so one process matches it exactly
            torch.manual_seed(int(np.random.SeedSequence([flags["seed"], rank]).generate_state(1)[0]))
        num_parameters = train_bert.count_parameters(model)  # ZeRO-3 empties the model's own tensors in the engine
        engine = create_engine(model, flags, config)
        control_group = dist.new_group(backend="gloo", timeout=ranks.COLLECTIVE_TIMEOUT)
        start_step, data_position = 0, (0, 0)
        if resuming:
            start_step, data_position = load_ds_checkpoint(engine, experiment_dir)
            if rank == 0:
                flag_rules.record_flag_changes(experiment_dir, flags, start_step, deepspeed_config.PER_PROCESS_FLAGS)

        with logs.experiment_logging(experiment_dir, start_step) if rank == 0 else ranks.QuietRank() as metrics:
            if rank == 0:
                train_bert.log_run_start(experiment_dir, start_step, num_parameters, data, flags, device)
                deepspeed_config.record_effective_config(experiment_dir, config, flags, world_size)
            progress.started = True
            training_loop(flags, engine, data, experiment_dir, metrics, start_step, data_position, rank, world_size,
                          control_group)
            tag = f"{TAG_PREFIX}{flags['num_iterations']}"
            master_weights = bf16_optimizer_master_weights(engine)  # on every rank: a collective
            if rank == 0:
                exported = consolidated_model(engine, experiment_dir, tag, flags, data.tokenizer, master_weights)
                train_bert.export_and_demo(exported, data.tokenizer, experiment_dir, torch.device("cpu"),
                                           flags["max_seq_length"])
                safeguards.mark_completed(experiment_dir, flags["num_iterations"])
        dist.barrier(group=control_group)
    return experiment_dir


# ----------------------------------------------------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------------------------------------------------


def training_loop(flags: dict[str, Any], engine: Any, data: train_bert.PreparedData, experiment_dir: Path,
                  metrics: logs.MetricsLogger | ranks.QuietRank, start_step: int, data_position: tuple[int, int],
                  rank: int, world_size: int, control_group: Any) -> None:
    """Train from `start_step` to `num_iterations`, logging, evaluating and checkpointing along the way."""
    device = engine.device
    validation = train_bert.EvalBatches(data.validation_blocks, flags["batch_size"], flags["seed"], data.masking)
    batches = train_bert.train_batches(data.train_blocks, flags["batch_size"], flags["seed"], data.masking,
                                       data_position, flags["num_workers"], pin_memory=device.type == "cuda",
                                       rank=rank, world_size=world_size)
    window = logs.LossWindow(device, flags["grad_accum_steps"], check_finite=flags["dtype"] != "fp16")

    engine.train()
    progress = tqdm(total=flags["num_iterations"], initial=start_step, desc="training", unit="step",
                    disable=None if rank == 0 else True)
    with safeguards.StopSignal() as stop, progress:  # the progress bar closes however the loop ends
        for step in range(start_step + 1, flags["num_iterations"] + 1):
            for _ in range(flags["grad_accum_steps"]):
                data_position, batch = next(batches)
                batch = train_bert.to_device(batch, device)
                loss = engine(**batch)
                # The engine divides the loss by grad_accum_steps (and multiplies it by the fp16 loss scale), and
                # steps the optimizer (clip, step, zero_grad, LR schedule) only after the last micro-batch.
                engine.backward(loss)
                engine.step()
                window.add(step, loss, batch["masked_labels"])
            progress.update()
            # A signal may reach the ranks at different steps; they must agree, or one would wait in a collective.
            stop.signum = ranks.any_rank(stop.signum or 0, control_group) or None

            if step % flags["log_every"] == 0 or step == flags["num_iterations"]:
                ranks.window_over_ranks(window, world_size)
                ranks.nonfinite_over_ranks(window)
                window.raise_if_nonfinite(experiment_dir)
                grad_norm = engine.get_global_grad_norm()
                record = window.record(step, engine.get_lr()[0], None if grad_norm is None else float(grad_norm),
                                       flags, engine.module.model.config, device, world_size)
                if flags["dtype"] == "fp16":
                    record["loss_scale"] = float(engine.optimizer.loss_scale)
                metrics.log(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}")

            if step % flags["eval_every"] == 0 or step == flags["num_iterations"]:
                totals = evaluate_on_ranks(engine, validation, rank, world_size, "validation")
                train_bert.log_evaluation(metrics, step, "eval", totals)
            if step % flags["checkpoint_every"] == 0 or step == flags["num_iterations"] or stop.signum is not None:
                ranks.nonfinite_over_ranks(window)
                window.raise_if_nonfinite(experiment_dir)
                ranks.raise_if_weights_nonfinite_on_any_rank(engine, step, experiment_dir, control_group)
                tag = save_ds_checkpoint(engine, experiment_dir, step, data_position, flags, control_group)
                logger.info(f"saved checkpoint {tag}")
            if stop.signum is not None:
                raise stop.interruption(step, experiment_dir)
    train_bert.log_test_evaluation(metrics, data, flags,
                                   lambda test: evaluate_on_ranks(engine, test, rank, world_size, "test"))


def evaluate_on_ranks(engine: Any, batches: list[dict[str, torch.Tensor]], rank: int, world_size: int,
                      description: str) -> torch.Tensor:
    """Each rank evaluates its share of `batches`; the [loss sum, count] totals add up over ranks.

    Every rank runs the same number of forwards (ZeRO-3 gathers each layer's parameters from all ranks inside
    forward), so a rank with one batch fewer than the others runs one more and drops its result. No autocast:
    the engine already holds the model in the training dtype.
    """
    shard = batches[rank::world_size]
    totals = train_bert.evaluate(engine, shard, engine.device, contextlib.nullcontext, loss_function=engine_loss,
                                 description=description)
    if len(shard) < math.ceil(len(batches) / world_size):
        train_bert.evaluate(engine, batches[:1], engine.device, contextlib.nullcontext, loss_function=engine_loss)
    dist.all_reduce(totals)
    return totals


# ----------------------------------------------------------------------------------------------------------------------
# The command line: train() is the CLI (python train_bert_ds.py --help).
# ----------------------------------------------------------------------------------------------------------------------


DEFAULT_DS_CONFIG = Path(__file__).resolve().parent / "ds_config.json"


def train(ds_config: str = str(DEFAULT_DS_CONFIG), zero_stage: int | None = None, offload_optimizer: str | None = None,
          offload_param: str | None = None, compile: bool | None = None, batch_size: int | None = None,
          grad_accum_steps: int | None = None, lr: float | None = None, weight_decay: float | None = None,
          grad_clip: float | None = None, dtype: str | None = None, device: str = "auto",
          time_budget: str | None = None, init_from: str | None = None, **flags: Any) -> str | None:
    """Pretrain a RoBERTa encoder with masked language modelling using DeepSpeed; return the experiment directory.

    Start:  deepspeed train_bert_ds.py --checkpoint_dir ./experiments [flags]   (or torchrun, or plain python)
    Resume: deepspeed train_bert_ds.py --load_checkpoint_dir ./experiments/bert_pretrain.YYYY... (same rank count)

    Every flag of train_bert.py works here too, with the same meaning and default, except those listed first:
    the flags that ds_config.json also sets take the config's value when not given and override it when given.
    Each rank trains on its own batches: the effective batch is batch_size x grad_accum_steps x ranks.

    Args:
        ds_config: DeepSpeed JSON config (precision, ZeRO, optimizer, clipping). The merged, effective config is
            saved as ds_config.json in the experiment directory; a resume starts from that one unless given.
        zero_stage: ZeRO stage 0 (plain data parallelism), 1 (partition the optimizer states), 2 (and the
            gradients) or 3 (and the parameters); the config's when not given.
        offload_optimizer: none or cpu: keep the optimizer states and step in CPU memory (ZeRO-Offload, stage >= 1).
        offload_param: none or cpu: keep the parameters in CPU memory between uses (ZeRO-3 only).
        compile: Compile the loss (encoder, sparse head, cross-entropy) with torch.compile, as train_bert.py does;
            on by default for ZeRO stages 0-2, off for stage 3 (whose parameter hooks torch.compile cannot trace).
        batch_size: Blocks per micro-batch on each rank (ds_config: train_micro_batch_size_per_gpu).
        grad_accum_steps: Micro-batches per optimizer step (ds_config: gradient_accumulation_steps).
        lr: Peak learning rate (ds_config: optimizer.params.lr).
        weight_decay: AdamW weight decay on weight matrices (ds_config: optimizer.params.weight_decay).
        grad_clip: Clip the global gradient norm to this, 0 disables (ds_config: gradient_clipping).
        dtype: fp32, bf16 or fp16 (DeepSpeed mixed precision: the model computes in 16 bits, the optimizer keeps
            fp32 master weights; fp16 adds dynamic loss scaling); the config's fp16 / bf16 "enabled" when not given.
        device: auto (each rank on the GPU its launcher gives it, or the CPU without CUDA) or cpu (DeepSpeed's CPU
            accelerator, as DS_ACCELERATOR=cpu).
        time_budget: Not available here: every rank would have to agree on the step to stop at; use train_bert.py.
        init_from: Not available here yet: continue a Hugging Face checkpoint with train_bert.py.
    """
    if os.environ.get("RANK", "0") != "0":  # under a launcher: rank 0 alone says what every rank would say
        logger.remove()
        logger.add(sys.stderr, level="ERROR")
    for name, value in (("time_budget", time_budget), ("init_from", init_from)):
        if value is not None:
            raise ConfigError(f"--{name} is not supported by train_bert_ds.py; use train_bert.py for it")
    shared_defaults, own_defaults = flag_rules.flag_defaults(train_bert.train), flag_rules.flag_defaults(train)
    if set(flags) - set(shared_defaults):
        raise ConfigError(f"unknown flag --{sorted(set(flags) - set(shared_defaults))[0]}; see --help for the flags")
    given = {name: value for name, value in locals().items() if name in own_defaults}
    flags = {**shared_defaults, **flags, **given}
    flags, config = deepspeed_config.resolve_ds_flags(flags, {**shared_defaults, **own_defaults}, shared_defaults)
    ranks.prepare_op_build()
    rank, world_size, device = ranks.init_distributed(flags["local_rank"])
    safeguards.check_memory(flags, device)
    experiment_dir = run_training(flags, config, rank, world_size, device)
    return str(experiment_dir) if rank == 0 else None  # fire prints what train returns: once, not once per rank


if __name__ == "__main__":
    cli.main(train, shared=train_bert.train)

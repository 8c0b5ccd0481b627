"""Tests of train_bert_ds.py on DeepSpeed's CPU accelerator (gloo), each a claim the tutorial's part 2 makes.

DeepSpeed JIT-compiles its shared-memory communication op on the first process group (~30 s cold, cached in
TORCH_EXTENSIONS_DIR). Nothing here needs cpu_adam: the config's optimizer is torch's AdamW ("torch_adam": true),
also under ZeRO-Offload. Two-process runs use torchrun; they are shared between tests through module fixtures.
"""

import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_bert
import train_bert_ds
from conftest import PROCESS_GROUP_ENV, ROOT, TINY_MODEL_FLAGS, cli_args, run_cli, small_disk
from pretraining import cli, deepspeed_config, errors, ranks

# Eight steps, a checkpoint after four, a log line and a loss every step; no dropout so a forward is deterministic.
RUN_FLAGS = {
    **TINY_MODEL_FLAGS,
    "num_iterations": 8,
    "checkpoint_every": 4,
    "eval_every": 4,
    "log_every": 1,
    "warmup_steps": 3,
    "dropout": 0.0,
}


def child_env() -> dict[str, str]:
    """This process's environment without the process-group variables (a child must start its own group)."""
    return {name: value for name, value in os.environ.items() if name not in PROCESS_GROUP_ENV}


def run_torchrun(flags: dict, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N train_bert_ds.py --flag=value ...`, as a user runs it."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "train_bert_ds.py"),
        *cli_args(flags),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=child_env())


def only_experiment(checkpoint_dir: Path) -> Path:
    """The one experiment directory a run created in `checkpoint_dir`."""
    (experiment,) = Path(checkpoint_dir).glob("bert_pretrain.*")
    return experiment


def metric_records(experiment_dir: Path, key: str) -> list[dict]:
    """The metrics.jsonl records that carry `key`."""
    lines = (Path(experiment_dir) / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if key in record]


def copy_as_interrupted(experiment_dir: Path, step: int, destination: Path) -> Path:
    """A copy of `experiment_dir` as it was when a crash hit right after the checkpoint of `step`."""
    shutil.copytree(experiment_dir, destination)
    for tag in train_bert_ds.checkpoint_tags(destination):
        if int(tag.removeprefix(train_bert_ds.TAG_PREFIX)) > step:
            shutil.rmtree(destination / tag)
    shutil.rmtree(destination / "hf_model")
    (destination / "latest").write_text(f"{train_bert_ds.TAG_PREFIX}{step}")
    return destination


def exported_weights(experiment_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of the run's hf_model/ export."""
    from safetensors.torch import load_file

    return load_file(experiment_dir / "hf_model" / "model.safetensors")


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def assert_exports_fp32_masters_of_bf16_weights(experiment_dir: Path, tag: str) -> None:
    """hf_model/ holds fp32 weights (finer than bf16) that, rounded to bf16, are the weights the engine's forward used
    (the module states of checkpoint `tag`)."""
    exported = exported_weights(experiment_dir)
    module = torch.load(experiment_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)[
        "module"
    ]
    trained = [name for name in exported if f"model.{name}" in module and "sinusoidal" not in name]
    assert len(trained) > 10
    for name in trained:
        assert torch.equal(exported[name].bfloat16(), module[f"model.{name}"].bfloat16()), name
    weights = torch.cat([exported[name].flatten() for name in trained])
    assert torch.isfinite(weights).all()
    assert not torch.equal(weights, weights.bfloat16().float()), "fp32 master weights, not their bf16 copies"


def optimizer_state_elements(checkpoint: Path) -> list[int]:
    """Per rank: how many numbers of Adam's first moment (exp_avg) its ZeRO shard holds."""
    counts = []
    for shard in sorted(checkpoint.glob("*zero_pp_rank_*_optim_states.pt")):
        state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        state = state.get("base_optimizer_state") or state["optimizer_state_dict"]  # stage 1/2 / stage 3 layouts
        counts.append(sum(entry["exp_avg"].numel() for entry in state["state"].values()))
    return counts


@contextlib.contextmanager
def fp16_on_this_cpu():
    """Let DeepSpeed's CPU accelerator train in fp16 on any CPU.

    It reports fp16 only where oneDNN has native fp16 kernels (AVX512-FP16 / AMX-FP16); PyTorch computes every op
    of this model in fp16 on other CPUs too, only slower, which is all a test of the loss scaler needs.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    original = accelerator.is_fp16_supported
    accelerator.is_fp16_supported = lambda: True
    try:
        yield
    finally:
        accelerator.is_fp16_supported = original


# --------------------------------------------------------------------------------------------------------------------
# ds_config.json and the flags.
# --------------------------------------------------------------------------------------------------------------------


def test_ds_config_json_is_complete():
    """The shipped config parses and holds every setting the tutorial walks through."""
    config = json.loads((ROOT / "ds_config.json").read_text())
    assert config["fp16"]["loss_scale"] == 0, "0 selects dynamic loss scaling"
    for field in ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"):
        assert isinstance(config["fp16"][field], int), field
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["stage"] in (0, 1, 2, 3)
    for offload in ("offload_optimizer", "offload_param"):
        assert config["zero_optimization"][offload]["device"] in ("none", "cpu")
    assert config["optimizer"]["type"] == "AdamW" and config["optimizer"]["params"]["torch_adam"] is True
    assert config["gradient_clipping"] > 0 and config["steps_per_print"] > 0
    assert "train_batch_size" not in config, "it is derived from the micro batch, accumulation and ranks"


def test_every_flag_override_lands_in_the_effective_config():
    """Flags left out take the config's values; flags given replace them; train_batch_size is reconciled."""
    config = deepspeed_config.load_ds_config(str(ROOT / "ds_config.json"))
    unset = {name: None for name in deepspeed_config.FLAGS_FROM_CONFIG} | {"ds_config": "ds_config.json"}
    flags, effective = deepspeed_config.effective_ds_config(unset, config, world_size=1)
    assert (flags["batch_size"], flags["lr"], flags["dtype"], flags["zero_stage"]) == (
        config["train_micro_batch_size_per_gpu"],
        config["optimizer"]["params"]["lr"],
        "bf16",
        config["zero_optimization"]["stage"],
    )
    assert effective == {**config, "train_batch_size": config["train_micro_batch_size_per_gpu"]}

    overrides = {
        "batch_size": 3,
        "grad_accum_steps": 5,
        "grad_clip": 0.25,
        "lr": 3e-4,
        "weight_decay": 0.2,
        "zero_stage": 3,
        "offload_optimizer": "cpu",
        "offload_param": "cpu",
        "dtype": "fp16",
        "ds_config": "ds_config.json",
    }
    flags, effective = deepspeed_config.effective_ds_config(overrides, config, world_size=4)
    assert flags == overrides
    assert effective["train_micro_batch_size_per_gpu"] == 3 and effective["gradient_accumulation_steps"] == 5
    assert effective["train_batch_size"] == 3 * 5 * 4
    assert effective["gradient_clipping"] == 0.25
    assert effective["optimizer"]["params"]["lr"] == 3e-4 and effective["optimizer"]["params"]["weight_decay"] == 0.2
    assert effective["zero_optimization"]["stage"] == 3
    assert effective["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert effective["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert effective["fp16"]["enabled"] is True and effective["bf16"]["enabled"] is False
    assert effective["fp16"]["initial_scale_power"] == config["fp16"]["initial_scale_power"], "the rest is kept"
    assert config["optimizer"]["params"]["lr"] != 3e-4, "the loaded config itself is not modified"


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"zero_stage": 4}, "--zero_stage must be 0, 1, 2 or 3"),
        ({"zero_stage": 2, "offload_param": "cpu"}, "--offload_param cpu needs --zero_stage 3"),
        ({"zero_stage": 0, "offload_optimizer": "cpu"}, "--offload_optimizer cpu needs ZeRO"),
        ({"offload_optimizer": "nvme"}, "--offload_optimizer must be one of none, cpu"),
        ({"ds_config": "/nonexistent/ds.json"}, "cannot be read"),
        ({"ds_config": "MALFORMED"}, "is not valid JSON"),
        ({"ds_config": "BATCH"}, "train_batch_size 64, but --batch_size 4"),
        ({"ds_config": "BOTH"}, "enables both fp16 and bf16"),
        ({"batch_size": 0}, "--batch_size must be a positive integer"),
        ({"checkpoint_dir": None}, "give exactly one of --checkpoint_dir"),
    ],
)
def test_bad_flags_fail_before_anything_starts(flags, message, tiny_flags, tmp_path):
    """Each mistake is one clear error, raised before the process group or any directory exists."""
    configs = {
        "MALFORMED": "{ not json",
        "BATCH": json.dumps({"train_batch_size": 64}),
        "BOTH": json.dumps({"fp16": {"enabled": True}, "bf16": {"enabled": True}}),
    }
    if flags.get("ds_config") in configs:
        (tmp_path / "ds.json").write_text(configs[flags["ds_config"]])
        flags = {**flags, "ds_config": str(tmp_path / "ds.json")}
    with pytest.raises(errors.ConfigError, match=message.replace("(", r"\(")):
        train_bert_ds.train(**{**tiny_flags, **flags})
    assert not (tmp_path / "experiments").exists()


def test_cli_reports_a_bad_flag_in_one_line(tiny_flags):
    result = run_cli("train_bert_ds.py", {**tiny_flags, "zero_stage": 2, "offload_param": "cpu"}, env=child_env())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --offload_param cpu needs --zero_stage 3 (only stage 3 partitions the parameters); got --zero_stage 2"
    )


# --------------------------------------------------------------------------------------------------------------------
# One process.
# --------------------------------------------------------------------------------------------------------------------


def test_a_disk_filling_up_mid_run_is_one_line_and_latest_names_a_whole_checkpoint(tiny_flags, tmp_path):
    """A checkpoint folder every step, none deleted, on a 3 MiB disk: a save fails for real (DeepSpeed's torch.save
    reports ENOSPC as a RuntimeError). One error line says so; `latest` names the last complete folder, which a
    resume (once space is freed) loads and continues from."""
    with small_disk(tmp_path / "disk", "3m") as disk:
        flags = {**tiny_flags, **RUN_FLAGS, "checkpoint_dir": str(disk / "experiments"), "num_iterations": 200}
        flags.update(checkpoint_every=1, keep_last=200, zero_stage=1, dtype="fp32", compile=False, log_every=50)
        result = run_cli("train_bert_ds.py", flags, env=child_env())
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        errors_shown = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors_shown) == 1, result.stderr[-3000:]
        for piece in (
            "could not save checkpoint global_step",
            "No space left on device",
            "previous checkpoint is intact",
        ):
            assert piece in errors_shown[0], errors_shown[0]
        experiment = only_experiment(disk / "experiments")
        saved = int((experiment / "latest").read_text().removeprefix(train_bert_ds.TAG_PREFIX))
        assert 1 <= saved < 200
        for folder in train_bert_ds.checkpoint_tags(experiment):  # free space: all but the checkpoint `latest` names
            if folder != f"{train_bert_ds.TAG_PREFIX}{saved}":
                shutil.rmtree(experiment / folder)
        result = run_cli(
            "train_bert_ds.py", {"load_checkpoint_dir": str(experiment), "num_iterations": saved + 1}, env=child_env()
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"resuming at step {saved}" in result.stderr
        assert (experiment / "latest").read_text() == f"{train_bert_ds.TAG_PREFIX}{saved + 1}"


@pytest.mark.parametrize("grad_clip, tolerance", [(0.0, 0.0), (1.0, 1e-5)])
def test_zero0_fp32_matches_train_bert(grad_clip, tolerance, tiny_flags, tmp_path):
    """ZeRO 0 in fp32 is train_bert.py's training: the same loss at every step (and the same evaluations).

    Same seed, data, masks, dropout, initial weights, torch AdamW (fused) and LR schedule, so without clipping the
    losses are bit-identical (tolerance 0). With clipping they agree to 1e-5 relative: DeepSpeed clips with its own
    clip_grad_norm_, which sums the squared norms in another order than torch's.
    """
    flags = {
        **tiny_flags,
        "num_iterations": 10,
        "grad_accum_steps": 2,
        "log_every": 1,
        "eval_every": 5,
        "warmup_steps": 3,
        "grad_clip": grad_clip,
        "dtype": "fp32",
    }
    plain = train_bert.train(**{**flags, "checkpoint_dir": str(tmp_path / "plain")})
    deepspeed = train_bert_ds.train(**flags, zero_stage=0)
    for key in ("loss", "eval_loss"):
        expected = [record[key] for record in metric_records(plain, key)]
        actual = [record[key] for record in metric_records(deepspeed, key)]
        assert len(actual) == len(expected) > 0
        assert actual == pytest.approx(expected, rel=tolerance, abs=0), key


def test_bf16_without_zero_trains_and_exports(tiny_flags):
    """ZeRO stage 0 with the shipped config's bf16: DeepSpeed keeps no ZeRO checkpoint then, so the export takes the
    engine's own weights; hf_model/ holds the trained weights (a 16-bit value of each)."""
    from transformers import AutoModelForMaskedLM

    experiment = Path(train_bert_ds.train(**tiny_flags, num_iterations=3, zero_stage=0))
    exported = AutoModelForMaskedLM.from_pretrained(experiment / "hf_model")
    weights = torch.cat([parameter.detach().flatten() for parameter in exported.parameters()])
    assert torch.isfinite(weights).all()
    assert torch.equal(weights, weights.bfloat16().float()), "the bf16 weights the engine trained, exactly"


def test_zero1_with_fp32_gradient_accumulation_exports_the_fp32_master_weights(tiny_flags, tmp_path):
    """bf16 on ZeRO-1 accumulating gradients in fp32 trains with DeepSpeed's BF16_Optimizer, whose checkpoints
    zero_to_fp32 cannot read: hf_model/ still holds the trained fp32 master weights. Rounded to bf16 they are the
    weights the engine's forward used (its checkpoint's module states), and they are finer than bf16."""
    config = json.loads((ROOT / "ds_config.json").read_text())
    config["data_types"] = {"grad_accum_dtype": "fp32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    experiment = Path(
        train_bert_ds.train(**tiny_flags, num_iterations=3, zero_stage=1, ds_config=str(tmp_path / "config.json"))
    )
    assert_exports_fp32_masters_of_bf16_weights(experiment, "global_step3")


def test_dtype_auto_is_refused_here_with_what_to_give_instead(tiny_flags):
    """train_bert.py's --dtype auto is not a DeepSpeed precision: one error naming the choices, nothing created."""
    with pytest.raises(errors.ConfigError, match=r"--dtype must be one of fp32, bf16, fp16 here.*'auto'"):
        train_bert_ds.train(**tiny_flags, dtype="auto")
    assert not Path(tiny_flags["checkpoint_dir"]).exists()


def test_fp16_loss_scale_survives_a_resume(tiny_flags, tmp_path):
    """fp16 with dynamic loss scaling trains, and a resumed run continues with the saved loss scale.

    The config starts at 2^20 and grows the scale after 2 good steps, so by the step-4 checkpoint the scale has
    moved; had the resume restarted the scaler, steps 5-8 would log another scale and other losses.
    """
    config = json.loads((ROOT / "ds_config.json").read_text())
    config["fp16"].update(initial_scale_power=20, loss_scale_window=2, hysteresis=1)
    (tmp_path / "fp16.json").write_text(json.dumps(config))
    flags = {**tiny_flags, **RUN_FLAGS, "ds_config": str(tmp_path / "fp16.json"), "dtype": "fp16", "dropout": 0.1}
    with fp16_on_this_cpu():
        uninterrupted = Path(train_bert_ds.train(**flags))
        resumed = copy_as_interrupted(uninterrupted, 4, tmp_path / "resumed")
        train_bert_ds.train(load_checkpoint_dir=str(resumed))

    scales = [record["loss_scale"] for record in metric_records(uninterrupted, "loss_scale")]
    assert len(set(scales[:4])) > 1 and scales[3] != 2**20, f"the scale should have moved by step 4: {scales}"
    expected = [(r["step"], r["loss"], r["loss_scale"]) for r in metric_records(uninterrupted, "loss_scale")]
    assert [(r["step"], r["loss"], r["loss_scale"]) for r in metric_records(resumed, "loss_scale")] == expected
    effective = json.loads((uninterrupted / "ds_config.json").read_text())
    assert effective["fp16"]["enabled"] and effective["fp16"]["initial_scale_power"] == 20


def test_nonfinite_loss_stops_without_saving(tiny_flags):
    """A diverging run (absurd lr) stops with NonFiniteLossError naming the step; nothing from it is saved."""
    import re

    flags = {
        **tiny_flags,
        **RUN_FLAGS,
        "lr": 1e6,
        "grad_clip": 0.0,
        "warmup_steps": 0,
        "checkpoint_every": 1,
        "dtype": "fp32",
        "zero_stage": 2,
    }
    with pytest.raises(errors.NonFiniteLossError, match="non-finite") as error:
        train_bert_ds.train(**flags)
    bad_step = int(re.search(r"(?:at|by) step (\d+)", str(error.value)).group(1))
    experiment = only_experiment(tiny_flags["checkpoint_dir"])
    saved = [int(tag.removeprefix(train_bert_ds.TAG_PREFIX)) for tag in train_bert_ds.checkpoint_tags(experiment)]
    assert all(step < bad_step for step in saved), (bad_step, saved)
    if saved:
        assert (experiment / "latest").read_text() == f"{train_bert_ds.TAG_PREFIX}{max(saved)}"


def test_cli_plain_python_with_the_shipped_config(tiny_flags):
    """`python train_bert_ds.py` without a launcher runs the shipped config (bf16, ZeRO-2) and exports hf_model/."""
    result = run_cli(
        "train_bert_ds.py", {**tiny_flags, "num_iterations": 4, "log_every": 2, "eval_every": 4}, env=child_env()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = only_experiment(tiny_flags["checkpoint_dir"])
    effective = json.loads((experiment / "ds_config.json").read_text())
    assert effective["bf16"]["enabled"] and effective["zero_optimization"]["stage"] == 2
    assert effective["train_micro_batch_size_per_gpu"] == tiny_flags["batch_size"] == effective["train_batch_size"]
    hparams = json.loads((experiment / "hparams.json").read_text())
    shipped_lr = json.loads((ROOT / "ds_config.json").read_text())["optimizer"]["params"]["lr"]
    assert hparams["world_size"] == 1 and hparams["flags"]["dtype"] == "bf16" and hparams["flags"]["lr"] == shipped_lr
    assert "effective config" in (experiment / "train.log").read_text()
    losses = [record["loss"] for record in metric_records(experiment, "loss")]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    assert {"tokens_per_sec", "peak_memory_mib"} <= metric_records(experiment, "loss")[-1].keys()
    assert (experiment / "latest").read_text() == "global_step4"
    assert (experiment / "hf_model" / "model.safetensors").is_file()


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    """Poll `log` until it holds `text`; fail with its end if the process exits or the time runs out first."""
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_build_lock_left_by_a_killed_start_is_removed_and_every_wait_says_why(tiny_flags, tmp_path):
    """torch's build lock of DeepSpeed's op, in a fresh TORCH_EXTENSIONS_DIR, held by a real process: the start says
    it waits for that process; SIGKILL the holder (as a start killed mid-build leaves it), and the start removes
    the stale lock, says it builds the op, and torch takes its own lock to build it. Before, it waited for ever,
    printing nothing. (A build that completes and trains is every other DeepSpeed test's first start.)"""
    lock = tmp_path / "torch_extensions" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import os, time; os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL); time.sleep(600)"]
    )
    log = tmp_path / "run.log"
    env = {**child_env(), "TORCH_EXTENSIONS_DIR": str(lock.parent.parent)}
    with open(log, "w") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "train_bert_ds.py"),
                *cli_args({**tiny_flags, "num_iterations": 2, "dtype": "fp32"}),
            ],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_line(log, f"waiting for process {holder.pid}, which is building DeepSpeed's op", process)
        holder.kill()
        holder.wait()
        assert lock.exists(), "the killed holder left its lock, as a killed build does"
        wait_for_line(log, "building DeepSpeed's deepspeed_shm_comm op", process)
        deadline = time.monotonic() + 300
        while process.pid not in ranks.processes_holding(lock):  # torch's build, under a lock of its own
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        for child in (holder, process):
            if child.poll() is None:
                child.kill()
    assert f"removed the stale build lock {lock}" in log.read_text()


def test_a_build_that_never_ends_is_one_error_naming_the_folder(tmp_path, monkeypatch):
    """A live process holds the build lock and never lets go: the start gives up after OP_BUILD_WAIT (here 2 s) with
    one error naming that process and the folder to delete, instead of waiting for ever."""
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import os, time; os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL); time.sleep(600)"]
    )
    try:
        while not ranks.processes_holding(lock):
            assert holder.poll() is None
            time.sleep(0.05)
        monkeypatch.setattr(ranks, "op_build_directory", lambda: lock.parent)
        monkeypatch.setattr(ranks, "OP_BUILD_WAIT", datetime.timedelta(seconds=2))
        with pytest.raises(errors.ConfigError, match=f"process {holder.pid}.*delete {lock.parent}"):
            ranks.prepare_op_build()
        assert lock.exists(), "a live build's lock is never removed"
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo): ZeRO-2 with optimizer offload, ZeRO-3 with optimizer and parameter offload.
# --------------------------------------------------------------------------------------------------------------------

# ZeRO-3 trains with dropout: its exact resume needs each rank's own RNG state back (rank 1's differs from rank 0's).
TWO_RANK_CONFIGS = {
    "zero2_offload": {"zero_stage": 2, "offload_optimizer": "cpu", "dtype": "fp32"},
    "zero3_offload": {
        "zero_stage": 3,
        "offload_optimizer": "cpu",
        "offload_param": "cpu",
        "dtype": "fp32",
        "dropout": 0.1,
    },
}


@pytest.fixture(scope="module")
def two_rank_runs(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """For each config: an uninterrupted 8-step run on 2 ranks, and a copy interrupted at step 4 then resumed."""
    runs = {}
    for name, ds_flags in TWO_RANK_CONFIGS.items():
        root = tmp_path_factory.mktemp(name)
        flags = {
            **RUN_FLAGS,
            **ds_flags,
            "dataset": str(tiny_corpus),
            "tokenizer": str(tiny_tokenizer),
            "checkpoint_dir": str(root / "experiments"),
        }
        runs[name] = run_and_resume_on_two_ranks(flags, root)
    return runs


def run_and_resume_on_two_ranks(flags: dict, root: Path) -> dict[str, Path]:
    """An uninterrupted 8-step run on 2 ranks in `root`, and a copy of it interrupted at step 4 then resumed."""
    result = run_torchrun(flags)
    assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted = only_experiment(root / "experiments")
    resumed = copy_as_interrupted(uninterrupted, 4, root / "resumed")
    result = run_torchrun({"load_checkpoint_dir": str(resumed)})
    assert result.returncode == 0, result.stderr[-3000:]
    return {"uninterrupted": uninterrupted, "resumed": resumed}


def assert_resume_equals_uninterrupted(uninterrupted: Path, resumed: Path) -> None:
    """The same loss, gradient norm and learning rate at every step, the same evaluations, the same final weights."""
    keys = ("step", "loss", "grad_norm", "lr")
    expected = [tuple(record[key] for key in keys) for record in metric_records(uninterrupted, "loss")]
    assert [tuple(record[key] for key in keys) for record in metric_records(resumed, "loss")] == expected
    assert metric_records(resumed, "eval_loss") == metric_records(uninterrupted, "eval_loss")
    assert_same_weights(exported_weights(resumed), exported_weights(uninterrupted))


@pytest.mark.slow
@pytest.mark.parametrize("config", TWO_RANK_CONFIGS)
def test_two_ranks_resume_exactly(config, two_rank_runs):
    """Interrupted after step 4 and resumed on 2 ranks: the same losses, gradient norms and final weights.

    The step, the data position, the LR schedule, the offloaded optimizer partitions and every rank's RNG state all
    come back from the checkpoint; a miss in any of them changes the losses after step 4.
    """
    assert_resume_equals_uninterrupted(two_rank_runs[config]["uninterrupted"], two_rank_runs[config]["resumed"])


@pytest.mark.slow
@pytest.mark.parametrize("config", TWO_RANK_CONFIGS)
def test_optimizer_state_is_partitioned(config, two_rank_runs):
    """Each rank's checkpoint shard holds half of Adam's state (the model's parameters split two ways)."""
    experiment = two_rank_runs[config]["uninterrupted"]
    num_parameters = json.loads((experiment / "hparams.json").read_text())["num_parameters"]
    per_rank = optimizer_state_elements(experiment / "global_step8")
    assert len(per_rank) == 2
    assert sum(per_rank) >= num_parameters
    for count in per_rank:
        assert count == pytest.approx(num_parameters / 2, rel=0.02), per_rank  # alignment padding aside


@pytest.mark.slow
def test_ranks_train_on_different_data_and_log_their_mean_loss(two_rank_runs):
    """The step-1 loss logged by a 2-rank run is the mean of rank 0's and rank 1's batch losses, which differ.

    Both are recomputed here from train_bert.py's pieces with the run's initial weights (same seed, no dropout):
    rank r trains on global batches r, r + 2, ... (upstream fed every rank the same batch).
    """
    experiment = two_rank_runs["zero2_offload"]["uninterrupted"]
    flags = json.loads((experiment / "hparams.json").read_text())["flags"]
    torch.manual_seed(flags["seed"])
    data = train_bert.prepare_data(flags, experiment / "tokenizer")
    model = train_bert.create_model(
        flags["num_layers"],
        flags["num_heads"],
        flags["ff_dim"],
        flags["h_dim"],
        flags["dropout"],
        data.tokenizer,
        flags["max_seq_length"],
        output_bias=train_bert.unigram_output_bias(data.train_blocks.token_sample(), len(data.tokenizer)),
    )
    with torch.no_grad():
        losses = [
            float(
                train_bert.mlm_loss(
                    model,
                    **train_bert.TrainBatches(
                        data.train_blocks, flags["batch_size"], 0, flags["seed"], data.masking, rank, 2
                    )[0],
                )
            )
            for rank in (0, 1)
        ]
    assert losses[0] != losses[1]
    logged = metric_records(experiment, "loss")[0]
    assert logged["step"] == 1
    assert logged["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)


@pytest.mark.slow
def test_resume_with_another_number_of_ranks_is_a_clear_error(two_rank_runs):
    experiment = two_rank_runs["zero2_offload"]["uninterrupted"]
    result = run_cli("train_bert_ds.py", {"load_checkpoint_dir": str(experiment)}, env=child_env())
    assert result.returncode == 2
    assert "saved by 2 rank(s), this run has 1" in result.stderr
    assert "zero_to_fp32.py" in result.stderr


@pytest.mark.slow
def test_zero3_export_loads_and_predicts(two_rank_runs):
    """hf_model/ from a ZeRO-3 run (weights partitioned over 2 ranks) is the trained model, whole.

    It loads with AutoModelForMaskedLM, answers fill-mask, and its validation loss equals the last eval_loss the
    2-rank run logged.
    """
    from transformers import AutoModelForMaskedLM

    experiment = two_rank_runs["zero3_offload"]["uninterrupted"]
    flags = json.loads((experiment / "hparams.json").read_text())["flags"]
    model = AutoModelForMaskedLM.from_pretrained(experiment / "hf_model")
    data = train_bert.prepare_data(flags, experiment / "hf_model")
    validation = train_bert.EvalBatches(data.validation_blocks, flags["batch_size"], flags["seed"], data.masking)
    totals = train_bert.evaluate(model, validation, torch.device("cpu"), contextlib.nullcontext)
    assert float(totals[0] / totals[1]) == pytest.approx(
        metric_records(experiment, "eval_loss")[-1]["eval_loss"], rel=1e-5
    )
    (candidates,) = train_bert.fill_mask_demo(
        experiment / "hf_model", torch.device("cpu"), "the quick brown <mask> jumps over the lazy dog ."
    )
    assert len(candidates) == 5


@pytest.mark.slow
def test_two_ranks_bf16_optimizer_resume_exactly_and_export_the_fp32_master_weights(
    tiny_corpus, tiny_tokenizer, tmp_path
):
    """bf16 on ZeRO-1 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer, fp32 masters split over 2 ranks):
    a run interrupted after step 4 and resumed equals the uninterrupted one, and hf_model/ gathers both ranks'
    fp32 master weights (zero_to_fp32 cannot read these checkpoints): rounded to bf16, the weights the forward used."""
    config = json.loads((ROOT / "ds_config.json").read_text())
    config["data_types"] = {"grad_accum_dtype": "fp32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    flags = {
        **RUN_FLAGS,
        "dataset": str(tiny_corpus),
        "tokenizer": str(tiny_tokenizer),
        "zero_stage": 1,
        "checkpoint_dir": str(tmp_path / "experiments"),
        "ds_config": str(tmp_path / "config.json"),
    }
    runs = run_and_resume_on_two_ranks(flags, tmp_path)
    uninterrupted = runs["uninterrupted"]
    assert len(list((uninterrupted / "global_step8").glob("bf16_zero_pp_rank_*_optim_states.pt"))) == 2
    assert_resume_equals_uninterrupted(uninterrupted, runs["resumed"])
    assert_exports_fp32_masters_of_bf16_weights(uninterrupted, "global_step8")


# --------------------------------------------------------------------------------------------------------------------
# The README's part 2 and its long form, docs/deepspeed.md.
# --------------------------------------------------------------------------------------------------------------------


def readme_part2() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Part 2", 1)[1].split("\n## ", 1)[0] + (ROOT / "docs" / "deepspeed.md").read_text()


def test_readme_shows_the_current_loop_diff():
    """The diff of the two training loops in the README is what its own command prints for the code as it is."""
    import re

    command, shown = re.search(r"```bash\n(diff -u [^\n]*)\n```\n\n```diff\n(.*?)```", readme_part2(), re.S).groups()
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT, env=child_env())
    assert result.returncode == 1, result.stderr  # diff's "files differ"
    assert result.stdout == shown, "docs/deepspeed.md's loop diff is stale: run python docs/update_excerpts.py"


def test_docs_show_the_current_checkpoint_code():
    """Every function docs/deepspeed.md shows under a `<!-- source: ... -->` line is the script's code as it is."""
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("update_excerpts", ROOT / "docs" / "update_excerpts.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    shown = re.findall(tool.SOURCE, (ROOT / "docs" / "deepspeed.md").read_text(), re.S)
    assert [names for _, _, names, _, _ in shown] == ["save_ds_checkpoint load_ds_checkpoint"]
    for _, script, names, code, _ in shown:
        assert code == tool.function_sources(script, names.split()), (
            f"stale {names}: run python docs/update_excerpts.py"
        )


def test_readme_part2_commands_use_real_flags():
    """Every train_bert_ds.py command line of part 2 passes the script's own flag check."""
    import re
    import shlex

    lines = [
        line
        for block in re.findall(r"```bash\n(.*?)```", readme_part2(), re.S)
        for line in block.splitlines()
        if " train_bert_ds.py " in line and not line.startswith("diff ")
    ]
    assert len(lines) >= 8, lines
    for line in lines:
        words = shlex.split(line)
        cli.check_command_line(words[words.index("train_bert_ds.py") + 1 :], train_bert_ds.train, train_bert.train)

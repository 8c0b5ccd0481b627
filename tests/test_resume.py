"""Resume and stops you can trust: each test runs the scripts as a user does (subprocesses, real signals, a second
process, a real allocation failure) and checks that the printed command works exactly as printed, that one run at a
time writes to an experiment, and that every stop is one clear message that keeps the last good checkpoint.

Run: python -m pytest -q tests/test_resume.py            (the DeepSpeed launcher tests are marked slow)
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_reliability import assert_one_line_error, checkpoint_steps, only_experiment, snapshot, wait_until

from conftest import PROCESS_GROUP_ENV, ROOT, TINY_MODEL_FLAGS, cli_args, run_cli, write_corpus
from pretraining import safeguards

# One thread per training process (see test_reliability.py), and `python` on PATH is this interpreter, so a printed
# command pasted into a shell runs the same Python.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
QUIET = {"eval_every": 1000, "checkpoint_every": 1000, "log_every": 5}


@pytest.fixture(scope="module")
def run_flags(tiny_corpus, tiny_tokenizer) -> dict:
    return {"dataset": str(tiny_corpus), "tokenizer": str(tiny_tokenizer), **TINY_MODEL_FLAGS}


@pytest.fixture(scope="module")
def finished_experiment(run_flags, tmp_path_factory) -> Path:
    """A finished 4-step experiment (checkpoints at 2 and 4, test evaluation and export done); tests use copies."""
    root = tmp_path_factory.mktemp("finished")
    result = run_cli(
        "train_bert.py",
        {
            **run_flags,
            "checkpoint_dir": root,
            "num_iterations": 4,
            "checkpoint_every": 2,
            "log_every": 2,
            "eval_every": 1000,
        },
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return only_experiment(root)


@pytest.fixture
def experiment(finished_experiment, tmp_path) -> Path:
    return Path(shutil.copytree(finished_experiment, tmp_path / finished_experiment.name))


def start(script: str, args: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Start `python script args...` in its own session (as a shell job), stdout and stderr going to `log`."""
    with open(log, "w") as output:
        return subprocess.Popen(
            [sys.executable, str(ROOT / script), *args],
            cwd=ROOT,
            env=kwargs.pop("env", ENV),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )


def stop(process: subprocess.Popen, signum: int = signal.SIGTERM) -> int:
    """Send `signum`, wait for the process to end (SIGKILL on the way out if it hangs); return its exit code."""
    try:
        process.send_signal(signum)
        return process.wait(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def metric_records(experiment: Path, key: str) -> list[dict]:
    lines = (experiment / "metrics.jsonl").read_text().splitlines() if (experiment / "metrics.jsonl").exists() else []
    return [record for record in map(json.loads, lines) if key in record]


def printed_command(output: str, after: str) -> str:
    """The command a message printed after `after` (e.g. "Resume with: ")."""
    return output.split(after)[-1].splitlines()[0]


def run_in_shell(command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Paste `command` into bash, in the folder the run was started from."""
    return subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


# --------------------------------------------------------------------------------------------------------------------
# 1. The printed command continues the run as it was last resumed, and is shell-quoted.
# --------------------------------------------------------------------------------------------------------------------


def test_printed_resume_command_continues_an_extended_run(run_flags, tmp_path):
    """Train to 4, resume with --num_iterations 150, SIGTERM mid-way, paste the printed command into bash: it trains
    on to 150 (not: stops at once as if finished). The folder has a space and non-ASCII characters in its path."""
    root = tmp_path / "my runs" / "résumé €"
    result = run_cli("train_bert.py", {**run_flags, **QUIET, "checkpoint_dir": root, "num_iterations": 4}, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = only_experiment(root)

    log = tmp_path / "resumed.log"
    process = start("train_bert.py", cli_args({"load_checkpoint_dir": experiment, "num_iterations": 150}), log)
    wait_until(lambda: any(record["step"] > 4 for record in metric_records(experiment, "loss")), process, log)
    assert stop(process) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    stopped_at = checkpoint_steps(experiment)[-1]
    assert 4 < stopped_at < 150

    command = printed_command(log.read_text(), "Resume with: ")
    result = run_in_shell(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(experiment)[-1] == 150
    assert result.stdout.splitlines().count(str(experiment)) == 1, "the experiment path, printed once"
    hparams = json.loads((experiment / "hparams.json").read_text())
    assert hparams["flags"]["num_iterations"] == 150
    assert hparams["flag_history"][0]["from_step"] == 4
    assert hparams["flag_history"][0]["changed"]["num_iterations"] == {"from": 4, "to": 150}
    assert [record["step"] for record in metric_records(experiment, "test_loss")] == [150]


# --------------------------------------------------------------------------------------------------------------------
# 2. One writer per experiment.
# --------------------------------------------------------------------------------------------------------------------


def test_a_second_run_on_a_busy_experiment_is_refused_and_a_killed_holder_leaves_no_stale_lock(experiment, tmp_path):
    log = tmp_path / "first.log"
    first = start(
        "train_bert.py", cli_args({"load_checkpoint_dir": experiment, "num_iterations": 100000, "log_every": 5}), log
    )
    try:
        wait_until(lambda: any(record["step"] > 4 for record in metric_records(experiment, "loss")), first, log)
        second = run_cli("train_bert.py", {"load_checkpoint_dir": experiment, "num_iterations": 100000}, env=ENV)
        assert_one_line_error(second, f"experiment {experiment} is in use by pid {first.pid} on host")
        assert second.returncode == 2
        assert (experiment / "experiment.lock").read_text().startswith(f"pid {first.pid} on host ")
        assert first.poll() is None, "the first run goes on"
    finally:
        assert stop(first, signal.SIGKILL) == -signal.SIGKILL
    after_kill = checkpoint_steps(experiment)[-1]
    result = run_cli("train_bert.py", {"load_checkpoint_dir": experiment, "num_iterations": after_kill + 2}, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------------------
# 3. Resuming past the end, and a finished run.
# --------------------------------------------------------------------------------------------------------------------


def test_num_iterations_below_the_checkpoint_is_an_error_that_writes_nothing(experiment):
    before = snapshot(experiment)
    result = run_cli("train_bert.py", {"load_checkpoint_dir": experiment, "num_iterations": 2}, env=ENV)
    assert_one_line_error(result, "--num_iterations 2 is below step 4", "--num_iterations 4 or more")
    assert snapshot(experiment) == before


def test_resuming_a_finished_run_says_so_and_changes_nothing(experiment):
    before = snapshot(experiment)
    result = run_cli("train_bert.py", {"load_checkpoint_dir": experiment}, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is finished: trained to step 4" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(experiment) == before, "no test evaluation again, no duplicate metrics.jsonl lines"


# --------------------------------------------------------------------------------------------------------------------
# 4. Signals outside the training steps.
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_test_split(tmp_path_factory) -> Path:
    """A corpus whose test split is large: its evaluation at the end takes seconds, a window to signal into."""
    return write_corpus(tmp_path_factory.mktemp("long_test"), lines={"train": 300, "validation": 60, "test": 20000})


def test_sigterm_during_the_test_evaluation_is_reported_and_a_resume_finishes_the_end_phase_once(
    run_flags, long_test_split, tmp_path
):
    flags = {
        **run_flags,
        **QUIET,
        "dataset": long_test_split,
        "checkpoint_dir": tmp_path / "experiments",
        "num_iterations": 2,
    }
    log = tmp_path / "run.log"
    process = start("train_bert.py", cli_args(flags), log)
    # The test evaluation's own log line, not the final checkpoint's `latest` pointer: a signal right after that
    # pointer is written can still reach the training loop, which then reports a stop after step 2 (also true).
    wait_until(lambda: "| test: " in log.read_text(), process, log)
    assert stop(process) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    output = log.read_text()
    assert "Traceback" not in output
    assert "stopped by SIGTERM after the last step, during the test evaluation or the hf_model export" in output
    experiment = only_experiment(tmp_path / "experiments")
    assert not (experiment / "hf_model").exists()
    assert metric_records(experiment, "test_loss") == []

    result = run_in_shell(printed_command(output, "Resume with: "))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [record["step"] for record in metric_records(experiment, "test_loss")] == [2]
    assert checkpoint_steps(experiment) == [2], "the end phase trains nothing"
    assert (experiment / "hf_model" / "model.safetensors").is_file()
    again = run_in_shell(printed_command(output, "Resume with: "))
    assert again.returncode == 0 and "is finished" in again.stderr
    assert [record["step"] for record in metric_records(experiment, "test_loss")] == [2], "evaluated exactly once"


def test_sigterm_during_the_test_evaluation_of_a_budgeted_run_names_the_end_phase(run_flags, long_test_split, tmp_path):
    """A --time_budget run ends at whatever step its time runs out, never at --num_iterations: the stop message must
    still say the training is over (before, it said "during training"), and the printed resume only finishes."""
    flags = {
        **run_flags,
        **QUIET,
        "dataset": long_test_split,
        "checkpoint_dir": tmp_path / "experiments",
        "time_budget": "8s",
    }
    log = tmp_path / "run.log"
    process = start("train_bert.py", cli_args(flags), log)
    wait_until(lambda: "| test: " in log.read_text(), process, log)
    assert stop(process) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    output = log.read_text()
    assert "Traceback" not in output
    assert "stopped by SIGTERM after the last step, during the test evaluation or the hf_model export" in output
    experiment = only_experiment(tmp_path / "experiments")
    trained = checkpoint_steps(experiment)
    assert metric_records(experiment, "test_loss") == []

    result = run_in_shell(printed_command(output, "Resume with: "))
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(experiment) == trained, "the end phase trains nothing"
    assert [record["step"] for record in metric_records(experiment, "test_loss")] == trained[-1:]
    assert (experiment / "hf_model" / "model.safetensors").is_file()


def test_sigterm_during_the_export_leaves_no_partial_hf_model(run_flags, tmp_path):
    """A model of ~80 MB takes a while to write: SIGTERM as soon as the export's temporary folder appears. Before,
    this left an hf_model/ holding only config.json."""
    from transformers import AutoModelForMaskedLM

    flags = {
        **run_flags,
        **QUIET,
        "checkpoint_dir": tmp_path / "experiments",
        "num_iterations": 1,
        "num_heads": 8,
        "h_dim": 512,
        "ff_dim": 2048,
        "batch_size": 2,
    }
    log = tmp_path / "run.log"
    process = start("train_bert.py", cli_args(flags), log)
    exporting = lambda: list((tmp_path / "experiments").glob("*/.hf_model.*"))  # noqa: E731
    wait_until(exporting, process, log, poll_s=0.002)
    assert stop(process) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    output = log.read_text()
    assert "Traceback" not in output and "stopped by SIGTERM after the last step" in output
    experiment = only_experiment(tmp_path / "experiments")
    if (experiment / "hf_model").exists():  # the signal came after the rename (a slow poll): it must be whole
        AutoModelForMaskedLM.from_pretrained(experiment / "hf_model")
    assert not exporting(), "the temporary folder is removed"

    result = run_in_shell(printed_command(output, "Resume with: "))
    assert result.returncode == 0, result.stderr[-3000:]
    AutoModelForMaskedLM.from_pretrained(experiment / "hf_model")


def test_sigterms_that_keep_coming_while_the_run_stops_cannot_cut_its_message(run_flags, tmp_path):
    """A launcher that stops a rank signals it again when another rank has exited first (DeepSpeed's per-node
    launcher SIGTERMs every rank left): SIGTERM every 5 ms from the first one on, so repeats land in every phase of
    the stop (the step in flight, the save, the unwinding). Before, one landing after the training loop's handler was
    gone killed the process before it said where its checkpoint was."""
    flags = {**run_flags, **QUIET, "checkpoint_dir": tmp_path / "experiments", "num_iterations": 100000}
    log = tmp_path / "run.log"
    process = start("train_bert.py", cli_args(flags), log)
    wait_until(
        lambda: (
            list((tmp_path / "experiments").glob("*/metrics.jsonl"))
            and metric_records(only_experiment(tmp_path / "experiments"), "loss")
        ),
        process,
        log,
    )
    try:
        while process.poll() is None:
            process.send_signal(signal.SIGTERM)
            time.sleep(0.005)
        exit_code = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = log.read_text()
    assert exit_code == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    step = checkpoint_steps(only_experiment(tmp_path / "experiments"))[-1]
    assert output.count("stopped by SIGTERM") == 1, output[-3000:]
    assert f"stopped by SIGTERM after step {step}; checkpoint saved. Resume with: " in output
    assert output.count("received SIGTERM: finishing this step") == 1, "said once, however many signals came"


def test_sigterm_before_the_first_step_leaves_no_experiment_that_cannot_resume(run_flags, tmp_path):
    """The experiment folder exists, no checkpoint yet: the folder is removed and the start command is printed."""
    flags = {**run_flags, **QUIET, "checkpoint_dir": tmp_path / "experiments", "num_iterations": 3}
    log = tmp_path / "run.log"
    process = start("train_bert.py", cli_args(flags), log)
    wait_until(
        lambda: list((tmp_path / "experiments").glob("bert_pretrain.*/hparams.json")), process, log, poll_s=0.002
    )
    assert stop(process) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    output = log.read_text()
    assert "Traceback" not in output and "stopped by SIGTERM before the first step" in output
    assert list((tmp_path / "experiments").iterdir()) == [], "no experiment folder without a checkpoint"
    result = run_in_shell(printed_command(output, "Start again with: "))
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(only_experiment(tmp_path / "experiments")) == [3]


# The model, compiled (the default); a checkpoint every 10 of 100 steps, so a kill lands mid-run.
COMPILED_RUN = {
    "num_layers": 2,
    "num_heads": 2,
    "h_dim": 64,
    "ff_dim": 128,
    "batch_size": 8,
    "max_seq_length": 64,
    "num_iterations": 100,
    "checkpoint_every": 10,
    "log_every": 5,
    "eval_every": 1000,
    "seed": 7,
    "dtype": "fp32",
}


def exported_weights(experiment: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(experiment / "hf_model" / "model.safetensors")


@pytest.mark.slow
def test_a_compiled_run_killed_and_resumed_equals_the_uninterrupted_one_bit_for_bit(run_flags, tmp_path):
    """--compile at its default (on), with the 2 threads a user's 2-core machine runs: SIGKILL after the first
    checkpoint, resume; every logged loss, the final validation and test losses and the exported weights equal the
    uninterrupted run's bit for bit. (With several threads, compiled code once summed the embeddings' gradient in
    an order that changed from run to run.)"""
    env = {**ENV, "OMP_NUM_THREADS": "2"}
    flags = {"dataset": run_flags["dataset"], "tokenizer": run_flags["tokenizer"], **COMPILED_RUN}
    uninterrupted = run_cli("train_bert.py", {**flags, "checkpoint_dir": tmp_path / "uninterrupted"}, env=env)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    log = tmp_path / "killed.log"
    process = start("train_bert.py", cli_args({**flags, "checkpoint_dir": tmp_path / "killed"}), log, env=env)
    wait_until(lambda: list((tmp_path / "killed").glob("bert_pretrain.*/checkpoint-*.pt")), process, log)
    assert stop(process, signal.SIGKILL) == -signal.SIGKILL
    killed = only_experiment(tmp_path / "killed")
    resumed = run_cli("train_bert.py", {"load_checkpoint_dir": killed}, env=env)
    assert resumed.returncode == 0 and "resuming at step" in resumed.stderr, resumed.stderr[-3000:]

    full = only_experiment(tmp_path / "uninterrupted")
    for key in ("loss", "eval_loss", "test_loss"):
        assert [(r["step"], r[key]) for r in metric_records(killed, key)] == [
            (r["step"], r[key]) for r in metric_records(full, key)
        ], key
    expected, got = exported_weights(full), exported_weights(killed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)


# --------------------------------------------------------------------------------------------------------------------
# 5. One error line where tracebacks were.
# --------------------------------------------------------------------------------------------------------------------

BAD_EXPERIMENT_CASES = {
    "hparams_not_json": lambda experiment: (experiment / "hparams.json").write_text("{not json"),
    "hparams_empty_object": lambda experiment: (experiment / "hparams.json").write_text("{}"),
}


@pytest.mark.parametrize("case", BAD_EXPERIMENT_CASES)
def test_a_damaged_hparams_json_is_one_line(experiment, case):
    BAD_EXPERIMENT_CASES[case](experiment)
    before = snapshot(experiment)
    result = run_cli("train_bert.py", {"load_checkpoint_dir": experiment}, env=ENV)
    assert_one_line_error(result, str(experiment / "hparams.json"), "start a new experiment")
    assert snapshot(experiment) == before


@pytest.mark.parametrize("seed", [2**32, -1, 2**64])
def test_a_seed_numpy_cannot_take_is_one_line(run_flags, tmp_path, seed):
    result = run_cli("train_bert.py", {**run_flags, "checkpoint_dir": tmp_path / "experiments", "seed": seed}, env=ENV)
    assert_one_line_error(result, "--seed", str(seed))
    assert not (tmp_path / "experiments").exists()


def test_a_dangling_symlink_checkpoint_dir_is_one_line_before_loading(run_flags, tmp_path):
    (tmp_path / "experiments").symlink_to(tmp_path / "unmounted" / "experiments")
    result = run_cli("train_bert.py", {**run_flags, "checkpoint_dir": tmp_path / "experiments"}, env=ENV)
    assert_one_line_error(result, "symbolic link", str(tmp_path / "unmounted" / "experiments"), "does not exist")
    assert "Generating" not in result.stderr and "training" not in result.stderr, "checked before loading data"


@pytest.mark.skipif(shutil.which("setpriv") is None or os.getuid() != 0, reason="needs root and setpriv")
def test_an_experiment_owned_by_another_user_is_one_line(experiment):
    """The folder is writable, its files belong to another user: run as root without the capability that overrides
    file permissions (what any other user is)."""
    for path in [experiment, *experiment.rglob("*")]:
        os.chown(path, 12345, 12345)
        if path.is_dir():
            os.chmod(path, 0o777)
    before = snapshot(experiment)
    command = [
        "setpriv",
        "--bounding-set",
        "-dac_override,-dac_read_search",
        sys.executable,
        str(ROOT / "train_bert.py"),
        "--load_checkpoint_dir",
        str(experiment),
        "--num_iterations",
        "6",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert_one_line_error(result, "cannot be resumed by this user", "train.log is not writable", "owner uid 12345")
    assert snapshot(experiment) == before


# --------------------------------------------------------------------------------------------------------------------
# 7. Sequence-length limits and out of memory.
# --------------------------------------------------------------------------------------------------------------------


def test_max_seq_length_beyond_the_tokenizer_folders_model_is_one_line(run_flags, tiny_tokenizer, tmp_path):
    tokenizer = Path(shutil.copytree(tiny_tokenizer, tmp_path / "tokenizer"))
    (tokenizer / "config.json").write_text(
        json.dumps({"model_type": "roberta", "max_position_embeddings": 66, "pad_token_id": 1})
    )
    result = run_cli(
        "train_bert.py",
        {**run_flags, "checkpoint_dir": tmp_path / "experiments", "tokenizer": tokenizer, "max_seq_length": 128},
        env=ENV,
    )
    assert_one_line_error(
        result, "--max_seq_length 128", "64 positions", "max_position_embeddings 66", "--max_seq_length 64 or less"
    )
    assert not (tmp_path / "experiments").exists()


def test_a_step_that_cannot_fit_is_refused_before_anything_is_created(run_flags, tiny_tokenizer, tmp_path):
    """A tokenizer folder that declares no length limit (tokenizer.json only) and --max_seq_length 100000: the
    attention matrices alone need hundreds of GiB."""
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    shutil.copy(tiny_tokenizer / "tokenizer.json", tokenizer)
    result = run_cli(
        "train_bert.py",
        {**run_flags, "checkpoint_dir": tmp_path / "experiments", "tokenizer": tokenizer, "max_seq_length": 100000},
        env=ENV,
    )
    line = assert_one_line_error(
        result, "one training step needs about", "--max_seq_length 100000", "lower --max_seq_length or --batch_size"
    )
    assert float(line.split("needs about ")[1].split(" GiB")[0]) > 100
    assert not (tmp_path / "experiments").exists()


def limit_address_space(gib: float):
    """A preexec_fn: the child process may map at most `gib` GiB (`ulimit -v`), so a big allocation really fails."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (int(gib * 2**30), int(gib * 2**30)))


@pytest.fixture(scope="module")
def long_blocks_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("long_blocks"), lines={"train": 6000, "validation": 600, "test": 60})


@pytest.mark.slow
def test_out_of_memory_in_a_step_is_one_line_that_keeps_the_checkpoint(run_flags, long_blocks_corpus, tmp_path):
    """Blocks of 2048 tokens and 8 heads: a step's attention needs GiBs more than loading does. Under a 4 GiB
    address-space limit the step's allocation fails for real: one line naming the flags, and no experiment without
    a checkpoint (new run) / the checkpoint kept (resumed run). Learned positions and dropout keep attention on
    SDPA's math path, which builds the [batch, heads, 2048, 2048] matrices (without dropout the CPU's flash kernel
    needs far less)."""
    flags = {
        **run_flags,
        **QUIET,
        "dataset": long_blocks_corpus,
        "checkpoint_dir": tmp_path / "experiments",
        "max_seq_length": 2048,
        "num_heads": 8,
        "batch_size": 4,
        "num_iterations": 2,
        "dropout": 0.1,
        "positions": "learned",
    }
    result = run_cli("train_bert.py", flags, env=ENV, preexec_fn=limit_address_space(4))
    assert_one_line_error(
        result,
        "out of memory during training",
        "--batch_size (now 4",
        "--max_seq_length (now 2048)",
        "was removed",
        "Start again with",
    )
    assert not list((tmp_path / "experiments").glob("bert_pretrain.*"))

    result = run_cli("train_bert.py", flags, env=ENV)  # no limit: two steps, a checkpoint
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = only_experiment(tmp_path / "experiments")
    before = {name: data for name, data in snapshot(experiment).items() if name.startswith("checkpoint")}
    result = run_cli(
        "train_bert.py",
        {"load_checkpoint_dir": experiment, "num_iterations": 4},
        env=ENV,
        preexec_fn=limit_address_space(4),
    )
    assert_one_line_error(
        result, "out of memory during training", f"last checkpoint in {experiment} is intact", "Resume with: "
    )
    assert {name: data for name, data in snapshot(experiment).items() if name.startswith("checkpoint")} == before


# --------------------------------------------------------------------------------------------------------------------
# 8-11. train_bert_ds.py under the deepspeed launcher: 2 ranks on the CPU (gloo).
# --------------------------------------------------------------------------------------------------------------------

DS_ENV = {
    **{name: value for name, value in ENV.items() if name not in PROCESS_GROUP_ENV},
    "DS_ACCELERATOR": "cpu",
}
DS_FLAGS = {"zero_stage": 2, "dtype": "fp32", "eval_every": 1000, "checkpoint_every": 1000, "log_every": 10}
needs_deepspeed_launcher = pytest.mark.skipif(shutil.which("deepspeed") is None, reason="needs the deepspeed command")


def start_deepspeed(args: list[str], log: Path) -> subprocess.Popen:
    """`deepspeed --num_gpus=2 train_bert_ds.py args...` from the repository, as a user types it, in its own
    process group (runner, per-node launcher and ranks), output to `log`."""
    with open(log, "w") as output:
        return subprocess.Popen(
            [shutil.which("deepspeed"), "--num_gpus=2", "train_bert_ds.py", *args],
            cwd=ROOT,
            env=DS_ENV,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def group_processes(group: int) -> list:
    """The live processes of process group `group` (the launcher's runner, its launcher and the ranks)."""
    import psutil

    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def wait_for_group_to_end(group: int, timeout_s: float = 180) -> bool:
    deadline = time.monotonic() + timeout_s
    while group_processes(group) and time.monotonic() < deadline:
        time.sleep(0.5)
    return not group_processes(group)


def kill_group(group: int) -> None:
    for process in group_processes(group):
        process.kill()


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def launcher_stopped_run(run_flags, tmp_path_factory) -> dict:
    """A 2-rank run to 300 steps whose `deepspeed` runner got SIGTERM mid-run (what `docker stop` does), then the
    resume command it printed, pasted into bash."""
    root = tmp_path_factory.mktemp("launcher_stop")
    log = root / "launcher.log"
    runner = start_deepspeed(
        cli_args({**run_flags, **DS_FLAGS, "checkpoint_dir": root / "experiments", "num_iterations": 300}), log
    )
    try:
        wait_until(
            lambda: (
                list((root / "experiments").glob("*/metrics.jsonl"))
                and metric_records(only_experiment(root / "experiments"), "loss")
            ),
            runner,
            log,
        )
        # Freeze the ranks while the runner dies, so that the run cannot finish its 300 steps in the moment between
        # the signal and the ranks' watcher seeing it (a few steps: the watcher looks five times a second).
        ranks = [process for process in group_processes(runner.pid) if "--local_rank=" in " ".join(process.cmdline())]
        assert len(ranks) == 2, [process.cmdline() for process in ranks]
        for rank in ranks:
            rank.suspend()
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=60)
        for rank in ranks:
            rank.resume()
        ranks_ended = wait_for_group_to_end(runner.pid)
    finally:
        kill_group(runner.pid)
    output = log.read_text()
    experiment = only_experiment(root / "experiments")
    stopped_tag = (experiment / "latest").read_text() if (experiment / "latest").exists() else None
    resume = (
        subprocess.run(
            ["bash", "-c", printed_command(output, "Resume with: ")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env=DS_ENV,
        )
        if "Resume with: " in output
        else None
    )
    return {
        "output": output,
        "experiment": experiment,
        "ranks_ended": ranks_ended,
        "stopped_tag": stopped_tag,
        "resume": resume,
    }


@pytest.mark.slow
@needs_deepspeed_launcher
def test_sigterm_to_the_deepspeed_launcher_stops_every_rank_with_one_checkpoint(launcher_stopped_run):
    run = launcher_stopped_run
    assert run["ranks_ended"], f"the ranks went on training without their launcher:\n{run['output'][-3000:]}"
    assert "Traceback" not in run["output"], run["output"][-3000:]
    assert run["output"].count("stopped by SIGTERM after step") == 1, "said once, by rank 0"
    step = int(run["stopped_tag"].removeprefix("global_step"))
    assert 0 < step < 300
    assert f"stopped by SIGTERM after step {step}; checkpoint saved" in run["output"]


@pytest.mark.slow
@needs_deepspeed_launcher
def test_the_printed_multi_rank_resume_command_works_as_printed(launcher_stopped_run):
    run = launcher_stopped_run
    command = printed_command(run["output"], "Resume with: ")
    assert command.startswith("deepspeed --num_gpus=2 train_bert_ds.py --load_checkpoint_dir ")
    assert run["resume"].returncode == 0, run["resume"].stderr[-3000:]
    assert (run["experiment"] / "latest").read_text() == "global_step300"
    assert run["resume"].stdout.splitlines().count(str(run["experiment"])) == 1, "the path, printed once"


@pytest.mark.slow
@needs_deepspeed_launcher
def test_every_rank_refuses_a_busy_experiment_and_one_line_says_why(launcher_stopped_run, tmp_path):
    experiment = launcher_stopped_run["experiment"]
    with safeguards.experiment_lock(experiment):  # this test process is the run that holds it
        runner = start_deepspeed(
            ["--load_checkpoint_dir", str(experiment), "--num_iterations=400"], tmp_path / "busy.log"
        )
        try:
            runner.wait(timeout=300)
            assert wait_for_group_to_end(runner.pid), "every rank exits"
        finally:
            kill_group(runner.pid)
    output = (tmp_path / "busy.log").read_text()
    assert runner.returncode != 0
    assert "Traceback" not in output, output[-3000:]
    assert error_lines(output) == [line for line in error_lines(output) if f"in use by pid {os.getpid()}" in line]
    assert len(error_lines(output)) == 1, output[-3000:]
    assert (experiment / "latest").read_text() == "global_step300", "nothing was trained"


@pytest.mark.slow
@needs_deepspeed_launcher
def test_a_killed_rank_is_one_line_naming_the_checkpoint_a_resume_uses(run_flags, tmp_path):
    import psutil

    log = tmp_path / "launcher.log"
    runner = start_deepspeed(
        cli_args(
            {
                **run_flags,
                **DS_FLAGS,
                "checkpoint_dir": tmp_path / "experiments",
                "num_iterations": 100000,
                "checkpoint_every": 20,
            }
        ),
        log,
    )
    try:
        wait_until(lambda: list((tmp_path / "experiments").glob("*/latest")), runner, log)
        [rank_1] = [
            process
            for process in psutil.Process(runner.pid).children(recursive=True)
            if "--local_rank=1" in process.cmdline()
        ]
        rank_1.kill()  # SIGKILL, as the OOM killer does
        runner.wait(timeout=300)
    finally:
        kill_group(runner.pid)
    output = log.read_text()
    experiment = only_experiment(tmp_path / "experiments")
    assert "Traceback" not in output, output[-3000:]
    [line] = error_lines(output)
    assert line.startswith("error: rank 0: another rank stopped (")
    assert "cannot save alone" in line
    assert (
        f"a resume uses the last complete checkpoint, {(experiment / 'latest').read_text()} in {experiment}: "
        f"deepspeed --num_gpus=2 train_bert_ds.py --load_checkpoint_dir {experiment}"
    ) in line


@pytest.mark.slow
@needs_deepspeed_launcher
@pytest.mark.parametrize(
    "config, named",
    [
        ({"zero_optimization": {"stage": 5}}, ["zero_optimization.stage (in --ds_config", "must be 0, 1, 2 or 3"]),
        (
            {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
            ["zero_optimization.offload_param.device (in --ds_config", "needs zero_optimization.stage (in --ds_config"],
        ),
    ],
    ids=["stage", "offload_param"],
)
def test_a_bad_ds_config_value_is_one_line_naming_its_field(run_flags, tmp_path, config, named):
    ds_config = tmp_path / "my_config.json"
    ds_config.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}, **config}))
    runner = start_deepspeed(
        cli_args({**run_flags, "checkpoint_dir": tmp_path / "experiments", "ds_config": ds_config}),
        tmp_path / "run.log",
    )
    runner.wait(timeout=300)
    output = (tmp_path / "run.log").read_text()
    assert runner.returncode != 0
    assert "Traceback" not in output, output[-3000:]
    [line] = error_lines(output)
    for piece in [*named, str(ds_config)]:
        assert piece in line, line
    assert not (tmp_path / "experiments").exists()

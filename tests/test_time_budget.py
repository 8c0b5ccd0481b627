"""--time_budget and --warmup_steps as a share of the run: the schedule ends with the run, the budget ends the run.

The budget tests check a correctness property (the run stops by itself, the learning rate has reached the end of
its schedule, and the whole run took about the budget), with tolerances generous enough for a busy machine; they
make no speed claim.
"""

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_bert
from conftest import ROOT, cli_args, run_cli
from pretraining import speed, time_budget


def metric_records(experiment_dir: Path, key: str) -> list[dict]:
    """The metrics.jsonl records that carry `key`."""
    lines = (Path(experiment_dir) / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if key in record]


def lrs_of(scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, steps: int) -> list:
    """The learning rate used at each of `steps` optimizer steps."""
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def sgd(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize(
    "warmup, num_iterations, warmup_steps", [(0.25, 40, 10), (0.06, 10000, 600), (7, 40, 7), (0.0, 20, 0)]
)
def test_warmup_as_a_share_of_the_run(warmup, num_iterations, warmup_steps):
    """A warmup below 1 is that share of the steps; an integer is a step count; then linear decay to 0 at the end."""
    optimizer = sgd()
    used = lrs_of(train_bert.create_lr_scheduler(optimizer, warmup, num_iterations), optimizer, num_iterations)
    decay_steps = num_iterations - warmup_steps
    expected = [
        step / warmup_steps if step < warmup_steps else (num_iterations - step) / decay_steps
        for step in range(num_iterations)
    ]
    assert used == pytest.approx(expected, abs=1e-12)
    if warmup_steps:
        assert max(used) == pytest.approx(1.0) and used.index(max(used)) == warmup_steps


class FakeBudget(time_budget.TimeBudget):
    """A budget whose clock is set by the test."""

    now = 0.0

    def spent(self) -> float:
        return self.now


def test_budget_schedule_follows_the_share_of_the_budget_spent():
    """Warmup over the first 10% of the training time, then linear decay reaching 0 exactly when training stops."""
    budget = FakeBudget(100.0)
    budget.evaluation_batch_s, budget.validation_batches, budget.checkpoint_s = 0.5, 10, 1.0
    training_s = 100.0 - (0.5 * 10 + 2 * 1.0 + time_budget.TimeBudget.END_MARGIN_S)
    assert budget.training_s() == pytest.approx(training_s)
    optimizer = sgd(2.0)
    scheduler = train_bert.create_lr_scheduler(optimizer, 0.1, 10**9, budget)
    for share, multiplier in [(0.0, 0.0), (0.05, 0.5), (0.1, 1.0), (0.55, 0.5), (1.0, 0.0), (1.2, 0.0)]:
        budget.now = share * training_s
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * multiplier), share
    budget.now = training_s - 1.0
    assert not budget.exhausted(0.5) and budget.exhausted(1.5)
    assert "budget" not in json.dumps(scheduler.state_dict(), default=str)  # nothing unsaveable in the checkpoint


def test_a_new_run_takes_a_first_step_however_short_its_budget_and_a_spent_resume_none():
    """A budget whose end phase alone needs more than all of it still trains one step in a new run (so there is a
    checkpoint and a trained model to export); a resumed run whose budget is spent trains none."""
    budget = FakeBudget(1.0)
    budget.evaluation_batch_s, budget.validation_batches, budget.checkpoint_s = 0.5, 10, 1.0
    budget.now = 0.01
    assert budget.exhausted(0)
    assert next(iter(budget.steps(0))) == 1
    budget.now = 2.0
    assert list(budget.steps(5)) == []


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("600", 600),
        (600, 600),
        ("10m", 600),
        ("2h30m", 9000),
        ("1d", 86400),
        ("90s", 90),
        ("1.5h", 5400),
        ("1h2m3s", 3723),
    ],
)
def test_durations(text, seconds):
    assert time_budget.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"time_budget": "10 minutes"}, "--time_budget '10 minutes' is not a duration"),
        ({"time_budget": "0m"}, "must be a positive duration"),
        ({"time_budget": "10m", "warmup_steps": 50}, "--warmup_steps 50 is a number of steps"),
        ({"time_budget": "10m", "num_iterations": 50}, "give either --num_iterations"),
        ({"warmup_steps": 1.5}, "--warmup_steps must be a share of the run"),
    ],
)
def test_bad_budget_flags_are_one_error_line(tiny_flags, flags, message):
    result = run_cli("train_bert.py", {**tiny_flags, **flags}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert message in result.stderr, result.stderr
    assert not Path(tiny_flags["checkpoint_dir"]).exists()


def budget_line(experiment: Path) -> tuple[float, float]:
    """(spent, total) from the run's last "time budget: X s of Y s spent" log line."""
    line = [line for line in (experiment / "train.log").read_text().splitlines() if "time budget: " in line][-1]
    spent, total = line.split("time budget: ")[1].split(" s spent")[0].split(" s of ")
    return float(spent), float(total)


BUDGET_S = 10


class VirtualClock:
    """train_bert's clock made deterministic: every reading advances it by `tick` seconds, so how long a step, an
    evaluation batch or a save "takes" is a count of clock readings, the same on a loaded machine as on an idle
    one. The rest of the `time` module is the real one."""

    def __init__(self, tick: float):
        self.now, self.tick = 1000.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


def test_time_budget_ends_the_run_on_time(tiny_flags, monkeypatch):
    """A 10 s budget: the run stops by itself, its LR has decayed to (nearly) 0, it ends with the final evaluation,
    checkpoint, test evaluation and export, and all of that took the budget: training stopped early enough for the
    end, and not much earlier. The clock is virtual (`VirtualClock`), so the figures do not depend on the machine."""
    clock = VirtualClock(tick=0.005)
    monkeypatch.setattr(train_bert, "time", clock)
    monkeypatch.setattr(time_budget, "time", clock)
    flags = {**tiny_flags, "time_budget": f"{BUDGET_S}s", "log_every": 25, "lr": 1e-3}
    experiment = Path(train_bert.train(**flags))

    logged = metric_records(experiment, "lr")
    last_step = logged[-1]["step"]
    assert last_step > 25 and logged[-1]["lr"] < 0.05 * flags["lr"], logged[-1]  # the schedule reached its end
    assert max(record["lr"] for record in logged) > 0.5 * flags["lr"]  # and went through its peak on the way
    assert [r["step"] for r in metric_records(experiment, "eval_loss")][-1] == last_step
    assert [r["step"] for r in metric_records(experiment, "test_loss")] == [last_step]
    assert (experiment / "latest").read_text().strip() == f"checkpoint-{last_step:08d}.pt"
    assert (experiment / "hf_model" / "config.json").is_file()
    spent, total = budget_line(experiment)
    # The margin kept for the fill-mask demo (untimed ahead) costs no virtual time: the run ends that much early.
    assert total == BUDGET_S and 0.9 * (BUDGET_S - time_budget.TimeBudget.END_MARGIN_S) <= spent <= BUDGET_S, spent
    assert logged[-1]["budget_spent_s"] >= 0.5 * BUDGET_S


def test_resumed_budget_run_continues_the_budget_and_the_schedule(tiny_flags):
    """SIGTERM a third of the way through a 10 s budget saves the spent time; the resume trains only the rest of the
    budget, continuing the LR schedule where it was (no second warmup), and ends on time. (Step counts depend on
    speed, so a budgeted run is not compared bit for bit with an uninterrupted one; step-based runs are.)"""
    flags = {
        **tiny_flags,
        "time_budget": f"{BUDGET_S}s",
        "log_every": 5,
        "warmup_steps": 0.2,
        "checkpoint_dir": tiny_flags["checkpoint_dir"],
    }
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train_bert.py"), *cli_args(flags)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    experiments = Path(flags["checkpoint_dir"])
    deadline = time.monotonic() + 240
    # Wait until it has spent 30% of its budget: early enough that the rest holds steps as well as the end's reserve
    # even on a busy machine (a test never depends on how fast this machine is).
    while time.monotonic() < deadline:
        metrics = list(experiments.glob("*/metrics.jsonl"))
        records = map(json.loads, metrics[0].read_text().splitlines()) if metrics else []
        if any(record.get("budget_spent_s", 0) > 0.3 * BUDGET_S for record in records):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    experiment = metrics[0].parent
    checkpoint = torch.load(experiment / (experiment / "latest").read_text().strip(), weights_only=True)
    saved_spent, saved_step = checkpoint["budget_spent_s"], checkpoint["step"]
    assert 0.3 * BUDGET_S < saved_spent < BUDGET_S
    lr_before = [r["lr"] for r in metric_records(experiment, "lr") if r["step"] <= saved_step][-1]

    resume_command = stderr.strip().splitlines()[-1].split("Resume with: ")[1]
    assert resume_command.startswith("python train_bert.py --load_checkpoint_dir")
    result = subprocess.run(
        resume_command.split(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = [r for r in metric_records(experiment, "lr") if r["step"] > saved_step]
    assert resumed, "the resumed run trained"
    # The schedule continued: past the warmup already, the LR only decays from where it was.
    assert resumed[0]["lr"] <= lr_before * 1.0001 and resumed[-1]["lr"] < 0.05 * resumed[0]["lr"] + 1e-12
    assert resumed[0]["budget_spent_s"] > saved_spent
    spent, total = budget_line(experiment)
    assert total == BUDGET_S and saved_spent < spent <= 1.25 * BUDGET_S


def test_a_slow_first_step_and_a_slow_start_up_evaluation_do_not_end_a_budgeted_run(tiny_flags, monkeypatch):
    """A compile makes the first step slow, and a busy machine makes the evaluation batch timed at start-up slow:
    the budget counts both as spent, but predicts neither the next step nor the end of the run from them. Injected
    here (5 s in the first step, 1 s in each evaluation batch timed before it), the run keeps training until its
    end reserve instead of stopping after one step, and says nothing about the first step having overrun."""
    budget_s, first_step_delay_s = 12, 5.0
    started = []
    real_loss, real_timing = train_bert.mlm_loss, train_bert.time_evaluation_batch

    def slow_first_step(*args, **kwargs):
        if not started:
            started.append(True)
            time.sleep(first_step_delay_s)
        return real_loss(*args, **kwargs)

    def busy_start_up(model, batches, *args):
        return real_timing(model, batches, *args) + (0.0 if started else 1.0)

    monkeypatch.setattr(train_bert, "mlm_loss", slow_first_step)
    monkeypatch.setattr(train_bert, "time_evaluation_batch", busy_start_up)
    experiment = Path(train_bert.train(**{**tiny_flags, "time_budget": f"{budget_s}s", "log_every": 5}))
    steps = [record["step"] for record in metric_records(experiment, "loss")]
    assert steps[-1] > time_budget.TimeBudget.WARMUP_STEPS + 10, steps
    spent, total = budget_line(experiment)
    assert spent >= first_step_delay_s + 0.3 * (budget_s - first_step_delay_s), spent
    assert "the first step alone took" not in (experiment / "train.log").read_text()


def test_a_budget_the_first_step_overruns_says_why_and_what_to_do():
    """A first step (a compile) longer than the budget ends the run on that step and the last line says so."""
    budget = FakeBudget(50.0)
    budget.record_step(221.0)
    budget.now = 221.0
    assert budget.step_estimate_s() == 0.0  # never extrapolated
    assert "the first step alone took 221 s of the 50 s budget" in budget.overrun_note()
    assert "--compile False" in budget.overrun_note()
    for seconds in (0.2, 0.3, 9.0, 0.25):  # after the warm-up: the median of the recent steps, an outlier ignored
        budget.record_step(seconds)
    assert budget.step_estimate_s() == pytest.approx(0.3)


def test_auto_size_picks_the_largest_shape_that_sees_20_tokens_per_parameter(monkeypatch):
    """With a --time_budget, the shape is the largest of AUTO_SHAPES whose measured speed gives it >= 20 tokens per
    non-embedding parameter in the training part of the budget; the search stops at the first that falls short;
    flags the user gave are kept; a GPU gets a larger batch."""
    flags = {
        **{name: parameter.default for name, parameter in inspect.signature(train_bert.train).parameters.items()},
        "time_budget": "100s",
    }
    training_s = (1 - time_budget.TimeBudget.END_SHARE) * 100
    measured = []

    def speed_for(per_parameter: dict[int, float]):
        def measure(shape_flags):
            measured.append((shape_flags["num_layers"], shape_flags["h_dim"], shape_flags["batch_size"]))
            layers, width, ff = shape_flags["num_layers"], shape_flags["h_dim"], shape_flags["ff_dim"]
            return per_parameter[width] * layers * (4 * width**2 + 2 * width * ff) / training_s

        return measure

    # Tokens per parameter each shape would see: 4 x 256 is the last with >= 20; 8 x 512 (more than 20) is never
    # reached, because the search stops at 6 x 384.
    measure = speed_for({128: 500, 256: 21, 384: 19, 512: 25, 768: 1})
    chosen, why = time_budget.choose_shape_for_budget(flags, torch.device("cpu"), set(), measure)
    assert why.startswith("auto size: 4 layers x 256 (ff 1024, 4 heads), batch 16, lr 0.0015")
    assert (chosen["num_layers"], chosen["h_dim"], chosen["num_heads"], chosen["ff_dim"]) == (4, 256, 4, 1024)
    assert chosen["lr"] == 1.5e-3 and chosen["batch_size"] == flags["batch_size"]
    assert [shape[:2] for shape in measured] == [(2, 128), (4, 256), (6, 384)]

    measured.clear()  # nothing reaches 20: the smallest (the defaults); on a GPU, GPU_BATCH_SIZE
    measure = speed_for({128: 3, 256: 1, 384: 1, 512: 1, 768: 1})
    chosen, why = time_budget.choose_shape_for_budget(flags, torch.device("cuda"), set(), measure)
    assert "(the defaults)" not in why  # the batch changed
    assert (chosen["num_layers"], chosen["h_dim"], chosen["batch_size"]) == (2, 128, time_budget.GPU_BATCH_SIZE)
    assert measured == [(2, 128, time_budget.GPU_BATCH_SIZE), (4, 256, time_budget.GPU_BATCH_SIZE)]

    measure = speed_for({128: 500, 256: 500, 384: 500, 512: 500, 768: 500})
    chosen, _ = time_budget.choose_shape_for_budget(
        {**flags, "num_layers": 3, "lr": 1e-4, "batch_size": 8},
        torch.device("cuda"),
        {"num_layers", "lr", "batch_size"},
        measure,
    )
    assert (chosen["num_layers"], chosen["h_dim"], chosen["lr"], chosen["batch_size"]) == (3, 768, 1e-4, 8)


def test_a_budgeted_run_without_model_flags_sizes_its_model_and_records_it(tiny_corpus, tiny_tokenizer, tmp_path):
    """The auto-sizing runs for real (measured speeds, a CPU): its choice is logged and saved in hparams.json, so a
    resume rebuilds the same model; --auto_size False or a model flag keeps the flags as given."""
    common = {
        "dataset": str(tiny_corpus),
        "tokenizer": str(tiny_tokenizer),
        "max_seq_length": 32,
        "compile": False,
        "time_budget": "6s",
        "eval_blocks": 8,
    }
    experiment = Path(train_bert.train(checkpoint_dir=str(tmp_path / "auto"), **common))
    log = (experiment / "train.log").read_text()
    assert "auto size: " in log and "tokens per parameter in this budget on cpu" in log
    saved = json.loads((experiment / "hparams.json").read_text())["flags"]
    chosen = [shape for shape in time_budget.AUTO_SHAPES if shape[:2] == (saved["num_layers"], saved["h_dim"])]
    assert chosen and (saved["num_heads"], saved["ff_dim"], saved["lr"]) == chosen[0][2:]
    fixed = Path(train_bert.train(checkpoint_dir=str(tmp_path / "fixed"), auto_size=False, **common))
    assert "auto size" not in (fixed / "train.log").read_text()


def test_a_budget_the_compile_overruns_is_told_so_at_the_start_and_the_end(tiny_flags, monkeypatch):
    """With --compile on (the default) a 1 s budget cannot hold the first step's compile: the run warns when the
    budget starts, trains, finishes its end phase, and its last line says what took the time and what to do. The
    compile is stood in for by a first step that takes 2 s (a real one takes from under a second, cached, to
    minutes), so the test does not depend on how fast this machine compiles."""

    def slow_first_compiled_step(loss_function):
        calls = []

        def loss(*args, **kwargs):
            if not calls:
                calls.append(True)
                time.sleep(2.0)
            return loss_function(*args, **kwargs)

        return loss

    monkeypatch.setattr(speed, "compiled", slow_first_compiled_step)
    experiment = Path(train_bert.train(**{**tiny_flags, "compile": True, "time_budget": "1s"}))
    log = (experiment / "train.log").read_text()
    assert "with --compile True: the first step compiles the model" in log
    last = [line for line in log.splitlines() if "time budget: " in line][-1]
    assert "the first step alone took 2 s of the 1 s budget" in last and "--compile False" in last, last
    assert (experiment / "hf_model" / "config.json").is_file()

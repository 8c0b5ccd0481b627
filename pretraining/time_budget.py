"""The time budget (--time_budget) and the model size chosen for it (--auto_size)."""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import math
import re
import statistics
import time
from typing import Any, Callable, Iterable, Iterator

import torch
from loguru import logger

from pretraining.errors import ConfigError


def parse_duration(value: str | int | float, flag: str = "--time_budget") -> float:
    """Seconds in a duration: a number of seconds (600), or amounts with units d/h/m/s ("10m", "2h30m", "1d")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.fullmatch(
            r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text
        )
        if not text or parts is None:
            raise ConfigError(
                f"{flag} {value!r} is not a duration; give seconds (600) or amounts with units d, h, m, "
                "s (10m, 2h30m, 1d)"
            )
        seconds = sum(float(amount or 0) * unit for amount, unit in zip(parts.groups(), (86400, 3600, 60, 1)))
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{flag} {value!r} must be a positive duration (600, 10m, 2h30m, 1d)")
    return seconds


class StepLimit:
    """A run that ends after --num_iterations steps. It answers the training loop's questions the way TimeBudget does
    for a --time_budget run (which steps, is this the last, what to log, how many test blocks), so the loop asks
    whichever the run has, in one call each."""

    def __init__(self, num_iterations: int):
        self.num_iterations = self.total_steps = num_iterations  # total_steps: the progress bar's length
        self.training_ended = False  # set at the last step: a stop from then on is in the end phase

    def steps(self, start_step: int) -> Iterable[int]:
        """The steps left to train after `start_step`."""
        return range(start_step + 1, self.num_iterations + 1)

    def step_done(self, step: int, seconds: float, evaluate_now: bool, checkpoint_now: bool) -> bool:
        """Count a finished step; True if it is the last."""
        self.training_ended = step == self.num_iterations
        return self.training_ended

    def log_fields(self) -> dict[str, float]:
        """Fields for the step's log line."""
        return {}

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Time an evaluation or a checkpoint (a TimeBudget plans the end of the run with it)."""
        yield

    def test_blocks(self, batch_size: int) -> int | None:
        """How many test blocks the end of the run evaluates (None: all)."""
        return None


class TimeBudget:
    """The wall-clock budget of a --time_budget run: what is spent, what the end of the run needs, the progress.

    The clock runs from the first training step (loading data and building the model are not counted) and counts
    everything after it: steps, evaluations, checkpoints, and the end of the run (last evaluation and checkpoint,
    test evaluation, export and fill-mask demo). So that the end fits, training stops `reserve_s` early: an
    estimate of that end work from measurements (an evaluation batch and a checkpoint-sized save, timed at the
    start, again once the first steps are done, then the real ones as they happen). A resumed run adds the time its
    checkpoint says was spent before.

    A process's first steps are not its step time: they compile the model (torch.compile: a minute for BERT-base)
    and allocate memory. They count as spent, but the stop rule predicts the next step from the median of the
    recent steps after them, never from a compile.
    """

    END_MARGIN_S = 3.0  # the fill-mask demo loads the exported model into a pipeline: a few seconds, not timed ahead
    RETIME_EVERY_S = 30.0  # how often an evaluation batch is timed again: the machine's load changes during a run
    WARMUP_STEPS = 2  # a process's first steps (compilation, first allocations): spent, never extrapolated
    END_SHARE = 0.15  # the test evaluation is cut to a subset where the whole split would take more of the budget
    STEP_WINDOW = 9  # recent step times whose median predicts the next step

    def __init__(self, total_s: float, spent_before_s: float = 0.0):
        self.total_s, self.spent_before_s = total_s, spent_before_s
        self.clock_start = self.timed_at = time.perf_counter()
        self.evaluation_batch_s = self.checkpoint_s = 0.0
        self.validation_batches = self.all_test_batches = self.test_batches = 0
        self.step_times: collections.deque[float] = collections.deque(maxlen=self.STEP_WINDOW)
        self.steps_seen, self.first_step_s = 0, 0.0
        self.total_steps = None  # unknown ahead: the progress bar counts steps without a length
        self.training_ended = False  # set at the last step: a stop from then on is in the end phase
        self.time_evaluation_batch: Callable[[], float] = lambda: 0.0  # set by measure_end_of_run

    def retime_due(self) -> bool:
        """Whether the evaluation batch should be timed again: after each warm-up step and the first step after
        them (the timing at the start may have shared the machine with start-up work or a compile: it must not
        decide the first stop), then every RETIME_EVERY_S seconds."""
        return self.steps_seen <= self.WARMUP_STEPS + 1 or time.perf_counter() - self.timed_at >= self.RETIME_EVERY_S

    def start(self) -> None:
        """Start the clock (at the first training step)."""
        self.clock_start = time.perf_counter()

    def spent(self) -> float:
        """Seconds spent, earlier runs of a resumed experiment included."""
        return self.spent_before_s + time.perf_counter() - self.clock_start

    def record_step(self, seconds: float) -> None:
        """Count one optimizer step that took `seconds`; the warm-up steps are remembered but not averaged."""
        self.steps_seen += 1
        if self.steps_seen == 1:
            self.first_step_s = seconds
        if self.steps_seen > self.WARMUP_STEPS:
            self.step_times.append(seconds)

    def step_estimate_s(self) -> float:
        """The expected duration of the next step: the median of the recent steps after the warm-up (0 during it,
        so a compile never ends a run that has time left)."""
        return statistics.median(self.step_times) if self.step_times else 0.0

    def set_evaluation_batch_s(self, seconds: float) -> None:
        """A new measurement of one evaluation batch; the end's two evaluations (validation, then test) are given
        END_SHARE of the budget, so the test split is cut to what is left of it (at least one batch, at most the
        whole split)."""
        self.evaluation_batch_s, self.timed_at = seconds, time.perf_counter()
        room = int(self.END_SHARE * self.total_s / max(seconds, 1e-9)) - self.validation_batches
        self.test_batches = min(self.all_test_batches, max(1, room))

    def reserve_s(self) -> float:
        """The time kept for the end of the run: final and test evaluation, the last checkpoint, the export."""
        end_batches = self.validation_batches + self.test_batches
        return self.evaluation_batch_s * end_batches + 2 * self.checkpoint_s + self.END_MARGIN_S

    def training_s(self) -> float:
        """The point of the budget at which training stops (and the learning rate reaches 0)."""
        return max(self.total_s - self.reserve_s(), 1e-3)

    def progress(self) -> float:
        """The share of the training time spent: what the learning rate schedule follows."""
        return min(1.0, self.spent() / self.training_s())

    def exhausted(self, next_seconds: float) -> bool:
        """True if work of `next_seconds` (one more step and what follows it) would run into the reserve."""
        return self.spent() + next_seconds > self.training_s()

    def overrun_note(self) -> str:
        """Why a run that ended past its budget did, when its first step (a compile) took much of it; else ''."""
        if self.spent() <= 1.05 * self.total_s or self.first_step_s < 0.25 * self.total_s:
            return ""
        return (
            f"; the first step alone took {self.first_step_s:.0f} s of the {self.total_s:.0f} s budget (compiling "
            "the model): raise --time_budget or pass --compile False"
        )

    # The training loop's questions, as StepLimit answers them for a step count.

    def steps(self, start_step: int) -> Iterable[int]:
        """Steps from `start_step` on, until `step_done` says the time is spent: none if a resumed run's already is,
        at least one in a new run (however short its budget, it saves and exports a trained model)."""
        return [] if start_step > 0 and self.exhausted(0) else itertools.count(start_step + 1)

    def step_done(self, step: int, seconds: float, evaluate_now: bool, checkpoint_now: bool) -> bool:
        """Count a step that took `seconds`; True (the last step) if another one, and the evaluation and checkpoint
        due now, would eat into the end's reserve. The reserve follows the machine's current speed: an evaluation
        batch is timed again when `retime_due`."""
        self.record_step(seconds)
        if self.retime_due():
            self.set_evaluation_batch_s(self.time_evaluation_batch())
        self.training_ended = self.exhausted(
            self.step_estimate_s()
            + checkpoint_now * self.checkpoint_s
            + evaluate_now * self.evaluation_batch_s * self.validation_batches
        )
        return self.training_ended

    def log_fields(self) -> dict[str, float]:
        """The budget spent and the time left, for the step's log line."""
        return {"budget_spent_s": self.spent(), "eta_s": max(0.0, self.total_s - self.spent())}

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Time a real "evaluation" (of the validation batches) or "checkpoint": the end's reserve uses it."""
        start = time.perf_counter()
        yield
        if part == "evaluation":
            self.set_evaluation_batch_s((time.perf_counter() - start) / self.validation_batches)
        else:
            self.checkpoint_s = time.perf_counter() - start

    def test_blocks(self, batch_size: int) -> int | None:
        """The test blocks the end has room for (see `set_evaluation_batch_s`)."""
        return self.test_batches * batch_size


# Model shapes a --time_budget run chooses from (layers, width, heads, feed-forward, peak lr): BERT's family at a head
# width of 64, from this script's default up to BERT-base; the lr falls as the width grows, as in BERT's and
# Cramming's recipes.
AUTO_SHAPES = (
    (2, 128, 2, 512, 2e-3),
    (4, 256, 4, 1024, 1.5e-3),
    (6, 384, 6, 1536, 1e-3),
    (8, 512, 8, 2048, 7e-4),
    (12, 768, 12, 3072, 5e-4),
)


AUTO_SIZED_FLAGS = ("num_layers", "h_dim", "num_heads", "ff_dim", "lr", "batch_size")


TOKENS_PER_PARAMETER = 20  # compute-optimal training sees ~20 tokens per parameter (Hoffmann et al., 2022)


GPU_BATCH_SIZE = 128  # blocks per step a --time_budget run uses on a GPU: enough work per kernel to keep it busy


def run_end(flags: dict[str, Any]) -> StepLimit | TimeBudget:
    """What ends the run the flags describe: --num_iterations steps, or the --time_budget's wall-clock time."""
    if flags["time_budget"] is None:
        return StepLimit(flags["num_iterations"])
    return TimeBudget(parse_duration(flags["time_budget"]))


def choose_shape_for_budget(
    flags: dict[str, Any], device: torch.device, keep: set[str], measure_tokens_per_s: Callable[[dict[str, Any]], float]
) -> tuple[dict[str, Any], str]:
    """The model shape, batch size and lr for a --time_budget run: the largest of AUTO_SHAPES that sees at least
    TOKENS_PER_PARAMETER tokens per (non-embedding) parameter in the budget, at the speed measured here and now.

    A bigger model learns more per token, a smaller one sees more tokens; the compute-optimal balance (Chinchilla)
    is ~20 tokens per parameter. Each shape, smallest first, trains a few steps (eager, random tokens, this run's
    precision) to measure its tokens/s on this device; the search stops at the first shape that would see too few
    tokens. On a 2-core CPU that keeps the default (2 x 128); a GPU gets a wider, deeper model and a batch that
    fills it. Flags named in `keep` (given by the user) are never changed. `measure_tokens_per_s(flags)` trains
    the model `flags` describe for a few steps and returns its tokens/s. Returns the chosen flags and a line that
    says why.
    """
    batch_size = flags["batch_size"] if "batch_size" in keep or device.type != "cuda" else GPU_BATCH_SIZE
    training_s = (1 - TimeBudget.END_SHARE) * parse_duration(flags["time_budget"])
    chosen = {}
    for layers, width, heads, ff, lr in AUTO_SHAPES:
        shape = {
            "num_layers": layers,
            "h_dim": width,
            "num_heads": heads,
            "ff_dim": ff,
            "lr": lr,
            "batch_size": batch_size,
        }
        shape = {name: flags[name] if name in keep else value for name, value in shape.items()}
        if shape["h_dim"] % shape["num_heads"]:
            continue
        tokens_per_s = measure_tokens_per_s({**flags, **shape})
        parameters = dense_parameters(shape["num_layers"], shape["h_dim"], shape["ff_dim"])
        per_parameter = tokens_per_s * training_s / parameters
        logger.info(
            f"auto size: {shape['num_layers']} x {shape['h_dim']} (ff {shape['ff_dim']}), batch "
            f"{batch_size}: {tokens_per_s:,.0f} tokens/s here, {per_parameter:.0f} tokens per parameter in "
            f"{training_s:.0f} s of training"
        )
        if chosen and per_parameter < TOKENS_PER_PARAMETER:
            break
        chosen = shape
    changed = {name: value for name, value in chosen.items() if value != flags[name]}
    return chosen, (
        f"auto size: {chosen['num_layers']} layers x {chosen['h_dim']} (ff {chosen['ff_dim']}, "
        f"{chosen['num_heads']} heads), batch {chosen['batch_size']}, lr {chosen['lr']:g}: the largest "
        "shape "
        f"that sees >= {TOKENS_PER_PARAMETER} tokens per parameter in this budget on {device}"
        + (" (the defaults)" if not changed else "")
        + "; --auto_size False keeps the flags as given"
    )


def measure_end_of_run(
    budget: TimeBudget,
    model: torch.nn.Module,
    validation: list[dict[str, torch.Tensor]],
    test_blocks: int,
    flags: dict[str, Any],
    time_evaluation: Callable[[], float],
) -> None:
    """Time what the end of a budgeted run costs, then start its clock: an evaluation batch and an in-memory save of
    a checkpoint-sized state (the weights and AdamW's two moments). `TimeBudget.reserve_s` multiplies them out;
    they are timed again once the first steps are done, and the real ones replace them later. `test_blocks` is the
    size of the test split (0 without one); `time_evaluation()` returns the seconds of one evaluation batch now."""
    budget.validation_batches = len(validation)
    budget.all_test_batches = math.ceil(test_blocks / flags["batch_size"])
    start = time.perf_counter()
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    torch.save({"model": state, "moments": [state, state]}, io.BytesIO())
    budget.checkpoint_s = time.perf_counter() - start
    budget.time_evaluation_batch = time_evaluation
    budget.set_evaluation_batch_s(time_evaluation())
    budget.start()
    logger.info(
        f"time budget {budget.total_s:.0f} s ({budget.spent_before_s:.0f} s spent before): training stops "
        f"{budget.reserve_s():.1f} s before the end, kept for the last evaluation, checkpoint and export "
        "(timed again after the first steps)"
    )
    if budget.reserve_s() > 0.25 * (budget.total_s - budget.spent_before_s):
        logger.warning(
            f"the end of the run needs about {budget.reserve_s():.0f} s of the {budget.total_s:.0f} s "
            f"budget (evaluating {budget.validation_batches} validation batches at "
            f"{budget.evaluation_batch_s:.2f} s each, a checkpoint, the export): lower --eval_blocks or "
            "raise --time_budget"
        )
    if flags["compile"] and budget.total_s < 120:
        logger.warning(
            f"--time_budget {budget.total_s:.0f} s with --compile True: the first step compiles the model, "
            "which can take a minute; it counts as spent, so a budget this short may train few steps "
            "(--compile False for short runs)"
        )


def dense_parameters(layers: int, d: int, ff: int) -> int:
    """Weights of the encoder's matrices, L·(4·d² + 2·d·f): attention projections and feed-forward layers (the
    embeddings and the head are left out; most of their rows are not touched by a given token)."""
    return layers * (4 * d * d + 2 * d * ff)

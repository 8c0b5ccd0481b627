"""Speed: the MLM loss through torch.compile (--compile), deterministic on CPU so that a resume stays bit-exact;
timing a training step and an evaluation batch (for --time_budget)."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable

import torch


def compiled(loss_function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`loss_function(model, input_ids, masked_positions, masked_labels, reduction)` through torch.compile (the model
    itself is not modified).

    The whole loss is one graph, so the head's cross-entropy over the [masked tokens x vocab] logits fuses with the
    encoder's elementwise work. The number of masked tokens changes every step, so that one dimension is marked
    dynamic: one graph serves every count. Where compilation fails, dynamo falls back to eager with a warning.

    On CPU the compiled code is made deterministic (before its first call), so that a resumed run equals the
    uninterrupted one bit for bit: inductor would otherwise add the embeddings' gradient rows with parallel atomic
    adds, whose order changes from run to run.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    compiled_function = torch.compile(loss_function)

    def loss(
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        masked_positions: torch.Tensor,
        masked_labels: torch.Tensor,
        reduction: str = "mean",
    ) -> torch.Tensor:
        if input_ids.device.type == "cpu" and not torch.are_deterministic_algorithms_enabled():
            torch.use_deterministic_algorithms(True, warn_only=True)
            # Deterministic mode would also fill every new tensor with NaN, a cost without a use here (a correct
            # kernel never reads what it has not written): ZeRO's optimizer allocates its gradient buckets anew
            # every step, and the fill made its CPU steps 10x slower.
            torch.utils.deterministic.fill_uninitialized_memory = False
        torch._dynamo.maybe_mark_dynamic(masked_positions, 0)
        torch._dynamo.maybe_mark_dynamic(masked_labels, 0)
        return compiled_function(model, input_ids, masked_positions, masked_labels, reduction)

    return loss


def training_tokens_per_s(
    loss: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    autocast: Callable[[], contextlib.AbstractContextManager],
    tokens_per_step: int,
    min_steps: int = 3,
    min_seconds: float = 0.5,
) -> float:
    """Tokens per second of training steps (forward and backward of `loss()`, an `optimizer` step): timed over at
    least `min_steps` steps and `min_seconds` after two untimed ones (first allocations, kernel selection)."""
    steps, start = -2, 0.0
    while steps < min_steps or time.perf_counter() - start < min_seconds:
        with autocast():
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(value.detach())  # waits for the device
        steps += 1
        if steps == 0:
            start = time.perf_counter()
    return tokens_per_step * steps / (time.perf_counter() - start)


def fastest_s(run: Callable[[Any], Any], items: Iterable[Any]) -> float:
    """Seconds of the fastest `run(item)` over `items`, so that a one-off delay does not count."""
    times = []
    for item in items:
        start = time.perf_counter()
        run(item)
        times.append(time.perf_counter() - start)
    return min(times)

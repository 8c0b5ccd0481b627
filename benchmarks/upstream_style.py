"""The hot path of upstream's HelloDeepSpeed `train_bert.py`, rebuilt on our pieces, as the benchmark's baseline.

Upstream (microsoft/DeepSpeedExamples, training/HelloDeepSpeed) trains on one wikitext *line* per sample. What
costs time there, and is reproduced here (in our own code) so both run side by side in one benchmark:

- each sample is tokenized and masked on the fly in the DataLoader's main process (no workers): one line, framed
  `<s> ... </s>`, truncated to `max_seq_length`, with upstream's masking rule (exactly round(15% of the line)
  positions, at least one; of those 10% random, 10% unchanged);
- a batch is padded to its longest line, with an attention mask (so attention runs the masked, eager path);
- the model is RoBERTa with eager (non-SDPA) attention in fp32, and the MLM head runs only at the masked positions,
  found with `nonzero` inside the step (as upstream's `RobertaLMHeadWithMaskedPredict` does);
- plain `torch.optim.Adam(lr=1e-4)`, no schedule, no clipping, and `loss.item()` after every step.

"Real" tokens are the non-pad ones: the padding upstream computes on is not counted as throughput.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_bert  # noqa: E402

UPSTREAM_LR = 1e-4  # upstream's optimizer: torch.optim.Adam(model.parameters(), lr=1e-4)


class UpstreamStyleLines(torch.utils.data.Dataset):
    """Item i: line i of `texts`, tokenized and masked now (upstream's `WikiTextMLMDataset` + `masking_function`)."""

    def __init__(
        self,
        texts: list[str],
        tokenizer: Any,
        max_seq_length: int,
        mask_prob: float = 0.15,
        random_replace_prob: float = 0.1,
        unmask_replace_prob: float = 0.1,
        seed: int = 0,
    ):
        self.texts, self.tokenizer, self.max_seq_length = texts, tokenizer, max_seq_length
        self.mask_prob, self.random_replace_prob = mask_prob, random_replace_prob
        self.unmask_replace_prob = unmask_replace_prob
        self.rng = np.random.default_rng(seed)
        special = set(tokenizer.all_special_ids)
        self.random_ids = np.array([i for i in range(len(tokenizer)) if i not in special])

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        tokenizer, rng = self.tokenizer, self.rng
        body = tokenizer.encode(
            self.texts[index], add_special_tokens=False, truncation=True, max_length=self.max_seq_length - 2
        )
        ids = np.array([tokenizer.bos_token_id, *body, tokenizer.eos_token_id])
        inner = np.arange(1, len(ids) - 1)  # <s> and </s> are never masked
        count = min(len(inner), max(int(self.mask_prob * len(inner) + rng.random()), 1))
        chosen = np.zeros(len(ids), dtype=bool)
        chosen[rng.choice(inner, count, replace=False)] = True
        labels = np.where(chosen, ids, tokenizer.pad_token_id)  # upstream pads labels with pad_token_id
        masked = np.where(chosen, tokenizer.mask_token_id, ids)
        other = chosen & (rng.random(len(ids)) < self.random_replace_prob + self.unmask_replace_prob)
        share = self.unmask_replace_prob / max(self.random_replace_prob + self.unmask_replace_prob, 1e-12)
        unchanged = other & (rng.random(len(ids)) < share)
        replaced = other & ~unchanged
        masked[unchanged] = ids[unchanged]
        masked[replaced] = rng.choice(self.random_ids, int(replaced.sum()))
        return masked, labels


def pad_batch(samples: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad every sample to the longest in the batch (upstream's `collate_function`)."""
    longest = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    for row, (ids, sample_labels) in enumerate(samples):
        input_ids[row, : len(ids)] = torch.from_numpy(ids)
        labels[row, : len(ids)] = torch.from_numpy(sample_labels)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": input_ids.ne(pad_id).long()}


def upstream_style_batches(
    texts: list[str], tokenizer: Any, batch_size: int, max_seq_length: int, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches of padded lines forever (upstream's DataLoader(shuffle=True) in an InfiniteIterator)."""
    dataset = UpstreamStyleLines(texts, tokenizer, max_seq_length, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=lambda samples: pad_batch(samples, tokenizer.pad_token_id),
        )


def upstream_style_model(
    tokenizer: Any, num_layers: int, num_heads: int, ff_dim: int, h_dim: int, dropout: float, max_seq_length: int
) -> torch.nn.Module:
    """Our `create_model` (the same RoBERTa, tied decoder) switched to eager attention, as upstream ran it."""
    model = train_bert.create_model(
        num_layers, num_heads, ff_dim, h_dim, dropout, tokenizer, max_seq_length, positions="learned"
    )
    model.config._attn_implementation = "eager"
    return model


def upstream_style_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], pad_id: int, reduction: str = "mean"
) -> torch.Tensor:
    """Upstream's forward: encoder over the padded batch, masked positions found with `nonzero` in the step."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    flat_labels = batch["labels"].flatten()
    positions = (flat_labels != pad_id).nonzero().squeeze(1)
    logits = train_bert.mlm_head(model)(hidden.flatten(0, 1).index_select(0, positions))
    return torch.nn.functional.cross_entropy(logits.float(), flat_labels[positions], reduction=reduction)


def train_upstream_style(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    pad_id: int,
    should_stop: Callable[[int, float], bool],
    on_step: Callable[[int, float, int, int, float], None] | None = None,
) -> int:
    """Upstream's loop: zero_grad, forward, backward, Adam step, loss.item(); until `should_stop(steps, seconds)`.

    `on_step(step, seconds, real_tokens, padded_tokens, loss)` sees every step, with `seconds` the time since the
    previous step (data loading included, as in upstream's loop). Returns the number of steps done.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=UPSTREAM_LR)
    model.train()
    steps, start, last = 0, time.perf_counter(), time.perf_counter()
    while not should_stop(steps, time.perf_counter() - start):
        batch = next(batches)
        optimizer.zero_grad()
        loss = upstream_style_loss(model, batch, pad_id)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        steps += 1
        now = time.perf_counter()
        if on_step is not None:
            on_step(steps, now - last, int(batch["attention_mask"].sum()), batch["input_ids"].numel(), loss_value)
        last = now
    return steps

"""Tests of train_bert.py: each reads like a claim the tutorial makes."""

import importlib
import inspect
import json
import math
import re
import shutil
import subprocess
import sys
import unittest.mock
from pathlib import Path

import pytest
import torch

import train_bert
from conftest import run_cli
from pretraining import corpus, errors, flag_rules, speed, token_store


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


def token_batch(tokenizer, batch_size: int, seq_length: int, seed: int = 0) -> torch.Tensor:
    """Random ids over the whole vocabulary (specials included, ~1%), framed <s> ... </s> like packed blocks."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(tokenizer), (batch_size, seq_length), generator=generator)
    ids[:, 0], ids[:, -1] = tokenizer.bos_token_id, tokenizer.eos_token_id
    return ids


def z_bound(p: float, n: int, z: float = 5.0) -> float:
    """Tolerance for an observed rate: z binomial standard deviations sqrt(p(1-p)/n).

    At z = 5 a correct implementation fails once in ~1.7 million runs; a wrong rate fails as soon as its error
    exceeds the bound (e.g. 0.0035 for the 15% selection rate over 250,000 tokens).
    """
    return z * math.sqrt(p * (1 - p) / n)


# --------------------------------------------------------------------------------------------------------------------
# Masking.
# --------------------------------------------------------------------------------------------------------------------


def test_masking_stats(tokenizer):
    """Selection and the three replacement rates match the documented rule within 5 binomial standard deviations."""
    mask_prob, random_prob, unmask_prob = 0.15, 0.1, 0.1
    input_ids = token_batch(tokenizer, 256, 1024)
    original = input_ids.clone()
    generator = torch.Generator().manual_seed(1234)
    masked, labels = train_bert.masking_function(input_ids, tokenizer, mask_prob, random_prob, unmask_prob, generator)

    assert torch.equal(input_ids, original), "the input tensor must not be modified"
    special = torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids))
    selected = labels != -100
    assert not (selected & special).any(), "a special token was selected"
    assert torch.equal(labels[selected], input_ids[selected]), "labels must hold the original ids"
    assert (labels[~selected] == -100).all()
    assert torch.equal(masked[~selected], input_ids[~selected]), "unselected tokens must be untouched"

    candidates = int((~special).sum())
    selection_rate = int(selected.sum()) / candidates
    assert abs(selection_rate - mask_prob) < z_bound(mask_prob, candidates)

    # A random replacement can draw the original id by chance (probability 1/K, K non-special ids): it then looks
    # unchanged, so the observable rates are shifted by exactly that much.
    non_special_count = len(tokenizer) - len(set(tokenizer.all_special_ids))
    n_selected = int(selected.sum())
    became_mask = selected & (masked == tokenizer.mask_token_id)
    stayed = selected & (masked == input_ids)
    became_random = selected & ~became_mask & ~stayed
    expected = {
        "mask": (became_mask, 1 - random_prob - unmask_prob),
        "unchanged": (stayed, unmask_prob + random_prob / non_special_count),
        "random": (became_random, random_prob * (1 - 1 / non_special_count)),
    }
    for name, (positions, p) in expected.items():
        rate = int(positions.sum()) / n_selected
        assert abs(rate - p) < z_bound(p, n_selected), f"{name}: rate {rate:.4f}, expected {p:.4f}"
    assert not torch.isin(masked[became_random], torch.tensor(tokenizer.all_special_ids)).any(), (
        "a random replacement was a special token"
    )


def test_random_replacements_are_uniform_over_non_special_ids(tokenizer):
    """With every token selected and replaced randomly, each non-special id appears equally often (chi-square)."""
    input_ids = token_batch(tokenizer, 512, 1024, seed=1)
    masked, _ = train_bert.masking_function(input_ids, tokenizer, 1.0, 1.0, 0.0, torch.Generator().manual_seed(5))
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    replaced = masked[~torch.isin(input_ids, special_ids)]
    counts = torch.bincount(replaced, minlength=len(tokenizer)).double()
    assert counts[special_ids].sum() == 0
    non_special_counts = counts[~torch.isin(torch.arange(len(tokenizer)), special_ids)]
    k = len(non_special_counts)
    expected = replaced.numel() / k
    chi_square = float(((non_special_counts - expected) ** 2 / expected).sum())
    # chi-square with k-1 degrees of freedom: mean k-1, sd sqrt(2(k-1)); allow 6 sd.
    assert chi_square < (k - 1) + 6 * math.sqrt(2 * (k - 1)), f"chi-square {chi_square:.0f} for {k} ids"


def test_masking_is_reproducible_from_the_generator(tokenizer):
    """The same generator seed gives the same masks; another seed gives others."""
    input_ids = token_batch(tokenizer, 16, 64)
    first = train_bert.masking_function(input_ids, tokenizer, generator=torch.Generator().manual_seed(7))
    again = train_bert.masking_function(input_ids, tokenizer, generator=torch.Generator().manual_seed(7))
    other = train_bert.masking_function(input_ids, tokenizer, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize("random_prob, unmask_prob, expect", [(0.0, 1.0, "unchanged"), (0.0, 0.0, "mask")])
def test_masking_edge_probabilities(tokenizer, random_prob, unmask_prob, expect):
    """unmask_replace_prob=1 keeps every selected token; both 0 turns every selected token into <mask>."""
    input_ids = token_batch(tokenizer, 8, 64)
    masked, labels = train_bert.masking_function(
        input_ids, tokenizer, 0.5, random_prob, unmask_prob, torch.Generator().manual_seed(0)
    )
    selected = labels != -100
    assert selected.any()
    target = (
        input_ids[selected] if expect == "unchanged" else torch.full_like(input_ids[selected], tokenizer.mask_token_id)
    )
    assert torch.equal(masked[selected], target)


# --------------------------------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------------------------------


def test_packing_keeps_every_token_without_padding(tiny_corpus, tokenizer):
    """Blocks are full <s> ... </s> frames, no padding, empty lines dropped; only the last partial block is lost."""
    split = corpus.load_text_dataset(str(tiny_corpus), None)["train"]
    lines = token_store.tokenize_lines(split, tokenizer)
    non_empty = sum(1 for text in split["text"] if text.strip())
    assert len(lines) == non_empty, "empty lines must not become rows"
    stream = torch.tensor([token for row in lines["input_ids"] for token in row])
    assert (torch.tensor([row[-1] for row in lines["input_ids"]]) == tokenizer.eos_token_id).all(), (
        "every line must end with </s>"
    )

    blocks = train_bert.pack_blocks(stream.numpy(), tokenizer, 32)[:]
    assert blocks.shape[1] == 32
    assert (blocks[:, 0] == tokenizer.bos_token_id).all() and (blocks[:, -1] == tokenizer.eos_token_id).all()
    assert not (blocks == tokenizer.pad_token_id).any()
    bodies = blocks[:, 1:-1].flatten().long()
    assert torch.equal(bodies, stream[: len(bodies)]), "blocks must be the token stream in order"
    assert len(stream) - len(bodies) < 30, "at most one partial block may be dropped"


def test_batches_depend_only_on_position_and_ranks_see_different_data(tiny_corpus, tokenizer, tmp_path):
    """Batch (epoch, i) is the same however it is reached; two ranks get disjoint blocks and different masks."""
    tokens = token_store.open_token_store(str(tiny_corpus), None, tokenizer, str(tmp_path), num_proc=1)[0]["train"]
    blocks = train_bert.pack_blocks(tokens, tokenizer, 32)  # memory-mapped: the DataLoader workers below reopen it
    masking = train_bert.MaskingConfig(tokenizer, 0.15, 0.1, 0.1)
    from_start = train_bert.train_batches(blocks, 4, 0, masking, (0, 0), num_workers=0, pin_memory=False)
    batches = [next(from_start) for _ in range(5)]
    assert [position for position, _ in batches] == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5)]
    resumed = train_bert.train_batches(blocks, 4, 0, masking, (0, 3), num_workers=2, pin_memory=False)
    position, batch = next(resumed)
    assert position == (0, 4)
    assert all(torch.equal(batch[key], batches[3][1][key]) for key in batch)

    # Sharding, seen through unique rows and an identity "masking": every block trained once per epoch, by one rank.
    unique_blocks = torch.arange(64 * 8).reshape(64, 8)
    shards = [
        train_bert.TrainBatches(unique_blocks, 4, 0, 0, lambda rows, generator: rows, rank, world_size=2)
        for rank in range(2)
    ]
    rows_of = [{int(row[0]) for i in range(len(shard)) for row in shard[i]} for shard in shards]
    assert len(shards[0]) == 8 and not rows_of[0] & rows_of[1]
    assert len(rows_of[0] | rows_of[1]) == 64
    masks_of = [train_bert.TrainBatches(blocks, 4, 0, 0, masking, rank, 2)[0]["masked_positions"] for rank in range(2)]
    assert not torch.equal(masks_of[0], masks_of[1])


# --------------------------------------------------------------------------------------------------------------------
# Model.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "positions, model_type, attention",
    [
        ("rotary", "roformer", "eager"),  # SDPA: see below
        ("learned", "roberta", "sdpa"),
    ],
)
def test_model_follows_the_tokenizer_and_sparse_loss_matches_dense(tokenizer, positions, model_type, attention):
    """Vocab and ids come from the tokenizer; the sparse MLM loss equals HF's dense loss over all positions."""
    model = train_bert.create_model(2, 2, 64, 32, 0.0, tokenizer, max_seq_length=32, positions=positions)
    assert model.config.model_type == model_type
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config._attn_implementation == attention
    masked, labels = train_bert.masking_function(
        token_batch(tokenizer, 4, 32), tokenizer, generator=torch.Generator().manual_seed(0)
    )
    batch = train_bert.sparse_batch(masked, labels)
    # The predicted positions are padded to a bucket (label -100) so the head's shapes repeat; the loss ignores them.
    assert len(batch["masked_positions"]) % train_bert.PREDICTION_BUCKET == 0
    assert (batch["masked_labels"] != train_bert.IGNORE_INDEX).sum() == (labels != train_bert.IGNORE_INDEX).sum()
    sparse = train_bert.mlm_loss(model, **batch)
    dense = model(input_ids=masked, labels=labels).loss
    assert torch.allclose(sparse, dense, rtol=1e-5, atol=1e-6), (sparse, dense)


def test_rotary_attention_runs_fused_and_equals_roformers_own(tokenizer):
    """The rotary model's attention goes through scaled_dot_product_attention (one fused kernel) and computes what
    transformers' RoFormer computes with the same weights: logits and gradients, with and without a padding mask;
    the saved weights load into the stock class."""
    from transformers import RoFormerForMaskedLM

    model = train_bert.create_model(2, 2, 64, 32, 0.0, tokenizer, max_seq_length=32)
    stock = RoFormerForMaskedLM(model.config)
    stock.load_state_dict(model.state_dict())
    ids = token_batch(tokenizer, 3, 32)
    padding = torch.ones_like(ids)
    padding[1, 20:] = 0
    with unittest.mock.patch.object(
        torch.nn.functional, "scaled_dot_product_attention", wraps=torch.nn.functional.scaled_dot_product_attention
    ) as sdpa:
        model(input_ids=ids)
    assert sdpa.call_count == model.config.num_hidden_layers
    for attention_mask in (None, padding):
        outputs = [network(input_ids=ids, attention_mask=attention_mask).logits for network in (model, stock)]
        assert torch.allclose(*outputs, rtol=1e-5, atol=1e-5), (outputs[0] - outputs[1]).abs().max()
        for network, logits in zip((model, stock), outputs):
            network.zero_grad()
            logits.square().mean().backward()
        for fused, reference in zip(model.parameters(), stock.parameters()):
            if fused.grad is not None:
                assert torch.allclose(fused.grad, reference.grad, rtol=1e-4, atol=1e-6)


def test_device_auto_is_the_launchers_gpu_where_cuda_is_available_else_the_cpu(monkeypatch):
    """--device auto (the default) trains on GPU $LOCAL_RANK (or --local_rank) when CUDA is available, on the CPU
    otherwise; cpu and cuda:N choose; a GPU asked for where there is none is one clear error."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert flag_rules.resolve_device("auto", -1, "fp32") == torch.device("cpu")
    with pytest.raises(errors.ConfigError, match="no CUDA GPU"):
        flag_rules.resolve_device("cuda", -1, "fp32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert flag_rules.resolve_device("auto", -1, "bf16") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert flag_rules.resolve_device("auto", -1, "bf16") == torch.device("cuda", 1)
    assert flag_rules.resolve_device("auto", 0, "bf16") == torch.device("cuda", 0)  # a launcher's --local_rank
    assert flag_rules.resolve_device("cuda:1", -1, "bf16") == torch.device("cuda", 1)
    assert flag_rules.resolve_device("cpu", 1, "bf16") == torch.device("cpu")
    with pytest.raises(errors.ConfigError, match="only 2"):
        flag_rules.resolve_device("cuda:2", -1, "bf16")


@pytest.mark.slow
def test_compiled_loss_equals_the_eager_loss_and_gradients(tokenizer):
    """--compile (the default) trains the same loss: value and gradients match eager within fp32 rounding, on two
    batches (one graph, its number of predicted tokens dynamic)."""
    model = train_bert.create_model(2, 2, 64, 32, 0.0, tokenizer, max_seq_length=32)
    compiled = speed.compiled(train_bert.mlm_loss)
    for seed, rows in ((0, 4), (1, 8)):
        masked, labels = train_bert.masking_function(
            token_batch(tokenizer, rows, 32), tokenizer, generator=torch.Generator().manual_seed(seed)
        )
        batch = train_bert.sparse_batch(masked, labels)
        losses, gradients = [], []
        for loss_function in (train_bert.mlm_loss, compiled):
            model.zero_grad()
            loss = loss_function(model, **batch)
            loss.backward()
            losses.append(loss.detach())
            gradients.append([parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None])
        assert torch.allclose(*losses, rtol=1e-5, atol=1e-6), losses
        assert len(gradients[0]) == len(gradients[1]) > 0
        for eager, compiled_gradient in zip(*gradients):
            assert torch.allclose(eager, compiled_gradient, rtol=1e-4, atol=1e-6)


def test_dtype_auto_is_bf16_where_the_cpu_computes_it_natively_and_the_experiment_keeps_it(tiny_flags, monkeypatch):
    """--dtype auto (the default) resolves by the hardware when an experiment starts; hparams.json records the
    result, and a resume on a machine that would resolve differently keeps the experiment's precision."""

    def cpu_with(amx: bool, avx512_bf16: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)

    cpu = torch.device("cpu")
    for amx, avx512_bf16, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        cpu_with(amx, avx512_bf16)
        assert flag_rules.resolve_dtype("auto", cpu) == expected
        assert flag_rules.resolve_dtype("fp16", cpu) == "fp16"
    experiment = train_bert.train(**{**tiny_flags, "num_iterations": 2})  # no bf16 units: fp32
    cpu_with(True, True)
    train_bert.train(load_checkpoint_dir=experiment, num_iterations=4)
    assert json.loads((Path(experiment) / "hparams.json").read_text())["flags"]["dtype"] == "fp32"
    assert torch.load(Path(experiment) / "checkpoint-00000004.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("positions", flag_rules.POSITIONS)
def test_output_bias_is_the_log_unigram_distribution(tokenizer, positions):
    """exp(bias) is each token's add-one-smoothed share of the sample, and a new model's output layer starts there."""
    sample = torch.tensor([5, 5, 5, 7, len(tokenizer) - 1]).numpy()
    bias = train_bert.unigram_output_bias(sample, len(tokenizer))
    counts = torch.ones(len(tokenizer), dtype=torch.float64)
    counts[5], counts[7], counts[-1] = 4, 2, 2
    assert torch.allclose(bias.double().exp(), counts / counts.sum(), rtol=1e-6)
    model = train_bert.create_model(
        2, 2, 64, 32, 0.0, tokenizer, max_seq_length=32, output_bias=bias, positions=positions
    )
    vocab_biases = {
        name: value for name, value in model.state_dict().items() if name.endswith("bias") and value.shape == bias.shape
    }
    assert len(vocab_biases) == 2, vocab_biases.keys()  # the head's bias and the decoder's, tied
    assert all(torch.equal(value, bias) for value in vocab_biases.values())


def test_a_new_run_starts_at_the_unigram_plateau(tiny_flags, tokenizer):
    """The first step's loss (the untrained model's, on batch 1) is the corpus's unigram cross-entropy, not ln(vocab).

    ln(400) = 6.0 nats is where a model with a zero output bias starts (measured: 6.02); the unigram entropy of the
    tiny corpus is 4.35 nats (measured first loss: 4.42). Tolerance 0.3 nats: batch 1's ~80 predicted tokens are a
    sample of the corpus's frequencies.
    """
    experiment = train_bert.train(**{**tiny_flags, "num_iterations": 1, "log_every": 1, "batch_size": 16})
    data = train_bert.prepare_data(json.loads((Path(experiment) / "hparams.json").read_text())["flags"])
    tokens = torch.from_numpy(data.train_blocks.token_sample().astype("int64"))
    shares = torch.bincount(tokens, minlength=len(tokenizer)).double() / len(tokens)
    entropy = float(-(shares[shares > 0] * shares[shares > 0].log()).sum())
    first_loss = metric_records(experiment, "loss")[0]["loss"]
    assert entropy < math.log(len(tokenizer)) - 1.5, entropy
    assert abs(first_loss - entropy) < 0.3, (first_loss, entropy)


# --------------------------------------------------------------------------------------------------------------------
# Training, checkpoints, resume.
# --------------------------------------------------------------------------------------------------------------------


def metric_records(experiment_dir: Path, key: str) -> list[dict]:
    """The metrics.jsonl records that carry `key`."""
    lines = (Path(experiment_dir) / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if key in record]


@pytest.mark.parametrize(
    "dtype, compile", [("fp32", False), ("bf16", False), pytest.param("bf16", True, marks=pytest.mark.slow)]
)
def test_model_checkpointing(tiny_flags, tmp_path, dtype, compile):
    """A run resumed from its step-10 checkpoint equals the uninterrupted 20-step run bit for bit (CPU; fp32 and
    bf16 autocast, eager and compiled)."""
    flags = {
        **tiny_flags,
        "num_iterations": 20,
        "checkpoint_every": 10,
        "log_every": 1,
        "warmup_steps": 5,
        "dropout": 0.1,
        "keep_last": 5,
        "dtype": dtype,
        "compile": compile,
    }
    full = Path(train_bert.train(**flags))

    # The interrupted run: the same experiment as it stood after step 10 (nothing of steps 11-20 kept).
    resumed = tmp_path / "resumed" / full.name
    shutil.copytree(full, resumed)
    for leftover in ("checkpoint-00000020.pt", "latest", "hf_model"):
        shutil.rmtree(resumed / leftover) if (resumed / leftover).is_dir() else (resumed / leftover).unlink()
    # num_workers may differ on resume: every batch is a function of its position only.
    train_bert.train(load_checkpoint_dir=str(resumed), num_workers=2)

    full_losses = [record["loss"] for record in metric_records(full, "loss")]
    assert [record["step"] for record in metric_records(resumed, "loss")] == list(range(1, 21)), "exactly 20 steps"
    assert [record["loss"] for record in metric_records(resumed, "loss")] == full_losses
    assert metric_records(resumed, "eval_loss") == metric_records(full, "eval_loss")

    final, final_resumed = (torch.load(d / "checkpoint-00000020.pt", weights_only=True) for d in (full, resumed))
    assert final["step"] == 20 and final["lr_scheduler"]["last_epoch"] == 20
    for name, tensor in final["model"].items():
        assert torch.equal(tensor, final_resumed["model"][name]), name
    optimizer_state = final["optimizer"]["state"]

    exported = train_bert.create_model(2, 2, 64, 32, 0.0, None, 32, init_from=str(full / "hf_model"))
    assert len(optimizer_state) == len([p for p in exported.parameters() if p.requires_grad])
    for slot, resumed_slot in zip(optimizer_state.values(), final_resumed["optimizer"]["state"].values()):
        assert float(slot["step"]) == 20
        assert torch.equal(slot["exp_avg"], resumed_slot["exp_avg"])
        assert torch.equal(slot["exp_avg_sq"], resumed_slot["exp_avg_sq"])


def test_resume_can_train_further_and_rejects_shape_changes(tiny_flags):
    """Raising --num_iterations continues the run; changing --h_dim on resume is refused before anything runs."""
    experiment = train_bert.train(**{**tiny_flags, "num_iterations": 6, "log_every": 2, "checkpoint_every": 3})
    train_bert.train(load_checkpoint_dir=experiment, num_iterations=10)
    assert [record["step"] for record in metric_records(experiment, "loss")] == [2, 4, 6, 8, 10]
    assert torch.load(Path(experiment) / "checkpoint-00000010.pt", weights_only=True)["step"] == 10
    with pytest.raises(errors.ConfigError, match="h_dim"):
        train_bert.train(load_checkpoint_dir=experiment, h_dim=64)


def test_an_experiment_from_before_positions_existed_resumes_with_learned_positions(tiny_flags):
    """hparams.json written before --positions has no such flag; its model had learned positions, and a resume with
    the new default (rotary) would build the wrong model and fail to load the checkpoint."""
    experiment = train_bert.train(**{**tiny_flags, "num_iterations": 2, "positions": "learned"})
    hparams_path = Path(experiment) / "hparams.json"
    hparams = json.loads(hparams_path.read_text())
    del hparams["flags"]["positions"]
    hparams_path.write_text(json.dumps(hparams))
    train_bert.train(load_checkpoint_dir=experiment, num_iterations=4)
    assert torch.load(Path(experiment) / "checkpoint-00000004.pt", weights_only=True)["step"] == 4


def test_same_seed_same_run(tiny_flags):
    """Two runs with the same seed log the same losses (and get different experiment directories)."""
    flags = {**tiny_flags, "num_iterations": 5, "log_every": 1}
    first, second = train_bert.train(**flags), train_bert.train(**flags)
    assert first != second
    assert [r["loss"] for r in metric_records(first, "loss")] == [r["loss"] for r in metric_records(second, "loss")]
    other = train_bert.train(**{**flags, "seed": 1})
    assert [r["loss"] for r in metric_records(other, "loss")] != [r["loss"] for r in metric_records(first, "loss")]


def test_it_learns(tiny_flags, tokenizer):
    """On the repetitive tiny corpus the validation loss falls far below its start.

    Thresholds: an untrained model scores about ln(vocab) = 6.0 nats. After 700 steps the final validation loss must be
    below half of that and below 60% of the first evaluation's (step 50, when the model has learnt token frequencies
    but not yet context; measured here: 4.42 at step 50 -> 1.76 at step 700).
    """
    flags = {
        **tiny_flags,
        "num_layers": 1,
        "h_dim": 128,
        "ff_dim": 256,
        "num_heads": 4,
        "batch_size": 16,
        "dropout": 0.0,
        "lr": 2e-3,
        "warmup_steps": 30,
        "num_iterations": 700,
        "eval_every": 50,
        "log_every": 100,
    }
    experiment = train_bert.train(**flags)
    eval_losses = [record["eval_loss"] for record in metric_records(experiment, "eval_loss")]
    assert eval_losses[-1] < 0.5 * math.log(len(tokenizer)), eval_losses
    assert eval_losses[-1] < 0.6 * eval_losses[0], eval_losses


# --------------------------------------------------------------------------------------------------------------------
# The command line, as a user runs it.
# --------------------------------------------------------------------------------------------------------------------


def test_cli_end_to_end(tiny_flags):
    """`python train_bert.py --checkpoint_dir ...` writes the documented experiment directory."""
    flags = {**tiny_flags, "num_iterations": 12, "log_every": 4, "eval_every": 6, "checkpoint_every": 5, "keep_last": 2}
    result = run_cli("train_bert.py", flags)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = Path(result.stdout.strip().splitlines()[-1])
    assert experiment.parent == Path(flags["checkpoint_dir"])
    uuid4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}"
    assert re.fullmatch(r"bert_pretrain\.\d{4}(\.\d{2}){5}\." + uuid4, experiment.name), experiment.name

    hparams = json.loads((experiment / "hparams.json").read_text())
    assert hparams["flags"]["num_iterations"] == 12 and hparams["flags"]["mask_prob"] == 0.15
    assert set(hparams["flags"]) == set(inspect.signature(train_bert.train).parameters)
    assert hparams["versions"]["torch"] == torch.__version__ and hparams["vocab_size"] > 0
    assert (experiment / "githash.log").read_text().strip()
    assert (experiment / "gitdiff.log").exists() and (experiment / "train.log").read_text()
    assert sorted(p.name for p in experiment.glob("checkpoint-*.pt")) == [
        "checkpoint-00000010.pt",
        "checkpoint-00000012.pt",
    ]
    assert (experiment / "latest").read_text().strip() == "checkpoint-00000012.pt"
    assert list((experiment / "tb_dir").glob("events.out.tfevents.*"))

    train_records = metric_records(experiment, "loss")
    assert [r["step"] for r in train_records] == [4, 8, 12]
    assert all({"lr", "tokens_per_sec", "grad_norm", "peak_memory_mib"} <= set(r) for r in train_records)
    assert [r["step"] for r in metric_records(experiment, "eval_loss")] == [6, 12]
    # Log lines are short and readable (no 2.898e+04), and an evaluation says how long it will take.
    log_lines = [line for line in result.stderr.splitlines() if " | INFO    | step " in line]
    assert log_lines and all(len(line) <= 130 and "e+" not in line for line in log_lines), log_lines
    assert re.search(r"validation: [\d,]+ batches, about \d+:\d\d:\d\d", result.stderr), result.stderr[-2000:]
    assert all(
        math.isclose(r["eval_perplexity"], math.exp(r["eval_loss"]), rel_tol=1e-6)
        for r in metric_records(experiment, "eval_loss")
    )
    assert metric_records(experiment, "test_loss")

    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(experiment / "hf_model")
    tokenizer = AutoTokenizer.from_pretrained(experiment / "hf_model")
    inputs = tokenizer(f"the quick brown {tokenizer.mask_token} jumps", return_tensors="pt")
    assert model(**inputs).logits.shape[-1] == len(tokenizer)
    assert "fill-mask" in result.stderr


def test_fill_mask_demo_shows_words_only(tiny_flags):
    """The demo lists real tokens: never a whitespace-only piece or a special token such as </s>."""
    experiment = Path(train_bert.train(**tiny_flags, num_iterations=4, eval_every=4, checkpoint_every=4))
    predictions = train_bert.fill_mask_demo(experiment / "hf_model", torch.device("cpu"), "the <mask> fox jumps .")
    specials = set(corpus.load_tokenizer(str(experiment / "hf_model")).all_special_tokens)
    assert len(predictions) == 1 and len(predictions[0]) == 5, predictions
    assert all(word.strip() == word and word and word not in specials for word in predictions[0]), predictions


@pytest.mark.parametrize("help_flag", ["-h", "--help"])
def test_help_is_plain_text_with_real_types(help_flag):
    """-h and --help print the manual to stdout: no pager, no fire banner, types as written in the code."""
    result = subprocess.run(
        [sys.executable, "train_bert.py", help_flag],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(train_bert.__file__).parent,
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert "--h_dim int  (default: " in result.stdout
    assert "--checkpoint_dir str | None" in result.stdout
    assert "Optional[" not in result.stdout and "INFO:" not in result.stdout and "error" not in result.stdout


def test_one_letter_abbreviations_are_refused(tiny_flags):
    """fire would read -t as the only flag starting with t (--tokenizer); flags must be spelled out."""
    result = subprocess.run(
        [sys.executable, "train_bert.py", "-t", "bpe", "--checkpoint_dir", tiny_flags["checkpoint_dir"]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(train_bert.__file__).parent,
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: unknown flag -t: flags are spelled out in full (--name value); see --help"
    ]
    assert not Path(tiny_flags["checkpoint_dir"]).exists()


@pytest.mark.parametrize("script", ["train_bert", "train_bert_ds"])
def test_cli_help_documents_every_flag(script):
    """--help is a manual: every flag of train() appears with its type as written, its default and its whole
    docstring entry (fire's docstring parser cuts an entry short at a continuation line it mistakes for a new
    "name: text" entry); for train_bert_ds.py, whose train() takes train_bert.py's flags as **flags, those too, in
    train_bert.py's words where train_bert_ds.py does not document them itself."""
    functions = [importlib.import_module(script).train] + ([train_bert.train] if script == "train_bert_ds" else [])
    result = subprocess.run(
        [sys.executable, f"{script}.py", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(train_bert.__file__).parent,
    )
    assert result.returncode == 0, result.stderr
    shown = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join((result.stdout + result.stderr).split()))  # undo wrapping
    documented = {}
    for train in reversed(functions):  # the script's own entries last: they win
        args = train.__doc__.split("Args:\n", 1)[1]
        entries = re.findall(r"^ {8}(\w+): (.*?)(?=^ {8}\w+: |\Z)", args, flags=re.M | re.S)
        parameters = {
            name: parameter
            for name, parameter in inspect.signature(train).parameters.items()
            if parameter.kind is not inspect.Parameter.VAR_KEYWORD
        }
        assert [name for name, _ in entries] == list(parameters)
        documented |= {name: (parameters[name], text) for name, text in entries}
    for name, (parameter, text) in documented.items():
        assert f"--{name} {parameter.annotation} (default: {parameter.default!r})" in shown, name
        assert " ".join(text.split()) in shown, name

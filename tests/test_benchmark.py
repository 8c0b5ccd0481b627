"""benchmarks/: the upstream-style baseline does what upstream does, and both modes run end to end on tiny data.

Speed is never asserted: the tests check that the figures exist, are consistent with each other and are reported.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_MODEL_FLAGS, run_cli

sys.path.insert(0, str(ROOT / "benchmarks"))
import upstream_style  # noqa: E402

import train_bert  # noqa: E402
from pretraining.corpus import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return load_tokenizer(str(tiny_tokenizer))


def test_upstream_style_pads_each_batch_to_its_longest_line_and_masks_every_line(tokenizer):
    texts = ["the quick brown fox jumps over the lazy dog .", "red orange .", "one two three four five six seven ."]
    dataset = upstream_style.UpstreamStyleLines(texts, tokenizer, max_seq_length=8, seed=0)
    samples = [dataset[i] for i in range(len(texts))]
    batch = upstream_style.pad_batch(samples, tokenizer.pad_token_id)
    lengths = [len(ids) for ids, _ in samples]
    assert max(lengths) <= 8 and batch["input_ids"].shape == (3, max(lengths))  # truncated, padded to the longest
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for (ids, labels), row in zip(samples, batch["labels"]):
        chosen = labels != tokenizer.pad_token_id
        inner = len(ids) - 2
        assert 1 <= chosen.sum() <= inner and not chosen[0] and not chosen[-1]  # never <s> or </s>
        assert (row[len(ids) :] == tokenizer.pad_token_id).all()


def test_upstream_style_masks_fifteen_percent_with_the_80_10_10_split(tokenizer):
    text = " ".join(["alpha beta gamma delta"] * 40)
    dataset = upstream_style.UpstreamStyleLines([text] * 400, tokenizer, max_seq_length=128, seed=1)
    original = np.array(
        [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)[:126], tokenizer.eos_token_id]
    )
    chosen = mask = kept = 0
    for index in range(len(dataset)):
        masked, labels = dataset[index]
        selected = labels != tokenizer.pad_token_id
        chosen += selected.sum()
        mask += (masked[selected] == tokenizer.mask_token_id).sum()
        kept += (masked[selected] == original[selected]).sum()
        assert (labels[selected] == original[selected]).all()
    assert chosen / (400 * 126) == pytest.approx(0.15, abs=0.01)
    assert mask / chosen == pytest.approx(0.8, abs=0.02) and kept / chosen == pytest.approx(0.1, abs=0.02)


def test_upstream_style_loss_matches_the_sparse_loss_on_unpadded_input(tokenizer):
    torch.manual_seed(0)
    model = upstream_style.upstream_style_model(tokenizer, 2, 2, 64, 32, 0.0, 32).eval()
    ids = torch.randint(5, len(tokenizer), (2, 16))
    masked, labels = train_bert.masking_function(
        ids, tokenizer, mask_prob=0.3, generator=torch.Generator().manual_seed(0)
    )
    sparse = train_bert.sparse_batch(masked, labels)
    padded_labels = labels.masked_fill(labels == train_bert.IGNORE_INDEX, tokenizer.pad_token_id)
    batch = {"input_ids": masked, "labels": padded_labels, "attention_mask": torch.ones_like(masked)}
    with torch.no_grad():
        assert upstream_style.upstream_style_loss(model, batch, tokenizer.pad_token_id).item() == pytest.approx(
            train_bert.mlm_loss(model, **sparse).item(), rel=1e-5
        )


def run_benchmark(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_throughput_table_reports_every_row(tiny_corpus, tiny_tokenizer, tmp_path):
    rows = [
        {"name": "upstream-style", "kind": "upstream-style", "flags": {**TINY_MODEL_FLAGS, "dtype": "fp32"}},
        {"name": "ours", "kind": "plain", "flags": {**TINY_MODEL_FLAGS, "dtype": "fp32"}},
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    result = run_benchmark(
        "throughput",
        "--configs",
        str(tmp_path / "rows.json"),
        "--dataset",
        str(tiny_corpus),
        "--tokenizer",
        str(tiny_tokenizer),
        "--window",
        "2",
        "--windows",
        "1",
        "--json_path",
        str(tmp_path / "out.json"),
        "--markdown_path",
        str(tmp_path / "out.md"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    assert [r["status"] for r in results] == ["ok", "ok"], results
    baseline, ours = results
    # Padding is computed but not counted: the baseline's real tokens/s are below its tokens/s incl. padding.
    assert 0 < baseline["real_tokens_per_sec"] < baseline["computed_tokens_per_sec"]
    assert ours["real_tokens_per_sec"] == ours["computed_tokens_per_sec"] > 0  # packed blocks: no padding
    assert ours["mfu"] is None and ours["peak_memory_mib"] > 0  # no MFU on CPU
    table = (tmp_path / "out.md").read_text()
    assert "| 1 | upstream-style |" in table and "| 1.00x |" in table and "| 2 | ours |" in table
    assert f"{ours['real_tokens_per_sec'] / baseline['real_tokens_per_sec']:.2f}x" in table


def test_time_to_quality_trains_each_recipe_for_the_budget_and_evaluates_it(tiny_corpus, tiny_tokenizer, tmp_path):
    """The baseline trains until the budget is spent (a lower bound, never a deadline to meet); ours counts its
    steps, so nothing here passes only if 4 seconds suffice (how --time_budget is given: the test below)."""
    recipes = [
        {"name": "ours", **TINY_MODEL_FLAGS, "max_seq_length": 32, "num_iterations": 3},
        {"name": "baseline", "kind": "upstream-style", **TINY_MODEL_FLAGS},
    ]
    result = run_benchmark(
        "ttq",
        "--budget_s",
        "4",
        "--recipes",
        repr(recipes),
        "--dataset",
        str(tiny_corpus),
        "--dataset_config",
        "None",
        "--tokenizer",
        str(tiny_tokenizer),
        "--eval_seq_length",
        "32",
        "--json_path",
        str(tmp_path / "ttq.json"),
        "--png_path",
        str(tmp_path / "ttq.png"),
        "--work_dir",
        str(tmp_path / "work"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "ttq.json").read_text())
    ours, baseline = report["results"]
    assert ours["status"] == "ok" and baseline["status"] == "ok", report["results"]
    assert baseline["train_seconds"] >= 4  # the baseline trains until the budget is spent
    for trained in (ours, baseline):
        assert trained["steps"] >= 1 and trained["tokens_trained"] > 0
        # Fixed masks on the same validation text for both: the same number of predicted tokens.
        assert 0 < trained["val_loss_packed"] < 20 and 0 < trained["val_loss_lines"] < 20
        assert 0 <= trained["val_accuracy_packed"] <= 1 and 0 < trained["val_most_frequent_token_share"] < 1
        # The accuracy split by what the input showed adds up to the whole: every predicted token counted once.
        by_input = trained["val_accuracy_by_input"]
        assert sum(predicted for _, predicted in by_input.values()) == trained["val_tokens_packed"]
        assert sum(right for right, _ in by_input.values()) / trained["val_tokens_packed"] == pytest.approx(
            trained["val_accuracy_packed"]
        )
        assert by_input["mask"][1] > by_input["unchanged"][1] > 0 and by_input["random"][1] > 0
    assert "| masked-token accuracy |" in result.stdout and f"{100 * ours['val_accuracy_packed']:.2f}%" in result.stdout
    assert (tmp_path / "ttq.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ours["val_tokens_packed"] == baseline["val_tokens_packed"]
    assert ours["val_tokens_lines"] == baseline["val_tokens_lines"]

    # `evaluate` gives an exported model the very same evaluation (same masks, same numbers).
    exported = next((tmp_path / "work").glob("ttq/row0/experiments/*/hf_model"))
    evaluated = run_benchmark(
        "evaluate", str(exported), "--dataset", str(tiny_corpus), "--dataset_config", "None", "--eval_seq_length", "32"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads(evaluated.stdout.strip().splitlines()[-1])
    for key in ("val_loss_packed", "val_accuracy_packed", "val_loss_lines"):
        assert again[key] == pytest.approx(ours[key], rel=1e-5), key
    assert again["val_accuracy_by_input"] == ours["val_accuracy_by_input"]


def test_memory_mode_prints_resident_memory_at_every_log_line(tiny_corpus, tiny_tokenizer):
    result = run_benchmark(
        "memory",
        "--steps",
        "6",
        "--log_every",
        "2",
        "--num_layers",
        "1",
        "--h_dim",
        "32",
        "--ff_dim",
        "64",
        "--num_heads",
        "2",
        "--batch_size",
        "4",
        "--max_seq_length",
        "32",
        "--dataset",
        str(tiny_corpus),
        "--dataset_config",
        "None",
        "--tokenizer",
        str(tiny_tokenizer),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [int(line.split("|")[1]) for line in result.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert steps == [2, 4, 6]
    assert re.search(r"RSS from step 2 to 6: [+-][\d,]+ MiB; peak [+-][\d,]+ MiB", result.stdout), result.stdout


def test_time_to_quality_fits_the_step_count_to_the_budget_or_lets_train_bert_end_itself(monkeypatch, tmp_path):
    """The clock is injected: a train_bert_ds.py recipe calibrated at 20 ms a step gets the steps that fill 97% of
    a 4 s budget (and its warmup share of them); a train_bert.py recipe without a step count is given the budget as
    its own --time_budget; a recipe with a step count keeps it."""
    import benchmark

    rows = [
        benchmark.recipe(spec)
        for spec in (
            {"name": "ds", "kind": "ds", "warmup_fraction": 0.1},
            {"name": "ours"},
            {"name": "counted", "num_iterations": 3},
        )
    ]
    monkeypatch.setattr(benchmark, "run_jobs", lambda *args, **kwargs: [{"status": "ok", "step_time_ms": 20.0}])
    benchmark.fit_num_iterations(rows, {"budget_s": 4}, tmp_path, side_by_side=False)
    assert rows[0]["flags"]["num_iterations"] == 194 and rows[0]["flags"]["warmup_steps"] == 19
    assert "num_iterations" not in rows[1]["flags"] and rows[2]["flags"]["num_iterations"] == 3

    given = []

    def record_flags(**flags):  # stands for train(): what ttq's child would start train_bert.py with
        given.append(flags)
        raise StopIteration

    monkeypatch.setattr(train_bert, "train", record_flags)
    monkeypatch.setattr(train_bert, "training_loop", train_bert.training_loop)  # put back after: ttq wraps it
    for config in rows[1:]:
        with pytest.raises(StopIteration):
            benchmark.train_script_for_budget(config, {"budget_s": 4, "dataset": "d", "tokenizer": "t"}, tmp_path)
    assert given[0]["time_budget"] == 4 and "time_budget" not in given[1] and given[1]["num_iterations"] == 3


@pytest.mark.slow
def test_time_to_quality_evaluates_a_deepspeed_recipe_from_its_export(tiny_corpus, tiny_tokenizer, tmp_path):
    """A train_bert_ds.py recipe runs its step count to the end, then is evaluated from the hf_model/ it exported
    (its checkpoints are DeepSpeed's own format). The steps are counted, not fitted to a budget: with a 4 s budget
    a run whose start was slow (DeepSpeed's op just built) was stopped before its end, and the test failed. The
    budget here is only the safety net's SIGTERM, far beyond 3 steps."""
    recipes = [{"name": "ds", "kind": "ds", **TINY_MODEL_FLAGS, "zero_stage": 1, "dtype": "fp32", "num_iterations": 3}]
    result = run_benchmark(
        "ttq",
        "--budget_s",
        "600",
        "--recipes",
        repr(recipes),
        "--dataset",
        str(tiny_corpus),
        "--dataset_config",
        "None",
        "--tokenizer",
        str(tiny_tokenizer),
        "--eval_seq_length",
        "32",
        "--json_path",
        str(tmp_path / "ttq.json"),
        "--work_dir",
        str(tmp_path / "work"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (ds,) = json.loads((tmp_path / "ttq.json").read_text())["results"]
    assert ds["status"] == "ok", ds
    [experiment] = (tmp_path / "work").glob("ttq/row0/experiments/*")
    assert (experiment / "latest").read_text() == f"global_step{ds['steps']}"  # its end, not a SIGTERM
    assert ds["steps"] == ds["flags"]["num_iterations"] == 3 and 0 < ds["val_loss_packed"] < 20


@pytest.mark.skipif(
    not os.environ.get("RUN_MLM_SCRIPT"),
    reason="set RUN_MLM_SCRIPT to a local copy of Hugging Face's run_mlm.py (the project does not ship it)",
)
def test_time_to_quality_runs_hugging_face_run_mlm_unchanged(tiny_corpus, tiny_tokenizer, tmp_path):
    recipes = [{"name": "run_mlm", "kind": "run_mlm", **TINY_MODEL_FLAGS}]
    result = run_benchmark(
        "ttq",
        "--budget_s",
        "4",
        "--recipes",
        repr(recipes),
        "--dataset",
        str(tiny_corpus),
        "--dataset_config",
        "None",
        "--tokenizer",
        str(tiny_tokenizer),
        "--eval_seq_length",
        "32",
        "--run_mlm_script",
        os.environ["RUN_MLM_SCRIPT"],
        "--json_path",
        str(tmp_path / "ttq.json"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (hf,) = json.loads((tmp_path / "ttq.json").read_text())["results"]
    assert hf["status"] == "ok", hf
    assert hf["steps"] >= 1 and hf["train_seconds"] >= 4 and 0 < hf["val_loss_packed"] < 20


def test_data_benchmark_child_that_writes_more_than_a_pipe_holds_finishes():
    """A 1 GB tokenization's progress bars once filled the pipe to the benchmark, which read it only at the end:
    the child blocked for ever. run_child must take any amount of output (here 1 MiB on each stream)."""
    child = (
        "import sys; sys.stderr.write('progress ' * 131072); sys.stdout.write('x' * 1048576 + '\\n'); "
        "print('{\"tokens\": 3}')"
    )
    runner = (
        "import sys, json; sys.path.insert(0, 'benchmarks'); import data_benchmark; "
        f"result = data_benchmark.run_child([sys.executable, '-c', {child!r}]); "
        "print(json.dumps({'tokens': result['tokens'], 'stderr_bytes': len(result['stderr']), "
        "'rss': result['peak_rss_mib']}))"
    )
    finished = subprocess.run([sys.executable, "-c", runner], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout.splitlines()[-1])
    assert result["tokens"] == 3 and result["stderr_bytes"] == len("progress ") * 131072 and result["rss"] > 0


def test_task_corpus_adds_the_task_train_texts_and_never_dev_or_held_out_ones(tiny_corpus, tmp_path):
    """The corpus's splits unchanged, then train's task texts: no dev text, no held-out text, no label."""
    task = tmp_path / "task"
    task.mkdir()
    for split, count in (("train", 20), ("dev", 5)):
        rows = ["sentence\tlabel"] + [f"{split} review   number {index} \t{index % 2}" for index in range(count)]
        (task / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    result = run_cli(
        "benchmarks/task_corpus.py",
        {"task": task, "output_dir": tmp_path / "out", "holdout": 0.1, "dataset": tiny_corpus},
    )
    assert result.returncode == 0, result.stderr
    corpus_train = (tiny_corpus / "train.txt").read_text().splitlines()
    written = (tmp_path / "out" / "train.txt").read_text().splitlines()
    assert written[: len(corpus_train)] == corpus_train
    assert written[len(corpus_train) :] == [f"train review number {index}" for index in range(18)]  # the last 10% out
    for split in ("validation", "test"):
        assert (tmp_path / "out" / f"{split}.txt").read_text() == (tiny_corpus / f"{split}.txt").read_text()
    assert "2 held out rows left out" in result.stdout

    bad = run_cli(
        "benchmarks/task_corpus.py",
        {"task": task, "output_dir": tmp_path / "bad", "holdout": 1.5, "dataset": tiny_corpus},
    )
    assert bad.returncode != 0 and not (tmp_path / "bad").exists()
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --holdout 1.5"), bad.stderr
    blocked = run_cli(
        "benchmarks/task_corpus.py",
        {"task": task, "output_dir": tmp_path / "out" / "train.txt" / "x", "dataset": tiny_corpus},
    )
    assert blocked.returncode != 0 and "Traceback" not in blocked.stderr
    assert blocked.stderr.strip().splitlines()[-1].startswith("error: --output_dir"), blocked.stderr

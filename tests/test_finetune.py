"""Tests of finetune.py: a pretrained encoder becomes a classifier; bad inputs are one clear line; results are safe."""

import json
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import finetune
import train_bert
from conftest import ROOT, TINY_MODEL_FLAGS, run_cli

# Two families of words from the tiny corpus: a text drawn from one family or the other is trivially classified.
WEEKDAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = "january february march april may june july august".split()


def write_task(
    folder: Path,
    rows: dict[str, int] | None = None,
    seed: int = 0,
    header: str = "sentence\tlabel",
    labels: tuple[str, str] = ("0", "1"),
) -> Path:
    """A GLUE-format folder (train.tsv, dev.tsv): label 1 for four weekdays, 0 for four months."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (rows or {"train": 240, "dev": 60}).items():
        lines = [header]
        for _ in range(count):
            positive = rng.random() < 0.5
            lines.append(" ".join(rng.sample(WEEKDAYS if positive else MONTHS, 4)) + f"\t{labels[positive]}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_model(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """An hf_model/ folder exported by train_bert.py after 40 steps on the tiny corpus."""
    experiment = train_bert.train(
        checkpoint_dir=str(tmp_path_factory.mktemp("pretrain")),
        dataset=str(tiny_corpus),
        tokenizer=str(tiny_tokenizer),
        num_iterations=40,
        **TINY_MODEL_FLAGS,
    )
    return Path(experiment) / "hf_model"


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("task"))


def flags(model: Path, task: Path, output: Path, **extra) -> dict:
    """finetune's flags for a quick run of the tiny model (fp32: the same numbers on every CPU)."""
    return {
        "model_dir": str(model),
        "task": str(task),
        "output_dir": str(output),
        "lr": 1e-3,
        "epochs": 3,
        "batch_size": 16,
        "max_length": 16,
        "dtype": "fp32",
        **extra,
    }


def test_finetune_learns_a_separable_task(tiny_model, task, tmp_path):
    """Weekdays against months: far above the 50% of chance on dev, for every seed."""
    output = finetune.finetune(**flags(tiny_model, task, tmp_path / "out", seeds=(0, 1)))
    results = json.loads(Path(output, "results.json").read_text())
    assert [run["seed"] for run in results["seeds"]] == [0, 1]
    assert all(run["accuracy"] >= 0.9 for run in results["seeds"]), results["seeds"]
    assert results["summary"]["accuracy"]["median"] >= 0.9
    assert results["eval_split"] == "dev" and results["metric"] == "accuracy"
    hparams = json.loads(Path(output, "hparams.json").read_text())
    assert hparams["train_rows"] == 240 and hparams["eval_rows"] == 60


def test_scratch_starts_from_other_weights_than_the_pretrained_model(tiny_model, task, tmp_path):
    """--scratch: the same architecture with random weights, so its run differs from the pretrained one."""
    torch.manual_seed(0)
    pretrained = finetune.load_encoder(str(tiny_model), scratch=False, dropout=0.0)
    torch.manual_seed(0)
    scratch = finetune.load_encoder(str(tiny_model), scratch=True, dropout=0.0)
    assert type(pretrained) is type(scratch)
    pairs = list(zip(pretrained.state_dict().items(), scratch.state_dict().items()))
    assert all(a_name == b_name and a.shape == b.shape for (a_name, a), (b_name, b) in pairs)
    word_embeddings = pretrained.get_input_embeddings().weight
    assert not torch.equal(word_embeddings, scratch.get_input_embeddings().weight)
    runs = {}
    for name, extra in (("pretrained", {}), ("scratch", {"scratch": True})):
        output = finetune.finetune(**flags(tiny_model, task, tmp_path / name, epochs=1, **extra))
        runs[name] = json.loads(Path(output, "results.json").read_text())
    assert runs["scratch"]["scratch"] and not runs["pretrained"]["scratch"]
    assert runs["scratch"]["seeds"][0]["train_loss"] != runs["pretrained"]["seeds"][0]["train_loss"]


def test_pooling_mean_ignores_padding(tiny_model):
    """Mean pooling averages the real tokens only: padding a text does not change its output."""
    torch.manual_seed(0)
    model = finetune.SentenceClassifier(finetune.load_encoder(str(tiny_model), False, 0.0), 2, "mean", 0.0).eval()
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    padded = torch.tensor([[0, 5, 6, 7, 2, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(model(ids, torch.ones_like(ids)), model(padded, mask), atol=1e-5)


def test_metrics_match_their_definitions():
    """MCC, F1 and Pearson on small cases worked out by hand."""
    predictions, labels = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]]), [0, 1, 0, 0]
    metrics = finetune.task_metrics(predictions, labels, num_classes=2)
    # predicted 0,1,1,0 against 0,1,0,0: TP 1, FP 1, FN 0, TN 2
    assert metrics["accuracy"] == 0.75
    assert metrics["f1"] == pytest.approx(2 * 1 / (2 + 1))
    assert metrics["mcc"] == pytest.approx((1 * 2 - 1 * 0) / (2 * 1 * 3 * 2) ** 0.5)
    regression = finetune.task_metrics(torch.tensor([[1.0], [2.0], [4.0]]), [1.0, 2.0, 3.0], num_classes=0)
    assert regression["pearson"] == pytest.approx(0.9819805, abs=1e-6)


def test_pair_and_regression_tasks_from_csv_files(tiny_model, tmp_path):
    """A sentence-pair regression task (STS-B's form) read from a CSV file pair reports Pearson's r."""
    rng = random.Random(1)
    for split, count in (("train", 64), ("dev", 16)):
        lines = ["sentence1,sentence2,label"]
        for _ in range(count):
            same = rng.randint(0, 4)
            first = rng.sample(WEEKDAYS, 4)
            lines.append(f"{' '.join(first)},{' '.join(first[:same] + rng.sample(MONTHS, 4 - same))},{same * 1.25:.2f}")
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    output = finetune.finetune(
        **{
            **flags(tiny_model, tmp_path, tmp_path / "out", epochs=1),
            "task": None,
            "train_file": str(tmp_path / "train.csv"),
            "dev_file": str(tmp_path / "dev.csv"),
        }
    )
    results = json.loads(Path(output, "results.json").read_text())
    assert results["metric"] == "pearson" and "pearson" in results["seeds"][0]
    assert json.loads(Path(output, "hparams.json").read_text())["columns"] == ["sentence1", "sentence2"]


def test_holdout_evaluates_on_the_end_of_train_and_never_reads_dev_labels(tiny_model, task, tmp_path):
    """--holdout 0.25: the last quarter of train is the evaluation split, the rest trains."""
    output = finetune.finetune(**flags(tiny_model, task, tmp_path / "out", epochs=1, holdout=0.25))
    hparams = json.loads(Path(output, "hparams.json").read_text())
    assert (hparams["train_rows"], hparams["eval_rows"], hparams["eval_split"]) == (180, 60, "held-out")


def test_results_are_written_atomically(tiny_model, task, tmp_path, monkeypatch):
    """A failure while results.json is written leaves the previous complete file and no temporary file."""
    output = tmp_path / "out"
    finetune.finetune(**flags(tiny_model, task, output, epochs=1))
    before = (output / "results.json").read_text()

    def failing_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(finetune.json, "dump", failing_dump)
    with pytest.raises(OSError):
        finetune.finetune(**flags(tiny_model, task, output, epochs=1, seeds=5))
    assert (output / "results.json").read_text() == before
    assert sorted(path.name for path in output.iterdir()) == ["hparams.json", "results.json"]


def bad_task_cases(tmp_path: Path, tiny_model: Path) -> dict[str, tuple[dict, str]]:
    """name -> (flags to change, text the error line must contain)."""
    no_train = write_task(tmp_path / "no_train")
    (no_train / "train.tsv").unlink()
    mismatched = write_task(tmp_path / "mismatched")
    write_task(tmp_path / "mismatched_dev", rows={"dev": 20}, labels=("neg", "pos"))
    (mismatched / "dev.tsv").write_text((tmp_path / "mismatched_dev" / "dev.tsv").read_text())
    not_a_classifier = tmp_path / "vit"
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        not_a_classifier
    )
    return {
        "missing train.tsv": ({"task": str(no_train)}, "no train.tsv"),
        "missing column": ({"task": str(write_task(tmp_path / "no_label", header="sentence\tgold"))}, "'label'"),
        "mismatched labels": ({"task": str(mismatched)}, "do not match"),
        "not a classifier": ({"model_dir": str(not_a_classifier)}, "'vit' model"),
        "not a model folder": ({"model_dir": str(tmp_path)}, "no config.json"),
        "not a duration": ({"time_budget": "soon"}, "not a duration"),
        "output folder not writable": ({"output_dir": str(tiny_model / "config.json" / "out")}, "is not writable"),
    }


@pytest.mark.slow
def test_bad_inputs_give_one_error_line_and_a_nonzero_exit(tiny_model, task, tmp_path):
    """Each bad task folder or model folder: exit code 2, one `error:` line on stderr, no output folder."""
    for name, (change, expected) in bad_task_cases(tmp_path, tiny_model).items():
        output = tmp_path / f"out-{name.replace(' ', '_')}"
        result = run_cli("finetune.py", {**flags(tiny_model, task, output, epochs=1), **change}, timeout=300)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert len(errors) == 1 and expected in errors[0], (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, name
        assert not output.exists(), name


def test_help_lists_every_flag():
    result = subprocess.run(
        [sys.executable, "finetune.py", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(finetune.__file__).parent,
        timeout=120,
    )
    assert result.returncode == 0
    assert all(f"--{name} " in result.stdout for name in ("model_dir", "task", "scratch", "pooling", "seeds"))


def benchmark_readme_commands(script: str) -> list[str]:
    """The lines of benchmarks/README.md that run `python <script>`."""
    text = (ROOT / "benchmarks" / "README.md").read_text()
    return [line.strip() for line in text.splitlines() if line.strip().startswith(f"python {script} ")]


def test_benchmark_readme_finetune_commands_run(tiny_model, task, tmp_path):
    """benchmarks/README.md's `python finetune.py` commands (choosing the recipe on held-out data) run and exit 0."""
    from test_readme import parse_flags

    commands = benchmark_readme_commands("finetune.py")
    assert commands, "benchmarks/README.md shows no finetune.py command"
    for number, command in enumerate(commands):
        flags = {
            **parse_flags(command),
            "model_dir": str(tiny_model),
            "task": str(task),
            "output_dir": str(tmp_path / f"out{number}"),
            "epochs": "1",
            "max_length": "16",
        }
        result = run_cli("finetune.py", flags)
        assert result.returncode == 0, f"{command!r} failed:\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_benchmark_readme_downstream_commands_run(tiny_model, task, tiny_corpus, tmp_path):
    """benchmarks/README.md's `python benchmarks/downstream.py` commands, on the tiny model, task and corpus: each
    prints the table (with the random-weights row and the gain) and writes its JSON and picture."""
    from test_readme import parse_flags

    commands = benchmark_readme_commands("benchmarks/downstream.py")
    assert commands, "benchmarks/README.md shows no downstream.py command"
    outputs = {"models", "work_dir", "json_path", "markdown_path", "png_path"}  # replaced below by tiny ones
    distinct = {}  # commands that differ only in their encoders and output paths run the same code: once
    for command in commands:
        flags = parse_flags(command)
        assert "models" in flags, f"{command!r}: a README command fine-tunes saved encoders (--models)"
        distinct.setdefault(
            tuple(sorted((name, value) for name, value in flags.items() if name not in outputs)), (command, flags)
        )
    for number, (command, flags) in enumerate(distinct.values()):
        flags.update(
            {
                "models": json.dumps({name: str(tiny_model) for name in json.loads(flags["models"])}),
                "task": str(task),
                "dataset": str(tiny_corpus),
                "dataset_config": "None",
                "epochs": "1",
                "max_length": "16",
                "work_dir": str(tmp_path / f"work{number}"),
                "json_path": str(tmp_path / f"{number}.json"),
                "png_path": str(tmp_path / f"{number}.png"),
                "markdown_path": str(tmp_path / f"{number}.md"),
            }
        )
        result = run_cli("benchmarks/downstream.py", flags)
        assert result.returncode == 0, f"{command!r} failed:\n{result.stderr[-3000:]}"
        assert "| random weights" in result.stdout and "points |" in result.stdout
        report = json.loads((tmp_path / f"{number}.json").read_text())
        assert report["rows"][0]["scratch"] and all(not row["scratch"] for row in report["rows"][1:])
        assert (tmp_path / f"{number}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"work_dir": "{model}/config.json/work"}, "error: --work_dir"),
        ({"models": '{{"no model": "{tmp}"}}'}, "error: --models 'no model'"),
    ],
    ids=["work_dir not writable", "not a model folder"],
)
def test_downstream_bad_inputs_give_one_error_line(change, expected, tiny_model, task, tmp_path):
    """benchmarks/downstream.py: a folder it cannot write, or an encoder that is not a saved model: one `error:`
    line, a non-zero exit, no traceback, before any fine-tuning."""
    flags = {"models": json.dumps({"tiny": str(tiny_model)}), "task": str(task), "work_dir": str(tmp_path / "work")}
    flags |= {name: value.format(model=tiny_model, tmp=tmp_path) for name, value in change.items()}
    result = run_cli("benchmarks/downstream.py", flags, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr[-2000:]


def without_timing(run: dict) -> dict:
    return {name: value for name, value in run.items() if name != "train_time_s"}


def test_the_same_command_again_keeps_the_finished_seeds_and_equals_an_uninterrupted_run(tiny_model, task, tmp_path):
    """A folder where seed 0 finished (a run stopped during seed 1 leaves exactly that): the same flags with seeds 0,1
    keep seed 0's result as it was and train seed 1, which equals seed 1 of an uninterrupted run. Other flags
    replace the folder's results instead."""
    uninterrupted = json.loads(
        Path(
            finetune.finetune(**flags(tiny_model, task, tmp_path / "whole", epochs=1, seeds=(0, 1))), "results.json"
        ).read_text()
    )
    output = tmp_path / "continued"
    finetune.finetune(**flags(tiny_model, task, output, epochs=1, seeds=0))
    seed_0 = json.loads((output / "results.json").read_text())["seeds"][0]
    seed_0["train_time_s"] = -1.0  # a mark: kept, not trained again
    (output / "results.json").write_text(json.dumps({"seeds": [seed_0]}))
    continued = json.loads(
        Path(finetune.finetune(**flags(tiny_model, task, output, epochs=1, seeds=(0, 1))), "results.json").read_text()
    )
    assert continued["seeds"][0] == seed_0
    assert without_timing(continued["seeds"][1]) == without_timing(uninterrupted["seeds"][1])
    assert continued["summary"] == uninterrupted["summary"]

    other = json.loads(
        Path(
            finetune.finetune(**flags(tiny_model, task, output, epochs=1, seeds=(0, 1), lr=5e-4)), "results.json"
        ).read_text()
    )
    assert other["seeds"][0]["train_time_s"] != -1.0, "other flags: seed 0 is trained again"


@pytest.mark.slow
def test_sigterm_stops_with_one_line_and_the_printed_command_finishes_the_other_seeds(tiny_model, task, tmp_path):
    """SIGTERM during seed 1 of 0,1,2: exit 143, one line naming what was saved and the command to continue, no
    traceback; that command, run as printed, keeps seed 0's result and trains seeds 1 and 2."""
    output = tmp_path / "out"
    command = [
        sys.executable,
        "finetune.py",
        *[
            f"--{name}={value}"
            for name, value in flags(tiny_model, task, output, seeds="0,1,2", time_budget="3").items()
        ],
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (output / "results.json").exists():  # seed 0 is finished once its results are written
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.05)
        seed_0 = json.loads((output / "results.json").read_text())["seeds"]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    expected = f"stopped by SIGTERM while training seed 1; {output / 'results.json'} holds seed(s) 0. Continue with"
    assert last.startswith(expected), last
    printed = last.split("(finished seeds are kept): ", 1)[1]
    assert [run["seed"] for run in json.loads((output / "results.json").read_text())["seeds"]] == [0]

    result = subprocess.run(shlex.split(printed), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((output / "results.json").read_text())
    assert [run["seed"] for run in results["seeds"]] == [0, 1, 2]
    assert results["seeds"][:1] == seed_0
    assert "keeping seed(s) 0, finished earlier" in result.stderr

"""Every `python train_bert.py ...` command of the README and docs/ runs, on the tiny corpus, as the README writes it.

Only what cannot run in a test is adapted: data paths point at the tiny corpus and tokenizer, the model is shrunk and
trains 3 steps, and an experiment folder written as `.../bert_pretrain.<...>` is the one the previous command made.
Commands that need a GPU (`--device cuda...` or `--local_rank N` with N >= 0) are skipped on machines without one.
"""

import re
import shlex
from pathlib import Path

import torch

from conftest import ROOT, TINY_MODEL_FLAGS, run_cli


def readme_commands(script: str) -> list[str]:
    """Lines of the ```bash blocks of the README (then docs/*.md) that run `python <script>`."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [block for page in pages for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)]
    return [
        line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith(f"python {script} ")
    ]


def parse_flags(command: str) -> dict[str, str]:
    """`python train_bert.py --a 1 --b=2` -> {"a": "1", "b": "2"} (every README flag takes a value)."""
    words = shlex.split(command)[2:]
    flags, index = {}, 0
    while index < len(words):
        name, _, value = words[index][2:].partition("=")
        if not value:
            index += 1
            value = words[index]
        flags[name] = value
        index += 1
    return flags


COMMANDS = readme_commands("train_bert.py")


def test_readme_has_training_commands():
    assert len(COMMANDS) >= 5, COMMANDS


def test_every_readme_command_runs(tiny_corpus, tiny_tokenizer, tmp_path):
    """Run the README's commands in order; each must exit 0 (a resume command resumes the previous experiment)."""
    previous_experiment = None
    ran = 0
    for command in COMMANDS:
        flags = parse_flags(command)
        needs_gpu = int(flags.get("local_rank", -1)) >= 0 or flags.get("device", "auto").startswith("cuda")
        if needs_gpu and not torch.cuda.is_available():
            continue  # a GPU command; the same flags minus --device run in the CPU commands
        if "load_checkpoint_dir" in flags:
            assert previous_experiment, f"{command!r} resumes, but no command before it made an experiment"
            flags["load_checkpoint_dir"] = previous_experiment
            if "num_iterations" in flags:
                flags["num_iterations"] = "6"  # "train further": past the 3 steps the experiment was trained for
        else:
            flags["checkpoint_dir"] = str(tmp_path / "experiments")
            if flags.get("tokenizer") != "bpe":
                flags["tokenizer"] = str(tiny_tokenizer)
            flags.update({"dataset": str(tiny_corpus), "num_iterations": "3", **TINY_MODEL_FLAGS})
            flags.pop("dataset_config", None)
            if "time_budget" in flags:  # a budgeted run: a few seconds instead of 3 steps (the two are exclusive)
                flags["time_budget"] = "5s"
                del flags["num_iterations"]
            if "init_from" in flags:  # the model and tokenizer come from the checkpoint given
                assert previous_experiment, f"{command!r} continues a model, but no command before it made one"
                flags["init_from"] = str(Path(previous_experiment, "hf_model"))
                for name in ("tokenizer", "num_layers", "num_heads", "h_dim", "ff_dim"):
                    flags.pop(name, None)
        result = run_cli("train_bert.py", flags)
        assert result.returncode == 0, f"{command!r} failed:\n{result.stderr[-3000:]}"
        if "checkpoint_dir" in flags:
            previous_experiment = result.stdout.strip().splitlines()[-1]
            assert Path(previous_experiment, "hf_model").is_dir()
        ran += 1
    assert ran >= 4


def test_every_readme_finetune_command_runs(tiny_corpus, tiny_tokenizer, tmp_path):
    """The README's `python finetune.py` commands, on a tiny exported model and a tiny task, each exit 0."""
    from test_finetune import write_task

    import train_bert

    commands = readme_commands("finetune.py")
    assert commands, "the README shows no finetune.py command"
    experiment = train_bert.train(
        checkpoint_dir=str(tmp_path / "pretrain"),
        dataset=str(tiny_corpus),
        tokenizer=str(tiny_tokenizer),
        num_iterations=3,
        **TINY_MODEL_FLAGS,
    )
    task = write_task(tmp_path / "task")
    for number, command in enumerate(commands):
        flags = {
            **parse_flags(command),
            "model_dir": str(Path(experiment, "hf_model")),
            "task": str(task),
            "output_dir": str(tmp_path / f"out{number}"),
            "epochs": "1",
            "max_length": "16",
        }
        result = run_cli("finetune.py", flags)
        assert result.returncode == 0, f"{command!r} failed:\n{result.stderr[-3000:]}"
        assert Path(tmp_path / f"out{number}", "results.json").is_file()


def test_readme_use_your_model_snippet_and_tensorboard(tiny_flags, tmp_path):
    """§8 "Use your model": the README's Python snippet, pointed at a tiny run's hf_model/, prints the pipeline's five
    guesses; the folder its `tensorboard --logdir` names holds that run's curves (TensorBoard's own reader finds the
    loss, the learning rate and the evaluations)."""
    import os
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train_bert

    experiment = Path(train_bert.train(**{**tiny_flags, "num_iterations": 3, "log_every": 1}))
    readme = (ROOT / "README.md").read_text()
    [snippet] = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert "./experiments/bert_pretrain.<...>/hf_model" in snippet
    code = snippet.replace("./experiments/bert_pretrain.<...>/hf_model", str(experiment / "hf_model"))
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.strip().splitlines()) == 5, result.stdout

    [logdir] = re.findall(r"^tensorboard --logdir (\S+)$", readme, flags=re.M)
    assert Path(logdir) == Path(tiny_flags["checkpoint_dir"]).relative_to(tmp_path)  # ./experiments, as runs write
    [events] = [path.parent for path in Path(tiny_flags["checkpoint_dir"]).rglob("events.out.tfevents.*")]
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert {"loss", "lr", "eval_loss"} <= set(accumulator.Tags()["scalars"]), accumulator.Tags()["scalars"]

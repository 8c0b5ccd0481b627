"""The code passes the project's ruff configuration (ruff.toml): lint (pycodestyle, pyflakes, import order, 120
columns) everywhere, and the formatter everywhere but the three hand-wrapped scripts it names."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_ruff(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ruff", *arguments, "--no-cache", "."]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    result = run_ruff("check")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


def test_the_code_is_formatted():
    """`ruff format --check .` passes: run `python -m ruff format .` after editing (the scripts are left as written)."""
    result = run_ruff("format", "--check")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


def test_the_package_never_imports_the_scripts():
    """pretraining/ is the layer below the scripts: no module of it imports train_bert, train_bert_ds or finetune, and
    the modules train_bert.py uses know nothing of DeepSpeed (not even its name: its launcher, its checkpoint
    folders); only deepspeed_config.py and ranks.py, which train_bert_ds.py alone uses, do."""
    for module in sorted((ROOT / "pretraining").glob("*.py")):
        text = module.read_text()
        for script in ("train_bert", "train_bert_ds", "finetune"):
            assert f"import {script}" not in text and f"from {script} " not in text, (module.name, script)
        if module.stem not in ("deepspeed_config", "ranks"):
            assert "deepspeed" not in text.lower() and "global_step" not in text, module.name

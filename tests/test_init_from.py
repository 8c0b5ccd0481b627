"""--init_from: continued pretraining of a Hugging Face masked-LM checkpoint (here an hf_model/ a tiny run exported)."""

import inspect
import json
from pathlib import Path

import pytest
import torch

import train_bert
from conftest import run_cli
from pretraining import corpus, flag_rules


@pytest.fixture(scope="module", params=flag_rules.POSITIONS)
def exported_model(request, tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """The hf_model/ folder of a 4-step tiny run (shape 2 layers x 32, 2 heads, ff 64, dropout 0.1), once with each
    kind of position embedding (RoFormer and RoBERTa models)."""
    from conftest import TINY_MODEL_FLAGS

    experiment = train_bert.train(
        checkpoint_dir=str(tmp_path_factory.mktemp("source")),
        dataset=str(tiny_corpus),
        tokenizer=str(tiny_tokenizer),
        num_iterations=4,
        dropout=0.1,
        positions=request.param,
        **TINY_MODEL_FLAGS,
    )
    return Path(experiment) / "hf_model"


def positions_of(exported_model: Path) -> str:
    return json.loads((exported_model.parent / "hparams.json").read_text())["flags"]["positions"]


def test_init_from_starts_from_the_source_weights(exported_model):
    """The flags resolve to the source's shape and tokenizer, and the model built from them is the source, exactly."""
    from transformers import AutoModelForMaskedLM

    defaults = {name: p.default for name, p in inspect.signature(train_bert.train).parameters.items()}
    flags = flag_rules.resolve_init_from({**defaults, "init_from": str(exported_model), "max_seq_length": 32}, defaults)
    assert (flags["num_layers"], flags["h_dim"], flags["num_heads"], flags["ff_dim"]) == (2, 32, 2, 64)
    assert flags["tokenizer"] == str(exported_model) and flags["dropout"] == 0.1
    assert flags["positions"] == positions_of(exported_model)
    tokenizer = corpus.load_tokenizer(flags["tokenizer"])
    model = train_bert.create_model(
        flags["num_layers"],
        flags["num_heads"],
        flags["ff_dim"],
        flags["h_dim"],
        flags["dropout"],
        tokenizer,
        flags["max_seq_length"],
        flags["init_from"],
    )
    source = AutoModelForMaskedLM.from_pretrained(exported_model).state_dict()
    state = model.state_dict()
    assert set(state) == set(source)
    for name, tensor in source.items():
        assert torch.equal(state[name], tensor), name


def test_init_from_an_exported_model_trains_and_saves(exported_model, tiny_corpus, tmp_path):
    """`--init_from hf_model` with no model flags takes the source's shape and tokenizer, trains and exports."""
    flags = {
        "checkpoint_dir": str(tmp_path / "continued"),
        "dataset": str(tiny_corpus),
        "init_from": str(exported_model),
        "max_seq_length": 32,
        "batch_size": 4,
        "num_iterations": 6,
        "log_every": 2,
        "dropout": 0.0,
    }
    result = run_cli("train_bert.py", flags, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = Path(result.stdout.strip().splitlines()[-1])
    hparams = json.loads((experiment / "hparams.json").read_text())["flags"]
    assert (hparams["num_layers"], hparams["h_dim"], hparams["tokenizer"]) == (2, 32, str(exported_model))
    from transformers import AutoModelForMaskedLM

    continued = AutoModelForMaskedLM.from_pretrained(experiment / "hf_model").state_dict()
    source = AutoModelForMaskedLM.from_pretrained(exported_model).state_dict()
    assert set(continued) == set(source)
    assert any(not torch.equal(continued[name], source[name]) for name in source), "it trained"
    assert hparams["positions"] == positions_of(exported_model)
    fixed = [name for name in source if "embed_positions" in name]  # RoFormer's sinusoid table is not trained
    assert len(fixed) == (hparams["positions"] == "rotary")
    assert all(torch.equal(continued[name], source[name]) for name in fixed)
    assert (experiment / "checkpoint-00000006.pt").is_file()


def test_a_model_flag_that_disagrees_with_init_from_is_one_error_line(exported_model, tiny_corpus, tmp_path):
    flags = {
        "checkpoint_dir": str(tmp_path / "x"),
        "dataset": str(tiny_corpus),
        "init_from": str(exported_model),
        "max_seq_length": 32,
        "h_dim": 64,
    }
    result = run_cli("train_bert.py", flags, timeout=120)
    assert result.returncode == 2
    assert (
        result.stderr.startswith("error: --h_dim 64 disagrees with --init_from")
        and len(result.stderr.strip().splitlines()) == 1
    ), result.stderr
    assert "leave --h_dim out" in result.stderr and not (tmp_path / "x").exists()
    if positions_of(exported_model) == "rotary":  # (--positions rotary is the default: the same as leaving it out)
        result = run_cli("train_bert.py", {**flags, "h_dim": 32, "positions": "learned"}, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith("error: --positions 'learned' disagrees with")
    missing = run_cli("train_bert.py", {**flags, "init_from": str(tmp_path / "nowhere"), "h_dim": 32}, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: could not load --init_from")
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr

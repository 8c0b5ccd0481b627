"""Corpus and tokenizer details: local text files, splits, a byte-level BPE tokenizer trained on the corpus."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pretraining.errors import ConfigError

if TYPE_CHECKING:
    import datasets
    import transformers


def offline_hint() -> str:
    """The one sentence that tells a user how to run without the Hugging Face Hub."""
    return (
        "To run offline, pass local copies: --dataset PATH (a datasets folder such as ../shared/data/wikitext, a "
        "folder with train.txt/validation.txt[/test.txt], or one .txt file) and --tokenizer PATH (a tokenizer folder "
        "such as ../shared/data/roberta-base, or 'bpe' to train one), with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 set."
    )


def text_files(dataset: str) -> dict[str, Path]:
    """The .txt files of a local text corpus by split ({} for anything else: a Hub name, a datasets folder)."""
    path = Path(dataset)
    if path.is_file() and path.suffix == ".txt":
        return {"train": path}
    if path.is_dir() and (path / "train.txt").is_file():
        return {
            split: path / f"{split}.txt"
            for split in ("train", "validation", "test")
            if (path / f"{split}.txt").is_file()
        }
    return {}


def check_text_file(path: Path) -> None:
    """Name what is wrong with a .txt corpus file that `datasets` cannot read: empty, or not UTF-8 (where)."""
    if path.stat().st_size == 0:
        raise ConfigError(f"--dataset file {str(path)!r} is empty; give a UTF-8 text file with one line per paragraph")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                line += chunk.count(b"\n", 0, error.start)
                raise ConfigError(
                    f"--dataset file {str(path)!r} is not UTF-8 text: byte {offset + error.start} (line "
                    f"{line}, 0x{chunk[error.start]:02x}) cannot be decoded: {error.reason}; convert "
                    "the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from error
            offset, line = offset + len(chunk), line + chunk.count(b"\n")


def split_single_file(lines: "datasets.Dataset", dataset: str) -> "datasets.DatasetDict":
    """Train on the first 95% of a single .txt file's lines and validate on the rest (at least one line each)."""
    import datasets

    num_validation = max(1, len(lines) // 20)
    if len(lines) - num_validation < 1:
        raise ConfigError(
            f"--dataset {dataset!r} has {len(lines)} line(s): a single .txt file is split by lines, its last 5% (at "
            f"least one line) validating, so no line is left to train on; give a file of many lines, or a folder "
            "with train.txt and validation.txt"
        )
    return datasets.DatasetDict(
        train=lines.select(range(len(lines) - num_validation)),
        validation=lines.select(range(len(lines) - num_validation, len(lines))),
    )


def describe_split(dataset: str, rows: dict[str, int], split: str) -> str:
    """How a split came about, for error messages: one .txt file is split by lines, other corpora have real splits.
    `rows` is each split's number of lines (empty ones included)."""
    if Path(dataset).is_file():
        return (
            f"the {split} split ({rows[split]} of the {rows['train'] + rows['validation']} lines of {dataset!r}: "
            "the first 95% train, the last 5% validate)"
        )
    return f"the {split} split"


def with_text_column(split: "datasets.Dataset", dataset: str) -> "datasets.Dataset":
    """Return `split` with only a `text` column (renaming its single string column if it has another name)."""
    string_columns = [name for name, feature in split.features.items() if getattr(feature, "dtype", None) == "string"]
    if "text" in split.column_names:
        column = "text"
    elif len(string_columns) == 1:
        column = string_columns[0]
    else:
        raise ConfigError(
            f"--dataset {dataset!r} has no text column: expected a string column named 'text' (or exactly one "
            f"string column); its columns are {split.column_names}"
        )
    split = split.select_columns([column])
    return split if column == "text" else split.rename_column(column, "text")


def train_bpe_tokenizer(texts: "datasets.Dataset", vocab_size: int) -> "transformers.PreTrainedTokenizerFast":
    """Train a byte-level BPE tokenizer (RoBERTa's kind) on `texts` with the `tokenizers` library.

    Its special tokens and their ids match RoBERTa's (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last), so everything
    downstream treats it like roberta-base. Takes seconds on wikitext-2.
    """
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        (batch["text"] for batch in texts.iter(batch_size=1000)),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def load_tokenizer(tokenizer: str) -> "transformers.PreTrainedTokenizerBase":
    """Load a pretrained tokenizer from a Hub name ("roberta-base") or a local folder, checking it can do MLM."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"could not load --tokenizer {tokenizer!r}: {first_line[:300]}. {offline_hint()}") from error
    check_tokenizer(loaded, tokenizer)
    return loaded


def check_tokenizer(tokenizer: "transformers.PreTrainedTokenizerBase", name: str) -> None:
    """MLM needs a mask token, a pad token (RoBERTa's position ids count from it) and block framing tokens."""
    missing = [
        role
        for role, token_id in (
            ("mask_token", tokenizer.mask_token_id),
            ("pad_token", tokenizer.pad_token_id),
            (
                "bos_token or cls_token",
                tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
            ),
            (
                "eos_token or sep_token",
                tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id,
            ),
        )
        if token_id is None
    ]
    if missing:
        raise ConfigError(
            f"--tokenizer {name!r} has no {', '.join(missing)}; MLM pretraining needs them. Use a RoBERTa/BERT-style "
            "tokenizer or --tokenizer bpe to train one"
        )


def check_block_length(tokenizer: "transformers.PreTrainedTokenizerBase", max_seq_length: int, name: str) -> None:
    """A block may not be longer than the sequences the tokenizer is made for (a real limit, not the 1e30 default)."""
    limit = tokenizer.model_max_length
    if limit < 1_000_000 and max_seq_length > limit:
        raise ConfigError(
            f"--max_seq_length {max_seq_length} is larger than the {limit} tokens that tokenizer {name!r} is made for"
        )


def block_framing_ids(tokenizer: "transformers.PreTrainedTokenizerBase") -> tuple[int, int]:
    """The (start, end) ids that frame every block and end every line: <s>/</s> for RoBERTa, [CLS]/[SEP] for BERT."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return start, end


def datasets_splits(raw: Any, names: tuple[str, ...]) -> Any:
    """`raw` with only the splits in `names` (a Hub dataset may have more)."""
    return type(raw)({split: raw[split] for split in raw if split in names})


def load_text_dataset(
    dataset: str, dataset_config: str | None, streaming: bool = False
) -> "datasets.DatasetDict | datasets.IterableDatasetDict":
    """Load `dataset` as a DatasetDict with a `text` column and at least `train` and `validation` splits.

    `dataset` is a Hub name ("wikitext"), a folder `datasets.load_dataset` understands (../shared/data/wikitext), a
    folder holding train.txt / validation.txt / test.txt, or a single .txt file (its last 5% of lines, at least one,
    become the validation split; lines stay in order so no paragraph leaks between splits).
    With `streaming`, the splits are read lazily (an IterableDatasetDict; a single .txt file is then not split: see
    `prepare_streamed_data`).
    """
    import datasets

    path = Path(dataset)
    files = text_files(dataset)
    try:
        if path.is_file() and path.suffix != ".txt":
            raise ConfigError(f"--dataset {dataset!r} is a file but not a .txt file; give a .txt file or a folder")
        if files:
            # Lines keep their "\n", as the Hub's text datasets (wikitext) do: the same text gives the same tokens.
            raw = datasets.load_dataset(
                "text",
                data_files={split: str(file) for split, file in files.items()},
                keep_linebreaks=True,
                streaming=streaming,
            )
        else:
            raw = datasets.load_dataset(dataset, dataset_config, streaming=streaming)
        if streaming:  # a stream's columns may be unknown until read: then it must have a `text` one
            return datasets.IterableDatasetDict(
                {
                    split: raw[split].select_columns(["text"])
                    if raw[split].features is None
                    else with_text_column(raw[split], dataset)
                    for split in raw
                }
            )
    except ConfigError:
        raise
    except Exception as error:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError…)
        for file in files.values():  # "An error occurred while generating the dataset" hides the cause: find it
            check_text_file(file)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"could not load --dataset {dataset!r} (config {dataset_config!r}): {first_line[:300]}. {offline_hint()}"
        ) from error
    if path.is_file():
        raw = split_single_file(raw["train"], dataset)
    if not isinstance(raw, datasets.DatasetDict) or "train" not in raw or "validation" not in raw:
        splits = list(raw.keys()) if isinstance(raw, datasets.DatasetDict) else []
        raise ConfigError(f"--dataset {dataset!r} must have 'train' and 'validation' splits; it has {splits}")
    return datasets.DatasetDict({split: with_text_column(raw[split], dataset) for split in raw})


def word_start_table(tokenizer: "transformers.PreTrainedTokenizerBase") -> torch.Tensor:
    """A bool tensor over the vocabulary: True where the token id begins a word. Computed once per tokenizer.

    WordPiece (BERT) marks the pieces that continue a word with "##"; byte-level BPE (RoBERTa, GPT-2) marks the
    pieces that begin one with "Ġ" (an encoded space), SentencePiece with "▁". Special tokens count as word starts.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    continues = [piece.startswith("##") for piece in pieces]
    begins = [piece.startswith(("Ġ", "▁")) for piece in pieces]
    # A BPE vocabulary may hold a few pieces that happen to start with "##" (and a WordPiece one no "Ġ"): the
    # marker that most of the vocabulary carries tells the scheme.
    if sum(continues) > sum(begins):
        starts = [not piece_continues for piece_continues in continues]
    elif any(begins):
        starts = begins
    else:
        raise ConfigError(
            "--whole_word_mask needs a tokenizer that marks word boundaries (WordPiece '##' pieces, "
            "byte-level BPE 'Ġ' or SentencePiece '▁'); this tokenizer has none"
        )
    table = torch.tensor(starts, dtype=torch.bool)
    table[sorted(set(tokenizer.all_special_ids))] = True
    return table


def word_start_positions(input_ids: torch.Tensor, is_special: torch.Tensor, word_starts: torch.Tensor) -> torch.Tensor:
    """For every position of `input_ids` [B, T], the position of the first piece of its word (same shape)."""
    starts = word_starts.to(input_ids.device)[input_ids.long()] | is_special
    starts[:, 0] = True
    starts[:, 1:] |= is_special[:, :-1]  # the token after <s> or </s> begins a word
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return torch.where(starts, positions, 0).cummax(dim=1).values

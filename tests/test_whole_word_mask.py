"""Whole-word masking: words, not tokens, are selected; every piece of a selected word with it.

Statistical claims are checked within z = 5 binomial standard deviations (a correct implementation fails about once
in 1.7 million runs; a wrong rate fails as soon as its error exceeds the bound).
"""

import math

import pytest
import torch

import train_bert
from pretraining import corpus

Z = 5.0


def z_bound(p: float, n: int) -> float:
    """Tolerance for an observed rate p over n independent trials: Z standard deviations."""
    return Z * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def bpe_tokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


@pytest.fixture(scope="module")
def wordpiece_tokenizer(tiny_corpus):
    """A BERT-style WordPiece tokenizer ("##" continuation pieces) trained on the tiny corpus."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train([str(tiny_corpus / "train.txt")], vocab_size=120, min_frequency=1, show_progress=False)
    return BertTokenizerFast(
        tokenizer_object=wordpiece._tokenizer,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def packed_rows(tokenizer, tiny_corpus, rows: int, length: int) -> torch.Tensor:
    """The corpus packed like train_bert.pack_blocks: lines end with the end token, rows are cut anywhere (so a row
    may begin in the middle of a word), each row framed start ... end."""
    start_id, end_id = corpus.block_framing_ids(tokenizer)
    stream = []
    for line in (tiny_corpus / "train.txt").read_text().splitlines():
        if line.strip():
            stream += tokenizer(line, add_special_tokens=False)["input_ids"] + [end_id]
    body = length - 2
    stream = (stream * (rows * body // len(stream) + 1))[: rows * body]
    ids = torch.tensor(stream).view(rows, body)
    return torch.cat([torch.full((rows, 1), start_id), ids, torch.full((rows, 1), end_id)], dim=1)


def reference_words(tokenizer, row: list[int]) -> list[list[int]]:
    """The words of a row as lists of positions, worked out token by token from the token strings (the slow, obvious
    way): a word starts at a "Ġ" piece (byte-level BPE) or at any piece without "##" (WordPiece), at the row's first
    token and after a special token. Special tokens belong to no word."""
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(row)
    wordpiece = any(piece.startswith("##") for piece in tokenizer.get_vocab()) and not any(
        piece.startswith("Ġ") for piece in tokenizer.get_vocab()
    )
    words, previous_special = [], True
    for position, (token_id, piece) in enumerate(zip(row, pieces)):
        if token_id in special:
            previous_special = True
            continue
        begins = (not piece.startswith("##")) if wordpiece else piece.startswith("Ġ")
        if begins or previous_special or position == 0:
            words.append([])
        words[-1].append(position)
        previous_special = False
    return words


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_whole_word_masking_stats(kind, bpe_tokenizer, wordpiece_tokenizer, tiny_corpus):
    """Words are selected at mask_prob, all their pieces together, specials never; 80/10/10 among selected pieces."""
    tokenizer = bpe_tokenizer if kind == "bpe" else wordpiece_tokenizer
    mask_prob, random_prob, unmask_prob = 0.15, 0.1, 0.1
    input_ids = packed_rows(tokenizer, tiny_corpus, rows=400, length=64)
    table = corpus.word_start_table(tokenizer)
    masked, labels = train_bert.masking_function(
        input_ids, tokenizer, mask_prob, random_prob, unmask_prob, torch.Generator().manual_seed(7), word_starts=table
    )
    selected = labels != train_bert.IGNORE_INDEX
    special = torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids))
    assert not (selected & special).any(), "a special token was selected"
    assert torch.equal(labels[selected], input_ids[selected])

    words = selected_words = multi_piece_words = 0
    for row, row_selected in zip(input_ids.tolist(), selected.tolist()):
        for word in reference_words(tokenizer, row):
            picks = {row_selected[position] for position in word}
            assert len(picks) == 1, f"word {tokenizer.convert_ids_to_tokens([row[p] for p in word])} split"
            words += 1
            selected_words += picks.pop()
            multi_piece_words += len(word) > 1
    assert multi_piece_words > 0.1 * words, "the test needs words of several pieces"
    assert abs(selected_words / words - mask_prob) < z_bound(mask_prob, words)

    # The 80/10/10 choice is per piece, independently (BERT's rule), so these are binomial over selected pieces.
    n = int(selected.sum())
    to_mask = float((masked[selected] == tokenizer.mask_token_id).sum()) / n
    unchanged = float((masked[selected] == input_ids[selected]).sum()) / n
    num_candidates = len(tokenizer) - len(set(tokenizer.all_special_ids))
    expected_unchanged = unmask_prob + random_prob / num_candidates  # a random replacement may draw the original
    assert abs(to_mask - (1 - random_prob - unmask_prob)) < z_bound(0.8, n)
    assert abs(unchanged - expected_unchanged) < z_bound(expected_unchanged, n)
    assert torch.equal(masked[~selected], input_ids[~selected])


def test_a_word_cut_at_the_block_start_is_a_word_there(bpe_tokenizer):
    """The first token of a row begins a word even if it is a continuation piece, and so does the token after </s>."""
    tokenizer = bpe_tokenizer
    continuation = next(
        i
        for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
        if i not in tokenizer.all_special_ids and not piece.startswith("Ġ")
    )
    begins = next(
        i
        for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
        if piece.startswith("Ġ")
    )
    row = torch.tensor(
        [[continuation, continuation, begins, continuation, tokenizer.eos_token_id, continuation, continuation]]
    )
    special = torch.isin(row, torch.tensor(tokenizer.all_special_ids))
    starts = corpus.word_start_positions(row, special, corpus.word_start_table(tokenizer))
    assert starts.tolist() == [[0, 0, 2, 2, 4, 5, 5]]


def test_whole_word_masking_keeps_the_generator_stream_and_the_default_is_token_masking(bpe_tokenizer, tiny_corpus):
    """Whole-word masking draws the same random tensors: a generator is left in the same state either way."""
    input_ids = packed_rows(bpe_tokenizer, tiny_corpus, rows=8, length=32)
    plain, whole = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    train_bert.masking_function(input_ids, bpe_tokenizer, generator=plain)
    train_bert.masking_function(
        input_ids, bpe_tokenizer, generator=whole, word_starts=corpus.word_start_table(bpe_tokenizer)
    )
    assert torch.equal(plain.get_state(), whole.get_state())
    assert train_bert.MaskingConfig(bpe_tokenizer, 0.15, 0.1, 0.1).word_starts is None
    assert train_bert.MaskingConfig(bpe_tokenizer, 0.15, 0.1, 0.1, whole_word_mask=True).word_starts is not None


def test_training_with_whole_word_masking(tiny_flags, bpe_tokenizer, monkeypatch):
    """--whole_word_mask reaches the masking of every training batch: in each batch the loop masked, every word is
    selected whole or not at all (token masking splits words within the first few batches); the flag is recorded."""
    import json
    from pathlib import Path

    masked_batches = []
    real_masking = train_bert.masking_function

    def recording_masking(input_ids, *args, **kwargs):
        masked, labels = real_masking(input_ids, *args, **kwargs)
        masked_batches.append((input_ids.clone(), labels.clone()))
        return masked, labels

    monkeypatch.setattr(train_bert, "masking_function", recording_masking)
    experiment = Path(train_bert.train(**tiny_flags, whole_word_mask=True, num_iterations=4, log_every=2))
    assert json.loads((experiment / "hparams.json").read_text())["flags"]["whole_word_mask"] is True
    assert (experiment / "checkpoint-00000004.pt").is_file()
    assert len(masked_batches) >= 4
    split_words = 0
    for input_ids, labels in masked_batches:
        for row, row_labels in zip(input_ids.tolist(), labels.tolist()):
            for word in reference_words(bpe_tokenizer, row):
                selected = {row_labels[position] != train_bert.IGNORE_INDEX for position in word}
                split_words += len(selected) > 1
    assert split_words == 0

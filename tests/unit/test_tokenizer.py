"""The runtime tokenizer on the real bert-base-chinese WordPiece vocabulary."""

import logging

import numpy as np

from iap_rt.tokenizer import (
    PromptTokenizer,
    bert_chinese_vocab_path,
    build_wordpiece_tokenizer,
    save_tokenizer_dir,
)


def _tok(max_length=16):
    return PromptTokenizer(build_wordpiece_tokenizer(bert_chinese_vocab_path()), max_length)


def test_real_vocab_ids_and_padding():
    enc = _tok(8)(["山水画", ""])
    # [CLS]=101, 山=2255, 水=3717, 画=4514, [SEP]=102 in bert-base-chinese
    assert enc.input_ids[0].tolist() == [101, 2255, 3717, 4514, 102, 0, 0, 0]
    assert enc.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert enc.input_ids[1, :2].tolist() == [101, 102] and enc.attention_mask[1].sum() == 2
    assert enc.input_ids.dtype == np.int64 and enc.dropped == [0, 0]


def test_truncation_keeps_sep_and_warns_with_count(caplog):
    with caplog.at_level(logging.WARNING, logger="iap_rt"):
        enc = _tok(6)(["左边有一个红色的圆"])  # 9 chars + 2 specials = 11 tokens
    assert enc.dropped == [5]
    assert enc.input_ids[0, -1] == 102 and enc.attention_mask[0].all()
    assert "5 token(s) dropped" in caplog.text


def test_roundtrip_through_directory(tmp_path):
    tok = build_wordpiece_tokenizer(bert_chinese_vocab_path())
    save_tokenizer_dir(tmp_path, tok, 12)
    loaded = PromptTokenizer.from_dir(tmp_path)
    assert loaded.max_length == 12
    a, b = loaded(["一只猫 cat"]), PromptTokenizer(tok, 12)(["一只猫 cat"])
    assert (a.input_ids == b.input_ids).all()

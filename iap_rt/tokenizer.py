"""The runtime's prompt tokenizer: HF ``tokenizers`` (``tokenizer.json``), no transformers.

A tokenizer directory holds ``tokenizer.json`` and ``iap_tokenizer.json``::

    {"max_length": 32, "pad_id": 0}

Prompts are padded/truncated to ``max_length`` (the text encoder's ``S`` axis). A prompt that
does not fit is truncated keeping its final special token (``[SEP]``), with a warning saying
how many tokens were dropped.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from iap_rt.errors import ArtifactError, ArtifactNotFoundError
from iap_rt.fileio import ensure_dir, write_json_atomic, write_text_atomic

log = logging.getLogger("iap_rt")

CONFIG_FILE = "iap_tokenizer.json"


def bert_chinese_vocab_path() -> Path:
    """The bert-base-chinese WordPiece vocabulary shipped with iap-rt (see its README)."""
    return Path(str(resources.files("iap_rt") / "data" / "vocab" / "bert-base-chinese-vocab.txt"))


def build_wordpiece_tokenizer(vocab_file: str | os.PathLike, lowercase: bool = True) -> Tokenizer:
    """A BERT-style WordPiece ``Tokenizer`` (CJK characters split, [CLS] … [SEP])."""
    from tokenizers.implementations import BertWordPieceTokenizer

    impl = BertWordPieceTokenizer(
        str(vocab_file), lowercase=lowercase, handle_chinese_chars=True, strip_accents=None
    )
    return impl._tokenizer


def save_tokenizer_dir(out: str | os.PathLike, tokenizer: Tokenizer, max_length: int) -> Path:
    """Write ``tokenizer.json`` + ``iap_tokenizer.json`` into ``out``."""
    out = ensure_dir(out)
    pad = tokenizer.token_to_id("[PAD]")
    write_text_atomic(out / "tokenizer.json", tokenizer.to_str())
    write_json_atomic(
        out / CONFIG_FILE, {"max_length": int(max_length), "pad_id": int(pad if pad else 0)}
    )
    return out


@dataclass
class EncodedPrompts:
    input_ids: np.ndarray  # (N, S) int64
    attention_mask: np.ndarray  # (N, S) int64
    dropped: list[int] = field(default_factory=list)  # tokens dropped per prompt


class PromptTokenizer:
    """Tokenizes prompts to fixed-length ``input_ids`` / ``attention_mask`` arrays."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_id: int = 0):
        if max_length < 2:
            raise ArtifactError(f"tokenizer max_length {max_length} < 2")
        self.tokenizer = tokenizer
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> PromptTokenizer:
        path = Path(path)
        tj, cfg = path / "tokenizer.json", path / CONFIG_FILE
        for f in (tj, cfg):
            if not f.is_file():
                raise ArtifactNotFoundError(
                    f"tokenizer file {f} is missing",
                    fix="re-export the model directory (iap-rt export ... --force).",
                )
        try:
            tok = Tokenizer.from_file(str(tj))
            conf = json.loads(cfg.read_text("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise ArtifactError(f"tokenizer in {path} is corrupt: {e}") from e
        return cls(tok, int(conf["max_length"]), int(conf.get("pad_id", 0)))

    def __call__(self, prompts: list[str]) -> EncodedPrompts:
        n, s = len(prompts), self.max_length
        ids = np.full((n, s), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, s), dtype=np.int64)
        dropped = []
        for i, enc in enumerate(self.tokenizer.encode_batch(list(prompts))):
            toks = enc.ids
            extra = max(0, len(toks) - s)
            if extra:
                # keep [CLS] + first tokens + the final special token ([SEP])
                toks = toks[: s - 1] + toks[-1:]
                log.warning(
                    "prompt %d is too long: %d token(s) dropped (max length %d): %r",
                    i,
                    extra,
                    s,
                    prompts[i][:40],
                )
            dropped.append(extra)
            ids[i, : len(toks)] = toks
            mask[i, : len(toks)] = 1
        return EncodedPrompts(ids, mask, dropped)

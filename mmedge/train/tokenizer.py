"""Trains the text tokenizer (a Hugging Face ``tokenizers`` BPE) on the captions.

The saved ``tokenizer.json`` carries its own normaliser, pre-tokeniser, a
post-processor that prepends ``[CLS]`` (so every text, even an empty one, has a
token to pool) and truncation, so the runtime and ports read nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, MASK_ID = 0, 1, 2, 3


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int, out: Path) -> Tokenizer:
    """Fit a BPE tokenizer on ``texts`` and save it to ``out`` (atomically)."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", special_tokens=[("[CLS]", CLS_ID)]
    )
    tok.enable_truncation(max_length=max_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tok.save(str(tmp))
    tmp.replace(out)
    return tok

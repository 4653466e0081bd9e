"""A word-level tokenizer for the embedded default model: one id per word of a fixed vocabulary.

The default model reads prompts of the procedural video set (:data:`dit_sparse.data.VOCABULARY`), so
a word-level vocabulary is enough and keeps the text encoder tiny. It follows T5's special-token ids
(``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), lower-cases, splits on whitespace and punctuation, and appends
``</s>``. It is a ``transformers.PreTrainedTokenizerFast``; :func:`save_word_tokenizer` writes the files
``AutoTokenizer`` / ``WanPipeline.from_pretrained`` read back, in a form that transformers 4 and 5 both load.
"""

from __future__ import annotations

import json
import pathlib

__all__ = ["SPECIAL_TOKENS", "build_word_tokenizer", "save_word_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5 / UMT5


def build_word_tokenizer(vocabulary, model_max_length: int = 512):
    """A ``PreTrainedTokenizerFast``: ids ``0..2`` for :data:`SPECIAL_TOKENS`, ``3 + i`` for ``vocabulary[i]``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(vocabulary)
    if not words or len(set(words)) != len(words):
        raise ValueError("vocabulary must be a non-empty sequence of distinct words")
    bad = [w for w in words if not isinstance(w, str) or not w.isalnum() or w != w.lower() or w in SPECIAL_TOKENS]
    if bad:
        raise ValueError(f"vocabulary words must be lower-case letters/digits only; bad words: {bad[:5]}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({w: len(SPECIAL_TOKENS) + i for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def save_word_tokenizer(tokenizer, folder) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``folder``.

    Written by hand rather than by ``save_pretrained``: transformers 5 would record its own class name
    (``TokenizersBackend``), which transformers 4 cannot load.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(tokenizer.model_max_length),
        "padding_side": "right",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

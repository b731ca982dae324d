"""Train a byte-level BPE tokenizer with `tokenizers` and wrap it as a Transformers fast tokenizer.

Byte-level BPE covers every string (no unknown token). The special tokens are ``<|endoftext|>`` (BOS and EOS, the
document separator of packed data) and ``<|pad|>``. The result is a ``PreTrainedTokenizerFast`` that
``save_pretrained`` writes as ``tokenizer.json`` + ``tokenizer_config.json`` and ``AutoTokenizer`` reloads offline.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["EOS_TOKEN", "PAD_TOKEN", "TokenizerMismatchError", "check_tokenizer_matches", "train_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_MIN_VOCAB = 256 + 2  # the byte alphabet and the two special tokens


class TokenizerMismatchError(ValueError):
    """The tokenizer cannot be used with the model (ids beyond the embedding, or special tokens missing)."""


def _batches(texts: Iterable[str] | Iterable[list[str]]) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in texts:
        if isinstance(item, str):
            batch.append(item)
            if len(batch) >= 256:
                yield batch
                batch = []
        else:
            yield list(item)
    if batch:
        yield batch


def train_tokenizer(
    texts: Iterable[str] | Iterable[list[str]] | Any,
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    model_max_length: int = 1_000_000_000,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer of ``vocab_size`` entries (special tokens included) on ``texts``.

    ``texts``: strings, batches of strings, or a ``datasets`` dataset with a ``text`` column.
    """
    if not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be an int >= {_MIN_VOCAB} (256 bytes + 2 special tokens), got {vocab_size!r}")
    if hasattr(texts, "column_names") and not isinstance(texts, (str, list)):
        from .data import iter_texts

        texts = iter_texts(texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = {"chars": 0}

    def counted():
        for batch in _batches(texts):
            seen["chars"] += sum(len(t) for t in batch)
            yield batch

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen["chars"] == 0:
        from .data import DataError

        raise DataError("cannot train a tokenizer: the training texts are empty")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )


def check_tokenizer_matches(tokenizer, config) -> None:
    """Raise :class:`TokenizerMismatchError` if ``tokenizer`` produces ids the model (``config``) cannot embed."""
    vocab = getattr(config, "vocab_size", None)
    n = len(tokenizer)
    if vocab is not None and n > vocab:
        raise TokenizerMismatchError(
            f"the tokenizer has {n} tokens but the model's vocab_size is {vocab}: token ids >= {vocab} have no "
            f"embedding. Use the tokenizer the model was trained with, or a model with vocab_size >= {n}."
        )
    if tokenizer.eos_token_id is None:
        raise TokenizerMismatchError("the tokenizer has no eos_token (needed to separate packed documents)")
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        model_id = getattr(config, name, None)
        tok_id = getattr(tokenizer, name, None)
        if isinstance(model_id, int) and tok_id is not None and model_id != tok_id:
            raise TokenizerMismatchError(
                f"the tokenizer's {name} is {tok_id} but the model's config.{name} is {model_id}: "
                "this is not the tokenizer the model was built for"
            )

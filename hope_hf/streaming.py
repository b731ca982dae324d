"""Streaming prefill: feed a long input through a HOPE model's recurrent cache, piece by piece (docs/design.md §6b)."""

from __future__ import annotations

from collections.abc import Iterable, Sized

import torch
from tqdm.auto import tqdm

from .cache_hope import HopeCache


@torch.no_grad()
def stream_prefill(
    model,
    pieces: Iterable,
    cache: HopeCache | None = None,
    progress: bool = True,
    total: int | None = None,
):
    """Feed `pieces` (an iterable of token-id sequences: lists, 1-D or (batch, length) tensors) through `model`.

    Every piece continues the state left by the previous one, so the result equals one forward over the
    concatenation, at a memory cost that does not grow with the stream (apart from full-attention layers).
    Returns `(cache, logits)`: the cache to continue from (for example with `model.generate(..., cache=cache)`,
    `past_key_values=cache` before Transformers 5.24) and the logits of the last position, shape (batch, vocab).
    The progress bar counts positions; its total (and ETA) is `total`, or the pieces' summed lengths when `pieces`
    is a list or another sized collection; a generator's bar shows the tokens done and the rate.
    """
    if cache is None:
        cache = HopeCache(model.config)
    elif not isinstance(cache, HopeCache):
        raise ValueError(f"cache must be a HopeCache (or None to start a new one), got {type(cache).__name__}")
    device = next(model.parameters()).device
    logits = None
    bar = token_bar(pieces, total, "streaming", disable=not progress)
    for piece in pieces:
        ids = as_token_ids(piece, device, "every piece")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"every piece must be a non-empty sequence of token ids, got shape {tuple(ids.shape)}")
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        bar.update(ids.shape[1])
    bar.close()
    if logits is None:
        raise ValueError("pieces was empty: nothing to stream")
    return cache, logits


def token_bar(pieces: Iterable, total: int | None, desc: str, disable: bool = False) -> tqdm:
    """A tqdm bar in tokens for streaming `pieces`: `total` if given, else :func:`count_tokens` (None for a
    generator: the bar then shows the count and rate without an ETA)."""
    if total is None:
        total = count_tokens(pieces)
    return tqdm(total=total, unit="tok", desc=desc, disable=disable)


def count_tokens(pieces: Iterable) -> int | None:
    """Summed length (last dimension) of the pieces of a sized collection; None for a generator or iterator,
    which cannot be counted without consuming it."""
    if not isinstance(pieces, Sized) or isinstance(pieces, (str, bytes)):
        return None
    total = 0
    for piece in pieces:
        if hasattr(piece, "shape"):
            total += int(piece.shape[-1]) if len(piece.shape) else 1
        elif isinstance(piece, Sized) and len(piece) and isinstance(piece[0], (list, tuple)):
            total += len(piece[0])  # a (batch, length) nested list
        elif isinstance(piece, Sized):
            total += len(piece)
        else:
            return None
    return total


def as_token_ids(ids, device=None, name: str = "the ids") -> torch.Tensor:
    """``ids`` (a list, array or tensor of token ids) as a ``torch.long`` tensor on ``device``. Float or bool values
    are refused by name rather than cast (1.7 would silently become token 1)."""
    tensor = torch.as_tensor(ids, device=device)
    if tensor.numel() == 0:
        return tensor.long()  # the caller says what an empty sequence means
    if tensor.dtype not in (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{name} must be integer token ids; got dtype {tensor.dtype}")
    return tensor.long()


def split_into_pieces(input_ids: torch.Tensor, piece_size: int) -> list[torch.Tensor]:
    """Consecutive slices (views, no copies) of `input_ids` (batch, length) with at most `piece_size` tokens each; a
    list, so a progress bar over them knows the total."""
    if isinstance(piece_size, bool) or not isinstance(piece_size, int) or piece_size < 1:
        raise ValueError(f"piece_size must be an int >= 1, got {piece_size!r}")
    return [input_ids[..., start : start + piece_size] for start in range(0, input_ids.shape[-1], piece_size)]

"""What `HopeModel` checks of its inputs, and how it keeps non-finite values where exact arithmetic puts them.

Model code (copied next to the weights by `save_pretrained`): imports only torch and transformers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


# ---------------------------------------------------------------------------------------------------- caches continued
def _cache_rows(cache: Cache) -> int | None:
    """How many sequences a cache holds (None before its first forward)."""
    for layer in cache.layers:
        state = getattr(layer, "state", None)  # a Titans layer's TitansState
        keys = getattr(layer, "keys", None)  # an attention layer's keys
        if state is not None:
            return state.batch_size
        if isinstance(keys, torch.Tensor) and keys.dim() == 4:
            return keys.shape[0]
    return None


def _check_cache_rows(cache: Cache | None, batch_size: int) -> None:
    """A cache continued with another number of rows: say so, rather than fail inside a layer."""
    rows = _cache_rows(cache) if cache is not None else None
    if rows is None or rows == batch_size:
        return
    hint = ""
    if batch_size % rows == 0:
        hint = (
            f" `generate` with num_beams or num_return_sequences > 1 repeats every input row but not a cache that "
            f"you pass: repeat its rows first, `cache.batch_repeat_interleave({batch_size // rows})`."
        )
    raise ValueError(f"the cache holds {rows} sequences but the input has {batch_size} rows.{hint}")


def _check_continued_cache(cache: Cache | None, inputs_embeds: torch.Tensor) -> None:
    """The cache continued by a forward of `inputs_embeds`: as many rows, a warning if it holds non-finite values, and
    at least one new token."""
    _check_cache_rows(cache, inputs_embeds.shape[0])
    if cache is not None and getattr(cache, "_hope_non_finite", None):
        _warn_non_finite("continuing from a cache that holds non-finite values "
                         f"({cache._hope_non_finite}): the outputs of those rows are NaN; start a new "
                         "HopeCache for them")
    if inputs_embeds.shape[1] == 0:
        raise ValueError(
            "no input tokens: when continuing from a cache (e.g. in `generate`), pass ids that include at least "
            "one token the cache has not seen yet"
        )


# ---------------------------------------------------------------------------------------------------- input checks
# Checked once, at the model's entry, each error naming the argument and what it allows. Shapes and dtypes cost
# nothing. Values (ids inside the vocabulary, a padding mask with a token to process, labels) need the tensor's
# contents: they are read from tensors on the CPU always, and from tensors on an accelerator only for inputs of more
# than one token (prompts, training batches: one `aminmax` each, one host sync), never in a one-token decoding step
# (the hot path of `generate`, left as fast as Llama's), nor while `torch.compile` traces or a CUDA graph captures.
_ID_DTYPES = (torch.long, torch.int32)


def _reads_values(t: torch.Tensor, seq_len: int) -> bool:
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return seq_len > 1


def _check_ids(name: str, ids, vocab_size: int, *, ignore_index: int | None = None) -> None:
    """`ids` a 2-D (batch, length) tensor of integer ids in [0, vocab_size) (or `ignore_index`)."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(
            f"`{name}` must be a torch tensor of token ids, shape (batch, length); got {type(ids).__name__}"
        )
    if ids.dtype not in _ID_DTYPES:
        raise ValueError(f"`{name}` must hold integer token ids (torch.long or torch.int32), got dtype {ids.dtype}")
    if ids.dim() != 2:
        hint = f" (one sequence: `{name}[None]`)" if ids.dim() == 1 else ""
        raise ValueError(f"`{name}` must be 2-D, (batch, length); got shape {tuple(ids.shape)}{hint}")
    if ids.shape[0] == 0:
        raise ValueError(f"`{name}` holds no sequence (batch size 0)")
    if ids.numel() and _reads_values(ids, ids.shape[1]):
        valid = ids if ignore_index is None else ids.masked_fill(ids == ignore_index, 0)
        low, high = (int(v) for v in torch.aminmax(valid))
        if low < 0 or high >= vocab_size:
            extra = f" or {ignore_index}" if ignore_index is not None else ""
            raise ValueError(f"`{name}` must hold ids in [0, vocab_size={vocab_size}){extra}; got ids from {low} to "
                             f"{high}")


def _check_model_inputs(config, input_ids, inputs_embeds, attention_mask, position_ids, past_seen: int) -> None:
    """The shapes, dtypes and (see above) values of what `HopeModel.forward` is given."""
    if input_ids is not None:
        _check_ids("input_ids", input_ids, config.vocab_size)
        bsz, seq_len = input_ids.shape
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
            raise ValueError("`inputs_embeds` must be a floating-point tensor (batch, length, hidden_size); got "
                             f"{getattr(inputs_embeds, 'dtype', type(inputs_embeds).__name__)}")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(f"`inputs_embeds` must have shape (batch, length, hidden_size={config.hidden_size}); got "
                             f"{tuple(inputs_embeds.shape)}")
        if inputs_embeds.shape[0] == 0:
            raise ValueError("`inputs_embeds` holds no sequence (batch size 0)")
        bsz, seq_len = inputs_embeds.shape[:2]
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        expected = past_seen + seq_len
        if attention_mask.shape != (bsz, expected):
            raise ValueError(
                f"`attention_mask` must have shape (batch={bsz}, length={expected}): one column per token "
                + (f"the cache has seen ({past_seen}) and per new token ({seq_len})" if past_seen else "of the input")
                + f"; got {tuple(attention_mask.shape)}"
            )
        if attention_mask.is_floating_point() and seq_len and _reads_values(attention_mask, seq_len):
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("`attention_mask` (the 2-D padding mask) must hold 1 for tokens and 0 for padding")
        if seq_len and _reads_values(attention_mask, seq_len) and not bool(attention_mask[:, -seq_len:].any()):
            raise ValueError("`attention_mask` marks every new position as padding (all zeros): there is no token to "
                             "process; leave such a batch out")
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in _ID_DTYPES + (torch.int16,):
            raise ValueError(f"`position_ids` must be an integer tensor (batch, length); got "
                             f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}")
        if position_ids.dim() != 2 or position_ids.shape[0] not in (1, bsz) or position_ids.shape[1] != seq_len:
            raise ValueError(f"`position_ids` must have shape (batch={bsz} or 1, length={seq_len}); got "
                             f"{tuple(position_ids.shape)}")


def _check_logits_to_keep(logits_to_keep) -> None:
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1 or logits_to_keep.dtype not in _ID_DTYPES:
            raise ValueError("`logits_to_keep` as a tensor must be a 1-D tensor of positions (integers); got "
                             f"shape {tuple(logits_to_keep.shape)}, dtype {logits_to_keep.dtype}")
    elif not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
        raise ValueError(f"`logits_to_keep` must be an int >= 0 (the last n positions; 0 keeps all) or a 1-D tensor of "
                         f"positions; got {logits_to_keep!r}")


# ---------------------------------------------------------------------------------------------------- non-finite values
class NonFiniteWarning(UserWarning):
    """NaN or inf entered a HOPE model (its inputs, a memory state, a cache). Silence it with
    `warnings.filterwarnings("ignore", category=NonFiniteWarning)`, or make it an error with
    `warnings.simplefilter("error", NonFiniteWarning)`."""


def _warn_non_finite(message: str) -> None:
    import warnings

    warnings.warn(message, NonFiniteWarning, stacklevel=4)


def _poisoned_positions(bad: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(batch, length) True at a bad token and at every later position of its document (a document ends where the
    next one starts, `starts`): what a NaN at a position reaches in exact arithmetic, and nothing earlier."""
    bad = bad.long()
    count = bad.cumsum(1)
    before_document = torch.where(starts, count - bad, torch.zeros_like(count)).cummax(1).values
    return count > before_document


def _poison_cache_rows(cache: Cache, rows: torch.Tensor) -> None:
    """NaN into every floating-point tensor of the cache rows `rows` (bool, (batch,)): what the exact computation
    would have left there after a non-finite input (the inputs were replaced by zeros to keep NaN out of the other
    positions and rows)."""
    nan = float("nan")

    def poison(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() == 0 or t.shape[0] != rows.numel():
            return t
        return t.masked_fill(rows.to(t.device).view(-1, *([1] * (t.dim() - 1))), nan)

    for layer in cache.layers:
        if hasattr(layer, "_map") and getattr(layer, "state", None) is not None:  # a Titans layer's TitansState
            layer._map(poison)
        else:
            for name in ("keys", "values"):
                value = getattr(layer, name, None)
                if isinstance(value, torch.Tensor) and value.dim() == 4:
                    setattr(layer, name, poison(value))


def _non_finite_state_layers(cache: Cache) -> list[int]:
    """The Titans layers of `cache` whose state holds a NaN or inf (one host sync)."""
    flags, layers = [], []
    for i, layer in enumerate(cache.layers):
        state = getattr(layer, "state", None)
        if state is None or not hasattr(state, "tensors"):
            continue
        tensors = [t for t in state.tensors().values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if tensors:
            flags.append(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
            layers.append(i)
    if not flags:
        return []
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    return [i for i, ok in zip(layers, finite) if not ok]


def _contain_non_finite(inputs_embeds, attention_mask, position_ids):
    """Keep a NaN or inf of `inputs_embeds` out of every position it does not reach in exact arithmetic (the
    earlier ones, other rows and documents): such tokens go in as zeros, and `_poison_outputs` puts NaN back where the
    exact computation has it. Returns the embeddings and the positions to poison (None: all finite)."""
    finite = torch.isfinite(inputs_embeds).all(-1)
    if bool(finite.all()):
        return inputs_embeds, None
    seq_len = inputs_embeds.shape[1]
    real = torch.ones_like(finite)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        real = attention_mask[:, -seq_len:].to(finite.device) != 0
    starts = real & (position_ids.to(finite.device) == 0).expand_as(real)
    bad = ~finite & real  # padding may hold anything: it is masked out, not poisoned
    rows, cols = bad.nonzero(as_tuple=True)
    if rows.numel():
        shown = ", ".join(f"row {r} position {c}" for r, c in zip(rows[:3].tolist(), cols[:3].tolist()))
        _warn_non_finite(f"`inputs_embeds` holds non-finite values (NaN/inf) at {shown}"
                         + (f" and {rows.numel() - 3} more" if rows.numel() > 3 else "")
                         + ": the outputs from there to the end of the document are NaN, the earlier ones are "
                         "not affected; a cache continued from such a row holds NaN")
    poisoned = _poisoned_positions(bad, starts)
    last_real = real & (real.long().cumsum(1) == real.long().sum(1, keepdim=True))
    rows = (poisoned & last_real).any(1)  # the cache continues each row's last document
    return torch.where(finite.unsqueeze(-1), inputs_embeds, 0), (poisoned & real, rows)

def _poison_outputs(hidden_states, poisoned, cache):
    """NaN at the poisoned positions, and in the cache rows whose last real token is one of them."""
    poisoned, rows = poisoned
    hidden_states = hidden_states.masked_fill(poisoned.unsqueeze(-1), float("nan"))
    if cache is not None:
        if bool(rows.any()):
            _poison_cache_rows(cache, rows)
            cache._hope_non_finite = f"rows {rows.nonzero().flatten().tolist()}, from non-finite `inputs_embeds`"
    return hidden_states

def _report_non_finite_state(hidden_states: torch.Tensor, cache) -> None:
    """Warn where a non-finite memory state first appears (the inputs were finite: the weights overflow or are not
    finite), once per cache. The states are scanned only once the outputs (a few KB, not the states' MBs) show a
    non-finite value."""
    if getattr(cache, "_hope_non_finite", None) or not _reads_values(hidden_states, hidden_states.shape[1]):
        return
    if bool(torch.isfinite(hidden_states).all()):
        return
    layers = _non_finite_state_layers(cache)
    if layers:
        cache._hope_non_finite = f"the memory state of layer(s) {layers}"
        _warn_non_finite(f"non-finite values (NaN/inf) appeared in the memory state of layer(s) {layers} in this "
                         "forward, from finite inputs: the weights overflow in this dtype or are not finite; "
                         "every later output continued from this cache is NaN")

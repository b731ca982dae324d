"""HopeCache: the recurrent cache of a HOPE model (docs/design.md §6b).

Per layer it holds what the next token needs and nothing that grows with the context for recurrent layers:
- self-modifying Titans layers: the snapshot and current fast weights of every memory, the position inside the
  current chunk and the convolution tails (`TitansState`);
- attention layers: keys and values (all of them for full attention, the last `sliding_window - 1` for sliding).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from .memory_hope import TitansState


class HopeTitansCacheLayer:
    """Cache slot of one self-modifying Titans layer: a `TitansState` and the number of positions it has seen."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self):
        self.state: TitansState | None = None
        self.seen_tokens = 0

    def __repr__(self):
        return f"{type(self).__name__}(seen_tokens={self.seen_tokens})"

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def batch_size(self) -> int:
        if self.state is None:
            raise AttributeError("batch_size is unknown before the first forward")
        return self.state.batch_size

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None
        self.seen_tokens = 0

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = self.state.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device)])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "HopeCache cannot be cropped: a self-modifying memory has absorbed every token it saw and cannot forget "
            "a suffix. Keep a copy of the cache (copy.deepcopy) before the tokens you may want to undo."
        )

    def offload(self) -> None:
        """Recurrent state is small and needed at every step: it stays where it is."""

    def prefetch(self) -> None:
        """Recurrent state is small and needed at every step: it stays where it is."""

    def nbytes(self) -> int:
        if self.state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.state.tensors().values())


class HopeCache(Cache):
    """The cache `generate` builds for HOPE models; usable by hand too:

    ```python
    cache = HopeCache(model.config)
    out = model(input_ids, past_key_values=cache, use_cache=True)  # the cache now holds every layer's state
    ```
    It cannot be cropped (`crop` raises) and reorders, repeats and selects batch rows for beam search.
    """

    def __init__(self, config, **kwargs):
        layers = []
        for layer_type in config.layer_types:
            if layer_type == "linear_attention":
                layers.append(HopeTitansCacheLayer())
            elif layer_type == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=config.sliding_window))
            else:
                layers.append(DynamicLayer())
        super().__init__(layers=layers)

    # -- Titans state ----------------------------------------------------------------------------------------
    def _titans_layer(self, layer_idx: int) -> HopeTitansCacheLayer:
        layer = self.layers[layer_idx]
        if not isinstance(layer, HopeTitansCacheLayer):
            raise ValueError(f"layer {layer_idx} of this cache is an attention layer, "
                             "not a self-modifying Titans layer")
        return layer

    def get_titans_state(self, layer_idx: int) -> TitansState | None:
        return self._titans_layer(layer_idx).state

    def set_titans_state(self, layer_idx: int, state: TitansState, num_new_tokens: int) -> None:
        layer = self._titans_layer(layer_idx)
        layer.state = state
        layer.seen_tokens += num_new_tokens

    # -- lengths and masks -----------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def _attention_layer_for(self, layer_idx: int) -> int | None:
        """The attention layer whose KV sizes define the mask of `layer_idx` (itself if it is one)."""
        if not isinstance(self.layers[layer_idx], HopeTitansCacheLayer):
            return layer_idx
        kv = [i for i, layer in enumerate(self.layers) if not isinstance(layer, HopeTitansCacheLayer)]
        full = [i for i in kv if not getattr(self.layers[i], "is_sliding", False)]
        return (full or kv or [None])[0]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        target = self._attention_layer_for(layer_idx)
        if target is None:
            return self.get_seq_length(layer_idx) + query_length, 0
        return self.layers[target].get_mask_sizes(query_length)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        target = self._attention_layer_for(layer_idx)
        return self.get_seq_length(layer_idx if target is None else target)

    # -- what a recurrent cache cannot do --------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("HopeCache cannot be cropped: the recurrent memories cannot forget a suffix of the tokens.")

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    # -- size ------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by the cache: every fast-weight state and every cached key and value."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, HopeTitansCacheLayer):
                total += layer.nbytes()
            else:
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
        return total

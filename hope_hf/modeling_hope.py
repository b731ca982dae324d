"""HOPE as a Transformers 5 causal language model (paper arXiv 2512.24695 §8; docs/design.md §4).

`embed -> [HopeDecoderLayer] x N -> RMSNorm -> lm_head`. A decoder layer is a pre-norm mixer residual followed by the
Continuum Memory System (CMS):

    h = x + Mixer(RMSNorm(x))                                   # self-modifying Titans or attention (RoPE)
    y = h ; for level l:  y = y + MLP_l(RMSNorm_l(y))            # cms_variant="sequential" (paper Eq. 70/73)
    y = h + sum_l w_l * MLP_l(RMSNorm_l(h))                       # cms_variant="independent" (paper Eq. 74)

Module names follow Llama (`model.embed_tokens`, `model.layers.{i}`, `model.norm`, `lm_head`, see
docs/interfaces.md). This file is model code: it imports only torch, transformers and flat siblings, because
`save_pretrained` of a model registered for the Auto classes copies it next to the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple, logging

from .configuration_hope import HopeConfig
from .cache_hope import HopeCache
from .memory_hope import CausalConv, HopeSelfModifyingTitans, _FastInit


logger = logging.get_logger(__name__)

__all__ = [
    "NonFiniteWarning",
    "HopeRMSNorm",
    "HopeRotaryEmbedding",
    "HopeAttention",
    "HopeMLP",
    "HopeCMS",
    "HopeDecoderLayer",
    "HopePreTrainedModel",
    "HopeModel",
    "HopeForCausalLM",
    "HOPE_AUTO_MAP",
]

# `config.json` `auto_map` of a saved HOPE folder: which class each Auto class loads with `trust_remote_code=True`.
HOPE_AUTO_MAP = {
    "AutoConfig": "configuration_hope.HopeConfig",
    "AutoModel": "modeling_hope.HopeModel",
    "AutoModelForCausalLM": "modeling_hope.HopeForCausalLM",
}


def _cache_field(output_cls) -> str:
    """Transformers renamed the cache field of model outputs from `past_key_values` (<= 5.2x) to `cache` (5.24)."""
    names = {f.name for f in fields(output_cls)}
    return "cache" if "cache" in names else "past_key_values"


_MODEL_CACHE_FIELD = _cache_field(BaseModelOutputWithPast)
_LM_CACHE_FIELD = _cache_field(CausalLMOutputWithPast)
# `generate` keeps the cache in its model kwargs under the same name as the output field
_GENERATE_CACHE_KWARG = _LM_CACHE_FIELD


def _pick_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """`generate` passes the cache as `cache=` from Transformers 5.24 on and as `past_key_values=` before."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("Pass the cache once, as `past_key_values` or as `cache`, not both.")
    return past_key_values if past_key_values is not None else cache


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


# ---------------------------------------------------------------------------------------------------- building blocks
class HopeRMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 (float64 for a float64 model) and cast back."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class HopeRotaryEmbedding(nn.Module):
    """Rotary position embedding of the attention layers, driven by `config.rope_parameters` (Transformers' RoPE
    machinery: every `rope_type` in `ROPE_INIT_FUNCTIONS` works, `"default"` is plain RoPE with `rope_theta`)."""

    inv_freq: torch.Tensor

    def __init__(self, config: HopeConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type == "default":
            inv_freq, self.attention_scaling = self.compute_default_rope_parameters(config)
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: HopeConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """inv_freq_i = theta^(-2i/d), i = 0 .. d/2 - 1."""
        theta = float(config.rope_parameters["rope_theta"])
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        return 1.0 / (theta**exponents), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[:, :, None].float() * self.inv_freq[None, None, :].to(x.device, torch.float)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, d): both halves rotate by the same angles
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotate q and k (B, heads, T, d) by the angles of cos/sin (B, T, d)."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv_heads, T, d) -> (B, kv_heads * groups, T, d), each kv head repeated for its query group."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scaling + mask) v in plain torch; the mask is additive (0 / -inf) as built by masking_utils."""
    key = _expand_kv(key, module.num_key_value_groups)
    value = _expand_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, T, heads, d)
    return out, probs


class HopeAttention(nn.Module):
    """Softmax attention mixer ("full_attention" or "sliding_attention") with RoPE and grouped-query heads; the
    kernel comes from Transformers' attention interface (`config._attn_implementation`: "sdpa", "eager", ...)."""

    def __init__(self, config: HopeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = float(config.attention_dropout)
        self.is_causal = True
        self.sliding_window = (
            config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        )
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, seq_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        attention_fn: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_fn(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        out = self.o_proj(out.reshape(bsz, seq_len, -1).contiguous())
        return out, weights


class HopeMLP(nn.Module):
    """One CMS level: a SwiGLU MLP shaped exactly like Llama's, down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HopeCMS(nn.Module):
    """Continuum Memory System: K SwiGLU levels, each with its own pre-norm (paper Eq. 70-74; docs/design.md §4).

    The forward pass is the same for every period; the period of level l (`config.cms_levels[l]["period"]`) only
    decides how often its parameters are updated (by the training / stream-learning code, not here).
    """

    def __init__(self, config: HopeConfig):
        super().__init__()
        self.variant = config.cms_variant
        self.periods = config.cms_periods
        self.norms = nn.ModuleList(
            [HopeRMSNorm(config.hidden_size, eps=config.rms_norm_eps) for _ in config.cms_levels]
        )
        self.levels = nn.ModuleList(
            [HopeMLP(config.hidden_size, level["intermediate_size"]) for level in config.cms_levels]
        )
        if self.variant == "independent":
            # learned aggregation weights (Eq. 74); initialised to 1 so one level equals the sequential chain
            self.level_weights = nn.Parameter(torch.ones(len(config.cms_levels)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.variant == "sequential":
            y = hidden_states
            for norm, mlp in zip(self.norms, self.levels):
                y = y + mlp(norm(y))
            return y
        y = hidden_states
        for i, (norm, mlp) in enumerate(zip(self.norms, self.levels)):
            y = y + self.level_weights[i].to(hidden_states.dtype) * mlp(norm(hidden_states))
        return y


class HopeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm mixer residual, then the CMS chain (paper Eq. 94-97; docs/design.md §4)."""

    def __init__(self, config: HopeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = HopeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.layer_type == "linear_attention":
            self.titans = HopeSelfModifyingTitans(config, layer_idx)
        else:
            self.self_attn = HopeAttention(config, layer_idx)
        self.cms = HopeCMS(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`attention_mask` is this layer's mask: a 4-D/boolean attention mask for attention layers, the 2-D padding
        mask (B, L), 1 = real token, for Titans layers (docs/interfaces.md)."""
        normed = self.input_layernorm(hidden_states)
        if self.layer_type == "linear_attention":
            mixed = self.titans(
                normed, attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values
            )
        else:
            mixed, _ = self.self_attn(
                normed,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                **kwargs,
            )
        return self.cms(hidden_states + mixed)


# ---------------------------------------------------------------------------------------------------- models
class HopePreTrainedModel(PreTrainedModel):
    config_class = HopeConfig
    config: HopeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HopeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    # a recurrent memory cannot be rolled back: no assisted / speculative decoding
    _is_stateful = True
    # the meta-learned initial states and gate readouts of the memories stay float32 under bf16/fp16 loading
    _keep_in_fp32_modules_strict = ["fast_init"]

    def __init__(self, config: HopeConfig, *inputs, **kwargs):
        # a config changed by assignment after it was built (`config.num_hidden_layers = 1`) is checked here, with
        # the same messages as at construction, rather than failing deep inside the model or at save time
        config.validate()
        super().__init__(config, *inputs, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        # each module initialises its own parameters: Transformers skips a module whose own parameters were all
        # loaded, so a Titans layer with a loaded `out_norm_weight` is not called for a fast_init or conv weight
        # that a checkpoint lacks (or that `ignore_mismatched_sizes` dropped)
        if isinstance(module, _FastInit):
            module.init_weights()
        elif isinstance(module, CausalConv):
            module.init_weights(self.config.initializer_range)
        elif isinstance(module, HopeSelfModifyingTitans):
            init.ones_(module.out_norm_weight)
        elif isinstance(module, HopeCMS) and hasattr(module, "level_weights"):
            init.ones_(module.level_weights)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `save_pretrained` puts only the saved class in `auto_map`; with the code registered for the Auto classes
        # (`import hope_hf` does it, as does a `trust_remote_code` load) record all three, so that AutoConfig,
        # AutoModel and AutoModelForCausalLM each load the folder with `trust_remote_code=True`.
        if type(self)._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **HOPE_AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):
        # Transformers < 5.2x only knows the (later deprecated) gradient_checkpointing_* names; give one API.
        def activation_checkpointing_enable(
            self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
        ):
            """Checkpoint the activations of every decoder layer (alias of `gradient_checkpointing_enable`)."""
            if activation_checkpointing_kwargs is None:
                activation_checkpointing_kwargs = {"use_reentrant": False}
            return self.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=activation_checkpointing_kwargs,
                every_n_layers=every_n_layers,
                offload=offload,
            )

        def activation_checkpointing_disable(self):
            """Turn activation checkpointing off (alias of `gradient_checkpointing_disable`)."""
            return self.gradient_checkpointing_disable()


class HopeModel(HopePreTrainedModel):
    """The HOPE decoder stack without the LM head; returns the last hidden state (after the final RMSNorm)."""

    def __init__(self, config: HopeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([HopeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = HopeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = HopeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def _layer_masks(self, attention_mask, inputs_embeds, past_key_values, position_ids) -> dict:
        """One mask per layer type. A dict passed in (as `generate` does with compileable caches) is used as is."""
        if isinstance(attention_mask, dict):
            return attention_mask
        types = set(self.config.layer_types)
        masks = {}
        # Transformers finds the documents of a packed batch (position ids restarting at 0) only when there is no
        # mask and no cache. A cache that has seen nothing gives the mask sizes that no cache gives, so leave it
        # out then: an eval-mode forward (which builds a cache) separates packed documents as training does.
        mask_cache = past_key_values
        if attention_mask is None and past_key_values is not None and past_key_values.get_seq_length() == 0:
            mask_cache = None
        # positional 4th argument: named `past_key_values` up to Transformers 5.2x and `cache` in 5.24
        if "full_attention" in types:
            masks["full_attention"] = create_causal_mask(
                self.config, inputs_embeds, attention_mask, mask_cache, position_ids
            )
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(
                self.config, inputs_embeds, attention_mask, mask_cache, position_ids
            )
        if "linear_attention" in types:
            if attention_mask is not None and attention_mask.ndim != 2:
                raise ValueError(
                    "`attention_mask` must be the 2-D padding mask (batch, length), 1 = real token, 0 = padding, in a "
                    f"model with Titans layers (their memories must skip the padding); got a {attention_mask.ndim}-D "
                    "mask. Pass the 2-D mask: attention layers build their causal masks from it."
                )
            masks["linear_attention"] = attention_mask
        return masks

    @staticmethod
    def _contain_non_finite(inputs_embeds, attention_mask, position_ids):
        """Keep a NaN or inf of `inputs_embeds` out of every position it does not reach in exact arithmetic (the
        earlier ones, other rows and documents): such tokens go in as zeros, and `_poison` puts NaN back where the
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

    @staticmethod
    def _poison(hidden_states, poisoned, cache):
        """NaN at the poisoned positions, and in the cache rows whose last real token is one of them."""
        poisoned, rows = poisoned
        hidden_states = hidden_states.masked_fill(poisoned.unsqueeze(-1), float("nan"))
        if cache is not None:
            if bool(rows.any()):
                _poison_cache_rows(cache, rows)
                cache._hope_non_finite = f"rows {rows.nonzero().flatten().tolist()}, from non-finite `inputs_embeds`"
        return hidden_states

    @staticmethod
    def _report_non_finite_state(cache) -> None:
        """Warn where a non-finite memory state first appears (the inputs were finite: the weights overflow or are
        not finite), once per cache."""
        layers = _non_finite_state_layers(cache)
        if layers:
            cache._hope_non_finite = f"the memory state of layer(s) {layers}"
            _warn_non_finite(f"non-finite values (NaN/inf) appeared in the memory state of layer(s) {layers} in this "
                             "forward, from finite inputs: the weights overflow in this dtype or are not finite; "
                             "every later output continued from this cache is NaN")

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        past_key_values = _pick_cache(past_key_values, cache)
        if not (past_key_values is None or isinstance(past_key_values, HopeCache) or self.config.is_attention_only):
            raise ValueError(
                f"The cache of a model with Titans layers must be a `HopeCache` (the memories' fast weights live "
                f"there), got {type(past_key_values).__name__}. Leave it out (one is built) or pass "
                "`HopeCache(model.config)`."
            )
        _check_model_inputs(self.config, input_ids, inputs_embeds, attention_mask, position_ids,
                            past_key_values.get_seq_length() if past_key_values is not None else 0)
        output_attentions = kwargs.pop("output_attentions", None)
        if output_attentions if output_attentions is not None else getattr(self.config, "output_attentions", False):
            raise ValueError(
                "`output_attentions=True` is not supported by HOPE models: Titans layers have no attention weights, "
                "and attention layers do not return theirs. Leave it False."
            )
        if use_cache is None:
            # in training a cache is only built when asked for: nobody decodes from it, and it would keep the final
            # fast-weight states (and their autograd graph) alive after the step
            use_cache = self.config.use_cache and not self.training
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))

        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # the checkpointed layers run twice (forward and backward recompute): a cache would be written twice
            if use_cache or past_key_values is not None:
                logger.warning_once("Activation checkpointing is on in training: running without a cache.")
            use_cache, past_key_values = False, None

        embeds_given = inputs_embeds is not None
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        _check_cache_rows(past_key_values, inputs_embeds.shape[0])
        if past_key_values is not None and getattr(past_key_values, "_hope_non_finite", None):
            _warn_non_finite("continuing from a cache that holds non-finite values "
                             f"({past_key_values._hope_non_finite}): the outputs of those rows are NaN; start a new "
                             "HopeCache for them")
        if inputs_embeds.shape[1] == 0:
            raise ValueError(
                "no input tokens: when continuing from a cache (e.g. in `generate`), pass ids that include at least "
                "one token the cache has not seen yet"
            )

        if use_cache and past_key_values is None:
            past_key_values = HopeCache(self.config)

        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0).expand(inputs_embeds.shape[0], -1)

        masks = self._layer_masks(attention_mask, inputs_embeds, past_key_values, position_ids)
        poisoned = None
        if embeds_given and _reads_values(inputs_embeds, inputs_embeds.shape[1]):
            inputs_embeds, poisoned = self._contain_non_finite(inputs_embeds, attention_mask, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = None
        if any(t != "linear_attention" for t in self.config.layer_types):
            position_embeddings = self.rotary_emb(hidden_states, position_ids)

        all_hidden_states = () if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                attention_mask=masks.get(self.config.layer_types[i]),
                position_ids=position_ids,
                past_key_values=past_key_values,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if poisoned is not None:
            hidden_states = self._poison(hidden_states, poisoned, past_key_values)
        elif past_key_values is not None and use_cache and not self.training and not getattr(
            past_key_values, "_hope_non_finite", None
        ) and _reads_values(hidden_states, hidden_states.shape[1]) and not bool(torch.isfinite(hidden_states).all()):
            # the states are scanned only once the outputs (a few KB, not the states' MBs) show a non-finite value
            self._report_non_finite_state(past_key_values)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **{_MODEL_CACHE_FIELD: past_key_values},
        )


class HopeForCausalLM(HopePreTrainedModel, GenerationMixin):
    """HOPE with a language-modeling head (tied to the input embedding by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HopeConfig):
        super().__init__(config)
        self.model = HopeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def generate(self, inputs=None, *args, **kwargs):
        """`GenerationMixin.generate`, after one check of a cache passed in: the prompt (`inputs` / `input_ids`, or
        `inputs_embeds`) must go beyond what the cache has seen, since `generate` feeds the part it has not. A
        prompt no longer than the cache's tokens would otherwise be fed again in full."""
        cache = _pick_cache(kwargs.get("past_key_values"), kwargs.get("cache"))
        prompt = kwargs.get("inputs_embeds")
        if prompt is None:
            prompt = inputs if inputs is not None else kwargs.get("input_ids")
            if prompt is not None:  # the whole prompt, once per call (one host sync for its id range)
                _check_ids("input_ids", prompt, self.config.vocab_size)
        if cache is not None and isinstance(prompt, torch.Tensor) and prompt.dim() >= 2:
            seen = cache.get_seq_length()
            if 0 < seen and prompt.shape[1] <= seen:
                raise ValueError(
                    f"generate: the cache has seen {seen} tokens and the prompt holds {prompt.shape[1]}; pass the "
                    "whole sequence, with at least one token the cache has not seen (stream all but the prompt's "
                    "last token into the cache, then generate from the whole prompt)."
                )
        return super().generate(inputs, *args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate` builds a `HopeCache` (the library's caches cannot hold fast-weight state)."""
        if any(model_kwargs.get(name) is not None for name in ("cache", "past_key_values")):
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache is False:
            return None
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by HOPE models: "
                "they use their own recurrent HopeCache (leave cache_implementation unset)"
            )
        model_kwargs[_GENERATE_CACHE_KWARG] = HopeCache(self.config)
        return None

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets, not shifted (the loss shifts them); -100 marks positions without loss.
        logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
            An int n keeps the logits of the last n positions (0 keeps all); a 1-D tensor keeps those positions.
        """
        _check_logits_to_keep(logits_to_keep)
        if labels is not None:
            inputs = input_ids if input_ids is not None else inputs_embeds
            if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 and isinstance(labels, torch.Tensor) and (
                labels.shape != inputs.shape[:2]
            ):
                raise ValueError(f"`labels` must have the shape of the input (batch, length) = "
                                 f"{tuple(inputs.shape[:2])} (not shifted: the loss shifts them); got "
                                 f"{tuple(labels.shape)}")
            _check_ids("labels", labels, self.config.vocab_size, ignore_index=-100)
            if isinstance(logits_to_keep, torch.Tensor) or logits_to_keep != 0:
                raise ValueError("`labels` needs the logits of every position: leave `logits_to_keep` at 0")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_pick_cache(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            if kwargs.get("num_items_in_batch") is None:
                # the mean over the labelled tokens, as a sum divided by their count, which is at least 1: a batch
                # without any (every label -100) has loss 0 and zero gradients, not NaN (0 / 0)
                kwargs["num_items_in_batch"] = (labels[:, 1:] != -100).sum().clamp(min=1)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_LM_CACHE_FIELD: getattr(outputs, _MODEL_CACHE_FIELD)},
        )

"""The blocks of a HOPE decoder layer (paper arXiv 2512.24695 §8; docs/design.md §4): a pre-norm mixer residual
followed by the Continuum Memory System (CMS):

    h = x + Mixer(RMSNorm(x))                                   # self-modifying Titans or attention (RoPE)
    y = h ; for level l:  y = y + MLP_l(RMSNorm_l(y))            # cms_variant="sequential" (paper Eq. 70/73)
    y = h + sum_l w_l * MLP_l(RMSNorm_l(h))                       # cms_variant="independent" (paper Eq. 74)

Model code (copied next to the weights by `save_pretrained`): imports only torch, transformers and flat siblings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_hope import HopeConfig
from .memory_hope import HopeSelfModifyingTitans

__all__ = [
    "HopeRMSNorm",
    "HopeRotaryEmbedding",
    "HopeAttention",
    "HopeMLP",
    "HopeCMS",
    "HopeDecoderLayer",
]


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

"""Turn a pretrained Llama (or Mistral) causal LM into a Hope-Attention model by ad-hoc level stacking.

Paper arXiv 2512.24695 §7.3 ("ad-hoc level stacking"): every CMS level may start from a pretrained MLP. Here the
Llama MLP of each layer (with its `post_attention_layernorm`) becomes CMS level 1; extra levels start with a zero
down-projection, so they add exactly nothing until they are trained, and the converted model computes the same
logits as the original. Attention layers keep their weights ("full_attention", or "sliding_attention" where a
Mistral source uses a sliding window), and `generate` keeps the source's generation config. Design: docs/design.md §10.

Not model code: the modeling files never import this module.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .configuration_hope import HopeConfig
from .modeling_hope import HopeForCausalLM


__all__ = ["convert_llama_to_hope", "SUPPORTED_SOURCE_MODEL_TYPES"]

# Architectures whose decoder layer is exactly Llama's (same weight names and computation).
SUPPORTED_SOURCE_MODEL_TYPES = ("llama", "mistral")


def _normalise_levels(extra_cms_levels, default_width: int) -> list[dict]:
    if isinstance(extra_cms_levels, (int, dict, str)):
        raise ValueError(
            f"`extra_cms_levels` must be a list of levels (periods or dicts), got {extra_cms_levels!r}; for one "
            f"level pass [{extra_cms_levels!r}]."
        )
    levels = []
    for i, level in enumerate(extra_cms_levels or ()):
        if isinstance(level, int) and not isinstance(level, bool):
            levels.append({"period": level, "intermediate_size": default_width})
        elif isinstance(level, dict):
            levels.append({"intermediate_size": default_width, **level})
        else:
            raise ValueError(
                f"`extra_cms_levels[{i}]` must be a period (int) or a dict {{'period': int, 'intermediate_size': int}}"
                f", got {level!r}."
            )
    return levels


def _source_layer_types(cfg) -> tuple[list[str], int | None]:
    """The attention of each source layer, and the window of the sliding ones. A Llama attends fully in every layer
    whatever its config says: "llamafied" checkpoints carry a `sliding_window` (with `use_sliding_window: false`)
    that `LlamaForCausalLM` never reads."""
    if cfg.model_type == "llama":
        return ["full_attention"] * cfg.num_hidden_layers, None
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        types = list(types)
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"Cannot convert layers of type {unknown}; only full and sliding attention layers.")
        return types, window if "sliding_attention" in types else None
    if window is not None:
        return ["sliding_attention"] * cfg.num_hidden_layers, window
    return ["full_attention"] * cfg.num_hidden_layers, None


def convert_llama_to_hope(
    llama_model_or_path: PreTrainedModel | str | os.PathLike,
    extra_cms_levels: Sequence[int | dict] = (),
    base_period: int = 0,
    **config_overrides,
) -> HopeForCausalLM:
    """Convert a `LlamaForCausalLM` (or `MistralForCausalLM`) into an attention-mixer `HopeForCausalLM`.

    Args:
        llama_model_or_path: the model, or a local folder / Hub id that `AutoModelForCausalLM` loads.
        extra_cms_levels: CMS levels appended after the converted MLP, each a period in tokens (width = the Llama
            MLP's `intermediate_size`) or a dict `{"period": ..., "intermediate_size": ...}`. They start with a zero
            `down_proj` (and normally initialised gate/up projections, so that they can learn), which leaves the
            logits unchanged.
        base_period: period of CMS level 1, the converted Llama MLP. 0 (default) keeps it frozen under the
            continuum optimizer; give a period to let it adapt.
        **config_overrides: any other `HopeConfig` field (e.g. `cms_variant`, `use_cache`).

    Returns:
        The converted model, in the dtype of the source and in eval mode. It reproduces the source's logits.
    """
    if isinstance(llama_model_or_path, (str, os.PathLike)):
        source = AutoModelForCausalLM.from_pretrained(str(llama_model_or_path))
    else:
        source = llama_model_or_path
    _check_source(source.config)
    hope_config = _hope_config(source.config, extra_cms_levels, base_period, config_overrides)
    hope_config._attn_implementation = source.config._attn_implementation

    dtype = next(source.parameters()).dtype
    hope = HopeForCausalLM._from_config(hope_config, dtype=dtype)
    hope.to(next(source.parameters()).device)
    _load_source_weights(hope, source)
    # generate as the source did: its stop tokens (Llama 3 lists several), length and sampling defaults
    hope.generation_config = copy.deepcopy(source.generation_config)
    return hope.eval()


def _check_source(cfg) -> None:
    """A source model whose decoder layers a HOPE attention layer and SwiGLU CMS level reproduce exactly."""
    if cfg.model_type not in SUPPORTED_SOURCE_MODEL_TYPES:
        raise ValueError(
            f"convert_llama_to_hope expects one of {SUPPORTED_SOURCE_MODEL_TYPES}, got model_type {cfg.model_type!r}."
        )
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"CMS levels are SwiGLU MLPs; cannot convert hidden_act={cfg.hidden_act!r} (needs 'silu').")
    if getattr(cfg, "mlp_bias", False):
        raise ValueError("CMS levels have no biases; cannot convert a model with mlp_bias=True.")


def _hope_config(cfg, extra_cms_levels, base_period: int, config_overrides: dict) -> HopeConfig:
    """The config of the converted model: the source's shapes, attention, RoPE and special tokens, CMS level 1 the
    source's MLP (period `base_period`) followed by `extra_cms_levels`, then `config_overrides`."""
    layer_types, window = _source_layer_types(cfg)
    width = cfg.intermediate_size
    levels = [{"period": base_period, "intermediate_size": width}] + _normalise_levels(extra_cms_levels, width)
    rope = getattr(cfg, "rope_parameters", None)
    hope_kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        layer_types=layer_types,
        sliding_window=window,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=dict(rope) if rope else None,
        attention_bias=bool(getattr(cfg, "attention_bias", False)),
        attention_dropout=float(getattr(cfg, "attention_dropout", 0.0) or 0.0),
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        use_cache=bool(getattr(cfg, "use_cache", True)),
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        cms_levels=levels,
    )
    if rope is None and getattr(cfg, "rope_theta", None) is not None:
        hope_kwargs["rope_theta"] = float(cfg.rope_theta)
    hope_kwargs.update(config_overrides)
    return HopeConfig(**hope_kwargs)


def _load_source_weights(hope: HopeForCausalLM, source) -> None:
    """Every source weight into `hope` (the MLP and its norm as CMS level 1); the extra levels keep their fresh
    weights, with a zero `down_proj`, so that they add nothing until trained."""
    mapped = {}
    for name, tensor in source.state_dict().items():
        if name == "lm_head.weight" and hope.config.tie_word_embeddings:
            continue
        new = name.replace(".post_attention_layernorm.", ".cms.norms.0.").replace(".mlp.", ".cms.levels.0.")
        mapped[new] = tensor
    missing, unexpected = hope.load_state_dict(mapped, strict=False)
    if unexpected:
        raise ValueError(f"Source weights with no place in the HOPE model: {unexpected}")
    fresh = [
        k
        for k in missing
        if (".cms.levels." in k or ".cms.norms." in k) and ".cms.levels.0." not in k and ".cms.norms.0." not in k
        or k.endswith(".cms.level_weights")
    ]
    still_missing = sorted(set(missing) - set(fresh) - {"lm_head.weight"})
    if still_missing:
        raise ValueError(f"HOPE weights not found in the source model: {still_missing}")
    with torch.no_grad():
        for layer in hope.model.layers:
            for level in layer.cms.levels[1:]:
                level.down_proj.weight.zero_()

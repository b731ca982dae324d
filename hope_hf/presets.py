"""Named HOPE model sizes.

`get_preset(name, **overrides)` returns a `HopeConfig`. The named sizes (340m, 760m, 1.3b) are the scales of the
paper's language-modeling tables; each lies within 5% of its nominal parameter count (tests/model/test_presets.py counts
the parameters of the built model on the meta device). How the sizes, CMS levels and chunk sizes were chosen is in
docs/design.md ("Presets").

Not model code: the modeling files never import this module.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib

from .configuration_hope import HopeConfig


__all__ = ["PRESETS", "NOMINAL_PARAMETERS", "available_presets", "get_preset", "count_parameters"]

# Paper Fig. 3 ("Hope in Nested Learning"): Titans chunk 16, CMS levels updated every 16 / 1M / 16M tokens.
_LM_PERIODS = (16, 2**20, 2**24)


def _levels(periods, width):
    return [{"period": p, "intermediate_size": width} for p in periods]


PRESETS: dict[str, dict] = {
    # CPU-seconds model for demos and smoke tests; two CMS levels, the slow one at the "2K sweet spot" of the
    # paper's continual-learning runs (arXiv Fig. 7).
    "tiny": dict(
        vocab_size=32000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        chunk_size=16,
        cms_levels=_levels((16, 2048), 96),
    ),
    # One-GPU model for continual-learning / in-context experiments: three levels at 16 / 512 / 2K tokens (the
    # paper's best and "sweet spot" lowest frequencies, arXiv Fig. 7).
    "small": dict(
        vocab_size=32000,
        hidden_size=512,
        num_hidden_layers=12,
        num_attention_heads=8,
        chunk_size=16,
        cms_levels=_levels((16, 512, 2048), 384),
    ),
    # Language-modeling scales of the paper (Table 1 / arXiv Table 2). d = 64 heads, 24 layers (the depth of the
    # FLA baselines the paper compares against), CMS width chosen so that a layer holds about as many parameters
    # as a Llama layer of the same width.
    "340m": dict(
        vocab_size=32000,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        chunk_size=16,
        cms_levels=_levels(_LM_PERIODS, 768),
    ),
    "760m": dict(
        vocab_size=32000,
        hidden_size=1536,
        num_hidden_layers=24,
        num_attention_heads=24,
        chunk_size=16,
        cms_levels=_levels(_LM_PERIODS, 1280),
    ),
    "1.3b": dict(
        vocab_size=32000,
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=32,
        chunk_size=16,
        cms_levels=_levels(_LM_PERIODS, 1728),
    ),
}

NOMINAL_PARAMETERS: dict[str, int] = {"340m": 340_000_000, "760m": 760_000_000, "1.3b": 1_300_000_000}


def available_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides) -> HopeConfig:
    """The `HopeConfig` of preset `name` (case-insensitive), with any config field replaced by `overrides`.

    >>> get_preset("tiny", vocab_size=384).hidden_size
    128
    """
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; allowed presets: {', '.join(PRESETS)}.")
    check_config_fields(overrides)
    kwargs = copy.deepcopy(PRESETS[key])
    kwargs.update(overrides)
    return HopeConfig(**kwargs)


def config_field_names() -> set[str]:
    """Every name a `HopeConfig` accepts: its dataclass fields and the attributes of a default config (the generic
    `PreTrainedConfig` ones such as `output_attentions` included)."""
    default = HopeConfig()
    names = {f.name for f in dataclasses.fields(HopeConfig)} | set(getattr(default, "attribute_map", {}))
    names |= {n for n in vars(default) if not n.startswith("_")}
    properties = {n for n in dir(HopeConfig) if not n.startswith("_") and isinstance(getattr(HopeConfig, n), property)}
    return names | properties


def check_config_fields(overrides) -> None:
    """Raise ValueError naming every override that is not a `HopeConfig` field (with the closest valid name)."""
    valid = config_field_names()
    unknown = [name for name in overrides if name not in valid]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(valid), n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"unknown config field(s) {', '.join(hints)}; valid fields are those of HopeConfig")


def count_parameters(config: HopeConfig) -> int:
    """Number of parameters of `HopeForCausalLM(config)`, computed from the config alone (tied weights once).

    Per layer (D hidden, H heads of size d, m = memory_expansion * d (d for linear memories), k = conv_kernel_size):
      input RMSNorm D;
      Titans layer: q, k, v, g, o projections 5 * D * H * d; three depthwise convs 3 * k * H * d; initial states of
        the n memories (k, v, eta, alpha, o: n = 5 by default) n * 2 * d * m * H (n * d * d * H when linear);
        learning-rate readouts n * (d + 1) * H (one per memory), the retention readout (d + 1) * H; output RMSNorm d;
      attention layer: q, o: D * H * d each, k, v: D * kv_heads * d each, plus biases if `attention_bias`;
      CMS: per level 3 * D * intermediate_size + D (its RMSNorm), plus one weight per level if "independent".
    Plus the embedding V * D, the final RMSNorm D, and an untied lm_head V * D.
    """
    D, H, d = config.hidden_size, config.num_attention_heads, config.head_dim
    k, kv = config.conv_kernel_size, config.num_key_value_heads
    inner = H * d

    n_memories = 1  # the output memory
    if config.self_modifying:
        n_memories += int(config.adaptive_k) + int(config.adaptive_v) + 1 + int(config.retention)  # k, v, eta, alpha
    state = 2 * d * config.memory_expansion * d if config.memory_depth == 2 else d * d  # one memory's initial state
    titans = 5 * D * inner + 3 * k * inner + n_memories * (state + d + 1) * H + d
    if config.retention:
        titans += (d + 1) * H

    attention = 2 * D * inner + 2 * D * kv * d
    if config.attention_bias:
        attention += inner + 2 * kv * d + D

    cms = sum(3 * D * level["intermediate_size"] + D for level in config.cms_levels)
    if config.cms_variant == "independent":
        cms += len(config.cms_levels)

    total = config.vocab_size * D * (1 if config.tie_word_embeddings else 2) + D
    for layer_type in config.layer_types:
        total += D + cms + (titans if layer_type == "linear_attention" else attention)
    return total

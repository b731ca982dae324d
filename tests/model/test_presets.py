"""Presets: named sizes within 5% of their nominal parameter count, stated CMS periods and chunk sizes."""

from __future__ import annotations

import pytest
import torch

from hope_hf import HopeConfig, HopeForCausalLM
from hope_hf.presets import NOMINAL_PARAMETERS, PRESETS, available_presets, count_parameters, get_preset

from conftest import small_config


def built_parameter_count(config: HopeConfig) -> int:
    with torch.device("meta"):
        model = HopeForCausalLM(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once


def test_available_presets():
    assert available_presets() == ["tiny", "small", "340m", "760m", "1.3b"]


@pytest.mark.parametrize("name", ["340m", "760m", "1.3b"])
def test_named_sizes_are_within_five_percent(name):
    config = get_preset(name)
    assert config.vocab_size == 32000
    built = built_parameter_count(config)
    assert built == count_parameters(config)
    nominal = NOMINAL_PARAMETERS[name]
    assert abs(built - nominal) / nominal < 0.05, f"{name}: {built:,} parameters"


def test_preset_parameter_counts_are_pinned():
    # pinned so that any change to the architecture or a preset is a visible decision (docs/design.md table)
    assert {name: count_parameters(get_preset(name)) for name in PRESETS} == {
        "tiny": 4_453_872,
        "small": 55_449_408,
        "340m": 336_876_288,
        "760m": 769_554_816,
        "1.3b": 1_350_082_560,
    }


def test_cms_periods_and_chunk_sizes():
    lm = [16, 2**20, 2**24]
    assert get_preset("340m").cms_periods == lm
    assert get_preset("760m").cms_periods == lm
    assert get_preset("1.3b").cms_periods == lm
    assert get_preset("small").cms_periods == [16, 512, 2048]
    assert get_preset("tiny").cms_periods == [16, 2048]
    assert {get_preset(name).chunk_size for name in PRESETS} == {16}
    assert all(get_preset(name).layer_types == ["linear_attention"] * get_preset(name).num_hidden_layers
               for name in PRESETS)
    # the 340m preset is the default HopeConfig
    assert get_preset("340m").to_dict() == HopeConfig().to_dict()


def test_overrides_and_case():
    config = get_preset("TINY", vocab_size=384, chunk_size=8, num_hidden_layers=3)
    assert (config.vocab_size, config.chunk_size, config.num_hidden_layers) == (384, 8, 3)
    assert len(config.layer_types) == 3 and config.hidden_size == 128
    assert get_preset("tiny").vocab_size == 32000  # the preset table itself is unchanged


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"Unknown preset '7b'; allowed presets: tiny, small, 340m, 760m, 1\.3b"):
        get_preset("7b")


def test_bad_override_is_a_config_value_error():
    with pytest.raises(ValueError, match="chunk_size"):
        get_preset("tiny", chunk_size=0)


def test_unknown_override_field_is_an_error_naming_the_closest_field():
    with pytest.raises(ValueError, match=r"unknown config field\(s\) 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        get_preset("tiny", hiden_size=32)
    # the generic PreTrainedConfig fields are config fields too
    config = get_preset("tiny", output_hidden_states=True, tie_word_embeddings=True, bos_token_id=3)
    assert config.output_hidden_states and config.tie_word_embeddings and config.bos_token_id == 3


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"self_modifying": False},
        {"retention": False},
        {"adaptive_k": False},
        {"adaptive_v": False, "retention": False},
        {"cms_variant": "independent", "tie_word_embeddings": False},
        {"layer_types": ["full_attention", "sliding_attention"], "num_key_value_heads": 2, "attention_bias": True},
        {"layer_types": ["linear_attention", "full_attention"], "head_dim": 12, "memory_expansion": 3},
    ],
)
def test_count_parameters_matches_the_built_model(overrides):
    config = small_config("linear", **overrides)
    assert count_parameters(config) == built_parameter_count(config)


def test_tiny_runs_in_cpu_seconds():
    import time

    model = HopeForCausalLM(get_preset("tiny")).eval()
    ids = torch.randint(0, 32000, (2, 64))
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 64, 32000) and torch.isfinite(logits).all()
    assert time.perf_counter() - start < 30

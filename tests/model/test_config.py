"""HopeConfig: defaults, registration, serialisation, RoPE parameters and every invalid value."""

from __future__ import annotations

import json

import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from hope_hf import HopeConfig, HopeConfigError
from hope_hf.configuration_hope import CMS_VARIANTS, HOPE_LAYER_TYPES, default_cms_levels

from conftest import small_config


# model_type strings registered by flash-linear-attention (fla-org/flash-linear-attention, fla/models/*/
# configuration_*.py, read through the code search of this project, commits 0315a70 / 20ceee5 / 082d92b / b9d1188 /
# efb8342), plus the fla-based HoPE model of sustcsonglin/hope-fla (fla/models/hope/configuration_hope.py:
# model_type = 'hope') and NVIDIA NeMo's Titans ("titans").
FLA_MODEL_TYPES = {
    "abc", "bitnet", "comba", "delta_net", "deltaformer", "forgetting_transformer", "gated_deltanet",
    "gated_deltaproduct", "gla", "gsa", "hgrn", "hgrn2", "kda", "lightnet", "linear_attn", "log_linear_mamba2",
    "mamba", "mamba2", "mesa_net", "mla", "mom", "nsa", "path_attn", "retnet", "rodimus", "rwkv6", "rwkv7", "samba",
    "stickbreaking_attn", "transformer",
}
OTHER_TAKEN = {"hope", "titans"}


def test_defaults_are_the_decided_ones():
    c = HopeConfig()
    assert c.model_type == "nested_hope"
    assert (c.chunk_size, c.memory_depth, c.memory_expansion, c.eta_max, c.conv_kernel_size) == (16, 1, 2, 4.0, 4)
    assert c.self_modifying and c.adaptive_k and c.adaptive_v and c.dgd and c.retention and c.retain_toward_init
    assert c.detach_self_targets is False
    assert c.cms_variant == "sequential"
    assert c.layer_types == ["linear_attention"] * c.num_hidden_layers
    assert c.head_dim == c.hidden_size // c.num_attention_heads == 64
    assert c.num_key_value_heads == c.num_attention_heads
    assert c.tie_word_embeddings is True and c.use_cache is True and c.attention_bias is False
    assert c.cms_levels == [
        {"period": 16, "intermediate_size": 768},
        {"period": 2**20, "intermediate_size": 768},
        {"period": 2**24, "intermediate_size": 768},
    ]
    assert c.cms_periods == [16, 2**20, 2**24]
    assert c.rope_theta == 10000.0 and c.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


def test_default_cms_width_rule():
    # 3/4 * hidden rounded up to a multiple of 64
    assert [lvl["intermediate_size"] for lvl in default_cms_levels(1024)] == [768] * 3
    assert default_cms_levels(128)[0]["intermediate_size"] == 128  # 96 -> 128
    assert default_cms_levels(32)[0]["intermediate_size"] == 64
    assert HopeConfig(hidden_size=512, num_attention_heads=8).cms_levels == default_cms_levels(512)


def test_model_type_collides_with_nothing():
    assert HopeConfig.model_type not in CONFIG_MAPPING_NAMES
    assert HopeConfig.model_type not in FLA_MODEL_TYPES | OTHER_TAKEN
    # the list above must be the real thing, not empty
    assert {"gla", "delta_net", "gated_deltanet", "rwkv7"} <= FLA_MODEL_TYPES


def test_auto_config_by_model_type(tmp_path):
    c = AutoConfig.for_model("nested_hope", hidden_size=64, num_attention_heads=4, num_hidden_layers=3)
    assert type(c) is HopeConfig and c.head_dim == 16 and len(c.layer_types) == 3
    c.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "nested_hope"
    again = AutoConfig.from_pretrained(tmp_path)
    assert type(again) is HopeConfig
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(again.to_dict()) == strip(c.to_dict())


def test_json_round_trip_keeps_every_field(tmp_path):
    c = small_config(
        "hybrid", cms_variant="independent", eta_max=0.25, detach_self_targets=True, retention=False,
        cms_levels=[{"period": 0, "intermediate_size": 8}, {"period": 512, "intermediate_size": 16}],
    )
    c.save_pretrained(tmp_path)
    again = HopeConfig.from_pretrained(tmp_path)
    for name in ("layer_types", "cms_variant", "eta_max", "detach_self_targets", "retention", "cms_levels",
                 "sliding_window", "chunk_size", "rope_theta", "rope_parameters", "head_dim"):
        assert getattr(again, name) == getattr(c, name), name


def test_cms_levels_are_copied_not_aliased():
    levels = [{"period": 4, "intermediate_size": 8}]
    c = HopeConfig(hidden_size=32, num_attention_heads=4, cms_levels=levels)
    c.cms_levels[0]["period"] = 99
    assert levels[0]["period"] == 4


def test_integers_are_accepted_for_float_fields():
    c = HopeConfig(eta_max=1, rope_theta=500000, rms_norm_eps=1, hidden_size=32, num_attention_heads=4)
    assert c.eta_max == 1.0 and isinstance(c.eta_max, float)
    assert c.rope_parameters["rope_theta"] == 500000.0


def test_rope_theta_feeds_rope_parameters():
    c = HopeConfig(rope_theta=5e5, hidden_size=32, num_attention_heads=4)
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 5e5}
    d = HopeConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                   hidden_size=32, num_attention_heads=4)
    assert d.rope_theta == 1e6 and d.rope_parameters["factor"] == 2.0
    e = HopeConfig(rope_theta=1e6, rope_parameters={"rope_type": "linear", "factor": 2.0},
                   hidden_size=32, num_attention_heads=4)
    assert e.rope_parameters["rope_theta"] == 1e6
    with pytest.raises(ValueError, match="rope_theta"):
        HopeConfig(rope_theta=2e5, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def test_legacy_rope_scaling_kwarg_still_loads():
    c = HopeConfig(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=20000.0,
                   hidden_size=32, num_attention_heads=4)
    assert c.rope_parameters["rope_type"] == "linear" and c.rope_parameters["factor"] == 4.0
    assert c.rope_parameters["rope_theta"] == 20000.0


def test_config_error_is_a_value_error_and_a_strict_error():
    assert issubclass(HopeConfigError, ValueError) and issubclass(HopeConfigError, StrictDataclassError)
    with pytest.raises(HopeConfigError):
        HopeConfig(chunk_size=0)


BAD_CONFIGS = [
    # (kwargs, a regex the message must contain: the field name)
    (dict(hidden_size=100, num_attention_heads=3), "hidden_size"),
    (dict(hidden_size="64"), "hidden_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(head_dim=0), "head_dim"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_hidden_layers=2, layer_types=["linear_attention", "titans"]), "layer_types"),
    (dict(num_hidden_layers=2, layer_types=["full_attention", "chunked_attention"]), "layer_types"),
    (dict(num_hidden_layers=2, layer_types=["full_attention"]), "layer_types"),
    (dict(num_hidden_layers=2, layer_types=["full_attention"] * 3), "layer_types"),
    (dict(num_hidden_layers=2, layer_types="full_attention"), "layer_types"),
    (dict(num_hidden_layers=1, layer_types=["sliding_attention"]), "sliding_window"),
    (dict(num_hidden_layers=1, layer_types=["sliding_attention"], sliding_window=0), "sliding_window"),
    (dict(sliding_window=-3), "sliding_window"),
    (dict(cms_levels=[]), "cms_levels"),
    (dict(cms_levels=[[16, 64]]), "cms_levels"),
    (dict(cms_levels=[{"period": 16}]), "cms_levels"),
    (dict(cms_levels=[{"period": 16, "intermediate_size": 8, "lr": 1.0}]), "cms_levels"),
    (dict(cms_levels=[{"period": -1, "intermediate_size": 8}]), "period"),
    (dict(cms_levels=[{"period": 2.5, "intermediate_size": 8}]), "period"),
    (dict(cms_levels=[{"period": True, "intermediate_size": 8}]), "period"),
    (dict(cms_levels=[{"period": "16", "intermediate_size": 8}]), "period"),
    (dict(cms_levels=[{"period": 16, "intermediate_size": 0}]), "intermediate_size"),
    (dict(cms_levels=[{"period": 16, "intermediate_size": -8}]), "intermediate_size"),
    (dict(cms_levels=[{"period": 16, "intermediate_size": 8.0}]), "intermediate_size"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=-4), "chunk_size"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(eta_max=0.0), "eta_max"),
    (dict(eta_max=-0.1), "eta_max"),
    (dict(eta_max=20.0), "eta_max"),
    (dict(memory_expansion=0), "memory_expansion"),
    (dict(conv_kernel_size=0), "conv_kernel_size"),
    (dict(cms_variant="parallel"), "cms_variant"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(attention_dropout=1.0), "attention_dropout"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(self_modifying="yes"), "self_modifying"),
    (dict(layer_types=5), "layer_types"),
    (dict(rope_parameters=5), "rope_parameters"),
    (dict(pad_token_id="a"), "pad_token_id"),
    (dict(eos_token_id=[2, "x"]), "eos_token_id"),
    (dict(vocab_size=256, pad_token_id=256), "pad_token_id"),
    (dict(vocab_size=256, pad_token_id=-257), "pad_token_id"),
    (dict(initializer_range=float("inf")), "initializer_range"),
    (dict(initializer_range=float("nan")), "initializer_range"),
    (dict(memory_depth=3), "memory_depth"),
    (dict(memory_depth=1, dgd=False), "dgd"),
    (dict(rope_parameters={"rope_type": "bogus"}), "rope_type"),
    (dict(rope_parameters={"rope_type": "linear"}), "rope_parameters.*factor"),
]


@pytest.mark.parametrize("kwargs,field", BAD_CONFIGS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_CONFIGS)])
def test_every_invalid_config_raises_a_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        HopeConfig(**kwargs)


def test_error_messages_list_the_allowed_values():
    with pytest.raises(ValueError) as err:
        HopeConfig(num_hidden_layers=1, layer_types=["mamba2"])
    for allowed in HOPE_LAYER_TYPES:
        assert allowed in str(err.value)
    with pytest.raises(ValueError) as err:
        HopeConfig(cms_variant="nested")
    for allowed in CMS_VARIANTS:
        assert allowed in str(err.value)
    with pytest.raises(ValueError, match=r"\(0, 16\]"):
        HopeConfig(eta_max=20.0)
    with pytest.raises(ValueError, match="'period'.*'intermediate_size'"):
        HopeConfig(cms_levels=[{"width": 8}])


def test_invalid_config_from_json_raises_too(tmp_path):
    c = small_config()
    c.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["cms_levels"][1]["period"] = -16
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="period"):
        AutoConfig.from_pretrained(tmp_path)


def test_valid_edge_values():
    c = HopeConfig(hidden_size=30, num_attention_heads=4, head_dim=8, eta_max=1.0, chunk_size=1,
                   cms_levels=[{"period": 0, "intermediate_size": 1}], num_hidden_layers=1,
                   layer_types=["sliding_attention"], sliding_window=1)
    assert c.head_dim == 8 and c.chunk_size == 1 and c.sliding_window == 1


def test_field_types_are_checked_on_assignment_too():
    # pins that the annotations stay real types (no `from __future__ import annotations` in the config file)
    c = small_config()
    with pytest.raises(StrictDataclassError, match="chunk_size"):
        c.chunk_size = "16"


def test_overrides_at_load_are_checked_and_fewer_layers_keep_the_first_types(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(small_config("hybrid"))  # linear, full
    model.save_pretrained(tmp_path / "saved")
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", num_hidden_layers=1)
    assert one.config.layer_types == model.config.layer_types[:1]
    torch.testing.assert_close(one.model.layers[0].titans.q_proj.weight, model.model.layers[0].titans.q_proj.weight)
    one.save_pretrained(tmp_path / "one")  # the truncated model saves (its config is valid)
    assert AutoConfig.from_pretrained(tmp_path / "one").num_hidden_layers == 1
    with pytest.raises(ValueError, match="num_hidden_layers.*layer_types"):
        AutoConfig.from_pretrained(tmp_path / "saved", num_hidden_layers=3)
    more = AutoConfig.from_pretrained(tmp_path / "saved", num_hidden_layers=3, layer_types=["full_attention"] * 3)
    assert more.layer_types == ["full_attention"] * 3
    for kwargs, field in [(dict(chunk_size=0), "chunk_size"), (dict(eta_max=20.0), "eta_max"),
                          (dict(memory_expansion=0), "memory_expansion")]:
        with pytest.raises(ValueError, match=field):
            AutoModelForCausalLM.from_pretrained(tmp_path / "saved", **kwargs)
    config, unused = AutoConfig.from_pretrained(tmp_path / "saved", chunk_size=8, not_a_field=1,
                                                return_unused_kwargs=True)
    assert config.chunk_size == 8 and unused == {"not_a_field": 1}


def test_a_config_changed_by_assignment_is_checked_when_a_model_is_built():
    from transformers import AutoModelForCausalLM

    config = small_config()
    config.num_hidden_layers = 1  # layer_types still has two entries
    with pytest.raises(HopeConfigError, match="layer_types"):
        AutoModelForCausalLM.from_config(config)


def test_an_odd_head_size_is_refused_only_where_rope_is_used():
    """RoPE needs an even head size; an all-Titans model uses no RoPE and takes an odd one."""
    import torch

    from hope_hf import HopeForCausalLM

    config = HopeConfig(hidden_size=36, num_attention_heads=4, num_hidden_layers=2, vocab_size=64, chunk_size=4)
    assert config.head_dim == 9
    ids = torch.randint(0, 64, (2, 11))
    out = HopeForCausalLM(config)(ids, labels=ids)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="head_dim"):
        HopeConfig(hidden_size=36, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
                   layer_types=["linear_attention", "full_attention"])


def test_runtime_switches_are_not_saved_and_come_only_from_the_caller(tmp_path):
    """`memory_cuda_graphs` / `compile_chunk_step` describe how a model runs here, not the model: never written to
    config.json, ignored in an older config.json that holds them, taken from `from_pretrained` keywords."""
    config = HopeConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        memory_cuda_graphs=True, compile_chunk_step=True)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "memory_cuda_graphs" not in saved and "compile_chunk_step" not in saved
    saved.update(memory_cuda_graphs=True, compile_chunk_step=True)  # as configs saved before this rule hold them
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = HopeConfig.from_pretrained(tmp_path)
    assert not loaded.memory_cuda_graphs and not loaded.compile_chunk_step
    asked = HopeConfig.from_pretrained(tmp_path, memory_cuda_graphs=True)
    assert asked.memory_cuda_graphs and not asked.compile_chunk_step


@pytest.mark.parametrize("field,value", [("chunk_size", 0), ("memory_depth", 3), ("cms_variant", "parallel"),
                                         ("dgd", 1), ("attention_dropout", 1.0), ("eos_token_id", "2"),
                                         ("layer_types", ["mamba"])])
def test_field_checks_run_on_assignment_too(field, value):
    config = HopeConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(HopeConfigError, match=f"'{field}'"):
        setattr(config, field, value)

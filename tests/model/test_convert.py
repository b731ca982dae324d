"""convert_llama_to_hope: a converted Llama / Mistral reproduces the source logits and reloads as HOPE."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from hope_hf import HopeForCausalLM
from hope_hf.convert import convert_llama_to_hope


def tiny_llama(**overrides) -> LlamaForCausalLM:
    kwargs = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        initializer_range=0.1,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).float().eval()


def tokens(batch=2, length=13):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(5))


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def test_converted_llama_gives_the_same_logits():
    llama = tiny_llama()
    hope = convert_llama_to_hope(llama)
    assert isinstance(hope, HopeForCausalLM) and not hope.training
    cfg = hope.config
    assert cfg.layer_types == ["full_attention", "full_attention"]
    assert cfg.cms_levels == [{"period": 0, "intermediate_size": 48}]
    assert cfg.num_key_value_heads == 2 and cfg.tie_word_embeddings is False
    ids = tokens()
    torch.testing.assert_close(logits(hope, ids), logits(llama, ids), rtol=0, atol=1e-5)
    layer = hope.model.layers[1]
    assert torch.equal(layer.cms.levels[0].down_proj.weight, llama.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(layer.cms.norms[0].weight, llama.model.layers[1].post_attention_layernorm.weight)


def test_extra_levels_start_at_zero_and_change_nothing():
    llama = tiny_llama()
    hope = convert_llama_to_hope(
        llama, extra_cms_levels=[512, {"period": 2048, "intermediate_size": 16}], base_period=16
    )
    assert hope.config.cms_levels == [
        {"period": 16, "intermediate_size": 48},
        {"period": 512, "intermediate_size": 48},
        {"period": 2048, "intermediate_size": 16},
    ]
    for layer in hope.model.layers:
        for level in layer.cms.levels[1:]:
            assert torch.count_nonzero(level.down_proj.weight) == 0
            assert level.gate_proj.weight.abs().sum() > 0 and level.up_proj.weight.abs().sum() > 0
    ids = tokens()
    torch.testing.assert_close(logits(hope, ids), logits(llama, ids), rtol=0, atol=1e-5)
    # the new levels learn: their down projections receive gradient
    hope.train()
    hope(ids, labels=ids).loss.backward()
    assert hope.model.layers[0].cms.levels[1].down_proj.weight.grad.abs().sum() > 0


def test_saves_and_reloads_as_a_hope_model(tmp_path):
    llama = tiny_llama(tie_word_embeddings=True)
    hope = convert_llama_to_hope(llama, extra_cms_levels=[1024])
    assert hope.lm_head.weight is hope.model.embed_tokens.weight
    hope.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "nested_hope"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is HopeForCausalLM
    ids = tokens()
    torch.testing.assert_close(logits(reloaded, ids), logits(llama, ids), rtol=0, atol=1e-5)
    assert torch.equal(logits(reloaded, ids), logits(hope, ids))


def test_convert_from_a_saved_folder_with_scaled_rope_and_padding(tmp_path):
    llama = tiny_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    llama.save_pretrained(tmp_path / "llama")
    hope = convert_llama_to_hope(tmp_path / "llama")
    assert hope.config.rope_parameters["rope_type"] == "linear" and hope.config.rope_theta == 5000.0
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    torch.testing.assert_close(
        logits(hope, ids, attention_mask=mask)[:, 4:], logits(llama, ids, attention_mask=mask)[:, 4:],
        rtol=0, atol=1e-5,
    )


def test_converted_mistral_with_sliding_window():
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, max_position_embeddings=128, initializer_range=0.1,
    )).float().eval()
    hope = convert_llama_to_hope(mistral)
    assert hope.config.layer_types == ["sliding_attention"] * 2 and hope.config.sliding_window == 4
    ids = tokens(length=15)
    torch.testing.assert_close(logits(hope, ids), logits(mistral, ids), rtol=0, atol=1e-5)


def test_unsupported_sources_are_refused():
    with pytest.raises(ValueError, match="mlp_bias"):
        convert_llama_to_hope(tiny_llama(mlp_bias=True))
    with pytest.raises(ValueError, match="hidden_act"):
        convert_llama_to_hope(tiny_llama(hidden_act="gelu"))
    with pytest.raises(ValueError, match="extra_cms_levels"):
        convert_llama_to_hope(tiny_llama(), extra_cms_levels=["fast"])
    with pytest.raises(ValueError, match=r"list of levels .* pass \[512\]"):
        convert_llama_to_hope(tiny_llama(), extra_cms_levels=512)
    with pytest.raises(ValueError, match="period"):
        convert_llama_to_hope(tiny_llama(), extra_cms_levels=[-5])


def test_a_llama_attends_fully_whatever_its_config_says():
    """`LlamaForCausalLM` never reads `sliding_window` or `layer_types` ("llamafied" checkpoints carry a window with
    `use_sliding_window: false`): the conversion must not turn them into sliding layers."""
    llama = tiny_llama(sliding_window=4, use_sliding_window=False, layer_types=["sliding_attention"] * 2)
    hope = convert_llama_to_hope(llama)
    assert hope.config.layer_types == ["full_attention"] * 2
    ids = tokens(length=15)
    torch.testing.assert_close(logits(hope, ids), logits(llama, ids), rtol=0, atol=1e-5)


def test_generation_config_is_the_sources(tmp_path):
    """Llama 3 names several stop tokens in its generation config only; they, the length and the sampling
    defaults carry over, through a saved folder too."""
    llama = tiny_llama(eos_token_id=96)
    ids = tokens(batch=1, length=6)
    stop = llama.generate(ids, max_new_tokens=8, do_sample=False)[0, 6 + 2].item()  # the third new token
    llama.generation_config.eos_token_id = [96, stop]
    llama.generation_config.max_new_tokens = 8
    llama.generation_config.do_sample, llama.generation_config.temperature = True, 0.7
    llama.save_pretrained(tmp_path / "llama")
    for source in (llama, tmp_path / "llama"):
        hope = convert_llama_to_hope(source)
        assert hope.generation_config.eos_token_id == [96, stop]
        assert hope.generation_config.max_new_tokens == 8 and hope.generation_config.temperature == 0.7
        assert hope.generation_config.do_sample
        want = llama.generate(ids, do_sample=False)
        assert want.shape[1] <= 6 + 3  # stopped at the generation config's second stop token
        assert torch.equal(hope.generate(ids, do_sample=False), want)

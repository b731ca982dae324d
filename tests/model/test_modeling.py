"""HopeModel / HopeForCausalLM: Auto classes, loss, logits_to_keep, tying, save/load, checkpointing, CMS, attention.

Every model-level test runs over the four layouts of conftest.LAYOUTS (Titans, full attention, sliding window,
Titans + sliding hybrid). Results are compared with exact values or independent computations, not shapes only.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.cache_utils import Cache

from hope_hf import HopeConfig, HopeForCausalLM, HopeModel
from hope_hf.memory_hope import HopeSelfModifyingTitans
from hope_hf.modeling_hope import HopeCMS, HopeDecoderLayer, HopeRotaryEmbedding

from conftest import VOCAB, small_config


def ids_batch(batch=2, length=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def cache_of(output):
    return output.cache if "cache" in type(output).__dataclass_fields__ else output.past_key_values


# ------------------------------------------------------------------------------------------------ auto classes
def test_auto_classes_by_model_type(layout, tmp_path):
    config = small_config(layout)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is HopeForCausalLM
    assert type(AutoModel.from_config(config)) is HopeModel
    model.eval()
    ids = ids_batch()
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "nested_hope"
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_hope.HopeForCausalLM"
    assert (tmp_path / "modeling_hope.py").exists() and (tmp_path / "configuration_hope.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is HopeForCausalLM and type(AutoConfig.from_pretrained(tmp_path)) is HopeConfig
    assert not reloaded.training
    with torch.no_grad():
        after = reloaded(ids).logits
    assert torch.equal(before, after)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is HopeModel
    with torch.no_grad():
        hidden = base(ids).last_hidden_state
    assert torch.equal(hidden @ reloaded.lm_head.weight.T, after)


def test_class_attributes():
    assert HopeForCausalLM._tied_weights_keys == {"lm_head.weight": "model.embed_tokens.weight"}
    assert HopeForCausalLM._no_split_modules == ["HopeDecoderLayer"]
    assert HopeForCausalLM._is_stateful is True
    assert HopeForCausalLM.supports_gradient_checkpointing is True
    assert HopeForCausalLM._supports_sdpa is True
    assert HopeForCausalLM.can_generate()
    model = HopeForCausalLM(small_config("attention"))
    assert model.config._attn_implementation == "sdpa"
    assert model.loss_type == "ForCausalLM"


def test_module_names_follow_the_interface_note():
    config = small_config("hybrid", cms_variant="independent", tie_word_embeddings=False)
    names = set(HopeForCausalLM(config).state_dict())
    expected = {
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.cms.norms.0.weight",
        "model.layers.0.cms.norms.1.weight",
        "model.layers.0.cms.levels.1.gate_proj.weight",
        "model.layers.0.cms.levels.1.up_proj.weight",
        "model.layers.0.cms.levels.1.down_proj.weight",
        "model.layers.0.cms.level_weights",
        "model.norm.weight",
        "lm_head.weight",
    }
    assert expected <= names
    assert any(n.startswith("model.layers.0.titans.") for n in names)
    assert not any(n.startswith("model.layers.1.titans.") or n.startswith("model.layers.0.self_attn.") for n in names)
    assert not any(".bias" in n for n in names if ".cms." in n or "self_attn" in n)


# ------------------------------------------------------------------------------------------------ loss / outputs
def test_loss_equals_shifted_cross_entropy_and_backpropagates(layout):
    model = HopeForCausalLM(small_config(layout))
    ids = ids_batch()
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-6)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None)]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_loss_with_num_items_in_batch_sums_then_divides():
    model = HopeForCausalLM(small_config("attention"))
    ids = ids_batch()
    out = model(ids, labels=ids, num_items_in_batch=torch.tensor(7))
    total = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss, total / 7, rtol=1e-6, atol=1e-6)


def test_return_dict_false_gives_a_tuple_with_the_loss_first():
    model = HopeForCausalLM(small_config("attention")).eval()
    ids = ids_batch()
    with torch.no_grad():
        as_dict = model(ids, labels=ids)
        as_tuple = model(ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)


def test_logits_to_keep(layout):
    model = HopeForCausalLM(small_config(layout)).eval()
    ids = ids_batch()
    with torch.no_grad():
        full = model(ids).logits
        last3 = model(ids, logits_to_keep=3).logits
        last1 = model(ids, logits_to_keep=1).logits
        picked = model(ids, logits_to_keep=torch.tensor([0, 4, 10])).logits
        zero = model(ids, logits_to_keep=0).logits
    # same values; not bitwise, because the head's matmul runs on fewer rows
    torch.testing.assert_close(last3, full[:, -3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(last1, full[:, -1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(picked, full[:, [0, 4, 10]], rtol=0, atol=1e-6)
    assert last3.shape == (2, 3, VOCAB) and picked.shape == (2, 3, VOCAB)
    assert torch.equal(zero, full)


def test_hidden_states_output(layout):
    model = HopeForCausalLM(small_config(layout)).eval()
    ids = ids_batch()
    with torch.no_grad():
        out = model.model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(ids))
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    layer0 = model.model.layers[0]
    with torch.no_grad():
        manual = model.model(ids, output_hidden_states=True).hidden_states[1]
    assert torch.equal(manual, out.hidden_states[1])
    assert isinstance(layer0, HopeDecoderLayer)


def test_inputs_embeds_equal_input_ids(layout):
    model = HopeForCausalLM(small_config(layout)).eval()
    ids = ids_batch()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(inputs_embeds=model.model.embed_tokens(ids)).logits
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=model.model.embed_tokens(ids))


def test_batch_rows_are_independent(layout):
    model = HopeForCausalLM(small_config(layout)).eval()
    ids = ids_batch(batch=3)
    with torch.no_grad():
        together = model(ids).logits
        alone = torch.cat([model(ids[i : i + 1]).logits for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_float64_model_runs_in_float64(layout):
    """Every floating-point tensor of a float64 forward and backward is float64 (norms included), except the
    rotary embedding's angles, which are float32 by design (as in Llama); so a float64 model is a float64
    reference on any device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Float32Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.in_rotary, self.found = False, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                    if not self.in_rotary:
                        self.found.add(f"{func.overloadpacket.__name__} -> {t.dtype}")
            return out

    model = HopeForCausalLM(small_config(layout)).double()
    mode = Float32Ops()
    rotary = model.model.rotary_emb if hasattr(model.model, "rotary_emb") else None
    if rotary is not None:
        rotary.register_forward_pre_hook(lambda *_: setattr(mode, "in_rotary", True))
        rotary.register_forward_hook(lambda *_: setattr(mode, "in_rotary", False))
    with mode:
        logits = model(ids_batch()).logits
        logits.pow(2).mean().backward()
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
    assert not mode.found, sorted(mode.found)


# ------------------------------------------------------------------------------------------------ weights
def test_tied_embeddings_survive_save_and_load(layout, tmp_path):
    model = HopeForCausalLM(small_config(layout))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    reloaded = HopeForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    torch.testing.assert_close(reloaded.lm_head.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    with torch.no_grad():
        reloaded.model.embed_tokens.weight[3].fill_(0.5)
    assert torch.equal(reloaded.lm_head.weight[3], torch.full((32,), 0.5))


def test_untied_embeddings_are_saved_separately(tmp_path):
    model = HopeForCausalLM(small_config("attention", tie_word_embeddings=False))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path)
    reloaded = HopeForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_save_and_load_give_identical_logits(layout, tmp_path):
    config = small_config(layout, cms_variant="independent")
    model = HopeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.cms.level_weights.copy_(torch.tensor([0.7, -1.3]))
    model.eval()
    ids = ids_batch()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    reloaded = HopeForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        after = reloaded(ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert torch.equal(reloaded.model.layers[0].cms.level_weights, torch.tensor([0.7, -1.3]))
    state, state2 = model.state_dict(), reloaded.state_dict()
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)


def _initial_out_is_exact(fast):
    """Linear memories start as the identity map (B = 0) for k, v, eta, alpha and the zero map (B = -I) for the
    output memory."""
    out = fast.init_out
    expected = torch.zeros_like(out)
    expected[:, -1] = -torch.eye(out.shape[-1])
    return torch.equal(out, expected)


@pytest.mark.parametrize("memory_depth", [1, 2], ids=["linear", "mlp"])
def test_memory_parameters_missing_from_a_checkpoint_are_initialised(tmp_path, memory_depth):
    """Transformers skips a module whose own parameters were all loaded: a Titans layer's only one is its output
    norm, so its fast_init and convolutions must be initialised module by module when a checkpoint lacks them
    (they were left as `torch.empty` memory)."""
    from safetensors.torch import load_file, save_file

    from hope_hf.memory_hope import ALPHA_BIAS_INIT, AUX_ETA_BIAS_INIT, ETA_BIAS_INIT

    def initial_eta_bias(bias):  # the output memory's (last) and the other memories' initial learning-rate biases
        return torch.equal(bias[:, -1], torch.full_like(bias[:, -1], ETA_BIAS_INIT)) and torch.equal(
            bias[:, :-1], torch.full_like(bias[:, :-1], AUX_ETA_BIAS_INIT))

    model = HopeForCausalLM(small_config("linear", retention=False, memory_depth=memory_depth))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # loaded values differ from any initial value
    model.save_pretrained(tmp_path)
    head_dim = model.config.head_dim

    # a checkpoint with no alpha memory, loaded with one: its readout and bias are new, and every memory's
    # initial state and the learning-rate readouts (one per memory) change shape (re-initialised by
    # ignore_mismatched_sizes)
    grown = HopeForCausalLM.from_pretrained(tmp_path, retention=True, ignore_mismatched_sizes=True)
    for layer, saved in zip(grown.model.layers, model.model.layers):
        fast = layer.titans.fast_init
        assert torch.equal(fast.alpha_bias, torch.full_like(fast.alpha_bias, ALPHA_BIAS_INIT))
        assert fast.alpha_readout.std().item() == pytest.approx(head_dim**-0.5, rel=0.3)
        if memory_depth == 2:
            assert fast.init_in.std().item() == pytest.approx(head_dim**-0.5, rel=0.3)
        else:
            assert _initial_out_is_exact(fast)
        assert initial_eta_bias(fast.eta_bias)
        assert torch.equal(layer.titans.q_proj.weight, saved.titans.q_proj.weight)  # loaded, not re-initialised

    # keys deleted from the checkpoint
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    first = "init_in" if memory_depth == 2 else "init_out"
    dropped = [f"model.layers.0.titans.fast_init.{first}", "model.layers.0.titans.fast_init.eta_bias",
               "model.layers.0.titans.q_conv.weight"]
    for name in dropped:
        del state[name]
    save_file(state, path, metadata={"format": "pt"})
    reloaded = HopeForCausalLM.from_pretrained(tmp_path)
    titans = reloaded.model.layers[0].titans
    if memory_depth == 2:
        assert titans.fast_init.init_in.std().item() == pytest.approx(head_dim**-0.5, rel=0.3)
    else:
        assert _initial_out_is_exact(titans.fast_init)
    assert initial_eta_bias(titans.fast_init.eta_bias)
    assert (titans.q_conv.weight[..., -1] - 1).abs().max() < 0.5  # the identity tap plus noise
    params = dict(reloaded.named_parameters())
    for name, value in model.named_parameters():  # everything the checkpoint holds is kept
        if name not in dropped:
            assert torch.equal(params[name], value), name
    with torch.no_grad():
        assert torch.isfinite(reloaded(ids_batch()).logits).all()


def test_init_weights_hooks():
    config = small_config("hybrid", cms_variant="independent", initializer_range=0.02)
    model = HopeForCausalLM(config)
    titans = [m for m in model.modules() if isinstance(m, HopeSelfModifyingTitans)]
    assert len(titans) == 1
    # init_memory_weights ran: the output norm starts at one and the conv starts near the identity tap
    assert torch.equal(titans[0].out_norm_weight, torch.ones_like(titans[0].out_norm_weight))
    assert (titans[0].q_conv.weight[..., -1] - 1).abs().max() < 0.2
    for layer in model.model.layers:
        assert torch.equal(layer.cms.level_weights, torch.ones(2))
        for norm in layer.cms.norms:
            assert torch.equal(norm.weight, torch.ones(32))
    std = model.model.layers[1].cms.levels[0].gate_proj.weight.std().item()
    assert 0.015 < std < 0.025


def test_missing_weights_are_initialised_and_loaded_ones_kept(tmp_path):
    model = HopeForCausalLM(small_config("attention"))
    model.save_pretrained(tmp_path)
    config = small_config("attention", cms_variant="independent")
    reloaded = HopeForCausalLM.from_pretrained(tmp_path, config=config)
    assert torch.equal(reloaded.model.layers[0].cms.level_weights, torch.ones(2))
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


# ------------------------------------------------------------------------------------------------ checkpointing
def test_activation_checkpointing_gives_identical_gradients(layout):
    config = small_config(layout)
    torch.manual_seed(3)
    plain = HopeForCausalLM(config)
    ckpt = HopeForCausalLM(config)
    ckpt.load_state_dict(plain.state_dict())
    plain.train()
    ckpt.train()
    ckpt.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in ckpt.model.layers)
    ids = ids_batch()
    loss_plain = plain(ids, labels=ids).loss
    loss_ckpt = ckpt(ids, labels=ids).loss
    assert torch.equal(loss_plain, loss_ckpt)
    loss_plain.backward()
    loss_ckpt.backward()
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name


def test_checkpointing_in_training_runs_without_cache():
    model = HopeForCausalLM(small_config("attention")).train()
    model.activation_checkpointing_enable()
    ids = ids_batch()
    out = model(ids, labels=ids, use_cache=True)
    assert cache_of(out) is None
    out.loss.backward()


# ------------------------------------------------------------------------------------------------ CMS
def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu(x, gate, up, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def test_cms_with_one_frozen_level_is_a_plain_swiglu_block():
    config = small_config("attention", cms_levels=[{"period": 0, "intermediate_size": 40}], rms_norm_eps=1e-5)
    cms = HopeCMS(config)
    with torch.no_grad():
        for p in cms.parameters():
            p.normal_()
    x = torch.randn(3, 7, 32)
    level = cms.levels[0]
    expected = x + _swiglu(
        _rms(x, cms.norms[0].weight, 1e-5), level.gate_proj.weight, level.up_proj.weight, level.down_proj.weight
    )
    with torch.no_grad():
        torch.testing.assert_close(cms(x), expected, rtol=1e-6, atol=1e-6)
    assert cms.periods == [0]


def test_cms_sequential_chain_and_independent_sum():
    levels = [{"period": 0, "intermediate_size": 8}, {"period": 16, "intermediate_size": 12},
              {"period": 512, "intermediate_size": 4}]
    seq = HopeCMS(small_config("attention", cms_levels=levels))
    ind = HopeCMS(small_config("attention", cms_levels=levels, cms_variant="independent"))
    ind.load_state_dict({**seq.state_dict(), "level_weights": torch.tensor([0.5, -2.0, 3.0])})
    x = torch.randn(2, 5, 32)

    def level_out(module, i, z):
        lv = module.levels[i]
        return _swiglu(_rms(z, module.norms[i].weight, 1e-6), lv.gate_proj.weight, lv.up_proj.weight,
                       lv.down_proj.weight)

    y = x
    for i in range(3):
        y = y + level_out(seq, i, y)
    z = x + sum(w * level_out(seq, i, x) for i, w in enumerate([0.5, -2.0, 3.0]))
    with torch.no_grad():
        torch.testing.assert_close(seq(x), y, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ind(x), z, rtol=1e-6, atol=1e-6)


def test_independent_with_one_level_equals_sequential_at_init():
    one = [{"period": 16, "intermediate_size": 24}]
    a = HopeForCausalLM(small_config("hybrid", cms_levels=one))
    b = HopeForCausalLM(small_config("hybrid", cms_levels=one, cms_variant="independent"))
    missing, unexpected = b.load_state_dict(a.state_dict(), strict=False)
    assert set(missing) == {"model.layers.0.cms.level_weights", "model.layers.1.cms.level_weights"}
    assert not unexpected
    assert torch.equal(b.model.layers[0].cms.level_weights, torch.ones(1))
    ids = ids_batch()
    with torch.no_grad():
        assert torch.equal(a.eval()(ids).logits, b.eval()(ids).logits)


def test_decoder_layer_is_mixer_residual_then_cms():
    model = HopeForCausalLM(small_config("attention")).eval()
    layer = model.model.layers[0]
    x = torch.randn(2, 6, 32)
    pos = torch.arange(6)[None].expand(2, -1)
    emb = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        mixed, _ = layer.self_attn(layer.input_layernorm(x), position_embeddings=emb, attention_mask=None)
        expected = layer.cms(x + mixed)
        got = layer(x, position_ids=pos, position_embeddings=emb)
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------------------ attention
def _reference_attention(model, ids, window=None):
    """Whole-model forward of an attention-only HOPE written from scratch (plain softmax attention, RoPE)."""
    cfg = model.config
    d, H = cfg.head_dim, cfg.num_attention_heads
    x = model.model.embed_tokens(ids)
    T = ids.shape[1]
    pos = torch.arange(T, dtype=torch.float)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    cos, sin = ang.cos(), ang.sin()

    def rope(z):
        return z * cos + torch.cat([-z[..., d // 2 :], z[..., : d // 2]], -1) * sin

    i = torch.arange(T)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    for layer in model.model.layers:
        a = layer.self_attn
        h = _rms(x, layer.input_layernorm.weight, cfg.rms_norm_eps)
        q = rope((h @ a.q_proj.weight.T).view(*ids.shape, H, d).transpose(1, 2))
        k = rope((h @ a.k_proj.weight.T).view(*ids.shape, H, d).transpose(1, 2))
        v = (h @ a.v_proj.weight.T).view(*ids.shape, H, d).transpose(1, 2)
        s = (q @ k.transpose(-1, -2)) / d**0.5
        s = s.masked_fill(~allowed, float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(*ids.shape, H * d)
        x = layer.cms(x + o @ a.o_proj.weight.T)
    return model.lm_head(model.model.norm(x))


@pytest.mark.parametrize("layout_name,window", [("attention", None), ("sliding", 3)])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_matches_a_reference_written_from_scratch(layout_name, window, impl):
    config = small_config(layout_name, rope_theta=500.0)
    model = HopeForCausalLM(config).eval()
    model.set_attn_implementation(impl)
    ids = ids_batch(length=9)
    with torch.no_grad():
        got = model(ids).logits
        ref = _reference_attention(model, ids, window)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_rope_theta_reaches_the_rotary_embedding():
    config = small_config("attention", rope_theta=123.0)
    rotary = HopeModel(config).rotary_emb
    d = config.head_dim
    expected = 1.0 / (123.0 ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    torch.testing.assert_close(rotary.inv_freq, expected, rtol=1e-6, atol=0)
    scaled = HopeRotaryEmbedding(
        small_config("attention", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 123.0})
    )
    torch.testing.assert_close(scaled.inv_freq, expected / 4.0, rtol=1e-6, atol=0)


def test_sliding_window_limits_what_a_position_sees():
    config = small_config("sliding", num_hidden_layers=1, layer_types=["sliding_attention"], sliding_window=4)
    model = HopeForCausalLM(config).eval()
    ids = ids_batch(batch=1, length=10)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] % (VOCAB - 1)) + 1
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert not torch.allclose(a[0, :4], b[0, :4])  # positions 0..3 see token 0
    assert torch.equal(a[0, 4:], b[0, 4:])  # positions >= 4 do not (window of 4)


def test_sdpa_and_eager_agree_with_left_padding():
    config = small_config("attention")
    model = HopeForCausalLM(config).eval()
    ids = ids_batch()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        sdpa = model(ids, attention_mask=mask, position_ids=position_ids).logits
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask, position_ids=position_ids).logits
        alone = model(ids[1:, 4:]).logits
    torch.testing.assert_close(sdpa[:, 4:], eager[:, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager[1, 4:], alone[0], rtol=1e-5, atol=1e-5)


def test_dict_attention_mask_is_accepted(layout):
    model = HopeForCausalLM(small_config(layout)).eval()
    ids = ids_batch()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        position_ids = torch.arange(ids.shape[1])[None].expand(2, -1)
        embeds = model.model.embed_tokens(ids)
        masks = model.model._layer_masks(mask, embeds, None, position_ids)
        assert set(masks) == set(model.config.layer_types)
        from_2d = model(ids, attention_mask=mask, position_ids=position_ids).logits
        from_dict = model(ids, attention_mask=masks, position_ids=position_ids).logits
    assert torch.equal(from_2d, from_dict)


@pytest.mark.parametrize("layout_name", ["attention", "sliding"])
def test_attention_cache_decoding_equals_full_forward(layout_name):
    model = HopeForCausalLM(small_config(layout_name)).eval()
    ids = ids_batch(length=12)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :7], use_cache=True)
        cache = cache_of(out)
        assert isinstance(cache, Cache) and cache.get_seq_length() == 7
        steps = [out.logits]
        for t in range(7, 12):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        # Transformers 5.24 generate passes the cache as `cache=`; both names work
        again = model(ids[:, :7], use_cache=True)
        via_new_name = model(ids[:, 7:], cache=cache_of(again), use_cache=True).logits
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_new_name, full[:, 7:], rtol=1e-5, atol=1e-5)


def test_attention_generate_with_and_without_cache():
    model = HopeForCausalLM(small_config("attention")).eval()
    ids = ids_batch(batch=1, length=5)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        plain = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        manual = ids
        for _ in range(6):
            nxt = model(manual).logits[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, nxt], 1)
    assert torch.equal(cached, plain) and torch.equal(cached, manual)


def test_generate_without_cache_for_every_layout(layout):
    model = HopeForCausalLM(small_config(layout)).eval()
    ids = ids_batch(batch=1, length=5)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
        manual = ids
        for _ in range(4):
            manual = torch.cat([manual, model(manual).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, manual)


def test_inputs_a_hope_model_cannot_honour_are_refused_by_name(layout):
    """A 4-D mask (Titans layers need the 2-D padding mask), attention weights and a library cache (no fast weights)
    raise errors that name the argument, instead of being ignored or failing deep inside."""
    from transformers import DynamicCache

    model = HopeForCausalLM(small_config(layout)).eval()
    ids = ids_batch(batch=1, length=5)
    with torch.no_grad():
        if not model.config.is_attention_only:
            with pytest.raises(ValueError, match="attention_mask.*2-D"):
                model(ids, attention_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))
            with pytest.raises(ValueError, match="HopeCache"):
                model(ids, past_key_values=DynamicCache(), use_cache=True)
        with pytest.raises(ValueError, match="output_attentions"):
            model(ids, output_attentions=True)
        with pytest.raises(ValueError, match="output_attentions"):
            model.generate(ids, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True,
                           pad_token_id=0)
        assert model(ids, output_attentions=False).logits.shape == (1, 5, VOCAB)

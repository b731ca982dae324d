"""HOPE with the rest of the ecosystem: `pipeline("text-generation")`, PEFT LoRA, `torch.compile`.

LoRA target modules of a HOPE model (README "PEFT / LoRA"): `q_proj`, `k_proj`, `v_proj`, `g_proj`, `o_proj`
(self-modifying Titans layers; all but `g_proj` also match attention layers), `gate_proj`, `up_proj`, `down_proj`
(the SwiGLU MLP of every CMS level).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import ByT5Tokenizer, pipeline

from hope_hf import HopeForCausalLM

from conftest import small_config


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

pytestmark = pytest.mark.usefixtures("one_thread")



def _byte_model(layout="hybrid", **overrides):
    tokenizer = ByT5Tokenizer()
    config = small_config(layout, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, **overrides)
    return HopeForCausalLM(config).eval(), tokenizer


def test_text_generation_pipeline_from_a_saved_folder(tmp_path):
    model, tokenizer = _byte_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path))
    assert type(generator.model) is HopeForCausalLM
    out = generator("Continuum memory", min_new_tokens=10, max_new_tokens=10, do_sample=False, return_tensors=True)
    ids = tokenizer("Continuum memory", return_tensors="pt").input_ids
    expected = model.generate(ids, min_new_tokens=10, max_new_tokens=10, do_sample=False)
    assert list(out[0]["generated_token_ids"]) == expected[0].tolist()
    text = generator("Continuum memory", max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert text.startswith("Continuum memory")


def test_peft_lora_trains_saves_and_reloads(tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = _byte_model()
    model.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    lora = peft.get_peft_model(model, config)

    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    wrapped = {n.split(".base_layer")[0] for n, _ in lora.named_modules() if n.endswith(".base_layer")}
    for expected in ("layers.0.titans.k_proj", "layers.0.titans.g_proj", "layers.1.self_attn.k_proj",
                     "layers.0.cms.levels.1.down_proj"):
        assert any(name.endswith(expected) for name in wrapped), expected
    frozen_before = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}

    torch.manual_seed(0)
    ids = torch.randint(3, 259, (4, 24))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    losses = []
    for _ in range(20):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(p, frozen_before[n]) for n, p in lora.named_parameters() if not p.requires_grad)

    lora.eval()
    with torch.no_grad():
        trained = lora(input_ids=ids).logits
    lora.save_pretrained(tmp_path / "adapter")
    saved = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved
    assert set(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]) == set(
        LORA_TARGETS
    )

    base = HopeForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained)
    generated = reloaded.generate(input_ids=ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)
    merged = reloaded.merge_and_unload()
    assert type(merged) is HopeForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained, rtol=1e-4, atol=1e-4)


def test_peft_modules_to_save_trains_the_memory_initial_states():
    """The meta-learned initial states of the memories (`titans.fast_init`) are no linear layers; PEFT trains a copy
    of them with `modules_to_save` (README)."""
    peft = pytest.importorskip("peft")
    model, _ = _byte_model("linear")
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["fast_init"], task_type="CAUSAL_LM")
    lora = peft.get_peft_model(model, config)
    ids = torch.randint(3, 259, (2, 10))
    lora(input_ids=ids, labels=ids).loss.backward()
    copies = {n: p for n, p in lora.named_parameters() if p.requires_grad and ".fast_init.modules_to_save." in n}
    assert {n.rsplit(".", 1)[-1] for n in copies} >= {"init_out", "eta_readout", "alpha_readout"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in copies.items() if "init_" in n)


def test_torch_compile_traces_the_forward_pass():
    """Dynamo captures the whole model, Titans memory included (backend "eager": no C++ build, seconds on a CPU)."""
    torch._dynamo.reset()
    model, _ = _byte_model("linear", num_hidden_layers=1)
    ids = torch.randint(3, 259, (2, 10))  # 10 tokens: two full chunks of 4 and a partial one
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        compiled = torch.compile(model, backend="eager")
        assert torch.equal(compiled(ids, use_cache=False).logits, expected)


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute_memory_states", "stored_states"])
def test_torch_compile_trains_with_the_same_gradients(recompute):
    """A compiled training step (backend "eager") gives the eager loss and gradients, with the memory scan's
    recomputed segments (run eagerly inside the compiled model) and without them."""
    torch._dynamo.reset()
    model, _ = _byte_model("linear", num_hidden_layers=1, recompute_memory_states=recompute)
    ids = torch.randint(3, 259, (2, 30))  # eight chunks of 4 (the last partial): segments of 3, 3 and 2
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="eager")
    compiled_loss = compiled(input_ids=ids, labels=ids).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=0, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_torch_compile_inductor_runs_the_forward_pass():
    """`torch.compile(model)` with the default backend (inductor, a C++ build on a CPU: minutes on 2 cores)."""
    torch._dynamo.reset()
    model, _ = _byte_model("hybrid")
    ids = torch.randint(3, 259, (2, 10))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_generate_with_a_compiled_forward_gives_the_eager_tokens():
    """README: `model.forward = torch.compile(model.forward)`, then `generate` with the recurrent cache (the one-token
    steps compile without graph breaks) gives the same greedy tokens as eager (inductor: minutes on a CPU)."""
    torch._dynamo.reset()
    model, _ = _byte_model("linear")
    ids = torch.randint(3, 259, (2, 21))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=24, do_sample=False)
        model.forward = torch.compile(model.forward)
        got = model.generate(ids, max_new_tokens=24, do_sample=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

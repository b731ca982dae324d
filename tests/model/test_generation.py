"""Recurrent decoding with HopeCache: cached == uncached, padding, pieces, beams, constant cache size
(docs/design.md §6b)."""

import copy

import pytest
import torch

from conftest import LAYOUTS, small_config
from hope_hf import HopeForCausalLM
from hope_hf.cache_hope import HopeCache
from hope_hf.modeling_hope import _LM_CACHE_FIELD
from hope_hf.streaming import split_into_pieces, stream_prefill


CHUNK = 4
# the name under which generate takes a cache: `cache` from Transformers 5.24, `past_key_values` before
CACHE_KW = _LM_CACHE_FIELD
LAYOUTS_WITH_STATIC = list(LAYOUTS) + ["static_titans", "mlp_titans"]  # + the paper's MLP memories


def make_model(layout, dtype=torch.float64, **overrides):
    if layout == "static_titans":
        cfg = small_config("linear", self_modifying=False, **overrides)
    elif layout == "mlp_titans":
        cfg = small_config("linear", memory_depth=2, **overrides)
    else:
        cfg = small_config(layout, **overrides)
    torch.manual_seed(0)
    model = HopeForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # large learning rates and weights so that the memories matter to the logits
        for name, p in model.named_parameters():
            if name.endswith("eta_bias"):
                p.fill_(1.0)
            elif name.endswith("alpha_bias"):
                p.fill_(2.0)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                p.normal_(0, 0.5)
    return model


def decode_stepwise(model, ids, prompt_len):
    cache = HopeCache(model.config)
    out = model(ids[:, :prompt_len], past_key_values=cache, use_cache=True)
    logits = [out.logits]
    for t in range(prompt_len, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("layout", LAYOUTS_WITH_STATIC)
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_prefill_then_decode_equals_full_forward(layout, dtype, atol):
    model = make_model(layout, dtype)
    ids = torch.randint(1, model.config.vocab_size, (2, 3 * CHUNK + 5 + 4))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        assert full.std() > 0.05  # logits really depend on the input
        for prompt_len in (1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5):
            stepwise, cache = decode_stepwise(model, ids, prompt_len)
            torch.testing.assert_close(stepwise, full, atol=atol, rtol=0, msg=lambda m: f"prompt {prompt_len}: {m}")
            assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("layout", LAYOUTS_WITH_STATIC)
def test_generate_equals_uncached(layout):
    model = make_model(layout, torch.float32)
    prompt = torch.randint(1, model.config.vocab_size, (2, 6))
    kw = dict(max_new_tokens=7, pad_token_id=0)
    greedy = model.generate(prompt, do_sample=False, **kw)
    assert torch.equal(greedy, model.generate(prompt, do_sample=False, use_cache=False, **kw))
    torch.manual_seed(3)
    sampled = model.generate(prompt, do_sample=True, top_k=0, **kw)
    torch.manual_seed(3)
    assert torch.equal(sampled, model.generate(prompt, do_sample=True, top_k=0, use_cache=False, **kw))
    beams = model.generate(prompt, num_beams=3, do_sample=False, **kw)
    assert torch.equal(beams, model.generate(prompt, num_beams=3, do_sample=False, use_cache=False, **kw))


@pytest.mark.parametrize("layout", LAYOUTS_WITH_STATIC)
def test_left_padded_batch_equals_rows_alone(layout):
    model = make_model(layout, torch.float64)
    lengths = [11, 6, 3]
    width = max(lengths)
    rows = [torch.randint(1, model.config.vocab_size, (n,)) for n in lengths]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate computes them; RoPE in float32 needs equal positions
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(batch[i, width - len(row) :], alone, atol=1e-10, rtol=0)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(gen[i, width:], alone[0, len(row) :]), f"row {i}"


@pytest.mark.parametrize("layout", LAYOUTS_WITH_STATIC)
def test_pieces_give_identical_states_and_logits(layout):
    model = make_model(layout, torch.float64)
    ids = torch.randint(1, model.config.vocab_size, (2, 23))
    caches, last_logits = [], []
    for size in (23, 7, 1):
        cache, logits = stream_prefill(model, split_into_pieces(ids, size), progress=False)
        caches.append(cache)
        last_logits.append(logits)
    for cache, logits in zip(caches[1:], last_logits[1:]):
        torch.testing.assert_close(logits, last_logits[0], atol=1e-10, rtol=0)
        assert cache.get_seq_length() == 23
        for layer, ref in zip(cache.layers, caches[0].layers):
            if hasattr(layer, "state"):
                for name, t in layer.state.tensors().items():
                    torch.testing.assert_close(t, getattr(ref.state, name), atol=1e-10, rtol=0)
            else:
                torch.testing.assert_close(layer.keys, ref.keys, atol=1e-10, rtol=0)
    # continuing from a streamed cache equals a forward over everything
    more = torch.randint(1, model.config.vocab_size, (2, 3))
    cont = model(more, past_key_values=caches[1], use_cache=True).logits
    full = model(torch.cat([ids, more], 1)).logits[:, -3:]
    torch.testing.assert_close(cont, full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("layout", ["linear", "sliding", "hybrid", "static_titans"])
def test_cache_size_does_not_grow(layout):
    model = make_model(layout, torch.float32, chunk_size=50)  # a long chunk keeps this 10,000-token run short
    ids = torch.randint(1, model.config.vocab_size, (1, 10_000))
    cache, _ = stream_prefill(model, split_into_pieces(ids[:, :100], 64), progress=False)
    small = cache.nbytes()
    cache, _ = stream_prefill(model, split_into_pieces(ids, 1000), progress=False)
    assert cache.get_seq_length() == 10_000
    assert small > 0 and cache.nbytes() == small


def test_user_cache_crop_and_return_dict():
    model = make_model("hybrid", torch.float32)
    prompt = torch.randint(1, model.config.vocab_size, (1, 5))
    cache = HopeCache(model.config)
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, **{CACHE_KW: cache}, return_dict_in_generate=True,
                         pad_token_id=0)
    returned = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    assert returned is cache and cache.get_seq_length() == 8  # the last new token is not fed back
    # continue generating from the returned cache: equals generating from the whole text at once
    snapshot = copy.deepcopy(cache)
    cont = model.generate(out.sequences, max_new_tokens=3, do_sample=False, pad_token_id=0, **{CACHE_KW: snapshot})
    ref = model.generate(out.sequences, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cont, ref)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(prompt, max_new_tokens=2, cache_implementation="static", pad_token_id=0)


@pytest.mark.parametrize("layout", ["linear", "hybrid", "attention"])
def test_generate_from_a_passed_cache_checks_what_it_holds(layout):
    """A prompt the cache has wholly seen, and beams from a cache of the prompts' rows: clear errors (generate fed
    the whole prompt again, resp. failed inside a layer); repeated rows then give the beams of the whole prompt."""
    model = make_model(layout, torch.float32)
    prompt = torch.randint(1, model.config.vocab_size, (2, 7))
    seen, _ = stream_prefill(model, [prompt], progress=False)
    with pytest.raises(ValueError, match="the cache has seen 7 tokens and the prompt holds 7"):
        model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0, **{CACHE_KW: seen})
    assert seen.get_seq_length() == 7  # nothing was fed

    options = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    cache, _ = stream_prefill(model, [prompt[:, :5]], progress=False)
    with pytest.raises(ValueError, match=r"holds 2 sequences but the input has 6 rows.*batch_repeat_interleave\(3\)"):
        model.generate(prompt, **options, **{CACHE_KW: cache})
    cache, _ = stream_prefill(model, [prompt[:, :5]], progress=False)
    cache.batch_repeat_interleave(3)
    got = model.generate(prompt, **options, **{CACHE_KW: cache})
    assert torch.equal(got, model.generate(prompt, **options))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("use_cache", [None, True, False])
def test_packed_sequences_reset_memories(layout, use_cache):
    """In eval mode too, where a forward builds a cache by default (attention layers then saw one sequence)."""
    model = make_model(layout, torch.float64)
    a = torch.randint(1, model.config.vocab_size, (7,))
    b = torch.randint(1, model.config.vocab_size, (9,))
    packed = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=pos, use_cache=use_cache).logits[0]
        torch.testing.assert_close(logits[:7], model(a[None]).logits[0], atol=1e-10, rtol=0)
        torch.testing.assert_close(logits[7:], model(b[None]).logits[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("layout", ["linear", "hybrid"])
def test_cache_batch_operations(layout):
    """reorder / repeat_interleave / select rows of a filled cache equal running the rearranged batch."""
    model = make_model(layout, torch.float64)
    ids = torch.randint(1, model.config.vocab_size, (3, 9))
    more = torch.randint(1, model.config.vocab_size, (3, 2))
    with torch.no_grad():
        for op, index in [
            ("reorder_cache", torch.tensor([2, 0, 0])),
            ("batch_select_indices", torch.tensor([1, 2])),
            ("batch_repeat_interleave", 2),
        ]:
            cache = HopeCache(model.config)
            model(ids, past_key_values=cache, use_cache=True)
            getattr(cache, op)(index)
            rows = index if torch.is_tensor(index) else torch.arange(3).repeat_interleave(index)
            got = model(more[rows], past_key_values=cache, use_cache=True).logits
            want = model(torch.cat([ids, more], 1)[rows]).logits[:, -2:]
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=lambda m: f"{op}: {m}")
            assert cache.batch_size == len(rows)

"""Shared helpers of the training tests (tiny HOPE configs that train in well under a second per step on CPU)."""

from __future__ import annotations

import contextlib

import torch

from hope_hf import HopeForCausalLM
from hope_hf.presets import get_preset

VOCAB = 97


def tiny_config(periods=(16, 48, 0), vocab_size=VOCAB, hidden_size=32, layers=2, **overrides):
    """The `tiny` preset (default layer types: self-modifying Titans) shrunk further, with the given CMS periods."""
    levels = [{"period": p, "intermediate_size": 32} for p in periods]
    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
              chunk_size=8, cms_levels=levels)
    kw.update(overrides)
    return get_preset("tiny", **kw)


def tiny_model(seed=0, **kw) -> HopeForCausalLM:
    torch.manual_seed(seed)
    return HopeForCausalLM(tiny_config(**kw))


@contextlib.contextmanager
def one_thread():
    """Run with one intra-op thread: deterministic reductions, and no oversubscription on a busy 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def params_by_level(model):
    """{level: {name: param}} for CMS parameters, level None for the rest."""
    from hope_hf.training.continuum import CMS_PARAM_PATTERN

    out = {}
    for name, p in model.named_parameters():
        m = CMS_PARAM_PATTERN.search(name)
        out.setdefault(int(m.group(1)) if m else None, {})[name] = p
    return out

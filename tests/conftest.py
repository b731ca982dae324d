"""Shared fixtures: small HOPE configs that run in milliseconds on a CPU.

Every model test is parametrized over the four mixer layouts: the default (all self-modifying Titans,
"linear_attention"), all full attention, all sliding-window attention, and a Titans + sliding hybrid.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton kernels on CPU tensors run in Triton's interpreter (tests/ops/test_triton_kernels.py); it must be on before
    # triton is imported (Transformers imports it with hope_hf), since triton's own library functions are decorated then
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hope_hf  # noqa: E402, F401  (registers the Auto classes)
from hope_hf import HopeConfig  # noqa: E402


VOCAB = 61
LAYOUTS = {
    "linear": None,  # the default layer_types: every layer a self-modifying Titans memory
    "attention": ["full_attention", "full_attention"],
    "sliding": ["sliding_attention", "sliding_attention"],
    "hybrid": ["linear_attention", "sliding_attention"],
}


def small_config(layout: str = "linear", **overrides) -> HopeConfig:
    """A 2-layer, width-32 HOPE config (4 heads of 8, chunk 4, two CMS levels) for the given mixer layout."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        chunk_size=4,
        sliding_window=3,
        max_position_embeddings=64,
        cms_levels=[{"period": 0, "intermediate_size": 48}, {"period": 16, "intermediate_size": 24}],
        initializer_range=0.1,
        pad_token_id=0,
    )
    if LAYOUTS[layout] is not None:
        kwargs["layer_types"] = list(LAYOUTS[layout])
    kwargs.update(overrides)
    return HopeConfig(**kwargs)


@pytest.fixture(params=list(LAYOUTS))
def layout(request) -> str:
    return request.param


@pytest.fixture
def one_thread():
    """Tiny models are many small kernels: on a busy 2-core box one thread is ~10x faster than two (no spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    # keep the run bounded on a 2-core CI box
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

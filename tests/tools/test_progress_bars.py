"""Progress bars of streaming (`stream_prefill`) and stream learning (`StreamLearner.stream`): counted in tokens, with
a total (hence an ETA) when the pieces' lengths are known, and a count with a rate for a generator."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import VOCAB, small_config
from tqdm import tqdm

import hope_hf.streaming as streaming
from hope_hf import HopeForCausalLM
from hope_hf.continual import StreamLearner
from hope_hf.streaming import count_tokens, split_into_pieces, stream_prefill


@pytest.fixture
def bars(monkeypatch):
    """Every bar `token_bar` makes, rendered into a string instead of stderr."""
    made = []

    class Recorded(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(streaming, "tqdm", Recorded)
    return made


@pytest.fixture
def model(one_thread):
    torch.manual_seed(0)
    return HopeForCausalLM(small_config()).eval()


def _ids(n, batch=1):
    return torch.randint(0, VOCAB, (batch, n))


def test_stream_prefill_bar_has_the_total_of_a_list(model, bars):
    stream_prefill(model, split_into_pieces(_ids(50, batch=2), 16))
    (bar,) = bars
    assert (bar.total, bar.n, bar.unit) == (50, 50, "tok")  # positions, not batch x positions
    assert "50/50" in bar.fp.getvalue()  # the rendered bar shows done/total (and so an ETA while running)


def test_stream_prefill_bar_of_a_generator_counts_without_total(model, bars):
    stream_prefill(model, (piece for piece in split_into_pieces(_ids(40), 16)))
    (bar,) = bars
    assert (bar.total, bar.n) == (None, 40)
    assert "40tok" in bar.fp.getvalue()


def test_explicit_total_wins(model, bars):
    stream_prefill(model, (piece for piece in split_into_pieces(_ids(40), 16)), total=40)
    assert bars[0].total == 40


def test_stream_learner_bar_has_the_total_of_a_list(model, bars):
    learner = StreamLearner(model, lr=1e-3, chunk_size=8)
    stream = torch.randint(0, VOCAB, (30,))
    learner.stream([stream[:10], stream[10:].tolist()])
    (bar,) = bars
    assert (bar.total, bar.n) == (30, 30)
    learner.stream(iter([torch.randint(0, VOCAB, (5,))]))
    assert (bars[1].total, bars[1].n) == (None, 5)


def test_no_bar_when_progress_is_off(model, bars):
    stream_prefill(model, [_ids(8)], progress=False)
    assert bars[0].disable


@pytest.mark.parametrize("pieces, expected", [
    ([[1, 2, 3], [4]], 4),
    ([[[1, 2, 3], [4, 5, 6]]], 3),  # a (batch, length) nested list: its length
    ([torch.zeros(2, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long)], 8),
    ((p for p in [[1, 2]]), None),  # a generator is not consumed to count it
    (iter([[1, 2]]), None),
])
def test_count_tokens(pieces, expected):
    assert count_tokens(pieces) == expected


def test_split_into_pieces_is_a_list_of_views_and_checks_its_size_at_once():
    ids = _ids(10)
    pieces = split_into_pieces(ids, 4)
    assert [p.shape[-1] for p in pieces] == [4, 4, 2]
    assert pieces[0].data_ptr() == ids.data_ptr()
    with pytest.raises(ValueError, match="piece_size must be an int >= 1, got 0"):
        split_into_pieces(ids, 0)

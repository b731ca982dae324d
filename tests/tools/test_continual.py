"""The inference-time stream learner (hope_hf.continual, docs/design.md §12): the per-level update rule, exactly.

The reference below recomputes every update independently: it loads the expected weights into a deep copy of the
model, runs its own cache, takes the summed next-token loss of each piece with plain autograd and applies
`w - lr * (sum of the gradients since the level's last update)` at token counts P, 2P, ... of each level.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import small_config
from hope_hf import HopeForCausalLM
from hope_hf.cache_hope import HopeCache
from hope_hf.continual import StreamLearner, StreamLearnerError

PERIODS = [0, 5, 12]
LRS = [0.0, 0.1, 0.05]

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(layout="linear", periods=PERIODS, dtype=torch.float64):
    torch.manual_seed(0)
    cfg = small_config(layout, cms_levels=[{"period": p, "intermediate_size": 12} for p in periods])
    return HopeForCausalLM(cfg).to(dtype)


def _cms_names(model, level):
    return [n for n, _ in model.named_parameters() if f".cms.levels.{level}." in n or f".cms.norms.{level}." in n]


def _reference(model, stream, chunk, periods, lrs):
    """Independent re-computation: returns the weights after the stream and the (token count, level) update list."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    learn = {lvl: _cms_names(ref, lvl) for lvl, p in enumerate(periods) if p > 0}
    acc = {n: torch.zeros_like(params[n]) for names in learn.values() for n in names}
    since = {lvl: 0 for lvl in learn}
    cache = HopeCache(ref.config)
    updates, done, t = [], 0, 0
    while t < len(stream) - 1:
        n = min(chunk, len(stream) - 1 - t, *(periods[lvl] - since[lvl] for lvl in learn))
        x, y = stream[t : t + n], stream[t + 1 : t + n + 1]
        logits = ref(input_ids=x[None], past_key_values=cache, use_cache=True).logits[0]
        loss = F.cross_entropy(logits, y, reduction="sum")
        names = list(acc)
        grads = torch.autograd.grad(loss, [params[k] for k in names])
        for k, g in zip(names, grads):
            acc[k] += g
        for layer in cache.layers:  # gradients stay inside a piece
            if getattr(layer, "state", None) is not None:
                layer.state = layer.state.map(torch.Tensor.detach)
        t += n
        done += n
        for lvl in learn:
            since[lvl] += n
            if since[lvl] == periods[lvl]:
                with torch.no_grad():
                    for k in learn[lvl]:
                        params[k].add_(acc[k], alpha=-lrs[lvl])
                        acc[k].zero_()
                since[lvl] = 0
                updates.append((done, lvl))
    return {k: v.detach() for k, v in params.items()}, updates


def test_each_level_updates_exactly_at_its_period_by_minus_lr_times_summed_gradient():
    model = _model()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stream = torch.randint(1, model.config.vocab_size, (41,))
    learner = StreamLearner(model, lr=LRS, chunk_size=4, progress=False)
    snapshots = {}
    # feed one token at a time so that the learner's weights can be inspected after every counted token
    for i in range(len(stream)):
        learner.feed(stream[i : i + 1])
        snapshots[learner.tokens_learned] = {k: v.detach().clone() for k, v in learner.weights.items()}
    assert learner.tokens_learned == 40 and learner.pending.tolist() == [int(stream[-1])]
    expected_updates = sorted([(t, 1) for t in range(5, 41, 5)] + [(t, 2) for t in range(12, 41, 12)])
    assert sorted(learner.update_log) == expected_updates
    assert learner.level_updates == {1: 8, 2: 3} and learner.tokens_since_update == {1: 0, 2: 4}

    # every level changes exactly at multiples of its period and at no other token count
    for level, period in ((1, 5), (2, 12)):
        names = _cms_names(model, level)
        for t in range(1, 41):
            changed = any(not torch.equal(snapshots[t][n], snapshots[t - 1][n] if t > 1 else base[n]) for n in names)
            assert changed == (t % period == 0), (level, t)
    # the frozen level (period 0) is not even copied, and the base model is untouched
    assert not any(".cms.levels.0." in n or ".cms.norms.0." in n for n in learner.weights)
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())

    # values: an independent re-computation with 1-token pieces gives the same weights (the pieces are the same)
    ref_weights, ref_updates = _reference(model, stream, 1, PERIODS, LRS)
    assert ref_updates == learner.update_log
    for name, value in learner.weights.items():
        assert torch.equal(value, ref_weights[name]), name  # bitwise


def test_pieces_are_cut_at_update_times_whatever_the_chunk_size():
    model = _model()
    stream = torch.randint(1, model.config.vocab_size, (53,))
    expected = sorted([(t, 1) for t in range(5, 53, 5)] + [(t, 2) for t in range(12, 53, 12)])
    learner = StreamLearner(model, lr=LRS, chunk_size=7, progress=False)
    learner.feed(stream)
    ref_weights, ref_updates = _reference(model, stream, 7, PERIODS, LRS)
    assert learner.update_log == ref_updates == expected
    for name, value in learner.weights.items():
        assert torch.equal(value, ref_weights[name]), name  # bitwise
    # other chunk sizes and arbitrary feed boundaries: the same update times (the values differ only because
    # gradients do not cross piece boundaries)
    other = StreamLearner(model, lr=LRS, chunk_size=3, progress=False)
    other.stream([stream[:20], stream[20:21], stream[21:]])
    assert other.update_log == expected and other.tokens_learned == 52
    # one level's update is exactly -lr times the gradient summed over its period (level 1, first period)
    fresh = StreamLearner(model, lr=LRS, chunk_size=7, progress=False)
    fresh.feed(stream[:6])  # 5 counted tokens: level 1 updates once, level 2 accumulates
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in fresh.weights}
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    logits = ref(input_ids=stream[:5][None], past_key_values=HopeCache(ref.config), use_cache=True).logits[0]
    grads = torch.autograd.grad(F.cross_entropy(logits, stream[1:6], reduction="sum"), [params[n] for n in acc])
    for (name, _), g in zip(acc.items(), grads):
        if ".cms.levels.1." in name or ".cms.norms.1." in name:
            torch.testing.assert_close(fresh.weights[name], params[name].detach() - 0.1 * g, rtol=0, atol=1e-13)
        else:
            assert torch.equal(fresh.weights[name], params[name].detach())


@pytest.mark.parametrize("layout", ["linear", "hybrid"])
def test_restore_reproduces_the_next_update(tmp_path, layout):
    model = _model(layout)
    stream = torch.randint(1, model.config.vocab_size, (60,))
    learner = StreamLearner(model, lr=LRS, chunk_size=4, progress=False)
    learner.feed(stream[:23])  # mid-period for both levels: non-empty gradient sums, a pending token
    assert learner.tokens_since_update == {1: 2, 2: 10}
    path = tmp_path / "learner.pt"
    learner.save(path)
    learner.feed(stream[23:40])
    restored = StreamLearner(model, lr=0.5, chunk_size=9, progress=False)  # its own settings are overwritten
    restored.load(path)
    restored.feed(stream[23:40])
    assert restored.update_log == learner.update_log
    for name in learner.weights:
        assert torch.equal(restored.weights[name], learner.weights[name]), name
    assert restored.tokens_since_update == learner.tokens_since_update
    assert torch.equal(restored.pending, learner.pending)
    assert restored.generate(max_new_tokens=4) == learner.generate(max_new_tokens=4)


def test_base_model_untouched_until_commit_and_applied_restores():
    model = _model()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    learner = StreamLearner(model, lr=LRS, chunk_size=8, progress=False)
    stream = torch.randint(1, model.config.vocab_size, (30,))
    learner.feed(stream)
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(base[k], v) for k, v in learner.weights.items())
    # the learned weights in a plain forward equal the learner's own next-token logits
    with learner.applied():
        cache = HopeCache(model.config)
        full = model(input_ids=stream[None], past_key_values=cache, use_cache=True).logits[0, -1]
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())
    learner2 = copy.deepcopy(learner)
    learner2.cache = HopeCache(model.config)
    learner2.pending = torch.empty(0, dtype=torch.long)
    torch.testing.assert_close(learner2.logits(stream), full, rtol=0, atol=1e-10)
    learner.commit()
    sd = model.state_dict()
    for k in base:
        assert torch.equal(sd[k], learner.weights[k] if k in learner.weights else base[k]), k


def test_generate_and_logits_leave_the_state_alone():
    model = _model()
    learner = StreamLearner(model, lr=LRS, chunk_size=8, progress=False)
    learner.feed(torch.randint(1, model.config.vocab_size, (17,)))
    before = learner.state_dict()
    out = learner.generate([3, 4], max_new_tokens=5)
    assert len(out) == 5
    after = learner.state_dict()
    assert before["tokens_learned"] == after["tokens_learned"] and torch.equal(before["pending"], after["pending"])
    for a, b in zip(before["cache"], after["cache"]):
        for k in a["state"]:
            assert torch.equal(a["state"][k], b["state"][k])
    # greedy decoding equals argmax of a full forward over the same tokens with the learned weights
    with learner.applied():
        ids = torch.cat([learner.pending, torch.tensor([3, 4])])
        seq = ids.tolist()
        cache = copy.deepcopy(learner.cache)
        logits = model(input_ids=ids[None], past_key_values=cache, use_cache=True).logits[0, -1]
        for _ in range(5):
            seq.append(int(logits.argmax()))
            logits = model(input_ids=torch.tensor([[seq[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
    assert seq[len(ids):] == out


def test_everything_frozen_streams_without_updates():
    model = _model(periods=[0, 0, 0])
    learner = StreamLearner(model, lr=0.1, chunk_size=4, progress=False)
    result = learner.feed(torch.randint(1, model.config.vocab_size, (10,)))
    assert result["tokens"] == 9 and result["updates"] == 0 and learner.weights == {} and learner.update_log == []


def test_clear_errors():
    model = _model()
    with pytest.raises(StreamLearnerError, match="chunk_size"):
        StreamLearner(model, chunk_size=0)
    with pytest.raises(StreamLearnerError, match="lr has 2 entries"):
        StreamLearner(model, lr=[0.1, 0.1])
    with pytest.raises(StreamLearnerError, match="no learning rate for CMS level"):
        StreamLearner(model, lr={1: 0.1})
    with pytest.raises(StreamLearnerError, match="periods has"):
        StreamLearner(model, periods=[1])
    learner = StreamLearner(model, progress=False)
    with pytest.raises(StreamLearnerError, match="one stream"):
        learner.feed(torch.zeros(2, 5, dtype=torch.long))
    other = StreamLearner(_model(periods=[0, 5, 6]), progress=False)
    with pytest.raises(StreamLearnerError, match="periods"):
        other.load_state_dict(learner.state_dict())


def test_learning_on_a_repetitive_stream_lowers_the_loss():
    """Behaviour, not only mechanics: the fast levels pick up a repeated pattern that the frozen model cannot."""
    model = _model(periods=[0, 8, 32])
    torch.manual_seed(1)
    stream = torch.randint(1, model.config.vocab_size, (10,)).repeat(16)
    second_half = {}
    for lr in (0.0, 0.05):
        learner = StreamLearner(model, lr=[0.0, lr, lr], chunk_size=16, progress=False)
        learner.feed(stream[:81])
        result = learner.feed(stream[81:])
        second_half[lr] = result["loss_sum"] / result["tokens"]
    assert second_half[0.05] < 0.6 * second_half[0.0], second_half

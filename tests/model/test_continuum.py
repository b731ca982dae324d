"""ContinuumOptimizer: the CMS training rule (paper Eq. 31; docs/training.md).

Level l of every layer steps only when the tokens counted since its last step reach its period, on the SUM of the
gradients collected since; period 0 is frozen; everything else steps every time. Checked against a shadow optimizer
that applies exactly that rule by hand, for AdamW with a learning-rate schedule.
"""

import copy

import pytest
import torch

from _training_utils import one_thread, params_by_level, tiny_config, tiny_model
from hope_hf.training import ContinuumOptimizer, cms_parameter_levels, count_label_tokens

TOL = dict(rtol=0, atol=1e-7)  # the wrapper and the shadow do the same float32 operations


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _batch(step, vocab=97):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, 5:] = -100  # 4 of row 0's 8 shifted targets and all 8 of row 1's: 12 tokens per step
    return ids, labels


def test_count_label_tokens_uses_the_shifted_labels():
    labels = torch.tensor([[5, 6, -100, 7], [-100, 1, 2, 3]])
    assert count_label_tokens(labels) == 5  # the first column is never a target
    assert count_label_tokens(labels, shift=False) == 6


def test_cms_parameters_are_found_by_name_with_their_periods():
    model = tiny_model(periods=(16, 48, 0))
    levels = cms_parameter_levels(model)
    names = set(levels)
    assert "model.layers.1.cms.levels.2.down_proj.weight" in names
    assert "model.layers.0.cms.norms.1.weight" in names  # the level's pre-norm belongs to the level
    assert levels["model.layers.0.cms.levels.1.up_proj.weight"] == (1, 48)
    assert not any("self_attn" in n or "titans" in n or "embed" in n for n in names)
    cms_count = sum(1 for n, _ in model.named_parameters() if ".cms." in n)
    assert len(levels) == cms_count


def test_levels_step_at_their_period_on_summed_gradients():
    """12 tokens per step: level 0 (period 20) steps every 2nd step, level 1 (period 36) every 3rd,
    level 2 frozen; the rest every step. Every parameter equals a shadow AdamW fed by hand."""
    model = tiny_model(periods=(20, 36, 0))
    opt = ContinuumOptimizer.from_model(model, lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    assert opt.periods == {0: 20, 1: 36, 2: 0}

    shadow = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    decay = {n: (0.1 if p.ndim >= 2 else 0.0) for n, p in model.named_parameters()}
    shadow_opt = {n: torch.optim.AdamW([shadow[n]], lr=1e-2, weight_decay=decay[n]) for n in shadow}
    levels = {n: lvl for lvl, group in params_by_level(model).items() for n in group}
    grad_sum = {}
    since = {0: 0, 1: 0}
    expected_steps = {0: [], 1: []}
    for step in range(1, 8):
        ids, labels = _batch(step)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(input_ids=ids, labels=labels).loss.backward()  # the forward hook counts 12 tokens
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad()
        # the rule, by hand
        due = {lvl for lvl, period in ((0, 20), (1, 36)) if since[lvl] + 12 >= period}
        for lvl in (0, 1):
            since[lvl] = 0 if lvl in due else since[lvl] + 12
            if lvl in due:
                expected_steps[lvl].append(step)
        for n, g in grads.items():
            lvl = levels[n]
            if lvl == 2:
                continue
            if lvl is not None:
                grad_sum[n] = grad_sum.get(n, 0) + g
                if lvl not in due:
                    continue
                g = grad_sum.pop(n)
            shadow_opt[n].param_groups[0]["lr"] = lr
            shadow[n].grad = g
            shadow_opt[n].step()
        assert opt.last_stepped_levels == sorted(due)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), shadow[n].detach(), **TOL, msg=f"{n} at step {step}")
            changed = not torch.equal(p.detach(), before[n])
            should = levels[n] is None or levels[n] in due
            assert changed == should, (n, step, changed, should)
    assert expected_steps == {0: [2, 4, 6], 1: [3, 6]}
    assert opt.level_steps == {0: 3, 1: 2, 2: 0}
    assert opt.total_tokens == 7 * 12


def test_short_periods_step_every_time_and_match_the_plain_optimizer():
    """Periods <= one step's tokens: the wrapper is exactly the wrapped AdamW."""
    a = tiny_model(periods=(1, 12))
    b = copy.deepcopy(a)
    opt_a = ContinuumOptimizer.from_model(a, lr=3e-3)
    opt_b = torch.optim.AdamW([p for p in b.parameters() if p.ndim >= 2], lr=3e-3, weight_decay=0.0)
    opt_b.add_param_group({"params": [p for p in b.parameters() if p.ndim < 2], "weight_decay": 0.0})
    for step in range(3):
        ids, labels = _batch(step)
        for m, o in ((a, opt_a), (b, opt_b)):
            m(input_ids=ids, labels=labels).loss.backward()
            o.step()
            o.zero_grad()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)


def test_a_closures_tokens_belong_to_its_step():
    """step(closure): the closure's forward is counted before the levels due are chosen, as for a plain step."""
    a = tiny_model(periods=(20, 36, 0))
    b = copy.deepcopy(a)
    opt_a = ContinuumOptimizer.from_model(a, lr=1e-2)
    opt_b = ContinuumOptimizer.from_model(b, lr=1e-2)
    for step in range(1, 7):
        ids, labels = _batch(step)
        a(input_ids=ids, labels=labels).loss.backward()
        opt_a.step()
        opt_a.zero_grad()

        def closure():
            opt_b.zero_grad()
            loss = b(input_ids=ids, labels=labels).loss
            loss.backward()
            return loss

        opt_b.step(closure)
        assert opt_b.last_stepped_levels == opt_a.last_stepped_levels, step
        assert opt_b.total_tokens == opt_a.total_tokens == 12 * step and opt_b.pending_tokens == 0
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)


def _run(model, opt, sched, steps):
    for step in steps:
        ids, labels = _batch(step)
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_state_dict_resume_is_exact_with_pending_gradient_sums(tmp_path):
    model = tiny_model(periods=(20, 36, 0))
    reference = copy.deepcopy(model)

    def make(m):
        opt = ContinuumOptimizer.from_model(m, lr=1e-2)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    opt, sched = make(reference)
    _run(reference, opt, sched, range(1, 8))

    opt, sched = make(model)
    _run(model, opt, sched, range(1, 5))  # level 1 has one step's gradients pending, level 0 none
    assert len(opt.grad_sums) > 0
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "c.pt")
    opt.untrack()

    resumed = tiny_model(seed=123, periods=(20, 36, 0))  # different init: everything must come from the checkpoint
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2, sched2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert opt2.tokens_since_step == opt.tokens_since_step and opt2.level_steps == opt.level_steps
    _run(resumed, opt2, sched2, range(5, 8))
    for (n, p), q in zip(resumed.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_explicit_token_counts_without_the_hook():
    model = tiny_model(periods=(100,))
    opt = ContinuumOptimizer.from_model(model, lr=1e-2, track_tokens=False)
    level0 = {n: p.detach().clone() for n, p in params_by_level(model)[0].items()}
    ids, labels = _batch(0)
    for n_tokens, should_change in ((60, False), (39, False), (1, True)):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step(num_tokens=n_tokens)
        opt.zero_grad()
        changed = any(not torch.equal(p, level0[n]) for n, p in params_by_level(model)[0].items())
        assert changed == should_change, n_tokens
    assert opt.total_tokens == 100


def test_bad_inputs_raise_clear_errors():
    model = tiny_model(periods=(16, 48))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ContinuumOptimizer("adamw", model)
    with pytest.raises(ValueError, match="model"):
        ContinuumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="cms_levels"):
        ContinuumOptimizer.from_model(plain)
    opt = ContinuumOptimizer.from_model(model)
    opt.tokens_since_step[1] = 5
    with pytest.warns(UserWarning, match="restart from zero"):
        opt.load_state_dict(opt.optimizer.state_dict())  # a plain optimizer's state: counters restart
    assert opt.tokens_since_step == {0: 0, 1: 0}
    other = ContinuumOptimizer.from_model(tiny_model(periods=(16, 64)))
    with pytest.raises(ValueError, match="periods"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="period"):
        tiny_config(periods=(-1,))

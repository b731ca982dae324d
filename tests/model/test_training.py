"""`Trainer` with `HopeForCausalLM`, unchanged: loss falls, gradient accumulation, activation checkpointing,
evaluation, saving and exact resuming, and the CMS rule through `HopeTrainer` / `continuum_optimizer`."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from _training_utils import one_thread, params_by_level, tiny_model
from hope_hf import HopeForCausalLM
from hope_hf.training import ContinuumOptimizer, HopeTrainer, checkpointing_args, continuum_optimizer


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
        per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="constant", max_steps=1,
        logging_steps=1, save_strategy="no", dataloader_num_workers=0, weight_decay=0.0, max_grad_norm=0.0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _padded_dataset(n, seq=17, vocab=97, seed=0):
    """Rows with different numbers of loss tokens: a per-batch mean of per-row means would differ from the token
    mean, so only an honoured `num_items_in_batch` makes accumulation match the large batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    labels = ids.clone()
    for i in range(n):
        labels[i, 4 + (5 * i) % (seq - 4):] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


class _Grabber(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class _LossRecorder(HopeTrainer):
    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.item())
        return loss


def _first_step(tmp_path, model, data, **kw):
    grab = _Grabber()
    trainer = _LossRecorder(model=model, args=_args(tmp_path, **kw), train_dataset=data, callbacks=[grab])
    trainer.losses = []
    trainer.train()
    return sum(trainer.losses), grab.grads


def test_gradient_accumulation_and_checkpointing_match_the_full_batch(tmp_path):
    """2 micro-batches x 2 = one batch of 4 (loss and every gradient, float32: rtol 1e-5, atol 1e-7); activation
    checkpointing gives the same gradients too."""
    data = _padded_dataset(4)
    model = tiny_model()
    full_loss, full_grads = _first_step(tmp_path, copy.deepcopy(model), data)
    ga_loss, ga_grads = _first_step(tmp_path, copy.deepcopy(model), data, per_device_train_batch_size=2,
                                    gradient_accumulation_steps=2)
    ck_loss, ck_grads = _first_step(tmp_path, copy.deepcopy(model), data, **checkpointing_args(True))

    # the reference: one forward over all 4 rows, token-mean loss
    batch = data[:]
    ref = model(input_ids=torch.tensor(batch["input_ids"]), labels=torch.tensor(batch["labels"])).loss
    ref.backward()
    assert full_loss == pytest.approx(ref.item(), rel=1e-6)
    assert ga_loss == pytest.approx(ref.item(), rel=1e-5)
    assert ck_loss == pytest.approx(ref.item(), rel=1e-6)
    assert set(ga_grads) == set(full_grads) == {n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(full_grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
        torch.testing.assert_close(ga_grads[n], full_grads[n], rtol=1e-5, atol=1e-7, msg=n)
        torch.testing.assert_close(ck_grads[n], full_grads[n], rtol=1e-5, atol=1e-7, msg=n)
    # the row-mean of a naive accumulation would be visibly different: the test can tell
    rows = [model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
            for ids, labels in zip(batch["input_ids"], batch["labels"])]
    assert abs(sum(rows) / 4 - ref.item()) > 1e-3


class _ChangeRecorder(TrainerCallback):
    def __init__(self):
        self.before, self.changed = None, {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.changed[state.global_step] = {n for n, p in model.named_parameters() if not torch.equal(p, self.before[n])}


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    """6 steps of 4 rows x 16 tokens (64 tokens/step); CMS level 1 has period 128 (steps 2, 4, 6), level 2 is frozen.
    Stopping after the step-3 checkpoint (level 1's gradients of step 3 pending) and resuming gives exactly the
    weights of the uninterrupted run."""
    data = _padded_dataset(48, seed=1)
    data = data.map(lambda r: {"labels": r["input_ids"]})  # every row 16 loss tokens
    periods = (16, 128, 0)
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="cosine")

    rec = _ChangeRecorder()
    full = HopeTrainer(model=tiny_model(periods=periods), args=_args(tmp_path / "a", **kw), train_dataset=data,
                       callbacks=[rec])
    full.train()
    levels = params_by_level(full.model)
    for step, changed in rec.changed.items():
        assert set(levels[0]) <= changed and set(levels[None]) <= changed
        assert (set(levels[1]) <= changed) == (step % 2 == 0) and not (set(levels[1]) & changed and step % 2)
        assert not set(levels[2]) & changed
    assert full.continuum_optimizer.level_steps == {0: 6, 1: 3, 2: 0}

    part = HopeTrainer(model=tiny_model(periods=periods), args=_args(tmp_path / "b", **kw), train_dataset=data,
                       callbacks=[_StopAt(3)])
    part.train()
    assert part.state.global_step == 3 and part.continuum_optimizer.grad_sums  # step-3 gradients pending
    resumed = HopeTrainer(model=tiny_model(seed=7, periods=periods), args=_args(tmp_path / "b", **kw),
                          train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    assert resumed.continuum_optimizer.level_steps == {0: 6, 1: 3, 2: 0}
    for (n, p), q in zip(resumed.model.named_parameters(), full.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=n)


def test_stock_trainer_with_the_factory_equals_hope_trainer(tmp_path):
    data = _padded_dataset(12, seed=2)
    periods = (16, 100, 0)
    a = HopeTrainer(model=tiny_model(periods=periods), args=_args(tmp_path / "a", max_steps=3), train_dataset=data)
    a.train()
    model = tiny_model(periods=periods)
    args = _args(tmp_path / "b", max_steps=3)
    b = Trainer(model=model, args=args, train_dataset=data, optimizers=(continuum_optimizer(model, args), None))
    b.train()
    assert isinstance(a.continuum_optimizer, ContinuumOptimizer)
    assert a.continuum_optimizer.level_steps == {0: 3, 1: 1, 2: 0}
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=n)


@pytest.mark.parametrize("loss_option", ["label_smoothing_factor", "compute_loss_func"])
def test_cms_tokens_are_counted_when_trainer_takes_the_labels_out(tmp_path, loss_option):
    """Label smoothing and a compute_loss_func make Trainer remove `labels` from the forward's inputs, where the
    optimizer's hook counts the CMS tokens: HopeTrainer counts them itself then (every level stayed frozen)."""
    data = _padded_dataset(12, seed=2)
    periods = (16, 100, 0)
    plain = HopeTrainer(model=tiny_model(periods=periods), args=_args(tmp_path / "a", max_steps=3), train_dataset=data)
    plain.train()
    if loss_option == "label_smoothing_factor":
        options = dict(args=_args(tmp_path / "b", max_steps=3, label_smoothing_factor=0.1))
    else:
        def loss_func(outputs, labels, num_items_in_batch=None):
            logits = outputs.logits[:, :-1].flatten(0, 1)
            return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)

        options = dict(args=_args(tmp_path / "b", max_steps=3), compute_loss_func=loss_func)
    other = HopeTrainer(model=tiny_model(periods=periods), train_dataset=data, **options)
    other.train()
    counted = plain.continuum_optimizer
    assert other.continuum_optimizer.total_tokens == counted.total_tokens > 0
    assert other.continuum_optimizer.level_steps == counted.level_steps == {0: 3, 1: 1, 2: 0}


def test_a_step_that_counts_no_tokens_warns(tmp_path):
    """The stock Trainer with label smoothing cannot show the labels to the optimizer's hook: say so."""
    data = _padded_dataset(8, seed=2)
    model = tiny_model(periods=(16, 100, 0))
    args = _args(tmp_path, max_steps=1, label_smoothing_factor=0.1)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(continuum_optimizer(model, args), None))
    with pytest.warns(UserWarning, match="counted no tokens"):
        trainer.train()


def test_loss_falls_then_evaluate_and_save_roundtrip(tmp_path):
    """A learnable stream (each row counts up modulo the vocabulary from a random start): the loss must fall by far
    more than noise in 30 steps; eval_loss equals the token-mean loss computed by hand; the saved model reloads with
    identical logits."""
    g = torch.Generator().manual_seed(0)
    vocab = 97
    starts = torch.randint(0, vocab, (96, 1), generator=g)
    ids = (starts + torch.arange(33) * torch.randint(1, 4, (96, 1), generator=g)) % vocab
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    train, evals = data.select(range(80)), data.select(range(80, 96))
    args = _args(tmp_path, max_steps=30, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=5,
                 per_device_eval_batch_size=8, eval_strategy="steps", eval_steps=30)
    trainer = HopeTrainer(model=tiny_model(), args=args, train_dataset=train, eval_dataset=evals)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] > math.log(vocab) - 0.5  # starts near uniform
    assert losses[-1] < losses[0] - 1.5, losses

    metrics = trainer.evaluate()
    model = trainer.model.eval()
    with torch.no_grad():
        e = evals[:]
        manual = model(input_ids=torch.tensor(e["input_ids"]), labels=torch.tensor(e["labels"])).loss.item()
    assert metrics["eval_loss"] == pytest.approx(manual, rel=1e-5)
    assert metrics["eval_loss"] < losses[0] - 1.5

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = HopeForCausalLM.from_pretrained(str(tmp_path / "saved")).eval()
    x = torch.tensor(e["input_ids"][:2])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)

"""`Trainer` integration of the CMS training rule.

Two one-line ways to train a HOPE model with the Continuum Memory System's per-level update periods:

* ``HopeTrainer(model=model, args=args, train_dataset=...)``: a ``Trainer`` whose optimizer (built from
  ``TrainingArguments`` as usual: ``optim``, ``learning_rate``, ``weight_decay``, ...) is wrapped in
  :class:`~hope_hf.training.continuum.ContinuumOptimizer`;
* ``Trainer(..., optimizers=(continuum_optimizer(model, args), None))`` with the stock ``Trainer``.

Everything else is ``Trainer`` unchanged: labels = input ids, ``num_items_in_batch``, gradient accumulation,
activation checkpointing, evaluation, checkpoints and resuming (the optimizer's state holds the CMS counters and
gradient sums, so a resumed run ends where an uninterrupted one does).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import Trainer, TrainingArguments

from .continuum import ContinuumOptimizer, count_label_tokens

__all__ = ["HopeTrainer", "checkpointing_args", "continuum_optimizer", "decay_parameter_names"]


def checkpointing_args(enabled: bool = True) -> dict:
    """``TrainingArguments`` keywords that turn activation checkpointing on, for Transformers 5.17 and later.

    (``activation_checkpointing`` replaced ``gradient_checkpointing`` in later 5.x releases.)
    """
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled}


def decay_parameter_names(model) -> list[str]:
    """Weight decay applies to matrices only: not to biases, norm gains (``cms.norms.*`` included) or other vectors."""
    return [n for n, p in model.named_parameters() if p.ndim >= 2 and "bias" not in n.rsplit(".", 1)[-1]]


def _unwrap_optimizer(optimizer):
    # accelerate's AcceleratedOptimizer (and similar wrappers) keep the real optimizer in `.optimizer`.
    while optimizer is not None and not isinstance(optimizer, ContinuumOptimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class HopeTrainer(Trainer):
    """A ``Trainer`` that steps each CMS level at its own period (paper Eq. 31; docs/training.md); otherwise
    ``Trainer`` unchanged.

    A user optimizer passed as ``optimizers=(optimizer, scheduler)`` is wrapped as well.
    """

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "HopeTrainer's ContinuumOptimizer cannot run under DeepSpeed ZeRO: ZeRO re-partitions the parameters "
                "into flat buffers, so per-level CMS steps cannot be applied. Use DDP or FSDP2, or train under "
                "DeepSpeed with the plain Trainer (`hope-hf train --no_continuum`), where every level steps every step."
            )
        if self.optimizer is None:
            super().create_optimizer() if model is None else super().create_optimizer(model)
        if not isinstance(_unwrap_optimizer(self.optimizer), ContinuumOptimizer):
            self.optimizer = ContinuumOptimizer(self.optimizer, self.model if model is None else model)
        return self.optimizer

    def get_decay_parameter_names(self, model) -> list[str]:
        return decay_parameter_names(model)

    def compute_loss(self, model, inputs, *args, **kwargs):
        # For label smoothing or a compute_loss_func, Trainer takes the labels out of the forward's inputs, where the
        # optimizer's hook counts the CMS tokens: count them here then (the same tokens, labels[..., 1:] != -100).
        optimizer = self.continuum_optimizer
        labels = inputs.get("labels")
        if (
            labels is not None
            and (self.label_smoother is not None or self.compute_loss_func is not None)
            and optimizer is not None
            and optimizer.tracks_tokens
            and model.training
            and torch.is_grad_enabled()
        ):
            optimizer.add_tokens(count_label_tokens(labels))
        return super().compute_loss(model, inputs, *args, **kwargs)

    @property
    def continuum_optimizer(self) -> ContinuumOptimizer | None:
        """The :class:`ContinuumOptimizer` under Accelerate's wrapper (None before training starts)."""
        return _unwrap_optimizer(self.optimizer)


def continuum_optimizer(model, args: TrainingArguments | None = None, **optimizer_kwargs) -> ContinuumOptimizer:
    """The optimizer ``Trainer`` would build from ``args`` (AdamW by default), wrapped in ``ContinuumOptimizer``.

    For the stock ``Trainer``: ``Trainer(model, args, ..., optimizers=(continuum_optimizer(model, args), None))``.
    Without ``args``: ``ContinuumOptimizer.from_model(model, **optimizer_kwargs)`` (AdamW, lr 1e-3).
    """
    if args is None:
        return ContinuumOptimizer.from_model(model, **optimizer_kwargs)
    decay = set(decay_parameter_names(model))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay and p.requires_grad],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay and p.requires_grad], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {**kwargs, **optimizer_kwargs}
    return ContinuumOptimizer(optimizer_cls(groups, **kwargs), model)

"""The Continuum Memory System's training rule (paper Eq. 30-31; docs/training.md).

CMS level ``l`` of every decoder layer has a period ``C_l`` in tokens (``config.cms_levels[l]["period"]``). Its
parameters change only when the tokens seen since the level's last change reach ``C_l``, and then by one step of the
wrapped optimizer on the *sum* of the gradients collected since that change. A level with period 0 is frozen. Every
other parameter (embeddings, mixers, norms outside the CMS, the head) steps every time.

:class:`ContinuumOptimizer` wraps any ``torch.optim.Optimizer``: it shares the wrapped optimizer's ``param_groups`` and
``state`` (so learning-rate schedulers, gradient clipping and Accelerate see an ordinary optimizer) and, at every
``step``, hides the gradients of the levels that are not due (a torch optimizer skips a parameter whose ``grad`` is
``None``), hands the summed gradients to the levels that are due, and keeps the per-level token counters and gradient
sums in its ``state_dict`` so that resuming from a checkpoint is exact.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "CMS_PARAM_PATTERN",
    "ContinuumOptimizer",
    "cms_parameter_levels",
    "count_label_tokens",
    "unwrap_model",
]

# A CMS level's parameters: its SwiGLU MLP ``cms.levels.{l}.*`` and its pre-norm ``cms.norms.{l}.*`` (the norm is part
# of the level's block ``y + MLP_l(RMSNorm_l(y))``). ``cms.level_weights`` (independent variant) steps every time.
CMS_PARAM_PATTERN = re.compile(r"(?:^|\.)layers\.\d+\.cms\.(?:levels|norms)\.(\d+)\.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / ``torch.compile`` wrappers (they keep the wrapped model in ``module`` or
    ``_orig_mod``)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
    return model


def _config_periods(model: nn.Module) -> list[int]:
    config = getattr(unwrap_model(model), "config", None)
    levels = getattr(config, "cms_levels", None)
    if levels is None:
        raise ValueError(
            "ContinuumOptimizer needs the CMS periods: the model has no `config.cms_levels` "
            "(a list of {'period': tokens, 'intermediate_size': n}); pass `periods=[...]` explicitly."
        )
    periods = []
    for i, level in enumerate(levels):
        period = level["period"] if isinstance(level, Mapping) else getattr(level, "period")
        if not isinstance(period, int) or isinstance(period, bool) or period < 0:
            raise ValueError(f"config.cms_levels[{i}]['period'] must be an int >= 0 (0 = frozen), got {period!r}")
        periods.append(period)
    return periods


def cms_parameter_levels(
    model: nn.Module, periods: list[int] | None = None
) -> dict[str, tuple[int, int]]:
    """Map the name of every trainable CMS parameter to ``(level, period)``.

    ``periods`` defaults to ``[level["period"] for level in model.config.cms_levels]``.
    """
    if periods is None:
        periods = _config_periods(model)
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        match = CMS_PARAM_PATTERN.search(name)
        if match is None:
            continue
        level = int(match.group(1))
        if level >= len(periods):
            raise ValueError(
                f"parameter {name!r} belongs to CMS level {level}, but only {len(periods)} periods are known")
        out[name] = (level, int(periods[level]))
    return out


def count_label_tokens(labels: torch.Tensor, shift: bool = True) -> int:
    """Tokens that carry a loss: ``labels != -100``, after the causal shift (the first position predicts nothing)."""
    if shift:
        labels = labels[..., 1:]
    return int((labels != -100).sum().item())


class ContinuumOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that CMS level ``l`` steps only every ``period_l`` tokens, on its summed gradients.

    Args:
        optimizer: any torch optimizer over the model's parameters (any grouping of them).
        model: the model (``HopeForCausalLM``, possibly wrapped by DDP/FSDP/compile). Its CMS parameters are found by
            name (``model.layers.{i}.cms.levels.{l}.*`` and ``...cms.norms.{l}.*``), their periods in
            ``model.config.cms_levels``.
        periods: overrides the periods from the config (one int per level, in tokens; 0 = frozen).
        track_tokens: register a forward pre-hook on ``model`` that, in training mode, counts the tokens of every
            batch from its ``labels`` keyword argument (``labels[..., 1:] != -100``, the tokens the causal-LM loss
            uses). With ``False``, call :meth:`add_tokens` (or pass ``num_tokens`` to :meth:`step`) yourself.
        sync_tokens: under ``torch.distributed`` with several processes, all-reduce the token count at every step so
            that every rank steps the same levels (the count is then the global count, as the global batch is).

    A level is due when the tokens seen since its last step (including the current step's) reach its period; the
    counter then restarts at 0. Levels whose period is at most one step's tokens therefore step every time.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        *,
        periods: list[int] | None = None,
        param_levels: Mapping[nn.Parameter, tuple[int, int]] | None = None,
        track_tokens: bool = True,
        sync_tokens: bool = True,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"ContinuumOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, ContinuumOptimizer):
            raise TypeError("the optimizer is already a ContinuumOptimizer")
        if param_levels is None:
            if model is None:
                raise ValueError("ContinuumOptimizer needs `model` (to find the CMS parameters) or `param_levels`")
            named = dict(model.named_parameters())
            param_levels = {named[name]: lp for name, lp in cms_parameter_levels(model, periods).items()}
        # Sets up the hook dictionaries of torch.optim.Optimizer (with a placeholder parameter), then shares the
        # wrapped optimizer's own group dicts and state.
        super().__init__([torch.empty(0, requires_grad=True)], dict(optimizer.defaults))
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults

        in_optimizer = {p for group in self.param_groups for p in group["params"]}
        self._param_level: dict[nn.Parameter, int] = {}
        self.periods: dict[int, int] = {}
        for param, (level, period) in param_levels.items():
            if param not in in_optimizer:
                continue
            if self.periods.setdefault(level, period) != period:
                raise ValueError(f"CMS level {level} has two periods: {self.periods[level]} and {period}")
            self._param_level[param] = level
        self.tokens_since_step: dict[int, int] = {level: 0 for level in self.periods}
        self.level_steps: dict[int, int] = {level: 0 for level in self.periods}
        self.grad_sums: dict[nn.Parameter, torch.Tensor] = {}
        self.pending_tokens = 0
        self.total_tokens = 0
        self.sync_tokens = sync_tokens
        self.last_stepped_levels: list[int] = []
        self._hook = None
        if track_tokens and model is not None:
            self.track(model)

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        periods: list[int] | None = None,
        track_tokens: bool = True,
        sync_tokens: bool = True,
        **optimizer_kwargs: Any,
    ) -> ContinuumOptimizer:
        """Build ``optimizer_cls`` (AdamW by default) over ``model`` and wrap it.

        Weight decay applies to matrices only (not to biases, norms or 1-d parameters), as in ``Trainer``.
        """
        decay, no_decay = [], []
        for _, param in model.named_parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        inner = optimizer_cls(groups, lr=lr, **optimizer_kwargs)
        return cls(inner, model, periods=periods, track_tokens=track_tokens, sync_tokens=sync_tokens)

    # ----------------------------------------------------------------------------------------------- token counting
    def track(self, model: nn.Module) -> None:
        """Count the tokens of every training-mode forward of ``model`` that receives ``labels=`` (idempotent)."""
        if self._hook is not None:
            self._hook.remove()

        def _count(module, args, kwargs):
            labels = kwargs.get("labels")
            if module.training and torch.is_grad_enabled() and labels is not None:
                self.add_tokens(count_label_tokens(labels))

        self._hook = unwrap_model(model).register_forward_pre_hook(_count, with_kwargs=True)

    def untrack(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @property
    def tracks_tokens(self) -> bool:
        """Whether a forward hook counts the tokens (see :meth:`track`)."""
        return self._hook is not None

    def add_tokens(self, num_tokens: int) -> None:
        """Add this process's tokens to the step being accumulated."""
        self.pending_tokens += int(num_tokens)

    def _global_tokens(self, local: int) -> int:
        if self.sync_tokens and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            count = torch.tensor([local], dtype=torch.int64, device=device)
            dist.all_reduce(count)
            return int(count.item())
        return local

    # ----------------------------------------------------------------------------------------------- stepping
    def levels_due(self, num_tokens: int) -> list[int]:
        """The levels that step if the current step has ``num_tokens`` (global) tokens."""
        return sorted(
            level
            for level, period in self.periods.items()
            if period > 0 and self.tokens_since_step[level] + num_tokens >= period
        )

    @torch.no_grad()
    def _prepare_grads(self, due: set[int]) -> None:
        for param, level in self._param_level.items():
            if self.periods[level] == 0:  # frozen
                param.grad = None
                continue
            grad = param.grad
            if grad is not None:
                acc = self.grad_sums.get(param)
                if acc is None:
                    self.grad_sums[param] = grad.detach().clone() if level not in due else grad
                else:
                    acc.add_(grad)
            if level in due:
                param.grad = self.grad_sums.pop(param, None)
            else:
                param.grad = None

    def step(self, closure=None, num_tokens: int | None = None):
        """One optimizer step. ``num_tokens``: this process's tokens of the step, added to those counted so far
        (a closure's forward included: it runs first)."""
        loss = None
        if closure is not None:
            # A closure re-computes the gradients (and its forward's tokens belong to this step); take them before
            # the CMS rule hides anything.
            with torch.enable_grad():
                loss = closure()
        if num_tokens is not None:
            self.add_tokens(num_tokens)
        tokens = self._global_tokens(self.pending_tokens)
        self.pending_tokens = 0
        self.total_tokens += tokens
        if tokens == 0 and self.tracks_tokens and self.periods:
            warnings.warn(
                "ContinuumOptimizer counted no tokens for this step, so no CMS level with a period steps: the model's "
                "training forward received no `labels` (Trainer removes them for label smoothing or a "
                "compute_loss_func; HopeTrainer counts them then). Pass `num_tokens=` to step() or call add_tokens().",
                stacklevel=2,
            )
        due = set(self.levels_due(tokens))
        self._prepare_grads(due)
        self.optimizer.step()
        for level in self.periods:
            if level in due:
                self.tokens_since_step[level] = 0
                self.level_steps[level] += 1
            elif self.periods[level] > 0:
                self.tokens_since_step[level] += tokens
        self.last_stepped_levels = sorted(due)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "optimizer" not in self.__dict__:  # torch.optim.Optimizer.__init__ adding the placeholder
            super().add_param_group(param_group)
        else:
            self.optimizer.add_param_group(param_group)

    # ----------------------------------------------------------------------------------------------- state
    def _param_index(self) -> dict[nn.Parameter, int]:
        index, i = {}, 0
        for group in self.param_groups:
            for param in group["params"]:
                if param not in index:
                    index[param] = i
                    i += 1
        return index

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        index = self._param_index()
        sd["continuum"] = {
            "periods": {str(level): period for level, period in self.periods.items()},
            "tokens_since_step": {str(level): n for level, n in self.tokens_since_step.items()},
            "level_steps": {str(level): n for level, n in self.level_steps.items()},
            "grad_sums": {index[param]: acc.clone() for param, acc in self.grad_sums.items()},
            "pending_tokens": self.pending_tokens,
            "total_tokens": self.total_tokens,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        cont = state_dict.pop("continuum", None)
        self.optimizer.load_state_dict(state_dict)
        # torch's load_state_dict replaces the group dicts and the state object: share them again.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        if cont is None:
            # A plain optimizer's state, or one that went through torch.distributed.checkpoint (FSDP checkpoints keep
            # only per-parameter state and the groups): the wrapped optimizer is restored, the CMS rule restarts.
            warnings.warn(
                "this optimizer state has no 'continuum' entry (not saved by ContinuumOptimizer, or saved through "
                "torch.distributed.checkpoint): the CMS token counters and gradient sums restart from zero",
                stacklevel=2,
            )
            self.tokens_since_step = {level: 0 for level in self.periods}
            self.level_steps = {level: 0 for level in self.periods}
            self.grad_sums = {}
            self.pending_tokens = 0
            return
        saved = {int(k): int(v) for k, v in cont["periods"].items()}
        if saved != self.periods:
            raise ValueError(f"the checkpoint's CMS periods {saved} differ from this model's {self.periods}")
        self.tokens_since_step = {int(k): int(v) for k, v in cont["tokens_since_step"].items()}
        self.level_steps = {int(k): int(v) for k, v in cont["level_steps"].items()}
        params = {i: p for p, i in self._param_index().items()}
        self.grad_sums = {
            params[int(i)]: acc.to(device=params[int(i)].device, dtype=params[int(i)].dtype)
            for i, acc in cont["grad_sums"].items()
        }
        self.pending_tokens = int(cont["pending_tokens"])
        self.total_tokens = int(cont["total_tokens"])

    def __repr__(self) -> str:
        levels = ", ".join(f"level {i}: period {p}" for i, p in sorted(self.periods.items()))
        return f"ContinuumOptimizer({levels}) wrapping\n{self.optimizer!r}"

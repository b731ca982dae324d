"""The inference-time stream learner of the Continuum Memory System (paper Eq. 30-31; docs/design.md §12).

A HOPE model keeps learning after training: :class:`StreamLearner` feeds a token stream of any length through the
recurrent cache (``HopeCache``) piece by piece, takes the next-token loss of every piece, and updates CMS level ``l``
whenever the tokens seen since its last update reach its period ``C_l`` (``config.cms_levels[l]["period"]``), with
the *sum* of the gradients collected since that update. Fast levels adapt often, slow levels rarely, a level with
period 0 never.

The rule, exactly:

* Every streamed token ``x_t`` whose successor ``x_{t+1}`` is known contributes one error term, the gradient of its
  next-token loss ``-log p(x_{t+1} | x_{<=t})`` with respect to the CMS weights in use at that moment. The last token
  the learner has received waits (in ``pending``) until its successor arrives, so every counted token has a target.
* Pieces never straddle an update: the learner cuts the stream so that a piece ends exactly where a level's period is
  reached. Level ``l`` therefore changes exactly after ``C_l, 2 C_l, 3 C_l, ...`` counted tokens, by one step of the
  optimizer on the sum of the ``C_l`` error terms since its last change. The default optimizer is plain SGD with a
  learning rate per level: ``theta_l <- theta_l - lr_l * sum_t grad_t`` (Eq. 31).
* The per-level bookkeeping (token counters, gradient sums, stepping only the levels that are due) is the training
  rule's own :class:`~hope_hf.training.ContinuumOptimizer`, wrapped around an optimizer over the learner's copies.
* Gradients flow only inside a piece: the recurrent state (Titans fast weights, attention keys and values) that
  carries a piece to the next is detached.

The base model is never modified: the learner keeps its own copies of the CMS weights of every level with a non-zero
period and runs the model through ``torch.func.functional_call`` with them. :meth:`StreamLearner.commit` writes the
learned weights into the model when asked. Everything that defines the learner's future (weights, gradient sums,
counters, optimizer state, recurrent cache, pending token) round-trips through :meth:`state_dict` /
:meth:`load_state_dict` (and :meth:`save` / :meth:`load`, plain ``torch.save`` of tensors and numbers).

    >>> learner = StreamLearner(model, lr=1e-3, chunk_size=64)
    >>> learner.stream(token_pieces)                  # any iterable of token-id sequences; shows a progress bar
    >>> learner.generate(question_ids, max_new_tokens=8)
    >>> learner.commit()                              # optional: the model keeps what the stream taught it
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .cache_hope import HopeCache, HopeTitansCacheLayer
from .memory_hope import TitansState
from .modeling_hope import _check_ids
from .streaming import as_token_ids, token_bar
from .training.continuum import CMS_PARAM_PATTERN, ContinuumOptimizer, unwrap_model

__all__ = ["StreamLearner", "StreamLearnerError", "StreamLearnerWarning", "cache_state_dict",
           "load_cache_state_dict"]

_STATE_VERSION = 1


class StreamLearnerError(ValueError):
    """The stream learner cannot do what was asked (bad arguments, incompatible saved state, ...)."""


class StreamLearnerWarning(UserWarning):
    """Stream learning is diverging: an update blew a level's weights up (or made them or the loss non-finite).
    Shown once per learner; `warnings.simplefilter("error", StreamLearnerWarning)` makes it an error."""


# An update that multiplies (or divides) the norm of a level's weights by more than this is a divergence: a sane
# learning rate changes them by a small fraction per update (lr 1e-3: < 0.1 %; lr 1e4 on a tiny model: x 20,000).
DIVERGENCE_FACTOR = 2.0


# --------------------------------------------------------------------------------------------- cache (de)serialisation
def _is_plain(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, bool, int, float, str)) or value is None


def cache_state_dict(cache: HopeCache) -> list[dict[str, Any]]:
    """The content of a ``HopeCache`` as tensors and numbers (``torch.save``-able, loads with ``weights_only=True``).

    Titans layers: the ``TitansState`` tensors and the token count. Attention layers: every tensor, number and flag
    the library's layer object holds (keys, values, lengths), whatever the Transformers version calls them.
    """
    out = []
    for layer in cache.layers:
        if isinstance(layer, HopeTitansCacheLayer):
            state = None if layer.state is None else {k: v.detach().clone() for k, v in layer.state.tensors().items()}
            out.append({"kind": "titans", "seen_tokens": layer.seen_tokens, "state": state})
        else:
            attrs = {
                k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                for k, v in vars(layer).items()
                if _is_plain(v)
            }
            out.append({"kind": type(layer).__name__, "attrs": attrs})
    return out


def load_cache_state_dict(config, saved: list[dict[str, Any]], device: torch.device | None = None) -> HopeCache:
    """A new ``HopeCache`` for ``config`` holding what :func:`cache_state_dict` saved."""
    cache = HopeCache(config)
    if len(saved) != len(cache.layers):
        raise StreamLearnerError(f"the saved cache has {len(saved)} layers, this model has {len(cache.layers)}")
    for i, (layer, entry) in enumerate(zip(cache.layers, saved)):
        if isinstance(layer, HopeTitansCacheLayer):
            if entry["kind"] != "titans":
                raise StreamLearnerError(f"cache layer {i}: saved as {entry['kind']!r}, the model has a Titans layer")
            layer.seen_tokens = int(entry["seen_tokens"])
            if entry["state"] is not None:
                layer.state = TitansState(**{k: v.to(device) if device else v for k, v in entry["state"].items()})
        else:
            if entry["kind"] != type(layer).__name__:
                raise StreamLearnerError(
                    f"cache layer {i}: saved as {entry['kind']!r}, the model has a {type(layer).__name__}"
                )
            for k, v in entry["attrs"].items():
                setattr(layer, k, v.to(device) if (device is not None and isinstance(v, torch.Tensor)) else v)
            keys = getattr(layer, "keys", None)
            if isinstance(keys, torch.Tensor) and hasattr(layer, "device"):
                layer.device = keys.device
    return cache


def _detach_cache(cache: HopeCache) -> None:
    """Cut the autograd history of everything the cache carries to the next piece."""
    for layer in cache.layers:
        if isinstance(layer, HopeTitansCacheLayer):
            layer._map(torch.Tensor.detach)
        else:
            for name, value in vars(layer).items():
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    setattr(layer, name, value.detach())


def _as_stream(ids, device) -> torch.Tensor:
    try:
        ids = as_token_ids(ids, device, "the stream learner's ids")
    except ValueError as err:
        raise StreamLearnerError(str(err)) from err
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise StreamLearnerError(
                f"the stream learner follows one stream; got a batch of {ids.shape[0]} rows "
                "(run one learner per stream)"
            )
        ids = ids[0]
    if ids.dim() != 1:
        raise StreamLearnerError(
            f"expected a 1-D sequence of token ids (or shape (1, T)), got shape {tuple(ids.shape)}")
    return ids


# --------------------------------------------------------------------------------------------- the learner
class StreamLearner:
    """Continual learning of a HOPE model's CMS levels on a token stream (see the module docstring for the rule).

    Args:
        model: a ``HopeForCausalLM`` (left untouched until :meth:`commit`). It is put in eval mode (no dropout).
        lr: learning rate, one float for every level or one per level (a list indexed by level, or a dict
            ``{level: lr}``); levels with period 0 need none.
        chunk_size: the most tokens fed in one piece (one forward + backward). Pieces are also cut where a level is
            due, so the result does not depend on ``chunk_size`` through the update times.
        periods: override the periods of ``model.config.cms_levels`` (tokens per level, 0 = frozen).
        optimizer_cls, optimizer_kwargs: the optimizer that applies a due level's summed gradient (default
            ``torch.optim.SGD`` without momentum or weight decay: ``theta <- theta - lr * sum of gradients``).
        progress: show a progress bar (tokens) in :meth:`stream`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float | list[float] | Mapping[int, float] = 1e-3,
        chunk_size: int = 64,
        periods: list[int] | None = None,
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        progress: bool = True,
    ):
        model = unwrap_model(model)
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "cms_levels"):
            raise StreamLearnerError("the stream learner needs a HOPE model (a model whose config has cms_levels)")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise StreamLearnerError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.model = model
        self.config = config
        self.chunk_size = chunk_size
        self.periods = _checked_periods(config, periods)
        self.progress = progress
        model.eval()

        # The learner's own copies of the CMS weights of every level that learns (period > 0).
        self.param_level, self.weights = _learning_cms_weights(model, self.periods)
        self.levels = sorted({level for level in self.param_level.values()})
        self.level_lr = self._level_lrs(lr)
        self.optimizer: ContinuumOptimizer | None = self._build_optimizer(optimizer_cls, optimizer_kwargs)

        self.cache = HopeCache(config)
        self.pending = torch.empty(0, dtype=torch.long, device=self.device)
        self.tokens_learned = 0  # tokens that contributed an error term
        self.loss_sum = 0.0  # summed next-token loss (nats) of those tokens
        self.update_log: list[tuple[int, int]] = []  # (tokens_learned at the update, level), in order

    # ----------------------------------------------------------------------------------------------- helpers
    def _build_optimizer(self, optimizer_cls, optimizer_kwargs) -> ContinuumOptimizer | None:
        """One parameter group per learning level, stepped by the CMS rule; None where nothing learns (every period
        is 0: the learner only streams)."""
        if not self.levels:
            return None
        groups = []
        for level in self.levels:
            params = [w for n, w in self.weights.items() if self.param_level[n] == level]
            groups.append({"params": params, "lr": self.level_lr[level], "cms_level": level})
        kwargs = dict(optimizer_kwargs or {})
        if optimizer_cls is torch.optim.SGD:
            kwargs.setdefault("momentum", 0.0)
            kwargs.setdefault("weight_decay", 0.0)
        inner = optimizer_cls(groups, **kwargs)
        levels_of = {self.weights[n]: (level, self.periods[level]) for n, level in self.param_level.items()}
        return ContinuumOptimizer(inner, param_levels=levels_of, track_tokens=False, sync_tokens=False)

    def _level_lrs(self, lr) -> dict[int, float]:
        if isinstance(lr, Mapping):
            out = {int(k): float(v) for k, v in lr.items()}
        elif isinstance(lr, (list, tuple)):
            if len(lr) != len(self.periods):
                raise StreamLearnerError(f"lr has {len(lr)} entries, the model has {len(self.periods)} CMS levels")
            out = {i: float(v) for i, v in enumerate(lr)}
        elif isinstance(lr, (int, float)) and not isinstance(lr, bool):
            out = {level: float(lr) for level in self.levels}
        else:
            raise StreamLearnerError(
                f"lr must be a float, a list of floats per level or a dict {{level: lr}}, got {lr!r}")
        missing = [level for level in self.levels if level not in out]
        if missing:
            raise StreamLearnerError(f"lr gives no learning rate for CMS level(s) {missing} (periods > 0)")
        for level, value in out.items():
            if value < 0:
                raise StreamLearnerError(f"the learning rate of level {level} must be >= 0, got {value}")
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokens_since_update(self) -> dict[int, int]:
        """Counted tokens since each learning level's last update."""
        return dict(self.optimizer.tokens_since_step) if self.optimizer is not None else {}

    @property
    def level_updates(self) -> dict[int, int]:
        """How many times each learning level has been updated."""
        return dict(self.optimizer.level_steps) if self.optimizer is not None else {}

    def _tokens_to_next_update(self) -> int | None:
        if self.optimizer is None:
            return None
        return min(self.periods[level] - self.optimizer.tokens_since_step[level] for level in self.levels)

    def _forward(self, ids: torch.Tensor, cache: HopeCache):
        return functional_call(
            self.model, self.weights, (), {"input_ids": ids, "past_key_values": cache, "use_cache": True}, strict=False
        )

    # ----------------------------------------------------------------------------------------------- learning
    def _learn_piece(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        n = inputs.numel()
        with torch.enable_grad():
            logits = self._forward(inputs.unsqueeze(0), self.cache).logits[0]
            if logits.dtype not in (torch.float32, torch.float64):
                logits = logits.float()  # half-precision models: the loss in float32
            loss = F.cross_entropy(logits, targets, reduction="sum")
            if self.optimizer is not None:
                names = list(self.weights)
                grads = torch.autograd.grad(loss, [self.weights[k] for k in names], allow_unused=True)
                for k, g in zip(names, grads):
                    self.weights[k].grad = g
        _detach_cache(self.cache)
        if self.optimizer is not None:
            due = self.optimizer.levels_due(n)
            before = self._level_norms(due)
            self.optimizer.step(num_tokens=n)
            self.optimizer.zero_grad(set_to_none=True)
            self.tokens_learned += n
            self.update_log.extend((self.tokens_learned, level) for level in due)
            self._check_update(before, self._level_norms(due))
        else:
            self.tokens_learned += n
        value = float(loss.detach())
        if not math.isfinite(value):
            self._warn_once("loss", f"stream learning: the next-token loss after {self.tokens_learned} tokens is "
                                    f"{value} (not finite): the learned weights or the stream hold NaN/inf")
        self.loss_sum += value
        return value

    def _level_norms(self, levels) -> dict[int, float]:
        """The norm of every due level's learned weights (one host sync per update, not per token)."""
        if not levels:
            return {}
        norms = [torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w.detach().float()) for n, w in
                                                       self.weights.items() if self.param_level[n] == level]))
                 for level in levels]
        return dict(zip(levels, torch.stack(norms).tolist()))

    def _check_update(self, before: dict[int, float], after: dict[int, float]) -> None:
        """Warn (once) when an update blew a level up: its weights' norm changed by more than DIVERGENCE_FACTOR
        times, or is no longer finite. The learned weights have then collapsed (typically the model repeats one
        token) and everything learned after is lost."""
        for level, new in after.items():
            old = before[level]
            if not math.isfinite(new):
                problem = "are no longer finite (NaN/inf)"
            elif old > 0 and not 1 / DIVERGENCE_FACTOR <= new / old <= DIVERGENCE_FACTOR:
                problem = f"changed their norm {new / old:.3g} times in one update ({old:.3g} -> {new:.3g})"
            else:
                continue
            self._warn_once("diverged", f"stream learning diverged: after {self.tokens_learned} tokens the weights of "
                                        f"CMS level {level} {problem} (lr {self.level_lr[level]:g}); the learned "
                                        "levels have likely collapsed (the model may repeat one token): lower the "
                                        "learning rate")

    def _warn_once(self, kind: str, message: str) -> None:
        import warnings

        warned = self.__dict__.setdefault("_warned", set())
        if kind not in warned:
            warned.add(kind)
            warnings.warn(message, StreamLearnerWarning, stacklevel=4)

    def feed(self, ids) -> dict[str, float]:
        """Add ``ids`` (a 1-D sequence, or shape (1, T)) to the stream and learn from every token whose successor is
        now known. Returns ``{"tokens": counted tokens, "loss_sum": their summed loss, "updates": level updates}``."""
        ids = _as_stream(ids, self.device)
        _check_ids("ids", ids[None], self.config.vocab_size)  # once per piece (the targets are ids too)
        buf = torch.cat([self.pending, ids])
        tokens, loss_sum, updates = 0, 0.0, len(self.update_log)
        start = 0
        while buf.numel() - start >= 2:
            n = min(self.chunk_size, buf.numel() - start - 1)
            until = self._tokens_to_next_update()
            if until is not None:
                n = min(n, until)
            loss_sum += self._learn_piece(buf[start : start + n], buf[start + 1 : start + n + 1])
            tokens += n
            start += n
        self.pending = buf[start:].clone()
        return {"tokens": tokens, "loss_sum": loss_sum, "updates": len(self.update_log) - updates}

    def stream(self, pieces: Iterable, total: int | None = None) -> dict[str, float]:
        """Feed every piece of ``pieces`` (token-id sequences) with a progress bar; returns the summed :meth:`feed`
        results plus ``mean_loss`` (nats per counted token of this call). The bar's total (and ETA) is ``total``, or
        the pieces' summed lengths when ``pieces`` is a list or another sized collection (not a generator)."""
        bar = token_bar(pieces, total, "stream learning", disable=not self.progress)
        out = {"tokens": 0, "loss_sum": 0.0, "updates": 0}
        for piece in pieces:
            ids = _as_stream(piece, self.device)
            result = self.feed(ids)
            for k in out:
                out[k] += result[k]
            bar.update(ids.numel())
            if out["tokens"]:
                bar.set_postfix(loss=f"{out['loss_sum'] / out['tokens']:.3f}", updates=out["updates"], refresh=False)
        bar.close()
        out["mean_loss"] = out["loss_sum"] / out["tokens"] if out["tokens"] else float("nan")
        return out

    # ----------------------------------------------------------------------------------------------- using it
    @torch.no_grad()
    def logits(self, ids=None) -> torch.Tensor:
        """Next-token logits (vocab,) after the stream and ``ids``, with the learned weights; the learner's cache and
        pending token are left as they are (a copy is advanced)."""
        cache, _, logits = self._advance(ids)
        return logits

    def _advance(self, ids):
        cache = copy.deepcopy(self.cache)
        extra = self.pending if ids is None else torch.cat([self.pending, _as_stream(ids, self.device)])
        if extra.numel() == 0:
            raise StreamLearnerError("nothing to read: the stream is empty and no ids were given")
        logits = self._forward(extra.unsqueeze(0), cache).logits[0, -1]
        return cache, extra, logits

    @torch.no_grad()
    def generate(self, ids=None, max_new_tokens: int = 16, eos_token_id: int | list[int] | None = None) -> list[int]:
        """Greedy continuation of the stream (plus ``ids``) with the learned weights, without learning from it and
        without changing the learner's state. Stops after ``max_new_tokens`` or at ``eos_token_id``."""
        if max_new_tokens < 1:
            raise StreamLearnerError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stop = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        cache, _, logits = self._advance(ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            out.append(token)
            if token in stop or len(out) == max_new_tokens:
                break
            logits = self._forward(torch.tensor([[token]], device=self.device), cache).logits[0, -1]
        return out

    @contextmanager
    def applied(self):
        """Temporarily load the learned weights into the model (``with learner.applied(): model.generate(...)``)."""
        params = dict(self.model.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.weights}
        try:
            self._copy_into_model()
            yield self.model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    @torch.no_grad()
    def _copy_into_model(self) -> None:
        params = dict(self.model.named_parameters())
        for name, value in self.weights.items():
            params[name].copy_(value.detach())

    def commit(self) -> None:
        """Write the learned CMS weights into the model's parameters (the only call that changes the model)."""
        self._copy_into_model()

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the learner's next updates, as tensors and numbers."""
        return {
            "version": _STATE_VERSION,
            "periods": list(self.periods),
            "level_lr": {str(k): v for k, v in self.level_lr.items()},
            "chunk_size": self.chunk_size,
            "weights": {k: v.detach().clone() for k, v in self.weights.items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "cache": cache_state_dict(self.cache),
            "pending": self.pending.clone(),
            "tokens_learned": self.tokens_learned,
            "loss_sum": self.loss_sum,
            "update_log": [list(x) for x in self.update_log],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise StreamLearnerError(f"unknown stream-learner state version {state.get('version')!r}")
        if list(state["periods"]) != self.periods:
            raise StreamLearnerError(f"the saved periods {state['periods']} differ from this learner's {self.periods}")
        if set(state["weights"]) != set(self.weights):
            raise StreamLearnerError("the saved CMS weights do not match this model's learning CMS parameters")
        with torch.no_grad():
            for name, value in state["weights"].items():
                if value.shape != self.weights[name].shape:
                    raise StreamLearnerError(f"saved weight {name!r} has shape {tuple(value.shape)}, "
                                             f"the model's is {tuple(self.weights[name].shape)}")
                self.weights[name].copy_(value)
        self.level_lr = {int(k): float(v) for k, v in state["level_lr"].items()}
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.chunk_size = int(state["chunk_size"])
        self.cache = load_cache_state_dict(self.config, state["cache"], self.device)
        self.pending = state["pending"].to(self.device).clone()
        self.tokens_learned = int(state["tokens_learned"])
        self.loss_sum = float(state["loss_sum"])
        self.update_log = [(int(a), int(b)) for a, b in state["update_log"]]

    def save(self, path: str | os.PathLike) -> None:
        """``torch.save`` of :meth:`state_dict` (tensors and numbers only)."""
        torch.save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a state written by :meth:`save` (loaded with ``weights_only=True``)."""
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    def __repr__(self) -> str:
        levels = ", ".join(
            f"level {i}: period {self.periods[i]}, lr {self.level_lr.get(i, 0.0):g}" for i in range(len(self.periods))
        )
        return f"StreamLearner({levels}; {self.tokens_learned} tokens learned)"


def _checked_periods(config, periods) -> list[int]:
    """The update period of every CMS level: the config's, or the given list (one int >= 0 per level)."""
    num_levels = len(config.cms_levels)
    if periods is None:
        periods = [int(level["period"]) for level in config.cms_levels]
    periods = list(periods)
    if len(periods) != num_levels:
        raise StreamLearnerError(f"periods has {len(periods)} entries, the model has {num_levels} CMS levels")
    for i, p in enumerate(periods):
        if not isinstance(p, int) or isinstance(p, bool) or p < 0:
            raise StreamLearnerError(f"periods[{i}] must be an int >= 0 (0 = frozen), got {p!r}")
    return periods


def _learning_cms_weights(model: nn.Module, periods: list[int]) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """(parameter name -> CMS level, parameter name -> a trainable copy) for every level whose period is not 0."""
    param_level: dict[str, int] = {}
    weights: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        match = CMS_PARAM_PATTERN.search(name)
        if match is None:
            continue
        level = int(match.group(1))
        if level >= len(periods):
            raise StreamLearnerError(
                f"parameter {name!r} belongs to CMS level {level}, the config has {len(periods)}")
        if periods[level] == 0:
            continue
        param_level[name] = level
        weights[name] = param.detach().clone().requires_grad_(True)
    return param_level, weights

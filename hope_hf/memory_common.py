"""What the self-modifying memory's ops share: the chunk step's and the generation's settings, the state of a layer,
a chunk's inputs and fast weights, and small tensor helpers (docs/design.md §6a, "Names").

Fast weights: every memory has a first layer `W_in` (the paper's W2, stored transposed) and an output layer `W_out`
(the paper's W1, stored transposed); in code `*_in` and `*_out`, prefixed by the state they belong to: `init_`
(the meta-learned initial state W_0), `snapshot_` (the state at the end of the previous chunk), `current_` (the
state after the last token), `end_` (a chunk's result) and `anchor_` (what retention pulls toward: the initial state,
or None for zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch


NORM_EPS = 1e-6


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """z / sqrt(sum z^2 + eps) over the last dimension."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + NORM_EPS)


def l2norm_backward(y, x, d_y):
    """The gradient of x for y = l2norm(x): (d_y - y <y, d_y>) / sqrt(|x|^2 + eps)."""
    return torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + NORM_EPS) * (d_y - y * (y * d_y).sum(-1, keepdim=True))


def fp32(x: torch.Tensor) -> torch.Tensor:
    """Fast-weight math runs in float32, or float64 when the model itself does."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass
class TitansState:
    """The fast state of one self-modifying Titans layer for a batch of sequences (all float32 except `chunk_pos`).

    Fast weights are absolute (not deviations), `W_in` of all memories side by side as `*_in` and `W_out` as `*_out`:
    `snapshot_*` is the state at the end of the last completed chunk, the one that generates keys, values, gates,
    targets and gradients; `current_*` the state after the last token, the one that is read and written.
    `chunk_pos` counts the tokens already inside the current chunk (0 means a chunk just ended, and then snapshot ==
    current). `conv_*` hold the last `conv_kernel_size - 1` pre-convolution inputs.
    """

    snapshot_in: torch.Tensor  # (B, H, d, n*m)
    snapshot_out: torch.Tensor  # (B, H, n, m, d)
    current_in: torch.Tensor  # (B, H, d, n*m)
    current_out: torch.Tensor  # (B, H, n, m, d)
    chunk_pos: torch.Tensor  # (B,) long
    conv_q: torch.Tensor  # (B, K-1, H*d)
    conv_k: torch.Tensor  # (B, K-1, H*d)
    conv_v: torch.Tensor  # (B, K-1, H*d)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def map(self, fn) -> "TitansState":
        """A new state with `fn` applied to every tensor (index_select for beams, repeat_interleave, detach, ...)."""
        return TitansState(**{name: fn(t) for name, t in self.tensors().items()})

    @property
    def batch_size(self) -> int:
        return self.chunk_pos.shape[0]


@dataclass(frozen=True)
class ChunkSpec:
    """What the chunk step needs to know of the config (hashable, so that `torch.compile` can guard on it)."""

    chunk_size: int
    num_memories: int
    memory_dim: int
    self_modifying: bool
    detach_self_targets: bool
    dgd: bool
    retain_toward_init: bool
    depth: int = 2  # memory_depth: 2 = residual MLP memories (`mlp_chunk_forward`), 1 = linear (`linear_chunk_forward`)
    compiled: bool = False  # `compile_chunk_step` in training mode: `ChunkStep` runs the compiled `chunk_functions`
    kernels: str = "torch"  # `memory_kernels`: where the fused Triton kernels run (`memory_chunk.fused_chunk_step`)

    @property
    def output_columns(self) -> slice:
        """The output memory's columns of W_in (stored last)."""
        return slice((self.num_memories - 1) * self.memory_dim, self.num_memories * self.memory_dim)


@dataclass(frozen=True)
class GenerateSpec:
    """What `generate` needs to know of the config (hashable: `torch.compile` guards on it)."""

    memories: tuple[str, ...]  # the memories' names in storage order (`memory_names`), the output memory "o" last
    memory_dim: int
    eta_max: float
    retention: bool
    depth: int = 2


def per_head(x, w):
    """x (R, H, L, X) @ w (H, X, Y) -> (R, H, L, Y) as one product per head over all rows' tokens (`x @ w` would
    first copy w for every row: a weight-sized copy for an anchor)."""
    rows, heads, length, width = x.shape
    out = torch.matmul(x.transpose(0, 1).reshape(heads, rows * length, width), w)
    return out.view(heads, rows, length, -1).transpose(0, 1)


def per_memory(x, w):
    """x (R, H, n, L, X) @ w (H, n, X, Y) -> (R, H, n, L, Y) as one product per head and memory over all rows'
    tokens (as `per_head`)."""
    rows, heads, n, length, width = x.shape
    out = torch.matmul(x.permute(1, 2, 0, 3, 4).reshape(heads * n, rows * length, width),
                       w.reshape(heads * n, width, -1))
    return out.view(heads, n, rows, length, -1).permute(2, 0, 1, 3, 4)


def plus_product(base, a, b, sign=1.0):
    """base += sign * (a @ b) in place, for batched a (..., X, L), b (..., L, Y) and a base (..., X, Y) that
    nothing else reads (a new tensor, or a block of one whose batch dimensions merge into one): the product
    accumulates into base inside one GEMM (`baddbmm_`), with no weight-sized result or copy of base made."""
    x, y = base.shape[-2:]
    base.view(-1, x, y).baddbmm_(a.reshape(-1, x, a.shape[-1]), b.reshape(-1, b.shape[-2], y), alpha=sign)
    return base


def decayed_start(current, anchor, decay):
    """The start that a chunk's update accumulates into: decay * (current - anchor) + anchor with retention toward the
    anchor, decay * current without it (decay (R, H, 1)). One weight-sized pass, a new tensor."""
    decay = decay.view(decay.shape[:2] + (1,) * (current.dim() - 2))
    return decay * current if anchor is None else torch.lerp(anchor, current, decay)


def start_gradient(d_end, current, anchor, decay):
    """For the gradient d_end of a chunk's end weights: the gradient of its start, decay * d_end, and the dot
    product <d_end, current - anchor> per row and head (the decay's gradient, up to a factor), in one new tensor."""
    out = current * d_end if anchor is None else (current - anchor).mul_(d_end)
    dot = out.flatten(2).sum(-1)
    torch.mul(d_end, decay.view(decay.shape[:2] + (1,) * (current.dim() - 2)), out=out)
    return out, dot


class ChunkInputs(NamedTuple):
    """The inputs of one chunk step, in the order `chunk_forward` takes them. q, k, v: (R, H, L, d); eta (R, H, L, n):
    one learning rate per memory; log_alpha (R, H, L); write (R, 1, L) (1 = real token); the snapshot and current
    fast weights, `*_in` (R, H, d, n*m) and `*_out` (R, H, n, m, d), the snapshot None where it is the current weights
    (every chunk of a scan but one that starts inside a chunk); the anchors (H-shaped) or None."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    eta: torch.Tensor
    log_alpha: torch.Tensor
    write: torch.Tensor
    snapshot_in: torch.Tensor | None
    snapshot_out: torch.Tensor | None
    current_in: torch.Tensor
    current_out: torch.Tensor
    anchor_in: torch.Tensor | None
    anchor_out: torch.Tensor | None


class ChunkWeights(NamedTuple):
    """A chunk's fast weights with the snapshot resolved: `same` where it was given as None (it is the current
    weights, and `snapshot_*` are `current_*`)."""

    same: bool
    snapshot_in: torch.Tensor
    snapshot_out: torch.Tensor
    current_in: torch.Tensor
    current_out: torch.Tensor
    anchor_in: torch.Tensor | None
    anchor_out: torch.Tensor | None


def chunk_weights(x: ChunkInputs) -> ChunkWeights:
    """The fast weights of a chunk's inputs: a snapshot given as None is the current weights (same = True)."""
    same = x.snapshot_in is None
    snapshot_in, snapshot_out = (x.current_in, x.current_out) if same else (x.snapshot_in, x.snapshot_out)
    return ChunkWeights(same, snapshot_in, snapshot_out, x.current_in, x.current_out, x.anchor_in, x.anchor_out)


def tokens_last(x):
    """(R, H, C, n, X) -> (R, H, n, X, C): per memory, the token axis as a product's inner dimension."""
    return x.permute(0, 1, 3, 4, 2)


def plus(total, term):
    """total + term, where a total of None (nothing accumulated yet) is zero."""
    return term if total is None else total + term


def minus(total, term):
    """total - term, where a total of None (nothing accumulated yet) is zero."""
    return -term if total is None else total - term


def tr(x):
    """x with its last two dimensions swapped."""
    return x.transpose(-1, -2)


def unit_lower_inverse(lower):
    """(I + lower)^-1 for strictly lower-triangular matrices `lower` (..., L, L): the UT transform of a chunk's delta
    rule, as one triangular solve against the identity (a solve against a wide right-hand side runs at a few
    GFLOP/s); backward reuses it transposed."""
    eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device).expand_as(lower)
    return torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)


class Decays(NamedTuple):
    """A chunk's decays, gamma_t = prod_{i<=t} alpha_i: decay[t, i] = gamma_{t-1} / gamma_i for i < t (0 elsewhere),
    to_end = gamma_L / gamma_i, e_prev = gamma_{t-1}, e_end = gamma_L (R, H, 1). Only e_end for a single token."""

    decay: torch.Tensor | None
    to_end: torch.Tensor | None
    e_prev: torch.Tensor | None
    e_end: torch.Tensor


class DecayGrads(NamedTuple):
    """What the stages of a chunk's backward accumulate for `decays_backward`: the gradients of the exponent of
    `decay` (d_log_decay = d_decay * decay), of g_prev = log(e_prev), of g_end = log(e_end) and of to_end (None:
    nothing yet)."""

    d_log_decay: torch.Tensor | None = None
    d_g_prev: torch.Tensor | None = None
    d_g_end: torch.Tensor | None = None
    d_to_end: torch.Tensor | None = None


def decays(log_alpha, length, single: bool = False) -> Decays:
    """The decays of a chunk from its log-retentions (R, H, L), in log space. `single`: one token with nothing kept
    (decoding): no pair i < t, so only e_end = alpha is needed."""
    if single:
        return Decays(None, None, None, torch.exp(log_alpha))
    g = torch.cumsum(log_alpha, dim=-1)
    g_prev = g - log_alpha
    causal = torch.ones(length, length, dtype=torch.bool, device=log_alpha.device).tril(-1)
    decay = torch.exp((g_prev.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~causal, -math.inf))
    g_end = g[..., -1:]
    return Decays(decay, torch.exp(g_end - g), torch.exp(g_prev), torch.exp(g_end))


def decays_backward(dec: Decays, grads: DecayGrads):
    """The gradient of log_alpha from the accumulated `grads` (all four given)."""
    d_g_prev = grads.d_g_prev + grads.d_log_decay.sum(-1)
    d_g = -grads.d_log_decay.sum(-2)
    d_to_end = grads.d_to_end * dec.to_end
    d_g_end = grads.d_g_end + d_to_end.sum(-1, keepdim=True)
    d_g = d_g - d_to_end
    d_g[..., -1:].add_(d_g_end)
    d_g = d_g + d_g_prev
    return d_g.flip(-1).cumsum(-1).flip(-1) - d_g_prev

"""What the self-modifying memory's ops share: the chunk step's and the generation's settings, the state of a layer,
and small tensor helpers (docs/design.md §6a)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

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

    Weights are absolute (not deviations): `snapshot_*` is the state at the end of the last completed chunk, the one
    that generates keys, values, gates, targets and gradients; `current_*` the state after the last token, the one
    that is read and written. `chunk_pos` counts the tokens already inside the current chunk (0 means a chunk just
    ended, and then snapshot == current). `conv_*` hold the last `conv_kernel_size - 1` pre-convolution inputs.
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
    depth: int = 2  # memory_depth: 2 = residual MLP memories (`chunk_forward`), 1 = linear (`linear_chunk_forward`)
    compiled: bool = False  # `compile_chunk_step` in training mode: `ChunkStep` runs the compiled `chunk_functions`


@dataclass(frozen=True)
class GenerateSpec:
    """What `generate` needs to know of the config (hashable: `torch.compile` guards on it)."""

    boxes: tuple[str, ...]
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
    out = torch.matmul(x.permute(1, 2, 0, 3, 4).reshape(heads * n, rows * length, width), w.reshape(heads * n, width, -1))
    return out.view(heads, n, rows, length, -1).permute(2, 0, 1, 3, 4)


def plus_product(base, a, b, sign=1.0):
    """base += sign * (a @ b) in place, for batched a (..., X, L), b (..., L, Y) and a base (..., X, Y) that
    nothing else reads (a new tensor, or a block of one whose batch dimensions merge into one): the product
    accumulates into base inside one GEMM (`baddbmm_`), with no weight-sized result or copy of base made."""
    x, y = base.shape[-2:]
    base.view(-1, x, y).baddbmm_(a.reshape(-1, x, a.shape[-1]), b.reshape(-1, b.shape[-2], y), alpha=sign)
    return base


def decayed_start(cur, anchor, decay):
    """The start that a chunk's update accumulates into: decay * (cur - anchor) + anchor with retention toward the
    anchor, decay * cur without it (decay (R, H, 1)). One weight-sized pass, a new tensor."""
    decay = decay.view(decay.shape[:2] + (1,) * (cur.dim() - 2))
    return decay * cur if anchor is None else torch.lerp(anchor, cur, decay)


def start_gradient(d_end, cur, anchor, decay):
    """For the gradient d_end of a chunk's end weights: the gradient of its start, decay * d_end, and the dot
    product <d_end, cur - anchor> per row and head (the decay's gradient, up to a factor), in one new tensor."""
    out = cur * d_end if anchor is None else (cur - anchor).mul_(d_end)
    dot = out.flatten(2).sum(-1)
    torch.mul(d_end, decay.view(decay.shape[:2] + (1,) * (cur.dim() - 2)), out=out)
    return out, dot


def snapshot_weights(snap_a, snap_b, cur_a, cur_b):
    """(same, A, B) of a chunk's snapshot: a snapshot given as None is the current weights (same = True)."""
    same = snap_a is None
    return (True, cur_a, cur_b) if same else (False, snap_a, snap_b)


def tokens_last(x):
    """(R, H, C, n, X) -> (R, H, n, X, C): per memory, the token axis as a product's inner dimension."""
    return x.permute(0, 1, 3, 4, 2)


def decays(log_alpha, length):
    """Per-chunk decays in log space: (decay, to_end, e_prev, e_end) with decay[t, i] = gamma_{t-1} / gamma_i for
    i < t (0 elsewhere), to_end = gamma_L / gamma_i, e_prev = gamma_{t-1}, e_end = gamma_L, gamma_t = prod alpha."""
    g = torch.cumsum(log_alpha, dim=-1)
    g_prev = g - log_alpha
    causal = torch.ones(length, length, dtype=torch.bool, device=log_alpha.device).tril(-1)
    decay = torch.exp((g_prev.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~causal, -math.inf))
    g_end = g[..., -1:]
    return decay, torch.exp(g_end - g), torch.exp(g_prev), torch.exp(g_end)


def decays_backward(log_alpha, to_end, d_log_decay, d_to_end, d_g_prev, d_g_end):
    """The gradient of log_alpha from those of the exponent of `decay` (d_log_decay = d_decay * decay), of to_end,
    of g_prev = log(e_prev) and of g_end = log(e_end)."""
    d_g_prev = d_g_prev + d_log_decay.sum(-1)
    d_g = -d_log_decay.sum(-2)
    d_to_end = d_to_end * to_end
    d_g_end = d_g_end + d_to_end.sum(-1, keepdim=True)
    d_g = d_g - d_to_end
    d_g[..., -1:].add_(d_g_end)
    d_g = d_g + d_g_prev
    return d_g.flip(-1).cumsum(-1).flip(-1) - d_g_prev

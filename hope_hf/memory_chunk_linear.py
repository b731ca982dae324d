"""One chunk of the rule for linear memories (`memory_depth=1`, the default): a gated delta rule per memory, and its
written-out backward.

Stages as in memory_chunk_mlp (each tested against autograd alone, tests/ops/test_memory_stages.py):

    forward stage                                        backward
    _errors            e = M_s(k) - vhat                 _errors_backward
    _step_sizes        eta1 = eta / (1 + eta |k|^2)      _step_sizes_backward
    decays             gamma (memory_common)             decays_backward
    _update            W_out's gated delta rule          _update_backward
    _read              o = M_o(q), before the write      _read_backward

A linear memory is M(z) = z + z W_out (W_out (d x d) per memory; W_in is empty (R, H, d, 0) and passes through).
`y0` is the current W_out less its anchor (never formed), `_o` the output memory's share.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .memory_common import (
    ChunkInputs, ChunkSpec, ChunkWeights, DecayGrads, Decays, chunk_weights, decayed_start, decays, decays_backward,
    minus, per_head, per_memory, plus, plus_product, start_gradient, tr, unit_lower_inverse,
)


def _error_inputs(spec: ChunkSpec, k, v, n: int):
    """What each linear memory's W_out multiplies in its error M_s(k) - vhat: k - v where the target is self-generated
    (vhat = M_s(v)), k for the output memory (vhat = v) and without self-modification: (R, H, n or 1, L, d)."""
    if not spec.self_modifying:
        return k.unsqueeze(2)
    return torch.cat([(k - v).unsqueeze(2).expand(-1, -1, n - 1, -1, -1), k.unsqueeze(2)], dim=2)


# ------------------------------------------------------------------------------------------------- forward stages
def _errors(spec: ChunkSpec, k, v, snapshot_out):
    """M_s(k) - vhat per memory (R, H, n, L, d): vhat = M_s(v) (self-generated) for all but the output memory, whose
    target is v itself."""
    e = (k - v).unsqueeze(2) + _error_inputs(spec, k, v, snapshot_out.shape[2]) @ snapshot_out
    if spec.self_modifying and spec.detach_self_targets:  # same values; the gradient reaches e through M(k) only
        mk = k.unsqueeze(2) + k.unsqueeze(2) @ snapshot_out
        e = e.detach() + (mk - mk.detach())
    return e


def _step_sizes(eta, k):
    """The exact (proximal) step of each memory's delta rule, eta / (1 + eta |k|^2), per memory: (R, H, n, L)."""
    return (eta / (1 + eta * k.pow(2).sum(-1, keepdim=True))).transpose(2, 3)


class Update(NamedTuple):
    """What W_out's chunk update keeps."""

    k_y0: torch.Tensor  # k y0 per memory (R, H, n, L, d)
    k_ys: torch.Tensor  # k (W_out_s - anchor)
    kk: torch.Tensor  # k k^T (R, H, L, L)
    ut: torch.Tensor  # (I + lower)^-1 (R, H, n, L, L)
    u1: torch.Tensor  # (R, H, n, L, d)


def _update(k, e, eta1, dec: Decays, w: ChunkWeights):
    """Per token and memory, in deviations Y = W_out - anchor: Y_t = (alpha_t I - eta1_t k_t^T k_t) Y_{t-1}
    + eta1_t k_t^T (vhat_t - k_t - k_t anchor) (DGD at the current weights, paper Eq. 57 and 93 with the
    sign-corrected value term); in chunk form one UT transform per chunk, head and memory. Returns end_out."""
    k_y0 = k.unsqueeze(2) @ w.current_out
    if w.anchor_out is not None:
        k_anchor = per_memory(k.unsqueeze(2).expand(-1, -1, w.anchor_out.shape[1], -1, -1), w.anchor_out)
        k_y0 = k_y0 - k_anchor
    k_ys = k_y0 if w.same else k.unsqueeze(2) @ w.snapshot_out - (0 if w.anchor_out is None else k_anchor)
    rhs = eta1.unsqueeze(-1) * (k_ys - e - dec.e_prev[:, :, None, :, None] * k_y0)
    kk = k @ k.transpose(-1, -2)
    lower = eta1.unsqueeze(-1) * (dec.decay * kk).unsqueeze(2)  # (R,H,n,L,L)
    ut = unit_lower_inverse(lower)
    u1 = ut @ rhs  # (R,H,n,L,d)
    end_out = plus_product(decayed_start(w.current_out, w.anchor_out, dec.e_end), k.transpose(-1, -2).unsqueeze(2)
                           .expand(-1, -1, w.current_out.shape[2], -1, -1), dec.to_end[:, :, None, :, None] * u1)
    return end_out, Update(k_y0, k_ys, kk, ut, u1)


class Read(NamedTuple):
    q_y0: torch.Tensor  # q y0_o (R, H, 1, L, d)
    qk: torch.Tensor  # q k^T * decay


def _read(q, k, u1, dec: Decays, w: ChunkWeights):
    """The output memory at the per-token state, read before the write (Eq. 86)."""
    q_y0 = q.unsqueeze(2) @ w.current_out[:, :, -1:]
    if w.anchor_out is not None:
        q_anchor = per_head(q, w.anchor_out[:, -1])
        q_y0 = q_y0 - q_anchor.unsqueeze(2)
    qk = (q @ k.transpose(-1, -2)) * dec.decay
    o = q + dec.e_prev.unsqueeze(-1) * q_y0[:, :, 0] + qk @ u1[:, :, -1]
    if w.anchor_out is not None:
        o = o + q_anchor
    return o, Read(q_y0, qk)


class LinearSaved(NamedTuple):
    """Everything `linear_chunk_backward` reads, by stage."""

    eta: torch.Tensor  # the learning rates with pad tokens zeroed
    e: torch.Tensor
    eta1: torch.Tensor
    decays: Decays
    update: Update
    read: Read


def linear_chunk_forward(spec: ChunkSpec, q, k, v, eta, log_alpha, write, snapshot_in, snapshot_out, current_in,
                         current_out, anchor_in, anchor_out, keep: bool = False):
    """One chunk of the linear memories, exactly: every memory is a gated delta rule with the keys k. Same
    signature and returns as `mlp_chunk_forward` (the saved intermediates: `LinearSaved`); W_in is empty and passes
    through unchanged. Reads of the output memory at the per-token state (read before write)."""
    w = chunk_weights(ChunkInputs(q, k, v, eta, log_alpha, write, snapshot_in, snapshot_out, current_in,
                                  current_out, anchor_in, anchor_out))
    eta = eta * write.unsqueeze(-1)
    log_alpha = log_alpha * write
    e = _errors(spec, k, v, w.snapshot_out)
    eta1 = _step_sizes(eta, k)
    dec = decays(log_alpha, q.shape[2])
    end_out, update = _update(k, e, eta1, dec, w)
    o, read = _read(q, k, update.u1, dec, w)
    if not keep:
        return o, current_in, end_out
    return o, current_in, end_out, LinearSaved(eta, e, eta1, dec, update, read)


# ------------------------------------------------------------------------------------------------ backward stages
class ReadGrads(NamedTuple):
    """The read's gradients, the output memory's shares of u1, the current weights and the anchor in tensors of
    their full shapes (zero elsewhere), which `_update_backward` adds to. The current weights' share is that of y0
    (the weights less the anchor): `_update_backward` takes it off the anchor's too."""

    d_q: torch.Tensor
    d_k: torch.Tensor
    d_u1: torch.Tensor
    d_current_out: torch.Tensor
    d_anchor_out: torch.Tensor | None


def _read_backward(q, k, u1, dec: Decays, w: ChunkWeights, t: Read, d_o):
    """The backward of `_read`: o = q + e_prev * (q @ y0_o) + qk @ u1_o (+ q @ anchor_o), qk = (q k^T) * decay."""
    d_q = d_o.clone()
    d_o_prev = dec.e_prev.unsqueeze(-1) * d_o
    d_q = d_q + d_o_prev @ tr(w.current_out[:, :, -1])
    d_y0 = torch.zeros_like(w.current_out)
    d_y0[:, :, -1] = tr(q) @ d_o_prev
    d_g_prev = (d_o * t.q_y0[:, :, 0]).sum(-1) * dec.e_prev
    d_u1 = torch.zeros_like(u1)
    d_u1[:, :, -1] = tr(t.qk) @ d_o
    d_qk_raw = (d_o @ tr(u1[:, :, -1])) * dec.decay
    d_log_decay = d_qk_raw * (q @ tr(k))
    d_q = d_q + d_qk_raw @ k
    d_k = tr(d_qk_raw) @ q
    d_anchor_out = None
    if w.anchor_out is not None:
        d_q = d_q + per_head(d_o - d_o_prev, tr(w.anchor_out[:, -1]))
        d_anchor_out = torch.zeros_like(w.anchor_out)
        d_anchor_out[:, -1] = (tr(q) @ d_o).sum(0)
    return ReadGrads(d_q, d_k, d_u1, d_y0, d_anchor_out), DecayGrads(d_log_decay, d_g_prev)


class UpdateGrads(NamedTuple):
    d_k: torch.Tensor
    d_e: torch.Tensor  # (R, H, n, L, d)
    d_eta1: torch.Tensor  # (R, H, n, L)
    d_current_out: torch.Tensor
    d_snapshot_out: torch.Tensor | None  # None where the snapshot is the current weights
    d_anchor_out: torch.Tensor | None


def _update_backward(k, e, eta1, dec: Decays, w: ChunkWeights, t: Update, read: ReadGrads, d_end_out,
                     dg: DecayGrads):
    """The backward of `_update` (end_out = e_end * y0 + k^T (to_end * u1) (+ anchor), u1 = (I + lower)^-1 rhs),
    added to the read's gradients."""
    d_start, dot_b = start_gradient(d_end_out, w.current_out, w.anchor_out, dec.e_end)
    d_y0 = read.d_current_out + d_start
    d_g_end = plus(dg.d_g_end, dot_b.unsqueeze(-1) * dec.e_end)
    d_weighted = k.unsqueeze(2) @ d_end_out  # (R,H,n,L,d)
    d_k = read.d_k + ((dec.to_end[:, :, None, :, None] * t.u1) @ tr(d_end_out)).sum(2)
    d_u1 = read.d_u1 + dec.to_end[:, :, None, :, None] * d_weighted
    d_to_end = plus(dg.d_to_end, (d_weighted * t.u1).sum((2, 4)))
    d_rhs = tr(t.ut) @ d_u1
    neg_d_lower = (d_rhs @ tr(t.u1)) * dec.decay.unsqueeze(2)  # (R,H,n,L,L)
    d_eta1 = -(neg_d_lower * t.kk.unsqueeze(2)).sum(-1)  # (R,H,n,L)
    neg_d_kk = (neg_d_lower * eta1.unsqueeze(-1)).sum(2)
    d_log_decay = minus(dg.d_log_decay, neg_d_kk * t.kk)
    d_k = d_k - (neg_d_kk + tr(neg_d_kk)) @ k
    # rhs = eta1 * w, w = k_ys - e - e_prev * k_y0
    ep = dec.e_prev[:, :, None, :, None]
    d_eta1 = d_eta1 + (d_rhs * (t.k_ys - e - ep * t.k_y0)).sum(-1)
    d_w = eta1.unsqueeze(-1) * d_rhs
    d_g_prev = minus(dg.d_g_prev, (d_w * t.k_y0).sum((2, 4)) * dec.e_prev)
    d_k_y0 = -ep * d_w
    if w.same:
        d_k_y0 = d_k_y0 + d_w
    d_k = d_k + (d_k_y0 @ tr(w.current_out)).sum(2)
    d_y0 = d_y0 + tr(k).unsqueeze(2) @ d_k_y0
    d_snapshot_out = None
    if not w.same:
        d_k = d_k + (d_w @ tr(w.snapshot_out)).sum(2)
        d_snapshot_out = tr(k).unsqueeze(2) @ d_w
    d_anchor_out = read.d_anchor_out
    if w.anchor_out is not None:
        d_anchor = d_k_y0 if w.same else d_k_y0 + d_w
        d_k = d_k - per_memory(d_anchor, tr(w.anchor_out)).sum(2)
        d_anchor_out = d_anchor_out + d_end_out.sum(0) - d_y0.sum(0)
        if not w.same:
            d_anchor_out = d_anchor_out - d_snapshot_out.sum(0)
    grads = UpdateGrads(d_k, -d_w, d_eta1, d_y0, d_snapshot_out, d_anchor_out)
    return grads, DecayGrads(d_log_decay, d_g_prev, d_g_end, d_to_end)


def _step_sizes_backward(eta, k, d_eta1, d_k):
    """The backward of `_step_sizes`: returns the gradient of eta and d_k plus k's share."""
    d_eta1 = d_eta1.transpose(2, 3)  # (R,H,L,n)
    den = (1 + eta * k.pow(2).sum(-1, keepdim=True)).pow(2)
    return d_eta1 / den, d_k - (2 * d_eta1 * eta.pow(2) / den).sum(-1, keepdim=True) * k


def _errors_backward(spec: ChunkSpec, k, v, snapshot_out, d_e, d_k):
    """The backward of `_errors` (e = (k - v) + z_e @ W_out_s, z_e = k - v for the memories with self-generated
    targets, else k): returns d_k plus k's share, d_v and the gradient of W_out_s."""
    if spec.self_modifying and spec.detach_self_targets:
        d_k = d_k + d_e.sum(2) + (d_e @ tr(snapshot_out)).sum(2)
        return d_k, torch.zeros_like(v), tr(k).unsqueeze(2) @ d_e
    d_z = d_e @ tr(snapshot_out)
    d_snapshot_out = tr(_error_inputs(spec, k, v, snapshot_out.shape[2])) @ d_e
    d_e_sum = d_e.sum(2)
    d_k = d_k + d_e_sum + d_z.sum(2)
    d_v = -d_e_sum - (d_z[:, :, :-1].sum(2) if spec.self_modifying else 0)
    return d_k, d_v, d_snapshot_out


def linear_chunk_backward(spec: ChunkSpec, inputs, t: LinearSaved, d_o, d_end_in, d_end_out):
    """The vector-Jacobian product of `linear_chunk_forward`, written out (tested against autograd); returns the
    gradients in `mlp_chunk_backward`'s order."""
    x = ChunkInputs(*inputs)
    w = chunk_weights(x)
    dec = t.decays
    read, dg = _read_backward(x.q, x.k, t.update.u1, dec, w, t.read, d_o)
    up, dg = _update_backward(x.k, t.e, t.eta1, dec, w, t.update, read, d_end_out, dg)
    d_eta, d_k = _step_sizes_backward(t.eta, x.k, up.d_eta1, up.d_k)
    d_log_alpha = decays_backward(dec, dg)
    d_k, d_v, d_snapshot_out_e = _errors_backward(spec, x.k, x.v, w.snapshot_out, up.d_e, d_k)
    d_current_out, d_snapshot_out = up.d_current_out, up.d_snapshot_out
    if w.same:  # the snapshot is current_out itself (not a deviation): the anchor has no share in it
        d_current_out = d_current_out + d_snapshot_out_e
    else:
        d_snapshot_out = d_snapshot_out + d_snapshot_out_e
    return (read.d_q, d_k, d_v, d_eta * x.write.unsqueeze(-1),
            d_log_alpha * x.write, None if w.same else torch.zeros_like(x.snapshot_in), d_snapshot_out,
            torch.zeros_like(x.current_in), d_current_out,
            None if x.anchor_in is None else torch.zeros_like(x.anchor_in), up.d_anchor_out)

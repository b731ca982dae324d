"""One chunk of the rule for linear memories (`memory_depth=1`, the default): a gated delta rule per memory, and its
written-out backward."""

from __future__ import annotations

import torch

from .memory_common import (
    ChunkSpec, decayed_start, decays, decays_backward, per_head, per_memory, plus_product, start_gradient,
)


def _error_inputs(spec: ChunkSpec, k, v, n: int):
    """What each linear memory's B multiplies in its error M_s(k) - vhat: k - v where the target is self-generated
    (vhat = M_s(v)), k for the output memory (vhat = v) and without self-modification: (R, H, n or 1, L, d)."""
    if not spec.self_modifying:
        return k.unsqueeze(2)
    return torch.cat([(k - v).unsqueeze(2).expand(-1, -1, n - 1, -1, -1), k.unsqueeze(2)], dim=2)


def linear_chunk_forward(spec: ChunkSpec, q, k, v, eta, log_alpha, write, snap_a, snap_b, cur_a, cur_b, anchor_a,
                         anchor_b, keep: bool = False):
    """One chunk of the linear memories (`memory_depth=1`: M(z) = z + z B, B (d x d) per memory), exactly: every
    memory is a gated delta rule with the keys k (DGD at the current weights, paper Eq. 57 and 93 with the
    sign-corrected value term). Same signature and returns as `chunk_forward`; the first-layer weights A are empty
    (R, H, d, 0) and pass through unchanged.

    Per token and memory, in deviations Y = B - anchor: Y_t = (alpha_t I - eta'_t k_t^T k_t) Y_{t-1}
    + eta'_t k_t^T (vhat_t - k_t - k_t anchor), eta' = eta / (1 + eta |k|^2); in chunk form one UT transform per
    chunk and head serves every memory. Reads of the output memory at the per-token state (read before write).
    """
    same = snap_b is None
    snap_b = cur_b if same else snap_b
    length = q.shape[2]
    eta = eta * write.unsqueeze(-1)
    log_alpha = log_alpha * write
    # M_s(k) - vhat per memory: (R,H,n,L,d); vhat = M_s(v) (self-generated) for all but the output memory, whose
    # target is v itself
    e = (k - v).unsqueeze(2) + _error_inputs(spec, k, v, snap_b.shape[2]) @ snap_b
    if spec.self_modifying and spec.detach_self_targets:  # same values; the gradient reaches e through M(k) only
        mk = k.unsqueeze(2) + k.unsqueeze(2) @ snap_b
        e = e.detach() + (mk - mk.detach())
    eta1 = (eta / (1 + eta * k.pow(2).sum(-1, keepdim=True))).transpose(2, 3)  # per memory: (R,H,n,L)
    decay, to_end, e_prev, e_end = decays(log_alpha, length)
    k_y0 = k.unsqueeze(2) @ cur_b
    q_y0 = q.unsqueeze(2) @ cur_b[:, :, -1:]
    if anchor_b is not None:
        k_anchor = per_memory(k.unsqueeze(2).expand(-1, -1, anchor_b.shape[1], -1, -1), anchor_b)
        k_y0 = k_y0 - k_anchor
        q_anchor = per_head(q, anchor_b[:, -1])
        q_y0 = q_y0 - q_anchor.unsqueeze(2)
    k_ys = k_y0 if same else k.unsqueeze(2) @ snap_b - (0 if anchor_b is None else k_anchor)
    rhs = eta1.unsqueeze(-1) * (k_ys - e - e_prev[:, :, None, :, None] * k_y0)
    kk = k @ k.transpose(-1, -2)
    lower = eta1.unsqueeze(-1) * (decay * kk).unsqueeze(2)  # (R,H,n,L,L)
    eye = torch.eye(length, dtype=lower.dtype, device=lower.device).expand_as(lower)
    ut = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
    u1 = ut @ rhs  # (R,H,n,L,d)
    b_end = plus_product(decayed_start(cur_b, anchor_b, e_end), k.transpose(-1, -2).unsqueeze(2).expand(
        -1, -1, cur_b.shape[2], -1, -1), to_end[:, :, None, :, None] * u1)
    qk = (q @ k.transpose(-1, -2)) * decay
    o = q + e_prev.unsqueeze(-1) * q_y0[:, :, 0] + qk @ u1[:, :, -1]
    if anchor_b is not None:
        o = o + q_anchor
    if not keep:
        return o, cur_a, b_end
    saved = dict(eta=eta, e=e, eta1=eta1, decay=decay, to_end=to_end, e_prev=e_prev, e_end=e_end, k_y0=k_y0,
                 k_ys=k_ys, q_y0=q_y0, kk=kk, ut=ut, u1=u1, qk=qk)
    return o, cur_a, b_end, saved


def linear_chunk_backward(spec: ChunkSpec, inputs, t, d_o, d_a_end, d_b_end):
    """The vector-Jacobian product of `linear_chunk_forward`, written out (tested against autograd); returns the
    gradients in `chunk_backward`'s order."""
    q, k, v, eta_in, log_alpha_in, write, snap_a, snap_b, cur_a, cur_b, anchor_a, anchor_b = inputs
    same = snap_b is None
    snap_b = cur_b if same else snap_b
    tr = lambda x: x.transpose(-1, -2)  # noqa: E731
    eta, e, eta1, decay, to_end, e_prev, e_end = (t[n] for n in ("eta", "e", "eta1", "decay", "to_end", "e_prev",
                                                                 "e_end"))
    u1, k_y0, k_ys, kk = t["u1"], t["k_y0"], t["k_ys"], t["kk"]
    ep = e_prev[:, :, None, :, None]
    # ---- the read: o = q + e_prev * (q @ y0_o) + qk @ u1_o (+ q @ anchor_o), qk = (q k^T) * decay
    d_q = d_o.clone()
    d_o_prev = e_prev.unsqueeze(-1) * d_o
    d_q = d_q + d_o_prev @ tr(cur_b[:, :, -1])
    d_y0 = torch.zeros_like(cur_b)
    d_y0[:, :, -1] = tr(q) @ d_o_prev
    d_g_prev = (d_o * t["q_y0"][:, :, 0]).sum(-1) * e_prev
    d_u1 = torch.zeros_like(u1)
    d_u1[:, :, -1] = tr(t["qk"]) @ d_o
    d_qk_raw = (d_o @ tr(u1[:, :, -1])) * decay
    d_log_decay = d_qk_raw * (q @ tr(k))
    d_q = d_q + d_qk_raw @ k
    d_k = tr(d_qk_raw) @ q
    d_anchor_b = None
    if anchor_b is not None:
        d_q = d_q + per_head(d_o - d_o_prev, tr(anchor_b[:, -1]))
        d_anchor_b = torch.zeros_like(anchor_b)
        d_anchor_b[:, -1] = (tr(q) @ d_o).sum(0)
    # ---- B: b_end = e_end * y0 + k^T (to_end * u1) (+ anchor)
    d_start, dot_b = start_gradient(d_b_end, cur_b, anchor_b, e_end)
    d_y0 = d_y0 + d_start
    d_g_end = dot_b.unsqueeze(-1) * e_end
    d_weighted = k.unsqueeze(2) @ d_b_end  # (R,H,n,L,d)
    d_k = d_k + ((to_end[:, :, None, :, None] * u1) @ tr(d_b_end)).sum(2)
    d_u1 = d_u1 + to_end[:, :, None, :, None] * d_weighted
    d_to_end = (d_weighted * u1).sum((2, 4))
    d_rhs = tr(t["ut"]) @ d_u1
    neg_d_lower = (d_rhs @ tr(u1)) * decay.unsqueeze(2)  # (R,H,n,L,L)
    d_eta1 = -(neg_d_lower * kk.unsqueeze(2)).sum(-1)  # (R,H,n,L)
    neg_d_kk = (neg_d_lower * eta1.unsqueeze(-1)).sum(2)
    d_log_decay = d_log_decay - neg_d_kk * kk
    d_k = d_k - (neg_d_kk + tr(neg_d_kk)) @ k
    # rhs = eta1 * w, w = k_ys - e - e_prev * k_y0
    w = k_ys - e - ep * k_y0
    d_eta1 = d_eta1 + (d_rhs * w).sum(-1)
    d_w = eta1.unsqueeze(-1) * d_rhs
    d_e = -d_w
    d_g_prev = d_g_prev - (d_w * k_y0).sum((2, 4)) * e_prev
    d_k_y0 = -ep * d_w
    d_k_ys = d_w
    if same:
        d_k_y0 = d_k_y0 + d_k_ys
    d_k = d_k + (d_k_y0 @ tr(cur_b)).sum(2)
    d_y0 = d_y0 + tr(k).unsqueeze(2) @ d_k_y0
    d_snap_b = None
    if not same:
        d_k = d_k + (d_k_ys @ tr(snap_b)).sum(2)
        d_snap_b = tr(k).unsqueeze(2) @ d_k_ys
    if anchor_b is not None:
        d_anchor = d_k_y0 if same else d_k_y0 + d_k_ys
        d_k = d_k - per_memory(d_anchor, tr(anchor_b)).sum(2)
        d_anchor_b = d_anchor_b + d_b_end.sum(0) - d_y0.sum(0)
        if not same:
            d_anchor_b = d_anchor_b - d_snap_b.sum(0)
    # ---- eta1 = eta / (1 + eta |k|^2), per memory
    d_eta1 = d_eta1.transpose(2, 3)  # (R,H,L,n)
    den = (1 + eta * k.pow(2).sum(-1, keepdim=True)).pow(2)
    d_eta = d_eta1 / den
    d_k = d_k - (2 * d_eta1 * eta.pow(2) / den).sum(-1, keepdim=True) * k
    d_log_alpha = decays_backward(log_alpha_in, to_end, d_log_decay, d_to_end, d_g_prev, d_g_end)
    # ---- e = (k - v) + z_e @ B_s (z_e = k - v for memories with self-generated targets, else k)
    if spec.self_modifying and spec.detach_self_targets:
        d_mk = d_e
        d_k = d_k + d_mk.sum(2) + (d_mk @ tr(snap_b)).sum(2)
        d_v = torch.zeros_like(v)
        d_sb = tr(k).unsqueeze(2) @ d_mk
    else:
        d_z = d_e @ tr(snap_b)
        d_sb = tr(_error_inputs(spec, k, v, snap_b.shape[2])) @ d_e
        d_e_sum = d_e.sum(2)
        d_k = d_k + d_e_sum + d_z.sum(2)
        d_v = -d_e_sum - (d_z[:, :, :-1].sum(2) if spec.self_modifying else 0)
    if same:  # B_s is cur_b itself (not a deviation): the anchor has no share in it
        d_y0 = d_y0 + d_sb
    else:
        d_snap_b = d_snap_b + d_sb
    return (d_q, d_k, d_v, d_eta * write.unsqueeze(-1), d_log_alpha * write, None if same else torch.zeros_like(snap_a),
            d_snap_b, torch.zeros_like(cur_a), d_y0, None if anchor_a is None else torch.zeros_like(anchor_a),
            d_anchor_b)

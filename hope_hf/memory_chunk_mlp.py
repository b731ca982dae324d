"""One chunk of the rule for MLP memories (`memory_depth=2`, paper Eq. 84-91), and its written-out backward."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .memory_common import (
    NORM_EPS, ChunkSpec, decayed_start, l2norm, l2norm_backward, per_head, per_memory, plus_product, snapshot_weights,
    start_gradient, tokens_last,
)


def mlp_chunk_forward(spec: ChunkSpec, q, k, v, eta, log_alpha, write, snap_a, snap_b, cur_a, cur_b, anchor_a,
                      anchor_b, keep: bool = False):
    """One chunk of the rule for MLP memories (docs/design.md §6a), exactly, for all memories and heads at once
    (Eq. 84-91).

    q, k, v: (R, H, L, d); eta (R, H, L, n): one learning rate per memory; log_alpha (R, H, L); write (R, 1, L)
    (1 = real token); snapshot and current weights A (R, H, d, n*m) and B (R, H, n, m, d), the snapshot None where
    it is the current weights (every chunk
    of a scan but one that starts inside a chunk); anchors (the initial states, H-shaped) or None. Returns the reads
    o (R, H, L, d) and the weights after the chunk; with `keep`, also every intermediate (`chunk_backward` uses them).
    Differentiable with autograd (the reference for `chunk_backward`); the model calls it through `ChunkStep`.
    """
    C, n, m = spec.chunk_size, spec.num_memories, spec.memory_dim
    length = q.shape[2]  # C, or fewer for a piece that starts or ends inside a chunk
    # a snapshot that is the current weights: the keys' product with them is among the targets'
    same, snap_a, snap_b = snapshot_weights(snap_a, snap_b, cur_a, cur_b)
    eta = eta * write.unsqueeze(-1)  # pad tokens: no write ...
    log_alpha = log_alpha * write  # ... and no decay

    # self-generated targets (Eq. 84) or, without self-modification, the value itself; the gradients of
    # 1/2 ||M_s(k) - vhat||^2 at the snapshot (Eq. 88). v and k share one product.
    z = torch.cat([v, k], dim=2) if spec.self_modifying else k
    pre_all = (z @ snap_a).unflatten(-1, (n, m))  # (R,H,2L or L,n,m): v's rows first
    sig_all = torch.sigmoid(pre_all)
    raw_all = pre_all * sig_all  # silu
    nrm_all = torch.rsqrt(raw_all.pow(2).sum(-1, keepdim=True) + NORM_EPS)
    h_all = raw_all * nrm_all  # the hidden features sigma(z A), sigma = l2norm o silu
    first_k = pre_all.shape[2] - length
    pre, sig, h = pre_all[:, :, first_k:], sig_all[:, :, first_k:], h_all[:, :, first_k:]  # the keys' rows
    raw = raw_all[:, :, first_k:]
    # M(k) - M(v) = (k - v) + (silu(k A) - silu(v A)) B: one product with B instead of two
    # the other memories regress onto their self-generated targets M_s(v), the output memory onto v itself
    h_e = torch.cat([h[..., :-1, :] - h_all[:, :, :length, :-1], h[..., -1:, :]], -2) if spec.self_modifying else h
    e = torch.einsum("rhcnm,rhnmd->rhcnd", h_e, snap_b) + (k - v).unsqueeze(-2)  # (R,H,L,n,d)
    if spec.self_modifying and spec.detach_self_targets:  # same values; the gradient reaches e through M(k) only
        mk = k.unsqueeze(-2) + torch.einsum("rhcnm,rhnmd->rhcnd", h, snap_b)
        e = e.detach() + (mk - mk.detach())
        h_e = h  # the hidden activations whose product with B reaches e with a gradient
    dpre0 = torch.addcmul(sig, raw, 1 - sig)  # silu'(pre) = sig + silu(pre) (1 - sig)
    b_e = torch.einsum("rhcnd,rhnmd->rhcnm", e, snap_b)
    # the gradient of the pre-activations, through the normalisation: (I - h h^T) / |silu(pre)|
    dpre = dpre0 * nrm_all[:, :, first_k:]
    delta = (b_e - h * (h * b_e).sum(-1, keepdim=True)) * dpre

    # step sizes: DGD's curvature normalisation, and by the C gradients taken at one snapshot
    h_sq = h.pow(2).sum(-1)
    eta1 = eta / (1 + eta * h_sq)  # the exact (proximal) step of the output layer's delta rule: (R,H,L,n)
    col_norms = snap_b.pow(2).sum(-1)  # |W1_s[:, j]|^2: (R,H,n,m)
    dpre_sq = dpre.pow(2)
    curv = (dpre_sq * col_norms.unsqueeze(2)).sum(-1)
    eta2 = eta / (1 + C * eta * curv)

    # decays in log space: gamma_t = prod_{i<=t} alpha_i
    # One token with nothing kept (decoding): no pair i < t inside the piece, so the decay matrix, the triangular
    # solve and the in-piece read terms vanish exactly (gamma_0 = 1, gamma_L / gamma_1 = 1); skip them.
    single = length == 1 and not keep
    if single:
        e_end = torch.exp(log_alpha)  # (R,H,1)
    else:
        g = torch.cumsum(log_alpha, dim=-1)  # (R,H,L)
        g_prev = g - log_alpha
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril(-1)
        decay = torch.exp((g_prev.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~causal, -math.inf))  # (R,H,L,L) i<t
        g_end = g[..., -1:]
        to_end = torch.exp(g_end - g)  # gamma_L / gamma_i
        e_prev, e_end = torch.exp(g_prev), torch.exp(g_end)

    # ---- W2 (A): X_t = (alpha_t I - eta'_t k_t k_t^T) X_{t-1} + k_t u_t, X = A - anchor (gated delta rule), per
    # memory (each has its own learning rate): the memories' blocks as (R,H,L,n,m)
    force = -(eta2.unsqueeze(-1) * delta)  # (R,H,L,n,m)
    eta_p = k_anchor = k_x0 = kk = ut = None
    if spec.dgd:
        eta_p = eta / (1 + eta * k.pow(2).sum(-1, keepdim=True))  # the erase: (R,H,L,n)
        if spec.retain_toward_init:
            k_anchor = per_head(k, anchor_a).unflatten(-1, (n, m))
            force = force - eta_p.unsqueeze(-1) * k_anchor
        k_cur = pre_all[:, :, first_k:] if same else (k @ cur_a).unflatten(-1, (n, m))
        k_x0 = k_cur if k_anchor is None else k_cur - k_anchor  # k @ x0
        if single:
            r = force - eta_p.unsqueeze(-1) * k_x0
        else:
            rhs = force - (eta_p * e_prev.unsqueeze(-1)).unsqueeze(-1) * k_x0
            kk = k @ k.transpose(-1, -2)
            lower = eta_p.transpose(2, 3).unsqueeze(-1) * (decay * kk).unsqueeze(2)  # (R,H,n,L,L)
            # UT transform: r = (I + lower)^-1 rhs, through the (L, L) inverse (one solve against the identity and a
            # product: a solve against the m-wide rhs runs at a few GFLOP/s); backward reuses it transposed
            eye = torch.eye(length, dtype=lower.dtype, device=lower.device).expand_as(lower)
            ut = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
            r = (ut @ rhs.transpose(2, 3)).transpose(2, 3)
    else:
        r = force
    r = r.flatten(-2)  # (R,H,L,n*m)
    # a_end = e_end x0 + k^T (to_end r) (+ anchor_a): the product accumulates into the decayed start
    a_end = plus_product(decayed_start(cur_a, anchor_a, e_end), k.transpose(-1, -2),
                          r if single else to_end.unsqueeze(-1) * r)

    # ---- W1 (B): a gated delta rule per memory with keys h_t (DGD at the current weights, see docs/design.md):
    # Y_t = (alpha_t I - eta1_t h_t^T h_t) Y_{t-1} + eta1_t h_t^T w_t, Y = B - anchor, w_t = vhat_t - k_t - h_t anchor;
    # w_t - h_t Y_{t-1} is minus the error at the current weights. In chunk form (UT transform, as for W2):
    # (I + lower1) u1 = eta1 (h Y_s - e - gamma_{t-1} h Y_0), since vhat - k - h anchor = h Y_s - e.
    hn = h.transpose(2, 3)  # (R,H,n,L,m): per memory, the keys of its delta rule
    e1 = eta1.transpose(2, 3)  # (R,H,n,L)
    h_y0 = hn @ cur_b
    if anchor_b is not None:
        h_anchor = per_memory(hn, anchor_b)
        h_y0 = h_y0 - h_anchor
    h_ys = h_y0 if same else hn @ snap_b - (0 if anchor_b is None else h_anchor)
    e_t = e.transpose(2, 3)  # (R,H,n,L,d)
    hh = ut1 = None
    if single:
        u1 = e1.unsqueeze(-1) * (h_ys - e_t - h_y0)
    else:
        rhs1 = e1.unsqueeze(-1) * (h_ys - e_t - e_prev[:, :, None, :, None] * h_y0)
        hh = hn @ hn.transpose(-1, -2)  # (R,H,n,L,L)
        lower1 = e1.unsqueeze(-1) * decay.unsqueeze(2) * hh
        eye1 = torch.eye(length, dtype=lower1.dtype, device=lower1.device).expand_as(lower1)
        ut1 = torch.linalg.solve_triangular(lower1, eye1, upper=False, unitriangular=True)
        u1 = ut1 @ rhs1
    b_end = plus_product(decayed_start(cur_b, anchor_b, e_end), hn.transpose(-1, -2),
                          u1 if single else to_end[:, :, None, :, None] * u1)

    # ---- read the output memory at the per-token state (Eq. 86, read before write); x0 and y0 (the weights less
    # the anchors) are never formed: their products are those of the weights less those of the anchors
    sl_o = slice((n - 1) * m, n * m)
    q_x0 = q @ cur_a[..., sl_o]
    if spec.retain_toward_init:
        q_anchor = per_head(q, anchor_a[..., sl_o])
        q_x0 = q_x0 - q_anchor
    if single:
        pre_q = q_x0
    else:
        qk_raw = q @ k.transpose(-1, -2)
        qk = qk_raw * decay
        pre_q = e_prev.unsqueeze(-1) * q_x0 + qk @ r[..., sl_o]
    if spec.retain_toward_init:
        pre_q = pre_q + q_anchor
    s0 = F.silu(pre_q)  # (R,H,L,m)
    s = l2norm(s0)
    s_y0 = s @ cur_b[:, :, -1]
    if spec.retain_toward_init:
        s_anchor = per_head(s, anchor_b[:, -1])
        s_y0 = s_y0 - s_anchor
    if single:
        o = q + s_y0
    else:
        sh_raw = s @ hn[:, :, -1].transpose(-1, -2)
        sh = sh_raw * decay
        o = q + e_prev.unsqueeze(-1) * s_y0 + sh @ u1[:, :, -1]
    if spec.retain_toward_init:
        o = o + s_anchor
    if not keep:
        return o, a_end, b_end
    # everything chunk_backward reads (the weights it needs are among the inputs)
    saved = dict(eta=eta, z=z, sig_all=sig_all, raw_all=raw_all, nrm_all=nrm_all, h_all=h_all, h_e=h_e, pre=pre,
                 sig=sig, raw=raw, h=h, e=e, dpre0=dpre0, dpre=dpre, s0=s0,
                 b_e=b_e, delta=delta, h_sq=h_sq, eta1=eta1, col_norms=col_norms, dpre_sq=dpre_sq, curv=curv, eta2=eta2,
                 decay=decay, to_end=to_end, e_prev=e_prev, e_end=e_end, eta_p=eta_p, k_anchor=k_anchor, k_x0=k_x0,
                 kk=kk, ut=ut, r=r, hh=hh, ut1=ut1, u1=u1, h_y0=h_y0, h_ys=h_ys, qk_raw=qk_raw, qk=qk, q_x0=q_x0, pre_q=pre_q, s=s,
                 sh_raw=sh_raw, sh=sh, s_y0=s_y0)
    return o, a_end, b_end, saved


def mlp_chunk_backward(spec: ChunkSpec, inputs, t, d_o, d_a_end, d_b_end):
    """The vector-Jacobian product of `mlp_chunk_forward`, written out (same numbers as autograd through it, tested).

    `inputs` are the forward's tensors, `t` its intermediates (`keep=True`), `d_*` the gradients of its outputs.
    Returns the gradients of (q, k, v, eta, log_alpha, snap_a, snap_b, cur_a, cur_b, anchor_a, anchor_b); the
    anchors' (H-shaped, shared by the batch rows) are summed over the rows. A snapshot given as None (the current
    weights) gets None: its gradient is in the current weights'.
    """
    q, k, v, eta_in, log_alpha_in, write, snap_a, snap_b, cur_a, cur_b, anchor_a, anchor_b = inputs
    same, snap_a, snap_b = snapshot_weights(snap_a, snap_b, cur_a, cur_b)
    C, n, m = spec.chunk_size, spec.num_memories, spec.memory_dim
    length = q.shape[2]
    retain = spec.retain_toward_init
    sl_o = slice((n - 1) * m, n * m)
    eta, h, e, decay, eta1, s, r = t["eta"], t["h"], t["e"], t["decay"], t["eta1"], t["s"], t["r"]
    e_prev, e_end, to_end = t["e_prev"], t["e_end"], t["to_end"]
    tr = lambda x: x.transpose(-1, -2)  # noqa: E731
    # Every use of a (t, i) matrix below is multiplied by `decay`, zero for i >= t: no causal mask is needed.
    # d_log_decay: the gradient of the exponent of decay, i.e. of decay times decay.

    # As in the forward, x0 = cur_a - anchor_a and y0 = cur_b - anchor_b are never formed: a product with one is
    # the product with the weights less the product with the anchors, which joins the anchors' own term.

    # ---- the output read: o = q + e_prev * (s @ y0_o) + sh @ u1_o (+ s @ anchor_b_o); "_o": the output memory's
    # slices, added into the full gradients further down
    u1, hn = t["u1"], h.transpose(2, 3)
    d_q = d_o.clone()
    d_o_prev = e_prev.unsqueeze(-1) * d_o
    d_s = d_o_prev @ tr(cur_b[:, :, -1])
    d_y0_o = tr(s) @ d_o_prev
    d_g_prev = (d_o * t["s_y0"]).sum(-1) * e_prev
    if retain:
        d_s = d_s + per_head(d_o - d_o_prev, tr(anchor_b[:, -1]))
        d_anchor_b_o = (tr(s) @ d_o).sum(0)
    d_u1_o = tr(t["sh"]) @ d_o
    d_sh_raw = (d_o @ tr(u1[:, :, -1])) * decay
    d_log_decay = d_sh_raw * t["sh_raw"]
    d_s = d_s + d_sh_raw @ hn[:, :, -1]
    d_h_o = tr(d_sh_raw) @ s
    sig_q, s0 = torch.sigmoid(t["pre_q"]), t["s0"]
    d_s = l2norm_backward(s, s0, d_s)  # s = l2norm(silu(pre_q))
    d_pre_q = d_s * torch.addcmul(sig_q, s0, 1 - sig_q)  # silu'
    # pre_q = e_prev * (q @ x0_o) + qk @ r_o (+ q @ anchor_a_o)
    d_pre_q_prev = e_prev.unsqueeze(-1) * d_pre_q
    d_q = d_q + d_pre_q_prev @ tr(cur_a[..., sl_o])
    d_x0_o = tr(q) @ d_pre_q_prev
    d_g_prev = d_g_prev + (d_pre_q * t["q_x0"]).sum(-1) * e_prev
    d_r_o = tr(t["qk"]) @ d_pre_q
    d_qk = d_pre_q @ tr(r[..., sl_o])
    if retain:
        d_q = d_q + per_head(d_pre_q - d_pre_q_prev, tr(anchor_a[..., sl_o]))
        d_anchor_a_o = (tr(q) @ d_pre_q).sum(0)
    d_qk_raw = d_qk * decay
    d_log_decay = d_log_decay + d_qk_raw * t["qk_raw"]
    d_q = d_q + d_qk_raw @ k
    d_k = tr(d_qk_raw) @ q

    # ---- W1: b_end = e_end * y0 + hn^T (to_end * u1) (+ anchor_b), u1 from the memories' UT transforms
    d_y0, dot_b = start_gradient(d_b_end, cur_b, anchor_b, e_end)
    d_y0[:, :, -1].add_(d_y0_o)
    d_g_end = dot_b.unsqueeze(-1) * e_end
    te = to_end[:, :, None, :, None]
    d_weighted_u1 = hn @ d_b_end  # (R,H,n,L,d)
    d_hn = (te * u1) @ tr(d_b_end)
    d_u1 = te * d_weighted_u1
    d_u1[:, :, -1].add_(d_u1_o)
    d_to_end = (d_weighted_u1 * u1).sum((2, 4))
    e1 = eta1.transpose(2, 3)
    d_rhs1 = tr(t["ut1"]) @ d_u1  # (I + lower1)^-T d_u1
    neg_d_lower1 = (d_rhs1 @ tr(u1)) * decay.unsqueeze(2)  # strictly lower (the factor decay sees to it)
    hh = t["hh"]
    d_e1 = -(neg_d_lower1 * hh).sum(-1)
    neg_d_hh = neg_d_lower1 * e1.unsqueeze(-1)
    d_log_decay = d_log_decay - (neg_d_hh * hh).sum(2)
    d_hn = d_hn - (neg_d_hh + tr(neg_d_hh)) @ hn
    # rhs1 = e1 * w, w = h_ys - e^T - e_prev * h_y0 (h_ys: h @ (snapshot less anchor); h_y0: h @ (current less anchor))
    h_y0, h_ys = t["h_y0"], t["h_ys"]
    d_w = e1.unsqueeze(-1) * d_rhs1
    d_e1 = d_e1 + (d_rhs1 * (h_ys - e.transpose(2, 3) - e_prev[:, :, None, :, None] * h_y0)).sum(-1)
    d_e = d_w.transpose(2, 3).neg()  # (R,H,L,n,d)
    d_g_prev = d_g_prev - (d_w * h_y0).sum((2, 4)) * e_prev
    d_h_y0 = -e_prev[:, :, None, :, None] * d_w
    d_h_ys = d_w
    if same:
        d_h_y0 = d_h_y0 + d_h_ys
    d_hn = d_hn + d_h_y0 @ tr(cur_b)
    d_y0 = plus_product(d_y0, tr(hn), d_h_y0)
    d_snap_b_w1 = None
    if not same:
        d_hn = d_hn + d_h_ys @ tr(snap_b)
        d_snap_b_w1 = tr(hn) @ d_h_ys
    d_cur_b = d_y0
    d_anchor_a = d_anchor_b = None
    if retain:
        # h_y0 = h (cur_b - anchor_b), h_ys = h (snap_b - anchor_b): the anchor's share of h's gradient, and of
        # the anchor's own through y0 (d_y0 holds h_y0's) and through h_ys
        d_hn = d_hn - per_memory(d_h_y0 if same else d_h_y0 + d_h_ys, tr(anchor_b))
        d_anchor_b = d_b_end.sum(0) - d_y0.sum(0)
        if not same:
            d_anchor_b = d_anchor_b - d_snap_b_w1.sum(0)
        d_anchor_b[:, -1].add_(d_anchor_b_o)
    d_h = d_hn.transpose(2, 3)  # (R,H,L,n,m)
    d_h[..., -1, :].add_(d_h_o)
    d_eta1 = d_e1.transpose(2, 3)  # (R,H,L,n)

    # ---- W2: a_end = e_end * x0 + k^T (to_end * r) (+ anchor_a), r from the UT transform
    d_x0, dot_a = start_gradient(d_a_end, cur_a, anchor_a, e_end)
    d_x0[..., sl_o].add_(d_x0_o)
    d_g_end = d_g_end + dot_a.unsqueeze(-1) * e_end
    weighted_r = to_end.unsqueeze(-1) * r
    d_k = d_k + weighted_r @ tr(d_a_end)
    d_weighted_r = k @ d_a_end
    d_r = to_end.unsqueeze(-1) * d_weighted_r
    d_r[..., sl_o].add_(d_r_o)
    d_to_end = d_to_end + (d_weighted_r * r).sum(-1)
    if retain:
        d_anchor_a = d_a_end.sum(0)
        d_anchor_a[..., sl_o].add_(d_anchor_a_o)
    d_r = d_r.unflatten(-1, (n, m))  # per memory: (R,H,L,n,m)
    if spec.dgd:
        eta_p, k_x0, kk = t["eta_p"], t["k_x0"], t["kk"]
        r_n = r.unflatten(-1, (n, m)).transpose(2, 3)  # (R,H,n,L,m)
        d_rhs = tr(t["ut"]) @ d_r.transpose(2, 3)  # (I + lower)^-T d_r, per memory
        # lower = eta_p * decay * kk; its gradient is -(d_rhs r^T), strictly lower (the factor decay sees to it)
        neg_d_lower = (d_rhs @ tr(r_n)) * decay.unsqueeze(2)  # (R,H,n,L,L)
        d_eta_p = -(neg_d_lower * kk.unsqueeze(2)).sum(-1).transpose(2, 3)  # (R,H,L,n)
        neg_d_kk = (neg_d_lower * eta_p.transpose(2, 3).unsqueeze(-1)).sum(2)
        d_log_decay = d_log_decay - neg_d_kk * kk
        d_k = d_k - (neg_d_kk + tr(neg_d_kk)) @ k
        d_force = d_rhs.transpose(2, 3)  # (R,H,L,n,m)
        coef = eta_p * e_prev.unsqueeze(-1)
        d_coef = -(d_force * k_x0).sum(-1)
        d_eta_p = d_eta_p + d_coef * e_prev.unsqueeze(-1)
        d_g_prev = d_g_prev + (d_coef * coef).sum(-1)
        d_k_x0 = -coef.unsqueeze(-1) * d_force
        if not same:  # (else k @ cur_a is in the snapshot's product, whose gradients come below)
            d_k = d_k + d_k_x0.flatten(-2) @ tr(cur_a)
            d_x0 = plus_product(d_x0, tr(k), d_k_x0.flatten(-2))
        if retain:
            d_k_anchor = -eta_p.unsqueeze(-1) * d_force
            d_k = d_k + per_head((d_k_anchor - d_k_x0).flatten(-2), tr(anchor_a))
            # the anchor's share of k @ x0: through d_x0 below, or here where d_x0 has not got it
            d_anchor_a = d_anchor_a + (tr(k) @ (d_k_anchor - d_k_x0 if same else d_k_anchor).flatten(-2)).sum(0)
            d_eta_p = d_eta_p - (d_force * t["k_anchor"]).sum(-1)
        # eta_p = eta / (1 + eta |k|^2)
        k_sq = k.pow(2).sum(-1, keepdim=True)
        den = (1 + eta * k_sq).pow(2)
        d_eta = d_eta_p / den
        d_k = d_k - (2 * d_eta_p * eta.pow(2) / den).sum(-1, keepdim=True) * k
    else:
        d_force = d_r
        d_eta = torch.zeros_like(eta)
    d_delta = -t["eta2"].unsqueeze(-1) * d_force
    d_eta2 = -(d_force * t["delta"]).sum(-1)
    d_cur_a = d_x0
    if retain:
        d_anchor_a = d_anchor_a - d_x0.sum(0)

    # ---- decays: decay[t, i] = exp(g_prev_t - g_i) (i < t), to_end = exp(g_end - g), g = cumsum(log_alpha)
    d_g_prev = d_g_prev + d_log_decay.sum(-1)
    d_g = -d_log_decay.sum(-2)
    d_to_end = d_to_end * to_end
    d_g_end = d_g_end + d_to_end.sum(-1, keepdim=True)
    d_g = d_g - d_to_end
    d_g[..., -1:].add_(d_g_end)
    d_g = d_g + d_g_prev
    d_log_alpha = d_g.flip(-1).cumsum(-1).flip(-1) - d_g_prev

    # ---- step sizes (per memory): eta1 = eta / (1 + eta |h|^2), eta2 = eta / (1 + C eta curv)
    den1 = (1 + eta * t["h_sq"]).pow(2)
    d_eta = d_eta + d_eta1 / den1
    d_h = d_h + (-2 * d_eta1 * eta.pow(2) / den1).unsqueeze(-1) * h
    den2 = (1 + C * eta * t["curv"]).pow(2)
    d_eta = d_eta + d_eta2 / den2
    d_curv = -C * d_eta2 * eta.pow(2) / den2
    dpre = t["dpre"]
    d_dpre = (2 * d_curv).unsqueeze(-1) * dpre * t["col_norms"].unsqueeze(2)
    d_col = (d_curv.unsqueeze(-1) * t["dpre_sq"]).sum(2)
    # the snapshot's gradients accumulate into the current weights' where it is them (after the anchors took theirs)
    if same:
        d_snap_b = d_cur_b.addcmul_(snap_b, (2 * d_col).unsqueeze(-1))
    else:
        d_snap_b = d_snap_b_w1.addcmul_(snap_b, (2 * d_col).unsqueeze(-1))

    # ---- gradients at the snapshot: delta = (e B^T) * dpre, e = M(k) - vhat; with normalised features
    # delta = (b_e - h <h, b_e>) * silu'(pre) * nrm, nrm = 1 / |silu(pre)|
    b_e = t["b_e"]
    h_b_e = (h * b_e).sum(-1, keepdim=True)
    d_proj = d_delta * dpre
    d_dpre = d_dpre + d_delta * (b_e - h * h_b_e)
    h_d_proj = (h * d_proj).sum(-1, keepdim=True)
    d_b_e = d_proj - h * h_d_proj
    d_h = d_h - d_proj * h_b_e - b_e * h_d_proj
    d_nrm = (d_dpre * t["dpre0"]).sum(-1, keepdim=True)  # dpre = silu'(pre) * nrm
    d_dpre = d_dpre * t["nrm_all"][:, :, t["nrm_all"].shape[2] - length :]
    d_e = d_e + torch.einsum("rhcnm,rhnmd->rhcnd", d_b_e, snap_b)
    sig, pre = t["sig"], t["pre"]
    silu_grad2 = sig * (1 - sig) * (2 + pre - 2 * t["raw"])  # silu''(pre) = sig (1 - sig) (2 + pre (1 - 2 sig))

    # ---- the reads through the snapshot: e = (k - v) + (silu(k A) - silu(v A)) B (v's read absent without
    # self-modification, and gradient-free with detached targets)
    z, sig_all, raw_all = t["z"], t["sig_all"], t["raw_all"]
    # d_snap_b: the column norms' term + d_b_e^T e + h_e^T d_e, the two products as one over 2L tokens
    d_snap_b = plus_product(d_snap_b, tokens_last(torch.cat([d_b_e, t["h_e"]], dim=2)),
                             torch.cat([e, d_e], dim=2).transpose(2, 3))
    d_h_e = torch.einsum("rhcnd,rhnmd->rhcnm", d_e, snap_b)
    d_e_sum = d_e.sum(-2)
    if not spec.self_modifying:
        d_h_all = d_h_e
    elif spec.detach_self_targets:
        d_h_all = torch.cat([torch.zeros_like(d_h_e), d_h_e], dim=2)
    else:  # the v rows: minus the share of the memories with self-generated targets (all but the output memory)
        d_h_all = torch.cat([torch.cat([-d_h_e[..., :-1, :], torch.zeros_like(d_h_e[..., -1:, :])], -2), d_h_e], 2)
    keys = slice(d_h_all.shape[2] - length, None)  # the keys' rows (after v's where there are two sets)
    d_h_all[:, :, keys].add_(d_h)
    nrm_all = t["nrm_all"]  # h = silu(pre) * nrm, nrm = (|silu(pre)|^2 + eps)^-1/2
    dot = (d_h_all * raw_all).sum(-1, keepdim=True)
    dot[:, :, keys].add_(d_nrm)
    d_raw_all = d_h_all * nrm_all - raw_all * nrm_all.pow(3) * dot
    d_pre_all = d_raw_all * torch.addcmul(sig_all, raw_all, 1 - sig_all)  # silu'
    d_pre_all[:, :, keys].addcmul_(d_dpre, silu_grad2)
    if same and spec.dgd:  # k_x0 = (the keys' rows of pre_all) - k_anchor
        d_pre_all[:, :, keys].add_(d_k_x0)
    d_pre_all = d_pre_all.flatten(-2)
    d_z = d_pre_all @ tr(snap_a)
    d_snap_a = plus_product(d_cur_a, tr(z), d_pre_all) if same else tr(z) @ d_pre_all
    d_k = d_k + d_e_sum + d_z[:, :, d_z.shape[2] - length :]
    if not spec.self_modifying:
        d_v = -d_e_sum
    elif spec.detach_self_targets:
        d_v = torch.zeros_like(v)  # the targets M(v) are constants, and v reaches e through them alone
    else:
        d_v = d_z[:, :, :length] - d_e_sum
    if same:
        d_snap_a = d_snap_b = None
    return (d_q, d_k, d_v, d_eta * write.unsqueeze(-1), d_log_alpha * write, d_snap_a, d_snap_b, d_cur_a, d_cur_b,
            d_anchor_a, d_anchor_b)

"""One chunk of the rule for MLP memories (`memory_depth=2`, paper Eq. 84-91), and its written-out backward.

The forward runs in named stages, each returning what its backward reads as a small NamedTuple; the backward runs
their vector-Jacobian products in reverse (each stage tested against autograd alone, tests/ops/test_memory_stages.py):

    forward stage                                        backward
    _features          sigma(z W_in_s), z = [v, k]       _features_backward
    _snapshot_gradient the errors e, the gradient delta  _snapshot_gradient_backward
    _step_sizes        eta1 (W_out), eta2 (W_in)         _step_sizes_backward
    decays             gamma (memory_common)             decays_backward
    _first_layer       W_in's gated delta rule           _first_layer_backward (+ _first_layer_erase_backward)
    _output_layer      W_out's gated delta rule          _output_layer_backward
    _read              o = M_o(q), before the write      _read_backward

Names as in memory_common and docs/design.md §6a: `h` the keys' hidden features, `x0`, `y0` the current `W_in`,
`W_out` less their anchors (never formed: a product with one is the product with the weights less the anchor's),
`_o` the output memory's share. Shapes (R, H, L, n, m) "per token and memory", `hn` (R, H, n, L, m) "per memory".
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .memory_common import (
    NORM_EPS, ChunkInputs, ChunkSpec, ChunkWeights, DecayGrads, Decays, chunk_weights, decayed_start, decays,
    decays_backward, l2norm, l2norm_backward, minus, per_head, per_memory, plus, plus_product, start_gradient,
    tokens_last, tr, unit_lower_inverse,
)


# ------------------------------------------------------------------------------------------------- forward stages
class Features(NamedTuple):
    """The memories' hidden features at the snapshot, sigma(z W_in_s) with sigma = l2norm o silu, for z = [v, k] (v's
    rows first: the self-generated targets M_s(v) need them) or, without self-modification, k. `*_all` hold every
    row, the others the keys' rows (views)."""

    z: torch.Tensor  # (R, H, 2L or L, d)
    sig_all: torch.Tensor  # sigmoid(pre): (R, H, 2L or L, n, m)
    raw_all: torch.Tensor  # silu(pre)
    nrm_all: torch.Tensor  # 1 / |silu(pre)|: (R, H, 2L or L, n, 1)
    h_all: torch.Tensor  # silu(pre) * nrm
    pre: torch.Tensor  # the keys' rows: k W_in_s (R, H, L, n, m)
    sig: torch.Tensor
    raw: torch.Tensor
    nrm: torch.Tensor
    h: torch.Tensor
    dpre0: torch.Tensor  # silu'(pre) = sig + silu(pre) (1 - sig)


def _features(spec: ChunkSpec, k, v, snapshot_in) -> Features:
    """The hidden features of the keys (and of the values, for the targets), v and k in one product."""
    n, m, length = spec.num_memories, spec.memory_dim, k.shape[2]
    z = torch.cat([v, k], dim=2) if spec.self_modifying else k
    pre_all = (z @ snapshot_in).unflatten(-1, (n, m))  # (R,H,2L or L,n,m): v's rows first
    sig_all = torch.sigmoid(pre_all)
    raw_all = pre_all * sig_all  # silu
    nrm_all = torch.rsqrt(raw_all.pow(2).sum(-1, keepdim=True) + NORM_EPS)
    h_all = raw_all * nrm_all
    keys = slice(pre_all.shape[2] - length, None)
    sig, raw = sig_all[:, :, keys], raw_all[:, :, keys]
    dpre0 = torch.addcmul(sig, raw, 1 - sig)
    return Features(z, sig_all, raw_all, nrm_all, h_all, pre_all[:, :, keys], sig, raw, nrm_all[:, :, keys],
                    h_all[:, :, keys], dpre0)


class SnapshotGradient(NamedTuple):
    """The memories' errors at the snapshot, e = M_s(k) - vhat (Eq. 84), and the gradient of 1/2 |e|^2 with respect
    to the first layers' pre-activations (Eq. 88)."""

    h_e: torch.Tensor  # the features whose product with W_out_s is e's memory term (R, H, L, n, m)
    e: torch.Tensor  # (R, H, L, n, d)
    b_e: torch.Tensor  # e W_out_s^T (R, H, L, n, m)
    dpre: torch.Tensor  # silu'(pre) / |silu(pre)|
    delta: torch.Tensor  # (b_e - h <h, b_e>) * dpre (R, H, L, n, m)


def _snapshot_gradient(spec: ChunkSpec, k, v, f: Features, snapshot_out) -> SnapshotGradient:
    """e for every memory (the output memory regresses onto v, the others onto their self-generated targets M_s(v))
    and the gradient of the pre-activations through sigma's Jacobian (I - h h^T) / |silu(pre)|."""
    length, h = k.shape[2], f.h
    # M(k) - M(v) = (k - v) + (sigma(k W_in) - sigma(v W_in)) W_out: one product with W_out instead of two
    h_e = torch.cat([h[..., :-1, :] - f.h_all[:, :, :length, :-1], h[..., -1:, :]], -2) if spec.self_modifying else h
    e = torch.einsum("rhcnm,rhnmd->rhcnd", h_e, snapshot_out) + (k - v).unsqueeze(-2)  # (R,H,L,n,d)
    if spec.self_modifying and spec.detach_self_targets:  # same values; the gradient reaches e through M(k) only
        mk = k.unsqueeze(-2) + torch.einsum("rhcnm,rhnmd->rhcnd", h, snapshot_out)
        e = e.detach() + (mk - mk.detach())
        h_e = h  # the hidden activations whose product with W_out reaches e with a gradient
    b_e = torch.einsum("rhcnd,rhnmd->rhcnm", e, snapshot_out)
    dpre = f.dpre0 * f.nrm
    delta = (b_e - h * (h * b_e).sum(-1, keepdim=True)) * dpre
    return SnapshotGradient(h_e, e, b_e, dpre, delta)


class StepSizes(NamedTuple):
    """Per token and memory: eta1, the exact (proximal) step of the output layer's delta rule, and eta2, the first
    layer's step normalised by its curvature and by the C gradients taken at one snapshot."""

    h_sq: torch.Tensor  # |h|^2 (R, H, L, n)
    eta1: torch.Tensor  # eta / (1 + eta |h|^2)
    col_norms: torch.Tensor  # |W_out_s[j]|^2 (R, H, n, m)
    dpre_sq: torch.Tensor
    curv: torch.Tensor  # sum_j dpre_j^2 |W_out_s[j]|^2
    eta2: torch.Tensor  # eta / (1 + C eta curv)


def _step_sizes(spec: ChunkSpec, eta, h, dpre, snapshot_out) -> StepSizes:
    h_sq = h.pow(2).sum(-1)
    eta1 = eta / (1 + eta * h_sq)
    col_norms = snapshot_out.pow(2).sum(-1)
    dpre_sq = dpre.pow(2)
    curv = (dpre_sq * col_norms.unsqueeze(2)).sum(-1)
    eta2 = eta / (1 + spec.chunk_size * eta * curv)
    return StepSizes(h_sq, eta1, col_norms, dpre_sq, curv, eta2)


class FirstLayer(NamedTuple):
    """What W_in's chunk update keeps: the erase's step and products (None without DGD) and the update r."""

    eta_p: torch.Tensor | None  # eta / (1 + eta |k|^2): (R, H, L, n)
    k_anchor: torch.Tensor | None  # k W_in_0 (retention toward the anchor)
    k_x0: torch.Tensor | None  # k x0
    kk: torch.Tensor | None  # k k^T (R, H, L, L)
    ut: torch.Tensor | None  # (I + lower)^-1 per memory (R, H, n, L, L)
    r: torch.Tensor  # (R, H, L, n*m)


def _first_layer(spec: ChunkSpec, k, eta, pre, delta, eta2, dec: Decays, w: ChunkWeights, single: bool):
    """W_in of every memory: X_t = (alpha_t I - eta'_t k_t k_t^T) X_{t-1} + k_t^T force_t, X = W_in - anchor, a gated
    delta rule per memory (DGD's erase; without DGD a plain decayed sum of the snapshot gradients). Returns the end
    weights and what backward keeps."""
    n, m = spec.num_memories, spec.memory_dim
    force = -(eta2.unsqueeze(-1) * delta)  # (R,H,L,n,m)
    eta_p = k_anchor = k_x0 = kk = ut = None
    if spec.dgd:
        eta_p = eta / (1 + eta * k.pow(2).sum(-1, keepdim=True))  # the erase: (R,H,L,n)
        if spec.retain_toward_init:
            k_anchor = per_head(k, w.anchor_in).unflatten(-1, (n, m))
            force = force - eta_p.unsqueeze(-1) * k_anchor
        k_current = pre if w.same else (k @ w.current_in).unflatten(-1, (n, m))
        k_x0 = k_current if k_anchor is None else k_current - k_anchor
        if single:
            r = force - eta_p.unsqueeze(-1) * k_x0
        else:
            rhs = force - (eta_p * dec.e_prev.unsqueeze(-1)).unsqueeze(-1) * k_x0
            kk = k @ k.transpose(-1, -2)
            lower = eta_p.transpose(2, 3).unsqueeze(-1) * (dec.decay * kk).unsqueeze(2)  # (R,H,n,L,L)
            ut = unit_lower_inverse(lower)
            r = (ut @ rhs.transpose(2, 3)).transpose(2, 3)
    else:
        r = force
    r = r.flatten(-2)  # (R,H,L,n*m)
    # end_in = e_end x0 + k^T (to_end r) (+ anchor_in): the product accumulates into the decayed start
    end_in = plus_product(decayed_start(w.current_in, w.anchor_in, dec.e_end), k.transpose(-1, -2),
                          r if single else dec.to_end.unsqueeze(-1) * r)
    return end_in, FirstLayer(eta_p, k_anchor, k_x0, kk, ut, r)


class OutputLayer(NamedTuple):
    """What W_out's chunk update keeps."""

    h_y0: torch.Tensor  # h y0 per memory (R, H, n, L, d)
    h_ys: torch.Tensor  # h (W_out_s - anchor)
    hh: torch.Tensor | None  # h h^T per memory (R, H, n, L, L)
    ut1: torch.Tensor | None  # (I + lower1)^-1
    u1: torch.Tensor  # (R, H, n, L, d)


def _output_layer(spec: ChunkSpec, h, e, eta1, dec: Decays, w: ChunkWeights, single: bool):
    """W_out of every memory: a gated delta rule with the keys h (DGD at the current weights, docs/design.md §6a),
    Y_t = (alpha_t I - eta1_t h_t^T h_t) Y_{t-1} + eta1_t h_t^T w_t, Y = W_out - anchor,
    w_t = vhat_t - k_t - h_t anchor. In chunk form (I + lower1) u1 = eta1 (h Y_s - e - gamma_{t-1} h Y_0), since
    vhat - k - h anchor = h Y_s - e."""
    hn = h.transpose(2, 3)  # (R,H,n,L,m): per memory, the keys of its delta rule
    e1 = eta1.transpose(2, 3)  # (R,H,n,L)
    h_y0 = hn @ w.current_out
    if w.anchor_out is not None:
        h_anchor = per_memory(hn, w.anchor_out)
        h_y0 = h_y0 - h_anchor
    h_ys = h_y0 if w.same else hn @ w.snapshot_out - (0 if w.anchor_out is None else h_anchor)
    e_t = e.transpose(2, 3)  # (R,H,n,L,d)
    hh = ut1 = None
    if single:
        u1 = e1.unsqueeze(-1) * (h_ys - e_t - h_y0)
    else:
        rhs1 = e1.unsqueeze(-1) * (h_ys - e_t - dec.e_prev[:, :, None, :, None] * h_y0)
        hh = hn @ hn.transpose(-1, -2)  # (R,H,n,L,L)
        lower1 = e1.unsqueeze(-1) * dec.decay.unsqueeze(2) * hh
        ut1 = unit_lower_inverse(lower1)
        u1 = ut1 @ rhs1
    end_out = plus_product(decayed_start(w.current_out, w.anchor_out, dec.e_end), hn.transpose(-1, -2),
                           u1 if single else dec.to_end[:, :, None, :, None] * u1)
    return end_out, OutputLayer(h_y0, h_ys, hh, ut1, u1)


class Read(NamedTuple):
    """What the output memory's read keeps."""

    q_x0: torch.Tensor  # q x0_o (R, H, L, m)
    pre_q: torch.Tensor  # the query's pre-activation at the per-token W_in
    qk_raw: torch.Tensor | None  # q k^T
    qk: torch.Tensor | None  # q k^T * decay
    s0: torch.Tensor  # silu(pre_q)
    s: torch.Tensor  # l2norm(s0)
    s_y0: torch.Tensor  # s y0_o (R, H, L, d)
    sh_raw: torch.Tensor | None  # s h_o^T
    sh: torch.Tensor | None


def _read(spec: ChunkSpec, q, k, h, r, u1, dec: Decays, w: ChunkWeights, single: bool):
    """The output memory at the per-token state, read before the write (Eq. 86): o_t = M_o,t-1(q_t), with the
    in-chunk updates r (W_in) and u1 (W_out) of the earlier tokens."""
    sl_o, retain = spec.output_columns, spec.retain_toward_init
    q_x0 = q @ w.current_in[..., sl_o]
    if retain:
        q_anchor = per_head(q, w.anchor_in[..., sl_o])
        q_x0 = q_x0 - q_anchor
    qk_raw = qk = sh_raw = sh = None
    if single:
        pre_q = q_x0
    else:
        qk_raw = q @ k.transpose(-1, -2)
        qk = qk_raw * dec.decay
        pre_q = dec.e_prev.unsqueeze(-1) * q_x0 + qk @ r[..., sl_o]
    if retain:
        pre_q = pre_q + q_anchor
    s0 = F.silu(pre_q)  # (R,H,L,m)
    s = l2norm(s0)
    s_y0 = s @ w.current_out[:, :, -1]
    if retain:
        s_anchor = per_head(s, w.anchor_out[:, -1])
        s_y0 = s_y0 - s_anchor
    if single:
        o = q + s_y0
    else:
        sh_raw = s @ h[..., -1, :].transpose(-1, -2)
        sh = sh_raw * dec.decay
        o = q + dec.e_prev.unsqueeze(-1) * s_y0 + sh @ u1[:, :, -1]
    if retain:
        o = o + s_anchor
    return o, Read(q_x0, pre_q, qk_raw, qk, s0, s, s_y0, sh_raw, sh)


class MlpSaved(NamedTuple):
    """Everything `mlp_chunk_backward` reads, by stage (the weights it needs are among the inputs)."""

    eta: torch.Tensor  # the learning rates with pad tokens zeroed
    features: Features
    gradient: SnapshotGradient
    steps: StepSizes
    decays: Decays
    first: FirstLayer
    output: OutputLayer
    read: Read


def mlp_chunk_forward(spec: ChunkSpec, q, k, v, eta, log_alpha, write, snapshot_in, snapshot_out, current_in,
                      current_out, anchor_in, anchor_out, keep: bool = False):
    """One chunk of the rule for MLP memories (docs/design.md §6a), exactly, for all memories and heads at once
    (Eq. 84-91). Inputs as `ChunkInputs`. Returns the reads o (R, H, L, d) and the fast weights after the chunk
    (end_in, end_out); with `keep`, also the stages' intermediates (`MlpSaved`, for `mlp_chunk_backward`).
    Differentiable with autograd (the reference for the backward); the model calls it through `ChunkStep`."""
    w = chunk_weights(ChunkInputs(q, k, v, eta, log_alpha, write, snapshot_in, snapshot_out, current_in,
                                  current_out, anchor_in, anchor_out))
    length = q.shape[2]  # the chunk size, or fewer for a piece that starts or ends inside a chunk
    eta = eta * write.unsqueeze(-1)  # pad tokens: no write ...
    log_alpha = log_alpha * write  # ... and no decay
    # One token with nothing kept (decoding): no pair i < t inside the piece, so the decay matrix, the triangular
    # solves and the in-piece read terms vanish exactly (gamma_0 = 1, gamma_L / gamma_1 = 1); skip them.
    single = length == 1 and not keep
    f = _features(spec, k, v, w.snapshot_in)
    g = _snapshot_gradient(spec, k, v, f, w.snapshot_out)
    steps = _step_sizes(spec, eta, f.h, g.dpre, w.snapshot_out)
    dec = decays(log_alpha, length, single)
    end_in, first = _first_layer(spec, k, eta, f.pre, g.delta, steps.eta2, dec, w, single)
    end_out, output = _output_layer(spec, f.h, g.e, steps.eta1, dec, w, single)
    o, read = _read(spec, q, k, f.h, first.r, output.u1, dec, w, single)
    if not keep:
        return o, end_in, end_out
    return o, end_in, end_out, MlpSaved(eta, f, g, steps, dec, first, output, read)


# ------------------------------------------------------------------------------------------------ backward stages
# Every use of a (t, i) matrix below is multiplied by `decay`, zero for i >= t: no causal mask is needed.
class ReadGrads(NamedTuple):
    """The read's gradients: of q and k, and of what it takes from the other stages (the output memory's shares
    `_o` of h, r, u1, of the current weights and of the anchors), which those stages add into their own. The
    current weights' shares are those of x0_o and y0_o (the weights less the anchors): the layers' stages add them
    to the current weights' and take them off the anchors'."""

    d_q: torch.Tensor
    d_k: torch.Tensor
    d_h_o: torch.Tensor  # (R, H, L, m)
    d_r_o: torch.Tensor  # (R, H, L, m)
    d_u1_o: torch.Tensor  # (R, H, L, d)
    d_current_in_o: torch.Tensor  # (R, H, d, m)
    d_current_out_o: torch.Tensor  # (R, H, m, d)
    d_anchor_in_o: torch.Tensor | None  # (H, d, m)
    d_anchor_out_o: torch.Tensor | None  # (H, m, d)


def _read_backward(spec: ChunkSpec, q, k, h, r, u1, dec: Decays, w: ChunkWeights, t: Read, d_o):
    """The backward of `_read`: returns its `ReadGrads` and the decays' gradients it starts."""
    sl_o, retain, e_prev = spec.output_columns, spec.retain_toward_init, dec.e_prev
    d_anchor_in_o = d_anchor_out_o = None
    # the output: o = q + e_prev * (s @ y0_o) + sh @ u1_o (+ s @ anchor_out_o)
    d_q = d_o.clone()
    d_o_prev = e_prev.unsqueeze(-1) * d_o
    d_s = d_o_prev @ tr(w.current_out[:, :, -1])
    d_current_out_o = tr(t.s) @ d_o_prev
    d_g_prev = (d_o * t.s_y0).sum(-1) * e_prev
    if retain:
        d_s = d_s + per_head(d_o - d_o_prev, tr(w.anchor_out[:, -1]))
        d_anchor_out_o = (tr(t.s) @ d_o).sum(0)
    d_u1_o = tr(t.sh) @ d_o
    d_sh_raw = (d_o @ tr(u1[:, :, -1])) * dec.decay
    d_log_decay = d_sh_raw * t.sh_raw
    d_s = d_s + d_sh_raw @ h[..., -1, :]
    d_h_o = tr(d_sh_raw) @ t.s
    sig_q = torch.sigmoid(t.pre_q)
    d_s = l2norm_backward(t.s, t.s0, d_s)  # s = l2norm(silu(pre_q))
    d_pre_q = d_s * torch.addcmul(sig_q, t.s0, 1 - sig_q)  # silu'
    # the query: pre_q = e_prev * (q @ x0_o) + qk @ r_o (+ q @ anchor_in_o)
    d_pre_q_prev = e_prev.unsqueeze(-1) * d_pre_q
    d_q = d_q + d_pre_q_prev @ tr(w.current_in[..., sl_o])
    d_current_in_o = tr(q) @ d_pre_q_prev
    d_g_prev = d_g_prev + (d_pre_q * t.q_x0).sum(-1) * e_prev
    d_r_o = tr(t.qk) @ d_pre_q
    d_qk = d_pre_q @ tr(r[..., sl_o])
    if retain:
        d_q = d_q + per_head(d_pre_q - d_pre_q_prev, tr(w.anchor_in[..., sl_o]))
        d_anchor_in_o = (tr(q) @ d_pre_q).sum(0)
    d_qk_raw = d_qk * dec.decay
    d_log_decay = d_log_decay + d_qk_raw * t.qk_raw
    d_q = d_q + d_qk_raw @ k
    d_k = tr(d_qk_raw) @ q
    grads = ReadGrads(d_q, d_k, d_h_o, d_r_o, d_u1_o, d_current_in_o, d_current_out_o, d_anchor_in_o, d_anchor_out_o)
    return grads, DecayGrads(d_log_decay, d_g_prev)


class OutputLayerGrads(NamedTuple):
    """The gradients of `_output_layer`'s inputs (with the read's shares of h, the current weights and the anchor)."""

    d_h: torch.Tensor  # (R, H, L, n, m)
    d_e: torch.Tensor  # (R, H, L, n, d)
    d_eta1: torch.Tensor  # (R, H, L, n)
    d_current_out: torch.Tensor
    d_snapshot_out: torch.Tensor | None  # None where the snapshot is the current weights
    d_anchor_out: torch.Tensor | None


def _output_layer_backward(spec: ChunkSpec, h, e, eta1, dec: Decays, w: ChunkWeights, t: OutputLayer,
                           read: ReadGrads, d_end_out, dg: DecayGrads):
    """The backward of `_output_layer`: end_out = e_end * y0 + hn^T (to_end * u1) (+ anchor_out)."""
    hn, e1, e_prev = h.transpose(2, 3), eta1.transpose(2, 3), dec.e_prev
    d_y0, dot_b = start_gradient(d_end_out, w.current_out, w.anchor_out, dec.e_end)
    d_y0[:, :, -1].add_(read.d_current_out_o)
    d_g_end = plus(dg.d_g_end, dot_b.unsqueeze(-1) * dec.e_end)
    te = dec.to_end[:, :, None, :, None]
    d_weighted_u1 = hn @ d_end_out  # (R,H,n,L,d)
    d_hn = (te * t.u1) @ tr(d_end_out)
    d_u1 = te * d_weighted_u1
    d_u1[:, :, -1].add_(read.d_u1_o)
    d_to_end = plus(dg.d_to_end, (d_weighted_u1 * t.u1).sum((2, 4)))
    d_rhs1 = tr(t.ut1) @ d_u1  # (I + lower1)^-T d_u1
    neg_d_lower1 = (d_rhs1 @ tr(t.u1)) * dec.decay.unsqueeze(2)  # strictly lower (the factor decay sees to it)
    d_e1 = -(neg_d_lower1 * t.hh).sum(-1)
    neg_d_hh = neg_d_lower1 * e1.unsqueeze(-1)
    d_log_decay = minus(dg.d_log_decay, (neg_d_hh * t.hh).sum(2))
    d_hn = d_hn - (neg_d_hh + tr(neg_d_hh)) @ hn
    # rhs1 = e1 * w, w = h_ys - e^T - e_prev * h_y0 (h_ys: h (snapshot less anchor); h_y0: h (current less anchor))
    d_w = e1.unsqueeze(-1) * d_rhs1
    d_e1 = d_e1 + (d_rhs1 * (t.h_ys - e.transpose(2, 3) - e_prev[:, :, None, :, None] * t.h_y0)).sum(-1)
    d_e = d_w.transpose(2, 3).neg()  # (R,H,L,n,d)
    d_g_prev = minus(dg.d_g_prev, (d_w * t.h_y0).sum((2, 4)) * e_prev)
    d_h_y0 = -e_prev[:, :, None, :, None] * d_w
    d_h_ys = d_w
    if w.same:
        d_h_y0 = d_h_y0 + d_h_ys
    d_hn = d_hn + d_h_y0 @ tr(w.current_out)
    d_y0 = plus_product(d_y0, tr(hn), d_h_y0)
    d_snapshot_out = d_anchor_out = None
    if not w.same:
        d_hn = d_hn + d_h_ys @ tr(w.snapshot_out)
        d_snapshot_out = tr(hn) @ d_h_ys
    if spec.retain_toward_init:
        # h_y0 = h (current_out - anchor_out), h_ys = h (snapshot_out - anchor_out): the anchor's share of h's
        # gradient, and of the anchor's own through y0 (d_y0 holds h_y0's) and through h_ys
        d_hn = d_hn - per_memory(d_h_y0 if w.same else d_h_y0 + d_h_ys, tr(w.anchor_out))
        d_anchor_out = d_end_out.sum(0) - d_y0.sum(0)
        if not w.same:
            d_anchor_out = d_anchor_out - d_snapshot_out.sum(0)
        d_anchor_out[:, -1].add_(read.d_anchor_out_o)
    d_h = d_hn.transpose(2, 3)  # (R,H,L,n,m)
    d_h[..., -1, :].add_(read.d_h_o)
    grads = OutputLayerGrads(d_h, d_e, d_e1.transpose(2, 3), d_y0, d_snapshot_out, d_anchor_out)
    return grads, DecayGrads(d_log_decay, d_g_prev, d_g_end, d_to_end)


class FirstLayerGrads(NamedTuple):
    """The gradients of `_first_layer`'s inputs (with the read's shares of r, the current weights and the anchor)."""

    d_k: torch.Tensor
    d_eta: torch.Tensor  # (R, H, L, n)
    d_delta: torch.Tensor  # (R, H, L, n, m)
    d_eta2: torch.Tensor  # (R, H, L, n)
    d_current_in: torch.Tensor
    d_anchor_in: torch.Tensor | None
    d_pre: torch.Tensor | None  # the keys' pre-activations' (k x0 reads them where the snapshot is current)


def _first_layer_backward(spec: ChunkSpec, k, eta, delta, eta2, dec: Decays, w: ChunkWeights, t: FirstLayer,
                          read: ReadGrads, d_end_in, dg: DecayGrads):
    """The backward of `_first_layer`: end_in = e_end * x0 + k^T (to_end * r) (+ anchor_in), r from the UT
    transform (`_first_layer_erase_backward`) or, without DGD, the force itself."""
    n, m, sl_o = spec.num_memories, spec.memory_dim, spec.output_columns
    d_x0, dot_a = start_gradient(d_end_in, w.current_in, w.anchor_in, dec.e_end)
    d_x0[..., sl_o].add_(read.d_current_in_o)
    d_g_end = plus(dg.d_g_end, dot_a.unsqueeze(-1) * dec.e_end)
    weighted_r = dec.to_end.unsqueeze(-1) * t.r
    d_k = read.d_k + weighted_r @ tr(d_end_in)
    d_weighted_r = k @ d_end_in
    d_r = dec.to_end.unsqueeze(-1) * d_weighted_r
    d_r[..., sl_o].add_(read.d_r_o)
    d_to_end = plus(dg.d_to_end, (d_weighted_r * t.r).sum(-1))
    d_anchor_in = None
    if spec.retain_toward_init:
        d_anchor_in = d_end_in.sum(0)
        d_anchor_in[..., sl_o].add_(read.d_anchor_in_o)
    grads = FirstLayerGrads(d_k, None, None, None, d_x0, d_anchor_in, None)
    dg = dg._replace(d_g_end=d_g_end, d_to_end=d_to_end)
    d_r = d_r.unflatten(-1, (n, m))  # per memory: (R,H,L,n,m)
    if spec.dgd:
        d_force, grads, dg = _first_layer_erase_backward(spec, k, eta, dec, w, t, d_r, grads, dg)
    else:
        d_force = d_r
        grads = grads._replace(d_eta=torch.zeros_like(eta))
    d_delta = -eta2.unsqueeze(-1) * d_force  # force = -eta2 * delta
    d_eta2 = -(d_force * delta).sum(-1)
    if spec.retain_toward_init:
        grads = grads._replace(d_anchor_in=grads.d_anchor_in - grads.d_current_in.sum(0))
    return grads._replace(d_delta=d_delta, d_eta2=d_eta2), dg


def _first_layer_erase_backward(spec: ChunkSpec, k, eta, dec: Decays, w: ChunkWeights, t: FirstLayer, d_r,
                                grads: FirstLayerGrads, dg: DecayGrads):
    """DGD's part of `_first_layer_backward`: r = (I + lower)^-1 (force - eta' e_prev k x0 (- eta' k anchor)),
    lower = eta' * decay * k k^T. Returns the force's gradient and the updated gradients."""
    n, m = spec.num_memories, spec.memory_dim
    d_k, d_x0, d_anchor_in = grads.d_k, grads.d_current_in, grads.d_anchor_in
    eta_p, k_x0, kk, e_prev = t.eta_p, t.k_x0, t.kk, dec.e_prev
    r_n = t.r.unflatten(-1, (n, m)).transpose(2, 3)  # (R,H,n,L,m)
    d_rhs = tr(t.ut) @ d_r.transpose(2, 3)  # (I + lower)^-T d_r, per memory
    # its gradient is -(d_rhs r^T), strictly lower (the factor decay sees to it)
    neg_d_lower = (d_rhs @ tr(r_n)) * dec.decay.unsqueeze(2)  # (R,H,n,L,L)
    d_eta_p = -(neg_d_lower * kk.unsqueeze(2)).sum(-1).transpose(2, 3)  # (R,H,L,n)
    neg_d_kk = (neg_d_lower * eta_p.transpose(2, 3).unsqueeze(-1)).sum(2)
    d_log_decay = minus(dg.d_log_decay, neg_d_kk * kk)
    d_k = d_k - (neg_d_kk + tr(neg_d_kk)) @ k
    d_force = d_rhs.transpose(2, 3)  # (R,H,L,n,m)
    coef = eta_p * e_prev.unsqueeze(-1)
    d_coef = -(d_force * k_x0).sum(-1)
    d_eta_p = d_eta_p + d_coef * e_prev.unsqueeze(-1)
    d_g_prev = plus(dg.d_g_prev, (d_coef * coef).sum(-1))
    d_k_x0 = -coef.unsqueeze(-1) * d_force
    if not w.same:  # (else k @ current_in is the keys' pre-activations, whose gradient `_features_backward` takes)
        d_k = d_k + d_k_x0.flatten(-2) @ tr(w.current_in)
        d_x0 = plus_product(d_x0, tr(k), d_k_x0.flatten(-2))
    if spec.retain_toward_init:
        d_k_anchor = -eta_p.unsqueeze(-1) * d_force
        d_k = d_k + per_head((d_k_anchor - d_k_x0).flatten(-2), tr(w.anchor_in))
        # the anchor's share of k @ x0: through d_x0 (later), or here where d_x0 has not got it
        d_anchor_in = d_anchor_in + (tr(k) @ (d_k_anchor - d_k_x0 if w.same else d_k_anchor).flatten(-2)).sum(0)
        d_eta_p = d_eta_p - (d_force * t.k_anchor).sum(-1)
    # eta_p = eta / (1 + eta |k|^2)
    den = (1 + eta * k.pow(2).sum(-1, keepdim=True)).pow(2)
    d_eta = d_eta_p / den
    d_k = d_k - (2 * d_eta_p * eta.pow(2) / den).sum(-1, keepdim=True) * k
    grads = grads._replace(d_k=d_k, d_eta=d_eta, d_current_in=d_x0, d_anchor_in=d_anchor_in,
                           d_pre=d_k_x0 if w.same else None)
    return d_force, grads, dg._replace(d_log_decay=d_log_decay, d_g_prev=d_g_prev)


class StepSizeGrads(NamedTuple):
    d_eta: torch.Tensor
    d_h: torch.Tensor
    d_dpre: torch.Tensor
    d_snapshot_out: torch.Tensor  # the column norms' share, added in place into the given accumulator


def _step_sizes_backward(spec: ChunkSpec, eta, h, dpre, snapshot_out, t: StepSizes, d_eta1, d_eta2, d_eta, d_h,
                         d_snapshot_out) -> StepSizeGrads:
    """The backward of `_step_sizes`, added to the gradients d_eta, d_h and (in place) d_snapshot_out."""
    C = spec.chunk_size
    den1 = (1 + eta * t.h_sq).pow(2)
    d_eta = d_eta + d_eta1 / den1
    d_h = d_h + (-2 * d_eta1 * eta.pow(2) / den1).unsqueeze(-1) * h
    den2 = (1 + C * eta * t.curv).pow(2)
    d_eta = d_eta + d_eta2 / den2
    d_curv = -C * d_eta2 * eta.pow(2) / den2
    d_dpre = (2 * d_curv).unsqueeze(-1) * dpre * t.col_norms.unsqueeze(2)
    d_col = (d_curv.unsqueeze(-1) * t.dpre_sq).sum(2)
    return StepSizeGrads(d_eta, d_h, d_dpre, d_snapshot_out.addcmul_(snapshot_out, (2 * d_col).unsqueeze(-1)))


class SnapshotGradientGrads(NamedTuple):
    d_h_all: torch.Tensor  # every row's (v's rows first)
    d_nrm: torch.Tensor  # the keys' rows of nrm_all
    d_dpre0: torch.Tensor
    d_k: torch.Tensor
    d_v: torch.Tensor
    d_snapshot_out: torch.Tensor  # added in place into the given accumulator


def _snapshot_gradient_backward(spec: ChunkSpec, k, v, snapshot_out, f: Features, t: SnapshotGradient, d_e,
                                d_delta, d_dpre, d_h, d_k, d_snapshot_out) -> SnapshotGradientGrads:
    """The backward of `_snapshot_gradient`: delta = (b_e - h <h, b_e>) * dpre, dpre = dpre0 * nrm, b_e = e W_out_s^T,
    e = (k - v) + h_e W_out_s; d_e, d_h, d_k and d_snapshot_out hold the other stages' gradients."""
    h, length = f.h, k.shape[2]
    h_b_e = (h * t.b_e).sum(-1, keepdim=True)
    d_proj = d_delta * t.dpre
    d_dpre = d_dpre + d_delta * (t.b_e - h * h_b_e)
    h_d_proj = (h * d_proj).sum(-1, keepdim=True)
    d_b_e = d_proj - h * h_d_proj
    d_h = d_h - d_proj * h_b_e - t.b_e * h_d_proj
    d_nrm = (d_dpre * f.dpre0).sum(-1, keepdim=True)
    d_dpre0 = d_dpre * f.nrm
    d_e = d_e + torch.einsum("rhcnm,rhnmd->rhcnd", d_b_e, snapshot_out)
    # d_snapshot_out += d_b_e^T e + h_e^T d_e, the two products as one over 2L tokens
    d_snapshot_out = plus_product(d_snapshot_out, tokens_last(torch.cat([d_b_e, t.h_e], dim=2)),
                                  torch.cat([t.e, d_e], dim=2).transpose(2, 3))
    d_h_e = torch.einsum("rhcnd,rhnmd->rhcnm", d_e, snapshot_out)
    d_e_sum = d_e.sum(-2)
    detached = spec.self_modifying and spec.detach_self_targets  # the targets M(v) are constants
    if not spec.self_modifying:
        d_h_all = d_h_e
    elif detached:
        d_h_all = torch.cat([torch.zeros_like(d_h_e), d_h_e], dim=2)
    else:  # the v rows: minus the share of the memories with self-generated targets (all but the output memory)
        d_h_all = torch.cat([torch.cat([-d_h_e[..., :-1, :], torch.zeros_like(d_h_e[..., -1:, :])], -2), d_h_e], 2)
    d_h_all[:, :, d_h_all.shape[2] - length :].add_(d_h)
    d_v = torch.zeros_like(v) if detached else -d_e_sum
    return SnapshotGradientGrads(d_h_all, d_nrm, d_dpre0, d_k + d_e_sum, d_v, d_snapshot_out)


def _features_backward(spec: ChunkSpec, length: int, snapshot_in, f: Features, d_h_all, d_nrm, d_dpre0, d_pre,
                       d_k, d_v, d_snapshot_in):
    """The backward of `_features` (h = silu(pre) * nrm, nrm = (|silu(pre)|^2 + eps)^-1/2, dpre0 = silu'(pre),
    pre = z W_in_s) for the gradients of h_all, of the keys' nrm, dpre0 and pre (d_pre None: none), added to d_k,
    d_v and d_snapshot_in (in place; None: a new tensor). Returns (d_k, d_v, d_snapshot_in)."""
    keys = slice(d_h_all.shape[2] - length, None)  # the keys' rows (after v's where there are two sets)
    dot = (d_h_all * f.raw_all).sum(-1, keepdim=True)
    dot[:, :, keys].add_(d_nrm)
    d_raw_all = d_h_all * f.nrm_all - f.raw_all * f.nrm_all.pow(3) * dot
    d_pre_all = d_raw_all * torch.addcmul(f.sig_all, f.raw_all, 1 - f.sig_all)  # silu'
    silu_grad2 = f.sig * (1 - f.sig) * (2 + f.pre - 2 * f.raw)  # silu''(pre) = sig (1 - sig) (2 + pre (1 - 2 sig))
    d_pre_all[:, :, keys].addcmul_(d_dpre0, silu_grad2)
    if d_pre is not None:
        d_pre_all[:, :, keys].add_(d_pre)
    d_pre_all = d_pre_all.flatten(-2)
    d_z = d_pre_all @ tr(snapshot_in)
    if d_snapshot_in is None:
        d_snapshot_in = tr(f.z) @ d_pre_all
    else:
        d_snapshot_in = plus_product(d_snapshot_in, tr(f.z), d_pre_all)
    d_k = d_k + d_z[:, :, d_z.shape[2] - length :]
    if spec.self_modifying and not spec.detach_self_targets:  # v reaches e through the targets M(v) too
        d_v = d_z[:, :, :length] + d_v
    return d_k, d_v, d_snapshot_in


def mlp_chunk_backward(spec: ChunkSpec, inputs, t: MlpSaved, d_o, d_end_in, d_end_out):
    """The vector-Jacobian product of `mlp_chunk_forward`, written out (same numbers as autograd through it, tested).

    `inputs` are the forward's tensors (`ChunkInputs` order), `t` its intermediates (`keep=True`), `d_*` the
    gradients of its outputs. Returns the gradients of (q, k, v, eta, log_alpha, snapshot_in, snapshot_out,
    current_in, current_out, anchor_in, anchor_out); the anchors' (H-shaped, shared by the batch rows) are summed
    over the rows. A snapshot given as None (the current weights) gets None: its gradient is in the current
    weights'."""
    x = ChunkInputs(*inputs)
    w = chunk_weights(x)
    f, g, dec = t.features, t.gradient, t.decays
    read, dg = _read_backward(spec, x.q, x.k, f.h, t.first.r, t.output.u1, dec, w, t.read, d_o)
    out, dg = _output_layer_backward(spec, f.h, g.e, t.steps.eta1, dec, w, t.output, read, d_end_out, dg)
    first, dg = _first_layer_backward(spec, x.k, t.eta, g.delta, t.steps.eta2, dec, w, t.first, read, d_end_in, dg)
    d_log_alpha = decays_backward(dec, dg)
    # the snapshot's gradients accumulate into the current weights' where it is them (after the anchors took theirs)
    steps = _step_sizes_backward(spec, t.eta, f.h, g.dpre, w.snapshot_out, t.steps, out.d_eta1, first.d_eta2,
                                 first.d_eta, out.d_h, out.d_current_out if w.same else out.d_snapshot_out)
    snap = _snapshot_gradient_backward(spec, x.k, x.v, w.snapshot_out, f, g, out.d_e, first.d_delta, steps.d_dpre,
                                       steps.d_h, first.d_k, steps.d_snapshot_out)
    d_k, d_v, d_snapshot_in = _features_backward(spec, x.q.shape[2], w.snapshot_in, f, snap.d_h_all, snap.d_nrm,
                                                 snap.d_dpre0, first.d_pre, snap.d_k, snap.d_v,
                                                 first.d_current_in if w.same else None)
    return (read.d_q, d_k, d_v, steps.d_eta * x.write.unsqueeze(-1), d_log_alpha * x.write,
            None if w.same else d_snapshot_in, None if w.same else snap.d_snapshot_out, first.d_current_in,
            out.d_current_out, first.d_anchor_in, out.d_anchor_out)

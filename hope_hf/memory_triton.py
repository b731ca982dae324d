"""Fused Triton kernels of the memory scan for linear memories (`memory_depth=1`, the default), forward and backward.

One launch per chunk and layer computes the whole chunk step for every head and memory: the generation of keys,
values, learning rates and retention gates from the snapshot memories (Eq. 87, 90; for a self-modifying chunk), the
decays, every memory's gated delta rule in chunk form with its UT transform solved by forward substitution
(Eq. 88-91) and the output memory's per-token reads before the write (Eq. 86). One program per row and head keeps
the chunk's tokens and one memory's weights at a time on chip. Fast weights float32; activations float32 or bf16.
The math is `memory_chunk_linear.linear_chunk_forward` after `memory_generate.generate`, which the tests compare it
with. The backward (`FusedChunkStep`) is one more launch per chunk: it recomputes the chunk's intermediates and
writes every gradient, stage by stage as `linear_chunk_backward` and `generate_backward` do.

Not model code: `memory_chunk.fused_chunk_step` loads this module by name from the installed `hope_hf` (importlib),
so that the model files never import triton and Hub remote code runs where it is missing. Importing it imports
triton; kernels on CPU tensors run only under Triton's interpreter (`TRITON_INTERPRET=1` set before triton is
imported).
"""

from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl


__all__ = ["LAUNCHES", "FusedChunkStep", "chunk_step", "chunk_step_backward"]

# Launches per kernel name since the process started (or the counter was cleared): what the tests and
# docs/performance.md count per chunk and layer.
LAUNCHES: collections.Counter = collections.Counter()


# ------------------------------------------------------------------------------------------------ device helpers
@triton.jit
def _mm(a, b):
    """A float32 product (IEEE, not TF32: the fast weights accumulate over the whole sequence)."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _tile(ptr, s0, s1, rows, cols, mask):
    return tl.load(ptr + rows[:, None] * s0 + cols[None, :] * s1, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _l2norm(x):
    """x / sqrt(|x|^2 + 1e-6) per row (`memory_common.l2norm`)."""
    return x * tl.rsqrt(tl.sum(x * x, 1) + 1e-6)[:, None]


@triton.jit
def _log_sigmoid(x):
    z = tl.exp(-tl.abs(x))
    return tl.minimum(x, 0.0) - tl.where(z < 1e-4, z - 0.5 * z * z, tl.log(1.0 + z))


@triton.jit
def _decays(log_alpha, rows):
    """The chunk's retention products from per-token log-retentions (memory_common.decays): cumulative gamma g, its
    value before each token, the pairwise decay (token t from token s < t) and the factors to the chunk's start and
    end."""
    g = tl.cumsum(log_alpha, 0)
    g_prev = g - log_alpha
    g_end = tl.sum(log_alpha, 0)
    decay = tl.where(rows[:, None] > rows[None, :], tl.exp(g_prev[:, None] - g[None, :]), 0.0)
    return g, g_prev, decay, tl.exp(g_prev), tl.exp(g_end), tl.exp(g_end - g)


@triton.jit
def _solve(lower, rhs, rows, L):
    """(I + lower)^-1 rhs for a strictly lower-triangular `lower` (the UT transform, Eq. 91): forward substitution,
    one token at a time."""
    u = tl.zeros_like(rhs)
    for t in range(L):
        at = (rows == t)[:, None]
        lower_t = tl.sum(tl.where(at, lower, 0.0), 0)
        u_t = tl.sum(tl.where(at, rhs, 0.0), 0) - tl.sum(lower_t[:, None] * u, 0)
        u = tl.where(at, u_t[None, :], u)
    return u


@triton.jit
def _gate(uk, s_mem, readout, bias, IS_MEMORY: tl.constexpr):
    """A gate's pre-activation <M_s(u), w> + b = <u, w> + b (+ <u, W_out w> where the gate is a memory)."""
    value = tl.sum(uk * readout[None, :], 1) + bias
    if IS_MEMORY:
        value += tl.sum(uk * tl.sum(s_mem * readout[None, :], 1)[None, :], 1)
    return value


@triton.jit
def _memory_write(k, z, e_base, eta, ksq, dkk, e_prev, s_w, c_w, a_w, rows, L,
                  SAME: tl.constexpr, ANCHOR: tl.constexpr):
    """One memory's chunk (`_errors`, `_step_sizes`, `_update` of memory_chunk_linear) up to u1: returns (e, the
    step size's denominator 1 + eta |k|^2, eta1, k y0, rhs / eta1, the lower matrix, u1, the start that decays:
    W_out less its anchor). The forward and the backward kernel both run it."""
    e = e_base + _mm(z, s_w)
    den = 1.0 + eta * ksq
    eta1 = eta / den
    k_y0 = _mm(k, c_w)
    k_ys = k_y0
    if not SAME:
        k_ys = _mm(k, s_w)
    start = c_w
    if ANCHOR:
        k_anchor = _mm(k, a_w)
        k_y0 -= k_anchor
        k_ys -= k_anchor
        start = c_w - a_w
    if SAME:
        k_ys = k_y0
    wv = k_ys - e - e_prev[:, None] * k_y0
    lower = eta1[:, None] * dkk
    u1 = _solve(lower, eta1[:, None] * wv, rows, L)
    return e, den, eta1, k_y0, wv, lower, u1, start


# ------------------------------------------------------------------------------------------------ the kernel
@triton.jit
def _linear_chunk_kernel(
    q_ptr, sq_r, sq_h, sq_t, sq_d,  # q (R, H, L, d)
    a_ptr, sa_r, sa_h, sa_t, sa_d,  # GENERATE: u = [u_k, u_v] (R, H, L, 2d); else k
    b_ptr, sb_r, sb_h, sb_t, sb_d,  # else v
    eta_ptr, se_r, se_h, se_t, se_n,  # else eta (R, H, L, n)
    la_ptr, sl_r, sl_h, sl_t,  # else log_alpha (R, H, L)
    w_ptr, sw_r, sw_t,  # write (R, 1, L)
    snap_ptr, ss_r, ss_h, ss_n, ss_i,  # snapshot_out (R, H, n, d, d), last dimension contiguous (SAME: current_out)
    cur_ptr, sc_r, sc_h, sc_n, sc_i,  # current_out
    anc_ptr, sn_h, sn_n, sn_i,  # anchor_out (H, n, d, d)
    er_ptr, eb_ptr, ar_ptr, ab_ptr,  # eta_readout (H, n, d), eta_bias (H, n), alpha_readout (H, d), alpha_bias (H,)
    o_ptr, end_ptr,  # outputs, contiguous: o (R, H, L, d), end_out (R, H, n, d, d)
    H, L, D, eta_max,
    N: tl.constexpr, GENERATE: tl.constexpr, SELF_TARGETS: tl.constexpr, K_MEM: tl.constexpr, V_MEM: tl.constexpr,
    ETA_MEM: tl.constexpr, ALPHA_MEM: tl.constexpr, RETENTION: tl.constexpr, SAME: tl.constexpr, ANCHOR: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    r, h = (pid // H).to(tl.int64), (pid % H).to(tl.int64)
    rows, dims = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_D)
    tok, dim = rows < L, dims < D
    act_mask, w_mask = tok[:, None] & dim[None, :], dim[:, None] & dim[None, :]
    q = _tile(q_ptr + r * sq_r + h * sq_h, sq_t, sq_d, rows, dims, act_mask)
    write = tl.load(w_ptr + r * sw_r + rows * sw_t, mask=tok, other=0.0).to(tl.float32)
    snap = snap_ptr + r * ss_r + h * ss_h
    if GENERATE:  # Eq. 87, 90: keys, values and the retention gate from the snapshot memories
        uk = _tile(a_ptr + r * sa_r + h * sa_h, sa_t, sa_d, rows, dims, act_mask)
        uv = _tile(a_ptr + r * sa_r + h * sa_h + D * sa_d, sa_t, sa_d, rows, dims, act_mask)
        k, v = uk, uv
        if K_MEM >= 0:
            k += _mm(uk, _tile(snap + K_MEM * ss_n, ss_i, 1, dims, dims, w_mask))
        if V_MEM >= 0:
            v += _mm(uv, _tile(snap + V_MEM * ss_n, ss_i, 1, dims, dims, w_mask))
        k, v = _l2norm(k), _l2norm(v)
        s_eta = _tile(snap + ETA_MEM * ss_n, ss_i, 1, dims, dims, w_mask)
        log_alpha = tl.zeros([BLOCK_L], dtype=tl.float32)
        if RETENTION:
            s_alpha = _tile(snap + ALPHA_MEM * ss_n, ss_i, 1, dims, dims, w_mask)
            pre = _gate(uk, s_alpha, tl.load(ar_ptr + h * D + dims, mask=dim, other=0.0), tl.load(ab_ptr + h),
                        ALPHA_MEM >= 0)
            log_alpha = _log_sigmoid(pre)
    else:
        k = _tile(a_ptr + r * sa_r + h * sa_h, sa_t, sa_d, rows, dims, act_mask)
        v = _tile(b_ptr + r * sb_r + h * sb_h, sb_t, sb_d, rows, dims, act_mask)
        log_alpha = tl.load(la_ptr + r * sl_r + h * sl_h + rows * sl_t, mask=tok, other=0.0).to(tl.float32)
    # decays (memory_common.decays): gamma as cumulative log-retentions, pad tokens retain everything
    log_alpha = log_alpha * write
    g, g_prev, decay, e_prev, e_end, to_end = _decays(log_alpha, rows)
    dkk = decay * _mm(k, tl.trans(k))
    ksq = tl.sum(k * k, 1)
    for j in tl.static_range(N):  # every memory's gated delta rule (Eq. 88, 91)
        if GENERATE:
            eta = eta_max * tl.sigmoid(_gate(uk, s_eta, tl.load(er_ptr + (h * N + j) * D + dims, mask=dim, other=0.0),
                                             tl.load(eb_ptr + h * N + j), True))
        else:
            eta = tl.load(eta_ptr + r * se_r + h * se_h + rows * se_t + j * se_n, mask=tok, other=0.0).to(tl.float32)
        c_w = _tile(cur_ptr + r * sc_r + h * sc_h + j * sc_n, sc_i, 1, dims, dims, w_mask)
        s_w = c_w
        if not SAME:
            s_w = _tile(snap + j * ss_n, ss_i, 1, dims, dims, w_mask)
        a_w = c_w
        if ANCHOR:
            a_w = _tile(anc_ptr + h * sn_h + j * sn_n, sn_i, 1, dims, dims, w_mask)
        z = k  # what W_out multiplies in the error: k - v where the target is self-generated, k for the output memory
        if SELF_TARGETS and j < N - 1:
            z = k - v
        _, _, _, _, _, _, u1, start = _memory_write(k, z, k - v, eta * write, ksq, dkk, e_prev, s_w, c_w, a_w, rows, L,
                                                    SAME, ANCHOR)
        end = e_end * start + _mm(tl.trans(k), to_end[:, None] * u1)
        if ANCHOR:
            end += a_w
        out = end_ptr + ((r * H + h) * N + j) * D * D
        tl.store(out + dims[:, None] * D + dims[None, :], end, mask=w_mask)
        if j == N - 1:  # the output memory's reads at the per-token state, before the write (Eq. 86)
            q_y0 = _mm(q, c_w)
            o = q + _mm(_mm(q, tl.trans(k)) * decay, u1)
            if ANCHOR:
                q_anchor = _mm(q, a_w)
                o += e_prev[:, None] * (q_y0 - q_anchor) + q_anchor
            else:
                o += e_prev[:, None] * q_y0
            tl.store(o_ptr + ((r * H + h) * L + rows[:, None]) * D + dims[None, :], o, mask=act_mask)


# ------------------------------------------------------------------------------------------------ the launcher
def _block(size: int) -> int:
    """A block covering `size`, at least 16 (the smallest `tl.dot` operand)."""
    return max(16, triton.next_power_of_2(size))


def _strides(t: torch.Tensor | None, count: int):
    """The first `count` strides of t (zeros for a missing tensor)."""
    return (0,) * count if t is None else t.stride()[:count]


def _inner_contiguous(t: torch.Tensor | None):
    """Weights with their last dimension contiguous (a view where they are, as the scan's always are)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def chunk_step(spec, gen_spec, *inputs, block_l: int | None = None, block_d: int | None = None):
    """The chunk step of linear memories in one kernel launch: `ChunkStep.apply`'s inputs and results (o, end_in,
    end_out), without a backward. With `gen_spec` (a self-modifying chunk) the inputs are `q, u, write, snapshot
    and current weights, anchors, generation parameters` and the generation runs inside the kernel; without, `q, k,
    v, eta, log_alpha, write, weights, anchors`. `block_l`, `block_d`: the kernel's token and head-dimension blocks
    (default: the next power of two, at least 16)."""
    if gen_spec is not None:
        q, a, write, _, snapshot_out, current_in, current_out, _, anchor_out, *params = inputs
        b = eta = log_alpha = None
        memories = gen_spec.memories
    else:
        q, a, b, eta, log_alpha, write, _, snapshot_out, current_in, current_out, _, anchor_out = inputs
        params, memories = (None,) * 4, ("o",)
    rows, heads, length, dim = q.shape
    n = current_out.shape[2]
    snapshot_out, current_out, anchor_out = map(_inner_contiguous, (snapshot_out, current_out, anchor_out))
    eta_readout, eta_bias, alpha_readout, alpha_bias = (None if p is None else p.contiguous() for p in params)
    same = snapshot_out is None
    snap = current_out if same else snapshot_out
    o = q.new_empty((rows, heads, length, dim), dtype=torch.float32)
    end_out = torch.empty((rows, heads, n, dim, dim), dtype=torch.float32, device=q.device)

    def index(name):
        return memories.index(name) if gen_spec is not None and name in memories else -1

    retention = gen_spec is not None and gen_spec.retention
    _linear_chunk_kernel[(rows * heads,)](
        q, *_strides(q, 4), a, *_strides(a, 4), q if b is None else b, *_strides(b, 4),
        q if eta is None else eta, *_strides(eta, 4), q if log_alpha is None else log_alpha, *_strides(log_alpha, 3),
        write, write.stride(0), write.stride(2),
        snap, *_strides(snap, 4), current_out, *_strides(current_out, 4),
        current_out if anchor_out is None else anchor_out, *_strides(anchor_out, 3),
        *(q if p is None else p for p in (eta_readout, eta_bias, alpha_readout, alpha_bias)),
        o, end_out, heads, length, dim, float(gen_spec.eta_max) if gen_spec is not None else 0.0,
        N=n, GENERATE=gen_spec is not None, SELF_TARGETS=spec.self_modifying, K_MEM=index("k"), V_MEM=index("v"),
        ETA_MEM=max(index("eta"), 0),
        ALPHA_MEM=index("alpha"), RETENTION=retention, SAME=same, ANCHOR=anchor_out is not None,
        BLOCK_L=block_l or _block(length), BLOCK_D=block_d or _block(dim), num_warps=4 if dim <= 64 else 8,
    )
    LAUNCHES["linear_chunk"] += 1
    return o, current_in, end_out


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def _solve_transposed(lower, rhs, rows, L):
    """(I + lower)^-T rhs: backward substitution, last token first (the UT transform's transpose)."""
    x = tl.zeros_like(rhs)
    for s in range(L):
        t = L - 1 - s
        col_t = tl.sum(tl.where((rows == t)[None, :], lower, 0.0), 1)
        x_t = tl.sum(tl.where((rows == t)[:, None], rhs, 0.0), 0) - tl.sum(col_t[:, None] * x, 0)
        x = tl.where((rows == t)[:, None], x_t[None, :], x)
    return x


@triton.jit
def _l2norm_backward(y, x, d_y):
    """The gradient of x for y = l2norm(x) (`memory_common.l2norm_backward`)."""
    return tl.rsqrt(tl.sum(x * x, 1) + 1e-6)[:, None] * (d_y - y * tl.sum(y * d_y, 1)[:, None])


@triton.jit
def _gate_backward(uk, s_mem, readout, d_pre, IS_MEMORY: tl.constexpr):
    """The backward of `_gate` for d_pre: (d_uk, d_readout, d_bias, the memory's W_out gradient)."""
    direction = readout
    if IS_MEMORY:
        direction += tl.sum(s_mem * readout[None, :], 1)
    a = tl.sum(d_pre[:, None] * uk, 0)
    d_readout = a
    if IS_MEMORY:
        d_readout += tl.sum(s_mem * a[:, None], 0)
    return d_pre[:, None] * direction[None, :], d_readout, tl.sum(d_pre, 0), a[:, None] * readout[None, :]


@triton.jit
def _add_tile(ptr, dims, w_mask, D, value):
    """Adds `value` to the (D, D) tile at ptr, which this program stored before (a barrier orders the two)."""
    tl.debug_barrier()
    offs = ptr + dims[:, None] * D + dims[None, :]
    tl.store(offs, tl.load(offs, mask=w_mask, other=0.0) + value, mask=w_mask)


@triton.jit
def _read_backward(q, k, u1, c_w, a_w, d_o, decay, e_prev, ANCHOR: tl.constexpr):
    """The backward of the output memory's read (`_read_backward` of memory_chunk_linear): (d_q, d_k, d_u1, the
    current weights' share, d_log_decay, d_g_prev, the anchor's share)."""
    d_o_prev = e_prev[:, None] * d_o
    d_q = d_o + _mm(d_o_prev, tl.trans(c_w))
    d_y0 = _mm(tl.trans(q), d_o_prev)
    q_y0 = _mm(q, c_w)
    d_anchor = d_y0
    if ANCHOR:
        q_y0 -= _mm(q, a_w)
        d_q += _mm(d_o - d_o_prev, tl.trans(a_w))
        d_anchor = _mm(tl.trans(q), d_o)
    qk = _mm(q, tl.trans(k))
    d_u1 = _mm(tl.trans(qk * decay), d_o)
    d_qk = _mm(d_o, tl.trans(u1)) * decay
    d_q += _mm(d_qk, k)
    return d_q, _mm(tl.trans(d_qk), q), d_u1, d_y0, d_qk * qk, tl.sum(d_o * q_y0, 1) * e_prev, d_anchor


@triton.jit
def _update_backward(k, e, eta1, wv, k_y0, lower, u1, kk, decay, e_prev, to_end, d_u1, rows, L):
    """The backward of one memory's UT transform (`_update_backward`'s middle): (d_rhs's products: d_eta1, the
    lower matrix's gradient times -1 before eta1, d_w = eta1 d_rhs, the share of g_prev)."""
    d_rhs = _solve_transposed(lower, d_u1, rows, L)
    neg_d_lower = _mm(d_rhs, tl.trans(u1)) * decay
    d_eta1 = tl.sum(d_rhs * wv, 1) - tl.sum(neg_d_lower * kk, 1)
    d_w = eta1[:, None] * d_rhs
    return d_eta1, neg_d_lower * eta1[:, None], d_w, -tl.sum(d_w * k_y0, 1) * e_prev


@triton.jit
def _decays_backward(d_log_decay, d_g_prev, d_g_end, d_to_end, to_end, rows, L):
    """`memory_common.decays_backward`: the gradient of log_alpha."""
    d_g_prev += tl.sum(d_log_decay, 1)
    d_to_end = d_to_end * to_end
    d_g = -tl.sum(d_log_decay, 0) - d_to_end + d_g_prev
    d_g += tl.where(rows == L - 1, d_g_end + tl.sum(d_to_end, 0), 0.0)
    return tl.cumsum(d_g, 0, reverse=True) - d_g_prev


@triton.jit
def _linear_chunk_backward_kernel(
    q_ptr, sq_r, sq_h, sq_t, sq_d, a_ptr, sa_r, sa_h, sa_t, sa_d, b_ptr, sb_r, sb_h, sb_t, sb_d,
    eta_ptr, se_r, se_h, se_t, se_n, la_ptr, sl_r, sl_h, sl_t, w_ptr, sw_r, sw_t,
    snap_ptr, ss_r, ss_h, ss_n, ss_i, cur_ptr, sc_r, sc_h, sc_n, sc_i, anc_ptr, sn_h, sn_n, sn_i,
    er_ptr, eb_ptr, ar_ptr, ab_ptr,  # as `_linear_chunk_kernel`'s
    do_ptr, sdo_r, sdo_h, sdo_t, sdo_d, dend_ptr, sde_r, sde_h, sde_n, sde_i,  # d_o, d_end_out
    # gradients, contiguous: q, u (or k), v, eta, log_alpha, snapshot_out, current_out, and per row: anchor_out,
    # eta_readout, eta_bias, alpha_readout, alpha_bias
    dq_ptr, da_ptr, db_ptr, deta_ptr, dla_ptr, dsnap_ptr, dcur_ptr, danc_ptr, der_ptr, deb_ptr, dar_ptr, dab_ptr,
    H, L, D, eta_max,
    N: tl.constexpr, GENERATE: tl.constexpr, SELF_TARGETS: tl.constexpr, DETACH: tl.constexpr, K_MEM: tl.constexpr,
    V_MEM: tl.constexpr, ETA_MEM: tl.constexpr, ALPHA_MEM: tl.constexpr, RETENTION: tl.constexpr,
    SAME: tl.constexpr, ANCHOR: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    r, h = (pid // H).to(tl.int64), (pid % H).to(tl.int64)
    rows, dims = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_D)
    tok, dim = rows < L, dims < D
    act_mask, w_mask = tok[:, None] & dim[None, :], dim[:, None] & dim[None, :]
    act_out = ((r * H + h) * L + rows[:, None]) * D + dims[None, :]  # offsets of a contiguous (R, H, L, d) tensor
    q = _tile(q_ptr + r * sq_r + h * sq_h, sq_t, sq_d, rows, dims, act_mask)
    d_o = _tile(do_ptr + r * sdo_r + h * sdo_h, sdo_t, sdo_d, rows, dims, act_mask)
    write = tl.load(w_ptr + r * sw_r + rows * sw_t, mask=tok, other=0.0).to(tl.float32)
    snap = snap_ptr + r * ss_r + h * ss_h
    grad_w = (dcur_ptr if SAME else dsnap_ptr) + (r * H + h) * N * D * D  # where the snapshot's gradients go
    if GENERATE:  # the forward's generation again
        uk = _tile(a_ptr + r * sa_r + h * sa_h, sa_t, sa_d, rows, dims, act_mask)
        uv = _tile(a_ptr + r * sa_r + h * sa_h + D * sa_d, sa_t, sa_d, rows, dims, act_mask)
        k_raw, v_raw = uk, uv
        if K_MEM >= 0:
            s_k = _tile(snap + K_MEM * ss_n, ss_i, 1, dims, dims, w_mask)
            k_raw += _mm(uk, s_k)
        if V_MEM >= 0:
            s_v = _tile(snap + V_MEM * ss_n, ss_i, 1, dims, dims, w_mask)
            v_raw += _mm(uv, s_v)
        k, v = _l2norm(k_raw), _l2norm(v_raw)
        s_eta = _tile(snap + ETA_MEM * ss_n, ss_i, 1, dims, dims, w_mask)
        d_uk = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        d_s_eta = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        log_alpha = tl.zeros([BLOCK_L], dtype=tl.float32)
        if RETENTION:
            s_alpha = _tile(snap + ALPHA_MEM * ss_n, ss_i, 1, dims, dims, w_mask)
            w_alpha = tl.load(ar_ptr + h * D + dims, mask=dim, other=0.0)
            alpha_pre = _gate(uk, s_alpha, w_alpha, tl.load(ab_ptr + h), ALPHA_MEM >= 0)
            log_alpha = _log_sigmoid(alpha_pre)
    else:
        k = _tile(a_ptr + r * sa_r + h * sa_h, sa_t, sa_d, rows, dims, act_mask)
        v = _tile(b_ptr + r * sb_r + h * sb_h, sb_t, sb_d, rows, dims, act_mask)
        log_alpha = tl.load(la_ptr + r * sl_r + h * sl_h + rows * sl_t, mask=tok, other=0.0).to(tl.float32)
    log_alpha = log_alpha * write
    g, g_prev, decay, e_prev, e_end, to_end = _decays(log_alpha, rows)
    kk = _mm(k, tl.trans(k))
    dkk = decay * kk
    ksq = tl.sum(k * k, 1)
    d_k = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    d_v = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    d_log_decay = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float32)
    neg_d_kk = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float32)
    d_g_prev = tl.zeros([BLOCK_L], dtype=tl.float32)
    d_to_end = tl.zeros([BLOCK_L], dtype=tl.float32)
    d_g_end = tl.sum(d_g_prev, 0)
    for j in tl.static_range(N):
        if GENERATE:
            w_eta = tl.load(er_ptr + (h * N + j) * D + dims, mask=dim, other=0.0)
            gate = tl.sigmoid(_gate(uk, s_eta, w_eta, tl.load(eb_ptr + h * N + j), True))
            eta = eta_max * gate * write
        else:
            eta = tl.load(eta_ptr + r * se_r + h * se_h + rows * se_t + j * se_n, mask=tok, other=0.0).to(tl.float32)
            eta = eta * write
        c_w = _tile(cur_ptr + r * sc_r + h * sc_h + j * sc_n, sc_i, 1, dims, dims, w_mask)
        s_w = c_w
        if not SAME:
            s_w = _tile(snap + j * ss_n, ss_i, 1, dims, dims, w_mask)
        a_w = c_w
        if ANCHOR:
            a_w = _tile(anc_ptr + h * sn_h + j * sn_n, sn_i, 1, dims, dims, w_mask)
        d_end = _tile(dend_ptr + r * sde_r + h * sde_h + j * sde_n, sde_i, 1, dims, dims, w_mask)
        z = k
        if SELF_TARGETS and j < N - 1:
            z = k - v
        e, den, eta1, k_y0, wv, lower, u1, start = _memory_write(k, z, k - v, eta, ksq, dkk, e_prev, s_w, c_w, a_w,
                                                                  rows, L, SAME, ANCHOR)  # the forward again
        # end_out = e_end * start (+ anchor) + k^T (to_end * u1)
        d_y0 = e_end * d_end
        d_g_end += tl.sum(tl.sum(d_end * start, 1), 0) * e_end
        d_weighted = _mm(k, d_end)
        d_k += _mm(to_end[:, None] * u1, tl.trans(d_end))
        d_u1 = to_end[:, None] * d_weighted
        d_to_end += tl.sum(d_weighted * u1, 1)
        d_anc = d_end
        if j == N - 1:
            d_q, d_k_read, d_u1_read, d_y0_read, d_log_decay_read, d_g_prev_read, d_anc_read = _read_backward(
                q, k, u1, c_w, a_w, d_o, decay, e_prev, ANCHOR)
            d_k += d_k_read
            d_u1 += d_u1_read
            d_y0 += d_y0_read
            d_log_decay += d_log_decay_read
            d_g_prev += d_g_prev_read
            if ANCHOR:
                d_anc += d_anc_read
        d_eta1, neg_d_kk_j, d_w, d_g_prev_j = _update_backward(k, e, eta1, wv, k_y0, lower, u1, kk, decay, e_prev,
                                                               to_end, d_u1, rows, L)
        neg_d_kk += neg_d_kk_j
        d_g_prev += d_g_prev_j
        d_k_y0 = -e_prev[:, None] * d_w
        if SAME:
            d_k_y0 += d_w
        d_k += _mm(d_k_y0, tl.trans(c_w))
        d_y0 += _mm(tl.trans(k), d_k_y0)
        d_snap = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        if not SAME:
            d_k += _mm(d_w, tl.trans(s_w))
            d_snap = _mm(tl.trans(k), d_w)
        if ANCHOR:
            d_k -= _mm(d_k_y0 if SAME else d_k_y0 + d_w, tl.trans(a_w))
            d_anc = d_anc - d_y0 - d_snap
            out = danc_ptr + ((r * H + h) * N + j) * D * D
            tl.store(out + dims[:, None] * D + dims[None, :], d_anc, mask=w_mask)
        # the step size eta1 = eta / (1 + eta |k|^2), then the error e = (k - v) + z W_out_s, d_e = -d_w
        d_eta = d_eta1 / (den * den) * write
        d_k -= (2.0 * d_eta1 * eta * eta / (den * den))[:, None] * k
        d_z = -_mm(d_w, tl.trans(s_w))
        d_k += d_z - d_w
        if DETACH:
            d_snap_e = -_mm(tl.trans(k), d_w)
        else:
            d_snap_e = -_mm(tl.trans(z), d_w)
            d_v += d_w
            if SELF_TARGETS and j < N - 1:
                d_v -= d_z
        if SAME:
            d_y0 += d_snap_e
        else:
            d_snap += d_snap_e
        out = ((r * H + h) * N + j) * D * D + dims[:, None] * D + dims[None, :]
        tl.store(dcur_ptr + out, d_y0, mask=w_mask)
        if not SAME:
            tl.store(dsnap_ptr + out, d_snap, mask=w_mask)
        if GENERATE:
            d_uk_j, d_w_eta, d_b_eta, d_s_eta_j = _gate_backward(uk, s_eta, w_eta, d_eta * eta_max * gate * (1 - gate),
                                                                  True)
            d_uk += d_uk_j
            d_s_eta += d_s_eta_j
            tl.store(der_ptr + ((r * H + h) * N + j) * D + dims, d_w_eta, mask=dim)
            tl.store(deb_ptr + (r * H + h) * N + j, d_b_eta)
        else:
            tl.store(deta_ptr + ((r * H + h) * L + rows) * N + j, d_eta, mask=tok)
    d_log_decay -= neg_d_kk * kk
    d_k -= _mm(neg_d_kk + tl.trans(neg_d_kk), k)
    d_log_alpha = _decays_backward(d_log_decay, d_g_prev, d_g_end, d_to_end, to_end, rows, L) * write
    tl.store(dq_ptr + act_out, d_q, mask=act_mask)
    if GENERATE:  # the generation's backward (`generate_backward`)
        if RETENTION:
            d_uk_a, d_w_alpha, d_b_alpha, d_s_alpha = _gate_backward(uk, s_alpha, w_alpha,
                                                                     d_log_alpha * tl.sigmoid(-alpha_pre),
                                                                     ALPHA_MEM >= 0)
            d_uk += d_uk_a
            tl.store(dar_ptr + (r * H + h) * D + dims, d_w_alpha, mask=dim)
            tl.store(dab_ptr + r * H + h, d_b_alpha)
            if ALPHA_MEM >= 0:
                _add_tile(grad_w + ALPHA_MEM * D * D, dims, w_mask, D, d_s_alpha)
        _add_tile(grad_w + ETA_MEM * D * D, dims, w_mask, D, d_s_eta)
        d_k_raw = _l2norm_backward(k, k_raw, d_k)
        d_v_raw = _l2norm_backward(v, v_raw, d_v)
        d_uk += d_k_raw
        d_uv = d_v_raw
        if K_MEM >= 0:
            d_uk += _mm(d_k_raw, tl.trans(s_k))
            _add_tile(grad_w + K_MEM * D * D, dims, w_mask, D, _mm(tl.trans(uk), d_k_raw))
        if V_MEM >= 0:
            d_uv += _mm(d_v_raw, tl.trans(s_v))
            _add_tile(grad_w + V_MEM * D * D, dims, w_mask, D, _mm(tl.trans(uv), d_v_raw))
        u_out = ((r * H + h) * L + rows[:, None]) * 2 * D + dims[None, :]
        tl.store(da_ptr + u_out, d_uk, mask=act_mask)
        tl.store(da_ptr + u_out + D, d_uv, mask=act_mask)
    else:
        tl.store(da_ptr + act_out, d_k, mask=act_mask)
        tl.store(db_ptr + act_out, d_v, mask=act_mask)
        tl.store(dla_ptr + (r * H + h) * L + rows, d_log_alpha, mask=tok)


def _unpack(spec, gen_spec, inputs):
    """A chunk step's inputs as (q, a, b, eta, log_alpha, write, snapshot_out, current_in, current_out, anchor_out,
    generation parameters, memory names): a = u, b = eta = log_alpha = None with `gen_spec`; else a = k, b = v."""
    if gen_spec is not None:
        q, a, write, _, snapshot_out, current_in, current_out, _, anchor_out, *params = inputs
        return q, a, None, None, None, write, snapshot_out, current_in, current_out, anchor_out, params, \
            gen_spec.memories
    q, a, b, eta, log_alpha, write, _, snapshot_out, current_in, current_out, _, anchor_out = inputs
    return q, a, b, eta, log_alpha, write, snapshot_out, current_in, current_out, anchor_out, (None,) * 4, ("o",)


def chunk_step_backward(spec, gen_spec, inputs, d_o, d_end_out, block_l: int | None = None,
                        block_d: int | None = None):
    """The gradients of `chunk_step`'s inputs (in their order, None for the write mask and a snapshot given as None)
    from those of o and end_out: one kernel launch that recomputes the chunk's intermediates (the backward of
    `memory_chunk.generated_chunk_forward` / `linear_chunk_forward`, written out as their torch backward is), then
    the sums over rows of the gradients of the layer's parameters."""
    q, a, b, eta, log_alpha, write, snapshot_out, current_in, current_out, anchor_out, params, memories = \
        _unpack(spec, gen_spec, inputs)
    rows, heads, length, dim = q.shape
    n = current_out.shape[2]
    snapshot_out, current_out, anchor_out, d_end_out = map(_inner_contiguous, (snapshot_out, current_out, anchor_out,
                                                                              d_end_out))
    eta_readout, eta_bias, alpha_readout, alpha_bias = (None if p is None else p.contiguous() for p in params)
    same = snapshot_out is None
    snap = current_out if same else snapshot_out
    f32 = dict(dtype=torch.float32, device=q.device)
    d_q, d_a = torch.empty(q.shape, **f32), torch.empty(a.shape, **f32)
    d_b = None if b is None else torch.empty(b.shape, **f32)
    d_eta = None if eta is None else torch.empty(eta.shape, **f32)
    d_log_alpha = None if log_alpha is None else torch.empty(log_alpha.shape, **f32)
    d_current = torch.empty((rows, heads, n, dim, dim), **f32)
    d_snapshot = None if same else torch.empty_like(d_current)
    d_anchor = None if anchor_out is None else torch.empty_like(d_current)  # per row, summed below
    d_params = [None if p is None else torch.empty((rows, *p.shape), **f32) for p in
                (eta_readout, eta_bias, alpha_readout, alpha_bias)]

    def index(name):
        return memories.index(name) if gen_spec is not None and name in memories else -1

    _linear_chunk_backward_kernel[(rows * heads,)](
        q, *_strides(q, 4), a, *_strides(a, 4), q if b is None else b, *_strides(b, 4),
        q if eta is None else eta, *_strides(eta, 4), q if log_alpha is None else log_alpha, *_strides(log_alpha, 3),
        write, write.stride(0), write.stride(2),
        snap, *_strides(snap, 4), current_out, *_strides(current_out, 4),
        current_out if anchor_out is None else anchor_out, *_strides(anchor_out, 3),
        *(q if p is None else p for p in (eta_readout, eta_bias, alpha_readout, alpha_bias)),
        d_o, *_strides(d_o, 4), d_end_out, *_strides(d_end_out, 4),
        *(d_q if t is None else t for t in (d_q, d_a, d_b, d_eta, d_log_alpha, d_snapshot, d_current, d_anchor,
                                             *d_params)),
        heads, length, dim, float(gen_spec.eta_max) if gen_spec is not None else 0.0,
        N=n, GENERATE=gen_spec is not None, SELF_TARGETS=spec.self_modifying, DETACH=spec.detach_self_targets,
        K_MEM=index("k"), V_MEM=index("v"), ETA_MEM=max(index("eta"), 0), ALPHA_MEM=index("alpha"),
        RETENTION=gen_spec is not None and gen_spec.retention, SAME=same, ANCHOR=anchor_out is not None,
        BLOCK_L=block_l or _block(length), BLOCK_D=block_d or _block(dim), num_warps=4 if dim <= 64 else 8,
    )
    LAUNCHES["linear_chunk_backward"] += 1
    d_weights = (None if same else torch.zeros_like(current_in), d_snapshot, torch.zeros_like(current_in), d_current,
                 None, None if d_anchor is None else d_anchor.sum(0))
    if gen_spec is not None:
        return (d_q, d_a, None, *d_weights, *(None if t is None else t.sum(0) for t in d_params))
    return (d_q, d_a, d_b, d_eta, d_log_alpha, None, *d_weights)


class FusedChunkStep(torch.autograd.Function):
    """`chunk_step` with `chunk_step_backward` as its backward: `memory_chunk.ChunkStep`'s inputs and results. Keeps
    the chunk's inputs only; backward recomputes the rest inside its kernel."""

    @staticmethod
    def forward(ctx, spec, gen_spec, *inputs):
        ctx.specs = spec, gen_spec
        ctx.save_for_backward(*inputs)
        return chunk_step(spec, gen_spec, *inputs)

    @staticmethod
    def backward(ctx, d_o, d_end_in, d_end_out):
        grads = chunk_step_backward(*ctx.specs, ctx.saved_tensors, d_o, d_end_out)
        return (None, None, *grads)

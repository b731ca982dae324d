"""Fused Triton kernels of the memory scan for linear memories (`memory_depth=1`, the default): forward only.

One launch per chunk and layer computes the whole chunk step for every head and memory: the generation of keys,
values, learning rates and retention gates from the snapshot memories (Eq. 87, 90; for a self-modifying chunk), the
decays, every memory's gated delta rule in chunk form with its UT transform solved by forward substitution
(Eq. 88-91) and the output memory's per-token reads before the write (Eq. 86). One program per row and head keeps
the chunk's tokens and one memory's weights at a time on chip. Fast weights float32; activations float32 or bf16.
The math is `memory_chunk_linear.linear_chunk_forward` after `memory_generate.generate`, which the tests compare it
with.

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


__all__ = ["LAUNCHES", "chunk_step"]

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
def _memory_write(k, z, e_base, eta, ksq, dkk, e_prev, e_end, to_end, s_w, c_w, a_w, rows, L,
                  SAME: tl.constexpr, ANCHOR: tl.constexpr):
    """One memory's chunk (`_errors`, `_step_sizes`, `_update` of memory_chunk_linear): returns u1 and end_out."""
    e = e_base + _mm(z, s_w)
    eta1 = eta / (1.0 + eta * ksq)
    k_y0 = _mm(k, c_w)
    k_ys = k_y0
    if not SAME:
        k_ys = _mm(k, s_w)
    end = e_end * c_w
    if ANCHOR:
        k_anchor = _mm(k, a_w)
        k_y0 -= k_anchor
        k_ys -= k_anchor
        end = a_w + e_end * (c_w - a_w)
    if SAME:
        k_ys = k_y0
    rhs = eta1[:, None] * (k_ys - e - e_prev[:, None] * k_y0)
    u1 = _solve(eta1[:, None] * dkk, rhs, rows, L)
    end += _mm(tl.trans(k), to_end[:, None] * u1)
    return u1, end


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
    rows, cols_l, dims = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_D)
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
    g = tl.cumsum(log_alpha, 0)
    g_prev = g - log_alpha
    g_end = tl.sum(log_alpha, 0)
    decay = tl.where(rows[:, None] > cols_l[None, :], tl.exp(g_prev[:, None] - g[None, :]), 0.0)
    e_prev, e_end, to_end = tl.exp(g_prev), tl.exp(g_end), tl.exp(g_end - g)
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
        u1, end = _memory_write(k, z, k - v, eta * write, ksq, dkk, e_prev, e_end, to_end, s_w, c_w, a_w, rows, L,
                                SAME, ANCHOR)
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

"""Token-by-token reference of the self-modifying Titans layer (DESIGN §2.2), written for clarity, not speed.

Independent of the fast path in `hope_hf/memory_hope.py`: plain per-row, per-token, per-head, per-memory loops over
explicit matrices W1 (d x m) and W2 (m x d), in the notation of the paper. Tests only.
"""

import torch
import torch.nn.functional as F


def _l2norm(z, eps=1e-6):
    return z / torch.sqrt((z * z).sum() + eps)


def _silu_grad(a):
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


def _memory(w1, w2, z):
    """M(z) = z + W1 silu(W2 z)."""
    return z + w1 @ F.silu(w2 @ z)


def _initial_memories(layer, head):
    """{box: (W1, W2)} at the meta-learned initial state of one head."""
    p, m = layer.fast_init, layer.memory_dim
    mems = {}
    for i, box in enumerate(layer.boxes):
        w2 = p.init_in[head][:, i * m : (i + 1) * m].T  # (m, d)
        w1 = p.init_out[head, i].T  # (d, m)
        mems[box] = (w1, w2)
    return mems


def reference_titans(layer, x, attention_mask=None, position_ids=None, state=None):
    """Output (B, T, D) and the per-row final state {snapshot, current, chunk_pos, conv tails} of the layer.

    `state`, if given, is a `TitansState` to continue from.
    """
    cfg = layer.config
    H, d, C, K = layer.num_heads, layer.head_dim, layer.chunk_size, layer.kernel_size
    p = layer.fast_init
    bsz, seq_len, _ = x.shape
    q_in, u_in, g_in = layer.q_proj(x), layer.u_proj(x), layer.g_proj(x)
    wq, wu = layer.q_conv.weight[:, 0], layer.u_conv.weight[:, 0]  # (ch, K)
    anchored = cfg.retention and cfg.retain_toward_init
    outputs, finals = [], []
    for b in range(bsz):
        init = [_initial_memories(layer, h) for h in range(H)]
        if state is None:
            cur = [dict(mems) for mems in init]
            snap = [dict(mems) for mems in init]
            pos = 0
            hist_q = [torch.zeros_like(q_in[b, 0]) for _ in range(K - 1)]
            hist_u = [torch.zeros_like(u_in[b, 0]) for _ in range(K - 1)]
        else:
            cur, snap = [], []
            for h in range(H):
                cur.append(_unpack(layer, state.current_in[b, h], state.current_out[b, h]))
                snap.append(_unpack(layer, state.snapshot_in[b, h], state.snapshot_out[b, h]))
            pos = int(state.chunk_pos[b])
            hist_q = list(state.conv_q[b].to(q_in.dtype))
            hist_u = list(state.conv_u[b].to(u_in.dtype))
        row_out = []
        for t in range(seq_len):
            real = attention_mask is None or bool(attention_mask[b, attention_mask.shape[1] - seq_len + t] != 0)
            if not real:
                row_out.append(torch.zeros_like(x[b, t]))
                continue
            if position_ids is not None and int(position_ids[b, t]) == 0:  # a new document: reset everything
                cur = [dict(mems) for mems in init]
                snap = [dict(mems) for mems in init]
                pos = 0
                hist_q = [torch.zeros_like(q_in[b, 0]) for _ in range(K - 1)]
                hist_u = [torch.zeros_like(u_in[b, 0]) for _ in range(K - 1)]
            window_q = torch.stack(hist_q + [q_in[b, t]], dim=-1)  # (ch, K), oldest first
            window_u = torch.stack(hist_u + [u_in[b, t]], dim=-1)
            hist_q = (hist_q + [q_in[b, t]])[1:] if K > 1 else []
            hist_u = (hist_u + [u_in[b, t]])[1:] if K > 1 else []
            q_all = F.silu((window_q * wq).sum(-1))
            u_all = F.silu((window_u * wu).sum(-1))
            heads_out = []
            for h in range(H):
                q = _l2norm(q_all[h * d : (h + 1) * d].to(p.init_in.dtype))
                u = u_all[h * d : (h + 1) * d].to(p.init_in.dtype)
                S, W = snap[h], cur[h]
                # keys, values, learning rate, retention: from the snapshot memories (Eq. 87, 90)
                k = _l2norm(_memory(*S["k"], u)) if "k" in S else _l2norm(p.static_k[h].T @ u)
                v = _l2norm(_memory(*S["v"], u)) if "v" in S else _l2norm(p.static_v[h].T @ u)
                eta_src = _memory(*S["eta"], u) if "eta" in S else u
                eta = cfg.eta_max * torch.sigmoid(p.eta_readout[h] @ eta_src + p.eta_bias[h])
                if cfg.retention:
                    alpha_src = _memory(*S["alpha"], u) if "alpha" in S else u
                    alpha = torch.sigmoid(p.alpha_readout[h] @ alpha_src + p.alpha_bias[h])
                else:
                    alpha = torch.ones((), dtype=u.dtype)
                # read before write (Eq. 86), at the per-token state
                heads_out.append(_memory(*W["o"], q))
                new = {}
                for box in layer.boxes:
                    w1s, w2s = S[box]
                    vhat = _memory(w1s, w2s, v) if cfg.self_modifying else v
                    if cfg.detach_self_targets:
                        vhat = vhat.detach()
                    a = w2s @ k
                    hid = F.silu(a)
                    e = k + w1s @ hid - vhat
                    g1 = torch.outer(e, hid)
                    g2 = torch.outer((w1s.T @ e) * _silu_grad(a), k)
                    eta1 = eta / (1 + C * eta * (hid * hid).sum())
                    eta2 = eta / (1 + C * eta * (_silu_grad(a) ** 2 * (w1s * w1s).sum(0)).sum())
                    w1, w2 = W[box]
                    w1_0, w2_0 = init[h][box] if anchored else (torch.zeros_like(w1), torch.zeros_like(w2))
                    if cfg.dgd:
                        eta_p = eta / (1 + eta * (k * k).sum())
                        eye = torch.eye(d, dtype=k.dtype)
                        w2_new = w2 @ (alpha * eye - eta_p * torch.outer(k, k)) + (1 - alpha) * w2_0 - eta2 * g2
                    else:
                        w2_new = alpha * w2 + (1 - alpha) * w2_0 - eta2 * g2
                    w1_new = alpha * w1 + (1 - alpha) * w1_0 - eta1 * g1
                    new[box] = (w1_new, w2_new)
                cur[h] = new
            pos += 1
            if pos == C:  # the chunk is complete: its end is the next snapshot
                snap = [dict(mems) for mems in cur]
                pos = 0
            o = torch.stack(heads_out)  # (H, d)
            o = o * torch.rsqrt((o * o).mean(-1, keepdim=True) + cfg.rms_norm_eps) * layer.out_norm_weight
            gate = F.silu(g_in[b, t]).view(H, d)
            row_out.append(layer.o_proj((o.to(x.dtype) * gate).reshape(-1)))
        outputs.append(torch.stack(row_out))
        finals.append(
            {
                "current": [_pack(layer, cur[h]) for h in range(H)],
                "snapshot": [_pack(layer, snap[h]) for h in range(H)],
                "chunk_pos": pos,
                "conv_q": torch.stack(hist_q) if K > 1 else None,
                "conv_u": torch.stack(hist_u) if K > 1 else None,
            }
        )
    return torch.stack(outputs), finals


def _unpack(layer, a, b):
    m = layer.memory_dim
    return {box: (b[i].T, a[:, i * m : (i + 1) * m].T) for i, box in enumerate(layer.boxes)}


def _pack(layer, mems):
    """{box: (W1, W2)} -> (A (d, n*m), B (n, m, d)) in the fast path's layout."""
    a = torch.cat([mems[box][1].T for box in layer.boxes], dim=-1)
    b = torch.stack([mems[box][0].T for box in layer.boxes])
    return a, b

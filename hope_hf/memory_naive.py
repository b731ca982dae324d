"""Token-by-token reference of the self-modifying Titans layer (docs/design.md §6a), written for clarity, not speed.

Independent of the fast path (`memory_hope.py` and the `memory_*` ops): plain per-row, per-token, per-head,
per-memory loops over explicit matrices W1 (d x m) and W2 (m x d), in the notation of the paper. Used by the tests
(`tests/test_memory.py`) and by anyone changing the rule: change it here first, then the chunk-parallel ops until
they agree. Not model code (the model never imports it).
"""

import torch
import torch.nn.functional as F


def _l2norm(z, eps=1e-6):
    return z / torch.sqrt((z * z).sum() + eps)


def _silu_grad(a):
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


def _sigma(a):
    """The hidden activation of an MLP memory: the l2-normalised SiLU."""
    return _l2norm(F.silu(a))


def _memory(w1, w2, z):
    """M(z) = z + W1 sigma(W2 z), or z + W1 z for a linear memory (W2 None)."""
    return z + w1 @ (z if w2 is None else _sigma(w2 @ z))


def _initial_memories(layer, head):
    """{box: (W1, W2)} at the meta-learned initial state of one head."""
    p, m = layer.fast_init, layer.memory_dim
    mems = {}
    for i, box in enumerate(layer.boxes):
        w2 = p.init_in[head][:, i * m : (i + 1) * m].T if hasattr(p, "init_in") else None  # (m, d)
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
    streams = ("q", "k", "v")  # the query, key and value streams, each through its causal convolution
    inputs = {name: getattr(layer, f"{name}_proj")(x) for name in streams}
    weights = {name: getattr(layer, f"{name}_conv").weight[:, 0] for name in streams}  # (ch, K)
    g_in = layer.g_proj(x)
    anchored = cfg.retention and cfg.retain_toward_init
    outputs, finals = [], []
    for b in range(bsz):
        init = [_initial_memories(layer, h) for h in range(H)]
        if state is None:
            cur = [dict(mems) for mems in init]
            snap = [dict(mems) for mems in init]
            pos = 0
            hist = {name: [torch.zeros_like(inputs[name][b, 0]) for _ in range(K - 1)] for name in streams}
        else:
            cur, snap = [], []
            for h in range(H):
                cur.append(_unpack(layer, state.current_in[b, h], state.current_out[b, h]))
                snap.append(_unpack(layer, state.snapshot_in[b, h], state.snapshot_out[b, h]))
            pos = int(state.chunk_pos[b])
            hist = {name: list(getattr(state, f"conv_{name}")[b].to(x.dtype)) for name in streams}
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
                hist = {name: [torch.zeros_like(inputs[name][b, 0]) for _ in range(K - 1)] for name in streams}
            conv = {}
            for name in streams:
                window = torch.stack(hist[name] + [inputs[name][b, t]], dim=-1)  # (ch, K), oldest first
                hist[name] = (hist[name] + [inputs[name][b, t]])[1:] if K > 1 else []
                conv[name] = F.silu((window * weights[name]).sum(-1))
            heads_out = []
            for h in range(H):
                q = _l2norm(conv["q"][h * d : (h + 1) * d].to(p.init_out.dtype))
                u = conv["k"][h * d : (h + 1) * d].to(p.init_out.dtype)  # the key stream: k, eta, alpha read it
                u_v = conv["v"][h * d : (h + 1) * d].to(p.init_out.dtype)  # the value stream
                S, W = snap[h], cur[h]
                # keys, values, learning rate, retention: from the snapshot memories (Eq. 87, 90)
                k = _l2norm(_memory(*S["k"], u)) if "k" in S else _l2norm(u)
                v = _l2norm(_memory(*S["v"], u_v)) if "v" in S else _l2norm(u_v)
                eta_src = _memory(*S["eta"], u) if "eta" in S else u
                etas = cfg.eta_max * torch.sigmoid(p.eta_readout[h] @ eta_src + p.eta_bias[h])  # one per memory
                if cfg.retention:
                    alpha_src = _memory(*S["alpha"], u) if "alpha" in S else u
                    alpha = torch.sigmoid(p.alpha_readout[h] @ alpha_src + p.alpha_bias[h])
                else:
                    alpha = torch.ones((), dtype=u.dtype)
                # read before write (Eq. 86), at the per-token state
                heads_out.append(_memory(*W["o"], q))
                new = {}
                for box, eta in zip(layer.boxes, etas):
                    w1s, w2s = S[box]
                    # self-generated targets (Eq. 84) for all but the output memory, which regresses onto v
                    vhat = _memory(w1s, w2s, v) if cfg.self_modifying and box != "o" else v
                    if cfg.detach_self_targets:
                        vhat = vhat.detach()
                    w1, w2 = W[box]
                    w1_0, w2_0 = init[h][box] if anchored else (torch.zeros_like(w1), None)
                    if w2s is None:  # a linear memory: the key is its own feature, no first layer
                        hid = k
                        w2_new = None
                    else:
                        a = w2s @ k
                        hid = _sigma(a)
                        e = k + w1s @ hid - vhat
                        # d sigma / da = (I - hid hid^T) diag(silu'(a)) / |silu(a)|
                        scale = _silu_grad(a) / torch.sqrt((F.silu(a) ** 2).sum() + 1e-6)
                        back = w1s.T @ e
                        g2 = torch.outer((back - hid * (hid @ back)) * scale, k)
                        eta2 = eta / (1 + C * eta * (scale**2 * (w1s * w1s).sum(0)).sum())
                        w2_0 = torch.zeros_like(w2) if w2_0 is None else w2_0
                    eta1 = eta / (1 + eta * (hid * hid).sum())
                    if w2s is None:
                        pass
                    elif cfg.dgd:
                        eta_p = eta / (1 + eta * (k * k).sum())
                        eye = torch.eye(d, dtype=k.dtype)
                        w2_new = w2 @ (alpha * eye - eta_p * torch.outer(k, k)) + (1 - alpha) * w2_0 - eta2 * g2
                    else:
                        w2_new = alpha * w2 + (1 - alpha) * w2_0 - eta2 * g2
                    # the output layer: DGD at the current weights, a delta rule with key hid
                    w1_new = (w1 @ (alpha * torch.eye(hid.shape[0], dtype=hid.dtype) - eta1 * torch.outer(hid, hid))
                              + (1 - alpha) * w1_0 + eta1 * torch.outer(vhat - k, hid))
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
                **{f"conv_{name}": torch.stack(hist[name]) if K > 1 else None for name in streams},
            }
        )
    return torch.stack(outputs), finals


def _unpack(layer, a, b):
    m = layer.memory_dim
    return {box: (b[i].T, a[:, i * m : (i + 1) * m].T if a.shape[-1] else None) for i, box in enumerate(layer.boxes)}


def _pack(layer, mems):
    """{box: (W1, W2)} -> (A (d, n*m), B (n, m, d)) in the fast path's layout."""
    if mems[layer.boxes[0]][1] is None:  # linear memories: an empty A
        return mems[layer.boxes[0]][0].new_zeros(layer.head_dim, 0), torch.stack([mems[box][0].T for box in layer.boxes])
    a = torch.cat([mems[box][1].T for box in layer.boxes], dim=-1)
    b = torch.stack([mems[box][0].T for box in layer.boxes])
    return a, b

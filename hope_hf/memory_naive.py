"""Token-by-token reference of the self-modifying Titans layer (docs/design.md §6a), written for clarity, not speed.

Independent of the fast path (`memory_hope.py` and the `memory_*` ops): plain per-row, per-token, per-head,
per-memory loops over explicit matrices, in column vectors as the paper writes them: a memory's first layer
`w_in` (m x d, the paper's W2) and output layer `w_out` (d x m, the paper's W1), the transposes of the fast path's
W_in and W_out (docs/design.md §6a, "Names"). Used by the tests
(`tests/ops/test_memory.py`) and by anyone changing the rule: change it here first, then the chunk-parallel ops until
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


def _memory(w_out, w_in, z):
    """M(z) = z + w_out sigma(w_in z), or z + w_out z for a linear memory (w_in None)."""
    return z + w_out @ (z if w_in is None else _sigma(w_in @ z))


def _initial_memories(layer, head):
    """{memory: (w_out, w_in)} at the meta-learned initial state of one head."""
    p, m = layer.fast_init, layer.memory_dim
    mems = {}
    for i, name in enumerate(layer.memory_names):
        w_in = p.init_in[head][:, i * m : (i + 1) * m].T if hasattr(p, "init_in") else None  # (m, d)
        w_out = p.init_out[head, i].T  # (d, m)
        mems[name] = (w_out, w_in)
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
                streams_h = [conv[name][h * d : (h + 1) * d].to(p.init_out.dtype) for name in streams]
                o_h, cur[h] = _head_step(layer, h, *streams_h, snap[h], cur[h], init[h])
                heads_out.append(o_h)
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


def _head_step(layer, h, q, u, u_v, S, W, init):
    """One token of one head: the read of the output memory and the memories after the write. q, u (the key
    stream: k, eta, alpha read it), u_v (the value stream) after their convolutions; S, W, init: {memory: (w_out,
    w_in)} at the snapshot, now, and at the initial state."""
    cfg, p = layer.config, layer.fast_init
    q = _l2norm(q)
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
    o = _memory(*W["o"], q)  # read before write (Eq. 86), at the per-token state
    anchored = cfg.retention and cfg.retain_toward_init
    new = {}
    for name, eta in zip(layer.memory_names, etas):
        # self-generated targets (Eq. 84) for all but the output memory, which regresses onto v
        vhat = _memory(*S[name], v) if cfg.self_modifying and name != "o" else v
        if cfg.detach_self_targets:
            vhat = vhat.detach()
        w_out_0, w_in_0 = init[name] if anchored else (torch.zeros_like(W[name][0]), None)
        new[name] = _write(cfg, layer.chunk_size, S[name], W[name], (w_out_0, w_in_0), k, vhat, eta, alpha)
    return o, new


def _write(cfg, C, snapshot, current, anchor, k, vhat, eta, alpha):
    """One memory's (w_out, w_in) after the write of key k and target vhat (Eq. 88, DGD) from its snapshot, current
    and anchor (w_out, w_in) (w_in None: a linear memory; the anchor's None: zero)."""
    (w_out_s, w_in_s), (w_out, w_in), (w_out_0, w_in_0) = snapshot, current, anchor
    d = k.shape[0]
    if w_in_s is None:  # a linear memory: the key is its own feature, no first layer
        hid = k
        w_in_new = None
    else:
        a = w_in_s @ k
        hid = _sigma(a)
        e = k + w_out_s @ hid - vhat
        # d sigma / da = (I - hid hid^T) diag(silu'(a)) / |silu(a)|
        scale = _silu_grad(a) / torch.sqrt((F.silu(a) ** 2).sum() + 1e-6)
        back = w_out_s.T @ e
        g2 = torch.outer((back - hid * (hid @ back)) * scale, k)
        eta2 = eta / (1 + C * eta * (scale**2 * (w_out_s * w_out_s).sum(0)).sum())
        w_in_0 = torch.zeros_like(w_in) if w_in_0 is None else w_in_0
    eta1 = eta / (1 + eta * (hid * hid).sum())
    if w_in_s is None:
        pass
    elif cfg.dgd:
        eta_p = eta / (1 + eta * (k * k).sum())
        eye = torch.eye(d, dtype=k.dtype)
        w_in_new = w_in @ (alpha * eye - eta_p * torch.outer(k, k)) + (1 - alpha) * w_in_0 - eta2 * g2
    else:
        w_in_new = alpha * w_in + (1 - alpha) * w_in_0 - eta2 * g2
    # the output layer: DGD at the current weights, a delta rule with key hid
    w_out_new = (w_out @ (alpha * torch.eye(hid.shape[0], dtype=hid.dtype) - eta1 * torch.outer(hid, hid))
                 + (1 - alpha) * w_out_0 + eta1 * torch.outer(vhat - k, hid))
    return w_out_new, w_in_new


def _unpack(layer, w_in, w_out):
    """The fast path's (W_in (d, n*m), W_out (n, m, d)) of one head -> {memory: (w_out, w_in)}."""
    m = layer.memory_dim
    return {name: (w_out[i].T, w_in[:, i * m : (i + 1) * m].T if w_in.shape[-1] else None)
            for i, name in enumerate(layer.memory_names)}


def _pack(layer, mems):
    """{memory: (w_out, w_in)} -> (W_in (d, n*m), W_out (n, m, d)) in the fast path's layout."""
    names = layer.memory_names
    w_out = torch.stack([mems[name][0].T for name in names])
    if mems[names[0]][1] is None:  # linear memories: an empty W_in
        return w_out.new_zeros(layer.head_dim, 0), w_out
    return torch.cat([mems[name][1].T for name in names], dim=-1), w_out

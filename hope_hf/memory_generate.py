"""Generation of keys, values, learning rates and retention gates from the snapshot memories (paper Eq. 87, 90),
and its written-out backward."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .memory_common import GenerateSpec, fp32, l2norm, l2norm_backward, plus_product


def _inputs_of_memories(spec: GenerateSpec, uk, uv):
    """The input of every adaptive memory (all but the output memory), in storage order: the value stream for the v
    memory, the key stream for the others."""
    return [uv if name == "v" else uk for name in spec.memories[:-1]]


class GenerateSaved(NamedTuple):
    """What `generate_backward` reads (None where the config has no such tensor)."""

    sig: torch.Tensor | None  # sigmoid of the adaptive memories' pre-activations (MLP memories)
    raw: torch.Tensor | None  # silu of them
    hid: torch.Tensor | None  # the adaptive memories' hidden features, side by side (R, H, L, n_aux*m)
    k_raw: torch.Tensor  # the key before its l2norm
    v_raw: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    eta_gate: torch.Tensor  # sigmoid of the learning rates' pre-activations
    alpha_pre: torch.Tensor | None  # the retention gate's pre-activation


def generate(spec: GenerateSpec, u, snapshot_in, snapshot_out, eta_readout, eta_bias, alpha_readout, alpha_bias,
             keep: bool = False):
    """Keys, values, learning rates and retention gates (Eq. 87, 90): read from the snapshot memories of k, v, eta,
    alpha where they are adaptive (`snapshot_in`, `snapshot_out` None: none is), else straight from the streams and
    readouts. u = [u_k, u_v]: (R, H, L, 2d), the key stream (input of the k, eta and alpha memories) and the value
    stream (input of the v memory). Parameters a config does not have are None. With `keep`, also the intermediates
    that `generate_backward` reads (`GenerateSaved`). A gate sees its memory only through its readout w, so the
    memory's output is never formed: <u + silu(u W_in) W_out, w> = <u, w> + silu(u W_in) (W_out w) (u instead of
    silu(u W_in) for linear memories)."""
    d = u.shape[-1] // 2
    uk, uv = u[..., :d], u[..., d:]
    n_aux, m = len(spec.memories) - 1, spec.memory_dim
    outputs, sig, raw, hid = {}, None, None, None
    if n_aux and spec.depth == 1:  # linear memories: the features are the inputs themselves
        hid = torch.cat(_inputs_of_memories(spec, uk, uv), dim=-1)
    elif n_aux:
        pre = uk @ snapshot_in[..., : n_aux * m]  # (R,H,C,n_aux*m)
        if "v" in spec.memories:  # the v memory reads the value stream
            j = spec.memories.index("v")
            pre = torch.cat([pre[..., : j * m], uv @ snapshot_in[..., j * m : (j + 1) * m], pre[..., (j + 1) * m :]],
                            -1)
        sig = torch.sigmoid(pre)
        raw = pre * sig  # silu
        hid = l2norm(raw.unflatten(-1, (n_aux, m))).flatten(-2)  # sigma = l2norm o silu, per memory
    # the k and v memories (stored first), one product each: a product over a slice of the memories would copy
    # their weights (their batch dimensions do not merge)
    for j in range(_vector_memories(spec)):
        src = uv if spec.memories[j] == "v" else uk
        outputs[spec.memories[j]] = src + hid[..., j * m : (j + 1) * m] @ snapshot_out[:, :, j]
    k_raw, v_raw = outputs.get("k", uk), outputs.get("v", uv)
    k, v = l2norm(k_raw), l2norm(v_raw)
    eta_gate = torch.sigmoid(_gate_readout(spec, "eta", uk, hid, snapshot_out, eta_readout, eta_bias))
    eta = spec.eta_max * eta_gate
    alpha_pre = None
    if spec.retention:
        alpha_pre = _gate_readout(spec, "alpha", uk, hid, snapshot_out, alpha_readout, alpha_bias)
        log_alpha = F.logsigmoid(alpha_pre)
    else:
        log_alpha = eta.new_zeros(eta.shape[:-1])
    if not keep:
        return k, v, eta, log_alpha
    return k, v, eta, log_alpha, GenerateSaved(sig, raw, hid, k_raw, v_raw, k, v, eta_gate, alpha_pre)


def _vector_memories(spec: GenerateSpec) -> int:
    """How many of the adaptive memories are read as vectors (k, v: stored first); the others are gates."""
    return sum(name in ("k", "v") for name in spec.memories)


def _gate_readout(spec: GenerateSpec, name, u, hid, snapshot_out, readout, bias):
    """A gate's pre-activations <src, w_g> + b_g (R, H, L, G) for readouts w (H, G, d) and biases (H, G) ((R, H, L)
    for a readout (H, d)), src = u or, where the gate is adaptive, its memory's output u + h W_out, taken as
    <u, w> + h (W_out w) (hid: the memories' hidden features h)."""
    w = fp32(readout)
    single = w.dim() == 2
    w = w.unsqueeze(1) if single else w  # (H, G, d)
    value = torch.einsum("rhld,hgd->rhlg", u, w) + fp32(bias).view(w.shape[0], -1)[:, None]
    if name in spec.memories:
        j, m = spec.memories.index(name), spec.memory_dim
        value = value + hid[..., j * m : (j + 1) * m] @ (snapshot_out[:, :, j] @ w.transpose(-1, -2))
    return value.squeeze(-1) if single else value


def _gate_readout_backward(spec: GenerateSpec, name, u, hid, snapshot_out, readout, d_value, d_hid, d_snapshot_out):
    """The backward of `_gate_readout` for d_value: returns the gradients of u (its direct part) and of the readout
    and bias; the memory's hidden gradient goes into `d_hid` (a dict by memory index), its W_out's into
    `d_snapshot_out`."""
    w = fp32(readout)
    single = w.dim() == 2
    w = w.unsqueeze(1) if single else w  # (H, G, d)
    d_value = d_value.unsqueeze(-1) if single else d_value  # (R, H, L, G)
    d_u = torch.einsum("rhlg,hgd->rhld", d_value, w)
    d_w = torch.einsum("rhlg,rhld->hgd", d_value, u)
    if name in spec.memories:
        j, m = spec.memories.index(name), spec.memory_dim
        b = snapshot_out[:, :, j]  # (R,H,m,d)
        d_hid[j] = d_value @ (b @ w.transpose(-1, -2)).transpose(-1, -2)
        weighted = hid[..., j * m : (j + 1) * m].transpose(-1, -2) @ d_value  # sum_t h_t^T d_t: (R,H,m,G)
        d_w = d_w + torch.einsum("rhmg,rhmd->hgd", weighted, b)
        d_snapshot_out[:, :, j].add_(weighted @ w)
    d_bias = d_value.sum((0, 2))
    return d_u, (d_w.squeeze(1) if single else d_w), (d_bias.squeeze(-1) if single else d_bias)


def generate_backward(spec: GenerateSpec, u, snapshot_in, snapshot_out, params, t: GenerateSaved, d_k, d_v, d_eta,
                      d_log_alpha, d_snapshot_in, d_snapshot_out):
    """The vector-Jacobian product of `generate` with snapshot memories, written out (tested against autograd).

    `params` are its parameters (None where the config has none), `t` its intermediates (`keep=True`), `d_*` the
    gradients of its outputs. Returns the gradients of u and of the parameters (summed over the rows); the
    snapshot's are added into `d_snapshot_in` and `d_snapshot_out` in place (weight-sized, so no new ones are made).
    """
    eta_readout, eta_bias, alpha_readout, alpha_bias = params
    d = u.shape[-1] // 2
    uk, uv = u[..., :d], u[..., d:]
    n_aux, m = len(spec.memories) - 1, spec.memory_dim
    hid = t.hid
    d_hid = {}  # by memory index: the gradients of each memory's block of hid
    d_params = [None] * len(params)
    gate = t.eta_gate
    d_eta_pre = d_eta * spec.eta_max * gate * (1 - gate)  # (R,H,C)
    d_uk, d_params[0], d_params[1] = _gate_readout_backward(spec, "eta", uk, hid, snapshot_out, eta_readout, d_eta_pre,
                                                             d_hid, d_snapshot_out)
    if spec.retention:
        d_alpha_pre = d_log_alpha * torch.sigmoid(-t.alpha_pre)  # logsigmoid' = 1 - sigmoid
        d_u_alpha, d_params[2], d_params[3] = _gate_readout_backward(spec, "alpha", uk, hid, snapshot_out,
                                                                     alpha_readout, d_alpha_pre, d_hid, d_snapshot_out)
        d_uk = d_uk + d_u_alpha
    d_src = {"k": l2norm_backward(t.k, t.k_raw, d_k), "v": l2norm_backward(t.v, t.v_raw, d_v)}
    d_uk = d_uk + d_src["k"]  # k = l2norm(u_k (+ the k memory's output)), likewise v
    d_uv = d_src["v"]
    for j in range(_vector_memories(spec)):  # mem = src + hid W_out for k and v, one memory at a time
        d_mem = d_src[spec.memories[j]]
        d_hid[j] = d_mem @ snapshot_out[:, :, j].transpose(-1, -2)
        plus_product(d_snapshot_out[:, :, j], hid[..., j * m : (j + 1) * m].transpose(-1, -2), d_mem)
    if n_aux and spec.depth == 1:  # hid = the memories' inputs
        for j, name in enumerate(spec.memories[:-1]):
            if name == "v":
                d_uv = d_uv + d_hid[j]
            else:
                d_uk = d_uk + d_hid[j]
    elif n_aux:
        sig, raw = t.sig, t.raw
        d_raw = torch.cat([d_hid[j] for j in range(n_aux)], dim=-1)
        d_raw = l2norm_backward(hid.unflatten(-1, (n_aux, m)), raw.unflatten(-1, (n_aux, m)),
                                 d_raw.unflatten(-1, (n_aux, m))).flatten(-2)  # hid = l2norm(silu(pre)) per memory
        d_pre = d_raw * torch.addcmul(sig, raw, 1 - sig)  # silu'
        if "v" in spec.memories:  # the v memory's block came from the value stream
            j = spec.memories.index("v")
            block = slice(j * m, (j + 1) * m)
            d_pre_v = d_pre[..., block].clone()
            d_pre[..., block] = 0
            d_uv = d_uv + d_pre_v @ snapshot_in[..., block].transpose(-1, -2)
            plus_product(d_snapshot_in[..., block], uv.transpose(-1, -2), d_pre_v)
        d_uk = d_uk + d_pre @ snapshot_in[..., : n_aux * m].transpose(-1, -2)
        plus_product(d_snapshot_in[..., : n_aux * m], uk.transpose(-1, -2), d_pre)
    return torch.cat([d_uk, d_uv], dim=-1), d_params

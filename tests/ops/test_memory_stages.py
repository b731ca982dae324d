"""Each stage of the memory ops on its own: the stage's written-out backward against autograd through its forward, in
float64 on small shapes (memory_chunk_mlp.py, memory_chunk_linear.py, memory_common.decays, memory_generate.py).

A stage's backward takes the gradients that other stages accumulate (running sums, the read's shares); here they are
zero, so it must return exactly the vector-Jacobian product of its forward. Backward runs without autograd, as in
`ChunkStep.backward`. The whole chunk step is tested against
autograd and against the token-by-token reference in tests/ops/test_memory.py.
"""

from __future__ import annotations

import pytest
import torch

from hope_hf import memory_chunk_linear as lin
from hope_hf import memory_chunk_mlp as mlp
from hope_hf.memory_common import ChunkSpec, ChunkWeights, DecayGrads, GenerateSpec, decays, decays_backward
from hope_hf.memory_generate import generate, generate_backward


R, H, L, D, M = 2, 2, 4, 3, 4  # rows, heads, chunk length, head_dim, MLP width
ATOL, RTOL = 1e-12, 1e-10

MLP_SWITCHES = {
    "default": {},
    "static": dict(self_modifying=False),
    "no-dgd-no-anchor": dict(dgd=False, retain_toward_init=False),
    "detached-targets": dict(detach_self_targets=True),
}


def chunk_spec(depth: int, **switches) -> ChunkSpec:
    """Three memories (two with self-generated targets, the output memory), one without self-modification."""
    s = {**dict(self_modifying=True, detach_self_targets=False, dgd=True, retain_toward_init=True), **switches}
    return ChunkSpec(chunk_size=L + 1, num_memories=3 if s["self_modifying"] else 1,
                     memory_dim=M if depth == 2 else D, depth=depth, **s)


def mlp_spec(**switches) -> ChunkSpec:
    return chunk_spec(2, **switches)


def linear_spec(**switches) -> ChunkSpec:
    return chunk_spec(1, **switches)


@pytest.fixture
def rand():
    g = torch.Generator().manual_seed(0)

    def make(*shape, scale=0.5, grad=True):
        return (torch.randn(*shape, dtype=torch.float64, generator=g) * scale).requires_grad_(grad)

    return make


def vjp(outputs, inputs, cotangents):
    """Autograd's gradients of sum <cotangent, output> (zeros for an input that does not reach the outputs)."""
    found = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found)]


def assert_grads(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
    assert any(float(w.abs().max()) > 1e-3 for w in want.values())


def filled(dg: DecayGrads) -> DecayGrads:
    """The decays' gradients with the ones a stage does not touch as zeros."""
    shapes = ((R, H, L, L), (R, H, L), (R, H, 1), (R, H, L))
    return DecayGrads(*(torch.zeros(s, dtype=torch.float64) if g is None else g for g, s in zip(dg, shapes)))


def log_alphas(rand):
    return (-torch.rand(R, H, L, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).requires_grad_()


def weights(rand, n, first, same: bool, anchored: bool) -> ChunkWeights:
    current_in, current_out = rand(R, H, D, first), rand(R, H, n, M if first else D, D)
    snapshot = (current_in, current_out) if same else (rand(R, H, D, first), rand(R, H, n, M if first else D, D))
    anchors = (rand(H, D, first) if first else None, rand(H, n, M if first else D, D)) if anchored else (None, None)
    return ChunkWeights(same, *snapshot, current_in, current_out, *anchors)


def test_decays(rand):
    log_alpha = log_alphas(rand)
    dec = decays(log_alpha, L)
    cot = [torch.randn_like(t) for t in dec]
    (want,) = vjp(dec, [log_alpha], cot)
    # the stages accumulate the gradients of the exponents: d_decay * decay, d_e_prev * e_prev, d_e_end * e_end
    with torch.no_grad():
        got = decays_backward(dec, DecayGrads(cot[0] * dec.decay, cot[2] * dec.e_prev, cot[3] * dec.e_end, cot[1]))
    assert_grads({"log_alpha": got}, {"log_alpha": want})


# ---------------------------------------------------------------------------------------------------- MLP memories
@pytest.mark.parametrize("switches", MLP_SWITCHES.values(), ids=MLP_SWITCHES)
def test_mlp_features(rand, switches):
    spec = mlp_spec(**switches)
    n, rows = spec.num_memories, 2 * L if spec.self_modifying else L
    k, v, snapshot_in = rand(R, H, L, D), rand(R, H, L, D), rand(R, H, D, n * M)
    f = mlp._features(spec, k, v, snapshot_in)
    d_h_all, d_nrm, d_dpre0, d_pre = (torch.randn_like(t) for t in (f.h_all, f.nrm, f.dpre0, f.pre))
    if spec.detach_self_targets:  # the values' features reach nothing with a gradient (`_snapshot_gradient`)
        d_h_all[:, :, :L] = 0
    want = vjp([f.h_all, f.nrm, f.dpre0, f.pre], [k, v, snapshot_in], [d_h_all, d_nrm, d_dpre0, d_pre])
    zeros = torch.zeros(R, H, L, D, dtype=torch.float64)
    with torch.no_grad():
        got = mlp._features_backward(spec, L, snapshot_in, f, d_h_all, d_nrm, d_dpre0, d_pre, zeros, zeros.clone(),
                                     None)
    assert f.h_all.shape[2] == rows
    assert_grads(dict(zip(["k", "v", "snapshot_in"], got)), dict(zip(["k", "v", "snapshot_in"], want)))


@pytest.mark.parametrize("switches", MLP_SWITCHES.values(), ids=MLP_SWITCHES)
def test_mlp_snapshot_gradient(rand, switches):
    spec = mlp_spec(**switches)
    n, rows = spec.num_memories, 2 * L if spec.self_modifying else L
    k, v, snapshot_out = rand(R, H, L, D), rand(R, H, L, D), rand(R, H, n, M, D)
    h_all, nrm, dpre0 = rand(R, H, rows, n, M), rand(R, H, L, n, 1), rand(R, H, L, n, M)
    f = mlp.Features(None, None, None, None, h_all, None, None, None, nrm, h_all[:, :, rows - L :], dpre0)
    g = mlp._snapshot_gradient(spec, k, v, f, snapshot_out)
    d_e, d_dpre, d_delta = (torch.randn_like(t) for t in (g.e, g.dpre, g.delta))
    inputs = dict(h_all=h_all, nrm=nrm, dpre0=dpre0, k=k, v=v, snapshot_out=snapshot_out)
    want = vjp([g.e, g.dpre, g.delta], list(inputs.values()), [d_e, d_dpre, d_delta])
    zero = torch.zeros_like
    with torch.no_grad():
        got = mlp._snapshot_gradient_backward(spec, k, v, snapshot_out, f, g, d_e, d_delta, d_dpre, zero(f.h), zero(k),
                                              zero(snapshot_out))
    assert_grads(dict(zip(inputs, got)), dict(zip(inputs, want)))


def test_mlp_step_sizes(rand):
    spec = mlp_spec()
    n = spec.num_memories
    eta = torch.rand(R, H, L, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    h, dpre, snapshot_out = rand(R, H, L, n, M), rand(R, H, L, n, M), rand(R, H, n, M, D)
    t = mlp._step_sizes(spec, eta, h, dpre, snapshot_out)
    d_eta1, d_eta2 = torch.randn_like(t.eta1), torch.randn_like(t.eta2)
    inputs = dict(eta=eta, h=h, dpre=dpre, snapshot_out=snapshot_out)
    want = vjp([t.eta1, t.eta2], list(inputs.values()), [d_eta1, d_eta2])
    zero = torch.zeros_like
    with torch.no_grad():
        got = mlp._step_sizes_backward(spec, eta, h, dpre, snapshot_out, t, d_eta1, d_eta2, zero(eta), zero(h),
                                       zero(snapshot_out))
    assert_grads(dict(zip(inputs, got)), dict(zip(inputs, want)))


def mlp_read_grads(**given) -> mlp.ReadGrads:
    """The read's shares as zeros, but for those `given`."""
    shapes = dict(d_k=(R, H, L, D), d_h_o=(R, H, L, M), d_r_o=(R, H, L, M), d_u1_o=(R, H, L, D),
                  d_current_in_o=(R, H, D, M), d_current_out_o=(R, H, M, D), d_anchor_in_o=(H, D, M),
                  d_anchor_out_o=(H, M, D))
    zeros = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
    return mlp.ReadGrads(d_q=None, **{**zeros, **given})


@pytest.mark.parametrize("same", [False, True], ids=["distinct-snapshot", "snapshot-is-current"])
@pytest.mark.parametrize("switches", [{}, dict(dgd=False, retain_toward_init=False)], ids=["default", "no-dgd"])
def test_mlp_first_layer(rand, same, switches):
    spec = mlp_spec(**switches)
    n = spec.num_memories
    k, pre, delta, log_alpha = rand(R, H, L, D), rand(R, H, L, n, M), rand(R, H, L, n, M), log_alphas(rand)
    eta, eta2 = (torch.rand(R, H, L, n, dtype=torch.float64) * 0.8 for _ in range(2))
    eta, eta2 = eta.requires_grad_(), eta2.requires_grad_()
    w = weights(rand, n, n * M, same, spec.retain_toward_init)
    dec = decays(log_alpha, L)
    end_in, t = mlp._first_layer(spec, k, eta, pre, delta, eta2, dec, w, single=False)
    sl_o = spec.output_columns
    d_end_in, d_r_o = torch.randn_like(end_in), torch.randn_like(t.r[..., sl_o])
    inputs = dict(k=k, eta=eta, delta=delta, eta2=eta2, current_in=w.current_in, anchor_in=w.anchor_in, pre=pre,
                  log_alpha=log_alpha)
    inputs = {name: x for name, x in inputs.items() if x is not None}
    want = vjp([end_in, t.r[..., sl_o]], list(inputs.values()), [d_end_in, d_r_o])
    with torch.no_grad():
        grads, dg = mlp._first_layer_backward(spec, k, eta, delta, eta2, dec, w, t, mlp_read_grads(d_r_o=d_r_o),
                                              d_end_in, DecayGrads())
    got = dict(k=grads.d_k, eta=grads.d_eta, delta=grads.d_delta, eta2=grads.d_eta2, current_in=grads.d_current_in,
               anchor_in=grads.d_anchor_in, pre=torch.zeros_like(pre) if grads.d_pre is None else grads.d_pre,
               log_alpha=decays_backward(dec, filled(dg)))
    assert_grads({name: got[name] for name in inputs}, dict(zip(inputs, want)))


@pytest.mark.parametrize("same", [False, True], ids=["distinct-snapshot", "snapshot-is-current"])
@pytest.mark.parametrize("switches", [{}, dict(retain_toward_init=False)], ids=["default", "no-anchor"])
def test_mlp_output_layer(rand, same, switches):
    spec = mlp_spec(**switches)
    n = spec.num_memories
    h, e, log_alpha = rand(R, H, L, n, M), rand(R, H, L, n, D), log_alphas(rand)
    eta1 = (torch.rand(R, H, L, n, dtype=torch.float64) * 0.8).requires_grad_()
    w = weights(rand, n, n * M, same, spec.retain_toward_init)
    dec = decays(log_alpha, L)
    end_out, t = mlp._output_layer(spec, h, e, eta1, dec, w, single=False)
    d_end_out, d_u1_o = torch.randn_like(end_out), torch.randn_like(t.u1[:, :, -1])
    inputs = dict(h=h, e=e, eta1=eta1, current_out=w.current_out, snapshot_out=None if same else w.snapshot_out,
                  anchor_out=w.anchor_out, log_alpha=log_alpha)
    inputs = {name: x for name, x in inputs.items() if x is not None}
    want = vjp([end_out, t.u1[:, :, -1]], list(inputs.values()), [d_end_out, d_u1_o])
    with torch.no_grad():
        grads, dg = mlp._output_layer_backward(spec, h, e, eta1, dec, w, t, mlp_read_grads(d_u1_o=d_u1_o),
                                               d_end_out, DecayGrads())
    got = dict(h=grads.d_h, e=grads.d_e, eta1=grads.d_eta1, current_out=grads.d_current_out,
               snapshot_out=grads.d_snapshot_out, anchor_out=grads.d_anchor_out,
               log_alpha=decays_backward(dec, filled(dg)))
    assert_grads({name: got[name] for name in inputs}, dict(zip(inputs, want)))


@pytest.mark.parametrize("switches", [{}, dict(retain_toward_init=False)], ids=["default", "no-anchor"])
def test_mlp_read(rand, switches):
    spec = mlp_spec(**switches)
    n = spec.num_memories
    q, k, h, r, u1 = rand(R, H, L, D), rand(R, H, L, D), rand(R, H, L, n, M), rand(R, H, L, n * M), rand(R, H, n, L, D)
    log_alpha = log_alphas(rand)
    w = weights(rand, n, n * M, True, spec.retain_toward_init)
    dec = decays(log_alpha, L)
    o, t = mlp._read(spec, q, k, h, r, u1, dec, w, single=False)
    d_o = torch.randn_like(o)
    inputs = dict(q=q, k=k, h=h, r=r, u1=u1, current_in=w.current_in, current_out=w.current_out,
                  anchor_in=w.anchor_in, anchor_out=w.anchor_out, log_alpha=log_alpha)
    inputs = {name: x for name, x in inputs.items() if x is not None}
    want = dict(zip(inputs, vjp([o], list(inputs.values()), [d_o])))
    with torch.no_grad():
        g, dg = mlp._read_backward(spec, q, k, h, r, u1, dec, w, t, d_o)
    sl_o = spec.output_columns
    got = dict(q=g.d_q, k=g.d_k, log_alpha=decays_backward(dec, filled(dg)))
    # the read reaches only the output memory's share of h, r, u1, the weights and the anchors
    every, memory_o = slice(None), -1
    shares = dict(h=(g.d_h_o, (..., memory_o, every)), r=(g.d_r_o, (..., sl_o)),
                  u1=(g.d_u1_o, (every, every, memory_o)), current_in=(g.d_current_in_o, (..., sl_o)),
                  current_out=(g.d_current_out_o, (every, every, memory_o)),
                  anchor_in=(g.d_anchor_in_o, (..., sl_o)), anchor_out=(g.d_anchor_out_o, (every, memory_o)))
    for name, (share, index) in shares.items():
        if name in inputs:
            got[name] = torch.zeros_like(inputs[name])
            got[name][index] = share
    # the current weights' shares are those of x0 = current - anchor: the layers' stages take them off the anchors
    for anchor, current in (("anchor_in", "current_in"), ("anchor_out", "current_out")):
        if anchor in inputs:
            got[anchor] = got[anchor] - got[current].sum(0)
    assert_grads(got, want)


# ------------------------------------------------------------------------------------------------- linear memories
LINEAR_SWITCHES = {"default": {}, "static": dict(self_modifying=False),
                   "detached-targets": dict(detach_self_targets=True)}


@pytest.mark.parametrize("switches", LINEAR_SWITCHES.values(), ids=LINEAR_SWITCHES)
def test_linear_errors(rand, switches):
    spec = linear_spec(**switches)
    k, v, snapshot_out = rand(R, H, L, D), rand(R, H, L, D), rand(R, H, spec.num_memories, D, D)
    e = lin._errors(spec, k, v, snapshot_out)
    d_e = torch.randn_like(e)
    want = vjp([e], [k, v, snapshot_out], [d_e])
    with torch.no_grad():
        got = lin._errors_backward(spec, k, v, snapshot_out, d_e, torch.zeros_like(k))
    assert_grads(dict(zip(["k", "v", "snapshot_out"], got)), dict(zip(["k", "v", "snapshot_out"], want)))


def test_linear_step_sizes(rand):
    k = rand(R, H, L, D)
    eta = (torch.rand(R, H, L, 3, dtype=torch.float64) * 0.8).requires_grad_()
    eta1 = lin._step_sizes(eta, k)
    d_eta1 = torch.randn_like(eta1)
    want = vjp([eta1], [eta, k], [d_eta1])
    with torch.no_grad():
        got = lin._step_sizes_backward(eta, k, d_eta1, torch.zeros_like(k))
    assert_grads(dict(zip(["eta", "k"], got)), dict(zip(["eta", "k"], want)))


@pytest.mark.parametrize("same", [False, True], ids=["distinct-snapshot", "snapshot-is-current"])
@pytest.mark.parametrize("anchored", [True, False], ids=["anchor", "no-anchor"])
def test_linear_update(rand, same, anchored):
    n = 3
    k, e, log_alpha = rand(R, H, L, D), rand(R, H, n, L, D), log_alphas(rand)
    eta1 = (torch.rand(R, H, n, L, dtype=torch.float64) * 0.8).requires_grad_()
    w = weights(rand, n, 0, same, anchored)
    dec = decays(log_alpha, L)
    end_out, t = lin._update(k, e, eta1, dec, w)
    d_end_out, d_u1_o = torch.randn_like(end_out), torch.randn_like(t.u1[:, :, -1])
    inputs = dict(k=k, e=e, eta1=eta1, current_out=w.current_out, snapshot_out=None if same else w.snapshot_out,
                  anchor_out=w.anchor_out, log_alpha=log_alpha)
    inputs = {name: x for name, x in inputs.items() if x is not None}
    want = vjp([end_out, t.u1[:, :, -1]], list(inputs.values()), [d_end_out, d_u1_o])
    d_u1 = torch.zeros_like(t.u1)
    d_u1[:, :, -1] = d_u1_o
    read = lin.ReadGrads(None, torch.zeros_like(k), d_u1, torch.zeros_like(w.current_out),
                         None if w.anchor_out is None else torch.zeros_like(w.anchor_out))
    with torch.no_grad():
        grads, dg = lin._update_backward(k, e, eta1, dec, w, t, read, d_end_out, DecayGrads())
    got = dict(k=grads.d_k, e=grads.d_e, eta1=grads.d_eta1, current_out=grads.d_current_out,
               snapshot_out=grads.d_snapshot_out, anchor_out=grads.d_anchor_out,
               log_alpha=decays_backward(dec, filled(dg)))
    assert_grads({name: got[name] for name in inputs}, dict(zip(inputs, want)))


@pytest.mark.parametrize("anchored", [True, False], ids=["anchor", "no-anchor"])
def test_linear_read(rand, anchored):
    n = 3
    q, k, u1, log_alpha = rand(R, H, L, D), rand(R, H, L, D), rand(R, H, n, L, D), log_alphas(rand)
    w = weights(rand, n, 0, True, anchored)
    dec = decays(log_alpha, L)
    o, t = lin._read(q, k, u1, dec, w)
    d_o = torch.randn_like(o)
    inputs = dict(q=q, k=k, u1=u1, current_out=w.current_out, anchor_out=w.anchor_out, log_alpha=log_alpha)
    inputs = {name: x for name, x in inputs.items() if x is not None}
    want = vjp([o], list(inputs.values()), [d_o])
    with torch.no_grad():
        g, dg = lin._read_backward(q, k, u1, dec, w, t, d_o)
    got = dict(q=g.d_q, k=g.d_k, u1=g.d_u1, current_out=g.d_current_out, log_alpha=decays_backward(dec, filled(dg)))
    if anchored:  # the current weights' share is that of y0 = current - anchor: `_update_backward` takes it off
        got["anchor_out"] = g.d_anchor_out - g.d_current_out.sum(0)
    assert_grads({name: got[name] for name in inputs}, dict(zip(inputs, want)))


# ------------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("depth", [1, 2], ids=["linear", "mlp"])
@pytest.mark.parametrize("memories", [("k", "v", "eta", "alpha", "o"), ("v", "eta", "o")], ids=["all", "static-k"])
def test_generate(rand, depth, memories):
    retention = "alpha" in memories
    m, n = (D if depth == 1 else M), len(memories)
    spec = GenerateSpec(memories=memories, memory_dim=m, eta_max=2.0, retention=retention, depth=depth)
    u = rand(R, H, L, 2 * D)
    snapshot_in, snapshot_out = rand(R, H, D, n * m if depth == 2 else 0), rand(R, H, n, m, D)
    params = [rand(H, n, D), rand(H, n), rand(H, D) if retention else None, rand(H) if retention else None]
    k, v, eta, log_alpha, t = generate(spec, u, snapshot_in, snapshot_out, *params, keep=True)
    cot = [torch.randn_like(x) for x in (k, v, eta, log_alpha)]
    inputs = dict(u=u, snapshot_in=snapshot_in, snapshot_out=snapshot_out,
                  **{f"param{i}": p for i, p in enumerate(params) if p is not None})
    outputs = [(x, c) for x, c in zip((k, v, eta, log_alpha), cot) if x.requires_grad]
    want = vjp([x for x, _ in outputs], list(inputs.values()), [c for _, c in outputs])
    d_snapshot_in, d_snapshot_out = torch.zeros_like(snapshot_in), torch.zeros_like(snapshot_out)
    with torch.no_grad():
        d_u, d_params = generate_backward(spec, u, snapshot_in, snapshot_out, params, t, *cot, d_snapshot_in,
                                          d_snapshot_out)
    got = dict(u=d_u, snapshot_in=d_snapshot_in, snapshot_out=d_snapshot_out,
               **{f"param{i}": g for i, g in enumerate(d_params) if params[i] is not None})
    assert_grads(got, dict(zip(inputs, want)))

"""The self-modifying Titans memory: fast chunk-parallel path against the token-by-token reference
(docs/design.md §6a)."""

import pytest
import torch

from hope_hf.configuration_hope import HopeConfig
from hope_hf.memory_hope import HopeSelfModifyingTitans, TitansState, memory_names
from hope_hf.memory_layout import Layout, document_starts
from hope_hf.memory_naive import reference_titans


SWITCHES = ["self_modifying", "adaptive_k", "adaptive_v", "dgd", "retention", "retain_toward_init",
            "detach_self_targets"]
DEFAULTS = dict(self_modifying=True, adaptive_k=True, adaptive_v=True, dgd=True, retention=True,
                retain_toward_init=True, detach_self_targets=False)


def small_config(**overrides):
    kw = dict(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, head_dim=4, chunk_size=3,
              memory_expansion=2, eta_max=0.9, conv_kernel_size=4)
    kw.update(overrides)
    return HopeConfig(**kw)


def make_layer(dtype=torch.float64, seed=0, **overrides):
    """A layer with large, random parameters so that every term of the update rule matters."""
    torch.manual_seed(seed)
    layer = HopeSelfModifyingTitans(small_config(**overrides), layer_idx=0).to(dtype)
    layer.init_memory_weights()
    with torch.no_grad():
        layer.fast_init.eta_bias.fill_(1.0)  # eta ~ 0.73 eta_max: large steps
        layer.fast_init.init_out.mul_(2.0)
        for conv in (layer.q_conv, layer.k_conv, layer.v_conv):
            conv.weight.normal_(0, 0.5)
        for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.g_proj, layer.o_proj):
            lin.weight.normal_(0, 0.5)
        if hasattr(layer.fast_init, "alpha_bias"):
            layer.fast_init.alpha_bias.fill_(1.0)  # alpha ~ 0.73: strong retention toward the anchor
    return layer


def assert_state_matches(state: TitansState, finals, atol):
    for b, fin in enumerate(finals):
        assert int(state.chunk_pos[b]) == fin["chunk_pos"]
        for h, ((cur_a, cur_b), (snap_a, snap_b)) in enumerate(zip(fin["current"], fin["snapshot"])):
            torch.testing.assert_close(state.current_in[b, h], cur_a, atol=atol, rtol=0)
            torch.testing.assert_close(state.current_out[b, h], cur_b, atol=atol, rtol=0)
            torch.testing.assert_close(state.snapshot_in[b, h], snap_a, atol=atol, rtol=0)
            torch.testing.assert_close(state.snapshot_out[b, h], snap_b, atol=atol, rtol=0)
        torch.testing.assert_close(state.conv_q[b], fin["conv_q"].to(state.conv_q.dtype), atol=atol, rtol=0)
        for name in ("conv_k", "conv_v"):
            torch.testing.assert_close(getattr(state, name)[b], fin[name].to(state.conv_q.dtype), atol=atol, rtol=0)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk_size, seq_len", [(1, 9), (2, 9), (3, 11), (16, 21), (64, 70)])
def test_fast_path_equals_reference(chunk_size, seq_len, depth):
    layer = make_layer(chunk_size=chunk_size, memory_depth=depth)
    x = torch.randn(2 if seq_len < 64 else 1, seq_len, 8, dtype=torch.float64)
    out, state = layer.forward_with_state(x)
    ref, finals = reference_titans(layer, x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    assert_state_matches(state, finals, atol=1e-10)
    assert ref.abs().max() > 0.1  # the comparison is not between two zero tensors


MLP = dict(memory_depth=2)  # the paper's residual MLP memories (the default is linear memories)
LINEAR = [{}] + [{name: not DEFAULTS[name]} for name in SWITCHES if name != "dgd"] + [
    dict(adaptive_k=False, adaptive_v=False),
    dict(retention=False, detach_self_targets=True),
]
SINGLE_SWITCH_OFF = [MLP] + [{**MLP, name: not DEFAULTS[name]} for name in SWITCHES]
COMBOS = [{**MLP, **combo} for combo in (
    dict(self_modifying=False, retention=False),
    dict(dgd=False, retain_toward_init=False),
    dict(adaptive_k=False, adaptive_v=False),
    dict(adaptive_k=False, detach_self_targets=True),
    dict(self_modifying=False, dgd=False, retain_toward_init=False),
)]
SWITCH_SETS = LINEAR + SINGLE_SWITCH_OFF + COMBOS


@pytest.mark.parametrize("switches", SWITCH_SETS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_switches_equal_reference_with_gradients(switches):
    layer = make_layer(chunk_size=2, **switches)
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    out, _ = layer.forward_with_state(x)
    ref, _ = reference_titans(layer, x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    weights = torch.randn_like(out)
    params = [p for p in layer.parameters()]
    fast_grads = torch.autograd.grad((out * weights).sum(), [x] + params, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * weights).sum(), [x] + params, allow_unused=True)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g_fast, g_ref in zip(names, fast_grads, ref_grads):
        assert g_fast is not None, f"{name} gets no gradient"  # every parameter is used (DDP needs that)
        if g_ref is None:  # detached targets: the value stream reaches the loss only through them
            assert layer.config.detach_self_targets and name.startswith("v_"), name
            g_ref = torch.zeros_like(g_fast)
        torch.testing.assert_close(g_fast, g_ref, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")
    # a detached target is a deliberate gradient change: no finite-difference match
    if not layer.config.detach_self_targets:
        assert torch.autograd.gradcheck(lambda z: layer.forward_with_state(z)[0], (x,), eps=1e-6, atol=1e-7)


def test_switches_change_what_they_name():
    cfg = small_config
    assert memory_names(cfg()) == ["k", "v", "eta", "alpha", "o"]
    assert memory_names(cfg(self_modifying=False)) == ["o"]
    assert memory_names(cfg(adaptive_k=False)) == ["v", "eta", "alpha", "o"]
    assert memory_names(cfg(adaptive_v=False)) == ["k", "eta", "alpha", "o"]
    assert memory_names(cfg(retention=False)) == ["k", "v", "eta", "o"]
    no_ret = HopeSelfModifyingTitans(cfg(retention=False), 0).fast_init
    assert not hasattr(no_ret, "alpha_readout") and not hasattr(no_ret, "alpha_bias")
    static = HopeSelfModifyingTitans(cfg(self_modifying=False, memory_depth=2), 0).fast_init
    assert [name for name, _ in static.named_parameters()] == ["init_in", "init_out", "eta_readout", "eta_bias",
                                                               "alpha_readout", "alpha_bias"]
    assert static.eta_readout.shape == (2, 1, 4)  # (heads, memories, d): one learning rate per memory
    linear = HopeSelfModifyingTitans(cfg(), 0).fast_init
    assert not hasattr(linear, "init_in") and linear.init_out.shape == (2, 5, 4, 4)  # (heads, memories, d, d)
    # detach_self_targets changes gradients only, not values
    x = torch.randn(1, 7, 8, dtype=torch.float64)
    a, b = make_layer(seed=1, **MLP), make_layer(seed=1, detach_self_targets=True, **MLP)
    torch.testing.assert_close(a.forward_with_state(x)[0], b.forward_with_state(x)[0], atol=0, rtol=0)
    ga = torch.autograd.grad(a.forward_with_state(x)[0].sum(), a.fast_init.init_in)[0]
    gb = torch.autograd.grad(b.forward_with_state(x)[0].sum(), b.fast_init.init_in)[0]
    assert (ga - gb).abs().max() > 1e-6


def test_zero_learning_rate_keeps_initial_memories():
    """Invariant 3: eta -> 0 leaves every memory at its initial state; outputs read the initial states."""
    layer = make_layer(eta_max=1e-300)
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    out, state = layer.forward_with_state(x)
    init = layer.initial_state(2)
    for name in ("snapshot_in", "snapshot_out", "current_in", "current_out"):
        torch.testing.assert_close(getattr(state, name), getattr(init, name), atol=1e-15, rtol=0)
    # an all-initial-state read equals a layer whose chunk is the whole sequence and eta is exactly zero
    ref, _ = reference_titans(layer, x)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    frozen = make_layer(eta_max=1e-300, chunk_size=64)
    torch.testing.assert_close(frozen.forward_with_state(x)[0], out, atol=1e-12, rtol=0)


def test_batch_rows_are_independent():
    layer = make_layer()
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    out, state = layer.forward_with_state(x)
    for b in range(3):
        alone, alone_state = layer.forward_with_state(x[b : b + 1])
        torch.testing.assert_close(out[b : b + 1], alone, atol=1e-12, rtol=0)
        torch.testing.assert_close(state.current_in[b : b + 1], alone_state.current_in, atol=1e-12, rtol=0)


@pytest.mark.parametrize("split", [1, 4, 5, 6, 9])
def test_two_pieces_equal_one(split):
    layer = make_layer()
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    full, full_state = layer.forward_with_state(x)
    a, mid = layer.forward_with_state(x[:, :split])
    b, end = layer.forward_with_state(x[:, split:], state=mid)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-12, rtol=0)
    for name, t in end.tensors().items():
        torch.testing.assert_close(t, getattr(full_state, name), atol=1e-12, rtol=0)


def padded_batch():
    x = torch.randn(3, 13, 8, dtype=torch.float64)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[1, :2] = 0
    mask[2, 6] = 0  # a hole and right padding
    mask[2, -1] = 0
    return x, mask


def test_padding_never_writes_nor_shifts_chunks():
    layer = make_layer()
    x, mask = padded_batch()
    out, state = layer.forward_with_state(x, attention_mask=mask)
    ref, finals = reference_titans(layer, x, attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    assert_state_matches(state, finals, atol=1e-10)
    for b in range(2):  # a left-padded row gives exactly what the row gives alone
        real = mask[b].bool()
        alone, alone_state = layer.forward_with_state(x[b : b + 1, real])
        torch.testing.assert_close(out[b, real], alone[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(state.current_out[b], alone_state.current_out[0], atol=1e-12, rtol=0)
        assert int(state.chunk_pos[b]) == int(alone_state.chunk_pos[0])
    assert torch.all(out[~mask.bool()] == 0)


def test_padded_pieces_with_different_chunk_positions():
    """Per-row chunk positions differ after a padded prefill; continuing in pieces matches the reference."""
    layer = make_layer()
    x, mask = padded_batch()
    ref, finals = reference_titans(layer, x, attention_mask=mask)
    out1, s1 = layer.forward_with_state(x[:, :9], attention_mask=mask[:, :9])
    assert len(set(s1.chunk_pos.tolist())) > 1
    out2, s2 = layer.forward_with_state(x[:, 9:10], attention_mask=mask[:, :10], state=s1)
    out3, s3 = layer.forward_with_state(x[:, 10:], attention_mask=mask, state=s2)
    torch.testing.assert_close(torch.cat([out1, out2, out3], 1), ref, atol=1e-10, rtol=0)
    assert_state_matches(s3, finals, atol=1e-10)


def test_packed_documents_reset_memories():
    layer = make_layer()
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 5, 6]])
    _, prior = layer.forward_with_state(torch.randn(2, 5, 8, dtype=torch.float64))
    out, state = layer.forward_with_state(x, position_ids=pos, state=prior)
    ref, finals = reference_titans(layer, x, position_ids=pos, state=prior)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    assert_state_matches(state, finals, atol=1e-10)
    for b, lo, hi in [(0, 5, 8), (0, 8, 13), (1, 6, 13)]:  # every document equals itself fed alone
        alone, _ = layer.forward_with_state(x[b : b + 1, lo:hi])
        torch.testing.assert_close(out[b, lo:hi], alone[0], atol=1e-12, rtol=0)
    cont, _ = layer.forward_with_state(x[1:2, :6], state=prior.map(lambda t: t[1:2]))
    torch.testing.assert_close(out[1, :6], cont[0], atol=1e-12, rtol=0)  # the first piece continues the state


@pytest.mark.parametrize("recompute", [True, False])
def test_pieces_of_unequal_length_cost_their_own_chunks_and_equal_pieces_alone(recompute):
    """Frame rows whose pieces end early are not computed further (`Layout.rows_with_tokens`): a packed row of a
    long and several short documents, and a left-padded row that continues a state, give the outputs, final states
    and gradients of every piece fed alone, with recomputed segments that some pieces end inside."""
    layer = make_layer(recompute_memory_states=recompute)
    x = torch.randn(2, 25, 8, dtype=torch.float64, requires_grad=True)
    pos = torch.cat([torch.arange(n) for n in (2, 4, 19)]).unsqueeze(0)
    pos = torch.cat([pos, torch.arange(25).unsqueeze(0) + 7])
    mask = torch.ones(2, 25, dtype=torch.long)
    mask[1, :8] = 0  # 17 tokens from chunk position 1: one chunk fewer than the long document
    _, prior = layer.forward_with_state(torch.randn(2, 7, 8, dtype=torch.float64))  # rows start mid-chunk
    prior = prior.map(lambda t: t.detach())
    layout = Layout(mask.bool(), document_starts(pos, mask.bool()), prior.chunk_pos, 3, 4)
    counts = [layout.rows_with_tokens(c) for c in range(len(layout.chunk_bounds))]
    assert counts[0] == 4 and counts[-1] == 1 and counts == sorted(counts, reverse=True)
    out, state = layer.forward_with_state(x, attention_mask=mask, position_ids=pos, state=prior)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, *layer.parameters()])

    pieces = [(0, 0, 2, False), (0, 2, 6, False), (0, 6, 25, False), (1, 8, 25, True)]
    loss, final = 0, {}
    for b, lo, hi, continues in pieces:
        start = prior.map(lambda t: t[b : b + 1]) if continues else None
        alone, alone_state = layer.forward_with_state(x[b : b + 1, lo:hi], state=start)
        torch.testing.assert_close(out[b, lo:hi], alone[0], atol=1e-12, rtol=0)
        loss = loss + (alone[0] * weights[b, lo:hi]).sum()
        final[b] = alone_state
    for b in range(2):  # each row's state is its last piece's
        for name, t in state.tensors().items():
            torch.testing.assert_close(t[b], final[b].tensors()[name][0], atol=1e-12, rtol=0, msg=name)
    for g, g_alone in zip(grads, torch.autograd.grad(loss, [x, *layer.parameters()])):
        torch.testing.assert_close(g, g_alone, atol=1e-10, rtol=1e-10)


def test_a_short_padded_batch_costs_its_tokens_not_a_whole_chunk():
    """The frame of a padded batch ends at its last token (a partial last chunk), so a chunk size larger than the
    input does not make a padded batch cost a whole chunk; each row still equals itself fed alone."""
    layer = make_layer(chunk_size=64)
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :3] = 0
    real = mask.bool()
    layout = Layout(real, document_starts(None, real), torch.zeros(2, dtype=torch.long), 64, 4)
    assert layout.frame_len == 20 and layout.chunk_bounds == [(0, 20)]
    out, state = layer.forward_with_state(x, attention_mask=mask)
    for b in range(2):
        alone, alone_state = layer.forward_with_state(x[b : b + 1, real[b]])
        torch.testing.assert_close(out[b, real[b]], alone[0], atol=1e-12, rtol=0)
        for name, t in state.tensors().items():
            torch.testing.assert_close(t[b], alone_state.tensors()[name][0], atol=1e-12, rtol=0, msg=name)


@pytest.mark.parametrize("switches", [{}, dict(self_modifying=False), dict(retention=False), MLP,
                                      dict(MLP, self_modifying=False), dict(MLP, dgd=False, retain_toward_init=False),
                                      dict(MLP, retention=False),
                                      dict(MLP, adaptive_k=False, detach_self_targets=True)],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_one_token_steps_equal_the_chunked_pass(switches):
    """Decoding's one-token path (`_forward_token`) equals one pass over the whole sequence: outputs, every state
    tensor and the gradients, through chunk ends, pad tokens (holes and left padding) and a document start."""
    layer = make_layer(**switches)
    x, mask = padded_batch()
    x.requires_grad_(True)
    pos = (mask.cumsum(1) - 1).clamp(min=0) + 5  # continuing rows ...
    pos[1, 8] = 0  # ... and a new document in row 1 at token 8
    pos[1, 9:] = torch.arange(1, 5)
    _, prior = layer.forward_with_state(torch.randn(3, 4, 8, dtype=torch.float64))  # rows start mid-chunk
    full, full_state = layer.forward_with_state(x, attention_mask=mask, position_ids=pos, state=prior)
    weights = torch.randn_like(full)
    grads = torch.autograd.grad((full * weights).sum(), [x, *layer.parameters()], allow_unused=True,
                                retain_graph=True)  # the prior state's graph is shared

    outs, state = [], prior
    for t in range(x.shape[1]):
        out, state = layer.forward_with_state(x[:, t : t + 1], attention_mask=mask[:, : t + 1],
                                              position_ids=pos[:, t : t + 1], state=state)
        outs.append(out)
    steps = torch.cat(outs, 1)
    torch.testing.assert_close(steps, full, atol=1e-10, rtol=0)
    for name, t in full_state.tensors().items():
        torch.testing.assert_close(getattr(state, name), t, atol=1e-10, rtol=0)
    step_grads = torch.autograd.grad((steps * weights).sum(), [x, *layer.parameters()], allow_unused=True)
    for g_full, g_step in zip(grads, step_grads):
        if g_full is None:
            assert g_step is None or not g_step.any()
        else:
            torch.testing.assert_close(g_step, g_full, atol=1e-9, rtol=0)
    assert torch.all(steps[~mask.bool()] == 0) and full.abs().max() > 0.1
    with torch.no_grad():  # decoding proper: no graph, so the chunk step drops the in-piece terms (`single`)
        state = prior
        for t in range(x.shape[1]):
            out, state = layer.forward_with_state(x[:, t : t + 1], attention_mask=mask[:, : t + 1],
                                                  position_ids=pos[:, t : t + 1], state=state)
            torch.testing.assert_close(out, full[:, t : t + 1], atol=1e-10, rtol=0)
    for name, t in full_state.tensors().items():
        torch.testing.assert_close(getattr(state, name), t, atol=1e-10, rtol=0)
    assert len(set(prior.chunk_pos.tolist() + full_state.chunk_pos.tolist())) > 1


def test_reduced_precision_keeps_fast_weights_in_float32():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(2, 10, 8)
    ref, state32 = layer.forward_with_state(x)
    layer_bf16 = make_layer(dtype=torch.float32)
    for module in (layer_bf16.q_proj, layer_bf16.k_proj, layer_bf16.v_proj, layer_bf16.g_proj, layer_bf16.o_proj,
                   layer_bf16.q_conv, layer_bf16.k_conv, layer_bf16.v_conv):
        module.to(torch.bfloat16)
    out, state = layer_bf16.forward_with_state(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert state.current_in.dtype == torch.float32 and state.current_out.dtype == torch.float32
    assert torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05


@pytest.mark.parametrize("switches", [{}, {"self_modifying": False}], ids=["self_modifying", "titans"])
def test_autocast_training_keeps_the_memory_in_float32(switches):
    """Under bf16 autocast (what `Trainer(bf16=True)` turns on) the memory math opts out: the fast weights stay
    float32, and a training step gives the same loss and gradients with and without recomputation (the written-out
    backward and the recomputed pass see the forward's dtypes)."""
    results = []
    for recompute in (False, True):
        layer = make_layer(dtype=torch.float32, chunk_size=3, recompute_memory_states=recompute, **switches)
        x = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, state = layer.forward_with_state(x)
        assert state.current_in.dtype == torch.float32 and state.snapshot_out.dtype == torch.float32
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [x.grad] + [p.grad for p in layer.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        results.append((out.detach().float(), grads))
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0, atol=0, rtol=0)
    for new, old in zip(g1, g0):
        torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("depth", [1, 2])
def test_long_stream_is_stable_and_alive(depth):
    """65,536 tokens through the tiny preset's Titans layer with every eta saturated at the default eta_max: i.i.d.,
    cyclic and constant token streams (one batch row each) stay finite, bounded and alive."""
    from hope_hf.presets import get_preset

    cfg = get_preset("tiny", memory_depth=depth)
    torch.manual_seed(0)
    layer = HopeSelfModifyingTitans(cfg, 0)
    layer.init_memory_weights()
    for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.g_proj, layer.o_proj):
        torch.nn.init.normal_(lin.weight, 0, cfg.initializer_range)
    with torch.no_grad():
        layer.fast_init.eta_bias.fill_(30.0)  # sigmoid(30) = 1: every step at eta_max
    num = 65_536
    streams = torch.stack(
        [
            torch.randint(0, cfg.vocab_size, (num,), generator=torch.Generator().manual_seed(1)),  # i.i.d.
            torch.arange(num) % 37,  # cyclic
            torch.zeros(num, dtype=torch.long),  # constant
        ]
    )
    emb = torch.randn(cfg.vocab_size, cfg.hidden_size)
    x = emb[streams]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
    with torch.no_grad():
        out, state = layer.forward_with_state(x)
    assert torch.isfinite(out).all()
    assert torch.isfinite(state.current_in).all() and torch.isfinite(state.current_out).all()
    early, late = out[:, :256].abs().mean(dim=(1, 2)), out[:, -256:].abs().mean(dim=(1, 2))
    assert (late > 0.1 * early).all()  # outputs do not die out
    b0 = layer.fast_init.init_out
    if depth == 1:  # W = I + B per memory, from the identity (k, v, eta, alpha) or zero (the output memory)
        d = b0.shape[-1]
        size = (torch.eye(d) + state.current_out).norm(dim=(-2, -1)) / d**0.5  # measured 0.2-0.98
        moved = (state.current_out - b0).norm(dim=(-2, -1)) / d**0.5  # measured 0.2-0.78
        assert size.max() < 2.0 and moved.min() > 0.05, (size, moved)
        return
    a0 = layer.fast_init.init_in
    for cur, init in ((state.current_in, a0), (state.current_out, b0)):
        ratio = cur.norm(dim=(-2, -1)) / init.norm(dim=(-2, -1))  # per stream and head (and memory for B)
        # exact writes store what they see: at eta_max 2 the output layers hold 1.5-2.1x their initial norm,
        # fluctuating without a trend from 1K to 131K tokens (a feedback of the self-generated targets grew them to
        # 1e18 before the hidden features were normalised, and to 1e15 at eta_max 4)
        assert ratio.max() < 3.0, f"fast weights grew: {ratio.max():.3f}"
        assert ratio.min() > 0.2, f"a memory decayed toward zero: {ratio.min():.3f}"
    moved = (state.current_in - a0).flatten(1).norm(dim=1) / a0.norm()
    assert (moved > 0.05).all(), f"a memory never learned anything: {moved.tolist()}"


def test_bf16_loading_keeps_memory_initial_states_in_float32(tmp_path):
    from hope_hf import HopeForCausalLM
    from hope_hf.presets import get_preset

    model = HopeForCausalLM(get_preset("tiny", num_hidden_layers=1, vocab_size=64))
    model.save_pretrained(tmp_path)
    loaded = HopeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in loaded.named_parameters()}
    assert dtypes["model.layers.0.titans.q_proj.weight"] == torch.bfloat16
    fast = [name for name in dtypes if ".fast_init." in name]
    assert fast and all(dtypes[name] == torch.float32 for name in fast)
    out = loaded(torch.randint(0, 64, (1, 40)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    # a model built in bf16 keeps them in float32 the same way; one built in float64 keeps float64
    from transformers import AutoModelForCausalLM

    for dtype, fast_dtype in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        built = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
        dtypes = {name: p.dtype for name, p in built.named_parameters()}
        assert dtypes["model.layers.0.titans.q_proj.weight"] == dtype
        assert all(dtypes[name] == fast_dtype for name in fast)


def saved_bytes(fn):
    """Bytes autograd keeps for backward while `fn()` runs (what activation checkpointing leaves stored)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


@pytest.mark.parametrize("switches", [{}, {"self_modifying": False}, MLP], ids=["self_modifying", "titans", "mlp"])
def test_recomputed_states_give_the_same_outputs_and_gradients(switches):
    """`recompute_memory_states` changes what backward stores, never a number: outputs, the final state and every
    gradient agree exactly with the stored-states path, also with padding (non-trivial layout)."""
    results = []
    for recompute in (False, True):
        layer = make_layer(chunk_size=3, recompute_memory_states=recompute, **switches)
        x = torch.randn(2, 29, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        mask = torch.ones(2, 29, dtype=torch.long)
        mask[1, :4] = 0
        out, state = layer.forward_with_state(x, attention_mask=mask)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads = [x.grad] + [p.grad for p in layer.parameters()]
        results.append((out.detach(), state.current_in.detach(), state.snapshot_out.detach(), grads))
    (out0, a0, b0, g0), (out1, a1, b1, g1) = results
    torch.testing.assert_close(out1, out0, atol=1e-12, rtol=0)
    torch.testing.assert_close(a1, a0, atol=1e-12, rtol=0)
    torch.testing.assert_close(b1, b0, atol=1e-12, rtol=0)
    assert len(g1) == len(g0)
    for new, old in zip(g1, g0):
        torch.testing.assert_close(new, old, atol=1e-10, rtol=0)


def test_recomputed_states_store_far_less_for_backward():
    """64 chunks: with recomputation backward keeps ~sqrt(64) = 8 segment boundaries, not 64 chunks of weights (MLP
    memories, whose weights dominate what a chunk stores)."""
    stored = {}
    for recompute in (False, True):
        layer = make_layer(dtype=torch.float32, chunk_size=4, recompute_memory_states=recompute, **MLP)
        x = torch.randn(1, 256, 8, requires_grad=True)
        out, nbytes = saved_bytes(lambda: layer.forward_with_state(x)[0])
        stored[recompute] = nbytes
        out.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert stored[True] * 4 < stored[False], stored
    with torch.no_grad():  # no gradients: nothing to recompute, the plain path runs
        _, nbytes = saved_bytes(lambda: layer.forward_with_state(x)[0])
    assert nbytes == 0


@pytest.mark.parametrize("switches", SWITCH_SETS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
@pytest.mark.parametrize("length", [5, 2])  # a full chunk and a piece of one
@pytest.mark.parametrize("snapshot", ["distinct", "current"])
def test_hand_written_chunk_backward_equals_autograd(switches, length, snapshot):
    """`ChunkStep` (the chunk math with its written-out backward) against autograd through the same forward, for
    every input the scan passes: reads, keys, values, gates, snapshot and current weights, anchors; pad positions
    in the write mask; distinct snapshot and current weights (a chunk that a previous call began), or the snapshot
    passed as None because it is the current weights (autograd's reference gets them twice)."""
    from hope_hf.memory_chunk import ChunkStep, chunk_forward

    layer = make_layer(chunk_size=5, **switches)
    spec = layer.chunk_spec
    H, d, n, m = 2, 4, layer.num_memories, layer.memory_dim
    gen = torch.Generator().manual_seed(3)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).requires_grad_()

    q, k, v = (rand(3, H, length, d) for _ in range(3))
    eta = (torch.rand(3, H, length, n, dtype=torch.float64, generator=gen) * 0.8).requires_grad_()  # one per memory
    log_alpha = (-torch.rand(3, H, length, dtype=torch.float64, generator=gen)).requires_grad_()
    write = torch.ones(3, 1, length, dtype=torch.float64)
    write[1, 0, 0] = 0  # a pad position
    first = n * m if spec.depth == 2 else 0  # linear memories: an empty first layer
    snap_a, cur_a = rand(3, H, d, first, scale=0.5), rand(3, H, d, first, scale=0.5)
    snap_b, cur_b = rand(3, H, n, m, d, scale=0.5), rand(3, H, n, m, d, scale=0.5)
    anchors = ((rand(H, d, first, scale=0.5) if first else None), rand(H, n, m, d, scale=0.5)) \
        if spec.retain_toward_init else (None, None)
    if snapshot == "current":
        snap_a, snap_b = cur_a, cur_b
    inputs = (q, k, v, eta, log_alpha, write, snap_a, snap_b, cur_a, cur_b, *anchors)
    outputs_ref = chunk_forward(spec, *inputs)
    given = (None, None) if snapshot == "current" else (snap_a, snap_b)
    outputs = ChunkStep.apply(spec, None, q, k, v, eta, log_alpha, write, *given, cur_a, cur_b, *anchors)
    for got, want in zip(outputs, outputs_ref):
        torch.testing.assert_close(got, want, atol=1e-13, rtol=0)
    weights = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in outputs]
    wrt = list({id(t): t for t in inputs if t is not None and t.requires_grad}.values())
    ref = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, outputs_ref)), wrt, allow_unused=True,
                              retain_graph=True)
    got = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, outputs)), wrt, allow_unused=True,
                              retain_graph=True)
    for i, (g, r) in enumerate(zip(got, ref)):
        r = torch.zeros_like(wrt[i]) if r is None else r
        assert g is not None
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-10, msg=lambda msg: f"input {i}: {msg}")
    assert any(float(r.abs().max()) > 0.1 for r in ref if r is not None)
    # only the reads carry a gradient (the weights after the chunk are not used)
    got_o = torch.autograd.grad((weights[0] * outputs[0]).sum(), wrt, allow_unused=True)
    ref_o = torch.autograd.grad((weights[0] * outputs_ref[0]).sum(), wrt, allow_unused=True)
    for g, r in zip(got_o, ref_o):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, atol=1e-11, rtol=1e-10)


SELF_MODIFYING = [s for s in SWITCH_SETS if s.get("self_modifying", True)]


@pytest.mark.parametrize("switches", SELF_MODIFYING,
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
@pytest.mark.parametrize("length", [5, 2])
@pytest.mark.parametrize("snapshot", ["distinct", "current"])
def test_hand_written_generation_backward_equals_autograd(switches, length, snapshot):
    """`ChunkStep` with the generation inside (a self-modifying chunk: keys, values, gates from the snapshot, and
    its written-out backward `generate_backward`) against autograd through `generate` and `chunk_forward`, for u,
    the reads, the snapshot and current weights, the anchors and every parameter of the generation (static
    projections, readouts, biases), with a pad position, and distinct snapshot and current weights or the snapshot
    passed as None (it is the current weights)."""
    from hope_hf.memory_chunk import ChunkStep, chunk_forward
    from hope_hf.memory_generate import generate

    layer = make_layer(chunk_size=5, **switches)
    spec, gen_spec = layer.chunk_spec, layer._generate_spec
    H, d, n, m = 2, 4, layer.num_memories, layer.memory_dim
    gen = torch.Generator().manual_seed(4)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).requires_grad_()

    q, u = rand(3, H, length, d), rand(3, H, length, 2 * d)  # u: the key and value streams side by side
    write = torch.ones(3, 1, length, dtype=torch.float64)
    write[2, 0, -1] = 0
    first = n * m if spec.depth == 2 else 0  # linear memories: an empty first layer
    snap_a, cur_a = rand(3, H, d, first, scale=0.5), rand(3, H, d, first, scale=0.5)
    snap_b, cur_b = rand(3, H, n, m, d, scale=0.5), rand(3, H, n, m, d, scale=0.5)
    anchors = ((rand(H, d, first, scale=0.5) if first else None), rand(H, n, m, d, scale=0.5)) \
        if spec.retain_toward_init else (None, None)
    params = [None if p is None else p.detach().clone().requires_grad_() for p in layer._generate_parameters()]
    if snapshot == "current":
        snap_a, snap_b = cur_a, cur_b
    weights_in = (write, snap_a, snap_b, cur_a, cur_b, *anchors)

    k, v, eta, log_alpha = generate(gen_spec, u, snap_a, snap_b, *params)
    outputs_ref = chunk_forward(spec, q, k, v, eta, log_alpha, *weights_in)
    given = (None, None) if snapshot == "current" else (snap_a, snap_b)
    outputs = ChunkStep.apply(spec, gen_spec, q, u, write, *given, cur_a, cur_b, *anchors, *params)
    for got, want in zip(outputs, outputs_ref):
        torch.testing.assert_close(got, want, atol=1e-13, rtol=0)
    weights = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in outputs]
    wrt = list({id(t): t for t in (q, u, *weights_in, *params)
                if t is not None and t.requires_grad and t.numel()}.values())  # (linear memories: an empty A)
    ref = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, outputs_ref)), wrt, allow_unused=True)
    got = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, outputs)), wrt, allow_unused=True)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g is not None and r is not None, i
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-10, msg=lambda msg: f"input {i}: {msg}")
    assert all(float(r.abs().max()) > 1e-3 for r in ref), [float(r.abs().max()) for r in ref]

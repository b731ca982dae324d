"""The chunk step: `chunk_forward` / `chunk_backward` for either memory depth, the self-modifying chunk (generation
inside the step), their compiled versions, and `ChunkStep`, the autograd Function the scan calls."""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_map

from .memory_chunk_linear import linear_chunk_backward, linear_chunk_forward
from .memory_chunk_mlp import mlp_chunk_backward, mlp_chunk_forward
from .memory_common import ChunkSpec, GenerateSpec, snapshot_weights
from .memory_generate import generate, generate_backward


def chunk_forward(spec: ChunkSpec, *inputs, keep: bool = False):
    """One chunk of the memory rule for all memories and heads: `mlp_chunk_forward` (residual MLP memories,
    `spec.depth` 2) or `linear_chunk_forward` (linear memories, depth 1); see those for the arguments."""
    return (mlp_chunk_forward if spec.depth == 2 else linear_chunk_forward)(spec, *inputs, keep=keep)


def chunk_backward(spec: ChunkSpec, inputs, t, d_o, d_a_end, d_b_end):
    """The written-out backward of `chunk_forward`: `mlp_chunk_backward` or `linear_chunk_backward`."""
    return (mlp_chunk_backward if spec.depth == 2 else linear_chunk_backward)(spec, inputs, t, d_o, d_a_end, d_b_end)


def generated_chunk_forward(spec: ChunkSpec, gen_spec: GenerateSpec, q, u, write, snap_a, snap_b, cur_a, cur_b,
                            anchor_a, anchor_b, *params):
    """A self-modifying chunk: `generate` from the snapshot, then `chunk_forward`, keeping both's intermediates."""
    _, gen_a, gen_b = snapshot_weights(snap_a, snap_b, cur_a, cur_b)
    k, v, eta, log_alpha, gen_saved = generate(gen_spec, u, gen_a, gen_b, *params, keep=True)
    o, a_end, b_end, saved = chunk_forward(spec, q, k, v, eta, log_alpha, write, snap_a, snap_b, cur_a, cur_b,
                                           anchor_a, anchor_b, keep=True)
    saved.update({"gen_" + name: t for name, t in gen_saved.items()}, gen_eta=eta, gen_log_alpha=log_alpha)
    return o, a_end, b_end, saved


def generated_chunk_backward(spec: ChunkSpec, gen_spec: GenerateSpec, inputs, t, d_o, d_a_end, d_b_end):
    """The backward of `generated_chunk_forward`: `chunk_backward`, then `generate_backward`, whose snapshot
    gradients accumulate into the chunk's. Returns the gradients of its inputs after the specs (None for write)."""
    q, u, write, snap_a, snap_b, cur_a, cur_b, anchor_a, anchor_b, *params = inputs
    chunk_inputs = (q, t["gen_k"], t["gen_v"], t["gen_eta"], t["gen_log_alpha"], write, snap_a, snap_b, cur_a, cur_b,
                    anchor_a, anchor_b)
    d_q, d_k, d_v, d_eta, d_log_alpha, d_snap_a, d_snap_b, d_cur_a, d_cur_b, *rest = chunk_backward(
        spec, chunk_inputs, t, d_o, d_a_end, d_b_end)
    gen_saved = {name[4:]: value for name, value in t.items() if name.startswith("gen_")}
    # a snapshot that is the current weights: their gradients take the generation's
    same, gen_a, gen_b = snapshot_weights(snap_a, snap_b, cur_a, cur_b)
    d_u, d_params = generate_backward(gen_spec, u, gen_a, gen_b, params, gen_saved, d_k, d_v, d_eta, d_log_alpha,
                                      d_cur_a if same else d_snap_a, d_cur_b if same else d_snap_b)
    return (d_q, d_u, None, d_snap_a, d_snap_b, d_cur_a, d_cur_b, *rest, *d_params)


@functools.cache
def chunk_functions(spec: ChunkSpec, gen_spec: GenerateSpec | None = None):
    """The forward (keeping its intermediates) and backward of `ChunkStep` for `spec`: `chunk_forward` and
    `chunk_backward`, or with `gen_spec` their self-modifying versions (the generation included), compiled by
    `torch.compile` (Inductor, whole graphs) if `spec.compiled`. One pair per spec, shared by every layer with that
    spec, so that equal layers share the compiled code instead of recompiling it."""

    def forward(*inputs):
        if gen_spec is not None:
            return generated_chunk_forward(spec, gen_spec, *inputs)
        return chunk_forward(spec, *inputs, keep=True)

    def backward(inputs, saved, d_o, d_a_end, d_b_end):
        if gen_spec is not None:
            return generated_chunk_backward(spec, gen_spec, inputs, saved, d_o, d_a_end, d_b_end)
        grads = chunk_backward(spec, inputs, saved, d_o, d_a_end, d_b_end)
        return grads[:5] + (None,) + grads[5:]  # none for the write mask

    if not spec.compiled:
        return forward, backward
    forward, backward = torch.compile(forward, fullgraph=True), torch.compile(backward, fullgraph=True)

    def detached(fn):  # one compiled graph whatever the inputs' requires_grad and identities (no autograd inside)
        return lambda *args: fn(*tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, args))

    return detached(forward), detached(backward)


class ChunkStep(torch.autograd.Function):
    """`chunk_forward` with `chunk_backward` as its backward; with a `GenerateSpec`, a self-modifying chunk: the
    keys, values and gates generated from the snapshot inside the step (`generated_chunk_forward`, inputs
    `q, u, write, ...` and the generation's parameters instead of `q, k, v, eta, log_alpha, write, ...`), so that
    the generation's snapshot gradients accumulate into the chunk's. It keeps the chunk's inputs and the
    intermediates that the forward computes anyway (no weight-sized copies), without autograd's graph of ~130 nodes
    per chunk; under `recompute_memory_states` the first pass runs without gradients (nothing kept) and the pass that
    backward repeats keeps them for one segment at a time."""

    @staticmethod
    def forward(ctx, spec, gen_spec, *inputs):
        forward, ctx.chunk_backward = chunk_functions(spec, gen_spec)
        o, a_end, b_end, saved = forward(*inputs)
        ctx.names, ctx.num_inputs = list(saved), len(inputs)
        ctx.save_for_backward(*inputs, *saved.values())
        return o, a_end, b_end

    @staticmethod
    @once_differentiable
    def backward(ctx, d_o, d_a_end, d_b_end):
        tensors = ctx.saved_tensors
        inputs, saved = tensors[: ctx.num_inputs], dict(zip(ctx.names, tensors[ctx.num_inputs :]))
        return (None, None, *ctx.chunk_backward(inputs, saved, d_o, d_a_end, d_b_end))  # none for the specs

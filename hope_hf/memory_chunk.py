"""The chunk step: `chunk_forward` / `chunk_backward` for either memory depth, the self-modifying chunk (generation
inside the step), their compiled versions, `ChunkStep`, the autograd Function the scan calls, and the dispatch to the
fused Triton kernels (`fused_chunk_step`)."""

from __future__ import annotations

import functools
import importlib
from typing import NamedTuple, Union

import torch
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .memory_chunk_linear import LinearSaved, linear_chunk_backward, linear_chunk_forward
from .memory_chunk_mlp import MlpSaved, mlp_chunk_backward, mlp_chunk_forward
from .memory_common import ChunkSpec, GenerateSpec
from .memory_generate import GenerateSaved, generate, generate_backward


def chunk_forward(spec: ChunkSpec, *inputs, keep: bool = False):
    """One chunk of the memory rule for all memories and heads: `mlp_chunk_forward` (residual MLP memories,
    `spec.depth` 2) or `linear_chunk_forward` (linear memories, depth 1); inputs as `ChunkInputs`."""
    return (mlp_chunk_forward if spec.depth == 2 else linear_chunk_forward)(spec, *inputs, keep=keep)


def chunk_backward(spec: ChunkSpec, inputs, saved, d_o, d_end_in, d_end_out):
    """The written-out backward of `chunk_forward`: `mlp_chunk_backward` or `linear_chunk_backward`."""
    backward = mlp_chunk_backward if spec.depth == 2 else linear_chunk_backward
    return backward(spec, inputs, saved, d_o, d_end_in, d_end_out)


class GeneratedSaved(NamedTuple):
    """What the backward of a self-modifying chunk reads: the chunk's intermediates, the generation's, and the
    generated keys, values and gates (the chunk's inputs)."""

    chunk: Union[MlpSaved, LinearSaved]
    generation: GenerateSaved
    eta: torch.Tensor
    log_alpha: torch.Tensor


def generated_chunk_forward(spec: ChunkSpec, gen_spec: GenerateSpec, q, u, write, snapshot_in, snapshot_out,
                            current_in, current_out, anchor_in, anchor_out, *params):
    """A self-modifying chunk: `generate` from the snapshot (None: the current weights), then `chunk_forward`,
    keeping both's intermediates (`GeneratedSaved`)."""
    same = snapshot_in is None
    k, v, eta, log_alpha, gen_saved = generate(gen_spec, u, current_in if same else snapshot_in,
                                               current_out if same else snapshot_out, *params, keep=True)
    o, end_in, end_out, saved = chunk_forward(spec, q, k, v, eta, log_alpha, write, snapshot_in, snapshot_out,
                                              current_in, current_out, anchor_in, anchor_out, keep=True)
    return o, end_in, end_out, GeneratedSaved(saved, gen_saved, eta, log_alpha)


def generated_chunk_backward(spec: ChunkSpec, gen_spec: GenerateSpec, inputs, t: GeneratedSaved, d_o, d_end_in,
                             d_end_out):
    """The backward of `generated_chunk_forward`: `chunk_backward`, then `generate_backward`, whose snapshot
    gradients accumulate into the chunk's. Returns the gradients of its inputs after the specs (None for write)."""
    q, u, write, snapshot_in, snapshot_out, current_in, current_out, anchor_in, anchor_out, *params = inputs
    chunk_inputs = (q, t.generation.k, t.generation.v, t.eta, t.log_alpha, write, snapshot_in, snapshot_out,
                    current_in, current_out, anchor_in, anchor_out)
    d_q, d_k, d_v, d_eta, d_log_alpha, d_snapshot_in, d_snapshot_out, d_current_in, d_current_out, *rest = \
        chunk_backward(spec, chunk_inputs, t.chunk, d_o, d_end_in, d_end_out)
    # a snapshot that is the current weights: their gradients take the generation's
    same = snapshot_in is None
    d_u, d_params = generate_backward(
        gen_spec, u, current_in if same else snapshot_in, current_out if same else snapshot_out, params, t.generation,
        d_k, d_v, d_eta, d_log_alpha, d_current_in if same else d_snapshot_in,
        d_current_out if same else d_snapshot_out)
    return (d_q, d_u, None, d_snapshot_in, d_snapshot_out, d_current_in, d_current_out, *rest, *d_params)


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

    def backward(inputs, saved, d_o, d_end_in, d_end_out):
        if gen_spec is not None:
            return generated_chunk_backward(spec, gen_spec, inputs, saved, d_o, d_end_in, d_end_out)
        grads = chunk_backward(spec, inputs, saved, d_o, d_end_in, d_end_out)
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
    the generation's snapshot gradients accumulate into the chunk's. Tensors in, tensors out. It keeps the chunk's
    inputs and the intermediates that the forward computes anyway (no weight-sized copies), without autograd's
    graph of ~130 nodes per chunk; under `recompute_memory_states` the first pass runs without gradients (nothing
    kept) and the pass that backward repeats keeps them for one segment at a time."""

    @staticmethod
    def forward(ctx, spec, gen_spec, *inputs):
        forward, ctx.chunk_backward = chunk_functions(spec, gen_spec)
        o, end_in, end_out, saved = forward(*inputs)
        flat, ctx.saved_spec = tree_flatten(saved)
        ctx.num_inputs = len(inputs)
        ctx.save_for_backward(*inputs, *flat)
        return o, end_in, end_out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_o, d_end_in, d_end_out):
        tensors = ctx.saved_tensors
        inputs = tensors[: ctx.num_inputs]
        saved = tree_unflatten(list(tensors[ctx.num_inputs :]), ctx.saved_spec)
        return (None, None, *ctx.chunk_backward(inputs, saved, d_o, d_end_in, d_end_out))  # none for the specs


# The fused kernels live outside the model files' imports (they import triton, which Hub remote code must not need):
# loaded by name from the installed package.
KERNELS_MODULE = "hope_hf.memory_triton"


@functools.cache
def _kernels_module():
    try:
        return importlib.import_module(KERNELS_MODULE)
    except ImportError:  # no triton, or no installed hope_hf (Hub remote code)
        return None


def fused_chunk_step(spec: ChunkSpec, *tensors):
    """The fused Triton chunk step where `spec.kernels` asks for it and it applies, else None (the torch path):
    `memory_triton.chunk_step` where no tensor needs a gradient, `memory_triton.FusedChunkStep.apply` (with its
    backward kernel) where one does; both take `ChunkStep.apply`'s inputs and give its results. It applies to
    linear memories (depth 1) with float32 `tensors` (the step's inputs, None allowed); "auto" runs it on CUDA
    tensors where triton imports, unless the compiled chunk step is on (`spec.compiled`: the measured setting of
    `hope-hf train` on a GPU keeps its speed), "triton" on any device (CPU tensors under Triton's interpreter) and
    raises where triton is missing, "torch" never. Not inside `torch.compile`, which brings its own kernels."""
    if spec.kernels == "torch" or spec.depth != 1 or torch.compiler.is_compiling():
        return None
    given = [t for t in tensors if t is not None]
    if spec.kernels == "auto" and (spec.compiled or not given[0].is_cuda):
        return None
    if any(t.dtype != torch.float32 for t in given):
        return None
    module = _kernels_module()
    if module is None and spec.kernels == "triton":
        raise ImportError(f"memory_kernels='triton' needs the triton package and the installed hope_hf package "
                          f"({KERNELS_MODULE}): pip install 'hope-hf[gpu]', or set memory_kernels to 'auto' or "
                          f"'torch'")
    if module is None:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in given):
        return module.FusedChunkStep.apply
    return module.chunk_step

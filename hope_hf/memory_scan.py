"""The memory scan: the chunk steps over a frame's chunks (paper Eq. 90-91), run in recomputed segments when
`recompute_memory_states` is on (docs/design.md §6a). Functional: the layer's parameters come in as tensors
(`ScanParams`), so the autograd Functions here and in memory_chunk receive tensors only and nothing reads the module.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .memory_chunk import ChunkStep, fused_chunk_step
from .memory_common import ChunkSpec, GenerateSpec, TitansState
from .memory_generate import generate
from .memory_layout import frame_rows, join_rows


if TYPE_CHECKING:
    from .memory_layout import Layout


class ScanParams(NamedTuple):
    """The layer's parameters that the scan reads, float32 (None where the config has none): the memories' initial
    fast weights W_0 (a fresh sequence's start, and the anchors of retention) and the generation's readouts and
    biases (in `generate`'s order). Named as `_FastInit`'s parameters."""

    init_in: torch.Tensor | None  # (H, d, n*m); None for linear memories
    init_out: torch.Tensor  # (H, n, m, d)
    eta_readout: torch.Tensor
    eta_bias: torch.Tensor
    alpha_readout: torch.Tensor | None
    alpha_bias: torch.Tensor | None

    def anchors(self, spec: ChunkSpec):
        """(anchor_in, anchor_out): the initial state with retention toward it, (None, None) without."""
        return (self.init_in, self.init_out) if spec.retain_toward_init else (None, None)

    def generation(self):
        """`generate`'s parameters, in its order."""
        return self.eta_readout, self.eta_bias, self.alpha_readout, self.alpha_bias


class ScanCarry(NamedTuple):
    """What the scan carries from chunk to chunk: the snapshot (None where it is the current weights: after a
    complete chunk), the current weights, and the snapshot that each frame row used in its last chunk."""

    snapshot_in: torch.Tensor | None
    snapshot_out: torch.Tensor | None
    current_in: torch.Tensor
    current_out: torch.Tensor
    last_in: torch.Tensor
    last_out: torch.Tensor


def memory_scan(spec: ChunkSpec, gen_spec: GenerateSpec, q, u, write, start: TitansState, layout: "Layout",
                params: ScanParams, recompute: bool):
    """Chunk-parallel scan over the frame: a loop over chunks, never over tokens.

    q, u: (R, H, L, d) and (R, H, L, 2d) float32; write: (R, 1, L) float (1 = real token); `start` the frame's start
    state, whose snapshot is the current weights where both are one tensor. Returns the per-token reads
    o (R, H, L, d) and the final frame state (snapshot_in, snapshot_out, current_in, current_out).

    With `recompute` and gradients on, the chunks run in about sqrt(#chunks) segments (`RecomputedSegment`): the
    forward runs a segment without recording anything, backward keeps the fast weights only at segment boundaries
    and re-runs a segment with gradients when it reaches it (numerically the same result).
    """
    sizes = [hi - lo for lo, hi in layout.chunk_bounds]
    # split once (not a slice per chunk: the backward of a slice zero-fills the whole input every time)
    q_chunks, write_chunks = q.split(sizes, dim=2), write.split(sizes, dim=-1)
    if spec.self_modifying:
        src_chunks = u.split(sizes, dim=2)
    else:  # keys, values and gates do not depend on the memories: compute them once
        generated = generate(gen_spec, u, None, None, *params.generation())
        src_chunks = list(zip(*(t.split(sizes, dim=2) for t in generated)))
    chunks = list(zip(q_chunks, src_chunks, write_chunks))
    chunk_step = fused_chunk_step(spec, q, u, start.current_out, start.snapshot_out, *params) or ChunkStep.apply
    same = start.snapshot_in is start.current_in and start.snapshot_out is start.current_out
    carry = ScanCarry(None if same else start.snapshot_in, None if same else start.snapshot_out, start.current_in,
                      start.current_out, start.snapshot_in, start.snapshot_out)
    recompute = recompute and torch.is_grad_enabled() and len(chunks) > 1
    step = math.ceil(math.sqrt(len(chunks))) if recompute else len(chunks)
    outs = []
    for first in range(0, len(chunks), step):
        segment = chunks[first : first + step]
        if recompute:
            o_seg, carry = RecomputedSegment.run(spec, gen_spec, params, first, segment, carry, layout, chunk_step)
        else:
            o_seg, carry = scan_chunks(spec, gen_spec, params, first, segment, carry, layout, chunk_step)
        outs.append(o_seg)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    full = (layout.end_pos == 0).view(-1, 1, 1, 1)
    final = (
        torch.where(full, carry.current_in, carry.last_in),
        torch.where(full.unsqueeze(-1), carry.current_out, carry.last_out),
        carry.current_in,
        carry.current_out,
    )
    return o, final


def scan_chunks(spec: ChunkSpec, gen_spec: GenerateSpec, params: ScanParams, first: int, chunks, carry: ScanCarry,
                layout: "Layout", step=ChunkStep.apply):
    """Chunks `first, first + 1, ...` (each `(q, u or the generated k, v, eta, log_alpha, write)`) from `carry`;
    returns their reads and the new carry. `step`: the chunk step (`ChunkStep.apply`, or the fused kernels'
    `memory_chunk.fused_chunk_step`).

    Only the rows that hold tokens in a chunk are computed (the frame's rows are ordered so that they are a prefix,
    `Layout.rows_with_tokens`): a finished row's weights are set aside as they are, so that a packed row's short
    documents or a padded batch's short rows cost their own chunks, not the longest row's. A compiled chunk step
    computes every row (one shape: no recompilation)."""
    snapshot_in, snapshot_out, current_in, current_out, last_in, last_out = carry
    rows = current_in.shape[0]
    with_tokens = layout.rows_with_tokens  # rows with tokens in chunk c (those after them ended before c)
    computed = (lambda c: rows) if layout.trivial or spec.compiled else with_tokens  # noqa: E731
    anchors = params.anchors(spec)
    set_aside = []  # the current weights (in, out) of rows that finished, highest rows first
    records = []  # the snapshot (in, out) that rows used in their last chunk, highest rows first
    outs = []
    for c, (q_c, src, write_c) in enumerate(chunks, start=first):
        n = computed(c)
        if n < current_in.shape[0]:
            set_aside.append((current_in[n:], current_out[n:]))
            current_in, current_out = current_in[:n], current_out[:n]
            if snapshot_in is not None:
                snapshot_in, snapshot_out = snapshot_in[:n], snapshot_out[:n]
        part = (lambda t: t[:n]) if n < rows else (lambda t: t)  # noqa: E731
        weights = (part(write_c), snapshot_in, snapshot_out, current_in, current_out, *anchors)
        if spec.self_modifying:  # keys, values and gates generated inside the step
            o_c, end_in, end_out = step(spec, gen_spec, part(q_c), part(src), *weights, *params.generation())
        else:
            o_c, end_in, end_out = step(spec, None, part(q_c), *map(part, src), *weights)
        if n < rows:  # the finished rows hold no token here: they read nothing
            o_c = torch.cat([o_c, o_c.new_zeros((rows - n, *o_c.shape[1:]))])
        outs.append(o_c)
        # the rows whose last (possibly partial) chunk this is: remember the snapshot it used
        lo, hi = with_tokens(c + 1), with_tokens(c)
        if lo < hi:
            used_in, used_out = (current_in, current_out) if snapshot_in is None else (snapshot_in, snapshot_out)
            records.append((frame_rows(used_in, lo, hi), frame_rows(used_out, lo, hi)))
        current_in, current_out = end_in, end_out
        snapshot_in = snapshot_out = None  # the chunk is complete: its end is the next snapshot
    current_in = join_rows([current_in, *(w_in for w_in, _ in reversed(set_aside))])
    current_out = join_rows([current_out, *(w_out for _, w_out in reversed(set_aside))])
    # rows that end later keep their entry, those that ended in these chunks get theirs, earlier ones keep theirs
    lo, hi = with_tokens(first + len(chunks)), with_tokens(first)
    last_in = join_rows([frame_rows(last_in, 0, lo), *(w_in for w_in, _ in reversed(records)),
                         frame_rows(last_in, hi, rows)])
    last_out = join_rows([frame_rows(last_out, 0, lo), *(w_out for _, w_out in reversed(records)),
                          frame_rows(last_out, hi, rows)])
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return o, ScanCarry(None, None, current_in, current_out, last_in, last_out)


class RecomputedSegment(torch.autograd.Function):
    """Activation checkpointing of a run of chunks, specialised to the scan: the forward runs `scan_chunks` under
    `no_grad` (no graph, nothing stored but the segment's inputs); backward re-runs it with gradients and
    differentiates it with `torch.autograd.grad`, returning the gradients of its inputs, the `ScanParams` among
    them (so that the engine accumulates them into the parameters like any other gradient)."""

    @staticmethod
    def run(spec: ChunkSpec, gen_spec: GenerateSpec, params: ScanParams, first: int, segment, carry: ScanCarry,
            layout: "Layout", step=ChunkStep.apply):
        flat, tree = tree_flatten((params, segment, carry))
        o, current_in, current_out, last_in, last_out = RecomputedSegment.apply(spec, gen_spec, (first, step), layout,
                                                                                tree, *flat)
        return o, ScanCarry(None, None, current_in, current_out, last_in, last_out)  # ends on a complete chunk

    @staticmethod
    def _scan(spec, gen_spec, first_and_step, layout, tree, flat):
        params, segment, carry = tree_unflatten(list(flat), tree)
        first, step = first_and_step  # the segment's first chunk, and the chunk step (`scan_chunks`)
        o, end = scan_chunks(spec, gen_spec, params, first, segment, carry, layout, step)
        return o, end.current_in, end.current_out, end.last_in, end.last_out

    @staticmethod
    def forward(ctx, spec, gen_spec, first_and_step, layout, tree, *flat):
        ctx.args = spec, gen_spec, first_and_step, layout, tree
        # which input each one repeats (the current weights and each row's last snapshot are one tensor at a scan's
        # start), so that the recomputation sees the same aliasing as this pass
        first_of = {}
        ctx.alias = [i if t is None else first_of.setdefault(id(t), i) for i, t in enumerate(flat)]
        ctx.save_for_backward(*flat)
        with torch.no_grad():
            outputs = RecomputedSegment._scan(*ctx.args, flat)
        # an output that is one of the inputs (a row's last snapshot set before this segment) must be a new tensor
        ids = {id(t) for t in flat if t is not None}
        return tuple(t.clone() if id(t) in ids else t for t in outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        flat = []
        for i, t in enumerate(ctx.saved_tensors):
            if ctx.alias[i] != i:
                flat.append(flat[ctx.alias[i]])
            else:
                flat.append(None if t is None else t.detach().requires_grad_(t.requires_grad))
        with torch.enable_grad():
            outputs = RecomputedSegment._scan(*ctx.args, flat)
        # a repeated input gets its gradient once (autograd sums over the places it was passed)
        wanted = [i for i, t in enumerate(flat) if t is not None and t.requires_grad and ctx.alias[i] == i]
        pairs = [(out, g) for out, g in zip(outputs, grad_outputs) if g is not None and out.requires_grad]
        grads = [None] * len(flat)
        if wanted and pairs:
            found = torch.autograd.grad([out for out, _ in pairs], [flat[i] for i in wanted], [g for _, g in pairs],
                                        allow_unused=True)
            for i, g in zip(wanted, found):
                grads[i] = g
        return (None, None, None, None, None, *grads)

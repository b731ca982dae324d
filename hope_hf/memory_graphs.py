"""CUDA graphs of a Titans layer's memory scan and decoding step (`memory_cuda_graphs`): capture, replay and the
bookkeeping that keeps them correct."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch.autograd.function import once_differentiable
from transformers.utils import logging

from .memory_common import TitansState


if TYPE_CHECKING:
    from .memory_hope import HopeSelfModifyingTitans
    from .memory_layout import Layout

logger = logging.get_logger(__name__)


def warm_up(step):
    """Run `step` twice on a side stream before a capture (cuBLAS handles, the allocator), as the CUDA graph docs
    prescribe."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


class ScanGraph:
    """One layer's memory scan of fresh sequences (`_fresh_scan`) captured as CUDA graphs for one input shape
    (`capture`): for training its forward and its backward, for a pass without gradients (`inference`: evaluation)
    its forward alone. An eager step on a GPU is launch-bound (hundreds of small kernels per chunk and layer;
    docs/performance.md); a replay launches the whole scan at once. Inputs are copied into the captured buffers and
    results copied out, so nothing a caller holds is ever overwritten by a later replay."""

    def __init__(self, layer: "HopeSelfModifyingTitans", q, u, layout: "Layout", inference: bool = False):
        # weakly: the layer holds this graph (a cycle would keep the graphs' memory until a garbage collection)
        self.layer = weakref.ref(layer)
        self.layout = layout  # the captured kernels read its tensors: keep them alive
        self.inference = inference
        named = [(name, p) for name, p in layer.fast_init.named_parameters() if inference or p.requires_grad]
        self.param_ptrs = [p.data_ptr() for _, p in named]  # the storage the graphs read
        # The graphs read the parameters' storage through aliases: leaves of their own, whose gradient accumulators
        # are not those of the running training step (made on another stream, they make the capture fail). The
        # scan takes them as its parameters (`scan_params`): the layer's own stay as they are.
        self.aliases = {name: p.detach().requires_grad_(not inference) for name, p in named}
        self.alias_of = {id(p): self.aliases[name] for name, p in named}
        self.q = q.detach().clone().requires_grad_(q.requires_grad and not inference)
        self.u = u.detach().clone().requires_grad_(u.requires_grad and not inference)
        self.needs_grad = [t.requires_grad for t in (self.q, self.u, *self.aliases.values())]
        self.pending = None  # weak reference to the token of the replay whose backward has not run yet

    def forward(self):
        """The computation the forward graph holds: reads and final state from the captured inputs."""
        layer = self.layer()
        return layer._fresh_scan(self.q, self.u, self.layout, layer.scan_params(self.alias_of))

    def backward(self, outputs, grad_outputs):
        """The computation the backward graph holds: gradients of q, u and the parameters (None where not needed)."""
        wrt = [t for t in (self.q, self.u, *self.aliases.values()) if t.requires_grad]
        found = iter(torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True))
        return [next(found) if needed else None for needed in self.needs_grad]

    @staticmethod
    def zero_grad_outputs(outputs):
        """Buffers for the gradients of (reads, final state), the reads' in the layout in which `forward_with_state`
        hands them back ((R, L, H, d) memory, from its transpose): the compiled chunk step then sees the strides of
        the eager step and reuses its code."""
        o, *final = outputs
        reads = torch.zeros_like(o.transpose(1, 2), memory_format=torch.contiguous_format).transpose(1, 2)
        return [reads, *(torch.zeros_like(t) for t in final)]

    def capture(self) -> "ScanGraph":
        """Record `forward` and (unless `inference`) `backward` into graphs of one memory pool, after a warm-up, on
        the inputs' device (a model split over GPUs has layers on devices other than the current one)."""
        with torch.cuda.device(self.q.device):
            return self._record()

    def _record(self) -> "ScanGraph":
        def step():  # nothing of the warm-up may outlive it: its gradient accumulators belong to the side stream
            with torch.set_grad_enabled(not self.inference):
                outputs = self.forward()
                if not self.inference:
                    self.backward(outputs, self.zero_grad_outputs(outputs))

        warm_up(step)
        pool = torch.cuda.graph_pool_handle()
        self.forward_graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may use CUDA meanwhile
        with torch.set_grad_enabled(not self.inference), \
                torch.cuda.graph(self.forward_graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = self.forward()
        if not self.inference:
            self.backward_graph = torch.cuda.CUDAGraph()
            self.grad_outputs = self.zero_grad_outputs(self.outputs)
            with torch.cuda.graph(self.backward_graph, pool=pool, capture_error_mode="thread_local"):
                self.grads = self.backward(self.outputs, self.grad_outputs)
        # the buffers alone: the capture's autograd graph would keep the layer (a cycle) and its memory alive
        self.outputs = tuple(t.detach() for t in self.outputs)
        return self

    def replay(self, q, u):
        """A pass without gradients (`inference` graphs): q, u in, replay, copies of the reads and final state out."""
        self.q.copy_(q)
        self.u.copy_(u)
        self.forward_graph.replay()
        return tuple(t.clone() for t in self.outputs)

    def busy(self) -> bool:
        """A replay's backward is still to come (its autograd graph is alive): another replay would overwrite the
        activations that backward reads."""
        return self.pending is not None and self.pending() is not None


class TokenGraph:
    """One layer's decoding step (`_token_step`) for one batch shape, captured as a CUDA graph: eagerly, a token
    launches some hundred small kernels per Titans layer. A replay copies the token's hidden states, masks and the
    layer's state into the captured buffers and copies the output and the new state out (the state is replaced,
    never updated in place, as in the eager step: a cache that a caller holds stays as it was)."""

    def __init__(self, layer: "HopeSelfModifyingTitans", hidden_states, real, start, state: TitansState):
        self.layer = weakref.ref(layer)  # weakly, as `ScanGraph`
        self.names = list(state.tensors())
        self.inputs = [t.detach().clone() for t in (hidden_states, real, *state.tensors().values())]
        self.start = None if start is None else start.detach().clone()

    def run(self):
        """The computation the graph holds: the output and the new state's tensors from the captured inputs."""
        hidden_states, real, *tensors = self.inputs
        out, state = self.layer()._token_step(hidden_states, real, self.start,
                                              TitansState(**dict(zip(self.names, tensors))))
        return (out, *state.tensors().values())

    def capture(self) -> "TokenGraph":
        """Record `run` into the graph after a warm-up on a side stream, on the inputs' device (as `ScanGraph`)."""
        with torch.cuda.device(self.inputs[0].device):
            return self._record()

    def _record(self) -> "TokenGraph":
        warm_up(self.run)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = self.run()
        return self

    def replay(self, hidden_states, real, start, state: TitansState) -> tuple[torch.Tensor, TitansState]:
        """`_token_step(hidden_states, real, start, state)` from the graph: inputs in, replay, copies out."""
        for buffer, t in zip(self.inputs, (hidden_states, real, *state.tensors().values())):
            buffer.copy_(t)
        if start is not None:
            self.start.copy_(start)
        self.graph.replay()
        out, *tensors = (t.clone() for t in self.outputs)
        return out, TitansState(**dict(zip(self.names, tensors)))


def under_checkpointing() -> bool:
    """Saved-tensor hooks are on (non-reentrant activation checkpointing, Transformers' default, or offloading) or
    a backward pass is running (reentrant checkpointing's recomputation). The scan then runs eagerly: the
    checkpointed pass and its recomputation must save the same tensors (a replay saves none), and no graph is
    captured from inside the autograd engine."""
    try:  # private functions of torch: where they are missing or changed, assume the worst
        return (torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
                or torch._C._current_graph_task_id() != -1)
    except (AttributeError, TypeError, RuntimeError):
        return True


class Pending:
    """Lives exactly as long as the autograd graph of one replay (kept by its context)."""


class GraphedScan(torch.autograd.Function):
    """Replays a `ScanGraph`: forward copies q, u in and the reads and final state out; backward copies the output
    gradients in and the input and parameter gradients out."""

    @staticmethod
    def forward(ctx, graph: ScanGraph, q, u, *params):
        graph.q.copy_(q)
        graph.u.copy_(u)
        graph.forward_graph.replay()
        ctx.graph, ctx.pending, ctx.params = graph, Pending(), params
        graph.pending = weakref.ref(ctx.pending)
        return tuple(t.clone() for t in graph.outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        graph = ctx.graph
        # A replay happens only while no earlier one awaits its backward (`busy`), so a context whose backward has
        # run (pending None) is the only one whose buffers a later forward may have rewritten.
        if ctx.pending is None:
            raise RuntimeError(
                "memory_cuda_graphs: a backward pass through the Titans memory's CUDA graphs can run once, before the "
                "next forward pass (its activations live in the graphs' buffers); a second backward (retain_graph) "
                "needs memory_cuda_graphs=False"
            )
        if [p.data_ptr() for p in ctx.params] != graph.param_ptrs:
            raise RuntimeError(
                "memory_cuda_graphs: the Titans memory's parameters moved to other storage between the forward and "
                "the backward pass (parameter sharding such as FSDP or DeepSpeed ZeRO-3 does this), so the captured "
                "backward would read stale memory; set memory_cuda_graphs=False for such training"
            )
        for buffer, grad in zip(graph.grad_outputs, grad_outputs):
            buffer.copy_(grad)
        graph.backward_graph.replay()
        graph.pending = ctx.pending = None
        # copies: a parameter's gradient is kept (`.grad`) and the next replay rewrites the captured buffers
        return (None, *(None if g is None else g.clone() for g in graph.grads))


class ScanGraphs:
    """The CUDA graphs of one layer (its scans and its decoding step), by input shape and parameter storage. At most
    `MAX_SHAPES` shapes with gradients and as many of each kind without: a capture costs about 2.6 eager steps, so a
    stream of ever new shapes would run slower than eager; shapes beyond these run eagerly. Without gradients
    (evaluation, the prompt of `generate`) a shape is captured when it comes the second time: an evaluation loop
    repeats its batch shape, while prompts of one-off lengths would pay a capture each for nothing. Decoding steps
    (`TokenGraph`, one token per row, no gradients) likewise, from a batch shape's second token on. Not copied by
    `copy.deepcopy` or pickling: a copy captures its own."""

    MAX_SHAPES = 4

    def __init__(self):
        self.graphs: dict = {}
        self.seen: dict = {}  # shapes without gradients met once, oldest first (the last 4 * MAX_SHAPES)

    def __deepcopy__(self, memo):
        return ScanGraphs()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def get(self, layer: "HopeSelfModifyingTitans", q, u, layout: "Layout") -> ScanGraph | None:
        """The graph for these inputs (captured on first use with gradients, on second use without), or None where
        the eager scan must run: graphs off, not on CUDA, padding or document starts, checkpointing, or the graph's
        previous replay still awaits its backward (two forward passes before one backward)."""
        if not (layer.config.memory_cuda_graphs and q.is_cuda and layout.trivial and layout.pad_front == 0) \
                or under_checkpointing():
            return None
        params = list(layer.fast_init.parameters())
        inference = not (torch.is_grad_enabled()
                         and (q.requires_grad or u.requires_grad or any(p.requires_grad for p in params)))
        if inference:
            # buffers made under inference mode can only be written under it: its graphs are apart
            shape = ("inference", tuple(q.shape), tuple(u.shape), q.dtype, q.device,
                     torch.is_inference_mode_enabled())
            return self._get_without_gradients(shape, layer, lambda: ScanGraph(layer, q, u, layout, inference=True))
        shape = ("training", tuple(q.shape), tuple(u.shape), q.dtype, q.device, layer.config.recompute_memory_states,
                 layer.config.compile_chunk_step, q.requires_grad, u.requires_grad)
        key = (shape, self._storage(layer, with_grad=True))
        graph = self.graphs.get(key)
        if graph is None:
            if not self.admit(key):
                return None
            graph = self.graphs[key] = ScanGraph(layer, q, u, layout).capture()
        return None if graph.busy() else graph

    def get_token(self, layer: "HopeSelfModifyingTitans", hidden_states, real, start, state: TitansState):
        """The decoding step's graph for these inputs (captured on the second use of their shapes), or None where
        the eager step must run: graphs off, not on CUDA, gradients on."""
        if not (layer.config.memory_cuda_graphs and hidden_states.is_cuda) or torch.is_grad_enabled():
            return None
        device = hidden_states.device.type
        shape = ("token", tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device, start is None,
                 torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                 torch.is_inference_mode_enabled(), *((tuple(t.shape), t.dtype) for t in state.tensors().values()))
        return self._get_without_gradients(shape, layer, lambda: TokenGraph(layer, hidden_states, real, start, state))

    @staticmethod
    def _storage(layer, with_grad: bool) -> tuple:
        """Where every parameter of the layer lives (and, for graphs with gradients, which ones require them): a
        graph reads the storage it was captured with. All of the layer's parameters, not only those a scan reads:
        the decoding step reads the projections too, and one list lets graphs of every kind be compared."""
        return tuple((p.data_ptr(), p.requires_grad and with_grad) for p in layer.parameters())

    def _get_without_gradients(self, shape, layer, make):
        """The graph of `shape` (its kind first: "inference" or "token"), made by `make` and captured when the
        shape comes the second time; None before that and beyond `MAX_SHAPES` of its kind."""
        key = (shape, self._storage(layer, with_grad=False))
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen:
                if len(self.seen) >= 4 * self.MAX_SHAPES:  # forget the oldest: one-off prompt lengths pile up
                    del self.seen[next(iter(self.seen))]
                self.seen[key] = None
                return None
            if not self.admit(key):
                return None
            graph = self.graphs[key] = make().capture()
        return graph

    def admit(self, key) -> bool:
        """May a graph be captured for `key` = ((kind, shape...), ((parameter address, requires_grad), ...))? Graphs
        that read other storage than the parameters' present one are dropped first (they can no longer be replayed);
        then a new shape is admitted while fewer than `MAX_SHAPES` of its kind ("training", "inference": a scan
        without gradients, "token": a decoding step) are held."""
        storage = [ptr for ptr, _ in key[1]]
        for old in [k for k in self.graphs if [ptr for ptr, _ in k[1]] != storage]:
            del self.graphs[old]
        kind = key[0][0]
        if sum(k[0][0] == kind for k in self.graphs) < self.MAX_SHAPES:
            return True
        if kind == "training":  # shapes without gradients beyond these run eagerly without a word (prompt lengths)
            logger.warning_once(
                f"memory_cuda_graphs: more than {self.MAX_SHAPES} input shapes for the Titans memory; new shapes run "
                "eagerly (pack or pad the batches to a few fixed lengths to replay graphs for all of them)"
            )
        return False

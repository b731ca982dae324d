"""`memory_cuda_graphs`: the Titans memory scan replayed from CUDA graphs in training gives the eager numbers.

The tests that capture graphs need a CUDA device (skipped elsewhere: `python -m pytest tests/ops/test_cuda_graphs.py`
on a CUDA machine). On a CPU the option must change nothing, and what the graphs hold is checked eagerly.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
from types import SimpleNamespace

import pytest
import torch

from hope_hf import HopeConfig, HopeForCausalLM
from hope_hf import memory_graphs, memory_layout
from hope_hf.memory_hope import HopeSelfModifyingTitans

from conftest import small_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs: needs a CUDA device")


def titans_layers(model):
    return [m for m in model.modules() if isinstance(m, HopeSelfModifyingTitans)]


def twin_models(device, **overrides):
    """The same weights twice: graphs off, graphs on."""
    torch.manual_seed(0)
    eager = HopeForCausalLM(small_config("hybrid", **overrides)).to(device)
    graphed = copy.deepcopy(eager)
    graphed.config.memory_cuda_graphs = True
    assert all(layer.config.memory_cuda_graphs for layer in titans_layers(graphed))
    assert not any(layer.config.memory_cuda_graphs for layer in titans_layers(eager))
    return eager, graphed


def ids_batch(device, batch=2, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 61, (batch, length), generator=g).to(device)


def assert_same_grads(eager, graphed, atol=1e-5):
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(q.grad, p.grad, atol=atol, rtol=1e-4, msg=name)


@pytest.fixture
def count_replays(monkeypatch):
    """How many times the graphed scan ran."""
    calls = []
    original = memory_graphs.GraphedScan.apply

    def apply(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(memory_graphs.GraphedScan, "apply", apply)
    return calls


def test_option_is_validated():
    with pytest.raises(ValueError, match="memory_cuda_graphs"):
        HopeConfig(memory_cuda_graphs="yes")


def test_on_a_cpu_the_option_changes_nothing(count_replays):
    eager, graphed = twin_models("cpu")
    ids = ids_batch("cpu")
    for model in (eager, graphed):
        model(ids, labels=ids).loss.backward()
    assert_same_grads(eager, graphed, atol=0)
    assert count_replays == [] and all(not layer._scan_graphs.graphs for layer in titans_layers(graphed))


def test_activation_checkpointing_is_detected():
    """Under activation checkpointing the scan runs eagerly in both passes: non-reentrant (Transformers' default)
    is seen by its saved-tensor hooks, reentrant's recomputation by the running backward pass (its first pass has no
    gradients, so it is eager anyway)."""
    from torch.utils.checkpoint import checkpoint

    seen = []

    def layer(x):
        seen.append(memory_graphs.under_checkpointing())
        return x.sin()

    x = torch.randn(3, requires_grad=True)
    assert not memory_graphs.under_checkpointing()
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert seen == [True, True]  # the forward and its recomputation
    seen.clear()
    checkpoint(layer, x, use_reentrant=True).sum().backward()
    assert seen == [False, True]  # the forward (no gradients: eager anyway), the recomputation in backward
    with torch.autograd.graph.save_on_cpu():
        assert memory_graphs.under_checkpointing()


def test_graphs_are_kept_for_a_few_shapes_and_dropped_when_the_parameters_move(caplog):
    memory_graphs.logger.warning_once.cache_clear()  # warned at most once per process
    graphs = memory_graphs.ScanGraphs()
    storage = ((1, True), (2, True))
    for length in range(graphs.MAX_SHAPES):
        key = (("training", (2, 4, 16 * (length + 1), 8)), storage)
        assert graphs.admit(key)
        graphs.graphs[key] = object()  # stands for a captured graph
    assert not graphs.admit((("training", (2, 4, 999, 8)), storage))  # one shape too many: eager, with a warning
    assert "new shapes run eagerly" in caplog.text
    assert len(graphs.graphs) == graphs.MAX_SHAPES
    # parameters moved: the old graphs are useless
    assert graphs.admit((("training", (2, 4, 16, 8)), ((3, True), (4, True))))
    assert graphs.graphs == {}


class RecordedGraph:
    """Stands for `_ScanGraph` in `_ScanGraphs.get`: records the capture instead of making CUDA graphs."""

    def __init__(self, layer, q, u, layout, inference=False):
        self.inference = inference

    def capture(self):
        return self

    def busy(self):
        return False


def cuda_like(length, requires_grad):
    """What `_ScanGraphs.get` reads of q and u, as a CUDA tensor's would read."""
    return SimpleNamespace(shape=(2, 4, length, 8), dtype=torch.float32, device=torch.device("cuda", 0), is_cuda=True,
                           requires_grad=requires_grad)


def test_graphs_without_gradients_come_on_the_second_use_and_apart_from_training(monkeypatch, caplog):
    """Evaluation repeats its batch shape, prompts come in all lengths: a shape without gradients is captured when it
    comes again, such graphs are counted apart from the training graphs (neither evicts the other) and shapes beyond
    the limit run eagerly without a warning; inference mode keeps graphs of its own (its buffers are inference
    tensors)."""
    monkeypatch.setattr(memory_graphs, "ScanGraph", RecordedGraph)
    memory_graphs.logger.warning_once.cache_clear()
    _, graphed = twin_models("cpu")
    layer = titans_layers(graphed)[0]
    graphs = layer._scan_graphs
    real = torch.ones(2, 32, dtype=torch.bool)
    layout = memory_layout.Layout(real, torch.zeros_like(real), torch.zeros(2, dtype=torch.long), 4, 4)

    def get(length, requires_grad=False):
        x = cuda_like(length, requires_grad)
        return graphs.get(layer, x, x, layout)

    training = get(32, requires_grad=True)
    assert training is not None and not training.inference  # with gradients: captured at once
    with torch.no_grad():
        assert get(32) is None  # first use: eager
        evaluation = get(32)
        assert evaluation is not None and evaluation.inference and get(32) is evaluation
        with torch.inference_mode():
            assert get(32) is None and get(32) not in (None, evaluation)
        for length in range(100, 200):  # a hundred one-off prompt lengths, then an evaluation shape
            get(length)
        assert get(64) is None and get(64) is not None  # still captured on its second use
        for length in range(1, 3 * graphs.MAX_SHAPES):  # prompts of many lengths, each twice
            get(length), get(length)
    kinds = [g.inference for g in graphs.graphs.values()]
    assert kinds.count(False) == 1 and kinds.count(True) == graphs.MAX_SHAPES
    assert graphs.graphs[next(iter(graphs.graphs))] is training  # not evicted by the graphs without gradients
    assert "new shapes run eagerly" not in caplog.text
    with torch.no_grad():  # without gradients only because nothing requires them: the same kind
        for p in graphed.parameters():
            p.requires_grad_(False)
        assert get(33) is None and get(33) is None  # beyond the limit
    assert "new shapes run eagerly" not in caplog.text


@pytest.mark.parametrize("overrides", [{}, {"self_modifying": False}], ids=["default", "titans-only"])
def test_the_captured_computation_without_gradients_gives_the_layers_reads(overrides):
    """What an inference graph holds, run eagerly: the scan through detached aliases of all the parameters gives the
    eager layer's reads and final state, and the layer's own parameters are back in place afterwards."""
    layer = HopeSelfModifyingTitans(small_config("linear", **overrides), 0).double()
    layer.init_memory_weights()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 14, 8, generator=g, dtype=torch.float64)
    u = torch.randn(2, 4, 14, 16, generator=g, dtype=torch.float64)  # the key and value streams side by side
    real = torch.ones(2, 14, dtype=torch.bool)
    layout = memory_layout.Layout(real, torch.zeros_like(real), torch.zeros(2, dtype=torch.long), 4, 4)
    graph = memory_graphs.ScanGraph(layer, q, u, layout, inference=True)
    assert set(graph.aliases) == {name for name, _ in layer.fast_init.named_parameters()}
    assert not any(t.requires_grad for t in (graph.q, graph.u, *graph.aliases.values()))
    with torch.no_grad():
        graph.q.copy_(q)
        graph.u.copy_(u)
        outputs = graph.forward()
        expected = layer._fresh_scan(q, u, layout)
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert all(isinstance(p, torch.nn.Parameter) for p in layer.fast_init.parameters())


def test_decoding_graphs_come_on_the_second_token_without_gradients(monkeypatch):
    monkeypatch.setattr(memory_graphs, "TokenGraph", lambda *args: RecordedGraph(*args[:4]))
    _, graphed = twin_models("cpu")
    layer = titans_layers(graphed)[0]
    state = layer.initial_state(2)
    hidden = SimpleNamespace(shape=(2, 1, 32), dtype=torch.float32, device=torch.device("cuda", 0), is_cuda=True)
    real = torch.ones(2, dtype=torch.bool)

    def get():
        return layer._scan_graphs.get_token(layer, hidden, real, None, state)

    assert get() is None  # gradients on: eager
    with torch.no_grad():
        assert get() is None  # the first token of a shape: eager
        graph = get()
        assert graph is not None and get() is graph
        # the step reads the projections too: new storage for one of them is a new graph (the old one is dropped)
        layer.o_proj.weight.data = layer.o_proj.weight.data.clone()
        assert get() is None
        moved = get()
        assert moved is not None and moved is not graph and list(layer._scan_graphs.graphs.values()) == [moved]
        graphed.config.memory_cuda_graphs = False
        assert get() is None
    assert [k[0][0] for k in layer._scan_graphs.graphs] == ["token"]


def test_a_compiled_decoding_step_does_not_look_for_graphs(monkeypatch):
    """`torch.compile(model.forward)` (the README's decoding recipe) traces the one-token step itself: the graphs'
    bookkeeping (storage addresses, a capture) must stay out of the traced code."""
    calls = []
    original = memory_graphs.ScanGraphs.get_token
    monkeypatch.setattr(memory_graphs.ScanGraphs, "get_token", lambda self, *a: calls.append(1) or original(self, *a))
    torch.manual_seed(0)
    model = HopeForCausalLM(small_config("linear", memory_cuda_graphs=True)).eval()
    ids = torch.randint(1, 61, (1, 6))
    tokens = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert calls  # eager decoding asks for a graph (and on a CPU gets none)
    calls.clear()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager")
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), tokens)
    assert calls == []


def test_the_captured_decoding_step_gives_the_eager_steps():
    """What a decoding graph holds, replayed by a stand-in (the graph's computation into its output buffers): token
    after token, through a pad token, a chunk end and a document start, the outputs and states equal the eager
    steps', and what a replay returned is not changed by the next one."""
    layer = HopeSelfModifyingTitans(small_config("linear"), 0).double()
    layer.init_memory_weights()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 32, generator=g, dtype=torch.float64)
    real = torch.ones(2, 9, dtype=torch.bool)
    real[0, 3] = False
    starts = torch.zeros(2, 9, dtype=torch.bool)
    starts[1, 6] = True
    _, state = layer.forward_with_state(torch.randn(2, 5, 32, generator=g, dtype=torch.float64))  # mid-chunk
    with torch.no_grad():
        graph = memory_graphs.TokenGraph(layer, x[:, :1], real[:, 0], starts[:, 0], state)
        graph.outputs = graph.run()
        graph.graph = SimpleNamespace(replay=lambda: [o.copy_(n) for o, n in zip(graph.outputs, graph.run())])
        eager = replayed = state
        held = []
        for t in range(x.shape[1]):
            want, eager = layer._token_step(x[:, t : t + 1], real[:, t], starts[:, t], eager)
            got, replayed = graph.replay(x[:, t : t + 1], real[:, t], starts[:, t], replayed)
            held.append((got, want))
            for name, tensor in eager.tensors().items():
                torch.testing.assert_close(getattr(replayed, name), tensor, atol=0, rtol=0, msg=name)
    for got, want in held:
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert len(set(eager.chunk_pos.tolist())) == 2 and held[3][1][0].abs().max() == 0  # the pad token read nothing


@pytest.fixture
def cuda_capture_on_the_cpu(monkeypatch):
    """The torch.cuda calls of a capture as no-ops on the CPU; returns the grad mode of every recorded pass."""
    recorded = []

    @contextlib.contextmanager
    def graph(*args, **kwargs):
        recorded.append(torch.is_grad_enabled())
        yield

    for name, value in dict(synchronize=lambda *a: None, current_stream=lambda *a: SimpleNamespace(
            wait_stream=lambda s: None), Stream=lambda *a: SimpleNamespace(wait_stream=lambda s: None),
            stream=lambda s: contextlib.nullcontext(), device=lambda d: contextlib.nullcontext(), graph=graph,
            CUDAGraph=lambda: SimpleNamespace(), graph_pool_handle=lambda: None).items():
        monkeypatch.setattr(torch.cuda, name, value)
    return recorded


@pytest.mark.parametrize("inference", [False, True])
def test_a_capture_warms_up_twice_then_records(cuda_capture_on_the_cpu, monkeypatch, inference):
    """The capture procedure, with the CUDA calls as no-ops: two warm-up passes, then the recorded passes (forward
    and backward in training, the forward alone without gradients, under the grad mode each needs)."""
    layer = HopeSelfModifyingTitans(small_config("linear"), 0)
    layer.init_memory_weights()
    q, u = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 8, 16, requires_grad=True)
    real = torch.ones(2, 8, dtype=torch.bool)
    layout = memory_layout.Layout(real, torch.zeros_like(real), torch.zeros(2, dtype=torch.long), 4, 4)
    passes = []
    scan = memory_graphs.ScanGraph.forward
    monkeypatch.setattr(memory_graphs.ScanGraph, "forward", lambda self: passes.append(1) or scan(self))
    graph = memory_graphs.ScanGraph(layer, q, u, layout, inference=inference).capture()
    assert len(passes) == 3  # two warm-ups, one recorded
    assert cuda_capture_on_the_cpu == ([False] if inference else [True, True])
    assert graph.outputs[0].shape == (2, 4, 8, 8) and not any(t.requires_grad for t in graph.outputs)
    assert inference or all(g is not None for g in graph.grads[:2])


def test_a_decoding_capture_warms_up_twice_then_records(cuda_capture_on_the_cpu, monkeypatch):
    layer = HopeSelfModifyingTitans(small_config("linear"), 0)
    layer.init_memory_weights()
    steps = []
    token_step = layer._token_step
    monkeypatch.setattr(layer, "_token_step", lambda *a: steps.append(1) or token_step(*a))
    with torch.no_grad():
        graph = memory_graphs.TokenGraph(layer, torch.randn(2, 1, 32), torch.ones(2, dtype=torch.bool), None,
                                        layer.initial_state(2)).capture()
    assert len(steps) == 3 and cuda_capture_on_the_cpu == [False]
    expected = token_step(*(t for t in graph.inputs[:2]), None, layer.initial_state(2))
    torch.testing.assert_close(graph.outputs[0], expected[0])


class StandInGraph:
    """What `_GraphedScan` uses of a `_ScanGraph`, without CUDA: its "graphs" compute o = q * w + u and the
    gradients of q, u and w into fixed buffers, as captured kernels would."""

    def __init__(self, w):
        self.q, self.u, self.outputs = torch.zeros(3), torch.zeros(3), (torch.zeros(3),)
        self.grad_outputs, self.grads = [torch.zeros(3)], [torch.zeros(3), torch.zeros(3), torch.zeros(3)]
        self.param_ptrs, self.pending = [w.data_ptr()], None

        def forward():
            self.outputs[0].copy_(self.q * w.detach() + self.u)

        def backward():
            g = self.grad_outputs[0]
            self.grads[0].copy_(g * w.detach())
            self.grads[1].copy_(g)
            self.grads[2].copy_(g * self.q)

        self.forward_graph, self.backward_graph = SimpleNamespace(replay=forward), SimpleNamespace(replay=backward)


def test_replays_copy_in_and_out_and_guard_their_buffers():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    graph = StandInGraph(w)
    steps = [(torch.tensor([1.0, 0.0, 2.0]), torch.full((3,), 0.5)), (torch.tensor([3.0, 1.0, 1.0]), torch.ones(3))]
    for q, u in steps:  # two micro-batches: the parameter's gradient must add up, not alias a buffer
        q.requires_grad_()
        (o,) = memory_graphs.GraphedScan.apply(graph, q, u, w)
        assert graph.pending() is not None  # the replay's backward is due
        graph.outputs[0].zero_()  # a later replay rewrites the buffer: what the caller holds stays
        torch.testing.assert_close(o, q.detach() * w.detach() + u)
        o.sum().backward()
        assert graph.pending is None
        torch.testing.assert_close(q.grad, w.detach())
    torch.testing.assert_close(w.grad, steps[0][0] + steps[1][0])

    q = torch.ones(3, requires_grad=True)
    (o,) = memory_graphs.GraphedScan.apply(graph, q, torch.zeros(3), w)
    o.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can run once"):  # its activations may be gone from the buffers
        o.sum().backward()
    (o,) = memory_graphs.GraphedScan.apply(graph, q, torch.zeros(3), w)
    w.data = w.data.clone()  # what parameter sharding does between forward and backward
    with pytest.raises(RuntimeError, match="moved to other storage"):
        o.sum().backward()


def test_copies_and_pickles_do_not_carry_graphs():
    _, graphed = twin_models("cpu")
    layer = titans_layers(graphed)[0]
    layer._scan_graphs.graphs["key"] = object()  # stands for a captured graph (not copyable)
    assert not titans_layers(copy.deepcopy(graphed))[0]._scan_graphs.graphs
    assert not pickle.loads(pickle.dumps(layer))._scan_graphs.graphs


@pytest.mark.parametrize("overrides", [
    {},
    {"recompute_memory_states": False},
    {"self_modifying": False},
    {"retain_toward_init": False, "adaptive_v": False},
], ids=["default", "no-recompute", "titans-only", "static-v"])
def test_the_captured_computation_gives_the_layers_reads_and_gradients(overrides):
    """What the graphs hold, run eagerly (on any device): the scan through parameter aliases, differentiated with
    respect to the aliases, gives the eager layer's reads, final state and parameter gradients, and the layer's own
    parameters are back in place afterwards."""
    config = small_config("linear", **overrides)
    layer = HopeSelfModifyingTitans(config, 0).double()
    layer.init_memory_weights()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 14, 8, generator=g, dtype=torch.float64, requires_grad=True)  # 4 chunks, the last partial
    u = torch.randn(2, 4, 14, 16, generator=g, dtype=torch.float64, requires_grad=True)  # key and value streams
    real = torch.ones(2, 14, dtype=torch.bool)
    layout = memory_layout.Layout(real, torch.zeros_like(real), torch.zeros(2, dtype=torch.long), 4, 4)
    graph = memory_graphs.ScanGraph(layer, q, u, layout)
    with torch.no_grad():
        graph.q.copy_(q)
        graph.u.copy_(u)
    outputs = graph.forward()
    grad_outputs = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in outputs]
    grads = graph.backward(outputs, grad_outputs)

    params = [p for p in layer.fast_init.parameters() if p.requires_grad]
    expected = layer._fresh_scan(q, u, layout)
    expected_grads = torch.autograd.grad(expected, [q, u, *params], grad_outputs)
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert len(grads) == 2 + len(params)
    for name, got, want in zip(["q", "u", *graph.aliases], grads, expected_grads):
        assert got is not None, name
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=name)
    assert all(isinstance(p, torch.nn.Parameter) for p in layer.fast_init.parameters())


@cuda
@pytest.mark.parametrize("overrides", [
    {},
    {"recompute_memory_states": False},
    {"self_modifying": False},
], ids=["default", "no-recompute", "titans-only"])
def test_graphed_training_steps_equal_eager(overrides, count_replays):
    eager, graphed = twin_models("cuda", **overrides)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (eager, graphed)]
    for step in range(3):
        ids = ids_batch("cuda", seed=step)
        losses = []
        for model in (eager, graphed):
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], abs=1e-5)
        assert_same_grads(eager, graphed)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    layers = titans_layers(graphed)
    assert len(count_replays) == 3 * len(layers)  # every step replayed, captured once per layer
    assert all(len(layer._scan_graphs.graphs) == 1 for layer in layers)


@cuda
def test_gradient_accumulation_and_two_forwards_before_one_backward(count_replays):
    eager, graphed = twin_models("cuda")
    a, b = ids_batch("cuda", seed=1), ids_batch("cuda", seed=2)
    for model in (eager, graphed):  # accumulation: gradients must add up, not alias a captured buffer
        model(a, labels=a).loss.backward()
        model(b, labels=b).loss.backward()
    assert_same_grads(eager, graphed)
    replays = len(count_replays)
    for model in (eager, graphed):
        model.zero_grad(set_to_none=True)
        # the second forward must not overwrite the activations the first one's backward needs
        (model(a, labels=a).loss + model(b, labels=b).loss).backward()
    assert_same_grads(eager, graphed)
    assert len(count_replays) == replays + len(titans_layers(graphed))  # only the first forward replayed


@cuda
def test_padding_runs_eagerly_and_bf16_autocast_matches(count_replays):
    eager, graphed = twin_models("cuda")
    ids = ids_batch("cuda")
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    for model in (eager, graphed):
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert_same_grads(eager, graphed)
    assert count_replays == []
    losses = []
    for model in (eager, graphed):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert_same_grads(eager, graphed, atol=1e-4)
    assert len(count_replays) == len(titans_layers(graphed))


@cuda
def test_moved_parameters_are_captured_again():
    _, graphed = twin_models("cuda")
    ids = ids_batch("cuda")
    graphed(ids, labels=ids).loss.backward()
    old = [p.data for p in graphed.parameters()]  # kept alive: the new storage cannot reuse these addresses
    with torch.no_grad():
        for p in graphed.parameters():
            p.data = p.data.clone() * 1.1  # new storage and values: the old graphs would read the old weights
    graphed.zero_grad(set_to_none=True)
    reference = copy.deepcopy(graphed)
    reference.config.memory_cuda_graphs = False
    for model in (reference, graphed):
        model(ids, labels=ids).loss.backward()
    assert_same_grads(reference, graphed)
    del old
    assert all(len(layer._scan_graphs.graphs) == 1 for layer in titans_layers(graphed))  # the stale ones dropped


@cuda
def test_a_deleted_model_frees_its_graphs_at_once():
    import gc
    import weakref

    _, graphed = twin_models("cuda")
    ids = ids_batch("cuda")
    graphed(ids, labels=ids).loss.backward()
    refs = [weakref.ref(g) for layer in titans_layers(graphed) for g in layer._scan_graphs.graphs.values()]
    assert refs
    gc.disable()  # freed by reference counting alone: no cycle keeps the graphs' memory
    try:
        del graphed
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


@cuda
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_runs_the_eager_scan(reentrant, count_replays):
    eager, graphed = twin_models("cuda")
    for model in (eager, graphed):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = ids_batch("cuda")
    for model in (eager, graphed):
        model(ids, labels=ids).loss.backward()
    assert_same_grads(eager, graphed)
    assert count_replays == [] and all(not layer._scan_graphs.graphs for layer in titans_layers(graphed))


@cuda
def test_evaluation_and_prompts_replay_graphs_with_the_eager_numbers(monkeypatch):
    """Without gradients (evaluation, `generate`'s prompt) a shape is captured on its second use and replayed after:
    the eager logits and tokens, also after training steps have changed the weights in place; the training graphs and
    the evaluation graphs live side by side."""
    replays = []
    original = memory_graphs.ScanGraph.replay
    monkeypatch.setattr(memory_graphs.ScanGraph, "replay", lambda self, q, u: replays.append(1) or original(self, q, u))
    eager, graphed = twin_models("cuda")
    layers = titans_layers(graphed)
    ids = ids_batch("cuda")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (eager, graphed)]
    for round in range(2):
        for model in (eager, graphed):
            model.eval()
        with torch.no_grad():
            for _ in range(3):
                logits = [model(ids).logits for model in (eager, graphed)]
                torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-4)
        # round 0: the first pass eager, the next two replayed; round 1: the graph captured before reads the new weights
        assert len(replays) == (2 if round == 0 else 5) * len(layers)
        for model, opt in zip((eager, graphed), opts):
            model.train()
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    assert all(sorted(g.inference for g in layer._scan_graphs.graphs.values()) == [False, True] for layer in layers)
    replays.clear()
    eager, graphed = twin_models("cuda")  # the same weights: the same greedy tokens
    for model in (eager, graphed):
        model.eval()
    for length in (5, 9, 5, 5):  # the prompt of 5 tokens is captured on its second use
        prompts = ids[:, :length]
        tokens = [model.generate(prompts, max_new_tokens=4, do_sample=False) for model in (eager, graphed)]
        assert torch.equal(tokens[1], tokens[0])
    assert len(replays) == 2 * len(titans_layers(graphed))


@cuda
def test_decoding_replays_graphs_with_the_eager_tokens_and_scores(monkeypatch):
    replays = []
    original = memory_graphs.TokenGraph.replay
    monkeypatch.setattr(memory_graphs.TokenGraph, "replay", lambda self, *a: replays.append(1) or original(self, *a))
    eager, graphed = twin_models("cuda")
    prompts = ids_batch("cuda", length=7)
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0  # left padding
    outs = []
    for model in (eager, graphed):
        model.eval()
        outs.append(model.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   output_scores=True, return_dict_in_generate=True))
    assert torch.equal(outs[1].sequences, outs[0].sequences)
    for want, got in zip(outs[0].scores, outs[1].scores):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # the prompt, then 5 one-token steps: the first eager, the second captures, all but the first replayed
    assert len(replays) == 4 * len(titans_layers(graphed))

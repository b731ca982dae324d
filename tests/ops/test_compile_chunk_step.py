"""`compile_chunk_step`: the Titans chunk step compiled by `torch.compile` gives the eager numbers.

Inductor takes about a minute to compile, so the default tests compile with the `aot_eager` backend: Dynamo and
AOTAutograd trace `chunk_forward` / `chunk_backward` exactly as for Inductor (whole graphs, one per function and
input shape), only the kernels stay eager. Inductor itself runs in a slow test and, on a CUDA device, with the CUDA
graphs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.utils

from hope_hf import HopeConfig, HopeForCausalLM
from hope_hf import memory_chunk, memory_graphs

from conftest import small_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# The traced step runs the eager kernels, but AOTAutograd's functional graph replaces in-place updates with new
# tensors, so a product may see its operands laid out differently; on some CPUs (seen on an AVX-512 machine at the
# partial chunks of a padded batch) the GEMM then rounds differently in the last bit. Bitwise equality is not
# promised; a wrong formula would miss these by orders of magnitude.
TRACED_ATOL, TRACED_RTOL = 1e-6, 1e-5


@pytest.fixture
def compile_backend(monkeypatch):
    """Compile the chunk step with the given backend (fresh compiled functions; dropped afterwards)."""
    original = torch.compile

    def use(backend):
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: original(fn, **{"backend": backend, **kw}))
        memory_chunk.chunk_functions.cache_clear()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()

    yield use
    memory_chunk.chunk_functions.cache_clear()
    torch._dynamo.reset()


def twin_models(device, **overrides):
    torch.manual_seed(0)
    eager = HopeForCausalLM(small_config("linear", **overrides)).to(device)  # two Titans layers
    compiled = copy.deepcopy(eager)
    compiled.config.compile_chunk_step = True  # read at each use: switches a built (or loaded) model
    return eager, compiled


def train_steps(models, device, steps=2, length=24, batch=2, attention_mask=None):
    """AdamW steps of each model on the same batches; the per-step losses and the last gradients."""
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    losses = [[] for _ in models]
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(1, 61, (batch, length), generator=g).to(device)
        for model, opt, out in zip(models, opts, losses):
            loss = model(ids, attention_mask=attention_mask, labels=ids).loss
            loss.backward()
            out.append(loss.item())
            if step < steps - 1:
                opt.step()
                opt.zero_grad()
    return losses


def assert_same_grads(a, b, atol, rtol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is None:
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad, p.grad, atol=atol, rtol=rtol, msg=name)


def test_option_is_validated():
    with pytest.raises(ValueError, match="compile_chunk_step"):
        HopeConfig(compile_chunk_step=1)


@pytest.mark.parametrize("overrides", [{}, {"recompute_memory_states": False}, {"self_modifying": False},
                                       {"memory_depth": 2},
                                       {"memory_depth": 2, "retain_toward_init": False, "dgd": False}],
                         ids=["default", "no-recompute", "titans-only", "mlp", "mlp-no-anchors-no-dgd"])
def test_traced_chunk_step_equals_eager_without_recompiling(overrides, compile_backend):
    compile_backend("aot_eager")
    eager, compiled = twin_models("cpu", **overrides)
    losses = train_steps([eager, compiled], "cpu", steps=1)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    losses = [a + b for a, b in zip(losses, train_steps([eager, compiled], "cpu"))]
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert_same_grads(eager, compiled, atol=TRACED_ATOL, rtol=TRACED_RTOL)
    # whole graphs (fullgraph=True would raise on a break), and no recompilation across layers, chunks, steps, the
    # first chunk's aliasing of snapshot and current weights or the chunk inputs' requires_grad: one forward and one
    # backward graph of the chunk step (length 24, chunk size 4: every chunk has the same shape), the generation of
    # a self-modifying chunk's keys, values and gates included
    assert graphs == torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 2


def test_the_cuda_graphs_computation_does_not_recompile(compile_backend, monkeypatch):
    """What `_ScanGraph` captures (the scan of the layer's own inputs, its parameters replaced by detached aliases)
    must reuse the compiled code of the eager training step: a compilation inside a capture would break it, and
    every new variant counts against Dynamo's recompilation limit."""
    compile_backend("aot_eager")
    _, compiled = twin_models("cpu")
    scans = []

    def record(self, layer, q, u, layout):  # on a CPU no graph is made: keep what a GPU would capture
        scans.append((layer, q, u, layout))

    monkeypatch.setattr(memory_graphs.ScanGraphs, "get", record)
    train_steps([compiled], "cpu", steps=1)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert len(scans) == 2
    for layer, q, u, layout in scans:
        graph = memory_graphs.ScanGraph(layer, q, u, layout)
        outputs = graph.forward()
        graph.backward(outputs, [g + 1 for g in graph.zero_grad_outputs(outputs)])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_nothing_compiles_with_the_option_off(compile_backend):
    compile_backend("aot_eager")
    eager, _ = twin_models("cpu")
    train_steps([eager], "cpu", steps=1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_padding_with_the_compiled_step_and_eval_mode_stays_eager(compile_backend):
    compile_backend("aot_eager")
    eager, compiled = twin_models("cpu")
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[0, :5] = 0  # left padding: partial chunks, more input shapes
    losses = train_steps([eager, compiled], "cpu", steps=1, length=21, attention_mask=mask)
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert_same_grads(eager, compiled, atol=TRACED_ATOL, rtol=TRACED_RTOL)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2
    # evaluation and generation (eval mode: prompts of every length) run the eager chunk step
    prompt = torch.randint(1, 61, (2, 9))
    outs = [m.eval().generate(prompt, max_new_tokens=5, do_sample=False) for m in (eager, compiled)]
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    with torch.no_grad():
        compiled(prompt, labels=prompt)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_compiled_chunk_step_inside_a_compiled_model(compile_backend):
    """`torch.compile(model)` leaves the scan eager (`torch.compiler.disable`); the chunk step inside still compiles."""
    compile_backend("aot_eager")
    eager, compiled = twin_models("cpu")
    ids = torch.randint(1, 61, (2, 24))
    losses = []
    for model in (eager, torch.compile(compiled, backend="eager")):
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert_same_grads(eager, compiled, atol=1e-6, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 2  # the model's graphs and the chunk step's


@pytest.mark.slow
def test_inductor_chunk_step_matches_eager_on_the_cpu(compile_backend):
    compile_backend("inductor")
    eager, compiled = twin_models("cpu")
    losses = train_steps([eager, compiled], "cpu")
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert_same_grads(eager, compiled, atol=1e-5, rtol=1e-4)


@cuda
@pytest.mark.parametrize("graphs", [False, True], ids=["eager-scan", "cuda-graphs"])
def test_inductor_chunk_step_matches_eager_on_cuda(graphs):
    eager, compiled = twin_models("cuda")
    compiled.config.memory_cuda_graphs = graphs
    losses = train_steps([eager, compiled], "cuda", steps=3)
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert_same_grads(eager, compiled, atol=1e-5, rtol=1e-4)

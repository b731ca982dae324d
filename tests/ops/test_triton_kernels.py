"""The fused Triton kernels of the linear memories' scan (`hope_hf/memory_triton.py`, `memory_kernels`): the torch
path's numbers and gradients (float32, 1e-4 relative), one launch per chunk and layer, and the dispatch.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (numpy): conftest.py sets `TRITON_INTERPRET=1`
before triton is first imported. Shapes are small for that reason. Skipped where triton is not installed.
"""

import dataclasses
import os

import pytest
import torch


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU tensors need Triton's interpreter: TRITON_INTERPRET=1 before triton is imported",
                allow_module_level=True)

from hope_hf import HopeConfig, HopeForCausalLM, memory_chunk, memory_triton  # noqa: E402
from hope_hf.configuration_hope import RUNTIME_SWITCHES  # noqa: E402
from hope_hf.memory_chunk import ChunkStep, chunk_forward, generated_chunk_forward  # noqa: E402
from hope_hf.memory_common import ChunkSpec, GenerateSpec  # noqa: E402
from hope_hf.memory_hope import HopeSelfModifyingTitans  # noqa: E402

from conftest import small_config  # noqa: E402


SWITCHES = [{}, {"self_modifying": False}, {"retention": False}, {"retain_toward_init": False},
            {"adaptive_k": False, "adaptive_v": False}]


def make_layer(**overrides):
    """A float32 layer of linear memories (2 heads of 8, chunk 4) with large random parameters, so that every term of
    the rule matters (as tests/test_memory.py's)."""
    config = HopeConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, chunk_size=4,
                        memory_depth=1, eta_max=0.9, **overrides)
    layer = HopeSelfModifyingTitans(config, layer_idx=0)
    layer.init_memory_weights()
    with torch.no_grad():
        layer.fast_init.eta_bias.fill_(1.0)
        layer.fast_init.init_out.add_(0.3 * torch.randn_like(layer.fast_init.init_out))
        for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.g_proj, layer.o_proj):
            lin.weight.normal_(0, 0.5)
        if hasattr(layer.fast_init, "alpha_bias"):
            layer.fast_init.alpha_bias.fill_(1.0)
    return layer.to(DEVICE)


def run(layer, kernels, *args, **kwargs):
    """`forward_with_state` without gradients under `memory_kernels=kernels`; the kernel launches it made."""
    layer.config.memory_kernels = kernels
    memory_triton.LAUNCHES.clear()
    with torch.no_grad():
        out, state = layer.forward_with_state(*args, **kwargs)
    return out, state, memory_triton.LAUNCHES["linear_chunk"]


def assert_same(fused, ref):
    """Outputs and every tensor of the final states equal to 1e-4 relative."""
    (out, state), (ref_out, ref_state) = fused, ref
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for name, t in state.tensors().items():
        torch.testing.assert_close(t, getattr(ref_state, name), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(s) or "default")
def test_kernels_equal_the_torch_path_with_padding_packing_and_a_partial_chunk(switches):
    layer = make_layer(**switches)
    x = torch.randn(2, 11, 16, device=DEVICE)  # 11 tokens: two chunks and a partial one
    mask = torch.ones(2, 11, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0  # left padding
    mask[1, 6] = 0  # a hole
    pos = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 0, 1, 2], list(range(11))], device=DEVICE)  # a document starts
    ref = run(layer, "torch", x, attention_mask=mask, position_ids=pos)
    out, state, launches = run(layer, "triton", x, attention_mask=mask, position_ids=pos)
    assert launches > 0
    assert_same((out, state), ref[:2])


def test_kernels_equal_the_torch_path_fed_in_pieces_and_token_by_token():
    """Pieces that start inside a chunk (the snapshot differs from the current weights) and decoding steps."""
    layer = make_layer()
    x = torch.randn(2, 10, 16, device=DEVICE)
    results = {}
    for kernels in ("torch", "triton"):
        a, mid, _ = run(layer, kernels, x[:, :5])
        b, mid, _ = run(layer, kernels, x[:, 5:8], state=mid)
        steps = []
        for t in range(8, 10):
            o, mid, launches = run(layer, kernels, x[:, t : t + 1], state=mid)
            steps.append(o)
            assert launches == (kernels == "triton")  # one launch per token and layer
        results[kernels] = torch.cat([a, b, *steps], 1), mid
    assert_same(results["triton"], results["torch"])


def chunk_cases(n=5, d=8, length=6):
    """(spec, gen_spec, inputs) of one chunk of 2 rows and 3 heads with a write mask, a snapshot distinct from the
    current weights and anchors: a self-modifying chunk (generation inside) and a static one (keys, values, gates
    given); every float input requires a gradient."""
    rand = lambda *shape: torch.randn(*shape, device=DEVICE).requires_grad_()  # noqa: E731
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, device=DEVICE), dim=-1).requires_grad_()  # noqa: E731,E501
    small = lambda *shape: (0.3 * torch.randn(*shape, device=DEVICE)).requires_grad_()  # noqa: E731
    write = torch.tensor([[[1.0, 1, 0, 1, 1, 1]], [[1.0, 1, 1, 1, 1, 0]]], device=DEVICE)
    empty = torch.zeros(2, 3, d, 0, device=DEVICE)
    spec = ChunkSpec(chunk_size=length, num_memories=n, memory_dim=d, self_modifying=True, detach_self_targets=False,
                     dgd=True, retain_toward_init=True, depth=1)
    gen_spec = GenerateSpec(memories=("k", "v", "eta", "alpha", "o"), memory_dim=d, eta_max=0.9, retention=True,
                            depth=1)
    generated = (unit(2, 3, length, d), rand(2, 3, length, 2 * d), write, empty, small(2, 3, n, d, d), empty,
                 small(2, 3, n, d, d), None, small(3, n, d, d), rand(3, n, d), rand(3, n), rand(3, d), rand(3))
    static_spec = ChunkSpec(chunk_size=length, num_memories=1, memory_dim=d, self_modifying=False,
                            detach_self_targets=False, dgd=True, retain_toward_init=True, depth=1)
    static = (unit(2, 3, length, d), unit(2, 3, length, d), unit(2, 3, length, d),
              torch.rand(2, 3, length, 1, device=DEVICE).requires_grad_(),
              (-torch.rand(2, 3, length, device=DEVICE)).requires_grad_(), write, empty, small(2, 3, 1, d, d), empty,
              small(2, 3, 1, d, d), None, small(3, 1, d, d))
    return [(spec, gen_spec, generated), (static_spec, None, static)]


def test_the_chunk_step_equals_the_torch_chunk_step_for_any_block_sizes():
    """`chunk_step` directly: the same numbers as the torch chunk step with the default blocks and with larger ones
    (block sizes are the kernel's parameters)."""
    for spec, gen_spec, inputs in chunk_cases():
        with torch.no_grad():
            if gen_spec is not None:
                ref_o, _, ref_end, _ = generated_chunk_forward(spec, gen_spec, *inputs)
            else:
                ref_o, _, ref_end = chunk_forward(spec, *inputs)
            for blocks in ({}, {"block_l": 32, "block_d": 32}):
                o, end_in, end_out = memory_triton.chunk_step(spec, gen_spec, *inputs, **blocks)
                torch.testing.assert_close(o, ref_o, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(end_out, ref_end, rtol=1e-4, atol=1e-5)
                assert end_in is inputs[5 if gen_spec is not None else 8]


@pytest.mark.parametrize("detach", [False, True], ids=["targets", "detached_targets"])
def test_the_backward_kernel_equals_the_written_out_backward(detach):
    """`FusedChunkStep` against `ChunkStep`: every input's gradient, with a snapshot distinct from the current
    weights (its own gradient), anchors and the generation's parameters."""
    for spec, gen_spec, inputs in chunk_cases():
        spec = dataclasses.replace(spec, detach_self_targets=detach and spec.self_modifying)
        found = {}
        for name, step in (("torch", ChunkStep.apply), ("fused", memory_triton.FusedChunkStep.apply)):
            o, _, end = step(spec, gen_spec, *inputs)
            weights = torch.Generator().manual_seed(1)
            loss = (o * torch.randn(o.shape, generator=weights).to(DEVICE)).sum() + (
                end * torch.randn(end.shape, generator=weights).to(DEVICE)).sum()
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            found[name] = torch.autograd.grad(loss, wanted, allow_unused=True)
        for a, b in zip(found["fused"], found["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-6)


@pytest.mark.parametrize("self_modifying", [True, False])
def test_one_launch_per_chunk_and_layer_whatever_the_number_of_memories(self_modifying):
    """The launch count of a model's forward: one kernel per chunk and Titans layer (2 layers, 3 chunks: 6), with
    5 memories per layer (self-modifying) as with 1."""
    model = HopeForCausalLM(small_config("linear", self_modifying=self_modifying)).to(DEVICE).eval()
    model.config.memory_kernels = "triton"
    ids = torch.randint(1, 61, (1, 12), device=DEVICE)  # chunk 4: 3 chunks
    memory_triton.LAUNCHES.clear()
    with torch.no_grad():
        fused = model(ids).logits
    assert memory_triton.LAUNCHES["linear_chunk"] == 2 * 3
    model.config.memory_kernels = "torch"
    with torch.no_grad():
        torch.testing.assert_close(fused, model(ids).logits, rtol=1e-4, atol=1e-5)


def gradients(layer, kernels, x, **kwargs):
    """The output, final state and gradients (the layer's parameters, then x) of a loss on the output and the
    final fast weights, under `memory_kernels=kernels`; and the kernel launches (forward, backward)."""
    layer.config.memory_kernels = kernels
    layer.zero_grad()
    x = x.clone().requires_grad_()
    memory_triton.LAUNCHES.clear()
    out, state = layer.forward_with_state(x, **kwargs)
    weights = torch.randn(state.current_out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (out.square().sum() + (state.current_out * weights).sum()).backward()
    grads = [p.grad for p in layer.parameters()] + [x.grad]
    return out, state, grads, (memory_triton.LAUNCHES["linear_chunk"], memory_triton.LAUNCHES["linear_chunk_backward"])


# the default switches run by default, both ways; every other switch (slow under the interpreter) with -m slow
GRADIENT_CASES = [({}, True), ({}, False)] + [
    pytest.param(switches, False, marks=pytest.mark.slow)
    for switches in SWITCHES[1:] + [{"detach_self_targets": True}]]


@pytest.mark.parametrize("switches, recompute", GRADIENT_CASES,
                         ids=lambda v: ("-".join(v) or "default") if isinstance(v, dict) else ("recompute" if v else
                                                                                              "stored"))
def test_training_gradients_equal_the_torch_path(switches, recompute):
    """Every gradient (the layer's parameters and its input) through the backward kernel, with padding, a document
    start and a partial last chunk, with the recomputed segments and without."""
    layer = make_layer(recompute_memory_states=recompute, **switches)
    x = torch.randn(2, 11, 16, device=DEVICE)
    mask = torch.ones(2, 11, dtype=torch.long, device=DEVICE)
    mask[0, :2] = 0
    pos = torch.tensor([list(range(11)), [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]], device=DEVICE)
    *ref, ref_grads, ref_launches = gradients(layer, "torch", x, attention_mask=mask, position_ids=pos)
    *fused, fused_grads, launches = gradients(layer, "triton", x, attention_mask=mask, position_ids=pos)
    assert ref_launches == (0, 0)
    assert launches[1] == 3 and launches[0] == (6 if recompute else 3)  # 3 chunks; recomputation runs them twice
    assert_same(fused, ref)
    for (name, _), a, b in zip([*layer.named_parameters(), ("x", None)], fused_grads, ref_grads):
        if b is None:
            assert a is None or not a.any(), name
        else:
            # float32 rounding: 1e-4 of the gradient's scale (an element near zero differs more relative to itself)
            atol = 1e-4 * float(b.abs().max())
            torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def test_auto_runs_the_kernels_on_cuda_only_and_mlp_memories_run_torch():
    layer = make_layer()
    x = torch.randn(1, 8, 16, device=DEVICE)
    assert run(layer, "auto", x)[2] == (2 if DEVICE == "cuda" else 0)
    mlp = HopeSelfModifyingTitans(HopeConfig(hidden_size=16, num_attention_heads=2, chunk_size=4, memory_depth=2,
                                             memory_kernels="triton"), layer_idx=0).to(DEVICE)
    mlp.init_memory_weights()
    assert run(mlp, "triton", x)[2] == 0


class Stub:
    """What `fused_chunk_step` reads of a tensor, for a device this machine may not have."""

    def __init__(self, is_cuda=True, dtype=torch.float32, requires_grad=False):
        self.is_cuda, self.dtype, self.requires_grad = is_cuda, dtype, requires_grad


def test_the_dispatch_policy():
    """Which step `fused_chunk_step` picks, CUDA included: "auto" on CUDA unless the compiled chunk step is on,
    "triton" anywhere, "torch" never; linear float32 memories only; the autograd Function where a gradient is
    needed."""
    spec = ChunkSpec(chunk_size=4, num_memories=5, memory_dim=8, self_modifying=True, detach_self_targets=False,
                     dgd=True, retain_toward_init=True, depth=1)
    pick = lambda kernels, *tensors, **changes: memory_chunk.fused_chunk_step(  # noqa: E731
        dataclasses.replace(spec, kernels=kernels, **changes), *tensors)
    assert pick("auto", Stub(), None) is memory_triton.chunk_step
    assert pick("auto", Stub(is_cuda=False)) is None
    assert pick("auto", Stub(), compiled=True) is None
    assert pick("triton", Stub(), compiled=True) is memory_triton.chunk_step
    assert pick("triton", Stub(is_cuda=False)) is memory_triton.chunk_step
    assert pick("torch", Stub()) is None
    assert pick("triton", Stub(), depth=2) is None
    assert pick("triton", Stub(), Stub(dtype=torch.float64)) is None
    assert pick("triton", Stub(), Stub(requires_grad=True)) == memory_triton.FusedChunkStep.apply
    with torch.no_grad():
        assert pick("triton", Stub(), Stub(requires_grad=True)) is memory_triton.chunk_step


def test_memory_kernels_is_a_checked_runtime_switch(tmp_path, monkeypatch):
    """Never saved; a bad value names the field and its values; "triton" without triton says what to install."""
    assert "memory_kernels" in RUNTIME_SWITCHES
    config = small_config("linear", memory_kernels="triton")
    config.save_pretrained(tmp_path)
    assert "memory_kernels" not in (tmp_path / "config.json").read_text()
    assert HopeConfig.from_pretrained(tmp_path).memory_kernels == "torch"
    with pytest.raises(ValueError, match=r"(?s)memory_kernels.*'auto', 'torch', 'triton'"):
        HopeConfig(memory_kernels="cuda")
    monkeypatch.setattr(memory_chunk, "_kernels_module", lambda: None)
    layer = make_layer()
    with pytest.raises(ImportError, match="memory_kernels='triton' needs the triton package"):
        run(layer, "triton", torch.randn(1, 8, 16, device=DEVICE))
    assert run(layer, "auto", torch.randn(1, 8, 16, device=DEVICE))[2] == 0


def test_the_kernels_stay_out_of_the_model_code():
    """Hub remote code copies the model files and what they import with `from .x import y`: not the kernels, and
    Transformers' import check of the model files finds no triton."""
    from pathlib import Path

    from transformers.dynamic_module_utils import get_imports

    from hope_hf.hub import MODEL_CODE_FILES

    assert "memory_triton.py" not in MODEL_CODE_FILES
    root = Path(memory_chunk.__file__).parent
    for name in MODEL_CODE_FILES:
        assert "triton" not in get_imports(root / name), name


def test_without_triton_the_model_runs_the_torch_path_and_triton_says_what_to_install():
    """In a process where `import triton` fails: the package imports, "auto" runs the torch path, and "triton" raises
    an ImportError naming the package and the extra."""
    import subprocess
    import sys

    script = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError
import torch
from hope_hf import HopeConfig, HopeForCausalLM
model = HopeForCausalLM(HopeConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   chunk_size=4)).eval()
ids = torch.randint(0, 32, (1, 9))
with torch.no_grad():
    assert model(ids).logits.shape == (1, 9, 32)
model.config.memory_kernels = "triton"
try:
    with torch.no_grad():
        model(ids)
except ImportError as err:
    assert "pip install 'hope-hf[gpu]'" in str(err), err
else:
    raise AssertionError("no ImportError")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

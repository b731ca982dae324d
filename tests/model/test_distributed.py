"""Multi-process training on CPU (gloo): DDP through `accelerate launch`, FSDP2 through torchrun + `fully_shard`;
on a CUDA machine also DDP with the memory scan replayed from CUDA graphs.

Each test spawns 2 processes running a script from tests/scripts/ and compares with a single-process run of the same
global batch in this process.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _training_utils import one_thread, tiny_model
from hope_hf import HopeForCausalLM
from hope_hf.training import ContinuumOptimizer

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(cmd, timeout=180):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_two_process_ddp_with_accelerate_launch_matches_one_process(tmp_path):
    """2 ranks x 2 rows (gloo, `use_cpu=True`) = 1 process x 4 rows: same losses, same weights (float32, atol 1e-5),
    and both ranks step the same CMS levels because the token count is all-reduced."""
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "--main_process_port", str(_free_port()), str(SCRIPTS / "ddp_train.py"), str(ddp)])
    single = tmp_path / "single"
    single.mkdir()
    spec = importlib.util.spec_from_file_location("ddp_train", SCRIPTS / "ddp_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with one_thread():
        module.main(str(single))

    ranks = [json.loads((ddp / f"rank{r}.json").read_text()) for r in (0, 1)]
    ref = json.loads((single / "rank0.json").read_text())
    assert ref["world"] == 1 and all(r["world"] == 2 for r in ranks)
    assert all(r["distributed_type"].endswith("MULTI_CPU") for r in ranks)
    for r in ranks:
        assert r["level_steps"] == ref["level_steps"] and r["total_tokens"] == ref["total_tokens"]
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert ref["level_steps"]["1"] >= 1 and ref["level_steps"]["2"] == 0
    w_ddp = torch.load(ddp / "weights.pt", weights_only=True)
    w_ref = torch.load(single / "weights.pt", weights_only=True)
    assert w_ddp.keys() == w_ref.keys()
    loose = 0
    for k in w_ref:
        # float32 sums in another order (per-rank halves, then the all-reduce): gradients agree to ~1e-7, and Adam's
        # normalised steps can turn that into ~1e-5 on near-zero gradient entries (2 of ~40K elements reach
        # 1.2e-5 and 2.5e-5); 4 steps of lr 1e-2 move the weights by up to 4e-2, and a sharding or token-count
        # error by ~1e-2 per step, so every element within 1e-4 and nearly all within 1e-5 pins the result.
        torch.testing.assert_close(w_ddp[k], w_ref[k], rtol=0, atol=1e-4, msg=k)
        loose += int(((w_ddp[k] - w_ref[k]).abs() > 1e-5).sum())
    assert loose <= 1e-3 * sum(w.numel() for w in w_ref.values()), loose


def test_fsdp2_trains_and_its_saved_checkpoint_loads(tmp_path):
    """torchrun, 2 ranks, `fully_shard` per decoder layer, activation checkpointing, ContinuumOptimizer on DTensors:
    the gathered, saved model loads with `from_pretrained` and equals a single-process run (losses within
    1e-5 relative, weights within rounding amplified by Adam)."""
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
          str(SCRIPTS / "fsdp2_train.py"), str(tmp_path)])
    result = json.loads((tmp_path / "result.json").read_text())
    loaded = HopeForCausalLM.from_pretrained(tmp_path / "model")

    spec = importlib.util.spec_from_file_location("fsdp2_train", SCRIPTS / "fsdp2_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with one_thread():
        model = tiny_model(periods=module.PERIODS)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = ContinuumOptimizer.from_model(model, lr=1e-2)
        losses = []
        for ids in module.batches():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert result["level_steps"] == {str(k): v for k, v in opt.level_steps.items()} == {"0": 4, "1": 2, "2": 0}
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    # Adam's normalised updates amplify float32 rounding where a gradient is near zero: two summation orders of the
    # same single-process run (before and after a change of the chunk step's product order) end 2.4e-4 apart in one
    # element after these 4 steps, most elements within 1e-5. A sharding error moves weights by ~lr = 1e-2 per step.
    for (n, p), q in zip(model.named_parameters(), loaded.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-3, msg=lambda m: f"{n}: {m}")
        if ".cms.levels.2." not in n and ".cms.norms.2." not in n:
            assert not torch.equal(p, initial[n]), f"{n} did not train"
        else:
            assert torch.equal(p, initial[n]), f"frozen {n} changed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays CUDA graphs: needs a CUDA device")
def test_ddp_with_graphed_memory_scan_matches_one_process(tmp_path):
    """DDP (torchrun, 2 ranks x 2 rows on one GPU, gloo) with `memory_cuda_graphs`: the graphed scan runs in every
    step of every rank, and the losses and weights equal one process's 4-row run without DDP."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    single.mkdir()
    script = str(SCRIPTS / "ddp_cuda_graphs_train.py")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
          script, str(ddp)], timeout=300)
    _run([sys.executable, script, str(single)], timeout=300)
    ranks = [json.loads((ddp / f"rank{r}.json").read_text()) for r in (0, 1)]
    ref = json.loads((single / "rank0.json").read_text())
    assert ref["world"] == 1 and all(r["world"] == 2 for r in ranks)
    layers = 2  # tiny_model's Titans layers, each replays its graphed scan once per step
    assert ref["replays"] == layers * len(ref["losses"]) and all(r["replays"] == ref["replays"] for r in ranks)
    for r in ranks:
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert ref["losses"][-1] < ref["losses"][0]
    w_ddp = torch.load(ddp / "weights.pt", weights_only=True)
    w_ref = torch.load(single / "weights.pt", weights_only=True)
    assert w_ddp.keys() == w_ref.keys()
    for k in w_ref:  # float32 sums in another order, then Adam's normalised steps (see the CPU DDP test above)
        torch.testing.assert_close(w_ddp[k], w_ref[k], rtol=0, atol=1e-5, msg=k)


def test_example_accelerate_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    configs = {p.stem: ClusterConfig.from_yaml_file(str(p)) for p in (REPO / "examples" / "accelerate").glob("*.yaml")}
    assert set(configs) == {"ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"}
    assert configs["ddp"].distributed_type.value == "MULTI_GPU"
    fsdp = configs["fsdp2"]
    assert fsdp.distributed_type.value == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] in HopeForCausalLM._no_split_modules
    assert [configs[f"deepspeed_zero{z}"].deepspeed_config["zero_stage"] for z in (2, 3)] == [2, 3]

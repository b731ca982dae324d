"""The benchmark scripts' `--quick` modes run end to end and write well-formed JSON (nothing is asserted about time)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_peers_quick(tmp_path):
    out = tmp_path / "peers.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/peers.py", "--quick", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["config"]["quick"] is True and report["threads"] == 1
    assert set(report["peers"]) == {"titans-pytorch", "nested-learning"}
    rows = {(r["impl"], r["length"]): r for r in report["rows"]}
    lengths = report["config"]["lengths"]
    for impl in ("ours_titans", "ours_selfmod"):  # our layers are always measured
        for length in lengths:
            row = rows[(impl, length)]
            assert row["status"] == "ok"
            assert math.isfinite(row["fwd_bwd_us_per_token"]) and row["fwd_bwd_us_per_token"] > 0
    for impl in ("titans_default", "titans_refresh", "nested_learning"):  # a peer is measured or "not installed"
        package = "nested-learning" if impl == "nested_learning" else "titans-pytorch"
        for length in lengths:
            row = rows[(impl, length)]
            expected = "not installed" if report["peers"][package] is None else "ok"
            assert row["status"] == expected, row
            assert (row["status"] == "ok") == ("fwd_bwd_us_per_token" in row)
    assert {(r["comparison"], r["peer"]) for r in report["ratios"]} == {
        ("titans", "titans_default"), ("titans", "titans_refresh"), ("nested_learning", "nested_learning")}
    for ratio in report["ratios"]:
        assert ("speedup_ours_vs_peer" in ratio) == (ratio["peer_status"] == "ok")
    assert set(report["targets"]) == {"titans", "nested_learning"}
    assert all(t["met"] is None for t in report["targets"].values())  # quick mode judges nothing


def run_quick(script, tmp_path, *extra):
    out = tmp_path / f"{Path(script).stem}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, script, "--quick", "--json", str(out), *extra], cwd=ROOT / "benchmarks",
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["config"]["quick"] is True
    return report


def test_training_quick(tmp_path):
    """Targets 1-2: both models train at every length in their own process; same parameter count (within 2%)."""
    report = run_quick("training.py", tmp_path, "--mixer-breakdown")
    assert [r["length"] for r in report["rows"]] == report["config"]["lengths"]
    for row in report["rows"]:
        hope, llama = row["hope"], row["llama"]
        assert "error" not in hope and "error" not in llama, row
        assert abs(hope["parameters"] - llama["parameters"]) / hope["parameters"] < 0.02
        for side in (hope, llama):
            assert side["tokens_per_second"] > 0 and side["peak_memory_mib"] > 0
        assert math.isclose(row["speed_ratio"], hope["tokens_per_second"] / llama["tokens_per_second"])
        for kind in ("hope", "llama"):  # the same model with its mixer's core skipped
            stand_in = row[f"{kind}_stand_in"]
            assert "error" not in stand_in and stand_in["parameters"] == row[kind]["parameters"]
            assert math.isclose(row[f"{kind}_mixer_seconds"] + row[f"{kind}_rest_seconds"], row[kind]["step_seconds"])


def test_flops_quick(tmp_path):
    """Target 5: the layer's FLOPs are counted (nonzero, the same at every length per token up to the chunking)."""
    report = run_quick("flops.py", tmp_path)
    (row,) = report["rows"]
    assert row["flops_per_token"] > 0 and row["layer_flops_per_second"] > 0
    assert row["matmul_flops_per_second_at_shapes"] > 0 and report["big_matmul_flops_per_second"] > 0


def test_memory_layer_and_decode_quick(tmp_path):
    """Targets 3-4 and the layer table: the existing scripts' quick modes still run."""
    layer = run_quick("memory_layer.py", tmp_path)
    decode = run_quick("decode.py", tmp_path)
    assert layer["rows"] and decode


def test_layer_versions_quick(tmp_path):
    """The before/after benchmark of `memory_hope.py` loads two copies of the module and times both, recomputation
    off and on; a bad revision is a clear error, not a traceback."""
    report = run_quick("layer_versions.py", tmp_path)
    assert [r["recompute_memory_states"] for r in report["rows"]] == [False, True]
    for row in report["rows"]:
        assert row["baseline_step_seconds"] > 0 and row["current_step_seconds"] > 0 and row["step_speedup"] > 0
    proc = subprocess.run([sys.executable, "layer_versions.py", "--baseline", "no-such-revision", "--json", ""],
                          cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--baseline 'no-such-revision'" in proc.stderr


def test_gpu_script_quick_on_a_cpu(tmp_path):
    """The GPU script's sections run end to end at CPU sizes (the compile sections are skipped there): the device
    correctness check passes, both models train and evaluate, and decoding with the current file as the baseline
    layer, or with the graphs option (ignored on a CPU), gives the same logits."""
    current = str(ROOT / "hope_hf" / "memory_hope.py")
    report = run_quick("gpu.py", tmp_path, "--device", "cpu", "--baseline-memory", current, "--decode-graphs")
    results = report["results"]
    assert not report["errors"], report["errors"]
    assert results["correctness"]["passed"] is True
    assert {(r["model"], r["length"]) for r in results["training"]} == {("hope", 64), ("llama", 64)}
    assert all(r["tokens_per_second"] > 0 and r["flops_per_token"] > 0 for r in results["training"])
    for row in results["decode"]:
        assert row["hope_ms_per_token"] > 0 and row["llama_ms_per_token"] > 0
    assert results["decode"][0]["hope_baseline_max_logit_diff"] < 1e-4
    assert results["decode"][0]["hope_graphs_max_logit_diff"] == 0  # on a CPU the option changes nothing
    evaluation = {r["model"]: r for r in results["evaluation"]}
    assert set(evaluation) == {"llama", "hope_eager", "hope_graphs"}
    assert evaluation["hope_graphs"]["logits_rel_err_vs_eager"] == 0
    assert [r["chunk_size"] for r in results["chunk_sizes"]] == [8, 16]
    assert [r["recompute_memory_states"] for r in results["recompute"]] == [True, False]
    assert results["compiled"].startswith("skipped") and results["profile"].startswith("skipped")


def test_bad_sizes_are_refused_by_name_and_reports_pin_the_run(tmp_path):
    """Sizes below 1 were tracebacks (or silent runs that measured nothing); every report records what ran."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for script, option in (("memory_layer.py", "--repeats"), ("decode.py", "--steps"), ("flops.py", "--chunk-size"),
                           ("memory_stability.py", "--tokens"), ("training.py", "--batch")):
        proc = subprocess.run([sys.executable, f"benchmarks/{script}", option, "0"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and f"{option} must be >= 1, got 0" in proc.stderr, (script, proc.stderr[-2000:])
    out = tmp_path / "stability.json"
    proc = subprocess.run([sys.executable, "benchmarks/memory_stability.py", "--quick", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["transformers"] and report["torch"] and report["commit"]


def test_recall_quick(tmp_path):
    """MQAR: every model trains on the same data and reports a learning curve; Llama is sized to HOPE's count."""
    report = run_quick("recall.py", tmp_path, "--variant", 'chunk4={"chunk_size": 4}')
    rows = report["results"]
    assert [r["model"] for r in rows] == ["llama", "hope_attention", "hope", "hope_static", "hope_mlp", "chunk4"]
    assert rows[-1]["overrides"] == {"chunk_size": 4}
    for row in rows:
        assert [c["step"] for c in row["curve"]] == [2, 4]
        assert 0.0 <= row["test_accuracy"] <= 1.0 and math.isfinite(row["test_loss"])
    params = {r["model"]: r["parameters"] for r in rows}
    assert abs(params["llama"] - params["hope"]) / params["hope"] < 0.05


def test_recall_refuses_bad_options(tmp_path):
    for args, needle in ((["--grid", "16:8"], "--grid 16:8"), (["--variant", "x={oops"], "not JSON"),
                         (["--variant", 'x={"chunk_sise": 4}'], "chunk_sise"), (["--widths", "63"], "--widths"),
                         (["--models"], "nothing to train")):
        proc = subprocess.run([sys.executable, "recall.py", *args, "--json", ""], cwd=ROOT / "benchmarks",
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr[-1000:])


def test_make_mqar_places_each_key_and_its_value():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from recall import make_mqar

    ids, targets = make_mqar(50, vocab_size=64, length=40, pairs=4, seed=3)
    for row, tgt in zip(ids.tolist(), targets.tolist()):
        pairs = dict(zip(row[0:8:2], row[1:8:2]))
        assert len(pairs) == 4 and all(k < 32 <= v for k, v in pairs.items())  # distinct keys, values above
        assert len(set(pairs.values())) == 4  # distinct values
        asked = [t for t, y in enumerate(tgt) if y != -100]
        assert len(asked) == 4 and all(t >= 8 for t in asked)
        assert sorted(row[t] for t in asked) == sorted(pairs)  # every key is queried once
        for t in asked:  # the key is queried there and its value is the target
            assert pairs[row[t]] == tgt[t]
    again, _ = make_mqar(50, vocab_size=64, length=40, pairs=4, seed=3)
    assert (again == ids).all()
    shown, shown_targets = make_mqar(50, vocab_size=64, length=40, pairs=4, seed=3, show_answers=True)
    assert (shown_targets == targets).all()
    asked = targets != -100
    after = torch.roll(asked, 1, dims=1)  # the position after each query
    assert (shown[after] == targets[asked]).all()  # Zoology's layout: the value follows its queried key
    assert (shown[~after] == ids[~after]).all()  # everything else as without answers


def test_language_modeling_quick(tmp_path):
    report = run_quick("language_modeling.py", tmp_path)
    assert [r["model"] for r in report["results"]] == ["hope", "hope_attention", "llama"]
    for row in report["results"]:
        assert len(row["train_losses"]) == 3 and math.isfinite(row["eval_perplexity"])
        assert [b["positions"] for b in row["loss_by_position"]] == [[1, 32], [33, 63]]


def test_kernel_launches_quick(tmp_path):
    """The launch count of the fused kernels: one per chunk and layer forward, two with the backward, one per decoded
    token, with 5 memories as with 1, and far fewer ATen calls per chunk than the torch path."""
    pytest.importorskip("triton")
    report = run_quick("kernel_launches.py", tmp_path)
    assert [row["memories"] for row in report["rows"]] == [5, 1]
    for row in report["rows"]:
        assert row["triton_forward_launches_per_chunk"] == 1 and row["triton_train_launches_per_chunk"] == 2
        assert row["triton_launches_per_token_step"] == 1
        assert row["torch_forward_launches_per_chunk"] == row["torch_train_launches_per_chunk"] == 0
        assert row["triton_forward_aten_calls_per_chunk"] < row["torch_forward_aten_calls_per_chunk"] / 10


def test_cpu_threads_quick(tmp_path):
    """Each thread setting is measured idle and with a busy loop on one core, in the order run (A/B/A/B)."""
    report = run_quick("cpu_threads.py", tmp_path)
    settings = report["config"]["settings"]
    assert [(r["setting"], r["condition"]) for r in report["rows"]] == [(s, c) for s in settings
                                                                        for c in ("idle", "busy")]
    for row in report["rows"]:
        assert row["stream_tokens_per_s"] > 0 and row["train_tokens_per_s"] > 0
    assert [line["setting"] for line in report["table"]] == settings
    for line in report["table"]:
        assert math.isclose(line["stream_slowdown_when_busy"], line["stream_idle"] / line["stream_busy"])

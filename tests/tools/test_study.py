"""The long-context study script (studies/long_context.py): its --quick mode end to end, and the determinism of its
data."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "studies" / "long_context.py"


def _load():
    spec = importlib.util.spec_from_file_location("hope_study_long_context", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study_module():
    pytest.importorskip("matplotlib")
    return _load()


@pytest.fixture(scope="module")
def quick_study(study_module, tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("study")
    try:
        study_module.main(["--quick", "--output_dir", str(out), "--threads", "1", "--no_progress"])
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "study.json").read_text())


def test_help(study_module, capsys):
    with pytest.raises(SystemExit) as err:
        study_module.parse_args(["--help"])
    assert err.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_quick_study_writes_every_model_length_and_plot(study_module, quick_study):
    out, study = quick_study
    assert set(study["models"]) == set(study_module.MODELS)
    lengths = [str(n) for n in study["settings"]["eval_lengths"]]
    for name, m in study["models"].items():
        assert list(m["eval"]["mean_by_length"]) == lengths, name
        for task in ("passkey", "mqar"):
            assert list(m["eval"]["by_task_length"][task]) == lengths
        for acc in m["eval"]["mean_by_length"].values():
            assert 0.0 <= acc <= 1.0
        assert len(m["train"]["lm_loss"]) == study["settings"]["steps"]
        assert all(math.isfinite(x) for x in m["train"]["lm_loss"] + m["train"]["answer_loss"])
        assert m["eval"]["examples"] and all(e["predictions"] for e in m["eval"]["examples"])
    for name in ("plots",):
        assert study[name]
    assert "| hope |" in (out / "report.md").read_text()
    for png in ("accuracy_by_length.png", "accuracy_by_depth.png", "training.png", "continual.png"):
        assert (out / png).stat().st_size > 1000, png


def test_quick_study_models_have_the_same_size_and_differ_as_described(quick_study):
    _, study = quick_study
    cfg = {name: m["config"] for name, m in study["models"].items()}
    ref = cfg["hope"]["parameters"]
    for name, c in cfg.items():
        assert abs(c["parameters"] - ref) / ref < 0.02, (name, c["parameters"], ref)
    assert cfg["hope"]["self_modifying"] and not cfg["hope_no_selfmod"]["self_modifying"]
    assert [lvl["period"] for lvl in cfg["hope"]["cms_levels"]] == [16, 2048]
    assert [lvl["period"] for lvl in cfg["hope_1level"]["cms_levels"]] == [16]
    assert cfg["llama"]["class"] == "LlamaForCausalLM"


def test_quick_study_continual_table(quick_study):
    _, study = quick_study
    cont = study["continual"]
    lrs = study["settings"]["continual_lrs"]
    assert set(cont["table"]) == {f"{m}|lr={lr:g}" for m in ("hope", "hope_1level") for lr in lrs}
    for row in cont["table"].values():
        for key in ("new_accuracy", "old_accuracy", "superseded_rate", "middle_accuracy"):
            assert 0.0 <= row[key] <= 1.0
        assert row["new_logprob"] <= 0.0 and row["old_logprob"] <= 0.0
    for run in cont["runs"]:
        # level 0 (period 16) updated once per 16 counted tokens; lr 0 still counts updates
        assert run["level_updates"]["0"] == (cont["stream_length"] - 1) // 16
        assert len([p for p in run["probes"] if p["stage"] == "end"]) == cont["n_keys"]


def test_training_data_and_streams_are_deterministic(study_module):
    from hope_hf.data import load_documents
    from hope_hf.tokenizer import train_tokenizer

    args = study_module.parse_args(["--quick", "--output_dir", "unused", "--train_lengths", "256,512", "--steps", "2"])
    tok = train_tokenizer(load_documents("stdlib", max_chars=100_000), vocab_size=1024)
    a, b = study_module.training_batches(tok, args), study_module.training_batches(tok, args)
    assert [x["ids"].shape for x in a] == [(2, 256), (1, 512)]
    for x, y in zip(a, b):
        assert x["ids"].equal(y["ids"]) and x["answer"].equal(y["answer"])
        assert x["answer"].sum() > 0 and x["valid"].sum() > x["answer"].sum()
    s1 = study_module.continual_stream(tok, 0, 0, 1024, 6, 3)
    s2 = study_module.continual_stream(tok, 0, 0, 1024, 6, 3)
    assert s1 == s2 and len(s1["ids"]) == 1024 and len(s1["new"]) == 3
    assert all(s1["new"][k] != s1["old"][k] for k in s1["new"])


def test_runner_answers_with_a_llama_baseline_as_with_full_forwards():
    """The evaluation runner takes any causal LM: a Llama is prefilled in pieces into its DynamicCache, and its
    streamed greedy answers equal greedy decoding with full forwards over the whole prompt."""
    import torch
    from test_evaluation import TOK, _ids
    from transformers import LlamaConfig, LlamaForCausalLM

    from hope_hf.evaluation import build_task_dataset, run_example

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).double().eval()
    row = build_task_dataset("mqar", TOK, 260, depths=[0.5], num_pairs=2)[0]
    rec = run_example(model, TOK, row, piece_size=37, extra_new_tokens=1)
    for query, answer, raw in zip(row["query_ids"], row["answers"], rec["raw"]):
        seq = list(row["context_ids"]) + list(query)
        out = []
        with torch.no_grad():
            for _ in range(len(_ids(" " + answer)) + 1):
                token = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                out.append(token)
                seq.append(token)
                if token == TOK.eos_token_id:
                    break
        assert raw == TOK.decode(out, skip_special_tokens=True)
    # keys and values of 2 layers x 4 heads x 8 dims in float64 for (at least) the whole context
    assert rec["cache_bytes"] >= 2 * 2 * 32 * 8 * len(row["context_ids"])

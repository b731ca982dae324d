"""The long-context evaluation suite (hope_hf.evaluation): generators, metrics, the streaming runner and the CLI."""

from __future__ import annotations

import json
import re
import string

import evaluate
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import small_config
from hope_hf import HopeForCausalLM
from hope_hf.cli import main as cli_main
from hope_hf.evaluation import (
    TASKS,
    TaskError,
    build_task_dataset,
    exact_match_metric_path,
    extract_answer,
    parse_depths,
    parse_lengths,
    recall_metric_path,
    run_example,
    run_suite,
)
from hope_hf._outputs import MANIFEST_NAME, SUITE_COMMAND, record_outputs
from hope_hf.evaluation.tasks import BABILONG_PREFIX, NIAH_PREFIX, NOISE_SENTENCES

pytestmark = pytest.mark.usefixtures("one_thread")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built locally: 70 tokens (eos, unk, letters, digits, space and . , : ? ')."""
    vocab = {"<eos>": 0, "<unk>": 1}
    for c in string.ascii_letters + string.digits + " .,:?'":
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


TOK = char_tokenizer()


def _ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def _model(layout="linear"):
    torch.manual_seed(0)
    return HopeForCausalLM(small_config(layout, vocab_size=len(TOK), pad_token_id=0, eos_token_id=0,
                                        bos_token_id=0)).double().eval()


# --------------------------------------------------------------------------------------------- parsing
def test_parse_lengths_and_depths():
    assert parse_lengths("1k,4k,16k,64k,256k,1m") == [1024, 4096, 16384, 65536, 262144, 1048576]
    assert parse_lengths("300, 2K") == [300, 2048] and parse_lengths([512, "1m"]) == [512, 1 << 20]
    assert parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("4x", "0.5k1", "", "-3", "inf", "nan", "1e400"):
        with pytest.raises(TaskError):
            parse_lengths(bad)
    with pytest.raises(TaskError, match="outside"):
        parse_depths("0,1.5")
    # a length or depth given twice runs once (its examples were counted twice under one key)
    assert parse_lengths("256,0.25k,1k") == [256, 1024] and parse_depths("0.5,0.5,1") == [0.5, 1.0]


# --------------------------------------------------------------------------------------------- generators
@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic_for_a_seed(task, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"This is the filler sentence number {w} of the local corpus today." for w in
                                ("one", "two", "three", "four", "five", "six", "seven")))
    kw = dict(depths=[0, 0.5, 1], samples=2, corpus=str(corpus))
    a = build_task_dataset(task, TOK, 600, seed=3, **kw).to_dict()
    b = build_task_dataset(task, TOK, 600, seed=3, **kw).to_dict()
    c = build_task_dataset(task, TOK, 600, seed=4, **kw).to_dict()
    assert a == b
    assert a["answers"] != c["answers"] or a["context_ids"] != c["context_ids"]
    assert len(a["id"]) == 6 and len(set(a["id"])) == 6


@pytest.mark.parametrize("task", TASKS)
def test_needles_sit_where_the_dataset_says(task, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Here is a rather plain line of prose, number {w}, for the filler." for w in
                                ("one", "two", "three", "four", "five")))
    length = 700
    ds = build_task_dataset(task, TOK, length, depths=[0, 0.3, 0.5, 1], samples=2, seed=1, corpus=str(corpus),
                            num_pairs=3, num_facts=4)
    for row in ds:
        ctx = row["context_ids"]
        assert len(ctx) + max(len(q) for q in row["query_ids"]) == length
        assert len(ctx) + len(row["query_ids"][0]) == length or task == "mqar"
        assert [TOK(" " + q, add_special_tokens=False)["input_ids"] for q in row["query_texts"]] == row["query_ids"]
        spans = list(zip(row["needle_starts"], row["needle_ends"], row["needle_texts"]))
        for start, end, text in spans:
            assert ctx[start:end] == _ids(text)
        prefix = len(_ids(BABILONG_PREFIX if task == "babilong" else NIAH_PREFIX))
        start, end, _ = spans[0]  # the needle (block) placed at the requested depth
        hay = len(ctx) - prefix - sum(e - s for s, e, _ in spans)
        before = start - prefix - sum(e - s for s, e, _ in spans if e <= start)  # filler tokens before it
        longest = max(len(_ids(" " + s)) for s in NOISE_SENTENCES) if task != "babilong" else 80
        assert abs(before - row["depth"] * hay) <= longest / 2 + 1, (before, row["depth"], hay)
        if row["depth"] == 0:
            assert before == 0
        if row["depth"] == 1:
            assert end == len(ctx) or task == "babilong"
        text = TOK.decode(ctx)
        if task in ("passkey", "number", "word"):
            assert row["answers"][0] in row["needle_texts"][0]
            if task != "word":  # digits appear nowhere else
                assert text.count(row["answers"][0]) == (2 if task == "passkey" else 1)
        elif task == "mqar":
            assert len(row["answers"]) == 3
            for q, ans in zip(row["query_texts"], row["answers"]):
                key = re.search(r"value of key (\w+)\?", q).group(1)
                assert f"The value of key {key} is {ans}." in row["needle_texts"][0]
        else:  # babilong: the answer is the asked person's LAST place in the text
            person = re.search(r"Where is (\w+)\?", row["query_texts"][0]).group(1)
            moves = re.findall(rf"{person} (?:went|moved|journeyed|travelled) to the (\w+)\.", text)
            assert moves and moves[-1] == row["answers"][0]
            assert row["needle_texts"][0].strip().startswith(person)


def test_a_million_tokens_and_too_short_lengths():
    ds = build_task_dataset("passkey", TOK, 1 << 20, depths=[0.5])
    row = ds[0]
    assert len(row["context_ids"]) + len(row["query_ids"][0]) == 1 << 20
    s, e = row["needle_starts"][0], row["needle_ends"][0]
    assert row["context_ids"][s:e] == _ids(row["needle_texts"][0])
    assert abs(s - (1 << 19)) < 200
    with pytest.raises(TaskError, match="too short"):
        build_task_dataset("mqar", TOK, 100)
    with pytest.raises(TaskError, match="unknown task"):
        build_task_dataset("nope", TOK, 100)


# --------------------------------------------------------------------------------------------- metrics
def test_shipped_metrics_score_known_answers():
    em = evaluate.load(exact_match_metric_path())
    r = em.compute(predictions=["71432", " kitchen ", "4", "Apple"], references=["71432", "kitchen", "5", "apple"])
    assert r == {"exact_match": 0.5, "correct": 2, "total": 4}
    assert em.compute(predictions=["Apple"], references=["apple"], ignore_case=True)["exact_match"] == 1.0
    rec = evaluate.load(recall_metric_path())
    r = rec.compute(predictions=[["12", "7"], ["3"], ["1", "2"]], references=[["12", "8"], ["3"], ["1", "2"]])
    assert r == {"recall_accuracy": 0.8, "example_accuracy": 2 / 3, "queries": 5}
    with pytest.raises(ValueError, match="2 predictions for 1"):
        rec.compute(predictions=[["1", "2"]], references=[["1"]])
    assert extract_answer("  71432. It is") == "71432" and extract_answer("'kitchen'") == "kitchen"
    assert extract_answer(" \n") == ""


# --------------------------------------------------------------------------------------------- runner
def _full_forward_greedy(model, ids, n):
    seq = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
            out.append(token)
            seq.append(token)
    return out


@pytest.mark.parametrize("layout", ["linear", "hybrid"])
def test_streamed_answers_equal_full_forward_greedy_decoding(layout):
    model = _model(layout)
    row = build_task_dataset("mqar", TOK, 260, depths=[0.5], num_pairs=2)[0]
    rec = run_example(model, TOK, row, piece_size=37, extra_new_tokens=1)
    for query, answer, raw in zip(row["query_ids"], row["answers"], rec["raw"]):
        n = len(_ids(" " + answer)) + 1
        expected = _full_forward_greedy(model, row["context_ids"] + query, n)
        assert raw == TOK.decode(expected, skip_special_tokens=True)
    assert rec["predictions"] == [extract_answer(t) for t in rec["raw"]]
    assert rec["cache_bytes"] > 0


def test_run_suite_writes_json_and_plots_and_scores_the_records(tmp_path):
    model = _model().float()
    run_suite(model, TOK, ["passkey", "mqar"], [280, 320], depths=[0, 1], piece_size=160,
              output_dir=str(tmp_path), progress=False, task_kwargs={"num_pairs": 1}, log=None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["tasks"].keys() == {"passkey", "mqar"} and saved["settings"]["lengths"] == [280, 320]
    for task, out in saved["tasks"].items():
        assert set(out["by_length"]) == {"280", "320"}
        assert set(out["by_length_depth"]["280"]) == {"0", "1"}
        for length in ("280", "320"):
            recs = [r for r in out["examples"] if str(r["length"]) == length]
            hits = [p == a for r in recs for p, a in zip(r["predictions"], r["answers"])]
            assert out["by_length"][length] == sum(hits) / len(hits)
    for name in ("accuracy_by_length.png", "depth_passkey.png", "depth_mqar.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_task_with_stream_learning(tmp_path, capsys):
    model = _model()
    folder = tmp_path / "model"
    model.float().save_pretrained(folder)
    TOK.save_pretrained(folder)
    out = tmp_path / "out"
    rc = cli_main(["eval", "--task", "passkey", "--lengths", "250", "--depths", "0.5", "--model_name_or_path",
                   str(folder), "--output_dir", str(out), "--piece_size", "50", "--stream_learning", "--learn_lr",
                   "0.01", "--learn_chunk", "32", "--no_plots", "--no_progress", "--device", "cpu"])
    assert rc == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["stream_learning"] == {"lr": 0.01, "chunk_size": 32}
    (example,) = saved["tasks"]["passkey"]["examples"]
    learned = example["stream_learning"]  # periods of small_config: level 0 frozen, level 1 every 16 tokens
    assert learned["tokens_learned"] == 250 - 1 - len(TOK(" What is the pass key? The pass key is")["input_ids"])
    assert learned["level_updates"] == {"1": learned["tokens_learned"] // 16}
    assert "accuracy_by_length" in capsys.readouterr().out
    assert cli_main(["eval", "--task", "nope", "--model_name_or_path", str(folder), "--output_dir", str(out)]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert cli_main(["eval", "--task", "passkey", "--lengths", "3x", "--model_name_or_path", str(folder),
                     "--output_dir", str(out)]) == 2


def test_the_suite_checks_every_task_and_length_first_and_keeps_results(tmp_path, capsys):
    """A length too short for the second task fails before the first task runs (the model is never called), and an
    earlier results.json is kept unless --overwrite_output_dir."""

    class NeverCalled(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the model ran before every (task, length) was checked")

        def eval(self):
            return self

    with pytest.raises(TaskError, match="too short for task 'mqar'"):
        run_suite(NeverCalled(), TOK, ["passkey", "mqar"], [280], depths=[0.5], progress=False, log=None)
    model = _model()
    folder = tmp_path / "model"
    model.float().save_pretrained(folder)
    TOK.save_pretrained(folder)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"mine": 1}')
    args = ["eval", "--task", "passkey", "--lengths", "250", "--depths", "0.5", "--model_name_or_path", str(folder),
            "--output_dir", str(out), "--piece_size", "125", "--no_plots", "--no_progress", "--device", "cpu"]
    assert cli_main(args) == 2
    assert "results.json" in capsys.readouterr().err and json.loads((out / "results.json").read_text()) == {"mine": 1}
    for stale in ("accuracy_by_length.png", "depth_word.png"):  # an earlier run's plots, recorded as its own
        (out / stale).write_bytes(b"\x89PNG")
    record_outputs(str(out), SUITE_COMMAND, ["accuracy_by_length.png", "depth_word.png"])
    (out / "notes.txt").write_text("mine")
    assert cli_main([*args, "--overwrite_output_dir"]) == 0
    assert "passkey" in json.loads((out / "results.json").read_text())["tasks"]
    # no plot of another run is left; the user's file is
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "notes.txt", "results.json"]


def test_missing_matplotlib_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    args = ["eval", "--task", "passkey", "--lengths", "250", "--model_name_or_path", str(tmp_path / "not-loaded"),
            "--output_dir", str(tmp_path / "out")]
    assert cli_main(args) == 2
    assert "the plots need matplotlib" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_mistyped_task_option_is_named(capsys):
    """Without `--task` the perplexity evaluation parses the arguments: its suggestions include the suite's."""
    assert cli_main(["eval", "--tasks", "passkey", "--model_name_or_path", "m", "--output_dir", "o"]) == 2
    err = capsys.readouterr().err
    assert "--tasks (did you mean --task?)" in err and "hope-hf eval --task all --help" in err
    assert "--output_dir (an option of the long-context suite, which --task selects)" in err


def test_the_suite_refuses_an_abbreviated_option(tmp_path, capsys):
    """`--length 1k` is not taken for `--lengths`: one line naming it, before any model is loaded."""
    args = ["eval", "--task", "passkey", "--length", "250", "--model_name_or_path", str(tmp_path / "not-loaded"),
            "--output_dir", str(tmp_path / "out")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --length (did you mean --lengths?)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

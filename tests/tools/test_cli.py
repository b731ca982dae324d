"""The `hope-hf` CLI end to end on a tiny config: train -> eval -> generate, resume, convert, bad input, --help."""

import ast
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _training_utils import one_thread
from hope_hf import HopeForCausalLM
from hope_hf.cli import ARGUMENT_CLASSES, main

TINY = ["--config_overrides", "hidden_size=32,num_attention_heads=2,chunk_size=8",
        "--seq_len", "32", "--vocab_size", "320", "--max_corpus_chars", "150000",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--learning_rate", "5e-3",
        "--warmup_steps", "2", "--logging_steps", "5", "--max_eval_samples", "24", "--disable_tqdm", "true",
        "--sample_max_new_tokens", "8", "--seed", "0"]


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _train(out, *extra, steps=40):
    return main(["train", "--output_dir", str(out), *TINY, "--max_steps", str(steps), "--eval_steps", str(steps),
                 "--save_steps", str(max(1, steps // 2)), *extra])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    with one_thread():
        assert _train(out) == 0
    return out


def test_train_saves_model_tokenizer_card_and_the_loss_falls(run_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "all_results.json"):
        assert (run_dir / name).exists(), name
    m = json.loads((run_dir / "all_results.json").read_text())
    assert m["global_step"] == 40
    assert m["first_logged_train_loss"] - m["last_logged_train_loss"] > 0.7, m
    assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    assert m["unigram_perplexity"] > 1
    # the CUDA switches of `train` (graphs, compiled chunk step) are runtime settings: never in the saved config
    saved = json.loads((run_dir / "config.json").read_text())
    assert "memory_cuda_graphs" not in saved and "compile_chunk_step" not in saved
    card = (run_dir / "README.md").read_text()
    assert "library_name: transformers" in card and f"{m['eval_perplexity']:.2f}" in card
    assert isinstance(m["sample"], str) and m["sample"].startswith("def")


def test_eval_reproduces_the_training_runs_heldout_perplexity(run_dir, capsys, tmp_path):
    """`hope-hf eval` (the shipped `evaluate` metric, token-weighted NLL) on the held-out documents that `train`
    evaluated on gives the Trainer's exp(eval_loss) (all blocks are full, so the two means agree)."""
    capsys.readouterr()
    out_file = tmp_path / "eval.json"
    assert main(["eval", "--model_name_or_path", str(run_dir), "--seq_len", "32", "--max_corpus_chars", "150000",
                 "--max_eval_samples", "24", "--batch_size", "5", "--output_file", str(out_file)]) == 0
    result = json.loads(out_file.read_text())
    trained = json.loads((run_dir / "all_results.json").read_text())
    assert result["sequences"] == 24 and result["num_tokens"] == 24 * 31
    assert result["perplexity"] == pytest.approx(trained["eval_perplexity"], rel=1e-4)
    assert json.loads(capsys.readouterr().out)["perplexity"] == result["perplexity"]


def test_generate_is_the_models_greedy_continuation(run_dir, capsys):
    capsys.readouterr()
    assert main(["generate", "--model_name_or_path", str(run_dir), "--prompt", "import os\n",
                 "--max_new_tokens", "12"]) == 0
    printed = capsys.readouterr().out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir)
    model = HopeForCausalLM.from_pretrained(run_dir).eval()
    ids = tok("import os\n", return_tensors="pt", add_special_tokens=False)["input_ids"]
    # greedy decoding by hand, full forward each step (no cache): the reference continuation
    with torch.no_grad():
        for _ in range(12):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert printed.strip() == tok.decode(ids[0], skip_special_tokens=True).strip()


def test_interrupted_run_resumes_from_its_last_checkpoint_and_ends_at_the_same_weights(tmp_path, capsys):
    full = tmp_path / "full"
    assert _train(full, steps=6) == 0
    part = tmp_path / "part"
    shutil.copytree(full, part)
    # what a run killed after checkpoint-3 leaves: the tokenizer and checkpoint-3, nothing later
    shutil.rmtree(part / "checkpoint-6")
    for f in part.iterdir():
        if f.is_file() and not f.name.startswith("tokenizer"):
            f.unlink()
    capsys.readouterr()
    assert _train(part, steps=6) == 0
    assert "Resuming the interrupted run from" in capsys.readouterr().out
    a = HopeForCausalLM.from_pretrained(full)
    b = HopeForCausalLM.from_pretrained(part)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=n)


def test_existing_output_dir_is_never_overwritten_silently(run_dir, tmp_path, capsys):
    before = (run_dir / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert _train(run_dir, steps=2) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (run_dir / "model.safetensors").read_bytes() == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    assert _train(other, steps=2) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert (other / "mine.txt").read_text() == "keep me"
    assert _train(other, "--overwrite_output_dir", steps=2) == 0
    assert not (other / "mine.txt").exists() and (other / "model.safetensors").exists()


def test_train_streams_a_local_jsonl_corpus(tmp_path, capsys):
    """--streaming with a local JSON-lines file and its own text column: trains, evaluates, saves."""
    from hope_hf.data import stdlib_source_files

    rows = [{"id": i, "body": f.read_text(errors="replace")} for i, f in enumerate(stdlib_source_files(120_000))]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "stream"
    assert main(["train", "--output_dir", str(out), *TINY, "--data", str(corpus), "--text_column", "body",
                 "--streaming", "--max_steps", "8", "--eval_steps", "8", "--save_steps", "8"]) == 0
    m = json.loads((out / "all_results.json").read_text())
    assert m["global_step"] == 8 and math.isfinite(m["eval_loss"]) and "unigram_perplexity" not in m
    assert HopeForCausalLM.from_pretrained(out).config.vocab_size == 320
    assert main(["train", "--output_dir", str(tmp_path / "s2"), *TINY, "--data", str(corpus), "--streaming",
                 "--text_column", "body", "--max_steps", "-1"]) == 2
    assert "--streaming needs --max_steps > 0" in capsys.readouterr().err


def test_epochs_without_max_steps_and_the_tokens_reported_with_a_short_last_batch(tmp_path, capsys):
    """--num_train_epochs alone trains for them (not for the default --max_steps); train_tokens counts the rows
    trained on, a short last batch of each epoch as short as it was."""
    out = tmp_path / "epochs"
    args = [arg for arg in TINY if arg != "150000"]
    args[args.index("--max_corpus_chars") + 1 : args.index("--max_corpus_chars") + 1] = ["30000"]
    assert main(["train", "--output_dir", str(out), *args, "--num_train_epochs", "2", "--eval_strategy", "no",
                 "--save_strategy", "no", "--sample_max_new_tokens", "0"]) == 0
    rows = int(re.search(r"Data: (\d+) training", capsys.readouterr().out).group(1))
    assert rows % 8  # the case in question: each epoch ends on a short batch
    m = json.loads((out / "all_results.json").read_text())
    assert m["global_step"] == 2 * math.ceil(rows / 8)
    assert m["train_tokens"] == 2 * rows * 32
    assert f"{m['train_tokens']:,} training tokens seen" in (out / "README.md").read_text()


def test_training_logs_print_numbers_and_the_runtime_once(tmp_path, capsys):
    """The log lines of a 2-step run, with the progress bar as users see it: every value a number (not a quoted
    string), and the run's time and speed only in the summary that ends training."""
    capsys.readouterr()
    assert _train(tmp_path / "run", "--logging_steps", "1", "--disable_tqdm", "false", steps=2) == 0
    out = capsys.readouterr().out
    lines = [ast.literal_eval(line) for line in re.findall(r"^\s*(\{.*\})\s*$", out, re.M)]
    assert [line["loss"] for line in lines if "loss" in line] and any("eval_loss" in line for line in lines), out
    for line in lines:
        assert all(isinstance(v, (int, float)) for v in line.values()), line
        assert "total_flos" not in line
    assert [i for i, line in enumerate(lines) if "train_runtime" in line] == [len(lines) - 1], out
    assert "train_loss" in lines[-1] and "train_tokens_per_second" not in out


def test_config_overrides_take_json_lists_and_objects():
    from hope_hf._cli_arguments import _parse_overrides

    levels = '[{"period":4,"intermediate_size":32},{"period":8,"intermediate_size":16}]'
    types = '["linear_attention","full_attention"]'
    assert _parse_overrides(f"hidden_size=32,cms_levels={levels},layer_types={types}") == {
        "hidden_size": 32,
        "cms_levels": [{"period": 4, "intermediate_size": 32}, {"period": 8, "intermediate_size": 16}],
        "layer_types": ["linear_attention", "full_attention"]}
    assert _parse_overrides('name="a,b",chunk_size=8') == {"name": "a,b", "chunk_size": 8}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "huge"], "unknown preset 'huge'; allowed presets: tiny"),
        (["--data", "/nonexistent/corpus.txt"], "--data: data file '/nonexistent/corpus.txt' does not exist"),
        (["--seq_len", "1"], "--seq_len: seq_len must be an int >= 2"),
        (["--config_overrides", "layer_types=[\"full_attention\"],num_hidden_layers=1,max_position_embeddings=16"],
         "seq_len=32 is longer than the model can take"),
        (["--config_overrides", "hidden_size"], "--config_overrides: expected 'key=value'"),
        (["--config_overrides", "hiden_size=32"], "unknown config field(s) 'hiden_size' (did you mean 'hidden_size'?)"),
        (["--config_overrides", "hidden_size=33"], "--config_overrides 'hidden_size=33': `hidden_size` (33) must be"),
        (["--seqlen", "32"], "unrecognized arguments: --seqlen (did you mean --seq_len?)"),
        # an abbreviation is refused, not taken for the option it starts (argparse's default)
        (["--max_step", "5"], "unrecognized arguments: --max_step (did you mean --max_steps?)"),
        (["--preset=tin", "--seq_le", "16"], "unrecognized arguments: --seq_le (did you mean --seq_len?)"),
        (["--vocab_size", "100"], "--vocab_size must be >= 258"),
        (["--max_steps", "0"], "--max_steps must be >= 1, or -1"),
        (["--max_eval_samples", "0"], "--max_eval_samples must be >= 1"),
    ],
)
def test_bad_input_fails_with_an_error_naming_the_problem(tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    rc = main(["train", "--output_dir", str(out), *TINY, "--max_steps", "2", *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before anything (a tokenizer, a folder) was written


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert _train(target, steps=2) == 2
    assert "--output_dir" in capsys.readouterr().err and target.read_text() == "keep me"


def test_eval_and_generate_bad_input_are_cli_errors(run_dir, capsys):
    cases = [
        (["eval", "--max_eval_samples", "0"], "--max_eval_samples must be >= 1"),
        (["eval", "--batchsize", "4"], "unrecognized arguments: --batchsize (did you mean --batch_size?)"),
        (["generate", "--do_sample", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
        # abbreviations are refused by every command
        (["eval", "--batch", "4"], "unrecognized arguments: --batch (did you mean --batch_size?)"),
        (["generate", "--max_new", "4"], "unrecognized arguments: --max_new (did you mean --max_new_tokens?)"),
        (["convert", "--llama", "x", "--output_dir", "y"], "--llama (did you mean --llama_model?)"),
    ]
    if not torch.cuda.is_available():
        cases.append((["eval", "--device", "cuda"], "--device 'cuda': no CUDA device is available"))
    for argv, message in cases:
        assert main([*argv, "--model_name_or_path", str(run_dir)]) == 2, argv
        assert message in capsys.readouterr().err, argv


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_output_dir_checks_every_input_before_deleting(run_dir, tmp_path, capsys):
    """--overwrite_output_dir deletes only after every input is checked, and never the run's own input."""
    cont = tmp_path / "cont"
    shutil.copytree(run_dir, cont, ignore=shutil.ignore_patterns("checkpoint-*"))
    before = _snapshot(cont)
    assert main(["train", "--model_name_or_path", str(cont), "--output_dir", str(cont), "--overwrite_output_dir",
                 "--max_steps", "2"]) == 2
    assert "--model_name_or_path" in capsys.readouterr().err
    assert _train(cont, "--overwrite_output_dir", "--data", str(tmp_path / "typo.txt"), steps=2) == 2
    assert "data file" in capsys.readouterr().err
    assert _train(cont, "--overwrite_output_dir", "--config_overrides", "hidden_size=33", steps=2) == 2
    assert _snapshot(cont) == before


def test_resume_from_checkpoint_keeps_user_files_and_uses_the_checkpoints_tokenizer(run_dir, tmp_path, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "README.md").write_text("# my notes")
    checkpoint = str(run_dir / "checkpoint-20")
    assert _train(user, "--resume_from_checkpoint", checkpoint, steps=22) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err and (user / "README.md").read_text() == "# my notes"
    # a --vocab_size other than the run's: the checkpoint's tokenizer (320 tokens) is used, none is trained
    out = tmp_path / "resumed"
    assert _train(out, "--resume_from_checkpoint", checkpoint, "--vocab_size", "400", steps=22) == 0
    assert "Trained a byte-level BPE tokenizer" not in capsys.readouterr().out
    assert json.loads((out / "all_results.json").read_text())["global_step"] == 22
    assert HopeForCausalLM.from_pretrained(out).config.vocab_size == 320


def test_a_run_stopped_before_its_first_checkpoint_runs_again_with_the_same_command(run_dir, tmp_path, capsys):
    """What `train` leaves when stopped before its first checkpoint (its tokenizer and the record of what it wrote)
    does not block the re-run."""
    from hope_hf._outputs import TRAIN_COMMAND, record_outputs

    out = tmp_path / "early"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(run_dir / name, out / name)
    record_outputs(str(out), TRAIN_COMMAND, ["tokenizer.json", "tokenizer_config.json"])
    assert _train(out, steps=2) == 0
    assert (out / "all_results.json").exists()
    # a user's file next to them still blocks the folder
    other = tmp_path / "other"
    shutil.copytree(out, other, ignore=lambda d, names: [n for n in names if not n.startswith("tokenizer")])
    (other / "mine.txt").write_text("keep me")
    assert _train(other, steps=2) == 2 and (other / "mine.txt").read_text() == "keep me"


def test_load_best_model_at_end_reports_the_eval_of_the_saved_weights(tmp_path, capsys):
    out = tmp_path / "best"
    # "best" = the highest eval loss (the first evaluation, before the loss falls): not the last step's
    assert _train(out, "--eval_steps", "3", "--save_steps", "3", "--load_best_model_at_end",
                  "--metric_for_best_model", "eval_loss", "--greater_is_better", "true", steps=9) == 0
    m = json.loads((out / "all_results.json").read_text())
    state = json.loads((out / "checkpoint-9" / "trainer_state.json").read_text())
    evals = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
    assert state["best_metric"] == max(evals) > evals[-1]
    assert m["eval_loss"] == pytest.approx(state["best_metric"], rel=1e-5)
    assert f"{m['eval_loss']:.4f}" in (out / "README.md").read_text()


def test_tokenizer_that_does_not_match_the_model_is_refused(run_dir, tmp_path, capsys):
    from hope_hf.tokenizer import train_tokenizer

    from hope_hf.data import load_documents

    big = train_tokenizer(load_documents("stdlib", max_chars=60_000), vocab_size=400)
    assert len(big) == 400
    big.save_pretrained(tmp_path / "tok")
    capsys.readouterr()
    assert main(["eval", "--model_name_or_path", str(run_dir), "--tokenizer_name_or_path", str(tmp_path / "tok")]) == 2
    assert "the tokenizer has 400 tokens but the model's vocab_size is 320" in capsys.readouterr().err
    assert main(["eval", "--model_name_or_path", str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_convert_llama_then_generate(tmp_path, capsys, run_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         bos_token_id=0, eos_token_id=0, pad_token_id=1))  # the run's tokenizer ids
    llama.save_pretrained(tmp_path / "llama")
    shutil.copy(run_dir / "tokenizer.json", tmp_path / "llama")
    shutil.copy(run_dir / "tokenizer_config.json", tmp_path / "llama")
    assert main(["convert", "--llama_model", str(tmp_path / "llama"), "--output_dir", str(tmp_path / "hope"),
                 "--extra_levels", "[64]"]) == 0
    hope = HopeForCausalLM.from_pretrained(tmp_path / "hope").eval()
    assert [lvl["period"] for lvl in hope.config.cms_levels] == [0, 64]
    x = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hope(input_ids=x).logits, llama.eval()(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "hope" / "tokenizer.json").exists()
    assert main(["convert", "--llama_model", str(tmp_path / "llama"), "--output_dir", str(tmp_path / "hope")]) == 2
    assert "is not empty" in capsys.readouterr().err
    # --overwrite_output_dir: the source is never the target, and nothing is deleted before every check passed
    source = _snapshot(tmp_path / "llama")
    for target in (tmp_path / "llama", tmp_path / "llama" / "sub", tmp_path):
        assert main(["convert", "--llama_model", str(tmp_path / "llama"), "--output_dir", str(target),
                     "--overwrite_output_dir"]) == 2
        assert "the conversion would overwrite its source" in capsys.readouterr().err
    assert _snapshot(tmp_path / "llama") == source
    converted = _snapshot(tmp_path / "hope")
    assert main(["convert", "--llama_model", str(tmp_path / "llama"), "--output_dir", str(tmp_path / "hope"),
                 "--extra_levels", '{"a": 1}', "--overwrite_output_dir"]) == 2
    assert "--extra_levels must be a JSON list" in capsys.readouterr().err
    assert _snapshot(tmp_path / "hope") == converted
    (tmp_path / "file").write_text("keep me")
    assert main(["convert", "--llama_model", str(tmp_path / "llama"), "--output_dir", str(tmp_path / "file")]) == 2
    assert "--output_dir" in capsys.readouterr().err and (tmp_path / "file").read_text() == "keep me"
    assert main(["generate", "--model_name_or_path", str(tmp_path / "hope"), "--max_new_tokens", "4"]) == 0
    # a model whose special-token ids differ from the tokenizer's is refused
    llama.config.eos_token_id = 2
    llama.save_pretrained(tmp_path / "llama")
    assert main(["convert", "--llama_model", str(tmp_path / "llama"), "--output_dir", str(tmp_path / "hope2")]) == 0
    capsys.readouterr()
    assert main(["generate", "--model_name_or_path", str(tmp_path / "hope2"), "--max_new_tokens", "4"]) == 2
    assert "eos_token_id is 0 but the model's config.eos_token_id is 2" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    for command, classes in ARGUMENT_CLASSES.items():
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert text.startswith(f"usage: hope-hf {command}")
        for cls in classes:
            for f in dataclasses.fields(cls):
                if not f.init:
                    continue
                assert f"--{f.name}" in text, (command, f.name)
                assert f.metadata.get("help"), (command, f.name)
    # without a command: the usage lists the commands (exit status 2, as argparse does for a usage error)
    assert main([]) == 2
    usage = capsys.readouterr().out
    assert all(f"  {c} " in usage for c in ARGUMENT_CLASSES)


def test_train_help_leads_with_hopes_options_and_help_all_lists_every_trainer_option(capsys):
    from hope_hf.training.arguments import HopeTrainingArguments

    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.index(" model: ") < text.index(" data: ") < text.index(" run: ") < text.index(" training (")
    assert "--help-all" in text and "--max_steps MAX_STEPS" in text and "(default: 160)" in text
    assert "--gradient_accumulation_steps" in text and "--gradient_accumulation_steps GRADIENT" not in text
    assert main(["train", "--help-all"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.index(" model: ") < text.index(" training (")
    for f in dataclasses.fields(HopeTrainingArguments):
        if f.init:
            assert f"--{f.name}" in text, f.name
            assert f.metadata.get("help"), f.name  # TrainingArguments' own fields have help too


def test_help_imports_neither_torch_nor_the_model(tmp_path):
    """`hope-hf --help` and `hope-hf COMMAND --help` answer without importing torch (seconds, not tens of seconds)."""
    root = Path(__file__).resolve().parents[1]
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["generate", "-h"], ["convert", "--help"]):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "hope_hf.cli", *argv], capture_output=True,
                              text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
        assert done.returncode == 0 and "usage: hope-hf" in done.stdout, (argv, done.stderr[-2000:])
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        assert "hope_hf._cli_arguments" in imported and not imported & {"torch", "hope_hf.modeling_hope"}, argv


@pytest.mark.slow
def test_train_runs_unchanged_under_accelerate_launch_on_two_cpu_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m hope_hf.cli train ...` on a GPU-less machine: the CLI adds
    --use_cpu itself, both ranks train one synchronised model (gloo DDP), rank 0 saves it."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp-run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    repo = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         "-m", "hope_hf.cli", "train", "--output_dir", str(out), *TINY, "--max_steps", "6", "--eval_steps", "6",
         "--save_steps", "3", "--per_device_train_batch_size", "4"],
        env=env, capture_output=True, text=True, timeout=300, cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    m = json.loads((out / "all_results.json").read_text())
    assert m["global_step"] == 6 and m["train_tokens"] == 6 * 4 * 2 * 32
    assert proc.stdout.count("eval loss") == 1  # only rank 0 reports
    args = torch.load(out / "checkpoint-6" / "training_args.bin", weights_only=False)
    assert args.use_cpu and args.world_size == 2
    HopeForCausalLM.from_pretrained(out)

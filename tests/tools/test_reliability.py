"""Reliability: every bad input refused by name, non-finite values contained, nothing of the user's lost.

One section per numbered problem of the issue; `test_robustness.py` runs the whole audit as a table of cases.
"""

from __future__ import annotations

import json
import warnings
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import small_config
from hope_hf import HopeForCausalLM
from hope_hf._outputs import MANIFEST_NAME
from hope_hf.cli import main
from test_evaluation import char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = char_tokenizer()


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny HOPE model with its (character-level) tokenizer."""
    folder = tmp_path_factory.mktemp("reliability") / "model"
    torch.manual_seed(0)
    model = HopeForCausalLM(small_config(vocab_size=len(TOK), pad_token_id=0, eos_token_id=0, bos_token_id=0))
    model.save_pretrained(folder)
    TOK.save_pretrained(folder)
    return folder


def _suite(model_dir, out, *extra):
    return main(["eval", "--task", "passkey", "--lengths", "250", "--depths", "0.5", "--model_name_or_path",
                 str(model_dir), "--output_dir", str(out), "--piece_size", "125", "--no_progress", "--device", "cpu",
                 *extra])


# ============================================================================ 1. no user file deleted or overwritten
def test_suite_never_deletes_or_overwrites_a_users_plots(model_dir, tmp_path, capsys):
    figs = tmp_path / "figs"
    figs.mkdir()
    mine = {"accuracy_by_length.png": b"my plot", "depth_passkey.png": b"my other plot"}
    for name, data in mine.items():
        (figs / name).write_bytes(data)
    for extra in (["--no_plots"], []):  # refused, with or without plots: nothing written, nothing removed
        capsys.readouterr()
        assert _suite(model_dir, figs, *extra) == 2
        err = capsys.readouterr().err
        assert "--overwrite_output_dir" in err and "not empty" in err and len(err.strip().splitlines()) == 1
        assert _snapshot(figs) == {Path(k): v for k, v in mine.items()}
    # asked to write there without plots: the user's files of the plots' names stay, untouched
    assert _suite(model_dir, figs, "--no_plots", "--overwrite_output_dir") == 0
    for name, data in mine.items():
        assert (figs / name).read_bytes() == data
    assert (figs / "results.json").exists() and (figs / MANIFEST_NAME).exists()


def test_suite_removes_only_its_own_unchanged_stale_plots(model_dir, tmp_path):
    out = tmp_path / "run"
    assert _suite(model_dir, out) == 0
    assert (out / "depth_passkey.png").exists() and (out / "accuracy_by_length.png").exists()
    (out / "accuracy_by_length.png").write_bytes(b"edited by the user since")  # no longer what the run wrote
    assert _suite(model_dir, out, "--no_plots") == 2  # an earlier run: its results.json needs the flag
    assert _suite(model_dir, out, "--no_plots", "--overwrite_output_dir") == 0
    assert not (out / "depth_passkey.png").exists()  # the earlier run's own, unchanged, stale plot
    assert (out / "accuracy_by_length.png").read_bytes() == b"edited by the user since"


def test_eval_output_file_is_not_replaced_without_a_flag(model_dir, tmp_path, capsys):
    existing = tmp_path / "existing.json"
    existing.write_text('{"mine": 1}')
    args = ["eval", "--model_name_or_path", str(model_dir), "--seq_len", "16", "--max_corpus_chars", "20000",
            "--eval_every", "2", "--max_eval_samples", "2", "--device", "cpu", "--output_file", str(existing)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--output_file" in err and "--overwrite_output_file" in err and "already exists" in err
    assert existing.read_text() == '{"mine": 1}'
    assert main([*args, "--overwrite_output_file"]) == 0
    assert "perplexity" in json.loads(existing.read_text())
    # a new file in a folder not yet there is written (the folder made)
    new = tmp_path / "sub" / "new.json"
    assert main([*args[:-1], str(new)]) == 0 and "perplexity" in json.loads(new.read_text())


# ============================================================================ 2. a partial last checkpoint
def _train(out, *extra, steps):
    from test_cli import TINY

    return main(["train", "--output_dir", str(out), *TINY, "--max_steps", str(steps), "--eval_steps", str(steps),
                 "--save_steps", str(max(1, steps // 2)), "--sample_max_new_tokens", "0", *extra])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert _train(out, steps=4) == 0
    return out


def _interrupted_while_saving(full_run, part, step=4):
    """What a run killed while it saved checkpoint-`step` leaves: its weights written, no trainer_state.json yet, and
    nothing of the finished run."""
    shutil.copytree(full_run, part)
    (part / f"checkpoint-{step}" / "trainer_state.json").unlink()
    for f in part.iterdir():
        if f.is_file() and not f.name.startswith("tokenizer") and f.name != MANIFEST_NAME:
            f.unlink()


def test_resume_skips_a_partial_last_checkpoint_with_a_warning(full_run, tmp_path, capsys):
    part = tmp_path / "part"
    _interrupted_while_saving(full_run, part)
    capsys.readouterr()
    assert _train(part, steps=4) == 0
    out = capsys.readouterr().out
    assert "skipping the incomplete checkpoint" in out and "checkpoint-4" in out and "trainer_state.json" in out
    assert f"Resuming the interrupted run from {part / 'checkpoint-2'}" in out
    assert json.loads((part / "all_results.json").read_text())["global_step"] == 4
    a, b = HopeForCausalLM.from_pretrained(full_run), HopeForCausalLM.from_pretrained(part)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=n)


def test_resume_from_an_incomplete_checkpoint_named_explicitly_is_refused(full_run, tmp_path, capsys):
    part = tmp_path / "part"
    _interrupted_while_saving(full_run, part)
    capsys.readouterr()
    assert _train(tmp_path / "new", "--resume_from_checkpoint", str(part / "checkpoint-4"), steps=4) == 2
    err = capsys.readouterr().err
    assert "--resume_from_checkpoint" in err and "not a complete checkpoint" in err and "trainer_state.json" in err
    assert not (tmp_path / "new").exists()


# ============================================================================ 4. non-empty folders refused
def test_a_folder_holding_only_a_users_tokenizer_is_refused(full_run, tmp_path, capsys):
    user = tmp_path / "user"
    user.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(full_run / name, user / name)
    before = _snapshot(user)
    capsys.readouterr()
    assert _train(user, steps=2) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite_output_dir" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(user) == before


def test_a_users_checkpoint_named_folder_is_not_taken_for_a_checkpoint(tmp_path, capsys):
    user = tmp_path / "user"
    (user / "checkpoint-5").mkdir(parents=True)
    (user / "checkpoint-5" / "notes.txt").write_text("mine")
    before = _snapshot(user)
    capsys.readouterr()
    assert _train(user, steps=2) == 2
    err = capsys.readouterr().err
    assert "checkpoint-5 (it has no trainer_state.json" in err and "--overwrite_output_dir" in err
    assert _snapshot(user) == before and sorted(p.name for p in (user / "checkpoint-5").iterdir()) == ["notes.txt"]
    # named as the checkpoint to resume: refused too, nothing written into it
    assert _train(tmp_path / "new", "--resume_from_checkpoint", str(user / "checkpoint-5"), steps=2) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err and _snapshot(user) == before


def test_a_finished_run_records_what_it_wrote(full_run):
    from hope_hf._outputs import read_manifest

    manifest = read_manifest(str(full_run))
    assert manifest["command"] == "train"
    for name in ("tokenizer.json", "model.safetensors", "config.json", "README.md", "all_results.json"):
        assert name in manifest["files"], name


# ============================================================================ 5. one line, not a traceback
class _Evil:
    """A pickle that would run a shell command when loaded without `weights_only`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _damage(folder: Path, how: str, tmp_path: Path) -> str:
    """Damage a copy of a saved model as the audit did; returns the file the error must name."""
    weights = folder / "model.safetensors"
    config = json.loads((folder / "config.json").read_text())
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "weights cut short at the end":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "empty weights":
        weights.write_bytes(b"")
    elif how == "garbage weights":
        weights.write_bytes(b"x" * 5000)
    elif how == "crafted pickle":
        weights.unlink()
        torch.save(_Evil(tmp_path / "pwned"), folder / "pytorch_model.bin")
        return "pytorch_model.bin"
    elif how == "truncated tokenizer":
        (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text()[:100])
        return "tokenizer.json"
    elif how == "config not json":
        (folder / "config.json").write_text('{"hidden_size":')
        return "config.json"
    elif how == "config field of the wrong type":
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "32"}))
        return "config.json"
    elif how == "width that does not match the weights":
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64, "head_dim": 16}))
    return "model.safetensors"


DAMAGES = ["truncated weights", "weights cut short at the end", "empty weights", "garbage weights", "crafted pickle",
           "truncated tokenizer", "config not json", "config field of the wrong type",
           "width that does not match the weights"]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(model_dir, tmp_path, capsys, how, command):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    name = _damage(folder, how, tmp_path)
    argv = {"generate": ["generate", "--max_new_tokens", "2"],
            "eval": ["eval", "--seq_len", "16", "--max_corpus_chars", "20000", "--eval_every", "2"]}[command]
    capsys.readouterr()
    assert main([*argv, "--model_name_or_path", str(folder), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith(f"hope-hf {command}: error: --model_name_or_path") and name in line, line
    if how == "config field of the wrong type":
        assert "hidden_size" in line
    if how == "width that does not match the weights":
        assert "do not match" in line and "(70, 32) in the file, (70, 64) for config.json" in line
    assert not (tmp_path / "pwned").exists()


def test_debug_shows_the_traceback(model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    _damage(folder, "empty weights", tmp_path)
    with pytest.raises(Exception, match="model.safetensors"):
        main(["--debug", "generate", "--model_name_or_path", str(folder), "--device", "cpu"])


def test_an_unexpected_error_is_one_line_with_exit_status_1(model_dir, capsys, monkeypatch):
    import hope_hf._cli_commands as commands

    def boom(*args, **kwargs):
        raise RuntimeError("something broke\nwith a second line")

    monkeypatch.setattr(commands, "generate_text", boom)
    capsys.readouterr()
    assert main(["generate", "--model_name_or_path", str(model_dir), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "second line" not in err
    assert "hope-hf generate: error: RuntimeError: something broke" in err and "--debug" in err


def test_a_crafted_file_in_the_checkpoint_to_resume_is_named(full_run, tmp_path, capsys):
    part = tmp_path / "part"
    _interrupted_while_saving(full_run, part)
    torch.save(_Evil(tmp_path / "pwned"), part / "checkpoint-2" / "rng_state.pth")
    capsys.readouterr()
    assert _train(part, steps=4) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "pwned").exists()
    assert "cannot resume from" in err and "checkpoint-2" in err and "rng_state.pth" in err


# ============================================================================ 6. inputs refused by name at the entry
def _ids(batch=2, length=10):
    return torch.randint(1, 61, (batch, length))


BAD_INPUTS = [
    # (case, forward kwargs, what the message must say)
    ("id >= vocab_size", lambda: dict(input_ids=_ids().fill_(61)),
     r"`input_ids` must hold ids in \[0, vocab_size=61\)"),
    ("negative id", lambda: dict(input_ids=-_ids()), r"`input_ids` must hold ids in \[0, vocab_size=61\)"),
    ("float ids", lambda: dict(input_ids=_ids().float()), "`input_ids` must hold integer token ids"),
    ("bool ids", lambda: dict(input_ids=_ids() > 5), "`input_ids` must hold integer token ids"),
    ("1-D ids", lambda: dict(input_ids=_ids()[0]), r"`input_ids` must be 2-D, \(batch, length\).*input_ids\[None\]"),
    ("3-D ids", lambda: dict(input_ids=_ids()[None]), r"`input_ids` must be 2-D"),
    ("empty batch", lambda: dict(input_ids=_ids()[:0]), "`input_ids` holds no sequence"),
    ("no token", lambda: dict(input_ids=_ids()[:, :0]), "no input tokens"),
    ("all padding", lambda: dict(input_ids=_ids(), attention_mask=torch.zeros(2, 10, dtype=torch.long)),
     "`attention_mask` marks every new position as padding"),
    ("mask longer than the input", lambda: dict(input_ids=_ids(), attention_mask=torch.ones(2, 14, dtype=torch.long)),
     r"`attention_mask` must have shape \(batch=2, length=10\)"),
    ("mask of another batch", lambda: dict(input_ids=_ids(), attention_mask=torch.ones(3, 10, dtype=torch.long)),
     r"`attention_mask` must have shape \(batch=2, length=10\)"),
    ("labels of another shape", lambda: dict(input_ids=_ids(), labels=_ids()[:, :5]),
     r"`labels` must have the shape of the input \(batch, length\) = \(2, 10\)"),
    ("labels out of range", lambda: dict(input_ids=_ids(), labels=_ids() + 100),
     r"`labels` must hold ids in \[0, vocab_size=61\) or -100"),
    ("labels with logits_to_keep", lambda: dict(input_ids=_ids(), labels=_ids(), logits_to_keep=1),
     "`labels` needs the logits of every position"),
    ("position_ids of another length", lambda: dict(input_ids=_ids(), position_ids=torch.arange(5)[None]),
     r"`position_ids` must have shape \(batch=2 or 1, length=10\)"),
    ("position_ids 1-D", lambda: dict(input_ids=_ids(), position_ids=torch.arange(10)),
     r"`position_ids` must have shape"),
    ("inputs_embeds of another width", lambda: dict(inputs_embeds=torch.randn(2, 10, 31)),
     r"`inputs_embeds` must have shape \(batch, length, hidden_size=32\)"),
    ("inputs_embeds of integers", lambda: dict(inputs_embeds=torch.ones(2, 10, 32, dtype=torch.long)),
     "`inputs_embeds` must be a floating-point tensor"),
    ("logits_to_keep negative", lambda: dict(input_ids=_ids(), logits_to_keep=-5),
     r"`logits_to_keep` must be an int >= 0"),
    ("both ids and embeds", lambda: dict(input_ids=_ids(), inputs_embeds=torch.randn(2, 10, 32)),
     "exactly one of `input_ids` and `inputs_embeds`"),
]


@pytest.mark.parametrize("layout", ["linear", "hybrid"])
@pytest.mark.parametrize("case, make, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_are_refused_by_name_at_the_entry(layout, case, make, message):
    model = HopeForCausalLM(small_config(layout)).eval()
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(**make())


def test_labels_that_are_all_ignored_give_a_zero_loss_and_finite_gradients():
    model = HopeForCausalLM(small_config())
    ids = _ids()
    out = model(input_ids=ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # with labelled tokens the loss is their mean, as before
    labels = ids.clone()
    labels[0, :4] = -100
    loss = model(input_ids=ids, labels=labels).loss
    logits = model(input_ids=ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_generate_stream_prefill_and_the_learner_check_their_ids():
    from hope_hf.continual import StreamLearner, StreamLearnerError
    from hope_hf.streaming import stream_prefill

    model = HopeForCausalLM(small_config()).eval()
    ids = _ids()
    with pytest.raises(ValueError, match=r"`input_ids` must be 2-D.*input_ids\[None\]"):
        model.generate(ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"`input_ids` must hold ids in \[0, vocab_size=61\)"):
        model.generate(ids + 100, max_new_tokens=2)
    with pytest.raises(ValueError, match="`input_ids` must hold integer token ids"):
        model.generate(ids.float(), max_new_tokens=2)
    with pytest.raises(ValueError, match="every piece must be integer token ids; got dtype torch.float"):
        stream_prefill(model, [[1.7, 2.0, 3.0]], progress=False)
    with pytest.raises(ValueError, match=r"`input_ids` must hold ids in \[0, vocab_size=61\)"):
        stream_prefill(model, [[1, 2, 300]], progress=False)
    learner = StreamLearner(model, lr=1e-3, chunk_size=8, progress=False)
    with pytest.raises(StreamLearnerError, match="the stream learner's ids must be integer token ids"):
        learner.feed([1.5, 2.5, 3.5])
    with pytest.raises(ValueError, match=r"`ids` must hold ids in \[0, vocab_size=61\)"):
        learner.feed([1, 2, 3, 99])


# ============================================================================ 7. strict configs
def test_an_unknown_config_field_is_an_error_naming_the_closest_field():
    from hope_hf import HopeConfig, HopeConfigError

    with pytest.raises(HopeConfigError,
                       match=r"unknown config field\(s\) 'chunk_sise' \(did you mean 'chunk_size'\?\)"):
        HopeConfig(num_hidden_layers=1, chunk_sise=64)
    HopeConfig(num_hidden_layers=1, attn_implementation="eager", output_attentions=False)  # the library's own keys


def test_an_unknown_field_in_a_saved_config_is_a_warning_naming_it(tmp_path):
    from transformers import AutoConfig

    small_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "chunk_sise": 64}))
    with pytest.warns(UserWarning, match=r"unknown field\(s\) 'chunk_sise' \(did you mean 'chunk_size'\?\)"):
        config = AutoConfig.from_pretrained(tmp_path)
    assert config.chunk_size == saved["chunk_size"]


@pytest.mark.parametrize("legacy", ["mamba", "attention"])
def test_layer_types_that_transformers_would_remap_are_refused(tmp_path, legacy):
    from transformers import AutoConfig

    from hope_hf import HopeConfig

    with pytest.raises(ValueError, match=rf"`layer_types` entries must be one of .*got \['{legacy}'\]"):
        HopeConfig(num_hidden_layers=1, layer_types=[legacy])
    small_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "layer_types": [legacy, "linear_attention"]}))
    with pytest.raises(ValueError, match=rf"got \['{legacy}'\]"):
        AutoConfig.from_pretrained(tmp_path)


def test_a_checkpoint_of_another_model_type_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config of a 'llama' model, not of a HOPE model .*hope-hf convert"):
        HopeForCausalLM.from_pretrained(tmp_path)


def test_the_cli_refuses_a_checkpoint_with_a_missing_weight(model_dir, tmp_path, capsys):
    """The library loads a checkpoint lacking a weight as Transformers does (initialised, reported: loading into a
    grown config relies on it); the commands, which would run a half-random model, refuse it by name."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.0.titans.q_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["generate", "--model_name_or_path", str(folder), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "do not match its config.json (missing model.layers.0.titans.q_proj.weight)" in err
    _, info = HopeForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == {"model.layers.0.titans.q_proj.weight"} or \
        list(info["missing_keys"]) == ["model.layers.0.titans.q_proj.weight"]


# ============================================================================ 3. non-finite values contained, reported
from hope_hf.modeling_hope import NonFiniteWarning  # noqa: E402


def _embeds(model, ids):
    return model.model.embed_tokens(ids).detach().clone()


@pytest.mark.parametrize("memory_depth", [1, 2])
@pytest.mark.parametrize("layout", ["linear", "attention", "sliding", "hybrid"])
def test_a_nan_input_never_reaches_earlier_positions(layout, memory_depth):
    """The audit's case: a NaN at position 37 of 40 (chunks of 16: 32-47) left positions 32-36 NaN too. Now the
    positions before it are exactly those of the forward of the prefix, and it is reported by position."""
    model = HopeForCausalLM(small_config(layout, memory_depth=memory_depth, chunk_size=16)).eval()
    ids = torch.randint(1, 61, (2, 40))
    emb = _embeds(model, ids)
    emb[0, 37, 5] = float("nan")
    emb[1, 20] = float("inf")
    with pytest.warns(NonFiniteWarning, match="row 0 position 37, row 1 position 20"), torch.no_grad():
        out = model(inputs_embeds=emb).logits
    with torch.no_grad():
        prefix = model(inputs_embeds=emb[:, :20]).logits
        row0 = model(inputs_embeds=emb[:1, :37]).logits
    bad = ~torch.isfinite(out).any(-1) | ~torch.isfinite(out).all(-1)
    assert bad[0].nonzero().flatten().tolist() == [37, 38, 39]
    assert bad[1].nonzero().flatten().tolist() == list(range(20, 40))
    torch.testing.assert_close(out[0, :37], row0[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, :20], prefix, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["linear", "attention", "hybrid"])
def test_non_finite_padding_is_masked_out_silently(layout, recwarn):
    model = HopeForCausalLM(small_config(layout)).eval()
    ids = torch.randint(1, 61, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    emb = _embeds(model, ids)
    emb[0, 2] = float("nan")
    emb[1, 10] = float("nan")
    clean = emb.clone()
    clean[0, 2] = clean[1, 10] = 0.0
    with torch.no_grad():
        out = model(inputs_embeds=emb, attention_mask=mask).logits
        ref = model(inputs_embeds=clean, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(out[real]).all()
    torch.testing.assert_close(out[real], ref[real])
    assert not [w for w in recwarn if issubclass(w.category, NonFiniteWarning)]


@pytest.mark.parametrize("layout", ["linear", "attention"])
def test_a_nan_in_one_packed_document_does_not_reach_the_next(layout):
    model = HopeForCausalLM(small_config(layout)).eval()
    ids = torch.randint(1, 61, (1, 20))
    position_ids = torch.cat([torch.arange(10), torch.arange(10)])[None]
    emb = _embeds(model, ids)
    emb[0, 4] = float("nan")
    with pytest.warns(NonFiniteWarning), torch.no_grad():
        out = model(inputs_embeds=emb, position_ids=position_ids).logits
        second = model(inputs_embeds=emb[:, 10:]).logits
    assert (~torch.isfinite(out[0]).all(-1)).nonzero().flatten().tolist() == list(range(4, 10))
    torch.testing.assert_close(out[:, 10:], second, rtol=1e-5, atol=1e-5)


def test_a_nan_fed_through_a_cache_is_reported_and_a_new_document_starts_clean():
    """One NaN fed through a HopeCache: reported when it is fed and whenever the cache is continued; the cache rows
    it reached hold NaN (as the exact computation would), the other rows and a new document in that row do not
    (the memory's convolution history of a new document is selected, not multiplied by 0: NaN * 0 is NaN)."""
    from hope_hf.cache_hope import HopeCache

    model = HopeForCausalLM(small_config("linear")).eval()
    ids = torch.randint(1, 61, (2, 10))
    emb = _embeds(model, ids)
    emb[0, 3] = float("nan")
    cache = HopeCache(model.config)
    with pytest.warns(NonFiniteWarning, match="row 0 position 3"), torch.no_grad():
        model(inputs_embeds=emb, past_key_values=cache, use_cache=True)
    state = cache.get_titans_state(0)
    assert not torch.isfinite(state.current_out[0]).any() and torch.isfinite(state.current_out[1]).all()
    new = torch.randint(1, 61, (2, 6))
    position_ids = torch.stack([torch.arange(6), torch.arange(10, 16)])  # row 0: a new document
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, -2:] = 0
    with pytest.warns(NonFiniteWarning, match="continuing from a cache that holds non-finite values"), torch.no_grad():
        out = model(input_ids=new, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                    use_cache=True).logits
    with torch.no_grad():
        fresh = model(input_ids=new[:1]).logits
    torch.testing.assert_close(out[:1], fresh, rtol=1e-5, atol=1e-5)


def test_a_memory_state_turning_non_finite_is_reported_where_it_first_appears(recwarn):
    from hope_hf.cache_hope import HopeCache

    model = HopeForCausalLM(small_config("linear")).eval()
    ids = torch.randint(1, 61, (1, 12))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=HopeCache(model.config), use_cache=True)
    assert not [w for w in recwarn if issubclass(w.category, NonFiniteWarning)]  # finite: nothing said
    with torch.no_grad():
        model.model.layers[1].titans.k_proj.weight[0, 0] = float("inf")  # overflows in layer 1's memory
    cache = HopeCache(model.config)
    with pytest.warns(NonFiniteWarning, match=r"appeared in the memory state of layer\(s\) \[1\]"), torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    with pytest.warns(NonFiniteWarning, match="continuing from a cache"), torch.no_grad():
        model(input_ids=ids[:, :2], past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_the_cli_refuses_a_model_whose_weights_are_not_finite(model_dir, tmp_path, capsys, command):
    model = HopeForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].cms.levels[1].up_proj.weight[3, 4] = float("nan")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    TOK.save_pretrained(folder)
    argv = {"generate": ["generate"], "eval": ["eval", "--seq_len", "16", "--max_corpus_chars", "20000"]}[command]
    capsys.readouterr()
    assert main([*argv, "--model_name_or_path", str(folder), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors holds weights that are not finite (NaN or inf)" in err
    assert "model.layers.0.cms.levels.1.up_proj.weight" in err


def test_the_stream_learner_warns_when_it_diverges(recwarn):
    from hope_hf.continual import StreamLearner, StreamLearnerWarning

    model = HopeForCausalLM(small_config()).eval()
    ids = torch.randint(1, 61, (120,))
    StreamLearner(model, lr=1e-3, chunk_size=16, progress=False).feed(ids)
    assert not [w for w in recwarn if issubclass(w.category, StreamLearnerWarning)]
    learner = StreamLearner(model, lr=1e4, chunk_size=16, progress=False)
    with pytest.warns(StreamLearnerWarning, match=r"stream learning diverged: after 16 tokens the weights of CMS level "
                                                  r"1 changed their norm .* times in one update .*lr 10000"):
        learner.feed(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StreamLearnerWarning)
        learner.feed(ids)  # said once per learner

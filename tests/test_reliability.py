"""Issue 24: every bad input refused by name, non-finite values contained, nothing of the user's lost.

One section per numbered problem of the issue; `test_robustness.py` runs the whole audit as a table of cases.
"""

from __future__ import annotations

import json
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

"""README.md, followed literally: every fenced ```bash and ```python block is run (at reduced sizes, through the
explicit substitutions below) or listed as skipped with a reason, so the README cannot drift from the code.

The python blocks run in order in one namespace, as a reader pastes them into one Python session; the bash blocks
run in order in one folder, each `hope-hf ...` line through the console script's entry point in this process.
A block that matches no entry of `BLOCKS`, an entry that matches no block, and a substitution whose text is no
longer in its block are failures too.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from packaging import version

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    """How the test treats the README block that contains `key` (a substring of exactly one block)."""

    lang: str
    key: str
    skip: str | None = None  # the reason the block is not run; None: run it
    subs: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (text in the block, replacement)


# `generate(cache=...)` from Transformers 5.24 on; the README names `past_key_values=` for older versions
OLD_CACHE_NAME = (("cache=cache", "past_key_values=cache"),) if version.parse(transformers.__version__) < version.parse(
    "5.24") else ()

# {LLAMA}: a tiny Llama saved by the test; hope-smoke: the smoke variant's output, standing in for the main job's.
BLOCKS = [
    Block("bash", "pip install torch --index-url", skip="installs packages from the network"),
    Block("bash", "hope-hf train --output_dir hope-tiny\n",
          skip="the full main job takes minutes; its smoke variant (next block) runs instead"),
    Block("bash", "hope-hf train --output_dir hope-smoke",
          subs=(("--max_steps 20", "--max_steps 2"), ("--seq_len 64", "--seq_len 32"),
                ("--max_corpus_chars 300000", "--max_corpus_chars 100000"))),
    Block("bash", "pytest -q tests", skip="the test suite itself"),
    Block("bash", "python -m hope_hf.demo", subs=()),
    Block("bash", "hope-hf eval --task",
          subs=(("--lengths 1k,4k", "--lengths 300 --samples 1 --no_plots --no_progress"),
                ("hope-tiny", "hope-smoke"))),
    Block("bash", "hope-hf generate --model_name_or_path",
          subs=(("hope-hf eval --model_name_or_path hope-tiny",
                 "hope-hf eval --model_name_or_path hope-smoke --max_eval_samples 2 --seq_len 32"),
                ("--model_name_or_path hope-tiny --prompt", "--model_name_or_path hope-smoke --prompt"),
                ("--max_new_tokens 64", "--max_new_tokens 4"),
                ("path/to/llama", "{LLAMA}"))),
    Block("bash", "accelerate launch", skip="multi-process launches (tests/test_distributed.py runs DDP and FSDP2)"),
    Block("python", 'config = get_preset("tiny")'),
    Block("python", "convert_llama_to_hope(", subs=(("path/or/hub-id-of-a-llama", "{LLAMA}"),)),
    Block("python", "stream_prefill(model", subs=(("(1, 16_384)", "(1, 200)"), ("4096)", "64)"), *OLD_CACHE_NAME)),
    Block("python", "StreamLearner(model", subs=(("(1_024,)", "(40,)"), ("split_into_pieces(stream_ids, 256)",
                                                                       "split_into_pieces(stream_ids, 16)"))),
    Block("python", "HopeTrainer(model=model",
          subs=(("max_chars=1_500_000", "max_chars=100_000"), ("seq_len=256", "seq_len=32"),
                ("max_steps=10", "max_steps=2"))),
    Block("python", "push_to_hub(", subs=(('datasets=["wikitext"],',
                                          'datasets=["wikitext"], dry_run=True, save_directory="hope-model",'),)),
    Block("python", "pipeline(",
          subs=(('"user/hope-model"', '"hope-model"'), ("max_new_tokens=20", "max_new_tokens=4"))),
    Block("python", "get_peft_model("),
    Block("python", 'from_pretrained("path/to/hope"', subs=(('"path/to/hope"', '"my-hope"'),)),
]


def readme_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line number, text) of every fenced block of `text`."""
    return [(m.group(1), text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text)]


def match_blocks(text: str) -> list[tuple[Block, int, str]]:
    """Every fenced block paired with its one entry of `BLOCKS`; raises AssertionError naming what does not pair."""
    pairs, used = [], set()
    for lang, line, body in readme_blocks(text):
        assert lang in ("bash", "python"), f"README.md:{line}: a ```{lang} block; the README uses bash and python"
        found = [b for b in BLOCKS if b.lang == lang and b.key in body]
        assert len(found) == 1, f"README.md:{line}: {len(found)} entries of BLOCKS match this block:\n{body}"
        assert found[0].key not in used, f"README.md:{line}: a second block matches {found[0].key!r}"
        used.add(found[0].key)
        pairs.append((found[0], line, body))
    missing = [b.key for b in BLOCKS if b.key not in used]
    assert not missing, f"entries of BLOCKS whose block is no longer in README.md: {missing}"
    return pairs


def substituted(block: Block, line: int, body: str, values: dict[str, str]) -> str:
    for old, new in block.subs:
        assert old in body, f"README.md:{line}: the substitution's text {old!r} is no longer in this block"
        body = body.replace(old, new)
    for name, value in values.items():
        body = body.replace("{" + name + "}", value)
    return body


def bash_commands(body: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    return [argv for line in body.replace("\\\n", " ").splitlines() if (argv := shlex.split(line, comments=True))]


def run_bash_command(argv: list[str]) -> str:
    """Run one README command in this process; returns its stdout. Only the package's own commands are allowed."""
    from hope_hf import cli, demo

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if argv[0] == "hope-hf":
            code = cli.main(argv[1:])
        elif argv[:3] == ["python", "-m", "hope_hf.demo"]:
            code = demo.main(argv[3:])
        else:
            raise AssertionError(f"the README test does not know how to run {shlex.join(argv)!r}")
    assert code == 0, f"{shlex.join(argv)} exited with {code}:\n{out.getvalue()}"
    return out.getvalue()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama folder, standing in for the README's Hub id / path of a Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=1)).save_pretrained(folder)
    return folder


def test_every_block_is_run_or_skipped_with_a_reason():
    pairs = match_blocks(README.read_text())
    assert {b.lang for b, _, _ in pairs if b.skip is None} == {"bash", "python"}
    assert all(b.skip.strip() for b, _, _ in pairs if b.skip is not None)


def test_the_check_fails_on_a_block_it_does_not_know():
    text = README.read_text() + "\n```python\nprint('a new snippet')\n```\n"
    with pytest.raises(AssertionError, match="0 entries of BLOCKS"):
        match_blocks(text)


def run_python_blocks(pairs, values: dict[str, str]) -> dict:
    """Exec the python blocks of `pairs` in order in one namespace; a failing block raises AssertionError naming it."""
    namespace: dict = {"__name__": "__readme__"}
    for block, line, body in pairs:
        if block.lang != "python" or block.skip is not None:
            continue
        code = substituted(block, line, body, values)
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"the python block at README.md:{line} failed: {err!r}\n{code}") from err
    return namespace


@pytest.mark.filterwarnings("error::FutureWarning")  # no deprecated name in a snippet
def test_python_blocks_run_in_order(tmp_path, monkeypatch, llama_dir, one_thread):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = run_python_blocks(match_blocks(README.read_text()), {"LLAMA": str(llama_dir)})
    assert Path("my-hope/config.json").is_file() and Path("learner.pt").is_file()
    assert tuple(namespace["more"].shape) == (1, 220)  # 200 prompt tokens (199 streamed) and 20 new ones
    assert len(namespace["answer_ids"]) == 8


def test_bash_blocks_run_in_order(tmp_path, monkeypatch, llama_dir, one_thread):
    monkeypatch.chdir(tmp_path)
    outputs = []
    for block, line, body in match_blocks(README.read_text()):
        if block.lang != "bash" or block.skip is not None:
            continue
        for argv in bash_commands(substituted(block, line, body, {"LLAMA": str(llama_dir)})):
            outputs.append(run_bash_command(argv))
    assert (tmp_path / "hope-smoke" / "model.safetensors").is_file()
    assert not list((tmp_path / "hope-smoke").glob("checkpoint-*"))  # --save_strategy no, as the README says
    assert (tmp_path / "results" / "results.json").is_file()
    assert (tmp_path / "hope-llama" / "config.json").is_file()
    assert any("RANDOM WEIGHTS" in out for out in outputs)  # the demo says its text is noise


@pytest.mark.slow
def test_smoke_variant_as_written(tmp_path, monkeypatch, one_thread):
    """The README's smoke variant of the main job, without the test's reductions (one thread, as the README advises)."""
    monkeypatch.chdir(tmp_path)
    (block, line, body), = [(b, n, s) for b, n, s in match_blocks(README.read_text()) if "hope-smoke" in b.key]
    (argv,) = bash_commands(body)
    run_bash_command(argv)
    assert (tmp_path / "hope-smoke" / "all_results.json").is_file()


def test_a_broken_snippet_fails(tmp_path, monkeypatch):
    """A README block that breaks (here: a renamed function, or a substitution whose text changed) fails the test."""
    monkeypatch.chdir(tmp_path)
    pairs = match_blocks(README.read_text())
    block, line, body = next(p for p in pairs if p[0].key.startswith("config ="))
    with pytest.raises(AssertionError, match=f"README.md:{line} failed: NameError"):
        run_python_blocks([(block, line, body.replace("get_preset(", "get_preset_renamed("))], {})
    block, line, body = next(p for p in pairs if p[0].key.startswith("stream_prefill"))
    with pytest.raises(AssertionError, match="no longer in this block"):
        substituted(block, line, body.replace("16_384", "16384"), {})

"""The reliability audit as one table: every bad input or fault, what a demanding user expects, and the outcome.

Each case is run the way a user meets it (a forward, `generate`, `stream_prefill`, the stream learner, a config, the
`hope-hf` CLI on a damaged folder) and must end in one of:

* ``refused``: an error of the library's own type whose message names the argument (or file) and what is allowed;
  from the CLI, one line on stderr, no traceback, the exit status of the case, no file of the user's touched;
* ``warned``: the result, plus a warning naming what happened (non-finite values, a diverging learner, an unknown
  field of a saved config);
* ``correct``: the right result (checked).

A raw error from deep inside (an IndexError, a RuntimeError of a kernel, a traceback), a silent wrong result or a
lost file fails its case. ``python tests/tools/test_robustness.py`` prints the table with every outcome.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import small_config  # noqa: E402
from hope_hf import HopeConfig, HopeForCausalLM  # noqa: E402
from hope_hf.cache_hope import HopeCache  # noqa: E402
from hope_hf.cli import main  # noqa: E402
from hope_hf.continual import StreamLearner, StreamLearnerError, StreamLearnerWarning  # noqa: E402
from hope_hf.modeling_hope import NonFiniteWarning  # noqa: E402
from hope_hf.streaming import stream_prefill  # noqa: E402

VOCAB = 61


class Refused(Exception):
    pass


def _model(layout="linear", **kw):
    torch.manual_seed(0)
    return HopeForCausalLM(small_config(layout, **kw)).eval()


def _ids(batch=2, length=10):
    return torch.randint(1, VOCAB, (batch, length))


def _forward(layout, make_kwargs):
    def run(env):
        with torch.no_grad():
            _model(layout)(**make_kwargs())

    return run


# ------------------------------------------------------------------------------------------- the cases
# (name, area, expected outcome, runner, what the message / check must say)
CASES: list[tuple] = []


def case(name, area, expected, pattern=None):
    def register(fn):
        CASES.append((name, area, expected, fn, pattern))
        return fn

    return register


_FORWARD_CASES = [
    ("id >= vocab_size", lambda: dict(input_ids=_ids().fill_(VOCAB)), r"`input_ids` must hold ids in \[0, vocab_size"),
    ("negative id", lambda: dict(input_ids=-_ids()), r"`input_ids` must hold ids in \[0, vocab_size"),
    ("float ids", lambda: dict(input_ids=_ids().float()), "`input_ids` must hold integer token ids"),
    ("bool ids", lambda: dict(input_ids=_ids() > 3), "`input_ids` must hold integer token ids"),
    ("int16 ids", lambda: dict(input_ids=_ids().short()), "`input_ids` must hold integer token ids"),
    ("1-D input_ids", lambda: dict(input_ids=_ids()[0]), r"`input_ids` must be 2-D"),
    ("3-D input_ids", lambda: dict(input_ids=_ids()[None]), r"`input_ids` must be 2-D"),
    ("list as input_ids", lambda: dict(input_ids=[[1, 2, 3]]), "`input_ids` must be a torch tensor"),
    ("empty batch", lambda: dict(input_ids=_ids()[:0]), "`input_ids` holds no sequence"),
    ("zero-length input", lambda: dict(input_ids=_ids()[:, :0]), "no input tokens"),
    ("all-padding batch", lambda: dict(input_ids=_ids(), attention_mask=torch.zeros(2, 10, dtype=torch.long)),
     "`attention_mask` marks every new position as padding"),
    ("mask longer than the input", lambda: dict(input_ids=_ids(), attention_mask=torch.ones(2, 14)),
     r"`attention_mask` must have shape \(batch=2, length=10\)"),
    ("mask shorter than the input", lambda: dict(input_ids=_ids(), attention_mask=torch.ones(2, 7)),
     r"`attention_mask` must have shape"),
    ("mask of another batch", lambda: dict(input_ids=_ids(), attention_mask=torch.ones(1, 10)),
     r"`attention_mask` must have shape"),
    ("float mask of other values", lambda: dict(input_ids=_ids(), attention_mask=torch.full((2, 10), 0.5)),
     "`attention_mask` .* must hold 1 for tokens and 0 for padding"),
    ("labels of another shape", lambda: dict(input_ids=_ids(), labels=_ids()[:, :4]), "`labels` must have the shape"),
    ("labels out of range", lambda: dict(input_ids=_ids(), labels=_ids() + VOCAB), r"`labels` must hold ids in"),
    ("float labels", lambda: dict(input_ids=_ids(), labels=_ids().float()), "`labels` must hold integer token ids"),
    ("labels with logits_to_keep", lambda: dict(input_ids=_ids(), labels=_ids(), logits_to_keep=2),
     "`labels` needs the logits of every position"),
    ("position_ids of another length", lambda: dict(input_ids=_ids(), position_ids=torch.arange(4)[None]),
     r"`position_ids` must have shape"),
    ("position_ids 1-D", lambda: dict(input_ids=_ids(), position_ids=torch.arange(10)), r"`position_ids` must have"),
    ("float position_ids", lambda: dict(input_ids=_ids(), position_ids=torch.zeros(2, 10)),
     "`position_ids` must be an integer tensor"),
    ("inputs_embeds of another width", lambda: dict(inputs_embeds=torch.randn(2, 10, 31)),
     r"`inputs_embeds` must have shape \(batch, length, hidden_size=32\)"),
    ("2-D inputs_embeds", lambda: dict(inputs_embeds=torch.randn(10, 32)), r"`inputs_embeds` must have shape"),
    ("integer inputs_embeds", lambda: dict(inputs_embeds=torch.ones(2, 10, 32, dtype=torch.long)),
     "`inputs_embeds` must be a floating-point tensor"),
    ("logits_to_keep negative", lambda: dict(input_ids=_ids(), logits_to_keep=-5), "`logits_to_keep` must be an int"),
    ("logits_to_keep bool", lambda: dict(input_ids=_ids(), logits_to_keep=True), "`logits_to_keep` must be an int"),
    ("logits_to_keep 2-D tensor", lambda: dict(input_ids=_ids(), logits_to_keep=torch.ones(2, 2, dtype=torch.long)),
     "`logits_to_keep` as a tensor must be a 1-D"),
    ("both input_ids and inputs_embeds", lambda: dict(input_ids=_ids(), inputs_embeds=torch.randn(2, 10, 32)),
     "exactly one of `input_ids` and `inputs_embeds`"),
    ("a DynamicCache for Titans layers", lambda: dict(input_ids=_ids(), past_key_values=__import__(
        "transformers").DynamicCache()), "must be a `HopeCache`"),
]
for _layout in ("linear", "hybrid"):
    for _name, _kwargs, _pattern in _FORWARD_CASES:
        if _name == "a DynamicCache for Titans layers" and _layout != "linear":
            continue
        CASES.append((f"forward ({_layout}): {_name}", "model input", "refused", _forward(_layout, _kwargs), _pattern))


@case("labels all -100: a zero loss, finite gradients", "model input", "correct")
def _all_ignored(env):
    model = _model().train()
    ids = _ids()
    out = model(input_ids=ids, labels=torch.full_like(ids, -100))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@case("cache with another batch size", "cache", "refused", "the cache holds 2 sequences but the input has 3 rows")
def _cache_rows(env):
    model, cache = _model(), None
    cache = HopeCache(model.config)
    with torch.no_grad():
        model(input_ids=_ids(), past_key_values=cache, use_cache=True)
        model(input_ids=_ids(3, 1), past_key_values=cache, use_cache=True)


@case("generate with 1-D ids", "generate", "refused", r"`input_ids` must be 2-D.*input_ids\[None\]")
def _gen_1d(env):
    _model().generate(_ids()[0], max_new_tokens=2)


@case("generate with out-of-range ids", "generate", "refused", r"`input_ids` must hold ids in \[0, vocab_size")
def _gen_range(env):
    _model().generate(_ids() + VOCAB, max_new_tokens=2)


@case("generate with float ids", "generate", "refused", "`input_ids` must hold integer token ids")
def _gen_float(env):
    _model().generate(_ids().float(), max_new_tokens=2)


@case("generate from a cache that has seen the whole prompt", "generate", "refused", "the cache has seen 10 tokens")
def _gen_seen(env):
    model = _model()
    cache, ids = HopeCache(model.config), _ids(1)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    model.generate(ids, past_key_values=cache, max_new_tokens=2)


@case("stream_prefill with float pieces", "stream_prefill", "refused", "every piece must be integer token ids")
def _sp_float(env):
    stream_prefill(_model(), [[1.7, 2.0, 3.0]], progress=False)


@case("stream_prefill with an out-of-range id", "stream_prefill", "refused", r"`input_ids` must hold ids in")
def _sp_range(env):
    stream_prefill(_model(), [[1, 2, 300]], progress=False)


@case("stream_prefill with an empty piece", "stream_prefill", "refused", "every piece must be a non-empty sequence")
def _sp_empty(env):
    stream_prefill(_model(), [[1, 2], []], progress=False)


@case("stream_prefill with no pieces", "stream_prefill", "refused", "pieces was empty")
def _sp_none(env):
    stream_prefill(_model(), [], progress=False)


@case("learner fed float ids", "stream learner", "refused", "the stream learner's ids must be integer token ids")
def _sl_float(env):
    StreamLearner(_model(), progress=False).feed([1.5, 2.5])


@case("learner fed an out-of-range id", "stream learner", "refused", r"`ids` must hold ids in \[0, vocab_size")
def _sl_range(env):
    StreamLearner(_model(), progress=False).feed([1, 2, 3, 99])


@case("learner fed two streams at once", "stream learner", "refused", "the stream learner follows one stream")
def _sl_batch(env):
    StreamLearner(_model(), progress=False).feed(_ids())


@case("learner with chunk_size 0", "stream learner", "refused", "chunk_size must be an int >= 1")
def _sl_chunk(env):
    StreamLearner(_model(), chunk_size=0, progress=False)


@case("learner with a negative learning rate", "stream learner", "refused", "must be >= 0")
def _sl_lr(env):
    StreamLearner(_model(), lr=-1.0, progress=False)


@case("learner at lr 1e4 collapses", "stream learner", "warned", "stream learning diverged")
def _sl_collapse(env):
    StreamLearner(_model(), lr=1e4, chunk_size=16, progress=False).feed(torch.randint(1, VOCAB, (60,)))


# ------------------------------------------------------------------------------------------- non-finite values
def _nan_forward(layout):
    def run(env):
        model = _model(layout, chunk_size=16)
        ids = _ids(1, 40)
        emb = model.model.embed_tokens(ids).detach().clone()
        emb[0, 37] = float("nan")
        with torch.no_grad():
            out = model(inputs_embeds=emb).logits
            prefix = model(inputs_embeds=emb[:, :37]).logits
        torch.testing.assert_close(out[:, :37], prefix, rtol=1e-5, atol=1e-5)  # never reaches earlier positions
        assert not torch.isfinite(out[0, 37:]).any(-1).all()

    return run


for _layout in ("linear", "attention", "sliding", "hybrid"):
    CASES.append((f"NaN in inputs_embeds at position 37 ({_layout})", "non-finite", "warned", _nan_forward(_layout),
                  "`inputs_embeds` holds non-finite values .* at row 0 position 37"))


@case("NaN fed through a HopeCache, then continued", "non-finite", "warned", "continuing from a cache that holds")
def _nan_cache(env):
    model = _model()
    cache, ids = HopeCache(model.config), _ids(1, 8)
    emb = model.model.embed_tokens(ids).detach().clone()
    emb[0, 3] = float("nan")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)  # the first report, at the forward that fed it
        model(inputs_embeds=emb, past_key_values=cache, use_cache=True)
    with torch.no_grad():
        model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)


@case("a memory state overflowing from finite inputs", "non-finite", "warned", r"appeared in the memory state")
def _nan_state(env):
    model = _model()
    with torch.no_grad():
        model.model.layers[0].titans.k_proj.weight[0, 0] = float("inf")
        model(input_ids=_ids(1, 8), past_key_values=HopeCache(model.config), use_cache=True)


@case("NaN embeddings at padding positions", "non-finite", "correct")
def _nan_padding(env):
    model = _model("hybrid")
    ids, mask = _ids(), torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    emb = model.model.embed_tokens(ids).detach().clone()
    emb[0, 1] = float("nan")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        out = model(inputs_embeds=emb, attention_mask=mask).logits
    assert torch.isfinite(out[mask.bool()]).all()


# ------------------------------------------------------------------------------------------- configs
@case("HopeConfig(chunk_sise=64)", "config", "refused", r"unknown config field\(s\) 'chunk_sise' \(did you mean")
def _cfg_typo(env):
    HopeConfig(num_hidden_layers=1, chunk_sise=64)


@case("config.json with chunk_sise", "config", "warned", r"unknown field\(s\) 'chunk_sise' \(did you mean 'chunk_size'")
def _cfg_typo_saved(env):
    from transformers import AutoConfig

    folder = env["tmp"] / "typo"
    small_config().save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "chunk_sise": 64}))
    AutoConfig.from_pretrained(folder)


@case("layer_types=['mamba']", "config", "refused", r"`layer_types` entries must be one of .*'mamba'")
def _cfg_mamba(env):
    HopeConfig(num_hidden_layers=1, layer_types=["mamba"])


@case("layer_types=['attention']", "config", "refused", r"`layer_types` entries must be one of .*'attention'")
def _cfg_attention(env):
    HopeConfig(num_hidden_layers=1, layer_types=["attention"])


@case("hidden_size='32'", "config", "refused", "hidden_size")
def _cfg_type(env):
    HopeConfig(hidden_size="32")


@case("a Llama checkpoint loaded as HOPE", "config", "refused", r"config of a 'llama' model, not of a HOPE model")
def _cfg_llama(env):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = env["tmp"] / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(folder)
    HopeForCausalLM.from_pretrained(folder)


# ------------------------------------------------------------------------------------------- the CLI
def _cli(argv_of, exit_code, damage=None, protect=None):
    """Run `hope-hf` on a copy of the saved model (damaged by `damage`); the case is `refused` when it exits with
    `exit_code` and one error line, no traceback, the protected files unchanged."""

    def run(env):
        from test_reliability import _damage, _snapshot

        folder = env["tmp"] / f"model-{len(list(env['tmp'].iterdir()))}"
        shutil.copytree(env["model_dir"], folder)
        if damage:
            _damage(folder, damage, env["tmp"])
        argv = argv_of(folder, env)
        guarded = protect(env) if protect else None
        before = _snapshot(guarded) if guarded else None
        env["capsys"].readouterr()
        rc = main(argv)
        err = env["capsys"].readouterr().err
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if ": error: " in line]
        assert rc == exit_code and len(lines) == 1, (rc, err)
        if guarded:
            assert _snapshot(guarded) == before
        raise Refused(lines[0])

    return run


def _generate(folder, env):
    return ["generate", "--model_name_or_path", str(folder), "--device", "cpu", "--max_new_tokens", "2"]


def _eval(folder, env):
    return ["eval", "--model_name_or_path", str(folder), "--device", "cpu", "--seq_len", "16",
            "--max_corpus_chars", "20000", "--eval_every", "2"]


for _how, _file in [("truncated weights", "model.safetensors"), ("weights cut short at the end", "model.safetensors"),
                    ("empty weights", "model.safetensors"), ("garbage weights", "model.safetensors"),
                    ("crafted pickle", "pytorch_model.bin"), ("truncated tokenizer", "tokenizer.json"),
                    ("config not json", "config.json"), ("config field of the wrong type", "config.json"),
                    ("width that does not match the weights", "model.safetensors")]:
    for _cmd, _argv in (("generate", _generate), ("eval", _eval)):
        CASES.append((f"hope-hf {_cmd}: {_how}", "CLI checkpoint", "refused", _cli(_argv, 1, _how), re.escape(_file)))


def _with_nan_weight(folder, env):
    model = HopeForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(folder)
    return _generate(folder, env)


CASES.append(("hope-hf generate: NaN weights", "CLI checkpoint", "refused", _cli(_with_nan_weight, 1),
              "holds weights that are not finite"))


def _figs(env):
    figs = env["tmp"] / "figs"
    if not figs.exists():
        figs.mkdir()
        (figs / "accuracy_by_length.png").write_bytes(b"mine")
        (figs / "depth_passkey.png").write_bytes(b"mine too")
    return figs


def _suite_into_figs(*extra):
    def argv(folder, env):
        return ["eval", "--task", "passkey", "--lengths", "250", "--depths", "0.5", "--model_name_or_path",
                str(folder), "--output_dir", str(_figs(env)), "--no_progress", "--device", "cpu", *extra]

    return argv


CASES.append(("eval --task into a folder of the user's plots, --no_plots", "CLI files", "refused",
              _cli(_suite_into_figs("--no_plots"), 2, protect=_figs), "--overwrite_output_dir"))
CASES.append(("eval --task into a folder of the user's plots", "CLI files", "refused",
              _cli(_suite_into_figs(), 2, protect=_figs), "--overwrite_output_dir"))


def _existing_output_file(folder, env):
    target = env["tmp"] / "existing.json"
    target.write_text('{"mine": 1}')
    return [*_eval(folder, env), "--output_file", str(target)]


CASES.append(("eval --output_file onto an existing file", "CLI files", "refused", _cli(
    _existing_output_file, 2, protect=lambda env: env["tmp"] / "existing.json"), "--overwrite_output_file"))


def _train_into(prepare):
    def argv(folder, env):
        from test_cli import TINY

        out = env["tmp"] / f"out-{prepare.__name__}"
        if not out.exists():
            prepare(out, folder)
        return ["train", "--output_dir", str(out), *TINY, "--max_steps", "2"]

    return argv


def _users_tokenizer(out, folder):
    out.mkdir()
    shutil.copy(folder / "tokenizer.json", out / "tokenizer.json")


def _users_checkpoint_folder(out, folder):
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "notes.txt").write_text("mine")


CASES.append(("train into a folder holding only the user's tokenizer", "CLI files", "refused",
              _cli(_train_into(_users_tokenizer), 2, protect=lambda env: env["tmp"] / "out-_users_tokenizer"),
              "is not empty"))
CASES.append(("train into a folder with the user's checkpoint-5/", "CLI files", "refused",
              _cli(_train_into(_users_checkpoint_folder), 2,
                   protect=lambda env: env["tmp"] / "out-_users_checkpoint_folder"),
              r"checkpoint-5 \(it has no trainer_state.json"))


# ------------------------------------------------------------------------------------------- the harness
def run_case(fn, expected: str, pattern: str | None, env: dict) -> str:
    """The outcome of one case as a line of the table; raises AssertionError when it is not the expected one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn(env)
        except Refused as refusal:
            outcome, message = "refused", str(refusal)
        except (ValueError, StreamLearnerError) as err:  # HopeConfigError, StreamLearnerError are ValueErrors
            outcome, message = "refused", f"{type(err).__name__}: {err}"
        else:
            ours = [w for w in caught if issubclass(w.category, (NonFiniteWarning, StreamLearnerWarning, UserWarning))
                    and w.category is not DeprecationWarning]
            outcome, message = ("warned", str(ours[-1].message)) if ours and expected == "warned" else ("correct", "")
    assert outcome == expected, f"expected {expected}, got {outcome}: {message}"
    if pattern:
        assert re.search(pattern, message), f"{message!r} does not say {pattern!r}"
    return message


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from test_reliability import TOK

    folder = tmp_path_factory.mktemp("robustness") / "model"
    torch.manual_seed(0)
    HopeForCausalLM(small_config(vocab_size=len(TOK), pad_token_id=0, eos_token_id=0, bos_token_id=0)).save_pretrained(
        folder)
    TOK.save_pretrained(folder)
    return folder


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name, area, expected, fn, pattern", CASES, ids=[c[0] for c in CASES])
def test_audit_case(name, area, expected, fn, pattern, saved_model, tmp_path, capsys):
    run_case(fn, expected, pattern, {"model_dir": saved_model, "tmp": tmp_path, "capsys": capsys})


class _Capture:
    """`capsys` outside pytest: stdout and stderr go to buffers that `readouterr` returns and empties."""

    def __init__(self):
        import io
        from collections import namedtuple

        self._io, self._result = io, namedtuple("Captured", "out err")
        self._out, self._err = io.StringIO(), io.StringIO()
        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self._out, self._err

    def readouterr(self):
        out, err = self._out.getvalue(), self._err.getvalue()
        self._out.seek(0), self._out.truncate(), self._err.seek(0), self._err.truncate()
        return self._result(out, err)

    def close(self):
        sys.stdout, sys.stderr = self._saved


def print_table() -> int:
    """Run every case and print the table (case, area, expected, outcome, message)."""
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from test_reliability import TOK

    root = Path(tempfile.mkdtemp(prefix="hope-audit-"))
    model_dir = root / "model"
    HopeForCausalLM(small_config(vocab_size=len(TOK), pad_token_id=0, eos_token_id=0, bos_token_id=0)).save_pretrained(
        model_dir)
    TOK.save_pretrained(model_dir)
    rows, failures = [], 0
    for i, (name, area, expected, fn, pattern) in enumerate(CASES):
        tmp = root / f"case-{i}"
        tmp.mkdir()
        capture = _Capture()
        try:
            message, outcome = run_case(fn, expected, pattern, {"model_dir": model_dir, "tmp": tmp,
                                                                 "capsys": capture}), expected
        except BaseException as err:  # noqa: BLE001 - the table reports every failure
            message, outcome = f"{type(err).__name__}: {err}", "FAILED"
            failures += 1
        finally:
            capture.close()
        message = " ".join(message.split())
        rows.append(f"| {i + 1} | {area} | {name} | {expected} | {outcome} | {message[:140].replace('|', '/')} |")
    print("| # | area | case | expected | outcome | message |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{len(CASES)} cases, {len(CASES) - failures} as expected, {failures} not")
    shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":  # the table of the note: python tests/tools/test_robustness.py
    sys.exit(print_table())

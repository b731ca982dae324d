"""hope_hf.data (packed causal-LM datasets), hope_hf.tokenizer (byte-level BPE), the shipped perplexity metric."""

import gzip
import json
import math
import os

import pytest
from transformers import AutoTokenizer

from hope_hf.data import (
    DataError, build_lm_datasets, check_seq_len, load_documents, pack_dataset, split_documents, stdlib_source_files,
)
from hope_hf.evaluation.perplexity import unigram_baseline
from hope_hf.metrics import load_perplexity_metric, perplexity_metric_path
from hope_hf.tokenizer import EOS_TOKEN, PAD_TOKEN, TokenizerMismatchError, check_tokenizer_matches, train_tokenizer

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "Grüße aus Köln — naïve café, 東京 and emoji 🙂.\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS, vocab_size=300)


def test_embedded_corpus_needs_no_download_and_is_deterministic():
    files = stdlib_source_files(max_chars=200_000)
    assert files and all(f.suffix == ".py" for f in files)
    assert not any("test" in part for f in files for part in f.parts[-2:-1])
    assert files == stdlib_source_files(max_chars=200_000)
    assert sum(f.stat().st_size for f in files[:-1]) < 200_000
    docs = load_documents("stdlib", max_chars=200_000)
    assert len(docs) == len([f for f in files if f.read_text(errors="replace").strip()])
    assert docs[0]["text"] == files[0].read_text(encoding="utf-8", errors="replace")


def test_tokenizer_round_trips_unicode_and_reloads_offline(tokenizer, tmp_path):
    assert len(tokenizer) == 300
    assert tokenizer.eos_token == tokenizer.bos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    for text in DOCS[:3]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text.encode())  # merges were learned: fewer tokens than bytes
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(DOCS[1])["input_ids"] == tokenizer(DOCS[1])["input_ids"]
    assert again.eos_token_id == tokenizer.eos_token_id and again.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_errors(tokenizer):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(DOCS, vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([], vocab_size=300)

    class Cfg:
        vocab_size, pad_token_id, eos_token_id, bos_token_id = 256, None, None, None

    with pytest.raises(TokenizerMismatchError, match="300 tokens but the model's vocab_size is 256"):
        check_tokenizer_matches(tokenizer, Cfg)
    Cfg.vocab_size, Cfg.pad_token_id = 512, 7
    with pytest.raises(TokenizerMismatchError, match="pad_token_id"):
        check_tokenizer_matches(tokenizer, Cfg)
    Cfg.pad_token_id = tokenizer.pad_token_id
    check_tokenizer_matches(tokenizer, Cfg)


def test_packing_is_the_eos_joined_token_stream_cut_into_blocks(tokenizer):
    from datasets import Dataset

    docs = Dataset.from_dict({"text": DOCS[:30]})
    packed = pack_dataset(docs, tokenizer, seq_len=16)
    stream = []
    for text in DOCS[:30]:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // 16
    assert len(packed) == n
    assert [x for row in packed["input_ids"] for x in row] == stream[: n * 16]
    assert packed["labels"] == packed["input_ids"]
    assert all(len(r) == 16 for r in packed["input_ids"])


def test_local_text_json_and_directory_sources_streaming_or_not(tokenizer, tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    (tmp_path / "b.txt").write_text("\n\n".join(DOCS))
    code = tmp_path / "code"
    code.mkdir()
    for i, d in enumerate(DOCS[:9]):
        (code / f"m{i}.py").write_text(d)

    js = load_documents(str(tmp_path / "a.jsonl"), text_column="body")
    assert js.column_names == ["text"] and js["text"] == DOCS
    txt = load_documents(str(tmp_path / "b.txt"))
    assert len(txt) >= len(DOCS) // 2 and "def add(a, b):" in txt[0]["text"]
    d = load_documents(str(code))
    assert sorted(d["text"]) == sorted(DOCS[:9])

    for source, col in ((str(tmp_path / "a.jsonl"), "body"), (str(code), "text")):
        eager = build_lm_datasets(tokenizer, 8, source, text_column=col, eval_every=3)
        stream = build_lm_datasets(tokenizer, 8, source, text_column=col, eval_every=3, streaming=True)
        for split in ("train", "eval"):
            assert [r["input_ids"] for r in stream[split]] == eager[split]["input_ids"], (source, split)
        assert len(eager["train"]) > len(eager["eval"]) > 0


def test_a_folder_is_read_per_file_by_suffix_and_skips_binaries_caches_and_hidden_files(tmp_path):
    """A dataset folder: its JSON lines go through the text column, its README is one text document; a source
    folder: compiled caches, binaries, unknown suffixes and hidden files are skipped."""
    folder = tmp_path / "ds"
    (folder / "__pycache__").mkdir(parents=True)
    (folder / "data.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    (folder / "README.md").write_text("# my dataset\n")
    (folder / "m.py").write_text(DOCS[0])
    (folder / "__pycache__" / "m.cpython-312.pyc").write_bytes(b"\x00\xff\x13binary")
    (folder / "blob.bin").write_bytes(b"\x00\x01\x02")
    (folder / ".hidden.txt").write_text("not data")
    for streaming in (False, True):
        docs = [r["text"] for r in load_documents(str(folder), text_column="body", streaming=streaming)]
        assert sorted(docs) == sorted(DOCS + ["# my dataset\n", DOCS[0]]), streaming
    assert len(load_documents(str(folder / "*"), text_column="body")) == len(DOCS) + 2  # a glob: the same rule
    hidden_home = tmp_path / ".cache" / "corpus"  # a folder the pattern names outright counts, hidden or not
    hidden_home.mkdir(parents=True)
    (hidden_home / "a.txt").write_text(DOCS[1])
    assert [r["text"] for r in load_documents(str(hidden_home / "*.txt"))] == [DOCS[1]]
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.pyc").write_bytes(b"\x00\xff")
    with pytest.raises(DataError, match="holds no file with a known text suffix"):
        load_documents(str(tmp_path / "bin"))


def test_bad_data_raises_errors_naming_the_problem(tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "blank.py").write_text("   \n\n")
    with pytest.raises(DataError, match="only whitespace"):
        load_documents(str(tmp_path / "blank.py"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="contains no files"):
        load_documents(str(tmp_path / "emptydir"))
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "abc"}) + "\n")
    with pytest.raises(DataError, match="text_column 'text' is not a column"):
        load_documents(str(tmp_path / "x.jsonl"))
    (tmp_path / "short.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="too short"):
        pack_dataset(load_documents(str(tmp_path / "short.py")), tokenizer, seq_len=64)
    with pytest.raises(DataError, match="at least 2 documents"):
        split_documents(load_documents(str(tmp_path / "short.py")))
    with pytest.raises(DataError, match="could not load dataset 'no-such-org/no-such-dataset'"):
        load_documents("no-such-org/no-such-dataset")  # a dataset name; offline and not cached
    with pytest.raises(DataError, match="seq_len must be an int >= 2"):
        check_seq_len(1)

    class Cfg:
        max_position_embeddings = 128
        layer_types = ["linear_attention", "full_attention"]

    with pytest.raises(DataError, match="max_position_embeddings=128"):
        check_seq_len(256, Cfg)
    Cfg.layer_types = ["linear_attention"] * 2  # recurrent layers only: any length
    check_seq_len(256, Cfg)


def test_perplexity_metric_loads_offline_by_path():
    assert os.path.isfile(os.path.join(perplexity_metric_path(), "hope_perplexity.py"))
    metric = load_perplexity_metric()
    out = metric.compute(nll_sum=[2.0, 4.0], num_tokens=[2, 2])
    assert out["perplexity"] == pytest.approx(math.exp(1.5)) and out["num_tokens"] == 4
    assert out["bits_per_token"] == pytest.approx(1.5 / math.log(2))
    metric.add_batch(nll_sum=[1.0], num_tokens=[1])
    metric.add_batch(nll_sum=[5.0], num_tokens=[2])
    assert metric.compute()["perplexity"] == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError, match="nothing to score"):
        metric.compute(nll_sum=[0.0], num_tokens=[0])


def test_unigram_baseline():
    # train counts (targets only: first token of each row is never predicted): token 1 x3, token 2 x1; V = 4
    train = [[0, 1, 1, 2], [3, 1]]
    p = {1: 4 / 8, 2: 2 / 8}  # add-one: (3+1)/(4+4), (1+1)/(4+4)
    got = unigram_baseline(train, [[0, 1, 2]], vocab_size=4)
    assert got == pytest.approx(math.exp(-(math.log(p[1]) + math.log(p[2])) / 2))


def test_local_files_are_read_as_named_and_as_text(tmp_path, tokenizer):
    """Paths are never glob patterns; undecodable bytes, nulls, missing fields and other fields that differ between
    files do not stop a load; a wrong text value, a binary file and a too-short stream are errors naming them."""
    for name in ("corpus[1]", "corpus1"):  # `corpus[1]` as a pattern matched `corpus1`
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.md").write_text(name)
        (tmp_path / name / "__init__.py").write_text("")  # an empty file in a folder adds nothing
    (tmp_path / "d[1].jsonl").write_text(json.dumps({"text": "real", "id": 1}) + "\n")
    (tmp_path / "d1.jsonl").write_text(json.dumps({"text": "neighbour"}) + "\n")
    for streaming in (False, True):
        assert [r["text"] for r in load_documents(str(tmp_path / "corpus[1]"), streaming=streaming)] == ["corpus[1]"]
        assert [r["text"] for r in load_documents(str(tmp_path / "d[1].jsonl"), streaming=streaming)] == ["real"]
    (tmp_path / "latin1.txt").write_bytes("café\n\nnaïve".encode("latin-1"))
    assert [r["text"] for r in load_documents(str(tmp_path / "latin1.txt"))] == ["caf\ufffd", "na\ufffdve"]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"text": "one", "source": "web"}, {"text": None}, {"other": 3}, {"text": "two"})))
    (mixed / "b.jsonl").write_text(json.dumps({"text": "three", "source": 7}) + "\n")  # another type of `source`
    (mixed / "c.json").write_text(json.dumps([{"text": "four"}, {"text": "five"}]))  # a JSON array of records
    for streaming in (False, True):
        docs = [r["text"] for r in load_documents(str(mixed), streaming=streaming)]
        assert docs == ["one", "two", "three", "four", "five"]
    for value, kind in ((3, "int"), (["a", "b"], "list")):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": value}) + "\n")
        with pytest.raises(DataError, match=f"text_column 'text' of data file .*bad.jsonl', line 2, holds a {kind}"):
            load_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n'))
    with pytest.raises(DataError, match="is binary"):
        load_documents(str(tmp_path / "train.jsonl.gz"))
    (tmp_path / "short.md").write_text("x = 1\n")
    with pytest.raises(DataError, match="too short for one sequence of seq_len=64"):
        build_lm_datasets(tokenizer, 64, [str(tmp_path / "short.md")] * 2, eval_every=2, streaming=True)
    with pytest.raises(DataError, match="training texts are empty"):
        train_tokenizer([], vocab_size=300)

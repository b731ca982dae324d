"""Packed causal-LM datasets built with `datasets`.

Sources (``source`` argument of :func:`load_documents` / :func:`build_lm_datasets`):

* ``"stdlib"`` (the default): the embedded corpus, the Python standard library's own ``.py`` source found through
  ``sysconfig`` (tests, ``idlelib``, ``lib2to3``, ``ensurepip`` and ``site-packages`` left out). It needs no download,
  so every example and test runs anywhere.
* a local file, a directory, a glob, or a list of files, each read by its suffix: ``.txt``/``.text`` (one paragraph
  per document), ``.json``/``.jsonl`` (the ``text_column`` field of each record), any other suffix such as ``.py`` or
  ``.md`` (one file per document). A directory or glob contributes only files with a known text suffix (those, plus
  ``_DOCUMENT_SUFFIXES``); binaries, other suffixes, empty and hidden files and ``__pycache__`` are skipped. Files
  are read as UTF-8 (undecodable bytes become U+FFFD); a JSON file is JSON Lines or one JSON array of records, whose
  other fields may differ between files; a record whose field is missing or null is skipped (logged), any other
  non-string value is an error naming the record. An existing path is read as named (``data[1]`` is not a glob).
* anything else is taken as a dataset name for ``datasets.load_dataset`` (``"name"`` or ``"name:config"``); offline
  that fails with datasets' own error unless the dataset is in the local cache.

Every source can be loaded ``streaming=True`` (an ``IterableDataset``). Packing tokenizes the documents, appends the
EOS token to each, concatenates them and cuts the stream into blocks of exactly ``seq_len`` tokens (the remainder of
each map batch is dropped). Each example has ``input_ids`` and ``labels`` (equal: the model shifts them).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Features, IterableDataset, Value, load_dataset
from datasets.exceptions import DatasetGenerationError

__all__ = [
    "DataError",
    "EMBEDDED_CORPUS",
    "build_lm_datasets",
    "check_seq_len",
    "load_documents",
    "pack_dataset",
    "split_documents",
    "stdlib_source_files",
]

EMBEDDED_CORPUS = "stdlib"
_EXCLUDED_STDLIB_PARTS = {"test", "tests", "idlelib", "lib2to3", "ensurepip", "site-packages", "dist-packages",
                          "__pycache__", "turtledemo"}
_READER_VERSION = 1  # part of the cache key of local files read into a Dataset: raise it when the readers change
_TEXT_SUFFIXES = {".txt", ".text"}
_JSON_SUFFIXES = {".json", ".jsonl"}
# whole-file documents a directory or glob contributes (besides the text and JSON suffixes above)
_DOCUMENT_SUFFIXES = {".py", ".pyi", ".md", ".markdown", ".rst", ".tex", ".html", ".htm", ".xml", ".yaml", ".yml",
                      ".toml", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts", ".java", ".go", ".rs", ".sh"}


logger = logging.getLogger(__name__)


class DataError(ValueError):
    """The data given for training or evaluation cannot be used (missing, empty, too short, ...)."""


# --------------------------------------------------------------------------------------------- embedded corpus
def stdlib_source_files(max_chars: int | None = None) -> list[Path]:
    """The embedded corpus: the standard library's ``.py`` files, sorted by path; with ``max_chars``, whole files
    until their sizes in bytes reach it (the last one kept whole: the total may overshoot by up to one file)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place: never walk into site-packages (installed packages), tests or caches
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_STDLIB_PARTS and not d.startswith("test"))
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("test_"))
    files.sort()
    if not files:
        raise DataError(f"the embedded corpus is empty: no .py files found under the standard library at {root}")
    if max_chars is not None:
        kept, total = [], 0
        for path in files:
            if total >= max_chars:
                break
            kept.append(path)
            total += path.stat().st_size
        files = kept
    return files


def _read_files(paths: list[str]) -> Iterator[dict[str, str]]:
    for path in paths:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield {"text": text}


def _read_paragraphs(paths: list[str]) -> Iterator[dict[str, str]]:
    """``.txt`` files: one document per paragraph (text between blank lines); undecodable bytes become U+FFFD."""
    for path in paths:
        text = Path(path).read_text(encoding="utf-8-sig", errors="replace")
        for paragraph in text.split("\n\n"):
            if paragraph.strip():
                yield {"text": paragraph}


def _json_records(path: str) -> Iterator[tuple[str, Any]]:
    """(where, record) of a JSON Lines file, or of a JSON file holding an array of records or one record."""
    text = Path(path).read_text(encoding="utf-8-sig", errors="replace")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:  # only whitespace: no record
        return
    try:
        first = json.loads(lines[0][1])
    except json.JSONDecodeError:
        first = None
    if (len(lines) == 1 or first is not None) and not isinstance(first, list):
        for n, line in lines:  # JSON Lines
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"data file {path!r}, line {n}: not valid JSON ({err.msg})") from None
        return
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"data file {path!r} is neither JSON Lines nor one JSON value ({err.msg} at line "
                        f"{err.lineno})") from None
    records = whole if isinstance(whole, list) else [whole]
    for i, record in enumerate(records):
        yield f"record {i}", record


def _read_json(paths: list[str], text_column: str) -> Iterator[dict[str, str]]:
    """The ``text_column`` string of every record; records without one (missing or null) are skipped, any other
    value is an error naming the record (only that field is read, so other fields may differ between files)."""
    for path in paths:
        seen = skipped = 0
        first_fields = None
        for where, record in _json_records(path):
            if not isinstance(record, dict):
                raise DataError(f"data file {path!r}, {where}: a record must be a JSON object with a "
                                f"{text_column!r} field, got {type(record).__name__}")
            seen += 1
            first_fields = first_fields or sorted(record)
            value = record.get(text_column)
            if value is None:
                skipped += 1
            elif not isinstance(value, str):
                raise DataError(f"text_column {text_column!r} of data file {path!r}, {where}, holds a "
                                f"{type(value).__name__}, not text")
            elif value.strip():
                yield {"text": value}
        if seen and skipped == seen:
            raise DataError(f"text_column {text_column!r} is not a column of {path!r}; its columns are {first_fields}")
        if skipped:
            logger.warning("%s: %d of %d records have no %r text and are skipped", path, skipped, seen, text_column)


# --------------------------------------------------------------------------------------------- loading
def _looks_like_a_path(item: str) -> bool:
    """A missing local path rather than a dataset name ("name" or "org/name")."""
    suffixes = _TEXT_SUFFIXES | _JSON_SUFFIXES | {".py", ".md"}
    if item.startswith((os.sep, ".", "~")) or Path(item).suffix.lower() in suffixes:
        return True
    parent = os.path.dirname(item)
    return bool(parent) and (os.path.isdir(parent) or item.count("/") > 1)


def _usable_in_a_folder(path: str) -> bool:
    """A file a directory or glob contributes: a known text suffix, not hidden, not under a hidden or cache folder."""
    parts = Path(path).parts
    if any(p.startswith(".") and p not in (".", "..") for p in parts) or "__pycache__" in parts:
        return False
    return Path(path).suffix.lower() in _TEXT_SUFFIXES | _JSON_SUFFIXES | _DOCUMENT_SUFFIXES


def _glob_root(pattern: str) -> str:
    """The leading folders of a glob pattern that hold no wildcard (`data/.cache/*/x.txt` -> `data/.cache`)."""
    fixed = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.path.join(*fixed) if fixed else os.curdir


def _expand_local(source: str | list[str]) -> list[str] | None:
    """The local files ``source`` names, or None when it names none (then it is a dataset name)."""
    items = [source] if isinstance(source, str) else list(source)
    files: list[str] = []
    local = False
    known = ", ".join(sorted(_TEXT_SUFFIXES | _JSON_SUFFIXES | _DOCUMENT_SUFFIXES))
    for item in items:
        item = os.path.expanduser(str(item))
        if os.path.isdir(item):
            local = True
            found = sorted(f for f in glob.glob(os.path.join(glob.escape(item), "**", "*"), recursive=True)
                           if os.path.isfile(f))
            if not found:
                raise DataError(f"data directory {item!r} contains no files")
            usable = [f for f in found if _usable_in_a_folder(os.path.relpath(f, item))]
            if not usable:
                raise DataError(f"data directory {item!r} holds no file with a known text suffix ({known}); "
                                f"{len(found)} other file(s) skipped")
            files.extend(f for f in usable if os.path.getsize(f))  # an empty __init__.py adds nothing
        elif os.path.isfile(item):
            local = True
            if os.path.getsize(item) == 0:
                raise DataError(f"data file {item!r} is empty")
            with open(item, "rb") as handle:
                if b"\0" in handle.read(8192):
                    raise DataError(f"data file {item!r} is binary (compressed?), not text: decompress or convert it")
            files.append(item)
        elif glob.has_magic(item):
            local = True
            found = sorted(f for f in glob.glob(item, recursive=True) if os.path.isfile(f))
            if not found:
                raise DataError(f"data pattern {item!r} matches no files")
            root = _glob_root(item)  # the folders the pattern names outright are the user's choice, hidden or not
            usable = [f for f in found if _usable_in_a_folder(os.path.relpath(f, root))]
            if not usable:
                raise DataError(f"data pattern {item!r} matches no file with a known text suffix ({known}); "
                                f"{len(found)} other file(s) skipped")
            files.extend(f for f in usable if os.path.getsize(f))
        elif isinstance(source, list) or _looks_like_a_path(item):
            raise DataError(f"data file {item!r} does not exist")
    if not local:
        return None
    if not files:
        raise DataError(f"the data {source!r} holds only empty files")
    return files


def _load_local_files(files: list[str], text_column: str, streaming: bool) -> Dataset | IterableDataset:
    """Documents (one ``text`` column) of local files, each read by its suffix: JSON records through
    ``text_column``, ``.txt`` by paragraph, any other file whole (always as UTF-8, undecodable bytes replaced)."""
    json_files = [f for f in files if Path(f).suffix.lower() in _JSON_SUFFIXES]
    text_files = [f for f in files if Path(f).suffix.lower() in _TEXT_SUFFIXES]
    whole_files = [f for f in files if f not in set(json_files) | set(text_files)]
    readers = [(_read_json, json_files, {"text_column": text_column}), (_read_paragraphs, text_files, {}),
               (_read_files, whole_files, {})]
    readers = [(fn, paths, kwargs) for fn, paths, kwargs in readers if paths]

    def documents(parts, stamp=()):  # `stamp` keys datasets' cache of a non-streamed load to the files' states
        for fn, paths, kwargs in parts:
            yield from fn(paths, **kwargs)

    features = Features({"text": Value("string")})
    if streaming:
        return IterableDataset.from_generator(documents, features=features, gen_kwargs={"parts": readers})
    # cached by the files' names, sizes and modification times (a tuple: datasets shards lists): an edited file is
    # read again
    stamp = (_READER_VERSION, *((f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files))
    empty = DataError(f"the data files {files[:3]}{'...' if len(files) > 3 else ''} contain only whitespace")
    try:
        ds = Dataset.from_generator(documents, features=features, gen_kwargs={"parts": readers, "stamp": stamp})
    except DatasetGenerationError as err:  # datasets wraps what the readers raise
        cause = err.__cause__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None
    except ValueError as err:  # datasets makes no split of zero documents
        if any(True for _ in documents(readers)):
            raise
        raise empty from err
    if len(ds) == 0:
        raise empty
    return ds


def load_documents(
    source: str | list[str] | None = EMBEDDED_CORPUS,
    *,
    text_column: str = "text",
    split: str = "train",
    streaming: bool = False,
    max_chars: int | None = None,
) -> Dataset | IterableDataset:
    """Load documents (one ``text_column`` string per row) from ``source`` (see the module docstring)."""
    if source is None or source == EMBEDDED_CORPUS:
        paths = [str(p) for p in stdlib_source_files(max_chars)]
        if streaming:
            return IterableDataset.from_generator(_read_files, gen_kwargs={"paths": paths})
        return Dataset.from_list(list(_read_files(paths)))

    files = _expand_local(source)
    if files is None:  # a dataset name
        name, _, config = str(source).partition(":")
        try:
            ds = load_dataset(name, config or None, split=split, streaming=streaming)
        except Exception as err:  # noqa: BLE001 - re-raised with the name of the argument
            raise DataError(
                f"could not load dataset {source!r} (split {split!r}) with datasets.load_dataset: {err}") from err
    else:
        ds = _load_local_files(files, text_column, streaming)
        text_column = "text"
    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise DataError(f"text_column {text_column!r} is not a column of {source!r}; its columns are {columns}")
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    if columns is not None and len(columns) > 1:
        ds = ds.select_columns(["text"])
    if not streaming and len(ds) == 0:
        raise DataError(f"data source {source!r} has no documents")
    return ds


def split_documents(docs: Dataset | IterableDataset, eval_every: int = 20) -> tuple[Any, Any]:
    """Deterministic train/eval split by document: every ``eval_every``-th document goes to evaluation."""
    if eval_every < 2:
        raise DataError(f"eval_every must be >= 2, got {eval_every}")
    if isinstance(docs, IterableDataset):
        train = docs.filter(lambda _, i: i % eval_every != 0, with_indices=True)
        evals = docs.filter(lambda _, i: i % eval_every == 0, with_indices=True)
        return train, evals
    n = len(docs)
    if n < 2:
        raise DataError(f"need at least 2 documents to split off an evaluation set, got {n}; pass eval data separately")
    eval_idx = [i for i in range(n) if i % eval_every == 0]
    train_idx = [i for i in range(n) if i % eval_every != 0]
    return docs.select(train_idx), docs.select(eval_idx)


# --------------------------------------------------------------------------------------------- packing
def check_seq_len(seq_len: int, config: Any | None = None) -> None:
    """Raise if ``seq_len`` is not usable for training (too short, or longer than the model's positions)."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an int >= 2 (one input and one target token), got {seq_len!r}")
    if config is None:
        return
    # Attention layers (rotary positions) are bounded by max_position_embeddings; the recurrent Titans layers are not.
    layer_types = getattr(config, "layer_types", None)
    has_attention = layer_types is None or any("attention" in t and t != "linear_attention" for t in layer_types)
    limit = getattr(config, "max_position_embeddings", None)
    if has_attention and limit is not None and seq_len > limit:
        raise DataError(
            f"seq_len={seq_len} is longer than the model can take: its attention layers cover "
            f"config.max_position_embeddings={limit} positions"
        )


def _pack_batch(batch: dict[str, list], tokenizer, seq_len: int, eos_id: int | None) -> dict[str, list]:
    encoded = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    usable = (len(stream) // seq_len) * seq_len
    blocks = [stream[i : i + seq_len] for i in range(0, usable, seq_len)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def pack_dataset(
    docs: Dataset | IterableDataset,
    tokenizer,
    seq_len: int,
    *,
    add_eos: bool = True,
    batch_size: int = 256,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Tokenize ``docs`` (a ``text`` column) and pack them into blocks of ``seq_len`` tokens."""
    check_seq_len(seq_len)
    eos_id = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos_id is None:
        raise DataError("the tokenizer has no eos_token; set one or pass add_eos=False")
    kwargs: dict[str, Any] = dict(
        batched=True,
        batch_size=batch_size,
        remove_columns=["text"],
        fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, "eos_id": eos_id},
    )
    if isinstance(docs, IterableDataset):
        return docs.map(_pack_batch, **kwargs)
    packed = docs.map(_pack_batch, num_proc=num_proc, desc=f"Packing into blocks of {seq_len} tokens", **kwargs)
    if len(packed) == 0:
        first = tokenizer(docs["text"][:1000], add_special_tokens=False, verbose=False)["input_ids"]
        n_tokens = sum(len(x) for x in first)
        raise DataError(
            f"the data is too short for even one block of seq_len={seq_len} tokens per {batch_size}-document batch "
            f"(~{n_tokens} tokens in total); use more data or a smaller seq_len"
        )
    return packed


def build_lm_datasets(
    tokenizer,
    seq_len: int,
    source: str | list[str] | None = EMBEDDED_CORPUS,
    *,
    eval_source: str | list[str] | None = None,
    text_column: str = "text",
    streaming: bool = False,
    max_chars: int | None = None,
    eval_every: int = 20,
    config: Any | None = None,
) -> DatasetDict | dict[str, IterableDataset]:
    """Packed ``{"train", "eval"}`` datasets. Without ``eval_source`` every ``eval_every``-th document is held out."""
    check_seq_len(seq_len, config)
    docs = load_documents(source, text_column=text_column, streaming=streaming, max_chars=max_chars)
    if eval_source is None:
        train_docs, eval_docs = split_documents(docs, eval_every)
    else:
        train_docs = docs
        eval_docs = load_documents(eval_source, text_column=text_column, streaming=streaming)
    out = {"train": pack_dataset(train_docs, tokenizer, seq_len), "eval": pack_dataset(eval_docs, tokenizer, seq_len)}
    if streaming:  # a stream has no length: look at its first sequence (what the eager path checks while packing)
        for name, ds in out.items():
            if next(iter(ds), None) is None:
                raise DataError(f"the {name} data is too short for one sequence of seq_len={seq_len} tokens")
    return out if streaming else DatasetDict(out)


def iter_texts(docs: Dataset | IterableDataset, batch_size: int = 256) -> Iterator[list[str]]:
    """Batches of document texts (for tokenizer training)."""
    batch: list[str] = []
    for row in docs:
        batch.append(row["text"])
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch

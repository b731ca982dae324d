"""Long-context evaluation tasks generated locally (no download) as ``datasets.Dataset`` objects.

Every task is built for a tokenizer and a target length in tokens. An example is a *context* (an instruction prefix,
a haystack of filler text and the needles hidden in it) followed by one or more *queries*, each with its answer:

* ``passkey``, ``number``, ``word``: RULER-style single-needle retrieval (a pass key; a "special magic number" or
  "special magic word" for a key word) hidden at a given depth of a repetitive noise haystack.
* ``mqar``: multi-query associative recall: a block of ``num_pairs`` "The value of key K is V." statements at the given
  depth, then one query per key (in shuffled order).
* ``babilong``: bAbI-style facts ("Mary went to the kitchen.") spread through filler sentences taken from a local text
  corpus (the standard library's docstrings and comments by default, or any text file / folder), then a question
  about where a person is; the supporting fact (that person's last move) sits at the given depth, an earlier move of
  the same person before it as a distractor.

Token ids are built piece by piece: every filler sentence, needle, prefix and query is tokenized on its own (with a
leading space) and the id lists are concatenated. So lengths are exact (``len(context_ids)`` plus the longest
query's length ``== length``), a needle's tokens sit exactly at ``needle_starts[i]:needle_ends[i]``, and a
1M-token example costs a list repeat, not a 1M-token tokenizer call. Needles are inserted between filler sentences,
at the boundary nearest to the requested depth (depth 0: right after the prefix; depth 1: right before the queries).

Generation is deterministic for a seed (``random.Random(f"{seed}|{task}|{length}|{depth}|{sample}")``).
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections.abc import Sequence

import datasets

__all__ = [
    "TASKS",
    "TaskError",
    "build_task_dataset",
    "corpus_sentences",
    "format_length",
    "parse_depths",
    "parse_lengths",
]

TASKS = ("passkey", "number", "word", "mqar", "babilong")
NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NIAH_PREFIX = (
    "Some special magic values are hidden inside the following text. Make sure to memorize them. "
    "I will quiz you about them at the end."
)
BABILONG_PREFIX = "Read the text and remember where each person went. I will ask about it at the end."
# Key words and answer words (common, short English words; a fixed list so that generation needs nothing else).
WORDS = (
    "apple", "river", "stone", "cloud", "garden", "silver", "window", "candle", "forest", "bridge", "orange", "pencil",
    "marble", "castle", "rocket", "planet", "violin", "anchor", "basket", "butter", "carpet", "dragon", "engine",
    "feather", "ginger", "hammer", "island", "jacket", "kettle", "ladder", "magnet", "needle", "oyster", "pepper",
    "rabbit", "saddle", "tomato", "velvet", "walnut", "lantern", "zipper", "copper", "meadow", "lemon", "tiger",
    "piano", "ocean", "desert", "mirror", "pillow",
)
NAMES = ("Mary", "John", "Sandra", "Daniel", "Emma", "Peter", "Julia", "Oscar")
PLACES = ("kitchen", "garden", "office", "bedroom", "hallway", "bathroom", "cellar", "garage")
MOVES = ("went to", "moved to", "journeyed to", "travelled to")


class TaskError(ValueError):
    """A task cannot be generated as asked (unknown task, length too short, bad depth, empty corpus, ...)."""


# --------------------------------------------------------------------------------------------- parsing
def parse_lengths(text: str | Sequence[int | str]) -> list[int]:
    """``"1k,4k,1m"`` -> ``[1024, 4096, 1048576]`` (k = 1024, m = 1024^2; plain integers are tokens; a length given
    twice is kept once)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        s = str(item).strip().lower()
        if not s:
            continue
        mult = 1
        if s[-1] in "km":
            mult = 1024 if s[-1] == "k" else 1024 * 1024
            s = s[:-1]
        try:
            value = float(s) * mult
        except ValueError:
            raise TaskError(f"bad length {item!r}: use token counts like 512, 4k, 64k, 1m") from None
        if not math.isfinite(value) or value != int(value) or value < 1:
            raise TaskError(f"bad length {item!r}: must be a whole number of tokens >= 1")
        if int(value) not in out:  # "256,0.25k" is one length, run once
            out.append(int(value))
    if not out:
        raise TaskError("no lengths given")
    return out


def format_length(n: int) -> str:
    """Inverse of :func:`parse_lengths` for display: 4096 -> '4k', 1048576 -> '1m', 1000 -> '1000'."""
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}m"
    if n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def parse_depths(text: str | Sequence[float]) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``; every depth must lie in [0, 1]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            d = float(item)
        except ValueError:
            raise TaskError(f"bad depth {item!r}: use fractions in [0, 1] like 0,0.25,0.5") from None
        if not 0.0 <= d <= 1.0:
            raise TaskError(f"depth {d} is outside [0, 1] (0 = start of the haystack, 1 = its end)")
        if d not in out:  # a depth given twice is run once
            out.append(d)
    if not out:
        raise TaskError("no depths given")
    return out


# --------------------------------------------------------------------------------------------- tokenization
def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Filler:
    """Filler sentences as token-id lists, cycled from a start index."""

    def __init__(self, sentences: list[list[int]]):
        sentences = [s for s in sentences if s]
        if not sentences:
            raise TaskError("the filler has no sentences")
        self.sentences = sentences

    def take(self, num_tokens: int, start: int) -> tuple[list[int], list[int]]:
        """Exactly ``num_tokens`` filler ids starting at sentence ``start`` (cycling; the last sentence cut), and the
        offsets where sentences begin (the places a needle may go), including ``num_tokens`` itself."""
        out: list[int] = []
        bounds = [0]
        i = start
        while len(out) < num_tokens:
            sent = self.sentences[i % len(self.sentences)]
            out.extend(sent[: num_tokens - len(out)])
            bounds.append(len(out))
            i += 1
        return out, bounds


_CORPUS_CACHE: dict[tuple, list[str]] = {}


def corpus_sentences(corpus: str | list[str] = "stdlib", max_chars: int | None = 2_000_000) -> list[str]:
    """Prose sentences of a local corpus, for the BABILong-style haystack.

    ``corpus``: ``"stdlib"`` (the docstrings and comments of the standard library, hope_hf's embedded corpus) or local
    text files / folders (any form :func:`hope_hf.data.load_documents` reads). Lines with mostly letters and at least
    five words are kept; code, markup and short lines are dropped.
    """
    key = (tuple(corpus) if isinstance(corpus, list) else corpus, max_chars)
    if key in _CORPUS_CACHE:
        return _CORPUS_CACHE[key]
    from ..data import load_documents

    docs = load_documents(corpus, max_chars=max_chars)
    out = []
    for text in docs["text"]:
        for line in text.splitlines():
            line = line.strip().lstrip("#").strip().strip("'\"").strip()
            if len(line) < 30 or len(line.split()) < 5:
                continue
            letters = sum(c.isalpha() or c == " " for c in line)
            if letters < 0.85 * len(line) or re.search(r"[{}\[\]=<>_]|\(\)|::", line):
                continue
            out.append(line)
    if not out:
        raise TaskError(f"the corpus {corpus!r} has no prose lines to use as filler")
    _CORPUS_CACHE[key] = out
    return out


# --------------------------------------------------------------------------------------------- building blocks
def _compose(
    prefix: list[int],
    filler: _Filler,
    filler_start: int,
    needles: list[tuple[float, list[int]]],
    context_len: int,
) -> tuple[list[int], list[int], list[int]]:
    """``prefix + filler`` with the needles inserted at the sentence boundaries nearest to their depths; exactly
    ``context_len`` tokens. Returns (ids, needle_starts, needle_ends) in the order the needles were given."""
    needle_tokens = sum(len(n) for _, n in needles)
    hay_len = context_len - len(prefix) - needle_tokens
    if hay_len < 0:
        raise TaskError(
            f"needs {len(prefix) + needle_tokens} tokens for its prefix and needles, only {context_len} fit")
    hay, bounds = filler.take(hay_len, filler_start)
    # each needle goes to the boundary nearest depth * hay_len
    placed = []
    for order, (depth, ids) in enumerate(needles):
        target = depth * hay_len
        j = bisect.bisect_left(bounds, target)
        cands = [b for b in (bounds[max(j - 1, 0)], bounds[min(j, len(bounds) - 1)])]
        offset = min(cands, key=lambda b: (abs(b - target), b))
        placed.append((offset, depth, order, ids))
    placed.sort(key=lambda x: x[:3])  # equal offsets keep the order of their depths
    out = list(prefix)
    starts = [0] * len(needles)
    ends = [0] * len(needles)
    prev = 0
    for offset, _, order, ids in placed:
        out.extend(hay[prev:offset])
        starts[order] = len(out)
        out.extend(ids)
        ends[order] = len(out)
        prev = offset
    out.extend(hay[prev:])
    assert len(out) == context_len
    return out, starts, ends


def _niah(task, tokenizer, rng, depth, num_pairs):
    if task == "passkey":
        value = str(rng.randint(10000, 99999))
        needle = f"The pass key is {value}. Remember it. {value} is the pass key."
        query = "What is the pass key? The pass key is"
        return [(depth, needle)], [query], [value], NIAH_PREFIX
    if task in ("number", "word"):
        key = rng.choice(WORDS)
        kind = "number" if task == "number" else "word"
        value = str(rng.randint(1000000, 9999999)) if task == "number" else rng.choice([w for w in WORDS if w != key])
        needle = f"One of the special magic {kind}s for {key} is: {value}."
        query = (f"What is the special magic {kind} for {key} mentioned in the provided text? "
                 f"The special magic {kind} for {key} mentioned in the provided text is")
        return [(depth, needle)], [query], [value], NIAH_PREFIX
    if task == "mqar":
        keys = rng.sample(WORDS, num_pairs)
        values = [str(rng.randint(1000, 9999)) for _ in keys]
        block = " ".join(f"The value of key {k} is {v}." for k, v in zip(keys, values))
        order = list(range(num_pairs))
        rng.shuffle(order)
        queries = [f"What is the value of key {keys[i]}? The value of key {keys[i]} is" for i in order]
        return [(depth, block)], queries, [values[i] for i in order], NIAH_PREFIX
    raise TaskError(f"unknown task {task!r}")


def _babilong(rng, depth, num_facts):
    person = rng.choice(NAMES)
    others = [n for n in NAMES if n != person]
    first, answer = rng.sample(PLACES, 2)
    facts = []  # (depth, text); the supporting fact first
    facts.append((depth, f"{person} {rng.choice(MOVES)} the {answer}."))
    if depth > 0:  # an earlier move of the same person: the answer must be the LAST place
        facts.append((rng.uniform(0, depth), f"{person} {rng.choice(MOVES)} the {first}."))
    while len(facts) < num_facts:
        facts.append((rng.random(), f"{rng.choice(others)} {rng.choice(MOVES)} the {rng.choice(PLACES)}."))
    query = f"Question: Where is {person}? Answer: {person} is in the"
    return facts, [query], [answer], BABILONG_PREFIX


# --------------------------------------------------------------------------------------------- the dataset
def build_task_dataset(
    task: str,
    tokenizer,
    length: int,
    *,
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 1,
    seed: int = 0,
    num_pairs: int = 4,
    num_facts: int = 6,
    haystack: str | None = None,
    corpus: str | list[str] = "stdlib",
    max_corpus_chars: int | None = 2_000_000,
) -> datasets.Dataset:
    """Examples of ``task`` at ``length`` tokens (context + its longest query), ``samples`` per depth.

    ``haystack``: ``"noise"`` (repeated short sentences, RULER's default) or ``"corpus"`` (sentences of ``corpus``);
    defaults to noise for the needle tasks and corpus for ``babilong``.

    Columns: ``id``, ``task``, ``length``, ``depth``, ``sample``, ``seed``, ``context_ids``, ``query_texts``,
    ``query_ids``, ``answers``, ``needle_texts``, ``needle_starts``, ``needle_ends`` (the needles' token spans in
    ``context_ids``; for ``babilong`` the facts, the supporting fact first).
    """
    _check_task_arguments(task, length, samples, num_pairs, num_facts)
    depths = parse_depths(list(depths))
    haystack = haystack or ("corpus" if task == "babilong" else "noise")
    if haystack == "noise":
        sentences = list(NOISE_SENTENCES)
    elif haystack == "corpus":
        sentences = corpus_sentences(corpus, max_corpus_chars)
    else:
        raise TaskError(f"haystack must be 'noise' or 'corpus', got {haystack!r}")
    filler = _Filler([_ids(tokenizer, " " + s) for s in sentences])
    examples = [
        _example(task, tokenizer, length, depth, sample, seed, filler, haystack == "corpus", num_pairs, num_facts)
        for depth in depths for sample in range(samples)
    ]
    return datasets.Dataset.from_dict({name: [e[name] for e in examples] for name in _TASK_FEATURES},
                                      features=_TASK_FEATURES)


def _check_task_arguments(task: str, length, samples: int, num_pairs: int, num_facts: int) -> None:
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not isinstance(length, int) or length < 1:
        raise TaskError(f"length must be a positive int (tokens), got {length!r}")
    if samples < 1:
        raise TaskError(f"samples must be >= 1, got {samples}")
    if not 1 <= num_pairs <= len(WORDS):
        raise TaskError(f"num_pairs must be in 1..{len(WORDS)}, got {num_pairs}")
    if num_facts < 2:
        raise TaskError(f"num_facts must be >= 2, got {num_facts}")


# the columns of `build_task_dataset`
_TASK_FEATURES = datasets.Features({
    "id": datasets.Value("string"), "task": datasets.Value("string"), "length": datasets.Value("int64"),
    "depth": datasets.Value("float64"), "sample": datasets.Value("int64"), "seed": datasets.Value("int64"),
    "context_ids": datasets.Sequence(datasets.Value("int32")),
    "query_texts": datasets.Sequence(datasets.Value("string")),
    "query_ids": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
    "answers": datasets.Sequence(datasets.Value("string")),
    "needle_texts": datasets.Sequence(datasets.Value("string")),
    "needle_starts": datasets.Sequence(datasets.Value("int64")),
    "needle_ends": datasets.Sequence(datasets.Value("int64")),
})


def _example(task: str, tokenizer, length: int, depth: float, sample: int, seed: int, filler: _Filler,
             random_start: bool, num_pairs: int, num_facts: int) -> dict:
    """One row of `build_task_dataset`: its own random draws (seeded by seed, task, length, depth and sample), the
    needles at `depth` in `filler` (from a random sentence if `random_start`), the context cut so that its longest
    query ends at `length` tokens."""
    rng = random.Random(f"{seed}|{task}|{length}|{depth!r}|{sample}")
    if task == "babilong":
        needles, queries, answers, prefix = _babilong(rng, depth, num_facts)
    else:
        needles, queries, answers, prefix = _niah(task, tokenizer, rng, depth, num_pairs)
    prefix_ids = _ids(tokenizer, prefix)
    query_ids = [_ids(tokenizer, " " + q) for q in queries]
    needle_ids = [(d, _ids(tokenizer, " " + text)) for d, text in needles]
    context_len = length - max(len(q) for q in query_ids)
    filler_start = rng.randrange(len(filler.sentences)) if random_start else 0
    try:
        ids, starts, ends = _compose(prefix_ids, filler, filler_start, needle_ids, context_len)
    except TaskError as err:
        need = length - context_len
        raise TaskError(
            f"length {length} is too short for task {task!r}: the context {err} (the query takes {need}); "
            "use a length of at least "
            f"{length + len(prefix_ids) + sum(len(n) for _, n in needle_ids) - context_len}"
        ) from None
    return {"id": f"{task}-{format_length(length)}-d{depth:g}-s{sample}", "task": task, "length": length,
            "depth": depth, "sample": sample, "seed": seed, "context_ids": ids, "query_texts": queries,
            "query_ids": query_ids, "answers": answers, "needle_texts": [" " + text for _, text in needles],
            "needle_starts": starts, "needle_ends": ends}

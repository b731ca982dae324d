"""Run a HOPE model on the long-context tasks and score it with the shipped `evaluate` metric modules.

Every example is run the same way at every length: the context is streamed through the recurrent cache in pieces of
``piece_size`` tokens (``hope_hf.streaming.stream_prefill``; or through a :class:`~hope_hf.continual.StreamLearner`
when stream learning is on), then each query is fed on a copy of that state and the answer is decoded greedily. The
first word of the decoded text (surrounding punctuation removed) is the prediction; it is scored by exact match
(``hope_exact_match``) and, for multi-query recall, per query (``hope_recall``).

Any other causal LM (a Llama baseline, say) runs the same way with its own ``DynamicCache`` prefilled in pieces.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..streaming import split_into_pieces, stream_prefill
from .tasks import TASKS, build_task_dataset, format_length

__all__ = [
    "exact_match_metric_path",
    "extract_answer",
    "greedy_answer",
    "load_exact_match_metric",
    "load_recall_metric",
    "recall_metric_path",
    "run_example",
    "run_suite",
    "run_task",
]

_METRICS = Path(__file__).resolve().parent.parent / "metrics"


DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # needle depths of a task when none are given

def exact_match_metric_path() -> str:
    """Path of the shipped ``hope_exact_match`` metric module, for ``evaluate.load(path)``."""
    return str(_METRICS / "hope_exact_match")


def recall_metric_path() -> str:
    """Path of the shipped ``hope_recall`` metric module, for ``evaluate.load(path)``."""
    return str(_METRICS / "hope_recall")


def load_exact_match_metric(**kwargs):
    import evaluate

    return evaluate.load(exact_match_metric_path(), **kwargs)


def load_recall_metric(**kwargs):
    import evaluate

    return evaluate.load(recall_metric_path(), **kwargs)


_PUNCT = ".,;:!?\"'()[]{}"


def extract_answer(text: str) -> str:
    """The first whitespace-separated word of ``text`` without surrounding punctuation ('' if there is none)."""
    words = text.split()
    return words[0].strip(_PUNCT) if words else ""


@torch.no_grad()
def greedy_answer(model, cache, query_ids: Sequence[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    """Feed ``query_ids`` through ``cache`` (which it advances) and decode greedily."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(query_ids)], dtype=torch.long, device=device)
    kw = _cache_kwarg(model, cache)
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw).logits[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        out.append(token)
        if token in stop_ids or len(out) == max_new_tokens:
            break
        step = torch.tensor([[token]], dtype=torch.long, device=device)
        logits = model(input_ids=step, use_cache=True, logits_to_keep=1, **kw).logits[0, -1]
    return out


def _is_hope(model) -> bool:
    return hasattr(getattr(model, "config", None), "cms_levels")


def _cache_kwarg(model, cache) -> dict:
    """HOPE takes ``past_key_values=``; other models (e.g. a Llama baseline) on Transformers >= 5.24 take ``cache=``."""
    if _is_hope(model) or "cache" not in inspect.signature(model.forward).parameters:
        return {"past_key_values": cache}
    return {"cache": cache}


@torch.no_grad()
def _prefill(model, context: torch.Tensor, piece_size: int, progress: bool):
    """Stream ``context`` through the model's cache in pieces: ``HopeCache`` for HOPE, a ``DynamicCache`` (growing
    key/value cache) for any other causal LM, so that a baseline such as Llama runs on the same examples."""
    if _is_hope(model):
        cache, _ = stream_prefill(model, split_into_pieces(context, piece_size), progress=progress,
                                  total=context.shape[1])
        return cache
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    cache = DynamicCache()
    device = next(model.parameters()).device
    bar = tqdm(total=context.shape[1], unit="tok", desc="prefill", disable=not progress)
    for piece in split_into_pieces(context, piece_size):
        model(input_ids=piece.to(device), use_cache=True, logits_to_keep=1, **_cache_kwarg(model, cache))
        bar.update(piece.shape[1])
    bar.close()
    return cache


def _cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _max_new_tokens(tokenizer, answer: str, extra: int) -> int:
    return len(tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) + extra


def run_example(
    model,
    tokenizer,
    example: Mapping[str, Any],
    *,
    piece_size: int = 4096,
    extra_new_tokens: int = 4,
    learner_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run one example; returns its predictions (first word), the raw decoded texts and timings."""
    context = torch.tensor(example["context_ids"], dtype=torch.long).unsqueeze(0)
    stop = {t for t in (tokenizer.eos_token_id,) if t is not None}
    t0 = time.time()
    raw, preds, learning = [], [], None
    if learner_kwargs is not None:
        from ..continual import StreamLearner

        learner = StreamLearner(model, progress=progress, **dict(learner_kwargs))
        learned = learner.stream(split_into_pieces(context, piece_size), total=context.shape[1])
        prefill_s = time.time() - t0
        learning = {"tokens_learned": learned["tokens"], "mean_loss": learned["mean_loss"],
                    "level_updates": {str(k): v for k, v in learner.level_updates.items()}}
        for query, answer in zip(example["query_ids"], example["answers"]):
            out = learner.generate(query, _max_new_tokens(tokenizer, answer, extra_new_tokens), eos_token_id=list(stop))
            raw.append(tokenizer.decode(out, skip_special_tokens=True))
        cache_bytes = learner.cache.nbytes()
    else:
        cache = _prefill(model, context, piece_size, progress)
        prefill_s = time.time() - t0
        queries = list(zip(example["query_ids"], example["answers"]))
        for i, (query, answer) in enumerate(queries):
            state = cache if i == len(queries) - 1 else copy.deepcopy(cache)
            out = greedy_answer(model, state, query, _max_new_tokens(tokenizer, answer, extra_new_tokens), stop)
            raw.append(tokenizer.decode(out, skip_special_tokens=True))
        cache_bytes = _cache_bytes(cache)
    preds = [extract_answer(t) for t in raw]
    return {
        "id": example["id"], "task": example["task"], "length": example["length"], "depth": example["depth"],
        "answers": list(example["answers"]), "predictions": preds, "raw": raw,
        "prefill_seconds": prefill_s, "total_seconds": time.time() - t0, "cache_bytes": cache_bytes,
        "stream_learning": learning,
    }


def _score(task: str, records: list[dict]) -> dict[str, float]:
    if task == "mqar":
        metric = load_recall_metric()
        r = metric.compute(predictions=[x["predictions"] for x in records], references=[x["answers"] for x in records])
        return {"accuracy": r["recall_accuracy"], "example_accuracy": r["example_accuracy"], "queries": r["queries"]}
    metric = load_exact_match_metric()
    r = metric.compute(predictions=[x["predictions"][0] for x in records],
                       references=[x["answers"][0] for x in records])
    return {"accuracy": r["exact_match"], "correct": r["correct"], "total": r["total"]}


def run_task(model, tokenizer, task: str, lengths: Sequence[int], *, depths=DEFAULT_DEPTHS,
             samples: int = 1, seed: int = 0, piece_size: int = 4096, learner_kwargs=None, progress: bool = True,
             task_kwargs: Mapping[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Generate ``task`` at every length and depth, run the model, score. Returns accuracies overall, by length and
    by (length, depth), plus every example's record."""
    from tqdm.auto import tqdm

    records = []
    by_length, by_cell = {}, defaultdict(dict)
    for length in lengths:
        ds = build_task_dataset(task, tokenizer, length, depths=depths, samples=samples, seed=seed,
                                **dict(task_kwargs or {}))
        recs = []
        for example in tqdm(ds, desc=f"{task} {format_length(length)}", disable=not progress, unit="ex"):
            recs.append(run_example(model, tokenizer, example, piece_size=piece_size, learner_kwargs=learner_kwargs,
                                    progress=progress and length >= 65536))
        by_length[format_length(length)] = _score(task, recs)["accuracy"]
        for depth in sorted({r["depth"] for r in recs}):
            cell = [r for r in recs if r["depth"] == depth]
            by_cell[format_length(length)][f"{depth:g}"] = _score(task, cell)["accuracy"]
        if log is not None:
            log(f"{task:>9} {format_length(length):>5}: accuracy {by_length[format_length(length)]:.3f} "
                f"({len(recs)} examples, {sum(r['total_seconds'] for r in recs):.1f} s)")
        records.extend(recs)
    overall = _score(task, records)
    return {"overall": overall, "by_length": by_length, "by_length_depth": dict(by_cell), "examples": records}


def run_suite(model, tokenizer, tasks: Sequence[str], lengths: Sequence[int], *, output_dir: str | None = None,
              plots: bool = True, settings: Mapping[str, Any] | None = None, **kwargs) -> dict[str, Any]:
    """Run every task of ``tasks`` (see :func:`run_task` for ``kwargs``); write ``results.json`` and the plots to
    ``output_dir`` when given, with the record of what was written (``hope-hf-outputs.json``): a plot of an earlier
    suite run that this one did not redraw is removed only if that record lists it unchanged, no other file is ever
    removed. Returns the results dict."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    # one example of every (task, length, depth) is generated before anything runs: a length too short for a task
    # fails now, not after the other tasks have run for hours
    for task in tasks:
        for length in lengths:
            build_task_dataset(task, tokenizer, length, depths=kwargs.get("depths", DEFAULT_DEPTHS), samples=1,
                               seed=kwargs.get("seed", 0), **dict(kwargs.get("task_kwargs") or {}))
    model.eval()
    t0 = time.time()
    results = {
        "settings": {"tasks": list(tasks), "lengths": [int(x) for x in lengths],
                     **{k: v for k, v in kwargs.items() if k in ("depths", "samples", "seed", "piece_size")},
                     "stream_learning": kwargs.get("learner_kwargs"), **dict(settings or {})},
        "tasks": {},
    }
    for task in tasks:
        results["tasks"][task] = run_task(model, tokenizer, task, lengths, **kwargs)
    results["wall_seconds"] = time.time() - t0
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2, default=list)
        from .._outputs import SUITE_COMMAND, record_outputs, remove_own_files
        from .plots import plot_files, plot_results

        written = []
        if plots:
            written = results["plots"] = plot_results(results, output_dir)
        names = ["results.json"] + [os.path.basename(p) for p in written]
        # plots an earlier run of the suite wrote here no longer match results.json: remove those, and only those
        # that the record lists as written by it and unchanged since (a file of the user's is never touched)
        remove_own_files(output_dir, SUITE_COMMAND, [n for n in plot_files(TASKS) if n not in names])
        record_outputs(output_dir, SUITE_COMMAND, names, replace=True)
    return results

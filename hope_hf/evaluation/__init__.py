"""Long-context evaluation of HOPE models: locally generated tasks (RULER-style needles, multi-query associative
recall, BABILong-style facts in long filler), run by streaming through the recurrent cache, scored by the `evaluate`
metric modules shipped in ``hope_hf/metrics`` (``hope_exact_match``, ``hope_recall``), reported as JSON and plots.

CLI: ``hope-hf eval --task passkey,mqar --lengths 1k,4k,16k --model_name_or_path DIR --output_dir OUT``.
"""

from .runner import (
    exact_match_metric_path,
    extract_answer,
    greedy_answer,
    load_exact_match_metric,
    load_recall_metric,
    recall_metric_path,
    run_example,
    run_suite,
    run_task,
)
from .tasks import TASKS, TaskError, build_task_dataset, corpus_sentences, format_length, parse_depths, parse_lengths

__all__ = [
    "TASKS",
    "TaskError",
    "build_task_dataset",
    "corpus_sentences",
    "exact_match_metric_path",
    "extract_answer",
    "format_length",
    "greedy_answer",
    "load_exact_match_metric",
    "load_recall_metric",
    "parse_depths",
    "parse_lengths",
    "recall_metric_path",
    "run_example",
    "run_suite",
    "run_task",
]

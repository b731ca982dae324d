"""``hope-hf eval --task ...``: the long-context suite from the command line (dispatched by ``hope_hf.cli``).

Shares its helpers with ``hope_hf.cli`` through ``hope_hf._cli_common``; it never imports ``hope_hf.cli``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os

from .._cli_common import CliError, load_model_and_tokenizer, wants_suite
from .._outputs import MANIFEST_NAME, SUITE_COMMAND, is_run_of
from .tasks import TASKS, TaskError, parse_depths, parse_lengths

__all__ = ["build_suite_parser", "cmd_eval_suite", "wants_suite"]


def build_suite_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hope-hf eval",
        allow_abbrev=False,
        description="Long-context suite: RULER-style needles (passkey, number, word), multi-query associative recall "
                    "(mqar) and BABILong-style facts (babilong), generated locally, streamed through the recurrent "
                    "cache, scored by exact match. Writes results.json and plots to --output_dir.",
    )
    p.add_argument("--task", required=True, help=f"comma-separated tasks, or 'all': {','.join(TASKS)}")
    p.add_argument("--lengths", default="1k,4k",
                   help="comma-separated context lengths in tokens (k = 1024, m = 1024^2), e.g. 1k,4k,16k,64k,256k,1m")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=1, help="examples per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model_name_or_path", required=True, help="a saved HOPE model folder (with its tokenizer)")
    p.add_argument("--tokenizer_name_or_path", default=None, help="tokenizer folder, if not the model's")
    p.add_argument("--output_dir", required=True, help="where results.json and the plots go")
    p.add_argument("--piece_size", type=int, default=4096, help="tokens per streamed piece")
    p.add_argument("--haystack", choices=("noise", "corpus"), default=None,
                   help="filler text (default: noise for the needle tasks, the corpus for babilong)")
    p.add_argument("--corpus", default="stdlib", help="local corpus for corpus filler: 'stdlib' or text files/folders")
    p.add_argument("--max_corpus_chars", type=int, default=2_000_000)
    p.add_argument("--num_pairs", type=int, default=4, help="mqar: key-value pairs (= queries) per example")
    p.add_argument("--num_facts", type=int, default=6, help="babilong: facts per example")
    p.add_argument("--stream_learning", action="store_true",
                   help="learn the CMS levels on the context while streaming it (hope_hf.continual.StreamLearner)")
    p.add_argument("--learn_lr", type=float, default=1e-4, help="stream learning: SGD learning rate of every level")
    p.add_argument("--learn_chunk", type=int, default=256, help="stream learning: most tokens per forward/backward")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    p.add_argument("--no_plots", action="store_true", help="write results.json only")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="write into a non-empty --output_dir, replacing its results.json and plots (files of those "
                        "names); nothing else there is removed, and a plot is removed only if an earlier run of the "
                        "suite wrote it and it is unchanged")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def _check_output_dir(path: str, overwrite: bool) -> None:
    """Refuse an --output_dir whose files this run could overwrite, unless --overwrite_output_dir: one that holds a
    results.json (an earlier run's or not), or any other non-empty folder that is not an earlier run of the suite."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"--output_dir {path!r} is an existing file, not a folder; choose a folder")
    entries = sorted(e for e in os.listdir(path) if e != MANIFEST_NAME) if os.path.isdir(path) else []
    if not entries or overwrite:
        return
    if "results.json" in entries:
        raise CliError(f"--output_dir {path!r} already holds a results.json; choose another --output_dir or pass "
                       "--overwrite_output_dir to replace it")
    if not is_run_of(path, SUITE_COMMAND):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise CliError(f"--output_dir {path!r} is not empty ({shown}) and is not an earlier run of `hope-hf eval "
                       "--task`; choose a new or empty folder, or pass --overwrite_output_dir (results.json and the "
                       "plots are then written there, replacing files of the same names; nothing else is removed)")


def _unrecognized(parser: argparse.ArgumentParser, remaining: list[str]) -> CliError:
    """The error for unknown (or abbreviated) options of the suite, each with its closest valid spelling."""
    options = sorted({s for action in parser._actions for s in action.option_strings if s.startswith("--")})
    hints = []
    for item in [r for r in remaining if r.startswith("-")] or remaining:
        close = difflib.get_close_matches(item.split("=", 1)[0], options, n=1)
        hints.append(item + (f" (did you mean {close[0]}?)" if close else ""))
    return CliError(f"unrecognized arguments: {', '.join(hints)}; `hope-hf eval --task all --help` lists every option "
                    "of the long-context suite")


def cmd_eval_suite(argv: list[str]) -> dict:
    from .runner import run_suite

    parser = build_suite_parser()
    a, remaining = parser.parse_known_args(argv)
    if remaining:
        raise _unrecognized(parser, remaining)
    try:
        tasks = list(TASKS) if a.task.strip() == "all" else [t.strip() for t in a.task.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise CliError(f"--task: unknown task(s) {unknown}; choose from {', '.join(TASKS)} or 'all'")
        lengths = parse_lengths(a.lengths)
        depths = parse_depths(a.depths)
    except TaskError as err:
        raise CliError(str(err)) from err
    if a.samples < 1 or a.piece_size < 1 or a.learn_chunk < 1:
        raise CliError("--samples, --piece_size and --learn_chunk must be >= 1")
    if not a.no_plots and importlib.util.find_spec("matplotlib") is None:
        raise CliError("the plots need matplotlib, which is not installed: pip install 'hope-hf[eval]' (from a "
                       "checkout: pip install -e '.[eval]'), or pass --no_plots")
    _check_output_dir(a.output_dir, a.overwrite_output_dir)
    model, tokenizer = load_model_and_tokenizer(a.model_name_or_path, a.tokenizer_name_or_path, a.device)
    learner = {"lr": a.learn_lr, "chunk_size": a.learn_chunk} if a.stream_learning else None
    task_kwargs = {"num_pairs": a.num_pairs, "num_facts": a.num_facts, "corpus": a.corpus,
                   "max_corpus_chars": a.max_corpus_chars}
    if a.haystack is not None:
        task_kwargs["haystack"] = a.haystack
    try:
        results = run_suite(
            model, tokenizer, tasks, lengths, output_dir=a.output_dir, plots=not a.no_plots,
            depths=depths, samples=a.samples, seed=a.seed, piece_size=a.piece_size, learner_kwargs=learner,
            progress=not a.no_progress, task_kwargs=task_kwargs,
            settings={"model": a.model_name_or_path, "command": "hope-hf eval " + " ".join(argv)},
        )
    except TaskError as err:
        raise CliError(str(err)) from err
    summary = {task: res["by_length"] for task, res in results["tasks"].items()}
    print(json.dumps({"accuracy_by_length": summary, "results": os.path.join(a.output_dir, "results.json")}, indent=2))
    return results

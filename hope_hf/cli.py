"""The ``hope-hf`` command line: ``train``, ``eval``, ``generate`` and ``convert``.

Every command is built on ``HfArgumentParser``; ``hope-hf COMMAND --help`` explains every option. ``train`` runs
unchanged under ``accelerate launch`` / ``torchrun`` (it is a ``Trainer`` run).

The main job, on a fresh machine after ``pip install hope-hf`` (CPU, a few minutes, no download)::

    hope-hf train --output_dir hope-tiny

trains a byte-level BPE tokenizer and the ``tiny`` preset on the embedded corpus (the Python standard library's
source), prints train and eval loss and perplexity next to the unigram baseline of the same data, saves model,
tokenizer and a model card in ``hope-tiny/`` and prints a sample generation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ._cli_common import (
    CliError,
    CliFailure,
    _file_being_read,
    describe_exception,
    check_model_folder,
    check_output_dir_is_a_folder,
    check_tokenizer_folder,
    for_option,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    log,
    same_or_nested,
)
from .training.arguments import HopeTrainingArguments

__all__ = ["HopeTrainingArguments", "main"]

_DTYPES = ("float32", "bfloat16", "float16")  # the --dtype values of `convert` (torch dtypes of these names)


# ============================================================================================ arguments
@dataclass
class ModelArguments:
    preset: str = field(
        default="tiny",
        metadata={"help": "Model size to train from scratch: a name known to `hope_hf.presets.get_preset` (e.g. "
                          "'tiny'). Ignored with --model_name_or_path."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A saved HOPE model folder to continue training from instead of a fresh preset; its "
                          "tokenizer is used unless --tokenizer_name_or_path is given."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated config fields to override on the preset, e.g. "
                          "'num_hidden_layers=2,hidden_size=128,chunk_size=16'. Values are parsed as JSON when "
                          "possible (numbers, true/false, lists and objects, whose own commas are kept: "
                          "'cms_levels=[{\"period\":16,\"intermediate_size\":96},{\"period\":2048,"
                          "\"intermediate_size\":96}]'), else kept as strings."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A saved Transformers tokenizer folder. Without it a byte-level BPE tokenizer of "
                          "--vocab_size entries is trained on the training data (or reused from --output_dir when "
                          "resuming)."},
    )
    vocab_size: int = field(
        default=4096,
        metadata={"help": "Vocabulary size of the trained tokenizer (>= 258); the model's vocab_size follows it."},
    )
    cuda_graphs: bool = field(
        default=True,
        metadata={"help": "On a CUDA device, run the Titans memory scans from CUDA graphs (config "
                          "`memory_cuda_graphs`; the same numbers, faster training and evaluation: "
                          "docs/performance.md; recorded in the saved config). --no_cuda_graphs runs them eagerly. "
                          "No effect on a CPU, nor under FSDP or DeepSpeed (sharded parameters: always eager)."},
    )
    compile_chunk_step: bool = field(
        default=True,
        metadata={"help": "On a CUDA device, compile the Titans memory's chunk step with torch.compile (config "
                          "`compile_chunk_step`: fewer, fused kernels, compiled in the first step; speed-ups in "
                          "docs/performance.md). --no_compile_chunk_step runs it eagerly. Recorded in the saved "
                          "config. On a CPU `train` leaves it as the config has it (--config_overrides "
                          "compile_chunk_step=true turns it on there)."},
    )
    continuum: bool = field(
        default=True,
        metadata={"help": "Step each CMS level only every `period` tokens on its summed gradients "
                          "(ContinuumOptimizer, docs/training.md). --no_continuum steps every parameter every step."},
    )

    def __post_init__(self):  # checks of these fields alone, so that nothing is written before they pass
        overrides = self.overrides
        if self.model_name_or_path:
            if self.config_overrides:
                raise CliError("--config_overrides applies to a fresh --preset, not to --model_name_or_path")
            return
        from .presets import available_presets, get_preset
        from .tokenizer import _MIN_VOCAB

        if self.preset.strip().lower() not in available_presets():
            raise CliError(f"--preset: unknown preset {self.preset!r}; allowed presets: "
                           f"{', '.join(available_presets())}")
        if not self.tokenizer_name_or_path and self.vocab_size < _MIN_VOCAB:
            raise CliError(f"--vocab_size must be >= {_MIN_VOCAB} (256 bytes + 2 special tokens), "
                           f"got {self.vocab_size}")
        try:  # the config is built (and checked) before a tokenizer is trained or anything is written
            get_preset(self.preset, **{"vocab_size": max(self.vocab_size, _MIN_VOCAB), **overrides})
        except (KeyError, TypeError, ValueError) as err:
            raise CliError(f"--config_overrides {self.config_overrides!r}: {err}") from err

    @property
    def overrides(self) -> dict:
        """The config fields of --config_overrides, parsed."""
        return _parse_overrides(self.config_overrides)


@dataclass
class DataArguments:
    data: str = field(
        default="stdlib",
        metadata={"help": "Training data: 'stdlib' (the embedded corpus: the Python standard library's source, no "
                          "download), a local .txt/.json/.jsonl/.py/.md file, a directory or glob of them, or a "
                          "`datasets` name ('name' or 'name:config')."},
    )
    eval_data: str | None = field(
        default=None,
        metadata={"help": "Evaluation data (same forms as --data). Default: every --eval_every-th document of --data "
                          "is held out."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text in JSON data or datasets."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per packed training sequence (>= 2)."})
    max_corpus_chars: int | None = field(
        default=1_500_000,
        metadata={"help": "Only for --data stdlib: read whole standard-library files (sorted by path) until their "
                          "sizes in bytes reach this many; the last file read may overshoot it by its own size."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the data (a `datasets.IterableDataset`); needs --max_steps."},
    )
    eval_every: int = field(
        default=20, metadata={"help": "Without --eval_data, hold out every N-th document for evaluation (N >= 2)."}
    )
    max_eval_samples: int | None = field(
        default=64, metadata={"help": "Evaluate on at most this many packed sequences (the first ones)."}
    )

    def __post_init__(self):
        from .data import check_seq_len

        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise CliError("--max_eval_samples must be >= 1 (or left out: every sequence), got "
                           f"{self.max_eval_samples}")
        if self.eval_every < 2:
            raise CliError(f"--eval_every must be >= 2, got {self.eval_every}")
        for_option("--seq_len", check_seq_len, self.seq_len)


@dataclass
class RunArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Delete what --output_dir holds and start a fresh run. Without it, a folder with "
                          "checkpoints is resumed from its last complete checkpoint (one interrupted while it was "
                          "saved is skipped, with a warning), a run stopped before its first checkpoint is run "
                          "again, and any other non-empty folder is an error: nothing is ever overwritten silently."},
    )
    sample_prompt: str = field(
        default="def", metadata={"help": "Prompt of the sample generation printed after training."}
    )
    sample_max_new_tokens: int = field(
        default=64, metadata={"help": "Length of the sample generation printed after training (0: none)."}
    )
    sample_temperature: float = field(
        default=0.8,
        metadata={"help": "Sampling temperature of that sample (top-k 50, seeded by --seed); 0 decodes greedily."},
    )


@dataclass
class EvalArguments:
    model_name_or_path: str = field(
        default=None, metadata={"help": "A saved HOPE model folder (with its tokenizer) to evaluate (required)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder, if not the model's."}
    )
    data: str = field(default="stdlib", metadata={"help": "Data to score; same forms as `train --data`."})
    split: str = field(
        default="heldout",
        metadata={"help": "'heldout': the documents `train` holds out (every --eval_every-th); 'all': every document."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text in JSON data or datasets."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per scored sequence (>= 2)."})
    max_corpus_chars: int | None = field(default=1_500_000, metadata={"help": "As `train --max_corpus_chars`."})
    eval_every: int = field(default=20, metadata={"help": "As `train --eval_every`."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Score at most this many sequences."})
    device: str = field(default="auto", metadata={"help": "'auto' (CUDA if available), 'cpu' or 'cuda[:N]'."})
    output_file: str | None = field(
        default=None,
        metadata={"help": "Also write the metrics to this JSON file (a new file: an existing one is refused unless "
                          "--overwrite_output_file)."},
    )
    overwrite_output_file: bool = field(
        default=False,
        metadata={"help": "Replace --output_file if it exists (without it an existing file is an error)."},
    )

    def __post_init__(self):
        if not self.model_name_or_path:
            raise CliError("--model_name_or_path is required")
        if self.split not in ("heldout", "all"):
            raise CliError(f"--split must be 'heldout' or 'all', got {self.split!r}")
        if self.batch_size < 1:
            raise CliError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise CliError("--max_eval_samples must be >= 1 (or left out: every sequence), got "
                           f"{self.max_eval_samples}")


@dataclass
class GenerateArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "A saved HOPE model folder (required)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer folder, if not the model's."})
    prompt: str = field(default="def ", metadata={"help": "The prompt to continue."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens to generate (>= 1)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0), with --do_sample."})
    top_k: int = field(default=50, metadata={"help": "Sample from the k most likely tokens, with --do_sample."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass, with --do_sample."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width (1: none)."})
    seed: int = field(default=0, metadata={"help": "Random seed for sampling."})
    device: str = field(default="auto", metadata={"help": "'auto' (CUDA if available), 'cpu' or 'cuda[:N]'."})

    def __post_init__(self):
        if not self.model_name_or_path:
            raise CliError("--model_name_or_path is required")
        if self.max_new_tokens < 1:
            raise CliError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise CliError(f"--temperature must be > 0 with --do_sample, got {self.temperature}")
        if self.num_beams < 1:
            raise CliError(f"--num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and not 0 < self.top_p <= 1:
            raise CliError(f"--top_p must be in (0, 1] with --do_sample, got {self.top_p}")
        if self.do_sample and self.top_k < 0:
            raise CliError(f"--top_k must be >= 0 with --do_sample (0: no top-k), got {self.top_k}")


@dataclass
class ConvertArguments:
    llama_model: str = field(
        default=None,
        metadata={"help": "A local Llama-family checkpoint folder (LlamaForCausalLM) to convert (required)."},
    )
    output_dir: str = field(
        default=None, metadata={"help": "Where the HOPE model and the tokenizer are saved (required)."}
    )
    extra_levels: str | None = field(
        default=None,
        metadata={"help": "CMS levels appended after the converted MLP, as a JSON list of periods (tokens) or of "
                          "{\"period\": ..., \"intermediate_size\": ...} dicts, e.g. '[2048, 65536]'. Their "
                          "down-projections start at zero, so the converted model computes the Llama logits."},
    )
    base_period: int = field(
        default=0,
        metadata={"help": "CMS period (tokens) of level 1, the converted Llama MLP; 0 keeps it frozen under the "
                          "continuum optimizer."},
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    dtype: str = field(default="float32", metadata={"help": "Dtype to load and save in: float32, bfloat16, float16."})

    def __post_init__(self):
        if not self.llama_model or not self.output_dir:
            raise CliError("--llama_model and --output_dir are required")
        if self.dtype not in _DTYPES:
            raise CliError(f"--dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        _parse_extra_levels(self.extra_levels)
        if self.base_period < 0:
            raise CliError(f"--base_period must be >= 0 (0 = frozen), got {self.base_period}")


def build_parser(command: str):
    """The `HfArgumentParser` of one command (its `--help` explains every option)."""
    from transformers import HfArgumentParser

    description = COMMANDS[command].help + "."
    if command == "train":
        description += (" Every `TrainingArguments` option is accepted as well; defaults are sized for the tiny "
                        "preset on CPU. Runs unchanged under `accelerate launch` / `torchrun`.")
    return HfArgumentParser(COMMANDS[command].arguments, prog=f"hope-hf {command}", description=description)


def _parse(command: str, argv: list[str]) -> tuple:
    """The argument dataclasses of ``command`` (each checks its own fields as it is built); an unknown option is a
    usage error naming it (and its closest valid spelling), not a traceback, and it is reported first."""
    parser = build_parser(command)
    remaining = parser.parse_known_args(argv)[1]
    if remaining:
        raise _unrecognized(command, parser, remaining)
    return tuple(parser.parse_args_into_dataclasses(args=argv))


def _unrecognized(command: str, parser, remaining: list[str]) -> CliError:
    """The error for the unknown options in ``remaining``, each with its closest valid spelling."""
    import difflib

    actions = list(parser._actions)
    more = ""
    if command == "eval":  # a mistyped --task lands here, in the perplexity evaluation: suggest the suite's options
        from .evaluation.cli import build_suite_parser

        actions += build_suite_parser()._actions
        more = " (the long-context suite's, with --task: `hope-hf eval --task all --help`)"
    options = sorted({s for action in actions for s in action.option_strings if s.startswith("--")})
    unknown = [r for r in remaining if r.startswith("-")] or remaining
    hints = []
    for item in unknown:
        name = item.split("=", 1)[0]
        close = difflib.get_close_matches(name, options, n=1)
        if close and close[0] == name:  # valid for the suite only
            hints.append(f"{item} (an option of the long-context suite, which --task selects)")
        else:
            hints.append(item + (f" (did you mean {close[0]}?)" if close else ""))
    return CliError(f"unrecognized arguments: {', '.join(hints)}; `hope-hf {command} --help` lists every "
                    f"option{more}")


# ============================================================================================ helpers
def _barrier(args) -> None:
    if args.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def _top_level_items(text: str) -> list[str]:
    """`text` split at the commas outside brackets, braces and quotes (a JSON list value keeps its commas)."""
    items, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            if char == quote and text[i - 1] != "\\":
                quote = None
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def _parse_overrides(text: str | None) -> dict:
    if not text:
        return {}
    out = {}
    for item in _top_level_items(text):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--config_overrides: expected 'key=value' items separated by commas, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def _parse_extra_levels(text: str | None) -> list:
    """The CMS levels of `convert --extra_levels` (a JSON list), ``[]`` without it."""
    if not text:
        return []
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as err:
        raise CliError(f"--extra_levels must be a JSON list of periods or {{'period', 'intermediate_size'}} "
                       f"dicts: {err}") from err
    if not isinstance(extra, list):
        raise CliError(f"--extra_levels must be a JSON list, got {text!r}")
    return extra


# What `train` writes into --output_dir before its first checkpoint: the tokenizer it trains, saved at once, and the
# record of what it wrote (hope-hf-outputs.json, hope_hf._outputs). A folder holding that record is a run of `train`
# that stopped before its first complete checkpoint (an error after the tokenizer was trained, an interruption):
# re-running the same command reuses that tokenizer and trains, instead of refusing the folder. The same files without
# the record (a user's tokenizer) block the folder, like any other content, unless --overwrite_output_dir.
_CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json", "adapter_model.safetensors")


def checkpoint_problem(folder: str) -> str | None:
    """Why ``folder`` is not a complete Trainer checkpoint (None if it is one). The Trainer writes
    ``trainer_state.json`` last: a checkpoint without it, or with a truncated one, was interrupted while saving."""
    state = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(state):
        return "it has no trainer_state.json (the Trainer writes it last: the save was interrupted)"
    try:
        json.loads(Path(state).read_text())
    except (OSError, ValueError) as err:
        return f"its trainer_state.json cannot be read ({err}; the save was interrupted)"
    if not any(os.path.isfile(os.path.join(folder, name)) for name in _CHECKPOINT_WEIGHTS):
        return f"it holds no weights ({' / '.join(_CHECKPOINT_WEIGHTS[:2])})"
    return None


def _checkpoints(path: str) -> list[tuple[int, str, str | None]]:
    """(step, folder, problem or None) of every ``checkpoint-N`` folder of ``path``, by step."""
    import re

    found = []
    for entry in os.listdir(path):
        match = re.fullmatch(r"checkpoint-(\d+)", entry)
        full = os.path.join(path, entry)
        if match and os.path.isdir(full):
            found.append((int(match.group(1)), full, checkpoint_problem(full)))
    return sorted(found)


def _prepare_output_dir(path: str, overwrite: bool, resume: str | None = None) -> tuple[str | None, bool]:
    """(The checkpoint to resume from or None, whether the folder's contents are to be deleted first); refuse to
    overwrite anything silently. Deletes nothing: the caller clears the folder once every input has been checked.

    A non-empty folder is used only when it is a run of `train` to continue: one with a complete checkpoint (the
    last complete one is resumed; a later, incomplete one, interrupted while it was saved, is skipped with a
    warning) or one holding the record of a run stopped before its first checkpoint."""
    from ._outputs import MANIFEST_NAME, TRAIN_COMMAND, is_run_of

    entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if not entries:
        return resume, False
    if overwrite:
        return resume, True
    if os.path.exists(os.path.join(path, "all_results.json")):
        raise CliError(
            f"--output_dir {path!r} already holds a finished run (all_results.json); choose another --output_dir "
            "or pass --overwrite_output_dir to replace it"
        )
    checkpoints = _checkpoints(path)
    complete = [folder for _, folder, problem in checkpoints if problem is None]
    ours = is_run_of(path, TRAIN_COMMAND)
    if complete or ours:
        last = complete[-1] if complete else None
        for step, folder, problem in checkpoints:
            if problem is not None and (last is None or step > int(last.rsplit("-", 1)[1])):
                log(f"warning: skipping the incomplete checkpoint {folder}: {problem}; "
                    + (f"resuming from {last}" if last else "starting from the first step"))
        return resume or last, False
    shown = ", ".join(e for e in entries[:5] if e != MANIFEST_NAME) + (", ..." if len(entries) > 5 else "")
    incomplete = [f"{os.path.basename(folder)} ({problem})" for _, folder, problem in checkpoints]
    raise CliError(
        f"--output_dir {path!r} is not empty ({shown}) and is not a run of `hope-hf train` to continue (no complete "
        "checkpoint" + (f": {'; '.join(incomplete)}" if incomplete else "") + f", no {MANIFEST_NAME}); choose "
        "another --output_dir or pass --overwrite_output_dir to replace its contents"
    )


_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "layer_types", "cms_levels", "cms_variant", "memory_expansion", "conv_kernel_size")


def _check_checkpoint_matches(checkpoint: str, config) -> None:
    """Refuse to resume a checkpoint whose model this command would not rebuild (changed size or tokenizer)."""
    path = os.path.join(checkpoint, "config.json")
    if not os.path.exists(path):
        return
    saved = json.loads(Path(path).read_text())
    differ = [f"{name}: checkpoint {saved[name]!r}, this command {getattr(config, name, None)!r}"
              for name in _SHAPE_FIELDS if name in saved and saved[name] != getattr(config, name, None)]
    if differ:
        raise CliError(f"cannot resume from {checkpoint!r}: its model differs from the one these arguments build "
                       f"({'; '.join(differ)}); re-run the command that started the run, or pass "
                       "--overwrite_output_dir to start afresh")


def _clear_folder(path: str) -> None:
    log(f"--overwrite_output_dir: deleting the contents of {path}")
    for entry in os.listdir(path):
        full = os.path.join(path, entry)
        shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)


def _check_inputs_outside(output_dir: str, model_args, data_args, resume: str | None, overwrite: bool) -> None:
    """Refuse an --output_dir that is also an input: the run writes (or --overwrite_output_dir deletes) there."""
    from .data import _expand_local

    folders = [("--model_name_or_path", model_args.model_name_or_path),
               ("--tokenizer_name_or_path", model_args.tokenizer_name_or_path)]
    if overwrite:  # without it a checkpoint inside --output_dir is the run being resumed
        folders.append(("--resume_from_checkpoint", resume))
    for option, path in folders:
        if path and same_or_nested(path, output_dir):
            raise CliError(f"--output_dir {output_dir!r} and {option} {path!r} are the same folder or one holds the "
                           "other; the run would overwrite its own input: choose another --output_dir")
    for option, source in (("--data", data_args.data), ("--eval_data", data_args.eval_data)):
        files = for_option(option, _expand_local, source) if source not in (None, "stdlib") else None
        out = Path(output_dir).resolve()
        inside = [f for f in files or [] if out in Path(f).resolve().parents]
        if inside:
            raise CliError(f"{option} {source!r} reads files inside --output_dir {output_dir!r} (e.g. {inside[0]!r}), "
                           "which the run writes; move the data or choose another --output_dir")


def _save_model_card(output_dir: str, *, origin: str, data: str, metrics: dict, config, num_params: int,
                     eval_data: str | None = None, resumed: bool = False) -> None:
    """``README.md`` of a trained model: the card of `hope_hf.cards.build_model_card`, with the run's data, steps and
    losses next to the unigram baseline."""
    from .cards import build_model_card

    data_name = "python-stdlib-source" if data == "stdlib" else data
    training = "\n".join([
        f"- data: `{data_name}`; sequences of {metrics['seq_len']} tokens; {metrics['train_tokens']:,} "
        "training tokens seen",
        f"- CMS levels (period in tokens, 0 = frozen): {[lvl['period'] for lvl in config.cms_levels]}",
        f"- steps: {metrics['global_step']}, wall time {metrics['train_runtime']:.0f} s",
        "- evaluation: " + ("held-out documents of the same data" if eval_data is None else f"`{eval_data}`"),
    ])
    measured = {
        f"train loss (mean over the {'resumed part of the ' if resumed else ''}run)": f"{metrics['train_loss']:.4f}",
        "eval loss": f"{metrics['eval_loss']:.4f}",
        "eval perplexity": f"{metrics['eval_perplexity']:.2f}",
        "unigram baseline perplexity": f"{metrics.get('unigram_perplexity', float('nan')):.2f}",
    }
    card = build_model_card(
        config, model_name=os.path.basename(os.path.abspath(output_dir)), repo_id=output_dir,
        summary="A HOPE model (Nested Learning, NeurIPS 2025: self-modifying Titans mixer + Continuum Memory System), "
                f"{origin}, {num_params:,} parameters, trained with `hope-hf train` on `{data_name}`.",
        training=training, training_metrics=measured, license=None, language=None,
        limitations="- A tiny demonstration model: it knows some Python syntax, nothing more.",
    )
    card.save(os.path.join(output_dir, "README.md"))


def _generate_text(model, tokenizer, prompt: str, max_new_tokens: int, **gen_kwargs) -> str:
    import torch

    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    if enc["input_ids"].shape[1] == 0:
        enc = {"input_ids": torch.tensor([[tokenizer.eos_token_id]])}
    enc = {k: v.to(device) for k, v in enc.items()}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **gen_kwargs,
        )
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)


# ============================================================================================ train
def cmd_train(argv: list[str]) -> dict:
    """`hope-hf train`: check every input, then tokenizer, model, data, Trainer run, saved model and report."""
    from transformers import set_seed

    from .evaluation.perplexity import unigram_baseline

    model_args, data_args, run_args, args = _parse_train_arguments(argv)
    # every argument is checked before anything is written or deleted
    resume, clear_output_dir = _check_train_inputs(model_args, data_args, run_args, args)
    foreign = _foreign_files(args.output_dir, clear_output_dir)
    set_seed(args.seed)
    tokenizer, tokenizer_trained = _load_or_train_tokenizer(model_args, data_args, args, resume, clear_output_dir)
    model, n_params = _build_model(model_args, data_args, args, tokenizer, resume)
    train_ds, eval_ds = _load_datasets(data_args, args, tokenizer, model.config)
    # only now, with every input loaded and checked, is --output_dir cleared (--overwrite_output_dir) and written
    _start_output_dir(args, clear_output_dir, tokenizer if tokenizer_trained else None)
    trainer, result, wall = _run_trainer(model_args, args, model, tokenizer, train_ds, eval_ds, resume)
    metrics = _final_metrics(trainer, result, wall, data_args.seq_len, n_params)
    if not data_args.streaming:
        metrics["unigram_perplexity"] = unigram_baseline(train_ds["input_ids"], eval_ds["input_ids"], len(tokenizer))
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        _save_run(trainer, tokenizer, metrics, model_args, data_args, run_args, model.config, resumed=bool(resume),
                  foreign=foreign)
    return metrics


def _parse_train_arguments(argv: list[str]) -> tuple:
    """The four argument dataclasses of `train`, with the defaults that depend on the machine or on what was given."""
    import torch

    # Under a multi-process launcher on a machine without GPU, Trainer must be told to use the CPU (gloo); without
    # it every rank would silently train its own copy.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and "--use_cpu" not in argv:
        argv = [*argv, "--use_cpu"]
    model_args, data_args, run_args, args = _parse("train", argv)
    if not torch.cuda.is_available() and not any(a.startswith("--dataloader_pin_memory") for a in argv):
        args.dataloader_pin_memory = False  # nothing to pin to without a GPU (silences a warning per dataloader)
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if "--num_train_epochs" in given and "--max_steps" not in given:
        args.max_steps = -1  # epochs asked for: the default step count would silently override them
    if args.include_num_input_tokens_seen in ("no", False):
        args.include_num_input_tokens_seen = "all"  # the tokens trained on, for the results and the model card
    return model_args, data_args, run_args, args


def _check_train_inputs(model_args, data_args, run_args, args) -> tuple[str | None, bool]:
    """The checks of `train` that span several argument groups or read the file system (each group checked its own
    fields when parsed). Returns the checkpoint to resume from (or None) and whether --output_dir is to be cleared."""
    if not args.output_dir:
        raise CliError("--output_dir is required (where checkpoints, the model, tokenizer and model card go)")
    check_output_dir_is_a_folder(args.output_dir)
    if args.max_steps == 0 or args.max_steps < -1:
        raise CliError(f"--max_steps must be >= 1, or -1 to train for --num_train_epochs; got {args.max_steps}")
    if data_args.streaming and args.max_steps <= 0:
        raise CliError("--streaming needs --max_steps > 0 (a stream has no length to count epochs by)")
    if model_args.model_name_or_path:
        check_model_folder(model_args.model_name_or_path)
    if model_args.tokenizer_name_or_path:
        check_tokenizer_folder(model_args.tokenizer_name_or_path, "--tokenizer_name_or_path")
    resume = args.resume_from_checkpoint
    if resume is not None and not os.path.isdir(resume):
        raise CliError(f"--resume_from_checkpoint {resume!r} is not a checkpoint folder")
    if resume is not None and checkpoint_problem(resume):
        raise CliError(f"--resume_from_checkpoint {resume!r} is not a complete checkpoint: {checkpoint_problem(resume)}"
                       "; pass an earlier checkpoint")
    _check_inputs_outside(args.output_dir, model_args, data_args, resume, run_args.overwrite_output_dir)
    resume, clear_output_dir = _prepare_output_dir(args.output_dir, run_args.overwrite_output_dir, resume)
    if resume:
        log(f"Resuming the interrupted run from {resume}")
    return resume, clear_output_dir


def _load_or_train_tokenizer(model_args, data_args, args, resume: str | None, clear_output_dir: bool) -> tuple:
    """(The tokenizer, whether it was trained here): the given one, the model's, the one saved by the run being
    resumed, or one trained on the training data."""
    with args.main_process_first(desc="tokenizer"):
        saved = [d for d in (resume, None if clear_output_dir else args.output_dir)
                 if d and os.path.exists(os.path.join(d, "tokenizer.json"))]
        if model_args.tokenizer_name_or_path:
            return load_tokenizer(model_args.tokenizer_name_or_path, "--tokenizer_name_or_path"), False
        if model_args.model_name_or_path:
            return load_tokenizer(model_args.model_name_or_path, "--model_name_or_path"), False
        if saved:
            return load_tokenizer(saved[0], "--resume_from_checkpoint" if saved[0] == resume else "--output_dir"), False
        return _train_tokenizer(model_args, data_args), True


def _train_tokenizer(model_args, data_args):
    """A byte-level BPE tokenizer of --vocab_size entries, trained on the training documents."""
    from .data import load_documents, split_documents
    from .tokenizer import train_tokenizer

    t0 = time.time()
    docs = load_documents(
        data_args.data, text_column=data_args.text_column, streaming=data_args.streaming,
        max_chars=data_args.max_corpus_chars,
    )
    if data_args.eval_data is None:
        docs = split_documents(docs, data_args.eval_every)[0]
    if data_args.streaming:
        docs = docs.take(20_000)
    tokenizer = train_tokenizer(docs, model_args.vocab_size)
    log(f"Trained a byte-level BPE tokenizer of {len(tokenizer)} tokens in {time.time() - t0:.1f} s")
    return tokenizer


def _build_model(model_args, data_args, args, tokenizer, resume: str | None) -> tuple:
    """(The model to train, its parameter count): the saved one, or the preset sized to the tokenizer; checked
    against the tokenizer, --seq_len and the checkpoint to resume."""
    from .data import check_seq_len
    from .tokenizer import check_tokenizer_matches

    if model_args.model_name_or_path:
        model = load_model(model_args.model_name_or_path)
    else:
        from hope_hf import HopeForCausalLM

        from .presets import get_preset

        config = get_preset(model_args.preset, **{
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **model_args.overrides,
        })
        model = HopeForCausalLM(config)
    check_tokenizer_matches(tokenizer, model.config)
    for_option("--seq_len", check_seq_len, data_args.seq_len, model.config)
    if resume:
        _check_checkpoint_matches(resume, model.config)
    if args.device.type == "cuda":
        _configure_cuda_memory(model.config, model_args, args)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"Model: {n_params:,} parameters; layer types {model.config.layer_types}; "
        f"CMS periods {[lvl['period'] for lvl in model.config.cms_levels]}")
    return model, n_params


def _configure_cuda_memory(config, model_args, args) -> None:
    """--cuda_graphs / --compile_chunk_step into the config (graphs off for sharded parameters)."""
    # sharded parameters move between the forward and the backward pass: the captured graphs cannot follow
    sharded = bool(args.fsdp) or bool(args.deepspeed) or any(
        os.environ.get(name, "").lower() in ("1", "true")
        for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    config.memory_cuda_graphs = model_args.cuda_graphs and not sharded
    config.compile_chunk_step = model_args.compile_chunk_step
    log("Titans memory scans: " + ("CUDA graphs" if config.memory_cuda_graphs else
                                   "eager (FSDP / DeepSpeed)" if sharded else "eager (--no_cuda_graphs)")
        + ", chunk step " + ("compiled (the first step compiles it)" if model_args.compile_chunk_step
                             else "eager (--no_compile_chunk_step)"))


def _load_datasets(data_args, args, tokenizer, config) -> tuple:
    """(Training, evaluation) datasets of packed sequences; at most --max_eval_samples evaluation sequences."""
    from .data import build_lm_datasets

    with args.main_process_first(desc="packing the data"):
        datasets = build_lm_datasets(
            tokenizer, data_args.seq_len, data_args.data, eval_source=data_args.eval_data,
            text_column=data_args.text_column, streaming=data_args.streaming,
            max_chars=data_args.max_corpus_chars, eval_every=data_args.eval_every, config=config,
        )
    train_ds, eval_ds = datasets["train"], datasets["eval"]
    if data_args.max_eval_samples is not None:
        eval_ds = eval_ds.take(data_args.max_eval_samples) if data_args.streaming else eval_ds.select(
            range(min(data_args.max_eval_samples, len(eval_ds))))
    if not data_args.streaming:
        log(f"Data: {len(train_ds)} training and {len(eval_ds)} evaluation sequences of {data_args.seq_len} tokens")
    return train_ds, eval_ds


def _start_output_dir(args, clear: bool, trained_tokenizer=None) -> None:
    """Clear --output_dir if asked, create it, and save the tokenizer trained here at once (an interrupted run finds
    it when the same command runs again); on the main process, the others waiting."""
    from ._outputs import TRAIN_COMMAND, record_outputs

    with args.main_process_first(desc="output dir"):
        if args.process_index == 0:
            if clear:
                _clear_folder(args.output_dir)
            os.makedirs(args.output_dir, exist_ok=True)
            written = []
            if trained_tokenizer is not None:
                written = [os.path.relpath(f, args.output_dir) for f in trained_tokenizer.save_pretrained(
                    args.output_dir) if os.path.dirname(os.path.abspath(f)) == os.path.abspath(args.output_dir)]
            # the folder is marked as a run of `train` (re-run after an interruption: resumed, not refused)
            record_outputs(args.output_dir, TRAIN_COMMAND, written)
    _barrier(args)


def _run_trainer(model_args, args, model, tokenizer, train_ds, eval_ds, resume: str | None) -> tuple:
    """(The trainer, its `train` result, the wall time of training in seconds)."""
    from transformers import Trainer

    from .threads import FreeCoreThreadsCallback
    from .training import HopeTrainer

    trainer_cls = HopeTrainer if model_args.continuum else Trainer
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
    )
    trainer.add_callback(FreeCoreThreadsCallback(report=log))  # CPU threads from the free cores, re-checked
    t0 = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except Exception as err:
        where = _file_being_read(err)
        if resume and where and same_or_nested(where, resume):  # a damaged file of the checkpoint being resumed
            raise CliFailure(f"cannot resume from {resume!r}: {os.path.basename(where)} cannot be loaded "
                             f"({describe_exception(err).split(': ', 1)[1]}); resume from an earlier checkpoint "
                             "(--resume_from_checkpoint) or pass --overwrite_output_dir to start afresh") from err
        raise
    return trainer, result, time.time() - t0


def _final_metrics(trainer, result, wall: float, seq_len: int, n_params: int) -> dict:
    """Train and eval loss of the run; the eval loss is of the weights that are saved."""
    state = trainer.state
    last_eval = [h for h in state.log_history if "eval_loss" in h]
    # with --load_best_model_at_end the saved weights are the best checkpoint's, not the last step's: evaluate them
    if last_eval and last_eval[-1].get("step") == state.global_step and not trainer.args.load_best_model_at_end:
        eval_metrics = last_eval[-1]  # the run ended with an evaluation of the final weights
    else:
        eval_metrics = trainer.evaluate()
    metrics = {
        "train_loss": result.training_loss,
        "train_runtime": wall,
        "global_step": state.global_step,
        "seq_len": seq_len,
        "train_tokens": int(state.num_input_tokens_seen),  # every process's, a short last batch as it was
        "eval_loss": eval_metrics["eval_loss"],
        "eval_perplexity": math.exp(eval_metrics["eval_loss"]),
        "num_parameters": n_params,
    }
    logged = [h["loss"] for h in state.log_history if "loss" in h]
    if logged:
        metrics["first_logged_train_loss"], metrics["last_logged_train_loss"] = logged[0], logged[-1]
    return metrics


def _save_run(trainer, tokenizer, metrics: dict, model_args, data_args, run_args, config, resumed: bool,
              foreign: set = frozenset()) -> None:
    """On the main process, after the model is saved: the tokenizer, the model card, the sample generation and
    ``all_results.json`` into --output_dir, and the summary printed."""
    output_dir = trainer.args.output_dir
    tokenizer.save_pretrained(output_dir)
    _save_model_card(
        output_dir, data=data_args.data, metrics=metrics, config=config, num_params=metrics["num_parameters"],
        origin=(f"continued from `{model_args.model_name_or_path}`" if model_args.model_name_or_path
                else f"preset `{model_args.preset}`"),
        eval_data=data_args.eval_data, resumed=resumed,
    )
    sample = _sample_generation(trainer.model, tokenizer, run_args, trainer.args.seed)
    if sample is not None:
        metrics["sample"] = sample
    with open(os.path.join(output_dir, "all_results.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    _record_run_files(output_dir, foreign)
    _log_summary(metrics, resumed, output_dir)
    if sample is not None:
        log(f"sample ({run_args.sample_prompt!r} ->):\n{sample}")


def _record_run_files(output_dir: str, foreign: set) -> None:
    """Add the files the finished run wrote next to its checkpoints (model, tokenizer, card, results) to the record
    of the folder: every file there but ``foreign``, those that were there, unrecorded, before the run began."""
    from ._outputs import MANIFEST_NAME, TRAIN_COMMAND, record_outputs

    names = [name for name in os.listdir(output_dir) if os.path.isfile(os.path.join(output_dir, name))
             and name not in foreign and not name.startswith(MANIFEST_NAME)]
    record_outputs(output_dir, TRAIN_COMMAND, names)


def _foreign_files(output_dir: str, clear: bool) -> set:
    """Files in --output_dir before the run that no run of `train` recorded (kept out of the record)."""
    from ._outputs import read_manifest

    if clear or not os.path.isdir(output_dir):
        return set()
    recorded = set((read_manifest(output_dir) or {"files": {}})["files"])
    return set(os.listdir(output_dir)) - recorded


def _sample_generation(model, tokenizer, run_args, seed: int) -> str | None:
    """The sample printed after training (--sample_*), None with --sample_max_new_tokens 0."""
    import torch

    if run_args.sample_max_new_tokens <= 0:
        return None
    gen = {"do_sample": False}
    if run_args.sample_temperature > 0:
        torch.manual_seed(seed)
        gen = {"do_sample": True, "temperature": run_args.sample_temperature, "top_k": 50}
    return _generate_text(model, tokenizer, run_args.sample_prompt, run_args.sample_max_new_tokens, **gen)


def _log_summary(metrics: dict, resumed: bool, output_dir: str) -> None:
    first, last = metrics.get("first_logged_train_loss"), metrics.get("last_logged_train_loss")
    log("")
    log(f"train loss  {metrics['train_loss']:.4f} "
        + ("(mean over the steps since the resumed checkpoint)" if resumed else "(mean over the run)")
        + (f"; first logged {first:.4f}, last logged {last:.4f}" if last is not None else ""))
    log(f"train perplexity of the last logged loss  {math.exp(last) if last is not None else float('nan'):.2f}")
    log(f"eval loss   {metrics['eval_loss']:.4f}   eval perplexity {metrics['eval_perplexity']:.2f}")
    if "unigram_perplexity" in metrics:
        log(f"unigram baseline perplexity of the same data  {metrics['unigram_perplexity']:.2f}")
    log(f"wall time of training  {metrics['train_runtime']:.0f} s; saved model, tokenizer and model card to "
        f"{output_dir}")


# ============================================================================================ eval
def cmd_eval(argv: list[str]) -> dict:
    from .evaluation.cli import cmd_eval_suite, wants_suite

    if wants_suite(argv):  # the long-context suite (hope_hf.evaluation): `hope-hf eval --task passkey --help`
        return cmd_eval_suite(argv)
    from .data import check_seq_len
    from .evaluation.perplexity import evaluate_perplexity
    from .threads import FreeCoreThreads

    (a,) = _parse("eval", argv)
    if a.output_file:
        _check_output_file(a.output_file, a.overwrite_output_file)
    model, tokenizer = load_model_and_tokenizer(a.model_name_or_path, a.tokenizer_name_or_path, a.device)
    for_option("--seq_len", check_seq_len, a.seq_len, model.config)
    print(FreeCoreThreads().start().describe(), file=sys.stderr)  # stdout is the JSON result
    ds = _eval_dataset(a, tokenizer, model.config)
    result = evaluate_perplexity(model, tokenizer, ds, a.batch_size)
    result = {"model": a.model_name_or_path, "data": a.data, "split": a.split, "seq_len": a.seq_len,
              "sequences": len(ds), **result}
    print(json.dumps(result, indent=2))
    if a.output_file:
        Path(a.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output_file).write_text(json.dumps(result, indent=2))
    return result


def _check_output_file(path: str, overwrite: bool) -> None:
    """Before any work: --output_file must be a file that can be written, and a new one unless asked to replace."""
    if os.path.isdir(path):
        raise CliError(f"--output_file {path!r} is a folder; name a JSON file")
    if os.path.exists(path) and not overwrite:
        raise CliError(f"--output_file {path!r} already exists; choose another file or pass --overwrite_output_file "
                       "to replace it")
    parent = Path(path).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CliError(f"--output_file {path!r}: {str(parent)!r} is a file, not a folder")


def _eval_dataset(a: EvalArguments, tokenizer, config):
    """The packed sequences `eval` scores: --split of --data, at most --max_eval_samples of them."""
    from .data import build_lm_datasets, load_documents, pack_dataset

    if a.split == "heldout":
        ds = build_lm_datasets(tokenizer, a.seq_len, a.data, text_column=a.text_column, max_chars=a.max_corpus_chars,
                               eval_every=a.eval_every, config=config)["eval"]
    else:
        docs = load_documents(a.data, text_column=a.text_column, max_chars=a.max_corpus_chars)
        ds = pack_dataset(docs, tokenizer, a.seq_len)
    if a.max_eval_samples is not None:
        ds = ds.select(range(min(a.max_eval_samples, len(ds))))
    return ds


# ============================================================================================ generate
def cmd_generate(argv: list[str]) -> str:
    import torch
    from transformers import TextStreamer

    (a,) = _parse("generate", argv)
    model, tokenizer = load_model_and_tokenizer(a.model_name_or_path, a.tokenizer_name_or_path, a.device)
    torch.manual_seed(a.seed)
    kwargs = {"do_sample": a.do_sample, "num_beams": a.num_beams}
    if a.do_sample:
        kwargs.update(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    if a.num_beams == 1:  # stream the tokens as they come (a live progress display)
        kwargs["streamer"] = TextStreamer(tokenizer, skip_special_tokens=True)
    text = _generate_text(model, tokenizer, a.prompt, a.max_new_tokens, **kwargs)
    if a.num_beams > 1:
        print(text)
    return text


# ============================================================================================ convert
def cmd_convert(argv: list[str]) -> str:
    (a,) = _parse("convert", argv)
    replace = _check_convert_folders(a)
    hope, tokenizer = _convert_checkpoint(a)
    if replace:  # every argument checked and the source converted: only now is the old output deleted
        log(f"--overwrite_output_dir: deleting the contents of {a.output_dir}")
        shutil.rmtree(a.output_dir)
    hope.save_pretrained(a.output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(a.output_dir)
    else:
        log("(no tokenizer found next to the Llama checkpoint; saved the model only)")
    log(f"Converted {a.llama_model} -> {a.output_dir} ({sum(p.numel() for p in hope.parameters()):,} parameters)")
    return a.output_dir


def _check_convert_folders(a: ConvertArguments) -> bool:
    """Check --llama_model and --output_dir on disk; returns whether --output_dir holds something to replace."""
    if not os.path.isdir(a.llama_model):
        raise CliError(f"--llama_model {a.llama_model!r} is not a local folder")
    check_output_dir_is_a_folder(a.output_dir)
    if same_or_nested(a.output_dir, a.llama_model):
        raise CliError(f"--output_dir {a.output_dir!r} and --llama_model {a.llama_model!r} are the same folder or one "
                       "holds the other; the conversion would overwrite its source: choose another --output_dir")
    replace = os.path.isdir(a.output_dir) and bool(os.listdir(a.output_dir))
    if replace and not a.overwrite_output_dir:
        raise CliError(f"--output_dir {a.output_dir!r} is not empty; choose another or pass --overwrite_output_dir")
    return replace


def _convert_checkpoint(a: ConvertArguments) -> tuple:
    """(The HOPE model converted from --llama_model, the checkpoint's tokenizer or None)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .convert import SUPPORTED_SOURCE_MODEL_TYPES, convert_llama_to_hope

    if not os.path.exists(os.path.join(a.llama_model, "config.json")):
        raise CliError(f"--llama_model {a.llama_model!r} has no config.json: not a saved model folder")
    model_type = AutoConfig.from_pretrained(a.llama_model).model_type
    if model_type not in SUPPORTED_SOURCE_MODEL_TYPES:
        raise CliError(f"--llama_model holds a {model_type!r} model; supported: "
                       f"{', '.join(SUPPORTED_SOURCE_MODEL_TYPES)}")
    llama = AutoModelForCausalLM.from_pretrained(a.llama_model, dtype=getattr(torch, a.dtype))
    try:
        hope = convert_llama_to_hope(llama, extra_cms_levels=_parse_extra_levels(a.extra_levels),
                                     base_period=a.base_period)
    except ValueError as err:
        raise CliError(f"--llama_model / --extra_levels: {err}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(a.llama_model)
    except (OSError, ValueError):
        tokenizer = None
    return hope, tokenizer


# ============================================================================================ main
class Command(NamedTuple):
    name: str
    run: Callable[[list[str]], object]
    help: str  # one line, in the usage text and as the description of `hope-hf NAME --help`
    arguments: tuple  # the argument dataclasses of its parser


# The commands of `hope-hf`: the usage text, the parsers and the dispatch of `main` are all made from this table.
COMMANDS: dict[str, Command] = {command.name: command for command in (
    Command("train", cmd_train,
            "train a HOPE model (a preset from scratch, or continue a saved model) with Trainer",
            (ModelArguments, DataArguments, RunArguments, HopeTrainingArguments)),
    Command("eval", cmd_eval,
            "perplexity of a saved model on held-out data (through the shipped `evaluate` metric); with --task, "
            "the long-context suite (hope-hf eval --task passkey --help)",
            (EvalArguments,)),
    Command("generate", cmd_generate, "generate text from a saved model", (GenerateArguments,)),
    Command("convert", cmd_convert, "convert a Llama-family checkpoint into a HOPE model (attention variant)",
            (ConvertArguments,)),
)}

ARGUMENT_CLASSES = {name: command.arguments for name, command in COMMANDS.items()}


def _usage() -> str:
    lines = ["usage: hope-hf [--debug] COMMAND [options]   (hope-hf COMMAND --help explains every option)", "",
             "commands:"]
    lines += [f"  {name:<9} {command.help}" for name, command in COMMANDS.items()]
    lines += ["", "--debug (or HOPE_HF_DEBUG=1): show the traceback of a failure instead of its one-line message"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error is one line on stderr, ``hope-hf COMMAND: error: ...``, naming the option or the
    file and the problem: exit status 2 for a usage error (a bad option, a missing or unsuitable file or folder), 1
    for a failure (a damaged or non-finite checkpoint, an error while working). ``hope-hf --debug COMMAND ...`` (or
    ``HOPE_HF_DEBUG=1``) shows the traceback of a failure instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("HOPE_HF_DEBUG", "").lower() in ("1", "true", "yes")
    if argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hope-hf: unknown command {command!r}; choose one of {', '.join(COMMANDS)}\n\n{_usage()}",
              file=sys.stderr)
        return 2
    from .data import DataError
    from .tokenizer import TokenizerMismatchError

    try:
        COMMANDS[command].run(rest)
    except (CliError, DataError, TokenizerMismatchError) as err:
        if debug and isinstance(err, CliFailure):
            raise
        print(f"hope-hf {command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"hope-hf {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # anything else: one line naming the file being read, if any; the traceback on --debug
        if debug:
            raise
        print(f"hope-hf {command}: error: {describe_exception(err)} (`hope-hf --debug {command} ...` shows where)",
              file=sys.stderr)
        return 1
    finally:
        _end_process_group()
    return 0


def _end_process_group() -> None:
    """Under `torchrun` / `accelerate launch`: leave the process group before exiting (a gloo group torn down at
    interpreter exit can abort a rank after a finished run)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # a DDP model destroyed after its group could hang a rank's exit
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

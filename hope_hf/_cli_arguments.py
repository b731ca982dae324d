"""The options of the ``hope-hf`` commands: one dataclass per group (each checks its own fields as it is built), the
``HfArgumentParser`` made of them, and the parsing of the options whose values are JSON-like.

Cheap to import (no torch, no Transformers until a parser is built), so that ``hope-hf COMMAND --help`` answers at
once. ``TrainingDefaults`` holds the ``TrainingArguments`` options whose defaults ``hope-hf train`` changes;
``hope_hf.training.arguments.HopeTrainingArguments`` is ``TrainingArguments`` with them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ._cli_common import CliError, for_option

__all__ = [
    "ConvertArguments",
    "DataArguments",
    "EvalArguments",
    "GenerateArguments",
    "ModelArguments",
    "RunArguments",
    "TrainingDefaults",
    "make_parser",
    "parse_arguments",
]

_DTYPES = ("float32", "bfloat16", "float16")  # the --dtype values of `convert` (torch dtypes of these names)


@dataclass
class ModelArguments:
    _argument_group_name = "model"

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
    _argument_group_name = "data"

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
    _argument_group_name = "run"

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
class TrainingDefaults:
    """The `TrainingArguments` options whose defaults `hope-hf train` changes: sized for the tiny preset on CPU (a few
    minutes). Every other `TrainingArguments` option keeps its Transformers default."""

    _argument_group_name = "training (the Trainer options whose defaults hope-hf train changes)"

    output_dir: str | None = field(
        default=None, metadata={"help": "Where checkpoints, the final model, tokenizer and model card go (required)."}
    )
    max_steps: int = field(
        default=160,
        metadata={"help": "Total optimizer steps (-1: use num_train_epochs; giving --num_train_epochs without "
                          "--max_steps does that too)."},
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per device per micro-batch."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Sequences per device for evaluation."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate of AdamW."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the matrices."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(
        default=16, metadata={"help": "Linear warm-up steps (a float < 1 is a fraction of the run)."}
    )
    logging_steps: float = field(default=20, metadata={"help": "Log the training loss every N steps."})
    logging_first_step: bool = field(default=True, metadata={"help": "Log the loss of the first step too."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate: 'no', 'steps' or 'epoch'."})
    eval_steps: float | None = field(
        default=0.5, metadata={"help": "Evaluate every N steps (a float < 1 is a fraction of the run)."}
    )
    save_steps: float = field(
        default=0.5, metadata={"help": "Save a checkpoint every N steps (a float < 1 is a fraction of the run)."}
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most N checkpoints."})


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


def make_parser(command: str, classes: tuple, description: str | None = None, epilog: str | None = None):
    """The `HfArgumentParser` of `hope-hf COMMAND` made of the dataclasses `classes`. Abbreviated options are refused
    (`--max_step` is not taken for `--max_steps`)."""
    from transformers import HfArgumentParser

    return HfArgumentParser(classes, prog=f"hope-hf {command}", description=description, epilog=epilog,
                            allow_abbrev=False)


def parse_arguments(command: str, classes: tuple, argv: list[str]) -> tuple:
    """The instances of the dataclasses `classes` of `command` (each checks its own fields as it is built); an unknown
    or abbreviated option is a usage error naming it (and its closest valid spelling), not a traceback, and it is
    reported first."""
    parser = make_parser(command, classes)
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

"""The ``hope-hf`` command line: ``train``, ``eval``, ``generate`` and ``convert``.

Every command is built on ``HfArgumentParser``; ``hope-hf COMMAND --help`` explains its options (``train``: HOPE's
own, and the Trainer options whose defaults it changes; ``train --help-all`` adds every other ``TrainingArguments``
option). ``train`` runs unchanged under ``accelerate launch`` / ``torchrun`` (it is a ``Trainer`` run).

The main job, on a fresh machine after ``pip install hope-hf`` (CPU, a few minutes, no download)::

    hope-hf train --output_dir hope-tiny

trains a byte-level BPE tokenizer and the ``tiny`` preset on the embedded corpus (the Python standard library's
source), prints train and eval loss and perplexity next to the unigram baseline of the same data, saves model,
tokenizer and a model card in ``hope-tiny/`` and prints a sample generation.

This module and the options (``hope_hf._cli_arguments``) import neither torch nor the model: ``--help`` answers at
once, and a command's module (``hope_hf._cli_train``, ``hope_hf._cli_commands``) is imported when it runs.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import NamedTuple

from ._cli_arguments import (
    ConvertArguments,
    DataArguments,
    EvalArguments,
    GenerateArguments,
    ModelArguments,
    RunArguments,
    TrainingDefaults,
    make_parser,
)
from ._cli_common import CliError, CliFailure, describe_exception, wants_suite

__all__ = ["COMMANDS", "main"]


class Command(NamedTuple):
    name: str
    run: str  # "module:function" of hope_hf, imported when the command runs; the function takes the arguments
    help: str  # one line, in the usage text and as the description of `hope-hf NAME --help`
    arguments: tuple  # the argument dataclasses of its help (train: `TrainingDefaults` stands for TrainingArguments)


# The commands of `hope-hf`: the usage text, the help and the dispatch of `main` are all made from this table.
COMMANDS: dict[str, Command] = {command.name: command for command in (
    Command("train", "_cli_train:cmd_train",
            "train a HOPE model (a preset from scratch, or continue a saved model) with Trainer",
            (ModelArguments, DataArguments, RunArguments, TrainingDefaults)),
    Command("eval", "_cli_commands:cmd_eval",
            "perplexity of a saved model on held-out data (through the shipped `evaluate` metric); with --task, "
            "the long-context suite (hope-hf eval --task passkey --help)",
            (EvalArguments,)),
    Command("generate", "_cli_commands:cmd_generate", "generate text from a saved model", (GenerateArguments,)),
    Command("convert", "_cli_commands:cmd_convert",
            "convert a Llama-family checkpoint into a HOPE model (attention variant)", (ConvertArguments,)),
)}

ARGUMENT_CLASSES = {name: command.arguments for name, command in COMMANDS.items()}
HELP_ALL = "--help-all"


def print_help(command: str, everything: bool = False) -> None:
    """`hope-hf COMMAND --help`: the command's own options first. For `train`, the Trainer options whose defaults it
    changes close the list and a pointer names the rest; `everything` (`--help-all`) lists every `TrainingArguments`
    option instead (which imports Transformers' `TrainingArguments`, and torch with it)."""
    classes, description, epilog = COMMANDS[command].arguments, COMMANDS[command].help + ".", None
    if command == "train":
        description += (" Defaults are sized for the tiny preset on CPU. Runs unchanged under `accelerate launch` / "
                        "`torchrun`.")
        if everything:
            from .training.arguments import HopeTrainingArguments

            classes = (*classes[:-1], HopeTrainingArguments)
        else:
            epilog = ("Every other option of Transformers' TrainingArguments is accepted as well (e.g. "
                      "--gradient_accumulation_steps, --bf16, --seed, --report_to, --resume_from_checkpoint): "
                      f"`hope-hf train {HELP_ALL}` lists them all.")
    make_parser(command, classes, description, epilog).print_help()


def _wants_help(command: str, argv: list[str]) -> bool:
    if command == "eval" and wants_suite(argv):
        return False  # the long-context suite's own parser answers its --help
    return any(a in ("-h", "--help", HELP_ALL) for a in argv)


def _run(command: str, argv: list[str]):
    """Import the model code (registering the HOPE Auto classes) and the command's module, and run it."""
    import hope_hf

    hope_hf._import_model_code()
    module, function = COMMANDS[command].run.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), function)(argv)


def _usage() -> str:
    lines = ["usage: hope-hf [--debug] COMMAND [options]   (hope-hf COMMAND --help explains its options)", "",
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
    if _wants_help(command, rest):
        print_help(command, everything=HELP_ALL in rest)
        return 0
    from .data import DataError
    from .tokenizer import TokenizerMismatchError

    try:
        _run(command, rest)
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
    if "torch.distributed" not in sys.modules:  # nothing ran that could have started one (e.g. `--help`)
        return
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # a DDP model destroyed after its group could hang a rank's exit
        dist.destroy_process_group()



if __name__ == "__main__":
    sys.exit(main())

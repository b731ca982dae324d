"""What keeps the ``hope-hf`` commands from overwriting what a user saved: the checks of ``train --output_dir`` (a run
to resume, a finished run, a folder of someone else's files, an input inside it) and of ``eval --output_file``, and
the record of the files a run of ``train`` wrote (``hope_hf._outputs``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ._cli_common import CliError, for_option, log, same_or_nested

__all__ = ["check_output_file", "checkpoint_problem", "prepare_output_dir"]


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


def prepare_output_dir(path: str, overwrite: bool, resume: str | None = None) -> tuple[str | None, bool]:
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


def check_output_file(path: str, overwrite: bool) -> None:
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
